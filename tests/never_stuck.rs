//! A job is never stuck: work whose `run_at` comes due is sent whoever set
//! it (a daemon that died, another program), and random `kill -9` of the
//! daemon leaves every job terminal exactly once. The real binary, real
//! simulated servers, a real SQLite file.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::openai_like::{OpenAiLike, Quirks};
use common::served::{RequestLog, Served};
use common::{
    external, free_port, sqlite3, unix_now, wait_for, DaemonProcess, Scratch, SimProcess,
};
use rand::{Rng, SeedableRng};

const LIMIT: Duration = Duration::from_secs(120);

/// The poll interval for changes made by other programs; the promise is
/// that nothing waits longer than its `run_at` plus this.
const POLL_MS: u64 = 500;

fn config(admin_port: u16, dispatch: &str, instances: &str) -> String {
    format!(
        "[admin]\nlisten = \"127.0.0.1:{admin_port}\"\n\n[dispatch]\nwindow = 64\nexternal_poll_ms = {POLL_MS}\nshutdown_grace_s = 5\n{dispatch}\n\n[health]\ninterval_s = 0.2\n\n{instances}"
    )
}

fn f(job: &serde_json::Value, key: &str) -> f64 {
    job[key]
        .as_f64()
        .unwrap_or_else(|| panic!("job {} has no {key}: {job}", job["id"]))
}

/// When instance `name` of the running daemon last became ready.
fn ready_at(s: &Scratch, name: &str) -> f64 {
    let inst = s.instance(name).expect("the daemon answers");
    inst["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["to"] == "ready")
        .map(|t| t["at"].as_f64().unwrap())
        .fold(f64::NAN, f64::max)
}

/// How long after the jobs under test the marker comes due: ten poll
/// intervals.
const MARKER_AFTER_S: f64 = POLL_MS as f64 * 10.0 / 1000.0;

/// Inserts, as another program would, a marker row due `MARKER_AFTER_S`
/// after `due`: its claim marks a point in the daemon's order of work.
fn insert_marker(s: &Scratch, due: f64) {
    sqlite3(
        &s.db(),
        &format!(
            "PRAGMA busy_timeout = 10000; \
             INSERT INTO gpu_jobs (id, payload_sha256, model_type, payload_inline, created_at, run_at) \
             VALUES (randomblob(16), 'marker', 'think', '{{\"prompt\": \"marker\"}}', strftime('%s','now'), {});",
            due + MARKER_AFTER_S
        ),
    );
}

/// In the daemon's order of work: every job was claimed after its
/// `run_at`, and each due before the marker (which came due ten poll
/// intervals after the first of them, its server ready by then) was claimed
/// before the marker. How late each was after it could be sent is printed
/// as a figure, not judged by the clock.
fn assert_sent_when_due(s: &Scratch, ready: f64) {
    let all = s.jobs();
    let (markers, jobs): (Vec<_>, Vec<_>) = all.iter().partition(|j| {
        j["payload_inline"]
            .as_str()
            .is_some_and(|p| p.contains("marker"))
    });
    let [marker] = markers[..] else {
        panic!("one marker: {markers:?}")
    };
    let marker_due = f(marker, "run_at");
    assert!(
        ready < marker_due,
        "the server was ready only after the marker came due: the order proves nothing"
    );
    let marker_started = f(marker, "started_at");
    let mut latest = 0.0f64;
    for j in &jobs {
        let run_at = f(j, "run_at");
        let started = f(j, "started_at");
        assert!(
            started >= run_at,
            "job {} was claimed {:.3} s before its run_at",
            j["id"],
            run_at - started
        );
        assert!(
            run_at >= marker_due || started < marker_started,
            "job {} (due {run_at:.3}) was claimed no earlier than the marker due at {marker_due:.3}, {MARKER_AFTER_S} s after the first job",
            j["id"]
        );
        latest = latest.max(started - run_at.max(ready));
    }
    println!(
        "figure: {} jobs claimed at most {:.1} ms after they came due (poll interval: {POLL_MS} ms)",
        jobs.len(),
        latest * 1000.0
    );
}

#[test]
fn jobs_waiting_out_a_retry_backoff_are_sent_when_due_after_a_kill_9() {
    // Every job's request fails with HTTP 500 (the canary passes), so every
    // job goes back to pending with a run_at a few seconds ahead, set by
    // the daemon about to die.
    let failing = OpenAiLike::start(Quirks {
        health_route: true,
        invalid_as_500: Some("backoff".into()),
        ..Quirks::default()
    });
    let port = free_port();
    let s = Scratch::new(&config(
        port,
        "max_attempts = 5\nretry_base_s = 6\nretry_max_s = 6",
        &external("think", "think", &failing.url),
    ));
    s.submit_prompts("think", "backoff", 20);
    let mut first = DaemonProcess::start(&s, "first");
    wait_for("every job has failed once", LIMIT, || {
        let jobs = s.jobs();
        jobs.iter()
            .all(|j| j["status"] == "pending" && j["attempts"] == 1)
    });
    first.kill9();
    let earliest = s
        .jobs()
        .iter()
        .map(|j| f(j, "run_at"))
        .fold(f64::INFINITY, f64::min);
    assert!(
        earliest > unix_now(),
        "the backoff already ran out before the restart: the test proves nothing"
    );
    insert_marker(&s, earliest);

    // The same instance, now healthy; the new daemon never set those run_ats.
    let healthy = SimProcess::start(&[]);
    s.rewrite(&config(
        port,
        "max_attempts = 5\nretry_base_s = 6\nretry_max_s = 6",
        &external("think", "think", &healthy.url),
    ));
    let second = DaemonProcess::start(&s, "second");
    wait_for("every job and the marker are done", LIMIT, || {
        s.count("done") == 21
    });
    assert_sent_when_due(&s, ready_at(&s, "think"));
    assert!(second.log().contains("loading → ready"), "{}", second.log());
}

#[test]
fn a_row_inserted_with_a_future_run_at_is_sent_when_it_comes_due() {
    let think = SimProcess::start(&[]);
    let s = Scratch::new(&config(
        free_port(),
        "",
        &external("think", "think", &think.url),
    ));
    let d = DaemonProcess::start(&s, "daemon");
    wait_for("the daemon is up", LIMIT, || {
        d.log().contains("loading → ready")
    });
    let ready = ready_at(&s, "think");
    let due = unix_now() + 3.0;
    let insert = format!(
        "PRAGMA busy_timeout = 10000; \
         INSERT INTO gpu_jobs (id, payload_sha256, model_type, payload_inline, created_at, run_at) \
         VALUES (randomblob(16), 'later', 'think', '{{\"prompt\": \"later\"}}', strftime('%s','now'), {due});"
    );
    sqlite3(&s.db(), &insert);
    insert_marker(&s, due);
    wait_for(
        "the job and the marker are done",
        Duration::from_secs(30),
        || s.count("done") == 2,
    );
    assert_sent_when_due(&s, ready);
}

/// `CHAOS_SEED=N` replays a run; the seed is printed either way.
fn seed() -> u64 {
    std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random)
}

