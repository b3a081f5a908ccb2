//! Wiring: loads the model, starts gRPC (classifier, health, reflection) and the metrics endpoint,
//! warms the instances up before reporting SERVING, and drains on shutdown.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::batcher::{Batcher, BatcherConfig};
use crate::config::ServeArgs;
use crate::engine::{self, BackendFactory, EngineError, OrtBackend, OrtOptions};
use crate::metrics as m;
use crate::model::{ModelError, ModelSpec};
use crate::pb;
use crate::preprocess::{InputLimits, Preprocessor};
use crate::service::{ClassifierService, Inflight, ServedModel, Shared};
use crate::status_layer::MessageLimitLayer;

/// Fully-qualified name of the classifier service, as health checks name it.
pub const SERVICE_NAME: &str = "brainai.v1.TumorClassifier";

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("gRPC server failed: {0}")]
    Transport(String),
}

/// A started server. Health reports NOT_SERVING until the instances are warm.
pub struct RunningServer {
    pub grpc_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub shared: Arc<Shared>,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), ServeError>>,
}

impl RunningServer {
    /// Starts draining: health NOT_SERVING, new calls UNAVAILABLE, queued work finishes.
    pub fn begin_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Waits for the server to stop (after `begin_shutdown`, or a start-up failure).
    pub async fn wait(self) -> Result<(), ServeError> {
        // Keep the sender alive while waiting, so dropping it is not mistaken for a shutdown request.
        let _shutdown = self.shutdown;
        self.task
            .await
            .unwrap_or_else(|e| Err(ServeError::Transport(format!("server task failed: {e}"))))
    }

    /// `begin_shutdown` then `wait`.
    pub async fn shutdown(mut self) -> Result<(), ServeError> {
        self.begin_shutdown();
        self.wait().await
    }
}

/// Loads the model spec, binds both listeners and starts serving. `factory` overrides the ONNX
/// Runtime backend (tests use it to control warm-up); `None` serves the model with ONNX Runtime.
pub async fn start(
    args: &ServeArgs,
    factory: Option<BackendFactory>,
) -> Result<RunningServer, ServeError> {
    args.validate().map_err(ServeError::Config)?;
    let spec = ModelSpec::load(&args.model_dir, args.model_version)?;
    let max_batch_size = args.max_batch_size.min(spec.max_batch_size);
    if max_batch_size < args.max_batch_size {
        tracing::warn!(
            requested = args.max_batch_size,
            model_max = spec.max_batch_size,
            "max batch size capped at the model's max_batch_size"
        );
    }

    let factory = match factory {
        Some(f) => f,
        None => {
            let library = engine::find_runtime_library(args.ort_library.as_deref())?;
            engine::init_runtime(&library)?;
            tracing::info!(library = %library.display(), "ONNX Runtime loaded");
            let spec = spec.clone();
            let options = OrtOptions {
                device: args.device,
                intra_op_threads: args.intra_op_threads,
                intra_op_spinning: args.intra_op_spinning,
                max_batch_size,
            };
            Arc::new(move |_instance| {
                OrtBackend::open(&spec, options).map(|b| Box::new(b) as Box<dyn engine::Backend>)
            }) as BackendFactory
        }
    };

    let batcher_config = BatcherConfig {
        max_batch_size,
        max_queue_delay: Duration::from_micros(args.max_queue_delay_us),
        queue_capacity: args.queue_capacity,
        instances: args.instances,
        image_len: spec.input.image_len(),
        num_labels: spec.labels.len(),
        output_kind: spec.output_kind,
    };
    let limits = InputLimits {
        max_image_bytes: args.max_image_bytes,
        max_pixels: args.max_pixels,
    };
    let warnings = spec.warnings();
    let shared = Arc::new(Shared {
        model: ServedModel {
            preprocessor: Preprocessor::new(spec.input.clone(), limits),
            device: args.device,
            warnings,
            spec,
        },
        batcher: OnceLock::new(),
        draining: AtomicBool::new(false),
        inflight: Arc::new(Inflight::default()),
        max_images_per_request: args.max_images_per_request,
    });

    let grpc_listener =
        TcpListener::bind(args.grpc_addr)
            .await
            .map_err(|source| ServeError::Bind {
                addr: args.grpc_addr,
                source,
            })?;
    let metrics_listener = TcpListener::bind(args.metrics_addr)
        .await
        .map_err(|source| ServeError::Bind {
            addr: args.metrics_addr,
            source,
        })?;
    let grpc_addr = grpc_listener
        .local_addr()
        .map_err(|source| ServeError::Bind {
            addr: args.grpc_addr,
            source,
        })?;
    let metrics_addr = metrics_listener
        .local_addr()
        .map_err(|source| ServeError::Bind {
            addr: args.metrics_addr,
            source,
        })?;

    let ready = Arc::new(AtomicBool::new(false));
    let metrics_task = tokio::spawn(m::serve_http(metrics_listener, m::install(), ready.clone()));

    let (health, health_service) = tonic_health::server::health_reporter();
    set_health(&health, ServingStatus::NotServing).await;

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServeError::Transport(e.to_string()))?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| ServeError::Transport(e.to_string()))?;
    let classifier = pb::tumor_classifier_server::TumorClassifierServer::new(
        ClassifierService::new(shared.clone()),
    )
    .max_decoding_message_size(args.max_message_bytes)
    .max_encoding_message_size(args.max_message_bytes);

    let mut builder = tonic::transport::Server::builder().layer(MessageLimitLayer);
    if args.max_connection_age_s > 0 {
        builder = builder
            .max_connection_age(Duration::from_secs(args.max_connection_age_s))
            .max_connection_age_grace(Duration::from_secs(args.drain_timeout_s));
    }
    let (stop_grpc, grpc_stopped) = oneshot::channel::<()>();
    let grpc_task = tokio::spawn(
        builder
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(classifier)
            // TCP_NODELAY: without it small responses wait for the peer's delayed ACK (~40 ms).
            .serve_with_incoming_shutdown(
                TcpIncoming::from(grpc_listener).with_nodelay(Some(true)),
                async {
                    let _ = grpc_stopped.await;
                },
            ),
    );
    tracing::info!(%grpc_addr, %metrics_addr, "listening; loading and warming up the model");

    let (shutdown_tx, shutdown_rx) = oneshot::channel();
    let lifecycle = Lifecycle {
        shared: shared.clone(),
        health,
        ready,
        drain_timeout: Duration::from_secs(args.drain_timeout_s),
    };
    let task = tokio::spawn(async move {
        let result = lifecycle.run(batcher_config, factory, shutdown_rx).await;
        let _ = stop_grpc.send(());
        let served = grpc_task
            .await
            .map_err(|e| ServeError::Transport(e.to_string()))
            .and_then(|r| r.map_err(|e| ServeError::Transport(e.to_string())));
        metrics_task.abort();
        result.and(served)
    });
    Ok(RunningServer {
        grpc_addr,
        metrics_addr,
        shared,
        shutdown: Some(shutdown_tx),
        task,
    })
}

