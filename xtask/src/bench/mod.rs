//! `cargo xtask bench`: a direct connection, HAProxy, the yensid kernel path
//! and the yensid userspace path, measured side by side in one run on one
//! topology (issue 6).
//!
//! Every contender forwards to the same two builders, which run the bench
//! server of `protocol.rs`. For each contender, in this order: throughput
//! and CPU per GiB (`measure::transfer`), connect-to-banner latency, the
//! connection rate of concurrent clients, the middlebox's memory with idle
//! sessions open, and the time a refused client takes to know it. Between
//! measurements the bench waits until the builders have no connection left,
//! so one measurement's closing connections do not slow the next.
//!
//! In the same run, on the same topology, `reaction.rs` measures how fast the
//! kernel path starts refusing after a link event or `yensid mode local`.
//!
//! Results go to `bench/results/latest.{md,json,png}`; targets are judged
//! (`target.rs`) and reported, never turned into a failure. A figure that
//! could not be measured is a failure, after everything else was measured
//! and written.

mod chart;
mod contender;
mod cpu;
mod figure;
mod haproxy;
mod makespan;
mod measure;
mod nix;
mod protocol;
mod reaction;
mod report;
mod target;
mod uploads;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use yensid_tests::Topology;
use yensid_tests::wait::wait_until;

use crate::build;
use contender::{CONTENDERS, Contender, Upstream};
use figure::{Figure, PERCENTILES, Value, percentile_micros};
use protocol::BenchServer;
use report::{Report, Results};

/// Two builders, so the middleboxes really spread connections over a pool.
pub const BUILDERS: usize = 2;
/// Longest wait for the builders' connections of a measurement to close.
const QUIET_TIMEOUT: Duration = Duration::from_secs(120);
/// Descriptors per idle session, in the bench process (client and server
/// end) and in a middlebox (its two sockets).
const FDS_PER_SESSION: u64 = 2;
/// Descriptors a process needs besides its sessions: listeners, BPF
/// objects, namespace handles, logs, HAProxy's pipes.
const FD_RESERVE: u64 = 1_000;
const MIB: f64 = 1024.0;
/// How long the machine's own load is sampled before the transfers.
const BACKGROUND_SAMPLE: Duration = Duration::from_secs(1);
/// Connections a middlebox must hold for the Nix builds: a few per build.
const NIX_SESSIONS: usize = 100;

#[derive(clap::Args)]
pub struct Options {
    /// Bytes per stream in the throughput figures.
    #[arg(long, default_value_t = 1 << 30)]
    bytes: u64,
    /// Parallel streams in the multi-stream throughput figures.
    #[arg(long, default_value_t = 8)]
    streams: usize,
    /// Sequential connections for each latency figure (banner, refusal).
    #[arg(long, default_value_t = 2000)]
    connections: usize,
    /// Concurrent clients for the connection rate.
    #[arg(long, default_value_t = 64)]
    rate_clients: usize,
    /// How long the connection-rate clients run, in seconds.
    #[arg(long, default_value_t = 5)]
    rate_seconds: u64,
    /// Idle connections held open for the memory figure.
    #[arg(long, default_value_t = 10_000)]
    idle_connections: usize,
    /// Uncached derivations built through each contender by one `nix-build`.
    #[arg(long, default_value_t = 20)]
    nix_builds: usize,
    /// Trials per reaction-time series (link down, `yensid mode local`).
    #[arg(long, default_value_t = 50)]
    reaction_trials: usize,
    /// Only these contenders (direct, haproxy, kernel, userspace); default:
    /// all. Targets that need a missing one are reported as unknown.
    #[arg(long = "contender", value_parser = parse_contender)]
    contenders: Vec<Contender>,
    /// Bytes of fresh input per derivation in the upload-parallelism runs.
    #[arg(long, default_value_t = 100 << 20)]
    upload_bytes: u64,
    /// Measure only the upload parallelism (one machine entry against four
    /// aliases) and write uploads.md and uploads.json.
    #[arg(long)]
    only_uploads: bool,
    /// Measure only the makespan of a mixed workload (least-loaded against
    /// round-robin, least-connections and the best static assignment) and
    /// write makespan.md.
    #[arg(long)]
    only_makespan: bool,
    /// Where latest.md, latest.json and latest.png go (relative to the
    /// workspace root).
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
}

