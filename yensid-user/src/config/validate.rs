//! The rules serde cannot express, checked on the `raw` file: every
//! problem is collected, each with its key and line.

use std::{
    collections::HashSet,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use toml::Spanned;
use yensid_ebpf::maps::{MAX_BACKENDS, MAX_BUILDERS, MAX_SERVICES};

use super::{
    BPFFS_MOUNT, Builder, Config, DEFAULT_PIN_PATH, DEFAULT_RUNTIME_DIR, DEFAULT_SHUTDOWN_GRACE,
    DEFAULT_STATE_DIR, Daemon, Dataplane, HandoffLimits, HealthSettings, LinkRules,
    MAX_CONFIG_DURATION, Mode, Policy, Prefix, Problem, QueueSettings, Service, Strategy, WhenFull,
    describe_duration, load, parse_bounded_duration, parse_duration, raw,
};
use crate::decide::link::LinkKind;

pub(super) struct Checker<'a> {
    text: &'a str,
    problems: Vec<Problem>,
}

impl Checker<'_> {
    pub(super) fn report<T>(
        &mut self,
        key: impl Into<String>,
        at: &Spanned<T>,
        message: impl Into<String>,
    ) {
        self.problems.push(Problem {
            key: key.into(),
            line: Some(line_of(self.text, at.span().start)),
            message: message.into(),
        });
    }
}

