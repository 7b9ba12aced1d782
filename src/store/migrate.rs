//! Schema migrations: the numbered files in `migrations/`, embedded in the
//! binary and applied in order, each in its own transaction.
//!
//! Applied versions are recorded in `schema_migrations`. Opening a database
//! applies what is missing; a database that records a version this build
//! does not know was written by a newer gpu-feeder and is refused.

use rusqlite::{Connection, TransactionBehavior};

use feeder_actors::{StoreError, StoreResult, Timestamp};

/// One migration file.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// Its number, from the file name.
    pub version: i64,
    /// The rest of the file name.
    pub name: &'static str,
    /// The SQL.
    pub sql: &'static str,
}

/// Every migration, in order. A test checks that this matches `migrations/`.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "gpu_jobs",
        sql: include_str!("../../migrations/0001_gpu_jobs.sql"),
    },
    Migration {
        version: 2,
        name: "follow_ups",
        sql: include_str!("../../migrations/0002_follow_ups.sql"),
    },
    Migration {
        version: 3,
        name: "crashes",
        sql: include_str!("../../migrations/0003_crashes.sql"),
    },
];

/// The newest schema version this build knows.
pub fn latest_version() -> i64 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

/// What `migrate` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationReport {
    /// The version found before.
    pub from: i64,
    /// The version now.
    pub to: i64,
    /// The migrations applied, as `NNNN_name`.
    pub applied: Vec<String>,
}

/// Brings the database at `conn` (file `path`, for messages) up to date.
pub fn migrate(conn: &mut Connection, path: &str) -> StoreResult<MigrationReport> {
    let db = |e: rusqlite::Error| StoreError::Backend(format!("migrating {path}: {e}"));
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version    INTEGER PRIMARY KEY,
             name       TEXT NOT NULL,
             applied_at REAL NOT NULL
         );",
    )
    .map_err(db)?;
    let from: i64 = conn
        .query_row(
            "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
            [],
            |r| r.get(0),
        )
        .map_err(db)?;
    let known = latest_version();
    if from > known {
        return Err(StoreError::TooNew {
            path: path.to_string(),
            found: from,
            known,
        });
    }
    let mut applied = Vec::new();
    for m in MIGRATIONS.iter().filter(|m| m.version > from) {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db)?;
        // Another process may have applied it while we waited for the lock.
        let done: bool = tx
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM schema_migrations WHERE version = ?1)",
                [m.version],
                |r| r.get(0),
            )
            .map_err(db)?;
        if !done {
            tx.execute_batch(m.sql).map_err(|e| {
                StoreError::Backend(format!(
                    "migration {:04}_{} failed on {path}: {e}",
                    m.version, m.name
                ))
            })?;
            tx.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?1, ?2, ?3)",
                rusqlite::params![m.version, m.name, Timestamp::now().as_secs_f64()],
            )
            .map_err(db)?;
            applied.push(format!("{:04}_{}", m.version, m.name));
        }
        tx.commit().map_err(db)?;
    }
    Ok(MigrationReport {
        from,
        to: known,
        applied,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_in_migrations_is_listed_in_order() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/migrations");
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".sql"))
            .collect();
        files.sort();
        let listed: Vec<String> = MIGRATIONS
            .iter()
            .map(|m| format!("{:04}_{}.sql", m.version, m.name))
            .collect();
        assert_eq!(files, listed);
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(
                m.version,
                i as i64 + 1,
                "migration numbers must be 1, 2, 3, …"
            );
        }
    }
}
