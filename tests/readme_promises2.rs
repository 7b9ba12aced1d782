//! More promises the README makes, end to end with the real binary, real
//! simulated servers and a real SQLite file: a server whose recorded pid
//! now belongs to another program is not adopted; a model asleep at level
//! 2 is woken by the daemon with its weights reloaded; retrying a failed
//! parent runs again only its fragments that did not succeed, and
//! cancelling one cancels its fragments; and the MCP
//! `submit_job` tool takes each input kind the README lists.

mod common;

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::served::RequestLog;
use common::{
    alive, bin, free_port, process_servers_config, start_think_and_vision, wait_for, words,
    DaemonProcess, ProcessServers, Scratch, SimProcess,
};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

const LIMIT: Duration = Duration::from_secs(90);

/// `gpu-feeder sim --port PORT ARGS…`, on a port chosen beforehand (so that
/// a configuration can name it before the server starts, or a server can
/// be replaced by another on the same address).
fn sim_on(port: u16, args: &[&str]) -> SimProcess {
    let mut child = Command::new(bin())
        .args(["sim", "--port", &port.to_string()])
        .args(args)
        .env_remove("VLLM_SERVER_DEV_MODE")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the sim");
    let url = common::command::listening_url(&mut child, "the sim");
    SimProcess { child, url }
}

/// A program that is not a model server, killed when dropped (also when
/// the test fails).
struct Other(std::process::Child);

