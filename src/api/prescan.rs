//! Bounds what decoding a request message may allocate, before tonic decodes it.
//!
//! Protobuf decoding amplifies: an empty `Image` is 2 bytes on the wire and ~70 bytes decoded, so
//! one 64 MiB `Classify` of empty images would make prost allocate gigabytes (measured: 4.3 GB of
//! resident memory and 20 s of CPU) before the image limit is ever checked. This layer reads the
//! (already size-limited) message of the unary calls that carry repeated data, `Classify`,
//! `ClassifySeries`, `Segment`, `ClassifySlices` and `ModelInfer`, walks its wire format without allocating (a `Classify` body in the pieces it
//! arrived in, without copying it into one buffer), and refuses it `INVALID_ARGUMENT` when a
//! repeated field holds more elements than the request may have: images (or slices) over
//! `--max-images-per-request`, images per slice over [`MAX_SLICE_IMAGES`], tensors, dimensions and parameters over small fixed caps. Anything
//! it does not understand (compression, several frames, malformed protobuf) goes on to tonic
//! unchanged, which answers it as before. Streaming calls carry one image per message and are not
//! touched.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::{BodyExt, Limited, StreamBody};
use hyper::body::Frame;
use tonic::codegen::http::{Request, Response};
use tower::{Layer, Service};

use super::oip::{MAX_DIMS, MAX_PARAMETERS, MAX_TENSORS};

const CLASSIFY: &str = "/brainai.v1.TumorClassifier/Classify";
const CLASSIFY_SERIES: &str = "/brainai.v1.TumorClassifier/ClassifySeries";
const MODEL_INFER: &str = "/inference.GRPCInferenceService/ModelInfer";
const SEGMENT: &str = "/brainai.v1.TumorClassifier/Segment";
const CLASSIFY_SLICES: &str = "/brainai.v1.TumorClassifier/ClassifySlices";

/// Most images one slice of a `Segment` call may hold: one per MR sequence (four), with room for a
/// duplicate or an extra to be refused by name rather than by count.
pub const MAX_SLICE_IMAGES: usize = 8;

/// The limits the scan enforces.
#[derive(Debug, Clone, Copy)]
pub struct PrescanLimits {
    pub max_message_bytes: usize,
    pub max_images: usize,
}

/// The layer that scans each request message of the scanned methods against its limits.
#[derive(Debug, Clone, Copy)]
pub struct PrescanLayer(pub PrescanLimits);

impl<S> Layer<S> for PrescanLayer {
    type Service = Prescan<S>;
    fn layer(&self, inner: S) -> Prescan<S> {
        Prescan {
            inner,
            limits: self.0,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Prescan<S> {
    inner: S,
    limits: PrescanLimits,
}

/// A scan of one message, given as the pieces it arrived in.
type Scan = fn(Wire<'_>, &PrescanLimits) -> Result<(), tonic::Status>;

impl<S, B, ResBody> Service<Request<B>> for Prescan<S>
where
    S: Service<Request<tonic::body::Body>, Response = Response<ResBody>> + Clone + Send + 'static,
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let (scan, contiguous): (Scan, bool) = match request.uri().path() {
            CLASSIFY => (classify_request, false),
            CLASSIFY_SERIES => (classify_series_request, false),
            MODEL_INFER => (model_infer_request, true),
            // Its slices are a `SegmentRequest`'s (field 1 of the same `SegmentSlice`).
            SEGMENT | CLASSIFY_SLICES => (segment_request, true),
            _ => return Box::pin(self.inner.call(request.map(tonic::body::Body::new))),
        };
        // The ready service goes with this call; the clone waits for the next poll_ready.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let limits = self.limits;
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            // One gRPC frame: 5 bytes of header, then the message.
            let collected = match Limited::new(body, limits.max_message_bytes + 5)
                .collect()
                .await
            {
                Ok(collected) => collected,
                Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                    return Ok(tonic::Status::resource_exhausted(format!(
                        "message length too large: over the limit of {} bytes",
                        limits.max_message_bytes
                    ))
                    .into_http());
                }
                // The transport's body error carries its status (too slow, client gone, ...).
                Err(e) => return Ok(tonic::Status::from_error(e).into_http()),
            };
            // The body's pieces as they arrived (HTTP/2 DATA frames, 16 KiB each from most
            // clients), not copied into one buffer: tonic copies them into its own anyway. Only
            // `ModelInfer` and `Segment`, whose scans read inside nested messages, are made
            // contiguous.
            let mut chunks = body_chunks(collected);
            if contiguous && chunks.len() > 1 {
                chunks = vec![chunks.concat().into()];
            }
            let parts_of: Vec<&[u8]> = chunks.iter().map(|c| &c[..]).collect();
            if let Some(message) = single_uncompressed_message(&parts_of)
                && let Err(status) = scan(message, &limits)
            {
                return Ok(status.into_http());
            }
            let frames = chunks
                .into_iter()
                .map(|c| Ok::<_, std::convert::Infallible>(Frame::data(c)));
            let body = StreamBody::new(futures_util::stream::iter(frames));
            let body = tonic::body::Body::new(body.map_err(|never| match never {}));
            inner.call(Request::from_parts(parts, body)).await
        })
    }
}

