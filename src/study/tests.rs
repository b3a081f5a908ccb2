use super::measure::measure;
use super::*;
use crate::input::dicom::DicomIds;
use crate::input::dicom::{Acquisition, Geometry, Photometric, VoiFunction};

const AXIAL: [f64; 6] = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0];
const CHANNELS: [Sequence; 3] = [Sequence::Flair, Sequence::T1c, Sequence::T2];

/// A single-frame MR instance of `series` (described as `description`, which names its sequence)
/// at `z` mm, `rows × columns` of `spacing` mm.
fn header(series: &str, description: &str, sop: &str, z: f64, size: u32, spacing: f64) -> Header {
    Header {
        transfer_syntax: "1.2.840.10008.1.2.1".into(),
        ids: DicomIds {
            study_instance_uid: "1.2.3".into(),
            series_instance_uid: series.into(),
            sop_instance_uid: sop.into(),
        },
        modality: "MR".into(),
        rows: size,
        columns: size,
        frames: 1,
        samples_per_pixel: 1,
        bits_allocated: 16,
        bits_stored: 12,
        signed: false,
        photometric: Photometric::Monochrome2,
        rescale: None,
        modality_lut: None,
        windows: Vec::new(),
        voi_function: VoiFunction::Linear,
        voi_lut: None,
        padding: None,
        acquisition: Acquisition {
            series_description: description.into(),
            ..Default::default()
        },
        geometry: Geometry {
            sop_class_uid: "1.2.840.10008.5.1.4.1.1.4".into(),
            instance_number: None,
            position: Some([-10.0, -10.0, z]),
            orientation: Some(AXIAL),
            frame_positions: Vec::new(),
            pixel_spacing: Some([spacing, spacing]),
            slice_thickness: Some(1.0),
            frame_of_reference_uid: "1.2.3.4".into(),
            patient_key: Some(7),
        },
    }
}

/// A study of three series on one grid (`n` slices 1 mm apart, 20×20 pixels of 1 mm), the
/// instances interleaved as a PACS might send them.
fn same_grid_study(n: usize) -> Vec<Header> {
    let mut out = Vec::new();
    for z in 0..n {
        for (series, description) in [
            ("1.1", "AX FLAIR"),
            ("1.2", "AX T1 POST GD"),
            ("1.3", "AX T2"),
        ] {
            out.push(header(
                series,
                description,
                &format!("{series}.{z}"),
                z as f64,
                20,
                1.0,
            ));
        }
    }
    out.reverse();
    out
}

fn err(headers: &[Header], options: &StudyOptions) -> String {
    plan(headers, &CHANNELS, None, options).unwrap_err().message
}

#[test]
fn a_study_on_one_grid_takes_the_exact_path_in_slice_order() {
    let plan = plan(
        &same_grid_study(5),
        &CHANNELS,
        None,
        &StudyOptions::default(),
    )
    .unwrap();
    let uids: Vec<&str> = plan
        .channels
        .iter()
        .map(|c| c.series_instance_uid.as_str())
        .collect();
    assert_eq!(uids, ["1.1", "1.2", "1.3"]);
    assert!(plan.channels.iter().all(|c| c.exact));
    assert_eq!(plan.slices.len(), 5);
    let along: Vec<f64> = plan.slices.iter().map(|s| s.along).collect();
    assert_eq!(along, [0.0, 1.0, 2.0, 3.0, 4.0]);
    assert!(plan.slices.iter().all(|s| s.complete()));
    assert_eq!(plan.depth, Some((1.0, DepthFrom::Positions)));
    assert!(plan.warnings.is_empty(), "{:?}", plan.warnings);
}

