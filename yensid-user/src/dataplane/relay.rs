//! The userspace data path: bytes move between the two sockets with
//! `splice(2)` through a pipe per direction, so they are never copied into
//! the daemon's memory (the kernel moves page references from one socket's
//! receive queue to the other's send queue, as HAProxy's `splice-auto` does).
//!
//! All the state of a relay lives in [`Relay`], not in a future: the pipes
//! hold the bytes in flight, and the counts and half-close flags are updated
//! right after each syscall. A relay stopped at any await point (a takeover
//! recalls it) therefore loses nothing, and another process given its
//! descriptors and [`RelayState`] carries on where it stopped.
//!
//! A direction holds a pipe only while bytes are in it: it takes one from a
//! shared pool when it moves bytes and gives it back once the pipe is empty,
//! as HAProxy does. An idle connection then costs its two sockets only (not
//! six descriptors), and at every await point a direction holds a pipe if
//! and only if `in_pipe > 0`, which is how a successor knows which pipes
//! come with a relay.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use serde::{Deserialize, Serialize};
use tokio::{io::Interest, net::TcpStream};

/// Capacity asked for each pipe (`F_SETPIPE_SZ`); the kernel may give less
/// (`/proc/sys/fs/pipe-max-size` for unprivileged users) and the relay uses
/// what it got. Like a socket buffer it is a limit, not an allocation.
const PIPE_SIZE: usize = 1 << 20;
/// Empty pipes kept for the next relay that needs one; more are closed.
const POOLED_PIPES: usize = 64;

/// Empty pipes, ready for use.
static POOL: std::sync::Mutex<Vec<Pipe>> = std::sync::Mutex::new(Vec::new());

fn take_pipe() -> io::Result<Pipe> {
    let pooled = POOL.lock().unwrap_or_else(|e| e.into_inner()).pop();
    match pooled {
        Some(pipe) => Ok(pipe),
        None => Pipe::new(),
    }
}

/// Gives back an empty pipe.
fn give_back(pipe: Pipe) {
    let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
    if pool.len() < POOLED_PIPES {
        pool.push(pipe);
    }
}

/// One pipe, its two ends.
pub struct Pipe {
    pub read: OwnedFd,
    pub write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Self> {
        let mut fds = [0; 2];
        // SAFETY: valid out array of two ints.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 returned two fresh descriptors that nothing else owns.
        let pipe = unsafe {
            Pipe {
                read: OwnedFd::from_raw_fd(fds[0]),
                write: OwnedFd::from_raw_fd(fds[1]),
            }
        };
        // SAFETY: plain fcntl on our own descriptor. A smaller pipe only
        // moves fewer bytes per call, so a refusal is not an error.
        unsafe {
            libc::fcntl(
                pipe.write.as_raw_fd(),
                libc::F_SETPIPE_SZ,
                PIPE_SIZE as libc::c_int,
            )
        };
        Ok(pipe)
    }
}

/// Where one direction stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Direction {
    /// Bytes taken from the source and not yet given to the destination:
    /// they are in the pipe.
    pub in_pipe: u64,
    /// Bytes given to the destination.
    pub moved: u64,
    /// The source sent its end of stream.
    pub eof: bool,
    /// The end of stream was passed on (the destination is shut down for
    /// writing).
    pub shut: bool,
}

/// The state of a relay apart from its descriptors.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayState {
    /// Client to builder.
    pub up: Direction,
    /// Builder to client.
    pub down: Direction,
}

/// A relay between a client and its builder.
#[derive(Default)]
pub struct Relay {
    /// Client to builder, while bytes are in it.
    pub up_pipe: Option<Pipe>,
    /// Builder to client, while bytes are in it.
    pub down_pipe: Option<Pipe>,
    pub state: RelayState,
}

impl Relay {
    pub fn new() -> Self {
        Relay::default()
    }

