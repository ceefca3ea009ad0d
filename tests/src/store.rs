//! A builder's own Nix store: a directory its sshd's sessions see as /nix, and the
//! nix.conf they read. `nix-daemon --stdio` (ssh-ng://) and `nix-store --serve --write`
//! (ssh://) on that builder then build into a store that is neither the host's nor
//! another builder's, and the tests look into it from outside to see what was built
//! there.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};

/// Where Debian's nix-bin puts the programs a builder's sessions run.
const NIX_DAEMON: &str = "/usr/bin/nix-daemon";

/// The builder's settings, never the host's /etc/nix: no sandbox and no build users
/// (Debian's Nix runs single-user here), nothing fetched from a cache, so every
/// derivation really builds.
const NIX_CONF: &str = "\
sandbox = false
build-users-group =
substituters =
";

/// One builder's store, under a directory that goes away with its topology.
pub struct NixStore {
    /// Bind-mounted on /nix in the builder's mount namespace.
    root: PathBuf,
    /// `NIX_CONF_DIR` of the builder's sessions.
    conf_dir: PathBuf,
    /// `TMPDIR` of the builder's sessions: Nix leaves empty `nix-<pid>-<n>`
    /// directories in it, which go with the store instead of staying in /tmp.
    tmp_dir: PathBuf,
}

impl NixStore {
    /// Makes an empty `<dir>/nix` (Nix creates the store and its database on first use)
    /// `<dir>/nix-conf/nix.conf` and `<dir>/tmp`.
    pub(crate) fn create(dir: &Path) -> Result<Self> {
        ensure!(
            Path::new(NIX_DAEMON).exists(),
            "no {NIX_DAEMON}: install Debian's nix-bin"
        );
        // The store is bind-mounted over /nix, which must exist (nix-bin creates it).
        ensure!(
            Path::new("/nix").is_dir(),
            "no /nix directory to mount over"
        );
        let root = dir.join("nix");
        let conf_dir = dir.join("nix-conf");
        let tmp_dir = dir.join("tmp");
        for sub in [&root, &conf_dir, &tmp_dir] {
            fs::create_dir(sub).with_context(|| format!("mkdir {}", sub.display()))?;
        }
        fs::write(conf_dir.join("nix.conf"), NIX_CONF)?;
        Ok(Self {
            root,
            conf_dir,
            tmp_dir,
        })
    }

    /// The directory the builder sees as /nix.
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub(crate) fn conf_dir(&self) -> &Path {
        &self.conf_dir
    }

    pub(crate) fn tmp_dir(&self) -> &Path {
        &self.tmp_dir
    }

    /// Whether `store_path` (`/nix/store/<hash>-<name>`) is in this store.
    pub fn contains(&self, store_path: &str) -> bool {
        store_path
            .strip_prefix("/nix/")
            .is_some_and(|inner| self.root.join(inner).symlink_metadata().is_ok())
    }
}
