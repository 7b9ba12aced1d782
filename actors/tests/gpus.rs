//! Several GPUs, at the message level: the real FeederSupervisor with
//! scripted servers on the GPUs of a fake probe that reports four, under
//! paused tokio time. Instances whose `gpu_ids` overlap form a group that
//! the allocator decides alone; an instance on GPUs of its own is never
//! stopped for another model's work; replicas of one model share its
//! queue; a tensor-parallel instance is hot when any of its GPUs is.

mod common;

use std::sync::Arc;
use std::time::Duration;

use ractor::ActorRef;

use common::{
    count, feeder_args, feeder_status, instance, server, settings, spawn_feeder, wait_instance,
    Server, LIMIT,
};
use feeder_actors::allocator::{GroupStatus, Strategy};
use feeder_actors::container::InstanceState;
use feeder_actors::handle::FeederHandle;
use feeder_actors::runtime::{ContainerRuntime, LaunchPlan};
use feeder_actors::spec::InstanceSpec;
use feeder_actors::supervisor::{FeederArgs, FeederMsg, FeederStatus};
use feeder_actors::testkit::store_contract::job;
use feeder_actors::testkit::{
    submit, wait_until, FakeGpu, FakeInference, MemoryResults, MemoryStore,
};
use feeder_actors::{JobStatus, ModelType};

const DWELL: Duration = Duration::from_secs(60);

/// One instance of the rig: a name, its model, its GPUs, its server.
struct Placed {
    name: &'static str,
    model: ModelType,
    gpu_ids: Vec<u32>,
    server: Server,
}

fn placed(name: &'static str, model: ModelType, gpu_ids: &[u32]) -> Placed {
    Placed {
        name,
        model,
        gpu_ids: gpu_ids.to_vec(),
        server: server(FakeInference::gated(), Duration::from_secs(20)),
    }
}

struct Rig {
    store: MemoryStore,
    gpu: FakeGpu,
    placed: Vec<Placed>,
    feeder: ActorRef<FeederMsg>,
}

impl Rig {
    /// The feeder with `placed` on a host with four GPUs, once every
    /// server is launched.
    async fn start(placed: Vec<Placed>) -> Rig {
        let rig = Rig::spawn(placed, FakeGpu::new(4)).await;
        for p in &rig.placed {
            rig.wait_state(p.name, InstanceState::Ready).await;
        }
        rig
    }

    /// The feeder with `placed` on four GPUs, 70 of GPU `held`'s 80 GiB
    /// taken by another process (pid 4242).
    async fn spawn_held(held: u32, placed: Vec<Placed>) -> Rig {
        let gpu = FakeGpu::new(4);
        gpu.hold(held, 4242, 70 << 30);
        Rig::spawn(placed, gpu).await
    }

    /// Lets `name` answer, and waits until `done` jobs are done.
    async fn answer_until(&self, name: &str, done: usize) {
        self.server(name).inference.release(100);
        wait_until("done", LIMIT, || self.count(JobStatus::Done) == done).await;
    }

    /// The feeder with `placed` on the GPUs of `gpu`.
    async fn spawn(placed: Vec<Placed>, gpu: FakeGpu) -> Rig {
        let store = MemoryStore::new();
        let instances = placed
            .iter()
            .map(|p| InstanceSpec {
                runtime: Some(Arc::new(p.server.runtime.clone()) as Arc<dyn ContainerRuntime>),
                plan: LaunchPlan {
                    gpu_memory_utilization: 0.40,
                },
                gpu_ids: p.gpu_ids.clone(),
                ..InstanceSpec::external(p.name, p.model, 8, Arc::new(p.server.inference.clone()))
            })
            .collect();
        let settings = settings(DWELL, 0.75, Duration::from_secs(60));
        let results = Arc::new(MemoryResults::new());
        let feeder = spawn_feeder(FeederArgs {
            gpu_probe: Some(Arc::new(gpu.clone()) as _),
            gpu_unavailable: "NVML is not available".into(),
            watch: None,
            ..feeder_args(&store, results, instances, "gpus", settings)
        })
        .await;
        Rig {
            store,
            gpu,
            placed,
            feeder,
        }
    }

