//! Reading PostgreSQL `gpu_jobs` rows with `tokio-postgres` (the mapping
//! itself is shared, in `store::shared`).

use tokio_postgres::types::FromSql;
use tokio_postgres::Row;

use feeder_actors::{Job, StoreResult};

use crate::store::shared::{self, Columns};

/// A row of `SELECT * FROM gpu_jobs` (or `RETURNING *`).
struct PgRow<'a>(&'a Row);

impl<'a> PgRow<'a> {
    fn get<T: FromSql<'a>>(&self, name: &str) -> Result<T, String> {
        self.0.try_get(name).map_err(|e| e.to_string())
    }
}

impl Columns for PgRow<'_> {
    fn text(&self, name: &str) -> Result<Option<String>, String> {
        self.get(name)
    }

    /// `bigint`, `integer` or `smallint`, whichever the column is.
    fn int(&self, name: &str) -> Result<Option<i64>, String> {
        self.get::<Option<i64>>(name)
            .or_else(|e| {
                self.get::<Option<i32>>(name)
                    .map(|v| v.map(i64::from))
                    .map_err(|_| e)
            })
            .or_else(|e| {
                self.get::<Option<i16>>(name)
                    .map(|v| v.map(i64::from))
                    .map_err(|_| e)
            })
    }

    fn real(&self, name: &str) -> Result<Option<f64>, String> {
        self.get(name)
    }

    fn blob(&self, name: &str) -> Result<Option<Vec<u8>>, String> {
        self.get(name)
    }

    fn json(&self, name: &str) -> Result<Option<String>, String> {
        Ok(self
            .get::<Option<serde_json::Value>>(name)?
            .map(|v| v.to_string()))
    }

    fn position(&self) -> String {
        format!("seq {}", self.0.try_get::<_, i64>("seq").unwrap_or(-1))
    }
}

/// Reads a job from a row of `SELECT * FROM gpu_jobs` (or `RETURNING *`).
pub(super) fn job_from_row(r: &Row) -> StoreResult<Job> {
    shared::job_from_row(&PgRow(r))
}