fn parse_contender(key: &str) -> Result<Contender, String> {
    CONTENDERS
        .into_iter()
        .find(|c| c.key() == key)
        .ok_or_else(|| {
            let keys: Vec<&str> = CONTENDERS.iter().map(|c| c.key()).collect();
            format!("one of {}", keys.join(", "))
        })
}

pub fn run(options: &Options) -> Result<()> {
    let started = Instant::now();
    ensure!(
        build::is_root(),
        "the bench needs root: it creates network namespaces and loads BPF programs"
    );
    ensure!(
        [
            options.bytes,
            options.streams as u64,
            options.connections as u64,
            options.rate_clients as u64,
            options.rate_seconds,
            options.idle_connections as u64,
            options.nix_builds as u64,
            options.upload_bytes,
            options.reaction_trials as u64,
        ]
        .iter()
        .all(|&n| n > 0),
        "every size and count must be positive"
    );
    build::all(true)?;
    // The builders' sshd, and Nix on both sides for the Nix builds.
    let for_nix = [
        ("/usr/sbin/sshd", "openssh-server"),
        (yensid_tests::nix::NIX_BUILD, "nix-bin"),
    ];
    let dir = build::workspace_root().join(&options.out);
    if options.only_uploads {
        build::ensure_packages(&for_nix)?;
        return measure_uploads(options, &dir);
    }
    if options.only_makespan {
        return measure_makespan(&dir);
    }
    build::ensure_packages(&[
        (haproxy::HAPROXY, "haproxy"),
        (chart::FONT, "fonts-dejavu-core"),
        for_nix[0],
        for_nix[1],
    ])?;
    let fd_limit = raise_fd_limit(options.idle_connections as u64 * FDS_PER_SESSION + FD_RESERVE)?;
    let idle = IdleCount::new(options.idle_connections, fd_limit);
    let contenders: Vec<Contender> = CONTENDERS
        .into_iter()
        .filter(|c| options.contenders.is_empty() || options.contenders.contains(c))
        .collect();
    let figures = Figure::all(options.streams);
    let testbed = Testbed::new(build::yensid_binary(true))?;
    let results: Vec<Results> = contenders
        .iter()
        .map(|&contender| measure(contender, &testbed, options, &figures, idle))
        .collect();
    let reactions = reaction::measure(&testbed.yensid, &testbed.topology, options.reaction_trials);
    drop(testbed);
    let report = Report::new(
        options,
        idle,
        figures,
        results,
        reactions,
        started.elapsed(),
    )?;
    println!("\n{}", report.markdown());
    report.write(&dir)?;
    let chart = dir.join("latest.png");
    chart::draw(&report, &chart)?;
    build::progress(&format!(
        "wrote latest.md, latest.json and latest.png in {}",
        dir.display()
    ));
    measure_uploads(options, &dir)?;
    measure_makespan(&dir)?;
    let failed = report.failed_figures();
    ensure!(
        failed == 0,
        "{failed} figures could not be measured; see the notes"
    );
    Ok(())
}

/// The upload-parallelism runs (see `uploads`), printed and written to
/// `uploads.md` and `uploads.json` in `dir`.
fn measure_uploads(options: &Options, dir: &std::path::Path) -> Result<()> {
    build::progress("measuring upload parallelism through one entry and four aliases");
    let uploads = uploads::measure(&build::yensid_binary(true), options.upload_bytes)?;
    let md = uploads.markdown();
    println!("\n{md}");
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("uploads.md"), md)?;
    std::fs::write(
        dir.join("uploads.json"),
        serde_json::to_string_pretty(&uploads.json())?,
    )?;
    build::progress(&format!(
        "wrote uploads.md and uploads.json in {}",
        dir.display()
    ));
    Ok(())
}

