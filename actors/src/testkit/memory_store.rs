//! `MemoryStore`: the in-memory fake of the `JobStore` port, for
//! message-level tests. It runs the same contract suite as the SQLite
//! adapter, so it cannot drift from it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::job::{
    Claim, ClaimedJob, Completion, FailOutcome, Failure, Job, JobId, JobStatus, ListFilter,
    ModelStats, ModelType, NewJob, QueueStats, Submitted,
};
use crate::prefix::{self, Candidate, ClaimOrder};
use crate::store::{
    payload_columns, poison_error, run_now, settle_one, stale, stored_prefix_key, submit_in,
    submit_parent_in, Blocking, BlockingJobStore, ClaimRequest, JobStore, ParentOutcome, Placement,
    Settle, Settled, StoreError, StoreResult, SubmitTx, DEFAULT_MAX_ATTEMPTS,
};
use crate::time::Timestamp;

#[derive(Default)]
struct Inner {
    /// (insertion sequence, job), in insertion order.
    rows: Vec<(u64, Job)>,
    next_seq: u64,
    /// Write calls ("commits") made through every handle...
    commits: i64,
    /// ...and through each handle, by its connection number.
    own_commits: HashMap<u64, i64>,
    /// The number the next handle gets.
    next_conn: u64,
    /// The daemons registered: (id, about, started, last heartbeat, timeout).
    daemons: Vec<(String, serde_json::Value, Timestamp, Timestamp, Duration)>,
    /// Follow-ups refused because the job already has one (what SQLite's
    /// unique index on `follows` refuses).
    follow_ups_refused: usize,
}

/// An in-memory job store. Clones share the same jobs and are separate
/// connections to it, as handles on one database file are: the change token
/// of a handle moves only when *another* handle writes, as SQLite's
/// `PRAGMA data_version` does, so message-level tests get exactly the
/// wake-ups the daemon gets from SQLite.
#[derive(Default)]
pub struct MemoryStore {
    inner: Arc<Mutex<Inner>>,
    /// This handle's connection number.
    conn: u64,
}

impl Clone for MemoryStore {
    /// Another connection to the same jobs.
    fn clone(&self) -> Self {
        let mut inner = self.lock();
        inner.next_conn += 1;
        MemoryStore {
            inner: self.inner.clone(),
            conn: inner.next_conn,
        }
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Locks for a write, counted as a commit of this connection.
    fn write(&self) -> MutexGuard<'_, Inner> {
        let mut inner = self.lock();
        inner.commits += 1;
        *inner.own_commits.entry(self.conn).or_default() += 1;
        inner
    }

    /// Another connection to the same jobs, as the port the actors and
    /// frontends hold.
    pub fn connect(&self) -> Arc<dyn JobStore> {
        Blocking::port(Arc::new(self.clone()))
    }

    /// Every job, in insertion order (for assertions).
    pub fn all(&self) -> Vec<Job> {
        self.lock().rows.iter().map(|(_, j)| j.clone()).collect()
    }

    /// How many follow-ups were refused because their job already had one:
    /// zero when the code asks only once.
    pub fn follow_ups_refused(&self) -> usize {
        self.lock().follow_ups_refused
    }
}

impl Inner {
    fn find(&mut self, id: JobId) -> Option<&mut Job> {
        self.rows.iter_mut().map(|(_, j)| j).find(|j| j.id == id)
    }

    /// The ids of the first `limit` jobs, in insertion order, that `keep`
    /// accepts (it sees each job and all the rows).
    fn ids_where(&self, limit: usize, keep: impl Fn(&Job, &[(u64, Job)]) -> bool) -> Vec<JobId> {
        self.rows
            .iter()
            .map(|(_, j)| j)
            .filter(|j| keep(j, &self.rows))
            .take(limit)
            .map(|j| j.id)
            .collect()
    }

    fn current(&mut self, claim: &Claim) -> StoreResult<&mut Job> {
        match self.find(claim.job_id) {
            Some(j)
                if j.status == JobStatus::Processing
                    && j.claim_id.as_deref() == Some(claim.claim_id.as_str()) =>
            {
                Ok(j)
            }
            _ => Err(stale(claim)),
        }
    }

