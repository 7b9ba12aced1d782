//! Settling a claim (complete, fail, release, crashed) inside the caller's
//! transaction; each takes effect only with the current claim.

use std::time::Duration;

use deadpool_postgres::Transaction;
use tokio_postgres::types::ToSql;

use feeder_actors::store::{one_row, poison_error, stale};
use feeder_actors::{Claim, Completion, FailOutcome, Failure, Settled, Timestamp};

use super::*;

pub(super) async fn complete_in(
    tx: &Transaction<'_>,
    at: Option<f64>,
    claim: &Claim,
    done: &Completion,
) -> Op<()> {
    Settling { tx, at, claim }
        .row(
            COMPLETE,
            &[
                &done.result_path.as_str(),
                &done.prompt_tokens.map(|t| t as i64),
                &done.completion_tokens.map(|t| t as i64),
                &(done.latency.as_millis() as i64),
            ],
        )
        .await
}

pub(super) async fn fail_in(
    tx: &Transaction<'_>,
    at: Option<f64>,
    claim: &Claim,
    failure: &Failure,
    now: Timestamp,
) -> Op<FailOutcome> {
    let after = failure.retry_after.unwrap_or_default().as_secs_f64();
    Settling { tx, at, claim }
        .outcome(
            FAIL,
            &[&failure.retry_after.is_some(), &after, &failure.message],
            now,
        )
        .await
}

pub(super) async fn release_in(tx: &Transaction<'_>, at: Option<f64>, claim: &Claim) -> Op<()> {
    Settling { tx, at, claim }.row(RELEASE, &[]).await
}

pub(super) async fn crashed_in(
    tx: &Transaction<'_>,
    at: Option<f64>,
    claim: &Claim,
    instance: &str,
    limit: u32,
    now: Timestamp,
) -> Op<Settled> {
    let limit = limit.max(1) as i32;
    let error = poison_error(limit as u32, instance);
    let outcome = Settling { tx, at, claim }
        .outcome(CRASHED, &[&limit, &error], now)
        .await?;
    Ok(match outcome {
        FailOutcome::Failed { .. } => Settled::Failed(outcome),
        FailOutcome::Retrying { .. } => Settled::Released,
    })
}

/// One claim being settled in the caller's transaction, "now" being `at`.
struct Settling<'a> {
    tx: &'a Transaction<'a>,
    at: Option<f64>,
    claim: &'a Claim,
}

impl Settling<'_> {
    /// Runs `sql`, a settling statement that returns no row, which must
    /// change the claim's job and nothing else (else the claim is stale).
    async fn row(&self, sql: &str, rest: &[&(dyn ToSql + Sync)]) -> Op<()> {
        let id = bytes(&self.claim.job_id);
        let st = self.tx.prepare_cached(sql).await?;
        let n = self.tx.execute(&st, &self.params(&id, rest)).await?;
        Ok(one_row(n, self.claim)?)
    }

    /// Runs `sql`, a settling statement that returns the job's status,
    /// attempts and seconds until its `run_at` after it, as what became of
    /// the job: failed for good, or pending again. No row means the claim is
    /// stale.
    async fn outcome(
        &self,
        sql: &str,
        rest: &[&(dyn ToSql + Sync)],
        now: Timestamp,
    ) -> Op<FailOutcome> {
        let id = bytes(&self.claim.job_id);
        let st = self.tx.prepare_cached(sql).await?;
        let Some(row) = self.tx.query_opt(&st, &self.params(&id, rest)).await? else {
            return Err(stale(self.claim).into());
        };
        let status: String = row.get(0);
        let attempts = row.get::<_, i32>(1).max(0) as u32;
        if status == "failed" {
            return Ok(FailOutcome::Failed { attempts });
        }
        let due_in: f64 = row.get(2);
        Ok(FailOutcome::Retrying {
            run_at: now + Duration::from_secs_f64(due_in.max(0.0)),
            attempts,
        })
    }

    /// A settling statement's parameters: every one takes $1 "now", $2 the
    /// job (`id`) and $3 the claim id, then `rest` from $4 on.
    fn params<'p>(
        &'p self,
        id: &'p &[u8],
        rest: &[&'p (dyn ToSql + Sync)],
    ) -> Vec<&'p (dyn ToSql + Sync)> {
        let first: [&'p (dyn ToSql + Sync); 3] = [&self.at, id, &self.claim.claim_id];
        first.into_iter().chain(rest.iter().copied()).collect()
    }
}
