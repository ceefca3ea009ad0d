//! What sits between the client and the builders: nothing, HAProxy, or
//! yensid with either data path.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::{Result, ensure};
use yensid_tests::cgroup::TestCgroup;
use yensid_tests::{
    Daemon, DaemonConfig, Dataplane, Forward, LocalPathConfig, PolicyMode, Strategy, Topology,
    service,
};

use super::haproxy::{Haproxy, HaproxySpec};
use super::splicer::Splicer;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Contender {
    Direct,
    Haproxy,
    Yensid(Dataplane),
    /// yensid's kernel dataplane with `forward = "splice"`: steered by the
    /// kernel, each session moved by the daemon with splice(2).
    KernelSplice,
    /// yensid's local path: the bench process joins a cgroup of its own
    /// ([`TestCgroup`]) where the daemon attaches its connect-time program,
    /// so the bench's clients connect straight to the chosen builder.
    LocalPath,
    /// splice(2) in a process ([`Splicer`]), measured only when asked for.
    SplicePrototype,
}

/// Measured in this order; the first is the baseline of every ratio.
pub const CONTENDERS: [Contender; 4] = [
    Contender::Direct,
    Contender::Haproxy,
    Contender::Yensid(Dataplane::Kernel),
    Contender::Yensid(Dataplane::Userspace),
];

/// Measured in the main table only when `--contender` names them, after
/// [`CONTENDERS`]. The local path has a section of its own (`local`) and is
/// always a contender of the real-ssh section.
pub const ON_REQUEST: [Contender; 3] = [
    Contender::KernelSplice,
    Contender::LocalPath,
    Contender::SplicePrototype,
];

/// A builder's server the contender forwards to.
pub struct Upstream {
    /// The builder's name (`b1`, ...).
    pub builder: String,
    pub address: SocketAddr,
}

impl Contender {
    pub fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Haproxy => "HAProxy",
            Self::Yensid(Dataplane::Kernel) => "yensid kernel",
            Self::Yensid(Dataplane::Userspace) => "yensid userspace",
            Self::KernelSplice => "yensid kernel, splice(2)",
            Self::LocalPath => "yensid local path",
            Self::SplicePrototype => "splice(2) prototype",
        }
    }

    /// Its name in the JSON and on the command line.
    pub fn key(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Haproxy => "haproxy",
            Self::Yensid(Dataplane::Kernel) => "kernel",
            Self::Yensid(Dataplane::Userspace) => "userspace",
            Self::KernelSplice => "kernel-splice",
            Self::LocalPath => "local",
            Self::SplicePrototype => "splice",
        }
    }

    /// Starts it in `topology`'s client namespace in front of `upstreams`,
    /// able to hold `sessions` connections at once.
    pub fn start(
        self,
        topology: &Topology,
        yensid: &Path,
        upstreams: &[Upstream],
        sessions: usize,
    ) -> Result<Running> {
        ensure!(!upstreams.is_empty(), "no upstream to forward to");
        match self {
            Self::Direct => Ok(Running {
                targets: upstreams.iter().map(|u| u.address).collect(),
                middlebox: None,
            }),
            Self::Haproxy => {
                let haproxy = Haproxy::start(topology, &haproxy_spec(upstreams, sessions))?;
                Ok(Running {
                    targets: vec![service()],
                    middlebox: Some(Box::new(haproxy)),
                })
            }
            Self::Yensid(dataplane) => {
                let config = yensid_config(topology, dataplane, upstreams);
                let daemon = Daemon::start_binary(yensid, topology.client_ns(), &config)?;
                Ok(Running {
                    targets: vec![service()],
                    middlebox: Some(Box::new(daemon)),
                })
            }
            Self::KernelSplice => {
                let mut config = yensid_config(topology, Dataplane::Kernel, upstreams);
                config.forward = Some(Forward::Splice);
                let daemon = Daemon::start_binary(yensid, topology.client_ns(), &config)?;
                Ok(Running {
                    targets: vec![service()],
                    middlebox: Some(Box::new(daemon)),
                })
            }
            Self::LocalPath => {
                let cgroup = TestCgroup::join()?;
                let mut config = yensid_config(topology, Dataplane::Kernel, upstreams);
                config.local_path = Some(LocalPathConfig {
                    cgroup: cgroup.path().to_owned(),
                    proxied: Vec::new(),
                });
                let daemon = Daemon::start_binary(yensid, topology.client_ns(), &config)?;
                Ok(Running {
                    targets: vec![service()],
                    middlebox: Some(Box::new(LocalPathDaemon { daemon, cgroup })),
                })
            }
            Self::SplicePrototype => {
                let splicer = Splicer::start(
                    topology.client_ns(),
                    service(),
                    upstreams.iter().map(|u| u.address).collect(),
                )?;
                Ok(Running {
                    targets: vec![service()],
                    middlebox: Some(Box::new(splicer)),
                })
            }
        }
    }
}

/// HAProxy in front of `upstreams`, able to hold `sessions` connections.
pub fn haproxy_spec(upstreams: &[Upstream], sessions: usize) -> HaproxySpec<'_> {
    HaproxySpec {
        service: service(),
        refusal: HAPROXY_REFUSAL,
        servers: upstreams,
        sessions,
    }
}

/// yensid with `dataplane` in front of `upstreams`, balancing by least
/// connections as HAProxy does.
pub fn yensid_config(
    topology: &Topology,
    dataplane: Dataplane,
    upstreams: &[Upstream],
) -> DaemonConfig {
    let mut config = DaemonConfig::for_topology(topology, dataplane, Strategy::LeastConnections);
    for upstream in upstreams {
        config.builder_mut(&upstream.builder).address = upstream.address;
    }
    config
}

