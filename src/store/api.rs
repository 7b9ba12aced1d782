//! What the OpenAI-compatible API keeps in the queue's database: uploaded
//! files (their content lies in `api.files_dir`), batches, and the job
//! each line of a batch became. A batch's progress is read from its jobs.

use async_trait::async_trait;
use serde_json::Value;

use feeder_actors::{JobId, StoreResult};

/// An uploaded file.
#[derive(Debug, Clone, PartialEq)]
pub struct FileRow {
    /// `file-…`.
    pub id: String,
    /// The name it was uploaded under.
    pub filename: String,
    /// `batch`.
    pub purpose: String,
    /// Its size.
    pub bytes: u64,
    /// Its non-empty lines.
    pub lines: u64,
    /// Unix seconds.
    pub created_at: i64,
    /// The content, under `api.files_dir`.
    pub path: String,
}

/// A batch: its status and its object as the API shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchRow {
    /// `batch_…`.
    pub id: String,
    /// The lifecycle state (`validating`, `in_progress`, …).
    pub status: String,
    /// The file of requests.
    pub input_file_id: String,
    /// Unix seconds.
    pub created_at: i64,
    /// The batch object.
    pub doc: Value,
}

/// One line of a batch and its job.
#[derive(Debug, Clone, PartialEq)]
pub struct LineJob {
    /// 1-based line number in the input file.
    pub line: u64,
    /// The caller's id for the request.
    pub custom_id: String,
    /// The job it became.
    pub job_id: JobId,
}

/// A batch's jobs by status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LineCounts {
    /// All lines.
    pub total: u64,
    /// Done.
    pub done: u64,
    /// Failed.
    pub failed: u64,
    /// Cancelled.
    pub cancelled: u64,
}

impl LineCounts {
    /// Every job has ended.
    pub fn all_ended(&self) -> bool {
        self.done + self.failed + self.cancelled >= self.total
    }
}

/// What deleting a file did.
#[derive(Debug, Clone, PartialEq)]
pub enum Deleted {
    /// Gone; its content is at this path.
    Gone(FileRow),
    /// No such file.
    Missing,
    /// A batch that has not ended reads it.
    InUse(String),
}

/// Held while one daemon queues, advances or finalizes a batch; dropping
/// it lets another daemon sharing the queue take the batch.
pub struct BatchLock(#[allow(dead_code)] Box<dyn Send + Sync>);

impl BatchLock {
    /// A lock released when `guard` is dropped.
    pub fn new(guard: impl Send + Sync + 'static) -> Self {
        BatchLock(Box::new(guard))
    }
}

/// The API's tables in the queue's database.
#[async_trait]
pub trait ApiStore: Send + Sync + 'static {
    /// Records an uploaded file.
    async fn put_file(&self, file: FileRow) -> StoreResult<()>;
    /// One file.
    async fn file(&self, id: &str) -> StoreResult<Option<FileRow>>;
    /// Up to `limit` files, newest first, after the file `after` if given.
    async fn files(
        &self,
        after: Option<String>,
        limit: usize,
        purpose: Option<String>,
    ) -> StoreResult<Vec<FileRow>>;
    /// Deletes a file unless a batch that has not ended reads it.
    async fn delete_file(&self, id: &str) -> StoreResult<Deleted>;
    /// Records a new batch.
    async fn insert_batch(&self, batch: BatchRow) -> StoreResult<()>;
    /// Replaces a batch whose status is still `from`; `false` if it is not
    /// (another daemon moved it on).
    async fn update_batch(&self, from: &str, batch: BatchRow) -> StoreResult<bool>;
    /// One batch.
    async fn batch(&self, id: &str) -> StoreResult<Option<BatchRow>>;
    /// Up to `limit` batches, newest first, after the batch `after` if given.
    async fn batches(&self, after: Option<String>, limit: usize) -> StoreResult<Vec<BatchRow>>;
    /// The batches in one of `statuses`, oldest first.
    async fn batches_in(&self, statuses: &[&str]) -> StoreResult<Vec<BatchRow>>;
    /// Records the jobs of a batch's lines (lines already recorded are kept).
    async fn add_lines(&self, batch_id: &str, lines: Vec<LineJob>) -> StoreResult<()>;
    /// A batch's jobs by status.
    async fn line_counts(&self, batch_id: &str) -> StoreResult<LineCounts>;
    /// A batch's lines, in order.
    async fn lines(&self, batch_id: &str) -> StoreResult<Vec<LineJob>>;
    /// The jobs of a batch not yet ended.
    async fn unfinished_jobs(&self, batch_id: &str) -> StoreResult<Vec<JobId>>;
    /// The batch for this daemon alone until the lock is dropped; `None`
    /// while another daemon holds it.
    async fn lock_batch(&self, batch_id: &str) -> StoreResult<Option<BatchLock>>;
}
