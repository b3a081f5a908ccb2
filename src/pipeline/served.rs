//! One loaded model version: its spec, preprocessor, postprocessing, batcher and metrics, and the
//! batching settings in effect for it (command line, `model.toml` and per-model overrides merged).

use std::sync::Arc;
use std::time::Duration;

use crate::backend::host::HostMemory;
use crate::backend::{BackendFactory, BatchSizes, Device, InstanceFactory};
use crate::batcher::{Batcher, BatcherConfig};
use crate::input::InputLimits;
use crate::metrics::{self, ModelMetrics};
use crate::model::task::Classifier;
use crate::model::{BatchingOverrides, ModelSpec};
use crate::postprocess::Segmenter;
use crate::preprocess::Preprocessor;
use crate::priority::Priority;

/// Server-wide batching defaults (the command line's flags).
#[derive(Debug, Clone)]
pub struct BatchingDefaults {
    pub max_batch_size: usize,
    pub max_queue_delay_us: u64,
    pub max_queue_wait_ms: u64,
    pub queue_capacity: usize,
    pub stat_queue_capacity: usize,
    pub instances: usize,
    pub default_priority: Priority,
}

/// The batching settings in effect for one model version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchSettings {
    pub max_batch_size: usize,
    pub max_queue_delay: Duration,
    /// Longest expected wait for an answer before a request is refused (`None`: no limit).
    pub max_queue_wait: Option<Duration>,
    /// Most routine images admitted.
    pub queue_capacity: usize,
    /// Most STAT images admitted.
    pub stat_queue_capacity: usize,
    pub instances: usize,
    pub default_priority: Priority,
}

impl BatchSettings {
    /// `overrides` (the command line's, per model) over `spec.config.batching` (model.toml) over
    /// `defaults`; the batch size capped at the model's own `max_batch_size`. Every image of a
    /// full-size request must fit in each queue.
    pub fn resolve(
        spec: &ModelSpec,
        overrides: &BatchingOverrides,
        defaults: &BatchingDefaults,
        max_images_per_request: usize,
    ) -> Result<Self, String> {
        let b = overrides.or(&spec.config.batching);
        let requested = b.max_batch_size.unwrap_or(defaults.max_batch_size);
        let settings = BatchSettings {
            max_batch_size: requested.min(spec.config.max_batch_size),
            max_queue_delay: Duration::from_micros(
                b.max_queue_delay_us.unwrap_or(defaults.max_queue_delay_us),
            ),
            max_queue_wait: match b.max_queue_wait_ms.unwrap_or(defaults.max_queue_wait_ms) {
                0 => None,
                ms => Some(Duration::from_millis(ms)),
            },
            queue_capacity: b.queue_capacity.unwrap_or(defaults.queue_capacity),
            stat_queue_capacity: b
                .stat_queue_capacity
                .unwrap_or(defaults.stat_queue_capacity),
            instances: b.instances.unwrap_or(defaults.instances),
            default_priority: b.default_priority.unwrap_or(defaults.default_priority),
        };
        if requested > spec.config.max_batch_size {
            tracing::info!(
                model = %spec.config.name,
                requested,
                model_max = spec.config.max_batch_size,
                "max batch size capped at the model's max_batch_size"
            );
        }
        if let Some(wait) = settings.max_queue_wait
            && settings.max_queue_delay >= wait
        {
            return Err(format!(
                "max_queue_delay_us ({} µs) must be below max_queue_wait_ms ({} ms), or every \
                 partial batch would be refused",
                settings.max_queue_delay.as_micros(),
                wait.as_millis()
            ));
        }
        if settings.max_batch_size == 0 {
            return Err("max_batch_size must be at least 1".into());
        }
        if settings.instances == 0 {
            return Err("instances must be at least 1".into());
        }
        for (name, capacity) in [
            ("queue_capacity", settings.queue_capacity),
            ("stat_queue_capacity", settings.stat_queue_capacity),
        ] {
            if capacity < max_images_per_request {
                return Err(format!(
                    "{name} ({capacity}) must be at least --max-images-per-request \
                     ({max_images_per_request}), or a full-size request could never be queued"
                ));
            }
        }
        Ok(settings)
    }
}

