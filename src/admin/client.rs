//! `AdminClient`: the running daemon's admin endpoint seen from another
//! process (`gpu-feeder instances`, `strategy`, the MCP tools). Every error
//! says plainly when no daemon answers.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use feeder_actors::allocator::Strategy;

use crate::config::Config;

/// How long one call may take.
const TIMEOUT: Duration = Duration::from_secs(20);

/// A client of one daemon's admin endpoint.
#[derive(Clone, Debug)]
pub struct AdminClient {
    /// `http://HOST:PORT`, from `admin.listen`.
    base: String,
    /// The bearer token (`admin.token`); empty sends none.
    token: String,
    /// The configuration file that named the endpoint, for the error that
    /// says nothing answers there.
    config_path: PathBuf,
}

impl AdminClient {
    /// The client of the endpoint that `config` (read from `config_path`)
    /// names.
    pub fn new(config: &Config, config_path: &Path) -> Self {
        AdminClient {
            base: format!("http://{}", config.admin.listen),
            token: config.admin.token.clone(),
            config_path: config_path.to_path_buf(),
        }
    }

    /// `GET /v1/status`: instances, allocator, GPUs and queue.
    pub async fn status(&self) -> Result<Value, String> {
        self.call("/v1/status", None).await
    }

    /// `POST /v1/strategy`: pins `strategy`, or releases the pin with
    /// `None`; the allocator's answer.
    pub async fn pin(&self, strategy: Option<Strategy>) -> Result<Value, String> {
        let body = json!({"pin": strategy.map(|s| s.as_str())});
        self.call("/v1/strategy", Some(body)).await
    }

    /// `POST /v1/instances/NAME/restart`.
    pub async fn restart(&self, instance: &str) -> Result<Value, String> {
        let path = format!("/v1/instances/{instance}/restart");
        self.call(&path, Some(json!({}))).await
    }

    /// GET `path`, or POST `body` to it.
    async fn call(&self, path: &str, body: Option<Value>) -> Result<Value, String> {
        let url = format!("{}{path}", self.base);
        let client = reqwest::Client::new();
        let mut req = match body {
            Some(b) => client.post(&url).json(&b),
            None => client.get(&url),
        }
        .timeout(TIMEOUT);
        if !self.token.is_empty() {
            req = req.bearer_auth(&self.token);
        }
        let resp = req.send().await.map_err(|e| {
            if e.is_connect() {
                format!(
                    "the daemon is not running: nothing answers at {url} (admin.listen in {}); start it with `gpu-feeder run`",
                    self.config_path.display()
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
}
