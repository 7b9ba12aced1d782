//! Window figures against the engine simulator and the real vLLM, side by
//! side: prints them, asserts nothing.
//!
//!     cargo bench --bench window                  # every workload, both engines
//!     cargo bench --bench window -- chat          # or ocr, long, doc
//!     BENCH_ENGINE=sim cargo bench --bench window # sim | vllm | both (the default)
//!     BENCH_SECONDS=20 cargo bench --bench window # the simulator's runs, wall s
//!     BENCH_VLLM_SECONDS=30 cargo bench --bench window  # vLLM's runs, wall s
//!     BENCH_WINDOWS=48,64,96 cargo bench --bench window # other fixed windows
//!     BENCH_AUTO_ONLY=1 BENCH_TRACE=1 cargo bench --bench window -- chat
//!                                                 # auto alone, its every change
//!     BENCH_TRACE=every cargo bench --bench window -- chat
//!                                                 # every reading of every run
//!
//!     cargo bench --bench window -- seeds         # 10 generated workloads (seeds 1-10)
//!     cargo bench --bench window -- tune          # the tuning seeds, 100-119
//!     BENCH_SEEDS=3,7 BENCH_VERBOSE=1 BENCH_TRACE=1 cargo bench --bench window -- seeds
//!                                                 # chosen seeds, auto's every change
//!     cargo bench --bench window -- seeds-pipeline  # seeds 1-3 through the pipeline
//!
//! **Generated workloads** (`seeds`, `tune`). Each seed draws an engine and
//! a stream of work (`benches/common/workload.rs`: heavy-tailed prompt and
//! output lengths, mixes of chat, long documents and images, shared
//! prefixes, bursts, KV cache, step times, slots, block size and step
//! budget), and the window is run at 14 fixed sizes (8 to 1,024) and at
//! `auto` (`window_max` 1,024), 200 engine seconds each, by the
//! virtual-time harness (`benches/common/replay.rs`: the real controller
//! against the engine model, no daemon). The table gives auto ÷ the best
//! fixed window that preempts under 1 % of its requests, auto's
//! preemptions, and a high-priority job's submit → done under auto ÷ its
//! time on an idle engine (and under that best fixed window). The engine
//! runs vLLM's priority policy, the urgent request sent at priority -100,
//! as the servers the feeder launches do (`BENCH_POLICY=fcfs`: first come
//! first served, vLLM's default, an external server's). Every run has
//! the dispatcher's priority hold (`BENCH_HOLD=off` runs without it,
//! `BENCH_HOLD=FLOOR,LIFETIMES` with other bounds), and auto also runs
//! without it, beside, as before the hold; `BENCH_VERBOSE=1` says where the
//! urgent job's time went. The
//! controller was tuned on seeds 100-119 (`tune`) only; seeds 1-10 are the
//! report, with a long-document example ("ex": 270 prompt
//! tokens, 200 out, a KV cache holding 125 such requests, steps of 10 ms +
//! 0.06 ms a request, prefill 0.15 ms a token) above them.
//! `seeds-pipeline` runs chosen seeds (`BENCH_SEEDS`, default 1-3; 0 is
//! the example) through the whole pipeline against the simulator set as
//! the seed's engine, jobs submitted as they arrive, at auto and at half,
//! once and twice the best fixed window the harness found; `BENCH_SECONDS`
//! (40) of wall time a run at `BENCH_TIME_SCALE` (5), the harness's figures
//! beside them.
//!
//! For every workload: fixed windows, `auto`, and the plan's original loop
//! (poll every 5 s, claim 32, wait for all 32), each run for its seconds of
//! wall time or until the bulk is done. Halfway through, one high-priority
//! job is submitted: its submit → first token time (simulator) or submit →
//! done time (vLLM: the pipeline does not stream, and vLLM keeps no record
//! per request) is printed beside the mean service time of a bulk request.
//!
//! **Simulator.** One engine, as `gpu-feeder sim --kv-cache-tokens 400000
//! --max-num-seqs 256` with its default step times (an 8B model on one
//! H100: 6.5 ms a step + 0.05 ms per running request + 32 ms per 1,000
//! prefill tokens; blocks of 16 tokens; 8,192 tokens a step), its clock
//! running `BENCH_TIME_SCALE` (5) times faster than the wall clock, a fresh
//! one per run. Three workloads, 5,000 bulk jobs each: short chat (≈200-token
//! prompts, 128 tokens out), OCR-like (one image part of 1,200 tokens and a
//! short prompt, 512 out) and long documents (≈3,000-token prompts, 256
//! out); windows 4 to 512; `BENCH_SECONDS` (20) per run. Times and tokens/s
//! are engine seconds.
//!
//! **vLLM.** Its CPU build (`tests/common/vllm.rs`) serving the tiny
//! random-weight Llama (2 layers, hidden 256) with `--max-num-seqs 64
//! --num-gpu-blocks-override 160` (blocks of 128 tokens: 20,480 tokens of
//! KV cache), started once for all the runs, which share the machine's
//! cores with it; before each run it is left to finish what it ran and its
//! prefix cache is reset. Prompts are random words (about 1.3 characters a
//! token; the header shows vLLM's count), every request asks
//! `ignore_eos` so that it generates exactly its `max_tokens`. Three
//! workloads, 20,000 bulk jobs each (more than any run finishes): chat
//! (≈120-token prompts, 32 out: bound by the 64 slots), doc (≈400-token
//! prompts, 64 out: the KV cache holds about 40) and long (≈1,000-token
//! prompts, 32 out: the KV cache holds about 17, and prefill bounds
//! throughput); windows 4 to 128; `BENCH_VLLM_SECONDS` (30) per run. Times
//! and tokens/s are wall seconds, figures from vLLM's `/metrics`.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use feeder_actors::handle::FeederHandle;
use feeder_actors::{
    Blocking, BlockingJobStore, Completion, JobId, JobStatus, ModelType, NewJob, Payload, Settle,
    Timestamp,
};
mod common;
#[path = "common/replay.rs"]
mod replay;
#[path = "common/workload.rs"]
mod workload;