/// A model version that is loaded, warm and serving. Requests hold an `Arc` of it, so a version
/// that is swapped out or unloaded finishes the work it has; its batcher and instances stop when
/// the last `Arc` goes.
pub struct ServedModel {
    pub spec: ModelSpec,
    pub settings: BatchSettings,
    pub device: Device,
    /// Caveats every result carries (e.g. not clinically trained).
    pub warnings: Vec<String>,
    pub preprocessor: Preprocessor,
    pub classifier: Classifier,
    /// A segmentation model's postprocessing (`None`: a classifier).
    pub segmenter: Option<Segmenter>,
    pub batcher: Batcher,
    pub metrics: ModelMetrics,
    /// SHA-256 of the `model.toml` it was loaded with.
    pub toml_sha256: String,
    /// Results by input (`[cache]` in model.toml), if on.
    pub cache: Option<super::cache::ResultCache>,
}

/// Where and how a version's batches run.
#[derive(Debug, Clone, Copy)]
pub struct EngineSettings {
    pub device: Device,
    /// Batch buffers' memory (page-locked on CUDA unless turned off).
    pub host_memory: HostMemory,
    /// Batches measured to run within this run where they are formed (`--inline-run-us`).
    pub inline_run: Duration,
}

impl ServedModel {
    /// Starts the batcher of `spec` (every instance built by `factory` and warmed up).
    pub async fn load(
        spec: ModelSpec,
        settings: BatchSettings,
        factory: &BackendFactory,
        engine: EngineSettings,
        limits: InputLimits,
        toml_sha256: String,
    ) -> Result<ServedModel, String> {
        let classifier = Classifier::new(&spec);
        let segmenter = Segmenter::new(&spec);
        let preprocessor = Preprocessor::new(spec.config.input.clone(), limits);
        let sizes = BatchSizes::new(settings.max_batch_size);
        let config = BatcherConfig {
            sizes,
            max_queue_delay: settings.max_queue_delay,
            queue_capacity: [settings.stat_queue_capacity, settings.queue_capacity],
            instances: settings.instances,
            max_queue_wait: settings.max_queue_wait,
            input_len: spec.config.input.image_len(),
            output_len: match &segmenter {
                Some(segmenter) => segmenter.output_len(),
                None => classifier.output_len(),
            },
            host_memory: engine.host_memory,
            inline_run: engine.inline_run,
        };
        let instance_factory: InstanceFactory = {
            let (spec, factory) = (spec.clone(), factory.clone());
            Arc::new(move |instance| factory(&spec, sizes, instance))
        };
        let model_metrics = ModelMetrics::new(&spec.config.name, &spec.version);
        let batcher = Batcher::start(config, instance_factory, model_metrics.clone())
            .await
            .map_err(|e| e.to_string())?;
        model_metrics.set_instances(settings.instances);
        metrics::model_info(
            &spec.config.name,
            &spec.version,
            &spec.sha256,
            &engine.device.to_string(),
            true,
        );
        let cache = (spec.config.cache_max_bytes > 0).then(|| {
            super::cache::ResultCache::new(
                spec.config.cache_max_bytes,
                &spec.sha256,
                &toml_sha256,
                metrics::CacheMetrics::new(&spec.config.name, &spec.version),
            )
        });
        Ok(ServedModel {
            cache,
            warnings: spec.warnings(),
            spec,
            settings,
            device: engine.device,
            preprocessor,
            classifier,
            segmenter,
            batcher,
            metrics: model_metrics,
            toml_sha256,
        })
    }

    /// Marks the version unloaded in `brainai_model_info` and `brainai_model_instances`.
    pub(crate) fn retire(&self) {
        self.metrics.set_instances(0);
        metrics::model_info(
            &self.spec.config.name,
            &self.spec.version,
            &self.spec.sha256,
            &self.device.to_string(),
            false,
        );
    }
}
