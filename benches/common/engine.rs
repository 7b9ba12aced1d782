//! The engine a benchmark runs against: the in-process simulator or the
//! real vLLM (its CPU build serving the tiny Llama of `tests/common/vllm.rs`),
//! and one reading of either's counters, so that a bench prints the same
//! table for both from the same figures.
//!
//! `BENCH_ENGINE` picks them: `sim`, `vllm`, or `both` (the default), the
//! simulator first. The simulator is read directly (its clock is engine
//! time); vLLM is read from its `/metrics` (its clock is the wall clock).
//! A bench starts one vLLM for all its runs (it takes a minute to start)
//! and [`RealVllm::settle`]s it between runs, so that no run inherits
//! another's requests or cached prefixes.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use gpu_feeder::sim::SimHandle;

use super::vllm::{self, VllmServer};

/// One of the engines a bench can run against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The engine simulator, in this process.
    Sim,
    /// The real vLLM, a child process.
    Vllm,
}

/// The engines `BENCH_ENGINE` asks for, in the order they run.
pub fn chosen() -> Vec<Kind> {
    match std::env::var("BENCH_ENGINE").as_deref() {
        Ok("sim") => vec![Kind::Sim],
        Ok("vllm") => vec![Kind::Vllm],
        Ok("both") | Ok("") | Err(_) => vec![Kind::Sim, Kind::Vllm],
        Ok(other) => panic!("BENCH_ENGINE={other}: say sim, vllm or both"),
    }
}

/// An engine's counters and gauges at one moment (vLLM's metric names).
/// Counters are cumulative: a run's figures are the difference of two.
#[derive(Clone, Copy, Debug, Default)]
pub struct Reading {
    /// Seconds on the engine's clock: engine time for the simulator, the
    /// wall clock for vLLM.
    pub now: f64,
    /// `vllm:generation_tokens_total`.
    pub generation_tokens: f64,
    /// `vllm:num_preemptions_total`.
    pub preemptions: f64,
    /// `vllm:request_success_total`, less aborted and failed requests.
    pub successes: f64,
    /// `vllm:num_requests_waiting`.
    pub waiting: f64,
    /// `vllm:num_requests_running`.
    pub running: f64,
    /// `vllm:kv_cache_usage_perc` (vLLM only; 0 for the simulator).
    pub kv_usage: f64,
    /// `vllm:e2e_request_latency_seconds` (sum, count).
    pub e2e: (f64, f64),
    /// `vllm:time_to_first_token_seconds` (sum, count).
    pub ttft: (f64, f64),
    /// `vllm:prefix_cache_hits_total`, `vllm:prefix_cache_queries_total`.
    pub prefix: (f64, f64),
}

impl Reading {
    /// The simulator's figures now.
    pub fn of_sim(sim: &SimHandle) -> Reading {
        let e = sim
            .engine()
            .expect("the bench's simulator runs its engine model");
        Reading {
            now: e.now,
            generation_tokens: e.stats.generation_tokens as f64,
            preemptions: e.stats.preemptions as f64,
            successes: e.stats.successes as f64,
            waiting: e.waiting as f64,
            running: e.running as f64,
            kv_usage: 0.0,
            e2e: (e.stats.e2e.sum, e.stats.e2e.count as f64),
            ttft: (e.stats.ttft.sum, e.stats.ttft.count as f64),
            prefix: (e.stats.prefix_hits as f64, e.stats.prefix_queries as f64),
        }
    }

    /// vLLM's figures from its `/metrics` text, read at `now`.
    pub fn of_vllm(text: &str, now: f64) -> Reading {
        let m = |name: &str| vllm::metric(text, name).unwrap_or(0.0);
        // Aborted and failed requests are series of the success counter too.
        let finished: String = text
            .lines()
            .filter(|l| !l.contains("finished_reason=\"abort\"") && !l.contains("=\"error\""))
            .map(|l| format!("{l}\n"))
            .collect();
        Reading {
            now,
            generation_tokens: m("vllm:generation_tokens_total"),
            preemptions: m("vllm:num_preemptions_total"),
            successes: vllm::metric(&finished, "vllm:request_success_total").unwrap_or(0.0),
            waiting: m("vllm:num_requests_waiting"),
            running: m("vllm:num_requests_running"),
            kv_usage: m("vllm:kv_cache_usage_perc"),
            e2e: (
                m("vllm:e2e_request_latency_seconds_sum"),
                m("vllm:e2e_request_latency_seconds_count"),
            ),
            ttft: (
                m("vllm:time_to_first_token_seconds_sum"),
                m("vllm:time_to_first_token_seconds_count"),
            ),
            prefix: (
                m("vllm:prefix_cache_hits_total"),
                m("vllm:prefix_cache_queries_total"),
            ),
        }
    }

    /// Generated tokens per second of the engine's clock since `start`.
    pub fn tokens_per_s_since(&self, start: &Reading) -> f64 {
        let span = self.now - start.now;
        if span > 0.0 {
            (self.generation_tokens - start.generation_tokens) / span
        } else {
            0.0
        }
    }

