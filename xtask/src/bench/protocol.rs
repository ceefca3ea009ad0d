//! The bench server on the builders and its client.
//!
//! The builders run a bench server instead of sshd: through sshd the figures
//! would measure ssh's ciphers, not the redirector. The server speaks just
//! enough SSH for yensid's handoff (yensid-user/src/dataplane/proxy.rs):
//!
//! 1. the server sends `SSH-2.0-yensid-bench\r\n`, the client
//!    `SSH-2.0-bench-client\r\n`;
//! 2. each then sends one unencrypted, length-prefixed packet standing in for
//!    KEXINIT, and sends nothing more until it has the other's. The client's
//!    packet says what follows: `U` upload (the server reads to EOF and
//!    answers with the count, a big-endian u64), `D` download (the server
//!    writes the requested count, then half-closes), `B` banner only (the
//!    client closes, then the server), `H` hold (like `B`, but the server
//!    waits for the client's close without a time limit: an idle session).
//! 3. for a download the client sends one more byte once it has the
//!    server's packet, and only then does the server start. That is SSH's
//!    order too (the server's next message answers the client's key
//!    exchange) and yensid relies on it: it writes the server's packet to
//!    the client itself after splicing, so anything the server sent on
//!    receiving the client's packet could overtake it. For the same reason
//!    the client is the first to hang up after a banner-only exchange: a
//!    builder that closes right after the client's packet can make the
//!    kernel path lose the server's packet, a fault of its own that the
//!    latency figure is not about.
//!
//! By the time a transfer starts, yensid's kernel path has spliced the
//! pair, so the payload crosses the sockmap. Byte counts are checked: a
//! wrong count is an error, not a number.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use yensid_tests::Builder;

/// Where the bench server listens on each builder (sshd keeps port 22).
pub const BENCH_PORT: u16 = 2222;
const SERVER_IDENTIFICATION: &[u8] = b"SSH-2.0-yensid-bench\r\n";
const CLIENT_IDENTIFICATION: &[u8] = b"SSH-2.0-bench-client\r\n";
/// RFC 4253 caps an identification line at 255 bytes.
const MAX_LINE: u64 = 255;
/// Body of the packet standing in for KEXINIT: a mode byte, a u64 count,
/// padding. yensid accepts bodies of 5 to 35000 bytes.
const PACKET_BODY: usize = 28;
/// The server's packet carries no request.
const SERVER_TAG: u8 = b'S';
/// The client's go-ahead for a download.
const DOWNLOAD_GO: u8 = b'G';
pub const TRANSFER_BUFFER: usize = 256 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A single read or write stalling this long means the path hangs; it
/// turns a hang into an error instead of a bench that never ends.
const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// Stack of a server thread: it holds no more than a few small arrays (its
/// buffers are on the heap), and ten thousand idle sessions mean ten
/// thousand threads.
const SERVER_STACK: usize = 256 * 1024;

/// The bench server in one builder's namespace, a thread per connection;
/// stopped on drop.
pub struct BenchServer {
    /// The name of the builder it runs on.
    pub builder: String,
    pub address: SocketAddr,
    listener: TcpListener,
    acceptor: Option<JoinHandle<()>>,
    /// Connections accepted and not yet over.
    open: Arc<AtomicUsize>,
}

impl BenchServer {
    pub fn start(builder: &Builder) -> Result<Self> {
        let address = SocketAddr::from((builder.address(), BENCH_PORT));
        let listener = builder
            .ns()
            .run(|| TcpListener::bind(address))?
            .with_context(|| format!("bind the bench server to {address}"))?;
        let accepting = listener.try_clone()?;
        let open = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&open);
        let acceptor = thread::spawn(move || accept_connections(&accepting, &counter));
        Ok(Self {
            builder: builder.name().to_owned(),
            address,
            listener,
            acceptor: Some(acceptor),
            open,
        })
    }

    /// Connections accepted and not yet over: zero once a measurement's
    /// connections (and the middlebox's health checks) are all closed.
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }
}

