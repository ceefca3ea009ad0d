//! The local path contender (issue 13): a client on the yensid host whose
//! connect the kernel sends straight to the builder, against a direct
//! connection, figure by figure in the same run, and each judged against
//! the target.
//!
//! On a machine of two shared CPUs one transfer varies by tens of percent
//! from run to run whatever the path (the same 1 GiB went at 1.5 and at 3.7
//! GB/s in two runs back to back), while the targets ask for a few percent.
//! So every figure is measured in `--local-rounds` rounds, direct and the
//! local path once each per round, the one that goes first alternating;
//! each figure is judged on the medians, and the samples are printed.
//!
//! The bench's clients are threads of this process (and its `nix-build`
//! children), so for the figures the process joins a cgroup of its own
//! (`TestCgroup`) and the daemon attaches the local path there, never to
//! the root cgroup.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use yensid_tests::cgroup::TestCgroup;
use yensid_tests::{Daemon, DaemonConfig, Dataplane, LocalPathConfig, Strategy, service};

use super::contender::local_connections;
use super::figure::{PERCENTILES, median, percentile_micros};
use super::measure::{banner_latencies, connection_rate, transfer};
use super::protocol::Mode;
use super::{Testbed, nix};

#[derive(clap::Args)]
#[group(id = "local_path")]
pub struct Options {
    /// Rounds of the local-path section: direct and the local path once
    /// each per round, the first of the two alternating; each figure is
    /// judged on its medians.
    #[arg(long, default_value_t = 5)]
    pub local_rounds: usize,
}

#[derive(Clone, Copy)]
enum Target {
    /// local >= direct * ratio.
    AtLeast(f64),
    /// local <= direct * ratio.
    AtMost(f64),
    /// local <= direct + slack (same unit).
    WithinAbove(f64),
}

/// One figure: its samples on both paths, and the target.
struct Row {
    figure: String,
    unit: &'static str,
    target: Target,
    direct: Vec<f64>,
    local: Vec<f64>,
}

impl Row {
    fn new(figure: String, unit: &'static str, target: Target) -> Self {
        Self {
            figure,
            unit,
            target,
            direct: Vec::new(),
            local: Vec::new(),
        }
    }

    fn push(&mut self, path: Path, value: f64) {
        match path {
            Path::Direct => self.direct.push(value),
            Path::Local => self.local.push(value),
        }
    }

    /// Both medians, once each path has a sample.
    fn medians(&self) -> Option<(f64, f64)> {
        Some((median(&self.direct)?, median(&self.local)?))
    }

    fn met(&self) -> Option<bool> {
        let (direct, local) = self.medians()?;
        Some(match self.target {
            Target::AtLeast(r) => local >= direct * r,
            Target::AtMost(r) => local <= direct * r,
            Target::WithinAbove(slack) => local <= direct + slack,
        })
    }

