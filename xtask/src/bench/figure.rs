//! The numbers of the report: what each one is, its unit, and which way is
//! better.

use std::time::Duration;

use super::protocol::Mode;

/// One number of the report, measured for each contender.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Figure {
    /// Aggregate GB/s of `streams` parallel transfers.
    Throughput { mode: Mode, streams: usize },
    /// CPU seconds of the whole machine per GiB forwarded, over the same
    /// transfers.
    CpuPerGib { mode: Mode, streams: usize },
    /// Microseconds from connect to the builder's identification line.
    BannerLatency { percentile: usize },
    /// Microseconds from connect until a refused client knows it: the
    /// connect fails, or the connection is closed.
    RefusalLatency { percentile: usize },
    /// Connections per second (each with the SSH opening) from concurrent
    /// clients.
    ConnectionRate,
    /// Microseconds of the middlebox process's own CPU (user and system,
    /// every thread) per connection of the rate run: unlike the rate, it
    /// hardly depends on what else keeps the machine busy.
    ConnectionCpu,
    /// Resident memory of the middlebox with the idle sessions open, MiB.
    IdleRss,
    /// Seconds one `nix-build` of uncached derivations takes on the builders.
    NixBuilds,
}

/// Which way a figure is better.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Better {
    Higher,
    Lower,
}

pub const PERCENTILES: [usize; 2] = [50, 99];

impl Figure {
    /// Every figure, in the report's order; `streams` is the multi-stream count.
    pub fn all(streams: usize) -> Vec<Self> {
        let mut stream_counts = vec![1, streams];
        stream_counts.dedup();
        let transfers: Vec<(Mode, usize)> = [Mode::Upload, Mode::Download]
            .into_iter()
            .flat_map(|mode| stream_counts.iter().map(move |&streams| (mode, streams)))
            .collect();
        let mut figures: Vec<Self> = transfers
            .iter()
            .map(|&(mode, streams)| Self::Throughput { mode, streams })
            .collect();
        figures.extend(
            transfers
                .iter()
                .map(|&(mode, streams)| Self::CpuPerGib { mode, streams }),
        );
        figures.extend(PERCENTILES.map(|percentile| Self::BannerLatency { percentile }));
        figures.extend(PERCENTILES.map(|percentile| Self::RefusalLatency { percentile }));
        figures.push(Self::ConnectionRate);
        figures.push(Self::ConnectionCpu);
        figures.push(Self::IdleRss);
        figures.push(Self::NixBuilds);
        figures
    }

    /// The `--only` section that measures it.
    pub fn section(self) -> &'static str {
        match self {
            Self::Throughput { .. } | Self::CpuPerGib { .. } => "throughput",
            Self::BannerLatency { .. } => "banner",
            Self::RefusalLatency { .. } => "refusal",
            Self::ConnectionRate | Self::ConnectionCpu => "rate",
            Self::IdleRss => "memory",
            Self::NixBuilds => "nix",
        }
    }

    pub fn label(self) -> String {
        match self {
            Self::Throughput { mode, streams } => transfer_label(mode, streams),
            Self::CpuPerGib { mode, streams } => {
                format!("CPU per GiB, {}", transfer_label(mode, streams))
            }
            Self::BannerLatency { percentile } => format!("connect to banner, p{percentile}"),
            Self::RefusalLatency { percentile } => format!("refusal, p{percentile}"),
            Self::ConnectionRate => "connection rate".to_owned(),
            Self::ConnectionCpu => "middlebox CPU per connection".to_owned(),
            Self::IdleRss => "RSS with idle connections".to_owned(),
            Self::NixBuilds => "uncached Nix builds, wall time".to_owned(),
        }
    }

    /// Its name in the JSON.
    pub fn key(self) -> String {
        match self {
            Self::Throughput { mode, streams } => transfer_key(mode, streams),
            Self::CpuPerGib { mode, streams } => {
                format!("cpu_per_gib_{}", transfer_key(mode, streams))
            }
            Self::BannerLatency { percentile } => format!("banner_latency_p{percentile}"),
            Self::RefusalLatency { percentile } => format!("refusal_latency_p{percentile}"),
            Self::ConnectionRate => "connection_rate".to_owned(),
            Self::ConnectionCpu => "middlebox_cpu_per_connection".to_owned(),
            Self::IdleRss => "idle_rss".to_owned(),
            Self::NixBuilds => "nix_builds".to_owned(),
        }
    }

    pub fn unit(self) -> &'static str {
        match self {
            Self::Throughput { .. } => "GB/s",
            Self::CpuPerGib { .. } => "CPU s/GiB",
            Self::BannerLatency { .. } | Self::RefusalLatency { .. } | Self::ConnectionCpu => "µs",
            Self::ConnectionRate => "conn/s",
            Self::IdleRss => "MiB",
            Self::NixBuilds => "s",
        }
    }

    pub fn better(self) -> Better {
        match self {
            Self::Throughput { .. } | Self::ConnectionRate => Better::Higher,
            _ => Better::Lower,
        }
    }

    pub fn format(self, value: f64) -> String {
        match self {
            Self::Throughput { .. } | Self::CpuPerGib { .. } => format!("{value:.2}"),
            Self::IdleRss | Self::NixBuilds => format!("{value:.1}"),
            _ => format!("{value:.0}"),
        }
    }
}

