//! One accepted connection: the SSH handoff, then the data path.
//!
//! The handoff makes kernel splicing safe. A socket's bytes that arrived
//! before it joined the SOCKHASH are never forwarded by the kernel, and once
//! it has joined, anything either side sends is forwarded at once, possibly
//! ahead of bytes userspace still has to write. So userspace relays the
//! opening of the SSH protocol itself, up to an instant where neither peer
//! may send anything:
//!
//! 1. read the client's identification line, within `[daemon]
//!    ident_timeout` (default 5 s), and check it ([`ident::parse`]): a
//!    line that is not SSH 2.0, holds control bytes or is longer than RFC
//!    4253's 255 bytes is rejected, not cut and passed on. Until then no
//!    builder is contacted and no builder counts the connection: a client
//!    that never speaks costs one descriptor and a task, bounded by the
//!    caps on connections in handoff (`crate::dataplane::admission`), and
//!    is closed when the timeout ends. Bytes that cannot start `SSH-` end
//!    it at once. The client then waits for the server's line (OpenSSH,
//!    Go's and paramiko's clients all send theirs first; a client that
//!    waited for the server's line first would be closed at the timeout);
//! 2. count the connection for its builder (the one the kernel chose at
//!    SYN time, or another if that one filled up since: see
//!    `Dispatcher::reserve`), connect to it and read its identification
//!    line, accepting the other lines RFC 4253 allows before it (the
//!    server then waits for the client's line). A client that closes or
//!    resets meanwhile cancels this at once. A failed connect (refused,
//!    timed out) marks the builder down and fails over to another
//!    builder, invisibly to the client, which has not seen a byte yet; a
//!    builder that accepts and then closes, resets or stays silent (an
//!    sshd at its `MaxStartups` writes `Exceeded MaxStartups` and closes)
//!    is busy, not dead: the client is failed over too, but the probes
//!    decide the builder's health. If no builder answers, the client is
//!    reset;
//! 3. pass both lines on; each peer answers with its KEXINIT packet;
//! 4. read both KEXINIT packets (unencrypted, length-prefixed). The client
//!    now waits for the server's KEXINIT, the server for the client's;
//! 5. if a peer sent anything more, keep this connection in userspace
//!    (correct, slower) and count it;
//! 6. splice both sockets, then write the client's KEXINIT to the server
//!    (which then waits for the client's key exchange) and only then the
//!    server's KEXINIT to the client, whose reply the kernel forwards.
//!
//! FIN and RST are never redirected by the kernel, so userspace watches
//! both sockets and passes a half-close on once the kernel has delivered
//! every byte that came before it. A socket its peer reset ends the pair
//! at once, and so does a half-close whose receiving side was reset (a
//! builder's session that died while the client still sent): waiting for
//! such a peer to take the bytes would keep the pair, its map entries and
//! its `max_connections` slot for `DRAIN_STALL_LIMIT`.
//!
//! Known limit: a builder that closes right after the client's KEXINIT (as
//! sshd does when no key-exchange algorithm matches) can close before step
//! 6 has written its KEXINIT to the client. The kernel then marks the
//! client socket broken (EPIPE) and the client sees the connection end
//! without the builder's KEXINIT or disconnect reason. The session fails
//! either way; only the client's error message is poorer. `cargo xtask
//! bench` found this; the happy path is unaffected because sshd sends
//! nothing between its KEXINIT and the client's key exchange.
//!
//! # Performance of the kernel path (issue #6)
//!
//! Measured on the bench topology (client namespace, builders behind veths,
//! 2 vCPUs shared with other work, Linux 6.18, HZ=250) with `perf record -a`
//! and CPU accounting per process and kernel thread; every figure below is a
//! same-run comparison, ranges over 3 rounds.
//!
//! - Where the CPU goes (8 streams): the two user copies (sender, receiver)
//!   are the same bytes as on a direct connection; the kernel path adds a
//!   second TCP connection's transmit and receive work (`__tcp_transmit_skb`
//!   27% of samples against 15% direct, `net_rx_action` 21% against 10%) and
//!   the psock work that sends each redirected skb (`sk_psock_backlog`,
//!   10%). The verdict program itself is 0.5%: its map lookups are not worth
//!   optimising. Total CPU per GiB: direct 0.40-0.50 s, kernel path
//!   0.70-0.85 s, HAProxy 2.6 with `splice-auto` 1.4-1.8 s (0.7-0.9 s of it in
//!   haproxy itself).
//! - Hence the 0.8x-of-direct throughput target is out of reach on 2 CPUs:
//!   when both CPUs are busy, throughput is inversely proportional to CPU per
//!   GiB, which caps the ratio at about 0.55-0.75. Measured with 8 streams:
//!   upload 0.56-0.68x, download 0.62-0.79x (before the fixes below
//!   0.50-0.55x and 0.71-0.74x). Against HAProxy the kernel path is 1.2-3x
//!   faster at about half the CPU (a quarter of HAProxy's CPU beyond what a
//!   direct connection costs).
//! - Fixed: the psock work retried a full jiffy after finding the peer's send
//!   buffer full ([`SPLICED_SEND_BUFFER`]); the daemon woke on every
//!   redirected segment (`crate::kernel::hangup`); a FIN arriving alone was
//!   redirected as an empty skb and broke the pair (`splice` program).
//! - Tried, not kept: Nagle on the spliced sockets (slower, 0.5-0.7 against
//!   0.6-1.1 GB/s for one stream, and it would delay SSH's small packets by
//!   an ACK round trip); a smaller fixed `SO_RCVBUF` (no faster, and it turns
//!   off receive autotuning, which a remote builder's download needs). Not
//!   tried: `SO_RCVLOWAT`, because the verdict program only runs once the
//!   mark is reached, so a message shorter than it would never be forwarded;
//!   MTU and GRO, because loopback and veth carry 64 KiB GSO segments from
//!   end to end already. `splice(2)` in userspace is what HAProxy does, at
//!   twice the CPU: the sockmap stays the default.
//! - Connection setup: until the builder's identification line both paths
//!   run the same code. The kernel path then does about 15 more syscalls per
//!   connection (KEXINIT relay, SOCKHASH and peer entries, TCP_INFO for the
//!   drain): about 270 us of daemon CPU per connection against 220 us for
//!   the userspace path and 195 us for HAProxy (measured before the changes
//!   below). With connections back to back on 2 CPUs that showed as 10-50
//!   us more connect-to-banner at p50 than HAProxy in most runs.
//! - Since then spliced pairs share one epoll instance
//!   (`crate::kernel::hangup`): a connection holds its two sockets and nothing else,
//!   so 10 000 fit a 20 000-descriptor limit, and an idle spliced
//!   connection costs about 2 KiB of daemon RSS (10.3 MiB before, 30.2 MiB
//!   with 9 900). Connect-to-banner, old handoff against new in the same
//!   bench run, two runs with the order swapped (the later contender tends
//!   to gain tens of us): p50 426 -> 251 us and 340 -> 278 us, p99 817 ->
//!   492 us and 577 -> 594 us; HAProxy 267 and 332 us at p50. (That
//!   handoff also connected to the builder while the client's line was
//!   still coming; issue #10 made it wait for the line, see below.)
//! - Identification first (issue #10): the builder is connected only once
//!   the client's line is in, so connect-to-banner now includes the
//!   builder's connect and banner after the line instead of beside it. A
//!   local client sends its line right after its connect, so little was
//!   overlapped; a remote client's line arrives half its RTT after the
//!   accept, which is then added once. Measured on the test topology (one
//!   builder behind a veth, a server that sends its banner at accept, the
//!   client sending its line first as OpenSSH does), kernel path, debug
//!   builds, old and new binaries alternating in four pairs of 1000-2000
//!   sequential connections on a 2-CPU machine at load 15: p50 708 -> 726,
//!   701 -> 723, 671 -> 830, 710 -> 806 us (+20 to +160 us, mean +74
//!   us); p90 and p99 (1-12 ms) were noise in both. Not yet measured with
//!   `cargo xtask bench` in release builds.
//! - Tried, not kept: keying the SOCKHASH by the peer's cookie, so the
//!   verdict program looks up its own cookie and the peer map with its four
//!   updates and two deletes per connection goes. Connection rate, same-run
//!   pairs in both orders: 2818 -> 3745, 2988 -> 3166, 3694 -> 3247, 3578 ->
//!   3123 conn/s: within the noise of a shared 2-CPU machine, so the map
//!   contract stays as it is.

