//! Types and logic shared by the BPF programs and the userspace controller.
//!
//! Everything here is `no_std`, allocation-free and bounded, so the very same
//! selection code runs in the kernel at SYN time and in userspace (failover,
//! `explain`, unit tests). Map layouts are `#[repr(C)]` and must not change
//! without changing [`ABI_VERSION`].
#![no_std]

pub mod maps;
pub mod select;

/// Bumped whenever a map layout or a program's contract changes, so a daemon
/// never reuses pinned state written by an incompatible version.
pub const ABI_VERSION: u32 = 6;
