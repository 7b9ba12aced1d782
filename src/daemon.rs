//! `gpu-feeder run`: wires the configuration to the actors and runs until
//! SIGINT or SIGTERM, then shuts down gracefully (no new claims, requests in
//! flight finish within `dispatch.shutdown_grace_s`, the rest go back to
//! `pending`).
//!
//! One daemon per database: a lock file beside it (`<db_path>.lock`) keeps a
//! second one out. Claims carry the owner id `gpu-feeder@<host>/<instance>/<n>`,
//! so a daemon restarting after a crash releases its predecessor's claims at
//! once instead of waiting for their leases.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use ractor::{Actor, ActorRef};
use tracing::{error, info, warn};

use feeder_actors::allocator::AllocatorSettings;
use feeder_actors::container::LifecycleSettings;
use feeder_actors::dispatch::DispatchObserver;
use feeder_actors::gpu::GpuProbe;
use feeder_actors::gpu_monitor::ThermalLimits;
use feeder_actors::handle::FeederHandle;
use feeder_actors::runtime::{ContainerRuntime, LaunchPlan};
use feeder_actors::spec::InstanceSpec;
use feeder_actors::supervisor::{
    FeederArgs, FeederMsg, FeederStatus, FeederSupervisor, PipelineSettings,
};
use feeder_actors::watch::JobWatch;
use feeder_actors::{Backoff, JobStore, ResultStore, SystemClock};

use crate::admin::Admin;
use crate::config::{Backend, Config};
use crate::metrics::Metrics;
use crate::openai::stream::Relays;
use crate::openai::{OpenAiClient, RequestDefaults};
use crate::runtime::process::ProcessRuntime;
use crate::systemd::Notifier;

/// The pipeline's settings from the configuration.
pub fn settings(config: &Config) -> PipelineSettings {
    let d = &config.dispatch;
    PipelineSettings {
        lease: config.queue.lease(),
        reclaim_interval: Duration::from_secs(config.queue.reclaim_interval_s),
        poll_interval: Duration::from_millis(d.external_poll_ms),
        retry: d.backoff(),
        overload: Backoff {
            base: Duration::from_millis(500),
            max: Duration::from_secs(30),
            factor: 2.0,
            jitter: 0.2,
        },
        health_interval: Duration::from_secs_f64(config.health.interval_s),
        health_timeout: Duration::from_secs_f64(config.health.timeout_s),
        canary_timeout: Duration::from_secs(config.dispatch.request_timeout_s),
        lifecycle: lifecycle(config),
        keep_servers_on_exit: config.servers.keep_servers_on_exit,
        poison_after: config.health.poison_after_crashes,
        prefix_grouping: d
            .prefix_grouping
            .then(|| Duration::from_secs_f64(d.prefix_max_wait_s)),
        priority_hold: d.priority_hold,
        min_success_ratio: config.chunk.min_success_ratio,
        gpu_interval: Duration::from_millis(config.gpu.interval_ms),
        thermal: ThermalLimits {
            alert_c: config.gpu.temp_alert_c,
            clear_c: config.gpu.temp_clear_c,
        },
        thermal_window_factor: config.gpu.thermal_window_factor,
        allocator: config.allocator.enabled.then(|| {
            let a = &config.allocator;
            AllocatorSettings {
                interval: Duration::from_secs_f64(a.interval_s),
                min_dwell: Duration::from_secs(a.min_dwell_s),
                idle_ttl: (a.idle_ttl_s > 0).then(|| Duration::from_secs(a.idle_ttl_s)),
                shared: a.shared_memory_utilization,
                solo: a.solo_memory_utilization,
            }
        }),
        heartbeat: Some(feeder_actors::queue::Heartbeat {
            interval: Duration::from_secs(config.queue.heartbeat_s),
            timeout: Duration::from_secs(config.queue.heartbeat_timeout_s),
            about: serde_json::json!({
                "host": crate::config::hostname(),
                "pid": std::process::id(),
                "version": env!("CARGO_PKG_VERSION"),
            }),
        }),
        ..PipelineSettings::default()
    }
}

