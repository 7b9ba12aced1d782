//! `/v1/batches`: a batch's lines checked before any runs, each line a job
//! on the durable queue, and the output and error files written once every
//! job has ended, by whichever daemon sees that first, so that a batch
//! survives a restart.
//!
//! Lifecycle: `validating → in_progress → finalizing → completed`; `failed`
//! when a line is refused (no job is created); `cancelling → cancelled`
//! with the results finished so far; `expired` after the completion window
//! (the lines not done by then are `batch_expired` errors).

use std::collections::HashSet;
use std::io::BufRead;
use std::path::Path;
use std::time::Duration;

use axum::extract::{Path as UrlPath, Query, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tracing::{info, warn};

use feeder_actors::{Job, JobId, JobStatus, ModelType, NewJob, StoreResult, Timestamp};

use super::{list as list_of, new_id, unix_now, Api, ApiError, Page};
use crate::config::Config;
use crate::store::api::{ApiStore, BatchLock, BatchRow, FileRow, LineCounts, LineJob};
use crate::submit::{Built, Input, Submission, SubmitRequest};

/// The one endpoint a batch may target.
pub const ENDPOINT: &str = "/v1/chat/completions";
/// The one completion window.
pub const WINDOW: &str = "24h";
const WINDOW_S: i64 = 24 * 3600;
/// Lines queued per transaction.
const CHUNK: usize = 1000;
/// Lines whose job and result are read at once while finalizing: enough
/// to overlap the reads' round trips, few enough that they do not spread
/// over dozens of blocking threads (at 64, a 50,000-line batch grew the
/// daemon by 90 threads and 55 MiB while it finalized).
const READ_AHEAD: usize = 8;
/// The most line errors a failed batch lists.
const MAX_ERRORS: usize = 1000;

/// `POST /v1/batches`.
pub async fn create(
    State(api): State<Api>,
    body: Option<Json<Value>>,
) -> Result<Response, ApiError> {
    let Some(Json(body)) = body else {
        return Err(ApiError::invalid(
            None,
            "the body must be a JSON object with input_file_id, endpoint and completion_window",
        ));
    };
    let input = body["input_file_id"]
        .as_str()
        .ok_or_else(|| ApiError::invalid(Some("input_file_id"), "input_file_id is required"))?;
    let endpoint = body["endpoint"].as_str().unwrap_or_default();
    if endpoint != ENDPOINT {
        return Err(ApiError::invalid(
            Some("endpoint"),
            format!("endpoint is {endpoint:?}: this server runs batches of {ENDPOINT}"),
        ));
    }
    let window = body["completion_window"].as_str().unwrap_or_default();
    if window != WINDOW {
        return Err(ApiError::invalid(
            Some("completion_window"),
            format!("completion_window is {window:?}: only \"{WINDOW}\" is supported"),
        ));
    }
    let metadata = match &body["metadata"] {
        Value::Null => Value::Null,
        Value::Object(m) if m.len() <= 16 && m.values().all(Value::is_string) => {
            Value::Object(m.clone())
        }
        _ => {
            return Err(ApiError::invalid(
                Some("metadata"),
                "metadata must be an object of at most 16 string values",
            ))
        }
    };
    let file = api
        .store
        .file(input)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no file {input}")))?;
    if file.purpose != "batch" {
        return Err(ApiError::invalid(
            Some("input_file_id"),
            format!("file {input} has purpose {:?}, not \"batch\"", file.purpose),
        ));
    }
    let now = unix_now();
    let id = new_id("batch_");
    let doc = json!({
        "id": id,
        "object": "batch",
        "endpoint": ENDPOINT,
        "errors": null,
        "input_file_id": input,
        "completion_window": WINDOW,
        "status": "validating",
        "output_file_id": null,
        "error_file_id": null,
        "created_at": now,
        "in_progress_at": null,
        "expires_at": now + WINDOW_S,
        "finalizing_at": null,
        "completed_at": null,
        "failed_at": null,
        "expired_at": null,
        "cancelling_at": null,
        "cancelled_at": null,
        "request_counts": {"total": 0, "completed": 0, "failed": 0},
        "metadata": metadata,
    });
    let row = BatchRow {
        id,
        status: "validating".into(),
        input_file_id: input.into(),
        created_at: now,
        doc,
    };
    api.store.insert_batch(row.clone()).await?;
    api.wake.notify_one();
    Ok(Json(row.doc).into_response())
}

async fn batch_of(api: &Api, id: &str) -> Result<BatchRow, ApiError> {
    api.store
        .batch(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no batch {id}")))
}

/// `GET /v1/batches/{id}`.
pub async fn get(
    State(api): State<Api>,
    UrlPath(id): UrlPath<String>,
) -> Result<Response, ApiError> {
    Ok(Json(batch_of(&api, &id).await?.doc).into_response())
}

/// `GET /v1/batches`: newest first, `after` and `limit` as the SDK pages.
pub async fn list(State(api): State<Api>, Query(page): Query<Page>) -> Result<Response, ApiError> {
    let limit = page.limit();
    let rows = api.store.batches(page.after, limit + 1).await?;
    Ok(list_of(rows.into_iter().map(|b| b.doc).collect(), limit))
}

/// Moves `row` to `status`, stamping `at` (`<status>_at`) now.
fn moved(mut row: BatchRow, status: &str) -> BatchRow {
    row.status = status.into();
    row.doc["status"] = json!(status);
    row.doc[format!("{status}_at")] = json!(unix_now());
    row
}

/// `POST /v1/batches/{id}/cancel`: `cancelling`, its unfinished jobs
/// cancelled; `cancelled` once every job has ended.
pub async fn cancel(
    State(api): State<Api>,
    UrlPath(id): UrlPath<String>,
) -> Result<Response, ApiError> {
    for _ in 0..5 {
        let row = batch_of(&api, &id).await?;
        match row.status.as_str() {
            "cancelling" | "cancelled" => return Ok(Json(row.doc).into_response()),
            "validating" | "in_progress" => {
                let from = row.status.clone();
                let row = moved(row, "cancelling");
                if api.store.update_batch(&from, row.clone()).await? {
                    cancel_jobs(&api, &id).await;
                    api.wake.notify_one();
                    return Ok(Json(row.doc).into_response());
                }
            }
            other => {
                return Err(ApiError::conflict(format!(
                    "batch {id} is {other}: only a batch validating or in progress can be cancelled"
                )))
            }
        }
    }
    Err(ApiError::conflict(format!(
        "batch {id} keeps changing state: try again"
    )))
}

async fn cancel_jobs(api: &Api, batch: &str) {
    let ids = match api.store.unfinished_jobs(batch).await {
        Ok(ids) => ids,
        Err(e) => {
            warn!("cancelling the jobs of {batch}: {e}");
            return;
        }
    };
    for id in ids {
        // A job that ended meanwhile refuses; that is as good.
        let _ = api.jobs.cancel(id, Timestamp::now()).await;
    }
}

/// The model a batch line names: an instance's `served_model_name`, or a
/// model type (`vision`, `think`).
pub(crate) fn model_for(config: &Config, name: &str) -> Option<ModelType> {
    config
        .instances
        .iter()
        .find(|i| i.served_model_name == name)
        .map(|i| i.model_type)
        .or_else(|| name.parse().ok())
}

/// A refused line: `code` and what is wrong.
type LineError = (&'static str, String);

/// The job line `line` of batch `batch` becomes, with its `custom_id`.
fn job_of_line(config: &Config, batch: &str, text: &str) -> Result<(String, NewJob), LineError> {
    let value: Value = serde_json::from_str(text)
        .map_err(|e| ("invalid_json_line", format!("not valid JSON: {e}")))?;
    let Value::Object(mut obj) = value else {
        return Err(("invalid_json_line", "not a JSON object".into()));
    };
    let custom_id = match obj.get("custom_id") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        _ => {
            return Err((
                "missing_custom_id",
                "custom_id is missing: give each line a unique string custom_id".into(),
            ))
        }
    };
    let method = obj
        .get("method")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if method != "POST" {
        return Err((
            "invalid_method",
            format!("method is {method:?}: only POST is supported"),
        ));
    }
    let url = obj.get("url").and_then(Value::as_str).unwrap_or_default();
    if url != ENDPOINT {
        return Err((
            "invalid_url",
            format!("url is {url:?}, not the batch's endpoint {ENDPOINT}"),
        ));
    }
    let Some(Value::Object(mut body)) = obj.remove("body") else {
        return Err((
            "invalid_body",
            "body must be a JSON object (the chat request)".into(),
        ));
    };
    let name = match body.remove("model") {
        Some(Value::String(s)) => s,
        _ => return Err(("invalid_body", "body.model is required".into())),
    };
    let model = model_for(config, &name).ok_or_else(|| {
        let served: Vec<&str> = config
            .instances
            .iter()
            .map(|i| i.served_model_name.as_str())
            .collect();
        (
            "model_not_found",
            format!(
                "no instance serves model {name:?}: name one of {served:?}, or a model type (vision, think)"
            ),
        )
    })?;
    if body.get("stream").and_then(Value::as_bool) == Some(true) {
        return Err(("invalid_body", "stream is not supported in a batch".into()));
    }
    let request = SubmitRequest {
        model,
        input: Input::Inline(body),
        priority: config.api.batch_priority,
        max_attempts: None,
        then: None,
    };
    let mut job = match request.build(config) {
        Ok(Built::One(Submission::Single(job))) => job,
        Ok(_) => return Err(("invalid_body", "not a single chat request".into())),
        Err(e) => return Err(("invalid_body", e.to_string())),
    };
    // The caller waits for this answer, not a next stage's.
    job.then_model = None;
    // One job per line of this batch, the same one when queued again
    // after a restart.
    let mut h = Sha256::new();
    h.update(format!("batch\0{batch}\0{custom_id}\0"));
    h.update(job.payload_sha256.as_bytes());
    job.payload_sha256 = hex::encode(h.finalize());
    Ok((custom_id, job))
}

/// Reads the non-blank lines of `path`, numbered from 1.
fn each_line(path: &Path, mut f: impl FnMut(u64, &str) -> bool) -> std::io::Result<()> {
    let file = std::fs::File::open(path)?;
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        if !f(i as u64 + 1, &line) {
            break;
        }
    }
    Ok(())
}

/// Every refused line of the batch's input, and how many lines it has.
fn validate(config: &Config, batch: &str, path: &Path) -> std::io::Result<(Vec<Value>, u64)> {
    let mut errors = Vec::new();
    let mut seen = HashSet::new();
    let mut n = 0;
    each_line(path, |line, text| {
        n += 1;
        let refused = match job_of_line(config, batch, text) {
            Ok((custom_id, _)) if !seen.insert(custom_id.clone()) => Some((
                "duplicate_custom_id",
                format!("custom_id {custom_id:?} is used by an earlier line"),
            )),
            Ok(_) => None,
            Err(e) => Some(e),
        };
        if let Some((code, message)) = refused {
            errors.push(json!({"code": code, "line": line, "message": message, "param": null}));
        }
        errors.len() < MAX_ERRORS
    })?;
    Ok((errors, n))
}

/// Runs the batch worker: starts validated batches, follows their jobs,
/// finalizes them. Woken by a new or cancelled batch, else twice a second.
pub async fn worker(api: Api) {
    loop {
        if let Err(e) = tick(&api).await {
            warn!("the batch worker: {e}");
        }
        tokio::select! {
            _ = api.wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

async fn tick(api: &Api) -> anyhow::Result<()> {
    for b in api.store.batches_in(&["validating"]).await? {
        let id = b.id.clone();
        let Some((_lock, b)) = locked(api, b).await? else {
            continue;
        };
        if let Err(e) = start(api, b).await {
            warn!("starting batch {id}: {e}");
        }
    }
    for b in api
        .store
        .batches_in(&["in_progress", "cancelling", "finalizing"])
        .await?
    {
        let id = b.id.clone();
        let Some((_lock, b)) = locked(api, b).await? else {
            continue;
        };
        if let Err(e) = advance(api, b).await {
            warn!("batch {id}: {e}");
        }
    }
    Ok(())
}

/// The batch for this daemon alone (daemons sharing a PostgreSQL queue
/// take turns), read again under the lock; `None` when another daemon
/// holds it or moved it on since it was listed.
async fn locked(api: &Api, listed: BatchRow) -> anyhow::Result<Option<(BatchLock, BatchRow)>> {
    let Some(lock) = api.store.lock_batch(&listed.id).await? else {
        return Ok(None);
    };
    Ok(api
        .store
        .batch(&listed.id)
        .await?
        .filter(|now| now.status == listed.status)
        .map(|now| (lock, now)))
}

/// A batch `validating`: refused with its line errors, or its lines
/// queued (again, after a restart: the same jobs) and `in_progress`.
async fn start(api: &Api, row: BatchRow) -> anyhow::Result<()> {
    let Some(file) = api.store.file(&row.input_file_id).await? else {
        let mut row = moved(row, "failed");
        row.doc["errors"] = json!({"object": "list", "data": [{"code": "file_not_found", "line": null, "param": "input_file_id", "message": "the input file is gone"}]});
        api.store.update_batch("validating", row).await?;
        return Ok(());
    };
    let path = api.files_dir.join(&file.path);
    let (config, batch) = (api.config.clone(), row.id.clone());
    let (errors, lines) = {
        let path = path.clone();
        tokio::task::spawn_blocking(move || validate(&config, &batch, &path)).await??
    };
    if !errors.is_empty() || lines == 0 {
        let errors = if lines == 0 {
            vec![
                json!({"code": "empty_file", "line": null, "param": null, "message": "the input file has no requests"}),
            ]
        } else {
            errors
        };
        info!(
            "batch {} failed validation: {} refused lines",
            row.id,
            errors.len()
        );
        let mut row = moved(row, "failed");
        row.doc["errors"] = json!({"object": "list", "data": errors});
        api.store.update_batch("validating", row).await?;
        return Ok(());
    }
    queue_lines(api, &row.id, &path).await?;
    let mut row = moved(row, "in_progress");
    row.doc["request_counts"] = json!({"total": lines, "completed": 0, "failed": 0});
    if api.store.update_batch("validating", row).await? {
        info!("batch {}: {lines} requests queued", file.id);
    }
    Ok(())
}

/// Queues the jobs of every line of `path`, a chunk at a time, recording
/// which job each line became.
async fn queue_lines(api: &Api, batch: &str, path: &Path) -> anyhow::Result<()> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<(u64, String, NewJob)>>(2);
    let (config, id, path) = (api.config.clone(), batch.to_string(), path.to_path_buf());
    let reader = tokio::task::spawn_blocking(move || {
        let mut chunk = Vec::with_capacity(CHUNK);
        each_line(&path, |line, text| {
            if let Ok((custom_id, job)) = job_of_line(&config, &id, text) {
                chunk.push((line, custom_id, job));
            }
            if chunk.len() >= CHUNK {
                let full = std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK));
                return tx.blocking_send(full).is_ok();
            }
            true
        })?;
        if !chunk.is_empty() {
            let _ = tx.blocking_send(chunk);
        }
        Ok::<_, std::io::Error>(())
    });
    while let Some(chunk) = rx.recv().await {
        let (meta, jobs): (Vec<(u64, String)>, Vec<NewJob>) = chunk
            .into_iter()
            .map(|(line, custom_id, job)| ((line, custom_id), job))
            .unzip();
        let submitted = api
            .feeder
            .submit(jobs)
            .await
            .map_err(|e| anyhow::anyhow!("queueing the lines: {e}"))?;
        let lines = meta
            .into_iter()
            .zip(submitted)
            .map(|((line, custom_id), s)| LineJob {
                line,
                custom_id,
                job_id: s.id,
            })
            .collect();
        api.store.add_lines(batch, lines).await?;
    }
    reader.await??;
    Ok(())
}

fn counts_json(c: &LineCounts) -> Value {
    json!({"total": c.total, "completed": c.done, "failed": c.failed + c.cancelled})
}

/// A batch's `request_counts` as the API shows them: read from its jobs
/// while they run (the batch object lags behind by a worker tick), from
/// the batch object once it has ended or before its lines are queued.
pub async fn request_counts(store: &dyn ApiStore, row: &BatchRow) -> StoreResult<Value> {
    if matches!(
        row.status.as_str(),
        "in_progress" | "finalizing" | "cancelling"
    ) {
        Ok(counts_json(&store.line_counts(&row.id).await?))
    } else {
        Ok(row.doc["request_counts"].clone())
    }
}

/// A batch whose jobs run: its counts kept current, its unfinished jobs
/// cancelled when cancelling or past its window, and finalized once every
/// job has ended.
async fn advance(api: &Api, mut row: BatchRow) -> anyhow::Result<()> {
    let from = row.status.clone();
    let expires = row.doc["expires_at"].as_i64().unwrap_or(i64::MAX);
    if from == "in_progress" && row.doc["expired_at"].is_null() && unix_now() >= expires {
        info!(
            "batch {} expired: cancelling its unfinished requests",
            row.id
        );
        row.doc["expired_at"] = json!(unix_now());
        api.store.update_batch(&from, row.clone()).await?;
    }
    let expired = !row.doc["expired_at"].is_null();
    if from == "cancelling" || (expired && from == "in_progress") {
        cancel_jobs(api, &row.id).await;
    }
    let counts = api.store.line_counts(&row.id).await?;
    let current = counts_json(&counts);
    if !counts.all_ended() {
        if row.doc["request_counts"] != current {
            row.doc["request_counts"] = current;
            api.store.update_batch(&from, row).await?;
        }
        return Ok(());
    }
    row.doc["request_counts"] = current;
    let row = if from == "in_progress" {
        let row = moved(row, "finalizing");
        if !api.store.update_batch("in_progress", row.clone()).await? {
            return Ok(());
        }
        row
    } else {
        row
    };
    let end = match (row.status.as_str(), expired) {
        ("cancelling", _) => "cancelled",
        (_, true) => "expired",
        _ => "completed",
    };
    let why = if end == "completed" { "" } else { end };
    // A batch cancelled while it was validating has lines that never
    // became jobs: each is a `batch_cancelled` error all the same.
    let unqueued = if end == "cancelled" {
        never_queued(api, &row).await?
    } else {
        Vec::new()
    };
    let mut row = row;
    if !unqueued.is_empty() {
        let n = unqueued.len() as u64;
        let counts = &mut row.doc["request_counts"];
        counts["total"] = json!(counts["total"].as_u64().unwrap_or(0) + n);
        counts["failed"] = json!(counts["failed"].as_u64().unwrap_or(0) + n);
    }
    let (output, errors) = write_files(api, &row.id, why, &unqueued).await?;
    let status = row.status.clone();
    row.doc["output_file_id"] = json!(output.map(|f| f.id));
    row.doc["error_file_id"] = json!(errors.map(|f| f.id));
    let mut row = moved(row, end);
    if end == "expired" {
        // `expired_at` says when the window closed.
        row.doc["expired_at"] = row.doc["expires_at"].clone();
    }
    if api.store.update_batch(&status, row).await? {
        info!("batch {} {end}", status);
    }
    Ok(())
}

/// A line of the output or error file.
fn result_line(job: JobId, custom_id: &str, response: Value, error: Value) -> Value {
    json!({
        "id": format!("batch_req_{job}"),
        "custom_id": custom_id,
        "response": response,
        "error": error,
    })
}

/// The server's answer kept in a job's result document (or, for a
/// document without it, a completion made of its content).
pub(crate) fn completion_body(doc: &Value) -> Value {
    match doc.get("response") {
        Some(r) if !r.is_null() => r.clone(),
        _ => {
            json!({"object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": doc.get("content")}, "finish_reason": "stop"}]})
        }
    }
}