    /// The mean of a histogram over the requests finished since `start`.
    pub fn mean_since(now: (f64, f64), start: (f64, f64)) -> f64 {
        let count = now.1 - start.1;
        if count > 0.0 {
            (now.0 - start.0) / count
        } else {
            0.0
        }
    }

    /// The prefix-cache hit rate (in tokens) since `start`.
    pub fn hit_rate_since(&self, start: &Reading) -> f64 {
        let queries = self.prefix.1 - start.prefix.1;
        if queries > 0.0 {
            (self.prefix.0 - start.prefix.0) / queries
        } else {
            0.0
        }
    }
}

/// The wall clock vLLM readings are on: seconds since the bench started.
fn wall_now() -> f64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_secs_f64()
}

/// The served model name of a bench's vLLM.
pub const VLLM_NAME: &str = "tiny-llama";

/// The real vLLM of a bench, started once and shared by its runs.
pub struct RealVllm {
    server: VllmServer,
    /// The flags it was started with (besides the model and the port), for
    /// the bench's header.
    pub args: Vec<String>,
    http: reqwest::Client,
}

impl RealVllm {
    /// Starts vLLM on the tiny Llama with `args` (after the shared base
    /// flags), its development endpoints on (for `/reset_prefix_cache`),
    /// logging to `<target tmp>/bench-vllm-<name>.log`; blocks until it is
    /// healthy (a minute or so).
    pub fn start(name: &str, args: &[&str]) -> RealVllm {
        let log = Self::log_path(name);
        let model = vllm::vllm().llama();
        let server = VllmServer::start(
            &model,
            VLLM_NAME,
            args,
            &[("VLLM_SERVER_DEV_MODE", "1")],
            &log,
        );
        RealVllm {
            server,
            args: args.iter().map(|a| a.to_string()).collect(),
            http: reqwest::Client::new(),
        }
    }

    /// Where the vLLM of bench `name` logs.
    pub fn log_path(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("bench-vllm-{name}.log"))
    }

    /// Its base URL.
    pub fn url(&self) -> &str {
        &self.server.url
    }

    /// Its figures now.
    pub async fn reading(&self) -> Reading {
        let text = self.get("/metrics").await.unwrap_or_default();
        Reading::of_vllm(&text, wall_now())
    }

    async fn get(&self, path: &str) -> Option<String> {
        let r = self
            .http
            .get(format!("{}{path}", self.url()))
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .ok()?;
        r.text().await.ok()
    }

    /// Waits until nothing runs or waits inside it (the last run's
    /// requests, cancelled or not, are gone), then empties its prefix cache.
    pub async fn settle(&self) {
        let limit = Instant::now() + Duration::from_secs(300);
        loop {
            let r = self.reading().await;
            if r.running == 0.0 && r.waiting == 0.0 {
                break;
            }
            assert!(
                Instant::now() < limit,
                "vLLM still runs {} and queues {} requests after 5 minutes",
                r.running,
                r.waiting
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let reset = self
            .http
            .post(format!("{}/reset_prefix_cache", self.url()))
            .send()
            .await
            .map(|r| r.status());
        assert!(
            reset.as_ref().is_ok_and(|s| s.is_success()),
            "vLLM did not reset its prefix cache: {reset:?}"
        );
    }

    /// How many prompt tokens vLLM makes of a chat request's `messages`.
    pub async fn prompt_tokens(&self, messages: &serde_json::Value) -> Option<u64> {
        let r = self
            .http
            .post(format!("{}/tokenize", self.url()))
            .json(&serde_json::json!({"model": VLLM_NAME, "messages": messages}))
            .send()
            .await
            .ok()?;
        let v: serde_json::Value = r.json().await.ok()?;
        v["count"].as_u64()
    }
}

/// The engine of one run: a simulator of its own, or the bench's vLLM.
pub enum Engine<'a> {
    /// A fresh simulator.
    Sim(SimHandle),
    /// The bench's vLLM, settled before the run.
    Vllm(&'a RealVllm),
}

impl Engine<'_> {
    /// Its base URL.
    pub fn url(&self) -> String {
        match self {
            Engine::Sim(s) => s.url(),
            Engine::Vllm(v) => v.url().to_string(),
        }
    }

    /// The model name requests must carry.
    pub fn served_name(&self) -> &'static str {
        match self {
            Engine::Sim(_) => "sim",
            Engine::Vllm(_) => VLLM_NAME,
        }
    }

    /// Its figures now.
    pub async fn reading(&self) -> Reading {
        match self {
            Engine::Sim(s) => Reading::of_sim(s),
            Engine::Vllm(v) => v.reading().await,
        }
    }

    /// How often a bench samples its gauges: the simulator's are free to
    /// read; every read of vLLM's `/metrics` takes its API server's time on
    /// the cores it computes on.
    pub fn sample_every(&self) -> Duration {
        match self {
            Engine::Sim(_) => Duration::from_millis(100),
            Engine::Vllm(_) => Duration::from_millis(250),
        }
    }

    /// Which engine it is.
    pub fn kind(&self) -> Kind {
        match self {
            Engine::Sim(_) => Kind::Sim,
            Engine::Vllm(_) => Kind::Vllm,
        }
    }
}
