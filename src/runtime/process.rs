//! The local-process adapter of the `ContainerRuntime` port.
//!
//! The server runs as `command… <vLLM flags>` in its own process group (so
//! a Ctrl-C meant for the daemon does not reach it, and a stop reaches every
//! process it spawned), with stdout and stderr appended to
//! `<state_dir>/<name>.log`. A pid file `<state_dir>/<name>.pid` records the
//! pid, the process's start time (so a recycled pid is never mistaken for
//! it) and the configuration hash, which is how a restarted daemon finds and
//! adopts a server it left running.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use feeder_actors::runtime::{ContainerRuntime, Exit, Found, LaunchPlan};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use crate::config::InstanceConfig;

/// How often an adopted process (not our child) is checked for having exited.
const POLL: Duration = Duration::from_millis(200);

/// How long the processes left in a dead server's group get to die of
/// SIGKILL before the exit is reported anyway.
const GROUP_GONE: Duration = Duration::from_secs(10);

/// What the pid file holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct PidFile {
    managed_by: String,
    instance: String,
    pid: u32,
    /// Field 22 of `/proc/<pid>/stat`: clock ticks since boot at its start.
    start_time: u64,
    config_hash: String,
    command: Vec<String>,
}

/// Runs one instance's server as a local process.
pub struct ProcessRuntime {
    inst: InstanceConfig,
    state_dir: PathBuf,
    /// Our own children, until `wait_exit` reaps them.
    children: Arc<Mutex<HashMap<u32, tokio::process::Child>>>,
}

impl ProcessRuntime {
    /// The adapter for `inst`, keeping its pid file and log in `state_dir`.
    pub fn new(inst: &InstanceConfig, state_dir: impl Into<PathBuf>) -> Self {
        ProcessRuntime {
            inst: inst.clone(),
            state_dir: state_dir.into(),
            children: Arc::default(),
        }
    }

    /// The pid file.
    pub fn pid_path(&self) -> PathBuf {
        self.state_dir.join(format!("{}.pid", self.inst.name))
    }

    /// The server's output.
    pub fn log_path(&self) -> PathBuf {
        self.state_dir.join(format!("{}.log", self.inst.name))
    }

    /// The full command line launched with `plan`.
    pub fn command_line(&self, plan: &LaunchPlan) -> Vec<String> {
        let mut cmd = self.inst.command.clone();
        cmd.extend(super::vllm_args(&self.inst, plan));
        cmd
    }

    fn read_pid_file(&self) -> Result<Option<PidFile>, String> {
        let path = self.pid_path();
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                format!(
                    "the pid file {} is not one gpu-feeder wrote ({e}); remove it if no server of `{}` runs",
                    path.display(),
                    self.inst.name
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        }
    }
}

/// The start time of a live (not zombie) process, from `/proc/<pid>/stat`.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state); field 22 is index 19.
    if fields.first() == Some(&"Z") || fields.first() == Some(&"X") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

fn alive(pid: u32, started: u64) -> bool {
    start_time(pid) == Some(started)
}

fn signal_group(pid: u32, sig: Signal) {
    if let Ok(p) = i32::try_from(pid) {
        let _ = killpg(Pid::from_raw(p), sig);
    }
}

/// Whether any process is left in the group that `pid` led.
fn group_alive(pid: u32) -> bool {
    i32::try_from(pid).is_ok_and(|p| killpg(Pid::from_raw(p), None).is_ok())
}

/// Kills what is left of a server's process group once its leader is gone.
///
/// vLLM's API server runs its engine in child processes (`EngineCore`, its
/// workers) that outlive a `kill -9` or a crash of the server: left alone
/// they hold the model's memory (on a GPU, the very memory the relaunch
/// needs) and compute for nobody. The group's id stays the dead leader's
/// pid, and Linux does not hand that pid to a new process while the group
/// has members, so the signal reaches only what the server started.
async fn kill_leftovers(pid: u32) {
    if !group_alive(pid) {
        return;
    }
    signal_group(pid, Signal::SIGKILL);
    let deadline = tokio::time::Instant::now() + GROUP_GONE;
    while group_alive(pid) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if group_alive(pid) {
        tracing::warn!(
            pid,
            "processes of the server's group {pid} outlived SIGKILL for {GROUP_GONE:?}"
        );
    }
}

fn describe(status: std::process::ExitStatus) -> Exit {
    match (status.code(), status.signal()) {
        (Some(code), _) => Exit {
            code: Some(code.into()),
            detail: format!("exited with code {code}"),
        },
        (None, Some(sig)) => Exit {
            code: Some(128 + i64::from(sig)),
            detail: format!("was killed by signal {sig}"),
        },
        _ => Exit {
            code: None,
            detail: "ended".into(),
        },
    }
}

fn parse_pid(id: &str) -> Result<u32, String> {
    id.parse()
        .map_err(|_| format!("`{id}` is not a process id"))
}

