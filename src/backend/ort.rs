//! ONNX Runtime backend (`ort`, loaded at run time from the pinned wheel's `libonnxruntime.so`):
//! one session per model instance, checked against `model.toml` when it is opened.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ::ort::ep;
use ::ort::session::Session;
use ::ort::value::{TensorElementType, TensorRef, ValueType};

use super::host::{HostBuffer, HostMemory};
use super::{Backend, BatchSizes, Device, EngineError};
use crate::model::{Layout, ModelSpec, Task};

static ORT_ENV: OnceLock<Result<::ort::environment::Environment, String>> = OnceLock::new();

/// Loads the ONNX Runtime shared library once per process (ort allows one environment per process).
pub fn init_runtime(library: &Path) -> Result<(), EngineError> {
    ORT_ENV
        .get_or_init(|| {
            if !library.is_file() {
                return Err(format!(
                    "{} does not exist; run `make setup` (installs the pinned onnxruntime wheel into .venv) \
                     or pass --ort-library / ORT_DYLIB_PATH",
                    library.display()
                ));
            }
            let builder = ::ort::init_from(library).map_err(|e| format!("cannot load {}: {e}", library.display()))?;
            builder
                .with_name("brainai")
                .with_telemetry(false)
                .build()
                .map_err(|e| format!("cannot create the ONNX Runtime environment: {e}"))
        })
        .as_ref()
        .map(|_| ())
        .map_err(|e| EngineError::Runtime(e.clone()))
}

/// Finds `libonnxruntime.so`: the explicit path, else the project's `.venv` (searched from the
/// current directory and from the executable's ancestors, so `target/release/brainai` finds it).
pub fn find_runtime_library(explicit: Option<&Path>) -> Result<PathBuf, EngineError> {
    if let Some(path) = explicit {
        return Ok(path.to_path_buf());
    }
    let mut roots: Vec<PathBuf> = std::env::current_dir().into_iter().collect();
    if let Ok(exe) = std::env::current_exe() {
        roots.extend(exe.ancestors().skip(1).map(Path::to_path_buf));
    }
    for root in roots {
        let lib_dir = root.join(".venv").join("lib");
        let Ok(pythons) = std::fs::read_dir(&lib_dir) else {
            continue;
        };
        for python in pythons.filter_map(Result::ok) {
            let capi = python.path().join("site-packages/onnxruntime/capi");
            let Ok(files) = std::fs::read_dir(&capi) else {
                continue;
            };
            let mut libs: Vec<PathBuf> = files
                .filter_map(Result::ok)
                .map(|f| f.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("libonnxruntime.so"))
                })
                .collect();
            libs.sort();
            if let Some(lib) = libs.pop() {
                return Ok(lib);
            }
        }
    }
    Err(EngineError::Runtime(
        "libonnxruntime.so not found: run `make setup` (installs the pinned onnxruntime wheel into .venv), \
         or pass --ort-library / set ORT_DYLIB_PATH to the library"
            .into(),
    ))
}

/// Session options for every instance.
#[derive(Debug, Clone, Copy)]
pub struct OrtOptions {
    pub device: Device,
    /// Intra-op threads per instance; 0 lets ONNX Runtime choose (one per core).
    pub intra_op_threads: usize,
    /// Whether idle intra-op threads spin-wait.
    pub intra_op_spinning: bool,
    /// The batch sizes the batcher sends (and warms up); on CUDA batches are padded to them.
    pub batch_sizes: BatchSizes,
    /// The padding buffer's memory: page-locked on CUDA (see [`super::host`]).
    pub host_memory: HostMemory,
}

/// An ONNX Runtime session serving one model instance.
pub struct OrtBackend {
    session: Session,
    /// The one stacked input, or one input per channel (`[input] tensors`).
    input_names: Vec<String>,
    output_name: String,
    image_shape: [usize; 3],
    layout: Layout,
    /// Per-channel buffers of a model with one input per channel, reused batch to batch.
    split: Vec<Vec<f32>>,
    /// On CUDA, batches are padded to a warmed-up size (see [`BatchSizes`]), in a buffer
    /// allocated once at the largest batch.
    padding: Option<(BatchSizes, HostBuffer)>,
}

