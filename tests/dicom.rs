//! DICOM input (issue 9): every transfer syntax and pixel-semantics file of `tests/data/dicom`, and
//! every image of pydicom's own test files (issue 22), decodes to the same stored values and 8-bit
//! images as the independent reference (`tests/reference/dicom_reference.py`: pydicom's
//! `pixel_array`, `apply_modality_lut`, `apply_voi_lut` + numpy), under every window policy; the
//! hostile files of `tests/data/dicom/bad` are refused with a reason and without large
//! allocations.

mod common;

use std::path::PathBuf;

use brainai::input::InputLimits;
use brainai::input::dicom::{self, Frame};
use brainai::model::DicomWindow;
use brainai::pb;
use brainai::preprocess::voi;
use common::*;
use serde_json::Value;

/// Lossy JPEG (DCT) through the served path (resized tensors): jpeg-decoder's (8-bit) and
/// libjpeg-turbo's (12-bit) IDCTs and the reference's libjpeg (pylibjpeg) round differently, as
/// ISO 10918-2 allows; measured up to 2 levels on ts_jpeg_baseline.dcm and ts_jpeg_extended.dcm
/// under the served models' windows. The decoders' own claim is in stored values (DCT_STORED).
/// Every other transfer syntax, lossy JPEG-LS and JPEG 2000 included, must be identical.
const DCT_LEVELS: u8 = 2;

const LIMITS: InputLimits = InputLimits {
    max_image_bytes: 64 << 20,
    max_pixels: 1 << 26,
};

fn data_dir() -> PathBuf {
    repo().join("tests/data/dicom")
}

