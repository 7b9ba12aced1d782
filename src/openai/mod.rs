//! The OpenAI-compatible HTTP adapter of the `InferenceClient` port.
//!
//! A job's payload becomes one `POST /v1/chat/completions`:
//! - a payload with `messages` passes through (other OpenAI fields too);
//! - `prompt` becomes a user message;
//! - `image_path` becomes an `image_url` content part holding a base64 data
//!   URL of the right MIME type, followed by the payload's `prompt` or the
//!   instance's OCR prompt.
//!
//! The instance's defaults (served model name, `max_tokens`, `temperature`,
//! system prompt) fill what the payload leaves out. Failures are classified
//! for the dispatcher: connection errors, timeouts and 5xx are retryable;
//! 429 and 503 mean overload; other 4xx are permanent and keep the server's
//! own message; a 200 without `choices[0].message.content` is retryable and
//! quotes the start of the body.

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use base64::Engine as _;
use serde_json::{json, Value};
use tracing::info;

use feeder_actors::inference::ProbeError;
use feeder_actors::window::EngineMetrics;
use feeder_actors::{InferenceClient, InferenceError, InferenceOutput, Job};

mod request;
mod response;
pub mod stream;

pub use request::{build_body, RequestDefaults};
use response::{excerpt, server_message, sleep_answer};
pub use response::{parse_completion, parse_engine_metrics};
use stream::{Gathered, Listener, Read, Relays, SseReader};

/// One OpenAI-compatible server.
#[derive(Clone, Debug)]
pub struct OpenAiClient {
    http: reqwest::Client,
    base_url: String,
    defaults: RequestDefaults,
    timeout: Duration,
    /// What the probes learnt of the server's routes.
    routes: Arc<Routes>,
    /// `/v1/chat/completions`, parsed once (not at every request).
    completions: Option<reqwest::Url>,
    /// Who listens to streamed answers (the API's chat completions).
    relays: Option<Arc<Relays>>,
}

impl OpenAiClient {
    /// A client for the server at `base_url` (`http://host:port`).
    pub fn new(base_url: &str, defaults: RequestDefaults, timeout: Duration, pool: usize) -> Self {
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(pool.max(1))
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(5))
            .build()
            .expect("an HTTP client builds");
        let base_url = base_url.trim_end_matches('/').to_string();
        OpenAiClient {
            http,
            completions: reqwest::Url::parse(&format!("{base_url}/v1/chat/completions")).ok(),
            base_url,
            defaults,
            timeout,
            routes: Arc::default(),
            relays: None,
        }
    }

    /// Streams the answers of jobs that `relays` has a listener for.
    pub fn with_relays(mut self, relays: Arc<Relays>) -> Self {
        self.relays = Some(relays);
        self
    }

    /// A request that ran past the timeout: `what` did not come in time
    /// (`then` follows the time).
    fn too_slow(&self, what: &str, then: &str) -> InferenceError {
        InferenceError::Retryable(format!(
            "{}: {what} within {} s{then}",
            self.defaults.instance,
            self.timeout.as_secs()
        ))
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }
}

