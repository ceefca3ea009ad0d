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
/// SOCKMAP: listener id -> listening socket of one (service, builder) pair.
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

/// Listener ids (indices of `LISTENERS`).
pub const MAX_LISTENERS: u32 = MAX_SERVICES * MAX_BACKENDS;

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

// SAFETY: plain `#[repr(C)]` structs of integers without padding holes.
#[cfg(feature = "user")]
mod pod {
    unsafe impl aya::Pod for super::ServiceState {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::BuilderState {}
    unsafe impl aya::Pod for super::ServiceCounters {}
    unsafe impl aya::Pod for super::Override {}
    unsafe impl aya::Pod for super::PathStats {}
}
