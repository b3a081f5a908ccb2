//! A DICOM study segmented end to end (issue 24): synthetic phantom studies written with pydicom
//! (`tests/dicom/make_study.py`: a sphere seen by a FLAIR, a T1c and a T2 series), streamed to
//! `SegmentStudy` against the real server and ONNX Runtime with the `seg-study` test model (tumor
//! where the T2 level is above 127). Checked: the series found from their headers, the exact
//! path on one grid, masks equal to the sphere, the volume within 1 % of the analytic one,
//! resampling of a series on another grid equal to scipy's `map_coordinates`
//! (`tests/reference/study_reference.py`), slices without a partner reported, and each bad study
//! refused naming the series or the instance.

mod common;

use std::path::{Path, PathBuf};

use brainai::pb;
use common::*;
use pb::segment_study_request::Part;
use serde_json::json;
use tonic::Code;

const STUDY: &str = "1.2.826.0.1.3680043.10.1087.7";
const FOR: &str = "1.2.826.0.1.3680043.10.1087.7.9";
/// The phantom: a sphere of radius 18 mm, inside 900, outside 100 (stored values).
const CENTER: [f64; 3] = [0.3, -0.4, 23.6];
const RADIUS: f64 = 18.0;

fn series(
    uid: &str,
    description: &str,
    size: u32,
    spacing: f64,
    origin: [f64; 3],
    slices: u32,
    step: f64,
) -> serde_json::Value {
    json!({"uid": uid, "description": description, "rows": size, "columns": size,
           "spacing": [spacing, spacing], "origin": origin, "slices": slices, "step": step})
}

/// Three series on one grid: 64×64 pixels of 1 mm, 48 slices 1 mm apart.
fn one_grid() -> Vec<serde_json::Value> {
    vec![
        series(
            &format!("{STUDY}.1"),
            "AX FLAIR",
            64,
            1.0,
            [-32.0, -32.0, 0.0],
            48,
            1.0,
        ),
        series(
            &format!("{STUDY}.2"),
            "AX T1 POST GD",
            64,
            1.0,
            [-32.0, -32.0, 0.0],
            48,
            1.0,
        ),
        series(
            &format!("{STUDY}.3"),
            "AX T2",
            64,
            1.0,
            [-32.0, -32.0, 0.0],
            48,
            1.0,
        ),
    ]
}

/// Writes a study of `series` into `dir`; its files, sorted.
fn make_study(dir: &Path, series: Vec<serde_json::Value>) -> Vec<PathBuf> {
    let spec = json!({
        "study_uid": STUDY, "patient_id": "PHANTOM-1", "frame_of_reference_uid": FOR,
        "sphere": {"center": CENTER, "radius": RADIUS, "inside": 900, "outside": 100},
        "series": series,
    });
    write_study(dir, &spec)
}

fn repository() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    copy_model("seg-study", root.path(), "seg-study");
    copy_model("tiny", root.path(), "tiny");
    root
}

async fn serve_study(extra: &[&str]) -> (TestServer, tempfile::TempDir) {
    let root = repository();
    let mut flags = vec!["--default-model", "tiny"];
    flags.extend_from_slice(extra);
    (
        serve(repository_args(root.path(), &flags), None).await,
        root,
    )
}

