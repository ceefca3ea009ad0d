//! `yensid`: a kernel-level redirector for Nix remote builds.
//!
//! The daemon (`yensid run`) claims service addresses in the kernel with an
//! sk_lookup program and steers each incoming SSH connection to a builder
//! of a pool, or refuses it at once so that Nix builds locally. Accepted
//! connections are spliced to their builder in the kernel.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use yensid::{
    config, daemon,
    operate::{
        cli,
        control::{ModeChange, Request},
        machines,
    },
};

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

/// The `--config` option every command but `check-config` takes.
#[derive(clap::Args)]
struct ConfigFile {
    /// The configuration file (TOML).
    #[arg(
        long = "config",
        short = 'c',
        env = "YENSID_CONFIG",
        default_value = "/etc/yensid/yensid.toml"
    )]
    path: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon (needs root, or CAP_BPF + CAP_NET_ADMIN; CAP_SYS_ADMIN only to mount bpffs).
    ///
    /// Loads the BPF programs, pins their state under the configured
    /// pin_path, claims every service's addresses, and serves until SIGTERM
    /// (clean stop: nothing stays pinned or attached). SIGHUP reloads the
    /// configuration without dropping open connections. If the daemon dies
    /// uncleanly, the pinned program keeps refusing claimed connections, so
    /// Nix builds locally instead of hanging. Log verbosity: RUST_LOG
    /// (default `info`).
    ///
    /// Started while a daemon of the same instance runs (same pin_path), it
    /// takes over: the running daemon hands it its listeners and every live
    /// connection (spliced, copied or in its handoff) and exits; nothing is
    /// refused or cut meanwhile. The new binary and configuration apply to
    /// new connections; open ones stay with their builder, even one that
    /// left the configuration. See also `yensid takeover`.
    Run {
        #[command(flatten)]
        config: ConfigFile,
        /// Fail unless a running daemon of this instance hands over (instead
        /// of starting afresh when none runs).
        #[arg(long)]
        take_over: bool,
    },
    /// Replace the running daemon by a new one without losing a connection:
    /// for upgrades and configuration changes (the unit's ExecReload).
    ///
    /// Starts `yensid run --take-over` from this binary with this
    /// configuration, in the background, and returns once it has taken over
    /// (exit 0) or has failed (exit 1, and the running daemon serves on).
    /// Under systemd the new daemon becomes the service's main process
    /// (`MAINPID=`; the unit needs NotifyAccess=all). Needs root.
    Takeover {
        #[command(flatten)]
        config: ConfigFile,
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
        #[command(flatten)]
        config: ConfigFile,
    },
    /// Let a drained builder take new connections again (when healthy).
    Undrain {
        /// The builder's name, as in `[builders.NAME]`.
        builder: String,
        #[command(flatten)]
        config: ConfigFile,
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
        /// How long the override lasts (e.g. 30m, 2h, 7d; at most 365d);
        /// default: until changed.
        #[arg(long = "for", value_name = "DURATION", requires = "mode", value_parser = parse_for)]
        for_duration: Option<std::time::Duration>,
        /// Remove the override: back to the configured mode (or the hook's).
        #[arg(long, conflicts_with = "mode")]
        reset: bool,
        #[command(flatten)]
        config: ConfigFile,
    },
    /// Show services, builders and the mode: what happens to the next
    /// connection and why.
    ///
    /// Services: claimed addresses, strategy, accepting or refusing (and
    /// why), the kernel's counters. Builders: healthy / unhealthy (why) /
    /// draining / full, open and total connections, failovers, bytes each
    /// way, probe RTT, the kernel's RTT and retransmits on live connections,
    /// egress link. Without a running daemon it says so, says whether
    /// claimed traffic is being refused, and shows the last state in the
    /// pinned maps. Needs root, or membership of `daemon.read_group` or
    /// `policy.control_group`.
    Status {
        /// Print the status document as JSON (a stable interface).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        config: ConfigFile,
    },
    /// Dump every pinned map, decoded (works without the daemon).
    ///
    /// Bindings, services, backends, builders, connection counts, the
    /// kernel's counters, affinity slots, the local override and the path
    /// measurements (RTT, retransmits), read from the pins, read-only: the
    /// tool for debugging the kernel side. Needs root or `daemon.read_group`.
    Maps {
        /// Print the maps as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        config: ConfigFile,
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
        #[command(flatten)]
        config: ConfigFile,
    },
    /// Print known_hosts lines that trust every builder under one name.
    ///
    /// OpenSSH accepts a server whose key matches any of several lines for
    /// the same host name, so clients trust the whole pool without a CA.
    /// Builders without `host_key` are listed on stderr. Append the output
    /// to root's ~/.ssh/known_hosts (the Nix daemon runs ssh as root).
    KnownHosts {
        /// The name clients connect to; default: each service's alias
        /// addresses (with `[addr]:port` for a port other than 22).
        #[arg(long)]
        name: Option<String>,
        /// How many addresses of each service's first prefix to list (as in
        /// `yensid nix-machines`).
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=256))]
        aliases: u32,
        #[command(flatten)]
        config: ConfigFile,
    },
    /// Print /etc/nix/machines lines for a service, on several addresses.
    ///
    /// Nix uploads to one machine entry one at a time. A service whose
    /// prefix covers several addresses (e.g. 127.0.0.20/30) is reachable on
    /// each, so the lines list its first `--aliases` addresses as separate
    /// entries and uploads to the pool run in parallel; each entry's maxJobs
    /// is its share of the pool (the builders' max_connections, or their
    /// weight without one). Trust the builders under the same names with
    /// `yensid known-hosts`.
    NixMachines {
        /// The service (default: the first one).
        #[arg(long)]
        service: Option<String>,
        /// How many entries (addresses of the service's first prefix).
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=256))]
        aliases: u32,
        /// The user Nix logs in as on the builders.
        #[arg(long, default_value = "nix-builder")]
        user: String,
        /// The private key Nix logs in with (default: ssh's).
        #[arg(long)]
        key: Option<String>,
        /// The systems the pool builds for, comma-separated.
        #[arg(long, value_delimiter = ',', default_values_t = [default_system()])]
        systems: Vec<String>,
        /// Features every builder supports, comma-separated (e.g. kvm,big-parallel).
        #[arg(long, value_delimiter = ',')]
        features: Vec<String>,
        /// The store protocol: ssh-ng or ssh.
        #[arg(long, default_value = "ssh-ng", value_parser = ["ssh-ng", "ssh"])]
        protocol: String,
        #[command(flatten)]
        config: ConfigFile,
    },
    /// Validate a configuration file without privileges.
    ///
    /// Reports every problem at once, each with its key and line: unknown
    /// keys, unknown builder names, overlapping listen prefixes on one port,
    /// bad addresses, zero weights, durations out of bounds, claims that
    /// would take the host's own addresses. Then what only this host can
    /// tell: unknown groups, and claims of an address another program
    /// listens on here (in this network namespace). Exit status 0 when
    /// valid, 1 otherwise.
    CheckConfig {
        /// The configuration file (TOML).
        file: PathBuf,
        /// Check the file alone, not this host's groups and listeners: for a
        /// machine that is not the one the daemon will run on, such as the
        /// Nix build sandbox that checks a NixOS configuration. `yensid run`
        /// checks the host itself at every start and reload.
        #[arg(long)]
        file_only: bool,
    },
}

