//! Takeover: a new `yensid run` for the same instance takes the listeners
//! and every live connection from the daemon that runs, so that a restart,
//! an upgrade or a configuration change loses no build.
//!
//! The two processes talk over a `SOCK_SEQPACKET` unix socket,
//! `<runtime_dir>/<instance>.handover` (mode 0600; only root or the
//! daemon's own user may connect). Each message is one JSON document; the
//! descriptors it names travel with it (`SCM_RIGHTS`), so message
//! boundaries keep every descriptor with its description.
//!
//! 1. new -> old: [`Message::Hello`] (protocol and map ABI).
//! 2. old -> new: [`Message::Offer`] (its map indices), or
//!    [`Message::Refused`] (another ABI: the pinned maps cannot be shared).
//! 3. The new daemon loads its BPF side on the shared pinned maps (its
//!    dispatch program attaches next to the old one) and sends
//!    [`Message::Proceed`].
//! 4. The old daemon stops accepting (the listeners stay open and in the
//!    kernel's socket map, so new connections wait in their queues),
//!    recalls every connection task ([`Recall`]): each stops at a point
//!    where its state is whole ([`Parked`]), and sends everything in
//!    [`Message::Batch`]es, then [`Message::End`].
//! 5. The new daemon adopts it all, serves, and sends [`Message::Done`];
//!    the old one exits without touching the kernel. Spliced pairs never
//!    stop flowing: the kernel forwards their bytes whoever holds the
//!    sockets.
//!
//! If the new daemon fails or goes away before `Done`, the old one takes
//! its descriptors back into service and serves on.

use std::{
    io::{self, IoSlice, IoSliceMut},
    mem::MaybeUninit,
    net::{SocketAddr, TcpStream as StdTcpStream},
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags, SocketType,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use crate::dataplane::relay::{Pipe, Relay, RelayState};

/// Version of this exchange; both sides must speak the same.
pub const PROTOCOL: u32 = 1;
/// Largest message: a batch of connection descriptions.
const MAX_MESSAGE: usize = 1 << 20;
/// Descriptors per message, below the kernel's `SCM_MAX_FD` (253).
pub const MAX_FDS_PER_MESSAGE: usize = 240;
/// How long either side waits for the other's next message.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("handover socket {path}: {source}")]
    Socket {
        path: std::path::PathBuf,
        source: io::Error,
    },
    #[error("handover: {0}")]
    Io(#[from] io::Error),
    #[error("handover: the other daemon closed the connection")]
    Closed,
    #[error("handover: malformed message: {0}")]
    Malformed(String),
    #[error("handover: expected {expected}, got {got}")]
    Unexpected { expected: &'static str, got: String },
    #[error("the running daemon refused the takeover: {0}")]
    Refused(String),
}

/// Map indices the new daemon must keep, so that both programs (attached
/// side by side for a moment) and the kernel's per-builder counts agree.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Indices {
    pub services: Vec<(String, u32)>,
    pub builders: Vec<(String, u32)>,
    pub listeners: Vec<(String, u32)>,
}

/// What a connection was, whoever serves it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Meta {
    pub service: String,
    pub builder: String,
    pub peer: Option<SocketAddr>,
    /// When the client connected (Unix time, milliseconds).
    pub opened_unix_ms: u64,
    pub failovers: u32,
    /// Its sockets are in systemd's file descriptor store.
    #[serde(default)]
    pub in_fd_store: bool,
}

/// A connection stopped where its whole state is known.
pub enum Parked {
    /// Still in its handoff: nothing from a builder reached the client, so
    /// the next daemon starts the handoff again, with the bytes of the
    /// client's identification line read so far.
    Fresh {
        client: StdTcpStream,
        service: String,
        steered: String,
        consumed: Vec<u8>,
        opened_unix_ms: u64,
    },
    /// Spliced in the kernel. `ended[i]`: socket `i` (client, builder) sent
    /// its end of stream and it was passed on.
    Spliced {
        client: StdTcpStream,
        upstream: StdTcpStream,
        meta: Meta,
        ended: [bool; 2],
    },
    /// Relayed in userspace; the bytes in flight are in the relay's pipes.
    Copied {
        client: StdTcpStream,
        upstream: StdTcpStream,
        relay: Relay,
        meta: Meta,
    },
}

