//! Makespan of a mixed workload through yensid (issue 14): `least-loaded`
//! against round-robin and least-connections, and the best static
//! assignment computed offline.
//!
//! Each builder runs a job server in its namespace that stands for a machine
//! of `cores` CPUs at `speed`: a job of `w` seconds of work (at speed 1)
//! shares the machine with every other job on it, each progressing at
//! `speed * min(1, cores / jobs)` (processor sharing). Jobs are real
//! connections through yensid (the SSH handoff, then spliced), each asking
//! for its work in the packet standing in for KEXINIT and held until the
//! server says it is done. Outside load is jobs that connect to one builder
//! directly, not through yensid, and run for the whole measurement: they
//! take their share of the machine and show in its
//! `node_netstat_Tcp_CurrEstab`, which the real node_exporter in the
//! builder's namespace exports and `least-loaded` reads.
//!
//! Every policy gets the same workload, submitted at once; the makespan is
//! from the first connect to the last job's end. The best static assignment
//! is the exhaustive minimum of the same processor-sharing model over every
//! assignment of jobs to builders, given the job sizes and the outside load
//! (which no policy knows).

use std::fmt::Write as _;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use yensid_tests::node_exporter::{EXPORTER_PORT, NodeExporter, insert_after};
use yensid_tests::wait::wait_until;
use yensid_tests::{Daemon, DaemonConfig, Dataplane, Strategy, Topology, service};

/// The job servers' port (sshd keeps 22).
const JOB_PORT: u16 = 2323;
/// Work of each job, in milliseconds at speed 1.
const JOBS_MS: [u64; 16] = [
    3000, 3000, 2400, 2400, 2000, 2000, 1600, 1600, 1200, 1200, 1000, 1000, 800, 800, 600, 600,
];
/// (speed, cores) of b1 and b2; the weight given to every policy is their
/// product, the machine's capacity.
const MACHINES: [(f64, u32); 2] = [(2.0, 2), (1.0, 2)];
/// Jobs of outside load on b1 for the whole measurement.
const OUTSIDE_ON_B1: usize = 6;
const TRIALS: usize = 3;
/// How often a job server advances its jobs.
const TICK: Duration = Duration::from_millis(5);
const SERVER_LINE: &[u8] = b"SSH-2.0-makespan-job-server\r\n";
const CLIENT_LINE: &[u8] = b"SSH-2.0-makespan-client\r\n";
const PACKET_BODY: usize = 28;
const JOB: u8 = b'J';
/// A job with no end, held until the client closes: outside load.
const HOLD: u8 = b'O';
const DONE: u8 = b'D';
/// Only against hangs.
const TIMEOUT: Duration = Duration::from_secs(120);

/// Makespans in seconds per policy, over the trials.
pub struct Makespan {
    pub policies: Vec<(Strategy, Vec<f64>)>,
    pub best_static: f64,
    pub best_static_split: [usize; 2],
}

pub fn measure(yensid: &Path) -> Result<Makespan> {
    let topology = Topology::new(2)?;
    let servers: Vec<JobServer> = topology
        .builders()
        .iter()
        .zip(MACHINES)
        .map(|(b, (speed, cores))| JobServer::start(b, speed, cores))
        .collect::<Result<_>>()?;
    let exporters: Vec<NodeExporter> = topology
        .builders()
        .iter()
        .map(|b| NodeExporter::start(b.ns(), SocketAddr::from((b.address(), EXPORTER_PORT)), None))
        .collect::<Result<_>>()?;
    // The outside load on b1: direct connections, for the whole measurement.
    let outside: Vec<TcpStream> = (0..OUTSIDE_ON_B1)
        .map(|_| topology.client_ns().run(|| hold(servers[0].address))?)
        .collect::<Result<_>>()?;
    wait_until("the outside jobs to run on b1", TIMEOUT, || {
        Ok(servers[0].running() == OUTSIDE_ON_B1)
    })?;

    let mut policies = Vec::new();
    for strategy in [
        Strategy::LeastLoaded,
        Strategy::LeastConnections,
        Strategy::RoundRobin,
    ] {
        let mut config = DaemonConfig::for_topology(&topology, Dataplane::Kernel, strategy);
        for (b, (speed, cores)) in topology.builders().iter().zip(MACHINES) {
            let builder = config.builder_mut(b.name());
            builder.address = SocketAddr::from((b.address(), JOB_PORT));
            builder.host_key = None;
            builder.weight = Some((speed * cores as f64).round() as u32);
        }
        let urls: Vec<(String, String)> = topology
            .builders()
            .iter()
            .zip(&exporters)
            .map(|(b, e)| (b.name().to_owned(), e.url()))
            .collect();
        let daemon = Daemon::start_binary_with_file(yensid, topology.client_ns(), &|paths| {
            let mut toml = config.render(paths);
            for (name, url) in &urls {
                toml = insert_after(
                    &toml,
                    &format!("[builders.{name}]"),
                    &format!("metrics_url = \"{url}\""),
                )?;
            }
            Ok(toml + "\n[load]\nscrape_interval = \"500ms\"\nscrape_timeout = \"400ms\"\n")
        })?;
        daemon.wait_for_status("b1's outside load to be measured", TIMEOUT, |s| {
            let b1 = s
                .json()
                .pointer("/builders/0/load/load/tcp_established")
                .and_then(serde_json::Value::as_f64);
            Ok(b1.is_some_and(|e| e >= OUTSIDE_ON_B1 as f64))
        })?;
        let mut spans = Vec::new();
        for _ in 0..TRIALS {
            spans.push(run_workload(&topology, &servers)?);
        }
        crate::build::progress(&format!(
            "makespan with {}: {spans:.2?} s",
            strategy.as_str()
        ));
        policies.push((strategy, spans));
        drop(daemon);
    }
    drop(outside);
    let (best_static, best_static_split) = best_static();
    Ok(Makespan {
        policies,
        best_static,
        best_static_split,
    })
}

