//! The PostgreSQL adapter of the `JobStore` port: one queue shared by the
//! daemons of several GPU hosts (`queue.database_url`).
//!
//! - **Claims** are one statement: `FOR UPDATE SKIP LOCKED` picks the rows
//!   and the `UPDATE` takes them, so concurrent claimers on any host never
//!   share a job and never wait for each other.
//! - **Time** is the database's: every statement reads "now" as
//!   `gpu_feeder_now(NULL)`, the server's clock, so leases, backoffs and
//!   heartbeats mean the same on every host whatever its own clock says.
//!   ([`Clock::Caller`] passes the caller's `now` instead, for tests that
//!   set the time.) Times handed back to the caller (when a job comes due)
//!   are turned into delays from the caller's `now`.
//! - **Daemons** register in `gpu_daemons` with a heartbeat; a daemon silent
//!   past its timeout has its claims taken back by the others
//!   (`reclaim_expired`).
//! - **Wake-ups** come by `LISTEN gpu_jobs` on a connection of its own
//!   ([`listen`], opened by the first read of the change token): a trigger notifies for every row that becomes
//!   claimable, written by anyone. The change token counts the
//!   notifications from other connections; while the listening connection
//!   is down it moves every few seconds instead (a slow poll).
//! - **Lost connections**: with [`Patience::Reconnect`] (the daemon) a call
//!   that fails for want of a connection is tried again with backoff until
//!   the server is back, and says so in the log and in
//!   [`connection_problem`](JobStore::connection_problem); with
//!   [`Patience::FailFast`] (the command line) it fails at once with an
//!   error naming the server.

mod listen;
pub mod migrate;
mod rows;

use std::collections::HashSet;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use deadpool_postgres::{
    HookError, Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod,
};
use tokio_postgres::types::ToSql;
use tokio_postgres::NoTls;
use tracing::{info, warn};

use feeder_actors::prefix::{self, Candidate, ClaimOrder};
use feeder_actors::store::{fragment_count, poison_error};
use feeder_actors::{
    Claim, ClaimedJob, Completion, DaemonInfo, FailOutcome, Failure, Job, JobId, JobStatus,
    JobStore, ListFilter, ModelStats, ModelType, NewJob, ParentOutcome, QueueStats, Settle,
    Settled, StoreError, StoreResult, Submitted, Timestamp, DEFAULT_MAX_ATTEMPTS,
};

use super::migration::MigrationReport;
pub use super::Patience;
use crate::config::DatabaseUrl;
use rows::job_from_row;

/// Whose clock a store reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Clock {
    /// The database server's (in service).
    Database,
    /// The `now` each call is given (tests that set the time).
    Caller,
}

/// Where a configuration points, for messages: `user@host:port/database`.
fn place_of(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "?".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!(
        "{}@{host}:{port}/{}",
        config.get_user().unwrap_or("?"),
        config.get_dbname().unwrap_or("?")
    )
}

/// A PostgreSQL error in words: the server's message, code and hint, or
/// the client's reason with its cause.
pub(crate) fn pg_text(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut out = format!("{} ({})", db.message(), db.code().code());
        if let Some(d) = db.detail() {
            out.push_str(&format!("; {d}"));
        }
        if let Some(h) = db.hint() {
            out.push_str(&format!("; hint: {h}"));
        }
        return out;
    }
    let mut out = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        out.push_str(&format!(": {s}"));
        source = s.source();
    }
    out
}

/// Whether `e` means "no connection" (or a conflict worth a retry), rather
/// than a statement the server refused.
fn transient(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.code() {
        Some(code) => {
            let c = code.code();
            c.starts_with("08") // connection exception
                || c == "57P01" // admin shutdown
                || c == "57P02" // crash shutdown
                || c == "57P03" // cannot connect now (starting up)
                || c == "40001" // serialization failure
                || c == "40P01" // deadlock
        }
        // No SQLSTATE: I/O, connect, or a closed connection.
        None => std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>()),
    }
}

enum OpError {
    Pg(tokio_postgres::Error),
    Pool(PoolError),
    Store(StoreError),
}

impl From<tokio_postgres::Error> for OpError {
    fn from(e: tokio_postgres::Error) -> Self {
        OpError::Pg(e)
    }
}

impl From<StoreError> for OpError {
    fn from(e: StoreError) -> Self {
        OpError::Store(e)
    }
}

