//! Builder load from node_exporter metrics, as pure functions: one scrape
//! into a [`Sample`], two samples into a [`Load`] (counters become the
//! fraction of the interval spent stalled), a load against the thresholds
//! ([`overload`]) and into `least-loaded`'s measured cost ([`load_cost`]).
//! The scraping itself is in [`crate::decide::scrape`].

use std::time::Duration;

use serde::{Deserialize, Serialize};
use yensid_ebpf::select::LOAD_UNIT;

use crate::config::load::{DiskSpace, LoadLimits, describe_bytes};

/// Mount points whose free space is the store's, in order of preference,
/// when the builder names none.
pub const STORE_MOUNTPOINTS: [&str; 3] = ["/nix", "/nix/store", "/"];

/// The cap of a measured cost: far above any real load, and far enough
/// below `u32::MAX` that the kernel's score cannot overflow.
const MAX_COST: u32 = 1 << 30;

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum SampleError {
    #[error("no node_exporter metric in the response (not Prometheus text format?)")]
    NoMetrics,
}

/// What one scrape of a node_exporter says. Counters are cumulative
/// seconds; `None`: not exported (an older kernel has no PSI, a collector
/// may be off).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sample {
    pub cpu_waiting: Option<f64>,
    pub memory_waiting: Option<f64>,
    pub memory_stalled: Option<f64>,
    pub io_waiting: Option<f64>,
    pub io_stalled: Option<f64>,
    pub load1: Option<f64>,
    /// Distinct `cpu` labels of `node_cpu_seconds_total{mode="idle"}`.
    pub cores: Option<u32>,
    pub memory_available: Option<f64>,
    pub disk: Option<Disk>,
    /// `node_netstat_Tcp_CurrEstab`: established TCP connections of the
    /// builder, from every client.
    pub tcp_established: Option<f64>,
}

/// Free space of the store's file system.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Disk {
    pub mountpoint: String,
    pub available_bytes: f64,
    /// `None` when `node_filesystem_size_bytes` is missing.
    pub size_bytes: Option<f64>,
}

impl Sample {
    /// Reads the metrics of a node_exporter response body (Prometheus
    /// text format, parsed by `prometheus-parse`). The store's file system
    /// is `store_mountpoint`, else the first of [`STORE_MOUNTPOINTS`] that
    /// is exported. A body with none of the metrics used is an error.
    pub fn parse(body: &str, store_mountpoint: Option<&str>) -> Result<Sample, SampleError> {
        let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned())))
            .map_err(|_| SampleError::NoMetrics)?;
        let mut s = Sample::default();
        let mut cpus = std::collections::BTreeSet::new();
        let mut avail: Vec<(String, f64)> = Vec::new();
        let mut size: Vec<(String, f64)> = Vec::new();
        let mut any = false;
        for sample in &scrape.samples {
            let value = match sample.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => continue,
            };
            if !value.is_finite() {
                continue;
            }
            let slot = match sample.metric.as_str() {
                "node_pressure_cpu_waiting_seconds_total" => &mut s.cpu_waiting,
                "node_pressure_memory_waiting_seconds_total" => &mut s.memory_waiting,
                "node_pressure_memory_stalled_seconds_total" => &mut s.memory_stalled,
                "node_pressure_io_waiting_seconds_total" => &mut s.io_waiting,
                "node_pressure_io_stalled_seconds_total" => &mut s.io_stalled,
                "node_load1" => &mut s.load1,
                "node_memory_MemAvailable_bytes" => &mut s.memory_available,
                "node_netstat_Tcp_CurrEstab" => &mut s.tcp_established,
                "node_cpu_seconds_total" => {
                    if sample.labels.get("mode") == Some("idle")
                        && let Some(cpu) = sample.labels.get("cpu")
                    {
                        cpus.insert(cpu.to_owned());
                        any = true;
                    }
                    continue;
                }
                name @ ("node_filesystem_avail_bytes" | "node_filesystem_size_bytes") => {
                    if let Some(m) = sample.labels.get("mountpoint") {
                        let list = if name.ends_with("avail_bytes") {
                            &mut avail
                        } else {
                            &mut size
                        };
                        list.push((m.to_owned(), value));
                        any = true;
                    }
                    continue;
                }
                _ => continue,
            };
            *slot = Some(value);
            any = true;
        }
        if !any {
            return Err(SampleError::NoMetrics);
        }
        if !cpus.is_empty() {
            s.cores = u32::try_from(cpus.len()).ok();
        }
        let wanted: Vec<&str> = match store_mountpoint {
            Some(m) => vec![m],
            None => STORE_MOUNTPOINTS.to_vec(),
        };
        s.disk = wanted.iter().find_map(|want| {
            let (_, available) = avail.iter().find(|(m, _)| m == want)?;
            Some(Disk {
                mountpoint: (*want).to_owned(),
                available_bytes: *available,
                size_bytes: size.iter().find(|(m, _)| m == want).map(|(_, v)| *v),
            })
        });
        Ok(s)
    }
}

