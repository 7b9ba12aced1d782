//! The priority hold at message level: the real pipeline with one instance
//! behind a gated fake server (each request ends when the test lets it),
//! under paused time. While a job of higher priority than the bulk is in
//! flight, no bulk job is sent in its place; the bulk resumes when it ends,
//! or when the hold runs out. With the hold off, the urgent job waits
//! for a slot like any other and the bulk is sent beside it.

mod common;

use std::sync::Arc;
use std::time::Duration;

use ractor::ActorRef;

use common::{feeder_args, spawn_feeder, LIMIT, T0};
use feeder_actors::spec::InstanceSpec;
use feeder_actors::supervisor::{FeederMsg, PipelineSettings};
use feeder_actors::testkit::{submit, wait_until, FakeInference, MemoryResults, MemoryStore};
use feeder_actors::window::{WindowMode, HOLD_AT_LEAST};
use feeder_actors::{BlockingJobStore, JobId, ModelType, NewJob, Payload};

const WINDOW: u32 = 4;

fn job(tag: &str, priority: i64) -> NewJob {
    let mut j = NewJob::new(
        ModelType::Think,
        Payload::Inline(format!("{{\"prompt\":\"{tag}\"}}")),
        tag.to_string(),
    );
    j.priority = priority;
    j
}

/// A pipeline with `bulk` jobs of priority 0 queued, a window of
/// [`WINDOW`] full of them, and then one job of priority 5 sent (past the
/// full window, once it is claimed): its id.
async fn urgent_sent(server: &FakeInference, bulk: usize) -> (ActorRef<FeederMsg>, JobId) {
    urgent_sent_with(server, bulk, PipelineSettings::default()).await
}

/// [`urgent_sent`] under `settings`.
async fn urgent_sent_with(
    server: &FakeInference,
    bulk: usize,
    settings: PipelineSettings,
) -> (ActorRef<FeederMsg>, JobId) {
    let store = MemoryStore::new();
    store
        .submit_batch(
            (0..bulk).map(|i| job(&format!("bulk-{i}"), 0)).collect(),
            T0,
        )
        .unwrap();
    let think = InstanceSpec::external(
        "think",
        ModelType::Think,
        WindowMode::Fixed(WINDOW),
        Arc::new(server.clone()),
    );
    let results = Arc::new(MemoryResults::new());
    let args = feeder_args(&store, results, vec![think], "test-host", settings);
    let feeder = spawn_feeder(args).await;
    wait_until("the window is full", LIMIT, || {
        server.in_flight() == WINDOW as usize
    })
    .await;
    let urgent = submit(&feeder, vec![job("urgent", 5)]).await[0];
    // Bulk requests end one at a time until the urgent job is claimed
    // (behind the bulk already buffered) and sent.
    for _ in 0..WINDOW * 2 {
        if server.received().contains(&urgent) {
            break;
        }
        let sent = server.received().len();
        server.release(1);
        wait_until("a freed slot is refilled", LIMIT, || {
            server.received().len() > sent
        })
        .await;
    }
    wait_until("the urgent job is sent", LIMIT, || {
        server.received().contains(&urgent)
    })
    .await;
    (feeder, urgent)
}

#[tokio::test(start_paused = true)]
async fn the_bulk_waits_while_an_urgent_job_runs_and_resumes_when_it_ends() {
    let server = FakeInference::gated();
    let (feeder, urgent) = urgent_sent(&server, 40).await;
    let sent = server.received().len();
    // The bulk requests beside it end (the gate lets requests go in the
    // order they came): none is sent in their place.
    server.release(server.in_flight() - 1);
    wait_until("only the urgent request is in flight", LIMIT, || {
        server.in_flight() == 1
    })
    .await;
    tokio::time::sleep(HOLD_AT_LEAST / 2).await;
    assert_eq!(server.received().len(), sent, "the bulk is held");
    assert_eq!(server.received().last(), Some(&urgent));
    // The urgent request ends: the bulk fills the window again at once.
    server.release(1);
    wait_until("the window is full of bulk again", LIMIT, || {
        server.in_flight() == WINDOW as usize
    })
    .await;
    assert_eq!(server.received().len(), sent + WINDOW as usize);
    let handle = feeder_actors::handle::FeederHandle::new(feeder);
    assert_eq!(
        handle.status().await.unwrap().dispatch[0].holds,
        1,
        "one hold, in the status"
    );
}

#[tokio::test(start_paused = true)]
async fn a_hold_runs_out_so_a_long_urgent_job_cannot_starve_the_bulk() {
    let server = FakeInference::gated();
    let (_feeder, urgent) = urgent_sent(&server, 40).await;
    let sent = server.received().len();
    server.release(server.in_flight() - 1);
    wait_until("only the urgent request is in flight", LIMIT, || {
        server.in_flight() == 1
    })
    .await;
    let held_from = tokio::time::Instant::now();
    // The urgent request never ends; the bulk is sent again once the hold
    // has lasted its limit.
    wait_until("the bulk is sent beside the urgent request", LIMIT, || {
        server.in_flight() == WINDOW as usize
    })
    .await;
    assert!(held_from.elapsed() + Duration::from_millis(50) >= HOLD_AT_LEAST);
    assert!(held_from.elapsed() <= HOLD_AT_LEAST * 2);
    assert_eq!(server.received().len(), sent + WINDOW as usize - 1);
    assert!(!server.received()[sent..].contains(&urgent));
}

#[tokio::test(start_paused = true)]
async fn an_urgent_job_does_not_wait_for_a_slot_of_a_full_window() {
    let server = FakeInference::gated();
    let (_feeder, urgent) = urgent_sent(&server, 40).await;
    assert_eq!(server.received().last(), Some(&urgent));
    assert_eq!(
        server.in_flight(),
        WINDOW as usize + 1,
        "sent past the full window"
    );
}

#[tokio::test(start_paused = true)]
async fn with_the_hold_off_the_bulk_is_sent_beside_an_urgent_job() {
    let server = FakeInference::gated();
    let off = PipelineSettings {
        priority_hold: false,
        ..PipelineSettings::default()
    };
    let (feeder, urgent) = urgent_sent_with(&server, 40, off).await;
    assert_eq!(
        server.in_flight(),
        WINDOW as usize,
        "the urgent job waited for a slot"
    );
    let sent = server.received().len();
    // The bulk requests beside it end: each is replaced by another at once,
    // while the urgent one still runs.
    server.release(WINDOW as usize - 1);
    wait_until("the bulk refills the window", LIMIT, || {
        server.received().len() == sent + WINDOW as usize - 1
    })
    .await;
    assert_eq!(server.in_flight(), WINDOW as usize);
    assert!(!server.received()[sent..].contains(&urgent));
    let handle = feeder_actors::handle::FeederHandle::new(feeder);
    assert_eq!(handle.status().await.unwrap().dispatch[0].holds, 0);
}
