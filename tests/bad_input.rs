//! The hostile-input battery: every kind of bad or abusive input against the running server, each
//! with its documented status and a message naming the input and the reason, all sent at once
//! while good clients call in the same batch window; the good calls succeed and the server stays
//! up. (Connection-level abuse — floods of idle or slow connections, overload, shutdown under
//! load — is in `tests/resilience/`.)

mod common;

use std::time::Duration;

use brainai::pb;
use common::*;
use futures_util::StreamExt;
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::metadata::MetadataValue;

/// What a case sends.
enum Call {
    Classify(pb::ClassifyRequest),
    /// A Classify with extra metadata and/or a deadline.
    ClassifyWith {
        request: pb::ClassifyRequest,
        metadata: Vec<(String, String)>,
        timeout: Option<Duration>,
    },
    /// Raw bytes as the protobuf message of a method (for what the generated types cannot say).
    Raw {
        path: &'static str,
        body: Vec<u8>,
    },
    /// One ClassifyStream call; the case checks the error response to its first message.
    StreamMessage(pb::ClassifyStreamRequest),
    GetModel(pb::GetModelRequest),
}

struct Case {
    name: &'static str,
    call: Call,
    code: Code,
    /// Substring the status message must contain.
    message: &'static str,
}

fn raw_image(width: u32, height: u32, channels: u32, len: usize) -> pb::Image {
    pb::Image {
        id: "raw".into(),
        data: vec![7; len].into(),
        format: pb::ImageFormat::Raw as i32,
        raw: Some(pb::RawPixels {
            width,
            height,
            channels,
        }),
    }
}

/// A PNG whose IHDR declares `width`×`height` at `bit_depth`/`color_type`, with `idat` as its
/// (zlib) image data.
fn png(width: u32, height: u32, bit_depth: u8, color_type: u8, idat: &[u8]) -> Vec<u8> {
    fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], body: &[u8]) {
        out.extend((body.len() as u32).to_be_bytes());
        let start = out.len();
        out.extend(kind);
        out.extend(body);
        let crc = crc32(&out[start..]);
        out.extend(crc.to_be_bytes());
    }
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend(width.to_be_bytes());
    ihdr.extend(height.to_be_bytes());
    ihdr.extend([bit_depth, color_type, 0, 0, 0]);
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(&mut out, b"IDAT", idat);
    chunk(&mut out, b"IEND", &[]);
    out
}

/// A protobuf length-delimited field.
fn field(number: u32, bytes: &[u8]) -> Vec<u8> {
    let mut out = vec![((number << 3) | 2) as u8];
    let mut len = bytes.len();
    loop {
        let byte = (len & 0x7F) as u8;
        len >>= 7;
        if len == 0 {
            out.push(byte);
            break;
        }
        out.push(byte | 0x80);
    }
    out.extend(bytes);
    out
}

