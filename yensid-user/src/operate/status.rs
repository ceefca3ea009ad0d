//! `yensid status`: what the daemon is doing and why, as one document.
//!
//! The daemon builds a [`Status`] from its live state, its last plan and
//! the kernel's counters, and sends it as JSON over the control socket;
//! `--json` prints that document as it is (a stable interface), otherwise
//! the CLI renders tables for humans. Without a daemon the CLI says so,
//! and says what happens to claimed traffic (see [`not_running`]).

use std::{fmt::Write as _, path::Path};

use serde::{Deserialize, Serialize};

use crate::{
    config::Config, decide::link::Link, kernel::pins::MapsDump, operate::metrics::Histogram,
};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    pub pid: u32,
    /// `kernel` (steered by the kernel) or `userspace` (the fallback).
    pub dataplane: String,
    /// How established sessions are forwarded: `sockmap` (in the kernel)
    /// or `splice` (`splice(2)` by the daemon).
    #[serde(default)]
    pub forward: String,
    /// Why: set in the configuration, or what `auto` went by.
    #[serde(default)]
    pub forward_reason: String,
    /// False in the userspace fallback (BPF could not be loaded).
    pub bpf: bool,
    /// `kernel` when the kernel measures RTT and retransmits on the builder
    /// connections, otherwise `probes only: <why>`.
    #[serde(default)]
    pub path_measurement: String,
    pub mode: ModeStatus,
    pub services: Vec<ServiceStatus>,
    pub builders: Vec<BuilderStatus>,
    /// Connections that have not finished their SSH handoff.
    #[serde(default)]
    pub handoffs: HandoffStatus,
    /// What this daemon took over from the one before it, if it did.
    #[serde(default)]
    pub takeover: Option<TakeoverStatus>,
    /// Builders no longer configured whose connections continue (a
    /// takeover or reload removed them: drained, not cut).
    #[serde(default)]
    pub retired_builders: Vec<RetiredBuilder>,
}

/// A takeover, as the successor saw it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TakeoverStatus {
    /// `handover` (from a running daemon) or `fd store` (systemd's file
    /// descriptor store, after a crash).
    #[serde(default)]
    pub from: String,
    /// The predecessor's process id (0 from the fd store).
    pub from_pid: u32,
    /// When (seconds since the epoch).
    pub at: u64,
    pub listeners: u64,
    pub spliced: u64,
    pub copied: u64,
    pub in_handoff: u64,
    /// From the moment the predecessor stopped accepting to the moment
    /// this daemon accepted, in milliseconds.
    pub handover_ms: f64,
}

/// A builder that left the configuration with connections still open.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RetiredBuilder {
    pub name: String,
    pub active: u64,
}

/// Connections accepted but not yet SSH sessions (no builder counts them).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct HandoffStatus {
    /// In handoff now.
    pub in_progress: u32,
    /// Refused (RST) at `max_handoffs` or `max_handoffs_per_client`.
    pub refused: u64,
    pub max_handoffs: u32,
    pub max_handoffs_per_client: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModeStatus {
    /// `auto`, `remote` or `local`.
    pub in_force: String,
    /// `config`, `hook` or `override`.
    pub source: String,
    /// When an override ends (seconds since the epoch).
    pub until: Option<u64>,
    /// The hook's reason.
    pub reason: Option<String>,
    /// `yensid mode`'s sentence.
    pub summary: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub name: String,
    pub listen: Vec<String>,
    pub port: u16,
    pub strategy: String,
    /// Null while connections go to builders.
    pub refusal: Option<String>,
    pub members: Vec<MemberStatus>,
    /// The kernel's counters (absent without BPF).
    pub dispatched: Option<u64>,
    pub refused_mode_local: Option<u64>,
    pub refused_no_builder: Option<u64>,
    /// Whether each claimed prefix reaches the host's stack (see
    /// `kernel::local_route`), in `listen` order.
    #[serde(default)]
    pub local_delivery: Vec<PrefixDelivery>,
    /// With `when_full = "queue"`: the queue (null with `refuse`).
    #[serde(default)]
    pub queue: Option<QueueStatus>,
    /// Which path the next connection of a client on this host takes
    /// (`direct: ...` or `proxy: why`).
    #[serde(default)]
    pub local_clients: String,
}

