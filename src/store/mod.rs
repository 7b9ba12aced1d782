//! The job store: which adapter a queue uses, and opening it.
//!
//! - [`sqlite`]: one SQLite file, shared with other programs (the default).
//! - [`pg`]: one PostgreSQL database shared by the daemons of many hosts
//!   (`queue.database_url`).
//! - [`shared`]: what the two adapters do alike, written once.
//! - [`migration`]: the bookkeeping of their schema migrations.
//!
//! The two adapters mirror each other file for file (`mod.rs`, `port.rs`,
//! `submit.rs`, `settle.rs`, `rows.rs`, `migrate.rs`, and their SQL in
//! `sql/`). Everything above them holds an `Arc<dyn JobStore>` opened here.

/// The queries that matter, one file each in `src/store/<adapter>/sql/`:
/// both adapters have this set, each in its own dialect. `queries!("sqlite")`
/// makes a constant of each file, named after it; a query written as
/// `"a" + "b"` is those files one after the other (both claims end with the
/// same UPDATE, `claim_update.sql`; a failure and a crash with the same
/// condition and row, `settled.sql`).
macro_rules! queries {
    ($adapter:literal) => {
        queries!(@ $adapter;
            CLAIM "claim" + "claim_update", CLAIM_CANDIDATES "claim_candidates",
            CLAIM_ROWS "claim_rows" + "claim_update",
            COMPLETE "complete", FAIL "fail" + "settled", RELEASE "release",
            CRASHED "crashed" + "settled",
            RECLAIM "reclaim", RELEASE_OWNER "release_owner", INSERT "insert",
            READY_PARENTS "ready_parents", FINISH_PARENT "finish_parent",
            PENDING_FOLLOW_UPS "pending_follow_ups", NEXT_DUE "next_due", HEARTBEAT "heartbeat");
    };
    (@ $adapter:literal; $($name:ident $file:literal $(+ $more:literal)*),*) => {
        $(
            #[doc = concat!("`src/store/", $adapter, "/sql/", $file, ".sql`"
                $(, " + `", $more, ".sql`")*, ".")]
            const $name: &str = concat!(queries!(@file $adapter, $file) $(, queries!(@file $adapter, $more))*);
        )*
    };
    (@file $adapter:literal, $file:literal) => {
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"), "/src/store/", $adapter, "/sql/", $file, ".sql"
        ))
    };
}

pub mod api;
pub mod migration;
pub mod pg;
pub(crate) mod shared;
pub mod sqlite;

use std::sync::Arc;

use anyhow::Context as _;
use feeder_actors::{JobStore, StoreError, StoreResult};

pub use migration::{Migration, MigrationReport};
pub use sqlite::{full_schema, latest_version, migrate, SqliteStore, BUSY_TIMEOUT};

/// What a call does when the server cannot be reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Patience {
    /// Fail at once, naming the server (the command line).
    FailFast,
    /// Try again with backoff until the server is back (the daemon).
    Reconnect,
}

/// Opens the job queue that `queue` names (`database_url`, or the SQLite
/// file at `db_path`), creating and migrating it, as the port everything
/// above the adapters holds. The one place that chooses an adapter (the
/// composition root): the daemon, the CLI, the MCP server and the demo all
/// open their store here. `patience` says what a PostgreSQL store does
/// when it loses its server: wait for it (the daemon) or fail (the CLI).
pub async fn connect(
    queue: &crate::config::QueueConfig,
    patience: Patience,
) -> anyhow::Result<Arc<dyn JobStore>> {
    Ok(open_queue(queue, patience).await?.0)
}

/// The job store and the result rows of one queue.
async fn open_queue(
    queue: &crate::config::QueueConfig,
    patience: Patience,
) -> anyhow::Result<(Arc<dyn JobStore>, Arc<dyn crate::results::ResultRows>)> {
    if let Some(url) = &queue.database_url {
        let store = Arc::new(pg::PgStore::connect(url, pg::Clock::Database, patience).await?);
        return Ok((store.clone(), store));
    }
    sqlite::open_port(queue.db_path.clone()).await
}

/// The OpenAI API's tables of the queue that `queue` names (already
/// migrated by the daemon's queue): on PostgreSQL, shared by every daemon
/// of the queue.
pub async fn open_api(
    queue: &crate::config::QueueConfig,
) -> anyhow::Result<Arc<dyn api::ApiStore>> {
    if let Some(url) = &queue.database_url {
        // A request finds the server gone at once (503), as with the
        // reader the API uses for jobs; the batch worker tries again at
        // its next tick.
        let store = pg::PgStore::connect(url, pg::Clock::Database, Patience::FailFast).await?;
        return Ok(Arc::new(store));
    }
    let path = queue.db_path.clone();
    let store = tokio::task::spawn_blocking(move || sqlite::api::SqliteApi::open(&path)).await??;
    Ok(Arc::new(store))
}

/// A queue opened: its jobs, and its results (written where
/// `results.store` says, read from wherever a job points).
#[derive(Clone)]
pub struct Opened {
    /// The job store.
    pub jobs: Arc<dyn JobStore>,
    /// The result documents.
    pub results: Arc<crate::results::Results>,
}

/// Opens the queue of `config` with its results (see [`connect`]).
pub async fn open(config: &crate::config::Config, patience: Patience) -> anyhow::Result<Opened> {
    let (jobs, rows) = open_queue(&config.queue, patience).await?;
    let dir = &config.queue.results_dir;
    let files = crate::results::FileResults::new(dir)
        .with_context(|| format!("creating queue.results_dir {}", dir.display()))?;
    Ok(Opened {
        jobs,
        results: Arc::new(crate::results::Results::new(
            files,
            rows,
            config.results_kind(),
        )),
    })
}

/// Creates or migrates the queue `queue` names and says what it did
/// (`gpu-feeder migrate`).
pub async fn migrate_queue(queue: &crate::config::QueueConfig) -> StoreResult<MigrationReport> {
    match &queue.database_url {
        Some(url) => pg::PgStore::connect_with_report(url, pg::Clock::Database, Patience::FailFast)
            .await
            .map(|(_, report)| report),
        None => {
            let path = queue.db_path.clone();
            tokio::task::spawn_blocking(move || migrate(&path))
                .await
                .unwrap_or_else(|e| Err(StoreError::Backend(format!("migrating panicked: {e}"))))
        }
    }
}
