//! The configuration of builder load: where each builder's metrics are
//! scraped (`[builders.<name>] metrics_url`, `store_mountpoint`), how often
//! (`[load] scrape_interval`, `scrape_timeout`) and the thresholds above
//! which a builder takes no new connection (`[load]` for every service, a
//! service's `load = {...}`, a builder's `load = {...}`; the most specific
//! wins, key by key).

use std::{fmt, time::Duration};

use serde::Deserialize;
use toml::Spanned;

use super::{Checker, MAX_CONFIG_DURATION, parse_bounded_duration};

/// `[load] scrape_interval` when absent.
pub const DEFAULT_SCRAPE_INTERVAL: Duration = Duration::from_secs(5);
/// `[load] scrape_timeout` when absent (or the interval, if shorter).
pub const DEFAULT_SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest `metrics_url` accepted.
const MAX_URL_LEN: usize = 1024;
/// The highest `max_load_per_core` accepted: beyond it the rule means
/// nothing.
const MAX_LOAD_PER_CORE: f64 = 1000.0;

/// How often and how long builders' metrics are scraped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScrapeSettings {
    pub interval: Duration,
    /// At most `interval`: one scrape of a builder at a time.
    pub timeout: Duration,
}

impl Default for ScrapeSettings {
    fn default() -> Self {
        Self {
            interval: DEFAULT_SCRAPE_INTERVAL,
            timeout: DEFAULT_SCRAPE_TIMEOUT,
        }
    }
}

/// A builder's metrics source: a node_exporter's `http://host:port/path`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetricsSource {
    /// The URL as configured (for logs and status).
    pub url: String,
    /// `host:port` to connect to: an IP literal (`[v6]` in brackets) or a
    /// host name, resolved at every scrape.
    pub authority: String,
    /// The request target, from the first `/` on (`/` when absent).
    pub path: String,
    /// The mount point whose free space is the store's; `None`: `/nix`
    /// if exported, else `/nix/store`, else `/`.
    pub store_mountpoint: Option<String>,
}

/// A fraction from 0 to 1, or a positive ratio: a finite number, never
/// NaN, so equality is total.
#[derive(Clone, Copy, Debug, PartialEq, PartialOrd)]
pub struct Ratio(pub f64);

impl Eq for Ratio {}

impl fmt::Display for Ratio {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// `min_free_disk`: bytes, or a percentage of the file system's size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskSpace {
    Bytes(u64),
    /// Percent of the file system's size, more than 0 and less than 100.
    Percent(Ratio),
}

impl fmt::Display for DiskSpace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DiskSpace::Bytes(b) => f.write_str(&describe_bytes(*b)),
            DiskSpace::Percent(p) => write!(f, "{}%", p.0),
        }
    }
}

/// Thresholds of builder load: above any (below `min_free_disk`), the
/// builder takes no new connection. `None`: no rule.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoadLimits {
    /// Fraction of time some task waited for a CPU (PSI cpu "some").
    pub max_cpu_pressure: Option<Ratio>,
    /// Fraction of time every task stalled on memory (PSI memory "full").
    pub max_memory_pressure: Option<Ratio>,
    /// Fraction of time every task stalled on IO (PSI io "full").
    pub max_io_pressure: Option<Ratio>,
    /// The 1-minute load average divided by the number of CPUs.
    pub max_load_per_core: Option<Ratio>,
    pub min_free_disk: Option<DiskSpace>,
}

impl LoadLimits {
    /// These limits, each absent one taken from `base`.
    pub fn over(&self, base: &LoadLimits) -> LoadLimits {
        LoadLimits {
            max_cpu_pressure: self.max_cpu_pressure.or(base.max_cpu_pressure),
            max_memory_pressure: self.max_memory_pressure.or(base.max_memory_pressure),
            max_io_pressure: self.max_io_pressure.or(base.max_io_pressure),
            max_load_per_core: self.max_load_per_core.or(base.max_load_per_core),
            min_free_disk: self.min_free_disk.or(base.min_free_disk),
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == LoadLimits::default()
    }
}

pub(super) mod raw {
    use super::*;