/// The makespan runs (see `makespan`), printed and written to
/// `makespan.md` in `dir`.
fn measure_makespan(dir: &std::path::Path) -> Result<()> {
    build::ensure_packages(&[(
        yensid_tests::node_exporter::NODE_EXPORTER,
        "prometheus-node-exporter",
    )])?;
    build::progress("measuring the makespan of a mixed workload");
    let md = makespan::measure(&build::yensid_binary(true))?.markdown();
    println!("\n{md}");
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("makespan.md"), md)?;
    build::progress(&format!("wrote makespan.md in {}", dir.display()));
    Ok(())
}

/// Raises this process's descriptor limit (which the middleboxes inherit) to
/// `wanted` if it can, else as far as the hard limit: ten thousand idle
/// sessions are twenty thousand sockets here and as many in the middlebox.
/// Raising the hard limit needs CAP_SYS_RESOURCE, which root in a container
/// may lack. Returns the limit in force.
fn raise_fd_limit(wanted: u64) -> Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getrlimit(RLIMIT_NOFILE)");
    }
    if limit.rlim_cur >= wanted {
        return Ok(limit.rlim_cur);
    }
    let raised = libc::rlimit {
        rlim_cur: wanted,
        rlim_max: limit.rlim_max.max(wanted),
    };
    // SAFETY: setrlimit reads a struct we own.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
        return Ok(wanted);
    }
    limit.rlim_cur = limit.rlim_max;
    // SAFETY: as above; up to the hard limit needs no privilege.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("raise RLIMIT_NOFILE to {}", limit.rlim_max));
    }
    Ok(limit.rlim_cur)
}

/// How many idle sessions the memory figure holds: as many as asked, or as
/// many as the descriptor limit allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdleCount {
    pub requested: usize,
    pub held: usize,
    /// The descriptor limit, when it is what cut the count.
    pub fd_limit: Option<u64>,
}

impl IdleCount {
    fn new(requested: usize, fd_limit: u64) -> Self {
        let fitting = (fd_limit.saturating_sub(FD_RESERVE) / FDS_PER_SESSION) as usize;
        Self {
            requested,
            held: requested.min(fitting),
            fd_limit: (fitting < requested).then_some(fd_limit),
        }
    }

    /// RSS with [`Self::requested`] sessions, in KiB, projected along the
    /// line through the RSS before any session and with [`Self::held`].
    fn project(self, before_kib: u64, with_held_kib: u64) -> f64 {
        let per_session = (with_held_kib as f64 - before_kib as f64) / self.held as f64;
        before_kib as f64 + per_session * self.requested as f64
    }
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
        // Builders with Nix stores of their own, for the Nix builds figure.
        let topology = Topology::with_stores(BUILDERS)?;
        // Tens of thousands of short connections within a minute leave as
        // many TIME_WAIT sockets in the client namespace (the middleboxes'
        // own connections to the builders start there too): reuse them and
        // widen the port range, in this namespace only.
        build::run(
            topology
                .client_ns()
                .command("sysctl")
                .args(["-q", "-w", "net.ipv4.tcp_tw_reuse=1"])
                .arg("net.ipv4.ip_local_port_range=10000 65535"),
        )?;
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

    /// The builders' sshd, as a contender's upstreams.
    fn sshd_upstreams(&self) -> Vec<Upstream> {
        self.topology
            .builders()
            .iter()
            .map(|b| Upstream {
                builder: b.name().to_owned(),
                address: b.ssh_addr(),
            })
            .collect()
    }

    /// The bench servers, as a contender's upstreams.
    fn upstreams(&self) -> Vec<Upstream> {
        self.servers
            .iter()
            .map(|s| Upstream {
                builder: s.builder.clone(),
                address: s.address,
            })
            .collect()
    }

