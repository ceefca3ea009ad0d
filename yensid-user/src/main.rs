//! `yensid`: a kernel-level redirector for Nix remote builds.
//!
//! The daemon (`yensid run`) claims service addresses in the kernel with an
//! sk_lookup program and steers each incoming SSH connection to a builder
//! of a pool, or refuses it at once so that Nix builds locally. Accepted
//! connections are spliced to their builder in the kernel.

mod bpf;
mod config;
mod control;
mod daemon;
mod health;
mod hook;
mod link;
mod metrics;
mod policy;
mod proxy;
mod registry;
mod sock;
mod state;
mod status;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use control::{ModeChange, Request};
use state::{ModeOverride, OperatorState, unix_deadline, unix_now};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "yensid",
    version,
    about = "Kernel-level redirector for Nix remote builds",
    long_about = "yensid gives Nix clients one SSH endpoint (e.g. ssh-ng://builder@127.0.0.22) \
for a pool of builders. An sk_lookup program claims the service address in the kernel and \
steers every new connection to the builder the configured strategy picks, or refuses it at once \
(RST) so that Nix builds locally. Established connections are spliced in the kernel.\n\n\
Quick start:\n  yensid check-config /etc/yensid/yensid.toml\n  sudo yensid run --config /etc/yensid/yensid.toml"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon (needs root, or CAP_BPF + CAP_NET_ADMIN + CAP_SYS_ADMIN).
    ///
    /// Loads the BPF programs, pins their state under the configured
    /// pin_path, claims every service's addresses, and serves until SIGTERM
    /// (clean stop: nothing stays pinned or attached). SIGHUP reloads the
    /// configuration without dropping open connections. If the daemon dies
    /// uncleanly, the pinned program keeps refusing claimed connections, so
    /// Nix builds locally instead of hanging. Log verbosity: RUST_LOG
    /// (default `info`).
    Run {
        /// The configuration file (TOML).
        #[arg(
            long,
            short,
            env = "YENSID_CONFIG",
            default_value = "/etc/yensid/yensid.toml"
        )]
        config: PathBuf,
    },
    /// Stop sending new connections to a builder (maintenance).
    ///
    /// Its open connections, spliced or not, continue to their end. The
    /// drain is kept in the state file and survives daemon restarts until
    /// `yensid undrain`. Works while the daemon is stopped too (it takes
    /// effect when the daemon starts). Needs root.
    Drain {
        /// The builder's name, as in `[builders.NAME]`.
        builder: String,
        #[arg(
            long,
            short,
            env = "YENSID_CONFIG",
            default_value = "/etc/yensid/yensid.toml"
        )]
        config: PathBuf,
    },
    /// Let a drained builder take new connections again (when healthy).
    Undrain {
        /// The builder's name, as in `[builders.NAME]`.
        builder: String,
        #[arg(
            long,
            short,
            env = "YENSID_CONFIG",
            default_value = "/etc/yensid/yensid.toml"
        )]
        config: PathBuf,
    },
    /// Show or change the mode: local, remote or auto.
    ///
    /// `local` refuses every claimed connection, so Nix builds locally at
    /// once; `remote` uses healthy builders whatever the link rules say;
    /// `auto` follows the rules of [policy]. Without an argument, shows the
    /// mode in force, where it comes from (configuration, policy hook or
    /// override) and when an override expires. An override survives daemon
    /// restarts; a `local` override with `--for` is enforced by the kernel
    /// itself, to the second. Changing needs root (or `control_group`).
    ///
    /// Examples: `yensid mode local --for 2h`, `yensid mode remote`,
    /// `yensid mode --reset`.
    Mode {
        /// local | remote | auto; leave out to show the mode in force.
        mode: Option<config::Mode>,
        /// How long the override lasts (e.g. 30m, 2h); default: until changed.
        #[arg(long = "for", value_name = "DURATION", requires = "mode", value_parser = parse_for)]
        for_duration: Option<std::time::Duration>,
        /// Remove the override: back to the configured mode (or the hook's).
        #[arg(long, conflicts_with = "mode")]
        reset: bool,
        #[arg(
            long,
            short,
            env = "YENSID_CONFIG",
            default_value = "/etc/yensid/yensid.toml"
        )]
        config: PathBuf,
    },
    /// Show services, builders and the mode: what happens to the next
    /// connection and why.
    ///
    /// Services: claimed addresses, strategy, accepting or refusing (and
    /// why), the kernel's counters. Builders: healthy / unhealthy (why) /
    /// draining / full, open and total connections, failovers, bytes each
    /// way, probe RTT, egress link. Without a running daemon it says so and
    /// says whether claimed traffic is being refused. Needs read access to
    /// the control socket (root, or `control_group`).
    Status {
        /// Print the status document as JSON (a stable interface).
        #[arg(long)]
        json: bool,
        #[arg(
            long,
            short,
            env = "YENSID_CONFIG",
            default_value = "/etc/yensid/yensid.toml"
        )]
        config: PathBuf,
    },
    /// Dump every pinned map, decoded, read from the pins (works without
    /// the daemon): bindings, services, backends, builders, connection
    /// counts, the kernel's counters, affinity slots, the local override.
    /// The tool for debugging the kernel side.
    Maps {
        /// Print the maps as JSON.
        #[arg(long)]
        json: bool,
        #[arg(
            long,
            short,
            env = "YENSID_CONFIG",
            default_value = "/etc/yensid/yensid.toml"
        )]
        config: PathBuf,
    },
    /// Explain what happens to the next connection, and why.
    ///
    /// Names the builder the kernel would choose for a connection from
    /// ADDR (or says it is refused), with each rule that decided it: the
    /// mode and where it comes from, each builder's eligibility (health,
    /// drain, link rules), open connections and weight, the strategy.
    Explain {
        /// The service (default: the first one).
        #[arg(long)]
        service: Option<String>,
        /// The client's address (matters for source-affinity).
        #[arg(long)]
        from: Option<std::net::IpAddr>,
        #[arg(
            long,
            short,
            env = "YENSID_CONFIG",
            default_value = "/etc/yensid/yensid.toml"
        )]
        config: PathBuf,
    },
    /// Print known_hosts lines that trust every builder under one name.
    ///
    /// OpenSSH accepts a server whose key matches any of several lines for
    /// the same host name, so clients trust the whole pool without a CA.
    /// Builders without `host_key` are listed on stderr. Append the output
    /// to root's ~/.ssh/known_hosts (the Nix daemon runs ssh as root).
    KnownHosts {
        /// The name clients connect to; default: each service's addresses
        /// (with `[addr]:port` for a port other than 22).
        #[arg(long)]
        name: Option<String>,
        #[arg(
            long,
            short,
            env = "YENSID_CONFIG",
            default_value = "/etc/yensid/yensid.toml"
        )]
        config: PathBuf,
    },
    /// Validate a configuration file without privileges.
    ///
    /// Reports every problem at once, each with its key and line: unknown
    /// keys, unknown builder names, overlapping listen prefixes on one port,
    /// bad addresses, zero weights. Exit status 0 when valid, 1 otherwise.
    CheckConfig {
        /// The configuration file (TOML).
        file: PathBuf,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config } => {
            init_logging();
            match run(&config) {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    std::process::ExitCode::FAILURE
                }
            }
        }
        Command::Mode {
            mode,
            for_duration,
            reset,
            config,
        } => {
            let change = (mode.is_some() || reset).then_some(ModeChange {
                mode,
                for_seconds: for_duration.map(|d| d.as_secs().max(1)),
            });
            operator(&config, Request::Mode { change })
        }
        Command::Drain { builder, config } => operator(&config, Request::Drain { builder }),
        Command::Undrain { builder, config } => operator(&config, Request::Undrain { builder }),
        Command::Status { json, config } => match show_status(&config, json) {
            Ok(text) => {
                print!("{text}");
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("yensid: {e:#}");
                std::process::ExitCode::FAILURE
            }
        },
        Command::Explain {
            service,
            from,
            config,
        } => operator(&config, Request::Explain { service, from }),
        Command::Maps { json, config } => match show_maps(&config, json) {
            Ok(text) => {
                print!("{text}");
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("yensid: {e:#}");
                std::process::ExitCode::FAILURE
            }
        },
        Command::KnownHosts { name, config } => match known_hosts(&config, name.as_deref()) {
            Ok(lines) => {
                print!("{lines}");
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("yensid: {e:#}");
                std::process::ExitCode::FAILURE
            }
        },
        Command::CheckConfig { file } => match config::Config::load(&file) {
            Ok(c) => {
                println!(
                    "ok: {} service(s), {} builder(s)",
                    c.services.len(),
                    c.builders.len()
                );
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{}: invalid configuration", file.display());
                eprintln!("{e}");
                std::process::ExitCode::FAILURE
            }
        },
    }
}

