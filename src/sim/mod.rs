//! `gpu-feeder sim`: a simulated vLLM OpenAI-compatible server, for tests,
//! the demo, benchmarks and capacity planning.
//!
//! Two modes. By default it batches continuously in the simplest way: at
//! most `--max-num-seqs` requests run at once, the rest wait in arrival
//! order, and a request takes `--latency-ms` plus its `max_tokens` at
//! `--tokens-per-s` (instant by default), whatever the batch.
//!
//! With `--kv-cache-tokens N` (or vLLM's `--num-gpu-blocks-override N`, in
//! blocks of `--block-size`) it runs the engine model of [`engine`]: vLLM's
//! iteration-level scheduler with a finite KV cache in blocks, chunked
//! prefill, preemption by recompute, prefix caching, step times that grow
//! with the batch (calibrated for an 8B model on one H100 by default, and
//! against vLLM's CPU build; see [`engine`] for the figures and
//! `benches/fidelity.rs` for the comparison), `--max-num-queued-reqs`
//! admission control (503), and every request generating exactly its
//! `max_tokens`. `/metrics` then has vLLM's counters and histograms
//! (`vllm:num_preemptions_total`, `vllm:generation_tokens_total`,
//! `vllm:time_to_first_token_seconds`, …), and with `VLLM_SERVER_DEV_MODE=1`
//! `POST /reset_prefix_cache` empties the prefix cache, as vLLM's does.
//! `--time-scale F` runs the engine's clock F times faster than the wall
//! clock, for benchmarks.
//!
//! Prompt tokens are 4 characters each, unless `--tokenizer` names the
//! model's `tokenizer.json`: then they are counted as vLLM counts them,
//! over the chat template (see `prompt.rs`), for `usage.prompt_tokens` and
//! for the engine model's prefix cache alike.
//!
//! With `--enable-sleep-mode` and `VLLM_SERVER_DEV_MODE=1` it serves
//! vLLM's sleep mode (see `sleep.rs`): `/sleep`, `/wake_up`, `/collective_rpc`
//! (`reload_weights`) and `/is_sleeping`, with `--sleep-s`, `--wake-s` and
//! `--wake-l2-s`; completions get 503 while it sleeps.
//!
//! It serves
//! `/health` (503 while "loading" for `--load-s`), `/v1/models`,
//! `/v1/chat/completions` with usage (with `stream: true`, as vLLM's
//! server-sent events: the simple mode's words spread over the generation
//! time; the engine model's first word at its first token, the rest at its
//! end), and `/metrics` with
//! `vllm:num_requests_running`, `vllm:num_requests_waiting` and
//! `vllm:kv_cache_usage_perc`. Faults can be injected: `--fail-rate` answers
//! 500, `--hang-rate` never answers, `--crash-after N` exits after N requests,
//! `--fail-matching TEXT` refuses (400) requests containing TEXT, and
//! `--crash-matching TEXT` exits (as a crash would) on a request containing
//! TEXT — a "poison" payload. `--request-log FILE` appends a line per
//! request received and per answer given, with the request's `X-Request-Id`
//! (gpu-feeder sends its job id there; see `request_log.rs`), so that a test
//! can count the sends of each job at the server, across daemon crashes.
//!
//! It also accepts the vLLM server's command line, so that a configuration
//! can swap the vLLM image or program for the simulator and change nothing
//! else: `--model`, `--served-model-name`, `--port`, `--max-num-seqs`,
//! `--gpu-memory-utilization`, `--block-size`, `--max-num-batched-tokens`,
//! `--num-gpu-blocks-override` and `--tokenizer` are understood; any other
//! flag (`--dtype bfloat16`, `--enforce-eager`, …) is accepted and ignored,
//! with a note on stderr ([`vllm_compatible_args`]).
//!
//! Its parts: this file (the command line, the HTTP server, the simple
//! mode), [`engine`] (the scheduler model), `blocks.rs` (the KV cache's
//! blocks and prefix cache), `stats.rs` (counters with vLLM's meanings),
//! `prompt.rs` (prompt tokens), `served.rs` (the engine against the clock,
//! and its `/metrics`), `sleep.rs` (sleep mode) and `request_log.rs` (what
//! was asked and answered).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

