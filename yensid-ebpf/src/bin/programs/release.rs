//! `release`: the local path's cgroup/sock_release program (Linux >= 5.9),
//! attached to the same cgroup as `connect`.
//!
//! A socket whose connect was rewritten but that never sent its SYN (the
//! connect failed on the way, e.g. no route) gets no state callbacks, so
//! its close is counted here, when the application releases it. Sockets
//! that sent a SYN are `account`'s to count, at their change to CLOSE,
//! which may come after the release.

use core::ptr::read_volatile;

use aya_ebpf::{helpers::bpf_get_socket_cookie, macros::cgroup_sock, programs::SockContext};

use super::local::{LOCAL_SOCKETS, forget};

/// The release goes on.
const ALLOW: i32 = 1;

#[cgroup_sock(sock_release)]
pub fn release(ctx: SockContext) -> i32 {
    // SAFETY: the helper only reads the context's socket.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock.cast()) };
    // SAFETY: plain hash lookup.
    let Some(entry) = LOCAL_SOCKETS.get_ptr(&cookie) else {
        return ALLOW;
    };
    // SAFETY: hash value memory of this socket's entry.
    let (phase, builder) = unsafe {
        (
            read_volatile(&raw const (*entry).phase),
            read_volatile(&raw const (*entry).builder),
        )
    };
    if phase == 0 {
        forget(cookie, builder);
    }
    ALLOW
}