impl Parked {
    pub fn kind(&self) -> &'static str {
        match self {
            Parked::Fresh { .. } => "in handoff",
            Parked::Spliced { .. } => "spliced",
            Parked::Copied { .. } => "copied",
        }
    }
}

/// The daemon's side of recalling its connection tasks: each task holds a
/// [`Recall`], watches it at the points where it may stop, and parks its
/// state here when asked.
pub struct Recaller {
    request: watch::Sender<bool>,
    parked_tx: mpsc::UnboundedSender<Parked>,
    parked_rx: mpsc::UnboundedReceiver<Parked>,
    live: Arc<AtomicUsize>,
}

impl Default for Recaller {
    fn default() -> Self {
        let (request, _) = watch::channel(false);
        let (parked_tx, parked_rx) = mpsc::unbounded_channel();
        Recaller {
            request,
            parked_tx,
            parked_rx,
            live: Arc::new(AtomicUsize::new(0)),
        }
    }
}

impl Recaller {
    /// What a new connection task takes along.
    pub fn recall(&self) -> Recall {
        Recall {
            requested: self.request.subscribe(),
            parked: self.parked_tx.clone(),
            live: self.live.clone(),
        }
    }

    /// Asks every connection task to park, and collects what they park
    /// until none runs any more or `limit` passed. Returns the parked
    /// connections and how many tasks were still running at the limit
    /// (each in a step that cannot be interrupted: they end with this
    /// process).
    pub async fn collect(&mut self, limit: Duration) -> (Vec<Parked>, usize) {
        self.request.send_replace(true);
        let deadline = tokio::time::Instant::now() + limit;
        let mut parked = Vec::new();
        loop {
            while let Ok(p) = self.parked_rx.try_recv() {
                parked.push(p);
            }
            let running = self.live.load(Ordering::Acquire);
            if running == 0 {
                // Every task parked or ended; a park is sent before its
                // task ends, so nothing is left in the channel.
                while let Ok(p) = self.parked_rx.try_recv() {
                    parked.push(p);
                }
                return (parked, 0);
            }
            if tokio::time::Instant::now() >= deadline {
                return (parked, running);
            }
            tokio::select! {
                Some(p) = self.parked_rx.recv() => parked.push(p),
                () = tokio::time::sleep(Duration::from_millis(1)) => {}
            }
        }
    }

    /// After a takeover that failed: tasks started from now on run freely.
    pub fn reset(&self) {
        self.request.send_replace(false);
    }
}

/// A connection task's side: see [`Recaller`].
pub struct Recall {
    requested: watch::Receiver<bool>,
    parked: mpsc::UnboundedSender<Parked>,
    live: Arc<AtomicUsize>,
}

impl Clone for Recall {
    fn clone(&self) -> Self {
        Recall {
            requested: self.requested.clone(),
            parked: self.parked.clone(),
            live: self.live.clone(),
        }
    }
}

/// Counts a running connection task while it lives.
pub struct Running(Arc<AtomicUsize>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Recall {
    /// Called by each connection task first: the recaller waits for it.
    pub fn running(&self) -> Running {
        self.live.fetch_add(1, Ordering::AcqRel);
        Running(self.live.clone())
    }

    /// Resolves when the task must park; never if that is not asked.
    pub async fn requested(&self) {
        let mut rx = self.requested.clone();
        if rx.wait_for(|r| *r).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    pub fn park(&self, parked: Parked) {
        // The receiver lives as long as the daemon; if it is gone the
        // process is ending and so is the connection.
        let _ = self.parked.send(parked);
    }
}

/// The messages of the exchange.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    Hello {
        protocol: u32,
        abi: u32,
        pid: u32,
    },
    Refused {
        reason: String,
    },
    Offer {
        pid: u32,
        /// Whether the predecessor runs with BPF (its spliced pairs need
        /// a successor that has it too).
        bpf: bool,
        indices: Indices,
    },
    Proceed,
    Batch {
        items: Vec<Item>,
    },
    End,
    Done,
}