fn cases() -> Vec<Case> {
    let good = || image("good", data("flair_256_a.png"));
    let one = |img: pb::Image| Call::Classify(request(vec![good(), img]));
    let mut big = data("flair_512_rgb.png");
    big.resize(1_500_000, 0); // a PNG with trailing junk, over the 1 MB image limit
    let jpeg = data("flair_512_a.jpg");
    let mut cut_jpeg = jpeg[..jpeg.len() / 2].to_vec();
    cut_jpeg.extend([0xFF, 0xD9]);
    let flat_png = png(64, 64, 8, 0, &[]);
    let classify_with = |metadata: Vec<(String, String)>, timeout| Call::ClassifyWith {
        request: request(vec![good()]),
        metadata,
        timeout,
    };
    vec![
        Case {
            name: "empty request",
            call: Call::Classify(request(vec![])),
            code: Code::InvalidArgument,
            message: "request has no images",
        },
        Case {
            name: "empty image bytes",
            call: one(image("e", vec![])),
            code: Code::InvalidArgument,
            message: "image 1: image data is empty",
        },
        Case {
            name: "bytes that are no image",
            call: one(image("n", data("bad/not_an_image.bin"))),
            code: Code::InvalidArgument,
            message: "image 1: data is neither PNG, JPEG nor DICOM",
        },
        Case {
            name: "truncated JPEG",
            call: one(image("t", data("bad/truncated.jpg"))),
            code: Code::InvalidArgument,
            message: "image 1: JPEG data could not be decoded",
        },
        Case {
            name: "JPEG cut in half with its end-of-image marker appended again",
            call: one(image("t2", cut_jpeg)),
            code: Code::InvalidArgument,
            message: "image 1: JPEG data could not be decoded",
        },
        Case {
            name: "JPEG start marker only",
            call: one(image("j1", vec![0xFF, 0xD8, 0xFF])),
            code: Code::InvalidArgument,
            message: "image 1: JPEG data could not be decoded",
        },
        Case {
            name: "JPEG headers without a scan",
            call: one(image("j2", jpeg[..600].to_vec())),
            code: Code::InvalidArgument,
            message: "image 1: JPEG data could not be decoded",
        },
        Case {
            name: "PNG with a bad CRC",
            call: one(image("c", data("bad/bad_crc.png"))),
            code: Code::InvalidArgument,
            message: "image 1: PNG data could not be decoded",
        },
        Case {
            name: "PNG signature only",
            call: one(image("p0", b"\x89PNG\r\n\x1a\n".to_vec())),
            code: Code::InvalidArgument,
            message: "image 1: PNG data could not be decoded",
        },
        Case {
            name: "PNG header but no image data",
            call: one(image("p1", flat_png)),
            code: Code::InvalidArgument,
            message: "image 1: PNG data could not be decoded",
        },
        Case {
            name: "PNG with an invalid colour type",
            call: one(image("p2", png(8, 8, 8, 5, &[]))),
            code: Code::InvalidArgument,
            message: "image 1: PNG data could not be decoded",
        },
        Case {
            name: "PNG palette image without a palette",
            call: one(image("p3", png(8, 8, 8, 3, &[0x78, 0x9C, 0x03, 0x00]))),
            code: Code::InvalidArgument,
            message: "image 1: PNG data could not be decoded",
        },
        Case {
            name: "image over the byte limit",
            call: one(image("b", big)),
            code: Code::InvalidArgument,
            message: "image 1: image is 1500000 bytes, over the limit of 1048576 bytes",
        },
        Case {
            name: "image over the pixel limit (decompression bomb)",
            call: one(image("p", data("bad/huge_dimensions.png"))),
            code: Code::InvalidArgument,
            message: "image 1: image is 20000×20000 = 400000000 pixels, over the limit of 16777216 pixels",
        },
        Case {
            name: "JPEG declaring 65535x65535 pixels",
            call: one(image("jb", {
                // Patch the frame header's height and width to 0xFFFF.
                let mut j = jpeg.clone();
                let sof = j.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
                j[sof + 5..sof + 9].copy_from_slice(&[0xFF, 0xFF, 0xFF, 0xFF]);
                j
            })),
            code: Code::InvalidArgument,
            message: "image 1: image is 65535×65535",
        },
        Case {
            name: "images that would decode to more than the request's budget",
            call: Call::Classify(request(
                (0..3)
                    .map(|i| image(&format!("big{i}"), png(4096, 4096, 16, 6, &[])))
                    .collect(),
            )),
            code: Code::ResourceExhausted,
            message: "would decode to 384 MiB, over the limit of 256 MiB per request",
        },
        Case {
            name: "raw pixels of the wrong length",
            call: one(raw_image(64, 64, 3, 64 * 64 * 3 - 1)),
            code: Code::InvalidArgument,
            message: "image 1: raw pixels: 12287 bytes do not match 64×64×3 = 12288 bytes",
        },
        Case {
            name: "raw format without geometry",
            call: one(pb::Image {
                raw: None,
                ..raw_image(1, 1, 1, 1)
            }),
            code: Code::InvalidArgument,
            message: "image 1: format RAW needs the `raw` field",
        },
        Case {
            name: "raw pixels with two channels",
            call: one(raw_image(2, 2, 2, 8)),
            code: Code::InvalidArgument,
            message: "image 1: raw pixels: channels must be 1, 3 or 4, got 2",
        },
        Case {
            name: "raw pixels of zero size",
            call: one(raw_image(0, 5, 1, 1)),
            code: Code::InvalidArgument,
            message: "image 1: raw pixels: image is 0×5: no pixels",
        },
        Case {
            name: "raw geometry over the pixel limit, with few bytes",
            call: one(raw_image(65535, 65535, 3, 16)),
            code: Code::InvalidArgument,
            message: "image 1: image is 65535×65535",
        },
        Case {
            name: "declared PNG but JPEG data",
            call: one(pb::Image {
                format: pb::ImageFormat::Png as i32,
                ..image("d", data("flair_256_a.jpg"))
            }),
            code: Code::InvalidArgument,
            message: "image 1: declared format PNG does not match the data, which looks like JPEG",
        },
        Case {
            name: "declared JPEG but PNG data",
            call: one(pb::Image {
                format: pb::ImageFormat::Jpeg as i32,
                ..image("d2", data("flair_256_a.png"))
            }),
            code: Code::InvalidArgument,
            message: "image 1: declared format JPEG does not match the data, which looks like PNG",
        },
        Case {
            name: "unknown image format value",
            call: one(pb::Image {
                format: 99,
                ..image("f", data("flair_256_a.png"))
            }),
            code: Code::InvalidArgument,
            message: "image 1: unknown image format value 99",
        },
        Case {
            name: "unknown priority value",
            call: Call::Classify(pb::ClassifyRequest {
                priority: 7,
                ..request(vec![good()])
            }),
            code: Code::InvalidArgument,
            message: "unknown priority value 7",
        },
        Case {
            name: "too many images",
            call: Call::Classify(request((0..5).map(|_| good()).collect())),
            code: Code::InvalidArgument,
            message: "request has 5 images, over the limit of 4 per request",
        },
        Case {
            name: "unknown model name",
            call: Call::Classify(request_for("brain-tumor-unet", "", vec![good()])),
            code: Code::NotFound,
            message: "model \"brain-tumor-unet\" is not served here; this server serves \"tiny\"",
        },
        Case {
            name: "a 20 KB model name (echoed, but bounded)",
            call: Call::Classify(request_for(&"x".repeat(20_000), "", vec![good()])),
            code: Code::NotFound,
            message: "(20000 bytes) is not served here",
        },
        Case {
            name: "version that is not served",
            call: Call::Classify(request_for("tiny", "7", vec![good()])),
            code: Code::NotFound,
            message: "version \"7\" of model tiny is not served; served versions: [1]",
        },
        Case {
            name: "version that is not a number",
            call: Call::Classify(request_for("tiny", "latest", vec![good()])),
            code: Code::NotFound,
            message: "version \"latest\" of model tiny is not served",
        },
        Case {
            name: "message over the gRPC size limit",
            call: one(image("m", vec![0x89; 3 << 20])),
            code: Code::ResourceExhausted,
            message: "message length too large",
        },
        Case {
            name: "100 KB of metadata on one call",
            call: classify_with(vec![("x-padding".into(), "p".repeat(100_000))], None),
            code: Code::ResourceExhausted,
            message: "request metadata is",
        },
        Case {
            name: "many small metadata entries",
            call: classify_with(
                (0..600)
                    .map(|i| (format!("x-k{i}"), "vvvvvvvv".into()))
                    .collect(),
                None,
            ),
            code: Code::ResourceExhausted,
            message: "over the limit of 16384 bytes",
        },
        Case {
            name: "an image id that is not UTF-8",
            call: Call::Raw {
                path: "/brainai.v1.TumorClassifier/Classify",
                // ClassifyRequest { images: [Image { id: 0xFF 0xFE, data: … }] }
                body: field(
                    1,
                    &[field(1, &[0xFF, 0xFE]), field(2, &data("flair_256_a.png"))].concat(),
                ),
            },
            code: Code::InvalidArgument,
            message: "failed to decode Protobuf message",
        },
        Case {
            name: "bytes that are not protobuf",
            call: Call::Raw {
                path: "/brainai.v1.TumorClassifier/Classify",
                body: vec![0xFF; 64],
            },
            code: Code::InvalidArgument,
            message: "failed to decode Protobuf message",
        },
        Case {
            name: "a method that does not exist",
            call: Call::Raw {
                path: "/brainai.v1.TumorClassifier/SegmentVolume",
                body: vec![],
            },
            code: Code::Unimplemented,
            message: "",
        },
        Case {
            name: "a service that does not exist",
            call: Call::Raw {
                path: "/tensorflow.serving.PredictionService/Predict",
                body: vec![],
            },
            code: Code::Unimplemented,
            message: "",
        },
        Case {
            name: "a deadline over on arrival (the server answers DEADLINE_EXCEEDED, never CANCELLED)",
            call: classify_with(vec![("grpc-timeout".into(), "1n".into())], None),
            code: Code::DeadlineExceeded,
            message: "deadline exceeded",
        },
        Case {
            name: "a malformed deadline header (ignored: served)",
            call: classify_with(vec![("grpc-timeout".into(), "soon".into())], None),
            code: Code::Ok,
            message: "",
        },
        Case {
            name: "stream message without an image",
            call: Call::StreamMessage(pb::ClassifyStreamRequest::default()),
            code: Code::InvalidArgument,
            message: "stream message 0 has no image",
        },
        Case {
            name: "stream message for an unknown model",
            call: Call::StreamMessage(pb::ClassifyStreamRequest {
                image: Some(good()),
                model: "nope".into(),
                ..Default::default()
            }),
            code: Code::NotFound,
            message: "model \"nope\" is not served here",
        },
        Case {
            name: "stream message with a bad image",
            call: Call::StreamMessage(pb::ClassifyStreamRequest {
                image: Some(image("s", data("bad/bad_crc.png"))),
                ..Default::default()
            }),
            code: Code::InvalidArgument,
            message: "image 0: PNG data could not be decoded",
        },
        Case {
            name: "model description of a version that is not served",
            call: Call::GetModel(pb::GetModelRequest {
                model: String::new(),
                version: "2".into(),
            }),
            code: Code::NotFound,
            message: "version \"2\" of model tiny is not served",
        },
    ]
}

