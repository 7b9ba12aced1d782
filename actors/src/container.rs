//! `ContainerActor`: one per configured model server. It launches the
//! server (or adopts the one an earlier run left, when its configuration
//! hash matches), watches it exit, turns probe outcomes from the HealthActor
//! into the instance's state, and restarts it with exponential backoff.
//!
//! ```text
//! Stopped → Starting → Loading → Ready ⇄ Unhealthy → Restarting → Starting …
//!                                  ↘ Stopping → Stopped     (crash loop) → Failed
//!                                  ↘ Sleeping → Waking → Ready   (sleep mode)
//! ```
//!
//! - Loading lasts until a probe confirms the server (health, model list and
//!   a canary completion), at most `startup_timeout`.
//! - `failure_threshold` consecutive failed probes, a server that exits, or
//!   a load that takes too long make it Unhealthy: its dispatcher is told at
//!   once (jobs in flight go back to `pending`), and a restart follows after
//!   `restart.delay(n)` — 10 s doubling to 5 min by default, starting over
//!   after `restart_reset` of good health.
//! - More than `crash_loop_restarts` restarts within `crash_loop_window`
//!   make it Failed: it is not restarted again, an error is logged, and the
//!   model's jobs simply wait in `pending`.
//! - An `external` instance (no runtime) is only probed: Loading → Ready ⇄
//!   Unhealthy, never restarted.
//! - With sleep mode (`sleep_mode = true`), parking a Ready instance puts
//!   its model to sleep instead of stopping the server: Sleeping while its
//!   dispatchers drain (their requests in flight finish, within
//!   `drain_timeout`) and while `POST /sleep` runs; anything the server
//!   still aborts comes back with no attempt counted. Unparking wakes it
//!   (Waking: `/wake_up`, and at level 2 `reload_weights` between the
//!   weights and the KV cache), and a canary completion confirms it before
//!   it is Ready. A sleep that fails stops the server instead; a wake that
//!   fails, or whose canary fails, makes it Unhealthy (a restart, cold).
//!   A server adopted asleep stays asleep while parked, or is woken.
//!
//! Every transition is logged with its reason and kept for `Status`.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, DerivedActorRef, RpcReplyPort};
use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::backoff::Backoff;
use crate::gpu::GpuSnapshot;
use crate::inference::{InferenceClient, ProbeError};
use crate::job::ModelType;
use crate::restart::{RestartDecision, RestartPolicy, RestartTracker};
use crate::runtime::{ContainerRuntime, Exit, LaunchPlan};
use crate::spec::SleepLevel;

/// Lines of server output kept with a failure.
const LOG_LINES: usize = 20;
/// Transitions kept for `Status`.
const HISTORY: usize = 32;

/// One state change, as `gpu-feeder instances` lists it.
#[derive(Clone, Debug, PartialEq)]
pub struct Transition {
    /// The state left.
    pub from: InstanceState,
    /// The state entered.
    pub to: InstanceState,
    /// Why.
    pub reason: String,
    /// When (wall clock).
    pub at: std::time::SystemTime,
    /// When (monotonic: durations between transitions are taken from it).
    pub instant: Instant,
}

/// Where an instance is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum InstanceState {
    /// Not running (before the first start, or stopped on purpose).
    Stopped,
    /// Being launched or adopted.
    Starting,
    /// Up, loading its model: not yet confirmed by a probe.
    Loading,
    /// Confirmed: receives requests.
    Ready,
    /// Failed its probes, exited, or did not load in time.
    Unhealthy,
    /// Waiting out the backoff before it is launched again.
    Restarting,
    /// Being stopped.
    Stopping,
    /// Restarted too often: left alone until an operator steps in.
    Failed,
    /// Sleep mode: draining before its sleep, or asleep (the server runs,
    /// its model is off the GPU).
    Sleeping,
    /// Sleep mode: being woken and confirmed by a canary.
    Waking,
}

impl InstanceState {
    /// The name used in logs, `instances --json` and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceState::Stopped => "stopped",
            InstanceState::Starting => "starting",
            InstanceState::Loading => "loading",
            InstanceState::Ready => "ready",
            InstanceState::Unhealthy => "unhealthy",
            InstanceState::Restarting => "restarting",
            InstanceState::Stopping => "stopping",
            InstanceState::Failed => "failed",
            InstanceState::Sleeping => "sleeping",
            InstanceState::Waking => "waking",
        }
    }

    /// Every state, in lifecycle order.
    pub const ALL: [InstanceState; 10] = [
        InstanceState::Stopped,
        InstanceState::Starting,
        InstanceState::Loading,
        InstanceState::Ready,
        InstanceState::Unhealthy,
        InstanceState::Restarting,
        InstanceState::Stopping,
        InstanceState::Failed,
        InstanceState::Sleeping,
        InstanceState::Waking,
    ];
}

impl fmt::Display for InstanceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a ContainerActor publishes to the dispatchers watching its
/// instance (each hears them as its own messages).
#[derive(Debug)]
pub enum InstanceEvent {
    /// The instance is Ready (`true`) or no longer (`false`); sent on every
    /// change and once to each new watcher.
    Ready(bool),
    /// The server went down (exited, or failed its probes) with requests
    /// in flight.
    Down {
        /// What happened, for the log.
        reason: String,
    },
    /// The server is about to be stopped on purpose: answer `idle` once
    /// nothing is in flight.
    Stopping {
        /// Answered when the last request has finished.
        idle: RpcReplyPort<()>,
    },
}

/// A message the ContainerActor sends itself; opaque outside this module.
#[derive(Debug)]
pub struct Internal(Tick);

