//! Sweeping what killed test processes left behind.
//!
//! `Drop` cleans up after panics, but not after SIGKILL (a CI timeout, a ^C'd cargo).
//! Every object the harness creates outside its process is named by
//! [`unique::name`], which starts with the creator's pid; anything of that shape whose
//! creator is gone is removed the first time a process builds a namespace.

use std::fs;
use std::path::Path;
use std::sync::Once;

use crate::{cgroup, container, daemon, netns, unique};

pub(crate) fn sweep_once() {
    static SWEEP: Once = Once::new();
    SWEEP.call_once(|| {
        for name in orphans(Path::new(netns::NETNS_DIR)) {
            netns::delete_with_processes(&name);
        }
        for dir in [Path::new(daemon::BPFFS), &std::env::temp_dir()] {
            for name in orphans(dir) {
                container::release_mounts(&dir.join(&name));
                let _ = fs::remove_dir_all(dir.join(name));
            }
        }
        // A cgroup of a dead process is empty; rmdir removes it (its control
        // files cannot be unlinked one by one).
        if let Ok(root) = cgroup::cgroup2_root() {
            for name in orphans(&root) {
                let _ = fs::remove_dir(root.join(name));
            }
        }
    });
}

/// Entries of `dir` named by the harness whose creating process no longer exists.
fn orphans(dir: &Path) -> Vec<String> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|name| unique::owner_pid(name).is_some_and(|pid| !process_exists(pid)))
        .collect()
}

fn process_exists(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}
