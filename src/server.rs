//! Wiring: builds the registry and pipeline, binds the listeners, mounts every front end (gRPC
//! classifier, health, reflection; HTTP metrics and probes), loads and warms up the models before
//! reporting SERVING, reloads on request, and drains on shutdown.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::api::body::BodyBudget;
use crate::api::call::CallLayer;
use crate::api::grpc::ClassifierService;
use crate::api::oip::grpc::InferenceService;
use crate::api::prescan::{PrescanLayer, PrescanLimits};
use crate::api::routes::{self, GrpcRoutes};
use crate::api::status::StatusLayer;
use crate::api::transport::{self, ConnectionPolicy, Connections, Protocol, Stop};
use crate::backend::ort::{self as ort_backend, OrtBackend, OrtOptions};
use crate::backend::{Backend, BackendFactory, EngineError};
use crate::config::ServeArgs;
use crate::input::InputLimits;
use crate::pipeline::registry::{RegistryConfig, Source};
use crate::pipeline::served::BatchingDefaults;
use crate::pipeline::{Pipeline, Registry};
use crate::security::Security;
use crate::state::{Phase, ServingState};
use crate::{model, pb};

/// Fully-qualified name of the classifier service, as health checks name it.
pub const SERVICE_NAME: &str = "brainai.v1.TumorClassifier";

/// Fully-qualified name of the Open Inference Protocol service, as health checks name it.
pub const OIP_SERVICE_NAME: &str = "inference.GRPCInferenceService";

/// The gRPC health service name of one model: SERVING while a version of it is ready.
pub fn model_health_name(model: &str) -> String {
    format!("model/{model}")
}

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("{0}")]
    Models(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("gRPC server failed: {0}")]
    Transport(String),
}

/// A started server. Health reports NOT_SERVING until every model is loaded and warm.
pub struct RunningServer {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    /// The plaintext health-only port (`--health-addr`).
    pub health_addr: Option<SocketAddr>,
    /// The DICOM node's listener (`--dicom-addr`).
    pub dicom_addr: Option<SocketAddr>,
    pub state: Arc<ServingState>,
    pub registry: Arc<Registry>,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), ServeError>>,
}

impl RunningServer {
    /// Starts draining: health NOT_SERVING, new calls UNAVAILABLE, work in progress finishes.
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

/// The ONNX Runtime backend for every model (loads the library once per process).
fn ort_factory(args: &ServeArgs) -> Result<BackendFactory, ServeError> {
    let library = ort_backend::find_runtime_library(args.ort_library.as_deref())?;
    ort_backend::init_runtime(&library)?;
    tracing::info!(library = %library.display(), "ONNX Runtime loaded");
    let (device, threads, spinning, host_memory) = (
        args.device,
        args.thread_budget().intra_op,
        args.intra_op_spinning,
        args.host_memory(),
    );
    Ok(Arc::new(move |spec, batch_sizes, _instance| {
        let options = OrtOptions {
            device,
            intra_op_threads: threads,
            intra_op_spinning: spinning,
            batch_sizes,
            host_memory,
        };
        OrtBackend::open(spec, options).map(|b| Box::new(b) as Box<dyn Backend>)
    }))
}

async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), ServeError> {
    let err = |source| ServeError::Bind { addr, source };
    let listener = TcpListener::bind(addr).await.map_err(err)?;
    let local = listener.local_addr().map_err(err)?;
    Ok((listener, local))
}