impl Other {
    fn id(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Other {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// README, "Model servers: launch, health, restarts, adoption": a server
/// is adopted when the process in the pid file is still running, "checked
/// by its start time". Here the recorded server is dead and its pid now
/// belongs to another program: the next daemon launches a server of its
/// own, and leaves that program alone.
#[test]
fn a_pid_that_now_belongs_to_another_program_is_not_adopted() {
    let think = format!(
        "[[instances]]\nname = \"think\"\nmodel_type = \"think\"\nbackend = \"process\"\n\
         port = {}\nserved_model_name = \"sim-think\"\n\
         command = [\"{}\", \"sim\", \"--load-s\", \"0.2\"]\nmax_tokens = 8\n\n",
        free_port(),
        bin()
    );
    let s = Scratch::new(&(process_servers_config(free_port()) + &think));
    let _servers = ProcessServers(s.path().join("servers"));
    let mut d = DaemonProcess::start_ready(&s, "daemon-1", &["think"], LIMIT);
    let server = s.pid_of("think");
    // The daemon and its server die (a host crash, say).
    d.kill9();
    killpg(Pid::from_raw(server as i32), Signal::SIGKILL).expect("kill the server's group");
    wait_for("the server is gone", LIMIT, || !alive(server));

    // Another program now runs under the pid the file records (the kernel
    // reuses pids): the file is rewritten with that program's pid, keeping
    // everything else, the server's start time included.
    let other = Other(
        Command::new("sleep")
            .arg("600")
            .process_group(0)
            .spawn()
            .expect("start another program"),
    );
    let pid_file = s.path().join("servers/think.pid");
    let mut recorded: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&pid_file).unwrap()).unwrap();
    assert_eq!(recorded["pid"], server, "{recorded}");
    recorded["pid"] = other.id().into();
    std::fs::write(&pid_file, recorded.to_string()).unwrap();

    let d2 = DaemonProcess::start(&s, "daemon-2");
    // Adopted or launched, decided at start: a stranger taken for the
    // server fails here, not by waiting for a readiness that never comes.
    wait_for(
        "the recorded server adopted or a new one ready",
        LIMIT,
        || {
            s.instance("think")
                .is_some_and(|i| i["adopted"] == true || i["state"] == "ready")
        },
    );
    let think = s.instance("think").unwrap();
    let launched = s.pid_of("think");
    let stranger = other.id();
    let stranger_alive = alive(stranger);
    drop(other);
    assert_eq!(think["adopted"], false, "{think}\n{}", d2.log());
    assert_ne!(
        launched, stranger,
        "the other program was taken for the server"
    );
    assert!(
        common::cmdline(launched).is_some_and(|c| c.contains(" sim ")),
        "a server of its own was launched"
    );
    assert!(stranger_alive, "the other program was killed");
    s.submit_prompts("think", "after", 5);
    wait_for("5 done", LIMIT, || s.count("done") == 5);
}

/// Quick decisions, a 1 s dwell, the same share alone or shared: switches
/// only sleep and wake.
const SLEEPING_ALLOCATOR: &str = "interval_s = 0.2\nmin_dwell_s = 1\nshared_memory_utilization = 0.4\nsolo_memory_utilization = 0.4\n";

/// A process instance with sleep mode at level 2: a wake must reload its
/// weights, or it answers garbage.
fn level_two(name: &str, model: &str, port: u16) -> String {
    format!(
        "[[instances]]\nname = \"{name}\"\nmodel_type = \"{model}\"\nbackend = \"process\"\n\
         port = {port}\nserved_model_name = \"sim-{name}\"\n\
         command = [\"{}\", \"sim\", \"--load-s\", \"0.5\", \"--latency-ms\", \"100\", \
         \"--sleep-s\", \"0.1\", \"--wake-s\", \"0.2\", \"--wake-l2-s\", \"0.3\"]\n\
         gpu_ids = []\ngpu_memory_utilization = 0.4\nmax_tokens = 8\n\
         sleep_mode = true\nsleep_level = 2\n\n",
        bin()
    )
}

/// Each result text of `model`'s jobs, sorted.
fn answers(s: &Scratch, model: &str) -> Vec<String> {
    let mut texts: Vec<String> = s
        .jobs()
        .iter()
        .filter(|j| j["model_type"] == model)
        .map(|j| {
            let path = j["result_path"].as_str().expect("a result file");
            let doc: serde_json::Value =
                serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
            doc["content"].as_str().unwrap_or("").to_string()
        })
        .collect();
    texts.sort();
    texts
}

/// README, "Sleep mode": at level 2 the allocator brings a model back by
/// `POST /wake_up` for the weights, `reload_weights`, then the KV cache. A
/// model woken without the reload answers garbage (as vLLM does, and as
/// the simulator does): every answer after the wake is the model's own.
#[test]
fn a_model_asleep_at_level_2_is_woken_with_its_weights_reloaded() {
    let (s, _servers, d) = start_think_and_vision(SLEEPING_ALLOCATOR, level_two, LIMIT);
    // Vision work alone, enough to outlast the allocator's decision: think
    // is put to sleep, at level 2.
    s.submit_prompts("vision", "v", 500);
    wait_for("think asleep", LIMIT, || s.instance_is("think", "sleeping"));
    wait_for("the vision work done", LIMIT, || s.count("done") == 500);
    // Think work: the daemon wakes think.
    s.submit_prompts("think", "t", 30);
    wait_for("the think work done", LIMIT, || s.count("done") == 530);
    let think = s.instance("think").unwrap();
    let woke = think["history"]
        .as_array()
        .unwrap()
        .iter()
        .any(|h| h["to"] == "waking");
    assert!(woke, "think was woken, not relaunched: {think}");
    assert!(
        d.log().contains("level 2"),
        "the sleep was at level 2: {}",
        d.log()
    );
    // Every answer is the model's own: the prompt echoed.
    let mut expected: Vec<String> = (0..30).map(|i| format!("echo: t {i}")).collect();
    expected.sort();
    assert_eq!(
        answers(&s, "think"),
        expected,
        "answers after the level-2 wake"
    );
}

/// README, "Job lifecycle": "retry a parent and its failed and cancelled
/// fragments run again". A long text in three windows whose last window
/// the server refuses: the parent fails naming it. The server is fixed,
/// the parent retried: the failed fragment is sent again, the two done
/// ones are not, the parent is done with all three, and its next stage
/// (`--then`) is created then, once.
#[test]
fn retrying_a_failed_parent_runs_only_its_failed_fragments_again() {
    let port = free_port();
    let first = sim_on(port, &["--fail-matching", "w1000"]);
    let s = Scratch::new(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\n[dispatch]\nwindow = 4\nexternal_poll_ms = 100\n\n[health]\ninterval_s = 0.2\n\n",
    );
    let tk = common::word_tokenizer(s.path(), 2000);
    let config = std::fs::read_to_string(s.config()).unwrap()
        + &format!(
            "[[instances]]\nname = \"think\"\nmodel_type = \"think\"\nbackend = \"external\"\n\
             url = \"{}\"\nserved_model_name = \"sim\"\nmax_tokens = 32\ntokenizer = \"{}\"\n\n",
            first.url,
            tk.display()
        );
    std::fs::write(s.config(), config).unwrap();
    let text = s.path().join("long.txt");
    std::fs::write(&text, words(0, 1200)).unwrap();
    let submitted = s.submit_file(
        "think",
        "--text-file",
        &text,
        &["--chunk", "--then", "vision"],
    );
    assert_eq!(submitted["fragments"], 3, "{submitted}");
    let parent = submitted["id"].as_str().unwrap().to_string();
    let status = |id: &str| s.json(&["status", id, "--json"]);

    let d = DaemonProcess::start(&s, "daemon");
    wait_for("the parent failed", LIMIT, || {
        status(&parent)["status"] == "failed"
    });
    let fragments = |s: &Scratch| -> Vec<serde_json::Value> {
        let mut f: Vec<serde_json::Value> = s
            .jobs()
            .into_iter()
            .filter(|j| j["parent_id"].as_str() == Some(parent.as_str()))
            .collect();
        f.sort_by_key(|j| j["fragment_index"].as_u64());
        f
    };
    let before = fragments(&s);
    let states: Vec<&str> = before
        .iter()
        .map(|f| f["status"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["done", "done", "failed"], "{before:?}");
    let follow_ups = |s: &Scratch| {
        s.jobs()
            .into_iter()
            .filter(|j| j["follows"].as_str() == Some(parent.as_str()))
            .count()
    };
    assert_eq!(follow_ups(&s), 0, "a failed parent has no next stage");

    // The server is fixed (replaced on the same address, logging what it
    // receives), and the parent retried.
    drop(first);
    let log = RequestLog::new(s.path(), "fixed");
    let _fixed = sim_on(port, &log.flags());
    let retried = s.json(&["retry", &parent, "--json"]);
    assert_eq!(retried["status"], "processing", "{retried}");
    wait_for("the retried parent is done", LIMIT, || {
        status(&parent)["status"] == "done"
    });
    let after = fragments(&s);
    let ids: Vec<&str> = after.iter().map(|f| f["id"].as_str().unwrap()).collect();
    let sent: Vec<String> = log.sends().into_iter().map(|r| r.job).collect();
    assert_eq!(sent, [ids[2]], "only the failed fragment was sent again");
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        assert_eq!(a["status"], "done", "fragment #{i}: {a}");
        if i < 2 {
            assert_eq!(
                a["result_path"], b["result_path"],
                "fragment #{i} kept its result"
            );
            assert_eq!(
                a["attempts"], b["attempts"],
                "fragment #{i} was not run again"
            );
        }
    }
    let p = status(&parent);
    let doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(p["result_path"].as_str().unwrap()).unwrap())
            .unwrap();
    assert_eq!(doc["fragments"].as_array().unwrap().len(), 3, "{doc}");
    wait_for("its next stage is created", LIMIT, || follow_ups(&s) == 1);
    // And only once: a later look finds still one.
    assert_eq!(follow_ups(&s), 1);
    drop(d);
}

