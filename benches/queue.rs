//! Queue throughput: claim + complete in jobs/s, one job per transaction and
//! batched, with 10k and with 1M jobs pending; and batched claims grouped by
//! prefix key (`dispatch.prefix_grouping`, 32 warm keys), every job of a key
//! of its own: the grouped claim's worst case. Prints figures; asserts
//! nothing.
//!
//!     cargo bench --bench queue                 # 10k and 1M pending
//!     cargo bench --bench queue -- 10000        # chosen backlog sizes

use std::path::PathBuf;
use std::time::{Duration, Instant};

use feeder_actors::{
    BlockingJobStore, ClaimOrder, ClaimRequest, Completion, Grouping, ModelType, NewJob, Payload,
    Settle, Timestamp,
};
use gpu_feeder::store::SqliteStore;

const LEASE: Duration = Duration::from_secs(300);

fn fill(store: &SqliteStore, n: usize) -> Duration {
    let start = Instant::now();
    let now = Timestamp::now();
    let mut i = 0;
    while i < n {
        let batch: Vec<NewJob> = (i..(i + 50_000).min(n))
            .map(|k| {
                NewJob::new(
                    if k % 2 == 0 {
                        ModelType::Vision
                    } else {
                        ModelType::Think
                    },
                    Payload::Inline(format!("{{\"prompt\":\"job {k}\"}}")),
                    format!("{k:064x}"),
                )
            })
            .collect();
        i += batch.len();
        store.submit_batch(batch, now).expect("fill");
    }
    start.elapsed()
}

fn done() -> Completion {
    Completion {
        result_path: PathBuf::from("/var/lib/gpu-feeder/results/x.json").into(),
        prompt_tokens: Some(100),
        completion_tokens: Some(200),
        latency: Duration::from_millis(150),
    }
}

/// Claims and completes `total` jobs, `batch` at a time; jobs/s.
fn run(store: &SqliteStore, total: usize, batch: usize) -> f64 {
    run_in(store, total, batch, &ClaimOrder::Plain)
}

/// `run`, claiming in `order`.
fn run_in(store: &SqliteStore, total: usize, batch: usize, order: &ClaimOrder) -> f64 {
    let start = Instant::now();
    let mut finished = 0;
    let mut warm: Vec<String> = Vec::new();
    while finished < total {
        let now = Timestamp::now();
        let order = match order {
            ClaimOrder::Grouped(g) => ClaimOrder::Grouped(Grouping {
                warm: warm.clone(),
                ..g.clone()
            }),
            ClaimOrder::Plain => ClaimOrder::Plain,
        };
        let claimed = store
            .claim_with(
                &ClaimRequest {
                    model: ModelType::Vision,
                    n: batch,
                    lease: LEASE,
                    owner: "bench".to_string(),
                    order,
                },
                now,
            )
            .expect("claim");
        // The keys just sent, most recent first, as a dispatcher holds them.
        for c in &claimed {
            if let Some(k) = &c.job.prefix_key {
                warm.insert(0, k.clone());
            }
        }
        warm.truncate(32);
        if claimed.is_empty() {
            break;
        }
        finished += claimed.len();
        if batch == 1 {
            for c in claimed {
                store.complete(&c.claim, done(), now).expect("complete");
            }
        } else {
            let items = claimed
                .into_iter()
                .map(|c| (c.claim, Settle::Complete(done())))
                .collect();
            for r in store.settle_batch(items, now).expect("settle batch") {
                r.expect("current claim");
            }
        }
    }
    finished as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sizes = if sizes.is_empty() {
        vec![10_000, 1_000_000]
    } else {
        sizes
    };
    println!("queue benchmark: SQLite WAL, synchronous=NORMAL, claim + complete");
    println!(
        "{:>10}  {:>10}  {:>14}  {:>14}  {:>14}  {:>16}",
        "pending", "fill s", "1/tx jobs/s", "batch 16/tx", "batch 64/tx", "grouped 64/tx"
    );
    for n in sizes {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = SqliteStore::open(&dir.path().join("bench.db")).expect("open");
        let fill_time = fill(&store, n);
        // Half the jobs are vision; measure on a slice of them so the backlog
        // stays about n deep throughout.
        // (Four runs of at most n/8 each leave half the vision jobs.)
        let single = run(&store, 2_000.min(n / 8), 1);
        let b16 = run(&store, 20_000.min(n / 8), 16);
        let b64 = run(&store, 40_000.min(n / 8), 64);
        let grouped = ClaimOrder::Grouped(Grouping {
            warm: Vec::new(),
            max_wait: Duration::from_secs(60),
        });
        let g64 = run_in(&store, 40_000.min(n / 8), 64, &grouped);
        println!(
            "{:>10}  {:>10.1}  {:>14.0}  {:>14.0}  {:>14.0}  {:>16.0}",
            n,
            fill_time.as_secs_f64(),
            single,
            b16,
            b64,
            g64
        );
    }
}