use std::{
    io::{self, Read, Write},
    net::TcpStream as StdTcpStream,
    os::fd::AsRawFd,
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
    time::timeout,
};
use tracing::{debug, info, warn};

use crate::{
    config::Forward,
    dataplane::admission::{Handoffs, Quiet, Ticket},
    dataplane::handover::{Meta, Parked, Recall, Running},
    dataplane::ident::{self, IdentError},
    dataplane::relay::Relay,
    kernel::bpf::{Kernel, Observation},
    kernel::hangup::Hangups,
    kernel::sock,
    operate::fdstore,
};

/// Longest identification line (RFC 4253 4.2: 255 bytes including CRLF).
const MAX_IDENT_LINE: usize = 255;
/// Longest pre-identification banner a server may send.
const MAX_SERVER_PREAMBLE: usize = 8192;
/// Largest packet allowed before encryption starts (RFC 4253 6.1).
const MAX_CLEAR_PACKET: usize = 35000;
/// How long a peer may take with each step of the handoff.
const HANDOFF_STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// Send buffer of each spliced socket (`SO_SNDBUF`; the kernel doubles it).
///
/// The kernel hands a redirected segment to the peer socket from a
/// workqueue. When the peer's send buffer is full, that work gives up and
/// retries a whole jiffy later (1-10 ms by `CONFIG_HZ`); buffer space
/// freed in the meantime does not bring the retry forward. Whatever is
/// queued must keep the receiver busy for that jiffy, or the link idles: with
/// the autotuned buffer (at most `tcp_wmem`'s 4 MiB) the kernel path ran at
/// about 1 GB/s with the CPUs half idle. 16 MiB covers 4 GB/s at 250 Hz.
/// It is a limit, not an allocation: it fills only while the receiving end
/// is slower than the sending one.
const SPLICED_SEND_BUFFER: usize = 8 << 20;
/// Buffer for the stray bytes of a spliced socket that is ending.
const STRAY_BUFFER: usize = 4096;
/// How long a half-close may wait for the kernel to deliver earlier bytes
/// without any progress.
const DRAIN_STALL_LIMIT: Duration = Duration::from_secs(60);
/// How often a half-close checks whether the kernel delivered those bytes.
const POLL_INTERVAL: Duration = Duration::from_millis(1);

/// Where a connection was steered and what the daemon knows about builders.
pub trait Dispatcher: Send + Sync + 'static {
    /// `host:port` of a builder.
    fn address(&self, builder: &str) -> Option<String>;
    /// How long a connect to a builder may take.
    fn connect_timeout(&self, builder: &str) -> Duration;
    /// The client of `service` that the kernel steered to `steered` has
    /// identified itself: counts the connection for the builder it is to
    /// be served by (`steered` while it is available, else another one the
    /// strategy picks) and names it; `None` when no builder may take it.
    fn reserve(&self, service: &str, steered: &str) -> Option<String>;
    /// No builder could take an identified client of `service`
    /// ([`Dispatcher::reserve`] found none): a service that queues when
    /// full holds it until one can; otherwise the client is given back to
    /// be refused.
    fn hold(
        &self,
        service: &str,
        client: TcpStream,
        client_line: Vec<u8>,
        ticket: Ticket,
    ) -> Option<TcpStream>;
    /// Records that `failed` could not serve a connection of `service` and
    /// moves that connection (and its count) to another builder not in
    /// `tried`, if any. `busy`: the builder accepted the connection and
    /// then closed it or stayed silent, as an sshd at its `MaxStartups`
    /// does: the probes, not this connection, decide its health.
    fn fail_over(
        &self,
        service: &str,
        failed: &str,
        reason: &str,
        tried: &[String],
        busy: bool,
    ) -> Option<String>;
    /// Has the kernel measure the path of the socket with `cookie`, about
    /// to connect to `builder`, for as long as the guard lives (`None`
    /// when nothing measures).
    fn observe(&self, builder: &str, cookie: u64) -> Option<Observation>;
    /// A builder answered with its identification line `elapsed` after
    /// the connect started.
    fn connected(&self, builder: &str, elapsed: Duration);
    /// The connection steered to (or, once counted, served by) `builder`
    /// is over.
    fn finished(&self, builder: &str, outcome: &Outcome);
}