#[derive(Debug)]
enum Tick {
    /// Launch or adopt the server.
    Start,
    /// A launch finished.
    Launched {
        /// The launch it answers.
        generation: u64,
        /// The server's id and whether it was adopted, or why it failed.
        result: Result<(String, bool), String>,
    },
    /// The server exited.
    Exited {
        /// The launch it belongs to.
        generation: u64,
        /// How.
        exit: Exit,
        /// Its last lines of output.
        log_tail: String,
    },
    /// A launch waits for memory on its GPUs, and why.
    WaitingForMemory {
        /// The launch it belongs to.
        generation: u64,
        /// What holds the memory.
        reason: String,
    },
    /// The load took too long.
    StartupTimeout {
        /// The launch it belongs to.
        generation: u64,
    },
    /// The backoff is over: launch again.
    RestartNow {
        /// The launch it belongs to.
        generation: u64,
    },
    /// A sleep finished (the drain, then `/sleep`).
    SleepDone {
        /// The sleep it answers.
        generation: u64,
        /// The level asked for.
        level: u8,
        /// Why it failed, if it did.
        result: Result<(), String>,
    },
    /// A wake finished (wake, reload, canary).
    WakeDone {
        /// The wake it answers.
        generation: u64,
        /// How long it took, or why it failed.
        result: Result<Duration, String>,
    },
    /// What an adopted server said of its sleep.
    AdoptedAsleep {
        /// The launch it belongs to.
        generation: u64,
        /// It sleeps.
        asleep: bool,
    },
    /// A stop finished.
    StopDone {
        /// The stop it answers.
        generation: u64,
        /// Why it failed, if it did.
        result: Result<(), String>,
    },
}

fn tick(t: Tick) -> ContainerMsg {
    ContainerMsg::Internal(Internal(t))
}

/// Messages of a ContainerActor.
#[derive(Debug)]
pub enum ContainerMsg {
    /// The actor's own timers and background results; only it makes them.
    Internal(Internal),
    /// A probe's outcome, from the HealthActor.
    Probed(Result<(), ProbeError>),
    /// `dispatcher` wants Ready updates and down notices.
    Watch(DerivedActorRef<InstanceEvent>),
    /// Relaunch with another plan (the allocator's memory share), draining
    /// first: the dispatcher is told the instance is not Ready, then the
    /// server is stopped and launched again. Replies once it is launching.
    Reconfigure {
        /// The new plan.
        plan: LaunchPlan,
        /// Answered when the new server is being launched.
        reply: RpcReplyPort<()>,
    },
    /// Drain and stop the server, and keep it stopped (the allocator's
    /// strategy does not run it); replies once it is stopped.
    Park(RpcReplyPort<()>),
    /// Launch a parked instance with `plan`; replies once it is launching.
    Unpark {
        /// The plan.
        plan: LaunchPlan,
        /// Answered when the launch has begun.
        reply: RpcReplyPort<()>,
    },
    /// Stop the server (when `stop_server`) or leave it running; replies when done.
    Shutdown {
        /// Stop it, or leave it for the next run to adopt.
        stop_server: bool,
        /// Answered when the server is stopped (or left).
        reply: RpcReplyPort<()>,
    },
    /// An operator asks to launch a failed (or stopped) instance again:
    /// the crash-loop count starts over. `Err` says why it was not done.
    Revive(RpcReplyPort<Result<(), String>>),
    /// A snapshot.
    Status(RpcReplyPort<InstanceStatus>),
}

/// One instance as `gpu-feeder instances` shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct InstanceStatus {
    /// The instance.
    pub name: String,
    /// Its model.
    pub model: ModelType,
    /// `docker`, `process` or `external`.
    pub backend: String,
    /// Its state.
    pub state: InstanceState,
    /// Why it is in that state.
    pub reason: String,
    /// How long it has been in that state.
    pub in_state_for: Duration,
    /// Container id or process id.
    pub container_id: Option<String>,
    /// Whether the running server was adopted from an earlier run.
    pub adopted: bool,
    /// Restarts since the daemon started.
    pub restarts: u64,
    /// The last failure, with the server's last lines of output.
    pub last_error: Option<String>,
    /// The plan it runs with (launched instances only).
    pub plan: Option<LaunchPlan>,
    /// The latest transitions, oldest first.
    pub history: Vec<Transition>,
}

/// Restart and health settings of a ContainerActor.
#[derive(Clone, Debug)]
pub struct LifecycleSettings {
    /// Time allowed from launch to Ready.
    pub startup_timeout: Duration,
    /// Consecutive failed probes that make a Ready instance Unhealthy.
    pub failure_threshold: u32,
    /// Delays before restarts (`delay(1)` is the first).
    pub restart: Backoff,
    /// Ready this long, and the restart delays start over.
    pub restart_reset: Duration,
    /// Restarts tolerated within `crash_loop_window`; one more is a crash loop.
    pub crash_loop_restarts: u32,
    /// The window of `crash_loop_restarts`.
    pub crash_loop_window: Duration,
    /// Time a server gets to stop before it is killed.
    pub stop_grace: Duration,
    /// Time requests in flight get to finish before a planned stop.
    pub drain_timeout: Duration,
}

impl Default for LifecycleSettings {
    fn default() -> Self {
        LifecycleSettings {
            startup_timeout: Duration::from_secs(900),
            failure_threshold: 3,
            restart: Backoff {
                base: Duration::from_secs(10),
                max: Duration::from_secs(300),
                factor: 2.0,
                jitter: 0.0,
            },
            restart_reset: Duration::from_secs(600),
            crash_loop_restarts: 5,
            crash_loop_window: Duration::from_secs(1800),
            stop_grace: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(600),
        }
    }
}

