//! The `ContainerRuntime` port: how a model server is launched, found again,
//! watched and stopped.
//!
//! One value per configured instance, holding everything the adapter needs
//! to launch that instance's server (image or program, flags, GPUs, volumes).
//! The ContainerActor decides *when* to start, adopt, restart or stop; the
//! adapters (Docker through bollard, local processes) in the `gpu-feeder`
//! crate decide *how*. Errors are plain sentences meant for the log and for
//! `gpu-feeder instances`.

use std::time::Duration;

use async_trait::async_trait;

/// The part of a launch the actors may change at run time.
#[derive(Clone, Debug, PartialEq)]
pub struct LaunchPlan {
    /// Share of GPU memory the server may take (vLLM's `--gpu-memory-utilization`).
    pub gpu_memory_utilization: f64,
}

/// A server of this instance left by an earlier run.
#[derive(Clone, Debug, PartialEq)]
pub struct Found {
    /// Container id, or process id.
    pub id: String,
    /// Whether it is running now.
    pub running: bool,
    /// The configuration hash it was launched with, if it carries one.
    pub config_hash: Option<String>,
}

/// How a server ended.
#[derive(Clone, Debug, PartialEq)]
pub struct Exit {
    /// Its exit code, when known.
    pub code: Option<i64>,
    /// What happened, in words ("exited with code 3", "killed by signal 9").
    pub detail: String,
}

/// Launches and watches one instance's server.
#[async_trait]
pub trait ContainerRuntime: Send + Sync + 'static {
    /// `docker` or `process`.
    fn backend(&self) -> &'static str;

    /// A hash of everything that shapes the server launched with `plan`:
    /// a running server with another hash is recreated, not adopted.
    fn config_hash(&self, plan: &LaunchPlan) -> String;

    /// The server an earlier run left (running or not), if any.
    async fn find(&self) -> Result<Option<Found>, String>;

    /// Launches the server with `plan`, replacing a stopped one of the same
    /// name; returns its id. The server is up, not necessarily ready.
    async fn start(&self, plan: &LaunchPlan) -> Result<String, String>;

    /// Stops the server `id`: a polite signal, then a kill after `grace`;
    /// succeeds if it is already gone.
    async fn stop(&self, id: &str, grace: Duration) -> Result<(), String>;

    /// Resolves when the server `id` has exited (at once if it is gone).
    async fn wait_exit(&self, id: &str) -> Exit;

    /// The last `lines` lines of the server's output, for error reports.
    async fn logs(&self, id: &str, lines: usize) -> String;
}
