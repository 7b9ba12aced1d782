//! The OpenAI-compatible API driven by the official `openai` Python SDK
//! (`tests/openai_sdk_client.py`) against a real daemon and a simulated
//! model server: files, batches, pagination, cancelling, a malformed
//! file, keys, and a batch that survives `kill -9` of the daemon; chat
//! completions (plain and streamed) and models, a streamed answer relayed
//! word by word, a chat completion that overtakes a running batch, and
//! clients that go away.

mod common;

use std::process::Command;
use std::time::Duration;

use common::served::{RequestLog, Served};
use common::{external, free_port, DaemonProcess, Scratch, SimProcess};

const LIMIT: Duration = Duration::from_secs(60);
const KEY: &str = "sk-test-key";

fn api(port: u16) -> String {
    api_and_admin(port, free_port())
}

/// [`api`], with the admin endpoint on `admin`.
fn api_and_admin(port: u16, admin: u16) -> String {
    format!(
        "[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n[dispatch]\nexternal_poll_ms = 50\n\n[api]\nlisten = \"127.0.0.1:{port}\"\nkeys = [\"{KEY}\"]\n\n"
    )
}

/// Runs the SDK client with `args`; its JSON report.
fn sdk(args: &[&str]) -> serde_json::Value {
    sdk_beside(args, &[])
}

/// [`sdk`], with the logs of `daemons` in the failure's message.
fn sdk_beside(args: &[&str], daemons: &[&DaemonProcess]) -> serde_json::Value {
    let out = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/openai_sdk_client.py"
        ))
        .args(args)
        .output()
        .expect("python3 runs (is the `openai` package installed? scripts/test.sh installs it)");
    assert!(
        out.status.success(),
        "the SDK client failed:\n{}\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        daemons
            .iter()
            .map(|d| format!("\n--- daemon log ---\n{}", d.log()))
            .collect::<String>()
    );
    serde_json::from_slice(&out.stdout).expect("the client prints JSON")
}

/// A scratch with the API on `port` and one instance whose server is not
/// there (its jobs cannot be sent).
fn without_server(port: u16) -> Scratch {
    let dead = format!("http://127.0.0.1:{}", free_port());
    Scratch::new(&(api(port) + &external("think", "think", &dead)))
}

/// Starts the daemon of `s` and waits until its API on `port` answers
/// (its instance need not be ready).
fn start_api(s: &Scratch, port: u16) -> DaemonProcess {
    let d = DaemonProcess::start(s, "daemon");
    let url = format!("http://127.0.0.1:{port}/v1/models");
    common::wait_for("the API answers", LIMIT, || {
        common::http::http("GET", &url, Some(KEY), None).0 == 200
    });
    d
}

fn jobs_in(s: &Scratch) -> i64 {
    let conn = rusqlite::Connection::open(s.db()).unwrap();
    conn.query_row("SELECT count(*) FROM gpu_jobs", [], |r| r.get(0))
        .unwrap()
}

#[test]
fn the_openai_sdk_runs_files_and_batches_end_to_end() {
    let sim = SimProcess::start(&["--fail-matching", "POISON"]);
    let port = free_port();
    let s = Scratch::new(&(api(port) + &external("think", "think", &sim.url)));
    let d = DaemonProcess::start_ready(&s, "daemon", &["think"], LIMIT);
    let base = format!("http://127.0.0.1:{port}");
    let report = sdk(&["all", &base, KEY]);
    eprintln!("{report}");
    assert_eq!(report["delete_while_running"], 409, "{}", d.log());
    // The malformed file created no job: every job is a line of the good
    // batches, 30 + 3 lines, and the cancelled batch's 40 when the worker
    // had queued them before the cancel came (a batch cancelled first
    // lists its lines as errors without making jobs of them).
    let conn = rusqlite::Connection::open(s.db()).unwrap();
    let lines: i64 = conn
        .query_row("SELECT count(*) FROM api_batch_lines", [], |r| r.get(0))
        .unwrap();
    assert_eq!(jobs_in(&s), lines);
    assert!(lines == 33 || lines == 73, "{lines} lines queued");
}

