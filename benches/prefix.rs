//! Prefix-aware claiming against the engine simulator and the real vLLM,
//! side by side: prints figures, asserts nothing.
//!
//!     cargo bench --bench prefix
//!     BENCH_ENGINE=sim cargo bench --bench prefix      # sim | vllm | both (the default)
//!     BENCH_TIME_SCALE=10 cargo bench --bench prefix   # a faster simulator clock
//!     BENCH_WINDOW=32 cargo bench --bench prefix       # a fixed window
//!
//! The workload: documents that share no prefix (words no other document
//! shares), several questions about each, every question a prompt of its
//! document followed by the question, submitted in shuffled order, against
//! a KV cache that holds a fifth of the documents. The same run twice,
//! `dispatch.prefix_grouping` off and on, the window `auto` unless
//! `BENCH_WINDOW` fixes it. For each: generated tokens per second, the
//! prefix-cache hit rate (`vllm:prefix_cache_hits_total /
//! vllm:prefix_cache_queries_total`, both in tokens), the mean time to
//! first token (`vllm:time_to_first_token_seconds`), and the time to
//! finish them all.
//!
//! **Simulator.** 100 documents of about 2,000 tokens (8,000 characters at
//! the simulator's 4 a token) × 8 questions: 800 jobs. One engine, as
//! `gpu-feeder sim --kv-cache-tokens 40960` (2,560 blocks of 16 tokens:
//! about 20 documents) with its default step times (an 8B model on one
//! H100: 6.5 ms a step + 0.05 ms per running request + 32 ms per 1,000
//! prefill tokens; 8,192 tokens a step; 256 requests at most), its clock
//! running `BENCH_TIME_SCALE` (5) times faster than the wall clock, a fresh
//! one per run; 64 tokens out per question. Times are engine seconds.
//!
//! **vLLM.** Its CPU build (`tests/common/vllm.rs`) serving the tiny
//! random-weight Llama with `--max-num-seqs 64 --num-gpu-blocks-override
//! 120` (blocks of 128 tokens: 15,360 tokens, about 10 documents), started
//! once for both runs, which share the machine's cores with it; before each
//! run it is left idle and its prefix cache is reset. 50 documents of about
//! 1,430 tokens (1,900 characters: vLLM's tokenizer makes about 1.3 of them
//! a token) × 8 questions: 400 jobs, 32 tokens out each, `ignore_eos` so
//! that each generates exactly that. Times are wall seconds, figures from
//! vLLM's `/metrics`.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::engine::{self, Engine, Kind, Reading, RealVllm};
use common::env_f64;
use feeder_actors::{BlockingJobStore, ModelType, NewJob, Payload, Timestamp};
use gpu_feeder::config::WindowSetting;
use gpu_feeder::sim::SimConfig;
use gpu_feeder::store::SqliteStore;
use rand::seq::SliceRandom;
use rand::SeedableRng;

const SEED: u64 = 20_261_203;

/// One engine's workload.
struct Workload {
    docs: usize,
    questions: usize,
    doc_chars: usize,
    max_tokens: u32,
}

const SIM: Workload = Workload {
    docs: 100,
    questions: 8,
    doc_chars: 8_000,
    max_tokens: 64,
};
/// The simulator's KV cache, in tokens: about 20 documents.
const SIM_KV_TOKENS: u64 = 40_960;

const VLLM: Workload = Workload {
    docs: 50,
    questions: 8,
    doc_chars: 1_900,
    max_tokens: 32,
};
/// About 10 documents of KV cache; 64 slots.
const VLLM_ARGS: [&str; 4] = ["--max-num-seqs", "64", "--num-gpu-blocks-override", "120"];

/// Document `d`: words drawn for it alone.
fn document(w: &Workload, d: usize) -> String {
    common::words(SEED + d as u64, &format!("Document {d:03}."), w.doc_chars)
}

