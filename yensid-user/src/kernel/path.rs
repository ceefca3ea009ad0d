//! The kernel's measurements of the path to each builder (the `observe`
//! program's `PATH_STATS`), as the daemon uses them: shown in status and
//! metrics, and the round-trip time `max_rtt_ms` compares.
//!
//! Why two RTT sources: the kernel measures TCP's smoothed RTT on the
//! builder connections that carry builds, so it sees a path that is
//! congested *now*; but it only has samples while connections carry data.
//! A kernel sample counts while it is fresh ([`KERNEL_RTT_FRESH`]); after
//! that the health probes' RTT (one connect and an identification line,
//! every probe interval) decides again.

use std::time::Duration;

use yensid_ebpf::maps::PathStats;

/// How long a kernel RTT sample stands for the path.
pub const KERNEL_RTT_FRESH: Duration = Duration::from_secs(30);

/// Where a round-trip time comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum RttSource {
    /// TCP's smoothed RTT on the daemon's connections to the builder.
    Kernel,
    /// The health probe's connect-to-identification-line time.
    Probe,
}

impl std::fmt::Display for RttSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RttSource::Kernel => "kernel",
            RttSource::Probe => "probe",
        })
    }
}

/// A builder's round-trip time and its source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rtt {
    pub value: Duration,
    pub source: RttSource,
}

impl Rtt {
    /// A fresh kernel sample wins over the probe's.
    pub fn pick(kernel: Option<Duration>, probe: Option<Duration>) -> Option<Rtt> {
        match (kernel, probe) {
            (Some(value), _) => Some(Rtt {
                value,
                source: RttSource::Kernel,
            }),
            (None, Some(value)) => Some(Rtt {
                value,
                source: RttSource::Probe,
            }),
            (None, None) => None,
        }
    }
}

/// One builder's kernel measurements, counted from when this daemon took
/// its index over (a crashed daemon may have left counts in the pinned
/// map, possibly for another builder).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PathTracker {
    baseline: PathStats,
    adopted_boot_ns: u64,
    latest: PathStats,
}

impl PathTracker {
    pub fn adopt(stats: PathStats, now_boot_ns: u64) -> Self {
        Self {
            baseline: stats,
            adopted_boot_ns: now_boot_ns,
            latest: stats,
        }
    }

    pub fn update(&mut self, stats: PathStats) {
        self.latest = stats;
    }

    /// The latest RTT sample this daemon's connections gave, if any.
    pub fn rtt(&self) -> Option<Duration> {
        (self.latest.sampled_boot_ns > self.adopted_boot_ns)
            .then(|| Duration::from_micros(self.latest.srtt_us as u64))
    }

    /// [`Self::rtt`], if it is recent enough to stand for the path.
    pub fn fresh_rtt(&self, now_boot_ns: u64) -> Option<Duration> {
        let age = now_boot_ns.saturating_sub(self.latest.sampled_boot_ns);
        self.rtt()
            .filter(|_| Duration::from_nanos(age) <= KERNEL_RTT_FRESH)
    }

    pub fn samples(&self) -> u64 {
        self.latest.samples.wrapping_sub(self.baseline.samples)
    }

    pub fn retransmits(&self) -> u64 {
        self.latest
            .retransmits
            .wrapping_sub(self.baseline.retransmits)
    }
}

/// CLOCK_BOOTTIME in nanoseconds: the clock `bpf_ktime_get_boot_ns` reads.
pub fn boottime_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = 1_000_000_000;

    fn stats(srtt_us: u32, sampled_boot_ns: u64, samples: u64, retransmits: u64) -> PathStats {
        PathStats {
            srtt_us,
            _reserved: 0,
            sampled_boot_ns,
            samples,
            retransmits,
        }
    }

    #[test]
    fn counts_start_at_adoption_and_older_samples_are_not_this_daemons() {
        let mut t = PathTracker::adopt(stats(900, 50 * SECOND, 40, 7), 100 * SECOND);
        assert_eq!(t.rtt(), None, "a sample from before adoption");
        assert_eq!((t.samples(), t.retransmits()), (0, 0));
        t.update(stats(1500, 101 * SECOND, 45, 9));
        assert_eq!(t.rtt(), Some(Duration::from_micros(1500)));
        assert_eq!((t.samples(), t.retransmits()), (5, 2));
    }

    #[test]
    fn a_sample_is_fresh_for_its_window_only() {
        let mut t = PathTracker::adopt(PathStats::default(), SECOND);
        t.update(stats(2000, 10 * SECOND, 1, 0));
        let window = KERNEL_RTT_FRESH.as_nanos() as u64;
        assert_eq!(
            t.fresh_rtt(10 * SECOND + window),
            Some(Duration::from_millis(2))
        );
        assert_eq!(t.fresh_rtt(10 * SECOND + window + 1), None);
        assert_eq!(t.rtt(), Some(Duration::from_millis(2)), "still shown");
    }

    #[test]
    fn a_fresh_kernel_rtt_wins_over_the_probes() {
        let ms = Duration::from_millis;
        assert_eq!(
            Rtt::pick(Some(ms(80)), Some(ms(1))),
            Some(Rtt {
                value: ms(80),
                source: RttSource::Kernel
            })
        );
        assert_eq!(
            Rtt::pick(None, Some(ms(1))),
            Some(Rtt {
                value: ms(1),
                source: RttSource::Probe
            })
        );
        assert_eq!(Rtt::pick(None, None), None);
    }

    #[test]
    fn counters_survive_wrapping() {
        let mut t = PathTracker::adopt(stats(0, 0, u64::MAX, u64::MAX - 1), 0);
        t.update(stats(0, 0, 2, 1));
        assert_eq!((t.samples(), t.retransmits()), (3, 3));
    }
}
