//! Message-level scenarios of sleep mode: the real FeederSupervisor,
//! AllocatorActor, ContainerActors and dispatchers, with scripted servers
//! that sleep and wake as vLLM's do, a scripted GPU, and the in-memory store,
//! under paused tokio time.

mod common;

use std::sync::Arc;
use std::time::Duration;

use feeder_actors::allocator::Strategy;
use feeder_actors::container::InstanceState;
use feeder_actors::runtime::{ContainerRuntime, LaunchPlan};
use feeder_actors::spec::{InstanceSpec, SleepLevel};
use feeder_actors::supervisor::PipelineSettings;
use feeder_actors::testkit::{wait_until, FakeGpu, FakeInference, MemoryResults, MemoryStore};
use feeder_actors::{JobStatus, ModelType};

use common::{Lab, Server, LIMIT};

const DWELL: Duration = Duration::from_secs(60);
const LOAD: Duration = Duration::from_secs(30);
const WAKE: Duration = Duration::from_millis(1_500);
const GIB: u64 = 1 << 30;

/// Every strategy runs an instance with the share it was launched with:
/// switches are sleeps and wakes, never relaunches.
fn settings(drain: Duration) -> PipelineSettings {
    common::settings(DWELL, 0.40, drain)
}

/// A server that sleeps in 0.5 s and wakes in `WAKE`.
fn sleeper(inference: FakeInference) -> Server {
    inference.sleep_timings(Duration::from_millis(500), WAKE);
    common::server(inference, LOAD)
}

fn server(latency: Duration) -> Server {
    sleeper(FakeInference::new().with_latency(latency))
}

/// Think answers in 2 s; both sleep at level 1; both Ready.
async fn start(gpu: Option<FakeGpu>, vision: Server, settings: PipelineSettings) -> Lab {
    let think = server(Duration::from_secs(2));
    let lab = Lab::start(gpu, think, vision, Some(SleepLevel::One), settings).await;
    lab.wait_state("think", InstanceState::Ready).await;
    lab.wait_state("vision", InstanceState::Ready).await;
    lab
}

