//! Reaction times of the yensid kernel path (issue 4, "Measure"): how long after
//! a link event, or after `yensid mode local`, the first claimed connection is
//! refused.
//!
//! The daemon runs on the bench topology with b1 behind a veth labelled
//! `ethernet`, b2 behind one labelled `wifi` and `remote_via = ["ethernet"]`,
//! so losing b1's link leaves no eligible builder. Its probes never take a
//! builder down (`fall` is out of reach): every refusal measured here is the
//! link rule's or the mode's, never health's.
//!
//! One trial: a prober thread in the client namespace makes non-blocking
//! connects to the service in a tight loop (an accepted one is reset at once),
//! the event is triggered, and the trial's figure is the time from the event's
//! time stamp to the moment the prober sees the first ECONNREFUSED. Between
//! trials the event is undone and the next trial waits until b1 serves again.

use std::io;
use std::mem;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use serde_json::{Map, Value, json};
use yensid_tests::{
    ConnectAttempt, Daemon, DaemonConfig, Dataplane, HealthConfig, LinkEnd, LinkKind, Netns,
    PolicyMode, SshConnection, Strategy, Topology, service,
};

use super::figure::percentile_of;
use crate::build;

/// A trial's prober gives up after this long without a refusal.
const PROBE_LIMIT: Duration = Duration::from_secs(10);
/// ... or after this many connection attempts.
const PROBE_ATTEMPTS: usize = 200_000;
/// How long one non-blocking connect may take to complete either way.
const CONNECT_LIMIT: Duration = Duration::from_secs(1);
/// Waiting for b1 to serve again between trials; only against hangs.
const RECOVERY_LIMIT: Duration = Duration::from_secs(30);
/// The kernel reports carrier changes through linkwatch, which runs at most
/// once a second for them, machine-wide: a carrier loss within a second of
/// the previous run is reported up to a second late (and a flap shorter than
/// that may not be reported at all). Carrier-loss trials start this long
/// after b1 served again, so that this bench's own previous carrier events
/// do not delay the next one; link events elsewhere on the machine still can.
const LINKWATCH_SPACING: Duration = Duration::from_millis(2200);

/// What triggers a trial.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Event {
    /// `ip link set <b1's veth, client end> down`: the connected route to b1 goes.
    IpLinkDown,
    /// RTM_NEWLINK clearing IFF_UP on the same veth, sent from this process.
    NetlinkLinkDown,
    /// `ip link set <b1's veth, builder end> down`: the client end loses carrier.
    CarrierLoss,
    /// `yensid mode local --config F`.
    ModeLocal,
}

/// One row of the table.
#[derive(Clone, Copy)]
enum Row {
    /// From the event's first time stamp (before the command or request).
    FromStart(Event),
    /// From the moment the command returned.
    FromReturn(Event),
    /// From the moment the kernel's RTM_NEWLINK for the change reached a
    /// listener in the client namespace, as it reaches the daemon: the
    /// daemon's own reaction.
    FromNotification(Event),
    /// How long the command itself took (spawn to exit).
    CommandTime(Event),
}

const ROWS: [Row; 10] = [
    Row::FromReturn(Event::IpLinkDown),
    Row::FromStart(Event::IpLinkDown),
    Row::FromNotification(Event::IpLinkDown),
    Row::FromStart(Event::NetlinkLinkDown),
    Row::FromNotification(Event::NetlinkLinkDown),
    Row::FromReturn(Event::CarrierLoss),
    Row::FromStart(Event::CarrierLoss),
    Row::FromNotification(Event::CarrierLoss),
    Row::FromStart(Event::ModeLocal),
    Row::CommandTime(Event::ModeLocal),
];

const EVENTS: [Event; 4] = [
    Event::IpLinkDown,
    Event::NetlinkLinkDown,
    Event::CarrierLoss,
    Event::ModeLocal,
];

