//! Launching: adopt the server an earlier run left or start a new one,
//! once the GPUs have the memory the launch asks for (the memory gate).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ractor::ActorRef;
use tracing::{info, warn};

use super::{tick, ContainerMsg, ContainerState, InstanceState, Tick, LOG_LINES};
use crate::gpu::GpuSnapshot;
use crate::runtime::{ContainerRuntime, LaunchPlan};

impl ContainerState {
    /// The first start: launch, unless parked (one parked in a staggered
    /// start launches all the same: it loads, then sleeps).
    pub(super) fn start(&mut self, myself: &ActorRef<ContainerMsg>) {
        if self.state == InstanceState::Stopped {
            if self.args.parked && self.args.turn.done.is_none() {
                self.set(InstanceState::Stopped, "parked by the allocator");
            } else {
                self.launch(myself);
            }
        }
    }

    pub(super) fn launch(&mut self, myself: &ActorRef<ContainerMsg>) {
        let Some(runtime) = self.args.runtime.clone() else {
            self.set(
                InstanceState::Loading,
                "an external server: waiting for it to answer its probes",
            );
            return;
        };
        self.generation += 1;
        let generation = self.generation;
        self.failures = 0;
        self.last_probe_error = None;
        self.short_of_memory = false;
        self.set(
            InstanceState::Starting,
            format!(
                "launching ({} backend, gpu_memory_utilization {})",
                runtime.backend(),
                self.args.plan.gpu_memory_utilization
            ),
        );
        let plan = self.args.plan.clone();
        let grace = self.args.settings.stop_grace;
        let instance = self.args.name.clone();
        let me = myself.clone();
        let gate = self.args.gpu.clone().map(|gpu| MemoryGate {
            gpu,
            gpu_ids: self.args.gpu_ids.clone(),
            share: plan.gpu_memory_utilization,
            live: self.live.clone(),
            generation,
            actor: myself.clone(),
        });
        let turn = (!self.args.turn.after.is_empty()).then(|| TurnGate {
            after: self.args.turn.after.clone(),
            live: self.live.clone(),
            generation,
            actor: myself.clone(),
        });
        tokio::spawn(async move {
            let result = adopt_or_start(&*runtime, &plan, grace, &instance, turn, gate).await;
            let _ = me.cast(tick(Tick::Launched { generation, result }));
        });
    }

    pub(super) fn launched(&mut self, myself: &ActorRef<ContainerMsg>, id: String, adopted: bool) {
        self.id = Some(id.clone());
        self.short_of_memory = false;
        self.adopted = adopted;
        let what = if adopted {
            format!("adopted the running server {id} (configuration unchanged, model still loaded)")
        } else {
            format!("launched {id}; waiting for the model to load")
        };
        self.set(InstanceState::Loading, what);
        let generation = self.generation;
        let runtime = self
            .args
            .runtime
            .clone()
            .expect("launched servers have a runtime");
        let me = myself.clone();
        tokio::spawn(async move {
            let exit = runtime.wait_exit(&id).await;
            let log_tail = runtime.logs(&id, LOG_LINES).await;
            let _ = me.cast(tick(Tick::Exited {
                generation,
                exit,
                log_tail,
            }));
        });
        let timeout = self.args.settings.startup_timeout;
        myself.send_after(timeout, move || tick(Tick::StartupTimeout { generation }));
        if adopted && self.args.sleep.is_some() {
            // A server left asleep answers no canary: ask it.
            let client = self.args.client.clone();
            let me = myself.clone();
            tokio::spawn(async move {
                if let Ok(asleep) = client.is_sleeping().await {
                    let _ = me.cast(tick(Tick::AdoptedAsleep { generation, asleep }));
                }
            });
        }
    }

    /// A launch finished: Loading, or Unhealthy when it failed.
    pub(super) fn launch_done(
        &mut self,
        myself: &ActorRef<ContainerMsg>,
        generation: u64,
        result: Result<(String, bool), String>,
    ) {
        if generation != self.generation || self.state != InstanceState::Starting {
            return;
        }
        for r in self.pending_reconfigure.drain(..) {
            let _ = r.send(());
        }
        match result {
            Ok((id, adopted)) => self.launched(myself, id, adopted),
            Err(e) => self.unhealthy(myself, format!("launching failed: {e}")),
        }
    }

