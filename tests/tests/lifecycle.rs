//! The daemon's life: coexisting with the host's sshd, dying (SIGKILL), stopping
//! (SIGTERM) and reloading (SIGHUP) under live sessions.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, SystemTime};

use anyhow::{Result, bail, ensure};
use yensid_tests::wait::wait_until;
use yensid_tests::{
    ConnectAttempt, Daemon, DaemonConfig, Dataplane, Launch, LiveSession, SshConnection, Strategy,
    Topology, service,
};

common::dataplane_tests!(
    host_sshd_keeps_everything_unclaimed,
    sigkill_leaves_claimed_traffic_refused,
    sigterm_exits_cleanly_and_detaches,
    sigint_exits_cleanly_and_detaches,
    sighup_reload_keeps_live_session,
    sighup_removing_its_builder_keeps_live_session,
);

fn localhost_ssh() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, 22))
}

/// Host sshd on 0.0.0.0:22: 127.0.0.22:22 reaches the builders, every other address
/// the host sshd, for raw clients and real ssh sessions alike.
fn host_sshd_keeps_everything_unclaimed(dataplane: Dataplane) -> Result<()> {
    let mut topology = Topology::new(2)?;
    topology.start_host_sshd()?;
    let config = DaemonConfig::for_topology(&topology, dataplane, Strategy::RoundRobin);
    let daemon = Daemon::start(topology.client_ns(), &config)?;
    let raw = topology.raw_client();
    let veth_end = SocketAddr::from((topology.builders()[0].gateway(), 22));

    for _ in 0..5 {
        let claimed = raw.banner(service())?;
        ensure!(is_builder(&claimed), "127.0.0.22:22 served by {claimed}");
        ensure!(
            raw.banner(localhost_ssh())? == "host",
            "127.0.0.1:22 left the host"
        );
        ensure!(raw.banner(veth_end)? == "host", "{veth_end} left the host");
    }
    let ssh = topology.ssh_client()?;
    let claimed = ssh.served_by(service())?;
    ensure!(
        is_builder(&claimed),
        "ssh to 127.0.0.22 served by {claimed}"
    );
    ensure!(ssh.served_by(localhost_ssh())? == "host");
    daemon.expect_data_path(dataplane)?;
    Ok(())
}

/// After `kill -9`, the pinned dispatch refuses claimed connections at once: never a
/// hang, never the host sshd. Unclaimed traffic still reaches the host sshd.
fn sigkill_leaves_claimed_traffic_refused(dataplane: Dataplane) -> Result<()> {
    let (topology, mut daemon) = claiming_in_front_of_host_sshd(dataplane, "before the kill")?;
    let raw = topology.raw_client();

    daemon.expect_data_path(dataplane)?;
    daemon.kill9()?;
    for i in 0..20 {
        match raw.connect(service()) {
            ConnectAttempt::Refused => {}
            ConnectAttempt::Accepted(stream) => {
                let answer = SshConnection::handshake(stream)
                    .map(|c| c.served_by().to_owned())
                    .unwrap_or_else(|e| format!("nobody ({e:#})"));
                bail!("after kill -9, connection {i} was accepted and answered by {answer}");
            }
            other => bail!("after kill -9, connection {i} was not refused: {other:?}"),
        }
    }
    let error = topology
        .ssh_client()?
        .served_by(service())
        .expect_err("ssh got a session after kill -9");
    ensure!(
        format!("{error:#}").contains("Connection refused"),
        "ssh after kill -9 failed otherwise than refused: {error:#}"
    );
    ensure!(raw.banner(localhost_ssh())? == "host");
    Ok(())
}

fn sigterm_exits_cleanly_and_detaches(dataplane: Dataplane) -> Result<()> {
    exits_cleanly_and_detaches(dataplane, Daemon::stop, "SIGTERM")
}

fn sigint_exits_cleanly_and_detaches(dataplane: Dataplane) -> Result<()> {
    exits_cleanly_and_detaches(dataplane, Daemon::interrupt, "SIGINT")
}

/// SIGTERM or SIGINT (`stop`, named `signal`), with a live session: exit status 0, pin
/// directory gone, and nothing attached any more: the service address falls back to
/// the host sshd like any unclaimed address.
fn exits_cleanly_and_detaches(
    dataplane: Dataplane,
    stop: fn(&mut Daemon) -> Result<std::process::ExitStatus>,
    signal: &str,
) -> Result<()> {
    let (topology, mut daemon) =
        claiming_in_front_of_host_sshd(dataplane, &format!("before {signal}"))?;
    let raw = topology.raw_client();

    daemon.expect_data_path(dataplane)?;
    let status = stop(&mut daemon)?;
    ensure!(status.code() == Some(0), "exit after {signal}: {status}");
    ensure!(
        !daemon.pin_path().exists(),
        "{} still exists after a clean stop",
        daemon.pin_path().display()
    );
    let after = raw.banner(service())?;
    ensure!(
        after == "host",
        "after a clean stop 127.0.0.22:22 is served by {after}, so dispatch is still attached"
    );
    Ok(())
}

