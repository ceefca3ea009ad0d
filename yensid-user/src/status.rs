//! `yensid status`: what the daemon is doing and why, as one document.
//!
//! The daemon builds a [`Status`] from its live state, its last plan and
//! the kernel's counters, and sends it as JSON over the control socket;
//! `--json` prints that document as it is (a stable interface), otherwise
//! the CLI renders tables for humans. Without a daemon the CLI says so,
//! and says what happens to claimed traffic (see [`not_running`]).

use std::{fmt::Write as _, path::Path};

use serde::{Deserialize, Serialize};

use crate::{link::Link, metrics::Histogram};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    pub pid: u32,
    /// `kernel` (sockmap splice) or `userspace` (copy).
    pub dataplane: String,
    /// False in the userspace fallback (BPF could not be loaded).
    pub bpf: bool,
    /// `kernel` when the kernel measures RTT and retransmits on the builder
    /// connections, otherwise `probes only: <why>`.
    #[serde(default)]
    pub path_measurement: String,
    pub mode: ModeStatus,
    pub services: Vec<ServiceStatus>,
    pub builders: Vec<BuilderStatus>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModeStatus {
    /// `auto`, `remote` or `local`.
    pub in_force: String,
    /// `config`, `hook` or `override`.
    pub source: String,
    /// When an override ends (seconds since the epoch).
    pub until: Option<u64>,
    /// The hook's reason.
    pub reason: Option<String>,
    /// `yensid mode`'s sentence.
    pub summary: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub name: String,
    pub listen: Vec<String>,
    pub port: u16,
    pub strategy: String,
    /// Null while connections go to builders.
    pub refusal: Option<String>,
    pub members: Vec<MemberStatus>,
    /// The kernel's counters (absent without BPF).
    pub dispatched: Option<u64>,
    pub refused_mode_local: Option<u64>,
    pub refused_no_builder: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MemberStatus {
    pub builder: String,
    /// Null when eligible for this service.
    pub excluded: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BuilderStatus {
    pub name: String,
    pub address: String,
    /// `healthy`, `unhealthy`, `draining` or `full`.
    pub state: String,
    pub reason: Option<String>,
    pub weight: u32,
    pub max_connections: Option<u32>,
    pub active: u64,
    pub connections: u64,
    pub rejected_clients: u64,
    pub failed_over: u64,
    pub bytes_to_builder: u64,
    pub bytes_from_builder: u64,
    pub rtt_ms: Option<f64>,
    /// TCP's smoothed RTT on the daemon's connections to the builder
    /// (spliced or copied), at the latest sample the kernel took.
    #[serde(default)]
    pub kernel_rtt_ms: Option<f64>,
    /// RTT samples the kernel took on those connections.
    #[serde(default)]
    pub rtt_samples: u64,
    /// Segments retransmitted to the builder.
    #[serde(default)]
    pub retransmits: u64,
    pub egress: Option<Link>,
    /// From upstream connect to the builder's identification line.
    #[serde(default)]
    pub connect_seconds: Histogram,
}

/// Tables for humans.
pub fn render(status: &Status) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "yensid running (pid {}), data path {}{}",
        status.pid,
        status.dataplane,
        if status.bpf {
            ""
        } else {
            " -- BPF UNAVAILABLE, userspace fallback"
        }
    );
    if status.path_measurement != "kernel" {
        let _ = writeln!(out, "builder RTT: {}", status.path_measurement);
    }
    let _ = writeln!(out, "{}\n", status.mode.summary);
    let mut rows = vec![vec![
        "SERVICE".to_owned(),
        "CLAIMS".to_owned(),
        "STRATEGY".to_owned(),
        "STATE".to_owned(),
        "DISPATCHED".to_owned(),
        "REFUSED".to_owned(),
    ]];
    for s in &status.services {
        let refused = s.refused_mode_local.unwrap_or(0) + s.refused_no_builder.unwrap_or(0);
        rows.push(vec![
            s.name.clone(),
            format!("{} port {}", s.listen.join(","), s.port),
            s.strategy.clone(),
            s.refusal
                .as_ref()
                .map_or("to builders".to_owned(), |r| format!("refusing: {r}")),
            s.dispatched.map_or("-".into(), |n| n.to_string()),
            refused.to_string(),
        ]);
    }
    table(&mut out, &rows);
    let mut rows = vec![vec![
        "BUILDER".to_owned(),
        "STATE".to_owned(),
        "ACTIVE".to_owned(),
        "TOTAL".to_owned(),
        "FAILOVERS".to_owned(),
        "TO/FROM".to_owned(),
        "RTT PROBE/CONN".to_owned(),
        "RETRANS".to_owned(),
        "EGRESS".to_owned(),
    ]];
    for b in &status.builders {
        rows.push(vec![
            b.name.clone(),
            match &b.reason {
                Some(r) => format!("{} ({r})", b.state),
                None => b.state.clone(),
            },
            match b.max_connections {
                Some(max) => format!("{}/{max}", b.active),
                None => b.active.to_string(),
            },
            b.connections.to_string(),
            b.failed_over.to_string(),
            format!(
                "{}/{}",
                human_bytes(b.bytes_to_builder),
                human_bytes(b.bytes_from_builder)
            ),
            format!(
                "{}/{}",
                b.rtt_ms.map_or("-".into(), |r| format!("{r:.1}ms")),
                b.kernel_rtt_ms.map_or("-".into(), |r| format!("{r:.1}ms"))
            ),
            b.retransmits.to_string(),
            b.egress.as_ref().map_or("-".into(), |l| {
                format!("{} {}{}", l.name, l.kind, if l.up { "" } else { " DOWN" })
            }),
        ]);
    }
    out.push('\n');
    table(&mut out, &rows);
    for s in &status.services {
        for m in s.members.iter().filter(|m| m.excluded.is_some()) {
            let _ = writeln!(
                out,
                "{}: {} excluded: {}",
                s.name,
                m.builder,
                m.excluded.as_deref().unwrap_or_default()
            );
        }
    }
    out
}