#[async_trait]
impl InferenceClient for OpenAiClient {
    async fn infer(&self, job: &Job) -> Result<InferenceOutput, InferenceError> {
        let mut body = build_body(job, &self.defaults).await?;
        // Streamed when someone listens (the API), or when the payload asks
        // for it (the chunks are then only gathered).
        let listener = self
            .relays
            .as_ref()
            .and_then(|r| r.listener(&job.payload_sha256));
        let streamed = listener.is_some() || body.get("stream") == Some(&Value::Bool(true));
        if streamed {
            body["stream"] = Value::Bool(true);
            body["stream_options"] = json!({"include_usage": true});
        }
        let url = || self.url("/v1/chat/completions");
        let start = Instant::now();
        // A base URL that does not parse is reported by reqwest, naming it.
        let post = match &self.completions {
            Some(parsed) => self.http.post(parsed.clone()),
            None => self.http.post(url()),
        };
        let sent = post
            .timeout(self.timeout)
            // Names this send at the server (vLLM takes it as its request id,
            // which must be unique while running): job, attempt, claim.
            .header(
                "X-Request-Id",
                format!(
                    "{}-{}-{}",
                    job.id,
                    job.attempts + 1,
                    job.claim_id.as_deref().unwrap_or("unclaimed")
                ),
            )
            .json(&body)
            .send()
            .await;
        let resp = match sent {
            Ok(r) => r,
            Err(e) if e.is_timeout() => {
                return Err(self.too_slow("no answer", &format!(" ({})", url())))
            }
            Err(e) if e.is_connect() || e.is_request() => {
                return Err(InferenceError::Unavailable(format!(
                    "{}: cannot reach {}: {e}",
                    self.defaults.instance,
                    url()
                )))
            }
            Err(e) => {
                return Err(InferenceError::Retryable(format!(
                    "{}: cannot reach {}: {e}",
                    self.defaults.instance,
                    url()
                )))
            }
        };
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let sse = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|t| t.starts_with("text/event-stream"));
        if status.is_success() && sse {
            return self.read_stream(resp, listener, start).await;
        }
        // Not streamed after all (an error, or a server that ignores
        // `stream`): whoever listens gets the whole answer from the result.
        drop(listener);
        let text = match resp.text().await {
            Ok(t) => t,
            Err(e) if e.is_timeout() => {
                return Err(self.too_slow("the response did not finish", ""))
            }
            Err(e) => {
                return Err(InferenceError::Unavailable(format!(
                    "{}: the connection broke while reading the response: {e}",
                    self.defaults.instance
                )))
            }
        };
        let latency = start.elapsed();
        let code = status.as_u16();
        match code {
            200..=299 => parse_completion(&text, latency),
            429 | 503 => Err(InferenceError::Overloaded {
                message: format!(
                    "HTTP {code} from {}: {}",
                    self.defaults.instance,
                    server_message(&text)
                ),
                retry_after,
            }),
            500..=599 => Err(InferenceError::Retryable(format!(
                "HTTP {code} from {}: {}",
                self.defaults.instance,
                server_message(&text)
            ))),
            _ => Err(InferenceError::Permanent(format!(
                "HTTP {code} from {}: {}",
                self.defaults.instance,
                server_message(&text)
            ))),
        }
    }

    async fn sleep(&self, level: u8) -> Result<(), String> {
        self.sleep_call(&format!("/sleep?level={level}"), None)
            .await
            .map(drop)
    }

    async fn wake_up(&self, tags: Option<&str>) -> Result<(), String> {
        let path = match tags {
            Some(t) => format!("/wake_up?tags={t}"),
            None => "/wake_up".into(),
        };
        self.sleep_call(&path, None).await.map(drop)
    }

    async fn reload_weights(&self) -> Result<(), String> {
        let body = serde_json::json!({"method": "reload_weights"});
        self.sleep_call("/collective_rpc", Some(body))
            .await
            .map(drop)
    }

    async fn is_sleeping(&self) -> Result<bool, String> {
        let url = self.url("/is_sleeping");
        let req = self.http.get(&url).timeout(Duration::from_secs(10));
        let text = sleep_answer(&url, req).await?;
        serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v.get("is_sleeping").and_then(Value::as_bool))
            .ok_or_else(|| format!("{url} answered without `is_sleeping`: {}", excerpt(&text)))
    }

    async fn engine_metrics(&self) -> Result<Option<EngineMetrics>, InferenceError> {
        let url = self.url("/metrics");
        let resp = self
            .http
            .get(&url)
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .map_err(|e| InferenceError::Retryable(format!("{url}: {e}")))?;
        if matches!(resp.status().as_u16(), 404 | 405) {
            return Ok(None);
        }
        if !resp.status().is_success() {
            return Err(InferenceError::Retryable(format!(
                "{url}: HTTP {}",
                resp.status().as_u16()
            )));
        }
        let text = resp
            .text()
            .await
            .map_err(|e| InferenceError::Retryable(format!("{url}: {e}")))?;
        Ok(parse_engine_metrics(&text))
    }

    async fn probe(&self, deep: bool) -> Result<(), ProbeError> {
        let limit = self.timeout.min(Duration::from_secs(10));
        if self.routes.health.absent().is_none() {
            self.probe_route(
                "/health",
                limit,
                &self.routes.health,
                "not a vLLM server, so it is probed through /v1/models and a canary completion instead",
            )
            .await?;
        }
        if self.routes.models.absent().is_none() {
            self.check_models(limit).await?;
        }
        // Without either route a shallow probe would check nothing: every
        // probe of such a server is a canary.
        let blind = self.routes.health.absent().is_some() && self.routes.models.absent().is_some();
        if deep || blind {
            self.canary().await?;
        }
        Ok(())
    }

    fn probe_checks(&self) -> String {
        let mut checks = Vec::new();
        let mut notes = Vec::new();
        match self.routes.health.absent() {
            Some(code) => notes.push(format!("/health answers HTTP {code}")),
            None => checks.push("GET /health".to_string()),
        }
        match self.routes.models.absent() {
            Some(code) => notes.push(format!("/v1/models answers HTTP {code}")),
            None => checks.push(format!(
                "GET /v1/models (must list `{}`)",
                self.defaults.served_model_name
            )),
        }
        if checks.is_empty() {
            checks.push("a canary completion at every probe".into());
        } else {
            checks.push("a canary completion until confirmed".into());
        }
        let mut out = checks.join(", ");
        if !notes.is_empty() {
            out.push_str(&format!(" ({}: not a vLLM server)", notes.join(", ")));
        }
        out
    }
}

