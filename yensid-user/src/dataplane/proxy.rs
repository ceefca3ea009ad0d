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
//!    ident_timeout` (default 5 s), and check it ([`crate::dataplane::ident::parse`]): a
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
//! Steps 1 and 2 are in `handoff`; a spliced pair is watched in
//! `spliced`; the userspace path's relay is `crate::dataplane::relay`.
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
//!   buffer full (`spliced::SPLICED_SEND_BUFFER`); the daemon woke on every
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
//!   twice the CPU: the sockmap stayed the default then. (With real ssh,
//!   issue 13 later measured `splice(2)` in the daemon ahead of it on
//!   uploads; `[daemon] forward = "auto"` now picks by whether systemd's
//!   file descriptor store can keep socket-map sessions through a crash.)
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
    io,
    net::TcpStream as StdTcpStream,
    os::fd::AsRawFd,
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use tokio::{io::AsyncWriteExt, net::TcpStream};
use tracing::{debug, info, warn};

mod handoff;
mod spliced;

pub use handoff::connect;
use handoff::{HandoffEnd, Opening, handoff, read_packet, step};
use spliced::{SPLICED_SEND_BUFFER, watch_pair};

use crate::{
    config::Forward,
    dataplane::admission::{Handoffs, Quiet, Ticket},
    dataplane::handover::{Meta, Parked, Recall, Running},
    dataplane::relay::Relay,
    kernel::bpf::{Kernel, Observation},
    kernel::hangup::Hangups,
    kernel::sock,
    operate::fdstore,
};

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

/// Makes the coming close an RST, so the client fails at once instead of
/// waiting.
fn reset(socket: &TcpStream) {
    let _ = sock::reset_on_close(socket);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connected pair: the daemon's side and the client's.
    pub(super) async fn pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (daemon_side, _) = listener.accept().await.unwrap();
        (daemon_side, client)
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
}
