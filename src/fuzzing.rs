//! Fuzz targets: each parser of untrusted input as a function of arbitrary bytes that must not
//! panic, hang or allocate without bound. Driven by AFL++ (`fuzz/`, `make fuzz`, coverage-guided,
//! stable Rust) and by a deterministic mutation runner in `make test` (`tests/fuzz.rs`), which
//! also replays the committed corpus and every past crash.

use std::io::Cursor;
use std::path::Path;

use prost::Message;

use crate::api::grpc::{image_input, parse_grpc_timeout, priority};
use crate::input::{self, Encoding, InputLimits, SixteenBit};
use crate::model::{
    ColorMode, DicomOutput, DicomWindow, InputSpec, Layout, ModelConfig, ResizeFilter, Scaling,
};
use crate::pb;
use crate::preprocess::Preprocessor;

/// Small limits, so one input costs milliseconds (a 4 Mpx image is still allowed).
const LIMITS: InputLimits = InputLimits {
    max_image_bytes: 1 << 20,
    max_pixels: 1 << 22,
};

/// A fuzz target: arbitrary bytes in, no panic.
pub type Target = fn(&[u8]);

/// The targets by name.
pub const TARGETS: [(&str, Target); 14] = [
    ("image", image),
    ("dicom", dicom),
    ("model_toml", model_toml),
    ("classify_request", classify_request),
    ("stream_request", stream_request),
    ("grpc_timeout", grpc_timeout),
    ("oip_grpc_request", oip_grpc_request),
    ("oip_http_request", oip_http_request),
    ("upload", upload),
    ("prescan", prescan),
    ("segment_request", segment_request),
    ("study", study),
    ("dicom_association", dicom_association),
    ("dimse_command", dimse_command),
];

/// A `Segment` request as the gRPC front end and the pipeline read it before anything is
/// decoded: the protobuf, each slice's images matched by sequence to a FLAIR/T1c/T2 model's
/// channels (unknown, duplicated, missing and extra sequences refused), each image's header.
pub fn segment_request(data: &[u8]) {
    use crate::input::sequence::Sequence;
    let Ok(request) = pb::SegmentRequest::decode(data) else {
        return;
    };
    let Ok((ids, slices)) = crate::api::grpc::segment_slices(request.slices) else {
        return;
    };
    assert_eq!(ids.len(), slices.len());
    let spec = InputSpec {
        channels: vec![Sequence::Flair, Sequence::T1c, Sequence::T2],
        tensors: Vec::new(),
        tensor_name: "input".into(),
        layout: Layout::Nchw,
        height: 16,
        width: 16,
        color: ColorMode::Grayscale,
        resize_filter: ResizeFilter::Nearest,
        scaling: Scaling::ScaleOffset {
            scale: 1.0,
            offset: 0.0,
        },
        sixteen_bit: SixteenBit::Pillow,
        dicom_window: DicomWindow::MinMax,
        dicom_output: DicomOutput::Uint8,
        dicom_guard: None,
    };
    for slice in slices {
        if let Ok(ordered) = crate::pipeline::segment::in_channel_order(&spec, "fuzz", slice) {
            assert_eq!(ordered.len(), 3, "one image per channel");
            for (data, encoding) in ordered {
                let _ = crate::input::decoded_size(&data, encoding, &LIMITS);
            }
        }
    }
}

