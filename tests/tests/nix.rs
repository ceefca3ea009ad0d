//! A real Nix client builds through yensid on real builders (issue 6).
//!
//! Every builder runs sshd, and under it `nix-daemon --stdio` (ssh-ng://) or
//! `nix-store --serve --write` (ssh://), on a store of its own; the client is Debian's
//! nix-bin with a fresh store per run, listing the service address as its only remote
//! machine and trusting exactly what `yensid known-hosts` prints. Each derivation
//! records the network namespace it was built in, so a test knows where every build
//! ran: the output names the builder and that builder's store holds it; a local build
//! names the client namespace and no builder has it.
//!
//! Every test runs once per store scheme: `ssh_ng::<test>` and `ssh::<test>`.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail, ensure};
use yensid_tests::cli::{self, Verdict};
use yensid_tests::{
    Daemon, DaemonConfig, Dataplane, Derivation, Gate, HealthConfig, NixClient, NixRun, PolicyMode,
    Site, StoreScheme, Strategy, Topology, remote_builder, service,
};

common::variant_tests!(
    StoreScheme { ssh_ng: SshNg, ssh: Ssh }:
    least_connections_spreads_two_concurrent_runs_spliced,
    least_connections_spreads_two_concurrent_runs_copied,
    mode_local_makes_nix_build_locally,
    every_builder_down_nix_builds_locally,
    builder_killed_between_builds_following_builds_go_elsewhere,
    builder_drained_during_a_build_finishes_it,
);

/// Far longer than any of these runs takes; only a hang reaches it.
const BUILD_TIMEOUT: Duration = Duration::from_secs(300);
/// How long gated builds may take to start, generously.
const START_TIMEOUT: Duration = Duration::from_secs(120);
const LOG_WAIT: Duration = Duration::from_secs(30);

/// The world of one test: two builders with stores of their own, yensid in front of
/// them (least-connections) and a Nix client that trusts what `yensid known-hosts`
/// prints for the service.
struct World {
    // Field order is drop order: the client, then the daemon, then the topology.
    nix: NixClient,
    daemon: Daemon,
    topology: Topology,
}

impl World {
    /// The default config, changed by `adjust`.
    fn new(dataplane: Dataplane, adjust: impl FnOnce(&mut DaemonConfig)) -> Result<Self> {
        let topology = Topology::with_stores(2)?;
        let mut config =
            DaemonConfig::for_topology(&topology, dataplane, Strategy::LeastConnections);
        adjust(&mut config);
        let daemon = Daemon::start(topology.client_ns(), &config)?;
        let known_hosts = cli::known_hosts(daemon.config_path(), None)?;
        let nix = NixClient::new(&topology, &known_hosts.stdout)?;
        Ok(Self {
            nix,
            daemon,
            topology,
        })
    }

    /// One `nix-build` of one fresh derivation, the service its only remote machine.
    fn build_one(&self, scheme: StoreScheme) -> Result<NixRun> {
        let run = self.nix.build(
            &[Derivation::uncached()],
            &remote_builder(scheme, service().ip(), 1),
            1,
            BUILD_TIMEOUT,
        )?;
        self.ensure_built_where_recorded(&run)?;
        Ok(run)
    }

    /// Fails unless every derivation of `run` was built, in a namespace the topology
    /// knows, and each builder's store holds exactly the outputs that name it: a
    /// builder's output is in that builder's store only, a local one in none.
    fn ensure_built_where_recorded(&self, run: &NixRun) -> Result<()> {
        run.ensure_built()?;
        for build in &run.builds {
            let output = build.output.as_ref().context("ensure_built checked it")?;
            if let Site::Unknown(interfaces) = &output.site {
                bail!("{} was built where {interfaces:?} are", build.name);
            }
            for builder in self.topology.builders() {
                let built_here = output.site == Site::Builder(builder.name().to_owned());
                let stored = builder
                    .store()
                    .context("a topology with stores")?
                    .contains(&output.path);
                ensure!(
                    built_here == stored,
                    "{} was built at {:?}, yet {}'s store {} it",
                    build.name,
                    output.site,
                    builder.name(),
                    if stored { "holds" } else { "lacks" }
                );
            }
        }
        Ok(())
    }

    fn other_builder(&self, name: &str) -> Result<String> {
        self.topology
            .builders()
            .iter()
            .map(|b| b.name().to_owned())
            .find(|b| b != name)
            .context("a second builder")
    }
}

