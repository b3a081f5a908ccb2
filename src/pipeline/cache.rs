//! The result cache of one served model version (opt-in: `[cache] max_kib` in `model.toml`).
//! A PACS retries: the same instance is often sent again. A result is kept under the SHA-256 of
//! (model SHA-256, `model.toml` SHA-256 — the preprocessing configuration —, the input's
//! declared format, the SHA-256 of the input's bytes), bounded in bytes with least-recently-used
//! eviction, and a hit answers without decoding or touching the queue. Only the digest of the
//! input is kept, never the input; a new model version (or a new `model.toml`) is a new
//! `ServedModel` with a cache of its own, and its key differs anyway, so a stale result cannot
//! be returned.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use sha2::{Digest, Sha256};

use super::ImageInput;
use crate::input::dicom::DicomIds;
use crate::metrics::CacheMetrics;
use crate::model::task::Classification;

pub type Key = [u8; 32];

/// What a hit answers with.
#[derive(Debug, Clone, PartialEq)]
pub struct Cached {
    pub classification: Classification,
    pub dicom: Option<DicomIds>,
    pub warnings: Vec<String>,
}

impl Cached {
    /// Bytes the entry takes, roughly (key, bookkeeping, the heap parts).
    fn size(&self) -> usize {
        let dicom = self.dicom.as_ref().map_or(0, |d| {
            d.study_instance_uid.len() + d.series_instance_uid.len() + d.sop_instance_uid.len() + 72
        });
        let warnings: usize = self.warnings.iter().map(|w| w.len() + 24).sum();
        32 + 96 + self.classification.probabilities.len() * 4 + dicom + warnings
    }
}

struct Lru {
    entries: HashMap<Key, (Cached, u64)>,
    /// Recency: tick → key, oldest first.
    order: BTreeMap<u64, Key>,
    bytes: usize,
    tick: u64,
}

/// A byte-bounded LRU of results.
pub struct ResultCache {
    max_bytes: usize,
    model_sha256: String,
    toml_sha256: String,
    lru: Mutex<Lru>,
    metrics: CacheMetrics,
}

impl std::fmt::Debug for ResultCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResultCache")
            .field("max_bytes", &self.max_bytes)
            .finish_non_exhaustive()
    }
}

impl ResultCache {
    pub fn new(
        max_bytes: usize,
        model_sha256: &str,
        toml_sha256: &str,
        metrics: CacheMetrics,
    ) -> Self {
        ResultCache {
            max_bytes,
            model_sha256: model_sha256.to_string(),
            toml_sha256: toml_sha256.to_string(),
            lru: Mutex::new(Lru {
                entries: HashMap::new(),
                order: BTreeMap::new(),
                bytes: 0,
                tick: 0,
            }),
            metrics,
        }
    }

    /// The key of one input for this model version.
    pub fn key(&self, input: &ImageInput) -> Key {
        let mut outer = Sha256::new();
        for part in [&self.model_sha256, &self.toml_sha256] {
            outer.update((part.len() as u64).to_le_bytes());
            outer.update(part.as_bytes());
        }
        let digest: [u8; 32] = match input {
            ImageInput::Encoded { data, encoding } => {
                outer.update(format!("encoded:{encoding:?}").as_bytes());
                Sha256::digest(data).into()
            }
            ImageInput::Tensor(values) => {
                outer.update(b"tensor");
                let mut inner = Sha256::new();
                for v in values {
                    inner.update(v.to_le_bytes());
                }
                inner.finalize().into()
            }
        };
        outer.update(digest);
        outer.finalize().into()
    }

    /// The result kept for `key`, now the most recently used.
    pub fn get(&self, key: &Key) -> Option<Cached> {
        let mut lru = self.lru.lock().expect("cache lock");
        lru.tick += 1;
        let tick = lru.tick;
        let Some((cached, used)) = lru.entries.get_mut(key) else {
            self.metrics.miss();
            return None;
        };
        let (old, value) = (*used, cached.clone());
        *used = tick;
        lru.order.remove(&old);
        lru.order.insert(tick, *key);
        self.metrics.hit();
        Some(value)
    }

