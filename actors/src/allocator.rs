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

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime};

use ractor::rpc::CallResult;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::container::{InstanceState, InstanceStatus};
use crate::gpu::GpuSnapshot;
use crate::instances::InstanceSupMsg;
use crate::job::{ModelType, QueueStats};
use crate::peers::Peers;
use crate::queue::QueueMsg;
use crate::runtime::LaunchPlan;

/// A strategy's name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Strategy {
    /// Every instance as configured.
    Static,
    /// Every instance, sharing the GPU.
    Shared,
    /// Think instances alone.
    Think,
    /// Vision instances alone.
    Vision,
    /// Nothing runs.
    Idle,
}

impl Strategy {
    /// Every strategy.
    pub const ALL: [Strategy; 5] = [
        Strategy::Static,
        Strategy::Shared,
        Strategy::Think,
        Strategy::Vision,
        Strategy::Idle,
    ];

    /// Its name in config, logs, metrics and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Static => "static",
            Strategy::Shared => "shared",
            Strategy::Think => "think",
            Strategy::Vision => "vision",
            Strategy::Idle => "idle",
        }
    }

    /// Parses a name; the error lists the names.
    pub fn parse(s: &str) -> Result<Strategy, String> {
        Strategy::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                format!("no strategy `{s}`: choose one of static, shared, think, vision, idle")
            })
    }

    /// Whether instances of `model` run under this strategy.
    pub fn serves(self, model: ModelType) -> bool {
        match self {
            Strategy::Static | Strategy::Shared => true,
            Strategy::Think => model == ModelType::Think,
            Strategy::Vision => model == ModelType::Vision,
            Strategy::Idle => false,
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The allocator's settings.
#[derive(Clone, Debug, PartialEq)]
pub struct AllocatorSettings {
    /// Time between decisions.
    pub interval: Duration,
    /// Least time a strategy holds before another replaces it.
    pub min_dwell: Duration,
    /// Stop everything after this long without work; `None` never does.
    pub idle_ttl: Option<Duration>,
    /// Memory share of each instance under `shared`.
    pub shared: f64,
    /// Memory share of an instance running alone.
    pub solo: f64,
}

impl Default for AllocatorSettings {
    fn default() -> Self {
        AllocatorSettings {
            interval: Duration::from_secs(5),
            min_dwell: Duration::from_secs(600),
            idle_ttl: None,
            shared: 0.40,
            solo: 0.75,
        }
    }
}

/// The backlog of one model.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Backlog {
    /// Jobs waiting.
    pub pending: u64,
    /// How long the oldest has waited.
    pub oldest: Duration,
}

/// What `decide` sees.
#[derive(Clone, Debug, PartialEq)]
pub struct Inputs {
    /// The strategy in force.
    pub current: Strategy,
    /// How long it has been in force.
    pub held_for: Duration,
    /// How long no job has waited (for `idle`).
    pub idle_for: Duration,
    /// The backlog per model.
    pub think: Backlog,
    /// The backlog per model.
    pub vision: Backlog,
    /// The longest load seen, per model (zero when never seen).
    pub load_think: Duration,
    /// The longest load seen, per model (zero when never seen).
    pub load_vision: Duration,
    /// A strategy pinned by an operator.
    pub pinned: Option<Strategy>,
}

/// A decision: switch to `to`, because `why`.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// The new strategy.
    pub to: Strategy,
    /// Why, in words, for the log and `instances`.
    pub why: String,
}

