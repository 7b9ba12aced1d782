//! The `ResultStore` port: where result documents are kept.
//!
//! A result is written completely or not at all (the file adapter writes a
//! temporary file and renames it), before the job is marked `done`; so a
//! `done` job always has a whole result, and a crash between the two leaves
//! a job that is simply run again.
//!
//! A job records where its result is as a [`ResultRef`]: a file path for
//! the file store, `db:<id>` for a row of `gpu_results` in the job
//! database (the database store, which every host sharing a PostgreSQL
//! queue can read). Readers never build a path themselves; they hand the
//! reference to a [`ResultStore`].

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::fragment::Tile;
pub use crate::job::ResultRef;
use crate::job::{JobId, ModelType};

/// The document written for a finished job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobResult {
    /// The job.
    pub id: JobId,
    /// Its model.
    pub model_type: ModelType,
    /// The answer's text.
    pub content: String,
    /// Prompt tokens reported by the server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens: Option<u64>,
    /// Completion tokens reported by the server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_tokens: Option<u64>,
    /// Request latency in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<u64>,
    /// For a parent: its fragments' results, in fragment order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fragments: Vec<FragmentResult>,
    /// For a parent done with some fragments failed (`chunk.min_success_ratio`
    /// below 1): the fragments missing from the merged text.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing: Vec<MissingFragment>,
    /// The server's whole response (absent for a parent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<crate::inference::RawResponse>,
}

/// One fragment inside a parent's merged result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FragmentResult {
    /// Position among the parent's fragments.
    pub index: u32,
    /// The fragment job.
    pub id: JobId,
    /// Where its result is.
    pub result_path: ResultRef,
    /// Its answer's text.
    pub content: String,
    /// For a text window: its tokens, `[start, end)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<[u64; 2]>,
    /// For an image tile: its place (`row`, `col`, `x`, `y`, `width`, `height`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tile: Option<Tile>,
}

/// A fragment that did not succeed, in a parent's result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MissingFragment {
    /// Position among the parent's fragments.
    pub index: u32,
    /// The fragment job.
    pub id: JobId,
    /// Why it failed.
    pub error: String,
}

/// Keeps result documents.
#[async_trait]
pub trait ResultStore: Send + Sync + 'static {
    /// Writes `doc` as the result of job `id`, atomically; returns where.
    async fn write(&self, id: JobId, doc: Vec<u8>) -> std::io::Result<ResultRef>;

    /// Reads a result written by `write` (by this store or any other kind:
    /// a reader is handed whatever reference the job carries).
    async fn read(&self, at: &ResultRef) -> std::io::Result<Vec<u8>>;
}