/// A builder's load as decisions see it: the stalled fractions over the
/// interval between two samples (PSI "some": some task waited; "full":
/// all did), and the latest sample's gauges.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Load {
    pub cpu_pressure: Option<f64>,
    pub memory_pressure_some: Option<f64>,
    /// What `max_memory_pressure` compares (as Hydra's queue runner does).
    pub memory_pressure: Option<f64>,
    pub io_pressure_some: Option<f64>,
    /// What `max_io_pressure` compares.
    pub io_pressure: Option<f64>,
    pub load_per_core: Option<f64>,
    pub cores: Option<u32>,
    pub memory_available_bytes: Option<f64>,
    pub disk: Option<Disk>,
    pub tcp_established: Option<f64>,
}

impl Load {
    /// The load at `current`, with pressures as rates since `previous`,
    /// taken `elapsed` earlier. Without a previous sample, or when a
    /// counter went backwards (the exporter or the builder restarted),
    /// that pressure is unknown until the next sample.
    pub fn between(previous: Option<&Sample>, current: &Sample, elapsed: Duration) -> Load {
        let secs = elapsed.as_secs_f64();
        let rate = |get: fn(&Sample) -> Option<f64>| {
            let (before, now) = (get(previous?)?, get(current)?);
            (secs > 0.0 && now >= before).then(|| ((now - before) / secs).clamp(0.0, 1.0))
        };
        Load {
            cpu_pressure: rate(|s| s.cpu_waiting),
            memory_pressure_some: rate(|s| s.memory_waiting),
            memory_pressure: rate(|s| s.memory_stalled),
            io_pressure_some: rate(|s| s.io_waiting),
            io_pressure: rate(|s| s.io_stalled),
            load_per_core: match (current.load1, current.cores) {
                (Some(l), Some(c)) if c > 0 => Some(l.max(0.0) / c as f64),
                _ => None,
            },
            cores: current.cores,
            memory_available_bytes: current.memory_available,
            disk: current.disk.clone(),
            tcp_established: current.tcp_established,
        }
    }
}

/// A threshold a builder is past: which metric, its value and the limit,
/// in words for the log, `explain` and status.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Overload {
    /// The configuration key: `max_cpu_pressure`, ..., `min_free_disk`.
    pub key: &'static str,
    pub value: String,
    pub limit: String,
}

impl std::fmt::Display for Overload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let relation = if self.key == "min_free_disk" {
            "below"
        } else {
            "above"
        };
        let what = match self.key {
            "max_cpu_pressure" => "cpu pressure",
            "max_memory_pressure" => "memory pressure",
            "max_io_pressure" => "io pressure",
            "max_load_per_core" => "load per core",
            _ => "free disk",
        };
        write!(
            f,
            "{what} {} is {relation} {} {}",
            self.value, self.key, self.limit
        )
    }
}

