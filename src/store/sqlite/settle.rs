//! Settling a claim (complete, fail, release, crashed) inside the caller's
//! transaction; each takes effect only with the current claim.

use rusqlite::{named_params, OptionalExtension, ToSql, Transaction};

use feeder_actors::store::{one_row, poison_error, stale};
use feeder_actors::{Claim, Completion, FailOutcome, Failure, Settled, StoreResult, Timestamp};

use super::rows::{secs, Db};
use super::*;

pub(super) fn complete_in(
    tx: &Transaction<'_>,
    claim: &Claim,
    done: &Completion,
    now: Timestamp,
) -> StoreResult<()> {
    settle_row(
        tx,
        claim,
        COMPLETE,
        named_params! {
            ":id": claim.job_id.0,
            ":claim_id": claim.claim_id,
            ":result_path": done.result_path.as_str(),
            ":prompt_tokens": done.prompt_tokens.map(|t| t as i64),
            ":completion_tokens": done.completion_tokens.map(|t| t as i64),
            ":latency_ms": done.latency.as_millis() as i64,
            ":now": secs(now),
        },
    )
}

pub(super) fn fail_in(
    tx: &Transaction<'_>,
    claim: &Claim,
    failure: Failure,
    now: Timestamp,
) -> StoreResult<FailOutcome> {
    let retry_at = now + failure.retry_after.unwrap_or_default();
    settle_outcome(
        tx,
        claim,
        FAIL,
        named_params! {
            ":id": claim.job_id.0,
            ":claim_id": claim.claim_id,
            ":retryable": failure.retry_after.is_some(),
            ":retry_at": secs(retry_at),
            ":error": failure.message,
            ":now": secs(now),
        },
    )
}

pub(super) fn release_in(tx: &Transaction<'_>, claim: &Claim, now: Timestamp) -> StoreResult<()> {
    settle_row(
        tx,
        claim,
        RELEASE,
        named_params! { ":id": claim.job_id.0, ":claim_id": claim.claim_id, ":now": secs(now) },
    )
}

/// Runs `sql`, a settling statement that returns no row, which must change
/// the claim's job and nothing else (else the claim is stale).
fn settle_row(
    tx: &Transaction<'_>,
    claim: &Claim,
    sql: &str,
    params: &[(&str, &dyn ToSql)],
) -> StoreResult<()> {
    let n = tx.prepare_cached(sql).db()?.execute(params).db()?;
    one_row(n as u64, claim)
}

pub(super) fn crashed_in(
    tx: &Transaction<'_>,
    claim: &Claim,
    instance: &str,
    limit: u32,
    now: Timestamp,
) -> StoreResult<Settled> {
    let limit = limit.max(1);
    let outcome = settle_outcome(
        tx,
        claim,
        CRASHED,
        named_params! {
            ":id": claim.job_id.0,
            ":claim_id": claim.claim_id,
            ":limit": limit,
            ":error": poison_error(limit, instance),
            ":now": secs(now),
        },
    )?;
    Ok(match outcome {
        FailOutcome::Failed { .. } => Settled::Failed(outcome),
        FailOutcome::Retrying { .. } => Settled::Released,
    })
}

/// Runs `sql`, a settling statement that returns the job's status, attempts
/// and `run_at` after it, as what became of the job: failed for good, or
/// pending again (from `run_at`). No row means the claim is stale.
fn settle_outcome(
    tx: &Transaction<'_>,
    claim: &Claim,
    sql: &str,
    params: &[(&str, &dyn ToSql)],
) -> StoreResult<FailOutcome> {
    let row = tx
        .prepare_cached(sql)
        .db()?
        .query_row(params, |r| <(String, u32, f64)>::try_from(r))
        .optional()
        .db()?;
    match row {
        None => Err(stale(claim)),
        Some((status, attempts, _)) if status == "failed" => Ok(FailOutcome::Failed { attempts }),
        Some((_, attempts, run_at)) => Ok(FailOutcome::Retrying {
            run_at: Timestamp::from_secs_f64(run_at),
            attempts,
        }),
    }
}