/// What the probes have learnt of one route vLLM has (shared by clones):
/// not probed yet, answering there, or answering 404/405 there (another
/// kind of server), with that status.
#[derive(Debug, Default)]
struct Route(AtomicU16);

impl Route {
    // 0 (the default): not probed yet.
    const PRESENT: u16 = 1;

    /// The status that showed the route absent, if it did.
    fn absent(&self) -> Option<u16> {
        let v = self.0.load(Ordering::Relaxed);
        (v > Self::PRESENT).then_some(v)
    }

    fn set_present(&self) {
        self.0.store(Self::PRESENT, Ordering::Relaxed);
    }

    fn set_absent(&self, code: u16) {
        self.0.store(code.max(Self::PRESENT + 1), Ordering::Relaxed);
    }
}

/// What the probes have learnt of the server's routes.
#[derive(Debug, Default)]
struct Routes {
    health: Route,
    models: Route,
}

impl OpenAiClient {
    /// Reads a streamed answer: each chunk forwarded to `listener` as it
    /// comes, and gathered into the completion the job's result keeps.
    async fn read_stream(
        &self,
        mut resp: reqwest::Response,
        mut listener: Option<Listener>,
        start: Instant,
    ) -> Result<InferenceOutput, InferenceError> {
        let mut reader = SseReader::default();
        let mut gathered = Gathered::default();
        let mut done = false;
        let failed = |listener: Option<Listener>, e: InferenceError| {
            let Some(l) = listener else { return e };
            let relayed = l.relayed();
            l.broken(&e.to_string());
            if relayed == 0 {
                return e;
            }
            // The listener holds part of an answer: another attempt would
            // answer nobody.
            InferenceError::Permanent(format!(
                "{e} (after {relayed} streamed chunks had reached the client, so not retried)"
            ))
        };
        while !done {
            let piece = match resp.chunk().await {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(e) if e.is_timeout() => {
                    let e = self.too_slow("the streamed response did not finish", "");
                    return Err(failed(listener, e));
                }
                Err(e) => {
                    let e = InferenceError::Unavailable(format!(
                        "{}: the connection broke while streaming the response: {e}",
                        self.defaults.instance
                    ));
                    return Err(failed(listener, e));
                }
            };
            for data in reader.feed(&piece) {
                if data.trim() == "[DONE]" {
                    done = true;
                    break;
                }
                let read = match gathered.add(&data) {
                    Ok(r) => r,
                    Err(why) => {
                        let e =
                            InferenceError::Retryable(format!("{}: {why}", self.defaults.instance));
                        return Err(failed(listener, e));
                    }
                };
                if let Some(l) = &mut listener {
                    if !l.chunk(&data, read == Read::UsageOnly) {
                        // Dropping the response closes the connection,
                        // which ends the request at the server.
                        return Err(InferenceError::Permanent(format!(
                            "the client streaming this answer went away after {} chunks; its request to {} was ended",
                            l.relayed(),
                            self.defaults.instance
                        )));
                    }
                }
            }
        }
        if !done && reader.finish().is_none_or(|d| d.trim() != "[DONE]") {
            let e = InferenceError::Retryable(format!(
                "{}: the streamed response ended after {} chunks without `data: [DONE]`",
                self.defaults.instance,
                gathered.chunks()
            ));
            return Err(failed(listener, e));
        }
        match parse_completion(&gathered.completion(), start.elapsed()) {
            Ok(out) => {
                if let Some(l) = listener {
                    l.end();
                }
                Ok(out)
            }
            Err(e) => Err(failed(listener, e)),
        }
    }

