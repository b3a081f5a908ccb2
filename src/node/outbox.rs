//! The outbox: results waiting for delivery, on disk, bounded, surviving restarts.
//!
//! ```text
//! <outbox>/<job>.tmp/             a job's results being written (gone at restart)
//! <outbox>/<job>/<sop>.dcm        results to deliver (the directory's presence: the job is done)
//! <outbox>/delivered.log          SOP Instance UIDs delivered since the outbox was last empty
//! ```
//!
//! A job's results appear at once (written into `<job>.tmp`, synced, renamed). After the
//! destination accepts an object its SOP Instance UID is appended to the ledger (synced) before
//! the file is removed, so a restart at any point never sends a delivered object again.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use crate::metrics;
use crate::node::spool::write_synced;

/// One result to deliver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub job: String,
    pub sop_instance: String,
    pub path: PathBuf,
    pub bytes: u64,
    pub created: SystemTime,
}

#[derive(Debug, Default)]
struct State {
    /// Job → its undelivered results, oldest job first (ids start with a timestamp).
    jobs: BTreeMap<String, Vec<Entry>>,
    bytes: u64,
    ledger: Option<std::fs::File>,
}

/// The outbox.
#[derive(Debug)]
pub struct Outbox {
    dir: PathBuf,
    cap: u64,
    state: Mutex<State>,
    pub changed: tokio::sync::Notify,
}

const LEDGER: &str = "delivered.log";