/// The status and body of a failed job's last answer, when it was an
/// HTTP error of the model server (`HTTP 400 from URL: body`).
pub(crate) fn http_failure(error: &str) -> Option<(u16, Value)> {
    let rest = error.strip_prefix("HTTP ")?;
    let (code, rest) = rest.split_once(' ')?;
    let code: u16 = code.parse().ok()?;
    let body = rest.split_once(": ").map_or("", |(_, b)| b);
    let body = serde_json::from_str(body)
        .unwrap_or_else(|_| json!({"error": {"message": body, "type": "server_error"}}));
    Some((code, body))
}

/// What one line gives: the output line, or the error line.
async fn line_result(
    api: &Api,
    line: &LineJob,
    job: Option<Job>,
    why: &str,
) -> Result<Value, Value> {
    let id = line.job_id;
    let custom = line.custom_id.as_str();
    let err = |code: &str, message: String| {
        result_line(
            id,
            custom,
            Value::Null,
            json!({"code": code, "message": message}),
        )
    };
    let Some(job) = job else {
        return Err(err("request_lost", format!("job {id} is not in the queue")));
    };
    match job.status {
        JobStatus::Done => {
            let Some(at) = &job.result_path else {
                return Err(err(
                    "result_missing",
                    format!("job {id} is done without a result"),
                ));
            };
            match api.results.document(at).await {
                Ok(doc) => {
                    let body = completion_body(&doc);
                    Ok(result_line(
                        id,
                        custom,
                        json!({"status_code": 200, "request_id": id.to_string(), "body": body}),
                        Value::Null,
                    ))
                }
                Err(e) => Err(err(
                    "result_missing",
                    format!("reading the result of job {id}: {e}"),
                )),
            }
        }
        JobStatus::Failed => {
            let message = job.error.unwrap_or_default();
            match http_failure(&message) {
                Some((code, body)) => Err(result_line(
                    id,
                    custom,
                    json!({"status_code": code, "request_id": id.to_string(), "body": body}),
                    Value::Null,
                )),
                None => Err(err("request_failed", message)),
            }
        }
        _ => {
            let code = if why == "expired" {
                "batch_expired"
            } else {
                "batch_cancelled"
            };
            Err(err(
                code,
                format!(
                    "the batch was {} before this request ran",
                    if why.is_empty() { "ended" } else { why }
                ),
            ))
        }
    }
}

