//! Upload parallelism through yensid with a real Nix client (issue 11).
//!
//! Nix takes one upload lock per machine entry: every input a client sends to
//! one entry waits for the previous upload to that entry to end. With the
//! service listed once, uploads to the whole pool are serialized; with the
//! service's /30 listed as four alias entries (what `yensid nix-machines` and
//! the NixOS module generate), four uploads can run at once.
//!
//! Four derivations built side by side in one `nix-build --max-jobs 0`, each
//! with an input of fresh random bytes (so every input really travels), once
//! through one machine entry with four slots and once through four alias
//! entries with one slot each; the wall time of each run. Each configuration
//! runs `TRIALS` times, alternating, with fresh inputs every time.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};
use yensid_tests::{
    Daemon, DaemonConfig, Dataplane, Derivation, NixClient, RandomFile, Site, StoreScheme,
    Strategy, Topology, remote_builder,
};

/// The derivations built at once, and the alias entries.
const BUILDS: usize = 4;
const TRIALS: usize = 2;
const PREFIX: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 20);
/// Only against hangs.
const TIMEOUT: Duration = Duration::from_secs(900);

/// Wall times in seconds, one per trial.
pub struct Uploads {
    pub input_bytes: u64,
    pub one_entry: Vec<f64>,
    pub aliases: Vec<f64>,
}

pub fn measure(yensid: &Path, input_bytes: u64) -> Result<Uploads> {
    let topology = Topology::with_stores(2)?;
    let mut config =
        DaemonConfig::for_topology(&topology, Dataplane::Kernel, Strategy::LeastConnections);
    config.service_mut().listen = vec![format!("{PREFIX}/30")];
    let mut daemon = Daemon::start_binary(yensid, topology.client_ns(), &config)?;
    // Every builder's key under every alias address, as `yensid known-hosts` prints.
    let mut known_hosts = String::new();
    for i in 0..BUILDS as u32 {
        for builder in topology.builders() {
            let address = Ipv4Addr::from(u32::from(PREFIX) + i);
            known_hosts.push_str(&format!("{address} {}\n", builder.host_key().trim()));
        }
    }
    let nix = NixClient::new(&topology, &known_hosts)?;

    let one_entry = remote_builder(StoreScheme::SshNg, IpAddr::V4(PREFIX), BUILDS as u32);
    let aliases: Vec<String> = (0..BUILDS as u32)
        .map(|i| {
            let address = Ipv4Addr::from(u32::from(PREFIX) + i);
            remote_builder(StoreScheme::SshNg, IpAddr::V4(address), 1)
        })
        .collect();
    let aliases = aliases.join("\n");

    let mut uploads = Uploads {
        input_bytes,
        one_entry: Vec::new(),
        aliases: Vec::new(),
    };
    for _ in 0..TRIALS {
        uploads
            .one_entry
            .push(timed_run(&nix, &one_entry, input_bytes)?);
        uploads
            .aliases
            .push(timed_run(&nix, &aliases, input_bytes)?);
    }
    drop(nix);
    daemon.stop()?;
    Ok(uploads)
}

/// Seconds of one nix-build of [`BUILDS`] derivations with fresh inputs.
fn timed_run(nix: &NixClient, builders: &str, input_bytes: u64) -> Result<f64> {
    let inputs = (0..BUILDS)
        .map(|_| RandomFile::create(input_bytes))
        .collect::<Result<Vec<_>>>()?;
    let derivations: Vec<Derivation> = inputs
        .iter()
        .map(|input| Derivation::uncached().with_input(input.path()))
        .collect();
    let started = Instant::now();
    let run = nix.build(&derivations, builders, 0, TIMEOUT)?;
    let seconds = started.elapsed().as_secs_f64();
    run.ensure_built()?;
    for site in run.sites().into_iter().flatten() {
        if !matches!(site, Site::Builder(_)) {
            bail!("a derivation was built at {site:?}, not on a builder");
        }
    }
    ensure!(run.builds.len() == BUILDS);
    Ok(seconds)
}

impl Uploads {
    pub fn markdown(&self) -> String {
        let mib = self.input_bytes as f64 / f64::from(1u32 << 20);
        let show = |times: &[f64]| {
            times
                .iter()
                .map(|t| format!("{t:.1}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut md = String::new();
        let _ = writeln!(md, "## Upload parallelism (real Nix client)\n");
        let _ = writeln!(
            md,
            "{BUILDS} derivations built at once by one `nix-build --max-jobs 0` through \
             yensid (kernel path, least-connections, 2 builders), each with an input of \
             {mib:.0} MiB of fresh random bytes; wall time per run, {TRIALS} runs each, \
             alternating.\n"
        );
        let _ = writeln!(md, "| machine entries | wall time (s) |");
        let _ = writeln!(md, "|---|---:|");
        let _ = writeln!(
            md,
            "| one (`{PREFIX}`, {BUILDS} jobs) | {} |",
            show(&self.one_entry)
        );
        let _ = writeln!(
            md,
            "| {BUILDS} aliases in `{PREFIX}/30`, 1 job each | {} |",
            show(&self.aliases)
        );
        md
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "input_bytes": self.input_bytes,
            "builds": BUILDS,
            "one_entry_seconds": self.one_entry,
            "aliases_seconds": self.aliases,
        })
    }
}
