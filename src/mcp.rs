//! `gpu-feeder mcp`: an MCP server over stdio, so that agents can submit and
//! inspect jobs. Job tools work whether or not the daemon runs (they use the
//! store); `instances` asks the running daemon's admin endpoint. stdout
//! carries only the protocol; logs go to stderr.

use std::path::PathBuf;
use std::sync::Arc;

use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{CallToolResult, Implementation, ServerCapabilities, ServerConfig};
use rmcp::{tool, tool_handler, tool_router, ServerHandler, ServiceExt};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use feeder_actors::{JobStatus, JobStore, ListFilter, ModelType, Timestamp};

use crate::admin::AdminClient;
use crate::config::Config;
use crate::submit::{Built, Input, SubmitRequest};
use crate::views::{job_json, stats_json};

/// `submit_job` arguments.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct SubmitJob {
    /// The model: "vision" (images, OCR) or "think" (text).
    pub model: String,
    /// A prompt, sent as a user message.
    pub prompt: Option<String>,
    /// OpenAI chat `messages`, passed through as they are.
    pub messages: Option<Vec<Value>>,
    /// An image file to transcribe (vision); must lie under queue.payload_roots. Large images are tiled.
    pub image_path: Option<String>,
    /// A JSON payload file; must lie under queue.payload_roots.
    pub payload_path: Option<String>,
    /// A text file, sent as a prompt; with `chunk`, split into token windows.
    pub text_file: Option<String>,
    /// With `text_file`: split into chunk.tokens-token windows (needs the model's tokenizer).
    #[serde(default)]
    pub chunk: bool,
    /// Higher runs first (default 0).
    #[serde(default)]
    pub priority: i64,
    /// When done, create a follow-up job for this model from the result
    /// (default: the next stage its model's instance names).
    pub then: Option<String>,
}

/// `set_strategy` arguments.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct SetStrategy {
    /// The strategy to hold (static, shared, think, vision or idle), or
    /// null to release the pin so the backlog decides again.
    pub pin: Option<String>,
}

/// A job id.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct JobRef {
    /// The job id (32 hex digits) or a unique prefix of at least 4.
    pub id: String,
}

/// `list_jobs` arguments.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct ListJobs {
    /// Only jobs in this status: pending, processing, done, failed, cancelled.
    pub status: Option<String>,
    /// Only jobs for this model: vision or think.
    pub model: Option<String>,
    /// At most this many, newest first (default 20).
    pub limit: Option<usize>,
}

/// The MCP server.
#[derive(Clone)]
pub struct FeederMcp {
    store: Arc<dyn JobStore>,
    results: Arc<crate::results::Results>,
    config: Arc<Config>,
    admin: AdminClient,
}

fn model(s: &str) -> Result<ModelType, String> {
    s.parse::<ModelType>().map_err(|e| e.to_string())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| format!("internal error: {e}"))?
}

#[tool_router]
impl FeederMcp {
    /// A server on the configured store.
    pub fn new(queue: crate::store::Opened, config: Config, config_path: PathBuf) -> Self {
        FeederMcp {
            store: queue.jobs,
            results: queue.results,
            admin: AdminClient::new(&config, &config_path),
            config: Arc::new(config),
        }
    }

