//! `[api]`: the OpenAI-compatible HTTP API (Files and Batches).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// `[api]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Address of the OpenAI-compatible API; off when unset. Apart from
    /// `admin.listen`, so that it can face clients while the admin endpoint
    /// stays on loopback.
    pub listen: Option<String>,
    /// API keys accepted as `Authorization: Bearer <key>`.
    pub keys: Vec<String>,
    /// A file of API keys, one a line (`#` starts a comment), read at start.
    pub keys_file: Option<PathBuf>,
    /// Where uploaded files are kept; `<queue.results_dir>/files` when unset.
    pub files_dir: Option<PathBuf>,
    /// The priority of a batch's jobs: below interactive traffic (0, the
    /// default of `submit` and `POST /v1/jobs`).
    pub batch_priority: i64,
    /// The priority of a `POST /v1/chat/completions` request: above the
    /// bulk (0) and batches, so that it overtakes them.
    pub chat_priority: i64,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: None,
            keys: Vec::new(),
            keys_file: None,
            files_dir: None,
            batch_priority: -10,
            chat_priority: 10,
        }
    }
}

/// The most bytes an uploaded file may have (as OpenAI's batch input).
pub const MAX_FILE_BYTES: u64 = 200 * 1024 * 1024;
/// The most lines (requests) an uploaded batch file may have.
pub const MAX_FILE_LINES: u64 = 50_000;

impl ApiConfig {
    /// Every key: `keys`, then those of `keys_file`.
    pub fn all_keys(&self) -> std::io::Result<Vec<String>> {
        let mut keys: Vec<String> = self
            .keys
            .iter()
            .filter(|k| !k.is_empty())
            .cloned()
            .collect();
        if let Some(path) = &self.keys_file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("reading api.keys_file {}: {e}", path.display()),
                )
            })?;
            keys.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(String::from),
            );
        }
        Ok(keys)
    }

    /// The folder of uploaded files.
    pub fn files_dir(&self, results_dir: &Path) -> PathBuf {
        self.files_dir
            .clone()
            .unwrap_or_else(|| results_dir.join("files"))
    }

    /// What is wrong with the section, if anything: an address that is not
    /// one, or one that is not loopback while no key is set.
    pub(crate) fn problem(&self) -> Option<(&'static str, String)> {
        if self.chat_priority <= self.batch_priority {
            return Some((
                "chat_priority",
                format!(
                    "{} is not above api.batch_priority ({}): a chat completion would wait behind batches. Raise api.chat_priority (default 10) or lower api.batch_priority (default -10)",
                    self.chat_priority, self.batch_priority
                ),
            ));
        }
        let listen = self.listen.as_ref()?;
        let addr = match listen.parse::<SocketAddr>() {
            Ok(a) => a,
            Err(_) => {
                return Some((
                    "listen",
                    format!("`{listen}` is not an address: write IP:PORT, e.g. \"127.0.0.1:8000\""),
                ))
            }
        };
        let has_keys = self.keys.iter().any(|k| !k.is_empty()) || self.keys_file.is_some();
        if !addr.ip().is_loopback() && !has_keys {
            return Some((
                "listen",
                format!("`{listen}` is not a loopback address and no API key is set: anyone who reaches it could run and read batches. Set api.keys = [\"...\"] or api.keys_file, or listen on 127.0.0.1"),
            ));
        }
        None
    }
}
