//! Whether this process may build namespaces and load BPF at all, and counting the
//! tests that could not run.
//!
//! A skipped test returns `Ok(())`, so libtest counts it as passed. So that a skip never
//! passes for a pass, each one prints a loud `SKIPPED` line to stderr and, when
//! `YENSID_TEST_SKIPS` names a file (`cargo xtask test` sets it), appends one line to
//! that file: `<test>\t<reason>`. The xtask counts the lines, prints them in its
//! summary and fails the run on any of them in CI (`CI=true`) or with `--all`.

use std::fs::OpenOptions;
use std::io::Write;
use std::process::{Command, Stdio};

/// The file `cargo xtask test` counts skips in.
pub const SKIPS_FILE_ENV: &str = "YENSID_TEST_SKIPS";

/// True when running as root with a working `ip netns`. Otherwise records the skip
/// ([`record_skip`]) and returns false: the caller returns without failing.
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
    let reason = if root {
        "`ip netns` unusable"
    } else {
        "not root"
    };
    record_skip(test, reason);
    false
}

/// Says loudly on stderr that `test` did not run and why, and appends
/// `<test>\t<reason>` to the file named by `$YENSID_TEST_SKIPS`, if set. A skip that
/// cannot be recorded there is a panic: an uncounted skip would pass for a pass.
pub fn record_skip(test: &str, reason: &str) {
    // Through the stderr handle, not eprintln!: libtest captures the macros and hides
    // their output for passing tests, but a skip must be seen.
    let _ = writeln!(std::io::stderr(), "SKIPPED ({reason}): {test}");
    let Some(file) = std::env::var_os(SKIPS_FILE_ENV) else {
        return;
    };
    let line = format!("{}\t{}\n", one_line(test), one_line(reason));
    // One write of a short line to a file opened for appending: lines of tests running
    // in parallel processes do not interleave.
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(&file)
        .and_then(|mut f| f.write_all(line.as_bytes()))
        .unwrap_or_else(|e| {
            panic!(
                "cannot record the skip of {test} in {}: {e}",
                std::path::Path::new(&file).display()
            )
        });
}

fn one_line(text: &str) -> String {
    text.replace(['\t', '\n', '\r'], " ")
}
