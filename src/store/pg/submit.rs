//! Submitting: one insert per job, idempotent, inside the caller's transaction.

use deadpool_postgres::Transaction;
use tokio_postgres::types::ToSql;

use feeder_actors::store::{payload_columns, stored_prefix_key, Placement, SubmitTx};
use feeder_actors::{Job, JobId, NewJob, StoreError, DEFAULT_MAX_ATTEMPTS};

use super::rows::job_from_row;
use super::*;

/// Inserts `job` unless an identical one exists; `Some(id)` when inserted.
async fn insert(
    tx: &Transaction<'_>,
    at: Option<f64>,
    job: &NewJob,
    to: Placement,
) -> Op<Option<JobId>> {
    let fragment = to.fragment();
    let id = JobId::random();
    let (payload_path, payload_inline) = payload_columns(job);
    let payload_path = payload_path.map(|p| p.to_string_lossy().into_owned());
    let place: Option<serde_json::Value> = job
        .place
        .map(|p| serde_json::from_str(&p.to_json()).expect("a place is JSON"));
    let prefix_key = stored_prefix_key(job, fragment);
    let max_attempts = job.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS) as i32;
    let parent = fragment.map(|f| f.0 .0.to_vec());
    let index = fragment.map(|f| f.1 as i32);
    let total = to.total_fragments().map(|t| t as i32);
    let follows = job.follows.map(|f| f.0.to_vec());
    let then_model = job.then_model.map(|m| m.as_str());
    let st = tx.prepare_cached(INSERT).await?;
    let params: [&(dyn ToSql + Sync); 16] = [
        &at,
        &id.0.as_slice(),
        &job.payload_sha256,
        &job.model_type.as_str(),
        &payload_path,
        &payload_inline,
        &to.status().as_str(),
        &job.priority,
        &max_attempts,
        &parent,
        &index,
        &total,
        &follows,
        &then_model,
        &place,
        &prefix_key,
    ];
    match tx.query_opt(&st, &params).await {
        Ok(row) => Ok(row.map(|_| id)),
        Err(e) if e.as_db_error().is_some() && !transient(&e) => Err(OpError::Store(
            StoreError::Invalid(format!("job rejected by the database: {}", pg_text(&e))),
        )),
        Err(e) => Err(e.into()),
    }
}

/// The existing job that an insert of `job` conflicted with.
async fn existing(tx: &Transaction<'_>, job: &NewJob) -> Op<Job> {
    let row = if let Some(follows) = job.follows {
        let st = tx
            .prepare_cached("SELECT * FROM gpu_jobs WHERE follows = $1")
            .await?;
        tx.query_one(&st, &[&bytes(&follows)]).await?
    } else {
        let st = tx
            .prepare_cached(
                "SELECT * FROM gpu_jobs WHERE model_type = $1 AND payload_sha256 = $2 \
                 AND parent_id IS NULL AND follows IS NULL",
            )
            .await?;
        tx.query_one(&st, &[&job.model_type.as_str(), &job.payload_sha256])
            .await?
    };
    Ok(job_from_row(&row)?)
}

/// A PostgreSQL transaction as submissions write it, at `at`.
pub(super) struct PgTx<'a, 'c> {
    pub(super) tx: &'a Transaction<'c>,
    pub(super) at: Option<f64>,
}

impl SubmitTx for PgTx<'_, '_> {
    type Error = OpError;

    async fn insert(&mut self, job: &NewJob, to: Placement) -> Op<Option<JobId>> {
        insert(self.tx, self.at, job, to).await
    }

    async fn existing(&mut self, job: &NewJob) -> Op<Job> {
        existing(self.tx, job).await
    }
}
