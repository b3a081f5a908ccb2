//! The structural pre-scan: every element header of the file is walked, without allocating, before
//! the parser sees it. It reads each header exactly as dicom-rs will (the meta group up to its
//! group length, an unknown VR as UN with a 4-byte length, group FFFE without a VR, Pixel Data
//! declared SQ as a sequence): a length read differently is a length never checked, which dicom-rs
//! then allocates (issue 22: 1.8 GB for an 8 KB file whose VR was mutated).

use std::io::Read;

use dicom_core::dictionary::{DataDictionary, VirtualVr};
use dicom_core::{Tag, VR};
use dicom_dictionary_std::StandardDataDictionary;

use super::{DEFLATED, EXPLICIT_BE, IMPLICIT_LE, SUPPORTED_TRANSFER_SYNTAXES, invalid, ts_name};
use crate::input::{InputError, InputLimits};

/// Deepest nesting of sequences accepted. Enhanced MR functional groups nest 3–4 levels.
pub const MAX_DEPTH: usize = 32;

/// Structural checks before parsing; returns the file from `DICM` on. Walks every element header
/// (of the inflated data set, for the deflated transfer syntax) and refuses lengths past the end,
/// undefined lengths where none may be, nesting deeper than [`MAX_DEPTH`] and transfer syntaxes
/// this build cannot decode.
pub fn prescan<'a>(data: &'a [u8], limits: &InputLimits) -> Result<&'a [u8], InputError> {
    scan(data, limits).map(|scan| scan.body)
}

/// What the pre-scan learned on its way.
pub(super) struct Scan<'a> {
    /// The file from `DICM` on.
    pub body: &'a [u8],
    /// The pixel data element of the data set (not of an item): (7FE0,0010), or else Float
    /// (7FE0,0008) or Double Float (7FE0,0009) Pixel Data; `None` for an instance that is no image
    /// (a structured report, a waveform, an RT plan).
    pub pixel_data: Option<(u16, u16)>,
}

