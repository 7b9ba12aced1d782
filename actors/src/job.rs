//! Domain types of the job queue: what a job is, what state it is in, and
//! the values that move between the queue and its callers.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::fragment::Place;
use crate::time::Timestamp;

/// A job's identity: 16 random bytes, shown as 32 lowercase hex digits.
///
/// The plan's minimal `INSERT` uses `randomblob(16)`, so the store holds ids
/// as 16-byte blobs and other programs create them the same way.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId(pub [u8; 16]);

impl JobId {
    /// A fresh random id.
    pub fn random() -> Self {
        JobId(rand::random())
    }

    /// The id from its 16 bytes; `None` when the slice has another length.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(JobId)
    }

    /// The 32 hex digits.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JobId({})", self.to_hex())
    }
}

/// A string that is not a job id.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "`{0}` is not a job id: expected 32 hex digits (as printed by `gpu-feeder submit` or `list`)"
)]
pub struct BadJobId(pub String);

impl FromStr for JobId {
    type Err = BadJobId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = hex::decode(s.trim()).map_err(|_| BadJobId(s.to_string()))?;
        JobId::from_slice(&bytes).ok_or_else(|| BadJobId(s.to_string()))
    }
}

impl Serialize for JobId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for JobId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The kind of model a job is for. Each configured instance serves one kind;
/// its name is stored in `gpu_jobs.model_type` and used in config and CLI.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelType {
    /// A vision-language model (OCR of page images).
    Vision,
    /// A reasoning model (structuring and answering over text).
    Think,
}

named!(ModelType { Vision = "vision", Think = "think" });

/// A string that names no model type.
#[derive(Debug, Clone, thiserror::Error)]
#[error("unknown model type `{0}`: expected `vision` or `think`")]
pub struct BadModelType(pub String);

impl FromStr for ModelType {
    type Err = BadModelType;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ModelType::from_name(s).ok_or_else(|| BadModelType(s.to_string()))
    }
}

/// Where a job is in its life: `pending → processing → done | failed | cancelled`
/// (the names stored in `gpu_jobs.status`, listed in lifecycle order).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    /// Waiting to be claimed (possibly not before its `run_at`).
    Pending,
    /// Claimed by a dispatcher under a lease; or, for a parent, waiting on its fragments.
    Processing,
    /// Finished; the result is at `result_path`.
    Done,
    /// Finished without a result; `error` says why.
    Failed,
    /// Withdrawn by a user before it finished.
    Cancelled,
}

named!(JobStatus {
    Pending = "pending", Processing = "processing", Done = "done", Failed = "failed",
    Cancelled = "cancelled",
});

impl JobStatus {
    /// Whether the job has reached an end state.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobStatus::Done | JobStatus::Failed | JobStatus::Cancelled
        )
    }
}

/// A string that names no job status.
#[derive(Debug, Clone, thiserror::Error)]
#[error("unknown job status `{0}`: expected one of pending, processing, done, failed, cancelled")]
pub struct BadJobStatus(pub String);

impl FromStr for JobStatus {
    type Err = BadJobStatus;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobStatus::from_name(s).ok_or_else(|| BadJobStatus(s.to_string()))
    }
}

/// What a job asks the model to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Payload {
    /// A JSON file that the dispatcher reads when it sends the job.
    File(PathBuf),
    /// A JSON document held in the row itself (jobs submitted without a file).
    Inline(String),
}

/// A job to be submitted.
#[derive(Clone, Debug, PartialEq)]
pub struct NewJob {
    /// Which kind of model runs it.
    pub model_type: ModelType,
    /// The request, by file or inline.
    pub payload: Payload,
    /// SHA-256 (hex) of the payload content; the idempotence key together
    /// with `model_type` (for jobs that are neither fragments nor follow-ups).
    pub payload_sha256: String,
    /// Higher runs first; ties go to the oldest.
    pub priority: i64,
    /// Attempts before the job fails for good; `None` takes the store's default (3).
    pub max_attempts: Option<u32>,
    /// The model of the follow-up job created when this one is done, if any.
    pub then_model: Option<ModelType>,
    /// The job this one was created from (a next-stage job).
    pub follows: Option<JobId>,
    /// For a fragment: where it sits in its parent (a text window's tokens,
    /// an image tile), so that fan-in can merge the answers.
    pub place: Option<Place>,
    /// Jobs with the same key share a prompt prefix and are claimed
    /// together (see [`crate::prefix`]). `NewJob::new` derives it from an
    /// inline payload; a fragment takes its parent's id in the store.
    pub prefix_key: Option<String>,
}