#[test]
fn a_batch_survives_kill_9_of_the_daemon() {
    let logs = tempfile::tempdir().unwrap();
    let log = RequestLog::new(logs.path(), "think");
    let sim = log.sim(&["--latency-ms", "100", "--max-num-seqs", "4"]);
    let port = free_port();
    let s = Scratch::new(&(api(port) + &external("think", "think", &sim.url)));
    let mut d = DaemonProcess::start_ready(&s, "daemon", &["think"], LIMIT);
    let base = format!("http://127.0.0.1:{port}");
    let started = sdk(&["start", &base, KEY, "120"]);
    assert_eq!(started["status"], "in_progress", "{started}");
    // The kill lands mid-batch: some lines done, others claimed and sent.
    // One that finds nothing claimed is made again once more is done.
    let mut served = Served::default();
    for run in 1.. {
        let before = s.count("done");
        common::wait_for("more of the batch done", LIMIT, || {
            s.count("done") >= before + 10
        });
        d.kill9();
        let claimed = served.kill_found(s.claimed());
        let done = s.count("done");
        println!("kill {run}: {claimed} lines claimed, {done} of 120 done");
        assert!(done < 120, "the batch ended before a kill found it claimed");
        d = DaemonProcess::start_ready(&s, &format!("again-{run}"), &["think"], LIMIT);
        if claimed > 0 {
            break;
        }
    }
    let id = started["batch_id"].as_str().unwrap();
    let done = sdk(&["finish", &base, KEY, id, "120"]);
    assert_eq!(done["output"], 120, "{done}");
    // At the server: sent again only where the kill found a line claimed.
    served.read(&[&log]);
    let (sends, duplicates) = served.assert_exactly_once(&s.jobs());
    println!("the server received {sends} requests, {duplicates} of them a repeated attempt");
    drop(d);
}

#[test]
fn chat_completions_and_models_through_the_sdk() {
    let sim = SimProcess::start(&["--fail-matching", "POISON"]);
    let port = free_port();
    let s = Scratch::new(&(api(port) + &external("think", "think", &sim.url)));
    let d = DaemonProcess::start_ready(&s, "daemon", &["think"], LIMIT);
    let base = format!("http://127.0.0.1:{port}");
    let report = sdk(&["chat", &base, KEY]);
    eprintln!("{report}");
    assert_eq!(
        report["refused_status"],
        400,
        "the server's 400: {}",
        d.log()
    );
    assert!(report["chunks"].as_u64() >= Some(3), "{report}");
    // Each request was a job of its own at the chat priority: the plain,
    // the streamed and the refused one.
    let conn = rusqlite::Connection::open(s.db()).unwrap();
    let rows: Vec<(i64, String)> = conn
        .prepare("SELECT priority, status FROM gpu_jobs ORDER BY created_at")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        rows,
        [
            (10, "done".into()),
            (10, "done".into()),
            (10, "failed".into())
        ]
    );
}

#[test]
fn a_streamed_answer_is_relayed_as_the_server_writes_it() {
    // 40 tokens at 8 a second: the server writes its words over 5 s.
    let sim = SimProcess::start(&["--tokens-per-s", "8"]);
    let (port, admin) = (free_port(), free_port());
    let s = Scratch::new(&(api_and_admin(port, admin) + &external("think", "think", &sim.url)));
    let d = DaemonProcess::start_ready(&s, "daemon", &["think"], LIMIT);
    let base = format!("http://127.0.0.1:{port}");
    let db = s.db();
    let report = sdk_beside(&["stream", &base, KEY, db.to_str().unwrap()], &[&d]);
    eprintln!("{report}");
    // The first words reached the client while the job was still being
    // sent: relayed, not replayed from the finished answer.
    assert_eq!(report["status_at_first_words"], "processing", "{report}");
    assert!(
        report["content_chunks"].as_u64() > Some(5),
        "word by word: {report}"
    );
    assert_eq!(report["finish_reason"], "stop", "{report}");
    assert_eq!(report["usage_chunks"], 0, "no usage unless asked: {report}");
    // The job's result is the whole answer, as if it had not streamed.
    let job = s.json(&["status", report["job"].as_str().unwrap(), "--json"]);
    assert_eq!(job["status"], "done", "{job}");
    let doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(job["result_path"].as_str().unwrap()).unwrap())
            .unwrap();
    let text = report["text"].as_str().unwrap();
    assert!(text.starts_with("echo: w0 w1"), "{report}");
    assert_eq!(
        doc.pointer("/response/choices/0/message/content"),
        Some(&serde_json::json!(text)),
        "{doc}"
    );
    assert!(
        doc.pointer("/response/usage/completion_tokens")
            .and_then(serde_json::Value::as_u64)
            > Some(0),
        "{doc}"
    );
    // The client that went away mid-stream: its job is cancelled and its
    // request at the server ended, long before the server would have
    // finished it.
    let gone = report["gone_job"].as_str().unwrap();
    common::wait_for("the abandoned job cancelled", LIMIT, || {
        s.json(&["status", gone, "--json"])["status"] == "cancelled"
    });
    common::wait_for("the server's request ended", LIMIT, || {
        sim.gauge("vllm:num_requests_running") == 0.0
    });
    // Both streams are in the daemon's metrics: one relayed to its end,
    // one whose client left; two first chunks timed.
    let (_, metrics) = common::http::get(admin, "/metrics");
    for line in [
        r#"gpu_feeder_api_streams_total{model_type="think",outcome="relayed"} 1"#,
        r#"gpu_feeder_api_streams_total{model_type="think",outcome="gone"} 1"#,
        r#"gpu_feeder_api_stream_first_chunk_seconds_count{model_type="think"} 2"#,
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in:\n{metrics}");
    }
}

