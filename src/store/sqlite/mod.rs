//! The SQLite adapter of the `JobStore` port.
//!
//! One file, shared with other programs: WAL journal, `synchronous=NORMAL`,
//! a busy timeout, and `BEGIN IMMEDIATE` for every write, so that writers
//! queue for the lock instead of failing. The queries that matter are in
//! `src/store/sqlite/sql/`, one file each.

pub mod migrate;
mod rows;

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{named_params, Connection, OptionalExtension, Transaction, TransactionBehavior};

use anyhow::Context as _;
use feeder_actors::{
    Blocking, BlockingJobStore, Claim, ClaimedJob, Completion, DaemonInfo, FailOutcome, Failure,
    Job, JobId, JobStatus, JobStore, ListFilter, ModelStats, ModelType, NewJob, ParentOutcome,
    QueueStats, Settle, Settled, StoreError, StoreResult, Submitted, Timestamp,
    DEFAULT_MAX_ATTEMPTS,
};

use feeder_actors::prefix::{self, Candidate, ClaimOrder, Grouping};
use feeder_actors::store::{fragment_count, poison_error};

pub use migrate::{full_schema, latest_version};

use super::migration::MigrationReport;
use rows::{job_from_row, secs, Db};

const CLAIM: &str = include_str!("sql/claim.sql");
const CLAIM_CANDIDATES: &str = include_str!("sql/claim_candidates.sql");
const CLAIM_ROWS: &str = include_str!("sql/claim_rows.sql");
const COMPLETE: &str = include_str!("sql/complete.sql");
const FAIL: &str = include_str!("sql/fail.sql");
const RELEASE: &str = include_str!("sql/release.sql");
const CRASHED: &str = include_str!("sql/crashed.sql");
const RECLAIM: &str = include_str!("sql/reclaim.sql");
const RELEASE_OWNER: &str = include_str!("sql/release_owner.sql");
const INSERT: &str = include_str!("sql/insert.sql");
const READY_PARENTS: &str = include_str!("sql/ready_parents.sql");
const FINISH_PARENT: &str = include_str!("sql/finish_parent.sql");
const PENDING_FOLLOW_UPS: &str = include_str!("sql/pending_follow_ups.sql");
const NEXT_DUE: &str = include_str!("sql/next_due.sql");
const HEARTBEAT: &str = include_str!("sql/heartbeat.sql");

/// Opens (creating and migrating it) the SQLite queue at `path`: the port
/// over it, and its result rows, each on a connection of its own.
pub(crate) async fn open_port(
    path: PathBuf,
) -> anyhow::Result<(Arc<dyn JobStore>, Arc<dyn crate::results::ResultRows>)> {
    let store = Arc::new(
        tokio::task::spawn_blocking(move || {
            SqliteStore::open(&path)
                .with_context(|| format!("opening the job database {}", path.display()))
        })
        .await
        .context("opening the job database panicked")??,
    );
    Ok((Blocking::port(store.clone()), Arc::new(SqliteRows(store))))
}

/// Creates or migrates the database at `path` and says what it did
/// (`gpu-feeder migrate`).
pub fn migrate(path: &Path) -> StoreResult<MigrationReport> {
    SqliteStore::open_with_report(path).map(|(_, report)| report)
}

/// The result rows of a SQLite queue, on a connection of their own.
struct SqliteRows(Arc<SqliteStore>);

#[async_trait::async_trait]
impl crate::results::ResultRows for SqliteRows {
    async fn put_result(&self, id: JobId, doc: Vec<u8>) -> StoreResult<()> {
        let store = self.0.clone();
        tokio::task::spawn_blocking(move || store.put_result(id, &doc, Timestamp::now()))
            .await
            .unwrap_or_else(|e| {
                Err(StoreError::Backend(format!(
                    "writing a result panicked: {e}"
                )))
            })
    }

