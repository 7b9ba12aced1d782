//! The simulator against the engine it imitates: the same request traces
//! through the real vLLM (its CPU build serving the tiny random-weight
//! Llama of `tests/common/vllm.rs`) and through `gpu-feeder sim` configured
//! with the same engine parameters, side by side. Prints the table; asserts
//! nothing.
//!
//!     cargo bench --bench fidelity
//!     FIDELITY_PROFILE=cpu cargo bench --bench fidelity   # the documented profile
//!     FIDELITY_VLLM_RUNS=1 cargo bench --bench fidelity   # vLLM once, not twice
//!
//! **vLLM** starts once (a minute or more on two cores) with its CPU
//! defaults (blocks of 128 tokens, chunked prefill), `--max-num-seqs 128`
//! (its CPU default, given so that the simulator need not guess it) and
//! `--num-gpu-blocks-override 80`: 10,240 tokens of KV cache, room for 64
//! short requests but not for 32 long ones. Its block size and block count
//! are read back from its `/metrics`, its `max_num_batched_tokens` from its
//! log. Before each trace it is left to finish what it ran and its prefix
//! cache is reset (`VLLM_SERVER_DEV_MODE=1`). Every trace runs
//! `FIDELITY_VLLM_RUNS` (2) times on it: the spread is the yardstick for
//! the simulator's differences.
//!
//! **The simulator** runs as a child process: `gpu-feeder sim` with vLLM's
//! figures as its flags and `--tokenizer` the model's own tokenizer (so
//! both count the same prompt tokens; the bench says whether they do), and
//! step times fitted to this very run of vLLM (the default) or the CPU
//! profile documented in `src/sim/engine.rs` (`FIDELITY_PROFILE=cpu`).
//!
//! **The fit** of the simulator's step times to vLLM's sweeps: see
//! `fidelity/fit.rs`.
//!
//! **The other traces** are not in the fit; they test what the scheduler
//! does with them:
//! - *small KV*: 48 requests at concurrency 32, unique ≈410-token prompts
//!   and 240 tokens out (four blocks each at admission, six at the end: the
//!   cache holds 19, then 13: 79 of its 80 blocks hold tokens, one is
//!   vLLM's null block): the peak of `vllm:num_requests_running` (sampled
//!   every 50 ms), and from a second, unsampled run the preemptions, the
//!   mean queue time (`vllm:request_queue_time_seconds`) and the
//!   throughput.
//! - *prefix*: 30 documents of ≈500 tokens, 3 questions about each (a
//!   system message with the document, a user message with the question),
//!   shuffled, at concurrency 4, 4 tokens out: the prefix cache's hit rate
//!   (`vllm:prefix_cache_hits_total / vllm:prefix_cache_queries_total`),
//!   decided by what the 80 blocks keep and evict, and the throughput.
//!
//! Every request asks `ignore_eos`, so that it generates exactly its
//! `max_tokens`, as the simulator's do. Both servers run on the same
//! machine, one after the other; the load average is printed, since other
//! work on the cores skews either.

#[path = "fidelity/fit.rs"]
mod fit;
#[path = "../tests/common/vllm.rs"]
mod vllm;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use gpu_feeder::sim::engine::EngineConfig;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// The name both servers answer to.
const NAME: &str = "tiny";
/// KV blocks of both.
const KV_BLOCKS: u64 = 80;
/// vLLM's default on CPU, given to both so that neither has to guess.
const MAX_NUM_SEQS: u64 = 128;
const SEED: u64 = 20_261_206;

/// A sweep: requests of one shape at several concurrencies.
struct Shape {
    name: &'static str,
    /// Prompt tokens of the user message's text (the chat template adds 9).
    prompt: usize,
    out: u32,
    /// (concurrency, requests).
    points: &'static [(usize, usize)],
}

/// The sweeps the step times are fitted to; the first is the throughput
/// curve the table reports.
const SHAPES: &[Shape] = &[
    Shape {
        name: "decode",
        prompt: 80,
        out: 32,
        points: &[
            (1, 96),
            (2, 96),
            (4, 96),
            (8, 96),
            (16, 192),
            (32, 384),
            (64, 768),
        ],
    },
    Shape {
        name: "prefill",
        prompt: 480,
        out: 4,
        points: &[(1, 32), (4, 32), (16, 128)],
    },
    Shape {
        name: "long context",
        prompt: 480,
        out: 96,
        points: &[(4, 16), (12, 36)],
    },
    Shape {
        name: "long output",
        prompt: 480,
        out: 240,
        points: &[(12, 24)],
    },
];

