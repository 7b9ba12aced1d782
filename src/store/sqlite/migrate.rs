//! Schema migrations: the numbered files in `migrations/sqlite/`, embedded in the
//! binary and applied in order, all in one transaction (a failed upgrade
//! leaves the database as it was).
//!
//! Each file ends by recording its own version in `schema_migrations` (the
//! first file makes that table, and [`migrate`] makes it before anything
//! else, for a database adopted by its shape), so a
//! database built by running the files through the `sqlite3` CLI (as other
//! programs may) is marked exactly as one built here. A database whose
//! tables were made by hand from older copies of the files carries no marks;
//! it is recognised by its shape instead: the tables, columns and indexes
//! each version creates ([`Shape`]), compared with what is there. It is then
//! adopted at the version it matches and upgraded from there. A `gpu_jobs`
//! table that matches no version is refused with what differs, before
//! anything is changed. A database that records a version this build does
//! not know was written by a newer gpu-feeder and is refused too.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::OnceLock;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior};
use tracing::info;

use feeder_actors::{StoreError, StoreResult, Timestamp};

use crate::store::migration::{self, migrations, Migration, MigrationReport};

/// Every migration, in order. A test checks that this matches `migrations/sqlite/`.
pub const MIGRATIONS: &[Migration] = migrations!("sqlite";
    1 "0001" "gpu_jobs",
    2 "0002" "follow_ups",
    3 "0003" "crashes",
    4 "0004" "due",
    5 "0005" "place",
    6 "0006" "prefix",
    7 "0007" "daemons_results",
    8 "0008" "openai_api",
);

/// The newest schema version this build knows.
pub fn latest_version() -> i64 {
    migration::latest(MIGRATIONS)
}

/// The whole current schema as one SQL script: every migration in order,
/// each recording its version. `gpu-feeder schema | sqlite3 jobs.db`
/// makes a database this build uses as it is.
pub fn full_schema() -> String {
    let mut out = format!(
        "-- gpu-feeder job queue schema, version {} (every migration in order).\n\
         -- Apply with: gpu-feeder schema | sqlite3 jobs.db\n\
         -- Each part records its version in schema_migrations, so gpu-feeder\n\
         -- upgrades such a database from where it stands.\n",
        latest_version()
    );
    for m in MIGRATIONS {
        out.push_str(&format!("\n-- ---- {:04}_{}.sql\n", m.version, m.name));
        out.push_str(m.sql.trim_end());
        out.push('\n');
    }
    out
}

/// A column as `PRAGMA table_info` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Column {
    decl_type: String,
    not_null: bool,
    default: Option<String>,
    primary_key: bool,
}

impl fmt::Display for Column {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = if self.decl_type.is_empty() {
            "untyped"
        } else {
            self.decl_type.as_str()
        };
        write!(f, "{t}")?;
        if self.primary_key {
            write!(f, " PRIMARY KEY")?;
        }
        if self.not_null {
            write!(f, " NOT NULL")?;
        }
        if let Some(d) = &self.default {
            write!(f, " DEFAULT {d}")?;
        }
        Ok(())
    }
}

/// An index as `PRAGMA index_list` / `index_xinfo` describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Index {
    table: String,
    unique: bool,
    partial: bool,
    /// Key columns, with ` DESC` where descending.
    columns: Vec<String>,
}

impl fmt::Display for Index {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}{} ON {} ({})",
            if self.unique { "UNIQUE " } else { "" },
            if self.partial { "partial" } else { "full" },
            self.table,
            self.columns.join(", ")
        )
    }
}

/// One way a schema differs from a version's: a missing table; a column
/// or index missing (`None`) or defined otherwise (`Some(what it is)`),
/// with what the version defines.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Diff {
    Table(String),
    Column(String, String, Option<String>),
    Index(String, String, Option<String>),
}

impl std::fmt::Display for Diff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Diff::Table(t) => write!(f, "table {t} is missing"),
            Diff::Column(c, want, None) => write!(f, "column {c} ({want}) is missing"),
            Diff::Column(c, want, Some(got)) => {
                write!(f, "column {c} is {got} here, {want} expected")
            }
            Diff::Index(i, want, None) => write!(f, "index {i} ({want}) is missing"),
            Diff::Index(i, want, Some(got)) => {
                write!(f, "index {i} is {got} here, {want} expected")
            }
        }
    }
}

