//! When the pool must not be used, the kernel answers the SYN with RST: the client sees
//! ECONNREFUSED at once and Nix builds locally.

mod common;

use std::time::Duration;

use anyhow::{Result, ensure};
use yensid_tests::wait::wait_until;
use yensid_tests::{
    ConnectAttempt, Daemon, DaemonConfig, Dataplane, PolicyMode, Strategy, Topology, service,
};

common::dataplane_tests!(
    full_pool_refuses_until_a_slot_frees,
    local_mode_refuses_until_switched_to_remote,
);

/// Both builders at max_connections: the next connection is refused. Once one held
/// connection closes, connections are accepted again, on the builder it freed.
fn full_pool_refuses_until_a_slot_frees(dataplane: Dataplane) -> Result<()> {
    let topology = Topology::new(2)?;
    let mut config = DaemonConfig::for_topology(&topology, dataplane, Strategy::LeastConnections);
    for builder in &mut config.builders {
        builder.max_connections = Some(2);
    }
    let daemon = Daemon::start(topology.client_ns(), &config)?;
    let raw = topology.raw_client();

    let mut held = (0..4)
        .map(|_| raw.open_ssh(service()))
        .collect::<Result<Vec<_>>>()?;
    for _ in 0..3 {
        let attempt = raw.connect(service());
        ensure!(
            attempt.is_refused(),
            "a connection beyond every builder's max_connections was not refused: {attempt:?}"
        );
    }

    let freed = held.pop().expect("four held connections");
    let freed_builder = freed.served_by().to_owned();
    freed.close()?;
    // Refused attempts change nothing, so polling until the slot is back is safe.
    let mut accepted = None;
    wait_until(
        "a connection to be accepted after one slot freed",
        Duration::from_secs(20),
        || match raw.connect(service()) {
            ConnectAttempt::Accepted(stream) => {
                accepted = Some(stream);
                Ok(true)
            }
            ConnectAttempt::Refused => Ok(false),
            other => anyhow::bail!("neither accepted nor refused: {other:?}"),
        },
    )?;
    let conn = yensid_tests::SshConnection::handshake(accepted.expect("accepted above"))?;
    ensure!(
        conn.served_by() == freed_builder,
        "the freed slot was on {freed_builder}, but the connection went to {} (full)",
        conn.served_by()
    );
    drop((conn, held));
    daemon.expect_data_path(dataplane)?;
    Ok(())
}

/// `[policy] mode = "local"` refuses every connection; reloading with "remote" serves
/// again, so the refusal came from the policy and not from a broken daemon.
fn local_mode_refuses_until_switched_to_remote(dataplane: Dataplane) -> Result<()> {
    let topology = Topology::new(2)?;
    let mut config = DaemonConfig::for_topology(&topology, dataplane, Strategy::RoundRobin);
    config.policy_mode = Some(PolicyMode::Local);
    let mut daemon = Daemon::start(topology.client_ns(), &config)?;
    let raw = topology.raw_client();

    for _ in 0..3 {
        let attempt = raw.connect(service());
        ensure!(
            attempt.is_refused(),
            "mode local did not refuse: {attempt:?}"
        );
    }

    config.policy_mode = Some(PolicyMode::Remote);
    daemon.reload(&config)?;
    wait_until(
        "mode remote to accept connections after the reload",
        Duration::from_secs(20),
        || Ok(!raw.connect(service()).is_refused()),
    )?;
    let builder = raw.banner(service())?;
    ensure!(
        builder == "b1" || builder == "b2",
        "mode remote: served by {builder}"
    );
    daemon.expect_data_path(dataplane)?;
    Ok(())
}
