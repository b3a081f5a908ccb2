//! Front ends: wire ↔ domain translation only. [`grpc`] serves `brainai.v1` over gRPC, [`oip`] the
//! Open Inference Protocol (KServe v2) over gRPC and HTTP, [`rest`] the HTTP API port (OIP REST,
//! `/v1/classify`, the upload page of [`page`]), [`prescan`] bounds what decoding a request may allocate,
//! [`status`] corrects the statuses the transport gets wrong, [`trace`] opens each call's span,
//! [`http`] serves `/metrics`, `/healthz` and `/readyz`, [`transport`] owns the connections of
//! every port. Every request path goes through [`crate::pipeline`].

pub mod grpc;
pub mod http;
pub mod oip;
pub mod page;
pub mod prescan;
pub mod rest;
pub mod status;
pub mod trace;
pub mod transport;

/// A gRPC status code as its canonical upper-case name (`OK`, `INVALID_ARGUMENT`, …).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}
