//! Which builder gets the next connection: one implementation, run by the
//! `dispatch` program at SYN time and by userspace for failover, `explain`
//! and tests.
//!
//! Loops are bounded by [`MAX_BACKENDS`] so the verifier accepts them, and
//! nothing allocates.

use crate::maps::{MAX_BACKENDS, strategy};

/// What the selection needs to know about one backend position.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// Relative capacity (>= 1 for an available candidate).
    pub weight: u32,
    /// Connections currently open to this builder (all services).
    pub active: u64,
    /// Eligible and below its connection limit.
    pub available: bool,
    /// Measured load for `least-loaded`, in [`LOAD_UNIT`]s (0: unmeasured).
    pub load_cost: u32,
}

impl Candidate {
    /// Builds a candidate from the builder's settings and its live count.
    #[inline(always)]
    pub fn new(weight: u32, max_connections: u32, eligible: bool, active: u64) -> Self {
        let below_limit = max_connections == 0 || active < max_connections as u64;
        Self {
            weight,
            active,
            available: eligible && weight > 0 && below_limit,
            load_cost: 0,
        }
    }

    /// The same candidate with the measured load `least-loaded` adds.
    #[inline(always)]
    pub fn with_load_cost(self, load_cost: u32) -> Self {
        Self { load_cost, ..self }
    }
}

/// The backends of one service, gathered before choosing, so that the
/// selection loops do no map lookups, which keeps the verifier's work
/// small. In the kernel it lives in a per-CPU scratch map (it is too large
/// for the 512-byte BPF stack together with the rest).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Pool {
    /// Weight per position; 0 marks a position that may not be chosen.
    weight: [u32; MAX_BACKENDS as usize],
    /// Active connections per position, clamped to u32 so that
    /// `load * weight` fits in a u64 (BPF has no 128-bit multiply).
    load: [u32; MAX_BACKENDS as usize],
    /// Measured load per position (`least-loaded` only).
    cost: [u32; MAX_BACKENDS as usize],
    count: u32,
}

impl Default for Pool {
    fn default() -> Self {
        Self::new()
    }
}

impl Pool {
    #[inline(always)]
    pub const fn new() -> Self {
        Self {
            weight: [0; MAX_BACKENDS as usize],
            load: [0; MAX_BACKENDS as usize],
            cost: [0; MAX_BACKENDS as usize],
            count: 0,
        }
    }

    /// Sets the candidate at `position`; ignored past `MAX_BACKENDS`. In
    /// the kernel `position` must be a loop counter with a constant bound,
    /// so the verifier can bound the write.
    #[inline(always)]
    pub fn set(&mut self, position: u32, c: Candidate) {
        if let (Some(weight), Some(load)) = (
            self.weight.get_mut(position as usize),
            self.load.get_mut(position as usize),
        ) {
            *weight = if c.available { c.weight } else { 0 };
            *load = if c.active > u32::MAX as u64 {
                u32::MAX
            } else {
                c.active as u32
            };
        }
        if let Some(cost) = self.cost.get_mut(position as usize) {
            *cost = c.load_cost;
        }
    }

    /// Sets how many positions are valid.
    #[inline(always)]
    pub fn set_len(&mut self, count: u32) {
        self.count = if count > MAX_BACKENDS {
            MAX_BACKENDS
        } else {
            count
        };
    }

    /// Appends the next position (userspace convenience).
    pub fn push(&mut self, c: Candidate) {
        self.set(self.count, c);
        self.set_len(self.count + 1);
    }

    pub fn len(&self) -> u32 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    #[inline(always)]
    fn weight(&self, position: u32) -> u32 {
        match self.weight.get(position as usize) {
            Some(&w) if position < self.count => w,
            _ => 0,
        }
    }
}

