//! GPU groups are linked through shared GPUs, at message level: with A on
//! GPUs 0–1, B on 1–2 and C on 2–3, A and C share no GPU, yet all three are
//! one group, decided together. So a think-only backlog for C stops the
//! vision instance A, which an instance on GPUs of its own never is. The
//! real FeederSupervisor with scripted servers on a fake probe of four
//! GPUs, under paused tokio time.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{feeder_args, feeder_status, server, settings, spawn_feeder, wait_instance, Server};
use feeder_actors::allocator::Strategy;
use feeder_actors::container::InstanceState;
use feeder_actors::runtime::{ContainerRuntime, LaunchPlan};
use feeder_actors::spec::InstanceSpec;
use feeder_actors::supervisor::FeederArgs;
use feeder_actors::testkit::store_contract::job;
use feeder_actors::testkit::{submit, FakeGpu, FakeInference, MemoryResults, MemoryStore};
use feeder_actors::ModelType;

const DWELL: Duration = Duration::from_secs(60);
const LIMIT: Duration = Duration::from_secs(3_600);

#[tokio::test(start_paused = true)]
async fn instances_linked_through_a_shared_gpu_are_one_group_and_switch_together() {
    let placed: Vec<(&str, ModelType, Vec<u32>, Server)> = vec![
        ("vision-a", ModelType::Vision, vec![0, 1]),
        ("vision-b", ModelType::Vision, vec![1, 2]),
        ("think-c", ModelType::Think, vec![2, 3]),
    ]
    .into_iter()
    .map(|(n, m, g)| {
        let s = server(FakeInference::gated(), Duration::from_secs(20));
        (n, m, g, s)
    })
    .collect();
    let instances = placed
        .iter()
        .map(|(name, model, gpu_ids, s)| InstanceSpec {
            runtime: Some(Arc::new(s.runtime.clone()) as Arc<dyn ContainerRuntime>),
            plan: LaunchPlan {
                gpu_memory_utilization: 0.40,
            },
            gpu_ids: gpu_ids.clone(),
            ..InstanceSpec::external(*name, *model, 8, Arc::new(s.inference.clone()))
        })
        .collect();
    let store = MemoryStore::new();
    let feeder = spawn_feeder(FeederArgs {
        gpu_probe: Some(Arc::new(FakeGpu::new(4)) as _),
        gpu_unavailable: "NVML is not available".into(),
        watch: None,
        ..feeder_args(
            &store,
            Arc::new(MemoryResults::new()),
            instances,
            "gpus",
            settings(DWELL, 0.75, Duration::from_secs(60)),
        )
    })
    .await;
    for (name, ..) in &placed {
        wait_instance(&feeder, name, InstanceState::Ready).await;
    }

    // One group, though A and C share no GPU.
    let groups = feeder_status(&feeder)
        .await
        .allocator
        .expect("the allocator runs")
        .groups;
    let shown: Vec<(&str, &[u32], Vec<&str>)> = groups
        .iter()
        .map(|g| {
            (
                g.name.as_str(),
                g.gpu_ids.as_slice(),
                g.instances.iter().map(String::as_str).collect(),
            )
        })
        .collect();
    assert_eq!(
        shown,
        [(
            "gpus 0,1,2,3",
            &[0, 1, 2, 3][..],
            vec!["vision-a", "vision-b", "think-c"]
        )],
        "{groups:?}"
    );

    // Think work only: the group goes to `think`, and A, linked to C only
    // through B, is stopped with B.
    let jobs = (0..20)
        .map(|i| job(ModelType::Think, &format!("t-{i}")))
        .collect();
    submit(&feeder, jobs).await;
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let a = feeder_status(&feeder).await.allocator.unwrap();
        let g = &a.groups[0];
        if g.strategy == Strategy::Think && !g.switching {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never think: {g:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for name in ["vision-a", "vision-b"] {
        wait_instance(&feeder, name, InstanceState::Stopped).await;
    }
    let stops = placed[0]
        .3
        .runtime
        .calls()
        .iter()
        .filter(|c| c.starts_with("stop"))
        .count();
    assert!(stops >= 1, "vision-a was stopped for think's work");
    // Think runs on (relaunched at the solo share, as `think` asks).
    wait_instance(&feeder, "think-c", InstanceState::Ready).await;
}
