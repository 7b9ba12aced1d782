//! The OpenAI API's tables on a PostgreSQL queue: every daemon sharing the
//! queue serves the same files and batches (their content lies in
//! `api.files_dir`, which those daemons must share).

use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::Object;
use tokio_postgres::Row;

use feeder_actors::{JobId, StoreError, StoreResult};

use super::{Op, OpError, PgStore};
use crate::store::api::{ApiStore, BatchLock, BatchRow, Deleted, FileRow, LineCounts, LineJob};

/// The statuses of a batch that has ended.
const ENDED: &str = "('completed', 'failed', 'expired', 'cancelled')";

const FILE_COLUMNS: &str = "id, filename, purpose, bytes, lines, created_at, path";
const BATCH_COLUMNS: &str = "id, status, input_file_id, created_at, doc";

fn file_row(r: &Row) -> FileRow {
    FileRow {
        id: r.get(0),
        filename: r.get(1),
        purpose: r.get(2),
        bytes: r.get::<_, i64>(3) as u64,
        lines: r.get::<_, i64>(4) as u64,
        created_at: r.get::<_, f64>(5) as i64,
        path: r.get(6),
    }
}

fn batch_row(r: &Row) -> BatchRow {
    BatchRow {
        id: r.get(0),
        status: r.get(1),
        input_file_id: r.get(2),
        created_at: r.get::<_, f64>(3) as i64,
        doc: r.get(4),
    }
}

fn job_id(bytes: &[u8]) -> Op<JobId> {
    JobId::from_slice(bytes).ok_or_else(|| {
        OpError::Store(StoreError::Corrupt {
            id: hex::encode(bytes),
            reason: "a job id in api_batch_lines is not 16 bytes".into(),
        })
    })
}

/// A page newest first: `seq` below that of `after` when given (`purpose`
/// only for `api_files`).
async fn page<T>(
    c: &Object,
    table: &str,
    columns: &str,
    after: &Option<String>,
    limit: usize,
    purpose: &Option<String>,
    row: fn(&Row) -> T,
) -> Op<Vec<T>> {
    let of_purpose = if purpose.is_some() {
        " AND purpose = $3"
    } else {
        " AND $3::text IS NULL"
    };
    let sql = format!(
        "SELECT {columns} FROM {table} \
         WHERE seq < COALESCE((SELECT seq FROM {table} WHERE id = $1), 9223372036854775807){of_purpose} \
         ORDER BY seq DESC LIMIT $2"
    );
    let st = c.prepare_cached(&sql).await?;
    let after = after.clone().unwrap_or_default();
    let rows = c.query(&st, &[&after, &(limit as i64), purpose]).await?;
    Ok(rows.iter().map(row).collect())
}

/// How long a daemon waits for the transaction holding a batch's lock to
/// begin before it leaves the batch to the next tick.
const LOCK_WAIT: Duration = Duration::from_secs(10);

#[async_trait]
impl ApiStore for PgStore {
    async fn put_file(&self, f: FileRow) -> StoreResult<()> {
        run!(self, |c, _tries| {
            let st = c
                .prepare_cached(
                    "INSERT INTO api_files (id, filename, purpose, bytes, lines, created_at, path) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7) \
                     ON CONFLICT (id) DO UPDATE SET filename = EXCLUDED.filename, \
                     purpose = EXCLUDED.purpose, bytes = EXCLUDED.bytes, lines = EXCLUDED.lines, \
                     created_at = EXCLUDED.created_at, path = EXCLUDED.path",
                )
                .await?;
            c.execute(
                &st,
                &[
                    &f.id,
                    &f.filename,
                    &f.purpose,
                    &(f.bytes as i64),
                    &(f.lines as i64),
                    &(f.created_at as f64),
                    &f.path,
                ],
            )
            .await?;
            Ok(())
        })
    }

    async fn file(&self, id: &str) -> StoreResult<Option<FileRow>> {
        run!(self, |c, _tries| {
            let st = c
                .prepare_cached(&format!(
                    "SELECT {FILE_COLUMNS} FROM api_files WHERE id = $1"
                ))
                .await?;
            Ok(c.query_opt(&st, &[&id]).await?.as_ref().map(file_row))
        })
    }

