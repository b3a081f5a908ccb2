//! The spool: received instances on disk, bounded, grouped into jobs (one per called AE title and
//! study), until their results are delivered.
//!
//! ```text
//! <spool>/incoming/<n>.part        an instance being received (gone at restart)
//! <spool>/jobs/<job>/job.json      called and calling AE titles, Study Instance UID
//! <spool>/jobs/<job>/<sop>.dcm     a received instance, Part 10
//! ```
//!
//! An instance is written to `incoming/` as it arrives (never held whole in memory), synced, and
//! renamed into its job when complete. Instances of an association that ends without a release
//! (aborted, cut, timed out) are removed: nothing half-sent is processed.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::metrics;

/// Longest wait before a put-off study is tried again.
const MAX_DEFERRAL: Duration = Duration::from_secs(60);

/// A job's lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Taking instances; processed once stable.
    Receiving,
    Processing,
    /// Results in the outbox; removed when they are delivered.
    Delivering,
}

/// What a job is about (its `job.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobInfo {
    pub id: String,
    pub called: String,
    pub calling: String,
    pub study: String,
}

#[derive(Debug)]
struct Job {
    info: JobInfo,
    phase: Phase,
    last: Instant,
    /// Associations still open that stored into this job.
    senders: HashSet<u64>,
    /// Associations that stored into it and were released.
    released: bool,
    bytes: u64,
    /// Times processing was put off (the server busy or not serving), and not before when again.
    deferrals: u32,
    not_before: Instant,
}

/// An instance stored by an association, until the association ends.
#[derive(Debug)]
struct Stored {
    job: String,
    path: PathBuf,
    bytes: u64,
}

#[derive(Debug, Default)]
struct State {
    jobs: HashMap<String, Job>,
    /// (called AE, study) → the job taking its instances.
    open: HashMap<(String, String), String>,
    associations: HashMap<u64, Vec<Stored>>,
}

/// Why an instance could not be spooled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpoolError {
    /// The size cap is reached.
    Full,
    Io(String),
}

/// The spool.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    cap: u64,
    used: AtomicU64,
    next: AtomicU64,
    state: Mutex<State>,
    /// Woken when an association is released: its studies may be ready.
    pub released: tokio::sync::Notify,
}

/// An instance being received.
#[derive(Debug)]
pub struct Incoming {
    path: PathBuf,
    file: Option<std::fs::File>,
    written: u64,
    spool: Arc<Spool>,
}

/// The identifiers of a received instance, from its header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceIds {
    pub study: String,
    pub series: String,
    pub sop_instance: String,
}

fn io(context: &str, path: &Path, e: std::io::Error) -> SpoolError {
    SpoolError::Io(format!("{context} {}: {e}", path.display()))
}