impl Message {
    fn name(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "hello",
            Message::Refused { .. } => "refused",
            Message::Offer { .. } => "offer",
            Message::Proceed => "proceed",
            Message::Batch { .. } => "batch",
            Message::End => "end",
            Message::Done => "done",
        }
    }
}

/// One handed-over object; its descriptors follow in the message's
/// `SCM_RIGHTS`, in this order, [`Item::fds`] of them.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Item {
    /// The control socket's listener.
    Control,
    /// The metrics endpoint's listener.
    Metrics,
    /// A listener: `key` is the builder's name (`steered`: the kernel
    /// steers connections to it), or in the userspace fallback the address
    /// it binds.
    Listener {
        service: String,
        key: String,
        id: u32,
        steered: bool,
    },
    Fresh {
        service: String,
        steered: String,
        consumed: Vec<u8>,
        opened_unix_ms: u64,
    },
    Spliced {
        meta: Meta,
        ended: [bool; 2],
    },
    /// `pipes`: which of the relay's pipes (up, down) come along (a
    /// direction holds one only while bytes are in it).
    Copied {
        meta: Meta,
        relay: RelayState,
        pipes: [bool; 2],
    },
}

impl Item {
    /// How many descriptors come with it.
    pub fn fds(&self) -> usize {
        match self {
            Item::Control | Item::Metrics | Item::Listener { .. } | Item::Fresh { .. } => 1,
            Item::Spliced { .. } => 2,
            Item::Copied { pipes, .. } => 2 + 2 * pipes.iter().filter(|&&p| p).count(),
        }
    }
}

/// A parked connection as an item and its descriptors (borrowed from it).
pub fn describe(parked: &Parked) -> (Item, Vec<BorrowedFd<'_>>) {
    match parked {
        Parked::Fresh {
            client,
            service,
            steered,
            consumed,
            opened_unix_ms,
        } => (
            Item::Fresh {
                service: service.clone(),
                steered: steered.clone(),
                consumed: consumed.clone(),
                opened_unix_ms: *opened_unix_ms,
            },
            vec![client.as_fd()],
        ),
        Parked::Spliced {
            client,
            upstream,
            meta,
            ended,
        } => (
            Item::Spliced {
                meta: meta.clone(),
                ended: *ended,
            },
            vec![client.as_fd(), upstream.as_fd()],
        ),
        Parked::Copied {
            client,
            upstream,
            relay,
            meta,
        } => {
            let mut fds = vec![client.as_fd(), upstream.as_fd()];
            for pipe in [&relay.up_pipe, &relay.down_pipe].into_iter().flatten() {
                fds.extend([pipe.read.as_fd(), pipe.write.as_fd()]);
            }
            (
                Item::Copied {
                    meta: meta.clone(),
                    relay: relay.state,
                    pipes: [relay.up_pipe.is_some(), relay.down_pipe.is_some()],
                },
                fds,
            )
        }
    }
}

/// What a received item becomes.
pub enum Received {
    Control(OwnedFd),
    Metrics(OwnedFd),
    Listener {
        service: String,
        key: String,
        id: u32,
        steered: bool,
        socket: OwnedFd,
    },
    Connection(Parked),
}

