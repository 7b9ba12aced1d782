//! Message-level tests of the actors: each actor spawned with in-memory fakes
//! for its ports (store, model server, results), driven by typed messages
//! under paused tokio time, with assertions on replies, on the store, and on
//! what the fake server received.

mod common;

use std::sync::Arc;
use std::time::Duration;

use ractor::rpc::CallResult;
use ractor::{Actor, ActorRef};

use common::{ask, feeder_args, spawn_feeder};
use feeder_actors::dispatch::DispatchMsg;
use feeder_actors::fanin::{FanInActor, FanInArgs, FanInMsg, Scan};
use feeder_actors::queue::{JobFinished, QueueActor, QueueArgs, QueueMsg, WorkAvailable};
use feeder_actors::results::{JobResult, ResultStore};
use feeder_actors::spec::InstanceSpec;
use feeder_actors::supervisor::{peers, FeederMsg, PipelineSettings};
use feeder_actors::testkit::store_contract::{job, question};
use feeder_actors::testkit::{
    submit, wait_until, FakeInference, MemoryResults, MemoryStore, Recorder,
};
use feeder_actors::{
    Backoff, BlockingJobStore, Completion, InferenceError, Job, JobId, JobStatus, ListFilter,
    ModelType, Settle, Timestamp, TokioClock,
};

const T0: Timestamp = Timestamp(1_700_000_000_000);
const LIMIT: Duration = Duration::from_secs(120);

fn settings() -> PipelineSettings {
    PipelineSettings {
        health_interval: Duration::from_secs(1),
        retry: Backoff {
            base: Duration::from_secs(2),
            max: Duration::from_secs(60),
            factor: 2.0,
            jitter: 0.0,
        },
        ..PipelineSettings::default()
    }
}

struct Pipeline {
    store: MemoryStore,
    results: MemoryResults,
    feeder: ActorRef<FeederMsg>,
}

impl Pipeline {
    async fn start(instances: Vec<(&str, ModelType, u32, FakeInference)>) -> Pipeline {
        Self::start_with(MemoryStore::new(), instances).await
    }

    async fn start_with(
        store: MemoryStore,
        instances: Vec<(&str, ModelType, u32, FakeInference)>,
    ) -> Pipeline {
        Self::start_custom(store, instances, settings()).await
    }

    async fn start_custom(
        store: MemoryStore,
        instances: Vec<(&str, ModelType, u32, FakeInference)>,
        settings: PipelineSettings,
    ) -> Pipeline {
        let results = MemoryResults::new();
        let instances = instances
            .into_iter()
            .map(|(name, model, window, client)| {
                InstanceSpec::external(name, model, window, Arc::new(client))
            })
            .collect();
        let shared = Arc::new(results.clone());
        let feeder = spawn_feeder(feeder_args(
            &store,
            shared,
            instances,
            "test-host",
            settings,
        ))
        .await;
        Pipeline {
            store,
            results,
            feeder,
        }
    }

    async fn submit(&self, model: ModelType, n: usize) -> Vec<JobId> {
        let jobs = (0..n)
            .map(|i| job(model, &format!("{model}-{i}-{}", rand_tag())))
            .collect();
        submit(&self.feeder, jobs).await
    }

    fn count(&self, status: JobStatus) -> usize {
        common::count(&self.store, status)
    }

    async fn dispatcher(&self, instance: &str) -> ActorRef<DispatchMsg> {
        let all = ask(&self.feeder, |r| FeederMsg::Dispatchers { reply: r }).await;
        all.into_iter()
            .find(|(n, _)| n == instance)
            .expect("dispatcher")
            .1
    }
}

/// A QueueActor on `store` alone, with a 60 s lease.
async fn spawn_queue(store: &MemoryStore) -> ActorRef<QueueMsg> {
    spawn_queue_with(store, 60, 30, None).await
}

/// A QueueActor on `store` with the test clock, polling every 200 ms, with
/// this lease and reclaim interval. With a `daemon`, it is that daemon's:
/// it releases the daemon's claims at start and beats every second with a
/// 4 s timeout.
async fn spawn_queue_with(
    store: &MemoryStore,
    lease_s: u64,
    reclaim_s: u64,
    daemon: Option<&str>,
) -> ActorRef<QueueMsg> {
    let args = QueueArgs {
        store: store.connect(),
        clock: Arc::new(TokioClock::starting_at(T0)),
        lease: Duration::from_secs(lease_s),
        reclaim_interval: Duration::from_secs(reclaim_s),
        poll_interval: Duration::from_millis(200),
        release_on_start: daemon.map(str::to_string),
        heartbeat: daemon.map(|daemon| {
            let beat = feeder_actors::queue::Heartbeat {
                interval: Duration::from_secs(1),
                timeout: Duration::from_secs(4),
                about: serde_json::json!({"host": daemon}),
            };
            (daemon.to_string(), beat)
        }),
        watch: None,
    };
    Actor::spawn(None, QueueActor, args)
        .await
        .expect("queue actor starts")
        .0
}

