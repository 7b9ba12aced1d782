//! The OpenAI API's tables on a SQLite queue, on a connection of their own.

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension};

use feeder_actors::{JobId, StoreError, StoreResult};

use crate::store::api::{ApiStore, BatchLock, BatchRow, Deleted, FileRow, LineCounts, LineJob};

/// The statuses of a batch that has ended.
const ENDED: &str = "('completed', 'failed', 'expired', 'cancelled')";

/// The API's tables in one SQLite file (already migrated by the queue).
#[derive(Clone)]
pub struct SqliteApi {
    conn: Arc<Mutex<Connection>>,
    /// The batches this daemon is working on (the API of a SQLite queue is
    /// served by one daemon).
    locked: Arc<Mutex<HashSet<String>>>,
}

/// A batch held in [`SqliteApi::locked`].
struct LocalLock {
    locked: Arc<Mutex<HashSet<String>>>,
    id: String,
}

impl Drop for LocalLock {
    fn drop(&mut self) {
        self.locked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

impl SqliteApi {
    /// Opens the queue at `path` for the API.
    pub fn open(path: &Path) -> StoreResult<Self> {
        let conn = Connection::open(path).map_err(|e| {
            StoreError::Backend(format!("cannot open database {}: {e}", path.display()))
        })?;
        conn.busy_timeout(super::BUSY_TIMEOUT)
            .map_err(|e| StoreError::Backend(e.to_string()))?;
        Ok(SqliteApi {
            conn: Arc::new(Mutex::new(conn)),
            locked: Arc::default(),
        })
    }

    async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> StoreResult<T> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut conn).map_err(|e| match e {
                rusqlite::Error::SqliteFailure(f, _)
                    if f.code == rusqlite::ErrorCode::DatabaseBusy =>
                {
                    StoreError::Unavailable(format!("the job database is locked: {e}"))
                }
                e => StoreError::Backend(e.to_string()),
            })
        })
        .await
        .unwrap_or_else(|e| {
            Err(StoreError::Backend(format!(
                "a database call panicked: {e}"
            )))
        })
    }
}

fn file_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<FileRow> {
    Ok(FileRow {
        id: r.get(0)?,
        filename: r.get(1)?,
        purpose: r.get(2)?,
        bytes: r.get::<_, i64>(3)? as u64,
        lines: r.get::<_, i64>(4)? as u64,
        created_at: r.get::<_, f64>(5)? as i64,
        path: r.get(6)?,
    })
}

const FILE_COLUMNS: &str = "id, filename, purpose, bytes, lines, created_at, path";
const BATCH_COLUMNS: &str = "id, status, input_file_id, created_at, doc";

fn batch_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<BatchRow> {
    let doc: String = r.get(4)?;
    Ok(BatchRow {
        id: r.get(0)?,
        status: r.get(1)?,
        input_file_id: r.get(2)?,
        created_at: r.get::<_, f64>(3)? as i64,
        doc: serde_json::from_str(&doc).unwrap_or_default(),
    })
}

fn job_id(r: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<JobId> {
    let bytes: Vec<u8> = r.get(i)?;
    JobId::from_slice(&bytes).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(
            i,
            rusqlite::types::Type::Blob,
            "a job id is 16 bytes".into(),
        )
    })
}