    async fn files(
        &self,
        after: Option<String>,
        limit: usize,
        purpose: Option<String>,
    ) -> StoreResult<Vec<FileRow>> {
        run!(self, |c, _tries| {
            page(
                c,
                "api_files",
                FILE_COLUMNS,
                &after,
                limit,
                &purpose,
                file_row,
            )
            .await
        })
    }

    async fn delete_file(&self, id: &str) -> StoreResult<Deleted> {
        run!(self, |tx| {
            // The file's row is locked first, so that a batch created from
            // it meanwhile either sees it gone or is seen here.
            let file = tx
                .query_opt(
                    &format!("SELECT {FILE_COLUMNS} FROM api_files WHERE id = $1 FOR UPDATE"),
                    &[&id],
                )
                .await?
                .as_ref()
                .map(file_row);
            match file {
                None => Deleted::Missing,
                Some(file) => {
                    let user = tx
                        .query_opt(
                            &format!(
                                "SELECT id FROM api_batches WHERE input_file_id = $1 \
                                 AND status NOT IN {ENDED} LIMIT 1"
                            ),
                            &[&id],
                        )
                        .await?;
                    match user {
                        Some(batch) => Deleted::InUse(batch.get(0)),
                        None => {
                            tx.execute("DELETE FROM api_files WHERE id = $1", &[&id])
                                .await?;
                            Deleted::Gone(file)
                        }
                    }
                }
            }
        })
    }

    async fn insert_batch(&self, b: BatchRow) -> StoreResult<()> {
        run!(self, |c, _tries| {
            let st = c
                .prepare_cached(
                    "INSERT INTO api_batches (id, status, input_file_id, created_at, doc) \
                     VALUES ($1, $2, $3, $4, $5)",
                )
                .await?;
            c.execute(
                &st,
                &[
                    &b.id,
                    &b.status,
                    &b.input_file_id,
                    &(b.created_at as f64),
                    &b.doc,
                ],
            )
            .await?;
            Ok(())
        })
    }

    async fn update_batch(&self, from: &str, b: BatchRow) -> StoreResult<bool> {
        run!(self, |c, _tries| {
            let st = c
                .prepare_cached(
                    "UPDATE api_batches SET status = $2, doc = $3 WHERE id = $1 AND status = $4",
                )
                .await?;
            Ok(c.execute(&st, &[&b.id, &b.status, &b.doc, &from]).await? == 1)
        })
    }

    async fn batch(&self, id: &str) -> StoreResult<Option<BatchRow>> {
        run!(self, |c, _tries| {
            let st = c
                .prepare_cached(&format!(
                    "SELECT {BATCH_COLUMNS} FROM api_batches WHERE id = $1"
                ))
                .await?;
            Ok(c.query_opt(&st, &[&id]).await?.as_ref().map(batch_row))
        })
    }

    async fn batches(&self, after: Option<String>, limit: usize) -> StoreResult<Vec<BatchRow>> {
        run!(self, |c, _tries| {
            page(
                c,
                "api_batches",
                BATCH_COLUMNS,
                &after,
                limit,
                &None,
                batch_row,
            )
            .await
        })
    }

    async fn batches_in(&self, statuses: &[&str]) -> StoreResult<Vec<BatchRow>> {
        let statuses: Vec<String> = statuses.iter().map(|s| s.to_string()).collect();
        run!(self, |c, _tries| {
            let st = c
                .prepare_cached(&format!(
                    "SELECT {BATCH_COLUMNS} FROM api_batches WHERE status = ANY($1) ORDER BY seq"
                ))
                .await?;
            Ok(c.query(&st, &[&statuses])
                .await?
                .iter()
                .map(batch_row)
                .collect())
        })
    }

    async fn add_lines(&self, batch_id: &str, lines: Vec<LineJob>) -> StoreResult<()> {
        let numbers: Vec<i64> = lines.iter().map(|l| l.line as i64).collect();
        let customs: Vec<&str> = lines.iter().map(|l| l.custom_id.as_str()).collect();
        let jobs: Vec<&[u8]> = lines.iter().map(|l| l.job_id.0.as_slice()).collect();
        run!(self, |c, _tries| {
            // One statement for the whole chunk; lines recorded before (a
            // restart, or another daemon that queued them) are kept.
            let st = c
                .prepare_cached(
                    "INSERT INTO api_batch_lines (batch_id, line, custom_id, job_id) \
                     SELECT $1, * FROM unnest($2::bigint[], $3::text[], $4::bytea[]) \
                     ON CONFLICT (batch_id, line) DO NOTHING",
                )
                .await?;
            c.execute(&st, &[&batch_id, &numbers, &customs, &jobs])
                .await?;
            Ok(())
        })
    }

