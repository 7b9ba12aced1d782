//! `DispatchSupervisor`: one DispatchActor per instance, restarted one for
//! one with backoff. When a dispatcher crashes, the jobs it had in flight go
//! back to `pending` at once (its claims are released by owner id): none is
//! lost, none is failed by the crash. Too many crashes in a window escalate
//! to the FeederSupervisor.

use std::sync::Arc;
use std::time::Duration;

use ractor::rpc::CallResult;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};

use crate::backoff::Backoff;
use crate::dispatch::{DispatchActor, DispatchArgs, DispatchMsg, DispatchPeers, DispatchStatus};
use crate::peers::Peers;
use crate::queue::QueueMsg;
use crate::restart::{
    child_failed, one_for_one_slots, restart_slot, slot_exited, spawn_all, OneForOne, Restart,
    RestartPolicy, Supervision,
};
use crate::results::ResultStore;
use crate::spec::InstanceSpec;
use crate::tell::tell;

/// Messages of the DispatchSupervisor.
#[derive(Debug)]
pub(crate) enum DispatchSupMsg {
    /// Its own timer, once a dispatcher's backoff has run out: start it again.
    Restart(Restart<usize>),
    /// The current peers, passed on to every dispatcher.
    Peers(Peers),
    /// Graceful stop: no new claims; wait up to `grace` for requests in
    /// flight, then release what is left. Replies with the count released.
    Drain {
        /// How long requests may take to finish.
        grace: Duration,
        /// Jobs released because they did not finish in time.
        reply: RpcReplyPort<usize>,
    },
    /// The live dispatchers, by instance.
    Dispatchers {
        /// (instance, dispatcher) pairs.
        reply: RpcReplyPort<Vec<(String, ActorRef<DispatchMsg>)>>,
    },
    /// GPUs now too hot: the dispatchers of instances using one of them
    /// scale their window by `factor`; the others are restored.
    Thermal {
        /// The hot GPUs.
        hot: Vec<u32>,
        /// The window factor while hot.
        factor: f64,
    },
    /// Every dispatcher's status.
    Status {
        /// In instance order; instances being restarted are missing.
        reply: RpcReplyPort<Vec<DispatchStatus>>,
    },
}

/// How the DispatchSupervisor is started.
pub(crate) struct DispatchSupArgs {
    /// The instances.
    pub instances: Vec<InstanceSpec>,
    /// The daemon's owner id; each dispatcher claims as `<owner>/<instance>/<n>`.
    pub owner: String,
    /// Where results are written.
    pub results: Arc<dyn ResultStore>,
    /// Retry delays of failed jobs.
    pub retry: Backoff,
    /// Pauses after 429/503.
    pub overload: Backoff,
    /// How long a request that found no server waits for the health
    /// checks to report a crash (see [`DispatchArgs`]).
    pub crash_grace: Duration,
    /// Time allowed for calls between actors.
    pub call_timeout: Duration,
    /// Restart policy for dispatchers.
    pub restart: RestartPolicy,
    /// The peers at start.
    pub peers: Peers,
    /// Told of every finished request (metrics), if set.
    pub observer: Option<Arc<dyn crate::dispatch::DispatchObserver>>,
    /// Crashes under a job that make it a poison job.
    pub poison_after: u32,
    /// Claims grouped by prefix key with this age bound; `None`: plain order.
    pub prefix_grouping: Option<Duration>,
    /// Bulk sends wait while a higher-priority request runs; `false`: never.
    pub priority_hold: bool,
}

/// One instance's dispatcher.
struct Slot {
    /// The instance it serves.
    spec: InstanceSpec,
    /// The dispatcher, while it runs.
    actor: Option<ActorRef<DispatchMsg>>,
    /// Starts so far: each start claims under an owner name of its own.
    incarnation: u32,
    /// The thermal cap on its window, while its GPUs are hot.
    thermal: Option<f64>,
}

/// The DispatchSupervisor's state.
pub(crate) struct DispatchSupState {
    /// How it was started (with the current peers).
    args: DispatchSupArgs,
    /// One per instance, in configuration order.
    slots: Vec<Slot>,
    /// Which slot each dispatcher fills, restarts, shutdown.
    sup: Supervision<usize>,
}

/// Supervises the dispatchers.
pub(crate) struct DispatchSupervisor;

/// The peers a dispatcher talks to, of all of them.
fn dispatch_peers(peers: &Peers) -> DispatchPeers {
    DispatchPeers {
        queue: peers.queue.clone(),
        instances: peers.instances.clone(),
    }
}

impl DispatchSupState {
    fn owner_of(&self, i: usize) -> String {
        let s = &self.slots[i];
        format!("{}/{}/{}", self.args.owner, s.spec.name, s.incarnation)
    }

    /// Gives back every job `owner` holds (a dispatcher that stopped, or
    /// all of them under the daemon's owner id); says how many went back.
    async fn release_owner(&self, owner: String) -> String {
        let released = self
            .args
            .peers
            .queue
            .call(
                |reply| QueueMsg::ReleaseOwner { owner, reply },
                Some(self.args.call_timeout),
            )
            .await;
        match released {
            Ok(CallResult::Success(Ok(n))) => n.to_string(),
            other => format!("none ({other:?}; they return when their leases expire)"),
        }
    }
}

impl OneForOne for DispatchSupState {
    one_for_one_slots!(DispatchSupMsg, DispatchSupMsg::Restart);

    const CHILD: &'static str = "dispatcher";