/// The first threshold `load` is past, if any. A metric that is not
/// measured passes its rule: an unmeasured builder is judged on
/// connection counts alone.
pub fn overload(load: &Load, limits: &LoadLimits) -> Option<Overload> {
    let percent = |x: f64| format!("{:.1}%", x * 100.0);
    if let (Some(min), Some(disk)) = (limits.min_free_disk, &load.disk) {
        let below = match min {
            DiskSpace::Bytes(b) => disk.available_bytes < b as f64,
            DiskSpace::Percent(p) => disk
                .size_bytes
                .is_some_and(|size| size > 0.0 && disk.available_bytes * 100.0 / size < p.0),
        };
        if below {
            let value = match (min, disk.size_bytes) {
                (DiskSpace::Percent(_), Some(size)) => {
                    format!("{:.1}%", disk.available_bytes * 100.0 / size)
                }
                _ => describe_bytes(disk.available_bytes.max(0.0) as u64),
            };
            return Some(Overload {
                key: "min_free_disk",
                value: format!("{value} on {}", disk.mountpoint),
                limit: min.to_string(),
            });
        }
    }
    let fractions = [
        (
            "max_memory_pressure",
            load.memory_pressure,
            limits.max_memory_pressure,
        ),
        (
            "max_cpu_pressure",
            load.cpu_pressure,
            limits.max_cpu_pressure,
        ),
        ("max_io_pressure", load.io_pressure, limits.max_io_pressure),
    ];
    for (key, value, limit) in fractions {
        if let (Some(v), Some(max)) = (value, limit)
            && v > max.0
        {
            return Some(Overload {
                key,
                value: percent(v),
                limit: percent(max.0),
            });
        }
    }
    if let (Some(v), Some(max)) = (load.load_per_core, limits.max_load_per_core)
        && v > max.0
    {
        return Some(Overload {
            key: "max_load_per_core",
            value: format!("{v:.2}"),
            limit: format!("{:.2}", max.0),
        });
    }
    None
}

/// Established connections on the builder that are not this daemon's:
/// `node_netstat_Tcp_CurrEstab` less this daemon's open connections to it
/// when the sample was taken, less one for the scrape's own connection.
pub fn other_connections(load: &Load, own_at_sample: u64) -> Option<f64> {
    load.tcp_established
        .map(|e| (e - own_at_sample as f64 - 1.0).max(0.0))
}

