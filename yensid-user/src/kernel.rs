//! Everything that talks to the kernel: BPF programs and maps (the only
//! aya user), the kernel's path measurements, socket options, and the
//! epoll instance that watches spliced pairs for their ends.

pub mod bpf;
pub mod hangup;
pub mod path;
pub mod sock;