use common::engine::{self, Engine, Kind, Reading, RealVllm};
use common::env_f64;
use gpu_feeder::config::{Config, WindowSetting};
use gpu_feeder::sim::{SchedulingPolicy, SimConfig};
use gpu_feeder::store::SqliteStore;

const URGENT: &str = "URGENT-JOB";

#[derive(Clone, Copy)]
struct Workload {
    name: &'static str,
    /// Characters of text per prompt.
    chars: usize,
    /// One image part per prompt.
    image: bool,
    max_tokens: u32,
    /// Bulk jobs submitted before the run.
    jobs: usize,
}

const SIM_WORKLOADS: [Workload; 3] = [
    Workload {
        name: "chat",
        chars: 800,
        image: false,
        max_tokens: 128,
        jobs: 5_000,
    },
    Workload {
        name: "ocr",
        chars: 60,
        image: true,
        max_tokens: 512,
        jobs: 5_000,
    },
    Workload {
        name: "long",
        chars: 12_000,
        image: false,
        max_tokens: 256,
        jobs: 5_000,
    },
];

const SIM_WINDOWS: [u32; 8] = [4, 8, 16, 32, 64, 128, 256, 512];

/// Sized so that each run takes tens of seconds on two cores and the KV
/// cache, not only the slots, limits the two longer workloads.
const VLLM_WORKLOADS: [Workload; 3] = [
    Workload {
        name: "chat",
        chars: 150,
        image: false,
        max_tokens: 32,
        jobs: 20_000,
    },
    Workload {
        name: "doc",
        chars: 520,
        image: false,
        max_tokens: 64,
        jobs: 20_000,
    },
    Workload {
        name: "long",
        chars: 1_320,
        image: false,
        max_tokens: 32,
        jobs: 20_000,
    },
];

const VLLM_ARGS: [&str; 4] = ["--max-num-seqs", "64", "--num-gpu-blocks-override", "160"];

const VLLM_WINDOWS: [u32; 6] = [4, 8, 16, 32, 64, 128];

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
    /// Submit → first token (simulator) or → done (vLLM), engine seconds.
    urgent: Option<f64>,
    service: f64,
    final_window: Option<u32>,
}

/// The job's payload. The simulator counts 4 characters a token, whatever
/// they are; a real tokenizer makes one token of a long run of one letter
/// only now and then, so vLLM's prompts are words, and ask it to ignore the
/// end of text (a random-weight model may stop at once).
fn payload(w: &Workload, i: usize, tag: &str, kind: Kind) -> String {
    // Distinct from the first characters, so that no two share a prefix.
    let head = format!("{tag} {i:06} ");
    let text = match kind {
        Kind::Sim => format!("{head}{}", "w".repeat(w.chars.saturating_sub(head.len()))),
        Kind::Vllm => common::words(i as u64, &head, w.chars),
    };
    let mut p = if w.image {
        let url = format!("data:image/png;base64,{}{i:08}", "iVBORw0KGgo");
        serde_json::json!({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": text},
        ]}]})
    } else {
        serde_json::json!({ "prompt": text })
    };
    if kind == Kind::Vllm {
        p["ignore_eos"] = true.into();
    }
    p.to_string()
}

