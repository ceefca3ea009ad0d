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
//!
//! The run is made of sections ([`SECTIONS`]); `--only` picks some of them,
//! and a run without it measures them all. The figures of the table and the
//! reaction times share one testbed; every other section sets up its own
//! and writes its own files next to latest.md.

mod chart;
mod contender;
mod cpu;
mod figure;
mod handover;
mod haproxy;
mod local;
mod makespan;
mod measure;
mod nix;
mod protocol;
mod proxied;
mod reaction;
mod report;
mod splicer;
mod ssh;
mod target;
mod uploads;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use yensid_tests::Topology;
use yensid_tests::wait::wait_until;

use crate::build;
use contender::{CONTENDERS, Contender, ON_REQUEST, Upstream};
use figure::{Figure, PERCENTILES, Value, percentile_micros};
use protocol::BenchServer;
use report::{Report, Results};

/// Two builders, so the middleboxes really spread connections over a pool.
pub const BUILDERS: usize = 2;
/// Longest wait for the builders' connections of a measurement to close.
const QUIET_TIMEOUT: Duration = Duration::from_secs(120);
/// Descriptors per idle session, in the bench process (client and server
/// end) and in a middlebox (its two sockets; yensid's userspace path holds
/// a pipe only while bytes are in flight).
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
    /// Only these contenders (direct, haproxy, kernel, userspace; and,
    /// measured only when named, kernel-splice: the kernel dataplane with
    /// `forward = "splice"`, local: yensid's local path, and splice: a
    /// splice(2) forwarder in the bench); default: the first four. The
    /// real-ssh section adds the local path always. Targets that need a
    /// missing one are reported as unknown.
    #[arg(long = "contender", value_parser = parse_contender)]
    contenders: Vec<Contender>,
    /// Bytes of fresh input per derivation in the upload-parallelism runs.
    #[arg(long, default_value_t = 100 << 20)]
    upload_bytes: u64,
    /// Measure only these sections (comma-separated); default: every one.
    #[arg(long, value_delimiter = ',', value_parser = section_keys())]
    only: Vec<String>,
    #[command(flatten)]
    ssh: ssh::Options,
    #[command(flatten)]
    handover: handover::Options,
    #[command(flatten)]
    local: local::Options,
    #[command(flatten)]
    proxied: proxied::Options,
    /// Where latest.md, latest.json and latest.png go (relative to the
    /// workspace root).
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
}

fn parse_contender(key: &str) -> Result<Contender, String> {
    CONTENDERS
        .into_iter()
        .chain(ON_REQUEST)
        .find(|c| c.key() == key)
        .ok_or_else(|| {
            let keys: Vec<&str> = CONTENDERS
                .iter()
                .chain(&ON_REQUEST)
                .map(|c| c.key())
                .collect();
            format!("one of {}", keys.join(", "))
        })
}

/// A part of the bench that `--only` can select.
pub struct Section {
    /// Its name on the command line.
    pub key: &'static str,
    /// What it measures, for `--help`.
    pub about: &'static str,
    pub part: Part,
}

/// How a section runs.
pub enum Part {
    /// Figures of the main table (those whose [`Figure::section`] is the
    /// section's key), for every contender on the shared testbed.
    Table,
    /// The kernel path's reaction times, on the shared testbed.
    Reaction,
    /// On its own: sets itself up, prints its results and writes its own
    /// files into [`Setup::out`].
    Own(fn(&Setup) -> Result<()>),
}

