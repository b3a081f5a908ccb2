//! The DICOM node (issue 25) against real DICOM tools: dcmtk's `echoscu` and `storescu` as the
//! PACS, `storescp` as the destination the results go to, pydicom to read them back and
//! dicom3tools' `dciodvfy` to validate them. The study is a pydicom phantom
//! (`tests/dicom/make_study.py`: FLAIR, T1c and T2 series of a sphere); the routes send the FLAIR
//! series to the `tiny` classifier and the study to the `seg-study` segmentation model.
//!
//! dcmtk runs with `TCP_NODELAY=1`: without it, its small writes wait for delayed ACKs (about
//! 40 ms per instance), which only makes the tests slower.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::*;
use serde_json::json;

const STUDY: &str = "1.2.826.0.1.3680043.10.1087.25";
const MR_IMAGE_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.4";
const COMPREHENSIVE_SR: &str = "1.2.840.10008.5.1.4.1.1.88.33";
const SEGMENTATION: &str = "1.2.840.10008.5.1.4.1.1.66.4";
/// FLAIR, T1c, T2: 16 slices each.
const SLICES: usize = 16;

fn series(uid: &str, description: &str, study: &str) -> serde_json::Value {
    json!({"uid": uid, "description": description, "rows": 64, "columns": 64,
           "spacing": [1.0, 1.0], "origin": [-32.0, -32.0, 0.0], "slices": SLICES, "step": 3.0,
           "study_uid": study})
}

/// Writes a phantom study (or studies: each series names its study) into `dir`.
fn make_study(dir: &Path, series: Vec<serde_json::Value>) -> Vec<PathBuf> {
    let spec = json!({
        "study_uid": STUDY, "patient_id": "PHANTOM-25", "frame_of_reference_uid": format!("{STUDY}.9"),
        "sphere": {"center": [0.3, -0.4, 23.6], "radius": 18.0, "inside": 900, "outside": 100},
        "series": series,
    });
    write_study(dir, &spec)
}

