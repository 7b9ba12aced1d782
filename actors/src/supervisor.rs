//! `FeederSupervisor`: the root of the actor tree.
//!
//! It starts the QueueActor, the FanInActor, the InstanceSupervisor, the
//! HealthActor and the DispatchSupervisor, restarts whichever fails (one for one, with backoff
//! and an intensity limit), hands everyone the new peers after a restart,
//! and runs the graceful shutdown: stop claiming, let requests in flight
//! finish within a grace period, release the rest, commit every outcome.

use std::sync::Arc;
use std::time::Duration;

use ractor::rpc::CallResult;
use ractor::{
    Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SpawnErr,
    SupervisionEvent,
};
use tracing::{info, warn};

use crate::allocator::{
    AllocatorActor, AllocatorArgs, AllocatorMsg, AllocatorPeers, AllocatorSettings,
    AllocatorStatus, Managed, Strategy,
};
use crate::backoff::Backoff;
use crate::container::{InstanceStatus, LifecycleSettings};
use crate::dispatch::DispatchStatus;
use crate::dispatch_supervisor::{DispatchSupArgs, DispatchSupMsg, DispatchSupervisor};
use crate::fanin::{FanInActor, FanInArgs, FanInMsg};
use crate::gpu::{GpuProbe, GpuSnapshot};
use crate::gpu_monitor::{GpuMonitorActor, GpuMonitorArgs, GpuMonitorMsg, ThermalLimits};
use crate::health::{HealthActor, HealthArgs, HealthMsg, InstanceHealth};
use crate::instances::{InstanceSupArgs, InstanceSupMsg, InstanceSupervisor};
use crate::peers::Peers;
use crate::queue::{QueueActor, QueueArgs, QueueMsg};
use crate::restart::{Restart, RestartPolicy, Supervision};
use crate::results::ResultStore;
use crate::spec::InstanceSpec;
use crate::store::JobStore;
use crate::tell::tell;
use crate::time::Clock;

/// The children of the FeederSupervisor, named as logs speak of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Child {
    /// QueueActor.
    Queue,
    /// FanInActor.
    FanIn,
    /// InstanceSupervisor.
    Instances,
    /// HealthActor.
    Health,
    /// DispatchSupervisor.
    Dispatch,
    /// GpuMonitorActor.
    GpuMonitor,
    /// AllocatorActor.
    Allocator,
}

named!(Child {
    Queue = "queue actor", FanIn = "fan-in actor", Instances = "instance supervisor",
    Health = "health actor", Dispatch = "dispatch supervisor", GpuMonitor = "GPU monitor",
    Allocator = "allocator",
});

/// Messages of the FeederSupervisor.
#[derive(Debug)]
pub enum FeederMsg {
    /// Its own timer, once a child's backoff has run out: start it again.
    Restart(Restart<Child>),
    /// Graceful shutdown; replies when every outcome is committed.
    Shutdown {
        /// How long requests in flight may take to finish.
        grace: Duration,
        /// What happened.
        reply: RpcReplyPort<ShutdownReport>,
    },
    /// The whole pipeline's state.
    Status {
        /// The snapshot.
        reply: RpcReplyPort<FeederStatus>,
    },
    /// The live dispatchers, by instance.
    Dispatchers {
        /// (instance, dispatcher) pairs.
        reply: RpcReplyPort<Vec<(String, ActorRef<crate::dispatch::DispatchMsg>)>>,
    },
    /// The current peers (for callers that submit in-process).
    Peers {
        /// The peers.
        reply: RpcReplyPort<Peers>,
    },
    /// A GPU snapshot from the monitor: kept for `Status`, handed to the
    /// allocator and (hot GPUs) to the dispatchers.
    Gpu(GpuSnapshot),
    /// Pin a strategy (`Some`) or release the pin (`None`); `Err` when no
    /// allocator runs.
    Pin {
        /// The strategy.
        strategy: Option<Strategy>,
        /// The allocator's status after it.
        reply: RpcReplyPort<Result<AllocatorStatus, String>>,
    },
}

/// The current peers of a running pipeline (for callers that submit
/// in-process); `None` if the supervisor does not answer within `timeout`.
pub async fn peers(feeder: &ActorRef<FeederMsg>, timeout: Duration) -> Option<Peers> {
    match feeder
        .call(|reply| FeederMsg::Peers { reply }, Some(timeout))
        .await
    {
        Ok(CallResult::Success(p)) => Some(p),
        _ => None,
    }
}

