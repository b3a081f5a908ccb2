//! Attributes stored with VR `UN` (an explicit-VR file whose sender did not know the attribute)
//! reinterpreted with the dictionary's VR, as pydicom does: dicom-rs keeps their value bytes, so
//! Rescale Slope `"1 "` would read as the numbers 49 and 32, and a UID as `49\46\50…`.
//!
//! Sequences stored as `UN` are left as they are (pydicom reads them as implicit VR little endian;
//! none of the attributes the service reads is a sequence that senders get wrong in practice).

use dicom_core::dictionary::{DataDictionary, VirtualVr};
use dicom_core::header::Header as _;
use dicom_core::value::{PrimitiveValue, Value};
use dicom_core::{DataElement, Tag, VR};
use dicom_dictionary_std::{StandardDataDictionary, tags};
use dicom_encoding::text::{SpecificCharacterSet, TextCodec};
use dicom_object::InMemDicomObject;
use dicom_object::mem::InMemElement;

/// Reinterprets every `UN` element of `object` and of its sequence items. `big_endian`: the data
/// set's byte order (binary values of a `UN` element are in it).
pub(super) fn resolve(object: &mut InMemDicomObject, big_endian: bool) {
    resolve_in(object, big_endian, &SpecificCharacterSet::default(), false);
}

fn resolve_in(
    object: &mut InMemDicomObject,
    big_endian: bool,
    inherited: &SpecificCharacterSet,
    inherited_signed: bool,
) {
    // The attributes others depend on first: the character set and the pixel representation.
    for tag in [tags::SPECIFIC_CHARACTER_SET, tags::PIXEL_REPRESENTATION] {
        if let Some(element) = object.get(tag)
            && element.vr() == VR::UN
            && let Some(element) = object.take(tag)
        {
            object.put(reinterpret(
                element,
                big_endian,
                inherited,
                inherited_signed,
            ));
        }
    }
    let charset = object
        .get(tags::SPECIFIC_CHARACTER_SET)
        .and_then(|e| e.to_str().ok())
        .and_then(|code| SpecificCharacterSet::from_code(code.trim_matches(['\0', ' '])))
        .unwrap_or_else(|| inherited.clone());
    let signed = object
        .get(tags::PIXEL_REPRESENTATION)
        .and_then(|e| e.to_int::<u16>().ok())
        .map_or(inherited_signed, |r| r == 1);
    let tags: Vec<Tag> = object
        .iter()
        .filter(|e| e.vr() == VR::UN || e.vr() == VR::SQ)
        .map(|e| e.tag())
        .collect();
    for tag in tags {
        let Some(mut element) = object.take(tag) else {
            continue;
        };
        if element.vr() == VR::SQ {
            if let Some(items) = element.items_mut() {
                for item in items.iter_mut() {
                    resolve_in(item, big_endian, &charset, signed);
                }
            }
            object.put(element);
        } else {
            object.put(reinterpret(element, big_endian, &charset, signed));
        }
    }
}

/// The element with the dictionary's VR and its value bytes decoded accordingly; unchanged when
/// the tag is not in the dictionary, is a sequence, or its bytes do not fit the VR.
fn reinterpret(
    element: InMemElement,
    big_endian: bool,
    charset: &SpecificCharacterSet,
    signed: bool,
) -> InMemElement {
    let tag = element.tag();
    let Some(vr) = StandardDataDictionary
        .by_tag(tag)
        .and_then(|entry| match entry.vr {
            VirtualVr::Exact(VR::SQ) => None,
            VirtualVr::Exact(vr) => Some(vr),
            VirtualVr::Xs if signed => Some(VR::SS),
            VirtualVr::Xs => Some(VR::US),
            VirtualVr::Lt => Some(VR::OW),
            // Pixel and overlay data (OB or OW), and whatever comes next: bytes stay bytes.
            _ => None,
        })
    else {
        return element;
    };
    let Value::Primitive(PrimitiveValue::U8(bytes)) = element.value() else {
        return element;
    };
    match decode(vr, bytes, big_endian, charset) {
        Some(value) => DataElement::new(tag, vr, value),
        None => element,
    }
}

