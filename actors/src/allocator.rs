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
//! brought back by waking it: seconds instead of a load. What each model
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
    /// Jobs of this model seen finishing per second while it was served
    /// (0: not measured yet).
    pub rate: f64,
}

impl Backlog {
    /// The time its pending jobs take at the measured rate (`None`: unknown).
    pub fn drain_time(&self) -> Option<Duration> {
        (self.rate > 0.0).then(|| Duration::from_secs_f64(self.pending as f64 / self.rate))
    }
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
    /// What bringing the think model in costs now: its longest wake seen
    /// when its instances sleep with the plan they would run, else its
    /// longest load seen (zero when never seen, or already running).
    pub cost_think: Duration,
    /// The same for the vision model.
    pub cost_vision: Duration,
    /// Every managed instance has sleep mode: switches are cheap, and work
    /// of both kinds is served in turns rather than `shared`.
    pub by_sleep: bool,
    /// A strategy pinned by an operator.
    pub pinned: Option<Strategy>,
}

impl Inputs {
    fn backlog(&self, m: ModelType) -> Backlog {
        match m {
            ModelType::Think => self.think,
            ModelType::Vision => self.vision,
        }
    }

    fn cost(&self, m: ModelType) -> Duration {
        match m {
            ModelType::Think => self.cost_think,
            ModelType::Vision => self.cost_vision,
        }
    }

