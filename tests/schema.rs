//! Databases whose schema was made by hand, with the `sqlite3` CLI and the
//! files in `migrations/sqlite/` or `gpu-feeder schema`: adopted and upgraded
//! from where they stand; a foreign `gpu_jobs` refused before anything
//! changes. The real binary, the real `sqlite3` CLI, real files.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{external, sqlite3, wait_for, DaemonProcess, Scratch, SimProcess};

/// The migration files, in order.
fn migrations() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations/sqlite");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "sql"))
        .collect();
    files.sort();
    assert!(files.len() >= 4, "{files:?}");
    files
}

/// A migration file as an older copy of it was: without its mark.
fn unmarked(file: &Path) -> String {
    let sql = std::fs::read_to_string(file).unwrap();
    let at = sql
        .find("-- Mark:")
        .unwrap_or_else(|| panic!("{} records no version", file.display()));
    sql[..at].to_string()
}

#[test]
fn the_plans_procedure_works_step_by_step() {
    let vision = SimProcess::start(&[]);
    let s = Scratch::new(&format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\n[dispatch]\nexternal_poll_ms = 100\n\n[health]\ninterval_s = 0.2\n\n{}",
        external("vision", "vision", &vision.url)
    ));
    // 1. The schema through the sqlite3 CLI, file by file.
    for file in migrations() {
        sqlite3(&s.db(), &std::fs::read_to_string(&file).unwrap());
    }
    // 2. The minimal insert of a vision job.
    let payload = s.stage().join("p.json");
    std::fs::write(&payload, r#"{"prompt": "describe the page"}"#).unwrap();
    sqlite3(
        &s.db(),
        &format!(
            "INSERT INTO gpu_jobs (id, payload_sha256, model_type, payload_path, created_at) \
             VALUES (randomblob(16), 'x', 'vision', '{}', strftime('%s','now'));",
            payload.display()
        ),
    );
    // 3. gpu-feeder run.
    let d = DaemonProcess::start(&s, "daemon");
    // 4. The job is done, as the plan's query shows.
    let query = "SELECT status, COUNT(*) FROM gpu_jobs GROUP BY status;";
    wait_for("the job is done", Duration::from_secs(60), || {
        sqlite3(&s.db(), query).trim() == "done|1"
    });
    assert!(
        !d.log().contains("migration"),
        "the daemon changed a complete schema: {}",
        d.log()
    );
}

#[test]
fn a_database_with_only_the_first_migration_is_upgraded() {
    let s = Scratch::new("");
    let files = migrations();
    sqlite3(&s.db(), &std::fs::read_to_string(&files[0]).unwrap());
    let report = s.json(&["migrate", "--json"]);
    assert_eq!(report["from_version"], 1, "{report}");
    assert_eq!(report["version"], files.len(), "{report}");
    assert_eq!(report["adopted"], serde_json::json!([]), "{report}");
    assert_eq!(
        report["applied"].as_array().unwrap().len(),
        files.len() - 1,
        "{report}"
    );
    // Usable afterwards, and up to date.
    assert_eq!(
        s.run(&["submit", "--model", "think", "--prompt", "hi"])
            .code(),
        0
    );
    let again = s.run(&["migrate"]);
    assert!(again.stdout().contains("up to date"), "{}", again.stdout());
}

#[test]
fn a_schema_made_without_the_marks_is_adopted_at_the_version_it_matches() {
    let s = Scratch::new("");
    let files = migrations();
    for file in &files[..2] {
        sqlite3(&s.db(), &unmarked(file));
    }
    sqlite3(
        &s.db(),
        "INSERT INTO gpu_jobs (id, payload_sha256, model_type, payload_inline, created_at) \
         VALUES (randomblob(16), 'x', 'think', '{\"prompt\": \"kept\"}', strftime('%s','now'));",
    );
    let r = s.run(&["migrate"]);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    assert!(
        r.stdout()
            .contains("found a schema made without gpu-feeder at 0001_gpu_jobs, 0002_follow_ups"),
        "{}",
        r.stdout()
    );
    assert!(r.stdout().contains("schema version 2 → "), "{}", r.stdout());
    // The row survived the upgrade, and the marks are there now.
    assert_eq!(s.jobs().len(), 1);
    let versions = sqlite3(
        &s.db(),
        "SELECT version FROM schema_migrations ORDER BY version;",
    );
    let expected: String = (1..=files.len()).map(|v| format!("{v}\n")).collect();
    assert_eq!(versions, expected);
}