/// How a ContainerActor is started.
#[derive(Clone)]
pub struct ContainerArgs {
    /// The instance.
    pub name: String,
    /// Its model.
    pub model: ModelType,
    /// How its server is run; `None` for an external server.
    pub runtime: Option<Arc<dyn ContainerRuntime>>,
    /// The launch plan at start.
    pub plan: LaunchPlan,
    /// Timings and limits.
    pub settings: LifecycleSettings,
    /// Dispatchers already watching (after a restart of this actor).
    pub watchers: Vec<DerivedActorRef<InstanceEvent>>,
    /// Parked by the allocator: not launched until unparked.
    pub parked: bool,
    /// Its server, for sleep and wake calls and the wake's canary.
    pub client: Arc<dyn InferenceClient>,
    /// Sleep mode: parking puts the model to sleep; `None` stops the server.
    pub sleep: Option<SleepLevel>,
    /// The GPUs it runs on.
    pub gpu_ids: Vec<u32>,
    /// The GPU monitor's latest reading: a launch waits until its GPUs have
    /// the memory it asks for (`None`, or no readings: it does not wait).
    pub gpu: Option<tokio::sync::watch::Receiver<Option<GpuSnapshot>>>,
}

/// The ContainerActor's state.
pub struct ContainerState {
    /// How it was started (the watchers included).
    args: ContainerArgs,
    /// The lifecycle state; changed only through `set`.
    state: InstanceState,
    /// Why it is in that state.
    reason: String,
    /// When it entered that state.
    since: Instant,
    /// Counts launches and stops, so that late answers of an old one are ignored.
    generation: u64,
    /// `generation`, for launch tasks that wait: a launch no longer wanted
    /// (parked, stopped) gives up.
    live: Arc<AtomicU64>,
    /// The server (container id, or pid) of the current launch.
    id: Option<String>,
    /// That server was found running and adopted rather than launched.
    adopted: bool,
    /// Restarts since start (shown in `instances`).
    restarts: u64,
    /// Restarts in a row and within the crash-loop window: the same
    /// bookkeeping as the supervisors' (ready counts as started).
    tracker: RestartTracker,
    /// Failed probes in a row.
    failures: u32,
    /// The last probe failure while loading (a new kind is logged).
    last_probe_error: Option<ProbeError>,
    /// The last failure (exit, probes, timeout), for `instances`.
    last_error: Option<String>,
    /// Answered when a relaunch with a new plan is under way.
    pending_reconfigure: Vec<RpcReplyPort<()>>,
    /// Answered when a park (allocator) has stopped the server.
    pending_park: Vec<RpcReplyPort<()>>,
    /// Answered when the shutdown has stopped (or left) the server.
    shutdown_waiters: Vec<RpcReplyPort<()>>,
    /// The last state changes, oldest first.
    history: VecDeque<Transition>,
    /// The level its model sleeps at, once asleep (Sleeping).
    asleep: Option<u8>,
    /// Unparked with another plan while falling asleep: relaunch once asleep.
    replan: bool,
}

/// Runs one model server.
pub struct ContainerActor;

impl ContainerState {
    fn name(&self) -> &str {
        &self.args.name
    }

