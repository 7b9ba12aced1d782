//! The `JobStore` port over SQLite (as a `BlockingJobStore`): each write one
//! `BEGIN IMMEDIATE` transaction on the store's connection.

use std::time::Duration;

use rusqlite::{named_params, Connection, OptionalExtension, Transaction};

use feeder_actors::prefix::{self, Candidate, ClaimOrder, Grouping};
use feeder_actors::store::{in_claim_order, run_now, submit_in, submit_parent_in, ClaimRequest};
use feeder_actors::{
    BlockingJobStore, Claim, ClaimedJob, Completion, DaemonInfo, FailOutcome, Failure, Job, JobId,
    JobStatus, ListFilter, ModelType, NewJob, ParentOutcome, QueueStats, Settle, Settled,
    StoreError, StoreResult, Submitted, Timestamp,
};

use super::rows::{job_from_mapped_row, job_from_row, secs, ColumnMap, Db};
use super::settle::{complete_in, crashed_in, fail_in, release_in};
use super::submit::SqliteTx;
use super::*;
use crate::store::shared::queue_stats;

/// A claimed row: its rowid, and the job it holds.
type Claimed = (i64, StoreResult<Job>);

/// Runs a claiming `UPDATE … RETURNING rowid AS seq, *`: the rows it
/// claimed, each with its rowid.
fn claimed(
    tx: &Transaction<'_>,
    sql: &str,
    params: &[(&str, &dyn rusqlite::ToSql)],
) -> StoreResult<Vec<Claimed>> {
    let mut stmt = tx.prepare_cached(sql).db()?;
    let cols = ColumnMap::of(&stmt);
    let seq = cols.index("seq").expect("claims return rowid AS seq");
    let rows = stmt
        .query_map(params, |r| {
            Ok((r.get::<_, i64>(seq)?, job_from_mapped_row(r, &cols)?))
        })
        .db()?
        .collect::<Result<Vec<_>, _>>()
        .db()?;
    Ok(rows)
}

/// A grouped claim inside `tx`: reads the candidates, picks with
/// [`prefix::pick`], claims those rows; they come back with their rowids,
/// and the rowids in the order picked.
#[allow(clippy::too_many_arguments)]
fn claim_grouped(
    tx: &Transaction<'_>,
    model: ModelType,
    n: usize,
    lease: Duration,
    owner: &str,
    now: Timestamp,
    grouping: &Grouping,
    claim_id: &str,
) -> StoreResult<(Vec<Claimed>, Vec<i64>)> {
    let warm = serde_json::to_string(&grouping.warm).expect("strings serialize");
    let mut stmt = tx.prepare_cached(CLAIM_CANDIDATES).db()?;
    let cols = ColumnMap::of(&stmt);
    let col = |name: &str| cols.index(name).expect("claim_candidates.sql names it");
    let (seq, priority, created_at, key) = (
        col("seq"),
        col("priority"),
        col("created_at"),
        col("prefix_key"),
    );
    let mut cands = stmt
        .query_map(
            named_params! {
                ":model": model.as_str(),
                ":now": secs(now),
                ":lookahead": prefix::lookahead(n) as i64,
                ":warm": warm,
            },
            |r| {
                Ok(Candidate {
                    seq: r.get(seq)?,
                    priority: r.get(priority)?,
                    created_at: Timestamp::from_secs_f64(r.get(created_at)?),
                    key: r.get(key)?,
                })
            },
        )
        .db()?
        .collect::<Result<Vec<Candidate>, _>>()
        .db()?;
    // A due job of a warm key among the oldest comes from both halves of
    // the query: once is enough.
    cands.sort_unstable_by_key(|c| c.seq);
    cands.dedup_by_key(|c| c.seq);
    let picked = prefix::pick(&cands, n, grouping, now);
    if picked.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    let rowids: Vec<i64> = picked.iter().map(|&i| cands[i].seq).collect();
    let rows = claimed(
        tx,
        CLAIM_ROWS,
        named_params! {
            ":claim_id": claim_id,
            ":owner": owner,
            ":lease_until": secs(now + lease),
            ":now": secs(now),
            ":rowids": serde_json::to_string(&rowids).expect("numbers serialize"),
        },
    )?;
    Ok((rows, rowids))
}

fn get_in(conn: &Connection, id: JobId) -> StoreResult<Option<Job>> {
    conn.query_row(&format!("{SELECT_JOB} WHERE id = ?1"), [id.0], job_from_row)
        .optional()
        .db()?
        .transpose()
}

impl BlockingJobStore for SqliteStore {
    fn submit(&self, job: NewJob, now: Timestamp) -> StoreResult<Submitted> {
        self.write(|tx| run_now(submit_in(&mut SqliteTx { tx, now }, &job)))
    }

