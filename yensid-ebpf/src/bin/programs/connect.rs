//! `connect4` / `connect6`: cgroup/connect programs of the local path
//! (Linux >= 5.7: BPF links on cgroups and `bpf_get_netns_cookie` in
//! sock_addr programs; the gateway path already needs 5.9).
//!
//! A TCP connect from a process of the attached cgroup, in the daemon's
//! network namespace, to a claimed (prefix, port) of a service whose
//! local clients go direct gets its destination rewritten to the builder
//! that the shared selection code chooses, before the SYN exists: the
//! client talks to the builder with no middle. The socket is recorded in
//! `LOCAL_SOCKETS` and counted for the builder at once, so that the next
//! connect on either path sees it.
//!
//! Whatever the selection refuses (mode local, an override, nothing
//! available) and whatever cannot be rewritten (address family, a full
//! socket table) is left untouched: the connect goes on to the claimed
//! address, where the sk_lookup `dispatch` program decides as for any
//! client, refusals included (RST, ECONNREFUSED; never EPERM from here).
//! The daemon's own connections go to the builders' real addresses, which
//! the configuration forbids inside a claimed prefix: they never match.

use core::{
    mem::MaybeUninit,
    ptr::{read_volatile, write_volatile},
};

use aya_ebpf::{
    bindings::{BPF_NOEXIST, bpf_sock_addr},
    helpers::{bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    maps::lpm_trie::Key,
    programs::SockAddrContext,
};
use yensid_ebpf::{
    maps::{AFFINITY_SLOTS, BINDING_KEY_LEN, LocalBuilder, LocalSocket, MAX_BACKENDS, strategy},
    select::{Draw, choose, client_hash},
};

use super::{
    atomic,
    dispatch::{
        BINDINGS, SERVICE_BACKENDS, SERVICE_COUNTERS, SERVICES, affinity_at, candidate, count,
        gather, local_override,
    },
    local::{
        LOCAL_BUILDERS, LOCAL_NETNS, LOCAL_SCRATCH, LOCAL_SERVICES, LOCAL_SOCKETS, LOCAL_STATS,
    },
};

const IPPROTO_TCP: u32 = 6;
/// A cgroup sock_addr program allows the call with 1 (0 would fail it
/// with EPERM, which the local path never does).
const ALLOW: i32 = 1;

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: constant-offset context loads of plain fields.
    let (protocol, port, ip4) = unsafe {
        (
            read_volatile(&raw const (*sa).protocol),
            read_volatile(&raw const (*sa).user_port),
            read_volatile(&raw const (*sa).user_ip4),
        )
    };
    if protocol != IPPROTO_TCP {
        return ALLOW;
    }
    // IPv4-mapped, as the binding key has it. Built word by word: a zeroed
    // array would become a memset call, whose variable stack offsets the
    // verifier refuses to a loader without CAP_PERFMON.
    let mapped = [0, 0, V4_MAPPED_WORD, ip4];
    let asked = LocalSocket {
        builder: 0,
        phase: 0,
        port,
        addr: mapped,
    };
    if let Some(builder) = steer(&ctx, asked, false) {
        // SAFETY: constant-offset stores to the writable destination.
        unsafe {
            write_volatile(&raw mut (*sa).user_ip4, builder.ip4);
            write_volatile(&raw mut (*sa).user_port, builder.port);
        }
    }
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: constant-offset context loads of plain fields.
    let (protocol, port, ip6) = unsafe {
        (
            read_volatile(&raw const (*sa).protocol),
            read_volatile(&raw const (*sa).user_port),
            read_ip6(sa),
        )
    };
    if protocol != IPPROTO_TCP {
        return ALLOW;
    }
    let asked = LocalSocket {
        builder: 0,
        phase: 0,
        port,
        addr: ip6,
    };
    if let Some(builder) = steer(&ctx, asked, true) {
        // SAFETY: constant-offset stores to the writable destination.
        unsafe {
            write_volatile(&raw mut (*sa).user_ip6[0], builder.ip6[0]);
            write_volatile(&raw mut (*sa).user_ip6[1], builder.ip6[1]);
            write_volatile(&raw mut (*sa).user_ip6[2], builder.ip6[2]);
            write_volatile(&raw mut (*sa).user_ip6[3], builder.ip6[3]);
            write_volatile(&raw mut (*sa).user_port, builder.port);
        }
    }
    ALLOW
}