impl OpError {
    fn transient(&self) -> bool {
        match self {
            OpError::Pg(e) => transient(e),
            OpError::Pool(PoolError::Backend(e)) => transient(e),
            OpError::Pool(PoolError::Timeout(_)) => true,
            OpError::Pool(_) => false,
            OpError::Store(_) => false,
        }
    }

    fn text(&self) -> String {
        match self {
            OpError::Pg(e) | OpError::Pool(PoolError::Backend(e)) => pg_text(e),
            OpError::Pool(PoolError::Timeout(_)) => "timed out waiting for a connection".into(),
            OpError::Pool(e) => e.to_string(),
            OpError::Store(e) => e.to_string(),
        }
    }
}

type Op<T> = Result<T, OpError>;

/// State shared with the listening task.
struct Shared {
    /// Where the server is, for messages.
    place: String,
    /// Backend pids of this store's pooled connections: their own
    /// notifications do not move its change token.
    own_pids: Mutex<HashSet<i32>>,
    /// Notifications from other connections (and the slow poll's ticks).
    notified: AtomicI64,
    /// The listening connection, while it is up: a round trip on it
    /// delivers every notification sent before.
    listener: tokio::sync::Mutex<Option<tokio_postgres::Client>>,
    /// Whether the listening connection is up.
    up: tokio::sync::watch::Sender<bool>,
    /// When the slow poll last moved the token.
    last_tick: Mutex<Instant>,
    /// Since when, and why, the server cannot be reached.
    down: Mutex<Option<(Instant, String)>>,
    /// When the last loss of connection ended.
    back_at: Mutex<Option<Instant>>,
    /// The heartbeat timeout this daemon gave last.
    timeout: Mutex<Duration>,
}

impl Shared {
    fn went_down(&self, why: &str) {
        let mut down = self.down.lock().unwrap_or_else(|e| e.into_inner());
        match &mut *down {
            None => {
                warn!("cannot reach the queue on {}: {why}", self.place);
                *down = Some((Instant::now(), why.to_string()));
            }
            Some((_, last)) => *last = why.to_string(),
        }
    }

    fn came_back(&self) {
        let mut down = self.down.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((since, _)) = down.take() {
            info!(
                "reconnected to the queue on {} after {:.1} s",
                self.place,
                since.elapsed().as_secs_f64()
            );
            *self.back_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        }
    }
}

/// How often the change token moves while the listening connection is down.
const SLOW_POLL: Duration = Duration::from_secs(5);

/// Connections per store. Each daemon opens two stores (the queue's and the
/// admin endpoint's reads) and one listening connection.
const POOL_SIZE: usize = 8;

/// Runs `$body` (an `Op<T>` block) with `$c`, a pooled connection; with
/// [`Patience::Reconnect`], again and again with backoff while the server
/// cannot be reached. `$tries` says how many tries came before, so that a
/// call whose effect may have been committed before the connection broke
/// can look for it.
macro_rules! run {
    ($store:expr, |$c:ident, $tries:ident| $body:block) => {{
        let store = $store;
        let mut tries = 0u32;
        let mut delay = Duration::from_millis(100);
        loop {
            let out = match store.pool.get().await {
                Ok(mut client) => {
                    let $c: &mut Object = &mut client;
                    let $tries: u32 = tries;
                    async { $body }.await
                }
                Err(e) => Err(OpError::Pool(e)),
            };
            if let Some(done) = store.after(out, &mut tries, &mut delay).await {
                break done;
            }
        }
    }};
}

/// The PostgreSQL job store.
pub struct PgStore {
    pool: Pool,
    clock: Clock,
    patience: Patience,
    shared: Arc<Shared>,
    /// Where the listening connection goes.
    config: tokio_postgres::Config,
    /// The task keeping it up, once someone asked for the change token.
    listen: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("place", &self.shared.place)
            .field("clock", &self.clock)
            .finish()
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        if let Some(task) = self
            .listen
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            task.abort();
        }
    }
}

impl PgStore {
    /// Connects to the server at `url`, creates or upgrades the schema, and
    /// starts listening for new work. Fails with the server named and what
    /// to check when it cannot connect, whatever `patience` says.
    pub async fn connect(url: &str, clock: Clock, patience: Patience) -> StoreResult<Self> {
        Self::connect_with_report(url, clock, patience)
            .await
            .map(|(s, _)| s)
    }