pub(super) fn validate(raw: raw::File, text: &str) -> Result<Config, Vec<Problem>> {
    let mut check = Checker {
        text,
        problems: Vec::new(),
    };

    let daemon = {
        let mut d = raw.daemon.map(Spanned::into_inner);
        let handoff = handoff_limits(&mut check, d.as_mut());
        let shutdown_grace =
            shutdown_grace(&mut check, d.as_mut().and_then(|d| d.shutdown_grace.take()));
        let local_cgroup = local_cgroup(&mut check, d.as_mut().and_then(|d| d.local_cgroup.take()));
        let (pin_path, dataplane, state_dir, runtime_dir, read_group, forward) = match d {
            None => (None, None, None, None, None, None),
            Some(d) => (
                d.pin_path,
                d.dataplane,
                d.state_dir,
                d.runtime_dir,
                d.read_group,
                d.forward,
            ),
        };
        let read_group = read_group.map(|g| {
            if g.get_ref().trim().is_empty() {
                check.report("daemon.read_group", &g, "must name a group");
            }
            g.into_inner()
        });
        let mut dir = |key: &str, value: Option<Spanned<String>>, default: &str| match value {
            None => PathBuf::from(default),
            Some(p) => {
                if !p.get_ref().starts_with('/') {
                    check.report(format!("daemon.{key}"), &p, "must be an absolute path");
                } else if key == "pin_path"
                    && let Err(msg) = check_pin_path(Path::new(p.get_ref()))
                {
                    check.report("daemon.pin_path", &p, msg);
                }
                PathBuf::from(p.into_inner())
            }
        };
        Daemon {
            pin_path: dir("pin_path", pin_path, DEFAULT_PIN_PATH),
            dataplane: dataplane.unwrap_or(Dataplane::Kernel),
            state_dir: dir("state_dir", state_dir, DEFAULT_STATE_DIR),
            runtime_dir: dir("runtime_dir", runtime_dir, DEFAULT_RUNTIME_DIR),
            read_group,
            handoff,
            shutdown_grace,
            local_cgroup,
            forward: forward.unwrap_or_default(),
        }
    };

    let health = health_settings(
        &mut check,
        "health",
        raw.health.unwrap_or_default(),
        HealthSettings::default(),
    );

    let mut builders = Vec::new();
    // Builders given by IP address, checked against the claims below.
    let mut builder_addresses: Vec<(String, Spanned<SocketAddr>)> = Vec::new();
    if raw.builders.len() > MAX_BUILDERS as usize {
        check.problems.push(Problem {
            key: "builders".into(),
            line: None,
            message: format!("at most {MAX_BUILDERS} builders are supported"),
        });
    }
    for (name, b) in raw.builders {
        let b = b.into_inner();
        let key = |field: &str| format!("builders.{name}.{field}");
        if let Err(msg) = check_address(b.address.get_ref()) {
            check.report(key("address"), &b.address, msg);
        } else if let Ok(addr) = b.address.get_ref().parse::<SocketAddr>() {
            builder_addresses.push((key("address"), Spanned::new(b.address.span(), addr)));
        }
        let weight = match b.weight {
            None => 1,
            Some(w) => match u32::try_from(*w.get_ref()) {
                Ok(w @ 1..=MAX_WEIGHT) => w,
                _ => {
                    check.report(
                        key("weight"),
                        &w,
                        format!("must be a whole number from 1 to {MAX_WEIGHT}"),
                    );
                    1
                }
            },
        };
        let max_connections = match b.max_connections {
            None => None,
            Some(m) => match u32::try_from(*m.get_ref()) {
                Ok(m @ 1..) => Some(m),
                _ => {
                    check.report(
                        key("max_connections"),
                        &m,
                        "must be at least 1 (leave it out for no limit)",
                    );
                    None
                }
            },
        };
        if let Some(k) = &b.host_key
            && !looks_like_public_key(k.get_ref())
        {
            check.report(
                key("host_key"),
                k,
                "must be `<type> <base64>`, e.g. the content of ssh_host_ed25519_key.pub",
            );
        }
        let health = match b.health {
            None => health,
            Some(h) => health_settings(&mut check, &key("health"), h, health),
        };
        let metrics = load::metrics_source(&mut check, &name, b.metrics_url, b.store_mountpoint);
        let load = b
            .load
            .map(|l| load::limits(&mut check, &key("load"), l))
            .unwrap_or_default();
        builders.push(Builder {
            name,
            address: b.address.into_inner(),
            weight,
            max_connections,
            host_key: b.host_key.map(Spanned::into_inner),
            health,
            metrics,
            load,
        });
    }

    let raw_policy = raw.policy.unwrap_or_default();
    let global = raw::Rules {
        remote_via: raw_policy.remote_via,
        min_link_mbps: raw_policy.min_link_mbps,
        max_rtt_ms: raw_policy.max_rtt_ms,
        min_healthy_builders: raw_policy.min_healthy_builders,
    };
    let global_min_healthy = global
        .min_healthy_builders
        .as_ref()
        .map(|v| Spanned::new(v.span(), ()));
    let global_rules = link_rules(&mut check, "policy", global, &LinkRules::default());
    let mut raw_load = raw.load.unwrap_or_default();
    let scrape = load::scrape_settings(&mut check, &mut raw_load);
    let global_load = load::limits(&mut check, "load", raw_load.limits());

    if raw.service.is_empty() {
        check.problems.push(Problem {
            key: "service".into(),
            line: None,
            message: "no [[service]] defined: nothing to claim".into(),
        });
    }
    if raw.service.len() > MAX_SERVICES as usize {
        check.problems.push(Problem {
            key: "service".into(),
            line: None,
            message: format!("at most {MAX_SERVICES} services are supported"),
        });
    }
    let mut services: Vec<Service> = Vec::new();
    let mut claimed: Vec<(Prefix, u16, String, Spanned<()>)> = Vec::new();
    let mut names = HashSet::new();
    for (i, s) in raw.service.into_iter().enumerate() {
        let s = s.into_inner();
        let name = s.name.get_ref().clone();
        let key = |field: &str| format!("service[{i}].{field}");
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            check.report(
                key("name"),
                &s.name,
                "must be non-empty: letters, digits, - _ .",
            );
        }
        if !names.insert(name.clone()) {
            check.report(
                key("name"),
                &s.name,
                format!("service `{name}` is defined twice"),
            );
        }
        let port = match s.port {
            None => 22,
            Some(p) => match u16::try_from(*p.get_ref()) {
                Ok(p @ 1..) => p,
                _ => {
                    check.report(key("port"), &p, "must be 1 to 65535");
                    22
                }
            },
        };
        let mut listen = Vec::new();
        if s.listen.get_ref().is_empty() {
            check.report(
                key("listen"),
                &s.listen,
                "needs at least one address prefix",
            );
        }
        for text_prefix in s.listen.get_ref() {
            match text_prefix.get_ref().parse::<Prefix>() {
                Err(msg) => check.report(key("listen"), text_prefix, msg),
                Ok(prefix) => {
                    let at = Spanned::new(text_prefix.span(), ());
                    if s.allow_host_addresses != Some(true)
                        && let Some(why) = host_address_claim(&prefix, port)
                    {
                        check.report(
                            key("listen"),
                            &at,
                            format!(
                                "{why}; set allow_host_addresses = true in this service if that is intended"
                            ),
                        );
                    }
                    for (other, other_port, other_name, _) in &claimed {
                        if *other_port == port && other.overlaps(&prefix) {
                            check.report(
                                key("listen"),
                                &at,
                                format!(
                                    "{prefix} port {port} overlaps {other} claimed by service `{other_name}`"
                                ),
                            );
                        }
                    }
                    claimed.push((prefix, port, name.clone(), at));
                    listen.push(prefix);
                }
            }
        }
        let members: Vec<String> = match &s.builders {
            None => builders.iter().map(|b| b.name.clone()).collect(),
            Some(list) => {
                let mut seen = HashSet::new();
                for b in list {
                    if !builders.iter().any(|known| &known.name == b.get_ref()) {
                        check.report(
                            key("builders"),
                            b,
                            format!(
                                "unknown builder `{}` (no [builders.{}])",
                                b.get_ref(),
                                b.get_ref()
                            ),
                        );
                    }
                    if !seen.insert(b.get_ref().clone()) {
                        check.report(
                            key("builders"),
                            b,
                            format!("`{}` is listed twice", b.get_ref()),
                        );
                    }
                }
                list.iter().map(|b| b.get_ref().clone()).collect()
            }
        };
        if members.is_empty() {
            check.report(key("builders"), &s.name, "the service has no builders");
        }
        if members.len() > MAX_BACKENDS as usize {
            check.report(
                key("builders"),
                &s.name,
                format!("at most {MAX_BACKENDS} builders per service are supported"),
            );
        }
        let own_min_healthy = s
            .policy
            .as_ref()
            .and_then(|r| r.min_healthy_builders.as_ref())
            .map(|v| Spanned::new(v.span(), ()));
        let rules = match s.policy {
            None => global_rules.clone(),
            Some(r) => link_rules(&mut check, &key("policy"), r, &global_rules),
        };
        let pool = members.len();
        if !members.is_empty() && rules.min_healthy_builders as usize > pool {
            let message = format!(
                "{} is more than the {pool} builder(s) of service `{name}`: it would never use them",
                rules.min_healthy_builders
            );
            match (&own_min_healthy, &global_min_healthy) {
                (Some(at), _) => check.report(key("policy.min_healthy_builders"), at, message),
                (None, Some(at)) => check.report("policy.min_healthy_builders", at, message),
                (None, None) => {}
            }
        }
        let when_full = when_full(
            &mut check,
            &key,
            s.when_full,
            s.queue_timeout,
            s.queue_limit,
        );
        let load = s
            .load
            .map(|l| load::limits(&mut check, &key("load"), l).over(&global_load))
            .unwrap_or(global_load);
        services.push(Service {
            name,
            listen,
            port,
            builders: members,
            strategy: s.strategy.unwrap_or(Strategy::LeastConnections),
            rules,
            allow_host_addresses: s.allow_host_addresses == Some(true),
            when_full,
            local_clients: s.local_clients.unwrap_or_default(),
            load,
        });
    }

    let hook_interval = duration_field(
        &mut check,
        "policy.hook_interval",
        raw_policy.hook_interval,
        Duration::from_secs(30),
    );
    let hook_timeout = duration_field(
        &mut check,
        "policy.hook_timeout",
        raw_policy.hook_timeout,
        Duration::from_secs(2),
    );
    let command = raw_policy.command.map(|c| {
        if !c.get_ref().starts_with('/') {
            check.report(
                "policy.command",
                &c,
                "must be an absolute path to an executable",
            );
        }
        PathBuf::from(c.into_inner())
    });
    let policy = Policy {
        mode: raw_policy.mode.unwrap_or(Mode::Auto),
        command,
        hook_interval,
        hook_timeout,
        control_group: raw_policy.control_group.map(Spanned::into_inner),
    };
    for (key, addr) in &builder_addresses {
        if let Some((service, prefix)) = claimed_by(&services, *addr.get_ref()) {
            check.report(
                key.as_str(),
                addr,
                format!(
                    "{} is inside {prefix} port {} claimed by service `{service}`: connections to the builder would be claimed again",
                    addr.get_ref(),
                    addr.get_ref().port()
                ),
            );
        }
    }
    let metrics_listen = raw.metrics.and_then(|m| {
        let problem = match m.listen.get_ref().parse::<SocketAddr>() {
            Err(_) => "must be ip:port, e.g. 127.0.0.1:9422".to_owned(),
            Ok(addr) if addr.port() == 0 => "port 0 is not a port (1 to 65535)".to_owned(),
            Ok(addr) => match claimed_by(&services, addr) {
                None => return Some(addr),
                Some((service, prefix)) => format!(
                    "{addr} is inside {prefix} port {} claimed by service `{service}`: scrapes would be claimed",
                    addr.port()
                ),
            },
        };
        check.report("metrics.listen", &m.listen, problem);
        None
    });
    let mut links = Vec::new();
    for (glob, kind) in raw.links {
        match kind.get_ref().parse::<LinkKind>() {
            Ok(k) => links.push((glob, k)),
            Err(e) => check.report(format!("links.\"{glob}\""), &kind, e.to_string()),
        }
    }

    if check.problems.is_empty() {
        Ok(Config {
            daemon,
            services,
            builders,
            policy,
            links,
            metrics_listen,
            scrape,
        })
    } else {
        check.problems.sort_by_key(|p| p.line);
        Err(check.problems)
    }
}

