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