    /// A launch waits for GPU memory: say why in the state's reason.
    pub(super) fn waiting_for_memory(&mut self, generation: u64, reason: String, turn: bool) {
        if generation == self.generation && self.state == InstanceState::Starting {
            self.reason = format!("waiting for GPU memory: {reason}");
            self.short_of_memory = !turn;
        }
    }
}

/// Adopts the server an earlier run left when it runs with this
/// configuration; otherwise stops what is there and launches anew.
async fn adopt_or_start(
    runtime: &dyn ContainerRuntime,
    plan: &LaunchPlan,
    grace: Duration,
    instance: &str,
    turn: Option<TurnGate>,
    gate: Option<MemoryGate>,
) -> Result<(String, bool), String> {
    let want = runtime.config_hash(plan);
    match runtime.find().await? {
        Some(f) if f.running && f.config_hash.as_deref() == Some(want.as_str()) => {
            return Ok((f.id, true));
        }
        Some(f) if f.running => {
            info!(
                instance,
                "the running server {} was launched with another configuration (hash {} ≠ {want}): recreating it",
                f.id,
                f.config_hash.as_deref().unwrap_or("none"),
            );
            runtime.stop(&f.id, grace).await?;
        }
        Some(f) => info!(instance, "replacing the stopped server {}", f.id),
        None => {}
    }
    if let Some(turn) = turn {
        turn.wait(instance).await?;
    }
    if let Some(gate) = gate {
        gate.wait(instance).await?;
    }
    runtime.start(plan).await.map(|id| (id, false))
}

/// Holds a launch in a staggered start until the instances before it on
/// its GPUs sleep (or are down): their memory shares and its own do not all
/// fit at once.
struct TurnGate {
    after: Vec<tokio::sync::watch::Receiver<bool>>,
    live: Arc<AtomicU64>,
    generation: u64,
    actor: ActorRef<ContainerMsg>,
}