fn least_connections_spreads_two_concurrent_runs_spliced(scheme: StoreScheme) -> Result<()> {
    least_connections_spreads_two_concurrent_runs(scheme, Dataplane::Kernel)
}

fn least_connections_spreads_two_concurrent_runs_copied(scheme: StoreScheme) -> Result<()> {
    least_connections_spreads_two_concurrent_runs(scheme, Dataplane::Userspace)
}

/// Two `nix-build` runs side by side, each building four derivations at `-j 4` with the
/// service as a 4-job machine. Every build holds its connection until all eight have
/// started, so least-connections must have put four on each builder; then every
/// derivation completes, built remotely where it said it was, its output copied back.
fn least_connections_spreads_two_concurrent_runs(
    scheme: StoreScheme,
    dataplane: Dataplane,
) -> Result<()> {
    const RUNS: usize = 2;
    const JOBS: u32 = 4;
    let world = World::new(dataplane, |_| {})?;
    let gate = Gate::new(&world.topology)?;
    let builders = remote_builder(scheme, service().ip(), JOBS);
    let batches: Vec<Vec<Derivation>> = (0..RUNS)
        .map(|_| (0..JOBS).map(|_| Derivation::behind(&gate)).collect())
        .collect();
    let running = batches
        .iter()
        .map(|batch| world.nix.spawn(batch, &builders, JOBS))
        .collect::<Result<Vec<_>>>()?;

    let started = gate.wait_started(RUNS * JOBS as usize, START_TIMEOUT)?;
    let held = count(started.iter().map(|(_, site)| site));
    gate.open()?;
    let runs = running
        .into_iter()
        .map(|run| run.wait(BUILD_TIMEOUT))
        .collect::<Result<Vec<_>>>()?;
    for run in &runs {
        world.ensure_built_where_recorded(run)?;
    }

    let expected = BTreeMap::from([
        (Site::Builder("b1".to_owned()), 4),
        (Site::Builder("b2".to_owned()), 4),
    ]);
    ensure!(
        held == expected,
        "with eight builds open at once, they ran at {held:?}"
    );
    // Not what the derivations said about themselves (their outputs hold the same
    // words as their start records), but where the outputs are: each builder's store.
    let mut stored = BTreeMap::new();
    for build in runs.iter().flat_map(|run| &run.builds) {
        let output = build.output.as_ref().context("ensure_built checked it")?;
        for builder in world.topology.builders() {
            if builder
                .store()
                .context("a topology with stores")?
                .contains(&output.path)
            {
                *stored
                    .entry(Site::Builder(builder.name().to_owned()))
                    .or_insert(0) += 1;
            }
        }
    }
    ensure!(
        stored == expected,
        "the builders' stores hold {stored:?} of the eight outputs"
    );
    world.daemon.expect_data_path(dataplane)?;
    Ok(())
}

/// `yensid mode local` while the builders are fine: the same client that just built on
/// a builder is refused (Nix says so) and builds the next derivation locally.
fn mode_local_makes_nix_build_locally(scheme: StoreScheme) -> Result<()> {
    let world = World::new(Dataplane::Kernel, |_| {})?;
    let remote = world.build_one(scheme)?;
    ensure!(
        matches!(remote.sites()[..], [Some(Site::Builder(_))]),
        "in mode auto, built at {:?}",
        remote.sites()
    );

    world.daemon.set_mode(PolicyMode::Local, None)?;
    let local = world.build_one(scheme)?;
    ensure!(
        local.sites() == [Some(&Site::Client)],
        "in mode local, built at {:?}:\n{}",
        local.sites(),
        local.stderr
    );
    ensure_refused(&local)?;
    world.daemon.expect_data_path(Dataplane::Kernel)?;
    Ok(())
}

/// Every builder's sshd killed, the daemon not told (its probes run once a minute):
/// the run still ends, having built its derivation locally after Nix lost the
/// connection (the daemon found no builder to hand it to). Once the daemon knows, the
/// next run is refused at once (RST) and builds locally too.
fn every_builder_down_nix_builds_locally(scheme: StoreScheme) -> Result<()> {
    let world = World::new(Dataplane::Kernel, slow_probes)?;
    let killed_at = SystemTime::now();
    for builder in world.topology.builders() {
        builder.sshd().kill()?;
    }
    let unknowing = world.build_one(scheme)?;
    ensure!(
        unknowing.sites() == [Some(&Site::Client)],
        "with every builder just killed, built at {:?}",
        unknowing.sites()
    );
    ensure!(
        unknowing.stderr.contains("cannot build on"),
        "Nix did not report failing to reach the service:\n{}",
        unknowing.stderr
    );

    world
        .daemon
        .wait_for_log(&["service refuses connections"], killed_at, LOG_WAIT)?;
    let refused = world.build_one(scheme)?;
    ensure!(
        refused.sites() == [Some(&Site::Client)],
        "with every builder known down, built at {:?}",
        refused.sites()
    );
    ensure_refused(&refused)
}

