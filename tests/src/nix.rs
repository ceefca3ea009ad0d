//! A real Nix client (Debian's `nix-bin`, single-user) in the client namespace, with a
//! store of its own: every build runs in a private mount namespace over a fresh tmpfs
//! on /nix, so the host's /nix is never touched and every build starts uncached.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, ensure};

use crate::command::{drain, wait_or_kill};
use crate::netns::exec_command;
use crate::tempdir::TempDir;
use crate::topology::Topology;
use crate::unique;

/// Where Debian's nix-bin puts `nix-build`.
pub const NIX_BUILD: &str = "/usr/bin/nix-build";

/// Mounts the private store, builds, and prints the output path and then the output's
/// content (the store is gone once the mount namespace is).
const BUILD_SCRIPT: &str = r#"
set -eu
mount -t tmpfs yensid-test-nix /nix
out=$(nix-build "$YENSID_NIX_EXPR" --no-out-link \
    --max-jobs "$YENSID_NIX_MAX_JOBS" --builders "$YENSID_NIX_BUILDERS" \
    --option sandbox false --option substituters '' --option build-users-group '')
printf '%s\n' "$out"
cat "$out"
"#;

/// Runs `nix-build` in a namespace as a single-user Nix with a throw-away store.
pub struct NixClient {
    ns: String,
    identity: PathBuf,
    known_hosts: PathBuf,
    dir: TempDir,
}

/// How one `nix-build` went.
#[derive(Debug)]
pub struct NixBuild {
    pub status: ExitStatus,
    /// The store path built, if it succeeded.
    pub out_path: Option<String>,
    /// The content of the built file.
    pub output: String,
    /// Everything Nix (and ssh under it) said on stderr.
    pub stderr: String,
}

impl NixClient {
    /// A client in `topology`'s client namespace that logs in to builders as root with
    /// the topology's client key and trusts exactly [`Topology::known_hosts`].
    pub fn new(topology: &Topology) -> Result<Self> {
        ensure!(
            Path::new(NIX_BUILD).exists(),
            "no {NIX_BUILD}: install Debian's nix-bin"
        );
        // The private store is mounted over /nix, which must exist (nix-bin creates it).
        ensure!(
            Path::new("/nix").is_dir(),
            "no /nix directory to mount over"
        );
        let dir = TempDir::new(&unique::name(&unique::next_id(), "nix"))?;
        for sub in ["home", "conf"] {
            fs::create_dir(dir.path().join(sub))?;
        }
        // An empty system config: the host's /etc/nix/nix.conf must not steer the test.
        fs::write(dir.path().join("conf/nix.conf"), "")?;
        let known_hosts = dir.path().join("known_hosts");
        fs::write(&known_hosts, topology.known_hosts().render())?;
        Ok(Self {
            ns: topology.client_ns().name().to_owned(),
            identity: topology.client_identity().to_owned(),
            known_hosts,
            dir,
        })
    }

    /// Writes `expression` (one derivation) to a file and builds it with
    /// `--builders builders --max-jobs max_jobs`; killed after `timeout`. A failed
    /// build is a [`NixBuild`] with a failed status, not an error.
    pub fn build(
        &self,
        expression: &str,
        builders: &str,
        max_jobs: u32,
        timeout: Duration,
    ) -> Result<NixBuild> {
        let expr = self
            .dir
            .path()
            .join(format!("build-{}.nix", unique::next_id()));
        fs::write(&expr, expression).with_context(|| format!("write {}", expr.display()))?;
        let home = self.dir.path().join("home");
        let ssh_opts = format!(
            "-F /dev/null -i {} -o UserKnownHostsFile={} -o GlobalKnownHostsFile=/dev/null \
             -o StrictHostKeyChecking=yes -o IdentitiesOnly=yes -o BatchMode=yes \
             -o ConnectTimeout=5",
            self.identity.display(),
            self.known_hosts.display()
        );
        let mut child = exec_command(&self.ns, "unshare")
            .args([
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                BUILD_SCRIPT,
            ])
            .env("YENSID_NIX_EXPR", &expr)
            .env("YENSID_NIX_BUILDERS", builders)
            .env("YENSID_NIX_MAX_JOBS", max_jobs.to_string())
            .env("NIX_REMOTE", "")
            .env("NIX_SSHOPTS", ssh_opts)
            .env("NIX_CONF_DIR", self.dir.path().join("conf"))
            .env_remove("NIX_PATH")
            .env("HOME", &home)
            .env("XDG_CACHE_HOME", home.join(".cache"))
            .env("XDG_CONFIG_HOME", home.join(".config"))
            .env("XDG_DATA_HOME", home.join(".local/share"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawn nix-build")?;
        let stdout = drain(child.stdout.take());
        let stderr = drain(child.stderr.take());
        let status = wait_or_kill(&mut child, "nix-build", timeout)?;
        let stdout = String::from_utf8_lossy(&stdout.join().unwrap_or_default()).into_owned();
        let stderr = String::from_utf8_lossy(&stderr.join().unwrap_or_default()).into_owned();
        let (out_path, output) = match stdout.split_once('\n') {
            Some((path, rest)) if status.success() => (Some(path.to_owned()), rest.to_owned()),
            _ => (None, stdout),
        };
        Ok(NixBuild {
            status,
            out_path,
            output,
            stderr,
        })
    }
}
