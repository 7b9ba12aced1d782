//! Stopping on purpose: draining the dispatchers, parking and unparking
//! (the allocator), relaunching with a new plan, and the daemon's shutdown.

use std::time::Duration;

use ractor::{ActorRef, DerivedActorRef, RpcReplyPort};
use tracing::{info, warn};

use super::{tick, ContainerMsg, ContainerState, InstanceEvent, InstanceState, Tick};
use crate::runtime::LaunchPlan;

impl ContainerState {
    /// Answers whoever waits for the park: nothing runs now.
    pub(super) fn parked_now(&mut self) {
        for r in self.pending_park.drain(..) {
            let _ = r.send(());
        }
    }

    pub(super) fn stop_server(&mut self, myself: &ActorRef<ContainerMsg>, why: &str) -> bool {
        let Some(runtime) = self.args.runtime.clone() else {
            return false;
        };
        let Some(id) = self.id.take() else {
            return false;
        };
        self.generation += 1;
        let generation = self.generation;
        self.set(InstanceState::Stopping, format!("stopping {id}: {why}"));
        let grace = self.args.settings.stop_grace;
        let drain = self.args.settings.drain_timeout;
        let watchers = self.args.watchers.clone();
        let me = myself.clone();
        tokio::spawn(async move {
            drain_watchers(watchers, drain).await;
            let result = runtime.stop(&id, grace).await;
            let _ = me.cast(tick(Tick::StopDone { generation, result }));
        });
        true
    }

    /// Stops the server and launches it again with the current plan.
    pub(super) fn relaunch(&mut self, myself: &ActorRef<ContainerMsg>) {
        if !self.stop_server(myself, "relaunching with a new plan") {
            self.launch(myself);
        }
    }

    /// The allocator parks it: sleep or stop the server, and keep it so.
    pub(super) fn park(&mut self, myself: &ActorRef<ContainerMsg>, reply: RpcReplyPort<()>) {
        if self.args.runtime.is_none() {
            let _ = reply.send(());
            return;
        }
        self.args.parked = true;
        match self.state {
            InstanceState::Stopping => self.pending_park.push(reply),
            InstanceState::Stopped | InstanceState::Failed => {
                let _ = reply.send(());
            }
            InstanceState::Sleeping if self.asleep.is_some() => {
                let _ = reply.send(());
            }
            InstanceState::Sleeping => self.pending_park.push(reply),
            // Sleep mode, still launching or loading: it finishes its load,
            // then sleeps (see `loaded`), and the park is answered once it
            // is asleep. Stopping it would cost a whole load later.
            // (One whose launch waits for memory held by what runs would
            // wait for ever: it is not launched, as without sleep mode.)
            InstanceState::Starting | InstanceState::Loading
                if self.args.sleep.is_some() && !self.short_of_memory =>
            {
                info!(
                    instance = self.name(),
                    "parked by the allocator while loading: it finishes loading, then sleeps"
                );
                self.pending_park.push(reply);
            }
            _ => {
                self.pending_park.push(reply);
                if !self.sleep_server(myself, "the allocator parks it")
                    && !self.stop_server(myself, "the allocator parks it")
                {
                    // Nothing runs (restarting, or still launching):
                    // stop whatever would come next.
                    self.generation += 1;
                    self.set(InstanceState::Stopped, "parked by the allocator");
                    self.parked_now();
                }
            }
        }
    }

