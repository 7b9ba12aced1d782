//! An OpenAI-compatible server that is not vLLM, for the tests of what such
//! servers do differently: no `/health` route, no `/metrics`, one request at
//! a time, validation errors answered with 500, a `usage` that counts in
//! other fields or not at all. A real HTTP server on a free loopback port,
//! run on its own thread.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

/// How `usage` is reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Usage {
    /// `prompt_tokens` / `completion_tokens`, as OpenAI.
    OpenAi,
    /// `input_tokens` / `output_tokens`, as some proxies do.
    InputOutput,
    /// No `usage` at all.
    Absent,
}

/// What sets the server apart from vLLM.
#[derive(Clone, Debug)]
pub struct Quirks {
    /// Serves `/health`; without it, `/health` answers 404.
    pub health_route: bool,
    /// Serves `/v1/models`; without it, `/v1/models` answers 404.
    pub models_route: bool,
    /// Runs one request at a time; the others wait for it.
    pub one_at_a_time: bool,
    /// A request whose text contains this gets HTTP 500 with a validation
    /// message, where vLLM would answer 400.
    pub invalid_as_500: Option<String>,
    /// A request whose text contains `.0` is answered with status `.1` and
    /// `Retry-After: .3` seconds, its first `.2` times.
    pub overload_matching: Option<(String, u16, usize, u64)>,
    /// How usage is counted.
    pub usage: Usage,
    /// Time per request.
    pub latency: Duration,
    /// The model it serves.
    pub model: String,
}

impl Default for Quirks {
    fn default() -> Self {
        Quirks {
            health_route: false,
            models_route: true,
            one_at_a_time: false,
            invalid_as_500: None,
            overload_matching: None,
            usage: Usage::OpenAi,
            latency: Duration::ZERO,
            model: "sim".into(),
        }
    }
}

struct Shared {
    quirks: Quirks,
    one: tokio::sync::Semaphore,
    /// The last user text of every completion request received, and when.
    received: Mutex<Vec<(String, std::time::Instant)>>,
    /// Requests waiting for their turn now (one at a time), and the most
    /// ever seen waiting at once.
    waiting: Mutex<(usize, usize)>,
}

/// A running server; stopped on drop.
pub struct OpenAiLike {
    /// Its base URL.
    pub url: String,
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl OpenAiLike {
    /// Starts a server with these quirks on a free loopback port.
    pub fn start(quirks: Quirks) -> OpenAiLike {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a runtime for the test server");
        let shared = Arc::new(Shared {
            quirks,
            one: tokio::sync::Semaphore::new(1),
            received: Mutex::new(Vec::new()),
            waiting: Mutex::new((0, 0)),
        });
        let state = shared.clone();
        let url = runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let mut app = Router::new().route("/v1/chat/completions", post(chat));
            if state.quirks.health_route {
                app = app.route("/health", get(|| async { StatusCode::OK }));
            }
            if state.quirks.models_route {
                app = app.route("/v1/models", get(models));
            }
            let app = app.with_state(state);
            tokio::spawn(async move {
                let _ = axum::serve(listener, app).await;
            });
            format!("http://{addr}")
        });
        OpenAiLike {
            url,
            shared,
            runtime: Some(runtime),
        }
    }

    /// The last user text of every completion request received, in order.
    pub fn received(&self) -> Vec<String> {
        self.arrivals().into_iter().map(|(t, _)| t).collect()
    }

    /// Every completion request's text with the time it arrived.
    pub fn arrivals(&self) -> Vec<(String, std::time::Instant)> {
        self.shared.received.lock().unwrap().clone()
    }

    /// The most requests that ever waited at once behind the one running
    /// (with `one_at_a_time`).
    pub fn most_waiting(&self) -> usize {
        self.shared.waiting.lock().unwrap().1
    }
}

impl Drop for OpenAiLike {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

async fn models(State(s): State<Arc<Shared>>) -> Json<Value> {
    Json(json!({"object": "list", "data": [{"id": s.quirks.model, "object": "model"}]}))
}

/// The last text part of the last user message.
fn user_text(body: &Value) -> String {
    let mut text = String::new();
    for m in body["messages"].as_array().into_iter().flatten() {
        if m["role"] != "user" {
            continue;
        }
        match &m["content"] {
            Value::String(s) => text = s.clone(),
            Value::Array(parts) => {
                for p in parts {
                    if let Some(t) = p["text"].as_str() {
                        text = t.to_string();
                    }
                }
            }
            _ => {}
        }
    }
    text
}

async fn chat(State(s): State<Arc<Shared>>, Json(body): Json<Value>) -> Response {
    let text = user_text(&body);
    let seen = {
        let mut r = s.received.lock().unwrap();
        r.push((text.clone(), std::time::Instant::now()));
        r.iter().filter(|(t, _)| *t == text).count()
    };
    if let Some((needle, code, times, after)) = &s.quirks.overload_matching {
        if text.contains(needle.as_str()) && seen <= *times {
            return (
                StatusCode::from_u16(*code).unwrap(),
                [("retry-after", after.to_string())],
                Json(json!({"error": {"message": "busy, try again later"}})),
            )
                .into_response();
        }
    }
    let _turn = if s.quirks.one_at_a_time {
        match s.one.try_acquire() {
            Ok(turn) => Some(turn),
            // Another is running: this one waits its turn, counted.
            Err(_) => {
                {
                    let mut w = s.waiting.lock().unwrap();
                    w.0 += 1;
                    w.1 = w.1.max(w.0);
                }
                let turn = s.one.acquire().await.unwrap();
                s.waiting.lock().unwrap().0 -= 1;
                Some(turn)
            }
        }
    } else {
        None
    };
    // The server's own service time, as `gpu-feeder sim --latency-ms`: what
    // keeps a one-at-a-time server busy long enough for requests to queue.
    // Not a wait in a test; tests poll for the states they need.
    if !s.quirks.latency.is_zero() {
        tokio::time::sleep(s.quirks.latency).await;
    }
    if let Some(bad) = &s.quirks.invalid_as_500 {
        if text.contains(bad.as_str()) {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                Json(json!({"error": format!("validation error: field `messages` contains `{bad}`")})),
            )
                .into_response();
        }
    }
    let content = format!("answer: {text}");
    let mut doc = json!({
        "id": "cmpl-1",
        "object": "chat.completion",
        "model": s.quirks.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
    });
    let (p, c) = (
        text.len() as u64 / 4 + 1,
        content.split_whitespace().count() as u64,
    );
    match s.quirks.usage {
        Usage::OpenAi => doc["usage"] = json!({"prompt_tokens": p, "completion_tokens": c}),
        Usage::InputOutput => doc["usage"] = json!({"input_tokens": p, "output_tokens": c}),
        Usage::Absent => {}
    }
    Json(doc).into_response()
}