    fn describe_backlog(&self) -> String {
        format!(
            "think: {} pending (oldest {} s), vision: {} pending (oldest {} s)",
            self.think.pending,
            self.think.oldest.as_secs(),
            self.vision.pending,
            self.vision.oldest.as_secs()
        )
    }
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
        (true, true) if i.by_sleep => return take_turns(i, s),
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
    let backlog = i.describe_backlog();
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
    // With sleep mode nothing is gained by holding a model whose work is
    // done: the dwell only keeps turns from flapping.
    let current_idle = i.by_sleep
        && [ModelType::Think, ModelType::Vision]
            .into_iter()
            .all(|m| !i.current.serves(m) || i.backlog(m).pending == 0);
    if i.held_for < s.min_dwell && !current_idle {
        return None;
    }
    // Bringing a model in costs its load (or wake): worth it only for work
    // that has already waited that long.
    for model in [ModelType::Think, ModelType::Vision] {
        let (b, cost) = (i.backlog(model), i.cost(model));
        if want.serves(model) && !i.current.serves(model) && b.pending > 0 && b.oldest < cost {
            debug!(
                "{want} would bring {model} in (in {} s) for work {} s old: not yet",
                cost.as_secs(),
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

/// Both kinds of work wait and every instance sleeps: one model at a time,
/// in turns of at least `min_dwell`, think first.
fn take_turns(i: &Inputs, s: &AllocatorSettings) -> Option<Decision> {
    let backlog = i.describe_backlog();
    let (serving, other) = match i.current {
        Strategy::Think => (ModelType::Think, ModelType::Vision),
        Strategy::Vision => (ModelType::Vision, ModelType::Think),
        // Everything runs: nothing to gain by a switch.
        Strategy::Static | Strategy::Shared => return None,
        Strategy::Idle => {
            return Some(Decision {
                to: Strategy::Think,
                why: format!(
                    "work arrived while idle; both kinds take turns (think first); {backlog}"
                ),
            })
        }
    };
    if i.held_for < s.min_dwell {
        return None;
    }
    let cost = i.cost(other);
    let round_trip = cost + i.cost(serving);
    if let Some(drain) = i.backlog(serving).drain_time() {
        if drain <= round_trip {
            debug!(
                "{serving} drains in {:.1} s, less than the {:.1} s two switches cost: finishing it first",
                drain.as_secs_f64(),
                round_trip.as_secs_f64()
            );
            return None;
        }
    }
    if i.backlog(other).oldest < cost {
        return None;
    }
    let to = match other {
        ModelType::Think => Strategy::Think,
        ModelType::Vision => Strategy::Vision,
    };
    Some(Decision {
        to,
        why: format!(
            "both kinds wait and every instance sleeps, so they take turns: {serving} held for {} s \
             (allocator.min_dwell_s = {}), {other} comes in within about {:.1} s; {backlog}",
            i.held_for.as_secs(),
            s.min_dwell.as_secs(),
            cost.as_secs_f64()
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
    pub peers: Peers,
    /// Time allowed for calls to other actors.
    pub call_timeout: Duration,
}

/// The instances of one GPU group, as `instances --json` shows them.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupStatus {
    /// Its name: `gpu 0`, `gpus 2,3`, or `gpus unset` (the instances
    /// without `gpu_ids`).
    pub name: String,
    /// The GPUs its instances use.
    pub gpu_ids: Vec<u32>,
    /// Its instances.
    pub instances: Vec<String>,
    /// The strategy in force for them.
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
    /// What went wrong in its last switch.
    pub problems: Vec<String>,
}

/// Splits instances into GPU groups: two instances whose `gpu_ids` share a
/// GPU are in one group, and so are instances linked through others (A on
/// 0–1, B on 1–2, C on 2–3 make one group). Instances without `gpu_ids`
/// are not kept to any GPU (a process sees every GPU, and vLLM takes the
/// first): they form one group together. Each group is a list of indices
/// into `gpu_ids`, in order; groups are ordered by their first instance.
pub fn gpu_groups(gpu_ids: &[&[u32]]) -> Vec<Vec<usize>> {
    let n = gpu_ids.len();
    let mut parent: Vec<usize> = (0..n).collect();
    fn root(parent: &mut [usize], mut i: usize) -> usize {
        while parent[i] != i {
            parent[i] = parent[parent[i]];
            i = parent[i];
        }
        i
    }
    for a in 0..n {
        for b in a + 1..n {
            let unset = gpu_ids[a].is_empty() && gpu_ids[b].is_empty();
            if unset || gpu_ids[a].iter().any(|g| gpu_ids[b].contains(g)) {
                let (ra, rb) = (root(&mut parent, a), root(&mut parent, b));
                parent[ra.max(rb)] = ra.min(rb);
            }
        }
    }
    let mut groups: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for i in 0..n {
        let r = root(&mut parent, i);
        groups.entry(r).or_default().push(i);
    }
    groups.into_values().collect()
}

/// The GPUs of a group (`members`, indices into `gpu_ids`), sorted, each once.
pub fn group_gpus(gpu_ids: &[&[u32]], members: &[usize]) -> Vec<u32> {
    let mut gpus: Vec<u32> = members
        .iter()
        .flat_map(|&i| gpu_ids[i].iter().copied())
        .collect();
    gpus.sort_unstable();
    gpus.dedup();
    gpus
}

/// A group's name from its GPUs.
pub fn group_name(gpu_ids: &[u32]) -> String {
    match gpu_ids {
        [] => "gpus unset".into(),
        [one] => format!("gpu {one}"),
        many => format!(
            "gpus {}",
            many.iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(",")
        ),
    }
}

/// One GPU group: its instances, decided together.
struct Group {
    /// What `Status` shows of it.
    status: GroupStatus,
    /// Its instances, as indices into `AllocatorArgs::instances`.
    members: Vec<usize>,
    /// Whether it has think and vision instances.
    think: bool,
    vision: bool,
    /// When its strategy was applied (the dwell counts from it).
    since: Instant,
    /// When work for its models was last seen waiting (for `idle`).
    last_work: Instant,
}

impl Group {
    fn has(&self, m: ModelType) -> bool {
        match m {
            ModelType::Think => self.think,
            ModelType::Vision => self.vision,
        }
    }

    /// What `s` means for this group: itself when the group has both kinds;
    /// for a group of one kind, `static` for any strategy that serves that
    /// kind (there is nothing to share memory with), `idle` for idle, and
    /// `None` for a strategy that serves only the other kind (it does not
    /// apply: such a group is never stopped for another model's work).
    fn fit(&self, s: Strategy) -> Option<Strategy> {
        if self.think && self.vision {
            return Some(s);
        }
        let mine = if self.think {
            ModelType::Think
        } else {
            ModelType::Vision
        };
        match s {
            Strategy::Idle => Some(Strategy::Idle),
            _ if s.serves(mine) => Some(Strategy::Static),
            _ => None,
        }
    }
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

    /// The plan of each instance of group `g` under `s` (`None`: stopped).
    fn targets(&self, g: usize, s: Strategy) -> Vec<(String, Option<LaunchPlan>)> {
        let set = &self.args.settings;
        self.groups[g]
            .members
            .iter()
            .map(|&i| {
                let m = &self.args.instances[i];
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

    fn switch(&mut self, myself: &ActorRef<AllocatorMsg>, g: usize, d: Decision) {
        let from = self.groups[g].status.strategy;
        let targets = self.targets(g, d.to);
        let plan: Vec<String> = targets
            .iter()
            .map(|(n, p)| match p {
                Some(p) => format!("{n} at {}", p.gpu_memory_utilization),
                None => format!("{n} stopped"),
            })
            .collect();
        let group = &self.groups[g];
        let first_gpu = group.status.gpu_ids.first().copied();
        let memory = self
            .gpu
            .as_ref()
            .and_then(|s| s.gpus.iter().find(|r| Some(r.index) == first_gpu))
            .map(|r| {
                format!(
                    " (GPU {} has {:.1} GiB)",
                    r.index,
                    r.memory_total_bytes as f64 / (1u64 << 30) as f64
                )
            })
            .unwrap_or_default();
        let whose = if self.groups.len() > 1 {
            format!("{}: ", group.status.name)
        } else {
            String::new()
        };
        info!(
            "{whose}strategy {from} → {}: {}; {}{memory}",
            d.to,
            d.why,
            plan.join(", ")
        );
        // What each instance holds now, for checking what its sleep frees.
        let held: BTreeMap<String, f64> = self
            .targets(g, from)
            .into_iter()
            .filter_map(|(n, p)| Some((n, p?.gpu_memory_utilization)))
            .collect();
        let sleepers: BTreeMap<String, Vec<u32>> = group
            .members
            .iter()
            .map(|&i| &self.args.instances[i])
            .filter(|m| m.sleep)
            .map(|m| (m.name.clone(), m.gpu_ids.clone()))
            .collect();
        let group = &mut self.groups[g];
        group.status = GroupStatus {
            strategy: d.to,
            since: SystemTime::now(),
            why: d.why,
            switching: true,
            switches: group.status.switches + 1,
            problems: Vec::new(),
            ..group.status.clone()
        };
        group.since = Instant::now();
        let instances = self.args.peers.instances.clone();
        let me = myself.clone();
        let to = d.to;
        let mut gpu = self.gpu_watch.subscribe();
        tokio::spawn(async move {
            let mut problems = Vec::new();
            // Stop first (frees memory), then relaunch or start.
            let mut ordered = targets;
            ordered.sort_by_key(|(_, p)| p.is_some());
            for (instance, plan) in ordered {
                let check = match (&plan, sleepers.get(&instance), held.get(&instance)) {
                    (None, Some(ids), Some(share)) => {
                        let before = gpu.borrow_and_update().clone();
                        before.map(|b| (ids.clone(), *share, b))
                    }
                    _ => None,
                };
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
                if let Some((ids, share, before)) = check {
                    if let Some(p) = check_freed(&instance, &ids, share, &before, &mut gpu).await {
                        warn!("{p}");
                        problems.push(p);
                    }
                }
            }
            let _ = me.cast(AllocatorMsg::Applied {
                group: g,
                to,
                problems,
            });
        });
    }

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
        self.learn_costs(&statuses);
        self.costs = [ModelType::Think, ModelType::Vision]
            .into_iter()
            .map(|m| SwitchCost {
                model: m,
                load: self.loads.get(&m).copied(),
                wake: self.wakes.get(&m).copied(),
            })
            .collect();
        self.learn_rates(&stats);
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

    /// Applies an operator's pin to every group it fits (see `Group::fit`).
    fn pin(&mut self, myself: &ActorRef<AllocatorMsg>, strategy: Option<Strategy>) {
        for g in 0..self.groups.len() {
            let fitted = strategy.and_then(|s| self.groups[g].fit(s));
            let group = &mut self.groups[g];
            group.status.pinned = fitted;
            if let Some(s) = fitted {
                if s != group.status.strategy && !group.status.switching {
                    let asked = strategy.unwrap_or(s);
                    self.switch(
                        myself,
                        g,
                        Decision {
                            to: s,
                            why: format!(
                                "pinned by an operator (`gpu-feeder strategy pin {asked}`)"
                            ),
                        },
                    );
                }
            }
        }
    }

    /// The longest Starting → Ready (a load) and Waking → Ready (a wake)
    /// seen per model.
    fn learn_costs(&mut self, statuses: &[InstanceStatus]) {
        for s in statuses {
            let mut began: Option<(InstanceState, Instant)> = None;
            for t in &s.history {
                match t.to {
                    InstanceState::Starting | InstanceState::Waking => {
                        began = Some((t.to, t.instant))
                    }
                    InstanceState::Ready => {
                        if let Some((kind, at)) = began.take() {
                            let table = if kind == InstanceState::Waking {
                                &mut self.wakes
                            } else {
                                &mut self.loads
                            };
                            let d = t.instant.duration_since(at);
                            let e = table.entry(s.model).or_default();
                            *e = (*e).max(d);
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    /// What bringing `model` in under `to` in group `g` costs now: nothing
    /// if its instances there are Ready with the plan they would run, its
    /// wake if they sleep with it, else its load.
    fn cost(
        &self,
        g: usize,
        model: ModelType,
        to: Strategy,
        statuses: &[InstanceStatus],
    ) -> Duration {
        let targets = self.targets(g, to);
        let mine: Vec<&InstanceStatus> = statuses
            .iter()
            .filter(|s| s.model == model && targets.iter().any(|(n, _)| *n == s.name))
            .collect();
        let same_plan = |s: &InstanceStatus| {
            targets
                .iter()
                .find(|(n, _)| *n == s.name)
                .is_some_and(|(_, p)| p.is_some() && *p == s.plan)
        };
        let load = self.loads.get(&model).copied().unwrap_or_default();
        if mine.is_empty() {
            return load;
        }
        if mine
            .iter()
            .all(|s| s.state == InstanceState::Ready && same_plan(s))
        {
            return Duration::ZERO;
        }
        if mine.iter().all(|s| {
            matches!(s.state, InstanceState::Sleeping | InstanceState::Ready) && same_plan(s)
        }) {
            return self.wakes.get(&model).copied().unwrap_or_default();
        }
        load
    }

    /// Measures how fast each model's jobs finish while it is served.
    fn learn_rates(&mut self, stats: &QueueStats) {
        let now = Instant::now();
        for m in [ModelType::Think, ModelType::Vision] {
            let done = stats.model(m).counts.done;
            let serving = self
                .groups
                .iter()
                .any(|g| g.has(m) && g.status.strategy.serves(m) && !g.status.switching);
            let e = self.rates.entry(m).or_insert((done, now, 0.0));
            let dt = now.duration_since(e.1).as_secs_f64();
            if dt <= 0.0 {
                continue;
            }
            if serving && done > e.0 {
                let r = (done - e.0) as f64 / dt;
                e.2 = if e.2 > 0.0 { 0.5 * e.2 + 0.5 * r } else { r };
            }
            e.0 = done;
            e.1 = now;
        }
    }
}

/// Waits for a GPU reading taken after a sleep, and says so if the sleep
/// freed less than half of the memory the instance held.
async fn check_freed(
    instance: &str,
    gpu_ids: &[u32],
    share: f64,
    before: &GpuSnapshot,
    gpu: &mut tokio::sync::watch::Receiver<Option<GpuSnapshot>>,
) -> Option<String> {
    if before.gpus.is_empty() {
        return None; // No readings (no NVML): nothing to check.
    }
    let slept_at = SystemTime::now();
    let wait = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if gpu.changed().await.is_err() {
                return None;
            }
            let s = gpu.borrow_and_update().clone();
            if let Some(s) = s.filter(|s| s.at >= slept_at) {
                return Some(s);
            }
        }
    });
    let after = wait.await.ok().flatten()?;
    let on = |s: &GpuSnapshot| -> (u64, u64) {
        s.gpus
            .iter()
            .filter(|g| gpu_ids.contains(&g.index))
            .fold((0, 0), |(u, t), g| {
                (u + g.memory_used_bytes, t + g.memory_total_bytes)
            })
    };
    let (used_before, total) = on(before);
    let (used_after, _) = on(&after);
    let held = (share * total as f64) as u64;
    let freed = used_before.saturating_sub(used_after);
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    (held > 0 && freed < held / 2).then(|| {
        format!(
            "{instance}: its sleep freed only {:.1} GiB of GPU memory (it held about {:.1} GiB; {:.1} → {:.1} GiB in use on GPU {gpu_ids:?}): \
             vLLM sometimes keeps memory after a sleep — see the server's log; the incoming model may not fit",
            gib(freed),
            gib(held),
            gib(used_before),
            gib(used_after)
        )
    })
}

fn backlog_of(stats: &QueueStats, model: ModelType) -> Backlog {
    let m = stats.model(model);
    Backlog {
        pending: m.counts.pending,
        oldest: m.oldest_pending_age.unwrap_or_default(),
        rate: 0.0,
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
        let ids: Vec<&[u32]> = args
            .instances
            .iter()
            .map(|m| m.gpu_ids.as_slice())
            .collect();
        let mut groups: Vec<Group> = gpu_groups(&ids)
            .into_iter()
            .map(|members| {
                let gpu_ids = group_gpus(&ids, &members);
                let has = |m: ModelType| members.iter().any(|&i| args.instances[i].model == m);
                Group {
                    status: GroupStatus {
                        name: group_name(&gpu_ids),
                        gpu_ids,
                        instances: members
                            .iter()
                            .map(|&i| args.instances[i].name.clone())
                            .collect(),
                        strategy: Strategy::Static,
                        since: SystemTime::now(),
                        why: "every instance as configured, until the backlog asks for a switch"
                            .into(),
                        pinned: None,
                        switching: false,
                        switches: 0,
                        problems: Vec::new(),
                    },
                    think: has(ModelType::Think),
                    vision: has(ModelType::Vision),
                    members,
                    since: Instant::now(),
                    last_work: Instant::now(),
                }
            })
            .collect();
        // Ordered by GPU, so that the first group (whose strategy is the
        // top-level one) is the one on the lowest GPU.
        groups.sort_by(|a, b| a.status.gpu_ids.cmp(&b.status.gpu_ids));
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
            AllocatorMsg::Gpu(g) => {
                state.gpu_watch.send_replace(Some(g.clone()));
                state.gpu = Some(g);
            }
            AllocatorMsg::Pin { strategy, reply } => {
                match strategy {
                    Some(s) => info!("strategy pinned to {s} until `gpu-feeder strategy unpin`"),
                    None => info!("strategy pin released: the backlog decides again"),
                }
                state.pin(&myself, strategy);
                let _ = reply.send(state.status());
            }
            AllocatorMsg::Peers(p) => state.args.peers = p,
            AllocatorMsg::Applied {
                group,
                to,
                problems,
            } => {
                let several = state.groups.len() > 1;
                let Some(g) = state.groups.get_mut(group) else {
                    return Ok(());
                };
                g.status.switching = false;
                g.status.problems = problems.clone();
                let whose = if several {
                    format!("{}: ", g.status.name)
                } else {
                    String::new()
                };
                if problems.is_empty() {
                    info!("{whose}strategy {to} in force");
                } else {
                    warn!(
                        "{whose}strategy {to} applied with problems: {}",
                        problems.join("; ")
                    );
                }
            }
            AllocatorMsg::Status(reply) => {
                let _ = reply.send(state.status());
            }
        }
        Ok(())
    }
}
