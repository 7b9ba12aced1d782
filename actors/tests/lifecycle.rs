//! Message-level tests of the instance lifecycle: the real actors
//! (FeederSupervisor, InstanceSupervisor, ContainerActor, HealthActor,
//! DispatchActor, QueueActor) with a scripted runtime and fake servers,
//! under paused tokio time.

mod common;

use std::sync::Arc;
use std::time::Duration;

use ractor::rpc::CallResult;
use ractor::ActorRef;

use common::{ask, feeder_args, spawn_feeder};
use feeder_actors::container::{InstanceState, InstanceStatus, LifecycleSettings};
use feeder_actors::inference::ProbeError;
use feeder_actors::runtime::{ContainerRuntime, Found, LaunchPlan};
use feeder_actors::spec::InstanceSpec;
use feeder_actors::supervisor::{FeederMsg, PipelineSettings};
use feeder_actors::testkit::store_contract::job;
use feeder_actors::testkit::{
    submit, wait_until, FakeInference, FakeRuntime, MemoryResults, MemoryStore,
};
use feeder_actors::{BlockingJobStore, InferenceError, JobId, JobStatus, ModelType};

const LIMIT: Duration = Duration::from_secs(3_600);
const PLAN: LaunchPlan = LaunchPlan {
    gpu_memory_utilization: 0.75,
};

fn settings() -> PipelineSettings {
    PipelineSettings {
        health_interval: Duration::from_secs(1),
        health_timeout: Duration::from_secs(1),
        lifecycle: LifecycleSettings {
            startup_timeout: Duration::from_secs(120),
            stop_grace: Duration::from_secs(1),
            drain_timeout: Duration::from_secs(60),
            ..LifecycleSettings::default()
        },
        ..PipelineSettings::default()
    }
}

/// The first instance's status.
async fn instance_status(feeder: &ActorRef<FeederMsg>) -> InstanceStatus {
    match feeder
        .call(|r| FeederMsg::Status { reply: r }, None)
        .await
        .unwrap()
    {
        CallResult::Success(s) => s.instances.into_iter().next().expect("one instance"),
        other => panic!("{other:?}"),
    }
}

