//! The admin HTTP endpoint (`admin.listen`, loopback by default):
//!
//! - `GET /metrics`: Prometheus metrics;
//! - `GET /healthz`: liveness (the actors answer);
//! - `GET /readyz`: the store answers and at least one instance is Ready;
//! - `GET /v1/status`: instances and queue as JSON (`gpu-feeder instances`);
//! - `POST /v1/jobs`: submit a job, with the CLI's validation;
//! - `GET /v1/jobs/{id}`: one job (`status --json`), with its answer's text;
//! - `GET /v1/jobs/{id}/result`: its result document, from its file or the
//!   database, wherever the job says (`gpu-feeder result`).
//!
//! With `admin.token` set, every endpoint but `/healthz` requires
//! `Authorization: Bearer <token>`.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use feeder_actors::allocator::{GroupStatus, Strategy};
use feeder_actors::gpu::GpuSnapshot;
use feeder_actors::handle::{FeederHandle, HandleError};
use feeder_actors::supervisor::FeederStatus;
use feeder_actors::{JobStore, ModelType, QueueStats, Timestamp};

use crate::cli::output::stats_json;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::submit::Submitter;

/// What the endpoint serves from.
#[derive(Clone)]
pub struct Admin {
    /// The root supervisor.
    pub feeder: FeederHandle,
    /// A connection for reads (stats).
    pub reader: Arc<dyn JobStore>,
    /// The queue's result documents.
    pub results: Arc<crate::results::Results>,
    /// The configuration in force.
    pub config: Arc<Config>,
    /// The metrics.
    pub metrics: Arc<Metrics>,
}

impl Admin {
    async fn status(&self) -> Option<FeederStatus> {
        self.feeder.status().await.ok()
    }

    async fn stats(&self) -> Option<QueueStats> {
        self.reader.stats(Timestamp::now()).await.ok()
    }
}

/// What the window controller read last, for `instances --json`.
fn window_signals(s: &feeder_actors::window::WindowSignals) -> Value {
    json!({
        "running": s.metrics.map(|m| m.running),
        "waiting": s.metrics.map(|m| m.waiting),
        "kv_cache_usage": s.metrics.map(|m| m.kv_usage),
        "kv_cache_tokens": s.metrics.and_then(|m| m.kv_cache_tokens),
        // Since the server started: vLLM's hits over queries, in tokens.
        "prefix_cache_hit_rate": s
            .metrics
            .and_then(|m| m.prefix_cache)
            .filter(|(_, queries)| *queries > 0.0)
            .map(|(hits, queries)| hits / queries),
        "preemptions_total": s.metrics.map(|m| m.preemptions_total),
        "new_preemptions": s.new_preemptions,
        "generation_tokens_per_s": s.tokens_per_s,
        "ceiling": s.ceiling,
        "median_latency_ms": s.median_latency.map(|d| d.as_secs_f64() * 1000.0),
        "server_queue_share": s.queue_share,
    })
}

