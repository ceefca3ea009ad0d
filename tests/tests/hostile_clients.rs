//! Hostile and unlucky clients: junk, silence, floods, and a builder session that dies
//! under a transfer. Each test asserts what a user relies on: real sessions are still
//! served, no builder is blamed for what its clients did, and the daemon's descriptors
//! and kernel counts come back to where they were.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use yensid_tests::cli::{builder_connections, maps_json, u64_at};
use yensid_tests::daemon::Descriptors;
use yensid_tests::wait::wait_until;
use yensid_tests::{
    ConnectAttempt, Daemon, DaemonConfig, Dataplane, Netns, SshClient, Status, Strategy, Topology,
    service,
};

common::dataplane_tests!(
    junk_clients_are_rejected_and_real_sessions_still_served,
    silent_clients_do_not_take_max_connections,
    silent_clients_do_not_reach_a_builders_max_startups,
    a_connection_flood_leaves_nothing_behind,
    a_builder_session_killed_mid_transfer_ends_its_pair,
    handoff_caps_refuse_a_flood_not_other_clients,
);

/// Real ssh sessions the targets of issue 10 are measured on.
const SESSIONS: usize = 20;
/// At least this many of them must succeed.
const SERVED_AT_LEAST: usize = 19;
/// Only keeps a broken daemon from hanging a test; never what a test asserts.
const PATIENCE: Duration = Duration::from_secs(60);

fn builders(status: &Status) -> Result<&Vec<Value>> {
    status
        .json()
        .get("builders")
        .and_then(Value::as_array)
        .context("status has no builders")
}

/// What every builder's `key` adds up to.
fn sum_over_builders(status: &Status, key: &str) -> Result<u64> {
    builders(status)?.iter().map(|b| u64_at(b, key)).sum()
}

fn in_handoff(status: &Status) -> Result<u64> {
    let handoffs = status
        .json()
        .get("handoffs")
        .context("no handoffs in status")?;
    u64_at(handoffs, "in_progress")
}

/// Waits until the daemon has no connection in handoff and no builder an open one.
fn wait_idle(daemon: &Daemon) -> Result<Status> {
    daemon.wait_for_status("no connection in handoff or open", PATIENCE, |s| {
        Ok(in_handoff(s)? == 0 && sum_over_builders(s, "active")? == 0)
    })
}

/// No builder was marked unhealthy at any time: neither now nor in the log.
fn ensure_no_builder_marked_down(daemon: &Daemon) -> Result<()> {
    let status = daemon.status()?;
    for b in builders(&status)? {
        ensure!(
            b.get("state").and_then(Value::as_str) != Some("unhealthy"),
            "a builder is unhealthy: {b}"
        );
    }
    let log = daemon.log();
    ensure!(
        !log.contains("builder unhealthy"),
        "a builder was marked down:\n{log}"
    );
    Ok(())
}

/// The kernel's count of open connections (assigned - released) is zero for every
/// builder: what the daemon took for the connections that ended was given back.
fn ensure_kernel_counts_released(daemon: &Daemon, dataplane: Dataplane) -> Result<()> {
    // The dispatch program steers and counts on both data paths.
    let _ = dataplane;
    let maps = maps_json(daemon.config_path())?;
    for index in 0..2 {
        let (assigned, released, active) = builder_connections(&maps, index)?;
        ensure!(
            active == 0,
            "builder index {index}: the kernel still counts {active} open connection(s) \
             (assigned {assigned}, released {released})"
        );
    }
    Ok(())
}

/// Waits until the daemon holds no more descriptors than `baseline`, pooled pipes
/// apart (their number follows how many directions moved bytes at once), and
/// checks that the pipes stay within the pool's bound.
fn wait_descriptors_back(daemon: &Daemon, baseline: Descriptors) -> Result<()> {
    let mut last = Descriptors::default();
    wait_until(
        "the daemon's descriptors to come back to baseline",
        PATIENCE,
        || {
            last = daemon.descriptors()?;
            Ok(last.others <= baseline.others)
        },
    )
    .with_context(|| format!("{last:?} open, {baseline:?} at the start"))?;
    last.ensure_pipes_bounded(0)
}