/// `least-loaded`'s measured part of a builder's score, in
/// [`LOAD_UNIT`]s (one open connection per unit of weight):
///
/// `others / weight + load_per_core + cpu_pressure`
///
/// where `others` are [`other_connections`] (every other client's
/// sessions, seen at the builder), `load_per_core` the 1-minute load
/// average per CPU and `cpu_pressure` the fraction of the interval some
/// task waited for a CPU (0 to 1). The kernel adds this daemon's own open
/// connections, plus the new one, per unit of weight, counted live at every
/// SYN, so that a burst of new connections does not all land on the builder
/// that was idle at the last sample (`select::load_score`). Unmeasured
/// terms count 0.
pub fn load_cost(load: &Load, own_at_sample: u64, weight: u32) -> u32 {
    let weight = weight.max(1) as f64;
    let others = other_connections(load, own_at_sample).unwrap_or(0.0);
    let score =
        others / weight + load.load_per_core.unwrap_or(0.0) + load.cpu_pressure.unwrap_or(0.0);
    let cost = score * LOAD_UNIT as f64;
    if cost.is_finite() && cost > 0.0 {
        cost.min(MAX_COST as f64) as u32
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load::Ratio;

    /// A node_exporter 1.5 response, trimmed to what is read plus noise.
    fn exporter(cpu_waiting: f64, memory_stalled: f64, load1: f64, nix_avail: f64) -> String {
        format!(
            "# HELP node_cpu_seconds_total Seconds the CPUs spent in each mode.\n\
             # TYPE node_cpu_seconds_total counter\n\
             node_cpu_seconds_total{{cpu=\"0\",mode=\"idle\"}} 1000.5\n\
             node_cpu_seconds_total{{cpu=\"0\",mode=\"user\"}} 10\n\
             node_cpu_seconds_total{{cpu=\"1\",mode=\"idle\"}} 998\n\
             node_cpu_seconds_total{{cpu=\"2\",mode=\"idle\"}} 997\n\
             node_cpu_seconds_total{{cpu=\"3\",mode=\"idle\"}} 996\n\
             # TYPE node_filesystem_avail_bytes gauge\n\
             node_filesystem_avail_bytes{{device=\"tmpfs\",fstype=\"tmpfs\",mountpoint=\"/\"}} 5e+10\n\
             node_filesystem_avail_bytes{{device=\"tmpfs\",fstype=\"tmpfs\",mountpoint=\"/nix\"}} {nix_avail}\n\
             node_filesystem_size_bytes{{device=\"tmpfs\",fstype=\"tmpfs\",mountpoint=\"/nix\"}} 1e+09\n\
             # TYPE node_load1 gauge\n\
             node_load1 {load1}\n\
             node_memory_MemAvailable_bytes 8.589934592e+09\n\
             node_netstat_Tcp_CurrEstab 7\n\
             node_pressure_cpu_waiting_seconds_total {cpu_waiting}\n\
             node_pressure_io_stalled_seconds_total 1.5\n\
             node_pressure_io_waiting_seconds_total 2\n\
             node_pressure_memory_stalled_seconds_total {memory_stalled}\n\
             node_pressure_memory_waiting_seconds_total 3\n\
             node_scrape_collector_success{{collector=\"cpu\"}} 1\n"
        )
    }

    #[test]
    fn a_node_exporter_response_gives_every_metric() {
        let s = Sample::parse(&exporter(10.0, 1.0, 6.0, 2e8), None).unwrap();
        assert_eq!(s.cores, Some(4));
        assert_eq!(s.load1, Some(6.0));
        assert_eq!(s.cpu_waiting, Some(10.0));
        assert_eq!(s.memory_stalled, Some(1.0));
        assert_eq!(s.memory_waiting, Some(3.0));
        assert_eq!(s.io_stalled, Some(1.5));
        assert_eq!(s.io_waiting, Some(2.0));
        assert_eq!(s.memory_available, Some(8_589_934_592.0));
        assert_eq!(s.tcp_established, Some(7.0));
        let disk = s.disk.unwrap();
        assert_eq!(disk.mountpoint, "/nix");
        assert_eq!(disk.available_bytes, 2e8);
        assert_eq!(disk.size_bytes, Some(1e9));
    }

    #[test]
    fn the_store_mountpoint_falls_back_and_can_be_named() {
        let body =
            exporter(0.0, 0.0, 0.0, 1.0).replace("mountpoint=\"/nix\"", "mountpoint=\"/srv\"");
        let s = Sample::parse(&body, None).unwrap();
        assert_eq!(s.disk.as_ref().unwrap().mountpoint, "/");
        let s = Sample::parse(&body, Some("/srv")).unwrap();
        assert_eq!(s.disk.as_ref().unwrap().available_bytes, 1.0);
        let s = Sample::parse(&body, Some("/elsewhere")).unwrap();
        assert_eq!(s.disk, None);
    }

    #[test]
    fn garbage_is_an_error_not_an_empty_load() {
        for body in [
            "",
            "<html>hello</html>",
            "\u{1b}[2J\0\0\0",
            "node_load1 not-a-number\n",
            "other_metric 1\n",
        ] {
            assert_eq!(
                Sample::parse(body, None),
                Err(SampleError::NoMetrics),
                "{body:?}"
            );
        }
    }

    #[test]
    fn pressures_are_counter_rates_over_the_interval() {
        let a = Sample::parse(&exporter(10.0, 1.0, 2.0, 2e8), None).unwrap();
        let b = Sample::parse(&exporter(14.0, 1.5, 2.0, 2e8), None).unwrap();
        let load = Load::between(Some(&a), &b, Duration::from_secs(5));
        assert_eq!(load.cpu_pressure, Some(0.8));
        assert_eq!(load.memory_pressure, Some(0.1));
        assert_eq!(load.io_pressure, Some(0.0));
        assert_eq!(load.load_per_core, Some(0.5));
        // No previous sample, a counter reset, or no time: unknown.
        assert_eq!(
            Load::between(None, &b, Duration::from_secs(5)).cpu_pressure,
            None
        );
        assert_eq!(
            Load::between(Some(&b), &a, Duration::from_secs(5)).cpu_pressure,
            None
        );
        assert_eq!(
            Load::between(Some(&a), &b, Duration::ZERO).cpu_pressure,
            None
        );
        // More stalled seconds than seconds passed (clock skew): at most 1.
        let c = Sample::parse(&exporter(100.0, 1.0, 2.0, 2e8), None).unwrap();
        assert_eq!(
            Load::between(Some(&a), &c, Duration::from_secs(5)).cpu_pressure,
            Some(1.0)
        );
    }

    #[test]
    fn thresholds_name_the_metric_and_its_value() {
        let load = Load {
            cpu_pressure: Some(0.8),
            memory_pressure: Some(0.1),
            load_per_core: Some(3.0),
            disk: Some(Disk {
                mountpoint: "/nix".into(),
                available_bytes: 5e8,
                size_bytes: Some(1e9),
            }),
            ..Load::default()
        };
        let mut limits = LoadLimits::default();
        assert_eq!(overload(&load, &limits), None);
        limits.max_load_per_core = Some(Ratio(2.0));
        assert_eq!(
            overload(&load, &limits).unwrap().to_string(),
            "load per core 3.00 is above max_load_per_core 2.00"
        );
        limits.max_cpu_pressure = Some(Ratio(0.75));
        assert_eq!(
            overload(&load, &limits).unwrap().to_string(),
            "cpu pressure 80.0% is above max_cpu_pressure 75.0%"
        );
        limits.min_free_disk = Some(DiskSpace::Percent(Ratio(60.0)));
        assert_eq!(
            overload(&load, &limits).unwrap().to_string(),
            "free disk 50.0% on /nix is below min_free_disk 60%"
        );
        limits.min_free_disk = Some(DiskSpace::Bytes(1 << 30));
        assert_eq!(overload(&load, &limits).unwrap().key, "min_free_disk");
        limits.min_free_disk = Some(DiskSpace::Bytes(1 << 20));
        limits.max_memory_pressure = Some(Ratio(0.05));
        assert_eq!(overload(&load, &limits).unwrap().key, "max_memory_pressure");
        // Unmeasured metrics pass their rules.
        assert_eq!(overload(&Load::default(), &limits), None);
    }

    #[test]
    fn the_cost_counts_other_clients_load_and_pressure() {
        let load = Load {
            tcp_established: Some(6.0),
            load_per_core: Some(0.5),
            cpu_pressure: Some(0.25),
            ..Load::default()
        };
        // 6 established, 2 of them this daemon's, 1 the scrape: 3 others.
        assert_eq!(other_connections(&load, 2), Some(3.0));
        assert_eq!(load_cost(&load, 2, 1), 3840);
        assert_eq!(load_cost(&load, 2, 3), 1024 + 768);
        assert_eq!(load_cost(&Load::default(), 0, 1), 0);
        let huge = Load {
            tcp_established: Some(1e300),
            ..Load::default()
        };
        assert_eq!(load_cost(&huge, 0, 1), MAX_COST);
    }
}