/// The `/v1/status` document.
pub fn status_json(config: &Config, status: &FeederStatus, stats: Option<&QueueStats>) -> Value {
    let instances: Vec<Value> = config
        .instances
        .iter()
        .map(|inst| {
            let s = status.instances.iter().find(|s| s.name == inst.name);
            let d = status.dispatch.iter().find(|d| d.instance == inst.name);
            let h = status.health.iter().find(|h| h.instance == inst.name);
            let history: Vec<Value> = s
                .map(|s| {
                    s.history
                        .iter()
                        .map(|t| {
                            json!({
                                "from": t.from.as_str(),
                                "to": t.to.as_str(),
                                "reason": t.reason,
                                "at": t.at
                                    .duration_since(std::time::UNIX_EPOCH)
                                    .map_or(0.0, |d| d.as_secs_f64()),
                            })
                        })
                        .collect()
                })
                .unwrap_or_default();
            json!({
                "name": inst.name,
                "model_type": inst.model_type,
                "state": s.map_or("starting", |s| s.state.as_str()),
                "reason": s.map(|s| s.reason.clone()),
                "in_state_s": s.map(|s| s.in_state_for.as_secs_f64()),
                "backend": inst.backend.to_string(),
                "url": inst.base_url(),
                "container_id": s.and_then(|s| s.container_id.clone()),
                "adopted": s.is_some_and(|s| s.adopted),
                "restarts": s.map_or(0, |s| s.restarts),
                "gpu_memory_utilization": s.and_then(|s| s.plan.as_ref()).map(|p| p.gpu_memory_utilization),
                "last_error": s.and_then(|s| s.last_error.clone()),
                "probes": h.map(|h| h.checks.clone()),
                "history": history,
                "crashed": d.map_or(0, |d| d.crashed),
                "aborted": d.map_or(0, |d| d.aborted),
                "warm_prefixes": d.map_or(0, |d| d.warm_prefixes),
                "in_flight": d.map_or(0, |d| d.in_flight),
                "buffered": d.map_or(0, |d| d.buffered),
                "window": d.map_or(0, |d| d.window),
                "window_mode": d.map(|d| if d.auto_window { "auto" } else { "fixed" }),
                "window_max": d.map(|d| d.max_window),
                "window_reason": d.map(|d| d.window_reason.clone()),
                "window_signals": d.map(|d| window_signals(&d.window_signals)),
                "sent": d.map_or(0, |d| d.sent),
                "completed": d.map_or(0, |d| d.completed),
            })
        })
        .collect();
    let allocator = status.allocator.as_ref();
    json!({
        "strategy": allocator.map_or("static", |a| a.strategy.as_str()),
        "allocator": allocator.map(|a| json!({
            "strategy": a.strategy.as_str(),
            "since": unix(a.since),
            "why": a.why,
            "pinned": a.pinned.map(|p| p.as_str()),
            "switching": a.switching,
            "switches": a.switches,
            "problems": a.problems,
            "switch_costs": a.costs.iter().map(|c| (c.model.as_str().to_string(), json!({
                "load_s": c.load.map(|d| d.as_secs_f64()),
                "wake_s": c.wake.map(|d| d.as_secs_f64()),
            }))).collect::<serde_json::Map<_, _>>(),
            "groups": groups_json(&a.groups),
        })),
        "instances": instances,
        "gpus": status.gpus.as_ref().map_or_else(Vec::new, gpus_json),
        "gpu_unavailable": status.gpus.as_ref().and_then(|g| g.unavailable.clone()),
        "gpu_alerts": status.gpus.as_ref().map_or(0, |g| g.alerts),
        "queue": stats.map(stats_json),
    })
}

/// Each GPU group's strategy, as `instances --json` and `strategy show
/// --json` show it.
fn groups_json(groups: &[GroupStatus]) -> Vec<Value> {
    groups
        .iter()
        .map(|g| {
            json!({
                "group": g.name,
                "gpu_ids": g.gpu_ids,
                "instances": g.instances,
                "strategy": g.strategy.as_str(),
                "since": unix(g.since),
                "why": g.why,
                "pinned": g.pinned.map(|p| p.as_str()),
                "switching": g.switching,
                "switches": g.switches,
                "problems": g.problems,
            })
        })
        .collect()
}

fn unix(t: std::time::SystemTime) -> f64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The GPUs of a snapshot, as `/v1/status`, `gpu --json` and MCP show them.
pub fn gpus_json(g: &GpuSnapshot) -> Vec<Value> {
    g.gpus
        .iter()
        .map(|r| {
            let mut v = serde_json::to_value(r).expect("a reading serializes");
            v["hot"] = json!(g.hot.contains(&r.index));
            v["read_at"] = json!(unix(g.at));
            v
        })
        .collect()
}

/// Asks a running daemon for `/v1/status`, as `gpu-feeder instances` and the
/// MCP `instances` tool do; the error says plainly when no daemon answers.
pub async fn fetch_status(config: &Config, config_path: &std::path::Path) -> Result<Value, String> {
    call_admin(config, config_path, "/v1/status", None).await
}

/// Asks the running daemon's admin endpoint: GET `path`, or POST `body`
/// to it; the error says plainly when no daemon answers.
pub async fn call_admin(
    config: &Config,
    config_path: &std::path::Path,
    path: &str,
    body: Option<Value>,
) -> Result<Value, String> {
    let admin = &config.admin;
    let url = format!("http://{}{path}", admin.listen);
    let client = reqwest::Client::new();
    let mut req = match body {
        Some(b) => client.post(&url).json(&b),
        None => client.get(&url),
    }
    .timeout(Duration::from_secs(20));
    if !admin.token.is_empty() {
        req = req.bearer_auth(&admin.token);
    }
    let resp = req.send().await.map_err(|e| {
        if e.is_connect() {
            format!(
                "the daemon is not running: nothing answers at {url} (admin.listen in {}); start it with `gpu-feeder run`",
                config_path.display()
            )
        } else {
            format!("asking {url}: {e}")
        }
    })?;
    let code = resp.status();
    let body: Value = resp
        .json()
        .await
        .map_err(|e| format!("{url} did not answer JSON: {e}"))?;
    if code.is_success() {
        Ok(body)
    } else {
        Err(format!(
            "{url} answered HTTP {}: {}",
            code.as_u16(),
            body["error"].as_str().unwrap_or("")
        ))
    }
}

