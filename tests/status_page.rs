//! The status page, seen through a real browser: headless Chromium
//! (Debian's `chromium`) loads `GET /` of a running daemon fed by
//! simulated servers, and the checks read what a person would see from the
//! rendered DOM: the instances and their states, the counts `stats --json`
//! gives, a failure's reason, an instance that went down, a job stuck past
//! its lease, the queue unreachable (PostgreSQL stopped). A screenshot is
//! saved. With an admin token, a browser driven over the DevTools protocol
//! fills the page's token form: no data without the token, "wrong token"
//! for a wrong one, the data once it is right, and a clear notice when the
//! daemon stops answering. GPU readings and the allocator, which need GPUs,
//! are rendered from the document the views build for a snapshot. And
//! `demo --serve` keeps the page up after its jobs.

mod common;
// Not in `common`: only this test drives a browser.
#[path = "common/browser.rs"]
mod browser;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use browser::{attr, chromium, dom_until, element, escaped, headless, Browser};
use common::{external, free_port, wait_for, DaemonProcess, Scratch, SimProcess};

const LIMIT: Duration = Duration::from_secs(60);

/// The number in the queue table's cell for `model` and `status`.
fn count(dom: &str, model: &str, status: &str) -> Option<u64> {
    let open = format!("data-model=\"{model}\" data-count=\"{status}\">");
    let at = dom.find(&open)? + open.len();
    dom[at..].split('<').next()?.trim().parse().ok()
}

fn admin(port: u16, token: &str) -> String {
    format!(
        "[admin]\nlisten = \"127.0.0.1:{port}\"\ntoken = \"{token}\"\n\n\
         [health]\ninterval_s = 0.3\n\n[dispatch]\nexternal_poll_ms = 50\n\n\
         [gpu]\nenabled = false\n\n"
    )
}

/// Where the screenshot is copied for people to look at.
fn published_screenshot() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("status-page.png")
}

