//! `InstanceSpec`: one model server instance as the actors see it, from
//! the configuration: its name, model, window, client, and how it is
//! launched. Shared by the instance and dispatch supervisors.

use std::sync::Arc;
use std::time::Duration;

use crate::inference::InferenceClient;
use crate::job::ModelType;
use crate::runtime::{ContainerRuntime, LaunchPlan};
use crate::window::WindowMode;

/// One instance, as the supervisors and its actors see it.
#[derive(Clone)]
pub struct InstanceSpec {
    /// Unique name.
    pub name: String,
    /// The model it serves.
    pub model: ModelType,
    /// Requests in flight at most: fixed, or found by the controller.
    pub window: WindowMode,
    /// Its server, as requests see it.
    pub client: Arc<dyn InferenceClient>,
    /// How its server is launched; `None` for an external server.
    pub runtime: Option<Arc<dyn ContainerRuntime>>,
    /// The launch plan at start.
    pub plan: LaunchPlan,
    /// Time allowed from launch to Ready.
    pub startup_timeout: Duration,
    /// The GPUs its server uses (thermal back-off).
    pub gpu_ids: Vec<u32>,
    /// Sleep mode: the server was launched with `--enable-sleep-mode`, and
    /// the allocator switches it by sleep and wake rather than stop and
    /// launch; `None` without.
    pub sleep: Option<SleepLevel>,
}

/// How deep an instance with sleep mode sleeps.
#[derive(Clone, Copy, Debug)]
pub enum SleepLevel {
    /// Weights to host memory: wakes in seconds, holds their size in RAM.
    One,
    /// Weights dropped: reloaded from disk on wake (slower), no RAM held.
    Two,
    /// Level 1 when the host has the memory for the weights (with a
    /// quarter to spare) at the moment of the sleep, else level 2.
    Auto {
        /// The size of the model's weights, when known; unknown sleeps at 2.
        weights_bytes: Option<u64>,
        /// Reads the host's available memory, where the host tells
        /// (supplied by the daemon: this crate does no host I/O).
        host_available: fn() -> Option<u64>,
    },
}

/// Levels are alike when they sleep alike: the host reader is not compared.
impl PartialEq for SleepLevel {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (SleepLevel::One, SleepLevel::One) | (SleepLevel::Two, SleepLevel::Two) => true,
            (
                SleepLevel::Auto {
                    weights_bytes: a, ..
                },
                SleepLevel::Auto {
                    weights_bytes: b, ..
                },
            ) => a == b,
            _ => false,
        }
    }
}

impl SleepLevel {
    /// The level of a sleep now, reading the host's memory when it matters.
    pub(crate) fn choose_now(&self) -> (u8, String) {
        match *self {
            SleepLevel::Auto {
                weights_bytes: Some(_),
                host_available,
            } => self.choose(host_available()),
            _ => self.choose(None),
        }
    }

    /// The level of a sleep now, given the host's available memory, and why.
    pub fn choose(&self, host_available: Option<u64>) -> (u8, String) {
        match *self {
            SleepLevel::One => (1, "sleep_level = 1".into()),
            SleepLevel::Two => (2, "sleep_level = 2".into()),
            SleepLevel::Auto {
                weights_bytes: None,
                ..
            } => (
                2,
                "sleep_level = \"auto\" without the weights' size (set weights_gib)".into(),
            ),
            SleepLevel::Auto {
                weights_bytes: Some(w),
                ..
            } => {
                let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
                match host_available {
                    Some(a) if a >= w + w / 4 => (
                        1,
                        format!(
                            "auto: {:.1} GiB of host memory free for {:.1} GiB of weights",
                            gib(a),
                            gib(w)
                        ),
                    ),
                    Some(a) => (
                        2,
                        format!(
                            "auto: only {:.1} GiB of host memory free for {:.1} GiB of weights",
                            gib(a),
                            gib(w)
                        ),
                    ),
                    None => (2, "auto: the host's free memory is unknown".into()),
                }
            }
        }
    }
}

impl InstanceSpec {
    /// An instance whose server someone else runs: only probed.
    pub fn external(
        name: impl Into<String>,
        model: ModelType,
        window: impl Into<WindowMode>,
        client: Arc<dyn InferenceClient>,
    ) -> Self {
        InstanceSpec {
            name: name.into(),
            model,
            window: window.into(),
            client,
            runtime: None,
            plan: LaunchPlan {
                gpu_memory_utilization: 0.9,
            },
            startup_timeout: Duration::from_secs(900),
            gpu_ids: Vec::new(),
            sleep: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_sleeps_at_one_only_with_room_for_the_weights() {
        let gib = 1u64 << 30;
        let auto = SleepLevel::Auto {
            weights_bytes: Some(16 * gib),
            host_available: || None,
        };
        assert_eq!(auto.choose(Some(64 * gib)).0, 1);
        assert_eq!(auto.choose(Some(20 * gib)).0, 1);
        assert_eq!(auto.choose(Some(19 * gib)).0, 2);
        assert_eq!(auto.choose(None).0, 2);
        let unknown = SleepLevel::Auto {
            weights_bytes: None,
            host_available: || Some(1 << 50),
        };
        assert!(unknown.choose(Some(1 << 50)).1.contains("weights_gib"));
        assert_eq!(SleepLevel::One.choose(Some(0)).0, 1);
        assert_eq!(SleepLevel::Two.choose(Some(1 << 50)).0, 2);
    }

    #[test]
    fn a_sleep_now_reads_the_host_only_when_it_matters() {
        let gib = 1u64 << 30;
        let roomy = SleepLevel::Auto {
            weights_bytes: Some(gib),
            host_available: || Some(64 << 30),
        };
        assert_eq!(roomy.choose_now().0, 1);
        let tight = SleepLevel::Auto {
            weights_bytes: Some(gib),
            host_available: || Some(1 << 20),
        };
        assert_eq!(tight.choose_now().0, 2);
        assert_eq!(SleepLevel::One.choose_now().0, 1);
    }
}