/// `bytes` as a value of `vr`.
fn decode(
    vr: VR,
    bytes: &[u8],
    big_endian: bool,
    charset: &SpecificCharacterSet,
) -> Option<PrimitiveValue> {
    macro_rules! numbers {
        ($variant:ident, $ty:ty) => {{
            const N: usize = std::mem::size_of::<$ty>();
            if bytes.len() % N != 0 {
                return None;
            }
            PrimitiveValue::$variant(
                bytes
                    .chunks_exact(N)
                    .map(|b| {
                        let b: [u8; N] = b.try_into().expect("N bytes");
                        if big_endian {
                            <$ty>::from_be_bytes(b)
                        } else {
                            <$ty>::from_le_bytes(b)
                        }
                    })
                    .collect(),
            )
        }};
    }
    Some(match vr {
        VR::US | VR::OW => numbers!(U16, u16),
        VR::SS => numbers!(I16, i16),
        VR::UL | VR::OL => numbers!(U32, u32),
        VR::SL => numbers!(I32, i32),
        VR::UV | VR::OV => numbers!(U64, u64),
        VR::SV => numbers!(I64, i64),
        VR::FL | VR::OF => numbers!(F32, f32),
        VR::FD | VR::OD => numbers!(F64, f64),
        VR::AT => {
            let PrimitiveValue::U16(halves) = numbers!(U16, u16) else {
                unreachable!("U16 values")
            };
            if halves.len() % 2 != 0 {
                return None;
            }
            PrimitiveValue::Tags(halves.chunks_exact(2).map(|t| Tag(t[0], t[1])).collect())
        }
        VR::OB | VR::UN => return None,
        // Text. One value for the VRs whose value may hold a backslash.
        _ => {
            let text = charset.decode(bytes).ok()?;
            let single = matches!(vr, VR::LT | VR::ST | VR::UT | VR::UR);
            let values: Vec<String> = if single {
                vec![text.trim_end_matches([' ', '\0']).to_string()]
            } else {
                text.split('\\')
                    .map(|v| v.trim_end_matches([' ', '\0']).to_string())
                    .collect()
            };
            PrimitiveValue::Strs(values.into_iter().collect())
        }
    })
}

#[cfg(test)]
mod tests {
    use dicom_core::value::DataSetSequence;

    use super::*;

    fn un(tag: Tag, bytes: &[u8]) -> InMemElement {
        DataElement::new(tag, VR::UN, PrimitiveValue::from(bytes.to_vec()))
    }

