//! An unprivileged local user against the control socket: without a group it cannot
//! connect; with one, a non-member is turned away before it sends a byte, a member's
//! gigabyte request line and ten thousand idle connections cost the daemon no memory
//! and few descriptors, and every malformed request gets an error reply. Meanwhile
//! the daemon answers root and serves ssh sessions.
//!
//! The hostile user is `nobody` (65534), in group `nogroup` (the configured read
//! group: a member) or `users` (not a member). Its requests are made from a thread of
//! this (root) test process that dropped its own credentials with raw `setresuid`
//! and friends: unlike the libc wrappers, the raw system calls change only the
//! calling thread, and the kernel records the connecting thread's credentials
//! (`SO_PEERCRED`, `SO_PEERGROUPS`). Its sockets stay with the test, which counts and
//! closes them.

use std::fs;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use yensid_tests::daemon::Descriptors;
use yensid_tests::wait::wait_until;
use yensid_tests::{Daemon, DaemonConfig, Dataplane, Strategy, Topology, service};

const NOBODY: u32 = 65534;
const NOGROUP: u32 = 65534;
const USERS: u32 = 100;
/// What the issue allows an unprivileged user to add to the daemon.
const RSS_ALLOWANCE_KIB: u64 = 16 * 1024;
const FD_ALLOWANCE: usize = 64;
const GIB: u64 = 1 << 30;
const IDLE_ATTEMPTS: usize = 10_000;
/// Only against hangs: the daemon answers in milliseconds.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);

/// The instance's control socket: `<runtime_dir>/<instance>.sock`, the instance being
/// the last component of the pin path (the harness puts runtime_dir beside the
/// config file).
fn control_socket(daemon: &Daemon) -> Result<PathBuf> {
    let instance = daemon
        .pin_path()
        .file_name()
        .context("pin path without a name")?
        .to_string_lossy()
        .into_owned();
    let dir = daemon
        .config_path()
        .parent()
        .context("config without a directory")?;
    Ok(dir.join("run").join(format!("{instance}.sock")))
}

/// Runs `work` on a thread whose credentials are `uid`, `gid` and no supplementary
/// groups. Only that thread changes (raw system calls, not the libc wrappers that
/// change every thread); it ends with `work`, since it cannot become root again.
fn as_user<T: Send>(uid: u32, gid: u32, work: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: plain system calls on this thread's credentials; no memory is
                // passed but a null list of zero groups.
                let dropped = unsafe {
                    libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) == 0
                        && libc::syscall(libc::SYS_setresgid, gid, gid, gid) == 0
                        && libc::syscall(libc::SYS_setresuid, uid, uid, uid) == 0
                };
                ensure!(
                    dropped,
                    "cannot become uid {uid} gid {gid}: {}",
                    std::io::Error::last_os_error()
                );
                // SAFETY: no arguments.
                ensure!(unsafe { libc::geteuid() } == uid, "still root");
                work()
            })
            .join()
            .unwrap_or_else(|_| bail!("the thread as uid {uid} panicked"))
    })
}

/// The daemon's resident memory, in KiB.
fn vm_rss_kib(pid: u32) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")
}

/// The daemon's open descriptors other than pipes: the ssh sessions served here
/// may leave empty pipes in the relay's pool, which are not control connections.
fn descriptors(pid: u32) -> Result<usize> {
    Ok(Descriptors::of(pid)?.others)
}

/// A connection with timeouts, so nothing here can hang.
fn connect(socket: &Path) -> Result<UnixStream> {
    let stream =
        UnixStream::connect(socket).with_context(|| format!("connect to {}", socket.display()))?;
    stream.set_read_timeout(Some(REPLY_TIMEOUT))?;
    stream.set_write_timeout(Some(REPLY_TIMEOUT))?;
    Ok(stream)
}

