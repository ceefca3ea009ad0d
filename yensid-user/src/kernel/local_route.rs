//! Claimed prefixes made locally deliverable.
//!
//! `dispatch` runs at socket lookup, after routing: a SYN reaches it only
//! if the kernel routes its destination to the host itself, through a
//! route of type `local` in the `local` table. 127.0.0.0/8 always has one
//! (`local 127.0.0.0/8 dev lo`), an IPv6 prefix never has one (only `::1`
//! is local), nor has an IPv4 prefix outside the host's addresses: without
//! it a client gets "Network is unreachable" or the SYN is forwarded away.
//!
//! So for every claimed prefix that no local route covers, yensid adds
//! `local <prefix> dev lo table local proto 121` over rtnetlink (what `ip
//! route add local <prefix> dev lo` does by hand), and removes exactly the
//! routes it added when the prefix leaves the configuration and at a clean
//! stop. Routes it did not add are never touched. The protocol number
//! ([`PROTOCOL`]) marks its routes: after a crash they stay (the pinned
//! program keeps refusing the claimed addresses, which needs them), and
//! the next run adopts the ones it still wants. One yensid per network
//! namespace manages these routes; two instances claiming the same prefix
//! (on different ports) would remove each other's route when one stops.
//!
//! Blocking rtnetlink calls: a dump of the local table and one request per
//! change, each answered by the kernel in microseconds.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt, io,
    net::IpAddr,
    time::Duration,
};

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST, NetlinkBuffer, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use tracing::{error, info, warn};

use crate::config::Prefix;

/// The `rtm_protocol` of the routes yensid adds (`proto 121` in `ip
/// route`): unassigned in the kernel's and iproute2's lists, so a route
/// carrying it is yensid's. Name it for `ip` with `echo 121 yensid >
/// /etc/iproute2/rt_protos.d/yensid.conf`.
pub const PROTOCOL: u8 = 121;

/// `lo` has this index in every network namespace.
const LOOPBACK_INDEX: u32 = 1;

/// The kernel answers at once; this only bounds a read that would
/// otherwise block forever.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum LocalRouteError {
    #[error("cannot open a NETLINK_ROUTE socket: {0}")]
    Socket(#[source] io::Error),
    #[error("cannot list the local routing table: {0}")]
    Dump(#[source] io::Error),
    #[error("cannot add `local {prefix} dev lo table local`: {source}")]
    Add {
        prefix: Prefix,
        #[source]
        source: io::Error,
    },
    #[error("cannot remove `local {prefix} dev lo table local proto {PROTOCOL}`: {source}")]
    Remove {
        prefix: Prefix,
        #[source]
        source: io::Error,
    },
}

/// How the SYNs of one claimed prefix reach the host's own stack.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Through yensid's own local route for exactly this prefix (added by
    /// this run, or adopted from a run that did not stop cleanly).
    Added,
    /// Through a local route covering it: one yensid did not add (such as
    /// 127.0.0.0/8 on lo, or an address of the host), or yensid's for a
    /// wider claimed prefix.
    Covered { route: Prefix, ours: bool },
    /// Not deliverable: connections to it fail before yensid sees them.
    Missing { why: String },
}

impl Delivery {
    pub fn deliverable(&self) -> bool {
        !matches!(self, Delivery::Missing { .. })
    }
}

impl fmt::Display for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Delivery::Added => write!(f, "local route added by yensid (proto {PROTOCOL})"),
            Delivery::Covered { route, ours: true } => {
                write!(f, "covered by yensid's local route {route}")
            }
            Delivery::Covered { route, ours: false } => {
                write!(f, "covered by the local route {route}")
            }
            Delivery::Missing { why } => write!(f, "NOT DELIVERABLE: {why}"),
        }
    }
}

/// A route of the `local` table, as far as delivery goes.
#[derive(Clone, Debug, PartialEq, Eq)]
struct LocalRoute {
    prefix: Prefix,
    /// Of type `local` (not `broadcast`, `anycast`, ...).
    local: bool,
    protocol: u8,
}

