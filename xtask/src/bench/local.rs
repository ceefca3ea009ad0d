//! The local path contender (issue 13): a client on the yensid host whose
//! connect the kernel sends straight to the builder, against a direct
//! connection, figure by figure in the same run, each pair back to back,
//! and each judged against the target.
//!
//! The bench's clients are threads of this process, so for the figures the
//! process joins a cgroup of its own (`TestCgroup`) and the daemon attaches
//! the local path there, never to the root cgroup.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{Context, Result};
use yensid_tests::cgroup::TestCgroup;
use yensid_tests::{Daemon, DaemonConfig, Dataplane, LocalPathConfig, Strategy, service};

use super::figure::percentile_micros;
use super::measure::{banner_latencies, connection_rate, transfer};
use super::protocol::Mode;
use super::{Options, Testbed};

/// One figure: direct, local path, and whether the target holds.
struct Row {
    figure: String,
    direct: f64,
    local: f64,
    unit: &'static str,
    target: Target,
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

impl Row {
    fn met(&self) -> bool {
        match self.target {
            Target::AtLeast(r) => self.local >= self.direct * r,
            Target::AtMost(r) => self.local <= self.direct * r,
            Target::WithinAbove(slack) => self.local <= self.direct + slack,
        }
    }

    fn target_text(&self) -> String {
        match self.target {
            Target::AtLeast(r) => format!(">= {r:.2}x direct"),
            Target::AtMost(r) => format!("<= {r:.2}x direct"),
            Target::WithinAbove(slack) => format!("<= direct + {slack} {}", self.unit),
        }
    }
}

/// Measures direct and the local path side by side; the report in
/// Markdown (what failed to measure is in it too).
pub fn measure(testbed: &Testbed, options: &Options) -> Result<String> {
    let cgroup = TestCgroup::join().context("a cgroup for the bench's local clients")?;
    let mut config = DaemonConfig::for_topology(
        &testbed.topology,
        Dataplane::Kernel,
        Strategy::LeastConnections,
    );
    for upstream in testbed.upstreams() {
        config.builder_mut(&upstream.builder).address = upstream.address;
    }
    config.local_path = Some(LocalPathConfig {
        cgroup: cgroup.path().to_owned(),
        proxied: Vec::new(),
    });
    let daemon = Daemon::start_binary(&testbed.yensid, testbed.topology.client_ns(), &config)?;
    let direct: Vec<_> = testbed.upstreams().iter().map(|u| u.address).collect();
    let local = vec![service()];
    let ns = testbed.topology.client_ns();
    let quiet = || testbed.wait_quiet();

    let mut rows = Vec::new();
    let mut failures = Vec::new();
    let mut stream_counts = vec![1, options.streams];
    stream_counts.dedup();
    for mode in [Mode::Upload, Mode::Download] {
        for &streams in &stream_counts {
            let pair = (|| {
                quiet()?;
                let d = transfer(ns, &direct, mode, streams, options.bytes)?;
                quiet()?;
                let l = transfer(ns, &local, mode, streams, options.bytes)?;
                Ok::<_, anyhow::Error>((d, l))
            })();
            let what = format!("{mode:?} {streams} stream(s)");
            match pair {
                Ok((d, l)) => {
                    rows.push(Row {
                        figure: format!("throughput, {what}"),
                        direct: d.gb_per_second,
                        local: l.gb_per_second,
                        unit: "GB/s",
                        target: Target::AtLeast(0.97),
                    });
                    rows.push(Row {
                        figure: format!("CPU per GiB, {what}"),
                        direct: d.cpu_per_gib,
                        local: l.cpu_per_gib,
                        unit: "CPU s/GiB",
                        target: Target::AtMost(1.03),
                    });
                }
                Err(e) => failures.push(format!("{what}: {e:#}")),
            }
        }
    }
    let banners = (|| {
        quiet()?;
        let d = banner_latencies(ns, &direct, options.connections)?;
        quiet()?;
        let l = banner_latencies(ns, &local, options.connections)?;
        Ok::<_, anyhow::Error>((d, l))
    })();
    match banners {
        Ok((d, l)) => {
            for p in super::figure::PERCENTILES {
                rows.push(Row {
                    figure: format!("connect to banner p{p}"),
                    direct: percentile_micros(&d, p),
                    local: percentile_micros(&l, p),
                    unit: "µs",
                    target: Target::WithinAbove(10.0),
                });
            }
        }
        Err(e) => failures.push(format!("connect to banner: {e:#}")),
    }
    let seconds = Duration::from_secs(options.rate_seconds);
    let rates = (|| {
        quiet()?;
        let d = connection_rate(ns, &direct, options.rate_clients, seconds)?;
        quiet()?;
        let l = connection_rate(ns, &local, options.rate_clients, seconds)?;
        Ok::<_, anyhow::Error>((d, l))
    })();
    match rates {
        Ok((d, l)) => rows.push(Row {
            figure: format!("connection rate, {} clients", options.rate_clients),
            direct: d.per_second,
            local: l.per_second,
            unit: "conn/s",
            target: Target::AtLeast(0.95),
        }),
        Err(e) => failures.push(format!("connection rate: {e:#}")),
    }
    let _ = quiet();
    let status = daemon.status()?;
    let went_direct: u64 = status
        .json()
        .pointer("/builders")
        .and_then(|b| b.as_array())
        .map(|builders| {
            builders
                .iter()
                .filter_map(|b| b.pointer("/local/connections").and_then(|n| n.as_u64()))
                .sum()
        })
        .unwrap_or(0);
    drop(daemon);
    drop(cgroup);

    let mut md = String::from(
        "## Local path (issue 13): a client on the yensid host, straight to the builder\n\n\
         | figure | direct | local path | ratio | target | |\n| --- | --- | --- | --- | --- | --- |\n",
    );
    for row in &rows {
        let _ = writeln!(
            md,
            "| {} | {:.3} {unit} | {:.3} {unit} | {:.3}x | {} | {} |",
            row.figure,
            row.direct,
            row.local,
            row.local / row.direct,
            row.target_text(),
            if row.met() { "met" } else { "MISSED" },
            unit = row.unit,
        );
    }
    let _ = writeln!(
        md,
        "\n{went_direct} connections went straight to a builder (the daemon's count)."
    );
    for failure in &failures {
        let _ = writeln!(md, "- not measured: {failure}");
    }
    Ok(md)
}
