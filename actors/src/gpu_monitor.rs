//! `GpuMonitorActor`: reads every GPU each `interval` (NVML in production)
//! and sends the snapshot to its parent, which hands it on to the allocator,
//! the dispatchers (thermal back-off) and whoever watches (metrics).
//!
//! A temperature alert starts when a GPU goes above `alert_c` and ends when
//! it comes back below `clear_c` (hysteresis): one warning per episode, not
//! one per second. Without a probe (no driver, no GPU) it says so once and
//! publishes "unavailable" snapshots; the daemon works on.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ractor::{Actor, ActorProcessingErr, ActorRef, DerivedActorRef};
use tracing::{info, warn};

use crate::gpu::{GpuProbe, GpuReading, GpuSnapshot};
use crate::tell::publish;

/// Messages of the GpuMonitorActor: only its own timers and readings, so
/// opaque outside this module.
#[derive(Debug)]
pub struct GpuMonitorMsg(Tick);

/// What the GpuMonitorActor sends itself: it takes no other messages.
#[derive(Debug)]
enum Tick {
    /// Time to read the GPUs.
    Sample,
    /// A reading.
    Read(Result<Vec<GpuReading>, String>),
}

/// Temperature limits.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ThermalLimits {
    /// An alert starts above this, °C.
    pub alert_c: u32,
    /// and ends below this, °C.
    pub clear_c: u32,
}

/// How the GpuMonitorActor is started.
pub struct GpuMonitorArgs {
    /// The GPUs; `None` when they cannot be read (the reason is in `unavailable`).
    pub probe: Option<Arc<dyn GpuProbe>>,
    /// Why there is no probe.
    pub unavailable: String,
    /// Time between readings.
    pub interval: Duration,
    /// Temperature limits.
    pub limits: ThermalLimits,
    /// Where snapshots go.
    pub sink: DerivedActorRef<GpuSnapshot>,
}

/// The GpuMonitorActor's state.
pub struct GpuMonitorState {
    /// How it was started.
    args: GpuMonitorArgs,
    /// GPUs in a temperature alert now.
    hot: BTreeSet<u32>,
    /// Alerts (episodes) since start.
    alerts: u64,
    /// A reading is under way (one at a time).
    reading: bool,
    /// The last reading failed (a failure is logged once, a recovery once).
    failing: bool,
}

/// Reads the GPUs.
pub struct GpuMonitorActor;

impl GpuMonitorState {
    fn publish(&self, snapshot: GpuSnapshot) {
        publish(&self.args.sink, "a GPU snapshot", snapshot);
    }

    fn alerts(&mut self, gpus: &[GpuReading]) {
        let ThermalLimits { alert_c, clear_c } = self.args.limits;
        for g in gpus {
            if !self.hot.contains(&g.index) && g.temperature_c > alert_c {
                self.hot.insert(g.index);
                self.alerts += 1;
                warn!(
                    gpu = g.index,
                    "GPU {} ({}) is at {} °C, above gpu.temp_alert_c = {alert_c}: its instances' windows shrink until it cools below {clear_c} °C",
                    g.index, g.name, g.temperature_c
                );
            } else if self.hot.contains(&g.index) && g.temperature_c < clear_c {
                self.hot.remove(&g.index);
                info!(
                    gpu = g.index,
                    "GPU {} cooled to {} °C, below gpu.temp_clear_c = {clear_c}: the alert is over",
                    g.index,
                    g.temperature_c
                );
            }
        }
    }
}

impl Actor for GpuMonitorActor {
    type Msg = GpuMonitorMsg;
    type State = GpuMonitorState;
    type Arguments = GpuMonitorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<GpuMonitorMsg>,
        args: GpuMonitorArgs,
    ) -> Result<GpuMonitorState, ActorProcessingErr> {
        let state = GpuMonitorState {
            args,
            hot: BTreeSet::new(),
            alerts: 0,
            reading: false,
            failing: false,
        };
        if state.args.probe.is_some() {
            let _ = myself.cast(GpuMonitorMsg(Tick::Sample));
            myself.send_interval(state.args.interval, || GpuMonitorMsg(Tick::Sample));
        } else {
            state.publish(GpuSnapshot::unavailable(state.args.unavailable.clone()));
        }
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<GpuMonitorMsg>,
        msg: GpuMonitorMsg,
        state: &mut GpuMonitorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            GpuMonitorMsg(Tick::Sample) => {
                let Some(probe) = state.args.probe.clone() else {
                    return Ok(());
                };
                if state.reading {
                    return Ok(()); // The last read has not come back yet.
                }
                state.reading = true;
                let me = myself.clone();
                tokio::spawn(async move {
                    let read = tokio::task::spawn_blocking(move || probe.read())
                        .await
                        .unwrap_or_else(|e| Err(format!("reading the GPUs panicked: {e}")));
                    let _ = me.cast(GpuMonitorMsg(Tick::Read(read)));
                });
            }
            GpuMonitorMsg(Tick::Read(read)) => {
                state.reading = false;
                match read {
                    Ok(gpus) => {
                        if state.failing {
                            info!("reading the GPUs works again");
                            state.failing = false;
                        }
                        state.alerts(&gpus);
                        let hot = state.hot.iter().copied().collect();
                        state.publish(GpuSnapshot {
                            at: SystemTime::now(),
                            gpus,
                            unavailable: None,
                            hot,
                            alerts: state.alerts,
                        });
                    }
                    Err(e) => {
                        if !state.failing {
                            warn!("reading the GPUs failed: {e}; trying again every interval");
                            state.failing = true;
                        }
                        let mut snapshot = GpuSnapshot::unavailable(e);
                        snapshot.alerts = state.alerts;
                        state.publish(snapshot);
                    }
                }
            }
        }
        Ok(())
    }
}