/// The lines of a batch's input that never became jobs (line number and
/// `custom_id`): it was cancelled before they were queued.
async fn never_queued(api: &Api, row: &BatchRow) -> anyhow::Result<Vec<(u64, String)>> {
    let Some(file) = api.store.file(&row.input_file_id).await? else {
        return Ok(Vec::new());
    };
    let queued: HashSet<String> = api
        .store
        .lines(&row.id)
        .await?
        .into_iter()
        .map(|l| l.custom_id)
        .collect();
    let path = api.files_dir.join(&file.path);
    Ok(tokio::task::spawn_blocking(move || unqueued_lines(&path, &queued)).await??)
}

/// The lines of the input file at `path` whose `custom_id` is not in
/// `queued` (lines without one were never requests).
fn unqueued_lines(path: &Path, queued: &HashSet<String>) -> std::io::Result<Vec<(u64, String)>> {
    let mut out = Vec::new();
    each_line(path, |line, text| {
        let custom_id = serde_json::from_str::<Value>(text)
            .ok()
            .and_then(|v| v.get("custom_id")?.as_str().map(str::to_string));
        if let Some(id) = custom_id.filter(|id| !queued.contains(id)) {
            out.push((line, id));
        }
        true
    })?;
    Ok(out)
}

/// A file of a batch being written (`.part` until it is whole): its lines
/// and bytes so far.
struct Part {
    path: std::path::PathBuf,
    w: tokio::io::BufWriter<tokio::fs::File>,
    bytes: u64,
    lines: u64,
}

