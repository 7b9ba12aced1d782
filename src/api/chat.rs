//! `POST /v1/chat/completions` and `GET /v1/models`: an interactive request
//! is a job on the durable queue at `api.chat_priority` (above batches and
//! the bulk, so it overtakes them), and the answer is its server's.
//!
//! The client waiting is what keeps the request alive: when it goes away
//! before its job was sent, the job is cancelled. With `stream: true` the
//! answer comes as server-sent events (`chat.completion.chunk` objects,
//! then `data: [DONE]`), relayed chunk by chunk from the server as it
//! writes them (see [`crate::openai::stream`]); a client that goes away
//! mid-stream ends the request at the server. When no chunk came (the job
//! was sent by another daemon of a shared queue, or its server does not
//! stream), the same events are made from the whole answer once it is in.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use tracing::debug;

use feeder_actors::watch::JobWatch;
use feeder_actors::{Job, JobId, JobStatus, JobStore, Timestamp};

use super::batches::{completion_body, http_failure, model_for};
use super::{new_id, unix_now, Api, ApiError};
use crate::openai::stream::{Relay, Relayed};
use crate::submit::{Built, Input, Submission, SubmitRequest};

/// How often a waiting request re-reads its job when no news came (a job
/// settled by another daemon on a shared queue, or cancelled elsewhere).
const REREAD: Duration = Duration::from_secs(1);

/// The header that names the job behind an answer.
const JOB_HEADER: &str = "x-gpu-feeder-job";

/// `POST /v1/chat/completions`.
pub async fn completions(State(api): State<Api>, body: Bytes) -> Result<Response, ApiError> {
    let came = std::time::Instant::now();
    let request: Value = serde_json::from_slice(&body).map_err(|e| {
        ApiError::invalid(
            None,
            format!("the body is not JSON ({e}): send a chat completion request object"),
        )
    })?;
    let Value::Object(mut request) = request else {
        return Err(ApiError::invalid(
            None,
            "the body must be a JSON object (a chat completion request)",
        ));
    };
    let name = match request.remove("model") {
        Some(Value::String(s)) if !s.is_empty() => s,
        _ => {
            return Err(ApiError::invalid(
                Some("model"),
                "model is required: name a model of GET /v1/models",
            ))
        }
    };
    let Some(model) = model_for(&api.config, &name) else {
        return Err(ApiError::model_not_found(format!(
            "no instance serves model {name:?}: name one of {:?} (GET /v1/models), or a model type (vision, think)",
            served(&api)
        )));
    };
    let stream = match request.remove("stream") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => false,
        Some(Value::Bool(true)) => true,
        Some(other) => {
            return Err(ApiError::invalid(
                Some("stream"),
                format!("stream must be true or false, not {other}"),
            ))
        }
    };
    let include_usage = request
        .remove("stream_options")
        .and_then(|o| o.get("include_usage").and_then(Value::as_bool))
        .unwrap_or(false);
    let job = job_of(&api, model, request)?;
    // Listened for before the job is queued, so that no chunk comes first.
    let relay = stream.then(|| api.relays.listen(&job.payload_sha256));
    let submitted =
        api.feeder.submit(vec![job]).await.map_err(|e| {
            ApiError::unavailable(format!("the daemon did not take the request: {e}"))
        })?;
    let id = submitted
        .first()
        .map(|s| s.id)
        .ok_or_else(|| ApiError::internal("the daemon queued no job for the request"))?;
    debug!(job = %id, %name, stream, "chat completion queued");
    // A streamed request's client that goes away takes its request at the
    // server with it (the relay is gone), so its job is cancelled even once
    // sent; a plain request's job, once sent, is answered into its result.
    let mut unsent = CancelIfUnsent {
        jobs: api.jobs.clone(),
        job: id,
        armed: true,
        sent_too: stream,
    };
    let job = match relay {
        None => wait_for_end(&api.jobs, &api.watch, id).await?,
        Some(mut relay) => {
            let first = tokio::select! {
                biased;
                Some(chunk) = first_chunk(&mut relay) => Ok(chunk),
                job = wait_for_end(&api.jobs, &api.watch, id) => Err(job?),
            };
            match first {
                Ok(chunk) => {
                    api.metrics
                        .stream_first_chunk(model, came.elapsed().as_secs_f64());
                    unsent.armed = false;
                    debug!(job = %id, "relaying the streamed answer");
                    // From now on a client that goes away cancels the job
                    // even though it was sent: its request is ended.
                    let gone = CancelIfUnsent {
                        jobs: api.jobs.clone(),
                        job: id,
                        armed: true,
                        sent_too: true,
                    };
                    let ended = StreamEnd {
                        metrics: api.metrics.clone(),
                        model,
                        counted: false,
                    };
                    return Ok(relayed(id, chunk, relay, (gone, ended), include_usage));
                }
                Err(job) => {
                    if job.status == JobStatus::Done {
                        api.metrics.stream_ended(model, "replayed");
                    }
                    job
                }
            }
        }
    };
    unsent.armed = false;
    answer(&api, job, &name, stream, include_usage).await
}

