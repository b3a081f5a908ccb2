//! gRPC statuses the transport would otherwise get wrong, fixed in one tower layer around every
//! gRPC service:
//! - an oversized message: tonic answers OUT_OF_RANGE; the gRPC spec says RESOURCE_EXHAUSTED;
//! - a message that is not valid protobuf (e.g. an image id that is not UTF-8): tonic answers
//!   INTERNAL; it is the caller's error, INVALID_ARGUMENT;
//! - request metadata over `--max-metadata-bytes`: that call alone is refused RESOURCE_EXHAUSTED
//!   (up to HTTP/2's own limit, [`super::transport::MAX_HEADER_LIST_SIZE`], past which h2
//!   answers by itself).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::codegen::http::{HeaderMap, HeaderValue, Request, Response};
use tower::{Layer, Service};

/// Tower layer applied to the whole gRPC server.
#[derive(Debug, Clone, Copy)]
pub struct StatusLayer {
    /// Largest request metadata (header names and values, 32 bytes of overhead each, as HTTP/2
    /// counts them).
    pub max_metadata_bytes: usize,
}

impl<S> Layer<S> for StatusLayer {
    type Service = StatusFix<S>;
    fn layer(&self, inner: S) -> StatusFix<S> {
        StatusFix {
            inner,
            max_metadata_bytes: self.max_metadata_bytes,
        }
    }
}

#[derive(Debug, Clone)]
pub struct StatusFix<S> {
    inner: S,
    max_metadata_bytes: usize,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for StatusFix<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let size = metadata_size(request.headers());
        if size > self.max_metadata_bytes {
            let status = tonic::Status::resource_exhausted(format!(
                "request metadata is {size} bytes, over the limit of {} bytes (--max-metadata-bytes)",
                self.max_metadata_bytes
            ));
            return Box::pin(std::future::ready(Ok(status.into_http())));
        }
        let future = self.inner.call(request);
        Box::pin(async move {
            let mut response = future.await?;
            rewrite(response.headers_mut());
            Ok(response)
        })
    }
}

/// Size of a header list as HTTP/2 counts it (RFC 9113 §6.5.2): name + value + 32 per entry.
fn metadata_size(headers: &HeaderMap) -> usize {
    headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 32)
        .sum()
}

/// Trailers-only error responses carry grpc-status in the headers.
fn rewrite(headers: &mut HeaderMap) {
    let message = headers
        .get("grpc-message")
        .and_then(|m| m.to_str().ok())
        .unwrap_or_default();
    let says = |text: &str| message.contains(text) || message.contains(&text.replace(' ', "%20"));
    let status = headers.get("grpc-status").and_then(|s| s.to_str().ok());
    let fixed = match status {
        Some("11") if says("message length too large") => Some("8"),
        Some("13") if says("failed to decode Protobuf message") => Some("3"),
        _ => None,
    };
    if let Some(code) = fixed {
        headers.insert("grpc-status", HeaderValue::from_static(code));
    }
}

/// The status a mid-stream error of the request stream should end the call with: the same
/// corrections as [`rewrite`], for the errors a streaming handler sees itself.
pub fn fix(status: tonic::Status) -> tonic::Status {
    let message = status.message();
    match status.code() {
        tonic::Code::OutOfRange if message.contains("message length too large") => {
            tonic::Status::resource_exhausted(message.to_string())
        }
        tonic::Code::Internal if message.contains("failed to decode Protobuf message") => {
            tonic::Status::invalid_argument(message.to_string())
        }
        _ => status,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(status: &'static str, message: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("grpc-status", HeaderValue::from_static(status));
        h.insert("grpc-message", HeaderValue::from_static(message));
        h
    }

    #[test]
    fn rewrites_only_the_statuses_the_transport_gets_wrong() {
        let mut h = headers(
            "11",
            "Error,%20decoded%20message%20length%20too%20large:%20found%2010%20bytes",
        );
        rewrite(&mut h);
        assert_eq!(h["grpc-status"], "8");

        let mut h = headers(
            "13",
            "failed%20to%20decode%20Protobuf%20message:%20Image.id:%20invalid%20string%20value",
        );
        rewrite(&mut h);
        assert_eq!(h["grpc-status"], "3");

        for (code, message) in [
            ("11", "index%20out%20of%20range"),
            ("13", "inference%20failed"),
        ] {
            let mut other = headers(code, message);
            rewrite(&mut other);
            assert_eq!(other["grpc-status"], code);
        }
    }

    #[test]
    fn metadata_size_counts_like_http2() {
        let mut h = HeaderMap::new();
        h.insert("a", HeaderValue::from_static("bc"));
        assert_eq!(metadata_size(&h), 1 + 2 + 32);
    }
}
