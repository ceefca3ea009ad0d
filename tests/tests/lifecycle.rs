//! The daemon's life: coexisting with the host's sshd, dying (SIGKILL, also during a
//! timed override), stopping (SIGTERM, SIGINT), reloading (SIGHUP) under live sessions
//! and a bulk transfer, and mounting bpffs itself.

mod common;

use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::thread;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail, ensure};
use yensid_tests::wait::wait_until;
use yensid_tests::{
    ConnectAttempt, Daemon, DaemonConfig, Dataplane, Launch, LiveSession, PolicyMode, RandomFile,
    SshConnection, Strategy, Topology, service,
};

common::dataplane_tests!(
    host_sshd_keeps_everything_unclaimed,
    sigkill_leaves_claimed_traffic_refused,
    sigterm_exits_cleanly_and_detaches,
    sigint_exits_cleanly_and_detaches,
    sighup_reload_keeps_live_session,
    sighup_removing_its_builder_keeps_live_session,
    reload_changes_weights_strategy_and_limits_under_a_bulk_transfer,
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

/// Only against hangs.
const WAIT: Duration = Duration::from_secs(30);
/// Only against hangs: the held upload moves 64 MiB once its gate opens.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(600);

/// An upload is in flight (held by its builder, which reads nothing until the test
/// opens a gate) across two reloads: the first gives b1 weight 2 (round-robin then
/// splits 2:1), the second switches to priority over b2 then b1 with b2 capped at two
/// connections (new connections fill b2, the upload's slot included, then spill to
/// b1). New connections follow each reload; then the upload arrives byte-exact on the
/// builder it started on.
fn reload_changes_weights_strategy_and_limits_under_a_bulk_transfer(
    dataplane: Dataplane,
) -> Result<()> {
    let topology = Topology::new(2)?;
    let mut config = DaemonConfig::for_topology(&topology, dataplane, Strategy::RoundRobin);
    let mut daemon = Daemon::start(topology.client_ns(), &config)?;
    let payload = RandomFile::create(64 << 20)?;
    let gate = topology.new_file("gate");
    let upload = {
        let ssh = topology.ssh_client()?;
        let path = payload.path().to_owned();
        let remote = format!(
            "while [ ! -e {gate} ]; do sleep 0.1; done; sha256sum; echo $YENSID_BUILDER",
            gate = gate.display()
        );
        thread::spawn(move || ssh.run_with_input(service(), &remote, &path, TRANSFER_TIMEOUT))
    };
    let status = daemon.wait_for_status("the upload's connection", WAIT, |s| {
        Ok(s.active("b1")? + s.active("b2")? == 1)
    })?;
    let carrier = if status.active("b1")? == 1 {
        "b1"
    } else {
        "b2"
    };
    let idle_but_the_upload = |s: &yensid_tests::Status| -> Result<bool> {
        let on = |b: &str| -> Result<u64> { s.active(b) };
        Ok(on(carrier)? == 1 && on(if carrier == "b1" { "b2" } else { "b1" })? == 0)
    };

    config.builder_mut("b1").weight = Some(2);
    daemon.reload(&config)?;
    daemon.wait_for_status("b1's weight 2", WAIT, |s| Ok(s.weight("b1")? == 2))?;
    let served = topology.raw_client().banners(service(), 30)?;
    let on_b1 = served.iter().filter(|s| *s == "b1").count();
    ensure!(
        (19..=21).contains(&on_b1)
            && !served
                .windows(2)
                .any(|pair| pair[0] == "b2" && pair[1] == "b2"),
        "after the reload to weights 2:1, round-robin served {served:?}"
    );

    config.service_mut().strategy = Strategy::Priority;
    config.service_mut().builders = Some(vec!["b2".to_owned(), "b1".to_owned()]);
    config.builder_mut("b2").max_connections = Some(2);
    daemon.reload(&config)?;
    daemon.wait_for_status("priority, b2 capped at 2", WAIT, |s| {
        let svc = yensid_tests::cli::service(s.json(), "ssh")?;
        let b2 = yensid_tests::cli::builder(s.json(), "b2")?;
        Ok(svc["strategy"] == "priority" && b2["max_connections"] == 2 && idle_but_the_upload(s)?)
    })?;
    let free_on_b2 = if carrier == "b2" { 1 } else { 2 };
    let held = (0..3)
        .map(|_| topology.raw_client().open_ssh(service()))
        .collect::<Result<Vec<_>>>()?;
    let held_on: Vec<&str> = held.iter().map(|c| c.served_by()).collect();
    let expected: Vec<&str> = (0..3)
        .map(|i| if i < free_on_b2 { "b2" } else { "b1" })
        .collect();
    ensure!(
        held_on == expected,
        "priority over b2 (max 2, the upload on {carrier}) then b1 served {held_on:?}"
    );
    drop(held);

    fs::write(&gate, "open").with_context(|| format!("open the gate {}", gate.display()))?;
    let out = upload
        .join()
        .map_err(|_| anyhow::anyhow!("the upload thread panicked"))??;
    ensure!(
        out.starts_with(payload.sha256()) && out.trim_end().ends_with(carrier),
        "the upload across two reloads: {out:?} (want {} from {carrier})",
        payload.sha256()
    );
    let counts = daemon.expect_data_path(dataplane)?;
    ensure!(
        counts.spliced + counts.copied == 1 + 30 + 3,
        "the upload, 30 and 3 connections, the daemon recorded {counts:?}"
    );
    Ok(())
}

/// `yensid mode local --for 3s`, then kill -9: as the README says of a crashed daemon,
/// the pinned program keeps refusing every claimed connection (RST; never the host's
/// sshd), before the override's end and after the kernel's deadline for it has passed
/// too; status without the daemon says claimed traffic is refused. The next start
/// finds the override expired while it was down and serves again.
#[test]
fn sigkill_during_a_timed_local_override_keeps_refusing() -> Result<()> {
    if !yensid_tests::privileged_or_skip(
        "lifecycle::sigkill_during_a_timed_local_override_keeps_refusing",
    ) {
        return Ok(());
    }
    let (topology, mut daemon) =
        claiming_in_front_of_host_sshd(Dataplane::Kernel, "before the override")?;
    let raw = topology.raw_client();
    let file = daemon.config_path().to_owned();
    daemon.set_mode(PolicyMode::Local, Some(Duration::from_secs(3)))?;
    let maps = yensid_tests::cli::wait_for_maps(&file, "the kernel's deadline", WAIT, |m| {
        let until = yensid_tests::cli::u64_at(m, "local_override_until_boot_ns")?;
        Ok(until != 0 && until != u64::MAX)
    })?;
    let deadline = yensid_tests::cli::u64_at(&maps, "local_override_until_boot_ns")?;
    daemon.kill9()?;
    ensure!(
        !daemon.log().contains("mode override expired"),
        "the override expired before the kill; the test's premise failed:\n{}",
        daemon.log()
    );

    let ensure_refused = |when: &str| -> Result<()> {
        for i in 0..5 {
            let attempt = raw.connect(service());
            ensure!(
                attempt.is_refused(),
                "{when}: connection {i} was not refused: {attempt:?}"
            );
        }
        Ok(())
    };
    ensure_refused("killed during the override")?;
    let status = yensid_tests::cli::status_not_running(&file)?;
    ensure!(
        status.claimed_traffic == "refused",
        "after kill -9: {}",
        status.message
    );
    wait_until("the kernel's deadline to pass", WAIT, || {
        Ok(boot_time_ns()? > deadline)
    })?;
    ensure_refused("killed, the override's end passed")?;
    ensure!(
        raw.banner(localhost_ssh())? == "host",
        "unclaimed traffic no longer reaches the host sshd"
    );

    let restarted_at = SystemTime::now();
    daemon.restart()?;
    daemon.wait_for_log(
        &["mode override expired while the daemon was down"],
        restarted_at,
        WAIT,
    )?;
    let served = raw.banner(service())?;
    ensure!(is_builder(&served), "after the restart, served by {served}");
    Ok(())
}

/// `yensid mode local --for 10s`, then the daemon hangs (SIGSTOP): the kernel ends the
/// override itself at its deadline, as the README says. Refused before it; after it,
/// the next connection is steered to a builder's listener (accepted, not refused), and
/// once the daemon runs again that connection is served by the builder.
#[test]
fn a_hung_daemon_does_not_hold_a_timed_local_override_past_its_end() -> Result<()> {
    if !yensid_tests::privileged_or_skip(
        "lifecycle::a_hung_daemon_does_not_hold_a_timed_local_override_past_its_end",
    ) {
        return Ok(());
    }
    let (topology, mut daemon) =
        claiming_in_front_of_host_sshd(Dataplane::Kernel, "before the override")?;
    let raw = topology.raw_client();
    let file = daemon.config_path().to_owned();
    daemon.set_mode(PolicyMode::Local, Some(Duration::from_secs(10)))?;
    let maps = yensid_tests::cli::wait_for_maps(&file, "the kernel's deadline", WAIT, |m| {
        let until = yensid_tests::cli::u64_at(m, "local_override_until_boot_ns")?;
        Ok(until != 0 && until != u64::MAX)
    })?;
    let deadline = yensid_tests::cli::u64_at(&maps, "local_override_until_boot_ns")?;
    daemon.pause()?;
    let attempt = raw.connect(service());
    ensure!(
        attempt.is_refused() || boot_time_ns()? > deadline,
        "during the override, with the daemon hung: {attempt:?}"
    );
    wait_until("the kernel's deadline to pass", WAIT, || {
        Ok(boot_time_ns()? > deadline)
    })?;
    let stream = raw
        .connect(service())
        .accepted()
        .context("after the override's end, with the daemon hung")?;
    daemon.resume()?;
    let served = SshConnection::handshake(stream)?;
    ensure!(
        is_builder(served.served_by()),
        "after the override's end, served by {}",
        served.served_by()
    );
    served.close()?;
    let mode = daemon.status()?.mode()?;
    ensure!(
        mode.in_force == "auto" && mode.source == "config",
        "after the override's end: {mode:?}"
    );
    daemon.expect_data_path(Dataplane::Kernel)?;
    Ok(())
}

/// CLOCK_BOOTTIME in nanoseconds: the clock of the kernel's override deadline.
fn boot_time_ns() -> Result<u64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which `ts` is.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(u64::try_from(ts.tv_sec)? * 1_000_000_000 + u64::try_from(ts.tv_nsec)?)
}
