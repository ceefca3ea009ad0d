//! Bytes through the service: real ssh sessions, 1 GiB each way byte-exact, and
//! clients that do not speak SSH.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak, mpsc};
use std::thread;
use std::time::{Duration, SystemTime};

use anyhow::{Result, ensure};
use yensid_tests::{
    Daemon, DaemonConfig, Dataplane, Forward, Launch, RandomFile, SshClient, Strategy, Topology,
    service,
};

common::dataplane_tests!(
    ssh_sessions_reach_both_builders_under_one_host_name,
    one_gib_each_way_is_byte_exact,
    junk_clients_are_closed_and_service_goes_on,
    half_close_after_the_last_byte_is_passed_on,
);

const GIB: u64 = 1 << 30;
/// Only against hangs: a GiB through ssh takes seconds to a minute here.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(900);

/// Real ssh with StrictHostKeyChecking=yes and both builders' keys under 127.0.0.22:
/// sessions land on both builders and every one is accepted.
fn ssh_sessions_reach_both_builders_under_one_host_name(dataplane: Dataplane) -> Result<()> {
    let topology = Topology::new(2)?;
    let config = DaemonConfig::for_topology(&topology, dataplane, Strategy::RoundRobin);
    let daemon = Daemon::start(topology.client_ns(), &config)?;
    let ssh = topology.ssh_client()?;

    let served = (0..4)
        .map(|_| ssh.served_by(service()))
        .collect::<Result<BTreeSet<_>>>()?;
    ensure!(
        served == BTreeSet::from(["b1".to_owned(), "b2".to_owned()]),
        "4 round-robin sessions were served by {served:?}"
    );
    let counts = daemon.expect_data_path(dataplane)?;
    ensure!(
        counts.spliced + counts.copied == 4,
        "4 sessions, the daemon recorded {counts:?}"
    );
    // The human status shows it too: two sessions per builder, all on this path.
    let table = daemon.cli(&["status"])?;
    let per_builder = match dataplane {
        Dataplane::Kernel => "2 (2/0)",
        Dataplane::Userspace => "2 (0/2)",
    };
    ensure!(
        table.contains("TOTAL (SPLICED/COPIED)") && table.matches(per_builder).count() == 2,
        "`yensid status` after two {} sessions per builder:\n{table}",
        dataplane.as_str()
    );
    Ok(())
}

/// 1 GiB of random bytes up (`sha256sum` on the builder) and down (`cat` on the
/// builder, `sha256sum` here) through the service match the file's digest.
fn one_gib_each_way_is_byte_exact(dataplane: Dataplane) -> Result<()> {
    let payload = shared_payload()?;
    let topology = Topology::new(2)?;
    let config = DaemonConfig::for_topology(&topology, dataplane, Strategy::RoundRobin);
    let daemon = Daemon::start(topology.client_ns(), &config)?;
    let ssh = topology.ssh_client()?;

    up_and_down_intact(&ssh, &payload)?;
    let counts = daemon.expect_data_path(dataplane)?;
    ensure!(
        counts.spliced + counts.copied == 2,
        "2 transfers, the daemon recorded {counts:?}"
    );
    Ok(())
}

/// `payload` up (`sha256sum` on the builder) and down (`cat` on the builder,
/// `sha256sum` here) through the service, each matching the file's digest.
fn up_and_down_intact(ssh: &SshClient, payload: &RandomFile) -> Result<()> {
    let uploaded = ssh.run_with_input(service(), "sha256sum", payload.path(), TRANSFER_TIMEOUT)?;
    let uploaded = yensid_tests::payload::sha256_of_output(&uploaded)?;
    ensure!(
        uploaded == payload.sha256(),
        "upload corrupted: builder got {uploaded}, sent {}",
        payload.sha256()
    );
    let downloaded = ssh.run_digesting_output(
        service(),
        &format!("cat {}", payload.path().display()),
        TRANSFER_TIMEOUT,
    )?;
    ensure!(
        downloaded == payload.sha256(),
        "download corrupted: got {downloaded}, builder sent {}",
        payload.sha256()
    );
    Ok(())
}