/// How bytes flow once the handoff is done.
#[derive(Clone)]
pub enum DataPath {
    /// Steered by the kernel; sessions forwarded as `[daemon] forward`
    /// says. Spliced pairs are watched for their ends by the one shared
    /// epoll instance.
    Kernel(Arc<Kernel>, Hangups, Forward),
    Userspace,
}

impl DataPath {
    /// The dataplane, as `[daemon] dataplane` names it.
    pub fn dataplane(&self) -> &'static str {
        match self {
            Self::Kernel(..) => "kernel",
            Self::Userspace => "userspace",
        }
    }

    /// How established sessions are forwarded (the userspace dataplane
    /// always splices).
    pub fn forward(&self) -> Forward {
        match self {
            Self::Kernel(_, _, forward) => *forward,
            Self::Userspace => Forward::Splice,
        }
    }
}

/// How a connection ended.
#[derive(Debug, Default)]
pub struct Outcome {
    /// The client did not identify itself as an SSH client (junk, an
    /// invalid or over-long line, silence, or it left first).
    pub rejected: bool,
    /// The client identified itself but was not put through to a builder:
    /// none could take it or be reached, or the client left first.
    pub unserved: bool,
    /// The connection was counted for its builder ([`Dispatcher::reserve`]).
    pub counted: bool,
    /// Builders that failed before one answered.
    pub failovers: u32,
    /// Served by the kernel splice.
    pub spliced: bool,
    /// Copied in userspace by the daemon (the userspace data path, or the
    /// per-connection fallback). Neither this nor `spliced`: the connection
    /// ended before any byte was forwarded.
    pub copied: bool,
    /// Bytes sent to the builder.
    pub to_builder: u64,
    /// Bytes received from the builder.
    pub from_builder: u64,
}

/// At most 20 lines per 10 s about rejected clients, so a flood of junk
/// connections does not flood the log.
static REJECTIONS: Quiet = Quiet::new(Duration::from_secs(10), 20);
/// The same for clients refused because no builder could take them.
static UNSERVED: Quiet = Quiet::new(Duration::from_secs(10), 20);

/// What every connection task works with.
#[derive(Clone)]
pub struct Context {
    pub dispatcher: Arc<dyn Dispatcher>,
    pub path: DataPath,
    /// The kernel side for spliced pairs a predecessor handed over, even
    /// when this daemon copies new connections in userspace.
    pub splicer: Option<(Arc<Kernel>, Hangups)>,
    pub recall: Recall,
    pub handoffs: Arc<Handoffs>,
    pub ident_timeout: Duration,
}

/// An accepted connection, or one a predecessor handed over in its handoff.
pub struct Accepted {
    pub client: TcpStream,
    pub service: String,
    /// The builder the kernel chose at SYN time.
    pub steered: String,
    /// Bytes of the client's identification line already read.
    pub consumed: Vec<u8>,
    pub opened_unix_ms: u64,
}

/// Now, in Unix milliseconds: when a connection opened, in a form another
/// process can use.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Serves one accepted connection in a task of its own. `ticket` is its
/// place among the connections in handoff, given back once both
/// identification lines are known. The task counts as running from now,
/// not from its first poll: a recall for a takeover that comes in between
/// must wait for it, or the connection would end with this process.
pub fn spawn_serve(accepted: Accepted, ticket: Ticket, cx: Context) {
    let running = cx.recall.running();
    tokio::spawn(serve(accepted, ticket, cx, running));
}

/// Serves a connection a predecessor handed over, from where it stopped,
/// in a task of its own that counts as running from now (as
/// [`spawn_serve`]).
pub fn spawn_resume(parked: Parked, cx: Context) {
    let running = cx.recall.running();
    tokio::spawn(resume(parked, cx, running));
}

async fn serve(accepted: Accepted, ticket: Ticket, cx: Context, _running: Running) {
    let Accepted {
        client,
        service,
        steered,
        consumed,
        opened_unix_ms,
    } = accepted;
    let peer = client.peer_addr().ok();
    let mut outcome = Outcome::default();
    let mut line = consumed;
    let served = handoff(&client, &service, steered, &mut line, &cx, &mut outcome).await;
    let opening = match served {
        Ok(opening) => {
            drop(ticket);
            opening
        }
        Err(HandoffEnd::NoBuilder(steered)) => {
            // A service that queues when full holds the identified client;
            // others refuse it.
            if let Some(client) = cx.dispatcher.hold(&service, client, line, ticket) {
                if let Some(left_out) = UNSERVED.allow(Instant::now()) {
                    warn!(
                        service,
                        steered,
                        similar_left_out = left_out,
                        "no builder may take the client (full, unhealthy or drained); refused"
                    );
                }
                reset(&client);
            }
            cx.dispatcher.finished(&steered, &outcome);
            return;
        }
        Err(HandoffEnd::Recalled(steered)) => {
            drop(ticket);
            // Nothing reached the client: a successor starts again.
            cx.dispatcher.finished(&steered, &outcome);
            if let Ok(client) = client.into_std() {
                cx.recall.park(Parked::Fresh {
                    client,
                    service,
                    steered,
                    consumed: line,
                    opened_unix_ms,
                });
            }
            return;
        }
        Err(HandoffEnd::Failed(builder, why)) => {
            drop(ticket);
            debug!(service, builder, ?peer, %why, "connection ended during the handoff");
            if outcome.unserved {
                reset(&client);
            }
            cx.dispatcher.finished(&builder, &outcome);
            return;
        }
    };
    let mut meta = Meta {
        service,
        builder: opening.builder.clone(),
        peer,
        opened_unix_ms,
        failovers: outcome.failovers,
        in_fd_store: false,
    };
    let finish = forward(client, opening, &cx, &mut meta, &mut outcome).await;
    conclude(finish, meta, outcome, &cx);
}

