//! Many hosts: the shared PostgreSQL queue beside SQLite, in one run.
//! Prints figures, asserts nothing.
//!
//!     cargo bench --bench hosts
//!     BENCH_JOBS=50000 cargo bench --bench hosts
//!
//! PostgreSQL is a throwaway server started in a temporary folder, as the
//! tests start it (`FEEDER_PG_BIN` names the binaries' folder if they are
//! not under /usr/lib/postgresql), or the server `BENCH_PG_URL` names.
//!
//! 1. Claim + complete, at the store: workers that each claim 64 jobs and
//!    settle them in one transaction, until the queue is empty; 1 worker
//!    and 3 workers, each with a connection (a pool) of its own, as
//!    separate daemons have.
//! 2. End to end: whole pipelines against simulated servers with zero
//!    latency; SQLite with result files, SQLite with results in the
//!    database, PostgreSQL with 1 and with 3 daemons (each with a server of
//!    its own), all in this one process on this machine's CPUs.

#[allow(dead_code)]
#[path = "../tests/common/pg.rs"]
mod pg;

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use feeder_actors::prefix::ClaimOrder;
use feeder_actors::{
    Blocking, ClaimRequest, Completion, JobStore, ModelType, ResultRef, Settle, Timestamp,
};
use gpu_feeder::config::{ResultsKind, WindowSetting};
use gpu_feeder::daemon::Pipeline;
use gpu_feeder::sim::SimConfig;
use gpu_feeder::store::pg::{Clock, Patience, PgStore};
use gpu_feeder::store::SqliteStore;

async fn fill(store: &Arc<dyn JobStore>, n: usize, tag: &str) {
    let all = common::jobs(n, tag);
    for chunk in all.chunks(1000) {
        store
            .submit_batch(chunk.to_vec(), Timestamp::now())
            .await
            .unwrap();
    }
}

/// Claims and completes until the queue is empty; the jobs it did.
async fn drain(store: Arc<dyn JobStore>, owner: String) -> usize {
    let mut done = 0;
    loop {
        let claimed = store
            .claim_with(
                &ClaimRequest {
                    model: ModelType::Think,
                    n: 64,
                    lease: Duration::from_secs(300),
                    owner: owner.clone(),
                    order: ClaimOrder::Plain,
                },
                Timestamp::now(),
            )
            .await
            .unwrap();
        if claimed.is_empty() {
            return done;
        }
        let items = claimed
            .into_iter()
            .map(|c| {
                let at = ResultRef::database(c.job.id);
                (
                    c.claim,
                    Settle::Complete(Completion {
                        result_path: at,
                        prompt_tokens: Some(10),
                        completion_tokens: Some(10),
                        latency: Duration::from_millis(1),
                    }),
                )
            })
            .collect::<Vec<_>>();
        done += items.len();
        store.settle_batch(items, Timestamp::now()).await.unwrap();
    }
}

async fn sqlite_handle(path: std::path::PathBuf) -> Arc<dyn JobStore> {
    let s = tokio::task::spawn_blocking(move || SqliteStore::open(&path).unwrap())
        .await
        .unwrap();
    Blocking::port(Arc::new(s))
}

async fn pg_handle(url: &str) -> Arc<dyn JobStore> {
    Arc::new(
        PgStore::connect(url, Clock::Database, Patience::FailFast)
            .await
            .unwrap(),
    )
}

async fn claim_complete(n: usize, pg_url: &dyn Fn() -> String) {
    println!(
        "\n1. claim + complete at the store ({n} jobs, 64 per claim, one transaction per batch)"
    );
    println!("   | queue | daemons | jobs/s |");
    println!("   | --- | ---: | ---: |");
    for workers in [1usize, 3] {
        for backend in ["SQLite", "PostgreSQL"] {
            let dir = common::scratch();
            let url = pg_url();
            let mut handles = Vec::new();
            for _ in 0..workers {
                handles.push(match backend {
                    "SQLite" => sqlite_handle(dir.path().join("jobs.db")).await,
                    _ => pg_handle(&url).await,
                });
            }
            fill(&handles[0], n, "cc").await;
            let t0 = Instant::now();
            let tasks: Vec<_> = handles
                .into_iter()
                .enumerate()
                .map(|(i, h)| tokio::spawn(drain(h, format!("host-{i}"))))
                .collect();
            let mut total = 0;
            for t in tasks {
                total += t.await.unwrap();
            }
            let secs = t0.elapsed().as_secs_f64();
            assert_eq!(total, n, "every job claimed once");
            println!("   | {backend} | {workers} | {:.0} |", n as f64 / secs);
        }
    }
}