/// The allocator's rule, as a pure function (the scenario tests drive it
/// through the actor; this is the whole policy).
pub fn decide(i: &Inputs, s: &AllocatorSettings) -> Option<Decision> {
    if let Some(p) = i.pinned {
        return (p != i.current).then(|| Decision {
            to: p,
            why: format!("pinned by an operator (`gpu-feeder strategy pin {p}`)"),
        });
    }
    let (t, v) = (i.think.pending > 0, i.vision.pending > 0);
    let want = match (t, v) {
        (true, true) => Strategy::Shared,
        (true, false) => Strategy::Think,
        (false, true) => Strategy::Vision,
        (false, false) => match s.idle_ttl {
            Some(ttl) if i.idle_for >= ttl && i.current != Strategy::Idle => {
                return Some(Decision {
                    to: Strategy::Idle,
                    why: format!(
                        "no work for {} s (allocator.idle_ttl_s = {})",
                        i.idle_for.as_secs(),
                        ttl.as_secs()
                    ),
                });
            }
            _ => return None,
        },
    };
    if want == i.current || (i.current == Strategy::Static && want == Strategy::Shared) {
        return None;
    }
    let backlog = format!(
        "think: {} pending (oldest {} s), vision: {} pending (oldest {} s)",
        i.think.pending,
        i.think.oldest.as_secs(),
        i.vision.pending,
        i.vision.oldest.as_secs()
    );
    let think_first = t && !i.current.serves(ModelType::Think);
    if think_first {
        return Some(Decision {
            to: want,
            why: format!("think work waits and nothing serves it (think first); {backlog}"),
        });
    }
    if i.current == Strategy::Idle {
        return Some(Decision {
            to: want,
            why: format!("work arrived while idle; {backlog}"),
        });
    }
    if i.held_for < s.min_dwell {
        return None;
    }
    // A launch costs the server's load time: worth it only for work that
    // has already waited that long.
    for (model, b, load) in [
        (ModelType::Think, i.think, i.load_think),
        (ModelType::Vision, i.vision, i.load_vision),
    ] {
        if want.serves(model) && !i.current.serves(model) && b.pending > 0 && b.oldest < load {
            debug!(
                "{want} would launch {model} (loads in {} s) for work {} s old: not yet",
                load.as_secs(),
                b.oldest.as_secs()
            );
            return None;
        }
    }
    Some(Decision {
        to: want,
        why: format!(
            "{backlog}; {} held for {} s (allocator.min_dwell_s = {})",
            i.current,
            i.held_for.as_secs(),
            s.min_dwell.as_secs()
        ),
    })
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
    /// The current peers.
    Peers(Peers),
    /// A switch finished applying.
    Applied {
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
}

/// How the AllocatorActor is started.
pub struct AllocatorArgs {
    /// Its settings.
    pub settings: AllocatorSettings,
    /// The launched instances (external ones cannot be managed).
    pub instances: Vec<Managed>,
    /// The peers at start.
    pub peers: Peers,
    /// Time allowed for calls to other actors.
    pub call_timeout: Duration,
}

/// The AllocatorActor's state.
pub struct AllocatorState {
    /// How it was started.
    args: AllocatorArgs,
    /// The strategy now, and why (for `Status`).
    status: AllocatorStatus,
    /// When the current strategy was applied (the dwell counts from it).
    since: Instant,
    /// When work was last seen waiting (the idle timeout counts from it).
    last_work: Instant,
    /// The last GPU snapshot.
    gpu: Option<GpuSnapshot>,
    /// The longest each model took from starting to ready, from the instances' histories.
    loads: BTreeMap<ModelType, Duration>,
    /// A decision is under way (one at a time).
    deciding: bool,
}

/// Chooses the strategy.
pub struct AllocatorActor;

impl AllocatorState {
    /// The plan of each managed instance under `s` (`None`: stopped).
    fn targets(&self, s: Strategy) -> Vec<(String, Option<LaunchPlan>)> {
        let set = &self.args.settings;
        self.args
            .instances
            .iter()
            .map(|m| {
                let plan = match s {
                    Strategy::Static => Some(m.configured.clone()),
                    Strategy::Shared => Some(LaunchPlan {
                        gpu_memory_utilization: set.shared,
                    }),
                    _ if s.serves(m.model) => Some(LaunchPlan {
                        gpu_memory_utilization: set.solo,
                    }),
                    _ => None,
                };
                (m.name.clone(), plan)
            })
            .collect()
    }

    fn switch(&mut self, myself: &ActorRef<AllocatorMsg>, d: Decision) {
        let from = self.status.strategy;
        let targets = self.targets(d.to);
        let plan: Vec<String> = targets
            .iter()
            .map(|(n, p)| match p {
                Some(p) => format!("{n} at {}", p.gpu_memory_utilization),
                None => format!("{n} stopped"),
            })
            .collect();
        let memory = self
            .gpu
            .as_ref()
            .and_then(|g| g.gpus.first())
            .map(|g| {
                format!(
                    " (GPU {} has {:.1} GiB)",
                    g.index,
                    g.memory_total_bytes as f64 / (1u64 << 30) as f64
                )
            })
            .unwrap_or_default();
        info!(
            "strategy {from} → {}: {}; {}{memory}",
            d.to,
            d.why,
            plan.join(", ")
        );
        self.status = AllocatorStatus {
            strategy: d.to,
            since: SystemTime::now(),
            why: d.why,
            pinned: self.status.pinned,
            switching: true,
            switches: self.status.switches + 1,
        };
        self.since = Instant::now();
        let instances = self.args.peers.instances.clone();
        let me = myself.clone();
        let to = d.to;
        tokio::spawn(async move {
            let mut problems = Vec::new();
            // Stop first (frees memory), then relaunch or start.
            let mut ordered = targets;
            ordered.sort_by_key(|(_, p)| p.is_some());
            for (instance, plan) in ordered {
                let answer = instances
                    .call(
                        |reply| InstanceSupMsg::Allocate {
                            instance: instance.clone(),
                            plan,
                            reply,
                        },
                        Some(Duration::from_secs(3_600)),
                    )
                    .await;
                match answer {
                    Ok(CallResult::Success(Ok(()))) => {}
                    Ok(CallResult::Success(Err(e))) => problems.push(e),
                    other => problems.push(format!("{instance}: no answer ({other:?})")),
                }
            }
            let _ = me.cast(AllocatorMsg::Applied { to, problems });
        });
    }

    async fn tick(&mut self, myself: &ActorRef<AllocatorMsg>) {
        if self.status.switching || self.deciding {
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
        self.learn_loads(&statuses);
        let backlog = |m: ModelType| backlog_of(&stats, m);
        let (think, vision) = (backlog(ModelType::Think), backlog(ModelType::Vision));
        if think.pending > 0 || vision.pending > 0 {
            self.last_work = Instant::now();
        }
        let inputs = Inputs {
            current: self.status.strategy,
            held_for: self.since.elapsed(),
            idle_for: self.last_work.elapsed(),
            think,
            vision,
            load_think: self
                .loads
                .get(&ModelType::Think)
                .copied()
                .unwrap_or_default(),
            load_vision: self
                .loads
                .get(&ModelType::Vision)
                .copied()
                .unwrap_or_default(),
            pinned: self.status.pinned,
        };
        if let Some(d) = decide(&inputs, &self.args.settings) {
            self.switch(myself, d);
        }
    }

    /// The longest Starting → Ready seen per model.
    fn learn_loads(&mut self, statuses: &[InstanceStatus]) {
        for s in statuses {
            let mut started = None;
            for t in &s.history {
                match t.to {
                    InstanceState::Starting => started = Some(t.at),
                    InstanceState::Ready => {
                        if let Some(d) = started.and_then(|a| t.at.duration_since(a).ok()) {
                            let e = self.loads.entry(s.model).or_default();
                            *e = (*e).max(d);
                        }
                        started = None;
                    }
                    _ => {}
                }
            }
        }
    }
}

fn backlog_of(stats: &QueueStats, model: ModelType) -> Backlog {
    let m = stats.model(model);
    Backlog {
        pending: m.counts.pending,
        oldest: m.oldest_pending_age.unwrap_or_default(),
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
        Ok(AllocatorState {
            args,
            status: AllocatorStatus {
                strategy: Strategy::Static,
                since: SystemTime::now(),
                why: "every instance as configured, until the backlog asks for a switch".into(),
                pinned: None,
                switching: false,
                switches: 0,
            },
            since: Instant::now(),
            last_work: Instant::now(),
            gpu: None,
            loads: BTreeMap::new(),
            deciding: false,
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
            AllocatorMsg::Gpu(g) => state.gpu = Some(g),
            AllocatorMsg::Pin { strategy, reply } => {
                state.status.pinned = strategy;
                match strategy {
                    Some(s) => info!("strategy pinned to {s} until `gpu-feeder strategy unpin`"),
                    None => info!("strategy pin released: the backlog decides again"),
                }
                if let Some(s) = strategy {
                    if s != state.status.strategy && !state.status.switching {
                        state.switch(
                            &myself,
                            Decision {
                                to: s,
                                why: format!(
                                    "pinned by an operator (`gpu-feeder strategy pin {s}`)"
                                ),
                            },
                        );
                    }
                }
                let _ = reply.send(state.status.clone());
            }
            AllocatorMsg::Peers(p) => state.args.peers = p,
            AllocatorMsg::Applied { to, problems } => {
                state.status.switching = false;
                if problems.is_empty() {
                    info!("strategy {to} in force");
                } else {
                    warn!(
                        "strategy {to} applied with problems: {}",
                        problems.join("; ")
                    );
                }
            }
            AllocatorMsg::Status(reply) => {
                let _ = reply.send(state.status.clone());
            }
        }
        Ok(())
    }
}
