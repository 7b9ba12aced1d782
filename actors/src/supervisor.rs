//! `FeederSupervisor`: the root of the actor tree.
//!
//! It starts the QueueActor, the FanInActor, the InstanceSupervisor, the
//! HealthActor and the DispatchSupervisor, restarts whichever fails (one for one, with backoff
//! and an intensity limit), hands everyone the new `Peers` after a restart,
//! and runs the graceful shutdown: stop claiming, let requests in flight
//! finish within a grace period, release the rest, commit every outcome.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use ractor::rpc::CallResult;
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::backoff::Backoff;
use crate::container::{InstanceStatus, LifecycleSettings};
use crate::dispatch::DispatchStatus;
use crate::dispatch_supervisor::{
    DispatchSupArgs, DispatchSupMsg, DispatchSupervisor, InstanceSpec,
};
use crate::fanin::{FanInActor, FanInArgs, FanInMsg};
use crate::health::{HealthActor, HealthArgs, HealthMsg, InstanceHealth};
use crate::instances::{InstanceSupArgs, InstanceSupMsg, InstanceSupervisor};
use crate::peers::Peers;
use crate::queue::{QueueActor, QueueArgs, QueueMsg};
use crate::restart::{child_exit, RestartDecision, RestartPolicy, RestartTracker};
use crate::results::ResultStore;
use crate::store::JobStore;
use crate::time::Clock;

/// The children of the FeederSupervisor.
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
}

impl fmt::Display for Child {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Child::Queue => "queue actor",
            Child::FanIn => "fan-in actor",
            Child::Instances => "instance supervisor",
            Child::Health => "health actor",
            Child::Dispatch => "dispatch supervisor",
        })
    }
}

/// Messages of the FeederSupervisor.
#[derive(Debug)]
pub enum FeederMsg {
    /// Restart a child (after its backoff).
    Restart(Child),
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
    /// Restarts of the model servers, health thresholds, crash loops.
    pub lifecycle: LifecycleSettings,
    /// Leave the servers running when the pipeline shuts down.
    pub keep_servers_on_exit: bool,
    /// Crashes under a job that make it a poison job.
    pub poison_after: u32,
    /// Restart policy of every supervisor.
    pub restart: RestartPolicy,
    /// Share of a parent's fragments that must succeed for it to be `done`.
    pub min_success_ratio: f64,
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
            lifecycle: LifecycleSettings::default(),
            keep_servers_on_exit: true,
            poison_after: 3,
            restart: RestartPolicy::default(),
            min_success_ratio: 1.0,
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
}