mod blocks;
pub mod engine;
mod options;
mod prompt;
mod request_log;
mod served;
mod sleep;
mod slots;
mod stats;

pub use options::{vllm_compatible_args, SchedulingPolicy, SimConfig};
use prompt::Prompts;
pub use prompt::TokenizerError;
use request_log::RequestLog;
pub use served::EngineView;
use served::{Refused, Served};
use sleep::{Admission, Sleeper};

/// Counters of a running simulated server.
#[derive(Debug, Default)]
pub struct SimCounters {
    /// Requests received on /v1/chat/completions.
    pub requests: AtomicU64,
    /// Requests answered 200.
    pub completed: AtomicU64,
    /// Requests running now.
    pub running: AtomicUsize,
    /// Requests waiting for a slot now.
    pub waiting: AtomicUsize,
    /// Requests admitted and not yet answered.
    pub in_flight: AtomicUsize,
    /// When the last request arrived (for latency measurements).
    pub last_arrival: std::sync::Mutex<Option<Instant>>,
}

struct Sim {
    cfg: SimConfig,
    started: Instant,
    slots: slots::Slots,
    counters: Arc<SimCounters>,
    /// The engine model, with `--kv-cache-tokens`.
    served: Option<Arc<Served>>,
    /// Sleep mode, with `--enable-sleep-mode` and `VLLM_SERVER_DEV_MODE=1`.
    sleep: Option<Arc<Sleeper>>,
    /// Counts prompt tokens.
    prompts: Arc<Prompts>,
    /// `VLLM_SERVER_DEV_MODE=1`: the development endpoints are served.
    dev_mode: bool,
    /// `--request-log`: what was asked and answered, by request id.
    request_log: Option<RequestLog>,
}

/// A simulated server running in this process.
pub struct SimHandle {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its counters.
    pub counters: Arc<SimCounters>,
    served: Option<Arc<Served>>,
    task: tokio::task::JoinHandle<()>,
    engine_task: Option<tokio::task::JoinHandle<()>>,
    dropped: Arc<tokio::sync::Notify>,
}

impl SimHandle {
    /// The engine model's figures now (`None` without `--kv-cache-tokens`).
    pub fn engine(&self) -> Option<EngineView> {
        self.served.as_ref().map(|s| s.view())
    }

    /// Watches requests whose text contains `needle` (engine model only).
    pub fn watch(&self, needle: &str) {
        if let Some(s) = &self.served {
            s.watch(needle);
        }
    }

    /// Watched requests: (arrival, first token), engine seconds.
    pub fn watched(&self) -> Vec<(f64, Option<f64>)> {
        self.served.as_ref().map_or_else(Vec::new, |s| s.watched())
    }

    /// Its base URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Completes once this handle is dropped: for a thread that runs the
    /// server on a runtime of its own and should end with it.
    pub fn stopped(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let dropped = self.dropped.clone();
        async move { dropped.notified().await }
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        self.task.abort();
        if let Some(t) = &self.engine_task {
            t.abort();
        }
        self.dropped.notify_one();
    }
}

