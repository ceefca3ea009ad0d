//! The configuration file: its TOML format and its validation.
//!
//! Parsing is two steps. Serde reads the file into `raw` types that keep
//! the byte span of every value worth complaining about; `validate` then
//! checks the rules serde cannot express and reports every problem at once,
//! each naming its key and line, so one run of `yensid check-config` shows
//! everything that is wrong.

use std::{
    fmt,
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use crate::decide::link::LinkKind;

mod duration;
pub mod load;
mod raw;
#[cfg(test)]
mod tests;
mod validate;

pub use duration::{
    MAX_CONFIG_DURATION, MAX_OVERRIDE, describe_duration, parse_bounded_duration, parse_duration,
};
pub use load::{LoadLimits, MetricsSource, ScrapeSettings};
use validate::{Checker, check_address, line_of, validate};
pub use validate::{MAX_WEIGHT, check_pin_path, host_address_claim};

/// Where pinned maps and the dispatch link live by default.
pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/yensid";
/// Where bpffs is mounted by default (and by yensid when it is not).
pub const BPFFS_MOUNT: &str = "/sys/fs/bpf";
/// Where operator state (drains) is kept across restarts by default.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/yensid";
/// Where the control socket lives by default.
pub const DEFAULT_RUNTIME_DIR: &str = "/run/yensid";

/// A validated configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub daemon: Daemon,
    pub services: Vec<Service>,
    /// Sorted by name.
    pub builders: Vec<Builder>,
    pub policy: Policy,
    /// `[links]`: interface name globs and the kind they are, first match
    /// wins (the kernel cannot know that a USB dongle is a phone tether).
    pub links: Vec<(String, LinkKind)>,
    /// `[metrics] listen`: where the Prometheus endpoint listens.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// `[load]`: how builders' metrics are scraped.
    pub scrape: ScrapeSettings,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Daemon {
    pub pin_path: PathBuf,
    pub dataplane: Dataplane,
    /// Operator state that survives restarts (`<instance>.json`).
    pub state_dir: PathBuf,
    /// The control socket (`<instance>.sock`) for `yensid drain` and friends.
    pub runtime_dir: PathBuf,
    /// Members of this group may read the pinned maps and ask the daemon
    /// for its status (no changes).
    pub read_group: Option<String>,
    /// Limits on connections that have not finished their SSH handoff.
    pub handoff: HandoffLimits,
    /// How long a stop without a successor keeps serving the connections
    /// that are open (none are accepted); zero cuts them at once.
    pub shutdown_grace: Duration,
    /// `[daemon] local_cgroup`: the cgroup v2 whose processes' connects the
    /// local path rewrites; `None`: the root cgroup (every process).
    pub local_cgroup: Option<PathBuf>,
    /// `[daemon] forward`: how the kernel dataplane moves an SSH session's
    /// bytes once its handoff is done.
    pub forward: ForwardSetting,
}

/// `[daemon] shutdown_grace` when absent: a remote build cut by a stop
/// fails, and most finish or reach a natural end within this.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// `[daemon] ident_timeout`, `max_handoffs`, `max_handoffs_per_client`:
/// what a connection may take before it is an SSH session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HandoffLimits {
    /// How long a client may take to send its identification line.
    pub ident_timeout: Duration,
    /// Connections in handoff at once; beyond, new ones are refused (RST).
    pub max_handoffs: u32,
    /// Connections in handoff at once from one client address.
    pub max_handoffs_per_client: u32,
}

impl Default for HandoffLimits {
    fn default() -> Self {
        Self {
            ident_timeout: Duration::from_secs(5),
            max_handoffs: 1024,
            max_handoffs_per_client: 512,
        }
    }
}

impl Daemon {
    /// The instance's name: the last component of its pin path (`yensid`
    /// by default). Daemons in different network namespaces use different
    /// pin paths, and so get their own socket and state file.
    pub fn instance(&self) -> String {
        self.pin_path
            .file_name()
            .map_or_else(|| "yensid".to_owned(), |n| n.to_string_lossy().into_owned())
    }

