//! Segmentation end to end (issue 23): the `Segment` RPC, `POST /v1/segment` and `brainai segment`
//! against the real server and ONNX Runtime, with test models whose masks are known in closed form
//! (`models/make_tiny_models.py`: `label = argmax_k Σ_c W[k][c]·x_c + b[k]`, integer levels), and at
//! other image sizes against the independent Pillow + numpy + onnxruntime reference
//! (`tests/reference/segment_reference.py`). Every answer names its model and carries the
//! not-trained warning; every bad input is refused naming the slice and the sequence.

mod common;

use std::path::Path;

use brainai::pb;
use common::*;
use tonic::Code;

/// `seg-threshold`'s weights, `[class][FLAIR, T1c, T2]`, and biases.
const W: [[i32; 3]; 4] = [[0, 0, 0], [0, -1, 2], [2, -1, 1], [0, 3, 0]];
const B: [i32; 4] = [48, 0, -100, -216];

/// The closed-form label of one pixel from its FLAIR, T1c and T2 levels (ties: the lowest class).
fn closed_form(flair: u8, t1c: u8, t2: u8) -> u8 {
    let x = [i32::from(flair), i32::from(t1c), i32::from(t2)];
    let z: Vec<i32> = (0..4)
        .map(|k| (0..3).map(|c| W[k][c] * x[c]).sum::<i32>() + B[k])
        .collect();
    let mut best = 0;
    for k in 1..4 {
        if z[k] > z[best] {
            best = k;
        }
    }
    best as u8
}

/// Three gray images (FLAIR, T1c, T2) of `w × h` whose levels vary over the whole range, so every
/// class occurs.
fn channels(w: u32, h: u32, seed: u32) -> [Vec<u8>; 3] {
    let level =
        |x: u32, y: u32, a: u32, b: u32, c: u32| ((x * a + y * b + c + seed * 37) % 256) as u8;
    let plane = |a, b, c| {
        (0..h)
            .flat_map(|y| (0..w).map(move |x| level(x, y, a, b, c)))
            .collect::<Vec<u8>>()
    };
    [plane(16, 3, 0), plane(7, 16, 11), plane(8, 8, 40)]
}

fn png(w: u32, h: u32, pixels: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    image::ImageEncoder::write_image(
        image::codecs::png::PngEncoder::new(&mut out),
        pixels,
        w,
        h,
        image::ExtendedColorType::L8,
    )
    .unwrap();
    out
}

fn seq_image(sequence: &str, data: Vec<u8>) -> pb::SequenceImage {
    pb::SequenceImage {
        sequence: sequence.into(),
        image: Some(image("", data)),
    }
}

/// One slice of PNGs keyed FLAIR, T1c, T2.
fn slice(id: &str, [flair, t1c, t2]: &[Vec<u8>; 3], w: u32, h: u32) -> pb::SegmentSlice {
    pb::SegmentSlice {
        id: id.into(),
        images: vec![
            seq_image("FLAIR", png(w, h, flair)),
            seq_image("t1c", png(w, h, t1c)),
            seq_image("T2", png(w, h, t2)),
        ],
    }
}

fn segment_request(model: &str, slices: Vec<pb::SegmentSlice>) -> pb::SegmentRequest {
    pb::SegmentRequest {
        slices,
        model: model.into(),
        ..Default::default()
    }
}

async fn segment(
    t: &mut TestServer,
    request: pb::SegmentRequest,
) -> Result<pb::SegmentResponse, tonic::Status> {
    bounded("segment", t.client.segment(request))
        .await
        .map(|r| r.into_inner())
}

/// A repository with the segmentation fixtures and the tiny classifier.
fn repository() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    for model in [
        "seg-threshold",
        "seg-nhwc",
        "seg-multi",
        "seg-flair-only",
        "tiny",
    ] {
        copy_model(model, root.path(), model);
    }
    root
}