    /// Moves bytes both ways until both directions ended (each end of
    /// stream passed on). Cancel-safe: see the module documentation.
    pub async fn run(&mut self, client: &TcpStream, upstream: &TcpStream) -> io::Result<()> {
        let Relay {
            up_pipe,
            down_pipe,
            state,
        } = self;
        let up = pump(client, upstream, up_pipe, &mut state.up);
        let down = pump(upstream, client, down_pipe, &mut state.down);
        tokio::try_join!(up, down).map(drop)
    }
}

/// What `splice_in` returns when the socket has bytes but the pipe took
/// none: the pipe is full by its slots (one per page or fragment), which
/// can happen before its byte capacity is reached. The socket's readiness
/// must not be cleared then, or its bytes would wait for a next segment
/// that may never come.
const PIPE_FULL: u64 = u64::MAX;

/// One direction: from `src` into the pipe, from the pipe into `dst`, and
/// the end of stream passed on once the pipe is empty.
async fn pump(
    src: &TcpStream,
    dst: &TcpStream,
    slot: &mut Option<Pipe>,
    dir: &mut Direction,
) -> io::Result<()> {
    loop {
        // Empty: back to the pool, before any wait.
        if dir.in_pipe == 0
            && let Some(pipe) = slot.take()
        {
            give_back(pipe);
        }
        if dir.eof && dir.in_pipe == 0 {
            if !dir.shut {
                shutdown_write(dst)?;
                dir.shut = true;
            }
            return Ok(());
        }
        // Both directions run in one task: a direction that always finds
        // work must still let the other one run.
        tokio::task::consume_budget().await;
        let mut progressed = false;
        let mut read_blocked = false;
        if !dir.eof {
            let pipe = match slot {
                Some(pipe) => pipe,
                None => slot.insert(take_pipe()?),
            };
            match src.try_io(Interest::READABLE, || splice_in(src, pipe, dir.in_pipe)) {
                Ok(0) => {
                    dir.eof = true;
                    progressed = true;
                }
                Ok(PIPE_FULL) => {}
                Ok(n) => {
                    dir.in_pipe += n;
                    progressed = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => read_blocked = true,
                Err(e) => return Err(e),
            }
        }
        let mut write_blocked = false;
        if dir.in_pipe > 0
            && let Some(pipe) = slot.as_ref()
        {
            match dst.try_io(Interest::WRITABLE, || {
                splice(pipe.read.as_raw_fd(), dst.as_raw_fd(), dir.in_pipe)
            }) {
                Ok(n) => {
                    dir.in_pipe -= n;
                    dir.moved += n;
                    progressed |= n > 0;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => write_blocked = true,
                Err(e) => return Err(e),
            }
        }
        if progressed {
            continue;
        }
        // Nothing in flight: the pipe goes back before the wait, so that an
        // idle connection holds none (and a recall finds none).
        if dir.in_pipe == 0
            && let Some(pipe) = slot.take()
        {
            give_back(pipe);
        }
        match (read_blocked, write_blocked) {
            (true, true) => {
                tokio::select! {
                    r = src.ready(Interest::READABLE) => { r?; }
                    w = dst.ready(Interest::WRITABLE) => { w?; }
                }
            }
            (true, false) => {
                src.ready(Interest::READABLE).await?;
            }
            (false, true) => {
                dst.ready(Interest::WRITABLE).await?;
            }
            // The pipe was full by its slots and has just been emptied.
            (false, false) => {}
        }
    }
}

/// From a socket into a pipe holding `in_pipe` bytes, telling a full pipe
/// ([`PIPE_FULL`]) from a socket without bytes (`WouldBlock`). An empty
/// pipe cannot be full, so only a pipe with bytes costs the extra check.
fn splice_in(src: &TcpStream, pipe: &Pipe, in_pipe: u64) -> io::Result<u64> {
    match splice(src.as_raw_fd(), pipe.write.as_raw_fd(), u64::from(u32::MAX)) {
        Err(e)
            if e.kind() == io::ErrorKind::WouldBlock && in_pipe > 0 && pending_bytes(src) > 0 =>
        {
            Ok(PIPE_FULL)
        }
        other => other,
    }
}

/// Bytes waiting in a socket's receive queue.
fn pending_bytes(socket: &TcpStream) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::FIONREAD, &mut n) } != 0 {
        return 0;
    }
    usize::try_from(n).unwrap_or(0)
}

