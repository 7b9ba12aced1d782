//! The OpenAI-compatible HTTP API (`api.listen`): the Files and Batches
//! endpoints that the `openai` SDK calls, on top of the durable queue.
//!
//! - `POST /v1/files` (multipart, `purpose=batch`), `GET /v1/files`,
//!   `GET /v1/files/{id}`, `GET /v1/files/{id}/content`,
//!   `DELETE /v1/files/{id}`: [`files`];
//! - `POST /v1/batches`, `GET /v1/batches`, `GET /v1/batches/{id}`,
//!   `POST /v1/batches/{id}/cancel`: [`batches`];
//! - `POST /v1/chat/completions` (plain and `stream: true`),
//!   `GET /v1/models`, `GET /v1/models/{id}`: [`chat`].
//!
//! Each line of a batch becomes a job through the same checks as every
//! other way in ([`crate::submit::Submitter`]); the batch's progress is read
//! from its jobs in the queue, so it survives a restart of the daemon.
//! Errors are shaped as the SDK reads them:
//! `{"error": {"message", "type", "param", "code"}}`.

pub mod batches;
pub mod chat;
pub mod files;
mod multipart;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use tracing::error;

use feeder_actors::handle::FeederHandle;
use feeder_actors::watch::JobWatch;
use feeder_actors::{JobStore, StoreError};

use crate::config::Config;
use crate::metrics::Metrics;
use crate::openai::stream::Relays;
use crate::results::Results;
use crate::store::api::ApiStore;

/// What the API serves from.
#[derive(Clone)]
pub struct Api {
    /// The files, batches and batch lines.
    pub store: Arc<dyn ApiStore>,
    /// The jobs (reads, cancels).
    pub jobs: Arc<dyn JobStore>,
    /// The running feeder, through which jobs are queued.
    pub feeder: FeederHandle,
    /// The result documents.
    pub results: Arc<Results>,
    /// The configuration in force.
    pub config: Arc<Config>,
    /// Where uploaded and produced files lie.
    pub files_dir: PathBuf,
    /// Wakes the batch worker (a batch created or cancelled).
    pub wake: Arc<tokio::sync::Notify>,
    /// Wakes a chat completion when its job ends.
    pub watch: Arc<JobWatch>,
    /// Streamed answers, relayed from the requests to the servers.
    pub relays: Arc<Relays>,
    /// The daemon's metrics (streamed answers are counted there).
    pub metrics: Arc<Metrics>,
    /// When the API started (unix seconds; the models' `created`).
    pub started: i64,
}

/// An error as the OpenAI SDK reads it.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<&'static str>,
    code: Option<&'static str>,
}

impl ApiError {
    /// 400, `invalid_request_error`, about `param`.
    pub fn invalid(param: Option<&'static str>, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param,
            code: None,
        }
    }

    /// 404.
    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("not_found"),
        }
    }

    /// 409: the object is in a state that forbids it.
    pub fn conflict(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::CONFLICT,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("conflict"),
        }
    }

    /// 404 `model_not_found`.
    pub fn model_not_found(message: impl Into<String>) -> Self {
        ApiError {
            code: Some("model_not_found"),
            ..ApiError::not_found(message)
        }
    }

    /// 503: the daemon cannot take the request now.
    pub fn unavailable(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            ..ApiError::internal(message)
        }
    }

    /// 502: the model server did not answer the request (no HTTP error of
    /// its own to pass on).
    pub fn upstream(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_GATEWAY,
            code: Some("request_failed"),
            ..ApiError::internal(message)
        }
    }

    /// 401.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("invalid_api_key"),
        }
    }

    /// 500 (or 503 when the store cannot be reached now).
    pub fn internal(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let mut err = ApiError::internal(format!("the job store failed: {e}"));
        if matches!(e, StoreError::Unavailable(_)) {
            err.status = StatusCode::SERVICE_UNAVAILABLE;
        }
        err
    }
}

