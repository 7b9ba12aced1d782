//! What the SQLite and PostgreSQL adapters do alike, written once: reading
//! a job from a `gpu_jobs` row, over [`Columns`], the few ways each client
//! reads a column, and the queue's counts from their grouped rows. (Submissions and the order of claimed jobs are shared
//! with the in-memory store too, in `feeder_actors::store`.)
//!
//! Columns are read by name, so that migrations may add columns freely. A
//! row written by another program that breaks the schema contract becomes
//! `StoreError::Corrupt` naming the row, never a panic.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use feeder_actors::fragment::Place;
use feeder_actors::{
    Job, JobId, JobStatus, ModelStats, ModelType, QueueStats, ResultRef, StoreError, StoreResult,
    Timestamp,
};

/// One `gpu_jobs` row as a database client reads it: each column by name,
/// `None` for NULL, and an error in words for a column missing or of
/// another type.
pub(crate) trait Columns {
    /// A text column.
    fn text(&self, name: &str) -> Result<Option<String>, String>;
    /// An integer column.
    fn int(&self, name: &str) -> Result<Option<i64>, String>;
    /// A floating-point column (times: unix seconds).
    fn real(&self, name: &str) -> Result<Option<f64>, String>;
    /// A binary column (ids).
    fn blob(&self, name: &str) -> Result<Option<Vec<u8>>, String>;
    /// A JSON column, as its text.
    fn json(&self, name: &str) -> Result<Option<String>, String>;
    /// The row's place in the table (`rowid 7`, `seq 7`), to name a row
    /// whose id is bad.
    fn position(&self) -> String;
}

/// Reads a job from a whole `gpu_jobs` row.
pub(crate) fn job_from_row(r: &impl Columns) -> StoreResult<Job> {
    let raw_id = r
        .blob("id")
        .map_err(|e| corrupt(&r.position(), format!("column id: {e}")))?;
    let row = raw_id
        .as_deref()
        .and_then(JobId::from_slice)
        .map_or_else(|| r.position(), |id| id.to_hex());
    let c = Reader { r, row: &row };
    Ok(Job {
        id: c.required(c.id_of(raw_id, "id")?, "id")?,
        status: c.required(c.parsed("status")?, "status")?,
        model_type: c.required(c.parsed("model_type")?, "model_type")?,
        priority: c.required(c.int("priority")?, "priority")?,
        attempts: c.required(c.count("attempts")?, "attempts")?,
        max_attempts: c.required(c.count("max_attempts")?, "max_attempts")?,
        crashes: c.required(c.count("crashes")?, "crashes")?,
        payload_sha256: c.required(c.text("payload_sha256")?, "payload_sha256")?,
        payload_path: c.text("payload_path")?.map(PathBuf::from),
        payload_inline: c.text("payload_inline")?,
        result_path: c.text("result_path")?.map(ResultRef::parse),
        error: c.text("error")?,
        parent_id: c.id_of(c.blob("parent_id")?, "parent_id")?,
        fragment_index: c.count("fragment_index")?,
        total_fragments: c.count("total_fragments")?,
        place: r
            .json("place")
            .map_err(|e| c.bad(format!("column place: {e}")))?
            .map(|p| Place::from_json(&p))
            .transpose()
            .map_err(|reason| c.bad(format!("column place: {reason}")))?,
        prefix_key: c.text("prefix_key")?,
        follows: c.id_of(c.blob("follows")?, "follows")?,
        then_model: c.parsed("then_model")?,
        prompt_tokens: c.tokens("prompt_tokens")?,
        completion_tokens: c.tokens("completion_tokens")?,
        latency_ms: c.tokens("latency_ms")?,
        created_at: Timestamp::from_secs_f64(c.required(c.real("created_at")?, "created_at")?),
        run_at: c.time("run_at")?.filter(|t| t.0 > 0),
        lease_until: c.time("lease_until")?,
        claim_id: c.text("claim_id")?,
        claimed_by: c.text("claimed_by")?,
        started_at: c.time("started_at")?,
        finished_at: c.time("finished_at")?,
    })
}