impl LocalRoute {
    fn is_ours(&self) -> bool {
        self.local && self.protocol == PROTOCOL
    }
}

/// What one wanted prefix needs, given the local table.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Step {
    /// yensid's route for it is there (maybe from an earlier run).
    Keep,
    /// Another local route covers it.
    Covered { route: Prefix, ours: bool },
    /// Nothing covers it: add a route.
    Add,
}

fn step(prefix: &Prefix, routes: &[LocalRoute]) -> Step {
    if routes.iter().any(|r| r.is_ours() && r.prefix == *prefix) {
        return Step::Keep;
    }
    // The narrowest covering route is the one the kernel uses.
    match routes
        .iter()
        .filter(|r| r.local && contains(&r.prefix, prefix))
        .max_by_key(|r| r.prefix.len)
    {
        Some(r) => Step::Covered {
            route: r.prefix,
            ours: r.is_ours(),
        },
        None => Step::Add,
    }
}

/// Whether every address of `inner` is in `outer`.
fn contains(outer: &Prefix, inner: &Prefix) -> bool {
    outer.addr.is_ipv4() == inner.addr.is_ipv4() && outer.len <= inner.len && outer.overlaps(inner)
}

/// The local routes this daemon answers for, and how each claimed prefix
/// is delivered.
pub struct LocalRoutes {
    socket: Socket,
    sequence: u32,
    /// Routes of [`PROTOCOL`] that this run added or adopted, by prefix
    /// text (for a stable order in logs).
    owned: BTreeMap<String, Prefix>,
    delivery: BTreeMap<String, (Prefix, Delivery)>,
}

