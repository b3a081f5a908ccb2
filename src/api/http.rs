//! The plain-HTTP side: `/metrics` (Prometheus text), `/healthz` (the process is up) and
//! `/readyz` (200 while the server is serving; `/readyz?model=NAME` for one model), both read from
//! the one [`ServingState`].

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;

use crate::state::ServingState;

/// Serves the routes on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, handle: PrometheusHandle, state: Arc<ServingState>) {
    // Histograms are drained into their buckets by upkeep; run it regularly as well as on scrape.
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    loop {
        let Ok((stream, _peer)) = listener.accept().await else {
            continue;
        };
        let (handle, state) = (handle.clone(), state.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let (handle, state) = (handle.clone(), state.clone());
                async move { Ok::<_, Infallible>(route(&req, &handle, &state)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn route(
    req: &Request<Incoming>,
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
