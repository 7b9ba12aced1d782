//! `InstanceSupervisor`: one ContainerActor per configured instance,
//! restarted one for one with backoff (an actor crash never touches the
//! server it runs: the new actor adopts it). It also routes: probe outcomes
//! from the HealthActor and watch requests from the dispatchers go to the
//! right ContainerActor, and the watchers survive a ContainerActor restart.

use std::sync::Arc;
use std::time::Duration;

use ractor::rpc::CallResult;
use ractor::{
    Actor, ActorProcessingErr, ActorRef, DerivedActorRef, RpcReplyPort, SupervisionEvent,
};
use tracing::{info, warn};

use crate::container::{
    ContainerActor, ContainerArgs, ContainerMsg, InstanceEvent, InstanceState, InstanceStatus,
    LaunchTurn, LifecycleSettings,
};
use crate::health::ProbeOutcome;
use crate::inference::ProbeError;
use crate::restart::{
    child_failed, one_for_one_slots, restart_slot, slot_exited, spawn_all, OneForOne, Restart,
    RestartPolicy, Supervision,
};
use crate::runtime::LaunchPlan;
use crate::spec::InstanceSpec;
use crate::tell::{publish, tell};

/// Messages of the InstanceSupervisor.
#[derive(Debug)]
pub enum InstanceSupMsg {
    /// Its own timer, once a container actor's backoff has run out: start it again.
    Restart(Restart<usize>),
    /// A probe's outcome for `instance`.
    Probed {
        /// The instance.
        instance: String,
        /// What the probe found.
        outcome: Result<(), ProbeError>,
    },
    /// `dispatcher` wants Ready updates of `instance`.
    Watch {
        /// The instance.
        instance: String,
        /// The dispatcher, through its derived reference.
        dispatcher: DerivedActorRef<InstanceEvent>,
    },
    /// The allocator's word on `instance`: run it with `plan` (launching
    /// it if parked, relaunching it if the plan changed), or park it
    /// (`None`: drained, stopped, not restarted). Replies when stopped, or
    /// once the launch has begun.
    Allocate {
        /// The instance.
        instance: String,
        /// Its plan, or `None` to park it.
        plan: Option<LaunchPlan>,
        /// Answered when done; `Err` says what went wrong.
        reply: RpcReplyPort<Result<(), String>>,
    },
    /// An operator asks to launch `instance` again (after a crash loop).
    Revive {
        /// The instance.
        instance: String,
        /// `Err` says why it was not done.
        reply: RpcReplyPort<Result<(), String>>,
    },
    /// Every instance's status, in configuration order.
    Status(RpcReplyPort<Vec<InstanceStatus>>),
    /// Statuses just gathered, kept as the last known.
    Observed(Vec<InstanceStatus>),
    /// Stop every server (or leave them running); replies when done.
    Shutdown {
        /// Stop the servers, or leave them for the next run to adopt.
        stop_servers: bool,
        /// Answered when every instance is done.
        reply: RpcReplyPort<()>,
    },
}

/// How the InstanceSupervisor is started.
pub(crate) struct InstanceSupArgs {
    /// The instances.
    pub(crate) instances: Vec<InstanceSpec>,
    /// Restart and health settings (`startup_timeout` comes from each instance).
    pub(crate) lifecycle: LifecycleSettings,
    /// Restart policy of the ContainerActors themselves.
    pub(crate) restart: RestartPolicy,
    /// The GPU monitor's latest reading, for launches to wait for memory.
    pub(crate) gpu: Option<tokio::sync::watch::Receiver<Option<crate::gpu::GpuSnapshot>>>,
    /// The steps of each staggered start, as indices into `instances`
    /// (sleep-mode instances whose memory shares do not all fit at once).
    pub(crate) turns: Vec<Vec<Vec<usize>>>,
}

