//! The command line against a real database file: submission in all its
//! forms, inspection, cancel and retry, and rows inserted by another program.

mod common;

use common::{succeed, Scratch};
use serde_json::Value;

#[test]
fn a_raw_sqlite3_insert_is_listed_pending() {
    let s = Scratch::new("");
    assert_eq!(s.run(&["migrate"]).code(), 0);
    // The plan's minimal insert, unchanged, through the sqlite3 program.
    let insert = "INSERT INTO gpu_jobs (id, payload_sha256, model_type, payload_path, created_at) \
                  VALUES (randomblob(16), 'x', 'vision', '/p/test.json', strftime('%s','now'));";
    succeed(
        std::process::Command::new("sqlite3")
            .args(["-cmd", ".timeout 10000"])
            .arg(s.db())
            .arg(insert),
        "the sqlite3 program (.ci/run installs it)",
    );

    let listed = s.json(&["list", "--json"]);
    let jobs = listed["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 1);
    let job = &jobs[0];
    assert_eq!(job["status"], "pending");
    assert_eq!(job["model_type"], "vision");
    assert_eq!(job["payload_path"], "/p/test.json");
    assert_eq!(job["attempts"], 0);
    assert_eq!(job["max_attempts"], 3);
    let id = job["id"].as_str().unwrap();
    assert_eq!(id.len(), 32);
    let status = s.json(&["status", id, "--json"]);
    for key in [
        "id",
        "status",
        "model_type",
        "attempts",
        "result_path",
        "error",
        "parent_id",
        "fragment_index",
        "total_fragments",
        "follows",
    ] {
        assert!(status.get(key).is_some(), "status --json lacks `{key}`");
    }
    let stats = s.json(&["stats", "--json"]);
    assert_eq!(stats["jobs"]["vision"]["pending"], 1);
    assert_eq!(stats["jobs"]["think"]["pending"], 0);
}

#[test]
fn a_database_file_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let s = Scratch::new("");
    assert_eq!(s.run(&["migrate"]).code(), 0);
    let mode = std::fs::metadata(s.db()).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn submitting_the_same_payload_twice_returns_the_first_job() {
    let s = Scratch::new("");
    let a = s.json(&["submit", "--model", "think", "--prompt", "hello", "--json"]);
    let b = s.json(&["submit", "--model", "think", "--prompt", "hello", "--json"]);
    assert_eq!(a["created"], true);
    assert_eq!(b["created"], false);
    assert_eq!(a["id"], b["id"]);
    let human = s.run(&["submit", "--model", "think", "--prompt", "hello"]);
    assert!(
        human.stdout().starts_with("already queued:"),
        "{}",
        human.stdout()
    );
    // Same prompt for the other model is another job.
    let c = s.json(&["submit", "--model", "vision", "--prompt", "hello", "--json"]);
    assert_ne!(a["id"], c["id"]);
}

#[test]
fn payload_files_and_images_must_lie_under_the_roots() {
    let s = Scratch::new("");
    let inside = s.stage().join("p.json");
    std::fs::write(&inside, r#"{"prompt": "x"}"#).unwrap();
    let outside = s.path().join("p.json");
    std::fs::write(&outside, r#"{"prompt": "x"}"#).unwrap();
    let ok = s.submit_file("think", "--payload", &inside, &[]);
    let job = s.json(&["status", ok["id"].as_str().unwrap(), "--json"]);
    assert_eq!(
        job["payload_path"],
        inside.canonicalize().unwrap().to_str().unwrap()
    );

    let refused = s.submit_run("think", "--payload", &outside, &[]);
    refused.refused(1, "outside the payload roots");

    let img = s.path().join("page.png");
    std::fs::write(&img, b"not really a png").unwrap();
    let refused = s.submit_run("vision", "--image", &img, &[]);
    assert!(
        refused.stderr().contains("outside the payload roots"),
        "{}",
        refused.stderr()
    );
    // An image_path inside a payload is checked too.
    let sneaky = s.stage().join("sneaky.json");
    std::fs::write(&sneaky, format!(r#"{{"image_path": "{}"}}"#, img.display())).unwrap();
    let refused = s.submit_run("vision", "--payload", &sneaky, &[]);
    assert!(
        refused.stderr().contains("outside the payload roots"),
        "{}",
        refused.stderr()
    );
    assert_eq!(
        s.json(&["list", "--json"])["jobs"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn a_malformed_payload_is_refused_and_nothing_is_queued() {
    let s = Scratch::new("");
    for (name, body, expect) in [
        ("broken.json", "{\"prompt\": ", "not valid JSON"),
        ("array.json", "[1, 2]", "must be a JSON object"),
        (
            "empty.json",
            "{}",
            "needs `messages`, `prompt` or `image_path`",
        ),
    ] {
        let p = s.stage().join(name);
        std::fs::write(&p, body).unwrap();
        let r = s.submit_run("think", "--payload", &p, &[]);
        assert_eq!(r.code(), 1, "{name}");
        assert!(r.stderr().contains(expect), "{name}: {}", r.stderr());
        assert!(
            r.stderr().contains(name),
            "the error names the file: {}",
            r.stderr()
        );
    }
    assert!(s.json(&["list", "--json"])["jobs"]
        .as_array()
        .unwrap()
        .is_empty());
}

#[test]
fn jsonl_is_one_transaction_idempotent_line_by_line() {
    let s = Scratch::new("");
    let f = s.path().join("jobs.jsonl");
    let lines: String = (0..500)
        .map(|i| format!("{{\"prompt\": \"q{}\"}}\n", i % 400))
        .collect();
    std::fs::write(&f, lines).unwrap();
    let out = s.submit_file("think", "--jsonl", &f, &[]);
    assert_eq!(out["created"], 400);
    assert_eq!(out["existing"], 100);
    let again = s.run(&["submit", "--model", "think", "--jsonl", f.to_str().unwrap()]);
    assert!(
        again.stdout().contains("0 new, 500 already queued"),
        "{}",
        again.stdout()
    );

    // One bad line refuses the whole file, naming the line.
    std::fs::write(&f, "{\"prompt\": \"new one\"}\n{\"prompt\": 5}\n").unwrap();
    let bad = s.run(&["submit", "--model", "think", "--jsonl", f.to_str().unwrap()]);
    bad.refused(1, "line 2");
    assert_eq!(
        s.json(&["stats", "--json"])["jobs"]["think"]["pending"],
        400
    );
}

#[test]
fn cancel_and_retry_from_the_command_line() {
    let s = Scratch::new("");
    let id = s.json(&["submit", "--model", "think", "--prompt", "c", "--json"])["id"]
        .as_str()
        .unwrap()
        .to_string();
    // A unique prefix is enough.
    let cancelled = s.json(&["cancel", &id[..8], "--json"]);
    assert_eq!(cancelled["status"], "cancelled");
    let again = s.run(&["cancel", &id]);
    again.refused(1, "is cancelled");
    let retried = s.json(&["retry", &id, "--json"]);
    assert_eq!(retried["status"], "pending");
    let bad = s.run(&["status", "zz-not-an-id"]);
    bad.refused(1, "not a job id");
}

#[test]
fn wait_gives_up_after_its_timeout_and_the_job_stays() {
    let s = Scratch::new("");
    let r = s.run(&[
        "submit",
        "--model",
        "think",
        "--prompt",
        "w",
        "--wait",
        "--timeout-s",
        "0",
    ]);
    r.refused(1, "still pending");
    let jobs: Value = s.json(&["list", "--json"]);
    assert_eq!(jobs["jobs"][0]["status"], "pending");
}

#[test]
fn image_jobs_need_a_vision_model() {
    let s = Scratch::new("");
    let img = s.stage().join("page.png");
    image::RgbImage::new(40, 30).save(&img).unwrap();
    let r = s.submit_run("think", "--image", &img, &[]);
    r.refused(1, "--model vision");
    assert_eq!(
        s.run(&[
            "submit",
            "--model",
            "vision",
            "--image",
            img.to_str().unwrap()
        ])
        .code(),
        0
    );
}

#[test]
fn usage_errors_exit_2() {
    let s = Scratch::new("");
    assert_eq!(s.run(&["submit", "--model", "think"]).code(), 2);
    assert_eq!(
        s.run(&["submit", "--model", "gpt", "--prompt", "x"]).code(),
        2
    );
    assert_eq!(s.run(&["list", "--status", "running"]).code(), 2);
}

#[test]
fn gpu_explains_a_machine_without_nvml() {
    let s = Scratch::new("");
    let r = s.run(&["gpu", "--json"]);
    if r.code() == 0 {
        // A machine with a GPU: the reading is there.
        let v: serde_json::Value = serde_json::from_str(&r.stdout()).unwrap();
        assert!(!v["gpus"].as_array().unwrap().is_empty(), "{v}");
    } else {
        r.refused(1, "NVML is not available");
    }
}

#[test]
fn strategy_pin_names_the_choices_and_the_missing_daemon() {
    let s = Scratch::new("[admin]\nlisten = \"127.0.0.1:9\"\n");
    let bad = s.run(&["strategy", "pin", "fast"]);
    bad.fails_saying("choose one of static, shared, think, vision, idle");
    let down = s.run(&["strategy", "show"]);
    down.fails_saying("the daemon is not running");
}

#[test]
fn the_readmes_test_command_is_the_one_ci_runs() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let section = readme
        .split("## Two commands")
        .nth(1)
        .expect("the README has a `Two commands` section");
    let block = section
        .split("```sh\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("a sh block in `Two commands`");
    let commands: Vec<&str> = block
        .lines()
        .map(|l| l.split('#').next().unwrap().trim())
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(commands.len(), 2, "{commands:?}");
    assert!(commands[0].ends_with("demo"), "{commands:?}");
    let test = commands[1];

    let ci = std::fs::read_to_string(root.join(".ci/run")).unwrap();
    let last = ci
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty() && !l.starts_with('#'))
        .unwrap();
    assert_eq!(
        last,
        format!("exec {test}"),
        ".ci/run must end by running the README's test command"
    );
    // That command is a script of the repository that runs the whole suite.
    let script = std::fs::read_to_string(root.join(test)).unwrap();
    assert!(
        script.contains("exec cargo test --workspace"),
        "{test} does not run cargo test --workspace"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(root.join(test))
        .unwrap()
        .permissions()
        .mode();
    assert!(mode & 0o111 != 0, "{test} is not executable");
    // And, before it, the checks the README says pass on every commit.
    for check in [
        "cargo fmt --all -- --check",
        "cargo clippy --workspace --all-targets -- -D warnings",
    ] {
        assert!(
            ci.lines().any(|l| l.trim() == check),
            ".ci/run does not run `{check}`"
        );
    }
}

/// The backticked names in the README's `JSON output` section, from the
/// first line containing `from` up to the line containing `to`.
fn documented_keys(from: &str, to: &str) -> std::collections::BTreeSet<String> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let section = readme
        .split("### JSON output")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("the README has a `JSON output` section");
    let start = section.find(from).unwrap_or_else(|| panic!("no `{from}`"));
    let text = &section[start + from.len()..];
    let text = &text[..text.find(to).unwrap_or_else(|| panic!("no `{to}`"))];
    text.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

fn keys(v: &Value) -> std::collections::BTreeSet<String> {
    v.as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .cloned()
        .collect()
}

/// `--json` output is stable: each command's keys are the ones the README
/// lists, no more and no fewer.
#[test]
fn json_output_has_exactly_the_keys_the_readme_documents() {
    let job_keys = documented_keys("a job object with", "Ids are");
    assert!(job_keys.len() > 20, "{job_keys:?}");
    let s = Scratch::new("");
    let submitted = s.json(&["submit", "--model", "think", "--prompt", "k", "--json"]);
    assert_eq!(
        keys(&submitted),
        ["created", "fragments", "id", "status"]
            .map(String::from)
            .into()
    );
    assert_eq!(submitted["fragments"], Value::Null, "not chunked");
    let id = submitted["id"].as_str().unwrap();
    assert_eq!(id.len(), 32, "{id}");
    let status = s.json(&["status", id, "--json"]);
    assert_eq!(keys(&status), job_keys, "status --json");
    let listed = s.json(&["list", "--json"]);
    assert_eq!(keys(&listed), ["jobs".to_string()].into());
    assert_eq!(keys(&listed["jobs"][0]), job_keys, "list --json");
    assert_eq!(keys(&s.json(&["cancel", id, "--json"])), job_keys, "cancel");
    assert_eq!(keys(&s.json(&["retry", id, "--json"])), job_keys, "retry");

    let stats = s.json(&["stats", "--json"]);
    assert_eq!(
        keys(&stats),
        ["jobs", "oldest_pending_age_s"].map(String::from).into()
    );
    for model in ["think", "vision"] {
        assert_eq!(
            keys(&stats["jobs"][model]),
            ["cancelled", "done", "failed", "pending", "processing"]
                .map(String::from)
                .into(),
            "stats for {model}: {stats}"
        );
        assert!(
            stats["oldest_pending_age_s"].get(model).is_some(),
            "{stats}"
        );
    }

    let f = s.path().join("k.jsonl");
    std::fs::write(&f, "{\"prompt\": \"a\"}\n{\"prompt\": \"k\"}\n").unwrap();
    let lines = s.submit_file("think", "--jsonl", &f, &[]);
    assert_eq!(
        keys(&lines),
        ["created", "existing", "jobs"].map(String::from).into()
    );
    assert_eq!(
        keys(&lines["jobs"][0]),
        ["created", "id", "status"].map(String::from).into()
    );
}