    fn backend(&self) -> &'static str {
        self.args
            .runtime
            .as_ref()
            .map_or("external", |r| r.backend())
    }

    fn set(&mut self, state: InstanceState, reason: impl Into<String>) {
        self.live.store(self.generation, Ordering::SeqCst);
        let reason = reason.into();
        let was = self.state;
        let instance = self.args.name.as_str();
        let msg = format!("{was} → {state}: {reason}");
        match state {
            InstanceState::Failed => error!(instance, "{msg}"),
            InstanceState::Unhealthy => warn!(instance, "{msg}"),
            _ => info!(instance, "{msg}"),
        }
        let ready_changed = (was == InstanceState::Ready) != (state == InstanceState::Ready);
        if self.history.len() == HISTORY {
            self.history.pop_front();
        }
        self.history.push_back(Transition {
            from: was,
            to: state,
            reason: reason.clone(),
            at: std::time::SystemTime::now(),
            instant: Instant::now(),
        });
        self.state = state;
        self.reason = reason;
        self.since = Instant::now();
        if state == InstanceState::Ready && was != InstanceState::Ready {
            self.tracker.started(self.since);
        }
        if ready_changed {
            let ready = state == InstanceState::Ready;
            self.args
                .watchers
                .retain(|w| w.send_message(InstanceEvent::Ready(ready)).is_ok());
        }
    }

    /// Tells the dispatchers the server went down with their requests.
    fn tell_down(&mut self, reason: &str) {
        let reason = format!("{} went down: {reason}", self.args.name);
        self.args.watchers.retain(|w| {
            w.send_message(InstanceEvent::Down {
                reason: reason.clone(),
            })
            .is_ok()
        });
    }

    fn launch(&mut self, myself: &ActorRef<ContainerMsg>) {
        let Some(runtime) = self.args.runtime.clone() else {
            self.set(
                InstanceState::Loading,
                "an external server: waiting for it to answer its probes",
            );
            return;
        };
        self.generation += 1;
        let generation = self.generation;
        self.failures = 0;
        self.last_probe_error = None;
        self.set(
            InstanceState::Starting,
            format!(
                "launching ({} backend, gpu_memory_utilization {})",
                runtime.backend(),
                self.args.plan.gpu_memory_utilization
            ),
        );
        let plan = self.args.plan.clone();
        let grace = self.args.settings.stop_grace;
        let instance = self.args.name.clone();
        let me = myself.clone();
        let gate = self.args.gpu.clone().map(|gpu| MemoryGate {
            gpu,
            gpu_ids: self.args.gpu_ids.clone(),
            share: plan.gpu_memory_utilization,
            live: self.live.clone(),
            generation,
            actor: myself.clone(),
        });
        tokio::spawn(async move {
            let result = adopt_or_start(&*runtime, &plan, grace, &instance, gate).await;
            let _ = me.cast(tick(Tick::Launched { generation, result }));
        });
    }

    fn launched(&mut self, myself: &ActorRef<ContainerMsg>, id: String, adopted: bool) {
        self.id = Some(id.clone());
        self.adopted = adopted;
        let what = if adopted {
            format!("adopted the running server {id} (configuration unchanged, model still loaded)")
        } else {
            format!("launched {id}; waiting for the model to load")
        };
        self.set(InstanceState::Loading, what);
        let generation = self.generation;
        let runtime = self
            .args
            .runtime
            .clone()
            .expect("launched servers have a runtime");
        let me = myself.clone();
        tokio::spawn(async move {
            let exit = runtime.wait_exit(&id).await;
            let log_tail = runtime.logs(&id, LOG_LINES).await;
            let _ = me.cast(tick(Tick::Exited {
                generation,
                exit,
                log_tail,
            }));
        });
        let timeout = self.args.settings.startup_timeout;
        myself.send_after(timeout, move || tick(Tick::StartupTimeout { generation }));
        if adopted && self.args.sleep.is_some() {
            // A server left asleep answers no canary: ask it.
            let client = self.args.client.clone();
            let me = myself.clone();
            tokio::spawn(async move {
                if let Ok(asleep) = client.is_sleeping().await {
                    let _ = me.cast(tick(Tick::AdoptedAsleep { generation, asleep }));
                }
            });
        }
    }

    /// The server is down or unusable: tell the dispatchers, then restart
    /// it after the backoff, or give up on a crash loop.
    fn unhealthy(&mut self, myself: &ActorRef<ContainerMsg>, reason: String) {
        let was_ready_for = (self.state == InstanceState::Ready).then(|| self.since.elapsed());
        self.last_error = Some(reason.clone());
        self.set(InstanceState::Unhealthy, reason.clone());
        self.tell_down(&reason);
        let Some(runtime) = self.args.runtime.clone() else {
            return; // External: probes bring it back.
        };
        let s = &self.args.settings;
        let policy = RestartPolicy {
            backoff: s.restart,
            max_restarts: s.crash_loop_restarts as usize,
            window: s.crash_loop_window,
            reset_after: s.restart_reset,
        };
        if was_ready_for.is_none() {
            // Only a run that became ready can have lasted.
            self.tracker.clear_start();
        }
        let decision = self.tracker.failed(&policy, Instant::now(), reason);
        self.generation += 1;
        let generation = self.generation;
        let old = self.id.take();
        let grace = s.stop_grace;
        if let RestartDecision::Escalate { restarts: n } = decision {
            let window = s.crash_loop_window.as_secs();
            self.set(
                InstanceState::Failed,
                format!(
                    "crash loop: {n} restarts within {window} s did not help; not restarting again. \
                     Its jobs wait in `pending`. Fix the cause (see last_error), then `gpu-feeder instances restart {}`",
                    self.args.name
                ),
            );
            if let Some(id) = old {
                let me = myself.clone();
                tokio::spawn(async move {
                    let result = runtime.stop(&id, grace).await;
                    let _ = me.cast(tick(Tick::StopDone { generation, result }));
                });
            }
            return;
        }
        let RestartDecision::RestartIn(delay) = decision else {
            unreachable!("escalation returned above")
        };
        self.set(
            InstanceState::Restarting,
            format!(
                "restart {} in {:.1} s",
                self.restarts + 1,
                delay.as_secs_f64()
            ),
        );
        let me = myself.clone();
        tokio::spawn(async move {
            if let Some(id) = old {
                if let Err(e) = runtime.stop(&id, grace).await {
                    warn!("stopping {id} before its restart failed: {e}");
                }
            }
            me.send_after(delay, move || tick(Tick::RestartNow { generation }));
        });
    }

    fn probed(&mut self, myself: &ActorRef<ContainerMsg>, outcome: Result<(), ProbeError>) {
        match (self.state, outcome) {
            (InstanceState::Loading | InstanceState::Unhealthy, Ok(()))
                if self.state == InstanceState::Loading || self.args.runtime.is_none() =>
            {
                self.failures = 0;
                self.last_probe_error = None;
                self.set(
                    InstanceState::Ready,
                    "the server answers and serves its model",
                );
            }
            (InstanceState::Ready, Ok(())) => self.failures = 0,
            (InstanceState::Loading, Err(e)) => {
                if self.last_probe_error.as_ref().map(std::mem::discriminant)
                    != Some(std::mem::discriminant(&e))
                {
                    info!(instance = self.name(), "still loading: {e}");
                }
                self.last_probe_error = Some(e);
            }
            (InstanceState::Ready, Err(e)) => {
                self.failures += 1;
                let threshold = self.args.settings.failure_threshold.max(1);
                if self.failures >= threshold {
                    let reason = format!("{} failed probes in a row; the last: {e}", self.failures);
                    self.unhealthy(myself, reason);
                } else {
                    warn!(
                        instance = self.name(),
                        "probe failed ({} of {threshold}): {e}", self.failures
                    );
                }
                self.last_probe_error = Some(e);
            }
            _ => {}
        }
    }

    fn status(&self) -> InstanceStatus {
        InstanceStatus {
            name: self.args.name.clone(),
            model: self.args.model,
            backend: self.backend().to_string(),
            state: self.state,
            reason: self.reason.clone(),
            in_state_for: self.since.elapsed(),
            container_id: self.id.clone(),
            adopted: self.adopted,
            restarts: self.restarts,
            last_error: self.last_error.clone(),
            plan: self.args.runtime.as_ref().map(|_| self.args.plan.clone()),
            history: self.history.iter().cloned().collect(),
        }
    }

    fn stop_server(&mut self, myself: &ActorRef<ContainerMsg>, why: &str) -> bool {
        let Some(runtime) = self.args.runtime.clone() else {
            return false;
        };
        let Some(id) = self.id.take() else {
            return false;
        };
        self.generation += 1;
        let generation = self.generation;
        self.set(InstanceState::Stopping, format!("stopping {id}: {why}"));
        let grace = self.args.settings.stop_grace;
        let drain = self.args.settings.drain_timeout;
        let watchers = self.args.watchers.clone();
        let me = myself.clone();
        tokio::spawn(async move {
            drain_watchers(watchers, drain).await;
            let result = runtime.stop(&id, grace).await;
            let _ = me.cast(tick(Tick::StopDone { generation, result }));
        });
        true
    }

    /// Sleep mode: drains the dispatchers, then puts the model to sleep;
    /// `false` when this instance does not sleep (or is not up to).
    fn sleep_server(&mut self, myself: &ActorRef<ContainerMsg>, why: &str) -> bool {
        let Some(sleep) = self.args.sleep else {
            return false;
        };
        if !matches!(self.state, InstanceState::Ready | InstanceState::Waking) || self.id.is_none()
        {
            return false;
        }
        let (level, how) = sleep.choose_now();
        self.generation += 1;
        let generation = self.generation;
        self.asleep = None;
        self.set(
            InstanceState::Sleeping,
            format!("draining, then sleep level {level} ({how}): {why}"),
        );
        let drain = self.args.settings.drain_timeout;
        let watchers = self.args.watchers.clone();
        let client = self.args.client.clone();
        let me = myself.clone();
        tokio::spawn(async move {
            drain_watchers(watchers, drain).await;
            let result = client.sleep(level).await;
            let _ = me.cast(tick(Tick::SleepDone {
                generation,
                level,
                result,
            }));
        });
        true
    }

    /// Stops the server and launches it again with the current plan.
    fn relaunch(&mut self, myself: &ActorRef<ContainerMsg>) {
        if !self.stop_server(myself, "relaunching with a new plan") {
            self.launch(myself);
        }
    }

    /// Sleep mode: wakes the model and confirms it with a canary.
    fn wake(&mut self, myself: &ActorRef<ContainerMsg>, why: &str) {
        // An adopted server's level is unknown unless configured: wake
        // as from level 2 (a reload after a level-1 sleep only costs time).
        let level = self.asleep.unwrap_or(2);
        self.generation += 1;
        let generation = self.generation;
        self.set(
            InstanceState::Waking,
            format!("waking from sleep level {level}: {why}"),
        );
        let client = self.args.client.clone();
        let me = myself.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let result = wake_server(&*client, level)
                .await
                .map(|()| started.elapsed());
            let _ = me.cast(tick(Tick::WakeDone { generation, result }));
        });
    }
}

