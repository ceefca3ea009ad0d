//! The I/O: dumps of links and routes over rtnetlink, and a task that
//! re-dumps on every rtnetlink event and publishes the snapshot when it
//! changed.
//!
//! Two sockets: one subscribed to the link, address and route groups, which
//! only wakes the task up (the events are not parsed: a dump after a burst
//! of events sees their effect, and cannot go out of sync with a missed or
//! reordered event); one for the dumps, subscribed to nothing, so that all
//! it receives answers the current request.

use std::{io, net::IpAddr, time::Duration};

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkBuffer, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    link::{LinkAttribute, LinkFlags, LinkInfo, LinkMessage},
    route::{RouteAddress, RouteAttribute, RouteMessage, RouteType},
};
use netlink_sys::{AsyncSocket, AsyncSocketExt, SocketAddr, TokioSocket, protocols::NETLINK_ROUTE};
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use super::{
    Link, LinkKind, LinkState,
    kind::{LinkFacts, classify},
    label::label_of,
    route::{Route, RouteTable},
    sysfs,
};

/// How long to wait after an event before dumping. `ip link set X down`
/// sends the link, then the routes and addresses it takes away; one dump
/// after the burst sees them all. Small, as it adds to the reaction time.
const DEBOUNCE: Duration = Duration::from_millis(3);

/// The rtnetlink groups whose events change a [`LinkState`]. Addresses are
/// watched too: adding or removing one changes the routes of the `local`
/// table.
const GROUPS: u32 = (libc::RTMGRP_LINK
    | libc::RTMGRP_IPV4_IFADDR
    | libc::RTMGRP_IPV6_IFADDR
    | libc::RTMGRP_IPV4_ROUTE
    | libc::RTMGRP_IPV6_ROUTE) as u32;

/// `lo` has this index in every network namespace (the kernel's
/// LOOPBACK_IFINDEX).
const LOOPBACK_INDEX: u32 = 1;