/// Waits (polling) until the first instance is in state `want`.
async fn wait_instance_state(feeder: &ActorRef<FeederMsg>, want: InstanceState) -> InstanceStatus {
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let s = instance_status(feeder).await;
        if s.state == want {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never {want}; now {:?}: {}",
            s.state,
            s.reason
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

struct Lab {
    store: MemoryStore,
    server: FakeInference,
    runtime: FakeRuntime,
    feeder: ActorRef<FeederMsg>,
}

impl Lab {
    async fn start(server: FakeInference, runtime: FakeRuntime, settings: PipelineSettings) -> Lab {
        Self::start_with(MemoryStore::new(), server, runtime, settings).await
    }

    async fn start_with(
        store: MemoryStore,
        server: FakeInference,
        runtime: FakeRuntime,
        settings: PipelineSettings,
    ) -> Lab {
        let spec = InstanceSpec {
            runtime: Some(Arc::new(runtime.clone()) as Arc<dyn ContainerRuntime>),
            plan: PLAN,
            startup_timeout: settings.lifecycle.startup_timeout,
            ..InstanceSpec::external("v", ModelType::Vision, 4, Arc::new(server.clone()))
        };
        let results = Arc::new(MemoryResults::new());
        let feeder = spawn_feeder(feeder_args(&store, results, vec![spec], "lab", settings)).await;
        Lab {
            store,
            server,
            runtime,
            feeder,
        }
    }

    async fn status(&self) -> InstanceStatus {
        instance_status(&self.feeder).await
    }

    async fn wait_state(&self, want: InstanceState) -> InstanceStatus {
        wait_instance_state(&self.feeder, want).await
    }

    async fn submit(&self, n: usize) -> Vec<JobId> {
        self.submit_tagged("lab", n).await
    }

    async fn submit_tagged(&self, tag: &str, n: usize) -> Vec<JobId> {
        let jobs = (0..n)
            .map(|i| job(ModelType::Vision, &format!("{tag}-{i}")))
            .collect();
        submit(&self.feeder, jobs).await
    }

    fn count(&self, status: JobStatus) -> usize {
        common::count(&self.store, status)
    }

    fn states(s: &InstanceStatus) -> Vec<InstanceState> {
        s.history.iter().map(|t| t.to).collect()
    }
}

fn ready_server() -> FakeInference {
    FakeInference::new()
}

#[tokio::test(start_paused = true)]
async fn launch_load_ready_crash_restart_ready() {
    let server = ready_server();
    let rt = FakeRuntime::serving(server.clone(), Duration::from_secs(30));
    let lab = Lab::start(server, rt, settings()).await;
    let s = lab.wait_state(InstanceState::Ready).await;
    use InstanceState::*;
    assert_eq!(Lab::states(&s), vec![Starting, Loading, Ready]);
    assert_eq!(s.container_id.as_deref(), Some("c1"));
    assert!(!s.adopted);
    assert!(
        lab.server.deep_probes() >= 1,
        "readiness confirmed by a canary"
    );

    // Jobs run.
    lab.submit(5).await;
    wait_until("5 done", LIMIT, || lab.count(JobStatus::Done) == 5).await;

    // The server exits: noticed through the exit, not only the probes.
    lab.runtime.crash(137);
    let s = lab.wait_state(Ready).await;
    assert_eq!(
        Lab::states(&s),
        vec![Starting, Loading, Ready, Unhealthy, Restarting, Starting, Loading, Ready]
    );
    // Every change is in the history: each one starts where the last ended.
    for pair in s.history.windows(2) {
        assert_eq!(pair[1].from, pair[0].to, "{:?}", s.history);
    }
    let unhealthy = &s.history[3];
    assert!(
        unhealthy.reason.contains("exited with code 137")
            && unhealthy.reason.contains("last words of c1"),
        "the reason carries the exit and the server's last output: {}",
        unhealthy.reason
    );
    assert_eq!(s.restarts, 1);
    assert_eq!(s.container_id.as_deref(), Some("c2"));
    assert!(s.last_error.unwrap().contains("137"));
    assert_eq!(
        lab.runtime.calls(),
        ["find", "start c1", "crash c1", "find", "start c2"]
    );
}

#[tokio::test(start_paused = true)]
async fn a_slow_load_within_the_startup_timeout_is_not_a_failure() {
    let server = ready_server();
    // 100 s of loading, 120 s allowed; probes every second see 503 meanwhile.
    let rt = FakeRuntime::serving(server.clone(), Duration::from_secs(100));
    let lab = Lab::start(server, rt, settings()).await;
    let s = lab.wait_state(InstanceState::Ready).await;
    assert_eq!(s.restarts, 0);
    assert_eq!(lab.runtime.starts(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_load_past_the_startup_timeout_is_restarted() {
    let server = ready_server();
    let rt = FakeRuntime::serving(server.clone(), Duration::from_secs(200));
    let lab = Lab::start(server, rt, settings()).await;
    wait_until("relaunched", LIMIT, || lab.runtime.starts() == 2).await;
    let s = lab.status().await;
    let unhealthy = s
        .history
        .iter()
        .find(|t| t.to == InstanceState::Unhealthy)
        .expect("went unhealthy");
    assert!(
        unhealthy.reason.contains("startup_timeout_s = 120")
            && unhealthy.reason.contains("loading"),
        "{}",
        unhealthy.reason
    );
}

#[tokio::test(start_paused = true)]
async fn flapping_probes_below_the_threshold_keep_it_ready() {
    let server = ready_server();
    let rt = FakeRuntime::serving(server.clone(), Duration::from_secs(1));
    let lab = Lab::start(server.clone(), rt, settings()).await;
    lab.wait_state(InstanceState::Ready).await;
    for _ in 0..5 {
        // Two failed probes, then a good one: below failure_threshold = 3.
        server.set_probe(Err(ProbeError::Broken("HTTP 500".into())));
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        server.set_probe(Ok(()));
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let s = lab.status().await;
    assert_eq!(s.state, InstanceState::Ready);
    assert_eq!(s.restarts, 0);
    // Three in a row: Unhealthy, restarted.
    server.set_probe(Err(ProbeError::Broken("HTTP 500".into())));
    wait_until("relaunched", LIMIT, || lab.runtime.starts() == 2).await;
    let s = lab.wait_state(InstanceState::Ready).await;
    let unhealthy = s
        .history
        .iter()
        .find(|t| t.to == InstanceState::Unhealthy)
        .unwrap();
    assert!(
        unhealthy.reason.contains("3 failed probes"),
        "{}",
        unhealthy.reason
    );
}

#[tokio::test(start_paused = true)]
async fn restarts_back_off_exponentially_then_a_crash_loop_fails_the_instance() {
    let server = ready_server();
    let rt = FakeRuntime::serving(server.clone(), Duration::from_secs(1));
    let mut s = settings();
    s.lifecycle.crash_loop_restarts = 4;
    s.lifecycle.crash_loop_window = Duration::from_secs(3_600);
    let lab = Lab::start(server, rt, s).await;
    lab.submit(3).await;
    lab.wait_state(InstanceState::Ready).await;
    wait_until("3 done", LIMIT, || lab.count(JobStatus::Done) == 3).await;
    for n in 1..=5 {
        lab.wait_state(InstanceState::Ready).await;
        lab.runtime.crash(1);
        if n <= 4 {
            wait_until("relaunched", LIMIT, || lab.runtime.starts() == n + 1).await;
        }
    }
    let s = lab.wait_state(InstanceState::Failed).await;
    assert!(s.reason.contains("crash loop"), "{}", s.reason);
    assert_eq!(s.restarts, 4);
    // The delays between each crash and the next launch: 10, 20, 40, 80 s.
    let delays = lab.runtime.restart_delays_s();
    assert_eq!(delays, vec![10, 20, 40, 80]);
    // Failed: no further launches; new work waits in pending, never fails.
    lab.submit_tagged("more", 4).await;
    tokio::time::sleep(Duration::from_secs(1_000)).await;
    assert_eq!(lab.runtime.starts(), 5);
    assert_eq!(lab.count(JobStatus::Pending), 4);
    assert_eq!(lab.count(JobStatus::Failed), 0);
}

#[tokio::test(start_paused = true)]
async fn the_backoff_starts_over_after_a_long_healthy_run() {
    let server = ready_server();
    let rt = FakeRuntime::serving(server.clone(), Duration::from_secs(1));
    let lab = Lab::start(server, rt, settings()).await;
    lab.wait_state(InstanceState::Ready).await;
    lab.runtime.crash(1);
    wait_until("second launch", LIMIT, || lab.runtime.starts() == 2).await;
    lab.wait_state(InstanceState::Ready).await;
    lab.runtime.crash(1);
    wait_until("third launch", LIMIT, || lab.runtime.starts() == 3).await;
    lab.wait_state(InstanceState::Ready).await;
    // Healthy for longer than restart_reset (600 s): the next delay is 10 s again.
    tokio::time::sleep(Duration::from_secs(700)).await;
    lab.runtime.crash(1);
    wait_until("fourth launch", LIMIT, || lab.runtime.starts() == 4).await;
    let delays = lab.runtime.restart_delays_s();
    assert_eq!(delays, vec![10, 20, 10]);
}

#[tokio::test(start_paused = true)]
async fn a_running_server_with_the_same_hash_is_adopted() {
    let server = ready_server();
    let rt = FakeRuntime::serving(server.clone(), Duration::from_secs(30));
    rt.leave_behind(Found {
        id: "earlier".into(),
        running: true,
        config_hash: Some(rt.config_hash(&PLAN)),
    });
    let lab = Lab::start(server, rt, settings()).await;
    let s = lab.wait_state(InstanceState::Ready).await;
    assert!(s.adopted);
    assert_eq!(s.container_id.as_deref(), Some("earlier"));
    assert_eq!(
        lab.runtime.calls(),
        ["find"],
        "nothing launched, nothing stopped"
    );
    // An adopted server is watched like a launched one.
    lab.runtime.crash(9);
    wait_until("relaunched", LIMIT, || lab.runtime.starts() == 1).await;
}

#[tokio::test(start_paused = true)]
async fn a_running_server_with_another_hash_is_recreated() {
    let server = ready_server();
    let rt = FakeRuntime::serving(server.clone(), Duration::from_secs(5));
    rt.leave_behind(Found {
        id: "earlier".into(),
        running: true,
        config_hash: Some("mem=0.4".into()),
    });
    let lab = Lab::start(server, rt, settings()).await;
    let s = lab.wait_state(InstanceState::Ready).await;
    assert!(!s.adopted);
    assert_eq!(lab.runtime.calls(), ["find", "stop earlier", "start c1"]);
    assert_eq!(lab.runtime.plans(), vec![PLAN]);
}

#[tokio::test(start_paused = true)]
async fn a_stopped_server_is_replaced() {
    let server = ready_server();
    let rt = FakeRuntime::serving(server.clone(), Duration::from_secs(5));
    rt.leave_behind(Found {
        id: "stale".into(),
        running: false,
        config_hash: Some(rt.config_hash(&PLAN)),
    });
    let lab = Lab::start(server, rt, settings()).await;
    lab.wait_state(InstanceState::Ready).await;
    assert_eq!(lab.runtime.calls(), ["find", "start c1"]);
}

#[tokio::test(start_paused = true)]
async fn a_failed_launch_is_retried_with_backoff() {
    let server = ready_server();
    let rt = FakeRuntime::serving(server.clone(), Duration::from_secs(5));
    rt.fail_next_start("the image vllm/vllm-openai:latest is not present locally");
    let lab = Lab::start(server, rt, settings()).await;
    let s = lab.wait_state(InstanceState::Ready).await;
    assert_eq!(s.restarts, 1);
    assert!(s.last_error.unwrap().contains("not present locally"));
}

#[tokio::test(start_paused = true)]
async fn jobs_in_flight_go_back_to_pending_when_the_server_goes_down() {
    let server = FakeInference::gated();
    let rt = FakeRuntime::serving(server.clone(), Duration::from_secs(1));
    let lab = Lab::start(server.clone(), rt, settings()).await;
    lab.wait_state(InstanceState::Ready).await;
    let ids = lab.submit(4).await;
    wait_until("4 in flight", LIMIT, || server.in_flight() == 4).await;
    lab.runtime.crash(137);
    wait_until("back to pending", LIMIT, || {
        lab.count(JobStatus::Pending) == 4
    })
    .await;
    for id in &ids {
        let j = lab.store.get(*id).unwrap().unwrap();
        assert_eq!((j.attempts, j.crashes), (0, 1), "the crash is no attempt");
    }
    // After the restart they run to completion.
    server.release(1_000);
    wait_until("all done", LIMIT, || lab.count(JobStatus::Done) == 4).await;
}

#[tokio::test(start_paused = true)]
async fn connection_refused_without_a_crash_costs_no_attempt() {
    let server = ready_server();
    let rt = FakeRuntime::serving(server.clone(), Duration::from_secs(1));
    let lab = Lab::start(server.clone(), rt, settings()).await;
    lab.wait_state(InstanceState::Ready).await;
    server.script([
        Err(InferenceError::Unavailable("connection refused".into())),
        Err(InferenceError::Unavailable("connection refused".into())),
    ]);
    let ids = lab.submit(1).await;
    wait_until("done", LIMIT, || lab.count(JobStatus::Done) == 1).await;
    let j = lab.store.get(ids[0]).unwrap().unwrap();
    assert_eq!((j.attempts, j.crashes), (1, 0));
}

#[tokio::test(start_paused = true)]
async fn a_request_that_finds_the_server_gone_waits_for_the_probes_to_count_the_crash() {
    // A server killed under its requests (kill -9 of an adopted vLLM: no
    // exit to watch): they end "connection refused" at once, and only
    // `failure_threshold` failed probes later (3 s here) does the health
    // check report the crash. The jobs are held until then, so the crash
    // is counted against them (poison quarantine), not lost by a release
    // after the first half-second pause.
    let server = FakeInference::gated();
    let rt = FakeRuntime::serving(server.clone(), Duration::from_secs(1));
    let lab = Lab::start(server.clone(), rt, settings()).await;
    lab.wait_state(InstanceState::Ready).await;
    let ids = lab.submit(4).await;
    wait_until("4 in flight", LIMIT, || server.in_flight() == 4).await;
    server.gone(true);
    wait_until("the crash is counted against the 4", LIMIT, || {
        ids.iter()
            .all(|id| lab.store.get(*id).unwrap().unwrap().crashes == 1)
    })
    .await;
    for id in &ids {
        let j = lab.store.get(*id).unwrap().unwrap();
        assert_eq!(j.attempts, 0, "a crash is no attempt: {j:?}");
    }
    server.gone(false);
    server.release(1_000);
    wait_until("all done", LIMIT, || lab.count(JobStatus::Done) == 4).await;
}

#[tokio::test(start_paused = true)]
async fn a_job_in_flight_during_three_crashes_is_quarantined() {
    let server = FakeInference::gated();
    let rt = FakeRuntime::serving(server.clone(), Duration::from_secs(1));
    let lab = Lab::start(server.clone(), rt, settings()).await;
    lab.wait_state(InstanceState::Ready).await;
    let poison = lab.submit(1).await[0];
    for n in 1..=3u32 {
        lab.wait_state(InstanceState::Ready).await;
        wait_until("the poison job is in flight", LIMIT, || {
            server.in_flight() == 1
        })
        .await;
        lab.runtime.crash(139);
        wait_until("the crash is counted", LIMIT, || {
            lab.store.get(poison).unwrap().unwrap().crashes == n
        })
        .await;
    }
    let j = lab.store.get(poison).unwrap().unwrap();
    assert_eq!(j.status, JobStatus::Failed);
    assert_eq!(j.attempts, 0);
    let error = j.error.unwrap();
    assert!(error.starts_with("poison job"), "{error}");
    // The server comes back, and other work runs.
    let more = lab.submit_tagged("more", 2).await;
    server.release(1_000);
    wait_until("others done", LIMIT, || {
        more.iter()
            .all(|id| lab.store.get(*id).unwrap().unwrap().status == JobStatus::Done)
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn an_external_server_is_probed_but_never_restarted() {
    let server = ready_server();
    let spec = InstanceSpec::external("x", ModelType::Think, 2, Arc::new(server.clone()));
    let store = MemoryStore::new();
    let results = Arc::new(MemoryResults::new());
    let feeder = spawn_feeder(feeder_args(&store, results, vec![spec], "lab", settings())).await;
    let status = || instance_status(&feeder);
    let wait = |want| wait_instance_state(&feeder, want);
    wait(InstanceState::Ready).await;
    server.set_probe(Err(ProbeError::NotListening("connection refused".into())));
    let down = wait(InstanceState::Unhealthy).await;
    // Long past every restart delay: an external server is only probed.
    tokio::time::sleep(settings().lifecycle.restart.base * 3).await;
    let s = status().await;
    assert_eq!(s.state, InstanceState::Unhealthy, "{:?}", Lab::states(&s));
    assert_eq!(s.restarts, 0);
    assert!(
        !Lab::states(&s).contains(&InstanceState::Restarting),
        "{:?}",
        Lab::states(&s)
    );
    assert_eq!(down.restarts, 0);
    // Its jobs wait meanwhile, and run once it answers again.
    let ids = submit(
        &feeder,
        (0..3)
            .map(|i| job(ModelType::Think, &format!("x{i}")))
            .collect(),
    )
    .await;
    assert!(ids
        .iter()
        .all(|id| store.get(*id).unwrap().unwrap().status == JobStatus::Pending));
    server.set_probe(Ok(()));
    let back = wait(InstanceState::Ready).await;
    assert_eq!(back.restarts, 0);
    wait_until("its jobs done", LIMIT, || {
        ids.iter()
            .all(|id| store.get(*id).unwrap().unwrap().status == JobStatus::Done)
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn shutdown_leaves_servers_running_or_stops_them() {
    for keep in [true, false] {
        let server = ready_server();
        let rt = FakeRuntime::serving(server.clone(), Duration::from_secs(1));
        let mut s = settings();
        s.keep_servers_on_exit = keep;
        let lab = Lab::start(server, rt, s).await;
        lab.wait_state(InstanceState::Ready).await;
        let report = lab
            .feeder
            .call(
                |r| FeederMsg::Shutdown {
                    grace: Duration::from_secs(5),
                    reply: r,
                },
                None,
            )
            .await
            .unwrap();
        assert!(matches!(report, CallResult::Success(_)));
        let stopped = lab.runtime.calls().contains(&"stop c1".to_string());
        assert_eq!(stopped, !keep, "keep_servers_on_exit = {keep}");
        lab.feeder.stop(None);
    }
}

#[tokio::test(start_paused = true)]
async fn a_restarted_daemon_adopts_with_pending_jobs_intact() {
    // One store, two daemons in turn: the second adopts the first's server
    // and runs the jobs left pending (and in flight) by the first.
    let store = MemoryStore::new();
    let server = FakeInference::gated();
    let rt = FakeRuntime::serving(server.clone(), Duration::from_secs(20));
    let first = Lab::start_with(store.clone(), server.clone(), rt.clone(), settings()).await;
    first.wait_state(InstanceState::Ready).await;
    let early = first.submit_tagged("early", 3).await;
    server.release(3);
    wait_until("3 done", LIMIT, || first.count(JobStatus::Done) == 3).await;
    // Work left behind: some in flight (the server holds them), the rest pending.
    let left = first.submit_tagged("left", 6).await;
    wait_until("requests in flight", LIMIT, || server.in_flight() > 0).await;
    first.feeder.stop(None);
    let unfinished = left
        .iter()
        .filter(|id| store.get(**id).unwrap().unwrap().status != JobStatus::Done)
        .count();
    assert_eq!(unfinished, 6, "the first daemon left all 6 unfinished");
    let id = rt.current().unwrap();
    rt.leave_behind(Found {
        id: id.clone(),
        running: true,
        config_hash: Some(rt.config_hash(&PLAN)),
    });
    let sent_before = server.received().len();
    let second = Lab::start_with(store.clone(), server.clone(), rt.clone(), settings()).await;
    let s = second.wait_state(InstanceState::Ready).await;
    assert!(s.adopted);
    assert_eq!(s.container_id, Some(id));
    assert_eq!(rt.starts(), 1, "no relaunch, the model stays loaded");
    server.release(1_000);
    wait_until("the jobs left behind are done", LIMIT, || {
        left.iter()
            .all(|id| store.get(*id).unwrap().unwrap().status == JobStatus::Done)
    })
    .await;
    // Every job left behind was sent again by the second daemon, and the
    // early ones were not.
    let resent = &server.received()[sent_before..];
    for id in &left {
        assert!(
            resent.contains(id),
            "{id} was never sent by the second daemon"
        );
    }
    for id in &early {
        assert!(!resent.contains(id), "{id} was done, yet sent again");
        assert_eq!(store.get(*id).unwrap().unwrap().attempts, 1);
    }
}

#[tokio::test(start_paused = true)]
async fn bystanders_of_a_poison_job_are_not_quarantined() {
    let server = FakeInference::gated();
    let rt = FakeRuntime::serving(server.clone(), Duration::from_secs(1));
    let lab = Lab::start(server.clone(), rt, settings()).await;
    lab.wait_state(InstanceState::Ready).await;
    let ids = lab.submit(5).await;
    let poison = ids[2];
    // The poison job crashes the server whenever it is sent; the others
    // finish whenever they are alone or with company.
    let mut crashes = 0;
    while lab.store.get(poison).unwrap().unwrap().status != JobStatus::Failed {
        assert!(crashes < 10, "the poison job is never quarantined");
        lab.wait_state(InstanceState::Ready).await;
        wait_until("a request in flight", LIMIT, || {
            server.in_flight() > 0 || lab.count(JobStatus::Failed) > 0
        })
        .await;
        if lab.count(JobStatus::Failed) > 0 {
            break;
        }
        let sent = server.received();
        let in_flight_now = &sent[sent.len() - server.in_flight()..];
        if in_flight_now.contains(&poison) {
            lab.runtime.crash(139);
            crashes += 1;
            let before = lab.runtime.starts();
            if lab.store.get(poison).unwrap().unwrap().crashes < 3 {
                wait_until("relaunched", LIMIT, || lab.runtime.starts() > before).await;
            }
        } else {
            server.release(1);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    wait_until("quarantined", LIMIT, || {
        lab.store.get(poison).unwrap().unwrap().status == JobStatus::Failed
    })
    .await;
    server.release(1_000);
    wait_until("the bystanders done", LIMIT, || {
        lab.count(JobStatus::Done) == 4
    })
    .await;
    for id in ids.iter().filter(|id| **id != poison) {
        let j = lab.store.get(*id).unwrap().unwrap();
        assert_eq!(j.status, JobStatus::Done);
        assert!(
            j.crashes <= 1,
            "a bystander was counted {} crashes",
            j.crashes
        );
    }
    assert_eq!(crashes, 3);
}

#[tokio::test(start_paused = true)]
async fn an_operator_revives_a_failed_instance() {
    let server = ready_server();
    let rt = FakeRuntime::serving(server.clone(), Duration::from_secs(1));
    let mut s = settings();
    s.lifecycle.crash_loop_restarts = 1;
    let lab = Lab::start(server, rt, s).await;
    let revive = |name: &str| {
        let (f, name) = (lab.feeder.clone(), name.to_string());
        async move {
            let p = feeder_actors::supervisor::peers(&f, Duration::from_secs(5))
                .await
                .unwrap();
            ask(&p.instances, |r| {
                feeder_actors::instances::InstanceSupMsg::Revive {
                    instance: name,
                    reply: r,
                }
            })
            .await
        }
    };
    lab.wait_state(InstanceState::Ready).await;
    let e = revive("v").await.unwrap_err();
    assert!(e.contains("only a failed or stopped instance"), "{e}");
    assert!(revive("nope").await.unwrap_err().contains("configured: v"));
    lab.runtime.crash(1);
    wait_until("relaunched", LIMIT, || lab.runtime.starts() == 2).await;
    lab.wait_state(InstanceState::Ready).await;
    lab.runtime.crash(1);
    lab.wait_state(InstanceState::Failed).await;
    revive("v").await.unwrap();
    let s = lab.wait_state(InstanceState::Ready).await;
    assert_eq!(lab.runtime.starts(), 3);
    assert!(s
        .history
        .iter()
        .any(|t| t.reason.contains("an operator asked")));
    // The crash-loop count started over: one more crash is restarted again.
    lab.runtime.crash(1);
    wait_until("relaunched after the revival", LIMIT, || {
        lab.runtime.starts() == 4
    })
    .await;
}