/// Decoding and preprocessing, as the pipeline runs them: byte 0 picks the model input (layout,
/// colour, filter, size, 16-bit policy), byte 1 the declared encoding (with raw geometry from the
/// next 5 bytes); the rest is the image.
pub fn image(data: &[u8]) {
    let [b0, b1, rest @ ..] = data else { return };
    let (width, height) = [(1, 1), (7, 5), (32, 32), (64, 48)][usize::from(b0 >> 4 & 3)];
    let spec = InputSpec {
        channels: Vec::new(),
        tensors: Vec::new(),
        tensor_name: "input".into(),
        layout: if b0 & 1 == 0 {
            Layout::Nchw
        } else {
            Layout::Nhwc
        },
        height,
        width,
        color: if b0 & 2 == 0 {
            ColorMode::Rgb
        } else {
            ColorMode::Grayscale
        },
        resize_filter: [
            ResizeFilter::Nearest,
            ResizeFilter::Bilinear,
            ResizeFilter::Bicubic,
            ResizeFilter::Lanczos3,
        ][usize::from(b0 >> 2 & 3)],
        scaling: Scaling::MeanStd {
            mean: vec![0.485, 0.456, 0.406],
            std: vec![0.229, 0.224, 0.225],
        },
        sixteen_bit: if b0 & 0x40 == 0 {
            SixteenBit::Pillow
        } else {
            SixteenBit::Scale
        },
        dicom_window: [
            DicomWindow::Header,
            DicomWindow::MinMax,
            DicomWindow::Percentile {
                low: 1.0,
                high: 99.0,
            },
            DicomWindow::Fixed {
                center: 600.0,
                width: 1200.0,
            },
        ][usize::from(*b1 >> 6)],
        dicom_guard: None,
        dicom_output: Default::default(),
    };
    let (encoding, image) = match b1 % 4 {
        0 => (Encoding::Detect, rest),
        1 => (Encoding::Png, rest),
        2 => (Encoding::Jpeg, rest),
        _ => {
            let [w0, w1, h0, h1, c, image @ ..] = rest else {
                return;
            };
            let encoding = Encoding::Raw {
                width: u32::from(u16::from_le_bytes([*w0, *w1])),
                height: u32::from(u16::from_le_bytes([*h0, *h1])),
                channels: u32::from(*c),
            };
            (encoding, image)
        }
    };
    // As the pipeline: the header-derived size first, then the decode.
    if input::decoded_size(image, encoding, &LIMITS).is_err() {
        return;
    }
    let preprocessor = Preprocessor::new(spec, LIMITS);
    if let Ok(tensor) = preprocessor.preprocess_to_vec(image, encoding) {
        assert_eq!(tensor.len(), preprocessor.image_len());
        assert!(
            tensor.iter().all(|v| v.is_finite()),
            "a non-finite input value"
        );
    }
}

/// A DICOM file as Classify and ClassifySeries take it: byte 0 picks the window policy and the
/// sequence guard; the rest is the file. The header read, the size check, Classify's
/// preprocessing and every frame through the series path must not panic, and tensors must be
/// finite.
pub fn dicom(data: &[u8]) {
    use crate::input::dicom;
    use crate::input::sequence::Sequence;
    use crate::model::{DicomGuard, DicomOutput, GuardPolicy};
    let [b0, file @ ..] = data else { return };
    let spec = InputSpec {
        channels: Vec::new(),
        tensors: Vec::new(),
        tensor_name: "input".into(),
        layout: Layout::Nchw,
        height: 16,
        width: 16,
        color: if b0 & 1 == 0 {
            ColorMode::Rgb
        } else {
            ColorMode::Grayscale
        },
        resize_filter: ResizeFilter::Bilinear,
        scaling: Scaling::MeanStd {
            mean: vec![0.485, 0.456, 0.406],
            std: vec![0.229, 0.224, 0.225],
        },
        sixteen_bit: SixteenBit::Pillow,
        dicom_window: [
            DicomWindow::Header,
            DicomWindow::MinMax,
            DicomWindow::Percentile {
                low: 0.5,
                high: 99.5,
            },
            DicomWindow::Fixed {
                center: 40.0,
                width: 80.0,
            },
        ][usize::from(b0 >> 1 & 3)],
        dicom_output: if b0 & 32 == 0 {
            DicomOutput::Uint8
        } else {
            DicomOutput::Float
        },
        dicom_guard: (b0 & 8 != 0).then(|| DicomGuard {
            modalities: vec!["MR".into()],
            sequences: vec![Sequence::Flair],
            policy: if b0 & 16 == 0 {
                GuardPolicy::Reject
            } else {
                GuardPolicy::Warn
            },
        }),
    };
    let preprocessor = Preprocessor::new(spec, LIMITS);
    let finite = |tensor: &[f32]| {
        assert_eq!(tensor.len(), preprocessor.image_len());
        assert!(
            tensor.iter().all(|v| v.is_finite()),
            "a non-finite input value"
        );
    };
    // As the pipelines: header and size first, then decoding.
    if dicom::read_header(file, &LIMITS).is_err() {
        assert!(input::decoded_size(file, Encoding::Dicom, &LIMITS).is_err());
        return;
    }
    if let Ok(tensor) = preprocessor.preprocess_to_vec(file, Encoding::Dicom) {
        finite(&tensor);
    }
    if let Ok(image) = dicom::decode(file, &LIMITS) {
        let _ = crate::input::sequence::detect(&image.header.acquisition);
        for frame in image.frames {
            if let Ok(tensor) = preprocessor.frame_tensor(frame, &image.header) {
                finite(&tensor);
            }
        }
    }
}