fn main() -> std::process::ExitCode {
    let output = match Cli::parse().command {
        Command::Run { config, take_over } => {
            init_logging();
            return match run(&config.path, take_over) {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{}", yensid::error_chain(e.as_ref()));
                    std::process::ExitCode::FAILURE
                }
            };
        }
        Command::CheckConfig { file, file_only } => {
            let checked = config::Config::load(&file).and_then(|c| {
                let problems = if file_only {
                    Vec::new()
                } else {
                    yensid::preflight::check(&c)
                };
                match problems {
                    problems if problems.is_empty() => Ok(c),
                    problems => Err(config::ConfigError::Invalid(problems)),
                }
            });
            return match checked {
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
            };
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
            cli::send(&config.path, &Request::Mode { change }).map(|m| m + "\n")
        }
        Command::Takeover { config } => {
            daemon::start_successor(&config.path, TAKEOVER_LIMIT).map(|summary| summary + "\n")
        }
        Command::Drain { builder, config } => {
            cli::send(&config.path, &Request::Drain { builder }).map(|m| m + "\n")
        }
        Command::Undrain { builder, config } => {
            cli::send(&config.path, &Request::Undrain { builder }).map(|m| m + "\n")
        }
        Command::Explain {
            service,
            from,
            config,
        } => cli::send(&config.path, &Request::Explain { service, from }).map(|m| m + "\n"),
        Command::Status { json, config } => cli::show_status(&config.path, json),
        Command::Maps { json, config } => cli::show_maps(&config.path, json),
        Command::KnownHosts {
            name,
            aliases,
            config,
        } => cli::known_hosts(&config.path, name.as_deref(), aliases),
        Command::NixMachines {
            service,
            aliases,
            user,
            key,
            systems,
            features,
            protocol,
            config,
        } => config::Config::load(&config.path)
            .with_context(|| format!("invalid configuration {}", config.path.display()))
            .and_then(|c| {
                let client = machines::ClientSide {
                    aliases,
                    user,
                    key,
                    systems,
                    features,
                    protocol,
                };
                Ok(machines::nix_machines(&c, service.as_deref(), &client)?)
            }),
    };
    match output {
        Ok(text) => {
            print!("{text}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("yensid: {}", yensid::error_chain(e.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
}

/// This machine's Nix system name, e.g. `x86_64-linux`.
fn default_system() -> String {
    format!("{}-linux", std::env::consts::ARCH)
}

/// `--for`: longer than zero and at most [`config::MAX_OVERRIDE`] (clap
/// names the flag in its error).
fn parse_for(text: &str) -> Result<std::time::Duration, String> {
    config::parse_bounded_duration(text, config::MAX_OVERRIDE)
}

/// How long `yensid takeover` waits for the new daemon: it loads its BPF
/// programs and receives every connection; each step of the exchange has
/// its own 30 s limit.
const TAKEOVER_LIMIT: std::time::Duration = std::time::Duration::from_secs(120);

fn run(config: &Path, take_over: bool) -> Result<()> {
    // SAFETY: no other thread runs yet (the runtime starts below).
    let stored = unsafe { yensid::operate::fdstore::take_from_environment() };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(daemon::run(config, take_over, stored))
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
