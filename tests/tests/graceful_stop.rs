//! A stop without a successor (issue 12): after SIGTERM the kernel refuses new
//! connections at once while the open ones go on, up to `[daemon] shutdown_grace`;
//! the daemon exits when the last one ends, cuts the rest when the grace expires,
//! and cuts at once on a second SIGTERM or SIGINT. Real sshd and ssh sessions.

mod common;

use std::time::{Duration, SystemTime};

use anyhow::{Result, ensure};
use yensid_tests::wait::wait_until;
use yensid_tests::{Daemon, DaemonConfig, Dataplane, LiveSession, Strategy, Topology, service};

common::dataplane_tests!(
    open_sessions_finish_and_the_daemon_exits_after_the_last,
    the_grace_expires_and_cuts_what_is_left,
    a_second_signal_cuts_at_once,
);

/// Only against hangs: no assertion is about how long anything took.
const WAIT: Duration = Duration::from_secs(30);

fn config(topology: &Topology, dataplane: Dataplane, grace: Duration) -> DaemonConfig {
    let mut config = DaemonConfig::for_topology(topology, dataplane, Strategy::RoundRobin);
    config.shutdown_grace = Some(grace);
    config
}

/// Two sessions open at SIGTERM: new connections are refused while the daemon still
/// runs and answers `status`, the count is reported again after a while, both
/// sessions end normally, and the daemon exits by itself after the second.
fn open_sessions_finish_and_the_daemon_exits_after_the_last(dataplane: Dataplane) -> Result<()> {
    let topology = Topology::new(2)?;
    let mut daemon = Daemon::start(
        topology.client_ns(),
        &config(&topology, dataplane, Duration::from_secs(600)),
    )?;
    let ssh = topology.ssh_client()?;
    let mut first = LiveSession::start(&ssh, service())?;
    let mut second = LiveSession::start(&ssh, service())?;

    let since = SystemTime::now();
    daemon.terminate()?;
    daemon.wait_for_log(
        &["stopping: 2 connection(s) still open; waiting up to 10m"],
        since,
        WAIT,
    )?;
    let attempt = topology.raw_client().connect(service());
    ensure!(
        attempt.is_refused(),
        "a new connection during the grace: {attempt:?}"
    );
    ensure!(daemon.is_running()?, "yensid exited with two sessions open");
    let status = daemon.status()?;
    ensure!(
        status.json()["dataplane"] == dataplane.as_str(),
        "status during the grace: {}",
        status.json()
    );
    // The count again, five seconds on (waited for, not timed).
    wait_until("the second report of the open connections", WAIT, || {
        Ok(daemon
            .log_since(since)
            .iter()
            .filter(|l| l.contains_all(&["stopping: 2 connection(s) still open"]))
            .count()
            >= 2)
    })?;

    first.finish()?;
    ensure!(
        daemon.is_running()?,
        "yensid exited with a session still open"
    );
    second.finish()?;
    wait_until("yensid to exit after the last session", WAIT, || {
        Ok(!daemon.is_running()?)
    })?;
    daemon.wait_for_log(&["stopping: every connection ended"], since, WAIT)?;
    daemon.wait_for_log(
        &["yensid stopped", "open_connections_closed=0"],
        since,
        WAIT,
    )?;
    let log = daemon.log();
    ensure!(
        !log.contains("grace expired") && !log.contains("second stop signal"),
        "nothing was cut, yet the log says so:\n{log}"
    );
    Ok(())
}

/// A session that outlasts a short grace: cut when it expires; the daemon exits.
fn the_grace_expires_and_cuts_what_is_left(dataplane: Dataplane) -> Result<()> {
    let topology = Topology::new(1)?;
    let mut daemon = Daemon::start(
        topology.client_ns(),
        &config(&topology, dataplane, Duration::from_secs(2)),
    )?;
    let ssh = topology.ssh_client()?;
    let mut session = LiveSession::start(&ssh, service())?;

    let since = SystemTime::now();
    daemon.terminate()?;
    daemon.wait_for_log(
        &["stopping: 1 connection(s) still open; waiting up to 2s"],
        since,
        WAIT,
    )?;
    wait_until("yensid to exit when the grace expires", WAIT, || {
        Ok(!daemon.is_running()?)
    })?;
    daemon.wait_for_log(&["grace expired: cutting 1 connection(s)"], since, WAIT)?;
    daemon.wait_for_log(
        &["yensid stopped", "open_connections_closed=1"],
        since,
        WAIT,
    )?;
    ensure!(
        session.finish().is_err(),
        "the session outlived the grace and the daemon"
    );
    Ok(())
}

/// SIGTERM, then SIGINT during a long grace: the open session is cut at once.
fn a_second_signal_cuts_at_once(dataplane: Dataplane) -> Result<()> {
    let topology = Topology::new(1)?;
    let mut daemon = Daemon::start(
        topology.client_ns(),
        &config(&topology, dataplane, Duration::from_secs(600)),
    )?;
    let ssh = topology.ssh_client()?;
    let mut session = LiveSession::start(&ssh, service())?;

    let since = SystemTime::now();
    daemon.terminate()?;
    daemon.wait_for_log(&["stopping: 1 connection(s) still open"], since, WAIT)?;
    let exit = daemon.interrupt()?;
    ensure!(exit.success(), "yensid stopped with {exit}");
    daemon.wait_for_log(
        &[
            "second stop signal: cutting 1 connection(s) at once",
            "SIGINT",
        ],
        since,
        WAIT,
    )?;
    ensure!(
        session.finish().is_err(),
        "the session outlived the second signal and the daemon"
    );
    Ok(())
}
