//! The JPEG that dicom-rs's adapter would decode differently from pydicom and dcmtk:
//! - 12-bit JPEG Extended (Process 4) through libjpeg-turbo 3.1 (`turbojpeg-sys`, built from its
//!   bundled source), whose 12-bit DCT jpeg-decoder lacks;
//! - 8-bit RGB JPEG (Photometric Interpretation RGB) without a JFIF or Adobe marker, whose
//!   components are R, G and B: jpeg-decoder without a colour transform, where the adapter would
//!   assume YCbCr and convert (every pixel off, by up to 137).

use std::ffi::{CStr, c_int};

use dicom_core::value::Value;
use turbojpeg_sys as tj;

use dicom_dictionary_std::tags;
use dicom_object::DefaultDicomObject;

use super::{Header, invalid};
use crate::input::InputError;

/// Frees the decompressor however decoding ends.
struct Handle(tj::tjhandle);

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: a handle from tj3Init, destroyed once.
        unsafe { tj::tj3Destroy(self.0) }
    }
}

impl Handle {
    fn error(&self, what: &str) -> InputError {
        // SAFETY: tj3GetErrorStr returns a NUL-terminated string owned by the handle.
        let message = unsafe { CStr::from_ptr(tj::tj3GetErrorStr(self.0)) }
            .to_string_lossy()
            .into_owned();
        invalid(format!(
            "12-bit JPEG Extended pixel data could not be decoded ({what}): {message}"
        ))
    }
}

/// Each frame's JPEG codestream: all fragments of a single frame, or one fragment per frame.
fn codestreams(object: &DefaultDicomObject, header: &Header) -> Result<Vec<Vec<u8>>, InputError> {
    let element = object
        .get(tags::PIXEL_DATA)
        .ok_or_else(|| invalid("the instance has no Pixel Data (7FE0,0010)"))?;
    let Value::PixelSequence(sequence) = element.value() else {
        return Err(invalid("JPEG pixel data is not encapsulated in fragments"));
    };
    let fragments = sequence.fragments();
    let frames = header.frames as usize;
    if frames == 1 {
        Ok(vec![fragments.iter().flatten().copied().collect()])
    } else if fragments.len() == frames {
        Ok(fragments.iter().map(|f| f.to_vec()).collect())
    } else {
        Err(invalid(format!(
            "{} fragments for {frames} frames: only one fragment per frame is supported for \
             multi-frame JPEG decoded here",
            fragments.len()
        )))
    }
}

/// Whether a codestream says how its colour is encoded: a JFIF APP0 or an Adobe APP14 segment
/// before the first scan (component identifiers R, G, B say it too; jpeg-decoder honours those).
fn colour_marker(codestream: &[u8]) -> bool {
    // After SOI, the segments up to the first scan, each a marker and a 2-byte length.
    let mut at = 2;
    while let Some(&[0xFF, marker, hi, lo]) = codestream.get(at..at + 4) {
        let len = usize::from(u16::from_be_bytes([hi, lo]));
        let body = codestream.get(at + 4..at + 2 + len.max(2)).unwrap_or(&[]);
        match marker {
            0xE0 if body.starts_with(b"JFIF\0") => return true,
            0xEE if body.starts_with(b"Adobe") => return true,
            0xDA => return false,
            _ => at += 2 + len,
        }
    }
    false
}

/// 8-bit RGB JPEG without a colour marker, decoded with its components taken as R, G and B, as
/// pydicom (pylibjpeg) and dcmtk do; `None` when a codestream has a marker (dicom-rs's adapter,
/// which honours it, decodes those) or the frames are not one fragment each.
pub fn decode_untransformed_rgb(
    object: &DefaultDicomObject,
    header: &Header,
) -> Result<Option<Vec<u8>>, InputError> {
    let Ok(codestreams) = codestreams(object, header) else {
        return Ok(None);
    };
    if codestreams.iter().any(|c| colour_marker(c)) {
        return Ok(None);
    }
    let pixels = header.rows as usize * header.columns as usize;
    let mut out = Vec::with_capacity(header.frames as usize * pixels * 3);
    for codestream in &codestreams {
        let mut decoder = jpeg_decoder::Decoder::new(&codestream[..]);
        decoder.set_color_transform(jpeg_decoder::ColorTransform::RGB);
        // Third-party code fed hostile bytes: a panic is an error for this image.
        let decoded = super::unwind(|| decoder.decode().map(|d| (d, decoder.info())))
            .map_err(|()| invalid("the JPEG decoder failed on malformed pixel data"))?
            .map_err(|e| invalid(format!("RGB JPEG pixel data could not be decoded: {e}")))?;
        match decoded {
            (data, Some(info))
                if u32::from(info.width) == header.columns
                    && u32::from(info.height) == header.rows
                    && info.pixel_format == jpeg_decoder::PixelFormat::RGB24
                    && data.len() == pixels * 3 =>
            {
                out.extend_from_slice(&data);
            }
            (_, info) => {
                return Err(invalid(format!(
                    "the JPEG codestream ({info:?}) does not hold the {}×{} RGB image the header \
                     describes",
                    header.columns, header.rows
                )));
            }
        }
    }
    Ok(Some(out))
}

