//! DIMSE command sets (PS3.7 §9, §E): the C-ECHO and C-STORE requests the node answers and sends,
//! and their responses. Command sets are always Implicit VR Little Endian.

use dicom_core::value::PrimitiveValue;
use dicom_core::{DataElement, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN;

/// Command Field values.
pub const C_STORE_RQ: u16 = 0x0001;
pub const C_STORE_RSP: u16 = 0x8001;
pub const C_ECHO_RQ: u16 = 0x0030;
pub const C_ECHO_RSP: u16 = 0x8030;
pub const C_CANCEL_RQ: u16 = 0x0FFF;
/// Command Data Set Type: no data set follows.
pub const NO_DATA_SET: u16 = 0x0101;

/// Status codes (PS3.7 Annex C, PS3.4 B.2.3).
pub mod status {
    pub const SUCCESS: u16 = 0x0000;
    /// Refused: SOP Class not supported.
    pub const SOP_CLASS_NOT_SUPPORTED: u16 = 0x0122;
    /// Refused: Out of Resources (the spool is full, or the node is draining).
    pub const OUT_OF_RESOURCES: u16 = 0xA700;
    /// Error: Data Set does not match SOP Class.
    pub const DATA_SET_MISMATCH: u16 = 0xA900;
    /// Error: Cannot understand.
    pub const CANNOT_UNDERSTAND: u16 = 0xC000;
    /// Unrecognized Operation.
    pub const UNRECOGNIZED_OPERATION: u16 = 0x0211;
    /// Processing failure.
    pub const PROCESSING_FAILURE: u16 = 0x0110;

    /// Success or a warning (the object was stored).
    pub fn stored(status: u16) -> bool {
        status == SUCCESS || (0xB000..=0xBFFF).contains(&status) || status == 0x0107
    }
}

/// Longest Error Comment (LO): 64 characters.
const MAX_ERROR_COMMENT: usize = 64;

/// A command set as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    pub field: u16,
    pub message_id: u16,
    /// Message ID Being Responded To (responses).
    pub responded_to: u16,
    pub affected_sop_class: String,
    pub affected_sop_instance: String,
    pub data_set_type: u16,
    pub status: Option<u16>,
}

impl Command {
    /// Whether a data set follows the command.
    pub fn has_data_set(&self) -> bool {
        self.data_set_type != NO_DATA_SET
    }

    /// Parses a command set; the error says what is missing or malformed (never quotes values).
    pub fn parse(bytes: &[u8]) -> Result<Command, String> {
        check_elements(bytes)?;
        let ts = IMPLICIT_VR_LITTLE_ENDIAN.erased();
        let obj = InMemDicomObject::read_dataset_with_ts(bytes, &ts)
            .map_err(|_| "the command set is not a valid Implicit VR Little Endian data set")?;
        let uint = |tag: Tag, name: &str| -> Result<Option<u16>, String> {
            match obj.get(tag) {
                None => Ok(None),
                Some(e) => e
                    .uint16()
                    .map(Some)
                    .map_err(|_| format!("the command's {name} is not an unsigned short")),
            }
        };
        let text = |tag: Tag| -> String {
            obj.get(tag)
                .and_then(|e| e.to_str().ok())
                .map(|s| s.trim_end_matches(['\0', ' ']).to_string())
                .unwrap_or_default()
        };
        let field = uint(tags::COMMAND_FIELD, "Command Field")?
            .ok_or("the command set has no Command Field (0000,0100)")?;
        Ok(Command {
            field,
            message_id: uint(tags::MESSAGE_ID, "Message ID")?.unwrap_or(0),
            responded_to: uint(
                tags::MESSAGE_ID_BEING_RESPONDED_TO,
                "Message ID Being Responded To",
            )?
            .unwrap_or(0),
            affected_sop_class: text(tags::AFFECTED_SOP_CLASS_UID),
            affected_sop_instance: text(tags::AFFECTED_SOP_INSTANCE_UID),
            data_set_type: uint(tags::COMMAND_DATA_SET_TYPE, "Command Data Set Type")?
                .unwrap_or(NO_DATA_SET),
            status: uint(tags::STATUS, "Status")?,
        })
    }
}