/// Makes closing `stream` send RST instead of FIN (`SO_LINGER` 0).
fn reset_on_close(stream: &TcpStream) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a `linger` of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Runs `count` real ssh sessions one after the other; returns how many succeeded,
/// with the errors of those that did not.
fn real_sessions(ssh: &SshClient, count: usize) -> (usize, Vec<String>) {
    let mut errors = Vec::new();
    for _ in 0..count {
        match ssh.served_by(service()) {
            Ok(b) if b == "b1" || b == "b2" => {}
            Ok(other) => errors.push(format!("served by {other:?}")),
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    (count - errors.len(), errors)
}

/// Keeps `count` connections to the service open from the client namespace, each sending
/// `greeting` (nothing: silent) and then nothing more; a connection the daemon closes is
/// counted and replaced at once, so the pressure lasts until [`Holders::stop`].
struct Holders {
    stop: Arc<AtomicBool>,
    closed_by_daemon: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl Holders {
    fn start(ns: &Netns, count: usize, greeting: &'static [u8]) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let closed_by_daemon = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicUsize::new(0));
        let ns_path = ns.path();
        let (s, c, o) = (stop.clone(), closed_by_daemon.clone(), open.clone());
        let thread = thread::spawn(move || hold(&ns_path, count, greeting, &s, &c, &o));
        let holders = Self {
            stop,
            closed_by_daemon,
            open,
            thread: Some(thread),
        };
        wait_until(&format!("{count} held connections"), PATIENCE, || {
            Ok(holders.open.load(Ordering::SeqCst) >= count || holders.finished())
        })?;
        ensure!(!holders.finished(), "the holding thread ended early");
        Ok(holders)
    }

    fn finished(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }

    fn closed_by_daemon(&self) -> usize {
        self.closed_by_daemon.load(Ordering::SeqCst)
    }

    fn stop(mut self) -> Result<()> {
        self.stop.store(true, Ordering::SeqCst);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(_)) => bail!("the holding thread panicked"),
            None => Ok(()),
        }
    }
}

impl Drop for Holders {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn hold(
    ns_path: &std::path::Path,
    count: usize,
    greeting: &[u8],
    stop: &AtomicBool,
    closed_by_daemon: &AtomicUsize,
    open: &AtomicUsize,
) -> Result<()> {
    use std::os::fd::AsRawFd;
    let ns = std::fs::File::open(ns_path)?;
    // SAFETY: an open namespace fd; only this thread's network namespace changes.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).context("setns");
    }
    let connect = || -> Option<TcpStream> {
        let mut stream = TcpStream::connect_timeout(&service(), Duration::from_secs(5)).ok()?;
        stream.write_all(greeting).ok()?;
        stream.set_nonblocking(true).ok()?;
        Some(stream)
    };
    let mut streams: Vec<Option<TcpStream>> = (0..count).map(|_| None).collect();
    let mut buf = [0u8; 512];
    while !stop.load(Ordering::SeqCst) {
        let mut now_open = 0;
        for slot in &mut streams {
            if let Some(stream) = slot {
                let gone = match stream.read(&mut buf) {
                    Ok(0) => true,
                    // A builder's banner (for clients that identified): still open.
                    Ok(_) => false,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => false,
                    Err(_) => true,
                };
                if gone {
                    closed_by_daemon.fetch_add(1, Ordering::SeqCst);
                    *slot = None;
                }
            }
            if slot.is_none() {
                *slot = connect();
            }
            now_open += usize::from(slot.is_some());
        }
        open.store(now_open, Ordering::SeqCst);
        thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Every kind of client that is not SSH is closed without a builder's byte, counted as
/// rejected, and logged with its bytes escaped; real sessions are served all along.
fn junk_clients_are_rejected_and_real_sessions_still_served(dataplane: Dataplane) -> Result<()> {
    let topology = Topology::new(2)?;
    let config = DaemonConfig::for_topology(&topology, dataplane, Strategy::LeastConnections);
    let daemon = Daemon::start(topology.client_ns(), &config)?;
    let raw = topology.raw_client();
    let ssh = topology.ssh_client()?;
    ensure!(real_sessions(&ssh, 1).0 == 1, "no session before the junk");

    let mut over_long = b"SSH-2.0-".to_vec();
    over_long.resize(300, b'a');
    over_long.extend_from_slice(b"\r\n");
    let junk: Vec<(&str, Vec<u8>)> = vec![
        ("HTTP", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
        (
            "binary",
            vec![0x00, 0xff, 0x16, 0x03, 0x01, 0x02, 0x00, 0x01, b'\n'],
        ),
        (
            "escape sequences",
            b"\x1b]0;pwned\x07\x1b[2J\x1b[31mred\r\n".to_vec(),
        ),
        ("over-long SSH line", over_long),
        ("SSH-1.5", b"SSH-1.5-OldClient\r\n".to_vec()),
        ("a NUL in the line", b"SSH-2.0-a\0b\r\n".to_vec()),
        ("a line that never ends", b"SSH-2.0-never-ending".to_vec()),
    ];
    for (kind, bytes) in &junk {
        let reply = raw.send_junk(service(), bytes)?;
        ensure!(reply.closed, "{kind}: the connection was left open");
        ensure!(
            reply.received.is_empty(),
            "{kind}: a builder was contacted, the client got {:?}",
            String::from_utf8_lossy(&reply.received)
        );
    }
    // Connect and close; connect and reset.
    for reset in [false, true] {
        let stream = raw.connect(service()).accepted()?;
        if reset {
            reset_on_close(&stream)?;
        } else {
            stream.shutdown(Shutdown::Both)?;
        }
        drop(stream);
    }
    let rejected = junk.len() as u64 + 2;
    daemon.wait_for_status("every junk client counted as rejected", PATIENCE, |s| {
        Ok(sum_over_builders(s, "rejected_clients")? >= rejected && in_handoff(s)? == 0)
    })?;

    let (served, errors) = real_sessions(&ssh, 3);
    ensure!(
        served == 3,
        "real sessions failed after the junk: {errors:?}"
    );
    let log = daemon.log();
    ensure!(
        log.contains("client rejected"),
        "no rejection was logged:\n{log}"
    );
    let bytes = daemon.log_bytes();
    let raw_byte = bytes
        .iter()
        .find(|&&b| (b.is_ascii_control() && b != b'\n') || !b.is_ascii());
    ensure!(
        raw_byte.is_none(),
        "the log holds a raw byte {raw_byte:?}:\n{}",
        bytes.escape_ascii()
    );
    ensure!(
        log.contains(r"\x1b]0;pwned"),
        "the escape sequence was not logged escaped:\n{log}"
    );
    ensure_no_builder_marked_down(&daemon)?;
    Ok(())
}

/// Eight clients that connect and never speak, against two builders with room for four
/// sessions each: they hold no builder slot, real sessions are served, and the daemon
/// closes the silent ones after `ident_timeout`.
fn silent_clients_do_not_take_max_connections(dataplane: Dataplane) -> Result<()> {
    let topology = Topology::new(2)?;
    let mut config = DaemonConfig::for_topology(&topology, dataplane, Strategy::LeastConnections);
    for builder in &mut config.builders {
        builder.max_connections = Some(4);
    }
    let daemon = Daemon::start(topology.client_ns(), &config)?;
    let ssh = topology.ssh_client()?;

    let silent = Holders::start(topology.client_ns(), 8, b"")?;
    daemon.wait_for_status("8 silent connections in handoff", PATIENCE, |s| {
        Ok(in_handoff(s)? >= 8)
    })?;
    let status = daemon.status()?;
    ensure!(
        sum_over_builders(&status, "active")? == 0,
        "silent clients count against a builder: {}",
        status.json()
    );
    let (served, errors) = real_sessions(&ssh, SESSIONS);
    ensure!(
        served >= SERVED_AT_LEAST,
        "{served} of {SESSIONS} real sessions served next to 8 silent clients: {errors:?}"
    );
    wait_until(
        "the daemon to close silent clients (ident_timeout)",
        PATIENCE,
        || Ok(silent.closed_by_daemon() >= 8),
    )?;
    silent.stop()?;
    wait_idle(&daemon)?;
    ensure!(
        daemon.log().contains("no identification line within"),
        "the silent clients' rejection was not logged"
    );
    ensure_no_builder_marked_down(&daemon)?;
    Ok(())
}

/// 300 silent clients against builders whose sshd drops connections beyond a few
/// unauthenticated ones (`MaxStartups`): no builder connection is made for them, so real
/// sessions are served and no builder is marked down. Then clients that identify and go
/// silent fill b1's `MaxStartups` for real: b1 drops the next connection, which moves to
/// b2 without b1 being blamed for it.
fn silent_clients_do_not_reach_a_builders_max_startups(dataplane: Dataplane) -> Result<()> {
    const MAX_STARTUPS: u32 = 3;
    let topology = Topology::new(2)?;
    for builder in topology.builders() {
        builder.sshd().set_max_startups(MAX_STARTUPS)?;
    }
    let config = DaemonConfig::for_topology(&topology, dataplane, Strategy::Priority);
    let daemon = Daemon::start(topology.client_ns(), &config)?;
    let ssh = topology.ssh_client()?;
    let raw = topology.raw_client();

    let silent = Holders::start(topology.client_ns(), 300, b"")?;
    let (served, errors) = real_sessions(&ssh, SESSIONS);
    ensure!(
        served >= SERVED_AT_LEAST,
        "{served} of {SESSIONS} real sessions served next to 300 silent clients: {errors:?}"
    );
    ensure_no_builder_marked_down(&daemon)?;
    silent.stop()?;
    wait_idle(&daemon)?;

    // Identified, then silent: these are SSH connections to b1 (priority), which hold
    // its sshd's unauthenticated slots.
    let held = (0..MAX_STARTUPS)
        .map(|_| raw.open_ssh(service()))
        .collect::<Result<Vec<_>>>()?;
    ensure!(
        held.iter().all(|c| c.served_by() == "b1"),
        "priority did not send the held connections to b1"
    );
    let since = std::time::SystemTime::now();
    let moved = raw.open_ssh(service())?;
    ensure!(
        moved.served_by() == "b2",
        "b1's sshd is at MaxStartups, yet it answered the next connection"
    );
    let failover = daemon
        .log_since(since)
        .into_iter()
        .find(|l| l.contains_all(&["failing over", "failed=\"b1\""]))
        .context("no failover from b1 was logged")?;
    ensure!(
        failover.contains_all(&["busy=true"]),
        "the failover from b1 was not classified as busy: {failover:?}"
    );
    let log = daemon.log();
    ensure!(
        !log.contains("passive failure"),
        "a builder at MaxStartups was blamed with a passive failure:\n{log}"
    );
    drop((held, moved));
    Ok(())
}

/// 5,000 connections that open and close at once: afterwards the daemon has nothing in
/// handoff, real sessions are served, no builder was marked down, and descriptors and
/// the kernel's counts are back where they were.
fn a_connection_flood_leaves_nothing_behind(dataplane: Dataplane) -> Result<()> {
    const FLOOD: usize = 5000;
    let topology = Topology::new(2)?;
    let config = DaemonConfig::for_topology(&topology, dataplane, Strategy::LeastConnections);
    let daemon = Daemon::start(topology.client_ns(), &config)?;
    let ssh = topology.ssh_client()?;
    let raw = topology.raw_client();
    ensure!(real_sessions(&ssh, 1).0 == 1, "no session before the flood");
    wait_idle(&daemon)?;
    let baseline = daemon.descriptors()?;

    let (connected, refused) = topology.client_ns().run(|| {
        let (mut connected, mut refused) = (0usize, 0usize);
        for i in 0..FLOOD {
            match TcpStream::connect_timeout(&service(), Duration::from_secs(5)) {
                Ok(stream) => {
                    connected += 1;
                    if i % 2 == 1 {
                        let _ = reset_on_close(&stream);
                    }
                }
                Err(_) => refused += 1,
            }
        }
        (connected, refused)
    })?;
    let flood_ended = Instant::now();
    eprintln!("flood: {connected} connections accepted, {refused} refused");
    ensure!(
        connected > 0,
        "not one connection of the flood was accepted"
    );

    // The first builder banner a new client gets after the flood: when it is served
    // again (recorded for the report, not asserted: the machine's load decides it).
    // Until the flood's last accepted connections have left the handoff, a new one
    // may still find the handoff caps full and be reset: try again until served.
    yensid_tests::wait::wait_until(
        "a builder banner after the flood",
        Duration::from_secs(30),
        || Ok(raw.banner(service()).is_ok()),
    )?;
    let served_again = flood_ended.elapsed();
    wait_idle(&daemon)?;
    let idle = flood_ended.elapsed();
    let (served, errors) = real_sessions(&ssh, 1);
    ensure!(served == 1, "no real session after the flood: {errors:?}");
    eprintln!(
        "{dataplane:?}: a builder banner {served_again:?} after the flood stopped, nothing \
         in handoff after {idle:?}, a full ssh session after {:?}",
        flood_ended.elapsed()
    );
    ensure_no_builder_marked_down(&daemon)?;
    wait_idle(&daemon)?;
    ensure_kernel_counts_released(&daemon, dataplane)?;
    wait_descriptors_back(&daemon, baseline)?;
    Ok(())
}

/// A builder's session processes are killed while a bulk transfer runs through the
/// daemon, downloading and uploading: the daemon ends the pair promptly (its slot, its
/// kernel count and its descriptors are given back), not after a minute.
fn a_builder_session_killed_mid_transfer_ends_its_pair(dataplane: Dataplane) -> Result<()> {
    let topology = Topology::new(1)?;
    let config = DaemonConfig::for_topology(&topology, dataplane, Strategy::LeastConnections);
    let daemon = Daemon::start(topology.client_ns(), &config)?;
    let ssh = topology.ssh_client()?;
    ensure!(
        real_sessions(&ssh, 1).0 == 1,
        "no session before the transfer"
    );
    wait_idle(&daemon)?;
    let baseline = daemon.descriptors()?;
    let b1 = topology.builder("b1");

    for (direction, remote) in [("download", "cat /dev/zero"), ("upload", "cat > /dev/null")] {
        let mut transfer: Child = ssh
            .command(service(), remote)
            .stdin(if direction == "upload" {
                Stdio::from(std::fs::File::open("/dev/zero")?)
            } else {
                Stdio::null()
            })
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start the transfer")?;
        let result = (|| {
            let moving = daemon.wait_for_status(
                &format!("a {direction} to be under way"),
                PATIENCE,
                |s| {
                    let b = yensid_tests::cli::builder(s.json(), "b1")?;
                    Ok(u64_at(b, "active")? == 1)
                },
            )?;
            drop(moving);
            // Let bytes flow for a moment, so the pair is busy when its builder dies.
            wait_until(&format!("{direction} bytes to flow"), PATIENCE, || {
                let (mut sent, mut received) = (0, 0);
                for line in std::fs::read_to_string(format!("/proc/{}/io", transfer.id()))?.lines()
                {
                    if let Some(v) = line.strip_prefix("wchar: ") {
                        sent = v.trim().parse::<u64>()?;
                    }
                    if let Some(v) = line.strip_prefix("rchar: ") {
                        received = v.trim().parse::<u64>()?;
                    }
                }
                Ok(sent.max(received) > 4 << 20)
            })?;
            let killed = b1.sshd().kill_sessions()?;
            ensure!(killed > 0, "no session process of b1 was found");
            let ended = Instant::now();
            daemon.wait_for_status(
                &format!("the {direction} pair to end after its session died"),
                Duration::from_secs(20),
                |s| {
                    let b = yensid_tests::cli::builder(s.json(), "b1")?;
                    Ok(u64_at(b, "active")? == 0)
                },
            )?;
            eprintln!(
                "{direction}: pair ended {:?} after the session was killed ({dataplane:?})",
                ended.elapsed()
            );
            Ok(())
        })();
        let _ = transfer.kill();
        let _ = transfer.wait();
        result?;
        ensure_kernel_counts_released(&daemon, dataplane)?;
        wait_descriptors_back(&daemon, baseline)?;
    }
    let (served, errors) = real_sessions(&ssh, 1);
    ensure!(
        served == 1,
        "no session after the killed transfers: {errors:?}"
    );
    Ok(())
}

/// Restarts `daemon` with `keys` (`key = value` lines) added to its `[daemon]` table,
/// which the harness's config does not render.
fn restart_with_daemon_keys(daemon: &mut Daemon, keys: &str) -> Result<()> {
    let path = daemon.config_path().to_owned();
    let text = std::fs::read_to_string(&path)?;
    let with_keys = text.replacen("[daemon]\n", &format!("[daemon]\n{keys}\n"), 1);
    ensure!(with_keys != text, "no [daemon] table in {}", path.display());
    let stopped = daemon.stop()?;
    ensure!(stopped.success(), "yensid stopped with {stopped}");
    std::fs::write(&path, with_keys)?;
    daemon.restart()
}

/// One address holding `max_handoffs_per_client` silent connections: its next one is
/// refused with RST at once and counted, while a client at another address is served;
/// once the silent ones are gone, the first address is served again.
fn handoff_caps_refuse_a_flood_not_other_clients(dataplane: Dataplane) -> Result<()> {
    const PER_CLIENT: usize = 4;
    let topology = Topology::new(2)?;
    let config = DaemonConfig::for_topology(&topology, dataplane, Strategy::LeastConnections);
    let mut daemon = Daemon::start(topology.client_ns(), &config)?;
    restart_with_daemon_keys(
        &mut daemon,
        &format!("max_handoffs = 16\nmax_handoffs_per_client = {PER_CLIENT}"),
    )?;
    let raw = topology.raw_client();
    let other = topology.add_client_address(7)?;

    let silent = Holders::start(topology.client_ns(), PER_CLIENT, b"")?;
    daemon.wait_for_status("the silent connections in handoff", PATIENCE, |s| {
        Ok(in_handoff(s)? >= PER_CLIENT as u64)
    })?;
    // The reset may come before the connect returns, or on the first read.
    let answer = match raw.connect(service()) {
        ConnectAttempt::Accepted(mut beyond) => {
            beyond.set_read_timeout(Some(PATIENCE))?;
            let mut byte = [0u8; 1];
            beyond
                .write_all(yensid_tests::tcp::CLIENT_IDENTIFICATION)
                .and_then(|()| beyond.read(&mut byte).map(drop))
        }
        ConnectAttempt::Failed(e) => Err(e),
        other => bail!("a connection beyond max_handoffs_per_client: {other:?}"),
    };
    ensure!(
        matches!(&answer, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "a connection beyond max_handoffs_per_client was not reset: {answer:?}"
    );
    let status = daemon.wait_for_status("the refusal counted", PATIENCE, |s| {
        let handoffs = s.json().get("handoffs").context("no handoffs")?;
        Ok(u64_at(handoffs, "refused")? >= 1)
    })?;
    drop(status);
    let served = topology
        .raw_client()
        .from_source(other)
        .open_ssh(service())?;
    ensure!(
        served.served_by() == "b1" || served.served_by() == "b2",
        "a client at another address was not served"
    );
    let log = daemon.log();
    ensure!(
        log.contains("too many connections in handoff"),
        "the refusal was not logged:\n{log}"
    );
    silent.stop()?;
    drop(served);
    wait_idle(&daemon)?;
    raw.banner(service())?;
    Ok(())
}