/// Claims up to `n` jobs of `model` through the queue actor.
async fn claim_through(
    queue: &ActorRef<QueueMsg>,
    model: ModelType,
    n: usize,
) -> Vec<feeder_actors::ClaimedJob> {
    claim_as(queue, model, n, "o").await
}

/// Claims up to `n` jobs of `model` for `owner` through the queue actor.
async fn claim_as(
    queue: &ActorRef<QueueMsg>,
    model: ModelType,
    n: usize,
    owner: &str,
) -> Vec<feeder_actors::ClaimedJob> {
    match queue
        .call(
            |r| QueueMsg::Claim {
                model,
                n,
                owner: owner.into(),
                order: feeder_actors::ClaimOrder::Plain,
                reply: r,
            },
            None,
        )
        .await
        .unwrap()
    {
        CallResult::Success(Ok(c)) => c,
        other => panic!("{other:?}"),
    }
}

/// A QueueActor on `store` with a recording subscriber to `model`'s
/// `WorkAvailable`, the first one (heard at once on subscribing) taken.
async fn subscribed_queue(
    store: &MemoryStore,
    model: ModelType,
) -> (
    ActorRef<QueueMsg>,
    tokio::sync::mpsc::UnboundedReceiver<WorkAvailable>,
) {
    let queue = spawn_queue(store).await;
    let (dispatcher, mut heard) = Recorder::<WorkAvailable>::spawn().await;
    queue
        .cast(QueueMsg::Subscribe {
            model,
            subscriber: dispatcher.get_derived(),
        })
        .unwrap();
    assert_eq!(
        heard.recv().await,
        Some(WorkAvailable),
        "a subscriber is woken at once"
    );
    (queue, heard)
}

fn rand_tag() -> String {
    hex::encode(rand::random::<[u8; 4]>())
}

#[tokio::test(start_paused = true)]
async fn the_window_stays_full_and_refills_one_slot_at_a_time() {
    let server = FakeInference::gated();
    let p = Pipeline::start(vec![("v", ModelType::Vision, 4, server.clone())]).await;
    p.submit(ModelType::Vision, 10).await;
    wait_until("4 requests are in flight", LIMIT, || {
        server.in_flight() == 4
    })
    .await;
    // Nothing more is sent while the window is full.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(server.received().len(), 4);
    // One finishes: exactly one more is sent, at once, without waiting for the others.
    server.release(1);
    wait_until("a 5th request arrives", LIMIT, || {
        server.received().len() == 5
    })
    .await;
    assert_eq!(server.in_flight(), 4);
    server.release(100);
    wait_until("all 10 are done", LIMIT, || p.count(JobStatus::Done) == 10).await;
    assert_eq!(server.max_in_flight(), 4);
    for j in p.store.all() {
        let doc = p
            .results
            .doc(j.result_path.as_ref().unwrap())
            .expect("result written");
        assert_eq!(doc["content"], format!("echo {}", j.id));
    }
}

#[tokio::test(start_paused = true)]
async fn errors_are_classified() {
    let server = FakeInference::new();
    server.script([
        Err(InferenceError::Permanent(
            "HTTP 400: prompt too long".into(),
        )),
        Err(InferenceError::Retryable("HTTP 500: boom".into())),
    ]);
    let p = Pipeline::start(vec![("t", ModelType::Think, 1, server.clone())]).await;
    let ids = p.submit(ModelType::Think, 2).await;
    wait_until("one failed and one done", LIMIT, || {
        p.count(JobStatus::Failed) == 1 && p.count(JobStatus::Done) == 1
    })
    .await;
    let first = p.store.get(ids[0]).unwrap().unwrap();
    assert_eq!(first.status, JobStatus::Failed);
    assert_eq!(first.attempts, 1);
    assert_eq!(first.error.as_deref(), Some("HTTP 400: prompt too long"));
    // The 500 was retried after its backoff and then succeeded.
    let second = p.store.get(ids[1]).unwrap().unwrap();
    assert_eq!((second.status, second.attempts), (JobStatus::Done, 2));
    assert_eq!(server.received(), vec![ids[0], ids[1], ids[1]]);
}