/// A build lands on a builder; then the builder the kernel will pick next dies, and the
/// daemon's probes are too slow to notice (they run once a minute): the next builds
/// all complete on the survivor, the first one's connection moved there before Nix saw
/// a byte.
fn builder_killed_between_builds_following_builds_go_elsewhere(scheme: StoreScheme) -> Result<()> {
    const FOLLOWING: usize = 3;
    let world = World::new(Dataplane::Kernel, slow_probes)?;
    world.build_one(scheme)?;

    let doomed = match cli::explain(world.daemon.config_path(), None, None)?.verdict()? {
        Verdict::Builder { name, .. } => name,
        other => bail!("explain before the kill: {other:?}"),
    };
    let survivor = world.other_builder(&doomed)?;
    let killed_at = SystemTime::now();
    world.topology.builder(&doomed).sshd().kill()?;

    for i in 0..FOLLOWING {
        let run = world.build_one(scheme)?;
        ensure!(
            run.sites() == [Some(&Site::Builder(survivor.clone()))],
            "build {i} after {doomed} died was built at {:?}",
            run.sites()
        );
    }
    world
        .daemon
        .wait_for_log(
            &["failing over", &format!("failed=\"{doomed}\"")],
            killed_at,
            LOG_WAIT,
        )
        .context("the first build after the kill was not sent to the dead builder")?;
    world.daemon.expect_data_path(Dataplane::Kernel)?;
    Ok(())
}

/// A build holds its builder; the operator drains that builder mid-build. The build
/// completes there and its output comes back; the next builds go to the other builder
/// (two in a row: not the rotation of a tie).
fn builder_drained_during_a_build_finishes_it(scheme: StoreScheme) -> Result<()> {
    let world = World::new(Dataplane::Kernel, |_| {})?;
    let gate = Gate::new(&world.topology)?;
    let held = Derivation::behind(&gate);
    let running = world.nix.spawn(
        std::slice::from_ref(&held),
        &remote_builder(scheme, service().ip(), 1),
        1,
    )?;
    let building_on = match &gate.wait_started(1, START_TIMEOUT)?[..] {
        [(_, Site::Builder(name))] => name.clone(),
        other => bail!("the held build runs at {other:?}"),
    };

    let drained_at = SystemTime::now();
    world.daemon.drain(&building_on)?;
    world.daemon.wait_for_log(
        &[
            "builder drained by the operator",
            &format!("builder=\"{building_on}\""),
        ],
        drained_at,
        LOG_WAIT,
    )?;
    gate.open()?;
    let run = running.wait(BUILD_TIMEOUT)?;
    world.ensure_built_where_recorded(&run)?;
    ensure!(
        run.sites() == [Some(&Site::Builder(building_on.clone()))],
        "the build held on {building_on} while it was drained was built at {:?}",
        run.sites()
    );

    let other = world.other_builder(&building_on)?;
    for i in 0..2 {
        let next = world.build_one(scheme)?;
        ensure!(
            next.sites() == [Some(&Site::Builder(other.clone()))],
            "build {i} after draining {building_on} was built at {:?}",
            next.sites()
        );
    }
    world.daemon.expect_data_path(Dataplane::Kernel)?;
    Ok(())
}

/// Probes once a minute: a builder's death is found by the connection it fails.
fn slow_probes(config: &mut DaemonConfig) {
    config.health = Some(HealthConfig {
        interval: Some(Duration::from_secs(60)),
        ..HealthConfig::default()
    });
}

/// Fails unless Nix reports that the service refused the connection (RST).
fn ensure_refused(run: &NixRun) -> Result<()> {
    ensure!(
        run.stderr.contains("cannot build on") && run.stderr.contains("Connection refused"),
        "Nix did not report a refusal by the service:\n{}",
        run.stderr
    );
    Ok(())
}

/// How many of `sites` are each site.
fn count<'a>(sites: impl Iterator<Item = &'a Site>) -> BTreeMap<Site, usize> {
    let mut counts = BTreeMap::new();
    for site in sites {
        *counts.entry(site.clone()).or_default() += 1;
    }
    counts
}