struct Lifecycle {
    shared: Arc<Shared>,
    health: HealthReporter,
    ready: Arc<AtomicBool>,
    drain_timeout: Duration,
}

impl Lifecycle {
    /// Warm up → SERVING → (shutdown) → NOT_SERVING → drain.
    async fn run(
        self,
        config: BatcherConfig,
        factory: BackendFactory,
        mut shutdown: oneshot::Receiver<()>,
    ) -> Result<(), ServeError> {
        let batcher = tokio::select! {
            started = Batcher::start(config, factory) => started?,
            _ = &mut shutdown => {
                tracing::info!("shutdown requested during warm-up");
                return Ok(());
            }
        };
        let model = &self.shared.model;
        m::model_info(
            &model.spec.name,
            &model.spec.version,
            &model.spec.sha256,
            &model.device.to_string(),
        );
        let max_batch = batcher.config().max_batch_size;
        let _ = self.shared.batcher.set(batcher);
        set_health(&self.health, ServingStatus::Serving).await;
        self.ready.store(true, Ordering::SeqCst);
        tracing::info!(
            model = %model.spec.name,
            version = %model.spec.version,
            sha256 = %model.spec.sha256,
            device = %model.device,
            max_batch,
            clinically_trained = model.spec.clinically_trained,
            "model warm; serving"
        );

        let _ = shutdown.await;
        tracing::info!(
            inflight = self.shared.inflight.count(),
            "shutting down: draining"
        );
        self.shared.draining.store(true, Ordering::SeqCst);
        self.ready.store(false, Ordering::SeqCst);
        set_health(&self.health, ServingStatus::NotServing).await;
        if tokio::time::timeout(self.drain_timeout, self.shared.inflight.wait_idle())
            .await
            .is_err()
        {
            tracing::warn!(
                inflight = self.shared.inflight.count(),
                "drain timeout reached; stopping with calls still in progress"
            );
        }
        tracing::info!("drained; stopping");
        Ok(())
    }
}

async fn set_health(health: &HealthReporter, status: ServingStatus) {
    health.set_service_status("", status).await;
    health.set_service_status(SERVICE_NAME, status).await;
}

/// Serves until SIGTERM or SIGINT, then drains and returns; a start-up failure returns its error.
pub async fn run_until_signal(args: &ServeArgs) -> Result<std::process::ExitCode, ServeError> {
    let mut server = start(args, None).await?;
    let trigger = server
        .shutdown
        .take()
        .expect("a new server has its shutdown sender");
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = trigger.send(());
    });
    server.wait().await?;
    Ok(std::process::ExitCode::SUCCESS)
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(
            tokio::signal::unix::SignalKind::terminate(),
        ) {
            Ok(term) => term,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only SIGINT stops the server");
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => tracing::info!("SIGINT received"),
            _ = term.recv() => tracing::info!("SIGTERM received"),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
