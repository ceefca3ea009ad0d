//! Wall time of uncached Nix builds through a contender: the harness's real
//! Nix client (a fresh store per run) and the builders' sshd with Nix stores
//! of their own (`Topology::with_stores`). Every derivation has a name no
//! store has seen, so each one really builds, remotely.
//!
//! One `nix-build` of all the derivations, over `ssh-ng://`, with
//! `--max-jobs 0`: nothing may build locally, so a contender that fails to
//! forward fails the figure instead of hiding behind local builds. The same
//! number of remote build slots for everyone: a direct client lists each
//! builder with its share, a client of a middlebox lists the service alone.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};
use yensid_tests::{Derivation, NixClient, Site, StoreScheme, Topology, remote_builder};

/// Remote builds at a time, in all.
const JOBS: u32 = 4;
/// Only against hangs.
const TIMEOUT: Duration = Duration::from_secs(900);

/// How a run of builds went.
pub struct NixBuilds {
    pub seconds: f64,
    /// Builds per builder.
    pub sites: BTreeMap<String, usize>,
}

/// Builds `count` fresh derivations in one `nix-build` whose only remote
/// machines are `targets` (sshd, port 22: Nix 2.8 takes no port).
pub fn builds(topology: &Topology, targets: &[SocketAddr], count: usize) -> Result<NixBuilds> {
    ensure!(
        targets.iter().all(|t| t.port() == 22),
        "Nix reaches builders on port 22 only: {targets:?}"
    );
    let nix = NixClient::new(topology, topology.known_hosts().render())?;
    let machines: Vec<String> = targets
        .iter()
        .map(|t| remote_builder(StoreScheme::SshNg, t.ip(), share(JOBS, targets.len())))
        .collect();
    let derivations: Vec<Derivation> = (0..count).map(|_| Derivation::uncached()).collect();
    let started = Instant::now();
    let run = nix.build(&derivations, &machines.join(" ; "), 0, TIMEOUT)?;
    let seconds = started.elapsed().as_secs_f64();
    run.ensure_built()?;
    let mut sites = BTreeMap::new();
    for site in run.sites().into_iter().flatten() {
        match site {
            Site::Builder(name) => *sites.entry(name.clone()).or_default() += 1,
            other => bail!("a derivation was built at {other:?}, not on a builder"),
        }
    }
    Ok(NixBuilds { seconds, sites })
}

/// Each of `machines` machines' share of `jobs` slots, at least one.
fn share(jobs: u32, machines: usize) -> u32 {
    (jobs / machines.max(1) as u32).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_client_gets_the_same_slots() {
        assert_eq!(share(JOBS, 1), 4);
        assert_eq!(share(JOBS, 2) * 2, 4);
        assert_eq!(share(JOBS, 8), 1);
    }
}
