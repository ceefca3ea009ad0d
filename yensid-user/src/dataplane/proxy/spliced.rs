//! A pair spliced in the kernel, watched from userspace: woken only by
//! half-closes and errors, it forwards the stray bytes the kernel did not
//! redirect and passes a half-close on once every byte before it was
//! delivered.

use std::{
    io::{self, Read, Write},
    net::TcpStream as StdTcpStream,
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use super::{Context, Finish, Outcome, Recalled, count_upstream};
use crate::{
    dataplane::handover::Meta, kernel::bpf::Kernel, kernel::hangup::Hangups, kernel::sock,
    operate::fdstore,
};

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
pub(super) const SPLICED_SEND_BUFFER: usize = 8 << 20;

/// Buffer for the stray bytes of a spliced socket that is ending.
const STRAY_BUFFER: usize = 4096;

/// How long a half-close may wait for the kernel to deliver earlier bytes
/// without any progress.
const DRAIN_STALL_LIMIT: Duration = Duration::from_secs(60);

/// How often a half-close checks whether the kernel delivered those bytes.
const POLL_INTERVAL: Duration = Duration::from_millis(1);

/// Watches a spliced pair until it ends or is recalled.
#[allow(clippy::too_many_arguments)]
pub(super) async fn watch_pair(
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
