//! Window figures against the engine simulator: prints them, asserts nothing.
//!
//!     cargo bench --bench window                  # every workload
//!     cargo bench --bench window -- chat          # or ocr, long
//!     BENCH_SECONDS=20 cargo bench --bench window # longer runs
//!     BENCH_AUTO_ONLY=1 BENCH_TRACE=1 cargo bench --bench window -- chat
//!                                                 # auto alone, its every change
//!
//! One engine, as `gpu-feeder sim --kv-cache-tokens 400000 --max-num-seqs 256`
//! with its default step times (an 8B model on one H100: 6.5 ms a step +
//! 0.05 ms per running request + 32 ms per 1,000 prefill tokens; blocks of
//! 16 tokens; 8,192 tokens a step), its clock running `BENCH_TIME_SCALE`
//! (5) times faster than the wall clock. Three workloads, 5,000 bulk jobs
//! each: short chat (≈200-token prompts, 128 tokens out), OCR-like (one
//! image part of 1,200 tokens and a short prompt, 512 out) and long
//! documents (≈3,000-token prompts, 256 out). For each: fixed windows from
//! 4 to 512, `auto`, and the plan's original loop (poll every 5 s, claim
//! 32, wait for all 32), each run for `BENCH_SECONDS` (20) of wall time or
//! until the bulk is done. Halfway through, one high-priority job is
//! submitted; its submit → first token time is printed beside the service
//! time of one bulk request. Times are engine seconds.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use feeder_actors::handle::FeederHandle;
use feeder_actors::{
    Blocking, BlockingJobStore, Completion, ModelType, NewJob, Payload, Settle, Timestamp,
};
mod common;

use common::env_f64;
use gpu_feeder::config::{Config, WindowSetting};
use gpu_feeder::daemon::Pipeline;
use gpu_feeder::results::FileResults;
use gpu_feeder::sim::{SimConfig, SimHandle};
use gpu_feeder::store::SqliteStore;

const JOBS: usize = 5_000;
const URGENT: &str = "URGENT-JOB";

#[derive(Clone, Copy)]
struct Workload {
    name: &'static str,
    /// Characters of text per prompt (4 per token).
    chars: usize,
    /// One image part per prompt.
    image: bool,
    max_tokens: u32,
}

const WORKLOADS: [Workload; 3] = [
    Workload {
        name: "chat",
        chars: 800,
        image: false,
        max_tokens: 128,
    },
    Workload {
        name: "ocr",
        chars: 60,
        image: true,
        max_tokens: 512,
    },
    Workload {
        name: "long",
        chars: 12_000,
        image: false,
        max_tokens: 256,
    },
];

#[derive(Clone, Copy, Debug)]
enum Mode {
    Fixed(u32),
    Auto,
    PlanLoop,
}

impl Mode {
    fn label(&self) -> String {
        match self {
            Mode::Fixed(n) => format!("window {n}"),
            Mode::Auto => "auto".into(),
            Mode::PlanLoop => "plan loop (5 s, 32)".into(),
        }
    }
}

struct Row {
    tokens_per_s: f64,
    preemptions: u64,
    requests: u64,
    median_waiting: usize,
    urgent_first_token: Option<f64>,
    service: f64,
    final_window: Option<u32>,
}

fn payload(w: &Workload, i: usize, tag: &str) -> String {
    // Distinct from the first characters, so that no two share a prefix.
    let head = format!("{tag} {i:06} ");
    let text = format!("{head}{}", "w".repeat(w.chars.saturating_sub(head.len())));
    if w.image {
        let url = format!("data:image/png;base64,{}{i:08}", "iVBORw0KGgo");
        serde_json::json!({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": text},
        ]}]})
        .to_string()
    } else {
        serde_json::json!({ "prompt": text }).to_string()
    }
}

fn job(w: &Workload, i: usize, tag: &str, priority: i64) -> NewJob {
    let mut j = NewJob::new(
        ModelType::Think,
        Payload::Inline(payload(w, i, tag)),
        format!("{tag}-{i}"),
    );
    j.priority = priority;
    j
}

fn config(dir: &Path, url: &str, w: &Workload, mode: Mode) -> Config {
    let window = match mode {
        Mode::Fixed(n) => WindowSetting::Fixed(n),
        _ => WindowSetting::Auto,
    };
    common::config(dir, url, w.max_tokens, window)
}