/// The first chunk the server streams for the job.
async fn first_chunk(relay: &mut Relay) -> Option<Relayed> {
    loop {
        match relay.recv().await? {
            chunk @ Relayed::Chunk { .. } => return Some(chunk),
            // An end or a break before any chunk: the job's end tells.
            Relayed::End | Relayed::Broken(_) => {}
        }
    }
}

/// The response that relays the server's stream, `first` chunk on: each
/// chunk as an event, then `[DONE]`; an error event if the stream broke.
fn relayed(
    id: JobId,
    first: Relayed,
    relay: Relay,
    (gone, ended): (CancelIfUnsent, StreamEnd),
    include_usage: bool,
) -> Response {
    let events = futures_util::stream::unfold(
        (Some(first), relay, gone, ended),
        move |(mut next, mut relay, mut gone, mut end)| async move {
            if !gone.armed {
                return None;
            }
            loop {
                let event = match next.take() {
                    Some(e) => e,
                    None => relay.recv().await?,
                };
                let (out, ended) = match event {
                    Relayed::Chunk {
                        usage_only: true, ..
                    } if !include_usage => continue,
                    Relayed::Chunk { data, .. } => {
                        let mut out = Vec::with_capacity(data.len() + 8);
                        out.extend_from_slice(b"data: ");
                        out.extend_from_slice(&data);
                        out.extend_from_slice(b"\n\n");
                        (Bytes::from(out), false)
                    }
                    Relayed::End => {
                        end.ended("relayed");
                        (Bytes::from_static(b"data: [DONE]\n\n"), true)
                    }
                    Relayed::Broken(why) => {
                        end.ended("broken");
                        let e = json!({"error": {
                            "message": format!("the answer broke off (job {id}): {why}"),
                            "type": "server_error", "param": null, "code": null,
                        }});
                        (Bytes::from(format!("data: {e}\n\n")), true)
                    }
                };
                // Once the stream has ended, the job is the dispatcher's
                // to settle.
                gone.armed = !ended;
                return Some((
                    Ok::<_, std::convert::Infallible>(out),
                    (None, relay, gone, end),
                ));
            }
        },
    );
    let mut r = Body::from_stream(events).into_response();
    let headers = r.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(v) = HeaderValue::from_str(&id.to_string()) {
        headers.insert(JOB_HEADER, v);
    }
    r
}

/// The job a request becomes: its body is the payload, as a batch line's.
fn job_of(
    api: &Api,
    model: feeder_actors::ModelType,
    body: Map<String, Value>,
) -> Result<feeder_actors::NewJob, ApiError> {
    let request = SubmitRequest {
        model,
        input: Input::Inline(body),
        priority: api.config.api.chat_priority,
        max_attempts: None,
        then: None,
    };
    let mut job = match request.build(&api.config) {
        Ok(Built::One(Submission::Single(job))) => job,
        Ok(_) => return Err(ApiError::invalid(None, "not a single chat request")),
        Err(e) => return Err(ApiError::invalid(None, e.to_string())),
    };
    job.then_model = None;
    // Every request is its own job: the same question asked twice is
    // answered twice (sampling), not once from the queue's memory.
    let mut h = Sha256::new();
    h.update(format!("chat\0{}\0", new_id("")));
    h.update(job.payload_sha256.as_bytes());
    job.payload_sha256 = hex::encode(h.finalize());
    Ok(job)
}

