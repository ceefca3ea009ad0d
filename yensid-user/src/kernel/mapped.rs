//! Array maps the daemon touches around every connection, mapped into its
//! memory: the per-builder connection counts (`ASSIGNED`, `RELEASED`) and
//! the local path's counts (`LOCAL_STATS`, `LOCAL_BUILDERS`).
//!
//! The daemon reads `ASSIGNED` and writes `RELEASED` when a connection is
//! accepted, when its client identified itself and when it ends, and reads
//! a builder's open count on the local path whenever it weighs the builder.
//! Through `bpf(2)` that was ten syscalls per proxied connection. These
//! arrays are created `BPF_F_MMAPABLE` (Linux 5.5), so here each is an
//! atomic load or store of one `u64` field on shared memory, the memory the
//! BPF programs' atomic adds and loads touch. Whole values are still
//! written with `bpf(2)` where the daemon writes them at all
//! (`LOCAL_BUILDERS`, when the configuration changes).
//!
//! Only the running daemon maps them; `yensid maps` reads the pins with
//! `bpf(2)` as before. Part of [`super::bpf`]'s aya boundary.

use std::{
    io,
    os::fd::{AsFd, AsRawFd},
    path::Path,
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering},
};

use aya::maps::MapData;
use yensid_ebpf::maps::{self as names, LocalBuilder, LocalStats, MAX_BUILDERS};

use super::bpf::BpfError;

/// One pinned array map of `MAX_BUILDERS` entries, mapped shared and
/// accessed by `u64` field.
pub struct MappedArray {
    name: &'static str,
    base: NonNull<u8>,
    bytes: usize,
    /// Bytes from one entry to the next: the value size rounded up to 8,
    /// as the kernel lays out an array.
    stride: usize,
    writable: bool,
}

// SAFETY: the mapping is only ever accessed through `AtomicU64`, and it
// lives until `drop`, which needs `&mut self`.
unsafe impl Send for MappedArray {}
// SAFETY: as above: every access is atomic.
unsafe impl Sync for MappedArray {}

impl MappedArray {
    /// Maps the array pinned as `maps_dir/name`, whose values are `T`;
    /// `writable` when the daemon stores into it (`RELEASED`), else
    /// read-only.
    pub fn open<T>(maps_dir: &Path, name: &'static str, writable: bool) -> Result<Self, BpfError> {
        let err = |source| BpfError::Mmap { name, source };
        let map = MapData::from_pin(maps_dir.join(name))
            .map_err(|e| err(io::Error::other(crate::error_chain(&e))))?;
        let stride = size_of::<T>().next_multiple_of(8);
        let page = page_size();
        let bytes = (MAX_BUILDERS as usize * stride).next_multiple_of(page);
        let protection = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a fresh shared mapping of the map's descriptor, of the
        // size the kernel gives the array (MAX_BUILDERS entries of
        // `stride` bytes, rounded up to pages), at offset 0; nothing else
        // in this process aliases it. The mapping keeps the map alive once
        // `map` closes its descriptor.
        let address = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                protection,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if address == libc::MAP_FAILED {
            return Err(err(io::Error::last_os_error()));
        }
        let base = NonNull::new(address.cast::<u8>())
            .ok_or_else(|| err(io::Error::other("mmap returned a null mapping")))?;
        Ok(MappedArray {
            name,
            base,
            bytes,
            stride,
            writable,
        })
    }

    /// The `u64` at byte `offset` of entry `index` (`offset_of!` a field).
    fn field(&self, index: u32, offset: usize) -> Result<&AtomicU64, BpfError> {
        if index >= MAX_BUILDERS || !offset.is_multiple_of(8) || offset + 8 > self.stride {
            return Err(BpfError::Mmap {
                name: self.name,
                source: io::Error::other(format!(
                    "entry {index}, byte {offset}: outside the map's {MAX_BUILDERS} entries of \
                     {} bytes",
                    self.stride
                )),
            });
        }
        // SAFETY: in bounds (checked above); 8-byte aligned (the mapping is
        // page aligned, the stride and the offset are multiples of 8); and
        // only ever accessed atomically here. The kernel's side is outside
        // Rust's model: its programs add atomically and load aligned words.
        // A whole value written with bpf(2) (LOCAL_BUILDERS, when the daemon
        // acts on a failed local connect) is copied by the kernel's memcpy,
        // which could in theory tear `failures_seen` for a load that races
        // it; the worst that does is keep that builder out of one choice.
        Ok(unsafe {
            &*self
                .base
                .as_ptr()
                .add(index as usize * self.stride + offset)
                .cast::<AtomicU64>()
        })
    }

    pub fn load(&self, index: u32, offset: usize) -> Result<u64, BpfError> {
        Ok(self.field(index, offset)?.load(Ordering::Acquire))
    }

    pub fn store(&self, index: u32, offset: usize, value: u64) -> Result<(), BpfError> {
        if !self.writable {
            // A store to a read-only mapping would fault, not fail.
            return Err(BpfError::Mmap {
                name: self.name,
                source: io::Error::other("mapped read-only"),
            });
        }
        self.field(index, offset)?.store(value, Ordering::Release);
        Ok(())
    }
}

impl Drop for MappedArray {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `open`, unmapped once.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.bytes) };
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).unwrap_or(4096).max(1)
}

/// The mapped arrays of a loaded [`super::bpf::Kernel`].
pub(super) struct Mapped {
    /// Connections the dispatch program assigned to each builder (`u64`).
    pub assigned: MappedArray,
    /// What the daemon gives back of them (`u64`, see `names::RELEASED`).
    pub released: MappedArray,
    /// The local path's counts per builder ([`LocalStats`]).
    pub local_stats: MappedArray,
    /// The local path's builders ([`LocalBuilder`]), for `failures_seen`.
    pub local_builders: MappedArray,
}

impl Mapped {
    pub(super) fn open(maps_dir: &Path) -> Result<Self, BpfError> {
        Ok(Mapped {
            assigned: MappedArray::open::<u64>(maps_dir, names::ASSIGNED, false)?,
            released: MappedArray::open::<u64>(maps_dir, names::RELEASED, true)?,
            local_stats: MappedArray::open::<LocalStats>(maps_dir, names::LOCAL_STATS, false)?,
            local_builders: MappedArray::open::<LocalBuilder>(
                maps_dir,
                names::LOCAL_BUILDERS,
                false,
            )?,
        })
    }
}
