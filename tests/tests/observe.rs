//! The kernel's view of each builder's path (issue 5): the `observe` sock_ops program
//! measures TCP's round-trip time and retransmissions on the daemon's own connections to
//! the builders, while they carry builds. Checked through `yensid status --json` and
//! `yensid maps --json` against paths the tests make slow (a token bucket on the link)
//! or lossy (an nftables rule dropping every n-th data packet), and through the
//! `max_rtt_ms` rule, which must follow the kernel's RTT of a live connection rather
//! than the last health probe's.

mod common;

use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use yensid_tests::cli::{self, Verdict};
use yensid_tests::{
    Daemon, DaemonConfig, Dataplane, HealthConfig, LinkRules, LiveSession, RandomFile, Strategy,
    Topology, service,
};

common::dataplane_tests!(
    rtt_is_measured_while_a_session_lives,
    retransmissions_to_a_lossy_builder_are_counted,
    max_rtt_ms_follows_the_kernels_rtt_of_live_connections,
);

/// Only against hangs.
const WAIT: Duration = Duration::from_secs(30);
const SERVICE: &str = "ssh";

/// `key` of `builder`: a number or null; a missing field is an error.
fn builder_f64(doc: &Value, builder: &str, key: &str) -> Result<Option<f64>> {
    cli::opt_f64_at(cli::builder(doc, builder)?, key)
}

fn builder_u64(doc: &Value, builder: &str, key: &str) -> Result<u64> {
    cli::u64_at(cli::builder(doc, builder)?, key)
}

/// The `PATH_STATS` entry `yensid maps --json` shows for the builder with kernel index
/// `index`.
fn path_stats(maps: &Value, index: u64) -> Result<Option<Value>> {
    let entries = maps
        .get("path_stats")
        .and_then(Value::as_array)
        .with_context(|| format!("no path_stats in {maps}"))?;
    Ok(entries.iter().find(|e| e[0] == index).map(|e| e[1].clone()))
}

/// A session that stays open is measured while it lives (not when it closes): its
/// builder gets a kernel RTT and RTT samples in `status`, and the pinned `PATH_STATS`
/// map holds them; the idle builder has none.
fn rtt_is_measured_while_a_session_lives(dataplane: Dataplane) -> Result<()> {
    let topology = Topology::new(2)?;
    let config = DaemonConfig::for_topology(&topology, dataplane, Strategy::Priority);
    let daemon = Daemon::start(topology.client_ns(), &config)?;
    let file = daemon.config_path();
    let before = cli::status_json(file)?;
    ensure!(
        before["path_measurement"] == "kernel",
        "the kernel does not measure paths: {before}"
    );
    for b in ["b1", "b2"] {
        ensure!(
            builder_f64(&before, b, "kernel_rtt_ms")?.is_none()
                && builder_u64(&before, b, "rtt_samples")? == 0,
            "{b} has a kernel RTT before any connection: {before}"
        );
    }

    let ssh = topology.ssh_client()?;
    let mut session = LiveSession::start(&ssh, service())?;
    ensure!(
        session.builder() == "b1",
        "priority chose {}",
        session.builder()
    );
    let doc = cli::wait_for_status(file, "a kernel RTT for b1's live session", WAIT, |d| {
        Ok(builder_u64(d, "b1", "rtt_samples")? > 0)
    })?;
    ensure!(
        builder_u64(&doc, "b1", "active")? == 1,
        "the sample must come from the live session: {doc}"
    );
    let rtt = builder_f64(&doc, "b1", "kernel_rtt_ms")?.context("no kernel_rtt_ms")?;
    ensure!(
        rtt > 0.0 && rtt < 1000.0,
        "b1's kernel RTT over a veth: {rtt} ms"
    );
    ensure!(
        builder_f64(&doc, "b2", "kernel_rtt_ms")?.is_none()
            && builder_u64(&doc, "b2", "rtt_samples")? == 0,
        "b2 served nothing, yet: {doc}"
    );

    let maps = cli::maps_json(file)?;
    let index = builder_index(&maps, &topology, "b1")?;
    let stats =
        path_stats(&maps, index)?.with_context(|| format!("no PATH_STATS for b1: {maps}"))?;
    ensure!(
        cli::u64_at(&stats, "samples")? > 0 && cli::u64_at(&stats, "srtt_us")? > 0,
        "b1's pinned path stats: {stats}"
    );
    session.finish()?;
    daemon.expect_data_path(dataplane)?;
    Ok(())
}

