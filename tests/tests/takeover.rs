//! Takeover (issue 12): a second `yensid run` for the same instance takes the
//! listeners and every live connection from the running daemon, which exits. Real
//! sshd, ssh and Nix: transfers checked byte for byte, sessions that outlive the
//! handover, a `nix-build` in flight, and connections made all through it.

mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result, bail, ensure};
use yensid_tests::{
    Daemon, DaemonConfig, Dataplane, Derivation, Gate, NixClient, RandomFile, Site, SshClient,
    StoreScheme, Strategy, Topology, cli, remote_builder, service, wait::wait_until,
};

common::dataplane_tests!(
    a_takeover_under_load_loses_nothing,
    twenty_takeovers_in_a_row_leave_nothing_behind,
    a_changed_configuration_drains_a_removed_builder,
    a_successor_that_dies_leaves_the_daemon_serving,
);

const TRANSFER_TIMEOUT: Duration = Duration::from_secs(900);
const BUILD_TIMEOUT: Duration = Duration::from_secs(300);
const WAIT: Duration = Duration::from_secs(60);
const MIB: u64 = 1 << 20;

/// Work that runs through the service while daemons change under it.
struct Load {
    transfers: Vec<thread::JoinHandle<Result<()>>>,
    sleepers: Vec<thread::JoinHandle<Result<String>>>,
}

impl Load {
    /// `transfers` uploads and as many downloads of `payload`, each checked by its
    /// SHA-256, and `sleepers` sessions of `sleep <secs>; echo done`.
    fn start(
        ssh: &SshClient,
        payload: &Arc<RandomFile>,
        transfers: usize,
        sleepers: usize,
        secs: u32,
    ) -> Load {
        let mut load = Load {
            transfers: Vec::new(),
            sleepers: Vec::new(),
        };
        for _ in 0..transfers {
            let (ssh_up, up) = (ssh.clone(), payload.clone());
            load.transfers.push(thread::spawn(move || {
                let got =
                    ssh_up.run_with_input(service(), "sha256sum", up.path(), TRANSFER_TIMEOUT)?;
                let got = yensid_tests::payload::sha256_of_output(&got)?;
                ensure!(got == up.sha256(), "upload corrupted: builder got {got}");
                Ok(())
            }));
            let (ssh_down, down) = (ssh.clone(), payload.clone());
            load.transfers.push(thread::spawn(move || {
                let got = ssh_down.run_digesting_output(
                    service(),
                    &format!("cat {}", down.path().display()),
                    TRANSFER_TIMEOUT,
                )?;
                ensure!(got == down.sha256(), "download corrupted: got {got}");
                Ok(())
            }));
        }
        for _ in 0..sleepers {
            let ssh = ssh.clone();
            load.sleepers.push(thread::spawn(move || {
                ssh.run(service(), &format!("sleep {secs}; echo done"))
            }));
        }
        load
    }

    fn sessions(&self) -> u64 {
        (self.transfers.len() + self.sleepers.len()) as u64
    }

    fn finish(self) -> Result<()> {
        for (i, t) in self.transfers.into_iter().enumerate() {
            t.join()
                .map_err(|_| anyhow::anyhow!("transfer thread panicked"))?
                .with_context(|| format!("transfer {i}"))?;
        }
        for (i, s) in self.sleepers.into_iter().enumerate() {
            let out = s
                .join()
                .map_err(|_| anyhow::anyhow!("session thread panicked"))?
                .with_context(|| format!("session {i}"))?;
            ensure!(out.trim() == "done", "session {i} printed {out:?}");
        }
        Ok(())
    }
}

/// Connects again and again until stopped, each time reading a builder's banner:
/// every attempt must be served. Returns how many were made.
struct Prober<'scope> {
    stop: Arc<AtomicBool>,
    made: Arc<std::sync::atomic::AtomicU64>,
    thread: thread::ScopedJoinHandle<'scope, Result<u64>>,
}

impl<'scope> Prober<'scope> {
    fn start<'env>(
        scope: &'scope thread::Scope<'scope, 'env>,
        topology: &'env Topology,
        pause: Duration,
    ) -> Prober<'scope> {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let made = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counted = made.clone();
        let thread = scope.spawn(move || {
            let client = yensid_tests::RawClient::new(topology.client_ns());
            let mut made = 0u64;
            while !stopped.load(Ordering::Relaxed) {
                let served_by = client
                    .banner(service())
                    .with_context(|| format!("attempt {} during the takeovers", made + 1))?;
                ensure!(
                    served_by == "b1" || served_by == "b2",
                    "attempt {}: served by {served_by:?}",
                    made + 1
                );
                made += 1;
                counted.store(made, Ordering::Relaxed);
                thread::sleep(pause);
            }
            Ok(made)
        });
        Prober { stop, made, thread }
    }

    /// Waits until `n` attempts were made in all (each served, or the prober
    /// stopped with its error).
    fn wait_for(&self, n: u64) -> Result<()> {
        wait_until(&format!("{n} connection attempts"), WAIT, || {
            Ok(self.made.load(Ordering::Relaxed) >= n || self.thread.is_finished())
        })
    }

    fn finish(self) -> Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("prober panicked"))?
    }
}

