//! What `brainai classify` prints, file by file as results come: a tab-separated line per
//! classified file on standard output and `error: FILE: reason` per failed file on standard error;
//! or (`--json`) one JSON document `{"results": [...], "errors": [{"file", "error"}...]}` written
//! as it goes (and `"stopped"`: why, when the run stopped early).

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;

use serde_json::json;

use crate::pb;

/// Prints one run's outcomes.
pub(super) struct Printer {
    json: bool,
    /// Files classified so far.
    results: usize,
    /// Files that failed so far (kept for the JSON document's `errors`).
    errors: Vec<serde_json::Value>,
    /// Warnings already printed (text: each once).
    warned: BTreeSet<String>,
}

impl Printer {
    /// Starts the output (the JSON document's opening).
    pub fn new(json: bool) -> Self {
        if json {
            print!("{{\n  \"results\": [");
        }
        Printer {
            json,
            results: 0,
            errors: Vec::new(),
            warned: BTreeSet::new(),
        }
    }

    pub fn results(&self) -> usize {
        self.results
    }

    pub fn failed(&self) -> usize {
        self.errors.len()
    }

    /// One file's outcome.
    pub fn file(&mut self, path: &Path, outcome: Result<pb::Classification, String>) {
        let row = match outcome {
            Ok(row) => row,
            Err(reason) => {
                if !self.json {
                    eprintln!("error: {}: {reason}", path.display());
                }
                self.errors
                    .push(json!({"file": path.display().to_string(), "error": reason}));
                return;
            }
        };
        if self.json {
            let separator = if self.results == 0 { "" } else { "," };
            print!("{separator}\n    {}", indented(&to_json(&row), 4));
        } else {
            println!("{}", line(&row));
            for warning in &row.warnings {
                if self.warned.insert(warning.clone()) {
                    eprintln!("warning: {warning}");
                }
            }
        }
        self.results += 1;
        // A JSON element's last line has no newline yet: show it now.
        let _ = std::io::stdout().flush();
    }

    /// Ends the output (the JSON document's errors and closing).
    pub fn finish(&self, stopped: Option<&str>) {
        if !self.json {
            return;
        }
        let errors = serde_json::Value::Array(self.errors.clone());
        let close = if self.results == 0 { "]" } else { "\n  ]" };
        print!("{close},\n  \"errors\": {}", indented(&errors, 2));
        if let Some(stopped) = stopped {
            print!(",\n  \"stopped\": {}", json!(stopped));
        }
        println!("\n}}");
    }
}

/// `value` pretty-printed, its lines after the first indented by `by` spaces.
fn indented(value: &serde_json::Value, by: usize) -> String {
    let text = serde_json::to_string_pretty(value).expect("JSON values serialise");
    text.replace('\n', &format!("\n{}", " ".repeat(by)))
}

/// A classified file as one tab-separated line.
fn line(row: &pb::Classification) -> String {
    let probabilities: Vec<String> = row
        .probabilities
        .iter()
        .map(|p| format!("{}={:.4}", p.label, p.probability))
        .collect();
    let model = row.model.clone().unwrap_or_default();
    format!(
        "{}\t{}\t{:.4}\t[{}]\tmodel={} v{} sha256={}",
        row.image_id,
        row.label,
        row.probability,
        probabilities.join(" "),
        model.name,
        model.version,
        &model.sha256[..model.sha256.len().min(12)]
    )
}

pub(super) fn to_json(row: &pb::Classification) -> serde_json::Value {
    let model = row.model.clone().unwrap_or_default();
    let timing = row.timing.unwrap_or_default();
    json!({
        "file": row.image_id,
        "label": row.label,
        "probability": row.probability,
        "probabilities": row.probabilities.iter().map(|p| (p.label.clone(), json!(p.probability))).collect::<serde_json::Map<_, _>>(),
        "model": {
            "name": model.name,
            "version": model.version,
            "sha256": model.sha256,
            "clinically_trained": model.clinically_trained,
        },
        "batch_size": row.batch_size,
        "timing": {
            "queue_seconds": timing.queue_seconds,
            "preprocess_seconds": timing.preprocess_seconds,
            "inference_seconds": timing.inference_seconds,
        },
        "warnings": row.warnings,
        "dicom": row.dicom.as_ref().map(|d| json!({
            "study_instance_uid": d.study_instance_uid,
            "series_instance_uid": d.series_instance_uid,
            "sop_instance_uid": d.sop_instance_uid,
        })),
    })
}