/// The scan the layer runs on one message of the method `path`, given in the pieces it arrived in
/// (`ModelInfer`: one piece); `None` for a method it does not scan. Public for the differential
/// fuzz target (`fuzzing::prescan`), which holds it to prost's decoding of the same bytes.
pub fn scan(
    path: &str,
    pieces: &[&[u8]],
    limits: &PrescanLimits,
) -> Option<Result<(), tonic::Status>> {
    let scan: Scan = match path {
        CLASSIFY => classify_request,
        CLASSIFY_SERIES => classify_series_request,
        MODEL_INFER => model_infer_request,
        SEGMENT | CLASSIFY_SLICES => segment_request,
        _ => return None,
    };
    Some(scan(Wire::new(pieces), limits))
}

/// The data of a collected body, piece by piece, without copying.
fn body_chunks(collected: http_body_util::Collected<Bytes>) -> Vec<Bytes> {
    use bytes::Buf;
    let mut buf = collected.aggregate();
    let mut chunks = Vec::new();
    while buf.has_remaining() {
        // The front piece whole: a slice of it, not a copy.
        let n = buf.chunk().len();
        chunks.push(buf.copy_to_bytes(n));
    }
    chunks
}

/// The message of a body (in pieces) holding exactly one uncompressed gRPC frame.
fn single_uncompressed_message<'a>(body: &'a [&'a [u8]]) -> Option<Wire<'a>> {
    let mut wire = Wire::new(body);
    let mut header = [0u8; 5];
    for byte in &mut header {
        *byte = wire.byte()?;
    }
    let [flag, a, b, c, d] = header;
    (flag == 0 && u32::from_be_bytes([a, b, c, d]) as usize == wire.remaining()).then_some(wire)
}

/// One field of the protobuf wire format.
enum Field<'a> {
    Varint,
    Fixed,
    /// A group (wire types 3 and 4, deprecated but still decoded): prost skips it whole when its
    /// number is not declared, so the scan does too.
    Group,
    /// A length-delimited field's bytes; `None` when they span two pieces of the body (only a
    /// `Classify` body is scanned in pieces, and its scan never looks inside a field).
    Bytes(Option<&'a [u8]>),
}

/// A non-allocating reader of protobuf fields over a message in one or more pieces; `None` at
/// the end or on malformed data (which tonic then reports).
#[derive(Clone, Copy)]
struct Wire<'a> {
    /// What is left of the current piece.
    rest: &'a [u8],
    /// The pieces after it.
    more: &'a [&'a [u8]],
}