/// A queueing service's queue (`dataplane::queue`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct QueueStatus {
    /// Connections waiting now.
    pub waiting: u64,
    /// `queue_limit`.
    pub limit: u32,
    /// `queue_timeout`.
    pub timeout_seconds: f64,
    /// Connections that entered the queue, ever.
    pub queued: u64,
    /// Handed to a builder.
    pub served: u64,
    /// Refused (RST) at `queue_timeout`.
    pub timed_out: u64,
    /// Refused (RST) at once: the queue held `queue_limit` connections.
    pub refused_full: u64,
    /// Their client left while they waited.
    pub left: u64,
    /// Refused (RST) because the service stopped taking connections while
    /// they waited (mode `local`, too few eligible builders).
    pub refused: u64,
    /// How long the served ones waited.
    pub wait_seconds: Histogram,
    /// SYNs the kernel steered to the queue (absent without BPF).
    pub kernel_queued: Option<u64>,
}

/// How one claimed prefix reaches the host's stack.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PrefixDelivery {
    pub prefix: String,
    /// False: connections to it fail before yensid sees them. Null: not
    /// known (yensid could not read the routes).
    pub deliverable: Option<bool>,
    /// The route that delivers it, or what is missing.
    pub how: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MemberStatus {
    pub builder: String,
    /// Null when eligible for this service.
    pub excluded: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BuilderStatus {
    pub name: String,
    pub address: String,
    /// `healthy`, `unhealthy`, `draining` or `full`.
    pub state: String,
    pub reason: Option<String>,
    pub weight: u32,
    pub max_connections: Option<u32>,
    pub active: u64,
    pub connections: u64,
    pub rejected_clients: u64,
    pub failed_over: u64,
    /// Connections spliced in the kernel (their bytes never crossed
    /// userspace).
    #[serde(default)]
    pub spliced: u64,
    /// Connections copied in userspace: the userspace data path, or a peer
    /// that sent more than one packet before key exchange.
    #[serde(default)]
    pub copied: u64,
    pub bytes_to_builder: u64,
    pub bytes_from_builder: u64,
    pub rtt_ms: Option<f64>,
    /// TCP's smoothed RTT on connections to the builder (the daemon's,
    /// spliced or copied, or local clients' direct ones), at the latest
    /// sample the kernel took.
    #[serde(default)]
    pub kernel_rtt_ms: Option<f64>,
    /// RTT samples the kernel took on those connections.
    #[serde(default)]
    pub rtt_samples: u64,
    /// Segments retransmitted to the builder.
    #[serde(default)]
    pub retransmits: u64,
    pub egress: Option<Link>,
    /// From upstream connect to the builder's identification line.
    #[serde(default)]
    pub connect_seconds: Histogram,
    /// The local path's connections to the builder (no proxy), as the
    /// kernel counts them; `active` includes its open ones.
    #[serde(default)]
    pub local: LocalBuilderStatus,
    /// Builders with a `metrics_url`: what their node_exporter says.
    #[serde(default)]
    pub load: Option<LoadStatus>,
}

/// What the kernel counted on the local path for one builder.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LocalBuilderStatus {
    /// Local connections open now.
    pub open: u64,
    /// Local connects sent to the builder.
    pub connections: u64,
    /// Of those, connects that failed (refused, timed out).
    pub failed_connects: u64,
    /// Bytes of closed local connections, each way.
    pub bytes_to_builder: u64,
    pub bytes_from_builder: u64,
    pub retransmits: u64,
    /// TCP's smoothed RTT at the latest local handshake or close.
    pub rtt_ms: Option<f64>,
}

/// A builder's measured load (see `decide::load`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LoadStatus {
    pub metrics_url: String,
    /// The load at the last good sample while it is fresh; `None`: the
    /// builder is judged on connection counts alone.
    pub load: Option<crate::decide::load::Load>,
    /// Seconds since the last good sample.
    pub sample_age_seconds: Option<f64>,
    /// Why the last scrape failed, if it did.
    pub error: Option<String>,
    pub scrape_errors: u64,
    /// Established connections on the builder that are not this daemon's.
    pub other_connections: Option<f64>,
    /// The measured part of `least-loaded`'s score (1024 = one connection).
    pub load_cost: u32,
}