/// The FeederSupervisor's state.
pub struct FeederState {
    args: FeederArgs,
    queue: Option<ActorRef<QueueMsg>>,
    fanin: Option<ActorRef<FanInMsg>>,
    health: Option<ActorRef<HealthMsg>>,
    instances: Option<ActorRef<InstanceSupMsg>>,
    dispatch: Option<ActorRef<DispatchSupMsg>>,
    ids: HashMap<ActorId, Child>,
    trackers: HashMap<Child, RestartTracker>,
    stopping: bool,
    first_queue_start: bool,
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
                };
                self.first_queue_start = false;
                let (a, _) = QueueActor::spawn_linked(None, QueueActor, args, cell).await?;
                let id = a.get_id();
                self.queue = Some(a);
                id
            }
            Child::FanIn => {
                let args = FanInArgs {
                    queue: self.queue.clone().ok_or("the queue actor is not running")?,
                    results: self.args.results.clone(),
                    scan_interval: s.fanin_scan_interval,
                    call_timeout: s.call_timeout,
                    min_success_ratio: s.min_success_ratio,
                };
                let (a, _) = FanInActor::spawn_linked(None, FanInActor, args, cell).await?;
                let id = a.get_id();
                self.fanin = Some(a);
                id
            }
            Child::Instances => {
                let args = InstanceSupArgs {
                    instances: self.args.instances.clone(),
                    lifecycle: s.lifecycle.clone(),
                    restart: s.restart,
                };
                let (a, _) =
                    InstanceSupervisor::spawn_linked(None, InstanceSupervisor, args, cell).await?;
                let id = a.get_id();
                self.instances = Some(a);
                id
            }
            Child::Health => {
                let args = HealthArgs {
                    sink: self
                        .instances
                        .clone()
                        .ok_or("the instance supervisor is not running")?,
                    instances: self
                        .args
                        .instances
                        .iter()
                        .map(|i| (i.name.clone(), i.client.clone()))
                        .collect(),
                    interval: s.health_interval,
                    timeout: s.health_timeout,
                };
                let (a, _) = HealthActor::spawn_linked(None, HealthActor, args, cell).await?;
                let id = a.get_id();
                self.health = Some(a);
                id
            }
            Child::Dispatch => {
                let args = DispatchSupArgs {
                    instances: self.args.instances.clone(),
                    owner: self.args.owner.clone(),
                    results: self.args.results.clone(),
                    retry: s.retry,
                    overload: s.overload,
                    call_timeout: s.call_timeout,
                    restart: s.restart,
                    peers: self.peers().ok_or("peers are not all running")?,
                    observer: self.args.observer.clone(),
                    poison_after: s.poison_after,
                };
                let (a, _) =
                    DispatchSupervisor::spawn_linked(None, DispatchSupervisor, args, cell).await?;
                let id = a.get_id();
                self.dispatch = Some(a);
                id
            }
        };
        self.ids.insert(id, child);
        self.trackers
            .entry(child)
            .or_default()
            .started(Instant::now());
        Ok(())
    }

    fn broadcast_peers(&self) {
        let Some(peers) = self.peers() else { return };
        let _ = peers.queue.cast(QueueMsg::Peers(peers.clone()));
        let _ = peers.fanin.cast(FanInMsg::Peers(peers.clone()));
        let _ = peers.health.cast(HealthMsg::Peers(peers.clone()));
        if let Some(d) = &self.dispatch {
            let _ = d.cast(DispatchSupMsg::Peers(peers));
        }
    }
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
        let mut state = FeederState {
            args,
            queue: None,
            fanin: None,
            health: None,
            instances: None,
            dispatch: None,
            ids: HashMap::new(),
            trackers: HashMap::new(),
            stopping: false,
            first_queue_start: true,
        };
        for child in [
            Child::Queue,
            Child::FanIn,
            Child::Instances,
            Child::Health,
            Child::Dispatch,
        ] {
            state.spawn(&myself, child).await?;
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
            FeederMsg::Restart(child) => {
                if state.stopping {
                    return Ok(());
                }
                if let Err(e) = state.spawn(&myself, child).await {
                    error!("restarting the {child} failed: {e}; stopping the feeder");
                    myself.stop(Some(format!("cannot restart the {child}: {e}")));
                    return Ok(());
                }
                info!("{child} restarted");
                state.broadcast_peers();
            }
            FeederMsg::Shutdown { grace, reply } => {
                state.stopping = true;
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
                let mut status = FeederStatus::default();
                let mut answered = 0;
                if let Some(d) = &state.dispatch {
                    if let Ok(CallResult::Success(s)) = d
                        .call(
                            |r| DispatchSupMsg::Status { reply: r },
                            Some(Duration::from_secs(5)),
                        )
                        .await
                    {
                        status.dispatch = s;
                        answered += 1;
                    }
                }
                if let Some(h) = &state.health {
                    if let Ok(CallResult::Success(s)) = h
                        .call(
                            |r| HealthMsg::Status { reply: r },
                            Some(Duration::from_secs(5)),
                        )
                        .await
                    {
                        status.health = s;
                        answered += 1;
                    }
                }
                if let Some(i) = &state.instances {
                    if let Ok(CallResult::Success(s)) = i
                        .call(InstanceSupMsg::Status, Some(Duration::from_secs(5)))
                        .await
                    {
                        status.instances = s;
                        answered += 1;
                    }
                }
                // Every child is running, and those asked answered in time.
                status.children_answered = answered == 3
                    && state.queue.is_some()
                    && state.fanin.is_some()
                    && status.dispatch.len() == state.args.instances.len();
                status.restarts = state
                    .trackers
                    .iter()
                    .map(|(c, t)| (c.to_string(), t.total, t.last_error.clone()))
                    .collect();
                let _ = reply.send(status);
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
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<FeederMsg>,
        event: SupervisionEvent,
        state: &mut FeederState,
    ) -> Result<(), ActorProcessingErr> {
        let Some((cell, reason)) = child_exit(event) else {
            return Ok(());
        };
        let Some(child) = state.ids.remove(&cell.get_id()) else {
            return Ok(());
        };
        match child {
            Child::Queue => state.queue = None,
            Child::FanIn => state.fanin = None,
            Child::Instances => state.instances = None,
            Child::Health => state.health = None,
            Child::Dispatch => state.dispatch = None,
        }
        if state.stopping {
            return Ok(());
        }
        let policy = state.args.settings.restart;
        let tracker = state.trackers.entry(child).or_default();
        match tracker.failed(&policy, Instant::now(), reason.clone()) {
            RestartDecision::RestartIn(delay) => {
                warn!(
                    "the {child} {reason}; restarting in {:.1} s",
                    delay.as_secs_f64()
                );
                myself.send_after(delay, move || FeederMsg::Restart(child));
            }
            RestartDecision::Escalate { restarts } => {
                error!(
                    "the {child} {reason}; it restarted {restarts} times within {} s: giving up, the feeder stops",
                    policy.window.as_secs()
                );
                myself.stop(Some(format!("the {child} keeps failing: {reason}")));
            }
        }
        Ok(())
    }
}
