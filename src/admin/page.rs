//! The status page: `GET /` serves one self-contained page (HTML, CSS and
//! script embedded in the binary, nothing fetched from elsewhere) that
//! reads `GET /v1/page` every few seconds.
//!
//! With `admin.token` set, the page's shell loads without it but its data
//! does not: the page asks for the token in a form that `POST`s it to
//! `/v1/login`, which answers with an `HttpOnly`, `SameSite=Strict` cookie
//! that every endpoint accepts as it accepts the bearer header. The token
//! never travels in a URL, and the cookie holds a digest of it, not the
//! token itself.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use feeder_actors::{Job, JobStatus, ListFilter, QueueStats, Timestamp};

use super::history::History;
use super::state::{bad, Admin};
use crate::store::api::ApiStore;
use crate::views;

/// The page itself.
const PAGE: &str = include_str!("page.html");

/// The cookie the login sets.
pub const COOKIE: &str = "gpu_feeder_admin";

/// Failures listed…
const FAILURES: usize = 10;
/// …the most recently finished among this many failed jobs, newest
/// submitted first.
const FAILED_READ: usize = 200;
/// Jobs stuck past their lease listed, the most recently submitted.
const STUCK: usize = 50;
/// Batches shown, the latest.
const BATCHES: usize = 20;

/// What the cookie holds for `token`: a digest, so that a cookie jar
/// never holds the token itself.
pub fn cookie_value(token: &str) -> String {
    hex::encode(Sha256::digest(format!("gpu-feeder admin cookie\n{token}")))
}

/// Whether the request's cookies carry the right one for `token`.
pub fn cookie_matches(headers: &HeaderMap, token: &str) -> bool {
    let want = cookie_value(token);
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .any(|(k, v)| k == COOKIE && same_secret(v, &want))
}

/// `given == secret`, in a time that does not depend on where they first
/// differ, so that timing answers cannot spell a token out.
pub fn same_secret(given: &str, secret: &str) -> bool {
    let (g, s) = (given.as_bytes(), secret.as_bytes());
    g.len() == s.len() && g.iter().zip(s).fold(0u8, |d, (a, b)| d | (a ^ b)) == 0
}

/// `GET /`: the page (no data in it, so it loads without the token).
pub async fn page() -> Response {
    (
        [
            (header::CACHE_CONTROL, "no-store"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                 img-src data:; connect-src 'self'; form-action 'none'; frame-ancestors 'none'",
            ),
        ],
        Html(PAGE),
    )
        .into_response()
}

/// `POST /v1/login` with `{"token": "…"}`: the cookie when it is right,
/// 401 saying so when it is wrong.
pub async fn login(State(a): State<Admin>, body: Option<Json<Value>>) -> Response {
    let token = &a.config.admin.token;
    if token.is_empty() {
        return Json(json!({"token_required": false})).into_response();
    }
    let given = body
        .as_ref()
        .and_then(|Json(b)| b.get("token"))
        .and_then(Value::as_str)
        .unwrap_or("");
    if given.is_empty() {
        return bad(StatusCode::UNAUTHORIZED, "token required");
    }
    if !same_secret(given, token) {
        return bad(StatusCode::UNAUTHORIZED, "wrong token");
    }
    (
        [(
            header::SET_COOKIE,
            format!(
                "{COOKIE}={}; HttpOnly; SameSite=Strict; Path=/",
                cookie_value(token)
            ),
        )],
        Json(json!({"token_required": true, "accepted": true})),
    )
        .into_response()
}

/// `POST /v1/logout`: forgets the cookie.
pub async fn logout() -> Response {
    (
        [(
            header::SET_COOKIE,
            format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"),
        )],
        Json(json!({"logged_out": true})),
    )
        .into_response()
}

