//! `brainai classify` (the binary) against the real server: a directory larger than admission
//! takes in one call goes in calls it accepts; a bad file among good ones fails alone; a busy
//! server's refusals are tried again, with a bounded number of tries.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use brainai::backend::ort::{OrtBackend, OrtOptions, find_runtime_library, init_runtime};
use brainai::backend::{Backend, BackendFactory, Device, EngineError};
use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_brainai");

/// Runs `brainai classify --server <server> ARGS…` to its end (the client bounds its own tries
/// and call deadlines; `bounded` guards against a hang).
async fn cli(server: &str, args: &[&str]) -> Output {
    bounded("brainai classify", cli_spawn(server, args))
        .await
        .unwrap()
}

/// Starts `brainai classify` in the background; its output once it ends.
fn cli_spawn(server: &str, args: &[&str]) -> tokio::task::JoinHandle<Output> {
    let mut command = std::process::Command::new(BIN);
    command
        .args(["classify", "--server", server])
        .args(args)
        .env_remove("BRAINAI_TOKEN");
    tokio::task::spawn_blocking(move || command.output().expect("run brainai classify"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `n` copies of a test image in a new directory, named `00.png`, `01.png`, … (input order).
fn copies(n: usize) -> (tempfile::TempDir, Vec<PathBuf>) {
    let dir = tempfile::tempdir().unwrap();
    let png = data("flair_256_a.png");
    let paths: Vec<PathBuf> = (0..n)
        .map(|i| {
            let path = dir.path().join(format!("{i:02}.png"));
            std::fs::write(&path, &png).unwrap();
            path
        })
        .collect();
    (dir, paths)
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// The tiny model on ONNX Runtime, each run taking at least `per_image` per image: a model whose
/// batches take long enough for admission's estimate to refuse a large call (a sleep is only a
/// lower bound, so the refusal never depends on the machine being fast).
fn slow_ort(per_image: Duration) -> BackendFactory {
    struct Slow {
        inner: OrtBackend,
        per_image: Duration,
    }
    impl Backend for Slow {
        fn run(&mut self, input: &[f32], batch: usize) -> Result<Vec<f32>, EngineError> {
            std::thread::sleep(self.per_image * batch as u32);
            self.inner.run(input, batch)
        }
    }
    let library = find_runtime_library(None).expect("make setup installs onnxruntime");
    init_runtime(&library).expect("ONNX Runtime loads");
    Arc::new(move |spec, batch_sizes, _instance| {
        let inner = OrtBackend::open(
            spec,
            OrtOptions {
                device: Device::Cpu,
                intra_op_threads: 1,
                intra_op_spinning: false,
                batch_sizes,
                host_memory: Default::default(),
            },
        )?;
        Ok(Box::new(Slow { inner, per_image }) as Box<dyn Backend>)
    })
}

/// Finding 27: 32 images of a slow model are more work than admission takes in one call (the old
/// client sent them as one), so the client sends calls of the model's batch size, a few in
/// flight, and every file is classified, in input order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_admission_would_refuse_in_one_call_is_classified_in_calls_it_accepts() {
    // Batches of 4 take ≥ 100 ms; admission refuses what would take over 500 ms.
    let mut t = serve(
        args(
            &fixture_model("tiny"),
            &["--max-batch-size", "4", "--max-queue-wait-ms", "500"],
        ),
        Some(slow_ort(Duration::from_millis(25))),
    )
    .await;
    let (dir, files) = copies(32);

    // The refusal the old client got: all 32 in one call are ≥ 800 ms of work.
    let images = files
        .iter()
        .map(|p| image(&path(p), std::fs::read(p).unwrap()))
        .collect();
    let refused = bounded("one large call", t.client.classify(request(images)))
        .await
        .expect_err("admission refuses one call of 32 images");
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );

    let out = cli(&t.grpc_url(), &["--json", &path(dir.path())]).await;
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let doc: serde_json::Value = serde_json::from_str(&stdout).expect("one JSON document");
    let results = doc["results"].as_array().unwrap();
    let names: Vec<&str> = results
        .iter()
        .map(|r| r["file"].as_str().unwrap())
        .collect();
    let want: Vec<String> = files.iter().map(|p| path(p)).collect();
    assert_eq!(names, want, "every file, in input order");
    for r in results {
        let batch = r["batch_size"].as_u64().unwrap();
        assert!((1..=4).contains(&batch), "batch of {batch}");
    }
    assert_eq!(doc["errors"], serde_json::json!([]));
    assert!(doc.get("stopped").is_none());
    t.server.shutdown().await.unwrap();
}

/// Finding 27: a file the server refuses, or that cannot be read, fails alone, named on its own
/// line; the rest are classified; the exit status says that some failed. The server takes fewer
/// images per call than the client's default, and says so: the client keeps to its limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_file_among_good_ones_fails_alone() {
    let t = serve(
        args(&fixture_model("tiny"), &["--max-images-per-request", "3"]),
        None,
    )
    .await;
    let (dir, _) = copies(7);
    let bad = |name: &str, from: &str| {
        std::fs::copy(
            repo().join("tests/data/bad").join(from),
            dir.path().join(name),
        )
        .unwrap();
    };
    bad("02_not_an_image.png", "not_an_image.bin");
    bad("04_huge.png", "huge_dimensions.png");
    // A file that is listed but cannot be read: a dangling link.
    std::os::unix::fs::symlink(dir.path().join("nowhere"), dir.path().join("05_gone.png")).unwrap();

    let out = cli(&t.grpc_url(), &[&path(dir.path())]).await;
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    let classified: Vec<&str> = stdout
        .lines()
        .map(|l| l.split('\t').next().unwrap())
        .collect();
    let want: Vec<String> = (0..7)
        .map(|i| path(&dir.path().join(format!("{i:02}.png"))))
        .collect();
    assert_eq!(
        classified, want,
        "the good files, in input order:\n{stdout}\n{stderr}"
    );
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("error: "))
        .collect();
    let named = |name: &str| format!("error: {}: ", path(&dir.path().join(name)));
    assert_eq!(errors.len(), 4, "{stderr}");
    assert!(
        errors[0].starts_with(&named("02_not_an_image.png"))
            && errors[0].contains("neither PNG, JPEG nor DICOM"),
        "{stderr}"
    );
    assert!(
        errors[1].starts_with(&named("04_huge.png")) && errors[1].contains("20000"),
        "{stderr}"
    );
    assert!(
        errors[2].starts_with(&named("05_gone.png")) && errors[2].contains("cannot read"),
        "{stderr}"
    );
    assert_eq!(errors[3], "error: 3 of 10 files could not be classified");

    // The same with --json: the results and the errors in one document.
    let out = cli(&t.grpc_url(), &["--json", &path(dir.path())]).await;
    assert_eq!(out.status.code(), Some(1));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON document");
    assert_eq!(doc["results"].as_array().unwrap().len(), 7);
    let failed: Vec<&str> = doc["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["file"].as_str().unwrap())
        .collect();
    assert_eq!(
        failed,
        ["02_not_an_image.png", "04_huge.png", "05_gone.png"].map(|n| path(&dir.path().join(n)))
    );
    t.server.shutdown().await.unwrap();
}

/// A server that takes 2 images per call and queues 2, whose one instance is held: of three
/// calls of 2 in flight, one runs, one waits, the third is refused RESOURCE_EXHAUSTED.
async fn held_server() -> (TestServer, Gated) {
    serve_gated(
        "tiny",
        &[
            "--max-batch-size",
            "2",
            "--max-images-per-request",
            "2",
            "--queue-capacity",
            "2",
            "--stat-queue-capacity",
            "2",
            "--instances",
            "1",
        ],
    )
    .await
}

async fn refused(t: &TestServer) -> f64 {
    scrape(
        t.metrics_addr(),
        "brainai_requests_total",
        &["rpc=\"Classify\"", "code=\"RESOURCE_EXHAUSTED\""],
    )
    .await
}

/// Finding 27: RESOURCE_EXHAUSTED is tried again after a backoff, until the server has room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_server_is_tried_again_until_it_has_room() {
    let (t, gated) = held_server().await;
    let (dir, files) = copies(8);
    let run = cli_spawn(
        &t.grpc_url(),
        &["--in-flight", "3", "--max-tries", "20", &path(dir.path())],
    );
    bounded("a call refused as busy", async {
        while refused(&t).await < 1.0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    gated.gate.open();
    let out = bounded("brainai classify", run).await.unwrap();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let classified: Vec<&str> = stdout
        .lines()
        .map(|l| l.split('\t').next().unwrap())
        .collect();
    assert_eq!(
        classified,
        files.iter().map(|p| path(p)).collect::<Vec<_>>()
    );
    assert!(refused(&t).await >= 1.0);
    t.server.shutdown().await.unwrap();
}

/// Finding 27: the tries are bounded; then the run stops with the server's reason and what was
/// left undone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_stays_busy_is_given_up_on_clearly() {
    let (t, gated) = held_server().await;
    let (dir, _) = copies(8);
    let out = cli(
        &t.grpc_url(),
        &[
            "--json",
            "--in-flight",
            "3",
            "--max-tries",
            "2",
            &path(dir.path()),
        ],
    )
    .await;
    gated.gate.open();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    let gave_up = "gave up after 2 tries, the server still answered ResourceExhausted: ";
    assert!(
        stderr.contains(gave_up) && stderr.contains("of 8 files not classified"),
        "{stderr}"
    );
    // The JSON document is whole, and says why it stopped.
    let doc: serde_json::Value = serde_json::from_str(&stdout).expect("one JSON document");
    assert!(
        doc["stopped"].as_str().unwrap().contains(gave_up),
        "{stdout}"
    );
    assert!(refused(&t).await >= 2.0);
    t.server.shutdown().await.unwrap();
}

/// Finding 27: a call whose images would decode to more than one request may is sent again in
/// halves, down to single files, instead of failing every file of the call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_over_the_decode_budget_are_split() {
    // 512×512 RGB: 768 KiB decoded each; two are over 1 MiB.
    let t = serve(
        args(&fixture_model("tiny"), &["--max-request-decode-mib", "1"]),
        None,
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let rgb = data("flair_512_rgb.png");
    for i in 0..4 {
        std::fs::write(dir.path().join(format!("{i}.png")), &rgb).unwrap();
    }
    let out = cli(&t.grpc_url(), &[&path(dir.path())]).await;
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert_eq!(stdout.lines().count(), 4, "{stdout}");
    t.server.shutdown().await.unwrap();
}

/// A caller allowed to classify but not to read metadata (`GetModel` refused): the client sends
/// calls of a fallback size, says so, and classifies every file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_without_the_read_scope_still_classifies_every_file() {
    let dir = tempfile::tempdir().unwrap();
    let callers = dir.path().join("callers.toml");
    let token = "cli-test-infer-only-0123456789";
    std::fs::write(
        &callers,
        format!("[[caller]]\nname = \"router\"\ntoken = \"{token}\"\nscopes = [\"infer\"]\n"),
    )
    .unwrap();
    let t = serve(
        args(&fixture_model("tiny"), &["--auth-callers", &path(&callers)]),
        None,
    )
    .await;
    let (files_dir, files) = copies(10);
    let out = cli(&t.grpc_url(), &["--token", token, &path(files_dir.path())]).await;
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert_eq!(stdout.lines().count(), files.len(), "{stdout}");
    assert!(
        stderr.contains("note: the model's batch size is unknown (GetModel: PermissionDenied)"),
        "{stderr}"
    );
    assert!(
        !format!("{stdout}{stderr}").contains(token),
        "the token leaked"
    );
    t.server.shutdown().await.unwrap();
}