/// `model.toml` validation.
pub fn model_toml(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = ModelConfig::parse("fuzz", Path::new("fuzz"), text);
    }
}

/// A `Classify` request as the gRPC front end reads it: protobuf, then each image's format and
/// the priority.
pub fn classify_request(data: &[u8]) {
    let Ok(request) = pb::ClassifyRequest::decode(Cursor::new(data)) else {
        return;
    };
    let _ = priority(request.priority);
    for (index, image) in request.images.into_iter().enumerate() {
        if let Ok(crate::pipeline::ImageInput::Encoded { data, encoding }) =
            image_input(image, index)
        {
            let _ = input::decoded_size(&data, encoding, &LIMITS);
        }
    }
}

/// A `ClassifyStream` message and a `GetModel` request.
pub fn stream_request(data: &[u8]) {
    if let Ok(message) = pb::ClassifyStreamRequest::decode(Cursor::new(data))
        && let Some(image) = message.image
    {
        let _ = image_input(image, 0);
    }
    let _ = pb::GetModelRequest::decode(Cursor::new(data));
}

/// The `grpc-timeout` header: never panics; what it accepts is at most 8 digits and a unit.
pub fn grpc_timeout(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data)
        && parse_grpc_timeout(text).is_some()
    {
        assert!((2..=9).contains(&text.len()), "accepted {text:?}");
    }
}

/// The model an Open Inference Protocol request is checked against (the tiny test model's
/// config: NCHW, 3x32x32, two labels).
fn oip_model() -> &'static ModelConfig {
    static CONFIG: std::sync::OnceLock<ModelConfig> = std::sync::OnceLock::new();
    CONFIG.get_or_init(|| {
        ModelConfig::parse(
            "fuzz",
            Path::new("fuzz"),
            include_str!("../tests/fixtures/models/tiny/model.toml"),
        )
        .expect("the tiny model's config is valid")
    })
}

/// What the OIP front ends do with a decoded request before the pipeline: its one input as
/// images (shapes and datatypes checked), its outputs checked, each image's size read.
fn oip_checks(request: crate::api::oip::OipRequest) {
    let config = oip_model();
    let _ = crate::api::oip::check_outputs(config, &request.outputs);
    if let Ok(images) = crate::api::oip::images(config, request.inputs) {
        for image in images {
            match image {
                crate::pipeline::ImageInput::Encoded { data, encoding } => {
                    let _ = input::decoded_size(&data, encoding, &LIMITS);
                }
                crate::pipeline::ImageInput::Tensor(values) => {
                    assert_eq!(
                        values.len(),
                        config.input.image_len(),
                        "a tensor of the wrong size"
                    );
                }
            }
        }
    }
}

/// A `ModelInfer` request as `inference.GRPCInferenceService` reads it: protobuf, typed or raw
/// contents, parameters, then the model checks.
pub fn oip_grpc_request(data: &[u8]) {
    let Ok(request) = crate::kserve_pb::ModelInferRequest::decode(Cursor::new(data)) else {
        return;
    };
    if let Ok(request) = crate::api::oip::grpc::decode(request, None, 64) {
        oip_checks(request);
    }
}

/// A `POST /v2/models/{m}/infer` body: byte 0 odd means the binary-data extension, with the JSON's
/// length in bytes 1-2 (little-endian) as the `Inference-Header-Content-Length` header; the rest
/// is the body.
pub fn oip_http_request(data: &[u8]) {
    let [flag, l0, l1, body @ ..] = data else {
        return;
    };
    let mut headers = axum::http::HeaderMap::new();
    if flag & 1 == 1 {
        headers.insert(
            crate::api::oip::http::HEADER_LENGTH,
            axum::http::HeaderValue::from(u16::from_le_bytes([*l0, *l1])),
        );
    }
    if let Ok((request, _)) = crate::api::oip::http::decode("tiny", "", &headers, body, 64) {
        oip_checks(request);
    }
}

/// A `POST /v1/classify` body: byte 0 odd means multipart/form-data with the boundary `b`, else
/// a raw image body; each file's size is read as the pipeline would.
pub fn upload(data: &[u8]) {
    let [flag, body @ ..] = data else { return };
    static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    let runtime = RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a current-thread runtime")
    });
    let mut headers = axum::http::HeaderMap::new();
    if flag & 1 == 1 {
        headers.insert(
            axum::http::header::CONTENT_TYPE,
            axum::http::HeaderValue::from_static("multipart/form-data; boundary=b"),
        );
    }
    let body = bytes::Bytes::copy_from_slice(body);
    if let Ok(files) = runtime.block_on(crate::api::rest::uploads(&headers, body, 64)) {
        for file in files {
            let _ = input::decoded_size(&file.data, Encoding::Detect, &LIMITS);
        }
    }
}