    /// Waits until no connection is open on any builder.
    fn wait_quiet(&self) -> Result<()> {
        wait_until("the builders' connections to close", QUIET_TIMEOUT, || {
            Ok(self.servers.iter().all(|s| s.open_connections() == 0))
        })
    }
}

/// One contender's figures; a figure that fails is recorded as failed and
/// the others are still measured.
fn measure(
    contender: Contender,
    testbed: &Testbed,
    options: &Options,
    figures: &[Figure],
    idle: IdleCount,
) -> Results {
    let name = contender.name();
    build::progress(&format!("measuring {name}"));
    let mut sheet = Sheet {
        figures,
        values: vec![Value::Failed("not measured".to_owned()); figures.len()],
    };
    let mut notes = Vec::new();
    let mut idle_rss_projected = None;
    let started = contender.start(
        &testbed.topology,
        &testbed.yensid,
        &testbed.upstreams(),
        idle.held,
    );
    let mut running = match started {
        Ok(running) => running,
        Err(e) => {
            return Results {
                contender,
                values: vec![Value::Failed("not started".to_owned()); figures.len()],
                idle_rss_projected,
                notes: vec![format!("could not start: {e:#}")],
            };
        }
    };
    let client_ns = testbed.topology.client_ns();
    let targets = running.targets.clone();
    match measure::background_cpus(BACKGROUND_SAMPLE) {
        Ok(cpus) => notes.push(format!(
            "the machine was busy at {cpus:.2} CPUs with the bench idle, just before the transfers"
        )),
        Err(e) => notes.push(format!("no background CPU sample: {e:#}")),
    }
    let quiet = |notes: &mut Vec<String>| {
        if let Err(e) = testbed.wait_quiet() {
            notes.push(format!("{e:#}"));
        }
    };

    for figure in figures {
        let Figure::Throughput { mode, streams } = *figure else {
            continue;
        };
        let cpu = Figure::CpuPerGib { mode, streams };
        match measure::transfer(client_ns, &targets, mode, streams, options.bytes) {
            Ok(t) => {
                sheet.put(*figure, Value::Measured(t.gb_per_second));
                sheet.put(cpu, Value::Measured(t.cpu_per_gib));
            }
            Err(e) => {
                sheet.put(*figure, Value::Failed(format!("{e:#}")));
                sheet.put(cpu, Value::Failed(format!("{e:#}")));
            }
        }
        quiet(&mut notes);
    }

    let banner = measure::banner_latencies(client_ns, &targets, options.connections);
    for percentile in PERCENTILES {
        let value = banner
            .as_ref()
            .map(|samples| percentile_micros(samples, percentile))
            .map_err(|e| format!("{e:#}"));
        sheet.put(
            Figure::BannerLatency { percentile },
            Value::from_result(value),
        );
    }
    quiet(&mut notes);

    let rate = measure::connection_rate(
        client_ns,
        &targets,
        options.rate_clients,
        Duration::from_secs(options.rate_seconds),
    );
    sheet.put(
        Figure::ConnectionRate,
        Value::from_result(rate.map_err(|e| format!("{e:#}"))),
    );
    quiet(&mut notes);

    let rss = match running.pid() {
        None => Value::NotApplicable,
        Some(pid) => match measure::idle_memory(client_ns, &targets, idle.held, pid) {
            Ok(memory) => {
                let (before, with) = (memory.before_kib, memory.with_sessions_kib);
                let mut note = format!(
                    "RSS {:.1} MiB before the idle connections, {:.1} MiB with {}: {:.1} KiB \
                         per connection",
                    before as f64 / MIB,
                    with as f64 / MIB,
                    idle.held,
                    (with as f64 - before as f64) / idle.held as f64
                );
                if idle.held < idle.requested {
                    let projected = idle.project(before, with) / MIB;
                    note += &format!("; projected to {}: {projected:.1} MiB", idle.requested);
                    idle_rss_projected = Some(projected);
                }
                notes.push(note);
                Value::Measured(with as f64 / MIB)
            }
            Err(e) => Value::Failed(format!("{e:#}")),
        },
    };
    sheet.put(Figure::IdleRss, rss);
    quiet(&mut notes);

    let refusals = running.refuse().map(|target| {
        target.and_then(|target| {
            measure::refusal_latencies(client_ns, target, options.connections)
                .with_context(|| format!("refusals at {target}"))
        })
    });
    for percentile in PERCENTILES {
        let value = match &refusals {
            None => Value::NotApplicable,
            Some(Ok(refusals)) => Value::Measured(percentile_micros(&refusals.samples, percentile)),
            Some(Err(e)) => Value::Failed(format!("{e:#}")),
        };
        sheet.put(Figure::RefusalLatency { percentile }, value);
    }
    if let Some(Ok(refusals)) = &refusals {
        notes.push(format!("refusals: {}", refusals.describe()));
    }

    match running.stop() {
        Ok(stopped) => notes.extend(stopped),
        Err(e) => notes.push(format!("did not stop cleanly: {e:#}")),
    }

    let builds = nix_builds(contender, testbed, options.nix_builds, &mut notes);
    sheet.put(
        Figure::NixBuilds,
        Value::from_result(builds.map_err(|e| format!("{e:#}"))),
    );
    Results {
        contender,
        values: sheet.values,
        idle_rss_projected,
        notes,
    }
}