fn transfer_label(mode: Mode, streams: usize) -> String {
    let plural = if streams == 1 { "" } else { "s" };
    format!("{}, {streams} stream{plural}", mode.name())
}

fn transfer_key(mode: Mode, streams: usize) -> String {
    let plural = if streams == 1 { "" } else { "s" };
    format!("{}_{streams}_stream{plural}", mode.name())
}

/// One contender's value of one figure.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Measured(f64),
    /// Could not be measured: why.
    Failed(String),
    /// Means nothing for this contender (a direct connection refuses
    /// nothing and has no process in between).
    NotApplicable,
}

impl Value {
    pub fn measured(&self) -> Option<f64> {
        match self {
            Self::Measured(v) => Some(*v),
            _ => None,
        }
    }

    pub fn from_result(result: Result<f64, String>) -> Self {
        result.map_or_else(Self::Failed, Self::Measured)
    }
}

/// Nearest-rank percentile of sorted, non-empty `samples`.
pub fn percentile_of(samples: &[Duration], percentile: usize) -> Duration {
    let rank = (percentile * samples.len()).div_ceil(100);
    samples[rank.saturating_sub(1)]
}

/// [`percentile_of`] in microseconds.
pub fn percentile_micros(samples: &[Duration], percentile: usize) -> f64 {
    percentile_of(samples, percentile).as_secs_f64() * 1e6
}

/// The middle sample (of an even count, the mean of the middle two).
pub fn median(samples: &[f64]) -> Option<f64> {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
    }

    fn micros(values: &[u64]) -> Vec<Duration> {
        values.iter().map(|&v| Duration::from_micros(v)).collect()
    }

    #[test]
    fn nearest_rank_percentiles() {
        let samples = micros(&(1..=100).collect::<Vec<_>>());
        assert_eq!(percentile_of(&samples, 50), Duration::from_micros(50));
        assert_eq!(percentile_of(&samples, 99), Duration::from_micros(99));
        assert_eq!(percentile_of(&samples, 100), Duration::from_micros(100));
        // 2000 samples: p99 is the 1980th, so the 20 slowest are above it.
        let samples = micros(&(1..=2000).collect::<Vec<_>>());
        assert_eq!(percentile_of(&samples, 99), Duration::from_micros(1980));
    }

    #[test]
    fn percentiles_of_few_samples() {
        let one = micros(&[7]);
        assert_eq!(percentile_of(&one, 50), Duration::from_micros(7));
        assert_eq!(percentile_of(&one, 99), Duration::from_micros(7));
        let three = micros(&[1, 2, 30]);
        assert_eq!(percentile_of(&three, 50), Duration::from_micros(2));
        assert_eq!(percentile_of(&three, 99), Duration::from_micros(30));
        assert_eq!(percentile_micros(&three, 50), 2.0);
    }

    #[test]
    fn every_figure_has_its_own_key() {
        let figures = Figure::all(8);
        let mut keys: Vec<String> = figures.iter().map(|f| f.key()).collect();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), figures.len());
        assert_eq!(Figure::all(1).len(), figures.len() - 4);
    }
}
