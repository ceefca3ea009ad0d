//! Builder load from the builders themselves: the real node_exporter (Debian's
//! `prometheus-node-exporter`) runs inside each builder's namespace and yensid scrapes
//! it.
//!
//! The builders share one kernel, so their pressure, load average and CPU count are the
//! same; in the threshold tests each exporter therefore reads a procfs directory the
//! test writes (`--path.procfs`, [`ControlledProc`]): controlled input to the real
//! exporter. Each builder's store file system is a real tmpfs of its own, which the test
//! fills. The test of two yensid instances reads what really differs per builder
//! namespace: its established TCP connections (`node_netstat_Tcp_CurrEstab`), from an
//! exporter on the namespace's real /proc, whose `net/snmp` is the namespace's own.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use yensid_tests::node_exporter::{
    ControlledProc, EXPORTER_PORT, NodeExporter, ProcInput, SecondClient, insert_after,
};
use yensid_tests::{
    Daemon, DaemonConfig, Dataplane, Fake, FakeServer, Netns, RawClient, SshConnection, Status,
    Strategy, Topology, service,
};

/// Only against hangs.
const WAIT: Duration = Duration::from_secs(30);
/// Short, so the tests follow changes quickly.
const LOAD_SECTION: &str = "\n[load]\nscrape_interval = \"300ms\"\nscrape_timeout = \"250ms\"\n";
/// Thresholds of the service in the threshold tests.
const THRESHOLDS: &str = "load = { max_cpu_pressure = 0.5, max_memory_pressure = 0.5, max_io_pressure = 0.5, max_load_per_core = 2, min_free_disk = \"24MiB\" }";
/// The store file system of each builder in the threshold tests.
const STORE_MIB: u32 = 48;

macro_rules! privileged {
    ($($test:ident),+ $(,)?) => {
        $(
            #[test]
            fn $test() -> Result<()> {
                if !yensid_tests::privileged_or_skip(concat!(module_path!(), "::", stringify!($test))) {
                    return Ok(());
                }
                tests::$test()
            }
        )+
    };
}

privileged!(
    a_full_store_takes_the_builder_out_until_it_is_freed,
    cpu_pressure_takes_the_builder_out_until_it_eases,
    memory_pressure_takes_the_builder_out_until_it_eases,
    load_per_core_takes_the_builder_out_until_it_eases,
    unreachable_metrics_leave_the_builder_usable,
    hanging_metrics_leave_the_builder_usable,
    garbage_metrics_leave_the_builder_usable,
    two_instances_steer_away_from_what_the_other_loaded,
    the_policy_hook_sees_each_builders_load,
);

/// The config file of `config` with every builder's `metrics_url`, the service's
/// `service_keys` and the `[load]` section.
fn render(
    config: &DaemonConfig,
    paths: &yensid_tests::InstancePaths,
    urls: &[(&str, String)],
    service_keys: &str,
) -> Result<String> {
    let mut toml = config.render(paths);
    for (builder, url) in urls {
        toml = insert_after(
            &toml,
            &format!("[builders.{builder}]"),
            &format!("metrics_url = \"{url}\""),
        )?;
    }
    toml = insert_after(&toml, "[[service]]", service_keys)?;
    Ok(toml + LOAD_SECTION)
}

/// `builders[name].load` of a status, which must be there (the builder has a
/// `metrics_url`).
fn load_of(status: &Status, builder: &str) -> Result<Value> {
    let b = status
        .json()
        .get("builders")
        .and_then(Value::as_array)
        .and_then(|list| {
            list.iter()
                .find(|b| b.get("name").and_then(Value::as_str) == Some(builder))
        })
        .with_context(|| format!("no builder {builder} in {}", status.json()))?;
    b.get("load")
        .filter(|l| l.is_object())
        .cloned()
        .with_context(|| format!("builder {builder} has no load in status: {b}"))
}

