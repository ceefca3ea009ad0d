//! How each strategy spreads connections over the pool. Every connection is a raw TCP
//! client that exchanges SSH identification lines; the builder's banner names it.

mod common;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use yensid_tests::cli::{self, Verdict};
use yensid_tests::wait::wait_until;
use yensid_tests::{Daemon, DaemonConfig, Dataplane, HealthConfig, Strategy, Topology, service};

/// Only against hangs.
const WAIT: Duration = Duration::from_secs(30);

common::dataplane_tests!(
    least_connections_fills_the_emptiest_builder,
    least_connections_follows_weights,
    round_robin_alternates,
    round_robin_follows_weights,
    random_follows_weights,
    source_affinity_keeps_clients_and_moves_only_the_removed_builders,
    priority_fills_in_list_order_then_spills,
);

/// Open A and keep it, open B, close B, open C: C goes where B was.
fn least_connections_fills_the_emptiest_builder(dataplane: Dataplane) -> Result<()> {
    let topology = Topology::new(2)?;
    let config = DaemonConfig::for_topology(&topology, dataplane, Strategy::LeastConnections);
    let daemon = Daemon::start(topology.client_ns(), &config)?;
    let raw = topology.raw_client();

    let a = raw.open_ssh(service())?;
    let b = raw.open_ssh(service())?;
    ensure!(
        a.served_by() != b.served_by(),
        "A and B both went to {} although the other builder was idle",
        a.served_by()
    );
    let freed = b.served_by().to_owned();
    b.close()?;
    // The daemon counts the close (and tells the kernel) once both sides are gone; the
    // kernel chooses C by those counts.
    daemon.wait_for_status(&format!("{freed} to have no open connection"), WAIT, |s| {
        Ok(s.active(&freed)? == 0)
    })?;
    let c = raw.open_ssh(service())?;
    ensure!(
        c.served_by() == freed,
        "C went to {} (busy with A) instead of {freed}, which B had freed",
        c.served_by()
    );
    drop((a, c));
    daemon.expect_data_path(dataplane)?;
    Ok(())
}

/// With weights 2:1 and connections held open, every new connection goes to the
/// builder with the fewest connections per unit of weight, so the held connections
/// end up exactly 2:1.
fn least_connections_follows_weights(dataplane: Dataplane) -> Result<()> {
    let topology = Topology::new(2)?;
    let mut config = DaemonConfig::for_topology(&topology, dataplane, Strategy::LeastConnections);
    config.builder_mut("b1").weight = Some(2);
    let daemon = Daemon::start(topology.client_ns(), &config)?;
    let raw = topology.raw_client();

    let held = (0..9)
        .map(|_| raw.open_ssh(service()))
        .collect::<Result<Vec<_>>>()?;
    let counts = tally(held.iter().map(|c| c.served_by()));
    ensure!(
        counts == tally(["b1"; 6].into_iter().chain(["b2"; 3])),
        "9 held connections with weights b1=2 b2=1 split {counts:?}"
    );
    drop(held);
    daemon.expect_data_path(dataplane)?;
    Ok(())
}

/// Equal weights: sequential connections alternate strictly.
fn round_robin_alternates(dataplane: Dataplane) -> Result<()> {
    let topology = Topology::new(2)?;
    let config = DaemonConfig::for_topology(&topology, dataplane, Strategy::RoundRobin);
    let daemon = Daemon::start(topology.client_ns(), &config)?;

    let served = topology.raw_client().banners(service(), 20)?;
    ensure!(
        served.windows(2).all(|pair| pair[0] != pair[1]),
        "round-robin did not alternate: {served:?}"
    );
    daemon.expect_data_path(dataplane)?;
    Ok(())
}

/// Weights 2:1: 30 sequential connections split 20:10 (one either way for where the
/// cycle starts), interleaved: the lighter builder never gets two in a row.
fn round_robin_follows_weights(dataplane: Dataplane) -> Result<()> {
    let topology = Topology::new(2)?;
    let mut config = DaemonConfig::for_topology(&topology, dataplane, Strategy::RoundRobin);
    config.builder_mut("b1").weight = Some(2);
    let daemon = Daemon::start(topology.client_ns(), &config)?;

    let served = topology.raw_client().banners(service(), 30)?;
    let b1 = served.iter().filter(|s| *s == "b1").count();
    ensure!(
        (19..=21).contains(&b1) && b1 + served.iter().filter(|s| *s == "b2").count() == 30,
        "weights 2:1 gave b1 {b1} of 30: {served:?}"
    );
    ensure!(
        !served
            .windows(2)
            .any(|pair| pair[0] == "b2" && pair[1] == "b2"),
        "b2 (weight 1) got two in a row: {served:?}"
    );
    daemon.expect_data_path(dataplane)?;
    Ok(())
}

