//! GPU metrics from NVML (`nvml-wrapper`, which loads the driver's `libnvidia-ml.so` at run time):
//! with `--device cuda`, every `--gpu-metrics-interval-ms` a sampler thread exports, per device
//! (`device` label = NVML index): utilisation, memory used and total, power, temperature, and
//! this process's own GPU memory. Where NVML is not available (CPU nodes, a container without the
//! driver's utility libraries) there are no `brainai_gpu_*` series at all and one log line says
//! why; the server serves on.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use metrics::gauge;
use nvml_wrapper::Nvml;
use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use nvml_wrapper::enums::device::UsedGpuMemory;

use crate::metrics::{
    GPU_MEMORY_TOTAL, GPU_MEMORY_USED, GPU_POWER, GPU_PROCESS_MEMORY, GPU_TEMPERATURE,
    GPU_UTILIZATION,
};

/// Stops the sampler when dropped.
pub struct GpuSampler {
    stop: Arc<AtomicBool>,
}

impl Drop for GpuSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Starts sampling; `None` (with one log line) when NVML cannot be loaded or sees no device.
pub fn start(every: Duration) -> Option<GpuSampler> {
    let nvml = match Nvml::init() {
        Ok(nvml) => nvml,
        Err(e) => {
            tracing::warn!(error = %e, "NVML is not available: no brainai_gpu_* metrics (GPU utilisation and memory are not exported)");
            return None;
        }
    };
    let count = match nvml.device_count() {
        Ok(n) if n > 0 => n,
        Ok(_) => {
            tracing::warn!("NVML sees no GPU: no brainai_gpu_* metrics");
            return None;
        }
        Err(e) => {
            tracing::warn!(error = %e, "NVML cannot count the GPUs: no brainai_gpu_* metrics");
            return None;
        }
    };
    tracing::info!(
        devices = count,
        interval_ms = every.as_millis() as u64,
        "exporting GPU metrics from NVML"
    );
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let spawned = std::thread::Builder::new()
        .name("nvml".into())
        .spawn(move || {
            let pid = std::process::id();
            while !flag.load(Ordering::SeqCst) {
                for index in 0..count {
                    sample(&nvml, index, pid);
                }
                std::thread::sleep(every);
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the NVML sampler thread: no brainai_gpu_* metrics");
        return None;
    }
    Some(GpuSampler { stop })
}

/// One sample of one device; a reading the device does not support is left out.
fn sample(nvml: &Nvml, index: u32, pid: u32) {
    let Ok(device) = nvml.device_by_index(index) else {
        return;
    };
    let label = [("device", index.to_string())];
    if let Ok(u) = device.utilization_rates() {
        gauge!(GPU_UTILIZATION, &label).set(f64::from(u.gpu) / 100.0);
    }
    if let Ok(m) = device.memory_info() {
        gauge!(GPU_MEMORY_USED, &label).set(m.used as f64);
        gauge!(GPU_MEMORY_TOTAL, &label).set(m.total as f64);
    }
    if let Ok(milliwatts) = device.power_usage() {
        gauge!(GPU_POWER, &label).set(f64::from(milliwatts) / 1000.0);
    }
    if let Ok(celsius) = device.temperature(TemperatureSensor::Gpu) {
        gauge!(GPU_TEMPERATURE, &label).set(f64::from(celsius));
    }
    if let Ok(processes) = device.running_compute_processes() {
        let own: u64 = processes
            .iter()
            .filter(|p| p.pid == pid)
            .map(|p| match p.used_gpu_memory {
                UsedGpuMemory::Used(bytes) => bytes,
                UsedGpuMemory::Unavailable => 0,
            })
            .sum();
        gauge!(GPU_PROCESS_MEMORY, &label).set(own as f64);
    }
}
