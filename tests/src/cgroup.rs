//! A cgroup v2 of this test process's own, for the local path's programs
//! (`[daemon] local_cgroup`): attached there instead of the root cgroup,
//! they rewrite the connects of this process and its children only, never
//! those of anything else on the machine.
//!
//! The whole process moves into it (cgroup v2 moves processes, not
//! threads), so every test of one binary shares it: each test holds a
//! [`TestCgroup`], and the last one dropped moves the process back where it
//! was and removes the cgroup. The daemons' programs only act on the
//! namespace their daemon runs in, so tests in the same cgroup stay apart.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use anyhow::{Context, Result, bail};

use crate::wait::wait_until;

/// The shared cgroup while any test holds it.
static SHARED: Mutex<Weak<Inner>> = Mutex::new(Weak::new());

struct Inner {
    path: PathBuf,
    /// Where the process was before.
    previous: PathBuf,
}

/// A handle on the test process's cgroup; see the module documentation.
#[derive(Clone)]
pub struct TestCgroup(Arc<Inner>);

impl TestCgroup {
    /// Joins the process's test cgroup, creating it (and moving the process
    /// into it) if no test holds it.
    pub fn join() -> Result<Self> {
        let mut shared = SHARED.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(inner) = shared.upgrade() {
            return Ok(Self(inner));
        }
        let root = cgroup2_root()?;
        let own = std::fs::read_to_string("/proc/self/cgroup")?;
        let own = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .context("this process is in no cgroup v2")?;
        let previous = root.join(own.trim_start_matches('/'));
        // Named like every harness object, so that `stale` removes it if this
        // process is killed before its `Drop` runs.
        let owner = format!("{:x}", std::process::id());
        let path = root.join(crate::unique::name(&owner, "local"));
        match std::fs::create_dir(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e).with_context(|| format!("create {}", path.display())),
        }
        move_process(&path)?;
        let inner = Arc::new(Inner { path, previous });
        *shared = Arc::downgrade(&inner);
        Ok(Self(inner))
    }

    /// The cgroup's directory, for `local_cgroup`.
    pub fn path(&self) -> &Path {
        &self.0.path
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // A test joining meanwhile waits, then makes the cgroup anew.
        let _shared = SHARED.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = move_process(&self.previous) {
            eprintln!(
                "cannot move the test process back to {}: {e:#}",
                self.previous.display()
            );
            return;
        }
        // Children started in it (daemons, sshd) may take a moment to be reaped.
        let removed = wait_until("the test cgroup to empty", Duration::from_secs(30), || {
            Ok(std::fs::remove_dir(&self.path).is_ok() || !self.path.exists())
        });
        if let Err(e) = removed {
            eprintln!("cannot remove {}: {e:#}", self.path.display());
        }
    }
}

fn move_process(cgroup: &Path) -> Result<()> {
    std::fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string())
        .with_context(|| format!("move this process into {}", cgroup.display()))
}

/// The mount point of the cgroup v2 hierarchy.
pub fn cgroup2_root() -> Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
    for line in mounts.lines() {
        let Some((fields, rest)) = line.split_once(" - ") else {
            continue;
        };
        if rest.split_whitespace().next() == Some("cgroup2")
            && let Some(mount) = fields.split_whitespace().nth(4)
        {
            return Ok(PathBuf::from(mount));
        }
    }
    bail!("no cgroup2 file system is mounted")
}
