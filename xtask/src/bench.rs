//! `cargo xtask bench`: a direct connection, the yensid kernel path and the
//! yensid userspace path, measured side by side in one run on one topology.
//!
//! The builders run a bench server instead of sshd: through sshd the figures
//! would measure ssh's ciphers, not the redirector. The server speaks just
//! enough SSH for yensid's handoff (yensid-user/src/proxy.rs):
//!
//! 1. the server sends `SSH-2.0-yensid-bench\r\n`, the client
//!    `SSH-2.0-bench-client\r\n`;
//! 2. each then sends one unencrypted, length-prefixed packet standing in for
//!    KEXINIT, and sends nothing more until it has the other's. The client's
//!    packet says what follows: `U` upload (the server reads to EOF and
//!    answers with the count, a big-endian u64), `D` download (the server
//!    writes the requested count, then half-closes), `B` banner only (the
//!    client closes, then the server).
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
//! By the time the transfer starts, yensid's kernel path has spliced the
//! pair, so the payload crosses the sockmap. Byte counts are checked: a
//! wrong count is an error, not a number.
//!
//! In the same run, on the same topology, `reaction.rs` measures how fast the
//! kernel path starts refusing after a link event or `yensid mode local`.

use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Barrier;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use serde_json::{Map, Value, json};
use yensid_tests::{Builder, Daemon, DaemonConfig, Dataplane, Netns, Strategy, Topology};

use crate::build;
use crate::reaction::{self, Reactions};

/// Two builders, so yensid really spreads connections over a pool.
const BUILDERS: usize = 2;
/// Where the bench server listens on each builder (sshd keeps port 22).
const BENCH_PORT: u16 = 2222;
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
const TRANSFER_BUFFER: usize = 256 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A single read or write stalling this long means the path hangs; it
/// turns a hang into an error instead of a bench that never ends.
const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// Connections made before the latency samples, so first-use costs (page
/// faults, cold caches) stay out of the percentiles.
const WARMUP_CONNECTIONS: usize = 20;
const PERCENTILES: [usize; 2] = [50, 99];
/// Warnings and errors from the daemon's log quoted in the notes.
const QUOTED_LOG_PROBLEMS: usize = 5;

#[derive(clap::Args)]
pub struct Options {
    /// Bytes per stream in the throughput figures.
    #[arg(long, default_value_t = 1 << 30)]
    bytes: u64,
    /// Sequential connections for the connect-to-banner latency.
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// Parallel streams in the multi-stream throughput figures.
    #[arg(long, default_value_t = 8)]
    streams: usize,
    /// Trials per reaction-time series (link down, `yensid mode local`).
    #[arg(long, default_value_t = 50)]
    reaction_trials: usize,
    /// Where latest.md and latest.json go (relative to the workspace root).
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
}

pub fn run(options: &Options) -> Result<()> {
    ensure!(
        build::is_root(),
        "the bench needs root: it creates network namespaces and loads BPF programs"
    );
    ensure!(
        options.bytes > 0
            && options.streams > 0
            && options.connections > 0
            && options.reaction_trials > 0,
        "--bytes, --streams, --connections and --reaction-trials must be positive"
    );
    build::all(true)?;
    let testbed = Testbed::new(build::yensid_binary(true))?;
    let results: Vec<Results> = CONTENDERS
        .iter()
        .map(|&contender| measure(contender, &testbed, options))
        .collect();
    let reactions = reaction::measure(&testbed.yensid, &testbed.topology, options.reaction_trials);
    drop(testbed);
    let report = Report::new(options, results, reactions)?;
    println!("\n{}", report.markdown());
    report.write(&build::workspace_root().join(&options.out))?;
    let failed = report.failed_figures();
    ensure!(
        failed == 0,
        "{failed} figures could not be measured; see the notes"
    );
    Ok(())
}

/// What sits between the client and the builders.
#[derive(Clone, Copy)]
enum Contender {
    Direct,
    Yensid(Dataplane),
}

/// Measured in this order; the first is the baseline of every ratio.
const CONTENDERS: [Contender; 3] = [
    Contender::Direct,
    Contender::Yensid(Dataplane::Kernel),
    Contender::Yensid(Dataplane::Userspace),
];

