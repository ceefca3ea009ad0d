//! A real systemd (PID 1 of its own container) for the shipped unit file: Debian 12
//! booted with `systemd-nspawn --boot` on a root file system made by `debootstrap`.
//!
//! The root file system is built once, from the Debian mirror this machine's apt
//! already uses, into [`ROOTFS_CACHE`] and reused by every later run (a few minutes the
//! first time). A test never writes to the cache: each [`Container`] boots an overlay
//! whose writable layer lives in its own temp dir, with a fresh bpffs instance on
//! /sys/fs/bpf (nspawn gives containers none), and its own network namespace with only
//! loopback (`--private-network`), so nothing it does reaches the host's network or
//! pins. Dropping it powers the container off and removes everything but the cache.
//!
//! Commands run inside with `nsenter` into the container's init, so they see what a
//! root shell in the container sees (mounts, network, PID namespace, systemd's bus).

use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};

use crate::command::{run, run_within};
use crate::stale;
use crate::tempdir::TempDir;
use crate::unique;
use crate::wait::{wait_child, wait_until};

/// The cached Debian 12 root file system (built on first use, never modified after).
pub const ROOTFS_CACHE: &str = "/var/cache/yensid-tests/bookworm-rootfs";
/// What the cached root file system has beyond debootstrap's minimal base: systemd as
/// init, D-Bus, and OpenSSH on both sides. Written into the cache as its marker, so a
/// cache made with another list is rebuilt.
const ROOTFS_PACKAGES: &str = "systemd,systemd-sysv,dbus,openssh-server,openssh-client";
const ROOTFS_MARKER: &str = ".yensid-rootfs-packages";
const SUITE: &str = "bookworm";
pub const NSPAWN: &str = "/usr/bin/systemd-nspawn";
pub const DEBOOTSTRAP: &str = "/usr/sbin/debootstrap";
/// debootstrap downloads and unpacks about 130 packages.
const DEBOOTSTRAP_TIMEOUT: Duration = Duration::from_secs(1200);
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
const POWEROFF_TIMEOUT: Duration = Duration::from_secs(60);
/// A command inside the container; only a hang reaches it.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);
/// The PATH of commands run inside.
const CONTAINER_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A Debian 12 container: first [`Container::prepare`] (its root file system is
/// writable from the host through [`Container::root`]), then [`Container::boot`].
pub struct Container {
    machine: String,
    root: PathBuf,
    bpffs: PathBuf,
    boot_log: PathBuf,
    nspawn: Option<Child>,
    leader: Option<u32>,
    overlay_mounted: bool,
    bpffs_mounted: bool,
    // Last: removed once everything mounted in it is gone.
    dir: TempDir,
}

impl Container {
    /// Mounts a fresh overlay over the cached root file system (built first if there is
    /// none) and a fresh bpffs for the container's /sys/fs/bpf.
    pub fn prepare() -> Result<Self> {
        stale::sweep_once();
        let lower = cached_rootfs()?;
        let id = unique::next_id();
        let dir = TempDir::new(&unique::name(&id, "container"))?;
        let mut container = Self {
            machine: unique::name(&id, "systemd"),
            root: dir.path().join("root"),
            bpffs: dir.path().join("bpffs"),
            boot_log: dir.path().join("boot.log"),
            nspawn: None,
            leader: None,
            overlay_mounted: false,
            bpffs_mounted: false,
            dir,
        };
        let (upper, work) = (
            container.dir.path().join("upper"),
            container.dir.path().join("work"),
        );
        for d in [&container.root, &container.bpffs, &upper, &work] {
            fs::create_dir(d).with_context(|| format!("mkdir {}", d.display()))?;
        }
        run(Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o"])
            .arg(format!(
                "lowerdir={},upperdir={},workdir={}",
                lower.display(),
                upper.display(),
                work.display()
            ))
            .arg(&container.root))?;
        container.overlay_mounted = true;
        // A bpffs of its own: every mount of bpf is a new, empty instance, so the
        // container's pins are not the host's.
        run(Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&container.bpffs))?;
        container.bpffs_mounted = true;
        Ok(container)
    }

    /// The container's root directory as seen from the host, for installing files
    /// before [`Container::boot`].
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Writes `contents` to `path` (absolute, inside the container) with `mode`.
    pub fn write(&self, path: &str, contents: &str, mode: u32) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let host_path = self.host_path(path);
        if let Some(parent) = host_path.parent() {
            fs::create_dir_all(parent).with_context(|| format!("mkdir {}", parent.display()))?;
        }
        fs::write(&host_path, contents)
            .with_context(|| format!("write {path} in the container"))?;
        fs::set_permissions(&host_path, fs::Permissions::from_mode(mode))
            .with_context(|| format!("chmod {path} in the container"))
    }

    /// Copies the host file `from` to `to` (absolute, inside the container) with `mode`.
    pub fn install(&self, from: &Path, to: &str, mode: u32) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let host_path = self.host_path(to);
        if let Some(parent) = host_path.parent() {
            fs::create_dir_all(parent).with_context(|| format!("mkdir {}", parent.display()))?;
        }
        fs::copy(from, &host_path)
            .with_context(|| format!("copy {} to {to} in the container", from.display()))?;
        fs::set_permissions(&host_path, fs::Permissions::from_mode(mode))
            .with_context(|| format!("chmod {to} in the container"))
    }

    fn host_path(&self, path: &str) -> PathBuf {
        self.root.join(path.trim_start_matches('/'))
    }

    /// Boots systemd in the container and waits until its boot has finished
    /// (`systemctl is-system-running --wait`: `running`, or `degraded` with the
    /// failed units named in the error).
    ///
    /// What nspawn is told, and why: `--private-network`, a network namespace with
    /// loopback only; `--capability=CAP_BPF`, which nspawn's default set lacks (it
    /// keeps CAP_NET_ADMIN and CAP_SYS_ADMIN); `--system-call-filter=bpf`, which its
    /// seccomp filter refuses otherwise; `--bind` of the fresh bpffs onto
    /// /sys/fs/bpf, which nspawn does not mount; `--register=no --keep-unit`, since
    /// the host runs no systemd or machined to register with or to ask for a scope.
    pub fn boot(&mut self) -> Result<()> {
        let log = File::create(&self.boot_log).context("create the boot log")?;
        let mut nspawn = Command::new(NSPAWN);
        nspawn
            .arg("--directory")
            .arg(&self.root)
            .arg(format!("--machine={}", self.machine))
            .args([
                "--boot",
                "--private-network",
                "--register=no",
                "--keep-unit",
                "--console=read-only",
                "--capability=CAP_BPF",
                "--system-call-filter=bpf",
            ])
            .arg(format!("--bind={}:/sys/fs/bpf", self.bpffs.display()))
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("dup the boot log")?)
            .stderr(log);
        // SAFETY: prctl is async-signal-safe. If the test process dies without its
        // Drop (SIGKILL), nspawn gets SIGTERM and powers the container off.
        unsafe {
            nspawn.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = nspawn
            .spawn()
            .with_context(|| format!("cannot spawn {NSPAWN}"))?;
        let nspawn_pid = child.id();
        self.nspawn = Some(child);
        let mut leader = None;
        wait_until("the container's systemd to start", BOOT_TIMEOUT, || {
            if let Some(status) = self.nspawn.as_mut().and_then(|c| c.try_wait().transpose()) {
                bail!(
                    "systemd-nspawn exited ({}):\n{}",
                    status?,
                    self.boot_log_tail()
                );
            }
            leader = init_of(nspawn_pid);
            Ok(leader.is_some())
        })?;
        self.leader = leader;
        // `offline` (or nothing) until systemd has set itself up, `initializing` and
        // `starting` while it boots.
        let mut state = String::new();
        wait_until("the container's boot to end", BOOT_TIMEOUT, || {
            let out = self
                .command(&["systemctl", "is-system-running"])
                .stdin(Stdio::null())
                .output()
                .context("systemctl is-system-running")?;
            state = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            if let Some(status) = self.nspawn.as_mut().and_then(|c| c.try_wait().transpose()) {
                bail!(
                    "systemd-nspawn exited ({}):\n{}",
                    status?,
                    self.boot_log_tail()
                );
            }
            Ok(!matches!(
                state.as_str(),
                "" | "offline" | "initializing" | "starting"
            ))
        })?;
        match state.as_str() {
            "running" => Ok(()),
            "degraded" => {
                let failed = self.run(&["systemctl", "--failed", "--no-legend", "--plain"])?;
                bail!("the container booted degraded; failed units:\n{failed}")
            }
            other => bail!(
                "the container's systemd is `{other}` after booting:\n{}",
                self.boot_log_tail()
            ),
        }
    }

    /// A command run inside the booted container, as root, with a clean environment.
    pub fn command(&self, args: &[&str]) -> Command {
        let leader = self.leader.expect("the container is booted");
        let mut cmd = Command::new("nsenter");
        cmd.args(["--target", &leader.to_string(), "--all", "--"])
            .args(["env", "-i", &format!("PATH={CONTAINER_PATH}"), "HOME=/root"])
            .args(args);
        cmd
    }

    /// Runs `args` inside the container; its stdout, or an error with its stderr.
    pub fn run(&self, args: &[&str]) -> Result<String> {
        run_within(&mut self.command(args), Stdio::null(), COMMAND_TIMEOUT)
    }

    /// `systemctl show -p PROPERTY UNIT`'s value.
    pub fn unit_property(&self, unit: &str, property: &str) -> Result<String> {
        let out = self.run(&["systemctl", "show", "--value", "-p", property, unit])?;
        Ok(out.trim_end_matches('\n').to_owned())
    }

    /// The journal of `unit` since the container booted.
    pub fn journal(&self, unit: &str) -> Result<String> {
        self.run(&["journalctl", "--no-pager", "-o", "cat", "-u", unit])
    }

    /// The last lines nspawn and the container's console printed.
    pub fn boot_log_tail(&self) -> String {
        let text = fs::read_to_string(&self.boot_log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Powers the container off (nspawn turns SIGTERM into a clean shutdown of its
    /// systemd); SIGKILL if that takes too long.
    fn power_off(&mut self) {
        let Some(mut child) = self.nspawn.take() else {
            return;
        };
        if let Ok(pid) = libc::pid_t::try_from(child.id()) {
            // SAFETY: kill(2) on our own unreaped child.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        if !matches!(wait_child(&mut child, POWEROFF_TIMEOUT), Ok(Some(_))) {
            let _ = child.kill();
            let _ = child.wait();
        }
        // What nspawn keeps per machine on the host; gone with a clean exit.
        for dir in [
            "/run/systemd/nspawn/propagate",
            "/run/systemd/nspawn/unix-export",
        ] {
            let _ = fs::remove_dir_all(Path::new(dir).join(&self.machine));
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        self.power_off();
        if self.overlay_mounted {
            let _ = run(Command::new("umount").arg(&self.root));
        }
        if self.bpffs_mounted {
            let _ = run(Command::new("umount").arg(&self.bpffs));
        }
    }
}

/// Detaches what a killed test process left mounted in one of its temp dirs (the
/// overlay root, the bpffs), so that the dir can be removed without descending into
/// them; for [`crate::stale`]. Not mounted: nothing happens.
pub(crate) fn release_mounts(dir: &Path) {
    for mount_point in [dir.join("root"), dir.join("bpffs")] {
        if mount_point.is_dir() {
            let _ = Command::new("umount")
                .arg("--lazy")
                .arg(&mount_point)
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// The container's init: the child of nspawn that runs systemd (nspawn clones it
/// with CLONE_PARENT, so it is nspawn's direct child).
fn init_of(nspawn: u32) -> Option<u32> {
    let children = fs::read_to_string(format!("/proc/{nspawn}/task/{nspawn}/children")).ok()?;
    children.split_whitespace().find_map(|pid| {
        let comm = fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        (comm.trim() == "systemd").then(|| pid.parse().ok())?
    })
}

/// The cached root file system, built with debootstrap if it is missing or was built
/// with another package list. Runs of several test processes take turns (a lock file
/// next to the cache); the cache appears under its name only once complete.
pub fn cached_rootfs() -> Result<PathBuf> {
    let cache = Path::new(ROOTFS_CACHE);
    let parent = cache.parent().context("the cache has a parent directory")?;
    fs::create_dir_all(parent).with_context(|| format!("mkdir {}", parent.display()))?;
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(parent.join(".lock"))
        .context("open the cache's lock file")?;
    // SAFETY: flock on a descriptor we own; released when `lock` is closed.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        bail!(
            "lock {}: {}",
            parent.display(),
            std::io::Error::last_os_error()
        );
    }
    let marker = cache.join(ROOTFS_MARKER);
    if fs::read_to_string(&marker).is_ok_and(|m| m.trim() == ROOTFS_PACKAGES) {
        return Ok(cache.to_owned());
    }
    ensure!(
        Path::new(DEBOOTSTRAP).exists(),
        "no {DEBOOTSTRAP}: install Debian's debootstrap"
    );
    let mirror = debian_mirror()?;
    let partial = parent.join("bookworm-rootfs.partial");
    for stale in [&partial, &cache.to_owned()] {
        if stale.exists() {
            fs::remove_dir_all(stale).with_context(|| format!("remove {}", stale.display()))?;
        }
    }
    eprintln!(
        "yensid-tests: building the container's root file system with debootstrap from \
         {mirror} into {} (once; a few minutes)",
        cache.display()
    );
    run_within(
        Command::new(DEBOOTSTRAP)
            .args([
                "--variant=minbase",
                &format!("--include={ROOTFS_PACKAGES}"),
                SUITE,
            ])
            .arg(&partial)
            .arg(&mirror),
        Stdio::null(),
        DEBOOTSTRAP_TIMEOUT,
    )
    .context("debootstrap")?;
    fs::write(partial.join(ROOTFS_MARKER), ROOTFS_PACKAGES).context("write the cache marker")?;
    fs::rename(&partial, cache).with_context(|| format!("rename to {}", cache.display()))?;
    Ok(cache.to_owned())
}

/// The Debian mirror this machine's apt uses for bookworm's main component: the
/// network here reaches package registries only, so debootstrap must use the same.
fn debian_mirror() -> Result<String> {
    let mut texts = Vec::new();
    for file in ["/etc/apt/sources.list"] {
        if let Ok(text) = fs::read_to_string(file) {
            texts.push((file.to_owned(), text));
        }
    }
    if let Ok(entries) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut paths: Vec<PathBuf> = entries.filter_map(|e| Some(e.ok()?.path())).collect();
        paths.sort();
        for path in paths {
            if let Ok(text) = fs::read_to_string(&path) {
                texts.push((path.display().to_string(), text));
            }
        }
    }
    texts
        .iter()
        .find_map(|(file, text)| {
            if file.ends_with(".sources") {
                deb822_mirror(text)
            } else if file.ends_with(".list") {
                one_line_mirror(text)
            } else {
                None
            }
        })
        .context("no apt source for Debian bookworm main in /etc/apt")
}

/// The first `deb` URI serving bookworm's main component in a deb822 `.sources`
/// file (stanzas separated by blank lines, `Key: value` fields). Parsed by hand: the
/// four fields needed do not justify a deb822 crate.
fn deb822_mirror(text: &str) -> Option<String> {
    text.split("\n\n").find_map(|stanza| {
        let field = |key: &str| {
            stanza.lines().find_map(|line| {
                let (k, v) = line.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case(key)
                    .then(|| v.trim().to_owned())
            })
        };
        let enabled = field("Enabled").is_none_or(|v| v != "no");
        let serves = field("Types")?.split_whitespace().any(|t| t == "deb")
            && field("Suites")?.split_whitespace().any(|s| s == SUITE)
            && field("Components")?.split_whitespace().any(|c| c == "main");
        (enabled && serves).then(|| field("URIs")?.split_whitespace().next().map(str::to_owned))?
    })
}

/// The same from one-line `deb [options] URI suite components...` entries.
fn one_line_mirror(text: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let line = line.split('#').next()?.trim();
        let rest = line.strip_prefix("deb ")?.trim_start();
        let rest = match rest.strip_prefix('[') {
            Some(options) => options.split_once(']')?.1,
            None => rest,
        };
        let mut words = rest.split_whitespace();
        let uri = words.next()?;
        let suite = words.next()?;
        (suite == SUITE && words.any(|c| c == "main")).then(|| uri.to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bookworm_main_uri_is_found_in_deb822_stanzas() {
        let text = "Types: deb\n# a comment\nURIs: http://deb.debian.org/debian\n\
                    Suites: bookworm bookworm-updates\nComponents: main\n\n\
                    Types: deb\nURIs: http://deb.debian.org/debian-security\n\
                    Suites: bookworm-security\nComponents: main\n";
        assert_eq!(
            deb822_mirror(text).as_deref(),
            Some("http://deb.debian.org/debian")
        );
        let security_only = "Types: deb\nURIs: http://x/debian-security\n\
                             Suites: bookworm-security\nComponents: main\n";
        assert_eq!(deb822_mirror(security_only), None);
        let disabled =
            "Enabled: no\nTypes: deb\nURIs: http://x/debian\nSuites: bookworm\nComponents: main\n";
        assert_eq!(deb822_mirror(disabled), None);
    }

    #[test]
    fn the_bookworm_main_uri_is_found_in_one_line_entries() {
        let text = "# deb http://old/debian bookworm main\n\
                    deb-src http://src/debian bookworm main\n\
                    deb [signed-by=/k.gpg arch=amd64] http://mirror.example/debian bookworm main contrib\n";
        assert_eq!(
            one_line_mirror(text).as_deref(),
            Some("http://mirror.example/debian")
        );
        assert_eq!(
            one_line_mirror("deb http://m/debian bookworm contrib\n"),
            None
        );
    }
}