#[test]
fn random_kill_9s_leave_every_job_terminal_exactly_once() {
    const JOBS: usize = 5000;
    const KILLS: usize = 15;
    const MAX_ATTEMPTS: u64 = 3;
    let seed = seed();
    println!("chaos seed {seed} (CHAOS_SEED={seed} replays the kill points)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    let dir = tempfile::tempdir().unwrap();
    let log = RequestLog::new(dir.path(), "think");
    let think = log.sim(&["--fail-rate", "0.1", "--latency-ms", "50"]);
    let s = Scratch::new(&config(
        0,
        &format!("max_attempts = {MAX_ATTEMPTS}\nretry_base_s = 0.05\nretry_max_s = 0.2"),
        &external("think", "think", &think.url),
    ));
    s.submit_prompts("think", "chaos", JOBS);

    let terminal = |s: &Scratch| {
        let c = s.counts();
        c.get("done").copied().unwrap_or(0) + c.get("failed").copied().unwrap_or(0)
    };
    // A kill counts only when it lands mid-work (it finds claims in
    // flight); one that misses is made again, at another point.
    let (mut kills, mut missed, mut stranded) = (0, 0, 0);
    let mut served = Served::default();
    let mut round = 0;
    while kills < KILLS {
        round += 1;
        let mut d = DaemonProcess::start(&s, &format!("daemon-{round}"));
        // Kill once this run has finished a random amount of work (the
        // seed picks it), so every run both claims and finishes work before
        // it dies, and the kill lands with requests in flight.
        let before = terminal(&s);
        let step = rng.random_range(20..=(JOBS as u64 / (KILLS as u64 * 2)));
        wait_for("progress before the kill", LIMIT, || {
            terminal(&s) >= (before + step).min(JOBS as u64)
        });
        d.kill9();
        let found = served.kill_found(s.claimed());
        if found > 0 {
            kills += 1;
            stranded += found;
        } else {
            missed += 1;
            assert!(
                missed <= KILLS,
                "{missed} kills found no job claimed: the kills do not land mid-work"
            );
        }
        if terminal(&s) == JOBS as u64 {
            break;
        }
    }
    let last = DaemonProcess::start(&s, "last");
    wait_for("every job is terminal", LIMIT, || {
        terminal(&s) == JOBS as u64
    });

    let jobs = s.jobs();
    assert_eq!(jobs.len(), JOBS, "jobs were lost or made twice");
    let (mut done, mut failed) = (0, 0);
    let mut results = HashSet::new();
    let mut prompts = HashSet::new();
    for j in &jobs {
        let payload: serde_json::Value =
            serde_json::from_str(j["payload_inline"].as_str().unwrap()).unwrap();
        let prompt = payload["prompt"].as_str().unwrap().to_string();
        assert!(prompts.insert(prompt.clone()), "two jobs for `{prompt}`");
        match j["status"].as_str().unwrap() {
            "done" => {
                done += 1;
                let path = j["result_path"].as_str().expect("a done job has a result");
                assert!(results.insert(path.to_string()), "two jobs share {path}");
                let doc: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
                assert_eq!(doc["id"], j["id"]);
                assert_eq!(doc["content"], format!("echo: {prompt}"));
            }
            "failed" => {
                failed += 1;
                assert_eq!(j["attempts"], MAX_ATTEMPTS, "{j}");
                let error = j["error"].as_str().unwrap_or("");
                assert!(
                    error.contains("HTTP 500") && error.contains("simulated failure"),
                    "a failed job names its reason: {j}"
                );
            }
            other => panic!("job {} is {other}", j["id"]),
        }
    }
    served.read(&[&log]);
    let (sends, duplicates) = served.assert_exactly_once(&jobs);
    println!(
        "chaos: {kills} kill -9 mid-work over {JOBS} jobs ({missed} more missed and were made \
         again; {stranded} claims stranded by the kills); \
         {done} done, {failed} failed after {MAX_ATTEMPTS} attempts, 0 twice; \
         the server received {sends} requests, {duplicates} of them a repeated attempt"
    );
    assert!(
        kills >= 10,
        "only {kills} kills landed mid-work before the jobs ran out"
    );
    assert_eq!(done + failed, JOBS);
    drop(last);
}

/// The daemon's own claim statement, run by another process: the
/// `sqlite3` CLI, with its parameters written in.
fn cli_claim(db: &std::path::Path, n: usize) -> Vec<String> {
    let sql: String = ["claim.sql", "claim_update.sql"]
        .map(|file| {
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/store/sqlite/sql");
            std::fs::read_to_string(dir.join(file)).unwrap()
        })
        .concat();
    let t = unix_now();
    let statement = sql
        .replace(":claim_id", "'cli-claim'")
        .replace(":owner", "'another-process'")
        .replace(":lease_until", &format!("{}", t + 3600.0))
        .replace(":now", &format!("{t}"))
        .replace(":model", "'think'")
        .replace(":n", &n.to_string())
        .replace("RETURNING rowid AS seq, *;", "RETURNING hex(id);");
    let mut sqlite3 = std::process::Command::new("sqlite3");
    sqlite3
        .args(["-cmd", ".timeout 10000"])
        .arg(db)
        // Without its comment lines: a leading `--` reads as an option.
        .arg(
            statement
                .lines()
                .filter(|l| !l.trim_start().starts_with("--"))
                .collect::<Vec<_>>()
                .join("\n"),
        );
    let out = common::succeed(&mut sqlite3, "the sqlite3 CLI");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| l.trim().to_lowercase())
        .filter(|l| !l.is_empty())
        .collect()
}

