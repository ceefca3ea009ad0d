//! Names for everything the harness creates outside its own process.

use std::sync::atomic::{AtomicU32, Ordering};

/// Prefix of every namespace, temp dir and bpffs pin directory the harness creates,
/// followed by the owner's pid in hex; [`crate::stale`] relies on this shape.
pub(crate) const PREFIX: &str = "yensid-test-";

/// An id unique among all harness objects on this machine: test binaries run as separate
/// processes, tests inside one binary as threads, so pid + a per-process counter. Hex
/// keeps it short enough for interface names (IFNAMSIZ is 16 with the NUL).
pub(crate) fn next_id() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    format!(
        "{:x}-{:x}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// `yensid-test-<id>-<label>`: the name of a namespace, temp dir or pin dir.
pub(crate) fn name(id: &str, label: &str) -> String {
    format!("{PREFIX}{id}-{label}")
}

/// The pid that created an object named by [`name`], if `name` is one of ours.
pub(crate) fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(PREFIX)?;
    let pid_hex = rest.split('-').next()?;
    u32::from_str_radix(pid_hex, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pid_round_trips_through_name() {
        let name = name(&next_id(), "client");
        assert_eq!(owner_pid(&name), Some(std::process::id()));
        assert_eq!(owner_pid("yensid"), None);
        assert_eq!(owner_pid("yensid-test-zz-1"), None);
    }
}
