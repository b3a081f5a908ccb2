//! The one call layer, in front of every route of the gRPC port and of the HTTP API: where a call
//! is let in and where it is recorded, once, whichever front end it came through.
//!
//! In: the route's declared protection ([`super::routes`]) decides what the call needs; access is
//! decided from the bearer token and the client certificate ([`crate::security::auth`]) and
//! refused UNAUTHENTICATED / PERMISSION_DENIED (HTTP 401 / 403); a browser request from another
//! site is refused (HTTP API); the credential is removed so no handler can log it; the handler runs
//! inside a task-local [`CallFacts`] that the pipeline fills (model, images, DICOM UIDs, the
//! reason for a refusal).
//!
//! Out: when the response has been sent, or the call was abandoned (the client cancelled,
//! disconnected, or its deadline fired: `CANCELLED` / 499), [`CallRecord`] writes the call's one
//! record: `brainai_requests_total` and `brainai_request_duration_seconds`, the rejection log line,
//! and the audit record. Open routes (health, the upload page) are not recorded: probes every few
//! seconds would bury the calls that matter.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::Body;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue, WWW_AUTHENTICATE};
use hyper::{HeaderMap, Request, Response};
use tower::{Layer, Service};

use super::response::{End, FromBytes, Watch, Watched};
use super::routes::{self, Route};
use crate::error::{self, ErrorKind, InferError};
use crate::metrics;
use crate::security::audit::{self, Audit, CallFacts, Record};
use crate::security::auth::{Access, Decision, FrontEnd, Identity};
use crate::security::{ConnInfo, Security};

/// Applies access, the cross-site check and the call's record to one front end's routes.
#[derive(Clone)]
pub struct CallLayer {
    front: FrontEnd,
    access: Arc<Access>,
    audit: Option<Arc<Audit>>,
    /// HTTP API: the route this copy of the layer is mounted on. gRPC: `None`, the route is looked
    /// up by the request's path.
    route: Option<&'static Route>,
    /// Origins besides the server's own whose browser pages may call the HTTP API.
    allowed_origins: Arc<[String]>,
}

impl CallLayer {
    /// The layer of the gRPC port.
    pub fn grpc(security: &Security) -> Self {
        CallLayer {
            front: FrontEnd::Grpc,
            access: security.access.clone(),
            audit: security.audit.clone(),
            route: None,
            allowed_origins: Arc::from([]),
        }
    }

    /// The layer of the HTTP API port, to mount on each route with [`CallLayer::on`].
    pub fn http(security: &Security, allowed_origins: &[String]) -> Self {
        CallLayer {
            front: FrontEnd::Rest,
            access: security.access.clone(),
            audit: security.audit.clone(),
            route: None,
            allowed_origins: allowed_origins.iter().map(|o| normalise(o)).collect(),
        }
    }

    /// This layer for the HTTP API route `route`.
    pub fn on(&self, route: &'static Route) -> Self {
        CallLayer {
            route: Some(route),
            ..self.clone()
        }
    }
}

