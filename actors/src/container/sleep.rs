//! Sleep mode: a parked instance's model sleeps instead of its server
//! stopping, and wakes (confirmed by a canary) when its strategy runs it.

use std::time::Duration;

use ractor::ActorRef;
use tokio::time::Instant;
use tracing::warn;

use super::stop::drain_watchers;
use super::{tick, ContainerMsg, ContainerState, InstanceState, Tick};
use crate::inference::InferenceClient;
use crate::spec::SleepLevel;

impl ContainerState {
    /// Sleep mode: drains the dispatchers, then puts the model to sleep;
    /// `false` when this instance does not sleep (or is not up to).
    pub(super) fn sleep_server(&mut self, myself: &ActorRef<ContainerMsg>, why: &str) -> bool {
        let Some(sleep) = self.args.sleep else {
            return false;
        };
        let up = matches!(
            self.state,
            InstanceState::Ready | InstanceState::Waking | InstanceState::Loading
        );
        if !up || self.id.is_none() {
            return false;
        }
        let (level, how) = sleep.choose_now();
        self.generation += 1;
        let generation = self.generation;
        self.asleep = None;
        self.set(
            InstanceState::Sleeping,
            format!("draining, then sleep level {level} ({how}): {why}"),
        );
        let drain = self.args.settings.drain_timeout;
        let watchers = self.args.watchers.clone();
        let client = self.args.client.clone();
        let me = myself.clone();
        tokio::spawn(async move {
            drain_watchers(watchers, drain).await;
            let result = client.sleep(level).await;
            let _ = me.cast(tick(Tick::SleepDone {
                generation,
                level,
                result,
            }));
        });
        true
    }

    /// Sleep mode: wakes the model and confirms it with a canary.
    pub(super) fn wake(&mut self, myself: &ActorRef<ContainerMsg>, why: &str) {
        // An adopted server's level is unknown unless configured: wake
        // as from level 2 (a reload after a level-1 sleep only costs time).
        let level = self.asleep.unwrap_or(2);
        self.generation += 1;
        let generation = self.generation;
        self.set(
            InstanceState::Waking,
            format!("waking from sleep level {level}: {why}"),
        );
        let client = self.args.client.clone();
        let me = myself.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let result = wake_server(&*client, level)
                .await
                .map(|()| started.elapsed());
            let _ = me.cast(tick(Tick::WakeDone { generation, result }));
        });
    }

    /// A sleep finished: asleep (then woken or relaunched when wanted), or stopped when it failed.
    pub(super) fn sleep_done(
        &mut self,
        myself: &ActorRef<ContainerMsg>,
        generation: u64,
        level: u8,
        result: Result<(), String>,
    ) {
        if generation != self.generation || self.state != InstanceState::Sleeping {
            return;
        }
        match result {
            Ok(()) => {
                self.asleep = Some(level);
                let kept = if level == 1 {
                    "its weights in host memory"
                } else {
                    "its weights dropped (reloaded from disk on wake)"
                };
                self.set(
                    InstanceState::Sleeping,
                    format!("asleep at level {level}, {kept}; woken in seconds when its strategy runs it"),
                );
                self.parked_now();
                if !self.args.parked {
                    if std::mem::take(&mut self.replan) {
                        self.relaunch(myself);
                    } else {
                        self.wake(myself, "the allocator runs it again");
                    }
                }
            }
            Err(e) => {
                let reason =
                    format!("the sleep (level {level}) failed: {e}; stopping the server instead");
                warn!(instance = self.name(), "{reason}");
                self.last_error = Some(reason.clone());
                if !self.stop_server(myself, &reason) {
                    self.set(InstanceState::Stopped, reason);
                    self.parked_now();
                }
            }
        }
    }

    /// A wake finished: Ready, or Unhealthy when it failed.
    pub(super) fn wake_done(
        &mut self,
        myself: &ActorRef<ContainerMsg>,
        generation: u64,
        result: Result<Duration, String>,
    ) {
        if generation != self.generation || self.state != InstanceState::Waking {
            return;
        }
        self.asleep = None;
        match result {
            Ok(took) => self.set(
                InstanceState::Ready,
                format!(
                    "woke in {:.1} s; a canary completion confirmed it",
                    took.as_secs_f64()
                ),
            ),
            Err(e) => self.unhealthy(myself, format!("waking failed: {e}")),
        }
    }

    /// What an adopted server said of its sleep.
    pub(super) fn adopted_asleep(
        &mut self,
        myself: &ActorRef<ContainerMsg>,
        generation: u64,
        asleep: bool,
    ) {
        if generation != self.generation || self.state != InstanceState::Loading || !asleep {
            return;
        }
        self.asleep = Some(match self.args.sleep {
            Some(SleepLevel::One) => 1,
            _ => 2,
        });
        if self.args.parked {
            self.set(
                InstanceState::Sleeping,
                "adopted asleep; woken when its strategy runs it",
            );
        } else {
            self.set(InstanceState::Sleeping, "adopted asleep");
            self.wake(myself, "adopted asleep, and its strategy runs it");
        }
    }
}

/// Wakes a sleeping model: everything at once from level 1; from level 2
/// the weights, their reload from disk (else the model answers garbage),
/// then the KV cache. A canary completion confirms it.
async fn wake_server(client: &dyn InferenceClient, level: u8) -> Result<(), String> {
    if level >= 2 {
        client.wake_up(Some("weights")).await?;
        client.reload_weights().await?;
        client.wake_up(Some("kv_cache")).await?;
    } else {
        client.wake_up(None).await?;
    }
    client
        .probe(true)
        .await
        .map_err(|e| format!("the canary completion after the wake failed: {e}"))
}