/// Starts a pipeline on `config`'s queue; returns it once its instance is ready.
async fn pipeline(config: &gpu_feeder::config::Config, owner: &str) -> Pipeline {
    let opened = gpu_feeder::store::open(config, Patience::Reconnect)
        .await
        .unwrap();
    let p = Pipeline::start(config, opened.jobs, opened.results, owner.into(), None)
        .await
        .unwrap();
    let handle = feeder_actors::handle::FeederHandle::new(p.feeder.clone());
    loop {
        if let Ok(s) = handle.status().await {
            if !s.health.is_empty() && s.health.iter().all(|h| h.ready) {
                return p;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn end_to_end(n: usize, pg_url: &dyn Fn() -> String) {
    println!("\n2. end to end against zero-latency simulated servers ({n} jobs, window 64)");
    println!("   | queue | results | daemons | jobs/s |");
    println!("   | --- | --- | ---: | ---: |");
    let cases: [(&str, ResultsKind, usize); 4] = [
        ("SQLite", ResultsKind::Files, 1),
        ("SQLite", ResultsKind::Database, 1),
        ("PostgreSQL", ResultsKind::Database, 1),
        ("PostgreSQL", ResultsKind::Database, 3),
    ];
    for (backend, kind, daemons) in cases {
        let url = pg_url();
        let dirs: Vec<_> = (0..daemons).map(|_| common::scratch()).collect();
        let mut sims = Vec::new();
        let mut pipes = Vec::new();
        let mut reader = None;
        for (i, dir) in dirs.iter().enumerate() {
            let sim = common::engine(SimConfig::default()).await;
            let mut c = common::config(dir.path(), &sim.url(), 16, WindowSetting::Fixed(64));
            c.results.store = Some(kind);
            if backend == "PostgreSQL" {
                c.queue.database_url = Some(url.clone());
            }
            let owner = format!("bench-{i}");
            c.queue.daemon_id = Some(owner.clone());
            if reader.is_none() {
                let opened = gpu_feeder::store::open(&c, Patience::FailFast)
                    .await
                    .unwrap();
                reader = Some(opened.jobs);
            }
            pipes.push(pipeline(&c, &owner).await);
            sims.push(sim);
        }
        let reader = reader.unwrap();
        let t0 = Instant::now();
        fill(&reader, n, "e2e").await;
        loop {
            let s = reader.stats(Timestamp::now()).await.unwrap();
            let c = s.model(ModelType::Think).counts;
            if c.done + c.failed >= n as u64 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let secs = t0.elapsed().as_secs_f64();
        let kind = match kind {
            ResultsKind::Files => "files",
            ResultsKind::Database => "database",
        };
        println!(
            "   | {backend} | {kind} | {daemons} | {:.0} |",
            n as f64 / secs
        );
        for p in pipes {
            p.shutdown(Duration::from_secs(5)).await;
        }
    }
}

fn main() {
    let rt = common::runtime();
    let n = common::env_f64("BENCH_JOBS", 20_000.0) as usize;
    println!(
        "many-hosts benchmark ({} CPUs; every daemon and server in this one process)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let external = std::env::var("BENCH_PG_URL").ok();
    let server = external.is_none().then(pg::PgServer::start);
    // A fresh database for each case (or the given one, emptied).
    let fresh = move || match (&server, &external) {
        (Some(s), _) => s.fresh_db(),
        (None, Some(url)) => {
            // Missing tables (a new database) are no error: they get made.
            let _ = std::process::Command::new("psql")
                .args([
                    "-X",
                    "-q",
                    "-d",
                    url,
                    "-c",
                    "TRUNCATE gpu_jobs, gpu_results, gpu_daemons",
                ])
                .status();
            url.clone()
        }
        (None, None) => unreachable!(),
    };
    rt.block_on(async {
        claim_complete(n, &fresh).await;
        end_to_end(n / 4, &fresh).await;
    });
}