impl Event {
    fn key(self) -> &'static str {
        match self {
            Self::IpLinkDown => "link_down_ip",
            Self::NetlinkLinkDown => "link_down_netlink",
            Self::CarrierLoss => "carrier_loss_ip",
            Self::ModeLocal => "mode_local",
        }
    }

    /// Whether an RTM_NEWLINK of b1's client-side veth announces the event.
    fn watched(self) -> bool {
        self != Self::ModeLocal
    }

    fn describe(self, client_link: &str, builder_link: &str) -> String {
        match self {
            Self::IpLinkDown => format!(
                "`ip link set {client_link} down` (b1's ethernet, client end: its route goes)"
            ),
            Self::NetlinkLinkDown => format!(
                "RTM_NEWLINK clearing IFF_UP on {client_link}, sent in-process over rtnetlink"
            ),
            Self::CarrierLoss => {
                format!("`ip link set {builder_link} down` (b1's end: {client_link} loses carrier)")
            }
            Self::ModeLocal => "`yensid mode local --config F`".to_owned(),
        }
    }
}

impl Row {
    fn event(self) -> Event {
        match self {
            Self::FromStart(e)
            | Self::FromReturn(e)
            | Self::FromNotification(e)
            | Self::CommandTime(e) => e,
        }
    }

    fn key(self) -> String {
        match self {
            Self::FromStart(Event::NetlinkLinkDown) => "link_down_netlink_from_request".to_owned(),
            Self::FromStart(e) => format!("{}_from_spawn", e.key()),
            Self::FromReturn(e) => format!("{}_from_return", e.key()),
            Self::FromNotification(e) => format!("{}_from_kernel_notification", e.key()),
            Self::CommandTime(e) => format!("{}_command_time", e.key()),
        }
    }

    fn from(self) -> &'static str {
        match self {
            Self::FromStart(Event::NetlinkLinkDown) => {
                "the request was sent (includes the kernel's work)"
            }
            Self::FromStart(Event::ModeLocal) => {
                "the CLI was spawned (includes the CLI and its round trip to the daemon)"
            }
            Self::FromStart(_) => "`ip` was spawned (includes starting `ip`)",
            Self::FromReturn(_) => "`ip` returned",
            Self::FromNotification(_) => {
                "the kernel's RTM_NEWLINK reached a listener in the client namespace (the daemon's own reaction)"
            }
            Self::CommandTime(_) => "(not a reaction: the CLI's own run time, spawn to exit)",
        }
    }

    fn value(self, trial: &Trial) -> Option<Duration> {
        Some(match self {
            Self::FromStart(_) => trial.refused.saturating_duration_since(trial.started),
            Self::FromReturn(_) => trial.refused.saturating_duration_since(trial.returned),
            Self::FromNotification(_) => trial.refused.saturating_duration_since(trial.notified?),
            Self::CommandTime(_) => trial.returned.saturating_duration_since(trial.started),
        })
    }
}

/// One trial's time stamps.
#[derive(Clone, Copy)]
struct Trial {
    /// Before the command was spawned or the request sent.
    started: Instant,
    /// When the command returned (or the request was acknowledged).
    returned: Instant,
    /// When the prober saw the first ECONNREFUSED.
    refused: Instant,
    /// When the kernel's RTM_NEWLINK for a link event was received.
    notified: Option<Instant>,
    /// Connection attempts the prober made from the event to the refusal.
    attempts: usize,
    /// Attempts in the whole trial whose SYN nobody answered in time.
    unanswered: usize,
}

/// Every series of one run.
pub struct Reactions {
    trials: usize,
    client_link: String,
    builder_link: String,
    series: Vec<(Event, Result<Vec<Trial>, String>)>,
    notes: Vec<String>,
}

