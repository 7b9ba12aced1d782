//! The daemon's interfaces: MCP over stdio driven by a real MCP client (the
//! Python SDK), the admin endpoint (metrics checked by `promtool`, bearer
//! token), and systemd notifications read from a real datagram socket.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::http::http;
use common::{
    bin, external, free_port, mcp_client_with_idle, promtool, wait_for, DaemonProcess, Scratch,
    SimProcess,
};

const LIMIT: Duration = Duration::from_secs(60);

fn admin(port: u16, token: &str) -> String {
    format!("[admin]\nlisten = \"127.0.0.1:{port}\"\ntoken = \"{token}\"\n\n[health]\ninterval_s = 1\n\n[dispatch]\nexternal_poll_ms = 100\n\n")
}

/// A running daemon with its admin endpoint on a port of its own (and
/// `token`, unless empty), feeding one sim: what it needs is kept here.
/// (Fields drop in order: the daemon stops first.)
struct Running {
    _d: DaemonProcess,
    s: Scratch,
    _think: SimProcess,
    /// The admin endpoint's URL.
    base: String,
}

fn running(token: &str) -> Running {
    let think = SimProcess::start(&[]);
    let port = free_port();
    let s = Scratch::new(&(admin(port, token) + &external("think", "think", &think.url)));
    let d = DaemonProcess::start_ready(&s, "daemon", &["think"], LIMIT);
    Running {
        _d: d,
        s,
        _think: think,
        base: format!("http://127.0.0.1:{port}"),
    }
}

#[test]
fn a_real_mcp_client_submits_a_job_and_reads_its_result() {
    // Only a think instance runs: vision jobs stay pending.
    mcp_client_with_idle(&running("").s, &["vision"]);
}