/// Walks the element headers of a command set before dicom-rs reads it: dicom-rs allocates (and
/// zero-fills) the length an element declares before it reads the value, so a 10-byte command set
/// declaring 4 GB would cost 4 GB. A command set is group 0000 only (PS3.7 §6.3.1), with no
/// sequence: every element must be in that group and end within the bytes. And its length must be
/// a whole number of values of its VR (the dictionary's, as dicom-rs reads Implicit VR): dicom-rs
/// reads a US of 3 bytes as one value and the next header one byte early, whose length is then
/// one this walk never saw.
fn check_elements(bytes: &[u8]) -> Result<(), String> {
    use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry};
    use dicom_dictionary_std::StandardDataDictionary;
    let mut at = 0;
    while at < bytes.len() {
        let Some(header) = bytes.get(at..at + 8) else {
            return Err("the command set ends inside an element header".into());
        };
        if header[..2] != [0, 0] {
            return Err("the command set holds an element outside group 0000".into());
        }
        let element = u16::from_le_bytes([header[2], header[3]]);
        let len = u32::from_le_bytes([header[4], header[5], header[6], header[7]]) as usize;
        let vr = StandardDataDictionary
            .by_tag(Tag(0x0000, element))
            .map(|entry| entry.vr().relaxed());
        if !len.is_multiple_of(crate::input::dicom::value_unit(vr)) {
            return Err("an element of the command set has a length its VR cannot have".into());
        }
        match (at + 8).checked_add(len) {
            Some(end) if end <= bytes.len() => at = end,
            _ => return Err("an element of the command set runs past its end".into()),
        }
    }
    Ok(())
}

fn us(tag: Tag, value: u16) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, VR::US, PrimitiveValue::from(value))
}

fn ui(tag: Tag, value: &str) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, VR::UI, PrimitiveValue::from(value))
}

fn encode(elements: Vec<DataElement<InMemDicomObject>>) -> Vec<u8> {
    let obj = InMemDicomObject::command_from_element_iter(elements);
    let mut out = Vec::with_capacity(160);
    obj.write_dataset_with_ts(&mut out, &IMPLICIT_VR_LITTLE_ENDIAN.erased())
        .expect("a command set of known elements encodes; this is a bug");
    out
}

/// A C-ECHO-RSP to `request`.
pub fn echo_response(request: &Command) -> Vec<u8> {
    let mut elements = vec![
        us(tags::COMMAND_FIELD, C_ECHO_RSP),
        us(tags::MESSAGE_ID_BEING_RESPONDED_TO, request.message_id),
        us(tags::COMMAND_DATA_SET_TYPE, NO_DATA_SET),
        us(tags::STATUS, status::SUCCESS),
    ];
    if !request.affected_sop_class.is_empty() {
        elements.push(ui(
            tags::AFFECTED_SOP_CLASS_UID,
            &request.affected_sop_class,
        ));
    }
    encode(elements)
}

/// A response to `request` with `status` for a command the node does not perform.
pub fn unrecognized_response(request: &Command) -> Vec<u8> {
    encode(vec![
        us(tags::COMMAND_FIELD, request.field | 0x8000),
        us(tags::MESSAGE_ID_BEING_RESPONDED_TO, request.message_id),
        us(tags::COMMAND_DATA_SET_TYPE, NO_DATA_SET),
        us(tags::STATUS, status::UNRECOGNIZED_OPERATION),
    ])
}

/// A C-STORE-RSP to `request`; a failure carries `comment` (cut to 64 characters, ASCII only).
pub fn store_response(request: &Command, status: u16, comment: Option<&str>) -> Vec<u8> {
    let mut elements = vec![
        ui(tags::AFFECTED_SOP_CLASS_UID, &request.affected_sop_class),
        us(tags::COMMAND_FIELD, C_STORE_RSP),
        us(tags::MESSAGE_ID_BEING_RESPONDED_TO, request.message_id),
        us(tags::COMMAND_DATA_SET_TYPE, NO_DATA_SET),
        us(tags::STATUS, status),
        ui(
            tags::AFFECTED_SOP_INSTANCE_UID,
            &request.affected_sop_instance,
        ),
    ];
    if let Some(comment) = comment {
        let comment: String = comment
            .chars()
            .map(|c| {
                if c.is_ascii_graphic() || c == ' ' {
                    c
                } else {
                    '?'
                }
            })
            .take(MAX_ERROR_COMMENT)
            .collect();
        elements.push(DataElement::new(
            tags::ERROR_COMMENT,
            VR::LO,
            PrimitiveValue::from(comment),
        ));
    }
    encode(elements)
}