    async fn get_result(&self, id: JobId) -> StoreResult<Option<Vec<u8>>> {
        let store = self.0.clone();
        tokio::task::spawn_blocking(move || store.get_result(id))
            .await
            .unwrap_or_else(|e| {
                Err(StoreError::Backend(format!(
                    "reading a result panicked: {e}"
                )))
            })
    }
}

const SELECT_JOB: &str = "SELECT rowid AS seq, * FROM gpu_jobs";

/// How long a writer waits for another process's lock before giving up.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// The SQLite job store: one connection, used from one thread at a time.
///
/// Open one `SqliteStore` per thread that needs its own connection; they
/// coordinate through the database file like separate processes do.
pub struct SqliteStore {
    conn: Mutex<Connection>,
    path: PathBuf,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish()
    }
}

impl SqliteStore {
    /// Opens (creating it with mode 0600 when missing) and migrates the database.
    pub fn open(path: &Path) -> StoreResult<Self> {
        Self::open_with_report(path).map(|(s, _)| s)
    }

    /// Like `open`, and says which migrations it applied.
    pub fn open_with_report(path: &Path) -> StoreResult<(Self, MigrationReport)> {
        let shown = path.display().to_string();
        create_private(path)?;
        let mut conn = Connection::open(path).map_err(|e| {
            StoreError::Backend(format!(
                "cannot open database {shown}: {e} (check queue.db_path and its directory's permissions)"
            ))
        })?;
        configure(&conn).map_err(|e| StoreError::Backend(format!("configuring {shown}: {e}")))?;
        let report = migrate::migrate(&mut conn, &shown)?;
        Ok((
            SqliteStore {
                conn: Mutex::new(conn),
                path: path.to_path_buf(),
            },
            report,
        ))
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// SQLite's `PRAGMA data_version`: changes when another connection commits.
    /// Cheap to poll; how the dispatcher notices rows inserted by other programs.
    pub fn data_version(&self) -> StoreResult<i64> {
        self.lock()
            .query_row("PRAGMA data_version", [], |r| r.get(0))
            .db()
    }

    /// Runs a query of job ids that takes a `:limit`.
    fn ids(&self, sql: &str, limit: usize) -> StoreResult<Vec<JobId>> {
        let conn = self.lock();
        let mut stmt = conn.prepare_cached(sql).db()?;
        let ids: Vec<Vec<u8>> = stmt
            .query_map(named_params! { ":limit": limit as i64 }, |r| r.get(0))
            .db()?
            .collect::<Result<_, _>>()
            .db()?;
        Ok(ids.iter().filter_map(|b| JobId::from_slice(b)).collect())
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves the connection usable:
        // every write is a transaction that rolled back with the panic.
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn write<T>(&self, f: impl FnOnce(&Transaction<'_>) -> StoreResult<T>) -> StoreResult<T> {
        let mut conn = self.lock();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .db()?;
        let out = f(&tx)?;
        tx.commit().db()?;
        Ok(out)
    }
}

/// Creates the database file with mode 0600 if it does not exist, so that
/// the queue (payload paths, results, errors) is private to its owner.
fn create_private(path: &Path) -> StoreResult<()> {
    let mut opts = OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    match opts.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(StoreError::Backend(format!(
            "cannot create database {}: {e} (check queue.db_path and that its directory exists and is writable)",
            path.display()
        ))),
    }
}

fn configure(conn: &Connection) -> Result<(), String> {
    conn.busy_timeout(BUSY_TIMEOUT).map_err(|e| e.to_string())?;
    // Setting the journal mode while another connection creates or
    // migrates the database answers "database is locked" at once, without
    // the busy handler: wait for it as the busy timeout would.
    let deadline = std::time::Instant::now() + BUSY_TIMEOUT;
    let mode: String = loop {
        match conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0)) {
            Ok(mode) => break mode,
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e.to_string()),
        }
    };
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(format!(
            "the database refused WAL mode (it stays in `{mode}`); is it on a network file system?"
        ));
    }
    conn.execute_batch("PRAGMA synchronous = NORMAL;")
        .map_err(|e| e.to_string())
}