/// The model registry and the one pipeline every front end calls. Fails fast, before anything is
/// bound, when the models' location itself is wrong; everything else about the models is checked
/// while they load.
fn build_pipeline(
    args: &ServeArgs,
    factory: BackendFactory,
    state: Arc<ServingState>,
) -> Result<(Arc<Registry>, Pipeline), ServeError> {
    let source = match &args.model_repository {
        Some(dir) => Source::Repository(dir.clone()),
        None => Source::Single {
            dir: args.model_dir.clone(),
            version: args.model_version,
        },
    };
    match &source {
        Source::Repository(dir) => model::repository::model_dirs(dir).map(drop),
        Source::Single { dir, .. } => model::ModelConfig::load(dir).map(drop),
    }
    .map_err(|e| ServeError::Models(e.to_string()))?;
    let registry = Arc::new(Registry::new(
        RegistryConfig {
            source,
            default_model: args.default_model.clone(),
            defaults: BatchingDefaults {
                max_batch_size: args.max_batch_size,
                max_queue_delay_us: args.max_queue_delay_us,
                max_queue_wait_ms: args.max_queue_wait_ms,
                queue_capacity: args.queue_capacity,
                stat_queue_capacity: args.stat_queue_capacity,
                instances: args.instances,
                default_priority: args.default_priority,
            },
            overrides: args.overrides().map_err(ServeError::Config)?,
            limits: InputLimits {
                max_image_bytes: args.max_image_bytes,
                max_pixels: args.max_pixels,
            },
            max_images_per_request: args.max_images_per_request,
            device: args.device,
            host_memory: args.host_memory(),
            inline_run: args.inline_run(),
        },
        factory,
        state.clone(),
    ));
    let pipeline = Pipeline::new(
        registry.clone(),
        state,
        crate::pipeline::Limits {
            max_images_per_request: args.max_images_per_request,
            max_request_decode_bytes: args.max_request_decode_mib << 20,
            max_decode_in_flight_bytes: args.max_decode_in_flight_mib << 20,
            inline_decode_bytes: args.inline_decode_kib << 10,
            max_probability_bytes: args.max_probability_mib << 20,
            max_study_instances: args.max_study_instances,
            max_study_decode_bytes: args.max_study_decode_mib << 20,
        },
    );
    Ok((registry, pipeline))
}

/// The routes of the gRPC port: the tables of the services [`grpc_stack`] mounts, which the call
/// and trace layers look each request's path up in.
pub const GRPC_ROUTES: GrpcRoutes = GrpcRoutes::new(&[
    crate::api::grpc::ROUTES,
    crate::api::oip::grpc::ROUTES,
    routes::HEALTH_ROUTES,
    routes::REFLECTION_ROUTES,
]);

/// The gRPC port's services (health, reflection, `brainai.v1`, the Open Inference Protocol)
/// behind its layers, outermost first: the call's span, the call layer (access and the call's
/// record), the status fixes, the protobuf pre-scan.
#[allow(
    clippy::type_complexity,
    reason = "what transport::serve needs of a service, spelt out once, here"
)]
fn grpc_stack(
    args: &ServeArgs,
    pipeline: &Pipeline,
    security: &Security,
    health: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
) -> Result<
    impl tower::Service<
        hyper::Request<crate::api::body::RequestBody>,
        Response = hyper::Response<
            impl http_body::Body<
                Data = bytes::Bytes,
                Error: Into<Box<dyn std::error::Error + Send + Sync>>,
            > + Send
            + 'static,
        >,
        Error = std::convert::Infallible,
        Future: Send + 'static,
    > + Clone
    + Send
    + 'static,
    ServeError,
