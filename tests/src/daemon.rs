//! The daemon under test: `yensid run` inside the client namespace but in the host's
//! mount namespace, so its pins land in the host's bpffs and outlive the process.

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail, ensure};

use crate::command::{run, run_within};
use crate::config::{DaemonConfig, Dataplane, InstancePaths, PolicyMode};
use crate::hosts::HostNames;
use crate::netns::Netns;
use crate::status::Status;
use crate::tempdir::TempDir;
use crate::unique;
use crate::wait::{wait_child, wait_until};

pub(crate) const BPFFS: &str = "/sys/fs/bpf";
/// The daemon prints a line containing this to stderr once it serves (CONTRACT.md).
const READY_LINE: &str = "yensid ready";
const TOOK_OVER_LINE: &str = "took over";
const READY_TIMEOUT: Duration = Duration::from_secs(20);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest any one CLI call may take: a stuck control socket fails the test instead
/// of hanging the suite.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(30);
/// How long closed connections may take to be recorded as ended; only against hangs.
const CONNECTIONS_END: Duration = Duration::from_secs(60);

/// The workspace's root directory.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives in the workspace")
        .to_owned()
}

/// Where cargo puts build output: `$CARGO_TARGET_DIR` (relative to the workspace
/// root when relative), else `<workspace>/target`. The one place that says so for
/// the tests and for `cargo xtask`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => workspace_root().join(dir),
        _ => workspace_root().join("target"),
    }
}

/// The daemon binary of a cargo profile (`debug` or `release`) under [`target_dir`].
pub fn built_binary(profile: &str) -> PathBuf {
    target_dir().join(profile).join("yensid")
}

/// The binary under test: `$YENSID_BIN` (which `cargo xtask test` always sets, to
/// [`built_binary`]`("debug")`), else that same path.
pub fn yensid_binary() -> PathBuf {
    match std::env::var_os("YENSID_BIN") {
        Some(bin) if !bin.is_empty() => PathBuf::from(bin),
        _ => built_binary("debug"),
    }
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
    /// How its command line is wrapped, to start it again alike.
    launch: Launch,
    /// The namespace handle it runs in, to start it again.
    netns: PathBuf,
    paths: InstancePaths,
    config_path: PathBuf,
    log_path: PathBuf,
    /// How many `yensid ready` lines the log held when the current process started.
    readies_before: usize,
    /// Builders named by host, and the hosts file the daemon sees as /etc/hosts.
    host_names: Option<(HostNames, PathBuf)>,
    _dir: TempDir,
}

/// How many forwarded connections were spliced in the kernel and how many were
/// copied in userspace, over every builder ([`Daemon::expect_data_path`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DataPathCounts {
    pub spliced: u64,
    pub copied: u64,
}

/// A process's open descriptors, pipes apart: the userspace relay keeps up to
/// 64 empty pipes pooled for the next transfer (as HAProxy does), so how many
/// pipes a daemon holds after a load depends on how many directions moved bytes
/// at once, not on a leak. Leak checks compare [`Descriptors::others`], and
/// [`Descriptors::ensure_pipes_bounded`] checks the pool's bound.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Descriptors {
    pub pipes: usize,
    pub others: usize,
}

/// The relay's pool bound (`POOLED_PIPES` in `dataplane/relay.rs`), two
/// descriptors each; the pipes of transfers still running come on top.
const POOLED_PIPE_DESCRIPTORS: usize = 2 * 64;

impl Descriptors {
    /// Counts the open descriptors of process `pid`.
    pub fn of(pid: u32) -> Result<Self> {
        let dir = format!("/proc/{pid}/fd");
        let mut counts = Descriptors::default();
        for entry in std::fs::read_dir(&dir).with_context(|| format!("list {dir}"))? {
            // A descriptor closed between the listing and the readlink is gone: not counted.
            let Ok(target) = std::fs::read_link(entry?.path()) else {
                continue;
            };
            if target.to_string_lossy().starts_with("pipe:") {
                counts.pipes += 1;
            } else {
                counts.others += 1;
            }
        }
        Ok(counts)
    }

    /// Fails if more pipes are open than the pool keeps, with `busy` transfers running.
    pub fn ensure_pipes_bounded(&self, busy: usize) -> Result<()> {
        let bound = POOLED_PIPE_DESCRIPTORS + 4 * busy;
        ensure!(
            self.pipes <= bound,
            "{} pipe descriptors open: more than the pool's {POOLED_PIPE_DESCRIPTORS} and \
             4 for each of {busy} running transfer(s)",
            self.pipes
        );
        Ok(())
    }
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