impl LocalRoutes {
    /// A netlink socket in the calling thread's network namespace.
    pub fn open() -> Result<Self, LocalRouteError> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(LocalRouteError::Socket)?;
        socket.bind_auto().map_err(LocalRouteError::Socket)?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(LocalRouteError::Socket)?;
        super::sock::set_receive_timeout(&socket, REPLY_TIMEOUT)
            .map_err(LocalRouteError::Socket)?;
        // Best effort: only makes the dumps smaller.
        let _ = socket.set_netlink_get_strict_chk(true);
        Ok(Self {
            socket,
            sequence: 0,
            owned: BTreeMap::new(),
            delivery: BTreeMap::new(),
        })
    }

    /// Makes every prefix of `wanted` locally deliverable and removes the
    /// routes this daemon holds for prefixes that left it. Logs each route
    /// added, adopted or removed, and each prefix that becomes or stops
    /// being undeliverable. Fails only if the local table cannot be read;
    /// a route that cannot be added is reported by [`Self::delivery`].
    pub fn sync(&mut self, wanted: &[Prefix]) -> Result<(), LocalRouteError> {
        let wanted: BTreeMap<String, Prefix> = wanted.iter().map(|p| (p.to_string(), *p)).collect();
        let leaving: Vec<Prefix> = self
            .owned
            .iter()
            .filter(|(text, _)| !wanted.contains_key(*text))
            .map(|(_, p)| *p)
            .collect();
        for prefix in leaving {
            self.remove(prefix);
        }
        let mut routes = match self.dump() {
            Ok(routes) => routes,
            Err(e) => {
                let why = e.to_string();
                let unknown = wanted
                    .iter()
                    .map(|(text, p)| {
                        let delivery = Delivery::Missing { why: why.clone() };
                        (text.clone(), (*p, delivery))
                    })
                    .collect();
                self.delivery = unknown;
                return Err(e);
            }
        };
        // Wider prefixes first: a route for one covers the narrower ones.
        let mut order: Vec<&Prefix> = wanted.values().collect();
        order.sort_by_key(|p| p.len);
        let mut delivery = BTreeMap::new();
        for prefix in order {
            let text = prefix.to_string();
            let outcome = match step(prefix, &routes) {
                Step::Keep => {
                    if self.owned.insert(text.clone(), *prefix).is_none() {
                        info!(%prefix, protocol = PROTOCOL, "local route adopted from an earlier run");
                    }
                    Delivery::Added
                }
                Step::Covered { route, ours } => {
                    // A route of ours for this exact prefix would have
                    // been kept: if this run held one, it is gone.
                    self.owned.remove(&text);
                    Delivery::Covered { route, ours }
                }
                Step::Add => match self.add(*prefix) {
                    Ok(()) => {
                        info!(%prefix, protocol = PROTOCOL, "local route added: the claimed prefix is locally deliverable");
                        self.owned.insert(text.clone(), *prefix);
                        routes.push(LocalRoute {
                            prefix: *prefix,
                            local: true,
                            protocol: PROTOCOL,
                        });
                        Delivery::Added
                    }
                    Err(e) => {
                        self.owned.remove(&text);
                        Delivery::Missing { why: e.to_string() }
                    }
                },
            };
            let before = self.delivery.get(&text).map(|(_, d)| d);
            if before != Some(&outcome) {
                match &outcome {
                    Delivery::Missing { why } => error!(
                        %prefix,
                        error = %why,
                        "claimed prefix NOT locally deliverable: its clients cannot connect"
                    ),
                    Delivery::Covered { route, ours } => {
                        info!(%prefix, %route, by_yensid = ours, "claimed prefix is locally deliverable")
                    }
                    Delivery::Added => {}
                }
            }
            delivery.insert(text, (*prefix, outcome));
        }
        self.delivery = delivery;
        Ok(())
    }

    /// Every prefix of the last [`Self::sync`] and how it is delivered.
    pub fn deliveries(&self) -> impl Iterator<Item = (&Prefix, &Delivery)> {
        self.delivery.values().map(|(p, d)| (p, d))
    }

    /// Removes every route this run holds: the clean stop.
    pub fn remove_all(&mut self) {
        let owned: Vec<Prefix> = self.owned.values().copied().collect();
        for prefix in owned {
            self.remove(prefix);
        }
        self.delivery.clear();
    }

    /// Removes this run's route for `prefix`, and forgets it either way:
    /// a route someone else already removed is gone as wanted.
    fn remove(&mut self, prefix: Prefix) {
        self.owned.remove(&prefix.to_string());
        let request = route_request(prefix);
        match self.request(RouteNetlinkMessage::DelRoute(request), 0) {
            Ok(()) => info!(%prefix, protocol = PROTOCOL, "local route removed"),
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {
                warn!(%prefix, "local route was already removed by someone else")
            }
            Err(source) => {
                error!(error = %LocalRouteError::Remove { prefix, source }, "local route left behind")
            }
        }
    }

    fn add(&mut self, prefix: Prefix) -> Result<(), LocalRouteError> {
        let request = route_request(prefix);
        self.request(
            RouteNetlinkMessage::NewRoute(request),
            NLM_F_CREATE | NLM_F_EXCL,
        )
        .map_err(|source| LocalRouteError::Add { prefix, source })
    }

    /// Sends a request that the kernel acknowledges; its error if it fails.
    fn request(&mut self, message: RouteNetlinkMessage, flags: u16) -> io::Result<()> {
        let sequence = self.send(message, NLM_F_REQUEST | NLM_F_ACK | flags)?;
        loop {
            let (datagram, _) = self.socket.recv_from_full()?;
            let mut done = false;
            for_each_message(&datagram, |message| {
                if message.header.sequence_number != sequence {
                    return Ok(());
                }
                match message.payload {
                    NetlinkPayload::Error(e) => {
                        done = true;
                        match e.code {
                            None => Ok(()),
                            Some(_) => Err(e.to_io()),
                        }
                    }
                    _ => Ok(()),
                }
            })?;
            if done {
                return Ok(());
            }
        }
    }

    /// Every route of the `local` table, of both families.
    fn dump(&mut self) -> Result<Vec<LocalRoute>, LocalRouteError> {
        let mut routes = self.dump_family(AddressFamily::Inet)?;
        routes.extend(self.dump_family(AddressFamily::Inet6)?);
        Ok(routes)
    }

    /// The `local` table of one family. With strict checking the kernel
    /// sends that table only (not a router's full tables); without it
    /// (Linux < 4.20) every table comes and [`local_route_of`] filters.
    fn dump_family(&mut self, family: AddressFamily) -> Result<Vec<LocalRoute>, LocalRouteError> {
        let mut filter = RouteMessage::default();
        filter.header.address_family = family;
        filter.header.table = libc::RT_TABLE_LOCAL;
        let request = RouteNetlinkMessage::GetRoute(filter);
        let sequence = self
            .send(request, NLM_F_REQUEST | NLM_F_DUMP)
            .map_err(LocalRouteError::Dump)?;
        let mut routes = Vec::new();
        loop {
            let (datagram, _) = self
                .socket
                .recv_from_full()
                .map_err(LocalRouteError::Dump)?;
            let mut done = false;
            for_each_message(&datagram, |message| {
                if message.header.sequence_number != sequence {
                    return Ok(());
                }
                match message.payload {
                    NetlinkPayload::Done(_) => done = true,
                    NetlinkPayload::Error(e) if e.code.is_some() => return Err(e.to_io()),
                    NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(route)) => {
                        routes.extend(local_route_of(&route))
                    }
                    _ => {}
                }
                Ok(())
            })
            .map_err(LocalRouteError::Dump)?;
            if done {
                return Ok(routes);
            }
        }
    }

    fn send(&mut self, message: RouteNetlinkMessage, flags: u16) -> io::Result<u32> {
        self.sequence = self.sequence.wrapping_add(1);
        let mut message = NetlinkMessage::from(message);
        message.header.flags = flags;
        message.header.sequence_number = self.sequence;
        message.finalize();
        let mut bytes = vec![0; message.buffer_len()];
        message.serialize(&mut bytes);
        self.socket.send(&bytes, 0)?;
        Ok(self.sequence)
    }
}