async fn healthz(State(a): State<Admin>) -> Response {
    match a.status().await {
        Some(_) => (StatusCode::OK, "ok\n").into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "the actors do not answer\n",
        )
            .into_response(),
    }
}

async fn readyz(State(a): State<Admin>) -> Response {
    if a.stats().await.is_none() {
        let why = a
            .reader
            .connection_problem()
            .unwrap_or_else(|| "the job store does not answer".into());
        return (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")).into_response();
    }
    match a.status().await {
        Some(s)
            if s.instances
                .iter()
                .any(|i| i.state == feeder_actors::container::InstanceState::Ready) =>
        {
            (StatusCode::OK, "ready\n").into_response()
        }
        Some(_) => (StatusCode::SERVICE_UNAVAILABLE, "no instance is ready\n").into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "the actors do not answer\n",
        )
            .into_response(),
    }
}

async fn metrics(State(a): State<Admin>) -> Response {
    let (stats, status) = tokio::join!(a.stats(), a.status());
    a.metrics.refresh(stats.as_ref(), status.as_ref());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        a.metrics.encode(),
    )
        .into_response()
}

async fn status(State(a): State<Admin>) -> Response {
    let (stats, status, daemons) =
        tokio::join!(a.stats(), a.status(), a.reader.daemons(Timestamp::now()));
    match status {
        Some(s) => {
            let mut v = status_json(&a.config, &s, stats.as_ref());
            // The daemons sharing this queue (one, on SQLite).
            v["daemons"] = match daemons {
                Ok(ds) => json!(ds
                    .iter()
                    .map(|d| {
                        let mut one = serde_json::to_value(d).unwrap_or(Value::Null);
                        one["alive"] = json!(d.alive());
                        one
                    })
                    .collect::<Vec<_>>()),
                Err(_) => Value::Null,
            };
            Json(v).into_response()
        }
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"error": "the actors do not answer"})),
        )
            .into_response(),
    }
}