/// Refuses to start when another live daemon already uses this daemon's
/// id on the queue: their claims would be taken for each other's. On this
/// host, a registration is live while its process runs, whatever its
/// heartbeat's age (a loaded machine can delay a heartbeat past its
/// timeout); one left by this host's previous run (its pid gone, or taken
/// by another program since its heartbeat stopped) is ours. From another host, only the heartbeat tells.
async fn check_unique(store: &dyn JobStore, config: &Config, owner: &str) -> anyhow::Result<()> {
    let daemons = store.daemons(feeder_actors::Timestamp::now()).await?;
    let Some(other) = daemons.iter().find(|d| d.daemon_id == owner) else {
        return Ok(());
    };
    let host = other.about["host"].as_str().unwrap_or("?");
    let pid = other.about["pid"].as_u64();
    let here = host == crate::config::hostname();
    let live = if here {
        pid.is_some_and(|p| {
            p != u64::from(std::process::id())
                && Path::new(&format!("/proc/{p}")).exists()
                && (is_feeder_process(p) || other.alive())
        })
    } else {
        other.alive()
    };
    if !live {
        return Ok(()); // A previous run of this daemon, killed or gone quiet.
    }
    anyhow::bail!(
        "another daemon is registered as {owner} on {} and alive (host {host}, pid {}, heartbeat {:.0} s ago): give each daemon its own queue.daemon_id (the default, gpu-feeder@HOSTNAME, is the same for two daemons on one host)",
        config.queue.location(),
        pid.map_or("?".to_string(), |p| p.to_string()),
        other.heartbeat_age.as_secs_f64()
    )
}

/// Whether process `pid` runs and is a gpu-feeder (not another program
/// that was given a dead daemon's pid).
fn is_feeder_process(pid: u64) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| String::from_utf8_lossy(&c).contains("gpu-feeder"))
}

/// Restarts, health thresholds and crash loops from `[health]` and `[servers]`.
pub fn lifecycle(config: &Config) -> LifecycleSettings {
    let h = &config.health;
    LifecycleSettings {
        startup_timeout: Duration::from_secs(900),
        failure_threshold: h.failure_threshold,
        restart: Backoff {
            base: Duration::from_secs_f64(h.restart_backoff_s),
            max: Duration::from_secs_f64(h.restart_backoff_max_s),
            factor: 2.0,
            jitter: 0.0,
        },
        restart_reset: Duration::from_secs_f64(h.restart_reset_s),
        crash_loop_restarts: h.crash_loop_restarts,
        crash_loop_window: Duration::from_secs_f64(h.crash_loop_window_s),
        stop_grace: Duration::from_secs_f64(config.servers.stop_grace_s),
        drain_timeout: Duration::from_secs(config.dispatch.request_timeout_s),
    }
}