async fn resume(parked: Parked, cx: Context, running: Running) {
    let mut outcome = Outcome {
        counted: true,
        ..Outcome::default()
    };
    let (finish, meta) = match parked {
        Parked::Fresh {
            client,
            service,
            steered,
            consumed,
            opened_unix_ms,
        } => {
            let Ok(client) = stream(client) else {
                return;
            };
            let peer = client
                .peer_addr()
                .map(|p| p.ip())
                .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into());
            match cx.handoffs.admit(peer) {
                Ok(ticket) => {
                    let accepted = Accepted {
                        client,
                        service,
                        steered,
                        consumed,
                        opened_unix_ms,
                    };
                    Box::pin(serve(accepted, ticket, cx, running)).await;
                }
                Err(full) => {
                    warn!(service, reason = %full, "a connection in handoff was handed over, but the handoff caps are full: refused");
                    reset(&client);
                }
            }
            return;
        }
        Parked::Spliced {
            client,
            upstream,
            meta,
            ended,
        } => {
            outcome.spliced = true;
            let Some((kernel, hangups)) = cx.splicer.clone() else {
                warn!(
                    service = meta.service,
                    builder = meta.builder,
                    "a spliced connection was handed over, but this daemon has no BPF: cut"
                );
                cx.dispatcher.finished(&meta.builder, &outcome);
                return;
            };
            let cookies = match (sock::cookie(&client), sock::cookie(&upstream)) {
                (Ok(c), Ok(u)) => (c, u),
                (Err(e), _) | (_, Err(e)) => {
                    conclude(Err(e), meta, outcome, &cx);
                    return;
                }
            };
            (
                watch_pair(
                    client,
                    upstream,
                    cookies,
                    ended,
                    &kernel,
                    &hangups,
                    &cx,
                    &meta,
                    &mut outcome,
                )
                .await,
                meta,
            )
        }
        Parked::Copied {
            client,
            upstream,
            relay,
            meta,
        } => {
            let finish = match (stream(client), stream(upstream)) {
                (Ok(client), Ok(upstream)) => {
                    relay_pair(client, upstream, relay, &cx, &mut outcome).await
                }
                (Err(e), _) | (_, Err(e)) => Err(e),
            };
            (finish, meta)
        }
    };
    conclude(finish, meta, outcome, &cx);
}

fn stream(socket: StdTcpStream) -> io::Result<TcpStream> {
    socket.set_nonblocking(true)?;
    TcpStream::from_std(socket)
}

/// The end of a connection's data path: logged and counted, or parked for
/// a successor.
fn conclude(finish: io::Result<Finish>, mut meta: Meta, outcome: Outcome, cx: &Context) {
    let error = match finish {
        Ok(Finish::Recalled(Recalled::Spliced {
            client,
            upstream,
            ended,
        })) => {
            cx.recall.park(Parked::Spliced {
                client,
                upstream,
                meta,
                ended,
            });
            return;
        }
        Ok(Finish::Recalled(Recalled::Copied {
            client,
            upstream,
            relay,
        })) => {
            cx.recall.park(Parked::Copied {
                client,
                upstream,
                relay,
                meta,
            });
            return;
        }
        Ok(Finish::Ended) => None,
        Err(e) => Some(e),
    };
    meta.failovers = meta.failovers.max(outcome.failovers);
    let seconds = unix_ms().saturating_sub(meta.opened_unix_ms) as f64 / 1e3;
    info!(
        service = meta.service,
        builder = meta.builder,
        peer = ?meta.peer,
        spliced = outcome.spliced,
        failovers = meta.failovers,
        to_builder = outcome.to_builder,
        from_builder = outcome.from_builder,
        seconds,
        error = error.map(|e| e.to_string()),
        "connection closed"
    );
    cx.dispatcher.finished(&meta.builder, &outcome);
}

/// How a data path stopped.
enum Finish {
    /// Both directions ended (or one failed: see the error).
    Ended,
    /// Recalled for a successor, whole.
    Recalled(Recalled),
}

/// A data path stopped for a successor (the connection's [`Meta`] is
/// added by whoever knows it).
enum Recalled {
    Spliced {
        client: StdTcpStream,
        upstream: StdTcpStream,
        ended: [bool; 2],
    },
    Copied {
        client: StdTcpStream,
        upstream: StdTcpStream,
        relay: Relay,
    },
}

/// Why a handoff did not lead to a data path.
enum HandoffEnd {
    /// The connection ended (the builder it was steered to or counted for,
    /// and why).
    Failed(String, io::Error),
    /// Recalled for a successor before the client saw a byte; the builder
    /// it was steered to.
    Recalled(String),
    /// The client identified itself and no builder may take it (the
    /// builder it was steered to).
    NoBuilder(String),
}

/// What the handoff leaves for the data path.
struct Opening {
    builder: String,
    upstream: TcpStream,
    /// Keeps the kernel measuring the upstream path while the connection
    /// lives.
    observation: Option<Observation>,
    /// The client's identification line, not yet sent to the builder.
    client_line: Vec<u8>,
    /// The server's lines up to and including its identification line.
    server_lines: Vec<u8>,
}

