//! Priorities at the dispatcher, at message level: claims come highest
//! priority first, and the few claimed jobs a dispatcher keeps ready are
//! kept in that order, so a job submitted with a higher priority overtakes
//! bulk jobs that were claimed before it, within a few completions. The
//! real FeederSupervisor and its dispatcher, the in-memory store, a gated
//! server that finishes a request only when the test lets it, under paused
//! time.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use common::{count, feeder_args, feeder_status, spawn_feeder, LIMIT, T0};
use feeder_actors::spec::InstanceSpec;
use feeder_actors::supervisor::PipelineSettings;
use feeder_actors::testkit::store_contract::job;
use feeder_actors::testkit::{submit, wait_until, FakeInference, MemoryResults, MemoryStore};
use feeder_actors::{BlockingJobStore, JobId, JobStatus, ModelType, NewJob};

const WINDOW: u32 = 8;

/// Submits one think job of priority 10, above the bulk; its id.
async fn submit_urgent(feeder: &ractor::ActorRef<feeder_actors::supervisor::FeederMsg>) -> JobId {
    let urgent = NewJob {
        priority: 10,
        ..job(ModelType::Think, "urgent")
    };
    submit(feeder, vec![urgent]).await[0]
}
const BULK: usize = 100;

#[tokio::test(start_paused = true)]
async fn a_higher_priority_job_overtakes_the_claimed_bulk_within_a_few_completions() {
    let store = MemoryStore::new();
    let bulk = (0..BULK)
        .map(|i| job(ModelType::Think, &format!("bulk-{i}")))
        .collect();
    store.submit_batch(bulk, T0).unwrap();
    let server = FakeInference::gated();
    let think = InstanceSpec::external("think", ModelType::Think, WINDOW, Arc::new(server.clone()));
    let settings = PipelineSettings {
        health_interval: Duration::from_secs(1),
        ..PipelineSettings::default()
    };
    let results = Arc::new(MemoryResults::new());
    let feeder = spawn_feeder(feeder_args(&store, results, vec![think], "host", settings)).await;

    // A window in flight, and the dispatcher's few ready jobs claimed.
    let dispatch = || async {
        feeder_status(&feeder)
            .await
            .dispatch
            .into_iter()
            .find(|d| d.instance == "think")
            .expect("the dispatcher runs")
    };
    let deadline = tokio::time::Instant::now() + LIMIT;
    let buffered = loop {
        let d = dispatch().await;
        if d.in_flight == WINDOW as usize && d.buffered > 0 {
            break d.buffered;
        }
        assert!(tokio::time::Instant::now() < deadline, "never full: {d:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // The bulk jobs claimed but not sent: the ones the urgent job must pass.
    let sent: HashSet<JobId> = server.received().into_iter().collect();
    let waiting_ready: Vec<JobId> = store
        .all()
        .into_iter()
        .filter(|j| j.status == JobStatus::Processing && !sent.contains(&j.id))
        .map(|j| j.id)
        .collect();
    assert_eq!(waiting_ready.len(), buffered, "claimed, not sent");

    let urgent = submit_urgent(&feeder).await;

    // One completion at a time, until the urgent job reaches the server.
    let mut completions = 0;
    while !server.received().contains(&urgent) {
        assert!(
            completions < BULK,
            "the urgent job was never sent: {:?}",
            store.get(urgent)
        );
        let before = server.received().len();
        server.release(1);
        completions += 1;
        wait_until("the freed slot is refilled", LIMIT, || {
            server.received().len() > before
        })
        .await;
    }
    let order = server.received();
    let at = order.iter().position(|id| *id == urgent).unwrap();
    let overtaken = waiting_ready
        .iter()
        .filter(|id| !order[..at].contains(id))
        .count();
    println!(
        "urgent sent after {completions} completions; it overtook {overtaken} of the {buffered} bulk jobs ready before it came"
    );
    // Within a few completions: no more than the jobs ready before it.
    assert!(
        completions <= buffered,
        "{completions} completions before the urgent job, {buffered} were ready"
    );
    // And ahead of bulk jobs claimed before it was submitted.
    assert!(
        overtaken >= 1,
        "the urgent job waited behind every bulk job claimed before it: {completions} completions"
    );
    server.release(BULK + 1);
    wait_until("all done", LIMIT, || {
        count(&store, JobStatus::Done) == BULK + 1
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_higher_priority_job_takes_back_the_young_bulk_and_it_runs_after() {
    // Window 4. Each request takes 10 s once let through: the hold learns
    // a request lifetime of 10 s from the first four. Four more are sent; 1 s later an urgent
    // job comes: the four, younger than a lifetime, are taken back (their
    // requests dropped, their jobs pending again with no attempt counted),
    // so the urgent request runs alone; the bulk runs after it.
    let store = MemoryStore::new();
    let server = FakeInference::gated().with_latency(Duration::from_secs(10));
    let think = InstanceSpec::external("think", ModelType::Think, 4, Arc::new(server.clone()));
    let settings = PipelineSettings {
        health_interval: Duration::from_secs(1),
        ..PipelineSettings::default()
    };
    let results = Arc::new(MemoryResults::new());
    let feeder = spawn_feeder(feeder_args(&store, results, vec![think], "host", settings)).await;
    let bulk = |tag: &str| {
        (0..4)
            .map(|i| job(ModelType::Think, &format!("{tag}-{i}")))
            .collect::<Vec<_>>()
    };
    submit(&feeder, bulk("old")).await;
    wait_until("4 in flight", LIMIT, || server.in_flight() == 4).await;
    server.release(4);
    wait_until("4 done", LIMIT, || count(&store, JobStatus::Done) == 4).await;
    let young = submit(&feeder, bulk("young")).await;
    wait_until("4 more in flight", LIMIT, || server.in_flight() == 4).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let urgent = submit_urgent(&feeder).await;
    wait_until("the urgent request runs alone", LIMIT, || {
        server.in_flight() == 1 && server.received().contains(&urgent)
    })
    .await;
    // Back in the queue (one of them may be claimed again into the
    // dispatcher's few ready jobs, held there while the urgent one runs).
    for id in &young {
        let j = store.get(*id).unwrap().unwrap();
        assert!(
            matches!(j.status, JobStatus::Pending | JobStatus::Processing),
            "{j:?}"
        );
        assert_eq!(
            (j.attempts, j.crashes),
            (0, 0),
            "taken back, not failed: {j:?}"
        );
    }
    let d = feeder_status(&feeder).await.dispatch.remove(0);
    assert_eq!(d.recalled, 4, "{d:?}");
    server.release(1);
    wait_until("the urgent job done", LIMIT, || {
        store.get(urgent).unwrap().unwrap().status == JobStatus::Done
    })
    .await;
    server.release(100);
    wait_until("all done", LIMIT, || count(&store, JobStatus::Done) == 9).await;
    for id in &young {
        assert_eq!(store.get(*id).unwrap().unwrap().attempts, 1);
    }
}