/// Tells each dispatcher the server is about to go, and waits (up to
/// `limit` each) until its requests in flight have finished.
async fn drain_watchers(watchers: Vec<DerivedActorRef<InstanceEvent>>, limit: Duration) {
    for w in watchers {
        let (tx, rx) = ractor::concurrency::oneshot();
        if w.send_message(InstanceEvent::Stopping { idle: tx.into() })
            .is_ok()
        {
            let _ = tokio::time::timeout(limit, rx).await;
        }
    }
}

/// Wakes a sleeping model: everything at once from level 1; from level 2
/// the weights, their reload from disk (else the model answers garbage),
/// then the KV cache. A canary completion confirms it.
async fn wake_server(client: &dyn InferenceClient, level: u8) -> Result<(), String> {
    if level >= 2 {
        client.wake_up(Some("weights")).await?;
        client.reload_weights().await?;
        client.wake_up(Some("kv_cache")).await?;
    } else {
        client.wake_up(None).await?;
    }
    client
        .probe(true)
        .await
        .map_err(|e| format!("the canary completion after the wake failed: {e}"))
}

/// Adopts the server an earlier run left when it runs with this
/// configuration; otherwise stops what is there and launches anew.
async fn adopt_or_start(
    runtime: &dyn ContainerRuntime,
    plan: &LaunchPlan,
    grace: Duration,
    instance: &str,
    gate: Option<MemoryGate>,
) -> Result<(String, bool), String> {
    let want = runtime.config_hash(plan);
    match runtime.find().await? {
        Some(f) if f.running && f.config_hash.as_deref() == Some(want.as_str()) => {
            return Ok((f.id, true));
        }
        Some(f) if f.running => {
            info!(
                instance,
                "the running server {} was launched with another configuration (hash {} ≠ {want}): recreating it",
                f.id,
                f.config_hash.as_deref().unwrap_or("none"),
            );
            runtime.stop(&f.id, grace).await?;
        }
        Some(f) => info!(instance, "replacing the stopped server {}", f.id),
        None => {}
    }
    if let Some(gate) = gate {
        gate.wait(instance).await?;
    }
    runtime.start(plan).await.map(|id| (id, false))
}

/// Holds a launch until the GPUs it runs on have the memory it asks for
/// (vLLM refuses to start when a GPU's free memory is below
/// `gpu_memory_utilization` × its total), saying which processes hold it.
struct MemoryGate {
    gpu: tokio::sync::watch::Receiver<Option<GpuSnapshot>>,
    gpu_ids: Vec<u32>,
    share: f64,
    live: Arc<AtomicU64>,
    generation: u64,
    actor: ActorRef<ContainerMsg>,
}