#[test]
fn a_stream_whose_server_dies_ends_with_an_error_and_is_not_retried() {
    use std::io::BufRead as _;
    let mut sim = SimProcess::start(&["--tokens-per-s", "8"]);
    let (port, admin) = (free_port(), free_port());
    let s = Scratch::new(&(api_and_admin(port, admin) + &external("think", "think", &sim.url)));
    let d = DaemonProcess::start_ready(&s, "daemon", &["think"], LIMIT);
    let base = format!("http://127.0.0.1:{port}");
    let mut client = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/openai_sdk_client.py"
        ))
        .args(["broken", &base, KEY])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs");
    let mut lines = std::io::BufReader::new(client.stdout.take().unwrap()).lines();
    let first = lines.next().and_then(Result::ok);
    assert_eq!(first.as_deref(), Some("first words"), "{}", d.log());
    // The server dies mid-answer.
    sim.child.kill().unwrap();
    sim.child.wait().unwrap();
    let report: serde_json::Value =
        serde_json::from_str(&lines.next().and_then(Result::ok).unwrap_or_default())
            .unwrap_or_else(|e| panic!("the client's report ({e}): {}", d.log()));
    assert!(client.wait().unwrap().success(), "{report}");
    eprintln!("{report}");
    let error = report["error"]
        .as_str()
        .unwrap_or_else(|| panic!("{report}"));
    assert!(error.contains("broke off"), "{report}");
    // The job failed with the reason, not retried behind the client's
    // back (it already held part of an answer).
    let conn = rusqlite::Connection::open(s.db()).unwrap();
    let ended = || {
        conn.query_row("SELECT status, error FROM gpu_jobs", [], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, Option<String>>(1)?))
        })
        .unwrap()
    };
    common::wait_for("the job settled", LIMIT, || ended().0 != "processing");
    let (status, why) = ended();
    assert_eq!(status, "failed", "{why:?}");
    assert!(why.is_some_and(|w| w.contains("not retried")), "{report}");
    let (_, metrics) = common::http::get(admin, "/metrics");
    let line = r#"gpu_feeder_api_streams_total{model_type="think",outcome="broken"} 1"#;
    assert!(metrics.lines().any(|l| l == line), "{line} in:\n{metrics}");
}

#[test]
fn a_chat_completion_overtakes_a_running_batch() {
    // A server that runs requests by priority, as those the feeder
    // launches do (`--scheduling-policy priority`).
    let sim = SimProcess::start(&[
        "--latency-ms",
        "100",
        "--max-num-seqs",
        "4",
        "--scheduling-policy",
        "priority",
    ]);
    let port = free_port();
    let instance = external("think", "think", &sim.url) + "scheduling_policy = \"priority\"\n";
    let s = Scratch::new(&(api(port) + &instance));
    let _d = DaemonProcess::start_ready(&s, "daemon", &["think"], LIMIT);
    let base = format!("http://127.0.0.1:{port}");
    let report = sdk(&["overtake", &base, KEY, "400"]);
    eprintln!("figure: chat completion latency, idle against beside a 400-line batch: {report}");
    // Answered while most of the batch, queued before it, still waited.
    assert_eq!(
        report["batch_status_when_answered"], "in_progress",
        "{report}"
    );
    assert!(
        report["batch_completed_when_answered"].as_u64() < Some(300),
        "{report}"
    );
}