    /// POSTs one of vLLM's sleep-mode routes; a sleep, or a wake with its
    /// reload from disk, may take minutes.
    async fn sleep_call(&self, path: &str, body: Option<Value>) -> Result<String, String> {
        let url = self.url(path);
        let req = self.http.post(&url).timeout(Duration::from_secs(600));
        let req = match body {
            Some(b) => req.json(&b),
            None => req,
        };
        sleep_answer(&url, req).await
    }

    /// GETs one of vLLM's probe routes: its 2xx response; `None` when it
    /// answers 404 or 405 (the route is remembered as absent, and the log
    /// says so with `absent_note`); otherwise the probe's failure: nothing
    /// listening, loading (503), or broken.
    async fn probe_route(
        &self,
        path: &str,
        limit: Duration,
        route: &Route,
        absent_note: &str,
    ) -> Result<Option<reqwest::Response>, ProbeError> {
        let url = self.url(path);
        let resp = match self.http.get(&url).timeout(limit).send().await {
            Err(e) if e.is_connect() => {
                return Err(ProbeError::NotListening(format!(
                    "nothing listens at {url}"
                )))
            }
            Err(e) => return Err(ProbeError::Broken(format!("{url}: {e}"))),
            Ok(r) => r,
        };
        match resp.status().as_u16() {
            code @ (404 | 405) => {
                route.set_absent(code);
                info!(instance = %self.defaults.instance, "{url} answers HTTP {code}: {absent_note}");
                Ok(None)
            }
            503 => Err(ProbeError::Loading(format!("{url} answers 503"))),
            code if !(200..300).contains(&code) => {
                Err(ProbeError::Broken(format!("{url} answers HTTP {code}")))
            }
            _ => {
                route.set_present();
                Ok(Some(resp))
            }
        }
    }

    /// `/v1/models` lists the served model; a server without the route
    /// (404, 405) is remembered as such and relies on the canary.
    async fn check_models(&self, limit: Duration) -> Result<(), ProbeError> {
        let models = self.url("/v1/models");
        let Some(resp) = self
            .probe_route(
                "/v1/models",
                limit,
                &self.routes.models,
                "the served model cannot be listed, so the canary completion confirms it",
            )
            .await?
        else {
            return Ok(());
        };
        let list: Value = resp
            .json()
            .await
            .map_err(|e| ProbeError::Broken(format!("{models} did not answer JSON: {e}")))?;
        let ids: Vec<&str> = list
            .get("data")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|m| m.get("id").and_then(Value::as_str))
                    .collect()
            })
            .unwrap_or_default();
        if !ids.contains(&self.defaults.served_model_name.as_str()) {
            return Err(ProbeError::Broken(format!(
                "{} serves {:?}, not `{}` (check served_model_name)",
                self.base_url, ids, self.defaults.served_model_name
            )));
        }
        Ok(())
    }
}

impl OpenAiClient {
    /// A one-token completion (with a small image for a vision model):
    /// proof that the server does more than answer `/health`.
    async fn canary(&self) -> Result<(), ProbeError> {
        let mut content = vec![json!({"type": "text", "text": "Reply with one word."})];
        if self.defaults.vision {
            content.push(json!({
                "type": "image_url",
                "image_url": {"url": canary_image()},
            }));
        }
        let body = json!({
            "model": self.defaults.served_model_name,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 1,
            "temperature": 0,
        });
        let url = self.url("/v1/chat/completions");
        let resp = self
            .http
            .post(&url)
            .timeout(self.timeout)
            .json(&body)
            .send()
            .await
            .map_err(|e| {
                if e.is_connect() {
                    ProbeError::NotListening(format!("nothing listens at {url}"))
                } else {
                    ProbeError::Broken(format!("the canary completion failed: {e}"))
                }
            })?;
        let code = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        match code {
            200..=299 => parse_completion(&text, Duration::ZERO)
                .map(|_| ())
                .map_err(|e| ProbeError::Broken(format!("the canary completion: {e}"))),
            503 => Err(ProbeError::Loading(format!(
                "the canary completion got 503: {}",
                server_message(&text)
            ))),
            _ => Err(ProbeError::Broken(format!(
                "the canary completion got HTTP {code}: {}",
                server_message(&text)
            ))),
        }
    }
}

