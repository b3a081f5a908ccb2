//! Model execution: the [`Backend`] trait one model instance implements (a batch of f32 tensors in,
//! a tensor out), where it runs ([`Device`]), and the one definition of the batch sizes an instance
//! is warmed up at and pads to ([`BatchSizes`]). [`ort`] is the ONNX Runtime implementation.

pub mod host;
pub mod ort;
pub mod testing;

use std::sync::Arc;

use crate::model::ModelSpec;

/// Error of one model run or of loading a model. `Clone`, so one failed batch answers every waiter.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EngineError {
    #[error("ONNX Runtime library: {0}")]
    Runtime(String),
    #[error("model {model}: {message}")]
    Load { model: String, message: String },
    #[error("model {model} does not match its model.toml: {message}")]
    Mismatch { model: String, message: String },
    #[error("inference failed: {0}")]
    Inference(String),
    #[error("model instance {instance} panicked: {message}")]
    Panic { instance: usize, message: String },
}

/// One model instance. `run` takes `&mut self` (as `ort::Session::run` does); each instance lives
/// on its own thread.
pub trait Backend: Send + 'static {
    /// `input` holds `batch` images back to back in the model's layout; returns `batch` outputs
    /// back to back (the batcher checks their total length once, for every backend).
    fn run(&mut self, input: &[f32], batch: usize) -> Result<Vec<f32>, EngineError>;

    /// [`Backend::run`] into `output` (cleared first), whose memory is reused: the batcher passes
    /// pooled output buffers, so a backend that can write into one (ONNX Runtime's copies its
    /// output tensor there) allocates nothing per batch. By default, `run`'s values are copied.
    fn run_into(
        &mut self,
        input: &[f32],
        batch: usize,
        output: &mut Vec<f32>,
    ) -> Result<(), EngineError> {
        let values = self.run(input, batch)?;
        output.clear();
        output.extend_from_slice(&values);
        Ok(())
    }
}

/// Builds the backend of instance `i` of one model version (called on that instance's thread).
pub type InstanceFactory =
    Arc<dyn Fn(usize) -> Result<Box<dyn Backend>, EngineError> + Send + Sync>;

/// Builds instance `i` of any model version, which will run the given batch sizes: what the server
/// is given (ONNX Runtime, or a test double) and turns into an [`InstanceFactory`] per version.
pub type BackendFactory = Arc<
    dyn Fn(&ModelSpec, BatchSizes, usize) -> Result<Box<dyn Backend>, EngineError> + Send + Sync,
>;

/// Where the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    /// CUDA execution provider on this GPU ordinal.
    Cuda(i32),
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| format!("unknown device {s:?}: use cpu, cuda or cuda:N")),
        }
    }
}

/// The batch sizes an instance runs: 1, 2, 4, … and the maximum. Warm-up runs each of them once, and
/// on CUDA a batch is padded up to the next of them (cuDNN picks algorithms per input shape, which
/// took 0.7 s for each new shape), so both come from this one list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchSizes {
    max: usize,
}

impl BatchSizes {
    /// Sizes up to `max` (at least 1).
    pub fn new(max: usize) -> Self {
        BatchSizes { max: max.max(1) }
    }

    /// The largest batch.
    pub fn max(self) -> usize {
        self.max
    }

    /// Every size an instance is warmed up at, ascending: powers of two below `max`, and `max`.
    pub fn warmup(self) -> Vec<usize> {
        let mut sizes: Vec<usize> = std::iter::successors(Some(1usize), |s| s.checked_mul(2))
            .take_while(|s| *s < self.max)
            .collect();
        sizes.push(self.max);
        sizes
    }

    /// The warmed-up size a batch of `batch` images runs at (itself if above the maximum).
    pub fn padded(self, batch: usize) -> usize {
        self.warmup()
            .into_iter()
            .find(|&s| s >= batch)
            .unwrap_or(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_devices() {
        assert_eq!("cpu".parse::<Device>(), Ok(Device::Cpu));
        assert_eq!("cuda".parse::<Device>(), Ok(Device::Cuda(0)));
        assert_eq!("cuda:1".parse::<Device>(), Ok(Device::Cuda(1)));
        assert!("gpu".parse::<Device>().is_err());
        assert_eq!(Device::Cuda(1).to_string(), "cuda:1");
    }

    #[test]
    fn warmup_covers_powers_of_two_and_the_maximum() {
        assert_eq!(BatchSizes::new(1).warmup(), [1]);
        assert_eq!(BatchSizes::new(8).warmup(), [1, 2, 4, 8]);
        assert_eq!(BatchSizes::new(6).warmup(), [1, 2, 4, 6]);
    }

    #[test]
    fn batches_pad_to_warmed_sizes() {
        let pad = |batch, max| BatchSizes::new(max).padded(batch);
        assert_eq!(pad(1, 32), 1);
        assert_eq!(pad(9, 32), 16);
        assert_eq!(pad(16, 32), 16);
        assert_eq!(pad(20, 24), 24);
        assert_eq!(pad(24, 24), 24);
        // Every padded size is one that warm-up ran.
        for max in 1..40 {
            let sizes = BatchSizes::new(max);
            for batch in 1..=max {
                assert!(
                    sizes.warmup().contains(&sizes.padded(batch)),
                    "{batch}/{max}"
                );
            }
        }
    }
}
