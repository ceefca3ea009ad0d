//! The targets of issue 6, for yensid's kernel path (the default data
//! path), each judged met or missed with its ratio. A missed target is
//! reported, never an error.

use yensid_tests::Dataplane;

use super::contender::Contender;
use super::figure::{Figure, PERCENTILES};

/// The contender the targets are about.
pub const SUBJECT: Contender = Contender::Yensid(Dataplane::Kernel);
/// Refusal p99, microseconds.
const REFUSAL_P99_LIMIT: f64 = 100.0;
/// RSS with the idle sessions open, MiB.
const IDLE_RSS_LIMIT: f64 = 64.0;

/// What the subject's value of a figure must be.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Goal {
    /// At least `factor` times `of`'s value.
    AtLeast { factor: f64, of: Contender },
    /// At most `factor` times `of`'s value.
    AtMost { factor: f64, of: Contender },
    /// Its excess over `baseline`'s value no larger than `of`'s.
    OverheadNoWorse { of: Contender, baseline: Contender },
    /// Below a fixed limit.
    Below { limit: f64 },
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Target {
    pub figure: Figure,
    pub goal: Goal,
}

impl Target {
    /// The targets for `figures` (the highest percentile only for refusal).
    pub fn all(figures: &[Figure]) -> Vec<Self> {
        let p99 = PERCENTILES[PERCENTILES.len() - 1];
        figures
            .iter()
            .flat_map(|&figure| {
                let goals = match figure {
                    Figure::Throughput { .. } => vec![
                        Goal::AtLeast {
                            factor: 1.2,
                            of: Contender::Haproxy,
                        },
                        Goal::AtLeast {
                            factor: 0.8,
                            of: Contender::Direct,
                        },
                    ],
                    Figure::CpuPerGib { .. } => vec![Goal::AtMost {
                        factor: 0.5,
                        of: Contender::Haproxy,
                    }],
                    Figure::BannerLatency { .. } => vec![Goal::OverheadNoWorse {
                        of: Contender::Haproxy,
                        baseline: Contender::Direct,
                    }],
                    Figure::RefusalLatency { percentile } if percentile == p99 => {
                        vec![Goal::Below {
                            limit: REFUSAL_P99_LIMIT,
                        }]
                    }
                    Figure::IdleRss => vec![Goal::Below {
                        limit: IDLE_RSS_LIMIT,
                    }],
                    _ => Vec::new(),
                };
                goals.into_iter().map(move |goal| Self { figure, goal })
            })
            .collect()
    }

    /// The goal in words.
    pub fn describe(&self) -> String {
        let unit = self.figure.unit();
        match self.goal {
            Goal::AtLeast { factor, of } => format!("≥ {factor}× {}", of.name()),
            Goal::AtMost { factor, of } => format!("≤ {factor}× {}", of.name()),
            Goal::OverheadNoWorse { of, baseline } => {
                format!("overhead over {} ≤ {}'s", baseline.name(), of.name())
            }
            Goal::Below { limit } => format!("< {} {unit}", self.figure.format(limit)),
        }
    }

    /// Judges the subject's value; `value` gives any contender's measured
    /// value of this target's figure.
    pub fn judge(&self, value: impl Fn(Contender) -> Option<f64>) -> Verdict {
        let Some(subject) = value(SUBJECT) else {
            return Verdict::Unknown(format!("{} not measured", SUBJECT.name()));
        };
        let of = |contender: Contender| {
            value(contender).ok_or_else(|| format!("{} not measured", contender.name()))
        };
        let judged = match self.goal {
            Goal::AtLeast { factor, of: other } => of(other).map(|other| {
                let ratio = subject / other;
                (ratio, ratio >= factor)
            }),
            Goal::AtMost { factor, of: other } => of(other).map(|other| {
                let ratio = subject / other;
                (ratio, ratio <= factor)
            }),
            Goal::OverheadNoWorse {
                of: other,
                baseline,
            } => of(other).and_then(|other| {
                let base = of(baseline)?;
                let (mine, theirs) = (subject - base, other - base);
                Ok((mine / theirs, mine <= theirs))
            }),
            Goal::Below { limit } => Ok((subject / limit, subject < limit)),
        };
        match judged {
            Ok((ratio, true)) => Verdict::Met { ratio },
            Ok((ratio, false)) => Verdict::Missed { ratio },
            Err(why) => Verdict::Unknown(why),
        }
    }

    /// What the ratio of a verdict is a ratio of.
    pub fn ratio_meaning(&self) -> String {
        match self.goal {
            Goal::AtLeast { of, .. } | Goal::AtMost { of, .. } => format!("× {}", of.name()),
            Goal::OverheadNoWorse { of, .. } => format!("× {}'s overhead", of.name()),
            Goal::Below { .. } => "× the limit".to_owned(),
        }
    }
}