/// Weights 3:1 over 1000 connections: b1 gets 75% ± 5 points (the binomial standard
/// deviation is 1.4 points, so this fails by chance about once in 3000 runs).
fn random_follows_weights(dataplane: Dataplane) -> Result<()> {
    let topology = Topology::new(2)?;
    let mut config = DaemonConfig::for_topology(&topology, dataplane, Strategy::Random);
    config.builder_mut("b1").weight = Some(3);
    let daemon = Daemon::start(topology.client_ns(), &config)?;

    let served = topology.raw_client().banners(service(), 1000)?;
    let counts = tally(served.iter().map(String::as_str));
    let b1 = counts.get("b1").copied().unwrap_or(0);
    ensure!(
        (700..=800).contains(&b1) && counts.len() == 2,
        "weights 3:1 over 1000 connections gave {counts:?}"
    );
    daemon.expect_data_path(dataplane)?;
    Ok(())
}

/// 24 client addresses over 3 builders: each address keeps its builder. Then the
/// builder with most clients leaves the config (SIGHUP): its clients move, every other
/// client stays where it was.
fn source_affinity_keeps_clients_and_moves_only_the_removed_builders(
    dataplane: Dataplane,
) -> Result<()> {
    let topology = Topology::new(3)?;
    let mut config = DaemonConfig::for_topology(&topology, dataplane, Strategy::SourceAffinity);
    let mut daemon = Daemon::start(topology.client_ns(), &config)?;
    let sources = (1..=24)
        .map(|i| topology.add_client_address(i))
        .collect::<Result<Vec<_>>>()?;

    let before = affinity(&topology, &sources)?;
    let per_builder = tally(before.values().map(String::as_str));
    ensure!(
        per_builder.len() >= 2,
        "24 client addresses all went to one builder: {per_builder:?}"
    );
    let (removed, _) = per_builder
        .iter()
        .max_by_key(|(_, clients)| **clients)
        .map(|(b, n)| ((*b).to_owned(), *n))
        .expect("at least one builder has clients");

    config.remove_builder(&removed);
    daemon.reload(&config)?;
    let moved_client = before
        .iter()
        .find(|(_, builder)| **builder == removed)
        .map(|(source, _)| *source)
        .expect("the removed builder had clients");
    wait_until(
        &format!("{removed}'s client {moved_client} to move after the reload"),
        WAIT,
        || {
            Ok(topology
                .raw_client()
                .from_source(moved_client)
                .banner(service())?
                != removed)
        },
    )?;

    let after = affinity(&topology, &sources)?;
    for (source, old) in &before {
        let new = &after[source];
        if *old == removed {
            ensure!(new != &removed, "{source} still goes to removed {removed}");
        } else {
            ensure!(
                new == old,
                "{source} moved from {old} to {new} although only {removed} left"
            );
        }
    }
    daemon.expect_data_path(dataplane)?;
    Ok(())
}

/// Priority, list order b2 then b1 (not name order), b2 capped at 3: the first three
/// connections fill b2, the next ones spill to b1.
fn priority_fills_in_list_order_then_spills(dataplane: Dataplane) -> Result<()> {
    let topology = Topology::new(2)?;
    let mut config = DaemonConfig::for_topology(&topology, dataplane, Strategy::Priority);
    config.service_mut().builders = Some(vec!["b2".to_owned(), "b1".to_owned()]);
    config.builder_mut("b2").max_connections = Some(3);
    let daemon = Daemon::start(topology.client_ns(), &config)?;
    let raw = topology.raw_client();

    let held = (0..5)
        .map(|_| raw.open_ssh(service()))
        .collect::<Result<Vec<_>>>()?;
    let served: Vec<&str> = held.iter().map(|c| c.served_by()).collect();
    ensure!(
        served == ["b2", "b2", "b2", "b1", "b1"],
        "priority b2 (max 3) then b1 served {served:?}"
    );
    drop(held);
    daemon.expect_data_path(dataplane)?;
    Ok(())
}