/// Every section, in the order a full run measures them.
pub const SECTIONS: &[Section] = &[
    Section {
        key: "throughput",
        about: "GB/s and whole-machine CPU per GiB, 1 and N streams, both ways (bench server)",
        part: Part::Table,
    },
    Section {
        key: "banner",
        about: "connect-to-banner latency, p50 and p99, sequential connections",
        part: Part::Table,
    },
    Section {
        key: "rate",
        about: "connections per second from concurrent clients",
        part: Part::Table,
    },
    Section {
        key: "memory",
        about: "the middlebox's RSS with the idle sessions open",
        part: Part::Table,
    },
    Section {
        key: "refusal",
        about: "how long a refused client (build locally) takes to know it",
        part: Part::Table,
    },
    Section {
        key: "nix",
        about: "wall time of uncached Nix builds through each contender",
        part: Part::Table,
    },
    Section {
        key: "reaction",
        about: "how fast the kernel path refuses after a link event or `yensid mode local`",
        part: Part::Reaction,
    },
    Section {
        key: "ssh",
        about: "real ssh and sshd: 1 GiB up and down per cipher (ssh.md)",
        part: Part::Own(ssh::run),
    },
    Section {
        key: "proxied",
        about: "connection rate, CPU per connection and connect-to-banner of the proxied paths against HAProxy, in rounds (proxied.md)",
        part: Part::Own(proxied::run),
    },
    Section {
        key: "handover",
        about: "handover time and failed connections with live connections held (handover.md)",
        part: Part::Own(handover::run),
    },
    Section {
        key: "local",
        about: "the local path (clients on the daemon's host, connect-time rewrite) against direct (local.md)",
        part: Part::Own(measure_local),
    },
    Section {
        key: "makespan",
        about: "makespan of a mixed workload: least-loaded against round-robin, least-connections and the best static assignment (makespan.md)",
        part: Part::Own(measure_makespan),
    },
    Section {
        key: "uploads",
        about: "upload parallelism of a real Nix client, one entry against aliases (uploads.md)",
        part: Part::Own(measure_uploads),
    },
];

/// The local path against direct, on a testbed of its own.
fn measure_local(setup: &Setup) -> Result<()> {
    let testbed = Testbed::new(setup.yensid.clone())?;
    let md = local::measure(&testbed, setup.options)?;
    println!("\n{md}");
    std::fs::create_dir_all(&setup.out)?;
    std::fs::write(setup.out.join("local.md"), md)?;
    build::progress(&format!("wrote local.md in {}", setup.out.display()));
    Ok(())
}

/// `--only`'s values, each with its help.
fn section_keys() -> clap::builder::PossibleValuesParser {
    clap::builder::PossibleValuesParser::new(
        SECTIONS
            .iter()
            .map(|s| clap::builder::PossibleValue::new(s.key).help(s.about)),
    )
}

/// What a section of its own gets.
pub struct Setup<'a> {
    pub options: &'a Options,
    /// The release build of the daemon.
    pub yensid: PathBuf,
    /// The contenders asked for, in [`CONTENDERS`] order.
    pub contenders: Vec<Contender>,
    /// Where its files go.
    pub out: PathBuf,
}

impl Options {
    fn selected(&self, key: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|k| k == key)
    }
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
            options.local.local_rounds as u64,
            options.proxied.proxied_rounds as u64,
        ]
        .iter()
        .all(|&n| n > 0),
        "every size and count must be positive"
    );
    build::all(true)?;
    build::ensure_packages(&[
        (haproxy::HAPROXY, "haproxy"),
        (chart::FONT, "fonts-dejavu-core"),
        ("/usr/sbin/sshd", "openssh-server"),
        (yensid_tests::nix::NIX_BUILD, "nix-bin"),
    ])?;
    let sessions = options
        .idle_connections
        .max(options.handover.most_connections());
    let fd_limit = raise_fd_limit(sessions as u64 * FDS_PER_SESSION + FD_RESERVE)?;
    let setup = Setup {
        options,
        yensid: build::yensid_binary(true),
        contenders: if options.contenders.is_empty() {
            CONTENDERS.to_vec()
        } else {
            CONTENDERS
                .into_iter()
                .chain(ON_REQUEST)
                .filter(|c| options.contenders.contains(c))
                .collect()
        },
        out: build::workspace_root().join(&options.out),
    };
    let mut failed = Vec::new();
    if let Err(e) = measure_table(&setup, fd_limit, started) {
        failed.push(format!("table: {e:#}"));
    }
    for section in SECTIONS.iter().filter(|s| options.selected(s.key)) {
        if let Part::Own(measure) = section.part {
            build::progress(&format!("section {}: {}", section.key, section.about));
            if let Err(e) = measure(&setup) {
                build::progress(&format!("section {} failed: {e:#}", section.key));
                failed.push(format!("{}: {e:#}", section.key));
            }
        }
    }
    ensure!(
        failed.is_empty(),
        "some measurements failed:\n{}",
        failed.join("\n")
    );
    Ok(())
}