/// `[policy]`'s rules (or a service's `policy`) over `base`.
fn link_rules(
    check: &mut Checker<'_>,
    prefix: &str,
    raw: raw::Rules,
    base: &LinkRules,
) -> LinkRules {
    let remote_via = match raw.remote_via {
        None => base.remote_via.clone(),
        Some(kinds) => Some(
            kinds
                .iter()
                .filter_map(|k| match k.get_ref().parse::<LinkKind>() {
                    Ok(kind) => Some(kind),
                    Err(e) => {
                        check.report(format!("{prefix}.remote_via"), k, e.to_string());
                        None
                    }
                })
                .collect(),
        ),
    };
    let mut positive = |name: &str, value, default: Option<u32>| {
        count_field(check, &format!("{prefix}.{name}"), value).or(default)
    };
    LinkRules {
        remote_via,
        min_link_mbps: positive("min_link_mbps", raw.min_link_mbps, base.min_link_mbps),
        max_rtt_ms: positive("max_rtt_ms", raw.max_rtt_ms, base.max_rtt_ms),
        min_healthy_builders: positive(
            "min_healthy_builders",
            raw.min_healthy_builders,
            Some(base.min_healthy_builders),
        )
        .unwrap_or(1),
    }
}

/// `[health]` (or a builder's `health`) over `base`.
fn health_settings(
    check: &mut Checker<'_>,
    prefix: &str,
    raw: raw::Health,
    base: HealthSettings,
) -> HealthSettings {
    let mut duration = |name: &str, value, default| {
        duration_field(check, &format!("{prefix}.{name}"), value, default)
    };
    let interval = duration("interval", raw.interval, base.interval);
    let timeout = duration("timeout", raw.timeout, base.timeout);
    let max_interval = duration("max_interval", raw.max_interval, base.max_interval);
    let connect_timeout = duration("connect_timeout", raw.connect_timeout, base.connect_timeout);
    let mut count = |name: &str, value, default: u32| {
        count_field(check, &format!("{prefix}.{name}"), value).unwrap_or(default)
    };
    HealthSettings {
        interval,
        timeout,
        rise: count("rise", raw.rise, base.rise),
        fall: count("fall", raw.fall, base.fall),
        max_interval: max_interval.max(interval),
        connect_timeout,
    }
}

