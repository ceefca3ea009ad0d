//! `dispatch`: the sk_lookup program (Linux >= 5.9).
//!
//! Runs once per incoming SYN in the network namespace it is attached to.
//! A SYN whose (port, destination address) matches a claimed binding is
//! either delivered to the listening socket of the builder that the shared
//! selection code chooses, or refused (`SK_DROP`, which makes TCP answer with
//! RST so the Nix client sees ECONNREFUSED at once and builds locally).
//! Claimed traffic never falls through to another local listener. Everything
//! unclaimed is passed on untouched.
//!
//! One exception to the refusal: a service with `when_full = "queue"` has a
//! queue listener registered in `LISTENERS` at its reserved id
//! ([`queue_listener`]). A SYN that finds every eligible builder at its
//! `max_connections` (and for no other reason: mode `local`, too few
//! eligible builders and a pool with no eligible builder still refuse) is
//! delivered there, and userspace holds the connection until a slot frees.
//! No builder counts it at SYN time; userspace counts it when it hands it on.

use core::ptr::read_volatile;

use super::{atomic, local};

use aya_ebpf::{
    bindings::{sk_action::SK_DROP, sk_action::SK_PASS},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_boot_ns},
    macros::{map, sk_lookup},
    maps::{Array, LpmTrie, PerCpuArray, SockMap, lpm_trie::Key},
    programs::SkLookupContext,
};
use yensid_ebpf::{
    maps::{
        AFFINITY_SLOTS, BINDING_KEY_LEN, Backend, BuilderState, LISTENER_SLOTS, MAX_BACKENDS,
        MAX_BINDINGS, MAX_BUILDERS, MAX_SERVICES, Override, ServiceCounters, ServiceState,
        binding_key, queue_listener, refusal, strategy, v4_mapped,
    },
    select::{Candidate, Draw, Pool, choose, client_hash},
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const IPPROTO_TCP: u32 = 6;

#[map]
pub(super) static BINDINGS: LpmTrie<[u8; BINDING_KEY_LEN], u32> =
    LpmTrie::pinned(MAX_BINDINGS, aya_ebpf::bindings::BPF_F_NO_PREALLOC);
#[map]
pub(super) static SERVICES: Array<ServiceState> = Array::pinned(MAX_SERVICES, 0);
#[map]
pub(super) static SERVICE_BACKENDS: Array<Backend> = Array::pinned(MAX_SERVICES * MAX_BACKENDS, 0);
#[map]
static BUILDERS: Array<BuilderState> = Array::pinned(MAX_BUILDERS, 0);
// The daemon reads ASSIGNED and writes RELEASED around every connection it
// proxies; mapped into its memory (BPF_F_MMAPABLE, Linux 5.5) that costs it
// no syscall.
#[map]
pub(super) static ASSIGNED: Array<u64> =
    Array::pinned(MAX_BUILDERS, aya_ebpf::bindings::BPF_F_MMAPABLE);
#[map]
static RELEASED: Array<u64> = Array::pinned(MAX_BUILDERS, aya_ebpf::bindings::BPF_F_MMAPABLE);
#[map]
pub(super) static SERVICE_COUNTERS: Array<ServiceCounters> = Array::pinned(MAX_SERVICES, 0);
#[map]
static AFFINITY: Array<u32> = Array::pinned(MAX_SERVICES * AFFINITY_SLOTS, 0);
/// Scratch space for the selection (not pinned: no state).
#[map]
static SCRATCH: PerCpuArray<Pool> = PerCpuArray::with_max_entries(1, 0);
#[map]
static OVERRIDE: Array<Override> = Array::pinned(1, 0);
#[map]
static LISTENERS: SockMap = SockMap::pinned(LISTENER_SLOTS, 0);

#[sk_lookup]
pub fn dispatch(ctx: SkLookupContext) -> u32 {
    let lookup = Lookup::read(&ctx);
    if lookup.protocol != IPPROTO_TCP {
        return SK_PASS;
    }
    let (local, remote) = match lookup.family {
        AF_INET => (
            v4_mapped(lookup.local_ip4.to_ne_bytes()),
            v4_mapped(lookup.remote_ip4.to_ne_bytes()),
        ),
        AF_INET6 => (
            words_to_bytes(lookup.local_ip6),
            words_to_bytes(lookup.remote_ip6),
        ),
        _ => return SK_PASS,
    };
    let key = Key::new(
        BINDING_KEY_LEN as u32 * 8,
        binding_key(lookup.local_port as u16, &local),
    );
    let Some(&service) = BINDINGS.get(&key) else {
        return SK_PASS;
    };
    let Some(state) = SERVICES.get(service) else {
        return SK_DROP;
    };
    let Some(counters) = SERVICE_COUNTERS.get_ptr_mut(service) else {
        return SK_DROP;
    };
    // SAFETY: array values live as long as the map; fields are only
    // projected here, every access is atomic (see `atomic::add`).
    let (dispatched, refused_mode, refused_unavailable, queued, sequence) = unsafe {
        (
            &raw mut (*counters).dispatched,
            &raw mut (*counters).refused_mode,
            &raw mut (*counters).refused_unavailable,
            &raw mut (*counters).queued,
            &raw mut (*counters).sequence,
        )
    };
    if local_override() || (state.accept == 0 && state.refusal == refusal::MODE_LOCAL) {
        count(refused_mode);
        return SK_DROP;
    }
    if state.accept == 0 {
        count(refused_unavailable);
        return SK_DROP;
    }
    let sequence = count(sequence);
    let affinity = if state.strategy == strategy::SOURCE_AFFINITY {
        affinity_choice(service, state.backends, &remote)
    } else {
        None
    };
    let draw = Draw {
        // SAFETY: no arguments, no memory access.
        random: unsafe { bpf_get_prandom_u32() },
        sequence,
        affinity,
    };
    let Some(pool) = SCRATCH.get_ptr_mut(0) else {
        return SK_DROP;
    };
    // SAFETY: per-CPU map memory, used only by this invocation (sk_lookup
    // runs with preemption disabled).
    let pool = unsafe { &mut *pool };
    let any_eligible = gather(pool, service, state.backends);
    let Some(position) = choose(state.strategy, pool, &draw) else {
        // Eligible builders exist but none is available: every one of them
        // is at max_connections. Queue if the service has a queue.
        if any_eligible
            && LISTENERS
                .redirect_sk_lookup(&ctx, queue_listener(service), 0)
                .is_ok()
        {
            count(queued);
            return SK_PASS;
        }
        count(refused_unavailable);
        return SK_DROP;
    };
    let Some(backend) = SERVICE_BACKENDS.get(service * MAX_BACKENDS + position) else {
        count(refused_unavailable);
        return SK_DROP;
    };
    if LISTENERS
        .redirect_sk_lookup(&ctx, backend.listener, 0)
        .is_err()
    {
        // The builder's listener is gone (daemon stopped or crashed).
        count(refused_unavailable);
        return SK_DROP;
    }
    if let Some(assigned) = ASSIGNED.get_ptr_mut(backend.builder) {
        count(assigned);
    }
    count(dispatched);
    SK_PASS
}

/// The fields of `bpf_sk_lookup` the program uses, read once. The verifier
/// only accepts context loads at constant offsets from the context pointer;
/// volatile reads keep LLVM from turning them into loads through a derived
/// pointer.
struct Lookup {
    family: u32,
    protocol: u32,
    local_port: u32,
    local_ip4: u32,
    remote_ip4: u32,
    local_ip6: [u32; 4],
    remote_ip6: [u32; 4],
}

impl Lookup {
    #[inline(always)]
    fn read(ctx: &SkLookupContext) -> Self {
        let l = ctx.lookup;
        // SAFETY: the kernel hands us a valid bpf_sk_lookup for the
        // duration of the call; every field is plain data.
        unsafe {
            Self {
                family: read_volatile(&raw const (*l).family),
                protocol: read_volatile(&raw const (*l).protocol),
                local_port: read_volatile(&raw const (*l).local_port),
                local_ip4: read_volatile(&raw const (*l).local_ip4),
                remote_ip4: read_volatile(&raw const (*l).remote_ip4),
                local_ip6: [
                    read_volatile(&raw const (*l).local_ip6[0]),
                    read_volatile(&raw const (*l).local_ip6[1]),
                    read_volatile(&raw const (*l).local_ip6[2]),
                    read_volatile(&raw const (*l).local_ip6[3]),
                ],
                remote_ip6: [
                    read_volatile(&raw const (*l).remote_ip6[0]),
                    read_volatile(&raw const (*l).remote_ip6[1]),
                    read_volatile(&raw const (*l).remote_ip6[2]),
                    read_volatile(&raw const (*l).remote_ip6[3]),
                ],
            }
        }
    }
}

/// Whether the operator's "local" override is in force right now.
#[inline(always)]
pub(super) fn local_override() -> bool {
    match OVERRIDE.get(0) {
        // SAFETY: no arguments, no memory access.
        Some(o) if o.local_until_ns != 0 => {
            let now = unsafe { bpf_ktime_get_boot_ns() };
            now < o.local_until_ns
        }
        _ => false,
    }
}

/// The position the client's affinity slot names, if that backend is
/// available. Looked up through the maps again (helpers bound-check an
/// index that came from a map; the verifier cannot for the pool).
#[inline(always)]
fn affinity_choice(service: u32, backends: u32, remote: &[u8; 16]) -> Option<u32> {
    affinity_at(
        service,
        backends,
        client_hash(bytes_to_be_words(remote)) % AFFINITY_SLOTS,
    )
}

/// The position affinity slot `slot` of a service names, if that backend
/// is available.
#[inline(always)]
pub(super) fn affinity_at(service: u32, backends: u32, slot: u32) -> Option<u32> {
    let position = *AFFINITY.get(service * AFFINITY_SLOTS + slot)?;
    if position >= backends {
        return None;
    }
    let backend = SERVICE_BACKENDS.get(service * MAX_BACKENDS + position)?;
    candidate(backend).available.then_some(position)
}

/// Reads the state of every backend of a service, once. True when at
/// least one backend is eligible (whether or not it is below its limit).
#[inline(always)]
pub(super) fn gather(pool: &mut Pool, service: u32, backends: u32) -> bool {
    let mut any_eligible = false;
    let mut position = 0;
    while position < MAX_BACKENDS {
        if position >= backends {
            break;
        }
        let candidate = match SERVICE_BACKENDS.get(service * MAX_BACKENDS + position) {
            Some(backend) => {
                any_eligible |= eligible(backend);
                candidate(backend)
            }
            None => Candidate::new(0, 0, false, 0),
        };
        pool.set(position, candidate);
        position += 1;
    }
    pool.set_len(backends);
    any_eligible
}

/// Whether the backend may take connections apart from its limit.
#[inline(always)]
fn eligible(backend: &Backend) -> bool {
    match BUILDERS.get(backend.builder) {
        Some(settings) => settings.eligible != 0 && backend.eligible != 0 && settings.weight > 0,
        None => false,
    }
}

#[inline(always)]
pub(super) fn candidate(backend: &Backend) -> Candidate {
    let builder = backend.builder;
    let Some(settings) = BUILDERS.get(builder) else {
        return Candidate::new(0, 0, false, 0);
    };
    let assigned = ASSIGNED.get(builder).copied().unwrap_or(0);
    let released = RELEASED.get(builder).copied().unwrap_or(0);
    // One count per builder for both paths: the proxied connections and
    // the local clients connected straight to it.
    let (local_open, local_failing) = local::open_and_failing(builder);
    Candidate::new(
        settings.weight,
        settings.max_connections,
        settings.eligible != 0 && backend.eligible != 0 && !local_failing,
        assigned.wrapping_sub(released).wrapping_add(local_open),
    )
    .with_load_cost(settings.load_cost)
}

/// Counts one more, returning the count before (round-robin's sequence).
#[inline(always)]
pub(super) fn count(counter: *mut u64) -> u64 {
    atomic::add(counter, 1)
}

#[inline(always)]
fn words_to_bytes(words: [u32; 4]) -> [u8; 16] {
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = words[i].to_ne_bytes();
        out[i * 4] = b[0];
        out[i * 4 + 1] = b[1];
        out[i * 4 + 2] = b[2];
        out[i * 4 + 3] = b[3];
        i += 1;
    }
    out
}

#[inline(always)]
fn bytes_to_be_words(bytes: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]),
        u32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]),
        u32::from_be_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]),
        u32::from_be_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]),
    ]
}
