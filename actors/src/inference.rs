//! The `InferenceClient` port: one model server, as the dispatcher sees it.
//!
//! The adapter (OpenAI-compatible HTTP in the `gpu-feeder` crate) turns a
//! job's payload into a chat-completion request, sends it, and classifies
//! what went wrong, so that the dispatcher only decides *what to do*: retry,
//! fail, or back off.

use std::time::Duration;

use async_trait::async_trait;

use crate::job::Job;

/// One reading of the server's engine metrics (vLLM's names).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct EngineMetrics {
    /// `vllm:num_requests_running`.
    pub running: f64,
    /// `vllm:num_requests_waiting`.
    pub waiting: f64,
    /// `vllm:kv_cache_usage_perc` (0 to 1).
    pub kv_usage: f64,
    /// `vllm:num_preemptions_total`.
    pub preemptions_total: f64,
    /// `vllm:generation_tokens_total`.
    pub generation_tokens_total: f64,
    /// `vllm:request_queue_time_seconds` (sum, count), when the server has it.
    pub queue_time: Option<(f64, f64)>,
    /// `vllm:e2e_request_latency_seconds` (sum, count), when the server has it.
    pub e2e: Option<(f64, f64)>,
    /// KV cache capacity in tokens (`num_gpu_blocks` × `block_size` of
    /// `vllm:cache_config_info`), when the server says.
    pub kv_cache_tokens: Option<f64>,
    /// `vllm:prefix_cache_hits_total` and `vllm:prefix_cache_queries_total`
    /// (tokens), when the server has them.
    pub prefix_cache: Option<(f64, f64)>,
}

/// A successful completion.
#[derive(Clone, Debug, PartialEq)]
pub struct InferenceOutput {
    /// `choices[0].message.content`.
    pub content: String,
    /// Prompt tokens, when the server reported usage.
    pub prompt_tokens: Option<u64>,
    /// Completion tokens, when the server reported usage.
    pub completion_tokens: Option<u64>,
    /// Time from sending the request to having the whole response.
    pub latency: Duration,
    /// The server's whole response body, kept in the result file.
    pub response: RawResponse,
}

/// A response body as the server sent it: checked to be JSON, kept as its
/// text (written into the result document as it came, never rebuilt).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct RawResponse(Box<serde_json::value::RawValue>);

impl RawResponse {
    /// `text`, if it is one JSON value.
    pub fn new(text: String) -> Result<Self, serde_json::Error> {
        serde_json::value::RawValue::from_string(text).map(RawResponse)
    }

    /// A response built as a value (by test servers).
    pub fn from_value(v: &serde_json::Value) -> Self {
        RawResponse::new(v.to_string()).expect("a value is JSON")
    }

    /// The text.
    pub fn get(&self) -> &str {
        self.0.get()
    }
}

impl PartialEq for RawResponse {
    fn eq(&self, other: &Self) -> bool {
        self.get() == other.get()
    }
}

/// Why a request did not produce a completion.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum InferenceError {
    /// Worth retrying later: the connection failed, the request timed out,
    /// or the server answered 5xx (other than 503) or a malformed 200.
    #[error("{0}")]
    Retryable(String),
    /// The server is saturated (429, 503): the job goes back without an
    /// attempt counted, and the dispatcher backs off and narrows its window.
    #[error("{message}")]
    Overloaded {
        /// What the server said.
        message: String,
        /// The server's `Retry-After`, if it gave one.
        retry_after: Option<Duration>,
    },
    /// The server is not there: the connection was refused or dropped
    /// before an answer. The job goes back without an attempt counted (a
    /// job never fails because its server is down); if the server crashed,
    /// the crash is counted against the job instead (poison-job quarantine).
    #[error("{0}")]
    Unavailable(String),
    /// The server aborted the request (vLLM's `finish_reason: "abort"`: a
    /// sleep, or a shutdown, cut it short): the job goes back without an
    /// attempt counted, and nothing backs off.
    #[error("{0}")]
    Aborted(String),
    /// Retrying cannot help: the payload is malformed or missing, or the
    /// server refused the request (4xx other than 429) — its words are kept.
    #[error("{0}")]
    Permanent(String),
}

/// What a client without sleep mode answers to its calls.
pub(crate) const NO_SLEEP_MODE: &str = "this server has no sleep mode";

/// One model server.
#[async_trait]
pub trait InferenceClient: Send + Sync + 'static {
    /// Sends `job` as a chat completion and waits for the answer.
    async fn infer(&self, job: &Job) -> Result<InferenceOutput, InferenceError>;

    /// Whether the server is ready: it answers `/health` and lists its
    /// model. `deep` also confirms with a one-token completion (for a vision
    /// model, one with a tiny image) — used until readiness is confirmed.
    async fn probe(&self, deep: bool) -> Result<(), ProbeError>;

    /// The server's own engine metrics (vLLM's `/metrics`), for the
    /// adaptive window; `Ok(None)` when the server has none to read.
    async fn engine_metrics(&self) -> Result<Option<EngineMetrics>, InferenceError> {
        Ok(None)
    }

    /// Puts the server's model to sleep (vLLM's sleep mode, `POST
    /// /sleep?level=`): level 1 keeps the weights in host memory, level 2
    /// drops them. The server aborts what is still in flight.
    async fn sleep(&self, level: u8) -> Result<(), String> {
        let _ = level;
        Err(NO_SLEEP_MODE.into())
    }

    /// Wakes what `tags` names (`weights`, `kv_cache`), or everything.
    async fn wake_up(&self, tags: Option<&str>) -> Result<(), String> {
        let _ = tags;
        Err(NO_SLEEP_MODE.into())
    }

    /// Reloads the weights from disk: needed after waking the weights of a
    /// level-2 sleep, or the model answers garbage.
    async fn reload_weights(&self) -> Result<(), String> {
        Err(NO_SLEEP_MODE.into())
    }

    /// Whether the server's model is asleep.
    async fn is_sleeping(&self) -> Result<bool, String> {
        Err(NO_SLEEP_MODE.into())
    }

    /// What `probe` checks, in words, for the log and `instances`. It may
    /// change once a probe has learnt that the server lacks a route vLLM
    /// has (an OpenAI-compatible server without `/health`, say).
    fn probe_checks(&self) -> String {
        "readiness probe".into()
    }
}

/// Why a probe did not find the server ready; the kinds are told apart
/// because a server that is loading its model is not a broken one.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    /// Nothing listens at the server's address (yet).
    #[error("not listening: {0}")]
    NotListening(String),
    /// The server answers 503: it is still loading its model.
    #[error("loading: {0}")]
    Loading(String),
    /// The server answers, but wrongly: an error status, another model, a
    /// failed canary, or no answer in time.
    #[error("{0}")]
    Broken(String),
}