/// The kernel index of `builder`, found through its address in the backend list.
fn builder_index(maps: &Value, topology: &Topology, builder: &str) -> Result<u64> {
    let position = topology
        .builders()
        .iter()
        .position(|b| b.name() == builder)
        .with_context(|| format!("no {builder}"))?;
    let backends = cli::backend_builders(maps, 0)?;
    backends
        .get(position)
        .copied()
        .with_context(|| format!("no backend at position {position}: {maps}"))
}

/// A builder that loses every fifth data packet makes the daemon's connection to it
/// retransmit, and the kernel counts those retransmissions for that builder only; the
/// upload still arrives whole.
fn retransmissions_to_a_lossy_builder_are_counted(dataplane: Dataplane) -> Result<()> {
    let topology = Topology::new(2)?;
    let config = DaemonConfig::for_topology(&topology, dataplane, Strategy::Priority);
    let daemon = Daemon::start(topology.client_ns(), &config)?;
    let file = daemon.config_path();
    topology.lose_data_packets("b1", 5)?;
    let payload = RandomFile::create(2 << 20)?;
    let ssh = topology.ssh_client()?;
    let served = ssh.upload_checked(
        service(),
        payload.path(),
        payload.sha256(),
        Duration::from_secs(120),
    )?;
    ensure!(
        served == "b1",
        "the upload through a lossy link went to {served}, not b1"
    );
    let doc = cli::wait_for_status(file, "b1's retransmissions counted", WAIT, |d| {
        Ok(builder_u64(d, "b1", "retransmits")? > 0)
    })?;
    ensure!(
        builder_u64(&doc, "b2", "retransmits")? == 0,
        "b2 lost nothing, yet: {doc}"
    );
    daemon.expect_data_path(dataplane)?;
    Ok(())
}

/// With `max_rtt_ms = 100`, an upload over a throttled link to b1 (100 kbit/s, so
/// every queued packet adds 120 ms) drives the kernel's RTT of that live connection far
/// above the limit: b1 is excluded for the kernel's RTT, `explain` and the next session
/// go to b2 although priority prefers b1, and the upload itself completes.
fn max_rtt_ms_follows_the_kernels_rtt_of_live_connections(dataplane: Dataplane) -> Result<()> {
    let topology = Topology::new(2)?;
    let mut config = DaemonConfig::for_topology(&topology, dataplane, Strategy::Priority);
    config.services[0].policy = Some(LinkRules {
        max_rtt_ms: Some(100),
        ..LinkRules::default()
    });
    config.health = Some(HealthConfig {
        interval: Some(Duration::from_millis(500)),
        ..HealthConfig::default()
    });
    let daemon = Daemon::start(topology.client_ns(), &config)?;
    let file = daemon.config_path();
    cli::wait_for_status(file, "both builders eligible", WAIT, |d| {
        let members = cli::service(d, SERVICE)?["members"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        Ok(members.len() == 2
            && members
                .iter()
                .map(|m| cli::is_null_at(m, "excluded"))
                .collect::<Result<Vec<_>>>()?
                .into_iter()
                .all(|eligible| eligible))
    })?;

    topology.throttle("b1", 100)?;
    let payload = RandomFile::create(48 << 10)?;
    let ssh = topology.ssh_client()?;
    let upload = {
        let ssh = topology.ssh_client()?;
        let path = payload.path().to_owned();
        let sha256 = payload.sha256().to_owned();
        thread::spawn(move || {
            ssh.upload_checked(service(), &path, &sha256, Duration::from_secs(120))
        })
    };
    let doc = cli::wait_for_status(file, "b1 excluded for its kernel RTT", WAIT, |d| {
        let members = cli::service(d, SERVICE)?["members"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        Ok(members.iter().any(|m| {
            m["builder"] == "b1"
                && m["excluded"]
                    .as_str()
                    .is_some_and(|e| e.starts_with("kernel round-trip time"))
        }))
    })?;
    ensure!(
        builder_f64(&doc, "b1", "kernel_rtt_ms")?.is_some_and(|r| r > 100.0),
        "b1 excluded, but its kernel RTT: {doc}"
    );
    let explanation = cli::explain(file, Some(SERVICE), None)?;
    ensure!(
        matches!(explanation.verdict()?, Verdict::Builder { ref name, .. } if name == "b2")
            && explanation
                .member_line("b1")?
                .contains("kernel round-trip time"),
        "explain after b1's exclusion:\n{}",
        explanation.text()
    );
    let next = ssh.served_by(service())?;
    ensure!(next == "b2", "the next session went to {next}, not b2");
    let served = upload
        .join()
        .map_err(|_| anyhow::anyhow!("upload thread panicked"))??;
    ensure!(
        served == "b1",
        "the upload went to {served}, not the slow b1"
    );
    daemon.expect_data_path(dataplane)?;
    Ok(())
}