/// The instances as the actors see them: an HTTP client each, and the
/// runtime that launches the server (none for `external`). Connecting to
/// the Docker engine fails here, with what to do, when it does not answer.
/// The clients stream the answers that `relays` has listeners for.
pub async fn instance_specs(
    config: &Config,
    relays: &Arc<Relays>,
) -> anyhow::Result<Vec<InstanceSpec>> {
    let roots = config.queue.roots();
    let docker = if config
        .instances
        .iter()
        .any(|i| i.backend == Backend::Docker)
    {
        let docker = crate::runtime::docker::DockerRuntime::connect(&config.servers.docker_host)
            .map_err(anyhow::Error::msg)?;
        crate::runtime::docker::ping(&docker)
            .await
            .map_err(anyhow::Error::msg)?;
        Some(docker)
    } else {
        None
    };
    let mut specs = Vec::new();
    for inst in &config.instances {
        let window = inst.window_mode(&config.dispatch);
        let client = OpenAiClient::new(
            &inst.base_url(),
            RequestDefaults::from_instance(inst, &roots),
            Duration::from_secs(config.dispatch.request_timeout_s),
            window.max() as usize * 2,
        )
        .with_relays(relays.clone());
        let runtime: Option<Arc<dyn ContainerRuntime>> = match inst.backend {
            Backend::External => None,
            Backend::Process => Some(Arc::new(ProcessRuntime::new(
                inst,
                &config.servers.state_dir,
            ))),
            Backend::Docker => Some(Arc::new(crate::runtime::docker::DockerRuntime::new(
                docker.clone().expect("connected above"),
                inst,
            ))),
        };
        specs.push(InstanceSpec {
            name: inst.name.clone(),
            model: inst.model_type,
            window,
            client: Arc::new(client),
            runtime,
            plan: LaunchPlan {
                gpu_memory_utilization: inst.gpu_memory_utilization,
            },
            startup_timeout: Duration::from_secs(inst.startup_timeout_s),
            gpu_ids: inst.gpu_ids.clone(),
            sleep: inst.sleep(crate::gpu::host_memory_available),
        });
    }
    Ok(specs)
}

/// The GPU probe the configuration asks for, or why there is none (one
/// warning at start; the daemon runs on without GPU readings).
pub fn gpu_probe(config: &Config) -> (Option<Arc<dyn GpuProbe>>, String) {
    if !config.gpu.enabled {
        return (None, "GPU monitoring is off (gpu.enabled = false)".into());
    }
    match crate::gpu::NvmlProbe::init() {
        Ok(p) => {
            info!(
                "reading the GPUs through NVML (driver {}) every {} ms",
                p.driver_version().unwrap_or_else(|| "?".into()),
                config.gpu.interval_ms
            );
            (Some(Arc::new(p)), String::new())
        }
        Err(e) => {
            warn!("{e}");
            (None, e)
        }
    }
}

/// A running pipeline.
pub struct Pipeline {
    /// The root supervisor.
    pub feeder: ActorRef<FeederMsg>,
    /// Ends when the root supervisor has stopped.
    pub join: tokio::task::JoinHandle<()>,
    /// Wakes whoever waits for a job to end.
    pub watch: Arc<JobWatch>,
    /// Who listens to streamed answers.
    pub relays: Arc<Relays>,
}

impl Pipeline {
    /// Starts the actors.
    pub async fn start(
        config: &Config,
        store: Arc<dyn JobStore>,
        results: Arc<dyn ResultStore>,
        owner: String,
        observer: Option<Arc<dyn feeder_actors::dispatch::DispatchObserver>>,
    ) -> anyhow::Result<Pipeline> {
        let (gpu_probe, gpu_unavailable) = gpu_probe(config);
        let watch = Arc::new(JobWatch::default());
        let relays = Arc::new(Relays::default());
        let args = FeederArgs {
            store,
            results,
            clock: Arc::new(SystemClock),
            instances: instance_specs(config, &relays).await?,
            owner,
            settings: settings(config),
            observer,
            gpu_probe,
            gpu_unavailable,
            watch: Some(watch.clone()),
        };
        let (feeder, join) = Actor::spawn(None, FeederSupervisor, args)
            .await
            .context("starting the actors")?;
        Ok(Pipeline {
            feeder,
            join,
            watch,
            relays,
        })
    }

    /// Graceful shutdown within `grace`; the number of jobs released.
    pub async fn shutdown(self, grace: Duration) -> usize {
        let released = drain(&self.feeder, grace).await;
        let _ = self.join.await;
        released
    }
}

/// Stops claiming, lets requests finish within `grace`, releases the rest,
/// commits every outcome and stops the actors; the number released.
pub async fn drain(feeder: &ActorRef<FeederMsg>, grace: Duration) -> usize {
    let report = FeederHandle::new(feeder.clone()).shutdown(grace).await;
    feeder.stop(None);
    match report {
        Ok(r) => r.released,
        Err(e) => {
            warn!("the shutdown did not complete cleanly: {e}");
            0
        }
    }
}

