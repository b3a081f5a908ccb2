//! Bounds what decoding a request message may allocate, before tonic decodes it.
//!
//! Protobuf decoding amplifies: an empty `Image` is 2 bytes on the wire and ~70 bytes decoded, so
//! one 64 MiB `Classify` of empty images would make prost allocate gigabytes (measured: 4.3 GB of
//! resident memory and 20 s of CPU) before the image limit is ever checked. This layer reads the
//! (already size-limited) message of the two unary calls that carry repeated data, `Classify` and
//! `ModelInfer`, walks its wire format without allocating, and refuses it `INVALID_ARGUMENT` when a
//! repeated field holds more elements than the request may have: images over
//! `--max-images-per-request`, tensors, dimensions and parameters over small fixed caps. Anything
//! it does not understand (compression, several frames, malformed protobuf) goes on to tonic
//! unchanged, which answers it as before. Streaming calls carry one image per message and are not
//! touched.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use tonic::codegen::http::{Request, Response};
use tower::{Layer, Service};

/// Most inputs, outputs or raw contents in one `ModelInfer` (the server takes one input and has
/// two outputs; the cap only has to keep decoding bounded).
pub const MAX_TENSORS: usize = 16;
/// Most dimensions of a tensor shape.
pub const MAX_DIMS: usize = 8;
/// Most entries of one parameters map.
pub const MAX_PARAMETERS: usize = 64;

const CLASSIFY: &str = "/brainai.v1.TumorClassifier/Classify";
const MODEL_INFER: &str = "/inference.GRPCInferenceService/ModelInfer";

/// The limits the scan enforces.
#[derive(Debug, Clone, Copy)]
pub struct PrescanLayer {
    pub max_message_bytes: usize,
    pub max_images: usize,
}

impl<S> Layer<S> for PrescanLayer {
    type Service = Prescan<S>;
    fn layer(&self, inner: S) -> Prescan<S> {
        Prescan {
            inner,
            limits: *self,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Prescan<S> {
    inner: S,
    limits: PrescanLayer,
}

type Scan = fn(&[u8], &PrescanLayer) -> Result<(), tonic::Status>;

impl<S, ResBody> Service<Request<Incoming>> for Prescan<S>
where
    S: Service<Request<tonic::body::Body>, Response = Response<ResBody>> + Clone + Send + 'static,
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

    fn call(&mut self, request: Request<Incoming>) -> Self::Future {
        let scan: Scan = match request.uri().path() {
            CLASSIFY => classify_request,
            MODEL_INFER => model_infer_request,
            _ => return Box::pin(self.inner.call(request.map(tonic::body::Body::new))),
        };
        // The ready service goes with this call; the clone waits for the next poll_ready.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let limits = self.limits;
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            // One gRPC frame: 5 bytes of header, then the message.
            let bytes = match Limited::new(body, limits.max_message_bytes + 5)
                .collect()
                .await
            {
                Ok(collected) => collected.to_bytes(),
                Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                    return Ok(tonic::Status::resource_exhausted(format!(
                        "message length too large: over the limit of {} bytes",
                        limits.max_message_bytes
                    ))
                    .into_http());
                }
                Err(e) => {
                    return Ok(tonic::Status::cancelled(format!(
                        "the request could not be read: {e}"
                    ))
                    .into_http());
                }
            };
            if let Some(message) = single_uncompressed_message(&bytes)
                && let Err(status) = scan(message, &limits)
            {
                return Ok(status.into_http());
            }
            let body = tonic::body::Body::new(Full::new(bytes).map_err(|never| match never {}));
            inner.call(Request::from_parts(parts, body)).await
        })
    }
}

/// The message of a body holding exactly one uncompressed gRPC frame.
fn single_uncompressed_message(body: &Bytes) -> Option<&[u8]> {
    let (&[flag, a, b, c, d], message) = body.split_first_chunk::<5>()?;
    (flag == 0 && u32::from_be_bytes([a, b, c, d]) as usize == message.len()).then_some(message)
}

/// One field of the protobuf wire format.
enum Field<'a> {
    Varint,
    Fixed,
    Bytes(&'a [u8]),
}

/// A non-allocating reader of protobuf fields; `None` at the end or on malformed data (which
/// tonic then reports).
struct Wire<'a>(&'a [u8]);

impl<'a> Wire<'a> {
    fn varint(&mut self) -> Option<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = self.0.split_first()?;
            self.0 = rest;
            value |= u64::from(byte & 0x7F) << shift;
            if byte & 0x80 == 0 {
                return Some(value);
            }
        }
        None
    }

    fn skip(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (taken, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(taken)
    }

    fn next(&mut self) -> Option<(u64, Field<'a>)> {
        if self.0.is_empty() {
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
            _ => return None,
        };
        Some((key >> 3, field))
    }
}