/// Joins an item with its descriptors.
pub fn rebuild(
    item: Item,
    fds: &mut impl Iterator<Item = OwnedFd>,
) -> Result<Received, HandoverError> {
    let mut next = || {
        fds.next()
            .ok_or_else(|| HandoverError::Malformed("fewer descriptors than items".to_owned()))
    };
    let stream = |fd: OwnedFd| StdTcpStream::from(fd);
    Ok(match item {
        Item::Control => Received::Control(next()?),
        Item::Metrics => Received::Metrics(next()?),
        Item::Listener {
            service,
            key,
            id,
            steered,
        } => Received::Listener {
            service,
            key,
            id,
            steered,
            socket: next()?,
        },
        Item::Fresh {
            service,
            steered,
            consumed,
            opened_unix_ms,
        } => Received::Connection(Parked::Fresh {
            client: stream(next()?),
            service,
            steered,
            consumed,
            opened_unix_ms,
        }),
        Item::Spliced { meta, ended } => Received::Connection(Parked::Spliced {
            client: stream(next()?),
            upstream: stream(next()?),
            meta,
            ended,
        }),
        Item::Copied { meta, relay, pipes } => {
            let client = stream(next()?);
            let upstream = stream(next()?);
            let mut pipe = |present: bool| -> Result<Option<Pipe>, HandoverError> {
                if !present {
                    return Ok(None);
                }
                Ok(Some(Pipe {
                    read: next()?,
                    write: next()?,
                }))
            };
            let up_pipe = pipe(pipes[0])?;
            let down_pipe = pipe(pipes[1])?;
            Received::Connection(Parked::Copied {
                client,
                upstream,
                relay: Relay {
                    up_pipe,
                    down_pipe,
                    state: relay,
                },
                meta,
            })
        }
    })
}

/// The handover socket's path for an instance.
pub fn socket_path(runtime_dir: &Path, instance: &str) -> std::path::PathBuf {
    runtime_dir.join(format!("{instance}.handover"))
}

/// Binds the handover socket (replacing a stale file), mode 0600.
pub fn bind(path: &Path) -> Result<OwnedFd, HandoverError> {
    let wrap = |source: io::Error| HandoverError::Socket {
        path: path.to_owned(),
        source,
    };
    let socket = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )
    .map_err(|e| wrap(e.into()))?;
    let _ = std::fs::remove_file(path);
    let addr = SocketAddrUnix::new(path).map_err(|e| wrap(e.into()))?;
    rustix::net::bind(&socket, &addr).map_err(|e| wrap(e.into()))?;
    // Until this mode is set anyone may connect; `accept` checks each
    // peer's credentials anyway.
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .map_err(wrap)?;
    rustix::net::listen(&socket, 4).map_err(|e| wrap(e.into()))?;
    Ok(socket)
}

/// Connects to a running daemon's handover socket; `None` when none
/// listens there.
pub fn connect(path: &Path) -> Result<Option<OwnedFd>, HandoverError> {
    let wrap = |source: io::Error| HandoverError::Socket {
        path: path.to_owned(),
        source,
    };
    if !path.exists() {
        return Ok(None);
    }
    let socket = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )
    .map_err(|e| wrap(e.into()))?;
    let addr = SocketAddrUnix::new(path).map_err(|e| wrap(e.into()))?;
    match rustix::net::connect(&socket, &addr) {
        Ok(()) => {}
        // A file left by a daemon that is gone.
        Err(rustix::io::Errno::CONNREFUSED) | Err(rustix::io::Errno::NOENT) => return Ok(None),
        Err(e) => return Err(wrap(e.into())),
    }
    set_timeout(&socket)?;
    Ok(Some(socket))
}

/// Accepts one connection on the (non-blocking) handover listener, if one
/// is waiting; only root or this process's user may take over.
pub fn accept(listener: &OwnedFd) -> io::Result<Option<OwnedFd>> {
    let socket = match rustix::net::accept_with(listener, SocketFlags::CLOEXEC) {
        Ok(socket) => socket,
        Err(rustix::io::Errno::AGAIN) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let peer = rustix::net::sockopt::socket_peercred(&socket)?;
    let me = rustix::process::geteuid();
    if !peer.uid.is_root() && peer.uid != me {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("uid {} may not take over", peer.uid.as_raw()),
        ));
    }
    set_timeout(&socket)?;
    Ok(Some(socket))
}

