//! The `JobStore` contract suite against the PostgreSQL adapter, on a real
//! PostgreSQL server started for this test binary; each test gets a
//! database of its own, and each "handle" is a separate store with its own
//! pool, as a second daemon would have. The contract sets the time, so
//! these stores read the caller's clock; the tests after the suite check
//! what only PostgreSQL does: the database's clock, notifications from
//! rows any program inserts, concurrent fan-in, and clear connection
//! errors.

mod common;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use feeder_actors::testkit::store_contract::StoreFixture;
use feeder_actors::{JobStore, ModelType, NewJob, Payload, StoreError, Timestamp};
use gpu_feeder::store::pg::{Clock, Patience, PgStore};

use common::pg::PgServer;

fn server() -> &'static PgServer {
    static SERVER: OnceLock<PgServer> = OnceLock::new();
    SERVER.get_or_init(PgServer::start)
}

struct PgFixture {
    url: String,
}

impl PgFixture {
    fn new() -> Self {
        PgFixture {
            url: server().fresh_db(),
        }
    }
}

#[async_trait::async_trait]
impl StoreFixture for PgFixture {
    async fn handle(&self) -> Arc<dyn JobStore> {
        Arc::new(
            PgStore::connect(&self.url, Clock::Caller, Patience::FailFast)
                .await
                .expect("connect"),
        )
    }
}

feeder_actors::store_contract_tests!(PgFixture::new());

fn job(model: ModelType, tag: &str) -> NewJob {
    NewJob::new(
        model,
        Payload::Inline(format!("{{\"prompt\":\"{tag}\"}}")),
        format!("sha-{tag}"),
    )
}

async fn db_store(url: &str) -> PgStore {
    PgStore::connect(url, Clock::Database, Patience::FailFast)
        .await
        .expect("connect")
}

/// In service, leases and backoffs are judged by the database's clock: a
/// host whose clock is a year off claims with a lease that ends
/// `lease` after the server's now, and cannot reclaim it early.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_are_judged_by_the_database_clock() {
    let url = server().fresh_db();
    let s = db_store(&url).await;
    s.submit(job(ModelType::Think, "clock"), Timestamp::now())
        .await
        .unwrap();
    let wrong = Timestamp::now() + Duration::from_secs(365 * 86_400);
    let claimed = s
        .claim(
            ModelType::Think,
            1,
            Duration::from_secs(300),
            "host-a",
            wrong,
        )
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    let job = s.get(claimed[0].job.id).await.unwrap().unwrap();
    let lease_until = job.lease_until.unwrap();
    let server_now: f64 = server()
        .psql(&url, "SELECT extract(epoch FROM now())")
        .trim()
        .parse()
        .unwrap();
    let left = lease_until.as_secs_f64() - server_now;
    assert!(
        (290.0..=301.0).contains(&left),
        "lease ends {left} s from the server's now"
    );
    // A year "later" by this host's clock, the lease still holds.
    assert_eq!(s.reclaim_expired(wrong).await.unwrap(), 0);
    // A retry backoff is a delay from the caller's now, measured on the server.
    let out = s
        .fail(
            &claimed[0].claim,
            feeder_actors::Failure {
                message: "busy".into(),
                retry_after: Some(Duration::from_secs(60)),
            },
            wrong,
        )
        .await
        .unwrap();
    match out {
        feeder_actors::FailOutcome::Retrying { run_at, .. } => {
            let d = run_at.since(wrong).as_secs_f64();
            assert!(
                (59.0..=60.5).contains(&d),
                "due {d} s after the caller's now"
            );
        }
        other => panic!("{other:?}"),
    }
    let due = s.next_due(ModelType::Think, wrong).await.unwrap().unwrap();
    assert!(due.since(wrong) <= Duration::from_secs(60));
}

