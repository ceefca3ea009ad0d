//! The measurements themselves, each run from the client namespace against
//! a contender's targets.

use std::fs;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use yensid_tests::Netns;

use super::cpu::CpuTimes;
use super::protocol::{BenchClient, Mode};

/// Connections made before the latency samples, so first-use costs (page
/// faults, cold caches) stay out of the percentiles.
pub const WARMUP_CONNECTIONS: usize = 20;
const GIB: f64 = (1u64 << 30) as f64;
/// A refused client may wait this long for the close; only against hangs.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(5);
/// Time for the middlebox to finish its work on the last idle session
/// before its memory is read.
const IDLE_SETTLE: Duration = Duration::from_millis(500);

/// How many CPUs the machine keeps busy over `duration` while the bench
/// itself waits: other work on the machine, which the CPU figures include.
pub fn background_cpus(duration: Duration) -> Result<f64> {
    let before = CpuTimes::now()?;
    let started = Instant::now();
    thread::sleep(duration);
    let busy = CpuTimes::now()?.seconds_since(before);
    Ok(busy / started.elapsed().as_secs_f64())
}

/// One throughput run.
pub struct Transfer {
    /// Aggregate GB/s (10^9 bytes).
    pub gb_per_second: f64,
    /// CPU seconds of the whole machine per GiB forwarded.
    pub cpu_per_gib: f64,
}

/// `streams` parallel transfers of `bytes` each, spread over `targets`.
/// Connections and handshakes happen before the clock starts, and the CPU
/// time is sampled at the same two instants as the clock.
pub fn transfer(
    client_ns: &Netns,
    targets: &[SocketAddr],
    mode: Mode,
    streams: usize,
    bytes: u64,
) -> Result<Transfer> {
    let clients = client_ns.run(|| {
        (0..streams)
            .map(|i| BenchClient::connect(targets[i % targets.len()]))
            .collect::<Result<Vec<_>>>()
    })??;
    let start = Barrier::new(streams + 1);
    let (elapsed, cpu_seconds) = thread::scope(|scope| {
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
        let cpu_before = CpuTimes::now()?;
        start.wait();
        let started = Instant::now();
        for transfer in transfers {
            transfer
                .join()
                .map_err(|_| anyhow!("a transfer thread panicked"))??;
        }
        let elapsed = started.elapsed();
        let cpu_seconds = CpuTimes::now()?.seconds_since(cpu_before);
        Ok::<_, anyhow::Error>((elapsed, cpu_seconds))
    })?;
    let total = (bytes * streams as u64) as f64;
    Ok(Transfer {
        gb_per_second: total / elapsed.as_secs_f64() / 1e9,
        cpu_per_gib: cpu_seconds / (total / GIB),
    })
}

/// Connect-to-identification times of `connections` sequential connections,
/// sorted, after [`WARMUP_CONNECTIONS`] unrecorded ones.
pub fn banner_latencies(
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

/// How a refused client learns it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refusal {
    /// The connect failed with ECONNREFUSED (an RST answered the SYN).
    AtConnect,
    /// The connect succeeded and the connection was closed (FIN or RST)
    /// before the server's identification line.
    Closed,
}

/// Refusal times of sequential connections to `target`.
pub struct Refusals {
    /// Sorted.
    pub samples: Vec<Duration>,
    pub at_connect: usize,
    pub closed: usize,
}

impl Refusals {
    /// How the clients were refused, in words.
    pub fn describe(&self) -> String {
        let total = self.at_connect + self.closed;
        match (self.at_connect, self.closed) {
            (_, 0) => format!("all {total} refused at connect (ECONNREFUSED)"),
            (0, _) => format!("all {total} accepted, then closed before any byte"),
            (refused, closed) => {
                format!("{refused} of {total} refused at connect, {closed} accepted then closed")
            }
        }
    }
}

/// `connections` sequential attempts (after [`WARMUP_CONNECTIONS`]) at a
/// contender that refuses everything; each is timed from the start of the
/// connect until the client knows: ECONNREFUSED, or, for a proxy that
/// accepts and then closes, the end of the connection. The client sends its
/// identification line at once, as ssh does.
pub fn refusal_latencies(
    client_ns: &Netns,
    target: SocketAddr,
    connections: usize,
) -> Result<Refusals> {
    let outcomes = client_ns.run(|| {
        (0..WARMUP_CONNECTIONS + connections)
            .map(|i| refused(target).with_context(|| format!("connection {i}")))
            .collect::<Result<Vec<_>>>()
    })??;
    let outcomes = &outcomes[WARMUP_CONNECTIONS..];
    let mut samples: Vec<Duration> = outcomes.iter().map(|(elapsed, _)| *elapsed).collect();
    samples.sort();
    let at_connect = outcomes
        .iter()
        .filter(|(_, how)| *how == Refusal::AtConnect)
        .count();
    Ok(Refusals {
        samples,
        at_connect,
        closed: outcomes.len() - at_connect,
    })
}

/// One attempt at a refusing contender: how long until the client knew.
fn refused(target: SocketAddr) -> Result<(Duration, Refusal)> {
    let started = Instant::now();
    let mut stream = match TcpStream::connect_timeout(&target, REFUSAL_TIMEOUT) {
        Ok(stream) => stream,
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            return Ok((started.elapsed(), Refusal::AtConnect));
        }
        Err(e) => return Err(e).with_context(|| format!("connect to {target}")),
    };
    stream.set_read_timeout(Some(REFUSAL_TIMEOUT))?;
    // A write to a connection the proxy already closed may fail; the read
    // below says how it ended either way.
    let _ = stream.write_all(b"SSH-2.0-bench-client\r\n");
    let mut byte = [0u8; 1];
    match stream.read(&mut byte) {
        Ok(0) => Ok((started.elapsed(), Refusal::Closed)),
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
            Ok((started.elapsed(), Refusal::Closed))
        }
        Ok(_) => bail!("the connection was served, not refused"),
        Err(e) => Err(e).context("wait for the refused connection to close"),
    }
}