impl Part {
    async fn create(path: std::path::PathBuf) -> std::io::Result<Part> {
        let w = tokio::io::BufWriter::new(tokio::fs::File::create(&path).await?);
        Ok(Part {
            path,
            w,
            bytes: 0,
            lines: 0,
        })
    }

    /// Writes `value` as one line.
    async fn append(&mut self, value: &Value) -> anyhow::Result<()> {
        let mut text = serde_json::to_vec(value)?;
        text.push(b'\n');
        self.w.write_all(&text).await?;
        self.bytes += text.len() as u64;
        self.lines += 1;
        Ok(())
    }
}

/// Writes the output and error files of a batch whose jobs have all
/// ended, one line at a time, and records them; `None` for a file that
/// would be empty. `unqueued` lines (never jobs: the batch was cancelled
/// first) are errors at the end of the error file.
async fn write_files(
    api: &Api,
    batch: &str,
    why: &str,
    unqueued: &[(u64, String)],
) -> anyhow::Result<(Option<FileRow>, Option<FileRow>)> {
    let suffix = batch.strip_prefix("batch_").unwrap_or(batch);
    let names = [
        format!("file-{suffix}-output"),
        format!("file-{suffix}-errors"),
    ];
    let mut outs = Vec::new();
    for name in &names {
        outs.push(Part::create(api.files_dir.join(format!("{name}.part"))).await?);
    }
    // Jobs and result documents are read a few dozen at a time, the lines
    // written in order.
    let mut results = futures_util::stream::iter(api.store.lines(batch).await?)
        .map(|line| async move {
            let job = api.jobs.get(line.job_id).await?;
            Ok::<_, feeder_actors::StoreError>(line_result(api, &line, job, why).await)
        })
        .buffered(READ_AHEAD);
    while let Some(result) = results.next().await {
        match result? {
            Ok(v) => outs[0].append(&v).await?,
            Err(v) => outs[1].append(&v).await?,
        }
    }
    for (line, custom_id) in unqueued {
        let value = json!({
            "id": format!("batch_req_{suffix}_line_{line}"),
            "custom_id": custom_id,
            "response": null,
            "error": {"code": "batch_cancelled", "message": "the batch was cancelled before this request was queued"},
        });
        outs[1].append(&value).await?;
    }
    let mut rows = Vec::new();
    for (
        Part {
            path: part,
            mut w,
            bytes,
            lines,
        },
        name,
    ) in outs.into_iter().zip(names)
    {
        w.flush().await?;
        w.get_mut().sync_all().await?;
        drop(w);
        if lines == 0 {
            let _ = tokio::fs::remove_file(&part).await;
            rows.push(None);
            continue;
        }
        tokio::fs::rename(&part, api.files_dir.join(&name)).await?;
        let row = FileRow {
            id: name.clone(),
            filename: format!(
                "{batch}_{}.jsonl",
                if name.ends_with("output") {
                    "output"
                } else {
                    "error"
                }
            ),
            purpose: "batch_output".into(),
            bytes,
            lines,
            created_at: unix_now(),
            path: name,
        };
        api.store.put_file(row.clone()).await?;
        rows.push(Some(row));
    }
    let errors = rows.pop().flatten();
    let output = rows.pop().flatten();
    Ok((output, errors))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lines_a_cancelled_batch_never_queued_are_found_by_custom_id() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in.jsonl");
        std::fs::write(
            &path,
            "{\"custom_id\": \"a\"}\n\n{\"custom_id\": \"b\"}\nnot json\n{\"custom_id\": \"c\"}\n",
        )
        .unwrap();
        let none: HashSet<String> = HashSet::new();
        assert_eq!(
            unqueued_lines(&path, &none).unwrap(),
            [(1, "a".into()), (3, "b".into()), (5, "c".into())]
        );
        let some: HashSet<String> = ["a".to_string(), "c".to_string()].into();
        assert_eq!(unqueued_lines(&path, &some).unwrap(), [(3, "b".into())]);
    }

    fn config() -> Config {
        toml::from_str(
            "[[instances]]\nname = \"t\"\nmodel_type = \"think\"\nbackend = \"external\"\nurl = \"http://127.0.0.1:1\"\nserved_model_name = \"qwen\"\nthen = \"vision\"\n",
        )
        .unwrap()
    }

    #[test]
    fn a_line_becomes_one_job_of_its_batch_below_interactive_traffic() {
        let c = config();
        let line = r#"{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "qwen", "messages": [{"role": "user", "content": "hi"}]}}"#;
        let (id, job) = job_of_line(&c, "batch_1", line).unwrap();
        assert_eq!(id, "a");
        assert_eq!(job.model_type, ModelType::Think);
        assert!(job.priority < 0);
        assert_eq!(job.then_model, None);
        let (_, again) = job_of_line(&c, "batch_1", line).unwrap();
        assert_eq!(job.payload_sha256, again.payload_sha256);
        let (_, other) = job_of_line(&c, "batch_2", line).unwrap();
        assert_ne!(job.payload_sha256, other.payload_sha256);
        let (_, by_type) = job_of_line(&c, "b", &line.replace("qwen", "think")).unwrap();
        assert_eq!(by_type.model_type, ModelType::Think);
        for (bad, code) in [
            ("{", "invalid_json_line"),
            (
                &line.replace("\"custom_id\": \"a\",", "") as &str,
                "missing_custom_id",
            ),
            (&line.replace("POST", "GET"), "invalid_method"),
            (
                &line.replace("/v1/chat/completions", "/v1/embeddings"),
                "invalid_url",
            ),
            (&line.replace("qwen", "llama"), "model_not_found"),
        ] {
            assert_eq!(job_of_line(&c, "b", bad).unwrap_err().0, code, "{bad}");
        }
    }

    #[test]
    fn an_http_error_of_the_server_keeps_its_status_and_body() {
        let (code, body) = http_failure(
            r#"HTTP 400 from http://h/v1/chat/completions: {"error": {"message": "too long"}}"#,
        )
        .unwrap();
        assert_eq!(code, 400);
        assert_eq!(body["error"]["message"], "too long");
        assert!(http_failure("connection refused").is_none());
    }
}
