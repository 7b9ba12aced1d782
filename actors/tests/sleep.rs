//! Message-level scenarios of sleep mode: the real FeederSupervisor,
//! AllocatorActor, ContainerActors and dispatchers, with scripted servers
//! that sleep and wake as vLLM's do, a scripted GPU, and the in-memory store,
//! under paused tokio time.

use std::sync::Arc;
use std::time::Duration;

use ractor::rpc::CallResult;
use ractor::{Actor, ActorRef};

use feeder_actors::allocator::{AllocatorSettings, AllocatorStatus, Strategy};
use feeder_actors::backoff::Backoff;
use feeder_actors::container::{InstanceState, LifecycleSettings};
use feeder_actors::gpu_monitor::ThermalLimits;
use feeder_actors::runtime::{ContainerRuntime, LaunchPlan};
use feeder_actors::spec::{InstanceSpec, SleepLevel};
use feeder_actors::supervisor::{
    FeederArgs, FeederMsg, FeederStatus, FeederSupervisor, PipelineSettings,
};
use feeder_actors::testkit::store_contract::job;
use feeder_actors::testkit::{
    submit, wait_until, FakeGpu, FakeInference, FakeRuntime, MemoryResults, MemoryStore,
};
use feeder_actors::{JobStatus, ModelType, Timestamp, TokioClock};

const T0: Timestamp = Timestamp(1_700_000_000_000);
const LIMIT: Duration = Duration::from_secs(7_200);
const DWELL: Duration = Duration::from_secs(60);
const LOAD: Duration = Duration::from_secs(30);
const WAKE: Duration = Duration::from_millis(1_500);
const GIB: u64 = 1 << 30;

fn settings(drain: Duration) -> PipelineSettings {
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
        // Every strategy runs an instance with the share it was launched
        // with: switches are sleeps and wakes, never relaunches.
        allocator: Some(AllocatorSettings {
            interval: Duration::from_secs(5),
            min_dwell: DWELL,
            idle_ttl: None,
            shared: 0.40,
            solo: 0.40,
        }),
        ..PipelineSettings::default()
    }
}

struct Server {
    inference: FakeInference,
    runtime: FakeRuntime,
}

struct Lab {
    store: MemoryStore,
    think: Server,
    vision: Server,
    feeder: ActorRef<FeederMsg>,
}

fn server(latency: Duration) -> Server {
    let inference = FakeInference::new().with_latency(latency);
    inference.sleep_timings(Duration::from_millis(500), WAKE);
    let runtime = FakeRuntime::serving(inference.clone(), LOAD);
    Server { inference, runtime }
}

fn spec(name: &str, model: ModelType, s: &Server) -> InstanceSpec {
    InstanceSpec {
        runtime: Some(Arc::new(s.runtime.clone()) as Arc<dyn ContainerRuntime>),
        plan: LaunchPlan {
            gpu_memory_utilization: 0.40,
        },
        gpu_ids: vec![0],
        sleep: Some(SleepLevel::One),
        ..InstanceSpec::external(name, model, 8, Arc::new(s.inference.clone()))
    }
}

impl Lab {
    async fn start(gpu: Option<FakeGpu>, vision: Server, settings: PipelineSettings) -> Lab {
        let store = MemoryStore::new();
        let think = server(Duration::from_secs(2));
        let args = FeederArgs {
            store: store.connect(),
            results: Arc::new(MemoryResults::new()),
            clock: Arc::new(TokioClock::starting_at(T0)),
            instances: vec![
                spec("think", ModelType::Think, &think),
                spec("vision", ModelType::Vision, &vision),
            ],
            owner: "lab".into(),
            settings,
            observer: None,
            gpu_probe: gpu.map(|p| Arc::new(p) as _),
            gpu_unavailable: "NVML is not available: no NVIDIA driver".into(),
        };
        let (feeder, _) = Actor::spawn(None, FeederSupervisor, args).await.unwrap();
        let lab = Lab {
            store,
            think,
            vision,
            feeder,
        };
        lab.wait_state("think", InstanceState::Ready).await;
        lab.wait_state("vision", InstanceState::Ready).await;
        lab
    }

    async fn status(&self) -> FeederStatus {
        match self
            .feeder
            .call(|r| FeederMsg::Status { reply: r }, None)
            .await
            .unwrap()
        {
            CallResult::Success(s) => s,
            other => panic!("{other:?}"),
        }
    }

    async fn allocator(&self) -> AllocatorStatus {
        self.status().await.allocator.expect("the allocator runs")
    }