/// The messages of a SegmentStudy call: settings, then the instances in an interleaved order.
fn messages(settings: pb::StudySettings, instances: Vec<Vec<u8>>) -> Vec<pb::SegmentStudyRequest> {
    let n = instances.len();
    // A fixed permutation (stride coprime with n): any order must do.
    let stride = (1..n.max(2)).rev().find(|s| gcd(*s, n) == 1).unwrap_or(1);
    let mut order: Vec<usize> = (0..n).map(|k| (k * stride) % n.max(1)).collect();
    order.dedup();
    let mut slots: Vec<Option<Vec<u8>>> = instances.into_iter().map(Some).collect();
    std::iter::once(Part::Settings(settings))
        .chain(
            order
                .into_iter()
                .map(|k| Part::Instance(slots[k].take().unwrap().into())),
        )
        .map(|part| pb::SegmentStudyRequest { part: Some(part) })
        .collect()
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

fn settings(seg: bool) -> pb::StudySettings {
    pb::StudySettings {
        model: "seg-study".into(),
        segmentation_object: seg,
        ..Default::default()
    }
}

async fn segment_study(
    t: &mut TestServer,
    messages: Vec<pb::SegmentStudyRequest>,
) -> Result<pb::SegmentStudyResponse, tonic::Status> {
    let mut client = t.client.clone().max_decoding_message_size(256 << 20);
    bounded(
        "segment study",
        client.segment_study(futures_util::stream::iter(messages)),
    )
    .await
    .map(|r| r.into_inner())
}

fn read_all(files: &[PathBuf]) -> Vec<Vec<u8>> {
    files.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

/// The sphere on the one-grid study's slice at z mm: 1 where the pixel centre is inside.
fn sphere_slice(z: f64) -> Vec<u8> {
    (0..64 * 64)
        .map(|i| {
            let (r, c) = ((i / 64) as f64, (i % 64) as f64);
            let p = [-32.0 + c, -32.0 + r, z];
            let d2: f64 = (0..3).map(|k| (p[k] - CENTER[k]).powi(2)).sum();
            u8::from(d2 <= RADIUS * RADIUS)
        })
        .collect()
}

fn analytic_ml() -> f64 {
    4.0 / 3.0 * std::f64::consts::PI * RADIUS.powi(3) / 1000.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_study_on_one_grid_measures_the_sphere_and_answers_a_valid_segmentation_object() {
    let dir = tempfile::tempdir().unwrap();
    let files = make_study(dir.path(), one_grid());
    assert_eq!(files.len(), 144);
    let (mut t, _root) = serve_study(&[]).await;
    let r = segment_study(&mut t, messages(settings(true), read_all(&files)))
        .await
        .unwrap();
    // The series, found from their headers, in the model's channel order, on the exact path.
    let found: Vec<(&str, &str, bool)> = r
        .series
        .iter()
        .map(|s| (s.sequence.as_str(), s.series_instance_uid.as_str(), s.exact))
        .collect();
    let uid = |k: u32| format!("{STUDY}.{k}");
    assert_eq!(
        found,
        [
            ("FLAIR", uid(1).as_str(), true),
            ("T1c", uid(2).as_str(), true),
            ("T2", uid(3).as_str(), true)
        ]
    );
    assert_eq!(r.study_instance_uid, STUDY);
    assert_eq!(r.model.as_ref().unwrap().name, "seg-study");
    assert!(
        r.warnings
            .iter()
            .any(|w| w.contains("not clinically trained"))
    );
    // Every reference slice segmented, in slice order, its mask the sphere exactly.
    assert_eq!(r.slices.len(), 48);
    for (k, s) in r.slices.iter().enumerate() {
        assert!(s.segmented, "slice {k}");
        assert_eq!(s.position, k as f64);
        assert_eq!(s.sop_instance_uid, format!("{}.{}", uid(1), k + 1));
        let (w, h, mask) = decode_mask(&s.mask_png);
        assert_eq!((w, h), (64, 64));
        assert_eq!(mask, sphere_slice(k as f64), "slice {k}");
    }
    // The volume: within 1 % of the sphere's.
    let tumor = r.measurements.iter().find(|m| m.name == "tumor").unwrap();
    let volume = tumor.volume_ml.unwrap();
    assert!(
        (volume / analytic_ml() - 1.0).abs() < 0.01,
        "{volume} mL vs {} mL",
        analytic_ml()
    );
    assert_eq!(r.voxel_depth_from, "positions");
    assert_eq!(r.voxel_depth_mm, 1.0);
    let whole = r
        .measurements
        .iter()
        .find(|m| m.name == "whole_tumor")
        .unwrap();
    assert_eq!(whole.voxels, tumor.voxels);
    assert_eq!(
        (tumor.first_slice, tumor.last_slice),
        (Some(6), Some(41)),
        "the sphere spans z 5.6 to 41.6"
    );
    for (k, centre) in CENTER.iter().enumerate() {
        assert!((tumor.bounds_min[k] - (centre - RADIUS)).abs() <= 1.0);
        assert!((tumor.bounds_max[k] - (centre + RADIUS)).abs() <= 1.0);
    }
    // The DICOM Segmentation object: dciodvfy, highdicom and pydicom.
    assert!(!r.segmentation_object.is_empty());
    let seg = dir.path().join("seg.dcm");
    std::fs::write(&seg, &r.segmentation_object).unwrap();
    check_segmentation_object(&seg, &files, &r);
    // Its measurement report: dciodvfy, and highdicom reads one volumetric group per segment,
    // referencing the SEG, with the answer's volume.
    let report = dir.path().join("report.dcm");
    std::fs::write(&report, &r.measurement_report).unwrap();
    common::dciodvfy(&report, "ComprehensiveSR");
    let checked: serde_json::Value = serde_json::from_str(&reference_script(
        "measurement_check.py",
        &[report.to_str().unwrap(), seg.to_str().unwrap()],
    ))
    .unwrap();
    let seg_uid = dicom_object::open_file(&seg)
        .unwrap()
        .element(dicom_dictionary_std::tags::SOP_INSTANCE_UID)
        .unwrap()
        .to_str()
        .unwrap()
        .trim_end_matches('\0')
        .to_string();
    let groups = checked["groups"].as_array().unwrap();
    let names: Vec<&str> = groups
        .iter()
        .map(|g| g["tracking_identifier"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["tumor", "whole_tumor"]);
    for (k, g) in groups.iter().enumerate() {
        assert_eq!(g["referenced_sop_instance"], seg_uid.as_str(), "{g}");
        assert_eq!(g["referenced_segment_numbers"], json!([k + 1]));
        let volume = g["measurements"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["unit"][0] == "ml")
            .expect("a volume in mL");
        let want = r
            .measurements
            .iter()
            .find(|m| m.name == names[k])
            .unwrap()
            .volume_ml
            .unwrap();
        assert!(
            (volume["value"].as_f64().unwrap() - want).abs() < 1e-4,
            "{volume} vs {want}"
        );
    }
    t.server.shutdown().await.unwrap();
}

/// dciodvfy reports no error; highdicom's masks equal the answer's, segment by segment; every
/// instance the object references was sent.
fn check_segmentation_object(seg: &Path, files: &[PathBuf], r: &pb::SegmentStudyResponse) {
    common::dciodvfy(seg, "Segmentation");
    let mut args = vec![seg.to_str().unwrap().to_string()];
    args.extend(r.slices.iter().map(|s| s.sop_instance_uid.clone()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let checked: serde_json::Value =
        serde_json::from_str(&reference_script("seg_check.py", &args)).unwrap();
    let sent: std::collections::HashSet<String> = files
        .iter()
        .map(|p| {
            let name = p.file_stem().unwrap().to_str().unwrap();
            let series = p.parent().unwrap().file_name().unwrap().to_str().unwrap();
            format!("{series}.{}", name.parse::<u32>().unwrap() + 1)
        })
        .collect();
    // The segments as the model declares them, coded.
    let segments = checked["segments"].as_array().expect("segments");
    let labels: Vec<&str> = segments
        .iter()
        .map(|s| s["label"].as_str().unwrap())
        .collect();
    assert_eq!(labels, ["tumor", "whole_tumor"]);
    assert_eq!(segments[0]["type"], json!(["108369006", "SCT", "Neoplasm"]));
    assert_eq!(segments[0]["category"][1], "SCT");
    assert_eq!(segments[0]["algorithm_type"], "AUTOMATIC");
    assert_eq!(segments[0]["algorithm_name"], "seg-study");
    assert!(
        checked["series_description"]
            .as_str()
            .unwrap()
            .contains("NOT FOR DIAGNOSTIC USE")
    );
    assert_eq!(checked["attributes"]["StudyInstanceUID"], STUDY);
    assert_eq!(checked["attributes"]["FrameOfReferenceUID"], FOR);
    // Every reference resolves to an instance that was sent.
    for source in checked["source_images"].as_array().unwrap() {
        assert!(
            sent.contains(source[2].as_str().unwrap()),
            "{source} was not sent"
        );
    }
    for frame in checked["frame_sources"].as_array().unwrap() {
        assert!(
            sent.contains(frame[1].as_str().unwrap()),
            "{frame} was not sent"
        );
    }
    // highdicom's masks equal the answer's, segment by segment.
    for s in &r.slices {
        let (_, _, mask) = decode_mask(&s.mask_png);
        let want: Vec<u64> = mask.iter().map(|&v| u64::from(v == 1)).collect();
        for number in ["1", "2"] {
            let got: Vec<u64> = checked["masks"][&s.sop_instance_uid][number]
                .as_array()
                .unwrap_or_else(|| panic!("segment {number} of {}", s.sop_instance_uid))
                .iter()
                .flat_map(|row| row.as_array().unwrap().iter().map(|v| v.as_u64().unwrap()))
                .collect();
            assert_eq!(got, want, "segment {number}, slice {}", s.sop_instance_uid);
        }
    }
}

fn hex(text: &str) -> Vec<u8> {
    (0..text.len() / 2)
        .map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_series_on_another_grid_is_resampled_like_the_scipy_reference() {
    let dir = tempfile::tempdir().unwrap();
    // T2: 32×32 pixels of 2 mm, shifted in-plane, 2 mm slices from z = 4.4: reference slices
    // z = 0..3 have no T2 slice within 1 mm and are not segmented.
    let mut grid = one_grid();
    grid[2] = series(
        &format!("{STUDY}.3"),
        "AX T2",
        32,
        2.0,
        [-32.5, -31.7, 4.4],
        22,
        2.0,
    );
    let files = make_study(dir.path(), grid);
    let (mut t, _root) = serve_study(&[]).await;
    let r = segment_study(&mut t, messages(settings(false), read_all(&files)))
        .await
        .unwrap();
    assert!(r.series[1].exact && !r.series[2].exact);
    assert!(r.segmentation_object.is_empty(), "not asked for");
    let reference = reference_script(
        "study_reference.py",
        &[
            dir.path().join(format!("{STUDY}.1")).to_str().unwrap(),
            dir.path().join(format!("{STUDY}.3")).to_str().unwrap(),
        ],
    );
    let reference: serde_json::Value = serde_json::from_str(&reference).unwrap();
    let (mut pixels, mut differ) = (0usize, 0usize);
    for (k, s) in r.slices.iter().enumerate() {
        let want = &reference[&s.sop_instance_uid];
        if want.is_null() {
            assert!(!s.segmented && s.missing == ["T2"], "slice {k}");
            continue;
        }
        assert!(s.segmented, "slice {k}");
        let want = hex(want.as_str().unwrap());
        let (_, _, got) = decode_mask(&s.mask_png);
        pixels += got.len();
        differ += got.iter().zip(&want).filter(|(a, b)| a != b).count();
    }
    assert_eq!(r.slices.iter().filter(|s| !s.segmented).count(), 4);
    // Float rounding may flip a pixel whose interpolated level is 127 to within 1e-5.
    assert!(
        differ * 10_000 <= pixels,
        "{differ} of {pixels} pixels differ from scipy's"
    );
    println!("{differ} of {pixels} mask pixels differ from the scipy reference");
    assert!(
        r.warnings
            .iter()
            .any(|w| w.contains("4 of 48 reference slices"))
    );
    let tumor = r.measurements.iter().find(|m| m.name == "tumor").unwrap();
    let volume = tumor.volume_ml.unwrap();
    assert!(
        (volume / analytic_ml() - 1.0).abs() < 0.05,
        "{volume} mL, resampled from 2 mm"
    );
    // Linear between the two T2 slices either side: the reference's blend, too.
    let mut linear = settings(false);
    linear.linear_between_slices = true;
    let l = segment_study(&mut t, messages(linear, read_all(&files)))
        .await
        .unwrap();
    let reference = reference_script(
        "study_reference.py",
        &[
            dir.path().join(format!("{STUDY}.1")).to_str().unwrap(),
            dir.path().join(format!("{STUDY}.3")).to_str().unwrap(),
            "--linear",
        ],
    );
    let reference: serde_json::Value = serde_json::from_str(&reference).unwrap();
    let (mut pixels, mut differ, mut unlike_nearest) = (0usize, 0usize, 0usize);
    for (s, nearest) in l.slices.iter().zip(&r.slices) {
        let want = &reference[&s.sop_instance_uid];
        if want.is_null() {
            assert!(!s.segmented);
            continue;
        }
        let want = hex(want.as_str().unwrap());
        assert!(
            s.segmented && nearest.segmented,
            "slice at {}: linear {}, nearest {}, missing {:?}",
            s.position,
            s.segmented,
            nearest.segmented,
            s.missing
        );
        let (_, _, got) = decode_mask(&s.mask_png);
        pixels += got.len();
        differ += got.iter().zip(&want).filter(|(a, b)| a != b).count();
        let (_, _, n) = decode_mask(&nearest.mask_png);
        unlike_nearest += got.iter().zip(&n).filter(|(a, b)| a != b).count();
    }
    assert!(
        differ * 10_000 <= pixels,
        "linear: {differ} of {pixels} pixels differ from scipy's"
    );
    assert!(
        unlike_nearest > 0,
        "linear interpolation changes some masks"
    );
    t.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_studies_are_refused_naming_the_series_or_the_instance() {
    let dir = tempfile::tempdir().unwrap();
    let small = |uid: u32, description: &str| {
        series(
            &format!("{STUDY}.{uid}"),
            description,
            64,
            1.0,
            [-32.0, -32.0, 0.0],
            4,
            1.0,
        )
    };
    let files = make_study(
        dir.path(),
        vec![
            small(1, "AX FLAIR"),
            small(2, "AX T1 POST GD"),
            small(3, "AX T2"),
        ],
    );
    let instances = read_all(&files);
    let (mut t, _root) = serve_study(&["--max-study-instances", "20"]).await;
    let refused = |r: Result<pb::SegmentStudyResponse, tonic::Status>| r.unwrap_err();
    // The same instance twice.
    let mut twice = instances.clone();
    twice.push(instances[0].clone());
    let e = refused(segment_study(&mut t, messages(settings(false), twice)).await);
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("is the same SOP instance as instance"),
        "{}",
        e.message()
    );
    // No T2 series: named, with what the study has.
    let no_t2: Vec<Vec<u8>> = instances[..8].to_vec();
    let e = refused(segment_study(&mut t, messages(settings(false), no_t2)).await);
    assert!(
        e.message().contains("the study has no T2 series"),
        "{}",
        e.message()
    );
    // Over the instance limit: refused at the first instance over.
    let mut many = instances.clone();
    many.extend(instances.iter().cloned());
    let e = refused(segment_study(&mut t, messages(settings(false), many)).await);
    assert!(
        e.message()
            .starts_with("instance 20: the study has more than 20 instances"),
        "{}",
        e.message()
    );
    // A truncated instance: named by its index in the stream.
    let mut truncated = instances.clone();
    let cut = truncated[5].len() / 2;
    truncated[5].truncate(cut);
    let e = refused(segment_study(&mut t, messages(settings(false), truncated)).await);
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    assert!(e.message().starts_with("instance "), "{}", e.message());
    // A classification model.
    let mut wrong = settings(false);
    wrong.model = "tiny".into();
    let e = refused(segment_study(&mut t, messages(wrong, instances.clone())).await);
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    // Not co-registered: T2 in another frame of reference.
    let other = tempfile::tempdir().unwrap();
    let mut t2 = small(3, "AX T2");
    t2["frame_of_reference_uid"] = json!("1.2.3.999");
    let files = make_study(
        other.path(),
        vec![small(1, "AX FLAIR"), small(2, "AX T1 POST GD"), t2],
    );
    let e = refused(segment_study(&mut t, messages(settings(false), read_all(&files))).await);
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        e.message()
            .contains(&format!("series {STUDY}.3 is not co-registered")),
        "{}",
        e.message()
    );
    // Two studies in one call.
    let mixed = tempfile::tempdir().unwrap();
    let mut t2 = small(3, "AX T2");
    t2["study_uid"] = json!("1.2.3.4.5");
    let files = make_study(
        mixed.path(),
        vec![small(1, "AX FLAIR"), small(2, "AX T1 POST GD"), t2],
    );
    let e = refused(segment_study(&mut t, messages(settings(false), read_all(&files))).await);
    assert!(
        e.message().contains("belongs to another study"),
        "{}",
        e.message()
    );
    // A series named by the caller: a T2 whose description says nothing.
    let silent = tempfile::tempdir().unwrap();
    let mut quiet = small(3, "series 3");
    quiet["silent"] = json!(true);
    let files = make_study(
        silent.path(),
        vec![small(1, "AX FLAIR"), small(2, "AX T1 POST GD"), quiet],
    );
    let e = refused(segment_study(&mut t, messages(settings(false), read_all(&files))).await);
    assert!(e.message().contains("no T2 series"), "{}", e.message());
    let mut named = messages(settings(false), read_all(&files));
    named.insert(
        1,
        pb::SegmentStudyRequest {
            part: Some(Part::Series(pb::SeriesSequence {
                series_instance_uid: format!("{STUDY}.3"),
                sequence: "t2".into(),
            })),
        },
    );
    let r = segment_study(&mut t, named).await.unwrap();
    assert_eq!(r.series[2].because, "named by the caller");
    t.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_segments_a_study_directory_and_writes_the_segmentation_object() {
    let dir = tempfile::tempdir().unwrap();
    let files = make_study(dir.path(), one_grid());
    let (mut t, _root) = serve_study(&[]).await;
    let out = tempfile::tempdir().unwrap();
    let run = {
        let (url, study, out) = (
            t.grpc_url(),
            dir.path().to_path_buf(),
            out.path().to_path_buf(),
        );
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_brainai"))
                .args([
                    "segment",
                    "--server",
                    &url,
                    "--model",
                    "seg-study",
                    "--json",
                ])
                .arg("--study")
                .arg(&study)
                .arg("--seg-out")
                .arg(&out)
                .output()
                .unwrap()
        })
    };
    let output = bounded("brainai segment --study", run).await.unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let printed: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let r = segment_study(&mut t, messages(settings(false), read_all(&files)))
        .await
        .unwrap();
    let tumor = r.measurements.iter().find(|m| m.name == "tumor").unwrap();
    let cli = printed["measurements"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "tumor")
        .unwrap();
    assert_eq!(cli["voxels"].as_u64(), Some(tumor.voxels));
    assert_eq!(printed["segmented"], 48);
    let seg = out.path().join("segmentation.dcm");
    assert_eq!(printed["segmentation_object"], seg.display().to_string());
    let report = out.path().join("measurement-report.dcm");
    assert_eq!(printed["measurement_report"], report.display().to_string());
    let sr = dicom_object::open_file(&report).expect("the measurement report is a DICOM file");
    assert_eq!(
        sr.element(dicom_dictionary_std::tags::MODALITY)
            .unwrap()
            .to_str()
            .unwrap()
            .trim(),
        "SR"
    );
    let object = dicom_object::open_file(&seg).expect("a DICOM file");
    use dicom_dictionary_std::tags;
    assert_eq!(
        object
            .element(tags::MODALITY)
            .unwrap()
            .to_str()
            .unwrap()
            .trim(),
        "SEG"
    );
    t.server.shutdown().await.unwrap();
}

#[test]
fn resampling_matches_scipy_on_planes_of_other_spacing_position_and_orientation() {
    use brainai::study::geometry::{Orientation, Plane};
    use brainai::study::resample::onto;
    // Source planes of several geometries against a target grid; values from a smooth function
    // plus a ramp, so every interpolation weight matters.
    let cases = [
        (
            [0.0, 0.0, 0.0],
            [1.0, 0.0, 0.0, 0.0, 1.0, 0.0],
            [2.0, 1.5],
            17u32,
            23u32,
        ),
        (
            [-3.3, 1.7, 0.0],
            [1.0, 0.0, 0.0, 0.0, 1.0, 0.0],
            [0.7, 0.9],
            40,
            31,
        ),
        (
            [1.0, -2.0, 0.5],
            {
                let t = 0.3f64.to_radians();
                [t.cos(), t.sin(), 0.0, -t.sin(), t.cos(), 0.0]
            },
            [1.2, 1.2],
            25,
            25,
        ),
    ];
    let target = Plane {
        origin: [-2.0, -1.0, 0.25],
        orientation: Orientation::new([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]).unwrap(),
        spacing: [0.8, 1.1],
        rows: 30,
        columns: 28,
    };
    let mut specs = Vec::new();
    let mut ours = Vec::new();
    for (origin, cosines, spacing, rows, columns) in cases {
        let from = Plane {
            origin,
            orientation: Orientation::new(cosines).unwrap(),
            spacing,
            rows,
            columns,
        };
        let values: Vec<f32> = (0..rows * columns)
            .map(|i| {
                let (r, c) = ((i / columns) as f32, (i % columns) as f32);
                (r * 0.37).sin() * 50.0 + c * 3.0 + 100.0
            })
            .collect();
        ours.push(onto(&values, &from, &target));
        specs.push(
            json!({"origin": origin, "orientation": cosines, "spacing": spacing,
                          "rows": rows, "columns": columns, "values": values}),
        );
    }
    let spec = json!({"target": {"origin": target.origin, "orientation": [1.0, 0.0, 0.0, 0.0, 1.0, 0.0],
                                  "spacing": target.spacing, "rows": target.rows, "columns": target.columns},
                      "sources": specs});
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), spec.to_string()).unwrap();
    let theirs = reference_script("resample_reference.py", &[file.path().to_str().unwrap()]);
    let theirs: Vec<Vec<f64>> = serde_json::from_str(&theirs).unwrap();
    for (k, (a, b)) in ours.iter().zip(&theirs).enumerate() {
        assert_eq!(a.len(), b.len());
        let worst = a
            .iter()
            .zip(b)
            .map(|(x, y)| (f64::from(*x) - y).abs())
            .fold(0.0, f64::max);
        assert!(worst < 1e-3, "case {k}: largest difference {worst}");
        assert!(
            a.contains(&0.0) || k == 1,
            "case {k}: some points fall outside"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_segment_study_answers_what_the_grpc_call_does() {
    let dir = tempfile::tempdir().unwrap();
    let files = make_study(dir.path(), one_grid());
    let (mut t, _root) = serve_study(&[]).await;
    let instances = read_all(&files);
    let names: Vec<String> = (0..files.len()).map(|k| format!("{k}.dcm")).collect();
    let parts: Vec<(&str, &[u8])> = names
        .iter()
        .zip(&instances)
        .map(|(n, d)| (n.as_str(), &d[..]))
        .collect();
    let (content_type, body) = multipart(&parts);
    let r = http(
        t.server.http_addr,
        "POST",
        "/v1/segment-study?model=seg-study&segmentation_object=1",
        &[("Content-Type", &content_type)],
        &body,
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let json = r.json();
    let grpc = segment_study(&mut t, messages(settings(false), instances.clone()))
        .await
        .unwrap();
    let tumor = grpc
        .measurements
        .iter()
        .find(|m| m.name == "tumor")
        .unwrap();
    let http_tumor = json["measurements"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "tumor")
        .unwrap();
    assert_eq!(http_tumor["voxels"].as_u64(), Some(tumor.voxels));
    assert_eq!(json["slices"].as_array().unwrap().len(), 48);
    assert_eq!(json["series"][2]["sequence"], "T2");
    assert!(
        json["segmentation_object"]
            .as_str()
            .is_some_and(|s| !s.is_empty())
    );
    assert_eq!(json["model"]["clinically_trained"], false);
    // Not a form: 400 saying what it takes; a study without its T2 series: 400 naming it.
    let r = http(
        t.server.http_addr,
        "POST",
        "/v1/segment-study?model=seg-study",
        &[],
        &instances[0],
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("one file part per DICOM instance")
    );
    let (content_type, body) = multipart(&parts[..96]);
    let r = http(
        t.server.http_addr,
        "POST",
        "/v1/segment-study?model=seg-study",
        &[("Content-Type", &content_type)],
        &body,
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(
        r.json()["error"].as_str().unwrap().contains("no T2 series"),
        "{:?}",
        r.json()
    );
    t.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_study_call_leaves_one_audit_record_with_uids_and_no_patient_data() {
    let dir = tempfile::tempdir().unwrap();
    let small = |uid: u32, description: &str| {
        series(
            &format!("{STUDY}.{uid}"),
            description,
            64,
            1.0,
            [-32.0, -32.0, 0.0],
            4,
            1.0,
        )
    };
    let files = make_study(
        dir.path(),
        vec![
            small(1, "AX FLAIR"),
            small(2, "AX T1 POST GD"),
            small(3, "AX T2"),
        ],
    );
    let logs = tempfile::tempdir().unwrap();
    let audit = logs.path().join("audit.jsonl");
    let flag = audit.display().to_string();
    let (mut t, _root) = serve_study(&["--audit-log", &flag]).await;
    let instances = read_all(&files);
    segment_study(&mut t, messages(settings(true), instances.clone()))
        .await
        .unwrap();
    // Refused: no T2 series.
    segment_study(&mut t, messages(settings(false), instances[..8].to_vec()))
        .await
        .unwrap_err();
    let records = audit_records(&audit, 2).await;
    assert_eq!(records.len(), 2, "one record per call: {records:#?}");
    for (record, (outcome, images)) in records.iter().zip([("OK", 12), ("INVALID_ARGUMENT", 8)]) {
        assert!(
            record["method"]
                .as_str()
                .unwrap()
                .ends_with("brainai.v1.TumorClassifier/SegmentStudy"),
            "{record}"
        );
        assert_eq!(record["outcome"], outcome, "{record}");
        assert_eq!(record["images"], images, "{record}");
        assert_eq!(record["model"]["name"], "seg-study", "{record}");
    }
    // The instances used are named by UID.
    let dicom = records[0]["dicom"].as_array().expect("DICOM references");
    assert_eq!(dicom.len(), 12);
    assert!(dicom.iter().all(|d| d["study"] == STUDY));
    // No patient attribute in the trail.
    let text = std::fs::read_to_string(&audit).unwrap();
    for value in ["Phantom", "PHANTOM-1", "19700101", "ACC1"] {
        assert!(!text.contains(value), "{value} in the audit trail: {text}");
    }
    t.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_callers_are_answered_while_a_study_runs_and_after_a_bad_one() {
    let dir = tempfile::tempdir().unwrap();
    let files = make_study(dir.path(), one_grid());
    let (t, _root) = serve_study(&[]).await;
    let instances = read_all(&files);
    // A study, a refused study (no T2) and single-image classifications, all at once.
    let study = {
        let mut client = t.client.clone().max_decoding_message_size(256 << 20);
        let messages = messages(settings(true), instances.clone());
        tokio::spawn(async move {
            client
                .segment_study(futures_util::stream::iter(messages))
                .await
        })
    };
    let refused = {
        let mut client = t.client.clone();
        let messages = messages(settings(false), instances[..96].to_vec());
        tokio::spawn(async move {
            client
                .segment_study(futures_util::stream::iter(messages))
                .await
        })
    };
    let classify = {
        let mut client = t.client.clone();
        tokio::spawn(async move {
            let mut answered = 0;
            for i in 0..20u8 {
                let r = client
                    .classify(request_for("tiny", "", vec![flat_image("x", 32, 32, 3, i)]))
                    .await;
                assert!(r.is_ok(), "a classification beside the studies: {r:?}");
                answered += 1;
            }
            answered
        })
    };
    let study = bounded("the study", study)
        .await
        .unwrap()
        .unwrap()
        .into_inner();
    assert_eq!(study.slices.iter().filter(|s| s.segmented).count(), 48);
    let e = bounded("the refused study", refused)
        .await
        .unwrap()
        .unwrap_err();
    assert!(e.message().contains("no T2 series"), "{}", e.message());
    assert_eq!(bounded("the classifications", classify).await.unwrap(), 20);
    t.server.shutdown().await.unwrap();
}