#[test]
fn a_client_that_goes_away_cancels_its_unsent_request() {
    // Nothing listens for the instance: the request's job cannot be sent.
    let port = free_port();
    let s = without_server(port);
    let d = start_api(&s, port);
    let base = format!("http://127.0.0.1:{port}");
    let out = Command::new("curl")
        .args(["-s", "--max-time", "2", "-X", "POST"])
        .arg(format!("{base}/v1/chat/completions"))
        .args(["-H", &format!("Authorization: Bearer {KEY}")])
        .args(["-H", "Content-Type: application/json"])
        .args([
            "-d",
            r#"{"model": "sim", "messages": [{"role": "user", "content": "anyone?"}]}"#,
        ])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(28),
        "curl gave up waiting (timeout)"
    );
    let conn = rusqlite::Connection::open(s.db()).unwrap();
    common::wait_for("the job cancelled", LIMIT, || {
        conn.query_row("SELECT status FROM gpu_jobs", [], |r| r.get::<_, String>(0))
            .is_ok_and(|st| st == "cancelled")
    });
    assert_eq!(jobs_in(&s), 1, "{}", d.log());
}

#[test]
fn a_batch_cancelled_before_its_lines_were_queued_lists_every_line_as_an_error() {
    let sim = SimProcess::start(&[]);
    let port = free_port();
    let s = Scratch::new(&(api(port) + &external("think", "think", &sim.url)));
    let d = DaemonProcess::start_ready(&s, "daemon", &["think"], LIMIT);
    let base = format!("http://127.0.0.1:{port}");
    let report = sdk_beside(&["cancel_unqueued", &base, KEY], &[&d]);
    eprintln!("{report}");
    // The small batch was cancelled while the worker still queued the big
    // one, so none of its lines became a job.
    assert_eq!(
        report["big_status_when_small_cancelled"], "validating",
        "{report}"
    );
    assert_eq!(report["small_output"], 0, "{report}");
    assert_eq!(report["small_errors"], 5, "{report}");
    assert_eq!(
        report["small_error_codes"],
        serde_json::json!(["batch_cancelled"])
    );
    assert_eq!(
        report["small_counts"],
        serde_json::json!([5, 5]),
        "{report}"
    );
}

#[test]
fn a_batch_past_its_window_expires_with_what_it_finished() {
    let sim = SimProcess::start(&["--latency-ms", "300", "--max-num-seqs", "2"]);
    let port = free_port();
    let s = Scratch::new(&(api(port) + &external("think", "think", &sim.url)));
    let d = DaemonProcess::start_ready(&s, "daemon", &["think"], LIMIT);
    let base = format!("http://127.0.0.1:{port}");
    let started = sdk(&["start", &base, KEY, "60"]);
    assert_eq!(started["status"], "in_progress", "{started}");
    // The 24 h window closes now: the batch's deadline moved to the past.
    let id = started["batch_id"].as_str().unwrap();
    let conn = rusqlite::Connection::open(s.db()).unwrap();
    let moved = conn
        .execute(
            "UPDATE api_batches SET doc = json_set(doc, '$.expires_at', 1) WHERE id = ?1",
            [id],
        )
        .unwrap();
    assert_eq!(moved, 1);
    let done = sdk(&["expired", &base, KEY, id, "60"]);
    eprintln!("{done}");
    assert!(done["output"].as_u64() >= Some(3), "{done}");
    assert!(
        done["errors"].as_u64() >= Some(1),
        "unfinished lines expired: {done}"
    );
    // Their jobs were cancelled, not left to run.
    common::wait_for("the batch's jobs ended", LIMIT, || {
        conn.query_row(
            "SELECT count(*) FROM gpu_jobs WHERE status IN ('pending', 'processing')",
            [],
            |r| r.get::<_, i64>(0),
        )
        .unwrap()
            == 0
    });
    drop(d);
}