fn set_timeout(socket: &OwnedFd) -> io::Result<()> {
    for which in [
        rustix::net::sockopt::Timeout::Recv,
        rustix::net::sockopt::Timeout::Send,
    ] {
        rustix::net::sockopt::set_socket_timeout(socket, which, Some(STEP_TIMEOUT))?;
    }
    Ok(())
}

/// Sends one message with its descriptors (blocking).
pub fn send(
    socket: &OwnedFd,
    message: &Message,
    fds: &[BorrowedFd<'_>],
) -> Result<(), HandoverError> {
    let body = serde_json::to_vec(message).map_err(|e| HandoverError::Malformed(e.to_string()))?;
    if body.len() > MAX_MESSAGE || fds.len() > MAX_FDS_PER_MESSAGE {
        return Err(HandoverError::Malformed(format!(
            "{} message too large ({} bytes, {} descriptors)",
            message.name(),
            body.len(),
            fds.len()
        )));
    }
    let mut space =
        vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS_PER_MESSAGE))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(HandoverError::Malformed(
            "descriptor buffer too small".to_owned(),
        ));
    }
    let sent = rustix::net::sendmsg(
        socket,
        &[IoSlice::new(&body)],
        &mut control,
        SendFlags::NOSIGNAL,
    )
    .map_err(io::Error::from)?;
    if sent != body.len() {
        return Err(HandoverError::Io(io::Error::new(
            io::ErrorKind::WriteZero,
            "message cut short",
        )));
    }
    Ok(())
}

/// Receives one message and its descriptors (blocking, within
/// [`STEP_TIMEOUT`]).
pub fn recv(socket: &OwnedFd) -> Result<(Message, Vec<OwnedFd>), HandoverError> {
    let mut body = vec![0u8; MAX_MESSAGE];
    let mut space =
        vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS_PER_MESSAGE))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = rustix::net::recvmsg(
        socket,
        &mut [IoSliceMut::new(&mut body)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )
    .map_err(io::Error::from)?;
    let mut fds = Vec::new();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = message {
            fds.extend(received);
        }
    }
    if got.bytes == 0 {
        return Err(HandoverError::Closed);
    }
    if got.flags.contains(rustix::net::ReturnFlags::TRUNC)
        || got.flags.contains(rustix::net::ReturnFlags::CTRUNC)
    {
        return Err(HandoverError::Malformed(
            "message or descriptors cut short".to_owned(),
        ));
    }
    let message = serde_json::from_slice(&body[..got.bytes])
        .map_err(|e| HandoverError::Malformed(e.to_string()))?;
    Ok((message, fds))
}

/// Receives the next message, which must be `expected`.
pub fn expect(
    socket: &OwnedFd,
    expected: &'static str,
) -> Result<(Message, Vec<OwnedFd>), HandoverError> {
    let (message, fds) = recv(socket)?;
    if let Message::Refused { reason } = message {
        return Err(HandoverError::Refused(reason));
    }
    if message.name() != expected {
        return Err(HandoverError::Unexpected {
            expected,
            got: message.name().to_owned(),
        });
    }
    Ok((message, fds))
}