/// Runs every series on `topology` with the daemon `yensid`, `trials` trials each.
pub fn measure(yensid: &Path, topology: &Topology, trials: usize) -> Reactions {
    let b1 = topology.builder("b1");
    let mut reactions = Reactions {
        trials,
        client_link: b1.client_link().to_owned(),
        builder_link: b1.builder_link().to_owned(),
        series: Vec::new(),
        notes: Vec::new(),
    };
    build::progress("measuring reaction times (yensid kernel path)");
    let daemon = match start_daemon(yensid, topology) {
        Ok(daemon) => daemon,
        Err(e) => {
            reactions.notes.push(format!("could not start: {e:#}"));
            for event in EVENTS {
                reactions
                    .series
                    .push((event, Err("not started".to_owned())));
            }
            return reactions;
        }
    };
    for event in EVENTS {
        let result = series(event, &daemon, topology, trials).map_err(|e| format!("{e:#}"));
        match &result {
            Ok(samples) => {
                for row in ROWS.into_iter().filter(|r| r.event() == event) {
                    let values = sorted(samples, row);
                    if values.is_empty() {
                        continue;
                    }
                    build::progress(&format!(
                        "  {}: p50 {} ms, p99 {} ms (from {})",
                        event.key(),
                        millis(percentile_of(&values, 50)),
                        millis(percentile_of(&values, 99)),
                        row.from()
                    ));
                }
            }
            Err(e) => build::progress(&format!("  {}: FAILED: {e}", event.key())),
        }
        reactions.series.push((event, result));
    }
    reactions.notes.extend(finish(daemon));
    reactions
}

/// b1 over ethernet, b2 over wifi, only ethernet allowed; probes that never
/// take a builder down.
fn start_daemon(yensid: &Path, topology: &Topology) -> Result<Daemon> {
    let mut config =
        DaemonConfig::for_topology(topology, Dataplane::Kernel, Strategy::LeastConnections);
    config.policy.rules.remote_via = Some(vec![LinkKind::Ethernet]);
    config.links = vec![
        (
            topology.builder("b1").client_link().to_owned(),
            LinkKind::Ethernet,
        ),
        (
            topology.builder("b2").client_link().to_owned(),
            LinkKind::Wifi,
        ),
    ];
    config.health = Some(HealthConfig {
        interval: Some(Duration::from_secs(1)),
        max_interval: Some(Duration::from_secs(1)),
        fall: Some(1_000_000),
        ..HealthConfig::default()
    });
    Daemon::start_binary(yensid, topology.client_ns(), &config)
}

/// Stops the daemon; what its log says about the run.
fn finish(mut daemon: Daemon) -> Vec<String> {
    let stopped = daemon.stop();
    let log = daemon.log();
    let mut notes = Vec::new();
    match stopped {
        Ok(status) if status.success() => {}
        Ok(status) => notes.push(format!("the daemon exited with {status}")),
        Err(e) => notes.push(format!("the daemon did not stop cleanly: {e:#}")),
    }
    // Refusing is what the trials are about; anything else is news.
    notes.extend(
        log.lines()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .filter(|l| !l.contains("service refuses connections"))
            .take(5)
            .map(|l| format!("daemon log: {}", l.trim())),
    );
    notes
}