    #[tool(
        description = "Queue a job for a model: give `model` and one of `prompt`, `messages`, `image_path`, `payload_path` or `text_file` (with `chunk` to split a long text). Returns the job id; an identical job already queued is returned instead of a duplicate."
    )]
    async fn submit_job(
        &self,
        Parameters(a): Parameters<SubmitJob>,
    ) -> Result<CallToolResult, String> {
        let inputs = [
            a.prompt.is_some(),
            a.messages.is_some(),
            a.image_path.is_some(),
            a.payload_path.is_some(),
            a.text_file.is_some(),
        ];
        if inputs.iter().filter(|x| **x).count() != 1 {
            return Err("give exactly one of `prompt`, `messages`, `image_path`, `payload_path`, `text_file`".into());
        }
        let input = if let Some(p) = a.payload_path {
            Input::PayloadFile(p.into())
        } else if let Some(i) = a.image_path {
            Input::Image(i.into())
        } else if let Some(f) = a.text_file {
            Input::TextFile {
                path: f.into(),
                chunk: a.chunk,
            }
        } else {
            let mut payload = Map::new();
            if let Some(p) = a.prompt {
                payload.insert("prompt".into(), Value::String(p));
            }
            if let Some(msgs) = a.messages {
                payload.insert("messages".into(), Value::Array(msgs));
            }
            Input::Inline(payload)
        };
        let request = SubmitRequest {
            model: model(&a.model)?,
            input,
            priority: a.priority,
            max_attempts: None,
            then: a.then.as_deref().map(model).transpose()?,
        };
        // Reading, tiling and chunking files is blocking work.
        let config = self.config.clone();
        let submission =
            match blocking(move || request.build(&config).map_err(|e| e.to_string())).await? {
                Built::One(s) => s,
                Built::Many(_) => unreachable!("no JSONL through MCP"),
            };
        let (s, fragments) = submission
            .store(self.store.as_ref(), Timestamp::now())
            .await
            .map_err(|e| e.to_string())?;
        Ok(CallToolResult::structured(json!({
            "id": s.id, "created": s.created, "status": s.status, "fragments": fragments,
        })))
    }

    #[tool(
        description = "One job: its status, attempts, error, and, once it is done, its result text."
    )]
    async fn get_job(&self, Parameters(a): Parameters<JobRef>) -> Result<CallToolResult, String> {
        let store = &self.store;
        let id = store.resolve(&a.id).await.map_err(|e| e.to_string())?;
        let job = store
            .get(id)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("no job {id}"))?;
        let mut v = job_json(&job);
        if let Some(at) = &job.result_path {
            let doc = self
                .results
                .document(at)
                .await
                .map_err(|e| format!("job {id} is done but its result cannot be read: {e}"))?;
            v["result"] = doc.get("content").cloned().unwrap_or(Value::Null);
        }
        Ok(CallToolResult::structured(v))
    }

    #[tool(description = "Jobs, newest first, optionally filtered by status and model.")]
    async fn list_jobs(
        &self,
        Parameters(a): Parameters<ListJobs>,
    ) -> Result<CallToolResult, String> {
        let status = a
            .status
            .as_deref()
            .map(|s| s.parse::<JobStatus>().map_err(|e| e.to_string()))
            .transpose()?;
        let model_type = a.model.as_deref().map(model).transpose()?;
        let filter = ListFilter {
            status,
            model_type,
            parent_id: None,
            lease_ended_before: None,
            limit: a.limit.unwrap_or(20).min(1000),
        };
        let jobs = self.store.list(&filter).await.map_err(|e| e.to_string())?;
        let jobs: Vec<Value> = jobs.iter().map(job_json).collect();
        Ok(CallToolResult::structured(json!({ "jobs": jobs })))
    }

    #[tool(
        description = "Cancel a pending or processing job (a parent's unfinished fragments too)."
    )]
    async fn cancel_job(
        &self,
        Parameters(a): Parameters<JobRef>,
    ) -> Result<CallToolResult, String> {
        let id = self.store.resolve(&a.id).await.map_err(|e| e.to_string())?;
        let job = self
            .store
            .cancel(id, Timestamp::now())
            .await
            .map_err(|e| e.to_string())?;
        Ok(CallToolResult::structured(job_json(&job)))
    }

    #[tool(description = "Put a failed or cancelled job back in the queue with fresh attempts.")]
    async fn retry_job(&self, Parameters(a): Parameters<JobRef>) -> Result<CallToolResult, String> {
        let id = self.store.resolve(&a.id).await.map_err(|e| e.to_string())?;
        let job = self
            .store
            .retry(id, Timestamp::now())
            .await
            .map_err(|e| e.to_string())?;
        Ok(CallToolResult::structured(job_json(&job)))
    }

    #[tool(
        description = "Job counts per model and status, and the oldest pending job's age in seconds."
    )]
    async fn queue_stats(&self) -> Result<CallToolResult, String> {
        let stats = self
            .store
            .stats(Timestamp::now())
            .await
            .map_err(|e| e.to_string())?;
        Ok(CallToolResult::structured(stats_json(&stats)))
    }

    #[tool(description = "Live instance state from the running daemon (its admin endpoint).")]
    async fn instances(&self) -> Result<CallToolResult, String> {
        let body = self.admin.status().await?;
        Ok(CallToolResult::structured(body))
    }

    #[tool(
        description = "The GPUs as the running daemon reads them every second (temperature, utilization, memory, power, clocks, throttling, alerts), and the allocator's strategy."
    )]
    async fn gpu_status(&self) -> Result<CallToolResult, String> {
        let body = self.admin.status().await?;
        Ok(CallToolResult::structured(serde_json::json!({
            "gpus": body["gpus"],
            "gpu_unavailable": body["gpu_unavailable"],
            "gpu_alerts": body["gpu_alerts"],
            "strategy": body["strategy"],
            "allocator": body["allocator"],
        })))
    }

    #[tool(
        description = "Pin the allocator's strategy (static, shared, think, vision, idle) until released with pin = null. A switch drains the instances it stops; no job is lost."
    )]
    async fn set_strategy(
        &self,
        Parameters(a): Parameters<SetStrategy>,
    ) -> Result<CallToolResult, String> {
        let pin = match a.pin.as_deref() {
            Some(s) => Some(feeder_actors::allocator::Strategy::parse(s)?),
            None => None,
        };
        let body = self.admin.pin(pin).await?;
        Ok(CallToolResult::structured(body))
    }
}