/// Counts a relayed stream by how it ended, once: when its end is seen,
/// or `gone` when it is dropped before (the client left).
struct StreamEnd {
    metrics: Arc<crate::metrics::Metrics>,
    model: feeder_actors::ModelType,
    counted: bool,
}

impl StreamEnd {
    fn ended(&mut self, outcome: &str) {
        if !self.counted {
            self.counted = true;
            self.metrics.stream_ended(self.model, outcome);
        }
    }
}

impl Drop for StreamEnd {
    fn drop(&mut self) {
        self.ended("gone");
    }
}

/// Cancels its job, if not sent yet, when dropped: the client went away
/// (axum drops the request's future when its connection closes). With
/// `sent_too`, a job being sent is cancelled as well (a streamed answer's
/// client went away mid-stream: the request at the server is ended too).
struct CancelIfUnsent {
    jobs: Arc<dyn JobStore>,
    job: JobId,
    /// Cleared once the job has ended.
    armed: bool,
    sent_too: bool,
}

impl Drop for CancelIfUnsent {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (jobs, id, sent_too) = (self.jobs.clone(), self.job, self.sent_too);
        tokio::spawn(async move {
            if let Ok(Some(job)) = jobs.get(id).await {
                if job.status == JobStatus::Pending
                    || (sent_too && job.status == JobStatus::Processing)
                {
                    match jobs.cancel(id, Timestamp::now()).await {
                        Ok(_) => {
                            debug!(job = %id, sent_too, "the client went away before its answer; cancelled")
                        }
                        Err(e) => {
                            debug!(job = %id, "the client went away; the job could not be cancelled: {e}")
                        }
                    }
                }
            }
        });
    }
}

/// Waits until `id` has ended: woken by the queue when this daemon settles
/// it, and re-read every second for what happens elsewhere.
async fn wait_for_end(
    jobs: &Arc<dyn JobStore>,
    watch: &Arc<JobWatch>,
    id: JobId,
) -> Result<Job, ApiError> {
    let news = watch.watch(id);
    let _forget = Forget(watch, id);
    loop {
        let job = jobs
            .get(id)
            .await?
            .ok_or_else(|| ApiError::internal(format!("job {id} left the queue")))?;
        if job.status.is_terminal() {
            return Ok(job);
        }
        let _ = tokio::time::timeout(REREAD, news.notified()).await;
    }
}

/// Stops watching a job when its waiter ends, however it ends.
struct Forget<'a>(&'a JobWatch, JobId);

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.0.forget(self.1);
    }
}

/// The answer to a request whose job has ended.
async fn answer(
    api: &Api,
    job: Job,
    name: &str,
    stream: bool,
    include_usage: bool,
) -> Result<Response, ApiError> {
    let id = job.id;
    let (status, body) = match job.status {
        JobStatus::Done => {
            let at = job
                .result_path
                .ok_or_else(|| ApiError::internal(format!("job {id} is done without a result")))?;
            let doc =
                api.results.document(&at).await.map_err(|e| {
                    ApiError::internal(format!("reading the result of job {id}: {e}"))
                })?;
            (StatusCode::OK, completion_body(&doc))
        }
        JobStatus::Failed => {
            let message = job.error.unwrap_or_default();
            match http_failure(&message) {
                Some((code, body)) => (
                    StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_GATEWAY),
                    body,
                ),
                None => {
                    return Err(ApiError::upstream(format!(
                        "the request failed (job {id}): {message}"
                    )))
                }
            }
        }
        other => {
            return Err(ApiError::conflict(format!(
                "the request's job {id} was {other} before it was answered"
            )))
        }
    };
    let mut response = if stream && status == StatusCode::OK {
        let events = chunks(&body, name, include_usage);
        let mut r = events.into_response();
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        r.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        r
    } else {
        (status, Json(body)).into_response()
    };
    if let Ok(v) = HeaderValue::from_str(&id.to_string()) {
        response.headers_mut().insert(JOB_HEADER, v);
    }
    Ok(response)
}

