//! The admin HTTP endpoint (`admin.listen`, loopback by default):
//!
//! - `GET /`: the status page ([`super::page`]), which reads `GET /v1/page`;
//! - `GET /metrics`: Prometheus metrics;
//! - `GET /healthz`: liveness (the actors answer);
//! - `GET /readyz`: the store answers and at least one instance is Ready;
//! - `GET /v1/status`: instances and queue as JSON (`gpu-feeder instances`);
//! - `POST /v1/jobs`: submit a job, with the CLI's validation;
//! - `GET /v1/jobs/{id}`: one job (`status --json`), with its answer's text;
//! - `GET /v1/jobs/{id}/result`: its result document, from its file or the
//!   database, wherever the job says (`gpu-feeder result`).
//!
//! With `admin.token` set, every endpoint but `/healthz`, the page's shell
//! and its login requires `Authorization: Bearer <token>`, or the cookie
//! that `POST /v1/login` gives for the token.

use std::sync::Arc;

use axum::extract::{Path as UrlPath, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use feeder_actors::allocator::Strategy;
use feeder_actors::handle::HandleError;
use feeder_actors::{StoreError, Timestamp};

use crate::submit::{Built, Submission, SubmitRequest};
use crate::views;

use super::state::{bad, Admin};

/// 503: the supervisor did not answer.
fn actors_silent() -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        "the actors do not answer\n",
    )
        .into_response()
}

async fn healthz(State(a): State<Admin>) -> Response {
    match a.status().await {
        Some(_) => (StatusCode::OK, "ok\n").into_response(),
        None => actors_silent(),
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
        None => actors_silent(),
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
            let mut v = views::status_json(&a.config, &s, stats.as_ref());
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
        Ok(s) => Json(views::pinned_json(&s)).into_response(),
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
        Err(e) => Err(bad(store_status(&e), e.to_string())),
    }
}

/// 503 when the store cannot be reached now (trying again may succeed),
/// 500 when the call itself failed.
fn store_status(e: &StoreError) -> StatusCode {
    match e {
        StoreError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// `GET /v1/jobs/ID`: the job as `status --json` prints it, with
/// `result` (its answer's text) once it is done.
async fn get_job(
    State(a): State<Admin>,
    UrlPath(id): UrlPath<String>,
) -> Result<Response, Response> {
    let job = job_of(&a, &id).await?;
    let mut v = views::job_json(&job);
    if let Some(at) = &job.result_path {
        match a.results.document(at).await {
            Ok(doc) => v["result"] = doc.get("content").cloned().unwrap_or(Value::Null),
            Err(e) => {
                return Err(bad(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("job {} is done but its result cannot be read: {e}", job.id),
                ))
            }
        }
    }
    Ok(Json(v).into_response())
}

/// `GET /v1/jobs/ID/result`: the job's result document.
async fn get_result(State(a): State<Admin>, UrlPath(id): UrlPath<String>) -> Response {
    let job = match job_of(&a, &id).await {
        Ok(job) => job,
        Err(refused) => return refused,
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

/// `POST /v1/jobs`: `{"model": "think", "prompt": "…"}` (or `messages`,
/// `image_path`), with optional `priority`, `max_attempts` and `then`.
async fn submit(State(a): State<Admin>, body: Option<Json<Value>>) -> Response {
    let Some(Json(body)) = body else {
        return bad(
            StatusCode::BAD_REQUEST,
            "the body must be a JSON object with `model` and `prompt`, `messages` or `image_path`",
        );
    };
    let job = match SubmitRequest::from_json(body).and_then(|r| r.build(&a.config)) {
        Ok(Built::One(Submission::Single(job))) => job,
        Ok(other) => unreachable!("an inline payload is one job: {other:?}"),
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
        Err(HandleError::Store(e)) => bad(store_status(&e), format!("the job store failed: {e}")),
        Err(e) => bad(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

async fn auth(State(token): State<Arc<String>>, req: Request, next: Next) -> Response {
    let open = matches!(
        req.uri().path(),
        "/healthz" | "/" | "/v1/login" | "/v1/logout"
    );
    if token.is_empty() || open {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // The page's cookie reads; it changes nothing. A browser sends it with
    // requests another page on this host makes (a port is no boundary for
    // cookies), so a write needs the bearer header, which no other page can
    // add.
    let reads = matches!(*req.method(), Method::GET | Method::HEAD);
    let by_cookie = reads && super::page::cookie_matches(req.headers(), &token);
    if given.is_some_and(|g| super::page::same_secret(g, &token)) || by_cookie {
        next.run(req).await
    } else {
        bad(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token: send `Authorization: Bearer <admin.token>` (the status page asks for it)",
        )
    }
}

/// The endpoint's routes (within a Tokio runtime: the status page's
/// throughput sampler starts here and stops with the router).
pub fn router(admin: Admin) -> Router {
    let token = Arc::new(admin.config.admin.token.clone());
    let history = super::history::sample(admin.reader.clone());
    Router::new()
        .route("/", get(super::page::page))
        .route("/v1/page", get(super::page::page_json))
        .route("/v1/login", post(super::page::login))
        .route("/v1/logout", post(super::page::logout))
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
        .layer(axum::Extension(history))
        .layer(middleware::from_fn_with_state(token, auth))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreachable_store_is_503_and_a_failed_call_500() {
        assert_eq!(
            store_status(&StoreError::Unavailable("locked".into())),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            store_status(&StoreError::Backend("disk I/O error".into())),
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }
}