    /// Like `connect`, and says which migrations it applied.
    pub async fn connect_with_report(
        url: &str,
        clock: Clock,
        patience: Patience,
    ) -> StoreResult<(Self, MigrationReport)> {
        let mut config = DatabaseUrl::parse(url)
            .map_err(|e| StoreError::Backend(format!("queue.database_url: {e}")))?
            .into_config();
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(5));
        }
        if config.get_application_name().is_none() {
            config.application_name("gpu-feeder");
        }
        let place = place_of(&config);
        let shared = Arc::new(Shared {
            place: place.clone(),
            own_pids: Mutex::new(HashSet::new()),
            notified: AtomicI64::new(0),
            listener: tokio::sync::Mutex::new(None),
            up: tokio::sync::watch::Sender::new(false),
            last_tick: Mutex::new(Instant::now()),
            down: Mutex::new(None),
            back_at: Mutex::new(None),
            timeout: Mutex::new(Duration::from_secs(30)),
        });
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pids = shared.clone();
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .create_timeout(Some(Duration::from_secs(10)))
            .wait_timeout(Some(Duration::from_secs(30)))
            .post_create(deadpool_postgres::Hook::async_fn(move |client, _| {
                let pids = pids.clone();
                Box::pin(async move {
                    let pid: i32 = client
                        .query_one("SELECT pg_backend_pid()", &[])
                        .await
                        .map_err(HookError::Backend)?
                        .get(0);
                    pids.own_pids
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(pid);
                    Ok(())
                })
            }))
            .build()
            .map_err(|e| StoreError::Backend(format!("the connection pool for {place}: {e}")))?;
        let mut client = pool.get().await.map_err(|e| connect_error(&place, &e))?;
        let report = migrate::migrate(&mut client, &place).await?;
        drop(client);
        Ok((
            PgStore {
                pool,
                clock,
                patience,
                shared,
                config,
                listen: Mutex::new(None),
            },
            report,
        ))
    }

    /// "Now" as the statements take it: `NULL` (the database's clock) or
    /// the caller's.
    fn at(&self, now: Timestamp) -> Option<f64> {
        match self.clock {
            Clock::Database => None,
            Clock::Caller => Some(now.as_secs_f64()),
        }
    }

    /// After one try of a call: its result, or `None` to try again (after
    /// a pause that grows with each try) because the server could not be
    /// reached and this store waits for it.
    async fn after<T>(
        &self,
        out: Op<T>,
        tries: &mut u32,
        delay: &mut Duration,
    ) -> Option<StoreResult<T>> {
        match out {
            Ok(v) => {
                self.shared.came_back();
                Some(Ok(v))
            }
            Err(OpError::Store(e)) => Some(Err(e)),
            Err(e) => {
                if e.transient() {
                    self.shared.went_down(&e.text());
                    if self.patience == Patience::Reconnect {
                        tokio::time::sleep(*delay).await;
                        *delay = (*delay * 2).min(Duration::from_secs(5));
                        *tries += 1;
                        return None;
                    }
                }
                Some(Err(match e {
                    OpError::Pool(p) => connect_error(&self.shared.place, &p),
                    other => StoreError::Backend(format!(
                        "the queue on {}: {}",
                        self.shared.place,
                        other.text()
                    )),
                }))
            }
        }
    }

    /// Writes the result document of job `id` into `gpu_results`.
    pub async fn put_result(&self, id: JobId, doc: &[u8]) -> StoreResult<()> {
        run!(self, |c, _tries| {
            let st = c
                .prepare_cached(
                    "INSERT INTO gpu_results (id, doc, written_at) \
                     VALUES ($1, $2, extract(epoch FROM now())) \
                     ON CONFLICT (id) DO UPDATE SET doc = EXCLUDED.doc, written_at = EXCLUDED.written_at",
                )
                .await?;
            c.execute(&st, &[&id.0.as_slice(), &doc]).await?;
            Ok(())
        })
    }

    /// The result document of job `id` in `gpu_results`, if there is one.
    pub async fn get_result(&self, id: JobId) -> StoreResult<Option<Vec<u8>>> {
        run!(self, |c, _tries| {
            let st = c
                .prepare_cached("SELECT doc FROM gpu_results WHERE id = $1")
                .await?;
            Ok(c.query_opt(&st, &[&id.0.as_slice()])
                .await?
                .map(|r| r.get(0)))
        })
    }

    /// Starts the listening connection unless it runs: only a store whose
    /// change token is read (the daemon's queue) needs one, so the command
    /// line and the admin endpoint's reads open none.
    /// Says whether it started it now.
    fn ensure_listening(&self) -> bool {
        let mut task = self.listen.lock().unwrap_or_else(|e| e.into_inner());
        if task.is_some() {
            return false;
        }
        *task = Some(tokio::spawn(listen::run(
            self.config.clone(),
            self.shared.clone(),
        )));
        true
    }

    /// Returns once the listening connection is up (starting it if needed):
    /// from then on, every row another connection makes claimable moves
    /// the change token.
    pub async fn listening(&self) {
        self.ensure_listening();
        let mut up = self.shared.up.subscribe();
        let _ = up.wait_for(|up| *up).await;
    }

    /// Where the server is, for messages.
    pub fn place(&self) -> &str {
        &self.shared.place
    }
}

