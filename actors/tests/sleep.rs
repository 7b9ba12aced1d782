//! Message-level scenarios of sleep mode: the real FeederSupervisor,
//! AllocatorActor, ContainerActors and dispatchers, with scripted servers
//! that sleep and wake as vLLM's do, a scripted GPU, and the in-memory store,
//! under paused tokio time.

mod common;

use std::time::Duration;

use feeder_actors::allocator::Strategy;
use feeder_actors::container::InstanceState;
use feeder_actors::spec::SleepLevel;
use feeder_actors::supervisor::PipelineSettings;
use feeder_actors::testkit::{wait_until, FakeGpu, FakeInference};
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
