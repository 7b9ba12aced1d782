//! The daemon end to end: the real binary, real simulated vLLM servers on
//! ephemeral ports, a real SQLite file; crashes by `kill -9`.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::served::{RequestLog, Served};
use common::{external, sqlite3, unix_now, wait_for, DaemonProcess, Scratch, SimProcess};

const LIMIT: Duration = Duration::from_secs(120);

fn dispatch(extra: &str) -> String {
    format!("[admin]\nlisten = \"127.0.0.1:0\"\n\n[dispatch]\nwindow = 16\nexternal_poll_ms = 100\nretry_base_s = 0.05\nretry_max_s = 0.2\nshutdown_grace_s = 5\n{extra}\n[health]\ninterval_s = 1\n\n")
}

/// Writes `n` JSONL payload lines for `model`.
fn jsonl(s: &Scratch, name: &str, n: usize, line: impl Fn(usize) -> String) -> String {
    let path = s.stage().join(name);
    let body: String = (0..n).map(|i| line(i) + "\n").collect();
    std::fs::write(&path, body).unwrap();
    path.to_str().unwrap().to_string()
}

/// What the sim answers to a job's payload: it echoes the prompt, so every
/// result can be matched to the request that produced it.
fn expected_content(job: &serde_json::Value) -> (String, bool) {
    let payload: serde_json::Value = match job["payload_inline"].as_str() {
        Some(inline) => serde_json::from_str(inline).unwrap(),
        None => serde_json::from_slice(
            &std::fs::read(job["payload_path"].as_str().expect("a payload")).unwrap(),
        )
        .unwrap(),
    };
    let prompt = payload["prompt"].as_str().expect("a prompt").to_string();
    if payload.get("image_path").is_some() || payload.get("image_b64").is_some() {
        (format!("; {prompt}"), true)
    } else {
        (format!("echo: {prompt}"), false)
    }
}

/// Every job is done, with a result file of its own whose content answers
/// that job's own prompt.
fn assert_results_valid(s: &Scratch) -> usize {
    let jobs = s.jobs();
    let mut paths = HashSet::new();
    for j in &jobs {
        assert_eq!(
            j["status"], "done",
            "job {} is {}: {}",
            j["id"], j["status"], j["error"]
        );
        let path = j["result_path"].as_str().expect("a done job has a result");
        let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        assert_eq!(doc["id"], j["id"]);
        let content = doc["content"].as_str().unwrap_or_default();
        match expected_content(j) {
            (ending, true) => assert!(
                content.starts_with("ocr: image of about") && content.ends_with(&ending),
                "job {} got `{content}`, not the answer to its own image and prompt",
                j["id"]
            ),
            (echo, false) => assert_eq!(
                content, echo,
                "job {} got the answer to another request",
                j["id"]
            ),
        }
        assert!(
            paths.insert(path.to_string()),
            "two jobs share a result file"
        );
    }
    jobs.len()
}

#[test]
fn two_thousand_mixed_jobs_all_end_done_with_valid_results() {
    let vision = SimProcess::start(&["--max-num-seqs", "8"]);
    let think = SimProcess::start(&["--max-num-seqs", "16"]);
    let s = Scratch::new(
        &(dispatch("")
            + &external("vision", "vision", &vision.url)
            + &external("think", "think", &think.url)),
    );
    let img = s.stage().join("page.png");
    std::fs::write(&img, b"\x89PNG not decoded by the sim").unwrap();
    let v = jsonl(&s, "v.jsonl", 1000, |i| {
        format!(
            r#"{{"image_path": "{}", "prompt": "page {i}"}}"#,
            img.display()
        )
    });
    let t = jsonl(&s, "t.jsonl", 1000, |i| {
        format!(r#"{{"prompt": "question {i}"}}"#)
    });
    assert_eq!(
        s.json(&["submit", "--model", "vision", "--jsonl", &v, "--json"])["created"],
        1000
    );
    assert_eq!(
        s.json(&["submit", "--model", "think", "--jsonl", &t, "--json"])["created"],
        1000
    );
    let _d = DaemonProcess::start(&s, "daemon");
    wait_for("2000 jobs are done", LIMIT, || s.count("done") == 2000);
    assert_eq!(assert_results_valid(&s), 2000);
    // The answers came from the right servers.
    let one = s
        .jobs()
        .into_iter()
        .find(|j| j["model_type"] == "vision")
        .unwrap();
    let doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(one["result_path"].as_str().unwrap()).unwrap())
            .unwrap();
    assert!(
        doc["content"]
            .as_str()
            .unwrap()
            .starts_with("ocr: image of about"),
        "{}",
        doc["content"]
    );
}

