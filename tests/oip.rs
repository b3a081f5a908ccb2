//! The Open Inference Protocol (KServe v2) over gRPC and HTTP, and the plain JSON API, against the
//! real server: every answer is checked against `Classify` on the same images (the same pipeline),
//! the FP32 path against the tensor that reached the model, and every error against its status.

mod common;

use std::collections::HashMap;

use base64::Engine;
use brainai::kserve_pb as kpb;
use brainai::kserve_pb::grpc_inference_service_client::GrpcInferenceServiceClient;
use brainai::kserve_pb::infer_parameter::ParameterChoice;
use brainai::kserve_pb::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use brainai::pb;
use common::*;
use serde_json::{Value, json};
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;

const IMAGES: [&str; 3] = ["flair_256_a.png", "flair_512_a.jpg", "flair_300x220.png"];

fn oip(t: &TestServer) -> GrpcInferenceServiceClient<Channel> {
    GrpcInferenceServiceClient::new(t.channel.clone())
        .max_decoding_message_size(256 << 20)
        .max_encoding_message_size(256 << 20)
}

fn rest_addr(t: &TestServer) -> std::net::SocketAddr {
    t.server.http_addr
}

/// The tiny model served under its own `name`, so this test's metrics are its own (the metrics
/// registry is shared by the tests of this process).
async fn serve_as(name: &str) -> (TestServer, tempfile::TempDir) {
    let root = tempfile::tempdir().unwrap();
    let dir = copy_model("tiny", root.path(), name);
    (serve(args(&dir, &[]), None).await, root)
}

fn bytes_input(items: Vec<Vec<u8>>, shape: Vec<i64>) -> InferInputTensor {
    InferInputTensor {
        name: "IMAGE".into(),
        datatype: "BYTES".into(),
        shape,
        parameters: HashMap::new(),
        contents: Some(kpb::InferTensorContents {
            bytes_contents: items,
            ..Default::default()
        }),
    }
}

fn infer_request(model: &str, inputs: Vec<InferInputTensor>) -> kpb::ModelInferRequest {
    kpb::ModelInferRequest {
        model_name: model.into(),
        id: "req-1".into(),
        inputs,
        ..Default::default()
    }
}

fn int_param(v: i64) -> kpb::InferParameter {
    kpb::InferParameter {
        parameter_choice: Some(ParameterChoice::Int64Param(v)),
    }
}

fn output(name: &str, classification: Option<i64>) -> InferRequestedOutputTensor {
    InferRequestedOutputTensor {
        name: name.into(),
        parameters: classification
            .map(|k| HashMap::from([("classification".to_string(), int_param(k))]))
            .unwrap_or_default(),
    }
}

fn fp32_output(r: &kpb::ModelInferResponse, name: &str) -> Vec<f32> {
    let i = r
        .outputs
        .iter()
        .position(|o| o.name == name)
        .unwrap_or_else(|| panic!("no output {name}"));
    assert_eq!(r.outputs[i].datatype, "FP32");
    match &r.outputs[i].contents {
        Some(c) => c.fp32_contents.clone(),
        None => brainai::api::oip::fp32_from_raw(&r.raw_output_contents[i]).unwrap(),
    }
}

fn bytes_output(r: &kpb::ModelInferResponse, name: &str) -> Vec<String> {
    let i = r
        .outputs
        .iter()
        .position(|o| o.name == name)
        .unwrap_or_else(|| panic!("no output {name}"));
    assert_eq!(r.outputs[i].datatype, "BYTES");
    let items = match &r.outputs[i].contents {
        Some(c) => c.bytes_contents.clone(),
        None => brainai::api::oip::bytes_from_raw(&r.raw_output_contents[i], usize::MAX).unwrap(),
    };
    items
        .into_iter()
        .map(|b| String::from_utf8(b).unwrap())
        .collect()
}

fn text_param(r: &HashMap<String, kpb::InferParameter>, key: &str) -> Option<ParameterChoice> {
    r.get(key).and_then(|p| p.parameter_choice.clone())
}

/// Probabilities of `Classify` for the images, row by row.
fn classify_rows(results: &[pb::Classification]) -> Vec<Vec<f32>> {
    results
        .iter()
        .map(|r| r.probabilities.iter().map(|p| p.probability).collect())
        .collect()
}