    async fn line_counts(&self, batch_id: &str) -> StoreResult<LineCounts> {
        run!(self, |c, _tries| {
            let st = c
                .prepare_cached(
                    "SELECT count(*), \
                            count(*) FILTER (WHERE j.status = 'done'), \
                            count(*) FILTER (WHERE j.status = 'failed' OR j.status IS NULL), \
                            count(*) FILTER (WHERE j.status = 'cancelled') \
                     FROM api_batch_lines l LEFT JOIN gpu_jobs j ON j.id = l.job_id \
                     WHERE l.batch_id = $1",
                )
                .await?;
            let r = c.query_one(&st, &[&batch_id]).await?;
            Ok(LineCounts {
                total: r.get::<_, i64>(0) as u64,
                done: r.get::<_, i64>(1) as u64,
                failed: r.get::<_, i64>(2) as u64,
                cancelled: r.get::<_, i64>(3) as u64,
            })
        })
    }

    async fn lines(&self, batch_id: &str) -> StoreResult<Vec<LineJob>> {
        run!(self, |c, _tries| {
            let st = c
                .prepare_cached(
                    "SELECT line, custom_id, job_id FROM api_batch_lines \
                     WHERE batch_id = $1 ORDER BY line",
                )
                .await?;
            c.query(&st, &[&batch_id])
                .await?
                .iter()
                .map(|r| {
                    Ok(LineJob {
                        line: r.get::<_, i64>(0) as u64,
                        custom_id: r.get(1),
                        job_id: job_id(r.get(2))?,
                    })
                })
                .collect()
        })
    }

    async fn unfinished_jobs(&self, batch_id: &str) -> StoreResult<Vec<JobId>> {
        run!(self, |c, _tries| {
            let st = c
                .prepare_cached(
                    "SELECT l.job_id FROM api_batch_lines l JOIN gpu_jobs j ON j.id = l.job_id \
                     WHERE l.batch_id = $1 AND j.status IN ('pending', 'processing')",
                )
                .await?;
            c.query(&st, &[&batch_id])
                .await?
                .iter()
                .map(|r| job_id(r.get(0)))
                .collect()
        })
    }

    /// A transaction-scoped advisory lock on the batch, held by a task of
    /// its own on a pooled connection until the lock is dropped (or the
    /// connection dies with its daemon): one daemon at a time queues,
    /// advances or finalizes a batch.
    async fn lock_batch(&self, id: &str) -> StoreResult<Option<BatchLock>> {
        let (taken_tx, taken_rx) = tokio::sync::oneshot::channel::<StoreResult<bool>>();
        let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
        let pool = self.pool.clone();
        let place = self.shared.place.clone();
        let key = format!("gpu-feeder batch {id}");
        tokio::spawn(async move {
            let fail = |e: String| StoreError::Unavailable(format!("the queue on {place}: {e}"));
            let mut client = match pool.get().await {
                Ok(c) => c,
                Err(e) => {
                    let _ = taken_tx.send(Err(fail(e.to_string())));
                    return;
                }
            };
            let tx = match client.transaction().await {
                Ok(tx) => tx,
                Err(e) => {
                    let _ = taken_tx.send(Err(fail(super::pg_text(&e))));
                    return;
                }
            };
            let taken = tx
                .query_one(
                    "SELECT pg_try_advisory_xact_lock(hashtextextended($1, 0))",
                    &[&key],
                )
                .await
                .map(|r| r.get::<_, bool>(0))
                .map_err(|e| fail(super::pg_text(&e)));
            let held = matches!(taken, Ok(true));
            if taken_tx.send(taken).is_err() || !held {
                return;
            }
            // Held until the lock is dropped; the rollback releases it.
            let _ = release_rx.await;
            let _ = tx.rollback().await;
        });
        match tokio::time::timeout(LOCK_WAIT, taken_rx).await {
            Ok(Ok(Ok(true))) => Ok(Some(BatchLock::new(release_tx))),
            Ok(Ok(Ok(false))) => Ok(None),
            Ok(Ok(Err(e))) => Err(e),
            Ok(Err(_)) | Err(_) => Ok(None),
        }
    }
}
