//! The `JobStore` port over PostgreSQL: each method one short transaction
//! (or one statement) on a pooled connection, run by `run!`.

use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Object, Transaction};
use tracing::warn;

use feeder_actors::prefix::{self, Candidate, ClaimOrder};
use feeder_actors::store::{in_claim_order, submit_in, submit_parent_in, ClaimRequest};
use feeder_actors::{
    Claim, ClaimedJob, Completion, DaemonInfo, FailOutcome, Failure, Job, JobId, JobStatus,
    JobStore, ListFilter, ModelType, NewJob, ParentOutcome, QueueStats, Settle, Settled,
    StoreError, StoreResult, Submitted, Timestamp,
};

use super::rows::job_from_row;
use super::settle::{complete_in, crashed_in, fail_in, release_in};
use super::submit::PgTx;
use super::*;
use crate::store::shared::queue_stats;

fn jobs(rows: &[tokio_postgres::Row]) -> Op<Vec<Job>> {
    Ok(rows.iter().map(job_from_row).collect::<StoreResult<_>>()?)
}

/// Claimed rows with their insertion order.
/// A plain claim (`claim.sql`): pending jobs in claim order, skipping
/// rows another claim holds.
struct PlainClaim<'a> {
    at: Option<f64>,
    claim_id: &'a str,
    owner: &'a str,
    lease_s: f64,
    model: ModelType,
}

impl PlainClaim<'_> {
    /// Takes up to `n` jobs through `c` (a connection, or a transaction
    /// the claim is part of).
    async fn take(
        &self,
        c: &impl deadpool_postgres::GenericClient,
        n: usize,
    ) -> Op<Vec<(i64, Job)>> {
        let st = c.prepare_cached(CLAIM).await?;
        let rows = c
            .query(
                &st,
                &[
                    &self.at,
                    &self.claim_id,
                    &self.owner,
                    &self.lease_s,
                    &self.model.as_str(),
                    &(n as i64),
                ],
            )
            .await?;
        sequenced(&rows)
    }
}

fn sequenced(rows: &[tokio_postgres::Row]) -> Op<Vec<(i64, Job)>> {
    Ok(rows
        .iter()
        .map(|r| {
            Ok((
                r.try_get::<_, i64>("seq").unwrap_or(i64::MAX),
                job_from_row(r)?,
            ))
        })
        .collect::<StoreResult<_>>()?)
}

fn ids(rows: &[tokio_postgres::Row]) -> Vec<JobId> {
    rows.iter()
        .filter_map(|r| JobId::from_slice(r.get::<_, &[u8]>(0)))
        .collect()
}

#[async_trait]
impl JobStore for PgStore {
    async fn submit(&self, job: NewJob, now: Timestamp) -> StoreResult<Submitted> {
        let at = self.at(now);
        run!(self, |tx| {
            submit_in(&mut PgTx { tx: &tx, at }, &job).await?
        })
    }

    async fn submit_batch(&self, jobs: Vec<NewJob>, now: Timestamp) -> StoreResult<Vec<Submitted>> {
        let at = self.at(now);
        run!(self, |tx| {
            let mut out = Vec::with_capacity(jobs.len());
            let mut submit = PgTx { tx: &tx, at };
            for job in &jobs {
                out.push(submit_in(&mut submit, job).await?);
            }
            out
        })
    }

    async fn submit_parent(
        &self,
        parent: NewJob,
        fragments: Vec<NewJob>,
        now: Timestamp,
    ) -> StoreResult<Submitted> {
        let at = self.at(now);
        run!(self, |tx| {
            submit_parent_in(&mut PgTx { tx: &tx, at }, &parent, &fragments).await?
        })
    }