/// [`prescan`], with what it learned.
pub(super) fn scan<'a>(data: &'a [u8], limits: &InputLimits) -> Result<Scan<'a>, InputError> {
    let body = if data.get(128..132) == Some(b"DICM") {
        &data[128..]
    } else if data.starts_with(b"DICM") {
        data
    } else {
        return Err(InputError::UnknownFormat(
            "no DICM marker at byte 128 (or 0): not a DICOM Part 10 file".into(),
        ));
    };
    let (transfer_syntax, dataset_start) = meta(body)?;
    if !SUPPORTED_TRANSFER_SYNTAXES
        .iter()
        .any(|(uid, _)| *uid == transfer_syntax)
    {
        return Err(invalid(format!(
            "transfer syntax {} is not supported; supported: {}",
            ts_name(&transfer_syntax),
            SUPPORTED_TRANSFER_SYNTAXES
                .iter()
                .map(|(_, name)| *name)
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let rest = &body[dataset_start..];
    let inflated;
    let dataset = if transfer_syntax == DEFLATED {
        // The inflated data set may be no larger than an uncompressed file could be.
        let limit = limits.max_image_bytes as u64;
        let mut out = Vec::new();
        flate2::read::DeflateDecoder::new(rest)
            .take(limit + 1)
            .read_to_end(&mut out)
            .map_err(|e| invalid(format!("the deflated data set is corrupt: {e}")))?;
        if out.len() as u64 > limit {
            return Err(invalid(format!(
                "the deflated data set inflates to more than {limit} bytes, the limit for one \
                 image"
            )));
        }
        inflated = out;
        &inflated[..]
    } else {
        rest
    };
    let mut walker = Walker {
        data: dataset,
        pos: 0,
        explicit: transfer_syntax != IMPLICIT_LE,
        big_endian: transfer_syntax == EXPLICIT_BE,
        pixel_data: None,
    };
    match walker.dataset(dataset.len(), 0)? {
        Stop::End => Ok(Scan {
            body,
            pixel_data: walker.pixel_data,
        }),
        Stop::ItemEnd | Stop::SequenceEnd => Err(invalid(format!(
            "unexpected delimiter at byte {} of the data set",
            walker.pos
        ))),
    }
}

/// The File Meta Information (always explicit VR little endian), read as dicom-object reads it:
/// the group length (0002,0000) first, then whole elements until that many bytes are read, whatever
/// their group. Returns the transfer syntax UID and where the data set starts, relative to `DICM`.
/// (Walking on while the group is 0002 instead would start the data set elsewhere than the parser
/// does, and leave what it reads there unchecked.)
fn meta(body: &[u8]) -> Result<(String, usize), InputError> {
    let mut walker = Walker {
        data: body,
        pos: 4,
        explicit: true,
        big_endian: false,
        pixel_data: None,
    };
    let cut = |_| invalid("the file meta information is cut short");
    let (tag, _, len) = walker.explicit_header().map_err(cut)?;
    if tag != (0x0002, 0x0000) || len != 4 {
        return Err(invalid(format!(
            "the file meta information starts with ({:04X},{:04X}) of {len} bytes, not its group \
             length (0002,0000) of 4 bytes",
            tag.0, tag.1
        )));
    }
    let group_length = u32::from_le_bytes(walker.bytes::<4>().map_err(cut)?);
    let mut read = 0u32;
    let mut transfer_syntax = None;
    while read < group_length {
        let start = walker.pos;
        let (tag, _, len) = walker.explicit_header().map_err(cut)?;
        let value = (len != UNDEFINED)
            .then(|| body.get(walker.pos..walker.pos.saturating_add(len as usize)))
            .flatten()
            .ok_or_else(|| {
                invalid(format!(
                    "file meta element ({:04X},{:04X}) declares {len} bytes past the end of the \
                     file",
                    tag.0, tag.1
                ))
            })?;
        if tag == (0x0002, 0x0010) {
            transfer_syntax = Some(
                String::from_utf8_lossy(value)
                    .trim_matches(['\0', ' '])
                    .to_string(),
            );
        }
        walker.pos += len as usize;
        read = read.saturating_add((walker.pos - start) as u32);
    }
    let transfer_syntax = transfer_syntax
        .ok_or_else(|| invalid("the file meta information has no Transfer Syntax UID"))?;
    Ok((transfer_syntax, walker.pos))
}

/// Whether dicom-rs reads a 2-byte length after this explicit VR (PS3.5 7.1.2); every other VR,
/// including one it does not know (read as UN), has 2 reserved bytes and a 4-byte length.
/// The size of one value of a binary VR (1 for text and bytes, or an unknown VR).
pub fn value_unit(vr: Option<VR>) -> usize {
    match vr {
        Some(VR::US | VR::SS | VR::OW) => 2,
        Some(VR::UL | VR::SL | VR::AT | VR::FL | VR::OL | VR::OF) => 4,
        Some(VR::FD | VR::SV | VR::UV | VR::OD | VR::OV) => 8,
        _ => 1,
    }
}

fn short_length(vr: VR) -> bool {
    matches!(
        vr,
        VR::AE
            | VR::AS
            | VR::AT
            | VR::CS
            | VR::DA
            | VR::DS
            | VR::DT
            | VR::FL
            | VR::FD
            | VR::IS
            | VR::LO
            | VR::LT
            | VR::PN
            | VR::SH
            | VR::SL
            | VR::SS
            | VR::ST
            | VR::TM
            | VR::UI
            | VR::UL
            | VR::US
    )
}

const UNDEFINED: u32 = 0xFFFF_FFFF;
const ITEM: (u16, u16) = (0xFFFE, 0xE000);
const ITEM_END: (u16, u16) = (0xFFFE, 0xE00D);
const SEQUENCE_END: (u16, u16) = (0xFFFE, 0xE0DD);

/// An element header: tag, VR (none in implicit VR, and for group FFFE) and length.
type ElementHeader = ((u16, u16), Option<VR>, u32);

/// What ended a walk over elements.
enum Stop {
    End,
    ItemEnd,
    SequenceEnd,
}

/// A walk over element headers that checks lengths and nesting without allocating.
struct Walker<'a> {
    data: &'a [u8],
    pos: usize,
    explicit: bool,
    big_endian: bool,
    /// The data set's pixel data element, once seen.
    pixel_data: Option<(u16, u16)>,
}

impl Walker<'_> {
    fn bytes<const N: usize>(&mut self) -> Result<[u8; N], InputError> {
        let b = self
            .data
            .get(self.pos..self.pos + N)
            .ok_or_else(|| invalid(format!("the data set is cut short at byte {}", self.pos)))?;
        self.pos += N;
        Ok(b.try_into().expect("N bytes"))
    }

    fn u16(&mut self) -> Result<u16, InputError> {
        let b = self.bytes::<2>()?;
        Ok(if self.big_endian {
            u16::from_be_bytes(b)
        } else {
            u16::from_le_bytes(b)
        })
    }

    fn u32(&mut self) -> Result<u32, InputError> {
        let b = self.bytes::<4>()?;
        Ok(if self.big_endian {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        })
    }

    /// Skips `len` bytes, which must end by `end`.
    fn skip(&mut self, len: u32, end: usize, tag: (u16, u16)) -> Result<(), InputError> {
        let remaining = end.saturating_sub(self.pos);
        if len as usize > remaining {
            return Err(invalid(format!(
                "element ({:04X},{:04X}) declares {len} bytes, but only {remaining} remain",
                tag.0, tag.1
            )));
        }
        self.pos += len as usize;
        Ok(())
    }

    /// An element's tag, VR and length, read as dicom-rs's explicit VR decoders read them: a VR it
    /// does not know is UN (a 4-byte length), and elements of group FFFE have no VR.
    fn explicit_header(&mut self) -> Result<ElementHeader, InputError> {
        let tag = (self.u16()?, self.u16()?);
        if tag.0 == 0xFFFE {
            return Ok((tag, None, self.u32()?));
        }
        let vr = VR::from_binary(self.bytes::<2>()?).unwrap_or(VR::UN);
        let len = if short_length(vr) {
            u32::from(self.u16()?)
        } else {
            self.bytes::<2>()?;
            self.u32()?
        };
        Ok((tag, Some(vr), len))
    }

    /// Elements until `end`, or until an item or sequence delimiter. What is a sequence, and what
    /// encapsulated pixel data, is decided as dicom-rs's data set reader decides it.
    fn dataset(&mut self, end: usize, depth: usize) -> Result<Stop, InputError> {
        while self.pos < end {
            let (tag, vr, len) = if self.explicit {
                self.explicit_header()?
            } else {
                ((self.u16()?, self.u16()?), None, self.u32()?)
            };
            match tag {
                ITEM_END => return Ok(Stop::ItemEnd),
                SEQUENCE_END => return Ok(Stop::SequenceEnd),
                ITEM => {
                    return Err(invalid(format!(
                        "an item outside a sequence at byte {}",
                        self.pos - 8
                    )));
                }
                _ => {}
            }
            if depth == 0 && matches!(tag, (0x7FE0, 0x0008 | 0x0009 | 0x0010)) {
                // (7FE0,0010) wins over the float forms, whatever the order.
                self.pixel_data = self.pixel_data.max(Some(tag));
            }
            let declared_sequence = match vr {
                Some(vr) => vr == VR::SQ,
                // Implicit VR: the dictionary's.
                None if !self.explicit => StandardDataDictionary
                    .by_tag(Tag(tag.0, tag.1))
                    .is_some_and(|entry| matches!(entry.vr, VirtualVr::Exact(VR::SQ))),
                // Group FFFE in explicit VR.
                None => false,
            };
            if declared_sequence {
                self.sequence(len, end, depth + 1, tag)?;
            } else if len != UNDEFINED {
                // dicom-rs reads a binary value of a length that is no whole number of values
                // short, and the next header from inside it: a length this walk never saw.
                let unit = value_unit(vr.or_else(|| {
                    (!self.explicit)
                        .then(|| StandardDataDictionary.by_tag(Tag(tag.0, tag.1)))
                        .flatten()
                        .map(|entry| entry.vr.relaxed())
                }));
                if !(len as usize).is_multiple_of(unit) {
                    return Err(invalid(format!(
                        "element ({:04X},{:04X}) declares {len} bytes, not a whole number of its \
                         {unit}-byte values",
                        tag.0, tag.1
                    )));
                }
                self.skip(len, end, tag)?;
            } else if tag == (0x7FE0, 0x0010) {
                self.fragments(end)?;
            } else if vr == Some(VR::UN) || !self.explicit {
                // dicom-rs reads any other element of undefined length as a sequence; UN (and
                // implicit VR) may be one in a valid file.
                self.sequence(len, end, depth + 1, tag)?;
            } else {
                return Err(invalid(format!(
                    "element ({:04X},{:04X}) has an undefined length but is not a sequence",
                    tag.0, tag.1
                )));
            }
        }
        Ok(Stop::End)
    }

    /// The items of a sequence of `len` bytes (or undefined length).
    fn sequence(
        &mut self,
        len: u32,
        end: usize,
        depth: usize,
        tag: (u16, u16),
    ) -> Result<(), InputError> {
        if depth > MAX_DEPTH {
            return Err(invalid(format!(
                "sequences are nested more than {MAX_DEPTH} levels deep"
            )));
        }
        let seq_end = if len == UNDEFINED {
            end
        } else {
            let start = self.pos;
            self.skip(len, end, tag)?;
            self.pos = start;
            start + len as usize
        };
        while self.pos < seq_end {
            let item = (self.u16()?, self.u16()?);
            let item_len = self.u32()?;
            if item == SEQUENCE_END {
                if len == UNDEFINED {
                    return Ok(());
                }
                return Err(invalid(
                    "a sequence delimiter in a sequence of defined length",
                ));
            }
            if item != ITEM {
                return Err(invalid(format!(
                    "sequence ({:04X},{:04X}) holds ({:04X},{:04X}) where an item belongs",
                    tag.0, tag.1, item.0, item.1
                )));
            }
            let stop = if item_len == UNDEFINED {
                self.dataset(seq_end, depth)?
            } else {
                let start = self.pos;
                self.skip(item_len, seq_end, tag)?;
                self.pos = start;
                self.dataset(start + item_len as usize, depth)?
            };
            match (stop, item_len == UNDEFINED) {
                (Stop::ItemEnd, true) | (Stop::End, false) => {}
                _ => return Err(invalid("an item ends in the wrong place")),
            }
        }
        if len == UNDEFINED {
            return Err(invalid(format!(
                "sequence ({:04X},{:04X}) has no end",
                tag.0, tag.1
            )));
        }
        Ok(())
    }

    /// Encapsulated pixel data: items of defined length up to the sequence delimiter.
    fn fragments(&mut self, end: usize) -> Result<(), InputError> {
        loop {
            let tag = (self.u16()?, self.u16()?);
            let len = self.u32()?;
            if tag == SEQUENCE_END {
                return Ok(());
            }
            if tag != ITEM || len == UNDEFINED {
                return Err(invalid(
                    "encapsulated pixel data holds something other than fragments",
                ));
            }
            self.skip(len, end, (0x7FE0, 0x0010))?;
        }
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: InputLimits = InputLimits {
        max_image_bytes: 1 << 20,
        max_pixels: 1 << 20,
    };
    const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";

    /// An explicit VR element in little endian (a long header for the VRs that have one).
    fn el(tag: (u16, u16), vr: &[u8; 2], value: &[u8]) -> Vec<u8> {
        el_len(tag, vr, value.len() as u32, value)
    }

    /// An explicit VR little-endian element whose declared length is `len`.
    fn el_len(tag: (u16, u16), vr: &[u8; 2], len: u32, value: &[u8]) -> Vec<u8> {
        let mut out = [tag.0.to_le_bytes(), tag.1.to_le_bytes()].concat();
        out.extend_from_slice(vr);
        if !short_length(VR::from_binary(*vr).unwrap_or(VR::UN)) {
            out.extend_from_slice(&[0, 0]);
            out.extend_from_slice(&len.to_le_bytes());
        } else {
            out.extend_from_slice(&(len as u16).to_le_bytes());
        }
        out.extend_from_slice(value);
        out
    }

    /// An implicit VR little-endian element (also an item or delimiter header).
    fn implicit(tag: (u16, u16), len: u32, value: &[u8]) -> Vec<u8> {
        let mut out = [tag.0.to_le_bytes(), tag.1.to_le_bytes()].concat();
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(value);
        out
    }

    fn uid(value: &str) -> Vec<u8> {
        let mut v = value.as_bytes().to_vec();
        if v.len() % 2 == 1 {
            v.push(0);
        }
        v
    }

    /// `DICM`, a meta group with its group length and the transfer syntax, then `dataset`.
    fn file(ts: &str, dataset: &[u8]) -> Vec<u8> {
        let group = el((0x0002, 0x0010), b"UI", &uid(ts));
        let mut out = b"DICM".to_vec();
        out.extend(el(
            (0x0002, 0x0000),
            b"UL",
            &(group.len() as u32).to_le_bytes(),
        ));
        out.extend(group);
        out.extend_from_slice(dataset);
        out
    }

    /// The same with the 128-byte preamble.
    fn preambled(ts: &str, dataset: &[u8]) -> Vec<u8> {
        [vec![0; 128], file(ts, dataset)].concat()
    }

    fn refusal(data: &[u8]) -> String {
        prescan(data, &LIMITS).unwrap_err().to_string()
    }

    fn patient_name() -> Vec<u8> {
        el((0x0010, 0x0010), b"PN", b"Doe^Jane")
    }

    #[test]
    fn accepts_the_file_from_dicm_on_with_or_without_the_preamble() {
        let data = preambled(EXPLICIT_LE, &patient_name());
        assert_eq!(prescan(&data, &LIMITS).unwrap(), &data[128..]);
        let data = file(EXPLICIT_LE, &patient_name());
        assert_eq!(prescan(&data, &LIMITS).unwrap(), &data[..]);
    }

    #[test]
    fn refuses_a_binary_value_that_is_no_whole_number_of_values() {
        // FD of 15 bytes: dicom-rs would read the next header from inside the value, where a
        // forged header could declare gigabytes this walk never saw.
        let mut dataset = el((0x0018, 0x9087), b"FD", &[0u8; 15]);
        dataset.extend(patient_name());
        let err = refusal(&file(EXPLICIT_LE, &dataset));
        assert!(
            err.contains("(0018,9087) declares 15 bytes, not a whole number of its 8-byte values"),
            "{err}"
        );
        // Implicit VR: the dictionary's VR (Rows, US).
        let dataset = implicit((0x0028, 0x0010), 3, &[1, 0, 0]);
        let err = refusal(&file("1.2.840.10008.1.2", &dataset));
        assert!(
            err.contains("not a whole number of its 2-byte values"),
            "{err}"
        );
        // Whole values pass.
        let dataset = el((0x0018, 0x9087), b"FD", &[0u8; 16]);
        assert!(prescan(&file(EXPLICIT_LE, &dataset), &LIMITS).is_ok());
    }

    #[test]
    fn refuses_data_without_the_dicm_marker() {
        let err = prescan(b"\x89PNG\r\n\x1a\n", &LIMITS).unwrap_err();
        assert!(matches!(err, InputError::UnknownFormat(_)), "{err}");
        assert!(err.to_string().contains("no DICM marker"), "{err}");
    }

    #[test]
    fn refuses_a_meta_group_cut_short_or_past_the_end() {
        let whole = file(EXPLICIT_LE, &[]);
        // A long-length VR whose length field is cut off.
        let mut cut = b"DICM".to_vec();
        cut.extend_from_slice(&[0x02, 0x00, 0x01, 0x00, b'O', b'B', 0, 0, 2]);
        assert!(refusal(&cut).contains("file meta information is cut short"));
        // The transfer syntax's value cut off.
        let err = refusal(&whole[..whole.len() - 4]);
        assert!(
            err.contains("file meta element (0002,0010) declares 20 bytes past the end"),
            "{err}"
        );
    }

    #[test]
    fn refuses_a_meta_group_without_a_transfer_syntax() {
        let mut data = b"DICM".to_vec();
        data.extend(el((0x0002, 0x0000), b"UL", &0u32.to_le_bytes()));
        data.extend(patient_name());
        assert!(refusal(&data).contains("has no Transfer Syntax UID"));
    }

    #[test]
    fn refuses_transfer_syntaxes_this_build_cannot_decode_by_name() {
        let err = refusal(&file("1.2.840.10008.1.2.4.100", &patient_name()));
        assert!(
            err.contains(
                "transfer syntax MPEG2 Main Profile, 1.2.840.10008.1.2.4.100 is not supported"
            ),
            "{err}"
        );
        assert!(
            err.contains("supported: Implicit VR Little Endian"),
            "{err}"
        );
        let err = refusal(&file("1.2.3.4", &patient_name()));
        assert!(
            err.contains("transfer syntax 1.2.3.4 is not supported"),
            "{err}"
        );
    }

    #[test]
    fn walks_every_supported_encoding() {
        // Implicit VR: sequences known from the dictionary, of defined and undefined length.
        let item = implicit((0x0008, 0x1150), 4, b"1.2\0");
        let defined = [implicit(ITEM, item.len() as u32, &[]), item.clone()].concat();
        let undefined = [
            implicit(ITEM, UNDEFINED, &[]),
            item.clone(),
            implicit(ITEM_END, 0, &[]),
            implicit(SEQUENCE_END, 0, &[]),
        ]
        .concat();
        let dataset = [
            implicit((0x0008, 0x1140), defined.len() as u32, &defined),
            implicit((0x0008, 0x1140), UNDEFINED, &undefined),
            implicit((0x0010, 0x0010), 8, b"Doe^Jane"),
        ]
        .concat();
        assert!(prescan(&file(IMPLICIT_LE, &dataset), &LIMITS).is_ok());
        // Explicit VR big endian.
        let mut be = vec![0x00, 0x10, 0x00, 0x10, b'P', b'N', 0x00, 0x08];
        be.extend_from_slice(b"Doe^Jane");
        assert!(prescan(&file(EXPLICIT_BE, &be), &LIMITS).is_ok());
        // Deflated explicit VR little endian.
        let mut deflated = Vec::new();
        std::io::Write::write_all(
            &mut flate2::write::DeflateEncoder::new(&mut deflated, flate2::Compression::fast()),
            &patient_name(),
        )
        .unwrap();
        assert!(prescan(&file(DEFLATED, &deflated), &LIMITS).is_ok());
    }

    #[test]
    fn refuses_a_corrupt_or_oversized_deflated_data_set() {
        let err = refusal(&file(DEFLATED, &[0xFF; 16]));
        assert!(err.contains("the deflated data set is corrupt"), "{err}");
        // 2 MiB of zeros inflate past the 1 MiB limit.
        let mut bomb = Vec::new();
        let mut encoder =
            flate2::write::DeflateEncoder::new(&mut bomb, flate2::Compression::best());
        std::io::Write::write_all(&mut encoder, &vec![0; 2 << 20]).unwrap();
        encoder.finish().unwrap();
        let err = refusal(&file(DEFLATED, &bomb));
        assert!(
            err.contains("inflates to more than 1048576 bytes, the limit for one image"),
            "{err}"
        );
    }

    #[test]
    fn refuses_a_length_past_the_end_of_the_data() {
        let data = file(
            EXPLICIT_LE,
            &el_len((0x0010, 0x0010), b"PN", 0xFFF0, b"Doe^Jane"),
        );
        let err = refusal(&data);
        assert!(
            err.contains("element (0010,0010) declares 65520 bytes, but only 8 remain"),
            "{err}"
        );
        let data = file(
            EXPLICIT_LE,
            &el_len((0x7FE0, 0x0010), b"OW", 0xFFFF_FFF0, &[0; 8]),
        );
        assert!(refusal(&data).contains("declares 4294967280 bytes, but only 8 remain"));
    }

    #[test]
    fn refuses_a_data_set_cut_inside_an_element_header() {
        let mut data = file(EXPLICIT_LE, &patient_name());
        data.extend_from_slice(&[0x10, 0x00, 0x20]);
        assert!(refusal(&data).contains("the data set is cut short at byte"));
    }

    #[test]
    fn refuses_delimiters_and_items_outside_a_sequence() {
        let data = file(EXPLICIT_LE, &implicit(ITEM_END, 0, &[]));
        assert!(refusal(&data).contains("unexpected delimiter at byte 8"));
        let data = file(EXPLICIT_LE, &implicit(SEQUENCE_END, 0, &[]));
        assert!(refusal(&data).contains("unexpected delimiter"));
        let data = file(EXPLICIT_LE, &implicit(ITEM, 0, &[]));
        assert!(refusal(&data).contains("an item outside a sequence at byte 0"));
    }

    #[test]
    fn refuses_an_undefined_length_on_an_element_that_is_not_a_sequence() {
        let data = file(
            EXPLICIT_LE,
            &el_len((0x0010, 0x0010), b"UT", UNDEFINED, &[]),
        );
        assert!(
            refusal(&data)
                .contains("element (0010,0010) has an undefined length but is not a sequence")
        );
    }

    /// A sequence of undefined length holding one item of undefined length around `inner`.
    fn nest(inner: &[u8]) -> Vec<u8> {
        [
            el_len((0x0008, 0x1140), b"SQ", UNDEFINED, &[]),
            implicit(ITEM, UNDEFINED, &[]),
            inner.to_vec(),
            implicit(ITEM_END, 0, &[]),
            implicit(SEQUENCE_END, 0, &[]),
        ]
        .concat()
    }

    #[test]
    fn accepts_nesting_up_to_the_limit_and_refuses_deeper() {
        let mut dataset = patient_name();
        for _ in 0..MAX_DEPTH {
            dataset = nest(&dataset);
        }
        assert!(prescan(&file(EXPLICIT_LE, &dataset), &LIMITS).is_ok());
        let err = refusal(&file(EXPLICIT_LE, &nest(&dataset)));
        assert!(err.contains("nested more than 32 levels deep"), "{err}");
        // UN of undefined length is a sequence too.
        let un = |inner: &[u8]| {
            [
                el_len((0x0009, 0x1010), b"UN", UNDEFINED, &[]),
                implicit(ITEM, UNDEFINED, &[]),
                inner.to_vec(),
                implicit(ITEM_END, 0, &[]),
                implicit(SEQUENCE_END, 0, &[]),
            ]
            .concat()
        };
        assert!(refusal(&file(EXPLICIT_LE, &un(&dataset))).contains("nested more than 32 levels"));
        let mut open = un(&patient_name());
        assert!(prescan(&file(EXPLICIT_LE, &open), &LIMITS).is_ok());
        open.truncate(open.len() - 8);
        assert!(refusal(&file(EXPLICIT_LE, &open)).contains("sequence (0009,1010) has no end"));
    }

    #[test]
    fn refuses_malformed_sequences() {
        let item = patient_name();
        // A sequence delimiter in a sequence of defined length.
        let body = [implicit(SEQUENCE_END, 0, &[])].concat();
        let data = file(EXPLICIT_LE, &el((0x0008, 0x1140), b"SQ", &body));
        assert!(refusal(&data).contains("a sequence delimiter in a sequence of defined length"));
        // Something other than an item.
        let data = file(EXPLICIT_LE, &el((0x0008, 0x1140), b"SQ", &item));
        let err = refusal(&data);
        assert!(
            err.contains("sequence (0008,1140) holds (0010,0010) where an item belongs"),
            "{err}"
        );
        // An item of defined length that ends with an item delimiter.
        let inner = [item.clone(), implicit(ITEM_END, 0, &[])].concat();
        let body = [implicit(ITEM, inner.len() as u32, &[]), inner].concat();
        let data = file(EXPLICIT_LE, &el((0x0008, 0x1140), b"SQ", &body));
        assert!(refusal(&data).contains("an item ends in the wrong place"));
        // An item of undefined length ended by the sequence delimiter.
        let body = [
            implicit(ITEM, UNDEFINED, &[]),
            item.clone(),
            implicit(SEQUENCE_END, 0, &[]),
        ]
        .concat();
        let data = file(
            EXPLICIT_LE,
            &[el_len((0x0008, 0x1140), b"SQ", UNDEFINED, &[]), body].concat(),
        );
        assert!(refusal(&data).contains("an item ends in the wrong place"));
        // An item longer than its sequence, and a sequence longer than the data.
        let body = [implicit(ITEM, 100, &[]), item.clone()].concat();
        let data = file(EXPLICIT_LE, &el((0x0008, 0x1140), b"SQ", &body));
        assert!(refusal(&data).contains("element (0008,1140) declares 100 bytes, but only"));
        let data = file(EXPLICIT_LE, &el_len((0x0008, 0x1140), b"SQ", 1000, &body));
        assert!(refusal(&data).contains("element (0008,1140) declares 1000 bytes, but only"));
        // A sequence of undefined length with no delimiter.
        let data = file(
            EXPLICIT_LE,
            &[
                el_len((0x0008, 0x1140), b"SQ", UNDEFINED, &[]),
                implicit(ITEM, item.len() as u32, &item),
            ]
            .concat(),
        );
        assert!(refusal(&data).contains("sequence (0008,1140) has no end"));
    }

    #[test]
    fn checks_every_fragment_of_encapsulated_pixel_data() {
        let pixel_data = |fragments: &[u8]| {
            file(
                "1.2.840.10008.1.2.5",
                &[
                    el_len((0x7FE0, 0x0010), b"OB", UNDEFINED, &[]),
                    fragments.to_vec(),
                ]
                .concat(),
            )
        };
        let good = [
            implicit(ITEM, 0, &[]),
            implicit(ITEM, 4, &[1, 2, 3, 4]),
            implicit(SEQUENCE_END, 0, &[]),
        ]
        .concat();
        assert!(prescan(&pixel_data(&good), &LIMITS).is_ok());
        let err = refusal(&pixel_data(&[implicit(ITEM, 400, &[1, 2, 3, 4])].concat()));
        assert!(
            err.contains("element (7FE0,0010) declares 400 bytes, but only 4 remain"),
            "{err}"
        );
        let err = refusal(&pixel_data(&implicit(ITEM, UNDEFINED, &[])));
        assert!(
            err.contains("holds something other than fragments"),
            "{err}"
        );
        let err = refusal(&pixel_data(&patient_name()));
        assert!(
            err.contains("holds something other than fragments"),
            "{err}"
        );
        let err = refusal(&pixel_data(&implicit(ITEM, 0, &[])));
        assert!(err.contains("the data set is cut short"), "{err}");
    }

    // The element headers as dicom-rs reads them (issue 22, finding 36): a length the pre-scan
    // reads differently from the parser is a length it never checked.

    #[test]
    fn an_unknown_vr_has_a_4_byte_length_as_dicom_rs_reads_it() {
        // "PM" is no VR: dicom-rs reads UN, 2 reserved bytes and a 4-byte length.
        let mut element = [0x10, 0x00, 0x10, 0x00, b'P', b'M', 0, 0].to_vec();
        element.extend_from_slice(&8u32.to_le_bytes());
        element.extend_from_slice(b"Doe^Jane");
        assert!(prescan(&file(EXPLICIT_LE, &element), &LIMITS).is_ok());
        // As a short header, its value bytes are the length: "Anon" is 1,852,796,481 bytes.
        let mut element = [0x10, 0x00, 0x10, 0x00, b'P', b'M', 10, 0].to_vec();
        element.extend_from_slice(b"Anon^Test ");
        let err = refusal(&file(EXPLICIT_LE, &element));
        assert!(
            err.contains("element (0010,0010) declares 1852796481 bytes, but only 6 remain"),
            "{err}"
        );
        // The same in big endian, and in the file meta information.
        let mut element = [0x00, 0x10, 0x00, 0x10, b'P', b'M', 0, 10].to_vec();
        element.extend_from_slice(b"Anon^Test ");
        let err = refusal(&file(EXPLICIT_BE, &element));
        assert!(err.contains("declares 1097756526 bytes"), "{err}");
        let mut data = file(EXPLICIT_LE, &patient_name());
        let at = data
            .windows(6)
            .position(|w| w == b"\x02\x00\x10\x00UI")
            .unwrap();
        data[at + 4..at + 6].copy_from_slice(b"UX");
        let err = refusal(&data);
        assert!(
            err.contains("file meta element (0002,0010) declares 775040561 bytes past the end"),
            "{err}"
        );
    }

    #[test]
    fn elements_of_group_fffe_have_no_vr_in_explicit_vr() {
        let data = file(
            EXPLICIT_LE,
            &[implicit((0xFFFE, 0x0001), 4, b"abcd"), patient_name()].concat(),
        );
        assert!(prescan(&data, &LIMITS).is_ok());
        // Read with a VR, "PN" and a length of 0x2000 are a 4-byte length of 512 MiB.
        let mut odd = implicit((0xFFFE, 0x0001), 0, &[]);
        odd.truncate(4);
        odd.extend_from_slice(b"PN\x00\x20");
        odd.extend_from_slice(&[0; 0x2000]);
        let err = refusal(&file(EXPLICIT_LE, &odd));
        assert!(
            err.contains("element (FFFE,0001) declares 536890960 bytes"),
            "{err}"
        );
    }

    #[test]
    fn the_meta_group_ends_where_its_group_length_says() {
        // Group 2 elements past the group length are data set elements (here implicit VR): the
        // "LT" and 2-byte length of an explicit header read as a 4-byte length.
        let extra = el((0x0002, 0x0099), b"LT", &[b' '; 16]);
        let mut data = file(IMPLICIT_LE, &[]);
        data.extend(extra.clone());
        data.extend(implicit((0x0010, 0x0010), 8, b"Doe^Jane"));
        let err = refusal(&data);
        assert!(
            err.contains("element (0002,0099) declares 1070156 bytes"),
            "{err}"
        );
        // Counted in the group length, it is part of the meta group.
        let group = [el((0x0002, 0x0010), b"UI", &uid(IMPLICIT_LE)), extra].concat();
        let mut data = b"DICM".to_vec();
        data.extend(el(
            (0x0002, 0x0000),
            b"UL",
            &(group.len() as u32).to_le_bytes(),
        ));
        data.extend(group);
        data.extend(implicit((0x0010, 0x0010), 8, b"Doe^Jane"));
        assert!(prescan(&data, &LIMITS).is_ok());
        // A group length that runs into the data set takes its first element into the meta
        // group, read as explicit VR (implicit "\x08\x00\x00\x00" is no VR: a 4-byte length).
        let dataset = [
            implicit((0x0008, 0x0005), 8, b"ISO_IR 6"),
            implicit((0x0010, 0x0010), 8, b"Doe^Jane"),
        ]
        .concat();
        let mut data = file(IMPLICIT_LE, &dataset);
        data[12..16].copy_from_slice(&(28u32 + 4).to_le_bytes());
        let err = refusal(&data);
        assert!(
            err.contains("file meta element (0008,0005) declares"),
            "{err}"
        );
    }

    #[test]
    fn the_meta_group_must_start_with_its_group_length() {
        let mut data = b"DICM".to_vec();
        data.extend(el((0x0002, 0x0010), b"UI", &uid(EXPLICIT_LE)));
        let err = refusal(&data);
        assert!(
            err.contains("starts with (0002,0010) of 20 bytes, not its group length (0002,0000)"),
            "{err}"
        );
        let mut data = file(EXPLICIT_LE, &[]);
        data.truncate(10);
        assert!(refusal(&data).contains("the file meta information is cut short"));
        // An undefined length in the meta group.
        let group = el_len((0x0002, 0x0001), b"OB", UNDEFINED, &[]);
        let mut data = b"DICM".to_vec();
        data.extend(el(
            (0x0002, 0x0000),
            b"UL",
            &(group.len() as u32).to_le_bytes(),
        ));
        data.extend(group);
        let err = refusal(&data);
        assert!(
            err.contains("file meta element (0002,0001) declares 4294967295 bytes past the end"),
            "{err}"
        );
    }

    #[test]
    fn pixel_data_declared_a_sequence_is_walked_as_one() {
        // dicom-rs parses the items of Pixel Data with VR SQ as data sets, not as fragments: here
        // an OB element of 1.75 GiB inside one.
        let inner = el_len((0x0010, 0x0010), b"OB", 0x7000_0000, &[0; 4]);
        let data = file(
            EXPLICIT_LE,
            &[
                el_len((0x7FE0, 0x0010), b"SQ", UNDEFINED, &[]),
                implicit(ITEM, inner.len() as u32, &inner),
                implicit(SEQUENCE_END, 0, &[]),
            ]
            .concat(),
        );
        let err = refusal(&data);
        assert!(
            err.contains("element (0010,0010) declares 1879048192 bytes"),
            "{err}"
        );
    }

    #[test]
    fn notes_the_pixel_data_element_of_the_data_set() {
        let pixel_data = |element: u16| el((0x7FE0, element), b"OW", &[0; 4]);
        let scanned = |dataset: &[u8]| {
            scan(&file(EXPLICIT_LE, dataset), &LIMITS)
                .unwrap()
                .pixel_data
        };
        assert_eq!(scanned(&patient_name()), None);
        assert_eq!(scanned(&pixel_data(0x0010)), Some((0x7FE0, 0x0010)));
        assert_eq!(scanned(&pixel_data(0x0008)), Some((0x7FE0, 0x0008)));
        assert_eq!(
            scanned(&[pixel_data(0x0008), pixel_data(0x0010)].concat()),
            Some((0x7FE0, 0x0010))
        );
        // Pixel Data in an item (an icon) is not the instance's.
        assert_eq!(scanned(&nest(&pixel_data(0x0010))), None);
    }
}