fn assert_rows_equal(what: &str, got: &[f32], want: &[Vec<f32>]) {
    let want: Vec<f32> = want.iter().flatten().copied().collect();
    assert_eq!(got.len(), want.len(), "{what}: number of probabilities");
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-6,
            "{what}: probability {i}: {g} vs Classify's {w}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_model_infer_with_images_equals_classify() {
    let (mut t, _dir) = serve_as("oip-grpc").await;
    let classified = classify_files(&mut t, &IMAGES).await;
    let want = classify_rows(&classified);
    let labels: Vec<String> = classified.iter().map(|c| c.label.clone()).collect();
    let images: Vec<Vec<u8>> = IMAGES.iter().map(|n| data(n)).collect();
    let mut client = oip(&t);

    // Typed contents, shape [N].
    let r = bounded(
        "ModelInfer",
        client.model_infer(infer_request(
            "oip-grpc",
            vec![bytes_input(images.clone(), vec![3])],
        )),
    )
    .await
    .expect("ModelInfer")
    .into_inner();
    assert_eq!(r.id, "req-1");
    assert_eq!(
        (r.model_name.as_str(), r.model_version.as_str()),
        ("oip-grpc", "1")
    );
    assert_eq!(r.outputs.len(), 2, "both outputs when none is named");
    assert_eq!(r.outputs[0].shape, [3, 2]);
    assert_rows_equal("contents", &fp32_output(&r, "probabilities"), &want);
    assert_eq!(bytes_output(&r, "label"), labels);
    // Model identity and the not-trained warning travel with every answer.
    let sha = sha256_hex(&fixture_model("tiny").join("1/model.onnx"));
    assert_eq!(
        text_param(&r.parameters, "model_sha256"),
        Some(ParameterChoice::StringParam(sha.clone()))
    );
    assert_eq!(
        text_param(&r.parameters, "clinically_trained"),
        Some(ParameterChoice::BoolParam(false))
    );
    let Some(ParameterChoice::StringParam(warnings)) = text_param(&r.parameters, "warnings") else {
        panic!("no warnings parameter: {:?}", r.parameters)
    };
    assert!(warnings.contains("not clinically trained"), "{warnings}");
    assert_eq!(classified[0].model.as_ref().unwrap().sha256, sha);

    // raw_input_contents, shape [N, 1]: the answer comes back raw as well.
    let mut input = bytes_input(vec![], vec![3, 1]);
    input.contents = None;
    let mut request = infer_request("", vec![input]);
    request.raw_input_contents = vec![brainai::api::oip::bytes_to_raw(&images)];
    let r = client.model_infer(request).await.unwrap().into_inner();
    assert!(r.outputs.iter().all(|o| o.contents.is_none()));
    assert_eq!(r.raw_output_contents.len(), 2);
    assert_rows_equal("raw", &fp32_output(&r, "probabilities"), &want);
    assert_eq!(bytes_output(&r, "label"), labels);

    // Outputs by name, and the classification extension (as Triton: "score:index:label").
    let mut request = infer_request("oip-grpc", vec![bytes_input(images.clone(), vec![3])]);
    request.outputs = vec![output("probabilities", Some(1)), output("label", None)];
    let r = client.model_infer(request).await.unwrap().into_inner();
    assert_eq!(r.outputs[0].shape, [3, 1]);
    let top = bytes_output(&r, "probabilities");
    for (i, entry) in top.iter().enumerate() {
        let c = &classified[i];
        let best = c
            .probabilities
            .iter()
            .position(|p| p.label == c.label)
            .unwrap();
        assert_eq!(
            entry,
            &format!("{:.6}:{best}:{}", c.probability, c.label),
            "image {i}"
        );
    }
    let mut request = infer_request("oip-grpc", vec![bytes_input(images.clone(), vec![3])]);
    request.outputs = vec![output("probabilities", Some(10))];
    let r = client.model_infer(request).await.unwrap().into_inner();
    assert_eq!(r.outputs.len(), 1);
    assert_eq!(
        r.outputs[0].shape,
        [3, 2],
        "k is capped at the number of labels"
    );
    let mut request = infer_request("oip-grpc", vec![bytes_input(images, vec![3])]);
    request.outputs = vec![output("label", None)];
    let r = client.model_infer(request).await.unwrap().into_inner();
    assert_eq!(r.outputs.len(), 1);
    assert_eq!(bytes_output(&r, "label"), labels);

    let (_, metrics) = http_get(t.metrics_addr(), "/metrics").await;
    assert_eq!(
        metric_value(
            &metrics,
            "brainai_requests_total",
            &["rpc=\"ModelInfer\"", "code=\"OK\"", "model=\"oip-grpc\""]
        ),
        5.0,
        "{metrics}"
    );
    assert!(
        metric_value(
            &metrics,
            "brainai_batch_size_count",
            &["model=\"oip-grpc\""]
        ) >= 5.0,
        "ModelInfer goes through the batcher"
    );
    t.server.shutdown().await.unwrap();
}