/// One instance's container actor.
struct Slot {
    /// The instance as configured.
    spec: InstanceSpec,
    /// How it is launched now (the allocator may have changed it).
    plan: LaunchPlan,
    /// The container actor, while it runs.
    actor: Option<ActorRef<ContainerMsg>>,
    /// Dispatchers to tell of its readiness, kept across restarts.
    watchers: Vec<DerivedActorRef<InstanceEvent>>,
    /// The allocator parked it: a restarted actor starts parked too.
    parked: bool,
    /// Its status when last asked, for when its actor cannot answer.
    last: Option<InstanceStatus>,
    /// Its place in a staggered start, for its first actor only (a later
    /// one adopts the server).
    turn: Option<LaunchTurn>,
}

/// The InstanceSupervisor's state.
pub(crate) struct InstanceSupState {
    /// How it was started.
    args: InstanceSupArgs,
    /// One per instance, in configuration order.
    slots: Vec<Slot>,
    /// Which slot each container actor fills, restarts, shutdown.
    sup: Supervision<usize>,
}

/// Supervises the ContainerActors.
pub(crate) struct InstanceSupervisor;

impl InstanceSupState {
    fn slot(&mut self, instance: &str) -> Option<&mut Slot> {
        self.slots.iter_mut().find(|s| s.spec.name == instance)
    }
}

impl OneForOne for InstanceSupState {
    one_for_one_slots!(InstanceSupMsg, InstanceSupMsg::Restart);

    const CHILD: &'static str = "container actor";

    async fn spawn(
        &mut self,
        myself: &ActorRef<InstanceSupMsg>,
        i: usize,
    ) -> Result<(), ActorProcessingErr> {
        let slot = &self.slots[i];
        let mut settings = self.args.lifecycle.clone();
        settings.startup_timeout = slot.spec.startup_timeout;
        let args = ContainerArgs {
            name: slot.spec.name.clone(),
            model: slot.spec.model,
            runtime: slot.spec.runtime.clone(),
            plan: slot.plan.clone(),
            settings,
            watchers: slot.watchers.clone(),
            parked: slot.parked,
            client: slot.spec.client.clone(),
            sleep: slot.spec.sleep,
            gpu_ids: slot.spec.gpu_ids.clone(),
            gpu: self.args.gpu.clone(),
            turn: self.slots[i].turn.take().unwrap_or_default(),
        };
        let (actor, _) =
            ContainerActor::spawn_linked(None, ContainerActor, args, myself.get_cell()).await?;
        self.sup.started(i, actor.get_id());
        self.slots[i].actor = Some(actor);
        Ok(())
    }
}

