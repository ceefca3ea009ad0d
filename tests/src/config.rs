//! The daemon's configuration file (docs/CONTRACT.md), built as data and rendered to
//! TOML, so a test can change one field and reload.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::topology::{SERVICE_ADDR, SERVICE_PORT, Topology};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dataplane {
    /// sockmap splicing in the kernel.
    Kernel,
    /// splice(2) or copy in the daemon.
    Userspace,
}

impl Dataplane {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Kernel => "kernel",
            Self::Userspace => "userspace",
        }
    }
}

/// `[daemon] forward`: how the kernel dataplane moves a session's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Forward {
    /// The socket map, in the kernel.
    Sockmap,
    /// splice(2) through pipes, by the daemon.
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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    LeastConnections,
    RoundRobin,
    Random,
    SourceAffinity,
    Priority,
    LeastLoaded,
}

impl Strategy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::LeastConnections => "least-connections",
            Self::RoundRobin => "round-robin",
            Self::Random => "random",
            Self::SourceAffinity => "source-affinity",
            Self::Priority => "priority",
            Self::LeastLoaded => "least-loaded",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyMode {
    Auto,
    Remote,
    Local,
}

impl PolicyMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Remote => "remote",
            Self::Local => "local",
        }
    }
}

/// What kind of link an interface is, as `[links]` labels and `remote_via` name them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkKind {
    Ethernet,
    Wifi,
    Wwan,
    Vpn,
    Loopback,
    /// veth, bridge, ...: what the test topology's links are unless labelled.
    Virtual,
    Other,
}

impl LinkKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ethernet => "ethernet",
            Self::Wifi => "wifi",
            Self::Wwan => "wwan",
            Self::Vpn => "vpn",
            Self::Loopback => "loopback",
            Self::Virtual => "virtual",
            Self::Other => "other",
        }
    }
}

/// The link rules of `[policy]`, or of a service's `policy = { ... }` over them;
/// `None` fields are left out.
#[derive(Clone, Debug, Default)]
pub struct LinkRules {
    /// Link kinds builders may be reached over.
    pub remote_via: Option<Vec<LinkKind>>,
    pub min_link_mbps: Option<u32>,
    pub max_rtt_ms: Option<u32>,
    pub min_healthy_builders: Option<u32>,
}

impl LinkRules {
    /// `key = value` pairs, in a fixed order.
    fn pairs(&self) -> Vec<(&'static str, String)> {
        let mut pairs = Vec::new();
        if let Some(kinds) = &self.remote_via {
            let kinds: Vec<String> = kinds.iter().map(|k| k.as_str().to_owned()).collect();
            pairs.push(("remote_via", list(&kinds)));
        }
        for (key, value) in [
            ("min_link_mbps", self.min_link_mbps),
            ("max_rtt_ms", self.max_rtt_ms),
            ("min_healthy_builders", self.min_healthy_builders),
        ] {
            if let Some(value) = value {
                pairs.push((key, value.to_string()));
            }
        }
        pairs
    }
}

/// The `[policy]` table but its `mode` ([`DaemonConfig::policy_mode`]); `None` fields
/// are left out. Durations are written in milliseconds.
#[derive(Clone, Debug, Default)]
pub struct PolicyConfig {
    pub rules: LinkRules,
    /// The policy hook: an absolute path.
    pub command: Option<PathBuf>,
    pub hook_interval: Option<Duration>,
    pub hook_timeout: Option<Duration>,
    pub control_group: Option<String>,
}

impl PolicyConfig {
    /// `key = value` pairs, in a fixed order.
    fn pairs(&self) -> Vec<(&'static str, String)> {
        let mut pairs = self.rules.pairs();
        if let Some(command) = &self.command {
            pairs.push(("command", quote(&command.display().to_string())));
        }
        for (key, value) in [
            ("hook_interval", self.hook_interval),
            ("hook_timeout", self.hook_timeout),
        ] {
            if let Some(value) = value {
                pairs.push((key, quote(&format!("{}ms", value.as_millis()))));
            }
        }
        if let Some(group) = &self.control_group {
            pairs.push(("control_group", quote(group)));
        }
        pairs
    }
}