/// README, "Job lifecycle": "Cancel a parent and its unfinished fragments
/// are cancelled"; retried, the cancelled fragments run again and the
/// parent finishes. The jobs are queued while no daemon runs, so all three
/// fragments are unfinished at the cancel.
#[test]
fn cancelling_a_parent_cancels_its_fragments_and_a_retry_runs_them() {
    let think = SimProcess::start(&[]);
    let s = Scratch::new(&format!(
        "[admin]\nlisten = \"127.0.0.1:{}\"\n\n[dispatch]\nexternal_poll_ms = 100\n\n[health]\ninterval_s = 0.2\n\n",
        free_port()
    ));
    let tk = common::word_tokenizer(s.path(), 2000);
    let config = std::fs::read_to_string(s.config()).unwrap()
        + &format!(
            "[[instances]]\nname = \"think\"\nmodel_type = \"think\"\nbackend = \"external\"\n\
             url = \"{}\"\nserved_model_name = \"sim\"\nmax_tokens = 32\ntokenizer = \"{}\"\n\n",
            think.url,
            tk.display()
        );
    std::fs::write(s.config(), config).unwrap();
    let text = s.path().join("long.txt");
    std::fs::write(&text, words(0, 1200)).unwrap();
    let parent = s.submit_file("think", "--text-file", &text, &["--chunk"])["id"]
        .as_str()
        .unwrap()
        .to_string();
    let of_parent = |s: &Scratch| -> Vec<String> {
        s.jobs()
            .into_iter()
            .filter(|j| j["parent_id"].as_str() == Some(parent.as_str()))
            .map(|j| j["status"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(of_parent(&s), ["pending", "pending", "pending"]);
    let cancelled = s.json(&["cancel", &parent, "--json"]);
    assert_eq!(cancelled["status"], "cancelled", "{cancelled}");
    assert_eq!(of_parent(&s), ["cancelled", "cancelled", "cancelled"]);

    let retried = s.json(&["retry", &parent, "--json"]);
    assert_eq!(retried["status"], "processing", "{retried}");
    assert_eq!(of_parent(&s), ["pending", "pending", "pending"]);
    let _d = DaemonProcess::start_ready(&s, "daemon", &["think"], LIMIT);
    wait_for("the parent is done", LIMIT, || {
        s.json(&["status", &parent, "--json"])["status"] == "done"
    });
    assert_eq!(of_parent(&s), ["done", "done", "done"]);
}

/// README, "MCP server": `submit_job` takes `model` and one of `prompt`,
/// `messages`, `image_path`, `payload_path`, `text_file` (with `chunk`),
/// and `priority`, `then`. A real MCP client submits one job of each kind
/// and reads each result back (tests/mcp_submit_kinds.py).
#[test]
fn mcp_submit_job_takes_each_input_kind() {
    let think = SimProcess::start(&[]);
    let vision = SimProcess::start(&[]);
    let s = Scratch::new(&format!(
        "[admin]\nlisten = \"127.0.0.1:{}\"\n\n[dispatch]\nexternal_poll_ms = 100\n\n[health]\ninterval_s = 0.2\n\n",
        free_port()
    ));
    let tk = common::word_tokenizer(s.path(), 2000);
    let config = std::fs::read_to_string(s.config()).unwrap()
        + &common::external("vision", "vision", &vision.url)
        + &format!(
            "[[instances]]\nname = \"think\"\nmodel_type = \"think\"\nbackend = \"external\"\n\
             url = \"{}\"\nserved_model_name = \"sim\"\nmax_tokens = 32\ntokenizer = \"{}\"\n\n",
            think.url,
            tk.display()
        );
    std::fs::write(s.config(), config).unwrap();
    // Files are read from the payload roots: the stage folder by default.
    let files = s.stage();
    std::fs::create_dir_all(&files).unwrap();
    write_inputs(&files);
    let _d = DaemonProcess::start_ready(&s, "daemon", &["think", "vision"], LIMIT);
    common::succeed(
        Command::new("python3")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/mcp_submit_kinds.py"
            ))
            .arg(bin())
            .arg(s.config())
            .arg(&files),
        "the MCP client (is the Python `mcp` package installed? .ci/run installs it)",
    );
}

/// The files the MCP client submits: a small PNG, a payload file, and a
/// long text of 1,200 words for the word tokenizer.
fn write_inputs(dir: &Path) {
    let img = image::RgbImage::from_fn(64, 48, |x, y| image::Rgb([x as u8, y as u8, 7]));
    img.save(dir.join("page.png")).unwrap();
    std::fs::write(
        dir.join("payload.json"),
        r#"{"messages": [{"role": "user", "content": "from a payload file"}]}"#,
    )
    .unwrap();
    std::fs::write(dir.join("long.txt"), words(0, 1200)).unwrap();
}