/// The measured load of `builder` (`None` while unknown).
fn measured(status: &Status, builder: &str) -> Result<Option<Value>> {
    Ok(load_of(status, builder)?
        .get("load")
        .filter(|l| l.is_object())
        .cloned())
}

fn tally<'a>(names: impl Iterator<Item = &'a str>) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for n in names {
        *counts.entry(n.to_owned()).or_default() += 1;
    }
    counts
}

fn open(raw: &RawClient<'_>, n: usize) -> Result<Vec<SshConnection>> {
    (0..n).map(|_| raw.open_ssh(service())).collect()
}

fn exporter_addr(topology: &Topology, builder: &str) -> SocketAddr {
    SocketAddr::new(topology.builder(builder).address().into(), EXPORTER_PORT)
}

mod tests {
    use super::*;

    /// Two builders, each with a controlled procfs, a store of [`STORE_MIB`] and an
    /// exporter; yensid (least-connections) with [`THRESHOLDS`].
    struct World {
        daemon: Daemon,
        procs: Vec<ControlledProc>,
        _exporters: Vec<NodeExporter>,
        topology: Topology,
    }

    impl World {
        fn new() -> Result<Self> {
            let topology = Topology::new(2)?;
            let mut procs = Vec::new();
            let mut exporters = Vec::new();
            let mut urls = Vec::new();
            for name in ["b1", "b2"] {
                let proc = ControlledProc::new(ProcInput::default(), STORE_MIB)?;
                let exporter = NodeExporter::start(
                    topology.builder(name).ns(),
                    exporter_addr(&topology, name),
                    Some(&proc),
                )?;
                urls.push((name, exporter.url()));
                procs.push(proc);
                exporters.push(exporter);
            }
            let config = DaemonConfig::for_topology(
                &topology,
                Dataplane::Kernel,
                Strategy::LeastConnections,
            );
            let daemon = Daemon::start_with_file(topology.client_ns(), &|paths| {
                render(&config, paths, &urls, THRESHOLDS)
            })?;
            let world = Self {
                daemon,
                procs,
                _exporters: exporters,
                topology,
            };
            world.wait_for_rates()?;
            Ok(world)
        }

        /// Until both builders' pressures are measured (two samples each).
        fn wait_for_rates(&self) -> Result<()> {
            self.daemon
                .wait_for_status("both builders' pressure to be measured", WAIT, |s| {
                    for b in ["b1", "b2"] {
                        let known = measured(s, b)?
                            .and_then(|l| l.get("cpu_pressure").cloned())
                            .is_some_and(|p| p.is_number());
                        if !known {
                            return Ok(false);
                        }
                    }
                    Ok(true)
                })
                .map(drop)
        }

        fn b1(&self) -> &ControlledProc {
            &self.procs[0]
        }

        /// Puts b1 past a threshold with `overload`, checks that new connections go to
        /// b2 only and the reason is logged and shown; `recover` brings b1 back, and a
        /// new connection goes to it again.
        fn overload_then_recover(
            &self,
            overload: impl FnOnce(&ControlledProc) -> Result<()>,
            recover: impl FnOnce(&ControlledProc) -> Result<()>,
            key: &str,
        ) -> Result<()> {
            let since = SystemTime::now();
            overload(self.b1())?;
            let mut why = None;
            self.daemon
                .wait_for_status(&format!("b1 to be excluded by {key}"), WAIT, |s| {
                    why = s.exclusion("ssh", "b1")?;
                    Ok(why.is_some())
                })?;
            let why = why.unwrap_or_default();
            ensure!(
                why.starts_with("overloaded:") && why.contains(key),
                "b1 excluded for `{why}`, not by {key}"
            );
            let line = self
                .daemon
                .wait_for_log(&["builder excluded", "b1", key], since, WAIT)?;
            ensure!(
                line.text.contains(" is above ") || line.text.contains(" is below "),
                "the log line names no value: {}",
                line.text
            );
            let explain = self.daemon.cli(&["explain"])?;
            ensure!(
                explain.contains("b1: excluded: overloaded:") && explain.contains(key),
                "explain does not say why b1 is out:\n{explain}"
            );

            let raw = self.topology.raw_client();
            let held = open(&raw, 4)?;
            let counts = tally(held.iter().map(|c| c.served_by()));
            ensure!(
                counts == tally(["b2"; 4].into_iter()),
                "with b1 over {key}, 4 new connections went {counts:?}"
            );

            recover(self.b1())?;
            self.daemon
                .wait_for_status("b1 to be eligible again", WAIT, |s| {
                    Ok(s.exclusion("ssh", "b1")?.is_none())
                })?;
            // Least connections: b2 holds 4, so the next one must go to b1.
            let next = raw.open_ssh(service())?;
            ensure!(
                next.served_by() == "b1",
                "b1 recovered from {key}, yet the next connection went to {}",
                next.served_by()
            );
            drop((held, next));
            Ok(())
        }
    }