    pub fn control_socket(&self) -> PathBuf {
        self.runtime_dir.join(format!("{}.sock", self.instance()))
    }

    pub fn state_file(&self) -> PathBuf {
        self.state_dir.join(format!("{}.json", self.instance()))
    }
}

/// How a builder's health is checked. Every duration is longer than zero
/// and at most [`MAX_CONFIG_DURATION`], so deadlines computed from them
/// (`Instant + interval`, the back-off) cannot overflow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthSettings {
    /// Time between probes of a healthy builder, and the first back-off step.
    pub interval: Duration,
    /// How long a probe may take (connect plus banner).
    pub timeout: Duration,
    /// Successful probes that bring a down builder back.
    pub rise: u32,
    /// Failed probes that take a healthy builder down.
    pub fall: u32,
    /// Longest wait between probes of a down builder.
    pub max_interval: Duration,
    /// How long a real connection's connect to the builder may take before
    /// the client is moved to another builder.
    pub connect_timeout: Duration,
}

impl Default for HealthSettings {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(2),
            rise: 1,
            fall: 2,
            max_interval: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(3),
        }
    }
}

/// How bytes of an accepted connection reach the builder.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Dataplane {
    /// Spliced in the kernel (SOCKHASH + stream_verdict).
    Kernel,
    /// Copied by the daemon.
    Userspace,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub listen: Vec<Prefix>,
    pub port: u16,
    /// Builder names, in the order the `priority` strategy fills them.
    pub builders: Vec<String>,
    pub strategy: Strategy,
    /// `[policy]`'s rules with this service's `policy` overrides.
    pub rules: LinkRules,
    /// `allow_host_addresses = true`: the operator means to claim addresses
    /// the host itself uses (127.0.0.1, ::1, a whole address family, the
    /// address of another local listener on the port).
    pub allow_host_addresses: bool,
    /// What a connection that finds every eligible builder full gets.
    pub when_full: WhenFull,
    /// How clients on this host reach a builder.
    pub local_clients: LocalClients,
    /// Load thresholds of this service's builders (`[load]` with the
    /// service's `load` over it); a builder's own override these.
    pub load: LoadLimits,
}

/// `when_full`: refuse (RST, Nix builds locally) or hold the connection
/// until a builder has a free slot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WhenFull {
    #[default]
    Refuse,
    Queue(QueueSettings),
}

/// `when_full = "queue"`'s bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueSettings {
    /// `queue_timeout`: how long a connection may wait for a slot; then
    /// it is refused (RST).
    pub timeout: Duration,
    /// `queue_limit`: connections held at once; one more is refused.
    pub limit: u32,
}

impl QueueSettings {
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
    pub const DEFAULT_LIMIT: u32 = 256;
    /// Each held connection costs two descriptors (its socket and the one
    /// that watches for the client leaving).
    pub const MAX_LIMIT: u32 = 4096;
}

/// How the kernel dataplane moves an SSH session's bytes once the handoff
/// is done. The kernel steers and counts connections the same way with
/// either; the userspace dataplane always splices.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Forward {
    /// The socket map redirects every segment in the kernel; the daemon
    /// only watches for the ends, so a pair flows on with no daemon.
    Sockmap,
    /// The daemon moves the bytes with `splice(2)` through pipes
    /// (`crate::dataplane::relay`): no copy into userspace, one wake-up
    /// per burst instead of the socket map's work item per segment.
    Splice,
}

impl Forward {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sockmap => "sockmap",
            Self::Splice => "splice",
        }
    }
}

/// `[daemon] forward`: a [`Forward`], or `auto`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ForwardSetting {
    /// The socket map where systemd's file descriptor store can keep its
    /// pairs through a crash of the daemon, `splice(2)` elsewhere.
    #[default]
    Auto,
    Sockmap,
    Splice,
}