#[test]
fn a_row_inserted_by_another_program_is_dispatched() {
    let think = SimProcess::start(&[]);
    let s = Scratch::new(&(dispatch("") + &external("think", "think", &think.url)));
    assert_eq!(s.run(&["migrate"]).code(), 0);
    let d = DaemonProcess::start(&s, "daemon");
    wait_for("the daemon is up", LIMIT, || {
        d.log().contains("loading → ready")
    });
    let payload = s.stage().join("p.json");
    std::fs::write(&payload, r#"{"prompt": "from another program"}"#).unwrap();
    let insert = format!(
        "INSERT INTO gpu_jobs (id, payload_sha256, model_type, payload_path, created_at) \
         VALUES (randomblob(16), 'x', 'think', '{}', strftime('%s','now'));",
        payload.display()
    );
    sqlite3(&s.db(), &insert);
    wait_for("the inserted job is done", Duration::from_secs(30), || {
        s.count("done") == 1
    });
    let job = &s.jobs()[0];
    let doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(job["result_path"].as_str().unwrap()).unwrap())
            .unwrap();
    assert_eq!(doc["content"], "echo: from another program");
}

#[test]
fn kill_9_and_restart_finish_every_job_exactly_once_without_waiting_for_leases() {
    let dir = tempfile::tempdir().unwrap();
    let log = RequestLog::new(dir.path(), "think");
    let think = log.sim(&["--max-num-seqs", "8", "--latency-ms", "40"]);
    // Leases far longer than the test: only releasing the dead daemon's
    // claims at restart can finish the jobs in time.
    let s = Scratch::with_queue(
        "lease_s = 3600",
        &(dispatch("") + &external("think", "think", &think.url)),
    );
    let t = jsonl(&s, "t.jsonl", 400, |i| format!(r#"{{"prompt": "q{i}"}}"#));
    s.json(&["submit", "--model", "think", "--jsonl", &t, "--json"]);
    // Kill once 50 more jobs are done, until a kill finds jobs claimed:
    // a kill between claims proves nothing.
    let mut served = Served::default();
    for tries in 1.. {
        let mut first = DaemonProcess::start(&s, &format!("first-{tries}"));
        let done = s.count("done");
        assert!(
            done + 50 <= 400,
            "{tries} kills found no job claimed before the work ran out"
        );
        wait_for("50 more jobs are done", LIMIT, || {
            s.count("done") >= done + 50
        });
        first.kill9();
        let stranded = served.kill_found(s.claimed());
        println!("kill {tries}: {stranded} jobs claimed");
        if stranded > 0 {
            break;
        }
    }
    let second = DaemonProcess::start(&s, "second");
    wait_for("every job is done", Duration::from_secs(90), || {
        s.count("done") == 400
    });
    assert!(
        second.log().contains("released") && second.log().contains("claimed by a previous run"),
        "{}",
        second.log()
    );
    assert_eq!(assert_results_valid(&s), 400);
    let counts = s.counts();
    assert_eq!(
        counts["pending"] + counts["processing"] + counts["failed"],
        0
    );
    served.read(&[&log]);
    let (sends, duplicates) = served.assert_exactly_once(&s.jobs());
    println!("the server received {sends} requests for 400 jobs, {duplicates} of them sent again after the kill");
}

#[test]
fn against_a_failing_server_every_job_ends_done_or_failed() {
    let think = SimProcess::start(&["--fail-rate", "0.2"]);
    let s = Scratch::new(&(dispatch("") + &external("think", "think", &think.url)));
    let t = jsonl(&s, "t.jsonl", 500, |i| format!(r#"{{"prompt": "q{i}"}}"#));
    s.json(&["submit", "--model", "think", "--jsonl", &t, "--json"]);
    let _d = DaemonProcess::start(&s, "daemon");
    wait_for("no job is left pending or processing", LIMIT, || {
        let c = s.counts();
        c["done"] + c["failed"] == 500
    });
    let jobs = s.jobs();
    let failed: Vec<_> = jobs.iter().filter(|j| j["status"] == "failed").collect();
    for j in &failed {
        assert_eq!(j["attempts"], 3, "a job failed before its attempts ran out");
        assert!(
            j["error"].as_str().unwrap().contains("HTTP 500"),
            "{}",
            j["error"]
        );
    }
    let retried = jobs
        .iter()
        .filter(|j| j["status"] == "done" && j["attempts"].as_u64() > Some(1))
        .count();
    assert!(retried > 0, "with 20 % failures some jobs needed a retry");
}

#[test]
fn a_malformed_payload_file_fails_that_job_and_no_other() {
    let think = SimProcess::start(&[]);
    let s = Scratch::new(&(dispatch("") + &external("think", "think", &think.url)));
    let bad = s.stage().join("bad.json");
    std::fs::write(&bad, r#"{"prompt": "fine at submission"}"#).unwrap();
    let bad_id = s.submit_file("think", "--payload", &bad, &[])["id"]
        .as_str()
        .unwrap()
        .to_string();
    // The file is damaged after submission.
    std::fs::write(&bad, "{\"prompt\": ").unwrap();
    let t = jsonl(&s, "t.jsonl", 20, |i| format!(r#"{{"prompt": "q{i}"}}"#));
    s.json(&["submit", "--model", "think", "--jsonl", &t, "--json"]);
    let _d = DaemonProcess::start(&s, "daemon");
    wait_for("all jobs finished", LIMIT, || {
        s.count("done") + s.count("failed") == 21
    });
    assert_eq!(s.count("done"), 20);
    let job = s.json(&["status", &bad_id, "--json"]);
    assert_eq!(job["status"], "failed");
    assert_eq!(job["attempts"], 1, "a malformed payload is not retried");
    let err = job["error"].as_str().unwrap();
    assert!(
        err.contains("bad.json") && err.contains("not valid JSON"),
        "{err}"
    );
}

/// Ten jobs for a `think` sim started with `sim_args`, fed by a daemon
/// called `name` through a window of 4 with this grace; returns once 4
/// requests are in flight.
fn four_in_flight(
    sim_args: &[&str],
    grace_s: u64,
    name: &str,
) -> (SimProcess, Scratch, DaemonProcess) {
    let think = SimProcess::start(sim_args);
    let s = Scratch::new(
        &(dispatch("").replace("window = 16", "window = 4").replace(
            "shutdown_grace_s = 5",
            &format!("shutdown_grace_s = {grace_s}"),
        ) + &external("think", "think", &think.url)),
    );
    s.submit_prompts("think", "q", 10);
    let d = DaemonProcess::start(&s, name);
    wait_for("4 requests in flight", LIMIT, || think.running() == 4);
    (think, s, d)
}

#[test]
fn sigterm_lets_requests_in_flight_finish_puts_the_rest_back_and_exits_0() {
    let (_think, s, mut d) = four_in_flight(&["--latency-ms", "3000"], 60, "daemon");
    let termed = unix_now();
    d.term();
    assert_eq!(d.wait_exit(Duration::from_secs(60)), Some(0), "{}", d.log());
    let jobs = s.jobs();
    let done: Vec<_> = jobs.iter().filter(|j| j["status"] == "done").collect();
    assert_eq!(
        done.len(),
        4,
        "the 4 requests in flight finished: {}",
        d.log()
    );
    for j in &done {
        assert!(
            j["finished_at"].as_f64().unwrap() > termed,
            "{} finished before the signal, so it proves nothing",
            j["id"]
        );
    }
    assert_eq!(s.count("pending"), 6, "the rest went back: {}", d.log());
    assert_eq!(s.count("processing"), 0);
    assert!(jobs.iter().all(|j| j["attempts"].as_u64() <= Some(1)));
}

#[test]
fn requests_still_running_when_the_grace_ends_go_back_to_pending_uncounted() {
    // 32 tokens at 0.5 tokens/s: a minute per job, a 2 s one-token canary.
    let (_think, s, mut d) = four_in_flight(&["--tokens-per-s", "0.5"], 1, "daemon");
    d.term();
    assert_eq!(d.wait_exit(Duration::from_secs(30)), Some(0), "{}", d.log());
    assert_eq!(s.count("pending"), 10, "{}", d.log());
    for j in s.jobs() {
        assert_eq!(j["attempts"], 0, "a shutdown is not an attempt: {j}");
    }
}

#[test]
fn a_second_signal_stops_at_once_and_the_next_start_releases_the_claims() {
    // A minute per job (see above) against a grace of ten minutes.
    let (_slow, s, mut d) = four_in_flight(&["--tokens-per-s", "0.5"], 600, "first");
    d.term();
    wait_for("the shutdown began", LIMIT, || {
        d.log().contains("shutting down")
    });
    d.term();
    // Far sooner than the 600 s grace.
    assert_eq!(
        d.wait_exit(Duration::from_secs(30)),
        Some(130),
        "{}",
        d.log()
    );
    assert!(s.count("processing") >= 4, "the claims in flight were left");

    let fast = SimProcess::start(&[]);
    s.rewrite(&(dispatch("") + &external("think", "think", &fast.url)));
    let second = DaemonProcess::start(&s, "second");
    wait_for("every job is done", LIMIT, || s.count("done") == 10);
    assert!(
        second.log().contains("claimed by a previous run"),
        "{}",
        second.log()
    );
    assert_eq!(assert_results_valid(&s), 10);
}

#[test]
fn run_without_instances_says_so_and_a_second_daemon_is_refused() {
    let s = Scratch::new("");
    let r = s.run(&["run"]);
    r.refused(78, "no instance is configured");

    let think = SimProcess::start(&[]);
    let s = Scratch::new(&(dispatch("") + &external("think", "think", &think.url)));
    let first = DaemonProcess::start(&s, "first");
    wait_for("the first daemon is up", LIMIT, || {
        first.log().contains("gpu-feeder running")
    });
    let second = s.run(&["run"]);
    assert_eq!(second.code(), 1);
    assert!(
        second
            .stderr()
            .contains("another gpu-feeder daemon is running"),
        "{}",
        second.stderr()
    );
}

#[test]
fn the_demo_runs_to_completion() {
    let stdout = common::gpu_feeder(&["demo", "--jobs", "60"]).succeeded();
    // 20 images, 40 prompts, a parent and its 6 fragments.
    assert!(stdout.contains("finished  67 of 67 jobs"), "{stdout}");
    assert!(stdout.contains("67 done, 0 failed"), "{stdout}");
    assert!(stdout.contains("is done (6 fragments)"), "{stdout}");
    assert!(stdout.contains("│ echo: Nothing is lost."), "{stdout}");
}