/// Submits every job at once through the service; the time until the last
/// one is done.
fn run_workload(topology: &Topology, servers: &[JobServer]) -> Result<f64> {
    wait_until(
        "the job servers to be idle but for the outside load",
        TIMEOUT,
        || Ok(servers[0].running() == OUTSIDE_ON_B1 && servers[1].running() == 0),
    )?;
    let started = Instant::now();
    let jobs: Vec<JoinHandle<Result<()>>> = JOBS_MS
        .iter()
        .map(|&ms| {
            let ns = topology.client_ns().name().to_owned();
            let stream = topology
                .client_ns()
                .run(|| TcpStream::connect_timeout(&service(), Duration::from_secs(10)));
            thread::spawn(move || {
                let stream =
                    stream?.with_context(|| format!("connect to the service from {ns}"))?;
                job(stream, ms)
            })
        })
        .collect();
    for j in jobs {
        j.join()
            .map_err(|_| anyhow::anyhow!("a job thread panicked"))??;
    }
    Ok(started.elapsed().as_secs_f64())
}

/// One job over an open connection: handshake, the work asked, the wait.
fn job(stream: TcpStream, ms: u64) -> Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    (&stream).write_all(CLIENT_LINE)?;
    let mut reader = BufReader::new(stream);
    read_line(&mut reader)?;
    reader.get_ref().write_all(&packet(JOB, ms * 1000))?;
    let (tag, _) = read_packet(&mut reader)?;
    ensure!(tag == b'S', "unexpected server packet {tag:#x}");
    let mut done = [0u8; 1];
    reader
        .read_exact(&mut done)
        .context("wait for the job's end")?;
    ensure!(done[0] == DONE, "unexpected answer {:#x}", done[0]);
    Ok(())
}

/// An outside job on `address`: held until the stream is dropped.
fn hold(address: SocketAddr) -> Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&address, Duration::from_secs(10))?;
    (&stream).write_all(CLIENT_LINE)?;
    let mut reader = BufReader::new(stream);
    read_line(&mut reader)?;
    reader.get_ref().write_all(&packet(HOLD, 0))?;
    read_packet(&mut reader)?;
    Ok(reader.into_inner())
}

/// Raised when a job is done.
type DoneFlag = Arc<(Mutex<bool>, Condvar)>;

/// Remaining work (microseconds at speed 1) of every running job, `None`
/// for an outside job, and the flag raised when it is done.
struct Machine {
    speed: f64,
    cores: u32,
    jobs: Vec<(Option<f64>, DoneFlag)>,
}

impl Machine {
    fn advance(&mut self, elapsed: Duration) {
        let n = self.jobs.len() as f64;
        if n == 0.0 {
            return;
        }
        let rate = self.speed * (self.cores as f64 / n).min(1.0);
        let progress = elapsed.as_secs_f64() * 1e6 * rate;
        self.jobs.retain(|(left, done)| match left {
            Some(left) if *left <= progress => {
                *done.0.lock().unwrap_or_else(|e| e.into_inner()) = true;
                done.1.notify_all();
                false
            }
            _ => true,
        });
        for (left, _) in &mut self.jobs {
            if let Some(left) = left {
                *left -= progress;
            }
        }
    }
}

