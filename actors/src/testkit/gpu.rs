//! `FakeGpu`: a scripted `GpuProbe` for message-level tests.

use std::sync::{Arc, Mutex};

use crate::gpu::{GpuProbe, GpuProcess, GpuReading};

/// GPUs whose temperatures the test sets; clones share state.
#[derive(Clone)]
pub struct FakeGpu {
    gpus: Arc<Mutex<Result<Vec<GpuReading>, String>>>,
}

impl FakeGpu {
    /// `n` idle GPUs at 40 °C with 80 GiB each.
    pub fn new(n: u32) -> Self {
        let gpus = (0..n)
            .map(|index| GpuReading {
                index,
                name: "Fake GPU".into(),
                uuid: format!("GPU-fake-{index}"),
                temperature_c: 40,
                utilization_pct: 0,
                memory_used_bytes: 0,
                memory_total_bytes: 80 << 30,
                power_w: Some(100.0),
                sm_clock_mhz: Some(1_980),
                memory_clock_mhz: Some(2_619),
                throttle_reasons: Vec::new(),
                processes: Vec::new(),
            })
            .collect();
        FakeGpu {
            gpus: Arc::new(Mutex::new(Ok(gpus))),
        }
    }

    /// GPU `index` reads `celsius` from now on.
    pub fn set_temperature(&self, index: u32, celsius: u32) {
        if let Ok(gpus) = &mut *self.gpus.lock().unwrap() {
            for g in gpus.iter_mut().filter(|g| g.index == index) {
                g.temperature_c = celsius;
            }
        }
    }

    /// GPU `index` reads `bytes` of memory in use from now on.
    pub fn set_memory_used(&self, index: u32, bytes: u64) {
        if let Ok(gpus) = &mut *self.gpus.lock().unwrap() {
            for g in gpus.iter_mut().filter(|g| g.index == index) {
                g.memory_used_bytes = bytes;
            }
        }
    }

    /// Another process (`pid`) holds `bytes` of GPU `index` from now on
    /// (`bytes` 0: it let go), counted in the memory in use.
    pub fn hold(&self, index: u32, pid: u32, bytes: u64) {
        if let Ok(gpus) = &mut *self.gpus.lock().unwrap() {
            for g in gpus.iter_mut().filter(|g| g.index == index) {
                let before = g
                    .processes
                    .iter()
                    .find(|p| p.pid == pid)
                    .map_or(0, |p| p.used_bytes);
                g.processes.retain(|p| p.pid != pid);
                if bytes > 0 {
                    g.processes.push(GpuProcess {
                        pid,
                        used_bytes: bytes,
                        name: None,
                    });
                }
                g.memory_used_bytes = g.memory_used_bytes - before + bytes;
            }
        }
    }

    /// Reading fails with `why` from now on.
    pub fn fail(&self, why: &str) {
        *self.gpus.lock().unwrap() = Err(why.into());
    }
}

impl GpuProbe for FakeGpu {
    fn read(&self) -> Result<Vec<GpuReading>, String> {
        self.gpus.lock().unwrap().clone()
    }
}
