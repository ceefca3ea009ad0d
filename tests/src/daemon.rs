//! The daemon under test: `yensid run` inside the client namespace but in the host's
//! mount namespace, so its pins land in the host's bpffs and outlive the process.

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail, ensure};

use crate::command::run;
use crate::config::{DaemonConfig, InstancePaths, PolicyMode};
use crate::netns::Netns;
use crate::status::Status;
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
    binary: PathBuf,
    /// The namespace handle it runs in, to start it again.
    netns: PathBuf,
    paths: InstancePaths,
    config_path: PathBuf,
    log_path: PathBuf,
    /// How many `yensid ready` lines the log held when the current process started.
    readies_before: usize,
    _dir: TempDir,
}

/// One line of the daemon's log, with the time it carries.
#[derive(Clone, Debug)]
pub struct LogLine {
    pub at: SystemTime,
    pub text: String,
}

impl LogLine {
    /// Whether the line contains every one of `needles`.
    pub fn contains_all(&self, needles: &[&str]) -> bool {
        needles.iter().all(|n| self.text.contains(n))
    }
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
        File::create(&log_path)?;
        let netns = ns.path();
        let child = spawn(binary, &netns, &config_path, &log_path)?;
        let mut daemon = Self {
            child,
            exit: None,
            binary: binary.to_owned(),
            netns,
            paths,
            config_path,
            log_path,
            readies_before: 0,
            _dir: dir,
        };
        daemon.wait_ready()?;
        Ok(daemon)
    }

    /// Starts this instance again after [`Self::stop`] or [`Self::kill9`]: same binary,
    /// namespace, config file, pin path, state and runtime directories, so what the
    /// daemon keeps across restarts (drained builders) carries over. The log goes on
    /// in the same file.
    pub fn restart(&mut self) -> Result<()> {
        if self.exit.is_none() {
            if let Some(status) = self.child.try_wait()? {
                self.exit = Some(status);
            } else {
                bail!("yensid still runs; stop it before restarting it");
            }
        }
        self.readies_before = self.log().matches(READY_LINE).count();
        self.child = spawn(&self.binary, &self.netns, &self.config_path, &self.log_path)?;
        self.exit = None;
        self.wait_ready()
    }

    /// Fails if the daemon exits or stays silent; its log is echoed when the failed
    /// start drops it.
    fn wait_ready(&mut self) -> Result<()> {
        wait_until("`yensid ready`", READY_TIMEOUT, || {
            if self.log().matches(READY_LINE).count() > self.readies_before {
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

    /// Everything the daemon logged so far, byte for byte (to check that it wrote no raw
    /// bytes a client sent).
    pub fn log_bytes(&self) -> Vec<u8> {
        fs::read(&self.log_path).unwrap_or_default()
    }

    /// The log lines stamped at or after `since` (lines without a time stamp, such as
    /// continuation lines, are left out).
    pub fn log_since(&self, since: SystemTime) -> Vec<LogLine> {
        self.log()
            .lines()
            .filter_map(|line| {
                let at = parse_timestamp(line.split_whitespace().next()?)?;
                Some(LogLine {
                    at,
                    text: line.to_owned(),
                })
            })
            .filter(|line| line.at >= since)
            .collect()
    }

    /// Waits for the first line stamped at or after `since` that contains every one of
    /// `needles`, and returns it.
    pub fn wait_for_log(
        &self,
        needles: &[&str],
        since: SystemTime,
        timeout: Duration,
    ) -> Result<LogLine> {
        let mut found = None;
        wait_until(
            &format!("a yensid log line with {needles:?}"),
            timeout,
            || {
                found = self
                    .log_since(since)
                    .into_iter()
                    .find(|line| line.contains_all(needles));
                Ok(found.is_some())
            },
        )?;
        Ok(found.expect("wait_until returned after finding it"))
    }

    /// `yensid drain <builder> --config <this instance's config>`: its stdout; an error
    /// carrying its stderr if it exits non-zero.
    pub fn drain(&self, builder: &str) -> Result<String> {
        self.operator("drain", builder)
    }

    /// `yensid undrain <builder> --config <this instance's config>`, like [`Self::drain`].
    pub fn undrain(&self, builder: &str) -> Result<String> {
        self.operator("undrain", builder)
    }

    /// `yensid mode --config <this instance's config>`: the mode in force and where it
    /// comes from, as the CLI prints it (also while the daemon is stopped).
    pub fn mode(&self) -> Result<String> {
        self.cli(&["mode"])
    }

    /// `yensid mode <mode> [--for <duration>]`: an operator override.
    pub fn set_mode(&self, mode: PolicyMode, duration: Option<Duration>) -> Result<String> {
        let duration = duration.map(|d| format!("{}ms", d.as_millis()));
        let mut args = vec!["mode", mode.as_str()];
        if let Some(duration) = &duration {
            args.extend(["--for", duration]);
        }
        self.cli(&args)
    }

    /// `yensid mode --reset`: removes the operator's override.
    pub fn reset_mode(&self) -> Result<String> {
        self.cli(&["mode", "--reset"])
    }

    /// `yensid status --json`, read.
    pub fn status(&self) -> Result<Status> {
        Status::parse(&self.cli(&["status", "--json"])?)
    }

    /// Polls [`Self::status`] until `condition` holds of it, and returns that status;
    /// on a timeout the error carries the last document.
    pub fn wait_for_status(
        &self,
        what: &str,
        timeout: Duration,
        mut condition: impl FnMut(&Status) -> Result<bool>,
    ) -> Result<Status> {
        let mut last = None;
        wait_until(what, timeout, || {
            let status = self.status()?;
            let done = condition(&status)?;
            last = Some(status);
            Ok(done)
        })
        .with_context(|| match &last {
            Some(status) => format!("last status: {}", status.json()),
            None => "no status".to_owned(),
        })?;
        Ok(last.expect("wait_until returned after a status"))
    }

    /// [`Self::cli`] as user `uid` with group `gid` and no supplementary groups
    /// (`setpriv`), e.g. to check that only root or `control_group` may change things.
    pub fn cli_as(&self, uid: u32, gid: u32, args: &[&str]) -> Result<String> {
        run(Command::new("setpriv")
            .arg(format!("--reuid={uid}"))
            .arg(format!("--regid={gid}"))
            .arg("--clear-groups")
            .arg(&self.binary)
            .args(args)
            .arg("--config")
            .arg(&self.config_path))
    }

    fn operator(&self, verb: &str, builder: &str) -> Result<String> {
        self.cli(&[verb, builder])
    }

    /// `yensid <args> --config <this instance's config>`: its stdout; an error carrying
    /// its stderr if it exits non-zero. The control socket lives in the host's mount
    /// namespace (the daemon runs there), so the CLI needs no namespace.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        run(Command::new(&self.binary)
            .args(args)
            .arg("--config")
            .arg(&self.config_path))
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

/// `yensid check-config` on `config` rendered with throwaway instance paths: its stdout
/// (`ok: ...`), or an error carrying the problems it printed.
pub fn check_config(config: &DaemonConfig) -> Result<String> {
    let dir = TempDir::new(&unique::name(&unique::next_id(), "config"))?;
    let paths = InstancePaths {
        pin_path: Path::new(BPFFS).join(unique::name(&unique::next_id(), "pins")),
        state_dir: dir.path().join("state"),
        runtime_dir: dir.path().join("run"),
    };
    let file = dir.path().join("yensid.toml");
    fs::write(&file, config.render(&paths))?;
    run(Command::new(yensid_binary()).arg("check-config").arg(&file))
        .with_context(|| format!("the config was:\n{}", config.render(&paths)))
}

/// Starts `yensid run` in the network namespace `netns`, logging to `log`.
fn spawn(binary: &Path, netns: &Path, config: &Path, log: &Path) -> Result<Child> {
    let log = OpenOptions::new()
        .append(true)
        .open(log)
        .with_context(|| format!("open {}", log.display()))?;
    // nsenter execs the binary (no fork), so signals to the child reach yensid.
    Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .arg("--")
        .arg(binary)
        .args(["run", "--config"])
        .arg(config)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("spawn {}", binary.display()))
}

/// A tracing time stamp, `2026-01-02T03:04:05.123456Z` (UTC, any number of fraction
/// digits).
fn parse_timestamp(stamp: &str) -> Option<SystemTime> {
    let stamp = stamp.strip_suffix('Z')?;
    let (date, time) = stamp.split_once('T')?;
    let mut date = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (year, month, day) = (date.next()??, date.next()??, date.next()??);
    let (clock, fraction) = time.split_once('.').unwrap_or((time, "0"));
    let mut clock = clock.splitn(3, ':').map(|p| p.parse::<u64>().ok());
    let (hour, minute, second) = (clock.next()??, clock.next()??, clock.next()??);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || fraction.is_empty() {
        return None;
    }
    let nanos: u32 = format!("{:0<9}", fraction.get(..fraction.len().min(9))?)
        .parse()
        .ok()?;
    // Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let year_of_era = y - era * 400;
    let day_of_year = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    let days = u64::try_from(era * 146_097 + day_of_era - 719_468).ok()?;
    let seconds = days * 86_400 + hour * 3600 + minute * 60 + second;
    Some(SystemTime::UNIX_EPOCH + Duration::new(seconds, nanos))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_parse_as_utc() {
        let at = parse_timestamp("2026-11-24T21:48:00.123456Z").expect("valid");
        let since_epoch = at
            .duration_since(SystemTime::UNIX_EPOCH)
            .expect("after 1970");
        assert_eq!(since_epoch, Duration::new(1_795_556_880, 123_456_000));
        let leap = parse_timestamp("2024-02-29T00:00:01Z").expect("valid");
        assert_eq!(
            leap.duration_since(SystemTime::UNIX_EPOCH)
                .expect("after 1970"),
            Duration::from_secs(1_709_164_801)
        );
        assert_eq!(parse_timestamp("INFO"), None);
        assert_eq!(parse_timestamp("2026-13-01T00:00:00Z"), None);
    }
}
