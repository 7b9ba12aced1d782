//! `AllocatorActor`: decides which instances run, and with how much GPU
//! memory, from the durable backlog.
//!
//! Strategies:
//! - `static`: every instance as configured (the start, until a switch);
//! - `shared`: every instance, each with `shared` of the GPU memory — both
//!   kinds of work wait;
//! - `think` / `vision`: only that model's instances, with `solo` — only that
//!   kind of work waits;
//! - `idle`: nothing runs — no work for `idle_ttl` (when set).
//!
//! Every `interval` it reads the backlog (pending jobs and the oldest one's
//! age, per model) and the instances' states, and switches when the backlog
//! asks for another strategy and the current one has held for `min_dwell`
//! (so a flapping backlog does not flap the servers). Think work comes first:
//! when think jobs wait and no running strategy serves them, the switch does
//! not wait for the dwell, nor does any work that arrives while `idle`. A
//! switch that would launch a server is only made
//! when the work it serves has waited at least as long as that server was
//! seen to take to load (a switch must be worth its cost). A switch drains
//! the instances it stops or relaunches (their requests in flight finish),
//! then stops or relaunches them; no job is lost or failed by it. A pin holds
//! a strategy until it is released.
//!
//! Instances with sleep mode are parked by putting their model to sleep and
//! brought back by waking it: seconds instead of a load. One parked while it
//! still loads finishes its load and sleeps; the switch goes on once it
//! sleeps (its memory is free then). Sleep-mode groups whose configured
//! shares cannot all be resident at once launch one kind after the other
//! (`launch_turns`: think loads and sleeps, then vision loads), and such a
//! group starts in the strategy of the kind launched last. What each model
//! costs to bring in is learned from the instances' histories: its wake
//! (Waking → Ready) when its instances sleep with the plan they would run
//! with, else its load (Starting → Ready). When every managed instance has
//! sleep mode, work of both kinds is served in turns, one model at a time
//! with the whole memory, instead of `shared` (which would relaunch both):
//! think first, then each turn holds at least `min_dwell`, and a model is
//! not left while its own backlog would drain (at the rate its jobs were
//! seen to finish) in less time than a round trip of switches costs. A
//! model whose backlog is gone is left at once. Where GPUs are read, the
//! memory a sleep frees is checked before the incoming model is woken, and
//! a sleep that freed less than half of what the instance held is reported.
//!
//! Here the actor, its arguments, messages and status, and each tick's
//! decision per group; the rest by concern:
//! - `policy`: the strategies and `decide`, the whole policy, pure;
//! - `gpu`: GPU groups (instances sharing a GPU are decided together);
//! - `cost`: what bringing a model in costs, and how fast its jobs finish;
//! - `switch`: applying a strategy (drain, stop or sleep, relaunch or wake).

mod cost;
mod gpu;
mod policy;
mod switch;

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use ractor::rpc::CallResult;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::container::InstanceState;
use crate::gpu::GpuSnapshot;
use crate::instances::InstanceSupMsg;
use crate::job::ModelType;
use crate::queue::QueueMsg;
use crate::runtime::LaunchPlan;

pub use gpu::{
    gpu_groups, group_gpus, group_name, launch_turns, launch_turns_as, staggered_start, Footprint,
    GroupStatus, SwitchRecord, RECENT_SWITCHES,
};
use gpu::{groups_of, Group};
use policy::backlog_of;
pub use policy::{decide, AllocatorSettings, Backlog, Decision, Inputs, Strategy};

/// The actors the allocator talks to: the queue for the backlog, the
/// instance supervisor for the instances' states and their plans.
#[derive(Clone, Debug)]
pub struct AllocatorPeers {
    /// The sole owner of the job store.
    pub queue: ActorRef<QueueMsg>,
    /// The model servers' lifecycles.
    pub instances: ActorRef<InstanceSupMsg>,
}

/// Messages of the AllocatorActor.
#[derive(Debug)]
pub enum AllocatorMsg {
    /// Time to decide.
    Tick,
    /// The latest GPU snapshot.
    Gpu(GpuSnapshot),
    /// Hold `Some(strategy)` until unpinned (`None`); replies with the status.
    Pin {
        /// The strategy, or `None` to release the pin.
        strategy: Option<Strategy>,
        /// The status after the pin took effect.
        reply: RpcReplyPort<AllocatorStatus>,
    },
    /// The current peers (after a restart of one).
    Peers(AllocatorPeers),
    /// A switch finished applying.
    Applied {
        /// The group it was for.
        group: usize,
        /// The strategy applied.
        to: Strategy,
        /// Problems met on the way.
        problems: Vec<String>,
    },
    /// A snapshot.
    Status(RpcReplyPort<AllocatorStatus>),
}

