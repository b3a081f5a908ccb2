//! Every kind of bad input against the running server: the right gRPC status, a message naming the
//! image index and the reason, and other clients' requests in the same batch window still succeed.

mod common;

use brainai::pb;
use common::*;
use tonic::Code;

struct Case {
    name: &'static str,
    request: pb::ClassifyRequest,
    code: Code,
    /// Substring the status message must contain.
    message: &'static str,
}

fn raw_image(width: u32, height: u32, channels: u32, len: usize) -> pb::Image {
    pb::Image {
        id: "raw".into(),
        data: vec![7; len],
        format: pb::ImageFormat::Raw as i32,
        raw: Some(pb::RawPixels {
            width,
            height,
            channels,
        }),
    }
}

fn cases() -> Vec<Case> {
    let good = || image("good", data("flair_256_a.png"));
    let one = |img: pb::Image| request(vec![good(), img]);
    let mut big = data("flair_512_rgb.png");
    big.resize(1_500_000, 0); // a PNG with trailing junk, over the 1 MB image limit
    vec![
        Case {
            name: "empty request",
            request: request(vec![]),
            code: Code::InvalidArgument,
            message: "request has no images",
        },
        Case {
            name: "empty image bytes",
            request: one(image("e", vec![])),
            code: Code::InvalidArgument,
            message: "image 1: image data is empty",
        },
        Case {
            name: "bytes that are no image",
            request: one(image("n", data("bad/not_an_image.bin"))),
            code: Code::InvalidArgument,
            message: "image 1: data is neither PNG nor JPEG",
        },
        Case {
            name: "truncated JPEG",
            request: one(image("t", data("bad/truncated.jpg"))),
            code: Code::InvalidArgument,
            message: "image 1: JPEG data could not be decoded",
        },
        Case {
            name: "PNG with a bad CRC",
            request: one(image("c", data("bad/bad_crc.png"))),
            code: Code::InvalidArgument,
            message: "image 1: PNG data could not be decoded",
        },
        Case {
            name: "image over the byte limit",
            request: one(image("b", big)),
            code: Code::InvalidArgument,
            message: "image 1: image is 1500000 bytes, over the limit of 1048576 bytes",
        },
        Case {
            name: "image over the pixel limit (decompression bomb)",
            request: one(image("p", data("bad/huge_dimensions.png"))),
            code: Code::InvalidArgument,
            message: "image 1: image is 20000×20000 = 400000000 pixels, over the limit of 16777216 pixels",
        },
        Case {
            name: "raw pixels of the wrong length",
            request: one(raw_image(64, 64, 3, 64 * 64 * 3 - 1)),
            code: Code::InvalidArgument,
            message: "image 1: raw pixels: 12287 bytes do not match 64×64×3 = 12288 bytes",
        },
        Case {
            name: "raw format without geometry",
            request: one(pb::Image {
                raw: None,
                ..raw_image(1, 1, 1, 1)
            }),
            code: Code::InvalidArgument,
            message: "image 1: format RAW needs the `raw` field",
        },
        Case {
            name: "declared PNG but JPEG data",
            request: one(pb::Image {
                format: pb::ImageFormat::Png as i32,
                ..image("d", data("flair_256_a.jpg"))
            }),
            code: Code::InvalidArgument,
            message: "image 1: declared format PNG does not match the data, which looks like JPEG",
        },
        Case {
            name: "too many images",
            request: request((0..5).map(|_| good()).collect()),
            code: Code::InvalidArgument,
            message: "request has 5 images, over the limit of 4 per request",
        },
        Case {
            name: "unknown model name",
            request: request_for("brain-tumor-unet", "", vec![good()]),
            code: Code::NotFound,
            message: "model \"brain-tumor-unet\" is not served here; this server serves \"tiny\"",
        },
        Case {
            name: "message over the gRPC size limit",
            request: one(image("m", vec![0x89; 3 << 20])),
            code: Code::ResourceExhausted,
            message: "message length too large",
        },
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_are_rejected_clearly_while_good_requests_in_the_same_window_succeed() {
    let t = serve(
        args(
            &fixture_model("tiny"),
            &[
                "--max-image-bytes",
                "1048576",
                "--max-pixels",
                "16777216",
                "--max-images-per-request",
                "4",
                "--max-message-bytes",
                "2097152",
                "--max-batch-size",
                "8",
                // Everything below arrives inside one queue-delay window.
                "--max-queue-delay-us",
                "200000",
            ],
        ),
        None,
    )
    .await;

    let bad = cases().into_iter().map(|case| {
        let mut client = t.client.clone();
        async move {
            let result = client.classify(case.request).await;
            (case.name, case.code, case.message, result)
        }
    });
    let good = (0..6).map(|i| {
        let mut client = t.client.clone();
        async move {
            client
                .classify(request(vec![image(
                    &format!("g{i}"),
                    data("flair_256_b.png"),
                )]))
                .await
        }
    });
    let (bad, good) = tokio::join!(
        futures_util::future::join_all(bad),
        futures_util::future::join_all(good)
    );

    for (name, code, message, result) in bad {
        let status = result.expect_err(name);
        assert_eq!(status.code(), code, "{name}: {}", status.message());
        assert!(
            status.message().contains(message),
            "{name}: message {:?} lacks {message:?}",
            status.message()
        );
    }
    for (i, r) in good.into_iter().enumerate() {
        let r = r
            .unwrap_or_else(|s| panic!("good request {i} failed: {s:?}"))
            .into_inner();
        assert_eq!(r.results[0].image_id, format!("g{i}"));
    }

    // Still up, and nothing was lost: a later call works too.
    let mut client = t.client.clone();
    let after = client
        .classify(request(vec![image("after", data("flair_256_c.png"))]))
        .await
        .expect("server still serves after bad input");
    assert_eq!(after.into_inner().results.len(), 1);
    t.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inference_error_fails_its_batch_and_the_instance_keeps_serving() {
    // tiny-faulty fails in ONNX Runtime for any batch holding an image with a pixel of 255.
    let mut t = serve(
        args(
            &fixture_model("tiny-faulty"),
            &["--max-batch-size", "2", "--max-queue-delay-us", "30000000"],
        ),
        None,
    )
    .await;
    let white = pb::Image {
        id: "poison".into(),
        data: vec![255; 32 * 32],
        format: pb::ImageFormat::Raw as i32,
        raw: Some(pb::RawPixels {
            width: 32,
            height: 32,
            channels: 1,
        }),
    };
    let dark = |id: &str| pb::Image {
        id: id.into(),
        data: vec![40; 32 * 32],
        ..white.clone()
    };
    let (mut c1, mut c2) = (t.client.clone(), t.client.clone());
    let (a, b) = tokio::join!(
        c1.classify(request(vec![white.clone()])),
        c2.classify(request(vec![dark("bystander")]))
    );
    let (a, b) = (a.unwrap_err(), b.unwrap_err());
    assert_eq!(a.code(), Code::Internal);
    assert_eq!(a.message(), b.message(), "one batch, one message");
    assert!(
        a.message().starts_with("image 0: inference failed:"),
        "{}",
        a.message()
    );

    // The instance keeps serving: a full batch of good images succeeds.
    let ok = t
        .client
        .classify(request(vec![dark("x"), dark("y")]))
        .await
        .expect("instance still serves")
        .into_inner();
    assert_eq!(ok.results.len(), 2);
    t.server.shutdown().await.unwrap();
}