/// The error of a connection that could not be made, with what to check.
fn connect_error(place: &str, e: &PoolError) -> StoreError {
    let why = match e {
        PoolError::Backend(e) => pg_text(e),
        other => other.to_string(),
    };
    let hint = if why.contains("password") || why.contains("authentication") {
        "check the user and password in queue.database_url (or $FEEDER_DATABASE_URL)"
    } else if why.contains("does not exist") {
        "create the database (createdb), or fix its name in queue.database_url"
    } else {
        "check that the server runs, listens on that host and port (listen_addresses, port), and lets this host in (pg_hba.conf)"
    };
    StoreError::Backend(format!(
        "cannot connect to the PostgreSQL queue at {place}: {why}: {hint}"
    ))
}

fn stale(claim: &Claim) -> StoreError {
    StoreError::StaleClaim {
        job_id: claim.job_id,
        claim_id: claim.claim_id.clone(),
    }
}

fn bytes(id: &JobId) -> &[u8] {
    id.0.as_slice()
}

const INSERT: &str = "\
INSERT INTO gpu_jobs
       (id, payload_sha256, model_type, payload_path, payload_inline, created_at,
        status, priority, max_attempts, parent_id, fragment_index, total_fragments,
        follows, then_model, place, prefix_key, updated_at)
VALUES ($2, $3, $4, $5, $6, gpu_feeder_now($1), $7, $8, $9, $10, $11, $12, $13, $14, $15,
        $16, gpu_feeder_now($1))
ON CONFLICT DO NOTHING
RETURNING id";

/// Inserts `job` unless an identical one exists; `Some(id)` when inserted.
async fn insert(
    tx: &deadpool_postgres::Transaction<'_>,
    at: Option<f64>,
    job: &NewJob,
    status: JobStatus,
    fragment: Option<(JobId, u32, u32)>,
    total: Option<u32>,
) -> Op<Option<JobId>> {
    let id = JobId::random();
    let (payload_path, payload_inline) = match &job.payload {
        feeder_actors::Payload::File(p) => (Some(p.to_string_lossy().into_owned()), None),
        feeder_actors::Payload::Inline(s) => (None, Some(s.as_str())),
    };
    let place: Option<serde_json::Value> = job
        .place
        .map(|p| serde_json::from_str(&p.to_json()).expect("a place is JSON"));
    let prefix_key = match fragment {
        Some((parent, _, _)) => Some(parent.to_string()),
        None => job.prefix_key.clone(),
    };
    let max_attempts = job.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS) as i32;
    let parent = fragment.map(|f| f.0 .0.to_vec());
    let index = fragment.map(|f| f.1 as i32);
    let total = fragment.map(|f| f.2).or(total).map(|t| t as i32);
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
        &status.as_str(),
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
async fn existing(tx: &deadpool_postgres::Transaction<'_>, job: &NewJob) -> Op<Job> {
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

async fn submit_in(
    tx: &deadpool_postgres::Transaction<'_>,
    at: Option<f64>,
    job: &NewJob,
) -> Op<Submitted> {
    match insert(tx, at, job, JobStatus::Pending, None, None).await? {
        Some(id) => Ok(Submitted {
            id,
            created: true,
            status: JobStatus::Pending,
        }),
        None => {
            let found = existing(tx, job).await?;
            Ok(Submitted {
                id: found.id,
                created: false,
                status: found.status,
            })
        }
    }
}

const CLAIM: &str = "\
WITH picked AS (
    SELECT seq FROM gpu_jobs
     WHERE status = 'pending' AND model_type = $2 AND run_at <= gpu_feeder_now($1)
     ORDER BY priority DESC, created_at, seq
     LIMIT $3
       FOR UPDATE SKIP LOCKED)
UPDATE gpu_jobs AS j
   SET status = 'processing', claim_id = $4, claimed_by = $5,
       lease_until = gpu_feeder_now($1) + $6, started_at = gpu_feeder_now($1),
       updated_at = gpu_feeder_now($1)
  FROM picked
 WHERE j.seq = picked.seq