/// Seconds of one `nix-build` of `count` uncached derivations through a
/// fresh instance of `contender` in front of the builders' sshd.
fn nix_builds(
    contender: Contender,
    testbed: &Testbed,
    count: usize,
    notes: &mut Vec<String>,
) -> Result<f64> {
    let running = contender.start(
        &testbed.topology,
        &testbed.yensid,
        &testbed.sshd_upstreams(),
        NIX_SESSIONS,
    )?;
    let builds = nix::builds(&testbed.topology, &running.targets, count);
    let stopped = running.stop();
    let builds = builds?;
    let spread: Vec<String> = builds
        .sites
        .iter()
        .map(|(builder, n)| format!("{n} on {builder}"))
        .collect();
    notes.push(format!("Nix builds: {}", spread.join(", ")));
    notes.extend(stopped?.into_iter().map(|n| format!("Nix builds: {n}")));
    Ok(builds.seconds)
}

/// One contender's values as they are measured, printed as they come.
struct Sheet<'a> {
    figures: &'a [Figure],
    values: Vec<Value>,
}

impl Sheet<'_> {
    fn put(&mut self, figure: Figure, value: Value) {
        let shown = match &value {
            Value::Measured(v) => format!("{} {}", figure.format(*v), figure.unit()),
            Value::Failed(e) => format!("FAILED: {e}"),
            Value::NotApplicable => "n/a".to_owned(),
        };
        build::progress(&format!("  {}: {shown}", figure.label()));
        let index = self
            .figures
            .iter()
            .position(|f| *f == figure)
            .expect("every figure measured is one of Figure::all");
        self.values[index] = value;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_sessions_fit_the_descriptor_limit() {
        let roomy = IdleCount::new(10_000, 1 << 20);
        assert_eq!((roomy.held, roomy.fd_limit), (10_000, None));
        let tight = IdleCount::new(10_000, 20_000);
        assert_eq!((tight.held, tight.fd_limit), (9_500, Some(20_000)));
    }

    #[test]
    fn memory_is_projected_along_the_measured_line() {
        let idle = IdleCount::new(10_000, 20_000);
        // 1000 KiB before, 1000 + 9500 * 3 KiB with 9500 sessions.
        assert_eq!(idle.project(1000, 1000 + 9_500 * 3), 31_000.0);
    }
}