    async fn claim_with(
        &self,
        want: &ClaimRequest,
        now: Timestamp,
    ) -> StoreResult<Vec<ClaimedJob>> {
        let (model, n, lease) = (want.model, want.n, want.lease);
        let (owner, order) = (want.owner.as_str(), &want.order);
        if n == 0 {
            return Ok(Vec::new());
        }
        let at = self.at(now);
        let claim_id = hex::encode(rand::random::<[u8; 12]>());
        let lease_s = lease.as_secs_f64();
        let rows = run!(self, |c, tries| {
            if tries > 0 {
                // The connection broke: this claim may have been
                // committed before it did. Its rows carry its token.
                let st = c
                    .prepare_cached(
                        "SELECT * FROM gpu_jobs WHERE claim_id = $1 AND status = 'processing'",
                    )
                    .await?;
                let done = c.query(&st, &[&claim_id]).await?;
                if !done.is_empty() {
                    return Ok((sequenced(&done)?, None));
                }
            }
            let plain = PlainClaim {
                at,
                claim_id: &claim_id,
                owner,
                lease_s,
                model,
            };
            match order {
                ClaimOrder::Plain => Ok((plain.take(&*c, n).await?, None)),
                ClaimOrder::Grouped(grouping) => {
                    let tx = c.transaction().await?;
                    let st = tx.prepare_cached(CLAIM_CANDIDATES).await?;
                    let look = prefix::lookahead(n) as i64;
                    let cand_rows = tx
                        .query(&st, &[&at, &model.as_str(), &look, &grouping.warm])
                        .await?;
                    let Some(db_now) = cand_rows.first().map(|r| r.get::<_, f64>("now")) else {
                        return Ok((Vec::new(), None));
                    };
                    let cands: Vec<Candidate> = cand_rows
                        .iter()
                        .map(|r| Candidate {
                            seq: r.get("seq"),
                            priority: r.get("priority"),
                            created_at: Timestamp::from_secs_f64(r.get("created_at")),
                            key: r.get("prefix_key"),
                        })
                        .collect();
                    let picked =
                        prefix::pick(&cands, n, grouping, Timestamp::from_secs_f64(db_now));
                    if picked.is_empty() {
                        return Ok((Vec::new(), None));
                    }
                    let mut seqs: Vec<i64> = picked.iter().map(|&i| cands[i].seq).collect();
                    let st = tx.prepare_cached(CLAIM_ROWS).await?;
                    let rows = tx
                        .query(&st, &[&at, &claim_id, &owner, &lease_s, &seqs])
                        .await?;
                    let mut claimed = sequenced(&rows)?;
                    if claimed.len() < n {
                        // Another daemon took some of the chosen rows since
                        // they were read: the rest come in plain order, so
                        // that a claim short of `n` still means that no
                        // more work is there (a dispatcher waits for news
                        // after one).
                        let mut more = plain.take(&tx, n - claimed.len()).await?;
                        more.sort_by_key(|(seq, j)| {
                            (std::cmp::Reverse(j.priority), j.created_at, *seq)
                        });
                        seqs.extend(more.iter().map(|(seq, _)| *seq));
                        claimed.extend(more);
                    }
                    tx.commit().await?;
                    Ok((claimed, Some(seqs)))
                }
            }
        })?;
        let (claimed, picked) = rows;
        Ok(in_claim_order(claimed, picked.as_deref(), &claim_id))
    }

    async fn complete(&self, claim: &Claim, done: Completion, now: Timestamp) -> StoreResult<()> {
        let at = self.at(now);
        run!(self, |tx| { complete_in(&tx, at, claim, &done).await? })
    }

    async fn settle_batch(
        &self,
        items: Vec<(Claim, Settle)>,
        now: Timestamp,
    ) -> StoreResult<Vec<StoreResult<Settled>>> {
        let at = self.at(now);
        run!(self, |tx| {
            let mut out = Vec::with_capacity(items.len());
            for (claim, settle) in &items {
                let one = match settle {
                    Settle::Complete(done) => complete_in(&tx, at, claim, done)
                        .await
                        .map(|()| Settled::Done),
                    Settle::Fail(failure) => fail_in(&tx, at, claim, failure, now)
                        .await
                        .map(Settled::Failed),
                    Settle::Release => release_in(&tx, at, claim).await.map(|()| Settled::Released),
                    Settle::Crashed { instance, limit } => {
                        crashed_in(&tx, at, claim, instance, *limit, now).await
                    }
                };
                match one {
                    Ok(v) => out.push(Ok(v)),
                    Err(OpError::Store(e)) => out.push(Err(e)),
                    Err(e) => return Err(e),
                }
            }
            out
        })
    }

    async fn fail(
        &self,
        claim: &Claim,
        failure: Failure,
        now: Timestamp,
    ) -> StoreResult<FailOutcome> {
        let at = self.at(now);
        run!(self, |tx| { fail_in(&tx, at, claim, &failure, now).await? })
    }