impl Contender {
    fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Yensid(Dataplane::Kernel) => "yensid kernel",
            Self::Yensid(Dataplane::Userspace) => "yensid userspace",
        }
    }

    fn start(self, testbed: &Testbed) -> Result<Running> {
        match self {
            Self::Direct => Ok(Running {
                targets: testbed.servers.iter().map(|s| s.address).collect(),
                middlebox: None,
            }),
            Self::Yensid(dataplane) => {
                let mut config = DaemonConfig::for_topology(
                    &testbed.topology,
                    dataplane,
                    Strategy::LeastConnections,
                );
                for server in &testbed.servers {
                    config.builder_mut(&server.builder).address = server.address;
                }
                let daemon =
                    Daemon::start_binary(&testbed.yensid, testbed.topology.client_ns(), &config)?;
                Ok(Running {
                    targets: vec![yensid_tests::service()],
                    middlebox: Some(Box::new(daemon)),
                })
            }
        }
    }
}

/// A contender while it runs.
struct Running {
    /// Where clients connect: connection i goes to `targets[i % len]`.
    targets: Vec<SocketAddr>,
    middlebox: Option<Box<dyn Middlebox>>,
}

impl Running {
    fn stop(self) -> Result<Vec<String>> {
        self.middlebox.map_or(Ok(Vec::new()), |m| m.finish())
    }
}

/// A process a contender runs between the client and the builders.
trait Middlebox {
    /// Stops it and says what its own records tell about the run.
    fn finish(self: Box<Self>) -> Result<Vec<String>>;
}

impl Middlebox for Daemon {
    fn finish(mut self: Box<Self>) -> Result<Vec<String>> {
        let status = self.stop()?;
        let log = strip_ansi(&self.log());
        ensure!(status.success(), "yensid exited with {status}");
        Ok(log_summary(&log))
    }
}

/// How many connections the kernel spliced, and the first warnings.
fn log_summary(log: &str) -> Vec<String> {
    let closed: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("connection closed"))
        .collect();
    let spliced = closed.iter().filter(|l| l.contains("spliced=true")).count();
    let mut notes = vec![format!(
        "{spliced} of {} connections spliced in the kernel (daemon log)",
        closed.len()
    )];
    notes.extend(
        log.lines()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .take(QUOTED_LOG_PROBLEMS)
            .map(|l| format!("daemon log: {}", l.trim())),
    );
    notes
}

/// tracing colours its output even when it goes to a file.
fn strip_ansi(log: &str) -> String {
    let mut plain = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // An escape sequence: `[`, parameters, one final letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    plain
}

/// Everything every contender runs against.
struct Testbed {
    // Field order is drop order: the servers' sockets before their namespaces.
    servers: Vec<BenchServer>,
    topology: Topology,
    yensid: PathBuf,
}

impl Testbed {
    fn new(yensid: PathBuf) -> Result<Self> {
        build::progress(&format!(
            "setting up a client namespace and {BUILDERS} builders"
        ));
        let topology = Topology::new(BUILDERS)?;
        let servers = topology
            .builders()
            .iter()
            .map(BenchServer::start)
            .collect::<Result<_>>()?;
        Ok(Self {
            servers,
            topology,
            yensid,
        })
    }
}

/// The bench server in one builder's namespace, a thread per connection;
/// stopped on drop.
struct BenchServer {
    /// The name of the builder it runs on.
    builder: String,
    address: SocketAddr,
    listener: TcpListener,
    acceptor: Option<JoinHandle<()>>,
}

impl BenchServer {
    fn start(builder: &Builder) -> Result<Self> {
        let address = SocketAddr::from((builder.address(), BENCH_PORT));
        let listener = builder
            .ns()
            .run(|| TcpListener::bind(address))?
            .with_context(|| format!("bind the bench server to {address}"))?;
        let accepting = listener.try_clone()?;
        let acceptor = thread::spawn(move || accept_connections(&accepting));
        Ok(Self {
            builder: builder.name().to_owned(),
            address,
            listener,
            acceptor: Some(acceptor),
        })
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
fn accept_connections(listener: &TcpListener) {
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                // The client sees and reports every failure that matters;
                // health probes that hang up early are no failure at all.
                thread::spawn(move || serve(stream));
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
            Err(_) => return,
        }
    }
}

/// What the client asks for in its packet.
#[derive(Clone, Copy)]
enum Mode {
    /// Client to builder.
    Upload,
    /// Builder to client.
    Download,
    /// Nothing after the packets.
    BannerOnly,
}

impl Mode {
    fn tag(self) -> u8 {
        match self {
            Self::Upload => b'U',
            Self::Download => b'D',
            Self::BannerOnly => b'B',
        }
    }

