//! The real OpenSSH client, run inside a namespace.

use std::fmt::Write as _;
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, ensure};

use crate::command::{drain, run_within, wait_or_kill};
use crate::netns::{Netns, exec_command};
use crate::payload::sha256_of_output;
use crate::sshd::SSH_PORT;

/// How long [`SshClient::run`] lets a session take before killing it.
const SESSION_TIMEOUT: Duration = Duration::from_secs(120);

/// A known_hosts file's content. Several keys may share one host name: that is how a
/// client accepts whichever builder of the pool answers the service address.
#[derive(Default)]
pub struct KnownHosts {
    text: String,
}

impl KnownHosts {
    pub fn new() -> Self {
        Self::default()
    }

    /// Trusts `key` (a `type base64 [comment]` line) for `host`.
    pub fn add(&mut self, host: SocketAddr, key: &str) -> &mut Self {
        let name = if host.port() == SSH_PORT {
            host.ip().to_string()
        } else {
            format!("[{}]:{}", host.ip(), host.port())
        };
        let _ = writeln!(self.text, "{name} {key}");
        self
    }

    pub fn render(&self) -> &str {
        &self.text
    }
}

/// `ssh` as root with one identity and one known_hosts file, strict host key checking
/// and no interaction, inside a namespace.
#[derive(Clone)]
pub struct SshClient {
    ns: String,
    identity: PathBuf,
    known_hosts: PathBuf,
}

impl SshClient {
    pub fn new(ns: &Netns, identity: &Path, known_hosts: &Path) -> Self {
        Self {
            ns: ns.name().to_owned(),
            identity: identity.to_owned(),
            known_hosts: known_hosts.to_owned(),
        }
    }

    /// The `ssh` command that runs `remote` on `target`; the caller wires stdio, e.g. to
    /// stream a file through the session or keep it open in the background.
    pub fn command(&self, target: SocketAddr, remote: &str) -> Command {
        self.command_with(target, &[], remote)
    }

    /// [`Self::command`] with more ssh options (e.g. `["-c", cipher]`) before the
    /// destination.
    pub fn command_with(&self, target: SocketAddr, options: &[&str], remote: &str) -> Command {
        let mut cmd = exec_command(&self.ns, "ssh");
        cmd.args(options);
        cmd.args(["-F", "/dev/null", "-i"])
            .arg(&self.identity)
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", self.known_hosts.display()))
            .args([
                "-o",
                "GlobalKnownHostsFile=/dev/null",
                "-o",
                "StrictHostKeyChecking=yes",
                "-o",
                "UpdateHostKeys=no",
                "-o",
                "IdentitiesOnly=yes",
                "-o",
                "BatchMode=yes",
                "-o",
                "ConnectTimeout=5",
                // A peer that stops answering ends the session in 30 s instead of never.
                "-o",
                "ServerAliveInterval=5",
                "-o",
                "ServerAliveCountMax=6",
                "-o",
                "LogLevel=ERROR",
                "-p",
            ])
            .arg(target.port().to_string())
            .arg(format!("root@{}", target.ip()))
            .arg(remote);
        cmd
    }

    /// Runs `remote` on `target` and returns its stdout; fails with ssh's stderr.
    pub fn run(&self, target: SocketAddr, remote: &str) -> Result<String> {
        run_within(
            &mut self.command(target, remote),
            Stdio::null(),
            SESSION_TIMEOUT,
        )
    }

    /// Runs `remote` on `target` with the file `input` as its stdin and returns its
    /// stdout; killed after `timeout`.
    pub fn run_with_input(
        &self,
        target: SocketAddr,
        remote: &str,
        input: &Path,
        timeout: Duration,
    ) -> Result<String> {
        let input = File::open(input).with_context(|| format!("open {}", input.display()))?;
        run_within(&mut self.command(target, remote), input.into(), timeout)
    }

    /// Uploads `input` to `target` through a session that hashes what it received
    /// (`sha256sum`), checks that `sha256` arrived, and returns the builder that served
    /// it; killed after `timeout`.
    pub fn upload_checked(
        &self,
        target: SocketAddr,
        input: &Path,
        sha256: &str,
        timeout: Duration,
    ) -> Result<String> {
        let out = self.run_with_input(target, "sha256sum; echo $YENSID_BUILDER", input, timeout)?;
        let mut lines = out.lines();
        let received = lines.next().unwrap_or_default();
        let builder = lines.next().unwrap_or_default().trim();
        ensure!(
            received.starts_with(sha256) && !builder.is_empty(),
            "an upload of {} arrived as {out:?} (want {sha256} and the builder's name)",
            input.display()
        );
        Ok(builder.to_owned())
    }