impl NewJob {
    /// A job with default priority and attempts, and the prefix key of its
    /// payload when it is inline JSON.
    pub fn new(model_type: ModelType, payload: Payload, payload_sha256: impl Into<String>) -> Self {
        let prefix_key = match &payload {
            Payload::Inline(text) => serde_json::from_str(text)
                .ok()
                .and_then(|v| crate::prefix::prefix_key(&v)),
            Payload::File(_) => None,
        };
        NewJob {
            model_type,
            payload,
            payload_sha256: payload_sha256.into(),
            priority: 0,
            max_attempts: None,
            then_model: None,
            follows: None,
            place: None,
            prefix_key,
        }
    }
}

/// What `submit` did.
#[derive(Clone, Debug, PartialEq)]
pub struct Submitted {
    /// The job's id: new, or that of the existing identical job.
    pub id: JobId,
    /// `false` when an identical job (same model and payload hash) already existed.
    pub created: bool,
    /// The job's status now (an existing job may be anywhere in its life).
    pub status: JobStatus,
}

/// A job as stored.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Job {
    /// Identity.
    pub id: JobId,
    /// Lifecycle state.
    pub status: JobStatus,
    /// Which kind of model runs it.
    pub model_type: ModelType,
    /// Higher runs first.
    pub priority: i64,
    /// Attempts made so far that ended (in success or failure).
    pub attempts: u32,
    /// Attempts allowed before the job fails for good.
    pub max_attempts: u32,
    /// Crashes of its server while it was in flight (a poison job crashes
    /// its server every time; see `Settle::Crashed`).
    pub crashes: u32,
    /// SHA-256 of the payload.
    pub payload_sha256: String,
    /// The payload file, when the payload is a file.
    pub payload_path: Option<PathBuf>,
    /// The inline payload, when there is no file.
    pub payload_inline: Option<String>,
    /// The result file of a finished job.
    pub result_path: Option<ResultRef>,
    /// Why the job failed (or why its last attempt did).
    pub error: Option<String>,
    /// Parent job, for a fragment.
    pub parent_id: Option<JobId>,
    /// Position among the parent's fragments.
    pub fragment_index: Option<u32>,
    /// Fragment count: on a fragment, and on a parent.
    pub total_fragments: Option<u32>,
    /// For a fragment: where it sits in its parent.
    pub place: Option<Place>,
    /// Jobs with the same key share a prompt prefix (see [`crate::prefix`]).
    pub prefix_key: Option<String>,
    /// The job this next-stage job was created from.
    pub follows: Option<JobId>,
    /// Model of the follow-up job to create when this one is done.
    pub then_model: Option<ModelType>,
    /// Prompt tokens reported by the server.
    pub prompt_tokens: Option<u64>,
    /// Completion tokens reported by the server.
    pub completion_tokens: Option<u64>,
    /// Request latency of the successful attempt.
    pub latency_ms: Option<u64>,
    /// When it was submitted (unix seconds).
    pub created_at: Timestamp,
    /// Not claimable before this time (retry backoff).
    pub run_at: Option<Timestamp>,
    /// When the current claim expires.
    pub lease_until: Option<Timestamp>,
    /// The current claim's token.
    pub claim_id: Option<String>,
    /// Who holds the current claim (a daemon's owner id).
    pub claimed_by: Option<String>,
    /// When the last attempt started.
    pub started_at: Option<Timestamp>,
    /// When it reached an end state.
    pub finished_at: Option<Timestamp>,
}

impl Job {
    /// The payload, by file or inline.
    pub fn payload(&self) -> Option<Payload> {
        match (&self.payload_path, &self.payload_inline) {
            (_, Some(inline)) => Some(Payload::Inline(inline.clone())),
            (Some(path), None) => Some(Payload::File(path.clone())),
            (None, None) => None,
        }
    }

    /// Whether this job is a parent that completes by fan-in.
    pub fn is_parent(&self) -> bool {
        self.parent_id.is_none() && self.total_fragments.is_some()
    }
}

/// The token that proves a caller holds a job's current claim.
///
/// Completion, failure and release are guarded by it: once a claim has been
/// reclaimed or cancelled, its holder can no longer change the job.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Claim {
    /// The claimed job.
    pub job_id: JobId,
    /// Random token set by the claim.
    pub claim_id: String,
}

/// A claimed job and its claim.
#[derive(Clone, Debug, PartialEq)]
pub struct ClaimedJob {
    /// The job as it was when claimed (status `processing`).
    pub job: Job,
    /// The claim guarding its completion.
    pub claim: Claim,
}

/// A successful attempt.
#[derive(Clone, Debug, PartialEq)]
pub struct Completion {
    /// Where the result is, already written.
    pub result_path: ResultRef,
    /// Prompt tokens, when the server reported usage.
    pub prompt_tokens: Option<u64>,
    /// Completion tokens, when the server reported usage.
    pub completion_tokens: Option<u64>,
    /// How long the request took.
    pub latency: Duration,
}

