//! The structural pre-scan: every element header of the file is walked, without allocating, before
//! the parser sees it.

use std::io::Read;

use dicom_core::Tag;

use super::{SUPPORTED_TRANSFER_SYNTAXES, invalid, ts_name};
use crate::input::{InputError, InputLimits};

/// Deepest nesting of sequences accepted. Enhanced MR functional groups nest 3–4 levels.
pub const MAX_DEPTH: usize = 32;

const IMPLICIT_LE: &str = "1.2.840.10008.1.2";
const EXPLICIT_BE: &str = "1.2.840.10008.1.2.2";
const DEFLATED: &str = "1.2.840.10008.1.2.1.99";

/// Structural checks before parsing; returns the file from `DICM` on. Walks every element header
/// (of the inflated data set, for the deflated transfer syntax) and refuses lengths past the end,
/// undefined lengths where none may be, nesting deeper than [`MAX_DEPTH`] and transfer syntaxes
/// this build cannot decode.
pub fn prescan<'a>(data: &'a [u8], limits: &InputLimits) -> Result<&'a [u8], InputError> {
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
    };
    match walker.dataset(dataset.len(), 0)? {
        Stop::End => Ok(body),
        Stop::ItemEnd | Stop::SequenceEnd => Err(invalid(format!(
            "unexpected delimiter at byte {} of the data set",
            walker.pos
        ))),
    }
}

/// The File Meta Information (always explicit VR little endian): the transfer syntax UID and
/// where the data set starts, relative to `DICM`.
fn meta(body: &[u8]) -> Result<(String, usize), InputError> {
    let mut pos = 4;
    let mut transfer_syntax = None;
    while let Some(head) = body.get(pos..pos + 8) {
        let group = u16::from_le_bytes([head[0], head[1]]);
        if group != 0x0002 {
            break;
        }
        let element = u16::from_le_bytes([head[2], head[3]]);
        let vr = [head[4], head[5]];
        let (len, header_len) = if long_length_vr(vr) {
            let l = body
                .get(pos + 8..pos + 12)
                .ok_or_else(|| invalid("the file meta information is cut short"))?;
            (u32::from_le_bytes([l[0], l[1], l[2], l[3]]) as usize, 12)
        } else {
            (u16::from_le_bytes([head[6], head[7]]) as usize, 8)
        };
        let value = body.get(pos + header_len..pos + header_len + len).ok_or_else(|| {
            invalid(format!(
                "file meta element (0002,{element:04X}) declares {len} bytes past the end of the file"
            ))
        })?;
        if element == 0x0010 {
            transfer_syntax = Some(
                String::from_utf8_lossy(value)
                    .trim_matches(['\0', ' '])
                    .to_string(),
            );
        }
        pos += header_len + len;
    }
    let transfer_syntax = transfer_syntax
        .ok_or_else(|| invalid("the file meta information has no Transfer Syntax UID"))?;
    Ok((transfer_syntax, pos))
}

fn long_length_vr(vr: [u8; 2]) -> bool {
    matches!(
        &vr,
        b"OB"
            | b"OD"
            | b"OF"
            | b"OL"
            | b"OV"
            | b"OW"
            | b"SQ"
            | b"SV"
            | b"UC"
            | b"UN"
            | b"UR"
            | b"UT"
            | b"UV"
    )
}

const UNDEFINED: u32 = 0xFFFF_FFFF;
const ITEM: (u16, u16) = (0xFFFE, 0xE000);
const ITEM_END: (u16, u16) = (0xFFFE, 0xE00D);
const SEQUENCE_END: (u16, u16) = (0xFFFE, 0xE0DD);

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

    /// Elements until `end`, or until an item or sequence delimiter.
    fn dataset(&mut self, end: usize, depth: usize) -> Result<Stop, InputError> {
        while self.pos < end {
            let tag = (self.u16()?, self.u16()?);
            if tag == ITEM_END || tag == SEQUENCE_END {
                self.u32()?;
                return Ok(if tag == ITEM_END {
                    Stop::ItemEnd
                } else {
                    Stop::SequenceEnd
                });
            }
            if tag == ITEM {
                return Err(invalid(format!(
                    "an item outside a sequence at byte {}",
                    self.pos - 4
                )));
            }
            let (sequence, len) = if self.explicit {
                let vr = self.bytes::<2>()?;
                let len = if long_length_vr(vr) {
                    self.bytes::<2>()?;
                    self.u32()?
                } else {
                    u32::from(self.u16()?)
                };
                (&vr == b"SQ" || (&vr == b"UN" && len == UNDEFINED), len)
            } else {
                let len = self.u32()?;
                let is_sq = dicom_core::dictionary::DataDictionary::by_tag(
                    &dicom_dictionary_std::StandardDataDictionary,
                    Tag(tag.0, tag.1),
                )
                .is_some_and(|entry| {
                    matches!(entry.vr, dicom_core::dictionary::VirtualVr::Exact(vr) if vr == dicom_core::VR::SQ)
                });
                (is_sq || len == UNDEFINED, len)
            };
            if tag == (0x7FE0, 0x0010) && len == UNDEFINED {
                self.fragments(end)?;
            } else if sequence {
                self.sequence(len, end, depth + 1, tag)?;
            } else if len == UNDEFINED {
                return Err(invalid(format!(
                    "element ({:04X},{:04X}) has an undefined length but is not a sequence",
                    tag.0, tag.1
                )));
            } else {
                self.skip(len, end, tag)?;
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
        if long_length_vr(*vr) {
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
}
