//! `yensid`: a kernel-level redirector for Nix remote builds.
//!
//! The daemon (`yensid run`) claims service addresses in the kernel with an
//! sk_lookup program and steers each incoming SSH connection to a builder
//! of a pool, or refuses it at once so that Nix builds locally. Accepted
//! connections are spliced to their builder in the kernel.

mod bpf;
mod config;
mod daemon;
mod policy;
mod proxy;
mod sock;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
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

fn run(config: &std::path::Path) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(daemon::run(config))
}

fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
}