RETURNING j.*";

const CLAIM_CANDIDATES: &str = "\
SELECT seq, priority, created_at, prefix_key, gpu_feeder_now($1) AS now
  FROM ((SELECT seq, priority, created_at, prefix_key FROM gpu_jobs
          WHERE status = 'pending' AND model_type = $2 AND run_at <= gpu_feeder_now($1)
          ORDER BY priority DESC, created_at, seq
          LIMIT $3)
        UNION
        (SELECT seq, priority, created_at, prefix_key FROM gpu_jobs
          WHERE status = 'pending' AND model_type = $2 AND run_at <= gpu_feeder_now($1)
            AND prefix_key = ANY($4))) AS c";

const CLAIM_ROWS: &str = "\
WITH locked AS (
    SELECT seq FROM gpu_jobs
     WHERE seq = ANY($2) AND status = 'pending'
       FOR UPDATE SKIP LOCKED)
UPDATE gpu_jobs AS j
   SET status = 'processing', claim_id = $3, claimed_by = $4,
       lease_until = gpu_feeder_now($1) + $5, started_at = gpu_feeder_now($1),
       updated_at = gpu_feeder_now($1)
  FROM locked
 WHERE j.seq = locked.seq
RETURNING j.*";

const COMPLETE: &str = "\
UPDATE gpu_jobs
   SET status = 'done', result_path = $4, prompt_tokens = $5, completion_tokens = $6,
       latency_ms = $7, attempts = attempts + 1, error = NULL, claim_id = NULL,
       lease_until = NULL, finished_at = gpu_feeder_now($1), updated_at = gpu_feeder_now($1)
 WHERE id = $2 AND claim_id = $3 AND status = 'processing'";

const FAIL: &str = "\
UPDATE gpu_jobs
   SET attempts    = attempts + 1,
       status      = CASE WHEN $4 AND attempts + 1 < max_attempts THEN 'pending' ELSE 'failed' END,
       run_at      = CASE WHEN $4 AND attempts + 1 < max_attempts
                          THEN gpu_feeder_now($1) + $5 ELSE run_at END,
       finished_at = CASE WHEN $4 AND attempts + 1 < max_attempts
                          THEN NULL ELSE gpu_feeder_now($1) END,
       error = $6, claim_id = NULL, lease_until = NULL, updated_at = gpu_feeder_now($1)
 WHERE id = $2 AND claim_id = $3 AND status = 'processing'
RETURNING status, attempts, run_at - gpu_feeder_now($1)";

const RELEASE: &str = "\
UPDATE gpu_jobs
   SET status = 'pending', claim_id = NULL, lease_until = NULL, updated_at = gpu_feeder_now($1)
 WHERE id = $2 AND claim_id = $3 AND status = 'processing'";

const CRASHED: &str = "\
UPDATE gpu_jobs
   SET crashes     = crashes + 1,
       status      = CASE WHEN crashes + 1 >= $4 THEN 'failed' ELSE 'pending' END,
       finished_at = CASE WHEN crashes + 1 >= $4 THEN gpu_feeder_now($1) ELSE NULL END,
       error       = CASE WHEN crashes + 1 >= $4 THEN $5 ELSE error END,
       claim_id = NULL, lease_until = NULL, updated_at = gpu_feeder_now($1)
 WHERE id = $2 AND claim_id = $3 AND status = 'processing'
RETURNING status, attempts";

const RECLAIM: &str = "\
UPDATE gpu_jobs
   SET status = 'pending', claim_id = NULL, lease_until = NULL, updated_at = gpu_feeder_now($1)
 WHERE status = 'processing' AND lease_until < gpu_feeder_now($1)";

const TAKE_OVER: &str = "\
WITH dead AS (
    DELETE FROM gpu_daemons
     WHERE heartbeat_at < gpu_feeder_now($1) - timeout_s
    RETURNING daemon_id, gpu_feeder_now($1) - heartbeat_at AS silent),
taken AS (
    UPDATE gpu_jobs AS j
       SET status = 'pending', claim_id = NULL, lease_until = NULL,
           updated_at = gpu_feeder_now($1)
      FROM dead
     WHERE j.status = 'processing' AND j.lease_until IS NOT NULL
       AND (j.claimed_by = dead.daemon_id
            OR left(j.claimed_by, length(dead.daemon_id) + 1) = dead.daemon_id || '/')
    RETURNING dead.daemon_id)
