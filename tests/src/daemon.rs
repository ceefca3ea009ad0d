//! The daemon under test: `yensid run` inside the client namespace but in the host's
//! mount namespace, so its pins land in the host's bpffs and outlive the process.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};

use crate::command::run;
use crate::config::{DaemonConfig, InstancePaths};
use crate::netns::Netns;
use crate::tempdir::TempDir;
use crate::unique;
use crate::wait::{wait_child, wait_until};

pub(crate) const BPFFS: &str = "/sys/fs/bpf";
/// The daemon prints a line containing this to stderr once it serves (CONTRACT.md).
const READY_LINE: &str = "yensid ready";
const READY_TIMEOUT: Duration = Duration::from_secs(20);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// `$YENSID_BIN`, else `<workspace>/target/debug/yensid`.
pub fn yensid_binary() -> PathBuf {
    std::env::var_os("YENSID_BIN").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/yensid"),
        PathBuf::from,
    )
}

/// A running `yensid run`. Dropping it kills the process and removes its pin directory
/// (on bpffs, removing the files unpins the maps and the link) and its state and
/// runtime directories (in its temp dir). Unless it was stopped
/// cleanly with [`Daemon::stop`], dropping it also echoes its log to stderr: libtest
/// captures that and shows it for failing tests only.
pub struct Daemon {
    child: Child,
    exit: Option<ExitStatus>,
    paths: InstancePaths,
    config_path: PathBuf,
    log_path: PathBuf,
    _dir: TempDir,
}

impl Daemon {
    /// Starts [`yensid_binary`] with `config` in namespace `ns` and waits for readiness.
    pub fn start(ns: &Netns, config: &DaemonConfig) -> Result<Self> {
        Self::start_binary(&yensid_binary(), ns, config)
    }

    /// Like [`Self::start`] with an explicit binary (e.g. a release build).
    pub fn start_binary(binary: &Path, ns: &Netns, config: &DaemonConfig) -> Result<Self> {
        ensure!(
            binary.exists(),
            "no yensid binary at {}: build it with `cargo build -p yensid` or set YENSID_BIN",
            binary.display()
        );
        ensure_bpffs()?;
        let id = unique::next_id();
        let dir = TempDir::new(&unique::name(&id, "daemon"))?;
        let paths = InstancePaths {
            pin_path: Path::new(BPFFS).join(unique::name(&id, "pins")),
            state_dir: dir.path().join("state"),
            runtime_dir: dir.path().join("run"),
        };
        fs::create_dir(&paths.state_dir)?;
        fs::create_dir(&paths.runtime_dir)?;
        let config_path = dir.path().join("yensid.toml");
        fs::write(&config_path, config.render(&paths))?;
        let log_path = dir.path().join("yensid.log");
        let log = File::create(&log_path)?;
        // nsenter execs the binary (no fork), so signals to the child reach yensid.
        let child = Command::new("nsenter")
            .arg(format!("--net={}", ns.path().display()))
            .arg("--")
            .arg(binary)
            .args(["run", "--config"])
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawn {}", binary.display()))?;
        let mut daemon = Self {
            child,
            exit: None,
            paths,
            config_path,
            log_path,
            _dir: dir,
        };
        daemon.wait_ready()?;
        Ok(daemon)
    }

    /// Fails if the daemon exits or stays silent; its log is echoed when the failed
    /// start drops it.
    fn wait_ready(&mut self) -> Result<()> {
        wait_until("`yensid ready`", READY_TIMEOUT, || {
            if self.log().contains(READY_LINE) {
                return Ok(true);
            }
            if let Some(status) = self.child.try_wait()? {
                self.exit = Some(status);
                bail!("yensid exited ({status}) before it was ready");
            }
            Ok(false)
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn pin_path(&self) -> &Path {
        &self.paths.pin_path
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// Everything the daemon logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Replaces the config file with `config` (atomically, so the daemon never reads a
    /// half-written file) and sends SIGHUP.
    pub fn reload(&mut self, config: &DaemonConfig) -> Result<()> {
        let next = self.config_path.with_extension("toml.next");
        fs::write(&next, config.render(&self.paths))?;
        fs::rename(&next, &self.config_path)?;
        self.signal(libc::SIGHUP)
    }

    /// SIGKILL, and reaps the process. The pins stay until this value is dropped.
    pub fn kill9(&mut self) -> Result<()> {
        self.signal(libc::SIGKILL)?;
        self.exit = Some(self.child.wait()?);
        Ok(())
    }

    /// SIGTERM and waits for the exit (SIGKILL and an error if it does not come).
    pub fn stop(&mut self) -> Result<ExitStatus> {
        self.signal(libc::SIGTERM)?;
        match wait_child(&mut self.child, STOP_TIMEOUT)? {
            Some(status) => {
                self.exit = Some(status);
                Ok(status)
            }
            None => {
                self.kill9()?;
                bail!("yensid did not exit within {STOP_TIMEOUT:?} of SIGTERM")
            }
        }
    }

    fn signal(&mut self, signal: libc::c_int) -> Result<()> {
        if let Some(status) = self.exit.or(self.child.try_wait()?) {
            self.exit = Some(status);
            bail!("yensid already exited ({status})");
        }
        let pid = libc::pid_t::try_from(self.child.id())?;
        // SAFETY: kill(2) on our own child, which has not been reaped (checked above).
        if unsafe { libc::kill(pid, signal) } != 0 {
            return Err(std::io::Error::last_os_error()).context("kill yensid");
        }
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.exit.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if !self.exit.is_some_and(|status| status.success()) {
            eprintln!(
                "---- yensid log ({}) ----\n{}",
                self.paths.pin_path.display(),
                abridged(&self.log())
            );
        }
        if let Err(e) = fs::remove_dir_all(&self.paths.pin_path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!(
                "yensid-tests: could not remove {}: {e}",
                self.paths.pin_path.display()
            );
        }
    }
}

/// The first and last lines of a long log: startup and the end are what explain a
/// failure; a thousand per-connection lines in between do not.
fn abridged(log: &str) -> String {
    const HEAD: usize = 40;
    const TAIL: usize = 80;
    let lines: Vec<&str> = log.lines().collect();
    if lines.len() <= HEAD + TAIL {
        return log.to_owned();
    }
    format!(
        "{}\n[... {} lines ...]\n{}",
        lines[..HEAD].join("\n"),
        lines.len() - HEAD - TAIL,
        lines[lines.len() - TAIL..].join("\n")
    )
}

/// Mounts bpffs at /sys/fs/bpf unless it is there already; the daemon pins there.
fn ensure_bpffs() -> Result<()> {
    static MOUNTING: Mutex<()> = Mutex::new(());
    let _turn = MOUNTING.lock().unwrap_or_else(|e| e.into_inner());
    let mounts = fs::read_to_string("/proc/self/mountinfo").context("read mountinfo")?;
    let mounted = mounts.lines().any(|line| {
        // "<id> <parent> <dev> <root> <mount point> <opts> ... - <fstype> <source> ..."
        let mut halves = line.splitn(2, " - ");
        let mount_point = halves.next().and_then(|l| l.split(' ').nth(4));
        let fs_type = halves.next().and_then(|l| l.split(' ').next());
        mount_point == Some(BPFFS) && fs_type == Some("bpf")
    });
    if !mounted {
        run(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]))?;
    }
    Ok(())
}