#[test]
fn the_page_shows_instances_counts_a_failure_and_an_instance_down_as_a_person_sees_them() {
    chromium();
    // think on the simulator's engine model, which serves all of vLLM's
    // metrics the window reads; vision on the plain one, which does not.
    let think = SimProcess::start(&["--fail-matching", "POISON", "--kv-cache-tokens", "200000"]);
    let mut vision = SimProcess::start(&[]);
    let port = free_port();
    let s = Scratch::new(
        &(admin(port, "")
            + &external("think", "think", &think.url)
            + &external("vision", "vision", &vision.url)),
    );
    s.submit_prompts("think", "summarise", 24);
    s.submit_prompts("vision", "describe", 6);
    let poison = s.json(&[
        "submit",
        "--model",
        "think",
        "--prompt",
        "POISON: the server refuses this one",
        "--max-attempts",
        "1",
        "--json",
    ])["id"]
        .as_str()
        .unwrap()
        .to_string();
    let d = DaemonProcess::start_ready(&s, "daemon", &["think", "vision"], LIMIT);
    wait_for("every job finished", LIMIT, || {
        s.count("done") + s.count("failed") == 31
    });
    let url = format!("http://127.0.0.1:{port}/");

    // Instances by name, ready; the counts of `stats --json`.
    let stats = s.json(&["stats", "--json"]);
    let dom = dom_until(&url, "the instances and the queue's counts", |dom| {
        ["think", "vision"].iter().all(|name| {
            element(dom, "tr", "data-instance", name).and_then(|r| attr(r, "data-state"))
                == Some("ready")
        }) && stats["jobs"].as_object().unwrap().iter().all(|(model, c)| {
            c.as_object()
                .unwrap()
                .iter()
                .all(|(status, n)| count(dom, model, status) == n.as_u64())
        })
    });
    assert_eq!(count(&dom, "think", "failed"), Some(1), "{stats}");
    assert_eq!(count(&dom, "think", "done"), Some(24), "{stats}");
    assert_eq!(count(&dom, "vision", "done"), Some(6), "{stats}");
    // What is read is what the page drew: its scripts' templates are out.
    assert!(
        !dom.contains("function render"),
        "scripts left in the DOM read"
    );
    let main = shown(&dom);
    assert!(
        main.contains("<h2>Instances</h2>") && main.contains("<h2>Queue</h2>"),
        "{dom}"
    );
    // Each instance's row: its model, its window and mode, its server's
    // signals, its restarts, as `instances --json` gives them.
    for name in ["think", "vision"] {
        let i = s.instance(name).unwrap();
        let row = element(main, "tr", "data-instance", name).unwrap();
        let cells = row.matches("<td").count();
        assert_eq!(cells, 11, "one cell per column: {row}");
        for field in ["model", "model_type", "backend", "window_mode"] {
            let v = i[field].as_str().unwrap_or_else(|| panic!("{field}: {i}"));
            assert!(row.contains(&escaped(v)), "{name}'s {field} {v:?}: {row}");
        }
        let restarts = format!("<td class=\"n\">{}</td>", i["restarts"]);
        assert!(row.contains(&restarts), "{name}'s restarts: {row}");
        // The server's signals as the window read them (none yet: dashes).
        let sig = &i["window_signals"];
        let n = |k: &str| {
            sig[k]
                .as_f64()
                .map_or("–".to_string(), |v| format!("{v:.0}"))
        };
        let running_waiting = format!("<td class=\"n\">{} / {}</td>", n("running"), n("waiting"));
        assert!(
            row.contains(&running_waiting),
            "{name}'s server signals {sig}: {row}"
        );
        if name == "think" {
            assert!(
                sig["kv_cache_usage"].is_number(),
                "the engine's signals: {sig}"
            );
            assert!(
                row.contains(" %</td>"),
                "think's KV use and prefix hits: {row}"
            );
        }
    }
    // Every job finished: nothing pending, nothing left to drain.
    let queue_row = element(main, "tr", "data-queue", "think").unwrap();
    assert!(queue_row.contains(">drained<"), "{queue_row}");
    // No GPU readings here, and the page says so instead of showing none.
    assert!(
        element(main, "p", "class", "notice warn").is_some_and(|p| p.contains("No GPU readings")),
        "{dom}"
    );
    assert!(main.contains("<svg class=\"chart\""), "a throughput chart");
    assert!(
        element(main, "section", "id", "stuck")
            .is_some_and(|p| p.contains("None: every claimed job")),
        "no job is stuck: {dom}"
    );
    // No `[api]`: no batches section at all.
    assert!(!shown(&dom).contains("id=\"batches\""), "{dom}");

    // The failure, with the reason the job records.
    let job = s.json(&["status", &poison, "--json"]);
    assert_eq!(job["status"], "failed", "{job}");
    let reason = job["error"].as_str().expect("a failed job says why");
    let row = element(&dom, "tr", "data-failure", &poison)
        .unwrap_or_else(|| panic!("job {poison} is not among the failures shown:\n{dom}"));
    assert!(
        row.contains(&escaped(reason)),
        "the failure's reason {reason:?} is not shown: {row}"
    );

    // The vision server dies: its instance is shown down, with the error.
    let _ = vision.child.kill();
    let _ = vision.child.wait();
    wait_for("vision is seen down", LIMIT, || {
        s.instance("vision").is_some_and(|i| {
            i["state"] != "ready" && i["state"] != "loading" && i["last_error"].is_string()
        })
    });
    let down = ["unhealthy", "restarting", "failed", "stopped"];
    let dom = dom_until(&url, "vision down with its error", |dom| {
        element(dom, "tr", "data-instance", "vision").is_some_and(|r| {
            attr(r, "data-state").is_some_and(|st| down.contains(&st))
                && !r.contains("<td class=\"err small\" data-last-error=\"\"></td>")
        })
    });
    let row = element(&dom, "tr", "data-instance", "vision").unwrap();
    let now = s.instance("vision").unwrap();
    if let Some(err) = now["last_error"].as_str() {
        let first_words: String = err.chars().take(30).collect();
        assert!(
            row.contains(&escaped(&first_words)),
            "the last error {err:?} is not shown: {row}"
        );
    }
    assert_eq!(
        element(&dom, "tr", "data-instance", "think").and_then(|r| attr(r, "data-state")),
        Some("ready"),
        "the other instance still shows ready"
    );

    // What a person sees, saved.
    let shot = s.path().join("status-page.png");
    headless(
        &url,
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1400,1000",
        ],
    );
    assert!(
        std::fs::metadata(&shot).is_ok_and(|m| m.len() > 10_000),
        "no screenshot at {}",
        shot.display()
    );
    let published = published_screenshot();
    std::fs::create_dir_all(published.parent().unwrap()).unwrap();
    std::fs::copy(&shot, &published).unwrap();
    eprintln!("screenshot: {}", published.display());
    drop(d);
}