/// `trials` trials of `event`, each followed by its undoing and the wait until
/// b1 serves again.
fn series(event: Event, daemon: &Daemon, topology: &Topology, trials: usize) -> Result<Vec<Trial>> {
    let client_ns = topology.client_ns();
    let b1 = topology.builder("b1");
    wait_until_served(client_ns).context("before the first trial")?;
    let mut results = Vec::with_capacity(trials);
    for i in 0..trials {
        if event == Event::CarrierLoss {
            thread::sleep(LINKWATCH_SPACING);
        }
        let watched = event.watched().then_some(b1.client_link());
        let trial = probe_around(client_ns, watched, || match event {
            Event::IpLinkDown => timed(|| topology.set_link("b1", LinkEnd::Client, false)),
            Event::CarrierLoss => timed(|| topology.set_link("b1", LinkEnd::Builder, false)),
            Event::NetlinkLinkDown => {
                client_ns.run(|| set_link_netlink(b1.client_link(), false))?
            }
            // `yensid mode local --config F`: spawned and waited for.
            Event::ModeLocal => timed(|| daemon.set_mode(PolicyMode::Local, None).map(drop)),
        })
        .with_context(|| format!("trial {i}"));
        // Undo the event even when the trial failed, so the next series starts clean.
        let undone = match event {
            Event::IpLinkDown | Event::NetlinkLinkDown => {
                topology.set_link("b1", LinkEnd::Client, true)
            }
            Event::CarrierLoss => topology.set_link("b1", LinkEnd::Builder, true),
            Event::ModeLocal => daemon.reset_mode().map(drop),
        };
        let trial = trial?;
        undone.with_context(|| format!("undo trial {i}"))?;
        wait_until_served(client_ns).with_context(|| format!("after trial {i}"))?;
        results.push(trial);
    }
    Ok(results)
}

/// Runs `f`; its start and end.
fn timed(f: impl FnOnce() -> Result<()>) -> Result<(Instant, Instant)> {
    let started = Instant::now();
    f()?;
    Ok((started, Instant::now()))
}

/// Starts the prober, waits until it has had a connection accepted, runs
/// `trigger` (which returns its start and end time stamps) and waits for the
/// prober's first refusal.
fn probe_around(
    client_ns: &Netns,
    watched: Option<&str>,
    trigger: impl FnOnce() -> Result<(Instant, Instant)>,
) -> Result<Trial> {
    let accepting = AtomicBool::new(false);
    let armed = AtomicBool::new(false);
    let stop = AtomicBool::new(false);
    // Subscribed before the event, so its notification cannot be missed.
    let listener = match watched {
        Some(ifname) => Some(client_ns.run(|| LinkListener::new(ifname))??),
        None => None,
    };
    thread::scope(|scope| {
        let notification = listener
            .as_ref()
            .map(|listener| scope.spawn(|| listener.wait_down(&stop)));
        let prober = scope.spawn(|| {
            client_ns
                .run(|| probe(service(), &accepting, &armed, &stop))
                .and_then(|r| r)
        });
        let deadline = Instant::now() + PROBE_LIMIT;
        while !accepting.load(Ordering::Acquire) {
            if prober.is_finished() || Instant::now() > deadline {
                stop.store(true, Ordering::Release);
                return Err(prober
                    .join()
                    .map_err(|_| anyhow!("the prober panicked"))?
                    .err()
                    .unwrap_or_else(|| anyhow!("no connection accepted before the event")));
            }
            thread::yield_now();
        }
        armed.store(true, Ordering::Release);
        let triggered = trigger();
        if triggered.is_err() {
            stop.store(true, Ordering::Release);
        }
        let probed = prober.join().map_err(|_| anyhow!("the prober panicked"));
        // The prober is done either way: a listener still waiting has missed it.
        stop.store(true, Ordering::Release);
        let notified = notification.map(|listener| {
            listener
                .join()
                .map_err(|_| anyhow!("the link listener panicked"))?
        });
        let (started, returned) = triggered?;
        let Probed {
            refused,
            attempts,
            unanswered,
        } = probed??;
        let notified = notified.transpose()?;
        ensure!(
            refused >= started,
            "a connection was refused before the event"
        );
        Ok(Trial {
            started,
            returned,
            refused,
            notified,
            attempts,
            unanswered,
        })
    })
}

/// What a prober found.
struct Probed {
    /// When the first connect after `armed` was refused.
    refused: Instant,
    /// Attempts since `armed`, the refused one included.
    attempts: usize,
    /// Attempts nobody answered within [`CONNECT_LIMIT`].
    unanswered: usize,
}