    async fn reason_of(&self, name: &str) -> String {
        instance(&self.feeder, name).await.reason
    }

    fn server(&self, name: &str) -> &Server {
        &self.placed.iter().find(|p| p.name == name).unwrap().server
    }

    async fn status(&self) -> FeederStatus {
        feeder_status(&self.feeder).await
    }

    async fn groups(&self) -> Vec<GroupStatus> {
        self.status()
            .await
            .allocator
            .expect("the allocator runs")
            .groups
    }

    async fn group(&self, name: &str) -> GroupStatus {
        self.groups()
            .await
            .into_iter()
            .find(|g| g.name == name)
            .unwrap_or_else(|| panic!("no group {name}"))
    }

    async fn state_of(&self, name: &str) -> InstanceState {
        instance(&self.feeder, name).await.state
    }

    async fn wait_state(&self, name: &str, want: InstanceState) {
        wait_instance(&self.feeder, name, want).await
    }

    async fn wait_group(&self, name: &str, want: Strategy) {
        let deadline = tokio::time::Instant::now() + LIMIT;
        loop {
            let g = self.group(name).await;
            if g.strategy == want && !g.switching {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name} never {want}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn submit(&self, model: ModelType, tag: &str, n: usize) {
        let jobs = (0..n).map(|i| job(model, &format!("{tag}-{i}"))).collect();
        submit(&self.feeder, jobs).await;
    }

    fn count(&self, status: JobStatus) -> usize {
        count(&self.store, status)
    }

    fn stops(&self, name: &str) -> usize {
        self.server(name)
            .runtime
            .calls()
            .iter()
            .filter(|c| c.starts_with("stop"))
            .count()
    }
}

#[tokio::test(start_paused = true)]
async fn disjoint_instances_never_stop_each_other() {
    let rig = Rig::start(vec![
        placed("vision", ModelType::Vision, &[0]),
        placed("think", ModelType::Think, &[1]),
    ])
    .await;
    let groups = rig.groups().await;
    let names: Vec<&str> = groups.iter().map(|g| g.name.as_str()).collect();
    assert_eq!(names, ["gpu 0", "gpu 1"], "one group per GPU");
    // Think work only, for many dwells: on a shared GPU this would stop
    // vision; here vision has GPU 0 to itself.
    rig.submit(ModelType::Think, "t", 30).await;
    wait_until("think busy", LIMIT, || {
        rig.server("think").inference.in_flight() > 0
    })
    .await;
    tokio::time::sleep(DWELL * 5).await;
    assert_eq!(rig.state_of("vision").await, InstanceState::Ready);
    assert_eq!(rig.stops("vision"), 0, "vision was never stopped");
    assert_eq!(rig.server("vision").runtime.starts(), 1);
    for g in rig.groups().await {
        assert_eq!(g.strategy, Strategy::Static, "{}: {}", g.name, g.why);
        assert_eq!(g.switches, 0, "{}", g.name);
    }
    rig.server("think").inference.release(10_000);
    wait_until("think done", LIMIT, || rig.count(JobStatus::Done) == 30).await;
    // And the other way round.
    rig.submit(ModelType::Vision, "v", 30).await;
    tokio::time::sleep(DWELL * 5).await;
    assert_eq!(rig.state_of("think").await, InstanceState::Ready);
    assert_eq!(rig.stops("think"), 0, "think was never stopped");
    rig.server("vision").inference.release(10_000);
    wait_until("all done", LIMIT, || rig.count(JobStatus::Done) == 60).await;
    assert_eq!(rig.count(JobStatus::Failed), 0);
}

#[tokio::test(start_paused = true)]
async fn two_sharing_gpu_0_switch_by_backlog_while_a_third_on_gpu_1_stays_up() {
    let rig = Rig::start(vec![
        placed("think", ModelType::Think, &[0]),
        placed("vision-a", ModelType::Vision, &[0]),
        placed("vision-b", ModelType::Vision, &[1]),
    ])
    .await;
    assert_eq!(
        rig.group("gpu 0").await.instances,
        ["think", "vision-a"],
        "the two on GPU 0 are one group"
    );
    // Think only: GPU 0 gives itself to think (think first, no dwell).
    rig.submit(ModelType::Think, "t", 20).await;
    rig.wait_group("gpu 0", Strategy::Think).await;
    assert_eq!(rig.state_of("vision-a").await, InstanceState::Stopped);
    let top = rig.status().await.allocator.unwrap();
    assert_eq!(
        (top.strategy, top.groups.len()),
        (Strategy::Think, 2),
        "the top-level strategy is the first group's"
    );
    rig.server("think").inference.release(10_000);
    wait_until("think done", LIMIT, || rig.count(JobStatus::Done) == 20).await;
    // Vision only: after the dwell GPU 0 switches to vision, and both
    // vision replicas take the work.
    rig.submit(ModelType::Vision, "v", 40).await;
    rig.wait_group("gpu 0", Strategy::Vision).await;
    assert_eq!(rig.state_of("think").await, InstanceState::Stopped);
    rig.wait_state("vision-a", InstanceState::Ready).await;
    for name in ["vision-a", "vision-b"] {
        rig.server(name).inference.release(10_000);
    }
    wait_until("all done", LIMIT, || rig.count(JobStatus::Done) == 60).await;
    let (a, b) = (
        rig.server("vision-a").inference.received().len(),
        rig.server("vision-b").inference.received().len(),
    );
    assert!(
        a > 0 && b > 0,
        "both replicas took vision work: {a} and {b}"
    );
    // A pin of think holds think on GPU 0 and leaves GPU 1's vision alone;
    // a pin of vision holds GPU 1 as configured.
    let handle = FeederHandle::new(rig.feeder.clone());
    handle.pin(Some(Strategy::Think)).await.unwrap();
    rig.wait_group("gpu 0", Strategy::Think).await;
    let g1 = rig.group("gpu 1").await;
    assert_eq!((g1.strategy, g1.pinned), (Strategy::Static, None));
    let a = handle.pin(Some(Strategy::Vision)).await.unwrap();
    let pins: Vec<_> = a.groups.iter().map(|g| g.pinned).collect();
    assert_eq!(pins, [Some(Strategy::Vision), Some(Strategy::Static)]);
    rig.wait_group("gpu 0", Strategy::Vision).await;
    handle.pin(None).await.unwrap();
    // GPU 1 was never touched.
    let g1 = rig.group("gpu 1").await;
    assert_eq!(
        (g1.strategy, g1.switches),
        (Strategy::Static, 0),
        "{}",
        g1.why
    );
    assert_eq!(rig.stops("vision-b"), 0);
    assert_eq!(rig.server("vision-b").runtime.starts(), 1);
    assert_eq!(rig.count(JobStatus::Failed), 0);
}

#[tokio::test(start_paused = true)]
async fn a_tensor_parallel_instance_is_hot_when_either_of_its_gpus_is() {
    let rig = Rig::start(vec![
        placed("vision", ModelType::Vision, &[0]),
        placed("think", ModelType::Think, &[2, 3]),
    ])
    .await;
    assert_eq!(
        rig.groups()
            .await
            .iter()
            .map(|g| g.name.as_str())
            .collect::<Vec<_>>(),
        ["gpu 0", "gpus 2,3"]
    );
    let caps = |st: &FeederStatus| -> (Option<u32>, Option<u32>) {
        let cap = |n: &str| {
            st.dispatch
                .iter()
                .find(|d| d.instance == n)
                .and_then(|d| d.thermal_cap)
        };
        (cap("vision"), cap("think"))
    };
    let wait_caps = |want: (bool, bool)| {
        let rig = &rig;
        async move {
            let deadline = tokio::time::Instant::now() + LIMIT;
            loop {
                let (v, t) = caps(&rig.status().await);
                if (v.is_some(), t.is_some()) == want {
                    return;
                }
                assert!(tokio::time::Instant::now() < deadline, "never {want:?}");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    };
    for hot in [3, 2] {
        rig.gpu.set_temperature(hot, 88);
        wait_caps((false, true)).await;
        rig.gpu.set_temperature(hot, 60);
        wait_caps((false, false)).await;
    }
    // GPU 1 holds nobody: its heat narrows nothing.
    rig.gpu.set_temperature(1, 95);
    wait_until_hot(&rig, 1).await;
    assert_eq!(caps(&rig.status().await), (None, None));
    rig.gpu.set_temperature(0, 90);
    wait_caps((true, false)).await;
}

async fn wait_until_hot(rig: &Rig, gpu: u32) {
    let deadline = tokio::time::Instant::now() + LIMIT;
    while !rig
        .status()
        .await
        .gpus
        .is_some_and(|g| g.hot.contains(&gpu))
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "GPU {gpu} never hot"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_launch_waits_for_memory_another_process_holds_and_says_who() {
    // 70 of GPU 1's 80 GiB are held: a server at 0.40 (32 GiB) cannot start.
    let rig = Rig::spawn_held(
        1,
        vec![
            placed("vision", ModelType::Vision, &[0]),
            placed("think", ModelType::Think, &[1]),
        ],
    )
    .await;
    rig.wait_state("vision", InstanceState::Ready).await;
    let deadline = tokio::time::Instant::now() + LIMIT;
    let reason = loop {
        let r = rig.reason_of("think").await;
        if r.contains("waiting for GPU memory") {
            break r;
        }
        assert!(tokio::time::Instant::now() < deadline, "never waited: {r}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(
        reason.contains("GPU 1 has 10.0 GiB free of 80.0 GiB")
            && reason.contains("needs 32.0 GiB")
            && reason.contains("pid 4242"),
        "{reason}"
    );
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(rig.state_of("think").await, InstanceState::Starting);
    assert_eq!(
        rig.server("think").runtime.starts(),
        0,
        "nothing launched to fail"
    );
    // Work for it waits, and is served once the memory is let go.
    rig.submit(ModelType::Think, "t", 5).await;
    rig.gpu.hold(1, 4242, 0);
    rig.wait_state("think", InstanceState::Ready).await;
    assert_eq!(rig.server("think").runtime.starts(), 1);
    rig.answer_until("think", 5).await;
}

#[tokio::test(start_paused = true)]
async fn a_launch_waiting_for_memory_gives_up_when_parked() {
    let rig = Rig::spawn_held(
        0,
        vec![
            placed("think", ModelType::Think, &[0]),
            placed("vision", ModelType::Vision, &[0]),
        ],
    )
    .await;
    // Think work: GPU 0's group gives itself to think and parks vision,
    // whose launch was waiting for memory; it must not start later.
    rig.submit(ModelType::Think, "t", 5).await;
    rig.wait_group("gpu 0", Strategy::Think).await;
    rig.wait_state("vision", InstanceState::Stopped).await;
    rig.gpu.hold(0, 4242, 0);
    rig.wait_state("think", InstanceState::Ready).await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(
        rig.server("vision").runtime.starts(),
        0,
        "the parked launch gave up"
    );
    assert_eq!(rig.state_of("vision").await, InstanceState::Stopped);
    rig.answer_until("think", 5).await;
}

#[tokio::test(start_paused = true)]
async fn replicas_take_work_by_what_they_can_serve() {
    let fast = FakeInference::new().with_latency(Duration::from_millis(100));
    let slow = FakeInference::new().with_latency(Duration::from_millis(300));
    let rig = Rig::start(vec![
        Placed {
            server: server(fast, Duration::from_secs(20)),
            ..placed("think-fast", ModelType::Think, &[1])
        },
        Placed {
            server: server(slow, Duration::from_secs(20)),
            ..placed("think-slow", ModelType::Think, &[2])
        },
    ])
    .await;
    rig.submit(ModelType::Think, "t", 800).await;
    wait_until("all done", LIMIT, || rig.count(JobStatus::Done) == 800).await;
    let (f, s) = (
        rig.server("think-fast").inference.received().len(),
        rig.server("think-slow").inference.received().len(),
    );
    assert_eq!(f + s, 800, "each job sent once");
    // Same windows, a third of the latency: about three times the jobs.
    let ratio = f as f64 / s as f64;
    eprintln!("figure: 800 jobs over replicas at 100 and 300 ms: {f} and {s} ({ratio:.2}×)");
    assert!(
        (2.5..=3.5).contains(&ratio),
        "fast {f}, slow {s}: ratio {ratio:.2}"
    );
}
