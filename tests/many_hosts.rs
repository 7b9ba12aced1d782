//! Several daemons on one PostgreSQL queue, as several GPU hosts run them:
//! each with its own state folder and its own simulated servers, all real
//! processes on a real PostgreSQL server. Jobs are done once, parents
//! finished once, follow-ups created once, whatever dies on the way; rows
//! inserted with plain SQL wake an idle daemon; a PostgreSQL restart loses
//! nothing; and the command line, the MCP server and the admin endpoint
//! work against the shared queue.

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use common::http::get;
use common::pg::PgServer;
use common::served::{RequestLog, Served};
use common::{
    bin, external, free_port, mcp_client, strings, wait_for, DaemonProcess, Scratch, SimProcess,
};

const LIMIT: Duration = Duration::from_secs(240);

/// One host: its configuration and state folder, its two simulated
/// servers, its admin port, and its daemon while it runs.
struct Host {
    name: String,
    scratch: Scratch,
    admin: u16,
    daemon: Option<DaemonProcess>,
    _sims: Vec<SimProcess>,
    /// What each of its servers received.
    requests: Vec<RequestLog>,
    _logs: tempfile::TempDir,
}

fn host(url: &str, name: &str, latency_ms: u64) -> Host {
    let lat = latency_ms.to_string();
    let logs = tempfile::tempdir().unwrap();
    let requests = vec![
        RequestLog::new(logs.path(), "vision"),
        RequestLog::new(logs.path(), "think"),
    ];
    let vision = requests[0].sim(&["--latency-ms", &lat]);
    let think = requests[1].sim(&["--latency-ms", &lat]);
    let admin = free_port();
    let queue = format!(
        "database_url = \"{url}\"\ndaemon_id = \"{name}\"\nheartbeat_s = 1\nheartbeat_timeout_s = 4\nlease_s = 600\n"
    );
    let extra = format!(
        "[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n[health]\ninterval_s = 1\n\n[dispatch]\nexternal_poll_ms = 100\nwindow = 16\n\n{}{}",
        external("vision", "vision", &vision.url),
        external("think", "think", &think.url)
    );
    let scratch = Scratch::with_queue(&queue, &extra);
    // One token per word, for chunking (the think instance is the last table).
    let tk = common::word_tokenizer(scratch.path(), 100);
    let config = std::fs::read_to_string(scratch.config()).unwrap();
    std::fs::write(
        scratch.config(),
        format!("{config}tokenizer = \"{}\"\n", tk.display()),
    )
    .unwrap();
    Host {
        name: name.to_string(),
        scratch,
        admin,
        daemon: None,
        _sims: vec![vision, think],
        requests,
        _logs: logs,
    }
}

/// The jobs claimed by `host` now, as the servers' request ids name them.
fn claimed_by(pg: &PgServer, url: &str, host: &str) -> Vec<String> {
    pg.psql(
        url,
        &format!(
            "SELECT encode(id, 'hex') FROM gpu_jobs WHERE status = 'processing' AND claimed_by LIKE '{host}/%'"
        ),
    )
    .lines()
    .map(str::to_string)
    .collect()
}

/// Exactly once, as `hosts`' servers saw it (see [`Served`]): every job,
/// with the answer its result document holds.
fn served_once(pg: &PgServer, url: &str, hosts: &[&Host], served: &mut Served) -> (usize, u32) {
    let logs: Vec<&RequestLog> = hosts.iter().flat_map(|h| &h.requests).collect();
    served.read(&logs);
    let answers: Vec<(String, Option<String>)> = pg
        .psql(
            url,
            "SELECT encode(j.id, 'hex'), \
                    convert_from(r.doc, 'UTF8')::jsonb -> 'response' ->> 'id' \
               FROM gpu_jobs j LEFT JOIN gpu_results r ON r.id = j.id",
        )
        .lines()
        .map(|l| {
            let (id, answer) = l.split_once('|').expect("id|answer");
            (
                id.to_string(),
                Some(answer).filter(|a| !a.is_empty()).map(str::to_string),
            )
        })
        .collect();
    served.assert_answers(&answers)
}