/// A whole completion as server-sent events of `chat.completion.chunk`
/// objects: per choice, its role and content, then its finish reason;
/// the usage when asked for; then `[DONE]`.
fn chunks(body: &Value, name: &str, include_usage: bool) -> String {
    let id = body["id"]
        .as_str()
        .map_or_else(|| new_id("chatcmpl-"), str::to_string);
    let created = body["created"].as_i64().unwrap_or_else(unix_now);
    let model = body["model"].as_str().unwrap_or(name);
    let chunk = |choices: Value, usage: Option<&Value>| {
        let mut c = json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": choices,
        });
        if let Some(u) = usage {
            c["usage"] = u.clone();
        }
        format!("data: {c}\n\n")
    };
    let mut out = String::new();
    let choices = body["choices"].as_array().cloned().unwrap_or_default();
    for (n, choice) in choices.iter().enumerate() {
        let index = choice["index"].as_u64().unwrap_or(n as u64);
        let message = &choice["message"];
        let mut delta = json!({"role": message["role"].as_str().unwrap_or("assistant"), "content": message["content"]});
        for key in ["reasoning_content", "tool_calls"] {
            if let Some(v) = message.get(key).filter(|v| !v.is_null()) {
                delta[key] = v.clone();
            }
        }
        out += &chunk(
            json!([{"index": index, "delta": delta, "logprobs": null, "finish_reason": null}]),
            None,
        );
        out += &chunk(
            json!([{"index": index, "delta": {}, "logprobs": null, "finish_reason": choice["finish_reason"]}]),
            None,
        );
    }
    if include_usage {
        out += &chunk(json!([]), Some(&body["usage"]));
    }
    out += "data: [DONE]\n\n";
    out
}

/// The served model names.
fn served(api: &Api) -> Vec<String> {
    api.config
        .instances
        .iter()
        .map(|i| i.served_model_name.clone())
        .collect()
}

/// One model object.
fn model_object(name: &str, api: &Api) -> Value {
    json!({
        "id": name,
        "object": "model",
        "created": api.started,
        "owned_by": "gpu-feeder",
    })
}

/// `GET /v1/models`: each instance's served model name (a name served by
/// several instances once).
pub async fn models(State(api): State<Api>) -> Json<Value> {
    let mut names = served(&api);
    names.dedup();
    let data: Vec<Value> = names.iter().map(|n| model_object(n, &api)).collect();
    Json(json!({"object": "list", "data": data}))
}

/// `GET /v1/models/{id}`.
pub async fn model(
    State(api): State<Api>,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<Value>, ApiError> {
    if served(&api).contains(&name) {
        Ok(Json(model_object(&name, &api)))
    } else {
        Err(ApiError::model_not_found(format!(
            "no instance serves model {name:?}: GET /v1/models lists them"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_completion_becomes_chunks_the_sdk_reassembles() {
        let body = json!({
            "id": "chatcmpl-1", "created": 7, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi there"}, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
        });
        let events = chunks(&body, "m", true);
        let data: Vec<&str> = events
            .split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| e.strip_prefix("data: ").unwrap())
            .collect();
        assert_eq!(data.last(), Some(&"[DONE]"));
        let parsed: Vec<Value> = data[..data.len() - 1]
            .iter()
            .map(|d| serde_json::from_str(d).unwrap())
            .collect();
        let text: String = parsed
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(text, "hi there");
        assert_eq!(parsed[1]["choices"][0]["finish_reason"], "length");
        assert_eq!(parsed[2]["usage"]["total_tokens"], 5);
        assert!(parsed
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk" && c["id"] == "chatcmpl-1"));
    }
}