/// Non-blocking connects to `target` in a tight loop until one is refused.
/// Accepted connections are reset at once. Sets `accepting` after the first
/// accepted connection; a refusal before `armed` is an error (the previous
/// trial was not undone). A connect nobody answers (its SYN dropped, e.g.
/// by a full accept queue: the loop is far faster than any client) is
/// counted and the loop goes on; its wait is part of the trial's time.
fn probe(
    target: SocketAddr,
    accepting: &AtomicBool,
    armed: &AtomicBool,
    stop: &AtomicBool,
) -> Result<Probed> {
    let deadline = Instant::now() + PROBE_LIMIT;
    let mut since_armed = 0;
    let mut unanswered = 0;
    for _ in 0..PROBE_ATTEMPTS {
        if stop.load(Ordering::Acquire) {
            bail!("stopped: the event could not be triggered");
        }
        if Instant::now() > deadline {
            bail!("no connection refused within {PROBE_LIMIT:?}");
        }
        let was_armed = armed.load(Ordering::Acquire);
        if was_armed {
            since_armed += 1;
        }
        match connect_once(target)? {
            Outcome::Accepted => accepting.store(true, Ordering::Release),
            Outcome::Unanswered => unanswered += 1,
            Outcome::Refused(refused) if was_armed => {
                return Ok(Probed {
                    refused,
                    attempts: since_armed,
                    unanswered,
                });
            }
            Outcome::Refused(_) => bail!("refused before the event: the previous one not undone?"),
        }
    }
    bail!("no connection refused in {PROBE_ATTEMPTS} attempts")
}

enum Outcome {
    Accepted,
    Refused(Instant),
    /// Neither accepted nor refused within [`CONNECT_LIMIT`].
    Unanswered,
}

