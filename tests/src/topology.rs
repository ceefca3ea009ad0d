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

use std::fs;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, ensure};

use crate::command::run;
use crate::netns::{Netns, check_ifname};
use crate::ssh::{KnownHosts, SshClient};
use crate::sshd::{KeyPair, SSH_PORT, Sshd, SshdSpec};
use crate::tcp::RawClient;
use crate::tempdir::TempDir;
use crate::unique;

/// The address the tests' services claim in the client namespace.
pub const SERVICE_ADDR: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 22);
pub const SERVICE_PORT: u16 = 22;
/// The third octet reserved for extra client source addresses (198.18.250.x), above any
/// builder's subnet.
const CLIENT_SOURCE_OCTET: u8 = 250;

/// `127.0.0.22:22`.
pub fn service() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(SERVICE_ADDR), SERVICE_PORT)
}

/// One builder: its namespace, its address and its sshd.
pub struct Builder {
    // Field order is drop order: stop sshd before its namespace goes.
    sshd: Sshd,
    ns: Netns,
    name: String,
    address: Ipv4Addr,
    gateway: Ipv4Addr,
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

    pub fn host_key(&self) -> &str {
        self.sshd.host_key()
    }

    pub fn sshd(&self) -> &Sshd {
        &self.sshd
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
                .add_builder(index as u8)
                .with_context(|| format!("set up builder b{index}"))?;
            topology.builders.push(builder);
        }
        Ok(topology)
    }

    fn add_builder(&self, index: u8) -> Result<Builder> {
        let name = format!("b{index}");
        let ns = Netns::create(&unique::name(&self.id, &name))?;
        let client_end = format!("y{}c{index}", self.id);
        let builder_end = format!("y{}b{index}", self.id);
        check_ifname(&client_end)?;
        check_ifname(&builder_end)?;
        run(Command::new("ip").args([
            "link",
            "add",
            &client_end,
            "netns",
            self.client.name(),
            "type",
            "veth",
            "peer",
            "name",
            &builder_end,
            "netns",
            ns.name(),
        ]))?;
        let gateway = Ipv4Addr::new(198, 18, index, 1);
        let address = Ipv4Addr::new(198, 18, index, 2);
        self.client
            .ip(&["addr", "add", &format!("{gateway}/30"), "dev", &client_end])?;
        self.client.ip(&["link", "set", &client_end, "up"])?;
        ns.ip(&["addr", "add", &format!("{address}/30"), "dev", &builder_end])?;
        ns.ip(&["link", "set", &builder_end, "up"])?;
        let sshd = Sshd::start(
            &ns,
            self.dir.path(),
            &SshdSpec {
                name: &name,
                listen: IpAddr::V4(address),
                authorized_key: self.client_key.public_key(),
            },
        )?;
        Ok(Builder {
            sshd,
            ns,
            name,
            address,
            gateway,
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
            },
        )?);
        Ok(())
    }

    pub fn client_ns(&self) -> &Netns {
        &self.client
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
    pub(crate) fn new_file(&self, stem: &str) -> PathBuf {
        self.dir
            .path()
            .join(format!("{stem}-{}", unique::next_id()))
    }
}