/// The differences in a few lines' worth: missing objects by name (the
/// first few), differing ones in full. SQLite's own indexes for a primary
/// key or a UNIQUE column are left out: their column says it all.
fn summarise(diffs: &[Diff]) -> String {
    fn names(what: &str, list: Vec<&str>) -> Option<String> {
        const SHOWN: usize = 8;
        match list.len() {
            0 => None,
            n if n > SHOWN => Some(format!(
                "{what} missing: {} and {} more",
                list[..SHOWN].join(", "),
                n - SHOWN
            )),
            _ => Some(format!("{what} missing: {}", list.join(", "))),
        }
    }
    let mut parts = Vec::new();
    let missing = |pick: fn(&Diff) -> Option<&str>| diffs.iter().filter_map(pick).collect();
    parts.extend(names(
        "tables",
        missing(|d| match d {
            Diff::Table(t) => Some(t.as_str()),
            _ => None,
        }),
    ));
    parts.extend(names(
        "columns",
        missing(|d| match d {
            Diff::Column(c, _, None) => Some(c.as_str()),
            _ => None,
        }),
    ));
    parts.extend(
        diffs
            .iter()
            .filter(|d| matches!(d, Diff::Column(_, _, Some(_))))
            .map(Diff::to_string),
    );
    parts.extend(names(
        "indexes",
        missing(|d| match d {
            Diff::Index(i, _, None) if !i.starts_with("sqlite_autoindex_") => Some(i.as_str()),
            _ => None,
        }),
    ));
    parts.extend(
        diffs
            .iter()
            .filter(
                |d| matches!(d, Diff::Index(i, _, Some(_)) if !i.starts_with("sqlite_autoindex_")),
            )
            .map(Diff::to_string),
    );
    parts.join("; ")
}

/// The objects a schema version consists of: tables with their columns,
/// and indexes. Objects of other programs are not part of it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Shape {
    tables: BTreeMap<String, BTreeMap<String, Column>>,
    indexes: BTreeMap<String, Index>,
}

impl Shape {
    /// What `actual` lacks or has otherwise than `self` (extra objects,
    /// such as another program's index, are not differences).
    fn missing_from(&self, actual: &Shape) -> Vec<Diff> {
        let mut out = Vec::new();
        for (table, columns) in &self.tables {
            let Some(have) = actual.tables.get(table) else {
                out.push(Diff::Table(table.clone()));
                continue;
            };
            for (name, want) in columns {
                let column = format!("{table}.{name}");
                match have.get(name) {
                    None => out.push(Diff::Column(column, want.to_string(), None)),
                    Some(got) if got != want => out.push(Diff::Column(
                        column,
                        want.to_string(),
                        Some(got.to_string()),
                    )),
                    Some(_) => {}
                }
            }
        }
        for (name, want) in &self.indexes {
            match actual.indexes.get(name) {
                None => out.push(Diff::Index(name.clone(), want.to_string(), None)),
                Some(got) if got != want => out.push(Diff::Index(
                    name.clone(),
                    want.to_string(),
                    Some(got.to_string()),
                )),
                Some(_) => {}
            }
        }
        out
    }

    /// Columns of our tables that the schema does not have.
    fn extra_columns(&self, actual: &Shape) -> Vec<String> {
        let mut out = Vec::new();
        for (table, columns) in &self.tables {
            for name in actual.tables.get(table).into_iter().flat_map(|c| c.keys()) {
                if !columns.contains_key(name) {
                    out.push(format!("{table}.{name}"));
                }
            }
        }
        out
    }
}

/// Collapses white space, so that `DEFAULT ( 0 )` and `DEFAULT (0)` agree.
fn squeeze(s: &str) -> String {
    let mut out = String::new();
    for word in s.split_whitespace() {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(word);
    }
    out.replace("( ", "(").replace(" )", ")")
}

