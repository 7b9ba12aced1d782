//! Mapping between `gpu_jobs` rows and domain types.
//!
//! Columns are read by name, so that migrations may add columns freely.
//! A row written by another program that breaks the schema contract becomes
//! `StoreError::Corrupt` naming the row, never a panic.

use std::path::PathBuf;

use std::str::FromStr;

use rusqlite::types::FromSql;
use rusqlite::Row;

use feeder_actors::fragment::Place;
use feeder_actors::{Job, JobId, StoreError, StoreResult, Timestamp};

/// Turns `rusqlite` errors into `StoreError::Backend`.
pub(crate) trait Db<T> {
    fn db(self) -> StoreResult<T>;
}

impl<T> Db<T> for rusqlite::Result<T> {
    fn db(self) -> StoreResult<T> {
        self.map_err(|e| StoreError::Backend(e.to_string()))
    }
}

/// A timestamp as stored: unix seconds with a millisecond fraction.
pub(crate) fn secs(t: Timestamp) -> f64 {
    t.as_secs_f64()
}

fn ts(v: Option<f64>) -> Option<Timestamp> {
    v.map(Timestamp::from_secs_f64)
}

fn id_of(bytes: Option<Vec<u8>>, what: &str, row: &str) -> StoreResult<Option<JobId>> {
    match bytes {
        None => Ok(None),
        Some(b) => JobId::from_slice(&b)
            .map(Some)
            .ok_or_else(|| StoreError::Corrupt {
                id: row.to_string(),
                reason: format!("{what} is {} bytes, not 16", b.len()),
            }),
    }
}

fn col<T: FromSql>(r: &Row<'_>, name: &str, row: &str) -> StoreResult<T> {
    r.get(name).map_err(|e| StoreError::Corrupt {
        id: row.to_string(),
        reason: format!("column {name}: {e}"),
    })
}

fn parsed<T: FromStr>(r: &Row<'_>, name: &str, row: &str) -> StoreResult<Option<T>>
where
    T::Err: std::fmt::Display,
{
    col::<Option<String>>(r, name, row)?
        .map(|v| v.parse::<T>())
        .transpose()
        .map_err(|e| StoreError::Corrupt {
            id: row.to_string(),
            reason: format!("column {name}: {e}"),
        })
}

fn required<T>(v: Option<T>, name: &str, row: &str) -> StoreResult<T> {
    v.ok_or_else(|| StoreError::Corrupt {
        id: row.to_string(),
        reason: format!("column {name} is NULL or invalid"),
    })
}

/// Reads a job from a row of `SELECT rowid AS seq, * FROM gpu_jobs`.
///
/// The outer `Result` is SQLite's; the inner one reports a row that breaks
/// the contract, so one bad row is named rather than hidden in a SQL error.
pub(crate) fn job_from_row(r: &Row<'_>) -> rusqlite::Result<StoreResult<Job>> {
    let seq: i64 = r.get("seq")?;
    let raw_id: Vec<u8> = r.get("id")?;
    let row = JobId::from_slice(&raw_id)
        .map(|id| id.to_hex())
        .unwrap_or_else(|| format!("rowid {seq}"));
    let row = row.as_str();
    let build = || -> StoreResult<Job> {
        Ok(Job {
            id: required(id_of(Some(raw_id.clone()), "id", row)?, "id", row)?,
            status: required(parsed(r, "status", row)?, "status", row)?,
            model_type: required(parsed(r, "model_type", row)?, "model_type", row)?,
            priority: col(r, "priority", row)?,
            attempts: col(r, "attempts", row)?,
            max_attempts: col(r, "max_attempts", row)?,
            crashes: col(r, "crashes", row)?,
            payload_sha256: col(r, "payload_sha256", row)?,
            payload_path: col::<Option<String>>(r, "payload_path", row)?.map(PathBuf::from),
            payload_inline: col(r, "payload_inline", row)?,
            result_path: col::<Option<String>>(r, "result_path", row)?
                .map(feeder_actors::ResultRef::parse),
            error: col(r, "error", row)?,
            parent_id: id_of(col(r, "parent_id", row)?, "parent_id", row)?,
            fragment_index: col(r, "fragment_index", row)?,
            total_fragments: col(r, "total_fragments", row)?,
            place: col::<Option<String>>(r, "place", row)?
                .map(|p| Place::from_json(&p))
                .transpose()
                .map_err(|reason| StoreError::Corrupt {
                    id: row.to_string(),
                    reason: format!("column place: {reason}"),
                })?,
            prefix_key: col(r, "prefix_key", row)?,
            follows: id_of(col(r, "follows", row)?, "follows", row)?,
            then_model: parsed(r, "then_model", row)?,
            prompt_tokens: col(r, "prompt_tokens", row)?,
            completion_tokens: col(r, "completion_tokens", row)?,
            latency_ms: col(r, "latency_ms", row)?,
            created_at: Timestamp::from_secs_f64(col(r, "created_at", row)?),
            run_at: ts(col(r, "run_at", row)?).filter(|t| t.0 > 0),
            lease_until: ts(col(r, "lease_until", row)?),
            claim_id: col(r, "claim_id", row)?,
            claimed_by: col(r, "claimed_by", row)?,
            started_at: ts(col(r, "started_at", row)?),
            finished_at: ts(col(r, "finished_at", row)?),
        })
    };
    Ok(build())
}