/// Differential: the protobuf pre-scan (`api::prescan`) against prost's decoding of the same
/// message. Byte 0 picks the method (`Classify`, `ClassifySeries`, `ModelInfer`), byte 1 where a
/// `Classify`/`ClassifySeries` body is split in two pieces (as it arrives in HTTP/2 DATA frames);
/// the rest is the message. Whenever prost decodes it, the scan must refuse it exactly when the
/// decoded request is over a limit (`Classify`, `ClassifySeries`: the image count), and must
/// refuse every `ModelInfer` that is over one (it may also refuse more: duplicate map keys that
/// prost folds, contents of a datatype the server does not take). A scan that under-counts lets
/// the amplification it exists to stop through.
pub fn prescan(data: &[u8]) {
    use crate::api::oip::{MAX_DIMS, MAX_PARAMETERS, MAX_TENSORS};
    use crate::api::prescan::{PrescanLimits, scan};
    let [method, split, message @ ..] = data else {
        return;
    };
    let limits = PrescanLimits {
        max_message_bytes: 1 << 20,
        max_images: 3,
    };
    let at = usize::from(*split) * message.len() / 256;
    let (a, b) = message.split_at(at);
    let pieces: [&[u8]; 2] = [a, b];
    let whole: [&[u8]; 1] = [message];
    match method % 4 {
        3 => {
            use crate::api::prescan::MAX_SLICE_IMAGES;
            let path = "/brainai.v1.TumorClassifier/Segment";
            let refused = scan(path, &whole, &limits).expect("scanned").is_err();
            // `ClassifySlices` carries the same slices (field 1) and is held to the same bound.
            let slices = "/brainai.v1.TumorClassifier/ClassifySlices";
            assert_eq!(
                scan(slices, &whole, &limits).expect("scanned").is_err(),
                refused
            );
            if let Ok(r) = pb::SegmentRequest::decode(message) {
                let over = r.slices.len() > limits.max_images
                    || r.slices.iter().any(|s| s.images.len() > MAX_SLICE_IMAGES);
                assert_eq!(
                    refused,
                    over,
                    "Segment: prost decodes {} slices, the scan refused: {refused}",
                    r.slices.len()
                );
            }
        }
        0 | 1 => {
            let (path, decoded) = if method % 4 == 0 {
                (
                    "/brainai.v1.TumorClassifier/Classify",
                    pb::ClassifyRequest::decode(message).map(|r| r.images.len()),
                )
            } else {
                (
                    "/brainai.v1.TumorClassifier/ClassifySeries",
                    pb::ClassifySeriesRequest::decode(message).map(|r| r.instances.len()),
                )
            };
            let refused = scan(path, &pieces, &limits).expect("scanned").is_err();
            if let Ok(images) = decoded {
                assert_eq!(
                    refused,
                    images > limits.max_images,
                    "{path}: prost decodes {images} images, the scan refused: {refused}"
                );
            }
        }
        _ => {
            let path = "/inference.GRPCInferenceService/ModelInfer";
            let result = scan(path, &whole, &limits).expect("scanned");
            let Ok(r) = crate::kserve_pb::ModelInferRequest::decode(message) else {
                return;
            };
            let over = r.parameters.len() > MAX_PARAMETERS
                || r.inputs.len() > MAX_TENSORS
                || r.outputs.len() > MAX_TENSORS
                || r.raw_input_contents.len() > MAX_TENSORS
                || r.outputs
                    .iter()
                    .any(|o| o.parameters.len() > MAX_PARAMETERS)
                || r.inputs.iter().any(|i| {
                    i.shape.len() > MAX_DIMS
                        || i.parameters.len() > MAX_PARAMETERS
                        || i.contents
                            .as_ref()
                            .is_some_and(|c| c.bytes_contents.len() > limits.max_images)
                });
            assert!(
                !over || result.is_err(),
                "ModelInfer over a limit passed the scan: {} inputs, {} outputs, {} raw, {} \
                 parameters",
                r.inputs.len(),
                r.outputs.len(),
                r.raw_input_contents.len(),
                r.parameters.len()
            );
        }
    }
}

