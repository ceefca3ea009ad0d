//! Map names, sizes and value layouts.
//!
//! Ownership rule: every map value has exactly one writer. Userspace writes
//! the configuration maps; the kernel only increments its counters
//! atomically. That is why "connections assigned" (kernel) and "connections
//! released" (userspace) are separate maps: a read-modify-write of a shared
//! value by userspace would lose the kernel's concurrent increments.

/// Services (claims) one daemon can hold.
pub const MAX_SERVICES: u32 = 64;
/// Builders one service can spread connections over.
pub const MAX_BACKENDS: u32 = 32;
/// Builders one daemon can know, across all services.
pub const MAX_BUILDERS: u32 = 256;
/// Slots of the per-service source-affinity table.
pub const AFFINITY_SLOTS: u32 = 256;
/// Bindings (claimed prefix and port pairs).
pub const MAX_BINDINGS: u32 = 1024;
/// Sockets being spliced at once (two per proxied connection).
pub const MAX_SPLICED_SOCKETS: u32 = 65536;

/// LPM trie: `(port, address prefix)` -> service index.
pub const BINDINGS: &str = "BINDINGS";
/// Array: service index -> [`ServiceState`].
pub const SERVICES: &str = "SERVICES";
/// Array: `service * MAX_BACKENDS + position` -> [`Backend`].
pub const SERVICE_BACKENDS: &str = "SERVICE_BACKENDS";
/// Array: builder index -> [`BuilderState`].
pub const BUILDERS: &str = "BUILDERS";
/// Array: builder index -> connections the kernel assigned (kernel-owned).
pub const ASSIGNED: &str = "ASSIGNED";
/// Array: builder index -> written by userspace so that assigned - released
/// (wrapping) is the number of connections it counts for the builder:
/// clients that sent their SSH identification line, until their connection
/// ends. A connection in handoff takes no slot: userspace rewrites it from
/// ASSIGNED when it accepts one, which also gives back SYNs that never
/// became a connection (dropped on a full accept queue, then retransmitted
/// and counted again).
pub const RELEASED: &str = "RELEASED";
/// Array: service index -> [`ServiceCounters`] (kernel-owned).
pub const SERVICE_COUNTERS: &str = "SERVICE_COUNTERS";
/// Array: `service * AFFINITY_SLOTS + slot` -> backend position.
pub const AFFINITY: &str = "AFFINITY";
/// Array with one [`Override`]: the operator's "build locally" that the
/// kernel enforces itself, expiry included.
pub const OVERRIDE: &str = "OVERRIDE";
/// SOCKMAP: listener id -> listening socket of one (service, builder) pair,
/// or of a service's queue ([`queue_listener`]).
pub const LISTENERS: &str = "LISTENERS";
/// SOCKHASH: socket cookie -> established socket being spliced.
pub const SPLICED: &str = "SPLICED";
/// Hash: socket cookie -> cookie of the socket its bytes go to.
pub const PEERS: &str = "PEERS";
/// Hash: socket cookie -> builder index, for the daemon's upstream sockets
/// whose path the `observe` program measures. Userspace-owned: an entry is
/// added before the socket connects and removed when the connection ends.
pub const OBSERVED: &str = "OBSERVED";
/// Array: builder index -> [`PathStats`] (kernel-owned).
pub const PATH_STATS: &str = "PATH_STATS";

/// Strategy numbers as stored in [`ServiceState::strategy`].
pub mod strategy {
    pub const LEAST_CONNECTIONS: u32 = 0;
    pub const ROUND_ROBIN: u32 = 1;
    pub const RANDOM: u32 = 2;
    pub const SOURCE_AFFINITY: u32 = 3;
    pub const PRIORITY: u32 = 4;
    /// Lowest `BuilderState::load_cost` plus own open connections per
    /// unit of weight (see `select`).
    pub const LEAST_LOADED: u32 = 5;
}

/// Listener ids of (service, builder) pairs: `0..MAX_LISTENERS` of
/// `LISTENERS`.
pub const MAX_LISTENERS: u32 = MAX_SERVICES * MAX_BACKENDS;
/// Entries of `LISTENERS`: the pairs' ids, then one reserved id per service
/// for its queue listener ([`queue_listener`]).
pub const LISTENER_SLOTS: u32 = MAX_LISTENERS + MAX_SERVICES;

/// The `LISTENERS` id of the queue listener of service index `service`
/// (`when_full = "queue"`): where a connection that finds every eligible
/// builder at `max_connections` is steered. An empty slot means the
/// service refuses instead.
#[inline(always)]
pub const fn queue_listener(service: u32) -> u32 {
    MAX_LISTENERS + service
}