impl Host {
    fn start(&mut self, run: usize) {
        let d = DaemonProcess::start(&self.scratch, &format!("{}-{run}", self.name));
        self.daemon = Some(d);
        wait_for(&format!("{} is ready", self.name), LIMIT, || {
            self.scratch.instance_is("think", "ready")
                && self.scratch.instance_is("vision", "ready")
        });
    }

    fn kill9(&mut self) {
        self.daemon.as_mut().expect("running").kill9();
    }

    fn log(&self) -> String {
        self.daemon.as_ref().map(|d| d.log()).unwrap_or_default()
    }
}

fn counts(pg: &PgServer, url: &str) -> HashMap<String, i64> {
    pg.psql(url, "SELECT status, count(*) FROM gpu_jobs GROUP BY status")
        .lines()
        .filter_map(|l| l.split_once('|'))
        .map(|(s, n)| (s.to_string(), n.trim().parse().unwrap()))
        .collect()
}

/// A new PostgreSQL server, a fresh database on it, and one host of that
/// name on the database with its daemon started.
fn started_alone(name: &str, latency_ms: u64) -> (PgServer, String, Host) {
    let pg = PgServer::start();
    let url = pg.fresh_db();
    let mut h = host(&url, name, latency_ms);
    h.start(0);
    (pg, url, h)
}

