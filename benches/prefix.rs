//! Prefix-aware claiming against the engine simulator: prints figures,
//! asserts nothing.
//!
//!     cargo bench --bench prefix
//!     BENCH_TIME_SCALE=10 cargo bench --bench prefix   # a faster clock
//!     BENCH_WINDOW=32 cargo bench --bench prefix       # a fixed window
//!
//! The workload: 100 documents of about 2,000 tokens (8,000 characters of
//! words no other document shares, so that documents share no prefix), 8
//! questions about each, every question a prompt of its document followed
//! by the question: 800 jobs, submitted in shuffled order. One engine, as
//! `gpu-feeder sim --kv-cache-tokens 40960` (2,560 blocks of 16 tokens:
//! about 20 documents) with its default step times (an 8B model on one
//! H100: 6.5 ms a step + 0.05 ms per running request + 32 ms per 1,000
//! prefill tokens; 8,192 tokens a step; 256 requests at most), its clock
//! running `BENCH_TIME_SCALE` (5) times faster than the wall clock; 64
//! tokens out per question. The same run twice, `dispatch.prefix_grouping`
//! off and on, the window `auto` unless `BENCH_WINDOW` fixes it. For each:
//! generated tokens per second of engine time, the prefix-cache hit rate
//! (`vllm:prefix_cache_hits_total / vllm:prefix_cache_queries_total`, read
//! from the simulator's /metrics), the mean time to first token, and the
//! engine time to finish all 800.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::env_f64;
use feeder_actors::{Blocking, BlockingJobStore, ModelType, NewJob, Payload, Timestamp};
use gpu_feeder::config::WindowSetting;
use gpu_feeder::daemon::Pipeline;
use gpu_feeder::openai::parse_engine_metrics;
use gpu_feeder::results::FileResults;
use gpu_feeder::sim::SimConfig;
use gpu_feeder::store::SqliteStore;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

const DOCS: usize = 100;
const QUESTIONS: usize = 8;
/// About 2,000 tokens at the simulator's 4 characters a token.
const DOC_CHARS: usize = 8_000;
const KV_TOKENS: u64 = 40_960;
const MAX_TOKENS: u32 = 64;
const SEED: u64 = 20_261_203;

/// Document `d`: words drawn for it alone.
fn document(d: usize) -> String {
    let mut rng = rand::rngs::StdRng::seed_from_u64(SEED + d as u64);
    let mut text = format!("Document {d:03}.");
    while text.len() < DOC_CHARS {
        let len = rng.random_range(3..9);
        let word: String = (0..len)
            .map(|_| char::from(b'a' + rng.random_range(0..26u8)))
            .collect();
        text.push(' ');
        text.push_str(&word);
    }
    text.truncate(DOC_CHARS);
    text
}

/// The 800 jobs, shuffled.
fn jobs() -> Vec<NewJob> {
    let mut jobs: Vec<NewJob> = (0..DOCS)
        .flat_map(|d| {
            let doc = document(d);
            (0..QUESTIONS).map(move |q| {
                let prompt =
                    format!("{doc}\n\nQuestion {q}: what does part {q} of document {d} say?");
                NewJob::new(
                    ModelType::Think,
                    Payload::Inline(serde_json::json!({ "prompt": prompt }).to_string()),
                    format!("doc-{d}-q-{q}"),
                )
            })
        })
        .collect();
    jobs.shuffle(&mut rand::rngs::StdRng::seed_from_u64(SEED));
    jobs
}

struct Row {
    tokens_per_s: f64,
    hit_rate: f64,
    ttft: f64,
    engine_s: f64,
    done: u64,
    preemptions: u64,
}

async fn run(grouping: bool, window: WindowSetting, scale: f64) -> Row {
    let sim = common::engine(SimConfig {
        kv_cache_tokens: Some(KV_TOKENS),
        time_scale: scale,
        ..SimConfig::default()
    })
    .await;
    let dir = common::scratch();
    let mut c = common::config(dir.path(), &sim.url(), MAX_TOKENS, window);
    c.dispatch.prefix_grouping = grouping;
    let store = Arc::new(SqliteStore::open(&c.queue.db_path).unwrap());
    store.submit_batch(jobs(), Timestamp::now()).unwrap();
    let start = sim.engine().unwrap();
    let pipeline = Pipeline::start(
        &c,
        Blocking::port(store.clone()),
        Arc::new(FileResults::new(&c.queue.results_dir).unwrap()),
        "bench".into(),
        None,
    )
    .await
    .unwrap();
    let total = (DOCS * QUESTIONS) as u64;
    let limit = Instant::now() + Duration::from_secs(600);
    while sim.engine().unwrap().stats.successes - start.stats.successes < total
        && Instant::now() < limit
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let end = sim.engine().unwrap();
    let text = reqwest::get(format!("{}/metrics", sim.url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    pipeline.shutdown(Duration::ZERO).await;
    let (hits, queries) = parse_engine_metrics(&text)
        .and_then(|m| m.prefix_cache)
        .unwrap_or((0.0, 0.0));
    let ttft = &end.stats.ttft;
    let span = end.now - start.now;
    Row {
        tokens_per_s: (end.stats.generation_tokens - start.stats.generation_tokens) as f64 / span,
        hit_rate: if queries > 0.0 { hits / queries } else { 0.0 },
        ttft: ttft.sum / ttft.count.max(1) as f64,
        engine_s: span,
        done: store
            .stats(Timestamp::now())
            .unwrap()
            .model(ModelType::Think)
            .counts
            .done,
        preemptions: end.stats.preemptions - start.stats.preemptions,
    }
}

fn main() {
    let scale = env_f64("BENCH_TIME_SCALE", 5.0);
    let window = match std::env::var("BENCH_WINDOW") {
        Ok(n) => WindowSetting::Fixed(n.parse().expect("BENCH_WINDOW is a number")),
        Err(_) => WindowSetting::Auto,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!(
        "engine: --kv-cache-tokens {KV_TOKENS} (about 20 documents), default step times, clock ×{scale}; \
         {DOCS} documents of ≈2,000 tokens × {QUESTIONS} questions, shuffled, {MAX_TOKENS} tokens out; window {window:?}"
    );
    println!(
        "  {:<18} {:>10} {:>9} {:>10} {:>10} {:>8} {:>12}",
        "claims", "tokens/s", "hit rate", "mean TTFT", "all done", "done", "preemptions"
    );
    let mut plain = None;
    for grouping in [false, true] {
        let r = rt.block_on(run(grouping, window, scale));
        let label = if grouping {
            "grouped by prefix"
        } else {
            "plain order"
        };
        let gain = match (grouping, plain) {
            (true, Some(p)) => format!("  {:.2}× the tokens/s of plain order", r.tokens_per_s / p),
            _ => String::new(),
        };
        println!(
            "  {:<18} {:>10.0} {:>9.3} {:>9.2}s {:>9.1}s {:>8} {:>12}{gain}",
            label, r.tokens_per_s, r.hit_rate, r.ttft, r.engine_s, r.done, r.preemptions
        );
        plain = Some(r.tokens_per_s);
    }
}
