//! Health and restarts: probe outcomes, exits and load timeouts make an
//! instance Unhealthy; a restart follows the backoff, or a crash loop makes
//! it Failed until an operator revives it.

use ractor::{ActorRef, RpcReplyPort};
use tokio::time::Instant;
use tracing::{info, warn};

use super::{tick, ContainerMsg, ContainerState, InstanceState, Tick};
use crate::inference::ProbeError;
use crate::restart::{RestartDecision, RestartPolicy};
use crate::runtime::Exit;

impl ContainerState {
    /// The server is down or unusable: tell the dispatchers, then restart
    /// it after the backoff, or give up on a crash loop.
    pub(super) fn unhealthy(&mut self, myself: &ActorRef<ContainerMsg>, reason: String) {
        let was_ready_for = (self.state == InstanceState::Ready).then(|| self.since.elapsed());
        self.last_error = Some(reason.clone());
        self.set(InstanceState::Unhealthy, reason.clone());
        self.tell_down(&reason);
        if self.args.parked {
            // Parked while loading, and the load failed: nothing holds the
            // GPU now, and it is not launched again until its strategy runs it.
            self.parked_now();
        }
        let Some(runtime) = self.args.runtime.clone() else {
            return; // External: probes bring it back.
        };
        let s = &self.args.settings;
        let policy = RestartPolicy {
            backoff: s.restart,
            max_restarts: s.crash_loop_restarts as usize,
            window: s.crash_loop_window,
            reset_after: s.restart_reset,
        };
        if was_ready_for.is_none() {
            // Only a run that became ready can have lasted.
            self.tracker.clear_start();
        }
        let decision = self.tracker.failed(&policy, Instant::now(), reason);
        self.generation += 1;
        let generation = self.generation;
        let old = self.id.take();
        let grace = s.stop_grace;
        if let RestartDecision::Escalate { restarts: n } = decision {
            let window = s.crash_loop_window.as_secs();
            self.set(
                InstanceState::Failed,
                format!(
                    "crash loop: {n} restarts within {window} s did not help; not restarting again. \
                     Its jobs wait in `pending`. Fix the cause (see last_error), then `gpu-feeder instances restart {}`",
                    self.args.name
                ),
            );
            if let Some(id) = old {
                let me = myself.clone();
                tokio::spawn(async move {
                    let result = runtime.stop(&id, grace).await;
                    let _ = me.cast(tick(Tick::StopDone { generation, result }));
                });
            }
            return;
        }
        let RestartDecision::RestartIn(delay) = decision else {
            unreachable!("escalation returned above")
        };
        self.set(
            InstanceState::Restarting,
            format!(
                "restart {} in {:.1} s",
                self.restarts + 1,
                delay.as_secs_f64()
            ),
        );
        let me = myself.clone();
        tokio::spawn(async move {
            if let Some(id) = old {
                if let Err(e) = runtime.stop(&id, grace).await {
                    warn!("stopping {id} before its restart failed: {e}");
                }
            }
            me.send_after(delay, move || tick(Tick::RestartNow { generation }));
        });
    }

    /// A probe confirmed the load: Ready, or, parked with sleep mode (the
    /// allocator's strategy does not run it, or a staggered start), straight
    /// to sleep without serving.
    fn loaded(&mut self, myself: &ActorRef<ContainerMsg>) {
        let parked = self.args.parked && self.args.runtime.is_some();
        if parked && self.sleep_server(myself, "loaded while parked by the allocator") {
            return;
        }
        self.set(
            InstanceState::Ready,
            "the server answers and serves its model",
        );
    }