fn insert(
    tx: &Transaction<'_>,
    job: &NewJob,
    status: JobStatus,
    fragment: Option<(JobId, u32, u32)>,
    total: Option<u32>,
    now: Timestamp,
) -> StoreResult<Option<JobId>> {
    let id = JobId::random();
    let (payload_path, payload_inline) = match &job.payload {
        feeder_actors::Payload::File(p) => (Some(p.to_string_lossy().into_owned()), None),
        feeder_actors::Payload::Inline(s) => (None, Some(s.as_str())),
    };
    let mut stmt = tx.prepare_cached(INSERT).db()?;
    let n = stmt
        .execute(named_params! {
            ":id": id.0,
            ":payload_sha256": job.payload_sha256,
            ":model_type": job.model_type.as_str(),
            ":payload_path": payload_path,
            ":payload_inline": payload_inline,
            ":created_at": now.as_secs(),
            ":status": status.as_str(),
            ":priority": job.priority,
            ":max_attempts": job.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS),
            ":parent_id": fragment.map(|f| f.0 .0),
            ":fragment_index": fragment.map(|f| f.1),
            ":total_fragments": fragment.map(|f| f.2).or(total),
            ":follows": job.follows.map(|f| f.0),
            ":then_model": job.then_model.map(|m| m.as_str()),
            ":place": job.place.map(|p| p.to_json()),
            // A fragment shares its parent's key (see `feeder_actors::prefix`).
            ":prefix_key": match fragment {
                Some((parent, _, _)) => Some(parent.to_string()),
                None => job.prefix_key.clone(),
            },
            ":now": secs(now),
        })
        .map_err(|e| StoreError::Invalid(format!("job rejected by the database: {e}")))?;
    Ok((n == 1).then_some(id))
}

/// Runs a claiming `UPDATE … RETURNING rowid AS seq, *`: the rows it
/// claimed, each with its rowid.
fn claimed(
    tx: &Transaction<'_>,
    sql: &str,
    params: &[(&str, &dyn rusqlite::ToSql)],
) -> StoreResult<Vec<(i64, StoreResult<Job>)>> {
    let mut stmt = tx.prepare_cached(sql).db()?;
    let rows = stmt
        .query_map(params, |r| Ok((r.get::<_, i64>("seq")?, job_from_row(r)?)))
        .db()?
        .collect::<Result<Vec<_>, _>>()
        .db()?;
    Ok(rows)
}