/// What the concurrent clients of [`connection_rate`] completed.
pub struct Rate {
    pub per_second: f64,
    pub completed: usize,
}

/// Connections per second that `clients` concurrent clients complete in
/// `duration`, each a full connection: connect, the SSH opening, close.
pub fn connection_rate(
    client_ns: &Netns,
    targets: &[SocketAddr],
    clients: usize,
    duration: Duration,
) -> Result<Rate> {
    let completed = AtomicUsize::new(0);
    let failed = AtomicUsize::new(0);
    let first_error = Mutex::new(None);
    let start = Barrier::new(clients + 1);
    let elapsed = client_ns.run(|| {
        // Threads spawned from here are in the client namespace too.
        thread::scope(|scope| {
            for client in 0..clients {
                let (start, completed, failed, first_error) =
                    (&start, &completed, &failed, &first_error);
                scope.spawn(move || {
                    start.wait();
                    let deadline = Instant::now() + duration;
                    let mut next = client;
                    while Instant::now() < deadline {
                        let target = targets[next % targets.len()];
                        next += clients;
                        match BenchClient::connect(target).and_then(|c| c.run(Mode::BannerOnly, 0))
                        {
                            Ok(()) => completed.fetch_add(1, Ordering::Relaxed),
                            Err(e) => {
                                let mut first =
                                    first_error.lock().unwrap_or_else(|e| e.into_inner());
                                first.get_or_insert_with(|| format!("{e:#}"));
                                failed.fetch_add(1, Ordering::Relaxed)
                            }
                        };
                    }
                });
            }
            start.wait();
            let started = Instant::now();
            // The scope joins every client before it returns.
            started
        })
        .elapsed()
    })?;
    let completed = completed.into_inner();
    let failed = failed.into_inner();
    if failed > 0 {
        let first = first_error.into_inner().unwrap_or_else(|e| e.into_inner());
        bail!(
            "{failed} of {} connections failed, the first: {}",
            completed + failed,
            first.unwrap_or_default()
        );
    }
    ensure!(completed > 0, "no connection completed");
    Ok(Rate {
        per_second: completed as f64 / elapsed.as_secs_f64(),
        completed,
    })
}

/// The memory of process `pid` before and with idle sessions open.
pub struct IdleMemory {
    pub before_kib: u64,
    pub with_sessions_kib: u64,
}

/// Opens `connections` sessions through `targets` one after the other, each
/// past the SSH opening (so yensid's kernel path has spliced it) and then
/// idle, reads the resident memory of `pid`, checks that every session is
/// still open, and closes them all.
pub fn idle_memory(
    client_ns: &Netns,
    targets: &[SocketAddr],
    connections: usize,
    pid: u32,
) -> Result<IdleMemory> {
    let before_kib = resident_kib(pid)?;
    let sessions = client_ns.run(|| {
        (0..connections)
            .map(|i| {
                BenchClient::connect(targets[i % targets.len()])
                    .and_then(BenchClient::hold)
                    .with_context(|| format!("session {i}"))
            })
            .collect::<Result<Vec<_>>>()
    })??;
    thread::sleep(IDLE_SETTLE);
    let with_sessions_kib = resident_kib(pid)?;
    let ended = sessions.iter().filter(|s| !is_open(s)).count();
    ensure!(
        ended == 0,
        "{ended} of {connections} sessions had ended when the memory was read"
    );
    Ok(IdleMemory {
        before_kib,
        with_sessions_kib,
    })
}

/// Whether nothing (no byte, no FIN, no RST) has arrived on an idle session.
pub(super) fn is_open(stream: &TcpStream) -> bool {
    let mut pollfd = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: libc::POLLIN | libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd; a zero timeout only looks.
    unsafe { libc::poll(&mut pollfd, 1, 0) == 0 }
}

/// VmRSS of `pid`, in KiB.
fn resident_kib(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    parse_vm_rss(&status).with_context(|| format!("no VmRSS in {path}"))
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut words = line.split_whitespace().skip(1);
    let kib = words.next()?.parse().ok()?;
    (words.next() == Some("kB")).then_some(kib)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_rss_is_read_in_kib() {
        let status = "Name:\tyensid\nVmPeak:\t  900 kB\nVmRSS:\t   12345 kB\nThreads:\t3\n";
        assert_eq!(parse_vm_rss(status), Some(12345));
        assert_eq!(parse_vm_rss("Name:\tkthreadd\n"), None);
        assert_eq!(parse_vm_rss("VmRSS:\t12 MB\n"), None);
    }

    #[test]
    fn refusals_say_how_clients_learnt_it() {
        let refusals = |at_connect, closed| Refusals {
            samples: Vec::new(),
            at_connect,
            closed,
        };
        assert_eq!(
            refusals(5, 0).describe(),
            "all 5 refused at connect (ECONNREFUSED)"
        );
        assert_eq!(
            refusals(0, 5).describe(),
            "all 5 accepted, then closed before any byte"
        );
        assert_eq!(
            refusals(2, 3).describe(),
            "2 of 5 refused at connect, 3 accepted then closed"
        );
    }
}
