//! The kernel's measurements of the path to each builder (the `observe`
//! program's `PATH_STATS`, and the RTT the local path's `account` program
//! samples in `LOCAL_STATS`), as the daemon uses them: shown in status and
//! metrics, and the round-trip time `max_rtt_ms` compares.
//!
//! Why two RTT sources: the kernel measures TCP's smoothed RTT on the
//! builder connections that carry builds (the daemon's, all along; local
//! clients' direct ones, at their handshake and close), so it sees a path
//! that is congested *now*; but it only has samples while connections
//! carry data.
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
    /// TCP's smoothed RTT on connections to the builder: the daemon's, or
    /// local clients' on the local path.
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
    /// The local path's latest sample: (smoothed RTT in µs, when).
    local: (u32, u64),
}

impl PathTracker {
    pub fn adopt(stats: PathStats, now_boot_ns: u64) -> Self {
        Self {
            baseline: stats,
            adopted_boot_ns: now_boot_ns,
            latest: stats,
            local: (0, 0),
        }
    }

    pub fn update(&mut self, stats: PathStats) {
        self.latest = stats;
    }

    /// The local path's latest RTT sample of this builder (`LOCAL_STATS`).
    pub fn update_local(&mut self, srtt_us: u32, sampled_boot_ns: u64) {
        self.local = (srtt_us, sampled_boot_ns);
    }

    /// The latest sample taken since adoption, from either path: the RTT
    /// and when it was taken.
    fn latest_sample(&self) -> Option<(Duration, u64)> {
        let proxied = (self.latest.srtt_us, self.latest.sampled_boot_ns);
        let (srtt_us, at) = if self.local.1 > proxied.1 {
            self.local
        } else {
            proxied
        };
        (at > self.adopted_boot_ns).then(|| (Duration::from_micros(u64::from(srtt_us)), at))
    }

    /// The latest RTT sample of connections to the builder since this
    /// daemon took it over, if any.
    pub fn rtt(&self) -> Option<Duration> {
        self.latest_sample().map(|(rtt, _)| rtt)
    }

    /// [`Self::rtt`], if it is recent enough to stand for the path.
    pub fn fresh_rtt(&self, now_boot_ns: u64) -> Option<Duration> {
        let (rtt, at) = self.latest_sample()?;
        let age = now_boot_ns.saturating_sub(at);
        (Duration::from_nanos(age) <= KERNEL_RTT_FRESH).then_some(rtt)
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
    fn the_latest_sample_of_either_path_stands_for_the_builder() {
        let mut t = PathTracker::adopt(PathStats::default(), 10 * SECOND);
        t.update_local(400, 5 * SECOND);
        assert_eq!(t.rtt(), None, "a local sample from before adoption");
        t.update(stats(900, 11 * SECOND, 1, 0));
        t.update_local(150_000, 12 * SECOND);
        assert_eq!(
            t.rtt(),
            Some(Duration::from_millis(150)),
            "the local sample is newer"
        );
        let window = KERNEL_RTT_FRESH.as_nanos() as u64;
        assert_eq!(t.fresh_rtt(12 * SECOND + window + 1), None);
        t.update(stats(800, 13 * SECOND, 2, 0));
        assert_eq!(t.fresh_rtt(14 * SECOND), Some(Duration::from_micros(800)));
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
