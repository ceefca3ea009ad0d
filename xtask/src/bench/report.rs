//! The report: a markdown table, the targets, notes, and the same in JSON.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::{Map, Value as Json, json};

use super::contender::Contender;
use super::figure::{Figure, Value};
use super::measure::WARMUP_CONNECTIONS;
use super::protocol::TRANSFER_BUFFER;
use super::reaction::Reactions;
use super::target::{Judgement, SUBJECT, Target};
use super::{BUILDERS, IdleCount, Options};

/// One contender's figures, in [`Report::figures`] order.
pub struct Results {
    pub contender: Contender,
    pub values: Vec<Value>,
    /// RSS (MiB) projected to the requested idle sessions, when fewer
    /// were held (see [`IdleCount`]).
    pub idle_rss_projected: Option<f64>,
    pub notes: Vec<String>,
}

/// Everything measured, with the conditions it was measured in.
pub struct Report {
    date: String,
    kernel: String,
    cpus: usize,
    bytes: u64,
    streams: usize,
    connections: usize,
    rate_clients: usize,
    rate_seconds: u64,
    idle: IdleCount,
    nix_builds: usize,
    pub figures: Vec<Figure>,
    pub results: Vec<Results>,
    /// Reaction times of the kernel path, in their own table, when
    /// measured.
    reactions: Option<Reactions>,
    /// Wall time of the whole run, building included.
    took: Duration,
}

impl Report {
    pub fn new(
        options: &Options,
        idle: IdleCount,
        figures: Vec<Figure>,
        results: Vec<Results>,
        reactions: Option<Reactions>,
        took: Duration,
    ) -> Result<Self> {
        Ok(Self {
            date: utc_now()?,
            kernel: fs::read_to_string("/proc/sys/kernel/osrelease")?
                .trim()
                .to_owned(),
            cpus: thread::available_parallelism().map_or(0, usize::from),
            bytes: options.bytes,
            streams: options.streams,
            connections: options.connections,
            rate_clients: options.rate_clients,
            rate_seconds: options.rate_seconds,
            idle,
            nix_builds: options.nix_builds,
            figures,
            results,
            reactions,
            took,
        })
    }

    /// When and where it ran, in a line.
    pub fn conditions(&self) -> String {
        format!(
            "{} · kernel {} · {} CPUs, shared (noisy)",
            self.date, self.kernel, self.cpus
        )
    }

    /// The contender's measured value of `figure`.
    pub fn value(&self, contender: Contender, figure: Figure) -> Option<f64> {
        let index = self.figures.iter().position(|f| *f == figure)?;
        self.results
            .iter()
            .find(|r| r.contender == contender)?
            .values[index]
            .measured()
    }

    /// What a target judges: [`Self::value`], but the RSS projected to the
    /// requested idle sessions when fewer were held.
    fn target_value(&self, contender: Contender, figure: Figure) -> Option<f64> {
        let projected = self
            .results
            .iter()
            .find(|r| r.contender == contender)
            .and_then(|r| r.idle_rss_projected);
        match (figure, projected) {
            (Figure::IdleRss, Some(projected)) => Some(projected),
            _ => self.value(contender, figure),
        }
    }

    /// `value / baseline` of figure `index`, when both were measured.
    fn ratio(&self, index: usize, value: &Value) -> Option<f64> {
        let baseline = self.results.first()?.values[index].measured()?;
        Some(value.measured()? / baseline)
    }

    pub fn targets(&self) -> Vec<(Target, Judgement)> {
        Target::all(&self.figures)
            .into_iter()
            .map(|target| {
                let judgement = target.judge(|c| self.target_value(c, target.figure));
                (target, judgement)
            })
            .collect()
    }

    pub fn failed_figures(&self) -> usize {
        self.results
            .iter()
            .flat_map(|r| &r.values)
            .filter(|v| matches!(v, Value::Failed(_)))
            .count()
            + self.reactions.as_ref().map_or(0, Reactions::failed)
    }