/// What happens to claimed connections while no daemon runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    /// The pinned dispatch program still claims the addresses and refuses
    /// every connection.
    Refused,
    /// Nothing is attached.
    NotClaimed,
    /// The pins cannot be looked at (no read access).
    Unknown,
}

impl Claim {
    /// The `claimed_traffic` value of `status --json`.
    pub fn as_str(self) -> &'static str {
        match self {
            Claim::Refused => "refused",
            Claim::NotClaimed => "not claimed",
            Claim::Unknown => "unknown",
        }
    }
}

/// What `status` says without a daemon: whether the pinned program still
/// claims the addresses (it refuses every claimed connection then).
pub fn not_running(pin_path: &Path, claims: &[String]) -> (Claim, String) {
    let link = pin_path.join("dispatch");
    match link.try_exists() {
        Ok(true) => (
            Claim::Refused,
            format!(
                "yensid is NOT running, but its dispatch program is still attached ({}): \
                 claimed connections to {} are refused at once (RST), so Nix builds locally. \
                 Start yensid, or remove {} to release the addresses.",
                link.display(),
                claims.join(", "),
                pin_path.display()
            ),
        ),
        Ok(false) => (
            Claim::NotClaimed,
            format!(
                "yensid is not running and nothing is attached: {} are not claimed \
                 (connections reach whatever else listens there).",
                claims.join(", ")
            ),
        ),
        Err(e) => (
            Claim::Unknown,
            format!(
                "yensid is not running; whether its program still claims {} is unknown: \
                 cannot look at {}: {e} (root or a member of daemon.read_group can).",
                claims.join(", "),
                pin_path.display()
            ),
        ),
    }
}

fn table(out: &mut String, rows: &[Vec<String>]) {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n}B")
    } else {
        format!("{value:.1}{}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_and_bytes_read_well() {
        let mut out = String::new();
        table(
            &mut out,
            &[
                vec!["A".into(), "LONG HEADER".into()],
                vec!["wide cell".into(), "x".into()],
            ],
        );
        assert_eq!(out, "A          LONG HEADER\nwide cell  x\n");
        assert_eq!(human_bytes(512), "512B");
        assert_eq!(human_bytes(3 * 1024 * 1024 / 2), "1.5MiB");
    }

    #[test]
    fn without_a_daemon_status_says_what_happens_to_claimed_traffic() {
        let dir = std::env::temp_dir().join(format!("yensid-status-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let claims = vec!["127.0.0.22/32 port 22".to_owned()];
        let (claim, text) = not_running(&dir, &claims);
        assert!(
            claim == Claim::NotClaimed && text.contains("not claimed"),
            "{text}"
        );
        std::fs::write(dir.join("dispatch"), "").unwrap();
        let (claim, text) = not_running(&dir, &claims);
        assert!(
            claim == Claim::Refused && text.contains("refused at once (RST)"),
            "{text}"
        );
        let file_as_dir = dir.join("dispatch").join("pins");
        let (claim, text) = not_running(&file_as_dir, &claims);
        assert!(
            claim == Claim::Unknown && text.contains("is unknown"),
            "{text}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