impl ForwardSetting {
    /// The forwarding this setting gives, and why, given whether systemd's
    /// file descriptor store holds spliced pairs for this daemon. `splice(2)`
    /// is the faster of the two with real ssh and per connection (README,
    /// Benchmark); the socket map's one advantage a user feels is that its
    /// sessions outlive a crash, which only a store makes possible.
    pub fn resolve(self, fd_store: bool) -> (Forward, &'static str) {
        match (self, fd_store) {
            (Self::Sockmap, _) => (Forward::Sockmap, "set in [daemon] forward"),
            (Self::Splice, _) => (Forward::Splice, "set in [daemon] forward"),
            (Self::Auto, true) => (
                Forward::Sockmap,
                "auto: systemd's file descriptor store keeps socket-map sessions through a crash",
            ),
            (Self::Auto, false) => (
                Forward::Splice,
                "auto: no file descriptor store, so no session outlives a crash either way, \
                 and splice(2) is faster with ssh",
            ),
        }
    }
}

/// `local_clients` of a service: how clients on the daemon's host reach
/// the builder.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LocalClients {
    /// Their connect goes straight to the chosen builder (the kernel
    /// rewrites it), when the kernel supports it; else through the proxy.
    #[default]
    Direct,
    /// Through the gateway path, like clients on other hosts.
    Proxy,
}

impl Service {
    /// Each claimed (prefix, port) in words, as `yensid maps` names a
    /// binding: `127.0.0.22/32 port 22`.
    pub fn claims(&self) -> impl Iterator<Item = String> + '_ {
        self.listen
            .iter()
            .map(|p| format!("{p} port {}", self.port))
    }
}

/// When builders may be used in mode `auto`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkRules {
    /// Link kinds builders may be reached over; `None`: any.
    pub remote_via: Option<Vec<LinkKind>>,
    /// Slowest acceptable egress link; a link of unknown speed fails it.
    pub min_link_mbps: Option<u32>,
    /// Highest acceptable round-trip time (the kernel's, else the probes').
    pub max_rtt_ms: Option<u32>,
    /// Fewer eligible builders than this: the service builds locally.
    pub min_healthy_builders: u32,
}

impl Default for LinkRules {
    fn default() -> Self {
        Self {
            remote_via: None,
            min_link_mbps: None,
            max_rtt_ms: None,
            min_healthy_builders: 1,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    LeastConnections,
    RoundRobin,
    Random,
    SourceAffinity,
    Priority,
    /// Lowest measured load plus own open connections (see
    /// `yensid_ebpf::select` and `decide::load`).
    LeastLoaded,
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Strategy::LeastConnections => "least-connections",
            Strategy::RoundRobin => "round-robin",
            Strategy::Random => "random",
            Strategy::SourceAffinity => "source-affinity",
            Strategy::Priority => "priority",
            Strategy::LeastLoaded => "least-loaded",
        })
    }
}

impl Strategy {
    /// The number the kernel's selection code knows this strategy by.
    pub fn kernel_id(self) -> u32 {
        use yensid_ebpf::maps::strategy::*;
        match self {
            Strategy::LeastConnections => LEAST_CONNECTIONS,
            Strategy::RoundRobin => ROUND_ROBIN,
            Strategy::Random => RANDOM,
            Strategy::SourceAffinity => SOURCE_AFFINITY,
            Strategy::Priority => PRIORITY,
            Strategy::LeastLoaded => LEAST_LOADED,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Builder {
    pub name: String,
    /// `ip:port` or `host:port`, resolved at connect time.
    pub address: String,
    pub weight: u32,
    /// `None`: unlimited.
    pub max_connections: Option<u32>,
    pub host_key: Option<String>,
    pub health: HealthSettings,
    /// `metrics_url`: where its load is read; `None`: connection counts only.
    pub metrics: Option<MetricsSource>,
    /// Its own `load = {...}` thresholds, over each service's.
    pub load: LoadLimits,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub mode: Mode,
    /// The policy hook, run on every state change and every `hook_interval`.
    pub command: Option<PathBuf>,
    pub hook_interval: Duration,
    pub hook_timeout: Duration,
    /// Members of this group may change the mode and drain builders
    /// (besides root).
    pub control_group: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Use builders when the rules allow it.
    Auto,
    /// Use builders whatever the link rules say.
    Remote,
    /// Refuse every claimed connection, so Nix builds locally.
    Local,
}

impl std::str::FromStr for Mode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Mode::Auto),
            "remote" => Ok(Mode::Remote),
            "local" => Ok(Mode::Local),
            _ => Err(format!("`{s}` is not a mode: auto, remote or local")),
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Auto => "auto",
            Mode::Remote => "remote",
            Mode::Local => "local",
        })
    }
}