#[test]
fn another_spacing_is_paired_with_the_nearest_slice_within_half_its_spacing() {
    // FLAIR: 1 mm slices at 0..=9; T1c: 2 mm slices at 0, 2, 4, 6 (coarser pixels too);
    // T2: 3 mm slices at 0, 3, 6, 9.
    let mut headers = Vec::new();
    for z in 0..10 {
        headers.push(header("1.1", "FLAIR", &format!("a{z}"), z as f64, 20, 1.0));
    }
    for z in [0.0, 2.0, 4.0, 6.0] {
        headers.push(header("1.2", "T1 +C", &format!("b{z}"), z, 10, 2.0));
    }
    for z in [0.0, 3.0, 6.0, 9.0] {
        headers.push(header("1.3", "T2", &format!("c{z}"), z, 20, 1.0));
    }
    let p = plan(&headers, &CHANNELS, None, &StudyOptions::default()).unwrap();
    let partner = |slice: usize, c: usize| p.slices[slice].partners[c];
    // z = 5: T1c's slices at 4 and 6 are both 1 mm away (half its spacing): the first nearest.
    assert_eq!(partner(5, 1), Some(Partner::Nearest(12)));
    // z = 7: T1c's nearest is at 6, 1 mm away; z = 8: 2 mm from 6, more than half: none.
    assert_eq!(partner(7, 1), Some(Partner::Nearest(13)));
    assert_eq!(partner(8, 1), None);
    // T2 is on the reference's pixel grid: its slices at 0, 3, 6, 9 are exact partners; z = 1
    // takes z = 0 (within 1.5 mm) resampled... on the same in-plane grid but not the same
    // position, so not exact.
    assert_eq!(partner(3, 2), Some(Partner::Exact(headers.len() - 3)));
    assert_eq!(partner(1, 2), Some(Partner::Nearest(headers.len() - 4)));
    assert!(!p.channels[1].exact && !p.channels[2].exact);
    assert!(
        p.warnings
            .iter()
            .any(|w| w.contains("2 of 10 reference slices")),
        "{:?}",
        p.warnings
    );
    // Linear: between the two neighbours, by distance.
    let linear = StudyOptions {
        interpolation: Interpolation::Linear,
        ..Default::default()
    };
    let p = plan(&headers, &CHANNELS, None, &linear).unwrap();
    assert_eq!(p.slices[5].partners[1], Some(Partner::Linear(12, 13, 0.5)));
    // Past the last T1c slice (6) but within half its spacing: the nearest, not nothing.
    assert_eq!(p.slices[7].partners[1], Some(Partner::Nearest(13)));
    assert_eq!(p.slices[8].partners[1], None);
}

#[test]
fn series_are_found_by_header_or_by_name_and_refused_naming_them() {
    let study = same_grid_study(2);
    // A missing sequence: named, with what the study has.
    let no_t2: Vec<Header> = study
        .iter()
        .filter(|h| h.ids.series_instance_uid != "1.3")
        .cloned()
        .collect();
    let e = err(&no_t2, &StudyOptions::default());
    assert!(
        e.starts_with("the study has no T2 series") && e.contains("series 1.1: FLAIR"),
        "{e}"
    );
    // Two series claiming one sequence.
    let mut two = study.clone();
    for h in &mut two {
        if h.ids.series_instance_uid == "1.3" {
            h.acquisition.series_description = "FLAIR".into();
        }
    }
    let e = err(&two, &StudyOptions::default());
    assert!(
        e.contains("series 1.1 and 1.3 are each FLAIR")
            || e.contains("series 1.3 and 1.1 are each FLAIR"),
        "{e}"
    );
    // Naming settles it.
    let named = StudyOptions {
        named: vec![("1.3".into(), Sequence::T2)],
        ..Default::default()
    };
    let p = plan(&two, &CHANNELS, None, &named).unwrap();
    assert_eq!(p.channels[2].because, "named by the caller");
    // Headers that say nothing: refused until named.
    let mut silent = study.clone();
    for h in &mut silent {
        if h.ids.series_instance_uid == "1.2" {
            h.acquisition.series_description = "series 2".into();
        }
    }
    assert!(err(&silent, &StudyOptions::default()).contains("no T1c series"));
    let named = StudyOptions {
        named: vec![("1.2".into(), Sequence::T1c)],
        ..Default::default()
    };
    assert!(plan(&silent, &CHANNELS, None, &named).is_ok());
    let unknown = StudyOptions {
        named: vec![("9.9".into(), Sequence::T1c)],
        ..Default::default()
    };
    let e = err(&study, &unknown);
    assert!(
        e.contains("9.9") && e.contains("is named, but no instance"),
        "{e}"
    );
}

#[test]
fn mixed_studies_patients_and_duplicates_are_refused_naming_the_instance() {
    let study = same_grid_study(2);
    let mut other_study = study.clone();
    other_study[4].ids.study_instance_uid = "9.9".into();
    assert!(
        err(&other_study, &StudyOptions::default())
            .starts_with("instance 4 belongs to another study")
    );
    let mut other_patient = study.clone();
    other_patient[2].geometry.patient_key = Some(8);
    assert!(
        err(&other_patient, &StudyOptions::default())
            .starts_with("instance 2 is of another patient")
    );
    let mut twice = study.clone();
    twice.push(study[1].clone());
    assert!(
        err(&twice, &StudyOptions::default())
            .starts_with("instance 6 is the same SOP instance as instance 1")
    );
    let mut same_position = study.clone();
    let mut extra = study[0].clone();
    extra.ids.sop_instance_uid = "extra".into();
    same_position.push(extra);
    let e = err(&same_position, &StudyOptions::default());
    assert!(e.contains("are at the same position"), "{e}");
    assert!(err(&[], &StudyOptions::default()).contains("no instances"));
}