/// The per-connection inputs of a choice.
#[derive(Clone, Copy, Debug, Default)]
pub struct Draw {
    /// A uniformly random number (random strategy).
    pub random: u32,
    /// The service's connection sequence number (round-robin, tie-breaks).
    pub sequence: u64,
    /// The position the affinity table holds for this client, when that
    /// backend is available (the caller checks: in the kernel an index
    /// read from a map cannot be used on the pool).
    pub affinity: Option<u32>,
}

/// The position of the backend that gets the connection, or `None` when no
/// backend is available (the connection is then refused).
#[inline(always)]
pub fn choose(strategy: u32, pool: &Pool, draw: &Draw) -> Option<u32> {
    match strategy {
        strategy::ROUND_ROBIN => weighted_pick(pool, draw.sequence),
        strategy::RANDOM => weighted_pick(pool, draw.random as u64),
        strategy::SOURCE_AFFINITY => match draw.affinity {
            Some(position) => Some(position),
            None => least_connections(pool, draw.sequence),
        },
        strategy::PRIORITY => first_available(pool),
        strategy::LEAST_LOADED => lowest_key::<true>(pool, draw.sequence),
        _ => least_connections(pool, draw.sequence),
    }
}

/// One open connection in the fixed point of `least-loaded`'s score.
pub const LOAD_UNIT: u32 = 1024;

/// `least-loaded`'s score of one candidate, in [`LOAD_UNIT`]s: this
/// daemon's own open connections per unit of weight once the builder has
/// taken this one too, counted live (so a burst spreads at once), plus the
/// measured load userspace wrote (see `yensid::decide::load::load_cost`).
/// The lowest score wins.
///
/// Counting the new connection itself is what makes weights mean capacity:
/// a builder of weight 1 with nothing open scores 1, one of weight 4 with
/// two open scores 0.75, so the bigger machine takes the connection. Without
/// it both idle builders score 0 and the first connections of a burst land
/// on the small one. In the processor-sharing model of the bench's makespan
/// section, its workload ends at 1.21x the best static assignment without
/// the new connection counted and at 1.11x with it.
#[inline(always)]
pub fn load_score(active: u32, weight: u32, load_cost: u32) -> u64 {
    if weight == 0 {
        return u64::MAX;
    }
    ((active as u64 + 1) * LOAD_UNIT as u64) / weight as u64 + load_cost as u64
}

/// Fewest active connections per unit of weight; ties are broken by
/// rotating the starting position with `sequence`, so idle builders share
/// sequential short connections instead of the first one taking them all.
///
/// Each position gets one u64 key, `load/weight` in 20-bit fixed point
/// above a 6-bit turn (offset from the rotating start), and the smallest
/// key wins. One comparison per position of values the verifier does not
/// track keeps its state pruning effective; a winner held as a copy of the
/// loop counter would be a different constant on every path and explode
/// it.
#[inline(always)]
fn least_connections(pool: &Pool, sequence: u64) -> Option<u32> {
    lowest_key::<false>(pool, sequence)
}

/// The position with the lowest key, ties rotating (see
/// [`least_connections`]); `LOADED` keys by [`load_score`] instead of
/// connections per weight.
#[inline(always)]
fn lowest_key<const LOADED: bool>(pool: &Pool, sequence: u64) -> Option<u32> {
    const TURN_BITS: u32 = 6;
    let count = pool.count;
    if count == 0 {
        return None;
    }
    let start = (sequence % count as u64) as u32;
    let mut best = u64::MAX;
    let mut position = 0;
    while position < MAX_BACKENDS {
        if position >= count {
            break;
        }
        // `get` rather than indexing: a panic path would leave the BPF
        // program without a final exit instruction.
        let (Some(&w), Some(&load), Some(&cost)) = (
            pool.weight.get(position as usize),
            pool.load.get(position as usize),
            pool.cost.get(position as usize),
        ) else {
            break;
        };
        // Branch-free: a branch on `start` would split its range on every
        // position and multiply the verifier's states.
        let turn = (position + count - start) % count;
        // Both scores stay below 2^53, so the shift keeps them whole.
        let key = if w == 0 {
            u64::MAX
        } else if LOADED {
            load_score(load, w, cost) << TURN_BITS | turn as u64
        } else {
            (((load as u64) << 20) / w as u64) << TURN_BITS | turn as u64
        };
        if key < best {
            best = key;
        }
        position += 1;
    }
    if best == u64::MAX {
        return None;
    }
    let turn = (best & ((1 << TURN_BITS) - 1)) as u32;
    Some((start + turn) % count)
}