/// Tables for humans.
pub fn render(status: &Status) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "yensid running (pid {}), data path {}, forwarding by {}{}",
        status.pid,
        status.dataplane,
        status.forward,
        if status.bpf {
            ""
        } else {
            " -- BPF UNAVAILABLE, userspace fallback"
        }
    );
    if status.bpf && !status.forward_reason.is_empty() {
        let _ = writeln!(out, "forwarding: {}", status.forward_reason);
    }
    if status.path_measurement != "kernel" {
        let _ = writeln!(out, "builder RTT: {}", status.path_measurement);
    }
    match &status.takeover {
        Some(t) if t.from == "fd store" => {
            let _ = writeln!(
                out,
                "recovered from systemd's file descriptor store: {} spliced connection(s), {} listener(s)",
                t.spliced, t.listeners
            );
        }
        Some(t) => {
            let _ = writeln!(
                out,
                "took over from pid {}: {} spliced, {} copied and {} in-handoff connection(s), {} listener(s), handover {:.1} ms",
                t.from_pid, t.spliced, t.copied, t.in_handoff, t.listeners, t.handover_ms
            );
        }
        None => {}
    }
    for r in &status.retired_builders {
        let _ = writeln!(
            out,
            "{}: no longer configured, {} open connection(s) continue (drained, not cut)",
            r.name, r.active
        );
    }
    let _ = writeln!(out, "{}\n", status.mode.summary);
    let mut rows = vec![vec![
        "SERVICE".to_owned(),
        "CLAIMS".to_owned(),
        "STRATEGY".to_owned(),
        "STATE".to_owned(),
        "DISPATCHED".to_owned(),
        "REFUSED".to_owned(),
    ]];
    for s in &status.services {
        let refused = s.refused_mode_local.unwrap_or(0) + s.refused_no_builder.unwrap_or(0);
        rows.push(vec![
            s.name.clone(),
            format!("{} port {}", s.listen.join(","), s.port),
            s.strategy.clone(),
            s.refusal
                .as_ref()
                .map_or("to builders".to_owned(), |r| format!("refusing: {r}")),
            s.dispatched.map_or("-".into(), |n| n.to_string()),
            refused.to_string(),
        ]);
    }
    table(&mut out, &rows);
    let mut rows = vec![vec![
        "BUILDER".to_owned(),
        "STATE".to_owned(),
        "ACTIVE".to_owned(),
        "TOTAL (SPLICED/COPIED)".to_owned(),
        "FAILOVERS".to_owned(),
        "TO/FROM".to_owned(),
        "RTT PROBE/KERNEL".to_owned(),
        "RETRANS".to_owned(),
        "EGRESS".to_owned(),
    ]];
    for b in &status.builders {
        rows.push(vec![
            b.name.clone(),
            match &b.reason {
                Some(r) => format!("{} ({r})", b.state),
                None => b.state.clone(),
            },
            match b.max_connections {
                Some(max) => format!("{}/{max}", b.active),
                None => b.active.to_string(),
            },
            format!("{} ({}/{})", b.connections, b.spliced, b.copied),
            b.failed_over.to_string(),
            format!(
                "{}/{}",
                human_bytes(b.bytes_to_builder),
                human_bytes(b.bytes_from_builder)
            ),
            format!(
                "{}/{}",
                b.rtt_ms.map_or("-".into(), |r| format!("{r:.1}ms")),
                b.kernel_rtt_ms.map_or("-".into(), |r| format!("{r:.1}ms"))
            ),
            b.retransmits.to_string(),
            b.egress.as_ref().map_or("-".into(), |l| {
                format!("{} {}{}", l.name, l.kind, if l.up { "" } else { " DOWN" })
            }),
        ]);
    }
    out.push('\n');
    table(&mut out, &rows);
    for b in &status.builders {
        if let Some(load) = &b.load {
            let _ = writeln!(out, "{} load: {}", b.name, describe_load(load));
        }
    }
    for s in &status.services {
        if let Some(q) = &s.queue {
            let _ = writeln!(out, "{}: {}", s.name, queue_line(q));
        }
    }
    for s in &status.services {
        for d in &s.local_delivery {
            let _ = writeln!(out, "{}: {}: {}", s.name, d.prefix, d.how);
        }
        for m in s.members.iter().filter(|m| m.excluded.is_some()) {
            let _ = writeln!(
                out,
                "{}: {} excluded: {}",
                s.name,
                m.builder,
                m.excluded.as_deref().unwrap_or_default()
            );
        }
    }
    render_local(&mut out, status);
    out
}