impl Actor for InstanceSupervisor {
    type Msg = InstanceSupMsg;
    type State = InstanceSupState;
    type Arguments = InstanceSupArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<InstanceSupMsg>,
        args: InstanceSupArgs,
    ) -> Result<InstanceSupState, ActorProcessingErr> {
        let mut slots: Vec<Slot> = args
            .instances
            .iter()
            .map(|spec| Slot {
                plan: spec.plan.clone(),
                spec: spec.clone(),
                actor: None,
                watchers: Vec::new(),
                parked: false,
                last: None,
                turn: None,
            })
            .collect();
        stagger(&mut slots, &args.turns);
        let sup = Supervision::new(args.restart);
        let mut state = InstanceSupState { args, slots, sup };
        spawn_all(&mut state, &myself).await?;
        Ok(state)
    }

    async fn post_stop(
        &self,
        myself: ActorRef<InstanceSupMsg>,
        _state: &mut InstanceSupState,
    ) -> Result<(), ActorProcessingErr> {
        myself.stop_children(None);
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<InstanceSupMsg>,
        msg: InstanceSupMsg,
        state: &mut InstanceSupState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            InstanceSupMsg::Restart(r) => restart_slot(state, &myself, r).await,
            InstanceSupMsg::Probed { instance, outcome } => {
                if let Some(a) = state.slot(&instance).and_then(|s| s.actor.as_ref()) {
                    tell(a, "a probe outcome", ContainerMsg::Probed(outcome));
                }
            }
            InstanceSupMsg::Watch {
                instance,
                dispatcher,
            } => match state.slot(&instance) {
                Some(slot) => {
                    slot.watchers.retain(|w| w.get_id() != dispatcher.get_id());
                    slot.watchers.push(dispatcher.clone());
                    match &slot.actor {
                        Some(a) => {
                            tell(a, "a dispatcher's watch", ContainerMsg::Watch(dispatcher));
                        }
                        None => {
                            publish(
                                &dispatcher,
                                "a not-ready notice",
                                InstanceEvent::Ready(false),
                            );
                        }
                    }
                }
                None => warn!(instance, "a dispatcher watches an unknown instance"),
            },
            InstanceSupMsg::Allocate {
                instance,
                plan,
                reply,
            } => {
                let Some(slot) = state.slot(&instance) else {
                    let _ = reply.send(Err(format!("no instance named `{instance}`")));
                    return Ok(());
                };
                let was_parked = slot.parked;
                slot.parked = plan.is_none();
                if let Some(p) = &plan {
                    slot.plan = p.clone();
                }
                let Some(actor) = slot.actor.clone() else {
                    // Restarting: the new actor starts as decided here.
                    let _ = reply.send(Ok(()));
                    return Ok(());
                };
                tokio::spawn(async move {
                    let answer = match plan {
                        None => {
                            actor
                                .call(ContainerMsg::Park, Some(Duration::from_secs(3_600)))
                                .await
                        }
                        Some(plan) if was_parked => {
                            actor
                                .call(
                                    |r| ContainerMsg::Unpark { plan, reply: r },
                                    Some(Duration::from_secs(60)),
                                )
                                .await
                        }
                        Some(plan) => {
                            actor
                                .call(
                                    |r| ContainerMsg::Reconfigure { plan, reply: r },
                                    Some(Duration::from_secs(3_600)),
                                )
                                .await
                        }
                    };
                    let _ = reply.send(match answer {
                        Ok(CallResult::Success(())) => Ok(()),
                        other => Err(format!(
                            "{instance} did not follow the allocation: {other:?}"
                        )),
                    });
                });
            }
            InstanceSupMsg::Revive { instance, reply } => {
                let names: Vec<String> = state.slots.iter().map(|s| s.spec.name.clone()).collect();
                let Some(slot) = state.slot(&instance) else {
                    let _ = reply.send(Err(format!(
                        "no instance named `{instance}` (configured: {})",
                        names.join(", ")
                    )));
                    return Ok(());
                };
                let Some(actor) = slot.actor.clone() else {
                    let _ = reply.send(Err(format!(
                        "{instance}: its container actor is restarting; try again in a moment"
                    )));
                    return Ok(());
                };
                tokio::spawn(async move {
                    let answer = actor
                        .call(ContainerMsg::Revive, Some(Duration::from_secs(10)))
                        .await;
                    let _ = reply.send(match answer {
                        Ok(CallResult::Success(r)) => r,
                        other => Err(format!("{instance} did not answer: {other:?}")),
                    });
                });
            }
            InstanceSupMsg::Status(reply) => {
                // Asked all at once, in a task of its own: a container
                // actor slow to answer stalls neither this supervisor nor
                // the others' answers. One that does not answer (restarting,
                // or busy) is reported as last known, marked as such.
                let asks: Vec<(Option<ActorRef<ContainerMsg>>, InstanceStatus)> = state
                    .slots
                    .iter()
                    .map(|slot| {
                        let mut known = slot.last.clone().unwrap_or(InstanceStatus {
                            name: slot.spec.name.clone(),
                            model: slot.spec.model,
                            backend: slot
                                .spec
                                .runtime
                                .as_ref()
                                .map_or("external", |r| r.backend())
                                .to_string(),
                            state: InstanceState::Stopped,
                            reason: String::new(),
                            in_state_for: Duration::ZERO,
                            container_id: None,
                            adopted: false,
                            restarts: 0,
                            last_error: None,
                            plan: None,
                            history: Vec::new(),
                        });
                        known.reason = "its container actor is restarting".into();
                        (slot.actor.clone(), known)
                    })
                    .collect();
                let me = myself.clone();
                tokio::spawn(async move {
                    let answers =
                        futures_util::future::join_all(asks.iter().map(|(actor, _)| async move {
                            match actor {
                                Some(a) => match a
                                    .call(ContainerMsg::Status, Some(Duration::from_secs(5)))
                                    .await
                                {
                                    Ok(CallResult::Success(s)) => Some(s),
                                    _ => None,
                                },
                                None => None,
                            }
                        }))
                        .await;
                    let fresh: Vec<InstanceStatus> = answers.iter().flatten().cloned().collect();
                    let out = asks
                        .into_iter()
                        .zip(answers)
                        .map(|((_, known), answer)| answer.unwrap_or(known))
                        .collect();
                    let _ = reply.send(out);
                    let _ = me.cast(InstanceSupMsg::Observed(fresh));
                });
            }
            InstanceSupMsg::Observed(fresh) => {
                for s in fresh {
                    if let Some(slot) = state.slots.iter_mut().find(|x| x.spec.name == s.name) {
                        slot.last = Some(s);
                    }
                }
            }
            InstanceSupMsg::Shutdown {
                stop_servers,
                reply,
            } => {
                state.sup.stop();
                let actors: Vec<_> = state.slots.iter().filter_map(|s| s.actor.clone()).collect();
                tokio::spawn(async move {
                    let calls = actors.into_iter().map(|a| async move {
                        let _ = a
                            .call(
                                |r| ContainerMsg::Shutdown {
                                    stop_server: stop_servers,
                                    reply: r,
                                },
                                Some(Duration::from_secs(600)),
                            )
                            .await;
                    });
                    futures_util::future::join_all(calls).await;
                    let _ = reply.send(());
                });
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<InstanceSupMsg>,
        event: SupervisionEvent,
        state: &mut InstanceSupState,
    ) -> Result<(), ActorProcessingErr> {
        let Some(exit) = slot_exited(state, event) else {
            return Ok(());
        };
        for w in &state.slots[exit.key].watchers {
            let _ = w.send_message(InstanceEvent::Ready(false));
        }
        child_failed(
            state,
            &myself,
            exit,
            " (its server is adopted by the next one)",
        );
        Ok(())
    }
}
/// Staggers the start of sleep-mode instances whose memory shares do not
/// all fit on their GPUs at once (`turns`: each group's steps, as slot
/// indices): each step launches once the step before it sleeps; every step
/// but the last starts parked, so it loads, then sleeps.
fn stagger(slots: &mut [Slot], turns: &[Vec<Vec<usize>>]) {
    for steps in turns {
        let mut before: Vec<tokio::sync::watch::Receiver<bool>> = Vec::new();
        let count = steps.len();
        for (k, step) in steps.iter().enumerate() {
            let names: Vec<&str> = step.iter().map(|&i| slots[i].spec.name.as_str()).collect();
            let then = if k + 1 < count {
                "loads, then sleeps"
            } else {
                "loads and stays awake"
            };
            info!(
                "staggered start (the memory shares on these GPUs do not all fit at once): \
                 turn {} of {count}, {} {then}",
                k + 1,
                names.join(" and ")
            );
            let mut next = Vec::new();
            for &i in step {
                let slot = &mut slots[i];
                let mut turn = LaunchTurn {
                    after: before.clone(),
                    done: None,
                };
                if k + 1 < count {
                    let (tx, rx) = tokio::sync::watch::channel(false);
                    turn.done = Some(Arc::new(tx));
                    next.push(rx);
                    slot.parked = true;
                }
                slot.turn = Some(turn);
            }
            before = next;
        }
    }
}

/// A health probe's outcome is routed to its instance's ContainerActor.
impl From<ProbeOutcome> for InstanceSupMsg {
    fn from(p: ProbeOutcome) -> Self {
        InstanceSupMsg::Probed {
            instance: p.instance,
            outcome: p.outcome,
        }
    }
}

impl TryFrom<InstanceSupMsg> for ProbeOutcome {
    type Error = InstanceSupMsg;

    fn try_from(msg: InstanceSupMsg) -> Result<Self, InstanceSupMsg> {
        match msg {
            InstanceSupMsg::Probed { instance, outcome } => Ok(ProbeOutcome { instance, outcome }),
            other => Err(other),
        }
    }
}