/// Why the client was not served.
#[derive(Debug, thiserror::Error)]
enum Rejection {
    #[error(transparent)]
    Invalid(#[from] IdentError),
    #[error("no identification line within {0:?}")]
    Silent(Duration),
    #[error("left before identifying itself ({0})")]
    Left(io::Error),
}

/// Steps 1 and 2 of the handoff: the client's line, then the builder.
/// Until a builder answered, a recall stops it (nothing reached the
/// client yet); `line` holds what was read of the client's line.
async fn handoff(
    client: &TcpStream,
    service: &str,
    steered: String,
    line: &mut Vec<u8>,
    cx: &Context,
    outcome: &mut Outcome,
) -> Result<Opening, HandoffEnd> {
    let dispatcher = &*cx.dispatcher;
    let read = tokio::select! {
        read = timeout(cx.ident_timeout, read_client_line(client, line)) => read,
        () = cx.recall.requested() => return Err(HandoffEnd::Recalled(steered)),
    };
    let rejection = match read {
        Ok(Ok(())) => ident::parse(line).err().map(Rejection::from),
        Ok(Err(e)) => Some(e),
        Err(_) => Some(Rejection::Silent(cx.ident_timeout)),
    };
    if let Some(why) = rejection {
        outcome.rejected = true;
        if let Some(left_out) = REJECTIONS.allow(Instant::now()) {
            warn!(
                service,
                peer = ?client.peer_addr().ok(),
                reason = %why,
                first_bytes = %ident::escape(&line[..line.len().min(64)]),
                similar_left_out = left_out,
                "client rejected: closed before any builder was contacted"
            );
        }
        return Err(HandoffEnd::Failed(steered, io::Error::other(why)));
    }
    let Some(mut builder) = dispatcher.reserve(service, &steered) else {
        outcome.unserved = true;
        return Err(HandoffEnd::NoBuilder(steered));
    };
    outcome.counted = true;
    // A client that leaves while the builder is being connected cancels
    // that work at once: dropping the future closes the upstream socket.
    let opened = tokio::select! {
        opened = open_with_failover(service, &mut builder, dispatcher, outcome) => opened,
        gone = client_gone(client) => {
            outcome.unserved = true;
            Err(gone)
        }
        () = cx.recall.requested() => {
            // Counted for `builder` until now: `finished` gives it back.
            outcome.unserved = true;
            return Err(HandoffEnd::Recalled(builder));
        }
    };
    match opened {
        Ok((upstream, observation, server_lines)) => Ok(Opening {
            builder,
            upstream,
            observation,
            client_line: std::mem::take(line),
            server_lines,
        }),
        Err(e) => Err(HandoffEnd::Failed(builder, e)),
    }
}

/// Reads the client's identification line into `line` (which may hold its
/// beginning already), at most one byte longer than RFC 4253 allows (so an
/// over-long line is seen as one, not cut), and gives up as soon as its
/// bytes cannot start one. Cancel-safe: every byte read is in `line` at
/// once.
async fn read_client_line(client: &TcpStream, line: &mut Vec<u8>) -> Result<(), Rejection> {
    let mut buf = [0u8; ident::MAX_LINE + 1];
    loop {
        let prefix = line.len().min(4);
        if line[..prefix] != b"SSH-"[..prefix]
            || line.last() == Some(&b'\n')
            || line.len() > ident::MAX_LINE
        {
            return Ok(());
        }
        let want = buf.len() - line.len();
        let n = client
            .peek(&mut buf[..want])
            .await
            .map_err(Rejection::Left)?;
        if n == 0 {
            return Err(Rejection::Left(io::ErrorKind::UnexpectedEof.into()));
        }
        let take = buf[..n]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(n, |end| end + 1);
        // The bytes were peeked, so they are there: one read takes them.
        match client.try_read(&mut buf[..take]) {
            Ok(0) => return Err(Rejection::Left(io::ErrorKind::UnexpectedEof.into())),
            Ok(got) => line.extend_from_slice(&buf[..got]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(Rejection::Left(e)),
        }
    }
}

/// Resolves when the client has closed or reset its connection. A client
/// that sends more after its identification line (allowed, if unusual)
/// cannot be watched this way without spinning; it is then not watched.
async fn client_gone(client: &TcpStream) -> io::Error {
    let mut byte = [0u8; 1];
    match client.peek(&mut byte).await {
        Ok(0) => io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "client left during the handoff",
        ),
        Ok(_) => std::future::pending().await,
        Err(e) => e,
    }
}

/// What went wrong with one builder.
struct UpstreamError {
    error: io::Error,
    /// The builder accepted the connection and then closed it, reset it
    /// or sent no identification line: busy (an sshd at `MaxStartups`
    /// does this), not necessarily down.
    busy: bool,
}

/// Opens an upstream connection to `builder`, failing over to other
/// builders until one answers; `builder` always names the builder the
/// connection is counted for.
async fn open_with_failover(
    service: &str,
    builder: &mut String,
    dispatcher: &dyn Dispatcher,
    outcome: &mut Outcome,
) -> io::Result<(TcpStream, Option<Observation>, Vec<u8>)> {
    let mut tried = Vec::new();
    loop {
        let UpstreamError { error, busy } = match open_upstream(builder, dispatcher).await {
            Ok(opened) => return Ok(opened),
            Err(e) => e,
        };
        outcome.failovers += 1;
        tried.push(builder.clone());
        match dispatcher.fail_over(service, builder, &error.to_string(), &tried, busy) {
            Some(next) => {
                info!(service, failed = builder.as_str(), next, busy, %error, "failing over before the client saw a byte");
                *builder = next;
            }
            None => {
                outcome.unserved = true;
                warn!(service, failed = builder.as_str(), busy, %error, "no other builder; refusing the client");
                return Err(error);
            }
        }
    }
}

/// Connects to a builder and reads up to its identification line.
async fn open_upstream(
    builder: &str,
    dispatcher: &dyn Dispatcher,
) -> Result<(TcpStream, Option<Observation>, Vec<u8>), UpstreamError> {
    let down = |error| UpstreamError { error, busy: false };
    let busy = |error| UpstreamError { error, busy: true };
    let address = dispatcher
        .address(builder)
        .ok_or_else(|| down(io::Error::other("builder is no longer configured")))?;
    let started = Instant::now();
    let observe = |socket: &TcpSocket| dispatcher.observe(builder, sock::cookie(socket).ok()?);
    let (upstream, observation) = timeout(
        dispatcher.connect_timeout(builder),
        connect_with(&address, observe),
    )
    .await
    .map_err(|_| down(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")))?
    .map_err(down)?;
    upstream.set_nodelay(true).map_err(busy)?;
    let mut lines = Vec::new();
    loop {
        let line = timeout(
            dispatcher.connect_timeout(builder),
            read_line(&upstream, MAX_IDENT_LINE),
        )
        .await
        .map_err(|_| {
            busy(io::Error::new(
                io::ErrorKind::TimedOut,
                "no SSH identification line",
            ))
        })?
        .map_err(|e| {
            let before = ident::escape(&lines[..lines.len().min(64)]);
            busy(io::Error::new(
                e.kind(),
                format!("closed before its identification line ({e}); it sent `{before}`"),
            ))
        })?;
        lines.extend_from_slice(&line);
        if line.starts_with(b"SSH-") {
            dispatcher.connected(builder, started.elapsed());
            return Ok((upstream, observation, lines));
        }
        if lines.len() > MAX_SERVER_PREAMBLE {
            return Err(down(io::Error::other("builder is not speaking SSH")));
        }
    }
}

/// Connects to `host:port`, trying each address it resolves to.
pub async fn connect(address: &str) -> io::Result<TcpStream> {
    connect_with(address, |_| None::<()>)
        .await
        .map(|(stream, _)| stream)
}

/// [`connect`], showing each socket to `prepare` before its SYN leaves;
/// what `prepare` returns for the socket that connected comes back with it.
async fn connect_with<T>(
    address: &str,
    mut prepare: impl FnMut(&TcpSocket) -> Option<T>,
) -> io::Result<(TcpStream, Option<T>)> {
    let mut last = io::Error::other(format!("`{address}` resolves to no address"));
    for addr in tokio::net::lookup_host(address).await? {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        let prepared = prepare(&socket);
        match socket.connect(addr).await {
            Ok(stream) => return Ok((stream, prepared)),
            Err(e) => last = e,
        }
    }
    Err(last)
}

async fn forward(
    mut client: TcpStream,
    opening: Opening,
    cx: &Context,
    meta: &mut Meta,
    outcome: &mut Outcome,
) -> io::Result<Finish> {
    let Opening {
        mut upstream,
        observation,
        client_line,
        server_lines,
        ..
    } = opening;
    client.set_nodelay(true)?;
    upstream.write_all(&client_line).await?;
    client.write_all(&server_lines).await?;
    let (kernel, hangups) = match &cx.path {
        DataPath::Kernel(kernel, hangups, Forward::Sockmap) => (kernel, hangups),
        DataPath::Kernel(_, _, Forward::Splice) | DataPath::Userspace => {
            return relay_pair(client, upstream, Relay::new(), cx, outcome).await;
        }
    };
    let client_kexinit = step(read_packet(&mut client)).await?;
    let server_kexinit = step(read_packet(&mut upstream)).await?;
    if sock::has_pending_bytes(&client)? || sock::has_pending_bytes(&upstream)? {
        warn!("a peer sent more than one packet before key exchange; copying in userspace");
        upstream.write_all(&client_kexinit).await?;
        client.write_all(&server_kexinit).await?;
        return relay_pair(client, upstream, Relay::new(), cx, outcome).await;
    }
    sock::set_send_buffer(&client, SPLICED_SEND_BUFFER)?;
    sock::set_send_buffer(&upstream, SPLICED_SEND_BUFFER)?;
    // The kernel's RTT entry for the upstream already knows its cookie.
    let upstream_cookie = match &observation {
        Some(observed) => observed.cookie(),
        None => sock::cookie(&upstream)?,
    };
    let cookies = (sock::cookie(&client)?, upstream_cookie);
    kernel
        .splice((cookies.0, &client), (cookies.1, &upstream))
        .map_err(io::Error::other)?;
    outcome.spliced = true;
    // Kept by systemd too, the pair outlives a crash of this daemon.
    meta.in_fd_store =
        fdstore::store_pair(cookies.0, &meta.service, &meta.builder, &client, &upstream);
    upstream.write_all(&client_kexinit).await?;
    client.write_all(&server_kexinit).await?;
    // Out of tokio's epoll, whose interest in reading would wake the daemon
    // on every redirected segment.
    let (client, upstream) = (client.into_std()?, upstream.into_std()?);
    watch_pair(
        client,
        upstream,
        cookies,
        [false, false],
        kernel,
        hangups,
        cx,
        meta,
        outcome,
    )
    .await
}

/// Watches a spliced pair until it ends or is recalled.
#[allow(clippy::too_many_arguments)]
async fn watch_pair(
    client: StdTcpStream,
    upstream: StdTcpStream,
    cookies: (u64, u64),
    mut ended: [bool; 2],
    kernel: &Kernel,
    hangups: &Hangups,
    cx: &Context,
    meta: &Meta,
    outcome: &mut Outcome,
) -> io::Result<Finish> {
    let watched = tokio::select! {
        watched = watch_spliced(hangups, &client, &upstream, &mut ended) => watched,
        // Between two events the pair's state is `ended` and the sockets:
        // the kernel goes on forwarding while a successor takes them.
        () = cx.recall.requested() => {
            return Ok(Finish::Recalled(Recalled::Spliced { client, upstream, ended }));
        }
    };
    kernel.unsplice(cookies.0, cookies.1);
    if meta.in_fd_store {
        fdstore::remove_pair(cookies.0, &meta.service, &meta.builder);
    }
    let ends = sock::Ends {
        connected: true,
        fin_sent: ended[0],
        fin_received: ended[1],
    };
    count_upstream(&upstream, ends, outcome);
    watched.map(|()| Finish::Ended)
}

/// Relays a pair in userspace until it ends or is recalled.
async fn relay_pair(
    client: TcpStream,
    upstream: TcpStream,
    mut relay: Relay,
    cx: &Context,
    outcome: &mut Outcome,
) -> io::Result<Finish> {
    outcome.copied = true;
    let relayed = tokio::select! {
        relayed = relay.run(&client, &upstream) => relayed,
        // The relay's state is whole at every await point: the pipes hold
        // the bytes in flight.
        () = cx.recall.requested() => {
            let (client, upstream) = (client.into_std()?, upstream.into_std()?);
            return Ok(Finish::Recalled(Recalled::Copied { client, upstream, relay }));
        }
    };
    let ends = sock::Ends {
        connected: true,
        fin_sent: relay.state.up.shut,
        fin_received: relay.state.down.eof,
    };
    count_upstream(&upstream, ends, outcome);
    relayed.map(|()| Finish::Ended)
}

/// Counts the payload bytes exchanged with the builder.
fn count_upstream(upstream: &impl AsRawFd, ends: sock::Ends, outcome: &mut Outcome) {
    if let Ok(counts) = sock::payload_counts(upstream, ends) {
        outcome.to_builder = counts.acked;
        outcome.from_builder = counts.received;
    }
}

/// Waits for both directions of a spliced pair to end, woken only by
/// half-closes and errors (see `hangup`). Bytes the kernel did not
/// redirect (the verdict program found no peer) wait in the socket's own
/// queue and are forwarded when that socket ends, so nothing is lost.
/// `ended[i]`: socket `i` (client, upstream) read its end of file, and its
/// peer was shut down for writing.
async fn watch_spliced(
    hangups: &Hangups,
    client: &StdTcpStream,
    upstream: &StdTcpStream,
    ended: &mut [bool; 2],
) -> io::Result<()> {
    let sockets = [
        Spliced {
            socket: client,
            connected: false,
        },
        Spliced {
            socket: upstream,
            connected: true,
        },
    ];
    let pair = hangups.watch([client.as_raw_fd(), upstream.as_raw_fd()])?;
    // Stray bytes are rare and never a bulk: a small buffer will do, taken
    // only once a socket ends, so an idle connection does not hold one.
    let mut buf = Vec::new();
    while ended.contains(&false) {
        for index in pair.next().await? {
            // Its peer reset it (or closed it before this side was shut
            // down, which only a reset does): nothing more can go through
            // it, so the pair ends now, not when the other side gives up.
            if !ended[1 - index] && sock::is_closed(sockets[index].socket)? {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    if index == 0 {
                        "the client reset the connection"
                    } else {
                        "the builder reset the connection"
                    },
                ));
            }
            if !ended[index] {
                buf.resize(STRAY_BUFFER, 0);
                ended[index] = !pump(&sockets[index], &sockets[1 - index], &mut buf).await?;
            }
        }
    }
    Ok(())
}

/// One socket of a spliced pair.
struct Spliced<'a> {
    socket: &'a StdTcpStream,
    /// This side made the connection (the upstream): TCP_INFO's count of
    /// acknowledged bytes then includes its SYN, which carries no data.
    connected: bool,
}

