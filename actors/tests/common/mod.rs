//! The scenario lab shared by the allocator and sleep-mode tests: the real
//! FeederSupervisor with a think and a vision instance on GPU 0, each a
//! scripted server behind a scripted runtime, the in-memory store as the
//! durable backlog, under paused tokio time.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use ractor::rpc::CallResult;
use ractor::{Actor, ActorRef, RpcReplyPort};

use feeder_actors::allocator::{AllocatorSettings, AllocatorStatus, Strategy};
use feeder_actors::backoff::Backoff;
use feeder_actors::container::{InstanceState, InstanceStatus, LifecycleSettings};
use feeder_actors::gpu_monitor::ThermalLimits;
use feeder_actors::handle::FeederHandle;
use feeder_actors::results::ResultStore;
use feeder_actors::runtime::{ContainerRuntime, LaunchPlan};
use feeder_actors::spec::{InstanceSpec, SleepLevel};
use feeder_actors::supervisor::{
    FeederArgs, FeederMsg, FeederStatus, FeederSupervisor, PipelineSettings,
};
use feeder_actors::testkit::store_contract::job;
use feeder_actors::testkit::{
    submit, FakeGpu, FakeInference, FakeRuntime, MemoryResults, MemoryStore,
};
use feeder_actors::{Job, JobStatus, ModelType, Timestamp, TokioClock};

pub const T0: Timestamp = Timestamp(1_700_000_000_000);
pub const LIMIT: Duration = Duration::from_secs(7_200);

/// What a FeederSupervisor on `store` needs, its clock paused at [`T0`],
/// with no GPU probe and no observer.
pub fn feeder_args(
    store: &MemoryStore,
    results: Arc<dyn ResultStore>,
    instances: Vec<InstanceSpec>,
    owner: &str,
    settings: PipelineSettings,
) -> FeederArgs {
    FeederArgs {
        store: store.connect(),
        results,
        clock: Arc::new(TokioClock::starting_at(T0)),
        instances,
        owner: owner.into(),
        settings,
        observer: None,
        gpu_probe: None,
        gpu_unavailable: "no GPU in message-level tests".into(),
        watch: None,
    }
}

/// Sends `actor` the message `msg` builds around a reply port, and waits
/// for the reply.
pub async fn ask<M: ractor::Message, R: Send + 'static>(
    actor: &ActorRef<M>,
    msg: impl FnOnce(RpcReplyPort<R>) -> M,
) -> R {
    let reply = actor
        .call(msg, None)
        .await
        .unwrap_or_else(|_| panic!("the actor is gone"));
    match reply {
        CallResult::Success(r) => r,
        CallResult::Timeout => panic!("the actor did not answer in time"),
        CallResult::SenderError => panic!("the actor dropped the reply"),
    }
}

/// Spawns the FeederSupervisor.
pub async fn spawn_feeder(args: FeederArgs) -> ActorRef<FeederMsg> {
    let (feeder, _) = Actor::spawn(None, FeederSupervisor, args)
        .await
        .expect("feeder starts");
    feeder
}

/// The feeder's status.
pub async fn feeder_status(feeder: &ActorRef<FeederMsg>) -> FeederStatus {
    FeederHandle::new(feeder.clone())
        .status()
        .await
        .expect("the feeder answers")
}

/// The status of the instance `name`.
pub async fn instance(feeder: &ActorRef<FeederMsg>, name: &str) -> InstanceStatus {
    feeder_status(feeder)
        .await
        .instances
        .into_iter()
        .find(|i| i.name == name)
        .unwrap_or_else(|| panic!("no instance {name}"))
}

