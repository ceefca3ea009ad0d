//! The test world: a client namespace (where Nix, the host's sshd and yensid live) and
//! N builder namespaces, each running a real sshd and linked to the client by a veth.
//!
//! ```text
//!  client ns                                    builder ns bK
//!  lo: 127.0.0.0/8 (service 127.0.0.22)
//!  y<id>cK 198.18.K.1/30  <─── veth ───>  y<id>bK 198.18.K.2/30, sshd :22
//! ```
//! Addresses repeat between topologies (each is isolated); namespace and interface
//! names carry a machine-unique id so topologies can coexist.
//!
//! [`Topology::with_stores`] gives every builder a Nix store of its own
//! ([`crate::NixStore`]), for real Nix builds on the builders.
//!
//! [`Topology::add_second_link`] adds a second veth between the client and one builder
//! (198.18.K.5/30 and 198.18.K.6/30) that the route to the builder can be moved onto.
//!
//! [`Topology::dual_stack`] also gives every veth IPv6 addresses from the benchmarking
//! range 2001:2::/48 (RFC 5180): `2001:2:0:K::1/64` in the client namespace and
//! `2001:2:0:K::2/64` on the builder, and every builder's sshd listens on both
//! addresses, on port 22 and on [`ALT_SSH_PORT`].

use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, ensure};

use crate::command::run;
use crate::derivation::Sites;
use crate::netns::{Netns, check_ifname};
use crate::ssh::{KnownHosts, SshClient};
use crate::sshd::{KeyPair, SSH_PORT, Sshd, SshdSpec};
use crate::store::NixStore;
use crate::tcp::RawClient;
use crate::tempdir::TempDir;
use crate::unique;

/// The address the tests' services claim in the client namespace.
pub const SERVICE_ADDR: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 22);
pub const SERVICE_PORT: u16 = 22;
/// The third octet reserved for extra client source addresses (198.18.250.x), above any
/// builder's subnet.
const CLIENT_SOURCE_OCTET: u8 = 250;

/// The second port every builder's sshd of a [`Topology::dual_stack`] listens on.
pub const ALT_SSH_PORT: u16 = 2222;

/// `2001:2:0:<subnet>::<host>`: an address of the IPv6 benchmarking range 2001:2::/48.
pub fn benchmarking_v6(subnet: u16, host: u16) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 2, 0, subnet, 0, 0, 0, host)
}

/// `127.0.0.22:22`.
pub fn service() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(SERVICE_ADDR), SERVICE_PORT)
}

/// One builder: its namespace, its address and its sshd.
pub struct Builder {
    // Field order is drop order: stop sshd before its namespace goes.
    sshd: Sshd,
    ns: Netns,
    store: Option<NixStore>,
    name: String,
    address: Ipv4Addr,
    gateway: Ipv4Addr,
    /// `2001:2:0:K::2` in a [`Topology::dual_stack`].
    address6: Option<Ipv6Addr>,
    /// The veth's end in the client namespace, `y<id>cK`.
    client_link: String,
    /// The veth's end in the builder's namespace, `y<id>bK`.
    builder_link: String,
}

/// Which end of a builder's veth.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkEnd {
    /// In the client namespace: set down, it takes its connected route with it, so the
    /// builder has no route.
    Client,
    /// In the builder's namespace: set down, the client's end loses its carrier (its
    /// route stays, on a link that is down).
    Builder,
}