/// Bytes of one instance record of the [`study`] target.
pub const STUDY_RECORD: usize = 16;

/// A study's grouping, alignment and measurement, from headers made of the bytes: each
/// [`STUDY_RECORD`] bytes one instance (series, description, position, orientation, spacing, size,
/// frame of reference, study, patient, SOP UID, frames, missing attributes), as hostile as headers
/// get. The plan must not panic; when it succeeds, its slices are sorted, every partner is an
/// instance of its channel's series, and aligning and measuring every slice works.
pub fn study(data: &[u8]) {
    use crate::input::dicom::{Acquisition, DicomIds, Geometry, Header, Photometric, VoiFunction};
    use crate::input::sequence::Sequence;
    use crate::study::{Interpolation, Partner, StudyOptions, measure, plan, plane_of, resample};
    const DESCRIPTIONS: [&str; 6] = ["AX FLAIR", "T1 POST GD", "AX T2", "T1", "scout", "T2 FLAIR"];
    let Some((&options_byte, records)) = data.split_first() else {
        return;
    };
    let headers: Vec<Header> = records
        .chunks_exact(STUDY_RECORD)
        .take(64)
        .map(|r| {
            let signed = |b: u8| f64::from(b as i8);
            let tilt = f64::from(r[4] % 8) * 0.2_f64.to_radians();
            let orientation = match r[4] >> 5 {
                0..=2 => Some([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]),
                3 => Some([tilt.cos(), tilt.sin(), 0.0, -tilt.sin(), tilt.cos(), 0.0]),
                4 => Some([0.0, 1.0, 0.0, 0.0, 0.0, -1.0]),
                5 => Some([1.0, 0.0, 0.0, 1.0, 0.0, 0.0]),
                6 => Some([f64::NAN, 0.0, 0.0, 0.0, 1.0, 0.0]),
                _ => None,
            };
            let size = u32::from(r[6] % 12) + 1;
            Header {
                transfer_syntax: "1.2.840.10008.1.2.1".into(),
                ids: DicomIds {
                    study_instance_uid: format!("1.{}", r[10] % 2),
                    series_instance_uid: format!("2.{}", r[0] % 4),
                    sop_instance_uid: format!("3.{}", r[11]),
                },
                modality: if r[12] % 16 == 0 { "CT" } else { "MR" }.into(),
                rows: size,
                columns: u32::from(r[7] % 12) + 1,
                frames: if r[12] % 32 == 1 { 2 } else { 1 },
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
                    series_description: DESCRIPTIONS[r[1] as usize % DESCRIPTIONS.len()].into(),
                    ..Default::default()
                },
                geometry: Geometry {
                    sop_class_uid: "1.2.840.10008.5.1.4.1.1.4".into(),
                    instance_number: None,
                    position: (r[13] % 8 != 0)
                        .then(|| [signed(r[2]) / 4.0, signed(r[3]) / 4.0, signed(r[5]) / 2.0]),
                    orientation,
                    frame_positions: Vec::new(),
                    pixel_spacing: (r[13] % 8 != 1)
                        .then(|| [f64::from(r[8] % 8 + 1) / 2.0, f64::from(r[9] % 8 + 1) / 2.0]),
                    slice_thickness: (r[14] % 4 != 0).then(|| f64::from(r[14] % 8 + 1) / 2.0),
                    frame_of_reference_uid: if r[15] % 8 == 0 {
                        String::new()
                    } else {
                        format!("4.{}", r[15] % 3)
                    },
                    patient_key: (r[12] % 64 != 2).then_some(u64::from(r[10] % 2 == 0)),
                },
            }
        })
        .collect();
    let channels = [Sequence::Flair, Sequence::T1c, Sequence::T2];
    let options = StudyOptions {
        named: Vec::new(),
        interpolation: if options_byte % 2 == 0 {
            Interpolation::Nearest
        } else {
            Interpolation::Linear
        },
    };
    let count = 1 + usize::from(options_byte / 2 % 3);
    let Ok(planned) = plan(&headers, &channels[..count], None, &options) else {
        return;
    };
    assert_eq!(planned.channels.len(), count);
    for pair in planned.slices.windows(2) {
        assert!(pair[0].along <= pair[1].along, "slices in order");
    }
    let mut masks = Vec::new();
    for (k, slice) in planned.slices.iter().enumerate() {
        assert_eq!(slice.partners.len(), count);
        for (c, partner) in slice.partners.iter().enumerate() {
            let series = &planned.channels[c];
            let instances: Vec<usize> = match partner {
                None => continue,
                Some(Partner::Exact(i) | Partner::Nearest(i)) => vec![*i],
                Some(Partner::Linear(a, b, w)) => {
                    assert!((0.0..=1.0).contains(w), "a weight between the neighbours");
                    vec![*a, *b]
                }
            };
            for i in instances {
                assert!(
                    series.instances.contains(&i),
                    "a partner of the channel's series"
                );
                let from = plane_of(&headers[i]).expect("a planned instance is placed");
                let values = vec![1.0f32; from.rows as usize * from.columns as usize];
                let out = resample::onto(&values, &from, &slice.plane);
                assert_eq!(
                    out.len(),
                    slice.plane.rows as usize * slice.plane.columns as usize
                );
            }
        }
        if slice.complete() {
            let n = slice.plane.rows as usize * slice.plane.columns as usize;
            masks.push((k, vec![(k % 3) as u8; n]));
        }
    }
    let refs: Vec<(usize, &[u8])> = masks.iter().map(|(k, m)| (*k, &m[..])).collect();
    let labels: Vec<String> = ["background", "a", "b"].map(String::from).to_vec();
    let regions = vec![("ab".to_string(), vec![1u8, 2])];
    let measured = measure::measure(&planned, &refs, &labels, &regions);
    assert_eq!(measured[3].voxels, measured[1].voxels + measured[2].voxels);
}

