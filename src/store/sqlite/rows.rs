//! Reading `gpu_jobs` rows with `rusqlite` (the mapping itself is shared,
//! in `store::shared`), and the conversions every SQLite call uses.

use std::collections::HashMap;

use rusqlite::{Row, Statement};

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

/// The columns of a statement's rows by name, read once per statement:
/// `rusqlite` finds a column by name by comparing it with each column's
/// name in turn, which over the thirty columns of a job, for every column
/// of every claimed row, was a visible part of a claim's cost.
pub(crate) struct ColumnMap(HashMap<String, usize>);

impl ColumnMap {
    /// The columns of `stmt`'s rows.
    pub(crate) fn of(stmt: &Statement<'_>) -> Self {
        ColumnMap(
            stmt.column_names()
                .into_iter()
                .enumerate()
                .map(|(i, name)| (name.to_string(), i))
                .collect(),
        )
    }

    /// The index of the column `name`, if there is one.
    pub(crate) fn index(&self, name: &str) -> Option<usize> {
        self.0.get(name).copied()
    }
}

/// A row of `SELECT rowid AS seq, * FROM gpu_jobs`, with its statement's
/// columns when they were read beforehand.
struct SqliteRow<'a, 'r>(&'a Row<'r>, Option<&'a ColumnMap>);

impl SqliteRow<'_, '_> {
    fn get<T: rusqlite::types::FromSql>(&self, name: &str) -> Result<Option<T>, String> {
        match self.1.and_then(|c| c.index(name)) {
            Some(i) => self.0.get(i),
            // Not among the columns: the lookup by name says so in words.
            None => self.0.get(name),
        }
        .map_err(|e| e.to_string())
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
        format!(
            "rowid {}",
            self.get::<i64>("seq").ok().flatten().unwrap_or(-1)
        )
    }
}

/// Reads a job from a row of `SELECT rowid AS seq, * FROM gpu_jobs`.
///
/// The outer `Result` is SQLite's (so that it fits `query_map`); the inner
/// one reports a row that breaks the contract, so one bad row is named
/// rather than hidden in a SQL error.
pub(crate) fn job_from_row(r: &Row<'_>) -> rusqlite::Result<StoreResult<Job>> {
    Ok(shared::job_from_row(&SqliteRow(r, None)))
}

/// [`job_from_row`] for a row of a statement whose columns are `cols`.
pub(crate) fn job_from_mapped_row(
    r: &Row<'_>,
    cols: &ColumnMap,
) -> rusqlite::Result<StoreResult<Job>> {
    Ok(shared::job_from_row(&SqliteRow(r, Some(cols))))
}