impl Builder {
    /// `b1`, `b2`, ...: also what its sshd reports as `YENSID_BUILDER` and in its banner.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn ns(&self) -> &Netns {
        &self.ns
    }

    /// 198.18.K.2.
    pub fn address(&self) -> Ipv4Addr {
        self.address
    }

    /// 198.18.K.1: the client namespace's end of the link to this builder.
    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway
    }

    /// 198.18.K.2:22, where its sshd listens.
    pub fn ssh_addr(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.address), SSH_PORT)
    }

    /// `2001:2:0:K::2`, its IPv6 address in a [`Topology::dual_stack`]; panics in
    /// another topology.
    pub fn address6(&self) -> Ipv6Addr {
        self.address6.unwrap_or_else(|| {
            panic!(
                "{} has no IPv6 address: not a dual-stack topology",
                self.name
            )
        })
    }

    /// `[2001:2:0:K::2]:port` (its sshd listens on 22 and [`ALT_SSH_PORT`]).
    pub fn ssh_addr6(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V6(self.address6()), port)
    }

    pub fn host_key(&self) -> &str {
        self.sshd.host_key()
    }

    pub fn sshd(&self) -> &Sshd {
        &self.sshd
    }

    /// Its own Nix store, in a topology made by [`Topology::with_stores`].
    pub fn store(&self) -> Option<&NixStore> {
        self.store.as_ref()
    }

    /// The name of its veth's end in the client namespace: what the daemon sees as the
    /// builder's egress link.
    pub fn client_link(&self) -> &str {
        &self.client_link
    }

    /// The name of its veth's end in its own namespace.
    pub fn builder_link(&self) -> &str {
        &self.builder_link
    }

    /// Makes the builder vanish without a trace: a blackhole route in its namespace
    /// swallows everything it would send back to the client namespace (SYN-ACKs
    /// included), so new connections to it time out instead of being refused, as with
    /// a host that lost power. (Setting its veth down is no such black hole: the client
    /// namespace's ARP then fails and connects end with EHOSTUNREACH after ~3 s.)
    pub fn black_hole(&self) -> Result<()> {
        self.ns
            .ip(&["route", "add", "blackhole", &format!("{}/32", self.gateway)])
    }

    /// Undoes [`Self::black_hole`].
    pub fn heal(&self) -> Result<()> {
        self.ns
            .ip(&["route", "del", "blackhole", &format!("{}/32", self.gateway)])
    }
}

/// The whole test world; dropping it kills every process in it and deletes every
/// namespace and file it made.
pub struct Topology {
    // Field order is drop order: processes, then namespaces, then files.
    host_sshd: Option<Sshd>,
    builders: Vec<Builder>,
    client: Netns,
    client_key: KeyPair,
    dir: TempDir,
    id: String,
}

impl Topology {
    /// Builds the client namespace and `builders` builders (1..=249), each with its sshd
    /// accepting connections.
    pub fn new(builders: usize) -> Result<Self> {
        Self::create(builders, false, false)
    }

    /// Like [`Self::new`], and every veth has IPv6 addresses too (see the module
    /// docs); each builder's sshd listens on its IPv4 and IPv6 address, on port 22 and
    /// on [`ALT_SSH_PORT`].
    pub fn dual_stack(builders: usize) -> Result<Self> {
        Self::create(builders, false, true)
    }

    /// [`Self::dual_stack`] with a Nix store on every builder ([`Self::with_stores`]).
    pub fn dual_stack_with_stores(builders: usize) -> Result<Self> {
        Self::create(builders, true, true)
    }

    /// Like [`Self::new`], and every builder has a Nix store of its own that its ssh
    /// sessions see as /nix: Nix clients can build on it over `ssh-ng://` and `ssh://`.
    pub fn with_stores(builders: usize) -> Result<Self> {
        Self::create(builders, true, false)
    }

    fn create(builders: usize, stores: bool, dual_stack: bool) -> Result<Self> {
        ensure!(
            (1..usize::from(CLIENT_SOURCE_OCTET)).contains(&builders),
            "a topology has 1 to {} builders",
            CLIENT_SOURCE_OCTET - 1
        );
        let id = unique::next_id();
        let dir = TempDir::new(&unique::name(&id, "files"))?;
        let client = Netns::create(&unique::name(&id, "client"))?;
        let client_key = KeyPair::generate(&dir.path().join("client_ed25519"), "yensid-test")?;
        let mut topology = Self {
            host_sshd: None,
            builders: Vec::with_capacity(builders),
            client,
            client_key,
            dir,
            id,
        };
        for index in 1..=builders {
            let builder = topology
                .add_builder(index as u8, stores, dual_stack)
                .with_context(|| format!("set up builder b{index}"))?;
            topology.builders.push(builder);
        }
        Ok(topology)
    }

    /// A veth pair with `client_end` in the client namespace and
    /// `builder_end` in `builder_ns`.
    fn add_veth(&self, client_end: &str, builder_end: &str, builder_ns: &Netns) -> Result<()> {
        check_ifname(client_end)?;
        check_ifname(builder_end)?;
        run(Command::new("ip").args([
            "link",
            "add",
            client_end,
            "netns",
            self.client.name(),
            "type",
            "veth",
            "peer",
            "name",
            builder_end,
            "netns",
            builder_ns.name(),
        ]))
        .map(drop)
    }

