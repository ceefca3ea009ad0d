//! Decisions, as a pure function of a snapshot of state.
//!
//! `decide` turns the configuration, the mode in force, the builders'
//! health and the links towards them into a [`Plan`]: per service, whether
//! claimed connections are accepted (and why not) and which of its builders
//! may take new ones (and why not). The kernel then applies the plan at SYN time
//! with the shared selection code. Nothing here does I/O, so every rule is
//! a unit test.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
};

use yensid_ebpf::maps::AFFINITY_SLOTS;

use crate::{
    config::{Config, LinkRules, Mode},
    decide::link::{LinkKind, LinkState},
    decide::load::{self, Load, Overload},
    kernel::path::{Rtt, RttSource},
};

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
    /// The mode in force (config, hook or operator override).
    pub mode: Mode,
    /// Builders that must not get new connections, by name.
    pub unavailable: &'a HashMap<String, Unavailable>,
    /// The links and routes; `None` when they are not known (the link
    /// watcher failed), in which case link rules are not applied.
    pub links: Option<&'a LinkState>,
    /// Each builder's address, for its egress route.
    pub addresses: &'a HashMap<String, IpAddr>,
    /// Each builder's round-trip time: the kernel's while fresh, else the
    /// last successful probe's (see [`crate::kernel::path`]).
    pub rtt: &'a HashMap<String, Rtt>,
    /// Each builder's load while freshly measured (see `decide::load`);
    /// a builder missing here is judged on connection counts alone.
    pub load: &'a HashMap<String, Load>,
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
    /// The service's builders in order, each eligible for it or not.
    pub members: Vec<MemberPlan>,
}

/// One builder as one service sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberPlan {
    pub builder: String,
    /// `None`: eligible.
    pub excluded: Option<Exclusion>,
}

/// Why a builder gets no new connections of a service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Exclusion {
    Unavailable(Unavailable),
    /// No route leads to the builder.
    NoRoute,
    /// The egress link is down.
    LinkDown {
        link: String,
    },
    /// The egress link's kind is not in `remote_via`.
    LinkKind {
        link: String,
        kind: LinkKind,
    },
    /// The egress link is slower than `min_link_mbps` (or of unknown speed).
    SlowLink {
        link: String,
        mbps: Option<u32>,
        min: u32,
    },
    /// The round-trip time exceeds `max_rtt_ms` (or is unknown).
    SlowBuilder {
        /// Milliseconds and where they were measured.
        rtt_ms: Option<(u64, RttSource)>,
        max: u32,
    },
    /// A measured load is past a threshold (`max_cpu_pressure`, ...,
    /// `min_free_disk`).
    Overloaded(Overload),
}

impl std::fmt::Display for Exclusion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exclusion::Unavailable(u) => u.fmt(f),
            Exclusion::NoRoute => f.write_str("no route to it"),
            Exclusion::LinkDown { link } => write!(f, "egress link {link} is down"),
            Exclusion::LinkKind { link, kind } => {
                write!(f, "egress link {link} is {kind}, not in remote_via")
            }
            Exclusion::SlowLink {
                link,
                mbps: Some(m),
                min,
            } => {
                write!(
                    f,
                    "egress link {link} is {m} Mbit/s, below min_link_mbps {min}"
                )
            }
            Exclusion::SlowLink {
                link,
                mbps: None,
                min,
            } => {
                write!(
                    f,
                    "egress link {link} has no known speed (min_link_mbps {min})"
                )
            }
            Exclusion::SlowBuilder {
                rtt_ms: Some((r, source)),
                max,
            } => {
                write!(
                    f,
                    "{source} round-trip time {r} ms is above max_rtt_ms {max}"
                )
            }
            Exclusion::SlowBuilder { rtt_ms: None, max } => {
                write!(f, "no round-trip time measured yet (max_rtt_ms {max})")
            }
            Exclusion::Overloaded(o) => write!(f, "overloaded: {o}"),
        }
    }
}

