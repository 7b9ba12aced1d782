//! gpu-feeder against the real vLLM: the CPU build of vLLM serving tiny
//! random-weight models (`tests/common/vllm.rs`), launched by the daemon's
//! own `process` backend with gpu-feeder's own flags. Each test runs the
//! real daemon, real vLLM processes and a real SQLite file; nothing here is
//! simulated.
//!
//! - `a_vllm_process_serves_fails_restarts_and_is_adopted`: readiness from
//!   vLLM's `/health` and a canary, jobs with content and token counts, an
//!   over-long prompt failing at once with vLLM's words, the window's
//!   signals read from vLLM's `/metrics`, `kill -9` mid-run, adoption after
//!   a daemon restart, and `keep_servers_on_exit = false`.
//! - `the_default_two_model_setup_runs_on_vllm`: a tiny Qwen2-VL as the
//!   vision instance and a tiny Llama as the think instance, both served by
//!   vLLM: image jobs through vLLM's multimodal code, a tiled page completed
//!   by fan-in, and its vision → think follow-up; then a `stream: true`
//!   chat completion through the OpenAI API, relayed chunk by chunk from
//!   vLLM's own stream.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::vllm::{self, vllm};
use common::{alive, free_port, strings, wait_for, DaemonProcess, ProcessServers, Scratch};

/// A CPU vLLM takes 60–90 s to start on two cores, more when another starts
/// beside it.
const START: Duration = Duration::from_secs(600);
const LIMIT: Duration = Duration::from_secs(300);

/// One test at a time: a CPU vLLM's engine spins on its queues, so the three
/// servers of two tests on two cores slow each other more than running the
/// tests side by side saves.
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn settings(admin: u16, keep: bool) -> String {
    format!(
        "[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n\
         [dispatch]\nwindow = \"auto\"\nexternal_poll_ms = 50\nretry_base_s = 0.2\nretry_max_s = 1\n\n\
         [health]\ninterval_s = 0.5\ntimeout_s = 10\nfailure_threshold = 2\n\
         restart_backoff_s = 0.2\nrestart_backoff_max_s = 1\n\n\
         [servers]\nstate_dir = \"servers\"\nstop_grace_s = 15\nkeep_servers_on_exit = {keep}\n\n"
    )
}

/// A `process` instance running the real vLLM on `model`.
fn instance(name: &str, model_type: &str, model: &Path, port: u16, extra: &str) -> String {
    let command: Vec<String> = vllm().command().iter().map(|a| format!("{a:?}")).collect();
    let mut args: Vec<String> = vllm::base_args().iter().map(|a| format!("{a:?}")).collect();
    // vLLM logs each request, and each one aborted (a client gone).
    args.extend([
        "\"--max-num-seqs\"".into(),
        "\"16\"".into(),
        "\"--enable-log-requests\"".into(),
    ]);
    let env: Vec<String> = vllm::ENV
        .iter()
        .map(|(k, v)| format!("{k} = {v:?}"))
        .collect();
    format!(
        "[[instances]]\nname = \"{name}\"\nmodel_type = \"{model_type}\"\nbackend = \"process\"\n\
         port = {port}\nserved_model_name = \"tiny-{name}\"\nmodel = {model:?}\n\
         command = [{}]\nargs = [{}]\nenv = {{ {} }}\nstartup_timeout_s = 900\n\
         max_tokens = 16\n{extra}\n\n",
        command.join(", "),
        args.join(", "),
        env.join(", "),
    )
}

/// Processes whose process group is `pgid` (a vLLM server and its engine).
fn group_members(pgid: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
                let rest = &s[s.rfind(')').map_or(0, |i| i + 2)..];
                let f: Vec<&str> = rest.split_whitespace().collect();
                f.first() != Some(&"Z") && f.get(2) == Some(&pgid.to_string().as_str())
            })
        })
        .collect()
}

/// Writes `lines` (JSON payloads) to a JSONL file and submits them.
fn submit_jsonl(s: &Scratch, model: &str, tag: &str, lines: &[serde_json::Value]) {
    submit_jsonl_at(s, model, tag, lines, 0);
}

/// [`submit_jsonl`] at job priority `priority`.
fn submit_jsonl_at(
    s: &Scratch,
    model: &str,
    tag: &str,
    lines: &[serde_json::Value],
    priority: i64,
) {
    let f = s.path().join(format!("{model}-{tag}.jsonl"));
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(&f, text).unwrap();
    let p = priority.to_string();
    let r = s.run(&[
        "submit",
        "--model",
        model,
        "--priority",
        &p,
        "--jsonl",
        f.to_str().unwrap(),
    ]);
    assert_eq!(r.code(), 0, "{}", r.stderr());
}