    pub fn a_full_store_takes_the_builder_out_until_it_is_freed() -> Result<()> {
        let w = World::new()?;
        w.daemon
            .wait_for_status("b1's store to be measured", WAIT, |s| {
                Ok(
                    measured(s, "b1")?.and_then(|l| l.pointer("/disk/mountpoint").cloned())
                        == Some(Value::from("/nix")),
                )
            })?;
        w.overload_then_recover(
            |p| p.fill_store(STORE_MIB - 8),
            |p| p.free_store(),
            "min_free_disk",
        )
    }

    pub fn cpu_pressure_takes_the_builder_out_until_it_eases() -> Result<()> {
        let w = World::new()?;
        w.overload_then_recover(
            |p| p.set(|i| i.cpu_pressure = 0.9),
            |p| p.set(|i| i.cpu_pressure = 0.0),
            "max_cpu_pressure",
        )
    }

    pub fn memory_pressure_takes_the_builder_out_until_it_eases() -> Result<()> {
        let w = World::new()?;
        w.overload_then_recover(
            |p| p.set(|i| i.memory_pressure = 0.8),
            |p| p.set(|i| i.memory_pressure = 0.0),
            "max_memory_pressure",
        )
    }

    pub fn load_per_core_takes_the_builder_out_until_it_eases() -> Result<()> {
        let w = World::new()?;
        // Two CPUs: a load of 6 is 3 per core, above max_load_per_core 2.
        w.overload_then_recover(
            |p| p.set(|i| i.load1 = 6.0),
            |p| p.set(|i| i.load1 = 0.5),
            "max_load_per_core",
        )
    }

    /// b1's `metrics_url` answers as `endpoint` makes it; b2's is a real exporter. The
    /// daemon keeps b1 in the pool on connection counts, says why in status, logs the
    /// problem once however many scrapes fail, and both builders get connections.
    fn unreadable(
        endpoint: impl FnOnce(&Netns, SocketAddr) -> Result<Option<FakeServer>>,
        expected_error: &str,
    ) -> Result<()> {
        let topology = Topology::new(2)?;
        let proc = ControlledProc::new(ProcInput::default(), STORE_MIB)?;
        let b2 = NodeExporter::start(
            topology.builder("b2").ns(),
            exporter_addr(&topology, "b2"),
            Some(&proc),
        )?;
        let b1_addr = exporter_addr(&topology, "b1");
        let _fake = endpoint(topology.builder("b1").ns(), b1_addr)?;
        let urls = [
            ("b1", format!("http://{b1_addr}/metrics")),
            ("b2", b2.url()),
        ];
        let config =
            DaemonConfig::for_topology(&topology, Dataplane::Kernel, Strategy::LeastConnections);
        let daemon = Daemon::start_with_file(topology.client_ns(), &|paths| {
            render(&config, paths, &urls, THRESHOLDS)
        })?;
        let mut error = String::new();
        daemon.wait_for_status("three failed scrapes of b1", WAIT, |s| {
            let load = load_of(s, "b1")?;
            error = load
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            Ok(load.get("scrape_errors").and_then(Value::as_u64) >= Some(3))
        })?;
        ensure!(
            error.contains(expected_error),
            "b1's scrape error is `{error}`, expected `{expected_error}`"
        );
        let status = daemon.status()?;
        ensure!(
            measured(&status, "b1")?.is_none(),
            "b1's load should be unknown: {}",
            status.json()
        );
        ensure!(
            status.exclusion("ssh", "b1")?.is_none(),
            "b1 should stay eligible on connection counts: {}",
            status.json()
        );
        let human = daemon.cli(&["status"])?;
        ensure!(
            human.contains("b1 load: METRICS UNREADABLE"),
            "status does not say b1's metrics are unreadable:\n{human}"
        );
        let lines = daemon
            .log()
            .lines()
            .filter(|l| l.contains("builder metrics unreadable") && l.contains("\"b1\""))
            .count();
        ensure!(
            lines == 1,
            "the problem should be logged once, it was logged {lines} times:\n{}",
            daemon.log()
        );
        let held = open(&topology.raw_client(), 4)?;
        let counts = tally(held.iter().map(|c| c.served_by()));
        ensure!(
            counts == tally(["b1", "b1", "b2", "b2"].into_iter()),
            "least connections with b1 unmeasured should split 2:2, got {counts:?}"
        );
        drop(held);
        Ok(())
    }