/// What `instances --json` shows of the allocator.
#[derive(Clone, Debug, PartialEq)]
pub struct AllocatorStatus {
    /// The strategy in force.
    pub strategy: Strategy,
    /// Since when.
    pub since: SystemTime,
    /// Why it was chosen.
    pub why: String,
    /// A pinned strategy, if any.
    pub pinned: Option<Strategy>,
    /// A switch is being applied.
    pub switching: bool,
    /// Switches since start.
    pub switches: u64,
    /// What went wrong in the last switch (a sleep that freed too little
    /// memory, an instance that did not follow); empty when nothing did.
    pub problems: Vec<String>,
    /// What bringing each model in was seen to cost.
    pub costs: Vec<SwitchCost>,
    /// Each GPU group's strategy (one group where every instance shares
    /// its GPUs; the fields above are the first group's).
    pub groups: Vec<GroupStatus>,
}

/// What bringing one model in was seen to cost (the longest seen).
#[derive(Clone, Debug, PartialEq)]
pub struct SwitchCost {
    /// The model.
    pub model: ModelType,
    /// Starting → Ready.
    pub load: Option<Duration>,
    /// Waking → Ready (sleep mode).
    pub wake: Option<Duration>,
}

/// An instance the allocator manages.
#[derive(Clone, Debug, PartialEq)]
pub struct Managed {
    /// The instance.
    pub name: String,
    /// Its model.
    pub model: ModelType,
    /// Its configured plan (for `static`).
    pub configured: LaunchPlan,
    /// It has sleep mode: parked by sleep, brought back by a wake.
    pub sleep: bool,
    /// The GPUs it runs on (where a sleep's freed memory is checked).
    pub gpu_ids: Vec<u32>,
}

/// How the AllocatorActor is started.
pub struct AllocatorArgs {
    /// Its settings.
    pub settings: AllocatorSettings,
    /// The launched instances (external ones cannot be managed).
    pub instances: Vec<Managed>,
    /// The peers at start.
    pub peers: AllocatorPeers,
    /// Time allowed for calls to other actors.
    pub call_timeout: Duration,
}

/// The AllocatorActor's state.
pub struct AllocatorState {
    /// How it was started.
    args: AllocatorArgs,
    /// The GPU groups, each with its strategy.
    groups: Vec<Group>,
    /// The last GPU snapshot.
    gpu: Option<GpuSnapshot>,
    /// The longest each model took from starting to ready, from the instances' histories.
    loads: BTreeMap<ModelType, Duration>,
    /// The longest each model took from waking to ready.
    wakes: BTreeMap<ModelType, Duration>,
    /// What bringing each model in was seen to cost, for `Status`.
    costs: Vec<SwitchCost>,
    /// Per model: jobs done when last read, when, and the rate measured.
    rates: BTreeMap<ModelType, (u64, Instant, f64)>,
    /// The latest GPU snapshot, for switches checking what a sleep freed.
    gpu_watch: tokio::sync::watch::Sender<Option<GpuSnapshot>>,
    /// A decision is under way (one at a time).
    deciding: bool,
    /// Each instance's state at the last tick: a sleep's freed memory is
    /// checked only for an instance that was up (one parked while loading
    /// held only part of its share when the park began).
    states: BTreeMap<String, InstanceState>,
}

/// Chooses the strategy.
pub struct AllocatorActor;

impl AllocatorState {
    /// Every group's status; the top-level fields are the first group's
    /// (the only one on a host where every instance shares its GPUs).
    fn status(&self) -> AllocatorStatus {
        let first = &self.groups[0].status;
        AllocatorStatus {
            strategy: first.strategy,
            since: first.since,
            why: first.why.clone(),
            pinned: first.pinned,
            switching: first.switching,
            switches: first.switches,
            problems: first.problems.clone(),
            costs: self.costs.clone(),
            groups: self.groups.iter().map(|g| g.status.clone()).collect(),
        }
    }