/// A call's answer, if it came in time.
fn answer<T, E>(r: Result<CallResult<T>, E>) -> Option<T> {
    match r {
        Ok(CallResult::Success(v)) => Some(v),
        _ => None,
    }
}

/// What a graceful shutdown did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ShutdownReport {
    /// Jobs released to `pending` because their requests did not finish in the grace period.
    pub released: usize,
}

/// The pipeline's state, for `instances` and the admin endpoint.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FeederStatus {
    /// Each dispatcher.
    pub dispatch: Vec<DispatchStatus>,
    /// Each instance's probes.
    pub health: Vec<InstanceHealth>,
    /// Each instance's lifecycle, in configuration order.
    pub instances: Vec<InstanceStatus>,
    /// Restarts of the supervisor's children, by child.
    pub restarts: Vec<(String, u64, Option<String>)>,
    /// Every child runs and answered: what feeds the systemd watchdog.
    pub children_answered: bool,
    /// The latest GPU snapshot.
    pub gpus: Option<GpuSnapshot>,
    /// The allocator; `None` when it does not run (static strategy).
    pub allocator: Option<AllocatorStatus>,
}

/// Settings of the pipeline.
#[derive(Clone)]
pub struct PipelineSettings {
    /// Lease of each claim.
    pub lease: Duration,
    /// How often expired leases are reclaimed.
    pub reclaim_interval: Duration,
    /// How often to look for rows inserted by other programs.
    pub poll_interval: Duration,
    /// How often fan-in scans for due parents.
    pub fanin_scan_interval: Duration,
    /// Retry delays of failed jobs.
    pub retry: Backoff,
    /// Pauses after 429/503.
    pub overload: Backoff,
    /// Time allowed for calls between actors.
    pub call_timeout: Duration,
    /// Time between health probes.
    pub health_interval: Duration,
    /// Time allowed for one probe.
    pub health_timeout: Duration,
    /// Time allowed for a probe with a canary completion.
    pub canary_timeout: Duration,
    /// Restarts of the model servers, health thresholds, crash loops.
    pub lifecycle: LifecycleSettings,
    /// Leave the servers running when the pipeline shuts down.
    pub keep_servers_on_exit: bool,
    /// Crashes under a job that make it a poison job.
    pub poison_after: u32,
    /// Claims grouped by prefix key with this age bound; `None`: plain order.
    pub prefix_grouping: Option<Duration>,
    /// Bulk sends wait while a higher-priority request runs (see
    /// [`crate::window::PriorityHold`]); `false`: never.
    pub priority_hold: bool,
    /// Restart policy of every supervisor.
    pub restart: RestartPolicy,
    /// Share of a parent's fragments that must succeed for it to be `done`.
    pub min_success_ratio: f64,
    /// Time between GPU readings.
    pub gpu_interval: Duration,
    /// Temperature alert limits.
    pub thermal: ThermalLimits,
    /// While a GPU is hot, its instances' windows are scaled by this.
    pub thermal_window_factor: f64,
    /// The allocator's settings; `None` keeps every instance as configured.
    pub allocator: Option<AllocatorSettings>,
    /// This daemon's heartbeat on its queue; `None`: it does not register.
    pub heartbeat: Option<crate::queue::Heartbeat>,
}

impl Default for PipelineSettings {
    fn default() -> Self {
        PipelineSettings {
            lease: Duration::from_secs(300),
            reclaim_interval: Duration::from_secs(30),
            poll_interval: Duration::from_millis(200),
            fanin_scan_interval: Duration::from_secs(30),
            retry: Backoff::default(),
            overload: Backoff {
                base: Duration::from_millis(500),
                max: Duration::from_secs(30),
                factor: 2.0,
                jitter: 0.2,
            },
            call_timeout: Duration::from_secs(30),
            health_interval: Duration::from_secs(5),
            health_timeout: Duration::from_secs(5),
            canary_timeout: Duration::from_secs(120),
            lifecycle: LifecycleSettings::default(),
            keep_servers_on_exit: true,
            poison_after: 3,
            prefix_grouping: Some(Duration::from_secs(60)),
            priority_hold: true,
            restart: RestartPolicy::default(),
            min_success_ratio: 1.0,
            gpu_interval: Duration::from_secs(1),
            thermal: ThermalLimits {
                alert_c: 80,
                clear_c: 75,
            },
            thermal_window_factor: 0.5,
            allocator: None,
            heartbeat: None,
        }
    }
}

