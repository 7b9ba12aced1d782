//! PostgreSQL schema migrations: the numbered files in
//! `migrations/postgres/`, embedded in the binary and applied in order in
//! one transaction, under an advisory lock so that daemons starting
//! together upgrade the database once. `schema_migrations` records what was
//! applied; a database recording a version this build does not know was
//! written by a newer gpu-feeder and is refused.

use tokio_postgres::Client;
use tracing::info;

use feeder_actors::{StoreError, StoreResult};

use crate::store::migration::{self, migrations, Migration, MigrationReport};

/// Every PostgreSQL migration, in order. A test checks that this matches
/// `migrations/postgres/`.
pub const MIGRATIONS: &[Migration] = migrations!("postgres";
    1 "0001" "gpu_jobs",
    2 "0002" "daemons",
    3 "0003" "notify",
    4 "0004" "results",
    5 "0005" "openai_api",
);

/// The newest PostgreSQL schema version this build knows.
pub fn latest_version() -> i64 {
    migration::latest(MIGRATIONS)
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
    migration::refuse_newer(MIGRATIONS, place, recorded)?;
    let known = latest_version();
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
        let name = migration::label(MIGRATIONS, m.version);
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
        migration::assert_lists_the_files("postgres", MIGRATIONS);
    }
}
