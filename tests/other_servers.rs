//! `external` instances that are OpenAI-compatible but not vLLM: no
//! `/health`, no `/v1/models`, one request at a time, validation errors as
//! HTTP 500, `usage` counted in other fields or not at all. Each is a clear
//! outcome, never a stuck job. A real HTTP server (`common::openai_like`),
//! the real binary, a real SQLite file.

mod common;

use std::time::Duration;

use common::openai_like::{OpenAiLike, Quirks, Usage};
use common::{external, free_port, wait_for, DaemonProcess, Scratch};

const LIMIT: Duration = Duration::from_secs(60);

/// A scratch folder whose daemon feeds `server` as instance `other`.
fn scratch(server: &OpenAiLike, dispatch: &str) -> Scratch {
    Scratch::new(&format!(
        "[admin]\nlisten = \"127.0.0.1:{}\"\n\n[dispatch]\nexternal_poll_ms = 100\nretry_base_s = 0.05\nretry_max_s = 0.1\n{dispatch}\n\n[health]\ninterval_s = 0.2\n\n{}",
        free_port(),
        external("other", "think", &server.url)
    ))
}

/// Submits `n` prompts, starts the daemon, waits for every queued job to end.
fn feed(s: &Scratch, tag: &str, n: usize) -> DaemonProcess {
    s.submit_prompts("think", tag, n);
    let d = DaemonProcess::start(s, "daemon");
    wait_for("every job has ended", LIMIT, || {
        let c = s.counts();
        let ended = c.get("done").copied().unwrap_or(0) + c.get("failed").copied().unwrap_or(0);
        ended == c.values().sum::<u64>()
    });
    d
}

/// A server with `quirks`, fed `n` prompts tagged `tag` by a daemon with
/// these `dispatch` settings; every job must be done.
fn served_all(
    quirks: Quirks,
    dispatch: &str,
    tag: &str,
    n: usize,
) -> (OpenAiLike, Scratch, DaemonProcess) {
    let server = OpenAiLike::start(quirks);
    let s = scratch(&server, dispatch);
    let d = feed(&s, tag, n);
    assert_all_done(&s, &d);
    (server, s, d)
}

fn assert_all_done(s: &Scratch, d: &DaemonProcess) {
    for j in s.jobs() {
        assert_eq!(j["status"], "done", "{j}\n{}", d.log());
        let doc: serde_json::Value =
            serde_json::from_slice(&std::fs::read(j["result_path"].as_str().unwrap()).unwrap())
                .unwrap();
        assert!(
            doc["content"].as_str().unwrap().starts_with("answer: "),
            "{doc}"
        );
    }
}

#[test]
fn a_server_whose_health_route_answers_404_becomes_ready_and_completes_jobs() {
    let (server, s, d) = served_all(Quirks::default(), "", "no-health", 20);
    assert_eq!(
        server
            .received()
            .iter()
            .filter(|t| t.starts_with("no-health"))
            .count(),
        20,
        "each job was sent once"
    );
    // Which checks it is probed with, in the log and in `instances`.
    let log = d.log();
    assert!(
        log.contains("probed with GET /v1/models") && log.contains("/health answers HTTP 404"),
        "{log}"
    );
    let inst = s.instance("other").expect("the daemon answers");
    assert_eq!(inst["state"], "ready", "{inst}");
    let probes = inst["probes"].as_str().unwrap_or_default();
    assert!(
        probes.contains("/v1/models") && probes.contains("not a vLLM server"),
        "{inst}"
    );
    let table = s.run(&["instances"]).stdout();
    assert!(
        table.contains("other: probed with GET /v1/models"),
        "{table}"
    );
}

#[test]
fn a_server_with_only_the_completions_route_is_probed_by_canary_and_used() {
    let quirks = Quirks {
        models_route: false,
        ..Quirks::default()
    };
    let (_server, s, _d) = served_all(quirks, "", "bare", 10);
    let probes = s.instance("other").unwrap()["probes"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        probes.contains("a canary completion at every probe"),
        "{probes}"
    );
}

