//! Promises the README makes about the command line and the admin endpoint
//! that no other test covers: `submit --wait` exits 1 when the job fails,
//! `/readyz` answers 503 while no instance is ready, and `--log-format
//! json` writes one JSON object per log line. The real binary, a real
//! simulated server, a real SQLite file.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::http::get;
use common::{bin, external, free_port, wait_for, DaemonProcess, Scratch, SimProcess};

const LIMIT: Duration = Duration::from_secs(60);

fn settings(admin: u16) -> String {
    format!(
        "[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n[dispatch]\nexternal_poll_ms = 100\n\n[health]\ninterval_s = 0.2\n\n"
    )
}

/// README, "Command line": exit status 1 for `submit --wait` when the job
/// did not end `done`; 0 when it did.
#[test]
fn submit_wait_exits_1_when_the_job_fails_and_0_when_it_is_done() {
    let think = SimProcess::start(&["--fail-matching", "refuse me"]);
    let s = Scratch::new(&(settings(free_port()) + &external("think", "think", &think.url)));
    let _d = DaemonProcess::start_ready(&s, "daemon", &["think"], LIMIT);
    let failed = s.run(&[
        "submit",
        "--model",
        "think",
        "--prompt",
        "refuse me",
        "--wait",
        "--timeout-s",
        "60",
    ]);
    assert_eq!(
        failed.code(),
        1,
        "a failed job: {}\n{}",
        failed.stdout(),
        failed.stderr()
    );
    assert!(
        format!("{}{}", failed.stdout(), failed.stderr()).contains("failed"),
        "it says the job failed: {}\n{}",
        failed.stdout(),
        failed.stderr()
    );
    let done = s.run(&[
        "submit",
        "--model",
        "think",
        "--prompt",
        "fine",
        "--wait",
        "--timeout-s",
        "60",
    ]);
    assert_eq!(done.code(), 0, "{}\n{}", done.stdout(), done.stderr());
}

/// README, "Admin endpoint": `/readyz` is 503 with the reason while no
/// instance is ready, and 200 once one is.
#[test]
fn readyz_is_503_while_no_instance_is_ready_and_200_once_one_is() {
    // Nothing listens on the instance's port yet.
    let port = free_port();
    let admin = free_port();
    let s = Scratch::new(
        &(settings(admin) + &external("think", "think", &format!("http://127.0.0.1:{port}"))),
    );
    let d = DaemonProcess::start(&s, "daemon");
    wait_for("the admin endpoint answers", LIMIT, || {
        get(admin, "/readyz").0 != 0
    });
    wait_for("the instance was probed and is not ready", LIMIT, || {
        s.instance("think").is_some_and(|i| i["state"] != "ready")
    });
    let (code, body) = get(admin, "/readyz");
    assert_eq!(code, 503, "{body}\n{}", d.log());
    assert!(body.contains("no instance is ready"), "{body}");
    // A server comes up on that port: ready.
    let mut child = Command::new(bin())
        .args(["sim", "--port", &port.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the sim");
    let url = common::command::listening_url(&mut child, "the sim");
    let _think = SimProcess { child, url };
    wait_for("/readyz is 200", LIMIT, || get(admin, "/readyz").0 == 200);
}

/// The daemon's log, run with `--log-format FORMAT` until its instance is
/// ready, written to a file (not a terminal).
fn log_as(format: &str) -> String {
    let think = SimProcess::start(&[]);
    let s = Scratch::new(&(settings(free_port()) + &external("think", "think", &think.url)));
    let log = s.path().join(format!("daemon.{format}.log"));
    let mut child = Command::new(bin())
        .arg("--config")
        .arg(s.config())
        .args(["--log-format", format, "run"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start the daemon");
    wait_for("the instance is ready", LIMIT, || {
        s.instance_is("think", "ready")
    });
    let _ = child.kill();
    let _ = child.wait();
    std::fs::read_to_string(&log).unwrap()
}

/// README, "Running the daemon": with `--log-format json`, every line the
/// daemon logs is one JSON object with a level and a message; with
/// `--log-format human`, into the same kind of file, none is (so the flag
/// decides, not the file the log goes to).
#[test]
fn log_format_json_writes_one_json_object_per_line() {
    let human = log_as("human");
    assert!(
        human.lines().count() > 1
            && human
                .lines()
                .all(|l| serde_json::from_str::<serde_json::Value>(l).is_err()),
        "--log-format human wrote JSON: {human}"
    );
    let text = log_as("json");
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.len() > 1, "the daemon logged: {text}");
    let mut ready = false;
    for line in &lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        assert!(v["level"].is_string(), "no level: {line}");
        let message = v["message"]
            .as_str()
            .unwrap_or_else(|| panic!("no message: {line}"));
        ready |= message.contains("ready");
    }
    assert!(ready, "the instance's readiness is logged: {text}");
}