/// Starts a simulated server on the current runtime; fails when it cannot
/// listen or `--tokenizer` cannot be loaded.
pub async fn start(cfg: SimConfig) -> std::io::Result<SimHandle> {
    let prompts = Prompts::load(cfg.tokenizer_file().as_deref())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let prompts = Arc::new(prompts);
    let request_log = match &cfg.request_log {
        Some(path) => Some(RequestLog::open(path).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("cannot open --request-log {}: {e}", path.display()),
            )
        })?),
        None => None,
    };
    let listener = tokio::net::TcpListener::bind((cfg.host.as_str(), cfg.port)).await?;
    let addr = listener.local_addr()?;
    let counters = Arc::new(SimCounters::default());
    let (served, engine_task) = Served::start(&cfg, prompts.clone()).unzip();
    let dev_mode = cfg
        .dev_mode
        .unwrap_or_else(|| std::env::var("VLLM_SERVER_DEV_MODE").is_ok_and(|v| v == "1"));
    if cfg.enable_sleep_mode && !dev_mode {
        eprintln!(
            "sim: --enable-sleep-mode without VLLM_SERVER_DEV_MODE=1: the sleep endpoints are not served (as with vLLM)"
        );
    }
    let sleep = (cfg.enable_sleep_mode && dev_mode)
        .then(|| Arc::new(Sleeper::new(cfg.sleep_s, cfg.wake_s, cfg.wake_l2_s)));
    let sim = Arc::new(Sim {
        served: served.clone(),
        sleep,
        prompts,
        dev_mode,
        request_log,
        slots: slots::Slots::new(
            cfg.max_num_seqs,
            cfg.scheduling_policy == SchedulingPolicy::Priority,
        ),
        cfg,
        started: Instant::now(),
        counters: counters.clone(),
    });
    let app = Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/metrics", get(metrics))
        .route("/sleep", post(sleep::sleep))
        .route("/wake_up", post(sleep::wake_up))
        .route("/collective_rpc", post(sleep::collective_rpc))
        .route("/is_sleeping", get(sleep::is_sleeping))
        .route("/reset_prefix_cache", post(reset_prefix_cache))
        .with_state(sim);
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(SimHandle {
        addr,
        counters,
        served,
        task,
        engine_task,
        dropped: Arc::new(tokio::sync::Notify::new()),
    })
}

/// `gpu-feeder sim`: serves until killed; prints `listening on URL` first.
pub async fn serve(cfg: SimConfig) -> anyhow::Result<()> {
    let handle = start(cfg.clone()).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::InvalidInput => anyhow::anyhow!("{e}"),
        _ => anyhow::anyhow!(
            "cannot listen on {}:{}: {e} (choose another --port)",
            cfg.host,
            cfg.port
        ),
    })?;
    println!("listening on {}", handle.url());
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    tokio::signal::ctrl_c().await?;
    Ok(())
}

impl Sim {
    fn loading(&self) -> bool {
        self.started.elapsed().as_secs_f64() < self.cfg.load_s
    }

    /// Requests admitted and not yet answered.
    fn in_flight(&self) -> usize {
        self.counters.in_flight.load(Ordering::Relaxed)
    }
}

async fn health(State(sim): State<Arc<Sim>>) -> StatusCode {
    if sim.loading() {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    }
}

async fn models(State(sim): State<Arc<Sim>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{"id": sim.cfg.served_model_name, "object": "model", "owned_by": "gpu-feeder-sim"}],
    }))
}

async fn metrics(State(sim): State<Arc<Sim>>) -> String {
    if let Some(served) = &sim.served {
        let mem = sim.cfg.gpu_memory_utilization.unwrap_or(0.9);
        return served.metrics(&sim.cfg.served_model_name, mem);
    }
    let c = &sim.counters;
    let running = c.running.load(Ordering::Relaxed);
    let waiting = c.waiting.load(Ordering::Relaxed);
    let model = &sim.cfg.served_model_name;
    let usage = running as f64 / sim.cfg.max_num_seqs.max(1) as f64;
    format!(
        "# HELP vllm:num_requests_running Number of requests in model execution batches.\n\
         # TYPE vllm:num_requests_running gauge\n\
         vllm:num_requests_running{{model_name=\"{model}\"}} {running}\n\
         # HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n\
         # TYPE vllm:num_requests_waiting gauge\n\
         vllm:num_requests_waiting{{model_name=\"{model}\"}} {waiting}\n\
         # HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.\n\
         # TYPE vllm:kv_cache_usage_perc gauge\n\
         vllm:kv_cache_usage_perc{{model_name=\"{model}\"}} {usage}\n\
         # HELP vllm:cache_config_info The gpu_memory_utilization the server was started with.\n\
         # TYPE vllm:cache_config_info gauge\n\
         vllm:cache_config_info{{model_name=\"{model}\",gpu_memory_utilization=\"{mem}\"}} 1\n",
        mem = sim.cfg.gpu_memory_utilization.unwrap_or(0.9)
    )
}