/// A netlink call of the watcher failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("cannot open a NETLINK_ROUTE socket: {0}")]
    Socket(#[source] io::Error),
    #[error("cannot subscribe to the rtnetlink link, address and route groups: {0}")]
    Subscribe(#[source] io::Error),
    #[error("{request} dump failed: {source}")]
    Dump {
        request: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("reading rtnetlink events failed: {0}")]
    Events(#[source] io::Error),
}

/// Dumps the link state of the calling thread's network namespace, then
/// follows it in a task of the current tokio runtime: every change is
/// published through the returned receiver, within milliseconds of the
/// kernel's event. `labels` (glob, kind) override the classification of
/// the interfaces they match; the first match wins.
///
/// The task stops when every receiver is dropped. If a netlink call fails
/// later, it logs the error and stops: the receivers' `changed()` then
/// fails, and the last snapshot must no longer be trusted.
pub async fn watch(
    labels: Vec<(String, LinkKind)>,
) -> Result<watch::Receiver<LinkState>, LinkError> {
    // Subscribed before the first dump: a change during the dump wakes the
    // task up, so it cannot be lost.
    let events = subscribe()?;
    let requests = TokioSocket::new(NETLINK_ROUTE).map_err(LinkError::Socket)?;
    let state = snapshot(&requests, &labels).await?;
    info!(links = state.links().len(), "following the link state");
    let (sender, receiver) = watch::channel(state);
    tokio::spawn(follow(events, requests, labels, sender));
    Ok(receiver)
}

fn subscribe() -> Result<TokioSocket, LinkError> {
    let mut events = TokioSocket::new(NETLINK_ROUTE).map_err(LinkError::Socket)?;
    events
        .socket_mut()
        .bind(&SocketAddr::new(0, GROUPS))
        .map_err(LinkError::Subscribe)?;
    Ok(events)
}

async fn follow(
    events: TokioSocket,
    requests: TokioSocket,
    labels: Vec<(String, LinkKind)>,
    sender: watch::Sender<LinkState>,
) {
    loop {
        tokio::select! {
            received = events.recv_from_full() => match received {
                Ok(_) => {}
                Err(error) if is_overrun(&error) => {
                    warn!("rtnetlink events were dropped; dumping anew");
                }
                Err(error) => {
                    error!(error = %LinkError::Events(error), "link state is no longer followed");
                    return;
                }
            },
            () = sender.closed() => {
                debug!("nobody reads the link state any more");
                return;
            }
        }
        tokio::time::sleep(DEBOUNCE).await;
        discard_queued(&events);
        match snapshot(&requests, &labels).await {
            Ok(state) => publish(&sender, state),
            Err(error) => {
                error!(%error, "link state is no longer followed");
                return;
            }
        }
    }
}

/// ENOBUFS: the kernel dropped events because the socket's queue was full.
/// Whatever they said, the next dump sees it, so it counts as an event.
fn is_overrun(error: &io::Error) -> bool {
    error.raw_os_error() == Some(libc::ENOBUFS)
}

/// Discards the events already queued: the dump that follows sees their
/// effect.
fn discard_queued(events: &TokioSocket) {
    let mut datagram = Vec::with_capacity(8192);
    loop {
        datagram.clear();
        match events.socket_ref().recv(&mut datagram, 0) {
            Ok(_) => {}
            Err(error) if is_overrun(&error) => {}
            // WouldBlock: nothing left. Another error comes back at the
            // next read, which reports it.
            Err(_) => return,
        }
    }
}

fn publish(sender: &watch::Sender<LinkState>, state: LinkState) {
    sender.send_if_modified(|current| {
        if *current == state {
            return false;
        }
        debug!(links = ?state.links(), "link state changed");
        *current = state;
        true
    });
}

async fn snapshot(
    requests: &TokioSocket,
    labels: &[(String, LinkKind)],
) -> Result<LinkState, LinkError> {
    let get_links = RouteNetlinkMessage::GetLink(LinkMessage::default());
    let links = dump(requests, get_links, "RTM_GETLINK")
        .await?
        .iter()
        .filter_map(|message| match message {
            RouteNetlinkMessage::NewLink(link) => link_of(link, labels),
            _ => None,
        })
        .collect();
    // AF_UNSPEC: the routes of every family in one dump; all tables, as
    // only strict checking would filter them in the kernel.
    let get_routes = RouteNetlinkMessage::GetRoute(RouteMessage::default());
    let routes = dump(requests, get_routes, "RTM_GETROUTE")
        .await?
        .iter()
        .filter_map(|message| match message {
            RouteNetlinkMessage::NewRoute(route) => route_of(route),
            _ => None,
        })
        .collect();
    Ok(LinkState::new(links, routes))
}

/// Sends a dump request and collects the replies up to NLMSG_DONE. A dump
/// the kernel marks interrupted (NLM_F_DUMP_INTR) is used as it is: the
/// change that interrupted it also sent an event, which brings a new dump.
async fn dump(
    socket: &TokioSocket,
    request: RouteNetlinkMessage,
    name: &'static str,
) -> Result<Vec<RouteNetlinkMessage>, LinkError> {
    let failed = |source| LinkError::Dump {
        request: name,
        source,
    };
    let mut message = NetlinkMessage::from(request);
    message.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    message.finalize();
    let mut bytes = vec![0; message.buffer_len()];
    message.serialize(&mut bytes);
    let kernel = SocketAddr::new(0, 0);
    socket.send_to(&bytes, &kernel).await.map_err(failed)?;
    let mut replies = Vec::new();
    loop {
        let (datagram, _) = socket.recv_from_full().await.map_err(failed)?;
        if read_replies(&datagram, &mut replies, name).map_err(failed)? {
            return Ok(replies);
        }
    }
}

/// Appends the messages of one datagram to `replies`; true once the dump
/// is done. A message that does not decode is skipped: one odd interface
/// must not blind the watcher to all others.
fn read_replies(
    mut datagram: &[u8],
    replies: &mut Vec<RouteNetlinkMessage>,
    request: &str,
) -> io::Result<bool> {
    while !datagram.is_empty() {
        let length = NetlinkBuffer::new_checked(datagram)
            .map_err(|error| io::Error::new(io::ErrorKind::InvalidData, error.to_string()))?
            .length() as usize;
        match NetlinkMessage::<RouteNetlinkMessage>::deserialize(&datagram[..length]) {
            Ok(message) => match message.payload {
                NetlinkPayload::Done(_) => return Ok(true),
                NetlinkPayload::Error(error) if error.code.is_some() => return Err(error.to_io()),
                NetlinkPayload::InnerMessage(reply) => replies.push(reply),
                _ => {}
            },
            Err(error) => {
                warn!(request, %error, "skipping an rtnetlink message that does not decode")
            }
        }
        // Messages are 4-byte aligned in a datagram.
        let aligned = length.next_multiple_of(4).min(datagram.len());
        datagram = &datagram[aligned..];
    }
    Ok(false)
}

/// The interface a RTM_NEWLINK message describes, completed from sysfs and
/// classified, unless a label says what it is.
fn link_of(message: &LinkMessage, labels: &[(String, LinkKind)]) -> Option<Link> {
    let index = message.header.index;
    let name = message
        .attributes
        .iter()
        .find_map(|attribute| match attribute {
            LinkAttribute::IfName(name) => Some(name.clone()),
            _ => None,
        })?;
    let sysfs = sysfs::read(&name, index);
    let kind = label_of(labels, &name).unwrap_or_else(|| {
        classify(&LinkFacts {
            info_kind: info_kind_of(message),
            arphrd: message.header.link_layer_type.into(),
            wireless: sysfs.wireless,
            devtype: sysfs.devtype,
            driver: sysfs.driver,
        })
    });
    Some(Link {
        index,
        name,
        kind,
        // RUNNING is the kernel's "operationally up": operstate UP, or
        // UNKNOWN for devices without a carrier notion (lo, tun, dummy).
        up: message
            .header
            .flags
            .contains(LinkFlags::Up | LinkFlags::Running),
        speed_mbps: sysfs.speed_mbps,
    })
}

fn info_kind_of(message: &LinkMessage) -> Option<String> {
    message
        .attributes
        .iter()
        .find_map(|attribute| match attribute {
            LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|info| match info {
                LinkInfo::Kind(kind) => Some(kind.to_string()),
                _ => None,
            }),
            _ => None,
        })
}

/// The route a RTM_NEWROUTE message describes, if it is of a table and a
/// type the lookup uses.
fn route_of(message: &RouteMessage) -> Option<Route> {
    let table = match table_of(message) {
        id if id == u32::from(libc::RT_TABLE_LOCAL) => RouteTable::Local,
        id if id == u32::from(libc::RT_TABLE_MAIN) => RouteTable::Main,
        _ => return None,
    };
    let oif = match message.header.kind {
        // Routes to the host's own addresses name the interface holding
        // the address, but the packets go through loopback.
        RouteType::Local => Some(LOOPBACK_INDEX),
        RouteType::Unicast | RouteType::Broadcast | RouteType::Anycast | RouteType::Multicast => {
            output_interface_of(message)
        }
        RouteType::BlackHole | RouteType::Unreachable | RouteType::Prohibit => None,
        _ => return None,
    };
    Some(Route {
        table,
        destination: destination_of(message)?,
        prefix_len: message.header.destination_prefix_length,
        metric: attribute_of(message, |attribute| match attribute {
            RouteAttribute::Priority(metric) => Some(*metric),
            _ => None,
        })
        .unwrap_or(0),
        oif,
    })
}

fn attribute_of<T>(
    message: &RouteMessage,
    pick: impl Fn(&RouteAttribute) -> Option<T>,
) -> Option<T> {
    message.attributes.iter().find_map(pick)
}

/// Table ids above 255 only fit the RTA_TABLE attribute.
fn table_of(message: &RouteMessage) -> u32 {
    attribute_of(message, |attribute| match attribute {
        RouteAttribute::Table(table) => Some(*table),
        _ => None,
    })
    .unwrap_or(message.header.table.into())
}

/// A default route has no RTA_DST: its destination is the family's
/// unspecified address.
fn destination_of(message: &RouteMessage) -> Option<IpAddr> {
    let destination = attribute_of(message, |attribute| match attribute {
        RouteAttribute::Destination(destination) => Some(destination.clone()),
        _ => None,
    });
    match (destination, message.header.address_family) {
        (Some(RouteAddress::Inet(ip)), _) => Some(ip.into()),
        (Some(RouteAddress::Inet6(ip)), _) => Some(ip.into()),
        (None, AddressFamily::Inet) => Some(IpAddr::from([0u8; 4])),
        (None, AddressFamily::Inet6) => Some(IpAddr::from([0u8; 16])),
        _ => None,
    }
}

/// RTA_OIF, or for a multipath route the first next hop's interface (the
/// kernel spreads flows over all of them; they are usually of one kind).
/// Routes through nexthop objects (RTA_NH_ID) name no interface here.
fn output_interface_of(message: &RouteMessage) -> Option<u32> {
    attribute_of(message, |attribute| match attribute {
        RouteAttribute::Oif(index) => Some(*index),
        RouteAttribute::MultiPath(hops) => hops.first().map(|hop| hop.interface_index),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use std::{
        ffi::CString,
        num::NonZeroI32,
        os::fd::AsRawFd,
        process::Command,
        time::{Duration, Instant},
    };

    use netlink_packet_core::{DoneMessage, ErrorMessage, NetlinkHeader};
    use netlink_packet_route::{
        link::InfoKind,
        route::{RouteHeader, RouteNextHop},
    };

    use super::*;

    fn link_message(index: u32, name: &str, flags: LinkFlags, kind: InfoKind) -> LinkMessage {
        let mut message = LinkMessage::default();
        message.header.index = index;
        message.header.flags = flags;
        message.header.link_layer_type = netlink_packet_route::link::LinkLayerType::Ether;
        message.attributes = vec![
            LinkAttribute::IfName(name.to_owned()),
            LinkAttribute::LinkInfo(vec![LinkInfo::Kind(kind)]),
        ];
        message
    }

    fn route_message(
        family: AddressFamily,
        kind: RouteType,
        prefix_len: u8,
        attributes: Vec<RouteAttribute>,
    ) -> RouteMessage {
        let mut message = RouteMessage::default();
        message.header.address_family = family;
        message.header.table = RouteHeader::RT_TABLE_MAIN;
        message.header.kind = kind;
        message.header.destination_prefix_length = prefix_len;
        message.attributes = attributes;
        message
    }

    fn unicast(attributes: Vec<RouteAttribute>) -> RouteMessage {
        route_message(AddressFamily::Inet, RouteType::Unicast, 24, attributes)
    }

    fn destination(ip: &str) -> RouteAttribute {
        RouteAttribute::Destination(ip.parse::<IpAddr>().unwrap().into())
    }

    // No interface of that name exists, so sysfs adds nothing.
    const ABSENT: &str = "yl-absent0";

    #[test]
    fn a_link_message_becomes_a_classified_link() {
        let up = link_message(
            4242,
            ABSENT,
            LinkFlags::Up | LinkFlags::Running,
            InfoKind::Veth,
        );
        let link = link_of(&up, &[]).unwrap();
        assert_eq!(
            link,
            Link {
                index: 4242,
                name: ABSENT.to_owned(),
                kind: LinkKind::Virtual,
                up: true,
                speed_mbps: None,
            }
        );
        let labels = [("yl-*".to_owned(), LinkKind::Ethernet)];
        assert_eq!(link_of(&up, &labels).unwrap().kind, LinkKind::Ethernet);
        let wireguard = link_message(4242, ABSENT, LinkFlags::Up, InfoKind::Wireguard);
        assert_eq!(link_of(&wireguard, &[]).unwrap().kind, LinkKind::Vpn);
    }

    #[test]
    fn a_link_is_up_only_when_administratively_up_and_running() {
        for (flags, up) in [
            (
                LinkFlags::Up | LinkFlags::Running | LinkFlags::LowerUp,
                true,
            ),
            (LinkFlags::Up | LinkFlags::Running, true),
            // Admin up, no carrier.
            (LinkFlags::Up, false),
            (LinkFlags::empty(), false),
        ] {
            let message = link_message(4242, ABSENT, flags, InfoKind::Veth);
            assert_eq!(link_of(&message, &[]).unwrap().up, up, "{flags:?}");
        }
    }

    #[test]
    fn a_link_message_without_a_name_is_skipped() {
        let mut message = link_message(4242, ABSENT, LinkFlags::Up, InfoKind::Veth);
        message.attributes.remove(0);
        assert_eq!(link_of(&message, &[]), None);
    }

    #[test]
    fn a_route_message_becomes_a_route() {
        let message = unicast(vec![
            destination("198.18.0.0"),
            RouteAttribute::Oif(3),
            RouteAttribute::Priority(100),
        ]);
        assert_eq!(
            route_of(&message),
            Some(Route {
                table: RouteTable::Main,
                destination: "198.18.0.0".parse().unwrap(),
                prefix_len: 24,
                metric: 100,
                oif: Some(3),
            })
        );
    }

    #[test]
    fn default_routes_have_the_unspecified_destination_and_metric_zero() {
        let v4 = route_message(
            AddressFamily::Inet,
            RouteType::Unicast,
            0,
            vec![RouteAttribute::Oif(2)],
        );
        let v4 = route_of(&v4).unwrap();
        assert_eq!(
            (v4.destination, v4.prefix_len, v4.metric),
            ("0.0.0.0".parse().unwrap(), 0, 0)
        );
        let v6 = route_message(
            AddressFamily::Inet6,
            RouteType::Unicast,
            0,
            vec![RouteAttribute::Oif(2)],
        );
        assert_eq!(
            route_of(&v6).unwrap().destination,
            "::".parse::<IpAddr>().unwrap()
        );
        let other = route_message(AddressFamily::Mpls, RouteType::Unicast, 0, vec![]);
        assert_eq!(route_of(&other), None);
    }

    #[test]
    fn only_the_local_and_main_tables_count() {
        let mut local = unicast(vec![destination("198.18.0.255"), RouteAttribute::Oif(2)]);
        local.header.table = libc::RT_TABLE_LOCAL;
        local.header.kind = RouteType::Broadcast;
        assert_eq!(route_of(&local).unwrap().table, RouteTable::Local);
        // Ids above 255 come in RTA_TABLE, the header saying RT_TABLE_COMPAT.
        let mut big = unicast(vec![RouteAttribute::Table(1000), RouteAttribute::Oif(1)]);
        big.header.table = libc::RT_TABLE_COMPAT;
        assert_eq!(route_of(&big), None);
        let mut main_by_attribute =
            unicast(vec![RouteAttribute::Table(254), RouteAttribute::Oif(1)]);
        main_by_attribute.header.table = 0;
        assert_eq!(
            route_of(&main_by_attribute).unwrap().table,
            RouteTable::Main
        );
        let mut vpn_table = unicast(vec![RouteAttribute::Oif(1)]);
        vpn_table.header.table = 51;
        assert_eq!(route_of(&vpn_table), None);
    }

    #[test]
    fn routes_to_own_addresses_go_out_of_loopback() {
        // As the kernel reports `local 198.18.0.1 dev eth0 table local`.
        let mut own = unicast(vec![destination("198.18.0.1"), RouteAttribute::Oif(2)]);
        own.header.table = libc::RT_TABLE_LOCAL;
        own.header.kind = RouteType::Local;
        assert_eq!(route_of(&own).unwrap().oif, Some(LOOPBACK_INDEX));
    }

    #[test]
    fn routes_that_send_nothing_out_have_no_interface() {
        for kind in [
            RouteType::BlackHole,
            RouteType::Unreachable,
            RouteType::Prohibit,
        ] {
            let message = route_message(
                AddressFamily::Inet,
                kind,
                15,
                vec![destination("198.18.0.0")],
            );
            assert_eq!(route_of(&message).unwrap().oif, None, "{kind:?}");
        }
        let throw = route_message(AddressFamily::Inet, RouteType::Throw, 15, vec![]);
        assert_eq!(route_of(&throw), None);
    }

    #[test]
    fn a_multipath_route_goes_out_of_its_first_hop() {
        let hop = |interface_index| {
            let mut hop = RouteNextHop::default();
            hop.interface_index = interface_index;
            hop
        };
        let message = route_message(
            AddressFamily::Inet6,
            RouteType::Unicast,
            0,
            vec![RouteAttribute::MultiPath(vec![hop(5), hop(6)])],
        );
        assert_eq!(route_of(&message).unwrap().oif, Some(5));
    }

    fn datagram(messages: Vec<NetlinkPayload<RouteNetlinkMessage>>) -> Vec<u8> {
        let mut bytes = Vec::new();
        for payload in messages {
            let mut message = NetlinkMessage::new(NetlinkHeader::default(), payload);
            message.finalize();
            let start = bytes.len();
            bytes.resize(start + message.buffer_len().next_multiple_of(4), 0);
            message.serialize(&mut bytes[start..start + message.buffer_len()]);
        }
        bytes
    }

    fn new_link(index: u32) -> NetlinkPayload<RouteNetlinkMessage> {
        let link = link_message(index, ABSENT, LinkFlags::Up, InfoKind::Veth);
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link))
    }

    #[test]
    fn replies_are_collected_until_done() {
        let mut replies = Vec::new();
        let first = datagram(vec![new_link(1), new_link(2)]);
        assert!(!read_replies(&first, &mut replies, "RTM_GETLINK").unwrap());
        let last = datagram(vec![
            new_link(3),
            NetlinkPayload::Done(DoneMessage::default()),
        ]);
        assert!(read_replies(&last, &mut replies, "RTM_GETLINK").unwrap());
        let indexes: Vec<_> = replies
            .iter()
            .map(|reply| match reply {
                RouteNetlinkMessage::NewLink(link) => link.header.index,
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(indexes, [1, 2, 3]);
    }

    #[test]
    fn a_kernel_error_fails_the_dump() {
        let mut error = ErrorMessage::default();
        error.code = NonZeroI32::new(-libc::EPERM);
        let bytes = datagram(vec![NetlinkPayload::Error(error)]);
        let failure = read_replies(&bytes, &mut Vec::new(), "RTM_GETLINK").unwrap_err();
        assert_eq!(failure.raw_os_error(), Some(libc::EPERM));
        let truncated = datagram(vec![new_link(1)]);
        let failure = read_replies(&truncated[..10], &mut Vec::new(), "RTM_GETLINK").unwrap_err();
        assert_eq!(failure.kind(), io::ErrorKind::InvalidData);
    }

    // --- The watcher against a real kernel, in a network namespace. ---

    /// A network namespace that is deleted when dropped, even on panic.
    struct Netns(String);

    impl Netns {
        fn add(name: String) -> Netns {
            run_ip(&["netns", "add", &name]);
            Netns(name)
        }

        fn ip(&self, args: &[&str]) {
            run_ip(&[&["-n", &self.0], args].concat());
        }

        /// Enters the namespace with the calling thread, and gives the
        /// thread a sysfs of that namespace (in its own mount namespace, as
        /// `ip netns exec` does), so that sysfs facts can be checked too.
        fn enter(&self) {
            let path = format!("/run/netns/{}", self.0);
            let netns = std::fs::File::open(&path).expect("open the netns file");
            let none = std::ptr::null();
            let sysfs = CString::new("sysfs").unwrap();
            // SAFETY: plain syscalls on valid fds and NUL-terminated strings;
            // they change only the calling thread's namespaces.
            unsafe {
                assert_eq!(
                    libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET),
                    0,
                    "setns"
                );
                assert_eq!(libc::unshare(libc::CLONE_NEWNS), 0, "unshare");
                let private = libc::MS_REC | libc::MS_PRIVATE;
                assert_eq!(
                    libc::mount(none, c"/".as_ptr(), none, private, none.cast()),
                    0,
                    "make / private"
                );
                let sys = c"/sys".as_ptr();
                assert_eq!(
                    libc::mount(sysfs.as_ptr(), sys, sysfs.as_ptr(), 0, none.cast()),
                    0,
                    "mount sysfs"
                );
            }
        }
    }

    impl Drop for Netns {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }

    /// Says that `test` could not run (not root), and appends it to the file
    /// `cargo xtask test` counts skips in (`YENSID_TEST_SKIPS`, see the test
    /// harness), so that a skip never passes for a pass.
    fn record_skip(test: &str) {
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "SKIPPED (not root): {test}");
        if let Some(file) = std::env::var_os("YENSID_TEST_SKIPS") {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&file)
                .and_then(|mut f| f.write_all(format!("{test}\tnot root\n").as_bytes()))
                .expect("record the skip in $YENSID_TEST_SKIPS");
        }
    }

    fn run_ip(args: &[&str]) {
        let status = Command::new("ip").args(args).status().expect("run ip");
        assert!(status.success(), "ip {args:?}: {status}");
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn named<'a>(state: &'a LinkState, name: &str) -> Option<&'a Link> {
        state.links().iter().find(|link| link.name == name)
    }

    fn egress_name(state: &LinkState, dest: &str) -> Option<String> {
        state.egress(ip(dest)).map(|link| link.name.clone())
    }

    /// Waits for a published snapshot that satisfies `wanted`. The timeout
    /// only keeps a broken watcher from hanging the test.
    async fn wait_for(
        states: &mut watch::Receiver<LinkState>,
        what: &str,
        wanted: impl Fn(&LinkState) -> bool,
    ) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !wanted(&states.borrow_and_update()) {
            let left = deadline.saturating_duration_since(Instant::now());
            tokio::time::timeout(left, states.changed())
                .await
                .unwrap_or_else(|_| panic!("no snapshot with {what}: {:#?}", *states.borrow()))
                .expect("the watcher stopped");
        }
    }

    async fn follow_the_namespace(netns: &Netns) {
        let labels = vec![("yl-eth*".to_owned(), LinkKind::Ethernet)];
        let mut states = watch(labels).await.expect("watch");

        let first = states.borrow_and_update().clone();
        let eth = named(&first, "yl-eth0").expect("yl-eth0 is listed");
        assert_eq!((eth.kind, eth.up), (LinkKind::Ethernet, true));
        // What veths report; proves sysfs is read.
        assert_eq!(eth.speed_mbps, Some(10_000));
        let peer = named(&first, "yl-peer0").expect("yl-peer0 is listed");
        assert_eq!((peer.kind, peer.up), (LinkKind::Virtual, true));
        assert_eq!(named(&first, "lo").unwrap().kind, LinkKind::Loopback);
        assert_eq!(
            egress_name(&first, "198.18.0.2").as_deref(),
            Some("yl-eth0")
        );
        // The host's own addresses go out of lo (the local table).
        assert_eq!(egress_name(&first, "198.18.0.1").as_deref(), Some("lo"));
        assert_eq!(egress_name(&first, "127.0.0.1").as_deref(), Some("lo"));
        assert_eq!(egress_name(&first, "::1").as_deref(), Some("lo"));
        assert_eq!(egress_name(&first, "198.19.1.1"), None);

        netns.ip(&["route", "add", "198.19.0.0/16", "dev", "yl-peer0"]);
        wait_for(&mut states, "a route to 198.19/16 via yl-peer0", |state| {
            egress_name(state, "198.19.1.1").as_deref() == Some("yl-peer0")
        })
        .await;
        netns.ip(&["route", "add", "198.19.5.0/24", "dev", "yl-eth0"]);
        wait_for(&mut states, "198.19.5/24 moved to yl-eth0", |state| {
            egress_name(state, "198.19.5.1").as_deref() == Some("yl-eth0")
                && egress_name(state, "198.19.6.1").as_deref() == Some("yl-peer0")
        })
        .await;

        netns.ip(&["link", "set", "yl-eth0", "down"]);
        wait_for(
            &mut states,
            "yl-eth0 down, its peer without carrier, its routes gone",
            |state| {
                named(state, "yl-eth0").is_some_and(|link| !link.up && link.speed_mbps.is_none())
                    && named(state, "yl-peer0").is_some_and(|link| !link.up)
                    && egress_name(state, "198.18.0.2").is_none()
                    && egress_name(state, "198.19.5.1").as_deref() == Some("yl-peer0")
            },
        )
        .await;

        netns.ip(&["link", "set", "yl-eth0", "up"]);
        wait_for(
            &mut states,
            "yl-eth0 up again with its subnet route",
            |state| {
                named(state, "yl-eth0").is_some_and(|link| link.up)
                    && egress_name(state, "198.18.0.2").as_deref() == Some("yl-eth0")
            },
        )
        .await;
    }

    #[test]
    fn follows_links_and_routes_of_a_network_namespace() {
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            record_skip(
                "decide::link::netlink::tests::follows_links_and_routes_of_a_network_namespace",
            );
            return;
        }
        // Named as the test harness names what it creates (`yensid-test-<pid in
        // hex>-...`), so a run killed before Drop leaves nothing the harness's
        // stale-object sweep would not remove.
        let netns = Netns::add(format!("yensid-test-{:x}-netlink", std::process::id()));
        netns.ip(&[
            "link", "add", "yl-eth0", "type", "veth", "peer", "name", "yl-peer0",
        ]);
        netns.ip(&["address", "add", "198.18.0.1/24", "dev", "yl-eth0"]);
        for link in ["lo", "yl-eth0", "yl-peer0"] {
            netns.ip(&["link", "set", link, "up"]);
        }
        // The watcher follows the namespace of the thread that starts it:
        // a dedicated thread enters it and runs a runtime of its own.
        let outcome = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    netns.enter();
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap()
                        .block_on(follow_the_namespace(&netns));
                })
                .join()
        });
        if let Err(panic) = outcome {
            std::panic::resume_unwind(panic);
        }
    }
}