    /// Runs `remote` on `target` and returns the SHA-256 of everything it wrote to
    /// stdout, streamed through `sha256sum` so nothing lands on disk; killed after
    /// `timeout`.
    pub fn run_digesting_output(
        &self,
        target: SocketAddr,
        remote: &str,
        timeout: Duration,
    ) -> Result<String> {
        let mut digest = Command::new("sha256sum")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("spawn sha256sum")?;
        let digest_input = digest.stdin.take().context("sha256sum stdin")?;
        let digest_output = drain(digest.stdout.take());

        // The Command is a temporary: it would otherwise keep its copy of sha256sum's
        // input open, and sha256sum would never see EOF.
        let mut ssh = self
            .command(target, remote)
            .stdin(Stdio::null())
            .stdout(digest_input)
            .stderr(Stdio::piped())
            .spawn()
            .context("spawn ssh")?;
        let ssh_stderr = drain(ssh.stderr.take());
        let ssh_status = wait_or_kill(&mut ssh, &format!("ssh {target} {remote:?}"), timeout);
        // ssh held the only write end of sha256sum's input; it has exited (or been
        // killed), so sha256sum sees EOF and finishes on its own.
        let digest_status = wait_or_kill(&mut digest, "sha256sum", timeout)?;
        let ssh_status = ssh_status?;
        ensure!(
            ssh_status.success(),
            "ssh {target} {remote:?} failed ({ssh_status}): {}",
            String::from_utf8_lossy(&ssh_stderr.join().unwrap_or_default()).trim()
        );
        ensure!(
            digest_status.success(),
            "sha256sum failed ({digest_status})"
        );
        sha256_of_output(&String::from_utf8_lossy(
            &digest_output.join().unwrap_or_default(),
        ))
    }

    /// Opens a session on `target` and returns the name of the server that served it.
    pub fn served_by(&self, target: SocketAddr) -> Result<String> {
        let out = self.run(target, "echo $YENSID_BUILDER")?;
        let name = out.trim();
        ensure!(
            !name.is_empty(),
            "session on {target} printed no builder name"
        );
        Ok(name.to_owned())
    }
}

/// A real ssh session that stays open until told to finish: it prints its
/// builder, waits for a line on stdin, then prints its builder and that
/// line. Killed on drop.
pub struct LiveSession {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    stdout: std::io::BufReader<std::process::ChildStdout>,
    builder: String,
}

impl LiveSession {
    /// Opens the session to `target` and waits until a builder answered.
    pub fn start(ssh: &SshClient, target: SocketAddr) -> Result<Self> {
        use std::io::BufRead;
        let mut child = ssh
            .command(
                target,
                "echo $YENSID_BUILDER; read line; echo $YENSID_BUILDER $line",
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("spawn ssh")?;
        let stdin = child.stdin.take().context("ssh stdin")?;
        let mut stdout = std::io::BufReader::new(child.stdout.take().context("ssh stdout")?);
        let mut first = String::new();
        stdout.read_line(&mut first)?;
        let builder = first.trim().to_owned();
        ensure!(
            builder.starts_with('b') && builder.len() > 1,
            "live session served by {builder:?}"
        );
        Ok(Self {
            child,
            stdin,
            stdout,
            builder,
        })
    }

    /// The builder serving the session.
    pub fn builder(&self) -> &str {
        &self.builder
    }

    /// Lets the session end and checks it did so normally, on the same
    /// builder, with its output.
    pub fn finish(&mut self) -> Result<()> {
        use std::io::{Read, Write};
        self.stdin.write_all(b"done\n")?;
        let mut rest = String::new();
        self.stdout.read_to_string(&mut rest)?;
        let status = crate::wait::wait_child(&mut self.child, Duration::from_secs(60))?
            .context("live session did not end")?;
        ensure!(
            status.success() && rest.trim() == format!("{} done", self.builder),
            "live session on {} ended with {status}, output {rest:?}",
            self.builder
        );
        Ok(())
    }
}

impl Drop for LiveSession {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