    fn insert(&mut self, new: &NewJob, to: Placement, now: Timestamp) -> Result<JobId, Box<Job>> {
        let fragment = to.fragment();
        let conflict = self.rows.iter().map(|(_, j)| j).find(|j| {
            if let Some(f) = new.follows {
                j.follows == Some(f)
            } else if let Some((parent, index, _)) = fragment {
                j.parent_id == Some(parent) && j.fragment_index == Some(index)
            } else {
                j.parent_id.is_none()
                    && j.follows.is_none()
                    && j.model_type == new.model_type
                    && j.payload_sha256 == new.payload_sha256
            }
        });
        if let Some(existing) = conflict {
            let existing = Box::new(existing.clone());
            if new.follows.is_some() {
                self.follow_ups_refused += 1;
            }
            return Err(existing);
        }
        let (payload_path, payload_inline) = payload_columns(new);
        let id = JobId::random();
        let job = Job {
            id,
            status: to.status(),
            model_type: new.model_type,
            priority: new.priority,
            attempts: 0,
            max_attempts: new.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS),
            crashes: 0,
            payload_sha256: new.payload_sha256.clone(),
            payload_path: payload_path.map(Into::into),
            payload_inline: payload_inline.map(Into::into),
            result_path: None,
            error: None,
            parent_id: fragment.map(|f| f.0),
            fragment_index: fragment.map(|f| f.1),
            total_fragments: to.total_fragments(),
            place: new.place,
            prefix_key: stored_prefix_key(new, fragment),
            follows: new.follows,
            then_model: new.then_model,
            prompt_tokens: None,
            completion_tokens: None,
            latency_ms: None,
            // Whole seconds, as the SQLite schema stores `created_at`.
            created_at: Timestamp(now.as_secs() * 1000),
            run_at: None,
            lease_until: None,
            claim_id: None,
            claimed_by: None,
            started_at: None,
            finished_at: None,
        };
        self.next_seq += 1;
        self.rows.push((self.next_seq, job));
        Ok(id)
    }

    /// A submission's view of the rows, at `now`.
    fn tx(&mut self, now: Timestamp) -> MemoryTx<'_> {
        MemoryTx {
            inner: self,
            now,
            conflict: None,
        }
    }
}

/// The rows as a submission writes them: the job an insert conflicted with
/// is kept for [`SubmitTx::existing`].
struct MemoryTx<'a> {
    inner: &'a mut Inner,
    now: Timestamp,
    conflict: Option<Box<Job>>,
}

impl SubmitTx for MemoryTx<'_> {
    type Error = StoreError;

    async fn insert(&mut self, job: &NewJob, to: Placement) -> StoreResult<Option<JobId>> {
        match self.inner.insert(job, to, self.now) {
            Ok(id) => Ok(Some(id)),
            Err(existing) => {
                self.conflict = Some(existing);
                Ok(None)
            }
        }
    }

    async fn existing(&mut self, _job: &NewJob) -> StoreResult<Job> {
        Ok(*self.conflict.take().expect("an insert conflicted"))
    }
}

fn to_pending(j: &mut Job) {
    j.status = JobStatus::Pending;
    j.claim_id = None;
    j.lease_until = None;
}

impl BlockingJobStore for MemoryStore {
    fn submit(&self, job: NewJob, now: Timestamp) -> StoreResult<Submitted> {
        run_now(submit_in(&mut self.write().tx(now), &job))
    }

    fn submit_batch(&self, jobs: Vec<NewJob>, now: Timestamp) -> StoreResult<Vec<Submitted>> {
        let mut inner = self.write();
        let mut tx = inner.tx(now);
        jobs.iter()
            .map(|j| run_now(submit_in(&mut tx, j)))
            .collect()
    }

    fn submit_parent(
        &self,
        parent: NewJob,
        fragments: Vec<NewJob>,
        now: Timestamp,
    ) -> StoreResult<Submitted> {
        run_now(submit_parent_in(
            &mut self.write().tx(now),
            &parent,
            &fragments,
        ))
    }