impl Spool {
    /// Opens (creating) the spool; removes partial instances and reloads the jobs a previous run
    /// left, as released and waiting for stability.
    pub fn open(dir: &Path, cap: u64) -> Result<Arc<Spool>, String> {
        let incoming = dir.join("incoming");
        let jobs = dir.join("jobs");
        let _ = std::fs::remove_dir_all(&incoming);
        for d in [&incoming, &jobs] {
            std::fs::create_dir_all(d)
                .map_err(|e| format!("--dicom-spool-dir: cannot create {}: {e}", d.display()))?;
        }
        let mut state = State::default();
        let mut used = 0;
        let entries = std::fs::read_dir(&jobs)
            .map_err(|e| format!("--dicom-spool-dir: cannot read {}: {e}", jobs.display()))?;
        for entry in entries.flatten() {
            let path = entry.path();
            let info = std::fs::read(path.join("job.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<JobInfo>(&b).ok());
            let Some(info) = info.filter(|i| path.file_name() == Some(i.id.as_ref())) else {
                tracing::warn!(dir = %path.display(), "spool: a job without a readable job.json; removed");
                let _ = std::fs::remove_dir_all(&path);
                continue;
            };
            let bytes = dir_bytes(&path);
            used += bytes;
            state
                .open
                .insert((info.called.clone(), info.study.clone()), info.id.clone());
            state.jobs.insert(
                info.id.clone(),
                Job {
                    info,
                    phase: Phase::Receiving,
                    last: Instant::now(),
                    senders: HashSet::new(),
                    released: true,
                    bytes,
                    deferrals: 0,
                    not_before: Instant::now(),
                },
            );
        }
        if !state.jobs.is_empty() {
            tracing::info!(
                jobs = state.jobs.len(),
                bytes = used,
                "spool: jobs from a previous run"
            );
        }
        metrics::dicom_spool(used, cap);
        Ok(Arc::new(Spool {
            dir: dir.to_path_buf(),
            cap,
            used: AtomicU64::new(used),
            next: AtomicU64::new(1),
            state: Mutex::new(state),
            released: tokio::sync::Notify::new(),
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("spool lock")
    }

    /// The size cap, in bytes.
    pub fn cap(&self) -> u64 {
        self.cap
    }

    pub fn used(&self) -> u64 {
        self.used.load(Ordering::SeqCst)
    }

    fn add(&self, bytes: u64) -> Result<(), SpoolError> {
        let before = self.used.fetch_add(bytes, Ordering::SeqCst);
        if before + bytes > self.cap {
            self.used.fetch_sub(bytes, Ordering::SeqCst);
            return Err(SpoolError::Full);
        }
        metrics::dicom_spool(before + bytes, self.cap);
        Ok(())
    }

    fn release_bytes(&self, bytes: u64) {
        let before = self
            .used
            .fetch_sub(bytes.min(self.used()), Ordering::SeqCst);
        metrics::dicom_spool(before.saturating_sub(bytes), self.cap);
    }

    /// Starts receiving an instance: its Part 10 header (`meta`, with preamble) is written first.
    pub fn incoming(self: &Arc<Self>, meta: &[u8]) -> Result<Incoming, SpoolError> {
        let n = self.next.fetch_add(1, Ordering::SeqCst);
        let path = self.dir.join("incoming").join(format!("{n}.part"));
        let file = std::fs::File::create(&path).map_err(|e| io("cannot create", &path, e))?;
        let mut incoming = Incoming {
            path,
            file: Some(file),
            written: 0,
            spool: self.clone(),
        };
        incoming.write(meta)?;
        Ok(incoming)
    }

    /// Files a complete instance into the job of (`called`, its study): the association `assoc`
    /// holds it until it ends.
    pub fn commit(
        &self,
        mut incoming: Incoming,
        assoc: u64,
        called: &str,
        calling: &str,
        ids: &InstanceIds,
    ) -> Result<(), SpoolError> {
        // Synced when the association is released (`sync_association`), before the release is
        // answered: an association that does not end in a release loses its instances anyway.
        drop(
            incoming
                .file
                .take()
                .expect("an incoming instance has its file"),
        );
        let mut state = self.lock();
        let key = (called.to_string(), ids.study.clone());
        let job_id = match state.open.get(&key) {
            Some(id)
                if state
                    .jobs
                    .get(id)
                    .is_some_and(|j| j.phase == Phase::Receiving) =>
            {
                id.clone()
            }
            _ => {
                let id = format!(
                    "{}-{}",
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap_or_default()
                        .as_millis(),
                    self.next.fetch_add(1, Ordering::SeqCst)
                );
                let info = JobInfo {
                    id: id.clone(),
                    called: called.to_string(),
                    calling: calling.to_string(),
                    study: ids.study.clone(),
                };
                let dir = self.dir.join("jobs").join(&id);
                std::fs::create_dir_all(&dir).map_err(|e| io("cannot create", &dir, e))?;
                write_synced(
                    &dir.join("job.json"),
                    &serde_json::to_vec(&info).expect("job info serialises"),
                )
                .map_err(|e| io("cannot write", &dir, e))?;
                state.open.insert(key, id.clone());
                state.jobs.insert(
                    id.clone(),
                    Job {
                        info,
                        phase: Phase::Receiving,
                        last: Instant::now(),
                        senders: HashSet::new(),
                        released: false,
                        bytes: 0,
                        deferrals: 0,
                        not_before: Instant::now(),
                    },
                );
                id
            }
        };
        let target = self
            .dir
            .join("jobs")
            .join(&job_id)
            .join(format!("{}.dcm", ids.sop_instance));
        // The same SOP Instance again: the new copy replaces the old, whose bytes are released,
        // and whichever association stored the old copy (this one included) no longer holds it:
        // its end must neither count those bytes again nor remove the new copy.
        let replaced = std::fs::metadata(&target).map(|m| m.len()).ok();
        if replaced.is_some() {
            for stored in state.associations.values_mut() {
                stored.retain(|s| s.path != target);
            }
        }
        let replaced = replaced.unwrap_or(0);
        std::fs::rename(&incoming.path, &target).map_err(|e| io("cannot file", &target, e))?;
        let bytes = incoming.written;
        incoming.written = 0;
        let job = state
            .jobs
            .get_mut(&job_id)
            .expect("the job was just found or made");
        job.senders.insert(assoc);
        job.last = Instant::now();
        job.bytes = job.bytes + bytes - replaced.min(job.bytes);
        state.associations.entry(assoc).or_default().push(Stored {
            job: job_id,
            path: target,
            bytes,
        });
        drop(state);
        self.release_bytes(replaced);
        Ok(())
    }

    /// Makes what association `assoc` stored durable (files, then their directories): before its
    /// release is answered.
    pub fn sync_association(&self, assoc: u64) -> std::io::Result<()> {
        let paths: Vec<PathBuf> = self
            .lock()
            .associations
            .get(&assoc)
            .map(|s| s.iter().map(|s| s.path.clone()).collect())
            .unwrap_or_default();
        let mut dirs = HashSet::new();
        for path in &paths {
            std::fs::File::open(path)?.sync_data()?;
            if let Some(dir) = path.parent() {
                dirs.insert(dir.to_path_buf());
            }
        }
        for dir in dirs {
            std::fs::File::open(&dir)?.sync_all()?;
        }
        Ok(())
    }

    /// The association ended: released, its instances stay; otherwise they are removed.
    /// Returns how many were removed.
    pub fn association_ended(&self, assoc: u64, released: bool) -> usize {
        let mut state = self.lock();
        let stored = state.associations.remove(&assoc).unwrap_or_default();
        let mut freed = 0;
        let mut removed = 0;
        for s in &stored {
            if let Some(job) = state.jobs.get_mut(&s.job) {
                job.senders.remove(&assoc);
                if released {
                    job.released = true;
                } else if job.phase == Phase::Receiving && std::fs::remove_file(&s.path).is_ok() {
                    job.bytes = job.bytes.saturating_sub(s.bytes);
                    freed += s.bytes;
                    removed += 1;
                }
            }
        }
        // A job left with no instance and no sender goes.
        let empty: Vec<String> = state
            .jobs
            .values()
            .filter(|j| {
                j.phase == Phase::Receiving && j.senders.is_empty() && !j.released && j.bytes == 0
            })
            .map(|j| j.info.id.clone())
            .collect();
        for id in empty {
            if let Some(job) = state.jobs.remove(&id) {
                state.open.remove(&(job.info.called, job.info.study));
                let _ = std::fs::remove_dir_all(self.dir.join("jobs").join(&id));
            }
        }
        drop(state);
        self.release_bytes(freed);
        if released {
            self.released.notify_one();
        }
        removed
    }

    /// Jobs ready to process (no sender left, released, quiet for `wait`), now `Processing`.
    pub fn take_ready(&self, wait: Duration) -> Vec<JobInfo> {
        let mut state = self.lock();
        let now = Instant::now();
        let mut ready = Vec::new();
        for job in state.jobs.values_mut() {
            if job.phase == Phase::Receiving
                && job.senders.is_empty()
                && job.released
                && now.duration_since(job.last) >= wait
                && now >= job.not_before
            {
                job.phase = Phase::Processing;
                ready.push(job.info.clone());
            }
        }
        for info in &ready {
            state
                .open
                .remove(&(info.called.clone(), info.study.clone()));
        }
        ready
    }

    /// A job whose results are in the outbox already (found at start-up).
    pub fn mark_delivering(&self, id: &str) -> bool {
        let mut state = self.lock();
        let Some(job) = state.jobs.get_mut(id) else {
            return false;
        };
        job.phase = Phase::Delivering;
        let key = (job.info.called.clone(), job.info.study.clone());
        if state.open.get(&key).map(String::as_str) == Some(id) {
            state.open.remove(&key);
        }
        true
    }

    /// Processing could not run now (the server is busy, warming up or draining): back to
    /// waiting, 1 s, 2 s, 4 s… (at most a minute) before the next try; a shutdown (`backoff`
    /// false) leaves it ready for the next start.
    pub fn retry_later(&self, id: &str, backoff: bool) {
        let mut state = self.lock();
        if let Some(job) = state.jobs.get_mut(id) {
            job.phase = Phase::Receiving;
            if backoff {
                job.deferrals = job.deferrals.saturating_add(1);
                let wait = Duration::from_secs(1 << (job.deferrals - 1).min(6)).min(MAX_DEFERRAL);
                job.not_before = Instant::now() + wait;
            }
        }
    }

    /// The instances of a job.
    pub fn instance_paths(&self, id: &str) -> Vec<PathBuf> {
        let dir = self.dir.join("jobs").join(id);
        let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|x| x == "dcm"))
                    .collect()
            })
            .unwrap_or_default();
        paths.sort();
        paths
    }

    /// Removes a job and its instances (its results are delivered, or there are none).
    pub fn remove(&self, id: &str) {
        let mut state = self.lock();
        let job = state.jobs.remove(id);
        if let Some(job) = &job {
            let key = (job.info.called.clone(), job.info.study.clone());
            if state.open.get(&key).map(String::as_str) == Some(id) {
                state.open.remove(&key);
            }
        }
        drop(state);
        let dir = self.dir.join("jobs").join(id);
        let bytes = job.map_or_else(|| dir_bytes(&dir), |j| j.bytes);
        let _ = std::fs::remove_dir_all(&dir);
        self.release_bytes(bytes);
    }

    /// Every job's id and phase (tests, start-up).
    pub fn jobs(&self) -> Vec<(String, Phase)> {
        self.lock()
            .jobs
            .values()
            .map(|j| (j.info.id.clone(), j.phase))
            .collect()
    }
}

impl Incoming {
    /// Appends received bytes; `Full` when the spool's cap would be passed.
    pub fn write(&mut self, data: &[u8]) -> Result<(), SpoolError> {
        self.spool.add(data.len() as u64)?;
        self.written += data.len() as u64;
        let file = self
            .file
            .as_mut()
            .expect("an incoming instance has its file");
        file.write_all(data)
            .map_err(|e| io("cannot write", &self.path, e))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn bytes(&self) -> u64 {
        self.written
    }
}

impl Drop for Incoming {
    /// Not committed: the partial instance goes, and its bytes are free again.
    fn drop(&mut self) {
        if self.file.is_some() || self.written > 0 {
            self.file = None;
            let _ = std::fs::remove_file(&self.path);
            self.spool.release_bytes(self.written);
        }
    }
}

/// Writes a small file and syncs it.
pub fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(study: &str, sop: &str) -> InstanceIds {
        InstanceIds {
            study: study.into(),
            series: "1.2.3".into(),
            sop_instance: sop.into(),
        }
    }