/// A connect that never waits: a full listen queue is `WouldBlock`.
fn connect_nonblocking(socket: &Path) -> std::io::Result<UnixStream> {
    // SAFETY: creates a socket; the descriptor is owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: all-zero is a valid sockaddr_un.
    let mut address: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    address.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let path = socket.as_os_str().as_bytes();
    if path.len() >= address.sun_path.len() {
        return Err(std::io::Error::new(
            ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    for (to, from) in address.sun_path.iter_mut().zip(path) {
        *to = *from as libc::c_char;
    }
    // SAFETY: a valid address of the size given.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&raw const address).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(UnixStream::from(fd))
}

/// Reads the daemon's one reply line: `(ok, message)`.
fn read_reply(stream: &UnixStream) -> Result<(bool, String)> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(REPLY_TIMEOUT))?;
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .context("read the reply")?;
    let reply: Value =
        serde_json::from_str(&line).with_context(|| format!("reply is no JSON: {line:?}"))?;
    Ok((
        reply["ok"].as_bool().context("no ok")?,
        reply["message"].as_str().context("no message")?.to_owned(),
    ))
}

/// Sends `bytes`, ends the request, and reads the reply.
fn exchange(socket: &Path, bytes: &[u8]) -> Result<(bool, String)> {
    let mut stream = connect(socket)?;
    stream.write_all(bytes)?;
    stream.shutdown(std::net::Shutdown::Write)?;
    read_reply(&stream)
}

fn start(topology: &Topology, read_group: Option<&str>) -> Result<Daemon> {
    let mut config =
        DaemonConfig::for_topology(topology, Dataplane::Kernel, Strategy::LeastConnections);
    config.read_group = read_group.map(str::to_owned);
    Daemon::start(topology.client_ns(), &config)
}

/// Without `read_group` or `control_group` the socket is root's alone: `0600`, and
/// `nobody` cannot even connect.
#[test]
fn without_a_group_the_control_socket_is_roots_alone() -> Result<()> {
    if !yensid_tests::privileged_or_skip(
        "hostile_control::without_a_group_the_control_socket_is_roots_alone",
    ) {
        return Ok(());
    }
    let topology = Topology::new(1)?;
    let daemon = start(&topology, None)?;
    let socket = control_socket(&daemon)?;
    let mode = fs::metadata(&socket)?.permissions().mode() & 0o777;
    ensure!(mode == 0o600, "{}: mode {mode:o}", socket.display());
    let refused = as_user(NOBODY, NOGROUP, || Ok(UnixStream::connect(&socket)))?;
    ensure!(
        refused.as_ref().err().map(std::io::Error::kind) == Some(ErrorKind::PermissionDenied),
        "nobody connected to a 0600 socket: {refused:?}"
    );
    let denied = daemon.cli_as(NOBODY, NOGROUP, &["status"]);
    let why = format!(
        "{:#}",
        denied.as_ref().err().context("nobody got a status")?
    );
    ensure!(
        why.contains("not allowed to talk to the daemon"),
        "nobody's status: {why}"
    );
    daemon.status().context("root's status")?;
    Ok(())
}

/// With `read_group = "nogroup"`: a non-member that sends nothing still gets one line
/// naming the group that would let it in, and the connection ends; a member's
/// `yensid status` works.
#[test]
fn a_non_member_is_turned_away_before_it_sends_a_byte() -> Result<()> {
    if !yensid_tests::privileged_or_skip(
        "hostile_control::a_non_member_is_turned_away_before_it_sends_a_byte",
    ) {
        return Ok(());
    }
    let topology = Topology::new(1)?;
    let daemon = start(&topology, Some("nogroup"))?;
    let socket = control_socket(&daemon)?;
    let mode = fs::metadata(&socket)?.permissions().mode() & 0o777;
    ensure!(mode == 0o666, "{}: mode {mode:o}", socket.display());

    let (reply, rest) = as_user(NOBODY, USERS, || {
        let stream = connect(&socket)?;
        let reply = read_reply(&stream)?;
        // Nothing after the line: the daemon closed.
        let mut rest = Vec::new();
        let _ = (&stream).read_to_end(&mut rest);
        Ok((reply, rest))
    })?;
    let (ok, message) = reply;
    ensure!(
        !ok && message.contains("daemon.read_group (`nogroup`)")
            && message.contains("uid 65534 is not a member"),
        "a silent non-member was told: {message}"
    );
    ensure!(rest.is_empty(), "more after the refusal: {rest:?}");

    let doc: Value =
        serde_json::from_str(&daemon.cli_as(NOBODY, NOGROUP, &["status", "--json"])?)?;
    ensure!(
        doc["pid"].as_u64() == Some(u64::from(daemon.pid())),
        "a member's status: {doc}"
    );
    Ok(())
}

/// A member (and a non-member) streaming a 1 GiB request line: the daemon reads at
/// most 4 KiB of it, answers with an error and closes, and its RSS grows by less than
/// 16 MiB.
#[test]
fn a_gigabyte_request_line_is_cut_off_at_the_cap() -> Result<()> {
    if !yensid_tests::privileged_or_skip(
        "hostile_control::a_gigabyte_request_line_is_cut_off_at_the_cap",
    ) {
        return Ok(());
    }
    let topology = Topology::new(1)?;
    let daemon = start(&topology, Some("nogroup"))?;
    let socket = control_socket(&daemon)?;
    let before = vm_rss_kib(daemon.pid())?;
    for (gid, expected) in [
        (NOGROUP, "request longer than 4096 bytes"),
        (USERS, "permission denied"),
    ] {
        let (sent, reply) = as_user(NOBODY, gid, || {
            let mut stream = connect(&socket)?;
            let chunk = vec![b'{'; 1 << 20];
            let mut sent = 0u64;
            while sent < GIB {
                match stream.write(&chunk) {
                    Ok(n) => sent += n as u64,
                    Err(_) => break,
                }
            }
            Ok((sent, read_reply(&stream)))
        })?;
        let (ok, message) =
            reply.with_context(|| format!("gid {gid}: no reply after {sent} bytes"))?;
        ensure!(
            sent < GIB,
            "gid {gid}: the daemon took the whole GiB (reply: {message})"
        );
        ensure!(
            !ok && message.starts_with(expected),
            "gid {gid}: after {sent} bytes the reply was: {message}"
        );
    }
    let after = vm_rss_kib(daemon.pid())?;
    eprintln!("daemon RSS {before} KiB before two 1 GiB request lines, {after} KiB after");
    ensure!(
        after < before + RSS_ALLOWANCE_KIB,
        "RSS grew from {before} KiB to {after} KiB"
    );
    let doc: Value =
        serde_json::from_str(&daemon.cli_as(NOBODY, NOGROUP, &["status", "--json"])?)?;
    ensure!(
        doc["pid"].as_u64() == Some(u64::from(daemon.pid())),
        "{doc}"
    );
    Ok(())
}

/// One member opens as many idle connections as it can, up to 10,000 attempts, and
/// holds them: the daemon's descriptors grow by at most 64, the ones it did not keep
/// are told why, root still gets its status, both builders stay healthy (probes
/// still run) and ssh sessions are served. Once the user lets go, the descriptors
/// come back.
#[test]
fn ten_thousand_idle_connections_cost_at_most_64_descriptors() -> Result<()> {
    if !yensid_tests::privileged_or_skip(
        "hostile_control::ten_thousand_idle_connections_cost_at_most_64_descriptors",
    ) {
        return Ok(());
    }
    let topology = Topology::new(2)?;
    let daemon = start(&topology, Some("nogroup"))?;
    let socket = control_socket(&daemon)?;
    let pid = daemon.pid();
    let baseline = descriptors(pid)?;

    // Root samples the daemon's descriptors while nobody floods.
    let flooding = AtomicBool::new(true);
    let (flood, most) = std::thread::scope(|scope| {
        let sampler = scope.spawn(|| {
            let mut most = 0;
            while flooding.load(Ordering::Relaxed) {
                most = most.max(descriptors(pid).unwrap_or(0));
                std::thread::sleep(Duration::from_millis(1));
            }
            most
        });
        let flood = as_user(NOBODY, NOGROUP, || {
            let mut held = Vec::new();
            let (mut busy, mut limit) = (0, None);
            for attempt in 0..IDLE_ATTEMPTS {
                match connect_nonblocking(&socket) {
                    Ok(stream) => held.push(stream),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => busy += 1,
                    Err(e) if e.raw_os_error() == Some(libc::EMFILE) => {
                        limit = Some(attempt);
                        break;
                    }
                    Err(e) => return Err(e).context(format!("connect attempt {attempt}")),
                }
            }
            Ok((held, busy, limit))
        });
        flooding.store(false, Ordering::Relaxed);
        (flood, sampler.join().unwrap_or(usize::MAX))
    });
    let (held, busy, limit) = flood?;
    let mut most = most.max(descriptors(pid)?);
    ensure!(
        held.len() > 64,
        "only {} connections held ({busy} found the queue full, own limit at {limit:?})",
        held.len()
    );

    let status = daemon.status().context("root's status during the flood")?;
    for builder in ["b1", "b2"] {
        ensure!(
            status.builder_state(builder)? == "healthy",
            "{builder} during the flood: {}",
            status.json()
        );
    }
    let ssh = topology.ssh_client()?;
    for _ in 0..2 {
        ssh.served_by(service())
            .context("an ssh session during the flood")?;
    }
    most = most.max(descriptors(pid)?);
    ensure!(
        most <= baseline + FD_ALLOWANCE,
        "descriptors went from {baseline} to {most} with {} idle connections held",
        held.len()
    );
    let last = held.last().context("none held")?;
    let (ok, message) = read_reply(last).context("the last connection's reply")?;
    ensure!(
        !ok && message.contains("too many connections: uid 65534 already has 8 open"),
        "the last of {} connections was told: {message}",
        held.len()
    );
    eprintln!(
        "{} connections held by one user ({busy} found the queue full, own limit at \
         {limit:?}); daemon descriptors {baseline} -> at most {most}",
        held.len()
    );

    drop(held);
    wait_until("descriptors back to baseline", SETTLE_TIMEOUT, || {
        Ok(descriptors(pid)? <= baseline + 4)
    })?;
    daemon.status().context("root's status after the flood")?;
    Ok(())
}

/// Garbage, invalid JSON, an unknown verb, invalid UTF-8, escape sequences, an empty
/// line, a request cut off: each gets an error reply that says what was wrong, with
/// the bytes escaped, for a member as for root; no raw control byte reaches the log.
#[test]
fn every_malformed_request_gets_an_error_reply() -> Result<()> {
    if !yensid_tests::privileged_or_skip(
        "hostile_control::every_malformed_request_gets_an_error_reply",
    ) {
        return Ok(());
    }
    let topology = Topology::new(1)?;
    let daemon = start(&topology, Some("nogroup"))?;
    let socket = control_socket(&daemon)?;
    let cases: &[(&[u8], &[&str])] = &[
        (
            b"\x00\x01\x02 garbage\n",
            &["request is not JSON", "\\x00\\x01\\x02 garbage"],
        ),
        (
            b"{\"verb\": status}\n",
            &["request is not JSON", "{\\\"verb\\\": status}"],
        ),
        (
            b"{\"verb\":\"reboot\"}\n",
            &["unknown request", "unknown variant `reboot`"],
        ),
        (
            b"{\"verb\":\"drain\"}\n",
            &["unknown request", "missing field `builder`"],
        ),
        (
            b"\xff\xfe\xfd\n",
            &["request is not UTF-8", "\\xff\\xfe\\xfd"],
        ),
        (
            b"\x1b[2J\x1b]0;pwned\x07\n",
            &["request is not JSON", "\\x1b[2J\\x1b]0;pwned\\x07"],
        ),
        (
            b"{\"verb\":\"\\u001b[31m\"}\n",
            &["unknown request", "\\x1b[31m"],
        ),
        (b"\n", &["empty request"]),
        (b"{\"verb\":", &["request is not JSON", "EOF while parsing"]),
    ];
    for (uid, gid) in [(NOBODY, NOGROUP), (0, 0)] {
        let replies = as_user(uid, gid, || {
            cases
                .iter()
                .map(|(bytes, _)| exchange(&socket, bytes))
                .collect::<Result<Vec<_>>>()
        })?;
        for ((bytes, expected), (ok, message)) in cases.iter().zip(replies) {
            ensure!(
                !ok && expected.iter().all(|e| message.contains(e))
                    && !message.chars().any(char::is_control),
                "uid {uid} sent {bytes:?}; the reply was: {message:?}"
            );
        }
    }
    let (ok, _) = as_user(NOBODY, NOGROUP, || {
        exchange(&socket, b"{\"verb\":\"status\"}\n")
    })?;
    ensure!(
        ok,
        "a member's well-formed status after the bad ones failed"
    );
    let log = daemon.log();
    ensure!(
        !log.contains('\x1b') && !log.contains('\x07'),
        "a raw control byte reached the log"
    );
    Ok(())
}

/// Sets the soft descriptor limit of process `pid`; returns the limits it had.
fn set_soft_nofile(pid: u32, soft: u64) -> Result<libc::rlimit> {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: reads the limits into `old`.
    ensure!(
        unsafe { libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old) } == 0,
        "prlimit {pid}: {}",
        std::io::Error::last_os_error()
    );
    let new = libc::rlimit {
        rlim_cur: soft,
        rlim_max: old.rlim_max,
    };
    // SAFETY: sets the limits from `new`.
    ensure!(
        unsafe { libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, &new, std::ptr::null_mut()) } == 0,
        "prlimit {pid}: {}",
        std::io::Error::last_os_error()
    );
    Ok(old)
}