/// One service's queue in words.
fn queue_line(q: &QueueStatus) -> String {
    let mean = match q.wait_seconds.count {
        0 => String::new(),
        n => format!(", mean wait {:.1}s", q.wait_seconds.sum_seconds / n as f64),
    };
    format!(
        "queue {}/{} waiting (timeout {}s); queued {}, served {}{mean}, timed out {}, \
         refused {} (full) + {} (service refusing), left {}",
        q.waiting,
        q.limit,
        q.timeout_seconds,
        q.queued,
        q.served,
        q.timed_out,
        q.refused_full,
        q.refused,
        q.left
    )
}

/// The local path: each service's, and what it carried per builder.
fn render_local(out: &mut String, status: &Status) {
    for s in &status.services {
        let _ = writeln!(out, "{}: local clients: {}", s.name, s.local_clients);
    }
    for b in status.builders.iter().filter(|b| b.local.connections > 0) {
        let l = &b.local;
        let _ = writeln!(
            out,
            "{}: local path: {} open, {} connection(s), {} failed connect(s), {}/{} to/from, {} retransmits, RTT {}",
            b.name,
            l.open,
            l.connections,
            l.failed_connects,
            human_bytes(l.bytes_to_builder),
            human_bytes(l.bytes_from_builder),
            l.retransmits,
            l.rtt_ms.map_or("-".into(), |r| format!("{r:.1}ms")),
        );
    }
}