/// The `[daemon]` keys of [`HandoffLimits`], taken out of `raw`.
fn handoff_limits(check: &mut Checker<'_>, raw: Option<&mut raw::Daemon>) -> HandoffLimits {
    let base = HandoffLimits::default();
    let Some(raw) = raw else {
        return base;
    };
    let ident_timeout = duration_field(
        check,
        "daemon.ident_timeout",
        raw.ident_timeout.take(),
        base.ident_timeout,
    );
    let max_handoffs = count_field(check, "daemon.max_handoffs", raw.max_handoffs.take())
        .unwrap_or(base.max_handoffs);
    let per_client = raw.max_handoffs_per_client.take();
    let max_handoffs_per_client =
        match count_field(check, "daemon.max_handoffs_per_client", per_client.clone()) {
            Some(n) if n > max_handoffs => {
                if let Some(v) = &per_client {
                    check.report(
                        "daemon.max_handoffs_per_client",
                        v,
                        format!("must not be above daemon.max_handoffs ({max_handoffs})"),
                    );
                }
                max_handoffs
            }
            Some(n) => n,
            None => base.max_handoffs_per_client.min(max_handoffs),
        };
    HandoffLimits {
        ident_timeout,
        max_handoffs,
        max_handoffs_per_client,
    }
}

