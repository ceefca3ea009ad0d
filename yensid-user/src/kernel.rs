//! Everything that talks to the kernel: BPF programs and maps (the only
//! aya user), the kernel's path measurements, socket options, the
//! epoll instance that watches spliced pairs for their ends, and the local
//! routes that make claimed prefixes deliverable.

pub mod bpf;
pub mod hangup;
pub mod local;
pub mod local_route;
pub mod mapped;
pub mod path;
pub mod pins;
pub mod sock;
