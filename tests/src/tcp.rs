//! Raw TCP clients inside a namespace: connection attempts that tell a refusal from a
//! timeout, SSH identification exchanges that say which server answered, and junk.

use std::io::{self, Read, Write};
use std::mem;
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::netns::Netns;

/// Long enough that only a hung or black-holed connection reaches it.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a read waits for the peer before the exchange counts as hung.
const READ_TIMEOUT: Duration = Duration::from_secs(20);
/// What the raw client announces itself as; the server answers with its own line.
pub const CLIENT_IDENTIFICATION: &[u8] = b"SSH-2.0-yensid-test\r\n";
/// RFC 4253 caps the identification line at 255 bytes; lines before it are allowed,
/// so allow some of those too.
const MAX_PREAMBLE: usize = 8192;

/// How a TCP connection attempt ended.
#[derive(Debug)]
pub enum ConnectAttempt {
    Accepted(TcpStream),
    /// ECONNREFUSED: the SYN was answered with RST.
    Refused,
    /// Nothing answered within the connect timeout.
    TimedOut,
    Failed(io::Error),
}

impl ConnectAttempt {
    /// The connection, or an error saying how the attempt ended instead.
    pub fn accepted(self) -> Result<TcpStream> {
        match self {
            Self::Accepted(stream) => Ok(stream),
            other => bail!("connection not accepted: {other:?}"),
        }
    }

    pub fn is_refused(&self) -> bool {
        matches!(self, Self::Refused)
    }
}

/// A TCP connection that has exchanged SSH identification lines and first packets
/// (KEXINIT) and is held open: through yensid, such a connection has been handed to the
/// data path (spliced in the kernel or copied), since the daemon passes the server's
/// first packet on only then.
pub struct SshConnection {
    stream: TcpStream,
    banner: String,
}

impl SshConnection {
    /// Sends our identification line, reads the server's (skipping any lines RFC 4253
    /// allows before it), sends a valid KEXINIT and reads the server's first packet.
    /// An OpenSSH server then waits for our key exchange, holding the connection.
    pub fn handshake(stream: TcpStream) -> Result<Self> {
        Self::open(stream, Opening::Sequential)
    }

    /// Like [`Self::handshake`], but sends the identification line, KEXINIT and one
    /// more packet (`SSH_MSG_IGNORE`) at once, before the server said a word: a peer
    /// that sent more than one packet before key exchange, which yensid copies in
    /// userspace instead of splicing.
    pub fn handshake_eager(stream: TcpStream) -> Result<Self> {
        Self::open(stream, Opening::Eager)
    }

    fn open(mut stream: TcpStream, opening: Opening) -> Result<Self> {
        stream.set_read_timeout(Some(READ_TIMEOUT))?;
        if let Opening::Eager = opening {
            let mut all = CLIENT_IDENTIFICATION.to_vec();
            all.extend_from_slice(&kexinit_packet());
            all.extend_from_slice(&ignore_packet());
            stream
                .write_all(&all)
                .context("send identification and packets")?;
        } else {
            stream
                .write_all(CLIENT_IDENTIFICATION)
                .context("send identification")?;
        }
        let mut received = Vec::new();
        let (banner, rest) = loop {
            if let Some(found) = identification_line(&received) {
                break found;
            }
            if received.len() > MAX_PREAMBLE {
                bail!("no SSH identification line in {MAX_PREAMBLE} bytes");
            }
            if !read_more(&mut stream, &mut received)? {
                bail!(
                    "connection closed before the server identified itself (got {:?})",
                    String::from_utf8_lossy(&received)
                );
            }
        };
        if let Opening::Sequential = opening {
            stream
                .write_all(&kexinit_packet())
                .context("send KEXINIT")?;
        }
        let mut packet = received[rest..].to_vec();
        loop {
            if let Some(length) = packet.get(..4) {
                let length = u32::from_be_bytes(length.try_into().expect("4 bytes")) as usize;
                ensure!(
                    (5..=MAX_FIRST_PACKET).contains(&length),
                    "the server's first packet has an impossible length {length}"
                );
                if packet.len() >= 4 + length {
                    ensure!(
                        packet.get(5) == Some(&SSH_MSG_KEXINIT),
                        "the server's first packet is no KEXINIT: {:?}",
                        &packet[..packet.len().min(16)]
                    );
                    return Ok(Self { stream, banner });
                }
            }
            if !read_more(&mut stream, &mut packet)? {
                bail!("connection closed before the server's KEXINIT (server {banner:?})");
            }
        }
    }