/// An address prefix claimed in the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Prefix {
    pub addr: IpAddr,
    pub len: u8,
}

impl Prefix {
    /// The address as 16 bytes (IPv4 mapped into IPv6) and the prefix length
    /// in that space, as the kernel's binding trie stores them.
    pub fn mapped(&self) -> ([u8; 16], u32) {
        match self.addr {
            IpAddr::V4(v4) => (v4.to_ipv6_mapped().octets(), 96 + self.len as u32),
            IpAddr::V6(v6) => (v6.octets(), self.len as u32),
        }
    }

    /// Whether two prefixes share at least one address.
    pub fn overlaps(&self, other: &Prefix) -> bool {
        let (a, alen) = self.mapped();
        let (b, blen) = other.mapped();
        let common = alen.min(blen);
        (0..common).all(|bit| {
            let byte = (bit / 8) as usize;
            let mask = 0x80u8 >> (bit % 8);
            a[byte] & mask == b[byte] & mask
        })
    }

    /// A host prefix (/32 or /128): a single address.
    pub fn is_host(&self) -> bool {
        self.len == self.max_len()
    }

    fn max_len(&self) -> u8 {
        if self.addr.is_ipv4() { 32 } else { 128 }
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl std::str::FromStr for Prefix {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, len) = match s.split_once('/') {
            Some((addr, len)) => (addr, Some(len)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("`{s}` is not an IP address or prefix"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len {
            None => max,
            Some(len) => len
                .parse::<u8>()
                .ok()
                .filter(|&l| l <= max)
                .ok_or_else(|| format!("`{s}`: prefix length must be 0 to {max}"))?,
        };
        let prefix = Prefix { addr, len };
        let network = prefix.network();
        if network != addr {
            return Err(format!(
                "`{s}` has host bits set; did you mean {network}/{len}?"
            ));
        }
        Ok(prefix)
    }
}

impl Prefix {
    fn network(&self) -> IpAddr {
        match self.addr {
            IpAddr::V4(v4) => {
                let mask = u32::MAX.checked_shl(32 - self.len as u32).unwrap_or(0);
                IpAddr::V4((u32::from(v4) & mask).into())
            }
            IpAddr::V6(v6) => {
                let mask = u128::MAX.checked_shl(128 - self.len as u32).unwrap_or(0);
                IpAddr::V6((u128::from(v6) & mask).into())
            }
        }
    }
}

/// One thing wrong with a configuration file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// The dotted key, e.g. `builders.b1.weight`.
    pub key: String,
    /// 1-based line, when known.
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "line {line}: {}: {}", self.key, self.message),
            None => write!(f, "{}: {}", self.key, self.message),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}", render(.0))]
    Invalid(Vec<Problem>),
}

fn render(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text)
    }

    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let raw: raw::File = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| line_of(text, s.start));
            ConfigError::Invalid(vec![Problem {
                key: key_of_parse_error(&e),
                line,
                message: e.message().trim().to_owned(),
            }])
        })?;
        validate(raw, text).map_err(ConfigError::Invalid)
    }

    pub fn builder(&self, name: &str) -> Option<&Builder> {
        self.builders.iter().find(|b| b.name == name)
    }
}

fn key_of_parse_error(e: &toml::de::Error) -> String {
    // toml names unknown fields in its message ("unknown field `x`, ...");
    // the key path itself is not exposed, so the line carries the location.
    let msg = e.message();
    match msg.split('`').nth(1) {
        Some(field) if msg.starts_with("unknown field") => field.to_owned(),
        _ => "file".to_owned(),
    }
}