impl<S> Layer<S> for CallLayer {
    type Service = Called<S>;
    fn layer(&self, inner: S) -> Called<S> {
        Called {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Called<S> {
    inner: S,
    layer: CallLayer,
}

/// The one record of a call, written exactly once: when its response ends, fails, or is dropped
/// (the call abandoned), whichever comes first.
pub struct CallRecord {
    route: &'static Route,
    front: FrontEnd,
    /// The audit record's `method`.
    method: String,
    started: Instant,
    identity: Identity,
    peer: Option<String>,
    facts: CallFacts,
    audit: Option<Arc<Audit>>,
    /// The outcome once known (response headers, gRPC trailers).
    outcome: Option<Outcome>,
    written: bool,
}

/// How a call ended: the audit record's `outcome` (gRPC code name or HTTP status) and the
/// metrics' `code` label (the canonical status name on both).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Grpc(tonic::Code),
    Http(u16),
}

impl Outcome {
    fn cancelled(front: FrontEnd) -> Outcome {
        match front {
            FrontEnd::Grpc => Outcome::Grpc(tonic::Code::Cancelled),
            FrontEnd::Rest => Outcome::Http(499),
        }
    }

    fn failed(front: FrontEnd) -> Outcome {
        match front {
            FrontEnd::Grpc => Outcome::Grpc(tonic::Code::Internal),
            FrontEnd::Rest => Outcome::Http(500),
        }
    }

    fn of_kind(front: FrontEnd, kind: ErrorKind) -> Outcome {
        match front {
            FrontEnd::Grpc => Outcome::Grpc(super::grpc::code(kind)),
            FrontEnd::Rest => Outcome::Http(super::web::status(kind).as_u16()),
        }
    }

    fn code(self) -> &'static str {
        match self {
            Outcome::Grpc(code) => error::code_name(code),
            Outcome::Http(status) => error::http_outcome(status),
        }
    }

    fn audit(self) -> String {
        match self {
            Outcome::Grpc(code) => error::code_name(code).to_string(),
            Outcome::Http(status) => status.to_string(),
        }
    }
}

impl CallRecord {
    fn finish(&mut self, outcome: Outcome) {
        if std::mem::replace(&mut self.written, true) {
            return;
        }
        let facts = self.facts.lock().expect("call facts lock");
        let code = outcome.code();
        let (name, version) = facts
            .model
            .as_ref()
            .map_or(("", ""), |m| (m.name.as_str(), m.version.as_str()));
        metrics::request_done(
            self.route.name,
            code,
            name,
            version,
            self.started.elapsed().as_secs_f64(),
        );
        if code != error::OK {
            // Messages name the image index and the reason, never image ids, pixel data or what
            // the caller wrote.
            tracing::debug!(
                rpc = self.route.name,
                code,
                error = facts.error.as_deref().unwrap_or(""),
                "request rejected"
            );
        }
        if let Some(audit) = &self.audit {
            let (caller, auth) = self.identity.describe();
            audit.write(&Record {
                time: audit::now_rfc3339(),
                caller,
                auth,
                peer: self.peer.clone(),
                front_end: self.front.as_str(),
                method: &self.method,
                model: facts.model.as_ref(),
                images: facts.images,
                outcome: outcome.audit(),
                latency_ms: self.started.elapsed().as_secs_f64() * 1e3,
                dicom: &facts.dicom,
                dicom_truncated: facts.dicom_truncated,
            });
        }
    }
}

impl Drop for CallRecord {
    fn drop(&mut self) {
        // Not ended: the client left (or hyper stopped at `is_end_stream`, when the outcome is
        // already known from the headers).
        let outcome = self.outcome.unwrap_or(Outcome::cancelled(self.front));
        self.finish(outcome);
    }
}

/// The record goes with the response body, which finishes it when it ends.
impl Watch for Box<CallRecord> {
    fn trailers(&mut self, trailers: &HeaderMap) {
        if let Some(code) = grpc_code(trailers) {
            self.outcome = Some(Outcome::Grpc(code));
        }
    }

    fn end(mut self, how: End) {
        let outcome = match how {
            // A gRPC body that ends without a status is a broken call.
            End::Done => self.outcome.unwrap_or(Outcome::Grpc(tonic::Code::Unknown)),
            End::Failed => Outcome::failed(self.front),
            // Not read to the end: the client left (or hyper stopped at `is_end_stream`, when the
            // outcome is already known from the headers).
            End::Dropped { .. } => self.outcome.unwrap_or(Outcome::cancelled(self.front)),
        };
        self.finish(outcome);
    }
}

/// A call's response body, watched by its record (or nothing, for a refusal already recorded).
pub type CallBody<B> = Watched<B, Box<CallRecord>>;

/// The gRPC status code in a header map (trailers, or trailers-only headers).
fn grpc_code(headers: &HeaderMap) -> Option<tonic::Code> {
    let value = headers.get("grpc-status")?;
    Some(tonic::Code::from_bytes(value.as_bytes()))
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Called<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Body<Data = Bytes> + FromBytes + Unpin + Send + 'static,
{
    type Response = Response<CallBody<ResBody>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        let layer = &self.layer;
        let started = Instant::now();
        let front = layer.front;
        let route = layer
            .route
            .unwrap_or_else(|| routes::grpc_route(request.uri().path()));
        // No handler sees the credential.
        let authorization = request.headers_mut().remove(AUTHORIZATION);
        let Some(scope) = route.protection.scope(layer.access.open_reflection()) else {
            // Open: whatever credential came along is neither needed nor judged.
            return pass_through(&mut self.inner, request);
        };
        let conn = request
            .extensions()
            .get::<ConnInfo>()
            .cloned()
            .unwrap_or_default();
        let decision = layer.access.decide(
            authorization.as_ref().map(HeaderValue::as_bytes),
            conn.certificate.as_deref(),
            Some(scope),
        );
        let method = match front {
            FrontEnd::Grpc => route.path.trim_start_matches('/').to_string(),
            FrontEnd::Rest => format!("{} {}", routes::http_verb(request.method()), route.path),
        };
        let mut record = Box::new(CallRecord {
            route,
            front,
            method,
            started,
            identity: Identity::Anonymous,
            peer: conn.remote.map(|a| a.ip().to_string()),
            facts: CallFacts::default(),
            audit: layer.audit.clone(),
            outcome: None,
            written: false,
        });
        let refusal = match decision {
            Decision::Allow(identity) => {
                record.identity = identity;
                None
            }
            Decision::Unauthenticated(reason) => {
                Some(InferError::new(ErrorKind::Unauthenticated, reason))
            }
            Decision::Denied(identity, reason) => {
                record.identity = identity;
                Some(InferError::new(ErrorKind::PermissionDenied, reason))
            }
        };
        let refusal = refusal.or_else(|| {
            (front == FrontEnd::Rest)
                .then(|| cross_site(&request, &layer.allowed_origins))
                .flatten()
        });
        let refusal = refusal.or_else(|| {
            layer.audit.as_ref().filter(|a| a.refusing()).map(|_| {
                InferError::unavailable(
                    "the audit trail cannot be written, and this server refuses calls it cannot \
                     record (--audit-fail-closed)",
                )
            })
        });
        if let Some(refusal) = refusal {
            if matches!(
                refusal.kind,
                ErrorKind::Unauthenticated | ErrorKind::PermissionDenied
            ) {
                metrics::auth_refused(front.as_str(), refusal.kind.as_str());
            }
            record
                .facts
                .lock()
                .expect("call facts lock")
                .error
                .get_or_insert_with(|| refusal.message.clone());
            record.finish(Outcome::of_kind(front, refusal.kind));
            let response = refuse::<ResBody>(front, refusal);
            return Box::pin(std::future::ready(Ok(response)));
        }
        let facts = record.facts.clone();
        // The handler runs inside the facts' scope (and so does everything it awaits). Dropping
        // this future (the client left) drops the record, which then says CANCELLED.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let response = audit::scope(facts, inner.call(request)).await;
            let response = match response {
                Ok(response) => response,
                Err(e) => {
                    record.finish(Outcome::failed(front));
                    return Err(e);
                }
            };
            record.outcome = match front {
                FrontEnd::Grpc => grpc_code(response.headers()).map(Outcome::Grpc),
                FrontEnd::Rest => Some(Outcome::Http(response.status().as_u16())),
            };
            Ok(response.map(|inner| Watched::new(inner, record)))
        })
    }
}

