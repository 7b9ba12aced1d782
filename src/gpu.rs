//! The NVML adapter of the `GpuProbe` port, and `gpu-feeder gpu`.
//!
//! NVML (`libnvidia-ml.so`, part of the NVIDIA driver) is loaded at run
//! time: on a machine without the driver, [`NvmlProbe::init`] fails with a
//! sentence saying so, and the daemon runs on without GPU readings.

use feeder_actors::gpu::{GpuProbe, GpuProcess, GpuReading};
use nvml_wrapper::enum_wrappers::device::{Clock, TemperatureSensor};
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::Nvml;

/// Reads every GPU through NVML.
pub struct NvmlProbe {
    nvml: Nvml,
}

impl NvmlProbe {
    /// Loads NVML; the error says why it cannot be used.
    pub fn init() -> Result<Self, String> {
        Nvml::init().map(|nvml| NvmlProbe { nvml }).map_err(|e| {
            format!(
                "NVML is not available ({e}): no NVIDIA driver, or no GPU, on this machine; \
                 GPU readings, temperature alerts and thermal back-off are off (set gpu.enabled = false to silence this)"
            )
        })
    }

    /// The driver's version, for messages.
    pub fn driver_version(&self) -> Option<String> {
        self.nvml.sys_driver_version().ok()
    }
}

impl GpuProbe for NvmlProbe {
    fn read(&self) -> Result<Vec<GpuReading>, String> {
        let n = self
            .nvml
            .device_count()
            .map_err(|e| format!("NVML could not count the GPUs: {e}"))?;
        let mut out = Vec::with_capacity(n as usize);
        for index in 0..n {
            let d = self
                .nvml
                .device_by_index(index)
                .map_err(|e| format!("NVML could not open GPU {index}: {e}"))?;
            let memory = d
                .memory_info()
                .map_err(|e| format!("NVML could not read GPU {index}'s memory: {e}"))?;
            let temperature_c = d
                .temperature(TemperatureSensor::Gpu)
                .map_err(|e| format!("NVML could not read GPU {index}'s temperature: {e}"))?;
            let utilization_pct = d.utilization_rates().map(|u| u.gpu).unwrap_or(0);
            let throttle_reasons = d
                .current_throttle_reasons()
                .map(|r| {
                    r.iter_names()
                        .filter(|(name, _)| *name != "GPU_IDLE" && *name != "NONE")
                        .map(|(name, _)| name.to_ascii_lowercase())
                        .collect()
                })
                .unwrap_or_default();
            let processes = d
                .running_compute_processes()
                .map(|ps| {
                    ps.into_iter()
                        .map(|p| {
                            let used = match p.used_gpu_memory {
                                UsedGpuMemory::Used(b) => b,
                                UsedGpuMemory::Unavailable => 0,
                            };
                            GpuProcess {
                                pid: p.pid,
                                used_bytes: used,
                                name: process_name(p.pid),
                            }
                        })
                        .collect()
                })
                .unwrap_or_default();
            out.push(GpuReading {
                index,
                name: d.name().unwrap_or_else(|_| "unknown".into()),
                uuid: d.uuid().unwrap_or_default(),
                temperature_c,
                utilization_pct,
                memory_used_bytes: memory.used,
                memory_total_bytes: memory.total,
                power_w: d.power_usage().ok().map(|mw| f64::from(mw) / 1000.0),
                sm_clock_mhz: d.clock_info(Clock::SM).ok(),
                memory_clock_mhz: d.clock_info(Clock::Memory).ok(),
                throttle_reasons,
                processes,
            });
        }
        Ok(out)
    }
}

/// A process's command name (`/proc/PID/comm`), where the system tells.
fn process_name(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|n| n.trim().to_string())
}

/// The host's available memory (`MemAvailable` of `/proc/meminfo`), where
/// the system tells: what an instance with `sleep_level = "auto"` weighs
/// its weights against when it falls asleep.
pub fn host_memory_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    meminfo_available(&text)
}

/// `MemAvailable` of a `/proc/meminfo` text, in bytes.
fn meminfo_available(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn available_memory_is_read_from_meminfo() {
        let text = "MemTotal:       32000000 kB\nMemFree:  100 kB\nMemAvailable:   2048 kB\n";
        assert_eq!(meminfo_available(text), Some(2048 * 1024));
        assert_eq!(meminfo_available("MemTotal: 1 kB\n"), None);
        if std::path::Path::new("/proc/meminfo").exists() {
            assert!(host_memory_available().is_some_and(|b| b > 0));
        }
    }
}
