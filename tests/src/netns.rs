//! Network namespaces made with `ip netns add`, and running code or programs inside one.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::command::run;
use crate::stale;

/// Where `ip netns` keeps its namespace handles.
pub(crate) const NETNS_DIR: &str = "/run/netns";

/// `ip netns add/del` set up and tear down the shared /run/netns mount on first use;
/// concurrent calls from parallel tests can race on it, so they take turns.
static IP_NETNS: Mutex<()> = Mutex::new(());

/// A named network namespace with loopback up, deleted on drop together with every
/// process still inside it.
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates the namespace `name` (which must be unique on this machine) and brings up
    /// its loopback.
    pub fn create(name: &str) -> Result<Self> {
        stale::sweep_once();
        {
            let _turn = IP_NETNS.lock().unwrap_or_else(|e| e.into_inner());
            run(Command::new("ip").args(["netns", "add", name]))?;
        }
        let ns = Self {
            name: name.to_owned(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace handle, for `nsenter --net=` and `setns`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(NETNS_DIR).join(&self.name)
    }

    /// `ip -n <ns> <args>`.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args)).map(drop)
    }

    /// `ip -n <ns> <args>`, and what it printed.
    pub fn ip_output(&self, args: &[&str]) -> Result<String> {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// A command that runs `program` inside the namespace (`ip netns exec`, which also
    /// gives it a private /sys; use `nsenter` where the host's bpffs matters).
    pub fn command(&self, program: &str) -> Command {
        exec_command(&self.name, program)
    }

    /// Runs `f` on a thread that has joined this namespace, so every socket it creates
    /// lives here. Sockets stay in their namespace when handed to other threads, so only
    /// socket creation needs this; reads and writes work from anywhere.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        run_in(&self.name, f)
    }
}

/// [`Netns::run`] by namespace name, for owners of processes inside a namespace that
/// they do not own.
pub(crate) fn run_in<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
    let path = PathBuf::from(NETNS_DIR).join(name);
    let handle = File::open(&path).with_context(|| format!("open {}", path.display()))?;
    thread::scope(|scope| {
        let worker = scope.spawn(move || {
            // SAFETY: `handle` is an open namespace fd; setns with CLONE_NEWNET only
            // changes the calling thread's network namespace.
            if unsafe { libc::setns(handle.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error())
                    .with_context(|| format!("setns into {name}"));
            }
            Ok(f())
        });
        worker
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

impl Drop for Netns {
    fn drop(&mut self) {
        delete_with_processes(&self.name);
    }
}

/// `ip netns exec <ns> <program>`; `ip` execs the program, so the child's pid is the
/// program's own and signals reach it directly.
pub(crate) fn exec_command(ns: &str, program: &str) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, program]);
    cmd
}

/// Kills every process inside namespace `name` (a namespace lives as long as one
/// process is in it) and deletes it, which also destroys its veth ends.
pub(crate) fn delete_with_processes(name: &str) {
    for _ in 0..100 {
        let pids = pids(name);
        if pids.is_empty() {
            break;
        }
        for pid in pids {
            // SAFETY: plain kill(2) on a pid that `ip netns pids` just reported inside a
            // namespace this harness created.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        thread::sleep(Duration::from_millis(10));
    }
    let _turn = IP_NETNS.lock().unwrap_or_else(|e| e.into_inner());
    if let Err(e) = run(Command::new("ip").args(["netns", "del", name])) {
        eprintln!("yensid-tests: could not delete namespace {name}: {e:#}");
    }
}

fn pids(name: &str) -> Vec<i32> {
    run(Command::new("ip").args(["netns", "pids", name]))
        .map(|out| out.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// Fails unless `name` fits in a Linux interface name.
pub(crate) fn check_ifname(name: &str) -> Result<()> {
    if name.len() > 15 {
        bail!("interface name {name:?} is longer than 15 bytes");
    }
    Ok(())
}