/// `POST /reset_prefix_cache`, a vLLM development endpoint (served only
/// with `VLLM_SERVER_DEV_MODE=1`): `{"success": false}` while requests hold
/// KV blocks. Benchmarks reset between runs, as with vLLM.
async fn reset_prefix_cache(State(sim): State<Arc<Sim>>) -> Response {
    if !sim.dev_mode {
        return error(StatusCode::NOT_FOUND, "Not Found");
    }
    let success = sim.served.as_ref().is_none_or(|s| s.reset_prefix_cache());
    Json(json!({ "success": success })).into_response()
}

fn error(status: StatusCode, message: &str) -> Response {
    (
        status,
        Json(json!({"error": {"message": message, "code": status.as_u16()}})),
    )
        .into_response()
}

struct Gauge<'a>(&'a AtomicUsize);

impl<'a> Gauge<'a> {
    fn up(a: &'a AtomicUsize) -> Self {
        a.fetch_add(1, Ordering::Relaxed);
        Gauge(a)
    }
}

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The answer's text: what a test can check came from this request.
fn answer(messages: &[Value]) -> (String, usize) {
    let mut chars = 0;
    let mut text = String::new();
    let mut image_bytes = 0;
    for m in messages {
        match m.get("content") {
            Some(Value::String(s)) => {
                chars += s.len();
                if m.get("role").and_then(Value::as_str) == Some("user") {
                    text = s.clone();
                }
            }
            Some(Value::Array(parts)) => {
                for p in parts {
                    if let Some(t) = p.get("text").and_then(Value::as_str) {
                        chars += t.len();
                        text = t.to_string();
                    }
                    if let Some(u) = p.pointer("/image_url/url").and_then(Value::as_str) {
                        image_bytes += u.len() / 4 * 3;
                    }
                }
            }
            _ => {}
        }
    }
    let excerpt: String = text.chars().take(200).collect();
    let content = if image_bytes > 0 {
        format!("ocr: image of about {image_bytes} bytes; {excerpt}")
    } else {
        format!("echo: {excerpt}")
    };
    (content, chars / 4 + image_bytes / 1000 + 1)
}

async fn chat(
    State(sim): State<Arc<Sim>>,
    headers: HeaderMap,
    body: Option<Json<Value>>,
) -> Response {
    let c = &sim.counters;
    *c.last_arrival.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    let n = c.requests.fetch_add(1, Ordering::Relaxed) + 1;
    let Some(log) = &sim.request_log else {
        return respond(&sim, n, body).await;
    };
    let id = headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map_or_else(|| "-".to_string(), |v| v.replace('\t', " "));
    log.received(n, &id);
    let response = respond(&sim, n, body).await;
    log.answered(n, response.status().as_u16(), &id);
    response
}

