//! Decisions, as a pure function of a snapshot of state.
//!
//! `decide` turns the configuration, the mode in force and the builders'
//! health into a [`Plan`]: per service, whether claimed connections are
//! accepted (and why not), and per builder whether it may take new
//! connections (and why not). The kernel then applies the plan at SYN time
//! with the shared selection code. Nothing here does I/O, so every rule is
//! a unit test.

use std::collections::{BTreeMap, HashMap};

use yensid_ebpf::maps::AFFINITY_SLOTS;

use crate::config::{Config, Mode};

/// Why a builder may not take new connections right now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unavailable {
    /// The operator drained it: open connections continue, no new ones.
    Draining,
    /// Probes or a real connection failed (the reason says how).
    Unhealthy { reason: String },
}

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unavailable::Draining => f.write_str("draining"),
            Unavailable::Unhealthy { reason } => write!(f, "unhealthy ({reason})"),
        }
    }
}

/// What the state looks like at one instant.
#[derive(Clone, Copy, Debug)]
pub struct Snapshot<'a> {
    pub config: &'a Config,
    pub mode: Mode,
    /// Builders that must not get new connections, by name.
    pub unavailable: &'a HashMap<String, Unavailable>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub services: Vec<ServicePlan>,
    pub builders: Vec<BuilderPlan>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePlan {
    pub name: String,
    /// `None`: connections go to builders; `Some`: every one is refused.
    pub refusal: Option<Refusal>,
}