/// One `[[service]]`.
#[derive(Clone, Debug)]
pub struct ServiceConfig {
    pub name: String,
    /// Claimed prefixes, e.g. `127.0.0.22/32`.
    pub listen: Vec<String>,
    pub port: u16,
    /// `None` leaves the key out: every builder.
    pub builders: Option<Vec<String>>,
    pub strategy: Strategy,
    /// This service's `policy = { ... }` over the `[policy]` rules.
    pub policy: Option<LinkRules>,
    /// `when_full` and the queue's keys; `None` leaves them out (refuse).
    pub when_full: Option<WhenFull>,
}

/// A service's `when_full`; `None` fields are left out so the daemon's defaults apply.
#[derive(Clone, Debug)]
pub enum WhenFull {
    Refuse,
    Queue {
        /// `queue_timeout`, written in milliseconds.
        timeout: Option<Duration>,
        /// `queue_limit`.
        limit: Option<u32>,
    },
}

impl WhenFull {
    /// `key = value` lines of the service table.
    fn lines(&self) -> Vec<String> {
        match self {
            Self::Refuse => vec!["when_full = \"refuse\"".to_owned()],
            Self::Queue { timeout, limit } => {
                let mut lines = vec!["when_full = \"queue\"".to_owned()];
                if let Some(t) = timeout {
                    lines.push(format!("queue_timeout = \"{}ms\"", t.as_millis()));
                }
                if let Some(l) = limit {
                    lines.push(format!("queue_limit = {l}"));
                }
                lines
            }
        }
    }
}

/// One `[builders.<name>]`; `None` fields are left out so the daemon's defaults apply.
#[derive(Clone, Debug)]
pub struct BuilderConfig {
    pub name: String,
    pub address: SocketAddr,
    pub weight: Option<u32>,
    pub max_connections: Option<u32>,
    pub host_key: Option<String>,
    /// This builder's `health = { ... }` over the `[health]` table.
    pub health: Option<HealthConfig>,
}

/// The `[health]` table or a builder's `health = { ... }`; `None` fields are left out.
/// Durations are written in milliseconds.
#[derive(Clone, Debug, Default)]
pub struct HealthConfig {
    /// Between probes of a healthy builder; first back-off step of a failing one.
    pub interval: Option<Duration>,
    /// How long one probe (connect plus SSH identification line) may take.
    pub timeout: Option<Duration>,
    /// Successful probes that bring a down builder back.
    pub rise: Option<u32>,
    /// Failed probes that take a healthy builder down.
    pub fall: Option<u32>,
    /// Longest back-off between probes of a down builder.
    pub max_interval: Option<Duration>,
    /// How long a real connection's connect to the builder may take before the client
    /// is moved to another builder.
    pub connect_timeout: Option<Duration>,
}

impl HealthConfig {
    /// `key = value` pairs, in a fixed order.
    fn pairs(&self) -> Vec<(&'static str, String)> {
        let duration = |d: Duration| quote(&format!("{}ms", d.as_millis()));
        let mut pairs = Vec::new();
        for (key, value) in [
            ("interval", self.interval),
            ("timeout", self.timeout),
            ("max_interval", self.max_interval),
            ("connect_timeout", self.connect_timeout),
        ] {
            if let Some(value) = value {
                pairs.push((key, duration(value)));
            }
        }
        for (key, value) in [("rise", self.rise), ("fall", self.fall)] {
            if let Some(value) = value {
                pairs.push((key, value.to_string()));
            }
        }
        pairs
    }
}

/// Where one daemon instance keeps its state: chosen by the [`crate::Daemon`] running a
/// config, unique to it, and removed with it.
#[derive(Clone, Debug)]
pub struct InstancePaths {
    /// Pinned maps and links, under bpffs.
    pub pin_path: PathBuf,
    /// Operator state kept across restarts.
    pub state_dir: PathBuf,
    /// The control socket.
    pub runtime_dir: PathBuf,
}