#[test]
fn malformed_lines_and_unknown_methods_get_json_rpc_errors_and_the_server_keeps_serving() {
    let s = Scratch::new("");
    let mut child = Command::new(bin())
        .args(["--config", s.config().to_str().unwrap(), "mcp"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut send = |line: &str| {
        stdin.write_all(line.as_bytes()).unwrap();
        stdin.write_all(b"\n").unwrap();
        stdin.flush().unwrap();
    };
    let mut next = || -> serde_json::Value {
        let line = lines.next().expect("a response line").unwrap();
        serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("stdout carried a non-JSON line ({e}): {line}"))
    };
    send(
        r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"raw","version":"0"}}}"#,
    );
    assert_eq!(next()["id"], 1);
    send(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#);
    send("this is not JSON");
    let err = next();
    assert!(
        err["error"]["code"].is_i64(),
        "a malformed line gets a JSON-RPC error: {err}"
    );
    send(r#"{"jsonrpc":"2.0","id":7,"method":"no/such/method"}"#);
    let err = next();
    assert_eq!(err["id"], 7);
    assert_eq!(err["error"]["code"], -32601, "{err}");
    send(r#"{"jsonrpc":"2.0","id":8,"method":"tools/list"}"#);
    let list = next();
    assert_eq!(list["id"], 8);
    assert!(
        list["result"]["tools"].as_array().unwrap().len() >= 7,
        "{list}"
    );
    drop(stdin);
    let _ = child.wait();
}

#[test]
fn metrics_pass_promtool_and_move_as_jobs_run() {
    let Running { base, s, .. } = &running("");
    let metric = |text: &str, name: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let (code, before) = http("GET", &format!("{base}/metrics"), None, None);
    assert_eq!(code, 200);
    for i in 0..25 {
        let (code, body) = http(
            "POST",
            &format!("{base}/v1/jobs"),
            None,
            Some(&format!(r#"{{"model": "think", "prompt": "m{i}"}}"#)),
        );
        assert_eq!(code, 201, "{body}");
    }
    let (code, body) = http(
        "POST",
        &format!("{base}/v1/jobs"),
        None,
        Some(r#"{"model": "think"}"#),
    );
    assert_eq!(code, 400);
    assert!(
        body.contains("needs `messages`, `prompt` or `image_path`"),
        "{body}"
    );
    wait_for("25 jobs are done", LIMIT, || s.count("done") == 25);
    let (_, after) = http("GET", &format!("{base}/metrics"), None, None);
    let done = r#"gpu_feeder_requests_total{instance="think",outcome="done"}"#;
    assert_eq!(metric(&before, done), 0.0);
    assert_eq!(metric(&after, done), 25.0, "{after}");
    assert_eq!(
        metric(
            &after,
            r#"gpu_feeder_jobs{model_type="think",status="done"}"#
        ),
        25.0
    );
    assert_eq!(
        metric(&after, r#"gpu_feeder_instance_ready{instance="think"}"#),
        1.0
    );
    assert!(metric(&after, "gpu_feeder_request_duration_seconds_count") >= 25.0);
    let (passed, said) = promtool(&after);
    assert!(passed, "promtool check metrics failed:\n{said}");
}

#[test]
fn the_admin_endpoint_is_loopback_by_default_and_a_token_is_enforced() {
    assert!(gpu_feeder::config::Config::default()
        .admin
        .listen
        .starts_with("127.0.0.1:"));
    let Running { base, s, .. } = &running("s3cret");
    assert_eq!(http("GET", &format!("{base}/healthz"), None, None).0, 200);
    for path in ["/v1/status", "/metrics", "/readyz"] {
        assert_eq!(
            http("GET", &format!("{base}{path}"), None, None).0,
            401,
            "{path}"
        );
        assert_eq!(
            http("GET", &format!("{base}{path}"), Some("wrong"), None).0,
            401,
            "{path}"
        );
    }
    let (code, body) = http("GET", &format!("{base}/v1/status"), Some("s3cret"), None);
    assert_eq!(code, 200);
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status["instances"][0]["name"], "think");
    // The CLI reads the token from the configuration.
    let live = s.json(&["instances", "--json"]);
    assert_eq!(live["instances"][0]["state"], "ready");
    for key in [
        "name",
        "model_type",
        "state",
        "backend",
        "container_id",
        "restarts",
        "last_error",
    ] {
        assert!(
            live["instances"][0].get(key).is_some(),
            "instances --json lacks {key}"
        );
    }
    assert!(live["gpus"].is_array() && live["strategy"].is_string());
}

#[test]
fn instances_says_when_the_daemon_is_not_running() {
    let s = Scratch::new(&admin(free_port(), ""));
    let r = s.run(&["instances"]);
    r.refused(1, "the daemon is not running");
}

#[test]
fn systemd_hears_ready_status_watchdog_and_stopping() {
    let think = SimProcess::start(&[]);
    let s = Scratch::new(&(admin(free_port(), "") + &external("think", "think", &think.url)));
    let socket_path = s.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let log = std::fs::File::create(s.path().join("daemon.log")).unwrap();
    let mut child = Command::new(bin())
        .args(["--config", s.config().to_str().unwrap(), "run"])
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "400000")
        .stderr(log)
        .spawn()
        .unwrap();
    let mut heard: Vec<String> = Vec::new();
    let listen_until = |heard: &mut Vec<String>, cond: &dyn Fn(&[String]) -> bool| {
        let start = Instant::now();
        let mut buf = [0u8; 4096];
        while !cond(heard) {
            assert!(start.elapsed() < LIMIT, "systemd heard only {heard:?}");
            if let Ok(n) = socket.recv(&mut buf) {
                heard.extend(
                    String::from_utf8_lossy(&buf[..n])
                        .lines()
                        .map(str::to_string),
                );
            }
        }
    };
    listen_until(&mut heard, &|h| {
        h.iter().any(|l| l == "READY=1")
            && h.iter().filter(|l| *l == "WATCHDOG=1").count() >= 2
            && h.iter().any(|l| l.starts_with("STATUS=think: ready"))
    });
    let status = heard
        .iter()
        .find(|l| l.starts_with("STATUS=think: ready"))
        .unwrap();
    assert!(status.ends_with("0 pending"), "{status}");
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    listen_until(&mut heard, &|h| h.iter().any(|l| l == "STOPPING=1"));
    assert_eq!(child.wait().unwrap().code(), Some(0));
}

#[test]
fn the_systemd_unit_passes_systemd_analyze_verify() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/packaging/systemd/gpu-feeder.service"
    ))
    .unwrap();
    for line in [
        "Type=notify",
        "WatchdogSec=",
        "StateDirectory=gpu-feeder",
        "User=gpu-feeder",
        "NoNewPrivileges=yes",
        "Restart=on-failure",
    ] {
        assert!(unit.contains(line), "the unit lacks {line}");
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gpu-feeder.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/gpu-feeder", bin())).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", path.to_str().unwrap()])
        .output()
        .expect("systemd-analyze is installed (.ci/run installs systemd)");
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
