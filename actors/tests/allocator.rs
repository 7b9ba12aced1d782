//! Message-level scenarios of GPU awareness: the real FeederSupervisor,
//! GpuMonitorActor, AllocatorActor, ContainerActors and dispatchers, with a
//! scripted GPU, a scripted runtime per instance and the in-memory store as
//! the durable backlog, under paused tokio time.

mod common;

use std::time::Duration;

use feeder_actors::allocator::{decide, AllocatorSettings, Backlog, Inputs, Strategy};
use feeder_actors::container::InstanceState;
use feeder_actors::supervisor::{FeederMsg, FeederStatus, PipelineSettings};
use feeder_actors::testkit::{wait_until, FakeGpu, FakeInference};
use feeder_actors::{JobStatus, ModelType};
use ractor::rpc::CallResult;

use common::{server, Lab, LIMIT};

const DWELL: Duration = Duration::from_secs(600);

fn settings() -> PipelineSettings {
    common::settings(DWELL, 0.75, Duration::from_secs(60))
}

/// The lab with gated servers that load in 20 s.
async fn start(gpu: Option<FakeGpu>, settings: PipelineSettings) -> Lab {
    let gated = || server(FakeInference::gated(), Duration::from_secs(20));
    Lab::start(gpu, gated(), gated(), None, settings).await
}