/// No data is shown: no instance row, no queue table.
const NO_DATA: &str = "document.querySelector('[data-instance]') === null \
     && document.querySelector('[data-count]') === null";

#[test]
fn with_a_token_the_page_shows_nothing_until_it_is_given_and_says_when_the_daemon_stops() {
    chromium();
    let think = SimProcess::start(&[]);
    let port = free_port();
    let s = Scratch::new(&(admin(port, "s3cret-token") + &external("think", "think", &think.url)));
    s.submit_prompts("think", "q", 5);
    let mut d = DaemonProcess::start(&s, "daemon");
    let url = format!("http://127.0.0.1:{port}/");
    wait_for("the admin endpoint answers", LIMIT, || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });

    // Missing: the shell loads, asks for the token, shows no data.
    let dom = dom_until(&url, "the token prompt", |dom| {
        dom.contains("<section id=\"login\">")
            && dom.contains("<p id=\"login-msg\">token required</p>")
    });
    assert!(
        dom.contains("<main id=\"data\" hidden=\"\"></main>"),
        "data without the token:\n{dom}"
    );

    let mut b = Browser::open(&url);
    b.until(
        "the token prompt",
        &format!(
            "document.getElementById('login-msg').textContent === 'token required' && {NO_DATA}"
        ),
    );

    // Wrong: said so, still no data.
    b.give_token("not-the-token");
    b.until(
        "\"wrong token\"",
        &format!("document.getElementById('login-msg').textContent === 'wrong token' && !document.getElementById('login').hidden && {NO_DATA}"),
    );

    // Right: the data, and the token is in no URL and out of scripts' reach.
    b.give_token("s3cret-token");
    b.until(
        "the think instance once the token is given",
        "document.querySelector('[data-instance=\"think\"]') !== null \
         && document.getElementById('login').hidden",
    );
    let href = b.eval("location.href");
    assert!(!href.as_str().unwrap().contains("s3cret"), "{href}");
    assert_eq!(
        b.eval("document.cookie"),
        json!(""),
        "the cookie is HttpOnly"
    );
    b.until(
        "the five jobs done",
        "document.querySelector('[data-model=\"think\"][data-count=\"done\"]')?.textContent === '5'",
    );
    // The cookie reads, and changes nothing: a write with it alone (what
    // another page on this host could make the browser send) is refused.
    assert_eq!(
        b.eval("fetch('/v1/instances/think/restart', {method: 'POST', credentials: 'same-origin'}).then((r) => r.status)"),
        json!(401),
        "a restart by cookie alone"
    );
    assert_eq!(
        b.eval("fetch('/v1/status', {credentials: 'same-origin'}).then((r) => r.status)"),
        json!(200),
        "a read by cookie"
    );

    // Forgetting the token hides the data again.
    assert_eq!(
        b.eval("document.getElementById('logout').click(); true"),
        json!(true)
    );
    b.until(
        "the token prompt after forgetting the token",
        &format!("document.getElementById('login-msg').textContent === 'token required' && !document.getElementById('login').hidden && {NO_DATA}"),
    );
    b.give_token("s3cret-token");
    b.until(
        "the data again",
        "document.querySelector('[data-instance=\"think\"]') !== null",
    );

    // The daemon stops: the page says so rather than showing old numbers
    // as if they were current.
    d.kill9();
    b.until(
        "that the daemon does not answer",
        "(document.getElementById('down-notice')?.textContent || '').includes('does not answer') \
         && document.getElementById('data').classList.contains('stale')",
    );
    // Back again (a restart): the notice goes and the numbers are live,
    // with the same cookie.
    let _again = DaemonProcess::start(&s, "again");
    b.until(
        "live numbers once the daemon is back",
        "document.getElementById('down-notice') === null \
         && !document.getElementById('data').classList.contains('stale') \
         && document.querySelector('[data-model=\"think\"][data-count=\"done\"]')?.textContent === '5'",
    );
    drop(s);
}