#[async_trait]
impl ContainerRuntime for ProcessRuntime {
    fn backend(&self) -> &'static str {
        "process"
    }

    fn config_hash(&self, plan: &LaunchPlan) -> String {
        super::config_hash(&self.inst, plan)
    }

    async fn find(&self) -> Result<Option<Found>, String> {
        let Some(pf) = self.read_pid_file()? else {
            return Ok(None);
        };
        Ok(Some(Found {
            id: pf.pid.to_string(),
            running: alive(pf.pid, pf.start_time),
            config_hash: Some(pf.config_hash),
        }))
    }

    async fn start(&self, plan: &LaunchPlan) -> Result<String, String> {
        let argv = self.command_line(plan);
        let Some((program, args)) = argv.split_first() else {
            return Err(format!(
                "instance `{}` has no command: set command = [\"vllm\", \"serve\"]",
                self.inst.name
            ));
        };
        std::fs::create_dir_all(&self.state_dir)
            .map_err(|e| format!("cannot create {}: {e}", self.state_dir.display()))?;
        let log_path = self.log_path();
        let log = std::fs::File::create(&log_path)
            .map_err(|e| format!("cannot write {}: {e}", log_path.display()))?;
        let err_log = log
            .try_clone()
            .map_err(|e| format!("cannot write {}: {e}", log_path.display()))?;
        let mut cmd = tokio::process::Command::new(program);
        if !self.inst.gpu_ids.is_empty() && !self.inst.env.contains_key("CUDA_VISIBLE_DEVICES") {
            let ids: Vec<String> = self.inst.gpu_ids.iter().map(u32::to_string).collect();
            cmd.env("CUDA_VISIBLE_DEVICES", ids.join(","));
        }
        let child = cmd
            .args(args)
            .envs(super::server_env(&self.inst))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err_log)
            .process_group(0)
            .kill_on_drop(false)
            .spawn()
            .map_err(|e| {
                format!(
                    "cannot run `{program}`: {e} (check `command` of instance `{}`: is it installed and on PATH?)",
                    self.inst.name
                )
            })?;
        let pid = child
            .id()
            .ok_or_else(|| format!("`{program}` exited at once; see {}", log_path.display()))?;
        let started = start_time(pid).unwrap_or(0);
        let pf = PidFile {
            managed_by: super::MANAGED_BY.into(),
            instance: self.inst.name.clone(),
            pid,
            start_time: started,
            config_hash: self.config_hash(plan),
            command: argv.clone(),
        };
        let tmp = self.pid_path().with_extension("pid.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&pf).expect("serializes"))
            .and_then(|()| std::fs::rename(&tmp, self.pid_path()))
            .map_err(|e| format!("cannot write {}: {e}", self.pid_path().display()))?;
        self.children
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(pid, child);
        Ok(pid.to_string())
    }

    async fn stop(&self, id: &str, grace: Duration) -> Result<(), String> {
        let pid = parse_pid(id)?;
        let Some(started) = start_time(pid) else {
            self.forget(pid);
            kill_leftovers(pid).await;
            return Ok(());
        };
        signal_group(pid, Signal::SIGTERM);
        let deadline = tokio::time::Instant::now() + grace;
        while alive(pid, started) && tokio::time::Instant::now() < deadline {
            self.reap(pid);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if alive(pid, started) {
            signal_group(pid, Signal::SIGKILL);
            while alive(pid, started) {
                self.reap(pid);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        self.forget(pid);
        kill_leftovers(pid).await;
        Ok(())
    }

    async fn wait_exit(&self, id: &str) -> Exit {
        let Ok(pid) = parse_pid(id) else {
            return Exit {
                code: None,
                detail: format!("has no process id (`{id}`)"),
            };
        };
        let child = self
            .children
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&pid);
        if let Some(mut child) = child {
            let exit = match child.wait().await {
                Ok(status) => describe(status),
                Err(e) => Exit {
                    code: None,
                    detail: format!("could not be waited for: {e}"),
                },
            };
            kill_leftovers(pid).await;
            return exit;
        }
        // Adopted from an earlier run: not our child, so poll.
        let Some(started) = start_time(pid) else {
            return Exit {
                code: None,
                detail: "is gone".into(),
            };
        };
        while alive(pid, started) {
            tokio::time::sleep(POLL).await;
        }
        kill_leftovers(pid).await;
        Exit {
            code: None,
            detail: "exited (adopted from an earlier run, so its exit code is unknown)".into(),
        }
    }

    async fn logs(&self, _id: &str, lines: usize) -> String {
        tail(&self.log_path(), lines).unwrap_or_default()
    }
}

impl ProcessRuntime {
    /// Reaps our child `pid` if it has exited and nobody waits for it.
    fn reap(&self, pid: u32) {
        if let Some(c) = self
            .children
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(&pid)
        {
            let _ = c.try_wait();
        }
    }

    fn forget(&self, pid: u32) {
        self.reap(pid);
        self.children
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&pid);
        if self
            .read_pid_file()
            .ok()
            .flatten()
            .is_some_and(|pf| pf.pid == pid)
        {
            let _ = std::fs::remove_file(self.pid_path());
        }
    }
}

/// The last `lines` lines of a file (reading at most its last 64 KiB).
pub fn tail(path: &std::path::Path, lines: usize) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    let from = len.saturating_sub(64 * 1024);
    f.seek(SeekFrom::Start(from))?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    Ok(all[all.len().saturating_sub(lines)..].join("\n"))
}