/// The third word of an IPv4-mapped IPv6 address (`::ffff:0:0/96`).
const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// The binding trie's key (`maps::binding_key`) for a destination as the
/// socket address holds it: `user_port`'s word is the port in network
/// byte order followed by two zero bytes, and the address words follow.
/// Written word by word with volatile stores: the byte-wise key with its
/// zero runs compiles to a memset call, whose variable stack offsets the
/// verifier refuses to a loader without CAP_PERFMON (the shipped unit).
#[inline(always)]
fn binding_key(port: u32, addr: [u32; 4]) -> MaybeUninit<Key<[u8; BINDING_KEY_LEN]>> {
    let mut key = MaybeUninit::<Key<[u8; BINDING_KEY_LEN]>>::uninit();
    let words = key.as_mut_ptr().cast::<u32>();
    // SAFETY: `Key` is `#[repr(C)]` {u32 prefix_len, [u8; 20] data}: six
    // aligned words, each written once.
    unsafe {
        write_volatile(words, BINDING_KEY_LEN as u32 * 8);
        write_volatile(words.add(1), port & 0xffff);
        write_volatile(words.add(2), addr[0]);
        write_volatile(words.add(3), addr[1]);
        write_volatile(words.add(4), addr[2]);
        write_volatile(words.add(5), addr[3]);
    }
    key
}

/// # Safety
/// `sa` is the program's context.
#[inline(always)]
unsafe fn read_ip6(sa: *mut bpf_sock_addr) -> [u32; 4] {
    // SAFETY: constant-offset context loads (the caller's context).
    unsafe {
        [
            read_volatile(&raw const (*sa).user_ip6[0]),
            read_volatile(&raw const (*sa).user_ip6[1]),
            read_volatile(&raw const (*sa).user_ip6[2]),
            read_volatile(&raw const (*sa).user_ip6[3]),
        ]
    }
}

/// The builder a connect to `asked`'s address goes to, already counted for
/// it, or `None` to leave the connect untouched.
#[inline(always)]
fn steer(ctx: &SockAddrContext, mut asked: LocalSocket, v6_socket: bool) -> Option<LocalBuilder> {
    let netns = *LOCAL_NETNS.get(0)?;
    // SAFETY: the helper only reads the context's socket.
    if netns == 0 || netns != unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) } {
        return None;
    }
    let key = binding_key(asked.port, asked.addr);
    // SAFETY: every word of the key was written.
    let service = *BINDINGS.get(unsafe { key.assume_init_ref() })?;
    if LOCAL_SERVICES.get(service).copied() != Some(1) {
        return None;
    }
    let state = SERVICES.get(service)?;
    // Refusals are the gateway path's to make and count.
    if state.accept == 0 || local_override() {
        return None;
    }
    let counters = SERVICE_COUNTERS.get_ptr_mut(service)?;
    // SAFETY: array value memory; the sequence only changes atomically.
    let sequence = count(unsafe { &raw mut (*counters).sequence });
    // Every local client is this host: one affinity slot for all of them
    // (the unspecified address's).
    let affinity = if state.strategy == strategy::SOURCE_AFFINITY {
        affinity_at(
            service,
            state.backends,
            client_hash([0; 4]) % AFFINITY_SLOTS,
        )
    } else {
        None
    };
    let draw = Draw {
        // SAFETY: no arguments, no memory access.
        random: unsafe { bpf_get_prandom_u32() },
        sequence,
        affinity,
    };
    let pool = LOCAL_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: per-CPU map memory. On a preemptible kernel another connect
    // on this CPU may reuse it meanwhile; the choice is checked below.
    let pool = unsafe { &mut *pool };
    gather(pool, service, state.backends);
    let position = choose(state.strategy, pool, &draw)?;
    if position >= state.backends {
        return None;
    }
    let backend = SERVICE_BACKENDS.get(service * MAX_BACKENDS + position)?;
    if !candidate(backend).available {
        return None;
    }
    let builder = *LOCAL_BUILDERS.get(backend.builder)?;
    let mapped = asked.addr[0] == 0 && asked.addr[1] == 0 && asked.addr[2] == V4_MAPPED_WORD;
    // IPv4 sockets and IPv4-mapped destinations need an IPv4 builder,
    // IPv6 destinations an IPv6 one.
    let fits = match builder.family {
        4 => !v6_socket || mapped,
        6 => v6_socket && !mapped,
        _ => false,
    };
    if !fits {
        return None;
    }
    asked.builder = backend.builder;
    // SAFETY: the helper only reads the context's socket.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    LOCAL_SOCKETS
        .insert(&cookie, &asked, BPF_NOEXIST as u64)
        .ok()?;
    if let Some(stats) = LOCAL_STATS.get_ptr_mut(backend.builder) {
        // SAFETY: array value memory; counters only change atomically.
        atomic::add(unsafe { &raw mut (*stats).opened }, 1);
    }
    Some(builder)
}
