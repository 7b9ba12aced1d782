//! PostgreSQL schema migrations: the numbered files in
//! `migrations/postgres/`, embedded in the binary and applied in order in
//! one transaction, under an advisory lock so that daemons starting
//! together upgrade the database once. `schema_migrations` records what was
//! applied; a database recording a version this build does not know was
//! written by a newer gpu-feeder and is refused.

use tokio_postgres::Client;
use tracing::info;

use feeder_actors::{StoreError, StoreResult};

use super::super::migrate::{Migration, MigrationReport};

/// Every PostgreSQL migration, in order. A test checks that this matches
/// `migrations/postgres/`.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "gpu_jobs",
        sql: include_str!("../../../migrations/postgres/0001_gpu_jobs.sql"),
    },
    Migration {
        version: 2,
        name: "daemons",
        sql: include_str!("../../../migrations/postgres/0002_daemons.sql"),
    },
    Migration {
        version: 3,
        name: "notify",
        sql: include_str!("../../../migrations/postgres/0003_notify.sql"),
    },
    Migration {
        version: 4,
        name: "results",
        sql: include_str!("../../../migrations/postgres/0004_results.sql"),
    },
];

/// The newest PostgreSQL schema version this build knows.
pub fn latest_version() -> i64 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

/// Any number, the same in every daemon: the advisory lock that serialises
/// migrations ("gpu-feeder" in ASCII, folded).
const LOCK_KEY: i64 = 0x6770_752d_6665_6564;

/// Creates or upgrades the schema on `client`; `place` names the server in
/// messages.
pub async fn migrate(client: &mut Client, place: &str) -> StoreResult<MigrationReport> {
    let db = |e: tokio_postgres::Error| {
        StoreError::Backend(format!(
            "migrating the queue on {place}: {}",
            super::pg_text(&e)
        ))
    };
    let tx = client.transaction().await.map_err(db)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY])
        .await
        .map_err(db)?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version    bigint PRIMARY KEY,
             name       text NOT NULL,
             applied_at double precision NOT NULL DEFAULT extract(epoch FROM now())
         );",
    )
    .await
    .map_err(db)?;
    let recorded: i64 = tx
        .query_one(
            "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
            &[],
        )
        .await
        .map_err(db)?
        .get(0);
    let known = latest_version();
    if recorded > known {
        return Err(StoreError::TooNew {
            path: place.to_string(),
            found: recorded,
            known,
        });
    }
    if recorded == 0 {
        let found: Option<String> = tx
            .query_one("SELECT to_regclass('gpu_jobs')::text", &[])
            .await
            .map_err(db)?
            .get(0);
        if found.is_some() {
            return Err(StoreError::Schema(format!(
                "the database on {place} has a gpu_jobs table that gpu-feeder did not create (no schema_migrations rows): point queue.database_url at another database, or drop that table"
            )));
        }
    }
    let mut applied = Vec::new();
    for m in MIGRATIONS.iter().filter(|m| m.version > recorded) {
        let name = format!("{:04}_{}", m.version, m.name);
        tx.batch_execute(m.sql).await.map_err(|e| {
            StoreError::Backend(format!(
                "migration {name} failed on {place}: {} (nothing was changed)",
                super::pg_text(&e)
            ))
        })?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
            &[&m.version, &m.name],
        )
        .await
        .map_err(db)?;
        applied.push(name);
    }
    tx.commit().await.map_err(db)?;
    if !applied.is_empty() {
        info!(
            "migrated the queue on {place} to version {known}: {}",
            applied.join(", ")
        );
    }
    Ok(MigrationReport {
        from: recorded,
        to: known,
        applied,
        adopted: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_in_migrations_postgres_is_listed_in_order() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/postgres");
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
