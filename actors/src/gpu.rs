//! The `GpuProbe` port: one reading of every GPU, and the snapshot the
//! GpuMonitorActor publishes. The NVML adapter lives in the `gpu-feeder`
//! crate; tests script readings with a fake.

use std::time::SystemTime;

/// One GPU, as read once.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct GpuReading {
    /// NVML index.
    pub index: u32,
    /// Product name.
    pub name: String,
    /// Stable id.
    pub uuid: String,
    /// Core temperature, °C.
    pub temperature_c: u32,
    /// Share of time a kernel ran over the last sample period, percent.
    pub utilization_pct: u32,
    /// Memory in use, bytes.
    pub memory_used_bytes: u64,
    /// Memory in all, bytes.
    pub memory_total_bytes: u64,
    /// Power draw, watts, where reported.
    pub power_w: Option<f64>,
    /// SM clock, MHz, where reported.
    pub sm_clock_mhz: Option<u32>,
    /// Memory clock, MHz, where reported.
    pub memory_clock_mhz: Option<u32>,
    /// Why the clocks are held down (`sw_thermal_slowdown`, `hw_slowdown`, …); empty when none.
    pub throttle_reasons: Vec<String>,
    /// GPU memory per process, where the driver tells.
    pub processes: Vec<GpuProcess>,
}

/// One process holding memory on a GPU.
#[derive(Clone, Debug, PartialEq)]
pub struct GpuProcess {
    /// Its process id.
    pub pid: u32,
    /// GPU memory it holds, bytes.
    pub used_bytes: u64,
    /// Its name (the command), where the adapter could tell.
    pub name: Option<String>,
}

/// Written as `[pid, bytes]`, the shape `gpus` has always had in JSON.
impl serde::Serialize for GpuProcess {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        (self.pid, self.used_bytes).serialize(s)
    }
}

/// Reads the GPUs.
pub trait GpuProbe: Send + Sync + 'static {
    /// One reading of every GPU (a blocking call: run it off the runtime).
    fn read(&self) -> Result<Vec<GpuReading>, String>;
}

/// What the GpuMonitorActor publishes every interval.
#[derive(Clone, Debug, PartialEq)]
pub struct GpuSnapshot {
    /// When it was read.
    pub at: SystemTime,
    /// The readings; empty when unavailable.
    pub gpus: Vec<GpuReading>,
    /// Why there are no readings (no driver, no GPU, the read failed).
    pub unavailable: Option<String>,
    /// GPUs in a temperature alert now (above the alert, not yet below the clear level).
    pub hot: Vec<u32>,
    /// Temperature alerts (episodes) since start.
    pub alerts: u64,
}

impl GpuSnapshot {
    /// A snapshot saying GPUs cannot be read, and why.
    pub fn unavailable(why: impl Into<String>) -> Self {
        GpuSnapshot {
            at: SystemTime::now(),
            gpus: Vec::new(),
            unavailable: Some(why.into()),
            hot: Vec::new(),
            alerts: 0,
        }
    }
}