#[test]
fn a_server_that_runs_one_request_at_a_time_still_gets_every_job_done() {
    let quirks = Quirks {
        one_at_a_time: true,
        latency: Duration::from_millis(20),
        ..Quirks::default()
    };
    let (server, _s, _d) = served_all(quirks, "window = 8", "serial", 40);
    // The daemon sent more than the server would run: requests queued
    // behind each other there, and still every job was done.
    let waited = server.most_waiting();
    println!("at most {waited} requests waited behind the one running");
    assert!(
        waited > 0,
        "no request ever waited behind another: the server was never asked for more than it runs"
    );
}

#[test]
fn validation_errors_answered_with_500_fail_the_job_with_the_servers_words() {
    let server = OpenAiLike::start(Quirks {
        invalid_as_500: Some("malformed".into()),
        ..Quirks::default()
    });
    let s = scratch(&server, "max_attempts = 2");
    s.submit_prompts("think", "malformed", 1);
    let d = feed(&s, "fine", 5);
    let jobs = s.jobs();
    let bad: Vec<_> = jobs.iter().filter(|j| j["status"] == "failed").collect();
    assert_eq!(bad.len(), 1, "{jobs:?}");
    let error = bad[0]["error"].as_str().unwrap();
    assert!(
        error.contains("HTTP 500")
            && error.contains("validation error: field `messages` contains `malformed`"),
        "{error}"
    );
    assert_eq!(
        bad[0]["attempts"], 2,
        "retried up to max_attempts, then failed"
    );
    assert_eq!(
        server
            .received()
            .iter()
            .filter(|t| t.contains("malformed"))
            .count(),
        2
    );
    assert_eq!(s.count("done"), 5, "{}", d.log());
}

/// The rows of five jobs done through a server that reports `usage` so.
fn five_done_reporting(usage: Usage, tag: &str) -> Vec<serde_json::Value> {
    let quirks = Quirks {
        usage,
        ..Quirks::default()
    };
    served_all(quirks, "", tag, 5).1.jobs()
}

#[test]
fn usage_counted_as_input_and_output_tokens_is_recorded() {
    for j in five_done_reporting(Usage::InputOutput, "counted") {
        assert!(j["prompt_tokens"].as_u64().is_some_and(|n| n > 0), "{j}");
        assert!(
            j["completion_tokens"].as_u64().is_some_and(|n| n > 0),
            "{j}"
        );
    }
}

#[test]
fn a_response_without_usage_completes_the_job_with_tokens_unknown() {
    for j in five_done_reporting(Usage::Absent, "uncounted") {
        assert!(j["prompt_tokens"].is_null(), "{j}");
        assert!(j["completion_tokens"].is_null(), "{j}");
    }
}

#[test]
fn overload_with_retry_after_is_honoured_and_never_counted_as_an_attempt() {
    for code in [429u16, 503] {
        let server = OpenAiLike::start(Quirks {
            overload_matching: Some(("busy".into(), code, 2, 1)),
            ..Quirks::default()
        });
        // One attempt allowed: an overload counted as one would fail the job.
        let s = scratch(&server, "max_attempts = 1");
        let d = feed(&s, "busy", 1);
        let job = &s.jobs()[0];
        assert_eq!(job["status"], "done", "HTTP {code}: {job}\n{}", d.log());
        assert_eq!(job["attempts"], 1, "HTTP {code}: {job}");
        let sent: Vec<_> = server
            .arrivals()
            .into_iter()
            .filter(|(t, _)| t.starts_with("busy"))
            .map(|(_, at)| at)
            .collect();
        assert_eq!(sent.len(), 3, "HTTP {code}: twice refused, then answered");
        for pair in sent.windows(2) {
            let gap = pair[1] - pair[0];
            assert!(
                gap >= Duration::from_secs(1),
                "HTTP {code}: sent again {gap:?} after `Retry-After: 1`"
            );
        }
    }
}
