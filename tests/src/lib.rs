//! Black-box test harness for yensid: real OpenSSH builders and clients in network
//! namespaces this harness creates, and the daemon under test running in the client
//! namespace.
//!
//! Faults on demand: a builder's sshd killed and restarted, a builder black-holed, fake
//! builders that do not speak SSH; and a real Nix client with a private store, building
//! on builders that have stores of their own.
//!
//! Used by the integration tests in `tests/tests/` and by `cargo xtask bench`. Every
//! object owns what it created (namespaces, processes, temp files, bpffs pins) and
//! removes it in `Drop`, so a panicking test leaves nothing behind; leftovers of a
//! killed test process are swept by the next run.
//!
//! Only loopback and the benchmarking ranges 198.18.0.0/15 and 2001:2::/48 (inside the
//! test namespaces) are ever addressed.

pub mod cgroup;
pub mod cli;
mod command;
pub mod config;
pub mod container;
pub mod daemon;
pub mod derivation;
pub mod fake;
pub mod hosts;
pub mod netns;
pub mod nix;
pub mod nixos;
pub mod node_exporter;
pub mod payload;
pub mod privileges;
pub mod ssh;
pub mod sshd;
mod stale;
pub mod status;
pub mod store;
pub mod tcp;
mod tempdir;
pub mod topology;
mod unique;
pub mod wait;

pub use config::{
    BuilderConfig, DaemonConfig, Dataplane, Forward, HealthConfig, InstancePaths, LinkKind,
    LinkRules, LocalPathConfig, PolicyConfig, PolicyMode, ServiceConfig, Strategy, WhenFull,
};
pub use daemon::{
    Daemon, DataPathCounts, Launch, LogLine, built_binary, check_config, check_config_text,
    target_dir, workspace_root, yensid_binary,
};
pub use derivation::{Derivation, Gate, Site, Sites};
pub use fake::{Fake, FakeConnection, FakeServer};
pub use hosts::{HOST_DOMAIN, HostNames};
pub use netns::Netns;
pub use nix::{NixBuild, NixClient, NixOutput, NixRun, RunningNix, StoreScheme, remote_builder};
pub use payload::RandomFile;
pub use privileges::{SKIPS_FILE_ENV, privileged_or_skip, record_skip};
pub use ssh::{KnownHosts, LiveSession, SshClient};
pub use sshd::{KeyPair, Sshd, SshdSpec};
pub use status::{Egress, ModeStatus, Status};
pub use store::NixStore;
pub use tcp::{ConnectAttempt, JunkReply, RawClient, SshConnection};
pub use topology::{Builder, LinkEnd, SERVICE_ADDR, SERVICE_PORT, SecondLink, Topology, service};
// IPv6, several services, builders by host name (tests/addressing.rs).
pub use status::PrefixDelivery;
pub use topology::{ALT_SSH_PORT, benchmarking_v6};
