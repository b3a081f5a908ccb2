//! The audit trail: one JSON line per call, written by one thread to a file (appended, written
//! whole with one `write`, reopened when the path stops naming the open file, as after
//! `logrotate`'s rename) or to standard output (`-`).
//!
//! A record holds: time, caller (token name or certificate subject) and how it was proved,
//! peer address, front end and method, model name, version and SHA-256, number of images,
//! outcome (gRPC code name or HTTP status), latency, and the DICOM Study/Series/SOP Instance
//! UIDs of DICOM input. Never patient data, image bytes or image ids.
//!
//! What the pipeline learns during a call (model, images, UIDs) reaches the record through a
//! task-local [`CallFacts`] that the security layer scopes around the call.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::metrics;

/// Records waiting for the writer thread; beyond, a record is counted as a write failure.
const BACKLOG: usize = 65_536;
/// Most DICOM instances listed in one record (a series call can carry many).
pub const MAX_DICOM_REFS: usize = 1024;

/// Where the records go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Stdout,
    File(PathBuf),
}

/// The audit sink: a writer thread fed by a bounded channel.
#[derive(Debug)]
pub struct Audit {
    tx: SyncSender<Vec<u8>>,
    healthy: Arc<AtomicBool>,
    fail_closed: bool,
}

/// A DICOM instance named in a record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DicomRef {
    pub study: String,
    pub series: String,
    pub sop_instance: String,
}

/// The model a call used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModelRef {
    pub name: String,
    pub version: String,
    pub sha256: String,
}

/// What a call's handling learned, for its record.
#[derive(Debug, Default)]
pub struct Facts {
    pub model: Option<ModelRef>,
    pub images: u64,
    pub dicom: Vec<DicomRef>,
    pub dicom_truncated: bool,
    /// Why the call was refused, as logs may show it (never caller text): for the rejection log.
    pub error: Option<String>,
}

/// The facts of the call being handled (shared with tasks the call spawns).
pub type CallFacts = Arc<Mutex<Facts>>;

tokio::task_local! {
    static FACTS: CallFacts;
}

/// Runs `future` with `facts` as the current call's facts.
pub async fn scope<F: Future>(facts: CallFacts, future: F) -> F::Output {
    FACTS.scope(facts, future).await
}

/// Runs `future` in `facts`' scope when there are facts (see [`current`]).
pub async fn maybe_scope<F: Future>(facts: Option<CallFacts>, future: F) -> F::Output {
    match facts {
        Some(facts) => FACTS.scope(facts, future).await,
        None => future.await,
    }
}

/// The current call's facts (to carry into a task the handler spawns).
pub fn current() -> Option<CallFacts> {
    FACTS.try_with(Arc::clone).ok()
}

fn with(f: impl FnOnce(&mut Facts)) {
    let _ = FACTS.try_with(|facts| f(&mut facts.lock().expect("audit facts lock")));
}

/// The call uses this model version (the first one named stays: a stream uses one model).
pub fn note_model(name: &str, version: &str, sha256: &str) {
    with(|facts| {
        facts.model.get_or_insert_with(|| ModelRef {
            name: name.to_string(),
            version: version.to_string(),
            sha256: sha256.to_string(),
        });
    });
}

/// The call carries `n` more images (or series instances).
pub fn note_images(n: usize) {
    with(|facts| facts.images += n as u64);
}

/// The call classified this DICOM instance.
pub fn note_dicom(study: &str, series: &str, sop_instance: &str) {
    with(|facts| {
        if facts.dicom.len() >= MAX_DICOM_REFS {
            facts.dicom_truncated = true;
            return;
        }
        facts.dicom.push(DicomRef {
            study: study.to_string(),
            series: series.to_string(),
            sop_instance: sop_instance.to_string(),
        });
    });
}

/// The call is refused for this reason (the first one noted stays). `message` is the error's
/// log form: it never quotes the caller.
pub fn note_error(message: &str) {
    with(|facts| {
        facts.error.get_or_insert_with(|| message.to_string());
    });
}

/// One record, as written.
#[derive(Debug, Serialize)]
pub struct Record<'a> {
    /// RFC 3339, UTC, milliseconds.
    pub time: String,
    pub caller: &'a str,
    /// `token`, `certificate` or `none`.
    pub auth: &'static str,
    pub peer: Option<String>,
    pub front_end: &'static str,
    /// `package.Service/Method` for gRPC, `METHOD /route/{template}` for the HTTP API: a declared
    /// route, never the path as sent.
    pub method: &'a str,
    pub model: Option<&'a ModelRef>,
    pub images: u64,
    /// gRPC code name (`OK`, `INVALID_ARGUMENT`, …) or, for REST, the HTTP status.
    pub outcome: String,
    pub latency_ms: f64,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    pub dicom: &'a [DicomRef],
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub dicom_truncated: bool,
}

impl Audit {
    /// Opens the sink; an unwritable target is a start-up error naming it.
    pub fn open(target: Target, fail_closed: bool) -> Result<Arc<Self>, String> {
        let writer = Writer::open(target)?;
        let (tx, rx) = sync_channel(BACKLOG);
        let healthy = Arc::new(AtomicBool::new(true));
        let flag = healthy.clone();
        std::thread::Builder::new()
            .name("audit".into())
            .spawn(move || writer.run(rx, flag))
            .map_err(|e| format!("--audit-log: cannot start the writer thread: {e}"))?;
        Ok(Arc::new(Audit {
            tx,
            healthy,
            fail_closed,
        }))
    }

    /// Whether calls must be refused: fail-closed, and the last write failed.
    pub fn refusing(&self) -> bool {
        self.fail_closed && !self.healthy.load(Ordering::SeqCst)
    }

