//! The operator's side of the CLI: verbs sent to the daemon over its
//! control socket (recorded in the state file when no daemon runs), and
//! the inspection nouns (`status`, `maps`, `known-hosts`).

use std::path::Path;

use anyhow::{Context, Result, bail};

use crate::{
    config::Config,
    kernel::{bpf, pins},
    operate::control::{self, Request},
    operate::machines,
    operate::status,
    state::{ModeOverride, OperatorState, unix_now, unix_now_rounded_up},
};

fn load(config_path: &Path) -> Result<Config> {
    Config::load(config_path)
        .with_context(|| format!("invalid configuration {}", config_path.display()))
}

/// Every (prefix, port) the configuration claims, in words.
fn claims(config: &Config) -> Vec<String> {
    config.services.iter().flat_map(|s| s.claims()).collect()
}

/// Sends a verb to the running daemon, or records it in the state file
/// when no daemon runs.
pub fn send(config_path: &Path, request: &Request) -> Result<String> {
    let config = load(config_path)?;
    if let Request::Drain { builder } | Request::Undrain { builder } = request
        && config.builder(builder).is_none()
    {
        let known: Vec<&str> = config.builders.iter().map(|b| b.name.as_str()).collect();
        bail!(
            "unknown builder `{builder}` (configured: {})",
            known.join(", ")
        );
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let socket = config.daemon.control_socket();
    match runtime.block_on(control::request(&socket, request)) {
        Ok(reply) if reply.ok => Ok(reply.message),
        Ok(reply) => bail!("{}", reply.message),
        Err(control::ControlError::NotRunning { .. }) => record_offline(&config, request),
        Err(e) => Err(e.into()),
    }
}

/// Without a daemon: changes go to the state file, to take effect when it
/// starts; a query answers from the state file.
fn record_offline(config: &Config, request: &Request) -> Result<String> {
    let file = config.daemon.state_file();
    let mut state = OperatorState::load(&file)?;
    let not_running = format!(
        "yensid is not running (no {})",
        config.daemon.control_socket().display()
    );
    match request {
        Request::Drain { builder } => {
            state.drained.insert(builder.clone());
        }
        Request::Undrain { builder } => {
            state.drained.remove(builder);
        }
        Request::Mode {
            change: Some(change),
        } => {
            state.mode_override = change
                .mode
                .map(|mode| ModeOverride::starting(mode, change.for_seconds, unix_now_rounded_up()))
                .transpose()
                .map_err(anyhow::Error::msg)?;
        }
        Request::Status | Request::Explain { .. } | Request::Mode { change: None } => {
            let now = unix_now();
            let recorded = match state.mode_override.filter(|o| o.in_force(now)) {
                Some(o) => format!("An override to {} is recorded for its next start.", o.mode),
                None => format!("It will start in mode {}.", config.policy.mode),
            };
            let (_, text) = status::not_running(&config.daemon.pin_path, &claims(config));
            return Ok(format!("{text} {recorded}"));
        }
    }
    state.save(&file)?;
    Ok(format!(
        "{not_running}: recorded in {}; takes effect when it starts",
        file.display()
    ))
}

/// `yensid status`.
pub fn show_status(config_path: &Path, json: bool) -> Result<String> {
    let config = load(config_path)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match runtime.block_on(control::request(
        &config.daemon.control_socket(),
        &Request::Status,
    )) {
        Ok(reply) if reply.ok => {
            if json {
                return Ok(reply.message + "\n");
            }
            let status: status::Status = serde_json::from_str(&reply.message)
                .context("unreadable status from the daemon")?;
            Ok(status::render(&status))
        }
        Ok(reply) => bail!("{}", reply.message),
        Err(control::ControlError::NotRunning { .. }) => {
            let (claim, text) = status::not_running(&config.daemon.pin_path, &claims(&config));
            let pinned = pins::read_pinned(&config.daemon.pin_path)
                .ok()
                .map(|dump| status::pinned(&config, &dump));
            if json {
                let doc = serde_json::json!({
                    "running": false,
                    "claimed_traffic": claim.as_str(),
                    "message": text,
                    "pinned": pinned,
                });
                Ok(format!("{doc}\n"))
            } else {
                let tables = pinned
                    .as_ref()
                    .map(status::render_pinned)
                    .unwrap_or_default();
                Ok(format!("{text}\n{tables}"))
            }
        }
        Err(e) => Err(e.into()),
    }
}

/// `yensid maps`.
pub fn show_maps(config_path: &Path, json: bool) -> Result<String> {
    use std::fmt::Write as _;
    let config = load(config_path)?;
    let pins = &config.daemon.pin_path;
    let dump = match pins::read_pinned(pins) {
        Ok(dump) => dump,
        Err(bpf::BpfError::OpenPin { source, .. })
            if source.kind() == std::io::ErrorKind::PermissionDenied =>
        {
            bail!(
                "cannot read the pinned maps under {}: permission denied (root or a member of \
                 daemon.read_group can)",
                pins.display()
            )
        }
        Err(e) => {
            return Err(e).with_context(|| {
                format!(
                    "no readable pinned maps under {} (yensid not running, or another version)",
                    pins.display()
                )
            });
        }
    };
    if json {
        return Ok(serde_json::to_string_pretty(&dump)? + "\n");
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "pins: {} (dispatch link {})",
        dump.pin_path.display(),
        if dump.dispatch_attached {
            "attached"
        } else {
            "absent"
        }
    );
    let _ = writeln!(out, "\nBINDINGS (claimed -> service)");
    for (binding, service) in &dump.bindings {
        let _ = writeln!(out, "  {binding} -> {service}");
    }
    let _ = writeln!(out, "\nSERVICES (accept, strategy, backends)");
    for (i, s) in &dump.services {
        let _ = writeln!(
            out,
            "  {i}: accept={} strategy={} backends={}",
            s.accept, s.strategy, s.backends
        );
    }
    let _ = writeln!(
        out,
        "\nSERVICE_BACKENDS (service/position -> builder, listener, eligible)"
    );
    for ((svc, pos), b) in &dump.service_backends {
        let _ = writeln!(
            out,
            "  {svc}/{pos}: builder={} listener={} eligible={}",
            b.builder, b.listener, b.eligible
        );
    }
    let _ = writeln!(
        out,
        "\nBUILDERS (weight, max_connections, eligible, load_cost: least-loaded's measured score, 1024 = one connection)"
    );
    for (i, b) in &dump.builders {
        let _ = writeln!(
            out,
            "  {i}: weight={} max={} eligible={} load_cost={}",
            b.weight, b.max_connections, b.eligible, b.load_cost
        );
    }
    let _ = writeln!(
        out,
        "\nCONNECTIONS (assigned by the kernel, released by the daemon, active)"
    );
    for (i, (a, r, active)) in &dump.connections {
        let _ = writeln!(out, "  {i}: assigned={a} released={r} active={active}");
    }
    let _ = writeln!(out, "\nSERVICE_COUNTERS");
    for (i, c) in &dump.service_counters {
        let _ = writeln!(
            out,
            "  {i}: dispatched={} refused_mode_local={} refused_no_builder={} sequence={}",
            c.dispatched, c.refused_mode, c.refused_unavailable, c.sequence
        );
    }
    if !dump.affinity.is_empty() {
        let _ = writeln!(out, "\nAFFINITY (service: position x slots)");
        for (i, slots) in &dump.affinity {
            let shares: Vec<String> = slots.iter().map(|(p, n)| format!("{p}x{n}")).collect();
            let _ = writeln!(out, "  {i}: {}", shares.join(" "));
        }
    }
    let _ = writeln!(
        out,
        "\nPATH_STATS (builder -> srtt, samples, retransmits, sampled at boot ns)"
    );
    for (i, p) in &dump.path_stats {
        let _ = writeln!(
            out,
            "  {i}: srtt_us={} samples={} retransmits={} sampled_boot_ns={}",
            p.srtt_us, p.samples, p.retransmits, p.sampled_boot_ns
        );
    }
    let _ = writeln!(
        out,
        "\nOVERRIDE local_until_boot_ns={}",
        match dump.local_override_until_boot_ns {
            0 => "none".to_owned(),
            u64::MAX => "until changed".to_owned(),
            t => t.to_string(),
        }
    );
    let _ = writeln!(
        out,
        "\nSPLICED {} socket(s) joined to a peer in the kernel",
        dump.spliced_sockets
    );
    let local = &dump.local;
    let services: Vec<String> = local.direct_services.iter().map(u32::to_string).collect();
    let _ = writeln!(
        out,
        "\nLOCAL connect-time rewrite {}, netns cookie {}; services whose local clients go direct: {}",
        if local.attached {
            "attached"
        } else {
            "not attached"
        },
        local.netns_cookie,
        if services.is_empty() {
            "none".to_owned()
        } else {
            services.join(" ")
        }
    );
    let _ = writeln!(
        out,
        "\nLOCAL_BUILDERS (builder -> where a rewritten connect goes, failed connects acted on)"
    );
    for (i, target) in &local.builders {
        let address = target
            .address
            .map_or_else(|| "unknown".to_owned(), |a| a.to_string());
        let _ = writeln!(
            out,
            "  {i}: {address} failures_seen={}",
            target.failures_seen
        );
    }
    let _ = writeln!(
        out,
        "\nLOCAL_STATS (builder -> connects rewritten, closed, open, failed, bytes of closed connections, srtt)"
    );
    for (i, st) in &local.stats {
        let _ = writeln!(
            out,
            "  {i}: opened={} closed={} open={} failed={} bytes_sent={} bytes_received={} retransmits={} srtt_us={} sampled_boot_ns={}",
            st.opened,
            st.closed,
            st.opened.wrapping_sub(st.closed),
            st.failed,
            st.bytes_sent,
            st.bytes_received,
            st.retransmits,
            st.srtt_us,
            st.sampled_boot_ns
        );
    }
    let _ = writeln!(
        out,
        "\nLOCAL_SOCKETS {} local socket(s) rewritten and not yet counted closed",
        local.open_sockets
    );
    Ok(out)
}

/// known_hosts lines for every builder's host key under each client-facing
/// name: `name`, or every service's first `aliases` addresses (the names
/// `yensid nix-machines` lists).
pub fn known_hosts(config_path: &Path, name: Option<&str>, aliases: u32) -> Result<String> {
    let config = load(config_path)?;
    let mut names: Vec<String> = match name {
        Some(n) => vec![n.to_owned()],
        None => config
            .services
            .iter()
            .flat_map(|s| machines::known_host_names(s, aliases))
            .collect(),
    };
    names.dedup();
    if names.is_empty() {
        bail!("no service claims an address; name the host with --name");
    }
    let mut out = String::new();
    for b in &config.builders {
        match &b.host_key {
            Some(key) => {
                for n in &names {
                    out.push_str(&format!("{n} {key}\n"));
                }
            }
            None => eprintln!("yensid: builder `{}` has no host_key; not listed", b.name),
        }
    }
    Ok(out)
}
