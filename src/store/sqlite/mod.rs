//! The SQLite adapter of the `JobStore` port.
//!
//! One file, shared with other programs: WAL journal, `synchronous=NORMAL`,
//! a busy timeout, and `BEGIN IMMEDIATE` for every write, so that writers
//! queue for the lock instead of failing. The queries that matter are in
//! `src/store/sqlite/sql/`, one file each (with the ends some share).

pub mod api;
pub mod migrate;
mod port;
mod rows;
mod settle;
mod submit;

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::config::DbConfig;
use rusqlite::{named_params, Connection, OptionalExtension, Transaction, TransactionBehavior};

use anyhow::Context as _;
use feeder_actors::{Blocking, JobId, JobStore, StoreError, StoreResult, Timestamp};

pub use migrate::{full_schema, latest_version};

use super::migration::MigrationReport;
use rows::{secs, Db};

queries!("sqlite");

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
    // A multi-row write inside a transaction (a claim) keeps a statement
    // journal, so that a failing statement undoes only itself; past 64 KiB
    // SQLite spills it to a temporary file, created and deleted each time.
    // Kept in memory, it costs a copy of the pages the statement touches.
    conn.execute_batch("PRAGMA synchronous = NORMAL; PRAGMA temp_store = MEMORY;")
        .map_err(|e| e.to_string())?;
    // A plan that depends on a bound value is re-prepared each time that
    // value changes: every claim's `LIMIT :n` would recompile the claim.
    // The queue's statements want one plan whatever their values.
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)
        .map_err(|e| e.to_string())?;
    Ok(())
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
