//! The configuration file: its TOML format and its validation.
//!
//! Parsing is two steps. Serde reads the file into `raw` types that keep
//! the byte span of every value worth complaining about; `validate` then
//! checks the rules serde cannot express and reports every problem at once,
//! each naming its key and line, so one run of `yensid check-config` shows
//! everything that is wrong.

use std::{
    collections::{BTreeMap, HashSet},
    fmt,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;
use toml::Spanned;
use yensid_ebpf::maps::{MAX_BACKENDS, MAX_BUILDERS, MAX_SERVICES};

use crate::decide::link::LinkKind;

pub mod load;
pub use load::{LoadLimits, MetricsSource, ScrapeSettings};

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

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

mod raw {
    use super::*;

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct File {
        #[serde(default)]
        pub daemon: Option<Spanned<Daemon>>,
        #[serde(default)]
        pub service: Vec<Spanned<Service>>,
        #[serde(default)]
        pub builders: BTreeMap<String, Spanned<Builder>>,
        #[serde(default)]
        pub policy: Option<Policy>,
        #[serde(default)]
        pub health: Option<Health>,
        #[serde(default)]
        pub links: BTreeMap<String, Spanned<String>>,
        #[serde(default)]
        pub metrics: Option<Metrics>,
        #[serde(default)]
        pub load: Option<super::load::raw::Section>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Metrics {
        pub listen: Spanned<String>,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    pub struct Health {
        pub interval: Option<Spanned<String>>,
        pub timeout: Option<Spanned<String>>,
        pub rise: Option<Spanned<i64>>,
        pub fall: Option<Spanned<i64>>,
        pub max_interval: Option<Spanned<String>>,
        pub connect_timeout: Option<Spanned<String>>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Daemon {
        pub pin_path: Option<Spanned<String>>,
        pub dataplane: Option<super::Dataplane>,
        pub state_dir: Option<Spanned<String>>,
        pub runtime_dir: Option<Spanned<String>>,
        pub read_group: Option<Spanned<String>>,
        pub ident_timeout: Option<Spanned<String>>,
        pub max_handoffs: Option<Spanned<i64>>,
        pub max_handoffs_per_client: Option<Spanned<i64>>,
        pub shutdown_grace: Option<Spanned<String>>,
        pub local_cgroup: Option<Spanned<String>>,
        pub forward: Option<super::ForwardSetting>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Service {
        pub name: Spanned<String>,
        pub listen: Spanned<Vec<Spanned<String>>>,
        pub port: Option<Spanned<i64>>,
        pub builders: Option<Vec<Spanned<String>>>,
        pub strategy: Option<super::Strategy>,
        pub policy: Option<Rules>,
        pub allow_host_addresses: Option<bool>,
        pub when_full: Option<Spanned<String>>,
        pub queue_timeout: Option<Spanned<String>>,
        pub queue_limit: Option<Spanned<i64>>,
        pub local_clients: Option<super::LocalClients>,
        pub load: Option<super::load::raw::Limits>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Builder {
        pub address: Spanned<String>,
        pub weight: Option<Spanned<i64>>,
        pub max_connections: Option<Spanned<i64>>,
        pub host_key: Option<Spanned<String>>,
        pub health: Option<Health>,
        pub metrics_url: Option<Spanned<String>>,
        pub store_mountpoint: Option<Spanned<String>>,
        pub load: Option<super::load::raw::Limits>,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    pub struct Policy {
        pub mode: Option<super::Mode>,
        // The rules a service's `policy` can override (serde's flatten
        // would lose the spans that error messages need).
        pub remote_via: Option<Vec<Spanned<String>>>,
        pub min_link_mbps: Option<Spanned<i64>>,
        pub max_rtt_ms: Option<Spanned<i64>>,
        pub min_healthy_builders: Option<Spanned<i64>>,
        pub command: Option<Spanned<String>>,
        pub hook_interval: Option<Spanned<String>>,
        pub hook_timeout: Option<Spanned<String>>,
        pub control_group: Option<Spanned<String>>,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    pub struct Rules {
        pub remote_via: Option<Vec<Spanned<String>>>,
        pub min_link_mbps: Option<Spanned<i64>>,
        pub max_rtt_ms: Option<Spanned<i64>>,
        pub min_healthy_builders: Option<Spanned<i64>>,
    }
}

struct Checker<'a> {
    text: &'a str,
    problems: Vec<Problem>,
}

impl Checker<'_> {
    fn report<T>(&mut self, key: impl Into<String>, at: &Spanned<T>, message: impl Into<String>) {
        self.problems.push(Problem {
            key: key.into(),
            line: Some(line_of(self.text, at.span().start)),
            message: message.into(),
        });
    }
}

fn validate(raw: raw::File, text: &str) -> Result<Config, Vec<Problem>> {
    let mut check = Checker {
        text,
        problems: Vec::new(),
    };

    let daemon = {
        let mut d = raw.daemon.map(Spanned::into_inner);
        let handoff = handoff_limits(&mut check, d.as_mut());
        let shutdown_grace =
            shutdown_grace(&mut check, d.as_mut().and_then(|d| d.shutdown_grace.take()));
        let local_cgroup = local_cgroup(&mut check, d.as_mut().and_then(|d| d.local_cgroup.take()));
        let (pin_path, dataplane, state_dir, runtime_dir, read_group, forward) = match d {
            None => (None, None, None, None, None, None),
            Some(d) => (
                d.pin_path,
                d.dataplane,
                d.state_dir,
                d.runtime_dir,
                d.read_group,
                d.forward,
            ),
        };
        let read_group = read_group.map(|g| {
            if g.get_ref().trim().is_empty() {
                check.report("daemon.read_group", &g, "must name a group");
            }
            g.into_inner()
        });
        let mut dir = |key: &str, value: Option<Spanned<String>>, default: &str| match value {
            None => PathBuf::from(default),
            Some(p) => {
                if !p.get_ref().starts_with('/') {
                    check.report(format!("daemon.{key}"), &p, "must be an absolute path");
                } else if key == "pin_path"
                    && let Err(msg) = check_pin_path(Path::new(p.get_ref()))
                {
                    check.report("daemon.pin_path", &p, msg);
                }
                PathBuf::from(p.into_inner())
            }
        };
        Daemon {
            pin_path: dir("pin_path", pin_path, DEFAULT_PIN_PATH),
            dataplane: dataplane.unwrap_or(Dataplane::Kernel),
            state_dir: dir("state_dir", state_dir, DEFAULT_STATE_DIR),
            runtime_dir: dir("runtime_dir", runtime_dir, DEFAULT_RUNTIME_DIR),
            read_group,
            handoff,
            shutdown_grace,
            local_cgroup,
            forward: forward.unwrap_or_default(),
        }
    };

    let health = health_settings(
        &mut check,
        "health",
        raw.health.unwrap_or_default(),
        HealthSettings::default(),
    );

    let mut builders = Vec::new();
    // Builders given by IP address, checked against the claims below.
    let mut builder_addresses: Vec<(String, Spanned<SocketAddr>)> = Vec::new();
    if raw.builders.len() > MAX_BUILDERS as usize {
        check.problems.push(Problem {
            key: "builders".into(),
            line: None,
            message: format!("at most {MAX_BUILDERS} builders are supported"),
        });
    }
    for (name, b) in raw.builders {
        let b = b.into_inner();
        let key = |field: &str| format!("builders.{name}.{field}");
        if let Err(msg) = check_address(b.address.get_ref()) {
            check.report(key("address"), &b.address, msg);
        } else if let Ok(addr) = b.address.get_ref().parse::<SocketAddr>() {
            builder_addresses.push((key("address"), Spanned::new(b.address.span(), addr)));
        }
        let weight = match b.weight {
            None => 1,
            Some(w) => match u32::try_from(*w.get_ref()) {
                Ok(w @ 1..=MAX_WEIGHT) => w,
                _ => {
                    check.report(
                        key("weight"),
                        &w,
                        format!("must be a whole number from 1 to {MAX_WEIGHT}"),
                    );
                    1
                }
            },
        };
        let max_connections = match b.max_connections {
            None => None,
            Some(m) => match u32::try_from(*m.get_ref()) {
                Ok(m @ 1..) => Some(m),
                _ => {
                    check.report(
                        key("max_connections"),
                        &m,
                        "must be at least 1 (leave it out for no limit)",
                    );
                    None
                }
            },
        };
        if let Some(k) = &b.host_key
            && !looks_like_public_key(k.get_ref())
        {
            check.report(
                key("host_key"),
                k,
                "must be `<type> <base64>`, e.g. the content of ssh_host_ed25519_key.pub",
            );
        }
        let health = match b.health {
            None => health,
            Some(h) => health_settings(&mut check, &key("health"), h, health),
        };
        let metrics = load::metrics_source(&mut check, &name, b.metrics_url, b.store_mountpoint);
        let load = b
            .load
            .map(|l| load::limits(&mut check, &key("load"), l))
            .unwrap_or_default();
        builders.push(Builder {
            name,
            address: b.address.into_inner(),
            weight,
            max_connections,
            host_key: b.host_key.map(Spanned::into_inner),
            health,
            metrics,
            load,
        });
    }

    let raw_policy = raw.policy.unwrap_or_default();
    let global = raw::Rules {
        remote_via: raw_policy.remote_via,
        min_link_mbps: raw_policy.min_link_mbps,
        max_rtt_ms: raw_policy.max_rtt_ms,
        min_healthy_builders: raw_policy.min_healthy_builders,
    };
    let global_min_healthy = global
        .min_healthy_builders
        .as_ref()
        .map(|v| Spanned::new(v.span(), ()));
    let global_rules = link_rules(&mut check, "policy", global, &LinkRules::default());
    let mut raw_load = raw.load.unwrap_or_default();
    let scrape = load::scrape_settings(&mut check, &mut raw_load);
    let global_load = load::limits(&mut check, "load", raw_load.limits());

    if raw.service.is_empty() {
        check.problems.push(Problem {
            key: "service".into(),
            line: None,
            message: "no [[service]] defined: nothing to claim".into(),
        });
    }
    if raw.service.len() > MAX_SERVICES as usize {
        check.problems.push(Problem {
            key: "service".into(),
            line: None,
            message: format!("at most {MAX_SERVICES} services are supported"),
        });
    }
    let mut services: Vec<Service> = Vec::new();
    let mut claimed: Vec<(Prefix, u16, String, Spanned<()>)> = Vec::new();
    let mut names = HashSet::new();
    for (i, s) in raw.service.into_iter().enumerate() {
        let s = s.into_inner();
        let name = s.name.get_ref().clone();
        let key = |field: &str| format!("service[{i}].{field}");
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            check.report(
                key("name"),
                &s.name,
                "must be non-empty: letters, digits, - _ .",
            );
        }
        if !names.insert(name.clone()) {
            check.report(
                key("name"),
                &s.name,
                format!("service `{name}` is defined twice"),
            );
        }
        let port = match s.port {
            None => 22,
            Some(p) => match u16::try_from(*p.get_ref()) {
                Ok(p @ 1..) => p,
                _ => {
                    check.report(key("port"), &p, "must be 1 to 65535");
                    22
                }
            },
        };
        let mut listen = Vec::new();
        if s.listen.get_ref().is_empty() {
            check.report(
                key("listen"),
                &s.listen,
                "needs at least one address prefix",
            );
        }
        for text_prefix in s.listen.get_ref() {
            match text_prefix.get_ref().parse::<Prefix>() {
                Err(msg) => check.report(key("listen"), text_prefix, msg),
                Ok(prefix) => {
                    let at = Spanned::new(text_prefix.span(), ());
                    if s.allow_host_addresses != Some(true)
                        && let Some(why) = host_address_claim(&prefix, port)
                    {
                        check.report(
                            key("listen"),
                            &at,
                            format!(
                                "{why}; set allow_host_addresses = true in this service if that is intended"
                            ),
                        );
                    }
                    for (other, other_port, other_name, _) in &claimed {
                        if *other_port == port && other.overlaps(&prefix) {
                            check.report(
                                key("listen"),
                                &at,
                                format!(
                                    "{prefix} port {port} overlaps {other} claimed by service `{other_name}`"
                                ),
                            );
                        }
                    }
                    claimed.push((prefix, port, name.clone(), at));
                    listen.push(prefix);
                }
            }
        }
        let members: Vec<String> = match &s.builders {
            None => builders.iter().map(|b| b.name.clone()).collect(),
            Some(list) => {
                let mut seen = HashSet::new();
                for b in list {
                    if !builders.iter().any(|known| &known.name == b.get_ref()) {
                        check.report(
                            key("builders"),
                            b,
                            format!(
                                "unknown builder `{}` (no [builders.{}])",
                                b.get_ref(),
                                b.get_ref()
                            ),
                        );
                    }
                    if !seen.insert(b.get_ref().clone()) {
                        check.report(
                            key("builders"),
                            b,
                            format!("`{}` is listed twice", b.get_ref()),
                        );
                    }
                }
                list.iter().map(|b| b.get_ref().clone()).collect()
            }
        };
        if members.is_empty() {
            check.report(key("builders"), &s.name, "the service has no builders");
        }
        if members.len() > MAX_BACKENDS as usize {
            check.report(
                key("builders"),
                &s.name,
                format!("at most {MAX_BACKENDS} builders per service are supported"),
            );
        }
        let own_min_healthy = s
            .policy
            .as_ref()
            .and_then(|r| r.min_healthy_builders.as_ref())
            .map(|v| Spanned::new(v.span(), ()));
        let rules = match s.policy {
            None => global_rules.clone(),
            Some(r) => link_rules(&mut check, &key("policy"), r, &global_rules),
        };
        let pool = members.len();
        if !members.is_empty() && rules.min_healthy_builders as usize > pool {
            let message = format!(
                "{} is more than the {pool} builder(s) of service `{name}`: it would never use them",
                rules.min_healthy_builders
            );
            match (&own_min_healthy, &global_min_healthy) {
                (Some(at), _) => check.report(key("policy.min_healthy_builders"), at, message),
                (None, Some(at)) => check.report("policy.min_healthy_builders", at, message),
                (None, None) => {}
            }
        }
        let when_full = when_full(
            &mut check,
            &key,
            s.when_full,
            s.queue_timeout,
            s.queue_limit,
        );
        let load = s
            .load
            .map(|l| load::limits(&mut check, &key("load"), l).over(&global_load))
            .unwrap_or(global_load);
        services.push(Service {
            name,
            listen,
            port,
            builders: members,
            strategy: s.strategy.unwrap_or(Strategy::LeastConnections),
            rules,
            allow_host_addresses: s.allow_host_addresses == Some(true),
            when_full,
            local_clients: s.local_clients.unwrap_or_default(),
            load,
        });
    }

    let hook_interval = duration_field(
        &mut check,
        "policy.hook_interval",
        raw_policy.hook_interval,
        Duration::from_secs(30),
    );
    let hook_timeout = duration_field(
        &mut check,
        "policy.hook_timeout",
        raw_policy.hook_timeout,
        Duration::from_secs(2),
    );
    let command = raw_policy.command.map(|c| {
        if !c.get_ref().starts_with('/') {
            check.report(
                "policy.command",
                &c,
                "must be an absolute path to an executable",
            );
        }
        PathBuf::from(c.into_inner())
    });
    let policy = Policy {
        mode: raw_policy.mode.unwrap_or(Mode::Auto),
        command,
        hook_interval,
        hook_timeout,
        control_group: raw_policy.control_group.map(Spanned::into_inner),
    };
    for (key, addr) in &builder_addresses {
        if let Some((service, prefix)) = claimed_by(&services, *addr.get_ref()) {
            check.report(
                key.as_str(),
                addr,
                format!(
                    "{} is inside {prefix} port {} claimed by service `{service}`: connections to the builder would be claimed again",
                    addr.get_ref(),
                    addr.get_ref().port()
                ),
            );
        }
    }
    let metrics_listen = raw.metrics.and_then(|m| {
        let problem = match m.listen.get_ref().parse::<SocketAddr>() {
            Err(_) => "must be ip:port, e.g. 127.0.0.1:9422".to_owned(),
            Ok(addr) if addr.port() == 0 => "port 0 is not a port (1 to 65535)".to_owned(),
            Ok(addr) => match claimed_by(&services, addr) {
                None => return Some(addr),
                Some((service, prefix)) => format!(
                    "{addr} is inside {prefix} port {} claimed by service `{service}`: scrapes would be claimed",
                    addr.port()
                ),
            },
        };
        check.report("metrics.listen", &m.listen, problem);
        None
    });
    let mut links = Vec::new();
    for (glob, kind) in raw.links {
        match kind.get_ref().parse::<LinkKind>() {
            Ok(k) => links.push((glob, k)),
            Err(e) => check.report(format!("links.\"{glob}\""), &kind, e.to_string()),
        }
    }

    if check.problems.is_empty() {
        Ok(Config {
            daemon,
            services,
            builders,
            policy,
            links,
            metrics_listen,
            scrape,
        })
    } else {
        check.problems.sort_by_key(|p| p.line);
        Err(check.problems)
    }
}

/// `[policy]`'s rules (or a service's `policy`) over `base`.
fn link_rules(
    check: &mut Checker<'_>,
    prefix: &str,
    raw: raw::Rules,
    base: &LinkRules,
) -> LinkRules {
    let remote_via = match raw.remote_via {
        None => base.remote_via.clone(),
        Some(kinds) => Some(
            kinds
                .iter()
                .filter_map(|k| match k.get_ref().parse::<LinkKind>() {
                    Ok(kind) => Some(kind),
                    Err(e) => {
                        check.report(format!("{prefix}.remote_via"), k, e.to_string());
                        None
                    }
                })
                .collect(),
        ),
    };
    let mut positive = |name: &str, value, default: Option<u32>| {
        count_field(check, &format!("{prefix}.{name}"), value).or(default)
    };
    LinkRules {
        remote_via,
        min_link_mbps: positive("min_link_mbps", raw.min_link_mbps, base.min_link_mbps),
        max_rtt_ms: positive("max_rtt_ms", raw.max_rtt_ms, base.max_rtt_ms),
        min_healthy_builders: positive(
            "min_healthy_builders",
            raw.min_healthy_builders,
            Some(base.min_healthy_builders),
        )
        .unwrap_or(1),
    }
}

/// `[health]` (or a builder's `health`) over `base`.
fn health_settings(
    check: &mut Checker<'_>,
    prefix: &str,
    raw: raw::Health,
    base: HealthSettings,
) -> HealthSettings {
    let mut duration = |name: &str, value, default| {
        duration_field(check, &format!("{prefix}.{name}"), value, default)
    };
    let interval = duration("interval", raw.interval, base.interval);
    let timeout = duration("timeout", raw.timeout, base.timeout);
    let max_interval = duration("max_interval", raw.max_interval, base.max_interval);
    let connect_timeout = duration("connect_timeout", raw.connect_timeout, base.connect_timeout);
    let mut count = |name: &str, value, default: u32| {
        count_field(check, &format!("{prefix}.{name}"), value).unwrap_or(default)
    };
    HealthSettings {
        interval,
        timeout,
        rise: count("rise", raw.rise, base.rise),
        fall: count("fall", raw.fall, base.fall),
        max_interval: max_interval.max(interval),
        connect_timeout,
    }
}

/// The `[daemon]` keys of [`HandoffLimits`], taken out of `raw`.
fn handoff_limits(check: &mut Checker<'_>, raw: Option<&mut raw::Daemon>) -> HandoffLimits {
    let base = HandoffLimits::default();
    let Some(raw) = raw else {
        return base;
    };
    let ident_timeout = duration_field(
        check,
        "daemon.ident_timeout",
        raw.ident_timeout.take(),
        base.ident_timeout,
    );
    let max_handoffs = count_field(check, "daemon.max_handoffs", raw.max_handoffs.take())
        .unwrap_or(base.max_handoffs);
    let per_client = raw.max_handoffs_per_client.take();
    let max_handoffs_per_client =
        match count_field(check, "daemon.max_handoffs_per_client", per_client.clone()) {
            Some(n) if n > max_handoffs => {
                if let Some(v) = &per_client {
                    check.report(
                        "daemon.max_handoffs_per_client",
                        v,
                        format!("must not be above daemon.max_handoffs ({max_handoffs})"),
                    );
                }
                max_handoffs
            }
            Some(n) => n,
            None => base.max_handoffs_per_client.min(max_handoffs),
        };
    HandoffLimits {
        ident_timeout,
        max_handoffs,
        max_handoffs_per_client,
    }
}

/// A service's `when_full`, `queue_timeout` and `queue_limit`. The queue's
/// keys without `when_full = "queue"` are a mistake, not a no-op.
fn when_full(
    check: &mut Checker<'_>,
    key: &dyn Fn(&str) -> String,
    kind: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    limit: Option<Spanned<i64>>,
) -> WhenFull {
    // Read by hand rather than as a serde enum, whose error does not name
    // the key.
    let queue = match kind.as_ref().map(|k| (k, k.get_ref().as_str())) {
        None | Some((_, "refuse")) => false,
        Some((_, "queue")) => true,
        Some((k, other)) => {
            check.report(
                key("when_full"),
                k,
                format!(
                    "`{}`: must be \"refuse\" or \"queue\"",
                    crate::dataplane::ident::escape(other.as_bytes())
                ),
            );
            false
        }
    };
    if !queue {
        if let Some(v) = &timeout {
            check.report(key("queue_timeout"), v, "only with when_full = \"queue\"");
        }
        if let Some(v) = &limit {
            check.report(key("queue_limit"), v, "only with when_full = \"queue\"");
        }
        return WhenFull::Refuse;
    }
    let timeout = duration_field(
        check,
        &key("queue_timeout"),
        timeout,
        QueueSettings::DEFAULT_TIMEOUT,
    );
    let limit = match limit {
        None => QueueSettings::DEFAULT_LIMIT,
        Some(v) => match u32::try_from(*v.get_ref()) {
            Ok(n @ 1..=QueueSettings::MAX_LIMIT) => n,
            _ => {
                check.report(
                    key("queue_limit"),
                    &v,
                    format!(
                        "must be a whole number from 1 to {}",
                        QueueSettings::MAX_LIMIT
                    ),
                );
                QueueSettings::DEFAULT_LIMIT
            }
        },
    };
    WhenFull::Queue(QueueSettings { timeout, limit })
}

/// `[daemon] local_cgroup`: an absolute path (whether it is a cgroup v2
/// directory is the kernel's to say when the daemon attaches).
fn local_cgroup(check: &mut Checker<'_>, value: Option<Spanned<String>>) -> Option<PathBuf> {
    let value = value?;
    if !value.get_ref().starts_with('/') {
        check.report("daemon.local_cgroup", &value, "must be an absolute path");
    }
    Some(PathBuf::from(value.into_inner()))
}

/// `[daemon] shutdown_grace`: like [`duration_field`], except that zero
/// is valid (stop at once).
fn shutdown_grace(check: &mut Checker<'_>, value: Option<Spanned<String>>) -> Duration {
    let Some(v) = value else {
        return DEFAULT_SHUTDOWN_GRACE;
    };
    match parse_duration(v.get_ref()) {
        Ok(d) if d > MAX_CONFIG_DURATION => {
            check.report(
                "daemon.shutdown_grace",
                &v,
                format!(
                    "`{}` is longer than the maximum of {}",
                    v.get_ref(),
                    describe_duration(MAX_CONFIG_DURATION)
                ),
            );
            DEFAULT_SHUTDOWN_GRACE
        }
        Ok(d) => d,
        Err(msg) => {
            check.report("daemon.shutdown_grace", &v, msg);
            DEFAULT_SHUTDOWN_GRACE
        }
    }
}

/// A whole-number key of at least 1: `None` when absent, or when it is
/// invalid (then reported).
fn count_field(check: &mut Checker<'_>, key: &str, value: Option<Spanned<i64>>) -> Option<u32> {
    let v = value?;
    match u32::try_from(*v.get_ref()) {
        Ok(n @ 1..) => Some(n),
        _ => {
            check.report(key, &v, "must be a whole number of at least 1");
            None
        }
    }
}

/// A duration key: `default` when absent; reported (and `default`) when
/// it does not parse, is zero or is longer than [`MAX_CONFIG_DURATION`].
fn duration_field(
    check: &mut Checker<'_>,
    key: &str,
    value: Option<Spanned<String>>,
    default: Duration,
) -> Duration {
    let Some(v) = value else {
        return default;
    };
    match parse_bounded_duration(v.get_ref(), MAX_CONFIG_DURATION) {
        Ok(d) => d,
        Err(msg) => {
            check.report(key, &v, msg);
            default
        }
    }
}

/// The longest any timing key of the configuration file may be
/// (`[health]` and `[policy]` durations): one day. Longer probe intervals,
/// timeouts or hook intervals mean a builder or a hook nobody watches.
pub const MAX_CONFIG_DURATION: Duration = Duration::from_secs(86_400);

/// The longest `yensid mode ... --for`: 365 days. An override meant to last
/// longer is one without `--for`.
pub const MAX_OVERRIDE: Duration = Duration::from_secs(365 * 86_400);

/// The highest weight of a builder, in the configuration and from the
/// policy hook: relative capacities beyond 1000:1 mean nothing, and the
/// kernel's selection multiplies loads by weights.
pub const MAX_WEIGHT: u32 = 1000;

/// `"500ms"`, `"5s"`, `"2m"`, `"1h"`, `"1d"`, or a combination like
/// `"1m30s"`. Sums and unit conversions are checked: a duration that does
/// not fit is an error, never a panic or a shorter duration.
///
/// Parsed here rather than by `humantime` (or `jiff`'s friendly format),
/// because the grammar is meant to be this narrow: whole milliseconds to
/// days, no spaces, no months or years of inexact length. It is exactly
/// what [`describe_duration`] prints, so every duration the daemon shows
/// (in `status`, the log, errors) reads back as the same value.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("`{text}` is not a duration (examples: 500ms, 5s, 2m, 1h, 1d, 1m30s)");
    let too_long = || format!("`{text}` is too long a duration");
    let mut total = Duration::ZERO;
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        if digits == 0 {
            return Err(bad());
        }
        // Only digits: a parse error is an overflow.
        let value: u64 = rest[..digits].parse().map_err(|_| too_long())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let millis_per_unit: u64 = match &rest[..unit_len] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(bad()),
        };
        let part = value
            .checked_mul(millis_per_unit)
            .map(Duration::from_millis)
            .ok_or_else(too_long)?;
        total = total.checked_add(part).ok_or_else(too_long)?;
        rest = &rest[unit_len..];
    }
    Ok(total)
}

/// [`parse_duration`] for a value that must be longer than zero (an
/// interval of zero would spin or panic) and at most `max`.
pub fn parse_bounded_duration(text: &str, max: Duration) -> Result<Duration, String> {
    match parse_duration(text)? {
        d if d.is_zero() => Err("must be longer than zero".to_owned()),
        d if d > max => Err(format!(
            "`{text}` is longer than the maximum of {}",
            describe_duration(max)
        )),
        d => Ok(d),
    }
}

/// A whole duration in the largest unit that divides it: `1d`, `90s`.
pub fn describe_duration(d: Duration) -> String {
    let ms = d.as_millis();
    for (unit, per) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
    ] {
        if ms.is_multiple_of(per) && ms >= per {
            return format!("{}{unit}", ms / per);
        }
    }
    format!("{ms}ms")
}

/// `pin_path` must name a directory of its own: a clean stop removes what
/// yensid pinned there and then the directory, so it may be neither `/`
/// nor the bpffs mount itself, where other programs pin their objects
/// (whether its parent is on a bpffs only the running daemon can tell).
pub fn check_pin_path(path: &Path) -> Result<(), String> {
    use std::path::Component;
    if path
        .components()
        .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
    {
        return Err(format!("`{}` must not contain `.` or `..`", path.display()));
    }
    if path.parent().is_none() || path == Path::new(BPFFS_MOUNT) {
        return Err(format!(
            "`{}` is a mount point other programs pin objects in; use a directory of its own \
             such as {DEFAULT_PIN_PATH}: a clean stop removes the pin directory",
            path.display()
        ));
    }
    Ok(())
}

/// Why a claim would take traffic meant for the host itself, if it would:
/// a whole address family, or a prefix that holds 127.0.0.1 or ::1 (the
/// host's own SSH and every other loopback service on the port).
pub fn host_address_claim(prefix: &Prefix, port: u16) -> Option<String> {
    if prefix.len == 0 {
        return Some(format!(
            "{prefix} claims a whole address family: it would take the host's own SSH and \
             every other service on port {port}"
        ));
    }
    let loopback: [IpAddr; 2] = [
        std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::Ipv6Addr::LOCALHOST.into(),
    ];
    loopback.into_iter().find_map(|addr| {
        let host = Prefix {
            addr,
            len: if addr.is_ipv4() { 32 } else { 128 },
        };
        prefix.overlaps(&host).then(|| {
            format!(
                "{prefix} contains {addr}: it would take the host's own {} on {}",
                if port == 22 { "SSH" } else { "service" },
                SocketAddr::new(addr, port)
            )
        })
    })
}

/// The claim of `services` that `addr` falls in (its service's name and
/// the prefix), if any: a builder or the metrics endpoint there would be
/// claimed by yensid itself.
fn claimed_by(services: &[Service], addr: SocketAddr) -> Option<(&str, &Prefix)> {
    let host = Prefix {
        addr: addr.ip(),
        len: if addr.is_ipv4() { 32 } else { 128 },
    };
    services.iter().find_map(|s| {
        (s.port == addr.port())
            .then(|| s.listen.iter().find(|p| p.overlaps(&host)))
            .flatten()
            .map(|p| (s.name.as_str(), p))
    })
}

fn check_address(address: &str) -> Result<(), String> {
    if let Ok(addr) = address.parse::<SocketAddr>() {
        if addr.port() == 0 {
            return Err(format!("`{address}`: port 0 is not a port (1 to 65535)"));
        }
        return Ok(());
    }
    let Some((host, port)) = address.rsplit_once(':') else {
        return Err(format!(
            "`{address}` needs a port: `ip:port` or `host:port`"
        ));
    };
    if port.parse::<u16>().ok().filter(|&p| p > 0).is_none() {
        return Err(format!("`{address}`: `{port}` is not a port (1 to 65535)"));
    }
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty() && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    if host_ok {
        Ok(())
    } else {
        Err(format!(
            "`{address}`: `{host}` is neither an IP address nor a host name (IPv6 needs brackets: [::1]:22)"
        ))
    }
}

fn looks_like_public_key(key: &str) -> bool {
    let mut parts = key.split_whitespace();
    matches!(
        (parts.next(), parts.next()),
        (Some(kind), Some(blob))
            if (kind.starts_with("ssh-") || kind.starts_with("ecdsa-") || kind.starts_with("sk-"))
                && blob.len() >= 16
                && blob.chars().all(|c| c.is_ascii_alphanumeric() || "+/=".contains(c))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[[service]]
name = "x86"
listen = ["127.0.0.22/32", "fd00::22"]
builders = ["b2", "b1"]
strategy = "priority"

[builders.b1]
address = "198.18.1.2:22"
weight = 2
max_connections = 8
host_key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHJ0"

[builders.b2]
address = "builder-2.example:2222"

[policy]
mode = "local"
"#;

    fn problems(text: &str) -> Vec<String> {
        match Config::parse(text) {
            Ok(_) => panic!("expected problems in:\n{text}"),
            Err(ConfigError::Invalid(p)) => p.iter().map(ToString::to_string).collect(),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn when_full_defaults_to_refuse_and_queue_keys_are_checked_with_their_key() {
        assert_eq!(
            Config::parse(GOOD).unwrap().services[0].when_full,
            WhenFull::Refuse
        );
        let with = |keys: &str| GOOD.replace("strategy = \"priority\"", keys);
        let c = Config::parse(&with("when_full = \"queue\"")).unwrap();
        assert_eq!(
            c.services[0].when_full,
            WhenFull::Queue(QueueSettings {
                timeout: Duration::from_secs(60),
                limit: 256
            })
        );
        let c = Config::parse(&with(
            "when_full = \"queue\"\nqueue_timeout = \"2m\"\nqueue_limit = 10",
        ))
        .unwrap();
        assert_eq!(
            c.services[0].when_full,
            WhenFull::Queue(QueueSettings {
                timeout: Duration::from_secs(120),
                limit: 10
            })
        );
        let p = problems(&with("queue_timeout = \"10s\""));
        assert!(
            p[0].contains("service[0].queue_timeout") && p[0].contains("only with"),
            "{p:?}"
        );
        let p = problems(&with("when_full = \"refuse\"\nqueue_limit = 3"));
        assert!(p[0].contains("service[0].queue_limit"), "{p:?}");
        let p = problems(&with("when_full = \"queue\"\nqueue_timeout = \"2d\""));
        assert!(
            p[0].contains("service[0].queue_timeout") && p[0].contains("maximum"),
            "{p:?}"
        );
        let p = problems(&with("when_full = \"queue\"\nqueue_timeout = \"0s\""));
        assert!(p[0].contains("service[0].queue_timeout"), "{p:?}");
        for bad in ["0", "-1", "4097"] {
            let p = problems(&with(&format!(
                "when_full = \"queue\"\nqueue_limit = {bad}"
            )));
            assert!(p[0].contains("service[0].queue_limit"), "{bad}: {p:?}");
        }
        let p = problems(&with("when_full = \"wait\""));
        assert!(
            p[0].contains("service[0].when_full") && p[0].contains("`wait`"),
            "{p:?}"
        );
    }

    #[test]
    fn a_full_config_parses_with_defaults_filled_in() {
        let c = Config::parse(GOOD).unwrap();
        assert_eq!(c.daemon.pin_path, PathBuf::from(DEFAULT_PIN_PATH));
        assert_eq!(c.daemon.dataplane, Dataplane::Kernel);
        assert_eq!(
            c.daemon.control_socket(),
            PathBuf::from("/run/yensid/yensid.sock")
        );
        assert_eq!(
            c.daemon.state_file(),
            PathBuf::from("/var/lib/yensid/yensid.json")
        );
        assert_eq!(c.services[0].port, 22);
        assert_eq!(c.services[0].builders, ["b2", "b1"]);
        assert_eq!(c.services[0].strategy, Strategy::Priority);
        assert_eq!(c.services[0].listen[1].to_string(), "fd00::22/128");
        assert_eq!(c.builder("b1").unwrap().weight, 2);
        assert_eq!(c.builder("b2").unwrap().weight, 1);
        assert_eq!(c.builder("b2").unwrap().max_connections, None);
        assert_eq!(c.policy.mode, Mode::Local);
    }

    #[test]
    fn service_builders_default_to_every_builder() {
        let c = Config::parse(&GOOD.replace("builders = [\"b2\", \"b1\"]\n", "")).unwrap();
        assert_eq!(c.services[0].builders, ["b1", "b2"]);
        assert_eq!(c.services[0].strategy, Strategy::Priority);
    }

    #[test]
    fn shutdown_grace_defaults_allows_zero_and_is_bounded() {
        let grace = |line: &str| Config::parse(&format!("[daemon]\n{line}\n{GOOD}"));
        assert_eq!(
            Config::parse(GOOD).unwrap().daemon.shutdown_grace,
            DEFAULT_SHUTDOWN_GRACE
        );
        assert_eq!(
            grace("shutdown_grace = \"0s\"")
                .unwrap()
                .daemon
                .shutdown_grace,
            Duration::ZERO
        );
        assert_eq!(
            grace("shutdown_grace = \"2m\"")
                .unwrap()
                .daemon
                .shutdown_grace,
            Duration::from_secs(120)
        );
        for bad in ["\"2d\"", "\"soon\"", "\"-1s\""] {
            let p = problems(&format!("[daemon]\nshutdown_grace = {bad}\n{GOOD}"));
            assert!(
                p.len() == 1 && p[0].contains("daemon.shutdown_grace"),
                "{bad}: {p:?}"
            );
        }
    }

    #[test]
    fn handoff_limits_have_defaults_and_are_checked_with_their_key() {
        let c = Config::parse(GOOD).unwrap();
        assert_eq!(c.daemon.handoff, HandoffLimits::default());
        let set = format!(
            "[daemon]\nident_timeout = \"2s\"\nmax_handoffs = 64\nmax_handoffs_per_client = 8\n{GOOD}"
        );
        let h = Config::parse(&set).unwrap().daemon.handoff;
        assert_eq!(
            (h.ident_timeout, h.max_handoffs, h.max_handoffs_per_client),
            (Duration::from_secs(2), 64, 8)
        );
        // Below the per-client default, the total caps it.
        let small = format!("[daemon]\nmax_handoffs = 16\n{GOOD}");
        assert_eq!(
            Config::parse(&small)
                .unwrap()
                .daemon
                .handoff
                .max_handoffs_per_client,
            16
        );
        let bad = format!(
            "[daemon]\nident_timeout = \"0s\"\nmax_handoffs = 0\nmax_handoffs_per_client = -1\n{GOOD}"
        );
        assert_eq!(
            problems(&bad),
            [
                "line 2: daemon.ident_timeout: must be longer than zero",
                "line 3: daemon.max_handoffs: must be a whole number of at least 1",
                "line 4: daemon.max_handoffs_per_client: must be a whole number of at least 1",
            ]
        );
        let above = format!("[daemon]\nmax_handoffs = 4\nmax_handoffs_per_client = 5\n{GOOD}");
        assert_eq!(
            problems(&above),
            ["line 3: daemon.max_handoffs_per_client: must not be above daemon.max_handoffs (4)"]
        );
    }

    #[test]
    fn read_group_is_optional_and_must_name_a_group() {
        assert_eq!(Config::parse(GOOD).unwrap().daemon.read_group, None);
        let with = |group: &str| format!("[daemon]\nread_group = \"{group}\"\n{GOOD}");
        assert_eq!(
            Config::parse(&with("adm"))
                .unwrap()
                .daemon
                .read_group
                .as_deref(),
            Some("adm")
        );
        assert_eq!(
            problems(&with(" ")),
            ["line 2: daemon.read_group: must name a group"]
        );
    }

    #[test]
    fn unknown_keys_are_named_with_their_line() {
        let p = problems(&GOOD.replace("weight = 2", "wieght = 2"));
        assert_eq!(p.len(), 1);
        assert!(p[0].starts_with("line 10: wieght: unknown field"), "{p:?}");
    }

    #[test]
    fn unknown_builder_names_are_reported() {
        let p = problems(&GOOD.replace("[\"b2\", \"b1\"]", "[\"b2\", \"b3\"]"));
        assert_eq!(
            p,
            ["line 5: service[0].builders: unknown builder `b3` (no [builders.b3])"]
        );
    }

    #[test]
    fn bad_values_are_all_reported_at_once() {
        let text = GOOD
            .replace("weight = 2", "weight = 0")
            .replace("198.18.1.2:22", "198.18.1.2")
            .replace("max_connections = 8", "max_connections = -1")
            .replace("127.0.0.22/32", "127.0.0.22/33");
        let p = problems(&text);
        assert_eq!(p.len(), 4, "{p:?}");
        assert!(p[0].starts_with("line 4: service[0].listen: `127.0.0.22/33`"));
        assert!(p[1].starts_with("line 9: builders.b1.address: `198.18.1.2` needs a port"));
        assert!(p[2].starts_with("line 10: builders.b1.weight: must be"));
        assert!(p[3].starts_with("line 11: builders.b1.max_connections: must be"));
    }

    #[test]
    fn overlapping_prefixes_on_one_port_are_refused() {
        let text = format!("{GOOD}\n[[service]]\nname = \"arm\"\nlisten = [\"127.0.0.16/28\"]\n");
        let p = problems(&text);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("service[1].listen: 127.0.0.16/28 port 22 overlaps 127.0.0.22/32 claimed by service `x86`"));
        let other_port = text.replace(
            "listen = [\"127.0.0.16/28\"]",
            "listen = [\"127.0.0.16/28\"]\nport = 2222",
        );
        assert!(Config::parse(&other_port).is_ok());
    }

    #[test]
    fn host_bits_and_bad_strategy_and_mode_are_named() {
        let p = problems(&GOOD.replace("127.0.0.22/32", "127.0.0.22/24"));
        assert!(p[0].contains("did you mean 127.0.0.0/24"), "{p:?}");
        let p = problems(&GOOD.replace("\"priority\"", "\"fastest\""));
        assert!(
            p[0].starts_with("line 6: file: unknown variant `fastest`"),
            "{p:?}"
        );
        let p = problems(&GOOD.replace("\"local\"", "\"sometimes\""));
        assert!(p[0].contains("unknown variant `sometimes`"), "{p:?}");
    }

    #[test]
    fn duplicate_services_and_empty_configs_are_refused() {
        let p = problems(&format!(
            "{GOOD}\n[[service]]\nname = \"x86\"\nlisten = [\"127.0.0.23\"]\n"
        ));
        assert!(p[0].contains("service `x86` is defined twice"), "{p:?}");
        let p = problems("");
        assert_eq!(p, ["service: no [[service]] defined: nothing to claim"]);
    }

    #[test]
    fn health_defaults_global_settings_and_per_builder_overrides() {
        let text = format!(
            "{GOOD}\n[health]\ninterval = \"1s\"\nfall = 3\n\n[builders.b3]\naddress = \"198.18.3.2:22\"\nhealth = {{ interval = \"250ms\", rise = 2 }}\n"
        );
        let c = Config::parse(&text).unwrap();
        let b1 = c.builder("b1").unwrap().health;
        assert_eq!(
            (b1.interval, b1.fall, b1.rise),
            (Duration::from_secs(1), 3, 1)
        );
        assert_eq!(b1.timeout, Duration::from_secs(2));
        assert_eq!(b1.connect_timeout, Duration::from_secs(3));
        let b3 = c.builder("b3").unwrap().health;
        assert_eq!(
            (b3.interval, b3.fall, b3.rise),
            (Duration::from_millis(250), 3, 2)
        );
        let p = problems(&format!(
            "{GOOD}\n[health]\ninterval = \"soon\"\nrise = 0\n"
        ));
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(
            p[0].starts_with("line 21: health.interval: `soon` is not a duration"),
            "{p:?}"
        );
        assert!(p[1].starts_with("line 22: health.rise: must be"), "{p:?}");
    }

    #[test]
    fn link_rules_are_global_and_overridable_per_service() {
        let text = GOOD.replace(
            "[policy]\nmode = \"local\"",
            "[policy]\nmode = \"auto\"\nremote_via = [\"ethernet\", \"vpn\"]\nmin_link_mbps = 100\ncommand = \"/etc/yensid/policy\"\nhook_interval = \"10s\"\n\n[links]\n\"enx*\" = \"wwan\"",
        );
        let text = text.replace(
            "strategy = \"priority\"",
            "strategy = \"priority\"\npolicy = { remote_via = [\"ethernet\"], max_rtt_ms = 20 }",
        );
        let c = Config::parse(&text).unwrap();
        let rules = &c.services[0].rules;
        assert_eq!(rules.remote_via, Some(vec![LinkKind::Ethernet]));
        assert_eq!(rules.min_link_mbps, Some(100), "inherited");
        assert_eq!(rules.max_rtt_ms, Some(20));
        assert_eq!(rules.min_healthy_builders, 1);
        assert_eq!(c.links, vec![("enx*".to_owned(), LinkKind::Wwan)]);
        assert_eq!(c.policy.command, Some(PathBuf::from("/etc/yensid/policy")));
        assert_eq!(c.policy.hook_interval, Duration::from_secs(10));
        let p = problems(
            &text
                .replace("\"vpn\"]", "\"carrier-pigeon\"]")
                .replace("\"wwan\"", "\"modem\""),
        );
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(
            p.iter()
                .any(|p| p.contains("policy.remote_via: ") && p.contains("carrier-pigeon")),
            "{p:?}"
        );
        assert!(
            p.iter()
                .any(|p| p.contains("links.\"enx*\"") && p.contains("modem")),
            "{p:?}"
        );
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        // Found by the `duration` fuzz target: units and sums that overflow.
        assert!(parse_duration("307445734561825861m").is_err());
        assert!(parse_duration("5124095576030432h").is_err());
        assert!(parse_duration("18446744073709551615s1s").is_err());
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("5 s").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn durations_never_overflow_or_wrap() {
        let too_long = |t: &str| {
            let e = parse_duration(t).unwrap_err();
            assert!(e.contains("too long"), "{t}: {e}");
        };
        too_long("18446744073709551616s");
        too_long("18446744073709551615s");
        too_long("5124095576030432h");
        too_long("9223372036854775807s9223372036854775807s");
        too_long("99999999999999999999999999ms");
        assert_eq!(parse_duration("1d2h"), Ok(Duration::from_secs(93_600)));
        assert_eq!(
            parse_duration("18446744073709551s"),
            Ok(Duration::from_secs(18_446_744_073_709_551))
        );
        assert!(parse_duration("1x").is_err());
        assert!(parse_duration("ms").is_err());
    }

    #[test]
    fn bounded_durations_reject_zero_and_too_long() {
        let day = MAX_CONFIG_DURATION;
        assert_eq!(parse_bounded_duration("1d", day), Ok(day));
        assert_eq!(
            parse_bounded_duration("0s", day),
            Err("must be longer than zero".to_owned())
        );
        assert_eq!(
            parse_bounded_duration("25h", day),
            Err("`25h` is longer than the maximum of 1d".to_owned())
        );
        assert!(parse_bounded_duration("366d", MAX_OVERRIDE).is_err());
        assert_eq!(describe_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(describe_duration(MAX_OVERRIDE), "365d");
    }

    #[test]
    fn timing_keys_are_bounded_and_named() {
        let p = problems(&format!(
            "{GOOD}\n[health]\ninterval = \"18446744073709551615s\"\ntimeout = \"0s\"\nmax_interval = \"2d\"\n"
        ));
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(
            p[0].starts_with("line 21: health.interval: `18446744073709551615s` is too long"),
            "{p:?}"
        );
        assert!(
            p[1].starts_with("line 22: health.timeout: must be longer than zero"),
            "{p:?}"
        );
        assert!(
            p[2].starts_with("line 23: health.max_interval: `2d` is longer than the maximum of 1d"),
            "{p:?}"
        );
        let p = problems(&GOOD.replace(
            "mode = \"local\"",
            "mode = \"local\"\nhook_interval = \"0ms\"\nhook_timeout = \"100000h\"",
        ));
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(
            p[0].contains("policy.hook_interval: must be longer than zero"),
            "{p:?}"
        );
        assert!(
            p[1].contains("policy.hook_timeout: `100000h` is longer"),
            "{p:?}"
        );
    }

    #[test]
    fn weights_are_bounded() {
        let p = problems(&GOOD.replace("weight = 2", "weight = 1001"));
        assert_eq!(
            p,
            ["line 10: builders.b1.weight: must be a whole number from 1 to 1000"]
        );
        assert!(Config::parse(&GOOD.replace("weight = 2", "weight = 1000")).is_ok());
    }

    #[test]
    fn pin_path_must_be_a_directory_of_its_own() {
        for bad in [
            "/sys/fs/bpf",
            "/sys/fs/bpf/",
            "/",
            "/sys/fs/bpf/../bpf",
            "//sys/fs/bpf",
        ] {
            let p = problems(&format!("[daemon]\npin_path = \"{bad}\"\n{GOOD}"));
            assert_eq!(p.len(), 1, "{bad}: {p:?}");
            assert!(p[0].starts_with("line 2: daemon.pin_path: "), "{p:?}");
        }
        assert!(Config::parse(&format!("[daemon]\npin_path = \"/sys/fs/bpf/x\"\n{GOOD}")).is_ok());
    }

    #[test]
    fn claims_of_the_hosts_own_addresses_need_an_explicit_key() {
        for (claim, why) in [
            (
                "127.0.0.0/8",
                "contains 127.0.0.1: it would take the host's own SSH on 127.0.0.1:22",
            ),
            ("127.0.0.1", "contains 127.0.0.1"),
            ("0.0.0.0/0", "claims a whole address family"),
            ("::/0", "claims a whole address family"),
            (
                "::1",
                "contains ::1: it would take the host's own SSH on [::1]:22",
            ),
            ("::ffff:0.0.0.0/96", "contains 127.0.0.1"),
        ] {
            let text = GOOD
                .replace("\"127.0.0.22/32\", \"fd00::22\"", &format!("\"{claim}\""))
                .replace("198.18.1.2:22", "builder-1.example:22");
            let p = problems(&text);
            assert_eq!(p.len(), 1, "{claim}: {p:?}");
            assert!(p[0].starts_with("line 4: service[0].listen: "), "{p:?}");
            assert!(p[0].contains(why), "{claim}: {p:?}");
            assert!(p[0].contains("allow_host_addresses = true"), "{p:?}");
            let allowed = text.replace(
                "strategy = \"priority\"",
                "strategy = \"priority\"\nallow_host_addresses = true",
            );
            let c = Config::parse(&allowed).unwrap();
            assert!(c.services[0].allow_host_addresses);
        }
        assert!(!Config::parse(GOOD).unwrap().services[0].allow_host_addresses);
        let p = problems(
            &GOOD
                .replace("[[service]]", "[[service]]\nport = 2222")
                .replace("\"127.0.0.22/32\", ", "\"127.0.0.0/8\", "),
        );
        assert!(
            p[0].contains("the host's own service on 127.0.0.1:2222"),
            "{p:?}"
        );
    }

    #[test]
    fn builders_and_metrics_must_not_be_claimed_and_ports_are_not_zero() {
        let p = problems(&GOOD.replace("198.18.1.2:22", "198.18.1.2:0"));
        assert_eq!(
            p,
            ["line 9: builders.b1.address: `198.18.1.2:0`: port 0 is not a port (1 to 65535)"]
        );
        let p = problems(&GOOD.replace("198.18.1.2:22", "127.0.0.22:22"));
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].starts_with("line 9: builders.b1.address: 127.0.0.22:22 is inside 127.0.0.22/32 port 22 claimed by service `x86`"), "{p:?}");
        assert!(Config::parse(&GOOD.replace("198.18.1.2:22", "127.0.0.22:2222")).is_ok());
        let p = problems(&format!("{GOOD}\n[metrics]\nlisten = \"[fd00::22]:22\"\n"));
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].contains("metrics.listen: [fd00::22]:22 is inside fd00::22/128 port 22"),
            "{p:?}"
        );
        let p = problems(&format!("{GOOD}\n[metrics]\nlisten = \"127.0.0.1:0\"\n"));
        assert!(p[0].contains("metrics.listen: port 0"), "{p:?}");
    }

    #[test]
    fn min_healthy_builders_cannot_exceed_the_pool() {
        let p = problems(&GOOD.replace(
            "mode = \"local\"",
            "mode = \"local\"\nmin_healthy_builders = 3",
        ));
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].starts_with("line 19: policy.min_healthy_builders: 3 is more than the 2 builder(s) of service `x86`"), "{p:?}");
        let p = problems(&GOOD.replace(
            "strategy = \"priority\"",
            "strategy = \"priority\"\npolicy = { min_healthy_builders = 5 }",
        ));
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].starts_with("line 7: service[0].policy.min_healthy_builders: 5 is more"),
            "{p:?}"
        );
        assert!(
            Config::parse(&GOOD.replace(
                "mode = \"local\"",
                "mode = \"local\"\nmin_healthy_builders = 2"
            ))
            .is_ok()
        );
    }

    #[test]
    fn addresses_accept_hosts_and_bracketed_ipv6() {
        assert!(check_address("[::1]:22").is_ok());
        assert!(check_address("builder.example:22").is_ok());
        assert!(check_address("::1:22").is_err());
        assert!(check_address("builder:0").is_err());
        assert!(check_address("bad host:22").is_err());
    }

    #[test]
    fn prefixes_overlap_by_their_common_bits() {
        let p = |s: &str| s.parse::<Prefix>().unwrap();
        assert!(p("198.18.0.0/15").overlaps(&p("198.19.4.4")));
        assert!(!p("198.18.0.0/16").overlaps(&p("198.19.4.4")));
        assert!(!p("127.0.0.22").overlaps(&p("::ffff:127.0.0.23")));
        assert!(p("::ffff:127.0.0.0/104").overlaps(&p("127.0.0.22")));
    }
}