/// Every question about every document, shuffled.
fn jobs(w: &Workload, kind: Kind) -> Vec<NewJob> {
    let mut jobs: Vec<NewJob> = (0..w.docs)
        .flat_map(|d| {
            let doc = document(w, d);
            (0..w.questions).map(move |q| {
                let prompt =
                    format!("{doc}\n\nQuestion {q}: what does part {q} of document {d} say?");
                let mut p = serde_json::json!({ "prompt": prompt });
                if kind == Kind::Vllm {
                    // A random-weight model may end at once otherwise.
                    p["ignore_eos"] = true.into();
                }
                NewJob::new(
                    ModelType::Think,
                    Payload::Inline(p.to_string()),
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

async fn run(engine: &Engine<'_>, w: &Workload, grouping: bool, window: WindowSetting) -> Row {
    let kind = engine.kind();
    let dir = common::scratch();
    let mut c = common::config_serving(
        dir.path(),
        &engine.url(),
        engine.served_name(),
        w.max_tokens,
        window,
    );
    c.dispatch.prefix_grouping = grouping;
    let store = Arc::new(SqliteStore::open(&c.queue.db_path).unwrap());
    store.submit_batch(jobs(w, kind), Timestamp::now()).unwrap();
    let start = engine.reading().await;
    let pipeline = common::start_pipeline(&c, store.clone()).await;
    let total = (w.docs * w.questions) as f64;
    let every = match kind {
        Kind::Sim => Duration::from_millis(50),
        Kind::Vllm => Duration::from_millis(250),
    };
    let limit = Instant::now() + Duration::from_secs(600);
    let mut end = engine.reading().await;
    while end.successes - start.successes < total && Instant::now() < limit {
        tokio::time::sleep(every).await;
        end = engine.reading().await;
    }
    pipeline.shutdown(Duration::ZERO).await;
    Row {
        tokens_per_s: end.tokens_per_s_since(&start),
        hit_rate: end.hit_rate_since(&start),
        ttft: Reading::mean_since(end.ttft, start.ttft),
        engine_s: end.now - start.now,
        done: store
            .stats(Timestamp::now())
            .unwrap()
            .model(ModelType::Think)
            .counts
            .done,
        preemptions: (end.preemptions - start.preemptions) as u64,
    }
}

/// Runs and prints plain order, then grouped claims; `engine` makes each
/// run's engine.
fn table<'a, F>(rt: &tokio::runtime::Runtime, w: &Workload, window: WindowSetting, engine: F)
where
    F: Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = Engine<'a>> + 'a>>,
{
    println!(
        "  {:<18} {:>10} {:>9} {:>10} {:>10} {:>8} {:>12}",
        "claims", "tokens/s", "hit rate", "mean TTFT", "all done", "done", "preemptions"
    );
    let mut plain = None;
    for grouping in [false, true] {
        let r = rt.block_on(async {
            let e = engine().await;
            run(&e, w, grouping, window).await
        });
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

fn main() {
    let window = match std::env::var("BENCH_WINDOW") {
        Ok(n) => WindowSetting::Fixed(n.parse().expect("BENCH_WINDOW is a number")),
        Err(_) => WindowSetting::Auto,
    };
    let rt = common::runtime();
    for kind in engine::chosen() {
        match kind {
            Kind::Sim => {
                let scale = env_f64("BENCH_TIME_SCALE", 5.0);
                let w = &SIM;
                println!(
                    "engine: sim --kv-cache-tokens {SIM_KV_TOKENS} (about 20 documents), default step times, clock ×{scale}; \
                     {} documents of ≈2,000 tokens × {} questions, shuffled, {} tokens out; window {window:?}; times in engine seconds",
                    w.docs, w.questions, w.max_tokens
                );
                table(&rt, w, window, || {
                    Box::pin(async move {
                        Engine::Sim(
                            common::engine(SimConfig {
                                kv_cache_tokens: Some(SIM_KV_TOKENS),
                                time_scale: scale,
                                ..SimConfig::default()
                            })
                            .await,
                        )
                    })
                });
            }
            Kind::Vllm => {
                let w = &VLLM;
                let real = RealVllm::start("prefix", &VLLM_ARGS);
                let one = serde_json::json!([{"role": "user", "content": format!(
                    "{}\n\nQuestion 0: what does part 0 of document 0 say?",
                    document(w, 0)
                )}]);
                let tokens = rt.block_on(real.prompt_tokens(&one));
                println!();
                println!(
                    "engine: vLLM (CPU) on the tiny Llama, {}; {} documents × {} questions ({} prompt tokens each), shuffled, {} tokens out; window {window:?}; times in wall seconds (log: {})",
                    real.args.join(" "),
                    w.docs,
                    w.questions,
                    tokens.map_or("?".into(), |t| t.to_string()),
                    w.max_tokens,
                    RealVllm::log_path("prefix").display()
                );
                let real = &real;
                table(&rt, w, window, || {
                    Box::pin(async move {
                        real.settle().await;
                        Engine::Vllm(real)
                    })
                });
            }
        }
    }
}
