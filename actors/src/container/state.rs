//! The instance's states and their transitions: every change goes through
//! `set`, which logs it, keeps it for `Status` and tells the watchers when
//! Ready changes.

use std::sync::atomic::Ordering;
use std::time::Duration;

use ractor::DerivedActorRef;
use tokio::time::Instant;
use tracing::{error, info, warn};

use super::{ContainerState, InstanceEvent, HISTORY};
use crate::job::ModelType;
use crate::runtime::LaunchPlan;

/// One state change, as `gpu-feeder instances` lists it.
#[derive(Clone, Debug, PartialEq)]
pub struct Transition {
    /// The state left.
    pub from: InstanceState,
    /// The state entered.
    pub to: InstanceState,
    /// Why.
    pub reason: String,
    /// When (wall clock).
    pub at: std::time::SystemTime,
    /// When (monotonic: durations between transitions are taken from it).
    pub instant: Instant,
}

/// Where an instance is in its life, in lifecycle order (the names are
/// those of logs, `instances --json` and metrics).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum InstanceState {
    /// Not running (before the first start, or stopped on purpose).
    Stopped,
    /// Being launched or adopted.
    Starting,
    /// Up, loading its model: not yet confirmed by a probe.
    Loading,
    /// Confirmed: receives requests.
    Ready,
    /// Failed its probes, exited, or did not load in time.
    Unhealthy,
    /// Waiting out the backoff before it is launched again.
    Restarting,
    /// Being stopped.
    Stopping,
    /// Restarted too often: left alone until an operator steps in.
    Failed,
    /// Sleep mode: draining before its sleep, or asleep (the server runs,
    /// its model is off the GPU).
    Sleeping,
    /// Sleep mode: being woken and confirmed by a canary.
    Waking,
}

named!(InstanceState {
    Stopped = "stopped", Starting = "starting", Loading = "loading", Ready = "ready",
    Unhealthy = "unhealthy", Restarting = "restarting", Stopping = "stopping",
    Failed = "failed", Sleeping = "sleeping", Waking = "waking",
});

/// One instance as `gpu-feeder instances` shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct InstanceStatus {
    /// The instance.
    pub name: String,
    /// Its model.
    pub model: ModelType,
    /// `docker`, `process` or `external`.
    pub backend: String,
    /// Its state.
    pub state: InstanceState,
    /// Why it is in that state.
    pub reason: String,
    /// How long it has been in that state.
    pub in_state_for: Duration,
    /// Container id or process id.
    pub container_id: Option<String>,
    /// Whether the running server was adopted from an earlier run.
    pub adopted: bool,
    /// Restarts since the daemon started.
    pub restarts: u64,
    /// The last failure, with the server's last lines of output.
    pub last_error: Option<String>,
    /// The plan it runs with (launched instances only).
    pub plan: Option<LaunchPlan>,
    /// The latest transitions, oldest first.
    pub history: Vec<Transition>,
}

impl ContainerState {
    pub(super) fn name(&self) -> &str {
        &self.args.name
    }

    pub(super) fn backend(&self) -> &'static str {
        self.args
            .runtime
            .as_ref()
            .map_or("external", |r| r.backend())
    }

    pub(super) fn set(&mut self, state: InstanceState, reason: impl Into<String>) {
        self.live.store(self.generation, Ordering::SeqCst);
        let reason = reason.into();
        let was = self.state;
        let instance = self.args.name.as_str();
        let msg = format!("{was} → {state}: {reason}");
        match state {
            InstanceState::Failed => error!(instance, "{msg}"),
            InstanceState::Unhealthy => warn!(instance, "{msg}"),
            _ => info!(instance, "{msg}"),
        }
        let ready_changed = (was == InstanceState::Ready) != (state == InstanceState::Ready);
        if self.history.len() == HISTORY {
            self.history.pop_front();
        }
        self.history.push_back(Transition {
            from: was,
            to: state,
            reason: reason.clone(),
            at: std::time::SystemTime::now(),
            instant: Instant::now(),
        });
        self.state = state;
        self.reason = reason;
        if let Some(done) = &self.args.turn.done {
            // The next instances of a staggered start may load now.
            let off_gpu = matches!(
                state,
                InstanceState::Stopped | InstanceState::Failed | InstanceState::Unhealthy
            ) || (state == InstanceState::Sleeping && self.asleep.is_some());
            if off_gpu && !*done.borrow() {
                done.send_replace(true);
            }
        }
        self.since = Instant::now();
        if state == InstanceState::Ready && was != InstanceState::Ready {
            self.tracker.started(self.since);
        }
        if ready_changed {
            let ready = state == InstanceState::Ready;
            self.args
                .watchers
                .retain(|w| w.send_message(InstanceEvent::Ready(ready)).is_ok());
        }
    }

    /// Tells the dispatchers the server went down with their requests.
    pub(super) fn tell_down(&mut self, reason: &str) {
        let reason = format!("{} went down: {reason}", self.args.name);
        self.args.watchers.retain(|w| {
            w.send_message(InstanceEvent::Down {
                reason: reason.clone(),
            })
            .is_ok()
        });
    }

    pub(super) fn status(&self) -> InstanceStatus {
        InstanceStatus {
            name: self.args.name.clone(),
            model: self.args.model,
            backend: self.backend().to_string(),
            state: self.state,
            reason: self.reason.clone(),
            in_state_for: self.since.elapsed(),
            container_id: self.id.clone(),
            adopted: self.adopted,
            restarts: self.restarts,
            last_error: self.last_error.clone(),
            plan: self.args.runtime.as_ref().map(|_| self.args.plan.clone()),
            history: self.history.iter().cloned().collect(),
        }
    }

    /// A dispatcher watches: it hears the Ready state now, and every change.
    pub(super) fn watch(&mut self, dispatcher: DerivedActorRef<InstanceEvent>) {
        self.args
            .watchers
            .retain(|w| w.get_id() != dispatcher.get_id());
        let _ = dispatcher.send_message(InstanceEvent::Ready(self.state == InstanceState::Ready));
        self.args.watchers.push(dispatcher);
    }
}
