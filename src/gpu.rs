//! GPU metrics from NVML (`nvml-wrapper`, which loads the driver's `libnvidia-ml.so` at run time):
//! with `--device cuda`, every `--gpu-metrics-interval-ms` a sampler thread exports, per device
//! (`device` label = NVML index): utilisation, memory used and total, power, temperature, and
//! this process's own GPU memory. Where NVML is not available (CPU nodes, a container without the
//! driver's utility libraries) there are no `brainai_gpu_*` series at all and one log line says
//! why; the server serves on.
//!
//! The sampler reads the devices through [`GpuSource`], which NVML implements; the unit tests
//! drive it with a fake one.

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

/// One reading of one device, in the units NVML reports; `None`: the device does not report it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Reading {
    /// Percent of the last sample period a kernel ran.
    pub utilization_percent: Option<u32>,
    pub memory_used_bytes: Option<u64>,
    pub memory_total_bytes: Option<u64>,
    pub power_milliwatts: Option<u32>,
    pub temperature_celsius: Option<u32>,
    /// GPU memory held by the process `pid` given to [`GpuSource::read`].
    pub process_memory_bytes: Option<u64>,
}

/// What the sampler needs of the GPUs: NVML in service, a fake in tests.
pub trait GpuSource: Send + 'static {
    /// How many devices there are.
    fn device_count(&self) -> Result<u32, String>;
    /// The readings of device `index`; `process` is this server's pid.
    fn read(&self, index: u32, process: u32) -> Reading;
}

impl GpuSource for Nvml {
    fn device_count(&self) -> Result<u32, String> {
        Nvml::device_count(self).map_err(|e| e.to_string())
    }

    fn read(&self, index: u32, process: u32) -> Reading {
        let Ok(device) = self.device_by_index(index) else {
            return Reading::default();
        };
        let memory = device.memory_info().ok();
        Reading {
            utilization_percent: device.utilization_rates().ok().map(|u| u.gpu),
            memory_used_bytes: memory.as_ref().map(|m| m.used),
            memory_total_bytes: memory.as_ref().map(|m| m.total),
            power_milliwatts: device.power_usage().ok(),
            temperature_celsius: device.temperature(TemperatureSensor::Gpu).ok(),
            process_memory_bytes: device.running_compute_processes().ok().map(|processes| {
                processes
                    .iter()
                    .filter(|p| p.pid == process)
                    .map(|p| match p.used_gpu_memory {
                        UsedGpuMemory::Used(bytes) => bytes,
                        UsedGpuMemory::Unavailable => 0,
                    })
                    .sum()
            }),
        }
    }
}

/// Stops the sampler when dropped.
pub struct GpuSampler {
    stop: Arc<AtomicBool>,
}

impl Drop for GpuSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Starts sampling NVML; `None` (with one log line) when NVML cannot be loaded or sees no device.
pub fn start(every: Duration) -> Option<GpuSampler> {
    match Nvml::init() {
        Ok(nvml) => start_with(nvml, every),
        Err(e) => {
            tracing::warn!(error = %e, "NVML is not available: no brainai_gpu_* metrics (GPU utilisation and memory are not exported)");
            None
        }
    }
}