fn job(w: &Workload, i: usize, tag: &str, priority: i64, kind: Kind) -> NewJob {
    let mut j = NewJob::new(
        ModelType::Think,
        Payload::Inline(payload(w, i, tag, kind)),
        format!("{tag}-{i}"),
    );
    j.priority = priority;
    j
}

fn config(dir: &Path, engine: &Engine<'_>, w: &Workload, mode: Mode) -> Config {
    let window = match mode {
        Mode::Fixed(n) => WindowSetting::Fixed(n),
        _ => WindowSetting::Auto,
    };
    common::config_serving(
        dir,
        &engine.url(),
        engine.served_name(),
        w.max_tokens,
        window,
    )
}

/// The simulator of every run: `--kv-cache-tokens 400000 --max-num-seqs 256`.
async fn sim_engine(scale: f64) -> Engine<'static> {
    Engine::Sim(
        common::engine(SimConfig {
            kv_cache_tokens: Some(400_000),
            max_num_seqs: 256,
            time_scale: scale,
            ..SimConfig::default()
        })
        .await,
    )
}

fn median(mut v: Vec<usize>) -> usize {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

/// The chat-completion body of a payload: its messages (a prompt becomes
/// one), its other keys as they are.
fn body(payload: &str, model: &str, max_tokens: u32) -> serde_json::Value {
    let p: serde_json::Value = serde_json::from_str(payload).unwrap();
    let mut body = p.as_object().cloned().unwrap_or_default();
    if let Some(prompt) = body.remove("prompt") {
        body.insert(
            "messages".into(),
            serde_json::json!([{"role": "user", "content": prompt}]),
        );
    }
    body.insert("model".into(), model.into());
    body.insert("max_tokens".into(), max_tokens.into());
    serde_json::Value::Object(body)
}

/// The plan's loop: every 5 s (engine time) claim 32, send them all, wait
/// for all of them, record them, claim again at once while there is work.
async fn plan_loop(
    store: Arc<SqliteStore>,
    url: String,
    model: &'static str,
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
            let url = format!("{url}/v1/chat/completions");
            let body = body(
                c.job.payload_inline.as_deref().unwrap(),
                model,
                w.max_tokens,
            );
            async move {
                let start = Instant::now();
                let _ = http
                    .post(url)
                    .json(&body)
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

/// Where the urgent job stands: when it was submitted (engine and wall
/// clock), and when vLLM's answer to it was recorded.
struct Urgent {
    id: JobId,
    at: f64,
    wall: Instant,
    done: Option<f64>,
}

async fn run(engine: &Engine<'_>, w: Workload, mode: Mode, seconds: f64, scale: f64) -> Row {
    let kind = engine.kind();
    let dir = common::scratch();
    let c = config(dir.path(), engine, &w, mode);
    let store = Arc::new(SqliteStore::open(&c.queue.db_path).unwrap());
    store
        .submit_batch(
            (0..w.jobs).map(|i| job(&w, i, "bulk", 0, kind)).collect(),
            Timestamp::now(),
        )
        .unwrap();
    if let Engine::Sim(sim) = engine {
        sim.watch(URGENT);
    }
    let first = engine.reading().await;
    let start = Instant::now();
    let until = start + Duration::from_secs_f64(seconds);

    let pipeline = match mode {
        Mode::PlanLoop => {
            tokio::spawn(plan_loop(
                store.clone(),
                engine.url(),
                engine.served_name(),
                w,
                scale,
                until,
            ));
            None
        }
        _ => Some(
            common::start_pipeline(&c, Arc::new(SqliteStore::open(&c.queue.db_path).unwrap()))
                .await,
        ),
    };

    let mut waiting = Vec::new();
    let mut urgent: Option<Urgent> = None;
    let mut final_window = None;
    let trace_all = std::env::var("BENCH_TRACE").as_deref() == Ok("every");
    let trace = std::env::var("BENCH_TRACE").is_ok() && (trace_all || matches!(mode, Mode::Auto));
    let mut last_trace: Option<(u32, String)> = None;
    let mut last = first;
    loop {
        tokio::time::sleep(engine.sample_every()).await;
        let e = engine.reading().await;
        waiting.push(e.waiting as usize);
        let elapsed = start.elapsed().as_secs_f64();
        if urgent.is_none() && elapsed >= seconds / 2.0 {
            let job = job(&w, 0, URGENT, 100, kind);
            let at = engine.reading().await.now;
            let id = match &pipeline {
                Some(p) => {
                    FeederHandle::new(p.feeder.clone())
                        .submit(vec![job])
                        .await
                        .unwrap()[0]
                        .id
                }
                None => store.submit(job, Timestamp::now()).unwrap().id,
            };
            urgent = Some(Urgent {
                id,
                at,
                wall: Instant::now(),
                done: None,
            });
        }
        if let Some(u) = urgent.as_mut().filter(|u| u.done.is_none()) {
            if kind == Kind::Vllm
                && store
                    .get(u.id)
                    .unwrap()
                    .is_some_and(|j| j.status == JobStatus::Done)
            {
                u.done = Some(u.wall.elapsed().as_secs_f64());
            }
        }
        if trace {
            if let Some(p) = &pipeline {
                if let Ok(st) = FeederHandle::new(p.feeder.clone()).status().await {
                    if let Some(d) = st.dispatch.first() {
                        if trace_all
                            || last_trace.as_ref() != Some(&(d.window, d.window_reason.clone()))
                        {
                            println!(
                                "    {:>6.2}s window {:>4} in flight {:>4} | engine runs {:>3} queues {:>3} kv {:>3.0} % {:>6.0} tokens/s {:>3} preempted | {}",
                                elapsed,
                                d.window,
                                d.in_flight,
                                e.running,
                                e.waiting,
                                e.kv_usage * 100.0,
                                (e.generation_tokens - last.generation_tokens)
                                    / (e.now - last.now).max(1e-9),
                                e.preemptions - last.preemptions,
                                d.window_reason
                            );
                            last_trace = Some((d.window, d.window_reason.clone()));
                        }
                    }
                }
            }
        }
        last = e;
        let done = e.successes - first.successes;
        if Instant::now() >= until || done > w.jobs as f64 {
            if let Some(p) = &pipeline {
                if let Ok(st) = FeederHandle::new(p.feeder.clone()).status().await {
                    final_window = st.dispatch.first().map(|d| d.window);
                }
            }
            break;
        }
    }
    let end = engine.reading().await;
    if let Some(p) = pipeline {
        p.shutdown(Duration::ZERO).await;
    }
    let urgent = urgent.and_then(|u| match engine {
        Engine::Sim(sim) => sim
            .watched()
            .iter()
            .filter_map(|(_, first)| *first)
            .map(|first| first - u.at)
            .next(),
        Engine::Vllm(_) => u.done,
    });
    Row {
        tokens_per_s: end.tokens_per_s_since(&first),
        preemptions: (end.preemptions - first.preemptions) as u64,
        requests: (end.successes - first.successes) as u64,
        median_waiting: median(waiting),
        urgent,
        service: Reading::mean_since(end.e2e, first.e2e),
        final_window,
    }
}

/// Runs and prints every mode of workload `w`; `engine` makes each run's
/// engine.
fn table<'a, F>(
    rt: &tokio::runtime::Runtime,
    kind: Kind,
    w: Workload,
    windows: &[u32],
    seconds: f64,
    scale: f64,
    engine: F,
) where
    F: Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = Engine<'a>> + 'a>>,
{
    println!(
        "  {:<20} {:>12} {:>9} {:>12} {:>10} {:>14} {:>10}",
        "mode",
        "tokens/s",
        "requests",
        "preemptions",
        "waiting",
        match kind {
            Kind::Sim => "urgent → 1st",
            Kind::Vllm => "urgent → done",
        },
        "service"
    );
    let windows: Vec<u32> = match std::env::var("BENCH_WINDOWS") {
        Ok(list) => list
            .split(',')
            .map(|n| {
                n.trim()
                    .parse()
                    .expect("BENCH_WINDOWS is a list of numbers")
            })
            .collect(),
        Err(_) => windows.to_vec(),
    };
    let mut modes: Vec<Mode> = windows.into_iter().map(Mode::Fixed).collect();
    modes.push(Mode::Auto);
    modes.push(Mode::PlanLoop);
    if std::env::var("BENCH_AUTO_ONLY").is_ok() {
        modes = vec![Mode::Auto];
    }
    let mut best = 0.0f64;
    for mode in modes {
        let r = rt.block_on(async {
            let e = engine().await;
            run(&e, w, mode, seconds, scale).await
        });
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
            r.urgent.map_or("not served".into(), |t| format!("{t:.2}s")),
            r.service,
        );
    }
}

fn heading(w: &Workload, what: String) {
    println!();
    println!(
        "{} ({}{}, {} tokens out)",
        w.name,
        what,
        if w.image { " + one image part" } else { "" },
        w.max_tokens
    );
}

fn main() {
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    if filter.iter().any(|f| f == "seeds" || f == "tune") {
        seeds_table(filter.iter().any(|f| f == "tune"));
        return;
    }
    let rt = common::runtime();
    if filter.iter().any(|f| f == "seeds-pipeline") {
        seeds_pipeline(&rt);
        return;
    }
    let wanted = |w: &Workload| filter.is_empty() || filter.iter().any(|f| f == w.name);
    for kind in engine::chosen() {
        match kind {
            Kind::Sim => {
                let seconds = env_f64("BENCH_SECONDS", 20.0);
                let scale = env_f64("BENCH_TIME_SCALE", 5.0);
                println!(
                    "engine: sim --kv-cache-tokens 400000 --max-num-seqs 256, default step times, clock ×{scale}; {seconds} s of wall time per run; times in engine seconds"
                );
                for w in SIM_WORKLOADS.iter().filter(|w| wanted(w)) {
                    heading(w, format!("{} prompt characters", w.chars));
                    table(&rt, kind, *w, &SIM_WINDOWS, seconds, scale, || {
                        Box::pin(sim_engine(scale))
                    });
                }
            }
            Kind::Vllm => {
                let todo: Vec<Workload> = VLLM_WORKLOADS
                    .iter()
                    .copied()
                    .filter(|w| wanted(w))
                    .collect();
                if todo.is_empty() {
                    continue;
                }
                let seconds = env_f64("BENCH_VLLM_SECONDS", 30.0);
                let real = RealVllm::start("window", &VLLM_ARGS);
                println!();
                println!(
                    "engine: vLLM (CPU) on the tiny Llama, {}; {seconds} s of wall time per run; times in wall seconds (log: {})",
                    real.args.join(" "),
                    RealVllm::log_path("window").display()
                );
                for w in &todo {
                    let p: serde_json::Value =
                        serde_json::from_str(&payload(w, 0, "bulk", kind)).unwrap();
                    let b = body(&p.to_string(), engine::VLLM_NAME, w.max_tokens);
                    let tokens = rt.block_on(real.prompt_tokens(&b["messages"]));
                    heading(
                        w,
                        format!(
                            "{} prompt characters, {} tokens",
                            w.chars,
                            tokens.map_or("?".into(), |t| t.to_string())
                        ),
                    );
                    let real = &real;
                    table(&rt, kind, *w, &VLLM_WINDOWS, seconds, 1.0, || {
                        Box::pin(async move {
                            real.settle().await;
                            Engine::Vllm(real)
                        })
                    });
                }
            }
        }
    }
}

/// The seeds a table runs: `BENCH_SEEDS` (`1-10` or `3,7`), else `default`.
fn seeds(default: std::ops::RangeInclusive<u64>) -> Vec<u64> {
    let Ok(list) = std::env::var("BENCH_SEEDS") else {
        return default.collect();
    };
    list.split(',')
        .flat_map(|part| match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u64, u64) = (a.trim().parse().unwrap(), b.trim().parse().unwrap());
                (a..=b).collect::<Vec<_>>()
            }
            None => vec![part.trim().parse().expect("BENCH_SEEDS is a list of seeds")],
        })
        .collect()
}