    /// The allocator runs it again with `plan`.
    pub(super) fn unpark(
        &mut self,
        myself: &ActorRef<ContainerMsg>,
        plan: LaunchPlan,
        reply: RpcReplyPort<()>,
    ) {
        let same_plan = plan == self.args.plan;
        self.args.plan = plan;
        let was_parked = std::mem::replace(&mut self.args.parked, false);
        match self.state {
            InstanceState::Stopped if was_parked => self.launch(myself),
            InstanceState::Sleeping if self.asleep.is_some() && same_plan => {
                self.wake(myself, "the allocator runs it again");
            }
            // Another memory share needs a new server.
            InstanceState::Sleeping if self.asleep.is_some() => self.relaunch(myself),
            // Falling asleep: woken (or relaunched) once asleep.
            InstanceState::Sleeping => self.replan |= !same_plan,
            // Parked while loading: it serves once loaded, unless another
            // memory share needs a new server.
            InstanceState::Starting | InstanceState::Loading if was_parked && !same_plan => {
                self.relaunch(myself)
            }
            _ => {}
        }
        let _ = reply.send(());
    }

    /// Relaunch with another plan, draining first.
    pub(super) fn reconfigure(
        &mut self,
        myself: &ActorRef<ContainerMsg>,
        plan: LaunchPlan,
        reply: RpcReplyPort<()>,
    ) {
        if self.args.runtime.is_none() || plan == self.args.plan {
            self.args.plan = plan;
            let _ = reply.send(());
            return;
        }
        info!(
            instance = self.name(),
            "reconfiguring: gpu_memory_utilization {} → {}",
            self.args.plan.gpu_memory_utilization,
            plan.gpu_memory_utilization
        );
        self.args.plan = plan;
        match self.state {
            InstanceState::Failed | InstanceState::Stopping => {
                let _ = reply.send(());
            }
            InstanceState::Restarting | InstanceState::Stopped => {
                // The next launch uses the new plan.
                let _ = reply.send(());
            }
            _ => {
                self.pending_reconfigure.push(reply);
                if !self.stop_server(myself, "relaunching with a new plan") {
                    self.generation += 1;
                    self.launch(myself);
                }
            }
        }
    }

    /// The daemon stops: stop the server, or leave it for the next run.
    pub(super) fn shutdown(
        &mut self,
        myself: &ActorRef<ContainerMsg>,
        stop_server: bool,
        reply: RpcReplyPort<()>,
    ) {
        if !stop_server {
            if let Some(id) = &self.id {
                info!(
                    instance = self.name(),
                    "leaving {id} running for the next start to adopt (keep_servers_on_exit)"
                );
            }
            let _ = reply.send(());
            return;
        }
        self.pending_reconfigure.clear();
        if self.stop_server(myself, "the daemon is stopping") {
            self.shutdown_waiters.push(reply);
        } else {
            self.generation += 1;
            self.set(InstanceState::Stopped, "the daemon is stopping");
            let _ = reply.send(());
        }
    }

    /// A stop finished: answer who waits, and launch again when it was a relaunch.
    pub(super) fn stop_done(
        &mut self,
        myself: &ActorRef<ContainerMsg>,
        generation: u64,
        result: Result<(), String>,
    ) {
        if let Err(e) = &result {
            warn!(instance = self.name(), "stopping the server failed: {e}");
        }
        if generation != self.generation {
            return;
        }
        if !self.shutdown_waiters.is_empty() {
            self.set(InstanceState::Stopped, "stopped with the daemon");
            for w in self.shutdown_waiters.drain(..) {
                let _ = w.send(());
            }
            self.parked_now();
        } else if self.state == InstanceState::Stopping {
            if self.args.parked {
                self.set(
                    InstanceState::Stopped,
                    "parked by the allocator (its strategy does not run this instance)",
                );
            } else {
                // Stopped to relaunch with a new plan.
                self.launch(myself);
            }
            self.parked_now();
        }
    }
}

/// Tells each dispatcher the server is about to go, and waits (up to
/// `limit` each) until its requests in flight have finished.
pub(super) async fn drain_watchers(watchers: Vec<DerivedActorRef<InstanceEvent>>, limit: Duration) {
    for w in watchers {
        let (tx, rx) = ractor::concurrency::oneshot();
        if w.send_message(InstanceEvent::Stopping { idle: tx.into() })
            .is_ok()
        {
            let _ = tokio::time::timeout(limit, rx).await;
        }
    }
}