    /// Reads the backlog and the instances, learns from them, and lets each
    /// group that is not switching decide.
    async fn tick(&mut self, myself: &ActorRef<AllocatorMsg>) {
        if self.deciding || self.groups.iter().all(|g| g.status.switching) {
            return;
        }
        self.deciding = true;
        let timeout = Some(self.args.call_timeout);
        let stats = match self
            .args
            .peers
            .queue
            .call(|reply| QueueMsg::Stats { reply }, timeout)
            .await
        {
            Ok(CallResult::Success(Ok(s))) => Some(s),
            _ => None,
        };
        let statuses = match self
            .args
            .peers
            .instances
            .call(InstanceSupMsg::Status, timeout)
            .await
        {
            Ok(CallResult::Success(s)) => s,
            _ => Vec::new(),
        };
        self.deciding = false;
        let Some(stats) = stats else {
            warn!("the allocator could not read the backlog; deciding later");
            return;
        };
        self.learn(&statuses);
        self.learn_rates(&stats);
        self.states = statuses.iter().map(|s| (s.name.clone(), s.state)).collect();
        for g in 0..self.groups.len() {
            if self.groups[g].status.switching {
                continue;
            }
            let group = &self.groups[g];
            // A group decides from the backlog of the models it has.
            let backlog = |m: ModelType| {
                if !group.has(m) {
                    return Backlog::default();
                }
                Backlog {
                    rate: self.rates.get(&m).map_or(0.0, |r| r.2),
                    ..backlog_of(&stats, m)
                }
            };
            let (think, vision) = (backlog(ModelType::Think), backlog(ModelType::Vision));
            let cost = |m: ModelType, s: Strategy| {
                if group.has(m) {
                    self.cost(g, m, s, &statuses)
                } else {
                    Duration::ZERO
                }
            };
            let inputs = Inputs {
                current: group.status.strategy,
                held_for: group.since.elapsed(),
                idle_for: group.last_work.elapsed(),
                think,
                vision,
                cost_think: cost(ModelType::Think, Strategy::Think),
                cost_vision: cost(ModelType::Vision, Strategy::Vision),
                by_sleep: group.members.iter().all(|&i| self.args.instances[i].sleep),
                pinned: group.status.pinned,
            };
            let work = think.pending > 0 || vision.pending > 0;
            let decision = decide(&inputs, &self.args.settings).and_then(|d| {
                let to = group.fit(d.to)?;
                (to != group.status.strategy).then_some(Decision { to, ..d })
            });
            if work {
                self.groups[g].last_work = Instant::now();
            }
            if let Some(d) = decision {
                self.switch(myself, g, d);
            }
        }
    }

    /// The latest GPU snapshot.
    fn read_gpu(&mut self, g: GpuSnapshot) {
        self.gpu_watch.send_replace(Some(g.clone()));
        self.gpu = Some(g);
    }
}

impl Actor for AllocatorActor {
    type Msg = AllocatorMsg;
    type State = AllocatorState;
    type Arguments = AllocatorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<AllocatorMsg>,
        args: AllocatorArgs,
    ) -> Result<AllocatorState, ActorProcessingErr> {
        myself.send_interval(args.settings.interval, || AllocatorMsg::Tick);
        let groups = groups_of(&args.instances);
        if groups.is_empty() {
            return Err("the allocator has no instance to manage".into());
        }
        if groups.len() > 1 {
            let list: Vec<String> = groups
                .iter()
                .map(|g| format!("{} ({})", g.status.name, g.status.instances.join(", ")))
                .collect();
            info!(
                "the allocator decides {} GPU groups, each on its own: {}",
                groups.len(),
                list.join("; ")
            );
        }
        Ok(AllocatorState {
            args,
            groups,
            gpu: None,
            loads: BTreeMap::new(),
            wakes: BTreeMap::new(),
            costs: Vec::new(),
            rates: BTreeMap::new(),
            gpu_watch: tokio::sync::watch::channel(None).0,
            deciding: false,
            states: BTreeMap::new(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<AllocatorMsg>,
        msg: AllocatorMsg,
        state: &mut AllocatorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            AllocatorMsg::Tick => state.tick(&myself).await,
            AllocatorMsg::Gpu(g) => state.read_gpu(g),
            AllocatorMsg::Pin { strategy, reply } => {
                state.pin(&myself, strategy);
                let _ = reply.send(state.status());
            }
            AllocatorMsg::Peers(p) => state.args.peers = p,
            AllocatorMsg::Applied {
                group,
                to,
                problems,
            } => state.applied(group, to, problems),
            AllocatorMsg::Status(reply) => {
                let _ = reply.send(state.status());
            }
        }
        Ok(())
    }
}