/// A grouped claim inside `tx`: reads the candidates, picks with
/// [`prefix::pick`], claims those rows; each comes back with its rank in
/// the order picked.
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
) -> StoreResult<Vec<(i64, StoreResult<Job>)>> {
    let warm = serde_json::to_string(&grouping.warm).expect("strings serialize");
    let mut stmt = tx.prepare_cached(CLAIM_CANDIDATES).db()?;
    let cands = stmt
        .query_map(
            named_params! {
                ":model": model.as_str(),
                ":now": secs(now),
                ":lookahead": prefix::lookahead(n) as i64,
                ":warm": warm,
            },
            |r| {
                Ok(Candidate {
                    seq: r.get("seq")?,
                    priority: r.get("priority")?,
                    created_at: Timestamp::from_secs_f64(r.get("created_at")?),
                    key: r.get("prefix_key")?,
                })
            },
        )
        .db()?
        .collect::<Result<Vec<_>, _>>()
        .db()?;
    let picked = prefix::pick(&cands, n, grouping, now);
    if picked.is_empty() {
        return Ok(Vec::new());
    }
    let rank: HashMap<i64, i64> = picked
        .iter()
        .enumerate()
        .map(|(r, &i)| (cands[i].seq, r as i64))
        .collect();
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
    Ok(rows
        .into_iter()
        .map(|(seq, job)| (rank.get(&seq).copied().unwrap_or(i64::MAX), job))
        .collect())
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

fn submit_in(tx: &Transaction<'_>, job: &NewJob, now: Timestamp) -> StoreResult<Submitted> {
    match insert(tx, job, JobStatus::Pending, None, None, now)? {
        Some(id) => Ok(Submitted {
            id,
            created: true,
            status: JobStatus::Pending,
        }),
        None => {
            let found = existing(tx, job)?;
            Ok(Submitted {
                id: found.id,
                created: false,
                status: found.status,
            })
        }
    }
}

fn get_in(conn: &Connection, id: JobId) -> StoreResult<Option<Job>> {
    conn.query_row(&format!("{SELECT_JOB} WHERE id = ?1"), [id.0], job_from_row)
        .optional()
        .db()?
        .transpose()
}

fn stale(claim: &Claim) -> StoreError {
    StoreError::StaleClaim {
        job_id: claim.job_id,
        claim_id: claim.claim_id.clone(),
    }
}

fn complete_in(
    tx: &Transaction<'_>,
    claim: &Claim,
    done: &Completion,
    now: Timestamp,
) -> StoreResult<()> {
    let mut stmt = tx.prepare_cached(COMPLETE).db()?;
    let n = stmt
        .execute(named_params! {
            ":id": claim.job_id.0,
            ":claim_id": claim.claim_id,
            ":result_path": done.result_path.as_str(),
            ":prompt_tokens": done.prompt_tokens.map(|t| t as i64),
            ":completion_tokens": done.completion_tokens.map(|t| t as i64),
            ":latency_ms": done.latency.as_millis() as i64,
            ":now": secs(now),
        })
        .db()?;
    if n == 1 {
        Ok(())
    } else {
        Err(stale(claim))
    }
}

fn fail_in(
    tx: &Transaction<'_>,
    claim: &Claim,
    failure: Failure,
    now: Timestamp,
) -> StoreResult<FailOutcome> {
    let retry_at = now + failure.retry_after.unwrap_or_default();
    let mut stmt = tx.prepare_cached(FAIL).db()?;
    let row = stmt
        .query_row(
            named_params! {
                ":id": claim.job_id.0,
                ":claim_id": claim.claim_id,
                ":retryable": failure.retry_after.is_some(),
                ":retry_at": secs(retry_at),
                ":error": failure.message,
                ":now": secs(now),
            },
            |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, u32>(1)?,
                    r.get::<_, f64>(2)?,
                ))
            },
        )
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

fn release_in(tx: &Transaction<'_>, claim: &Claim, now: Timestamp) -> StoreResult<()> {
    let n = tx
        .prepare_cached(RELEASE)
        .db()?
        .execute(named_params! {
            ":id": claim.job_id.0,
            ":claim_id": claim.claim_id,
            ":now": secs(now),
        })
        .db()?;
    if n == 1 {
        Ok(())
    } else {
        Err(stale(claim))
    }
}

fn crashed_in(
    tx: &Transaction<'_>,
    claim: &Claim,
    instance: &str,
    limit: u32,
    now: Timestamp,
) -> StoreResult<Settled> {
    let limit = limit.max(1);
    let row = tx
        .prepare_cached(CRASHED)
        .db()?
        .query_row(
            named_params! {
                ":id": claim.job_id.0,
                ":claim_id": claim.claim_id,
                ":limit": limit,
                ":error": poison_error(limit, instance),
                ":now": secs(now),
            },
            |r| Ok((r.get::<_, String>(0)?, r.get::<_, u32>(2)?)),
        )
        .optional()
        .db()?;
    match row {
        None => Err(stale(claim)),
        Some((status, attempts)) if status == "failed" => {
            Ok(Settled::Failed(FailOutcome::Failed { attempts }))
        }
        Some(_) => Ok(Settled::Released),
    }
}

impl BlockingJobStore for SqliteStore {
    fn submit(&self, job: NewJob, now: Timestamp) -> StoreResult<Submitted> {
        self.write(|tx| submit_in(tx, &job, now))
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
        self.write(|tx| jobs.iter().map(|j| submit_in(tx, j, now)).collect())
    }

