//! The metric names that deploy/ depends on are the ones the service exports.
//!
//! Alerts (deploy/k8s/base/prometheusrule.yaml), the prometheus-adapter rule and the HPA that
//! scales on it, and the Grafana dashboard all name `brainai_*` metrics in strings that no
//! compiler sees. This test reads every YAML and JSON file under deploy/, collects each
//! `brainai_*` name, makes the real server (tiny fixture model) answer one Classify so that every
//! histogram has samples, scrapes `/metrics`, and fails naming each referenced metric the server
//! does not export, and the file that refers to it. A renamed metric therefore breaks this test
//! instead of silently breaking alerting or autoscaling.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use common::*;

/// Suffixes of a histogram's series; `name_bucket` is exported for histogram `name`.
const HISTOGRAM_SUFFIXES: [&str; 3] = ["_bucket", "_sum", "_count"];

/// Files that must exist and refer to at least one metric (so the test cannot pass vacuously,
/// e.g. after a file was moved). Paths relative to the repository root.
const MUST_REFER: [&str; 4] = [
    "deploy/k8s/base/prometheusrule.yaml",
    "deploy/k8s/base/hpa.yaml",
    "deploy/k8s/prometheus-adapter/values.yaml",
    "deploy/grafana/brainai.json",
];

/// Every *.yaml, *.yml and *.json file under `dir`, recursively, in a stable order.
fn deploy_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml" | "json")
            ) {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// `brainai_*` identifiers in `text` (lower-case letters, digits, underscores; starting at a
/// word boundary, so `xbrainai_y` does not count and `BrainAIQueueNearCapacity` is not a metric).
fn metric_names(text: &str) -> BTreeSet<String> {
    let bytes = text.as_bytes();
    let mut names = BTreeSet::new();
    let mut from = 0;
    while let Some(at) = text[from..].find("brainai_").map(|i| from + i) {
        let boundary = at == 0 || !(bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_');
        let mut end = at + "brainai_".len();
        while end < bytes.len()
            && (bytes[end].is_ascii_lowercase()
                || bytes[end].is_ascii_digit()
                || bytes[end] == b'_')
        {
            end += 1;
        }
        let name = text[at..end].trim_end_matches('_');
        if boundary && name.len() > "brainai".len() {
            names.insert(name.to_string());
        }
        from = end.max(at + 1);
    }
    names
}

/// Referenced metric name → the deploy/ files (relative paths) that refer to it.
fn referenced_metrics() -> BTreeMap<String, BTreeSet<String>> {
    let root = repo();
    let mut refs: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in deploy_files(&root.join("deploy")) {
        let text = std::fs::read_to_string(&file).unwrap();
        let rel = file.strip_prefix(&root).unwrap().display().to_string();
        for name in metric_names(&text) {
            refs.entry(name).or_default().insert(rel.clone());
        }
    }
    refs
}

/// What a Prometheus text exposition exports: metric family → type (from `# TYPE`), and the
/// names of the series that carry samples (`name_bucket`, `name_sum`, … for histograms).
struct Exposition {
    families: BTreeMap<String, String>,
    series: BTreeSet<String>,
}

fn parse_exposition(text: &str) -> Exposition {
    let mut families = BTreeMap::new();
    let mut series = BTreeSet::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            if let (Some(name), Some(kind)) = (parts.next(), parts.next()) {
                families.insert(name.to_string(), kind.to_string());
            }
        } else if !line.starts_with('#') {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            series.insert(line[..end].to_string());
        }
    }
    Exposition { families, series }
}

impl Exposition {
    /// Why `name` is not something a query can select, or None when it is exported.
    fn problem(&self, name: &str) -> Option<String> {
        if self.series.contains(name) {
            return None;
        }
        for suffix in HISTOGRAM_SUFFIXES {
            if let Some(family) = name.strip_suffix(suffix) {
                return Some(match self.families.get(family).map(String::as_str) {
                    Some("histogram" | "summary") => {
                        format!("histogram {family} has no {suffix} series")
                    }
                    Some(kind) => format!("{family} is a {kind}, not a histogram"),
                    None => format!("no metric family {family}"),
                });
            }
        }
        match self.families.get(name).map(String::as_str) {
            // A histogram's family name is not a series, but prose (descriptions, legends) may
            // name it; deploy/check.sh rejects it inside PromQL expressions.
            Some(_) => None,
            None => Some("not exported".into()),
        }
    }

    /// The family a referenced name belongs to (`x_bucket` → `x` for histograms).
    fn family_of<'a>(&self, name: &'a str) -> &'a str {
        for suffix in HISTOGRAM_SUFFIXES {
            if let Some(family) = name.strip_suffix(suffix)
                && matches!(
                    self.families.get(family).map(String::as_str),
                    Some("histogram" | "summary")
                )
            {
                return family;
            }
        }
        name
    }
}