    pub fn unreachable_metrics_leave_the_builder_usable() -> Result<()> {
        // Nothing listens there: every connect is refused.
        unreadable(|_, _| Ok(None), "cannot connect")
    }

    pub fn hanging_metrics_leave_the_builder_usable() -> Result<()> {
        // Accepts and never answers: every scrape runs into scrape_timeout.
        unreadable(
            |ns, addr| FakeServer::start(ns, addr, Fake::Silent).map(Some),
            "no complete response within",
        )
    }

    pub fn garbage_metrics_leave_the_builder_usable() -> Result<()> {
        unreadable(
            |ns, addr| {
                FakeServer::start(ns, addr, Fake::Garbage(b"\x1b[2J\x00garbage\r\n\r\n")).map(Some)
            },
            "invalid HTTP response",
        )
    }

    /// Two yensid instances in two client namespaces share b1 and b2, both with
    /// least-loaded and real exporters on the builders' real /proc (what each
    /// builder's namespace counts as established TCP connections). A loads b1 with 5
    /// sessions; B, seeing them at the builder, sends its next connections to b2. B
    /// then loads b2 with 7; A, although it holds 5 sessions on b1 and none on b2
    /// (least-connections would pick b2), sends its next connection to b1.
    pub fn two_instances_steer_away_from_what_the_other_loaded() -> Result<()> {
        let topology = Topology::new(2)?;
        let second = SecondClient::new(&topology)?;
        let mut exporters = Vec::new();
        let mut urls = Vec::new();
        for name in ["b1", "b2"] {
            let e = NodeExporter::start(
                topology.builder(name).ns(),
                exporter_addr(&topology, name),
                None,
            )?;
            urls.push((name, e.url()));
            exporters.push(e);
        }
        let config =
            DaemonConfig::for_topology(&topology, Dataplane::Kernel, Strategy::LeastLoaded);
        let start =
            |ns: &Netns| Daemon::start_with_file(ns, &|paths| render(&config, paths, &urls, ""));
        let a = start(topology.client_ns())?;
        let b = start(second.ns())?;
        let raw_a = topology.raw_client();
        let raw_b = RawClient::new(second.ns());

        // A puts 5 sessions on b1 (b2 drained on A for this).
        a.drain("b2")?;
        let on_b1 = open(&raw_a, 5)?;
        ensure!(
            on_b1.iter().all(|c| c.served_by() == "b1"),
            "A's sessions should all be on b1 while b2 is drained on A"
        );
        a.undrain("b2")?;
        let established = |s: &Status, builder: &str| -> Result<f64> {
            Ok(measured(s, builder)?
                .and_then(|l| l.get("tcp_established").and_then(Value::as_f64))
                .unwrap_or(0.0))
        };
        b.wait_for_status("B to see A's 5 sessions at b1", WAIT, |s| {
            Ok(established(s, "b1")? >= 5.0)
        })?;
        let explain = b.cli(&["explain"])?;
        ensure!(
            explain.contains("lowest load score") && explain.contains("measured"),
            "B's explain does not show the scores:\n{explain}"
        );
        let from_b = open(&raw_b, 2)?;
        ensure!(
            from_b.iter().all(|c| c.served_by() == "b2"),
            "B sent {:?} although A loads b1 with 5 sessions\n{explain}",
            from_b.iter().map(|c| c.served_by()).collect::<Vec<_>>()
        );

        // B puts 5 more on b2 (b1 drained on B), 7 in all.
        b.drain("b1")?;
        let more_from_b = open(&raw_b, 5)?;
        ensure!(more_from_b.iter().all(|c| c.served_by() == "b2"));
        b.undrain("b1")?;
        a.wait_for_status("A to see B's 7 sessions at b2", WAIT, |s| {
            Ok(established(s, "b2")? >= 7.0)
        })?;
        let next = raw_a.open_ssh(service())?;
        let explain = a.cli(&["explain"])?;
        ensure!(
            next.served_by() == "b1",
            "A sent its next connection to {} although B loads b2 with 7 sessions \
             (A has 5 on b1)\n{explain}",
            next.served_by()
        );
        drop((on_b1, from_b, more_from_b, next, exporters));
        Ok(())
    }