async fn serve_repository(root: &Path, extra: &[&str]) -> TestServer {
    let mut flags = vec!["--default-model", "tiny"];
    flags.extend_from_slice(extra);
    serve(repository_args(root, &flags), None).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn masks_equal_the_closed_form_in_every_layout_and_input_arrangement() {
    let root = repository();
    let mut t = serve_repository(root.path(), &[]).await;
    let images = channels(16, 16, 1);
    let expected: Vec<u8> = (0..256)
        .map(|i| closed_form(images[0][i], images[1][i], images[2][i]))
        .collect();
    let mut seen = [false; 4];
    for &l in &expected {
        seen[l as usize] = true;
    }
    assert_eq!(seen, [true; 4], "the test slice has every class");
    // NCHW logits; NHWC probabilities with the channels in another order; one input per channel.
    for model in ["seg-threshold", "seg-nhwc", "seg-multi"] {
        let response = segment(
            &mut t,
            segment_request(model, vec![slice("s", &images, 16, 16)]),
        )
        .await
        .unwrap_or_else(|e| panic!("{model}: {e:?}"));
        assert_eq!(
            response.labels,
            ["background", "non_enhancing_core", "edema", "enhancing"]
        );
        let r = &response.results[0];
        assert_eq!(
            (r.slice_id.as_str(), r.index, r.width, r.height),
            ("s", 0, 16, 16)
        );
        let (w, h, mask) = decode_mask(&r.mask_png);
        assert_eq!((w, h), (16, 16));
        assert_eq!(
            mask, expected,
            "{model}: the mask differs from the closed form"
        );
        // Counts and boxes agree with the mask.
        for (k, class) in r.classes.iter().enumerate() {
            let pixels: Vec<(u32, u32)> = (0..256u32)
                .filter(|&i| mask[i as usize] == k as u8)
                .map(|i| (i % 16, i / 16))
                .collect();
            assert_eq!(class.pixels, pixels.len() as u64, "{model} {}", class.label);
            let bbox = class.bbox.as_ref().map(|b| (b.x0, b.y0, b.x1, b.y1));
            let want = (!pixels.is_empty()).then(|| {
                (
                    pixels.iter().map(|p| p.0).min().unwrap(),
                    pixels.iter().map(|p| p.1).min().unwrap(),
                    pixels.iter().map(|p| p.0).max().unwrap(),
                    pixels.iter().map(|p| p.1).max().unwrap(),
                )
            });
            assert_eq!(bbox, want, "{model} {}", class.label);
        }
        let region = |name: &str| r.regions.iter().find(|g| g.name == name).unwrap();
        let count = |classes: &[u8]| mask.iter().filter(|l| classes.contains(l)).count() as u64;
        assert_eq!(region("whole_tumor").pixels, count(&[1, 2, 3]));
        assert_eq!(region("tumor_core").pixels, count(&[1, 3]));
        assert_eq!(region("enhancing_tumor").pixels, count(&[3]));
        assert_eq!(
            region("tumor_core").labels,
            ["non_enhancing_core", "enhancing"]
        );
        // The model's identity and the not-trained warning in every answer.
        let m = r.model.as_ref().unwrap();
        assert_eq!(m.name, model);
        assert_eq!(
            m.sha256,
            sha256_hex(&root.path().join(model).join("1/model.onnx"))
        );
        assert!(
            r.warnings
                .iter()
                .any(|w| w.contains("not clinically trained"))
        );
    }
    t.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn masks_at_other_sizes_equal_the_pillow_reference() {
    let root = repository();
    let mut t = serve_repository(root.path(), &[]).await;
    let dir = tempfile::tempdir().unwrap();
    // Down- and upscaling, odd sizes; nearest (seg-threshold) and bilinear (seg-nhwc) mapping back.
    for (k, (w, h)) in [(37u32, 23u32), (9, 13), (64, 64), (16, 40)]
        .into_iter()
        .enumerate()
    {
        let images = channels(w, h, k as u32);
        let mut paths = Vec::new();
        for (name, pixels) in ["FLAIR", "T1c", "T2"].iter().zip(&images) {
            let path = dir.path().join(format!("{k}-{name}.png"));
            std::fs::write(&path, png(w, h, pixels)).unwrap();
            paths.push(format!("{name}={}", path.display()));
        }
        for model in ["seg-threshold", "seg-nhwc"] {
            let model_dir = root.path().join(model).display().to_string();
            let mut args = vec!["--model-dir", &model_dir];
            for p in &paths {
                args.extend(["--image", p]);
            }
            let reference: serde_json::Value =
                serde_json::from_str(&reference_script("segment_reference.py", &args)).unwrap();
            let response = segment(
                &mut t,
                segment_request(model, vec![slice("s", &images, w, h)]),
            )
            .await
            .unwrap();
            let r = &response.results[0];
            let (mw, mh, mask) = decode_mask(&r.mask_png);
            assert_eq!(
                (mw, mh),
                (w, h),
                "{model}: the mask has the image's geometry"
            );
            let want: Vec<u8> = reference["mask"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u8)
                .collect();
            assert_eq!(
                mask, want,
                "{model} at {w}×{h}: the mask differs from Pillow's"
            );
            for class in &r.classes {
                assert_eq!(
                    class.pixels,
                    reference["counts"][&class.label].as_u64().unwrap(),
                    "{model} {w}×{h} {}",
                    class.label
                );
            }
        }
    }
    t.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probability_maps_come_when_asked_and_within_the_limit() {
    let root = repository();
    let mut t = serve_repository(root.path(), &["--max-probability-mib", "1"]).await;
    let images = channels(20, 12, 3);
    let mut request = segment_request("seg-threshold", vec![slice("s", &images, 20, 12)]);
    let plain = segment(&mut t, request.clone()).await.unwrap();
    assert!(plain.results[0].probabilities.is_empty(), "only when asked");
    request.probabilities = true;
    let r = segment(&mut t, request).await.unwrap().results.remove(0);
    let values: Vec<f32> = r
        .probabilities
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!(
        values.len(),
        4 * 20 * 12,
        "[labels, H, W] at the image's geometry"
    );
    let (_, _, mask) = decode_mask(&r.mask_png);
    for i in 0..20 * 12 {
        let p: Vec<f32> = (0..4).map(|k| values[k * 240 + i]).collect();
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        let best = (0..4).fold(0, |b, k| if p[k] > p[b] { k } else { b });
        assert_eq!(best as u8, mask[i], "pixel {i}: the mask is the argmax");
    }
    // 600×600 × 4 labels × 4 bytes = 5.5 MiB, over the 1 MiB limit: refused, before the model.
    let big = channels(600, 600, 0);
    let mut request = segment_request("seg-threshold", vec![slice("big", &big, 600, 600)]);
    request.probabilities = true;
    let err = segment(&mut t, request.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("probability maps"),
        "{}",
        err.message()
    );
    assert!(
        err.message().contains("over the limit of 1 MiB"),
        "{}",
        err.message()
    );
    // The same slice without the maps is answered.
    request.probabilities = false;
    let r = segment(&mut t, request).await.unwrap();
    assert_eq!((r.results[0].width, r.results[0].height), (600, 600));
    t.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_slices_are_refused_naming_the_slice_and_the_sequence() {
    let root = repository();
    let mut t = serve_repository(root.path(), &[]).await;
    let images = channels(16, 16, 2);
    let good = slice("good", &images, 16, 16);
    let with = |edit: &dyn Fn(&mut pb::SegmentSlice)| {
        let mut s = good.clone();
        edit(&mut s);
        segment_request("seg-threshold", vec![good.clone(), s])
    };
    let cases: Vec<(&str, pb::SegmentRequest, Code, &[&str])> = vec![
        (
            "missing",
            with(&|s| {
                s.images.pop();
            }),
            Code::InvalidArgument,
            &["slice 1", "no T2 image", "FLAIR, T1c, T2"],
        ),
        (
            "duplicated",
            with(&|s| s.images[2].sequence = "flair".into()),
            Code::InvalidArgument,
            &["slice 1", "FLAIR image is given twice"],
        ),
        (
            "unknown",
            with(&|s| s.images[1].sequence = "DWI".into()),
            Code::InvalidArgument,
            &["slice 1", "unknown sequence \"DWI\""],
        ),
        (
            "not the model's",
            with(&|s| s.images.push(seq_image("T1", png(16, 16, &images[0])))),
            Code::InvalidArgument,
            &[
                "slice 1",
                "a T1 image was given",
                "takes FLAIR, T1c, T2 only",
            ],
        ),
        (
            "sizes differ",
            with(&|s| s.images[1] = seq_image("T1c", png(8, 16, &images[1][..128]))),
            Code::InvalidArgument,
            &["slice 1, T1c", "8×16", "FLAIR image is 16×16"],
        ),
        (
            "not an image",
            with(&|s| s.images[2] = seq_image("T2", b"not an image".to_vec())),
            Code::InvalidArgument,
            &["slice 1, T2"],
        ),
        (
            "no slices",
            segment_request("seg-threshold", vec![]),
            Code::InvalidArgument,
            &["no slices"],
        ),
        (
            "a classifier",
            segment_request("tiny", vec![good.clone()]),
            Code::FailedPrecondition,
            &["model tiny is a classification model"],
        ),
    ];
    for (what, request, code, needles) in cases {
        let err = segment(&mut t, request).await.unwrap_err();
        assert_eq!(err.code(), code, "{what}: {err:?}");
        for needle in needles {
            assert!(
                err.message().contains(needle),
                "{what}: {:?} lacks {needle:?}",
                err.message()
            );
        }
    }
    // A caller's long sequence name is echoed bounded.
    let long = "x".repeat(5000);
    let err = segment(&mut t, with(&|s| s.images[1].sequence = long.clone()))
        .await
        .unwrap_err();
    assert!(err.message().len() < 300, "{}", err.message().len());
    // Classify on a segmentation model is refused too.
    let err = bounded(
        "classify",
        t.client.classify(request_for(
            "seg-threshold",
            "",
            vec![image("a", png(16, 16, &images[0]))],
        )),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("is a segmentation model"),
        "{}",
        err.message()
    );
    // The server is unharmed: the good slice is answered.
    segment(&mut t, segment_request("seg-threshold", vec![good]))
        .await
        .unwrap();
    t.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_slices_share_batches_and_a_bad_one_harms_no_other() {
    let root = repository();
    let t = serve_repository(
        root.path(),
        &["--max-queue-delay-us", "200000", "--max-queue-wait-ms", "0"],
    )
    .await;
    let calls = (0..6u32).map(|i| {
        let mut client = t.client.clone();
        async move {
            let images = channels(16, 16, i);
            let mut s = slice(&format!("s{i}"), &images, 16, 16);
            if i == 3 {
                s.images.pop();
            }
            let result = client
                .segment(segment_request("seg-threshold", vec![s]))
                .await
                .map(|r| r.into_inner());
            (i, images, result)
        }
    });
    let outcomes = bounded("six segment calls", futures_util::future::join_all(calls)).await;
    let mut largest_batch = 0;
    for (i, images, result) in outcomes {
        if i == 3 {
            assert_eq!(result.unwrap_err().code(), Code::InvalidArgument);
            continue;
        }
        let r = result.unwrap().results.remove(0);
        largest_batch = largest_batch.max(r.batch_size);
        let want: Vec<u8> = (0..256)
            .map(|p| closed_form(images[0][p], images[1][p], images[2][p]))
            .collect();
        assert_eq!(decode_mask(&r.mask_png).2, want, "slice {i}");
    }
    assert!(
        largest_batch > 1,
        "concurrent slices were never batched together"
    );
    t.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segment_stream_answers_each_slice_and_goes_on_after_a_bad_one() {
    let root = repository();
    let mut t = serve_repository(root.path(), &[]).await;
    let all: Vec<[Vec<u8>; 3]> = (0..6u32).map(|i| channels(16, 16, i)).collect();
    let messages: Vec<pb::SegmentStreamRequest> = all
        .iter()
        .enumerate()
        .map(|(k, [flair, t1c, t2])| pb::SegmentStreamRequest {
            id: format!("s{k}"),
            flair: Some(image("", png(16, 16, flair))),
            t1c: Some(image("", png(16, 16, t1c))),
            // Slice 3 has no T2 image: answered with an error, and the stream goes on.
            t2: (k != 3).then(|| image("", png(16, 16, t2))),
            model: "seg-threshold".into(),
            ..Default::default()
        })
        .collect();
    let mut responses = bounded(
        "open the stream",
        t.client
            .segment_stream(futures_util::stream::iter(messages.clone())),
    )
    .await
    .unwrap()
    .into_inner();
    let mut seen = std::collections::BTreeMap::new();
    while let Some(response) = bounded("a stream response", responses.message())
        .await
        .unwrap()
    {
        seen.insert(response.sequence, response);
    }
    assert_eq!(seen.len(), 6, "one response per slice");
    for (k, images) in all.iter().enumerate() {
        let response = &seen[&(k as u64)];
        assert_eq!(response.slice_id, format!("s{k}"));
        match response.outcome.as_ref().unwrap() {
            pb::segment_stream_response::Outcome::Error(e) => {
                assert_eq!(k, 3, "only slice 3 fails: {}", e.message);
                assert_eq!(e.code, Code::InvalidArgument as i32);
                assert!(
                    e.message.starts_with("slice 3: no T2 image"),
                    "{}",
                    e.message
                );
            }
            pb::segment_stream_response::Outcome::Result(mask) => {
                assert_ne!(k, 3);
                assert_eq!(mask.index as usize, k);
                let want: Vec<u8> = (0..256)
                    .map(|p| closed_form(images[0][p], images[1][p], images[2][p]))
                    .collect();
                assert_eq!(decode_mask(&mask.mask_png), (16, 16, want), "slice {k}");
                assert_eq!(mask.model.as_ref().unwrap().name, "seg-threshold");
                assert!(
                    mask.warnings
                        .iter()
                        .any(|w| w.contains("not clinically trained"))
                );
            }
        }
    }
    // A classification model on the stream: each slice answered FAILED_PRECONDITION.
    let mut wrong = messages[0].clone();
    wrong.model = "tiny".into();
    let mut responses = bounded(
        "open the stream",
        t.client
            .segment_stream(futures_util::stream::iter(vec![wrong])),
    )
    .await
    .unwrap()
    .into_inner();
    let response = bounded("a stream response", responses.message())
        .await
        .unwrap()
        .unwrap();
    let Some(pb::segment_stream_response::Outcome::Error(e)) = response.outcome else {
        panic!("an error response")
    };
    assert_eq!(e.code, Code::FailedPrecondition as i32, "{}", e.message);
    t.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_segment_stream_may_stay_quiet_longer_than_the_body_read_timeout() {
    // A long-lived request stream, like ClassifyStream: not held to --body-read-timeout-s.
    let root = repository();
    let mut t = serve_repository(root.path(), &["--body-read-timeout-s", "1"]).await;
    let images = channels(16, 16, 9);
    let message = |id: &str| pb::SegmentStreamRequest {
        id: id.into(),
        flair: Some(image("", png(16, 16, &images[0]))),
        t1c: Some(image("", png(16, 16, &images[1]))),
        t2: Some(image("", png(16, 16, &images[2]))),
        model: "seg-threshold".into(),
        ..Default::default()
    };
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(message("first")).await.unwrap();
    let mut responses = bounded(
        "open the stream",
        t.client
            .segment_stream(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
    .await
    .unwrap()
    .into_inner();
    let first = bounded("the first answer", responses.message())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.slice_id, "first");
    // Quiet for twice the body read timeout, then another slice: still answered.
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    tx.send(message("second")).await.unwrap();
    let second = bounded("the second answer", responses.message())
        .await
        .expect("the stream is still open")
        .unwrap();
    assert_eq!(second.slice_id, "second");
    assert!(matches!(
        second.outcome,
        Some(pb::segment_stream_response::Outcome::Result(_))
    ));
    drop(tx);
    t.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_output_buffers_are_reused_once_warm() {
    let root = repository();
    let t = serve_repository(root.path(), &["--max-queue-delay-us", "500"]).await;
    // `clients` concurrent clients, `calls` one-slice Segment calls each, every mask checked.
    let load = |clients: u32, calls: u32| {
        let tasks: Vec<_> = (0..clients)
            .map(|c| {
                let mut client = t.client.clone();
                tokio::spawn(async move {
                    for i in 0..calls {
                        let images = channels(16, 16, c * calls + i);
                        let r = client
                            .segment(segment_request(
                                "seg-threshold",
                                vec![slice("s", &images, 16, 16)],
                            ))
                            .await
                            .expect("segmented")
                            .into_inner()
                            .results
                            .remove(0);
                        let want: Vec<u8> = (0..256)
                            .map(|p| closed_form(images[0][p], images[1][p], images[2][p]))
                            .collect();
                        assert_eq!(decode_mask(&r.mask_png).2, want);
                    }
                })
            })
            .collect();
        async move {
            for task in tasks {
                task.await.unwrap();
            }
        }
    };
    let allocated = || {
        scrape(
            t.metrics_addr(),
            "brainai_output_buffer_allocations_total",
            &["model=\"seg-threshold\""],
        )
    };
    bounded("warm-up load", load(4, 10)).await;
    let warm = allocated().await;
    assert!(warm >= 1.0, "the pool allocated its buffers ({warm})");
    bounded("the measured load", load(4, 30)).await;
    let grown = allocated().await - warm;
    // 120 slices in at least 30 batches: without reuse, one buffer per batch.
    assert!(
        grown <= 2.0,
        "{grown} output buffers allocated after warm-up ({warm} during it)"
    );
    t.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_segment_answers_the_same_mask_and_names_bad_parts() {
    let root = repository();
    let mut t = serve_repository(root.path(), &[]).await;
    let images = channels(30, 20, 5);
    let grpc = segment(
        &mut t,
        segment_request("seg-threshold", vec![slice("s", &images, 30, 20)]),
    )
    .await
    .unwrap()
    .results
    .remove(0);
    let parts: Vec<(&str, Vec<u8>)> = vec![
        ("flair", png(30, 20, &images[0])),
        ("T1ce", png(30, 20, &images[1])),
        ("t2", png(30, 20, &images[2])),
    ];
    let (content_type, body) =
        multipart_fields(&parts.iter().map(|(n, d)| (*n, &d[..])).collect::<Vec<_>>());
    let post = |path: String, body: Vec<u8>, content_type: String| {
        let addr = t.server.http_addr;
        async move {
            http(
                addr,
                "POST",
                &path,
                &[("Content-Type", &content_type)],
                &body,
            )
            .await
        }
    };
    let r = post(
        "/v1/segment?model=seg-threshold".into(),
        body.clone(),
        content_type.clone(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let json = r.json();
    let data_url = json["mask_png"].as_str().unwrap();
    let png_bytes = base64_decode(data_url.strip_prefix("data:image/png;base64,").unwrap());
    assert_eq!(decode_mask(&png_bytes), decode_mask(&grpc.mask_png));
    assert_eq!(
        (json["width"].as_u64(), json["height"].as_u64()),
        (Some(30), Some(20))
    );
    assert_eq!(json["model"]["name"], "seg-threshold");
    assert_eq!(json["model"]["clinically_trained"], false);
    assert_eq!(json["colors"][3], "#d62728");
    for (k, class) in grpc.classes.iter().enumerate() {
        assert_eq!(json["classes"][k]["pixels"].as_u64(), Some(class.pixels));
    }
    assert!(
        json["warnings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w.as_str().unwrap().contains("not clinically trained"))
    );
    // No model named: the one segmentation model would be ambiguous here (four are served).
    let r = post("/v1/segment".into(), body.clone(), content_type.clone()).await;
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("several segmentation models")
    );
    // A missing sequence: 400 naming it; a classification model: 422.
    let (ct, partial) = multipart_fields(&[("flair", &parts[0].1[..]), ("t2", &parts[2].1[..])]);
    let r = post("/v1/segment?model=seg-threshold".into(), partial, ct).await;
    assert_eq!(r.status, 400);
    assert!(
        r.json()["error"].as_str().unwrap().contains("no T1c image"),
        "{:?}",
        r.json()
    );
    let r = post("/v1/segment?model=tiny".into(), body, content_type).await;
    assert_eq!(r.status, 422, "{}", String::from_utf8_lossy(&r.body));
    // Not a form: 400 saying what it takes.
    let r = post(
        "/v1/segment?model=seg-threshold".into(),
        parts[0].1.clone(),
        "image/png".into(),
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("multipart/form-data")
    );
    t.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_writes_the_mask_and_prints_the_areas() {
    // One segmentation model, not the default: `brainai segment` needs no --model.
    let root = tempfile::tempdir().unwrap();
    copy_model("tiny", root.path(), "tiny");
    copy_model("seg-threshold", root.path(), "seg");
    let mut t = serve(
        repository_args(root.path(), &["--default-model", "tiny"]),
        None,
    )
    .await;
    let images = channels(24, 18, 7);
    let dir = tempfile::tempdir().unwrap();
    let mut flags = Vec::new();
    for (flag, pixels) in ["--flair", "--t1c", "--t2"].iter().zip(&images) {
        let path = dir.path().join(format!("{}.png", &flag[2..]));
        std::fs::write(&path, png(24, 18, pixels)).unwrap();
        flags.push(flag.to_string());
        flags.push(path.display().to_string());
    }
    let out = dir.path().join("mask.png");
    let run = {
        let (url, out, flags) = (t.grpc_url(), out.clone(), flags.clone());
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_brainai"))
                .args(["segment", "--server", &url])
                .args(&flags)
                .arg("--out")
                .arg(&out)
                .output()
                .unwrap()
        })
    };
    let output = bounded("brainai segment", run).await.unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    let grpc = segment(
        &mut t,
        segment_request("seg", vec![slice("s", &images, 24, 18)]),
    )
    .await
    .unwrap()
    .results
    .remove(0);
    assert_eq!(
        decode_mask(&std::fs::read(&out).unwrap()),
        decode_mask(&grpc.mask_png)
    );
    assert!(stdout.contains("model seg v1"), "{stdout}");
    assert!(stdout.contains("mask 24×18"), "{stdout}");
    let whole = grpc
        .regions
        .iter()
        .find(|r| r.name == "whole_tumor")
        .unwrap();
    assert!(
        stdout.contains(&format!("region\twhole_tumor\t{} px", whole.pixels)),
        "{stdout}"
    );
    assert!(stderr.contains("not clinically trained"), "{stderr}");
    // A missing sequence: exit 1 and the server's reason.
    let output = tokio::task::spawn_blocking({
        let (url, flags) = (t.grpc_url(), flags.clone());
        move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_brainai"))
                .args(["segment", "--server", &url])
                .args(&flags[..4])
                .output()
                .unwrap()
        }
    });
    let output = bounded("brainai segment", output).await.unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no T2 image"), "{stderr}");
    t.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_model_describes_the_segmentation_model() {
    let root = repository();
    let mut t = serve_repository(root.path(), &[]).await;
    let info = bounded(
        "get model",
        t.client.get_model(pb::GetModelRequest {
            model: "seg-nhwc".into(),
            version: String::new(),
        }),
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(info.task, "segmentation");
    assert_eq!(info.channels, ["T2", "FLAIR", "T1c"]);
    assert_eq!(info.mask_resize, "bilinear");
    assert_eq!(info.colors.len(), 4);
    assert_eq!(info.regions.len(), 3);
    let tiny = bounded(
        "get model",
        t.client.get_model(pb::GetModelRequest::default()),
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(tiny.task, "classification");
    assert!(tiny.channels.is_empty());
    t.server.shutdown().await.unwrap();
}

/// `POST path` of a JSON body (the Open Inference Protocol over HTTP).
async fn post_json(
    addr: std::net::SocketAddr,
    path: &str,
    body: &serde_json::Value,
) -> HttpResponse {
    http(
        addr,
        "POST",
        path,
        &[("Content-Type", "application/json")],
        body.to_string().as_bytes(),
    )
    .await
}

fn base64_decode(text: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dicom_channels_are_checked_as_their_sequence_and_named_in_the_answer() {
    use dicom_dictionary_std::tags;
    let root = repository();
    let mut t = serve_repository(root.path(), &[]).await;
    // An axial MR FLAIR slice: accepted as the FLAIR channel, next to PNGs of its size.
    let flair = data("dicom/ts_explicit_le.dcm");
    let header = dicom_object::OpenFileOptions::new()
        .read_preamble(dicom_object::file::ReadPreamble::Always)
        .from_reader(&flair[..])
        .unwrap();
    let size = |tag| header.element(tag).unwrap().to_int::<u32>().unwrap();
    let (w, h) = (size(tags::COLUMNS), size(tags::ROWS));
    let gray = vec![90u8; (w * h) as usize];
    let dicom_image = |data: Vec<u8>| pb::Image {
        format: pb::ImageFormat::Dicom as i32,
        ..image("", data)
    };
    let accepted = pb::SegmentSlice {
        id: "d".into(),
        images: vec![
            pb::SequenceImage {
                sequence: "FLAIR".into(),
                image: Some(dicom_image(flair.clone())),
            },
            seq_image("T1c", png(w, h, &gray)),
            seq_image("T2", png(w, h, &gray)),
        ],
    };
    let r = segment(
        &mut t,
        segment_request("seg-threshold", vec![accepted.clone()]),
    )
    .await
    .unwrap()
    .results
    .remove(0);
    assert_eq!((r.width, r.height), (w, h));
    assert_eq!(r.dicom.len(), 1);
    assert_eq!(r.dicom[0].sequence, "FLAIR");
    let sop = header
        .element(tags::SOP_INSTANCE_UID)
        .unwrap()
        .to_str()
        .unwrap()
        .trim_end_matches('\0')
        .to_string();
    assert_eq!(r.dicom[0].reference.as_ref().unwrap().sop_instance_uid, sop);
    // The same FLAIR slice sent as the T2 channel: refused, naming what was detected.
    let mut swapped = accepted;
    swapped.images[0] = seq_image("T2", png(w, h, &gray));
    swapped.images[2] = pb::SequenceImage {
        sequence: "T2".into(),
        image: Some(dicom_image(flair)),
    };
    swapped.images[0].sequence = "FLAIR".into();
    let err = segment(&mut t, segment_request("seg-threshold", vec![swapped]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("slice 0, T2"), "{}", err.message());
    assert!(
        err.message().contains("the series is FLAIR"),
        "{}",
        err.message()
    );
    t.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_model_list_and_the_open_inference_protocol_know_segmentation_models() {
    let root = repository();
    let t = serve_repository(root.path(), &[]).await;
    let addr = t.server.http_addr;
    let r = http(addr, "GET", "/v1/models", &[], b"").await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let list = r.json();
    assert_eq!(list["default_model"], "tiny");
    let model = |name: &str| {
        list["models"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == name)
            .unwrap_or_else(|| panic!("{name} listed"))
            .clone()
    };
    let seg = model("seg-nhwc");
    assert_eq!(seg["task"], "segmentation");
    assert_eq!(seg["channels"], serde_json::json!(["T2", "FLAIR", "T1c"]));
    assert_eq!(seg["colors"][1], "#1f77b4");
    assert_eq!(seg["regions"].as_array().unwrap().len(), 3);
    assert_eq!(seg["clinically_trained"], false);
    let tiny = model("tiny");
    assert_eq!(tiny["task"], "classification");
    assert_eq!(tiny["channels"], serde_json::json!([]));
    // Open Inference Protocol metadata: one BYTES input per channel, mask and probabilities.
    let r = http(addr, "GET", "/v2/models/seg-threshold", &[], b"").await;
    let meta = r.json();
    let names: Vec<&str> = meta["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["FLAIR", "T1c", "T2", "input"]);
    assert_eq!(meta["outputs"][0]["name"], "mask");
    assert_eq!(meta["outputs"][0]["datatype"], "UINT8");
    // A model with one ONNX input per channel has no stacked FP32 tensor: refused, not a panic.
    let body = serde_json::json!({"inputs": [{"name": "flair", "datatype": "FP32",
        "shape": [1, 3, 16, 16], "data": vec![0.0f32; 768]}]});
    let r = post_json(addr, "/v2/models/seg-multi/infer", &body).await;
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("send each channel (FLAIR, T1c, T2) as BYTES")
    );
    // The FP32 stacked tensor of seg-threshold: the closed form, as a UINT8 mask in JSON.
    let levels: Vec<f32> = (0..768).map(|i| ((i * 37) % 256) as f32).collect();
    let body = serde_json::json!({"inputs": [{"name": "input", "datatype": "FP32",
        "shape": [1, 3, 16, 16], "data": levels}]});
    let r = post_json(addr, "/v2/models/seg-threshold/infer", &body).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let out = &r.json()["outputs"][0];
    assert_eq!(
        (out["name"].as_str(), out["datatype"].as_str()),
        (Some("mask"), Some("UINT8"))
    );
    assert_eq!(out["shape"], serde_json::json!([1, 16, 16]));
    let mask: Vec<u8> = out["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u8)
        .collect();
    let want: Vec<u8> = (0..256)
        .map(|p| {
            closed_form(
                levels[p] as u8,
                levels[256 + p] as u8,
                levels[512 + p] as u8,
            )
        })
        .collect();
    assert_eq!(mask, want);
    // A classification output on a segmentation model: refused by name.
    let body = serde_json::json!({"inputs": [{"name": "input", "datatype": "FP32",
        "shape": [1, 3, 16, 16], "data": vec![0.0f32; 768]}], "outputs": [{"name": "label"}]});
    let r = post_json(addr, "/v2/models/seg-threshold/infer", &body).await;
    assert_eq!(r.status, 400);
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("(mask, probabilities)")
    );
    t.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_segment_call_leaves_one_audit_record_naming_the_model_and_no_patient_data() {
    let root = repository();
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let flag = audit.display().to_string();
    let mut t = serve_repository(root.path(), &["--audit-log", &flag]).await;
    let images = channels(16, 16, 4);
    // gRPC: two slices of three images.
    segment(
        &mut t,
        segment_request(
            "seg-threshold",
            vec![slice("a", &images, 16, 16), slice("b", &images, 16, 16)],
        ),
    )
    .await
    .unwrap();
    // gRPC, refused: a missing sequence.
    let mut bad = slice("c", &images, 16, 16);
    bad.images.pop();
    segment(&mut t, segment_request("seg-threshold", vec![bad]))
        .await
        .unwrap_err();
    // HTTP: one slice.
    let parts: Vec<Vec<u8>> = images.iter().map(|p| png(16, 16, p)).collect();
    let (content_type, body) = multipart_fields(&[
        ("flair", &parts[0][..]),
        ("t1c", &parts[1][..]),
        ("t2", &parts[2][..]),
    ]);
    let r = http(
        t.server.http_addr,
        "POST",
        "/v1/segment?model=seg-threshold",
        &[("Content-Type", &content_type)],
        &body,
    )
    .await;
    assert_eq!(r.status, 200);
    // Open Inference Protocol: two stacked tensors, two slices.
    let body = serde_json::json!({"inputs": [{"name": "input", "datatype": "FP32",
        "shape": [2, 3, 16, 16], "data": vec![7.0f32; 1536]}]});
    let r = post_json(t.server.http_addr, "/v2/models/seg-threshold/infer", &body).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let records = audit_records(&audit, 4).await;
    assert_eq!(records.len(), 4, "one record per call: {records:#?}");
    let sha = sha256_hex(&root.path().join("seg-threshold/1/model.onnx"));
    for (record, (front_end, method, outcome, images)) in records.iter().zip([
        ("grpc", "brainai.v1.TumorClassifier/Segment", "OK", 6),
        (
            "grpc",
            "brainai.v1.TumorClassifier/Segment",
            "INVALID_ARGUMENT",
            2,
        ),
        ("rest", "/v1/segment", "200", 3),
        ("rest", "/v2/models/{model}/infer", "200", 2),
    ]) {
        assert_eq!(record["front_end"], front_end, "{record}");
        assert!(
            record["method"].as_str().unwrap().ends_with(method),
            "{record}"
        );
        assert_eq!(record["outcome"], outcome, "{record}");
        assert_eq!(record["images"], images, "{record}");
        assert_eq!(record["model"]["name"], "seg-threshold", "{record}");
        assert_eq!(record["model"]["sha256"], sha, "{record}");
    }
    // The slice ids the caller chose are not in the trail.
    let text = std::fs::read_to_string(&audit).unwrap();
    assert!(!text.contains("\"a\"") && !text.contains("\"b\""), "{text}");
    t.server.shutdown().await.unwrap();
}

/// `multi-classify`'s closed form for one slice: logit c is channel c's mean level / 16, in the
/// model's channel order (T2, FLAIR, T1c); the probabilities are their softmax.
fn multi_classify_closed_form(flair: &[u8], t1c: &[u8], t2: &[u8]) -> Vec<f64> {
    let mean = |p: &[u8]| p.iter().map(|&v| f64::from(v)).sum::<f64>() / p.len() as f64 / 16.0;
    let z = [mean(t2), mean(flair), mean(t1c)];
    let top = z.iter().cloned().fold(f64::MIN, f64::max);
    let e: Vec<f64> = z.iter().map(|v| (v - top).exp()).collect();
    let sum: f64 = e.iter().sum();
    e.iter().map(|v| v / sum).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_modal_classifier_answers_the_closed_form_through_every_front_end() {
    const LABELS: [&str; 3] = ["t2_brightest", "flair_brightest", "t1c_brightest"];
    let root = tempfile::tempdir().unwrap();
    copy_model("tiny", root.path(), "tiny");
    copy_model("multi-classify", root.path(), "multi");
    let mut t = serve(
        repository_args(root.path(), &["--default-model", "tiny"]),
        None,
    )
    .await;
    // Three slices, each with another channel brightest, at the model's 16×16 (no resizing).
    let flat = |v: u8| vec![v; 256];
    let ramp = |base: u8| {
        (0..256u32)
            .map(|i| base + (i % 16) as u8)
            .collect::<Vec<u8>>()
    };
    let slices: Vec<[Vec<u8>; 3]> = vec![
        [ramp(60), flat(20), flat(30)], // FLAIR brightest
        [flat(10), ramp(40), flat(30)], // T1c brightest
        [flat(5), flat(20), ramp(35)],  // T2 brightest
    ];
    let want_labels = ["flair_brightest", "t1c_brightest", "t2_brightest"];
    let want: Vec<Vec<f64>> = slices
        .iter()
        .map(|[f, c, t2]| multi_classify_closed_form(f, c, t2))
        .collect();
    let check = |what: &str, k: usize, label: &str, probabilities: &[f64]| {
        assert_eq!(label, want_labels[k], "{what}: slice {k}");
        for (got, w) in probabilities.iter().zip(&want[k]) {
            assert!(
                (got - w).abs() < 1e-5,
                "{what}: slice {k}: {probabilities:?} vs {:?}",
                want[k]
            );
        }
    };

    // gRPC ClassifySlices: one result per slice, in order, ids echoed, model named.
    let response = bounded(
        "classify slices",
        t.client.classify_slices(pb::ClassifySlicesRequest {
            slices: slices
                .iter()
                .enumerate()
                .map(|(k, s)| slice(&format!("s{k}"), s, 16, 16))
                .collect(),
            model: "multi".into(),
            ..Default::default()
        }),
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(response.results.len(), 3);
    for (k, r) in response.results.iter().enumerate() {
        assert_eq!(r.image_id, format!("s{k}"));
        let probabilities: Vec<f64> = LABELS
            .iter()
            .map(|l| {
                f64::from(
                    r.probabilities
                        .iter()
                        .find(|p| p.label == *l)
                        .unwrap()
                        .probability,
                )
            })
            .collect();
        check("gRPC", k, &r.label, &probabilities);
        let model = r.model.as_ref().unwrap();
        assert_eq!(
            (model.name.as_str(), model.clinically_trained),
            ("multi", false)
        );
        assert!(
            r.warnings
                .iter()
                .any(|w| w.contains("not clinically trained"))
        );
    }
    // Single images on a multi-modal model: refused naming what it takes; a missing sequence
    // named; ClassifySlices of a one-image model refused.
    let err = bounded(
        "classify",
        t.client.classify(request_for(
            "multi",
            "",
            vec![image("a", png(16, 16, &slices[0][0]))],
        )),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message()
            .contains("takes T2, FLAIR, T1c for each slice"),
        "{}",
        err.message()
    );
    let mut partial = slice("p", &slices[0], 16, 16);
    partial.images.remove(1);
    let err = bounded(
        "classify slices",
        t.client.classify_slices(pb::ClassifySlicesRequest {
            slices: vec![partial],
            model: "multi".into(),
            ..Default::default()
        }),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("slice 0: no T1c image"),
        "{}",
        err.message()
    );
    let err = bounded(
        "classify slices",
        t.client.classify_slices(pb::ClassifySlicesRequest {
            slices: vec![slice("s", &slices[0], 16, 16)],
            model: "tiny".into(),
            ..Default::default()
        }),
    )
    .await
    .unwrap_err();
    assert!(
        err.message()
            .contains("a FLAIR image was given, but model tiny takes"),
        "{}",
        err.message()
    );

    // HTTP POST /v1/classify: one part per sequence.
    let addr = t.server.http_addr;
    for (k, [f, c, t2]) in slices.iter().enumerate() {
        let parts = [
            ("t1c", png(16, 16, c)),
            ("FLAIR", png(16, 16, f)),
            ("t2", png(16, 16, t2)),
        ];
        let (content_type, body) =
            multipart_fields(&parts.iter().map(|(n, d)| (*n, &d[..])).collect::<Vec<_>>());
        let r = http(
            addr,
            "POST",
            "/v1/classify?model=multi",
            &[("Content-Type", &content_type)],
            &body,
        )
        .await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let row = &r.json()["results"][0];
        let probabilities: Vec<f64> = LABELS
            .iter()
            .map(|l| row["probabilities"][l].as_f64().unwrap())
            .collect();
        check("HTTP", k, row["label"].as_str().unwrap(), &probabilities);
        assert_eq!(row["model"]["name"], "multi");
    }
    // A raw body is not a slice: 400 saying what it takes.
    let r = http(
        addr,
        "POST",
        "/v1/classify?model=multi",
        &[],
        &png(16, 16, &slices[0][0]),
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("one file part per sequence")
    );

    // Open Inference Protocol over HTTP: metadata lists one BYTES input per channel and the
    // classifier's outputs; an infer of three slices answers the closed form.
    let meta = http(addr, "GET", "/v2/models/multi", &[], b"").await.json();
    let names: Vec<&str> = meta["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["T2", "FLAIR", "T1c", "input"]);
    assert_eq!(meta["outputs"][0]["name"], "probabilities");
    use base64::Engine;
    let b64 = |p: &[u8]| base64::engine::general_purpose::STANDARD.encode(png(16, 16, p));
    let channel = |name: &str, c: usize| {
        serde_json::json!({"name": name, "datatype": "BYTES", "shape": [3],
            "data": slices.iter().map(|s| b64(&s[c])).collect::<Vec<_>>()})
    };
    let body = serde_json::json!({"inputs": [channel("FLAIR", 0), channel("T1c", 1), channel("T2", 2)],
        "outputs": [{"name": "probabilities"}, {"name": "label"}]});
    let r = post_json(addr, "/v2/models/multi/infer", &body).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let json = r.json();
    let values: Vec<f64> = json["outputs"][0]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(json["outputs"][0]["shape"], serde_json::json!([3, 3]));
    for k in 0..3 {
        let label = json["outputs"][1]["data"][k].as_str().unwrap();
        check("OIP", k, label, &values[3 * k..3 * k + 3]);
    }

    // The CLI: `brainai classify --flair --t1c --t2`, one line naming the label.
    let dir = tempfile::tempdir().unwrap();
    let mut flags = Vec::new();
    for (flag, pixels) in ["--flair", "--t1c", "--t2"].iter().zip(&slices[2]) {
        let path = dir.path().join(format!("{}.png", &flag[2..]));
        std::fs::write(&path, png(16, 16, pixels)).unwrap();
        flags.push(flag.to_string());
        flags.push(path.display().to_string());
    }
    let run = {
        let (url, flags) = (t.grpc_url(), flags.clone());
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_brainai"))
                .args(["classify", "--server", &url, "--model", "multi", "--json"])
                .args(&flags)
                .output()
                .unwrap()
        })
    };
    let output = bounded("brainai classify", run).await.unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let printed: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(printed["results"][0]["label"], "t2_brightest", "{stdout}");
    t.server.shutdown().await.unwrap();
}
