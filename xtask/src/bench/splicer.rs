//! A splice(2) forwarder in the bench process, the prototype issue 13 asks
//! for beside the socket map (`--contender splice`; not in a default run):
//! per connection a thread per direction moves the bytes socket → pipe →
//! socket with splice(2), as HAProxy does with `option splice-*`, in
//! blocking mode. No SSH handoff, no health, builders taken in turn: only
//! the cost of moving bytes through a process with splice(2) is measured.

use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::thread::{self, JoinHandle};

use anyhow::{Context, Result, bail};
use yensid_tests::Netns;

use super::contender::Middlebox;

/// Bytes a pipe holds (`F_SETPIPE_SZ`), and the most one splice moves.
const PIPE_BYTES: usize = 1 << 20;

/// The forwarder; stopped (no new connections) on drop.
pub struct Splicer {
    listener: TcpListener,
    acceptor: Option<JoinHandle<()>>,
}

impl Splicer {
    /// Listens on `listen` in `ns` and forwards each connection to the next
    /// of `upstreams`.
    pub fn start(ns: &Netns, listen: SocketAddr, upstreams: Vec<SocketAddr>) -> Result<Self> {
        if upstreams.is_empty() {
            bail!("no upstream to forward to");
        }
        let listener = ns
            .run(|| TcpListener::bind(listen))?
            .with_context(|| format!("bind the splice(2) prototype to {listen}"))?;
        let accepting = listener.try_clone()?;
        // Spawned from inside the namespace, so its upstream connections
        // start there too.
        let acceptor = ns.run(move || thread::spawn(move || accept(&accepting, &upstreams)))?;
        Ok(Self {
            listener,
            acceptor: Some(acceptor),
        })
    }
}

impl Drop for Splicer {
    fn drop(&mut self) {
        // shutdown(2) on a listening socket fails the blocked accept(2).
        // SAFETY: shutdown on a socket this value owns.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

impl Middlebox for Splicer {
    fn pid(&self) -> Option<u32> {
        // It runs in the bench process, whose RSS is the bench's own.
        None
    }

    fn refuse(&mut self) -> Result<SocketAddr> {
        bail!("the splice(2) prototype has no way to refuse")
    }

    fn finish(self: Box<Self>) -> Result<Vec<String>> {
        Ok(Vec::new())
    }
}

fn accept(listener: &TcpListener, upstreams: &[SocketAddr]) {
    let mut next = 0;
    loop {
        let client = match listener.accept() {
            Ok((client, _)) => client,
            Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => continue,
            Err(_) => return,
        };
        let upstream = upstreams[next % upstreams.len()];
        next += 1;
        // A connection that fails is the client's to see: it is closed.
        let _ = thread::Builder::new().spawn(move || {
            let _ = forward(client, upstream);
        });
    }
}

/// Connects to `upstream` and splices both ways until both have ended.
fn forward(client: TcpStream, upstream: SocketAddr) -> io::Result<()> {
    let upstream = TcpStream::connect(upstream)?;
    client.set_nodelay(true)?;
    upstream.set_nodelay(true)?;
    let (client_in, upstream_out) = (client.try_clone()?, upstream.try_clone()?);
    let up = thread::spawn(move || pump(&client_in, &upstream_out));
    let down = pump(&upstream, &client);
    let up = up
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("pump panicked")));
    down.and(up)
}

/// Moves bytes from `from` to `to` through a pipe until `from` ends, then
/// passes the half-close on. An error ends both directions.
fn pump(from: &TcpStream, to: &TcpStream) -> io::Result<()> {
    let moved = (|| {
        let (read_end, write_end) = pipe()?;
        loop {
            let n = splice(from.as_raw_fd(), write_end.as_raw_fd(), PIPE_BYTES)?;
            if n == 0 {
                return to.shutdown(Shutdown::Write);
            }
            let mut left = n;
            while left > 0 {
                let m = splice(read_end.as_raw_fd(), to.as_raw_fd(), left)?;
                if m == 0 {
                    return Err(io::Error::from(io::ErrorKind::WriteZero));
                }
                left -= m;
            }
        }
    })();
    if moved.is_err() {
        let _ = from.shutdown(Shutdown::Both);
        let _ = to.shutdown(Shutdown::Both);
    }
    moved
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 fills the two descriptors of the array we own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both were just opened and are owned by nothing else.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // A bigger pipe moves more per call; the default (64 KiB) also works.
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        libc::fcntl(
            write_end.as_raw_fd(),
            libc::F_SETPIPE_SZ,
            PIPE_BYTES as libc::c_int,
        )
    };
    Ok((read_end, write_end))
}

/// One splice(2) of at most `len` bytes; blocks like read(2).
fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    loop {
        // SAFETY: no offsets (sockets and pipes have none); descriptors the
        // caller owns for the duration of the call.
        let n = unsafe {
            libc::splice(
                from,
                std::ptr::null_mut(),
                to,
                std::ptr::null_mut(),
                len,
                libc::SPLICE_F_MOVE,
            )
        };
        match n {
            n if n >= 0 => return Ok(n as usize),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn bytes_and_half_closes_go_through_both_ways() {
        let server = TcpListener::bind("127.0.0.1:0").expect("bind");
        let server_addr = server.local_addr().expect("address");
        let echo = thread::spawn(move || {
            let (mut s, _) = server.accept().expect("accept");
            let mut got = Vec::new();
            s.read_to_end(&mut got).expect("read");
            s.write_all(&got).expect("write");
        });
        let front = TcpListener::bind("127.0.0.1:0").expect("bind");
        let front_addr = front.local_addr().expect("address");
        let proxy = thread::spawn(move || {
            let (client, _) = front.accept().expect("accept");
            forward(client, server_addr)
        });
        let mut client = TcpStream::connect(front_addr).expect("connect");
        let sent: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        client.write_all(&sent).expect("send");
        client.shutdown(Shutdown::Write).expect("half-close");
        let mut back = Vec::new();
        client.read_to_end(&mut back).expect("receive");
        assert!(back == sent, "the bytes came back altered");
        proxy.join().expect("proxy").expect("forwarded");
        echo.join().expect("echo");
    }
}