#[test]
fn a_daemon_and_another_process_claiming_at_once_never_share_a_job() {
    const JOBS: usize = 1500;
    let think = SimProcess::start(&["--latency-ms", "5"]);
    let s = Scratch::with_queue(
        "lease_s = 3600",
        &config(0, "", &external("think", "think", &think.url)),
    );
    s.submit_prompts("think", "shared", JOBS);
    let d = DaemonProcess::start(&s, "daemon");
    wait_for("the daemon claims", LIMIT, || s.count("done") > 0);
    // Claim alongside the daemon until nothing is left pending.
    let mut theirs = HashSet::new();
    loop {
        let got = cli_claim(&s.db(), 7);
        if got.is_empty() && s.count("pending") == 0 {
            break;
        }
        for id in got {
            assert!(
                theirs.insert(id.clone()),
                "{id} was claimed twice by the CLI"
            );
        }
    }
    wait_for("the daemon's jobs are done", LIMIT, || {
        s.count("processing") == theirs.len() as u64
    });
    let jobs = s.jobs();
    assert_eq!(jobs.len(), JOBS);
    let sent: HashSet<String> = answered_by_the_daemon(&jobs, &theirs);
    for j in &jobs {
        let id = j["id"].as_str().unwrap();
        if theirs.contains(id) {
            assert_eq!(j["status"], "processing", "{j}");
            assert_eq!(
                j["claimed_by"], "another-process",
                "taken from under its claim: {j}"
            );
        } else {
            assert_eq!(j["status"], "done", "{j}\n{}", d.log());
        }
    }
    assert!(
        !theirs.is_empty() && theirs.len() < JOBS,
        "both claimed some: the CLI took {} of {JOBS}",
        theirs.len()
    );
    println!(
        "two processes: the daemon took {}, the sqlite3 CLI {}, none both",
        JOBS - theirs.len(),
        theirs.len()
    );
    assert!(
        sent.is_empty(),
        "the daemon sent jobs the CLI held: {sent:?}"
    );
}

/// The prompts of the CLI's jobs that the daemon wrote a result for.
fn answered_by_the_daemon(jobs: &[serde_json::Value], theirs: &HashSet<String>) -> HashSet<String> {
    jobs.iter()
        .filter(|j| theirs.contains(j["id"].as_str().unwrap()) && !j["result_path"].is_null())
        .map(|j| j["payload_inline"].as_str().unwrap().to_string())
        .collect()
}