/// Polls until the instance `name` is in state `want`, for up to [`LIMIT`].
pub async fn wait_instance(feeder: &ActorRef<FeederMsg>, name: &str, want: InstanceState) {
    let deadline = tokio::time::Instant::now() + LIMIT;
    while instance(feeder, name).await.state != want {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} never {want}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How many jobs of `store` have `status`.
pub fn count(store: &MemoryStore, status: JobStatus) -> usize {
    store.all().iter().filter(|j| j.status == status).count()
}

/// Fast probes and restarts, the allocator deciding every 5 s with these
/// dwell and memory shares, and `drain` for requests in flight at a stop.
pub fn settings(min_dwell: Duration, solo: f64, drain: Duration) -> PipelineSettings {
    PipelineSettings {
        health_interval: Duration::from_secs(1),
        health_timeout: Duration::from_secs(1),
        lifecycle: LifecycleSettings {
            startup_timeout: Duration::from_secs(120),
            restart: Backoff {
                base: Duration::from_secs(1),
                max: Duration::from_secs(10),
                factor: 2.0,
                jitter: 0.0,
            },
            stop_grace: Duration::from_secs(1),
            drain_timeout: drain,
            ..LifecycleSettings::default()
        },
        gpu_interval: Duration::from_secs(1),
        thermal: ThermalLimits {
            alert_c: 80,
            clear_c: 75,
        },
        thermal_window_factor: 0.5,
        allocator: Some(AllocatorSettings {
            interval: Duration::from_secs(5),
            min_dwell,
            idle_ttl: None,
            shared: 0.40,
            solo,
        }),
        ..PipelineSettings::default()
    }
}

/// A scripted server and the runtime that launches it.
pub struct Server {
    pub inference: FakeInference,
    pub runtime: FakeRuntime,
}

/// `inference` behind a runtime whose launches load for `load`.
pub fn server(inference: FakeInference, load: Duration) -> Server {
    let runtime = FakeRuntime::serving(inference.clone(), load);
    Server { inference, runtime }
}

fn spec(name: &str, model: ModelType, s: &Server, sleep: Option<SleepLevel>) -> InstanceSpec {
    InstanceSpec {
        runtime: Some(Arc::new(s.runtime.clone()) as Arc<dyn ContainerRuntime>),
        plan: LaunchPlan {
            gpu_memory_utilization: 0.40,
        },
        gpu_ids: vec![0],
        sleep,
        ..InstanceSpec::external(name, model, 8, Arc::new(s.inference.clone()))
    }
}

pub struct Lab {
    pub store: MemoryStore,
    pub think: Server,
    pub vision: Server,
    pub feeder: ActorRef<FeederMsg>,
}

impl Lab {
    /// Starts the feeder with `think` and `vision` (both with `sleep`, if
    /// given) and waits until both servers are launched.
    pub async fn start(
        gpu: Option<FakeGpu>,
        think: Server,
        vision: Server,
        sleep: Option<SleepLevel>,
        settings: PipelineSettings,
    ) -> Lab {
        let store = MemoryStore::new();
        let instances = vec![
            spec("think", ModelType::Think, &think, sleep),
            spec("vision", ModelType::Vision, &vision, sleep),
        ];
        let results = Arc::new(MemoryResults::new());
        let feeder = spawn_feeder(FeederArgs {
            gpu_probe: gpu.map(|p| Arc::new(p) as _),
            gpu_unavailable: "NVML is not available: no NVIDIA driver".into(),
            watch: None,
            ..feeder_args(&store, results, instances, "lab", settings)
        })
        .await;
        let lab = Lab {
            store,
            think,
            vision,
            feeder,
        };
        feeder_actors::testkit::wait_until("both launched", LIMIT, || {
            lab.think.runtime.current().is_some() && lab.vision.runtime.current().is_some()
        })
        .await;
        lab
    }

    pub async fn status(&self) -> FeederStatus {
        feeder_status(&self.feeder).await
    }

    pub async fn allocator(&self) -> AllocatorStatus {
        self.status().await.allocator.expect("the allocator runs")
    }

    pub async fn strategy(&self) -> Strategy {
        self.allocator().await.strategy
    }

    /// Waits until `want` is in force and applied.
    pub async fn wait_strategy(&self, want: Strategy) {
        let deadline = tokio::time::Instant::now() + LIMIT;
        loop {
            let a = self.allocator().await;
            if a.strategy == want && !a.switching {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "never {want}");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    pub async fn state_of(&self, name: &str) -> InstanceState {
        instance(&self.feeder, name).await.state
    }

    pub async fn wait_state(&self, name: &str, want: InstanceState) {
        wait_instance(&self.feeder, name, want).await
    }

    pub async fn submit(&self, model: ModelType, tag: &str, n: usize) {
        let jobs = (0..n).map(|i| job(model, &format!("{tag}-{i}"))).collect();
        submit(&self.feeder, jobs).await;
    }

    pub fn count(&self, status: JobStatus) -> usize {
        count(&self.store, status)
    }

    pub fn jobs(&self, model: ModelType, status: JobStatus) -> Vec<Job> {
        self.store
            .all()
            .into_iter()
            .filter(|j| j.model_type == model && j.status == status)
            .collect()
    }
}