/// The engine of every run: `--kv-cache-tokens 400000 --max-num-seqs 256`.
async fn engine(scale: f64) -> SimHandle {
    common::engine(SimConfig {
        kv_cache_tokens: Some(400_000),
        max_num_seqs: 256,
        time_scale: scale,
        ..SimConfig::default()
    })
    .await
}

fn median(mut v: Vec<usize>) -> usize {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

/// The plan's loop: every 5 s (engine time) claim 32, send them all, wait
/// for all of them, record them, claim again at once while there is work.
async fn plan_loop(
    store: Arc<SqliteStore>,
    sim_url: String,
    w: Workload,
    scale: f64,
    until: Instant,
) {
    let http = reqwest::Client::new();
    let port = Blocking::port(store);
    while Instant::now() < until {
        let claimed = port
            .claim(
                ModelType::Think,
                32,
                Duration::from_secs(3_600),
                "plan",
                Timestamp::now(),
            )
            .await
            .unwrap();
        if claimed.is_empty() {
            tokio::time::sleep(Duration::from_secs_f64(5.0 / scale)).await;
            continue;
        }
        let sends = claimed.iter().map(|c| {
            let http = http.clone();
            let url = format!("{sim_url}/v1/chat/completions");
            let p: serde_json::Value =
                serde_json::from_str(c.job.payload_inline.as_deref().unwrap()).unwrap();
            let messages = p.get("messages").cloned().unwrap_or_else(|| {
                serde_json::json!([{"role": "user", "content": p["prompt"]}])
            });
            async move {
                let start = Instant::now();
                let _ = http
                    .post(url)
                    .json(&serde_json::json!({"model": "sim", "messages": messages, "max_tokens": w.max_tokens}))
                    .send()
                    .await
                    .and_then(|r| r.error_for_status());
                start.elapsed()
            }
        });
        let latencies = futures_util::future::join_all(sends).await;
        let items = claimed
            .into_iter()
            .zip(latencies)
            .map(|(c, latency)| {
                (
                    c.claim,
                    Settle::Complete(Completion {
                        result_path: std::path::PathBuf::from("/dev/null").into(),
                        prompt_tokens: None,
                        completion_tokens: None,
                        latency,
                    }),
                )
            })
            .collect();
        port.settle_batch(items, Timestamp::now()).await.unwrap();
    }
}

async fn run(w: Workload, mode: Mode, seconds: f64, scale: f64) -> Row {
    let sim = engine(scale).await;
    let dir = common::scratch();
    let c = config(dir.path(), &sim.url(), &w, mode);
    let store = Arc::new(SqliteStore::open(&c.queue.db_path).unwrap());
    store
        .submit_batch(
            (0..JOBS).map(|i| job(&w, i, "bulk", 0)).collect(),
            Timestamp::now(),
        )
        .unwrap();
    sim.watch(URGENT);
    let start_engine = sim.engine().unwrap();
    let start = Instant::now();
    let until = start + Duration::from_secs_f64(seconds);

    let pipeline = match mode {
        Mode::PlanLoop => {
            tokio::spawn(plan_loop(store.clone(), sim.url(), w, scale, until));
            None
        }
        _ => Some(
            Pipeline::start(
                &c,
                Blocking::port(Arc::new(SqliteStore::open(&c.queue.db_path).unwrap())),
                Arc::new(FileResults::new(&c.queue.results_dir).unwrap()),
                "bench".into(),
                None,
            )
            .await
            .unwrap(),
        ),
    };

    let mut waiting = Vec::new();
    let mut urgent_at: Option<f64> = None;
    let mut final_window = None;
    let trace = std::env::var("BENCH_TRACE").is_ok() && matches!(mode, Mode::Auto);
    let mut last_trace: Option<(u32, String)> = None;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let e = sim.engine().unwrap();
        waiting.push(e.waiting);
        let elapsed = start.elapsed().as_secs_f64();
        if urgent_at.is_none() && elapsed >= seconds / 2.0 {
            let urgent = job(&w, 0, URGENT, 100);
            urgent_at = Some(sim.engine().unwrap().now);
            match &pipeline {
                Some(p) => {
                    FeederHandle::new(p.feeder.clone())
                        .submit(vec![urgent])
                        .await
                        .unwrap();
                }
                None => {
                    store.submit(urgent, Timestamp::now()).unwrap();
                }
            }
        }
        if trace {
            if let Some(p) = &pipeline {
                if let Ok(st) = FeederHandle::new(p.feeder.clone()).status().await {
                    if let Some(d) = st.dispatch.first() {
                        if last_trace.as_ref() != Some(&(d.window, d.window_reason.clone())) {
                            println!(
                                "    {:>6.2}s window {:>4} in flight {:>4}: {}",
                                elapsed, d.window, d.in_flight, d.window_reason
                            );
                            last_trace = Some((d.window, d.window_reason.clone()));
                        }
                    }
                }
            }
        }
        let done = e.stats.successes - start_engine.stats.successes;
        if Instant::now() >= until || done > JOBS as u64 {
            if let Some(p) = &pipeline {
                if let Ok(st) = FeederHandle::new(p.feeder.clone()).status().await {
                    final_window = st.dispatch.first().map(|d| d.window);
                }
            }
            break;
        }
    }
    let end = sim.engine().unwrap();
    if let Some(p) = pipeline {
        p.shutdown(Duration::ZERO).await;
    }
    let tokens = (end.stats.generation_tokens - start_engine.stats.generation_tokens) as f64;
    let span = end.now - start_engine.now;
    let urgent_first_token = urgent_at.and_then(|at| {
        sim.watched()
            .iter()
            .filter_map(|(_, first)| *first)
            .map(|first| first - at)
            .next()
    });
    let e2e = &end.stats.e2e;
    Row {
        tokens_per_s: tokens / span,
        preemptions: end.stats.preemptions - start_engine.stats.preemptions,
        requests: end.stats.successes - start_engine.stats.successes,
        median_waiting: median(waiting),
        urgent_first_token,
        service: if e2e.count > 0 {
            e2e.sum / e2e.count as f64
        } else {
            0.0
        },
        final_window,
    }
}

