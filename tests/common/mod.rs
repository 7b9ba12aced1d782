//! Helpers shared by the integration tests: a scratch folder with a
//! configuration, and a way to run the real `gpu-feeder` binary in it.

#![allow(dead_code)]

// Included by the helpers that the benchmarks take by path too: loaded
// more than once on purpose.
#[allow(clippy::duplicate_mod)]
pub mod command;
pub mod docker;
pub mod openai_like;
pub mod pg;
pub mod served;
pub mod sim;
pub mod vllm;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub use command::succeed;

fn config(queue: &str, extra: &str) -> String {
    format!(
        "[queue]\ndb_path = \"jobs.db\"\nresults_dir = \"results\"\nstage_dir = \"stage\"\n{queue}\n{extra}"
    )
}

/// A scratch folder holding `feeder.toml`, the database and the state folders.
pub struct Scratch {
    pub dir: tempfile::TempDir,
}

impl Scratch {
    /// A scratch folder whose configuration is `[queue]` pointing inside it,
    /// followed by `extra`.
    pub fn new(extra: &str) -> Scratch {
        Self::with_queue("", extra)
    }

    /// Like `new`, with `queue` lines added to the `[queue]` table.
    pub fn with_queue(queue: &str, extra: &str) -> Scratch {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("feeder.toml"), config(queue, extra)).expect("write config");
        std::fs::create_dir_all(dir.path().join("stage")).expect("stage dir");
        Scratch { dir }
    }

    /// Replaces the configuration, keeping the `[queue]` paths.
    pub fn rewrite(&self, extra: &str) {
        std::fs::write(self.config(), config("", extra)).expect("write config");
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn config(&self) -> PathBuf {
        self.path().join("feeder.toml")
    }

    pub fn db(&self) -> PathBuf {
        self.path().join("jobs.db")
    }

    pub fn stage(&self) -> PathBuf {
        self.path().join("stage")
    }

    /// Runs `gpu-feeder --config <scratch>/feeder.toml ARGS` to completion.
    pub fn run(&self, args: &[&str]) -> Run {
        let out = Command::new(bin())
            .arg("--config")
            .arg(self.config())
            .args(args)
            .current_dir(self.path())
            .env_remove("FEEDER_CONFIG")
            .output()
            .expect("run gpu-feeder");
        Run(out)
    }

    /// Like `run`, expecting success and JSON on stdout.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let r = self.run(args);
        assert_eq!(r.code(), 0, "gpu-feeder {args:?} failed:\n{}", r.stderr());
        serde_json::from_str(&r.stdout()).unwrap_or_else(|e| panic!("{e}: {}", r.stdout()))
    }
}

/// Runs `gpu-feeder ARGS` to completion, outside any scratch folder and
/// with no `FEEDER_CONFIG`.
pub fn gpu_feeder(args: &[&str]) -> Run {
    let out = Command::new(bin())
        .args(args)
        .env_remove("FEEDER_CONFIG")
        .output()
        .expect("run gpu-feeder");
    Run(out)
}

/// The binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_gpu-feeder")
}

/// A finished run.
pub struct Run(pub Output);

impl Run {
    pub fn code(&self) -> i32 {
        self.0.status.code().unwrap_or(-1)
    }
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.0.stdout).into_owned()
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.0.stderr).into_owned()
    }

    /// Asserts that the run succeeded; its standard output.
    #[track_caller]
    pub fn succeeded(&self) -> String {
        let out = self.stdout();
        assert_eq!(self.code(), 0, "{out}\n{}", self.stderr());
        out
    }

    /// Asserts that the run exited with `code` and that its standard error
    /// says `said`.
    #[track_caller]
    pub fn refused(&self, code: i32, said: &str) {
        assert_eq!(self.code(), code, "{}", self.stderr());
        assert!(self.stderr().contains(said), "{}", self.stderr());
    }

    /// Asserts that the run failed, whatever its code, and that its standard
    /// error says `said`.
    #[track_caller]
    pub fn fails_saying(&self, said: &str) {
        assert_ne!(self.code(), 0, "{}", self.stderr());
        assert!(self.stderr().contains(said), "{}", self.stderr());
    }
}

