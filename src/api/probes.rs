//! The metrics and probes port (`--metrics-addr`, plain HTTP/1.1): `/metrics` (Prometheus text),
//! `/healthz` (the process is up) and `/readyz` (200 while the server is serving;
//! `/readyz?model=NAME` for one model), both read from the one [`ServingState`].

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use metrics_exporter_prometheus::PrometheusHandle;

use crate::state::ServingState;

/// The routes as a service for [`crate::api::transport::serve`]; also runs the exporter's
/// upkeep every few seconds (histograms are drained into their buckets by it).
pub fn service(handle: PrometheusHandle, state: Arc<ServingState>) -> ProbesService {
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    ProbesService { handle, state }
}

/// The routes of the metrics and probes port (they read no request body).
#[derive(Clone)]
pub struct ProbesService {
    handle: PrometheusHandle,
    state: Arc<ServingState>,
}

impl<B> tower::Service<Request<B>> for ProbesService {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Response<Full<Bytes>>, Infallible>>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        std::future::ready(Ok(route(&req, &self.handle, &self.state)))
    }
}

fn route<B>(
    req: &Request<B>,
    handle: &PrometheusHandle,
    state: &ServingState,
) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, content_type: &str, body: String| {
        Response::builder()
            .status(status)
            .header("content-type", content_type)
            .body(Full::new(Bytes::from(body)))
            .expect("static header values are valid")
    };
    match req.uri().path() {
        "/metrics" => text(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            handle.render(),
        ),
        "/healthz" => text(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" => {
            let readiness = state.get();
            let model = req
                .uri()
                .query()
                .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("model=")));
            let ready = match model {
                Some(model) => readiness.model_ready(model),
                None => readiness.server_ready(),
            };
            if ready {
                text(StatusCode::OK, "text/plain", "ready\n".into())
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "not ready\n".into(),
                )
            }
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics, /healthz or /readyz\n".into(),
        ),
    }
}