    fn claim_with(&self, want: &ClaimRequest, now: Timestamp) -> StoreResult<Vec<ClaimedJob>> {
        let (model, n, lease) = (want.model, want.n, want.lease);
        let (owner, order) = (want.owner.as_str(), &want.order);
        let mut inner = self.write();
        let mut due: Vec<(i64, Timestamp, u64, JobId)> = inner
            .rows
            .iter()
            .filter(|(_, j)| {
                j.status == JobStatus::Pending
                    && j.model_type == model
                    && j.run_at.is_none_or(|r| r <= now)
            })
            .map(|(seq, j)| (-j.priority, j.created_at, *seq, j.id))
            .collect();
        due.sort();
        let candidates: Vec<(i64, Timestamp, u64, JobId)> = match order {
            ClaimOrder::Plain => due.into_iter().take(n).collect(),
            ClaimOrder::Grouped(grouping) => {
                // As the SQLite adapter reads them: the oldest due jobs,
                // and every due job of a warm key.
                let keys: HashMap<JobId, Option<String>> = inner
                    .rows
                    .iter()
                    .map(|(_, j)| (j.id, j.prefix_key.clone()))
                    .collect();
                let reach = prefix::lookahead(n);
                let read: Vec<Candidate> = due
                    .iter()
                    .enumerate()
                    .filter(|(i, d)| {
                        *i < reach
                            || keys[&d.3]
                                .as_ref()
                                .is_some_and(|k| grouping.warm.contains(k))
                    })
                    .map(|(_, d)| Candidate {
                        seq: d.2 as i64,
                        priority: -d.0,
                        created_at: d.1,
                        key: keys[&d.3].clone(),
                    })
                    .collect();
                let by_seq: HashMap<u64, (i64, Timestamp, u64, JobId)> =
                    due.iter().map(|d| (d.2, *d)).collect();
                prefix::pick(&read, n, grouping, now)
                    .into_iter()
                    .map(|i| by_seq[&(read[i].seq as u64)])
                    .collect()
            }
        };
        if candidates.is_empty() {
            return Ok(Vec::new());
        }
        let claim_id = hex::encode(rand::random::<[u8; 12]>());
        let mut out = Vec::new();
        for (_, _, _, id) in candidates {
            let j = inner.find(id).expect("candidate exists");
            j.status = JobStatus::Processing;
            j.claim_id = Some(claim_id.clone());
            j.claimed_by = Some(owner.to_string());
            j.lease_until = Some(now + lease);
            j.started_at = Some(now);
            out.push(ClaimedJob {
                job: j.clone(),
                claim: Claim {
                    job_id: id,
                    claim_id: claim_id.clone(),
                },
            });
        }
        Ok(out)
    }

    fn complete(&self, claim: &Claim, done: Completion, now: Timestamp) -> StoreResult<()> {
        let mut inner = self.write();
        let j = inner.current(claim)?;
        j.status = JobStatus::Done;
        j.result_path = Some(done.result_path);
        j.prompt_tokens = done.prompt_tokens;
        j.completion_tokens = done.completion_tokens;
        j.latency_ms = Some(done.latency.as_millis() as u64);
        j.attempts += 1;
        j.error = None;
        j.claim_id = None;
        j.lease_until = None;
        j.finished_at = Some(now);
        Ok(())
    }

    fn settle_batch(
        &self,
        items: Vec<(Claim, Settle)>,
        now: Timestamp,
    ) -> StoreResult<Vec<StoreResult<Settled>>> {
        Ok(items
            .into_iter()
            .map(|(claim, settle)| settle_one(self, &claim, settle, now))
            .collect())
    }

    fn fail(&self, claim: &Claim, failure: Failure, now: Timestamp) -> StoreResult<FailOutcome> {
        let mut inner = self.write();
        let j = inner.current(claim)?;
        j.attempts += 1;
        j.error = Some(failure.message);
        j.claim_id = None;
        j.lease_until = None;
        let outcome = match failure.retry_after {
            Some(delay) if j.attempts < j.max_attempts => {
                j.status = JobStatus::Pending;
                j.run_at = Some(now + delay);
                FailOutcome::Retrying {
                    run_at: now + delay,
                    attempts: j.attempts,
                }
            }
            _ => {
                j.status = JobStatus::Failed;
                j.finished_at = Some(now);
                FailOutcome::Failed {
                    attempts: j.attempts,
                }
            }
        };
        Ok(outcome)
    }

    fn release(&self, claim: &Claim, _now: Timestamp) -> StoreResult<()> {
        let mut inner = self.write();
        to_pending(inner.current(claim)?);
        Ok(())
    }

    fn release_crashed(
        &self,
        claim: &Claim,
        instance: &str,
        limit: u32,
        now: Timestamp,
    ) -> StoreResult<Settled> {
        let mut inner = self.write();
        let j = inner.current(claim)?;
        j.crashes += 1;
        let out = if j.crashes >= limit {
            j.status = JobStatus::Failed;
            j.error = Some(poison_error(j.crashes, instance));
            j.finished_at = Some(now);
            j.claim_id = None;
            j.lease_until = None;
            Settled::Failed(FailOutcome::Failed {
                attempts: j.attempts,
            })
        } else {
            to_pending(j);
            Settled::Released
        };
        Ok(out)
    }

