//! CPU time of the whole machine, from /proc/stat: what a transfer costs,
//! the kernel's share (softirq: most of TCP's receive work) included, which
//! a per-process figure would miss.

use std::fs;

use anyhow::{Context, Result, bail};

/// Busy time of all CPUs together at one instant, in clock ticks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuTimes {
    busy_ticks: u64,
}

impl CpuTimes {
    pub fn now() -> Result<Self> {
        let stat = fs::read_to_string("/proc/stat").context("read /proc/stat")?;
        parse(&stat)
    }

    /// CPU seconds spent between `earlier` and this sample.
    pub fn seconds_since(self, earlier: Self) -> f64 {
        self.busy_ticks.saturating_sub(earlier.busy_ticks) as f64 / ticks_per_second()
    }
}

/// The `cpu` line (all CPUs) of /proc/stat: user, nice, system, idle,
/// iowait, irq, softirq, steal, ... Busy is user + nice + system + irq +
/// softirq. Not idle or iowait (waiting), nor steal (another guest's time);
/// guest time is already counted in user.
fn parse(stat: &str) -> Result<CpuTimes> {
    let line = stat
        .lines()
        .find(|l| l.split_whitespace().next() == Some("cpu"))
        .context("no `cpu` line in /proc/stat")?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(|| format!("unexpected /proc/stat line {line:?}"))?;
    let &[user, nice, system, _idle, _iowait, irq, softirq, ..] = fields.as_slice() else {
        bail!("/proc/stat's cpu line has fewer than 7 fields: {line:?}");
    };
    Ok(CpuTimes {
        busy_ticks: user + nice + system + irq + softirq,
    })
}

/// CPU seconds (user and system, all threads) process `pid` has used.
pub fn process_seconds(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let stat = fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    Ok(
        process_ticks(&stat).with_context(|| format!("unexpected {path}: {stat:?}"))? as f64
            / ticks_per_second(),
    )
}

/// utime + stime of a /proc/<pid>/stat line: fields 14 and 15, counted
/// after the command name, which is in brackets and may hold spaces.
fn process_ticks(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // Field 3 (the state) is the first after the name.
    let utime: u64 = fields.get(14 - 3)?.parse().ok()?;
    let stime: u64 = fields.get(15 - 3)?.parse().ok()?;
    Some(utime + stime)
}

/// USER_HZ, the unit of /proc/stat.
fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 { hz as f64 } else { 100.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_time_counts_user_nice_system_irq_softirq() {
        let stat = "cpu  100 2 30 5000 70 4 5 900 0 0\n\
                    cpu0 50 1 15 2500 35 2 3 450 0 0\n\
                    intr 12345 0 0\n";
        assert_eq!(
            parse(stat).expect("valid"),
            CpuTimes {
                busy_ticks: 100 + 2 + 30 + 4 + 5
            }
        );
    }

    #[test]
    fn only_the_all_cpus_line_counts() {
        let stat = "cpu0 1 1 1 1 1 1 1\ncpu 1 2 3 4 5 6 7\n";
        assert_eq!(parse(stat).expect("valid").busy_ticks, 1 + 2 + 3 + 6 + 7);
    }

    #[test]
    fn malformed_lines_are_errors() {
        assert!(parse("intr 1 2 3\n").is_err());
        assert!(parse("cpu 1 2 3\n").is_err());
        assert!(parse("cpu 1 2 x 4 5 6 7\n").is_err());
    }

    #[test]
    fn a_process_cpu_is_its_user_and_system_time() {
        let stat = "4242 (tokio rt) worker) S 1 4242 4242 0 -1 4194560 500 0 0 0 \
                    1200 345 0 0 20 0 3 0 100 1000000 2000 18446744073709551615\n";
        assert_eq!(process_ticks(stat), Some(1200 + 345));
        assert_eq!(process_ticks("4242 (x) S 1 2"), None);
        assert!(process_seconds(std::process::id()).is_ok());
    }

    #[test]
    fn seconds_use_clock_ticks() {
        let hz = ticks_per_second();
        let earlier = CpuTimes { busy_ticks: 1000 };
        let later = CpuTimes {
            busy_ticks: 1000 + 3 * hz as u64,
        };
        assert!((later.seconds_since(earlier) - 3.0).abs() < 1e-9);
        assert_eq!(earlier.seconds_since(later), 0.0);
    }
}
