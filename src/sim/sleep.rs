//! Sleep mode, as vLLM serves it with `--enable-sleep-mode` and
//! `VLLM_SERVER_DEV_MODE=1` (without the variable vLLM does not route its
//! development endpoints, and neither does the simulator: 404).
//!
//! - `POST /sleep?level=1|2&mode=abort|wait` — level 1 moves the weights to
//!   host memory and drops the KV cache; level 2 drops both. `mode=abort`
//!   (vLLM's default) answers the requests in flight at once with
//!   `finish_reason: "abort"`; `mode=wait` lets them finish first. Takes
//!   `--sleep-s`, then answers 200.
//! - `POST /wake_up[?tags=weights|kv_cache]` (tags may repeat; none means
//!   both) — at level 1 the weights come back in `--wake-s`; at level 2 the
//!   weights' memory comes back at once but holds nothing: until
//!   `POST /collective_rpc {"method": "reload_weights"}` (`--wake-l2-s`)
//!   every answer is garbage, as vLLM's is.
//! - `GET /is_sleeping` — `{"is_sleeping": bool}`.
//!
//! While asleep (or while a sleep or a wake is under way) completions are
//! answered 503. The timings are wall-clock seconds (`--time-scale` does not
//! shorten them, nor `--load-s`). Published figures to choose them from:
//! a level-1 wake takes 0.3–2.6 s for small models and about 2.2 s for an
//! 8B model; a level-2 wake with its reload about 6.5 s for an 8B model;
//! a cold load 40 s to minutes (vLLM's sleep-mode blog post and docs).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::{error, Sim};

/// Where the engine is between awake and asleep.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Phase {
    /// 0 awake; else the level it was put to sleep at.
    level: u8,
    /// The weights are off the GPU (or, at level 2, gone).
    weights: bool,
    /// The KV cache is off the GPU.
    kv_cache: bool,
    /// Level-2 weights woken but not reloaded: answers are garbage.
    stale: bool,
    /// A sleep or a wake is under way.
    busy: bool,
}

/// What a completion meets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Admission {
    /// Served normally.
    Serve,
    /// Refused: 503.
    Asleep,
    /// Served with garbage (level-2 weights not reloaded).
    Garbage,
}

/// The sleep state of one simulated server.
pub(super) struct Sleeper {
    sleep_s: f64,
    wake_s: f64,
    wake_l2_s: f64,
    phase: Mutex<Phase>,
    /// One operation (sleep, wake, reload) at a time.
    ops: tokio::sync::Mutex<()>,
    /// Bumped when a sleep aborts the requests in flight.
    aborts: tokio::sync::watch::Sender<u64>,
}

impl Sleeper {
    pub(super) fn new(sleep_s: f64, wake_s: f64, wake_l2_s: f64) -> Self {
        Sleeper {
            sleep_s,
            wake_s,
            wake_l2_s,
            phase: Mutex::new(Phase::default()),
            ops: tokio::sync::Mutex::new(()),
            aborts: tokio::sync::watch::channel(0).0,
        }
    }

    fn phase(&self) -> std::sync::MutexGuard<'_, Phase> {
        self.phase.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn admission(&self) -> Admission {
        let p = *self.phase();
        if p.busy || p.weights || p.kv_cache {
            Admission::Asleep
        } else if p.stale {
            Admission::Garbage
        } else {
            Admission::Serve
        }
    }