/// A row inserted with plain SQL by another program moves a store's change
/// token (the trigger notifies, the store listens); the store's own writes
/// do not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_inserted_with_sql_move_the_change_token() {
    let url = server().fresh_db();
    let s = db_store(&url).await;
    s.listening().await;
    let token = s.change_token().await.unwrap().unwrap();
    s.submit(job(ModelType::Vision, "own"), Timestamp::now())
        .await
        .unwrap();
    assert_eq!(s.change_token().await.unwrap(), Some(token), "own writes");
    server().psql(
        &url,
        "INSERT INTO gpu_jobs (payload_sha256, model_type, payload_path) VALUES ('sql-1', 'think', '/tmp/p.json')",
    );
    let after = s.change_token().await.unwrap().unwrap();
    assert_ne!(
        after, token,
        "a row inserted by psql moves the token at once"
    );
    let row = s
        .list(&feeder_actors::ListFilter {
            status: None,
            model_type: Some(ModelType::Think),
            parent_id: None,
            lease_ended_before: None,
            limit: 10,
        })
        .await
        .unwrap();
    assert_eq!(row.len(), 1);
    assert_eq!(row[0].payload_sha256, "sql-1");
    assert_eq!(row[0].attempts, 0);
}

/// Hosts finishing the same parent at once: exactly one succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_fan_in_finishes_a_parent_once() {
    let url = server().fresh_db();
    let stores: Vec<Arc<PgStore>> =
        futures_util::future::join_all((0..4).map(|_| async { Arc::new(db_store(&url).await) }))
            .await;
    let s = &stores[0];
    let mut parents = Vec::new();
    for p in 0..20 {
        let frags: Vec<NewJob> = (0..3)
            .map(|i| job(ModelType::Think, &format!("p{p}-f{i}")))
            .collect();
        let sub = s
            .submit_parent(
                job(ModelType::Think, &format!("p{p}")),
                frags,
                Timestamp::now(),
            )
            .await
            .unwrap();
        parents.push(sub.id);
    }
    let mut handles = Vec::new();
    for &id in &parents {
        for st in &stores {
            let st = st.clone();
            handles.push(tokio::spawn(async move {
                st.finish_parent(
                    id,
                    feeder_actors::ParentOutcome::Done {
                        result_path: feeder_actors::ResultRef::database(id),
                    },
                    Timestamp::now(),
                )
                .await
                .unwrap()
            }));
        }
    }
    let mut wins = std::collections::HashMap::new();
    for (i, h) in handles.into_iter().enumerate() {
        if h.await.unwrap() {
            *wins.entry(parents[i / stores.len()]).or_insert(0) += 1;
        }
    }
    assert_eq!(wins.len(), parents.len());
    assert!(wins.values().all(|&n| n == 1), "{wins:?}");
}

/// A wrong connection string, or a server that refuses, gets an error that
/// names the server and what to check, never the password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_errors_name_the_server_and_what_to_check() {
    let port = common::free_port();
    let url = format!("postgresql://feeder:s3cret@127.0.0.1:{port}/queue");
    let e = PgStore::connect(&url, Clock::Database, Patience::Reconnect)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains(&format!("feeder@127.0.0.1:{port}/queue")), "{e}");
    assert!(e.contains("check that the server runs"), "{e}");
    assert!(!e.contains("s3cret"), "{e}");
    let missing = server().url().replace("/postgres", "/no_such_db");
    let e = PgStore::connect(&missing, Clock::Database, Patience::FailFast)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("no_such_db") && e.contains("createdb"), "{e}");
    let e = PgStore::connect(
        "postgresql://u@h:notaport/db",
        Clock::Database,
        Patience::FailFast,
    )
    .await
    .unwrap_err();
    assert!(matches!(e, StoreError::Backend(_)), "{e:?}");
    assert!(e.to_string().contains("queue.database_url"), "{e}");
}

/// Result documents in the database: written, rewritten, read back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn result_rows_round_trip() {
    let url = server().fresh_db();
    let s = db_store(&url).await;
    let id = feeder_actors::JobId::random();
    assert_eq!(s.get_result(id).await.unwrap(), None);
    s.put_result(id, b"{\"content\":\"a\"}").await.unwrap();
    s.put_result(id, b"{\"content\":\"b\"}").await.unwrap();
    assert_eq!(
        s.get_result(id).await.unwrap().as_deref(),
        Some(&b"{\"content\":\"b\"}"[..])
    );
}

