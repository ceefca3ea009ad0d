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