/// A client that sends HTTP is closed, without ever being put through to a builder,
/// and so is one that hangs up at once; afterwards real sessions still work.
fn junk_clients_are_closed_and_service_goes_on(dataplane: Dataplane) -> Result<()> {
    let topology = Topology::new(2)?;
    let config = DaemonConfig::for_topology(&topology, dataplane, Strategy::RoundRobin);
    let daemon = Daemon::start(topology.client_ns(), &config)?;
    let raw = topology.raw_client();

    for _ in 0..10 {
        let reply = raw.send_junk(service(), b"GET / HTTP/1.0\r\n\r\n")?;
        let received = String::from_utf8_lossy(&reply.received);
        ensure!(
            reply.closed,
            "an HTTP client was left open (got {received:?})"
        );
        ensure!(
            !received.contains("SSH-"),
            "an HTTP client was put through to a builder: {received:?}"
        );
        drop(raw.connect(service()).accepted()?);
    }
    let ssh = topology.ssh_client()?;
    for _ in 0..2 {
        let served = ssh.served_by(service())?;
        ensure!(
            served == "b1" || served == "b2",
            "after junk, served by {served}"
        );
    }
    // The clients that hung up during the handoff were forwarded no byte: only the two
    // sessions count.
    let counts = daemon.expect_data_path(dataplane)?;
    ensure!(
        counts.spliced + counts.copied == 2,
        "2 sessions after junk, the daemon recorded {counts:?}"
    );
    Ok(())
}

/// A client that half-closes only after the builder has answered everything it sent
/// (so its FIN travels alone, after every data byte was forwarded) still gets the
/// builder's reply to that FIN, and the builder sees a clean end of stream.
fn half_close_after_the_last_byte_is_passed_on(dataplane: Dataplane) -> Result<()> {
    let topology = Topology::new(1)?;
    let builder = &topology.builders()[0];
    let address = SocketAddr::from((builder.address(), HALF_CLOSE_PORT));
    let (served, outcome) = mpsc::channel();
    // Every connection gets a thread: the daemon's health probes connect too, and hang
    // up after the identification line. Stopped and joined before the topology goes,
    // so its socket does not keep the builder's namespace alive.
    let _builder =
        HalfCloseBuilder::start(builder.ns().run(|| TcpListener::bind(address))??, served)?;
    let mut config = DaemonConfig::for_topology(&topology, dataplane, Strategy::RoundRobin);
    config.builder_mut(builder.name()).address = address;
    let daemon = Daemon::start(topology.client_ns(), &config)?;

    let stream = topology.raw_client().connect(service()).accepted()?;
    stream.set_read_timeout(Some(STEP_TIMEOUT))?;
    let mut reader = BufReader::new(&stream);
    (&stream).write_all(b"SSH-2.0-half-close-client\r\n")?;
    let mut line = Vec::new();
    reader.read_until(b'\n', &mut line)?;
    (&stream).write_all(&SSH_PACKET)?;
    let mut packet = [0u8; SSH_PACKET.len()];
    reader.read_exact(&mut packet)?;
    (&stream).write_all(b"ping")?;
    let mut pong = [0u8; 4];
    reader.read_exact(&mut pong)?;
    ensure!(&pong == b"pong", "expected pong, got {pong:?}");
    stream.shutdown(Shutdown::Write)?;
    let mut reply = Vec::new();
    let read = reader.read_to_end(&mut reply);
    outcome.recv_timeout(STEP_TIMEOUT)??;
    read?;
    ensure!(
        reply == b"bye",
        "after the half-close the client got {reply:?}"
    );
    drop(reader);
    drop(stream);
    let counts = daemon.expect_data_path(dataplane)?;
    ensure!(
        counts.spliced + counts.copied == 1,
        "one connection, the daemon recorded {counts:?}"
    );
    Ok(())
}

