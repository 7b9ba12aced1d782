//! Each publisher's events heard by a recording stand-in, with no other
//! actor's messages involved: the HealthActor's probe outcomes and the
//! GpuMonitorActor's snapshots. (The QueueActor's `WorkAvailable` and
//! `JobFinished` are heard the same way in `pipeline.rs`.)

use std::sync::Arc;
use std::time::Duration;

use ractor::Actor;

use feeder_actors::gpu::GpuSnapshot;
use feeder_actors::gpu_monitor::{GpuMonitorActor, GpuMonitorArgs, ThermalLimits};
use feeder_actors::health::{HealthActor, HealthArgs, ProbeOutcome};
use feeder_actors::inference::ProbeError;
use feeder_actors::testkit::{FakeGpu, FakeInference, Recorder};

const LIMIT: Duration = Duration::from_secs(60);

async fn next<M: Send + 'static>(heard: &mut tokio::sync::mpsc::UnboundedReceiver<M>) -> M {
    tokio::time::timeout(LIMIT, heard.recv())
        .await
        .expect("an event in time")
        .expect("the recorder runs")
}

#[tokio::test(start_paused = true)]
async fn health_publishes_confirmed_passes_and_every_failure() {
    let server = FakeInference::new();
    let (sink, mut heard) = Recorder::<ProbeOutcome>::spawn().await;
    let args = HealthArgs {
        instances: vec![("x".to_string(), Arc::new(server.clone()) as _)],
        sink: sink.get_derived(),
        interval: Duration::from_secs(1),
        timeout: Duration::from_secs(1),
        canary_timeout: Duration::from_secs(5),
    };
    let (_health, _) = Actor::spawn(None, HealthActor, args).await.unwrap();
    assert_eq!(
        next(&mut heard).await,
        ProbeOutcome {
            instance: "x".into(),
            outcome: Ok(())
        }
    );
    assert!(
        server.deep_probes() >= 1,
        "a pass is published once a canary confirmed it"
    );
    server.set_probe(Err(ProbeError::NotListening("connection refused".into())));
    loop {
        let e = next(&mut heard).await;
        assert_eq!(e.instance, "x");
        if let Err(err) = e.outcome {
            assert_eq!(err, ProbeError::NotListening("connection refused".into()));
            break;
        }
    }
}

#[tokio::test(start_paused = true)]
async fn the_gpu_monitor_publishes_snapshots_with_its_alerts() {
    let gpus = FakeGpu::new(2);
    let (sink, mut heard) = Recorder::<GpuSnapshot>::spawn().await;
    let args = GpuMonitorArgs {
        probe: Some(Arc::new(gpus.clone())),
        unavailable: String::new(),
        interval: Duration::from_secs(1),
        limits: ThermalLimits {
            alert_c: 85,
            clear_c: 80,
        },
        sink: sink.get_derived(),
    };
    let (_monitor, _) = Actor::spawn(None, GpuMonitorActor, args).await.unwrap();
    let first = next(&mut heard).await;
    assert_eq!(first.gpus.len(), 2);
    assert!(first.hot.is_empty());
    gpus.set_temperature(1, 90);
    loop {
        let s = next(&mut heard).await;
        if !s.hot.is_empty() {
            assert_eq!(s.hot, vec![1]);
            assert_eq!(s.alerts, 1);
            break;
        }
    }
}