fn main() {
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let seconds = env_f64("BENCH_SECONDS", 20.0);
    let scale = env_f64("BENCH_TIME_SCALE", 5.0);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!(
        "engine: --kv-cache-tokens 400000 --max-num-seqs 256, default step times, clock ×{scale}; {seconds} s of wall time per run, {JOBS} bulk jobs"
    );
    for w in WORKLOADS {
        if !filter.is_empty() && !filter.iter().any(|f| f == w.name) {
            continue;
        }
        println!();
        println!(
            "{} ({} prompt characters{}, {} tokens out)",
            w.name,
            w.chars,
            if w.image { " + one image part" } else { "" },
            w.max_tokens
        );
        println!(
            "  {:<20} {:>12} {:>9} {:>12} {:>10} {:>14} {:>10}",
            "mode", "tokens/s", "requests", "preemptions", "waiting", "urgent → 1st", "service"
        );
        let mut modes: Vec<Mode> = [4, 8, 16, 32, 64, 128, 256, 512]
            .into_iter()
            .map(Mode::Fixed)
            .collect();
        modes.push(Mode::Auto);
        modes.push(Mode::PlanLoop);
        if std::env::var("BENCH_AUTO_ONLY").is_ok() {
            modes = vec![Mode::Auto];
        }
        let mut best = 0.0f64;
        for mode in modes {
            let r = rt.block_on(run(w, mode, seconds, scale));
            if matches!(mode, Mode::Fixed(_)) {
                best = best.max(r.tokens_per_s);
            }
            let label = match (mode, r.final_window) {
                (Mode::Auto, Some(win)) => format!("auto (ended at {win})"),
                _ => mode.label(),
            };
            let share = if matches!(mode, Mode::Auto) && best > 0.0 {
                format!("  {:.2} of the best fixed", r.tokens_per_s / best)
            } else {
                String::new()
            };
            println!(
                "  {:<20} {:>12.0} {:>9} {:>12} {:>10} {:>14} {:>9.2}s{share}",
                label,
                r.tokens_per_s,
                r.requests,
                format!(
                    "{} ({:.1} %)",
                    r.preemptions,
                    100.0 * r.preemptions as f64 / r.requests.max(1) as f64
                ),
                r.median_waiting,
                r.urgent_first_token
                    .map_or("not served".into(), |t| format!("{t:.2}s")),
                r.service,
            );
        }
    }
}
