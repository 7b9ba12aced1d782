//! Switch execution: drain and stop (or sleep) what the new strategy does
//! not run, then relaunch or wake what it does, checking what a sleep freed.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use ractor::rpc::CallResult;
use ractor::ActorRef;
use tokio::time::Instant;
use tracing::{info, warn};

use super::{AllocatorMsg, AllocatorState, Decision, GroupStatus, Strategy};
use crate::container::InstanceState;
use crate::gpu::GpuSnapshot;
use crate::instances::InstanceSupMsg;
use crate::runtime::LaunchPlan;

impl AllocatorState {
    /// The plan of each instance of group `g` under `s` (`None`: stopped).
    pub(super) fn targets(&self, g: usize, s: Strategy) -> Vec<(String, Option<LaunchPlan>)> {
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

    /// Switches group `g` to `d.to`: logs the plan, then applies it in a
    /// task (stops first, which frees memory), answered by `Applied`.
    pub(super) fn switch(&mut self, myself: &ActorRef<AllocatorMsg>, g: usize, d: Decision) {
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
            .filter(|m| {
                // Still loading: it sleeps once loaded, holding then what it
                // did not yet hold now; its sleep is not checked.
                !matches!(
                    self.states.get(&m.name),
                    Some(InstanceState::Starting | InstanceState::Loading | InstanceState::Stopped)
                )
            })
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
        group.status.switch_began(from, d.to);
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

    /// Applies an operator's pin to every group it fits (see `Group::fit`).
    pub(super) fn pin(&mut self, myself: &ActorRef<AllocatorMsg>, strategy: Option<Strategy>) {
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

    /// A switch of group `group` to `to` finished, with `problems` met.
    pub(super) fn applied(&mut self, group: usize, to: Strategy, problems: Vec<String>) {
        let several = self.groups.len() > 1;
        let Some(g) = self.groups.get_mut(group) else {
            return;
        };
        g.status.switching = false;
        g.status.switch_ended(problems.len());
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