/// A failed attempt.
#[derive(Clone, Debug, PartialEq)]
pub struct Failure {
    /// What went wrong, with the server's own words where there are some.
    pub message: String,
    /// `Some(delay)`: retryable, not before `delay` from now (if attempts remain);
    /// `None`: permanent, the job fails at once.
    pub retry_after: Option<Duration>,
}

/// What a failure did to the job.
#[derive(Clone, Debug, PartialEq)]
pub enum FailOutcome {
    /// Back to `pending`, claimable from `run_at`.
    Retrying {
        /// Earliest next claim.
        run_at: Timestamp,
        /// Attempts made so far.
        attempts: u32,
    },
    /// `failed` for good.
    Failed {
        /// Attempts made.
        attempts: u32,
    },
}

/// Filters for `list`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ListFilter {
    /// Only jobs in this status.
    pub status: Option<JobStatus>,
    /// Only jobs for this model.
    pub model_type: Option<ModelType>,
    /// Only fragments of this parent.
    pub parent_id: Option<JobId>,
    /// Only claimed jobs whose lease ended before this time and that no
    /// one has reclaimed yet: the jobs stuck past their lease.
    pub lease_ended_before: Option<Timestamp>,
    /// At most this many (newest first).
    pub limit: usize,
}

/// Counts per status for one model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct StatusCounts {
    /// Waiting.
    pub pending: u64,
    /// Claimed, or parents waiting on fragments.
    pub processing: u64,
    /// Finished with a result.
    pub done: u64,
    /// Finished without one.
    pub failed: u64,
    /// Withdrawn.
    pub cancelled: u64,
}

impl StatusCounts {
    /// The counter for `status`.
    pub fn get_mut(&mut self, status: JobStatus) -> &mut u64 {
        match status {
            JobStatus::Pending => &mut self.pending,
            JobStatus::Processing => &mut self.processing,
            JobStatus::Done => &mut self.done,
            JobStatus::Failed => &mut self.failed,
            JobStatus::Cancelled => &mut self.cancelled,
        }
    }

    /// The count for `status`.
    pub fn get(&self, status: JobStatus) -> u64 {
        let mut copy = *self;
        *copy.get_mut(status)
    }
}

/// Queue statistics for one model.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ModelStats {
    /// Jobs per status.
    pub counts: StatusCounts,
    /// Age of the oldest pending job, if any.
    pub oldest_pending_age: Option<Duration>,
}

/// Queue statistics, one entry per model type (every model type present).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct QueueStats {
    /// Per model, in `ModelType::ALL` order.
    pub models: Vec<(ModelType, ModelStats)>,
}

impl QueueStats {
    /// The stats of one model.
    pub fn model(&self, model: ModelType) -> ModelStats {
        self.models
            .iter()
            .find(|(m, _)| *m == model)
            .map(|(_, s)| s.clone())
            .unwrap_or_default()
    }
}

/// Where a job's result is: opaque to everything but the result stores.
///
/// Stored as text in `gpu_jobs.result_path`: a file path (the file store),
/// or `db:` and the job id in hex (a row of `gpu_results`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ResultRef(String);

impl ResultRef {
    const DB: &'static str = "db:";

    /// A result file.
    pub fn file(path: &Path) -> Self {
        ResultRef(path.to_string_lossy().into_owned())
    }

    /// The `gpu_results` row of job `id`.
    pub fn database(id: JobId) -> Self {
        ResultRef(format!("{}{}", Self::DB, id.to_hex()))
    }

    /// A reference as stored.
    pub fn parse(stored: impl Into<String>) -> Self {
        ResultRef(stored.into())
    }

    /// The job whose `gpu_results` row this names, for a database reference.
    pub fn database_id(&self) -> Option<JobId> {
        self.0.strip_prefix(Self::DB).and_then(|h| h.parse().ok())
    }

    /// The file this names, for a file reference.
    pub fn as_file(&self) -> Option<&Path> {
        (!self.0.starts_with(Self::DB)).then(|| Path::new(&self.0))
    }

    /// The reference as stored.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ResultRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<PathBuf> for ResultRef {
    fn from(p: PathBuf) -> Self {
        ResultRef::file(&p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_model_type_and_status_is_read_back_from_its_name() {
        for m in ModelType::ALL {
            assert_eq!(m.as_str().parse::<ModelType>().unwrap(), m);
        }
        for st in JobStatus::ALL {
            assert_eq!(st.to_string().parse::<JobStatus>().unwrap(), st);
        }
        assert!("Vision".parse::<ModelType>().is_err());
        assert!("running".parse::<JobStatus>().is_err());
    }
}