/// A service's `when_full`, `queue_timeout` and `queue_limit`. The queue's
/// keys without `when_full = "queue"` are a mistake, not a no-op.
fn when_full(
    check: &mut Checker<'_>,
    key: &dyn Fn(&str) -> String,
    kind: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    limit: Option<Spanned<i64>>,
) -> WhenFull {
    // Read by hand rather than as a serde enum, whose error does not name
    // the key.
    let queue = match kind.as_ref().map(|k| (k, k.get_ref().as_str())) {
        None | Some((_, "refuse")) => false,
        Some((_, "queue")) => true,
        Some((k, other)) => {
            check.report(
                key("when_full"),
                k,
                format!(
                    "`{}`: must be \"refuse\" or \"queue\"",
                    crate::dataplane::ident::escape(other.as_bytes())
                ),
            );
            false
        }
    };
    if !queue {
        if let Some(v) = &timeout {
            check.report(key("queue_timeout"), v, "only with when_full = \"queue\"");
        }
        if let Some(v) = &limit {
            check.report(key("queue_limit"), v, "only with when_full = \"queue\"");
        }
        return WhenFull::Refuse;
    }
    let timeout = duration_field(
        check,
        &key("queue_timeout"),
        timeout,
        QueueSettings::DEFAULT_TIMEOUT,
    );
    let limit = match limit {
        None => QueueSettings::DEFAULT_LIMIT,
        Some(v) => match u32::try_from(*v.get_ref()) {
            Ok(n @ 1..=QueueSettings::MAX_LIMIT) => n,
            _ => {
                check.report(
                    key("queue_limit"),
                    &v,
                    format!(
                        "must be a whole number from 1 to {}",
                        QueueSettings::MAX_LIMIT
                    ),
                );
                QueueSettings::DEFAULT_LIMIT
            }
        },
    };
    WhenFull::Queue(QueueSettings { timeout, limit })
}

/// `[daemon] local_cgroup`: an absolute path (whether it is a cgroup v2
/// directory is the kernel's to say when the daemon attaches).
fn local_cgroup(check: &mut Checker<'_>, value: Option<Spanned<String>>) -> Option<PathBuf> {
    let value = value?;
    if !value.get_ref().starts_with('/') {
        check.report("daemon.local_cgroup", &value, "must be an absolute path");
    }
    Some(PathBuf::from(value.into_inner()))
}

/// `[daemon] shutdown_grace`: like [`duration_field`], except that zero
/// is valid (stop at once).
fn shutdown_grace(check: &mut Checker<'_>, value: Option<Spanned<String>>) -> Duration {
    let Some(v) = value else {
        return DEFAULT_SHUTDOWN_GRACE;
    };
    match parse_duration(v.get_ref()) {
        Ok(d) if d > MAX_CONFIG_DURATION => {
            check.report(
                "daemon.shutdown_grace",
                &v,
                format!(
                    "`{}` is longer than the maximum of {}",
                    v.get_ref(),
                    describe_duration(MAX_CONFIG_DURATION)
                ),
            );
            DEFAULT_SHUTDOWN_GRACE
        }
        Ok(d) => d,
        Err(msg) => {
            check.report("daemon.shutdown_grace", &v, msg);
            DEFAULT_SHUTDOWN_GRACE
        }
    }
}

/// A whole-number key of at least 1: `None` when absent, or when it is
/// invalid (then reported).
fn count_field(check: &mut Checker<'_>, key: &str, value: Option<Spanned<i64>>) -> Option<u32> {
    let v = value?;
    match u32::try_from(*v.get_ref()) {
        Ok(n @ 1..) => Some(n),
        _ => {
            check.report(key, &v, "must be a whole number of at least 1");
            None
        }
    }
}

