//! Server lifecycle against the real server: warm-up before ready, deadlines, queue full, drain on
//! shutdown, refusing a model that disagrees with its model.toml. A gated wrapper around the real
//! ONNX Runtime backend lets the tests hold an instance busy without timing guesses.

mod common;

use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use brainai::engine::{self, Backend, BackendFactory, EngineError, OrtBackend, OrtOptions};
use brainai::model::ModelSpec;
use brainai::pb;
use common::*;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

/// Records batch sizes and, once `gated` is set, waits for a token before each run.
struct Gated {
    inner: OrtBackend,
    sizes: Arc<Mutex<Vec<usize>>>,
    gate: Arc<Mutex<mpsc::Receiver<()>>>,
    gated: Arc<std::sync::atomic::AtomicBool>,
}

impl Backend for Gated {
    fn run(&mut self, input: &[f32], batch: usize) -> Result<Vec<f32>, EngineError> {
        self.sizes.lock().unwrap().push(batch);
        if self.gated.load(std::sync::atomic::Ordering::SeqCst) {
            let _ = self.gate.lock().unwrap().recv();
        }
        self.inner.run(input, batch)
    }
}

struct Harness {
    factory: BackendFactory,
    sizes: Arc<Mutex<Vec<usize>>>,
    open: mpsc::Sender<()>,
    gated: Arc<std::sync::atomic::AtomicBool>,
    /// Released to let the factory return (holds instance start-up).
    release_start: mpsc::Sender<()>,
}

/// A factory of real tiny-model ORT backends whose start-up and runs the test controls.
fn harness(model: &str, hold_start: bool) -> Harness {
    let library = engine::find_runtime_library(None).expect("make setup installs onnxruntime");
    engine::init_runtime(&library).expect("ONNX Runtime loads");
    let spec = ModelSpec::load(&fixture_model(model), None).unwrap();
    let (open, gate) = mpsc::channel();
    let gate = Arc::new(Mutex::new(gate));
    let (release_start, start_gate) = mpsc::channel::<()>();
    let start_gate = Arc::new(Mutex::new(start_gate));
    let sizes = Arc::new(Mutex::new(Vec::new()));
    let gated = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (s, g, gd) = (sizes.clone(), gate.clone(), gated.clone());
    let factory: BackendFactory = Arc::new(move |_| {
        if hold_start {
            let _ = start_gate.lock().unwrap().recv();
        }
        let inner = OrtBackend::open(
            &spec,
            OrtOptions {
                device: engine::Device::Cpu,
                intra_op_threads: 1,
                intra_op_spinning: true,
                max_batch_size: spec.max_batch_size,
            },
        )?;
        Ok(Box::new(Gated {
            inner,
            sizes: s.clone(),
            gate: g.clone(),
            gated: gd.clone(),
        }) as Box<dyn Backend>)
    });
    Harness {
        factory,
        sizes,
        open,
        gated,
        release_start,
    }
}

