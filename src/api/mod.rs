//! Front ends: wire ↔ domain translation only. [`grpc`] serves `brainai.v1` over gRPC, [`oip`] the
//! Open Inference Protocol (KServe v2) over gRPC and HTTP, [`rest`] the HTTP API port (OIP REST,
//! `/v1/classify`, the upload page of [`page`]) on the plumbing of [`web`]. Every route is declared
//! once ([`routes`]); [`call`] is the one layer that lets a call in and records it. [`prescan`]
//! bounds what decoding a request may allocate,
//! [`status`] corrects the statuses the transport gets wrong, [`trace`] opens each call's span,
//! [`probes`] serves the metrics and probes port (`/metrics`, `/healthz`, `/readyz`),
//! [`transport`] owns the connections of every port and [`body`] bounds their request bodies.
//! Every request path goes through [`crate::pipeline`].

pub mod body;
pub mod call;
pub mod grpc;
pub mod oip;
pub mod page;
pub mod prescan;
pub mod probes;
pub mod response;
pub mod rest;
pub mod routes;
pub mod status;
pub mod trace;
pub mod transport;
pub mod web;