    #[test]
    fn instances_join_their_study_job_and_wait_for_release_and_quiet() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        for sop in ["1.1", "1.2"] {
            let mut inc = spool.incoming(b"meta").unwrap();
            inc.write(b"data").unwrap();
            spool
                .commit(inc, 1, "AI", "PACS", &ids("9.9", sop))
                .unwrap();
        }
        assert_eq!(spool.used(), 16);
        assert!(
            spool.take_ready(Duration::ZERO).is_empty(),
            "the association is still open"
        );
        spool.association_ended(1, true);
        assert!(
            spool.take_ready(Duration::from_secs(3600)).is_empty(),
            "not quiet yet"
        );
        let ready = spool.take_ready(Duration::ZERO);
        assert_eq!(ready.len(), 1);
        assert_eq!(spool.instance_paths(&ready[0].id).len(), 2);
        spool.remove(&ready[0].id);
        assert_eq!(spool.used(), 0);
    }

    #[test]
    fn an_aborted_association_leaves_nothing_and_a_full_spool_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 10).unwrap();
        let mut inc = spool.incoming(b"meta").unwrap();
        inc.write(b"da").unwrap();
        spool
            .commit(inc, 7, "AI", "PACS", &ids("9.9", "1.1"))
            .unwrap();
        let mut partial = spool.incoming(b"meta").unwrap();
        assert_eq!(partial.write(b"toolong"), Err(SpoolError::Full));
        drop(partial);
        assert_eq!(spool.used(), 6);
        assert_eq!(spool.association_ended(7, false), 1);
        assert_eq!(spool.used(), 0);
        assert!(spool.jobs().is_empty());
        assert_eq!(
            std::fs::read_dir(dir.path().join("incoming"))
                .unwrap()
                .count(),
            0
        );
    }

    #[test]
    fn an_instance_sent_again_is_counted_once_whoever_sent_it() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        let store = |assoc, data: &[u8]| {
            let mut inc = spool.incoming(b"meta").unwrap();
            inc.write(data).unwrap();
            spool
                .commit(inc, assoc, "AI", "PACS", &ids("9.9", "1.1"))
                .unwrap();
        };
        // Twice by one association, which aborts: nothing left, nothing counted.
        store(1, b"da");
        store(1, b"data, again");
        assert_eq!(spool.used(), 15);
        assert_eq!(spool.association_ended(1, false), 1);
        assert_eq!(spool.used(), 0);
        assert!(spool.jobs().is_empty());
        // Sent by 2, then again by 3, which is released; 2 aborts: 3's copy stays, counted once.
        store(2, b"da");
        store(3, b"data, again");
        spool.association_ended(3, true);
        assert_eq!(spool.association_ended(2, false), 0);
        let job = &spool.jobs()[0].0;
        assert_eq!(spool.instance_paths(job).len(), 1);
        assert_eq!(spool.used(), 15);
    }

    #[test]
    fn a_put_off_job_waits_before_it_is_ready_again() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        let inc = spool.incoming(b"meta").unwrap();
        spool
            .commit(inc, 1, "AI", "PACS", &ids("9.9", "1.1"))
            .unwrap();
        spool.association_ended(1, true);
        let job = spool.take_ready(Duration::ZERO).pop().unwrap();
        // Shut down: ready again at once (for the next start).
        spool.retry_later(&job.id, false);
        assert_eq!(spool.take_ready(Duration::ZERO).len(), 1);
        // Busy: not before a second has passed, not in a tight loop.
        spool.retry_later(&job.id, true);
        assert!(spool.take_ready(Duration::ZERO).is_empty());
    }

    #[test]
    fn jobs_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let spool = Spool::open(dir.path(), 1 << 20).unwrap();
            let inc = spool.incoming(b"meta").unwrap();
            spool
                .commit(inc, 1, "AI", "PACS", &ids("9.9", "1.1"))
                .unwrap();
            let _left = spool.incoming(b"partial").unwrap();
            std::mem::forget(_left);
        }
        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        let job = dir.path().join("jobs").join(&spool.jobs()[0].0);
        assert_eq!(spool.used(), dir_bytes(&job));
        assert_eq!(spool.take_ready(Duration::ZERO).len(), 1);
        assert_eq!(
            std::fs::read_dir(dir.path().join("incoming"))
                .unwrap()
                .count(),
            0
        );
    }
}