SELECT dead.daemon_id, dead.silent, (SELECT count(*) FROM taken WHERE taken.daemon_id = dead.daemon_id)
  FROM dead";

const RELEASE_OWNER: &str = "\
UPDATE gpu_jobs
   SET status = 'pending', claim_id = NULL, lease_until = NULL, updated_at = gpu_feeder_now($1)
 WHERE status = 'processing' AND lease_until IS NOT NULL
   AND (claimed_by = $2 OR left(claimed_by, length($2) + 1) = $2 || '/')";

const NEXT_DUE: &str = "\
SELECT run_at - gpu_feeder_now($1)
  FROM gpu_jobs
 WHERE status = 'pending' AND model_type = $2 AND run_at > gpu_feeder_now($1)
 ORDER BY run_at
 LIMIT 1";

const READY_PARENTS: &str = "\
SELECT p.id
  FROM gpu_jobs AS p
 WHERE p.status = 'processing' AND p.parent_id IS NULL AND p.total_fragments IS NOT NULL
   AND p.lease_until IS NULL
   AND NOT EXISTS (SELECT 1 FROM gpu_jobs AS f
                    WHERE f.parent_id = p.id AND f.status IN ('pending', 'processing'))
 LIMIT $1";

const FINISH_PARENT: &str = "\
UPDATE gpu_jobs
   SET status = $3, result_path = $4, error = $5, attempts = attempts + 1,
       finished_at = gpu_feeder_now($1), updated_at = gpu_feeder_now($1)
 WHERE id = $2 AND status = 'processing' AND total_fragments IS NOT NULL
   AND parent_id IS NULL";

const PENDING_FOLLOW_UPS: &str = "\
SELECT j.id
  FROM gpu_jobs AS j
 WHERE j.status = 'done' AND j.then_model IS NOT NULL
   AND NOT EXISTS (SELECT 1 FROM gpu_jobs AS f WHERE f.follows = j.id)
 LIMIT $1";

const HEARTBEAT: &str = "\
INSERT INTO gpu_daemons AS d (daemon_id, about, started_at, heartbeat_at, timeout_s)
VALUES ($2, $3, gpu_feeder_now($1), gpu_feeder_now($1), $4)
ON CONFLICT (daemon_id) DO UPDATE
   SET started_at   = CASE WHEN d.about = EXCLUDED.about THEN d.started_at
                           ELSE EXCLUDED.started_at END,
       about        = EXCLUDED.about,
       heartbeat_at = EXCLUDED.heartbeat_at,
       timeout_s    = EXCLUDED.timeout_s";

async fn complete_in(
    tx: &deadpool_postgres::Transaction<'_>,
    at: Option<f64>,
    claim: &Claim,
    done: &Completion,
) -> Op<()> {
    let st = tx.prepare_cached(COMPLETE).await?;
    let n = tx
        .execute(
            &st,
            &[
                &at,
                &bytes(&claim.job_id),
                &claim.claim_id,
                &done.result_path.as_str(),
                &done.prompt_tokens.map(|t| t as i64),
                &done.completion_tokens.map(|t| t as i64),
                &(done.latency.as_millis() as i64),
            ],
        )
        .await?;
    if n == 1 {
        Ok(())
    } else {
        Err(stale(claim).into())
    }
}

