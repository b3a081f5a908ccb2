//! The Comprehensive SR instance (being written).

use super::SeriesReport;

/// The report as a DICOM Part 10 file.
pub fn build(_report: &SeriesReport) -> Result<Vec<u8>, String> {
    Err("the structured report is not built yet".into())
}