    /// Waits until `want` is in force and applied.
    async fn wait_strategy(&self, want: Strategy) {
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

    async fn state_of(&self, name: &str) -> InstanceState {
        self.status()
            .await
            .instances
            .into_iter()
            .find(|i| i.name == name)
            .unwrap()
            .state
    }

    async fn wait_state(&self, name: &str, want: InstanceState) {
        let deadline = tokio::time::Instant::now() + LIMIT;
        while self.state_of(name).await != want {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name} never {want}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn submit(&self, model: ModelType, tag: &str, n: usize) {
        let jobs = (0..n).map(|i| job(model, &format!("{tag}-{i}"))).collect();
        submit(&self.feeder, jobs).await;
    }

    fn jobs(&self, model: ModelType, status: JobStatus) -> Vec<feeder_actors::Job> {
        self.store
            .all()
            .into_iter()
            .filter(|j| j.model_type == model && j.status == status)
            .collect()
    }
}

#[tokio::test(start_paused = true)]
async fn a_switch_drains_sleeps_wakes_and_canaries_in_that_order() {
    let lab = Lab::start(
        Some(FakeGpu::new(1)),
        server(Duration::from_secs(20)),
        settings(Duration::from_secs(600)),
    )
    .await;
    // Vision work only: after the dwell, think is put to sleep (not stopped).
    lab.submit(ModelType::Vision, "v", 40).await;
    lab.wait_strategy(Strategy::Vision).await;
    assert_eq!(lab.state_of("think").await, InstanceState::Sleeping);
    assert!(lab.think.inference.is_asleep());
    assert!(
        !lab.think
            .runtime
            .calls()
            .iter()
            .any(|c| c.starts_with("stop")),
        "a sleep, not a stop: {:?}",
        lab.think.runtime.calls()
    );
    // The eight vision requests are in flight (20 s each) when think work
    // arrives: think first, at once.
    wait_until("the last vision requests in flight", LIMIT, || {
        lab.jobs(ModelType::Vision, JobStatus::Pending).is_empty()
            && lab.vision.inference.in_flight() == 8
    })
    .await;
    let decided = tokio::time::Instant::now();
    lab.submit(ModelType::Think, "t", 5).await;
    lab.wait_strategy(Strategy::Think).await;
    lab.wait_state("think", InstanceState::Ready).await;

    let vision = lab.vision.inference.timed_events();
    let think = lab.think.inference.timed_events();
    let slept = vision
        .iter()
        .find(|(_, e)| e.starts_with("sleep"))
        .expect("vision slept");
    assert_eq!(
        slept.1, "sleep 1 (0 in flight)",
        "the requests in flight finished before the sleep (drained)"
    );
    assert!(slept.0 >= decided);
    let woke = think
        .iter()
        .rev()
        .find(|(_, e)| e == "wake_up")
        .expect("think woke");
    assert!(
        woke.0 > slept.0,
        "vision slept before think woke: {vision:?} {think:?}"
    );
    let canary = think
        .iter()
        .find(|(at, e)| e == "canary" && *at >= woke.0)
        .expect("a canary after the wake");
    assert!(
        canary.0 >= woke.0 + WAKE,
        "the canary follows the wake: {think:?}"
    );
    let history = lab
        .status()
        .await
        .instances
        .into_iter()
        .find(|i| i.name == "think")
        .unwrap()
        .history;
    let states: Vec<InstanceState> = history.iter().map(|t| t.to).collect();
    let tail = &states[states.len() - 3..];
    assert_eq!(
        tail,
        [
            InstanceState::Sleeping,
            InstanceState::Waking,
            InstanceState::Ready
        ]
    );
    assert!(history.last().unwrap().reason.contains("canary"));
    // No launch after the first: every switch was a sleep or a wake.
    assert_eq!(lab.think.runtime.starts(), 1);
    assert_eq!(lab.vision.runtime.starts(), 1);
    // Everything ends done, once.
    wait_until("all done", LIMIT, || {
        lab.jobs(ModelType::Think, JobStatus::Done).len() == 5
            && lab.jobs(ModelType::Vision, JobStatus::Done).len() == 40
    })
    .await;
    assert!(lab.store.all().iter().all(|j| j.attempts == 1));
    // The wake was learnt as the cost of bringing think in.
    let deadline = tokio::time::Instant::now() + LIMIT;
    let think_cost = loop {
        let costs = lab.allocator().await.costs;
        let c = costs.into_iter().find(|c| c.model == ModelType::Think);
        if let Some(c) = c.filter(|c| c.wake.is_some()) {
            break c;
        }
        assert!(tokio::time::Instant::now() < deadline, "no wake learnt");
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let wake = think_cost.wake.unwrap();
    assert!(wake >= WAKE && wake < LOAD, "{think_cost:?}");
}

#[tokio::test(start_paused = true)]
async fn a_server_that_aborts_on_sleep_gives_its_jobs_back_with_no_attempt_counted() {
    // Vision requests never finish on their own, and the drain gives them
    // 5 s: the sleep aborts them.
    let inference = FakeInference::gated();
    inference.sleep_timings(Duration::from_millis(500), WAKE);
    let runtime = FakeRuntime::serving(inference.clone(), LOAD);
    let vision = Server { inference, runtime };
    let lab = Lab::start(
        Some(FakeGpu::new(1)),
        vision,
        settings(Duration::from_secs(5)),
    )
    .await;
    lab.submit(ModelType::Vision, "v", 16).await;
    lab.wait_strategy(Strategy::Vision).await;
    wait_until("vision busy", LIMIT, || {
        lab.vision.inference.in_flight() == 8
    })
    .await;
    // Both kinds wait: think's turn comes after the dwell.
    lab.submit(ModelType::Think, "t", 3).await;
    wait_until("the aborted jobs are pending again", LIMIT, || {
        lab.jobs(ModelType::Vision, JobStatus::Pending).len() == 16
    })
    .await;
    let back = lab.jobs(ModelType::Vision, JobStatus::Pending);
    assert!(
        back.iter().all(|j| j.attempts == 0 && j.error.is_none()),
        "no attempt counted: {back:?}"
    );
    let events = lab.vision.inference.events();
    assert!(
        events.iter().any(|e| e == "sleep 1 (8 in flight)"),
        "the drain ran out with 8 in flight: {events:?}"
    );
    assert!(lab.jobs(ModelType::Vision, JobStatus::Failed).is_empty());
    let aborted: u64 = lab
        .status()
        .await
        .dispatch
        .iter()
        .filter(|d| d.instance == "vision")
        .map(|d| d.aborted)
        .sum();
    assert_eq!(aborted, 8);
    // Vision's turn comes back; its jobs are done once.
    lab.vision.inference.release(10_000);
    wait_until("all done", LIMIT, || {
        lab.store.all().iter().all(|j| j.status == JobStatus::Done)
    })
    .await;
    assert!(lab.store.all().iter().all(|j| j.attempts == 1));
}

#[tokio::test(start_paused = true)]
async fn a_sleep_that_frees_too_little_memory_is_reported() {
    let gpu = FakeGpu::new(1);
    gpu.set_memory_used(0, 64 * GIB);
    let lab = Lab::start(
        Some(gpu.clone()),
        server(Duration::from_secs(20)),
        settings(Duration::from_secs(600)),
    )
    .await;
    // Think sleeps and the GPU still reads 64 GiB in use: reported.
    lab.submit(ModelType::Vision, "v", 40).await;
    lab.wait_strategy(Strategy::Vision).await;
    let problems = lab.allocator().await.problems;
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].contains("think") && problems[0].contains("freed only 0.0 GiB"),
        "{problems:?}"
    );
    // Vision's sleep frees its memory: nothing to report.
    let g = gpu.clone();
    lab.vision
        .inference
        .on_sleep(move |_| g.set_memory_used(0, 34 * GIB));
    lab.submit(ModelType::Think, "t", 2).await;
    lab.wait_strategy(Strategy::Think).await;
    let a = lab.allocator().await;
    assert!(a.problems.is_empty(), "{:?}", a.problems);
}

#[tokio::test(start_paused = true)]
async fn without_gpu_readings_a_sleep_is_not_checked_and_nothing_waits_for_one() {
    let lab = Lab::start(
        None,
        server(Duration::from_secs(20)),
        settings(Duration::from_secs(600)),
    )
    .await;
    lab.submit(ModelType::Vision, "v", 40).await;
    lab.wait_strategy(Strategy::Vision).await;
    assert!(lab.allocator().await.problems.is_empty());
    wait_until("no vision work waits", LIMIT, || {
        lab.jobs(ModelType::Vision, JobStatus::Pending).is_empty()
    })
    .await;
    let asked = tokio::time::Instant::now();
    lab.submit(ModelType::Think, "t", 2).await;
    lab.wait_strategy(Strategy::Think).await;
    lab.wait_state("think", InstanceState::Ready).await;
    // The interval, the drain, the sleep and the wake: seconds, not a load.
    assert!(asked.elapsed() < LOAD, "{:?}", asked.elapsed());
}