    fn from_tag(tag: u8) -> Option<Self> {
        [Self::Upload, Self::Download, Self::BannerOnly]
            .into_iter()
            .find(|mode| mode.tag() == tag)
    }

    fn name(self) -> &'static str {
        match self {
            Self::Upload => "upload",
            Self::Download => "download",
            Self::BannerOnly => "banner",
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
        None => bail!("unknown mode {tag:#x}"),
    }
    Ok(())
}

/// A client connection that has exchanged identification lines.
struct BenchClient {
    reader: BufReader<TcpStream>,
}

impl BenchClient {
    /// Connects, sends the client's line and reads the server's: the span
    /// the latency figure times. Must run inside the client namespace.
    fn connect(address: SocketAddr) -> Result<Self> {
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
    /// the count.
    fn run(mut self, mode: Mode, bytes: u64) -> Result<()> {
        self.reader
            .get_ref()
            .write_all(&packet(mode.tag(), bytes))?;
        let (tag, _) = read_packet(&mut self.reader).context("read the server's packet")?;
        ensure!(tag == SERVER_TAG, "unexpected server packet {tag:#x}");
        match mode {
            Mode::Upload => self.upload(bytes),
            Mode::Download => self.download(bytes),
            Mode::BannerOnly => Ok(()),
        }
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

/// One number of the report.
#[derive(Clone, Copy)]
enum Figure {
    /// Aggregate GB/s of `streams` parallel transfers.
    Throughput { mode: Mode, streams: usize },
    /// Microseconds from connect to the builder's identification line.
    BannerLatency { percentile: usize },
}

impl Figure {
    fn all(options: &Options) -> Vec<Self> {
        let mut stream_counts = vec![1, options.streams];
        stream_counts.dedup();
        let mut figures = Vec::new();
        for mode in [Mode::Upload, Mode::Download] {
            for &streams in &stream_counts {
                figures.push(Self::Throughput { mode, streams });
            }
        }
        figures.extend(PERCENTILES.map(|percentile| Self::BannerLatency { percentile }));
        figures
    }

    fn label(self) -> String {
        match self {
            Self::Throughput { mode, streams } => {
                let plural = if streams == 1 { "" } else { "s" };
                format!("{}, {streams} stream{plural}", mode.name())
            }
            Self::BannerLatency { percentile } => format!("connect to banner, p{percentile}"),
        }
    }

    fn key(self) -> String {
        match self {
            Self::Throughput { mode, streams } => {
                let plural = if streams == 1 { "" } else { "s" };
                format!("{}_{streams}_stream{plural}", mode.name())
            }
            Self::BannerLatency { percentile } => format!("banner_latency_p{percentile}"),
        }
    }

    fn unit(self) -> &'static str {
        match self {
            Self::Throughput { .. } => "GB/s",
            Self::BannerLatency { .. } => "µs",
        }
    }

    fn format(self, value: f64) -> String {
        match self {
            Self::Throughput { .. } => format!("{value:.2}"),
            Self::BannerLatency { .. } => format!("{value:.0}"),
        }
    }
}

/// One contender's figures, in [`Figure::all`] order.
struct Results {
    contender: &'static str,
    values: Vec<Result<f64, String>>,
    notes: Vec<String>,
}

fn measure(contender: Contender, testbed: &Testbed, options: &Options) -> Results {
    let name = contender.name();
    build::progress(&format!("measuring {name}"));
    let figures = Figure::all(options);
    let running = match contender.start(testbed) {
        Ok(running) => running,
        Err(e) => {
            return Results {
                contender: name,
                values: figures
                    .iter()
                    .map(|_| Err("not started".to_owned()))
                    .collect(),
                notes: vec![format!("could not start: {e:#}")],
            };
        }
    };
    let client_ns = testbed.topology.client_ns();
    let targets = &running.targets;
    let mut latencies = None;
    let values = figures
        .into_iter()
        .map(|figure| {
            let value = match figure {
                Figure::Throughput { mode, streams } => {
                    throughput(client_ns, targets, mode, streams, options.bytes)
                        .map_err(|e| format!("{e:#}"))
                }
                Figure::BannerLatency { percentile } => latencies
                    .get_or_insert_with(|| {
                        banner_latencies(client_ns, targets, options.connections)
                            .map_err(|e| format!("{e:#}"))
                    })
                    .as_ref()
                    .map(|samples| percentile_of(samples, percentile).as_secs_f64() * 1e6)
                    .map_err(Clone::clone),
            };
            match &value {
                Ok(v) => build::progress(&format!(
                    "  {}: {} {}",
                    figure.label(),
                    figure.format(*v),
                    figure.unit()
                )),
                Err(e) => build::progress(&format!("  {}: FAILED: {e}", figure.label())),
            }
            value
        })
        .collect();
    let notes = running
        .stop()
        .unwrap_or_else(|e| vec![format!("did not stop cleanly: {e:#}")]);
    Results {
        contender: name,
        values,
        notes,
    }
}

/// Aggregate GB/s of `streams` parallel transfers of `bytes` each, spread
/// over `targets`. Connections and handshakes happen before the clock starts.
fn throughput(
    client_ns: &Netns,
    targets: &[SocketAddr],
    mode: Mode,
    streams: usize,
    bytes: u64,
) -> Result<f64> {
    let clients = client_ns.run(|| {
        (0..streams)
            .map(|i| BenchClient::connect(targets[i % targets.len()]))
            .collect::<Result<Vec<_>>>()
    })??;
    let start = Barrier::new(streams + 1);
    let elapsed = thread::scope(|scope| {
        let transfers: Vec<_> = clients
            .into_iter()
            .map(|client| {
                let start = &start;
                scope.spawn(move || {
                    start.wait();
                    client.run(mode, bytes)
                })
            })
            .collect();
        start.wait();
        let started = Instant::now();
        for transfer in transfers {
            transfer
                .join()
                .map_err(|_| anyhow!("a transfer thread panicked"))??;
        }
        Ok::<_, anyhow::Error>(started.elapsed())
    })?;
    Ok((bytes * streams as u64) as f64 / elapsed.as_secs_f64() / 1e9)
}

/// Connect-to-identification times of `connections` sequential connections,
/// sorted, after [`WARMUP_CONNECTIONS`] unrecorded ones.
fn banner_latencies(
    client_ns: &Netns,
    targets: &[SocketAddr],
    connections: usize,
) -> Result<Vec<Duration>> {
    let mut samples = client_ns.run(|| {
        let mut samples = Vec::with_capacity(connections);
        for i in 0..WARMUP_CONNECTIONS + connections {
            let started = Instant::now();
            let client = BenchClient::connect(targets[i % targets.len()])
                .with_context(|| format!("connection {i}"))?;
            let elapsed = started.elapsed();
            client
                .run(Mode::BannerOnly, 0)
                .with_context(|| format!("connection {i}"))?;
            if i >= WARMUP_CONNECTIONS {
                samples.push(elapsed);
            }
        }
        Ok::<_, anyhow::Error>(samples)
    })??;
    samples.sort();
    Ok(samples)
}

/// Nearest-rank percentile of sorted, non-empty `samples`.
pub(crate) fn percentile_of(samples: &[Duration], percentile: usize) -> Duration {
    let rank = (percentile * samples.len()).div_ceil(100);
    samples[rank.saturating_sub(1)]
}

/// Everything measured, with the conditions it was measured in.
struct Report {
    date: String,
    kernel: String,
    cpus: usize,
    bytes: u64,
    streams: usize,
    connections: usize,
    figures: Vec<Figure>,
    results: Vec<Results>,
    /// Reaction times of the kernel path, in their own table.
    reactions: Reactions,
}

impl Report {
    fn new(options: &Options, results: Vec<Results>, reactions: Reactions) -> Result<Self> {
        Ok(Self {
            date: utc_now()?,
            kernel: fs::read_to_string("/proc/sys/kernel/osrelease")?
                .trim()
                .to_owned(),
            cpus: thread::available_parallelism().map_or(0, usize::from),
            bytes: options.bytes,
            streams: options.streams,
            connections: options.connections,
            figures: Figure::all(options),
            results,
            reactions,
        })
    }

    /// `value / baseline` of figure `index`, when both were measured.
    fn ratio(&self, index: usize, value: &Result<f64, String>) -> Option<f64> {
        let baseline = self.results.first()?.values[index].as_ref().ok()?;
        Some(value.as_ref().ok()? / baseline)
    }

    fn failed_figures(&self) -> usize {
        self.results
            .iter()
            .flat_map(|r| &r.values)
            .filter(|v| v.is_err())
            .count()
            + self.reactions.failed()
    }

    fn markdown(&self) -> String {
        let mut md = format!(
            "# yensid benchmark\n\n{} · kernel {} · {} CPUs · {BUILDERS} builders on veth links · \
             {} bytes per stream, {} parallel streams, {} sequential connections \
             (after {WARMUP_CONNECTIONS} warm-up)\n\n",
            self.date, self.kernel, self.cpus, self.bytes, self.streams, self.connections
        );
        let names: Vec<&str> = self.results.iter().map(|r| r.contender).collect();
        md += &format!("| figure | {} |\n", names.join(" | "));
        md += &format!("|---|{}\n", "---:|".repeat(names.len()));
        for (index, figure) in self.figures.iter().enumerate() {
            let cells: Vec<String> = self
                .results
                .iter()
                .enumerate()
                .map(|(column, results)| self.cell(*figure, index, column, results))
                .collect();
            md += &format!(
                "| {} ({}) | {} |\n",
                figure.label(),
                figure.unit(),
                cells.join(" | ")
            );
        }
        md += &format!(
            "\nIn brackets: the ratio to {} (throughput: higher is better; latency: lower is \
             better). GB = 10^9 bytes. Upload is client to builder. The builders run a bench \
             server that speaks the opening of SSH, so no cipher is measured.\n",
            names.first().unwrap_or(&"the first column")
        );
        let notes: Vec<String> = self
            .results
            .iter()
            .flat_map(|r| {
                self.failures(r)
                    .into_iter()
                    .chain(r.notes.iter().cloned())
                    .map(move |n| format!("- {}: {n}\n", r.contender))
            })
            .collect();
        md += &self.reactions.markdown();
        if !notes.is_empty() {
            md += &format!("\n## Notes\n\n{}", notes.concat());
        }
        md
    }

    /// What went wrong with each figure `results` lacks.
    fn failures(&self, results: &Results) -> Vec<String> {
        self.figures
            .iter()
            .zip(&results.values)
            .filter_map(|(figure, value)| {
                let error = value.as_ref().err()?;
                Some(format!("{} failed: {error}", figure.label()))
            })
            .collect()
    }

    fn cell(&self, figure: Figure, index: usize, column: usize, results: &Results) -> String {
        let value = &results.values[index];
        match (value, self.ratio(index, value)) {
            (Err(_), _) => "failed".to_owned(),
            (Ok(v), Some(ratio)) if column > 0 => format!("{} ({ratio:.2}×)", figure.format(*v)),
            (Ok(v), _) => figure.format(*v),
        }
    }

    fn json(&self) -> Value {
        let contenders: Vec<Value> = self
            .results
            .iter()
            .map(|results| {
                let mut figures = Map::new();
                for (index, figure) in self.figures.iter().enumerate() {
                    let value = &results.values[index];
                    let entry = match value {
                        Ok(v) => json!({
                            "unit": figure.unit(),
                            "value": v,
                            "ratio_to_baseline": self.ratio(index, value),
                        }),
                        Err(e) => json!({ "unit": figure.unit(), "error": e }),
                    };
                    figures.insert(figure.key(), entry);
                }
                json!({
                    "name": results.contender,
                    "figures": figures,
                    "notes": results.notes,
                })
            })
            .collect();
        json!({
            "date": self.date,
            "kernel": self.kernel,
            "cpus": self.cpus,
            "parameters": {
                "bytes_per_stream": self.bytes,
                "parallel_streams": self.streams,
                "sequential_connections": self.connections,
                "warmup_connections": WARMUP_CONNECTIONS,
                "transfer_buffer_bytes": TRANSFER_BUFFER,
                "builders": BUILDERS,
                "baseline": self.results.first().map(|r| r.contender),
            },
            "contenders": contenders,
            "reactions": self.reactions.json(),
        })
    }

    fn write(&self, dir: &Path) -> Result<()> {
        fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let markdown = dir.join("latest.md");
        fs::write(&markdown, self.markdown())?;
        let json = dir.join("latest.json");
        fs::write(&json, serde_json::to_string_pretty(&self.json())? + "\n")?;
        build::progress(&format!(
            "wrote {} and {}",
            markdown.display(),
            json.display()
        ));
        Ok(())
    }
}

fn utc_now() -> Result<String> {
    let out = Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .context("run date")?;
    ensure!(out.status.success(), "date failed");
    Ok(String::from_utf8(out.stdout)?.trim().to_owned())
}
