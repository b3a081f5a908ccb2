//! Results as DICOM for the PACS: a Comprehensive SR instance for a classified series
//! ([`sr::build`]), a Segmentation (SEG) instance for a segmented series ([`seg::build`]) and a
//! TID 1500 measurement report of the SEG's segment volumes ([`measurement::build`]).

pub mod measurement;
pub mod seg;
pub mod sr;

use crate::input::dicom::PatientContext;

/// Which model produced a result.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelIdentity {
    pub name: String,
    pub version: String,
    pub sha256: String,
    pub clinically_trained: bool,
}

/// One classified slice of the series, in slice order.
#[derive(Debug, Clone, PartialEq)]
pub struct SliceFinding {
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    /// 1-based frame number for a multi-frame instance; `None` for single-frame instances.
    pub frame: Option<u32>,
    /// The most probable label and its probability.
    pub label: String,
    pub probability: f32,
    /// The probability of the finding label (e.g. "tumor") on this slice.
    pub finding_probability: f32,
}

/// The series-level result.
#[derive(Debug, Clone, PartialEq)]
pub struct SeriesFinding {
    /// The label the series is summarised for (e.g. "tumor").
    pub label: String,
    /// The aggregated probability of that label (e.g. the maximum over the slices).
    pub probability: f32,
    /// How it was aggregated, in words (e.g. "maximum over 24 slices").
    pub aggregation: String,
    /// Index into `slices` of the slice the value came from, when there is one.
    pub slice: Option<usize>,
}

/// Everything the report says.
#[derive(Debug, Clone, PartialEq)]
pub struct SeriesReport {
    /// Patient, study and series attributes copied from the first source instance.
    pub context: PatientContext,
    pub study_instance_uid: String,
    pub series_instance_uid: String,
    pub slices: Vec<SliceFinding>,
    pub finding: SeriesFinding,
    pub model: ModelIdentity,
    /// Caveats shown to the reader (e.g. not for diagnostic use).
    pub warnings: Vec<String>,
}

/// What the writers' unit tests read their output with.
#[cfg(test)]
pub(crate) mod testing {
    use dicom_core::Tag;
    use dicom_object::{DefaultDicomObject, InMemDicomObject};

    /// A Part 10 file's data set.
    pub fn parse(bytes: &[u8]) -> DefaultDicomObject {
        assert_eq!(&bytes[128..132], b"DICM");
        dicom_object::from_reader(&bytes[128..]).expect("the object parses")
    }

    /// An attribute's text, without padding.
    pub fn text(obj: &InMemDicomObject, tag: Tag) -> String {
        obj.element(tag)
            .unwrap_or_else(|_| panic!("{tag} missing"))
            .to_str()
            .unwrap()
            .trim_end_matches(['\0', ' '])
            .to_string()
    }
}