    fn baseline_name(&self) -> &'static str {
        self.results
            .first()
            .map_or("the first column", |r| r.contender.name())
    }

    pub fn markdown(&self) -> String {
        let mut md = format!(
            "# yensid benchmark\n\n{} · kernel {} · {} CPUs · {BUILDERS} builders on veth links · \
             {} bytes per stream, {} parallel streams · {} sequential connections (after \
             {WARMUP_CONNECTIONS} warm-up) for each latency · {} concurrent clients for {} s \
             for the rate · {} idle connections for the RSS{} · {} derivations in one `nix-build` \
             for the Nix builds · the whole run took {}\n\n",
            self.date,
            self.kernel,
            self.cpus,
            self.bytes,
            self.streams,
            self.connections,
            self.rate_clients,
            self.rate_seconds,
            self.idle.held,
            self.idle_shortfall(),
            self.nix_builds,
            minutes(self.took),
        );
        md += &self.table();
        md += &format!(
            "\nIn brackets: the ratio to {} (GB/s and conn/s: higher is better; the rest: lower \
             is better). GB = 10^9 bytes, GiB = 2^30. Upload is client to builder. CPU is the \
             whole machine's busy time (user, nice, system, irq, softirq from /proc/stat) over \
             each transfer, so the clients' and servers' own work and anything else running on \
             the machine count too. Refusal: until the client sees ECONNREFUSED (yensid, `yensid \
             mode local`) or the connection closed (HAProxy: a Lua fetch naming no backend). RSS: \
             VmRSS of the middlebox process with the idle connections open, each past the SSH \
             opening. Every figure but the Nix builds runs against a bench server on the \
             builders that speaks the opening of SSH, so no cipher is measured; the Nix builds \
             go to the builders' sshd and Nix (`ssh-ng://`, 4 remote build slots in all, none \
             local), each derivation new to every store.\n",
            self.baseline_name()
        );
        md += &self.targets_markdown();
        if let Some(reactions) = &self.reactions {
            md += &reactions.markdown();
        }
        let notes: Vec<String> = self
            .results
            .iter()
            .flat_map(|r| {
                self.failures(r)
                    .into_iter()
                    .chain(r.notes.iter().cloned())
                    .map(move |n| format!("- {}: {n}\n", r.contender.name()))
            })
            .collect();
        if !notes.is_empty() {
            md += &format!("\n## Notes\n\n{}", notes.concat());
        }
        md
    }

    /// Why fewer idle sessions were held than asked for, if they were.
    fn idle_shortfall(&self) -> String {
        match self.idle.fd_limit {
            Some(limit) => format!(
                " (not {}: a process may open {limit} descriptors here, and each session \
                 takes two in the bench and two in the middlebox; the RSS target is judged on \
                 the RSS projected to {} along the line through the RSS before and with them)",
                self.idle.requested, self.idle.requested
            ),
            None => String::new(),
        }
    }

    /// The figures table alone (the README shows it).
    pub fn table(&self) -> String {
        let names: Vec<&str> = self.results.iter().map(|r| r.contender.name()).collect();
        let mut md = format!("| figure | {} |\n", names.join(" | "));
        md += &format!("|---|{}\n", "---:|".repeat(names.len()));
        for (index, figure) in self.figures.iter().enumerate() {
            let cells: Vec<String> = self
                .results
                .iter()
                .enumerate()
                .map(|(column, results)| self.cell(*figure, index, column, results))
                .collect();
            md += &format!(
                "| {} ({}) | {} |\n",
                figure.label(),
                figure.unit(),
                cells.join(" | ")
            );
        }
        md
    }

    fn targets_markdown(&self) -> String {
        let mut md = format!(
            "\n## Targets ({})\n\n| figure | target | {} | how far | verdict |\n|---|---|---:|---|---|\n",
            SUBJECT.name(),
            SUBJECT.name()
        );
        for (target, judgement) in self.targets() {
            let figure = target.figure;
            let projected = figure == Figure::IdleRss && self.idle.held < self.idle.requested;
            let value = match self.target_value(SUBJECT, figure) {
                Some(v) if projected => {
                    format!(
                        "{} (projected to {})",
                        figure.format(v),
                        self.idle.requested
                    )
                }
                Some(v) => figure.format(v),
                None => "—".to_owned(),
            };
            md += &format!(
                "| {} ({}) | {} | {value} | {} | {} |\n",
                figure.label(),
                figure.unit(),
                target.describe(),
                judgement.explain(&target),
                judgement.verdict.word()
            );
        }
        md
    }

    /// What went wrong with each figure `results` lacks.
    fn failures(&self, results: &Results) -> Vec<String> {
        self.figures
            .iter()
            .zip(&results.values)
            .filter_map(|(figure, value)| match value {
                Value::Failed(error) => Some(format!("{} failed: {error}", figure.label())),
                _ => None,
            })
            .collect()
    }

    fn cell(&self, figure: Figure, index: usize, column: usize, results: &Results) -> String {
        let value = &results.values[index];
        match (value, self.ratio(index, value)) {
            (Value::Failed(_), _) => "failed".to_owned(),
            (Value::NotApplicable, _) => "n/a".to_owned(),
            (Value::Measured(v), Some(ratio)) if column > 0 => {
                format!("{} ({ratio:.2}×)", figure.format(*v))
            }
            (Value::Measured(v), _) => figure.format(*v),
        }
    }

    fn json(&self) -> Json {
        let contenders: Vec<Json> = self
            .results
            .iter()
            .map(|results| {
                let mut figures = Map::new();
                for (index, figure) in self.figures.iter().enumerate() {
                    let value = &results.values[index];
                    let entry = match value {
                        Value::Measured(v) => json!({
                            "unit": figure.unit(),
                            "value": v,
                            "ratio_to_baseline": self.ratio(index, value),
                        }),
                        Value::Failed(e) => json!({ "unit": figure.unit(), "error": e }),
                        Value::NotApplicable => {
                            json!({ "unit": figure.unit(), "not_applicable": true })
                        }
                    };
                    figures.insert(figure.key(), entry);
                }
                json!({
                    "key": results.contender.key(),
                    "name": results.contender.name(),
                    "figures": figures,
                    "idle_rss_projected_mib": results.idle_rss_projected,
                    "notes": results.notes,
                })
            })
            .collect();
        let targets: Vec<Json> = self
            .targets()
            .into_iter()
            .map(|(target, judgement)| {
                json!({
                    "figure": target.figure.key(),
                    "contender": SUBJECT.key(),
                    "target": target.describe(),
                    "value": self.target_value(SUBJECT, target.figure),
                    "ratio": judgement.ratio,
                    "ratio_of": target.ratio_meaning(),
                    "detail": judgement.detail,
                    "verdict": judgement.verdict.word(),
                })
            })
            .collect();
        json!({
            "date": self.date,
            "kernel": self.kernel,
            "cpus": self.cpus,
            "run_seconds": self.took.as_secs(),
            "parameters": {
                "bytes_per_stream": self.bytes,
                "parallel_streams": self.streams,
                "sequential_connections": self.connections,
                "warmup_connections": WARMUP_CONNECTIONS,
                "rate_clients": self.rate_clients,
                "rate_seconds": self.rate_seconds,
                "idle_connections_requested": self.idle.requested,
                "idle_connections_held": self.idle.held,
                "nix_builds": self.nix_builds,
                "fd_limit": self.idle.fd_limit,
                "transfer_buffer_bytes": TRANSFER_BUFFER,
                "builders": BUILDERS,
                "baseline": self.results.first().map(|r| r.contender.key()),
            },
            "contenders": contenders,
            "targets": targets,
            "reactions": self.reactions.as_ref().map(Reactions::json),
        })
    }

    /// Writes latest.md and latest.json into `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        fs::write(dir.join("latest.md"), self.markdown())?;
        fs::write(
            dir.join("latest.json"),
            serde_json::to_string_pretty(&self.json())? + "\n",
        )?;
        Ok(())
    }
}

/// `7 min 05 s`.
fn minutes(d: Duration) -> String {
    let s = d.as_secs();
    format!("{} min {:02} s", s / 60, s % 60)
}

pub fn utc_now() -> Result<String> {
    let out = Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .context("run date")?;
    ensure!(out.status.success(), "date failed");
    Ok(String::from_utf8(out.stdout)?.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minutes_and_seconds() {
        assert_eq!(minutes(Duration::from_secs(425)), "7 min 05 s");
        assert_eq!(minutes(Duration::from_millis(59_900)), "0 min 59 s");
    }
}
