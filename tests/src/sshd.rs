//! Real OpenSSH servers: the builders, and the client host's own sshd.

use std::fs::{self, File};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::command::run;
use crate::netns::Netns;
use crate::wait::wait_until;

pub const SSH_PORT: u16 = 22;

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
}

/// A running `sshd -D` with its own host key, killed on drop.
pub struct Sshd {
    child: Child,
    name: String,
    host_key: KeyPair,
    log: PathBuf,
}

impl Sshd {
    /// Starts sshd in `ns` with its files under `dir`, and returns once it accepts TCP.
    pub fn start(ns: &Netns, dir: &Path, spec: &SshdSpec) -> Result<Self> {
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
            render_config(spec, host_key.private_key(), &authorized_keys),
        )?;

        let log = own_dir.join("sshd.log");
        let log_file = File::create(&log)?;
        let child = ns
            .command("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .context("spawn sshd")?;
        let mut sshd = Self {
            child,
            name: spec.name.to_owned(),
            host_key,
            log,
        };
        sshd.wait_accepting(ns, spec.listen)?;
        Ok(sshd)
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

    fn wait_accepting(&mut self, ns: &Netns, listen: IpAddr) -> Result<()> {
        let probe = if listen.is_unspecified() {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        } else {
            listen
        };
        let target = SocketAddr::new(probe, SSH_PORT);
        wait_until(
            &format!("sshd {} to accept on {target}", self.name),
            Duration::from_secs(20),
            || {
                if let Some(status) = self.child.try_wait()? {
                    bail!("sshd {} exited ({status}):\n{}", self.name, self.log());
                }
                ns.run(|| TcpStream::connect_timeout(&target, Duration::from_secs(1)).is_ok())
            },
        )
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn render_config(spec: &SshdSpec, host_key: &Path, authorized_keys: &Path) -> String {
    format!(
        "\
ListenAddress {listen}
Port {SSH_PORT}
HostKey {host_key}
VersionAddendum {name}
SetEnv YENSID_BUILDER={name}
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