impl<'a> Wire<'a> {
    fn new(pieces: &'a [&'a [u8]]) -> Self {
        Wire {
            rest: &[],
            more: pieces,
        }
    }

    fn one(message: &'a [u8]) -> Self {
        Wire {
            rest: message,
            more: &[],
        }
    }

    fn remaining(&self) -> usize {
        self.rest.len() + self.more.iter().map(|p| p.len()).sum::<usize>()
    }

    fn is_empty(&self) -> bool {
        self.rest.is_empty() && self.more.iter().all(|p| p.is_empty())
    }

    fn byte(&mut self) -> Option<u8> {
        loop {
            if let Some((&byte, rest)) = self.rest.split_first() {
                self.rest = rest;
                return Some(byte);
            }
            (self.rest, self.more) = self.more.split_first()?;
        }
    }

    fn varint(&mut self) -> Option<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.byte()?;
            value |= u64::from(byte & 0x7F) << shift;
            if byte & 0x80 == 0 {
                return Some(value);
            }
        }
        None
    }

    /// Skips `n` bytes; the slice of them when they lie in one piece.
    fn skip(&mut self, mut n: usize) -> Option<Option<&'a [u8]>> {
        if self.rest.len() >= n {
            let (taken, rest) = self.rest.split_at(n);
            self.rest = rest;
            return Some(Some(taken));
        }
        loop {
            if self.rest.len() >= n {
                self.rest = &self.rest[n..];
                return Some(None);
            }
            n -= self.rest.len();
            (self.rest, self.more) = self.more.split_first()?;
        }
    }

    fn next(&mut self) -> Option<(u64, Field<'a>)> {
        if self.is_empty() {
            return None;
        }
        let key = self.varint()?;
        let field = match key & 7 {
            0 => self.varint().map(|_| Field::Varint)?,
            1 => self.skip(8).map(|_| Field::Fixed)?,
            2 => {
                let len = usize::try_from(self.varint()?).ok()?;
                Field::Bytes(self.skip(len)?)
            }
            5 => self.skip(4).map(|_| Field::Fixed)?,
            3 => self.skip_group().map(|()| Field::Group)?,
            // An end-group with no start, or wire types 6 and 7: prost refuses them too.
            _ => return None,
        };
        Some((key >> 3, field))
    }

    /// Skips to the end of a group whose start was just read, nested groups included, without
    /// recursion (prost refuses nesting past its recursion limit; the scan need not).
    fn skip_group(&mut self) -> Option<()> {
        let mut depth = 1usize;
        while depth > 0 {
            let key = self.varint()?;
            match key & 7 {
                0 => {
                    self.varint()?;
                }
                1 => {
                    self.skip(8)?;
                }
                2 => {
                    let len = usize::try_from(self.varint()?).ok()?;
                    self.skip(len)?;
                }
                3 => depth += 1,
                4 => depth -= 1,
                5 => {
                    self.skip(4)?;
                }
                _ => return None,
            }
        }
        Some(())
    }
}

/// Counts of the fields of a message that the caller asks about.
fn count(mut wire: Wire<'_>, number: u64) -> usize {
    let mut n = 0;
    while let Some((field, _)) = wire.next() {
        n += usize::from(field == number);
    }
    n
}

/// Elements of a repeated scalar field: packed (one length-delimited field of varints) or not.
fn scalars(mut wire: Wire<'_>, number: u64) -> usize {
    let mut n = 0;
    while let Some((field, value)) = wire.next() {
        if field != number {
            continue;
        }
        n += match value {
            Field::Bytes(Some(packed)) => {
                let mut inner = Wire::one(packed);
                let mut k = 0;
                while inner.varint().is_some() {
                    k += 1;
                }
                k
            }
            _ => 1,
        };
    }
    n
}

fn invalid(message: String) -> tonic::Status {
    tonic::Status::invalid_argument(message)
}

/// `ClassifyRequest`: at most `--max-images-per-request` images (field 1).
fn classify_request(message: Wire<'_>, limits: &PrescanLimits) -> Result<(), tonic::Status> {
    let n = count(message, 1);
    if n > limits.max_images {
        return Err(invalid(format!(
            "request has {n} images, over the limit of {} per request",
            limits.max_images
        )));
    }
    Ok(())
}

/// `ClassifySeriesRequest`: at most `--max-images-per-request` instances (field 1).
fn classify_series_request(message: Wire<'_>, limits: &PrescanLimits) -> Result<(), tonic::Status> {
    let n = count(message, 1);
    if n > limits.max_images {
        return Err(invalid(format!(
            "the series has {n} instances, over the limit of {} per request",
            limits.max_images
        )));
    }
    Ok(())
}