#[cfg(test)]
mod local_path_tests {
    use super::*;

    const SERVICE: &str = "[[service]]\nname = \"s\"\nlisten = [\"127.0.0.22/32\"]\n";
    const BUILDER: &str = "[builders.b1]\naddress = \"198.18.1.2:22\"\n";

    #[test]
    fn local_clients_default_to_direct_and_the_cgroup_to_the_root() {
        let c = Config::parse(&format!("{SERVICE}{BUILDER}")).unwrap();
        assert_eq!(c.services[0].local_clients, LocalClients::Direct);
        assert_eq!(c.daemon.local_cgroup, None);
        let c = Config::parse(&format!(
            "[daemon]\nlocal_cgroup = \"/sys/fs/cgroup/nix\"\n{SERVICE}local_clients = \"proxy\"\n{BUILDER}"
        ))
        .unwrap();
        assert_eq!(c.services[0].local_clients, LocalClients::Proxy);
        assert_eq!(
            c.daemon.local_cgroup,
            Some(PathBuf::from("/sys/fs/cgroup/nix"))
        );
    }

    #[test]
    fn bad_local_settings_name_their_key() {
        let p = Config::parse(&format!(
            "[daemon]\nlocal_cgroup = \"nix\"\n{SERVICE}{BUILDER}"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            p.contains("daemon.local_cgroup") && p.contains("absolute"),
            "{p}"
        );
        let p = Config::parse(&format!(
            "{SERVICE}local_clients = \"sometimes\"\n{BUILDER}"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            p.contains("local_clients") || p.contains("sometimes"),
            "{p}"
        );
    }
}

#[cfg(test)]
mod forward_tests {
    use super::*;

    const SERVICE_AND_BUILDER: &str = "[[service]]\nname = \"s\"\nlisten = [\"127.0.0.22/32\"]\n[builders.b1]\naddress = \"198.18.1.2:22\"\n";

    #[test]
    fn forward_defaults_to_auto_and_takes_either_way() {
        let c = Config::parse(SERVICE_AND_BUILDER).unwrap();
        assert_eq!(c.daemon.forward, ForwardSetting::Auto);
        for (value, setting) in [
            ("auto", ForwardSetting::Auto),
            ("sockmap", ForwardSetting::Sockmap),
            ("splice", ForwardSetting::Splice),
        ] {
            let c = Config::parse(&format!(
                "[daemon]\nforward = \"{value}\"\n{SERVICE_AND_BUILDER}"
            ))
            .unwrap();
            assert_eq!(c.daemon.forward, setting);
        }
    }

    #[test]
    fn auto_keeps_the_socket_map_only_where_a_store_keeps_its_sessions() {
        assert_eq!(ForwardSetting::Auto.resolve(true).0, Forward::Sockmap);
        assert_eq!(ForwardSetting::Auto.resolve(false).0, Forward::Splice);
        for store in [true, false] {
            assert_eq!(ForwardSetting::Sockmap.resolve(store).0, Forward::Sockmap);
            assert_eq!(ForwardSetting::Splice.resolve(store).0, Forward::Splice);
        }
        assert!(ForwardSetting::Auto.resolve(false).1.starts_with("auto:"));
        assert!(
            ForwardSetting::Splice
                .resolve(true)
                .1
                .contains("[daemon] forward")
        );
    }

    #[test]
    fn an_unknown_forward_names_the_choices() {
        let p = Config::parse(&format!(
            "[daemon]\nforward = \"copy\"\n{SERVICE_AND_BUILDER}"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            p.contains("copy")
                && p.contains("auto")
                && p.contains("sockmap")
                && p.contains("splice"),
            "{p}"
        );
    }
}
