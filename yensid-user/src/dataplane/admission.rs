//! Admission of accepted connections into the SSH handoff.
//!
//! A connection in handoff has not said it is SSH yet: it holds a
//! descriptor and a task, and nothing upstream (the builder is connected
//! only after the client's identification line). [`Handoffs`] caps how many
//! such connections exist at once, in total and per client address, so a
//! flood of silent or short connections is bounded; beyond a cap a new
//! connection is refused (RST) at once. [`Quiet`] keeps the log readable
//! under such a flood: a few lines per decision kind and interval, then
//! one with the count of what it left out.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use crate::config::HandoffLimits;

/// Connections in handoff, in total and per client address.
pub struct Handoffs {
    limits: HandoffLimits,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    total: u32,
    per_client: HashMap<IpAddr, u32>,
    /// Connections refused because a cap was reached, over the daemon's life.
    refused: u64,
}

/// Which cap refused a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Full {
    /// `max_handoffs` connections are in handoff.
    Total(u32),
    /// `max_handoffs_per_client` connections from this address are.
    Client(u32),
}

impl std::fmt::Display for Full {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Full::Total(n) => write!(f, "{n} connections in handoff (daemon.max_handoffs)"),
            Full::Client(n) => write!(
                f,
                "{n} connections in handoff from this address (daemon.max_handoffs_per_client)"
            ),
        }
    }
}

/// One connection's place in the handoff; given back when dropped.
pub struct Ticket {
    handoffs: Arc<Handoffs>,
    client: IpAddr,
}

impl Handoffs {
    pub fn new(limits: HandoffLimits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            state: Mutex::default(),
        })
    }

    pub fn limits(&self) -> HandoffLimits {
        self.limits
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("handoff counts poisoned")
    }

    /// Takes a place for a connection from `client`, unless a cap is
    /// reached (then the refusal is counted).
    pub fn admit(self: &Arc<Self>, client: IpAddr) -> Result<Ticket, Full> {
        // An IPv4 client on a dual-stack listener is the same client.
        let client = client.to_canonical();
        let mut state = self.state();
        let from_client = state.per_client.get(&client).copied().unwrap_or(0);
        let full = if state.total >= self.limits.max_handoffs {
            Some(Full::Total(state.total))
        } else if from_client >= self.limits.max_handoffs_per_client {
            Some(Full::Client(from_client))
        } else {
            None
        };
        if let Some(full) = full {
            state.refused += 1;
            return Err(full);
        }
        state.total += 1;
        state.per_client.insert(client, from_client + 1);
        Ok(Ticket {
            handoffs: self.clone(),
            client,
        })
    }

    /// Connections in handoff now.
    pub fn in_progress(&self) -> u32 {
        self.state().total
    }

    /// Connections refused at a cap so far.
    pub fn refused(&self) -> u64 {
        self.state().refused
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut state = self.handoffs.state();
        state.total = state.total.saturating_sub(1);
        if let Some(n) = state.per_client.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                state.per_client.remove(&self.client);
            }
        }
    }
}

/// A rate limit for log lines about events a flood repeats: at most `burst`
/// lines per `interval`; the next line written says how many were left out.
pub struct Quiet {
    interval: Duration,
    burst: u32,
    state: Mutex<QuietState>,
}

struct QuietState {
    window_start: Option<Instant>,
    written: u32,
    left_out: u64,
}

impl Quiet {
    pub const fn new(interval: Duration, burst: u32) -> Self {
        Self {
            interval,
            burst,
            state: Mutex::new(QuietState {
                window_start: None,
                written: 0,
                left_out: 0,
            }),
        }
    }

    /// `Some(n)` when a line may be written now: it stands for this event
    /// and the `n` left out before it. `None`: leave this one out.
    pub fn allow(&self, now: Instant) -> Option<u64> {
        let mut state = self.state.lock().expect("log limit poisoned");
        let expired = state
            .window_start
            .is_none_or(|start| now.saturating_duration_since(start) >= self.interval);
        if expired {
            state.window_start = Some(now);
            state.written = 0;
        }
        if state.written < self.burst {
            state.written += 1;
            Some(std::mem::take(&mut state.left_out))
        } else {
            state.left_out += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(total: u32, per_client: u32) -> HandoffLimits {
        HandoffLimits {
            ident_timeout: Duration::from_secs(5),
            max_handoffs: total,
            max_handoffs_per_client: per_client,
        }
    }

    #[test]
    fn caps_per_client_and_in_total_and_gives_places_back() {
        let h = Handoffs::new(limits(3, 2));
        let a: IpAddr = "198.18.0.1".parse().unwrap();
        let b: IpAddr = "198.18.0.2".parse().unwrap();
        let a1 = h.admit(a).unwrap();
        // The same client on a dual-stack listener.
        let a2 = h.admit("::ffff:198.18.0.1".parse().unwrap()).unwrap();
        assert_eq!(h.admit(a).err(), Some(Full::Client(2)));
        let b1 = h.admit(b).unwrap();
        assert_eq!(h.admit(b).err(), Some(Full::Total(3)));
        assert_eq!((h.in_progress(), h.refused()), (3, 2));
        drop(a1);
        let b2 = h.admit(b).unwrap();
        drop((a2, b1, b2));
        assert_eq!(h.in_progress(), 0);
        assert!(h.state().per_client.is_empty(), "no address is kept");
    }

    #[test]
    fn quiet_writes_a_burst_per_interval_then_the_count_left_out() {
        let q = Quiet::new(Duration::from_secs(10), 2);
        let t0 = Instant::now();
        let at = |s| t0 + Duration::from_secs(s);
        assert_eq!(q.allow(at(0)), Some(0));
        assert_eq!(q.allow(at(1)), Some(0));
        assert_eq!(q.allow(at(2)), None);
        assert_eq!(q.allow(at(9)), None);
        assert_eq!(q.allow(at(10)), Some(2));
        assert_eq!(q.allow(at(11)), Some(0));
        assert_eq!(q.allow(at(12)), None);
    }
}