/// The policy alone, as a table: what each backlog asks for.
#[test]
fn the_policy_as_a_table() {
    let s = AllocatorSettings::default();
    let none = Backlog::default();
    let some = Backlog {
        pending: 10,
        oldest: Duration::from_secs(900),
        ..Backlog::default()
    };
    let base = Inputs {
        current: Strategy::Static,
        held_for: Duration::from_secs(3_600),
        idle_for: Duration::ZERO,
        think: none,
        vision: none,
        cost_think: Duration::from_secs(120),
        cost_vision: Duration::from_secs(120),
        by_sleep: false,
        pinned: None,
    };
    let young = Backlog {
        pending: 10,
        oldest: Duration::from_secs(30),
        ..Backlog::default()
    };
    // Every instance sleeps: a switch costs a wake of two seconds.
    let asleep = Inputs {
        by_sleep: true,
        cost_think: Duration::from_secs(2),
        cost_vision: Duration::from_secs(2),
        ..base.clone()
    };
    let draining = Backlog {
        pending: 10,
        oldest: Duration::from_secs(900),
        rate: 20.0, // done in half a second
    };
    let cases: Vec<(&str, Inputs, Option<Strategy>)> = vec![
        ("no work, no idle_ttl: hold", base.clone(), None),
        (
            "only vision: vision",
            Inputs {
                vision: some,
                ..base.clone()
            },
            Some(Strategy::Vision),
        ),
        (
            "only think: think",
            Inputs {
                think: some,
                ..base.clone()
            },
            Some(Strategy::Think),
        ),
        (
            "both under static: no restart for nothing",
            Inputs {
                think: some,
                vision: some,
                ..base.clone()
            },
            None,
        ),
        (
            "both under vision: shared, at once (think first)",
            Inputs {
                current: Strategy::Vision,
                held_for: Duration::from_secs(1),
                think: some,
                vision: some,
                ..base.clone()
            },
            Some(Strategy::Shared),
        ),
        (
            "both under think: shared after the dwell",
            Inputs {
                current: Strategy::Think,
                think: some,
                vision: some,
                ..base.clone()
            },
            Some(Strategy::Shared),
        ),
        (
            "both under think, within the dwell: hold",
            Inputs {
                current: Strategy::Think,
                held_for: Duration::from_secs(60),
                think: some,
                vision: some,
                ..base.clone()
            },
            None,
        ),
        (
            "vision under think, younger than a load: hold",
            Inputs {
                current: Strategy::Think,
                vision: young,
                ..base.clone()
            },
            None,
        ),
        (
            "think under idle: think at once",
            Inputs {
                current: Strategy::Idle,
                held_for: Duration::ZERO,
                think: young,
                ..base.clone()
            },
            Some(Strategy::Think),
        ),
        (
            "vision under idle: vision at once",
            Inputs {
                current: Strategy::Idle,
                held_for: Duration::ZERO,
                vision: young,
                ..base.clone()
            },
            Some(Strategy::Vision),
        ),
        (
            "sleep mode, both under vision within the dwell: hold (turns, not shared)",
            Inputs {
                current: Strategy::Vision,
                held_for: Duration::from_secs(60),
                think: some,
                vision: some,
                ..asleep.clone()
            },
            None,
        ),
        (
            "sleep mode, both under vision after the dwell: think's turn",
            Inputs {
                current: Strategy::Vision,
                think: some,
                vision: some,
                ..asleep.clone()
            },
            Some(Strategy::Think),
        ),
        (
            "sleep mode, both under think after the dwell: vision's turn",
            Inputs {
                current: Strategy::Think,
                think: some,
                vision: some,
                ..asleep.clone()
            },
            Some(Strategy::Vision),
        ),
        (
            "sleep mode: think drains sooner than two switches cost, so it finishes first",
            Inputs {
                current: Strategy::Think,
                think: draining,
                vision: some,
                ..asleep.clone()
            },
            None,
        ),
        (
            "sleep mode, both under static: everything runs, hold",
            Inputs {
                think: some,
                vision: some,
                ..asleep.clone()
            },
            None,
        ),
        (
            "sleep mode, both under idle: think first",
            Inputs {
                current: Strategy::Idle,
                think: young,
                vision: young,
                ..asleep.clone()
            },
            Some(Strategy::Think),
        ),
        (
            "sleep mode, think done, vision waits: vision at once (no dwell for an idle model)",
            Inputs {
                current: Strategy::Think,
                held_for: Duration::from_secs(5),
                vision: young,
                ..asleep.clone()
            },
            Some(Strategy::Vision),
        ),
        (
            "relaunching, think done, vision waits: the dwell holds",
            Inputs {
                current: Strategy::Think,
                held_for: Duration::from_secs(5),
                vision: some,
                ..base.clone()
            },
            None,
        ),
        (
            "pinned: the pin wins",
            Inputs {
                vision: some,
                pinned: Some(Strategy::Think),
                ..base.clone()
            },
            Some(Strategy::Think),
        ),
        (
            "pinned and in force: hold",
            Inputs {
                current: Strategy::Think,
                vision: some,
                pinned: Some(Strategy::Think),
                ..base.clone()
            },
            None,
        ),
    ];
    for (name, inputs, want) in cases {
        let got = decide(&inputs, &s).map(|d| d.to);
        assert_eq!(got, want, "{name}");
    }
    let idle = AllocatorSettings {
        idle_ttl: Some(Duration::from_secs(300)),
        ..s.clone()
    };
    let quiet = Inputs {
        idle_for: Duration::from_secs(301),
        ..base.clone()
    };
    assert_eq!(decide(&quiet, &idle).map(|d| d.to), Some(Strategy::Idle));
}