/// Size of a binding key's data: 2 bytes port (big endian), 2 zero bytes,
/// 16 bytes IPv6 address (IPv4 as `::ffff:a.b.c.d`).
pub const BINDING_KEY_LEN: usize = 20;
/// Bits of the binding key that precede the address.
pub const BINDING_PORT_BITS: u32 = 32;

/// The data half of an LPM key for `port` and a 16-byte address.
#[inline(always)]
pub fn binding_key(port: u16, addr: &[u8; 16]) -> [u8; BINDING_KEY_LEN] {
    let mut key = [0u8; BINDING_KEY_LEN];
    let port = port.to_be_bytes();
    key[0] = port[0];
    key[1] = port[1];
    let mut i = 0;
    while i < 16 {
        key[4 + i] = addr[i];
        i += 1;
    }
    key
}

/// An IPv4 address (network byte order octets) as an IPv4-mapped IPv6 one.
#[inline(always)]
pub fn v4_mapped(octets: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, octets[0], octets[1], octets[2], octets[3],
    ]
}

/// Per-service dispatch settings, written by userspace.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct ServiceState {
    /// 1: choose a builder; 0: refuse every connection (build locally).
    pub accept: u32,
    /// One of [`strategy`].
    pub strategy: u32,
    /// Number of valid positions in `SERVICE_BACKENDS` for this service.
    pub backends: u32,
    /// Why it refuses while `accept` is 0: one of [`refusal`] (the kernel
    /// counts refusals by reason).
    pub refusal: u32,
}

/// Reasons in [`ServiceState::refusal`].
pub mod refusal {
    /// The mode in force is `local`.
    pub const MODE_LOCAL: u32 = 0;
    /// Too few eligible builders.
    pub const NO_BUILDER: u32 = 1;
}

/// One position of a service's backend list, written by userspace.
///
/// The listener id is stable for the life of a (service, builder) pair, so
/// the builder the kernel counts a connection for is always the builder of
/// the listener that accepts it, even while a reload reorders positions.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct Backend {
    /// Index into `BUILDERS`, `ASSIGNED` and `RELEASED`.
    pub builder: u32,
    /// Index into `LISTENERS`.
    pub listener: u32,
    /// 1 when this service's rules (link kind, speed, RTT) allow the
    /// builder; its health and drain are in [`BuilderState::eligible`].
    pub eligible: u32,
    pub _reserved: u32,
}

/// Per-builder eligibility and capacity, written by userspace.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct BuilderState {
    /// Relative capacity (>= 1).
    pub weight: u32,
    /// 0 means unlimited.
    pub max_connections: u32,
    /// 1 when new connections may go to this builder.
    pub eligible: u32,
    /// The builder's measured load for `least-loaded`, in 1/1024 of one
    /// open connection per unit of weight (see `select::LOAD_UNIT`); 0
    /// when unmeasured. Other strategies ignore it. (This was a reserved,
    /// always-zero field: the layout is unchanged.)
    pub load_cost: u32,
}

/// The operator's mode override as the kernel sees it, written by
/// userspace. While `local_until_ns` is in the future of
/// `bpf_ktime_get_boot_ns()` (CLOCK_BOOTTIME), every claimed connection is
/// refused, whatever the rest of the maps say.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct Override {
    /// 0: no local override; `u64::MAX`: until further notice.
    pub local_until_ns: u64,
}

/// Per-service counters, incremented by the kernel only.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct ServiceCounters {
    /// Connections steered to a builder's listener.
    pub dispatched: u64,
    /// Connections refused because the mode is `local`.
    pub refused_mode: u64,
    /// Connections refused because no builder was eligible or available.
    pub refused_unavailable: u64,
    /// Connections steered to the service's queue listener because every
    /// eligible builder was at `max_connections`.
    pub queued: u64,
    /// Round-robin sequence.
    pub sequence: u64,
}

/// What the kernel measured on the daemon's connections to one builder,
/// written by the `observe` program only.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct PathStats {
    /// The smoothed round-trip time (microseconds) of the connection that
    /// took the latest sample: TCP's own estimate, not a probe's.
    pub srtt_us: u32,
    pub _reserved: u32,
    /// `bpf_ktime_get_boot_ns()` of that sample (CLOCK_BOOTTIME); 0: none.
    pub sampled_boot_ns: u64,
    /// RTT samples taken (one per ACK that carried one).
    pub samples: u64,
    /// Segments retransmitted to the builder.
    pub retransmits: u64,
}