    fn submit_parent(
        &self,
        parent: NewJob,
        fragments: Vec<NewJob>,
        now: Timestamp,
    ) -> StoreResult<Submitted> {
        let total = fragment_count(&fragments)?;
        self.write(|tx| {
            let Some(id) = insert(tx, &parent, JobStatus::Processing, None, Some(total), now)?
            else {
                let found = existing(tx, &parent)?;
                return Ok(Submitted {
                    id: found.id,
                    created: false,
                    status: found.status,
                });
            };
            for (i, frag) in fragments.iter().enumerate() {
                let at = Some((id, i as u32, total));
                if insert(tx, frag, JobStatus::Pending, at, None, now)?.is_none() {
                    return Err(StoreError::Invalid(format!(
                        "fragment {i} of parent {id} conflicts with an existing row"
                    )));
                }
            }
            Ok(Submitted {
                id,
                created: true,
                status: JobStatus::Processing,
            })
        })
    }

    fn claim_with(
        &self,
        model: ModelType,
        n: usize,
        lease: Duration,
        owner: &str,
        now: Timestamp,
        order: &ClaimOrder,
    ) -> StoreResult<Vec<ClaimedJob>> {
        if n == 0 {
            return Ok(Vec::new());
        }
        let claim_id = hex::encode(rand::random::<[u8; 12]>());
        let mut rows = self.write(|tx| match order {
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
            ),
            ClaimOrder::Grouped(grouping) => {
                claim_grouped(tx, model, n, lease, owner, now, grouping, &claim_id)
            }
        })?;
        match order {
            // RETURNING does not keep the subquery's order: restore it.
            ClaimOrder::Plain => rows.sort_by(|(sa, a), (sb, b)| {
                b.as_ref()
                    .map(|j| j.priority)
                    .ok()
                    .cmp(&a.as_ref().map(|j| j.priority).ok())
                    .then_with(|| {
                        let ca = a.as_ref().map(|j| j.created_at).ok();
                        let cb = b.as_ref().map(|j| j.created_at).ok();
                        ca.cmp(&cb)
                    })
                    .then(sa.cmp(sb))
            }),
            // `claim_grouped` numbered them in the order chosen.
            ClaimOrder::Grouped(_) => rows.sort_by_key(|(rank, _)| *rank),
        }
        rows.into_iter()
            .map(|(_, job)| {
                let job = job?;
                Ok(ClaimedJob {
                    claim: Claim {
                        job_id: job.id,
                        claim_id: claim_id.clone(),
                    },
                    job,
                })
            })
            .collect()
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
        let mut models: Vec<(ModelType, ModelStats)> = ModelType::ALL
            .into_iter()
            .map(|m| (m, ModelStats::default()))
            .collect();
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, u64>(2)?,
                    r.get::<_, Option<f64>>(3)?,
                ))
            })
            .db()?;
        for row in rows {
            let (model, status, count, oldest) = row.db()?;
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
                entry.oldest_pending_age = oldest.map(|o| now.since(Timestamp::from_secs_f64(o)));
            }
        }
        Ok(QueueStats { models })
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
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, f64>(2)?,
                    r.get::<_, f64>(3)?,
                    r.get::<_, f64>(4)?,
                ))
            })
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

impl SqliteStore {
    /// Writes the result document of job `id` into `gpu_results`.
    pub fn put_result(&self, id: JobId, doc: &[u8], now: Timestamp) -> StoreResult<()> {
        self.write(|tx| {
            tx.prepare_cached(
                "INSERT INTO gpu_results (id, doc, written_at) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (id) DO UPDATE SET doc = excluded.doc, written_at = excluded.written_at",
            )
            .db()?
            .execute(rusqlite::params![id.0, doc, secs(now)])
            .db()?;
            Ok(())
        })
    }

    /// The result document of job `id` in `gpu_results`, if there is one.
    pub fn get_result(&self, id: JobId) -> StoreResult<Option<Vec<u8>>> {
        self.lock()
            .query_row("SELECT doc FROM gpu_results WHERE id = ?1", [id.0], |r| {
                r.get(0)
            })
            .optional()
            .db()
    }
}
