//! What every route of the HTTP API port shares: the routes' state ([`Rest`]), the request-body
//! extractor ([`LimitedBody`]), the error response ([`ApiError`]) and the one mapping from the
//! transport-neutral error kind to an HTTP status ([`status`]). The routes themselves live in
//! [`super::rest`] (`/v1/classify`, the page) and [`super::oip::http`] (the v2 routes), which both
//! build on this module and not on each other.

use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body_util::BodyExt;
use serde_json::json;

use crate::error::{ErrorKind, InferError};
use crate::pipeline::Pipeline;
use crate::security::audit;

/// State of every route.
#[derive(Clone)]
pub struct Rest {
    pub pipeline: Pipeline,
    /// Largest request body, in bytes.
    pub max_body: usize,
}

/// The one mapping from the transport-neutral error kind to an HTTP status.
pub fn status(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::InvalidArgument => StatusCode::BAD_REQUEST,
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        ErrorKind::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        // 499 (client closed request, as nginx): the caller is gone anyway.
        ErrorKind::Cancelled => StatusCode::from_u16(499).expect("a valid status code"),
        ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        ErrorKind::FailedPrecondition => StatusCode::UNPROCESSABLE_ENTITY,
        ErrorKind::Unauthenticated => StatusCode::UNAUTHORIZED,
        ErrorKind::PermissionDenied => StatusCode::FORBIDDEN,
    }
}

/// `{"error": message}`.
pub fn error_json(message: &str) -> Bytes {
    serde_json::to_vec(&json!({ "error": message }))
        .expect("a string serialises")
        .into()
}

/// An error as JSON with the HTTP status of its kind. Turning it into a response notes its reason
/// (as logs may show it) in the call's facts, for the call layer's rejection log.
pub struct ApiError(pub InferError);

impl From<InferError> for ApiError {
    fn from(e: InferError) -> Self {
        ApiError(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        audit::note_error(self.0.log_message());
        let status = status(self.0.kind);
        (status, axum::Json(json!({"error": self.0.message}))).into_response()
    }
}

/// A route's result: its JSON document, or the error.
pub type Answer = Result<Response, ApiError>;

/// The request body, read up to the route's limit (413 beyond it).
pub struct LimitedBody(pub Bytes);

/// Why a request body was not read, answered with its own HTTP status and `{"error": ...}` like
/// every other error: 413 over the limit, or what the transport's bounds say ([`super::body`]):
/// 408 too slow, 413 a declared length over the limit, 503 request bodies in flight at their cap,
/// 499 the client went away, 400 malformed.
pub struct BodyRejection {
    pub status: StatusCode,
    pub message: String,
}

impl IntoResponse for BodyRejection {
    fn into_response(self) -> Response {
        audit::note_error(&self.message);
        (self.status, axum::Json(json!({"error": self.message}))).into_response()
    }
}

impl FromRequest<Rest> for LimitedBody {
    type Rejection = BodyRejection;

    async fn from_request(req: Request, state: &Rest) -> Result<Self, BodyRejection> {
        let limit = state.max_body;
        let limited = http_body_util::Limited::new(req.into_body(), limit);
        match limited.collect().await {
            Ok(collected) => Ok(LimitedBody(collected.to_bytes())),
            Err(e)
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some() =>
            {
                Err(BodyRejection {
                    status: StatusCode::PAYLOAD_TOO_LARGE,
                    message: format!("the request body is over the limit of {limit} bytes"),
                })
            }
            Err(e) => Err(match super::body::BodyError::find(&*e) {
                Some(b) => BodyRejection {
                    status: b.kind().http_status(),
                    message: b.message().to_string(),
                },
                None => BodyRejection {
                    status: StatusCode::BAD_REQUEST,
                    message: format!("the request body could not be read: {e}"),
                },
            }),
        }
    }
}