/// Request number `n`'s answer.
async fn respond(sim: &Arc<Sim>, n: u64, body: Option<Json<Value>>) -> Response {
    let c = &sim.counters;
    if sim.cfg.crash_after > 0 && n > sim.cfg.crash_after {
        eprintln!(
            "sim: crashing at request {n} (--crash-after {})",
            sim.cfg.crash_after
        );
        std::process::exit(3);
    }
    if sim.loading() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "the model is loading");
    }
    let admission = sim
        .sleep
        .as_ref()
        .map_or(Admission::Serve, |s| s.admission());
    if admission == Admission::Asleep {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the engine is asleep (POST /wake_up wakes it)",
        );
    }
    // A sleep cuts the simple mode's requests short (the engine model
    // aborts its own).
    let aborted = sim
        .sleep
        .as_ref()
        .filter(|_| sim.served.is_none())
        .map(|s| s.aborted());
    let in_flight = Gauge::up(&c.in_flight);
    let Some(Json(body)) = body else {
        return error(StatusCode::BAD_REQUEST, "the body is not valid JSON");
    };
    let model = body.get("model").and_then(Value::as_str).unwrap_or("");
    if model != sim.cfg.served_model_name {
        return error(
            StatusCode::NOT_FOUND,
            &format!("The model `{model}` does not exist."),
        );
    }
    let Some(messages) = body
        .get("messages")
        .and_then(Value::as_array)
        .filter(|m| !m.is_empty())
    else {
        return error(
            StatusCode::BAD_REQUEST,
            "`messages` must be a non-empty array",
        );
    };
    let max_tokens = body.get("max_tokens").and_then(Value::as_u64).unwrap_or(16);
    // vLLM's request priority (lower runs first); heeded only under
    // `--scheduling-policy priority`.
    let priority = body.get("priority").and_then(Value::as_i64).unwrap_or(0);
    if let Some(needle) = &sim.cfg.crash_matching {
        if serde_json::to_string(messages).is_ok_and(|t| t.contains(needle.as_str())) {
            eprintln!("sim: crashing on a request containing `{needle}` (--crash-matching)");
            std::process::exit(3);
        }
    }
    if let Some(needle) = &sim.cfg.fail_matching {
        if serde_json::to_string(messages).is_ok_and(|t| t.contains(needle.as_str())) {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("simulated rejection: the request contains `{needle}`"),
            );
        }
    }
    let roll: f64 = rand::random();
    if roll < sim.cfg.fail_rate {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "simulated failure (--fail-rate)",
        );
    }
    if roll < sim.cfg.fail_rate + sim.cfg.hang_rate {
        std::future::pending::<()>().await;
    }
    let ask = Ask {
        n,
        max_tokens,
        priority,
        admission,
    };
    if body.get("stream") == Some(&Value::Bool(true)) {
        let include_usage =
            body.pointer("/stream_options/include_usage") == Some(&Value::Bool(true));
        // The streamed work counts itself in flight.
        drop(in_flight);
        return streamed(sim.clone(), body, ask, aborted, include_usage).await;
    }
    let work = generate(sim, messages, &ask, None);
    let done = match aborted {
        Some(aborted) => {
            tokio::select! {
                done = work => done,
                () = aborted => Ok(Generated::aborted()),
            }
        }
        None => work.await,
    };
    match done {
        Ok(g) => completion(sim, n, g),
        Err(refused) => refused,
    }
}

/// What a request asks for, once read.
struct Ask {
    n: u64,
    max_tokens: u64,
    priority: i64,
    admission: Admission,
}

/// A finished generation.
struct Generated {
    content: String,
    finish_reason: &'static str,
    prompt_tokens: u64,
    completion_tokens: u64,
    /// How much of `content` (bytes) was sent as it was made.
    sent: usize,
}

impl Generated {
    /// Cut short by a sleep.
    fn aborted() -> Self {
        Generated {
            content: String::new(),
            finish_reason: "abort",
            prompt_tokens: 0,
            completion_tokens: 0,
            sent: 0,
        }
    }
}