    async fn spawn(
        &mut self,
        myself: &ActorRef<DispatchSupMsg>,
        i: usize,
    ) -> Result<(), ActorProcessingErr> {
        self.slots[i].incarnation += 1;
        let owner = self.owner_of(i);
        let spec = self.slots[i].spec.clone();
        let args = DispatchArgs {
            instance: spec.name.clone(),
            model: spec.model,
            owner,
            window: spec.window,
            client: spec.client.clone(),
            results: self.args.results.clone(),
            retry: self.args.retry,
            overload: self.args.overload,
            crash_grace: self.args.crash_grace,
            call_timeout: self.args.call_timeout,
            peers: dispatch_peers(&self.args.peers),
            observer: self.args.observer.clone(),
            poison_after: self.args.poison_after,
            prefix_grouping: self.args.prefix_grouping,
            priority_hold: self.args.priority_hold,
        };
        let (actor, _) =
            DispatchActor::spawn_linked(None, DispatchActor, args, myself.get_cell()).await?;
        self.sup.started(i, actor.get_id());
        if let Some(f) = self.slots[i].thermal {
            tell(&actor, "a thermal cap", DispatchMsg::Thermal(Some(f)));
        }
        self.slots[i].actor = Some(actor);
        Ok(())
    }
}

impl Actor for DispatchSupervisor {
    type Msg = DispatchSupMsg;
    type State = DispatchSupState;
    type Arguments = DispatchSupArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<DispatchSupMsg>,
        args: DispatchSupArgs,
    ) -> Result<DispatchSupState, ActorProcessingErr> {
        let slots = args
            .instances
            .iter()
            .map(|spec| Slot {
                spec: spec.clone(),
                actor: None,
                incarnation: 0,
                thermal: None,
            })
            .collect();
        let sup = Supervision::new(args.restart);
        let mut state = DispatchSupState { args, slots, sup };
        spawn_all(&mut state, &myself).await?;
        Ok(state)
    }

    async fn post_stop(
        &self,
        myself: ActorRef<DispatchSupMsg>,
        state: &mut DispatchSupState,
    ) -> Result<(), ActorProcessingErr> {
        myself.stop_children(None);
        // Whatever the dispatchers still held goes back to pending now.
        let _ = state.release_owner(state.args.owner.clone()).await;
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<DispatchSupMsg>,
        msg: DispatchSupMsg,
        state: &mut DispatchSupState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            DispatchSupMsg::Restart(r) => restart_slot(state, &myself, r).await,
            DispatchSupMsg::Peers(peers) => {
                state.args.peers = peers.clone();
                for a in state.slots.iter().filter_map(|s| s.actor.as_ref()) {
                    tell(
                        a,
                        "the new peers",
                        DispatchMsg::Peers(dispatch_peers(&peers)),
                    );
                }
            }
            DispatchSupMsg::Drain { grace, reply } => {
                state.sup.stop();
                let actors: Vec<ActorRef<DispatchMsg>> =
                    state.slots.iter().filter_map(|s| s.actor.clone()).collect();
                let drains = actors
                    .iter()
                    .map(|a| a.call(|r| DispatchMsg::Drain { reply: r }, Some(grace)));
                let _ = futures_util::future::join_all(drains).await;
                let mut released = 0;
                for a in &actors {
                    if let Ok(CallResult::Success(n)) = a
                        .call(
                            |r| DispatchMsg::ReleaseAll { reply: r },
                            Some(Duration::from_secs(5)),
                        )
                        .await
                    {
                        released += n;
                    }
                }
                let _ = reply.send(released);
            }
            DispatchSupMsg::Dispatchers { reply } => {
                let _ = reply.send(
                    state
                        .slots
                        .iter()
                        .filter_map(|s| Some((s.spec.name.clone(), s.actor.clone()?)))
                        .collect(),
                );
            }
            DispatchSupMsg::Thermal { hot, factor } => {
                for slot in &mut state.slots {
                    let want = slot
                        .spec
                        .gpu_ids
                        .iter()
                        .any(|g| hot.contains(g))
                        .then_some(factor);
                    if want != slot.thermal {
                        slot.thermal = want;
                        if let Some(a) = &slot.actor {
                            tell(a, "a thermal cap", DispatchMsg::Thermal(want));
                        }
                    }
                }
            }
            DispatchSupMsg::Status { reply } => {
                // Asked all at once, in a task of its own, so that a
                // dispatcher slow to answer stalls neither this supervisor
                // nor the others' answers.
                let actors: Vec<ActorRef<DispatchMsg>> =
                    state.slots.iter().filter_map(|s| s.actor.clone()).collect();
                tokio::spawn(async move {
                    let asks = actors.iter().map(|a| {
                        a.call(
                            |r| DispatchMsg::Status { reply: r },
                            Some(Duration::from_secs(2)),
                        )
                    });
                    let out = futures_util::future::join_all(asks)
                        .await
                        .into_iter()
                        .filter_map(|r| match r {
                            Ok(CallResult::Success(s)) => Some(s),
                            _ => None,
                        })
                        .collect();
                    let _ = reply.send(out);
                });
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<DispatchSupMsg>,
        event: SupervisionEvent,
        state: &mut DispatchSupState,
    ) -> Result<(), ActorProcessingErr> {
        let Some(exit) = slot_exited(state, event) else {
            return Ok(());
        };
        // Its jobs go back to pending now, not when their leases expire.
        let released = state.release_owner(state.owner_of(exit.key)).await;
        let note = format!("; released its jobs: {released}");
        child_failed(state, &myself, exit, &note);
        Ok(())
    }
}