/// Reads the shape of every table and index in `conn` (except SQLite's own
/// and `schema_migrations`).
fn read_shape(conn: &Connection) -> rusqlite::Result<Shape> {
    let mut shape = Shape::default();
    let tables: Vec<String> = conn
        .prepare(
            "SELECT name FROM sqlite_master WHERE type = 'table' \
             AND name NOT LIKE 'sqlite_%' AND name <> 'schema_migrations' ORDER BY name",
        )?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    for table in tables {
        let mut columns = BTreeMap::new();
        let mut stmt = conn
            .prepare("SELECT name, type, \"notnull\", dflt_value, pk FROM pragma_table_info(?1)")?;
        let rows = stmt.query_map([&table], |r| {
            Ok((
                r.get::<_, String>(0)?,
                Column {
                    decl_type: r.get::<_, String>(1)?.to_ascii_uppercase(),
                    not_null: r.get::<_, bool>(2)?,
                    default: r.get::<_, Option<String>>(3)?.map(|d| squeeze(&d)),
                    primary_key: r.get::<_, i64>(4)? > 0,
                },
            ))
        })?;
        for row in rows {
            let (name, column) = row?;
            columns.insert(name, column);
        }
        let indexes: Vec<(String, bool, bool)> = conn
            .prepare("SELECT name, \"unique\", partial FROM pragma_index_list(?1)")?
            .query_map([&table], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<Result<_, _>>()?;
        for (name, unique, partial) in indexes {
            let columns: Vec<String> = conn
                .prepare(
                    "SELECT name, \"desc\" FROM pragma_index_xinfo(?1) WHERE key = 1 ORDER BY seqno",
                )?
                .query_map([&name], |r| {
                    let col: Option<String> = r.get(0)?;
                    let desc: bool = r.get(1)?;
                    let col = col.unwrap_or_else(|| "<expression>".into());
                    Ok(if desc { format!("{col} DESC") } else { col })
                })?
                .collect::<Result<_, _>>()?;
            shape.indexes.insert(
                name,
                Index {
                    table: table.clone(),
                    unique,
                    partial,
                    columns,
                },
            );
        }
        shape.tables.insert(table, columns);
    }
    Ok(shape)
}

/// The shape after each version, index 0 being the empty database: built
/// once by applying the embedded migrations to an in-memory database.
fn shapes() -> &'static [Shape] {
    static SHAPES: OnceLock<Vec<Shape>> = OnceLock::new();
    SHAPES.get_or_init(|| {
        let conn = Connection::open_in_memory().expect("an in-memory database");
        let mut out = vec![Shape::default()];
        for m in MIGRATIONS {
            conn.execute_batch(m.sql)
                .unwrap_or_else(|e| panic!("migration {:04}_{} is broken: {e}", m.version, m.name));
            out.push(read_shape(&conn).expect("reading an in-memory schema"));
        }
        out
    })
}

fn label(version: i64) -> String {
    migration::label(MIGRATIONS, version)
}

/// The version a database's objects show: the newest whose every object is
/// there as that version made it, or `None` with what differs from the
/// closest one when there are objects of ours but no version fits.
fn recognise(actual: &Shape) -> Result<i64, (i64, Vec<Diff>)> {
    let shapes = shapes();
    let mut best: Option<i64> = None;
    for (v, want) in shapes.iter().enumerate().skip(1) {
        if want.missing_from(actual).is_empty() {
            best = Some(v as i64);
        }
    }
    match best {
        // A version that left no trace (a data-only migration) is never
        // taken as applied on the strength of its shape.
        Some(mut v) => {
            while v > 1 && shapes[v as usize] == shapes[v as usize - 1] {
                v -= 1;
            }
            Ok(v)
        }
        None => {
            let (closest, diffs) = shapes
                .iter()
                .enumerate()
                .skip(1)
                .map(|(v, want)| (v as i64, want.missing_from(actual)))
                .min_by_key(|(v, d)| (d.len(), -v))
                .expect("at least one migration");
            Err((closest, diffs))
        }
    }
}

fn foreign(path: &str, closest: i64, diffs: &[Diff], extra: &[String]) -> StoreError {
    let mut what = summarise(diffs);
    if !extra.is_empty() {
        what.push_str(&format!(
            "; columns gpu-feeder does not know: {}",
            extra.join(", ")
        ));
    }
    StoreError::Schema(format!(
        "the table gpu_jobs in {path} matches no schema version of gpu-feeder (closest: version \
         {closest}, {}): {what}. Nothing was changed. Point queue.db_path at another file, or \
         rename that table; `gpu-feeder schema` prints the schema gpu-feeder expects",
        label(closest)
    ))
}