/// With no descriptor it may open (its soft limit lowered below what it has open), the
/// daemon cannot accept: it says so once and retries at a growing interval
/// (at most 8 steps up to one a second) instead of spinning; once descriptors are free
/// again it accepts the connection that waited, answers it, and says how many
/// attempts failed.
#[test]
fn a_full_descriptor_table_pauses_the_control_socket_without_spinning() -> Result<()> {
    if !yensid_tests::privileged_or_skip(
        "hostile_control::a_full_descriptor_table_pauses_the_control_socket_without_spinning",
    ) {
        return Ok(());
    }
    let topology = Topology::new(1)?;
    let daemon = start(&topology, None)?;
    let socket = control_socket(&daemon)?;
    let pid = daemon.pid();
    let since = std::time::SystemTime::now();
    // EMFILE is about the lowest free descriptor number: below 3, none is free.
    let old = set_soft_nofile(pid, 3)?;
    let started = std::time::Instant::now();
    let mut waiting = connect(&socket)?;
    waiting.write_all(b"{\"verb\":\"status\"}\n")?;
    let first = daemon.wait_for_log(
        &[
            "cannot accept connections: backing off",
            "socket=\"control\"",
        ],
        since,
        SETTLE_TIMEOUT,
    );
    // The fault lasts a few seconds, so a spinning loop would fail millions of times.
    std::thread::sleep(Duration::from_secs(3));
    set_soft_nofile(pid, old.rlim_cur)?;
    first?;
    let (ok, message) = read_reply(&waiting).context("the waiting connection's reply")?;
    let elapsed = started.elapsed().as_secs();
    ensure!(
        ok && message.contains("\"pid\""),
        "after the pause: {message}"
    );
    let again = daemon.wait_for_log(
        &["accepting connections again", "socket=\"control\""],
        since,
        SETTLE_TIMEOUT,
    )?;
    let failures: u64 = again
        .text
        .split_once("failures=")
        .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
        .context("no failure count")?;
    ensure!(
        failures >= 1 && failures <= 8 + elapsed,
        "{failures} failed accepts in {elapsed} s: {}",
        again.text
    );
    let backing_off = daemon
        .log_since(since)
        .iter()
        .filter(|l| l.contains_all(&["backing off", "socket=\"control\""]))
        .count();
    ensure!(
        backing_off == 1,
        "{backing_off} back-off lines for one burst"
    );
    Ok(())
}