/// The call as it is, with nothing to record.
type Passed<B, E> = Pin<Box<dyn Future<Output = Result<Response<CallBody<B>>, E>> + Send>>;

fn pass_through<S, ReqBody, ResBody>(
    inner: &mut S,
    request: Request<ReqBody>,
) -> Passed<ResBody, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Body,
{
    let future = inner.call(request);
    Box::pin(async move {
        let response = future.await?;
        Ok(response.map(Watched::plain))
    })
}

/// A refusal as the front end speaks it: a trailers-only gRPC status, or JSON `{"error": ...}`
/// with the HTTP status of its kind.
fn refuse<B: Body + FromBytes>(front: FrontEnd, error: InferError) -> Response<CallBody<B>> {
    let unauthenticated = error.kind == ErrorKind::Unauthenticated;
    match front {
        FrontEnd::Grpc => tonic::Status::new(super::grpc::code(error.kind), error.message)
            .into_http::<B>()
            .map(Watched::plain),
        FrontEnd::Rest => {
            let mut response = Response::new(Watched::plain(B::from_bytes(
                super::web::error_json(&error.message),
            )));
            *response.status_mut() = super::web::status(error.kind);
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            if unauthenticated {
                response.headers_mut().insert(
                    WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"brainai\""),
                );
            }
            response
        }
    }
}

/// Refuses a browser request that another site's page made (cross-site request forgery): a
/// browser says where a request comes from (`Sec-Fetch-Site`, `Origin`); other clients (curl,
/// tritonclient, scripts) send neither and are not affected. Safe methods (GET, HEAD, OPTIONS)
/// change nothing and pass.
fn cross_site<B>(request: &Request<B>, allowed: &[String]) -> Option<InferError> {
    use hyper::Method;
    if matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS
    ) {
        return None;
    }
    let headers = request.headers();
    let origin = headers.get(hyper::header::ORIGIN).map(|o| o.as_bytes());
    let allowed_origin = origin.is_some_and(|o| {
        std::str::from_utf8(o).is_ok_and(|o| allowed.iter().any(|a| *a == normalise(o)))
    });
    let refused = |why: &str| {
        Some(InferError::new(
            ErrorKind::PermissionDenied,
            format!(
                "cross-site request refused: {why}; a page on another origin may call this API \
                 only when the server lists it in --http-allowed-origins"
            ),
        ))
    };
    match headers.get("sec-fetch-site").map(|v| v.as_bytes()) {
        None | Some(b"same-origin") | Some(b"none") => {}
        Some(_) if allowed_origin => return None,
        Some(_) => return refused("the browser says another site's page sent it"),
    }
    match origin {
        None => None,
        Some(_) if allowed_origin => None,
        Some(origin) => {
            let host = headers
                .get(hyper::header::HOST)
                .map(|h| h.as_bytes())
                .or_else(|| request.uri().authority().map(|a| a.as_str().as_bytes()));
            if host.is_some_and(|host| same_origin(origin, host)) {
                None
            } else {
                refused("its Origin is not this server")
            }
        }
    }
}