/// Counts of the fields of a message that the caller asks about.
fn count(message: &[u8], number: u64) -> usize {
    let mut wire = Wire(message);
    let mut n = 0;
    while let Some((field, _)) = wire.next() {
        n += usize::from(field == number);
    }
    n
}

/// Elements of a repeated scalar field: packed (one length-delimited field of varints) or not.
fn scalars(message: &[u8], number: u64) -> usize {
    let mut wire = Wire(message);
    let mut n = 0;
    while let Some((field, value)) = wire.next() {
        if field != number {
            continue;
        }
        n += match value {
            Field::Bytes(packed) => {
                let mut inner = Wire(packed);
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
fn classify_request(message: &[u8], limits: &PrescanLayer) -> Result<(), tonic::Status> {
    let n = count(message, 1);
    if n > limits.max_images {
        return Err(invalid(format!(
            "request has {n} images, over the limit of {} per request",
            limits.max_images
        )));
    }
    Ok(())
}

/// `ModelInferRequest`: parameters (4), inputs (5: shape 3, parameters 4, contents 5), outputs
/// (6: parameters 2), raw_input_contents (7).
fn model_infer_request(message: &[u8], limits: &PrescanLayer) -> Result<(), tonic::Status> {
    let mut wire = Wire(message);
    let (mut inputs, mut outputs, mut raw, mut parameters) = (0, 0, 0, 0);
    while let Some((field, value)) = wire.next() {
        let Field::Bytes(inner) = value else { continue };
        match field {
            4 => parameters += 1,
            5 => {
                check_input(inputs, inner, limits)?;
                inputs += 1;
            }
            6 => {
                outputs += 1;
                if count(inner, 2) > MAX_PARAMETERS {
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

fn check_input(i: usize, input: &[u8], limits: &PrescanLayer) -> Result<(), tonic::Status> {
    if scalars(input, 3) > MAX_DIMS {
        return Err(invalid(format!(
            "input {i}: a shape has at most {MAX_DIMS} dimensions"
        )));
    }
    if count(input, 4) > MAX_PARAMETERS {
        return Err(invalid(format!(
            "input {i} has more than {MAX_PARAMETERS} parameters"
        )));
    }
    let mut wire = Wire(input);
    while let Some((field, value)) = wire.next() {
        let (5, Field::Bytes(contents)) = (field, value) else {
            continue;
        };
        let mut c = Wire(contents);
        while let Some((field, _)) = c.next() {
            // bool, int, int64, uint, uint64 and fp64 contents: no datatype this server takes.
            if matches!(field, 1..=5 | 7) {
                return Err(invalid(format!(
                    "input {i}: only bytes_contents (BYTES) and fp32_contents (FP32) are taken"
                )));
            }
        }
        let n = count(contents, 8);
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

    const LIMITS: PrescanLayer = PrescanLayer {
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
    fn classify_counts_images_as_prost_would_decode_them() {
        assert!(classify_request(&classify(4), &LIMITS).is_ok());
        let err = classify_request(&classify(5), &LIMITS).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert_eq!(
            err.message(),
            "request has 5 images, over the limit of 4 per request"
        );
        // Malformed data is tonic's to report, as long as what came before it is within limits.
        let mut bad = classify(2);
        bad.push(0xFF);
        assert!(classify_request(&bad, &LIMITS).is_ok());
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
        assert!(model_infer_request(&infer(|_| {}), &LIMITS).is_ok());
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
            let err = model_infer_request(&message, &LIMITS).unwrap_err();
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
        assert!(model_infer_request(&fp32, &LIMITS).is_ok());
    }

    #[test]
    fn only_a_single_uncompressed_frame_is_scanned() {
        let frame = |flag: u8, message: &[u8]| {
            let mut b = vec![flag];
            b.extend((message.len() as u32).to_be_bytes());
            b.extend(message);
            Bytes::from(b)
        };
        assert_eq!(
            single_uncompressed_message(&frame(0, b"abc")),
            Some(&b"abc"[..])
        );
        assert_eq!(single_uncompressed_message(&frame(1, b"abc")), None);
        let mut two = frame(0, b"abc").to_vec();
        two.extend(frame(0, b"d"));
        assert_eq!(single_uncompressed_message(&Bytes::from(two)), None);
        assert_eq!(
            single_uncompressed_message(&Bytes::from_static(b"\0\0")),
            None
        );
    }
}
