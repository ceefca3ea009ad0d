//! The maps of the local path (clients on this host connect straight to
//! the builder) and what the selection and the programs share about them.
//! The programs: `connect` (connect4/6), `peername` (getpeername4/6),
//! `account` (sock_ops) and `release` (sock_release).

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, PerCpuArray},
};
use yensid_ebpf::{
    maps::{LocalBuilder, LocalSocket, LocalStats, MAX_BUILDERS, MAX_LOCAL_SOCKETS, MAX_SERVICES},
    select::Pool,
};

use super::atomic;

#[map]
pub(super) static LOCAL_SERVICES: Array<u32> = Array::pinned(MAX_SERVICES, 0);
// The daemon reads LOCAL_BUILDERS and LOCAL_STATS whenever it weighs a
// builder; mapped into its memory (BPF_F_MMAPABLE, Linux 5.5) that costs
// it no syscall.
#[map]
pub(super) static LOCAL_BUILDERS: Array<LocalBuilder> =
    Array::pinned(MAX_BUILDERS, aya_ebpf::bindings::BPF_F_MMAPABLE);
#[map]
pub(super) static LOCAL_NETNS: Array<u64> = Array::pinned(1, 0);
#[map]
pub(super) static LOCAL_STATS: Array<LocalStats> =
    Array::pinned(MAX_BUILDERS, aya_ebpf::bindings::BPF_F_MMAPABLE);
/// Pinned: the sockets outlive a daemon restart, and so must the record
/// that counts them closed.
#[map]
pub(super) static LOCAL_SOCKETS: HashMap<u64, LocalSocket> = HashMap::pinned(MAX_LOCAL_SOCKETS, 0);
/// The connect programs' own scratch space for the selection: `dispatch`
/// runs in softirq and may interrupt a connect on the same CPU, so they
/// cannot share one.
#[map]
pub(super) static LOCAL_SCRATCH: PerCpuArray<Pool> = PerCpuArray::with_max_entries(1, 0);

/// A builder's open local connections, and whether a local connect to it
/// failed that userspace has not acted on yet (it takes no new connection
/// meanwhile, on either path).
#[inline(always)]
pub(super) fn open_and_failing(builder: u32) -> (u64, bool) {
    let Some(stats) = LOCAL_STATS.get(builder) else {
        return (0, false);
    };
    let seen = LOCAL_BUILDERS.get(builder).map_or(0, |b| b.failures_seen);
    (
        stats.opened.wrapping_sub(stats.closed),
        stats.failed != seen,
    )
}

/// Counts the end of a local socket, once: only the caller whose removal
/// of the socket's entry succeeds counts it.
#[inline(always)]
pub(super) fn forget(cookie: u64, builder: u32) -> Option<*mut LocalStats> {
    LOCAL_SOCKETS.remove(&cookie).ok()?;
    let stats = LOCAL_STATS.get_ptr_mut(builder)?;
    // SAFETY: array value memory; counters only change atomically.
    atomic::add(unsafe { &raw mut (*stats).closed }, 1);
    Some(stats)
}