/// The OpenAI API's tables on PostgreSQL: a batch is held by one daemon at
/// a time (a second store, as another daemon, cannot take it until the
/// first lets go or its connection dies), its lines are recorded once
/// however often they are added, and a compare-and-set update loses to a
/// daemon that moved the batch on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_batches_are_held_by_one_daemon_at_a_time() {
    use gpu_feeder::store::api::{ApiStore, BatchRow, LineJob};
    let url = server().fresh_db();
    let (east, west) = (db_store(&url).await, db_store(&url).await);
    let held = east.lock_batch("batch_1").await.unwrap().expect("free");
    assert!(west.lock_batch("batch_1").await.unwrap().is_none());
    assert!(
        west.lock_batch("batch_2").await.unwrap().is_some(),
        "another batch is free"
    );
    drop(held);
    let mut again = None;
    for _ in 0..100 {
        again = west.lock_batch("batch_1").await.unwrap();
        if again.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(again.is_some(), "released when dropped");

    let row = BatchRow {
        id: "batch_1".into(),
        status: "validating".into(),
        input_file_id: "file-1".into(),
        created_at: 1,
        doc: serde_json::json!({"id": "batch_1"}),
    };
    east.insert_batch(row.clone()).await.unwrap();
    let lines: Vec<LineJob> = (1..=3)
        .map(|i| LineJob {
            line: i,
            custom_id: format!("c-{i}"),
            job_id: feeder_actors::JobId::random(),
        })
        .collect();
    east.add_lines("batch_1", lines.clone()).await.unwrap();
    west.add_lines("batch_1", lines.clone()).await.unwrap();
    assert_eq!(west.lines("batch_1").await.unwrap(), lines);
    let counts = west.line_counts("batch_1").await.unwrap();
    assert_eq!(
        (counts.total, counts.failed),
        (3, 3),
        "jobs not in the queue count as failed"
    );
    let moved = BatchRow {
        status: "in_progress".into(),
        ..row.clone()
    };
    assert!(east
        .update_batch("validating", moved.clone())
        .await
        .unwrap());
    assert!(!west.update_batch("validating", moved).await.unwrap());
    assert_eq!(
        west.batches_in(&["in_progress"]).await.unwrap().len(),
        1,
        "both see it moved on"
    );
}

/// A grouped claim reads its candidates, then takes them: when another
/// daemon takes (here: holds locked) the rows it chose in between, it
/// takes the next pending rows instead, so that a claim short of what was
/// asked still means that no more work is there (a dispatcher waits for
/// news after one; before this, two daemons on one queue could both wait
/// with hundreds of jobs pending).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grouped_claim_that_loses_its_rows_takes_the_next_ones() {
    use feeder_actors::prefix::{ClaimOrder, Grouping};
    use feeder_actors::store::ClaimRequest;
    let url = server().fresh_db();
    let s = db_store(&url).await;
    for i in 0..30 {
        s.submit(job(ModelType::Think, &format!("g{i:02}")), Timestamp::now())
            .await
            .unwrap();
    }
    // Another daemon's claim in flight: the ten oldest rows locked.
    let (other, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    other.batch_execute("BEGIN").await.unwrap();
    let locked = other
        .query(
            "SELECT seq FROM gpu_jobs WHERE status = 'pending' ORDER BY priority DESC, created_at, seq LIMIT 10 FOR UPDATE",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(locked.len(), 10);
    let want = ClaimRequest {
        model: ModelType::Think,
        n: 10,
        lease: Duration::from_secs(60),
        owner: "east".into(),
        order: ClaimOrder::Grouped(Grouping {
            warm: Vec::new(),
            max_wait: Duration::from_secs(60),
        }),
    };
    let got = s.claim_with(&want, Timestamp::now()).await.unwrap();
    assert_eq!(got.len(), 10, "the next ten pending rows, not none");
    let held: Vec<i64> = locked.iter().map(|r| r.get(0)).collect();
    let taken = server().psql(
        &url,
        "SELECT seq FROM gpu_jobs WHERE status = 'processing' ORDER BY seq",
    );
    for seq in taken.lines() {
        let seq: i64 = seq.trim().parse().unwrap();
        assert!(
            !held.contains(&seq),
            "row {seq} was held by the other claim"
        );
    }
    other.batch_execute("ROLLBACK").await.unwrap();
}