/// Every frame's 12-bit samples as 16-bit little-endian, frames concatenated.
pub fn decode_12_bit(object: &DefaultDicomObject, header: &Header) -> Result<Vec<u8>, InputError> {
    if header.samples_per_pixel != 1 {
        return Err(invalid(
            "12-bit JPEG Extended is supported for monochrome images only",
        ));
    }
    let codestreams = codestreams(object, header)?;
    let frames = codestreams.len();
    let mut out = Vec::with_capacity(frames * header.rows as usize * header.columns as usize * 2);
    for codestream in &codestreams {
        // SAFETY: tj3Init has no preconditions; a null handle is checked.
        let handle = Handle(unsafe { tj::tj3Init(tj::TJINIT_TJINIT_DECOMPRESS as c_int) });
        if handle.0.is_null() {
            return Err(invalid("the 12-bit JPEG decoder could not be initialised"));
        }
        // SAFETY: the pointer and length describe `codestream`, alive for the call.
        if unsafe {
            tj::tj3DecompressHeader(
                handle.0,
                codestream.as_ptr(),
                codestream.len() as tj::size_t,
            )
        } != 0
        {
            return Err(handle.error("header"));
        }
        // SAFETY: reading parameters of a handle that has read a header.
        let (width, height, precision) = unsafe {
            (
                tj::tj3Get(handle.0, tj::TJPARAM_TJPARAM_JPEGWIDTH as c_int),
                tj::tj3Get(handle.0, tj::TJPARAM_TJPARAM_JPEGHEIGHT as c_int),
                tj::tj3Get(handle.0, tj::TJPARAM_TJPARAM_PRECISION as c_int),
            )
        };
        if i64::from(width) != i64::from(header.columns)
            || i64::from(height) != i64::from(header.rows)
            || precision != 12
        {
            return Err(invalid(format!(
                "the JPEG codestream is {width}×{height} with {precision}-bit samples; the \
                 header says {}×{} with {} bits stored",
                header.columns, header.rows, header.bits_stored
            )));
        }
        let mut samples = vec![0i16; width as usize * height as usize];
        // SAFETY: `samples` holds width × height 12-bit gray samples (pitch 0: packed), the
        // size the header just reported; the codestream is alive for the call.
        if unsafe {
            tj::tj3Decompress12(
                handle.0,
                codestream.as_ptr(),
                codestream.len() as tj::size_t,
                samples.as_mut_ptr(),
                0,
                tj::TJPF_TJPF_GRAY as c_int,
            )
        } != 0
        {
            // Warnings (e.g. a truncated scan) count as errors: a damaged image is refused.
            return Err(handle.error("scan"));
        }
        out.extend(samples.iter().flat_map(|&v| (v as u16).to_le_bytes()));
    }
    Ok(out)
}
#[cfg(test)]
mod tests {
    use dicom_core::value::PixelFragmentSequence;
    use dicom_core::{DataElement, VR};

    use super::*;
    use crate::input::InputLimits;

    const LIMITS: InputLimits = InputLimits {
        max_image_bytes: 1 << 24,
        max_pixels: 1 << 22,
    };