#[test]
fn an_upload_over_200_mb_is_refused_and_leaves_nothing() {
    let port = free_port();
    let s = without_server(port);
    let d = start_api(&s, port);
    let base = format!("http://127.0.0.1:{port}");
    let report = sdk(&["too_big", &base, KEY]);
    assert_eq!(report["listed"], 0, "{report}");
    let left: Vec<_> = std::fs::read_dir(s.path().join("results/files"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}; {}", d.log());
}

#[test]
fn an_upload_cut_short_leaves_no_part_file_after_a_restart() {
    let port = free_port();
    let s = without_server(port);
    let files = s.path().join("results/files");
    std::fs::create_dir_all(&files).unwrap();
    let part = files.join("file-cut.part");
    std::fs::write(&part, "{}\n").unwrap();
    let d = start_api(&s, port);
    assert!(!part.exists(), "{}", d.log());
}

#[test]
fn a_public_address_without_keys_is_refused() {
    let s = Scratch::new("[api]\nlisten = \"0.0.0.0:8000\"\n");
    let run = s.run(&["config", "check"]);
    assert_ne!(run.code(), 0);
    assert!(run.stderr().contains("api.listen"), "{}", run.stderr());
    assert!(run.stderr().contains("api.keys"), "{}", run.stderr());
}

#[test]
fn a_chat_priority_not_above_batches_is_refused() {
    let s = Scratch::new("[api]\nchat_priority = -10\n");
    let run = s.run(&["config", "check"]);
    assert_ne!(run.code(), 0);
    assert!(
        run.stderr().contains("api.chat_priority") && run.stderr().contains("batch_priority"),
        "{}",
        run.stderr()
    );
}

/// The peak resident memory of process `pid` so far (`VmHWM`), in MiB.
fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kib / 1024.0
}

/// Figures, not a check: a 50,000-line batch on the simulator, from upload
/// to completed, and the daemon's peak RSS over the whole run (upload,
/// queueing, dispatch and writing the output). Run with
/// `cargo test --release --test openai_api -- --ignored --nocapture`.
#[test]
#[ignore]
fn figures_of_a_50000_line_batch() {
    let sim = SimProcess::start(&[]);
    let port = free_port();
    let s = Scratch::new(&(api(port) + &external("think", "think", &sim.url)));
    let d = DaemonProcess::start_ready(&s, "daemon", &["think"], LIMIT);
    let before = peak_rss_mib(d.child.id());
    let base = format!("http://127.0.0.1:{port}");
    let report = sdk(&["big", &base, KEY, "50000"]);
    let after = peak_rss_mib(d.child.id());
    println!("50,000-line batch: {report}");
    println!("daemon peak RSS: {before:.1} MiB when ready, {after:.1} MiB after the batch");
}

/// Two daemons on one PostgreSQL queue serve one API: a batch created
/// through one host's API is worked on by both hosts' servers, queued and
/// finalized once (each `custom_id` exactly once in its files), and its
/// files are read through the other host's API.
#[test]
fn two_daemons_on_one_postgres_queue_serve_the_same_batches() {
    let pg = common::pg::PgServer::start();
    let url = pg.fresh_db();
    let files = tempfile::tempdir().unwrap();
    let mut hosts = Vec::new();
    for name in ["east", "west"] {
        let sim = SimProcess::start(&["--latency-ms", "50"]);
        let port = free_port();
        let queue = format!("database_url = \"{url}\"\ndaemon_id = \"{name}\"\n");
        let extra = api(port)
            .replace(
                "external_poll_ms = 50\n",
                "external_poll_ms = 50\nwindow = 8\n",
            )
            .replace(
                "[api]\n",
                &format!("[api]\nfiles_dir = \"{}\"\n", files.path().display()),
            )
            + &external("think", "think", &sim.url);
        let s = Scratch::with_queue(&queue, &extra);
        let d = DaemonProcess::start_ready(&s, name, &["think"], LIMIT);
        hosts.push((s, d, sim, port));
    }
    let base = |i: usize| format!("http://127.0.0.1:{}", hosts[i].3);
    let daemons = [&hosts[0].1, &hosts[1].1];
    let started = sdk_beside(&["start", &base(0), KEY, "400"], &daemons);
    let batch = started["batch_id"]
        .as_str()
        .expect("a batch id")
        .to_string();
    let done = sdk_beside(&["finish", &base(1), KEY, &batch, "400"], &daemons);
    assert_eq!(
        (done["output"].as_u64(), done["errors"].as_u64()),
        (Some(400), Some(0)),
        "{done}\n{}\n{}",
        hosts[0].1.log(),
        hosts[1].1.log()
    );
    // Both hosts' servers did part of the batch.
    let by = pg.psql(
        &url,
        "SELECT claimed_by, count(*) FROM gpu_jobs WHERE status = 'done' GROUP BY claimed_by",
    );
    for name in ["east", "west"] {
        let n: i64 = by
            .lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.split('|').nth(1)?.trim().parse::<i64>().ok())
            .sum();
        assert!(n > 0, "{name} did none of the batch: {by}");
    }
    // One output and one error file at most were written, by one daemon.
    let outputs = std::fs::read_dir(files.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with("-output"))
        .count();
    assert_eq!(outputs, 1, "one output file in the shared folder");
}