/// A DIMSE command set as the node reads it (`node::dimse::Command::parse`); when it parses, the
/// responses the node would build from it (C-ECHO-RSP, C-STORE-RSP with an error comment made of
/// the same bytes, the unrecognised-operation response) must encode and parse back with the
/// right Command Field, the request's Message ID, the status, no data set, and the request's SOP
/// Class and Instance UIDs unchanged whenever they are valid UIDs.
pub fn dimse_command(data: &[u8]) {
    use crate::node::dimse::{self, C_ECHO_RSP, C_STORE_RSP, Command, status, valid_uid};
    let Ok(command) = Command::parse(data) else {
        return;
    };
    let comment = String::from_utf8_lossy(data);
    let responses = [
        (dimse::echo_response(&command), C_ECHO_RSP, status::SUCCESS),
        (
            dimse::store_response(&command, status::CANNOT_UNDERSTAND, Some(&comment)),
            C_STORE_RSP,
            status::CANNOT_UNDERSTAND,
        ),
        (
            dimse::unrecognized_response(&command),
            command.field | 0x8000,
            status::UNRECOGNIZED_OPERATION,
        ),
    ];
    for (i, (bytes, field, status)) in responses.into_iter().enumerate() {
        let response = Command::parse(&bytes).expect("the node's own response parses");
        assert_eq!(response.field, field);
        assert_eq!(response.responded_to, command.message_id);
        assert_eq!(response.status, Some(status));
        assert!(!response.has_data_set(), "a response with a data set");
        if i == 1 && valid_uid(&command.affected_sop_instance) {
            assert_eq!(
                response.affected_sop_instance,
                command.affected_sop_instance
            );
        }
        if i < 2 && valid_uid(&command.affected_sop_class) {
            assert_eq!(response.affected_sop_class, command.affected_sop_class);
        }
    }
}

/// The PDU transport of [`dicom_association`]: PDUs read from the fuzz bytes as the node's
/// association reads them from the socket (dicom-ul's `read_pdu`, strict, with the node's
/// maximum PDU length); the end of the bytes (or a PDU cut short) is the connection closing.
struct FuzzLink<'a> {
    wire: &'a [u8],
    max_pdu: u32,
    sent: Vec<dicom_ul::Pdu>,
}

impl crate::node::scp::Link for FuzzLink<'_> {
    async fn receive(&mut self) -> Result<dicom_ul::Pdu, String> {
        match dicom_ul::pdu::read_pdu(&mut self.wire, self.max_pdu, true) {
            Ok(Some(pdu)) => Ok(pdu),
            Ok(None) => {
                self.wire = &[];
                Err("connection closed".into())
            }
            Err(e) => {
                self.wire = &[];
                Err(e.to_string())
            }
        }
    }

    async fn send(&mut self, pdu: &dicom_ul::Pdu) -> Result<(), String> {
        self.sent.push(pdu.clone());
        Ok(())
    }
}

/// A spool directory of its own for one input, removed afterwards (even on a panic). In
/// `/dev/shm` where there is one: the release path syncs every file it stored.
struct ScratchDir(std::path::PathBuf);