/// How a target went.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    Met {
        ratio: f64,
    },
    Missed {
        ratio: f64,
    },
    /// A value it needs was not measured.
    Unknown(String),
}

impl Verdict {
    pub fn word(&self) -> &'static str {
        match self {
            Self::Met { .. } => "met",
            Self::Missed { .. } => "missed",
            Self::Unknown(_) => "unknown",
        }
    }

    pub fn ratio(&self) -> Option<f64> {
        match self {
            Self::Met { ratio } | Self::Missed { ratio } => Some(*ratio),
            Self::Unknown(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::protocol::Mode;

    const THROUGHPUT: Figure = Figure::Throughput {
        mode: Mode::Upload,
        streams: 1,
    };

    fn values(
        direct: Option<f64>,
        haproxy: Option<f64>,
        kernel: Option<f64>,
    ) -> impl Fn(Contender) -> Option<f64> {
        move |c| match c {
            Contender::Direct => direct,
            Contender::Haproxy => haproxy,
            Contender::Yensid(Dataplane::Kernel) => kernel,
            Contender::Yensid(Dataplane::Userspace) => None,
        }
    }

    #[test]
    fn every_figure_with_a_target_gets_it() {
        let targets = Target::all(&Figure::all(8));
        let count = |f: fn(&Figure) -> bool| targets.iter().filter(|t| f(&t.figure)).count();
        assert_eq!(count(|f| matches!(f, Figure::Throughput { .. })), 8);
        assert_eq!(count(|f| matches!(f, Figure::CpuPerGib { .. })), 4);
        assert_eq!(count(|f| matches!(f, Figure::BannerLatency { .. })), 2);
        assert_eq!(count(|f| matches!(f, Figure::RefusalLatency { .. })), 1);
        assert_eq!(count(|f| matches!(f, Figure::IdleRss)), 1);
        assert_eq!(count(|f| matches!(f, Figure::ConnectionRate)), 0);
    }

    #[test]
    fn throughput_against_haproxy_and_direct() {
        let [haproxy, direct] = [1.2, 0.8].map(|factor| Target {
            figure: THROUGHPUT,
            goal: Goal::AtLeast {
                factor,
                of: if factor > 1.0 {
                    Contender::Haproxy
                } else {
                    Contender::Direct
                },
            },
        });
        let measured = values(Some(4.0), Some(1.5), Some(2.0));
        assert_eq!(haproxy.judge(&measured), Verdict::Met { ratio: 2.0 / 1.5 });
        assert_eq!(direct.judge(&measured), Verdict::Missed { ratio: 0.5 });
        assert_eq!(haproxy.describe(), "≥ 1.2× HAProxy");
    }

    #[test]
    fn cpu_at_most_half_of_haproxy() {
        let target = Target {
            figure: Figure::CpuPerGib {
                mode: Mode::Download,
                streams: 8,
            },
            goal: Goal::AtMost {
                factor: 0.5,
                of: Contender::Haproxy,
            },
        };
        assert_eq!(
            target.judge(values(None, Some(2.0), Some(1.0))),
            Verdict::Met { ratio: 0.5 }
        );
        assert_eq!(
            target.judge(values(None, Some(2.0), Some(1.2))),
            Verdict::Missed { ratio: 0.6 }
        );
    }

    #[test]
    fn banner_overhead_is_the_excess_over_direct() {
        let target = Target {
            figure: Figure::BannerLatency { percentile: 50 },
            goal: Goal::OverheadNoWorse {
                of: Contender::Haproxy,
                baseline: Contender::Direct,
            },
        };
        // Overheads: kernel 150, HAProxy 100.
        assert_eq!(
            target.judge(values(Some(100.0), Some(200.0), Some(250.0))),
            Verdict::Missed { ratio: 1.5 }
        );
        assert_eq!(
            target.judge(values(Some(100.0), Some(200.0), Some(150.0))),
            Verdict::Met { ratio: 0.5 }
        );
        assert!(matches!(
            target.judge(values(None, Some(200.0), Some(150.0))),
            Verdict::Unknown(why) if why == "direct not measured"
        ));
    }

    #[test]
    fn fixed_limits() {
        let target = Target {
            figure: Figure::RefusalLatency { percentile: 99 },
            goal: Goal::Below { limit: 100.0 },
        };
        assert_eq!(
            target.judge(values(None, None, Some(40.0))),
            Verdict::Met { ratio: 0.4 }
        );
        assert_eq!(
            target.judge(values(None, None, Some(100.0))),
            Verdict::Missed { ratio: 1.0 }
        );
        assert!(matches!(
            target.judge(values(None, None, None)),
            Verdict::Unknown(_)
        ));
        assert_eq!(target.describe(), "< 100 µs");
    }
}