    async fn release(&self, claim: &Claim, now: Timestamp) -> StoreResult<()> {
        let at = self.at(now);
        run!(self, |tx| { release_in(&tx, at, claim).await? })
    }

    async fn next_due(&self, model: ModelType, now: Timestamp) -> StoreResult<Option<Timestamp>> {
        let at = self.at(now);
        run!(self, |c, _tries| {
            let st = c.prepare_cached(NEXT_DUE).await?;
            let row = c.query_opt(&st, &[&at, &model.as_str()]).await?;
            Ok(row.map(|r| now + Duration::from_secs_f64(r.get::<_, f64>(0).max(0.0))))
        })
    }

    async fn reclaim_expired(&self, now: Timestamp) -> StoreResult<u64> {
        let at = self.at(now);
        // Right after this store got its connection back, every daemon's
        // heartbeat may be old only because the server was away: take
        // nobody's claims over until they have had a timeout to renew.
        let settling = {
            let back = *self
                .shared
                .back_at
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let timeout = *self
                .shared
                .timeout
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            back.is_some_and(|b| b.elapsed() < timeout)
        };
        run!(self, |tx| {
            let st = tx.prepare_cached(RECLAIM).await?;
            let mut n = tx.execute(&st, &[&at]).await?;
            if !settling {
                let st = tx.prepare_cached(TAKE_OVER).await?;
                for row in tx.query(&st, &[&at]).await? {
                    let (daemon, silent, taken): (String, f64, i64) =
                        (row.get(0), row.get(1), row.get(2));
                    warn!(
                        "daemon {daemon} has been silent for {silent:.1} s, past its heartbeat timeout: its {taken} claims go back to pending"
                    );
                    n += taken as u64;
                }
            }
            n
        })
    }

    async fn release_crashed(
        &self,
        claim: &Claim,
        instance: &str,
        limit: u32,
        now: Timestamp,
    ) -> StoreResult<Settled> {
        let at = self.at(now);
        run!(self, |tx| {
            crashed_in(&tx, at, claim, instance, limit, now).await?
        })
    }

    async fn release_owner(&self, owner: &str, now: Timestamp) -> StoreResult<u64> {
        let at = self.at(now);
        run!(self, |c, _tries| {
            let st = c.prepare_cached(RELEASE_OWNER).await?;
            Ok(c.execute(&st, &[&at, &owner]).await?)
        })
    }

    async fn cancel(&self, id: JobId, now: Timestamp) -> StoreResult<Job> {
        let at = self.at(now);
        run!(self, |tx| {
            let job = get_locked(&tx, id).await?;
            if job.status.is_terminal() {
                return Err(StoreError::InvalidState {
                    id,
                    status: job.status,
                    hint: "only pending or processing jobs can be cancelled",
                }
                .into());
            }
            tx.execute(
                "UPDATE gpu_jobs SET status = 'cancelled', claim_id = NULL, lease_until = NULL, \
                        finished_at = gpu_feeder_now($1), updated_at = gpu_feeder_now($1) \
                  WHERE (id = $2 OR parent_id = $2) AND status IN ('pending', 'processing')",
                &[&at, &bytes(&id)],
            )
            .await?;
            let job = get_locked(&tx, id).await?;
            job
        })
    }

    async fn retry(&self, id: JobId, now: Timestamp) -> StoreResult<Job> {
        let at = self.at(now);
        run!(self, |tx| {
            let job = get_locked(&tx, id).await?;
            if !matches!(job.status, JobStatus::Failed | JobStatus::Cancelled) {
                return Err(StoreError::InvalidState {
                    id,
                    status: job.status,
                    hint: "only failed or cancelled jobs can be retried",
                }
                .into());
            }
            let reset = "attempts = 0, crashes = 0, run_at = 0, error = NULL, result_path = NULL, \
                         finished_at = NULL, claim_id = NULL, lease_until = NULL, \
                         updated_at = gpu_feeder_now($1)";
            if job.is_parent() {
                tx.execute(
                    &format!("UPDATE gpu_jobs SET status = 'pending', {reset} WHERE parent_id = $2 AND status IN ('failed', 'cancelled')"),
                    &[&at, &bytes(&id)],
                )
                .await?;
                tx.execute(
                    &format!("UPDATE gpu_jobs SET status = 'processing', {reset} WHERE id = $2"),
                    &[&at, &bytes(&id)],
                )
                .await?;
            } else {
                tx.execute(
                    &format!("UPDATE gpu_jobs SET status = 'pending', {reset} WHERE id = $2"),
                    &[&at, &bytes(&id)],
                )
                .await?;
            }
            let job = get_locked(&tx, id).await?;
            job
        })
    }