#[tokio::test(start_paused = true)]
async fn a_switch_drains_sleeps_wakes_and_canaries_in_that_order() {
    let lab = start(
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
    let vision = sleeper(FakeInference::gated());
    let lab = start(
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
    let lab = start(
        Some(gpu.clone()),
        server(Duration::from_secs(20)),
        settings(Duration::from_secs(600)),
    )
    .await;
    // The two servers, once launched, hold 64 GiB.
    gpu.set_memory_used(0, 64 * GIB);
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
    let lab = start(
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

/// Sleep-mode think and vision on GPU 0, each at `share` of its memory,
/// vision first in the configuration; each answers in 2 s. Returns at
/// once: nothing has loaded yet.
async fn lab_at(share: f64, settings: PipelineSettings, gpu: Option<FakeGpu>) -> Lab {
    let think = server(Duration::from_secs(2));
    let vision = server(Duration::from_secs(2));
    let spec = |name: &str, model: ModelType, s: &Server| InstanceSpec {
        runtime: Some(Arc::new(s.runtime.clone()) as Arc<dyn ContainerRuntime>),
        plan: LaunchPlan {
            gpu_memory_utilization: share,
        },
        gpu_ids: vec![0],
        sleep: Some(SleepLevel::One),
        ..InstanceSpec::external(name, model, 8, Arc::new(s.inference.clone()))
    };
    let instances = vec![
        spec("vision", ModelType::Vision, &vision),
        spec("think", ModelType::Think, &think),
    ];
    let store = MemoryStore::new();
    let results = Arc::new(MemoryResults::new());
    let feeder = common::spawn_feeder(feeder_actors::supervisor::FeederArgs {
        gpu_probe: gpu.map(|p| Arc::new(p) as _),
        gpu_unavailable: "NVML is not available: no NVIDIA driver".into(),
        watch: None,
        ..common::feeder_args(&store, results, instances, "lab", settings)
    })
    .await;
    Lab {
        store,
        think,
        vision,
        feeder,
    }
}

/// The states `name` went through, in order.
async fn states_of(lab: &Lab, name: &str) -> Vec<InstanceState> {
    common::instance(&lab.feeder, name)
        .await
        .history
        .iter()
        .map(|t| t.to)
        .collect()
}

/// When `server`'s runtime first launched a server.
fn first_start(server: &Server) -> tokio::time::Instant {
    server
        .runtime
        .timed_calls()
        .into_iter()
        .find(|(_, c)| c.starts_with("start"))
        .expect("launched")
        .0
}

fn never_stopped(server: &Server) -> bool {
    !server.runtime.calls().iter().any(|c| c.starts_with("stop"))
}

#[tokio::test(start_paused = true)]
async fn parked_while_loading_it_finishes_loading_then_sleeps_and_comes_back_by_a_wake() {
    // A 1 s dwell: the allocator chooses vision at its first tick (5 s),
    // while both models still load (30 s).
    let lab = lab_at(
        0.40,
        common::settings(Duration::from_secs(1), 0.40, DWELL),
        None,
    )
    .await;
    lab.submit(ModelType::Vision, "v", 40).await;
    let deadline = tokio::time::Instant::now() + LIMIT;
    while lab.strategy().await != Strategy::Vision {
        assert!(tokio::time::Instant::now() < deadline, "never vision");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let decided = tokio::time::Instant::now();
    assert!(
        matches!(
            lab.state_of("think").await,
            InstanceState::Starting | InstanceState::Loading
        ),
        "the allocator parks think while it loads"
    );
    // The switch is over once think sleeps: after its whole load, with no
    // stop and no second launch.
    lab.wait_strategy(Strategy::Vision).await;
    assert!(lab.think.inference.is_asleep());
    assert!(
        tokio::time::Instant::now() >= first_start(&lab.think) + LOAD,
        "the park is answered once think sleeps, after its load"
    );
    assert!(never_stopped(&lab.think), "{:?}", lab.think.runtime.calls());
    assert_eq!(lab.think.runtime.starts(), 1);
    let states = states_of(&lab, "think").await;
    assert!(
        !states.contains(&InstanceState::Ready),
        "think never served while parked: {states:?}"
    );
    assert_eq!(
        &states[states.len() - 3..],
        [
            InstanceState::Loading,
            InstanceState::Sleeping,
            InstanceState::Sleeping
        ],
        "loaded, then straight to sleep: {states:?}"
    );
    let history = common::instance(&lab.feeder, "think").await.history;
    assert!(
        history
            .iter()
            .any(|t| t.reason.contains("loaded while parked")),
        "{history:?}"
    );
    let asleep_at = history.last().unwrap().instant;
    assert!(asleep_at > decided, "the park came before the sleep");

    // Think work: the first switch to think is a wake, not a load.
    wait_until("no vision work waits", LIMIT, || {
        lab.jobs(ModelType::Vision, JobStatus::Pending).is_empty()
    })
    .await;
    let asked = tokio::time::Instant::now();
    lab.submit(ModelType::Think, "t", 5).await;
    wait_until("the first think job done", LIMIT, || {
        !lab.jobs(ModelType::Think, JobStatus::Done).is_empty()
    })
    .await;
    let first_answer = asked.elapsed();
    assert!(first_answer < LOAD, "a wake, not a load: {first_answer:?}");
    assert!(lab.think.inference.events().iter().any(|e| e == "wake_up"));
    assert_eq!(
        lab.think.runtime.starts(),
        1,
        "think was never launched again"
    );
    assert_eq!(lab.vision.runtime.starts(), 1);
    assert!(never_stopped(&lab.think) && never_stopped(&lab.vision));
    let states = states_of(&lab, "think").await;
    assert_eq!(
        &states[states.len() - 2..],
        [InstanceState::Waking, InstanceState::Ready],
        "{states:?}"
    );
    wait_until("all done", LIMIT, || {
        lab.jobs(ModelType::Think, JobStatus::Done).len() == 5
            && lab.jobs(ModelType::Vision, JobStatus::Done).len() == 40
    })
    .await;
    assert!(lab.store.all().iter().all(|j| j.attempts == 1));
}

#[tokio::test(start_paused = true)]
async fn sleepers_that_do_not_fit_at_once_launch_one_after_the_other_think_first() {
    // 0.9 + 0.9 of GPU 0: think loads and sleeps, then vision loads.
    let lab = lab_at(
        0.90,
        common::settings(Duration::from_secs(1), 0.90, DWELL),
        None,
    )
    .await;
    lab.wait_state("vision", InstanceState::Ready).await;
    assert!(lab.think.inference.is_asleep());
    assert_eq!(lab.state_of("think").await, InstanceState::Sleeping);
    let think_slept = lab
        .think
        .inference
        .timed_events()
        .into_iter()
        .find(|(_, e)| e.starts_with("sleep"))
        .expect("think slept")
        .0;
    let (think_start, vision_start) = (first_start(&lab.think), first_start(&lab.vision));
    assert!(
        think_start + LOAD <= think_slept && think_slept <= vision_start,
        "think loaded and slept before vision launched: think {:?}, vision {:?}",
        lab.think.runtime.timed_calls(),
        lab.vision.runtime.timed_calls()
    );
    let states = states_of(&lab, "think").await;
    assert!(!states.contains(&InstanceState::Ready), "{states:?}");
    // The allocator starts with vision, the model awake.
    let a = lab.allocator().await;
    assert_eq!(a.strategy, Strategy::Vision, "{}", a.why);

    // Think work: vision sleeps, then think wakes; nothing is relaunched.
    lab.submit(ModelType::Think, "t", 3).await;
    lab.wait_strategy(Strategy::Think).await;
    lab.wait_state("think", InstanceState::Ready).await;
    let vision_slept = lab
        .vision
        .inference
        .timed_events()
        .into_iter()
        .find(|(_, e)| e.starts_with("sleep"))
        .expect("vision slept")
        .0;
    let think_woke = lab
        .think
        .inference
        .timed_events()
        .into_iter()
        .find(|(_, e)| e == "wake_up")
        .expect("think woke")
        .0;
    assert!(vision_slept < think_woke);
    assert_eq!(
        (lab.think.runtime.starts(), lab.vision.runtime.starts()),
        (1, 1)
    );
    assert!(never_stopped(&lab.think) && never_stopped(&lab.vision));
    wait_until("think work done", LIMIT, || {
        lab.jobs(ModelType::Think, JobStatus::Done).len() == 3
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_sleeper_whose_launch_waits_for_memory_gives_up_when_parked() {
    // Another process holds 70 of GPU 0's 80 GiB: neither launch can start.
    let gpu = FakeGpu::new(1);
    gpu.hold(0, 4242, 70 * GIB);
    let lab = lab_at(
        0.40,
        common::settings(Duration::from_secs(1), 0.40, DWELL),
        Some(gpu.clone()),
    )
    .await;
    wait_until("both wait for memory", LIMIT, || {
        [&lab.think, &lab.vision]
            .iter()
            .all(|s| s.runtime.calls().iter().any(|c| c == "find"))
    })
    .await;
    // Think work parks vision: waiting for memory that something else
    // holds, it is not launched (it would hold up the switch), as without
    // sleep mode.
    lab.submit(ModelType::Think, "t", 3).await;
    lab.wait_strategy(Strategy::Think).await;
    lab.wait_state("vision", InstanceState::Stopped).await;
    gpu.hold(0, 4242, 0);
    lab.wait_state("think", InstanceState::Ready).await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(lab.vision.runtime.starts(), 0, "the parked launch gave up");
    assert_eq!(lab.state_of("vision").await, InstanceState::Stopped);
}