/// Waits until the daemon counts at least `n` open connections over its builders.
fn wait_for_active(daemon: &Daemon, n: u64) -> Result<()> {
    wait_until(&format!("{n} open connections"), WAIT, || {
        let status = daemon.status()?;
        let active: u64 = status.json()["builders"]
            .as_array()
            .context("builders")?
            .iter()
            .map(|b| b["active"].as_u64().unwrap_or(0))
            .sum();
        Ok(active >= n)
    })
}

fn payload() -> Result<Arc<RandomFile>> {
    Ok(Arc::new(RandomFile::create(1 << 30)?))
}

/// Four 1 GiB transfers (two up, two down), two `sleep 20` sessions and a real
/// `nix-build` held on a builder while a new daemon takes over; a prober connects
/// all through it. Everything completes, byte-exact, and no attempt was refused or
/// reset. Status and log say what was taken over.
fn a_takeover_under_load_loses_nothing(dataplane: Dataplane) -> Result<()> {
    let payload = payload()?;
    let topology = Topology::with_stores(2)?;
    let config = DaemonConfig::for_topology(&topology, dataplane, Strategy::LeastConnections);
    let mut daemon = Daemon::start(topology.client_ns(), &config)?;
    let known_hosts = cli::known_hosts(daemon.config_path(), None)?;
    let nix = NixClient::new(&topology, &known_hosts.stdout)?;
    let ssh = topology.ssh_client()?;

    let gate = Gate::new(&topology)?;
    let held = Derivation::behind(&gate);
    let build = nix.spawn(
        std::slice::from_ref(&held),
        &remote_builder(StoreScheme::SshNg, service().ip(), 1),
        1,
    )?;
    let building_on = match &gate.wait_started(1, BUILD_TIMEOUT)?[..] {
        [(_, Site::Builder(name))] => name.clone(),
        other => bail!("the held build runs at {other:?}"),
    };
    let load = Load::start(&ssh, &payload, 2, 2, 20);
    wait_for_active(&daemon, load.sessions() + 1)?;
    let predecessor = daemon.pid();
    let since = SystemTime::now();
    let (took_over, probes) = thread::scope(|scope| -> Result<_> {
        // 200 attempts spread over the handover: 50 before it, the rest during
        // and after.
        let prober = Prober::start(scope, &topology, Duration::from_millis(2));
        prober.wait_for(50)?;
        daemon.take_over(None, None)?;
        let took_over = daemon.wait_for_log(&["took over"], since, WAIT)?;
        prober.wait_for(200)?;
        Ok((took_over, prober.finish()?))
    })?;
    gate.open()?;
    let run = build.wait(BUILD_TIMEOUT)?;
    run.ensure_built()?;
    ensure!(
        run.sites() == [Some(&Site::Builder(building_on.clone()))],
        "the build held on {building_on} through the takeover was built at {:?}",
        run.sites()
    );
    load.finish()?;

    let status = daemon.status()?;
    let t = &status.json()["takeover"];
    ensure!(
        t["from_pid"].as_u64() == Some(u64::from(predecessor)),
        "status names the predecessor: {t}"
    );
    let moved =
        t["spliced"].as_u64().context("spliced")? + t["copied"].as_u64().context("copied")?;
    ensure!(
        moved >= 7,
        "the 7 sessions open during the takeover were handed over: {t}; log line: {}",
        took_over.text
    );
    let (spliced, copied) = (t["spliced"].as_u64(), t["copied"].as_u64());
    match dataplane {
        Dataplane::Kernel => ensure!(spliced >= Some(7), "spliced: {t}"),
        Dataplane::Userspace => ensure!(copied >= Some(7) && spliced == Some(0), "copied: {t}"),
    }
    ensure!(probes >= 200, "only {probes} connection attempts were made");
    eprintln!(
        "takeover: {} ms, {probes} probes served; {}",
        t["handover_ms"], took_over.text
    );
    daemon.stop()?;
    Ok(())
}