/// `SegmentRequest`: at most `--max-images-per-request` slices (field 1), each with at most
/// [`MAX_SLICE_IMAGES`] images (`SegmentSlice` field 2). Contiguous.
fn segment_request(mut wire: Wire<'_>, limits: &PrescanLimits) -> Result<(), tonic::Status> {
    let mut slices = 0;
    while let Some((field, value)) = wire.next() {
        if field != 1 {
            continue;
        }
        slices += 1;
        if slices > limits.max_images {
            return Err(invalid(format!(
                "request has more than {} slices, over the limit of {} per request",
                limits.max_images, limits.max_images
            )));
        }
        if let Field::Bytes(Some(slice)) = value {
            let n = count(Wire::one(slice), 2);
            if n > MAX_SLICE_IMAGES {
                return Err(invalid(format!(
                    "slice {}: {n} images, over the limit of {MAX_SLICE_IMAGES} (one per MR sequence)",
                    slices - 1
                )));
            }
        }
    }
    Ok(())
}

/// `ModelInferRequest`: parameters (4), inputs (5: shape 3, parameters 4, contents 5), outputs
/// (6: parameters 2), raw_input_contents (7).
fn model_infer_request(mut wire: Wire<'_>, limits: &PrescanLimits) -> Result<(), tonic::Status> {
    let (mut inputs, mut outputs, mut raw, mut parameters) = (0, 0, 0, 0);
    while let Some((field, value)) = wire.next() {
        // Contiguous: a `ModelInfer` body is scanned in one piece.
        let Field::Bytes(Some(inner)) = value else {
            continue;
        };
        match field {
            4 => parameters += 1,
            5 => {
                check_input(inputs, inner, limits)?;
                inputs += 1;
            }
            6 => {
                outputs += 1;
                if count(Wire::one(inner), 2) > MAX_PARAMETERS {
                    return Err(invalid(format!(
                        "output {} has more than {MAX_PARAMETERS} parameters",
                        outputs - 1
                    )));
                }
            }
            7 => raw += 1,
            _ => {}
        }
        if inputs > MAX_TENSORS || outputs > MAX_TENSORS || raw > MAX_TENSORS {
            return Err(invalid(format!(
                "a request has at most {MAX_TENSORS} inputs, outputs and raw_input_contents \
                 (this server takes one input)"
            )));
        }
        if parameters > MAX_PARAMETERS {
            return Err(invalid(format!(
                "a request has at most {MAX_PARAMETERS} parameters"
            )));
        }
    }
    Ok(())
}