    /// Like [`Self::start`], with the builders of `names` given by host name: the daemon
    /// runs in a private mount namespace whose /etc/hosts resolves those names (its
    /// bpffs, control socket and files are the host's, as with [`Self::start`]).
    pub fn start_with_host_names(
        ns: &Netns,
        config: &DaemonConfig,
        names: &HostNames,
    ) -> Result<Self> {
        Self::start_configured(
            &yensid_binary(),
            ns,
            &|paths, names| render(config, paths, names),
            Some(names),
            Launch::default(),
        )
    }

    /// Like [`Self::start`] with an explicit binary (e.g. a release build).
    pub fn start_binary(binary: &Path, ns: &Netns, config: &DaemonConfig) -> Result<Self> {
        Self::start_configured(
            binary,
            ns,
            &|paths, names| render(config, paths, names),
            None,
            Launch::default(),
        )
    }

    /// Like [`Self::start`] with a config file written by someone else (e.g. generated
    /// by the NixOS module): `render` gets this instance's paths and returns the file.
    pub fn start_with_file(
        ns: &Netns,
        render: &dyn Fn(&InstancePaths) -> Result<String>,
    ) -> Result<Self> {
        Self::start_configured(
            &yensid_binary(),
            ns,
            &|paths, _| render(paths),
            None,
            Launch::default(),
        )
    }

    /// [`Self::start_with_file`] with an explicit binary (e.g. a release build).
    pub fn start_binary_with_file(
        binary: &Path,
        ns: &Netns,
        render: &dyn Fn(&InstancePaths) -> Result<String>,
    ) -> Result<Self> {
        Self::start_configured(
            binary,
            ns,
            &|paths, _| render(paths),
            None,
            Launch::default(),
        )
    }

    /// Like [`Self::start`], with the daemon's command line wrapped as `launch` says
    /// (e.g. fewer capabilities, or a private mount namespace); restarts wrap it alike.
    pub fn start_wrapped(ns: &Netns, config: &DaemonConfig, launch: Launch) -> Result<Self> {
        Self::start_configured(
            &yensid_binary(),
            ns,
            &|paths, names| render(config, paths, names),
            None,
            launch,
        )
    }