impl Drop for BenchServer {
    fn drop(&mut self) {
        // shutdown(2) on a listening socket makes a blocked accept(2) fail,
        // which ends the acceptor without a polling loop.
        // SAFETY: shutdown on a socket this value owns; no memory involved.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

/// Runs until the listener is shut down.
fn accept_connections(listener: &TcpListener, open: &Arc<AtomicUsize>) {
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                open.fetch_add(1, Ordering::AcqRel);
                let counter = Arc::clone(open);
                let spawned = thread::Builder::new()
                    .stack_size(SERVER_STACK)
                    .spawn(move || {
                        // The client sees and reports every failure that
                        // matters; health probes that hang up early are no
                        // failure at all.
                        let _ = serve(stream);
                        counter.fetch_sub(1, Ordering::AcqRel);
                    });
                // Out of threads, the connection was dropped with the
                // closure: the client sees it close and reports it.
                if spawned.is_err() {
                    open.fetch_sub(1, Ordering::AcqRel);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
            Err(_) => return,
        }
    }
}

/// What the client asks for in its packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Client to builder.
    Upload,
    /// Builder to client.
    Download,
    /// Nothing after the packets.
    BannerOnly,
    /// Nothing after the packets, for as long as the client likes.
    Hold,
}

impl Mode {
    fn tag(self) -> u8 {
        match self {
            Self::Upload => b'U',
            Self::Download => b'D',
            Self::BannerOnly => b'B',
            Self::Hold => b'H',
        }
    }

    fn from_tag(tag: u8) -> Option<Self> {
        [Self::Upload, Self::Download, Self::BannerOnly, Self::Hold]
            .into_iter()
            .find(|mode| mode.tag() == tag)
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Upload => "upload",
            Self::Download => "download",
            Self::BannerOnly => "banner",
            Self::Hold => "hold",
        }
    }
}

/// The server side of one connection.
fn serve(stream: TcpStream) -> Result<()> {
    configure(&stream)?;
    (&stream).write_all(SERVER_IDENTIFICATION)?;
    let mut reader = BufReader::new(stream);
    let line = read_line(&mut reader)?;
    ensure!(line.starts_with(b"SSH-"), "the client is not speaking SSH");
    reader.get_ref().write_all(&packet(SERVER_TAG, 0))?;
    let (tag, bytes) = read_packet(&mut reader)?;
    match Mode::from_tag(tag) {
        Some(Mode::Upload) => {
            let received = read_to_eof(&mut reader)?;
            reader.get_ref().write_all(&received.to_be_bytes())?;
        }
        Some(Mode::Download) => {
            let mut go = [0u8; 1];
            reader.read_exact(&mut go)?;
            ensure!(go[0] == DOWNLOAD_GO, "expected the download go-ahead");
            write_bytes(reader.get_ref(), bytes)?;
            reader.get_ref().shutdown(Shutdown::Write)?;
        }
        Some(Mode::BannerOnly) => expect_eof(&mut reader)?,
        Some(Mode::Hold) => {
            reader.get_ref().set_read_timeout(None)?;
            expect_eof(&mut reader)?;
        }
        None => bail!("unknown mode {tag:#x}"),
    }
    Ok(())
}

/// A client connection that has exchanged identification lines.
pub struct BenchClient {
    reader: BufReader<TcpStream>,
}

impl BenchClient {
    /// Connects, sends the client's line and reads the server's: the span
    /// the latency figure times. Must run inside the client namespace.
    pub fn connect(address: SocketAddr) -> Result<Self> {
        let stream = TcpStream::connect_timeout(&address, CONNECT_TIMEOUT)
            .with_context(|| format!("connect to {address}"))?;
        configure(&stream)?;
        (&stream).write_all(CLIENT_IDENTIFICATION)?;
        let mut reader = BufReader::new(stream);
        let line = read_line(&mut reader).context("read the server's identification")?;
        ensure!(
            line == SERVER_IDENTIFICATION,
            "expected the bench server's identification, got {:?}",
            String::from_utf8_lossy(&line)
        );
        Ok(Self { reader })
    }

    /// Exchanges the packets asking for `mode`, transfers `bytes` and checks
    /// the count. [`Mode::Hold`] is [`Self::hold`]'s.
    pub fn run(mut self, mode: Mode, bytes: u64) -> Result<()> {
        self.exchange_packets(mode, bytes)?;
        match mode {
            Mode::Upload => self.upload(bytes),
            Mode::Download => self.download(bytes),
            Mode::BannerOnly => Ok(()),
            Mode::Hold => bail!("a held session is opened with BenchClient::hold"),
        }
    }