    fn ids_with_prefix(&self, prefix: &str, limit: usize) -> StoreResult<Vec<JobId>> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare_cached("SELECT id FROM gpu_jobs WHERE hex(id) LIKE ?1 || '%' LIMIT ?2")
            .db()?;
        let ids: Vec<Vec<u8>> = stmt
            .query_map(
                rusqlite::params![prefix.to_ascii_uppercase(), limit as i64],
                |r| r.get(0),
            )
            .db()?
            .collect::<Result<_, _>>()
            .db()?;
        ids.iter()
            .map(|one| {
                JobId::from_slice(one).ok_or_else(|| StoreError::Corrupt {
                    id: hex::encode(one),
                    reason: "id is not 16 bytes".into(),
                })
            })
            .collect()
    }

    fn submit_batch(&self, jobs: Vec<NewJob>, now: Timestamp) -> StoreResult<Vec<Submitted>> {
        self.write(|tx| {
            let mut tx = SqliteTx { tx, now };
            jobs.iter()
                .map(|j| run_now(submit_in(&mut tx, j)))
                .collect()
        })
    }

    fn submit_parent(
        &self,
        parent: NewJob,
        fragments: Vec<NewJob>,
        now: Timestamp,
    ) -> StoreResult<Submitted> {
        self.write(|tx| {
            run_now(submit_parent_in(
                &mut SqliteTx { tx, now },
                &parent,
                &fragments,
            ))
        })
    }

    fn claim_with(&self, want: &ClaimRequest, now: Timestamp) -> StoreResult<Vec<ClaimedJob>> {
        let (model, n, lease) = (want.model, want.n, want.lease);
        let (owner, order) = (want.owner.as_str(), &want.order);
        if n == 0 {
            return Ok(Vec::new());
        }
        let claim_id = hex::encode(rand::random::<[u8; 12]>());
        let (rows, picked) = self.write(|tx| match order {
            ClaimOrder::Plain => claimed(
                tx,
                CLAIM,
                named_params! {
                    ":claim_id": claim_id,
                    ":owner": owner,
                    ":lease_until": secs(now + lease),
                    ":now": secs(now),
                    ":model": model.as_str(),
                    ":n": n as i64,
                },
            )
            .map(|rows| (rows, None)),
            ClaimOrder::Grouped(grouping) => {
                claim_grouped(tx, model, n, lease, owner, now, grouping, &claim_id)
                    .map(|(rows, picked)| (rows, Some(picked)))
            }
        })?;
        let rows = rows
            .into_iter()
            .map(|(seq, job)| Ok((seq, job?)))
            .collect::<StoreResult<Vec<_>>>()?;
        Ok(in_claim_order(rows, picked.as_deref(), &claim_id))
    }

    fn complete(&self, claim: &Claim, done: Completion, now: Timestamp) -> StoreResult<()> {
        self.write(|tx| complete_in(tx, claim, &done, now))
    }

    fn settle_batch(
        &self,
        items: Vec<(Claim, Settle)>,
        now: Timestamp,
    ) -> StoreResult<Vec<StoreResult<Settled>>> {
        self.write(|tx| {
            Ok(items
                .into_iter()
                .map(|(claim, settle)| match settle {
                    Settle::Complete(done) => {
                        complete_in(tx, &claim, &done, now).map(|()| Settled::Done)
                    }
                    Settle::Fail(failure) => fail_in(tx, &claim, failure, now).map(Settled::Failed),
                    Settle::Release => release_in(tx, &claim, now).map(|()| Settled::Released),
                    Settle::Crashed { instance, limit } => {
                        crashed_in(tx, &claim, &instance, limit, now)
                    }
                })
                .collect())
        })
    }

    fn fail(&self, claim: &Claim, failure: Failure, now: Timestamp) -> StoreResult<FailOutcome> {
        self.write(|tx| fail_in(tx, claim, failure, now))
    }

    fn release(&self, claim: &Claim, now: Timestamp) -> StoreResult<()> {
        self.write(|tx| release_in(tx, claim, now))
    }

    fn release_crashed(
        &self,
        claim: &Claim,
        instance: &str,
        limit: u32,
        now: Timestamp,
    ) -> StoreResult<Settled> {
        self.write(|tx| crashed_in(tx, claim, instance, limit, now))
    }

    fn next_due(&self, model: ModelType, now: Timestamp) -> StoreResult<Option<Timestamp>> {
        let conn = self.lock();
        let mut stmt = conn.prepare_cached(NEXT_DUE).db()?;
        stmt.query_row(
            named_params! { ":model": model.as_str(), ":now": secs(now) },
            |r| r.get::<_, f64>(0),
        )
        .optional()
        .db()
        .map(|t| t.map(Timestamp::from_secs_f64))
    }

    fn reclaim_expired(&self, now: Timestamp) -> StoreResult<u64> {
        self.write(|tx| {
            let mut n = tx
                .prepare_cached(RECLAIM)
                .db()?
                .execute(named_params! { ":now": secs(now) })
                .db()?;
            // Daemons silent past their timeout: their claims go back.
            let dead: Vec<(String, f64)> = tx
                .prepare_cached(
                    "DELETE FROM gpu_daemons WHERE heartbeat_at < :now - timeout_s \
                     RETURNING daemon_id, :now - heartbeat_at",
                )
                .db()?
                .query_map(named_params! { ":now": secs(now) }, |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
                .db()?
                .collect::<Result<_, _>>()
                .db()?;
            for (daemon, silent) in dead {
                let taken = tx
                    .prepare_cached(RELEASE_OWNER)
                    .db()?
                    .execute(named_params! { ":owner": daemon, ":now": secs(now) })
                    .db()?;
                if taken > 0 {
                    tracing::warn!(
                        "daemon {daemon} has been silent for {silent:.1} s, past its heartbeat timeout: its {taken} claims go back to pending"
                    );
                }
                n += taken;
            }
            Ok(n as u64)
        })
    }

    fn release_owner(&self, owner: &str, now: Timestamp) -> StoreResult<u64> {
        self.write(|tx| {
            let n = tx
                .prepare_cached(RELEASE_OWNER)
                .db()?
                .execute(named_params! { ":owner": owner, ":now": secs(now) })
                .db()?;
            Ok(n as u64)
        })
    }

    fn cancel(&self, id: JobId, now: Timestamp) -> StoreResult<Job> {
        self.write(|tx| {
            let job = get_in(tx, id)?.ok_or(StoreError::NotFound(id))?;
            if job.status.is_terminal() {
                return Err(StoreError::InvalidState {
                    id,
                    status: job.status,
                    hint: "only pending or processing jobs can be cancelled",
                });
            }
            let sql =
                "UPDATE gpu_jobs SET status = 'cancelled', claim_id = NULL, lease_until = NULL, \
                       finished_at = ?2, updated_at = ?2 \
                       WHERE (id = ?1 OR parent_id = ?1) AND status IN ('pending', 'processing')";
            tx.execute(sql, rusqlite::params![id.0, secs(now)]).db()?;
            get_in(tx, id)?.ok_or(StoreError::NotFound(id))
        })
    }

    fn retry(&self, id: JobId, now: Timestamp) -> StoreResult<Job> {
        self.write(|tx| {
            let job = get_in(tx, id)?.ok_or(StoreError::NotFound(id))?;
            if !matches!(job.status, JobStatus::Failed | JobStatus::Cancelled) {
                return Err(StoreError::InvalidState {
                    id,
                    status: job.status,
                    hint: "only failed or cancelled jobs can be retried",
                });
            }
            let reset = "attempts = 0, crashes = 0, run_at = 0, error = NULL, result_path = NULL, \
                         finished_at = NULL, claim_id = NULL, lease_until = NULL, updated_at = ?2";
            if job.is_parent() {
                tx.execute(
                    &format!("UPDATE gpu_jobs SET status = 'pending', {reset} WHERE parent_id = ?1 AND status IN ('failed', 'cancelled')"),
                    rusqlite::params![id.0, secs(now)],
                )
                .db()?;
                tx.execute(
                    &format!("UPDATE gpu_jobs SET status = 'processing', {reset} WHERE id = ?1"),
                    rusqlite::params![id.0, secs(now)],
                )
                .db()?;
            } else {
                tx.execute(
                    &format!("UPDATE gpu_jobs SET status = 'pending', {reset} WHERE id = ?1"),
                    rusqlite::params![id.0, secs(now)],
                )
                .db()?;
            }
            get_in(tx, id)?.ok_or(StoreError::NotFound(id))
        })
    }

    fn get(&self, id: JobId) -> StoreResult<Option<Job>> {
        get_in(&self.lock(), id)
    }

    fn list(&self, filter: &ListFilter) -> StoreResult<Vec<Job>> {
        let mut sql = String::from(SELECT_JOB);
        let mut args: Vec<rusqlite::types::Value> = Vec::new();
        let mut clauses = Vec::new();
        if let Some(st) = filter.status {
            clauses.push("status = ?");
            args.push(st.as_str().to_string().into());
        }
        if let Some(m) = filter.model_type {
            clauses.push("model_type = ?");
            args.push(m.as_str().to_string().into());
        }
        if let Some(p) = filter.parent_id {
            clauses.push("parent_id = ?");
            args.push(p.0.to_vec().into());
        }
        if let Some(t) = filter.lease_ended_before {
            clauses.push("status = 'processing' AND lease_until < ?");
            args.push(secs(t).into());
        }
        if !clauses.is_empty() {
            sql.push_str(" WHERE ");
            sql.push_str(&clauses.join(" AND "));
        }
        sql.push_str(" ORDER BY created_at DESC, rowid DESC LIMIT ?");
        args.push((filter.limit.min(i64::MAX as usize) as i64).into());
        let conn = self.lock();
        let mut stmt = conn.prepare_cached(&sql).db()?;
        let rows = stmt
            .query_map(rusqlite::params_from_iter(args), job_from_row)
            .db()?
            .collect::<Result<Vec<_>, _>>()
            .db()?;
        rows.into_iter().collect()
    }

    fn stats(&self, now: Timestamp) -> StoreResult<QueueStats> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare_cached(
                "SELECT model_type, status, COUNT(*), MIN(created_at) \
                 FROM gpu_jobs GROUP BY model_type, status",
            )
            .db()?;
        let groups = stmt
            .query_map([], |r| <(String, String, u64, Option<f64>)>::try_from(r))
            .db()?
            .map(|row| {
                let (model, status, count, oldest) = row.db()?;
                let age = oldest.map(|o| now.since(Timestamp::from_secs_f64(o)));
                Ok((model, status, count, age))
            })
            .collect::<StoreResult<Vec<_>>>()?;
        Ok(queue_stats(groups))
    }

    fn fragments(&self, parent: JobId) -> StoreResult<Vec<Job>> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare_cached(&format!(
                "{SELECT_JOB} WHERE parent_id = ?1 ORDER BY fragment_index"
            ))
            .db()?;
        let rows = stmt
            .query_map([parent.0], job_from_row)
            .db()?
            .collect::<Result<Vec<_>, _>>()
            .db()?;
        rows.into_iter().collect()
    }

    fn ready_parents(&self, limit: usize) -> StoreResult<Vec<JobId>> {
        self.ids(READY_PARENTS, limit)
    }

    fn finish_parent(
        &self,
        id: JobId,
        outcome: ParentOutcome,
        now: Timestamp,
    ) -> StoreResult<bool> {
        let (status, result_path, error) = match outcome {
            ParentOutcome::Done { result_path } => (
                JobStatus::Done,
                Some(result_path.as_str().to_string()),
                None,
            ),
            ParentOutcome::Failed { error } => (JobStatus::Failed, None, Some(error)),
        };
        self.write(|tx| {
            let n = tx
                .prepare_cached(FINISH_PARENT)
                .db()?
                .execute(named_params! {
                    ":id": id.0,
                    ":status": status.as_str(),
                    ":result_path": result_path,
                    ":error": error,
                    ":now": secs(now),
                })
                .db()?;
            Ok(n == 1)
        })
    }

    fn change_token(&self) -> StoreResult<Option<i64>> {
        self.data_version().map(Some)
    }

    fn pending_follow_ups(&self, limit: usize) -> StoreResult<Vec<JobId>> {
        self.ids(PENDING_FOLLOW_UPS, limit)
    }

    fn heartbeat(
        &self,
        daemon: &str,
        about: &serde_json::Value,
        timeout: Duration,
        now: Timestamp,
    ) -> StoreResult<()> {
        self.write(|tx| {
            tx.prepare_cached(HEARTBEAT)
                .db()?
                .execute(named_params! {
                    ":daemon": daemon,
                    ":about": about.to_string(),
                    ":timeout": timeout.as_secs_f64(),
                    ":now": secs(now),
                })
                .db()?;
            Ok(())
        })
    }

    fn sign_off(&self, daemon: &str) -> StoreResult<()> {
        self.write(|tx| {
            tx.execute("DELETE FROM gpu_daemons WHERE daemon_id = ?1", [daemon])
                .db()?;
            Ok(())
        })
    }

    fn daemons(&self, now: Timestamp) -> StoreResult<Vec<DaemonInfo>> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare_cached(
                "SELECT daemon_id, about, started_at, heartbeat_at, timeout_s \
                 FROM gpu_daemons ORDER BY daemon_id",
            )
            .db()?;
        let rows = stmt
            .query_map([], |r| <(String, String, f64, f64, f64)>::try_from(r))
            .db()?
            .collect::<Result<Vec<_>, _>>()
            .db()?;
        Ok(rows
            .into_iter()
            .map(|(daemon_id, about, started, beat, timeout)| DaemonInfo {
                daemon_id,
                about: serde_json::from_str(&about).unwrap_or(serde_json::Value::Null),
                started_at: Timestamp::from_secs_f64(started),
                heartbeat_age: now.since(Timestamp::from_secs_f64(beat)),
                timeout: Duration::from_secs_f64(timeout.max(0.0)),
            })
            .collect())
    }
}
