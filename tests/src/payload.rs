//! Large random files with a known SHA-256, for byte-exact transfer checks.

use std::fs::File;
use std::io::{self, BufWriter, Read};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, ensure};

use crate::command::run;
use crate::tempdir::TempDir;
use crate::unique;

/// A file of random bytes in its own temp dir, deleted on drop.
pub struct RandomFile {
    path: PathBuf,
    sha256: String,
    _dir: TempDir,
}

impl RandomFile {
    pub fn create(bytes: u64) -> Result<Self> {
        let dir = TempDir::new(&unique::name(&unique::next_id(), "payload"))?;
        let path = dir.path().join("random.bin");
        let mut out = BufWriter::new(File::create(&path)?);
        let copied = io::copy(&mut File::open("/dev/urandom")?.take(bytes), &mut out)
            .context("fill payload from /dev/urandom")?;
        ensure!(copied == bytes, "short payload: {copied} of {bytes} bytes");
        out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        let sha256 = sha256_of_output(&run(Command::new("sha256sum").arg(&path))?)?;
        Ok(Self {
            path,
            sha256,
            _dir: dir,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Lower-case hex SHA-256 of the content.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }
}

/// The digest from `sha256sum` output (`<hex>  <name>`).
pub fn sha256_of_output(output: &str) -> Result<String> {
    let digest = output.split_whitespace().next().unwrap_or_default();
    ensure!(
        digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit()),
        "not sha256sum output: {output:?}"
    );
    Ok(digest.to_owned())
}
