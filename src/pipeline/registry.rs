//! Model name → the versions being served. Loads what the repository holds (each model's version
//! policy applied), and reloads on demand (SIGHUP, a poll): a new or changed version is loaded,
//! checked and warmed up off to the side, then swapped in atomically; in-flight work finishes on
//! the version it started on. A version that fails leaves the old one serving, is logged and
//! counted, and is listed with its error. A model whose directory disappears is unloaded.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use super::served::{BatchSettings, BatchingDefaults, ServedModel};
use crate::backend::{BackendFactory, Device};
use crate::error::{InferError, echo};
use crate::input::InputLimits;
use crate::metrics;
use crate::model::repository::{self, HashCache};
use crate::model::{BatchingOverrides, ModelConfig, ModelSpec, VersionPolicy};
use crate::state::ServingState;

/// Where the models come from.
#[derive(Debug, Clone)]
pub enum Source {
    /// Every `<dir>/<name>/model.toml` (`--model-repository`).
    Repository(PathBuf),
    /// One model directory (`--model-dir`), optionally pinned to one version.
    Single { dir: PathBuf, version: Option<u64> },
}

/// How the registry loads models.
pub struct RegistryConfig {
    pub source: Source,
    /// The model a request that names none gets (default: the only model).
    pub default_model: Option<String>,
    pub defaults: BatchingDefaults,
    /// Per-model batching overrides from the command line.
    pub overrides: HashMap<String, BatchingOverrides>,
    pub limits: InputLimits,
    pub max_images_per_request: usize,
    pub device: Device,
    /// Batch buffers' memory: page-locked on CUDA unless turned off (`--pinned-buffers`).
    pub host_memory: crate::backend::host::HostMemory,
    /// Batches measured to run within this are run in place (`--inline-run-us`).
    pub inline_run: std::time::Duration,
}

/// State of one version as `ListModels` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionState {
    Ready,
    Loading,
    Failed,
}

/// One version in a [`ModelStatus`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionStatus {
    pub version: u64,
    pub state: VersionState,
    /// SHA-256 of its `model.onnx` (when known).
    pub sha256: String,
    /// Why it failed to load.
    pub error: Option<String>,
}

/// One model as `ListModels` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelStatus {
    pub name: String,
    pub is_default: bool,
    pub policy: String,
    pub versions: Vec<VersionStatus>,
    /// Why its `model.toml` cannot be used (the loaded versions, if any, keep serving).
    pub error: Option<String>,
}

/// What `(model.toml, model.onnx)` a version was (or failed to be) loaded from.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fingerprint {
    toml_sha256: String,
    onnx_sha256: String,
}

struct Failure {
    fingerprint: Fingerprint,
    message: String,
}

#[derive(Default)]
struct ModelSlot {
    versions: BTreeMap<u64, Arc<ServedModel>>,
    loading: BTreeSet<u64>,
    failures: BTreeMap<u64, Failure>,
    config_error: Option<String>,
    policy: String,
}

/// The models being served.
pub struct Registry {
    config: RegistryConfig,
    factory: BackendFactory,
    state: Arc<ServingState>,
    models: RwLock<BTreeMap<String, ModelSlot>>,
    /// Serialises reloads; holds the file hash cache.
    reloading: tokio::sync::Mutex<Arc<Mutex<HashCache>>>,
}

impl Registry {
    pub fn new(config: RegistryConfig, factory: BackendFactory, state: Arc<ServingState>) -> Self {
        Registry {
            config,
            factory,
            state,
            models: RwLock::new(BTreeMap::new()),
            reloading: tokio::sync::Mutex::new(Arc::default()),
        }
    }