/// Runs one request: its answer, or the response that refuses it. With
/// `pieces`, the simple mode sends the answer's words as they are made,
/// spread over its generation time; the engine model sends the first word
/// when its first token is made (the rest comes with the answer).
async fn generate(
    sim: &Sim,
    messages: &[Value],
    ask: &Ask,
    pieces: Option<&tokio::sync::mpsc::UnboundedSender<String>>,
) -> Result<Generated, Response> {
    let c = &sim.counters;
    let garbled = |content: String| match ask.admission {
        Admission::Garbage => sleep::garbage(ask.n),
        _ => content,
    };
    let max_tokens = ask.max_tokens;
    if let Some(served) = &sim.served {
        let max_tokens = u32::try_from(max_tokens).unwrap_or(u32::MAX);
        let content = garbled(answer(messages).0);
        // Streamed: the first word goes out with the first token, the rest
        // when the answer is complete.
        let (first_tx, first_rx) = tokio::sync::oneshot::channel();
        let run = served.run(
            ask.n,
            messages,
            max_tokens,
            ask.priority,
            pieces.is_some().then_some(first_tx),
        );
        tokio::pin!(run);
        let mut sent = 0;
        let ran = match pieces {
            Some(tx) => tokio::select! {
                ran = &mut run => ran,
                Ok(()) = first_rx => {
                    let first = content.split_inclusive(' ').next().unwrap_or("");
                    sent = first.len();
                    let _ = tx.send(first.to_string());
                    run.await
                }
            },
            None => run.await,
        };
        let done = match ran {
            Ok(done) => done,
            Err(Refused::QueueFull) => {
                return Err(error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the server's queue is full (--max-num-queued-reqs); try again later",
                ))
            }
            Err(Refused::TooLong { tokens, capacity }) => {
                return Err(error(
                    StatusCode::BAD_REQUEST,
                    &format!(
                        "the request needs {tokens} tokens (its prompt and max_tokens), more than the KV cache holds ({capacity})"
                    ),
                ))
            }
            Err(Refused::Aborted) => return Ok(Generated::aborted()),
        };
        c.completed.fetch_add(1, Ordering::Relaxed);
        return Ok(Generated {
            content,
            finish_reason: "length",
            prompt_tokens: done.prompt_tokens as u64,
            completion_tokens: done.generated as u64,
            sent,
        });
    }
    let (content, estimated) = answer(messages);
    let content = garbled(content);
    {
        let permit = {
            let _waiting = Gauge::up(&c.waiting);
            sim.slots.acquire(ask.priority).await
        };
        let _running = Gauge::up(&c.running);
        let latency = Duration::from_millis(sim.cfg.latency_ms);
        let generation = if sim.cfg.tokens_per_s > 0.0 {
            Duration::from_secs_f64(max_tokens as f64 / sim.cfg.tokens_per_s)
        } else {
            Duration::ZERO
        };
        match pieces {
            Some(tx) => {
                // The first word after the latency, the others spread
                // evenly over the generation time.
                let words: Vec<&str> = content.split_inclusive(' ').collect();
                let step = generation / u32::try_from(words.len().max(1)).unwrap_or(u32::MAX);
                if !latency.is_zero() {
                    tokio::time::sleep(latency).await;
                }
                for (i, w) in words.iter().enumerate() {
                    if i > 0 && !step.is_zero() {
                        tokio::time::sleep(step).await;
                    }
                    let _ = tx.send((*w).to_string());
                }
                if !step.is_zero() {
                    tokio::time::sleep(step).await;
                }
            }
            None => {
                let delay = latency + generation;
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
            }
        }
        drop(permit);
    }
    let prompt_tokens = match *sim.prompts {
        Prompts::Estimate => estimated,
        _ => sim.prompts.tokens(messages, sim.cfg.image_tokens).len(),
    };
    let completion_tokens = (content.split_whitespace().count() as u64).min(max_tokens.max(1));
    c.completed.fetch_add(1, Ordering::Relaxed);
    Ok(Generated {
        sent: if pieces.is_some() { content.len() } else { 0 },
        content,
        finish_reason: "stop",
        prompt_tokens: prompt_tokens as u64,
        completion_tokens,
    })
}

/// What the work of a streamed request reports.
enum Progress {
    /// Words of the answer, as they are made.
    Piece(String),
    /// The answer is complete.
    Done(Generated),
    /// Refused before any word: sent as the HTTP error it is.
    Refused(Response),
}