/// One non-blocking connect from the calling thread's namespace.
fn connect_once(target: SocketAddr) -> Result<Outcome> {
    let SocketAddr::V4(v4) = target else {
        bail!("IPv4 only");
    };
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error()).context("socket");
    }
    // SAFETY: a fresh descriptor nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: v4.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(v4.ip().octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: `addr` is a valid sockaddr_in of the given length.
    let rc = unsafe {
        libc::connect(
            fd,
            (&raw const addr).cast(),
            mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    let error = if rc == 0 {
        0
    } else {
        match io::Error::last_os_error().raw_os_error() {
            Some(libc::EINPROGRESS) => match wait_connected(fd)? {
                Some(error) => error,
                None => return Ok(Outcome::Unanswered),
            },
            Some(e) => e,
            None => bail!("connect failed without an errno"),
        }
    };
    match error {
        0 => {
            reset(&socket);
            Ok(Outcome::Accepted)
        }
        libc::ECONNREFUSED => Ok(Outcome::Refused(Instant::now())),
        // Accepted, then reset before the connect was seen to finish: yensid
        // connects to the builder at once, and with the builder's link down
        // that connect fails and the client is reset within microseconds.
        libc::ECONNRESET => Ok(Outcome::Accepted),
        e => Err(io::Error::from_raw_os_error(e)).context("connect to the service"),
    }
}

/// Waits for a non-blocking connect to finish; its SO_ERROR, or `None` if
/// it did not finish within [`CONNECT_LIMIT`].
fn wait_connected(fd: libc::c_int) -> Result<Option<libc::c_int>> {
    let mut pollfd = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    let millis = CONNECT_LIMIT.as_millis() as libc::c_int;
    // SAFETY: one valid pollfd.
    match unsafe { libc::poll(&mut pollfd, 1, millis) } {
        0 => return Ok(None),
        n if n < 0 => return Err(io::Error::last_os_error()).context("poll"),
        _ => {}
    }
    yensid_tests::tcp::socket_error(fd)
        .context("SO_ERROR")
        .map(Some)
}

/// Closes with RST (SO_LINGER 0): no TIME_WAIT left behind by the thousands
/// of short connections.
fn reset(socket: &OwnedFd) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid linger struct for SO_LINGER on an open socket.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// An rtnetlink socket subscribed to link notifications of one namespace
/// (the calling thread's when made), waiting for one interface to go down.
struct LinkListener {
    socket: OwnedFd,
    index: i32,
}

impl LinkListener {
    fn new(ifname: &str) -> Result<Self> {
        let index = if_index(ifname)?;
        let socket = netlink_socket()?;
        // SAFETY: all-zero bytes are a valid sockaddr_nl.
        let mut addr: libc::sockaddr_nl = unsafe { mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        addr.nl_groups = libc::RTMGRP_LINK as u32;
        // SAFETY: `addr` is a valid sockaddr_nl of the given length.
        let rc = unsafe {
            libc::bind(
                socket.as_raw_fd(),
                (&raw const addr).cast(),
                mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error()).context("subscribe to link notifications");
        }
        Ok(Self { socket, index })
    }

    /// When the RTM_NEWLINK saying the interface is down (not IFF_UP, or
    /// without IFF_LOWER_UP: no carrier) was received. Gives up when `stop`
    /// is set or after [`PROBE_LIMIT`].
    fn wait_down(&self, stop: &AtomicBool) -> Result<Instant> {
        let deadline = Instant::now() + PROBE_LIMIT;
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            if Instant::now() > deadline {
                bail!("no link notification within {PROBE_LIMIT:?}");
            }
            let mut pollfd = libc::pollfd {
                fd: self.socket.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let ready = unsafe { libc::poll(&mut pollfd, 1, 20) };
            if ready < 0 {
                return Err(io::Error::last_os_error()).context("poll the link listener");
            }
            if ready == 0 {
                if stop.load(Ordering::Acquire) {
                    bail!("the event was over before the kernel announced it");
                }
                continue;
            }
            // SAFETY: receiving into a buffer we own.
            let received = unsafe {
                libc::recv(
                    self.socket.as_raw_fd(),
                    buffer.as_mut_ptr().cast(),
                    buffer.len(),
                    0,
                )
            };
            let at = Instant::now();
            if received < 0 {
                return Err(io::Error::last_os_error()).context("read link notifications");
            }
            if announces_down(&buffer[..received as usize], self.index) {
                return Ok(at);
            }
        }
    }
}

/// Whether the netlink messages in `bytes` hold an RTM_NEWLINK saying
/// interface `index` is down or without carrier.
fn announces_down(mut bytes: &[u8], index: i32) -> bool {
    let word = |b: &[u8], at: usize| u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    // nlmsghdr (len u32, type u16, ...; 16 bytes), then ifinfomsg (family u8,
    // pad u8, type u16, index i32, flags u32, change u32).
    while bytes.len() >= 32 {
        let len = word(bytes, 0) as usize;
        if len < 16 || len > bytes.len() {
            return false;
        }
        let kind = u16::from_ne_bytes([bytes[4], bytes[5]]);
        if kind == libc::RTM_NEWLINK && len >= 32 && word(bytes, 20) as i32 == index {
            let flags = word(bytes, 24);
            let up = libc::IFF_UP as u32;
            let carrier = libc::IFF_LOWER_UP as u32;
            if flags & up == 0 || flags & carrier == 0 {
                return true;
            }
        }
        bytes = &bytes[len.next_multiple_of(4).min(bytes.len())..];
    }
    false
}

fn if_index(ifname: &str) -> Result<i32> {
    let name = std::ffi::CString::new(ifname)?;
    // SAFETY: a valid NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    ensure!(index != 0, "no interface {ifname}");
    Ok(index as i32)
}

fn netlink_socket() -> Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error()).context("netlink socket");
    }
    // SAFETY: a fresh descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sets `ifname` (in the calling thread's namespace) up or down with one
