//! Self-checks of the harness itself, without the daemon: if these fail, every other
//! test's verdict is meaningless.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use yensid_tests::{ConnectAttempt, KnownHosts, Topology, privileged_or_skip, service};

macro_rules! privileged {
    ($name:literal) => {
        if !privileged_or_skip(concat!("harness::", $name)) {
            return Ok(());
        }
    };
}

/// A real ssh session straight to each builder: strict host key checking against the
/// generated keys, the `SetEnv` name in the session and the `VersionAddendum` in the
/// banner.
#[test]
fn ssh_session_direct_to_each_builder() -> Result<()> {
    privileged!("ssh_session_direct_to_each_builder");
    let topology = Topology::new(2)?;
    let ssh = topology.ssh_client()?;
    let raw = topology.raw_client();
    for builder in topology.builders() {
        assert_eq!(ssh.served_by(builder.ssh_addr())?, builder.name());
        let conn = raw.open_ssh(builder.ssh_addr())?;
        assert!(
            conn.banner().starts_with("SSH-2.0-OpenSSH"),
            "{}",
            conn.banner()
        );
        assert_eq!(conn.served_by(), builder.name());
        conn.close()?;
    }
    Ok(())
}

/// Both builders' keys under one name is what the pool tests rely on; the wrong key
/// alone must be rejected, or "StrictHostKeyChecking yes" proves nothing.
#[test]
fn known_hosts_is_enforced() -> Result<()> {
    privileged!("known_hosts_is_enforced");
    let topology = Topology::new(2)?;
    let [b1, b2] = topology.builders() else {
        unreachable!()
    };
    let mut both = KnownHosts::new();
    both.add(b1.ssh_addr(), b2.host_key())
        .add(b1.ssh_addr(), b1.host_key());
    assert_eq!(
        topology.ssh_client_with(&both)?.served_by(b1.ssh_addr())?,
        "b1"
    );

    let mut wrong = KnownHosts::new();
    wrong.add(b1.ssh_addr(), b2.host_key());
    let refused = topology.ssh_client_with(&wrong)?.served_by(b1.ssh_addr());
    let error = format!(
        "{:#}",
        refused.expect_err("ssh accepted an unknown host key")
    );
    assert!(error.contains("Host key verification failed"), "{error}");
    Ok(())
}

/// Refused (RST) and timed out (no answer) must be told apart: the refusal tests
/// depend on it.
#[test]
fn refused_and_timed_out_are_distinct() -> Result<()> {
    privileged!("refused_and_timed_out_are_distinct");
    let topology = Topology::new(1)?;
    let builder = &topology.builders()[0];
    let raw = topology.raw_client();

    let closed_port = SocketAddr::new(IpAddr::V4(builder.address()), 2);
    let attempt = raw.connect(closed_port);
    assert!(attempt.is_refused(), "{attempt:?}");

    // A listener whose accept queue is full drops further SYNs: a timeout.
    let silent = SocketAddr::new(IpAddr::V4(builder.address()), 2222);
    let listener = builder.ns().run(|| TcpListener::bind(silent))??;
    // SAFETY: listen(2) on a listening socket only changes its backlog.
    assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 0) }, 0);
    let short = raw.with_connect_timeout(Duration::from_secs(2));
    let _queued = short.connect(silent).accepted()?;
    let attempt = short.connect(silent);
    assert!(matches!(attempt, ConnectAttempt::TimedOut), "{attempt:?}");
    Ok(())
}

/// The host sshd answers on every client address, the service address included as
/// long as nothing claims it: the fall-through the daemon must prevent.
#[test]
fn host_sshd_answers_unclaimed_addresses() -> Result<()> {
    privileged!("host_sshd_answers_unclaimed_addresses");
    let mut topology = Topology::new(1)?;
    topology.start_host_sshd()?;
    let raw = topology.raw_client();
    let localhost = SocketAddr::from((Ipv4Addr::LOCALHOST, 22));
    assert_eq!(raw.banner(localhost)?, "host");
    assert_eq!(raw.banner(service())?, "host");
    assert_eq!(topology.ssh_client()?.served_by(localhost)?, "host");
    Ok(())
}

/// Extra client addresses on the client's loopback are really used as sources.
#[test]
fn client_source_addresses_are_used() -> Result<()> {
    privileged!("client_source_addresses_are_used");
    let topology = Topology::new(1)?;
    let source = topology.add_client_address(7)?;
    let listener = topology
        .client_ns()
        .run(|| TcpListener::bind(service()))??;
    let _client = topology
        .raw_client()
        .from_source(source)
        .connect(service())
        .accepted()?;
    let (_server, peer) = listener.accept()?;
    assert_eq!(peer.ip(), source);
    Ok(())
}

/// Dropping a topology removes its namespaces and ends its processes, even those
/// started behind the harness's back inside a namespace.
#[test]
fn drop_removes_namespaces_and_processes() -> Result<()> {
    privileged!("drop_removes_namespaces_and_processes");
    let topology = Topology::new(2)?;
    let mut namespaces = vec![topology.client_ns().name().to_owned()];
    namespaces.extend(topology.builders().iter().map(|b| b.ns().name().to_owned()));
    let stray = topology
        .client_ns()
        .command("sleep")
        .arg("600")
        .spawn()
        .context("spawn a stray process")?;
    let stray_pid = stray.id();
    drop(topology);

    for ns in &namespaces {
        ensure!(
            !Path::new("/run/netns").join(ns).exists(),
            "namespace {ns} survived"
        );
    }
    let status = std::fs::read_to_string(format!("/proc/{stray_pid}/status")).unwrap_or_default();
    ensure!(
        status.is_empty() || status.contains("State:\tZ"),
        "stray process {stray_pid} survived: {status}"
    );
    Ok(())
}