/// Where HAProxy's "build locally" frontend listens: beside the service,
/// since yensid's refusal is measured on the service itself after a mode
/// switch, and HAProxy has no such switch.
const HAPROXY_REFUSAL: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(yensid_tests::SERVICE_ADDR), 2200);

/// A contender while it runs.
pub struct Running {
    /// Where clients connect: connection i goes to `targets[i % len]`.
    pub targets: Vec<SocketAddr>,
    middlebox: Option<Box<dyn Middlebox>>,
}

impl Running {
    /// The middlebox's process, if there is one.
    pub fn pid(&self) -> Option<u32> {
        self.middlebox.as_ref().and_then(|m| m.pid())
    }

    /// Makes the contender refuse new connections ("build locally"), if it
    /// can: where to connect to be refused.
    pub fn refuse(&mut self) -> Option<Result<SocketAddr>> {
        self.middlebox.as_mut().map(|m| m.refuse())
    }

    /// Stops it; what its own records tell about the run.
    pub fn stop(self) -> Result<Vec<String>> {
        self.middlebox.map_or(Ok(Vec::new()), |m| m.finish())
    }

    /// [`Self::stop`], adding what it tells (or that it did not stop
    /// cleanly) to `notes`, each line after `label`.
    pub fn stop_into(self, label: &str, notes: &mut Vec<String>) {
        match self.stop() {
            Ok(lines) => notes.extend(lines.into_iter().map(|n| format!("{label}: {n}"))),
            Err(e) => notes.push(format!("{label}: did not stop cleanly: {e:#}")),
        }
    }
}

/// A process a contender runs between the client and the builders.
pub trait Middlebox {
    /// Its own process, if it has one.
    fn pid(&self) -> Option<u32>;
    /// Switches to refusing every new connection, the way its users make
    /// Nix build locally; where new connections are then refused.
    fn refuse(&mut self) -> Result<SocketAddr>;
    /// Stops it and says what its own records tell about the run.
    fn finish(self: Box<Self>) -> Result<Vec<String>>;
}

/// Warnings and errors from a log quoted in the notes.
pub const QUOTED_LOG_PROBLEMS: usize = 5;

impl Middlebox for Daemon {
    fn pid(&self) -> Option<u32> {
        Some(Daemon::pid(self))
    }

    fn refuse(&mut self) -> Result<SocketAddr> {
        self.set_mode(PolicyMode::Local, None)?;
        Ok(service())
    }

    fn finish(mut self: Box<Self>) -> Result<Vec<String>> {
        let status = self.stop()?;
        let log = strip_ansi(&self.log());
        ensure!(status.success(), "yensid exited with {status}");
        Ok(log_summary(&log))
    }
}

/// The daemon of the local path with the cgroup its clients are in; the
/// bench process leaves the cgroup once the daemon has stopped.
struct LocalPathDaemon {
    daemon: Daemon,
    cgroup: TestCgroup,
}

impl Middlebox for LocalPathDaemon {
    fn pid(&self) -> Option<u32> {
        Some(self.daemon.pid())
    }

    fn refuse(&mut self) -> Result<SocketAddr> {
        Middlebox::refuse(&mut self.daemon)
    }

    fn finish(self: Box<Self>) -> Result<Vec<String>> {
        let Self { daemon, cgroup } = *self;
        let direct = local_connections(&daemon)?;
        let mut notes = Box::new(daemon).finish()?;
        drop(cgroup);
        notes.insert(
            0,
            format!("{direct} connections went straight to a builder (the daemon's count)"),
        );
        Ok(notes)
    }
}

/// Connections `daemon` sent straight to a builder, from its status; none
/// would mean a local path figure measured another path.
pub fn local_connections(daemon: &Daemon) -> Result<u64> {
    let status = daemon.status()?;
    let total = status
        .json()
        .pointer("/builders")
        .and_then(|b| b.as_array())
        .map(|builders| {
            builders
                .iter()
                .filter_map(|b| b.pointer("/local/connections").and_then(|n| n.as_u64()))
                .sum()
        })
        .unwrap_or(0);
    ensure!(
        total > 0,
        "the daemon counted no connection on the local path: its figures measured another path"
    );
    Ok(total)
}

/// How many connections the kernel spliced, and the first warnings.
fn log_summary(log: &str) -> Vec<String> {
    let closed: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("connection closed"))
        .collect();
    let spliced = closed.iter().filter(|l| l.contains("spliced=true")).count();
    let mut notes = vec![format!(
        "{spliced} of {} connections spliced in the kernel (daemon log)",
        closed.len()
    )];
    notes.extend(
        log.lines()
            // Refusing is what the refusal figure asks of it.
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .filter(|l| !l.contains("service refuses connections"))
            .take(QUOTED_LOG_PROBLEMS)
            .map(|l| format!("daemon log: {}", l.trim())),
    );
    notes
}

/// tracing colours its output even when it goes to a file.
fn strip_ansi(log: &str) -> String {
    let mut plain = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // An escape sequence: `[`, parameters, one final letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    plain
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_summary_counts_spliced_connections_and_quotes_warnings() {
        let log = "\x1b[2m2026-01-01T00:00:00Z\x1b[0m  INFO connection closed builder=b1 spliced=true\n\
                   2026-01-01T00:00:01Z  INFO connection closed builder=b2 spliced=false\n\
                   2026-01-01T00:00:02Z  WARN service refuses connections reason=mode\n\
                   2026-01-01T00:00:03Z  WARN builder b2 down\n";
        let notes = log_summary(&strip_ansi(log));
        assert_eq!(
            notes[0],
            "1 of 2 connections spliced in the kernel (daemon log)"
        );
        assert_eq!(notes.len(), 2);
        assert!(notes[1].contains("builder b2 down"));
    }
}