> {
    let reflection = |builder: tonic_reflection::server::Builder<'static>| {
        builder
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection(tonic_reflection::server::Builder::configure())
        .build_v1()
        .map_err(|e| ServeError::Transport(e.to_string()))?;
    let reflection_v1alpha = reflection(tonic_reflection::server::Builder::configure())
        .build_v1alpha()
        .map_err(|e| ServeError::Transport(e.to_string()))?;
    let classifier = pb::tumor_classifier_server::TumorClassifierServer::new(
        ClassifierService::new(pipeline.clone()),
    )
    .max_decoding_message_size(args.max_message_bytes)
    .max_encoding_message_size(args.max_message_bytes);
    let inference =
        crate::kserve_pb::grpc_inference_service_server::GrpcInferenceServiceServer::new(
            InferenceService::new(pipeline.clone()),
        )
        .max_decoding_message_size(args.max_message_bytes)
        .max_encoding_message_size(args.max_message_bytes);
    let routes = tonic::service::Routes::new(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(classifier)
        .add_service(inference)
        .prepare();
    Ok(tower::ServiceBuilder::new()
        .layer(crate::api::trace::TraceLayer::grpc(GRPC_ROUTES))
        .layer(CallLayer::grpc(security, GRPC_ROUTES))
        .layer(StatusLayer {
            max_metadata_bytes: args.max_metadata_bytes,
        })
        .layer(PrescanLayer(PrescanLimits {
            max_message_bytes: args.max_message_bytes,
            max_images: args.max_images_per_request,
        }))
        .service(routes))
}

/// The HTTP API port's router: every route behind the call layer, all behind the trace layer.
fn http_api(args: &ServeArgs, pipeline: Pipeline, security: &Security) -> axum::Router {
    crate::api::rest::router(
        pipeline,
        args.max_http_body_bytes,
        CallLayer::http(security, &args.security.http_allowed_origins),
    )
}

/// Raises the open-file limit and warns when it is still low for the connection caps.
fn check_open_files(args: &ServeArgs) {
    if let Some(limit) = transport::raise_fd_limit() {
        let wanted = (args.grpc_connections()
            + args.http_api_connections()
            + args.metrics_connections()) as u64
            + 256;
        if limit < wanted {
            tracing::warn!(
                open_file_limit = limit,
                wanted,
                "the open-file limit is low for the connection caps (--max-grpc-connections, --max-http-api-connections, --max-metrics-connections); raise it (ulimit -n) or lower the caps"
            );
        }
    }
}

/// The reloaders of the TLS files and the callers file.
fn spawn_reloaders(args: &ServeArgs, security: &Security) -> Vec<JoinHandle<()>> {
    let every = Duration::from_secs(args.security.credentials_reload_s);
    let mut background = Vec::new();
    if let Some(tls) = &security.tls {
        background.push(tls.spawn_reloader(every));
    }
    background.extend(security.access.spawn_reloader(every));
    background
}

/// What the shutdown sequence stops: the serving tasks and the connections of each port.
struct Ports {
    /// The inference ports' (gRPC, HTTP API) stop.
    serve_stop: watch::Sender<Stop>,
    /// The metrics and health-only ports' stop.
    stop: watch::Sender<Stop>,
    connections: Vec<Arc<Connections>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Ports {
    fn open(&self) -> usize {
        self.connections.iter().map(|c| c.count()).sum()
    }

    /// After the drain: stop accepting on the metrics port too, GOAWAY to every connection; what
    /// has not closed after a second (calls the drain timeout cut off) is closed for good, so the
    /// drain timeout bounds the exit.
    async fn close(self) {
        let _ = self.serve_stop.send(Stop::Graceful);
        let _ = self.stop.send(Stop::Graceful);
        let closed = tokio::time::timeout(Duration::from_secs(1), async {
            while self.open() > 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        if closed.is_err() {
            tracing::warn!(
                open = self.open(),
                "connections still open after the drain: closing them"
            );
        }
        let _ = self.serve_stop.send(Stop::Now);
        let _ = self.stop.send(Stop::Now);
        for task in self.tasks {
            task.abort();
            let _ = task.await;
        }
    }
}

/// Binds every listener and starts serving; the models load and warm up in the background (health
/// says NOT_SERVING until they are ready). `factory` overrides the ONNX Runtime backend (tests use
/// it to control warm-up and runs); `None` serves with ONNX Runtime.
pub async fn start(
    args: &ServeArgs,
    factory: Option<BackendFactory>,
) -> Result<RunningServer, ServeError> {
    args.validate().map_err(ServeError::Config)?;
    let factory = match factory {
        Some(f) => f,
        None => ort_factory(args)?,
    };
    let state = Arc::new(ServingState::new());
    let (registry, pipeline) = build_pipeline(args, factory, state.clone())?;
    // TLS files, callers and the audit trail: wrong ones stop the start, naming the flag and file.
    let security = Security::load(&args.security).map_err(ServeError::Config)?;
    for deprecated in args.deprecations() {
        tracing::warn!("{deprecated}");
    }
    check_open_files(args);
    let (grpc_listener, grpc_addr) = bind(args.grpc_addr).await?;
    let (metrics_listener, metrics_addr) = bind(args.metrics_addr).await?;
    let (http_listener, http_addr) = bind(args.http_addr).await?;
    let health_listener = match args.security.health_addr {
        Some(addr) => Some(bind(addr).await?),
        None => None,
    };
    // Two stops: the inference ports (gRPC, REST) get their GOAWAY the moment the drain starts, so
    // clients stop opening calls here at once; /metrics and the probes answer until the end.
    let (stop, stop_rx) = watch::channel(Stop::Running);
    let (serve_stop, serve_stop_rx) = watch::channel(Stop::Running);
    // Request bodies in flight: one budget for every port.
    let budget = BodyBudget::new(args.max_body_bytes_in_flight_mib << 20);
    let policy = |listener, protocol, max_connections| {
        Connections::new(ConnectionPolicy::from_args(
            args,
            listener,
            protocol,
            max_connections,
            &budget,
        ))
    };
    let mut ports = Ports {
        serve_stop,
        stop,
        connections: Vec::new(),
        tasks: Vec::new(),
    };

    let metrics_connections = policy("metrics", Protocol::Http1, args.metrics_connections());
    ports.tasks.push(tokio::spawn(transport::serve(
        metrics_listener,
        metrics_connections.clone(),
        crate::api::probes::service(crate::metrics::install(), state.clone()),
        stop_rx.clone(),
        None,
    )));
    ports.connections.push(metrics_connections);
    // (The recorder is installed now.) GPU metrics from NVML with the CUDA device; on a machine
    // without NVML, one log line.
    let gpu_sampler = match args.device {
        crate::backend::Device::Cuda(_) => {
            crate::gpu::start(Duration::from_millis(args.gpu_metrics_interval_ms.max(100)))
        }
        crate::backend::Device::Cpu => None,
    };
    crate::metrics::security_known(
        &["grpc", "rest"],
        security.tls.is_some(),
        security.audit.is_some(),
    );
    ports.tasks.extend(spawn_reloaders(args, &security));

    let (health, health_service) = tonic_health::server::health_reporter();
    set_overall(&health, ServingStatus::NotServing).await;
    ports
        .tasks
        .push(tokio::spawn(follow_health(state.clone(), health)));
    // The plaintext health-only port: the same health service, nothing else.
    let health_addr = health_listener.as_ref().map(|(_, addr)| *addr);
    if let Some((listener, addr)) = health_listener {
        let routes = tonic::service::Routes::new(health_service.clone()).prepare();
        let connections = policy("health", Protocol::Http2, 64);
        ports.tasks.push(tokio::spawn(transport::serve(
            listener,
            connections.clone(),
            routes,
            stop_rx.clone(),
            None,
        )));
        tracing::info!(health_addr = %addr, "plaintext gRPC health-only listener");
    }

    let grpc_connections = policy("grpc", Protocol::Http2, args.grpc_connections());
    ports.tasks.push(tokio::spawn(transport::serve(
        grpc_listener,
        grpc_connections.clone(),
        grpc_stack(args, &pipeline, &security, health_service)?,
        serve_stop_rx.clone(),
        security.tls.clone(),
    )));
    ports.connections.push(grpc_connections);
    // The DICOM node: one more front end on the same pipeline.
    let node = match args.dicom.settings().map_err(ServeError::Config)? {
        Some(settings) => Some(
            crate::node::start(
                settings,
                pipeline.clone(),
                args.max_image_bytes as u64,
                &security,
            )
            .await
            .map_err(ServeError::Config)?,
        ),
        None => None,
    };
    let dicom_addr = node.as_ref().map(|n| n.addr);
    let rest_connections = policy("rest", Protocol::Http1, args.http_api_connections());
    ports.tasks.push(tokio::spawn(transport::serve(
        http_listener,
        rest_connections.clone(),
        http_api(args, pipeline, &security),
        serve_stop_rx,
        security.tls.clone(),
    )));
    ports.connections.push(rest_connections);
    tracing::info!(%grpc_addr, %http_addr, %metrics_addr, "listening; loading and warming up the models");

    let (shutdown_tx, shutdown_rx) = oneshot::channel();
    let lifecycle = Lifecycle {
        registry: registry.clone(),
        state: state.clone(),
        drain_timeout: Duration::from_secs(args.drain_timeout_s),
        poll: (args.repository_poll_s > 0).then(|| Duration::from_secs(args.repository_poll_s)),
        serve_stop: ports.serve_stop.clone(),
    };
    let task = tokio::spawn(async move {
        let _gpu_sampler = gpu_sampler;
        let result = lifecycle.run(shutdown_rx).await;
        // Received instances and undelivered results stay on disk for the next start.
        if let Some(node) = node {
            node.close().await;
        }
        ports.close().await;
        tracing::info!("stopped");
        result
    });
    Ok(RunningServer {
        grpc_addr,
        http_addr,
        metrics_addr,
        health_addr,
        dicom_addr,
        state,
        registry,
        shutdown: Some(shutdown_tx),
        task,
    })
}

struct Lifecycle {
    registry: Arc<Registry>,
    state: Arc<ServingState>,
    drain_timeout: Duration,
    poll: Option<Duration>,
    /// The inference ports' stop: `Graceful` when the drain starts.
    serve_stop: watch::Sender<Stop>,
}

impl Lifecycle {
    /// Load and warm up → SERVING (reloading on the poll) → (shutdown) → drain.
    async fn run(self, mut shutdown: oneshot::Receiver<()>) -> Result<(), ServeError> {
        tokio::select! {
            loaded = self.registry.load_initial() => loaded.map_err(ServeError::Models)?,
            _ = &mut shutdown => {
                tracing::info!("shutdown requested during warm-up");
                return Ok(());
            }
        }
        self.state.set_phase(Phase::Serving);
        tracing::info!(
            models = self.registry.served().len(),
            "every model warm; serving"
        );
        let poller = self.poll.map(|every| {
            let registry = self.registry.clone();
            crate::state::spawn_every(every, move || {
                let registry = registry.clone();
                async move {
                    if let Err(e) = registry.reload().await {
                        tracing::error!(error = %e, "model repository poll failed");
                    }
                }
            })
        });

        let _ = shutdown.await;
        if let Some(poller) = poller {
            poller.abort();
        }
        let inflight = self.state.inflight();
        tracing::info!(inflight = inflight.count(), "shutting down: draining");
        self.state.set_phase(Phase::Draining);
        // GOAWAY now rather than after the drain: a client told to go away opens its next calls
        // on another replica instead of having each refused here. (Refusing them one by one
        // made HTTP/2 reset every early-answered stream; past 1024 such resets h2 closes the
        // connection with ENHANCE_YOUR_CALM, taking the streams still in flight with it.)
        let _ = self.serve_stop.send(Stop::Graceful);
        if tokio::time::timeout(self.drain_timeout, inflight.wait_idle())
            .await
            .is_err()
        {
            tracing::warn!(
                inflight = inflight.count(),
                "drain timeout reached; stopping with calls still in progress"
            );
        }
        tracing::info!("drained; stopping");
        Ok(())
    }
}

async fn set_overall(health: &HealthReporter, status: ServingStatus) {
    health.set_service_status("", status).await;
    health.set_service_status(SERVICE_NAME, status).await;
    health.set_service_status(OIP_SERVICE_NAME, status).await;
}

/// Keeps gRPC health in step with the serving state: the server as a whole (`""` and the
/// classifier's name) and each model (`model/<name>`).
async fn follow_health(state: Arc<ServingState>, mut health: HealthReporter) {
    let mut rx = state.subscribe();
    let mut known: BTreeSet<String> = BTreeSet::new();
    loop {
        let readiness = rx.borrow_and_update().clone();
        let status = |ready| {
            if ready {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            }
        };
        set_overall(&health, status(readiness.server_ready())).await;
        for model in readiness.models.keys() {
            health
                .set_service_status(
                    &model_health_name(model),
                    status(readiness.model_ready(model)),
                )
                .await;
        }
        let current: BTreeSet<String> = readiness.models.keys().cloned().collect();
        for gone in known.difference(&current) {
            health.clear_service_status(&model_health_name(gone)).await;
        }
        known = current;
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Serves until SIGTERM or SIGINT, then drains and returns; reloads the model repository on SIGHUP.
/// A start-up failure returns its error.
pub async fn run_until_signal(args: &ServeArgs) -> Result<std::process::ExitCode, ServeError> {
    // Listen before anything else: a SIGTERM, SIGINT or SIGHUP that arrives while the server binds
    // or logs its addresses must drain (or be ignored), not end the process by the signal's
    // default action. A signal that arrives before its task polls is kept by the listener.
    let mut signals = ShutdownSignals::listen();
    #[cfg(unix)]
    let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
    let mut server = start(args, None).await?;
    let trigger = server
        .shutdown
        .take()
        .expect("a new server has its shutdown sender");
    tokio::spawn(async move {
        signals.recv().await;
        let _ = trigger.send(());
        // A second SIGTERM/SIGINT during the drain: stop waiting.
        signals.recv().await;
        tracing::warn!("second shutdown signal: exiting without finishing the drain");
        std::process::exit(1);
    });
    #[cfg(unix)]
    {
        let registry = server.registry.clone();
        let state = server.state.clone();
        match hangup {
            Ok(mut hup) => {
                tokio::spawn(async move {
                    while hup.recv().await.is_some() {
                        if state.phase() != Phase::Serving {
                            tracing::info!("SIGHUP ignored: not serving yet, or draining");
                            continue;
                        }
                        tracing::info!("SIGHUP received: reloading the model repository");
                        if let Err(e) = registry.reload().await {
                            tracing::error!(error = %e, "model repository reload failed");
                        }
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; reload by polling only")
            }
        }
    }
    server.wait().await?;
    Ok(std::process::ExitCode::SUCCESS)
}

/// SIGTERM and SIGINT, listened for from creation on.
struct ShutdownSignals {
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    int: Option<tokio::signal::unix::Signal>,
}

impl ShutdownSignals {
    fn listen() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let listen = |kind, name: &str| {
                signal(kind)
                    .map_err(|e| tracing::warn!(error = %e, "cannot listen for {name}"))
                    .ok()
            };
            ShutdownSignals {
                term: listen(SignalKind::terminate(), "SIGTERM"),
                int: listen(SignalKind::interrupt(), "SIGINT"),
            }
        }
        #[cfg(not(unix))]
        ShutdownSignals {}
    }

    /// The next SIGTERM or SIGINT.
    async fn recv(&mut self) {
        #[cfg(unix)]
        {
            async fn next(signal: &mut Option<tokio::signal::unix::Signal>) {
                match signal {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending().await,
                }
            }
            tokio::select! {
                () = next(&mut self.term) => tracing::info!("SIGTERM received"),
                () = next(&mut self.int) => tracing::info!("SIGINT received"),
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::routes::Protection::*;
    use crate::api::routes::UNKNOWN_GRPC;
    use crate::security::auth::Scope::*;
    use prost::Message;

    /// Every method of every service on the gRPC port (by the descriptor sets: brainai.v1, the
    /// Open Inference Protocol, health, both reflections) has exactly one declared route, and no
    /// route names a method that does not exist.
    #[test]
    fn every_grpc_method_is_declared_once() {
        let mut methods = Vec::new();
        for set in [
            crate::pb::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
        ] {
            let set = prost_types::FileDescriptorSet::decode(set).expect("a descriptor set");
            for file in &set.file {
                for service in &file.service {
                    for method in &service.method {
                        methods.push(format!(
                            "/{}.{}/{}",
                            file.package(),
                            service.name(),
                            method.name()
                        ));
                    }
                }
            }
        }
        assert!(methods.len() >= 17, "{methods:?}");
        for method in &methods {
            assert_eq!(
                GRPC_ROUTES.iter().filter(|r| r.path == *method).count(),
                1,
                "{method} must be declared once"
            );
        }
        for route in GRPC_ROUTES.iter() {
            assert!(methods.iter().any(|m| m == route.path), "{}", route.path);
        }
        let mut names: Vec<&str> = GRPC_ROUTES.iter().map(|r| r.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(
            names.len(),
            GRPC_ROUTES.iter().count(),
            "route names are unique"
        );
    }

    #[test]
    fn served_paths_get_their_routes_and_others_the_unknown_one() {
        assert_eq!(GRPC_ROUTES.route("/DOE_JANE.Svc/1234567"), &UNKNOWN_GRPC);
        assert_eq!(
            GRPC_ROUTES
                .route("/brainai.v1.TumorClassifier/Classify")
                .name,
            "Classify"
        );
        assert_eq!(
            GRPC_ROUTES.route("/grpc.health.v1.Health/Check").protection,
            Open
        );
    }

    #[test]
    fn scopes_of_methods() {
        let scope =
            |path: &str, open_reflection| GRPC_ROUTES.route(path).protection.scope(open_reflection);
        assert_eq!(scope("/grpc.health.v1.Health/Check", false), None);
        let reflection = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo";
        assert_eq!(scope(reflection, false), Some(Read));
        assert_eq!(scope(reflection, true), None);
        assert_eq!(
            scope("/brainai.v1.TumorClassifier/ClassifySeries", false),
            Some(Infer)
        );
        assert_eq!(
            scope("/brainai.v1.TumorClassifier/ClassifyStream", false),
            Some(Infer)
        );
        assert_eq!(
            scope("/brainai.v1.TumorClassifier/ListModels", false),
            Some(Read)
        );
        assert_eq!(
            scope("/inference.GRPCInferenceService/ModelInfer", false),
            Some(Infer)
        );
        assert_eq!(
            scope("/inference.GRPCInferenceService/RepositoryModelLoad", false),
            Some(Admin)
        );
        assert_eq!(
            scope("/inference.GRPCInferenceService/ServerLive", false),
            None
        );
        assert_eq!(scope("/nothing.Here/At", true), Some(Read));
    }

    /// Every name a gRPC call can be recorded under is documented as a value of `rpc` in README's
    /// metric table, which deploy/tools/validate.py holds the dashboards and alerts to.
    #[test]
    fn every_recorded_grpc_route_is_documented() {
        let readme = include_str!("../README.md");
        let row = readme
            .lines()
            .find(|l| l.starts_with("| `brainai_requests_total`"))
            .expect("the metric's row");
        for route in GRPC_ROUTES.iter().chain([&UNKNOWN_GRPC]) {
            if route.protection != Open {
                assert!(
                    row.contains(&format!("`{}`", route.name)),
                    "{} is not documented as a value of rpc",
                    route.name
                );
            }
        }
    }
}
