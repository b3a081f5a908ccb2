//! The model repository on disk: which models (`<root>/<name>/model.toml`) and versions
//! (`<name>/<N>/model.onnx`, N a positive integer) exist, and their files' SHA-256, cached by size
//! and modification time so polling a repository does not re-read every model.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::ModelError;
use super::config::sha256_file;

/// `dir/<version>/model.onnx`.
pub fn onnx_path(dir: &Path, version: u64) -> PathBuf {
    dir.join(version.to_string()).join("model.onnx")
}

/// The versions of the model in `dir` that have a `model.onnx`, ascending.
pub fn versions(dir: &Path) -> Result<Vec<u64>, ModelError> {
    let entries = std::fs::read_dir(dir).map_err(|source| ModelError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut versions: Vec<u64> = entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u64>().ok()))
        .filter(|v| *v > 0 && onnx_path(dir, *v).is_file())
        .collect();
    versions.sort_unstable();
    Ok(versions)
}

/// The model directories of a repository (sub-directories holding a `model.toml`), by name.
pub fn model_dirs(root: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let entries = std::fs::read_dir(root).map_err(|source| ModelError::Io {
        path: root.to_path_buf(),
        source,
    })?;
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.join("model.toml").is_file())
        .collect();
    dirs.sort();
    Ok(dirs)
}

/// SHA-256 of files, recomputed only when a file's size or modification time changes.
#[derive(Default)]
pub struct HashCache {
    known: HashMap<PathBuf, (u64, Option<SystemTime>, String)>,
}

impl HashCache {
    pub fn sha256(&mut self, path: &Path) -> Result<String, ModelError> {
        let meta = std::fs::metadata(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let stamp = (meta.len(), meta.modified().ok());
        if let Some((len, modified, sha)) = self.known.get(path)
            && (*len, *modified) == stamp
            && stamp.1.is_some()
        {
            return Ok(sha.clone());
        }
        let sha = sha256_file(path)?;
        self.known
            .insert(path.to_path_buf(), (stamp.0, stamp.1, sha.clone()));
        Ok(sha)
    }
}
