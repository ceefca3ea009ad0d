//! Real OpenSSH servers: the builders, and the client host's own sshd.

use std::fs::{self, File, OpenOptions};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};

use crate::command::run;
use crate::netns::{Netns, exec_command, run_in};
use crate::store::NixStore;
use crate::wait::{wait_child, wait_until};

pub const SSH_PORT: u16 = 22;
const SSHD: &str = "/usr/sbin/sshd";

/// An ed25519 key pair made by `ssh-keygen`, without passphrase.
pub struct KeyPair {
    private: PathBuf,
    public: String,
}

impl KeyPair {
    /// Writes the private key to `path` and the public one to `path.pub`.
    pub fn generate(path: &Path, comment: &str) -> Result<Self> {
        run(Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
            .arg(path))?;
        let public = fs::read_to_string(path.with_extension("pub"))
            .with_context(|| format!("read public key of {}", path.display()))?;
        Ok(Self {
            private: path.to_owned(),
            public: public.trim().to_owned(),
        })
    }

    pub fn private_key(&self) -> &Path {
        &self.private
    }

    /// The `ssh-ed25519 AAAA... comment` line.
    pub fn public_key(&self) -> &str {
        &self.public
    }
}

/// What makes one sshd distinguishable from another.
pub struct SshdSpec<'a> {
    /// Appended to the SSH banner (`VersionAddendum`) and exported to sessions as
    /// `YENSID_BUILDER`, so both a raw banner and a shell session name the server.
    pub name: &'a str,
    /// Address to listen on (port 22); `0.0.0.0` for a host sshd.
    pub listen: IpAddr,
    /// The one public key allowed to log in as root.
    pub authorized_key: &'a str,
    /// A Nix store of its own: sshd then runs in a private mount namespace with the
    /// store's directory on /nix, and its sessions read the store's nix.conf.
    pub store: Option<&'a NixStore>,
}

/// A running `sshd -D` with its own host key, killed on drop. It can be killed and
/// started again in the middle of a test ([`Self::kill`], [`Self::restart`]): a builder
/// that dies and comes back, with the same host key and address.
pub struct Sshd {
    /// `None` while killed. Behind a lock so a test can kill a builder's sshd while
    /// other threads hold references into the topology.
    child: Mutex<Option<Child>>,
    /// Its namespace's name and its config, to start it again.
    ns_name: String,
    config: PathBuf,
    listen: IpAddr,
    name: String,
    /// The directory mounted on /nix for it, if it has a store of its own.
    store_root: Option<PathBuf>,
    host_key: KeyPair,
    log: PathBuf,
}

impl Sshd {
    /// Starts sshd in `ns` with its files under `dir`, and returns once it accepts TCP.
    pub fn start(ns: &Netns, dir: &Path, spec: &SshdSpec) -> Result<Self> {
        Self::start_listening(ns, dir, spec, &[])
    }

    /// Like [`Self::start`], and sshd also listens on every address of `also` (e.g. an
    /// IPv6 address, or a port other than 22).
    pub fn start_listening(
        ns: &Netns,
        dir: &Path,
        spec: &SshdSpec,
        also: &[SocketAddr],
    ) -> Result<Self> {
        let own_dir = dir.join(format!("sshd-{}", spec.name));
        fs::create_dir(&own_dir).with_context(|| format!("mkdir {}", own_dir.display()))?;
        // The privilege separation directory sshd insists on.
        fs::create_dir_all("/run/sshd").context("mkdir /run/sshd")?;

        let host_key = KeyPair::generate(&own_dir.join("host_ed25519"), spec.name)?;
        let authorized_keys = own_dir.join("authorized_keys");
        fs::write(&authorized_keys, format!("{}\n", spec.authorized_key))?;
        let config = own_dir.join("sshd_config");
        fs::write(
            &config,
            render_config(spec, host_key.private_key(), &authorized_keys, also),
        )?;

        let log = own_dir.join("sshd.log");
        File::create(&log)?;
        let sshd = Self {
            child: Mutex::new(None),
            ns_name: ns.name().to_owned(),
            config,
            listen: spec.listen,
            name: spec.name.to_owned(),
            store_root: spec.store.map(|store| store.root().to_owned()),
            host_key,
            log,
        };
        sshd.spawn()?;
        Ok(sshd)
    }

    /// Starts the sshd process (appending to its log) and waits until it accepts.
    fn spawn(&self) -> Result<()> {
        let mut child = self.child();
        ensure!(child.is_none(), "sshd {} is already running", self.name);
        let log_file = OpenOptions::new().append(true).open(&self.log)?;
        *child = Some(
            self.command()
                .stdin(Stdio::null())
                .stdout(log_file.try_clone()?)
                .stderr(log_file)
                .spawn()
                .context("spawn sshd")?,
        );
        drop(child);
        self.wait_accepting()
    }

