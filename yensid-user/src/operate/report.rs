//! What `yensid status`, `yensid explain` and `yensid mode` say: documents
//! and sentences built from the registry, the last plan and the kernel's
//! counters. Read-only; the controller gathers the [`Context`].

use std::{collections::HashMap, net::IpAddr, sync::Arc};

use yensid_ebpf::maps::ServiceCounters;

use crate::{
    config::WhenFull,
    dataplane::queue::Queues,
    decide::registry::{Inner, ModeSource},
    operate::status::{
        BuilderStatus, HandoffStatus, LoadStatus, MemberStatus, ModeStatus, PrefixDelivery,
        ServiceStatus, Status,
    },
    state::unix_now,
};

/// What the reports need besides the registry.
pub struct Context {
    /// The kernel's counters by service name (empty without BPF).
    pub counters: HashMap<String, ServiceCounters>,
    /// `kernel` or `userspace`.
    pub dataplane: &'static str,
    /// `sockmap` or `splice` (`[daemon] forward`).
    pub forward: &'static str,
    /// Why.
    pub forward_reason: &'static str,
    pub bpf: bool,
    /// `kernel` when the `observe` program measures builder paths,
    /// otherwise `probes only: <why>`.
    pub path_measurement: String,
    /// How each claimed prefix reaches the host's stack, by prefix text;
    /// a prefix missing here is unknown.
    pub local_delivery: HashMap<String, PrefixDelivery>,
    /// Connections in handoff.
    pub handoffs: HandoffStatus,
    /// The queues of services with `when_full = "queue"`.
    pub queues: Arc<Queues>,
}

/// `yensid explain`: the decision for the next connection of a service
/// from `from`, with every rule that made it.
pub fn explain(
    inner: &Inner,
    context: &Context,
    service: Option<&str>,
    from: Option<IpAddr>,
) -> Result<Vec<String>, String> {
    let svc = match service {
        Some(name) => inner.config.services.iter().find(|s| s.name == name),
        None => inner.config.services.first(),
    }
    .ok_or_else(|| {
        let known: Vec<&str> = inner
            .config
            .services
            .iter()
            .map(|s| s.name.as_str())
            .collect();
        format!(
            "unknown service `{}` (configured: {})",
            service.unwrap_or(""),
            known.join(", ")
        )
    })?;
    let plan = inner.service_plan(&svc.name).ok_or("no plan yet")?;
    let claims: Vec<String> = svc.listen.iter().map(ToString::to_string).collect();
    let mut lines = vec![
        format!(
            "service {} ({} port {}, strategy {})",
            svc.name,
            claims.join(", "),
            svc.port,
            svc.strategy
        ),
        describe_mode(inner),
    ];
    for m in &plan.members {
        let active =
            inner.active.get(&m.builder).copied().unwrap_or(0) + inner.local_counts(&m.builder).0;
        let mut line = match &m.excluded {
            None => format!(
                "  {}: eligible, {active} open connection(s), weight {}",
                m.builder,
                inner.weight(&m.builder)
            ),
            Some(why) => format!("  {}: excluded: {why}", m.builder),
        };
        if let Some(b) = inner.config.builder(&m.builder)
            && let Some(load) = load_status(inner, b)
        {
            line.push_str(&format!(
                "; load: {}",
                crate::operate::status::describe_load(&load)
            ));
        }
        lines.push(line);
    }
    // Before the decision, which stays the last line.
    lines.push(format!(
        "next local connection (a client on this host) takes the path: {}",
        crate::decide::local::path_of(&inner.local, svc.local_clients)
    ));
    let client = from.map_or("a client".to_owned(), |ip| ip.to_string());
    if let Some(refusal) = &plan.refusal {
        lines.push(format!(
            "next connection from {client}: REFUSED (RST) because {refusal}: Nix builds locally"
        ));
        return Ok(lines);
    }
    // The kernel rotates round-robin and least-connections ties on its
    // own per-service sequence; userspace's counts only its own picks.
    let sequence = match context.counters.get(&svc.name) {
        Some(c) => c.sequence,
        None => inner.next_sequence(),
    };
    let decision = inner.predict(svc, from, sequence);
    lines.push(format!("next connection from {client}: {decision}"));
    Ok(lines)
}