/// Why a service refuses every connection (so Nix builds locally).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The mode in force is `local`.
    ModeLocal,
    /// None of the service's builders is eligible.
    NoEligibleBuilder,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::ModeLocal => f.write_str("mode is local"),
            Refusal::NoEligibleBuilder => f.write_str("no eligible builder"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuilderPlan {
    pub name: String,
    pub eligible: bool,
    pub unavailable: Option<Unavailable>,
}

/// The plan for a snapshot.
pub fn decide(s: Snapshot<'_>) -> Plan {
    let builders: Vec<BuilderPlan> = s
        .config
        .builders
        .iter()
        .map(|b| {
            let unavailable = s.unavailable.get(&b.name).cloned();
            BuilderPlan {
                name: b.name.clone(),
                eligible: unavailable.is_none(),
                unavailable,
            }
        })
        .collect();
    let eligible = |name: &str| builders.iter().any(|b| b.name == name && b.eligible);
    let services = s
        .config
        .services
        .iter()
        .map(|svc| {
            let refusal = if s.mode == Mode::Local {
                Some(Refusal::ModeLocal)
            } else if !svc.builders.iter().any(|b| eligible(b)) {
                Some(Refusal::NoEligibleBuilder)
            } else {
                None
            };
            ServicePlan {
                name: svc.name.clone(),
                refusal,
            }
        })
        .collect();
    Plan { services, builders }
}

/// The source-affinity table of a service: `AFFINITY_SLOTS` slots, each
/// naming the builder that clients hashing to it are sent to.
///
/// Each builder's share of slots follows its weight. The table is rebuilt
/// from the `previous` one with as few moves as possible: a slot keeps its
/// builder while that builder is still a member and within its share, so
/// removing a builder moves only that builder's clients, and adding one
/// takes only the slots it needs.
pub fn affinity_table(previous: &[String], members: &[(String, u32)]) -> Vec<String> {
    let slots = AFFINITY_SLOTS as usize;
    if members.is_empty() {
        return Vec::new();
    }
    let quota = quotas(members, slots);
    let mut used: BTreeMap<&str, usize> = BTreeMap::new();
    let mut table: Vec<Option<String>> = vec![None; slots];
    for (slot, name) in previous.iter().enumerate().take(slots) {
        if let Some(&q) = quota.get(name.as_str()) {
            let n = used.entry(name.as_str()).or_default();
            if *n < q {
                *n += 1;
                table[slot] = Some(name.clone());
            }
        }
    }
    // Hand out the free slots, interleaving builders so that each one's
    // slots are spread over the hash space.
    let mut wanting: Vec<(&str, usize)> = members
        .iter()
        .map(|(name, _)| {
            let have = used.get(name.as_str()).copied().unwrap_or(0);
            (name.as_str(), quota[name.as_str()] - have)
        })
        .collect();
    let mut next = 0;
    let count = wanting.len();
    for slot in table.iter_mut().filter(|s| s.is_none()) {
        while wanting[next % count].1 == 0 {
            next += 1;
        }
        let entry = &mut wanting[next % count];
        entry.1 -= 1;
        *slot = Some(entry.0.to_owned());
        next += 1;
    }
    table
        .into_iter()
        .map(|s| s.expect("every slot filled"))
        .collect()
}

/// Slots per builder, proportional to weight, summing to `slots`
/// (largest remainder).
fn quotas(members: &[(String, u32)], slots: usize) -> HashMap<&str, usize> {
    let total: u64 = members.iter().map(|(_, w)| *w as u64).sum::<u64>().max(1);
    let mut quota: Vec<(&str, usize, u64)> = members
        .iter()
        .map(|(name, w)| {
            let exact = *w as u64 * slots as u64;
            (name.as_str(), (exact / total) as usize, exact % total)
        })
        .collect();
    let mut missing = slots - quota.iter().map(|q| q.1).sum::<usize>();
    let mut order: Vec<usize> = (0..quota.len()).collect();
    order.sort_by(|&a, &b| quota[b].2.cmp(&quota[a].2).then(a.cmp(&b)));
    for i in order.into_iter().cycle() {
        if missing == 0 {
            break;
        }
        quota[i].1 += 1;
        missing -= 1;
    }
    quota.into_iter().map(|(n, q, _)| (n, q)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn config(services: &str) -> Config {
        Config::parse(&format!(
            "{services}\n[builders.b1]\naddress = \"198.18.1.2:22\"\n[builders.b2]\naddress = \"198.18.2.2:22\"\n"
        ))
        .unwrap()
    }

    const TWO_SERVICES: &str = "[[service]]\nname = \"a\"\nlisten = [\"127.0.0.22\"]\nbuilders = [\"b1\"]\n[[service]]\nname = \"b\"\nlisten = [\"127.0.0.23\"]\n";

    fn failed() -> Unavailable {
        Unavailable::Unhealthy {
            reason: "connection refused".into(),
        }
    }

    #[test]
    fn auto_and_remote_accept_when_a_builder_is_eligible() {
        let c = config(TWO_SERVICES);
        for mode in [Mode::Auto, Mode::Remote] {
            let plan = decide(Snapshot {
                config: &c,
                mode,
                unavailable: &HashMap::new(),
            });
            assert!(plan.services.iter().all(|s| s.refusal.is_none()));
            assert!(plan.builders.iter().all(|b| b.eligible));
        }
    }

    #[test]
    fn local_mode_refuses_every_service() {
        let c = config(TWO_SERVICES);
        let plan = decide(Snapshot {
            config: &c,
            mode: Mode::Local,
            unavailable: &HashMap::new(),
        });
        assert!(
            plan.services
                .iter()
                .all(|s| s.refusal == Some(Refusal::ModeLocal))
        );
    }

    #[test]
    fn a_service_refuses_only_when_all_its_builders_are_unavailable() {
        let c = config(TWO_SERVICES);
        let down = HashMap::from([("b1".to_owned(), failed())]);
        let plan = decide(Snapshot {
            config: &c,
            mode: Mode::Auto,
            unavailable: &down,
        });
        assert_eq!(plan.services[0].refusal, Some(Refusal::NoEligibleBuilder));
        assert_eq!(plan.services[1].refusal, None);
        assert_eq!(plan.builders[0].unavailable, Some(failed()));
        assert!(!plan.builders[0].eligible && plan.builders[1].eligible);
    }

    #[test]
    fn draining_builders_are_not_eligible_and_say_so() {
        let c = config(TWO_SERVICES);
        let drained = HashMap::from([("b2".to_owned(), Unavailable::Draining)]);
        let plan = decide(Snapshot {
            config: &c,
            mode: Mode::Auto,
            unavailable: &drained,
        });
        assert_eq!(plan.builders[1].unavailable, Some(Unavailable::Draining));
        assert!(!plan.builders[1].eligible);
        assert_eq!(plan.services[1].refusal, None, "b1 still serves service b");
        assert_eq!(Unavailable::Draining.to_string(), "draining");
        assert_eq!(failed().to_string(), "unhealthy (connection refused)");
    }

    #[test]
    fn local_mode_wins_over_unavailability() {
        let c = config(TWO_SERVICES);
        let down = HashMap::from([("b1".to_owned(), failed()), ("b2".to_owned(), failed())]);
        let plan = decide(Snapshot {
            config: &c,
            mode: Mode::Local,
            unavailable: &down,
        });
        assert_eq!(plan.services[1].refusal, Some(Refusal::ModeLocal));
    }

    fn members(spec: &[(&str, u32)]) -> Vec<(String, u32)> {
        spec.iter().map(|(n, w)| (n.to_string(), *w)).collect()
    }

    fn share(table: &[String], name: &str) -> usize {
        table.iter().filter(|n| *n == name).count()
    }

    #[test]
    fn affinity_shares_follow_weights() {
        let t = affinity_table(&[], &members(&[("a", 3), ("b", 1)]));
        assert_eq!(t.len(), AFFINITY_SLOTS as usize);
        assert_eq!((share(&t, "a"), share(&t, "b")), (192, 64));
        let t = affinity_table(&[], &members(&[("a", 1), ("b", 1), ("c", 1)]));
        assert_eq!(share(&t, "a") + share(&t, "b") + share(&t, "c"), 256);
        assert!(
            [share(&t, "a"), share(&t, "b"), share(&t, "c")]
                .iter()
                .all(|&n| n == 85 || n == 86)
        );
    }

    #[test]
    fn removing_a_builder_moves_only_its_slots() {
        let before = affinity_table(&[], &members(&[("a", 1), ("b", 1), ("c", 1)]));
        let after = affinity_table(&before, &members(&[("a", 1), ("c", 1)]));
        for (old, new) in before.iter().zip(&after) {
            if old != "b" {
                assert_eq!(old, new);
            } else {
                assert_ne!(new, "b");
            }
        }
        assert_eq!(share(&after, "a") + share(&after, "c"), 256);
    }

    #[test]
    fn adding_a_builder_takes_only_its_share() {
        let before = affinity_table(&[], &members(&[("a", 1), ("b", 1)]));
        let after = affinity_table(&before, &members(&[("a", 1), ("b", 1), ("c", 2)]));
        let moved = before.iter().zip(&after).filter(|(o, n)| o != n).count();
        assert_eq!(moved, share(&after, "c"));
        assert_eq!(share(&after, "c"), 128);
    }

    #[test]
    fn an_unchanged_pool_keeps_its_table() {
        let m = members(&[("a", 2), ("b", 1)]);
        let t = affinity_table(&[], &m);
        assert_eq!(affinity_table(&t, &m), t);
        assert!(affinity_table(&t, &[]).is_empty());
    }
}