impl Spliced<'_> {
    /// Bytes written to the socket: acknowledged or waiting in its queue.
    fn written(&self) -> io::Result<u64> {
        let acked = sock::tcp_counts(self.socket)?
            .acked
            .saturating_sub(u64::from(self.connected));
        Ok(acked + sock::unacked(self.socket)?)
    }
}

/// Handles an event on `from`: forwards stray bytes, and on EOF passes the
/// half-close to `to` once the kernel has delivered everything before it.
/// Returns whether `from` is still open for reading.
async fn pump(from: &Spliced<'_>, to: &Spliced<'_>, buf: &mut [u8]) -> io::Result<bool> {
    let mut reader = from.socket;
    loop {
        match reader.read(buf) {
            Ok(0) => {
                drain(from.socket, to).await?;
                shutdown_write(to.socket)?;
                return Ok(false);
            }
            Ok(n) => write_all_polling(to.socket, &buf[..n]).await?,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
            Err(e) => return Err(e),
        }
    }
}

/// Waits until `to` has taken every byte `from` received (the kernel's
/// redirect works asynchronously), so a FIN never overtakes data.
async fn drain(from: &StdTcpStream, to: &Spliced<'_>) -> io::Result<()> {
    // Called after EOF: the count includes the FIN, which is not data.
    let received = sock::tcp_counts(from)?.received.saturating_sub(1);
    let mut last_progress = Instant::now();
    let mut last_written = 0;
    loop {
        let written = to.written()?;
        if written >= received {
            return Ok(());
        }
        // A peer that reset `to` takes no more bytes: waiting is pointless.
        if sock::is_closed(to.socket)? {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "peer reset the connection while bytes were on their way to it",
            ));
        }
        if written != last_written {
            last_written = written;
            last_progress = Instant::now();
        } else if last_progress.elapsed() > DRAIN_STALL_LIMIT {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "peer stopped reading; closing",
            ));
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Writes stray bytes to a non-blocking socket that tokio does not watch,
/// polling while its buffer is full. Stray bytes only come while a pair is
/// torn down, so this is rare and short.
async fn write_all_polling(mut to: &StdTcpStream, mut bytes: &[u8]) -> io::Result<()> {
    let mut last_progress = Instant::now();
    while !bytes.is_empty() {
        match to.write(bytes) {
            Ok(n) => {
                bytes = &bytes[n..];
                last_progress = Instant::now();
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if last_progress.elapsed() > DRAIN_STALL_LIMIT {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "peer stopped reading; closing",
                    ));
                }
                tokio::time::sleep(POLL_INTERVAL).await;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn shutdown_write(socket: &StdTcpStream) -> io::Result<()> {
    match socket.shutdown(std::net::Shutdown::Write) {
        Err(e) if e.kind() != io::ErrorKind::NotConnected => Err(e),
        _ => Ok(()),
    }
}

/// Makes the coming close an RST, so the client fails at once instead of
/// waiting.
fn reset(socket: &TcpStream) {
    let _ = sock::reset_on_close(socket);
}

async fn step<T>(f: impl Future<Output = io::Result<T>>) -> io::Result<T> {
    timeout(HANDOFF_STEP_TIMEOUT, f)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "peer stalled during the handoff"))?
}