/// Runs `sql` on the scratch database, then `migrate`, which must refuse
/// what `sql` made (`what`, for the message); returns what it said.
fn migrate_refused_after(s: &Scratch, sql: &str, what: &str) -> String {
    sqlite3(&s.db(), sql);
    let r = s.run(&["migrate"]);
    assert_ne!(r.code(), 0, "{what} was accepted: {}", r.stdout());
    r.stderr()
}

#[test]
fn a_foreign_gpu_jobs_table_is_refused_naming_the_difference_and_left_alone() {
    let s = Scratch::new(&external("think", "think", "http://127.0.0.1:9"));
    let err = migrate_refused_after(
        &s,
        "CREATE TABLE gpu_jobs (id INTEGER PRIMARY KEY, payload TEXT, model_type TEXT);",
        "a foreign table",
    );
    assert!(err.contains("gpu_jobs"), "{err}");
    assert!(
        err.contains("columns missing: gpu_jobs.attempts"),
        "names the missing columns: {err}"
    );
    assert!(
        err.contains("does not know: gpu_jobs.payload."),
        "names the extra column: {err}"
    );
    assert!(err.contains("Nothing was changed"), "{err}");
    // Nothing was created or changed.
    let tables = sqlite3(
        &s.db(),
        "SELECT name FROM sqlite_master WHERE type = 'table';",
    );
    assert_eq!(tables.trim(), "gpu_jobs", "{tables}");
    // The daemon refuses it the same way.
    let run = s.run(&["run"]);
    run.fails_saying("gpu_jobs.attempts");
}

#[test]
fn a_gpu_jobs_table_changed_by_hand_is_refused_naming_the_one_difference() {
    let s = Scratch::new("");
    let files = migrations();
    for file in &files {
        sqlite3(&s.db(), &std::fs::read_to_string(file).unwrap());
    }
    let err = migrate_refused_after(
        &s,
        "DROP INDEX gpu_jobs_claim; ALTER TABLE gpu_jobs RENAME COLUMN priority TO prio;",
        "a changed table",
    );
    assert!(
        err.contains("columns missing: gpu_jobs.priority;"),
        "names the one missing column: {err}"
    );
    assert!(
        err.contains("indexes missing: gpu_jobs_claim;"),
        "names the dropped index: {err}"
    );
    assert!(
        err.contains("does not know: gpu_jobs.prio."),
        "names the renamed column: {err}"
    );
}

#[test]
fn gpu_feeder_schema_makes_a_database_this_build_uses_as_it_is() {
    let s = Scratch::new("");
    let schema = s.run(&["schema"]);
    assert_eq!(schema.code(), 0, "{}", schema.stderr());
    sqlite3(&s.db(), &schema.stdout());
    let r = s.json(&["migrate", "--json"]);
    assert_eq!(r["applied"], serde_json::json!([]), "{r}");
    assert_eq!(r["adopted"], serde_json::json!([]), "{r}");
    assert_eq!(r["from_version"], r["version"], "{r}");
}