/// One `splice(2)` call, non-blocking on both ends.
fn splice(from: i32, to: i32, len: u64) -> io::Result<u64> {
    let len = usize::try_from(len).unwrap_or(usize::MAX);
    // SAFETY: plain syscall on descriptors this relay holds; null offsets
    // (sockets and pipes have none).
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as u64)
    }
}

fn shutdown_write(socket: &TcpStream) -> io::Result<()> {
    // SAFETY: plain syscall on a descriptor the stream holds.
    if unsafe { libc::shutdown(socket.as_raw_fd(), libc::SHUT_WR) } == 0 {
        return Ok(());
    }
    match io::Error::last_os_error() {
        e if e.raw_os_error() == Some(libc::ENOTCONN) => Ok(()),
        e => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A connected pair: (accepted side, connecting side).
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let connecting = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        (accepted, connecting)
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[tokio::test]
    async fn bytes_and_half_closes_go_through_both_ways() {
        let (daemon_client, mut client) = pair().await;
        let (mut builder, daemon_upstream) = pair().await;
        let mut relay = Relay::new();
        let relaying = tokio::spawn(async move {
            relay
                .run(&daemon_client, &daemon_upstream)
                .await
                .map(|()| relay.state)
        });
        let up = pattern(5 << 20, 1);
        let down = pattern(3 << 20, 7);
        let (sent_up, sent_down) = (up.clone(), down.clone());
        let client_side = tokio::spawn(async move {
            client.write_all(&sent_up).await.unwrap();
            client.shutdown().await.unwrap();
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            got
        });
        let mut got_up = Vec::new();
        builder.read_to_end(&mut got_up).await.unwrap();
        builder.write_all(&sent_down).await.unwrap();
        builder.shutdown().await.unwrap();
        assert_eq!(client_side.await.unwrap(), down);
        assert_eq!(got_up, up);
        let state = relaying.await.unwrap().unwrap();
        assert_eq!(state.up.moved, up.len() as u64);
        assert_eq!(state.down.moved, down.len() as u64);
        assert!(state.up.shut && state.down.shut);
    }

    #[tokio::test]
    async fn a_relay_stopped_midway_resumes_without_losing_a_byte() {
        let (daemon_client, mut client) = pair().await;
        let (mut builder, daemon_upstream) = pair().await;
        let up = pattern(8 << 20, 3);
        let sent = up.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
            client
        });
        let mut relay = Relay::new();
        let mut got = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        // Stop the relay again and again, reading a little in between, so
        // that it is cut at every kind of await point with bytes in the pipe.
        while !relay.state.up.shut {
            let _ = tokio::time::timeout(
                std::time::Duration::from_millis(2),
                relay.run(&daemon_client, &daemon_upstream),
            )
            .await;
            assert_eq!(
                relay.up_pipe.is_some(),
                relay.state.up.in_pipe > 0,
                "a pipe is held exactly while bytes are in it"
            );
            if let Ok(Ok(n)) =
                tokio::time::timeout(std::time::Duration::from_millis(1), builder.read(&mut buf))
                    .await
            {
                got.extend_from_slice(&buf[..n]);
            }
        }
        builder.read_to_end(&mut got).await.unwrap();
        // Whenever it stopped, a direction held a pipe only with bytes in it.
        assert!(relay.up_pipe.is_none() && relay.down_pipe.is_none());
        assert_eq!(got.len(), up.len());
        assert!(
            got == up,
            "bytes differ after the relay was stopped and resumed"
        );
        drop(writer.await.unwrap());
    }
}
