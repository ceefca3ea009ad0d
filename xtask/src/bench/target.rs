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
    pub fn judge(&self, value: impl Fn(Contender) -> Option<f64>) -> Judgement {
        let unknown = |contender: Contender| Judgement {
            verdict: Verdict::Unknown(format!("{} not measured", contender.name())),
            ratio: None,
            detail: None,
        };
        let Some(subject) = value(SUBJECT) else {
            return unknown(SUBJECT);
        };
        let plain = |ratio: f64, met: bool| Judgement {
            verdict: if met { Verdict::Met } else { Verdict::Missed },
            ratio: Some(ratio),
            detail: None,
        };
        match self.goal {
            Goal::AtLeast { factor, of } => match value(of) {
                Some(other) => plain(subject / other, subject / other >= factor),
                None => unknown(of),
            },
            Goal::AtMost { factor, of } => match value(of) {
                Some(other) => plain(subject / other, subject / other <= factor),
                None => unknown(of),
            },
            Goal::OverheadNoWorse { of, baseline } => {
                let (Some(other), Some(base)) = (value(of), value(baseline)) else {
                    return unknown(if value(of).is_none() { of } else { baseline });
                };
                let (mine, theirs) = (subject - base, other - base);
                let unit = self.figure.unit();
                Judgement {
                    verdict: if mine <= theirs {
                        Verdict::Met
                    } else {
                        Verdict::Missed
                    },
                    // A ratio of overheads means something only when both
                    // are overheads; noise can make one negative.
                    ratio: (mine > 0.0 && theirs > 0.0).then(|| mine / theirs),
                    detail: Some(format!(
                        "overhead {mine:+.0} {unit}, {}'s {theirs:+.0} {unit}",
                        of.name()
                    )),
                }
            }
            Goal::Below { limit } => plain(subject / limit, subject < limit),
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
    Met,
    Missed,
    /// A value it needs was not measured.
    Unknown(String),
}

impl Verdict {
    pub fn word(&self) -> &'static str {
        match self {
            Self::Met => "met",
            Self::Missed => "missed",
            Self::Unknown(_) => "unknown",
        }
    }
}

/// A verdict and what it rests on.
#[derive(Clone, Debug, PartialEq)]
pub struct Judgement {
    pub verdict: Verdict,
    /// See [`Target::ratio_meaning`]; none when it would mean nothing.
    pub ratio: Option<f64>,
    /// What the ratio leaves out.
    pub detail: Option<String>,
}

impl Judgement {
    /// The ratio and the detail, or why there is no verdict.
    pub fn explain(&self, target: &Target) -> String {
        let ratio = self
            .ratio
            .map(|r| format!("{r:.2}{}", target.ratio_meaning()));
        match (&self.verdict, ratio, &self.detail) {
            (Verdict::Unknown(why), _, _) => why.clone(),
            (_, Some(ratio), Some(detail)) => format!("{ratio} ({detail})"),
            (_, Some(ratio), None) => ratio,
            (_, None, Some(detail)) => detail.clone(),
            (_, None, None) => String::new(),
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
            _ => None,
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
        let judged = haproxy.judge(&measured);
        assert_eq!(
            (judged.verdict, judged.ratio),
            (Verdict::Met, Some(2.0 / 1.5))
        );
        let judged = direct.judge(&measured);
        assert_eq!(
            (&judged.verdict, judged.ratio),
            (&Verdict::Missed, Some(0.5))
        );
        assert_eq!(judged.explain(&direct), "0.50× direct");
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
        let judged = target.judge(values(None, Some(2.0), Some(1.0)));
        assert_eq!((judged.verdict, judged.ratio), (Verdict::Met, Some(0.5)));
        let judged = target.judge(values(None, Some(2.0), Some(1.2)));
        assert_eq!((judged.verdict, judged.ratio), (Verdict::Missed, Some(0.6)));
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
        let judged = target.judge(values(Some(100.0), Some(200.0), Some(250.0)));
        assert_eq!(
            (&judged.verdict, judged.ratio),
            (&Verdict::Missed, Some(1.5))
        );
        assert_eq!(
            judged.explain(&target),
            "1.50× HAProxy's overhead (overhead +150 µs, HAProxy's +100 µs)"
        );
        let judged = target.judge(values(Some(100.0), Some(200.0), Some(150.0)));
        assert_eq!((judged.verdict, judged.ratio), (Verdict::Met, Some(0.5)));
        // Faster than direct (noise): met, and no ratio of overheads.
        let judged = target.judge(values(Some(100.0), Some(200.0), Some(90.0)));
        assert_eq!((&judged.verdict, judged.ratio), (&Verdict::Met, None));
        assert_eq!(
            judged.explain(&target),
            "overhead -10 µs, HAProxy's +100 µs"
        );
        assert_eq!(
            target.judge(values(None, Some(200.0), Some(150.0))).verdict,
            Verdict::Unknown("direct not measured".to_owned())
        );
    }

    #[test]
    fn fixed_limits() {
        let target = Target {
            figure: Figure::RefusalLatency { percentile: 99 },
            goal: Goal::Below { limit: 100.0 },
        };
        let judged = target.judge(values(None, None, Some(40.0)));
        assert_eq!((judged.verdict, judged.ratio), (Verdict::Met, Some(0.4)));
        let judged = target.judge(values(None, None, Some(100.0)));
        assert_eq!((judged.verdict, judged.ratio), (Verdict::Missed, Some(1.0)));
        assert!(matches!(
            target.judge(values(None, None, None)).verdict,
            Verdict::Unknown(_)
        ));
        assert_eq!(target.describe(), "< 100 µs");
    }
}
