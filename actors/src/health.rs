//! `HealthActor`: probes every instance each `interval` and reports the
//! outcome to the instance's ContainerActor (through the
//! InstanceSupervisor), which turns outcomes into states.
//!
//! A probe checks `/health` and the model list (servers other than vLLM may
//! lack either; the client then relies on what is there and the canary,
//! and says so: see `InferenceClient::probe_checks`). Until a server has been
//! confirmed — at start, and whenever it was seen not listening or loading,
//! as a relaunched server is — the probe is *deep*: a one-token canary
//! completion (allowed `canary_timeout`) confirms that it really answers.
//! A confirmed server is not sent canaries again: under load they would wait
//! behind real requests, and a busy server is not a broken one. The outcome
//! tells "not listening", "loading (503)" and "broken" apart. A probe that
//! takes longer than `timeout` counts as broken.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, DerivedActorRef, RpcReplyPort};
use tracing::{debug, info};

use crate::inference::{InferenceClient, ProbeError};

/// What the HealthActor publishes: a probe's outcome for one instance,
/// once it means something (a failure, or a pass that a canary confirmed).
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeOutcome {
    /// The instance.
    pub instance: String,
    /// What the probe found.
    pub outcome: Result<(), ProbeError>,
}

/// A message the HealthActor sends itself; opaque outside this module.
#[derive(Debug)]
pub struct Internal(Tick);

#[derive(Debug)]
enum Tick {
    /// Time to probe every instance.
    Probe,
    /// A probe's answer.
    Probed {
        /// The instance.
        instance: String,
        /// Whether the probe was deep (with a canary).
        deep: bool,
        /// What it found.
        outcome: Result<(), ProbeError>,
    },
}

/// Messages of the HealthActor.
#[derive(Debug)]
pub enum HealthMsg {
    /// The actor's own timers and probe answers; only it makes them.
    Internal(Internal),
    /// Where outcomes go from now on (after the instance supervisor restarted).
    Sink(DerivedActorRef<ProbeOutcome>),
    /// The last outcome per instance.
    Status {
        /// The snapshot.
        reply: RpcReplyPort<Vec<InstanceHealth>>,
    },
}

/// One instance's probes, as `Status` reports them.
#[derive(Clone, Debug, PartialEq)]
pub struct InstanceHealth {
    /// The instance.
    pub instance: String,
    /// Whether the last probe passed.
    pub ready: bool,
    /// Consecutive failed probes.
    pub consecutive_failures: u32,
    /// The last failure.
    pub last_error: Option<String>,
    /// What the probes check (they differ for servers other than vLLM).
    pub checks: String,
}

/// How the HealthActor is started.
pub struct HealthArgs {
    /// The instances to probe, by name.
    pub instances: Vec<(String, Arc<dyn InferenceClient>)>,
    /// Where outcomes go.
    pub sink: DerivedActorRef<ProbeOutcome>,
    /// Time between probe rounds.
    pub interval: Duration,
    /// Time allowed for one probe.
    pub timeout: Duration,
    /// Time allowed for a deep probe (its canary is a real completion).
    pub canary_timeout: Duration,
}

struct Probed {
    client: Arc<dyn InferenceClient>,
    /// A probe has passed since the last failure: no canary needed.
    confirmed: bool,
    probing: bool,
    failures: u32,
    last_error: Option<String>,
    /// What the last probe checked, as last logged.
    checks: String,
}

/// The HealthActor's state.
pub struct HealthState {
    /// Each instance's client and last outcome, by name.
    instances: HashMap<String, Probed>,
    /// Where outcomes are published.
    sink: DerivedActorRef<ProbeOutcome>,
    /// Time allowed for one probe.
    timeout: Duration,
    /// Time allowed for a deep probe (its canary is a real completion).
    canary_timeout: Duration,
}

/// Probes the instances.
pub struct HealthActor;

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
                        confirmed: false,
                        probing: false,
                        failures: 0,
                        last_error: None,
                        checks: String::new(),
                    },
                )
            })
            .collect();
        let _ = myself.cast(HealthMsg::Internal(Internal(Tick::Probe)));
        myself.send_interval(args.interval, || HealthMsg::Internal(Internal(Tick::Probe)));
        Ok(HealthState {
            instances,
            sink: args.sink,
            timeout: args.timeout,
            canary_timeout: args.canary_timeout,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<HealthMsg>,
        msg: HealthMsg,
        state: &mut HealthState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            HealthMsg::Internal(Internal(Tick::Probe)) => {
                for (name, inst) in state.instances.iter_mut().filter(|(_, i)| !i.probing) {
                    inst.probing = true;
                    let client = inst.client.clone();
                    let me = myself.clone();
                    let instance = name.clone();
                    let deep = !inst.confirmed;
                    let timeout = if deep {
                        state.canary_timeout.max(state.timeout)
                    } else {
                        state.timeout
                    };
                    tokio::spawn(async move {
                        let outcome = match tokio::time::timeout(timeout, client.probe(deep)).await
                        {
                            Ok(r) => r,
                            Err(_) => Err(ProbeError::Broken(format!(
                                "no answer within {} s",
                                timeout.as_secs_f64()
                            ))),
                        };
                        let _ = me.cast(HealthMsg::Internal(Internal(Tick::Probed {
                            instance,
                            deep,
                            outcome,
                        })));
                    });
                }
            }
            HealthMsg::Internal(Internal(Tick::Probed {
                instance,
                deep,
                outcome,
            })) => {
                let Some(inst) = state.instances.get_mut(&instance) else {
                    return Ok(());
                };
                inst.probing = false;
                let checks = inst.client.probe_checks();
                if checks != inst.checks {
                    info!(%instance, "probed with {checks}");
                    inst.checks = checks;
                }
                match &outcome {
                    Ok(()) => {
                        inst.failures = 0;
                        inst.confirmed |= deep;
                    }
                    Err(e) => {
                        inst.failures += 1;
                        // A server that is gone or loading will be a new one.
                        if matches!(e, ProbeError::NotListening(_) | ProbeError::Loading(_)) {
                            inst.confirmed = false;
                        }
                        inst.last_error = Some(e.to_string());
                    }
                }
                // A shallow pass before any deep one is not a confirmation.
                if outcome.is_err() || deep || inst.confirmed {
                    if let Err(e) = state.sink.send_message(ProbeOutcome { instance, outcome }) {
                        debug!("a probe outcome found no one to take it ({e}); the next round repeats it");
                    }
                }
            }
            HealthMsg::Sink(sink) => state.sink = sink,
            HealthMsg::Status { reply } => {
                let mut out: Vec<InstanceHealth> = state
                    .instances
                    .iter()
                    .map(|(name, i)| InstanceHealth {
                        instance: name.clone(),
                        ready: i.failures == 0 && i.confirmed,
                        consecutive_failures: i.failures,
                        last_error: i.last_error.clone(),
                        checks: i.checks.clone(),
                    })
                    .collect();
                out.sort_by(|a, b| a.instance.cmp(&b.instance));
                let _ = reply.send(out);
            }
        }
        Ok(())
    }
}