    fn add_builder(&self, index: u8, with_store: bool, dual_stack: bool) -> Result<Builder> {
        let name = format!("b{index}");
        let store = if with_store {
            let dir = self.dir.path().join(format!("store-{name}"));
            fs::create_dir(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
            Some(NixStore::create(&dir)?)
        } else {
            None
        };
        let ns = Netns::create(&unique::name(&self.id, &name))?;
        let client_end = format!("y{}c{index}", self.id);
        let builder_end = format!("y{}b{index}", self.id);
        self.add_veth(&client_end, &builder_end, &ns)?;
        let gateway = Ipv4Addr::new(198, 18, index, 1);
        let address = Ipv4Addr::new(198, 18, index, 2);
        self.client
            .ip(&["addr", "add", &format!("{gateway}/30"), "dev", &client_end])?;
        self.client.ip(&["link", "set", &client_end, "up"])?;
        ns.ip(&["addr", "add", &format!("{address}/30"), "dev", &builder_end])?;
        ns.ip(&["link", "set", &builder_end, "up"])?;
        let address6 = dual_stack.then(|| benchmarking_v6(index.into(), 2));
        let mut also = Vec::new();
        if let Some(address6) = address6 {
            // nodad: usable at once, not after a second of duplicate detection.
            let gateway6 = benchmarking_v6(index.into(), 1);
            let client_addr = format!("{gateway6}/64");
            let builder_addr = format!("{address6}/64");
            self.client.ip(&[
                "-6",
                "addr",
                "add",
                &client_addr,
                "dev",
                &client_end,
                "nodad",
            ])?;
            ns.ip(&[
                "-6",
                "addr",
                "add",
                &builder_addr,
                "dev",
                &builder_end,
                "nodad",
            ])?;
            also = vec![
                SocketAddr::new(IpAddr::V4(address), ALT_SSH_PORT),
                SocketAddr::new(IpAddr::V6(address6), SSH_PORT),
                SocketAddr::new(IpAddr::V6(address6), ALT_SSH_PORT),
            ];
        }
        let sshd = Sshd::start_listening(
            &ns,
            self.dir.path(),
            &SshdSpec {
                name: &name,
                listen: IpAddr::V4(address),
                authorized_key: self.client_key.public_key(),
                store: store.as_ref(),
            },
            &also,
        )?;
        Ok(Builder {
            sshd,
            ns,
            store,
            name,
            address,
            gateway,
            address6,
            client_link: client_end,
            builder_link: builder_end,
        })
    }

    /// Starts the client host's own sshd on 0.0.0.0:22, named `host`: the listener that
    /// claimed traffic must never fall through to.
    pub fn start_host_sshd(&mut self) -> Result<()> {
        ensure!(self.host_sshd.is_none(), "the host sshd already runs");
        self.host_sshd = Some(Sshd::start(
            &self.client,
            self.dir.path(),
            &SshdSpec {
                name: "host",
                listen: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                authorized_key: self.client_key.public_key(),
                store: None,
            },
        )?);
        Ok(())
    }

    pub fn client_ns(&self) -> &Netns {
        &self.client
    }

    /// Where a program ran, told by the network interfaces it saw: a builder's
    /// namespace has its end of the builder's veth, the client namespace the other.
    pub fn sites(&self) -> Sites {
        let mut sites = Sites::default();
        for builder in &self.builders {
            sites.add_client_link(&builder.client_link);
            sites.add_builder_link(&builder.builder_link, &builder.name);
        }
        sites
    }

    /// The private key every builder (and the host sshd) accepts for root.
    pub fn client_identity(&self) -> &Path {
        self.client_key.private_key()
    }

    pub fn builders(&self) -> &[Builder] {
        &self.builders
    }

    /// The builder called `name`; panics on a name the topology does not have.
    pub fn builder(&self, name: &str) -> &Builder {
        self.builders
            .iter()
            .find(|b| b.name == name)
            .unwrap_or_else(|| panic!("no builder {name} in this topology"))
    }

    /// Sets one end of builder `name`'s veth up or down (`ip link set`).
    pub fn set_link(&self, name: &str, end: LinkEnd, up: bool) -> Result<()> {
        let builder = self.builder(name);
        let state = if up { "up" } else { "down" };
        match end {
            LinkEnd::Client => self
                .client
                .ip(&["link", "set", &builder.client_link, state]),
            LinkEnd::Builder => builder
                .ns
                .ip(&["link", "set", &builder.builder_link, state]),
        }
    }

    /// Makes the client namespace's link to builder `name` a slow uplink of `kbit`
    /// kbit/s (a token bucket on the client end): bulk transfers to the builder then
    /// queue, and TCP's round-trip time to it grows to hundreds of milliseconds. Gone
    /// with the topology.
    pub fn throttle(&self, name: &str, kbit: u32) -> Result<()> {
        let builder = self.builder(name);
        run(self.client.command("tc").args([
            "qdisc",
            "add",
            "dev",
            &builder.client_link,
            "root",
            "tbf",
            "rate",
            &format!("{kbit}kbit"),
            "burst",
            "1600",
            "limit",
            "30000",
        ]))
        .map(drop)
    }

    /// Makes builder `name` lose every `n`-th full-size packet that reaches its sshd
    /// (an nftables rule in its namespace), so whoever sends it data has to retransmit:
    /// deterministic loss, unlike a random one. Gone with the topology.
    pub fn lose_data_packets(&self, name: &str, n: u32) -> Result<()> {
        let builder = self.builder(name);
        let rules = format!(
            "table inet yensid_test_loss {{\n\
               chain input {{\n\
                 type filter hook input priority 0; policy accept;\n\
                 tcp dport {SSH_PORT} meta length > 1000 numgen inc mod {n} == 0 drop\n\
               }}\n\
             }}\n"
        );
        let file = self.new_file("loss.nft");
        fs::write(&file, rules).with_context(|| format!("write {}", file.display()))?;
        run(builder.ns.command("nft").arg("-f").arg(&file)).map(drop)
    }

    /// A second veth between the client namespace and builder `name` (client end
    /// `y<id>eK` 198.18.K.5/30, builder end `y<id>fK` 198.18.K.6/30), both ends up. No
    /// route uses it until [`SecondLink::route_builder`]. Removed on drop.
    pub fn add_second_link(&self, name: &str) -> Result<SecondLink<'_>> {
        let builder = self.builder(name);
        let index = builder.address.octets()[2];
        let client_end = format!("y{}e{index}", self.id);
        let builder_end = format!("y{}f{index}", self.id);
        self.add_veth(&client_end, &builder_end, &builder.ns)?;
        let link = SecondLink {
            client: &self.client,
            client_end,
            builder_address: builder.address,
            peer: Ipv4Addr::new(198, 18, index, 6),
        };
        let client_addr = Ipv4Addr::new(198, 18, index, 5);
        self.client.ip(&[
            "addr",
            "add",
            &format!("{client_addr}/30"),
            "dev",
            &link.client_end,
        ])?;
        self.client.ip(&["link", "set", &link.client_end, "up"])?;
        builder.ns.ip(&[
            "addr",
            "add",
            &format!("{}/30", link.peer),
            "dev",
            &builder_end,
        ])?;
        builder.ns.ip(&["link", "set", &builder_end, "up"])?;
        Ok(link)
    }