/// The reference (Pillow + numpy) tensor of `names` for the model in `model_dir`, and its shape.
fn reference_tensor(model_dir: &std::path::Path, names: &[&str]) -> (Vec<f32>, Vec<i64>) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tensor.f32");
    let mut argv = vec![
        "preprocess".to_string(),
        "--model-dir".into(),
        model_dir.display().to_string(),
        "--out".into(),
        out.display().to_string(),
    ];
    argv.extend(
        names
            .iter()
            .map(|n| repo().join("tests/data").join(n).display().to_string()),
    );
    let printed: Value = serde_json::from_str(&reference(
        &argv.iter().map(String::as_str).collect::<Vec<_>>(),
    ))
    .unwrap();
    let shape = printed["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_i64().unwrap())
        .collect();
    let values = brainai::api::oip::fp32_from_raw(&std::fs::read(out).unwrap()).unwrap();
    (values, shape)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fp32_tensors_reach_the_model_as_sent() {
    for (model, names) in [
        ("tiny", &IMAGES[..]),
        (
            "tiny-nhwc-probs",
            &["flair_256_b.png", "flair_512_rgb.png"][..],
        ),
    ] {
        let (t, h) = serve_gated(model, &["--max-queue-delay-us", "0"]).await;
        h.gate.open();
        let mut classify = t.client.clone();
        let images = names.iter().map(|n| image(n, data(n))).collect();
        let classified = classify
            .classify(request(images))
            .await
            .unwrap()
            .into_inner()
            .results;
        let want = classify_rows(&classified);
        h.log.clear();
        h.log.keep_inputs();

        let (tensor, shape) = reference_tensor(&fixture_model(model), names);
        let nhwc = model.contains("nhwc");
        assert_eq!(shape[if nhwc { 3 } else { 1 }], 3, "{model}: {shape:?}");
        let fp32 = |raw: bool| {
            let mut input = InferInputTensor {
                name: "input".into(),
                datatype: "FP32".into(),
                shape: shape.clone(),
                parameters: HashMap::new(),
                contents: Some(kpb::InferTensorContents {
                    fp32_contents: tensor.clone(),
                    ..Default::default()
                }),
            };
            let mut request = infer_request(model, vec![]);
            if raw {
                input.contents = None;
                request.raw_input_contents = vec![brainai::api::oip::fp32_to_raw(&tensor)];
            }
            request.inputs = vec![input];
            request
        };
        for raw in [false, true] {
            let r = bounded("ModelInfer FP32", oip(&t).model_infer(fp32(raw)))
                .await
                .unwrap_or_else(|e| panic!("{model} raw={raw}: {e:?}"))
                .into_inner();
            // Pillow's preprocessing and ours agree to rounding; the answers agree to 1e-4.
            let got = fp32_output(&r, "probabilities");
            let flat: Vec<f32> = want.iter().flatten().copied().collect();
            for (g, w) in got.iter().zip(&flat) {
                assert!((g - w).abs() <= 1e-4, "{model} raw={raw}: {g} vs {w}");
            }
        }
        // Bit for bit what was sent, not preprocessed again: the batches hold exactly the tensor
        // (each request a batch of its own, as the queue delay is 0 and the calls sequential).
        let batches = h.log.inputs();
        assert_eq!(batches.len(), 2, "{model}: {:?}", h.log.sizes());
        for b in batches {
            assert_eq!(b, tensor, "{model}: the FP32 input was changed on its way");
        }
        t.server.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_metadata_readiness_health_and_reflection() {
    let t = serve(args(&fixture_model("tiny-nhwc-probs"), &[]), None).await;
    let mut client = oip(&t);
    assert!(
        client
            .server_live(kpb::ServerLiveRequest {})
            .await
            .unwrap()
            .into_inner()
            .live
    );
    assert!(
        client
            .server_ready(kpb::ServerReadyRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    let ready = |name: &str, version: &str| kpb::ModelReadyRequest {
        name: name.into(),
        version: version.into(),
    };
    assert!(
        client
            .model_ready(ready("tiny-nhwc-probs", ""))
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    assert!(
        client
            .model_ready(ready("tiny-nhwc-probs", "1"))
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    assert!(
        !client
            .model_ready(ready("nope", ""))
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    assert!(
        !client
            .model_ready(ready("tiny-nhwc-probs", "7"))
            .await
            .unwrap()
            .into_inner()
            .ready
    );

    let server = client
        .server_metadata(kpb::ServerMetadataRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(server.name, "brainai");
    assert!(server.extensions.contains(&"classification".to_string()));

    let meta = client
        .model_metadata(kpb::ModelMetadataRequest {
            name: "tiny-nhwc-probs".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(meta.versions, ["1"]);
    assert_eq!(meta.platform, "onnxruntime_onnx");
    let tensors = |list: &[kpb::model_metadata_response::TensorMetadata]| {
        list.iter()
            .map(|t| (t.name.clone(), t.datatype.clone(), t.shape.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        tensors(&meta.inputs),
        [
            ("IMAGE".to_string(), "BYTES".to_string(), vec![-1]),
            ("input".into(), "FP32".into(), vec![-1, 32, 32, 3]),
        ]
    );
    assert_eq!(
        tensors(&meta.outputs),
        [
            ("probabilities".to_string(), "FP32".to_string(), vec![-1, 3]),
            ("label".into(), "BYTES".into(), vec![-1]),
        ]
    );
    let err = client
        .model_metadata(kpb::ModelMetadataRequest {
            name: "nope".into(),
            version: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("nope"), "{}", err.message());

    // Health names the protocol's service; reflection lists it (ghz, grpcurl need no .proto).
    assert_eq!(
        health_status(&t.channel, brainai::server::OIP_SERVICE_NAME).await,
        ServingStatus::Serving as i32
    );
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut reflection = ServerReflectionClient::new(t.channel.clone());
    let req = |m| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(m),
    };
    let mut stream = reflection
        .server_reflection_info(futures_util::stream::iter(vec![
            req(MessageRequest::ListServices(String::new())),
            req(MessageRequest::FileContainingSymbol(
                "inference.GRPCInferenceService".into(),
            )),
        ]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        stream.message().await.unwrap().unwrap().message_response
    else {
        panic!("no service list")
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(
        names.contains(&"inference.GRPCInferenceService"),
        "{names:?}"
    );
    let Some(MessageResponse::FileDescriptorResponse(files)) =
        stream.message().await.unwrap().unwrap().message_response
    else {
        panic!("no descriptor of inference.GRPCInferenceService")
    };
    assert!(!files.file_descriptor_proto.is_empty());
    t.server.shutdown().await.unwrap();
}

/// Sends `request` and returns the error (code, message).
async fn infer_error(t: &TestServer, request: kpb::ModelInferRequest) -> (Code, String) {
    let err = bounded("ModelInfer", oip(t).model_infer(request))
        .await
        .expect_err("the request is refused");
    (err.code(), err.message().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_bad_requests_name_the_input_and_the_reason() {
    let t = serve(args(&fixture_model("tiny"), &[]), None).await;
    let good = || data("flair_256_a.png");
    let fp32 = |shape: Vec<i64>, n: usize| InferInputTensor {
        name: "input".into(),
        datatype: "FP32".into(),
        shape,
        parameters: HashMap::new(),
        contents: Some(kpb::InferTensorContents {
            fp32_contents: vec![0.5; n],
            ..Default::default()
        }),
    };
    let cases: Vec<(&str, kpb::ModelInferRequest, Code, &str)> = vec![
        (
            "unknown model",
            infer_request("no-such-model", vec![bytes_input(vec![good()], vec![1])]),
            Code::NotFound,
            "no-such-model",
        ),
        (
            "not an image",
            infer_request(
                "tiny",
                vec![bytes_input(vec![good(), b"not an image".to_vec()], vec![2])],
            ),
            Code::InvalidArgument,
            "image 1",
        ),
        (
            "shape disagrees with the elements",
            infer_request("tiny", vec![bytes_input(vec![good()], vec![2])]),
            Code::InvalidArgument,
            "shape [2] and 1 elements",
        ),
        (
            "BYTES with a 3-D shape",
            infer_request("tiny", vec![bytes_input(vec![good()], vec![1, 1, 1])]),
            Code::InvalidArgument,
            "[N] or [N, 1]",
        ),
        (
            "FP32 of the wrong size",
            infer_request("tiny", vec![fp32(vec![1, 3, 16, 16], 768)]),
            Code::InvalidArgument,
            "[-1, 3, 32, 32]",
        ),
        (
            "FP32 values fewer than the shape",
            infer_request("tiny", vec![fp32(vec![1, 3, 32, 32], 100)]),
            Code::InvalidArgument,
            "100 values",
        ),
        (
            // (2^54 + 1) x 3 x 32 x 32 wraps to 3,072 in 64 bits: one image's worth of values
            // (found by fuzzing; a release build used to accept it).
            "FP32 shape whose product overflows",
            infer_request("tiny", vec![fp32(vec![(1 << 54) + 1, 3, 32, 32], 3072)]),
            Code::InvalidArgument,
            "3072 values",
        ),
        (
            "a datatype the model does not take",
            infer_request(
                "tiny",
                vec![InferInputTensor {
                    name: "input".into(),
                    datatype: "INT8".into(),
                    shape: vec![1],
                    ..Default::default()
                }],
            ),
            Code::InvalidArgument,
            "datatype \"INT8\"",
        ),
        (
            "two inputs",
            infer_request(
                "tiny",
                vec![
                    bytes_input(vec![good()], vec![1]),
                    bytes_input(vec![good()], vec![1]),
                ],
            ),
            Code::InvalidArgument,
            "exactly one input",
        ),
        (
            "negative dimension",
            infer_request("tiny", vec![bytes_input(vec![good()], vec![-1])]),
            Code::InvalidArgument,
            "give every dimension",
        ),
        (
            "unknown output",
            kpb::ModelInferRequest {
                outputs: vec![output("logits", None)],
                ..infer_request("tiny", vec![bytes_input(vec![good()], vec![1])])
            },
            Code::InvalidArgument,
            "\"logits\" is not an output",
        ),
        (
            "classification on label",
            kpb::ModelInferRequest {
                outputs: vec![output("label", Some(1))],
                ..infer_request("tiny", vec![bytes_input(vec![good()], vec![1])])
            },
            Code::InvalidArgument,
            "applies to probabilities",
        ),
        (
            "raw contents that do not match the inputs",
            kpb::ModelInferRequest {
                raw_input_contents: vec![vec![1, 2], vec![3]],
                ..infer_request("tiny", vec![bytes_input(vec![], vec![1])])
            },
            Code::InvalidArgument,
            "raw_input_contents has 2 entries for 1 inputs",
        ),
        (
            "raw BYTES cut short",
            kpb::ModelInferRequest {
                raw_input_contents: vec![vec![9, 0, 0, 0, 1]],
                ..infer_request(
                    "tiny",
                    vec![InferInputTensor {
                        contents: None,
                        ..bytes_input(vec![], vec![1])
                    }],
                )
            },
            Code::InvalidArgument,
            "shorter than its length",
        ),
        (
            "more BYTES elements than images a request may have",
            infer_request("tiny", vec![bytes_input(vec![good(); 65], vec![65])]),
            Code::InvalidArgument,
            "65 BYTES elements, over the limit of 64 images per request",
        ),
        (
            "more raw BYTES elements than images a request may have",
            kpb::ModelInferRequest {
                raw_input_contents: vec![brainai::api::oip::bytes_to_raw(&vec![vec![]; 65])],
                ..infer_request(
                    "tiny",
                    vec![InferInputTensor {
                        contents: None,
                        ..bytes_input(vec![], vec![65])
                    }],
                )
            },
            Code::InvalidArgument,
            "more than 64 BYTES elements",
        ),
        (
            "a shape of nine dimensions",
            infer_request("tiny", vec![bytes_input(vec![good()], vec![1; 9])]),
            Code::InvalidArgument,
            "at most 8 dimensions",
        ),
        (
            "a non-finite FP32 value",
            infer_request(
                "tiny",
                vec![InferInputTensor {
                    contents: Some(kpb::InferTensorContents {
                        fp32_contents: [vec![0.5; 100], vec![f32::NAN], vec![0.5; 3071 - 100]]
                            .concat(),
                        ..Default::default()
                    }),
                    ..fp32(vec![1, 3, 32, 32], 0)
                }],
            ),
            Code::InvalidArgument,
            "FP32 value 100 is NaN",
        ),
        (
            "a priority that does not exist",
            kpb::ModelInferRequest {
                parameters: HashMap::from([("priority".to_string(), int_param(9))]),
                ..infer_request("tiny", vec![bytes_input(vec![good()], vec![1])])
            },
            Code::InvalidArgument,
            "priority",
        ),
    ];
    for (what, request, code, needle) in cases {
        let (got, message) = infer_error(&t, request).await;
        assert_eq!(got, code, "{what}: {message}");
        assert!(
            message.contains(needle),
            "{what}: {message:?} lacks {needle:?}"
        );
    }
    // None of that hurt the server: a good call still works.
    oip(&t)
        .model_infer(infer_request(
            "tiny",
            vec![bytes_input(vec![good()], vec![1])],
        ))
        .await
        .expect("a good call after the bad ones");
    t.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_and_http_overload_and_drain_use_the_classify_codes() {
    let (mut t, h) = serve_gated(
        "tiny",
        &[
            "--max-batch-size",
            "1",
            "--max-queue-delay-us",
            "0",
            "--queue-capacity",
            "1",
            "--max-images-per-request",
            "1",
            // Beyond PATIENCE: the ports close when the drain starts, not at its timeout.
            "--drain-timeout-s",
            "3600",
        ],
    )
    .await;
    let img = || data("flair_256_a.png");
    let one = move || infer_request("tiny", vec![bytes_input(vec![img()], vec![1])]);
    let rest = rest_addr(&t);

    // One image runs (held at the gate), one waits in the queue: the queue is full.
    let mut c1 = oip(&t);
    let running = tokio::spawn(async move { c1.model_infer(one()).await });
    until("the first batch to reach the model", || h.log.len() == 1).await;
    let mut c2 = oip(&t);
    let queued = tokio::spawn(async move { c2.model_infer(one()).await });
    let model = t.server.registry.resolve("", "").unwrap();
    until("one image queued", || {
        model
            .batcher
            .queue_depth(brainai::batcher::Priority::Routine)
            == 1
    })
    .await;
    let (code, message) = infer_error(&t, one()).await;
    assert_eq!(code, Code::ResourceExhausted, "{message}");
    assert!(message.contains("queue is full"), "{message}");
    let (ctype, body) = json_infer_body(&[img()]);
    let r = http(
        rest,
        "POST",
        "/v2/models/tiny/infer",
        &[("content-type", &ctype)],
        &body,
    )
    .await;
    assert_eq!(r.status, 429, "{}", String::from_utf8_lossy(&r.body));
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("queue is full")
    );
    let r = http(rest, "POST", "/v1/classify", &[], &img()).await;
    assert_eq!(r.status, 429);

    // Draining: both inference ports stop accepting and send every connection a GOAWAY at once
    // (new calls go to another replica: here UNAVAILABLE, or the connection is refused); the
    // two accepted calls finish.
    t.server.begin_shutdown();
    until_draining(t.metrics_addr(), &[t.server.grpc_addr, rest]).await;
    let err = bounded("ModelInfer", oip(&t).model_infer(one()))
        .await
        .expect_err("not sent");
    assert_unsent(&err);
    h.gate.open();
    for (what, call) in [("running", running), ("queued", queued)] {
        let r = bounded(what, call).await.unwrap().expect(what).into_inner();
        assert_eq!(r.outputs.len(), 2, "{what}");
    }
    tokio::time::timeout(PATIENCE, t.server.wait())
        .await
        .expect("server stops after draining")
        .expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_of_every_front_end_are_kept() {
    let (t, h) = serve_gated(
        "tiny",
        &[
            "--max-batch-size",
            "1",
            "--max-queue-delay-us",
            "0",
            "--max-images-per-request",
            "1",
        ],
    )
    .await;
    let img = || data("flair_256_a.png");
    let one = move || infer_request("tiny", vec![bytes_input(vec![img()], vec![1])]);
    let rest = rest_addr(&t);
    // One call holds the only instance; each call below waits behind it past its deadline.
    let mut c1 = oip(&t);
    let running = tokio::spawn(async move { c1.model_infer(one()).await });
    until("the first batch to reach the model", || h.log.len() == 1).await;

    // Triton's `timeout` request parameter (µs).
    let mut late = one();
    late.parameters = HashMap::from([("timeout".to_string(), int_param(300_000))]);
    let (code, message) = infer_error(&t, late).await;
    assert_eq!(code, Code::DeadlineExceeded, "{message}");
    // The gRPC deadline, as the server sees it (grpc-timeout header, no client-side timer).
    let mut raw = GrpcInferenceServiceClient::new(raw_h2(t.server.grpc_addr).await);
    let mut late = tonic::Request::new(one());
    late.set_timeout(std::time::Duration::from_millis(300));
    let err = bounded("ModelInfer with a deadline", raw.model_infer(late))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{}", err.message());
    // HTTP: the plain API's timeout_ms, and the v2 `timeout` parameter.
    let r = http(rest, "POST", "/v1/classify?timeout_ms=300", &[], &img()).await;
    assert_eq!(r.status, 504, "{}", String::from_utf8_lossy(&r.body));
    assert!(r.json()["error"].as_str().unwrap().contains("deadline"));
    let body = serde_json::to_vec(&json!({
        "parameters": {"timeout": 300_000},
        "inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1],
                    "data": [base64::engine::general_purpose::STANDARD.encode(img())]}]
    }))
    .unwrap();
    let r = http(rest, "POST", "/v2/models/tiny/infer", &[], &body).await;
    assert_eq!(r.status, 504, "{}", String::from_utf8_lossy(&r.body));

    // None of the late images ever reached the model.
    h.gate.open();
    bounded("the running call", running)
        .await
        .unwrap()
        .expect("the running call completes");
    let mut after = oip(&t);
    bounded("a call after", after.model_infer(one()))
        .await
        .expect("a call after the late ones");
    assert_eq!(h.log.sizes(), [1, 1], "late images must never run");
    t.server.shutdown().await.unwrap();
}

/// A v2 JSON request with the images as base64 BYTES; (content type, body).
fn json_infer_body(images: &[Vec<u8>]) -> (String, Vec<u8>) {
    let b64 = base64::engine::general_purpose::STANDARD;
    let doc = json!({
        "id": "json-1",
        "inputs": [{
            "name": "IMAGE",
            "datatype": "BYTES",
            "shape": [images.len()],
            "data": images.iter().map(|i| b64.encode(i)).collect::<Vec<_>>(),
        }]
    });
    ("application/json".into(), serde_json::to_vec(&doc).unwrap())
}

fn json_probabilities(doc: &Value) -> Vec<f32> {
    let out = doc["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["name"] == "probabilities")
        .expect("a probabilities output");
    assert_eq!(out["datatype"], "FP32");
    out["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_v2_json_and_binary_equal_classify() {
    let (mut t, _dir) = serve_as("oip-http").await;
    let rest = rest_addr(&t);
    let classified = classify_files(&mut t, &IMAGES).await;
    let want = classify_rows(&classified);
    let images: Vec<Vec<u8>> = IMAGES.iter().map(|n| data(n)).collect();

    // JSON with base64 BYTES; with and without the version in the path.
    for path in [
        "/v2/models/oip-http/infer",
        "/v2/models/oip-http/versions/1/infer",
    ] {
        let (ctype, body) = json_infer_body(&images);
        let r = http(rest, "POST", path, &[("content-type", &ctype)], &body).await;
        assert_eq!(
            r.status,
            200,
            "{path}: {}",
            String::from_utf8_lossy(&r.body)
        );
        let doc = r.json();
        assert_eq!(doc["model_name"], "oip-http");
        assert_eq!(doc["model_version"], "1");
        assert_eq!(doc["id"], "json-1");
        assert_eq!(doc["parameters"]["clinically_trained"], false);
        assert_eq!(
            doc["parameters"]["model_sha256"],
            sha256_hex(&fixture_model("tiny").join("1/model.onnx"))
        );
        assert_rows_equal(path, &json_probabilities(&doc), &want);
        let labels = doc["outputs"][1]["data"].as_array().unwrap();
        for (l, c) in labels.iter().zip(&classified) {
            assert_eq!(l, &json!(c.label));
        }
    }

    // The binary-data extension both ways (as tritonclient's HTTP client sends it).
    let raw = brainai::api::oip::bytes_to_raw(&images);
    let header = serde_json::to_vec(&json!({
        "inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [3, 1],
                    "parameters": {"binary_data_size": raw.len()}}],
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": true}},
                    {"name": "label"}]
    }))
    .unwrap();
    let mut body = header.clone();
    body.extend(&raw);
    let len = header.len().to_string();
    let r = http(
        rest,
        "POST",
        "/v2/models/oip-http/infer",
        &[
            ("content-type", "application/octet-stream"),
            ("inference-header-content-length", &len),
        ],
        &body,
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let json_len: usize = r
        .header("inference-header-content-length")
        .expect("the binary answer says where its JSON ends")
        .parse()
        .unwrap();
    let doc: Value = serde_json::from_slice(&r.body[..json_len]).unwrap();
    let size = doc["outputs"][0]["parameters"]["binary_data_size"]
        .as_u64()
        .unwrap() as usize;
    assert_eq!(size, 3 * 2 * 4);
    let probabilities =
        brainai::api::oip::fp32_from_raw(&r.body[json_len..json_len + size]).unwrap();
    assert_rows_equal("binary", &probabilities, &want);
    assert_eq!(r.body.len(), json_len + size, "label stays in the JSON");
    assert_eq!(doc["outputs"][1]["data"][0], json!(classified[0].label));

    // FP32 in JSON, nested like a numpy array, goes in as the model's tensor.
    let (tensor, shape) = reference_tensor(&fixture_model("tiny"), &IMAGES[..1]);
    let nested: Vec<Vec<f32>> = tensor.chunks(32).map(<[f32]>::to_vec).collect();
    let body = serde_json::to_vec(&json!({
        "inputs": [{"name": "input", "datatype": "FP32", "shape": shape, "data": nested}],
        "outputs": [{"name": "probabilities", "parameters": {"classification": 2}}]
    }))
    .unwrap();
    let r = http(rest, "POST", "/v2/models/oip-http/infer", &[], &body).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let doc = r.json();
    let top = doc["outputs"][0]["data"].as_array().unwrap();
    assert_eq!(doc["outputs"][0]["datatype"], "BYTES");
    assert_eq!(top.len(), 2);
    let best: Vec<&str> = top[0].as_str().unwrap().split(':').collect();
    assert_eq!(best[2], classified[0].label);
    let score: f32 = best[0].parse().unwrap();
    assert!((score - classified[0].probability).abs() <= 1e-4);

    // Metadata and readiness.
    let r = http(rest, "GET", "/v2/models/oip-http", &[], b"").await;
    assert_eq!(r.status, 200);
    let meta = r.json();
    assert_eq!(meta["inputs"][1]["shape"], json!([-1, 3, 32, 32]));
    assert_eq!(meta["outputs"][0]["shape"], json!([-1, 2]));
    assert_eq!(meta["parameters"]["labels"], "no_tumor,tumor");
    assert_eq!(meta["versions"], json!(["1"]));
    assert_eq!(
        http(rest, "GET", "/v2/models/oip-http/versions/1", &[], b"")
            .await
            .status,
        200
    );
    assert_eq!(
        http(rest, "GET", "/v2/models/oip-http/ready", &[], b"")
            .await
            .status,
        200
    );
    assert_eq!(
        http(
            rest,
            "GET",
            "/v2/models/oip-http/versions/3/ready",
            &[],
            b""
        )
        .await
        .status,
        404
    );
    assert_eq!(
        http(rest, "GET", "/v2/health/ready", &[], b"").await.status,
        200
    );
    let server = http(rest, "GET", "/v2", &[], b"").await.json();
    assert_eq!(server["name"], "brainai");
    let extensions = server["extensions"].as_array().unwrap();
    assert!(
        extensions.contains(&json!("classification")),
        "{extensions:?}"
    );
    assert!(
        extensions.contains(&json!("binary_tensor_data")),
        "{extensions:?}"
    );

    let (_, metrics) = http_get(t.metrics_addr(), "/metrics").await;
    assert_eq!(
        metric_value(
            &metrics,
            "brainai_requests_total",
            &["rpc=\"v2.infer\"", "code=\"OK\"", "model=\"oip-http\""]
        ),
        4.0,
        "{metrics}"
    );
    t.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_errors_are_json_with_the_right_status() {
    let t = serve(
        args(&fixture_model("tiny"), &["--max-http-body-bytes", "200000"]),
        None,
    )
    .await;
    let rest = rest_addr(&t);
    let img = data("flair_256_a.png");
    let b64 = base64::engine::general_purpose::STANDARD.encode(&img);
    let infer = |doc: Value| serde_json::to_vec(&doc).unwrap();
    let cases: Vec<(&str, &str, Vec<u8>, u16, &str)> = vec![
        (
            "malformed JSON",
            "/v2/models/tiny/infer",
            b"{\"inputs\": [".to_vec(),
            400,
            "not valid JSON",
        ),
        (
            "not an object",
            "/v2/models/tiny/infer",
            b"[1]".to_vec(),
            400,
            "JSON object",
        ),
        (
            "no inputs",
            "/v2/models/tiny/infer",
            infer(json!({})),
            400,
            "no `inputs`",
        ),
        (
            "unknown model",
            "/v2/models/nope/infer",
            infer(
                json!({"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1], "data": [b64]}]}),
            ),
            404,
            "nope",
        ),
        (
            "wrong datatype",
            "/v2/models/tiny/infer",
            infer(
                json!({"inputs": [{"name": "input", "datatype": "INT64", "shape": [1], "data": [1]}]}),
            ),
            400,
            "datatype \"INT64\"",
        ),
        (
            "wrong shape",
            "/v2/models/tiny/infer",
            infer(
                json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 8, 8], "data": vec![0.0; 192]}]}),
            ),
            400,
            "[-1, 3, 32, 32]",
        ),
        (
            "BYTES not base64",
            "/v2/models/tiny/infer",
            infer(
                json!({"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1], "data": ["%%%"]}]}),
            ),
            400,
            "not base64",
        ),
        (
            "binary size past the body",
            "/v2/models/tiny/infer",
            infer(
                json!({"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 99}}]}),
            ),
            400,
            "past the end of the body",
        ),
        (
            "bad image",
            "/v2/models/tiny/infer",
            infer(
                json!({"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1], "data": ["aGVsbG8="]}]}),
            ),
            400,
            "image 0",
        ),
        (
            "more BYTES elements than images a request may have",
            "/v2/models/tiny/infer",
            infer(
                json!({"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [65], "data": vec![""; 65]}]}),
            ),
            400,
            "more than 64 elements, over the limit of 64 images per request",
        ),
        (
            "a shape of nine dimensions",
            "/v2/models/tiny/infer",
            infer(
                json!({"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": vec![1; 9], "data": [b64]}]}),
            ),
            400,
            "at most 8 dimensions",
        ),
        (
            "bad image (plain API)",
            "/v1/classify",
            b"hello".to_vec(),
            400,
            "image 0",
        ),
        (
            "unknown model (plain API)",
            "/v1/classify?model=nope",
            img.clone(),
            404,
            "nope",
        ),
        (
            "bad priority (plain API)",
            "/v1/classify?priority=urgent",
            img.clone(),
            400,
            "urgent",
        ),
        (
            "bad timeout (plain API)",
            "/v1/classify?timeout_ms=soon",
            img.clone(),
            400,
            "timeout_ms",
        ),
        (
            "body too large",
            "/v1/classify",
            vec![0u8; 300_000],
            413,
            "over the limit of 200000 bytes",
        ),
        (
            "body too large (v2)",
            "/v2/models/tiny/infer",
            vec![b' '; 300_000],
            413,
            "over the limit",
        ),
        ("no such route", "/v3/anything", vec![], 404, "not found"),
    ];
    for (what, path, body, status, needle) in cases {
        let r = http(rest, "POST", path, &[], &body).await;
        assert_eq!(
            r.status,
            status,
            "{what}: {}",
            String::from_utf8_lossy(&r.body)
        );
        let error = r.json()["error"].as_str().unwrap_or_default().to_string();
        assert!(error.contains(needle), "{what}: {error:?} lacks {needle:?}");
    }
    let tiny_png = data("flair_256_a.png");
    let parts: Vec<(&str, &[u8])> = (0..65).map(|_| ("p.png", &tiny_png[..64])).collect();
    let (ctype, body) = multipart(&parts);
    let r = http(
        rest,
        "POST",
        "/v1/classify",
        &[("content-type", &ctype)],
        &body,
    )
    .await;
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("more than 64 images"),
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let r = http(rest, "GET", "/v2/models/nope", &[], b"").await;
    assert_eq!(r.status, 404);
    assert!(r.json()["error"].as_str().unwrap().contains("nope"));

    let (_, metrics) = http_get(t.metrics_addr(), "/metrics").await;
    assert!(
        metric_value(
            &metrics,
            "brainai_requests_total",
            &["rpc=\"v2.infer\"", "code=\"INVALID_ARGUMENT\""]
        ) >= 7.0,
        "{metrics}"
    );
    assert!(
        metric_value(
            &metrics,
            "brainai_requests_total",
            &["rpc=\"v1.classify\"", "code=\"NOT_FOUND\""]
        ) >= 1.0,
        "{metrics}"
    );
    // Still serving.
    let r = http(rest, "POST", "/v1/classify", &[], &img).await;
    assert_eq!(r.status, 200);
    t.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_json_api_answers_like_classify_with_previews() {
    let (mut t, _dir) = serve_as("oip-plain").await;
    let rest = rest_addr(&t);
    let classified = classify_files(&mut t, &IMAGES).await;
    let files: Vec<(&str, Vec<u8>)> = IMAGES.iter().map(|n| (*n, data(n))).collect();
    let parts: Vec<(&str, &[u8])> = files.iter().map(|(n, d)| (*n, d.as_slice())).collect();
    let (ctype, body) = multipart(&parts);
    let r = http(
        rest,
        "POST",
        "/v1/classify?preview=1",
        &[("content-type", &ctype)],
        &body,
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let doc = r.json();
    let rows = doc["results"].as_array().unwrap();
    assert_eq!(rows.len(), 3);
    for (i, (row, c)) in rows.iter().zip(&classified).enumerate() {
        assert_eq!(row["file"], IMAGES[i]);
        assert_eq!(row["index"], i);
        assert_eq!(row["label"], json!(c.label));
        for p in &c.probabilities {
            let got = row["probabilities"][&p.label].as_f64().unwrap() as f32;
            assert!(
                (got - p.probability).abs() <= 1e-6,
                "{}: {}",
                IMAGES[i],
                p.label
            );
        }
        let model = c.model.as_ref().unwrap();
        assert_eq!(row["model"]["name"], json!(model.name));
        assert_eq!(row["model"]["version"], json!(model.version));
        assert_eq!(row["model"]["sha256"], json!(model.sha256));
        assert_eq!(row["model"]["clinically_trained"], false);
        assert_eq!(row["warnings"], json!(c.warnings));
        assert!(row["timing"]["inference_seconds"].as_f64().unwrap() > 0.0);
        // The preview is the image as the model saw it: a PNG of the model's input size.
        let url = row["preview"].as_str().expect("a preview");
        let png = base64::engine::general_purpose::STANDARD
            .decode(url.strip_prefix("data:image/png;base64,").unwrap())
            .unwrap();
        let preview = image::load_from_memory(&png).unwrap();
        assert_eq!((preview.width(), preview.height()), (32, 32));
    }

    // A raw body is one image; no preview unless asked for.
    let r = http(rest, "POST", "/v1/classify", &[], &data(IMAGES[1])).await;
    assert_eq!(r.status, 200);
    let row = &r.json()["results"][0];
    assert_eq!(row["label"], json!(classified[1].label));
    assert!(row.get("preview").is_none());

    // The page is served by the binary itself (its headers: tests/page.rs).
    let r = http(rest, "GET", "/", &[], b"").await;
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").unwrap().starts_with("text/html"));
    let script = http(rest, "GET", "/page.js", &[], b"").await;
    let script = String::from_utf8(script.body).unwrap();
    assert!(
        script.contains("/v1/classify"),
        "the page calls the JSON API"
    );

    let (_, metrics) = http_get(t.metrics_addr(), "/metrics").await;
    assert_eq!(
        metric_value(
            &metrics,
            "brainai_requests_total",
            &["rpc=\"v1.classify\"", "code=\"OK\"", "model=\"oip-plain\""]
        ),
        2.0
    );
    // The HTTP port's connections are counted under their own listener.
    let held = tokio::net::TcpStream::connect(rest).await.unwrap();
    bounded("an open REST connection to be counted", async {
        while scrape(
            t.metrics_addr(),
            "brainai_connections_open",
            &["listener=\"rest\""],
        )
        .await
            < 1.0
        {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    drop(held);
    t.server.shutdown().await.unwrap();
}