/// Starts sampling `source` every `every` on a thread of its own; `None` (with one log line)
/// when it has no device.
pub fn start_with(source: impl GpuSource, every: Duration) -> Option<GpuSampler> {
    let count = match source.device_count() {
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
                    export(index, &source.read(index, pid));
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

/// Sets the gauges of device `index` from one reading; a reading the device does not report is
/// left out.
fn export(index: u32, reading: &Reading) {
    let label = [("device", index.to_string())];
    if let Some(percent) = reading.utilization_percent {
        gauge!(GPU_UTILIZATION, &label).set(f64::from(percent) / 100.0);
    }
    if let Some(bytes) = reading.memory_used_bytes {
        gauge!(GPU_MEMORY_USED, &label).set(bytes as f64);
    }
    if let Some(bytes) = reading.memory_total_bytes {
        gauge!(GPU_MEMORY_TOTAL, &label).set(bytes as f64);
    }
    if let Some(milliwatts) = reading.power_milliwatts {
        gauge!(GPU_POWER, &label).set(f64::from(milliwatts) / 1000.0);
    }
    if let Some(celsius) = reading.temperature_celsius {
        gauge!(GPU_TEMPERATURE, &label).set(f64::from(celsius));
    }
    if let Some(bytes) = reading.process_memory_bytes {
        gauge!(GPU_PROCESS_MEMORY, &label).set(bytes as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Two devices: device 0 reports everything, its utilisation rising by one percent per
    /// reading; device 1 reports neither power nor temperature. Records the pids asked about.
    struct Fake {
        readings: Arc<Mutex<u32>>,
        pids: Arc<Mutex<Vec<u32>>>,
    }

    impl GpuSource for Fake {
        fn device_count(&self) -> Result<u32, String> {
            Ok(2)
        }

        fn read(&self, index: u32, process: u32) -> Reading {
            self.pids.lock().unwrap().push(process);
            match index {
                0 => {
                    let mut n = self.readings.lock().unwrap();
                    *n += 1;
                    Reading {
                        utilization_percent: Some(36 + *n),
                        memory_used_bytes: Some(3 << 30),
                        memory_total_bytes: Some(80 << 30),
                        power_milliwatts: Some(123_456),
                        temperature_celsius: Some(65),
                        process_memory_bytes: Some(1 << 30),
                    }
                }
                _ => Reading {
                    utilization_percent: Some(0),
                    memory_used_bytes: Some(0),
                    memory_total_bytes: Some(16 << 30),
                    process_memory_bytes: Some(0),
                    ..Reading::default()
                },
            }
        }
    }

    /// The value of `name{device="<device>"}` in the exporter's text, if exported.
    fn gauge_value(text: &str, name: &str, device: u32) -> Option<f64> {
        let prefix = format!("{name}{{device=\"{device}\"}} ");
        text.lines()
            .find_map(|line| line.strip_prefix(&prefix))
            .map(|value| value.parse().unwrap())
    }

    #[test]
    fn the_sampler_exports_every_reading_of_every_device() {
        let handle = crate::metrics::install();
        let (readings, pids) = (Arc::default(), Arc::default());
        let fake = Fake {
            readings: Arc::clone(&readings),
            pids: Arc::clone(&pids),
        };
        let sampler = start_with(fake, Duration::from_millis(1)).expect("two devices");
        // Sampled again and again: wait (bounded) for a third reading of device 0 to be exported.
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        let text = loop {
            let text = handle.render();
            if gauge_value(&text, GPU_UTILIZATION, 0).is_some_and(|v| v >= 0.39) {
                break text;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no third sample:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(1));
        };
        drop(sampler);
        let at = |name, device| gauge_value(&text, name, device);
        assert!(at(GPU_UTILIZATION, 0).unwrap() <= 1.0, "a ratio: {text}");
        assert_eq!(at(GPU_MEMORY_USED, 0), Some((3u64 << 30) as f64));
        assert_eq!(at(GPU_MEMORY_TOTAL, 0), Some((80u64 << 30) as f64));
        assert_eq!(at(GPU_POWER, 0), Some(123.456));
        assert_eq!(at(GPU_TEMPERATURE, 0), Some(65.0));
        assert_eq!(at(GPU_PROCESS_MEMORY, 0), Some((1u64 << 30) as f64));
        assert_eq!(at(GPU_UTILIZATION, 1), Some(0.0));
        assert_eq!(at(GPU_MEMORY_TOTAL, 1), Some((16u64 << 30) as f64));
        // What device 1 does not report is not exported (not exported as 0).
        assert_eq!(at(GPU_POWER, 1), None, "{text}");
        assert_eq!(at(GPU_TEMPERATURE, 1), None, "{text}");
        // Its own process's memory: the sampler asks about this process.
        assert!(
            pids.lock()
                .unwrap()
                .iter()
                .all(|&p| p == std::process::id()),
            "{:?}",
            pids.lock().unwrap()
        );
    }

    #[test]
    fn no_device_no_sampler() {
        struct NoDevice;
        impl GpuSource for NoDevice {
            fn device_count(&self) -> Result<u32, String> {
                Ok(0)
            }
            fn read(&self, _: u32, _: u32) -> Reading {
                unreachable!("no device to read")
            }
        }
        struct Broken;
        impl GpuSource for Broken {
            fn device_count(&self) -> Result<u32, String> {
                Err("driver/library version mismatch".into())
            }
            fn read(&self, _: u32, _: u32) -> Reading {
                unreachable!("no device to read")
            }
        }
        assert!(start_with(NoDevice, Duration::from_millis(1)).is_none());
        assert!(start_with(Broken, Duration::from_millis(1)).is_none());
    }
}