/// The builder each source address is sent to, checked three times per address.
fn affinity(topology: &Topology, sources: &[IpAddr]) -> Result<BTreeMap<IpAddr, String>> {
    sources
        .iter()
        .map(|&source| {
            let served = topology
                .raw_client()
                .from_source(source)
                .banners(service(), 3)?;
            ensure!(
                served.iter().all(|s| *s == served[0]),
                "{source} did not keep its builder: {served:?}"
            );
            Ok((source, served[0].clone()))
        })
        .collect()
}

fn tally<'a>(names: impl IntoIterator<Item = &'a str>) -> BTreeMap<&'a str, usize> {
    let mut counts = BTreeMap::new();
    for name in names {
        *counts.entry(name).or_insert(0) += 1;
    }
    counts
}

/// Source-affinity's fallback: a client whose slot belongs to b1 goes to b1; while b1
/// is drained, down (sshd killed) or full (at max_connections), that client goes to b2
/// by least connections and `explain --from` says so (the slot belongs to b1, which is
/// not available); when b1 is back, so is the client.
#[test]
fn source_affinity_falls_back_when_its_builder_is_drained_down_or_full() -> Result<()> {
    if !yensid_tests::privileged_or_skip(
        "strategies::source_affinity_falls_back_when_its_builder_is_drained_down_or_full",
    ) {
        return Ok(());
    }
    let topology = Topology::new(2)?;
    let mut config =
        DaemonConfig::for_topology(&topology, Dataplane::Kernel, Strategy::SourceAffinity);
    config.builder_mut("b1").max_connections = Some(1);
    config.health = Some(HealthConfig {
        interval: Some(Duration::from_millis(200)),
        max_interval: Some(Duration::from_secs(1)),
        ..HealthConfig::default()
    });
    let daemon = Daemon::start(topology.client_ns(), &config)?;
    let file = daemon.config_path();
    // A client address whose affinity slot belongs to b1.
    let mut client = None;
    for octet in 1..=32 {
        let source = topology.add_client_address(octet)?;
        if let Verdict::Builder { name, .. } =
            cli::explain(file, Some("ssh"), Some(source))?.verdict()?
            && name == "b1"
        {
            client = Some(source);
            break;
        }
    }
    let client = client.context("none of 32 client addresses hashes to a slot of b1")?;
    let raw = topology.raw_client().from_source(client);
    let expect = |builder: &str, fallback: bool, when: &str| -> Result<()> {
        let explained = cli::explain(file, Some("ssh"), Some(client))?;
        match explained.verdict()? {
            Verdict::Builder { name, why }
                if name == builder
                    && why.contains("belongs to b1, which is not available") == fallback => {}
            other => bail!("{when}: explain --from {client}: {other:?}"),
        }
        let served = raw.banner(service())?;
        ensure!(served == builder, "{when}: {client} was served by {served}");
        Ok(())
    };
    expect("b1", false, "b1 available")?;

    daemon.drain("b1")?;
    daemon.wait_for_status("b1 draining", WAIT, |s| {
        Ok(s.builder_state("b1")? == "draining")
    })?;
    expect("b2", true, "b1 drained")?;
    daemon.undrain("b1")?;
    daemon.wait_for_status("b1 healthy", WAIT, |s| {
        Ok(s.builder_state("b1")? == "healthy")
    })?;
    expect("b1", false, "b1 undrained")?;

    topology.builder("b1").sshd().kill()?;
    daemon.wait_for_status("b1 down", WAIT, |s| {
        Ok(s.builder_state("b1")? == "unhealthy")
    })?;
    expect("b2", true, "b1 down")?;
    topology.builder("b1").sshd().restart()?;
    daemon.wait_for_status("b1 healthy", WAIT, |s| {
        Ok(s.builder_state("b1")? == "healthy")
    })?;
    expect("b1", false, "b1 back")?;

    // The last connection to b1 has ended (b1 has its one slot free again).
    daemon.wait_for_status("b1 idle", WAIT, |s| Ok(s.active("b1")? == 0))?;
    let held = raw.open_ssh(service())?;
    ensure!(
        held.served_by() == "b1",
        "the held connection went to {}",
        held.served_by()
    );
    daemon.wait_for_status("b1 full", WAIT, |s| Ok(s.builder_state("b1")? == "full"))?;
    expect("b2", true, "b1 full")?;
    held.close()?;
    daemon.wait_for_status("b1 free", WAIT, |s| Ok(s.builder_state("b1")? == "healthy"))?;
    expect("b1", false, "b1 free again")?;
    daemon.expect_data_path(Dataplane::Kernel)?;
    Ok(())
}