impl OrtBackend {
    /// Opens a session and checks the model against its `model.toml`; `init_runtime` must have run.
    pub fn open(spec: &ModelSpec, options: OrtOptions) -> Result<Self, EngineError> {
        let load_err = |message: String| EngineError::Load {
            model: spec.config.name.clone(),
            message,
        };
        let env = match ORT_ENV.get() {
            Some(Ok(env)) => env,
            Some(Err(e)) => return Err(EngineError::Runtime(e.clone())),
            None => {
                return Err(EngineError::Runtime(
                    "ONNX Runtime was not initialised: this is a bug".into(),
                ));
            }
        };
        let mut builder = Session::builder(env).map_err(|e| load_err(e.to_string()))?;
        if !options.intra_op_spinning {
            builder = builder
                .with_intra_op_spinning(false)
                .map_err(|e| load_err(e.to_string()))?;
        }
        if options.intra_op_threads > 0 {
            builder = builder
                .with_intra_threads(options.intra_op_threads)
                .map_err(|e| load_err(e.to_string()))?;
        }
        if let Device::Cuda(id) = options.device {
            builder = builder
                .with_execution_providers([ep::CUDA::default()
                    .with_device_id(id)
                    .build()
                    .error_on_failure()])
                .map_err(|e| {
                    load_err(format!(
                        "CUDA execution provider on GPU {id} is unavailable: {e}"
                    ))
                })?;
        }
        let session = builder
            .commit_from_file(&spec.onnx_path)
            .map_err(|e| load_err(format!("{}: {e}", spec.onnx_path.display())))?;
        let mut backend = Self::check(spec, session)?;
        if matches!(options.device, Device::Cuda(_)) {
            let [a, b, c] = backend.image_shape;
            let buffer =
                HostBuffer::new(options.batch_sizes.max() * a * b * c, options.host_memory);
            backend.padding = Some((options.batch_sizes, buffer));
        }
        Ok(backend)
    }

