//! Cost learning: what bringing each model in costs (its load, or its
//! wake), and how fast each model's jobs finish while it is served.

use std::time::Duration;

use tokio::time::Instant;

use super::{AllocatorState, Strategy, SwitchCost};
use crate::container::{InstanceState, InstanceStatus};
use crate::job::{ModelType, QueueStats};

impl AllocatorState {
    /// Learns from the instances' histories and refreshes `costs`.
    pub(super) fn learn(&mut self, statuses: &[InstanceStatus]) {
        self.learn_costs(statuses);
        self.costs = [ModelType::Think, ModelType::Vision]
            .into_iter()
            .map(|m| SwitchCost {
                model: m,
                load: self.loads.get(&m).copied(),
                wake: self.wakes.get(&m).copied(),
            })
            .collect();
    }

    /// The longest Starting → Ready (a load; or → Sleeping, straight from
    /// Loading) and Waking → Ready (a wake) seen per model.
    fn learn_costs(&mut self, statuses: &[InstanceStatus]) {
        for s in statuses {
            let mut began: Option<(InstanceState, Instant)> = None;
            for t in &s.history {
                match t.to {
                    InstanceState::Starting | InstanceState::Waking => {
                        began = Some((t.to, t.instant))
                    }
                    // Loaded while parked, and put to sleep at once: a load too.
                    InstanceState::Sleeping if t.from == InstanceState::Loading => {
                        if let Some((InstanceState::Starting, at)) = began.take() {
                            let d = t.instant.duration_since(at);
                            let e = self.loads.entry(s.model).or_default();
                            *e = (*e).max(d);
                        }
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
    pub(super) fn cost(
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
    pub(super) fn learn_rates(&mut self, stats: &QueueStats) {
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