/// A `stream: true` request: the HTTP status waits for the first word (a
/// refusal before it is a plain error response, as vLLM's are), then the
/// answer goes out as `chat.completion.chunk` events, ending with the
/// usage (when asked for) and `data: [DONE]`. A client that goes away ends
/// the work.
async fn streamed(
    sim: Arc<Sim>,
    body: Value,
    ask: Ask,
    aborted: Option<impl std::future::Future<Output = ()> + Send + 'static>,
    include_usage: bool,
) -> Response {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Progress>();
    let n = ask.n;
    let work_sim = sim.clone();
    tokio::spawn(async move {
        let sim = work_sim;
        let _in_flight = Gauge::up(&sim.counters.in_flight);
        let messages = body
            .get("messages")
            .and_then(Value::as_array)
            .map_or(&[][..], Vec::as_slice);
        let (words, mut heard) = tokio::sync::mpsc::unbounded_channel();
        let work = generate(&sim, messages, &ask, Some(&words));
        let relay = async {
            while let Some(w) = heard.recv().await {
                if tx.send(Progress::Piece(w)).is_err() {
                    return;
                }
            }
        };
        let aborted = async {
            match aborted {
                Some(a) => a.await,
                None => std::future::pending().await,
            }
        };
        let done = tokio::select! {
            done = work => done,
            () = aborted => Ok(Generated::aborted()),
            // The client went away: the request ends here.
            () = tx.closed() => return,
            () = relay => return,
        };
        // Words made just before the end are still in the channel.
        while let Ok(w) = heard.try_recv() {
            let _ = tx.send(Progress::Piece(w));
        }
        let _ = tx.send(match done {
            Ok(g) => Progress::Done(g),
            Err(refused) => Progress::Refused(refused),
        });
    });
    let first = match rx.recv().await {
        Some(Progress::Refused(r)) => return r,
        Some(first) => first,
        None => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the request's work ended without an answer",
            )
        }
    };
    let created = unix_secs();
    let model = sim.cfg.served_model_name.clone();
    let chunk = move |delta: Value, finish: Option<&str>, usage: Option<Value>| {
        let mut c = json!({
            "id": format!("chatcmpl-sim-{n}"),
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        });
        if let Some(u) = usage {
            c["choices"] = json!([]);
            c["usage"] = u;
        }
        axum::body::Bytes::from(format!("data: {c}\n\n"))
    };
    // The role comes with the first words, as vLLM sends it.
    let opening = chunk(json!({"role": "assistant", "content": ""}), None, None);
    let events = futures_util::stream::unfold(
        (Some(opening), Some(first), rx, false),
        move |(mut opening, mut next, mut rx, ended)| {
            let chunk = chunk.clone();
            async move {
                if let Some(o) = opening.take() {
                    return Some((
                        Ok::<_, std::convert::Infallible>(o),
                        (None, next, rx, ended),
                    ));
                }
                if ended {
                    return None;
                }
                let progress = match next.take() {
                    Some(p) => p,
                    None => rx.recv().await?,
                };
                let out = match progress {
                    Progress::Piece(w) => chunk(json!({"content": w}), None, None),
                    Progress::Done(g) => {
                        let mut out = Vec::new();
                        // What was not sent as it was made (the engine
                        // model's answer after its first word, an aborted
                        // answer's nothing), at once.
                        let rest = g.content.get(g.sent..).unwrap_or("");
                        if !rest.is_empty() || g.sent == 0 {
                            out.extend_from_slice(&chunk(json!({"content": rest}), None, None));
                        }
                        out.extend_from_slice(&chunk(json!({}), Some(g.finish_reason), None));
                        if include_usage {
                            let usage = json!({
                                "prompt_tokens": g.prompt_tokens,
                                "completion_tokens": g.completion_tokens,
                                "total_tokens": g.prompt_tokens + g.completion_tokens,
                            });
                            out.extend_from_slice(&chunk(Value::Null, None, Some(usage)));
                        }
                        out.extend_from_slice(b"data: [DONE]\n\n");
                        return Some((Ok(out.into()), (None, None, rx, true)));
                    }
                    Progress::Refused(r) => {
                        let e = json!({"error": {"message": format!("the request was refused mid-stream (HTTP {})", r.status().as_u16()), "code": r.status().as_u16()}});
                        return Some((Ok(format!("data: {e}\n\n").into()), (None, None, rx, true)));
                    }
                };
                Some((Ok(out), (None, None, rx, false)))
            }
        },
    );
    (
        [(axum::http::header::CONTENT_TYPE, "text/event-stream")],
        axum::body::Body::from_stream(events),
    )
        .into_response()
}

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// A chat completion response.
fn completion(sim: &Sim, n: u64, g: Generated) -> Response {
    Json(json!({
        "id": format!("chatcmpl-sim-{n}"),
        "object": "chat.completion",
        "created": unix_secs(),
        "model": sim.cfg.served_model_name,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": g.content},
            "finish_reason": g.finish_reason,
        }],
        "usage": {
            "prompt_tokens": g.prompt_tokens,
            "completion_tokens": g.completion_tokens,
            "total_tokens": g.prompt_tokens + g.completion_tokens,
        },
    }))
    .into_response()
}