fn one(pg: &PgServer, url: &str, sql: &str) -> i64 {
    pg.psql(url, sql)
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// Three daemons share 6,000 jobs of both models, with fragmented parents
/// and follow-ups. One is killed with `kill -9` and started again; another
/// is killed for good, and its claims are taken over within the heartbeat
/// timeout. Every job is done once, every parent finished once, every
/// follow-up created once, and every host reads every result.
#[test]
fn three_daemons_share_one_queue_through_crashes() {
    let pg = PgServer::start();
    let url = pg.fresh_db();
    let mut hosts: Vec<Host> = ["host-a", "host-b", "host-c"]
        .iter()
        .map(|n| host(&url, n, 40))
        .collect();
    // The queue is made by `migrate`, before any daemon runs.
    let m = hosts[0].scratch.json(&["migrate", "--json"]);
    assert_eq!(
        m["version"],
        common::shipped_migrations("postgres") as u64,
        "{m}"
    );

    // 6,000 jobs: vision and think prompts (a tenth of the think prompts
    // with a vision follow-up), and twenty parents of four fragments each.
    let s = &hosts[0].scratch;
    let mut think = String::new();
    for i in 0..3000 {
        think.push_str(&format!("{{\"prompt\": \"think {i}\"}}\n"));
    }
    let mut vision = String::new();
    for i in 0..2900 {
        vision.push_str(&format!("{{\"prompt\": \"vision {i}\"}}\n"));
    }
    std::fs::write(s.path().join("think.jsonl"), think).unwrap();
    std::fs::write(s.path().join("vision.jsonl"), vision).unwrap();
    let r = s.run(&["submit", "--model", "vision", "--jsonl", "vision.jsonl"]);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    let r = s.run(&["submit", "--model", "think", "--jsonl", "think.jsonl"]);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    pg.psql(
        &url,
        "UPDATE gpu_jobs SET then_model = 'vision' WHERE model_type = 'think' AND payload_inline LIKE '%think %0\"%'",
    );
    let mut parents = Vec::new();
    for p in 0..20 {
        let text = s.path().join(format!("doc-{p}.txt"));
        std::fs::write(&text, common::words(p * 10_000, p * 10_000 + 1500)).unwrap();
        let out = s.submit_file("think", "--text-file", &text, &["--chunk"]);
        assert!(out["fragments"].as_u64().unwrap() >= 2, "{out}");
        parents.push(out["id"].as_str().unwrap().to_string());
    }
    let fragments = one(
        &pg,
        &url,
        "SELECT count(*) FROM gpu_jobs WHERE parent_id IS NOT NULL",
    );
    let submitted = one(&pg, &url, "SELECT count(*) FROM gpu_jobs");
    assert_eq!(submitted, 5900 + 20 + fragments);
    let follow_ups = one(
        &pg,
        &url,
        "SELECT count(*) FROM gpu_jobs WHERE then_model IS NOT NULL",
    );
    assert_eq!(follow_ups, 300);
    let total = submitted + follow_ups;
    assert!(total >= 6000, "{total} jobs");
    for h in hosts.iter_mut() {
        h.start(0);
    }

    let mut served = Served::default();
    // A crash and a restart of host-a once work is under way, holding
    // claims (read after the kill: a kill between claims proves nothing,
    // and is tried again once another tenth is done).
    for run in 1.. {
        let done = counts(&pg, &url).get("done").copied().unwrap_or(0);
        assert!(
            done < total,
            "{run} kills of host-a found it holding no claim"
        );
        wait_for("another tenth is done", LIMIT, || {
            counts(&pg, &url).get("done").copied().unwrap_or(0) >= (done + total / 10).min(total)
        });
        hosts[0].kill9();
        let held = served.kill_found(claimed_by(&pg, &url, "host-a"));
        hosts[0].start(run);
        println!("kill {run} of host-a: it held {held} claims");
        if held > 0 {
            break;
        }
    }
    // Its own earlier claims come back at once, as it starts again.
    let log = hosts[0].log();
    assert!(
        log.contains("claimed by a previous run of this daemon"),
        "{log}"
    );

    // host-c dies for good, holding claims; the others take them back
    // within its heartbeat timeout (4 s), long before its 600 s leases.
    wait_for("host-c holds claims", LIMIT, || {
        one(
            &pg,
            &url,
            "SELECT count(*) FROM gpu_jobs WHERE status = 'processing' AND claimed_by LIKE 'host-c/%'",
        ) > 0
    });
    hosts[2].kill9();
    let killed = Instant::now();
    served.kill_found(claimed_by(&pg, &url, "host-c"));
    // Its claims and their leases, and its last heartbeat, by the
    // database's clock (it writes nothing more).
    let (held_c, lease_c) = pg
        .psql(
            &url,
            "SELECT count(*), min(lease_until) FROM gpu_jobs WHERE status = 'processing' AND claimed_by LIKE 'host-c/%'",
        )
        .trim()
        .split_once('|')
        .map(|(n, l)| (n.parse::<i64>().unwrap(), l.parse::<f64>().unwrap()))
        .expect("a count and a lease");
    assert!(held_c > 0, "host-c died holding no claim");
    // Its row goes when the others take over.
    let silent_from: f64 = pg
        .psql(
            &url,
            "SELECT heartbeat_at + timeout_s FROM gpu_daemons WHERE daemon_id = 'host-c'",
        )
        .trim()
        .parse()
        .unwrap();
    wait_for(
        "host-c's claims are taken back",
        Duration::from_secs(30),
        || {
            one(
            &pg,
            &url,
            "SELECT count(*) FROM gpu_jobs WHERE status = 'processing' AND claimed_by LIKE 'host-c/%'",
        ) == 0
        },
    );
    let taken_in = killed.elapsed();
    println!(
        "figure: host-c's {held_c} claims taken back {:.1} s after kill -9 (heartbeat timeout 4 s, every 1 s)",
        taken_in.as_secs_f64()
    );
    // In order, by the database's clock: host-c's last heartbeat, its
    // timeout, the others taking its claims, and only then (600 s on) the
    // end of the leases they would otherwise have waited for.
    let taken_at: f64 = pg
        .psql(&url, "SELECT extract(epoch FROM clock_timestamp())")
        .trim()
        .parse()
        .unwrap();
    assert!(
        taken_at < lease_c,
        "host-c's claims were taken back only when their leases ended"
    );
    assert!(
        silent_from <= taken_at,
        "host-c's claims were taken back before it was silent for its timeout"
    );
    let taken_log = format!("{}{}", hosts[0].log(), hosts[1].log());
    assert!(
        taken_log.contains("daemon host-c has been silent"),
        "{taken_log}"
    );

    let mut polls = 0u64;
    wait_for("every job is done", LIMIT, || {
        let c = counts(&pg, &url);
        polls += 1;
        // What is left, now and then: shown if the wait runs out.
        if polls.is_multiple_of(100) {
            eprintln!(
                "{c:?} of {total}; not done yet (status, model, parent, is a parent, count, a holder):\n{}",
                pg.psql(
                    &url,
                    "SELECT status, model_type, parent_id IS NOT NULL, total_fragments IS NOT NULL, \
                            count(*), min(claimed_by) \
                       FROM gpu_jobs WHERE status <> 'done' GROUP BY 1, 2, 3, 4",
                )
            );
        }
        c.get("done").copied().unwrap_or(0) == total && c.len() == 1
    });
    // Once each: one attempt per job and parent (a release after a crash
    // counts none), one follow-up per job that names one.
    assert_eq!(
        one(
            &pg,
            &url,
            "SELECT count(*) FROM gpu_jobs WHERE attempts <> 1"
        ),
        0
    );
    assert_eq!(
        one(
            &pg,
            &url,
            "SELECT count(*) FROM gpu_jobs j WHERE then_model IS NOT NULL \
             AND (SELECT count(*) FROM gpu_jobs f WHERE f.follows = j.id) <> 1"
        ),
        0
    );
    // Every result is in the database, and any host reads any result.
    assert_eq!(
        one(&pg, &url, "SELECT count(*) FROM gpu_jobs j LEFT JOIN gpu_results r ON r.id = j.id WHERE r.id IS NULL OR j.result_path NOT LIKE 'db:%'"),
        0
    );
    let by_c = pg.psql(
        &url,
        "SELECT encode(id, 'hex') FROM gpu_jobs WHERE parent_id IS NULL AND total_fragments IS NOT NULL LIMIT 1",
    );
    let doc = hosts[1].scratch.json(&["result", by_c.trim()]);
    assert!(doc["fragments"].as_array().unwrap().len() >= 2, "{doc}");
    // At the servers: each job sent again only where a kill found it
    // claimed, and each result the answer to a request for its job.
    let (sends, duplicates) =
        served_once(&pg, &url, &hosts.iter().collect::<Vec<_>>(), &mut served);
    println!("the servers received {sends} requests, {duplicates} of them a repeated attempt");
    let per_host = pg.psql(
        &url,
        "SELECT split_part(claimed_by, '/', 1), count(*) FROM gpu_jobs WHERE claimed_by IS NOT NULL GROUP BY 1 ORDER BY 1",
    );
    println!("jobs per host (last claim):\n{per_host}");
    // host-c signed nothing off; a and b are registered and alive.
    let st: serde_json::Value = serde_json::from_str(&get(hosts[1].admin, "/v1/status").1).unwrap();
    let ids: Vec<&str> = strings(&st["daemons"], "daemon_id");
    assert_eq!(ids, ["host-a", "host-b"], "{st}");
}

/// A row inserted with plain SQL, by a program that knows nothing of
/// gpu-feeder, wakes an idle daemon: the trigger notifies and the daemon
/// listens, rather than polling the table. While its listening connection
/// is up (its log never says it polls instead) nothing else moves its
/// change token, so each row done was woken by its notification; how long
/// that took, by the database's own clock (`created_at` to `started_at`),
/// is printed as a figure.
#[test]
fn jobs_inserted_with_sql_wake_an_idle_daemon_by_notification() {
    let (pg, url, h) = started_alone("idle", 0);
    let payload = h.scratch.stage().join("p.json");
    std::fs::write(&payload, r#"{"prompt": "from another program"}"#).unwrap();
    for i in 0..3 {
        pg.psql(
            &url,
            &format!(
                "INSERT INTO gpu_jobs (payload_sha256, model_type, payload_path) VALUES ('sql-{i}', 'think', '{}')",
                payload.display()
            ),
        );
        wait_for("the row is done", Duration::from_secs(30), || {
            one(&pg, &url, &format!("SELECT count(*) FROM gpu_jobs WHERE payload_sha256 = 'sql-{i}' AND status = 'done'")) == 1
        });
        let waited: f64 = pg
            .psql(
                &url,
                &format!(
                    "SELECT started_at - created_at FROM gpu_jobs WHERE payload_sha256 = 'sql-{i}'"
                ),
            )
            .trim()
            .parse()
            .unwrap();
        println!("figure: row {i} claimed {:.3} s after its insert", waited);
    }
    let log = h.log();
    assert!(
        !log.contains("polled every") && !log.contains("polling every"),
        "the listening connection was down, so a poll may have found the rows: {log}"
    );
}

/// PostgreSQL stops while jobs run and comes back: the daemon says so in
/// its log and in `/readyz`, loses nothing, and finishes every job once.
#[test]
fn a_postgres_restart_mid_run_loses_nothing() {
    let (pg, url, h) = started_alone("restarts", 50);
    // Stop the server once 100 (more) are done; until a stop lands with
    // work left (read as soon as it is back: the daemon only lessens it),
    // queue another batch and stop again.
    let mut total = 0;
    for run in 1.. {
        h.scratch.submit_prompts("think", &format!("pr{run}"), 600);
        h.scratch.submit_prompts("vision", &format!("pr{run}"), 400);
        total += 1000;
        wait_for("100 more are done", LIMIT, || {
            counts(&pg, &url).get("done").copied().unwrap_or(0) >= total - 900
        });
        pg.stop();
        wait_for(
            "/readyz says the queue is unreachable",
            Duration::from_secs(60),
            || {
                let (code, body) = get(h.admin, "/readyz");
                code == 503
                    && body.contains("PostgreSQL queue")
                    && body.contains(&format!("{}", pg.port()))
            },
        );
        pg.start_again();
        let left = one(
            &pg,
            &url,
            "SELECT count(*) FROM gpu_jobs WHERE status <> 'done'",
        );
        println!("stop {run}: {left} jobs were left when PostgreSQL stopped");
        if left > 0 {
            break;
        }
        assert!(run < 3, "{run} stops of PostgreSQL found no work left");
    }
    wait_for("every job is done", LIMIT, || {
        counts(&pg, &url).get("done").copied().unwrap_or(0) == total
    });
    wait_for("/readyz is ready again", Duration::from_secs(60), || {
        get(h.admin, "/readyz").0 == 200
    });
    assert_eq!(
        one(
            &pg,
            &url,
            "SELECT count(*) FROM gpu_jobs WHERE attempts <> 1"
        ),
        0
    );
    let log = h.log();
    assert!(log.contains("cannot reach the queue"), "{log}");
    assert!(log.contains("reconnected to the queue"), "{log}");
    // No daemon died: the servers saw each job sent once, whatever the
    // outage did to its settlement.
    let (sends, duplicates) = served_once(&pg, &url, &[&h], &mut Served::default());
    assert_eq!(duplicates, 0, "a job was sent twice across the outage");
    println!("the server received {sends} requests, none twice");
}

/// The command line, a real MCP client and the admin endpoint, all on a
/// PostgreSQL queue: `--db URL` and `$FEEDER_DATABASE_URL` select it, and
/// results come from the database.
#[test]
fn cli_mcp_and_admin_work_against_postgres() {
    let (_pg, url, h) = started_alone("tools", 0);
    // CLI with --db URL, from a folder with no configuration at all.
    let bare = tempfile::tempdir().unwrap();
    let cli = |args: &[&str], env: Option<&str>| {
        let mut cmd = Command::new(bin());
        cmd.args(args)
            .current_dir(bare.path())
            .env_remove("FEEDER_CONFIG")
            .env_remove("FEEDER_DATABASE_URL");
        if let Some(u) = env {
            cmd.env("FEEDER_DATABASE_URL", u);
        }
        let out = cmd.output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = cli(
        &[
            "--db", &url, "submit", "--model", "think", "--prompt", "hello", "--wait", "--json",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let job: serde_json::Value = serde_json::from_str(&out).unwrap();
    let id = job["id"].as_str().unwrap().to_string();
    assert!(
        job["result_path"].as_str().unwrap().starts_with("db:"),
        "{job}"
    );
    let (code, out, err) = cli(&["result", &id, "--text"], Some(&url));
    assert_eq!(code, 0, "{err}");
    assert!(!out.trim().is_empty());
    let (code, out, _) = cli(&["--db", &url, "stats", "--json"], None);
    assert_eq!(code, 0);
    let stats: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(stats["jobs"]["think"]["done"], 1, "{stats}");
    let (code, out, _) = cli(&["--db", &url, "list", "--json"], None);
    assert_eq!(code, 0);
    assert!(out.contains(&id));
    let (code, out, _) = cli(&["--db", &url, "migrate"], None);
    assert_eq!(code, 0);
    let up_to_date = format!(
        "up to date (schema version {})",
        common::shipped_migrations("postgres") as u64
    );
    assert!(out.contains(&up_to_date), "{out}");
    let (code, _, err) = cli(&["--db", &url, "cancel", &id], None);
    assert_ne!(code, 0);
    assert!(err.contains("done"), "{err}");
    // A server that is not there: the error names it and what to check.
    let nowhere = format!("postgresql://feeder:pw@127.0.0.1:{}/queue", free_port());
    let (code, _, err) = cli(&["--db", &nowhere, "stats"], None);
    assert_ne!(code, 0);
    assert!(
        err.contains("cannot connect to the PostgreSQL queue at feeder@127.0.0.1"),
        "{err}"
    );
    assert!(!err.contains("pw@"), "{err}");

    // The admin endpoint: the job and its result document.
    let v: serde_json::Value =
        serde_json::from_str(&get(h.admin, &format!("/v1/jobs/{id}")).1).unwrap();
    assert_eq!(v["status"], "done");
    assert!(v["result"].is_string(), "{v}");
    let doc: serde_json::Value =
        serde_json::from_str(&get(h.admin, &format!("/v1/jobs/{}/result", &id[..8])).1).unwrap();
    assert_eq!(doc["id"], id.as_str());

    // A real MCP client on the same queue.
    mcp_client(&h.scratch);
}

/// README, "Many hosts": two live daemons with one `daemon_id` are refused
/// at start, the first one's heartbeat being fresh or not: here it is held
/// stopped (SIGSTOP) until its heartbeat is older than its timeout, as a
/// loaded machine can make it, and its process running still refuses the
/// second. The live one goes on.
#[test]
fn a_second_live_daemon_with_the_same_daemon_id_is_refused() {
    let (pg, url, mut first) = started_alone("twin", 0);
    let pid = first.daemon.as_ref().unwrap().child.id().to_string();
    let signal = |sig: &str| {
        let ok = Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} {pid}");
    };
    signal("-STOP");
    wait_for("the first daemon's heartbeat to go stale", LIMIT, || {
        pg.psql(
            &url,
            "SELECT count(*) FROM gpu_daemons \
              WHERE daemon_id = 'twin' AND gpu_feeder_now(NULL) - heartbeat_at > timeout_s",
        )
        .trim()
            == "1"
    });
    let twin = host(&url, "twin", 0);
    let mut second = DaemonProcess::start(&twin.scratch, "twin-second");
    let code = second.wait_exit(LIMIT);
    signal("-CONT");
    let log = second.log();
    assert!(code.is_some_and(|c| c != 0), "exit {code:?}: {log}");
    assert!(
        log.contains("another daemon is registered as twin") && log.contains("alive"),
        "{log}"
    );
    let live = first.daemon.as_mut().unwrap();
    assert!(
        live.child.try_wait().unwrap().is_none(),
        "the live daemon goes on: {}",
        first.log()
    );
}

/// A `daemon_id` registered from another host cannot be checked by its
/// pid: there its heartbeat decides. Fresh, a daemon starting with that id
/// is refused; stale (the other host died), it starts and takes the id
/// over.
#[test]
fn a_daemon_id_alive_on_another_host_is_refused_until_its_heartbeat_is_stale() {
    let pg = PgServer::start();
    let url = pg.fresh_db();
    let mut h = host(&url, "far", 0);
    let m = h.scratch.json(&["migrate", "--json"]);
    assert!(m["version"].as_u64().is_some(), "{m}");
    pg.psql(
        &url,
        "INSERT INTO gpu_daemons (daemon_id, about, started_at, heartbeat_at, timeout_s) \
         VALUES ('far', '{\"host\": \"another-host.example\", \"pid\": 1}', \
                 gpu_feeder_now(NULL), gpu_feeder_now(NULL), 3600)",
    );
    let mut refused = DaemonProcess::start(&h.scratch, "far-refused");
    let code = refused.wait_exit(LIMIT);
    let log = refused.log();
    assert!(code.is_some_and(|c| c != 0), "exit {code:?}: {log}");
    assert!(
        log.contains("another daemon is registered as far")
            && log.contains("host another-host.example"),
        "{log}"
    );

    // The other host went silent two hours ago: the id is free.
    pg.psql(
        &url,
        "UPDATE gpu_daemons SET heartbeat_at = gpu_feeder_now(NULL) - 7200 WHERE daemon_id = 'far'",
    );
    h.start(1);
    wait_for("the new daemon's own registration", LIMIT, || {
        pg.psql(
            &url,
            "SELECT about ->> 'host' FROM gpu_daemons WHERE daemon_id = 'far'",
        )
        .trim()
            == common_hostname()
    });
}

/// This host's name, as a daemon registers it.
fn common_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_string()
}

/// Right after PostgreSQL comes back, every daemon's heartbeat is late only
/// because the server was away: for one heartbeat timeout a daemon takes
/// nobody's claims over. Two daemons hold claims through an outage longer
/// than their timeout (4 s); once the server is back neither takes the
/// other's claims, and every job is done with one attempt.
#[test]
fn after_an_outage_longer_than_the_heartbeat_timeout_no_live_daemon_loses_its_claims() {
    let pg = PgServer::start();
    let url = pg.fresh_db();
    let mut hosts: Vec<Host> = ["east", "west"]
        .iter()
        .map(|n| host(&url, n, 500))
        .collect();
    hosts[0].scratch.submit_prompts("think", "outage", 2000);
    for h in hosts.iter_mut() {
        h.start(0);
    }
    let holding = |name: &str| {
        one(
            &pg,
            &url,
            &format!("SELECT count(*) FROM gpu_jobs WHERE status = 'processing' AND claimed_by LIKE '{name}/%'"),
        ) > 0
    };
    wait_for("both daemons hold claims", LIMIT, || {
        holding("east") && holding("west")
    });
    pg.stop();
    let stopped = Instant::now();
    wait_for("both daemons lose the queue", LIMIT, || {
        hosts
            .iter()
            .all(|h| h.log().contains("cannot reach the queue"))
    });
    // The scenario itself, not a wait for a state: the outage must outlast
    // the heartbeat timeout for the rule to matter.
    wait_for(
        "the outage outlasts the 4 s heartbeat timeout",
        LIMIT,
        || stopped.elapsed() > Duration::from_secs(6),
    );
    pg.start_again();
    wait_for("every job is done", LIMIT, || {
        counts(&pg, &url).get("done").copied().unwrap_or(0) == 2000
    });
    for h in &hosts {
        let log = h.log();
        assert!(log.contains("reconnected to the queue"), "{log}");
        assert!(
            !log.contains("has been silent"),
            "{} took a live daemon's claims over after the outage:\n{log}",
            h.name
        );
    }
    assert_eq!(
        one(
            &pg,
            &url,
            "SELECT count(*) FROM gpu_jobs WHERE attempts <> 1"
        ),
        0
    );
}