    /// The server's identification line, without CR LF.
    pub fn banner(&self) -> &str {
        &self.banner
    }

    /// Our end's address: what the daemon logs as the connection's `peer`.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.stream.local_addr()?)
    }

    /// The server's address as our socket reports it (getpeername).
    pub fn peer_addr(&self) -> Result<SocketAddr> {
        Ok(self.stream.peer_addr()?)
    }

    /// The server's name: the test sshds put it last in the banner (`VersionAddendum`).
    pub fn served_by(&self) -> &str {
        self.banner.rsplit(' ').next().unwrap_or_default()
    }

    /// Closes our side and waits until the server's side closes too. Through yensid, our
    /// EOF must travel to the builder and the builder's back (half-close passed on both
    /// ways), so when this returns the proxy has seen the connection end.
    pub fn close(self) -> Result<()> {
        self.stream.shutdown(Shutdown::Write)?;
        if !read_until_closed(&self.stream, &mut Vec::new())? {
            bail!("peer did not close within {READ_TIMEOUT:?} after our EOF");
        }
        Ok(())
    }
}

/// What a server did with a client that did not speak SSH.
#[derive(Debug)]
pub struct JunkReply {
    /// Every byte the server sent.
    pub received: Vec<u8>,
    /// Whether the server closed (FIN or RST) instead of waiting for more.
    pub closed: bool,
}

/// Makes TCP connections from inside a namespace, optionally from a given source address.
pub struct RawClient<'a> {
    ns: &'a Netns,
    source: Option<IpAddr>,
    connect_timeout: Duration,
}

impl<'a> RawClient<'a> {
    pub fn new(ns: &'a Netns) -> Self {
        Self {
            ns,
            source: None,
            connect_timeout: CONNECT_TIMEOUT,
        }
    }

    /// Binds every connection to `source` (which must be an address of the namespace).
    pub fn from_source(mut self, source: IpAddr) -> Self {
        self.source = Some(source);
        self
    }

    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    pub fn connect(&self, target: SocketAddr) -> ConnectAttempt {
        self.ns
            .run(|| self.connect_here(target))
            .unwrap_or_else(|e| ConnectAttempt::Failed(io::Error::other(format!("{e:#}"))))
    }

    /// Connects, exchanges identification lines and keeps the connection open.
    pub fn open_ssh(&self, target: SocketAddr) -> Result<SshConnection> {
        let stream = self
            .connect(target)
            .accepted()
            .with_context(|| format!("connect to {target}"))?;
        SshConnection::handshake(stream).with_context(|| format!("SSH exchange with {target}"))
    }

    /// Like [`Self::open_ssh`] with [`SshConnection::handshake_eager`]: more than one
    /// packet before key exchange.
    pub fn open_ssh_eager(&self, target: SocketAddr) -> Result<SshConnection> {
        let stream = self
            .connect(target)
            .accepted()
            .with_context(|| format!("connect to {target}"))?;
        SshConnection::handshake_eager(stream)
            .with_context(|| format!("eager SSH exchange with {target}"))
    }

    /// The name of the server that answers a fresh connection to `target`; the
    /// connection is dropped right after the banner.
    pub fn banner(&self, target: SocketAddr) -> Result<String> {
        Ok(self.open_ssh(target)?.served_by().to_owned())
    }

    /// [`Self::banner`] `count` times in a row, all from one namespace-joined thread.
    pub fn banners(&self, target: SocketAddr, count: usize) -> Result<Vec<String>> {
        self.ns.run(|| {
            (0..count)
                .map(|i| {
                    let stream = self
                        .connect_here(target)
                        .accepted()
                        .with_context(|| format!("connection {i} to {target}"))?;
                    let ssh = SshConnection::handshake(stream)
                        .with_context(|| format!("SSH exchange {i} with {target}"))?;
                    Ok(ssh.served_by().to_owned())
                })
                .collect()
        })?
    }