/// The scenario of `seed`; 0 is the long-document example.
fn scenario(seed: u64) -> workload::Scenario {
    match seed {
        0 => workload::Scenario::example(),
        _ => workload::Scenario::draw(seed),
    }
}

/// The fixed windows each generated scenario is run at.
const SEED_WINDOWS: [u32; 14] = [
    8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024,
];

/// One scenario's figures: auto against the best fixed window that
/// preempts under 1 % of its requests.
struct SeedRow {
    best: (u32, replay::Outcome),
    auto: replay::Outcome,
    /// Auto without the priority hold (before it), for comparison.
    plain: replay::Outcome,
    idle: f64,
}

fn seed_row(s: &workload::Scenario) -> SeedRow {
    let fixed: Vec<(u32, replay::Outcome)> = SEED_WINDOWS
        .iter()
        .map(|&n| {
            (
                n,
                replay::run(s, feeder_actors::window::WindowMode::Fixed(n)),
            )
        })
        .collect();
    let best = fixed
        .iter()
        .filter(|(_, o)| (o.preemptions as f64) < 0.01 * o.requests.max(1) as f64)
        .max_by(|a, b| a.1.tokens_per_s.total_cmp(&b.1.tokens_per_s))
        .cloned()
        .unwrap_or_else(|| fixed[0].clone());
    let auto = replay::run(s, feeder_actors::window::WindowMode::Auto { max: 1024 });
    let plain = replay::run_with(
        s,
        feeder_actors::window::WindowMode::Auto { max: 1024 },
        None,
    );
    SeedRow {
        best,
        auto,
        plain,
        idle: replay::idle_time(s),
    }
}

