//! 12-bit JPEG Extended (Process 4) through libjpeg-turbo 3.1 (`turbojpeg-sys`, built from its
//! bundled source), whose 12-bit DCT jpeg-decoder lacks.

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

/// Every frame's samples as 16-bit little-endian, frames concatenated.
pub fn decode(object: &DefaultDicomObject, header: &Header) -> Result<Vec<u8>, InputError> {
    if header.samples_per_pixel != 1 {
        return Err(invalid(
            "12-bit JPEG Extended is supported for monochrome images only",
        ));
    }
    let element = object
        .get(tags::PIXEL_DATA)
        .ok_or_else(|| invalid("the instance has no Pixel Data (7FE0,0010)"))?;
    let Value::PixelSequence(sequence) = element.value() else {
        return Err(invalid(
            "JPEG Extended pixel data is not encapsulated in fragments",
        ));
    };
    let fragments = sequence.fragments();
    let frames = header.frames as usize;
    let codestreams: Vec<Vec<u8>> = if frames == 1 {
        vec![fragments.iter().flatten().copied().collect()]
    } else if fragments.len() == frames {
        fragments.iter().map(|f| f.to_vec()).collect()
    } else {
        return Err(invalid(format!(
            "{} fragments for {frames} frames: only one fragment per frame is supported for \
             multi-frame 12-bit JPEG",
            fragments.len()
        )));
    };
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