/// A whole config file except the [`InstancePaths`].
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    pub dataplane: Dataplane,
    pub services: Vec<ServiceConfig>,
    pub builders: Vec<BuilderConfig>,
    /// `[policy] mode`; `None` leaves it out.
    pub policy_mode: Option<PolicyMode>,
    /// The rest of `[policy]`; the table is left out when it and `policy_mode` are empty.
    pub policy: PolicyConfig,
    /// `[links]`: interface name globs and the kind they are, first match wins.
    pub links: Vec<(String, LinkKind)>,
    /// `None` leaves out the `[health]` table.
    pub health: Option<HealthConfig>,
    /// `[daemon] read_group`; `None` leaves it out.
    pub read_group: Option<String>,
    /// `[daemon] shutdown_grace`; `None` leaves it out (the daemon's default, 30s).
    pub shutdown_grace: Option<Duration>,
    /// `[daemon] forward`; `None` leaves it out (the daemon's default).
    pub forward: Option<Forward>,
    /// The local path (tests/local_path.rs). `None` renders `local_clients = "proxy"`
    /// in every service: the tests' clients run in the daemon's namespace, and the
    /// other tests test the gateway path.
    pub local_path: Option<LocalPathConfig>,
}

/// `[daemon] local_cgroup` and each service's `local_clients`.
#[derive(Clone, Debug)]
pub struct LocalPathConfig {
    /// A cgroup of the test's own (`cgroup::TestCgroup`), never the root cgroup.
    pub cgroup: PathBuf,
    /// The services with `local_clients = "proxy"`; the others go direct.
    pub proxied: Vec<String>,
}

impl DaemonConfig {
    /// One service `ssh` claiming 127.0.0.22/32 port 22 over every builder of
    /// `topology` (with their host keys), defaults everywhere else.
    pub fn for_topology(topology: &Topology, dataplane: Dataplane, strategy: Strategy) -> Self {
        Self {
            dataplane,
            services: vec![ServiceConfig {
                name: "ssh".to_owned(),
                listen: vec![format!("{SERVICE_ADDR}/32")],
                port: SERVICE_PORT,
                builders: None,
                strategy,
                policy: None,
                when_full: None,
            }],
            builders: topology
                .builders()
                .iter()
                .map(|b| BuilderConfig {
                    name: b.name().to_owned(),
                    address: b.ssh_addr(),
                    weight: None,
                    max_connections: None,
                    host_key: Some(b.host_key().to_owned()),
                    health: None,
                })
                .collect(),
            policy_mode: None,
            policy: PolicyConfig::default(),
            links: Vec::new(),
            health: None,
            read_group: None,
            // Stops cut open connections at once, as before the grace existed: most
            // tests stop with sessions they no longer care about. The grace's own
            // tests (tests/tests/graceful_stop.rs) set it.
            shutdown_grace: Some(Duration::ZERO),
            // The kernel dataplane's tests test the socket map unless they say
            // otherwise (the default, `auto`, splices without systemd's store).
            forward: (dataplane == Dataplane::Kernel).then_some(Forward::Sockmap),
            local_path: None,
        }
    }

    /// The builder called `name`; panics on a name the config does not have.
    pub fn builder_mut(&mut self, name: &str) -> &mut BuilderConfig {
        self.builders
            .iter_mut()
            .find(|b| b.name == name)
            .unwrap_or_else(|| panic!("no builder {name} in this config"))
    }

    /// The only service; panics unless there is exactly one.
    pub fn service_mut(&mut self) -> &mut ServiceConfig {
        match self.services.as_mut_slice() {
            [service] => service,
            other => panic!("expected one service, the config has {}", other.len()),
        }
    }

    /// Removes builder `name` from the config: its table and every service's list.
    pub fn remove_builder(&mut self, name: &str) {
        self.builders.retain(|b| b.name != name);
        for service in &mut self.services {
            if let Some(list) = &mut service.builders {
                list.retain(|b| b != name);
            }
        }
    }