/// Sends a verb to the running daemon, or records it in the state file
/// when no daemon runs.
fn operator(config_path: &Path, request: Request) -> std::process::ExitCode {
    match send(config_path, &request) {
        Ok(message) => {
            println!("{message}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("yensid: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn send(config_path: &Path, request: &Request) -> Result<String> {
    let config = config::Config::load(config_path)
        .with_context(|| format!("invalid configuration {}", config_path.display()))?;
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
fn record_offline(config: &config::Config, request: &Request) -> Result<String> {
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
            state.mode_override = change.mode.map(|mode| ModeOverride {
                mode,
                until: change.for_seconds.map(unix_deadline),
            });
        }
        Request::Status | Request::Explain { .. } | Request::Mode { change: None } => {
            let now = unix_now();
            let recorded = match state.mode_override.filter(|o| o.in_force(now)) {
                Some(o) => format!("An override to {} is recorded for its next start.", o.mode),
                None => format!("It will start in mode {}.", config.policy.mode),
            };
            let claims: Vec<String> = config
                .services
                .iter()
                .flat_map(|s| s.listen.iter().map(move |p| format!("{p} port {}", s.port)))
                .collect();
            let (_, text) = status::not_running(&config.daemon.pin_path, &claims);
            return Ok(format!("{text} {recorded}"));
        }
    }
    state.save(&file)?;
    Ok(format!(
        "{not_running}: recorded in {}; takes effect when it starts",
        file.display()
    ))
}

fn show_status(config_path: &Path, json: bool) -> Result<String> {
    let config = config::Config::load(config_path)
        .with_context(|| format!("invalid configuration {}", config_path.display()))?;
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
            let claims: Vec<String> = config
                .services
                .iter()
                .flat_map(|s| s.listen.iter().map(move |p| format!("{p} port {}", s.port)))
                .collect();
            let (attached, text) = status::not_running(&config.daemon.pin_path, &claims);
            if json {
                let doc = serde_json::json!({
                    "running": false,
                    "claimed_traffic": if attached { "refused" } else { "not claimed" },
                    "message": text,
                });
                Ok(format!("{doc}\n"))
            } else {
                Ok(text + "\n")
            }
        }
        Err(e) => Err(e.into()),
    }
}

fn show_maps(config_path: &Path, json: bool) -> Result<String> {
    use std::fmt::Write as _;
    let config = config::Config::load(config_path)
        .with_context(|| format!("invalid configuration {}", config_path.display()))?;
    let pins = &config.daemon.pin_path;
    let dump = bpf::read_pinned(pins).with_context(|| {
        format!(
            "no readable pinned maps under {} (yensid not running, or another version)",
            pins.display()
        )
    })?;
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
    let _ = writeln!(out, "\nBUILDERS (weight, max_connections, eligible)");
    for (i, b) in &dump.builders {
        let _ = writeln!(
            out,
            "  {i}: weight={} max={} eligible={}",
            b.weight, b.max_connections, b.eligible
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
        "\nOVERRIDE local_until_boot_ns={}",
        match dump.local_override_until_boot_ns {
            0 => "none".to_owned(),
            u64::MAX => "until changed".to_owned(),
            t => t.to_string(),
        }
    );
    Ok(out)
}

/// known_hosts lines for every builder's host key under each client-facing
/// name.
fn known_hosts(config_path: &Path, name: Option<&str>) -> Result<String> {
    let config = config::Config::load(config_path)
        .with_context(|| format!("invalid configuration {}", config_path.display()))?;
    let mut names: Vec<String> = match name {
        Some(n) => vec![n.to_owned()],
        None => config
            .services
            .iter()
            .flat_map(|s| {
                s.listen
                    .iter()
                    .filter(|p| p.is_host())
                    .map(move |p| match s.port {
                        22 => p.addr.to_string(),
                        port => format!("[{}]:{port}", p.addr),
                    })
            })
            .collect(),
    };
    names.dedup();
    if names.is_empty() {
        bail!("no service claims a single address; name the host with --name");
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

fn parse_for(text: &str) -> Result<std::time::Duration, String> {
    config::parse_duration(text)
}

fn run(config: &Path) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(daemon::run(config))
}

fn init_logging() {
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
}