    #[test]
    fn text_and_numbers_get_the_dictionary_vr() {
        let mut object = InMemDicomObject::from_element_iter([
            un(tags::RESCALE_SLOPE, b"1 "),
            un(tags::RESCALE_INTERCEPT, b"-1024 "),
            un(tags::WINDOW_CENTER, b"40\\400 "),
            un(tags::SOP_INSTANCE_UID, b"1.2.3.4\0"),
            un(tags::MODALITY, b"CT"),
            un(tags::ROWS, &[0x00, 0x02]),
            un(tags::IMAGE_ORIENTATION_PATIENT, b"1\\0\\0\\0\\1\\0 "),
            un(tags::FRAME_INCREMENT_POINTER, &[0x18, 0x00, 0x63, 0x10]),
            un(tags::STUDY_DESCRIPTION, b"BRAIN\\HEAD"),
            un(tags::ADDITIONAL_PATIENT_HISTORY, b"a\\b "),
        ]);
        resolve(&mut object, false);
        let get = |tag| object.get(tag).unwrap();
        assert_eq!(get(tags::RESCALE_SLOPE).vr(), VR::DS);
        assert_eq!(get(tags::RESCALE_SLOPE).to_float64().unwrap(), 1.0);
        assert_eq!(get(tags::RESCALE_INTERCEPT).to_float64().unwrap(), -1024.0);
        assert_eq!(
            get(tags::WINDOW_CENTER).to_multi_float64().unwrap(),
            [40.0, 400.0]
        );
        assert_eq!(get(tags::SOP_INSTANCE_UID).to_str().unwrap(), "1.2.3.4");
        assert_eq!(get(tags::MODALITY).to_str().unwrap(), "CT");
        assert_eq!(get(tags::ROWS).to_int::<u16>().unwrap(), 512);
        assert_eq!(
            get(tags::IMAGE_ORIENTATION_PATIENT)
                .to_multi_float64()
                .unwrap(),
            [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        );
        assert_eq!(
            get(tags::FRAME_INCREMENT_POINTER).value().to_tag().unwrap(),
            Tag(0x0018, 0x1063)
        );
        // LO is multi-valued; LT keeps its backslash.
        assert_eq!(get(tags::STUDY_DESCRIPTION).value().multiplicity(), 2);
        assert_eq!(
            get(tags::ADDITIONAL_PATIENT_HISTORY).to_str().unwrap(),
            "a\\b"
        );
    }

    #[test]
    fn binary_values_follow_the_byte_order_and_pixel_representation() {
        let mut object = InMemDicomObject::from_element_iter([
            un(tags::ROWS, &[0x02, 0x00]),
            un(tags::PIXEL_REPRESENTATION, &[0x00, 0x01]),
            un(tags::PIXEL_PADDING_VALUE, &[0xFF, 0xFF]),
        ]);
        resolve(&mut object, true);
        assert_eq!(
            object.get(tags::ROWS).unwrap().to_int::<u16>().unwrap(),
            512
        );
        let padding = object.get(tags::PIXEL_PADDING_VALUE).unwrap();
        assert_eq!(
            (padding.vr(), padding.to_int::<i32>().unwrap()),
            (VR::SS, -1)
        );
    }

    #[test]
    fn items_of_sequences_are_resolved_and_the_rest_left_alone() {
        let item =
            InMemDicomObject::from_element_iter([un(tags::REFERENCED_SOP_INSTANCE_UID, b"1.2\0")]);
        let mut object = InMemDicomObject::from_element_iter([
            DataElement::new(
                tags::REFERENCED_IMAGE_SEQUENCE,
                VR::SQ,
                DataSetSequence::from(vec![item]),
            ),
            // Private: not in the dictionary.
            un(Tag(0x0009, 0x1010), b"12"),
            // A value that does not fit the VR (US needs 2 bytes per value).
            un(tags::COLUMNS, &[1, 2, 3]),
        ]);
        resolve(&mut object, false);
        let items = object
            .get(tags::REFERENCED_IMAGE_SEQUENCE)
            .unwrap()
            .items()
            .unwrap();
        let uid = items[0].get(tags::REFERENCED_SOP_INSTANCE_UID).unwrap();
        assert_eq!((uid.vr(), uid.to_str().unwrap()), (VR::UI, "1.2".into()));
        assert_eq!(object.get(Tag(0x0009, 0x1010)).unwrap().vr(), VR::UN);
        assert_eq!(object.get(tags::COLUMNS).unwrap().vr(), VR::UN);
    }

    #[test]
    fn text_is_decoded_with_the_specific_character_set() {
        let mut object = InMemDicomObject::from_element_iter([
            un(tags::SPECIFIC_CHARACTER_SET, b"ISO_IR 100"),
            un(tags::STUDY_DESCRIPTION, b"T\xEAte "),
        ]);
        resolve(&mut object, false);
        assert_eq!(
            object
                .get(tags::STUDY_DESCRIPTION)
                .unwrap()
                .to_str()
                .unwrap(),
            "Tête"
        );
    }
}