/// Holds the daemon's lock on its database.
struct DbLock {
    _file: File,
}

fn lock(db: &Path) -> anyhow::Result<DbLock> {
    let path = PathBuf::from(format!("{}.lock", db.display()));
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("creating the lock file {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(DbLock { _file: file }),
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "another gpu-feeder daemon is running on {} (it holds {}); stop it first, or give this one another queue.db_path",
            db.display(),
            path.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("locking {}", path.display()))
        }
    }
}

/// Every few seconds (or half the watchdog timeout), asks the supervisor
/// for its status: when it answers, pings the watchdog and says what is
/// happening in `STATUS=`. A supervisor that does not answer gets no ping,
/// so systemd restarts the daemon.
async fn heartbeat(
    notifier: Notifier,
    feeder: FeederHandle,
    reader: Arc<dyn JobStore>,
    config: Arc<Config>,
) {
    if !notifier.enabled() {
        return;
    }
    let every = notifier
        .watchdog_interval()
        .unwrap_or(Duration::from_secs(5))
        .min(Duration::from_secs(5));
    loop {
        let answer = feeder
            .status_within(every.max(Duration::from_millis(500)))
            .await;
        if let Ok(status) = answer {
            if status.children_answered {
                notifier.watchdog();
            } else {
                warn!("the supervisor's children did not all answer: no watchdog ping this time");
            }
            let pending = reader
                .stats(feeder_actors::Timestamp::now())
                .await
                .ok()
                .map(|s| s.models.iter().map(|(_, m)| m.counts.pending).sum::<u64>());
            notifier.status(&status_line(&config, &status, pending));
        }
        tokio::time::sleep(every).await;
    }
}

/// "vision: ready · think: loading · 1204 pending".
pub fn status_line(config: &Config, status: &FeederStatus, pending: Option<u64>) -> String {
    let mut parts: Vec<String> = config
        .instances
        .iter()
        .map(|i| {
            let s = status.instances.iter().find(|s| s.name == i.name);
            format!("{}: {}", i.name, s.map_or("starting", |s| s.state.as_str()))
        })
        .collect();
    if let Some(p) = pending {
        parts.push(format!("{p} pending"));
    }
    parts.join(" · ")
}

async fn stop_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