impl TurnGate {
    async fn wait(mut self, instance: &str) -> Result<(), String> {
        let mut said = false;
        for rx in &mut self.after {
            while !*rx.borrow_and_update() {
                if !said {
                    said = true;
                    info!(
                        instance,
                        "not launching yet: the instances before it on its GPUs load and sleep first"
                    );
                    let _ = self.actor.cast(tick(Tick::WaitingForMemory {
                        generation: self.generation,
                        reason: "the instances before it on its GPUs load and sleep first \
                                 (their memory shares and its own do not all fit at once)"
                            .into(),
                        turn: true,
                    }));
                }
                match tokio::time::timeout(Duration::from_secs(1), rx.changed()).await {
                    Ok(Ok(())) => {}
                    // Its sender is gone (the actor restarted): nothing to wait for.
                    Ok(Err(_)) => break,
                    Err(_) => {
                        let gone = matches!(
                            self.actor.get_status(),
                            ractor::ActorStatus::Stopping | ractor::ActorStatus::Stopped
                        );
                        if gone || self.live.load(Ordering::SeqCst) != self.generation {
                            return Err("no longer wanted while it waited for its turn".into());
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// Holds a launch until the GPUs it runs on have the memory it asks for
/// (vLLM refuses to start when a GPU's free memory is below
/// `gpu_memory_utilization` × its total), saying which processes hold it.
struct MemoryGate {
    gpu: tokio::sync::watch::Receiver<Option<GpuSnapshot>>,
    gpu_ids: Vec<u32>,
    share: f64,
    live: Arc<AtomicU64>,
    generation: u64,
    actor: ActorRef<ContainerMsg>,
}

impl MemoryGate {
    async fn wait(mut self, instance: &str) -> Result<(), String> {
        let mut said: Option<String> = None;
        // The monitor's first reading comes within a second or two of the
        // start; without one in 5 s, launch unchecked.
        if self.gpu.borrow().is_none() {
            let first = tokio::time::timeout(Duration::from_secs(5), self.gpu.changed()).await;
            if !matches!(first, Ok(Ok(()))) {
                return Ok(());
            }
        }
        loop {
            let gone = matches!(
                self.actor.get_status(),
                ractor::ActorStatus::Stopping | ractor::ActorStatus::Stopped
            );
            if gone || self.live.load(Ordering::SeqCst) != self.generation {
                return Err("no longer wanted while it waited for GPU memory".into());
            }
            let reading = self.gpu.borrow_and_update().clone();
            let Some(short) = reading.and_then(|r| memory_short(&r, &self.gpu_ids, self.share))
            else {
                return Ok(());
            };
            if said.as_deref() != Some(short.as_str()) {
                warn!(instance, "not launching yet: {short}");
                let _ = self.actor.cast(tick(Tick::WaitingForMemory {
                    generation: self.generation,
                    reason: short.clone(),
                    turn: false,
                }));
                said = Some(short);
            }
            // The next reading (every gpu.interval_ms), and at least every
            // second a look at whether the launch is still wanted.
            if let Ok(Err(_)) =
                tokio::time::timeout(Duration::from_secs(1), self.gpu.changed()).await
            {
                return Ok(()); // The monitor is gone: nothing to wait for.
            }
        }
    }
}

/// Why `gpu_ids` lack the memory a server at `share` needs, from one
/// reading; `None` when they have it, or cannot be read.
fn memory_short(reading: &GpuSnapshot, gpu_ids: &[u32], share: f64) -> Option<String> {
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let short: Vec<String> = gpu_ids
        .iter()
        .filter_map(|id| reading.gpus.iter().find(|g| g.index == *id))
        .filter_map(|g| {
            let need = (share * g.memory_total_bytes as f64) as u64;
            let free = g.memory_total_bytes.saturating_sub(g.memory_used_bytes);
            if free >= need {
                return None;
            }
            let holders: Vec<String> = g
                .processes
                .iter()
                .map(|p| {
                    let name = p.name.as_deref().map(|n| format!(" {n}")).unwrap_or_default();
                    format!("pid {}{name} {:.1} GiB", p.pid, gib(p.used_bytes))
                })
                .collect();
            Some(format!(
                "GPU {} has {:.1} GiB free of {:.1} GiB and gpu_memory_utilization {share} needs {:.1} GiB; held by {}",
                g.index,
                gib(free),
                gib(g.memory_total_bytes),
                gib(need),
                if holders.is_empty() {
                    "processes the driver does not list".to_string()
                } else {
                    holders.join(", ")
                }
            ))
        })
        .collect();
    (!short.is_empty()).then(|| {
        format!(
            "{}: waiting until it is freed (stop what holds it, or lower gpu_memory_utilization)",
            short.join("; ")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::{GpuProcess, GpuReading};

    fn reading(used: u64, processes: Vec<GpuProcess>) -> GpuSnapshot {
        let mut s = GpuSnapshot::unavailable("");
        s.unavailable = None;
        s.gpus = vec![GpuReading {
            index: 0,
            name: "gpu".into(),
            uuid: String::new(),
            temperature_c: 40,
            utilization_pct: 0,
            memory_used_bytes: used,
            memory_total_bytes: 80 << 30,
            power_w: None,
            sm_clock_mhz: None,
            memory_clock_mhz: None,
            throttle_reasons: Vec::new(),
            processes,
        }];
        s
    }

    #[test]
    fn memory_short_names_the_processes_that_hold_it() {
        let held = reading(
            70 << 30,
            vec![GpuProcess {
                pid: 7,
                used_bytes: 70 << 30,
                name: Some("python3".into()),
            }],
        );
        let why = memory_short(&held, &[0], 0.4).expect("short");
        assert!(why.contains("GPU 0 has 10.0 GiB free of 80.0 GiB"), "{why}");
        assert!(why.contains("pid 7 python3 70.0 GiB"), "{why}");
        assert!(
            memory_short(&held, &[1], 0.4).is_none(),
            "GPU 1 is not read"
        );
        assert!(memory_short(&reading(0, Vec::new()), &[0], 0.9).is_none());
        let unnamed = reading(
            70 << 30,
            vec![GpuProcess {
                pid: 8,
                used_bytes: 1 << 30,
                name: None,
            }],
        );
        let why = memory_short(&unnamed, &[0], 0.4).expect("short");
        assert!(why.contains("pid 8 1.0 GiB"), "{why}");
    }
}