/// Reads one line (up to and including `\n`) without consuming a byte past
/// it: bytes are peeked first and only the line's own bytes are read.
async fn read_line(socket: &TcpStream, max: usize) -> io::Result<Vec<u8>> {
    let mut line = Vec::new();
    let mut buf = vec![0u8; max];
    loop {
        let want = max - line.len();
        let n = socket.peek(&mut buf[..want]).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let take = match buf[..n].iter().position(|&b| b == b'\n') {
            Some(end) => end + 1,
            None => n,
        };
        let mut chunk = vec![0u8; take];
        read_exact_from(socket, &mut chunk).await?;
        line.extend_from_slice(&chunk);
        if line.last() == Some(&b'\n') {
            return Ok(line);
        }
        if line.len() >= max {
            return Ok(line);
        }
    }
}

async fn read_exact_from(socket: &TcpStream, mut out: &mut [u8]) -> io::Result<()> {
    while !out.is_empty() {
        socket.readable().await?;
        match socket.try_read(out) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => out = &mut out[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads one unencrypted SSH binary packet (RFC 4253 6), whole.
async fn read_packet(socket: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    socket.read_exact(&mut len).await?;
    let body = u32::from_be_bytes(len) as usize;
    if !(5..=MAX_CLEAR_PACKET).contains(&body) {
        return Err(io::Error::other(format!(
            "first SSH packet has an impossible length {body}"
        )));
    }
    let mut packet = vec![0u8; 4 + body];
    packet[..4].copy_from_slice(&len);
    socket.read_exact(&mut packet[4..]).await?;
    Ok(packet)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connected pair: the daemon's side and the client's.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (daemon_side, _) = listener.accept().await.unwrap();
        (daemon_side, client)
    }

    async fn client_line(sent: &[u8], close: bool) -> Result<Vec<u8>, Rejection> {
        let (daemon_side, mut client) = pair().await;
        client.write_all(sent).await.unwrap();
        if close {
            client.shutdown().await.unwrap();
        }
        let mut line = Vec::new();
        let read = timeout(
            Duration::from_secs(5),
            read_client_line(&daemon_side, &mut line),
        );
        read.await
            .expect("the read did not wait for more")
            .map(|()| line)
    }

    /// A connection accepted just before a takeover's recall, whose task has
    /// not run yet, is still handed over: the recall waits for the task, which
    /// parks it. (Counted from its first poll instead, it was left out and cut
    /// with the old process: a client reset during a takeover.)
    #[tokio::test]
    async fn a_connection_spawned_just_before_a_recall_is_parked_not_lost() {
        // A builder that accepts and never sends its banner: the task waits there
        // if the recall does not stop it first.
        let builder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let config = crate::config::Config::parse(&format!(
            "[[service]]\nname = \"s\"\nlisten = [\"127.0.0.22\"]\n\
             [builders.b1]\naddress = \"{}\"\n",
            builder.local_addr().unwrap()
        ))
        .unwrap();
        let registry = Arc::new(crate::decide::registry::Registry::new(
            config,
            crate::state::OperatorState::default(),
            None,
        ));
        let mut recaller = crate::dataplane::handover::Recaller::default();
        let cx = Context {
            handoffs: registry.handoffs.clone(),
            dispatcher: registry,
            path: DataPath::Userspace,
            splicer: None,
            recall: recaller.recall(),
            ident_timeout: Duration::from_secs(5),
        };
        let (daemon_side, mut client) = pair().await;
        client.write_all(b"SSH-2.0-OpenSSH_9.2\r\n").await.unwrap();
        let ticket = cx.handoffs.admit([127, 0, 0, 1].into()).unwrap();
        let accepted = Accepted {
            client: daemon_side,
            service: "s".to_owned(),
            steered: "b1".to_owned(),
            consumed: Vec::new(),
            opened_unix_ms: unix_ms(),
        };
        // The test's runtime has one thread: the task cannot run before the
        // recall starts.
        spawn_serve(accepted, ticket, cx);
        let (parked, stragglers) = recaller.collect(Duration::from_secs(5)).await;
        assert_eq!((parked.len(), stragglers), (1, 0));
        assert!(matches!(&parked[0], Parked::Fresh { service, .. } if service == "s"));
    }

    #[tokio::test]
    async fn the_client_line_is_read_whole_and_nothing_past_it() {
        let (daemon_side, mut client) = pair().await;
        client
            .write_all(b"SSH-2.0-OpenSSH_9.2\r\nKEX")
            .await
            .unwrap();
        let mut line = Vec::new();
        read_client_line(&daemon_side, &mut line).await.unwrap();
        assert_eq!(line, b"SSH-2.0-OpenSSH_9.2\r\n");
        let mut rest = [0u8; 3];
        daemon_side.try_read(&mut rest).unwrap();
        assert_eq!(&rest, b"KEX");
    }

    #[tokio::test]
    async fn a_line_begun_by_a_predecessor_is_finished_whole() {
        let (daemon_side, mut client) = pair().await;
        client.write_all(b"SSH-2.0-Op").await.unwrap();
        let mut line = Vec::new();
        // Stopped (as a takeover recalls it) once the first part is in.
        let first = timeout(
            Duration::from_millis(200),
            read_client_line(&daemon_side, &mut line),
        )
        .await;
        assert!(first.is_err(), "the read did not wait for the rest");
        assert_eq!(line, b"SSH-2.0-Op");
        client.write_all(b"enSSH_9.2\r\n").await.unwrap();
        read_client_line(&daemon_side, &mut line).await.unwrap();
        assert_eq!(line, b"SSH-2.0-OpenSSH_9.2\r\n");
    }

    #[tokio::test]
    async fn junk_and_over_long_lines_end_the_read_at_once() {
        // Bytes that cannot start `SSH-` end it without waiting for a line feed.
        let junk = client_line(b"\x16\x03\x01", false).await.unwrap();
        assert!(ident::parse(&junk).is_err());
        let http = client_line(b"GET / HTTP/1.1\r\n", false).await.unwrap();
        assert!(matches!(
            ident::parse(&http),
            Err(IdentError::NotSsh { .. })
        ));
        // One byte past RFC 4253's limit is enough to reject, not cut, the line.
        let mut long = b"SSH-2.0-".to_vec();
        long.resize(400, b'a');
        let read = client_line(&long, false).await.unwrap();
        assert_eq!(read.len(), ident::MAX_LINE + 1);
        assert_eq!(ident::parse(&read), Err(IdentError::TooLong));
    }

    #[tokio::test]
    async fn a_client_that_leaves_mid_line_is_rejected() {
        assert!(matches!(
            client_line(b"SSH-2.0-part", true).await,
            Err(Rejection::Left(_))
        ));
    }

    #[tokio::test]
    async fn a_client_leaving_during_the_handoff_is_noticed() {
        let (daemon_side, client) = pair().await;
        let gone = client_gone(&daemon_side);
        drop(client);
        let error = timeout(Duration::from_secs(5), gone).await.unwrap();
        assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof);
    }
}
