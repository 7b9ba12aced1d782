//! Queue throughput: claim + complete in jobs/s, one job per transaction and
//! batched, with 10k and with 1M jobs pending. Prints figures; asserts nothing.
//!
//!     cargo bench --bench queue                 # 10k and 1M pending
//!     cargo bench --bench queue -- 10000        # chosen backlog sizes

use std::path::PathBuf;
use std::time::{Duration, Instant};

use feeder_actors::{BlockingJobStore, Completion, ModelType, NewJob, Payload, Settle, Timestamp};
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
        result_path: PathBuf::from("/var/lib/gpu-feeder/results/x.json"),
        prompt_tokens: Some(100),
        completion_tokens: Some(200),
        latency: Duration::from_millis(150),
    }
}

/// Claims and completes `total` jobs, `batch` at a time; jobs/s.
fn run(store: &SqliteStore, total: usize, batch: usize) -> f64 {
    let start = Instant::now();
    let mut finished = 0;
    while finished < total {
        let now = Timestamp::now();
        let claimed = store
            .claim(ModelType::Vision, batch, LEASE, "bench", now)
            .expect("claim");
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
        "{:>10}  {:>10}  {:>14}  {:>14}  {:>14}",
        "pending", "fill s", "1/tx jobs/s", "batch 16/tx", "batch 64/tx"
    );
    for n in sizes {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = SqliteStore::open(&dir.path().join("bench.db")).expect("open");
        let fill_time = fill(&store, n);
        // Half the jobs are vision; measure on a slice of them so the backlog
        // stays about n deep throughout.
        let single = run(&store, 2_000.min(n / 4), 1);
        let b16 = run(&store, 20_000.min(n / 4), 16);
        let b64 = run(&store, 40_000.min(n / 4), 64);
        println!(
            "{:>10}  {:>10.1}  {:>14.0}  {:>14.0}  {:>14.0}",
            n,
            fill_time.as_secs_f64(),
            single,
            b16,
            b64
        );
    }
}