impl From<std::io::Error> for ApiError {
    fn from(e: std::io::Error) -> Self {
        ApiError::internal(e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(json!({"error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }})),
        )
            .into_response()
    }
}

/// Unix seconds now.
pub(crate) fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// A fresh object id: `prefix` then 24 hex digits.
pub(crate) fn new_id(prefix: &str) -> String {
    format!("{prefix}{}", hex::encode(rand::random::<[u8; 12]>()))
}

/// `limit` and `after` of a list request, as the SDK's pagination sends them.
#[derive(Debug, serde::Deserialize)]
pub struct Page {
    /// The id of the last object of the previous page.
    pub after: Option<String>,
    /// Objects per page.
    pub limit: Option<usize>,
}

impl Page {
    /// The page size: 20 by default, 1 to 100.
    fn limit(&self) -> usize {
        self.limit.unwrap_or(20).clamp(1, 100)
    }
}

/// A list object: `data` (one more than `limit` fetched says `has_more`).
pub(crate) fn list(mut data: Vec<serde_json::Value>, limit: usize) -> Response {
    let has_more = data.len() > limit;
    data.truncate(limit);
    let first = data.first().map(|d| d["id"].clone());
    let last = data.last().map(|d| d["id"].clone());
    Json(json!({
        "object": "list",
        "data": data,
        "first_id": first,
        "last_id": last,
        "has_more": has_more,
    }))
    .into_response()
}

async fn auth(State(keys): State<Arc<Vec<String>>>, req: Request, next: Next) -> Response {
    if keys.is_empty() {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(k) if keys.iter().any(|key| key == k) => next.run(req).await,
        Some(_) => ApiError::unauthorized("the API key is not one of api.keys").into_response(),
        None => ApiError::unauthorized(
            "no API key: send `Authorization: Bearer <key>` with one of api.keys",
        )
        .into_response(),
    }
}

async fn unknown(req: Request) -> Response {
    ApiError::not_found(format!(
        "no endpoint {} {}: this server has /v1/files and /v1/batches",
        req.method(),
        req.uri().path()
    ))
    .into_response()
}

/// The API's routes; `keys` are the accepted bearer tokens (none: any).
pub fn router(api: Api, keys: Vec<String>) -> Router {
    Router::new()
        .route("/v1/files", post(files::upload).get(files::list))
        .route("/v1/files/{id}", get(files::get).delete(files::delete))
        .route("/v1/files/{id}/content", get(files::content))
        .route("/v1/batches", post(batches::create).get(batches::list))
        .route("/v1/batches/{id}", get(batches::get))
        .route("/v1/batches/{id}/cancel", post(batches::cancel))
        .route("/v1/chat/completions", post(chat::completions))
        .route("/v1/models", get(chat::models))
        .route("/v1/models/{id}", get(chat::model))
        .fallback(unknown)
        .with_state(api)
        .layer(middleware::from_fn_with_state(Arc::new(keys), auth))
        .layer(axum::extract::DefaultBodyLimit::disable())
}

/// Removes the `.part` files of uploads that a crash cut short (an upload
/// is written to `<id>.part` and renamed once whole): all of them when
/// only this daemon writes the folder, else those not written to for
/// `older_than`.
fn remove_partial_uploads(dir: &std::path::Path, older_than: Option<std::time::Duration>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        let stale = older_than.is_none_or(|age| {
            e.metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|elapsed| elapsed >= age)
        });
        if path.extension().is_some_and(|x| x == "part") && stale {
            match std::fs::remove_file(&path) {
                Ok(()) => tracing::info!("removed {}, an upload cut short", path.display()),
                Err(err) => tracing::warn!("cannot remove {}: {err}", path.display()),
            }
        }
    }
}

/// Binds `api.listen`, serves the API and runs the batch worker; the
/// address it listens on and its store (for the status page). `None` when
/// `api.listen` is unset.
pub async fn start(
    config: Arc<Config>,
    jobs: Arc<dyn JobStore>,
    feeder: FeederHandle,
    results: Arc<Results>,
    watch: Arc<JobWatch>,
    relays: Arc<Relays>,
    metrics: Arc<Metrics>,
) -> anyhow::Result<Option<(SocketAddr, Arc<dyn ApiStore>)>> {
    let Some(listen) = config.api.listen.clone() else {
        return Ok(None);
    };
    let keys = config.api.all_keys()?;
    let loopback = listen
        .parse::<SocketAddr>()
        .is_ok_and(|a| a.ip().is_loopback());
    if keys.is_empty() && !loopback {
        anyhow::bail!(
            "api.listen = {listen} is not a loopback address and api.keys_file holds no key: add one, or listen on 127.0.0.1"
        );
    }
    let files_dir = config.api.files_dir(&config.queue.results_dir);
    std::fs::create_dir_all(&files_dir)
        .with_context(|| format!("creating api.files_dir {}", files_dir.display()))?;
    // Other daemons of a PostgreSQL queue share the folder: their uploads
    // in progress are left alone, only those a day old are removed.
    let shared = config.queue.database_url.is_some();
    remove_partial_uploads(
        &files_dir,
        shared.then_some(std::time::Duration::from_secs(24 * 3600)),
    );
    let store = crate::store::open_api(&config.queue).await?;
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .with_context(|| {
            format!("cannot listen on api.listen = {listen} (choose another address)")
        })?;
    let addr = listener.local_addr()?;
    let api = Api {
        store: store.clone(),
        jobs,
        feeder,
        results,
        config,
        files_dir,
        wake: Arc::new(tokio::sync::Notify::new()),
        watch,
        relays,
        metrics,
        started: unix_now(),
    };
    tokio::spawn(batches::worker(api.clone()));
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router(api, keys)).await {
            error!("the OpenAI API stopped: {e}");
        }
    });
    Ok(Some((addr, store)))
}