/// The counters a trace reads before and after (cumulative, so that a
/// trace's figure is the difference).
const COUNTERS: &[&str] = &[
    "vllm:num_preemptions_total",
    "vllm:prefix_cache_hits_total",
    "vllm:prefix_cache_queries_total",
    "vllm:request_queue_time_seconds_sum",
    "vllm:request_queue_time_seconds_count",
];

/// What one trace did on one server.
#[derive(Debug, Default)]
struct Outcome {
    /// Wall seconds, first request sent to last answered.
    wall: f64,
    /// `usage.completion_tokens`, summed.
    generated: u64,
    /// `usage.prompt_tokens` of each request, in trace order.
    prompt_tokens: Vec<u64>,
    /// Most `vllm:num_requests_running` seen (when sampled).
    peak_running: f64,
    /// Each of [`COUNTERS`], its change over the trace.
    delta: BTreeMap<&'static str, f64>,
}

impl Outcome {
    fn tokens_per_s(&self) -> f64 {
        self.generated as f64 / self.wall
    }

    fn mean_prompt(&self) -> f64 {
        self.prompt_tokens.iter().sum::<u64>() as f64 / self.prompt_tokens.len() as f64
    }

    fn queue_time(&self) -> f64 {
        let sum = self.delta["vllm:request_queue_time_seconds_sum"];
        sum / self.delta["vllm:request_queue_time_seconds_count"].max(1.0)
    }

    fn preemptions(&self) -> f64 {
        self.delta["vllm:num_preemptions_total"]
    }

    fn hit_rate(&self) -> f64 {
        let q = self.delta["vllm:prefix_cache_queries_total"];
        self.delta["vllm:prefix_cache_hits_total"] / q.max(1.0)
    }
}

/// One server under test, at `url`, and the client that asks it (with
/// keep-alive connections, as gpu-feeder's own client).
struct Server {
    url: String,
    http: reqwest::Client,
}

impl Server {
    fn new(url: &str) -> Server {
        Server {
            url: url.to_string(),
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(256)
                .build()
                .unwrap(),
        }
    }