/// A session open across a reload that adds a builder completes normally; the reload
/// did happen (the new builder gets connections).
fn sighup_reload_keeps_live_session(dataplane: Dataplane) -> Result<()> {
    let topology = Topology::new(3)?;
    let mut config = DaemonConfig::for_topology(&topology, dataplane, Strategy::RoundRobin);
    config.service_mut().builders = Some(vec!["b1".to_owned(), "b2".to_owned()]);
    let mut daemon = Daemon::start(topology.client_ns(), &config)?;
    let ssh = topology.ssh_client()?;
    let mut session = LiveSession::start(&ssh, service())?;

    config.service_mut().builders = None;
    daemon.reload(&config)?;
    let raw = topology.raw_client();
    wait_until(
        "b3 to get connections after the reload added it",
        Duration::from_secs(20),
        || Ok(raw.banner(service())? == "b3"),
    )?;

    session.finish()?;
    let fresh = ssh.served_by(service())?;
    ensure!(is_builder(&fresh), "after the reload, served by {fresh}");
    daemon.expect_data_path(dataplane)?;
    Ok(())
}

/// A session open across a reload that removes its own builder from the config
/// completes normally: reloads never drop spliced connections.
fn sighup_removing_its_builder_keeps_live_session(dataplane: Dataplane) -> Result<()> {
    let topology = Topology::new(2)?;
    let mut config = DaemonConfig::for_topology(&topology, dataplane, Strategy::RoundRobin);
    let mut daemon = Daemon::start(topology.client_ns(), &config)?;
    let ssh = topology.ssh_client()?;
    let mut session = LiveSession::start(&ssh, service())?;
    let other = if session.builder() == "b1" {
        "b2"
    } else {
        "b1"
    };

    config.remove_builder(session.builder());
    daemon.reload(&config)?;
    let raw = topology.raw_client();
    // Round-robin alternates while both builders are in; four in a row on the other
    // one means the reload has taken effect.
    wait_until(
        &format!("{} to leave the rotation", session.builder()),
        Duration::from_secs(20),
        || Ok(raw.banners(service(), 4)?.iter().all(|b| b == other)),
    )?;

    session.finish()?;
    daemon.expect_data_path(dataplane)?;
    Ok(())
}

/// Two builders and the host's own sshd, with a round-robin daemon in front whose
/// claimed address is answered by a builder (checked, `when` names the moment).
fn claiming_in_front_of_host_sshd(dataplane: Dataplane, when: &str) -> Result<(Topology, Daemon)> {
    let mut topology = Topology::new(2)?;
    topology.start_host_sshd()?;
    let config = DaemonConfig::for_topology(&topology, dataplane, Strategy::RoundRobin);
    let daemon = Daemon::start(topology.client_ns(), &config)?;
    let claimed = topology.raw_client().banner(service())?;
    ensure!(is_builder(&claimed), "{when}, served by {claimed}");
    Ok((topology, daemon))
}

fn is_builder(name: &str) -> bool {
    name.len() > 1 && name.starts_with('b') && name[1..].bytes().all(|b| b.is_ascii_digit())
}

/// The daemon mounts bpffs itself when /sys/fs/bpf is not one: started in a private
/// mount namespace where /sys/fs/bpf is unmounted (the host's bpffs, and every other
/// test's pins, stay untouched), it logs `mounted bpffs`, pins there, claims the
/// address and splices a real ssh session; its pins are not in the host's bpffs.
#[test]
fn daemon_mounts_bpffs_itself() -> Result<()> {
    if !yensid_tests::privileged_or_skip("lifecycle::daemon_mounts_bpffs_itself") {
        return Ok(());
    }
    let topology = Topology::new(1)?;
    let config = DaemonConfig::for_topology(&topology, Dataplane::Kernel, Strategy::RoundRobin);
    let private_sys_fs_bpf = Launch {
        outer: [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "--",
            "/bin/sh",
            "-c",
            // Every bpffs stacked on /sys/fs/bpf, in this mount namespace only.
            r#"while umount /sys/fs/bpf 2>/dev/null; do :; done; exec "$@""#,
            "sh",
        ]
        .map(str::to_owned)
        .to_vec(),
        inner: Vec::new(),
    };
    let mut daemon = Daemon::start_wrapped(topology.client_ns(), &config, private_sys_fs_bpf)?;
    daemon.wait_for_log(
        &["mounted bpffs", "/sys/fs/bpf"],
        SystemTime::UNIX_EPOCH,
        Duration::from_secs(30),
    )?;
    let status = daemon.status()?;
    ensure!(
        status.json()["bpf"] == true && status.json()["dataplane"] == "kernel",
        "status with a bpffs of its own: {}",
        status.json()
    );
    ensure!(
        !daemon.pin_path().exists(),
        "the pins landed in the host's bpffs at {}",
        daemon.pin_path().display()
    );
    let served = topology.ssh_client()?.served_by(service())?;
    ensure!(served == "b1", "served by {served}");
    daemon.expect_data_path(Dataplane::Kernel)?;
    let exit = daemon.stop()?;
    ensure!(exit.success(), "clean stop: {exit}");
    Ok(())
}
