//! Submitting: one insert per job, idempotent, inside the caller's transaction.

use rusqlite::{named_params, Transaction};

use feeder_actors::store::{payload_columns, stored_prefix_key, Placement, SubmitTx};
use feeder_actors::{Job, JobId, NewJob, StoreError, StoreResult, Timestamp, DEFAULT_MAX_ATTEMPTS};

use super::rows::{job_from_row, secs, Db};
use super::*;

fn insert(
    tx: &Transaction<'_>,
    job: &NewJob,
    to: Placement,
    now: Timestamp,
) -> StoreResult<Option<JobId>> {
    let id = JobId::random();
    let (payload_path, payload_inline) = payload_columns(job);
    let payload_path = payload_path.map(|p| p.to_string_lossy().into_owned());
    let mut stmt = tx.prepare_cached(INSERT).db()?;
    let n = stmt
        .execute(named_params! {
            ":id": id.0,
            ":payload_sha256": job.payload_sha256,
            ":model_type": job.model_type.as_str(),
            ":payload_path": payload_path,
            ":payload_inline": payload_inline,
            ":created_at": now.as_secs(),
            ":status": to.status().as_str(),
            ":priority": job.priority,
            ":max_attempts": job.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS),
            ":parent_id": to.fragment().map(|f| f.0 .0),
            ":fragment_index": to.fragment().map(|f| f.1),
            ":total_fragments": to.total_fragments(),
            ":follows": job.follows.map(|f| f.0),
            ":then_model": job.then_model.map(|m| m.as_str()),
            ":place": job.place.map(|p| p.to_json()),
            ":prefix_key": stored_prefix_key(job, to.fragment()),
            ":now": secs(now),
        })
        .map_err(|e| StoreError::Invalid(format!("job rejected by the database: {e}")))?;
    Ok((n == 1).then_some(id))
}

/// The existing job that an insert of `job` conflicted with.
fn existing(tx: &Transaction<'_>, job: &NewJob) -> StoreResult<Job> {
    let found = if let Some(follows) = job.follows {
        tx.query_row(
            &format!("{SELECT_JOB} WHERE follows = ?1"),
            [follows.0],
            job_from_row,
        )
    } else {
        tx.query_row(
            &format!(
                "{SELECT_JOB} WHERE model_type = ?1 AND payload_sha256 = ?2 \
                 AND parent_id IS NULL AND follows IS NULL"
            ),
            [job.model_type.as_str(), job.payload_sha256.as_str()],
            job_from_row,
        )
    };
    found.db()?
}

/// A SQLite transaction as submissions write it, at `now`.
pub(super) struct SqliteTx<'a, 'c> {
    pub(super) tx: &'a Transaction<'c>,
    pub(super) now: Timestamp,
}

impl SubmitTx for SqliteTx<'_, '_> {
    type Error = StoreError;

    async fn insert(&mut self, job: &NewJob, to: Placement) -> StoreResult<Option<JobId>> {
        insert(self.tx, job, to, self.now)
    }

    async fn existing(&mut self, job: &NewJob) -> StoreResult<Job> {
        existing(self.tx, job)
    }
}