    pub fn host_sshd(&self) -> Option<&Sshd> {
        self.host_sshd.as_ref()
    }

    /// Adds `198.18.250.<last_octet>/32` to the client's loopback, for a client that
    /// needs several source addresses, and returns it.
    pub fn add_client_address(&self, last_octet: u8) -> Result<IpAddr> {
        let addr = Ipv4Addr::new(198, 18, CLIENT_SOURCE_OCTET, last_octet);
        self.client
            .ip(&["addr", "add", &format!("{addr}/32"), "dev", "lo"])?;
        Ok(IpAddr::V4(addr))
    }

    /// The known_hosts a pool client uses: every builder's key under the service
    /// address, each builder's key under its own address, the host sshd's under
    /// 127.0.0.1 and the client's other addresses.
    pub fn known_hosts(&self) -> KnownHosts {
        let mut known = KnownHosts::new();
        for builder in &self.builders {
            known.add(service(), builder.host_key());
            known.add(builder.ssh_addr(), builder.host_key());
        }
        if let Some(host) = &self.host_sshd {
            known.add(
                SocketAddr::from((Ipv4Addr::LOCALHOST, SSH_PORT)),
                host.host_key(),
            );
            for builder in &self.builders {
                known.add(
                    SocketAddr::from((builder.gateway, SSH_PORT)),
                    host.host_key(),
                );
            }
        }
        known
    }