    /// Connects, sends `junk` and reports whether and how the server hung up.
    pub fn send_junk(&self, target: SocketAddr, junk: &[u8]) -> Result<JunkReply> {
        let mut stream = self
            .connect(target)
            .accepted()
            .with_context(|| format!("connect to {target}"))?;
        stream.set_read_timeout(Some(READ_TIMEOUT))?;
        if let Err(e) = stream.write_all(junk) {
            // The server may hang up before we finish writing; that is a close too.
            if is_reset(&e) {
                return Ok(JunkReply {
                    received: Vec::new(),
                    closed: true,
                });
            }
            return Err(e).context("send junk");
        }
        let mut received = Vec::new();
        let closed = read_until_closed(&stream, &mut received)?;
        Ok(JunkReply { received, closed })
    }

    fn connect_here(&self, target: SocketAddr) -> ConnectAttempt {
        match connect(target, self.source, self.connect_timeout) {
            Ok(stream) => ConnectAttempt::Accepted(stream),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => ConnectAttempt::Refused,
            Err(e) if e.kind() == io::ErrorKind::TimedOut => ConnectAttempt::TimedOut,
            Err(e) => ConnectAttempt::Failed(e),
        }
    }
}

/// How [`SshConnection`] opens.
#[derive(Clone, Copy)]
enum Opening {
    /// Identification line, the server's, then KEXINIT: what SSH clients do.
    Sequential,
    /// Identification line, KEXINIT and one more packet at once.
    Eager,
}

const SSH_MSG_IGNORE: u8 = 2;
const SSH_MSG_KEXINIT: u8 = 20;
/// RFC 4253 lets a packet be 35000 bytes.
const MAX_FIRST_PACKET: usize = 35_000;

/// Reads what is there into `into`; false at end of stream.
fn read_more(stream: &mut TcpStream, into: &mut Vec<u8>) -> Result<bool> {
    let mut chunk = [0u8; 4096];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => return Ok(false),
            Ok(n) => {
                into.extend_from_slice(&chunk[..n]);
                return Ok(true);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("read from the server"),
        }
    }
}

/// An unencrypted binary packet (RFC 4253 section 6) carrying `payload`, padded to a
/// multiple of 8 bytes with at least 4 bytes of padding.
fn packet(payload: &[u8]) -> Vec<u8> {
    let unpadded = 4 + 1 + payload.len();
    let padding = 4 + (8 - (unpadded + 4) % 8) % 8;
    let length = u32::try_from(1 + payload.len() + padding).expect("a small packet");
    let mut packet = length.to_be_bytes().to_vec();
    packet.push(u8::try_from(padding).expect("at most 11"));
    packet.extend_from_slice(payload);
    packet.resize(packet.len() + padding, 0);
    packet
}

/// A KEXINIT an OpenSSH server accepts (RFC 4253 section 7.1): after it, the server
/// waits for our key exchange message, so the connection stays open, idle.
pub fn kexinit_packet() -> Vec<u8> {
    let mut payload = vec![SSH_MSG_KEXINIT];
    payload.extend_from_slice(&[0x5a; 16]);
    for list in [
        "curve25519-sha256,curve25519-sha256@libssh.org,ecdh-sha2-nistp256",
        "ssh-ed25519",
        "aes128-ctr,aes256-ctr,chacha20-poly1305@openssh.com",
        "aes128-ctr,aes256-ctr,chacha20-poly1305@openssh.com",
        "hmac-sha2-256,hmac-sha2-512",
        "hmac-sha2-256,hmac-sha2-512",
        "none",
        "none",
        "",
        "",
    ] {
        payload.extend_from_slice(&u32::try_from(list.len()).expect("short").to_be_bytes());
        payload.extend_from_slice(list.as_bytes());
    }
    // first_kex_packet_follows = false, reserved = 0.
    payload.push(0);
    payload.extend_from_slice(&[0; 4]);
    packet(&payload)
}

/// `SSH_MSG_IGNORE` with a short string: valid at any time, ignored by the server.
fn ignore_packet() -> Vec<u8> {
    let mut payload = vec![SSH_MSG_IGNORE];
    payload.extend_from_slice(&4u32.to_be_bytes());
    payload.extend_from_slice(b"more");
    packet(&payload)
}

/// The first complete line starting with `SSH-`, if `received` holds one yet, and the
/// offset just past it.
fn identification_line(received: &[u8]) -> Option<(String, usize)> {
    let mut start = 0;
    while let Some(end) = received[start..].iter().position(|&b| b == b'\n') {
        let line = &received[start..start + end];
        let next = start + end + 1;
        if line.starts_with(b"SSH-") {
            let text = String::from_utf8_lossy(line);
            return Some((text.trim_end_matches('\r').to_owned(), next));
        }
        start = next;
    }
    None
}