#[tokio::test(start_paused = true)]
async fn only_vision_work_switches_to_vision_after_the_dwell_and_loses_nothing() {
    let lab = start(Some(FakeGpu::new(1)), settings()).await;
    lab.submit(ModelType::Vision, "v", 40).await;
    tokio::time::sleep(DWELL - Duration::from_secs(30)).await;
    assert_eq!(
        lab.strategy().await,
        Strategy::Static,
        "not before the dwell"
    );
    lab.wait_strategy(Strategy::Vision).await;
    // Think was drained and parked; vision relaunched with the solo share.
    assert_eq!(lab.state_of("think").await, InstanceState::Stopped);
    assert!(lab
        .think
        .runtime
        .calls()
        .iter()
        .any(|c| c.starts_with("stop")));
    assert_eq!(
        lab.vision
            .runtime
            .plans()
            .last()
            .unwrap()
            .gpu_memory_utilization,
        0.75
    );
    let why = lab.status().await.allocator.unwrap().why;
    // The vision backlog decided it: its jobs pending (the requests held
    // by the gated server lost their leases during the dwell; the
    // dispatcher may have claimed one of them again by then).
    assert!(
        why.contains("think: 0 pending")
            && (why.contains("vision: 40 pending") || why.contains("vision: 39 pending")),
        "{why}"
    );
    lab.vision.inference.release(10_000);
    wait_until("all done", LIMIT, || lab.count(JobStatus::Done) == 40).await;
    assert_eq!(lab.count(JobStatus::Failed), 0);
}