/// The selected figures of the main table for every contender, and the
/// reaction times, on one testbed; written to latest.{md,json,png}. Nothing
/// when no such section is selected.
fn measure_table(setup: &Setup, fd_limit: u64, started: Instant) -> Result<()> {
    let options = setup.options;
    let figures: Vec<Figure> = Figure::all(options.streams)
        .into_iter()
        .filter(|f| options.selected(f.section()))
        .collect();
    let reaction = options.selected("reaction");
    if figures.is_empty() && !reaction {
        return Ok(());
    }
    let idle = IdleCount::new(options.idle_connections, fd_limit);
    let testbed = Testbed::new(setup.yensid.clone())?;
    let results: Vec<Results> = setup
        .contenders
        .iter()
        .filter(|_| !figures.is_empty())
        .map(|&contender| measure(contender, &testbed, options, &figures, idle))
        .collect();
    let reactions = reaction
        .then(|| reaction::measure(&testbed.yensid, &testbed.topology, options.reaction_trials));
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
    let dir = &setup.out;
    report.write(dir)?;
    // Reaction times alone have no figure to chart.
    if !report.figures.is_empty() {
        chart::draw(&report, &dir.join("latest.png"))?;
    }
    build::progress(&format!(
        "wrote latest.md and latest.json (and the chart of its figures) in {}",
        dir.display()
    ));
    let failed = report.failed_figures();
    ensure!(
        failed == 0,
        "{failed} figures could not be measured; see the notes"
    );
    Ok(())
}

/// The upload-parallelism runs (see `uploads`), printed and written to
/// `uploads.md` and `uploads.json`.
fn measure_uploads(setup: &Setup) -> Result<()> {
    let options = setup.options;
    build::progress("measuring upload parallelism through one entry and four aliases");
    let uploads = uploads::measure(&setup.yensid, options.upload_bytes)?;
    let md = uploads.markdown();
    println!("\n{md}");
    write_section(&setup.out, "uploads", &md, &uploads.json())
}

/// Writes a section's `<key>.md` and `<key>.json` into `dir`.
pub fn write_section(dir: &Path, key: &str, md: &str, json: &serde_json::Value) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    std::fs::write(dir.join(format!("{key}.md")), md)?;
    std::fs::write(
        dir.join(format!("{key}.json")),
        serde_json::to_string_pretty(json)? + "\n",
    )?;
    build::progress(&format!(
        "wrote {key}.md and {key}.json in {}",
        dir.display()
    ));
    Ok(())
}