/// Reads into `into` until EOF or reset (true) or the read timeout (false).
fn read_until_closed(mut stream: &TcpStream, into: &mut Vec<u8>) -> Result<bool> {
    stream.set_read_timeout(Some(READ_TIMEOUT))?;
    let mut chunk = [0u8; 4096];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => return Ok(true),
            Ok(n) => into.extend_from_slice(&chunk[..n]),
            Err(e) if is_reset(&e) => return Ok(true),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(false);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("read"),
        }
    }
}

fn is_reset(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
    )
}

/// A TCP connect in the calling thread's namespace, optionally bound to `source` first
/// (std cannot bind before connecting), that keeps ECONNREFUSED and ETIMEDOUT apart.
fn connect(target: SocketAddr, source: Option<IpAddr>, timeout: Duration) -> io::Result<TcpStream> {
    let family = match target {
        SocketAddr::V4(_) => libc::AF_INET,
        SocketAddr::V6(_) => libc::AF_INET6,
    };
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe {
        libc::socket(
            family,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and nothing else owns it.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    if let Some(source) = source {
        let (addr, len) = sockaddr(SocketAddr::new(source, 0));
        // SAFETY: `addr` is a valid sockaddr of `len` bytes for this socket's family.
        if unsafe { libc::bind(fd, (&raw const addr).cast(), len) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    let (addr, len) = sockaddr(target);
    // SAFETY: as for bind.
    if unsafe { libc::connect(fd, (&raw const addr).cast(), len) } != 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(err);
        }
        wait_writable(fd, timeout)?;
        let so_error = socket_error(fd)?;
        if so_error != 0 {
            return Err(io::Error::from_raw_os_error(so_error));
        }
    }
    let stream = TcpStream::from(socket);
    stream.set_nonblocking(false)?;
    Ok(stream)
}

/// Waits until a non-blocking connect on `fd` has finished one way or the other.
fn wait_writable(fd: RawFd, timeout: Duration) -> io::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        let mut pollfd = libc::pollfd {
            fd,
            events: libc::POLLOUT,
            revents: 0,
        };
        let millis = libc::c_int::try_from(left.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd.
        match unsafe { libc::poll(&mut pollfd, 1, millis) } {
            0 => {}
            n if n > 0 => return Ok(()),
            _ => {
                let err = io::Error::last_os_error();
                if err.kind() != io::ErrorKind::Interrupted {
                    return Err(err);
                }
            }
        }
    }
}

/// The pending error of a socket (`SO_ERROR`), e.g. after a non-blocking
/// connect.
pub fn socket_error(fd: RawFd) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` describe a c_int buffer, as SO_ERROR expects.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&raw mut value).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero bytes are a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is big enough and aligned for any sockaddr.
            unsafe { (&raw mut storage).cast::<libc::sockaddr_in>().write(sin) };
            mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: v6.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: v6.scope_id(),
            };
            // SAFETY: as above.
            unsafe { (&raw mut storage).cast::<libc::sockaddr_in6>().write(sin6) };
            mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identification_line_skips_preamble_and_waits_for_line_end() {
        assert_eq!(identification_line(b"SSH-2.0-OpenSSH_9.2p1 b1"), None);
        assert_eq!(
            identification_line(b"hello\r\nSSH-2.0-OpenSSH_9.2p1 b1\r\n\x00\x00"),
            Some(("SSH-2.0-OpenSSH_9.2p1 b1".to_owned(), 33))
        );
    }

    #[test]
    fn packets_are_padded_to_blocks_of_eight() {
        for payload_len in 0..40 {
            let p = packet(&vec![7; payload_len]);
            let length = u32::from_be_bytes(p[..4].try_into().unwrap()) as usize;
            assert_eq!(p.len(), 4 + length);
            assert_eq!(p.len() % 8, 0, "payload {payload_len}");
            assert!((4..=11).contains(&p[4]), "padding {}", p[4]);
            assert_eq!(length, 1 + payload_len + usize::from(p[4]));
        }
        assert_eq!(kexinit_packet()[5], SSH_MSG_KEXINIT);
    }
}