impl ScratchDir {
    fn new() -> ScratchDir {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let shm = Path::new("/dev/shm");
        let base = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = base.join(format!(
            "brainai-fuzz-association-{}-{n}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        ScratchDir(dir)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The instances in a spool, as (Study Instance UID from the job's `job.json`, file name) → size.
fn spooled(dir: &Path) -> std::collections::BTreeMap<(String, String), u64> {
    let mut out = std::collections::BTreeMap::new();
    for job in std::fs::read_dir(dir.join("jobs"))
        .expect("the jobs directory")
        .flatten()
    {
        let info: crate::node::spool::JobInfo = serde_json::from_slice(
            &std::fs::read(job.path().join("job.json")).expect("every job has its job.json"),
        )
        .expect("job.json parses");
        for file in std::fs::read_dir(job.path())
            .expect("a job directory")
            .flatten()
        {
            let name = file.file_name().to_string_lossy().into_owned();
            if let Some(sop) = name.strip_suffix(".dcm") {
                let size = file.metadata().expect("an instance's metadata").len();
                out.insert((info.study.clone(), sop.to_string()), size);
            }
        }
    }
    out
}

/// A negotiated association as the DICOM node serves it (`node::scp::Session::run`: command
/// sets, C-ECHO, C-STORE data sets streamed to the spool, release, abort), on PDUs read from the
/// bytes. Byte 0 picks the presentation contexts: bits 0-1 the transfer syntax of context 1
/// (MR Image Storage; bit 6 makes it Verification), bit 2 rejects context 1, bit 3 rejects
/// context 3 (Verification), bit 4 rejects context 5 (MR Image Storage, Explicit VR Little
/// Endian), bit 5 pads the UIDs with NUL as they come off the wire. Byte 1: bits 0-1 the spool's
/// cap (1 MiB down to 256 bytes), bits 2-3 the maximum PDU length, bit 4 the node draining,
/// bit 5 a second association on the same spool after the first ends. The rest is the PDUs.
///
/// After each association, as the node ends it (`Spool::association_ended`): every PDU the node
/// sent is a response command set (that `Command::parse` reads, on an accepted context, without
/// a data set, with a status) or, last, an A-RELEASE-RP (exactly when it was released) or an
/// A-ABORT; the responses agree with the session's tally; `incoming/` is empty; the spool's
/// `used()` is the size of the instance files under `jobs/`; a released association's instances
/// are all there, and an aborted one added none.
pub fn dicom_association(data: &[u8]) {
    run_associations(data);
}

/// [`dicom_association`], returning how each association ended and what it did (`tests/fuzz.rs`
/// checks that the seeds reach what they are meant to: stores, refusals, releases, aborts).
pub fn run_associations(data: &[u8]) -> Vec<(crate::node::scp::End, crate::node::scp::Tally)> {
    use crate::node::dimse::{self, Command, status};
    use crate::node::scp::{End, Session, Tally};
    use crate::node::spool::Spool;
    use dicom_ul::Pdu;
    use dicom_ul::pdu::{
        PDataValueType, PresentationContextNegotiated, PresentationContextResultReason,
    };
    const MR: &str = "1.2.840.10008.5.1.4.1.1.4";
    const VERIFICATION: &str = "1.2.840.10008.1.1";
    const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";
    const SYNTAXES: [&str; 4] = [
        "1.2.840.10008.1.2",
        EXPLICIT_LE,
        "1.2.840.10008.1.2.2",
        "1.2.840.10008.1.2.1.99",
    ];
    let [contexts, settings, wire @ ..] = data else {
        return Vec::new();
    };
    let pad = |uid: &str| {
        if contexts & 32 != 0 && uid.len() % 2 == 1 {
            format!("{uid}\0")
        } else {
            uid.to_string()
        }
    };
    let context = |id: u8, abstract_syntax: &str, transfer_syntax: &str, rejected: bool| {
        PresentationContextNegotiated {
            id,
            reason: if rejected {
                PresentationContextResultReason::AbstractSyntaxNotSupported
            } else {
                PresentationContextResultReason::Acceptance
            },
            transfer_syntax: pad(transfer_syntax),
            abstract_syntax: pad(abstract_syntax),
        }
    };
    let contexts = vec![
        context(
            1,
            if contexts & 64 == 0 { MR } else { VERIFICATION },
            SYNTAXES[usize::from(contexts & 3)],
            contexts & 4 != 0,
        ),
        context(3, VERIFICATION, SYNTAXES[0], contexts & 8 != 0),
        context(5, MR, EXPLICIT_LE, contexts & 16 != 0),
    ];
    let accepted: Vec<u8> = contexts
        .iter()
        .filter(|c| c.reason == PresentationContextResultReason::Acceptance)
        .map(|c| c.id)
        .collect();
    let cap = [1 << 20, 64 << 10, 2 << 10, 256][usize::from(settings & 3)];
    let max_pdu = [65_536, 4096, 16_384, 1 << 24][usize::from(settings >> 2 & 3)];
    let draining = settings & 16 != 0;
    let count = if settings & 32 == 0 { 1 } else { 2 };

    static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    let runtime = RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a current-thread runtime")
    });
    let scratch = ScratchDir::new();
    let spool = Spool::open(&scratch.0, cap).expect("a spool in a new directory");
    let mut link = FuzzLink {
        wire,
        max_pdu,
        sent: Vec::new(),
    };
    let mut outcomes = Vec::new();
    for id in 1..=count {
        let before = spooled(&scratch.0);
        let mut session = Session {
            id,
            called: "BRAINAI".into(),
            calling: "FUZZ".into(),
            contexts: contexts.clone(),
            spool: spool.clone(),
            // Half the spool: the fuzzer reaches both the instance limit and the spool's.
            max_instance_bytes: spool.cap() / 2,
            draining: Box::new(move || draining),
            tally: Tally::default(),
        };
        link.sent.clear();
        let end = runtime.block_on(session.run(&mut link));
        let released = end == End::Released;
        spool.association_ended(id, released);

        // What the node sent.
        let (mut echoes, mut stored, mut refused) = (0, 0, 0);
        for (i, pdu) in link.sent.iter().enumerate() {
            let last = i + 1 == link.sent.len();
            match pdu {
                Pdu::PData { data } => {
                    assert_eq!(data.len(), 1, "one command set per response P-DATA");
                    let value = &data[0];
                    assert!(
                        value.value_type == PDataValueType::Command && value.is_last,
                        "a response is a whole command set"
                    );
                    assert!(
                        accepted.contains(&value.presentation_context_id),
                        "a response on a context that was not accepted"
                    );
                    let response = Command::parse(&value.data).expect("the node's response parses");
                    assert!(!response.has_data_set(), "a response with a data set");
                    let code = response.status.expect("a response has a status");
                    match (response.field, code) {
                        (field, status::UNRECOGNIZED_OPERATION) => {
                            assert!(field & 0x8000 != 0, "a response's Command Field");
                        }
                        (dimse::C_ECHO_RSP, status::SUCCESS) => echoes += 1,
                        (dimse::C_STORE_RSP, status::SUCCESS) => stored += 1,
                        (dimse::C_STORE_RSP, _) => refused += 1,
                        (field, code) => panic!("a response {field:04X} with status {code:04X}"),
                    }
                }
                Pdu::ReleaseRP => assert!(last && released, "an A-RELEASE-RP out of place"),
                Pdu::AbortRQ { .. } => assert!(last && !released, "an A-ABORT out of place"),
                other => panic!("the node sent {other:?}"),
            }
        }
        if released {
            assert!(
                matches!(link.sent.last(), Some(Pdu::ReleaseRP)),
                "released without an A-RELEASE-RP"
            );
        }
        assert_eq!(echoes, session.tally.echoes, "C-ECHO-RSPs and the tally");
        assert_eq!(stored, session.tally.stored.len(), "stored and the tally");
        assert_eq!(refused, session.tally.refused, "refused and the tally");

        // What is left in the spool.
        let incoming = std::fs::read_dir(scratch.0.join("incoming"))
            .expect("the incoming directory")
            .count();
        assert_eq!(incoming, 0, "a partial instance left in incoming/");
        let after = spooled(&scratch.0);
        assert_eq!(
            spool.used(),
            after.values().sum::<u64>(),
            "the spool's count and its instance files ({} after association {id}, {end:?})",
            after.len()
        );
        assert!(spool.used() <= cap, "the spool is over its cap");
        if released {
            for r in &session.tally.stored {
                assert!(
                    after.contains_key(&(r.study.clone(), r.sop_instance.clone())),
                    "a stored instance is missing after the release"
                );
            }
        } else {
            assert!(
                after.keys().all(|k| before.contains_key(k)),
                "an aborted association left an instance"
            );
        }
        outcomes.push((end, session.tally));
    }
    outcomes
}