/// What the pinned maps say while no daemon runs: the kernel's counters go
/// on (every refusal is counted), the rest is the daemon's last word.
/// Indices become names through the claims and the builder lists of the
/// configuration, as the daemon wrote them.
/// One builder's load in words: the measurements, or why there are none.
pub fn describe_load(s: &LoadStatus) -> String {
    let percent = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{:.1}%", v * 100.0));
    let Some(load) = &s.load else {
        return match &s.error {
            Some(e) => format!("METRICS UNREADABLE ({e}): connection counts alone"),
            None => "no sample yet: connection counts alone".to_owned(),
        };
    };
    let disk = load.disk.as_ref().map_or("-".to_owned(), |d| {
        format!(
            "{} free on {}",
            crate::config::load::describe_bytes(d.available_bytes.max(0.0) as u64),
            d.mountpoint
        )
    });
    format!(
        "pressure cpu {} memory {} io {}, load/core {}, {disk}, {} established ({} others), sample {:.1}s old",
        percent(load.cpu_pressure),
        percent(load.memory_pressure),
        percent(load.io_pressure),
        load.load_per_core
            .map_or("-".to_owned(), |v| format!("{v:.2}")),
        load.tcp_established
            .map_or("-".to_owned(), |v| format!("{v:.0}")),
        s.other_connections
            .map_or("-".to_owned(), |v| format!("{v:.0}")),
        s.sample_age_seconds.unwrap_or_default(),
    )
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Pinned {
    pub services: Vec<PinnedService>,
    pub builders: Vec<PinnedBuilder>,
}

#[derive(Clone, Debug, Serialize)]
pub struct PinnedService {
    pub name: String,
    /// Whether the daemon last let connections through to builders.
    pub accepting: bool,
    pub dispatched: u64,
    pub refused_mode_local: u64,
    pub refused_no_builder: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct PinnedBuilder {
    pub name: String,
    /// Whether the daemon last allowed new connections to it.
    pub eligible: bool,
    /// The kernel's latest RTT sample on a connection to it.
    pub kernel_rtt_ms: Option<f64>,
    /// Segments retransmitted to it since the maps were created.
    pub retransmits: u64,
}

/// Names the pinned state with `config`; entries it cannot name are left
/// out.
pub fn pinned(config: &Config, dump: &MapsDump) -> Pinned {
    let mut out = Pinned::default();
    let mut builder_names = std::collections::BTreeMap::new();
    for svc in &config.services {
        let claims: Vec<String> = svc.claims().collect();
        let Some(&(_, index)) = dump.bindings.iter().find(|(b, _)| claims.contains(b)) else {
            continue;
        };
        for ((_, position), backend) in dump
            .service_backends
            .iter()
            .filter(|((s, _), _)| *s == index)
        {
            if let Some(name) = svc.builders.get(*position as usize) {
                builder_names.insert(backend.builder, name.clone());
            }
        }
        let state = entry(&dump.services, index);
        let counters = entry(&dump.service_counters, index).unwrap_or_default();
        out.services.push(PinnedService {
            name: svc.name.clone(),
            accepting: state.is_some_and(|s| s.accept == 1),
            dispatched: counters.dispatched,
            refused_mode_local: counters.refused_mode,
            refused_no_builder: counters.refused_unavailable,
        });
    }
    for (index, name) in builder_names {
        let state = entry(&dump.builders, index);
        let path = entry(&dump.path_stats, index);
        out.builders.push(PinnedBuilder {
            name,
            eligible: state.is_some_and(|b| b.eligible == 1),
            kernel_rtt_ms: path
                .filter(|p| p.sampled_boot_ns != 0)
                .map(|p| p.srtt_us as f64 / 1e3),
            retransmits: path.map_or(0, |p| p.retransmits),
        });
    }
    out
}

/// The value at `index` of a decoded array map.
fn entry<T: Copy>(entries: &[(u32, T)], index: u32) -> Option<T> {
    entries.iter().find(|(i, _)| *i == index).map(|(_, v)| *v)
}

/// [`Pinned`] as tables for humans.
pub fn render_pinned(pinned: &Pinned) -> String {
    let mut out = String::from("\nLast state in the pinned maps:\n");
    let mut rows = vec![vec![
        "SERVICE".to_owned(),
        "STATE".to_owned(),
        "DISPATCHED".to_owned(),
        "REFUSED".to_owned(),
    ]];
    for s in &pinned.services {
        rows.push(vec![
            s.name.clone(),
            if s.accepting {
                "to builders"
            } else {
                "refusing"
            }
            .to_owned(),
            s.dispatched.to_string(),
            (s.refused_mode_local + s.refused_no_builder).to_string(),
        ]);
    }
    table(&mut out, &rows);
    let mut rows = vec![vec![
        "BUILDER".to_owned(),
        "ELIGIBLE".to_owned(),
        "RTT".to_owned(),
        "RETRANS".to_owned(),
    ]];
    for b in &pinned.builders {
        rows.push(vec![
            b.name.clone(),
            if b.eligible { "yes" } else { "no" }.to_owned(),
            b.kernel_rtt_ms.map_or("-".into(), |r| format!("{r:.1}ms")),
            b.retransmits.to_string(),
        ]);
    }
    out.push('\n');
    table(&mut out, &rows);
    out
}

/// What happens to claimed connections while no daemon runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    /// The pinned dispatch program still claims the addresses and refuses
    /// every connection.
    Refused,
    /// Nothing is attached.
    NotClaimed,
    /// The pins cannot be looked at (no read access).
    Unknown,
}

impl Claim {
    /// The `claimed_traffic` value of `status --json`.
    pub fn as_str(self) -> &'static str {
        match self {
            Claim::Refused => "refused",
            Claim::NotClaimed => "not claimed",
            Claim::Unknown => "unknown",
        }
    }
}

/// What `status` says without a daemon: whether the pinned program still
/// claims the addresses (it refuses every claimed connection then).
pub fn not_running(pin_path: &Path, claims: &[String]) -> (Claim, String) {
    let link = pin_path.join("dispatch");
    match link.try_exists() {
        Ok(true) => (
            Claim::Refused,
            format!(
                "yensid is NOT running, but its dispatch program is still attached ({}): \
                 claimed connections to {} are refused at once (RST), so Nix builds locally. \
                 Start yensid, or remove {} to release the addresses.",
                link.display(),
                claims.join(", "),
                pin_path.display()
            ),
        ),
        Ok(false) => (
            Claim::NotClaimed,
            format!(
                "yensid is not running and nothing is attached: {} are not claimed \
                 (connections reach whatever else listens there).",
                claims.join(", ")
            ),
        ),
        Err(e) => (
            Claim::Unknown,
            format!(
                "yensid is not running; whether its program still claims {} is unknown: \
                 cannot look at {}: {e} (root or a member of daemon.read_group can).",
                claims.join(", "),
                pin_path.display()
            ),
        ),
    }
}