/// Prompts that generate exactly `max_tokens` (vLLM's `ignore_eos`: a
/// random-weight model may otherwise stop at once).
fn prompts(tag: &str, n: usize, max_tokens: u32) -> Vec<serde_json::Value> {
    (0..n)
        .map(|i| {
            serde_json::json!({
                "prompt": format!("{tag} {i}: tell me about the number {i}"),
                "max_tokens": max_tokens,
                "ignore_eos": true,
            })
        })
        .collect()
}

fn result_doc(job: &serde_json::Value) -> serde_json::Value {
    let path = job["result_path"].as_str().expect("a result file");
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn a_vllm_process_serves_fails_restarts_and_is_adopted() {
    let _one = one_at_a_time();
    let v = vllm();
    let admin = free_port();
    let port = free_port();
    let think = instance("think", "think", &v.llama(), port, "");
    let s = Scratch::new(&(settings(admin, true) + &think));
    let _servers = ProcessServers(s.path().join("servers"));
    let url = format!("http://127.0.0.1:{port}");

    // Ready only once vLLM says so: /health, then a canary completion.
    let started = Instant::now();
    let mut d = DaemonProcess::start(&s, "daemon-1");
    let mut health_ok_at = None;
    wait_for("vLLM ready", START, || {
        if health_ok_at.is_none() && vllm::get(&url, "/health").is_some_and(|(c, _)| c == 200) {
            health_ok_at = Some(started.elapsed());
        }
        s.instance_is("think", "ready")
    });
    let ready_at = started.elapsed();
    eprintln!(
        "figure: daemon start → vLLM /health 200 {:.1} s → instance ready {:.1} s",
        health_ok_at.map_or(f64::NAN, |d| d.as_secs_f64()),
        ready_at.as_secs_f64()
    );
    let i = s.instance("think").unwrap();
    let states: Vec<&str> = strings(&i["history"], "to");
    assert_eq!(states, ["starting", "loading", "ready"], "{i}");
    let pid = s.pid_of("think");
    let vlog = s.path().join("servers/think.log");
    let log = std::fs::read_to_string(&vlog).unwrap();
    assert!(
        log.contains("POST /v1/chat/completions HTTP/1.1\" 200"),
        "the canary completion reached vLLM before the instance was ready:\n{}",
        vllm::tail(&vlog, 30)
    );
    // vLLM got gpu-feeder's own flags.
    let cmdline = common::cmdline(pid).unwrap();
    for part in [
        format!("--model {}", v.llama().display()),
        "--served-model-name tiny-think".into(),
        format!("--port {port}"),
        "--gpu-memory-utilization".into(),
        "--max-num-seqs 16".into(),
        "--scheduling-policy priority".into(),
    ] {
        assert!(cmdline.contains(&part), "{part} missing from {cmdline}");
    }

    // Jobs come back with content and vLLM's token counts.
    // Half of them above the bulk: vLLM, run with its priority policy,
    // takes their requests' `priority` (-7).
    submit_jsonl(&s, "think", "a", &prompts("a", 12, 12));
    submit_jsonl_at(&s, "think", "a-urgent", &prompts("au", 12, 12), 7);
    wait_for("24 done", LIMIT, || s.count("done") == 24);
    for j in s.jobs() {
        assert_eq!(j["status"], "done", "{j}");
        assert_eq!(j["completion_tokens"], 12, "vLLM's usage: {j}");
        assert!(j["prompt_tokens"].as_u64().unwrap() > 5, "{j}");
        let doc = result_doc(&j);
        assert!(
            !doc["content"].as_str().unwrap_or("").is_empty(),
            "content in {doc}"
        );
    }

    // An over-long prompt fails at once, for good, in vLLM's words.
    let long = "lorem ipsum dolor ".repeat(1500);
    let r = s.run(&["submit", "--model", "think", "--prompt", &long, "--json"]);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    let id = serde_json::from_str::<serde_json::Value>(&r.stdout()).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    wait_for("the over-long prompt failed", LIMIT, || {
        s.json(&["status", &id, "--json"])["status"] == "failed"
    });
    let failed = s.json(&["status", &id, "--json"]);
    assert_eq!(failed["attempts"], 1, "a 400 is not retried: {failed}");
    let error = failed["error"].as_str().unwrap();
    assert!(
        error.contains("400") && error.contains("maximum context length"),
        "vLLM's own words: {error}"
    );

    // The window's signals come from vLLM's /metrics.
    submit_jsonl(&s, "think", "b", &prompts("b", 150, 48));
    wait_for(
        "the window reads vLLM's metrics while it runs",
        LIMIT,
        || {
            s.instance("think").is_some_and(|i| {
                i["window_signals"]["running"].as_f64() > Some(0.0)
                    && i["window_signals"]["kv_cache_tokens"].as_f64() > Some(0.0)
            })
        },
    );
    let metrics = vllm::get(&url, "/metrics").unwrap().1;
    let i = s.instance("think").unwrap();
    let info = metrics
        .lines()
        .find(|l| l.starts_with("vllm:cache_config_info{"))
        .expect("vLLM publishes its cache configuration");
    let label = |k: &str| -> f64 {
        let start = info.find(&format!("{k}=\"")).unwrap() + k.len() + 2;
        info[start..start + info[start..].find('"').unwrap()]
            .parse()
            .unwrap()
    };
    assert_eq!(label("block_size"), 128.0, "the CPU block size: {info}");
    assert_eq!(
        i["window_signals"]["kv_cache_tokens"].as_f64(),
        Some(label("num_gpu_blocks") * label("block_size")),
        "{i}"
    );
    assert!(
        i["window_signals"]["prefix_cache_hit_rate"]
            .as_f64()
            .is_some(),
        "vLLM's prefix counters are read: {i}"
    );
    assert!(
        i["window_signals"]["generation_tokens_per_s"].as_f64() > Some(0.0),
        "{i}"
    );

    // kill -9 of vLLM while requests are in flight: fresh work, so that the
    // queue still holds jobs (and the window is full) when the kill lands,
    // however far the earlier batch got.
    submit_jsonl(&s, "think", "k", &prompts("k", 40, 48));
    wait_for("requests in flight with more queued", LIMIT, || {
        s.count("pending") > 0
            && s.instance("think")
                .is_some_and(|i| i["in_flight"].as_u64() > Some(0))
    });
    let members = group_members(pid);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let killed = Instant::now();
    wait_for("the kill is noticed", LIMIT, || {
        !s.instance_is("think", "ready")
    });
    wait_for("vLLM restarted and ready", START, || {
        s.instance("think")
            .is_some_and(|i| i["state"] == "ready" && i["restarts"] == 1)
    });
    eprintln!(
        "figure: kill -9 of vLLM → ready again in {:.1} s",
        killed.elapsed().as_secs_f64()
    );
    assert!(
        members.iter().all(|p| !alive(*p)),
        "no process of the killed server is left behind: {members:?} of {:?}",
        members.iter().filter(|p| alive(**p)).collect::<Vec<_>>()
    );
    wait_for("every job done", LIMIT, || s.count("done") == 214);
    let jobs = s.jobs();
    assert!(
        jobs.iter().any(|j| j["crashes"] == 1),
        "the kill landed while jobs were in flight; the daemon's log:\n{}",
        d.log()
    );
    for j in jobs.iter().filter(|j| j["status"] == "done") {
        assert_eq!(j["attempts"], 1, "a crash is not a failed attempt: {j}");
        let payload: serde_json::Value =
            serde_json::from_str(j["payload_inline"].as_str().unwrap()).unwrap();
        assert_eq!(j["completion_tokens"], payload["max_tokens"], "{j}");
    }
    assert_eq!(s.count("failed"), 1, "only the over-long prompt failed");

    // SIGTERM: vLLM stays, and the next daemon adopts it (the same pid).
    let pid = s.pid_of("think");
    d.term();
    assert_eq!(d.wait_exit(LIMIT), Some(0), "{}", d.log());
    assert!(
        alive(pid),
        "vLLM outlives the daemon (keep_servers_on_exit)"
    );
    let restarted = Instant::now();
    let d2 = DaemonProcess::start_ready(&s, "daemon-2", &["think"], LIMIT);
    eprintln!(
        "figure: daemon restart → adopted vLLM ready in {:.1} s",
        restarted.elapsed().as_secs_f64()
    );
    let i = s.instance("think").unwrap();
    assert_eq!(s.pid_of("think"), pid, "adopted, not relaunched: {i}");
    assert_eq!(i["adopted"], true);
    // As long as the bulk below: the request lifetime this daemon learns
    // from them makes every bulk request in flight young (sent within two
    // lifetimes) when the urgent job comes.
    submit_jsonl(&s, "think", "c", &prompts("c", 10, 48));
    wait_for("10 more done", LIMIT, || s.count("done") == 224);

    // An urgent job takes the young bulk back: their requests are dropped,
    // vLLM aborts them (its log says so for each), and they run again
    // after it, no attempt counted.
    let aborted = || {
        std::fs::read_to_string(&vlog)
            .unwrap_or_default()
            .matches(" aborted.")
            .count()
    };
    let aborted_before = aborted();
    submit_jsonl(&s, "think", "r", &prompts("r", 40, 48));
    wait_for("bulk in flight", LIMIT, || {
        s.instance("think")
            .is_some_and(|i| i["in_flight"].as_u64() >= Some(4))
    });
    submit_jsonl_at(&s, "think", "r-urgent", &prompts("ru", 1, 8), 10);
    wait_for("young bulk taken back", LIMIT, || {
        s.instance("think")
            .is_some_and(|i| i["recalled"].as_u64() > Some(0))
    });
    wait_for("vLLM aborted them", LIMIT, || aborted() > aborted_before);
    let recalled = s.instance("think").unwrap()["recalled"].as_u64().unwrap();
    eprintln!(
        "figure: {recalled} young requests taken back; vLLM logged {} aborts",
        aborted() - aborted_before
    );
    wait_for("41 more done", LIMIT, || s.count("done") == 265);
    for j in s.jobs().iter().filter(|j| j["status"] == "done") {
        assert_eq!(j["attempts"], 1, "taken back is no attempt: {j}");
    }
    drop(d2);

    // keep_servers_on_exit = false: a clean stop takes vLLM down with it.
    std::fs::write(
        s.config(),
        format!(
            "[queue]\ndb_path = \"jobs.db\"\nresults_dir = \"results\"\nstage_dir = \"stage\"\n\n{}{think}",
            settings(admin, false)
        ),
    )
    .unwrap();
    let mut d3 = DaemonProcess::start_ready(&s, "daemon-3", &["think"], LIMIT);
    assert_eq!(s.pid_of("think"), pid);
    let members = group_members(pid);
    d3.term();
    assert_eq!(d3.wait_exit(LIMIT), Some(0), "{}", d3.log());
    wait_for("vLLM stopped with the daemon", LIMIT, || {
        members.iter().all(|p| !alive(*p))
    });
    assert!(
        vllm::get(&url, "/health").is_none(),
        "nothing answers on the port"
    );
}

/// A page image of its own (`seed` tells pages apart: an identical image
/// would be the same job).
fn png(path: &Path, w: u32, h: u32, seed: u32) {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            (x % 256) as u8,
            (y % 256) as u8,
            ((x + y + seed) % 256) as u8,
        ])
    });
    img.save(path).unwrap();
}

