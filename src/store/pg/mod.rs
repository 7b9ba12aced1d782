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
//!   [`connection_problem`](feeder_actors::JobStore::connection_problem); with
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
use tokio_postgres::NoTls;
use tracing::{info, warn};

use feeder_actors::{JobId, StoreError, StoreResult, Timestamp};

use super::migration::MigrationReport;
pub use super::Patience;
use crate::config::DatabaseUrl;

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

queries!("pg");
/// `src/store/pg/sql/take_over.sql`: the claims of daemons gone silent go back.
const TAKE_OVER: &str = include_str!("sql/take_over.sql");

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
    // `run!(store, |tx| { ... })`: the same, with `$body` (giving a `T`) run
    // in a transaction `$tx` that is committed after it.
    ($store:expr, |$tx:ident| $body:block) => {
        run!($store, |c, _tries| {
            let $tx = c.transaction().await?;
            let out = $body;
            $tx.commit().await?;
            Ok(out)
        })
    };
}

mod api;
mod port;
mod settle;
mod submit;

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
                let unreachable = e.transient();
                let err = match e {
                    OpError::Pool(p) => connect_error(&self.shared.place, &p),
                    other => StoreError::Backend(format!(
                        "the queue on {}: {}",
                        self.shared.place,
                        other.text()
                    )),
                };
                // The server could not be reached: the same call may
                // succeed later.
                Some(Err(match err {
                    StoreError::Backend(m) if unreachable => StoreError::Unavailable(m),
                    other => other,
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

fn bytes(id: &JobId) -> &[u8] {
    id.0.as_slice()
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