    /// Queues one record.
    pub fn write(&self, record: &Record<'_>) {
        let mut line = match serde_json::to_vec(record) {
            Ok(line) => line,
            Err(e) => {
                tracing::error!(error = %e, "audit record not serialisable");
                metrics::audit_write_failed();
                return;
            }
        };
        line.push(b'\n');
        match self.tx.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.healthy.store(false, Ordering::SeqCst);
                metrics::audit_write_failed();
                tracing::error!(
                    "audit record lost: the writer is {BACKLOG} records behind or gone"
                );
            }
        }
    }
}

struct Writer {
    target: Target,
    file: Option<File>,
}

impl Writer {
    fn open(target: Target) -> Result<Self, String> {
        let file = match &target {
            Target::Stdout => None,
            Target::File(path) => Some(open_append(path)?),
        };
        Ok(Writer { target, file })
    }

    fn run(mut self, rx: Receiver<Vec<u8>>, healthy: Arc<AtomicBool>) {
        let mut failing = false;
        for line in rx {
            match self.write(&line) {
                Ok(()) => {
                    metrics::audit_written();
                    if failing {
                        tracing::warn!("audit trail writable again");
                        failing = false;
                    }
                    healthy.store(true, Ordering::SeqCst);
                }
                Err(e) => {
                    metrics::audit_write_failed();
                    healthy.store(false, Ordering::SeqCst);
                    if !failing {
                        tracing::error!(error = %e, "audit record could not be written");
                        failing = true;
                    }
                    // Next time, open the path afresh.
                    if matches!(self.target, Target::File(_)) {
                        self.file = None;
                    }
                }
            }
        }
    }

    fn write(&mut self, line: &[u8]) -> std::io::Result<()> {
        match &self.target {
            Target::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(line)?;
                out.flush()
            }
            Target::File(path) => {
                if self.file.as_ref().is_none_or(|f| moved(path, f)) {
                    self.file = Some(open_append(path).map_err(std::io::Error::other)?);
                }
                let file = self.file.as_mut().expect("opened above");
                // One write of the whole line (O_APPEND): concurrent readers never see half a record.
                file.write_all(line)
            }
        }
    }
}

fn open_append(path: &std::path::Path) -> Result<File, String> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| {
            format!(
                "--audit-log {}: cannot open for appending: {e}",
                path.display()
            )
        })
}

/// Whether `path` no longer names the open file (renamed or deleted by a log rotation).
fn moved(path: &std::path::Path, file: &File) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        match (std::fs::metadata(path), file.metadata()) {
            (Ok(a), Ok(b)) => a.ino() != b.ino() || a.dev() != b.dev(),
            _ => true,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (path, file);
        false
    }
}

/// Now as RFC 3339 UTC with milliseconds.
pub fn now_rfc3339() -> String {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    rfc3339_utc(since_epoch.as_millis() as i64)
}

/// An instant (milliseconds since the Unix epoch, negative before it) as RFC 3339 UTC with
/// milliseconds: `2026-11-27T09:17:23.123Z`.
pub fn rfc3339_utc(unix_ms: i64) -> String {
    let (secs, millis) = (unix_ms.div_euclid(1000), unix_ms.rem_euclid(1000));
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = crate::report::sr::civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        // Instants and their civil dates from Python's datetime (an independent calendar):
        // the epoch, leap days (2000 is a leap year, 2100 is not), year and day ends, before the
        // epoch.
        for (unix_ms, expected) in [
            (0, "1970-01-01T00:00:00.000Z"),
            (-1, "1969-12-31T23:59:59.999Z"),
            (951_782_400_000, "2000-02-29T00:00:00.000Z"),
            (951_868_800_000, "2000-03-01T00:00:00.000Z"),
            (1_709_210_096_789, "2024-02-29T12:34:56.789Z"),
            (1_798_761_599_999, "2026-12-31T23:59:59.999Z"),
            (1_798_761_600_000, "2027-01-01T00:00:00.000Z"),
            (4_107_542_399_999, "2100-02-28T23:59:59.999Z"),
            (4_107_542_400_000, "2100-03-01T00:00:00.000Z"),
        ] {
            assert_eq!(rfc3339_utc(unix_ms), expected, "{unix_ms}");
        }
        // Now is now: between two readings of the clock (strings of one format sort as times).
        let ms = || {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis() as i64
        };
        let before = rfc3339_utc(ms());
        let now = now_rfc3339();
        let after = rfc3339_utc(ms());
        assert!(before <= now && now <= after, "{before} {now} {after}");
    }

    #[test]
    fn unwritable_path_is_a_startup_error() {
        let e =
            Audit::open(Target::File("/nonexistent-dir/audit.jsonl".into()), false).unwrap_err();
        assert!(e.contains("/nonexistent-dir/audit.jsonl"), "{e}");
    }

    #[test]
    fn rotation_reopens_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let mut writer = Writer::open(Target::File(path.clone())).unwrap();
        writer.write(b"one\n").unwrap();
        std::fs::rename(&path, dir.path().join("audit.jsonl.1")).unwrap();
        writer.write(b"two\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("audit.jsonl.1")).unwrap(),
            "one\n"
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "two\n");
    }

    #[tokio::test]
    async fn facts_reach_the_scope_only() {
        note_images(3); // outside any call: ignored
        let facts = CallFacts::default();
        scope(facts.clone(), async {
            note_model("m", "1", "abc");
            note_model("other", "2", "def");
            note_images(2);
            note_dicom("1.2", "1.2.3", "1.2.3.4");
        })
        .await;
        let facts = facts.lock().unwrap();
        assert_eq!(facts.model.as_ref().unwrap().name, "m");
        assert_eq!(facts.images, 2);
        assert_eq!(facts.dicom.len(), 1);
    }
}