/// Sends items with their descriptors in batches that fit a message.
pub fn send_items(
    socket: &OwnedFd,
    items: Vec<(Item, Vec<BorrowedFd<'_>>)>,
) -> Result<(), HandoverError> {
    let mut batch = Vec::new();
    let mut fds: Vec<BorrowedFd<'_>> = Vec::new();
    let mut bytes = 0;
    for (item, item_fds) in items {
        // Descriptions are small except a partial identification line
        // (at most 256 bytes, each up to 4 JSON characters).
        if fds.len() + item_fds.len() > MAX_FDS_PER_MESSAGE || bytes > MAX_MESSAGE / 2 {
            send(
                socket,
                &Message::Batch {
                    items: std::mem::take(&mut batch),
                },
                &fds,
            )?;
            fds.clear();
            bytes = 0;
        }
        bytes += 1024;
        batch.push(item);
        fds.extend(item_fds);
    }
    if !batch.is_empty() {
        send(socket, &Message::Batch { items: batch }, &fds)?;
    }
    send(socket, &Message::End, &[])
}

/// Receives batches up to `End` and joins each item with its descriptors.
pub fn recv_items(socket: &OwnedFd) -> Result<Vec<Received>, HandoverError> {
    let mut received = Vec::new();
    loop {
        let (message, fds) = recv(socket)?;
        match message {
            Message::Batch { items } => {
                let wanted: usize = items.iter().map(Item::fds).sum();
                if wanted != fds.len() {
                    return Err(HandoverError::Malformed(format!(
                        "a batch names {wanted} descriptors and carries {}",
                        fds.len()
                    )));
                }
                let mut fds = fds.into_iter();
                for item in items {
                    received.push(rebuild(item, &mut fds)?);
                }
            }
            Message::End => return Ok(received),
            other => {
                return Err(HandoverError::Unexpected {
                    expected: "batch or end",
                    got: other.name().to_owned(),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn pair() -> (OwnedFd, OwnedFd) {
        let (a, b) = rustix::net::socketpair(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )
        .unwrap();
        (a, b)
    }

    fn tcp_pair() -> (StdTcpStream, StdTcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let a = StdTcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (b, _) = listener.accept().unwrap();
        (a, b)
    }

    fn meta() -> Meta {
        Meta {
            service: "x86".to_owned(),
            builder: "b1".to_owned(),
            peer: None,
            opened_unix_ms: 1,
            failovers: 0,
            in_fd_store: false,
        }
    }

    #[test]
    fn many_connections_cross_in_batches_with_their_sockets() {
        let (old, new) = pair();
        let mut ends = Vec::new();
        let mut parked = Vec::new();
        for _ in 0..300 {
            let (mut outside_client, inside_client) = tcp_pair();
            let (inside_upstream, outside_upstream) = tcp_pair();
            outside_client.write_all(b"x").unwrap();
            ends.push((outside_client, outside_upstream));
            parked.push(Parked::Spliced {
                client: inside_client,
                upstream: inside_upstream,
                meta: meta(),
                ended: [false, true],
            });
        }
        let sender = std::thread::spawn(move || {
            let items = parked.iter().map(describe).collect();
            send_items(&old, items).unwrap();
            // The sender's copies close here; the receiver's stay.
        });
        let received = recv_items(&new).unwrap();
        sender.join().unwrap();
        assert_eq!(received.len(), 300);
        for (r, (_client, mut upstream)) in received.into_iter().zip(ends) {
            let Received::Connection(Parked::Spliced {
                mut client,
                upstream: inside,
                ended,
                ..
            }) = r
            else {
                panic!("not a spliced connection");
            };
            assert_eq!(ended, [false, true]);
            let mut byte = [0u8; 1];
            client.read_exact(&mut byte).unwrap();
            assert_eq!(&byte, b"x");
            (&inside).write_all(b"y").unwrap();
            upstream.read_exact(&mut byte).unwrap();
            assert_eq!(&byte, b"y");
        }
    }

    #[test]
    fn a_batch_whose_descriptors_do_not_match_its_items_is_rejected() {
        let (old, new) = pair();
        let (a, _b) = tcp_pair();
        send(
            &old,
            &Message::Batch {
                items: vec![Item::Spliced {
                    meta: meta(),
                    ended: [false, false],
                }],
            },
            &[a.as_fd()],
        )
        .unwrap();
        assert!(matches!(recv_items(&new), Err(HandoverError::Malformed(_))));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let (old, new) = pair();
        rustix::net::send(
            &old,
            b"{\"type\":\"hello\",\"protocol\":",
            SendFlags::empty(),
        )
        .unwrap();
        assert!(matches!(recv(&new), Err(HandoverError::Malformed(_))));
        drop(old);
        assert!(matches!(recv(&new), Err(HandoverError::Closed)));
    }
}
