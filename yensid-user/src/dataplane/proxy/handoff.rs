//! Steps 1 and 2 of the handoff (see [`super`]): the client's
//! identification line, checked before any builder is contacted, then a
//! builder's, failing over while the client has seen nothing; and the
//! reads of the lines and first packets that stop exactly at their end.

use std::{
    io,
    time::{Duration, Instant},
};

use tokio::{
    io::AsyncReadExt,
    net::{TcpSocket, TcpStream},
    time::timeout,
};
use tracing::{info, warn};

use super::{Context, Dispatcher, Outcome};
use crate::{
    dataplane::admission::Quiet,
    dataplane::ident::{self, IdentError},
    kernel::bpf::Observation,
    kernel::sock,
};

/// Longest identification line (RFC 4253 4.2: 255 bytes including CRLF).
const MAX_IDENT_LINE: usize = 255;

/// Longest pre-identification banner a server may send.
const MAX_SERVER_PREAMBLE: usize = 8192;

/// Largest packet allowed before encryption starts (RFC 4253 6.1).
const MAX_CLEAR_PACKET: usize = 35000;

/// How long a peer may take with each step of the handoff.
const HANDOFF_STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// At most 20 lines per 10 s about rejected clients, so a flood of junk
/// connections does not flood the log.
static REJECTIONS: Quiet = Quiet::new(Duration::from_secs(10), 20);

/// Why a handoff did not lead to a data path.
pub(super) enum HandoffEnd {
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
pub(super) struct Opening {
    pub(super) builder: String,
    pub(super) upstream: TcpStream,
    /// Keeps the kernel measuring the upstream path while the connection
    /// lives.
    pub(super) observation: Option<Observation>,
    /// The client's identification line, not yet sent to the builder.
    pub(super) client_line: Vec<u8>,
    /// The server's lines up to and including its identification line.
    pub(super) server_lines: Vec<u8>,
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
pub(super) async fn handoff(
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
pub(super) async fn open_with_failover(
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

pub(super) async fn step<T>(f: impl Future<Output = io::Result<T>>) -> io::Result<T> {
    timeout(HANDOFF_STEP_TIMEOUT, f)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "peer stalled during the handoff"))?
}

/// Reads one line (up to and including `\n`) without consuming a byte past
/// it: bytes are peeked first and only the line's own bytes are read.
pub(super) async fn read_line(socket: &TcpStream, max: usize) -> io::Result<Vec<u8>> {
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
pub(super) async fn read_packet(socket: &mut TcpStream) -> io::Result<Vec<u8>> {
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
    use tokio::io::AsyncWriteExt;

    use super::*;
    use crate::dataplane::proxy::tests::pair;

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
