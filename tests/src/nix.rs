//! A real Nix client (Debian's `nix-bin`, single-user) in the client namespace, with a
//! store of its own: every run is a private mount namespace over a fresh tmpfs on /nix,
//! so the host's /nix is never touched and every run starts uncached.
//!
//! One run builds any number of [`Derivation`]s with a `--builders` value of the
//! caller's choosing ([`remote_builder`]) and reports, per derivation, its output path
//! and where it was built ([`Site`]). Runs can go on side by side
//! ([`NixClient::spawn`]).

use std::fs;
use std::net::IpAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};

use crate::command::drain;
use crate::derivation::{Derivation, Site, Sites, expression_of};
use crate::netns::exec_command;
use crate::tempdir::TempDir;
use crate::topology::Topology;
use crate::unique;
use crate::wait::wait_child;

/// Where Debian's nix-bin puts `nix-build`.
pub const NIX_BUILD: &str = "/usr/bin/nix-build";

/// Mounts the private store and builds every derivation (`--keep-going`: one failure
/// does not stop the others). Then, since the store is gone with the mount namespace,
/// prints `<output path> <output>` for each output that made it into the store, and
/// exits with nix-build's status.
const BUILD_SCRIPT: &str = r#"
set -u
mount -t tmpfs yensid-test-nix /nix
status=0
nix-build "$YENSID_NIX_EXPR" --no-out-link --keep-going \
    --max-jobs "$YENSID_NIX_MAX_JOBS" --builders "$YENSID_NIX_BUILDERS" \
    --option sandbox false --option substituters '' --option build-users-group '' \
    >/dev/null || status=$?