    pub fn render(&self, paths: &InstancePaths) -> String {
        let mut toml = String::new();
        let w = &mut toml;
        let _ = writeln!(w, "[daemon]");
        for (key, path) in [
            ("pin_path", &paths.pin_path),
            ("state_dir", &paths.state_dir),
            ("runtime_dir", &paths.runtime_dir),
        ] {
            let _ = writeln!(w, "{key} = {}", quote(&path.display().to_string()));
        }
        let _ = writeln!(w, "dataplane = {}", quote(self.dataplane.as_str()));
        if let Some(group) = &self.read_group {
            let _ = writeln!(w, "read_group = {}", quote(group));
        }
        if let Some(grace) = self.shutdown_grace {
            let _ = writeln!(w, "shutdown_grace = \"{}ms\"", grace.as_millis());
        }
        if let Some(forward) = self.forward {
            let _ = writeln!(w, "forward = {}", quote(forward.as_str()));
        }
        if let Some(local) = &self.local_path {
            let _ = writeln!(
                w,
                "local_cgroup = {}",
                quote(&local.cgroup.display().to_string())
            );
        }

        for service in &self.services {
            let _ = writeln!(w, "\n[[service]]");
            let _ = writeln!(w, "name = {}", quote(&service.name));
            let _ = writeln!(w, "listen = {}", list(&service.listen));
            let _ = writeln!(w, "port = {}", service.port);
            if let Some(builders) = &service.builders {
                let _ = writeln!(w, "builders = {}", list(builders));
            }
            let _ = writeln!(w, "strategy = {}", quote(service.strategy.as_str()));
            let direct = self
                .local_path
                .as_ref()
                .is_some_and(|l| !l.proxied.contains(&service.name));
            let local_clients = if direct { "direct" } else { "proxy" };
            let _ = writeln!(w, "local_clients = {}", quote(local_clients));
            if let Some(rules) = &service.policy {
                let _ = writeln!(w, "policy = {}", inline_table(&rules.pairs()));
            }
            for line in service.when_full.iter().flat_map(WhenFull::lines) {
                let _ = writeln!(w, "{line}");
            }
        }
        for builder in &self.builders {
            let _ = writeln!(w, "\n[builders.{}]", builder.name);
            let _ = writeln!(w, "address = {}", quote(&builder.address.to_string()));
            if let Some(weight) = builder.weight {
                let _ = writeln!(w, "weight = {weight}");
            }
            if let Some(max) = builder.max_connections {
                let _ = writeln!(w, "max_connections = {max}");
            }
            if let Some(key) = &builder.host_key {
                let _ = writeln!(w, "host_key = {}", quote(key));
            }
            if let Some(health) = &builder.health {
                let _ = writeln!(w, "health = {}", inline_table(&health.pairs()));
            }
        }
        let mut policy = self.policy.pairs();
        if let Some(mode) = self.policy_mode {
            policy.insert(0, ("mode", quote(mode.as_str())));
        }
        if !policy.is_empty() {
            let _ = writeln!(w, "\n[policy]");
            for (key, value) in policy {
                let _ = writeln!(w, "{key} = {value}");
            }
        }
        if !self.links.is_empty() {
            let _ = writeln!(w, "\n[links]");
            for (glob, kind) in &self.links {
                let _ = writeln!(w, "{} = {}", quote(glob), quote(kind.as_str()));
            }
        }
        if let Some(health) = &self.health {
            let _ = writeln!(w, "\n[health]");
            for (key, value) in health.pairs() {
                let _ = writeln!(w, "{key} = {value}");
            }
        }
        toml
    }
}

/// A TOML basic string.
fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// `{ key = value, ... }`.
fn inline_table(pairs: &[(&str, String)]) -> String {
    let pairs: Vec<String> = pairs
        .iter()
        .map(|(key, value)| format!("{key} = {value}"))
        .collect();
    format!("{{ {} }}", pairs.join(", "))
}

fn list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| quote(s)).collect();
    format!("[{}]", quoted.join(", "))
}
