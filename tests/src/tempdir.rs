//! A private directory under the system temp dir, removed with everything in it on drop.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
pub(crate) struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// `name` comes from `unique::name`, so that stale ones can be swept.
    pub(crate) fn new(name: &str) -> Result<Self> {
        let path = std::env::temp_dir().join(name);
        fs::create_dir(&path).with_context(|| format!("mkdir {}", path.display()))?;
        Ok(Self { path })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}