    /// Verifies that the graph's declared inputs and output agree with `model.toml`.
    fn check(spec: &ModelSpec, session: Session) -> Result<Self, EngineError> {
        let mismatch = |message: String| EngineError::Mismatch {
            model: spec.config.name.clone(),
            message,
        };
        let names = |outlets: &[::ort::value::Outlet]| {
            outlets
                .iter()
                .map(|o| o.name().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let config = &spec.config;
        let input_spec = &config.input;
        let (h, w) = (input_spec.height as i64, input_spec.width as i64);
        // One stacked input of every channel, or one input per channel (`[input] tensors`).
        let (input_names, channels): (Vec<String>, i64) = if input_spec.tensors.is_empty() {
            (
                vec![input_spec.tensor_name.clone()],
                input_spec.channel_count() as i64,
            )
        } else {
            (input_spec.tensors.clone(), 1)
        };
        if session.inputs().len() != input_names.len() {
            return Err(mismatch(format!(
                "the graph has {} inputs [{}]; model.toml declares {} [{}]",
                session.inputs().len(),
                names(session.inputs()),
                input_names.len(),
                input_names.join(", ")
            )));
        }
        let expected: [i64; 3] = match input_spec.layout {
            Layout::Nchw => [channels, h, w],
            Layout::Nhwc => [h, w, channels],
        };
        for name in &input_names {
            let input = session
                .inputs()
                .iter()
                .find(|o| o.name() == name)
                .ok_or_else(|| {
                    let key = if input_spec.tensors.is_empty() {
                        "name ="
                    } else {
                        "tensors names"
                    };
                    mismatch(format!(
                        "[input] {key} {name:?}, but the graph's inputs are [{}]",
                        names(session.inputs())
                    ))
                })?;
            let ValueType::Tensor { ty, shape, .. } = input.dtype() else {
                return Err(mismatch(format!("input {name:?} is not a tensor")));
            };
            if *ty != TensorElementType::Float32 {
                return Err(mismatch(format!(
                    "input {name:?} is {ty:?}, expected float32"
                )));
            }
            let dims_ok = shape.len() == 4
                && shape[1..]
                    .iter()
                    .zip(expected)
                    .all(|(&d, e)| d == e || d < 0);
            if !dims_ok {
                return Err(mismatch(format!(
                    "input {name:?} has shape {:?}, but model.toml declares {} {}×{} with {channels} channel(s), i.e. [batch, {}, {}, {}]",
                    &shape[..],
                    input_spec.layout.as_str(),
                    h,
                    w,
                    expected[0],
                    expected[1],
                    expected[2]
                )));
            }
            if shape[0] > 0 && (shape[0] as usize) < config.max_batch_size {
                return Err(mismatch(format!(
                    "input {name:?} has a fixed batch size {} but max_batch_size = {}; export with a dynamic batch axis",
                    shape[0], config.max_batch_size
                )));
            }
        }

        let output = session
            .outputs()
            .iter()
            .find(|o| o.name() == config.output_name)
            .ok_or_else(|| {
                mismatch(format!(
                    "[output] name = {:?}, but the graph's outputs are [{}]",
                    config.output_name,
                    names(session.outputs())
                ))
            })?;
        let ValueType::Tensor { ty, shape, .. } = output.dtype() else {
            return Err(mismatch(format!(
                "output {:?} is not a tensor",
                output.name()
            )));
        };
        if *ty != TensorElementType::Float32 {
            return Err(mismatch(format!(
                "output {:?} is {ty:?}, expected float32",
                output.name()
            )));
        }
        let labels = config.labels.len() as i64;
        let (expected, described): (Vec<i64>, String) = match &config.task {
            Task::Classification => (vec![labels], format!("[batch, {labels}]")),
            Task::Segmentation(seg) => match seg.layout {
                Layout::Nchw => (
                    vec![labels, h, w],
                    format!("NCHW [batch, {labels}, {h}, {w}]"),
                ),
                Layout::Nhwc => (
                    vec![h, w, labels],
                    format!("NHWC [batch, {h}, {w}, {labels}]"),
                ),
            },
        };
        let output_ok = shape.len() == expected.len() + 1
            && shape[1..]
                .iter()
                .zip(&expected)
                .all(|(&d, &e)| d == e || d < 0);
        if !output_ok {
            return Err(mismatch(format!(
                "output {:?} has shape {:?}, but model.toml ({} labels, task {}) declares {described}",
                output.name(),
                &shape[..],
                labels,
                config.task.as_str()
            )));
        }

        let c = input_spec.channel_count();
        let (h, w) = (h as usize, w as usize);
        Ok(OrtBackend {
            input_names,
            output_name: config.output_name.clone(),
            image_shape: match input_spec.layout {
                Layout::Nchw => [c, h, w],
                Layout::Nhwc => [h, w, c],
            },
            layout: input_spec.layout,
            split: Vec::new(),
            session,
            padding: None,
        })
    }
}

/// Splits a batch of `c` stacked channels into one buffer per channel input (`[input] tensors`).
fn split_channels(
    split: &mut Vec<Vec<f32>>,
    layout: Layout,
    c: usize,
    input: &[f32],
    batch: usize,
) {
    let per_image = input.len() / batch.max(1);
    let plane = per_image / c;
    split.resize_with(c, Vec::new);
    for (k, buffer) in split.iter_mut().enumerate() {
        buffer.clear();
        buffer.reserve(batch * plane);
        for image in input.chunks_exact(per_image) {
            match layout {
                Layout::Nchw => buffer.extend_from_slice(&image[k * plane..(k + 1) * plane]),
                Layout::Nhwc => buffer.extend(image[k..].iter().step_by(c).copied()),
            }
        }
    }
}

impl Backend for OrtBackend {
    fn run(&mut self, input: &[f32], batch: usize) -> Result<Vec<f32>, EngineError> {
        let mut output = Vec::new();
        self.run_into(input, batch, &mut output)?;
        Ok(output)
    }

    fn run_into(
        &mut self,
        input: &[f32],
        batch: usize,
        output: &mut Vec<f32>,
    ) -> Result<(), EngineError> {
        let [a, b, c] = self.image_shape;
        let (run_batch, input) = match &mut self.padding {
            Some((sizes, buffer)) if sizes.padded(batch) > batch => {
                // Padding rows are zeros; the rows before them are this batch's.
                let run_batch = sizes.padded(batch);
                let padded = &mut buffer[..run_batch * a * b * c];
                padded[..input.len()].copy_from_slice(input);
                padded[input.len()..].fill(0.0);
                (run_batch, &padded[..])
            }
            _ => (batch, input),
        };
        let infer = |e: ::ort::Error| EngineError::Inference(e.to_string());
        let outputs = if self.input_names.len() == 1 {
            let tensor =
                TensorRef::from_array_view(([run_batch, a, b, c], input)).map_err(infer)?;
            self.session
                .run(::ort::inputs![self.input_names[0].as_str() => tensor])
                .map_err(infer)?
        } else {
            // One input per channel: each [batch, 1, H, W] (or [batch, H, W, 1]).
            split_channels(
                &mut self.split,
                self.layout,
                self.input_names.len(),
                input,
                run_batch,
            );
            let shape = match self.layout {
                Layout::Nchw => [run_batch, 1, b, c],
                Layout::Nhwc => [run_batch, a, b, 1],
            };
            let mut inputs = Vec::with_capacity(self.split.len());
            for (name, buffer) in self.input_names.iter().zip(&self.split) {
                let tensor = TensorRef::from_array_view((shape, &buffer[..])).map_err(infer)?;
                inputs.push((name.as_str(), tensor));
            }
            self.session.run(inputs).map_err(infer)?
        };
        let value = outputs.get(&self.output_name).ok_or_else(|| {
            EngineError::Inference(format!("output {:?} missing", self.output_name))
        })?;
        let (_, data) = value.try_extract_tensor::<f32>().map_err(infer)?;
        // Padding rows are cut off; the batcher checks the length of what is left.
        let keep = data.len() / run_batch * batch;
        output.clear();
        output.extend_from_slice(&data[..keep]);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_library_path_is_used_as_given() {
        let path = find_runtime_library(Some(Path::new("/nonexistent/libonnxruntime.so"))).unwrap();
        assert_eq!(path, PathBuf::from("/nonexistent/libonnxruntime.so"));
    }
}