    /// `sshd -D` in its namespace; with a store of its own, behind a private mount
    /// namespace whose /nix is the store. Every program in the chain execs the next,
    /// so the child's pid is sshd's and [`Self::kill`] reaches it.
    fn command(&self) -> Command {
        let mut cmd = match &self.store_root {
            None => exec_command(&self.ns_name, SSHD),
            Some(root) => {
                let mut cmd = exec_command(&self.ns_name, "unshare");
                cmd.args(["--mount", "--propagation", "private", "--", "/bin/sh", "-c"])
                    .arg(r#"mount --bind "$0" /nix && exec "$@""#)
                    .arg(root)
                    .arg(SSHD);
                cmd
            }
        };
        cmd.args(["-D", "-e", "-f"]).arg(&self.config);
        cmd
    }

    /// The listening sshd's pid; `None` while it is killed.
    pub fn pid(&self) -> Option<u32> {
        self.child().as_ref().map(Child::id)
    }

    /// SIGKILLs the listening sshd (by its pid) and reaps it: from now on its port
    /// refuses connections. Sessions it already forked keep running, as on a real host
    /// whose sshd crashed.
    pub fn kill(&self) -> Result<()> {
        let mut child = self.child();
        let Some(mut process) = child.take() else {
            bail!("sshd {} is not running", self.name);
        };
        process.kill().context("kill sshd")?;
        wait_child(&mut process, Duration::from_secs(20))?
            .with_context(|| format!("sshd {} did not die of SIGKILL", self.name))?;
        Ok(())
    }

    /// Starts a killed sshd again, same config and host key, and waits until it
    /// accepts connections.
    pub fn restart(&self) -> Result<()> {
        self.spawn()
    }

    /// Restarts the listening sshd with `MaxStartups` set to `max` (the test default
    /// is 1000): beyond `max` unauthenticated connections it drops new ones, as a
    /// builder under a flood does.
    pub fn set_max_startups(&self, max: u32) -> Result<()> {
        let config = fs::read_to_string(&self.config)?;
        let changed: String = config
            .lines()
            .map(|line| match line.starts_with("MaxStartups ") {
                true => format!("MaxStartups {max}\n"),
                false => format!("{line}\n"),
            })
            .collect();
        ensure!(
            changed != config,
            "no MaxStartups line in {}",
            self.config.display()
        );
        fs::write(&self.config, changed)?;
        if self.pid().is_some() {
            self.kill()?;
        }
        self.spawn()
    }

    /// SIGKILLs every process the listening sshd forked (each connection's sshd and the
    /// session it runs), as when a builder's session dies mid-transfer; the listener
    /// keeps accepting. Returns how many processes were killed.
    pub fn kill_sessions(&self) -> Result<usize> {
        let listener = self
            .pid()
            .with_context(|| format!("sshd {} is not running", self.name))?;
        let descendants = descendants_of(listener)?;
        for &pid in &descendants {
            // SAFETY: kill(2) on a pid we just found; a process that is already gone
            // only makes it fail with ESRCH, which is fine.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
        Ok(descendants.len())
    }

    fn child(&self) -> MutexGuard<'_, Option<Child>> {
        self.child.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The server's public host key line.
    pub fn host_key(&self) -> &str {
        self.host_key.public_key()
    }

    /// Everything sshd logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_accepting(&self) -> Result<()> {
        let probe = if self.listen.is_unspecified() {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        } else {
            self.listen
        };
        let target = SocketAddr::new(probe, SSH_PORT);
        wait_until(
            &format!("sshd {} to accept on {target}", self.name),
            Duration::from_secs(20),
            || {
                let exited = match self.child().as_mut() {
                    Some(child) => child.try_wait()?,
                    None => bail!("sshd {} was killed while starting", self.name),
                };
                if let Some(status) = exited {
                    bail!("sshd {} exited ({status}):\n{}", self.name, self.log());
                }
                run_in(&self.ns_name, || {
                    TcpStream::connect_timeout(&target, Duration::from_secs(1)).is_ok()
                })
            },
        )
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Every process below `root` in the process tree (from /proc's parent pids).
fn descendants_of(root: u32) -> Result<Vec<u32>> {
    let mut parents = Vec::new();
    for entry in fs::read_dir("/proc")? {
        let Ok(pid) = entry?.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        // `pid (comm) state ppid ...`: comm may hold spaces, so parse after its `)`.
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(ppid) = ppid {
            parents.push((pid, ppid));
        }
    }
    let mut found = vec![root];
    let mut next = 0;
    while next < found.len() {
        let parent = found[next];
        found.extend(
            parents
                .iter()
                .filter(|(_, p)| *p == parent)
                .map(|(pid, _)| *pid),
        );
        next += 1;
    }
    found.remove(0);
    Ok(found)
}

fn render_config(
    spec: &SshdSpec,
    host_key: &Path,
    authorized_keys: &Path,
    also: &[SocketAddr],
) -> String {
    // `ListenAddress [v6]:port` / `v4:port`: a port given there wins over `Port`.
    let also: String = also
        .iter()
        .map(|addr| format!("ListenAddress {addr}\n"))
        .collect();
    // sshd keeps only the first SetEnv line: every variable goes on this one.
    let mut env = format!("YENSID_BUILDER={}", spec.name);
    if let Some(store) = spec.store {
        env.push_str(&format!(
            " NIX_CONF_DIR={} TMPDIR={}",
            store.conf_dir().display(),
            store.tmp_dir().display()
        ));
    }
    format!(
        "\
ListenAddress {listen}
{also}Port {SSH_PORT}
HostKey {host_key}
VersionAddendum {name}
SetEnv {env}
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
AuthorizedKeysFile {authorized_keys}
StrictModes no
UsePAM no
PidFile none
MaxStartups 1000
MaxSessions 100
# Held-open test connections never authenticate; they must not be cut off under them.
LoginGraceTime 0
",
        listen = spec.listen,
        host_key = host_key.display(),
        name = spec.name,
        authorized_keys = authorized_keys.display(),
    )
}
