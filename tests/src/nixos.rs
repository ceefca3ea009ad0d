//! yensid's NixOS modules evaluated by nixpkgs' real module system (`lib.evalModules`,
//! run by Debian's `nix-instantiate`), for tests that feed what the modules generate
//! (the configuration file, machines lines, known_hosts lines) to the real daemon and
//! a real Nix client.
//!
//! nixpkgs' `lib` comes from, in order: `$YENSID_NIXPKGS_LIB` (a `lib` directory, or a
//! `.tar.gz` holding `nixpkgs-lib/lib` like the pinned copy), `<nixpkgs/lib>` on
//! NIX_PATH, or the pinned copy at `../shared/vendor/nixpkgs-lib.tar.gz` next to the
//! workspace, extracted into a temp dir per test. With none of them, or without
//! `nix-instantiate`, [`NixpkgsLib::find_or_skip`] records a skip (see
//! [`crate::privileges::record_skip`]) and the test returns without failing.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

use crate::config::InstancePaths;
use crate::tempdir::TempDir;
use crate::unique;

/// Debian's nix-bin puts it here.
pub const NIX_INSTANTIATE: &str = "/usr/bin/nix-instantiate";

/// The workspace root (the repository).
pub fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .to_owned()
}

/// A nixpkgs `lib` directory, extracted for this test if it came as a tarball.
pub struct NixpkgsLib {
    path: PathBuf,
    _extracted: Option<TempDir>,
}

impl NixpkgsLib {
    /// The `lib` to evaluate with, or `None` after printing why the test is skipped.
    pub fn find_or_skip(test: &str) -> Result<Option<Self>> {
        if !Path::new(NIX_INSTANTIATE).exists() {
            skip(test, "no nix-instantiate (install Debian's nix-bin)");
            return Ok(None);
        }
        if let Some(given) = std::env::var_os("YENSID_NIXPKGS_LIB").filter(|v| !v.is_empty()) {
            return Self::from(Path::new(&given)).map(Some);
        }
        let on_nix_path = Command::new(NIX_INSTANTIATE)
            .args(["--find-file", "nixpkgs/lib"])
            .output()
            .context("run nix-instantiate --find-file")?;
        if on_nix_path.status.success() {
            let path = String::from_utf8_lossy(&on_nix_path.stdout)
                .trim()
                .to_owned();
            return Ok(Some(Self {
                path: PathBuf::from(path),
                _extracted: None,
            }));
        }
        let pinned = repository().join("../shared/vendor/nixpkgs-lib.tar.gz");
        if pinned.exists() {
            return Self::from(&pinned).map(Some);
        }
        skip(
            test,
            &format!(
                "no nixpkgs lib: set YENSID_NIXPKGS_LIB, put nixpkgs on NIX_PATH, or provide {}",
                pinned.display()
            ),
        );
        Ok(None)
    }

    fn from(given: &Path) -> Result<Self> {
        if given.is_dir() {
            return Ok(Self {
                path: given.to_owned(),
                _extracted: None,
            });
        }
        let dir = TempDir::new(&unique::name(&unique::next_id(), "nixpkgs-lib"))?;
        let status = Command::new("tar")
            .arg("xzf")
            .arg(given)
            .arg("-C")
            .arg(dir.path())
            .status()
            .context("run tar")?;
        ensure!(status.success(), "tar xzf {} failed", given.display());
        let path = dir.path().join("nixpkgs-lib/lib");
        ensure!(
            path.join("default.nix").exists(),
            "{} holds no nixpkgs-lib/lib/default.nix",
            given.display()
        );
        Ok(Self {
            path,
            _extracted: Some(dir),
        })
    }

    /// Evaluates `machine` (a Nix expression of a NixOS module, which may use
    /// `examples`: nixos/tests/examples.nix applied to `harness`, a JSON document)
    /// through nixos/tests/eval/eval.nix: its JSON result, or Nix's error message.
    pub fn evaluate(&self, machine: &str, harness: &Value) -> Result<Result<Value, String>> {
        // Paths come in as strings (`--argstr`), so no path needs quoting in Nix.
        let expr = format!(
            "{{ harness, libPath, repo }}: let lib = import (/. + libPath); in import (/. + repo + \"/nixos/tests/eval/eval.nix\") {{ \
             inherit lib; system = \"{arch}-linux\"; \
             machine = let examples = import (/. + repo + \"/nixos/tests/examples.nix\") \
             (builtins.fromJSON harness); in ({machine}); }}",
            arch = std::env::consts::ARCH,
        );
        let out = Command::new(NIX_INSTANTIATE)
            .args(["--eval", "--strict", "--json"])
            .arg("--argstr")
            .arg("harness")
            .arg(harness.to_string())
            .arg("--argstr")
            .arg("libPath")
            .arg(&self.path)
            .arg("--argstr")
            .arg("repo")
            .arg(repository())
            .arg("--expr")
            .arg(&expr)
            .env_remove("NIX_PATH")
            .output()
            .context("run nix-instantiate --eval")?;
        if !out.status.success() {
            return Ok(Err(String::from_utf8_lossy(&out.stderr).into_owned()));
        }
        let value = serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "nix-instantiate printed no JSON: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })?;
        Ok(Ok(value))
    }
}

/// Counted like every other skip: fatal in CI and under `cargo xtask test --all`.
fn skip(test: &str, why: &str) {
    crate::privileges::record_skip(test, &format!("NixOS module evaluation: {why}"));
}

/// What the modules generated for one machine (see nixos/tests/eval/eval.nix).
#[derive(Debug)]
pub struct Generated {
    pub json: Value,
}

impl Generated {
    /// The configuration file's content as a TOML document, with this test instance's
    /// paths put in `[daemon]` (the harness runs several daemons on one machine).
    pub fn config_file(&self, paths: &InstancePaths) -> Result<String> {
        let mut settings = self.json["settings"].clone();
        let Some(table) = settings.as_object_mut() else {
            bail!("the machine runs no daemon: {}", self.json);
        };
        let daemon = table
            .entry("daemon")
            .or_insert_with(|| Value::Object(Default::default()));
        let Some(daemon) = daemon.as_object_mut() else {
            bail!("`daemon` is not a table: {daemon}");
        };
        for (key, path) in [
            ("pin_path", &paths.pin_path),
            ("state_dir", &paths.state_dir),
            ("runtime_dir", &paths.runtime_dir),
        ] {
            daemon.insert(key.to_owned(), Value::String(path.display().to_string()));
        }
        toml::to_string(&settings).context("the settings as TOML")
    }

    /// The /etc/nix/machines lines, as one `--builders` value.
    pub fn builders(&self) -> Result<String> {
        Ok(self.lines("machines")?.join("\n"))
    }

    /// The ssh_known_hosts file.
    pub fn known_hosts(&self) -> Result<String> {
        Ok(self.lines("knownHosts")?.join("\n") + "\n")
    }

    /// A list of strings the evaluation returned.
    pub fn lines(&self, key: &str) -> Result<Vec<String>> {
        self.json[key]
            .as_array()
            .with_context(|| format!("no list `{key}` in {}", self.json))?
            .iter()
            .map(|line| {
                line.as_str()
                    .map(str::to_owned)
                    .with_context(|| format!("`{key}` holds {line}"))
            })
            .collect()
    }
}
