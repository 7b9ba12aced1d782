//! The allocator's policy, pure: the strategies, what `decide` sees, and
//! the rule that picks the next strategy from the backlog.

use std::time::Duration;

use tracing::debug;

use crate::job::{ModelType, QueueStats};

/// A strategy, named in config, logs, metrics and the CLI.
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

named!(Strategy {
    Static = "static", Shared = "shared", Think = "think", Vision = "vision", Idle = "idle",
});

impl Strategy {
    /// Parses a name; the error lists the names.
    pub fn parse(s: &str) -> Result<Strategy, String> {
        Strategy::from_name(s).ok_or_else(|| {
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
    pub(crate) fn drain_time(&self) -> Option<Duration> {
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

/// The backlog of `model` in `stats` (its rate not yet measured).
pub(super) fn backlog_of(stats: &QueueStats, model: ModelType) -> Backlog {
    let m = stats.model(model);
    Backlog {
        pending: m.counts.pending,
        oldest: m.oldest_pending_age.unwrap_or_default(),
        rate: 0.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn both_waiting(current: Strategy) -> Inputs {
        let waiting = Backlog {
            pending: 100,
            oldest: Duration::from_secs(120),
            rate: 0.0,
        };
        Inputs {
            current,
            held_for: Duration::from_secs(3_600),
            idle_for: Duration::ZERO,
            think: waiting,
            vision: waiting,
            cost_think: Duration::from_secs(5),
            cost_vision: Duration::from_secs(5),
            by_sleep: true,
            pinned: None,
        }
    }

    #[test]
    fn every_strategy_parses_back_from_its_name() {
        for s in Strategy::ALL {
            assert_eq!(Strategy::parse(s.as_str()), Ok(s));
        }
        assert!(Strategy::parse("turbo").unwrap_err().contains("static"));
    }

    #[test]
    fn a_backlog_drains_at_its_measured_rate() {
        let b = Backlog {
            pending: 30,
            oldest: Duration::ZERO,
            rate: 3.0,
        };
        assert_eq!(b.drain_time(), Some(Duration::from_secs(10)));
        assert_eq!(Backlog { rate: 0.0, ..b }.drain_time(), None);
    }

    #[test]
    fn turns_switch_after_the_dwell_unless_the_served_model_drains_first() {
        let s = AllocatorSettings::default();
        let turn = decide(&both_waiting(Strategy::Think), &s).map(|d| d.to);
        assert_eq!(turn, Some(Strategy::Vision));
        let mut almost_done = both_waiting(Strategy::Think);
        almost_done.think.rate = 50.0; // 100 jobs in 2 s, less than 10 s of switches
        assert_eq!(decide(&almost_done, &s), None);
        let mut young = both_waiting(Strategy::Think);
        young.held_for = Duration::from_secs(1);
        assert_eq!(decide(&young, &s), None);
        let from_idle = decide(&both_waiting(Strategy::Idle), &s).map(|d| d.to);
        assert_eq!(from_idle, Some(Strategy::Think), "think first");
    }

    #[test]
    fn the_backlog_is_read_per_model() {
        let stats = QueueStats::default();
        let b = backlog_of(&stats, ModelType::Think);
        assert_eq!(b.pending, 0);
        assert_eq!(b.rate, 0.0);
    }
}
