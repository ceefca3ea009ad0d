//! `account`: the local path's sock_ops program (Linux >= 5.7 for the
//! cgroup link; the state callback exists since 4.16), attached to the
//! same cgroup as `connect`.
//!
//! It acts on sockets that `connect` sent straight to a builder only.
//! When the SYN is about to leave it asks for a callback on every state
//! change; at the change to CLOSE it counts the connection closed (the
//! builder's open count is `opened - closed`), adds its bytes and
//! retransmissions, and a connection that never left SYN_SENT (refused,
//! timed out, or given up by the client) counts as a failed connect,
//! which takes the builder out of the selection at once. Nothing runs per
//! packet: only the handshake and the state changes.

use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE, BPF_TCP_SYN_SENT,
    },
    helpers::{bpf_get_socket_cookie, bpf_ktime_get_boot_ns},
    macros::sock_ops,
    programs::SockOpsContext,
};
use yensid_ebpf::maps::LocalStats;

use super::{
    atomic,
    local::{LOCAL_SOCKETS, LOCAL_STATS, forget},
};

/// A sock_ops program must answer 1.
const DONE: u32 = 1;

#[sock_ops]
pub fn account(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op != BPF_SOCK_OPS_TCP_CONNECT_CB
        && op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB
        && op != BPF_SOCK_OPS_STATE_CB
    {
        return DONE;
    }
    // SAFETY: the helper only reads the context's socket.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    // SAFETY: plain hash lookup.
    let Some(entry) = LOCAL_SOCKETS.get_ptr_mut(&cookie) else {
        return DONE;
    };
    if op == BPF_SOCK_OPS_TCP_CONNECT_CB {
        // From now on the change to CLOSE counts the close (the
        // sock_release program counts sockets that never got here).
        if ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32).is_ok() {
            // SAFETY: hash value memory of this socket's entry.
            unsafe { write_volatile(&raw mut (*entry).phase, 1) };
        }
        return DONE;
    }
    // SAFETY: hash value memory, read before the entry may go.
    let builder = unsafe { read_volatile(&raw const (*entry).builder) };
    if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        if let Some(stats) = LOCAL_STATS.get_ptr_mut(builder) {
            sample_rtt(&ctx, stats);
        }
        return DONE;
    }
    // BPF_SOCK_OPS_STATE_CB: arguments old state, new state.
    if ctx.arg(1) != BPF_TCP_CLOSE {
        return DONE;
    }
    let Some(stats) = forget(cookie, builder) else {
        return DONE;
    };
    if ctx.arg(0) == BPF_TCP_SYN_SENT {
        // SAFETY: array value memory; counters only change atomically.
        atomic::add(unsafe { &raw mut (*stats).failed }, 1);
        return DONE;
    }
    // SAFETY: constant-offset context loads of a full socket's counters;
    // atomic adds to array value memory.
    unsafe {
        let ops = ctx.ops;
        atomic::add(
            &raw mut (*stats).bytes_sent,
            read_volatile(&raw const (*ops).bytes_acked),
        );
        atomic::add(
            &raw mut (*stats).bytes_received,
            read_volatile(&raw const (*ops).bytes_received),
        );
        atomic::add(
            &raw mut (*stats).retransmits,
            read_volatile(&raw const (*ops).total_retrans) as u64,
        );
    }
    sample_rtt(&ctx, stats);
    DONE
}

/// Keeps the socket's smoothed RTT as the builder's latest sample.
#[inline(always)]
fn sample_rtt(ctx: &SockOpsContext, stats: *mut LocalStats) {
    // SAFETY: a constant-offset context load (TCP keeps srtt scaled by 8);
    // stores to array value memory. Two connections' samples may
    // interleave: either is a true recent sample.
    unsafe {
        let srtt_us = read_volatile(&raw const (*ctx.ops).srtt_us) >> 3;
        write_volatile(&raw mut (*stats).srtt_us, srtt_us);
        write_volatile(&raw mut (*stats).sampled_boot_ns, bpf_ktime_get_boot_ns());
    }
}