/// A job server in one builder's namespace; stopped on drop.
struct JobServer {
    address: SocketAddr,
    machine: Arc<Mutex<Machine>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl JobServer {
    fn start(builder: &yensid_tests::Builder, speed: f64, cores: u32) -> Result<Self> {
        let address = SocketAddr::from((builder.address(), JOB_PORT));
        let listener = builder
            .ns()
            .run(|| TcpListener::bind(address))?
            .with_context(|| format!("bind the job server on {address}"))?;
        listener.set_nonblocking(true)?;
        let machine = Arc::new(Mutex::new(Machine {
            speed,
            cores,
            jobs: Vec::new(),
        }));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let clock = {
            let (machine, stop) = (machine.clone(), stop.clone());
            thread::spawn(move || {
                let mut last = Instant::now();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    thread::sleep(TICK);
                    let now = Instant::now();
                    lock(&machine).advance(now - last);
                    last = now;
                }
            })
        };
        let acceptor = {
            let (machine, stop) = (machine.clone(), stop.clone());
            thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            let machine = machine.clone();
                            // Health probes and scrapes of the wrong port
                            // end in an error: nothing to report.
                            thread::spawn(move || drop(serve(stream, &machine)));
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            thread::sleep(Duration::from_millis(5))
                        }
                        Err(_) => thread::sleep(Duration::from_millis(50)),
                    }
                }
            })
        };
        Ok(Self {
            address,
            machine,
            stop,
            threads: vec![clock, acceptor],
        })
    }

    /// Jobs on the machine now, outside ones included.
    fn running(&self) -> usize {
        lock(&self.machine).jobs.len()
    }
}

impl Drop for JobServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn lock(m: &Mutex<Machine>) -> std::sync::MutexGuard<'_, Machine> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn serve(stream: TcpStream, machine: &Mutex<Machine>) -> Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    (&stream).write_all(SERVER_LINE)?;
    let mut reader = BufReader::new(stream);
    read_line(&mut reader)?;
    reader.get_ref().write_all(&packet(b'S', 0))?;
    let (tag, work_us) = read_packet(&mut reader)?;
    let done: DoneFlag = Arc::new((Mutex::new(false), Condvar::new()));
    let work = match tag {
        JOB => Some(work_us as f64),
        HOLD => None,
        _ => bail!("unknown request {tag:#x}"),
    };
    lock(machine).jobs.push((work, done.clone()));
    if work.is_none() {
        // Outside load: until the client hangs up.
        reader.get_ref().set_read_timeout(None)?;
        let _ = reader.read(&mut [0u8; 1]);
        lock(machine).jobs.retain(|(_, d)| !Arc::ptr_eq(d, &done));
        return Ok(());
    }
    let (flag, signal) = &*done;
    let mut finished = flag.lock().unwrap_or_else(|e| e.into_inner());
    while !*finished {
        finished = signal.wait(finished).unwrap_or_else(|e| e.into_inner());
    }
    drop(finished);
    reader.get_ref().write_all(&[DONE])?;
    let _ = reader.read(&mut [0u8; 1]);
    Ok(())
}

fn read_line(reader: &mut BufReader<TcpStream>) -> Result<Vec<u8>> {
    let mut line = Vec::new();
    reader.by_ref().take(255).read_until(b'\n', &mut line)?;
    ensure!(
        line.starts_with(b"SSH-") && line.ends_with(b"\n"),
        "not an SSH line"
    );
    Ok(line)
}

fn packet(tag: u8, count: u64) -> [u8; 4 + PACKET_BODY] {
    let mut packet = [0u8; 4 + PACKET_BODY];
    packet[..4].copy_from_slice(&(PACKET_BODY as u32).to_be_bytes());
    packet[4] = tag;
    packet[5..13].copy_from_slice(&count.to_be_bytes());
    packet
}

fn read_packet(reader: &mut impl Read) -> Result<(u8, u64)> {
    let mut packet = [0u8; 4 + PACKET_BODY];
    reader.read_exact(&mut packet)?;
    ensure!(
        u32::from_be_bytes(packet[..4].try_into()?) as usize == PACKET_BODY,
        "bad packet length"
    );
    Ok((packet[4], u64::from_be_bytes(packet[5..13].try_into()?)))
}

/// Seconds until the last of `works_ms` ends on a machine of `speed` and
/// `cores` that also runs `outside` endless jobs, all starting at once
/// (processor sharing: jobs end in order of their work).
fn machine_makespan(works_ms: &[u64], speed: f64, cores: u32, outside: usize) -> f64 {
    let mut works: Vec<f64> = works_ms.iter().map(|&w| w as f64 / 1e3).collect();
    works.sort_by(f64::total_cmp);
    let (mut time, mut done) = (0.0, 0.0);
    for (i, w) in works.iter().enumerate() {
        let n = (works.len() - i + outside) as f64;
        let rate = speed * (cores as f64 / n).min(1.0);
        time += (w - done) / rate;
        done = *w;
    }
    time
}

