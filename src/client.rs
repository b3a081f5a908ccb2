//! `brainai classify`: a real gRPC client that classifies image files with a running server.

use std::process::ExitCode;
use std::time::Duration;

use serde_json::json;

use crate::batcher::Priority;
use crate::config::ClassifyArgs;
use crate::pb;
use crate::pb::tumor_classifier_client::TumorClassifierClient;

/// Files per request, so a long file list stays under the server's per-request limit.
const FILES_PER_REQUEST: usize = 32;

pub async fn run(args: &ClassifyArgs) -> Result<ExitCode, String> {
    let mut client = TumorClassifierClient::connect(args.server.clone())
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", args.server))?
        .max_decoding_message_size(64 * 1024 * 1024)
        .max_encoding_message_size(64 * 1024 * 1024);

    let mut rows = Vec::new();
    for chunk in args.files.chunks(FILES_PER_REQUEST) {
        let mut images = Vec::with_capacity(chunk.len());
        for path in chunk {
            let data = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
            images.push(pb::Image {
                id: path.display().to_string(),
                data,
                format: pb::ImageFormat::Unspecified as i32,
                raw: None,
            });
        }
        let mut request = tonic::Request::new(pb::ClassifyRequest {
            images,
            model: args.model.clone().unwrap_or_default(),
            version: args.model_version.clone().unwrap_or_default(),
            priority: match args.priority {
                None => pb::Priority::Unspecified,
                Some(Priority::Stat) => pb::Priority::Stat,
                Some(Priority::Routine) => pb::Priority::Routine,
            } as i32,
        });
        request.set_timeout(Duration::from_secs_f64(args.timeout_s));
        let response = client.classify(request).await.map_err(|status| {
            format!(
                "server answered {:?}: {} (files: {})",
                status.code(),
                status.message(),
                chunk
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?;
        rows.extend(response.into_inner().results);
    }

    if args.json {
        let results: Vec<_> = rows.iter().map(to_json).collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({ "results": results }))
                .expect("JSON values serialise")
        );
    } else {
        let mut warned = std::collections::BTreeSet::new();
        for row in &rows {
            let probabilities: Vec<String> = row
                .probabilities
                .iter()
                .map(|p| format!("{}={:.4}", p.label, p.probability))
                .collect();
            let model = row.model.clone().unwrap_or_default();
            println!(
                "{}\t{}\t{:.4}\t[{}]\tmodel={} v{} sha256={}",
                row.image_id,
                row.label,
                row.probability,
                probabilities.join(" "),
                model.name,
                model.version,
                &model.sha256[..model.sha256.len().min(12)]
            );
            for warning in &row.warnings {
                if warned.insert(warning.clone()) {
                    eprintln!("warning: {warning}");
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn to_json(row: &pb::Classification) -> serde_json::Value {
    let model = row.model.clone().unwrap_or_default();
    let timing = row.timing.unwrap_or_default();
    json!({
        "file": row.image_id,
        "label": row.label,
        "probability": row.probability,
        "probabilities": row.probabilities.iter().map(|p| (p.label.clone(), json!(p.probability))).collect::<serde_json::Map<_, _>>(),
        "model": {
            "name": model.name,
            "version": model.version,
            "sha256": model.sha256,
            "clinically_trained": model.clinically_trained,
        },
        "batch_size": row.batch_size,
        "timing": {
            "queue_seconds": timing.queue_seconds,
            "preprocess_seconds": timing.preprocess_seconds,
            "inference_seconds": timing.inference_seconds,
        },
        "warnings": row.warnings,
    })
}
