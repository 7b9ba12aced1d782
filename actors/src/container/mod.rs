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
//! - With sleep mode (`sleep_mode = true`), parking an instance puts its
//!   model to sleep instead of stopping the server; one still launching or
//!   loading finishes its load first, then sleeps (it never serves in
//!   between), so that its model is loaded once: Sleeping while its
//!   dispatchers drain (their requests in flight finish, within
//!   `drain_timeout`) and while `POST /sleep` runs; anything the server
//!   still aborts comes back with no attempt counted. Unparking wakes it
//!   (Waking: `/wake_up`, and at level 2 `reload_weights` between the
//!   weights and the KV cache), and a canary completion confirms it before
//!   it is Ready. A sleep that fails stops the server instead; a wake that
//!   fails, or whose canary fails, makes it Unhealthy (a restart, cold).
//!   A server adopted asleep stays asleep while parked, or is woken. The
//!   park is answered once the model sleeps (its memory is free then).
//! - A staggered start (`LaunchTurn`): an instance launches once those
//!   before it sleep; one started parked loads, then sleeps.
//!
//! Every transition is logged with its reason and kept for `Status`.
//!
//! Here the actor, its arguments and messages, and `handle`, which only
//! routes each message to one of its state groups:
//! - `state`: the states, `set` (every transition), the status, watchers;
//! - `launch`: launching or adopting, and the memory gate before a launch;
//! - `recovery`: probes, exits, load timeouts, restarts, crash loops;
//! - `sleep`: sleep mode's sleep and wake;
//! - `stop`: draining, parking, relaunching with a new plan, shutdown.

mod launch;
mod recovery;
mod sleep;
mod state;
mod stop;

use std::collections::VecDeque;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, DerivedActorRef, RpcReplyPort};
use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::gpu::GpuSnapshot;
use crate::inference::{InferenceClient, ProbeError};
use crate::job::ModelType;
use crate::restart::RestartTracker;
use crate::runtime::{ContainerRuntime, Exit, LaunchPlan};
use crate::spec::SleepLevel;

pub use state::{InstanceState, InstanceStatus, Transition};

/// Lines of server output kept with a failure.
const LOG_LINES: usize = 20;
/// Transitions kept for `Status`.
const HISTORY: usize = 32;

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
        /// It waits for its turn in a staggered start (those before it
        /// load and sleep), not for memory held by what runs.
        turn: bool,
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
    /// Its place in a staggered start (sleep-mode instances whose memory
    /// shares do not all fit on their GPUs at once); the default: none.
    pub turn: LaunchTurn,
}

/// A sleep-mode instance's place in a staggered start: it launches once
/// the instances before it are asleep, and says when it is asleep itself.
/// Started parked, it loads anyway and then sleeps: every model is loaded
/// once, at the start, and brought in later by a wake.
#[derive(Clone, Debug, Default)]
pub struct LaunchTurn {
    /// Said `true` (or dropped) by each instance before this one once it
    /// sleeps, or is down: the launch waits for all of them.
    pub after: Vec<tokio::sync::watch::Receiver<bool>>,
    /// Said `true` once this instance sleeps or is down, for the next ones.
    pub done: Option<Arc<tokio::sync::watch::Sender<bool>>>,
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
    /// The launch under way waits for GPU memory that what runs holds (not
    /// for its turn): parked now, it gives up rather than wait.
    short_of_memory: bool,
}

/// Runs one model server.
pub struct ContainerActor;

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
            short_of_memory: false,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<ContainerMsg>,
        msg: ContainerMsg,
        state: &mut ContainerState,
    ) -> Result<(), ActorProcessingErr> {
        let me = &myself;
        match msg {
            ContainerMsg::Internal(Internal(tick)) => match tick {
                Tick::Start => state.start(me),
                Tick::Launched { generation, result } => state.launch_done(me, generation, result),
                Tick::Exited {
                    generation,
                    exit,
                    log_tail,
                } => state.exited(me, generation, exit, log_tail),
                Tick::WaitingForMemory {
                    generation,
                    reason,
                    turn,
                } => state.waiting_for_memory(generation, reason, turn),
                Tick::StartupTimeout { generation } => state.startup_timeout(me, generation),
                Tick::RestartNow { generation } => state.restart_now(me, generation),
                Tick::SleepDone {
                    generation,
                    level,
                    result,
                } => state.sleep_done(me, generation, level, result),
                Tick::WakeDone { generation, result } => state.wake_done(me, generation, result),
                Tick::AdoptedAsleep { generation, asleep } => {
                    state.adopted_asleep(me, generation, asleep)
                }
                Tick::StopDone { generation, result } => state.stop_done(me, generation, result),
            },
            ContainerMsg::Probed(outcome) => state.probed(me, outcome),
            ContainerMsg::Watch(dispatcher) => state.watch(dispatcher),
            ContainerMsg::Reconfigure { plan, reply } => state.reconfigure(me, plan, reply),
            ContainerMsg::Park(reply) => state.park(me, reply),
            ContainerMsg::Unpark { plan, reply } => state.unpark(me, plan, reply),
            ContainerMsg::Shutdown { stop_server, reply } => state.shutdown(me, stop_server, reply),
            ContainerMsg::Revive(reply) => state.revive(me, reply),
            ContainerMsg::Status(reply) => {
                let _ = reply.send(state.status());
            }
        }
        Ok(())
    }
}