/// The makespan runs (see `makespan`), printed and written to
/// `makespan.md` in `dir`.
fn measure_makespan(setup: &Setup) -> Result<()> {
    let dir = &setup.out;
    build::ensure_packages(&[(
        yensid_tests::node_exporter::NODE_EXPORTER,
        "prometheus-node-exporter",
    )])?;
    build::progress("measuring the makespan of a mixed workload");
    let md = makespan::measure(&setup.yensid)?.markdown();
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
    let wants = |section: &str| figures.iter().any(|f| f.section() == section);
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

    if wants("banner") {
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
    }

    if wants("rate") {
        let cpu_before = running.pid().map(cpu::process_seconds);
        let rate = measure::connection_rate(
            client_ns,
            &targets,
            options.rate_clients,
            Duration::from_secs(options.rate_seconds),
        );
        let cpu = match (cpu_before, running.pid(), &rate) {
            (None, _, _) | (_, None, _) => Value::NotApplicable,
            (Some(Err(e)), _, _) => Value::Failed(format!("{e:#}")),
            (_, _, Err(e)) => Value::Failed(format!("{e:#}")),
            (Some(Ok(before)), Some(pid), Ok(rate)) => match cpu::process_seconds(pid) {
                Ok(after) => Value::Measured((after - before) / rate.completed as f64 * 1e6),
                Err(e) => Value::Failed(format!("{e:#}")),
            },
        };
        sheet.put(
            Figure::ConnectionRate,
            Value::from_result(rate.map(|r| r.per_second).map_err(|e| format!("{e:#}"))),
        );
        sheet.put(Figure::ConnectionCpu, cpu);
        quiet(&mut notes);
    }

    if wants("memory") {
        let rss = idle_rss(&running, client_ns, &targets, idle, &mut notes);
        sheet.put(Figure::IdleRss, rss.0);
        idle_rss_projected = rss.1;
        quiet(&mut notes);
    }

    if wants("refusal") {
        refusal(
            &mut running,
            client_ns,
            options.connections,
            &mut sheet,
            &mut notes,
        );
    }

    match running.stop() {
        Ok(stopped) => notes.extend(stopped),
        Err(e) => notes.push(format!("did not stop cleanly: {e:#}")),
    }

    if wants("nix") {
        let builds = nix_builds(contender, testbed, options.nix_builds, &mut notes);
        sheet.put(
            Figure::NixBuilds,
            Value::from_result(builds.map_err(|e| format!("{e:#}"))),
        );
    }
    Results {
        contender,
        values: sheet.values,
        idle_rss_projected,
        notes,
    }
}

/// The middlebox's RSS with the idle sessions open, and the RSS projected
/// to the requested count when fewer were held.
fn idle_rss(
    running: &contender::Running,
    client_ns: &yensid_tests::Netns,
    targets: &[std::net::SocketAddr],
    idle: IdleCount,
    notes: &mut Vec<String>,
) -> (Value, Option<f64>) {
    let mut idle_rss_projected = None;
    let rss = match running.pid() {
        None => Value::NotApplicable,
        Some(pid) => match measure::idle_memory(client_ns, targets, idle.held, pid) {
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
    (rss, idle_rss_projected)
}

/// Refusal latencies, once the contender refuses every new connection.
fn refusal(
    running: &mut contender::Running,
    client_ns: &yensid_tests::Netns,
    connections: usize,
    sheet: &mut Sheet,
    notes: &mut Vec<String>,
) {
    let refusals = running.refuse().map(|target| {
        target.and_then(|target| {
            measure::refusal_latencies(client_ns, target, connections)
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

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        options: Options,
    }

    #[test]
    fn options_parse_and_only_takes_the_sections_by_key() {
        use clap::{CommandFactory, Parser};
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from(["bench", "--only", "ssh,handover"]).expect("valid");
        assert!(cli.options.selected("ssh") && cli.options.selected("handover"));
        assert!(!cli.options.selected("throughput"));
        assert!(Cli::try_parse_from(["bench", "--only", "nonsense"]).is_err());
        let all = Cli::try_parse_from(["bench"]).expect("valid");
        assert!(SECTIONS.iter().all(|s| all.options.selected(s.key)));
        assert_eq!(all.options.handover.most_connections(), 9_500);
    }

    #[test]
    fn every_figure_belongs_to_a_table_section() {
        for figure in Figure::all(8) {
            let section = SECTIONS.iter().find(|s| s.key == figure.section());
            assert!(
                matches!(section.map(|s| &s.part), Some(Part::Table)),
                "{figure:?}"
            );
        }
    }

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