/// Why a service refuses every connection (so Nix builds locally).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The mode in force is `local`.
    ModeLocal,
    /// Fewer eligible builders than `min_healthy_builders` (at least 1).
    TooFewEligible { eligible: usize, needed: u32 },
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::ModeLocal => f.write_str("mode is local"),
            Refusal::TooFewEligible { eligible: 0, .. } => f.write_str("no eligible builder"),
            Refusal::TooFewEligible { eligible, needed } => write!(
                f,
                "{eligible} eligible builder(s), min_healthy_builders is {needed}"
            ),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuilderPlan {
    pub name: String,
    /// Healthy and not drained (link rules are per service).
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
    let services = s
        .config
        .services
        .iter()
        .map(|svc| {
            let members: Vec<MemberPlan> = svc
                .builders
                .iter()
                .map(|b| MemberPlan {
                    builder: b.clone(),
                    excluded: exclusion(&s, &svc.rules, b).or_else(|| overloaded(&s, svc, b)),
                })
                .collect();
            let eligible = members.iter().filter(|m| m.excluded.is_none()).count();
            let needed = svc.rules.min_healthy_builders.max(1);
            let refusal = if s.mode == Mode::Local {
                Some(Refusal::ModeLocal)
            } else if eligible < needed as usize {
                Some(Refusal::TooFewEligible { eligible, needed })
            } else {
                None
            };
            ServicePlan {
                name: svc.name.clone(),
                refusal,
                members,
            }
        })
        .collect();
    Plan { services, builders }
}

/// Why `builder` may not take a new connection of a service with `rules`.
/// Health and drains apply in every mode; link rules only in `auto`.
fn exclusion(s: &Snapshot<'_>, rules: &LinkRules, builder: &str) -> Option<Exclusion> {
    if let Some(u) = s.unavailable.get(builder) {
        return Some(Exclusion::Unavailable(u.clone()));
    }
    if s.mode != Mode::Auto {
        return None;
    }
    if let Some(max) = rules.max_rtt_ms {
        let rtt_ms = s
            .rtt
            .get(builder)
            .map(|r| (r.value.as_millis() as u64, r.source));
        if rtt_ms.is_none_or(|(r, _)| r > max as u64) {
            return Some(Exclusion::SlowBuilder { rtt_ms, max });
        }
    }
    let links = s.links?;
    let Some(link) = s.addresses.get(builder).and_then(|ip| links.egress(*ip)) else {
        return Some(Exclusion::NoRoute);
    };
    if !link.up {
        return Some(Exclusion::LinkDown {
            link: link.name.clone(),
        });
    }
    if let Some(allowed) = &rules.remote_via
        && !allowed.contains(&link.kind)
    {
        return Some(Exclusion::LinkKind {
            link: link.name.clone(),
            kind: link.kind,
        });
    }
    if let Some(min) = rules.min_link_mbps
        && link.speed_mbps.is_none_or(|m| m < min)
    {
        return Some(Exclusion::SlowLink {
            link: link.name.clone(),
            mbps: link.speed_mbps,
            min,
        });
    }
    None
}