    /// The known_hosts of a client of a pool served at each of `services`: every
    /// builder's key under each of them (`[addr]:port` for a port other than 22).
    pub fn pool_known_hosts(&self, services: &[SocketAddr]) -> KnownHosts {
        let mut known = KnownHosts::new();
        for service in services {
            for builder in &self.builders {
                known.add(*service, builder.host_key());
            }
        }
        known
    }

    /// An ssh client in the client namespace trusting [`Self::known_hosts`].
    pub fn ssh_client(&self) -> Result<SshClient> {
        self.ssh_client_with(&self.known_hosts())
    }

    /// An ssh client in the client namespace trusting exactly `known`.
    pub fn ssh_client_with(&self, known: &KnownHosts) -> Result<SshClient> {
        let path = self.new_file("known_hosts");
        fs::write(&path, known.render()).with_context(|| format!("write {}", path.display()))?;
        Ok(SshClient::new(
            &self.client,
            self.client_key.private_key(),
            &path,
        ))
    }

    /// A raw TCP client in the client namespace.
    pub fn raw_client(&self) -> RawClient<'_> {
        RawClient::new(&self.client)
    }

    /// A fresh path in this topology's temp dir, for files that go away with it.
    pub fn new_file(&self, stem: &str) -> PathBuf {
        self.dir
            .path()
            .join(format!("{stem}-{}", unique::next_id()))
    }

    /// Writes `body` to a fresh executable file in this topology's temp dir (e.g. a
    /// `#!/bin/sh` policy hook) and returns its absolute path.
    pub fn write_script(&self, stem: &str, body: &str) -> Result<PathBuf> {
        let path = self.new_file(stem);
        fs::write(&path, body).with_context(|| format!("write {}", path.display()))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755))
            .with_context(|| format!("chmod {}", path.display()))?;
        Ok(path)
    }
}

/// A second veth between the client namespace and a builder, made by
/// [`Topology::add_second_link`]; dropping it deletes both ends (and any route over it).
pub struct SecondLink<'a> {
    client: &'a Netns,
    client_end: String,
    builder_address: Ipv4Addr,
    /// The builder's end's address, 198.18.K.6.
    peer: Ipv4Addr,
}

impl SecondLink<'_> {
    /// Its end in the client namespace.
    pub fn client_end(&self) -> &str {
        &self.client_end
    }

    /// Routes the builder's address over this link (a /32 via the builder's end, which
    /// is more specific than the first link's /30). The builder answers from the same
    /// link: its connected route to 198.18.K.4/30 leads back here.
    pub fn route_builder(&self) -> Result<()> {
        self.client.ip(&[
            "route",
            "add",
            &format!("{}/32", self.builder_address),
            "via",
            &self.peer.to_string(),
            "dev",
            &self.client_end,
        ])
    }

    /// Undoes [`Self::route_builder`]: the builder is reached over its first link again.
    pub fn unroute_builder(&self) -> Result<()> {
        self.client.ip(&[
            "route",
            "del",
            &format!("{}/32", self.builder_address),
            "via",
            &self.peer.to_string(),
            "dev",
            &self.client_end,
        ])
    }

    /// The interface the client namespace's kernel routes the builder's address out of
    /// (`ip route get`).
    pub fn kernel_egress(&self) -> Result<String> {
        let out = run(Command::new("ip").args([
            "-n",
            self.client.name(),
            "route",
            "get",
            &self.builder_address.to_string(),
        ]))?;
        out.split_whitespace()
            .skip_while(|word| *word != "dev")
            .nth(1)
            .map(str::to_owned)
            .with_context(|| format!("no `dev` in `ip route get`: {out:?}"))
    }
}

impl Drop for SecondLink<'_> {
    fn drop(&mut self) {
        // Deleting one end of a veth deletes both; routes over it go with it.
        if let Err(e) = self.client.ip(&["link", "del", &self.client_end]) {
            eprintln!("yensid-tests: could not delete {}: {e:#}", self.client_end);
        }
    }
}