/// `gpu-feeder run`. Returns the exit status.
pub async fn run(config: Config, config_path: &Path) -> anyhow::Result<i32> {
    if config.instances.is_empty() {
        anyhow::bail!(crate::config::ConfigError {
            path: config_path.to_path_buf(),
            problems: vec![crate::config::Problem {
                key: "instances".into(),
                line: None,
                message: "no instance is configured, so there is nothing to run: add an [[instances]] table (see the shipped feeder.toml)".into(),
            }],
        });
    }
    config.create_state_dirs(config_path)?;
    // One daemon per SQLite file; daemons sharing a PostgreSQL queue are
    // told apart by their `queue.daemon_id` instead.
    let _lock = match config.queue.database_url {
        None => Some(lock(&config.queue.db_path)?),
        Some(_) => None,
    };
    let opened = crate::store::open(&config, crate::store::Patience::Reconnect).await?;
    let store = opened.jobs.clone();
    let owner = config.queue.owner();
    check_unique(store.as_ref(), &config, &owner).await?;
    let listener = tokio::net::TcpListener::bind(&config.admin.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on admin.listen = {} (is another daemon using it? choose another address)",
                config.admin.listen
            )
        })?;
    let admin_addr = listener.local_addr()?;
    let metrics = Arc::new(Metrics::new());
    let pipeline = Pipeline::start(
        &config,
        store.clone(),
        opened.results.clone(),
        owner.clone(),
        Some(metrics.clone() as Arc<dyn DispatchObserver>),
    )
    .await?;
    // A second connection for reads, so that `/v1/status` never waits
    // behind the queue's writes.
    let reader = crate::store::connect(&config.queue, crate::store::Patience::FailFast).await?;
    let config = Arc::new(config);
    let api = crate::api::start(
        config.clone(),
        reader.clone(),
        FeederHandle::new(pipeline.feeder.clone()),
        opened.results.clone(),
        pipeline.watch.clone(),
        pipeline.relays.clone(),
        metrics.clone(),
    )
    .await?;
    if let Some((addr, _)) = &api {
        info!("OpenAI API on http://{addr}");
    }
    let admin = Admin {
        feeder: FeederHandle::new(pipeline.feeder.clone()),
        reader: reader.clone(),
        results: opened.results.clone(),
        config: config.clone(),
        metrics,
        api: api.map(|(_, store)| store),
    };
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, crate::admin::router(admin)).await {
            error!("the admin endpoint stopped: {e}");
        }
    });
    let names: Vec<String> = config
        .instances
        .iter()
        .map(|i| format!("{} ({} at {})", i.name, i.model_type, i.base_url()))
        .collect();
    info!(
        "gpu-feeder running as {owner} on {}: {}; admin on http://{admin_addr}",
        config.queue.location(),
        names.join(", ")
    );
    let notifier = Notifier::from_env();
    notifier.ready();
    let heartbeat = tokio::spawn(heartbeat(
        notifier.clone(),
        FeederHandle::new(pipeline.feeder.clone()),
        reader,
        config.clone(),
    ));
    let Pipeline {
        feeder, mut join, ..
    } = pipeline;
    tokio::select! {
        which = stop_signal() => {
            heartbeat.abort();
            notifier.stopping();
            notifier.status("stopping: waiting for requests in flight");
            let grace = Duration::from_secs(config.dispatch.shutdown_grace_s);
            info!("{which}: shutting down (up to {} s for requests in flight; a second signal forces it)", grace.as_secs());
            tokio::select! {
                released = drain(&feeder, grace) => {
                    let _ = join.await;
                    if let Err(e) = store.sign_off(&owner).await {
                        warn!("could not sign off from the queue: {e}");
                    }
                    info!("stopped; {released} jobs released back to pending");
                    Ok(0)
                }
                which = stop_signal() => {
                    warn!("{which} again: stopping now; jobs in flight are released when the daemon next starts");
                    Ok(130)
                }
            }
        }
        _ = &mut join => {
            error!("the feeder stopped because a part of it keeps failing (see the errors above)");
            Ok(1)
        }
    }
}

#[cfg(test)]
mod watchdog_tests {
    //! The watchdog half of "Running under systemd": `WATCHDOG=1` goes to
    //! the real notification socket only while the supervisor answers and
    //! says every child answered; it is withheld while a child does not
    //! answer and while the supervisor itself is wedged. The supervisor is
    //! a stand-in here, answering as the test says; whether the real one
    //! reports a child that does not answer is tested in the actors'
    //! pipeline tests (`status_says_whether_every_child_answers`).

    use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

    use ractor::{ActorProcessingErr, RpcReplyPort};
    use tokio::net::UnixDatagram;

    use super::*;

    /// Answers, saying every child answered.
    const ALL: u8 = 0;
    /// Answers, saying a child did not.
    const NOT_ALL: u8 = 1;
    /// Takes the question and never answers (its mailbox is stuck).
    const WEDGED: u8 = 2;

    #[derive(Clone, Default)]
    struct Script {
        mode: Arc<AtomicU8>,
        asked: Arc<AtomicUsize>,
    }

    struct StandIn;

    impl Actor for StandIn {
        type Msg = FeederMsg;
        type State = (Script, Vec<RpcReplyPort<FeederStatus>>);
        type Arguments = Script;

        async fn pre_start(
            &self,
            _: ActorRef<FeederMsg>,
            script: Script,
        ) -> Result<Self::State, ActorProcessingErr> {
            Ok((script, Vec::new()))
        }