#[test]
fn the_default_two_model_setup_runs_on_vllm() {
    let _one = one_at_a_time();
    let v = vllm();
    let admin = free_port();
    let api = free_port();
    let s = Scratch::new(
        &(settings(admin, true)
            + &format!("[api]\nlisten = \"127.0.0.1:{api}\"\n\n")
            + "[chunk]\nimage_max_px = 1024\n\n"
            + &instance(
                "vision",
                "vision",
                &v.qwen2_vl(),
                free_port(),
                "ocr_prompt = \"Read the text.\"\ngpu_memory_utilization = 0.45",
            )
            + &instance(
                "think",
                "think",
                &v.llama(),
                free_port(),
                "gpu_memory_utilization = 0.45",
            )),
    );
    let _servers = ProcessServers(s.path().join("servers"));
    let _d = DaemonProcess::start(&s, "daemon");

    // Three page images, and one large page tiled and followed by think work.
    let mut pages = Vec::new();
    for i in 0..3 {
        let p = s.stage().join(format!("page-{i}.png"));
        png(&p, 600, 400, i);
        pages.push(p);
    }
    let big = s.stage().join("scan.png");
    png(&big, 1200, 1200, 99);
    for p in &pages {
        let r = s.submit_run("vision", "--image", p, &[]);
        assert_eq!(r.code(), 0, "{}", r.stderr());
    }
    let out = s.submit_file("vision", "--image", &big, &["--then", "think"]);
    assert_eq!(out["fragments"], 9, "1200 px gives 3 tiles a side");
    let parent = out["id"].as_str().unwrap().to_string();

    wait_for("both vLLM servers ready", START, || {
        s.instance_is("vision", "ready") && s.instance_is("think", "ready")
    });
    wait_for("the parent's follow-up done", LIMIT, || {
        s.jobs()
            .iter()
            .any(|j| j["follows"] == parent.as_str() && j["status"] == "done")
    });
    wait_for("every page done", LIMIT, || {
        s.jobs()
            .iter()
            .filter(|j| j["model_type"] == "vision")
            .all(|j| j["status"] == "done")
    });
    let jobs = s.jobs();
    assert_eq!(s.count("failed"), 0, "{jobs:?}");
    // An image part counts image tokens at vLLM: a 600×400 page makes far
    // more prompt tokens than its short text prompt alone.
    let vision: Vec<&serde_json::Value> = jobs
        .iter()
        .filter(|j| {
            j["model_type"] == "vision" && j["parent_id"].is_null() && j["id"] != parent.as_str()
        })
        .collect();
    assert_eq!(vision.len(), 3, "{vision:?}");
    for j in &vision {
        assert!(j["prompt_tokens"].as_u64() > Some(20), "{j}");
        assert_eq!(j["completion_tokens"], 16, "{j}");
    }
    let p = s.json(&["status", &parent, "--json"]);
    assert_eq!(p["status"], "done");
    let doc = result_doc(&p);
    assert_eq!(doc["fragments"].as_array().unwrap().len(), 9, "{doc}");
    let follow = jobs
        .iter()
        .find(|j| j["follows"] == parent.as_str())
        .unwrap();
    assert_eq!(follow["model_type"], "think");
    assert!(follow["completion_tokens"].as_u64() > Some(0), "{follow}");
    assert!(
        follow["prompt_tokens"].as_u64() > Some(9),
        "the follow-up's prompt holds the nine tiles' text: {follow}"
    );
    streamed_through_the_api(&s, api);
}