#[test]
fn each_older_version_is_upgraded_with_its_rows_and_a_newer_one_is_refused() {
    let files = migrations();
    for applied in 1..files.len() {
        let s = Scratch::new("");
        for file in &files[..applied] {
            sqlite3(&s.db(), &std::fs::read_to_string(file).unwrap());
        }
        sqlite3(
            &s.db(),
            "INSERT INTO gpu_jobs (id, payload_sha256, model_type, payload_inline, created_at) \
             VALUES (randomblob(16), 'x', 'think', '{\"prompt\": \"kept\"}', strftime('%s','now'));",
        );
        let r = s.json(&["migrate", "--json"]);
        assert_eq!(r["from_version"], applied, "{r}");
        assert_eq!(r["version"], files.len(), "{r}");
        assert_eq!(
            r["applied"].as_array().unwrap().len(),
            files.len() - applied,
            "{r}"
        );
        let jobs = s.jobs();
        assert_eq!(jobs.len(), 1, "the row survived the upgrade from {applied}");
        assert_eq!(jobs[0]["payload_inline"], "{\"prompt\": \"kept\"}");
    }

    let s = Scratch::new("");
    sqlite3(&s.db(), &s.run(&["schema"]).stdout());
    let err = migrate_refused_after(
        &s,
        "INSERT INTO schema_migrations (version, name, applied_at) VALUES (99, 'from_the_future', 0);",
        "a newer schema",
    );
    assert!(err.contains("99"), "{err}");
    let versions = sqlite3(&s.db(), "SELECT max(version) FROM schema_migrations;");
    assert_eq!(versions.trim(), "99", "nothing was changed");
}

#[test]
fn fragments_written_before_the_place_column_keep_their_place() {
    let files = migrations();
    let s = Scratch::new("");
    // The schema as it was before version 5, with one text parent and one
    // image parent whose fragments carry their place in the payload.
    for file in files.iter().filter(|f| {
        let name = f.file_name().unwrap().to_string_lossy().to_string();
        name.as_str() < "0005"
    }) {
        sqlite3(&s.db(), &std::fs::read_to_string(file).unwrap());
    }
    sqlite3(
        &s.db(),
        "INSERT INTO gpu_jobs (id, payload_sha256, model_type, payload_inline, status, total_fragments, created_at) \
         VALUES (x'00000000000000000000000000000001', 'p', 'think', '{\"chunked_text\": {}}', 'processing', 4, 1); \
         INSERT INTO gpu_jobs (id, payload_sha256, model_type, payload_inline, parent_id, fragment_index, total_fragments, created_at) \
         VALUES (x'00000000000000000000000000000002', 'a', 'think', \
                 '{\"prompt\": \"one\", \"chunk\": {\"index\": 0, \"token_start\": 0, \"token_end\": 512}}', \
                 x'00000000000000000000000000000001', 0, 4, 1), \
                (x'00000000000000000000000000000003', 'b', 'think', \
                 '{\"prompt\": \"two\", \"chunk\": {\"index\": 1, \"token_start\": 392, \"token_end\": 904}}', \
                 x'00000000000000000000000000000001', 1, 4, 1), \
                (x'00000000000000000000000000000004', 'c', 'vision', \
                 '{\"image_path\": \"/t.png\", \"tile\": {\"row\": 1, \"col\": 2, \"x\": 784, \"y\": 392, \"width\": 512, \"height\": 300}}', \
                 x'00000000000000000000000000000001', 2, 4, 1), \
                (x'00000000000000000000000000000005', 'd', 'think', \
                 '{\"prompt\": \"no place\"}', x'00000000000000000000000000000001', 3, 4, 1);",
    );
    s.json(&["migrate", "--json"]);
    let place = |id: &str| {
        let job = s.json(&["status", id, "--json"]);
        job["place"].clone()
    };
    assert_eq!(
        place("00000000000000000000000000000002"),
        serde_json::json!({"tokens": [0, 512]})
    );
    assert_eq!(
        place("00000000000000000000000000000003"),
        serde_json::json!({"tokens": [392, 904]})
    );
    assert_eq!(
        place("00000000000000000000000000000004"),
        serde_json::json!({"tile": {"row": 1, "col": 2, "x": 784, "y": 392, "width": 512, "height": 300}})
    );
    assert!(place("00000000000000000000000000000005").is_null());
    assert!(place("00000000000000000000000000000001").is_null());
    // A place that is not JSON is refused by the column's check.
    let out = std::process::Command::new("sqlite3")
        .args(["-cmd", ".timeout 10000"])
        .arg(s.db())
        .arg("UPDATE gpu_jobs SET place = 'not json' WHERE id = x'00000000000000000000000000000002';")
        .output()
        .expect("the sqlite3 CLI");
    assert!(
        !out.status.success(),
        "the place column took text that is not JSON"
    );
}