/// RTM_NEWLINK request; the time stamps right before the request is sent and
/// right after the kernel acknowledged it.
fn set_link_netlink(ifname: &str, up: bool) -> Result<(Instant, Instant)> {
    let index = if_index(ifname)?;
    let socket = netlink_socket()?;
    // nlmsghdr (16 bytes) + ifinfomsg (16 bytes), native endian.
    let mut request = Vec::with_capacity(32);
    request.extend_from_slice(&32u32.to_ne_bytes());
    request.extend_from_slice(&libc::RTM_NEWLINK.to_ne_bytes());
    request.extend_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16).to_ne_bytes());
    request.extend_from_slice(&1u32.to_ne_bytes());
    request.extend_from_slice(&0u32.to_ne_bytes());
    request.push(libc::AF_UNSPEC as u8);
    request.push(0);
    request.extend_from_slice(&0u16.to_ne_bytes());
    request.extend_from_slice(&index.to_ne_bytes());
    let flags = if up { libc::IFF_UP as u32 } else { 0 };
    request.extend_from_slice(&flags.to_ne_bytes());
    request.extend_from_slice(&(libc::IFF_UP as u32).to_ne_bytes());
    let mut reply = [0u8; 1024];
    let started = Instant::now();
    // SAFETY: sending a buffer we own on our socket; the kernel is the peer.
    let sent = unsafe {
        libc::send(
            socket.as_raw_fd(),
            request.as_ptr().cast(),
            request.len(),
            0,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error()).context("send RTM_NEWLINK");
    }
    // SAFETY: receiving into a buffer we own.
    let received = unsafe {
        libc::recv(
            socket.as_raw_fd(),
            reply.as_mut_ptr().cast(),
            reply.len(),
            0,
        )
    };
    let returned = Instant::now();
    if received < 0 {
        return Err(io::Error::last_os_error()).context("receive the RTM_NEWLINK ack");
    }
    ensure!(received >= 20, "short netlink reply ({received} bytes)");
    let kind = u16::from_ne_bytes([reply[4], reply[5]]);
    ensure!(
        kind == libc::NLMSG_ERROR as u16,
        "netlink replied with message type {kind}"
    );
    let error = i32::from_ne_bytes(reply[16..20].try_into()?);
    if error != 0 {
        return Err(io::Error::from_raw_os_error(-error)).context("RTM_NEWLINK");
    }
    Ok((started, returned))
}