/// The best makespan over every assignment of [`JOBS_MS`] to the two
/// builders, and how many jobs each gets in it.
fn best_static() -> (f64, [usize; 2]) {
    let n = JOBS_MS.len();
    let mut best = (f64::INFINITY, [0, 0]);
    for mask in 0u32..(1 << n) {
        let (mut on_b1, mut on_b2) = (Vec::new(), Vec::new());
        for (i, &w) in JOBS_MS.iter().enumerate() {
            if mask & (1 << i) != 0 {
                on_b1.push(w);
            } else {
                on_b2.push(w);
            }
        }
        let span = machine_makespan(&on_b1, MACHINES[0].0, MACHINES[0].1, OUTSIDE_ON_B1)
            .max(machine_makespan(&on_b2, MACHINES[1].0, MACHINES[1].1, 0));
        if span < best.0 {
            best = (span, [on_b1.len(), on_b2.len()]);
        }
    }
    best
}

impl Makespan {
    fn median(spans: &[f64]) -> f64 {
        let mut s = spans.to_vec();
        s.sort_by(f64::total_cmp);
        s[s.len() / 2]
    }

    pub fn markdown(&self) -> String {
        let mut md = String::from("# Makespan of a mixed workload (issue 14)\n\n");
        let _ = writeln!(
            md,
            "{} jobs ({} s of work at speed 1, from {} to {} s each) submitted at once through yensid \
             to b1 (speed {}, {} cores, weight {}) and b2 (speed {}, {} cores, weight {}); {} endless \
             outside jobs on b1 that only least-loaded sees (node_exporter's node_netstat_Tcp_CurrEstab). \
             Median of {TRIALS} trials; the best static assignment is computed offline from the same \
             processor-sharing model with the job sizes and the outside load known.\n",
            JOBS_MS.len(),
            JOBS_MS.iter().sum::<u64>() as f64 / 1e3,
            *JOBS_MS.iter().min().unwrap_or(&0) as f64 / 1e3,
            *JOBS_MS.iter().max().unwrap_or(&0) as f64 / 1e3,
            MACHINES[0].0,
            MACHINES[0].1,
            MACHINES[0].0 * MACHINES[0].1 as f64,
            MACHINES[1].0,
            MACHINES[1].1,
            MACHINES[1].0 * MACHINES[1].1 as f64,
            OUTSIDE_ON_B1,
        );
        let _ = writeln!(
            md,
            "| policy | makespan (s) | trials (s) | ratio to best static |"
        );
        let _ = writeln!(md, "|---|---:|---:|---:|");
        for (strategy, spans) in &self.policies {
            let m = Self::median(spans);
            let trials: Vec<String> = spans.iter().map(|s| format!("{s:.2}")).collect();
            let _ = writeln!(
                md,
                "| {} | {m:.2} | {} | {:.2}× |",
                strategy.as_str(),
                trials.join(", "),
                m / self.best_static
            );
        }
        let _ = writeln!(
            md,
            "| best static assignment (offline: {} jobs on b1, {} on b2) | {:.2} | - | 1.00× |\n",
            self.best_static_split[0], self.best_static_split[1], self.best_static
        );
        let span = |s: Strategy| {
            self.policies
                .iter()
                .find(|(p, _)| *p == s)
                .map(|(_, spans)| Self::median(spans))
        };
        if let (Some(ll), Some(lc)) = (
            span(Strategy::LeastLoaded),
            span(Strategy::LeastConnections),
        ) {
            let within = ll / self.best_static;
            let _ = writeln!(
                md,
                "Targets: least-loaded within 1.15× of the best static assignment: {} ({within:.2}×); \
                 better than least-connections with outside load: {} ({ll:.2} s against {lc:.2} s).",
                if within <= 1.15 { "met" } else { "missed" },
                if ll < lc { "met" } else { "missed" },
            );
        }
        md
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn processor_sharing_makespans() {
        // Two jobs of 1 s on one core at speed 1: both share it, end at 2 s.
        assert_eq!(machine_makespan(&[1000, 1000], 1.0, 1, 0), 2.0);
        // Enough cores: each job runs at full speed.
        assert_eq!(machine_makespan(&[1000, 2000], 2.0, 2, 0), 1.0);
        // An outside job halves a single core.
        assert_eq!(machine_makespan(&[1000], 1.0, 1, 1), 2.0);
        // 1 s and 3 s on one core: 2 s until the first ends, then 2 s more.
        assert_eq!(machine_makespan(&[1000, 3000], 1.0, 1, 0), 4.0);
    }

    #[test]
    fn the_best_static_assignment_is_no_worse_than_any_split() {
        let (best, split) = best_static();
        assert_eq!(split[0] + split[1], JOBS_MS.len());
        let everything_on_b2 = machine_makespan(&JOBS_MS, MACHINES[1].0, MACHINES[1].1, 0);
        assert!(best < everything_on_b2, "{best} {everything_on_b2}");
    }
}