/// A 32×32 white PNG as a data URL (vision models refuse images smaller
/// than their patch size, so not 1×1).
fn canary_image() -> &'static str {
    static URL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    URL.get_or_init(|| {
        let img = image::RgbImage::from_pixel(32, 32, image::Rgb([255, 255, 255]));
        let mut png = std::io::Cursor::new(Vec::new());
        img.write_to(&mut png, image::ImageFormat::Png)
            .expect("a PNG encodes in memory");
        let b64 = base64::engine::general_purpose::STANDARD.encode(png.into_inner());
        format!("data:image/png;base64,{b64}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use feeder_actors::testkit::store_contract::job;
    use feeder_actors::ModelType;
    use feeder_actors::Payload;
    use std::path::Path;

    fn defaults(root: &Path) -> RequestDefaults {
        RequestDefaults {
            instance: "vision".into(),
            served_model_name: "qwen".into(),
            max_tokens: 256,
            temperature: 0.0,
            system_prompt: Some("be exact".into()),
            ocr_prompt: "transcribe".into(),
            payload_roots: vec![root.canonicalize().unwrap()],
            vision: true,
            send_priority: false,
        }
    }

    fn as_job(payload: &str) -> Job {
        let store = feeder_actors::testkit::MemoryStore::new();
        use feeder_actors::BlockingJobStore;
        let mut j = job(ModelType::Vision, "x");
        j.payload = Payload::Inline(payload.into());
        let id = store.submit(j, feeder_actors::Timestamp(0)).unwrap().id;
        store.get(id).unwrap().unwrap()
    }

    #[tokio::test]
    async fn prompt_messages_and_images_become_chat_requests() {
        let dir = tempfile::tempdir().unwrap();
        let d = defaults(dir.path());
        let b = build_body(&as_job(r#"{"prompt": "hi", "max_tokens": 9}"#), &d)
            .await
            .unwrap();
        assert_eq!(b["model"], "qwen");
        assert_eq!(b["max_tokens"], 9);
        assert_eq!(
            b["messages"][0],
            json!({"role": "system", "content": "be exact"})
        );
        assert_eq!(b["messages"][1], json!({"role": "user", "content": "hi"}));
        assert!(b.get("prompt").is_none());

        let m = r#"{"messages": [{"role": "system", "content": "own"}, {"role": "user", "content": "q"}], "top_p": 0.5}"#;
        let b = build_body(&as_job(m), &d).await.unwrap();
        assert_eq!(
            b["messages"].as_array().unwrap().len(),
            2,
            "an own system message is kept alone"
        );
        assert_eq!(b["top_p"], 0.5);

        let img = dir.path().join("p.png");
        std::fs::write(&img, b"\x89PNGdata").unwrap();
        let b = build_body(
            &as_job(&format!(r#"{{"image_path": "{}"}}"#, img.display())),
            &d,
        )
        .await
        .unwrap();
        let url = b["messages"][1]["content"][0]["image_url"]["url"]
            .as_str()
            .unwrap();
        assert!(url.starts_with("data:image/png;base64,"), "{url}");
        assert_eq!(b["messages"][1]["content"][1]["text"], "transcribe");
    }

    #[tokio::test]
    async fn bad_payloads_are_permanent_errors_naming_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let d = defaults(dir.path());
        for (payload, expect) in [
            ("not json", "not valid JSON"),
            ("[1]", "must be a JSON object"),
            ("{}", "has no `messages`"),
            (
                r#"{"image_path": "/etc/passwd.png"}"#,
                "cannot read the image",
            ),
        ] {
            match build_body(&as_job(payload), &d).await {
                Err(InferenceError::Permanent(m)) => assert!(m.contains(expect), "{payload}: {m}"),
                other => panic!("{payload}: {other:?}"),
            }
        }
        let outside = tempfile::tempdir().unwrap();
        let img = outside.path().join("x.png");
        std::fs::write(&img, b"png").unwrap();
        match build_body(
            &as_job(&format!(r#"{{"image_path": "{}"}}"#, img.display())),
            &d,
        )
        .await
        {
            Err(InferenceError::Permanent(m)) => {
                assert!(m.contains("outside queue.payload_roots"), "{m}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_200_without_content_quotes_the_body() {
        match parse_completion(r#"{"choices": []}"#, Duration::ZERO) {
            Err(InferenceError::Retryable(m)) => assert!(m.contains(r#"{"choices": []}"#), "{m}"),
            other => panic!("{other:?}"),
        }
        let ok = parse_completion(
            r#"{"choices":[{"message":{"content":"x"}}],"usage":{"prompt_tokens":3,"completion_tokens":4}}"#,
            Duration::ZERO,
        )
        .unwrap();
        assert_eq!(
            (ok.content.as_str(), ok.prompt_tokens, ok.completion_tokens),
            ("x", Some(3), Some(4))
        );
        // The body is kept as it came, and a result document holding it
        // reads back the same.
        let body = r#"{"id":"c-1","choices":[{"index":0,"message":{"role":"assistant","content":"é\n"},"finish_reason":"stop"}],"usage":{"prompt_tokens":2}}"#;
        let out = parse_completion(body, Duration::ZERO).unwrap();
        assert_eq!(out.response.get(), body);
        let doc = feeder_actors::JobResult {
            id: feeder_actors::JobId([1; 16]),
            model_type: ModelType::Think,
            content: out.content.clone(),
            prompt_tokens: out.prompt_tokens,
            completion_tokens: None,
            latency_ms: None,
            fragments: Vec::new(),
            missing: Vec::new(),
            response: Some(out.response.clone()),
        };
        let bytes = serde_json::to_vec_pretty(&doc).unwrap();
        let back: feeder_actors::JobResult = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(back, doc);
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["response"]["choices"][0]["message"]["content"], "é\n");
        assert!(matches!(
            parse_completion(
                r#"{"choices":[{"message":{"content":"x"}}]} trailing"#,
                Duration::ZERO
            ),
            Err(InferenceError::Retryable(_))
        ));
    }

    #[test]
    fn other_servers_ways_of_answering_are_accepted() {
        let parts = parse_completion(
            r#"{"choices":[{"message":{"content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}}],"usage":{"input_tokens":3,"output_tokens":4.0}}"#,
            Duration::ZERO,
        )
        .unwrap();
        assert_eq!(
            (
                parts.content.as_str(),
                parts.prompt_tokens,
                parts.completion_tokens
            ),
            ("ab", Some(3), Some(4))
        );
        let reasoning = parse_completion(
            r#"{"choices":[{"message":{"content":null,"reasoning_content":"thinking…"},"finish_reason":"length"}],"usage":{"prompt_tokens":"5"}}"#,
            Duration::ZERO,
        )
        .unwrap();
        assert_eq!(reasoning.content, "");
        assert_eq!(reasoning.prompt_tokens, Some(5));
        assert_eq!(reasoning.completion_tokens, None);
        let bare = parse_completion(
            r#"{"choices":[{"message":{"content":"x"}}]}"#,
            Duration::ZERO,
        )
        .unwrap();
        assert_eq!((bare.prompt_tokens, bare.completion_tokens), (None, None));
        assert!(matches!(
            parse_completion(
                r#"{"choices":[{"message":{"content":null}}]}"#,
                Duration::ZERO
            ),
            Err(InferenceError::Retryable(_))
        ));
    }

    #[test]
    fn server_messages_are_extracted() {
        assert_eq!(
            server_message(r#"{"error": {"message": "too long"}}"#),
            "too long"
        );
        assert_eq!(server_message(r#"{"detail": "nope"}"#), "nope");
        assert_eq!(server_message("plain"), "plain");
    }
}