    async fn get(&self, id: JobId) -> StoreResult<Option<Job>> {
        run!(self, |c, _tries| {
            let st = c
                .prepare_cached("SELECT * FROM gpu_jobs WHERE id = $1")
                .await?;
            match c.query_opt(&st, &[&bytes(&id)]).await? {
                Some(row) => Ok(Some(job_from_row(&row)?)),
                None => Ok(None),
            }
        })
    }

    async fn list(&self, filter: &ListFilter) -> StoreResult<Vec<Job>> {
        let status = filter.status.map(|s| s.as_str());
        let model = filter.model_type.map(|m| m.as_str());
        let parent = filter.parent_id.map(|p| p.0.to_vec());
        let limit = filter.limit.min(i64::MAX as usize) as i64;
        let stuck = filter.lease_ended_before.is_some();
        let before = filter.lease_ended_before.and_then(|t| self.at(t));
        run!(self, |c, _tries| {
            let st = c
                .prepare_cached(
                    "SELECT * FROM gpu_jobs \
                      WHERE ($1::text IS NULL OR status = $1) \
                        AND ($2::text IS NULL OR model_type = $2) \
                        AND ($3::bytea IS NULL OR parent_id = $3) \
                        AND (NOT $5 OR (status = 'processing' \
                                        AND lease_until < gpu_feeder_now($6))) \
                      ORDER BY created_at DESC, seq DESC LIMIT $4",
                )
                .await?;
            let rows = c
                .query(&st, &[&status, &model, &parent, &limit, &stuck, &before])
                .await?;
            jobs(&rows)
        })
    }

    async fn stats(&self, now: Timestamp) -> StoreResult<QueueStats> {
        let at = self.at(now);
        run!(self, |c, _tries| {
            let st = c
                .prepare_cached(
                    "SELECT model_type, status, count(*), gpu_feeder_now($1) - min(created_at) \
                       FROM gpu_jobs GROUP BY model_type, status",
                )
                .await?;
            let rows = c.query(&st, &[&at]).await?;
            Ok(queue_stats(rows.iter().map(|row| {
                let age = row.get::<_, Option<f64>>(3);
                (
                    row.get(0),
                    row.get(1),
                    row.get::<_, i64>(2) as u64,
                    age.map(|a| Duration::from_millis((a.max(0.0) * 1000.0) as u64)),
                )
            })))
        })
    }

    async fn fragments(&self, parent: JobId) -> StoreResult<Vec<Job>> {
        run!(self, |c, _tries| {
            let st = c
                .prepare_cached(
                    "SELECT * FROM gpu_jobs WHERE parent_id = $1 ORDER BY fragment_index",
                )
                .await?;
            jobs(&c.query(&st, &[&bytes(&parent)]).await?)
        })
    }

    async fn ready_parents(&self, limit: usize) -> StoreResult<Vec<JobId>> {
        run!(self, |c, _tries| {
            let st = c.prepare_cached(READY_PARENTS).await?;
            Ok(ids(&c.query(&st, &[&(limit as i64)]).await?))
        })
    }

    async fn finish_parent(
        &self,
        id: JobId,
        outcome: ParentOutcome,
        now: Timestamp,
    ) -> StoreResult<bool> {
        let (status, result, error) = match &outcome {
            ParentOutcome::Done { result_path } => {
                (JobStatus::Done, Some(result_path.as_str()), None)
            }
            ParentOutcome::Failed { error } => (JobStatus::Failed, None, Some(error.as_str())),
        };
        let at = self.at(now);
        run!(self, |c, _tries| {
            // A conditional update: of hosts finishing one parent at once,
            // the first commits and the others find it no longer processing.
            let st = c.prepare_cached(FINISH_PARENT).await?;
            let n = c
                .execute(&st, &[&at, &bytes(&id), &status.as_str(), &result, &error])
                .await?;
            Ok(n == 1)
        })
    }