/// Whether `origin` (`scheme://host[:port]`) names the server the request was sent to (`host`, the
/// Host header), default ports included.
fn same_origin(origin: &[u8], host: &[u8]) -> bool {
    let Ok(origin) = std::str::from_utf8(origin) else {
        return false;
    };
    let Ok(host) = std::str::from_utf8(host) else {
        return false;
    };
    let (scheme, authority) = match origin.split_once("://") {
        Some(parts) => parts,
        None => return false, // `null` (a sandboxed page, a file) is never this server
    };
    let default_port = match scheme.to_ascii_lowercase().as_str() {
        "http" => "80",
        "https" => "443",
        _ => return false,
    };
    let with_port = |a: &str| {
        let a = a.to_ascii_lowercase();
        // An IPv6 literal's port follows its closing bracket.
        let has_port = a.rsplit_once(':').is_some_and(|(_, p)| !p.contains(']'));
        if has_port {
            a
        } else {
            format!("{a}:{default_port}")
        }
    };
    with_port(authority) == with_port(host)
}

/// An origin as compared: lower case, no trailing slash.
fn normalise(origin: &str) -> String {
    origin.trim().trim_end_matches('/').to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn post(headers: &[(&str, &str)]) -> Request<()> {
        let mut builder = Request::post("/v1/classify");
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        builder.body(()).unwrap()
    }

    #[test]
    fn browser_requests_from_other_sites_are_refused() {
        let none: &[String] = &[];
        // Not a browser: no Origin, no Sec-Fetch-Site.
        assert!(cross_site(&post(&[("host", "api:8000")]), none).is_none());
        // The page itself.
        for same in [
            vec![("host", "api:8000"), ("origin", "http://api:8000")],
            vec![
                ("host", "api:8000"),
                ("origin", "http://API:8000"),
                ("sec-fetch-site", "same-origin"),
            ],
            vec![("host", "api"), ("origin", "http://api:80")],
            vec![("host", "api:443"), ("origin", "https://api")],
            vec![("host", "[::1]:8000"), ("origin", "http://[::1]:8000")],
        ] {
            assert!(cross_site(&post(&same), none).is_none(), "{same:?}");
        }
        for other in [
            vec![("host", "api:8000"), ("origin", "https://evil.example")],
            vec![("host", "api:8000"), ("origin", "null")],
            vec![("host", "api:8000"), ("origin", "http://api:8001")],
            vec![("host", "api:8000"), ("sec-fetch-site", "cross-site")],
            vec![
                ("host", "api:8000"),
                ("origin", "http://api:8000"),
                ("sec-fetch-site", "same-site"),
            ],
        ] {
            let e = cross_site(&post(&other), none).expect("refused");
            assert_eq!(e.kind, ErrorKind::PermissionDenied, "{other:?}");
            assert!(e.message.contains("cross-site"), "{}", e.message);
        }
        // A safe method passes whatever its origin.
        let get = Request::get("/v2")
            .header("origin", "https://evil.example")
            .body(())
            .unwrap();
        assert!(cross_site(&get, none).is_none());
        // An allowed origin passes.
        let allowed = [normalise("https://viewer.example/")];
        let from = post(&[
            ("host", "api:8000"),
            ("origin", "https://viewer.example"),
            ("sec-fetch-site", "cross-site"),
        ]);
        assert!(cross_site(&from, &allowed).is_none());
    }

    #[test]
    fn outcomes_name_statuses_in_one_vocabulary() {
        assert_eq!(Outcome::cancelled(FrontEnd::Grpc).code(), "CANCELLED");
        assert_eq!(Outcome::cancelled(FrontEnd::Rest).audit(), "499");
        assert_eq!(Outcome::cancelled(FrontEnd::Rest).code(), "CANCELLED");
        for kind in [
            ErrorKind::InvalidArgument,
            ErrorKind::NotFound,
            ErrorKind::ResourceExhausted,
            ErrorKind::DeadlineExceeded,
            ErrorKind::Unavailable,
            ErrorKind::Cancelled,
            ErrorKind::Internal,
            ErrorKind::FailedPrecondition,
            ErrorKind::Unauthenticated,
            ErrorKind::PermissionDenied,
        ] {
            // Both transports' mappings come back to the kind's own name.
            assert_eq!(Outcome::of_kind(FrontEnd::Grpc, kind).code(), kind.as_str());
            assert_eq!(Outcome::of_kind(FrontEnd::Rest, kind).code(), kind.as_str());
        }
    }
}
