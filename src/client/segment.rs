//! `brainai segment`: one slice (one image per MR sequence) through the `Segment` RPC; prints the
//! model, its warnings, and each label's and region's area and bounding box (or `--json`), and
//! writes the mask PNG with `--out`.

use std::process::ExitCode;
use std::time::Duration;

use serde_json::json;

use super::{bearer, connect, format_of, retry};
use crate::batcher::Priority;
use crate::config::{SegmentArgs, SliceFiles};
use crate::pb;
use crate::pb::tumor_classifier_client::TumorClassifierClient;

/// One slice's images as the `Segment` and `ClassifySlices` RPCs take them.
pub(super) fn slice_images(files: &SliceFiles) -> Result<Vec<pb::SequenceImage>, String> {
    let given = files.given();
    if given.is_empty() {
        return Err(
            "give the slice's images: --flair, --t1, --t1c and/or --t2, as the model's channels list them"
                .into(),
        );
    }
    let mut images = Vec::with_capacity(given.len());
    for (sequence, path) in &given {
        let data = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        images.push(pb::SequenceImage {
            sequence: sequence.to_string(),
            image: Some(pb::Image {
                id: String::new(),
                data: data.into(),
                format: format_of(path) as i32,
                raw: None,
            }),
        });
    }
    Ok(images)
}

/// Runs `brainai segment`: exit status 0 when the slice was segmented.
pub async fn run(args: &SegmentArgs) -> Result<ExitCode, String> {
    let images = slice_images(&args.slice)?;
    let token = bearer(&args.connect)?;
    let client = TumorClassifierClient::new(connect(&args.connect).await?)
        .max_decoding_message_size(256 << 20)
        .max_encoding_message_size(256 << 20);
    let priority = match args.priority {
        None => pb::Priority::Unspecified,
        Some(Priority::Stat) => pb::Priority::Stat,
        Some(Priority::Routine) => pb::Priority::Routine,
    } as i32;
    let message = pb::SegmentRequest {
        slices: vec![pb::SegmentSlice {
            id: String::new(),
            images,
        }],
        model: args.model.clone().unwrap_or_default(),
        version: args.model_version.clone().unwrap_or_default(),
        priority,
        probabilities: false,
    };
    let response = retry::with_retries(args.connect.max_tries, || {
        let mut client = client.clone();
        let mut request = tonic::Request::new(message.clone());
        request.set_timeout(Duration::from_secs_f64(args.connect.timeout_s));
        if let Some(token) = &token {
            request
                .metadata_mut()
                .insert("authorization", token.clone());
        }
        async move { client.segment(request).await }
    })
    .await
    .map_err(|failed| failed.describe())?
    .into_inner();
    let slice = response
        .results
        .into_iter()
        .next()
        .ok_or("the server answered no slice")?;
    if let Some(out) = &args.out {
        std::fs::write(out, &slice.mask_png).map_err(|e| format!("{}: {e}", out.display()))?;
    }
    let model = slice.model.clone().unwrap_or_default();
    let bbox = |b: &Option<pb::BoundingBox>| match b {
        Some(b) => json!([b.x0, b.y0, b.x1, b.y1]),
        None => serde_json::Value::Null,
    };
    if args.json {
        let answer = json!({
            "model": {
                "name": model.name,
                "version": model.version,
                "sha256": model.sha256,
                "clinically_trained": model.clinically_trained,
            },
            "width": slice.width,
            "height": slice.height,
            "labels": response.labels,
            "classes": slice.classes.iter().map(|c| json!({
                "label": c.label, "pixels": c.pixels, "bbox": bbox(&c.bbox),
            })).collect::<Vec<_>>(),
            "regions": slice.regions.iter().map(|r| json!({
                "name": r.name, "labels": r.labels, "pixels": r.pixels, "bbox": bbox(&r.bbox),
            })).collect::<Vec<_>>(),
            "warnings": slice.warnings,
            "mask": args.out.as_ref().map(|p| p.display().to_string()),
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&answer).expect("JSON values serialise")
        );
        return Ok(ExitCode::SUCCESS);
    }
    let sha = model.sha256.get(..12).unwrap_or(&model.sha256);
    println!(
        "model {} v{} (sha256 {sha}…), mask {}×{}",
        model.name, model.version, slice.width, slice.height
    );
    for warning in &slice.warnings {
        eprintln!("warning: {warning}");
    }
    let total = u64::from(slice.width) * u64::from(slice.height);
    let line = |kind: &str, name: &str, pixels: u64, b: &Option<pb::BoundingBox>| {
        let share = if total == 0 {
            0.0
        } else {
            100.0 * pixels as f64 / total as f64
        };
        let bbox = match b {
            Some(b) => format!("x {}–{}, y {}–{}", b.x0, b.x1, b.y0, b.y1),
            None => "-".into(),
        };
        println!("{kind}\t{name}\t{pixels} px\t{share:.2} %\t{bbox}");
    };
    for c in &slice.classes {
        line("label", &c.label, c.pixels, &c.bbox);
    }
    for r in &slice.regions {
        line("region", &r.name, r.pixels, &r.bbox);
    }
    if let Some(out) = &args.out {
        println!("mask written to {}", out.display());
    }
    Ok(ExitCode::SUCCESS)
}