/// Twenty takeovers in a row under two transfers and two long sessions, with a
/// prober: everything completes, and once it has, the last daemon holds as many
/// descriptors and the kernel as many spliced-socket entries as before the load.
fn twenty_takeovers_in_a_row_leave_nothing_behind(dataplane: Dataplane) -> Result<()> {
    let payload = Arc::new(RandomFile::create(256 * MIB)?);
    let topology = Topology::new(2)?;
    let config = DaemonConfig::for_topology(&topology, dataplane, Strategy::RoundRobin);
    let mut daemon = Daemon::start(topology.client_ns(), &config)?;
    let ssh = topology.ssh_client()?;
    // One connection first, so every lazily opened descriptor is open.
    ssh.served_by(service())?;
    let fds_before = daemon.descriptors()?;
    let maps_before = cli::maps_json(daemon.config_path())?;

    let load = Load::start(&ssh, &payload, 1, 2, 30);
    wait_for_active(&daemon, load.sessions())?;
    let probes = thread::scope(|scope| -> Result<u64> {
        let prober = Prober::start(scope, &topology, Duration::from_millis(20));
        for round in 0..20 {
            daemon
                .take_over(None, None)
                .with_context(|| format!("takeover {}", round + 1))?;
        }
        prober.finish()
    })?;
    load.finish()?;
    wait_until("every connection closed", WAIT, || {
        let status = daemon.status()?;
        Ok(status.json()["builders"]
            .as_array()
            .context("builders")?
            .iter()
            .all(|b| b["active"].as_u64() == Some(0)))
    })?;
    ssh.served_by(service())?;
    // Pooled pipes apart: their number follows how many directions moved bytes at once.
    let fds_after = daemon.descriptors()?;
    ensure!(
        fds_after.others == fds_before.others,
        "descriptors: {fds_before:?} before the load, {fds_after:?} after 20 takeovers"
    );
    fds_after.ensure_pipes_bounded(0)?;
    let maps_after = cli::maps_json(daemon.config_path())?;
    ensure!(
        maps_after["spliced_sockets"] == maps_before["spliced_sockets"],
        "spliced sockets in the kernel: {} before the load, {} after",
        maps_before["spliced_sockets"],
        maps_after["spliced_sockets"]
    );
    for index in 0..2 {
        let (assigned, released, active) = cli::builder_connections(&maps_after, index)?;
        ensure!(
            active == 0,
            "builder index {index}: the kernel still counts {active} (assigned {assigned}, released {released})"
        );
    }
    eprintln!("20 takeovers: {probes} probes served");
    daemon.stop()?;
    Ok(())
}

/// A successor that fails in the middle of the takeover (after it pinned its own
/// dispatch link and received everything: its metrics address is taken): the running
/// daemon takes its connections and listeners back into service and pins its link
/// again; the live session goes on, new connections are served, and a later
/// takeover works.
fn a_successor_that_dies_leaves_the_daemon_serving(dataplane: Dataplane) -> Result<()> {
    let topology = Topology::new(2)?;
    let config = DaemonConfig::for_topology(&topology, dataplane, Strategy::RoundRobin);
    let mut daemon = Daemon::start(topology.client_ns(), &config)?;
    let ssh = topology.ssh_client()?;
    let mut session = yensid_tests::LiveSession::start(&ssh, service())?;
    let taken = topology
        .client_ns()
        .run(|| std::net::TcpListener::bind("127.0.0.1:0"))??;
    let port = taken.local_addr()?.port();
    daemon.abort_take_over(
        &config,
        &format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n"),
    )?;
    let log = daemon.log();
    ensure!(
        log.contains("cannot serve metrics on")
            && log.contains("replacing the pinned dispatch link"),
        "the successor failed for another reason, or before it pinned its link:\n{log}"
    );
    ensure!(
        daemon.pin_path().join("dispatch").exists(),
        "no dispatch link pinned after the failed takeover"
    );
    for _ in 0..4 {
        ssh.served_by(service())?;
    }
    session.finish()?;
    let mut session = yensid_tests::LiveSession::start(&ssh, service())?;
    daemon.take_over(None, Some(&config))?;
    session.finish()?;
    ssh.served_by(service())?;
    daemon.stop()?;
    Ok(())
}

/// A takeover with a configuration that removes b2: b2's sessions continue to their
/// end (drained, not cut), status lists it as retired while they last, and every new
/// connection goes to b1.
fn a_changed_configuration_drains_a_removed_builder(dataplane: Dataplane) -> Result<()> {
    let topology = Topology::new(2)?;
    let config = DaemonConfig::for_topology(&topology, dataplane, Strategy::RoundRobin);
    let mut daemon = Daemon::start(topology.client_ns(), &config)?;
    let ssh = topology.ssh_client()?;
    let mut sessions = Vec::new();
    for _ in 0..4 {
        sessions.push(yensid_tests::LiveSession::start(&ssh, service())?);
    }
    ensure!(
        sessions.iter().any(|s| s.builder() == "b2"),
        "round-robin put no session on b2"
    );
    let mut smaller = config.clone();
    smaller.builders.retain(|b| b.name == "b1");
    daemon.take_over(None, Some(&smaller))?;
    let status = daemon.status()?;
    let retired = &status.json()["retired_builders"];
    let on_b2 = sessions.iter().filter(|s| s.builder() == "b2").count() as u64;
    ensure!(
        retired[0]["name"] == "b2" && retired[0]["active"].as_u64() == Some(on_b2),
        "retired builders after the takeover: {retired}"
    );
    for _ in 0..4 {
        let served = ssh.served_by(service())?;
        ensure!(
            served == "b1",
            "a new connection after b2 left went to {served}"
        );
    }
    for s in &mut sessions {
        s.finish()?;
    }
    let status = daemon.status()?;
    ensure!(
        status.json()["retired_builders"]
            .as_array()
            .is_some_and(Vec::is_empty),
        "b2 still listed once its sessions ended: {}",
        status.json()
    );
    daemon.stop()?;
    Ok(())
}