/// Runs the real MCP client (`tests/mcp_client.py`, in Python) against
/// `gpu-feeder mcp` on the queue of `s`, and asserts that all its checks
/// passed.
pub fn mcp_client(s: &Scratch) {
    mcp_client_with_idle(s, &[]);
}

/// [`mcp_client`], also cancelling and retrying a job of `idle`, a model
/// no instance serves (so that its jobs stay pending).
pub fn mcp_client_with_idle(s: &Scratch, idle: &[&str]) {
    succeed(
        Command::new("python3")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/mcp_client.py"))
            .arg(bin())
            .arg(s.config())
            .args(idle),
        "the MCP client (is the Python `mcp` package installed? .ci/run installs it)",
    );
}

/// The tables a daemon running `backend = "process"` servers needs in the
/// tests: the admin endpoint on `admin_port`, quick polling, health checks
/// and restarts, servers kept in `servers/` and stopped within 2 s, and no
/// GPU reading. Complete the configuration with an `[allocator]` and
/// `[[instances]]`.
pub fn process_servers_config(admin_port: u16) -> String {
    format!(
        "[admin]\nlisten = \"127.0.0.1:{admin_port}\"\n\n\
         [dispatch]\nexternal_poll_ms = 50\n\n\
         [health]\ninterval_s = 0.2\nrestart_backoff_s = 0.2\n\n\
         [servers]\nstate_dir = \"servers\"\nstop_grace_s = 2\n\n\
         [gpu]\nenabled = false\n\n"
    )
}

/// Starts the daemon on a scratch folder configured by
/// [`process_servers_config`], then `[allocator]` with `allocator`, and a
/// think and a vision instance from `instance(name, model_type, port)`;
/// waits until both are ready. (Drop in reverse: the daemon, the servers,
/// the folder.)
pub fn start_think_and_vision(
    allocator: &str,
    instance: fn(&str, &str, u16) -> String,
    limit: std::time::Duration,
) -> (Scratch, ProcessServers, DaemonProcess) {
    let s = Scratch::new(&format!(
        "{}[allocator]\n{allocator}\n{}{}",
        process_servers_config(free_port()),
        instance("think", "think", free_port()),
        instance("vision", "vision", free_port()),
    ));
    let servers = ProcessServers(s.path().join("servers"));
    let d = DaemonProcess::start_ready(&s, "daemon", &["think", "vision"], limit);
    (s, servers, d)
}

/// The string `key` of every element of the array `list`, in order.
pub fn strings<'a>(list: &'a serde_json::Value, key: &str) -> Vec<&'a str> {
    list.as_array()
        .unwrap_or_else(|| panic!("not an array: {list}"))
        .iter()
        .map(|e| {
            e[key]
                .as_str()
                .unwrap_or_else(|| panic!("no string {key} in {e}"))
        })
        .collect()
}