/// Calls `each` on every message of a datagram; a message that does not
/// decode is skipped (it cannot be an answer this module understands).
fn for_each_message(
    mut datagram: &[u8],
    mut each: impl FnMut(NetlinkMessage<RouteNetlinkMessage>) -> io::Result<()>,
) -> io::Result<()> {
    while !datagram.is_empty() {
        let length = NetlinkBuffer::new_checked(datagram)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?
            .length() as usize;
        if let Ok(message) = NetlinkMessage::deserialize(&datagram[..length]) {
            each(message)?;
        }
        // Messages are 4-byte aligned in a datagram.
        let aligned = length.next_multiple_of(4).min(datagram.len());
        datagram = &datagram[aligned..];
    }
    Ok(())
}

/// The request for `local <prefix> dev lo table local proto 121 scope
/// host`: to add it, or to remove it (the kernel then matches the
/// protocol, so it never removes a route yensid did not add).
fn route_request(prefix: Prefix) -> RouteMessage {
    let mut message = RouteMessage::default();
    let (family, destination) = match prefix.addr {
        IpAddr::V4(v4) => (AddressFamily::Inet, RouteAddress::Inet(v4)),
        IpAddr::V6(v6) => (AddressFamily::Inet6, RouteAddress::Inet6(v6)),
    };
    message.header.address_family = family;
    message.header.destination_prefix_length = prefix.len;
    message.header.table = libc::RT_TABLE_LOCAL;
    message.header.protocol = RouteProtocol::Other(PROTOCOL);
    message.header.scope = RouteScope::Host;
    message.header.kind = RouteType::Local;
    message.attributes = vec![
        RouteAttribute::Destination(destination),
        RouteAttribute::Oif(LOOPBACK_INDEX),
    ];
    message
}

