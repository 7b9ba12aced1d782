//! `HealthActor`: probes every instance and reports Ready transitions.
//!
//! An instance is Ready after a successful probe, and stops being Ready
//! after `failure_threshold` consecutive failed probes. Dispatchers watch
//! their instance and send only while it is Ready.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tracing::{info, warn};

use crate::dispatch::DispatchMsg;
use crate::inference::InferenceClient;

/// Messages of the HealthActor.
#[derive(Debug)]
pub enum HealthMsg {
    /// Time to probe every instance.
    Probe,
    /// A probe's answer.
    Probed {
        /// The instance.
        instance: String,
        /// `Err` says what failed.
        result: Result<(), String>,
    },
    /// `dispatcher` wants `Ready` updates for `instance` (sent the current state at once).
    Watch {
        /// The instance.
        instance: String,
        /// The dispatcher.
        dispatcher: ActorRef<DispatchMsg>,
    },
    /// Each instance's health.
    Status {
        /// The snapshot.
        reply: RpcReplyPort<Vec<InstanceHealth>>,
    },
}

/// One instance's health, as `Status` reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct InstanceHealth {
    /// The instance.
    pub instance: String,
    /// Whether it is Ready.
    pub ready: bool,
    /// Consecutive failed probes.
    pub consecutive_failures: u32,
    /// The last failure.
    pub last_error: Option<String>,
}

/// How the HealthActor is started.
pub struct HealthArgs {
    /// The instances to probe, by name.
    pub instances: Vec<(String, Arc<dyn InferenceClient>)>,
    /// Time between probe rounds.
    pub interval: Duration,
    /// Time allowed for one probe.
    pub timeout: Duration,
    /// Consecutive failures that end Ready.
    pub failure_threshold: u32,
}

struct Probed {
    client: Arc<dyn InferenceClient>,
    ready: bool,
    ever_ready: bool,
    probing: bool,
    failures: u32,
    last_error: Option<String>,
    watchers: Vec<ActorRef<DispatchMsg>>,
}

/// The HealthActor's state.
pub struct HealthState {
    instances: HashMap<String, Probed>,
    timeout: Duration,
    failure_threshold: u32,
}

/// Probes the instances.
pub struct HealthActor;

impl Probed {
    fn tell(&mut self) {
        let ready = self.ready;
        self.watchers
            .retain(|w| w.cast(DispatchMsg::Ready(ready)).is_ok());
    }
}

impl Actor for HealthActor {
    type Msg = HealthMsg;
    type State = HealthState;
    type Arguments = HealthArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<HealthMsg>,
        args: HealthArgs,
    ) -> Result<HealthState, ActorProcessingErr> {
        let instances = args
            .instances
            .into_iter()
            .map(|(name, client)| {
                (
                    name,
                    Probed {
                        client,
                        ready: false,
                        ever_ready: false,
                        probing: false,
                        failures: 0,
                        last_error: None,
                        watchers: Vec::new(),
                    },
                )
            })
            .collect();
        let _ = myself.cast(HealthMsg::Probe);
        myself.send_interval(args.interval, || HealthMsg::Probe);
        Ok(HealthState {
            instances,
            timeout: args.timeout,
            failure_threshold: args.failure_threshold.max(1),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<HealthMsg>,
        msg: HealthMsg,
        state: &mut HealthState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            HealthMsg::Probe => {
                for (name, inst) in state.instances.iter_mut().filter(|(_, i)| !i.probing) {
                    inst.probing = true;
                    let client = inst.client.clone();
                    let me = myself.clone();
                    let instance = name.clone();
                    let timeout = state.timeout;
                    tokio::spawn(async move {
                        let result = match tokio::time::timeout(timeout, client.health()).await {
                            Ok(r) => r,
                            Err(_) => Err(format!("no answer within {} s", timeout.as_secs_f64())),
                        };
                        let _ = me.cast(HealthMsg::Probed { instance, result });
                    });
                }
            }
            HealthMsg::Probed { instance, result } => {
                let threshold = state.failure_threshold;
                let Some(inst) = state.instances.get_mut(&instance) else {
                    return Ok(());
                };
                inst.probing = false;
                match result {
                    Ok(()) => {
                        inst.failures = 0;
                        if !inst.ready {
                            info!(instance, "instance is ready");
                            inst.ready = true;
                            inst.ever_ready = true;
                            inst.tell();
                        }
                    }
                    Err(e) => {
                        inst.failures += 1;
                        if inst.ready && inst.failures >= threshold {
                            warn!(
                                instance,
                                "instance is unhealthy after {} failed probes: {e}", inst.failures
                            );
                            inst.ready = false;
                            inst.tell();
                        } else if !inst.ready && inst.failures == 1 {
                            let when = if inst.ever_ready { "still" } else { "not yet" };
                            warn!(instance, "instance {when} ready: {e}");
                        }
                        inst.last_error = Some(e);
                    }
                }
            }
            HealthMsg::Watch {
                instance,
                dispatcher,
            } => {
                if let Some(inst) = state.instances.get_mut(&instance) {
                    inst.watchers.retain(|w| w.get_id() != dispatcher.get_id());
                    let _ = dispatcher.cast(DispatchMsg::Ready(inst.ready));
                    inst.watchers.push(dispatcher);
                } else {
                    warn!(
                        instance,
                        "a dispatcher watches an instance the health actor does not probe"
                    );
                }
            }
            HealthMsg::Status { reply } => {
                let mut out: Vec<InstanceHealth> = state
                    .instances
                    .iter()
                    .map(|(name, i)| InstanceHealth {
                        instance: name.clone(),
                        ready: i.ready,
                        consecutive_failures: i.failures,
                        last_error: i.last_error.clone(),
                    })
                    .collect();
                out.sort_by(|a, b| a.instance.cmp(&b.instance));
                let _ = reply.send(out);
            }
        }
        Ok(())
    }
}