#[tokio::test(start_paused = true)]
async fn overload_releases_the_job_narrows_the_window_and_widens_again() {
    let server = FakeInference::new().with_latency(Duration::from_millis(100));
    server.script([Err(InferenceError::Overloaded {
        message: "HTTP 429: too many requests".into(),
        retry_after: None,
    })]);
    let p = Pipeline::start(vec![("t", ModelType::Think, 8, server.clone())]).await;
    let d = p.dispatcher("t").await;
    let ids = p.submit(ModelType::Think, 1).await;
    wait_until("the 429 narrowed the window", LIMIT, || {
        server.received().len() == 1
    })
    .await;
    let narrowed = loop {
        let s = ask(&d, |r| DispatchMsg::Status { reply: r }).await;
        if s.overloaded == 1 {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    assert_eq!(narrowed.window, 4);
    // The job came back without an attempt counted, and ran again after the pause.
    wait_until("the job is done", LIMIT, || p.count(JobStatus::Done) == 1).await;
    let j = p.store.get(ids[0]).unwrap().unwrap();
    assert_eq!(j.attempts, 1, "the 429 was not counted as an attempt");
    // Successes widen the window back.
    p.submit(ModelType::Think, 60).await;
    wait_until("61 done", LIMIT, || p.count(JobStatus::Done) == 61).await;
    let s = ask(&d, |r| DispatchMsg::Status { reply: r }).await;
    assert_eq!(s.window, 8);
}

#[tokio::test(start_paused = true)]
async fn nothing_is_sent_to_an_instance_that_is_not_ready() {
    let server = FakeInference::new();
    server.set_healthy(false);
    let p = Pipeline::start(vec![("v", ModelType::Vision, 4, server.clone())]).await;
    p.submit(ModelType::Vision, 3).await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(server.received().is_empty());
    server.set_healthy(true);
    wait_until("all done once ready", LIMIT, || {
        p.count(JobStatus::Done) == 3
    })
    .await;
}

/// A pipeline with one vision instance of window 3 on a gated server, and
/// 3 jobs in flight on it.
async fn three_in_flight() -> (FakeInference, Pipeline, Vec<JobId>) {
    let server = FakeInference::gated();
    let p = Pipeline::start(vec![("v", ModelType::Vision, 3, server.clone())]).await;
    let ids = p.submit(ModelType::Vision, 3).await;
    wait_until("3 in flight", LIMIT, || server.in_flight() == 3).await;
    (server, p, ids)
}

#[tokio::test(start_paused = true)]
async fn a_panicking_dispatcher_is_restarted_and_its_jobs_return_to_pending() {
    let (server, p, ids) = three_in_flight().await;
    let before = p.dispatcher("v").await;
    before.cast(DispatchMsg::InjectPanic).unwrap();
    // The crashed dispatcher's requests are aborted and its jobs released;
    // the restarted one claims them again.
    wait_until("the requests are sent again", LIMIT, || {
        server.received().len() == 6
    })
    .await;
    let after = p.dispatcher("v").await;
    assert_ne!(before.get_id(), after.get_id(), "a new dispatcher runs");
    for id in &ids {
        let j = p.store.get(*id).unwrap().unwrap();
        assert_eq!(j.status, JobStatus::Processing);
        assert_eq!(j.attempts, 0, "the crash was not counted against the job");
        assert!(
            j.claimed_by.as_deref().unwrap().ends_with("/v/2"),
            "{:?}",
            j.claimed_by
        );
    }
    server.release(100);
    wait_until("all done", LIMIT, || p.count(JobStatus::Done) == 3).await;
    assert_eq!(p.count(JobStatus::Failed), 0);
}

#[tokio::test(start_paused = true)]
async fn a_queue_restarted_while_results_come_back_settles_them_once_without_a_lease() {
    let (server, p, ids) = three_in_flight().await;
    let queue = peers(&p.feeder, Duration::from_secs(5))
        .await
        .expect("the supervisor answers")
        .queue;
    queue.cast(QueueMsg::InjectPanic).unwrap();
    wait_until("the queue is down", LIMIT, || {
        queue.get_status() == ractor::ActorStatus::Stopped
    })
    .await;
    // The requests finish while no queue runs: their results are written,
    // their settlements have nowhere to go yet.
    let start = tokio::time::Instant::now();
    server.release(3);
    wait_until("all done", LIMIT, || p.count(JobStatus::Done) == 3).await;
    let took = start.elapsed();
    let lease = settings().lease;
    assert!(
        took < lease / 10,
        "settled after {took:?}: the lease ({lease:?}) did it, not the dispatcher"
    );
    assert_eq!(server.received().len(), 3, "no request was sent twice");
    assert_eq!(p.results.writes(), 3, "no result was written twice");
    for id in &ids {
        let j = p.store.get(*id).unwrap().unwrap();
        assert_eq!(j.attempts, 1);
    }
    let after = peers(&p.feeder, Duration::from_secs(5))
        .await
        .unwrap()
        .queue;
    assert_ne!(queue.get_id(), after.get_id(), "a new queue runs");
}

#[tokio::test(start_paused = true)]
async fn shutdown_lets_requests_finish_then_releases_the_rest() {
    let server = FakeInference::gated();
    let p = Pipeline::start(vec![("v", ModelType::Vision, 4, server.clone())]).await;
    p.submit(ModelType::Vision, 8).await;
    wait_until("4 in flight", LIMIT, || server.in_flight() == 4).await;
    // Two requests finish during the grace period, two never do.
    let s = server.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        s.release(2);
    });
    let report = ask(&p.feeder, |r| FeederMsg::Shutdown {
        grace: Duration::from_secs(10),
        reply: r,
    })
    .await;
    assert_eq!(report.released, 2);
    assert_eq!(p.count(JobStatus::Done), 2);
    assert_eq!(p.count(JobStatus::Pending), 6);
    assert_eq!(p.count(JobStatus::Processing), 0);
    // Nothing new was claimed once the shutdown began.
    assert_eq!(server.received().len(), 4);
}

