//! The thread budget: how many threads each pool gets, from the CPUs this process may use (cgroup
//! quota and affinity included, as `std::thread::available_parallelism` reads them). Three pools
//! share the cores:
//!
//! - the async runtime (tokio workers: gRPC and HTTP, the batcher's queue task),
//! - the preprocessing pool (rayon: decoding, resizing, scaling),
//! - ONNX Runtime's intra-op threads, per model instance (the model run).
//!
//! Each is set by a flag; `0` (the default) takes the value chosen here. `docs/PERFORMANCE.md`
//! ("Thread budget") has the measurements behind the choice.

use crate::backend::Device;

/// Resolved thread counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThreadBudget {
    /// CPUs this process may use.
    pub cores: usize,
    /// Async runtime workers.
    pub io: usize,
    /// Preprocessing threads.
    pub preprocess: usize,
    /// ONNX Runtime intra-op threads per instance; 0 leaves the choice to ONNX Runtime.
    pub intra_op: usize,
}

impl ThreadBudget {
    /// The budget for `cores` CPUs, with each explicit (non-zero) setting kept.
    pub fn resolve(
        cores: usize,
        device: Device,
        io: usize,
        preprocess: usize,
        intra_op: usize,
    ) -> Self {
        let cores = cores.max(1);
        let pick = |explicit: usize, auto: usize| if explicit > 0 { explicit } else { auto };
        ThreadBudget {
            cores,
            // Network I/O and the queue task are light next to decoding and the model: a quarter
            // of the cores, at least one, at most four.
            io: pick(io, (cores / 4).clamp(1, 4)),
            // Decoding is bursty and its threads sleep when idle: one per core.
            preprocess: pick(preprocess, cores),
            intra_op: pick(
                intra_op,
                match device {
                    // The model is the main consumer: every core (ONNX Runtime's own default
                    // counts physical cores only, half of them on SMT machines).
                    Device::Cpu => cores,
                    // On CUDA the CPU threads only launch kernels and copy.
                    Device::Cuda(_) => 1,
                },
            ),
        }
    }

    /// The budget of this process.
    pub fn of_this_machine(device: Device, io: usize, preprocess: usize, intra_op: usize) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self::resolve(cores, device, io, preprocess, intra_op)
    }

    /// Sizes the process-wide preprocessing pool. Only the first call in a process takes effect
    /// (rayon's global pool is built once); later calls report what is in force.
    pub fn init_preprocess_pool(&self) -> usize {
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(self.preprocess)
            .thread_name(|i| format!("brainai-preprocess-{i}"))
            .build_global();
        rayon::current_num_threads()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_scale_with_the_cores() {
        let auto = |cores, device| ThreadBudget::resolve(cores, device, 0, 0, 0);
        assert_eq!(
            auto(2, Device::Cpu),
            ThreadBudget {
                cores: 2,
                io: 1,
                preprocess: 2,
                intra_op: 2
            }
        );
        assert_eq!(auto(8, Device::Cpu).io, 2);
        assert_eq!(auto(64, Device::Cpu).io, 4);
        assert_eq!(auto(16, Device::Cuda(0)).intra_op, 1);
        assert_eq!(auto(16, Device::Cuda(0)).preprocess, 16);
        assert_eq!(auto(0, Device::Cpu).cores, 1);
    }

    #[test]
    fn explicit_settings_are_kept() {
        let b = ThreadBudget::resolve(2, Device::Cpu, 3, 5, 7);
        assert_eq!((b.io, b.preprocess, b.intra_op), (3, 5, 7));
    }
}
