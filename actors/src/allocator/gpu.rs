//! GPU grouping: instances that share a GPU are decided together; each
//! group has its own strategy.

use std::collections::BTreeMap;
use std::time::SystemTime;

use tokio::time::Instant;

use super::{Managed, Strategy};
use crate::job::ModelType;

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

/// The GPU groups of `instances`, each at `static`, ordered by GPU (so the
/// first group, whose strategy is the top-level one, is on the lowest GPU).
pub(super) fn groups_of(instances: &[Managed]) -> Vec<Group> {
    let ids: Vec<&[u32]> = instances.iter().map(|m| m.gpu_ids.as_slice()).collect();
    let mut groups: Vec<Group> = gpu_groups(&ids)
        .into_iter()
        .map(|members| {
            let gpu_ids = group_gpus(&ids, &members);
            let has = |m: ModelType| members.iter().any(|&i| instances[i].model == m);
            Group {
                status: GroupStatus {
                    name: group_name(&gpu_ids),
                    gpu_ids,
                    instances: members.iter().map(|&i| instances[i].name.clone()).collect(),
                    strategy: Strategy::Static,
                    since: SystemTime::now(),
                    why: "every instance as configured, until the backlog asks for a switch".into(),
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
    groups.sort_by(|a, b| a.status.gpu_ids.cmp(&b.status.gpu_ids));
    groups
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