/// Brings the database at `conn` (file `path`, for messages) up to date.
pub fn migrate(conn: &mut Connection, path: &str) -> StoreResult<MigrationReport> {
    let db = |e: rusqlite::Error| StoreError::Backend(format!("migrating {path}: {e}"));
    // One writer at a time decides what the database is and upgrades it.
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(db)?;
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version    INTEGER PRIMARY KEY,
             name       TEXT NOT NULL,
             applied_at REAL NOT NULL
         );",
    )
    .map_err(db)?;
    let recorded: i64 = tx
        .query_row(
            "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
            [],
            |r| r.get(0),
        )
        .map_err(db)?;
    migration::refuse_newer(MIGRATIONS, path, recorded)?;
    let known = latest_version();
    let has_jobs = tx
        .query_row(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'gpu_jobs'",
            [],
            |_| Ok(()),
        )
        .optional()
        .map_err(db)?
        .is_some();
    let mut adopted = Vec::new();
    let from = if has_jobs {
        let actual = read_shape(&tx).map_err(db)?;
        match recognise(&actual) {
            Ok(v) if v >= recorded => {
                for m in MIGRATIONS
                    .iter()
                    .filter(|m| m.version > recorded && m.version <= v)
                {
                    tx.execute(
                        "INSERT OR IGNORE INTO schema_migrations (version, name, applied_at) VALUES (?1, ?2, ?3)",
                        rusqlite::params![m.version, m.name, Timestamp::now().as_secs_f64()],
                    )
                    .map_err(db)?;
                    adopted.push(label(m.version));
                }
                v
            }
            Ok(v) => {
                let diffs = shapes()[recorded as usize].missing_from(&actual);
                return Err(StoreError::Schema(format!(
                    "{path} records schema version {recorded} ({}), but its tables are those of \
                     version {v} ({}): {}. Nothing was changed. A migration was applied by hand only \
                     in part: finish it with the statements of `gpu-feeder schema`, or point \
                     queue.db_path at another file",
                    label(recorded),
                    label(v),
                    summarise(&diffs)
                )));
            }
            Err((closest, diffs)) => {
                let extra = shapes()[closest as usize].extra_columns(&actual);
                return Err(foreign(path, closest, &diffs, &extra));
            }
        }
    } else if recorded > 0 {
        return Err(StoreError::Schema(format!(
            "{path} records schema version {recorded} ({}) but has no gpu_jobs table: it was \
             dropped. Nothing was changed. Point queue.db_path at another file, or delete \
             schema_migrations to start this one afresh",
            label(recorded)
        )));
    } else {
        0
    };
    if !adopted.is_empty() {
        info!(
            "{path}: found the tables of schema version {from} made without gpu-feeder; recorded {} as applied",
            adopted.join(", ")
        );
    }
    let mut applied = Vec::new();
    for m in MIGRATIONS.iter().filter(|m| m.version > from) {
        tx.execute_batch(m.sql).map_err(|e| {
            StoreError::Backend(format!(
                "migration {} failed on {path}: {e}; nothing of it was applied",
                label(m.version)
            ))
        })?;
        // The file records itself; this covers a file that did not.
        tx.execute(
            "INSERT OR IGNORE INTO schema_migrations (version, name, applied_at) VALUES (?1, ?2, ?3)",
            rusqlite::params![m.version, m.name, Timestamp::now().as_secs_f64()],
        )
        .map_err(db)?;
        applied.push(label(m.version));
    }
    tx.commit().map_err(db)?;
    Ok(MigrationReport {
        from,
        to: known,
        applied,
        adopted,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_in_migrations_is_listed_in_order() {
        migration::assert_lists_the_files("sqlite", MIGRATIONS);
    }

    #[test]
    fn every_file_records_its_own_version() {
        let conn = Connection::open_in_memory().unwrap();
        for m in MIGRATIONS {
            conn.execute_batch(m.sql).unwrap();
            let name: String = conn
                .query_row(
                    "SELECT name FROM schema_migrations WHERE version = ?1",
                    [m.version],
                    |r| r.get(0),
                )
                .unwrap_or_else(|e| panic!("{:04}_{} leaves no mark: {e}", m.version, m.name));
            assert_eq!(name, m.name);
        }
    }

    #[test]
    fn every_version_has_a_shape_of_its_own() {
        let s = shapes();
        for v in 1..s.len() {
            assert_ne!(s[v], s[v - 1], "migration {v} changes no table or index");
        }
    }

    /// The file's statements without its mark: as an older copy of the
    /// migration, or a hand-made schema, would leave the database.
    fn unmarked(sql: &str) -> String {
        let cut = sql.find("-- Mark:").expect("the file has a mark section");
        sql[..cut].to_string()
    }

    #[test]
    fn unmarked_tables_are_recognised_at_their_version() {
        for upto in 1..=MIGRATIONS.len() {
            let conn = Connection::open_in_memory().unwrap();
            for m in &MIGRATIONS[..upto] {
                conn.execute_batch(&unmarked(m.sql)).unwrap();
            }
            let got = recognise(&read_shape(&conn).unwrap());
            assert_eq!(got, Ok(upto as i64));
        }
    }

    #[test]
    fn a_foreign_table_is_described() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "CREATE TABLE gpu_jobs (id BLOB PRIMARY KEY, status INTEGER, owner TEXT)",
        )
        .unwrap();
        let actual = read_shape(&conn).unwrap();
        let (closest, diffs) = recognise(&actual).unwrap_err();
        assert_eq!(closest, 1);
        let text = diffs
            .iter()
            .map(Diff::to_string)
            .collect::<Vec<_>>()
            .join("\n");
        assert!(
            text.contains("column gpu_jobs.payload_sha256 (TEXT NOT NULL) is missing"),
            "{text}"
        );
        assert!(
            text.contains(
                "column gpu_jobs.status is INTEGER here, TEXT NOT NULL DEFAULT 'pending' expected"
            ),
            "{text}"
        );
        assert!(text.contains("index gpu_jobs_claim"), "{text}");
        assert_eq!(shapes()[1].extra_columns(&actual), ["gpu_jobs.owner"]);
    }
}
