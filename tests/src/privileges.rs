//! Whether this process may build namespaces and load BPF at all.

use std::io::Write;
use std::process::{Command, Stdio};

/// True when running as root with a working `ip netns`. Otherwise prints a loud
/// `SKIPPED (needs root): <test>` line to stderr, so an unprivileged run cannot pass
/// for a green one, and returns false: the caller returns without failing.
pub fn privileged_or_skip(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let ip_netns = Command::new("ip")
        .args(["netns", "list"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if root && ip_netns {
        return true;
    }
    // Through the stderr handle, not eprintln!: libtest captures the macros and hides
    // their output for passing tests, but a skip must be seen.
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED (needs root): {test} (root: {root}, `ip netns` usable: {ip_netns})"
    );
    false
}