/// A page newest first: `seq` below that of `after` when given.
fn page<T>(
    conn: &Connection,
    table: &str,
    columns: &str,
    after: Option<String>,
    limit: usize,
    purpose: Option<String>,
    row: fn(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> rusqlite::Result<Vec<T>> {
    // Only api_files has a purpose; `?3` is NULL for every other table.
    let of_purpose = if purpose.is_some() {
        " AND purpose = ?3"
    } else {
        " AND ?3 IS NULL"
    };
    let sql = format!(
        "SELECT {columns} FROM {table} WHERE seq < COALESCE((SELECT seq FROM {table} WHERE id = ?1), 9223372036854775807){of_purpose} ORDER BY seq DESC LIMIT ?2"
    );
    let mut stmt = conn.prepare(&sql)?;
    let rows = stmt.query_map(
        params![after.unwrap_or_default(), limit as i64, purpose],
        row,
    )?;
    rows.collect()
}

#[async_trait]
impl ApiStore for SqliteApi {
    async fn put_file(&self, f: FileRow) -> StoreResult<()> {
        self.call(move |c| {
            c.execute(
                "INSERT OR REPLACE INTO api_files (id, filename, purpose, bytes, lines, created_at, path) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![f.id, f.filename, f.purpose, f.bytes as i64, f.lines as i64, f.created_at as f64, f.path],
            )
            .map(|_| ())
        })
        .await
    }

    async fn file(&self, id: &str) -> StoreResult<Option<FileRow>> {
        let id = id.to_string();
        self.call(move |c| {
            c.query_row(
                &format!("SELECT {FILE_COLUMNS} FROM api_files WHERE id = ?1"),
                [id],
                file_row,
            )
            .optional()
        })
        .await
    }

    async fn files(
        &self,
        after: Option<String>,
        limit: usize,
        purpose: Option<String>,
    ) -> StoreResult<Vec<FileRow>> {
        self.call(move |c| {
            page(
                c,
                "api_files",
                FILE_COLUMNS,
                after,
                limit,
                purpose,
                file_row,
            )
        })
        .await
    }

    async fn delete_file(&self, id: &str) -> StoreResult<Deleted> {
        let id = id.to_string();
        self.call(move |c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let Some(file) = tx
                .query_row(
                    &format!("SELECT {FILE_COLUMNS} FROM api_files WHERE id = ?1"),
                    [&id],
                    file_row,
                )
                .optional()?
            else {
                return Ok(Deleted::Missing);
            };
            let user: Option<String> = tx
                .query_row(
                    &format!("SELECT id FROM api_batches WHERE input_file_id = ?1 AND status NOT IN {ENDED} LIMIT 1"),
                    [&id],
                    |r| r.get(0),
                )
                .optional()?;
            if let Some(batch) = user {
                return Ok(Deleted::InUse(batch));
            }
            tx.execute("DELETE FROM api_files WHERE id = ?1", [&id])?;
            tx.commit()?;
            Ok(Deleted::Gone(file))
        })
        .await
    }

    async fn insert_batch(&self, b: BatchRow) -> StoreResult<()> {
        self.call(move |c| {
            c.execute(
                "INSERT INTO api_batches (id, status, input_file_id, created_at, doc) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![b.id, b.status, b.input_file_id, b.created_at as f64, b.doc.to_string()],
            )
            .map(|_| ())
        })
        .await
    }

    async fn update_batch(&self, from: &str, b: BatchRow) -> StoreResult<bool> {
        let from = from.to_string();
        self.call(move |c| {
            c.execute(
                "UPDATE api_batches SET status = ?2, doc = ?3 WHERE id = ?1 AND status = ?4",
                params![b.id, b.status, b.doc.to_string(), from],
            )
            .map(|n| n == 1)
        })
        .await
    }

    async fn batch(&self, id: &str) -> StoreResult<Option<BatchRow>> {
        let id = id.to_string();
        self.call(move |c| {
            c.query_row(
                &format!("SELECT {BATCH_COLUMNS} FROM api_batches WHERE id = ?1"),
                [id],
                batch_row,
            )
            .optional()
        })
        .await
    }

    async fn batches(&self, after: Option<String>, limit: usize) -> StoreResult<Vec<BatchRow>> {
        self.call(move |c| {
            page(
                c,
                "api_batches",
                BATCH_COLUMNS,
                after,
                limit,
                None,
                batch_row,
            )
        })
        .await
    }

    async fn batches_in(&self, statuses: &[&str]) -> StoreResult<Vec<BatchRow>> {
        let statuses: Vec<String> = statuses.iter().map(|s| s.to_string()).collect();
        self.call(move |c| {
            let list = serde_json::to_string(&statuses).unwrap_or_default();
            let mut stmt = c.prepare(&format!(
                "SELECT {BATCH_COLUMNS} FROM api_batches WHERE status IN (SELECT value FROM json_each(?1)) ORDER BY seq"
            ))?;
            let rows = stmt.query_map([list], batch_row)?;
            rows.collect()
        })
        .await
    }

    async fn add_lines(&self, batch_id: &str, lines: Vec<LineJob>) -> StoreResult<()> {
        let batch_id = batch_id.to_string();
        self.call(move |c| {
            let tx = c.transaction()?;
            {
                let mut stmt = tx.prepare(
                    "INSERT OR IGNORE INTO api_batch_lines (batch_id, line, custom_id, job_id) VALUES (?1, ?2, ?3, ?4)",
                )?;
                for l in &lines {
                    stmt.execute(params![batch_id, l.line as i64, l.custom_id, &l.job_id.0[..]])?;
                }
            }
            tx.commit()
        })
        .await
    }

    async fn line_counts(&self, batch_id: &str) -> StoreResult<LineCounts> {
        let batch_id = batch_id.to_string();
        self.call(move |c| {
            c.query_row(
                "SELECT count(*), \
                        coalesce(sum(j.status = 'done'), 0), \
                        coalesce(sum(j.status = 'failed' OR j.status IS NULL), 0), \
                        coalesce(sum(j.status = 'cancelled'), 0) \
                 FROM api_batch_lines l LEFT JOIN gpu_jobs j ON j.id = l.job_id \
                 WHERE l.batch_id = ?1",
                [batch_id],
                |r| {
                    Ok(LineCounts {
                        total: r.get::<_, i64>(0)? as u64,
                        done: r.get::<_, i64>(1)? as u64,
                        failed: r.get::<_, i64>(2)? as u64,
                        cancelled: r.get::<_, i64>(3)? as u64,
                    })
                },
            )
        })
        .await
    }

    async fn lines(&self, batch_id: &str) -> StoreResult<Vec<LineJob>> {
        let batch_id = batch_id.to_string();
        self.call(move |c| {
            let mut stmt = c.prepare(
                "SELECT line, custom_id, job_id FROM api_batch_lines WHERE batch_id = ?1 ORDER BY line",
            )?;
            let rows = stmt.query_map([batch_id], |r| {
                Ok(LineJob {
                    line: r.get::<_, i64>(0)? as u64,
                    custom_id: r.get(1)?,
                    job_id: job_id(r, 2)?,
                })
            })?;
            rows.collect()
        })
        .await
    }

    async fn unfinished_jobs(&self, batch_id: &str) -> StoreResult<Vec<JobId>> {
        let batch_id = batch_id.to_string();
        self.call(move |c| {
            let mut stmt = c.prepare(
                "SELECT l.job_id FROM api_batch_lines l JOIN gpu_jobs j ON j.id = l.job_id \
                 WHERE l.batch_id = ?1 AND j.status IN ('pending', 'processing')",
            )?;
            let rows = stmt.query_map([batch_id], |r| job_id(r, 0))?;
            rows.collect()
        })
        .await
    }

    async fn lock_batch(&self, batch_id: &str) -> StoreResult<Option<BatchLock>> {
        let mut locked = self.locked.lock().unwrap_or_else(|p| p.into_inner());
        if !locked.insert(batch_id.to_string()) {
            return Ok(None);
        }
        Ok(Some(BatchLock::new(LocalLock {
            locked: self.locked.clone(),
            id: batch_id.to_string(),
        })))
    }
}
