//! Several models and versions: a model repository served at once (each model its own batcher,
//! batch size and instances), version policies and version requests, hot reload under load
//! (a new version swaps in with no failed call; a broken one leaves the old serving and is
//! reported), unloading a removed model, and per-model metrics and health.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use brainai::pb;
use common::*;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

fn tiny_v2() -> Vec<u8> {
    std::fs::read(repo().join("tests/fixtures/graphs/tiny-v2.onnx")).unwrap()
}

fn version_state(list: &pb::ListModelsResponse, model: &str, version: &str) -> Option<i32> {
    list.models
        .iter()
        .find(|m| m.name == model)?
        .versions
        .iter()
        .find(|v| v.version == version)
        .map(|v| v.state)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_models_are_served_at_once_each_with_its_own_batching() {
    let root = tempfile::tempdir().unwrap();
    copy_model("tiny", root.path(), "pair-a");
    copy_model("tiny-nhwc-probs", root.path(), "pair-b");
    let mut t = serve(
        repository_args(
            root.path(),
            &[
                "--model-override",
                "pair-a:max_batch_size=4",
                "--model-override",
                "pair-a:instances=2",
                "--model-override",
                "pair-b:max_batch_size=2",
                "--max-queue-delay-us",
                "20000",
            ],
        ),
        None,
    )
    .await;

    let list = list_models(&t.channel).await;
    let names: Vec<&str> = list.models.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["pair-a", "pair-b"]);
    assert_eq!(list.default_model, "", "two models and no --default-model");
    for m in &list.models {
        assert_eq!(m.versions.len(), 1);
        assert_eq!(m.versions[0].state, pb::VersionState::Ready as i32);
        assert_eq!(m.version_policy, "latest 1");
    }
    for (model, batch, instances, layout) in [("pair-a", 4, 2, "NCHW"), ("pair-b", 2, 1, "NHWC")] {
        let info = t
            .client
            .get_model(pb::GetModelRequest {
                model: model.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let batching = info.batching.unwrap();
        assert_eq!(
            (batching.max_batch_size, batching.instances),
            (batch, instances)
        );
        assert_eq!(info.input.unwrap().layout, layout);
        assert_eq!(
            health_status(&t.channel, &brainai::server::model_health_name(model)).await,
            ServingStatus::Serving as i32
        );
    }

    // Concurrent calls to both models; each answered by its own model.
    let before_tiny = scrape(
        t.metrics_addr(),
        "brainai_images_total",
        &["model=\"pair-a\""],
    )
    .await;
    let calls = (0..12).map(|i| {
        let mut client = t.client.clone();
        let model = if i % 2 == 0 { "pair-a" } else { "pair-b" };
        async move {
            let r = client
                .classify(request_for(
                    model,
                    "",
                    vec![image(&format!("c{i}"), data("flair_256_b.png"))],
                ))
                .await
                .expect("classify")
                .into_inner();
            (model, r.results[0].clone())
        }
    });
    for (model, r) in bounded("calls", futures_util::future::join_all(calls)).await {
        assert_eq!(r.model.as_ref().unwrap().name, model);
        let (labels, max_batch) = if model == "pair-a" { (2, 4) } else { (3, 2) };
        assert_eq!(r.probabilities.len(), labels);
        assert!(
            r.batch_size <= max_batch,
            "{model} ran a batch of {}",
            r.batch_size
        );
    }
    let text = http_get(t.metrics_addr(), "/metrics").await.1;
    assert_eq!(
        metric_value(&text, "brainai_images_total", &["model=\"pair-a\""]) - before_tiny,
        6.0
    );
    assert!(metric_value(&text, "brainai_images_total", &["model=\"pair-b\""]) >= 6.0);
    for model in ["pair-a", "pair-b"] {
        let label = format!("model=\"{model}\"");
        for family in [
            "brainai_batch_size_count",
            "brainai_inference_duration_seconds_count",
            "brainai_preprocess_duration_seconds_count",
            "brainai_request_duration_seconds_count",
        ] {
            assert!(
                metric_value(&text, family, &[&label]) >= 1.0,
                "{family}{{{label}}}"
            );
        }
        assert!(
            metric_value(
                &text,
                "brainai_requests_total",
                &[&label, "code=\"OK\"", "version=\"1\""]
            ) >= 6.0
        );
    }

    // No model named and two served: the caller must choose.
    let err = t
        .client
        .classify(request(vec![image("x", data("flair_256_b.png"))]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("set `model`"), "{}", err.message());
    t.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_model_and_version_requests() {
    let root = tempfile::tempdir().unwrap();
    let tiny = copy_model("tiny", root.path(), "versioned");
    copy_model("tiny-nhwc-probs", root.path(), "nhwc");
    add_version(&tiny, 2, &tiny_v2());
    // Serve every version of tiny.
    let toml = std::fs::read_to_string(tiny.join("model.toml")).unwrap();
    std::fs::write(
        tiny.join("model.toml"),
        format!("{toml}\n[versions]\npolicy = \"all\"\n"),
    )
    .unwrap();
    let mut t = serve(
        repository_args(root.path(), &["--default-model", "versioned"]),
        None,
    )
    .await;
    let list = list_models(&t.channel).await;
    assert_eq!(list.default_model, "versioned");
    assert_eq!(
        version_state(&list, "versioned", "1"),
        Some(pb::VersionState::Ready as i32)
    );
    assert_eq!(
        version_state(&list, "versioned", "2"),
        Some(pb::VersionState::Ready as i32)
    );

    let img = || vec![image("v", data("flair_256_tumor.png"))];
    let latest = t
        .client
        .classify(request(img()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(latest.results[0].model.as_ref().unwrap().name, "versioned");
    assert_eq!(latest.results[0].model.as_ref().unwrap().version, "2");
    let v1 = t
        .client
        .classify(request_for("versioned", "1", img()))
        .await
        .unwrap()
        .into_inner();
    let v1_model = v1.results[0].model.as_ref().unwrap();
    assert_eq!(v1_model.version, "1");
    assert_eq!(
        v1_model.sha256,
        sha256_hex(&fixture_model("tiny").join("1/model.onnx"))
    );
    assert_ne!(
        v1.results[0].probabilities, latest.results[0].probabilities,
        "versions 1 and 2 have different weights"
    );
    for version in ["7", "one", &"9".repeat(5000)] {
        let err = t
            .client
            .classify(request_for("versioned", version, img()))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{}", err.message());
        assert!(
            err.message().contains("served versions: [1, 2]"),
            "{}",
            err.message()
        );
        assert!(err.message().len() < 200, "echoed input is bounded");
    }
    let info = t
        .client
        .get_model(pb::GetModelRequest {
            model: "versioned".into(),
            version: "1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.model.unwrap().version, "1");
    t.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_version_flag_pins_one_version_of_a_model_dir() {
    let root = tempfile::tempdir().unwrap();
    let tiny = copy_model("tiny", root.path(), "tiny");
    add_version(&tiny, 2, &tiny_v2());
    let t = serve(args(&tiny, &["--model-version", "1"]), None).await;
    let list = list_models(&t.channel).await;
    let versions: Vec<&str> = list.models[0]
        .versions
        .iter()
        .map(|v| v.version.as_str())
        .collect();
    assert_eq!(versions, ["1"]);
    assert_eq!(list.models[0].version_policy, "specific [1]");
    t.server.shutdown().await.unwrap();
}

/// What a load caller saw: the versions that answered, the errors, and the number of calls.
type Seen = (BTreeSet<String>, Vec<String>, usize);

/// Callers that classify in a loop until stopped; each records the versions it saw and any error.
struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Seen>>,
}

impl Load {
    fn start(t: &TestServer, callers: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..callers)
            .map(|i| {
                let (mut client, stop) = (t.client.clone(), stop.clone());
                tokio::spawn(async move {
                    let (mut versions, mut errors, mut calls) = (BTreeSet::new(), Vec::new(), 0);
                    while !stop.load(Ordering::Relaxed) {
                        let req = request(vec![image(&format!("l{i}"), data("flair_256_a.png"))]);
                        match client.classify(req).await {
                            Ok(r) => {
                                versions.insert(
                                    r.into_inner().results[0].model.clone().unwrap().version,
                                );
                            }
                            Err(s) => errors.push(format!("{:?}: {}", s.code(), s.message())),
                        }
                        calls += 1;
                    }
                    (versions, errors, calls)
                })
            })
            .collect();
        Load { stop, tasks }
    }

    /// Stops the callers; returns (versions seen, errors, calls).
    async fn finish(self) -> Seen {
        self.stop.store(true, Ordering::Relaxed);
        let (mut versions, mut errors, mut calls) = (BTreeSet::new(), Vec::new(), 0);
        for task in self.tasks {
            let (v, e, c) = bounded("a load caller", task).await.unwrap();
            versions.extend(v);
            errors.extend(e);
            calls += c;
        }
        (versions, errors, calls)
    }
}

async fn served_version(t: &TestServer) -> String {
    let mut client = t.client.clone();
    client
        .classify(request(vec![image("probe", data("flair_256_a.png"))]))
        .await
        .expect("classify")
        .into_inner()
        .results[0]
        .model
        .clone()
        .unwrap()
        .version
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_reload_under_load_swaps_versions_without_failing_a_call() {
    let root = tempfile::tempdir().unwrap();
    let tiny = copy_model("tiny", root.path(), "reload");
    let t = serve(
        repository_args(
            root.path(),
            &["--max-queue-delay-us", "500", "--instances", "2"],
        ),
        None,
    )
    .await;
    let failures_before = scrape(
        t.metrics_addr(),
        "brainai_model_load_failures_total",
        &["model=\"reload\""],
    )
    .await;
    let load = Load::start(&t, 4);
    until_calls(&t, "v1").await;

    // Version 2 appears: it is loaded, warmed up and swapped in while the callers keep calling.
    add_version(&tiny, 2, &tiny_v2());
    t.server.registry.reload().await.unwrap();
    assert_eq!(served_version(&t).await, "2");
    let list = list_models(&t.channel).await;
    assert_eq!(
        version_state(&list, "reload", "2"),
        Some(pb::VersionState::Ready as i32)
    );
    assert_eq!(
        version_state(&list, "reload", "1"),
        None,
        "latest 1: v1 unloaded"
    );
    // The instance gauge follows: v2's two instances serve, v1's are gone.
    for (version, instances) in [("version=\"2\"", 2.0), ("version=\"1\"", 0.0)] {
        let labels = ["model=\"reload\"", version];
        let scraped = scrape(t.metrics_addr(), "brainai_model_instances", &labels).await;
        assert_eq!(scraped, instances, "{version}");
    }

    // A broken version 3: v2 keeps serving, and the failure is reported and counted.
    add_version(&tiny, 3, b"this is not an ONNX model");
    t.server.registry.reload().await.unwrap();
    assert_eq!(served_version(&t).await, "2");
    let list = list_models(&t.channel).await;
    assert_eq!(
        version_state(&list, "reload", "3"),
        Some(pb::VersionState::Failed as i32)
    );
    let v3 = &list.models[0]
        .versions
        .iter()
        .find(|v| v.version == "3")
        .unwrap();
    assert!(v3.error.contains("model reload version 3"), "{}", v3.error);
    assert_eq!(
        version_state(&list, "reload", "2"),
        Some(pb::VersionState::Ready as i32)
    );
    let failures = scrape(
        t.metrics_addr(),
        "brainai_model_load_failures_total",
        &["model=\"reload\""],
    )
    .await;
    assert_eq!(failures - failures_before, 1.0);
    // Reloading again does not retry the same broken file.
    t.server.registry.reload().await.unwrap();
    let again = scrape(
        t.metrics_addr(),
        "brainai_model_load_failures_total",
        &["model=\"reload\""],
    )
    .await;
    assert_eq!(again, failures);

    let (versions, errors, calls) = load.finish().await;
    assert!(
        errors.is_empty(),
        "{} of {calls} calls failed: {errors:?}",
        errors.len()
    );
    assert!(
        versions.contains("1") && versions.contains("2"),
        "{versions:?}"
    );
    assert!(!versions.contains("3"));
    t.server.shutdown().await.unwrap();
}

/// Waits until the callers have made some calls (the load is really running).
async fn until_calls(t: &TestServer, what: &str) {
    let addr = t.metrics_addr();
    bounded(what, async {
        while scrape(addr, "brainai_images_total", &["model=\"reload\""]).await < 8.0 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_model_toml_keeps_the_loaded_version_and_a_removed_model_is_unloaded() {
    let root = tempfile::tempdir().unwrap();
    let tiny = copy_model("tiny", root.path(), "kept");
    let other = copy_model("tiny-nhwc-probs", root.path(), "removed");
    let mut t = serve(
        repository_args(root.path(), &["--repository-poll-s", "1"]),
        None,
    )
    .await;

    std::fs::write(
        tiny.join("model.toml"),
        "[model]\nclinically_trained = maybe\n",
    )
    .unwrap();
    std::fs::remove_dir_all(&other).unwrap();
    // The poll picks both changes up.
    bounded("the poll to unload the removed model", async {
        while list_models(&t.channel).await.models.len() != 1 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    let list = list_models(&t.channel).await;
    let tiny_status = &list.models[0];
    assert_eq!(tiny_status.name, "kept");
    assert!(
        tiny_status.error.contains("invalid model.toml"),
        "{}",
        tiny_status.error
    );
    assert_eq!(
        tiny_status.versions[0].state,
        pb::VersionState::Ready as i32
    );
    let r = t
        .client
        .classify(request_for(
            "kept",
            "",
            vec![image("x", data("flair_256_a.png"))],
        ))
        .await
        .expect("the loaded version keeps serving");
    assert_eq!(
        r.into_inner().results[0].model.as_ref().unwrap().version,
        "1"
    );
    let err = t
        .client
        .classify(request_for(
            "removed",
            "",
            vec![image("x", data("flair_256_a.png"))],
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    // Its health entry is gone with it; the server as a whole still serves.
    let gone = tonic_health::pb::health_client::HealthClient::new(t.channel.clone())
        .check(tonic_health::pb::HealthCheckRequest {
            service: brainai::server::model_health_name("removed"),
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    assert_eq!(
        health_status(&t.channel, "").await,
        ServingStatus::Serving as i32
    );
    t.server.shutdown().await.unwrap();
}