/// `POST /v1/instances/NAME/restart`: launch a failed (or stopped)
/// instance again, its crash-loop count started over.
async fn restart_instance(
    State(a): State<Admin>,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> Response {
    match a.feeder.restart_instance(&name).await {
        Ok(()) => Json(json!({"instance": name, "restarting": true})).into_response(),
        Err(HandleError::Refused(e)) => bad(StatusCode::CONFLICT, e),
        Err(e) => bad(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// `POST /v1/strategy`: `{"pin": "think"}` holds a strategy until
/// `{"pin": null}` releases it; answers the allocator's status.
async fn strategy(State(a): State<Admin>, body: Option<Json<Value>>) -> Response {
    let pin = match body.as_ref().map(|Json(b)| b.get("pin")) {
        Some(Some(Value::String(s))) => match Strategy::parse(s) {
            Ok(s) => Some(s),
            Err(e) => return bad(StatusCode::BAD_REQUEST, e),
        },
        Some(Some(Value::Null)) => None,
        _ => {
            return bad(
                StatusCode::BAD_REQUEST,
                "the body must be {\"pin\": \"<strategy>\"} or {\"pin\": null}",
            )
        }
    };
    match a.feeder.pin(pin).await {
        Ok(s) => Json(json!({
            "strategy": s.strategy.as_str(),
            "pinned": s.pinned.map(|p| p.as_str()),
            "switching": s.switching,
            "why": s.why,
            "groups": groups_json(&s.groups),
        }))
        .into_response(),
        Err(HandleError::Refused(e)) => bad(StatusCode::CONFLICT, e),
        Err(e) => bad(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// The job `id` names (a unique prefix will do), or the error response.
async fn job_of(a: &Admin, id: &str) -> Result<feeder_actors::Job, Response> {
    let id = a
        .reader
        .resolve(id)
        .await
        .map_err(|e| bad(StatusCode::BAD_REQUEST, e.to_string()))?;
    match a.reader.get(id).await {
        Ok(Some(job)) => Ok(job),
        Ok(None) => Err(bad(StatusCode::NOT_FOUND, format!("no job {id}"))),
        Err(e) => Err(bad(StatusCode::SERVICE_UNAVAILABLE, e.to_string())),
    }
}

/// `GET /v1/jobs/ID`: the job as `status --json` prints it, with
/// `result` (its answer's text) once it is done.
async fn get_job(
    State(a): State<Admin>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    let job = match job_of(&a, &id).await {
        Ok(j) => j,
        Err(r) => return r,
    };
    let mut v = crate::cli::output::job_json(&job);
    if let Some(at) = &job.result_path {
        match a.results.document(at).await {
            Ok(doc) => v["result"] = doc.get("content").cloned().unwrap_or(Value::Null),
            Err(e) => {
                return bad(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("job {} is done but its result cannot be read: {e}", job.id),
                )
            }
        }
    }
    Json(v).into_response()
}

/// `GET /v1/jobs/ID/result`: the job's result document.
async fn get_result(
    State(a): State<Admin>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    let job = match job_of(&a, &id).await {
        Ok(j) => j,
        Err(r) => return r,
    };
    let Some(at) = &job.result_path else {
        return bad(
            StatusCode::NOT_FOUND,
            format!("job {} is {} and has no result yet", job.id, job.status),
        );
    };
    match a.results.document(at).await {
        Ok(doc) => Json(doc).into_response(),
        Err(e) => bad(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("reading the result of job {} ({at}): {e}", job.id),
        ),
    }
}

fn bad(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(json!({"error": msg.into()}))).into_response()
}

/// `POST /v1/jobs`: `{"model": "think", "prompt": "…"}` (or `messages`,
/// `image_path`), with optional `priority`, `max_attempts` and `then`.
async fn submit(State(a): State<Admin>, body: Option<Json<Value>>) -> Response {
    let Some(Json(Value::Object(mut body))) = body else {
        return bad(
            StatusCode::BAD_REQUEST,
            "the body must be a JSON object with `model` and `prompt`, `messages` or `image_path`",
        );
    };
    let model = match body
        .remove("model")
        .as_ref()
        .and_then(Value::as_str)
        .map(str::parse::<ModelType>)
    {
        Some(Ok(m)) => m,
        Some(Err(e)) => return bad(StatusCode::BAD_REQUEST, e.to_string()),
        None => {
            return bad(
                StatusCode::BAD_REQUEST,
                "`model` is required: vision or think",
            )
        }
    };
    let priority = body
        .remove("priority")
        .and_then(|v| v.as_i64())
        .unwrap_or(0);
    let max_attempts = body
        .remove("max_attempts")
        .and_then(|v| v.as_u64())
        .map_or(a.config.dispatch.max_attempts, |n| n.clamp(1, 100) as u32);
    let then = match body.remove("then") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_str().map(str::parse::<ModelType>) {
            Some(Ok(m)) if m != model => Some(m),
            _ => {
                return bad(
                    StatusCode::BAD_REQUEST,
                    "`then` must be the other model (vision or think)",
                )
            }
        },
    };
    let sub = Submitter::new(model, &a.config.queue.roots(), priority, max_attempts).then(then);
    let job = match sub.validate(&Value::Object(body), "the request body") {
        Ok(payload) => sub.inline_job(payload),
        Err(e) => return bad(StatusCode::BAD_REQUEST, e.to_string()),
    };
    match a.feeder.submit(vec![job]).await {
        Ok(mut s) => {
            let s = s.remove(0);
            let code = if s.created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            (
                code,
                Json(json!({"id": s.id, "created": s.created, "status": s.status})),
            )
                .into_response()
        }
        Err(e @ HandleError::Store(_)) => bad(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => bad(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

async fn auth(State(token): State<Arc<String>>, req: Request, next: Next) -> Response {
    if token.is_empty() || req.uri().path() == "/healthz" {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if given == Some(token.as_str()) {
        next.run(req).await
    } else {
        bad(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token: send `Authorization: Bearer <admin.token>`",
        )
    }
}

/// The endpoint's routes.
pub fn router(admin: Admin) -> Router {
    let token = Arc::new(admin.config.admin.token.clone());
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/status", get(status))
        .route("/v1/jobs", post(submit))
        .route("/v1/jobs/{id}", get(get_job))
        .route("/v1/jobs/{id}/result", get(get_result))
        .route("/v1/strategy", post(strategy))
        .route("/v1/instances/{name}/restart", post(restart_instance))
        .with_state(admin)
        .layer(middleware::from_fn_with_state(token, auth))
}