impl MemoryGate {
    async fn wait(mut self, instance: &str) -> Result<(), String> {
        let mut said: Option<String> = None;
        // The monitor's first reading comes within a second or two of the
        // start; without one in 5 s, launch unchecked.
        if self.gpu.borrow().is_none() {
            let first = tokio::time::timeout(Duration::from_secs(5), self.gpu.changed()).await;
            if !matches!(first, Ok(Ok(()))) {
                return Ok(());
            }
        }
        loop {
            let gone = matches!(
                self.actor.get_status(),
                ractor::ActorStatus::Stopping | ractor::ActorStatus::Stopped
            );
            if gone || self.live.load(Ordering::SeqCst) != self.generation {
                return Err("no longer wanted while it waited for GPU memory".into());
            }
            let reading = self.gpu.borrow_and_update().clone();
            let Some(short) = reading.and_then(|r| memory_short(&r, &self.gpu_ids, self.share))
            else {
                return Ok(());
            };
            if said.as_deref() != Some(short.as_str()) {
                warn!(instance, "not launching yet: {short}");
                let _ = self.actor.cast(tick(Tick::WaitingForMemory {
                    generation: self.generation,
                    reason: short.clone(),
                }));
                said = Some(short);
            }
            // The next reading (every gpu.interval_ms), and at least every
            // second a look at whether the launch is still wanted.
            if let Ok(Err(_)) =
                tokio::time::timeout(Duration::from_secs(1), self.gpu.changed()).await
            {
                return Ok(()); // The monitor is gone: nothing to wait for.
            }
        }
    }
}

/// Why `gpu_ids` lack the memory a server at `share` needs, from one
/// reading; `None` when they have it, or cannot be read.
pub fn memory_short(reading: &GpuSnapshot, gpu_ids: &[u32], share: f64) -> Option<String> {
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let short: Vec<String> = gpu_ids
        .iter()
        .filter_map(|id| reading.gpus.iter().find(|g| g.index == *id))
        .filter_map(|g| {
            let need = (share * g.memory_total_bytes as f64) as u64;
            let free = g.memory_total_bytes.saturating_sub(g.memory_used_bytes);
            if free >= need {
                return None;
            }
            let holders: Vec<String> = g
                .processes
                .iter()
                .map(|p| {
                    let name = p.name.as_deref().map(|n| format!(" {n}")).unwrap_or_default();
                    format!("pid {}{name} {:.1} GiB", p.pid, gib(p.used_bytes))
                })
                .collect();
            Some(format!(
                "GPU {} has {:.1} GiB free of {:.1} GiB and gpu_memory_utilization {share} needs {:.1} GiB; held by {}",
                g.index,
                gib(free),
                gib(g.memory_total_bytes),
                gib(need),
                if holders.is_empty() {
                    "processes the driver does not list".to_string()
                } else {
                    holders.join(", ")
                }
            ))
        })
        .collect();
    (!short.is_empty()).then(|| {
        format!(
            "{}: waiting until it is freed (stop what holds it, or lower gpu_memory_utilization)",
            short.join("; ")
        )
    })
}