impl Outbox {
    /// Opens (creating) the outbox: drops half-written jobs, removes what the ledger says was
    /// delivered, and loads the rest.
    pub fn open(dir: &Path, cap: u64) -> Result<Outbox, String> {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("--dicom-outbox-dir: cannot create {}: {e}", dir.display()))?;
        let delivered: HashSet<String> = std::fs::read_to_string(dir.join(LEDGER))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect();
        let mut state = State::default();
        let entries = std::fs::read_dir(dir)
            .map_err(|e| format!("--dicom-outbox-dir: cannot read {}: {e}", dir.display()))?;
        for entry in entries.flatten() {
            let path = entry.path();
            let Some(name) = path
                .file_name()
                .and_then(|n| n.to_str())
                .map(str::to_string)
            else {
                continue;
            };
            if !path.is_dir() {
                continue;
            }
            if name.ends_with(".tmp") {
                let _ = std::fs::remove_dir_all(&path);
                continue;
            }
            let mut results = Vec::new();
            for file in std::fs::read_dir(&path).into_iter().flatten().flatten() {
                let fpath = file.path();
                let Some(sop) = fpath
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .map(str::to_string)
                else {
                    continue;
                };
                if delivered.contains(&sop) {
                    let _ = std::fs::remove_file(&fpath);
                    continue;
                }
                let meta = file.metadata().ok();
                results.push(Entry {
                    job: name.clone(),
                    sop_instance: sop,
                    path: fpath,
                    bytes: meta.as_ref().map_or(0, |m| m.len()),
                    created: meta
                        .and_then(|m| m.modified().ok())
                        .unwrap_or_else(SystemTime::now),
                });
            }
            results.sort_by(|a, b| a.path.cmp(&b.path));
            state.bytes += results.iter().map(|e| e.bytes).sum::<u64>();
            state.jobs.insert(name, results);
        }
        // Everything the ledger names is gone now: start it afresh.
        let ledger = std::fs::File::create(dir.join(LEDGER))
            .map_err(|e| format!("--dicom-outbox-dir: cannot write the ledger: {e}"))?;
        state.ledger = Some(ledger);
        let outbox = Outbox {
            dir: dir.to_path_buf(),
            cap,
            state: Mutex::new(state),
            changed: tokio::sync::Notify::new(),
        };
        outbox.export();
        Ok(outbox)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("outbox lock")
    }

    /// Whether a new job's results may be added (under the cap).
    pub fn has_room(&self) -> bool {
        self.lock().bytes < self.cap
    }

    /// The jobs present (start-up: their spool jobs are delivering).
    pub fn job_ids(&self) -> Vec<String> {
        self.lock().jobs.keys().cloned().collect()
    }

    /// Adds a job's results, all at once and durably. `results`: (SOP Instance UID, Part 10).
    pub fn commit(&self, job: &str, results: &[(String, Vec<u8>)]) -> std::io::Result<()> {
        let tmp = self.dir.join(format!("{job}.tmp"));
        let done = self.dir.join(job);
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)?;
        for (sop, bytes) in results {
            write_synced(&tmp.join(format!("{sop}.dcm")), bytes)?;
        }
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, &done)?;
        std::fs::File::open(&self.dir)?.sync_all()?;
        let now = SystemTime::now();
        let entries: Vec<Entry> = results
            .iter()
            .map(|(sop, bytes)| Entry {
                job: job.to_string(),
                sop_instance: sop.clone(),
                path: done.join(format!("{sop}.dcm")),
                bytes: bytes.len() as u64,
                created: now,
            })
            .collect();
        {
            let mut state = self.lock();
            state.bytes += entries.iter().map(|e| e.bytes).sum::<u64>();
            state.jobs.insert(job.to_string(), entries);
        }
        self.export();
        self.changed.notify_one();
        Ok(())
    }

    /// The oldest job and its undelivered results.
    pub fn next_job(&self) -> Option<(String, Vec<Entry>)> {
        self.next_job_where(|_| true)
    }

    /// The oldest job `ready` accepts, and its undelivered results.
    pub fn next_job_where(&self, ready: impl Fn(&str) -> bool) -> Option<(String, Vec<Entry>)> {
        self.lock()
            .jobs
            .iter()
            .find(|(k, _)| ready(k))
            .map(|(k, v)| (k.clone(), v.clone()))
    }

    /// The destination accepted `entry`: ledger first, then the file.
    pub fn delivered(&self, entry: &Entry) -> std::io::Result<()> {
        {
            let mut state = self.lock();
            let ledger = state.ledger.as_mut().expect("the ledger is open");
            ledger.write_all(format!("{}\n", entry.sop_instance).as_bytes())?;
            ledger.sync_data()?;
            if let Some(list) = state.jobs.get_mut(&entry.job) {
                list.retain(|e| e.path != entry.path);
            }
            state.bytes = state.bytes.saturating_sub(entry.bytes);
        }
        let _ = std::fs::remove_file(&entry.path);
        self.export();
        Ok(())
    }

    /// A job with nothing left to deliver: its directory goes (after its spool job).
    pub fn finish_job(&self, job: &str) {
        let mut state = self.lock();
        state.jobs.remove(job);
        let _ = std::fs::remove_dir_all(self.dir.join(job));
        if state.jobs.is_empty() {
            // Nothing left that the ledger could protect: start it afresh.
            if let Ok(f) = std::fs::File::create(self.dir.join(LEDGER)) {
                state.ledger = Some(f);
            }
        }
        drop(state);
        self.export();
    }

    /// Objects waiting, bytes, and the age of the oldest, in seconds.
    pub fn depth(&self) -> (usize, u64, f64) {
        let state = self.lock();
        let count = state.jobs.values().map(Vec::len).sum();
        let oldest = state
            .jobs
            .values()
            .flatten()
            .map(|e| e.created)
            .min()
            .and_then(|t| t.elapsed().ok())
            .map_or(0.0, |d| d.as_secs_f64());
        (count, state.bytes, oldest)
    }

    /// Updates the outbox gauges.
    pub fn export(&self) {
        let (count, bytes, oldest) = self.depth();
        metrics::dicom_outbox(count, bytes, oldest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_are_delivered_once_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        {
            let outbox = Outbox::open(dir.path(), 1 << 20).unwrap();
            outbox
                .commit(
                    "1-1",
                    &[
                        ("1.2.1".into(), b"sr".to_vec()),
                        ("1.2.2".into(), b"seg".to_vec()),
                    ],
                )
                .unwrap();
            let (job, entries) = outbox.next_job().unwrap();
            assert_eq!((job.as_str(), entries.len()), ("1-1", 2));
            // Delivered, then killed before anything else happened.
            outbox.delivered(&entries[0]).unwrap();
            // As if the kill came between the ledger and the file's removal.
            std::fs::write(&entries[0].path, b"sr").unwrap();
            std::fs::create_dir_all(dir.path().join("2-2.tmp")).unwrap();
        }
        let outbox = Outbox::open(dir.path(), 1 << 20).unwrap();
        let (job, entries) = outbox.next_job().unwrap();
        assert_eq!(job, "1-1");
        assert_eq!(
            entries
                .iter()
                .map(|e| e.sop_instance.as_str())
                .collect::<Vec<_>>(),
            ["1.2.2"],
            "the delivered object is not sent again"
        );
        assert!(
            !dir.path().join("2-2.tmp").exists(),
            "half-written jobs are dropped"
        );
        assert_eq!(outbox.depth().0, 1);
        outbox.delivered(&entries[0]).unwrap();
        outbox.finish_job("1-1");
        assert!(outbox.next_job().is_none());
        assert_eq!(outbox.depth(), (0, 0, 0.0));
    }

    #[test]
    fn the_cap_stops_new_jobs() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path(), 4).unwrap();
        assert!(outbox.has_room());
        outbox
            .commit("1-1", &[("1.1".into(), b"12345".to_vec())])
            .unwrap();
        assert!(!outbox.has_room());
    }
}