    /// The first load: every model must end up with a version serving, else start-up fails with
    /// every model's reason.
    pub async fn load_initial(&self) -> Result<(), String> {
        self.reload().await?;
        let models = self.models.read().expect("registry lock");
        if models.is_empty() {
            return Err(match &self.config.source {
                Source::Repository(dir) => format!(
                    "{}: no model directories (expected <name>/model.toml)",
                    dir.display()
                ),
                Source::Single { dir, .. } => format!("{}: no model", dir.display()),
            });
        }
        let problems: Vec<String> = models
            .iter()
            .filter(|(_, slot)| slot.versions.is_empty())
            .map(|(name, slot)| {
                let reasons: Vec<String> = slot
                    .config_error
                    .iter()
                    .cloned()
                    .chain(slot.failures.values().map(|f| f.message.clone()))
                    .collect();
                if reasons.is_empty() {
                    format!("model {name}: no version to serve (policy {})", slot.policy)
                } else {
                    reasons.join("; ")
                }
            })
            .collect();
        if !problems.is_empty() {
            return Err(problems.join("\n"));
        }
        if let Some(default) = &self.config.default_model
            && !models.contains_key(default)
        {
            return Err(format!(
                "--default-model {default:?} is not in the repository; it has {}",
                names(models.keys())
            ));
        }
        Ok(())
    }

    /// Brings the served versions in line with the repository. Errors only when the repository
    /// itself cannot be read (what was served keeps serving).
    pub async fn reload(&self) -> Result<(), String> {
        let cache = self.reloading.lock().await;
        let dirs = self.model_dirs()?;
        let found: BTreeMap<String, PathBuf> = dirs
            .into_iter()
            .filter_map(|dir| Some((dir_name(&dir)?, dir)))
            .collect();
        let gone: Vec<String> = {
            let models = self.models.read().expect("registry lock");
            models
                .keys()
                .filter(|n| !found.contains_key(*n))
                .cloned()
                .collect()
        };
        for name in gone {
            tracing::info!(model = %name, "model directory removed: unloading after in-flight work");
            if let Some(slot) = self.models.write().expect("registry lock").remove(&name) {
                slot.versions.values().for_each(|m| m.retire());
            }
            self.state.remove_model(&name);
        }
        for (name, dir) in found {
            self.reload_model(&name, &dir, &cache).await;
        }
        Ok(())
    }

    fn model_dirs(&self) -> Result<Vec<PathBuf>, String> {
        match &self.config.source {
            Source::Repository(root) => repository::model_dirs(root).map_err(|e| e.to_string()),
            Source::Single { dir, .. } => Ok(vec![dir.clone()]),
        }
    }

    async fn reload_model(&self, name: &str, dir: &Path, cache: &Arc<Mutex<HashCache>>) {
        metrics::model_known(name);
        let loaded = {
            let dir = dir.to_path_buf();
            blocking(move || ModelConfig::load(&dir).map_err(|e| e.to_string())).await
        };
        let config = match loaded {
            Ok(config) => Arc::new(config),
            Err(message) => {
                let mut models = self.models.write().expect("registry lock");
                let slot = models.entry(name.to_string()).or_default();
                if slot.config_error.as_ref() != Some(&message) {
                    metrics::model_load_failed(name);
                    tracing::error!(model = %name, error = %message, "model.toml cannot be used; loaded versions keep serving");
                    slot.config_error = Some(message);
                }
                let ready = !slot.versions.is_empty();
                drop(models);
                self.state.set_model(name, ready);
                return;
            }
        };
        let policy = match &self.config.source {
            Source::Single {
                version: Some(v), ..
            } => VersionPolicy::Specific(vec![*v]),
            _ => config.versions.clone(),
        };
        {
            let mut models = self.models.write().expect("registry lock");
            let slot = models.entry(name.to_string()).or_default();
            slot.config_error = None;
            slot.policy = policy.describe();
        }
        let available = repository::versions(dir).unwrap_or_default();

        // Load what the policy wants; when a version fails, choose again without it (so with
        // "latest 1" a broken v3 leaves v2 serving).
        let desired = loop {
            let mut candidates = Vec::new();
            for &version in &available {
                let path = repository::onnx_path(dir, version);
                let cache = cache.clone();
                let sha = blocking(move || {
                    cache
                        .lock()
                        .expect("hash cache lock")
                        .sha256(&path)
                        .map_err(|e| e.to_string())
                })
                .await;
                let Ok(onnx_sha256) = sha else { continue };
                let fingerprint = Fingerprint {
                    toml_sha256: config.toml_sha256.clone(),
                    onnx_sha256,
                };
                if !self.failed_before(name, version, &fingerprint) {
                    candidates.push((version, fingerprint));
                }
            }
            let versions: Vec<u64> = candidates.iter().map(|(v, _)| *v).collect();
            let desired: BTreeMap<u64, Fingerprint> = policy
                .select(&versions)
                .into_iter()
                .filter_map(|v| candidates.iter().find(|(c, _)| *c == v).cloned())
                .collect();
            let to_load: Vec<(u64, Fingerprint)> = desired
                .iter()
                .filter(|(v, fp)| !self.serves(name, **v, fp))
                .map(|(v, fp)| (*v, fp.clone()))
                .collect();
            let mut all_loaded = true;
            for (version, fingerprint) in to_load {
                all_loaded &= self.load_version(&config, version, fingerprint).await;
            }
            if all_loaded {
                break desired;
            }
        };

        let mut models = self.models.write().expect("registry lock");
        let slot = models.entry(name.to_string()).or_default();
        let unwanted: Vec<u64> = slot
            .versions
            .keys()
            .filter(|v| !desired.contains_key(v))
            .copied()
            .collect();
        for version in unwanted {
            if let Some(old) = slot.versions.remove(&version) {
                tracing::info!(model = %name, version, "version no longer wanted by the policy: unloading after in-flight work");
                old.retire();
            }
        }
        slot.failures.retain(|v, _| available.contains(v));
        let ready = !slot.versions.is_empty();
        drop(models);
        self.state.set_model(name, ready);
    }