/// Polls `cond` every 50 ms until it holds; panics naming `what` after `limit`.
pub fn wait_for(what: &str, limit: std::time::Duration, mut cond: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !cond() {
        if start.elapsed() > limit {
            panic!("timed out after {limit:?} waiting until {what}");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// `promtool check metrics` on `text`: whether it passed, and what it said.
pub fn promtool(text: &str) -> (bool, String) {
    let out = pipe(
        Command::new("promtool").args(["check", "metrics"]),
        text,
        "promtool is installed (scripts/test.sh installs the Debian package prometheus)",
    );
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said)
}

/// Runs `cmd` with `input` on its standard input, and collects its output;
/// `missing` says what must be installed when it cannot start.
fn pipe(cmd: &mut Command, input: &str, missing: &str) -> Output {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect(missing);
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// A `gpu-feeder sim` child process on a free port; killed on drop.
pub struct SimProcess {
    pub child: std::process::Child,
    pub url: String,
}

impl SimProcess {
    /// Starts `gpu-feeder sim --port 0 ARGS` and reads the URL it prints.
    pub fn start(args: &[&str]) -> SimProcess {
        SimProcess::start_env(args, &[])
    }

    /// `start`, with these variables added to its environment.
    pub fn start_env(args: &[&str], env: &[(&str, &str)]) -> SimProcess {
        let mut child = Command::new(bin())
            .args(["sim", "--port", "0"])
            .args(args)
            .env_remove("VLLM_SERVER_DEV_MODE")
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start the sim");
        let url = command::listening_url(&mut child, "the sim");
        SimProcess { child, url }
    }
}

impl SimProcess {
    /// A gauge from the sim's `/metrics`, such as `vllm:num_requests_running`.
    pub fn gauge(&self, name: &str) -> f64 {
        use std::io::{Read, Write};
        let addr = self.url.strip_prefix("http://").unwrap();
        let mut conn = std::net::TcpStream::connect(addr).expect("the sim answers");
        write!(conn, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
        let mut text = String::new();
        conn.read_to_string(&mut text).unwrap();
        text.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in the sim's /metrics:\n{text}"))
    }

    /// The status of an empty `POST path` to the sim.
    pub fn post(&self, path: &str) -> u16 {
        use std::io::{Read, Write};
        let addr = self.url.strip_prefix("http://").unwrap();
        let mut conn = std::net::TcpStream::connect(addr).expect("the sim answers");
        write!(
            conn,
            "POST {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: 0\r\n\r\n"
        )
        .unwrap();
        let mut text = String::new();
        conn.read_to_string(&mut text).unwrap();
        text.split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("not an HTTP answer: {text}"))
    }

    /// Requests the sim is running now.
    pub fn running(&self) -> u64 {
        self.gauge("vllm:num_requests_running") as u64
    }
}

impl Drop for SimProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `gpu-feeder run` child process; killed (SIGKILL) on drop unless it exited.
pub struct DaemonProcess {
    pub child: std::process::Child,
    pub log: PathBuf,
}

impl DaemonProcess {
    /// Starts `gpu-feeder --config <scratch>/feeder.toml run`, logging to `<scratch>/<name>.log`.
    pub fn start(s: &Scratch, name: &str) -> DaemonProcess {
        let log = s.path().join(format!("{name}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(bin())
            .arg("--config")
            .arg(s.config())
            .args(["--log-format", "human", "run"])
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(file)
            .spawn()
            .expect("start the daemon");
        DaemonProcess { child, log }
    }

    /// `start`, then waits up to `limit` until each instance in `ready`
    /// reports `ready`.
    pub fn start_ready(
        s: &Scratch,
        name: &str,
        ready: &[&str],
        limit: std::time::Duration,
    ) -> DaemonProcess {
        let d = DaemonProcess::start(s, name);
        let start = std::time::Instant::now();
        while !ready.iter().all(|i| s.instance_is(i, "ready")) {
            if start.elapsed() > limit {
                panic!(
                    "timed out after {limit:?} waiting until {ready:?} ready ({name}); instances: {}\n--- daemon log ---\n{}",
                    s.instances().map(|v| v.to_string()).unwrap_or_default(),
                    d.log()
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        d
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, as a crash.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM.
    pub fn term(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -TERM failed");
    }

    /// Waits for the exit status, up to `limit`.
    pub fn wait_exit(&mut self, limit: std::time::Duration) -> Option<i32> {
        let start = std::time::Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            if start.elapsed() > limit {
                return None;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.kill9();
        }
    }
}

/// An `[[instances]]` table for an external server.
pub fn external(name: &str, model: &str, url: &str) -> String {
    format!(
        "[[instances]]\nname = \"{name}\"\nmodel_type = \"{model}\"\nbackend = \"external\"\nurl = \"{url}\"\nserved_model_name = \"sim\"\nmax_tokens = 32\n\n"
    )
}

impl Scratch {
    /// Counts per status over both models, from `stats --json`.
    pub fn counts(&self) -> std::collections::HashMap<String, u64> {
        let stats = self.json(&["stats", "--json"]);
        let mut out = std::collections::HashMap::new();
        for model in stats["jobs"].as_object().unwrap().values() {
            for (k, v) in model.as_object().unwrap() {
                *out.entry(k.clone()).or_insert(0) += v.as_u64().unwrap();
            }
        }
        out
    }

    pub fn count(&self, status: &str) -> u64 {
        self.counts().get(status).copied().unwrap_or(0)
    }

    /// Every job, from `list --json`.
    pub fn jobs(&self) -> Vec<serde_json::Value> {
        self.json(&["list", "--limit", "1000000", "--json"])["jobs"]
            .as_array()
            .unwrap()
            .clone()
    }
}

/// Runs `sqlite3 DB` with `sql` on its standard input; returns stdout.
/// It waits up to ten seconds for a lock the daemon holds, as any
/// well-behaved writer does, rather than failing with "database is locked".
pub fn sqlite3(db: &Path, sql: &str) -> String {
    let out = pipe(
        Command::new("sqlite3")
            .args(["-cmd", ".timeout 10000"])
            .arg(db),
        sql,
        "the sqlite3 CLI (scripts/test.sh installs it)",
    );
    assert!(
        out.status.success(),
        "sqlite3 failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Now, in unix seconds (as `status --json` gives times).
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Scratch {
    /// Queues `n` prompts for `model` in one transaction (`submit --jsonl`).
    pub fn submit_prompts(&self, model: &str, tag: &str, n: usize) {
        let f = self.path().join(format!("{model}-{tag}.jsonl"));
        let lines: String = (0..n)
            .map(|i| format!("{{\"prompt\": \"{tag} {i}\"}}\n"))
            .collect();
        std::fs::write(&f, lines).unwrap();
        let r = self.run(&["submit", "--model", model, "--jsonl", f.to_str().unwrap()]);
        assert_eq!(r.code(), 0, "{}", r.stderr());
    }

    /// `submit --model MODEL FLAG FILE EXTRA… --json`: `file` submitted as
    /// `flag` (`--image`, `--text-file`, …) with the options `extra`; the
    /// reply.
    pub fn submit_file(
        &self,
        model: &str,
        flag: &str,
        file: &Path,
        extra: &[&str],
    ) -> serde_json::Value {
        let file = file.to_str().expect("a UTF-8 path");
        self.json(
            &[
                &["submit", "--model", model, flag, file][..],
                extra,
                &["--json"],
            ]
            .concat(),
        )
    }

    /// `submit --model MODEL FLAG FILE EXTRA…`, run whatever its outcome.
    pub fn submit_run(&self, model: &str, flag: &str, file: &Path, extra: &[&str]) -> Run {
        let file = file.to_str().expect("a UTF-8 path");
        self.run(&[&["submit", "--model", model, flag, file][..], extra].concat())
    }

    /// `instances --json` from the running daemon, or `None` if it does not answer.
    pub fn instances(&self) -> Option<serde_json::Value> {
        let r = self.run(&["instances", "--json"]);
        (r.code() == 0).then(|| serde_json::from_str(&r.stdout()).ok())?
    }

    /// One instance's entry in `instances --json`.
    pub fn instance(&self, name: &str) -> Option<serde_json::Value> {
        self.instances()?["instances"]
            .as_array()?
            .iter()
            .find(|i| i["name"] == name)
            .cloned()
    }

    /// Whether instance `name` reports `state`.
    pub fn instance_is(&self, name: &str, state: &str) -> bool {
        self.instance(name).is_some_and(|i| i["state"] == state)
    }

    /// Once instance `name` has requests in flight, kills its server with
    /// `kill`, and waits until the daemon notices and has it ready again
    /// after one restart; prints both times as a figure about `what`.
    pub fn kill_in_flight_and_time_recovery(
        &self,
        name: &str,
        limit: std::time::Duration,
        what: &str,
        kill: impl FnOnce(),
    ) {
        wait_for(&format!("{name} requests in flight"), limit, || {
            self.instance(name)
                .is_some_and(|i| i["in_flight"].as_u64() > Some(0))
        });
        let killed = std::time::Instant::now();
        kill();
        wait_for("the kill is noticed", limit, || {
            !self.instance_is(name, "ready")
        });
        let detected = killed.elapsed();
        wait_for(&format!("{name} ready again"), limit, || {
            self.instance(name)
                .is_some_and(|i| i["state"] == "ready" && i["restarts"] == 1)
        });
        let ready_again = killed.elapsed();
        eprintln!(
            "figure: {what} → detected {} ms, → ready again {} ms (2 s load)",
            detected.as_millis(),
            ready_again.as_millis()
        );
    }
}

/// Kills the model servers a test launched with the `process` backend (the
/// pid files under `dir`), since by design they outlive the daemon.
pub struct ProcessServers(pub PathBuf);

impl Drop for ProcessServers {
    fn drop(&mut self) {
        use nix::sys::signal::{killpg, Signal};
        use nix::unistd::Pid;
        for e in std::fs::read_dir(&self.0).into_iter().flatten().flatten() {
            if e.path().extension().is_some_and(|x| x == "pid") {
                if let Some(pid) = std::fs::read(e.path())
                    .ok()
                    .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                    .and_then(|v| v["pid"].as_u64())
                {
                    // Each server leads its own process group.
                    let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
                }
            }
        }
    }
}

impl Scratch {
    /// The process id of a `process` instance's server (its `container_id`).
    pub fn pid_of(&self, name: &str) -> u32 {
        let i = self.instance(name).expect("the daemon answers");
        i["container_id"]
            .as_str()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no pid for {name}: {i}"))
    }
}

/// Whether `pid` is a live process (a zombie is not).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| !s.split(") ").nth(1).unwrap_or("").starts_with('Z'))
}

/// A running process's command line, arguments joined by spaces.
pub fn cmdline(pid: impl std::fmt::Display) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(String::from_utf8_lossy(&raw).replace('\0', " "))
}

/// One variable of a running process's environment, from `/proc` (Linux).
pub fn environ(pid: impl std::fmt::Display, name: &str) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    let prefix = format!("{name}=");
    raw.split(|b| *b == 0)
        .map(String::from_utf8_lossy)
        .find_map(|kv| kv.strip_prefix(&prefix).map(String::from))
}

/// A word-level tokenizer.json knowing the words `w0` … `w{n-1}`: one token per word.
pub fn word_tokenizer(dir: &Path, n: usize) -> PathBuf {
    let mut vocab = serde_json::Map::new();
    vocab.insert("[UNK]".into(), 0.into());
    for i in 0..n {
        vocab.insert(format!("w{i}"), (i + 1).into());
    }
    let tk = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"},
    });
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, tk.to_string()).unwrap();
    path
}

/// The words `w{from}` … `w{to-1}`, one space apart.
pub fn words(from: usize, to: usize) -> String {
    (from..to)
        .map(|i| format!("w{i}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// HTTP through `curl`, shared by the tests that talk to an admin endpoint.
pub mod http;

/// How many migrations ship for `dialect` (`sqlite` or `postgres`): the
/// schema's version once they are all applied.
pub fn shipped_migrations(dialect: &str) -> usize {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("migrations")
        .join(dialect);
    std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "sql"))
        })
        .count()
}
