//! GPU grouping: instances that share a GPU are decided together; each
//! group has its own strategy.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::{Managed, Strategy};
use crate::job::ModelType;
use crate::spec::InstanceSpec;

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
    /// Its latest switches, oldest first (at most [`RECENT_SWITCHES`]).
    pub recent: Vec<SwitchRecord>,
}

/// How many of a group's switches [`GroupStatus::recent`] keeps.
pub const RECENT_SWITCHES: usize = 5;

/// One switch of a GPU group, as the status page lists it.
#[derive(Clone, Debug, PartialEq)]
pub struct SwitchRecord {
    /// The strategy it left.
    pub from: Strategy,
    /// The strategy it brought in.
    pub to: Strategy,
    /// When it was decided.
    pub at: SystemTime,
    /// What it cost: from the decision until every instance had followed
    /// (drained, slept or stopped, woken or loaded); `None` while it runs.
    pub took: Option<Duration>,
    /// How many problems it met (see [`GroupStatus::problems`]).
    pub problems: usize,
}

impl GroupStatus {
    /// Notes a switch from `from` to `to` decided now.
    pub(super) fn switch_began(&mut self, from: Strategy, to: Strategy) {
        if self.recent.len() == RECENT_SWITCHES {
            self.recent.remove(0);
        }
        self.recent.push(SwitchRecord {
            from,
            to,
            at: SystemTime::now(),
            took: None,
            problems: 0,
        });
    }

    /// Notes that the latest switch was applied, with `problems` met.
    pub(super) fn switch_ended(&mut self, problems: usize) {
        if let Some(last) = self.recent.last_mut() {
            last.took = Some(last.at.elapsed().unwrap_or_default());
            last.problems = problems;
        }
    }
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

/// One launched instance, as the launch order sees it.
#[derive(Clone, Copy, Debug)]
pub struct Footprint<'a> {
    /// Its model.
    pub model: ModelType,
    /// The GPUs it runs on.
    pub gpu_ids: &'a [u32],
    /// Its configured share of each GPU's memory.
    pub share: f64,
    /// It has sleep mode.
    pub sleep: bool,
}