fn manifest() -> Vec<Value> {
    let text = std::fs::read_to_string(data_dir().join("manifest.json")).unwrap();
    serde_json::from_str::<Value>(&text)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn policies() -> Vec<(DicomWindow, String)> {
    vec![
        (DicomWindow::Header, r#"{"window": "header"}"#.into()),
        (DicomWindow::MinMax, r#"{"window": "minmax"}"#.into()),
        (
            DicomWindow::Percentile {
                low: 1.0,
                high: 99.0,
            },
            r#"{"window": "percentile", "percentiles": [1.0, 99.0]}"#.into(),
        ),
        (
            DicomWindow::Percentile {
                low: 0.5,
                high: 99.5,
            },
            r#"{"window": "percentile", "percentiles": [0.5, 99.5]}"#.into(),
        ),
        (
            DicomWindow::Fixed {
                center: 1100.0,
                width: 1700.0,
            },
            r#"{"window": {"center": 1100.0, "width": 1700.0}}"#.into(),
        ),
    ]
}

/// The 8-bit frames of a decoded image, concatenated.
fn ours_of(image: &dicom::DicomImage, window: DicomWindow) -> Result<(Vec<u8>, usize), String> {
    let mut bytes = Vec::new();
    for frame in &image.frames {
        match frame {
            Frame::Color(pixels) => bytes.extend_from_slice(&pixels.data),
            Frame::Mono {
                stored, padding, ..
            } => bytes.extend(
                voi::to_gray8(stored, padding.as_deref(), &image.header, window)
                    .map_err(|e| e.to_string())?,
            ),
        }
    }
    Ok((bytes, image.frames.len()))
}

#[test]
fn every_file_and_policy_matches_the_pydicom_reference() {
    let files: Vec<PathBuf> = manifest()
        .iter()
        .filter(|e| e["expect"] == "ok")
        .map(|e| data_dir().join(e["file"].as_str().unwrap()))
        .collect();
    let policies = policies_with_the_narrowest();
    let json: Vec<String> = policies.iter().map(|(_, j)| j.clone()).collect();
    let mut failures = Vec::new();
    let mut compared = 0;
    for (path, reference) in files.iter().zip(reference_many(&files, &json)) {
        let name = path.strip_prefix(data_dir()).unwrap().display().to_string();
        let reference = reference.unwrap_or_else(|e| panic!("the reference refused {name}: {e:?}"));
        match dicom::decode(&std::fs::read(path).unwrap(), &LIMITS) {
            Err(e) => failures.push(format!("{name}: we refused it: {e}")),
            Ok(image) => {
                compared += compare(&name, &image, &reference, &policies, &mut failures);
            }
        }
    }
    assert!(compared > 150, "only {compared} comparisons ran");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Each hostile file of the manifest, with what its refusal must say.
const HOSTILE: &[(&str, &str)] = &[
    ("bad/not_dicom.dcm", "not its group length (0002,0000)"),
    ("bad/truncated.dcm", "declares 9450 bytes, but only"),
    (
        "bad/no_pixel_data.dcm",
        "no Pixel Data (7FE0,0010): not an image",
    ),
    (
        "bad/huge_length.dcm",
        "declares 4294967280 bytes, but only 8 remain",
    ),
    ("bad/dims_overflow.dcm", "65535×65535"),
    (
        "bad/bits_stored_gt_allocated.dcm",
        "Bits Stored (16) must be",
    ),
    (
        "bad/unsupported_ts.dcm",
        "1.2.840.10008.1.2.4.100 is not supported",
    ),
    ("bad/deflate_bomb.dcm", "inflates to more than"),
    ("bad/deep_nesting.dcm", "nested more than 32 levels"),
    ("bad/bits_allocated_odd.dcm", "Bits Allocated is 12"),
];

#[test]
fn hostile_files_are_refused_with_a_reason() {
    let listed: Vec<String> = manifest()
        .iter()
        .filter(|e| e["expect"] == "refused")
        .map(|e| e["file"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(listed.len(), HOSTILE.len(), "{listed:?}");
    for (file, reason) in HOSTILE {
        assert!(
            listed.iter().any(|l| l == file),
            "{file} not in the manifest"
        );
        let data = std::fs::read(data_dir().join(file)).unwrap();
        let err = dicom::decode(&data, &LIMITS).unwrap_err().to_string();
        assert!(err.contains(reason), "{file}: {err}");
        // The header-only size check (run before any decoding budget is taken) refuses the same
        // files for the same reason.
        let size = brainai::input::decoded_size(&data, brainai::input::Encoding::Dicom, &LIMITS);
        let err = size.expect_err(file).to_string();
        assert!(err.contains(reason), "{file}: size check: {err}");
    }
}

/// pydicom's own test files (`pydicom/data/test_files` of the pinned wheel): files nobody here
/// wrote.
fn pydicom_test_files() -> PathBuf {
    let out = std::process::Command::new(python())
        .args([
            "-c",
            "import pathlib, pydicom; print(pathlib.Path(pydicom.__file__).parent / 'data' / 'test_files')",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

#[test]
fn instances_that_are_not_images_are_refused_as_such() {
    // pydicom's structured reports, ECG waveform and RT plan: no Pixel Data, so no Rows either;
    // the reason is that they are not images (issue 22, finding 23).
    let dir = pydicom_test_files();
    for (file, sop_class) in [
        ("test-SR.dcm", "1.2.840.10008.5.1.4.1.1.88.33"),
        ("reportsi.dcm", "1.2.840.10008.5.1.4.1.1.88.11"),
        ("waveform_ecg.dcm", "1.2.840.10008.5.1.4.1.1.9.1.1"),
        ("rtplan.dcm", "1.2.840.10008.5.1.4.1.1.481.5"),
    ] {
        let data = std::fs::read(dir.join(file)).unwrap();
        let want = format!(
            "the instance has no Pixel Data (7FE0,0010): not an image (SOP Class UID {sop_class})"
        );
        let err = dicom::decode(&data, &LIMITS).unwrap_err().to_string();
        assert!(err.contains(&want), "{file}: {err}");
        let err = dicom::read_header(&data, &LIMITS).unwrap_err().to_string();
        assert!(err.contains(&want), "{file}: read_header: {err}");
    }
}

#[test]
fn attributes_stored_as_un_are_read_with_their_dictionary_vr() {
    // un_attributes.dcm: signed_rescale.dcm's image, its rescale, window, modality, UIDs, pixel
    // representation and position written with VR UN by make_dicom.py (issue 22, finding 19).
    // dicom-rs keeps UN as bytes ("2 " read as 50, 32); pydicom, the reference, reads them with
    // the dictionary's VR. The pixels are compared under every policy with the rest of the
    // manifest.
    let data = std::fs::read(data_dir().join("un_attributes.dcm")).unwrap();
    let image = dicom::decode(&data, &LIMITS).unwrap();
    let h = &image.header;
    assert_eq!(h.rescale, Some((2.0, -1024.0)));
    assert_eq!(h.windows, [(1800.0, 5000.0)]);
    assert_eq!(h.modality, "MR");
    assert!(h.signed);
    assert_eq!(h.geometry.position, Some([-120.0, -100.8, 0.0]));
    let [study, series, sop] = pydicom_uids(&["un_attributes.dcm".to_string()])
        .pop()
        .unwrap();
    assert_eq!(
        [
            &h.ids.study_instance_uid,
            &h.ids.series_instance_uid,
            &h.ids.sop_instance_uid
        ],
        [&study, &series, &sop]
    );
    let reference = std::fs::read(data_dir().join("signed_rescale.dcm")).unwrap();
    assert_eq!(
        image.frames,
        dicom::decode(&reference, &LIMITS).unwrap().frames
    );
    // The structured report copies the context with the right VRs.
    let uid = image
        .context
        .0
        .get(dicom_dictionary_std::tags::STUDY_INSTANCE_UID)
        .unwrap();
    assert_eq!(uid.vr(), dicom_core::VR::UI);
}

/// Files of pydicom's test set that pydicom decodes and the service refuses, with the refusal:
/// kinds of image the service does not take (the reference, which mirrors the service's
/// semantics, has none for the first five either).
const PYDICOM_FILES_REFUSED: &[(&str, &str)] = &[
    (
        "SC_rgb_rle_16bit.dcm",
        "colour images must have 8 bits per sample; this one has 16",
    ),
    (
        "SC_rgb_rle_16bit_2frame.dcm",
        "colour images must have 8 bits per sample; this one has 16",
    ),
    ("SC_rgb_rle_32bit.dcm", "unsigned 32-bit samples"),
    ("SC_rgb_rle_32bit_2frame.dcm", "unsigned 32-bit samples"),
    (
        "examples_palette.dcm",
        "Photometric Interpretation \"PALETTE COLOR\" with 1 samples per pixel is not supported",
    ),
    // Segmentation-style 1-bit masks.
    (
        "liver_1frame.dcm",
        "Bits Allocated is 1; 8, 16 or 32 are supported",
    ),
    (
        "liver_expb_1frame.dcm",
        "Bits Allocated is 1; 8, 16 or 32 are supported",
    ),
    // Its data set is implicit VR though its transfer syntax (JPEG baseline) says explicit: pydicom
    // guesses, dicom-rs reads what the file declares, and the pre-scan finds the length that
    // makes (a VR of "\x18\x00" read as UN, the text "DERI" as a length).
    (
        "SC_rgb_jpeg.dcm",
        "element (0008,0008) declares 1230128452 bytes",
    ),
    // RT Dose grids: unsigned 32-bit.
    ("rtdose.dcm", "unsigned 32-bit samples"),
    ("rtdose_1frame.dcm", "unsigned 32-bit samples"),
    ("rtdose_expb.dcm", "unsigned 32-bit samples"),
    ("rtdose_expb_1frame.dcm", "unsigned 32-bit samples"),
    ("rtdose_rle.dcm", "unsigned 32-bit samples"),
    ("rtdose_rle_1frame.dcm", "unsigned 32-bit samples"),
];

/// Lossy DCT JPEG: pydicom (pylibjpeg's libjpeg), libjpeg-turbo (12-bit) and jpeg-decoder (8-bit)
/// round their IDCTs differently, as ISO 10918-2 allows. The claim is in stored values: at most
/// this far from pydicom (12-bit: identical to dcmtk, `twelve_bit_jpeg_equals_dcmtk`).
const DCT_STORED: i32 = 1;

/// Colour DCT JPEG: jpeg-decoder's integer YCbCr conversion and chroma upsampling against
/// pydicom's float conversion of libjpeg's output: measured up to 2 levels, 3 with 4:2:2
/// subsampling (examples_ybr_color.dcm).
const COLOUR_DCT_LEVELS: u8 = 3;

/// 8-bit frames, concatenated, of the given stored values (all frames, concatenated) through
/// this service's windowing.
fn levels_of(header: &dicom::Header, stored: &[i32], window: DicomWindow) -> Vec<u8> {
    let pixels = (header.rows * header.columns) as usize;
    stored
        .chunks(pixels)
        .flat_map(|frame| {
            let padding: Option<Vec<bool>> = header.padding.map(|(value, limit)| {
                let (lo, hi) = match limit {
                    Some(limit) => (value.min(limit), value.max(limit)),
                    None => (value, value),
                };
                frame
                    .iter()
                    .map(|&s| (lo..=hi).contains(&i64::from(s)))
                    .collect()
            });
            voi::to_gray8(frame, padding.as_deref(), header, window).unwrap()
        })
        .collect()
}

/// Each file's 8-bit frames under each policy and its stored values, from the reference.
struct Reference {
    frames: usize,
    outputs: Vec<Vec<u8>>,
    stored: Option<Vec<i32>>,
}

/// The reference's decode of each file under each policy, in one process: `Err` when pydicom
/// (`Err(true)`: only the reference's semantics) could not.
fn reference_many(
    files: &[PathBuf],
    policies: &[String],
) -> Vec<Result<Reference, (bool, String)>> {
    let dir = tempfile::tempdir().unwrap();
    let list = format!("[{}]", policies.join(","));
    let run = std::process::Command::new(python())
        .arg(repo().join("tests/reference/dicom_reference.py"))
        .args(["decode-many", "--policies", &list, "--out-dir"])
        .arg(dir.path())
        .args(files)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let lines: Vec<Value> = String::from_utf8(run.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), files.len());
    lines
        .iter()
        .enumerate()
        .map(|(i, line)| {
            if let Some(error) = line["error"].as_str() {
                return Err((line["pydicom"] == true, error.to_string()));
            }
            let read = |name: String| std::fs::read(dir.path().join(name)).ok();
            Ok(Reference {
                frames: line["frames"].as_u64().unwrap() as usize,
                outputs: (0..policies.len())
                    .map(|p| read(format!("{i}-{p}.u8")).unwrap())
                    .collect(),
                stored: read(format!("{i}.stored")).map(|b| {
                    b.chunks_exact(4)
                        .map(|v| i32::from_le_bytes([v[0], v[1], v[2], v[3]]))
                        .collect()
                }),
            })
        })
        .collect()
}

#[test]
fn every_image_of_pydicoms_test_files_matches_pydicom() {
    // Files nobody here wrote (issue 22): each image pydicom 3.0.2 decodes is decoded by the
    // service to the same stored values and, under every window policy plus the narrowest fixed
    // window a model may declare (width 1), to the same 8-bit pixels; the exceptions are listed
    // above with the refusal they get.
    let dir = pydicom_test_files();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "dcm"))
        .collect();
    files.sort();
    let policies = policies_with_the_narrowest();
    let json: Vec<String> = policies.iter().map(|(_, j)| j.clone()).collect();
    let references = reference_many(&files, &json);
    let mut failures = Vec::new();
    let (mut compared, mut not_by_pydicom) = (0, Vec::new());
    for (path, reference) in files.iter().zip(references) {
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let data = std::fs::read(path).unwrap();
        let ours = dicom::decode(&data, &LIMITS);
        if let Some((_, reason)) = PYDICOM_FILES_REFUSED.iter().find(|(f, _)| *f == name) {
            match &ours {
                Err(e) if e.to_string().contains(reason) => {}
                other => failures.push(format!("{name}: listed as refused ({reason}): {other:?}")),
            }
            continue;
        }
        let reference = match reference {
            Ok(r) => r,
            Err((false, error)) => {
                not_by_pydicom.push(format!("{name} ({error:.60})"));
                continue;
            }
            Err((true, error)) => {
                failures.push(format!(
                    "{name}: the reference has no semantics ({error}) and the file is not listed"
                ));
                continue;
            }
        };
        let image = match ours {
            Ok(image) => image,
            Err(e) => {
                failures.push(format!("{name}: pydicom decodes it, we refuse it: {e}"));
                continue;
            }
        };
        compared += compare(&name, &image, &reference, &policies, &mut failures);
    }
    eprintln!(
        "not decoded by pydicom, not compared: {}",
        not_by_pydicom.join("; ")
    );
    assert!(compared > 250, "only {compared} comparisons ran");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The five policies and the narrowest fixed window a model may declare (width 1: one stored
/// value apart is 0 or 255).
fn policies_with_the_narrowest() -> Vec<(DicomWindow, String)> {
    let mut policies = policies();
    policies.push((
        DicomWindow::Fixed {
            center: 1100.0,
            width: 1.0,
        },
        r#"{"window": {"center": 1100.0, "width": 1.0}}"#.into(),
    ));
    policies
}

/// Compares our decode of one file with the reference's: stored values (monochrome) and the
/// 8-bit frames under each policy. Lossless data must be identical; lossy DCT JPEG within
/// DCT_STORED stored values (monochrome, the windowing itself exact) or COLOUR_DCT_LEVELS levels
/// (colour). Returns how many policies were compared; failures are pushed.
fn compare(
    name: &str,
    image: &dicom::DicomImage,
    reference: &Reference,
    policies: &[(DicomWindow, String)],
    failures: &mut Vec<String>,
) -> usize {
    if image.frames.len() != reference.frames {
        failures.push(format!(
            "{name}: {} frames, pydicom {}",
            image.frames.len(),
            reference.frames
        ));
        return 0;
    }
    let dct = matches!(
        image.header.transfer_syntax.as_str(),
        "1.2.840.10008.1.2.4.50" | "1.2.840.10008.1.2.4.51"
    );
    let stored: Vec<i32> = image
        .frames
        .iter()
        .flat_map(|f| match f {
            Frame::Mono { stored, .. } => stored.clone(),
            Frame::Color(_) => Vec::new(),
        })
        .collect();
    if let Some(want) = &reference.stored {
        let worst = stored
            .iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs())
            .max()
            .unwrap_or(0);
        if stored.len() != want.len() || worst > if dct { DCT_STORED } else { 0 } {
            failures.push(format!(
                "{name}: stored values differ by up to {worst} ({} vs {} values)",
                stored.len(),
                want.len()
            ));
            return 0;
        }
    }
    let mut compared = 0;
    for ((window, policy), want) in policies.iter().zip(&reference.outputs) {
        let (got, _) = ours_of(image, *window).unwrap();
        compared += 1;
        if got.len() != want.len() {
            failures.push(format!(
                "{name} {policy}: {} bytes, pydicom {}",
                got.len(),
                want.len()
            ));
            continue;
        }
        let differ = got.iter().zip(want).filter(|(a, b)| a != b).count();
        if differ == 0 {
            continue;
        }
        let worst = got
            .iter()
            .zip(want)
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap_or(0);
        if dct && let Some(want_stored) = &reference.stored {
            // Monochrome DCT: the decoders differ (by at most DCT_STORED, checked above), the
            // windowing does not: pydicom's own stored values through our window give exactly
            // pydicom's pixels, under every policy, the 1-wide window included (where one
            // stored value apart can move a pixel from 0 to 255).
            if levels_of(&image.header, want_stored, *window) == *want {
                continue;
            }
        } else if dct && worst <= COLOUR_DCT_LEVELS {
            continue;
        }
        failures.push(format!(
            "{name} {policy}: {differ} of {} bytes differ, by up to {worst} levels",
            got.len()
        ));
    }
    compared
}

/// The largest difference between our 8-bit frames of one of pydicom's test files and
/// pydicom's, under the header window.
fn worst_against_pydicom(file: &str) -> u8 {
    let path = pydicom_test_files().join(file);
    let (window, policy) = policies().remove(0);
    let reference = reference_many(std::slice::from_ref(&path), &[policy])
        .pop()
        .unwrap()
        .unwrap_or_else(|e| panic!("the reference refused {file}: {e:?}"));
    let image = dicom::decode(&std::fs::read(&path).unwrap(), &LIMITS)
        .unwrap_or_else(|e| panic!("{file}: {e}"));
    let (got, frames) = ours_of(&image, window).unwrap();
    assert_eq!(frames, reference.frames, "{file}");
    assert_eq!(got.len(), reference.outputs[0].len(), "{file}");
    got.iter()
        .zip(&reference.outputs[0])
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap()
}

#[test]
fn rgb_jpeg_without_a_colour_marker_is_not_converted_from_ycbcr() {
    // Photometric Interpretation RGB, no JFIF or Adobe marker: the components are R, G and B, and
    // pydicom and dcmtk return them unconverted; dicom-rs's adapter converted them from YCbCr,
    // every pixel off by up to 137 (issue 22, finding 20). Within the colour DCT tolerance.
    for file in [
        "SC_jpeg_no_color_transform.dcm",
        "SC_jpeg_no_color_transform_2.dcm",
    ] {
        let worst = worst_against_pydicom(file);
        assert!(worst <= COLOUR_DCT_LEVELS, "{file}: off by up to {worst}");
    }
    // With an Adobe marker (transform 0: RGB) the adapter's decode is kept, and agrees too.
    let worst = worst_against_pydicom("SC_rgb_jpeg_app14_dcmd.dcm");
    assert!(worst <= COLOUR_DCT_LEVELS, "app14: off by up to {worst}");
}

#[test]
fn uncompressed_ybr_full_422_is_converted_as_pydicom_does() {
    // Native YBR_FULL_422 holds 2 bytes a pixel (Y1 Y2 Cb Cr per pair): it was refused as
    // "20,000 bytes is short of 30,000" (issue 22, finding 22). pydicom expands and converts it;
    // the service gives the same pixels exactly.
    assert_eq!(worst_against_pydicom("SC_ybr_full_422_uncompressed.dcm"), 0);
}

#[test]
fn twelve_bit_jpeg_equals_dcmtk() {
    // The 12-bit claim (issue 22, finding 21), in stored values: libjpeg-turbo's decode is dcmtk's
    // (dcmdjpeg, Debian's dcmtk 3.6.7, IJG libjpeg 12-bit) bit for bit, and within DCT_STORED of
    // pydicom's (every_image_of_pydicoms_test_files_matches_pydicom).
    let dir = tempfile::tempdir().unwrap();
    for path in [
        data_dir().join("ts_jpeg_extended.dcm"),
        pydicom_test_files().join("JPGExtended.dcm"),
    ] {
        let plain = dir.path().join("plain.dcm");
        let run = std::process::Command::new("dcmdjpeg")
            .arg(&path)
            .arg(&plain)
            .output()
            .expect("dcmdjpeg (dcmtk; make dicom-tools installs it)");
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        let ours = dicom::decode(&std::fs::read(&path).unwrap(), &LIMITS).unwrap();
        let dcmtk = dicom::decode(&std::fs::read(&plain).unwrap(), &LIMITS).unwrap();
        assert_eq!(ours.header.bits_stored, 12);
        assert!(
            ours.frames == dcmtk.frames,
            "{}: differs from dcmtk",
            path.display()
        );
    }
}

/// Single-frame files the service classifies, with whether they are lossy DCT JPEG.
fn classifiable() -> Vec<(String, bool)> {
    manifest()
        .iter()
        .filter(|e| e["expect"] == "ok" && e["frames"] == 1)
        .map(|e| {
            (
                e["file"].as_str().unwrap().to_string(),
                matches!(
                    e["transfer_syntax"].as_str(),
                    Some("1.2.840.10008.1.2.4.50" | "1.2.840.10008.1.2.4.51")
                ),
            )
        })
        .collect()
}

/// (study, series, SOP instance) UIDs of each file, read by pydicom.
fn pydicom_uids(files: &[String]) -> Vec<[String; 3]> {
    let script = "import json, sys, pydicom\n\
                  print(json.dumps([[str(d.StudyInstanceUID), str(d.SeriesInstanceUID), \
                  str(d.SOPInstanceUID)] for d in (pydicom.dcmread(p, stop_before_pixels=True) \
                  for p in sys.argv[1:])]))";
    let out = std::process::Command::new(python())
        .args(["-c", script])
        .args(files.iter().map(|f| data_dir().join(f)))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn served_dicom_tensors_equal_the_reference_and_echo_the_uids() {
    // Identity models (the tensor comes back as the output) with each window policy, colour mode
    // and resize filter; every classifiable file through the real server, declared DICOM and
    // detected alternately.
    let root = tempfile::tempdir().unwrap();
    let variants = [
        (
            "dcm-header",
            "NCHW",
            "rgb",
            "bilinear",
            r#"window = "header""#,
        ),
        (
            "dcm-minmax",
            "NCHW",
            "grayscale",
            "nearest",
            r#"window = "minmax""#,
        ),
        (
            "dcm-percentile",
            "NCHW",
            "grayscale",
            "bicubic",
            "window = \"percentile\"\npercentiles = [2.0, 98.0]",
        ),
        (
            "dcm-fixed",
            "NCHW",
            "rgb",
            "lanczos3",
            "window = { center = 1500.0, width = 2500.0 }",
        ),
        // output = "float": unrounded levels, resized as Pillow's mode "F".
        (
            "dcm-float-header",
            "NCHW",
            "rgb",
            "bilinear",
            "window = \"header\"\noutput = \"float\"",
        ),
        (
            "dcm-float-percentile",
            "NCHW",
            "grayscale",
            "lanczos3",
            "window = \"percentile\"\noutput = \"float\"",
        ),
        (
            "dcm-float-minmax",
            "NCHW",
            "rgb",
            "nearest",
            "window = \"minmax\"\noutput = \"float\"",
        ),
    ];
    for (name, layout, color, filter, window) in variants {
        let input = format!(
            "{}\n\n[input.dicom]\n{window}",
            input_section(layout, (16, 12), color, filter, "scale = 1.0\noffset = 0.0")
        );
        variant_dir(root.path(), name, &input, "tiny-identity");
    }
    let files = classifiable();
    assert!(files.len() >= 25, "{files:?}");
    let names: Vec<String> = files.iter().map(|(f, _)| f.clone()).collect();
    let uids = pydicom_uids(&names);
    let mut t = serve(
        repository_args(root.path(), &["--max-queue-delay-us", "0"]),
        None,
    )
    .await;
    let mut failures = Vec::new();
    for (name, ..) in variants {
        let dir = root.path().join(name);
        let paths: Vec<PathBuf> = names.iter().map(|f| data_dir().join(f)).collect();
        let expected = reference_tensors("dicom_reference.py", &dir, &paths, 3 * 12 * 16);
        let images = names
            .iter()
            .enumerate()
            .map(|(i, f)| pb::Image {
                id: f.clone(),
                data: std::fs::read(data_dir().join(f)).unwrap().into(),
                format: if i % 2 == 0 {
                    pb::ImageFormat::Dicom
                } else {
                    pb::ImageFormat::Unspecified
                } as i32,
                raw: None,
            })
            .collect();
        let served = bounded("classify", t.client.classify(request_for(name, "", images)))
            .await
            .unwrap()
            .into_inner()
            .results;
        assert_eq!(served.len(), files.len());
        for (((r, want), (file, dct)), uid) in served.iter().zip(&expected).zip(&files).zip(&uids) {
            assert_eq!(&r.image_id, file);
            let got: Vec<f32> = r.probabilities.iter().map(|p| p.probability).collect();
            let worst = got
                .iter()
                .zip(want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            // Float levels too are identical: the same float operations as Pillow's mode "F".
            let allowed = if *dct { f32::from(DCT_LEVELS) } else { 0.0 };
            if worst > allowed {
                failures.push(format!("{name}: {file}: differs by {worst} levels"));
            }
            let echoed = r.dicom.as_ref().expect("a DICOM result names its instance");
            assert_eq!(
                [
                    &echoed.study_instance_uid,
                    &echoed.series_instance_uid,
                    &echoed.sop_instance_uid
                ],
                [&uid[0], &uid[1], &uid[2]],
                "{file}"
            );
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // A PNG result carries no DICOM reference.
    let png = bounded(
        "classify",
        t.client.classify(request_for(
            "dcm-header",
            "",
            vec![image("png", data("flair_256_a.png"))],
        )),
    )
    .await
    .unwrap()
    .into_inner();
    assert!(png.results[0].dicom.is_none());
    t.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_dicom_is_refused_by_name_and_the_server_stays_up() {
    let mut t = serve(args(&fixture_model("tiny"), &[]), None).await;
    let mut cases: Vec<(&str, &str)> = HOSTILE.to_vec();
    cases.push(("multiframe.dcm", "the instance has 3 frames"));
    for (file, reason) in cases {
        for format in [pb::ImageFormat::Dicom, pb::ImageFormat::Unspecified] {
            let bad = pb::Image {
                id: file.into(),
                data: std::fs::read(data_dir().join(file)).unwrap().into(),
                format: format as i32,
                raw: None,
            };
            let err = bounded(
                "classify",
                t.client
                    .classify(request(vec![image("good", data("flair_256_a.png")), bad])),
            )
            .await
            .unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{file}: {err:?}");
            assert!(
                err.message().starts_with("image 1: ") && err.message().contains(reason),
                "{file} ({format:?}): {}",
                err.message()
            );
        }
    }
    // A file that made dicom-rs's RLE decoder panic (found by tests/fuzz.rs): refused, and the
    // preprocessing pool (where an uncaught panic aborts the process) survives.
    let rle = std::fs::read(repo().join("fuzz/regressions/dicom/rle-segment-past-end")).unwrap();
    let err = bounded(
        "classify",
        t.client
            .classify(request(vec![image("rle", rle[1..].to_vec())])),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(
        err.message()
            .contains("RLE Lossless, 1.2.840.10008.1.2.5 decoder failed on malformed pixel data"),
        "{}",
        err.message()
    );
    // Still serving, DICOM included.
    let ok = bounded(
        "classify",
        t.client.classify(request(vec![image(
            "ok",
            std::fs::read(data_dir().join("ts_explicit_le.dcm")).unwrap(),
        )])),
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(ok.results.len(), 1);
    // A file declared PNG that is DICOM says so.
    let mismatch = pb::Image {
        format: pb::ImageFormat::Png as i32,
        ..image(
            "x",
            std::fs::read(data_dir().join("ts_explicit_le.dcm")).unwrap(),
        )
    };
    let err = bounded("classify", t.client.classify(request(vec![mismatch])))
        .await
        .unwrap_err();
    assert!(
        err.message().contains("looks like DICOM"),
        "{}",
        err.message()
    );
    t.server.shutdown().await.unwrap();
}

#[test]
fn a_cut_12_bit_jpeg_codestream_is_refused() {
    // ts_jpeg_extended.dcm with its one fragment cut to 60 %: a valid DICOM file whose 12-bit JPEG
    // scan ends early. libjpeg-turbo only warns about that; the service refuses it.
    let bytes = std::fs::read(data_dir().join("ts_jpeg_extended.dcm")).unwrap();
    assert!(dicom::decode(&bytes, &LIMITS).is_ok());
    let mut obj = dicom_object::OpenFileOptions::new()
        .read_preamble(dicom_object::file::ReadPreamble::Always)
        .from_reader(&bytes[..])
        .unwrap();
    let dicom_core::value::Value::PixelSequence(sequence) = obj
        .element(dicom_dictionary_std::tags::PIXEL_DATA)
        .unwrap()
        .value()
    else {
        panic!("encapsulated")
    };
    let mut fragment = sequence.fragments()[0].to_vec();
    fragment.truncate((fragment.len() * 6 / 10) & !1);
    obj.put(dicom_core::DataElement::new(
        dicom_dictionary_std::tags::PIXEL_DATA,
        dicom_core::VR::OB,
        dicom_core::value::PixelFragmentSequence::new(vec![], vec![fragment]),
    ));
    let mut cut = Vec::new();
    obj.write_all(&mut cut).unwrap();
    let err = dicom::decode(&cut, &LIMITS).unwrap_err().to_string();
    assert!(
        err.contains("12-bit JPEG Extended pixel data could not be decoded (scan)"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classify_stream_takes_dicom_too() {
    use futures_util::StreamExt;
    use pb::classify_stream_response::Outcome;
    let mut t = serve(args(&fixture_model("tiny"), &[]), None).await;
    let files = [
        "ts_explicit_le.dcm",
        "bad/huge_length.dcm",
        "ts_jpegls_lossless.dcm",
    ];
    let messages: Vec<pb::ClassifyStreamRequest> = files
        .iter()
        .enumerate()
        .map(|(i, f)| pb::ClassifyStreamRequest {
            image: Some(pb::Image {
                id: f.to_string(),
                data: std::fs::read(data_dir().join(f)).unwrap().into(),
                format: if i == 0 {
                    pb::ImageFormat::Dicom
                } else {
                    pb::ImageFormat::Unspecified
                } as i32,
                raw: None,
            }),
            ..Default::default()
        })
        .collect();
    let mut inbound = bounded(
        "stream",
        t.client
            .classify_stream(futures_util::stream::iter(messages)),
    )
    .await
    .unwrap()
    .into_inner();
    let mut seen = Vec::new();
    while let Some(m) = bounded("stream message", inbound.next()).await {
        seen.push(m.unwrap());
    }
    seen.sort_by_key(|m| m.sequence);
    assert_eq!(seen.len(), 3);
    let mut probabilities = Vec::new();
    for m in &seen {
        match (&m.outcome, m.sequence) {
            (Some(Outcome::Error(e)), 1) => {
                assert_eq!(e.code, tonic::Code::InvalidArgument as i32);
                assert!(
                    e.message.contains("declares 4294967280 bytes"),
                    "{}",
                    e.message
                );
            }
            (Some(Outcome::Result(r)), 0 | 2) => {
                let d = r.dicom.as_ref().expect("a DICOM result names its instance");
                assert!(
                    d.sop_instance_uid
                        .starts_with("1.2.826.0.1.3680043.10.1234.")
                );
                probabilities.push(r.probability);
            }
            other => panic!("unexpected outcome {other:?}"),
        }
    }
    // The same pixels, uncompressed and JPEG-LS lossless: the same answer.
    assert_eq!(probabilities[0], probabilities[1]);
    t.server.shutdown().await.unwrap();
}

/// Every event's target and level, as one layer of the test's global subscriber sees them.
#[derive(Clone, Default)]
struct Events(std::sync::Arc<std::sync::Mutex<Vec<(String, tracing::Level)>>>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Events {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        // A `log` record bridged to tracing has the target "log" and its own in a field.
        struct LogTarget(Option<String>);
        impl tracing::field::Visit for LogTarget {
            fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
                if field.name() == "log.target" {
                    self.0 = Some(value.to_string());
                }
            }
            fn record_debug(&mut self, _: &tracing::field::Field, _: &dyn std::fmt::Debug) {}
        }
        let meta = event.metadata();
        let mut target = LogTarget(None);
        event.record(&mut target);
        let target = target.0.unwrap_or_else(|| meta.target().to_string());
        self.0.lock().unwrap().push((target, *meta.level()));
    }
}

#[test]
fn a_jpeg_2000_decode_logs_nothing_at_info() {
    // OpenJPEG's progress messages reached the log at INFO through the jpeg2k crate, three lines
    // for every JPEG 2000 frame (issue 22, finding 26). With the service's log filter (the
    // default, BRAINAI_LOG unset) none is written; the unfiltered layer shows they were emitted
    // (the log → tracing bridge works), so the filter is what keeps them out.
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    assert!(
        std::env::var_os("BRAINAI_LOG").is_none(),
        "unset BRAINAI_LOG"
    );
    let (all, written) = (Events::default(), Events::default());
    tracing_subscriber::registry()
        .with(all.clone())
        .with(
            written
                .clone()
                .with_filter(brainai::telemetry::log_filter()),
        )
        .try_init()
        .expect("the only global subscriber of this test binary");
    for file in ["ts_j2k_lossless.dcm", "ts_j2k_lossy.dcm"] {
        let data = std::fs::read(data_dir().join(file)).unwrap();
        dicom::decode(&data, &LIMITS).unwrap();
    }
    let codec = |events: &Events| {
        let events = events.0.lock().unwrap();
        events
            .iter()
            .filter(|(target, level)| {
                target.starts_with("jpeg2k") && *level <= tracing::Level::INFO
            })
            .count()
    };
    assert!(
        codec(&all) >= 2,
        "the codec's messages never reached the subscriber"
    );
    assert_eq!(codec(&written), 0, "codec chatter written to the log");
}

#[test]
fn the_decode_budget_counts_the_bytes_decoded() {
    // A multi-frame instance is budgeted at what its frames decode to, as a PNG is: a cine of
    // 105 MiB of RGB pixels counted 387 MiB (8 bytes a pixel more than it decodes) and was
    // refused where it fit (issue 22, finding 25).
    for (path, bytes_per_sample) in [
        // 30 frames of 320×240 RGB, JPEG.
        (pydicom_test_files().join("examples_ybr_color.dcm"), 1),
        // 3 frames of 16-bit monochrome.
        (data_dir().join("multiframe.dcm"), 2),
    ] {
        let data = std::fs::read(&path).unwrap();
        let image = dicom::decode(&data, &LIMITS).unwrap();
        assert!(image.frames.len() > 1, "{}", path.display());
        let decoded: usize = image
            .frames
            .iter()
            .map(|frame| match frame {
                Frame::Color(pixels) => pixels.data.len(),
                Frame::Mono { stored, .. } => stored.len() * bytes_per_sample,
            })
            .sum();
        let counted =
            brainai::input::decoded_size(&data, brainai::input::Encoding::Dicom, &LIMITS).unwrap();
        assert_eq!(counted, decoded as u64, "{}", path.display());
        assert_eq!(dicom::read_header(&data, &LIMITS).unwrap().1, counted);
    }
}