/// The half-close test's builder: a listener on a thread of its own, serving each
/// connection on another; stopped, and every thread joined, on drop.
struct HalfCloseBuilder {
    stop: Arc<AtomicBool>,
    acceptor: Option<thread::JoinHandle<()>>,
}

impl HalfCloseBuilder {
    fn start(listener: TcpListener, served: mpsc::Sender<Result<()>>) -> Result<Self> {
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let acceptor = {
            let stop = stop.clone();
            thread::spawn(move || {
                let mut serving = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            let served = served.clone();
                            serving.push(thread::spawn(move || {
                                if stream.set_nonblocking(false).is_err() {
                                    return;
                                }
                                if let Some(result) = serve_half_close(&stream) {
                                    let _ = served.send(result);
                                }
                            }));
                        }
                        Err(_) => thread::sleep(Duration::from_millis(20)),
                    }
                }
                // Each connection thread ends within its read timeout.
                for thread in serving {
                    let _ = thread.join();
                }
            })
        };
        Ok(Self {
            stop,
            acceptor: Some(acceptor),
        })
    }
}

impl Drop for HalfCloseBuilder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

/// The builder's side: the opening, then `ping` -> `pong`, then end of stream ->
/// `bye`. `None` for a connection that hung up before its `ping` (a health probe).
fn serve_half_close(stream: &TcpStream) -> Option<Result<()>> {
    let opening = || -> std::io::Result<BufReader<&TcpStream>> {
        stream.set_read_timeout(Some(STEP_TIMEOUT))?;
        let mut reader = BufReader::new(stream);
        (&*stream).write_all(b"SSH-2.0-half-close-builder\r\n")?;
        let mut line = Vec::new();
        reader.read_until(b'\n', &mut line)?;
        (&*stream).write_all(&SSH_PACKET)?;
        let mut packet = [0u8; SSH_PACKET.len()];
        reader.read_exact(&mut packet)?;
        let mut ping = [0u8; 4];
        reader.read_exact(&mut ping)?;
        Ok(reader)
    };
    let mut reader = opening().ok()?;
    Some((|| {
        (&*stream).write_all(b"pong")?;
        let mut rest = Vec::new();
        reader.read_to_end(&mut rest)?;
        ensure!(rest.is_empty(), "after ping, the builder got {rest:?}");
        (&*stream).write_all(b"bye")?;
        Ok(())
    })())
}