    /// `[load]`: scrape settings and the default thresholds of every service.
    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    pub struct Section {
        pub scrape_interval: Option<Spanned<String>>,
        pub scrape_timeout: Option<Spanned<String>>,
        // The keys of `Limits` (serde's flatten cannot deny unknown keys).
        pub max_cpu_pressure: Option<Spanned<f64>>,
        pub max_memory_pressure: Option<Spanned<f64>>,
        pub max_io_pressure: Option<Spanned<f64>>,
        pub max_load_per_core: Option<Spanned<f64>>,
        pub min_free_disk: Option<Spanned<String>>,
    }

    impl Section {
        pub fn limits(self) -> Limits {
            Limits {
                max_cpu_pressure: self.max_cpu_pressure,
                max_memory_pressure: self.max_memory_pressure,
                max_io_pressure: self.max_io_pressure,
                max_load_per_core: self.max_load_per_core,
                min_free_disk: self.min_free_disk,
            }
        }
    }

    /// A service's or builder's `load = {...}`.
    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    pub struct Limits {
        pub max_cpu_pressure: Option<Spanned<f64>>,
        pub max_memory_pressure: Option<Spanned<f64>>,
        pub max_io_pressure: Option<Spanned<f64>>,
        pub max_load_per_core: Option<Spanned<f64>>,
        pub min_free_disk: Option<Spanned<String>>,
    }
}

/// `[load]`'s scrape settings.
pub(super) fn scrape_settings(check: &mut Checker<'_>, raw: &mut raw::Section) -> ScrapeSettings {
    let mut duration = |key: &str, value: Option<Spanned<String>>, default: Duration| match value {
        None => Ok(default),
        Some(v) => match parse_bounded_duration(v.get_ref(), MAX_CONFIG_DURATION) {
            Ok(d) => Ok(d),
            Err(msg) => {
                check.report(format!("load.{key}"), &v, msg);
                Err(default)
            }
        },
    };
    let interval = duration(
        "scrape_interval",
        raw.scrape_interval.take(),
        DEFAULT_SCRAPE_INTERVAL,
    )
    .unwrap_or_else(|d| d);
    let timeout_value = raw.scrape_timeout.take();
    let explicit = timeout_value.is_some();
    let timeout = duration(
        "scrape_timeout",
        timeout_value.clone(),
        DEFAULT_SCRAPE_TIMEOUT.min(interval),
    )
    .unwrap_or_else(|d| d);
    if explicit
        && timeout > interval
        && let Some(v) = &timeout_value
    {
        check.report(
            "load.scrape_timeout",
            v,
            format!(
                "must not be longer than load.scrape_interval ({})",
                super::describe_duration(interval)
            ),
        );
    }
    ScrapeSettings {
        interval,
        timeout: timeout.min(interval),
    }
}

/// Thresholds at `prefix` (`load`, `service[0].load`, `builders.b1.load`).
pub(super) fn limits(check: &mut Checker<'_>, prefix: &str, raw: raw::Limits) -> LoadLimits {
    let mut fraction = |name: &str, value: Option<Spanned<f64>>| {
        let v = value?;
        let x = *v.get_ref();
        if x.is_finite() && x > 0.0 && x <= 1.0 {
            Some(Ratio(x))
        } else {
            check.report(
                format!("{prefix}.{name}"),
                &v,
                "must be a fraction of time above 0 and at most 1 (0.75 is 75%)",
            );
            None
        }
    };
    let max_cpu_pressure = fraction("max_cpu_pressure", raw.max_cpu_pressure);
    let max_memory_pressure = fraction("max_memory_pressure", raw.max_memory_pressure);
    let max_io_pressure = fraction("max_io_pressure", raw.max_io_pressure);
    let max_load_per_core = raw.max_load_per_core.and_then(|v| {
        let x = *v.get_ref();
        if x.is_finite() && x > 0.0 && x <= MAX_LOAD_PER_CORE {
            Some(Ratio(x))
        } else {
            check.report(
                format!("{prefix}.max_load_per_core"),
                &v,
                format!("must be a number above 0 and at most {MAX_LOAD_PER_CORE}"),
            );
            None
        }
    });
    let min_free_disk = raw
        .min_free_disk
        .and_then(|v| match parse_disk_space(v.get_ref()) {
            Ok(d) => Some(d),
            Err(msg) => {
                check.report(format!("{prefix}.min_free_disk"), &v, msg);
                None
            }
        });
    LoadLimits {
        max_cpu_pressure,
        max_memory_pressure,
        max_io_pressure,
        max_load_per_core,
        min_free_disk,
    }
}

/// A builder's `metrics_url` and `store_mountpoint`.
pub(super) fn metrics_source(
    check: &mut Checker<'_>,
    builder: &str,
    url: Option<Spanned<String>>,
    store_mountpoint: Option<Spanned<String>>,
) -> Option<MetricsSource> {
    let mountpoint = store_mountpoint.and_then(|m| {
        let text = m.get_ref();
        if text.starts_with('/') && text.len() <= 4096 && !text.chars().any(char::is_control) {
            Some(m.into_inner())
        } else {
            check.report(
                format!("builders.{builder}.store_mountpoint"),
                &m,
                "must be an absolute path (the mountpoint label node_exporter reports)",
            );
            None
        }
    });
    let url = url?;
    match parse_metrics_url(url.get_ref()) {
        Ok((authority, path)) => Some(MetricsSource {
            url: url.get_ref().clone(),
            authority,
            path,
            store_mountpoint: mountpoint,
        }),
        Err(msg) => {
            check.report(format!("builders.{builder}.metrics_url"), &url, msg);
            None
        }
    }
}

/// `http://host:port/path` into (`host:port`, `/path`). Only plain HTTP:
/// node_exporter serves it, and the scraper speaks nothing else. The port
/// defaults to 80.
pub fn parse_metrics_url(url: &str) -> Result<(String, String), String> {
    if url.len() > MAX_URL_LEN {
        return Err(format!("longer than {MAX_URL_LEN} characters"));
    }
    let Some(rest) = url.strip_prefix("http://") else {
        return Err(format!(
            "`{url}` must start with http:// (e.g. http://198.18.1.2:9100/metrics)"
        ));
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if path.chars().any(|c| !c.is_ascii_graphic() || c == '#') {
        return Err(format!(
            "`{url}`: the path may hold only visible ASCII characters, no fragment"
        ));
    }
    if authority.contains('@') {
        return Err(format!(
            "`{url}`: user names and passwords are not supported"
        ));
    }
    let with_port = if authority.ends_with(']') || !authority.contains(':') {
        format!("{authority}:80")
    } else {
        authority.to_owned()
    };
    super::check_address(&with_port).map_err(|msg| format!("`{url}`: {msg}"))?;
    Ok((with_port, path.to_owned()))
}

/// `"10GiB"`, `"500MB"`, `"1048576"` (bytes) or `"10%"`.
pub fn parse_disk_space(text: &str) -> Result<DiskSpace, String> {
    let bad = || format!("`{text}` is not an amount of disk space (examples: 10GiB, 500MB, 5%)");
    let t = text.trim();
    if let Some(p) = t.strip_suffix('%') {
        let p: f64 = p.trim().parse().map_err(|_| bad())?;
        return if p.is_finite() && p > 0.0 && p < 100.0 {
            Ok(DiskSpace::Percent(Ratio(p)))
        } else {
            Err(format!(
                "`{text}`: a percentage must be above 0 and below 100"
            ))
        };
    }
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    if digits == 0 {
        return Err(bad());
    }
    let value: u64 = t[..digits].parse().map_err(|_| bad())?;
    let unit: u64 = match t[digits..].trim() {
        "" | "B" => 1,
        "kB" | "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        _ => return Err(bad()),
    };
    match value.checked_mul(unit) {
        Some(0) => Err(format!("`{text}` must be more than zero")),
        Some(b) => Ok(DiskSpace::Bytes(b)),
        None => Err(format!("`{text}` is too large")),
    }
}

/// Bytes in the largest binary unit that keeps a readable number.
pub fn describe_bytes(b: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ];
    for (unit, per) in UNITS {
        if b >= per {
            return format!("{:.1}{unit}", b as f64 / per as f64);
        }
    }
    format!("{b}B")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, ConfigError};

