//! `brainai segment`: one slice (one image per MR sequence) through the `Segment` RPC; prints the
//! model, its warnings, and each label's and region's area and bounding box (or `--json`), and
//! writes the mask PNG with `--out`.

use std::process::ExitCode;

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

/// Runs `brainai segment`: exit status 0 when the slice (or the study) was segmented.
pub async fn run(args: &SegmentArgs) -> Result<ExitCode, String> {
    if let Some(dir) = &args.study {
        return study(args, dir).await;
    }
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
        let request = super::request(message.clone(), &args.connect, &token);
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

/// `brainai segment --study DIR`: every DICOM file under DIR streamed to SegmentStudy.
async fn study(args: &SegmentArgs, dir: &std::path::Path) -> Result<ExitCode, String> {
    let files: Vec<std::path::PathBuf> = super::expand(&[dir.to_path_buf()])?
        .into_iter()
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n != "DICOMDIR" && !n.to_string_lossy().starts_with('.'))
                && super::is_dicom_file(p)
        })
        .collect();
    if files.is_empty() {
        return Err(format!("{}: no DICOM files", dir.display()));
    }
    let mut named = Vec::with_capacity(args.series.len());
    for pair in &args.series {
        let (uid, sequence) = pair
            .split_once('=')
            .ok_or_else(|| format!("--series {pair}: expected UID=SEQUENCE"))?;
        named.push(pb::SeriesSequence {
            series_instance_uid: uid.trim().into(),
            sequence: sequence.trim().into(),
        });
    }
    let settings = pb::StudySettings {
        model: args.model.clone().unwrap_or_default(),
        version: args.model_version.clone().unwrap_or_default(),
        priority: match args.priority {
            None => pb::Priority::Unspecified,
            Some(Priority::Stat) => pb::Priority::Stat,
            Some(Priority::Routine) => pb::Priority::Routine,
        } as i32,
        segmentation_object: args.seg_out.is_some(),
        linear_between_slices: args.linear_between_slices,
        previews: false,
    };
    let token = bearer(&args.connect)?;
    let client = TumorClassifierClient::new(connect(&args.connect).await?)
        .max_decoding_message_size(1 << 30)
        .max_encoding_message_size(256 << 20);
    use pb::segment_study_request::Part;
    let response = retry::with_retries(args.connect.max_tries, || {
        let mut client = client.clone();
        // The files are read as the stream is sent, one at a time; each try reads them anew.
        let head: Vec<pb::SegmentStudyRequest> = std::iter::once(Part::Settings(settings.clone()))
            .chain(named.iter().cloned().map(Part::Series))
            .map(|part| pb::SegmentStudyRequest { part: Some(part) })
            .collect();
        let instances = files.clone().into_iter().map(|path| {
            // A file that cannot be read is sent empty: the server names it by its index.
            let data = std::fs::read(&path).unwrap_or_default();
            pb::SegmentStudyRequest {
                part: Some(Part::Instance(data.into())),
            }
        });
        let stream = futures_util::stream::iter(head.into_iter().chain(instances));
        let request = super::request(stream, &args.connect, &token);
        async move { client.segment_study(request).await }
    })
    .await
    .map_err(|failed| failed.describe())?
    .into_inner();
    let mut written = None;
    if let Some(out) = &args.seg_out {
        std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
        let path = out.join("segmentation.dcm");
        std::fs::write(&path, &response.segmentation_object)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let report = out.join("measurement-report.dcm");
        std::fs::write(&report, &response.measurement_report)
            .map_err(|e| format!("{}: {e}", report.display()))?;
        written = Some((path, report));
    }
    let model = response.model.clone().unwrap_or_default();
    let segmented = response.slices.iter().filter(|s| s.segmented).count();
    if args.json {
        let answer = json!({
            "model": {
                "name": model.name,
                "version": model.version,
                "sha256": model.sha256,
                "clinically_trained": model.clinically_trained,
            },
            "study_instance_uid": response.study_instance_uid,
            "series": response.series.iter().map(|s| json!({
                "sequence": s.sequence, "series_instance_uid": s.series_instance_uid,
                "because": s.because, "instances": s.instances, "exact": s.exact,
            })).collect::<Vec<_>>(),
            "slices": response.slices.len(),
            "segmented": segmented,
            "voxel_depth_mm": response.voxel_depth_mm,
            "voxel_depth_from": response.voxel_depth_from,
            "measurements": response.measurements.iter().map(|m| json!({
                "name": m.name, "voxels": m.voxels, "volume_ml": m.volume_ml,
                "bounds_min": m.bounds_min, "bounds_max": m.bounds_max,
                "first_slice": m.first_slice, "last_slice": m.last_slice,
            })).collect::<Vec<_>>(),
            "warnings": response.warnings,
            "segmentation_object": written.as_ref().map(|p| p.0.display().to_string()),
            "measurement_report": written.as_ref().map(|p| p.1.display().to_string()),
            "timing": response.timing.map(|t| json!({
                "headers_seconds": t.headers_seconds,
                "decode_seconds": t.decode_seconds,
                "align_seconds": t.align_seconds,
                "queue_seconds": t.queue_seconds,
                "inference_seconds": t.inference_seconds,
                "segment_seconds": t.segment_seconds,
                "segmentation_object_seconds": t.segmentation_object_seconds,
            })),
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&answer).expect("JSON values serialise")
        );
        return Ok(ExitCode::SUCCESS);
    }
    let sha = model.sha256.get(..12).unwrap_or(&model.sha256);
    println!(
        "model {} v{} (sha256 {sha}…), {} files, {segmented} of {} reference slices segmented",
        model.name,
        model.version,
        files.len(),
        response.slices.len()
    );
    for warning in &response.warnings {
        eprintln!("warning: {warning}");
    }
    for s in &response.series {
        let how = if s.exact { "exact" } else { "resampled" };
        println!(
            "series\t{}\t{}\t{} instances\t{how}\t({})",
            s.sequence, s.series_instance_uid, s.instances, s.because
        );
    }
    for m in &response.measurements {
        let volume = m
            .volume_ml
            .map_or("-".to_string(), |v| format!("{v:.3} mL"));
        println!("volume\t{}\t{} voxels\t{volume}", m.name, m.voxels);
    }
    if let Some((seg, report)) = written {
        println!("DICOM Segmentation object written to {}", seg.display());
        println!(
            "measurement report (TID 1500 SR) written to {}",
            report.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}