    /// tests/data/dicom/ts_jpeg_extended.dcm (dcmtk's 12-bit Process 4 encoder) and its header.
    fn file() -> (DefaultDicomObject, Header) {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/dicom/ts_jpeg_extended.dcm"
        );
        let data = std::fs::read(path).unwrap();
        let object = crate::input::dicom::parse(&data, &LIMITS, None).unwrap();
        let header = crate::input::dicom::header::read(&object).unwrap();
        (object, header)
    }

    fn fragments(object: &DefaultDicomObject) -> Vec<Vec<u8>> {
        let Value::PixelSequence(sequence) = object.get(tags::PIXEL_DATA).unwrap().value() else {
            panic!("encapsulated")
        };
        sequence.fragments().to_vec()
    }

    fn with_fragments(object: &mut DefaultDicomObject, fragments: Vec<Vec<u8>>) {
        object.put(DataElement::new(
            tags::PIXEL_DATA,
            VR::OB,
            PixelFragmentSequence::new(vec![], fragments),
        ));
    }

    #[test]
    fn decodes_12_bit_samples_as_16_bit_little_endian() {
        let (object, header) = file();
        assert_eq!(header.bits_stored, 12);
        let out = decode_12_bit(&object, &header).unwrap();
        assert_eq!(
            out.len(),
            header.rows as usize * header.columns as usize * 2
        );
        let samples: Vec<u16> = out
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .collect();
        assert!(samples.iter().all(|&s| s < 4096));
        assert!(
            samples.iter().any(|&s| s > 255),
            "12-bit values, not 8-bit ones"
        );
    }

    #[test]
    fn a_frame_split_over_fragments_is_joined() {
        let (mut object, header) = file();
        let whole = decode_12_bit(&object, &header).unwrap();
        let codestream = fragments(&object).concat();
        let (a, b) = codestream.split_at((codestream.len() / 2) & !1);
        with_fragments(&mut object, vec![a.to_vec(), b.to_vec()]);
        assert_eq!(decode_12_bit(&object, &header).unwrap(), whole);
    }

    #[test]
    fn refuses_what_it_cannot_decode() {
        let (object, header) = file();
        let colour = Header {
            samples_per_pixel: 3,
            ..header.clone()
        };
        let err = decode_12_bit(&object, &colour).unwrap_err().to_string();
        assert!(err.contains("monochrome images only"), "{err}");
        // Two frames need two fragments.
        let two = Header {
            frames: 2,
            ..header.clone()
        };
        let (mut split, _) = file();
        let codestream = fragments(&split).concat();
        with_fragments(&mut split, vec![codestream.clone(), vec![0; 2], vec![0; 2]]);
        let err = decode_12_bit(&split, &two).unwrap_err().to_string();
        assert!(err.contains("3 fragments for 2 frames"), "{err}");
        // A header that disagrees with the codestream.
        let wider = Header {
            columns: header.columns + 1,
            ..header.clone()
        };
        let err = decode_12_bit(&object, &wider).unwrap_err().to_string();
        assert!(err.contains("the header says"), "{err}");
        // Not a JPEG codestream.
        let (mut junk, _) = file();
        with_fragments(&mut junk, vec![vec![0x55; 64]]);
        let err = decode_12_bit(&junk, &header).unwrap_err().to_string();
        assert!(
            err.contains("12-bit JPEG Extended pixel data could not be decoded (header)"),
            "{err}"
        );
        // Native pixel data.
        let (mut native, _) = file();
        native.put(DataElement::new(
            tags::PIXEL_DATA,
            VR::OW,
            dicom_core::PrimitiveValue::from(vec![0u8; 8]),
        ));
        let err = decode_12_bit(&native, &header).unwrap_err().to_string();
        assert!(err.contains("not encapsulated in fragments"), "{err}");
    }

    #[test]
    fn colour_markers_are_found_before_the_first_scan() {
        let segment = |marker: u8, body: &[u8]| {
            let mut out = vec![0xFF, marker];
            out.extend_from_slice(&((body.len() + 2) as u16).to_be_bytes());
            out.extend_from_slice(body);
            out
        };
        let soi = vec![0xFF, 0xD8];
        let sof = segment(
            0xC0,
            &[8, 0, 1, 0, 1, 3, 0, 0x11, 0, 1, 0x11, 0, 2, 0x11, 0],
        );
        let sos = segment(0xDA, &[3, 0, 0, 1, 0, 2, 0, 0, 63, 0]);
        let stream =
            |extra: &[u8]| [soi.clone(), extra.to_vec(), sof.clone(), sos.clone()].concat();
        assert!(!colour_marker(&stream(&[])));
        assert!(colour_marker(&stream(&segment(0xE0, b"JFIF\0\x01\x02"))));
        assert!(colour_marker(&stream(&segment(
            0xEE,
            b"Adobe\0\x64\0\0\0\0\0"
        ))));
        // Another APP segment, or a marker after the scan, does not count.
        assert!(!colour_marker(&stream(&segment(0xE1, b"Exif\0\0"))));
        let late = [stream(&[]), segment(0xEE, b"Adobe")].concat();
        assert!(!colour_marker(&late));
        // Cut or garbage data: no marker, no panic.
        assert!(!colour_marker(&[0xFF, 0xD8, 0xFF, 0xE0, 0xFF]));
        assert!(!colour_marker(&[]));
    }
}