        async fn handle(
            &self,
            _: ActorRef<FeederMsg>,
            msg: FeederMsg,
            (script, held): &mut Self::State,
        ) -> Result<(), ActorProcessingErr> {
            if let FeederMsg::Status { reply } = msg {
                script.asked.fetch_add(1, Ordering::SeqCst);
                match script.mode.load(Ordering::SeqCst) {
                    WEDGED => held.push(reply),
                    mode => {
                        let _ = reply.send(FeederStatus {
                            children_answered: mode == ALL,
                            ..FeederStatus::default()
                        });
                    }
                }
            }
            Ok(())
        }
    }

    /// The next notification: each of its lines.
    async fn next(socket: &UnixDatagram) -> Vec<String> {
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(60), socket.recv(&mut buf))
            .await
            .expect("a notification within a minute")
            .unwrap();
        String::from_utf8_lossy(&buf[..n])
            .lines()
            .map(str::to_string)
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn watchdog_pings_only_while_the_supervisor_says_every_child_answered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let socket = UnixDatagram::bind(&path).unwrap();
        // No other test of this crate reads these variables.
        std::env::set_var("NOTIFY_SOCKET", &path);
        std::env::set_var("WATCHDOG_USEC", "400000");
        std::env::set_var("WATCHDOG_PID", std::process::id().to_string());
        let notifier = Notifier::from_env();
        std::env::remove_var("WATCHDOG_USEC");
        std::env::remove_var("WATCHDOG_PID");
        assert_eq!(
            notifier.watchdog_interval(),
            Some(Duration::from_millis(200))
        );

        let script = Script::default();
        let (supervisor, _) = Actor::spawn(None, StandIn, script.clone()).await.unwrap();
        let store = feeder_actors::testkit::MemoryStore::new();
        let reader: Arc<dyn JobStore> = feeder_actors::store::Blocking::port(Arc::new(store));
        let beat = tokio::spawn(heartbeat(
            notifier,
            FeederHandle::new(supervisor.clone()),
            reader,
            Arc::new(Config::default()),
        ));
        let ping = |lines: &[String]| lines.iter().any(|l| l == "WATCHDOG=1");
        let status = |lines: &[String]| lines.iter().any(|l| l.starts_with("STATUS="));

        // Healthy: pings.
        let mut pings = 0;
        while pings < 3 {
            pings += ping(&next(&socket).await) as usize;
        }

        // A child does not answer: statuses go on, pings stop. The round
        // under way when the answer changed may still ping.
        script.mode.store(NOT_ALL, Ordering::SeqCst);
        while !status(&next(&socket).await) {}
        let mut rounds = 0;
        while rounds < 3 {
            let lines = next(&socket).await;
            assert!(!ping(&lines), "a ping while a child did not answer");
            rounds += status(&lines) as usize;
        }

        // Every child answers again: pings again.
        script.mode.store(ALL, Ordering::SeqCst);
        while !ping(&next(&socket).await) {}

        // The supervisor is wedged: nothing at all. Once it has been asked
        // after the change, whatever the last answered round sent is in the
        // socket; drain it, let three more questions go unanswered, and
        // find the socket empty.
        let asked = script.asked.load(Ordering::SeqCst);
        script.mode.store(WEDGED, Ordering::SeqCst);
        while script.asked.load(Ordering::SeqCst) < asked + 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut buf = vec![0u8; 4096];
        while socket.try_recv(&mut buf).is_ok() {}
        while script.asked.load(Ordering::SeqCst) < asked + 5 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        match socket.try_recv(&mut buf) {
            Ok(n) => panic!(
                "notified while the supervisor did not answer: {}",
                String::from_utf8_lossy(&buf[..n])
            ),
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock),
        }
        beat.abort();
        supervisor.stop(None);
        std::env::remove_var("NOTIFY_SOCKET");
    }
}