async fn fail_in(
    tx: &deadpool_postgres::Transaction<'_>,
    at: Option<f64>,
    claim: &Claim,
    failure: &Failure,
    now: Timestamp,
) -> Op<FailOutcome> {
    let st = tx.prepare_cached(FAIL).await?;
    let after = failure.retry_after.unwrap_or_default().as_secs_f64();
    let row = tx
        .query_opt(
            &st,
            &[
                &at,
                &bytes(&claim.job_id),
                &claim.claim_id,
                &failure.retry_after.is_some(),
                &after,
                &failure.message,
            ],
        )
        .await?;
    let Some(row) = row else {
        return Err(stale(claim).into());
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

async fn release_in(
    tx: &deadpool_postgres::Transaction<'_>,
    at: Option<f64>,
    claim: &Claim,
) -> Op<()> {
    let st = tx.prepare_cached(RELEASE).await?;
    let n = tx
        .execute(&st, &[&at, &bytes(&claim.job_id), &claim.claim_id])
        .await?;
    if n == 1 {
        Ok(())
    } else {
        Err(stale(claim).into())
    }
}

async fn crashed_in(
    tx: &deadpool_postgres::Transaction<'_>,
    at: Option<f64>,
    claim: &Claim,
    instance: &str,
    limit: u32,
) -> Op<Settled> {
    let limit = limit.max(1) as i32;
    let st = tx.prepare_cached(CRASHED).await?;
    let error = poison_error(limit as u32, instance);
    let row = tx
        .query_opt(
            &st,
            &[&at, &bytes(&claim.job_id), &claim.claim_id, &limit, &error],
        )
        .await?;
    match row {
        None => Err(stale(claim).into()),
        Some(r) if r.get::<_, String>(0) == "failed" => Ok(Settled::Failed(FailOutcome::Failed {
            attempts: r.get::<_, i32>(1).max(0) as u32,
        })),
        Some(_) => Ok(Settled::Released),
    }
}

fn jobs(rows: &[tokio_postgres::Row]) -> Op<Vec<Job>> {
    Ok(rows.iter().map(job_from_row).collect::<StoreResult<_>>()?)
}

/// Claimed rows with their insertion order.
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
        run!(self, |c, _tries| {
            let tx = c.transaction().await?;
            let out = submit_in(&tx, at, &job).await?;
            tx.commit().await?;
            Ok(out)
        })
    }

    async fn submit_batch(&self, jobs: Vec<NewJob>, now: Timestamp) -> StoreResult<Vec<Submitted>> {
        let at = self.at(now);
        run!(self, |c, _tries| {
            let tx = c.transaction().await?;
            let mut out = Vec::with_capacity(jobs.len());
            for job in &jobs {
                out.push(submit_in(&tx, at, job).await?);
            }
            tx.commit().await?;
            Ok(out)
        })
    }

    async fn submit_parent(
        &self,
        parent: NewJob,
        fragments: Vec<NewJob>,
        now: Timestamp,
    ) -> StoreResult<Submitted> {
        let total = fragment_count(&fragments)?;
        let at = self.at(now);
        run!(self, |c, _tries| {
            let tx = c.transaction().await?;
            let Some(id) =
                insert(&tx, at, &parent, JobStatus::Processing, None, Some(total)).await?
            else {
                let found = existing(&tx, &parent).await?;
                return Ok(Submitted {
                    id: found.id,
                    created: false,
                    status: found.status,
                });
            };
            for (i, frag) in fragments.iter().enumerate() {
                let place = Some((id, i as u32, total));
                if insert(&tx, at, frag, JobStatus::Pending, place, None)
                    .await?
                    .is_none()
                {
                    return Err(StoreError::Invalid(format!(
                        "fragment {i} of parent {id} conflicts with an existing row"
                    ))
                    .into());
                }
            }
            tx.commit().await?;
            Ok(Submitted {
                id,
                created: true,
                status: JobStatus::Processing,
            })
        })
    }

    async fn claim_with(
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
            match order {
                ClaimOrder::Plain => {
                    let st = c.prepare_cached(CLAIM).await?;
                    let rows = c
                        .query(
                            &st,
                            &[
                                &at,
                                &model.as_str(),
                                &(n as i64),
                                &claim_id,
                                &owner,
                                &lease_s,
                            ],
                        )
                        .await?;
                    Ok((sequenced(&rows)?, None))
                }
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
                    let seqs: Vec<i64> = picked.iter().map(|&i| cands[i].seq).collect();
                    let st = tx.prepare_cached(CLAIM_ROWS).await?;
                    let rows = tx
                        .query(&st, &[&at, &seqs, &claim_id, &owner, &lease_s])
                        .await?;
                    tx.commit().await?;
                    Ok((sequenced(&rows)?, Some(seqs)))
                }
            }
        })?;
        let (mut claimed, order_by) = rows;
        match order_by {
            // In the order chosen.
            Some(seqs) => claimed.sort_by_key(|(seq, _)| seqs.iter().position(|s| s == seq)),
            // RETURNING does not keep the subquery's order: restore it.
            None => {
                claimed.sort_by_key(|(seq, j)| (std::cmp::Reverse(j.priority), j.created_at, *seq))
            }
        }
        Ok(claimed
            .into_iter()
            .map(|(_, job)| ClaimedJob {
                claim: Claim {
                    job_id: job.id,
                    claim_id: claim_id.clone(),
                },
                job,
            })
            .collect())
    }

    async fn complete(&self, claim: &Claim, done: Completion, now: Timestamp) -> StoreResult<()> {
        let at = self.at(now);
        run!(self, |c, _tries| {
            let tx = c.transaction().await?;
            complete_in(&tx, at, claim, &done).await?;
            tx.commit().await?;
            Ok(())
        })
    }

    async fn settle_batch(
        &self,
        items: Vec<(Claim, Settle)>,
        now: Timestamp,
    ) -> StoreResult<Vec<StoreResult<Settled>>> {
        let at = self.at(now);
        run!(self, |c, _tries| {
            let tx = c.transaction().await?;
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
                        crashed_in(&tx, at, claim, instance, *limit).await
                    }
                };
                match one {
                    Ok(v) => out.push(Ok(v)),
                    Err(OpError::Store(e)) => out.push(Err(e)),
                    Err(e) => return Err(e),
                }
            }
            tx.commit().await?;
            Ok(out)
        })
    }

    async fn fail(
        &self,
        claim: &Claim,
        failure: Failure,
        now: Timestamp,
    ) -> StoreResult<FailOutcome> {
        let at = self.at(now);
        run!(self, |c, _tries| {
            let tx = c.transaction().await?;
            let out = fail_in(&tx, at, claim, &failure, now).await?;
            tx.commit().await?;
            Ok(out)
        })
    }

    async fn release(&self, claim: &Claim, now: Timestamp) -> StoreResult<()> {
        let at = self.at(now);
        run!(self, |c, _tries| {
            let tx = c.transaction().await?;
            release_in(&tx, at, claim).await?;
            tx.commit().await?;
            Ok(())
        })
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
        run!(self, |c, _tries| {
            let tx = c.transaction().await?;
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
            tx.commit().await?;
            Ok(n)
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
        run!(self, |c, _tries| {
            let tx = c.transaction().await?;
            let out = crashed_in(&tx, at, claim, instance, limit).await?;
            tx.commit().await?;
            Ok(out)
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
        run!(self, |c, _tries| {
            let tx = c.transaction().await?;
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
            tx.commit().await?;
            Ok(job)
        })
    }

    async fn retry(&self, id: JobId, now: Timestamp) -> StoreResult<Job> {
        let at = self.at(now);
        run!(self, |c, _tries| {
            let tx = c.transaction().await?;
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
            tx.commit().await?;
            Ok(job)
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
        run!(self, |c, _tries| {
            let st = c
                .prepare_cached(
                    "SELECT * FROM gpu_jobs \
                      WHERE ($1::text IS NULL OR status = $1) \
                        AND ($2::text IS NULL OR model_type = $2) \
                        AND ($3::bytea IS NULL OR parent_id = $3) \
                      ORDER BY created_at DESC, seq DESC LIMIT $4",
                )
                .await?;
            let rows = c.query(&st, &[&status, &model, &parent, &limit]).await?;
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
            let mut models: Vec<(ModelType, ModelStats)> = ModelType::ALL
                .into_iter()
                .map(|m| (m, ModelStats::default()))
                .collect();
            for row in c.query(&st, &[&at]).await? {
                let (model, status): (String, String) = (row.get(0), row.get(1));
                let (Ok(model), Ok(status)) =
                    (model.parse::<ModelType>(), status.parse::<JobStatus>())
                else {
                    continue; // The schema's CHECKs make this unreachable.
                };
                let entry = &mut models
                    .iter_mut()
                    .find(|(m, _)| *m == model)
                    .expect("every model")
                    .1;
                *entry.counts.get_mut(status) = row.get::<_, i64>(2) as u64;
                if status == JobStatus::Pending {
                    entry.oldest_pending_age = row
                        .get::<_, Option<f64>>(3)
                        .map(|age| Duration::from_millis((age.max(0.0) * 1000.0) as u64));
                }
            }
            Ok(QueueStats { models })
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

#[async_trait]
impl crate::results::ResultRows for PgStore {
    async fn put_result(&self, id: JobId, doc: Vec<u8>) -> StoreResult<()> {
        PgStore::put_result(self, id, &doc).await
    }

    async fn get_result(&self, id: JobId) -> StoreResult<Option<Vec<u8>>> {
        PgStore::get_result(self, id).await
    }
}

async fn get_locked(tx: &deadpool_postgres::Transaction<'_>, id: JobId) -> Op<Job> {
    let st = tx
        .prepare_cached("SELECT * FROM gpu_jobs WHERE id = $1 FOR UPDATE")
        .await?;
    match tx.query_opt(&st, &[&bytes(&id)]).await? {
        Some(row) => Ok(job_from_row(&row)?),
        None => Err(StoreError::NotFound(id).into()),
    }
}