    const BASE: &str = "[[service]]\nname = \"a\"\nlisten = [\"127.0.0.22/32\"]\n";

    fn parse(extra: &str) -> Result<Config, Vec<String>> {
        Config::parse(&format!(
            "{BASE}{extra}\n[builders.b1]\naddress = \"198.18.1.2:22\"\n"
        ))
        .map_err(|e| match e {
            ConfigError::Invalid(p) => p.iter().map(ToString::to_string).collect(),
            e => vec![e.to_string()],
        })
    }

    fn parse_builder(builder_keys: &str) -> Result<Config, Vec<String>> {
        Config::parse(&format!(
            "{BASE}\n[builders.b1]\naddress = \"198.18.1.2:22\"\n{builder_keys}\n"
        ))
        .map_err(|e| match e {
            ConfigError::Invalid(p) => p.iter().map(ToString::to_string).collect(),
            e => vec![e.to_string()],
        })
    }

    #[test]
    fn scrape_settings_have_defaults_and_bounds() {
        let c = parse("").unwrap();
        assert_eq!(c.scrape, ScrapeSettings::default());
        let c = parse("[load]\nscrape_interval = \"1s\"").unwrap();
        assert_eq!(c.scrape.interval, Duration::from_secs(1));
        assert_eq!(c.scrape.timeout, Duration::from_secs(1));
        let p = parse("[load]\nscrape_interval = \"0s\"").unwrap_err();
        assert!(
            p[0].contains("load.scrape_interval") && p[0].contains("longer than zero"),
            "{p:?}"
        );
        let p = parse("[load]\nscrape_interval = \"2s\"\nscrape_timeout = \"3s\"").unwrap_err();
        assert!(
            p[0].contains("load.scrape_timeout") && p[0].contains("not be longer"),
            "{p:?}"
        );
        let p = parse("[load]\nscrape_interval = \"2d\"").unwrap_err();
        assert!(p[0].contains("maximum of 1d"), "{p:?}");
    }