/// A duration key: `default` when absent; reported (and `default`) when
/// it does not parse, is zero or is longer than [`MAX_CONFIG_DURATION`].
fn duration_field(
    check: &mut Checker<'_>,
    key: &str,
    value: Option<Spanned<String>>,
    default: Duration,
) -> Duration {
    let Some(v) = value else {
        return default;
    };
    match parse_bounded_duration(v.get_ref(), MAX_CONFIG_DURATION) {
        Ok(d) => d,
        Err(msg) => {
            check.report(key, &v, msg);
            default
        }
    }
}

/// The highest weight of a builder, in the configuration and from the
/// policy hook: relative capacities beyond 1000:1 mean nothing, and the
/// kernel's selection multiplies loads by weights.
pub const MAX_WEIGHT: u32 = 1000;

/// `pin_path` must name a directory of its own: a clean stop removes what
/// yensid pinned there and then the directory, so it may be neither `/`
/// nor the bpffs mount itself, where other programs pin their objects
/// (whether its parent is on a bpffs only the running daemon can tell).
pub fn check_pin_path(path: &Path) -> Result<(), String> {
    use std::path::Component;
    if path
        .components()
        .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
    {
        return Err(format!("`{}` must not contain `.` or `..`", path.display()));
    }
    if path.parent().is_none() || path == Path::new(BPFFS_MOUNT) {
        return Err(format!(
            "`{}` is a mount point other programs pin objects in; use a directory of its own \
             such as {DEFAULT_PIN_PATH}: a clean stop removes the pin directory",
            path.display()
        ));
    }
    Ok(())
}

/// Why a claim would take traffic meant for the host itself, if it would:
/// a whole address family, or a prefix that holds 127.0.0.1 or ::1 (the
/// host's own SSH and every other loopback service on the port).
pub fn host_address_claim(prefix: &Prefix, port: u16) -> Option<String> {
    if prefix.len == 0 {
        return Some(format!(
            "{prefix} claims a whole address family: it would take the host's own SSH and \
             every other service on port {port}"
        ));
    }
    let loopback: [IpAddr; 2] = [
        std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::Ipv6Addr::LOCALHOST.into(),
    ];
    loopback.into_iter().find_map(|addr| {
        let host = Prefix {
            addr,
            len: if addr.is_ipv4() { 32 } else { 128 },
        };
        prefix.overlaps(&host).then(|| {
            format!(
                "{prefix} contains {addr}: it would take the host's own {} on {}",
                if port == 22 { "SSH" } else { "service" },
                SocketAddr::new(addr, port)
            )
        })
    })
}

/// The claim of `services` that `addr` falls in (its service's name and
/// the prefix), if any: a builder or the metrics endpoint there would be
/// claimed by yensid itself.
fn claimed_by(services: &[Service], addr: SocketAddr) -> Option<(&str, &Prefix)> {
    let host = Prefix {
        addr: addr.ip(),
        len: if addr.is_ipv4() { 32 } else { 128 },
    };
    services.iter().find_map(|s| {
        (s.port == addr.port())
            .then(|| s.listen.iter().find(|p| p.overlaps(&host)))
            .flatten()
            .map(|p| (s.name.as_str(), p))
    })
}

pub(super) fn check_address(address: &str) -> Result<(), String> {
    if let Ok(addr) = address.parse::<SocketAddr>() {
        if addr.port() == 0 {
            return Err(format!("`{address}`: port 0 is not a port (1 to 65535)"));
        }
        return Ok(());
    }
    let Some((host, port)) = address.rsplit_once(':') else {
        return Err(format!(
            "`{address}` needs a port: `ip:port` or `host:port`"
        ));
    };
    if port.parse::<u16>().ok().filter(|&p| p > 0).is_none() {
        return Err(format!("`{address}`: `{port}` is not a port (1 to 65535)"));
    }
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty() && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    if host_ok {
        Ok(())
    } else {
        Err(format!(
            "`{address}`: `{host}` is neither an IP address nor a host name (IPv6 needs brackets: [::1]:22)"
        ))
    }
}

fn looks_like_public_key(key: &str) -> bool {
    let mut parts = key.split_whitespace();
    matches!(
        (parts.next(), parts.next()),
        (Some(kind), Some(blob))
            if (kind.starts_with("ssh-") || kind.starts_with("ecdsa-") || kind.starts_with("sk-"))
                && blob.len() >= 16
                && blob.chars().all(|c| c.is_ascii_alphanumeric() || "+/=".contains(c))
    )
}

pub(super) fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}