#[test]
fn series_not_co_registered_are_refused_with_the_reason() {
    let study = same_grid_study(2);
    let mut other_frame = study.clone();
    for h in &mut other_frame {
        if h.ids.series_instance_uid == "1.2" {
            h.geometry.frame_of_reference_uid = "5.5".into();
        }
    }
    let e = plan(&other_frame, &CHANNELS, None, &StudyOptions::default()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::FailedPrecondition);
    assert!(
        e.message.contains("series 1.2 is not co-registered")
            && e.message.contains("Frame of Reference"),
        "{}",
        e.message
    );
    let mut tilted = study.clone();
    let t = 2f64.to_radians();
    for h in &mut tilted {
        if h.ids.series_instance_uid == "1.3" {
            h.geometry.orientation = Some([t.cos(), t.sin(), 0.0, -t.sin(), t.cos(), 0.0]);
        }
    }
    let e = plan(&tilted, &CHANNELS, None, &StudyOptions::default()).unwrap_err();
    assert!(
        e.message.contains("series 1.3 is oriented 2.0°"),
        "{}",
        e.message
    );
    let mut unplaced = study.clone();
    unplaced[3].geometry.position = None;
    assert!(
        err(&unplaced, &StudyOptions::default()).contains("has no usable Image Position (Patient)")
    );
    // Another modality: refused or left out, as the model's guard says.
    let mut with_ct = study.clone();
    let mut ct = header("2.1", "CT HEAD", "ct.1", 0.0, 20, 1.0);
    ct.modality = "CT".into();
    with_ct.push(ct);
    let mut guard = DicomGuard {
        modalities: vec!["MR".into()],
        sequences: Vec::new(),
        policy: GuardPolicy::Reject,
    };
    let e = plan(&with_ct, &CHANNELS, Some(&guard), &StudyOptions::default()).unwrap_err();
    assert!(
        e.message.starts_with("series 2.1 is \"CT\", not MR"),
        "{}",
        e.message
    );
    guard.policy = GuardPolicy::Warn;
    let p = plan(&with_ct, &CHANNELS, Some(&guard), &StudyOptions::default()).unwrap();
    assert!(
        p.warnings
            .iter()
            .any(|w| w.contains("series 2.1") && w.contains("left out"))
    );
}

#[test]
fn a_sphere_measures_its_analytic_volume() {
    // One channel; 1 mm voxels; a sphere of radius 12 mm centred off the grid.
    let n = 40usize;
    let headers: Vec<Header> = (0..n)
        .map(|z| header("1.1", "FLAIR", &format!("s{z}"), z as f64, n as u32, 1.0))
        .collect();
    let p = plan(&headers, &[Sequence::Flair], None, &StudyOptions::default()).unwrap();
    let (cx, cy, cz, r) = (9.3, 10.2, 19.6, 12.0);
    let masks: Vec<Vec<u8>> = p
        .slices
        .iter()
        .map(|s| {
            (0..n * n)
                .map(|i| {
                    let q = s.plane.point((i / n) as f64, (i % n) as f64);
                    let d2 = (q[0] - cx).powi(2) + (q[1] - cy).powi(2) + (q[2] - cz).powi(2);
                    u8::from(d2 <= r * r)
                })
                .collect()
        })
        .collect();
    let refs: Vec<(usize, &[u8])> = masks.iter().enumerate().map(|(k, m)| (k, &m[..])).collect();
    let labels = vec!["background".to_string(), "tumor".to_string()];
    let regions = vec![("all".to_string(), vec![0u8, 1])];
    let m = measure(&p, &refs, &labels, &regions);
    let analytic = 4.0 / 3.0 * std::f64::consts::PI * r.powi(3) / 1000.0;
    let got = m[1].volume_ml.unwrap();
    assert!(
        (got / analytic - 1.0).abs() < 0.01,
        "{got} mL vs {analytic} mL"
    );
    let (lo, hi) = m[1].bounds.unwrap();
    for k in 0..3 {
        let c = [cx, cy, cz][k];
        assert!(
            (lo[k] - (c - r)).abs() <= 1.0 && (hi[k] - (c + r)).abs() <= 1.0,
            "{lo:?} {hi:?}"
        );
    }
    assert_eq!(
        m[2].voxels,
        (n * n * n) as u64,
        "a region is the union of its classes"
    );
    let (first, last) = m[1].slices.unwrap();
    assert_eq!((first, last), (8, 31));
}