    fn failed_before(&self, name: &str, version: u64, fingerprint: &Fingerprint) -> bool {
        let models = self.models.read().expect("registry lock");
        models
            .get(name)
            .and_then(|slot| slot.failures.get(&version))
            .is_some_and(|f| &f.fingerprint == fingerprint)
    }

    fn serves(&self, name: &str, version: u64, fingerprint: &Fingerprint) -> bool {
        let models = self.models.read().expect("registry lock");
        models
            .get(name)
            .and_then(|slot| slot.versions.get(&version))
            .is_some_and(|m| {
                m.spec.sha256 == fingerprint.onnx_sha256 && m.toml_sha256 == fingerprint.toml_sha256
            })
    }

    /// Loads, checks and warms up one version, then swaps it in. False if it failed.
    async fn load_version(&self, config: &Arc<ModelConfig>, version: u64, fp: Fingerprint) -> bool {
        let name = config.name.as_str();
        self.slot_mut(name, |slot| {
            slot.loading.insert(version);
        });
        tracing::info!(model = %name, version, sha256 = %fp.onnx_sha256, "loading and warming up");
        let spec = ModelSpec::new(config.clone(), version, fp.onnx_sha256.clone());
        let empty = BatchingOverrides::default();
        let overrides = self.config.overrides.get(name).unwrap_or(&empty);
        let loaded = match BatchSettings::resolve(
            &spec,
            overrides,
            &self.config.defaults,
            self.config.max_images_per_request,
        ) {
            Ok(settings) => {
                ServedModel::load(
                    spec,
                    settings,
                    &self.factory,
                    super::served::EngineSettings {
                        device: self.config.device,
                        host_memory: self.config.host_memory,
                        inline_run: self.config.inline_run,
                    },
                    self.config.limits,
                    fp.toml_sha256.clone(),
                )
                .await
            }
            Err(e) => Err(e),
        };
        let ok = loaded.is_ok();
        self.slot_mut(name, |slot| {
            slot.loading.remove(&version);
            match loaded {
                Ok(model) => {
                    let model = Arc::new(model);
                    tracing::info!(
                        model = %name,
                        version,
                        sha256 = %model.spec.sha256,
                        device = %model.device,
                        max_batch = model.settings.max_batch_size,
                        instances = model.settings.instances,
                        clinically_trained = model.spec.config.clinically_trained,
                        "model version warm; serving"
                    );
                    slot.failures.remove(&version);
                    if let Some(old) = slot.versions.insert(version, model.clone())
                        && old.spec.sha256 != model.spec.sha256
                    {
                        old.retire();
                    }
                }
                Err(message) => {
                    let message = format!("model {name} version {version}: {message}");
                    metrics::model_load_failed(name);
                    tracing::error!(model = %name, version, error = %message, "version failed to load; what was serving keeps serving");
                    slot.failures.insert(
                        version,
                        Failure {
                            fingerprint: fp,
                            message,
                        },
                    );
                }
            }
        });
        ok
    }