    /// Keeps a result, evicting the least recently used until it fits.
    pub fn insert(&self, key: Key, value: Cached) {
        let size = value.size();
        if size > self.max_bytes {
            return;
        }
        let mut lru = self.lru.lock().expect("cache lock");
        if let Some((old, used)) = lru.entries.remove(&key) {
            lru.bytes -= old.size();
            lru.order.remove(&used);
        }
        let mut evicted = 0;
        while lru.bytes + size > self.max_bytes {
            let Some((_, oldest)) = lru.order.pop_first() else {
                break;
            };
            if let Some((gone, _)) = lru.entries.remove(&oldest) {
                lru.bytes -= gone.size();
                evicted += 1;
            }
        }
        lru.tick += 1;
        let tick = lru.tick;
        lru.order.insert(tick, key);
        lru.entries.insert(key, (value, tick));
        lru.bytes += size;
        self.metrics.stored(lru.bytes, lru.entries.len(), evicted);
    }

    /// Entries and bytes held.
    pub fn usage(&self) -> (usize, usize) {
        let lru = self.lru.lock().expect("cache lock");
        (lru.entries.len(), lru.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::Encoding;

    fn cache(max_bytes: usize, sha: &str) -> ResultCache {
        ResultCache::new(max_bytes, sha, "toml", CacheMetrics::new("m", "1"))
    }

    fn input(bytes: &[u8]) -> ImageInput {
        ImageInput::Encoded {
            data: bytes::Bytes::copy_from_slice(bytes),
            encoding: Encoding::Png,
        }
    }

    fn result(best: usize) -> Cached {
        Cached {
            classification: Classification {
                best,
                probabilities: vec![0.25, 0.75],
            },
            dicom: None,
            warnings: Vec::new(),
        }
    }

    #[test]
    fn hit_miss_and_lru_eviction_by_bytes() {
        let one = result(0).size();
        let c = cache(3 * one, "model-a");
        let keys: Vec<Key> = (0u8..4).map(|i| c.key(&input(&[i; 16]))).collect();
        assert!(c.get(&keys[0]).is_none(), "miss on an empty cache");
        for (i, k) in keys.iter().take(3).enumerate() {
            c.insert(*k, result(i));
        }
        assert_eq!(c.usage(), (3, 3 * one));
        // Touch 0: 1 becomes the least recently used.
        assert_eq!(c.get(&keys[0]), Some(result(0)));
        c.insert(keys[3], result(3));
        assert_eq!(c.usage(), (3, 3 * one), "bounded in bytes");
        assert!(
            c.get(&keys[1]).is_none(),
            "the least recently used was evicted"
        );
        assert_eq!(c.get(&keys[0]), Some(result(0)));
        assert_eq!(c.get(&keys[2]), Some(result(2)));
        assert_eq!(c.get(&keys[3]), Some(result(3)));
    }

    #[test]
    fn keys_separate_models_configs_formats_and_inputs() {
        let a = cache(1 << 20, "model-a");
        let b = cache(1 << 20, "model-b");
        let c = ResultCache::new(
            1 << 20,
            "model-a",
            "other-toml",
            CacheMetrics::new("m", "1"),
        );
        let png = input(b"same bytes");
        let jpeg = ImageInput::Encoded {
            data: bytes::Bytes::from_static(b"same bytes"),
            encoding: Encoding::Jpeg,
        };
        assert_eq!(a.key(&png), a.key(&input(b"same bytes")));
        assert_ne!(a.key(&png), b.key(&png), "model SHA-256 in the key");
        assert_ne!(a.key(&png), c.key(&png), "model.toml in the key");
        assert_ne!(a.key(&png), a.key(&jpeg), "declared format in the key");
        assert_ne!(a.key(&png), a.key(&input(b"other bytes")));
    }
}