    async fn pending_follow_ups(&self, limit: usize) -> StoreResult<Vec<JobId>> {
        run!(self, |c, _tries| {
            let st = c.prepare_cached(PENDING_FOLLOW_UPS).await?;
            Ok(ids(&c.query(&st, &[&(limit as i64)]).await?))
        })
    }

    async fn change_token(&self) -> StoreResult<Option<i64>> {
        if self.ensure_listening() {
            // The first token counts from a connection that listens, so
            // that no commit after it goes unseen (the slow poll covers a
            // server that will not let it listen).
            let mut up = self.shared.up.subscribe();
            let _ = tokio::time::timeout(SLOW_POLL, up.wait_for(|up| *up)).await;
        }
        let listener = self.shared.listener.lock().await;
        match listener.as_ref().filter(|c| !c.is_closed()) {
            Some(client) => {
                // A round trip on the listening connection: notifications
                // sent before it arrive before its answer.
                if let Err(e) = client.simple_query("").await {
                    warn!(
                        "the listening connection to {}: {}",
                        self.shared.place,
                        pg_text(&e)
                    );
                }
            }
            None => {
                let mut last = self
                    .shared
                    .last_tick
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                if last.elapsed() >= SLOW_POLL {
                    *last = Instant::now();
                    self.shared.notified.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
        Ok(Some(self.shared.notified.load(Ordering::SeqCst)))
    }

    async fn ids_with_prefix(&self, prefix: &str, limit: usize) -> StoreResult<Vec<JobId>> {
        let prefix = prefix.to_ascii_lowercase();
        run!(self, |c, _tries| {
            let st = c
                .prepare_cached(
                    "SELECT id FROM gpu_jobs WHERE starts_with(encode(id, 'hex'), $1) LIMIT $2",
                )
                .await?;
            Ok(ids(&c.query(&st, &[&prefix, &(limit as i64)]).await?))
        })
    }

    async fn heartbeat(
        &self,
        daemon: &str,
        about: &serde_json::Value,
        timeout: Duration,
        now: Timestamp,
    ) -> StoreResult<()> {
        *self
            .shared
            .timeout
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = timeout;
        let at = self.at(now);
        let timeout_s = timeout.as_secs_f64();
        run!(self, |c, _tries| {
            let st = c.prepare_cached(HEARTBEAT).await?;
            c.execute(&st, &[&at, &daemon, about, &timeout_s]).await?;
            Ok(())
        })
    }

    async fn sign_off(&self, daemon: &str) -> StoreResult<()> {
        run!(self, |c, _tries| {
            c.execute("DELETE FROM gpu_daemons WHERE daemon_id = $1", &[&daemon])
                .await?;
            Ok(())
        })
    }

    async fn daemons(&self, now: Timestamp) -> StoreResult<Vec<DaemonInfo>> {
        let at = self.at(now);
        run!(self, |c, _tries| {
            let st = c
                .prepare_cached(
                    "SELECT daemon_id, about, started_at, gpu_feeder_now($1) - heartbeat_at, timeout_s \
                       FROM gpu_daemons ORDER BY daemon_id",
                )
                .await?;
            Ok(c.query(&st, &[&at])
                .await?
                .iter()
                .map(|r| DaemonInfo {
                    daemon_id: r.get(0),
                    about: r.get(1),
                    started_at: Timestamp::from_secs_f64(r.get(2)),
                    heartbeat_age: Duration::from_millis(
                        (r.get::<_, f64>(3).max(0.0) * 1000.0).round() as u64,
                    ),
                    timeout: Duration::from_secs_f64(r.get::<_, f64>(4).max(0.0)),
                })
                .collect())
        })
    }

    fn connection_problem(&self) -> Option<String> {
        let down = self.shared.down.lock().unwrap_or_else(|e| e.into_inner());
        down.as_ref().map(|(since, why)| {
            format!(
                "the PostgreSQL queue at {} has been unreachable for {:.0} s ({why}); reconnecting",
                self.shared.place,
                since.elapsed().as_secs_f64()
            )
        })
    }
}

async fn get_locked(tx: &Transaction<'_>, id: JobId) -> Op<Job> {
    let st = tx
        .prepare_cached("SELECT * FROM gpu_jobs WHERE id = $1 FOR UPDATE")
        .await?;
    match tx.query_opt(&st, &[&bytes(&id)]).await? {
        Some(row) => Ok(job_from_row(&row)?),
        None => Err(StoreError::NotFound(id).into()),
    }
}
