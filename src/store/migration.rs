//! What the two adapters' migrations have in common: a migration file, the
//! report of a run, the list of files embedded from `migrations/<adapter>/`,
//! their labels, and the refusal of a database newer than this build.

use feeder_actors::{StoreError, StoreResult};

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

/// What a migration run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationReport {
    /// The version found before (counting versions adopted by their shape).
    pub from: i64,
    /// The version now.
    pub to: i64,
    /// The migrations applied, as `NNNN_name`.
    pub applied: Vec<String>,
    /// Versions whose objects were found made by hand, without their mark,
    /// and recorded as applied.
    pub adopted: Vec<String>,
}

/// The migrations of one adapter, embedded from `migrations/$dir/`:
/// `migrations!("sqlite"; 1 "0001" "gpu_jobs", ...)`.
macro_rules! migrations {
    ($dir:literal; $($version:literal $number:literal $name:literal),* $(,)?) => {
        &[$(
            $crate::store::migration::Migration {
                version: $version,
                name: $name,
                sql: include_str!(concat!(
                    env!("CARGO_MANIFEST_DIR"), "/migrations/", $dir, "/", $number, "_", $name, ".sql"
                )),
            },
        )*]
    };
}
pub(crate) use migrations;

/// The newest version among `migrations`.
pub fn latest(migrations: &[Migration]) -> i64 {
    migrations.last().map_or(0, |m| m.version)
}

/// A version as `NNNN_name`, as the files are named.
pub fn label(migrations: &[Migration], version: i64) -> String {
    migrations
        .iter()
        .find(|m| m.version == version)
        .map_or_else(
            || format!("{version:04}"),
            |m| format!("{:04}_{}", m.version, m.name),
        )
}

/// Refuses a database (at `place`) that records a version newer than any
/// of `migrations`: a newer gpu-feeder wrote it.
pub fn refuse_newer(migrations: &[Migration], place: &str, recorded: i64) -> StoreResult<()> {
    let known = latest(migrations);
    if recorded > known {
        return Err(StoreError::TooNew {
            path: place.to_string(),
            found: recorded,
            known,
        });
    }
    Ok(())
}

/// Checks that `migrations` lists exactly the `.sql` files of
/// `migrations/<dir>/`, numbered 1, 2, 3, …
#[cfg(test)]
pub fn assert_lists_the_files(dir: &str, migrations: &[Migration]) {
    let dir = format!("{}/migrations/{dir}", env!("CARGO_MANIFEST_DIR"));
    let mut files: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".sql"))
        .collect();
    files.sort();
    let listed: Vec<String> = migrations
        .iter()
        .map(|m| format!("{:04}_{}.sql", m.version, m.name))
        .collect();
    assert_eq!(files, listed);
    for (i, m) in migrations.iter().enumerate() {
        assert_eq!(
            m.version,
            i as i64 + 1,
            "migration numbers must be 1, 2, 3, …"
        );
    }
}