/// `-- seeds` (the 10 report seeds, 1-10, and the long-document example) or
/// `-- tune` (the tuning seeds, 100-119): auto against every fixed window
/// on generated workloads, in virtual time (`benches/common/replay.rs`).
fn seeds_table(tune: bool) {
    let mut scenarios = Vec::new();
    if !tune && std::env::var("BENCH_SEEDS").is_err() {
        scenarios.push(workload::Scenario::example());
    }
    let chosen = seeds(if tune { 100..=119 } else { 1..=10 });
    scenarios.extend(chosen.into_iter().map(scenario));
    println!(
        "generated workloads against the engine model in virtual time ({} engine s a run); auto ÷ the best fixed window that preempts < 1 % of requests",
        workload::RUN_SECONDS
    );
    println!(
        "  auto and the fixed windows run with the dispatcher's priority hold; \"no hold\": auto without it (as before it), same run"
    );
    println!(
        "  the engine's scheduling policy: {} (BENCH_POLICY=fcfs for vLLM's default)",
        if replay::priority_policy() {
            "priority, the urgent request sent at priority -100 (as the servers the feeder launches run)"
        } else {
            "first come first served"
        }
    );
    println!(
        "  {:>4} {:>20} {:>10} {:>6} {:>8} {:>14} {:>8} {:>8} {:>7} {:>8} | {:>7} {:>7} {:>8}",
        "seed",
        "best fixed",
        "tokens/s",
        "auto",
        "auto at",
        "preemptions",
        "urgent",
        "idle",
        "× idle",
        "at best",
        "no hold",
        "× idle",
        "urgent"
    );
    let rows: Vec<(u64, SeedRow, String)> = std::thread::scope(|sc| {
        let handles: Vec<_> = scenarios
            .iter()
            .map(|s| sc.spawn(move || (s.seed, seed_row(s), s.describe())))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut ratios = Vec::new();
    let mut urgents = Vec::new();
    let mut plain_ratios = Vec::new();
    let mut plain_urgents = Vec::new();
    for (seed, r, describe) in &rows {
        let ratio = r.auto.tokens_per_s / r.best.1.tokens_per_s.max(1e-9);
        let urgent = r.auto.urgent.map(|u| u / r.idle);
        let plain_ratio = r.plain.tokens_per_s / r.best.1.tokens_per_s.max(1e-9);
        let plain_urgent = r.plain.urgent.map(|u| u / r.idle);
        if *seed != 0 {
            ratios.push(ratio);
            urgents.push(urgent.unwrap_or(f64::INFINITY));
            plain_ratios.push(plain_ratio);
            plain_urgents.push(plain_urgent.unwrap_or(f64::INFINITY));
        }
        println!(
            "  {:>4} {:>20} {:>10.0} {:>6.2} {:>8} {:>14} {:>8} {:>7.2}s {:>7} {:>8} | {:>7.2} {:>7} {:>8}",
            if *seed == 0 {
                "ex".to_string()
            } else {
                seed.to_string()
            },
            format!(
                "{} ({:.1} % pre.)",
                r.best.0,
                100.0 * r.best.1.preemptions as f64 / r.best.1.requests.max(1) as f64
            ),
            r.best.1.tokens_per_s,
            ratio,
            r.auto.window,
            format!(
                "{} ({:.1} %)",
                r.auto.preemptions,
                100.0 * r.auto.preemptions as f64 / r.auto.requests.max(1) as f64
            ),
            r.auto.urgent.map_or("-".into(), |u| format!("{u:.2}s")),
            r.idle,
            urgent.map_or("-".into(), |u| format!("{u:.2}")),
            r.best
                .1
                .urgent
                .map_or("-".into(), |u| format!("{:.2}", u / r.idle)),
            plain_ratio,
            plain_urgent.map_or("-".into(), |u| format!("{u:.2}")),
            r.plain.urgent.map_or("-".into(), |u| format!("{u:.2}s")),
        );
        if std::env::var("BENCH_VERBOSE").is_ok() {
            println!("       {describe}");
            println!("       hold: {}", r.auto.urgent_detail);
            println!("       none: {}", r.plain.urgent_detail);
            for (t, w, why) in &r.auto.trace {
                println!("       {t:>7.2}s {w:>5} {why}");
            }
        }
    }
    let summary = |what: &str, mut ratios: Vec<f64>, mut urgents: Vec<f64>| {
        ratios.sort_by(f64::total_cmp);
        urgents.sort_by(f64::total_cmp);
        let median = |v: &[f64]| (v[(v.len() - 1) / 2] + v[v.len() / 2]) / 2.0;
        if !ratios.is_empty() {
            println!(
                "  {what}: auto ÷ best fixed over {} seeds: median {:.3}, worst {:.3}; urgent ÷ idle: median {:.2}, worst {:.2}",
                ratios.len(),
                median(&ratios),
                ratios[0],
                median(&urgents),
                urgents[urgents.len() - 1]
            );
        }
    };
    summary("with the hold", ratios, urgents);
    summary("no hold     ", plain_ratios, plain_urgents);
}

/// The payload of a generated job: a system message with its shared
/// prefix (the same text for every job behind it), then its own text
/// (distinct from its first characters) and its image part; the simulator
/// counts a token per 4 characters and `--image-tokens` per image.
fn generated_payload(j: &workload::GenJob, i: usize, tag: &str) -> String {
    let head = format!("{tag} {i:07} ");
    let chars = (j.text as usize * 4).max(head.len());
    let text = format!("{head}{}", "w".repeat(chars - head.len()));
    let mut content = vec![serde_json::json!({"type": "text", "text": text})];
    if j.image.is_some() {
        let url = format!("data:image/png;base64,iVBORw0KGgo{tag}{i:08}");
        content.insert(
            0,
            serde_json::json!({"type": "image_url", "image_url": {"url": url}}),
        );
    }
    let mut messages = vec![serde_json::json!({"role": "user", "content": content})];
    if let Some((k, t)) = j.prefix {
        let prefix = format!("{} shared prefix {k:04} ", j.class);
        let system = format!(
            "{prefix}{}",
            "s".repeat((t as usize * 4).saturating_sub(prefix.len()))
        );
        messages.insert(0, serde_json::json!({"role": "system", "content": system}));
    }
    serde_json::json!({"messages": messages, "max_tokens": j.max_tokens}).to_string()
}

fn generated_job(j: &workload::GenJob, i: usize, tag: &str, priority: i64) -> NewJob {
    let mut n = NewJob::new(
        ModelType::Think,
        Payload::Inline(generated_payload(j, i, tag)),
        format!("{tag}-{i}"),
    );
    n.priority = priority;
    n
}

/// One run of a generated scenario through the whole pipeline: the
/// simulator set as the scenario's engine, jobs submitted as they arrive,
/// the urgent job halfway; figures in engine seconds.
async fn pipeline_run(
    s: &workload::Scenario,
    window: WindowSetting,
    scale: f64,
) -> replay::Outcome {
    let e = &s.engine;
    let policy = if replay::priority_policy() {
        SchedulingPolicy::Priority
    } else {
        SchedulingPolicy::Fcfs
    };
    let sim = common::engine(SimConfig {
        kv_cache_tokens: Some(e.kv_cache_tokens),
        max_num_seqs: e.max_num_seqs,
        block_size: e.block_size,
        max_num_batched_tokens: e.max_num_batched_tokens,
        step_ms: e.step_ms,
        step_ms_per_seq: e.step_ms_per_seq,
        prefill_ms_per_1k: e.prefill_ms_per_1k,
        step_ms_per_1k_context: e.step_ms_per_1k_context,
        image_tokens: s.image_tokens.max(1),
        time_scale: scale,
        scheduling_policy: policy,
        ..SimConfig::default()
    })
    .await;
    let engine = Engine::Sim(sim);
    let dir = common::scratch();
    let mut c =
        common::config_serving(dir.path(), &engine.url(), engine.served_name(), 256, window);
    // The server's policy, as the harness's engine runs it.
    c.instances[0].scheduling_policy = Some(policy);
    let store = Arc::new(SqliteStore::open(&c.queue.db_path).unwrap());
    let backlog = s.jobs.iter().take_while(|j| j.arrival <= 0.0).count();
    store
        .submit_batch(
            s.jobs[..backlog]
                .iter()
                .enumerate()
                .map(|(i, j)| generated_job(j, i, "bulk", 0))
                .collect(),
            Timestamp::now(),
        )
        .unwrap();
    let first = engine.reading().await;
    let start = Instant::now();
    let wall = |engine_s: f64| start + Duration::from_secs_f64(engine_s / scale);
    let pipeline =
        common::start_pipeline(&c, Arc::new(SqliteStore::open(&c.queue.db_path).unwrap())).await;
    let handle = FeederHandle::new(pipeline.feeder.clone());
    let mut next = backlog;
    let mut urgent: Option<(JobId, Instant)> = None;
    let mut urgent_done = None;
    let mut waiting = Vec::new();
    let end = wall(s.seconds);
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = Instant::now();
        // The jobs that have arrived, in one batch.
        let due = s.jobs[next..]
            .iter()
            .take_while(|j| wall(j.arrival) <= now)
            .count();
        if due > 0 {
            let batch = (next..next + due)
                .map(|i| generated_job(&s.jobs[i], i, "bulk", 0))
                .collect();
            store.submit_batch(batch, Timestamp::now()).unwrap();
            next += due;
        }
        if urgent.is_none() && now >= wall(s.seconds / 2.0) {
            let id = handle
                .submit(vec![generated_job(&s.urgent, 0, URGENT, 100)])
                .await
                .unwrap()[0]
                .id;
            urgent = Some((id, Instant::now()));
        }
        if let Some((id, at)) = urgent.filter(|_| urgent_done.is_none()) {
            if store
                .get(id)
                .unwrap()
                .is_some_and(|j| j.status == JobStatus::Done)
            {
                urgent_done = Some(at.elapsed().as_secs_f64() * scale);
            }
        }
        waiting.push(engine.reading().await.waiting);
    }
    let last = engine.reading().await;
    let window = handle
        .status()
        .await
        .ok()
        .and_then(|st| st.dispatch.first().map(|d| d.window))
        .unwrap_or(0);
    pipeline.shutdown(Duration::ZERO).await;
    waiting.sort_by(f64::total_cmp);
    replay::Outcome {
        tokens_per_s: last.tokens_per_s_since(&first),
        preemptions: (last.preemptions - first.preemptions) as u64,
        requests: (last.successes - first.successes) as u64,
        urgent: urgent_done,
        window,
        median_waiting: waiting.get(waiting.len() / 2).copied().unwrap_or(0.0),
        trace: Vec::new(),
        urgent_detail: String::new(),
        recalled: 0,
    }
}

/// `-- seeds-pipeline`: report seeds (`BENCH_SEEDS`, default 1-3) through
/// the whole pipeline against the simulator at `BENCH_TIME_SCALE` (5), for
/// `BENCH_SECONDS` (40) of wall time a run: auto, and the fixed windows
/// around the best one that the virtual-time harness found (half, it,
/// twice), each beside the harness's figure for the same run length.
fn seeds_pipeline(rt: &tokio::runtime::Runtime) {
    let scale = env_f64("BENCH_TIME_SCALE", 5.0);
    let seconds = env_f64("BENCH_SECONDS", 40.0);
    println!(
        "generated workloads through the whole pipeline against the simulator (clock ×{scale}, {seconds} s of wall time a run); figures in engine seconds; [virtual-time harness, same run length]"
    );
    for seed in seeds(1..=3) {
        let mut s = scenario(seed);
        s.seconds = seconds * scale;
        s.urgent.arrival = s.seconds / 2.0;
        println!();
        println!("seed {seed}: {}", s.describe());
        let virtual_best = SEED_WINDOWS
            .iter()
            .map(|&n| {
                (
                    n,
                    replay::run(&s, feeder_actors::window::WindowMode::Fixed(n)),
                )
            })
            .filter(|(_, o)| (o.preemptions as f64) < 0.01 * o.requests.max(1) as f64)
            .max_by(|a, b| a.1.tokens_per_s.total_cmp(&b.1.tokens_per_s))
            .map_or(64, |(n, _)| n);
        let idle = replay::idle_time(&s);
        let mut best: Option<(u32, f64)> = None;
        let mut modes: Vec<Option<u32>> = [virtual_best / 2, virtual_best, virtual_best * 2]
            .into_iter()
            .filter(|n| *n >= 1)
            .map(Some)
            .collect();
        modes.push(None);
        for mode in modes {
            let (setting, wmode) = match mode {
                Some(n) => (
                    WindowSetting::Fixed(n),
                    feeder_actors::window::WindowMode::Fixed(n),
                ),
                None => (
                    WindowSetting::Auto,
                    feeder_actors::window::WindowMode::Auto { max: 1024 },
                ),
            };
            let o = rt.block_on(pipeline_run(&s, setting, scale));
            let v = replay::run(&s, wmode);
            let ok = (o.preemptions as f64) < 0.01 * o.requests.max(1) as f64;
            if let Some(n) = mode.filter(|_| ok && best.is_none_or(|(_, r)| o.tokens_per_s > r)) {
                best = Some((n, o.tokens_per_s));
            }
            let share = match (mode, best) {
                (None, Some((n, r))) => format!("  {:.2} of window {n}", o.tokens_per_s / r),
                _ => String::new(),
            };
            println!(
                "  {:<16} {:>8.0} tokens/s [{:>6.0}] {:>6} requests {:>14} preempted, urgent {} ({} × idle {idle:.2}s) [{}], {} waiting{share}",
                match mode {
                    Some(n) => format!("window {n}"),
                    None => format!("auto (ended at {})", o.window),
                },
                o.tokens_per_s,
                v.tokens_per_s,
                o.requests,
                format!(
                    "{} ({:.1} %)",
                    o.preemptions,
                    100.0 * o.preemptions as f64 / o.requests.max(1) as f64
                ),
                o.urgent.map_or("not done".into(), |u| format!("{u:.2}s")),
                o.urgent.map_or("-".into(), |u| format!("{:.2}", u / idle)),
                v.urgent.map_or("-".into(), |u| format!("{:.2}", u / idle)),
                o.median_waiting,
            );
        }
    }
}
