//! Mapping between PostgreSQL `gpu_jobs` rows and domain types.
//!
//! Columns are read by name, so that migrations may add columns freely. A
//! row written by another program that breaks the schema contract becomes
//! `StoreError::Corrupt` naming the row, never a panic.

use std::str::FromStr;

use tokio_postgres::types::FromSql;
use tokio_postgres::Row;

use feeder_actors::fragment::Place;
use feeder_actors::{Job, JobId, ResultRef, StoreError, StoreResult, Timestamp};

fn corrupt(row: &str, reason: String) -> StoreError {
    StoreError::Corrupt {
        id: row.to_string(),
        reason,
    }
}

fn col<'a, T: FromSql<'a>>(r: &'a Row, name: &str, row: &str) -> StoreResult<T> {
    r.try_get(name)
        .map_err(|e| corrupt(row, format!("column {name}: {e}")))
}

fn id_of(bytes: Option<Vec<u8>>, what: &str, row: &str) -> StoreResult<Option<JobId>> {
    match bytes {
        None => Ok(None),
        Some(b) => JobId::from_slice(&b)
            .map(Some)
            .ok_or_else(|| corrupt(row, format!("{what} is {} bytes, not 16", b.len()))),
    }
}

fn parsed<T: FromStr>(v: Option<String>, name: &str, row: &str) -> StoreResult<Option<T>>
where
    T::Err: std::fmt::Display,
{
    v.map(|v| v.parse::<T>())
        .transpose()
        .map_err(|e| corrupt(row, format!("column {name}: {e}")))
}

fn count(v: i32, name: &str, row: &str) -> StoreResult<u32> {
    u32::try_from(v).map_err(|_| corrupt(row, format!("column {name} is negative ({v})")))
}

fn opt_count(v: Option<i32>, name: &str, row: &str) -> StoreResult<Option<u32>> {
    v.map(|v| count(v, name, row)).transpose()
}

fn opt_u64(v: Option<i64>) -> Option<u64> {
    v.and_then(|v| u64::try_from(v).ok())
}

fn ts(v: Option<f64>) -> Option<Timestamp> {
    v.map(Timestamp::from_secs_f64)
}

/// Reads a job from a row of `SELECT * FROM gpu_jobs` (or `RETURNING *`).
pub(super) fn job_from_row(r: &Row) -> StoreResult<Job> {
    let raw_id: Vec<u8> = r
        .try_get("id")
        .map_err(|e| corrupt("?", format!("column id: {e}")))?;
    let row = JobId::from_slice(&raw_id)
        .map(|id| id.to_hex())
        .unwrap_or_else(|| {
            let seq: i64 = r.try_get("seq").unwrap_or(-1);
            format!("seq {seq}")
        });
    let row = row.as_str();
    fn required<T>(v: Option<T>, name: &str, row: &str) -> StoreResult<T> {
        v.ok_or_else(|| corrupt(row, format!("column {name} is NULL or invalid")))
    }
    Ok(Job {
        id: required(id_of(Some(raw_id.clone()), "id", row)?, "id", row)?,
        status: required(
            parsed(col(r, "status", row)?, "status", row)?,
            "status",
            row,
        )?,
        model_type: required(
            parsed(col(r, "model_type", row)?, "model_type", row)?,
            "model_type",
            row,
        )?,
        priority: col(r, "priority", row)?,
        attempts: count(col(r, "attempts", row)?, "attempts", row)?,
        max_attempts: count(col(r, "max_attempts", row)?, "max_attempts", row)?,
        crashes: count(col(r, "crashes", row)?, "crashes", row)?,
        payload_sha256: col(r, "payload_sha256", row)?,
        payload_path: col::<Option<String>>(r, "payload_path", row)?.map(Into::into),
        payload_inline: col(r, "payload_inline", row)?,
        result_path: col::<Option<String>>(r, "result_path", row)?.map(ResultRef::parse),
        error: col(r, "error", row)?,
        parent_id: id_of(col(r, "parent_id", row)?, "parent_id", row)?,
        fragment_index: opt_count(col(r, "fragment_index", row)?, "fragment_index", row)?,
        total_fragments: opt_count(col(r, "total_fragments", row)?, "total_fragments", row)?,
        place: col::<Option<serde_json::Value>>(r, "place", row)?
            .map(|p| Place::from_json(&p.to_string()))
            .transpose()
            .map_err(|reason| corrupt(row, format!("column place: {reason}")))?,
        prefix_key: col(r, "prefix_key", row)?,
        follows: id_of(col(r, "follows", row)?, "follows", row)?,
        then_model: parsed(col(r, "then_model", row)?, "then_model", row)?,
        prompt_tokens: opt_u64(col(r, "prompt_tokens", row)?),
        completion_tokens: opt_u64(col(r, "completion_tokens", row)?),
        latency_ms: opt_u64(col(r, "latency_ms", row)?),
        created_at: Timestamp::from_secs_f64(col(r, "created_at", row)?),
        run_at: ts(col(r, "run_at", row)?).filter(|t| t.0 > 0),
        lease_until: ts(col(r, "lease_until", row)?),
        claim_id: col(r, "claim_id", row)?,
        claimed_by: col(r, "claimed_by", row)?,
        started_at: ts(col(r, "started_at", row)?),
        finished_at: ts(col(r, "finished_at", row)?),
    })
}