fn check_input(i: usize, input: &[u8], limits: &PrescanLimits) -> Result<(), tonic::Status> {
    if scalars(Wire::one(input), 3) > MAX_DIMS {
        return Err(invalid(format!(
            "input {i}: a shape has at most {MAX_DIMS} dimensions"
        )));
    }
    if count(Wire::one(input), 4) > MAX_PARAMETERS {
        return Err(invalid(format!(
            "input {i} has more than {MAX_PARAMETERS} parameters"
        )));
    }
    // `contents` is one message, but prost merges every occurrence of it into one: the BYTES
    // elements of all of them are what decoding holds.
    let mut bytes_elements = 0;
    let mut wire = Wire::one(input);
    while let Some((field, value)) = wire.next() {
        let (5, Field::Bytes(Some(contents))) = (field, value) else {
            continue;
        };
        let mut c = Wire::one(contents);
        while let Some((field, _)) = c.next() {
            // bool, int, int64, uint, uint64 and fp64 contents: no datatype this server takes.
            if matches!(field, 1..=5 | 7) {
                return Err(invalid(format!(
                    "input {i}: only bytes_contents (BYTES) and fp32_contents (FP32) are taken"
                )));
            }
        }
        bytes_elements += count(Wire::one(contents), 8);
        let n = bytes_elements;
        if n > limits.max_images {
            return Err(invalid(format!(
                "input {i} has {n} BYTES elements, over the limit of {} images per request",
                limits.max_images
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    const LIMITS: PrescanLimits = PrescanLimits {
        max_message_bytes: 1 << 20,
        max_images: 4,
    };

    fn classify(n: usize) -> Vec<u8> {
        crate::pb::ClassifyRequest {
            images: vec![crate::pb::Image::default(); n],
            model: "m".into(),
            ..Default::default()
        }
        .encode_to_vec()
    }

    #[test]
    fn images_after_a_group_are_counted() {
        // prost skips an undeclared group (wire types 3 and 4, a nested one included) and
        // decodes every image after it; the scan stopped at the group and counted none.
        let mut message = vec![9 << 3 | 3, 1 << 3, 7, 10 << 3 | 3, 10 << 3 | 4, 9 << 3 | 4];
        message.extend(classify(5));
        let decoded = crate::pb::ClassifyRequest::decode(&message[..]).unwrap();
        assert_eq!(decoded.images.len(), 5);
        let (a, b) = message.split_at(3);
        let err = scan(CLASSIFY, &[a, b], &LIMITS).unwrap().unwrap_err();
        assert!(err.message().contains("request has 5 images"), "{err:?}");
    }

    #[test]
    fn bytes_contents_sent_in_several_parts_are_counted_together() {
        // prost merges every occurrence of an input's `contents`: 3 + 3 BYTES elements are 6.
        let contents = crate::kserve_pb::InferTensorContents {
            bytes_contents: vec![b"x".to_vec(); 3],
            ..Default::default()
        }
        .encode_to_vec();
        let mut input = Vec::new();
        for _ in 0..2 {
            input.extend([5 << 3 | 2, contents.len() as u8]);
            input.extend(&contents);
        }
        let mut message = vec![5 << 3 | 2, input.len() as u8];
        message.extend(&input);
        let decoded = crate::kserve_pb::ModelInferRequest::decode(&message[..]).unwrap();
        let merged = decoded.inputs[0].contents.as_ref().unwrap();
        assert_eq!(merged.bytes_contents.len(), 6);
        let err = scan(MODEL_INFER, &[&message], &LIMITS)
            .unwrap()
            .unwrap_err();
        assert!(
            err.message().contains("input 0 has 6 BYTES elements"),
            "{err:?}"
        );
    }

    #[test]
    fn classify_counts_images_as_prost_would_decode_them() {
        assert!(classify_request(Wire::one(&classify(4)), &LIMITS).is_ok());
        // A series' instances are field 1 too.
        assert!(classify_series_request(Wire::one(&classify(4)), &LIMITS).is_ok());
        let err = classify_series_request(Wire::one(&classify(5)), &LIMITS).unwrap_err();
        assert_eq!(
            err.message(),
            "the series has 5 instances, over the limit of 4 per request"
        );
        let err = classify_request(Wire::one(&classify(5)), &LIMITS).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert_eq!(
            err.message(),
            "request has 5 images, over the limit of 4 per request"
        );
        // Malformed data is tonic's to report, as long as what came before it is within limits.
        let mut bad = classify(2);
        bad.push(0xFF);
        assert!(classify_request(Wire::one(&bad), &LIMITS).is_ok());
    }

    fn infer(f: impl FnOnce(&mut crate::kserve_pb::ModelInferRequest)) -> Vec<u8> {
        use crate::kserve_pb::model_infer_request::InferInputTensor;
        let mut r = crate::kserve_pb::ModelInferRequest {
            inputs: vec![InferInputTensor {
                name: "IMAGE".into(),
                datatype: "BYTES".into(),
                shape: vec![2, 1],
                contents: Some(crate::kserve_pb::InferTensorContents {
                    bytes_contents: vec![vec![1], vec![2]],
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        };
        f(&mut r);
        r.encode_to_vec()
    }

    #[test]
    fn model_infer_bounds_every_repeated_field() {
        assert!(model_infer_request(Wire::one(&infer(|_| {})), &LIMITS).is_ok());
        let cases: Vec<(&str, Vec<u8>)> = vec![
            (
                "BYTES elements, over the limit",
                infer(|r| r.inputs[0].contents.as_mut().unwrap().bytes_contents = vec![vec![]; 5]),
            ),
            (
                "at most 8 dimensions",
                infer(|r| r.inputs[0].shape = vec![1; 9]),
            ),
            (
                "only bytes_contents",
                infer(|r| r.inputs[0].contents.as_mut().unwrap().int64_contents = vec![1]),
            ),
            (
                "at most 16 inputs",
                infer(|r| r.inputs = vec![r.inputs[0].clone(); 17]),
            ),
            (
                "at most 16 inputs, outputs and raw",
                infer(|r| r.raw_input_contents = vec![vec![]; 17]),
            ),
            (
                "at most 64 parameters",
                infer(|r| {
                    for k in 0..65 {
                        r.parameters.insert(format!("p{k}"), Default::default());
                    }
                }),
            ),
        ];
        for (what, message) in cases {
            let err = model_infer_request(Wire::one(&message), &LIMITS).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{what}");
            let words = what.split(", ").next().unwrap();
            assert!(err.message().contains(words), "{what}: {}", err.message());
        }
        // An FP32 tensor of any size is fine (4 bytes on the wire, 4 in memory).
        let fp32 = infer(|r| {
            r.inputs[0].contents = Some(crate::kserve_pb::InferTensorContents {
                fp32_contents: vec![0.5; 10_000],
                ..Default::default()
            })
        });
        assert!(model_infer_request(Wire::one(&fp32), &LIMITS).is_ok());
    }

    /// The message a body (in these pieces) holds, if it is one uncompressed frame.
    fn message_of(pieces: &[&[u8]]) -> Option<Vec<u8>> {
        let mut wire = single_uncompressed_message(pieces)?;
        Some(std::iter::from_fn(|| wire.byte()).collect())
    }

    #[test]
    fn only_a_single_uncompressed_frame_is_scanned() {
        let frame = |flag: u8, message: &[u8]| {
            let mut b = vec![flag];
            b.extend((message.len() as u32).to_be_bytes());
            b.extend(message);
            b
        };
        assert_eq!(message_of(&[&frame(0, b"abc")]), Some(b"abc".to_vec()));
        // Split anywhere, the header included.
        let whole = frame(0, b"abc");
        for at in 0..=whole.len() {
            let (a, b) = whole.split_at(at);
            assert_eq!(message_of(&[a, b]), Some(b"abc".to_vec()), "split at {at}");
        }
        assert_eq!(message_of(&[&frame(1, b"abc")]), None);
        let mut two = frame(0, b"abc");
        two.extend(frame(0, b"d"));
        assert_eq!(message_of(&[&two]), None);
        assert_eq!(message_of(&[b"\0\0"]), None);
    }

    /// A `Classify` body is scanned in the pieces it arrived in: wherever they split it (inside
    /// a key, a length, or an image's bytes), the count is the one of the contiguous message.
    #[test]
    fn a_classify_body_in_pieces_is_scanned_as_if_whole() {
        for n in [3, 4, 5] {
            let mut message = crate::pb::ClassifyRequest {
                images: (0..n)
                    .map(|i| crate::pb::Image {
                        data: bytes::Bytes::from(vec![i as u8; 40 + i]),
                        ..Default::default()
                    })
                    .collect(),
                model: "m".into(),
                ..Default::default()
            }
            .encode_to_vec();
            let whole = classify_request(Wire::one(&message), &LIMITS).is_ok();
            assert_eq!(whole, n <= LIMITS.max_images);
            for a in 0..=message.len() {
                for b in (a..=message.len()).step_by(7) {
                    let pieces = [&message[..a], &message[a..b], &message[b..]];
                    assert_eq!(
                        classify_request(Wire::new(&pieces), &LIMITS).is_ok(),
                        whole,
                        "{n} images split at {a} and {b}"
                    );
                }
            }
            // Cut short, it counts what came before the cut, as in one piece.
            message.truncate(message.len() / 2);
            let (a, b) = message.split_at(message.len() / 3);
            assert_eq!(
                classify_request(Wire::new(&[a, b]), &LIMITS).is_ok(),
                classify_request(Wire::one(&message), &LIMITS).is_ok()
            );
        }
    }

    #[test]
    fn segment_bounds_slices_and_images_per_slice() {
        let slice = |images: usize| crate::pb::SegmentSlice {
            id: String::new(),
            images: vec![crate::pb::SequenceImage::default(); images],
        };
        let message = |slices: Vec<crate::pb::SegmentSlice>| {
            crate::pb::SegmentRequest {
                slices,
                ..Default::default()
            }
            .encode_to_vec()
        };
        let scan_of = |m: &[u8]| scan(SEGMENT, &[m], &LIMITS).expect("scanned");
        assert!(scan_of(&message(vec![slice(3); 4])).is_ok());
        assert!(scan_of(&message(vec![slice(MAX_SLICE_IMAGES); 1])).is_ok());
        let err = scan_of(&message(vec![slice(3); 5])).unwrap_err();
        assert!(
            err.message().contains("more than 4 slices"),
            "{}",
            err.message()
        );
        let err = scan_of(&message(vec![slice(1), slice(MAX_SLICE_IMAGES + 1)])).unwrap_err();
        assert!(
            err.message().contains("slice 1: 9 images"),
            "{}",
            err.message()
        );
    }
}