/// Polls until a connection to the service is accepted and served by b1.
fn wait_until_served(client_ns: &Netns) -> Result<()> {
    let raw = yensid_tests::RawClient::new(client_ns);
    let deadline = Instant::now() + RECOVERY_LIMIT;
    loop {
        match raw.connect(service()) {
            ConnectAttempt::Accepted(stream) => {
                let ssh = SshConnection::handshake(stream)?;
                ensure!(
                    ssh.served_by() == "b1",
                    "served by {} instead of b1 (ethernet)",
                    ssh.served_by()
                );
                return Ok(());
            }
            ConnectAttempt::Refused => {}
            other => bail!("waiting for b1: {other:?}"),
        }
        if Instant::now() > deadline {
            bail!("b1 did not serve again within {RECOVERY_LIMIT:?}");
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// Sorted values of `row` over `trials`.
fn sorted(trials: &[Trial], row: Row) -> Vec<Duration> {
    let mut values: Vec<Duration> = trials.iter().filter_map(|t| row.value(t)).collect();
    values.sort();
    values
}

fn millis(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

impl Reactions {
    fn trials_of(&self, event: Event) -> Result<&[Trial], &str> {
        self.series
            .iter()
            .find(|(e, _)| *e == event)
            .map_or(Err("not measured"), |(_, r)| {
                r.as_deref().map_err(String::as_str)
            })
    }

    /// Series that could not be measured.
    pub fn failed(&self) -> usize {
        self.series.iter().filter(|(_, r)| r.is_err()).count()
    }

    pub fn markdown(&self) -> String {
        let mut md = format!(
            "\n## Reaction times (yensid kernel path)\n\n\
             From an event until the first refused connection: b1 behind a veth labelled \
             `ethernet`, b2 behind one labelled `wifi`, `remote_via = [\"ethernet\"]`. \
             {} trials each; every trial ends when b1 serves again.\n\n\
             | event | measured from | trials | p50 (ms) | p99 (ms) |\n|---|---|---:|---:|---:|\n",
            self.trials
        );
        for row in ROWS {
            let event = row.event();
            let what = event.describe(&self.client_link, &self.builder_link);
            match self.trials_of(event) {
                Ok(trials) if !sorted(trials, row).is_empty() => {
                    let values = sorted(trials, row);
                    md += &format!(
                        "| {what} | {} | {} | {} | {} |\n",
                        row.from(),
                        values.len(),
                        millis(percentile_of(&values, 50)),
                        millis(percentile_of(&values, 99)),
                    );
                }
                _ => md += &format!("| {what} | {} | 0 | failed | failed |\n", row.from()),
            }
        }
        md += "\nThe first refusal is found by a prober in the client namespace: non-blocking \
               connects to the service in a tight loop, each accepted one reset at once, at most \
               10 s and 200000 attempts per trial. Its resolution is one connect (tens of µs); \
               a connect nobody answers within 1 s (its SYN dropped) is counted below, and \
               the probing goes on. \
               The daemon's probes never take a builder down here, so each refusal is the link \
               rule's (or the mode's). Carrier changes reach userspace through the kernel's \
               linkwatch, which runs at most once a second for them, machine-wide: a carrier \
               loss within a second of the previous run is announced up to a second late, \
               whatever the daemon does. The carrier-loss trials start 2.2 s after b1 served \
               again, so this bench's own events do not delay them, but link events elsewhere \
               on the machine (other namespaces) still can; the rows measured from the \
               kernel's RTM_NEWLINK show the daemon's own part. A time measured from a \
               command's return is 0 when the refusal came before it had returned.\n";
        let notes = self.notes();
        if !notes.is_empty() {
            md += "\n";
            for note in notes {
                md += &format!("- {note}\n");
            }
        }
        md
    }

    fn notes(&self) -> Vec<String> {
        let mut notes = Vec::new();
        for (event, result) in &self.series {
            match result {
                Ok(trials) => {
                    let early = trials.iter().filter(|t| t.refused < t.returned).count();
                    let mut attempts: Vec<usize> = trials.iter().map(|t| t.attempts).collect();
                    attempts.sort_unstable();
                    let median = attempts.get(attempts.len() / 2).copied().unwrap_or(0);
                    let unanswered: usize = trials.iter().map(|t| t.unanswered).sum();
                    notes.push(format!(
                        "{}: {early} of {} trials refused before the command returned; \
                         median {median} connection attempts from the event to the refusal; \
                         {unanswered} connects unanswered within {CONNECT_LIMIT:?} (SYN dropped)",
                        event.key(),
                        trials.len()
                    ));
                }
                Err(e) => notes.push(format!("{} failed: {e}", event.key())),
            }
        }
        notes.extend(self.notes.iter().cloned());
        notes
    }

    pub fn json(&self) -> Value {
        let mut rows = Map::new();
        for row in ROWS {
            let event = row.event();
            let entry = match self.trials_of(event) {
                Ok(trials) if !sorted(trials, row).is_empty() => {
                    let values = sorted(trials, row);
                    json!({
                        "event": event.describe(&self.client_link, &self.builder_link),
                        "from": row.from(),
                        "unit": "ms",
                        "trials": values.len(),
                        "p50": percentile_of(&values, 50).as_secs_f64() * 1e3,
                        "p99": percentile_of(&values, 99).as_secs_f64() * 1e3,
                    })
                }
                Ok(_) => json!({ "error": "no trials" }),
                Err(e) => json!({ "error": e }),
            };
            rows.insert(row.key(), entry);
        }
        json!({
            "contender": "yensid kernel",
            "trials": self.trials,
            "figures": rows,
            "notes": self.notes(),
        })
    }
}