/// Whether `builder`'s measured load is past a threshold of `svc` (the
/// builder's own thresholds over the service's). Like health, this applies
/// in every mode: a builder out of disk space fails builds whatever the
/// mode. It comes after every other exclusion, so that a builder that is
/// also unhealthy or drained says so.
fn overloaded(s: &Snapshot<'_>, svc: &crate::config::Service, builder: &str) -> Option<Exclusion> {
    let measured = s.load.get(builder)?;
    let limits = s
        .config
        .builder(builder)
        .map_or(svc.load, |b| b.load.over(&svc.load));
    load::overload(measured, &limits).map(Exclusion::Overloaded)
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
    use std::time::Duration;

    use super::*;
    use crate::{config::Config, decide::link::Link};

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

    /// A laptop: b1 (198.18.1.2) behind ethernet, b2 (198.18.2.2) behind
    /// wifi; `configure` edits the links.
    fn laptop(configure: impl FnOnce(&mut Vec<Link>)) -> LinkState {
        let mut links = vec![
            Link {
                index: 2,
                name: "eth0".into(),
                kind: LinkKind::Ethernet,
                up: true,
                speed_mbps: Some(1000),
            },
            Link {
                index: 3,
                name: "wlan0".into(),
                kind: LinkKind::Wifi,
                up: true,
                speed_mbps: None,
            },
        ];
        configure(&mut links);
        LinkState::with_routes(links, &[("198.18.1.0/24", 2), ("198.18.2.0/24", 3)])
    }

    struct World {
        config: Config,
        unavailable: HashMap<String, Unavailable>,
        links: Option<LinkState>,
        addresses: HashMap<String, IpAddr>,
        rtt: HashMap<String, Rtt>,
        load: HashMap<String, Load>,
    }

    impl World {
        fn new(services: &str) -> Self {
            Self {
                config: config(services),
                unavailable: HashMap::new(),
                links: Some(laptop(|_| {})),
                addresses: HashMap::from([
                    ("b1".to_owned(), "198.18.1.2".parse().unwrap()),
                    ("b2".to_owned(), "198.18.2.2".parse().unwrap()),
                ]),
                rtt: HashMap::new(),
                load: HashMap::new(),
            }
        }

        fn decide(&self, mode: Mode) -> Plan {
            decide(Snapshot {
                config: &self.config,
                mode,
                unavailable: &self.unavailable,
                links: self.links.as_ref(),
                addresses: &self.addresses,
                rtt: &self.rtt,
                load: &self.load,
            })
        }
    }

    /// The exclusions of service `index`'s members, in order.
    fn excluded(plan: &Plan, index: usize) -> Vec<Option<Exclusion>> {
        plan.services[index]
            .members
            .iter()
            .map(|m| m.excluded.clone())
            .collect()
    }

    const ONE_SERVICE: &str = "[[service]]\nname = \"a\"\nlisten = [\"127.0.0.22\"]\n";

    fn with_policy(rules: &str) -> String {
        format!("{ONE_SERVICE}\n[policy]\n{rules}\n")
    }

    #[test]
    fn auto_and_remote_accept_when_a_builder_is_eligible() {
        let w = World::new(TWO_SERVICES);
        for mode in [Mode::Auto, Mode::Remote] {
            let plan = w.decide(mode);
            assert!(plan.services.iter().all(|s| s.refusal.is_none()));
            assert!(plan.builders.iter().all(|b| b.eligible));
            assert_eq!(excluded(&plan, 1), [None, None]);
        }
    }

    /// Thresholds exclude a builder in every mode but local, builder
    /// thresholds over the service's; an unmeasured builder stays.
    #[test]
    fn an_overloaded_builder_is_excluded_and_says_which_metric() {
        let mut w = World::new(
            "[[service]]\nname = \"a\"\nlisten = [\"127.0.0.22\"]\nload = { max_cpu_pressure = 0.5 }\n\
             [[service]]\nname = \"b\"\nlisten = [\"127.0.0.23\"]\n",
        );
        w.load.insert(
            "b1".into(),
            Load {
                cpu_pressure: Some(0.6),
                ..Load::default()
            },
        );
        for mode in [Mode::Auto, Mode::Remote] {
            let plan = w.decide(mode);
            let [Some(Exclusion::Overloaded(o)), None] = &excluded(&plan, 0)[..] else {
                panic!("{plan:?}");
            };
            assert_eq!(
                Exclusion::Overloaded(o.clone()).to_string(),
                "overloaded: cpu pressure 60.0% is above max_cpu_pressure 50.0%"
            );
            assert_eq!(
                excluded(&plan, 1),
                [None, None],
                "service b has no threshold"
            );
            assert!(plan.builders[0].eligible, "other services may still use it");
        }
        w.config = config(
            "[[service]]\nname = \"a\"\nlisten = [\"127.0.0.22\"]\nload = { max_cpu_pressure = 0.5 }\n",
        );
        let mut b1 = w.config.builders[0].clone();
        b1.load.max_cpu_pressure = Some(crate::config::load::Ratio(0.9));
        w.config.builders[0] = b1;
        assert_eq!(excluded(&w.decide(Mode::Auto), 0), [None, None]);
        w.load.clear();
        w.config.builders[0].load = Default::default();
        assert_eq!(
            excluded(&w.decide(Mode::Auto), 0),
            [None, None],
            "unmeasured"
        );
    }

    #[test]
    fn local_mode_refuses_every_service() {
        let plan = World::new(TWO_SERVICES).decide(Mode::Local);
        assert!(
            plan.services
                .iter()
                .all(|s| s.refusal == Some(Refusal::ModeLocal))
        );
    }

    #[test]
    fn a_service_refuses_only_when_all_its_builders_are_unavailable() {
        let mut w = World::new(TWO_SERVICES);
        w.unavailable.insert("b1".to_owned(), failed());
        let plan = w.decide(Mode::Auto);
        let none = Refusal::TooFewEligible {
            eligible: 0,
            needed: 1,
        };
        assert_eq!(plan.services[0].refusal, Some(none.clone()));
        assert_eq!(none.to_string(), "no eligible builder");
        assert_eq!(plan.services[1].refusal, None);
        assert_eq!(plan.builders[0].unavailable, Some(failed()));
        assert!(!plan.builders[0].eligible && plan.builders[1].eligible);
        assert_eq!(
            excluded(&plan, 1),
            [Some(Exclusion::Unavailable(failed())), None]
        );
    }

    #[test]
    fn draining_builders_are_not_eligible_and_say_so() {
        let mut w = World::new(TWO_SERVICES);
        w.unavailable.insert("b2".to_owned(), Unavailable::Draining);
        let plan = w.decide(Mode::Remote);
        assert_eq!(plan.builders[1].unavailable, Some(Unavailable::Draining));
        assert!(!plan.builders[1].eligible);
        assert_eq!(plan.services[1].refusal, None, "b1 still serves service b");
        assert_eq!(Unavailable::Draining.to_string(), "draining");
        assert_eq!(failed().to_string(), "unhealthy (connection refused)");
    }

    #[test]
    fn local_mode_wins_over_unavailability() {
        let mut w = World::new(TWO_SERVICES);
        w.unavailable.insert("b1".to_owned(), failed());
        w.unavailable.insert("b2".to_owned(), failed());
        assert_eq!(
            w.decide(Mode::Local).services[1].refusal,
            Some(Refusal::ModeLocal)
        );
    }

    #[test]
    fn remote_via_excludes_other_link_kinds_in_auto_only() {
        let w = World::new(&with_policy("remote_via = [\"ethernet\"]"));
        let plan = w.decide(Mode::Auto);
        let wifi = Exclusion::LinkKind {
            link: "wlan0".into(),
            kind: LinkKind::Wifi,
        };
        assert_eq!(excluded(&plan, 0), [None, Some(wifi.clone())]);
        assert_eq!(
            wifi.to_string(),
            "egress link wlan0 is wifi, not in remote_via"
        );
        assert_eq!(plan.services[0].refusal, None);
        assert_eq!(excluded(&w.decide(Mode::Remote), 0), [None, None]);
    }

    #[test]
    fn a_down_link_or_a_missing_route_excludes_its_builder() {
        let mut w = World::new(&with_policy("remote_via = [\"ethernet\"]"));
        w.links = Some(laptop(|links| links[0].up = false));
        let plan = w.decide(Mode::Auto);
        assert_eq!(
            excluded(&plan, 0)[0],
            Some(Exclusion::LinkDown {
                link: "eth0".into()
            })
        );
        assert!(
            plan.services[0].refusal.is_some(),
            "wifi is not allowed either"
        );
        w.addresses
            .insert("b1".into(), "203.0.113.7".parse().unwrap());
        assert_eq!(
            excluded(&w.decide(Mode::Auto), 0)[0],
            Some(Exclusion::NoRoute)
        );
        assert_eq!(
            excluded(&w.decide(Mode::Remote), 0)[0],
            None,
            "remote ignores link rules"
        );
    }

    #[test]
    fn links_unknown_means_link_rules_are_not_applied() {
        let mut w = World::new(&with_policy(
            "remote_via = [\"ethernet\"]\nmin_link_mbps = 100",
        ));
        w.links = None;
        assert_eq!(excluded(&w.decide(Mode::Auto), 0), [None, None]);
    }

    #[test]
    fn min_link_mbps_needs_a_known_fast_enough_link() {
        let mut w = World::new(&with_policy("min_link_mbps = 100"));
        let plan = w.decide(Mode::Auto);
        assert_eq!(excluded(&plan, 0)[0], None, "1000 Mbit/s ethernet");
        let unknown = Exclusion::SlowLink {
            link: "wlan0".into(),
            mbps: None,
            min: 100,
        };
        assert_eq!(excluded(&plan, 0)[1], Some(unknown));
        w.links = Some(laptop(|links| links[1].speed_mbps = Some(54)));
        let slow = excluded(&w.decide(Mode::Auto), 0)[1].clone().unwrap();
        assert_eq!(
            slow.to_string(),
            "egress link wlan0 is 54 Mbit/s, below min_link_mbps 100"
        );
    }

    #[test]
    fn max_rtt_ms_needs_a_measured_low_enough_rtt() {
        let mut w = World::new(&with_policy("max_rtt_ms = 50"));
        let rtt = |ms, source| Rtt {
            value: Duration::from_millis(ms),
            source,
        };
        w.rtt.insert("b1".into(), rtt(3, RttSource::Probe));
        w.rtt.insert("b2".into(), rtt(80, RttSource::Kernel));
        let plan = w.decide(Mode::Auto);
        assert_eq!(excluded(&plan, 0)[0], None);
        let slow = excluded(&plan, 0)[1].clone().unwrap();
        assert_eq!(
            slow,
            Exclusion::SlowBuilder {
                rtt_ms: Some((80, RttSource::Kernel)),
                max: 50
            }
        );
        assert_eq!(
            slow.to_string(),
            "kernel round-trip time 80 ms is above max_rtt_ms 50"
        );
        w.rtt.insert("b1".into(), rtt(51, RttSource::Probe));
        assert_eq!(
            excluded(&w.decide(Mode::Auto), 0)[0]
                .as_ref()
                .unwrap()
                .to_string(),
            "probe round-trip time 51 ms is above max_rtt_ms 50"
        );
        w.rtt.insert("b1".into(), rtt(50, RttSource::Probe));
        assert_eq!(
            excluded(&w.decide(Mode::Auto), 0)[0],
            None,
            "50 is not above 50"
        );
        w.rtt.clear();
        assert!(
            excluded(&w.decide(Mode::Auto), 0)
                .iter()
                .all(|e| matches!(e, Some(Exclusion::SlowBuilder { rtt_ms: None, .. })))
        );
    }

    #[test]
    fn min_healthy_builders_refuses_a_thin_pool() {
        let mut w = World::new(&with_policy("min_healthy_builders = 2"));
        assert_eq!(w.decide(Mode::Auto).services[0].refusal, None);
        w.unavailable.insert("b2".into(), Unavailable::Draining);
        let refusal = w.decide(Mode::Remote).services[0].refusal.clone().unwrap();
        assert_eq!(
            refusal.to_string(),
            "1 eligible builder(s), min_healthy_builders is 2"
        );
    }

    #[test]
    fn per_service_rules_override_the_global_ones() {
        let text = "[[service]]\nname = \"a\"\nlisten = [\"127.0.0.22\"]\n\
                    [[service]]\nname = \"b\"\nlisten = [\"127.0.0.23\"]\npolicy = { remote_via = [\"wifi\", \"ethernet\"] }\n\
                    [policy]\nremote_via = [\"ethernet\"]\n";
        let plan = World::new(text).decide(Mode::Auto);
        assert!(excluded(&plan, 0)[1].is_some());
        assert_eq!(excluded(&plan, 1), [None, None]);
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