    fn start_configured(
        binary: &Path,
        ns: &Netns,
        render_file: &RenderFile,
        names: Option<&HostNames>,
        launch: Launch,
    ) -> Result<Self> {
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
        let host_names = match names {
            Some(names) => {
                let hosts = dir.path().join("hosts");
                fs::write(&hosts, names.hosts_file())?;
                Some((names.clone(), hosts))
            }
            None => None,
        };
        fs::write(&config_path, render_file(&paths, &host_names)?)?;
        let log_path = dir.path().join("yensid.log");
        File::create(&log_path)?;
        let netns = ns.path();
        let hosts = host_names.as_ref().map(|(_, file)| file.as_path());
        let child = spawn(binary, &launch, &netns, &config_path, &log_path, hosts)?;
        let mut daemon = Self {
            child,
            exit: None,
            binary: binary.to_owned(),
            launch,
            netns,
            paths,
            config_path,
            log_path,
            readies_before: 0,
            host_names,
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
        self.child = self.spawn_instance()?;
        self.exit = None;
        self.wait_ready()
    }

    /// A new `yensid run` of this instance: same binary, namespace, wrapping, config
    /// file and log.
    fn spawn_instance(&self) -> Result<Child> {
        let hosts = self.host_names.as_ref().map(|(_, file)| file.as_path());
        spawn(
            &self.binary,
            &self.launch,
            &self.netns,
            &self.config_path,
            &self.log_path,
            hosts,
        )
    }

    /// Starts a second `yensid run` for this instance while this one runs, as an
    /// upgrade would (`binary`, or the same one; with `config` rendered first, or the
    /// same file): it takes the listeners and connections over, and the running one
    /// exits. Returns when the new process has logged `took over` and the old one has
    /// exited successfully; from then on this value is the new process.
    pub fn take_over(
        &mut self,
        binary: Option<&Path>,
        config: Option<&DaemonConfig>,
    ) -> Result<()> {
        ensure!(self.is_running()?, "no daemon runs to take over from");
        if let Some(config) = config {
            let next = self.config_path.with_extension("toml.next");
            fs::write(&next, config.render(&self.paths))?;
            fs::rename(&next, &self.config_path)?;
        }
        if let Some(binary) = binary {
            self.binary = binary.to_owned();
        }
        let took_over_before = self.log().matches(TOOK_OVER_LINE).count();
        let successor = self.spawn_instance()?;
        let mut predecessor = std::mem::replace(&mut self.child, successor);
        let took_over = wait_until("the successor's `took over`", READY_TIMEOUT, || {
            if self.log().matches(TOOK_OVER_LINE).count() > took_over_before {
                return Ok(true);
            }
            if let Some(status) = self.child.try_wait()? {
                self.exit = Some(status);
                bail!("the successor exited ({status}) before it took over");
            }
            Ok(false)
        });
        if let Err(e) = took_over {
            // The predecessor serves on: make it this value again, so that it is
            // stopped and reaped like any daemon.
            let mut successor = std::mem::replace(&mut self.child, predecessor);
            let _ = successor.kill();
            let _ = successor.wait();
            self.exit = None;
            return Err(e);
        }
        let exit = wait_child(&mut predecessor, STOP_TIMEOUT)?;
        match exit {
            Some(status) if status.success() => Ok(()),
            Some(status) => bail!("the predecessor exited with {status} after the takeover"),
            None => {
                let _ = predecessor.kill();
                let _ = predecessor.wait();
                bail!("the predecessor still ran {STOP_TIMEOUT:?} after the takeover")
            }
        }
    }

    /// Starts a successor as [`Self::take_over`] does, with `config` plus the raw
    /// `extra_toml`, which must make it fail in the middle of the takeover. Returns
    /// once it exited and this daemon logged that it serves on.
    pub fn abort_take_over(&mut self, config: &DaemonConfig, extra_toml: &str) -> Result<()> {
        let next = self.config_path.with_extension("toml.next");
        fs::write(
            &next,
            format!("{}\n{extra_toml}\n", config.render(&self.paths)),
        )?;
        fs::rename(&next, &self.config_path)?;
        let since = SystemTime::now();
        let mut successor = self.spawn_instance()?;
        if wait_child(&mut successor, READY_TIMEOUT)?.is_none() {
            let _ = successor.kill();
            let _ = successor.wait();
            bail!("the successor did not fail");
        }
        self.wait_for_log(
            &["takeover failed: this daemon serves on"],
            since,
            READY_TIMEOUT,
        )?;
        ensure!(
            self.is_running()?,
            "the daemon exited after its successor died"
        );
        Ok(())
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

    /// Its open descriptors, pipes apart.
    pub fn descriptors(&self) -> Result<Descriptors> {
        Descriptors::of(self.pid())
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

    /// Waits until no connection is open on any builder (so every connection's path is
    /// recorded), then checks the daemon's own record of how the connections it
    /// forwarded travelled: with `Dataplane::Kernel` every one was spliced in the
    /// kernel, with `Dataplane::Userspace` every one was copied, and at least one was
    /// forwarded at all. Connections that ended before a byte was forwarded (a client
    /// that hung up during the handoff) count as neither. Returns the totals.
    pub fn expect_data_path(&self, dataplane: Dataplane) -> Result<DataPathCounts> {
        let status = self.wait_for_status("no open connection", CONNECTIONS_END, |s| {
            s.builder_names()?
                .iter()
                .map(|b| s.active(b))
                .try_fold(true, |idle, active| Ok(idle && active? == 0))
        })?;
        let mut counts = DataPathCounts::default();
        for builder in status.builder_names()? {
            let (spliced, copied) = status.data_path_counts(&builder)?;
            counts.spliced += spliced;
            counts.copied += copied;
        }
        let (expected, other) = match dataplane {
            Dataplane::Kernel => (counts.spliced, counts.copied),
            Dataplane::Userspace => (counts.copied, counts.spliced),
        };
        ensure!(
            expected > 0 && other == 0,
            "the {} data path should have carried every connection: {} spliced in the \
             kernel, {} copied in userspace: {}",
            dataplane.as_str(),
            counts.spliced,
            counts.copied,
            status.json()
        );
        Ok(counts)
    }

    /// [`Self::cli`] as user `uid` with group `gid` and no supplementary groups
    /// (`setpriv`), e.g. to check that only root or `control_group` may change things.
    pub fn cli_as(&self, uid: u32, gid: u32, args: &[&str]) -> Result<String> {
        self.cli_as_member(uid, gid, &[], args)
    }

    /// [`Self::cli`] as user `uid` with primary group `gid` and the supplementary
    /// groups `groups` (`setpriv --groups`, or `--clear-groups` when there are none),
    /// e.g. a member of `control_group` whose membership is a supplementary group, as
    /// for a real user.
    pub fn cli_as_member(
        &self,
        uid: u32,
        gid: u32,
        groups: &[u32],
        args: &[&str],
    ) -> Result<String> {
        let groups = if groups.is_empty() {
            "--clear-groups".to_owned()
        } else {
            let list: Vec<String> = groups.iter().map(u32::to_string).collect();
            format!("--groups={}", list.join(","))
        };
        run_within(
            Command::new("setpriv")
                .arg(format!("--reuid={uid}"))
                .arg(format!("--regid={gid}"))
                .arg(groups)
                .arg(&self.binary)
                .args(args)
                .arg("--config")
                .arg(&self.config_path),
            Stdio::null(),
            CLI_TIMEOUT,
        )
    }

    fn operator(&self, verb: &str, builder: &str) -> Result<String> {
        self.cli(&[verb, builder])
    }

    /// `yensid <args> --config <this instance's config>`: its stdout; an error carrying
    /// its stderr if it exits non-zero. The control socket lives in the host's mount
    /// namespace (the daemon runs there), so the CLI needs no namespace.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        run_within(
            Command::new(&self.binary)
                .args(args)
                .arg("--config")
                .arg(&self.config_path),
            Stdio::null(),
            CLI_TIMEOUT,
        )
    }

    /// Replaces the config file with `config` (atomically, so the daemon never reads a
    /// half-written file) and sends SIGHUP.
    pub fn reload(&mut self, config: &DaemonConfig) -> Result<()> {
        let next = self.config_path.with_extension("toml.next");
        fs::write(&next, render(config, &self.paths, &self.host_names)?)?;
        fs::rename(&next, &self.config_path)?;
        self.signal(libc::SIGHUP)
    }

    /// SIGSTOP: the daemon hangs (alive, its sockets open, doing nothing) until
    /// [`Self::resume`].
    pub fn pause(&mut self) -> Result<()> {
        self.signal(libc::SIGSTOP)
    }

    /// SIGCONT after [`Self::pause`].
    pub fn resume(&mut self) -> Result<()> {
        self.signal(libc::SIGCONT)
    }

    /// SIGKILL, and reaps the process. The pins stay until this value is dropped.
    pub fn kill9(&mut self) -> Result<()> {
        self.signal(libc::SIGKILL)?;
        self.exit = Some(self.child.wait()?);
        Ok(())
    }

    /// SIGTERM and waits for the exit (SIGKILL and an error if it does not come).
    pub fn stop(&mut self) -> Result<ExitStatus> {
        self.stop_with(libc::SIGTERM)
    }

    /// SIGINT (^C) and waits for the exit, like [`Self::stop`].
    pub fn interrupt(&mut self) -> Result<ExitStatus> {
        self.stop_with(libc::SIGINT)
    }

    fn stop_with(&mut self, signal: libc::c_int) -> Result<ExitStatus> {
        self.signal(signal)?;
        match wait_child(&mut self.child, STOP_TIMEOUT)? {
            Some(status) => {
                self.exit = Some(status);
                Ok(status)
            }
            None => {
                self.kill9()?;
                bail!("yensid did not exit within {STOP_TIMEOUT:?} of signal {signal}")
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

/// Hostile-input helpers (tests/hostile_config.rs): raw TOML the typed config cannot
/// express, the instance's state file and control socket, liveness.
impl Daemon {
    /// `<state_dir>/<instance>.json`, where the daemon keeps drains and the override.
    pub fn state_file(&self) -> PathBuf {
        self.paths
            .state_dir
            .join(format!("{}.json", self.instance()))
    }

    /// `<runtime_dir>/<instance>.sock`.
    pub fn control_socket(&self) -> PathBuf {
        self.paths
            .runtime_dir
            .join(format!("{}.sock", self.instance()))
    }

    fn instance(&self) -> String {
        self.paths
            .pin_path
            .file_name()
            .map_or_else(|| "yensid".to_owned(), |n| n.to_string_lossy().into_owned())
    }

    /// Like [`Self::reload`], with raw TOML appended to the rendered `config`.
    pub fn reload_with_extra_toml(&mut self, config: &DaemonConfig, toml: &str) -> Result<()> {
        let next = self.config_path.with_extension("toml.next");
        fs::write(&next, format!("{}\n{toml}\n", config.render(&self.paths)))?;
        fs::rename(&next, &self.config_path)?;
        self.signal(libc::SIGHUP)
    }

    /// Whether the process still runs (it has not exited, cleanly or not).
    pub fn is_running(&mut self) -> Result<bool> {
        if self.exit.is_none()
            && let Some(status) = self.child.try_wait()?
        {
            self.exit = Some(status);
        }
        Ok(self.exit.is_none())
    }

    /// Sends SIGTERM and returns at once; [`Self::stop`] waits for the exit.
    pub fn terminate(&mut self) -> Result<()> {
        self.signal(libc::SIGTERM)
    }
}

/// `yensid check-config` on a raw TOML text, inside namespace `ns` when given (it
/// checks the listeners of the namespace it runs in): its exit status and output.
pub fn check_config_text(ns: Option<&Netns>, toml: &str) -> Result<crate::cli::CliOutput> {
    let dir = TempDir::new(&unique::name(&unique::next_id(), "config"))?;
    let file = dir.path().join("yensid.toml");
    fs::write(&file, toml)?;
    let mut command = match ns {
        Some(ns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net={}", ns.path().display()))
                .arg("--")
                .arg(yensid_binary());
            c
        }
        None => Command::new(yensid_binary()),
    };
    let out = command
        .arg("check-config")
        .arg(&file)
        .stdin(Stdio::null())
        .output()
        .context("spawn yensid check-config")?;
    Ok(crate::cli::CliOutput {
        success: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
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
    run_within(
        Command::new(yensid_binary()).arg("check-config").arg(&file),
        Stdio::null(),
        CLI_TIMEOUT,
    )
    .with_context(|| format!("the config was:\n{}", config.render(&paths)))
}

/// How the daemon's command line is wrapped: `outer` runs first and must exec
/// `nsenter --net=<ns> --`, which runs `inner`, which must exec `yensid run ...`. Every
/// program in the chain execs the next (no fork), so the child's pid is yensid's and
/// signals reach it.
#[derive(Clone, Debug, Default)]
pub struct Launch {
    /// Before `nsenter` (in the host's namespaces), e.g. `unshare --mount`.
    pub outer: Vec<String>,
    /// Between `nsenter` and the daemon (inside its network namespace), e.g.
    /// `setpriv` dropping capabilities.
    pub inner: Vec<String>,
}

/// A hosts file the daemon runs with, and the names in it.
type HostsFile = Option<(HostNames, PathBuf)>;

/// Writes a daemon's config file from its paths and hosts file.
type RenderFile<'a> = dyn Fn(&InstancePaths, &HostsFile) -> Result<String> + 'a;

/// `config` as the daemon reads it: with the builders of `host_names` by host name.
fn render(config: &DaemonConfig, paths: &InstancePaths, host_names: &HostsFile) -> Result<String> {
    let text = config.render(paths);
    match host_names {
        Some((names, _)) => names.rewrite(&text),
        None => Ok(text),
    }
}

/// Starts `yensid run` in the network namespace `netns`, logging to `log`, wrapped as
/// `launch` says; with `hosts`, in a private mount namespace where that file is
/// /etc/hosts.
fn spawn(
    binary: &Path,
    launch: &Launch,
    netns: &Path,
    config: &Path,
    log: &Path,
    hosts: Option<&Path>,
) -> Result<Child> {
    let log = OpenOptions::new()
        .append(true)
        .open(log)
        .with_context(|| format!("open {}", log.display()))?;
    let mut cmd = match launch.outer.split_first() {
        Some((program, args)) => {
            let mut cmd = Command::new(program);
            cmd.args(args).arg("nsenter");
            cmd
        }
        None => Command::new("nsenter"),
    };
    // nsenter, unshare and sh exec the next program (no fork), so signals to the
    // child reach yensid. The hosts file is mounted before `launch.inner`, which may
    // drop the capability mounting needs.
    cmd.arg(format!("--net={}", netns.display())).arg("--");
    if let Some(hosts) = hosts {
        cmd.args(["unshare", "--mount", "--propagation", "private", "--"])
            .args([
                "/bin/sh",
                "-c",
                r#"mount --bind "$0" /etc/hosts && exec "$@""#,
            ])
            .arg(hosts);
    }
    cmd.args(&launch.inner)
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