    pub(super) fn probed(
        &mut self,
        myself: &ActorRef<ContainerMsg>,
        outcome: Result<(), ProbeError>,
    ) {
        match (self.state, outcome) {
            (InstanceState::Loading | InstanceState::Unhealthy, Ok(()))
                if self.state == InstanceState::Loading || self.args.runtime.is_none() =>
            {
                self.failures = 0;
                self.last_probe_error = None;
                self.loaded(myself);
            }
            (InstanceState::Ready, Ok(())) => self.failures = 0,
            (InstanceState::Loading, Err(e)) => {
                if self.last_probe_error.as_ref().map(std::mem::discriminant)
                    != Some(std::mem::discriminant(&e))
                {
                    info!(instance = self.name(), "still loading: {e}");
                }
                self.last_probe_error = Some(e);
            }
            (InstanceState::Ready, Err(e)) => {
                self.failures += 1;
                let threshold = self.args.settings.failure_threshold.max(1);
                if self.failures >= threshold {
                    let reason = format!("{} failed probes in a row; the last: {e}", self.failures);
                    self.unhealthy(myself, reason);
                } else {
                    warn!(
                        instance = self.name(),
                        "probe failed ({} of {threshold}): {e}", self.failures
                    );
                }
                self.last_probe_error = Some(e);
            }
            _ => {}
        }
    }

    /// The server exited: Unhealthy (a restart), or Stopped when it slept.
    pub(super) fn exited(
        &mut self,
        myself: &ActorRef<ContainerMsg>,
        generation: u64,
        exit: Exit,
        log_tail: String,
    ) {
        if generation != self.generation {
            return;
        }
        if self.state == InstanceState::Sleeping {
            self.id = None;
            self.asleep = None;
            self.generation += 1;
            self.set(
                InstanceState::Stopped,
                format!(
                    "the server {} while asleep; launched again when its strategy runs it",
                    exit.detail
                ),
            );
            self.parked_now();
            if !self.args.parked {
                self.launch(myself);
            }
            return;
        }
        if matches!(
            self.state,
            InstanceState::Loading
                | InstanceState::Ready
                | InstanceState::Starting
                | InstanceState::Waking
        ) {
            let tail = log_tail.trim();
            let reason = if tail.is_empty() {
                format!("the server {}", exit.detail)
            } else {
                format!("the server {}; its last output:\n{tail}", exit.detail)
            };
            self.id = None;
            self.unhealthy(myself, reason);
        }
    }

    /// The load took too long: Unhealthy.
    pub(super) fn startup_timeout(&mut self, myself: &ActorRef<ContainerMsg>, generation: u64) {
        if generation == self.generation && self.state == InstanceState::Loading {
            let last = self
                .last_probe_error
                .as_ref()
                .map_or("no probe answered".to_string(), |e| e.to_string());
            let reason = format!(
                "not ready within startup_timeout_s = {} (last probe: {last})",
                self.args.settings.startup_timeout.as_secs()
            );
            self.unhealthy(myself, reason);
        }
    }

    /// The backoff is over: launch again.
    pub(super) fn restart_now(&mut self, myself: &ActorRef<ContainerMsg>, generation: u64) {
        if generation == self.generation && self.state == InstanceState::Restarting {
            if self.args.parked {
                self.set(
                    InstanceState::Stopped,
                    "parked by the allocator: launched again when its strategy runs it",
                );
                return;
            }
            self.restarts += 1;
            self.launch(myself);
        }
    }

    /// An operator asks to launch a failed or stopped instance again.
    pub(super) fn revive(
        &mut self,
        myself: &ActorRef<ContainerMsg>,
        reply: RpcReplyPort<Result<(), String>>,
    ) {
        let answer = match self.state {
            _ if self.args.runtime.is_none() => Err(format!(
                "{} is an external server: gpu-feeder does not launch it",
                self.name()
            )),
            _ if self.args.parked => Err(format!(
                "{} is parked by the allocator: pin a strategy that runs it (`gpu-feeder strategy pin …`)",
                self.name()
            )),
            InstanceState::Failed | InstanceState::Stopped => {
                self.tracker.forgive();
                self.generation += 1;
                self.set(InstanceState::Stopped, "an operator asked for a restart");
                self.launch(myself);
                Ok(())
            }
            other => Err(format!(
                "{} is {other}: only a failed or stopped instance is restarted by hand (it restarts itself otherwise)",
                self.name()
            )),
        };
        let _ = reply.send(answer);
    }
}