impl Actor for ContainerActor {
    type Msg = ContainerMsg;
    type State = ContainerState;
    type Arguments = ContainerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<ContainerMsg>,
        args: ContainerArgs,
    ) -> Result<ContainerState, ActorProcessingErr> {
        for w in &args.watchers {
            let _ = w.send_message(InstanceEvent::Ready(false));
        }
        let _ = myself.cast(tick(Tick::Start));
        Ok(ContainerState {
            args,
            state: InstanceState::Stopped,
            reason: "not started yet".into(),
            since: Instant::now(),
            generation: 0,
            live: Arc::new(AtomicU64::new(0)),
            id: None,
            adopted: false,
            restarts: 0,
            tracker: RestartTracker::default(),
            failures: 0,
            last_probe_error: None,
            last_error: None,
            pending_reconfigure: Vec::new(),
            pending_park: Vec::new(),
            shutdown_waiters: Vec::new(),
            history: VecDeque::new(),
            asleep: None,
            replan: false,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<ContainerMsg>,
        msg: ContainerMsg,
        state: &mut ContainerState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ContainerMsg::Internal(Internal(Tick::Start)) => {
                if state.state == InstanceState::Stopped {
                    if state.args.parked {
                        state.set(InstanceState::Stopped, "parked by the allocator");
                    } else {
                        state.launch(&myself);
                    }
                }
            }
            ContainerMsg::Park(reply) => {
                if state.args.runtime.is_none() {
                    let _ = reply.send(());
                    return Ok(());
                }
                state.args.parked = true;
                match state.state {
                    InstanceState::Stopping => state.pending_park.push(reply),
                    InstanceState::Stopped | InstanceState::Failed => {
                        let _ = reply.send(());
                    }
                    InstanceState::Sleeping if state.asleep.is_some() => {
                        let _ = reply.send(());
                    }
                    InstanceState::Sleeping => state.pending_park.push(reply),
                    _ => {
                        state.pending_park.push(reply);
                        if !state.sleep_server(&myself, "the allocator parks it")
                            && !state.stop_server(&myself, "the allocator parks it")
                        {
                            // Nothing runs (restarting, or still launching):
                            // stop whatever would come next.
                            state.generation += 1;
                            state.set(InstanceState::Stopped, "parked by the allocator");
                            for r in state.pending_park.drain(..) {
                                let _ = r.send(());
                            }
                        }
                    }
                }
            }
            ContainerMsg::Unpark { plan, reply } => {
                let same_plan = plan == state.args.plan;
                state.args.plan = plan;
                let was_parked = std::mem::replace(&mut state.args.parked, false);
                match state.state {
                    InstanceState::Stopped if was_parked => state.launch(&myself),
                    InstanceState::Sleeping if state.asleep.is_some() && same_plan => {
                        state.wake(&myself, "the allocator runs it again");
                    }
                    // Another memory share needs a new server.
                    InstanceState::Sleeping if state.asleep.is_some() => state.relaunch(&myself),
                    // Falling asleep: woken (or relaunched) once asleep.
                    InstanceState::Sleeping => state.replan |= !same_plan,
                    _ => {}
                }
                let _ = reply.send(());
            }
            ContainerMsg::Internal(Internal(Tick::SleepDone {
                generation,
                level,
                result,
            })) => {
                if generation != state.generation || state.state != InstanceState::Sleeping {
                    return Ok(());
                }
                match result {
                    Ok(()) => {
                        state.asleep = Some(level);
                        let kept = if level == 1 {
                            "its weights in host memory"
                        } else {
                            "its weights dropped (reloaded from disk on wake)"
                        };
                        state.set(
                            InstanceState::Sleeping,
                            format!("asleep at level {level}, {kept}; woken in seconds when its strategy runs it"),
                        );
                        for r in state.pending_park.drain(..) {
                            let _ = r.send(());
                        }
                        if !state.args.parked {
                            if std::mem::take(&mut state.replan) {
                                state.relaunch(&myself);
                            } else {
                                state.wake(&myself, "the allocator runs it again");
                            }
                        }
                    }
                    Err(e) => {
                        let reason = format!(
                            "the sleep (level {level}) failed: {e}; stopping the server instead"
                        );
                        warn!(instance = state.name(), "{reason}");
                        state.last_error = Some(reason.clone());
                        if !state.stop_server(&myself, &reason) {
                            state.set(InstanceState::Stopped, reason);
                            for r in state.pending_park.drain(..) {
                                let _ = r.send(());
                            }
                        }
                    }
                }
            }
            ContainerMsg::Internal(Internal(Tick::WakeDone { generation, result })) => {
                if generation != state.generation || state.state != InstanceState::Waking {
                    return Ok(());
                }
                state.asleep = None;
                match result {
                    Ok(took) => state.set(
                        InstanceState::Ready,
                        format!(
                            "woke in {:.1} s; a canary completion confirmed it",
                            took.as_secs_f64()
                        ),
                    ),
                    Err(e) => state.unhealthy(&myself, format!("waking failed: {e}")),
                }
            }
            ContainerMsg::Internal(Internal(Tick::AdoptedAsleep { generation, asleep })) => {
                if generation != state.generation
                    || state.state != InstanceState::Loading
                    || !asleep
                {
                    return Ok(());
                }
                state.asleep = Some(match state.args.sleep {
                    Some(SleepLevel::One) => 1,
                    _ => 2,
                });
                if state.args.parked {
                    state.set(
                        InstanceState::Sleeping,
                        "adopted asleep; woken when its strategy runs it",
                    );
                } else {
                    state.set(InstanceState::Sleeping, "adopted asleep");
                    state.wake(&myself, "adopted asleep, and its strategy runs it");
                }
            }
            ContainerMsg::Internal(Internal(Tick::Launched { generation, result })) => {
                if generation != state.generation || state.state != InstanceState::Starting {
                    return Ok(());
                }
                for r in state.pending_reconfigure.drain(..) {
                    let _ = r.send(());
                }
                match result {
                    Ok((id, adopted)) => state.launched(&myself, id, adopted),
                    Err(e) => state.unhealthy(&myself, format!("launching failed: {e}")),
                }
            }
            ContainerMsg::Internal(Internal(Tick::Exited {
                generation,
                exit,
                log_tail,
            })) => {
                if generation != state.generation {
                    return Ok(());
                }
                if state.state == InstanceState::Sleeping {
                    state.id = None;
                    state.asleep = None;
                    state.generation += 1;
                    state.set(
                        InstanceState::Stopped,
                        format!(
                            "the server {} while asleep; launched again when its strategy runs it",
                            exit.detail
                        ),
                    );
                    for r in state.pending_park.drain(..) {
                        let _ = r.send(());
                    }
                    if !state.args.parked {
                        state.launch(&myself);
                    }
                    return Ok(());
                }
                if matches!(
                    state.state,
                    InstanceState::Loading
                        | InstanceState::Ready
                        | InstanceState::Starting
                        | InstanceState::Waking
                ) {
                    let tail = log_tail.trim();
                    let reason = if tail.is_empty() {
                        format!("the server {}", exit.detail)
                    } else {
                        format!("the server {}; its last output:\n{tail}", exit.detail)
                    };
                    state.id = None;
                    state.unhealthy(&myself, reason);
                }
            }
            ContainerMsg::Probed(outcome) => state.probed(&myself, outcome),
            ContainerMsg::Internal(Internal(Tick::WaitingForMemory { generation, reason })) => {
                if generation == state.generation && state.state == InstanceState::Starting {
                    state.reason = format!("waiting for GPU memory: {reason}");
                }
            }
            ContainerMsg::Internal(Internal(Tick::StartupTimeout { generation })) => {
                if generation == state.generation && state.state == InstanceState::Loading {
                    let last = state
                        .last_probe_error
                        .as_ref()
                        .map_or("no probe answered".to_string(), |e| e.to_string());
                    let reason = format!(
                        "not ready within startup_timeout_s = {} (last probe: {last})",
                        state.args.settings.startup_timeout.as_secs()
                    );
                    state.unhealthy(&myself, reason);
                }
            }
            ContainerMsg::Internal(Internal(Tick::RestartNow { generation })) => {
                if generation == state.generation && state.state == InstanceState::Restarting {
                    state.restarts += 1;
                    state.launch(&myself);
                }
            }
            ContainerMsg::Watch(dispatcher) => {
                state
                    .args
                    .watchers
                    .retain(|w| w.get_id() != dispatcher.get_id());
                let _ = dispatcher
                    .send_message(InstanceEvent::Ready(state.state == InstanceState::Ready));
                state.args.watchers.push(dispatcher);
            }
            ContainerMsg::Reconfigure { plan, reply } => {
                if state.args.runtime.is_none() || plan == state.args.plan {
                    state.args.plan = plan;
                    let _ = reply.send(());
                    return Ok(());
                }
                info!(
                    instance = state.name(),
                    "reconfiguring: gpu_memory_utilization {} → {}",
                    state.args.plan.gpu_memory_utilization,
                    plan.gpu_memory_utilization
                );
                state.args.plan = plan;
                match state.state {
                    InstanceState::Failed | InstanceState::Stopping => {
                        let _ = reply.send(());
                    }
                    InstanceState::Restarting | InstanceState::Stopped => {
                        // The next launch uses the new plan.
                        let _ = reply.send(());
                    }
                    _ => {
                        state.pending_reconfigure.push(reply);
                        if !state.stop_server(&myself, "relaunching with a new plan") {
                            state.generation += 1;
                            state.launch(&myself);
                        }
                    }
                }
            }
            ContainerMsg::Shutdown { stop_server, reply } => {
                if !stop_server {
                    if let Some(id) = &state.id {
                        info!(
                            instance = state.name(),
                            "leaving {id} running for the next start to adopt (keep_servers_on_exit)"
                        );
                    }
                    let _ = reply.send(());
                    return Ok(());
                }
                state.pending_reconfigure.clear();
                if state.stop_server(&myself, "the daemon is stopping") {
                    state.shutdown_waiters.push(reply);
                } else {
                    state.generation += 1;
                    state.set(InstanceState::Stopped, "the daemon is stopping");
                    let _ = reply.send(());
                }
            }
            ContainerMsg::Internal(Internal(Tick::StopDone { generation, result })) => {
                if let Err(e) = &result {
                    warn!(instance = state.name(), "stopping the server failed: {e}");
                }
                if generation != state.generation {
                    return Ok(());
                }
                if !state.shutdown_waiters.is_empty() {
                    state.set(InstanceState::Stopped, "stopped with the daemon");
                    for w in state.shutdown_waiters.drain(..) {
                        let _ = w.send(());
                    }
                } else if state.state == InstanceState::Stopping {
                    if state.args.parked {
                        state.set(
                            InstanceState::Stopped,
                            "parked by the allocator (its strategy does not run this instance)",
                        );
                    } else {
                        // Stopped to relaunch with a new plan.
                        state.launch(&myself);
                    }
                    for r in state.pending_park.drain(..) {
                        let _ = r.send(());
                    }
                }
            }
            ContainerMsg::Status(reply) => {
                let _ = reply.send(state.status());
            }
            ContainerMsg::Revive(reply) => {
                let answer = match state.state {
                    _ if state.args.runtime.is_none() => Err(format!(
                        "{} is an external server: gpu-feeder does not launch it",
                        state.name()
                    )),
                    _ if state.args.parked => Err(format!(
                        "{} is parked by the allocator: pin a strategy that runs it (`gpu-feeder strategy pin …`)",
                        state.name()
                    )),
                    InstanceState::Failed | InstanceState::Stopped => {
                        state.tracker.forgive();
                        state.generation += 1;
                        state.set(InstanceState::Stopped, "an operator asked for a restart");
                        state.launch(&myself);
                        Ok(())
                    }
                    other => Err(format!(
                        "{} is {other}: only a failed or stopped instance is restarted by hand (it restarts itself otherwise)",
                        state.name()
                    )),
                };
                let _ = reply.send(answer);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::{GpuProcess, GpuReading};

    fn reading(used: u64, processes: Vec<GpuProcess>) -> GpuSnapshot {
        let mut s = GpuSnapshot::unavailable("");
        s.unavailable = None;
        s.gpus = vec![GpuReading {
            index: 0,
            name: "gpu".into(),
            uuid: String::new(),
            temperature_c: 40,
            utilization_pct: 0,
            memory_used_bytes: used,
            memory_total_bytes: 80 << 30,
            power_w: None,
            sm_clock_mhz: None,
            memory_clock_mhz: None,
            throttle_reasons: Vec::new(),
            processes,
        }];
        s
    }

    #[test]
    fn memory_short_names_the_processes_that_hold_it() {
        let held = reading(
            70 << 30,
            vec![GpuProcess {
                pid: 7,
                used_bytes: 70 << 30,
                name: Some("python3".into()),
            }],
        );
        let why = memory_short(&held, &[0], 0.4).expect("short");
        assert!(why.contains("GPU 0 has 10.0 GiB free of 80.0 GiB"), "{why}");
        assert!(why.contains("pid 7 python3 70.0 GiB"), "{why}");
        assert!(memory_short(&held, &[1], 0.4).is_none(), "GPU 1 is not read");
        assert!(memory_short(&reading(0, Vec::new()), &[0], 0.9).is_none());
        let unnamed = reading(
            70 << 30,
            vec![GpuProcess {
                pid: 8,
                used_bytes: 1 << 30,
                name: None,
            }],
        );
        let why = memory_short(&unnamed, &[0], 0.4).expect("short");
        assert!(why.contains("pid 8 1.0 GiB"), "{why}");
    }
}
