//! yensid: a kernel-level redirector for Nix remote builds.
//!
//! The library holds everything the `yensid` binary does, in four layers
//! plus the configuration and the operator's saved state:
//!
//! - [`kernel`]: the only code that talks to BPF and to sockets' kernel
//!   state (aya, sockopts, epoll for hang-ups);
//! - [`dataplane`]: one accepted connection, from the SSH handoff to its end;
//! - [`decide`]: pure decisions and the live state they are made from
//!   (policy, registry, health, the hook, links);
//! - [`operate`]: what operators and their tools see and send (CLI,
//!   control socket, access rules, status, metrics).
//!
//! [`daemon`] is the controller that wires them together; [`preflight`]
//! checks what only the host can tell about a configuration.

pub mod config;
pub mod daemon;
pub mod dataplane;
pub mod decide;
pub mod kernel;
pub mod operate;
pub mod preflight;
pub mod state;

/// An error and its causes on one line, each said once. yensid's errors
/// put their source in their own message (they are logged with `%`, which
/// shows no causes), and so do many others; a cause whose text the line
/// already holds is left out instead of printed twice.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.contains(&more) {
            text = format!("{text}: {more}");
        }
        cause = c.source();
    }
    text
}

#[cfg(test)]
mod tests {
    #[test]
    fn each_cause_is_said_once() {
        let io = std::io::Error::from_raw_os_error(13);
        let read = crate::state::StateError::Read {
            path: "/x".into(),
            source: io,
        };
        let e = anyhow::Error::new(read).context("cannot drain b1");
        assert_eq!(
            crate::error_chain(e.as_ref()),
            "cannot drain b1: cannot read /x: Permission denied (os error 13)"
        );
        assert_eq!(
            format!("{e:#}").matches("os error 13").count(),
            2,
            "the doubling this avoids"
        );
    }
}