    /// Exchanges the packets of an idle session, which stays open until the
    /// returned stream is dropped.
    pub fn hold(mut self) -> Result<TcpStream> {
        self.exchange_packets(Mode::Hold, 0)?;
        ensure!(
            self.reader.buffer().is_empty(),
            "the server sent more than its packet"
        );
        Ok(self.reader.into_inner())
    }

    fn exchange_packets(&mut self, mode: Mode, bytes: u64) -> Result<()> {
        self.reader
            .get_ref()
            .write_all(&packet(mode.tag(), bytes))?;
        let (tag, _) = read_packet(&mut self.reader).context("read the server's packet")?;
        ensure!(tag == SERVER_TAG, "unexpected server packet {tag:#x}");
        Ok(())
    }

    fn upload(mut self, bytes: u64) -> Result<()> {
        write_bytes(self.reader.get_ref(), bytes).context("upload")?;
        self.reader.get_ref().shutdown(Shutdown::Write)?;
        let mut count = [0u8; 8];
        self.reader
            .read_exact(&mut count)
            .context("read the server's byte count")?;
        let received = u64::from_be_bytes(count);
        ensure!(
            received == bytes,
            "the server received {received} bytes, {bytes} were sent"
        );
        expect_eof(&mut self.reader)
    }

    fn download(mut self, bytes: u64) -> Result<()> {
        self.reader.get_ref().write_all(&[DOWNLOAD_GO])?;
        let received = read_to_eof(&mut self.reader).context("download")?;
        ensure!(
            received == bytes,
            "received {received} bytes, the server sent {bytes}"
        );
        Ok(())
    }
}

fn configure(stream: &TcpStream) -> io::Result<()> {
    // Like ssh: small handshake writes go out at once.
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))
}

fn read_line(reader: &mut BufReader<TcpStream>) -> Result<Vec<u8>> {
    let mut line = Vec::new();
    reader
        .by_ref()
        .take(MAX_LINE)
        .read_until(b'\n', &mut line)?;
    ensure!(
        line.ends_with(b"\n"),
        "no complete line: {:?}",
        String::from_utf8_lossy(&line)
    );
    Ok(line)
}

/// A packet of [`PACKET_BODY`] bytes after its big-endian length.
fn packet(tag: u8, count: u64) -> [u8; 4 + PACKET_BODY] {
    let mut packet = [0u8; 4 + PACKET_BODY];
    packet[..4].copy_from_slice(&(PACKET_BODY as u32).to_be_bytes());
    packet[4] = tag;
    packet[5..13].copy_from_slice(&count.to_be_bytes());
    packet
}

/// Reads a [`packet`]: its tag and count.
fn read_packet(reader: &mut impl Read) -> Result<(u8, u64)> {
    let mut packet = [0u8; 4 + PACKET_BODY];
    reader.read_exact(&mut packet)?;
    let length = u32::from_be_bytes(packet[..4].try_into()?);
    ensure!(
        length as usize == PACKET_BODY,
        "packet length {length}, expected {PACKET_BODY}"
    );
    Ok((packet[4], u64::from_be_bytes(packet[5..13].try_into()?)))
}

fn write_bytes(mut out: &TcpStream, bytes: u64) -> io::Result<()> {
    let buffer = vec![0u8; TRANSFER_BUFFER];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(TRANSFER_BUFFER as u64) as usize;
        out.write_all(&buffer[..n])?;
        left -= n as u64;
    }
    Ok(())
}

/// Reads until EOF and returns how many bytes came.
fn read_to_eof(reader: &mut impl Read) -> io::Result<u64> {
    let mut buffer = vec![0u8; TRANSFER_BUFFER];
    let mut received = 0;
    loop {
        match reader.read(&mut buffer)? {
            0 => return Ok(received),
            n => received += n as u64,
        }
    }
}

fn expect_eof(reader: &mut impl Read) -> Result<()> {
    let mut byte = [0u8; 1];
    ensure!(
        reader.read(&mut byte)? == 0,
        "the peer sent more than expected"
    );
    Ok(())
}