/// A C-STORE-RQ for one object.
pub fn store_request(message_id: u16, sop_class: &str, sop_instance: &str) -> Vec<u8> {
    encode(vec![
        ui(tags::AFFECTED_SOP_CLASS_UID, sop_class),
        us(tags::COMMAND_FIELD, C_STORE_RQ),
        us(tags::MESSAGE_ID, message_id),
        us(tags::PRIORITY, 0),
        us(tags::COMMAND_DATA_SET_TYPE, 0x0000),
        ui(tags::AFFECTED_SOP_INSTANCE_UID, sop_instance),
    ])
}

/// A UID as the node files it under: 1–64 characters, digits and dots (PS3.5 §9.1).
pub fn valid_uid(uid: &str) -> bool {
    !uid.is_empty()
        && uid.len() <= 64
        && uid.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        && !uid.starts_with('.')
        && !uid.ends_with('.')
        && !uid.contains("..")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_request_round_trips() {
        let bytes = store_request(7, "1.2.840.10008.5.1.4.1.1.4", "1.2.3.4");
        let c = Command::parse(&bytes).unwrap();
        assert_eq!(c.field, C_STORE_RQ);
        assert_eq!(c.message_id, 7);
        assert_eq!(c.affected_sop_class, "1.2.840.10008.5.1.4.1.1.4");
        assert_eq!(c.affected_sop_instance, "1.2.3.4");
        assert!(c.has_data_set());
    }

    #[test]
    fn a_store_response_carries_the_status_and_a_bounded_ascii_comment() {
        let rq = Command::parse(&store_request(9, "1.2.3", "4.5.6")).unwrap();
        let long = "é".repeat(100);
        let rsp =
            Command::parse(&store_response(&rq, status::OUT_OF_RESOURCES, Some(&long))).unwrap();
        assert_eq!(rsp.field, C_STORE_RSP);
        assert_eq!(rsp.responded_to, 9);
        assert_eq!(rsp.status, Some(status::OUT_OF_RESOURCES));
        assert_eq!(rsp.affected_sop_instance, "4.5.6");
        assert!(!rsp.has_data_set());
        let obj = InMemDicomObject::read_dataset_with_ts(
            &store_response(&rq, 0xA700, Some(&long))[..],
            &IMPLICIT_VR_LITTLE_ENDIAN.erased(),
        )
        .unwrap();
        let comment = obj.get(tags::ERROR_COMMENT).unwrap().to_str().unwrap();
        assert!(comment.len() <= 64 && comment.is_ascii(), "{comment}");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(Command::parse(b"\x00\x01\x02").is_err());
        assert!(Command::parse(&[]).is_err());
    }

    #[test]
    fn a_declared_length_past_the_end_is_refused_before_it_is_allocated() {
        // (0000,2002) declaring 2.97 GB in 10 bytes: dicom-rs would allocate and zero it first.
        let huge = b"\x00\x00\x02\x20\x12\x00\x53\xb1\x00\x08";
        assert!(Command::parse(huge).unwrap_err().contains("past its end"));
        let mut outside = store_request(1, "1.2.3", "4.5.6");
        outside.extend_from_slice(b"\x08\x00\x18\x00\x02\x00\x00\x001\0");
        assert!(Command::parse(&outside).unwrap_err().contains("group 0000"));
        // Message ID (US) of 3 bytes: dicom-rs would read the next header one byte early.
        let mut odd = store_request(1, "1.2.3", "4.5.6");
        odd.extend_from_slice(b"\x00\x00\x10\x01\x03\x00\x00\x00\x01\x00\x00");
        assert!(
            Command::parse(&odd)
                .unwrap_err()
                .contains("its VR cannot have")
        );
    }

    #[test]
    fn uids_are_checked_before_they_name_a_file() {
        assert!(valid_uid("1.2.840.10008.5.1.4.1.1.4"));
        for bad in ["", "../etc", "1..2", ".1", "1.", "1.2a", &"1".repeat(65)] {
            assert!(!valid_uid(bad), "{bad}");
        }
    }
}
