//! `getpeername4` / `getpeername6`: cgroup programs of the local path
//! (Linux >= 5.8) that hide the connect's rewrite: a socket that the
//! `connect` program sent straight to a builder reports the service
//! address and port the application connected to.

use core::ptr::write_volatile;

use aya_ebpf::{
    helpers::bpf_get_socket_cookie, macros::cgroup_sock_addr, programs::SockAddrContext,
};
use yensid_ebpf::maps::LocalSocket;

use super::local::LOCAL_SOCKETS;

/// The call goes on (with the rewritten address).
const ALLOW: i32 = 1;

#[cgroup_sock_addr(getpeername4)]
pub fn getpeername4(ctx: SockAddrContext) -> i32 {
    if let Some(asked) = rewritten(&ctx) {
        let sa = ctx.sock_addr;
        // SAFETY: constant-offset stores to the writable address.
        unsafe {
            write_volatile(&raw mut (*sa).user_ip4, asked.addr[3]);
            write_volatile(&raw mut (*sa).user_port, asked.port);
        }
    }
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn getpeername6(ctx: SockAddrContext) -> i32 {
    if let Some(asked) = rewritten(&ctx) {
        let sa = ctx.sock_addr;
        // SAFETY: constant-offset stores to the writable address.
        unsafe {
            write_volatile(&raw mut (*sa).user_ip6[0], asked.addr[0]);
            write_volatile(&raw mut (*sa).user_ip6[1], asked.addr[1]);
            write_volatile(&raw mut (*sa).user_ip6[2], asked.addr[2]);
            write_volatile(&raw mut (*sa).user_ip6[3], asked.addr[3]);
            write_volatile(&raw mut (*sa).user_port, asked.port);
        }
    }
    ALLOW
}

#[inline(always)]
fn rewritten(ctx: &SockAddrContext) -> Option<LocalSocket> {
    // SAFETY: the helper only reads the context's socket.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    // SAFETY: plain hash lookup; the value is copied out.
    unsafe { LOCAL_SOCKETS.get(&cookie) }.copied()
}