    fn reclaim_expired(&self, now: Timestamp) -> StoreResult<u64> {
        let mut inner = self.write();
        let mut n = 0;
        let (dead, alive): (Vec<_>, Vec<_>) = std::mem::take(&mut inner.daemons)
            .into_iter()
            .partition(|d| now.since(d.3) > d.4);
        inner.daemons = alive;
        let silent = |by: Option<&str>| {
            by.is_some_and(|by| {
                dead.iter().any(|d| {
                    by == d.0
                        || by
                            .strip_prefix(d.0.as_str())
                            .is_some_and(|r| r.starts_with('/'))
                })
            })
        };
        for (_, j) in inner.rows.iter_mut() {
            let taken = j.lease_until.is_some() && silent(j.claimed_by.as_deref());
            if j.status == JobStatus::Processing
                && (j.lease_until.is_some_and(|l| l < now) || taken)
            {
                to_pending(j);
                n += 1;
            }
        }
        Ok(n)
    }

    fn release_owner(&self, owner: &str, _now: Timestamp) -> StoreResult<u64> {
        let mut inner = self.write();
        let below = format!("{owner}/");
        let mut n = 0;
        for (_, j) in inner.rows.iter_mut() {
            let mine = j
                .claimed_by
                .as_deref()
                .is_some_and(|by| by == owner || by.starts_with(&below));
            if j.status == JobStatus::Processing && j.lease_until.is_some() && mine {
                to_pending(j);
                n += 1;
            }
        }
        Ok(n)
    }

    fn cancel(&self, id: JobId, now: Timestamp) -> StoreResult<Job> {
        let mut inner = self.write();
        let status = inner.find(id).ok_or(StoreError::NotFound(id))?.status;
        if status.is_terminal() {
            return Err(StoreError::InvalidState {
                id,
                status,
                hint: "only pending or processing jobs can be cancelled",
            });
        }
        for (_, j) in inner.rows.iter_mut() {
            let target = j.id == id || j.parent_id == Some(id);
            if target && matches!(j.status, JobStatus::Pending | JobStatus::Processing) {
                j.status = JobStatus::Cancelled;
                j.claim_id = None;
                j.lease_until = None;
                j.finished_at = Some(now);
            }
        }
        Ok(inner.find(id).expect("exists").clone())
    }

    fn retry(&self, id: JobId, _now: Timestamp) -> StoreResult<Job> {
        let mut inner = self.write();
        let job = inner.find(id).ok_or(StoreError::NotFound(id))?.clone();
        if !matches!(job.status, JobStatus::Failed | JobStatus::Cancelled) {
            return Err(StoreError::InvalidState {
                id,
                status: job.status,
                hint: "only failed or cancelled jobs can be retried",
            });
        }
        let reset = |j: &mut Job, status: JobStatus| {
            j.status = status;
            j.attempts = 0;
            j.crashes = 0;
            j.run_at = None;
            j.error = None;
            j.result_path = None;
            j.finished_at = None;
            j.claim_id = None;
            j.lease_until = None;
        };
        for (_, j) in inner.rows.iter_mut() {
            if j.id == id {
                let status = if job.is_parent() {
                    JobStatus::Processing
                } else {
                    JobStatus::Pending
                };
                reset(j, status);
            } else if job.is_parent()
                && j.parent_id == Some(id)
                && matches!(j.status, JobStatus::Failed | JobStatus::Cancelled)
            {
                reset(j, JobStatus::Pending);
            }
        }
        Ok(inner.find(id).expect("exists").clone())
    }

    fn get(&self, id: JobId) -> StoreResult<Option<Job>> {
        Ok(self.lock().find(id).cloned())
    }

    fn list(&self, filter: &ListFilter) -> StoreResult<Vec<Job>> {
        let inner = self.lock();
        let mut rows: Vec<&(u64, Job)> = inner
            .rows
            .iter()
            .filter(|(_, j)| {
                filter.status.is_none_or(|s| j.status == s)
                    && filter.model_type.is_none_or(|m| j.model_type == m)
                    && filter.parent_id.is_none_or(|p| j.parent_id == Some(p))
                    && filter.lease_ended_before.is_none_or(|t| {
                        j.status == JobStatus::Processing && j.lease_until.is_some_and(|l| l < t)
                    })
            })
            .collect();
        rows.sort_by(|(sa, a), (sb, b)| b.created_at.cmp(&a.created_at).then(sb.cmp(sa)));
        Ok(rows
            .into_iter()
            .take(filter.limit)
            .map(|(_, j)| j.clone())
            .collect())
    }

