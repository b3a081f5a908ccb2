//! The tower layer in front of every front end: decides access (see [`super::auth`]), refuses
//! with UNAUTHENTICATED / PERMISSION_DENIED (HTTP 401 / 403), strips the credential so no handler
//! can log it, scopes the call's audit facts around the handler, and writes the call's audit
//! record when its response has been sent (or abandoned).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue, WWW_AUTHENTICATE};
use hyper::{Request, Response, StatusCode};
use tower::{Layer, Service};

use super::ConnInfo;
use super::audit::{self, Audit, CallFacts, Record};
use super::auth::{Access, Decision, FrontEnd, Identity};
use crate::metrics;

/// Applies [`Access`] and [`Audit`] to one front end's service.
#[derive(Clone)]
pub struct SecurityLayer {
    pub front: FrontEnd,
    pub access: Arc<Access>,
    pub audit: Option<Arc<Audit>>,
}

impl<S> Layer<S> for SecurityLayer {
    type Service = Secured<S>;
    fn layer(&self, inner: S) -> Secured<S> {
        Secured {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Secured<S> {
    inner: S,
    layer: SecurityLayer,
}

/// What the record needs once the response is done.
pub struct Pending {
    audit: Arc<Audit>,
    started: Instant,
    front: FrontEnd,
    method: String,
    identity: Identity,
    peer: Option<String>,
    facts: CallFacts,
    /// The outcome once known (response headers, gRPC trailers).
    outcome: Option<String>,
}

impl Pending {
    fn write(self, outcome: String) {
        let facts = self.facts.lock().expect("audit facts lock");
        let (caller, auth) = self.identity.describe();
        self.audit.write(&Record {
            time: audit::now_rfc3339(),
            caller,
            auth,
            peer: self.peer,
            front_end: self.front.as_str(),
            method: &self.method,
            model: facts.model.as_ref(),
            images: facts.images,
            outcome,
            latency_ms: self.started.elapsed().as_secs_f64() * 1e3,
            dicom: &facts.dicom,
            dicom_truncated: facts.dicom_truncated,
        });
    }
}

/// The response body: the handler's, watched for its end (and gRPC status), or a refusal.
pub enum SecuredBody<B> {
    Inner {
        inner: B,
        pending: Option<Box<Pending>>,
    },
    Full(Option<Bytes>),
}

impl<B> Drop for SecuredBody<B> {
    fn drop(&mut self) {
        if let SecuredBody::Inner { pending, .. } = self
            && let Some(pending) = pending.take()
        {
            // Not read to the end: the client left (or hyper stopped at `is_end_stream`, when
            // the outcome is already known from the headers).
            let outcome = pending
                .outcome
                .clone()
                .unwrap_or_else(|| "CANCELLED".to_string());
            pending.write(outcome);
        }
    }
}

impl<B> Body for SecuredBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.get_mut() {
            SecuredBody::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            SecuredBody::Inner { inner, pending } => {
                let polled = Pin::new(inner).poll_frame(cx);
                match &polled {
                    Poll::Ready(Some(Ok(frame))) => {
                        if let (Some(trailers), Some(p)) = (frame.trailers_ref(), pending.as_mut())
                            && let Some(code) = grpc_code(trailers)
                        {
                            p.outcome = Some(code);
                        }
                    }
                    Poll::Ready(None) | Poll::Ready(Some(Err(_))) => {
                        if let Some(p) = pending.take() {
                            let failed = matches!(polled, Poll::Ready(Some(Err(_))));
                            let outcome = match (&p.outcome, failed) {
                                (_, true) => "INTERNAL".to_string(),
                                (Some(o), false) => o.clone(),
                                (None, false) => "UNKNOWN".to_string(),
                            };
                            p.write(outcome);
                        }
                    }
                    Poll::Pending => {}
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            SecuredBody::Full(data) => data.is_none(),
            SecuredBody::Inner { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            SecuredBody::Full(Some(d)) => SizeHint::with_exact(d.len() as u64),
            SecuredBody::Full(None) => SizeHint::with_exact(0),
            SecuredBody::Inner { inner, .. } => inner.size_hint(),
        }
    }
}

/// The gRPC status code name in a header map (trailers, or trailers-only headers).
fn grpc_code(headers: &hyper::HeaderMap) -> Option<String> {
    let value = headers.get("grpc-status")?.to_str().ok()?;
    let code = tonic::Code::from_bytes(value.as_bytes());
    Some(crate::api::code_name(code).to_string())
}

/// The method as the record names it. REST paths outside the known routes are not echoed.
fn method_name<B>(front: FrontEnd, request: &Request<B>) -> String {
    let path = request.uri().path();
    match front {
        FrontEnd::Grpc => {
            let name = path.trim_start_matches('/');
            if name.len() <= 128 && name.bytes().all(|b| b.is_ascii_graphic()) {
                name.to_string()
            } else {
                "(unknown)".to_string()
            }
        }
        FrontEnd::Rest => {
            let known = path == "/"
                || path == "/page.js"
                || path == "/page.css"
                || path == "/v1/classify"
                || path == "/v2"
                || path.starts_with("/v2/health/")
                || path.starts_with("/v2/models/")
                || path.starts_with("/v2/repository");
            let route = if known && path.len() <= 256 {
                path
            } else {
                "(unmatched)"
            };
            format!("{} {route}", request.method())
        }
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Secured<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Body<Data = Bytes> + Default + Unpin + Send + 'static,
{
    type Response = Response<SecuredBody<ResBody>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        let layer = &self.layer;
        if !layer.access.enabled() && layer.audit.is_none() {
            return pass_through(&mut self.inner, request);
        }
        let started = Instant::now();
        let front = layer.front;
        let conn = request
            .extensions()
            .get::<ConnInfo>()
            .cloned()
            .unwrap_or_default();
        let scope = super::auth::required_scope(
            front,
            request.uri().path(),
            layer.access.open_reflection(),
        );
        let decision = layer.access.decide(
            request
                .headers()
                .get(AUTHORIZATION)
                .map(HeaderValue::as_bytes),
            conn.certificate.as_deref(),
            scope,
        );
        // No handler sees the credential.
        request.headers_mut().remove(AUTHORIZATION);
        // Open methods (health, the upload page itself) are not audited: probes every few
        // seconds would bury the calls that matter.
        let audited = scope.is_some();
        let pending = layer.audit.clone().filter(|_| audited).map(|audit| {
            Box::new(Pending {
                audit,
                started,
                front,
                method: method_name(front, &request),
                identity: Identity::Anonymous,
                peer: conn.remote.map(|a| a.ip().to_string()),
                facts: CallFacts::default(),
                outcome: None,
            })
        });
        let refuse = |code: tonic::Code,
                      message: String,
                      identity: Identity,
                      pending: Option<Box<Pending>>| {
            if matches!(
                code,
                tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
            ) {
                metrics::auth_refused(front.as_str(), crate::api::code_name(code));
            }
            let outcome = match front {
                FrontEnd::Grpc => crate::api::code_name(code).to_string(),
                FrontEnd::Rest => rest_status(code).as_u16().to_string(),
            };
            if let Some(mut p) = pending {
                p.identity = identity;
                p.write(outcome);
            }
            let response = refusal::<ResBody>(front, code, message);
            Box::pin(std::future::ready(Ok(response))) as Self::Future
        };
        let identity = match decision {
            Decision::Allow(identity) => identity,
            Decision::Unauthenticated(reason) => {
                return refuse(
                    tonic::Code::Unauthenticated,
                    reason,
                    Identity::Anonymous,
                    pending,
                );
            }
            Decision::Denied(identity, reason) => {
                return refuse(tonic::Code::PermissionDenied, reason, identity, pending);
            }
        };
        if scope.is_some() && layer.audit.as_ref().is_some_and(|a| a.refusing()) {
            return refuse(
                tonic::Code::Unavailable,
                "the audit trail cannot be written, and this server refuses calls it cannot record (--audit-fail-closed)".into(),
                identity,
                pending,
            );
        }
        let Some(mut pending) = pending else {
            return pass_through(&mut self.inner, request);
        };
        pending.identity = identity;
        let facts = pending.facts.clone();
        // The handler runs inside the facts' scope (and so does everything it awaits).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let response = audit::scope(facts, async move { inner.call(request).await }).await;
            let response = match response {
                Ok(response) => response,
                Err(e) => {
                    pending.write("INTERNAL".to_string());
                    return Err(e);
                }
            };
            pending.outcome = match front {
                FrontEnd::Grpc => grpc_code(response.headers()),
                FrontEnd::Rest => Some(response.status().as_u16().to_string()),
            };
            Ok(response.map(|inner| SecuredBody::Inner {
                inner,
                pending: Some(pending),
            }))
        })
    }
}

/// The call as it is, with nothing to record.
type Passed<B, E> = Pin<Box<dyn Future<Output = Result<Response<SecuredBody<B>>, E>> + Send>>;

fn pass_through<S, ReqBody, ResBody>(
    inner: &mut S,
    request: Request<ReqBody>,
) -> Passed<ResBody, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    let future = inner.call(request);
    Box::pin(async move {
        let response = future.await?;
        Ok(response.map(|inner| SecuredBody::Inner {
            inner,
            pending: None,
        }))
    })
}

fn rest_status(code: tonic::Code) -> StatusCode {
    match code {
        tonic::Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        tonic::Code::PermissionDenied => StatusCode::FORBIDDEN,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// A refusal as the front end speaks it: a trailers-only gRPC status, or JSON `{"error": ...}`.
fn refusal<B: Default>(
    front: FrontEnd,
    code: tonic::Code,
    message: String,
) -> Response<SecuredBody<B>> {
    match front {
        FrontEnd::Grpc => tonic::Status::new(code, message)
            .into_http::<B>()
            .map(|inner| SecuredBody::Inner {
                inner,
                pending: None,
            }),
        FrontEnd::Rest => {
            let body = serde_json::to_vec(&serde_json::json!({ "error": message }))
                .expect("a string serialises");
            let mut response = Response::new(SecuredBody::Full(Some(Bytes::from(body))));
            *response.status_mut() = rest_status(code);
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            if code == tonic::Code::Unauthenticated {
                response.headers_mut().insert(
                    WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"brainai\""),
                );
            }
            response
        }
    }
}