// ---- The local path: clients on this host connect straight to a builder ----

/// Sockets of local clients whose connect went straight to a builder, at
/// once (two per proxied connection are in `SPLICED`; a local client has
/// one).
pub const MAX_LOCAL_SOCKETS: u32 = 65536;
/// Array: service index -> 1 when its local clients connect straight to
/// the builder (`local_clients = "direct"`), 0 when they go through the
/// gateway path. Userspace-owned.
pub const LOCAL_SERVICES: &str = "LOCAL_SERVICES";
/// Array: builder index -> [`LocalBuilder`] (its address). Userspace-owned.
pub const LOCAL_BUILDERS: &str = "LOCAL_BUILDERS";
/// Array with one `u64`: the cookie of the network namespace whose
/// connects the local path rewrites (the daemon's, where its claims are);
/// 0 rewrites none. Userspace-owned.
pub const LOCAL_NETNS: &str = "LOCAL_NETNS";
/// Array: builder index -> [`LocalStats`]. Kernel-owned.
pub const LOCAL_STATS: &str = "LOCAL_STATS";
/// Hash: socket cookie -> [`LocalSocket`], from a rewritten connect until
/// the socket is counted closed. Kernel-owned (the connect program adds an
/// entry, the close accounting removes it: the removal that succeeds is
/// the one that counts the close, so it is counted once).
pub const LOCAL_SOCKETS: &str = "LOCAL_SOCKETS";

/// A builder's address as the connect programs write it into a socket
/// address, written by userspace. Byte order as in `bpf_sock_addr`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct LocalBuilder {
    /// 4 or 6 (an IPv4 builder is also reachable from IPv6 sockets, as an
    /// IPv4-mapped address); 0: address unknown, connects stay untouched.
    pub family: u32,
    /// The port in network byte order, as in `user_port`.
    pub port: u32,
    /// The IPv4 address as `user_ip4` holds it (network byte order).
    pub ip4: u32,
    pub _reserved: u32,
    /// The IPv6 address (IPv4-mapped for an IPv4 builder) as the four
    /// words of `user_ip6`.
    pub ip6: [u32; 4],
    /// The value of [`LocalStats::failed`] userspace has acted on. While
    /// the kernel's count is ahead, the builder takes no new connection
    /// on either path: a failed local connect excludes it at once, before
    /// userspace marks it down.
    pub failures_seen: u64,
}

/// What the local path's programs count per builder, kernel-owned.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct LocalStats {
    /// Connects rewritten to this builder.
    pub opened: u64,
    /// Of those, sockets that are gone (closed, or never sent a SYN).
    /// `opened - closed` is the builder's count of open local connections.
    pub closed: u64,
    /// Connects that ended in SYN_SENT (refused, timed out, given up).
    pub failed: u64,
    /// Bytes the builder acknowledged, of closed connections.
    pub bytes_sent: u64,
    /// Bytes received from the builder, of closed connections.
    pub bytes_received: u64,
    /// Segments retransmitted, of closed connections.
    pub retransmits: u64,
    /// Smoothed RTT (microseconds) at the latest handshake or close.
    pub srtt_us: u32,
    pub _reserved: u32,
    /// `bpf_ktime_get_boot_ns()` of that sample; 0: none.
    pub sampled_boot_ns: u64,
}

/// One local socket whose connect was rewritten, kernel-owned.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LocalSocket {
    /// Index into `LOCAL_STATS`.
    pub builder: u32,
    /// 0: connect rewritten; 1: SYN sent (the state callback counts the
    /// close), set by the sock_ops program.
    pub phase: u32,
    /// The service port the application connected to, as `user_port`
    /// held it: what getpeername reports.
    pub port: u32,
    /// The service address, as the words of `user_ip6` (IPv4-mapped for an
    /// IPv4 socket, whose `user_ip4` is the last word).
    pub addr: [u32; 4],
}

// SAFETY: plain `#[repr(C)]` structs of integers without padding holes.
#[cfg(feature = "user")]
mod pod {
    unsafe impl aya::Pod for super::ServiceState {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::BuilderState {}
    unsafe impl aya::Pod for super::ServiceCounters {}
    unsafe impl aya::Pod for super::Override {}
    unsafe impl aya::Pod for super::PathStats {}
    unsafe impl aya::Pod for super::LocalBuilder {}
    unsafe impl aya::Pod for super::LocalStats {}
    unsafe impl aya::Pod for super::LocalSocket {}
}
