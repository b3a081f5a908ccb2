//! The model's sequence guard (`[dicom]` in `model.toml`): which modalities and MR sequences it
//! accepts, applied to a DICOM instance's header before its pixels are decoded.

use crate::input::dicom::Header;
use crate::input::sequence::{Sequence, detect};
use crate::model::{DicomGuard, GuardPolicy};

/// Applies a model's guard to an instance's header: `Err` (a message for FAILED_PRECONDITION)
/// when the policy rejects it, otherwise the warnings to attach to its results.
pub fn check(guard: &DicomGuard, header: &Header) -> Result<Vec<String>, String> {
    let mut warnings = Vec::new();
    let mut refuse = |message: String| match guard.policy {
        GuardPolicy::Reject => Err(message),
        GuardPolicy::Warn => {
            warnings.push(message);
            Ok(())
        }
    };
    if !guard.modalities.is_empty() && !guard.modalities.contains(&header.modality) {
        refuse(format!(
            "the instance's modality is {:?}; the model accepts {}",
            header.modality,
            guard.modalities.join(", ")
        ))?;
    }
    if !guard.sequences.is_empty() {
        let accepted = guard
            .sequences
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        let detected = detect(&header.acquisition);
        match detected.sequence {
            Sequence::Unknown => warnings.push(format!(
                "the MR sequence could not be identified ({}); the model was trained on {accepted} only",
                detected.because
            )),
            s if !guard.sequences.contains(&s) => refuse(format!(
                "the series is {} ({}); the model accepts {accepted} only",
                s.as_str(),
                detected.because
            ))?,
            _ => {}
        }
    }
    Ok(warnings)
}