fn full_study(dir: &Path) -> Vec<PathBuf> {
    make_study(
        dir,
        vec![
            series(&format!("{STUDY}.1"), "AX FLAIR", STUDY),
            series(&format!("{STUDY}.2"), "AX T1 POST GD", STUDY),
            series(&format!("{STUDY}.3"), "AX T2", STUDY),
        ],
    )
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A dcmtk `storescp` destination (AE ARCHIVE), every object under its own file name (`-uf`), so
/// a result sent twice shows as two files.
struct Archive {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Archive {
    async fn start_on(port: u16) -> Archive {
        Archive::start_with(port, &[]).await
    }

    /// With extra `storescp` options (TLS).
    async fn start_with(port: u16, options: &[String]) -> Archive {
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new(tool("storescp", "dcmtk"))
            .args(options)
            .args(["-aet", "ARCHIVE", "-uf", "-od"])
            .arg(dir.path())
            .arg(port.to_string())
            .env("TCP_NODELAY", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("storescp starts");
        bounded("storescp listening", async {
            while tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_err()
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        Archive { child, port, dir }
    }

    async fn start() -> Archive {
        Archive::start_on(free_port()).await
    }

    fn files(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = files_under(self.dir.path())
            .into_iter()
            .filter(|p| !p.to_string_lossy().ends_with(".tmp"))
            .collect();
        files.sort();
        files
    }

    /// Waits (bounded) for `n` objects.
    async fn wait_for(&self, n: usize) -> Vec<PathBuf> {
        bounded("results at the archive", async {
            loop {
                let files = self.files();
                if files.len() >= n {
                    // storescp writes a file, then closes it: give the last one a moment.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    return self.files();
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
    }
}

impl Drop for Archive {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A node serving `tiny` (FLAIR classification) and `seg-study` (segmentation), its spool and
/// outbox under `state`, delivering to `archive_port`.
fn node_flags(state: &Path, archive_port: u16, extra: &[&str]) -> (tempfile::TempDir, Vec<String>) {
    let repository = tempfile::tempdir().unwrap();
    copy_model("tiny", repository.path(), "tiny");
    copy_model("seg-study", repository.path(), "seg-study");
    // The same classifier under another name: routes can be told apart by the model in the SR.
    copy_model("tiny", repository.path(), "tiny-stat");
    let defaults: Vec<(&str, String)> = vec![
        (
            "--model-repository",
            repository.path().display().to_string(),
        ),
        ("--default-model", "tiny".into()),
        ("--dicom-addr", "127.0.0.1:0".into()),
        (
            "--dicom-destination",
            format!("ARCHIVE@127.0.0.1:{archive_port}"),
        ),
        (
            "--dicom-route",
            "sequence=FLAIR,model=tiny;model=seg-study".into(),
        ),
        ("--dicom-trigger", "association".into()),
        ("--dicom-retry-max-s", "1".into()),
        (
            "--dicom-spool-dir",
            state.join("spool").display().to_string(),
        ),
        (
            "--dicom-outbox-dir",
            state.join("outbox").display().to_string(),
        ),
        (
            "--audit-log",
            state.join("audit.jsonl").display().to_string(),
        ),
    ];
    // A flag in `extra` replaces its default.
    let mut flags: Vec<String> = Vec::new();
    for (flag, value) in defaults {
        if !extra.contains(&flag) {
            flags.extend([flag.to_string(), value]);
        }
    }
    flags.extend(extra.iter().map(|s| s.to_string()));
    (repository, flags)
}

/// The metrics are the process's (under `cargo test`, one process runs every test of this file):
/// one test at a time, each holding this from its first line (its ports too: no test takes a port
/// another one just let go), and counters compared with their value before the test's own
/// actions.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Node {
    server: brainai::server::RunningServer,
    _repository: tempfile::TempDir,
    state: PathBuf,
}

impl Node {
    async fn start(state: &Path, archive_port: u16, extra: &[&str]) -> Node {
        let (repository, flags) = node_flags(state, archive_port, extra);
        let refs: Vec<&str> = flags.iter().map(String::as_str).collect();
        // `repository_args` adds the model source; the flags above name it already.
        let mut refs = refs[2..].to_vec();
        // Health through the plaintext health-only port: the gRPC port may be TLS.
        refs.extend(["--health-addr", "127.0.0.1:0"]);
        let args = repository_args(repository.path(), &refs);
        let server = brainai::server::start(&args, None)
            .await
            .expect("server starts");
        let health = connect(server.health_addr.expect("health-only port")).await;
        wait_for_health(
            &health,
            tonic_health::pb::health_check_response::ServingStatus::Serving,
        )
        .await;
        Node {
            server,
            _repository: repository,
            state: state.to_path_buf(),
        }
    }

    fn addr(&self) -> SocketAddr {
        self.server.dicom_addr.expect("the DICOM listener is on")
    }

    async fn metric(&self, name: &str, labels: &[&str]) -> f64 {
        scrape(self.server.metrics_addr, name, labels).await
    }

    /// Every metric now, for [`Node::delta`].
    async fn snapshot(&self) -> String {
        http_get(self.server.metrics_addr, "/metrics").await.1
    }

    /// How much a counter grew since `base`.
    async fn delta(&self, base: &str, name: &str, labels: &[&str]) -> f64 {
        self.metric(name, labels).await - metric_value(base, name, labels)
    }

    fn audit(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.state.join("audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

/// Runs a dcmtk tool (off the runtime) and returns its output.
async fn dcmtk(tool_name: &str, args: Vec<String>) -> Output {
    let program = tool(tool_name, "dcmtk");
    tokio::task::spawn_blocking(move || {
        Command::new(program)
            .args(args)
            .env("TCP_NODELAY", "1")
            .output()
            .expect("the dcmtk tool runs")
    })
    .await
    .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `storescu` from calling AE `calling` to called AE `called` at `addr`, sending `files`.
async fn storescu(
    addr: SocketAddr,
    calling: &str,
    called: &str,
    files: &[PathBuf],
    extra: &[&str],
) -> Output {
    let mut args: Vec<String> = vec!["-aet".into(), calling.into(), "-aec".into(), called.into()];
    args.extend(extra.iter().map(|s| s.to_string()));
    args.push(addr.ip().to_string());
    args.push(addr.port().to_string());
    args.extend(files.iter().map(|f| f.display().to_string()));
    dcmtk("storescu", args).await
}

async fn echoscu(addr: SocketAddr, calling: &str, called: &str) -> Output {
    dcmtk(
        "echoscu",
        vec![
            "-aet".into(),
            calling.into(),
            "-aec".into(),
            called.into(),
            addr.ip().to_string(),
            addr.port().to_string(),
        ],
    )
    .await
}

/// echoscu was refused with A-ASSOCIATE-RJ transient, local limit exceeded.
fn assert_rejected_transient(out: &Output) {
    let said = text(out);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("Rejected Transient"), "{said}");
    assert!(said.contains("Local Limit Exceeded"), "{said}");
}

/// The results, read back with pydicom.
fn read_results(files: &[PathBuf]) -> Vec<serde_json::Value> {
    let out = Command::new(python())
        .arg(repo().join("tests/dicom/read_results.py"))
        .args(files)
        .output()
        .expect("read_results.py runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Files left in a directory tree (the spool's jobs, the outbox's results).
fn left(dir: &Path) -> Vec<PathBuf> {
    files_under(dir)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "dcm" || e == "part"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_study_from_storescu_comes_back_to_storescp_as_an_sr_a_seg_and_a_measurement_report() {
    let _serial = SERIAL.lock().await;
    let data = tempfile::tempdir().unwrap();
    let files = full_study(data.path());
    assert_eq!(files.len(), 3 * SLICES);
    let archive = Archive::start().await;
    let state = tempfile::tempdir().unwrap();
    let node = Node::start(state.path(), archive.port, &[]).await;
    let base = node.snapshot().await;

    let echo = echoscu(node.addr(), "PACS", "BRAINAI").await;
    assert!(echo.status.success(), "C-ECHO: {}", text(&echo));
    let sent = storescu(node.addr(), "PACS", "BRAINAI", &files, &[]).await;
    assert!(sent.status.success(), "C-STORE: {}", text(&sent));

    let results = archive.wait_for(3).await;
    assert_eq!(results.len(), 3, "{results:?}");
    let read = read_results(&results);
    let sent_uids: std::collections::BTreeSet<String> = read_results(&files)
        .iter()
        .map(|r| r["sop_instance"].as_str().unwrap().to_string())
        .collect();
    let by_class = |class: &str| -> Vec<&serde_json::Value> {
        read.iter().filter(|r| r["sop_class"] == class).collect()
    };
    let srs = by_class(COMPREHENSIVE_SR);
    let segs = by_class(SEGMENTATION);
    assert_eq!((srs.len(), segs.len()), (2, 1), "{read:#?}");
    for r in &read {
        assert_eq!(r["study"], STUDY, "filed under the sent study: {r}");
        assert_eq!(r["patient_id"], "PHANTOM-25", "with the sent patient: {r}");
        let refs: Vec<String> = r["referenced"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        assert!(!refs.is_empty(), "references its sources: {r}");
        // The measurement report also references the SEG it measures.
        let seg_uid = segs[0]["sop_instance"].as_str().unwrap();
        for uid in &refs {
            assert!(
                sent_uids.contains(uid) || uid == seg_uid,
                "references only what was sent (or the SEG): {uid} in {r}"
            );
        }
    }
    // The classification SR references the FLAIR series' instances.
    let classification = srs
        .iter()
        .find(|r| {
            r["referenced"]
                .as_array()
                .unwrap()
                .iter()
                .all(|u| u.as_str().unwrap().starts_with(&format!("{STUDY}.1.")))
        })
        .expect("an SR referencing only the FLAIR series");
    assert!(
        classification["series_description"]
            .as_str()
            .unwrap()
            .starts_with("NOT FOR DIAGNOSTIC USE"),
        "the untrained model is labelled: {classification}"
    );
    for r in &read {
        assert!(
            r["series_description"]
                .as_str()
                .unwrap()
                .contains("NOT FOR DIAGNOSTIC USE"),
            "every result labels the untrained model: {r}"
        );
    }
    for r in &read {
        let path = Path::new(r["file"].as_str().unwrap());
        let iod = if r["sop_class"] == SEGMENTATION {
            "Segmentation"
        } else {
            "ComprehensiveSR"
        };
        dciodvfy(path, iod);
    }

    // Delivered: nothing left in the spool or the outbox; the metrics say what happened.
    until("spool and outbox empty", || {
        left(&state.path().join("spool")).is_empty()
            && left(&state.path().join("outbox")).is_empty()
    })
    .await;
    assert_eq!(
        node.delta(
            &base,
            "brainai_dicom_instances_total",
            &["outcome=\"stored\""]
        )
        .await,
        (3 * SLICES) as f64
    );
    assert_eq!(
        node.delta(&base, "brainai_dicom_echoes_total", &[]).await,
        1.0
    );
    assert_eq!(
        node.delta(
            &base,
            "brainai_dicom_deliveries_total",
            &["outcome=\"delivered\""]
        )
        .await,
        3.0
    );
    assert_eq!(
        node.delta(
            &base,
            "brainai_dicom_series_processed_total",
            &["task=\"classification\"", "outcome=\"ok\""]
        )
        .await,
        1.0
    );
    assert_eq!(
        node.delta(
            &base,
            "brainai_dicom_series_processed_total",
            &["task=\"segmentation\"", "outcome=\"ok\""]
        )
        .await,
        1.0
    );
    assert_eq!(node.metric("brainai_dicom_outbox_depth", &[]).await, 0.0);
    assert_eq!(node.metric("brainai_dicom_spool_bytes", &[]).await, 0.0);

    // The audit trail: the associations, the two pipeline calls (with the model), the delivery;
    // UIDs, never patient data.
    let audit = node.audit();
    let methods: Vec<&str> = audit
        .iter()
        .map(|r| r["method"].as_str().unwrap())
        .collect();
    for m in [
        "DICOM association",
        "DICOM series classification",
        "DICOM study segmentation",
        "DICOM delivery to ARCHIVE",
    ] {
        assert!(methods.contains(&m), "{m} in {methods:?}");
    }
    let store = audit
        .iter()
        .find(|r| r["method"] == "DICOM association" && r["images"] == 3 * SLICES)
        .expect("the storing association's record");
    assert_eq!(
        (
            store["caller"].as_str(),
            store["front_end"].as_str(),
            store["outcome"].as_str()
        ),
        (Some("PACS"), Some("dicom"), Some("released"))
    );
    let classify = audit
        .iter()
        .find(|r| r["method"] == "DICOM series classification")
        .unwrap();
    assert_eq!(classify["model"]["name"], "tiny");
    assert_eq!(classify["outcome"], "OK");
    let raw = std::fs::read_to_string(state.path().join("audit.jsonl")).unwrap();
    assert!(
        !raw.contains("PHANTOM-25"),
        "no patient data in the audit trail"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn who_may_associate_is_decided_by_called_and_calling_ae_title_and_address() {
    let _serial = SERIAL.lock().await;
    let state = tempfile::tempdir().unwrap();
    let node = Node::start(
        state.path(),
        free_port(),
        &[
            "--dicom-allow",
            "PACS@127.0.0.0/8;ROUTER@10.0.0.0/8",
            "--dicom-ae-title",
            "BRAINAI,BRAINAI_STAT",
        ],
    )
    .await;
    let base = node.snapshot().await;
    let ok = echoscu(node.addr(), "PACS", "BRAINAI").await;
    assert!(ok.status.success(), "{}", text(&ok));
    let ok = echoscu(node.addr(), "PACS", "BRAINAI_STAT").await;
    assert!(ok.status.success(), "the second AE title: {}", text(&ok));
    let stranger = echoscu(node.addr(), "STRANGER", "BRAINAI").await;
    assert!(!stranger.status.success());
    assert!(
        text(&stranger).contains("Calling AE Title Not Recognized"),
        "{}",
        text(&stranger)
    );
    // ROUTER is allowed, but not from 127.0.0.1.
    let elsewhere = echoscu(node.addr(), "ROUTER", "BRAINAI").await;
    assert!(
        text(&elsewhere).contains("Calling AE Title Not Recognized"),
        "{}",
        text(&elsewhere)
    );
    let wrong = echoscu(node.addr(), "PACS", "SOMEONE_ELSE").await;
    assert!(
        text(&wrong).contains("Called AE Title Not Recognized"),
        "{}",
        text(&wrong)
    );
    assert_eq!(
        node.delta(
            &base,
            "brainai_dicom_associations_total",
            &["outcome=\"rejected\""]
        )
        .await,
        3.0
    );
    let audit = node.audit();
    let rejected: Vec<&serde_json::Value> = audit
        .iter()
        .filter(|r| r["outcome"].as_str().unwrap().starts_with("rejected"))
        .collect();
    assert_eq!(rejected.len(), 3, "{audit:#?}");
    assert!(rejected.iter().any(|r| r["caller"] == "STRANGER"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presentation_contexts_the_node_cannot_use_are_rejected_in_the_association() {
    let _serial = SERIAL.lock().await;
    let state = tempfile::tempdir().unwrap();
    let node = Node::start(state.path(), free_port(), &[]).await;
    let base = node.snapshot().await;
    // An SR is no image: storescu finds its presentation context rejected and sends nothing.
    let data = tempfile::tempdir().unwrap();
    let sr = data.path().join("sr.dcm");
    let out = Command::new(python())
        .arg("-c")
        .arg(
            "import sys, pydicom\nfrom pydicom.dataset import Dataset, FileMetaDataset\nfrom pydicom.uid import ExplicitVRLittleEndian, generate_uid\n\
             m = FileMetaDataset(); m.MediaStorageSOPClassUID = '1.2.840.10008.5.1.4.1.1.88.11'; m.MediaStorageSOPInstanceUID = generate_uid(); m.TransferSyntaxUID = ExplicitVRLittleEndian\n\
             d = Dataset(); d.file_meta = m; d.SOPClassUID = m.MediaStorageSOPClassUID; d.SOPInstanceUID = m.MediaStorageSOPInstanceUID; d.StudyInstanceUID = generate_uid(); d.SeriesInstanceUID = generate_uid(); d.Modality = 'SR'\n\
             d.save_as(sys.argv[1], enforce_file_format=True)",
        )
        .arg(&sr)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sent = storescu(node.addr(), "PACS", "BRAINAI", &[sr], &[]).await;
    assert!(!sent.status.success());
    assert!(
        text(&sent)
            .to_lowercase()
            .contains("no presentation context")
            || text(&sent).contains("No presentation context"),
        "{}",
        text(&sent)
    );
    assert_eq!(
        node.delta(
            &base,
            "brainai_dicom_instances_total",
            &["outcome=\"stored\""]
        )
        .await,
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_association_leaves_nothing_to_process() {
    let _serial = SERIAL.lock().await;
    let data = tempfile::tempdir().unwrap();
    let files = full_study(data.path());
    let archive = Archive::start().await;
    let state = tempfile::tempdir().unwrap();
    let node = Node::start(state.path(), archive.port, &[]).await;
    let base = node.snapshot().await;
    // storescu sends every instance (each answered Success), then aborts instead of releasing.
    let sent = storescu(node.addr(), "PACS", "BRAINAI", &files, &["--abort"]).await;
    assert!(sent.status.success(), "{}", text(&sent));
    bounded("the abort is seen", async {
        while node
            .delta(
                &base,
                "brainai_dicom_instances_total",
                &["outcome=\"discarded\""],
            )
            .await
            < (3 * SLICES) as f64
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        left(&state.path().join("spool")).is_empty(),
        "{:?}",
        left(&state.path().join("spool"))
    );

    // Cut in the middle of a data set: the partial instance is gone too.
    let mut assoc = dicom_ul::association::client::ClientAssociationOptions::new()
        .calling_ae_title("PACS")
        .called_ae_title("BRAINAI")
        .with_presentation_context(MR_IMAGE_STORAGE, vec!["1.2.840.10008.1.2.1"])
        .establish_async(node.addr())
        .await
        .expect("associates");
    let pc = assoc.presentation_contexts()[0].id;
    let bytes = std::fs::read(&files[0]).unwrap();
    assoc
        .send(&dicom_ul::Pdu::PData {
            data: vec![
                dicom_ul::pdu::PDataValue {
                    presentation_context_id: pc,
                    value_type: dicom_ul::pdu::PDataValueType::Command,
                    is_last: true,
                    data: brainai::node::dimse::store_request(1, MR_IMAGE_STORAGE, "1.2.3.4.5"),
                },
                dicom_ul::pdu::PDataValue {
                    presentation_context_id: pc,
                    value_type: dicom_ul::pdu::PDataValueType::Data,
                    is_last: false,
                    data: bytes[300..4000].to_vec(),
                },
            ],
        })
        .await
        .unwrap();
    let incoming = state.path().join("spool/incoming");
    until("the partial instance is spooled", || {
        files_under(&incoming).len() == 1
    })
    .await;
    drop(assoc);
    until("the partial instance is removed", || {
        files_under(&incoming).is_empty()
    })
    .await;
    assert!(left(&state.path().join("spool")).is_empty());
    until_metric(&node, "brainai_dicom_spool_bytes", 0.0).await;
    // Nothing was processed or sent.
    assert_eq!(
        node.delta(
            &base,
            "brainai_dicom_series_processed_total",
            &["task=\"classification\"", "outcome=\"ok\""]
        )
        .await,
        0.0
    );
    assert!(archive.files().is_empty());
}

async fn until_metric(node: &Node, name: &str, value: f64) {
    bounded(name, async {
        while node.metric(name, &[]).await != value {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_wait_in_the_outbox_while_the_destination_is_down_and_arrive_when_it_returns() {
    let _serial = SERIAL.lock().await;
    let data = tempfile::tempdir().unwrap();
    let files = full_study(data.path());
    let port = free_port();
    let state = tempfile::tempdir().unwrap();
    let node = Node::start(state.path(), port, &[]).await;
    let base = node.snapshot().await;
    let sent = storescu(node.addr(), "PACS", "BRAINAI", &files, &[]).await;
    assert!(sent.status.success(), "{}", text(&sent));
    bounded("delivery fails while the destination is down", async {
        while node
            .delta(
                &base,
                "brainai_dicom_deliveries_total",
                &["outcome=\"failed\""],
            )
            .await
            < 2.0
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert_eq!(node.metric("brainai_dicom_outbox_depth", &[]).await, 3.0);
    assert!(
        node.metric("brainai_dicom_outbox_oldest_age_seconds", &[])
            .await
            > 0.0
    );
    // The instances stay in the spool until their results are delivered.
    assert_eq!(left(&state.path().join("spool")).len(), 3 * SLICES);

    let archive = Archive::start_on(port).await;
    let results = archive.wait_for(3).await;
    assert_eq!(results.len(), 3);
    until("spool emptied after delivery", || {
        left(&state.path().join("spool")).is_empty()
    })
    .await;
    until_metric(&node, "brainai_dicom_outbox_depth", 0.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_associations_at_once_each_get_their_result_and_the_limits_refuse_the_rest() {
    let _serial = SERIAL.lock().await;
    let data = tempfile::tempdir().unwrap();
    // 20 studies of one FLAIR series each (4 slices).
    let specs: Vec<serde_json::Value> = (1..=20)
        .map(|i| {
            let study = format!("{STUDY}.100.{i}");
            let mut s = series(&format!("{study}.1"), "AX FLAIR", &study);
            s["slices"] = json!(4);
            s
        })
        .collect();
    make_study(data.path(), specs);
    let archive = Archive::start().await;
    let state = tempfile::tempdir().unwrap();
    let node = Node::start(
        state.path(),
        archive.port,
        &["--dicom-max-associations-per-peer", "32"],
    )
    .await;
    let mut sends = Vec::new();
    for i in 1..=20 {
        let dir = data.path().join(format!("{STUDY}.100.{i}.1"));
        let files = files_under(&dir);
        assert_eq!(files.len(), 4, "{}", dir.display());
        let addr = node.addr();
        sends.push(tokio::spawn(async move {
            storescu(addr, "PACS", "BRAINAI", &files, &[]).await
        }));
    }
    for send in sends {
        let out = send.await.unwrap();
        assert!(out.status.success(), "{}", text(&out));
    }
    let results = archive.wait_for(20).await;
    assert_eq!(results.len(), 20);
    let studies: std::collections::BTreeSet<String> = read_results(&results)
        .iter()
        .map(|r| r["study"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(studies.len(), 20, "one SR per study");

    // Limits: two associations held open from one address; the third is refused, transient.
    drop(node);
    let state = tempfile::tempdir().unwrap();
    let node = Node::start(
        state.path(),
        archive.port,
        &["--dicom-max-associations-per-peer", "2"],
    )
    .await;
    let base = node.snapshot().await;
    let open = |addr| async move {
        dicom_ul::association::client::ClientAssociationOptions::new()
            .calling_ae_title("PACS")
            .called_ae_title("BRAINAI")
            .with_abstract_syntax("1.2.840.10008.1.1")
            .establish_async(addr)
            .await
    };
    let a = open(node.addr()).await.expect("first");
    let b = open(node.addr()).await.expect("second");
    let refused = echoscu(node.addr(), "PACS", "BRAINAI").await;
    assert_rejected_transient(&refused);
    assert_eq!(
        node.delta(
            &base,
            "brainai_dicom_associations_total",
            &["outcome=\"limited\""]
        )
        .await,
        1.0
    );
    drop((a, b));
    bounded("a place again", async {
        loop {
            if echoscu(node.addr(), "PACS", "BRAINAI")
                .await
                .status
                .success()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_refuses_stores_with_out_of_resources() {
    let _serial = SERIAL.lock().await;
    let archive = Archive::start().await;
    let state = tempfile::tempdir().unwrap();
    let node = Node::start(
        state.path(),
        archive.port,
        &[
            "--dicom-spool-max-mib",
            "1",
            "--dicom-trigger",
            "stable",
            "--dicom-stable-s",
            "3600",
        ],
    )
    .await;
    let base = node.snapshot().await;
    // Ten studies of 16 instances of about 8 KiB: more than 1 MiB.
    let big = tempfile::tempdir().unwrap();
    let mut specs = Vec::new();
    for k in 0..10 {
        let study = format!("{STUDY}.200.{k}");
        specs.push(series(&format!("{study}.1"), "AX FLAIR", &study));
    }
    let many = make_study(big.path(), specs);
    let sent = storescu(node.addr(), "PACS", "BRAINAI", &many, &["-v"]).await;
    let out = text(&sent);
    assert!(
        out.contains("Refused: OutOfResources"),
        "storescu reports the refusal: {out}"
    );
    let full = node
        .delta(
            &base,
            "brainai_dicom_instances_total",
            &["outcome=\"spool_full\""],
        )
        .await;
    let stored = node
        .delta(
            &base,
            "brainai_dicom_instances_total",
            &["outcome=\"stored\""],
        )
        .await;
    // storescu stops at the first refusal.
    assert!(
        full == 1.0 && stored > 0.0,
        "stored until full ({stored}), then refused ({full})"
    );
    assert!(stored < many.len() as f64);
    assert!(node.metric("brainai_dicom_spool_bytes", &[]).await <= (1 << 20) as f64);
    // Nothing half-written is left behind.
    assert!(files_under(&state.path().join("spool/incoming")).is_empty());
}

/// `brainai serve` as a process, for what only a process can show (SIGKILL); its DICOM address
/// read from its log.
struct Process {
    child: Child,
    dicom: SocketAddr,
    _log: std::thread::JoinHandle<()>,
}

impl Process {
    fn start(flags: &[String]) -> Process {
        use std::io::BufRead;
        let mut child = Command::new(env!("CARGO_BIN_EXE_brainai"))
            .arg("serve")
            .args([
                "--grpc-addr",
                "127.0.0.1:0",
                "--http-addr",
                "127.0.0.1:0",
                "--metrics-addr",
                "127.0.0.1:0",
                "--intra-op-threads",
                "1",
            ])
            .args(flags)
            .env("BRAINAI_LOG", "info")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn brainai serve");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let log = std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                let _ = tx.send(line);
            }
        });
        let dicom = loop {
            let line = rx
                .recv_timeout(PATIENCE)
                .expect("the server logs its DICOM address");
            if let Some(addr) = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("dicom_addr="))
            {
                break addr.parse().unwrap();
            }
        };
        Process {
            child,
            dicom,
            _log: log,
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_in_the_outbox_at_a_sigkill_are_delivered_once_after_the_restart() {
    let _serial = SERIAL.lock().await;
    let data = tempfile::tempdir().unwrap();
    let files = full_study(data.path());
    let port = free_port();
    let state = tempfile::tempdir().unwrap();
    let (_repository, flags) = node_flags(state.path(), port, &[]);
    let outbox = state.path().join("outbox");

    let mut first = Process::start(&flags);
    // The destination is down: the results stay in the outbox.
    let sent = storescu(first.dicom, "PACS", "BRAINAI", &files, &[]).await;
    assert!(sent.status.success(), "{}", text(&sent));
    // Committed (not still in the job's `.tmp` directory, which a restart drops and processes
    // again).
    until("three results in the outbox", || {
        committed(&outbox).len() == 3
    })
    .await;
    first.child.kill().unwrap(); // SIGKILL
    first.child.wait().unwrap();
    let waiting = committed(&outbox);

    let archive = Archive::start_on(port).await;
    let second = Process::start(&flags);
    let results = archive.wait_for(3).await;
    until("outbox and spool emptied", || {
        left(&outbox).is_empty() && left(&state.path().join("spool")).is_empty()
    })
    .await;
    // The restarted node found nothing else to send or process: still exactly those three.
    let echo = echoscu(second.dicom, "PACS", "BRAINAI").await;
    assert!(echo.status.success());
    let results = if archive.files().len() > results.len() {
        archive.files()
    } else {
        results
    };
    assert_eq!(results.len(), 3, "each result once: {results:?}");
    let delivered: std::collections::BTreeSet<String> = read_results(&results)
        .iter()
        .map(|r| r["sop_instance"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        delivered, waiting,
        "the results that waited at the SIGKILL, each once"
    );
}

/// The SOP Instance UIDs of the results committed to the outbox.
fn committed(dir: &Path) -> std::collections::BTreeSet<String> {
    left(dir)
        .iter()
        .filter(|f| !f.parent().unwrap().to_string_lossy().ends_with(".tmp"))
        .map(|f| f.file_stem().unwrap().to_string_lossy().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dicom_tls_admits_clients_of_the_client_ca_only() {
    let _serial = SERIAL.lock().await;
    use common::certs::Ca;
    let certs = tempfile::tempdir().unwrap();
    let ca = Ca::new("Hospital CA");
    let ca_file = ca.write_ca(&certs.path().join("ca.crt"));
    let server = ca.write_leaf(certs.path(), "server", true, false);
    let pacs = ca.write_leaf(certs.path(), "pacs", false, false);
    let other = Ca::new("Someone else");
    let stranger = other.write_leaf(certs.path(), "stranger", false, false);
    let p = |p: &Path| p.display().to_string();
    let state = tempfile::tempdir().unwrap();
    let node = Node::start(
        state.path(),
        free_port(),
        &[
            "--dicom-tls",
            "--tls-cert",
            &p(&server.cert),
            "--tls-key",
            &p(&server.key),
            "--tls-client-ca",
            &p(&ca_file),
        ],
    )
    .await;
    let base = node.snapshot().await;
    let echo = |identity: Option<&common::certs::Pem>| {
        let mut args: Vec<String> = vec![
            "-aet".into(),
            "PACS".into(),
            "-aec".into(),
            "BRAINAI".into(),
        ];
        if let Some(pem) = identity {
            args.extend([
                "+tls".into(),
                p(&pem.key),
                p(&pem.cert),
                "+cf".into(),
                p(&ca_file),
            ]);
        }
        args.extend([node.addr().ip().to_string(), node.addr().port().to_string()]);
        dcmtk("echoscu", args)
    };
    let ok = echo(Some(&pacs)).await;
    assert!(
        ok.status.success(),
        "a client of the client CA: {}",
        text(&ok)
    );
    let refused = echo(Some(&stranger)).await;
    assert!(
        !refused.status.success(),
        "a client of another CA is refused: {}",
        text(&refused)
    );
    let plain = echo(None).await;
    assert!(
        !plain.status.success(),
        "plain TCP to the TLS port is refused: {}",
        text(&plain)
    );
    assert_eq!(
        node.delta(
            &base,
            "brainai_dicom_associations_total",
            &["outcome=\"accepted\""]
        )
        .await,
        1.0
    );
    assert_eq!(
        node.delta(
            &base,
            "brainai_dicom_associations_total",
            &["outcome=\"failed\""]
        )
        .await,
        2.0
    );
    let audit = node.audit();
    let accepted = audit
        .iter()
        .find(|r| r["outcome"] == "released")
        .expect("the TLS association's record");
    assert_eq!(accepted["auth"], "certificate+ae-title");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_series_sent_on_several_associations_is_processed_once_when_stable() {
    let _serial = SERIAL.lock().await;
    let data = tempfile::tempdir().unwrap();
    let files = make_study(
        data.path(),
        vec![series(&format!("{STUDY}.1"), "AX FLAIR", STUDY)],
    );
    let archive = Archive::start().await;
    let state = tempfile::tempdir().unwrap();
    let node = Node::start(
        state.path(),
        archive.port,
        &["--dicom-trigger", "stable", "--dicom-stable-s", "3"],
    )
    .await;
    let base = node.snapshot().await;
    // Two associations, one after the other, each with half the series.
    let (first, second) = files.split_at(files.len() / 2);
    for half in [first, second] {
        let sent = storescu(node.addr(), "PACS", "BRAINAI", half, &[]).await;
        assert!(sent.status.success(), "{}", text(&sent));
    }
    let results = archive.wait_for(1).await;
    assert_eq!(results.len(), 1, "one SR for the series");
    let read = read_results(&results);
    assert_eq!(
        read[0]["referenced"].as_array().unwrap().len(),
        files.len(),
        "the SR references the instances of both associations"
    );
    assert_eq!(
        node.delta(
            &base,
            "brainai_dicom_series_processed_total",
            &["task=\"classification\"", "outcome=\"ok\""]
        )
        .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_refuses_new_associations_and_waits_for_the_open_one() {
    let _serial = SERIAL.lock().await;
    let state = tempfile::tempdir().unwrap();
    let mut node = Node::start(state.path(), free_port(), &["--drain-timeout-s", "60"]).await;
    let base = node.snapshot().await;
    let held = dicom_ul::association::client::ClientAssociationOptions::new()
        .calling_ae_title("PACS")
        .called_ae_title("BRAINAI")
        .with_abstract_syntax("1.2.840.10008.1.1")
        .establish_async(node.addr())
        .await
        .expect("associates");
    node.server.begin_shutdown();
    until("draining", || {
        node.server.state.phase() == brainai::state::Phase::Draining
    })
    .await;
    let refused = echoscu(node.addr(), "PACS", "BRAINAI").await;
    assert_rejected_transient(&refused);
    assert_eq!(
        node.delta(
            &base,
            "brainai_dicom_associations_total",
            &["outcome=\"draining\""]
        )
        .await,
        1.0
    );
    // The open association is what the drain waits for.
    held.release().await.expect("released");
    let Node { server, .. } = node;
    bounded("the drain ends", server.wait())
        .await
        .expect("stops cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_pick_the_model_and_priority_by_called_ae_title_modality_and_sequence() {
    let _serial = SERIAL.lock().await;
    let data = tempfile::tempdir().unwrap();
    let files = full_study(data.path());
    let flair: Vec<PathBuf> = files
        .iter()
        .filter(|f| f.to_string_lossy().contains(&format!("{STUDY}.1/")))
        .cloned()
        .collect();
    assert_eq!(flair.len(), SLICES);
    let archive = Archive::start().await;
    let state = tempfile::tempdir().unwrap();
    let node = Node::start(
        state.path(),
        archive.port,
        &[
            "--dicom-ae-title",
            "BRAINAI,BRAINAI_STAT",
            "--dicom-route",
            "called=BRAINAI_STAT,sequence=FLAIR,model=tiny-stat,priority=stat;\
             modality=CT,model=seg-study;sequence=FLAIR,model=tiny",
        ],
    )
    .await;
    let base = node.snapshot().await;
    let stat = |base: &str| {
        let base = base.to_string();
        let node = &node;
        async move {
            node.delta(
                &base,
                "brainai_queue_duration_seconds_count",
                &["model=\"tiny-stat\"", "priority=\"stat\""],
            )
            .await
        }
    };

    // To the STAT AE title: the STAT rule, its model, the STAT lane.
    let sent = storescu(node.addr(), "PACS", "BRAINAI_STAT", &flair, &[]).await;
    assert!(sent.status.success(), "{}", text(&sent));
    let first = archive.wait_for(1).await;
    assert_eq!(first.len(), 1);
    assert!(
        stat(&base).await > 0.0,
        "the STAT route's slices ran in the STAT lane"
    );
    let model_of = |file: &Path| -> String {
        let audit = node.audit();
        let uid = read_results(&[file.to_path_buf()])[0]["sop_instance"]
            .as_str()
            .unwrap()
            .to_string();
        // The delivery record names the result; the classification record before it, the model.
        let delivery = audit
            .iter()
            .position(|r| {
                r["dicom"]
                    .as_array()
                    .is_some_and(|d| d.iter().any(|x| x["sop_instance"] == uid))
            })
            .expect("the result's delivery record");
        audit[..delivery]
            .iter()
            .rev()
            .find(|r| r["method"] == "DICOM series classification")
            .map(|r| r["model"]["name"].as_str().unwrap().to_string())
            .unwrap()
    };
    assert_eq!(model_of(&first[0]), "tiny-stat");

    // The whole study to the routine AE title: FLAIR by the last rule; the segmentation rule is
    // for CT only, so the MR study is not segmented; T1c and T2 are unrouted.
    let base = node.snapshot().await;
    let sent = storescu(node.addr(), "PACS", "BRAINAI", &files, &[]).await;
    assert!(sent.status.success(), "{}", text(&sent));
    let all = archive.wait_for(2).await;
    let second: Vec<PathBuf> = all.into_iter().filter(|f| !first.contains(f)).collect();
    assert_eq!(second.len(), 1, "only the classification SR: {second:?}");
    assert_eq!(model_of(&second[0]), "tiny");
    assert_eq!(
        stat(&base).await,
        0.0,
        "routine work stays out of the STAT lane"
    );
    assert_eq!(
        node.delta(
            &base,
            "brainai_dicom_series_processed_total",
            &["task=\"classification\"", "outcome=\"unrouted\""]
        )
        .await,
        2.0
    );
    assert_eq!(
        node.delta(
            &base,
            "brainai_dicom_series_processed_total",
            &["task=\"segmentation\""]
        )
        .await,
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_go_to_a_tls_destination_that_checks_the_node_certificate() {
    let _serial = SERIAL.lock().await;
    use common::certs::Ca;
    let certs = tempfile::tempdir().unwrap();
    let ca = Ca::new("Hospital CA");
    let ca_file = ca.write_ca(&certs.path().join("ca.crt"));
    let node_cert = ca.write_node_leaf(certs.path(), "node");
    let archive_cert = ca.write_node_leaf(certs.path(), "archive");
    let p = |p: &Path| p.display().to_string();
    // storescp over TLS requires a client certificate of the CA (dcmtk's default, -rc).
    let archive = Archive::start_with(
        free_port(),
        &[
            "+tls".into(),
            p(&archive_cert.key),
            p(&archive_cert.cert),
            "+cf".into(),
            p(&ca_file),
        ],
    )
    .await;
    let data = tempfile::tempdir().unwrap();
    let flair = make_study(
        data.path(),
        vec![series(&format!("{STUDY}.1"), "AX FLAIR", STUDY)],
    );
    let state = tempfile::tempdir().unwrap();
    let node = Node::start(
        state.path(),
        archive.port,
        &[
            "--tls-cert",
            &p(&node_cert.cert),
            "--tls-key",
            &p(&node_cert.key),
            "--dicom-destination-tls",
            "--dicom-destination-ca",
            &p(&ca_file),
        ],
    )
    .await;
    let sent = storescu(node.addr(), "PACS", "BRAINAI", &flair, &[]).await;
    assert!(sent.status.success(), "{}", text(&sent));
    let results = archive.wait_for(1).await;
    assert_eq!(results.len(), 1);
    assert_eq!(read_results(&results)[0]["sop_class"], COMPREHENSIVE_SR);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_and_an_idle_association_are_closed() {
    use tokio::io::AsyncReadExt;
    let _serial = SERIAL.lock().await;
    let state = tempfile::tempdir().unwrap();
    let node = Node::start(
        state.path(),
        free_port(),
        &["--dicom-artim-s", "1", "--dicom-idle-s", "1"],
    )
    .await;
    let base = node.snapshot().await;
    // ARTIM: a connection that never sends its A-ASSOCIATE-RQ is closed.
    let mut silent = tokio::net::TcpStream::connect(node.addr()).await.unwrap();
    let mut buf = [0u8; 64];
    let read = bounded("ARTIM closes the connection", silent.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "closed without a PDU: {read:?}"
    );
    // Idle: an association that sends nothing is aborted.
    let mut idle = dicom_ul::association::client::ClientAssociationOptions::new()
        .calling_ae_title("PACS")
        .called_ae_title("BRAINAI")
        .with_abstract_syntax("1.2.840.10008.1.1")
        .establish_async(node.addr())
        .await
        .expect("associates");
    let pdu = bounded("the idle association ends", idle.receive()).await;
    assert!(
        matches!(pdu, Ok(dicom_ul::Pdu::AbortRQ { .. }) | Err(_)),
        "an A-ABORT or the connection closed: {pdu:?}"
    );
    assert_eq!(
        node.delta(
            &base,
            "brainai_dicom_associations_total",
            &["outcome=\"failed\""]
        )
        .await,
        1.0,
        "the silent connection"
    );
    let audit = node.audit();
    assert!(
        audit.iter().any(|r| r["outcome"]
            .as_str()
            .unwrap()
            .starts_with("aborted: connection lost or idle")),
        "{audit:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_larger_than_max_image_bytes_is_refused() {
    let _serial = SERIAL.lock().await;
    let data = tempfile::tempdir().unwrap();
    let files = make_study(
        data.path(),
        vec![series(&format!("{STUDY}.1"), "AX FLAIR", STUDY)],
    );
    let state = tempfile::tempdir().unwrap();
    // The instances are about 9 KiB.
    let node = Node::start(state.path(), free_port(), &["--max-image-bytes", "4096"]).await;
    let base = node.snapshot().await;
    let sent = storescu(node.addr(), "PACS", "BRAINAI", &files[..1], &["-v"]).await;
    assert!(
        text(&sent).contains("Refused: OutOfResources"),
        "{}",
        text(&sent)
    );
    assert_eq!(
        node.delta(
            &base,
            "brainai_dicom_instances_total",
            &["outcome=\"refused\""]
        )
        .await,
        1.0
    );
    assert!(left(&state.path().join("spool")).is_empty());
    assert_eq!(node.metric("brainai_dicom_spool_bytes", &[]).await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_study_over_the_study_limits_is_refused_whole_and_recorded() {
    let _serial = SERIAL.lock().await;
    let data = tempfile::tempdir().unwrap();
    // 16 slices of 128 × 128 × 2 bytes: about 0.5 MiB a series, 1.5 MiB the study.
    let big = |uid: &str, description: &str| {
        let mut s = series(uid, description, STUDY);
        s["rows"] = json!(128);
        s["columns"] = json!(128);
        s
    };
    let files = make_study(
        data.path(),
        vec![
            big(&format!("{STUDY}.1"), "AX FLAIR"),
            big(&format!("{STUDY}.2"), "AX T1 POST GD"),
            big(&format!("{STUDY}.3"), "AX T2"),
        ],
    );
    let archive = Archive::start().await;
    let state = tempfile::tempdir().unwrap();
    let node = Node::start(state.path(), archive.port, &["--max-study-decode-mib", "1"]).await;
    let sent = storescu(node.addr(), "PACS", "BRAINAI", &files, &[]).await;
    assert!(sent.status.success(), "{}", text(&sent));
    until("the study is dropped", || {
        left(&state.path().join("spool")).is_empty()
    })
    .await;
    let audit = node.audit();
    let refused = audit
        .iter()
        .find(|r| r["method"] == "DICOM study")
        .expect("the refused study's record");
    assert_eq!(refused["outcome"], "INVALID_ARGUMENT");
    assert_eq!(refused["caller"], "PACS");
    assert!(archive.files().is_empty(), "nothing was processed or sent");
}