    fn stats(&self, now: Timestamp) -> StoreResult<QueueStats> {
        let inner = self.lock();
        let models = ModelType::ALL
            .into_iter()
            .map(|m| {
                let mut s = ModelStats::default();
                let mut oldest: Option<Timestamp> = None;
                for (_, j) in inner.rows.iter().filter(|(_, j)| j.model_type == m) {
                    *s.counts.get_mut(j.status) += 1;
                    if j.status == JobStatus::Pending {
                        oldest = Some(oldest.map_or(j.created_at, |o| o.min(j.created_at)));
                    }
                }
                s.oldest_pending_age = oldest.map(|o| now.since(o));
                (m, s)
            })
            .collect();
        Ok(QueueStats { models })
    }

    fn fragments(&self, parent: JobId) -> StoreResult<Vec<Job>> {
        let inner = self.lock();
        let mut out: Vec<Job> = inner
            .rows
            .iter()
            .filter(|(_, j)| j.parent_id == Some(parent))
            .map(|(_, j)| j.clone())
            .collect();
        out.sort_by_key(|j| j.fragment_index);
        Ok(out)
    }

    fn ready_parents(&self, limit: usize) -> StoreResult<Vec<JobId>> {
        Ok(self.lock().ids_where(limit, |p, rows| {
            p.is_parent()
                && p.status == JobStatus::Processing
                && !rows.iter().any(|(_, f)| {
                    f.parent_id == Some(p.id)
                        && matches!(f.status, JobStatus::Pending | JobStatus::Processing)
                })
        }))
    }

    fn finish_parent(
        &self,
        id: JobId,
        outcome: ParentOutcome,
        now: Timestamp,
    ) -> StoreResult<bool> {
        let mut inner = self.write();
        let Some(p) = inner.find(id) else {
            return Ok(false);
        };
        if !(p.is_parent() && p.status == JobStatus::Processing) {
            return Ok(false);
        }
        match outcome {
            ParentOutcome::Done { result_path } => {
                p.status = JobStatus::Done;
                p.result_path = Some(result_path);
            }
            ParentOutcome::Failed { error } => {
                p.status = JobStatus::Failed;
                p.error = Some(error);
            }
        }
        p.attempts += 1;
        p.finished_at = Some(now);
        Ok(true)
    }

    fn pending_follow_ups(&self, limit: usize) -> StoreResult<Vec<JobId>> {
        Ok(self.lock().ids_where(limit, |j, rows| {
            j.status == JobStatus::Done
                && j.then_model.is_some()
                && !rows.iter().any(|(_, f)| f.follows == Some(j.id))
        }))
    }

    fn next_due(&self, model: ModelType, now: Timestamp) -> StoreResult<Option<Timestamp>> {
        Ok(self
            .lock()
            .rows
            .iter()
            .map(|(_, j)| j)
            .filter(|j| j.status == JobStatus::Pending && j.model_type == model)
            .filter_map(|j| j.run_at.filter(|r| *r > now))
            .min())
    }

    fn heartbeat(
        &self,
        daemon: &str,
        about: &serde_json::Value,
        timeout: Duration,
        now: Timestamp,
    ) -> StoreResult<()> {
        let mut inner = self.write();
        match inner.daemons.iter_mut().find(|d| d.0 == daemon) {
            Some(d) => {
                if d.1 != *about {
                    d.2 = now;
                }
                d.1 = about.clone();
                d.3 = now;
                d.4 = timeout;
            }
            None => inner
                .daemons
                .push((daemon.to_string(), about.clone(), now, now, timeout)),
        }
        inner.daemons.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(())
    }

    fn sign_off(&self, daemon: &str) -> StoreResult<()> {
        self.write().daemons.retain(|d| d.0 != daemon);
        Ok(())
    }

    fn daemons(&self, now: Timestamp) -> StoreResult<Vec<crate::store::DaemonInfo>> {
        Ok(self
            .lock()
            .daemons
            .iter()
            .map(|d| crate::store::DaemonInfo {
                daemon_id: d.0.clone(),
                about: d.1.clone(),
                started_at: d.2,
                heartbeat_age: now.since(d.3),
                timeout: d.4,
            })
            .collect())
    }

    fn ids_with_prefix(&self, prefix: &str, limit: usize) -> StoreResult<Vec<JobId>> {
        Ok(self
            .lock()
            .rows
            .iter()
            .map(|(_, j)| j.id)
            .filter(|id| id.to_hex().starts_with(prefix))
            .take(limit)
            .collect())
    }

    fn change_token(&self) -> StoreResult<Option<i64>> {
        let inner = self.lock();
        let own = inner.own_commits.get(&self.conn).copied().unwrap_or(0);
        Ok(Some(inner.commits - own))
    }
}
