//! `observe`: a sock_ops program (cgroup v2, Linux >= 5.7 for the link,
//! RTT callbacks since 5.3) measuring the path to each builder on the
//! daemon's own upstream connections, spliced or copied.
//!
//! It runs for every TCP socket of the cgroup it is attached to (the
//! daemon's), but only acts on sockets userspace listed in `OBSERVED`
//! before they connected. Once such a socket is established it asks the
//! kernel for a callback on every RTT sample and every retransmission, and
//! keeps the latest smoothed RTT and the totals per builder in
//! `PATH_STATS`. The cost on the data path is one hash lookup per ACK that
//! carries an RTT sample, for observed sockets only.

use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_RETRANS_CB, BPF_SOCK_OPS_RETRANS_CB_FLAG,
        BPF_SOCK_OPS_RTT_CB, BPF_SOCK_OPS_RTT_CB_FLAG,
    },
    helpers::{bpf_get_socket_cookie, bpf_ktime_get_boot_ns},
    macros::{map, sock_ops},
    maps::{Array, HashMap},
    programs::SockOpsContext,
};
use yensid_ebpf::maps::{MAX_BUILDERS, MAX_SPLICED_SOCKETS, PathStats};

use super::atomic;

/// Not pinned: it only means something to the daemon that fills it, and
/// the program goes away with that daemon.
#[map]
static OBSERVED: HashMap<u64, u32> = HashMap::with_max_entries(MAX_SPLICED_SOCKETS, 0);
#[map]
static PATH_STATS: Array<PathStats> = Array::pinned(MAX_BUILDERS, 0);

/// A sock_ops program must answer 1.
const DONE: u32 = 1;

#[sock_ops]
pub fn observe(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB
        && op != BPF_SOCK_OPS_RTT_CB
        && op != BPF_SOCK_OPS_RETRANS_CB
    {
        return DONE;
    }
    // SAFETY: the helper only reads the context's socket.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    // SAFETY: plain hash lookup of a u64.
    let Some(&builder) = (unsafe { OBSERVED.get(&cookie) }) else {
        return DONE;
    };
    let Some(stats) = PATH_STATS.get_ptr_mut(builder) else {
        return DONE;
    };
    if op == BPF_SOCK_OPS_RETRANS_CB {
        // Arguments: sequence number, segments, result of the send.
        if ctx.arg(2) == 0 {
            // SAFETY: array value memory; counters only change atomically.
            atomic::add(unsafe { &raw mut (*stats).retransmits }, ctx.arg(1) as u64);
        }
        return DONE;
    }
    if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        // Failure only means an older kernel without these callbacks; the
        // handshake's sample below is still taken.
        let _ = ctx.set_cb_flags((BPF_SOCK_OPS_RTT_CB_FLAG | BPF_SOCK_OPS_RETRANS_CB_FLAG) as i32);
    }
    // SAFETY: a constant-offset context load (the verifier rewrites it to
    // the socket's `srtt_us`, which TCP keeps scaled by 8); the stores go
    // to array value memory. Concurrent samples of two connections to the
    // same builder may interleave: either one is a true recent sample.
    unsafe {
        let srtt_us = read_volatile(&raw const (*ctx.ops).srtt_us) >> 3;
        write_volatile(&raw mut (*stats).srtt_us, srtt_us);
        write_volatile(&raw mut (*stats).sampled_boot_ns, bpf_ktime_get_boot_ns());
        atomic::add(&raw mut (*stats).samples, 1);
    }
    DONE
}