    /// Resolves when a sleep aborts the requests in flight from now on.
    pub(super) fn aborted(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.aborts.subscribe();
        async move {
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

async fn pause(seconds: f64) {
    if seconds > 0.0 {
        tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    }
}

/// The `key=value` pairs of a query string, in order.
fn pairs(query: &Option<String>) -> Vec<(String, String)> {
    query
        .as_deref()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (p.to_string(), String::new()),
        })
        .collect()
}

fn sleeper(sim: &Sim) -> Option<&Sleeper> {
    sim.sleep.as_deref()
}

fn not_served() -> Response {
    error(StatusCode::NOT_FOUND, "Not Found")
}

/// `POST /sleep`.
pub(super) async fn sleep(State(sim): State<Arc<Sim>>, RawQuery(q): RawQuery) -> Response {
    let Some(s) = sleeper(&sim) else {
        return not_served();
    };
    let mut level = 1;
    let mut wait = false;
    for (k, v) in pairs(&q) {
        match (k.as_str(), v.as_str()) {
            ("level", "1") => level = 1,
            ("level", "2") => level = 2,
            ("level", other) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    &format!("sleep level must be 1 or 2, not `{other}`"),
                )
            }
            ("mode", "abort") => wait = false,
            ("mode", "wait") => wait = true,
            ("mode", other) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    &format!("sleep mode must be `abort` or `wait`, not `{other}`"),
                )
            }
            _ => {}
        }
    }
    let _op = s.ops.lock().await;
    if s.phase().level > 0 {
        return StatusCode::OK.into_response();
    }
    s.phase().busy = true;
    if wait {
        while sim.in_flight() > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    } else {
        s.aborts.send_modify(|n| *n += 1);
        if let Some(served) = &sim.served {
            let n = served.discard();
            if n > 0 {
                eprintln!("sim: sleep aborted {n} request(s) in the engine");
            }
        }
    }
    pause(s.sleep_s).await;
    *s.phase() = Phase {
        level,
        weights: true,
        kv_cache: true,
        stale: false,
        busy: false,
    };
    eprintln!("sim: asleep at level {level}");
    StatusCode::OK.into_response()
}

/// `POST /wake_up`.
pub(super) async fn wake_up(State(sim): State<Arc<Sim>>, RawQuery(q): RawQuery) -> Response {
    let Some(s) = sleeper(&sim) else {
        return not_served();
    };
    let mut tags = Vec::new();
    for (k, v) in pairs(&q) {
        if k == "tags" {
            match v.as_str() {
                "weights" | "kv_cache" => tags.push(v),
                other => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        &format!("unknown wake_up tag `{other}`: use `weights` or `kv_cache`"),
                    )
                }
            }
        }
    }
    let all = tags.is_empty();
    let (weights, kv) = (
        all || tags.iter().any(|t| t == "weights"),
        all || tags.iter().any(|t| t == "kv_cache"),
    );
    let _op = s.ops.lock().await;
    let p = *s.phase();
    if p.level == 0 {
        return StatusCode::OK.into_response();
    }
    s.phase().busy = true;
    if weights && p.weights && p.level == 1 {
        pause(s.wake_s).await;
    }
    let mut p = *s.phase();
    if weights && p.weights {
        p.weights = false;
        // Level 2 dropped them: the memory is back, its contents are not.
        p.stale = p.level == 2;
    }
    if kv {
        p.kv_cache = false;
    }
    if !p.weights && !p.kv_cache {
        p.level = 0;
    }
    p.busy = false;
    *s.phase() = p;
    StatusCode::OK.into_response()
}

/// `POST /collective_rpc`: only `reload_weights` is simulated.
pub(super) async fn collective_rpc(
    State(sim): State<Arc<Sim>>,
    body: Option<Json<Value>>,
) -> Response {
    let Some(s) = sleeper(&sim) else {
        return not_served();
    };
    let method = body
        .as_ref()
        .and_then(|Json(b)| b.get("method"))
        .and_then(Value::as_str)
        .unwrap_or("");
    if method != "reload_weights" {
        return error(
            StatusCode::BAD_REQUEST,
            &format!("the simulator runs only `reload_weights` by collective_rpc, not `{method}`"),
        );
    }
    let _op = s.ops.lock().await;
    if s.phase().weights {
        return error(
            StatusCode::BAD_REQUEST,
            "the weights are asleep: wake them (POST /wake_up?tags=weights) before reloading",
        );
    }
    if s.phase().stale {
        s.phase().busy = true;
        pause(s.wake_l2_s).await;
        let mut p = s.phase();
        p.stale = false;
        p.busy = false;
    }
    Json(json!({"results": [null]})).into_response()
}

/// `GET /is_sleeping`.
pub(super) async fn is_sleeping(State(sim): State<Arc<Sim>>) -> Response {
    let Some(s) = sleeper(&sim) else {
        return not_served();
    };
    let p = *s.phase();
    Json(json!({"is_sleeping": p.level > 0 || p.busy})).into_response()
}

/// What a level-2 engine without its weights reloaded answers.
pub(super) fn garbage(n: u64) -> String {
    const NOISE: &[&str] = &["ĠĠ", "!!", "<unk>", "ÃĤ", "…", "ĉ", "##"];
    (0..12)
        .map(|i| NOISE[((n as usize).wrapping_mul(7) + i * 3) % NOISE.len()])
        .collect()
}