fn table(out: &mut String, rows: &[Vec<String>]) {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n}B")
    } else {
        format!("{value:.1}{}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_and_bytes_read_well() {
        let mut out = String::new();
        table(
            &mut out,
            &[
                vec!["A".into(), "LONG HEADER".into()],
                vec!["wide cell".into(), "x".into()],
            ],
        );
        assert_eq!(out, "A          LONG HEADER\nwide cell  x\n");
        assert_eq!(human_bytes(512), "512B");
        assert_eq!(human_bytes(3 * 1024 * 1024 / 2), "1.5MiB");
    }

    #[test]
    fn pinned_state_is_named_through_the_configuration() {
        use yensid_ebpf::maps::{Backend, BuilderState, PathStats, ServiceCounters, ServiceState};
        let config = Config::parse(
            "[[service]]\nname = \"x86\"\nlisten = [\"127.0.0.22/32\"]\nbuilders = [\"b2\", \"b1\"]\n\
             [[service]]\nname = \"arm\"\nlisten = [\"127.0.0.23/32\"]\n\
             [builders.b1]\naddress = \"198.18.1.2:22\"\n[builders.b2]\naddress = \"198.18.2.2:22\"\n",
        )
        .unwrap();
        let backend = |builder, eligible| Backend {
            builder,
            listener: 0,
            eligible,
            _reserved: 0,
        };
        let builder = |eligible| BuilderState {
            weight: 1,
            max_connections: 0,
            eligible,
            load_cost: 0,
        };
        let dump = MapsDump {
            pin_path: "/sys/fs/bpf/yensid".into(),
            dispatch_attached: true,
            bindings: vec![("127.0.0.22/32 port 22".into(), 3)],
            services: vec![(
                3,
                ServiceState {
                    accept: 1,
                    strategy: 0,
                    backends: 2,
                    refusal: 0,
                },
            )],
            service_backends: vec![((3, 0), backend(7, 1)), ((3, 1), backend(4, 1))],
            builders: vec![(7, builder(1)), (4, builder(0))],
            connections: Vec::new(),
            service_counters: vec![(
                3,
                ServiceCounters {
                    dispatched: 5,
                    refused_mode: 0,
                    refused_unavailable: 2,
                    queued: 0,
                    sequence: 5,
                },
            )],
            path_stats: vec![(
                7,
                PathStats {
                    srtt_us: 1500,
                    _reserved: 0,
                    sampled_boot_ns: 1,
                    samples: 3,
                    retransmits: 4,
                },
            )],
            affinity: Vec::new(),
            local_override_until_boot_ns: 0,
            spliced_sockets: 0,
            local: crate::kernel::local::LocalDump {
                attached: false,
                netns_cookie: 0,
                direct_services: Vec::new(),
                builders: Vec::new(),
                stats: Vec::new(),
                open_sockets: 0,
            },
        };
        let p = pinned(&config, &dump);
        assert_eq!(p.services.len(), 1, "arm claims nothing in the pins");
        let x86 = &p.services[0];
        assert_eq!(
            (
                x86.name.as_str(),
                x86.accepting,
                x86.dispatched,
                x86.refused_no_builder
            ),
            ("x86", true, 5, 2)
        );
        let names: Vec<(&str, bool, Option<f64>, u64)> = p
            .builders
            .iter()
            .map(|b| (b.name.as_str(), b.eligible, b.kernel_rtt_ms, b.retransmits))
            .collect();
        assert_eq!(names, [("b1", false, None, 0), ("b2", true, Some(1.5), 4)]);
        let text = render_pinned(&p);
        assert!(
            text.contains("x86      to builders  5           2"),
            "{text}"
        );
    }

    #[test]
    fn without_a_daemon_status_says_what_happens_to_claimed_traffic() {
        let dir = std::env::temp_dir().join(format!("yensid-status-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let claims = vec!["127.0.0.22/32 port 22".to_owned()];
        let (claim, text) = not_running(&dir, &claims);
        assert!(
            claim == Claim::NotClaimed && text.contains("not claimed"),
            "{text}"
        );
        std::fs::write(dir.join("dispatch"), "").unwrap();
        let (claim, text) = not_running(&dir, &claims);
        assert!(
            claim == Claim::Refused && text.contains("refused at once (RST)"),
            "{text}"
        );
        let file_as_dir = dir.join("dispatch").join("pins");
        let (claim, text) = not_running(&file_as_dir, &claims);
        assert!(
            claim == Claim::Unknown && text.contains("is unknown"),
            "{text}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