for name in $YENSID_NIX_NAMES; do
    for out in /nix/store/*-"$name"; do
        if [ -f "$out" ]; then printf '%s %s\n' "$out" "$(cat "$out")"; fi
    done
done
exit $status
"#;

/// The store a remote builder is reached as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreScheme {
    /// `ssh-ng://`: the builder runs `nix-daemon --stdio`.
    SshNg,
    /// `ssh://`: the builder runs `nix-store --serve --write`.
    Ssh,
}

impl StoreScheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SshNg => "ssh-ng",
            Self::Ssh => "ssh",
        }
    }
}

/// A `--builders` value with one machine: `<scheme>://root@<host>` for this system,
/// `max_jobs` builds at a time, default identity, features and host key (ssh finds
/// the key in the client's known_hosts). Nix before 2.31 takes no port in the URI: the
/// machine is on port 22.
pub fn remote_builder(scheme: StoreScheme, host: IpAddr, max_jobs: u32) -> String {
    format!(
        "{}://root@{host} {}-linux - {max_jobs} 1",
        scheme.as_str(),
        std::env::consts::ARCH
    )
}

/// Runs `nix-build` in the client namespace as a single-user Nix with a throw-away
/// store, logging in to builders as root with the topology's client key.
pub struct NixClient {
    ns: String,
    identity: PathBuf,
    known_hosts: PathBuf,
    sites: Sites,
    dir: TempDir,
    /// ssh's `ConnectTimeout`, which also bounds its wait for the server's
    /// identification line (a connection held in yensid's queue waits there).
    ssh_connect_timeout: Duration,
}

/// How one `nix-build` run went.
#[derive(Debug)]
pub struct NixRun {
    pub status: ExitStatus,
    /// Everything Nix (and ssh under it) said on stderr.
    pub stderr: String,
    /// One per derivation, in the order they were given.
    pub builds: Vec<NixBuild>,
}

/// One derivation of a run.
#[derive(Debug)]
pub struct NixBuild {
    pub name: String,
    /// `None` if it did not build.
    pub output: Option<NixOutput>,
}

/// A built derivation's output, as it arrived in the client's store.
#[derive(Debug)]
pub struct NixOutput {
    /// `/nix/store/<hash>-<name>`.
    pub path: String,
    pub site: Site,
}

impl NixBuild {
    /// Where it was built, if it was.
    pub fn site(&self) -> Option<&Site> {
        self.output.as_ref().map(|output| &output.site)
    }
}

impl NixRun {
    /// Where each derivation was built (`None`: it was not).
    pub fn sites(&self) -> Vec<Option<&Site>> {
        self.builds.iter().map(NixBuild::site).collect()
    }

    /// Fails, with Nix's stderr, unless the run succeeded and every derivation built.
    pub fn ensure_built(&self) -> Result<()> {
        ensure!(
            self.status.success() && self.builds.iter().all(|b| b.output.is_some()),
            "nix-build failed ({}), built {:?}:\n{}",
            self.status,
            self.sites(),
            self.stderr
        );
        Ok(())
    }
}

impl NixClient {
    /// A client in `topology`'s client namespace that trusts exactly the host keys in
    /// `known_hosts` (the text of a known_hosts file, e.g. what `yensid known-hosts`
    /// prints).
    pub fn new(topology: &Topology, known_hosts: &str) -> Result<Self> {
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
        let known_hosts_file = dir.path().join("known_hosts");
        fs::write(&known_hosts_file, known_hosts)?;
        Ok(Self {
            ns: topology.client_ns().name().to_owned(),
            identity: topology.client_identity().to_owned(),
            known_hosts: known_hosts_file,
            sites: topology.sites(),
            dir,
            ssh_connect_timeout: Duration::from_secs(5),
        })
    }

    /// ssh's `ConnectTimeout` for every run (default 5 s).
    pub fn with_ssh_connect_timeout(mut self, timeout: Duration) -> Self {
        self.ssh_connect_timeout = timeout;
        self
    }

    /// Builds `derivations` in one `nix-build --builders builders --max-jobs max_jobs`;
    /// killed after `timeout`. Failed builds are part of the [`NixRun`], not an error.
    pub fn build(
        &self,
        derivations: &[Derivation],
        builders: &str,
        max_jobs: u32,
        timeout: Duration,
    ) -> Result<NixRun> {
        self.spawn(derivations, builders, max_jobs)?.wait(timeout)
    }

    /// Starts [`Self::build`] in the background.
    pub fn spawn(
        &self,
        derivations: &[Derivation],
        builders: &str,
        max_jobs: u32,
    ) -> Result<RunningNix> {
        let expr = self
            .dir
            .path()
            .join(format!("build-{}.nix", unique::next_id()));
        fs::write(&expr, expression_of(derivations))
            .with_context(|| format!("write {}", expr.display()))?;
        let names: Vec<String> = derivations.iter().map(|d| d.name().to_owned()).collect();
        let home = self.dir.path().join("home");
        // Nix leaves empty `nix-<pid>-<n>` directories in TMPDIR: keep them in the
        // client's directory, removed with it.
        let tmp = self.dir.path().join("tmp");
        fs::create_dir_all(&tmp).with_context(|| format!("mkdir {}", tmp.display()))?;
        let ssh_opts = format!(
            "-F /dev/null -i {} -o UserKnownHostsFile={} -o GlobalKnownHostsFile=/dev/null \
             -o StrictHostKeyChecking=yes -o IdentitiesOnly=yes -o BatchMode=yes \
             -o ConnectTimeout={}",
            self.identity.display(),
            self.known_hosts.display(),
            self.ssh_connect_timeout.as_secs().max(1)
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
            .env("YENSID_NIX_NAMES", names.join(" "))
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
            .env("TMPDIR", &tmp)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, so that giving up on it kills nix-build too.
            .process_group(0)
            .spawn()
            .context("spawn nix-build")?;
        Ok(RunningNix {
            stdout: Some(drain(child.stdout.take())),
            stderr: Some(drain(child.stderr.take())),
            child,
            reaped: false,
            names,
            sites: self.sites.clone(),
        })
    }
}

/// A `nix-build` run going on in the background; dropping it unwaited kills it.
pub struct RunningNix {
    child: Child,
    reaped: bool,
    stdout: Option<JoinHandle<Vec<u8>>>,
    stderr: Option<JoinHandle<Vec<u8>>>,
    names: Vec<String>,
    sites: Sites,
}

impl RunningNix {
    /// Waits for the run to end; after `timeout` kills it and fails.
    pub fn wait(mut self, timeout: Duration) -> Result<NixRun> {
        let Some(status) = wait_child(&mut self.child, timeout)? else {
            bail!("nix-build did not finish within {timeout:?}");
        };
        self.reaped = true;
        let text = |pipe: Option<JoinHandle<Vec<u8>>>| {
            let bytes = pipe.map(|p| p.join().unwrap_or_default());
            String::from_utf8_lossy(&bytes.unwrap_or_default()).into_owned()
        };
        let stdout = text(self.stdout.take());
        let stderr = text(self.stderr.take());
        let builds = self
            .names
            .iter()
            .map(|name| NixBuild {
                name: name.clone(),
                output: stdout.lines().find_map(|line| {
                    let (path, record) = line.split_once(' ').unwrap_or((line, ""));
                    path.ends_with(&format!("-{name}")).then(|| NixOutput {
                        path: path.to_owned(),
                        site: self.sites.resolve(record),
                    })
                }),
            })
            .collect();
        Ok(NixRun {
            status,
            stderr,
            builds,
        })
    }
}

impl Drop for RunningNix {
    fn drop(&mut self) {
        if self.reaped {
            return;
        }
        if let Ok(group) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: kill(2) on the process group of our own unreaped child, which
            // leads it (process_group(0)), so the group id cannot have been reused.
            unsafe { libc::kill(-group, libc::SIGKILL) };
        }
        let _ = self.child.wait();
    }
}
