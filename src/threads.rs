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
            // Network I/O, the queue task and the decoding of small requests (one slice, decoded
            // where it was received: `--inline-decode-kib`): a quarter of the cores, at least two
            // (so two small requests decode at once) but no more than the cores, at most four.
            io: pick(io, (cores / 4).clamp(2, 4).min(cores)),
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

/// CPU time of the calling thread since [`ThreadCpu::start`]: what a piece of work cost in CPU,
/// without the time the thread was preempted (under load the two differ by the other threads'
/// share of the core).
pub struct ThreadCpu(Option<std::time::Duration>);

/// [`ThreadCpu::sampled`] reads the clock for one call in this many on each thread.
pub const CPU_SAMPLE_EVERY: u32 = 8;

impl ThreadCpu {
    pub fn start() -> Self {
        ThreadCpu(thread_cpu_time())
    }

    /// [`ThreadCpu::start`] for one call in [`CPU_SAMPLE_EVERY`] on this thread (its first call
    /// included); for the others no clock is read and `elapsed` is `None`. The thread's CPU clock
    /// is a system call, not a vDSO read: about 2.5 µs each on a VM, two per image, against a
    /// per-image serving overhead budget of 100 µs. A sampled mean needs no more.
    pub fn sampled() -> Self {
        thread_local!(static CALLS: std::cell::Cell<u32> = const { std::cell::Cell::new(0) });
        let call = CALLS.with(|c| {
            let n = c.get();
            c.set(n.wrapping_add(1));
            n
        });
        if call.is_multiple_of(CPU_SAMPLE_EVERY) {
            Self::start()
        } else {
            ThreadCpu(None)
        }
    }

    /// CPU time used by this thread since `start`: `None` for a call [`ThreadCpu::sampled`]
    /// skipped, or where the clock is not available.
    pub fn elapsed(&self) -> Option<std::time::Duration> {
        let start = self.0?;
        thread_cpu_time().map(|now| now.saturating_sub(start))
    }
}

fn thread_cpu_time() -> Option<std::time::Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to fill.
    let ok = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } == 0;
    ok.then(|| std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
}

/// What [`tune_allocator`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllocatorTuning {
    /// Fixed thresholds applied (bytes).
    Applied {
        mmap_threshold: usize,
        trim_threshold: usize,
    },
    /// `GLIBC_TUNABLES` sets malloc options: the operator's choice is kept.
    LeftToEnvironment,
    /// Not glibc: nothing to tune.
    NotGlibc,
}

/// Allocations below this come from the thread's malloc arena, not a fresh `mmap`: a decoded
/// slice (a few hundred KiB) and a request body are reused memory, not new pages.
pub const MMAP_THRESHOLD: usize = 4 << 20;
/// Free memory an arena keeps before giving it back to the kernel. glibc's dynamic default
/// (twice the largest freed mmap'd chunk, so ≈ 400 KiB after a 256² slice) returns and re-faults
/// the decode buffers' pages on nearly every call: ≈ 0.5 page faults per call under load, with the
/// TLB shootdowns that unmapping costs on every other core. Bounded: at most this much is kept per
/// busy arena (one per thread that allocates, capped by glibc at 8 per core).
pub const TRIM_THRESHOLD: usize = 16 << 20;

/// Fixes glibc malloc's mmap and trim thresholds for a serving process (see the constants), unless
/// `GLIBC_TUNABLES` already sets malloc options. Call once, early in `main`.
pub fn tune_allocator() -> AllocatorTuning {
    if std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("glibc.malloc.")) {
        return AllocatorTuning::LeftToEnvironment;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes the allocator's parameters; it is thread-safe.
        let ok = unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD as libc::c_int) == 1
        };
        if ok {
            return AllocatorTuning::Applied {
                mmap_threshold: MMAP_THRESHOLD,
                trim_threshold: TRIM_THRESHOLD,
            };
        }
    }
    AllocatorTuning::NotGlibc
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
                io: 2,
                preprocess: 2,
                intra_op: 2
            }
        );
        assert_eq!(auto(8, Device::Cpu).io, 2);
        assert_eq!(auto(1, Device::Cpu).io, 1);
        assert_eq!(auto(64, Device::Cpu).io, 4);
        assert_eq!(auto(16, Device::Cuda(0)).intra_op, 1);
        assert_eq!(auto(16, Device::Cuda(0)).preprocess, 16);
        assert_eq!(auto(0, Device::Cpu).cores, 1);
    }

    #[test]
    fn thread_cpu_counts_work_not_sleep() {
        let cpu = ThreadCpu::start();
        std::thread::sleep(std::time::Duration::from_millis(30));
        let slept = cpu.elapsed().unwrap();
        let cpu = ThreadCpu::start();
        let mut x = 0u64;
        let wall = std::time::Instant::now();
        while wall.elapsed() < std::time::Duration::from_millis(30) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let busy = cpu.elapsed().unwrap();
        assert!(
            slept < std::time::Duration::from_millis(15),
            "sleeping is not CPU: {slept:?}"
        );
        assert!(busy > slept, "spinning is: busy {busy:?}, slept {slept:?}");
    }

    #[test]
    fn sampled_reads_the_clock_once_in_every_few_calls() {
        let read = std::thread::spawn(|| {
            (0..4 * CPU_SAMPLE_EVERY)
                .map(|_| ThreadCpu::sampled().elapsed().is_some())
                .collect::<Vec<_>>()
        })
        .join()
        .unwrap();
        assert!(read[0], "a thread's first call is measured");
        assert_eq!(read.iter().filter(|r| **r).count(), 4);
    }

    #[test]
    fn explicit_settings_are_kept() {
        let b = ThreadBudget::resolve(2, Device::Cpu, 3, 5, 7);
        assert_eq!((b.io, b.preprocess, b.intra_op), (3, 5, 7));
    }
}