/// How the FeederSupervisor is started.
#[derive(Clone)]
pub struct FeederArgs {
    /// The job store (owned by the QueueActor).
    pub store: Arc<dyn JobStore>,
    /// Where results go.
    pub results: Arc<dyn ResultStore>,
    /// Where time comes from.
    pub clock: Arc<dyn Clock>,
    /// The model servers.
    pub instances: Vec<InstanceSpec>,
    /// This daemon's claim owner id (`<host>` or `<host>/<db>`): claims
    /// below it left by a previous run are released at start.
    pub owner: String,
    /// Timings and policies.
    pub settings: PipelineSettings,
    /// Told of every finished request (metrics), if set.
    pub observer: Option<Arc<dyn crate::dispatch::DispatchObserver>>,
    /// Reads the GPUs; `None` when they cannot be read.
    pub gpu_probe: Option<Arc<dyn GpuProbe>>,
    /// Why there is no probe (shown in status).
    pub gpu_unavailable: String,
    /// Told of every job that ends, for those waiting on one (the OpenAI
    /// API's chat completions); `None`: nobody waits.
    pub watch: Option<Arc<crate::watch::JobWatch>>,
}

/// The FeederSupervisor's state.
pub struct FeederState {
    /// How it was started.
    args: FeederArgs,
    /// The QueueActor, while it runs.
    queue: Option<ActorRef<QueueMsg>>,
    /// The FanInActor, while it runs.
    fanin: Option<ActorRef<FanInMsg>>,
    /// The HealthActor, while it runs.
    health: Option<ActorRef<HealthMsg>>,
    /// The InstanceSupervisor, while it runs.
    instances: Option<ActorRef<InstanceSupMsg>>,
    /// The DispatchSupervisor, while it runs.
    dispatch: Option<ActorRef<DispatchSupMsg>>,
    /// The GpuMonitorActor, while it runs.
    gpu_monitor: Option<ActorRef<GpuMonitorMsg>>,
    /// The AllocatorActor, while it runs (only with managed instances).
    allocator: Option<ActorRef<AllocatorMsg>>,
    /// The last GPU snapshot, for `Status`.
    gpus: Option<GpuSnapshot>,
    /// Which child each running actor is, their restarts, shutdown.
    sup: Supervision<Child>,
    /// The queue has not started yet: its first start releases a previous run's claims.
    first_queue_start: bool,
    /// The latest GPU snapshot, for launches waiting for memory.
    gpu_watch: tokio::sync::watch::Sender<Option<GpuSnapshot>>,
}

/// The root of the actor tree.
pub struct FeederSupervisor;

impl FeederState {
    fn peers(&self) -> Option<Peers> {
        Some(Peers {
            queue: self.queue.clone()?,
            fanin: self.fanin.clone()?,
            health: self.health.clone()?,
            instances: self.instances.clone()?,
        })
    }

    /// What the allocator talks to, out of the peers.
    fn allocator_peers(&self) -> Option<AllocatorPeers> {
        Some(AllocatorPeers {
            queue: self.queue.clone()?,
            instances: self.instances.clone()?,
        })
    }