/// Waits until `cond` holds, yielding to the runtime in between (bounded by PATIENCE).
async fn until(what: &str, cond: impl Fn() -> bool) {
    let wait = async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    };
    tokio::time::timeout(PATIENCE, wait)
        .await
        .unwrap_or_else(|_| panic!("gave up waiting for {what}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_not_serving_until_every_batch_size_is_warm() {
    let h = harness("tiny", true);
    let server = brainai::server::start(
        &args(&fixture_model("tiny"), &["--max-batch-size", "8"]),
        Some(h.factory),
    )
    .await
    .unwrap();
    let channel = connect(server.grpc_addr).await;
    assert_eq!(
        health_status(&channel, "").await,
        ServingStatus::NotServing as i32
    );
    assert_eq!(
        health_status(&channel, brainai::server::SERVICE_NAME).await,
        ServingStatus::NotServing as i32
    );
    assert_eq!(http_get(server.metrics_addr, "/readyz").await.0, 503);
    assert_eq!(http_get(server.metrics_addr, "/healthz").await.0, 200);
    let mut client = pb::tumor_classifier_client::TumorClassifierClient::new(channel.clone());
    let err = client
        .classify(request(vec![image("early", data("flair_256_a.png"))]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().contains("warming up"), "{}", err.message());
    assert!(h.sizes.lock().unwrap().is_empty());

    h.release_start.send(()).unwrap();
    wait_for_health(&channel, ServingStatus::Serving).await;
    assert_eq!(
        *h.sizes.lock().unwrap(),
        [1, 2, 4, 8],
        "warm-up ran every power-of-two size"
    );
    assert_eq!(http_get(server.metrics_addr, "/readyz").await.0, 200);
    client
        .classify(request(vec![image("late", data("flair_256_a.png"))]))
        .await
        .expect("serves once warm");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_deadline_is_answered_and_the_image_never_runs() {
    let h = harness("tiny", false);
    let t = serve(
        args(
            &fixture_model("tiny"),
            &["--max-batch-size", "4", "--max-queue-delay-us", "0"],
        ),
        Some(h.factory),
    )
    .await;
    h.sizes.lock().unwrap().clear();
    h.gated.store(true, std::sync::atomic::Ordering::SeqCst);

    // Call A occupies the only instance (held at the gate).
    let mut a_client = t.client.clone();
    let a = tokio::spawn(async move {
        a_client
            .classify(request(vec![image("a", data("flair_256_a.png"))]))
            .await
    });
    until("call A to reach the model", || {
        h.sizes.lock().unwrap().len() == 1
    })
    .await;

    // Call B waits behind it with a 300 ms deadline.
    let mut b_req = tonic::Request::new(request(vec![image("b", data("flair_256_b.png"))]));
    b_req.set_timeout(Duration::from_millis(300));
    let mut b_client = t.client.clone();
    let err = b_client.classify(b_req).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{}", err.message());

    h.open.send(()).unwrap();
    a.await.unwrap().expect("call A completes");
    // The next call runs alone: B was dropped, not run.
    h.open.send(()).unwrap();
    let mut c_client = t.client.clone();
    let c = c_client
        .classify(request(vec![image("c", data("flair_256_c.png"))]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(c.results[0].batch_size, 1);
    assert_eq!(
        *h.sizes.lock().unwrap(),
        [1, 1],
        "B's image must never reach the model"
    );
    let (_, metrics) = http_get(t.metrics_addr(), "/metrics").await;
    assert!(
        metric_value(&metrics, "brainai_dropped_total", &["reason=\"deadline\""]) >= 1.0,
        "{metrics}"
    );
    t.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_answers_resource_exhausted_at_once() {
    let h = harness("tiny", false);
    let t = serve(
        args(
            &fixture_model("tiny"),
            &[
                "--max-batch-size",
                "2",
                "--max-queue-delay-us",
                "0",
                "--queue-capacity",
                "4",
                "--max-images-per-request",
                "4",
            ],
        ),
        Some(h.factory),
    )
    .await;
    h.sizes.lock().unwrap().clear();
    h.gated.store(true, std::sync::atomic::Ordering::SeqCst);
    let img = || image("q", data("flair_256_a.png"));

    // Two images run (held at the gate); four more fill the queue.
    let mut c1 = t.client.clone();
    let running = tokio::spawn(async move { c1.classify(request(vec![img(), img()])).await });
    until("the first batch to reach the model", || {
        h.sizes.lock().unwrap().len() == 1
    })
    .await;
    let mut c2 = t.client.clone();
    let queued =
        tokio::spawn(async move { c2.classify(request(vec![img(), img(), img(), img()])).await });
    let shared = t.server.shared.clone();
    until("four images queued", || {
        shared.batcher.get().is_some_and(|b| b.queue_depth() == 4)
    })
    .await;

    let mut c3 = t.client.clone();
    let err = c3.classify(request(vec![img()])).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(
        err.message()
            .contains("queue is full: 4 images waiting, capacity 4"),
        "{}",
        err.message()
    );

    for _ in 0..3 {
        h.open.send(()).unwrap();
    }
    assert_eq!(
        running.await.unwrap().unwrap().into_inner().results.len(),
        2
    );
    assert_eq!(queued.await.unwrap().unwrap().into_inner().results.len(), 4);
    let (_, metrics) = http_get(t.metrics_addr(), "/metrics").await;
    assert!(
        metric_value(
            &metrics,
            "brainai_dropped_total",
            &["reason=\"queue_full\""]
        ) >= 1.0
    );
    t.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_refuses_new_calls_and_finishes_queued_work() {
    let h = harness("tiny", false);
    let mut t = serve(
        args(
            &fixture_model("tiny"),
            &["--max-batch-size", "4", "--max-queue-delay-us", "0"],
        ),
        Some(h.factory),
    )
    .await;
    h.sizes.lock().unwrap().clear();
    h.gated.store(true, std::sync::atomic::Ordering::SeqCst);

    let mut c1 = t.client.clone();
    let in_flight = tokio::spawn(async move {
        c1.classify(request(vec![image("inflight", data("flair_256_a.png"))]))
            .await
    });
    until("the call to reach the model", || {
        h.sizes.lock().unwrap().len() == 1
    })
    .await;

    t.server.begin_shutdown();
    wait_for_health(&t.channel, ServingStatus::NotServing).await;
    let err = t
        .client
        .classify(request(vec![image("late", data("flair_256_a.png"))]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().contains("shutting down"), "{}", err.message());
    assert_eq!(http_get(t.metrics_addr(), "/readyz").await.0, 503);

    h.open.send(()).unwrap();
    let done = in_flight
        .await
        .unwrap()
        .expect("in-flight call completes during drain");
    assert_eq!(done.into_inner().results[0].image_id, "inflight");
    tokio::time::timeout(PATIENCE, t.server.wait())
        .await
        .expect("server stops after draining")
        .expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_that_disagrees_with_its_config_is_refused() {
    let server = brainai::server::start(&args(&fixture_model("tiny-mismatch"), &[]), None)
        .await
        .unwrap();
    let err = tokio::time::timeout(PATIENCE, server.wait())
        .await
        .expect("start-up fails promptly")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("does not match its model.toml")
            && err.contains("name = \"pixels\"")
            && err.contains("input"),
        "{err}"
    );
}

#[test]
fn missing_model_directory_is_a_clear_error() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let err = rt
        .block_on(brainai::server::start(
            &args(std::path::Path::new("/nonexistent/model"), &[]),
            None,
        ))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("/nonexistent/model/model.toml"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_instances_run_batches_at_the_same_time() {
    let h = harness("tiny", false);
    let t = serve(
        args(
            &fixture_model("tiny"),
            &[
                "--instances",
                "2",
                "--max-batch-size",
                "1",
                "--max-queue-delay-us",
                "0",
            ],
        ),
        Some(h.factory),
    )
    .await;
    assert_eq!(
        h.sizes.lock().unwrap().len(),
        2,
        "each instance warmed up batch size 1"
    );
    h.sizes.lock().unwrap().clear();
    h.gated.store(true, std::sync::atomic::Ordering::SeqCst);
    let calls: Vec<_> = (0..2)
        .map(|i| {
            let mut c = t.client.clone();
            tokio::spawn(async move {
                c.classify(request(vec![image(
                    &format!("i{i}"),
                    data("flair_256_a.png"),
                )]))
                .await
            })
        })
        .collect();
    // Both calls reach the model while neither has finished: two instances are running.
    until("both instances to be running", || {
        h.sizes.lock().unwrap().len() == 2
    })
    .await;
    h.open.send(()).unwrap();
    h.open.send(()).unwrap();
    for c in calls {
        assert_eq!(
            c.await.unwrap().unwrap().into_inner().results[0].batch_size,
            1
        );
    }
    t.server.shutdown().await.unwrap();
}
