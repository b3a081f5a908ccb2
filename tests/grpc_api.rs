//! The gRPC API end to end: real server on 127.0.0.1:0, real ONNX Runtime (tiny test models),
//! generated client.

mod common;

use brainai::pb;
use common::*;
use futures_util::StreamExt;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classify_returns_one_result_per_image_with_model_identity() {
    let dir = fixture_model("tiny");
    let mut t = serve(args(&dir, &[]), None).await;
    let results = classify_files(&mut t, &["flair_256_a.png"]).await;
    let r = &results[0];
    assert_eq!(r.image_id, "flair_256_a.png");
    assert_eq!(r.index, 0);
    assert_eq!(r.probabilities.len(), 2);
    assert_eq!(r.probabilities[0].label, "no_tumor");
    assert_eq!(r.probabilities[1].label, "tumor");
    let sum: f32 = r.probabilities.iter().map(|p| p.probability).sum();
    assert!((sum - 1.0).abs() < 1e-5, "probabilities sum to {sum}");
    let best = r
        .probabilities
        .iter()
        .max_by(|a, b| a.probability.total_cmp(&b.probability))
        .unwrap();
    assert_eq!(
        (r.label.as_str(), r.probability),
        (best.label.as_str(), best.probability)
    );
    let model = r.model.as_ref().unwrap();
    assert_eq!(model.name, "tiny");
    assert_eq!(model.version, "1");
    assert_eq!(model.sha256, sha256_hex(&dir.join("1/model.onnx")));
    assert!(!model.clinically_trained);
    assert!(
        r.warnings
            .iter()
            .any(|w| w.contains("not clinically trained")),
        "{:?}",
        r.warnings
    );
    assert!(r.batch_size >= 1);
    let timing = r.timing.unwrap();
    assert!(timing.preprocess_seconds > 0.0 && timing.inference_seconds > 0.0);
    t.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_are_merged_into_one_batch() {
    // A long queue delay: the batch can only go early by filling up, which 8 concurrent
    // single-image calls do. The model gets a name of its own, so the metrics below count this
    // test's batches only (the registry is shared by every test of this binary).
    let root = tempfile::tempdir().unwrap();
    let dir = copy_model("tiny", root.path(), "merged");
    let t = serve(
        args(
            &dir,
            &[
                "--max-batch-size",
                "8",
                "--max-queue-delay-us",
                "30000000",
                "--max-queue-wait-ms",
                "0",
            ],
        ),
        None,
    )
    .await;
    let calls = (0..8).map(|i| {
        let mut client = t.client.clone();
        async move {
            client
                .classify(request(vec![image(
                    &format!("c{i}"),
                    data("flair_256_b.png"),
                )]))
                .await
                .expect("classify")
                .into_inner()
        }
    });
    let responses = bounded("the calls", futures_util::future::join_all(calls)).await;
    for (i, r) in responses.iter().enumerate() {
        assert_eq!(r.results[0].image_id, format!("c{i}"));
        assert_eq!(
            r.results[0].batch_size, 8,
            "call {i} did not share the batch"
        );
    }
    let (_, metrics) = http_get(t.metrics_addr(), "/metrics").await;
    let bucket = |le: &str| {
        metric_value(
            &metrics,
            "brainai_batch_size_bucket",
            &["model=\"merged\"", &format!("le=\"{le}\"")],
        )
    };
    assert_eq!(
        (bucket("4"), bucket("8")),
        (0.0, 1.0),
        "exactly one batch, of 8 images"
    );
    t.server.shutdown().await.unwrap();
}

/// Six images in one call to a model whose batches hold two: the call is split across three full
/// batches (a queue delay far beyond the test, so a batch goes only when full), and each result
/// comes back in its place, equal to the same image classified alone (by `tiny`, the same graph
/// with the usual queue delay).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_image_request_keeps_order_across_split_batches() {
    let root = tempfile::tempdir().unwrap();
    copy_model("tiny", root.path(), "tiny");
    copy_model("tiny", root.path(), "split");
    let mut t = serve(
        repository_args(
            root.path(),
            &[
                "--default-model",
                "tiny",
                "--max-batch-size",
                "2",
                "--model-override",
                "split:max_queue_delay_us=30000000",
                "--model-override",
                "split:max_queue_wait_ms=0",
            ],
        ),
        None,
    )
    .await;
    let names = [
        "flair_256_a.png",
        "flair_256_tumor.png",
        "flair_512_rgb.png",
        "flair_300x220.png",
        "flair_256_c.png",
        "flair_256_b.png",
    ];
    let images = names.iter().map(|n| image(n, data(n))).collect();
    let together = bounded(
        "the split call",
        t.client.classify(request_for("split", "", images)),
    )
    .await
    .expect("classify")
    .into_inner()
    .results;
    assert_eq!(together.len(), names.len(), "one result per image");
    let (_, metrics) = http_get(t.metrics_addr(), "/metrics").await;
    let batches = |le: &str| {
        metric_value(
            &metrics,
            "brainai_batch_size_bucket",
            &["model=\"split\"", &format!("le=\"{le}\"")],
        )
    };
    assert_eq!(
        (batches("1"), batches("2"), batches("+Inf")),
        (0.0, 3.0, 3.0),
        "the six images ran as three batches of two"
    );
    for (i, name) in names.iter().enumerate() {
        assert_eq!(together[i].image_id, *name);
        assert_eq!(together[i].index as usize, i);
        assert_eq!(together[i].batch_size, 2, "{name} ran in a batch of two");
        assert_eq!(together[i].model.as_ref().unwrap().name, "split");
        let alone = bounded(
            "classify alone",
            t.client.classify(request(vec![image(name, data(name))])),
        )
        .await
        .unwrap()
        .into_inner();
        assert_eq!(alone.results[0].model.as_ref().unwrap().name, "tiny");
        assert_eq!(
            alone.results[0].probabilities, together[i].probabilities,
            "{name}: result differs when sent in a batch"
        );
    }
    // The images differ, so a mix-up would show.
    assert_ne!(together[0].probabilities, together[2].probabilities);
    t.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_model_describes_the_loaded_model() {
    let dir = fixture_model("tiny-nhwc-probs");
    let mut t = serve(args(&dir, &["--max-batch-size", "64"]), None).await;
    let info = t
        .client
        .get_model(pb::GetModelRequest::default())
        .await
        .unwrap()
        .into_inner();
    let model = info.model.unwrap();
    assert_eq!(model.name, "tiny-nhwc-probs");
    assert_eq!(model.sha256, sha256_hex(&dir.join("1/model.onnx")));
    assert!(model.clinically_trained);
    assert!(info.warnings.is_empty());
    assert_eq!(info.labels, ["a", "b", "c"]);
    assert_eq!(info.device, "cpu");
    assert_eq!(
        info.max_batch_size, 8,
        "capped at the model's max_batch_size"
    );
    assert_eq!(info.output_kind, "probabilities");
    let input = info.input.unwrap();
    assert_eq!(
        (input.layout.as_str(), input.height, input.width),
        ("NHWC", 32, 32)
    );
    assert_eq!(
        (input.color.as_str(), input.resize_filter.as_str()),
        ("grayscale", "nearest")
    );

    // A trained model's results carry no warning; probabilities pass through.
    let r = t
        .client
        .classify(request(vec![image("x", data("flair_256_a.jpg"))]))
        .await
        .unwrap()
        .into_inner();
    assert!(r.results[0].warnings.is_empty());
    assert_eq!(r.results[0].probabilities.len(), 3);

    let err = t
        .client
        .get_model(pb::GetModelRequest {
            model: "nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    t.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_answers_every_image_and_survives_a_bad_one() {
    // Also exercises a session built without intra-op spin-waiting.
    let mut t = serve(
        args(&fixture_model("tiny"), &["--intra-op-spinning", "false"]),
        None,
    )
    .await;
    let mut messages = Vec::new();
    for (i, name) in [
        "flair_256_a.png",
        "bad/not_an_image.bin",
        "flair_256_b.png",
        "flair_512_a.jpg",
    ]
    .iter()
    .enumerate()
    {
        messages.push(pb::ClassifyStreamRequest {
            image: Some(image(&format!("s{i}"), data(name))),
            ..Default::default()
        });
    }
    let outbound = futures_util::stream::iter(messages);
    let mut inbound = t
        .client
        .classify_stream(outbound)
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    while let Some(msg) = inbound.next().await {
        seen.push(msg.expect("stream message"));
    }
    seen.sort_by_key(|m| m.sequence);
    assert_eq!(
        seen.iter().map(|m| m.sequence).collect::<Vec<_>>(),
        [0, 1, 2, 3]
    );
    for m in &seen {
        assert_eq!(m.image_id, format!("s{}", m.sequence));
        match (&m.outcome, m.sequence) {
            (Some(pb::classify_stream_response::Outcome::Error(e)), 1) => {
                assert_eq!(e.code, Code::InvalidArgument as i32);
                assert!(
                    e.message
                        .starts_with("image 1: data is neither PNG, JPEG nor DICOM"),
                    "{}",
                    e.message
                );
            }
            (Some(pb::classify_stream_response::Outcome::Result(r)), _) => {
                assert_eq!(r.index as u64, m.sequence);
                assert_eq!(r.model.as_ref().unwrap().name, "tiny");
            }
            other => panic!("unexpected outcome {other:?}"),
        }
    }
    t.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reflection_and_metrics_endpoints() {
    let mut t = serve(args(&fixture_model("tiny"), &[]), None).await;
    assert_eq!(health_status(&t.channel, "").await, 1, "overall SERVING");
    assert_eq!(
        health_status(&t.channel, brainai::server::SERVICE_NAME).await,
        1
    );

    // Reflection v1 and v1alpha list the services (what grpcurl and ghz use without proto files).
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut reflection = ServerReflectionClient::new(t.channel.clone());
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = reflection
        .server_reflection_info(futures_util::stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        stream.next().await.unwrap().unwrap().message_response
    else {
        panic!("no service list")
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"brainai.v1.TumorClassifier"), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");

    use tonic_reflection::pb::v1alpha::{
        ServerReflectionRequest as AlphaRequest,
        server_reflection_client::ServerReflectionClient as AlphaClient,
        server_reflection_request::MessageRequest as AlphaMessage,
    };
    let mut alpha = AlphaClient::new(t.channel.clone());
    let req = AlphaRequest {
        host: String::new(),
        message_request: Some(AlphaMessage::FileContainingSymbol(
            "brainai.v1.TumorClassifier".into(),
        )),
    };
    let reply = alpha
        .server_reflection_info(futures_util::stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner()
        .next()
        .await
        .unwrap()
        .unwrap();
    assert!(reply.message_response.is_some());

    t.client
        .classify(request(vec![image("m", data("flair_256_a.png"))]))
        .await
        .unwrap();
    let (code, text) = http_get(t.metrics_addr(), "/metrics").await;
    assert_eq!(code, 200);
    for name in [
        "brainai_requests_total",
        "brainai_request_duration_seconds",
        "brainai_queue_duration_seconds",
        "brainai_preprocess_duration_seconds",
        "brainai_preprocess_cpu_seconds",
        "brainai_inference_duration_seconds",
        "brainai_batch_size",
        "brainai_batch_occupancy_ratio",
        "brainai_batch_runs_total",
        "brainai_model_instances",
        "brainai_queue_depth",
        "brainai_images_total",
        "brainai_dropped_total",
        "brainai_model_info",
    ] {
        assert!(
            text.contains(&format!("# HELP {name} ")),
            "{name} has no help text:\n{text}"
        );
        assert!(text.contains(&format!("\n{name}")), "{name} has no sample");
    }
    assert!(
        metric_value(
            &text,
            "brainai_requests_total",
            &["rpc=\"Classify\"", "code=\"OK\""]
        ) >= 1.0
    );
    assert_eq!(
        metric_value(&text, "brainai_model_instances", &["model=\"tiny\""]),
        1.0,
        "one instance by default: {text}"
    );
    // Every batch is counted once, on the thread that ran it (the tiny model's runs are short
    // enough to run where they are formed once the warm-up's first, cold timings have decayed).
    let tiny = ["model=\"tiny\""];
    let runs = |on: &str| {
        let label = format!("on=\"{on}\"");
        metric_value(&text, "brainai_batch_runs_total", &[tiny[0], &label])
    };
    assert_eq!(
        runs("instance_thread") + runs("dispatcher"),
        metric_value(&text, "brainai_batch_size_count", &tiny),
        "{text}"
    );
    // Decoding a 256² PNG costs CPU, and no more than the wall time it took: the CPU clock is
    // sampled (each thread's first image included), so its sum covers some of the images the
    // wall-time sum covers.
    let cpu = metric_value(&text, "brainai_preprocess_cpu_seconds_sum", &tiny);
    let wall = metric_value(&text, "brainai_preprocess_duration_seconds_sum", &tiny);
    let sampled = metric_value(&text, "brainai_preprocess_cpu_seconds_count", &tiny);
    assert!(
        sampled >= 1.0 && cpu > 0.0 && cpu <= wall * 1.05,
        "CPU {cpu} s over {sampled} sampled images, wall {wall} s"
    );
    assert!(
        text.contains("brainai_model_info{name=\"tiny\",version=\"1\""),
        "{text}"
    );
    assert_eq!(http_get(t.metrics_addr(), "/healthz").await.0, 200);
    assert_eq!(http_get(t.metrics_addr(), "/readyz").await.0, 200);
    t.server.shutdown().await.unwrap();
}