/// Walks the cumulative weights of the available backends to the one that
/// holds `ticket % total weight`.
#[inline(always)]
fn weighted_pick(pool: &Pool, ticket: u64) -> Option<u32> {
    let mut total: u64 = 0;
    let mut position = 0;
    while position < MAX_BACKENDS {
        total += pool.weight(position) as u64;
        position += 1;
    }
    if total == 0 {
        return None;
    }
    let mut remaining = ticket % total;
    let mut position = 0;
    while position < MAX_BACKENDS {
        let w = pool.weight(position) as u64;
        if remaining < w {
            return Some(position);
        }
        remaining -= w;
        position += 1;
    }
    None
}

#[inline(always)]
fn first_available(pool: &Pool) -> Option<u32> {
    let mut position = 0;
    while position < MAX_BACKENDS {
        if pool.weight(position) > 0 {
            return Some(position);
        }
        position += 1;
    }
    None
}

/// Hash of a client address (IPv4 as an IPv4-mapped IPv6 address, as four
/// big-endian words) used to index the affinity table. A fixed mix
/// (murmur3's finalizer) so userspace can predict the kernel's slot.
#[inline(always)]
pub fn client_hash(words: [u32; 4]) -> u32 {
    let mut h: u32 = 0x9747_b28c;
    let mut i = 0;
    while i < 4 {
        h ^= words[i];
        h = h.wrapping_mul(0x85eb_ca6b);
        h ^= h >> 13;
        h = h.wrapping_mul(0xc2b2_ae35);
        h ^= h >> 16;
        i += 1;
    }
    h
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::*;

    fn pool(spec: &[(u32, u64, u32, bool)]) -> Pool {
        let mut pool = Pool::new();
        for &(w, active, max, eligible) in spec {
            pool.push(Candidate::new(w, max, eligible, active));
        }
        pool
    }

    fn draw(sequence: u64) -> Draw {
        Draw {
            sequence,
            ..Draw::default()
        }
    }

    #[test]
    fn least_connections_prefers_fewest_per_weight() {
        let p = pool(&[(1, 2, 0, true), (1, 1, 0, true), (3, 2, 0, true)]);
        assert_eq!(choose(strategy::LEAST_CONNECTIONS, &p, &draw(0)), Some(2));
    }

    #[test]
    fn least_connections_open_a_open_b_close_b_open_c_goes_where_b_was() {
        let mut active = [0u64, 0];
        let pick = |active: &[u64; 2], seq| {
            let p = pool(&[(1, active[0], 0, true), (1, active[1], 0, true)]);
            choose(strategy::LEAST_CONNECTIONS, &p, &draw(seq)).unwrap() as usize
        };
        let a = pick(&active, 0);
        active[a] += 1;
        let b = pick(&active, 1);
        assert_ne!(a, b);
        active[b] += 1;
        active[b] -= 1;
        let c = pick(&active, 2);
        assert_eq!(c, b);
    }

    #[test]
    fn least_connections_rotates_ties() {
        let p = pool(&[(1, 0, 0, true), (1, 0, 0, true), (1, 0, 0, true)]);
        let picks: Vec<_> = (0..3)
            .map(|s| choose(strategy::LEAST_CONNECTIONS, &p, &draw(s)).unwrap())
            .collect();
        assert_eq!(picks, [0, 1, 2]);
    }

    #[test]
    fn unavailable_backends_are_skipped_by_every_strategy() {
        let p = pool(&[(1, 0, 0, false), (1, 4, 4, true), (1, 0, 0, true)]);
        for s in 0..=5 {
            for seq in 0..8 {
                let d = Draw {
                    random: seq as u32 * 7919,
                    sequence: seq,
                    affinity: None,
                };
                assert_eq!(choose(s, &p, &d), Some(2), "strategy {s} seq {seq}");
            }
        }
    }

    #[test]
    fn nothing_available_means_refusal() {
        let p = pool(&[(1, 0, 0, false), (1, 2, 2, true)]);
        for s in 0..=5 {
            assert_eq!(choose(s, &p, &draw(3)), None);
        }
        assert_eq!(choose(0, &Pool::new(), &draw(0)), None);
    }

    #[test]
    fn zero_weight_is_never_chosen() {
        let p = pool(&[(0, 0, 0, true), (1, 9, 0, true)]);
        for s in 0..=5 {
            assert_eq!(choose(s, &p, &draw(0)), Some(1));
        }
    }

    #[test]
    fn round_robin_follows_weights() {
        let p = pool(&[(2, 0, 0, true), (1, 0, 0, true)]);
        let picks: Vec<_> = (0..6)
            .map(|s| choose(strategy::ROUND_ROBIN, &p, &draw(s)).unwrap())
            .collect();
        assert_eq!(picks, [0, 0, 1, 0, 0, 1]);
    }

    #[test]
    fn random_spreads_by_weight() {
        let p = pool(&[(3, 0, 0, true), (1, 0, 0, true)]);
        let mut counts = [0u32; 2];
        for r in 0..4000u32 {
            let d = Draw {
                random: r,
                ..Draw::default()
            };
            counts[choose(strategy::RANDOM, &p, &d).unwrap() as usize] += 1;
        }
        assert_eq!(counts, [3000, 1000]);
    }

    /// The caller passes the slot's owner only when it is available (the kernel
    /// and userspace check that; see the registry's affinity test for an owner that
    /// becomes unavailable): then the owner gets the connection, however busy.
    #[test]
    fn affinity_gives_the_connection_to_the_slot_owner() {
        let p = pool(&[(1, 5, 0, true), (1, 0, 0, true)]);
        for owner in [0, 1] {
            let d = Draw {
                affinity: Some(owner),
                ..Draw::default()
            };
            assert_eq!(choose(strategy::SOURCE_AFFINITY, &p, &d), Some(owner));
        }
    }

    /// Without an available owner, source-affinity is least connections, for every
    /// tie-break sequence, and never picks an unavailable backend.
    #[test]
    fn affinity_without_an_available_owner_is_least_connections() {
        let p = pool(&[(1, 5, 0, false), (1, 3, 0, true), (1, 1, 0, true)]);
        for seq in 0..6 {
            let fallback = choose(strategy::SOURCE_AFFINITY, &p, &draw(seq));
            assert_eq!(
                fallback,
                choose(strategy::LEAST_CONNECTIONS, &p, &draw(seq))
            );
            assert_eq!(fallback, Some(2), "sequence {seq}");
        }
    }

    #[test]
    fn priority_fills_in_order_then_spills() {
        let p = pool(&[(1, 1, 2, true), (1, 0, 2, true)]);
        assert_eq!(choose(strategy::PRIORITY, &p, &draw(0)), Some(0));
        let p = pool(&[(1, 2, 2, true), (1, 0, 2, true)]);
        assert_eq!(choose(strategy::PRIORITY, &p, &draw(0)), Some(1));
    }

    fn loaded(spec: &[(u32, u64, u32)]) -> Pool {
        let mut pool = Pool::new();
        for &(w, active, cost) in spec {
            pool.push(Candidate::new(w, 0, true, active).with_load_cost(cost));
        }
        pool
    }

    #[test]
    fn least_loaded_picks_the_lowest_measured_load_when_idle() {
        let p = loaded(&[
            (1, 0, 3 * LOAD_UNIT),
            (1, 0, LOAD_UNIT / 2),
            (1, 0, LOAD_UNIT),
        ]);
        for seq in 0..4 {
            assert_eq!(choose(strategy::LEAST_LOADED, &p, &draw(seq)), Some(1));
        }
    }

    /// A burst: the builder that was idle at the last sample fills with
    /// this daemon's own connections, counted live, until its score passes
    /// the other's measured load; then they alternate.
    #[test]
    fn least_loaded_spreads_a_burst_by_counting_own_connections() {
        let costs = [2 * LOAD_UNIT, 0];
        let mut active = [0u64, 0];
        let mut picks = Vec::new();
        for seq in 0..6 {
            let p = loaded(&[(1, active[0], costs[0]), (1, active[1], costs[1])]);
            let pick = choose(strategy::LEAST_LOADED, &p, &draw(seq)).unwrap() as usize;
            active[pick] += 1;
            picks.push(pick);
        }
        assert_eq!(&picks[..2], [1, 1], "the idle builder first: {picks:?}");
        assert_eq!(active, [2, 4], "{picks:?}");
    }

    /// Idle, the bigger machine goes first, and keeps going while it has
    /// room for more per unit of weight than the small one.
    #[test]
    fn least_loaded_counts_the_new_connection_so_weight_means_capacity() {
        let mut active = [0u64, 0];
        let mut picks = Vec::new();
        for seq in 0..5 {
            let p = loaded(&[(1, active[0], 0), (4, active[1], 0)]);
            let pick = choose(strategy::LEAST_LOADED, &p, &draw(seq)).unwrap() as usize;
            active[pick] += 1;
            picks.push(pick);
        }
        assert_eq!(picks, [1, 1, 1, 1, 0], "{active:?}");
    }

    #[test]
    fn least_loaded_divides_own_connections_by_weight() {
        // b0 has weight 4: four own connections there weigh as one on b1.
        let p = loaded(&[(4, 3, 0), (1, 1, 0)]);
        assert_eq!(choose(strategy::LEAST_LOADED, &p, &draw(0)), Some(0));
        assert_eq!(load_score(3, 4, 100), 4 * 256 + 100);
        assert_eq!(load_score(1, 0, 0), u64::MAX);
    }

    #[test]
    fn least_loaded_rotates_ties_and_skips_unavailable_builders() {
        let p = loaded(&[(1, 0, 5), (1, 0, 5)]);
        let picks: Vec<_> = (0..2)
            .map(|s| choose(strategy::LEAST_LOADED, &p, &draw(s)).unwrap())
            .collect();
        assert_eq!(picks, [0, 1]);
        let mut p = Pool::new();
        p.push(Candidate::new(1, 0, false, 0));
        p.push(Candidate::new(1, 0, true, 9).with_load_cost(u32::MAX));
        assert_eq!(choose(strategy::LEAST_LOADED, &p, &draw(0)), Some(1));
        let mut p = Pool::new();
        p.push(Candidate::new(1, 1, true, 1).with_load_cost(0));
        assert_eq!(choose(strategy::LEAST_LOADED, &p, &draw(0)), None, "full");
    }

    /// Other strategies ignore the measured load.
    #[test]
    fn load_cost_changes_no_other_strategy() {
        let p = loaded(&[(1, 0, 9 * LOAD_UNIT), (1, 1, 0)]);
        assert_eq!(choose(strategy::LEAST_CONNECTIONS, &p, &draw(0)), Some(0));
        assert_eq!(choose(strategy::PRIORITY, &p, &draw(0)), Some(0));
    }

    #[test]
    fn client_hash_spreads_addresses_over_slots() {
        let mut slots = [0u32; 256];
        for host in 0..4096u32 {
            let words = [0, 0, 0xffff, 0xc612_0000 | host];
            slots[(client_hash(words) % 256) as usize] += 1;
        }
        assert!(slots.iter().all(|&n| n > 0 && n < 48), "{slots:?}");
    }
}
