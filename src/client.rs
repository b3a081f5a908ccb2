//! `brainai classify`: a real gRPC client that classifies image files with a running server.
//! `calls.rs`: the files in calls the server accepts, a few in flight; `retry.rs`: backoff while
//! the server is busy; `output.rs`: what is printed.

mod calls;
mod output;
mod retry;
pub mod segment;

use std::process::ExitCode;
use std::time::Duration;

use serde_json::json;
use tonic::metadata::{Ascii, MetadataValue};

use crate::batcher::Priority;
use crate::config::{ClassifyArgs, ConnectArgs};
use crate::pb;
use crate::pb::tumor_classifier_client::TumorClassifierClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// The channel to `--server`: TLS when `--ca` is given or the URL is https (with a client
/// certificate for mutual TLS when `--cert`/`--key` are).
pub async fn connect(args: &ConnectArgs) -> Result<Channel, String> {
    let tls = args.ca.is_some() || args.server.starts_with("https://");
    let url = match args.server.strip_prefix("http://") {
        Some(rest) if tls => format!("https://{rest}"),
        _ => args.server.clone(),
    };
    let mut endpoint = Endpoint::from_shared(url.clone())
        .map_err(|e| format!("--server {url}: not a URL: {e}"))?;
    if tls {
        let Some(ca) = &args.ca else {
            return Err(format!(
                "--server {url}: TLS needs --ca (the CA that signed the server's certificate)"
            ));
        };
        let read = |path: &std::path::Path, flag: &str| {
            std::fs::read(path).map_err(|e| format!("{flag} {}: {e}", path.display()))
        };
        let mut config =
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca, "--ca")?));
        if let (Some(cert), Some(key)) = (&args.cert, &args.key) {
            config = config.identity(Identity::from_pem(
                read(cert, "--cert")?,
                read(key, "--key")?,
            ));
        }
        if let Some(domain) = &args.tls_domain {
            config = config.domain_name(domain.clone());
        }
        endpoint = endpoint
            .tls_config(config)
            .map_err(|e| format!("--server {url}: TLS configuration: {e}"))?;
    }
    endpoint
        .connect()
        .await
        .map_err(|e| format!("cannot connect to {url}: {}", error_chain(&e)))
}

/// An error with its sources (a TLS failure is several levels down).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// What every call of a run needs: the client, the call options and the credential.
pub(crate) struct Caller<'a> {
    client: TumorClassifierClient<Channel>,
    args: &'a ClassifyArgs,
    /// `Bearer <token>` when `--token` (or BRAINAI_TOKEN) is set.
    bearer: Option<MetadataValue<Ascii>>,
}

impl Caller<'_> {
    /// A request with the call deadline (`--timeout-s`) and the credential.
    fn request<T>(&self, message: T) -> tonic::Request<T> {
        request(message, &self.args.connect, &self.bearer)
    }
}

/// `Bearer <token>` as a header value, when `--token` (or BRAINAI_TOKEN) is set.
/// A call's request: `message` with the deadline and the bearer token of `connect`.
fn request<T>(
    message: T,
    connect: &ConnectArgs,
    bearer: &Option<MetadataValue<Ascii>>,
) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(Duration::from_secs_f64(connect.timeout_s));
    if let Some(bearer) = bearer {
        request
            .metadata_mut()
            .insert("authorization", bearer.clone());
    }
    request
}

fn bearer(args: &ConnectArgs) -> Result<Option<MetadataValue<Ascii>>, String> {
    let Some(token) = &args.token else {
        return Ok(None);
    };
    let mut value: MetadataValue<Ascii> = format!("Bearer {token}")
        .parse()
        // Not echoed: it is a secret.
        .map_err(|_| "--token: not a valid header value (printable ASCII only)".to_string())?;
    value.set_sensitive(true);
    Ok(Some(value))
}

/// `brainai classify`: exit status 0 when every file was classified, 1 when any failed (`Err`:
/// the run could not start, or stopped).
pub async fn run(args: &ClassifyArgs) -> Result<ExitCode, String> {
    let bearer = bearer(&args.connect)?;
    let channel = connect(&args.connect).await?;
    let client = TumorClassifierClient::new(channel)
        .max_decoding_message_size(64 * 1024 * 1024)
        .max_encoding_message_size(64 * 1024 * 1024);
    let caller = Caller {
        client,
        args,
        bearer,
    };
    if !args.slice.given().is_empty() {
        return slice(&caller).await;
    }
    let files = expand(&args.files)?;
    if args.series || args.sr_out.is_some() {
        return series(&caller, &files).await;
    }
    calls::classify(&caller, files).await
}

/// How a file is declared: DICOM by its extension, else left to the server's detection.
fn format_of(path: &std::path::Path) -> pb::ImageFormat {
    if has_extension(path, &["dcm", "dicom"]) {
        pb::ImageFormat::Dicom
    } else {
        pb::ImageFormat::Unspecified
    }
}

fn priority(args: &ClassifyArgs) -> i32 {
    let priority = match args.priority {
        None => pb::Priority::Unspecified,
        Some(Priority::Stat) => pb::Priority::Stat,
        Some(Priority::Routine) => pb::Priority::Routine,
    };
    priority as i32
}