    fn target_text(&self) -> String {
        match self.target {
            Target::AtLeast(r) => format!(">= {r:.2}x direct"),
            Target::AtMost(r) => format!("<= {r:.2}x direct"),
            Target::WithinAbove(slack) => format!("<= direct + {slack} {}", self.unit),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Path {
    Direct,
    Local,
}

/// The two paths in the order round `round` measures them.
fn order(round: usize) -> [Path; 2] {
    if round.is_multiple_of(2) {
        [Path::Direct, Path::Local]
    } else {
        [Path::Local, Path::Direct]
    }
}

/// The rows of one kind of figure, filled round by round.
struct Sheet {
    rows: Vec<Row>,
    failures: Vec<String>,
}

impl Sheet {
    /// The row called `figure`, made on first use.
    fn row(&mut self, figure: String, unit: &'static str, target: Target) -> &mut Row {
        match self.rows.iter().position(|r| r.figure == figure) {
            Some(i) => &mut self.rows[i],
            None => {
                self.rows.push(Row::new(figure, unit, target));
                self.rows.last_mut().expect("just pushed")
            }
        }
    }

    fn fail(&mut self, what: String, path: Path, round: usize, e: anyhow::Error) {
        self.failures
            .push(format!("{what}, {path:?}, round {}: {e:#}", round + 1));
    }
}

/// Measures direct and the local path side by side; the report in
/// Markdown (what failed to measure is in it too).
pub fn measure(testbed: &Testbed, options: &super::Options) -> Result<String> {
    let rounds = options.local.local_rounds;
    let cgroup = TestCgroup::join().context("a cgroup for the bench's local clients")?;
    let local_path = || LocalPathConfig {
        cgroup: cgroup.path().to_owned(),
        proxied: Vec::new(),
    };
    let ns = testbed.topology.client_ns();
    let mut sheet = Sheet {
        rows: Vec::new(),
        failures: Vec::new(),
    };

    // The bench server's figures: builders are the bench servers.
    let mut config = DaemonConfig::for_topology(
        &testbed.topology,
        Dataplane::Kernel,
        Strategy::LeastConnections,
    );
    for upstream in testbed.upstreams() {
        config.builder_mut(&upstream.builder).address = upstream.address;
    }
    config.local_path = Some(local_path());
    let daemon = Daemon::start_binary(&testbed.yensid, ns, &config)?;
    let direct: Vec<SocketAddr> = testbed.upstreams().iter().map(|u| u.address).collect();
    let targets = |path: Path| match path {
        Path::Direct => direct.clone(),
        Path::Local => vec![service()],
    };
    let mut stream_counts = vec![1, options.streams];
    stream_counts.dedup();
    let seconds = Duration::from_secs(options.rate_seconds);
    for round in 0..rounds {
        crate::build::progress(&format!("local path, round {} of {rounds}", round + 1));
        for mode in [Mode::Upload, Mode::Download] {
            for &streams in &stream_counts {
                let what = format!("{mode:?} {streams} stream(s)");
                for path in order(round) {
                    match testbed
                        .wait_quiet()
                        .and_then(|()| transfer(ns, &targets(path), mode, streams, options.bytes))
                    {
                        Ok(t) => {
                            sheet
                                .row(format!("throughput, {what}"), "GB/s", Target::AtLeast(0.97))
                                .push(path, t.gb_per_second);
                            sheet
                                .row(
                                    format!("CPU per GiB, {what}"),
                                    "CPU s/GiB",
                                    Target::AtMost(1.03),
                                )
                                .push(path, t.cpu_per_gib);
                        }
                        Err(e) => sheet.fail(what.clone(), path, round, e),
                    }
                }
            }
        }
        for path in order(round) {
            match testbed
                .wait_quiet()
                .and_then(|()| banner_latencies(ns, &targets(path), options.connections))
            {
                Ok(samples) => {
                    for p in PERCENTILES {
                        sheet
                            .row(
                                format!("connect to banner p{p}"),
                                "µs",
                                Target::WithinAbove(10.0),
                            )
                            .push(path, percentile_micros(&samples, p));
                    }
                }
                Err(e) => sheet.fail("connect to banner".into(), path, round, e),
            }
        }
        for path in order(round) {
            match testbed
                .wait_quiet()
                .and_then(|()| connection_rate(ns, &targets(path), options.rate_clients, seconds))
            {
                Ok(rate) => sheet
                    .row(
                        format!("connection rate, {} clients", options.rate_clients),
                        "conn/s",
                        Target::AtLeast(0.95),
                    )
                    .push(path, rate.per_second),
                Err(e) => sheet.fail("connection rate".into(), path, round, e),
            }
        }
    }
    let _ = testbed.wait_quiet();
    let went_direct = local_connections(&daemon)?;
    drop(daemon);

    // Uncached Nix builds: builders are the sshd, as Nix needs.
    let mut config = DaemonConfig::for_topology(
        &testbed.topology,
        Dataplane::Kernel,
        Strategy::LeastConnections,
    );
    config.local_path = Some(local_path());
    let daemon = Daemon::start_binary(&testbed.yensid, ns, &config)?;
    let sshd: Vec<SocketAddr> = testbed.sshd_upstreams().iter().map(|u| u.address).collect();
    for round in 0..rounds {
        crate::build::progress(&format!(
            "local path, Nix builds, round {} of {rounds}",
            round + 1
        ));
        for path in order(round) {
            let builder_targets = match path {
                Path::Direct => sshd.clone(),
                Path::Local => vec![service()],
            };
            match nix::builds(&testbed.topology, &builder_targets, options.nix_builds) {
                Ok(builds) => sheet
                    .row(
                        format!("uncached Nix builds ({}), wall time", options.nix_builds),
                        "s",
                        Target::AtMost(1.02),
                    )
                    .push(path, builds.seconds),
                Err(e) => sheet.fail("Nix builds".into(), path, round, e),
            }
        }
    }
    let nix_went_direct = local_connections(&daemon)?;
    drop(daemon);
    drop(cgroup);

    let mut md = format!(
        "## Local path (issue 13): a client on the yensid host, straight to the builder\n\n\
         Median of {rounds} rounds; in each round direct and the local path are measured once, \
         the first of the two alternating. Samples in round order.\n\n\
         | figure | direct | local path | ratio | target | | direct samples | local samples |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- |\n"
    );
    for row in &sheet.rows {
        let samples = |v: &[f64]| {
            v.iter()
                .map(|s| format!("{s:.3}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let (direct, local, ratio) = match row.medians() {
            Some((d, l)) => (
                format!("{d:.3} {}", row.unit),
                format!("{l:.3} {}", row.unit),
                format!("{:.3}x", l / d),
            ),
            None => ("-".into(), "-".into(), "-".into()),
        };
        let _ = writeln!(
            md,
            "| {} | {direct} | {local} | {ratio} | {} | {} | {} | {} |",
            row.figure,
            row.target_text(),
            match row.met() {
                Some(true) => "met",
                Some(false) => "MISSED",
                None => "unknown",
            },
            samples(&row.direct),
            samples(&row.local),
        );
    }
    let _ = writeln!(
        md,
        "\n{went_direct} connections of the bench server's figures and {nix_went_direct} of the \
         Nix builds went straight to a builder (the daemons' own counts)."
    );
    for failure in &sheet.failures {
        let _ = writeln!(md, "- not measured: {failure}");
    }
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_alternate_which_path_goes_first() {
        assert_eq!(order(0), [Path::Direct, Path::Local]);
        assert_eq!(order(1), [Path::Local, Path::Direct]);
    }

    #[test]
    fn a_row_is_judged_on_its_medians() {
        let mut row = Row::new("x".into(), "GB/s", Target::AtLeast(0.97));
        assert_eq!(row.met(), None, "no sample yet");
        for (d, l) in [(1.0, 3.0), (2.0, 1.9), (3.0, 0.5)] {
            row.push(Path::Direct, d);
            row.push(Path::Local, l);
        }
        // Medians 2.0 and 1.9: 0.95x, below 0.97x.
        assert_eq!(row.met(), Some(false));
        let mut row = Row::new("y".into(), "µs", Target::WithinAbove(10.0));
        row.push(Path::Direct, 100.0);
        row.push(Path::Local, 109.0);
        assert_eq!(row.met(), Some(true));
    }
}