#[test]
fn extracts_metric_names_at_word_boundaries() {
    let names = metric_names(
        r#"expr: rate(brainai_requests_total{code!="OK"}[5m]) / x_brainai_not_this
           "legendFormat": "p99", "expr": "brainai_queue_depth > 0.8 * 256" BrainAIQueueNearCapacity
           brainai_batch_size_bucket, brainai_"#,
    );
    let expected: BTreeSet<String> = [
        "brainai_batch_size_bucket",
        "brainai_queue_depth",
        "brainai_requests_total",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(names, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_named_in_deploy_is_exported_by_the_service() {
    let refs = referenced_metrics();
    // Not vacuous: the files that matter exist and name metrics, and the key ones are there.
    for file in MUST_REFER {
        assert!(
            repo().join(file).is_file(),
            "{file} is missing: update MUST_REFER in tests/deploy_metrics.rs if it moved"
        );
        assert!(
            refs.values().any(|files| files.contains(file)),
            "{file} names no brainai_* metric"
        );
    }
    for name in [
        "brainai_queue_depth",
        "brainai_requests_total",
        "brainai_request_duration_seconds_bucket",
        "brainai_dropped_total",
        "brainai_batch_occupancy_ratio_sum",
    ] {
        assert!(
            refs.contains_key(name),
            "deploy/ never refers to {name}: {refs:?}"
        );
    }
    let hpa_names: Vec<&String> = refs
        .iter()
        .filter(|(_, files)| files.contains("deploy/k8s/base/hpa.yaml"))
        .map(|(name, _)| name)
        .collect();
    assert!(
        hpa_names.iter().any(|n| *n == "brainai_queue_depth"),
        "the HPA should scale on brainai_queue_depth, names {hpa_names:?}"
    );

    // One real call, so every histogram (request, queue, preprocess, inference, batch size,
    // occupancy) and the per-code counter have samples.
    let mut t = serve(args(&fixture_model("tiny"), &[]), None).await;
    classify_files(&mut t, &["flair_256_a.png"]).await;
    // The TLS, audit, result-cache and DICOM node metrics exist when those are on (the pod turns
    // TLS and audit on): a second server in this process, with all three, registers them with the same (process-wide) recorder.
    let dir = tempfile::tempdir().unwrap();
    let generated = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert, generated.cert.pem()).unwrap();
    std::fs::write(&key, generated.signing_key.serialize_pem()).unwrap();
    // Its model has a result cache, whose metrics exist only then.
    let cached = copy_model("tiny", dir.path(), "tiny");
    let toml = std::fs::read_to_string(cached.join("model.toml")).unwrap();
    std::fs::write(
        cached.join("model.toml"),
        format!("{toml}\n[cache]\nmax_kib = 64\n"),
    )
    .unwrap();
    let secured = brainai::server::start(
        &args(
            &cached,
            &[
                "--tls-cert",
                &cert.display().to_string(),
                "--tls-key",
                &key.display().to_string(),
                "--audit-log",
                "/dev/null",
                // The DICOM node (the dicom-node overlay): its metrics exist when it is on.
                "--dicom-addr",
                "127.0.0.1:0",
                "--dicom-destination",
                "ARCHIVE@127.0.0.1:9",
                "--dicom-spool-dir",
                &dir.path().join("spool").display().to_string(),
                "--dicom-outbox-dir",
                &dir.path().join("outbox").display().to_string(),
            ],
        ),
        None,
    )
    .await
    .expect("a server with TLS, an audit trail and the DICOM node starts");
    until("the second server's model to load", || {
        secured.state.phase() == brainai::state::Phase::Serving
    })
    .await;
    let (code, body) = http_get(t.metrics_addr(), "/metrics").await;
    assert_eq!(code, 200, "{body}");
    let exported = parse_exposition(&body);
    assert!(
        exported
            .series
            .contains("brainai_request_duration_seconds_bucket"),
        "the scrape has no request histogram after a Classify:\n{body}"
    );

    // The GPU metrics exist only where NVML and a GPU are (tests/gpu_metrics.rs checks them
    // there): here deploy/ may name exactly those, and no other unexported name.
    let missing: Vec<String> = refs
        .iter()
        .filter(|(name, _)| !brainai::metrics::GPU_METRICS.contains(&name.as_str()))
        .filter_map(|(name, files)| {
            exported.problem(name).map(|why| {
                let files: Vec<&str> = files.iter().map(String::as_str).collect();
                format!("  {name}: {why} (referred to in {})", files.join(", "))
            })
        })
        .collect();
    assert!(
        missing.is_empty(),
        "deploy/ refers to metrics the service does not export:\n{}\nexported families: {:?}",
        missing.join("\n"),
        exported.families.keys().collect::<Vec<_>>()
    );

    // The dashboard shows every metric family the service exports (a new metric gets a panel).
    let on_dashboard: BTreeSet<&str> = refs
        .iter()
        .filter(|(_, files)| files.contains("deploy/grafana/brainai.json"))
        .map(|(name, _)| exported.family_of(name))
        .collect();
    let not_shown: Vec<&String> = exported
        .families
        .keys()
        .filter(|f| f.starts_with("brainai_") && !on_dashboard.contains(f.as_str()))
        .collect();
    assert!(
        not_shown.is_empty(),
        "deploy/grafana/brainai.json shows no panel for {not_shown:?}"
    );

    secured.shutdown().await.unwrap();
    t.server.shutdown().await.unwrap();
}