#[tokio::test(start_paused = true)]
async fn a_previous_runs_claims_are_released_at_start() {
    let store = MemoryStore::new();
    for i in 0..3 {
        store
            .submit(job(ModelType::Think, &format!("old{i}")), T0)
            .unwrap();
    }
    let dead = store
        .claim(
            ModelType::Think,
            3,
            Duration::from_secs(3600),
            "test-host/t/1",
            T0,
        )
        .unwrap();
    assert_eq!(dead.len(), 3);
    let server = FakeInference::new();
    let p = Pipeline::start_with(store, vec![("t", ModelType::Think, 4, server.clone())]).await;
    // Long before the hour-long leases expire.
    wait_until("the old claims ran", Duration::from_secs(10), || {
        p.count(JobStatus::Done) == 3
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn the_queue_actor_claims_settles_and_releases() {
    let store = MemoryStore::new();
    let (queue, mut heard) = subscribed_queue(&store, ModelType::Vision).await;

    // Another program inserts: the change-token poll wakes the subscriber.
    store.submit(job(ModelType::Vision, "a"), T0).unwrap();
    store.submit(job(ModelType::Vision, "b"), T0).unwrap();
    store.submit(job(ModelType::Vision, "c"), T0).unwrap();
    assert!(matches!(heard.recv().await, Some(WorkAvailable)));

    let claimed = claim_through(&queue, ModelType::Vision, 3).await;
    assert_eq!(claimed.len(), 3);
    let done = Completion {
        result_path: feeder_actors::ResultRef::file(std::path::Path::new("/results/a.json")),
        prompt_tokens: None,
        completion_tokens: None,
        latency: Duration::from_millis(5),
    };
    let settle = |i: usize, s: Settle| QueueMsg::Settle {
        claim: claimed[i].claim.clone(),
        settle: s,
        model: ModelType::Vision,
        parent: None,
        follow_up: false,
        ack: None,
    };
    queue.cast(settle(0, Settle::Complete(done))).unwrap();
    queue
        .cast(settle(
            1,
            Settle::Fail(feeder_actors::Failure {
                message: "x".into(),
                retry_after: None,
            }),
        ))
        .unwrap();
    queue.cast(settle(2, Settle::Release)).unwrap();
    queue
        .call(|r| QueueMsg::Flush { reply: r }, None)
        .await
        .unwrap();
    let status = |i: usize| store.get(claimed[i].job.id).unwrap().unwrap().status;
    assert_eq!(
        (status(0), status(1), status(2)),
        (JobStatus::Done, JobStatus::Failed, JobStatus::Pending)
    );
    // The release woke the model's dispatcher.
    assert_eq!(heard.recv().await, Some(WorkAvailable));
}

/// Waits for the next `Wake` a recorder hears, skipping other messages.
async fn next_wake(heard: &mut tokio::sync::mpsc::UnboundedReceiver<WorkAvailable>) {
    let wake = tokio::time::timeout(LIMIT, heard.recv())
        .await
        .unwrap_or_else(|_| panic!("no wake within {LIMIT:?}"));
    assert_eq!(wake, Some(WorkAvailable));
}

#[tokio::test(start_paused = true)]
async fn a_run_at_set_by_another_program_wakes_the_dispatcher_when_it_comes_due() {
    let store = MemoryStore::new();
    let (_queue, mut heard) = subscribed_queue(&store, ModelType::Think).await;

    // Another connection (a daemon that died since, or another program)
    // leaves a job pending until T0 + 30 s.
    let start = tokio::time::Instant::now();
    store.submit(job(ModelType::Think, "later"), T0).unwrap();
    let c = store
        .claim(ModelType::Think, 1, Duration::from_secs(60), "gone", T0)
        .unwrap()
        .pop()
        .unwrap()
        .claim;
    store
        .fail(
            &c,
            feeder_actors::Failure {
                message: "HTTP 500".into(),
                retry_after: Some(Duration::from_secs(30)),
            },
            T0,
        )
        .unwrap();
    // The change is noticed by the poll (a dispatcher would claim nothing)...
    next_wake(&mut heard).await;
    assert!(start.elapsed() < Duration::from_secs(1));
    // ...and the next wake comes when the job is due, not at some later poll.
    next_wake(&mut heard).await;
    let woke = start.elapsed();
    assert!(
        woke >= Duration::from_secs(30) && woke <= Duration::from_millis(30_200),
        "woken {woke:?} after the job was left due at 30 s"
    );
    // A claim now gets it.
    let got = store
        .claim(ModelType::Think, 1, Duration::from_secs(60), "o", T0 + woke)
        .unwrap();
    assert_eq!(got.len(), 1);
}

/// The indexes of a merged result's fragments, in the order it lists them.
fn fragment_order(merged: &serde_json::Value) -> Vec<u64> {
    merged["fragments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["index"].as_u64().unwrap())
        .collect()
}

#[tokio::test(start_paused = true)]
async fn fan_in_completes_a_parent_exactly_once_whatever_the_order() {
    let store = MemoryStore::new();
    let results = MemoryResults::new();
    let queue = spawn_queue(&store).await;
    let frags = (0..4)
        .map(|i| job(ModelType::Think, &format!("f{i}")))
        .collect();
    let parent = store
        .submit_parent(job(ModelType::Think, "parent"), frags, T0)
        .unwrap()
        .id;
    let (fanin, _) = Actor::spawn(
        None,
        FanInActor,
        FanInArgs {
            queue: queue.clone(),
            results: Arc::new(results.clone()),
            scan_interval: Duration::from_secs(3600),
            call_timeout: Duration::from_secs(5),
            min_success_ratio: 1.0,
        },
    )
    .await
    .unwrap();
    let claimed = store
        .claim(ModelType::Think, 4, Duration::from_secs(60), "o", T0)
        .unwrap();
    // Fragments finish out of order, each followed by several checks (the
    // actor takes them one at a time): only the check after the last one
    // may complete the parent, and only once.
    for i in [2usize, 0, 3, 1] {
        let c = &claimed[i];
        let doc = JobResult {
            id: c.job.id,
            model_type: ModelType::Think,
            content: format!("part {i}"),
            prompt_tokens: Some(1),
            completion_tokens: Some(2),
            latency_ms: Some(1),
            fragments: vec![],
            missing: vec![],
            response: None,
        };
        let path = results
            .write(c.job.id, serde_json::to_vec(&doc).unwrap())
            .await
            .unwrap();
        let done = Completion {
            result_path: path,
            prompt_tokens: Some(1),
            completion_tokens: Some(2),
            latency: Duration::ZERO,
        };
        store.complete(&c.claim, done, T0).unwrap();
        for _ in 0..3 {
            fanin.cast(FanInMsg::Check(parent)).unwrap();
        }
    }
    fanin.cast(FanInMsg::Scan(Scan::now())).unwrap();
    wait_until("the parent is done", LIMIT, || {
        store.get(parent).unwrap().unwrap().status == JobStatus::Done
    })
    .await;
    // Let every queued check and a scan run against the finished parent.
    fanin.cast(FanInMsg::Scan(Scan::now())).unwrap();
    for _ in 0..3 {
        fanin.cast(FanInMsg::Check(parent)).unwrap();
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let p = store.get(parent).unwrap().unwrap();
    // The 4 fragment results written above, and one merged result: a second
    // fan-in of the same parent would write it again.
    assert_eq!(results.writes(), 5, "the merged result was written once");
    let merged = results.doc(p.result_path.as_ref().unwrap()).unwrap();
    assert_eq!(merged["content"], "part 0\npart 1\npart 2\npart 3");
    assert_eq!(fragment_order(&merged), vec![0, 1, 2, 3]);
    assert_eq!(merged["completion_tokens"], 8);
}

/// A server that answers `content` to the first request and refuses the
/// second for good, saying `error`.
fn answers_then_refuses(content: &str, error: &str) -> FakeInference {
    let server = FakeInference::new();
    server.script([
        Ok(content.into()),
        Err(InferenceError::Permanent(error.into())),
    ]);
    server
}

/// Submits a Think parent of two fragments (payloads named after `tag`),
/// waits until the parent reaches `status`, and returns its row.
async fn two_fragments_settle_as(p: &Pipeline, tag: &str, status: JobStatus) -> Job {
    let frags = (0..2)
        .map(|i| job(ModelType::Think, &format!("{tag}{i}")))
        .collect();
    let parent = p
        .store
        .submit_parent(job(ModelType::Think, &format!("{tag}p")), frags, T0)
        .unwrap()
        .id;
    wait_until(&format!("the parent is {status}"), LIMIT, || {
        p.store.get(parent).unwrap().unwrap().status == status
    })
    .await;
    p.store.get(parent).unwrap().unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_parent_fails_naming_its_failed_fragments() {
    let server = answers_then_refuses("fine", "HTTP 400: bad fragment");
    let p = Pipeline::start(vec![("t", ModelType::Think, 1, server)]).await;
    let parent = two_fragments_settle_as(&p, "pf", JobStatus::Failed).await;
    let err = parent.error.unwrap();
    assert!(
        err.starts_with("1 of 2 fragments did not succeed: #1 ("),
        "{err}"
    );
    assert!(err.contains("HTTP 400: bad fragment"), "{err}");
    let listed = p
        .store
        .list(&ListFilter {
            status: Some(JobStatus::Done),
            limit: 10,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(listed.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_done_job_naming_a_next_model_gets_exactly_one_follow_up() {
    let p = Pipeline::start(vec![
        ("v", ModelType::Vision, 4, FakeInference::new()),
        ("t", ModelType::Think, 4, FakeInference::new()),
    ])
    .await;
    let mut first = job(ModelType::Vision, "scan");
    first.then_model = Some(ModelType::Think);
    let id = p.store.submit(first, T0).unwrap().id;
    let follow_up = || {
        p.store
            .all()
            .into_iter()
            .filter(|j| j.follows == Some(id))
            .collect::<Vec<_>>()
    };
    wait_until("the follow-up is done", LIMIT, || {
        follow_up()
            .first()
            .is_some_and(|j| j.status == JobStatus::Done)
    })
    .await;
    // Asking again (as a scan after a restart would) creates nothing new.
    let peers = peers(&p.feeder, Duration::from_secs(5))
        .await
        .expect("the supervisor answers");
    for _ in 0..3 {
        peers.fanin.cast(FanInMsg::FollowUp(id)).unwrap();
        peers.fanin.cast(FanInMsg::Scan(Scan::now())).unwrap();
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let f = follow_up();
    assert_eq!(f.len(), 1);
    // The code asked once: nothing was left for the store's unique rule
    // on `follows` to refuse.
    assert_eq!(p.store.follow_ups_refused(), 0);
    assert_eq!(f[0].model_type, ModelType::Think);
    assert_eq!(f[0].parent_id, None, "a follow-up is not a fragment");
    let payload: serde_json::Value =
        serde_json::from_str(f[0].payload_inline.as_deref().unwrap()).unwrap();
    assert_eq!(
        payload["prompt"],
        format!("echo {id}"),
        "its input is the first job's result"
    );
}

#[tokio::test(start_paused = true)]
async fn min_success_ratio_lets_a_parent_finish_without_some_fragments() {
    let server = answers_then_refuses("kept", "HTTP 400: no");
    let s = PipelineSettings {
        min_success_ratio: 0.5,
        ..settings()
    };
    let p = Pipeline::start_custom(
        MemoryStore::new(),
        vec![("t", ModelType::Think, 1, server)],
        s,
    )
    .await;
    let parent = two_fragments_settle_as(&p, "ms", JobStatus::Done).await;
    let doc = p.results.doc(parent.result_path.as_ref().unwrap()).unwrap();
    assert_eq!(doc["content"], "kept");
    assert_eq!(doc["missing"][0]["index"], 1);
    assert_eq!(doc["missing"][0]["error"], "HTTP 400: no");
}

#[tokio::test(start_paused = true)]
async fn status_says_whether_every_child_answers() {
    let p = Pipeline::start(vec![("v", ModelType::Vision, 2, FakeInference::gated())]).await;
    let status = || async { ask(&p.feeder, |r| FeederMsg::Status { reply: r }).await };
    assert!(status().await.children_answered);
    p.dispatcher("v")
        .await
        .cast(DispatchMsg::InjectPanic)
        .unwrap();
    let mut seen_missing = false;
    for _ in 0..1000 {
        if !status().await.children_answered {
            seen_missing = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(
        seen_missing,
        "a crashed dispatcher is not reported as answering"
    );
    let mut back = false;
    for _ in 0..1000 {
        if status().await.children_answered {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(back, "after its restart every child answers again");
}

/// Real threads and real time: fragments of several parents complete on
/// two dispatchers at once, their settlements group-committed together
/// and their checks interleaved.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fan_in_under_concurrent_completions_finishes_each_parent_once() {
    const PARENTS: usize = 8;
    const FRAGMENTS: usize = 32;
    let p = Pipeline::start(vec![
        ("t1", ModelType::Think, 16, FakeInference::new()),
        ("t2", ModelType::Think, 16, FakeInference::new()),
    ])
    .await;
    let tag = rand_tag();
    let parents: Vec<JobId> = (0..PARENTS)
        .map(|k| {
            let frags = (0..FRAGMENTS)
                .map(|i| job(ModelType::Think, &format!("cf-{tag}-{k}-{i}")))
                .collect();
            p.store
                .submit_parent(job(ModelType::Think, &format!("cp-{tag}-{k}")), frags, T0)
                .unwrap()
                .id
        })
        .collect();
    wait_until("every parent is done", LIMIT, || {
        parents
            .iter()
            .all(|id| p.store.get(*id).unwrap().unwrap().status == JobStatus::Done)
    })
    .await;
    // (Checks still queued behind the last ones are covered, under paused
    // time, by `fan_in_completes_a_parent_exactly_once_whatever_the_order`.)
    assert_eq!(
        p.results.writes(),
        PARENTS * (FRAGMENTS + 1),
        "each fragment's result and each parent's merged result written once"
    );
    for parent in &parents {
        let job = p.store.get(*parent).unwrap().unwrap();
        let merged = p.results.doc(job.result_path.as_ref().unwrap()).unwrap();
        let mut frags = p.store.fragments(*parent).unwrap();
        frags.sort_by_key(|f| f.fragment_index);
        let expected: Vec<String> = frags.iter().map(|f| format!("echo {}", f.id)).collect();
        assert_eq!(merged["content"], expected.join("\n"), "parent {parent}");
        assert_eq!(
            fragment_order(&merged),
            (0..FRAGMENTS as u64).collect::<Vec<_>>()
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_child_that_does_not_answer_stalls_neither_status_nor_supervision() {
    let p = Pipeline::start(vec![("v", ModelType::Vision, 2, FakeInference::new())]).await;
    let before = peers(&p.feeder, Duration::from_secs(5)).await.unwrap();
    // The dispatcher stops answering for an hour.
    p.dispatcher("v")
        .await
        .cast(DispatchMsg::InjectStall(Duration::from_secs(3600)))
        .unwrap();
    let start = tokio::time::Instant::now();
    let feeder = p.feeder.clone();
    let status = tokio::spawn(async move {
        feeder
            .call(
                |r| FeederMsg::Status { reply: r },
                Some(Duration::from_secs(30)),
            )
            .await
    });
    // While that status is being gathered, a child crashes: the supervisor
    // restarts it at once, not after the status call's timeouts.
    before.queue.cast(QueueMsg::InjectPanic).unwrap();
    loop {
        // (No peers while the queue is down.)
        let now = peers(&p.feeder, Duration::from_secs(30)).await;
        if now.is_some_and(|n| n.queue.get_id() != before.queue.get_id()) {
            break;
        }
        assert!(start.elapsed() < LIMIT, "the queue was never restarted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let restarted = start.elapsed();
    assert!(
        restarted < Duration::from_secs(1),
        "the crashed queue was restarted {restarted:?} later: supervision waited for the status"
    );
    // The status comes within its timeouts, saying a child did not answer.
    let s = match status.await.unwrap().unwrap() {
        CallResult::Success(s) => s,
        other => panic!("{other:?}"),
    };
    let answered = start.elapsed();
    assert!(
        answered <= Duration::from_secs(5),
        "status took {answered:?}"
    );
    assert!(!s.children_answered);
    assert!(
        s.dispatch.is_empty(),
        "the stalled dispatcher is not listed"
    );
    assert_eq!(s.instances.len(), 1, "the others still answered");
}

/// The queue's `JobFinished` events, heard by a recording stand-in: no
/// fan-in, and no other actor's messages, involved.
#[tokio::test(start_paused = true)]
async fn the_queue_publishes_finished_fragments_and_follow_ups_only() {
    let store = MemoryStore::new();
    let queue = spawn_queue(&store).await;
    let (fanin, mut heard) = Recorder::<JobFinished>::spawn().await;
    queue
        .cast(QueueMsg::SubscribeFinished(fanin.get_derived()))
        .unwrap();
    let parent = store
        .submit_parent(
            job(ModelType::Think, "p"),
            vec![job(ModelType::Think, "frag")],
            T0,
        )
        .unwrap()
        .id;
    let mut staged = job(ModelType::Think, "staged");
    staged.then_model = Some(ModelType::Vision);
    let staged = store.submit(staged, T0).unwrap().id;
    let plain = store.submit(job(ModelType::Think, "plain"), T0).unwrap().id;
    let claimed = claim_through(&queue, ModelType::Think, 10).await;
    assert_eq!(claimed.len(), 3);
    for c in &claimed {
        let done = Completion {
            result_path: feeder_actors::ResultRef::parse(format!("/results/{}.json", c.job.id)),
            prompt_tokens: None,
            completion_tokens: None,
            latency: Duration::from_millis(5),
        };
        queue
            .cast(QueueMsg::Settle {
                claim: c.claim.clone(),
                settle: Settle::Complete(done),
                model: ModelType::Think,
                parent: c.job.parent_id,
                follow_up: c.job.then_model.is_some(),
                ack: None,
            })
            .unwrap();
    }
    queue
        .call(|r| QueueMsg::Flush { reply: r }, None)
        .await
        .unwrap();
    let mut events = Vec::new();
    while let Ok(e) = heard.try_recv() {
        events.push(e);
    }
    events.sort_by_key(|e| e.follow_up);
    let frag = claimed.iter().find(|c| c.job.parent_id.is_some()).unwrap();
    assert_eq!(
        events,
        vec![
            JobFinished {
                job: frag.job.id,
                parent: Some(parent),
                follow_up: false,
            },
            JobFinished {
                job: staged,
                parent: None,
                follow_up: true,
            },
        ],
        "nothing for {plain}, a plain job"
    );
}

/// Sends a question about `a`, then submits one about `b` and a second
/// about `a` together, and says which of the two the dispatcher sends next.
async fn sent_after_a_warm_key(prefix_grouping: Option<Duration>) -> &'static str {
    let server = FakeInference::gated();
    let p = Pipeline::start_custom(
        MemoryStore::new(),
        vec![("t", ModelType::Think, 1, server.clone())],
        PipelineSettings {
            prefix_grouping,
            ..settings()
        },
    )
    .await;
    submit(&p.feeder, vec![question("a", 1)]).await;
    wait_until("a1 is sent", LIMIT, || server.received().len() == 1).await;
    // b1 is older than a2 (submitted first, in the same second).
    let ids = submit(&p.feeder, vec![question("b", 1), question("a", 2)]).await;
    let handle = feeder_actors::handle::FeederHandle::new(p.feeder.clone());
    let start = tokio::time::Instant::now();
    while handle.status().await.unwrap().dispatch[0].buffered < 2 {
        assert!(start.elapsed() < LIMIT, "b1 and a2 were never claimed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.release(1);
    wait_until("a second request", LIMIT, || server.received().len() == 2).await;
    server.release(10);
    wait_until("all done", LIMIT, || p.count(JobStatus::Done) == 3).await;
    match server.received()[1] {
        id if id == ids[0] => "b1",
        id if id == ids[1] => "a2",
        other => panic!("{other} was not submitted"),
    }
}

/// With prefix grouping, a job of the key an instance was just sent goes
/// before an older job of another key; without, plain age order.
#[tokio::test(start_paused = true)]
async fn a_dispatcher_claims_the_key_it_just_sent_first() {
    assert_eq!(
        sent_after_a_warm_key(Some(Duration::from_secs(60))).await,
        "a2"
    );
    assert_eq!(sent_after_a_warm_key(None).await, "b1");
}

/// A QueueActor for daemon `daemon` on `store`, registered with a heartbeat
/// every second and a 4 s timeout.
async fn daemon_queue(store: &MemoryStore, daemon: &str) -> ActorRef<QueueMsg> {
    spawn_queue_with(store, 600, 600, Some(daemon)).await
}

/// Two daemons share a store; one stops without a word, holding claims
/// with long leases. The other's heartbeats take them back once the silent
/// one's timeout has passed, and not before.
#[tokio::test(start_paused = true)]
async fn a_silent_daemons_claims_come_back_through_another_daemons_heartbeat() {
    let store = MemoryStore::new();
    let a = daemon_queue(&store, "host-a").await;
    let b = daemon_queue(&store, "host-b").await;
    let s = store.connect();
    for i in 0..3 {
        s.submit(job(ModelType::Think, &format!("hb{i}")), T0)
            .await
            .unwrap();
    }
    let claimed = claim_as(&a, ModelType::Think, 2, "host-a/think/0").await;
    assert_eq!(claimed.len(), 2);
    let names: Vec<String> = s
        .daemons(T0)
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.daemon_id)
        .collect();
    assert_eq!(names, ["host-a", "host-b"]);
    a.stop(None);
    let stopped = tokio::time::Instant::now();
    let processing = || {
        store
            .all()
            .iter()
            .filter(|j| j.status == JobStatus::Processing)
            .count()
    };
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(processing(), 2, "within the timeout, the claims hold");
    wait_until("host-a's claims are pending again", LIMIT, || {
        processing() == 0
    })
    .await;
    let after = stopped.elapsed();
    assert!(
        after <= Duration::from_secs(6),
        "taken back after {after:?}"
    );
    let names: Vec<String> = s
        .daemons(T0 + after)
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.daemon_id)
        .collect();
    assert_eq!(names, ["host-b"]);
    b.stop(None);
}
