//! BrainAI Serve: brain-MRI tumour classification over gRPC with a dynamic batcher on ONNX Runtime.
//!
//! The path of one request: [`pb`] (proto) → [`service`] (gRPC front end, preprocessing via
//! [`preprocess`]) → [`batcher`] (queue, batch policy, instance threads) → [`engine`] (ONNX Runtime)
//! → back to [`service`], which builds the response. [`server`] wires it together.

pub mod batcher;
pub mod client;
pub mod config;
pub mod engine;
pub mod metrics;
pub mod model;
pub mod preprocess;
pub mod resample;
pub mod server;
pub mod service;
pub mod status_layer;

/// Generated protobuf and gRPC types of `proto/brainai/v1/classifier.proto`.
pub mod pb {
    tonic::include_proto!("brainai.v1");

    /// Encoded descriptor set, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("brainai_descriptor");
}