/// Passes bytes through as a message (both ways).
#[derive(Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }
    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        use bytes::Buf;
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

/// Sends one case; returns the status it got (or the panic message for a success).
async fn send(t: &TestServer, call: Call) -> Result<(), tonic::Status> {
    let mut client = t.client.clone();
    match call {
        Call::Classify(request) => client.classify(request).await.map(drop),
        Call::ClassifyWith {
            request,
            metadata,
            timeout,
        } => {
            // Straight over HTTP/2: tonic's client would enforce a grpc-timeout itself.
            let mut client = pb::tumor_classifier_client::TumorClassifierClient::new(
                raw_h2(t.server.grpc_addr).await,
            );
            let mut request = tonic::Request::new(request);
            for (k, v) in metadata {
                let key = tonic::metadata::MetadataKey::from_bytes(k.as_bytes()).unwrap();
                request
                    .metadata_mut()
                    .insert(key, MetadataValue::try_from(v.as_str()).unwrap());
            }
            if let Some(timeout) = timeout {
                request.set_timeout(timeout);
            }
            client.classify(request).await.map(drop)
        }
        Call::Raw { path, body } => {
            let mut grpc = tonic::client::Grpc::new(t.channel.clone());
            grpc.ready().await.unwrap();
            grpc.unary::<Vec<u8>, Vec<u8>, RawCodec>(
                tonic::Request::new(body),
                path.parse().unwrap(),
                RawCodec,
            )
            .await
            .map(drop)
        }
        Call::StreamMessage(message) => {
            let mut inbound = client
                .classify_stream(futures_util::stream::iter(vec![message]))
                .await?
                .into_inner();
            let first = inbound
                .next()
                .await
                .expect("one response")
                .expect("a response, not a broken stream");
            match first.outcome {
                Some(pb::classify_stream_response::Outcome::Error(e)) => {
                    Err(tonic::Status::new(Code::from(e.code), e.message))
                }
                _ => Ok(()),
            }
        }
        Call::GetModel(request) => client.get_model(request).await.map(drop),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_inputs_get_their_status_while_good_requests_in_the_same_window_succeed() {
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
    let cases = cases();
    assert!(cases.len() >= 40, "the battery has {} cases", cases.len());
    let t = &t;
    let bad = cases.into_iter().map(|case| async move {
        let result = bounded(case.name, send(t, case.call)).await;
        (case.name, case.code, case.message, result)
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

    let mut wrong = Vec::new();
    for (name, code, message, result) in bad {
        match result {
            Ok(()) if code == Code::Ok => {}
            Ok(()) => wrong.push(format!("{name}: succeeded, expected {code:?}")),
            Err(status) if status.code() != code || !status.message().contains(message) => wrong
                .push(format!(
                    "{name}: got {:?} {:?}, expected {code:?} containing {message:?}",
                    status.code(),
                    status.message()
                )),
            Err(status) => assert!(
                status.message().len() < 512,
                "{name}: message of {} bytes",
                status.message().len()
            ),
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    for (i, r) in good.into_iter().enumerate() {
        let r = r
            .unwrap_or_else(|s| panic!("good request {i} failed: {s:?}"))
            .into_inner();
        assert_eq!(r.results[0].image_id, format!("g{i}"));
    }

    // Alone in the queue (so no batch can fill up and leave at once, as it may in the battery's
    // crowd), one image whose deadline the queue delay alone exceeds is refused at admission.
    match bounded(
        "a deadline the queue delay alone exceeds",
        send(
            t,
            Call::ClassifyWith {
                request: request(vec![image("alone", data("flair_256_a.png"))]),
                metadata: vec![("grpc-timeout".into(), "50m".into())],
                timeout: None,
            },
        ),
    )
    .await
    {
        Err(status) => {
            assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
            assert!(
                status
                    .message()
                    .contains("cannot answer before the deadline"),
                "{status:?}"
            );
        }
        Ok(()) => panic!("a deadline the queue delay alone exceeds was admitted"),
    }

    // Still up, and nothing was lost: a later call works too.
    let mut client = t.client.clone();
    let after = client
        .classify(request(vec![image("after", data("flair_256_c.png"))]))
        .await
        .expect("server still serves after bad input");
    assert_eq!(after.into_inner().results.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inference_error_fails_its_batch_and_the_instance_keeps_serving() {
    // tiny-faulty fails in ONNX Runtime for any batch holding an image with a pixel of 255.
    let mut t = serve(
        args(
            &fixture_model("tiny-faulty"),
            &[
                "--max-batch-size",
                "2",
                "--max-queue-delay-us",
                "30000000",
                "--max-queue-wait-ms",
                "0",
            ],
        ),
        None,
    )
    .await;
    let white = pb::Image {
        id: "poison".into(),
        data: vec![255; 32 * 32].into(),
        format: pb::ImageFormat::Raw as i32,
        raw: Some(pb::RawPixels {
            width: 32,
            height: 32,
            channels: 1,
        }),
    };
    let dark = |id: &str| pb::Image {
        id: id.into(),
        data: vec![40; 32 * 32].into(),
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
    // ONNX Runtime's message (source paths, node names, shapes) stays in the server log.
    for internal in ["onnxruntime", "Reshape", "poison", ".h:", "shape"] {
        assert!(
            !a.message().contains(internal),
            "an internal detail ({internal}) reached the caller: {}",
            a.message()
        );
    }
    assert!(
        a.message().contains("the server log has the details"),
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