    async fn metrics(&self) -> String {
        let got = self.http.get(format!("{}/metrics", self.url)).send().await;
        match got {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    async fn counters(&self) -> BTreeMap<&'static str, f64> {
        let text = self.metrics().await;
        COUNTERS
            .iter()
            .map(|&n| (n, vllm::metric(&text, n).unwrap_or(0.0)))
            .collect()
    }

    /// Waits until nothing runs or waits, then empties the prefix cache.
    async fn settle(&self) {
        let limit = Instant::now() + Duration::from_secs(120);
        loop {
            let m = self.metrics().await;
            let busy = vllm::metric(&m, "vllm:num_requests_running").unwrap_or(0.0)
                + vllm::metric(&m, "vllm:num_requests_waiting").unwrap_or(0.0);
            if busy == 0.0 && self.reset_prefix_cache().await {
                return;
            }
            assert!(Instant::now() < limit, "{} never settled", self.url);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn reset_prefix_cache(&self) -> bool {
        let url = format!("{}/reset_prefix_cache", self.url);
        match self.http.post(url).send().await {
            Ok(r) => r
                .json::<Value>()
                .await
                .is_ok_and(|v| v["success"] == json!(true)),
            Err(_) => false,
        }
    }

    /// Runs `asks` in a closed loop of `concurrency` clients; samples the
    /// running requests every 50 ms when `sample`.
    async fn run(&self, asks: &[Value], concurrency: usize, sample: bool) -> Outcome {
        self.settle().await;
        let before = self.counters().await;
        let next = AtomicUsize::new(0);
        let done = AtomicBool::new(false);
        let answers = Mutex::new(vec![(0u64, 0u64); asks.len()]);
        let start = Instant::now();
        let client = || async {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(ask) = asks.get(i) else {
                    return;
                };
                let usage = self.ask(ask).await;
                answers.lock().unwrap()[i] = usage;
            }
        };
        let clients = async {
            futures_util::future::join_all((0..concurrency).map(|_| client())).await;
            done.store(true, Ordering::Relaxed);
        };
        let sampler = async {
            let mut peak = 0.0f64;
            while sample && !done.load(Ordering::Relaxed) {
                let m = self.metrics().await;
                let running = vllm::metric(&m, "vllm:num_requests_running");
                peak = peak.max(running.unwrap_or(0.0));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            peak
        };
        let ((), peak) = tokio::join!(clients, sampler);
        let wall = start.elapsed().as_secs_f64();
        let after = self.counters().await;
        let answers = answers.into_inner().unwrap();
        Outcome {
            wall,
            generated: answers.iter().map(|a| a.1).sum(),
            prompt_tokens: answers.iter().map(|a| a.0).collect(),
            peak_running: peak,
            delta: COUNTERS
                .iter()
                .map(|&n| (n, after[n] - before[n]))
                .collect(),
        }
    }

    /// One chat completion: (prompt tokens, completion tokens).
    async fn ask(&self, body: &Value) -> (u64, u64) {
        let url = format!("{}/v1/chat/completions", self.url);
        let r = self
            .http
            .post(url)
            .json(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{} did not answer: {e}", self.url));
        let status = r.status();
        let text = r.text().await.unwrap_or_default();
        assert_eq!(status, 200, "{}: {text}", self.url);
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let n = |k: &str| v["usage"][k].as_u64().unwrap_or(0);
        (n("prompt_tokens"), n("completion_tokens"))
    }
}

/// A chat request generating exactly `max_tokens`.
fn ask(messages: Value, max_tokens: u32) -> Value {
    json!({
        "model": NAME,
        "messages": messages,
        "max_tokens": max_tokens,
        "ignore_eos": true,
        "temperature": 0.0,
    })
}

fn user(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

/// Prompt text of about a given number of tokens, by the model's tokenizer.
struct Texts {
    tokenizer: tokenizers::Tokenizer,
    rng: rand::rngs::StdRng,
    made: usize,
}

impl Texts {
    fn new(tokenizer: &Path) -> Texts {
        Texts {
            tokenizer: tokenizers::Tokenizer::from_file(tokenizer).expect("the model's tokenizer"),
            rng: rand::rngs::StdRng::seed_from_u64(SEED),
            made: 0,
        }
    }

    /// `head` and then random words, to about `tokens` tokens (each word is
    /// a pre-token of its own, so the counts add up).
    fn text(&mut self, head: &str, tokens: usize) -> String {
        let (tokenizer, rng) = (&self.tokenizer, &mut self.rng);
        let count = |t: &str| tokenizer.encode(t, false).map_or(0, |e| e.len());
        let mut text = head.to_string();
        let mut n = count(head);
        while n < tokens {
            let len = rng.random_range(2..9);
            let word: String = (0..len)
                .map(|_| char::from(b'a' + rng.random_range(0..26u8)))
                .collect();
            let word = format!(" {word}");
            n += count(&word);
            text.push_str(&word);
        }
        text
    }

    /// A prompt no other request shares, even in its first block.
    fn unique(&mut self, tokens: usize) -> String {
        self.made += 1;
        let head = format!("Request {}:", self.made);
        self.text(&head, tokens)
    }
}

/// The engine figures vLLM runs with, read back from it.
struct Figures {
    block_size: u64,
    num_blocks: u64,
    max_num_batched_tokens: u64,
    /// Where each figure came from.
    sources: Vec<String>,
}

/// The real vLLM, started once, and its figures.
fn start_vllm(model: &Path, log: &Path) -> (vllm::VllmServer, Figures) {
    let blocks = KV_BLOCKS.to_string();
    let seqs = MAX_NUM_SEQS.to_string();
    let server = vllm::VllmServer::start(
        model,
        NAME,
        &[
            "--num-gpu-blocks-override",
            &blocks,
            "--max-num-seqs",
            &seqs,
        ],
        &[("VLLM_SERVER_DEV_MODE", "1")],
        log,
    );
    let m = vllm::get(&server.url, "/metrics").map_or_else(String::new, |r| r.1);
    let info = m
        .lines()
        .find(|l| l.starts_with("vllm:cache_config_info{"))
        .unwrap_or("");
    let label = |name: &str| -> Option<u64> {
        let at = info.find(&format!("{name}=\""))? + name.len() + 2;
        info[at..].split('"').next()?.parse().ok()
    };
    // The top of vLLM's compile ranges, in the engine configuration it
    // logs, is its max_num_batched_tokens.
    let log_text = std::fs::read_to_string(log).unwrap_or_default();
    let key = "'compile_ranges_endpoints': [";
    let logged = log_text.find(key).and_then(|at| {
        let digits: String = log_text[at + key.len()..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().ok()
    });
    let mut sources = vec![
        "block size and KV blocks: vLLM's vllm:cache_config_info".to_string(),
        format!("max_num_seqs: given to both, vLLM's CPU default {MAX_NUM_SEQS}"),
    ];
    sources.push(match logged {
        Some(_) => "max_num_batched_tokens: vLLM's log (the top of its compile ranges)".into(),
        None => "max_num_batched_tokens: not in vLLM's log; its CPU default 2048".into(),
    });
    let figures = Figures {
        block_size: label("block_size").expect("vLLM's block_size"),
        num_blocks: label("num_gpu_blocks").expect("vLLM's num_gpu_blocks"),
        max_num_batched_tokens: logged.unwrap_or(2048),
        sources,
    };
    (server, figures)
}

/// `gpu-feeder sim` as a child process, killed on drop.
struct SimProcess {
    child: Child,
    url: String,
}

impl Drop for SimProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_sim(args: &[String]) -> SimProcess {
    let mut child = Command::new(env!("CARGO_BIN_EXE_gpu-feeder"))
        .arg("sim")
        .args(args)
        .env("VLLM_SERVER_DEV_MODE", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start gpu-feeder sim");
    let url = vllm::command::listening_url(&mut child, "gpu-feeder sim");
    SimProcess { child, url }
}

/// The step times the simulator runs with, in milliseconds.
#[derive(Clone, Copy, Debug)]
struct Steps {
    step: f64,
    per_seq: f64,
    prefill_per_1k: f64,
    per_1k_context: f64,
}

impl Steps {
    fn flags(&self) -> Vec<String> {
        vec![
            "--step-ms".into(),
            format!("{:.3}", self.step),
            "--step-ms-per-seq".into(),
            format!("{:.4}", self.per_seq),
            "--prefill-ms-per-1k".into(),
            format!("{:.3}", self.prefill_per_1k),
            "--step-ms-per-1k-context".into(),
            format!("{:.4}", self.per_1k_context),
        ]
    }
}

/// Every trace of the comparison.
struct Traces {
    /// Assorted messages, to compare prompt token counts.
    counting: Vec<Value>,
    /// Per shape of [`SHAPES`], per point.
    sweeps: Vec<Vec<Vec<Value>>>,
    small_kv: Vec<Value>,
    prefix: Vec<Value>,
}

fn traces(texts: &mut Texts) -> Traces {
    let counting = vec![
        ask(user("hello"), 1),
        ask(
            json!([
                {"role": "system", "content": "You answer in one word."},
                {"role": "user", "content": "What is the capital of France?"}
            ]),
            1,
        ),
        ask(
            json!([{"role": "user", "content": [
                {"type": "text", "text": "Two parts: "},
                {"type": "text", "text": "and the second, with\nnew lines\n\n and  spaces."}
            ]}]),
            1,
        ),
        ask(
            user("Unicode: naïve café, 東京, emoji 🚀, tabs\tand 12345.67"),
            1,
        ),
        ask(
            json!([
                {"role": "user", "content": "first"},
                {"role": "assistant", "content": "an answer"},
                {"role": "user", "content": "  leading and trailing spaces  "}
            ]),
            1,
        ),
        ask(user(&texts.unique(700)), 1),
    ];
    let sweeps = SHAPES
        .iter()
        .map(|shape| {
            shape
                .points
                .iter()
                .map(|&(_, n)| {
                    (0..n)
                        .map(|_| ask(user(&texts.unique(shape.prompt)), shape.out))
                        .collect()
                })
                .collect()
        })
        .collect();
    let small_kv = (0..48)
        .map(|_| ask(user(&texts.unique(400)), 240))
        .collect();
    let docs: Vec<String> = (0..30)
        .map(|d| texts.text(&format!("Document {d}."), 500))
        .collect();
    let mut prefix: Vec<Value> = docs
        .iter()
        .enumerate()
        .flat_map(|(d, doc)| {
            (0..3).map(move |q| {
                let question = format!("Question {q}: what does part {q} of document {d} say?");
                let messages = json!([
                    {"role": "system", "content": doc},
                    {"role": "user", "content": question}
                ]);
                ask(messages, 4)
            })
        })
        .collect();
    prefix.shuffle(&mut rand::rngs::StdRng::seed_from_u64(SEED));
    Traces {
        counting,
        sweeps,
        small_kv,
        prefix,
    }
}

/// Every trace's outcome on one server.
struct Results {
    counting: Outcome,
    /// As [`Traces::sweeps`].
    sweeps: Vec<Vec<Outcome>>,
    /// The small-KV trace, sampled for its running requests (rendering
    /// vLLM's `/metrics` takes its frontend's time: the other figures come
    /// from a second, unsampled run).
    small_kv_sampled: Outcome,
    small_kv: Outcome,
    prefix: Outcome,
}

async fn run_all(server: &Server, t: &Traces) -> Results {
    // A first pass, not measured: the first requests of a fresh vLLM are
    // slower.
    server.run(&t.sweeps[0][2], 4, false).await;
    let mut sweeps = Vec::new();
    for (shape, traces) in SHAPES.iter().zip(&t.sweeps) {
        let mut outcomes = Vec::new();
        for (&(c, _), asks) in shape.points.iter().zip(traces) {
            outcomes.push(server.run(asks, c, false).await);
        }
        sweeps.push(outcomes);
    }
    Results {
        counting: server.run(&t.counting, 1, false).await,
        sweeps,
        small_kv_sampled: server.run(&t.small_kv, 32, true).await,
        small_kv: server.run(&t.small_kv, 32, false).await,
        prefix: server.run(&t.prefix, 4, false).await,
    }
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// How one measure is read from a run's results.
type Measure<'a> = &'a dyn Fn(&Results) -> f64;

/// One row of the table: vLLM's runs, the simulator, and its ratio to the
/// mean of vLLM's runs.
fn row(name: &str, unit: &str, vllm: &[f64], sim: f64) {
    let mean = vllm.iter().sum::<f64>() / vllm.len() as f64;
    let r = sim / mean;
    let mark = if (r - 1.0).abs() <= 0.2 { "" } else { " ✗" };
    let runs: Vec<String> = vllm.iter().map(|v| format!("{v:.3}")).collect();
    println!(
        "| {name} | {} {unit} | {sim:.3} {unit} | {r:.2}{mark} |",
        runs.join(", ")
    );
}

fn main() {
    let model: PathBuf = vllm::vllm().llama();
    let tokenizer = model.join("tokenizer.json");
    let scratch = tempfile::tempdir().unwrap();
    let t = traces(&mut Texts::new(&tokenizer));
    let vllm_runs = std::env::var("FIDELITY_VLLM_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2usize)
        .max(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    println!("# Simulator fidelity: vLLM (CPU build, tiny Llama) against gpu-feeder sim\n");
    println!("load average at start: {}", load());
    let started = Instant::now();
    let (server, real) = start_vllm(&model, &scratch.path().join("vllm.log"));
    println!(
        "vLLM started in {:.0} s: blocks of {} tokens, {} KV blocks, max_num_batched_tokens {}, max_num_seqs {MAX_NUM_SEQS}",
        started.elapsed().as_secs_f64(),
        real.block_size,
        real.num_blocks,
        real.max_num_batched_tokens,
    );
    for s in &real.sources {
        println!("  ({s})");
    }
    let v: Vec<Results> = (0..vllm_runs)
        .map(|_| rt.block_on(run_all(&Server::new(&server.url), &t)))
        .collect();
    drop(server);
    println!("load average after vLLM: {}", load());

    let fitted = fit::fit(&v);
    let cpu = EngineConfig::cpu(real.num_blocks);
    let documented = Steps {
        step: cpu.step_ms,
        per_seq: cpu.step_ms_per_seq,
        prefill_per_1k: cpu.prefill_ms_per_1k,
        per_1k_context: cpu.step_ms_per_1k_context,
    };
    let use_documented = std::env::var("FIDELITY_PROFILE").is_ok_and(|p| p == "cpu");
    let steps = if use_documented { documented } else { fitted };
    println!(
        "\nStep times, ms: per step + per request in it + per 1,000 prefill tokens + per 1,000 tokens of context"
    );
    for (what, s) in [
        ("fitted to this run", fitted),
        ("documented CPU profile", documented),
    ] {
        println!(
            "  {what}: {:.3} + {:.4} + {:.3} + {:.4}",
            s.step, s.per_seq, s.prefill_per_1k, s.per_1k_context
        );
    }

    let mut args: Vec<String> = [
        "--port",
        "0",
        "--served-model-name",
        NAME,
        "--block-size",
        &real.block_size.to_string(),
        "--num-gpu-blocks-override",
        &real.num_blocks.to_string(),
        "--max-num-seqs",
        &MAX_NUM_SEQS.to_string(),
        "--max-num-batched-tokens",
        &real.max_num_batched_tokens.to_string(),
        "--tokenizer",
        &tokenizer.display().to_string(),
    ]
    .map(String::from)
    .to_vec();
    args.extend(steps.flags());
    println!("\ngpu-feeder sim {}", args.join(" "));
    let sim = start_sim(&args);
    let s = rt.block_on(run_all(&Server::new(&sim.url), &t));
    drop(sim);
    println!("load average after the sim: {}", load());

    let counted = |r: &Results| r.counting.prompt_tokens.clone();
    println!(
        "\nusage.prompt_tokens of assorted requests: vLLM {:?}, sim {:?}",
        counted(&v[0]),
        counted(&s)
    );
    let every = |r: &Results| -> Vec<u64> {
        let sweeps = r.sweeps.iter().flatten();
        sweeps
            .chain([&r.small_kv, &r.prefix])
            .flat_map(|o| o.prompt_tokens.iter().copied())
            .collect()
    };
    let (a, b) = (every(&v[0]), every(&s));
    let equal = a.iter().zip(&b).filter(|(x, y)| x == y).count();
    println!(
        "usage.prompt_tokens equal for {equal} of the {} requests of the traces",
        a.len()
    );

    println!("\n| metric | vLLM (each run) | sim | sim / vLLM |");
    println!("|---|---|---|---|");
    for (k, shape) in SHAPES.iter().enumerate() {
        for (i, &(c, _)) in shape.points.iter().enumerate() {
            let vllm: Vec<f64> = v.iter().map(|r| r.sweeps[k][i].tokens_per_s()).collect();
            row(
                &format!("{} sweep: throughput, concurrency {c}", shape.name),
                "tok/s",
                &vllm,
                s.sweeps[k][i].tokens_per_s(),
            );
        }
    }
    let last = SHAPES[0].points.len() - 1;
    // Each measure: its name, its unit, and how it is read from a run.
    let measures: [(&str, &str, Measure); 7] = [
        (
            "decode sweep: mean queue time, concurrency 64",
            "ms",
            &|r| r.sweeps[0][last].queue_time() * 1e3,
        ),
        ("small KV: peak running", "", &|r| {
            r.small_kv_sampled.peak_running
        }),
        ("small KV: preemptions", "", &|r| r.small_kv.preemptions()),
        ("small KV: mean queue time", "s", &|r| {
            r.small_kv.queue_time()
        }),
        ("small KV: throughput", "tok/s", &|r| {
            r.small_kv.tokens_per_s()
        }),
        ("prefix: hit rate", "", &|r| r.prefix.hit_rate()),
        ("prefix: throughput", "tok/s", &|r| r.prefix.tokens_per_s()),
    ];
    for (name, unit, measure) in measures {
        let vllm: Vec<f64> = v.iter().map(measure).collect();
        row(name, unit, &vllm, measure(&s));
    }
    println!("\n(✗: more than 20 % from the mean of vLLM's runs)");
}