    #[test]
    fn thresholds_are_checked_with_their_key() {
        let p = parse(
            "[load]\nmax_cpu_pressure = 1.5\nmax_memory_pressure = 0\nmax_io_pressure = -0.1\nmax_load_per_core = nan\nmin_free_disk = \"10 parsecs\"",
        )
        .unwrap_err();
        assert_eq!(p.len(), 5, "{p:?}");
        for key in [
            "load.max_cpu_pressure",
            "load.max_memory_pressure",
            "load.max_io_pressure",
            "load.max_load_per_core",
            "load.min_free_disk",
        ] {
            assert!(p.iter().any(|m| m.contains(key)), "{key} in {p:?}");
        }
        let p = parse_builder("load = { min_free_disk = \"100%\", bogus = 1 }").unwrap_err();
        assert!(p[0].contains("bogus"), "{p:?}");
        let p = parse_builder("load = { min_free_disk = \"100%\" }").unwrap_err();
        assert!(p[0].contains("builders.b1.load.min_free_disk"), "{p:?}");
    }

    #[test]
    fn builder_limits_win_over_the_services_which_win_over_load() {
        let c = Config::parse(&format!(
            "[load]\nmax_cpu_pressure = 0.5\nmax_load_per_core = 2\n\
             {BASE}load = {{ max_cpu_pressure = 0.6, min_free_disk = \"10GiB\" }}\n\
             [builders.b1]\naddress = \"198.18.1.2:22\"\nload = {{ max_cpu_pressure = 1, max_io_pressure = 0.25 }}\n"
        ))
        .unwrap();
        let svc = &c.services[0].load;
        assert_eq!(svc.max_cpu_pressure, Some(Ratio(0.6)));
        assert_eq!(svc.max_load_per_core, Some(Ratio(2.0)));
        assert_eq!(svc.min_free_disk, Some(DiskSpace::Bytes(10 << 30)));
        let b = c.builder("b1").unwrap().load.over(svc);
        assert_eq!(b.max_cpu_pressure, Some(Ratio(1.0)));
        assert_eq!(b.max_io_pressure, Some(Ratio(0.25)));
        assert_eq!(b.max_load_per_core, Some(Ratio(2.0)));
        assert_eq!(b.max_memory_pressure, None);
    }