    async fn spawn(
        &mut self,
        myself: &ActorRef<FeederMsg>,
        child: Child,
    ) -> Result<(), ActorProcessingErr> {
        let s = self.args.settings.clone();
        let cell = myself.get_cell();
        let id = match child {
            Child::Queue => {
                let args = QueueArgs {
                    store: self.args.store.clone(),
                    clock: self.args.clock.clone(),
                    lease: s.lease,
                    reclaim_interval: s.reclaim_interval,
                    poll_interval: s.poll_interval,
                    // Only the first start releases a previous run's claims:
                    // a restarted queue actor must not release live ones.
                    release_on_start: self.first_queue_start.then(|| self.args.owner.clone()),
                    heartbeat: s.heartbeat.clone().map(|b| (self.args.owner.clone(), b)),
                    watch: self.args.watch.clone(),
                };
                self.first_queue_start = false;
                keep(&mut self.queue, QueueActor, args, cell).await?
            }
            Child::FanIn => {
                let args = FanInArgs {
                    queue: self.queue.clone().ok_or("the queue actor is not running")?,
                    results: self.args.results.clone(),
                    scan_interval: s.fanin_scan_interval,
                    call_timeout: s.call_timeout,
                    min_success_ratio: s.min_success_ratio,
                };
                keep(&mut self.fanin, FanInActor, args, cell).await?
            }
            Child::Instances => {
                let args = InstanceSupArgs {
                    instances: self.args.instances.clone(),
                    lifecycle: s.lifecycle.clone(),
                    restart: s.restart,
                    gpu: self
                        .args
                        .gpu_probe
                        .is_some()
                        .then(|| self.gpu_watch.subscribe()),
                    turns: crate::allocator::staggered_start(&self.args.instances),
                };
                keep(&mut self.instances, InstanceSupervisor, args, cell).await?
            }
            Child::Health => {
                let args = HealthArgs {
                    sink: self
                        .instances
                        .as_ref()
                        .ok_or("the instance supervisor is not running")?
                        .get_derived(),
                    instances: self
                        .args
                        .instances
                        .iter()
                        .map(|i| (i.name.clone(), i.client.clone()))
                        .collect(),
                    interval: s.health_interval,
                    timeout: s.health_timeout,
                    canary_timeout: s.canary_timeout,
                };
                keep(&mut self.health, HealthActor, args, cell).await?
            }
            Child::Dispatch => {
                let args = DispatchSupArgs {
                    instances: self.args.instances.clone(),
                    owner: self.args.owner.clone(),
                    results: self.args.results.clone(),
                    retry: s.retry,
                    overload: s.overload,
                    crash_grace: s.health_interval * s.lifecycle.failure_threshold.max(1)
                        + s.health_timeout,
                    call_timeout: s.call_timeout,
                    restart: s.restart,
                    peers: self.peers().ok_or("peers are not all running")?,
                    observer: self.args.observer.clone(),
                    poison_after: s.poison_after,
                    prefix_grouping: s.prefix_grouping,
                    priority_hold: s.priority_hold,
                };
                keep(&mut self.dispatch, DispatchSupervisor, args, cell).await?
            }
            Child::GpuMonitor => {
                let args = GpuMonitorArgs {
                    probe: self.args.gpu_probe.clone(),
                    unavailable: self.args.gpu_unavailable.clone(),
                    interval: s.gpu_interval,
                    limits: s.thermal,
                    sink: myself.get_derived(),
                };
                keep(&mut self.gpu_monitor, GpuMonitorActor, args, cell).await?
            }
            Child::Allocator => {
                let args = AllocatorArgs {
                    settings: s.allocator.clone().ok_or("the allocator is off")?,
                    instances: self.managed(),
                    peers: self.allocator_peers().ok_or("peers are not all running")?,
                    call_timeout: s.call_timeout,
                };
                keep(&mut self.allocator, AllocatorActor, args, cell).await?
            }
        };
        self.sup.started(child, id);
        Ok(())
    }

    /// Whether `child` runs now.
    fn is_running(&self, child: Child) -> bool {
        match child {
            Child::Queue => self.queue.is_some(),
            Child::FanIn => self.fanin.is_some(),
            Child::Instances => self.instances.is_some(),
            Child::Health => self.health.is_some(),
            Child::Dispatch => self.dispatch.is_some(),
            Child::GpuMonitor => self.gpu_monitor.is_some(),
            Child::Allocator => self.allocator.is_some(),
        }
    }

    /// The instances the allocator may start and stop.
    fn managed(&self) -> Vec<Managed> {
        self.args
            .instances
            .iter()
            .filter(|i| i.runtime.is_some())
            .map(|i| Managed {
                name: i.name.clone(),
                model: i.model,
                configured: i.plan.clone(),
                sleep: i.sleep.is_some(),
                gpu_ids: i.gpu_ids.clone(),
            })
            .collect()
    }

    fn broadcast_peers(&self) {
        let Some(peers) = self.peers() else { return };
        tell(
            &peers.queue,
            "the fan-in's subscription",
            QueueMsg::SubscribeFinished(peers.fanin.get_derived()),
        );
        tell(
            &peers.fanin,
            "the new queue",
            FanInMsg::Queue(peers.queue.clone()),
        );
        tell(
            &peers.health,
            "the new instance supervisor",
            HealthMsg::Sink(peers.instances.get_derived()),
        );
        if let Some(a) = &self.allocator {
            let mine = AllocatorPeers {
                queue: peers.queue.clone(),
                instances: peers.instances.clone(),
            };
            tell(a, "the new peers", AllocatorMsg::Peers(mine));
        }
        if let Some(d) = &self.dispatch {
            tell(d, "the new peers", DispatchSupMsg::Peers(peers));
        }
    }
}