/// Where the half-close test's builder listens (sshd keeps port 22).
const HALF_CLOSE_PORT: u16 = 2222;
/// An unencrypted SSH packet (length 12, padding length 4, message 20 KEXINIT,
/// padding): all the handoff needs before it splices.
const SSH_PACKET: [u8; 16] = [0, 0, 0, 12, 4, 20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
/// Only against hangs.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// One 1 GiB file for all transfer tests running at the same time; the last one
/// to finish deletes it.
fn shared_payload() -> Result<Arc<RandomFile>> {
    static SHARED: Mutex<Weak<RandomFile>> = Mutex::new(Weak::new());
    let mut shared = SHARED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(payload) = shared.upgrade() {
        return Ok(payload);
    }
    let payload = Arc::new(RandomFile::create(GIB)?);
    *shared = Arc::downgrade(&payload);
    Ok(payload)
}

/// A client that sends its identification line, KEXINIT and one more packet at once
/// (before the builder said a word) against a real sshd builder, on the kernel path:
/// at the handoff the daemon finds bytes beyond the first packet, so it copies that
/// connection in userspace instead of splicing it, says so, and the builder's reply
/// (its identification line and KEXINIT) still reaches the client. A well-behaved
/// connection next to it is still spliced.
#[test]
fn a_peer_sending_more_before_key_exchange_is_copied_in_userspace() -> Result<()> {
    if !yensid_tests::privileged_or_skip(
        "dataplane::a_peer_sending_more_before_key_exchange_is_copied_in_userspace",
    ) {
        return Ok(());
    }
    let topology = Topology::new(1)?;
    let config = DaemonConfig::for_topology(&topology, Dataplane::Kernel, Strategy::RoundRobin);
    let daemon = Daemon::start(topology.client_ns(), &config)?;
    let raw = topology.raw_client();
    let started = SystemTime::now();

    let eager = raw.open_ssh_eager(service())?;
    ensure!(
        eager.served_by() == "b1" && eager.banner().starts_with("SSH-2.0-OpenSSH"),
        "the eager client got {:?}",
        eager.banner()
    );
    let peer = eager.local_addr()?;
    eager.close()?;
    let counts = daemon.expect_data_path(Dataplane::Userspace)?;
    ensure!(
        counts.copied == 1,
        "one eager connection, the daemon recorded {counts:?}"
    );
    daemon.wait_for_log(
        &[
            "more than one packet before key exchange",
            "copying in userspace",
        ],
        started,
        LOG_WAIT,
    )?;
    let closed = daemon.wait_for_log(
        &["connection closed", &format!("{peer}"), "builder=\"b1\""],
        started,
        LOG_WAIT,
    )?;
    ensure!(
        closed.text.contains("spliced=false"),
        "the eager connection's record: {}",
        closed.text
    );

    // The same client, well-behaved: spliced.
    raw.open_ssh(service())?.close()?;
    let status = daemon.wait_for_status("the second connection recorded", LOG_WAIT, |s| {
        Ok(s.data_path_counts("b1")? == (1, 1) && s.active("b1")? == 0)
    })?;
    ensure!(
        status.data_path_counts("b1")? == (1, 1),
        "one eager and one well-behaved connection: {}",
        status.json()
    );
    Ok(())
}

/// `forward = "splice"` on the kernel dataplane: the kernel still steers (round-robin
/// over both builders, one count per builder that returns to zero) while the daemon
/// moves the bytes with splice(2). 1 GiB up and down through real ssh arrive intact,
/// every session is recorded as copied and none as spliced, and status and `systemctl
/// status`'s line name the forwarding.
#[test]
fn forward_splice_steers_in_the_kernel_and_relays_with_splice() -> Result<()> {
    if !yensid_tests::privileged_or_skip(
        "dataplane::forward_splice_steers_in_the_kernel_and_relays_with_splice",
    ) {
        return Ok(());
    }
    let payload = shared_payload()?;
    let topology = Topology::new(2)?;
    let mut config = DaemonConfig::for_topology(&topology, Dataplane::Kernel, Strategy::RoundRobin);
    config.forward = Some(Forward::Splice);
    let daemon = Daemon::start(topology.client_ns(), &config)?;
    let ssh = topology.ssh_client()?;

    up_and_down_intact(&ssh, &payload)?;
    let served = (0..2)
        .map(|_| ssh.served_by(service()))
        .collect::<Result<BTreeSet<_>>>()?;
    ensure!(
        served == BTreeSet::from(["b1".to_owned(), "b2".to_owned()]),
        "two round-robin sessions after the transfers were served by {served:?}"
    );
    let counts = daemon.expect_data_path(Dataplane::Userspace)?;
    ensure!(
        counts.copied == 4,
        "4 sessions, the daemon recorded {counts:?}"
    );
    let status = daemon.status()?;
    ensure!(
        status.json().get("dataplane").and_then(|v| v.as_str()) == Some("kernel")
            && status.json().get("forward").and_then(|v| v.as_str()) == Some("splice")
            && status.json().get("bpf").and_then(|v| v.as_bool()) == Some(true),
        "status: {}",
        status.json()
    );
    let table = daemon.cli(&["status"])?;
    ensure!(
        table.contains("data path kernel, forwarding by splice"),
        "`yensid status`:\n{table}"
    );
    Ok(())
}

/// With `forward` left out (`auto`) and no file descriptor store (no systemd), nothing
/// could keep a session through a crash of the daemon, so it takes the faster
/// forwarding, splice(2); status says so and why. (Under systemd with a store, `auto`
/// keeps the socket map: tests/tests/systemd.rs.)
#[test]
fn forward_auto_splices_without_a_file_descriptor_store() -> Result<()> {
    if !yensid_tests::privileged_or_skip(
        "dataplane::forward_auto_splices_without_a_file_descriptor_store",
    ) {
        return Ok(());
    }
    let topology = Topology::new(2)?;
    let mut config = DaemonConfig::for_topology(&topology, Dataplane::Kernel, Strategy::RoundRobin);
    config.forward = None;
    let daemon = Daemon::start(topology.client_ns(), &config)?;
    let ssh = topology.ssh_client()?;
    let served = (0..2)
        .map(|_| ssh.served_by(service()))
        .collect::<Result<BTreeSet<_>>>()?;
    ensure!(
        served == BTreeSet::from(["b1".to_owned(), "b2".to_owned()]),
        "two round-robin sessions were served by {served:?}"
    );
    let counts = daemon.expect_data_path(Dataplane::Userspace)?;
    ensure!(
        counts.copied == 2,
        "2 sessions, the daemon recorded {counts:?}"
    );
    let status = daemon.status()?;
    let why = status.json().get("forward_reason").and_then(|v| v.as_str());
    ensure!(
        status.json().get("forward").and_then(|v| v.as_str()) == Some("splice")
            && why.is_some_and(|w| w.starts_with("auto: no file descriptor store")),
        "status: {}",
        status.json()
    );
    let table = daemon.cli(&["status"])?;
    ensure!(
        table.contains(
            "data path kernel, forwarding by splice\nforwarding: auto: no file descriptor store"
        ),
        "`yensid status`:\n{table}"
    );
    Ok(())
}

/// Capabilities the daemon needs for BPF; without them `bpf(2)` refuses to load its
/// programs and maps.
const BPF_CAPABILITIES: &str = "-bpf,-sys_admin,-perfmon";

/// BPF unavailable (the daemon runs without CAP_BPF, CAP_SYS_ADMIN and CAP_PERFMON,
/// keeping CAP_NET_BIND_SERVICE and CAP_NET_ADMIN, so the kernel refuses to load its
/// programs): configured for the kernel path, the daemon says BPF is unavailable, binds
/// the service address itself, and real ssh sessions reach the builders, every one
/// copied in userspace; its status says so (`bpf: false`, `dataplane: userspace`).
#[test]
fn without_bpf_the_daemon_falls_back_to_userspace() -> Result<()> {
    if !yensid_tests::privileged_or_skip(
        "dataplane::without_bpf_the_daemon_falls_back_to_userspace",
    ) {
        return Ok(());
    }
    let topology = Topology::new(2)?;
    let config = DaemonConfig::for_topology(&topology, Dataplane::Kernel, Strategy::RoundRobin);
    let without_bpf = Launch {
        outer: Vec::new(),
        inner: vec![
            "setpriv".to_owned(),
            format!("--inh-caps={BPF_CAPABILITIES}"),
            format!("--bounding-set={BPF_CAPABILITIES}"),
            "--".to_owned(),
        ],
    };
    let daemon = Daemon::start_wrapped(topology.client_ns(), &config, without_bpf)?;
    daemon.wait_for_log(
        &["BPF UNAVAILABLE: falling back to userspace"],
        SystemTime::UNIX_EPOCH,
        LOG_WAIT,
    )?;
    let status = daemon.status()?;
    ensure!(
        status.json()["bpf"] == false && status.json()["dataplane"] == "userspace",
        "status without BPF: {}",
        status.json()
    );

    let ssh = topology.ssh_client()?;
    let served = (0..4)
        .map(|_| ssh.served_by(service()))
        .collect::<Result<BTreeSet<_>>>()?;
    ensure!(
        served == BTreeSet::from(["b1".to_owned(), "b2".to_owned()]),
        "without BPF, 4 round-robin sessions were served by {served:?}"
    );
    let counts = daemon.expect_data_path(Dataplane::Userspace)?;
    ensure!(
        counts.copied == 4,
        "4 sessions without BPF, the daemon recorded {counts:?}"
    );
    Ok(())
}

/// Only against hangs.
const LOG_WAIT: Duration = Duration::from_secs(30);