/// `GET path` over HTTP/1.0 on `addr`: the status code and the body.
fn get(addr: &str, path: &str) -> (u16, String) {
    use std::io::Read;
    let mut conn = std::net::TcpStream::connect(addr).expect("the endpoint answers");
    write!(conn, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut text = String::new();
    conn.read_to_string(&mut text).unwrap();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (code, body.to_string())
}

/// A child process killed on drop, unless it exited.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[test]
fn demo_serve_keeps_the_status_page_up_after_its_jobs_until_stopped() {
    let mut guard = Killed(
        Command::new(common::bin())
            .args(["demo", "--jobs", "30", "--serve", "--listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the demo"),
    );
    let demo = &mut guard.0;
    let mut lines = BufReader::new(demo.stdout.take().unwrap()).lines();
    let mut said = String::new();
    let url = loop {
        let line = lines
            .next()
            .unwrap_or_else(|| {
                panic!("the demo ended without printing its page's address:\n{said}")
            })
            .unwrap();
        said += &line;
        said.push('\n');
        if let Some(url) = line.strip_prefix("status page ") {
            break url.trim().to_string();
        }
    };
    assert!(
        said.contains("finished  "),
        "the summary comes first:\n{said}"
    );
    let addr = url
        .strip_prefix("http://")
        .and_then(|u| u.strip_suffix('/'))
        .unwrap_or_else(|| panic!("not an address: {url}"));

    // The jobs are over, the page is still served, with the pipeline live.
    let (code, page) = get(addr, "/");
    assert_eq!(code, 200);
    assert!(page.contains("<title>gpu-feeder</title>"), "{page}");
    let (code, view) = get(addr, "/v1/page");
    assert_eq!(code, 200, "{view}");
    let view: Value = serde_json::from_str(&view).unwrap();
    let names: Vec<&str> = common::strings(&view["instances"], "name");
    assert_eq!(names, ["vision", "think"], "{view}");
    let done: u64 = view["queue"]["jobs"]
        .as_object()
        .unwrap()
        .values()
        .map(|c| c["done"].as_u64().unwrap())
        .sum();
    assert_eq!(
        done, 37,
        "30 jobs, and a parent with its 6 fragments: {view}"
    );

    // Ctrl-C (here SIGINT) stops it cleanly.
    common::succeed(
        Command::new("kill").args(["-INT", &demo.id().to_string()]),
        "kill -INT",
    );
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let status = demo.wait().unwrap();
    assert!(status.success(), "{status}: {}", rest.join("\n"));
    assert!(rest.iter().any(|l| l == "stopped"), "{rest:?}");
}

#[test]
fn when_the_queue_cannot_be_read_the_page_says_why_and_still_shows_the_instances() {
    chromium();
    let pg = common::pg::PgServer::start();
    let db = pg.fresh_db();
    let think = SimProcess::start(&[]);
    let port = free_port();
    let s = Scratch::with_queue(
        &format!("database_url = \"{db}\"\n"),
        &(admin(port, "") + &external("think", "think", &think.url)),
    );
    s.submit_prompts("think", "q", 3);
    let _d = DaemonProcess::start_ready(&s, "daemon", &["think"], LIMIT);
    let url = format!("http://127.0.0.1:{port}/");
    dom_until(&url, "the three jobs done", |dom| {
        count(dom, "think", "done") == Some(3)
    });

    pg.stop();
    let dom = dom_until(&url, "that the queue cannot be read", |dom| {
        element(dom, "p", "class", "notice")
            .is_some_and(|p| p.contains("id=\"queue-error\"") && p.contains("cannot be read"))
    });
    let notice = element(&dom, "p", "class", "notice").unwrap();
    assert!(
        notice.contains(&pg.port().to_string()),
        "the notice names the server: {notice}"
    );
    assert_eq!(count(&dom, "think", "done"), None, "no stale counts: {dom}");
    // What cannot be known is not said to be fine.
    for section in ["failures", "stuck"] {
        let shown = element(&dom, "section", "id", section).unwrap_or_default();
        assert!(
            shown.contains("data-unknown") && !shown.contains("None:") && !shown.contains("No job"),
            "{section} while the queue cannot be read: {shown}"
        );
    }
    assert!(
        element(&dom, "tr", "data-instance", "think").is_some(),
        "the instances still show: {dom}"
    );
}

/// Serves the page and a fixed `/v1/page` document on a free port, for as
/// long as the test runs; its address.
fn serve_fixed(view: Value) -> String {
    use std::io::Read;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let page = include_str!("../src/admin/page.html");
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut buf = [0u8; 4096];
            let n = conn.read(&mut buf).unwrap_or(0);
            let head = String::from_utf8_lossy(&buf[..n]);
            let (kind, body) = if head.starts_with("GET /v1/page") {
                ("application/json", view.to_string())
            } else {
                ("text/html; charset=utf-8", page.to_string())
            };
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    format!("http://{addr}/")
}

/// No GPU and no allocator run here, so their sections are rendered from
/// the document the views build for a snapshot of two GPUs (one hot) and an
/// allocator that switched: the page shows what a person needs of them.
#[test]
fn gpu_readings_and_the_allocator_show_from_the_views_own_document() {
    use feeder_actors::allocator::{
        AllocatorStatus, GroupStatus, Strategy, SwitchCost, SwitchRecord,
    };
    use feeder_actors::gpu::{GpuReading, GpuSnapshot};
    use feeder_actors::supervisor::FeederStatus;
    use feeder_actors::{ModelType, QueueStats};
    use std::time::SystemTime;

    chromium();
    let reading = |index: u32, temperature_c: u32| GpuReading {
        index,
        name: "NVIDIA H100 80GB HBM3".into(),
        uuid: format!("GPU-{index}"),
        temperature_c,
        utilization_pct: 87,
        memory_used_bytes: 61 << 30,
        memory_total_bytes: 80 << 30,
        power_w: Some(412.0),
        sm_clock_mhz: None,
        memory_clock_mhz: None,
        throttle_reasons: vec![],
        processes: vec![],
    };
    let since = SystemTime::now() - Duration::from_secs(125);
    let group = GroupStatus {
        name: "gpus 0,1".into(),
        gpu_ids: vec![0, 1],
        instances: vec!["vision".into(), "think".into()],
        strategy: Strategy::Think,
        since,
        why: "think backlog 1200 against vision 3".into(),
        pinned: None,
        switching: false,
        switches: 4,
        // Text from elsewhere (an instance's error) is shown as text.
        problems: vec!["vision: <img src=x onerror=alert(1)> did not sleep".into()],
        recent: vec![
            SwitchRecord {
                from: Strategy::Static,
                to: Strategy::Vision,
                at: since - Duration::from_secs(600),
                took: Some(Duration::from_millis(30_800)),
                problems: 0,
            },
            SwitchRecord {
                from: Strategy::Vision,
                to: Strategy::Think,
                at: since,
                took: Some(Duration::from_millis(2_200)),
                problems: 1,
            },
        ],
    };
    let status = FeederStatus {
        gpus: Some(GpuSnapshot {
            at: SystemTime::now(),
            gpus: vec![reading(0, 64), reading(1, 86)],
            unavailable: None,
            hot: vec![1],
            alerts: 1,
        }),
        allocator: Some(AllocatorStatus {
            strategy: Strategy::Think,
            since,
            why: group.why.clone(),
            pinned: None,
            switching: false,
            switches: 4,
            problems: vec![],
            costs: vec![SwitchCost {
                model: ModelType::Think,
                load: Some(Duration::from_millis(41_500)),
                wake: Some(Duration::from_millis(2_300)),
            }],
            groups: vec![group],
        }),
        ..Default::default()
    };
    let config = gpu_feeder::config::Config::default();
    let mut view = gpu_feeder::views::status_json(&config, &status, Some(&QueueStats::default()));
    view["now"] = json!(common::unix_now());
    view["batches"] = Value::Null;
    let url = serve_fixed(view);

    let dom = dom_until(&url, "the GPUs and the allocator", |dom| {
        dom.contains("data-gpu=\"1\"") && dom.contains("data-group=")
    });
    let cool = element(&dom, "tr", "data-gpu", "0").unwrap();
    let hot = element(&dom, "tr", "data-gpu", "1").unwrap();
    for (row, temp) in [(cool, "64 °C"), (hot, "86 °C")] {
        assert!(row.contains(temp), "{row}");
        assert!(row.contains("61.0 / 80.0 GiB"), "memory: {row}");
        assert!(row.contains("87 %") && row.contains("412 W"), "{row}");
    }
    assert!(
        hot.contains("hot") && !cool.contains("hot"),
        "{cool}\n{hot}"
    );
    assert!(dom.contains("1 alert(s)"), "the alert count");
    let group = element(&dom, "tr", "data-group", "gpus 0,1").unwrap();
    assert!(
        group.contains("<b>think</b>")
            && group.contains("think backlog 1200 against vision 3")
            && group.contains(">4<"),
        "{group}"
    );
    assert!(
        dom.contains("think: load 41.5 s, wake 2.3 s"),
        "the switch costs: {dom}"
    );
    // The group's last switches, newest first, each with what it cost.
    let switches: Vec<&str> = group.split("<div data-switch").skip(1).collect();
    assert_eq!(switches.len(), 2, "{group}");
    assert!(
        switches[0].contains("vision → <b>think</b>")
            && switches[0].contains("took 2.2 s")
            && switches[0].contains("1 problem(s)"),
        "{}",
        switches[0]
    );
    assert!(
        switches[1].contains("static → <b>vision</b>") && switches[1].contains("took 30.8 s"),
        "{}",
        switches[1]
    );
    assert!(
        group.contains("&lt;img src=x onerror=alert(1)&gt;") && !group.contains("<img"),
        "a problem's text is escaped: {group}"
    );
    let dir = tempfile::tempdir().unwrap();
    let shot = dir.path().join("status-page-gpus.png");
    headless(
        &url,
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1400,700",
        ],
    );
    let published = published_screenshot().with_file_name("status-page-gpus.png");
    std::fs::create_dir_all(published.parent().unwrap()).unwrap();
    std::fs::copy(&shot, &published).unwrap();
    eprintln!("screenshot: {}", published.display());
}

#[test]
fn a_job_whose_lease_ran_out_is_shown_stuck_until_it_is_reclaimed() {
    chromium();
    let think = SimProcess::start(&[]);
    let port = free_port();
    // No reclaim sweep during the test, so that the job stays stuck.
    let s = Scratch::with_queue(
        "reclaim_interval_s = 3600\n",
        &(admin(port, "") + &external("think", "think", &think.url)),
    );
    s.submit_prompts("think", "q", 2);
    let _d = DaemonProcess::start_ready(&s, "daemon", &["think"], LIMIT);
    wait_for("both jobs done", LIMIT, || s.count("done") == 2);
    // Another daemon claimed this one, then went silent 90 s ago.
    let id = s.jobs()[0]["id"].as_str().unwrap().to_string();
    let changed = common::sqlite3(
        &s.db(),
        &format!(
            "UPDATE gpu_jobs SET status = 'processing', claimed_by = 'elsewhere/daemon', \
             claim_id = 'gone', lease_until = strftime('%s', 'now') - 90, \
             result_path = NULL, finished_at = NULL WHERE id = X'{id}'; SELECT changes();"
        ),
    );
    assert_eq!(changed.trim(), "1", "job {id} was not changed");
    let url = format!("http://127.0.0.1:{port}/");
    let dom = dom_until(&url, "the stuck job", |dom| {
        element(dom, "tr", "data-stuck", &id).is_some()
    });
    let row = element(&dom, "tr", "data-stuck", &id).unwrap();
    assert!(
        row.contains("elsewhere/daemon") && row.contains("1 min"),
        "who holds it, and for how long past its lease: {row}"
    );
    assert_eq!(count(&dom, "think", "processing"), Some(1));
}

/// What the page renders (its `<main>`), without the script's own text.
fn shown(dom: &str) -> &str {
    element(dom, "main", "id", "data").unwrap_or("")
}

/// `curl` with `args`: its output, which must be JSON.
fn curl(args: &[&str]) -> Value {
    let out = Command::new("curl")
        .args(["-sS", "--fail-with-body"])
        .args(args)
        .output()
        .expect("curl runs");
    assert!(
        out.status.success(),
        "curl {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("the API answers JSON")
}

/// The number the batch row `row` shows for `which` (`completed`, `failed`, `total`).
fn batch_count(row: &str, which: &str) -> Option<u64> {
    let open = format!("data-batch-count=\"{which}\">");
    let at = row.find(&open)? + open.len();
    row[at..].split('<').next()?.trim().parse().ok()
}

/// The width (in per cent) of the batch row's `which` bar.
fn bar_width(row: &str, which: &str) -> Option<f64> {
    let open = format!("data-bar=\"{which}\" style=\"width:");
    let at = row.find(&open)? + open.len();
    row[at..].split('%').next()?.trim().parse().ok()
}

#[test]
fn a_batch_created_through_the_api_shows_its_progress_and_final_counts() {
    chromium();
    // One request at a time, 100 ms each: the batch takes a few seconds,
    // long enough to be seen part-way.
    let sim = SimProcess::start(&[
        "--fail-matching",
        "POISON",
        "--max-num-seqs",
        "1",
        "--latency-ms",
        "100",
    ]);
    let (port, api_port) = (free_port(), free_port());
    let s = Scratch::new(
        &(admin(port, "")
            + &format!("[api]\nlisten = \"127.0.0.1:{api_port}\"\n\n")
            + &external("think", "think", &sim.url)),
    );
    let d = DaemonProcess::start_ready(&s, "daemon", &["think"], LIMIT);
    let url = format!("http://127.0.0.1:{port}/");
    let api = format!("http://127.0.0.1:{api_port}/v1");

    // The API is on and no batch exists yet: the section says so.
    dom_until(&url, "\"no batches\"", |dom| {
        shown(dom).contains("id=\"no-batches\">no batches</p>")
    });

    // 30 requests, 3 of which the server refuses.
    let lines: String = (0..30)
        .map(|i| {
            let text = if i % 10 == 9 { "POISON" } else { "hello" };
            format!(
                "{}\n",
                json!({"custom_id": format!("r{i}"), "method": "POST", "url": "/v1/chat/completions",
                       "body": {"model": "think", "messages": [{"role": "user", "content": format!("{text} {i}")}],
                                "max_tokens": 8}})
            )
        })
        .collect();
    let input = s.path().join("requests.jsonl");
    std::fs::write(&input, lines).unwrap();
    let file = curl(&[
        "-F",
        "purpose=batch",
        "-F",
        &format!("file=@{}", input.display()),
        &format!("{api}/files"),
    ]);
    let file_id = file["id"].as_str().expect("a file id").to_string();
    let batch = curl(&[
        "-H",
        "Content-Type: application/json",
        "-d",
        &json!({"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                "completion_window": "24h", "metadata": {"description": "nightly eval"}})
        .to_string(),
        &format!("{api}/batches"),
    ]);
    let id = batch["id"].as_str().expect("a batch id").to_string();

    // Part-way: some requests done, not all, and the bar as wide as its share.
    let dom = dom_until(&url, "the batch part-way", |dom| {
        element(dom, "tr", "data-batch", &id).is_some_and(|r| {
            let done = batch_count(r, "completed").unwrap_or(0);
            done > 0 && done + batch_count(r, "failed").unwrap_or(0) < 30
        })
    });
    let row = element(&dom, "tr", "data-batch", &id).unwrap();
    assert!(row.contains("nightly eval"), "{row}");
    assert_eq!(batch_count(row, "total"), Some(30), "{row}");
    let done = batch_count(row, "completed").unwrap();
    let width = bar_width(row, "completed").expect("a progress bar");
    assert!(
        (width - 100.0 * done as f64 / 30.0).abs() < 0.1,
        "{done} of 30 done, but the bar is {width} % wide: {row}"
    );

    // Once it completes: the counts the API gives, and its files.
    let mut finished = Value::Null;
    wait_for("the batch to complete", LIMIT, || {
        finished = curl(&[&format!("{api}/batches/{id}")]);
        finished["status"] == "completed"
    });
    let counts = &finished["request_counts"];
    assert_eq!(counts["total"], 30, "{finished}");
    assert_eq!(counts["failed"], 3, "{finished}");
    let dom = dom_until(&url, "the batch completed", |dom| {
        element(dom, "tr", "data-batch", &id)
            .is_some_and(|r| attr(r, "data-batch-status") == Some("completed"))
    });
    let row = element(&dom, "tr", "data-batch", &id).unwrap();
    for which in ["total", "completed", "failed"] {
        assert_eq!(
            batch_count(row, which),
            counts[which].as_u64(),
            "{which}: the page and GET /v1/batches/{id} disagree: {row}\n{finished}"
        );
    }
    assert_eq!(bar_width(row, "failed"), Some(10.0), "{row}");
    let output = finished["output_file_id"].as_str().expect("an output file");
    assert!(row.contains(output), "{row}");
    drop(d);
}