#[tokio::test(start_paused = true)]
async fn think_work_comes_first_then_both_share() {
    let lab = start(Some(FakeGpu::new(1)), settings()).await;
    lab.submit(ModelType::Vision, "v", 40).await;
    lab.wait_strategy(Strategy::Vision).await;
    let switched_at = tokio::time::Instant::now();
    // Think work arrives: it does not wait for the dwell.
    lab.submit(ModelType::Think, "t", 10).await;
    while lab.strategy().await != Strategy::Shared {
        assert!(
            switched_at.elapsed() < Duration::from_secs(30),
            "think first"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // The vision requests in flight finish, then vision relaunches at 0.40.
    lab.vision.inference.release(10_000);
    lab.wait_strategy(Strategy::Shared).await;
    assert_eq!(
        lab.think
            .runtime
            .plans()
            .last()
            .unwrap()
            .gpu_memory_utilization,
        0.40
    );
    lab.think.inference.release(10_000);
    lab.vision.inference.release(10_000);
    wait_until("all done", LIMIT, || lab.count(JobStatus::Done) == 50).await;
}

#[tokio::test(start_paused = true)]
async fn a_flapping_backlog_does_not_flap_the_strategy() {
    let lab = start(Some(FakeGpu::new(1)), settings()).await;
    // Think work always waits; vision work comes and goes every minute.
    lab.submit(ModelType::Think, "t", 1_000).await;
    let mut switches = Vec::new();
    let mut last = lab.strategy().await;
    for minute in 0..40 {
        if minute % 2 == 0 {
            lab.submit(ModelType::Vision, &format!("v{minute}"), 3)
                .await;
            lab.vision.inference.release(3);
        }
        for _ in 0..12 {
            tokio::time::sleep(Duration::from_secs(5)).await;
            let now = lab.strategy().await;
            if now != last {
                switches.push((tokio::time::Instant::now(), now));
                last = now;
            }
        }
    }
    assert!(
        switches.len() <= 4,
        "{} switches in 40 min: {switches:?}",
        switches.len()
    );
    for w in switches.windows(2) {
        assert!(
            w[1].0 - w[0].0 >= DWELL,
            "two switches within the dwell: {switches:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_hot_gpu_narrows_the_window_once_and_a_cool_one_restores_it() {
    let gpu = FakeGpu::new(1);
    let mut s = settings();
    s.allocator = None;
    let lab = start(Some(gpu.clone()), s).await;
    let window = |st: &FeederStatus, name: &str| {
        st.dispatch
            .iter()
            .find(|d| d.instance == name)
            .map(|d| (d.window, d.thermal_cap))
    };
    gpu.set_temperature(0, 85);
    wait_until_async(|| async { window(&lab.status().await, "think") == Some((4, Some(4))) }).await;
    // Hysteresis: 78 °C is below the alert but above the clear level.
    gpu.set_temperature(0, 78);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let st = lab.status().await;
    assert_eq!(window(&st, "vision"), Some((4, Some(4))));
    assert_eq!(st.gpus.as_ref().unwrap().hot, vec![0]);
    gpu.set_temperature(0, 86);
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(
        lab.status().await.gpus.unwrap().alerts,
        1,
        "one alert per episode"
    );
    gpu.set_temperature(0, 74);
    wait_until_async(|| async { window(&lab.status().await, "think") == Some((8, None)) }).await;
    let st = lab.status().await;
    assert!(st.gpus.as_ref().unwrap().hot.is_empty());
    // Work runs through a narrowed window too.
    gpu.set_temperature(0, 90);
    wait_until_async(|| async { window(&lab.status().await, "think") == Some((4, Some(4))) }).await;
    lab.submit(ModelType::Think, "hot", 20).await;
    wait_until("4 in flight", LIMIT, || {
        lab.think.inference.in_flight() == 4
    })
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        lab.think.inference.max_in_flight(),
        4,
        "never more than the thermal cap"
    );
    lab.think.inference.release(10_000);
    wait_until("done", LIMIT, || lab.count(JobStatus::Done) == 20).await;
}

async fn wait_until_async<F, Fut>(mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + LIMIT;
    while !cond().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn without_nvml_the_daemon_runs_on() {
    let lab = start(None, settings()).await;
    let st = lab.status().await;
    let gpus = st.gpus.expect("a snapshot");
    assert!(gpus.unavailable.unwrap().contains("NVML"));
    assert!(st.children_answered, "the watchdog is still fed");
    lab.submit(ModelType::Think, "t", 5).await;
    lab.think.inference.release(10_000);
    wait_until("done", LIMIT, || lab.count(JobStatus::Done) == 5).await;
}

#[tokio::test(start_paused = true)]
async fn a_pinned_strategy_holds_until_released() {
    let lab = start(Some(FakeGpu::new(1)), settings()).await;
    let pin = |s: Option<Strategy>| {
        let f = lab.feeder.clone();
        async move {
            match f
                .call(
                    |r| FeederMsg::Pin {
                        strategy: s,
                        reply: r,
                    },
                    None,
                )
                .await
                .unwrap()
            {
                CallResult::Success(r) => r.unwrap(),
                other => panic!("{other:?}"),
            }
        }
    };
    pin(Some(Strategy::Think)).await;
    lab.wait_strategy(Strategy::Think).await;
    assert_eq!(lab.state_of("vision").await, InstanceState::Stopped);
    // Vision work waits; the pin holds far past the dwell.
    lab.submit(ModelType::Vision, "v", 10).await;
    tokio::time::sleep(DWELL * 3).await;
    assert_eq!(lab.strategy().await, Strategy::Think);
    assert_eq!(lab.count(JobStatus::Pending), 10, "waiting, not failed");
    // Released: the backlog decides (vision only, dwell long past).
    let st = pin(None).await;
    assert_eq!(st.pinned, None);
    lab.wait_strategy(Strategy::Vision).await;
    lab.vision.inference.release(10_000);
    wait_until("done", LIMIT, || lab.count(JobStatus::Done) == 10).await;
}

#[tokio::test(start_paused = true)]
async fn idle_stops_everything_and_work_wakes_it_at_once() {
    let mut s = settings();
    if let Some(a) = &mut s.allocator {
        a.idle_ttl = Some(Duration::from_secs(120));
    }
    let lab = start(Some(FakeGpu::new(1)), s).await;
    lab.wait_strategy(Strategy::Idle).await;
    assert_eq!(lab.state_of("think").await, InstanceState::Stopped);
    assert_eq!(lab.state_of("vision").await, InstanceState::Stopped);
    let idle_since = tokio::time::Instant::now();
    lab.submit(ModelType::Vision, "late", 5).await;
    lab.wait_strategy(Strategy::Vision).await;
    assert!(
        idle_since.elapsed() < Duration::from_secs(60),
        "no dwell out of idle"
    );
    lab.vision.inference.release(10_000);
    wait_until("done", LIMIT, || lab.count(JobStatus::Done) == 5).await;
}