/// Everything `yensid status` shows.
pub fn status(inner: &Inner, context: &Context) -> Status {
    let now = unix_now();
    let (mode, source) = inner.mode_in_force(now);
    let (source, until, reason) = match source {
        ModeSource::Config => ("config", None, None),
        ModeSource::Hook { reason } => ("hook", None, reason),
        ModeSource::Override { until } => ("override", until, None),
    };
    let services = inner
        .config
        .services
        .iter()
        .map(|svc| {
            let sp = inner.service_plan(&svc.name);
            let counters = context.counters.get(&svc.name).copied();
            ServiceStatus {
                name: svc.name.clone(),
                listen: svc.listen.iter().map(ToString::to_string).collect(),
                port: svc.port,
                strategy: svc.strategy.to_string(),
                refusal: sp.and_then(|s| s.refusal.as_ref()).map(ToString::to_string),
                members: sp
                    .map(|s| {
                        s.members
                            .iter()
                            .map(|m| MemberStatus {
                                builder: m.builder.clone(),
                                excluded: m.excluded.as_ref().map(ToString::to_string),
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
                dispatched: counters.map(|c| c.dispatched),
                refused_mode_local: counters.map(|c| c.refused_mode),
                refused_no_builder: counters.map(|c| c.refused_unavailable),
                local_clients: crate::decide::local::path_of(&inner.local, svc.local_clients),
                local_delivery: svc
                    .listen
                    .iter()
                    .map(|p| {
                        let text = p.to_string();
                        context
                            .local_delivery
                            .get(&text)
                            .cloned()
                            .unwrap_or(PrefixDelivery {
                                prefix: text,
                                deliverable: None,
                                how: "unknown: yensid does not manage local routes (see its log)"
                                    .to_owned(),
                            })
                    })
                    .collect(),
                queue: match svc.when_full {
                    WhenFull::Queue(settings) => Some(context.queues.status(
                        &svc.name,
                        settings,
                        counters.map(|c| c.queued),
                    )),
                    WhenFull::Refuse => None,
                },
            }
        })
        .collect();
    let builders = inner
        .config
        .builders
        .iter()
        .map(|b| {
            let tracker = inner.health.get(&b.name);
            let failure = tracker.and_then(|t| t.failure()).map(ToString::to_string);
            let local = local_status(inner, &b.name);
            let active = inner
                .active
                .get(&b.name)
                .copied()
                .unwrap_or(0)
                .saturating_add(local.open);
            let full = b.max_connections.is_some_and(|m| active >= m as u64);
            let (state, reason) = if inner.drained.contains(&b.name) {
                ("draining", None)
            } else if failure.is_some() {
                ("unhealthy", failure)
            } else if full {
                ("full", None)
            } else {
                ("healthy", None)
            };
            let totals = inner.totals.get(&b.name);
            let path = inner.paths.get(&b.name);
            BuilderStatus {
                name: b.name.clone(),
                address: b.address.clone(),
                state: state.to_owned(),
                reason,
                weight: inner.weight(&b.name),
                max_connections: b.max_connections,
                active,
                connections: totals.map_or(0, |t| t.connections),
                rejected_clients: totals.map_or(0, |t| t.rejected_clients),
                failed_over: totals.map_or(0, |t| t.failed_over),
                spliced: totals.map_or(0, |t| t.spliced),
                copied: totals.map_or(0, |t| t.copied),
                bytes_to_builder: totals.map_or(0, |t| t.to_builder),
                bytes_from_builder: totals.map_or(0, |t| t.from_builder),
                rtt_ms: tracker
                    .and_then(|t| t.last_rtt())
                    .map(|d| d.as_secs_f64() * 1e3),
                kernel_rtt_ms: path.and_then(|p| p.rtt()).map(|d| d.as_secs_f64() * 1e3),
                rtt_samples: path.map_or(0, |p| p.samples()),
                retransmits: path.map_or(0, |p| p.retransmits()),
                egress: inner
                    .links
                    .as_ref()
                    .zip(inner.addresses.get(&b.name))
                    .and_then(|(l, ip)| l.egress(*ip).cloned()),
                connect_seconds: inner
                    .connect_times
                    .get(&b.name)
                    .cloned()
                    .unwrap_or_default(),
                local,
                load: load_status(inner, b),
            }
        })
        .collect();
    Status {
        pid: std::process::id(),
        dataplane: context.dataplane.to_owned(),
        forward: context.forward.to_owned(),
        forward_reason: context.forward_reason.to_owned(),
        bpf: context.bpf,
        path_measurement: context.path_measurement.clone(),
        mode: ModeStatus {
            in_force: mode.to_string(),
            source: source.to_owned(),
            until,
            reason,
            summary: describe_mode(inner),
        },
        services,
        builders,
        handoffs: context.handoffs.clone(),
        takeover: inner.takeover.clone(),
        retired_builders: inner
            .active
            .iter()
            .filter(|&(name, &n)| n > 0 && inner.config.builder(name).is_none())
            .map(|(name, &active)| crate::operate::status::RetiredBuilder {
                name: name.clone(),
                active,
            })
            .collect(),
    }
}

/// What a builder's metrics say, for builders that have a `metrics_url`.
pub fn load_status(inner: &Inner, b: &crate::config::Builder) -> Option<LoadStatus> {
    let source = b.metrics.as_ref()?;
    let tracker = inner.load.get(&b.name);
    let now = std::time::Instant::now();
    let fresh = tracker.and_then(|t| t.fresh(now, inner.config.scrape.interval));
    Some(LoadStatus {
        metrics_url: source.url.clone(),
        load: fresh.cloned(),
        sample_age_seconds: tracker.and_then(|t| t.age(now)).map(|d| d.as_secs_f64()),
        error: tracker.and_then(|t| t.error()).map(ToString::to_string),
        scrape_errors: tracker.map_or(0, |t| t.errors_total),
        other_connections: fresh
            .zip(tracker)
            .and_then(|(l, t)| crate::decide::load::other_connections(l, t.own_at_sample())),
        load_cost: inner.load_cost(&b.name),
    })
}

/// `yensid mode`'s answer: the mode in force, where it comes from, and
/// when an override ends.
pub fn describe_mode(inner: &Inner) -> String {
    let now = unix_now();
    let (mode, source) = inner.mode_in_force(now);
    let from = match source {
        ModeSource::Config => "from the configuration".to_owned(),
        ModeSource::Hook { reason: Some(r) } => format!("from the policy hook: {r}"),
        ModeSource::Hook { reason: None } => "from the policy hook".to_owned(),
        ModeSource::Override { until: None } => {
            "operator override, until changed (yensid mode --reset)".to_owned()
        }
        ModeSource::Override { until: Some(t) } => format!(
            "operator override, expires in {}s (then: {})",
            t.saturating_sub(now),
            inner.config.policy.mode
        ),
    };
    format!("mode {mode} ({from})")
}

/// The local path's counts for a builder, from the kernel.
fn local_status(inner: &Inner, builder: &str) -> crate::operate::status::LocalBuilderStatus {
    let Some(stats) = inner.local_stats(builder) else {
        return Default::default();
    };
    crate::operate::status::LocalBuilderStatus {
        open: stats.opened.wrapping_sub(stats.closed),
        connections: stats.opened,
        failed_connects: stats.failed,
        bytes_to_builder: stats.bytes_sent,
        bytes_from_builder: stats.bytes_received,
        retransmits: stats.retransmits,
        rtt_ms: (stats.sampled_boot_ns != 0).then(|| f64::from(stats.srtt_us) / 1e3),
    }
}