    #[test]
    fn metrics_urls_are_plain_http_with_a_host_and_port() {
        assert_eq!(
            parse_metrics_url("http://198.18.1.2:9100/metrics").unwrap(),
            ("198.18.1.2:9100".into(), "/metrics".into())
        );
        assert_eq!(
            parse_metrics_url("http://[fd00::2]/m?x=1").unwrap(),
            ("[fd00::2]:80".into(), "/m?x=1".into())
        );
        assert_eq!(
            parse_metrics_url("http://builder-1.example:9100").unwrap(),
            ("builder-1.example:9100".into(), "/".into())
        );
        for bad in [
            "https://198.18.1.2:9100/metrics",
            "http://user:pw@198.18.1.2/",
            "http://198.18.1.2:0/",
            "http://bad host/",
            "http://198.18.1.2/a b",
            "http:///metrics",
        ] {
            assert!(parse_metrics_url(bad).is_err(), "{bad}");
        }
        let p = parse_builder("metrics_url = \"ftp://x/\"").unwrap_err();
        assert!(p[0].contains("builders.b1.metrics_url"), "{p:?}");
        let p = parse_builder(
            "metrics_url = \"http://198.18.1.2:9100/metrics\"\nstore_mountpoint = \"nix\"",
        )
        .unwrap_err();
        assert!(p[0].contains("builders.b1.store_mountpoint"), "{p:?}");
        let c = parse_builder(
            "metrics_url = \"http://198.18.1.2:9100/metrics\"\nstore_mountpoint = \"/srv/nix\"",
        )
        .unwrap();
        let m = c.builder("b1").unwrap().metrics.clone().unwrap();
        assert_eq!(m.authority, "198.18.1.2:9100");
        assert_eq!(m.store_mountpoint.as_deref(), Some("/srv/nix"));
    }

    #[test]
    fn disk_space_takes_units_and_percentages() {
        assert_eq!(parse_disk_space("10GiB"), Ok(DiskSpace::Bytes(10 << 30)));
        assert_eq!(parse_disk_space("500MB"), Ok(DiskSpace::Bytes(500_000_000)));
        assert_eq!(parse_disk_space("4096"), Ok(DiskSpace::Bytes(4096)));
        assert_eq!(
            parse_disk_space("12.5%"),
            Ok(DiskSpace::Percent(Ratio(12.5)))
        );
        for bad in [
            "",
            "GiB",
            "0",
            "0%",
            "100%",
            "-1GiB",
            "99999999999TiB",
            "1.5GiB",
            "10 XB",
        ] {
            assert!(parse_disk_space(bad).is_err(), "{bad}");
        }
        assert_eq!(describe_bytes(10 << 30), "10.0GiB");
    }
}
