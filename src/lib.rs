//! BrainAI Serve: brain-MRI tumour classification over gRPC with a dynamic batcher on ONNX Runtime.
//!
//! The path of one request, top to bottom: [`api`] (wire ↔ domain: gRPC `brainai.v1`, the Open
//! Inference Protocol over gRPC and HTTP, the JSON API and upload page) →
//! [`pipeline`] (admit, resolve the model in the [`pipeline::registry`], reserve queue places,
//! preprocess, submit, await, postprocess) → [`input`] (decode) and [`preprocess`] (colour,
//! resize, scaling, layout) → [`batcher`] (queue per model version, batch policy, instance threads)
//! → [`backend`] (ONNX Runtime) → back through [`model::task`] (softmax, argmax) to the front end.
//! The DICOM node ([`node`]) is one more front end: C-STORE in, the same pipeline, C-STORE out.
//! [`server`] wires it together; [`state`] holds readiness and the in-flight count for the drain;
//! [`error`] is the one transport-neutral error.

pub mod api;
pub mod backend;
pub mod batcher;
pub mod client;
pub mod config;
pub mod error;
pub mod fuzzing;
pub mod gpu;
pub mod input;
pub mod metrics;
pub mod model;
pub mod node;
pub mod pipeline;
pub mod postprocess;
pub mod preprocess;
pub mod priority;
pub mod report;
pub mod security;
pub mod server;
pub mod state;
pub mod study;
pub mod telemetry;
pub mod threads;

/// Generated protobuf and gRPC types of the Open Inference Protocol (KServe v2),
/// `proto/kserve/grpc_predict_v2.proto` (package `inference`).
pub mod kserve_pb {
    tonic::include_proto!("inference");
}

/// Generated protobuf and gRPC types of `proto/brainai/v1/classifier.proto`.
pub mod pb {
    tonic::include_proto!("brainai.v1");

    /// Encoded descriptor set, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("brainai_descriptor");
}