/// A streamed chat completion through the OpenAI API, to the think
/// instance: vLLM's chunks relayed one by one (a replay of the finished
/// answer would be one chunk of content), its usage, `[DONE]`, and the
/// job's result put together from the same chunks.
fn streamed_through_the_api(s: &Scratch, api: u16) {
    let headers = s.path().join("stream-headers");
    let out = std::process::Command::new("curl")
        .args(["-sSN", "--max-time", "300", "-D"])
        .arg(&headers)
        .args(["-H", "Content-Type: application/json", "-d"])
        .arg(
            serde_json::json!({
                "model": "tiny-think",
                "messages": [{"role": "user", "content": "stream a few tokens"}],
                "max_tokens": 16,
                "ignore_eos": true,
                "stream": true,
                "stream_options": {"include_usage": true},
            })
            .to_string(),
        )
        .arg(format!("http://127.0.0.1:{api}/v1/chat/completions"))
        .output()
        .expect("curl runs");
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "curl: {}{body}",
        String::from_utf8_lossy(&out.stderr)
    );
    let data: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(data.last(), Some(&"[DONE]"), "{body}");
    let chunks: Vec<serde_json::Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap_or_else(|e| panic!("{e}: {d}")))
        .collect();
    let pieces: Vec<&str> = chunks
        .iter()
        .filter_map(|c| c.pointer("/choices/0/delta/content")?.as_str())
        .filter(|t| !t.is_empty())
        .collect();
    assert!(pieces.len() > 4, "token by token, not one replay: {body}");
    let usage = chunks
        .iter()
        .find_map(|c| c.get("usage").filter(|u| !u.is_null()))
        .unwrap_or_else(|| panic!("a usage chunk: {body}"));
    assert_eq!(usage["completion_tokens"], 16, "{body}");
    let headers = std::fs::read_to_string(&headers).unwrap();
    let job = headers
        .lines()
        .find_map(|l| l.strip_prefix("x-gpu-feeder-job: "))
        .unwrap_or_else(|| panic!("the job's header: {headers}"))
        .trim();
    wait_for("the streamed job done", LIMIT, || {
        s.json(&["status", job, "--json"])["status"] == "done"
    });
    let doc = result_doc(&s.json(&["status", job, "--json"]));
    assert_eq!(doc["content"], pieces.concat(), "{doc}");
    assert_eq!(doc["completion_tokens"], 16, "{doc}");
}
