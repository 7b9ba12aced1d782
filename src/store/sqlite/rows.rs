//! Reading `gpu_jobs` rows with `rusqlite` (the mapping itself is shared,
//! in `store::shared`), and the conversions every SQLite call uses.

use rusqlite::Row;

use feeder_actors::{Job, StoreError, StoreResult, Timestamp};

use crate::store::shared::{self, Columns};

/// Turns `rusqlite` errors into `StoreError::Backend`, or `Unavailable`
/// when the database stayed locked past the busy timeout.
pub(crate) trait Db<T> {
    fn db(self) -> StoreResult<T>;
}

impl<T> Db<T> for rusqlite::Result<T> {
    fn db(self) -> StoreResult<T> {
        self.map_err(|e| match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
                StoreError::Unavailable(e.to_string())
            }
            _ => StoreError::Backend(e.to_string()),
        })
    }
}

/// A timestamp as stored: unix seconds with a millisecond fraction.
pub(crate) fn secs(t: Timestamp) -> f64 {
    t.as_secs_f64()
}

/// A row of `SELECT rowid AS seq, * FROM gpu_jobs`.
struct SqliteRow<'a, 'r>(&'a Row<'r>);

impl SqliteRow<'_, '_> {
    fn get<T: rusqlite::types::FromSql>(&self, name: &str) -> Result<Option<T>, String> {
        self.0.get(name).map_err(|e| e.to_string())
    }
}

impl Columns for SqliteRow<'_, '_> {
    fn text(&self, name: &str) -> Result<Option<String>, String> {
        self.get(name)
    }

    fn int(&self, name: &str) -> Result<Option<i64>, String> {
        self.get(name)
    }

    fn real(&self, name: &str) -> Result<Option<f64>, String> {
        self.get(name)
    }

    fn blob(&self, name: &str) -> Result<Option<Vec<u8>>, String> {
        self.get(name)
    }

    fn json(&self, name: &str) -> Result<Option<String>, String> {
        self.get(name)
    }

    fn position(&self) -> String {
        format!("rowid {}", self.0.get::<_, i64>("seq").unwrap_or(-1))
    }
}

/// Reads a job from a row of `SELECT rowid AS seq, * FROM gpu_jobs`.
///
/// The outer `Result` is SQLite's (so that it fits `query_map`); the inner
/// one reports a row that breaks the contract, so one bad row is named
/// rather than hidden in a SQL error.
pub(crate) fn job_from_row(r: &Row<'_>) -> rusqlite::Result<StoreResult<Job>> {
    Ok(shared::job_from_row(&SqliteRow(r)))
}