/// Up to `limit` jobs in `status` (for `Processing`, only those whose
/// lease ended before `now`), newest first; none read when the queue's
/// counts say there are none (most of the time, for both).
async fn jobs(
    a: &Admin,
    stats: Option<&QueueStats>,
    status: JobStatus,
    now: Timestamp,
    limit: usize,
) -> Result<Vec<Job>, String> {
    let none = stats.is_some_and(|s| s.models.iter().all(|(_, m)| m.counts.get(status) == 0));
    if none {
        return Ok(Vec::new());
    }
    a.reader
        .list(&ListFilter {
            status: Some(status),
            lease_ended_before: (status == JobStatus::Processing).then_some(now),
            limit,
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())
}

/// `GET /v1/page`: everything the page shows, in one document: the
/// `/v1/status` view, recent failures, jobs stuck past their lease, and
/// jobs finished per model over the last ten minutes ([`History`]), and
/// the API's latest batches (`null` without `api.listen`). A queue that cannot be
/// read is named in `queue_error` (the rest still shows); actors that do
/// not answer make it a 503.
pub async fn page_json(
    State(a): State<Admin>,
    Extension(history): Extension<Arc<History>>,
) -> Response {
    let now = Timestamp::now();
    let (status, stats) = tokio::join!(a.feeder.status(), a.reader.stats(now));
    let Ok(status) = status else {
        return bad(
            StatusCode::SERVICE_UNAVAILABLE,
            "the daemon's actors do not answer",
        );
    };
    let mut v = views::status_json(&a.config, &status, stats.as_ref().ok());
    let lists = async {
        let (failed, processing) = tokio::join!(
            jobs(&a, stats.as_ref().ok(), JobStatus::Failed, now, FAILED_READ),
            jobs(&a, stats.as_ref().ok(), JobStatus::Processing, now, STUCK),
        );
        Ok::<_, String>((failed?, processing?))
    };
    v["throughput"] = history.json(now);
    let queue_error = match (&stats, lists.await) {
        (Ok(_), Ok((mut failed, stuck))) => {
            v["stuck"] = json!(views::stuck_json(&stuck, now));
            failed.sort_by_key(|j| std::cmp::Reverse(j.finished_at));
            failed.truncate(FAILURES);
            v["failures"] = json!(views::failures_json(&failed));
            None
        }
        (Err(e), _) => Some(
            a.reader
                .connection_problem()
                .unwrap_or_else(|| format!("the job store does not answer: {e}")),
        ),
        (_, Err(e)) => Some(format!("reading the queue failed: {e}")),
    };
    v["queue_error"] = json!(queue_error);
    v["token_required"] = json!(!a.config.admin.token.is_empty());
    v["daemon"] = json!({
        "id": a.config.queue.owner(),
        "version": env!("CARGO_PKG_VERSION"),
    });
    v["now"] = json!(now.0 as f64 / 1000.0);
    let (batches, batches_error) = match &a.api {
        None => (Value::Null, None),
        Some(store) => match batches_json(store.as_ref(), now).await {
            Ok(b) => (b, None),
            Err(e) => (json!([]), Some(format!("reading the batches failed: {e}"))),
        },
    };
    v["batches"] = batches;
    v["batches_error"] = json!(batches_error);
    Json(v).into_response()
}

/// The latest [`BATCHES`] batches of the OpenAI API, newest first, each
/// with its `request_counts` as the API reports them and, while it runs,
/// an estimate of the time left (its pace so far, kept up).
async fn batches_json(store: &dyn ApiStore, now: Timestamp) -> Result<Value, String> {
    let rows = store
        .batches(None, BATCHES)
        .await
        .map_err(|e| e.to_string())?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let counts = crate::api::batches::request_counts(store, &row)
            .await
            .map_err(|e| e.to_string())?;
        let d = &row.doc;
        let ended = matches!(
            row.status.as_str(),
            "completed" | "failed" | "expired" | "cancelled"
        );
        let left_s = if row.status == "in_progress" {
            d["in_progress_at"]
                .as_i64()
                .and_then(|from| time_left(&counts, now.0 as f64 / 1000.0 - from as f64))
        } else {
            None
        };
        out.push(json!({
            "id": row.id,
            "status": row.status,
            "created_at": row.created_at,
            "request_counts": counts,
            "description": d["metadata"]["description"].as_str(),
            "output_file_id": if ended { d["output_file_id"].clone() } else { Value::Null },
            "error_file_id": if ended { d["error_file_id"].clone() } else { Value::Null },
            "left_s": left_s,
        }));
    }
    Ok(Value::Array(out))
}

/// Seconds left for a batch whose `request_counts` are `counts` after
/// `spent_s` seconds running, at its pace so far; `None` before its first
/// request finishes or after its last.
fn time_left(counts: &Value, spent_s: f64) -> Option<f64> {
    let n = |k: &str| counts[k].as_u64().unwrap_or(0);
    let (total, finished) = (n("total"), n("completed") + n("failed"));
    (finished > 0 && total > finished)
        .then(|| spent_s.max(0.0) / finished as f64 * (total - finished) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_s_time_left_is_its_pace_so_far_kept_up() {
        let c = |done: u64, failed: u64| json!({"total": 100, "completed": done, "failed": failed});
        assert_eq!(time_left(&c(20, 5), 50.0), Some(150.0));
        assert_eq!(time_left(&c(0, 0), 50.0), None, "no pace yet");
        assert_eq!(time_left(&c(90, 10), 50.0), None, "all finished");
        assert_eq!(time_left(&c(50, 0), -3.0), Some(0.0), "a clock behind");
    }

    #[test]
    fn the_cookie_is_recognised_among_others_and_only_for_its_token() {
        let mut h = HeaderMap::new();
        let c = format!("a=b; {COOKIE}={}; c=d", cookie_value("s3cret"));
        h.insert(header::COOKIE, c.parse().unwrap());
        assert!(cookie_matches(&h, "s3cret"));
        assert!(!cookie_matches(&h, "other"));
        assert!(!cookie_value("s3cret").contains("s3cret"));
        assert!(!cookie_matches(&HeaderMap::new(), "s3cret"));
    }
}