/// The route a RTM_NEWROUTE message describes, if it is in the `local`
/// table.
fn local_route_of(message: &RouteMessage) -> Option<LocalRoute> {
    let table = message
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(message.header.table.into());
    if table != u32::from(libc::RT_TABLE_LOCAL) {
        return None;
    }
    let destination = message.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(d) => Some(d.clone()),
        _ => None,
    });
    let addr = match (destination, message.header.address_family) {
        (Some(RouteAddress::Inet(v4)), AddressFamily::Inet) => IpAddr::V4(v4),
        (Some(RouteAddress::Inet6(v6)), AddressFamily::Inet6) => IpAddr::V6(v6),
        (None, AddressFamily::Inet) => IpAddr::from([0u8; 4]),
        (None, AddressFamily::Inet6) => IpAddr::from([0u8; 16]),
        _ => return None,
    };
    Some(LocalRoute {
        prefix: Prefix {
            addr,
            len: message.header.destination_prefix_length,
        },
        local: message.header.kind == RouteType::Local,
        protocol: message.header.protocol.into(),
    })
}

/// The claimed prefixes of every service, each once.
pub fn claimed(services: &[crate::config::Service]) -> Vec<Prefix> {
    let mut seen = BTreeSet::new();
    services
        .iter()
        .flat_map(|s| s.listen.iter().copied())
        .filter(|p| seen.insert(p.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use std::os::fd::AsRawFd;

    use super::*;

    fn p(s: &str) -> Prefix {
        s.parse().unwrap()
    }

    fn route(prefix: &str, local: bool, protocol: u8) -> LocalRoute {
        LocalRoute {
            prefix: p(prefix),
            local,
            protocol,
        }
    }

    /// What a fresh network namespace's local table holds once lo is up.
    fn fresh_namespace() -> Vec<LocalRoute> {
        vec![
            route("127.0.0.0/8", true, 2),
            route("127.0.0.1/32", true, 2),
            route("127.255.255.255/32", false, 2),
            route("::1/128", true, 2),
        ]
    }

    #[test]
    fn loopback_ipv4_is_covered_and_ipv6_needs_a_route() {
        let routes = fresh_namespace();
        assert_eq!(
            step(&p("127.0.0.64/26"), &routes),
            Step::Covered {
                route: p("127.0.0.0/8"),
                ours: false
            }
        );
        assert_eq!(
            step(&p("127.0.0.1/32"), &routes),
            Step::Covered {
                route: p("127.0.0.1/32"),
                ours: false
            }
        );
        assert_eq!(step(&p("2001:2:0:ff::22/128"), &routes), Step::Add);
        assert_eq!(step(&p("198.18.200.0/24"), &routes), Step::Add);
        // A prefix wider than the covering route is not covered.
        assert_eq!(step(&p("126.0.0.0/7"), &routes), Step::Add);
        // IPv4 and IPv6 never cover each other, not even ::/0 and 0/0.
        let everything = vec![route("::/0", true, 2)];
        assert_eq!(step(&p("198.18.200.0/24"), &everything), Step::Add);
    }

    #[test]
    fn a_route_of_our_protocol_is_kept_and_others_are_not_ours() {
        let mut routes = fresh_namespace();
        routes.push(route("2001:2:0:ff::/64", true, PROTOCOL));
        assert_eq!(step(&p("2001:2:0:ff::/64"), &routes), Step::Keep);
        assert_eq!(
            step(&p("2001:2:0:ff::22/128"), &routes),
            Step::Covered {
                route: p("2001:2:0:ff::/64"),
                ours: true
            }
        );
        // The operator's own route for the same prefix: covered, not ours.
        let operator = vec![route("2001:2:0:ee::/64", true, 4)];
        assert_eq!(
            step(&p("2001:2:0:ee::/64"), &operator),
            Step::Covered {
                route: p("2001:2:0:ee::/64"),
                ours: false
            }
        );
        // Our protocol on a route of another type does not deliver.
        let odd = vec![route("2001:2:0:dd::/64", false, PROTOCOL)];
        assert_eq!(step(&p("2001:2:0:dd::/64"), &odd), Step::Add);
    }

    #[test]
    fn the_request_is_a_local_route_on_lo_with_our_protocol() {
        let message = route_request(p("2001:2:0:ff::/120"));
        let h = &message.header;
        assert_eq!(h.address_family, AddressFamily::Inet6);
        assert_eq!(h.destination_prefix_length, 120);
        assert_eq!(h.table, libc::RT_TABLE_LOCAL);
        assert_eq!(u8::from(h.protocol), PROTOCOL);
        assert_eq!(h.scope, RouteScope::Host);
        assert_eq!(h.kind, RouteType::Local);
        assert!(
            message
                .attributes
                .contains(&RouteAttribute::Oif(LOOPBACK_INDEX))
        );
        // What the kernel sends back for it reads as ours.
        assert_eq!(
            local_route_of(&message),
            Some(route("2001:2:0:ff::/120", true, PROTOCOL))
        );
        let v4 = route_request(p("198.18.200.0/24"));
        assert_eq!(v4.header.address_family, AddressFamily::Inet);
        assert!(
            v4.attributes
                .contains(&RouteAttribute::Destination(RouteAddress::Inet(
                    "198.18.200.0".parse().unwrap()
                )))
        );
    }

    #[test]
    fn only_routes_of_the_local_table_are_read() {
        let mut main = route_request(p("198.18.200.0/24"));
        main.header.table = libc::RT_TABLE_MAIN;
        assert_eq!(local_route_of(&main), None);
        // Table ids in RTA_TABLE win over the header's.
        let mut by_attribute = route_request(p("198.18.200.0/24"));
        by_attribute.header.table = libc::RT_TABLE_MAIN;
        by_attribute
            .attributes
            .push(RouteAttribute::Table(libc::RT_TABLE_LOCAL.into()));
        assert!(local_route_of(&by_attribute).is_some());
    }

    #[test]
    fn claimed_prefixes_are_listed_once() {
        let config = crate::config::Config::parse(
            r#"
[[service]]
name = "a"
listen = ["2001:2:0:ff::22/128", "127.0.0.22/32"]
builders = ["b1"]
[[service]]
name = "b"
listen = ["2001:2:0:ff::22/128"]
port = 2222
builders = ["b1"]
[builders.b1]
address = "198.18.1.2:22"
"#,
        )
        .unwrap();
        let texts: Vec<String> = claimed(&config.services)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(texts, ["2001:2:0:ff::22/128", "127.0.0.22/32"]);
    }

    // --- Against a real kernel, in a throwaway network namespace. ---

    fn delivery_of<'a>(routes: &'a LocalRoutes, prefix: &Prefix) -> Option<&'a Delivery> {
        routes
            .deliveries()
            .find(|(p, _)| *p == prefix)
            .map(|(_, d)| d)
    }

    fn ip(namespace: &str, args: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["-n", namespace])
            .args(args)
            .output()
            .expect("run ip");
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn local_table(namespace: &str) -> String {
        let v4 = ip(namespace, &["route", "show", "table", "local"]);
        let v6 = ip(namespace, &["-6", "route", "show", "table", "local"]);
        v4 + &v6
    }

    struct Namespace(String);

    impl Drop for Namespace {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }

    /// Runs `f` on a thread inside namespace `name`.
    fn inside<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> T {
        let handle = std::fs::File::open(format!("/run/netns/{name}")).expect("netns handle");
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    // SAFETY: setns on an open namespace fd; it changes only
                    // this thread's network namespace.
                    let rc = unsafe { libc::setns(handle.as_raw_fd(), libc::CLONE_NEWNET) };
                    assert_eq!(rc, 0, "setns");
                    f()
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    #[test]
    fn adds_adopts_and_removes_only_its_own_routes() {
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            println!("SKIPPED (needs root)");
            return;
        }
        let ns = Namespace(format!("ylr-{}", std::process::id()));
        let status = Command::new("ip").args(["netns", "add", &ns.0]).status();
        assert!(status.expect("ip netns add").success());
        ip(&ns.0, &["link", "set", "lo", "up"]);
        // The operator's own local route, of another protocol.
        ip(
            &ns.0,
            &[
                "-6",
                "route",
                "add",
                "local",
                "2001:2:0:ee::/64",
                "dev",
                "lo",
            ],
        );
        // A route of ours that a crashed run left behind.
        let leftover = ["route", "add", "local", "198.18.200.0/24", "dev", "lo"];
        ip(&ns.0, &[&leftover[..], &["proto", "121"]].concat());

        let wanted = [
            p("2001:2:0:ff::22/128"),
            p("2001:2:0:ff::/120"),
            p("127.0.0.64/26"),
            p("2001:2:0:ee::22/128"),
            p("198.18.200.0/24"),
        ];
        let mut routes = inside(&ns.0, || LocalRoutes::open().expect("open"));
        inside(&ns.0, || routes.sync(&wanted)).expect("sync");
        let table = local_table(&ns.0);
        assert!(
            table.contains("local 2001:2:0:ff::/120 dev lo proto 121"),
            "{table}"
        );
        // Covered by the /120 it added first: no route of its own.
        assert!(!table.contains("2001:2:0:ff::22 "), "{table}");
        assert_eq!(
            delivery_of(&routes, &wanted[0])
                .map(|d| d.to_string())
                .as_deref(),
            Some("covered by yensid's local route 2001:2:0:ff::/120")
        );
        assert_eq!(delivery_of(&routes, &wanted[1]), Some(&Delivery::Added));
        assert_eq!(
            delivery_of(&routes, &wanted[2]),
            Some(&Delivery::Covered {
                route: p("127.0.0.0/8"),
                ours: false
            })
        );
        assert_eq!(
            delivery_of(&routes, &wanted[3]),
            Some(&Delivery::Covered {
                route: p("2001:2:0:ee::/64"),
                ours: false
            })
        );
        assert_eq!(delivery_of(&routes, &wanted[4]), Some(&Delivery::Added));

        // The /120 leaves: the /128 then needs a route of its own.
        inside(&ns.0, || routes.sync(&[wanted[0], wanted[2]])).expect("sync");
        let table = local_table(&ns.0);
        assert!(!table.contains("2001:2:0:ff::/120"), "{table}");
        assert!(!table.contains("198.18.200.0/24"), "{table}");
        assert!(
            table.contains("local 2001:2:0:ff::22 dev lo proto 121"),
            "{table}"
        );
        assert!(table.contains("local 2001:2:0:ee::/64 dev lo"), "{table}");

        // Removed by someone else: added again at the next sync.
        ip(
            &ns.0,
            &[
                "-6",
                "route",
                "del",
                "local",
                "2001:2:0:ff::22/128",
                "dev",
                "lo",
                "table",
                "local",
            ],
        );
        inside(&ns.0, || routes.sync(&[wanted[0]])).expect("sync");
        assert!(local_table(&ns.0).contains("local 2001:2:0:ff::22 dev lo proto 121"));

        // A route of another type for the same prefix: the kernel refuses to add
        // ours, and the prefix is reported as not deliverable, with why.
        let blocked = p("198.18.201.0/24");
        let unreachable = ["route", "add", "unreachable", "198.18.201.0/24"];
        ip(&ns.0, &[&unreachable[..], &["table", "local"]].concat());
        inside(&ns.0, || routes.sync(&[wanted[0], blocked])).expect("sync");
        let failed = delivery_of(&routes, &blocked).expect("reported");
        assert!(!failed.deliverable());
        assert!(
            failed.to_string().starts_with(
                "NOT DELIVERABLE: cannot add `local 198.18.201.0/24 dev lo table local`: "
            ),
            "{failed}"
        );

        inside(&ns.0, || routes.remove_all());
        let table = local_table(&ns.0);
        assert!(!table.contains("proto 121"), "{table}");
        assert!(table.contains("local 2001:2:0:ee::/64 dev lo"), "{table}");
        assert!(table.contains("local 127.0.0.0/8 dev lo"), "{table}");
    }
}