/// One ClassifySlices call with the slice's images (a multi-modal model): printed as one file's
/// result, named by the sequences given.
async fn slice(caller: &Caller<'_>) -> Result<ExitCode, String> {
    let args = caller.args;
    let images = segment::slice_images(&args.slice)?;
    let name: Vec<String> = args
        .slice
        .given()
        .iter()
        .map(|(sequence, path)| format!("{sequence}={}", path.display()))
        .collect();
    let name = name.join(",");
    let message = pb::ClassifySlicesRequest {
        slices: vec![pb::SegmentSlice {
            id: name.clone(),
            images,
        }],
        model: args.model.clone().unwrap_or_default(),
        version: args.model_version.clone().unwrap_or_default(),
        priority: priority(args),
    };
    let outcome = retry::with_retries(args.connect.max_tries, || {
        let mut client = caller.client.clone();
        let request = caller.request(message.clone());
        async move { client.classify_slices(request).await }
    })
    .await
    .map_err(|failed| failed.describe())
    .and_then(|response| {
        response
            .into_inner()
            .results
            .into_iter()
            .next()
            .ok_or_else(|| "the server answered no result".to_string())
    });
    let mut printer = output::Printer::new(args.json);
    printer.file(std::path::Path::new(&name), outcome);
    printer.finish(None);
    Ok(if printer.failed() == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// One ClassifySeries call with every file; the SR into `--sr-out` when asked.
async fn series(caller: &Caller<'_>, files: &[std::path::PathBuf]) -> Result<ExitCode, String> {
    let args = caller.args;
    let mut instances = Vec::with_capacity(files.len());
    for path in files {
        let data = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        instances.push(pb::Image {
            id: path.display().to_string(),
            data: data.into(),
            format: pb::ImageFormat::Unspecified as i32,
            raw: None,
        });
    }
    let response = retry::with_retries(args.connect.max_tries, || {
        let mut client = caller.client.clone();
        let request = caller.request(pb::ClassifySeriesRequest {
            instances: instances.clone(),
            model: args.model.clone().unwrap_or_default(),
            version: args.model_version.clone().unwrap_or_default(),
            priority: priority(args),
            structured_report: args.sr_out.is_some(),
        });
        async move { client.classify_series(request).await }
    })
    .await
    .map_err(|failed| failed.describe())?
    .into_inner();
    let mut written = None;
    if let Some(dir) = &args.sr_out {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let series_uid = response
            .series
            .as_ref()
            .map(|s| s.series_instance_uid.clone())
            .unwrap_or_default();
        let path = dir.join(format!("sr-{series_uid}.dcm"));
        std::fs::write(&path, &response.structured_report)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        written = Some(path);
    }
    let finding = response.finding.clone().unwrap_or_default();
    let model = response.model.clone().unwrap_or_default();
    if args.json {
        let slices: Vec<_> = response
            .slices
            .iter()
            .map(|s| {
                json!({
                    "slice": s.slice,
                    "sop_instance_uid": s.sop_instance_uid,
                    "frame": s.frame,
                    "position_mm": s.position_mm,
                    "selected": s.selected,
                    "result": s.classification.as_ref().map(output::to_json),
                })
            })
            .collect();
        let out = json!({
            "series": response.series.as_ref().map(|s| json!({
                "study_instance_uid": s.study_instance_uid,
                "series_instance_uid": s.series_instance_uid,
            })),
            "finding": {
                "label": finding.label,
                "probability": finding.probability,
                "aggregation": finding.aggregation,
                "slice": finding.slice,
            },
            "detected_sequence": response.detected_sequence,
            "sort": response.sort,
            "slices": slices,
            "model": {
                "name": model.name,
                "version": model.version,
                "sha256": model.sha256,
                "clinically_trained": model.clinically_trained,
            },
            "warnings": response.warnings,
            "structured_report": written.as_ref().map(|p| p.display().to_string()),
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&out).expect("JSON values serialise")
        );
    } else {
        for s in &response.slices {
            let result = s
                .classification
                .as_ref()
                .map_or("not classified".to_string(), |c| {
                    format!("{}\t{:.4}", c.label, c.probability)
                });
            let position = s.position_mm.map_or("-".to_string(), |p| format!("{p:.2}"));
            println!("{}\t{}\t{}", s.slice, position, result);
        }
        println!(
            "series\t{}\t{:.4}\t{}\t{}\tmodel={} v{} sha256={}",
            finding.label,
            finding.probability,
            finding.aggregation,
            response.detected_sequence,
            model.name,
            model.version,
            &model.sha256[..model.sha256.len().min(12)]
        );
        if let Some(path) = &written {
            println!("structured report\t{}", path.display());
        }
        for warning in &response.warnings {
            eprintln!("warning: {warning}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn has_extension(path: &std::path::Path, extensions: &[&str]) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| extensions.iter().any(|x| e.eq_ignore_ascii_case(x)))
}

/// The files to send: files as given; a directory's images (PNG, JPEG, `.dcm`, and extensionless
/// files that are DICOM, as PACS exports often are), recursively, in name order.
pub(crate) fn expand(paths: &[std::path::PathBuf]) -> Result<Vec<std::path::PathBuf>, String> {
    let mut files = Vec::new();
    for path in paths {
        if !path.is_dir() {
            files.push(path.clone());
            continue;
        }
        let mut found = Vec::new();
        let mut pending = vec![path.clone()];
        while let Some(dir) = pending.pop() {
            let entries = std::fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            for entry in entries {
                let entry = entry.map_err(|e| format!("{}: {e}", dir.display()))?;
                let p = entry.path();
                if p.is_dir() {
                    pending.push(p);
                } else if has_extension(&p, &["png", "jpg", "jpeg", "dcm", "dicom"])
                    || (p.extension().is_none() && is_dicom_file(&p))
                {
                    found.push(p);
                }
            }
        }
        if found.is_empty() {
            return Err(format!(
                "{}: no PNG, JPEG or DICOM files in this directory",
                path.display()
            ));
        }
        found.sort();
        files.extend(found);
    }
    Ok(files)
}

pub(crate) fn is_dicom_file(path: &std::path::Path) -> bool {
    use std::io::Read;
    let mut head = [0u8; 132];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok_and(|_| crate::input::dicom::is_dicom(&head))
}