    fn slot_mut(&self, name: &str, f: impl FnOnce(&mut ModelSlot)) {
        let mut models = self.models.write().expect("registry lock");
        f(models.entry(name.to_string()).or_default());
    }

    /// The model a request names (empty: the default), at `version` (empty: the highest served).
    pub fn resolve(&self, name: &str, version: &str) -> Result<Arc<ServedModel>, InferError> {
        let models = self.models.read().expect("registry lock");
        let name = if name.is_empty() {
            match self.default_name(&models) {
                Some(default) => default,
                None => {
                    return Err(InferError::invalid(format!(
                        "the request names no model and this server serves several ({}); set `model`",
                        names(models.keys())
                    )));
                }
            }
        } else {
            name.to_string()
        };
        let Some(slot) = models.get(&name) else {
            return Err(InferError::not_found(format!(
                "model {} is not served here; this server serves {}",
                echo(&name),
                names(models.keys())
            ))
            .quoting_caller());
        };
        let served = || {
            slot.versions
                .keys()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        if version.is_empty() {
            return slot.versions.values().next_back().cloned().ok_or_else(|| {
                let why = if slot.loading.is_empty() {
                    "none loaded"
                } else {
                    "loading"
                };
                InferError::unavailable(format!(
                    "model {name} has no version ready ({why}); retry shortly"
                ))
            });
        }
        // Digits only: `+1` or ` 1` name no version (u64's parser would take the sign).
        Some(version)
            .filter(|v| v.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|v| v.parse::<u64>().ok())
            .and_then(|v| slot.versions.get(&v).cloned())
            .ok_or_else(|| {
                InferError::not_found(format!(
                    "version {} of model {name} is not served; served versions: [{}]",
                    echo(version),
                    served()
                ))
                .quoting_caller()
            })
    }

    fn default_name(&self, models: &BTreeMap<String, ModelSlot>) -> Option<String> {
        match &self.config.default_model {
            Some(name) => Some(name.clone()),
            None if models.len() == 1 => models.keys().next().cloned(),
            None => None,
        }
    }

    /// The default model's name, if there is one.
    pub fn default_model(&self) -> Option<String> {
        self.default_name(&self.models.read().expect("registry lock"))
    }

    /// Every model and version, with its state.
    pub fn list(&self) -> Vec<ModelStatus> {
        let models = self.models.read().expect("registry lock");
        let default = self.default_name(&models);
        models
            .iter()
            .map(|(name, slot)| {
                let mut versions: BTreeMap<u64, VersionStatus> = BTreeMap::new();
                for (v, f) in &slot.failures {
                    versions.insert(
                        *v,
                        VersionStatus {
                            version: *v,
                            state: VersionState::Failed,
                            sha256: f.fingerprint.onnx_sha256.clone(),
                            error: Some(f.message.clone()),
                        },
                    );
                }
                for (v, m) in &slot.versions {
                    versions.insert(
                        *v,
                        VersionStatus {
                            version: *v,
                            state: VersionState::Ready,
                            sha256: m.spec.sha256.clone(),
                            error: None,
                        },
                    );
                }
                for v in &slot.loading {
                    versions.entry(*v).or_insert(VersionStatus {
                        version: *v,
                        state: VersionState::Loading,
                        sha256: String::new(),
                        error: None,
                    });
                }
                ModelStatus {
                    name: name.clone(),
                    is_default: default.as_deref() == Some(name),
                    policy: slot.policy.clone(),
                    versions: versions.into_values().collect(),
                    error: slot.config_error.clone(),
                }
            })
            .collect()
    }

    /// Every version being served.
    pub fn served(&self) -> Vec<Arc<ServedModel>> {
        let models = self.models.read().expect("registry lock");
        models
            .values()
            .flat_map(|slot| slot.versions.values().cloned())
            .collect()
    }
}

/// A model's name: its directory's name (through symlinks, so `--model-dir .` works).
fn dir_name(dir: &Path) -> Option<String> {
    let resolved = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    resolved
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
}

fn names<'a>(names: impl Iterator<Item = &'a String>) -> String {
    let list: Vec<String> = names.map(|n| format!("{n:?}")).collect();
    if list.is_empty() {
        "no model".into()
    } else {
        list.join(", ")
    }
}

/// Runs file work off the async runtime.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("a blocking registry task does not panic")
}