    /// The policy hook's input carries each builder's load as status shows it: b1,
    /// whose controlled procfs says a load of 3 on 2 CPUs, has 1.5 per core and its
    /// `metrics_url`; b2, without one, has `null`.
    pub fn the_policy_hook_sees_each_builders_load() -> Result<()> {
        let topology = Topology::new(2)?;
        let proc = ControlledProc::new(
            ProcInput {
                load1: 3.0,
                ..ProcInput::default()
            },
            STORE_MIB,
        )?;
        let exporter = NodeExporter::start(
            topology.builder("b1").ns(),
            exporter_addr(&topology, "b1"),
            Some(&proc),
        )?;
        let seen = topology.new_file("hook-input");
        let hook = topology.write_script(
            "policy",
            &format!(
                "#!/bin/sh\ncat > {0}.tmp && mv {0}.tmp {0}\n",
                seen.display()
            ),
        )?;
        let mut config =
            DaemonConfig::for_topology(&topology, Dataplane::Kernel, Strategy::LeastLoaded);
        config.policy.command = Some(hook);
        config.policy.hook_interval = Some(Duration::from_millis(200));
        let url = exporter.url();
        let _daemon = Daemon::start_with_file(topology.client_ns(), &|paths| {
            render(&config, paths, &[("b1", url.clone())], "")
        })?;
        let mut last = Value::Null;
        yensid_tests::wait::wait_until("the hook to see b1's load", WAIT, || {
            let Ok(text) = std::fs::read_to_string(&seen) else {
                return Ok(false);
            };
            last = serde_json::from_str(&text).context("the hook's input")?;
            Ok(last
                .pointer("/builders/0/load/load/load_per_core")
                .is_some_and(Value::is_number))
        })?;
        let per_core = last
            .pointer("/builders/0/load/load/load_per_core")
            .and_then(Value::as_f64);
        ensure!(
            per_core == Some(1.5),
            "b1's load per core in the hook's input: {last}"
        );
        ensure!(
            last.pointer("/builders/0/load/metrics_url")
                .and_then(Value::as_str)
                == Some(url.as_str()),
            "b1's metrics_url in the hook's input: {last}"
        );
        ensure!(
            last.pointer("/builders/1/name").and_then(Value::as_str) == Some("b2")
                && last.pointer("/builders/1/load") == Some(&Value::Null),
            "b2 has no metrics_url, so no load: {last}"
        );
        Ok(())
    }
}