/// Starts `actor` linked to the supervisor's `cell`, keeps its reference
/// in `slot`, and answers its id.
async fn keep<A: Actor>(
    slot: &mut Option<ActorRef<A::Msg>>,
    actor: A,
    args: A::Arguments,
    cell: ActorCell,
) -> Result<ActorId, SpawnErr> {
    let (a, _) = A::spawn_linked(None, actor, args, cell).await?;
    let id = a.get_id();
    *slot = Some(a);
    Ok(id)
}

impl Actor for FeederSupervisor {
    type Msg = FeederMsg;
    type State = FeederState;
    type Arguments = FeederArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<FeederMsg>,
        args: FeederArgs,
    ) -> Result<FeederState, ActorProcessingErr> {
        let sup = Supervision::new(args.settings.restart);
        let mut state = FeederState {
            args,
            queue: None,
            fanin: None,
            health: None,
            instances: None,
            dispatch: None,
            gpu_monitor: None,
            allocator: None,
            gpus: None,
            gpu_watch: tokio::sync::watch::channel(None).0,
            sup,
            first_queue_start: true,
        };
        for child in [
            Child::Queue,
            Child::FanIn,
            Child::Instances,
            Child::Health,
            Child::Dispatch,
            Child::GpuMonitor,
        ] {
            state.spawn(&myself, child).await?;
        }
        if state.args.settings.allocator.is_some() && !state.managed().is_empty() {
            state.spawn(&myself, Child::Allocator).await?;
        }
        state.broadcast_peers();
        Ok(state)
    }

    async fn post_stop(
        &self,
        myself: ActorRef<FeederMsg>,
        _state: &mut FeederState,
    ) -> Result<(), ActorProcessingErr> {
        myself.stop_children(None);
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<FeederMsg>,
        msg: FeederMsg,
        state: &mut FeederState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            FeederMsg::Restart(r) => {
                let child = r.slot();
                if state.sup.stopping() || state.is_running(child) {
                    return Ok(());
                }
                if let Err(e) = state.spawn(&myself, child).await {
                    let what = format!("the {child}");
                    state
                        .sup
                        .respawn_failed(&myself, child, &what, &e, FeederMsg::Restart);
                    return Ok(());
                }
                info!("{child} restarted");
                state.broadcast_peers();
            }
            FeederMsg::Shutdown { grace, reply } => {
                state.sup.stop();
                let mut report = ShutdownReport::default();
                if let Some(d) = &state.dispatch {
                    info!(
                        "shutting down: no new claims; waiting up to {} s for requests in flight",
                        grace.as_secs()
                    );
                    match d
                        .call(
                            |r| DispatchSupMsg::Drain { grace, reply: r },
                            Some(grace + Duration::from_secs(10)),
                        )
                        .await
                    {
                        Ok(CallResult::Success(n)) => report.released = n,
                        other => warn!("the dispatchers did not drain cleanly: {other:?}"),
                    }
                }
                if let Some(q) = &state.queue {
                    let _ = q
                        .call(
                            |r| QueueMsg::Flush { reply: r },
                            Some(Duration::from_secs(30)),
                        )
                        .await;
                }
                if let Some(i) = &state.instances {
                    let stop_servers = !state.args.settings.keep_servers_on_exit;
                    let grace = state.args.settings.lifecycle.stop_grace;
                    let _ = i
                        .call(
                            |r| InstanceSupMsg::Shutdown {
                                stop_servers,
                                reply: r,
                            },
                            Some(grace + Duration::from_secs(30)),
                        )
                        .await;
                }
                let _ = reply.send(report);
            }
            FeederMsg::Status { reply } => {
                // Gathered in a task of its own: a child slow to answer
                // never stalls supervision, `/healthz` or the watchdog.
                let dispatch = state.dispatch.clone();
                let health = state.health.clone();
                let instances = state.instances.clone();
                let allocator = state.allocator.clone();
                let mut status = FeederStatus {
                    gpus: state.gpus.clone(),
                    restarts: state
                        .sup
                        .trackers()
                        .map(|(c, t)| (c.to_string(), t.total, t.last_error.clone()))
                        .collect(),
                    ..FeederStatus::default()
                };
                // Every child is running, and those asked answer in time.
                let running = state.queue.is_some()
                    && state.fanin.is_some()
                    && state.gpu_monitor.is_some()
                    && (state.allocator.is_some()
                        || state.args.settings.allocator.is_none()
                        || state.managed().is_empty());
                let expected = state.args.instances.len();
                tokio::spawn(async move {
                    let limit = Some(Duration::from_secs(5));
                    let (d, h, i, a) = tokio::join!(
                        async {
                            match &dispatch {
                                Some(d) => answer(
                                    d.call(|r| DispatchSupMsg::Status { reply: r }, limit).await,
                                ),
                                None => None,
                            }
                        },
                        async {
                            match &health {
                                Some(h) => {
                                    answer(h.call(|r| HealthMsg::Status { reply: r }, limit).await)
                                }
                                None => None,
                            }
                        },
                        async {
                            match &instances {
                                Some(i) => answer(i.call(InstanceSupMsg::Status, limit).await),
                                None => None,
                            }
                        },
                        async {
                            match &allocator {
                                Some(a) => answer(a.call(AllocatorMsg::Status, limit).await),
                                None => None,
                            }
                        },
                    );
                    let answered = [d.is_some(), h.is_some(), i.is_some()]
                        .iter()
                        .filter(|x| **x)
                        .count();
                    status.dispatch = d.unwrap_or_default();
                    status.health = h.unwrap_or_default();
                    status.instances = i.unwrap_or_default();
                    status.allocator = a;
                    status.children_answered =
                        answered == 3 && running && status.dispatch.len() == expected;
                    let _ = reply.send(status);
                });
            }
            FeederMsg::Dispatchers { reply } => {
                let mut out = Vec::new();
                if let Some(d) = &state.dispatch {
                    if let Ok(CallResult::Success(v)) = d
                        .call(
                            |r| DispatchSupMsg::Dispatchers { reply: r },
                            Some(Duration::from_secs(5)),
                        )
                        .await
                    {
                        out = v;
                    }
                }
                let _ = reply.send(out);
            }
            FeederMsg::Peers { reply } => {
                if let Some(p) = state.peers() {
                    let _ = reply.send(p);
                }
            }
            FeederMsg::Gpu(snapshot) => {
                if let Some(d) = &state.dispatch {
                    tell(
                        d,
                        "the hot GPUs",
                        DispatchSupMsg::Thermal {
                            hot: snapshot.hot.clone(),
                            factor: state.args.settings.thermal_window_factor,
                        },
                    );
                }
                if let Some(a) = &state.allocator {
                    tell(a, "a GPU snapshot", AllocatorMsg::Gpu(snapshot.clone()));
                }
                state.gpu_watch.send_replace(Some(snapshot.clone()));
                state.gpus = Some(snapshot);
            }
            FeederMsg::Pin { strategy, reply } => {
                let Some(a) = state.allocator.clone() else {
                    let _ = reply.send(Err(
                        "the allocator does not run (allocator.enabled = false, or no docker/process instance to manage): the strategy is static".into(),
                    ));
                    return Ok(());
                };
                tokio::spawn(async move {
                    let answer = a
                        .call(
                            |r| AllocatorMsg::Pin { strategy, reply: r },
                            Some(Duration::from_secs(10)),
                        )
                        .await;
                    let _ = reply.send(match answer {
                        Ok(CallResult::Success(s)) => Ok(s),
                        other => Err(format!("the allocator did not answer: {other:?}")),
                    });
                });
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<FeederMsg>,
        event: SupervisionEvent,
        state: &mut FeederState,
    ) -> Result<(), ActorProcessingErr> {
        let Some(exit) = state.sup.exited(event) else {
            return Ok(());
        };
        let child = exit.key;
        match child {
            Child::Queue => state.queue = None,
            Child::FanIn => state.fanin = None,
            Child::Instances => state.instances = None,
            Child::Health => state.health = None,
            Child::Dispatch => state.dispatch = None,
            Child::GpuMonitor => state.gpu_monitor = None,
            Child::Allocator => state.allocator = None,
        }
        if state.sup.stopping() {
            return Ok(());
        }
        let what = format!("the {child}");
        state
            .sup
            .failed(&myself, child, &what, exit.reason, "", FeederMsg::Restart);
        Ok(())
    }
}
// The GPU monitor's snapshots are kept for `Status` and handed on.
crate::heard_as!(GpuSnapshot => FeederMsg::Gpu);