fn corrupt(row: &str, reason: String) -> StoreError {
    StoreError::Corrupt {
        id: row.to_string(),
        reason,
    }
}

/// The columns of one row, each error naming the row and the column.
struct Reader<'a, C> {
    r: &'a C,
    row: &'a str,
}

impl<C: Columns> Reader<'_, C> {
    fn bad(&self, reason: String) -> StoreError {
        corrupt(self.row, reason)
    }

    fn named<T>(&self, name: &str, v: Result<T, String>) -> StoreResult<T> {
        v.map_err(|e| self.bad(format!("column {name}: {e}")))
    }

    fn text(&self, name: &str) -> StoreResult<Option<String>> {
        self.named(name, self.r.text(name))
    }

    fn int(&self, name: &str) -> StoreResult<Option<i64>> {
        self.named(name, self.r.int(name))
    }

    fn real(&self, name: &str) -> StoreResult<Option<f64>> {
        self.named(name, self.r.real(name))
    }

    fn blob(&self, name: &str) -> StoreResult<Option<Vec<u8>>> {
        self.named(name, self.r.blob(name))
    }

    fn time(&self, name: &str) -> StoreResult<Option<Timestamp>> {
        Ok(self.real(name)?.map(Timestamp::from_secs_f64))
    }

    /// A count (attempts, an index): negative or too large is corrupt.
    fn count(&self, name: &str) -> StoreResult<Option<u32>> {
        self.int(name)?
            .map(|v| {
                u32::try_from(v)
                    .map_err(|_| self.bad(format!("column {name} is out of range ({v})")))
            })
            .transpose()
    }

    /// A statistic (tokens, latency): a negative one is not known.
    fn tokens(&self, name: &str) -> StoreResult<Option<u64>> {
        Ok(self.int(name)?.and_then(|v| u64::try_from(v).ok()))
    }

    fn parsed<T: FromStr>(&self, name: &str) -> StoreResult<Option<T>>
    where
        T::Err: std::fmt::Display,
    {
        self.text(name)?
            .map(|v| v.parse::<T>())
            .transpose()
            .map_err(|e| self.bad(format!("column {name}: {e}")))
    }

    fn id_of(&self, bytes: Option<Vec<u8>>, name: &str) -> StoreResult<Option<JobId>> {
        match bytes {
            None => Ok(None),
            Some(b) => JobId::from_slice(&b)
                .map(Some)
                .ok_or_else(|| self.bad(format!("{name} is {} bytes, not 16", b.len()))),
        }
    }

    fn required<T>(&self, v: Option<T>, name: &str) -> StoreResult<T> {
        v.ok_or_else(|| self.bad(format!("column {name} is NULL or invalid")))
    }
}

/// The queue's counts from `(model, status, count, age of the oldest)` per
/// group, as both adapters read them with `GROUP BY model_type, status`.
pub(crate) fn queue_stats(
    groups: impl IntoIterator<Item = (String, String, u64, Option<Duration>)>,
) -> QueueStats {
    let mut models: Vec<(ModelType, ModelStats)> = ModelType::ALL
        .into_iter()
        .map(|m| (m, ModelStats::default()))
        .collect();
    for (model, status, count, oldest) in groups {
        let (Ok(model), Ok(status)) = (model.parse::<ModelType>(), status.parse::<JobStatus>())
        else {
            continue; // The schema's CHECKs make this unreachable.
        };
        let entry = &mut models
            .iter_mut()
            .find(|(m, _)| *m == model)
            .expect("every model")
            .1;
        *entry.counts.get_mut(status) = count;
        if status == JobStatus::Pending {
            entry.oldest_pending_age = oldest;
        }
    }
    QueueStats { models }
}