#[tool_handler]
impl ServerHandler for FeederMcp {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("gpu-feeder", env!("CARGO_PKG_VERSION")))
            .with_instructions(
                "gpu-feeder queues inference jobs for vision (OCR) and think (text) models. \
                 Submit with submit_job, follow with get_job until status is done, read `result`.",
            )
    }
}

/// What to do with one line read from the client.
#[derive(Debug, PartialEq)]
enum Line {
    /// A JSON-RPC message: hand it to the server.
    Message(String),
    /// Nothing to do (a blank line).
    Skip,
    /// Answer this JSON-RPC error at once; the server never sees the line.
    Error(Value),
}

/// Checks a line before the MCP server sees it: a line that is not JSON
/// gets a parse error (-32700), JSON that is not a JSON-RPC message gets an
/// invalid-request error (-32600), and the session goes on either way.
fn screen(line: &str) -> Line {
    let line = line.trim();
    if line.is_empty() {
        return Line::Skip;
    }
    let error = |id: Value, code: i64, message: String| {
        Line::Error(
            json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}}),
        )
    };
    let value: Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => {
            return error(
                Value::Null,
                -32700,
                format!("Parse error: the line is not JSON ({e})"),
            )
        }
    };
    let Some(obj) = value.as_object() else {
        return error(
            Value::Null,
            -32600,
            "Invalid Request: a JSON-RPC message is a JSON object (batches are not supported)"
                .into(),
        );
    };
    let id = obj.get("id").cloned().unwrap_or(Value::Null);
    if obj.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return error(
            id,
            -32600,
            "Invalid Request: \"jsonrpc\" must be \"2.0\"".into(),
        );
    }
    let has_method = obj.get("method").is_some_and(Value::is_string);
    let is_response = obj.contains_key("result") || obj.contains_key("error");
    if !has_method && !is_response {
        return error(
            id,
            -32600,
            "Invalid Request: a request needs a string \"method\"".into(),
        );
    }
    Line::Message(line.to_string())
}

/// `gpu-feeder mcp`: serves until stdin closes.
///
/// Lines from stdin are screened (see `screen`) before the server reads
/// them; the server's output and the screen's errors reach stdout through
/// one writer, one whole line at a time.
pub async fn serve(
    store: crate::store::Opened,
    config: Config,
    config_path: PathBuf,
) -> anyhow::Result<()> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    let (mut to_server, server_in) = tokio::io::duplex(1 << 16);
    let (server_out, from_server) = tokio::io::duplex(1 << 16);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();

    let errors = tx.clone();
    let reader = tokio::spawn(async move {
        let mut lines = BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            match screen(&line) {
                Line::Message(m) => {
                    if to_server
                        .write_all(format!("{m}\n").as_bytes())
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
                Line::Skip => {}
                Line::Error(e) => {
                    tracing::warn!(
                        "answered a malformed line with a JSON-RPC error: {}",
                        e["error"]["message"]
                    );
                    let _ = errors.send(e.to_string());
                }
            }
        }
        // Dropping `to_server` ends the server's input.
    });
    let relay = tokio::spawn(async move {
        let mut lines = BufReader::new(from_server).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let writer = tokio::spawn(async move {
        let mut stdout = tokio::io::stdout();
        while let Some(line) = rx.recv().await {
            if stdout
                .write_all(format!("{line}\n").as_bytes())
                .await
                .is_err()
                || stdout.flush().await.is_err()
            {
                break;
            }
        }
    });

    let (srv_read, _) = tokio::io::split(server_in);
    let (_, srv_write) = tokio::io::split(server_out);
    let service = FeederMcp::new(store, config, config_path)
        .serve((srv_read, srv_write))
        .await
        .map_err(|e| anyhow::anyhow!("starting the MCP server: {e}"))?;
    service.waiting().await?;
    reader.abort();
    let _ = relay.await;
    let _ = writer.await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_screened_before_the_server_sees_them() {
        assert_eq!(screen("  "), Line::Skip);
        let ok = r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#;
        assert_eq!(screen(ok), Line::Message(ok.into()));
        let code = |l: &str| match screen(l) {
            Line::Error(e) => (e["id"].clone(), e["error"]["code"].as_i64().unwrap()),
            other => panic!("{other:?}"),
        };
        assert_eq!(code("not json"), (Value::Null, -32700));
        assert_eq!(code("[1, 2]"), (Value::Null, -32600));
        assert_eq!(code(r#"{"id": 3, "method": "x"}"#), (json!(3), -32600));
        assert_eq!(code(r#"{"jsonrpc": "2.0", "id": 4}"#), (json!(4), -32600));
    }
}