/// The GPU groups whose instances' configured memory shares cannot all be
/// resident at once, yet can take turns: every instance of the group has
/// sleep mode, both kinds are there, and each kind's instances fit
/// together on every GPU. Such a group launches one kind after the other,
/// think first: the think instances load and sleep, then the vision ones
/// load (and stay awake). Each group is returned as its steps, each step
/// the indices (into `f`) of one kind's instances, in order. Instances
/// without `gpu_ids` are never staggered (their GPU is not known).
pub fn launch_turns(f: &[Footprint<'_>]) -> Vec<Vec<Vec<usize>>> {
    let ids: Vec<&[u32]> = f.iter().map(|x| x.gpu_ids).collect();
    gpu_groups(&ids)
        .into_iter()
        .filter_map(|members| {
            let gpus = group_gpus(&ids, &members);
            let load = |on: u32, m: Option<ModelType>| -> f64 {
                members
                    .iter()
                    .map(|&i| &f[i])
                    .filter(|x| x.gpu_ids.contains(&on) && m.is_none_or(|m| x.model == m))
                    .map(|x| x.share)
                    .sum()
            };
            let over = |s: f64| s > 1.0 + 1e-9;
            let kinds = [ModelType::Think, ModelType::Vision];
            let staggered = !gpus.is_empty()
                && members
                    .iter()
                    .all(|&i| f[i].sleep && !f[i].gpu_ids.is_empty())
                && kinds
                    .iter()
                    .all(|&m| members.iter().any(|&i| f[i].model == m))
                && gpus.iter().any(|&g| over(load(g, None)))
                && gpus
                    .iter()
                    .all(|&g| kinds.iter().all(|&m| !over(load(g, Some(m)))));
            staggered.then(|| {
                kinds
                    .iter()
                    .map(|&m| {
                        members
                            .iter()
                            .copied()
                            .filter(|&i| f[i].model == m)
                            .collect()
                    })
                    .collect()
            })
        })
        .collect()
}

/// One GPU group: its instances, decided together.
pub(super) struct Group {
    /// What `Status` shows of it.
    pub(super) status: GroupStatus,
    /// Its instances, as indices into `AllocatorArgs::instances`.
    pub(super) members: Vec<usize>,
    /// Whether it has think and vision instances.
    pub(super) think: bool,
    pub(super) vision: bool,
    /// When its strategy was applied (the dwell counts from it).
    pub(super) since: Instant,
    /// When work for its models was last seen waiting (for `idle`).
    pub(super) last_work: Instant,
    /// Its instances' configured shares do not all fit at once (a
    /// staggered start): the strategy of the kind launched last, which
    /// stands for `static` (every instance as configured cannot run).
    pub(super) staggered: Option<Strategy>,
}

impl Group {
    pub(super) fn has(&self, m: ModelType) -> bool {
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
    pub(super) fn fit(&self, s: Strategy) -> Option<Strategy> {
        if self.think && self.vision {
            return match (s, self.staggered) {
                (Strategy::Static, Some(awake)) => Some(awake),
                _ => Some(s),
            };
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

/// The GPU groups of `instances`, each at `static`, ordered by GPU (so the
/// first group, whose strategy is the top-level one, is on the lowest GPU).
pub(super) fn groups_of(instances: &[Managed]) -> Vec<Group> {
    let ids: Vec<&[u32]> = instances.iter().map(|m| m.gpu_ids.as_slice()).collect();
    let mut groups: Vec<Group> = gpu_groups(&ids)
        .into_iter()
        .map(|members| {
            let gpu_ids = group_gpus(&ids, &members);
            let has = |m: ModelType| members.iter().any(|&i| instances[i].model == m);
            let staggered = first_awake(instances, &members);
            let (strategy, why) = match staggered {
                Some(m) => (
                    m,
                    format!(
                        "their memory shares do not all fit at once: they launched one kind after \
                         the other, each loaded once, and {m}, launched last, stays awake until the \
                         backlog asks for a switch"
                    ),
                ),
                None => (
                    Strategy::Static,
                    "every instance as configured, until the backlog asks for a switch".into(),
                ),
            };
            Group {
                status: GroupStatus {
                    name: group_name(&gpu_ids),
                    gpu_ids,
                    instances: members.iter().map(|&i| instances[i].name.clone()).collect(),
                    strategy,
                    since: SystemTime::now(),
                    why,
                    pinned: None,
                    switching: false,
                    switches: 0,
                    problems: Vec::new(),
                    recent: Vec::new(),
                },
                think: has(ModelType::Think),
                vision: has(ModelType::Vision),
                members,
                since: Instant::now(),
                last_work: Instant::now(),
                staggered,
            }
        })
        .collect();
    groups.sort_by(|a, b| a.status.gpu_ids.cmp(&b.status.gpu_ids));
    groups
}

/// [`launch_turns`], with each footprint's index into `f` replaced by
/// its `ids` entry (the index of the instance it stands for).
pub fn launch_turns_as(f: &[Footprint<'_>], ids: &[usize]) -> Vec<Vec<Vec<usize>>> {
    launch_turns(f)
        .into_iter()
        .map(|steps| {
            steps
                .into_iter()
                .map(|step| step.into_iter().map(|i| ids[i]).collect())
                .collect()
        })
        .collect()
}

/// [`launch_turns`] of configured instances: the steps of each staggered
/// start, as indices into `instances` (external servers take no part).
pub fn staggered_start(instances: &[InstanceSpec]) -> Vec<Vec<Vec<usize>>> {
    let launched: Vec<usize> = (0..instances.len())
        .filter(|&i| instances[i].runtime.is_some())
        .collect();
    let footprints: Vec<Footprint<'_>> = launched
        .iter()
        .map(|&i| {
            let spec = &instances[i];
            Footprint {
                model: spec.model,
                gpu_ids: &spec.gpu_ids,
                share: spec.plan.gpu_memory_utilization,
                sleep: spec.sleep.is_some(),
            }
        })
        .collect();
    launch_turns_as(&footprints, &launched)
}

/// The strategy a group starts in when its launches are staggered (see
/// [`launch_turns`]): that of the kind launched last, the only one awake.
fn first_awake(instances: &[Managed], members: &[usize]) -> Option<Strategy> {
    let footprints: Vec<Footprint<'_>> = members
        .iter()
        .map(|&i| {
            let m = &instances[i];
            Footprint {
                model: m.model,
                gpu_ids: &m.gpu_ids,
                share: m.configured.gpu_memory_utilization,
                sleep: m.sleep,
            }
        })
        .collect();
    let turns = launch_turns(&footprints);
    let last = turns.first()?.last()?;
    match footprints[*last.first()?].model {
        ModelType::Think => Some(Strategy::Think),
        ModelType::Vision => Some(Strategy::Vision),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::LaunchPlan;

    fn managed(name: &str, model: ModelType, gpu_ids: &[u32]) -> Managed {
        Managed {
            name: name.into(),
            model,
            configured: LaunchPlan {
                gpu_memory_utilization: 0.4,
            },
            sleep: false,
            gpu_ids: gpu_ids.to_vec(),
        }
    }

    #[test]
    fn instances_linked_through_a_shared_gpu_form_one_group() {
        let ids: [&[u32]; 5] = [&[2, 3], &[0, 1], &[1, 2], &[5], &[]];
        assert_eq!(gpu_groups(&ids), vec![vec![0, 1, 2], vec![3], vec![4]]);
        assert_eq!(group_gpus(&ids, &[0, 1, 2]), vec![0, 1, 2, 3]);
        assert_eq!(group_name(&[0]), "gpu 0");
        assert_eq!(group_name(&[2, 3]), "gpus 2,3");
        assert_eq!(group_name(&[]), "gpus unset");
    }

    #[test]
    fn sleepers_that_do_not_fit_at_once_launch_think_first_then_vision() {
        let f = |model, gpu_ids: &'static [u32], share, sleep| Footprint {
            model,
            gpu_ids,
            share,
            sleep,
        };
        let (t, v) = (ModelType::Think, ModelType::Vision);
        // Vision first in the configuration; think still loads first.
        let both = [f(v, &[0], 0.9, true), f(t, &[0], 0.9, true)];
        assert_eq!(launch_turns(&both), vec![vec![vec![1], vec![0]]]);
        // They fit: launched together.
        assert!(launch_turns(&[f(v, &[0], 0.4, true), f(t, &[0], 0.4, true)]).is_empty());
        // Without sleep mode, or with one kind alone over the GPU, or with
        // no GPU named: nothing can take turns.
        assert!(launch_turns(&[f(v, &[0], 0.9, false), f(t, &[0], 0.9, true)]).is_empty());
        assert!(launch_turns(&[f(t, &[0], 0.6, true), f(t, &[0], 0.6, true)]).is_empty());
        let three = [
            f(t, &[0], 0.6, true),
            f(t, &[0], 0.6, true),
            f(v, &[0], 0.5, true),
        ];
        assert!(launch_turns(&three).is_empty());
        assert!(launch_turns(&[f(v, &[], 0.9, true), f(t, &[], 0.9, true)]).is_empty());
        // Groups on their own GPUs are decided each alone.
        let two = [
            f(t, &[0], 0.5, true),
            f(v, &[0], 0.6, true),
            f(t, &[1], 0.5, true),
            f(v, &[1], 0.4, true),
        ];
        assert_eq!(launch_turns(&two), vec![vec![vec![0], vec![1]]]);
        // The allocator starts such a group with the kind launched last.
        let mut m = vec![
            managed("vision", ModelType::Vision, &[0]),
            managed("think", ModelType::Think, &[0]),
        ];
        for x in &mut m {
            x.sleep = true;
            x.configured.gpu_memory_utilization = 0.9;
        }
        assert_eq!(groups_of(&m)[0].status.strategy, Strategy::Vision);
        // Both as configured cannot run: `static` (a pin) keeps vision.
        assert_eq!(
            groups_of(&m)[0].fit(Strategy::Static),
            Some(Strategy::Vision)
        );
        assert_eq!(groups_of(&m)[0].fit(Strategy::Think), Some(Strategy::Think));
        m[0].sleep = false;
        assert_eq!(groups_of(&m)[0].status.strategy, Strategy::Static);
    }

    #[test]
    fn a_group_of_one_kind_runs_as_configured_for_its_own_work_only() {
        let groups = groups_of(&[
            managed("think", ModelType::Think, &[1]),
            managed("vision", ModelType::Vision, &[0]),
        ]);
        assert_eq!(groups.len(), 2);
        assert_eq!(groups[0].status.instances, ["vision"], "ordered by GPU");
        let vision = &groups[0];
        assert!(vision.has(ModelType::Vision) && !vision.has(ModelType::Think));
        assert_eq!(vision.fit(Strategy::Vision), Some(Strategy::Static));
        assert_eq!(vision.fit(Strategy::Shared), Some(Strategy::Static));
        assert_eq!(vision.fit(Strategy::Idle), Some(Strategy::Idle));
        assert_eq!(vision.fit(Strategy::Think), None);
        let both = groups_of(&[
            managed("think", ModelType::Think, &[0]),
            managed("vision", ModelType::Vision, &[0]),
        ]);
        assert_eq!(both.len(), 1);
        assert_eq!(both[0].fit(Strategy::Think), Some(Strategy::Think));
    }
}
