//! Link state from netlink: for any destination, the interface the kernel
//! routes it out of, what kind of link that is (ethernet, wifi, wwan, vpn,
//! ...), whether it is up and how fast.
//!
//! The decisions are pure and unit-tested: classification from the
//! kernel's facts (`kind`), user labels by glob (`label`), route lookup
//! (`route`). The I/O is thin: sysfs reads (`sysfs`) and rtnetlink dumps
//! and events (`netlink`), which keep a [`LinkState`] current through
//! [`watch`].

mod kind;
mod label;
mod netlink;
mod route;
mod sysfs;

use std::net::IpAddr;

use serde::Serialize;

pub use kind::LinkKind;
pub use netlink::watch;
use route::Route;

/// One network interface, as the policy sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Link {
    /// The interface index.
    pub index: u32,
    pub name: String,
    /// From a user label if one matches, else classified.
    pub kind: LinkKind,
    /// Administratively up and operational (carrier present, or a device
    /// without a carrier notion such as `lo` or a tun).
    pub up: bool,
    /// Where the driver knows it (never while administratively down).
    pub speed_mbps: Option<u32>,
}

/// A snapshot of the interfaces and of the routes that lead out of them.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct LinkState {
    /// Sorted by index.
    links: Vec<Link>,
    /// Only what [`LinkState::egress`] needs; a hook gets the egress link
    /// of each builder, not the routing tables.
    #[serde(skip)]
    routes: Vec<Route>,
}

impl LinkState {
    /// Sorts both lists, so that equal kernel states compare equal
    /// whatever the order of the dumps.
    fn new(mut links: Vec<Link>, mut routes: Vec<Route>) -> Self {
        links.sort_by_key(|link| link.index);
        routes.sort();
        LinkState { links, routes }
    }

    /// Every interface, by index.
    pub fn links(&self) -> &[Link] {
        &self.links
    }

    /// The interface with index `index`.
    pub fn link(&self, index: u32) -> Option<&Link> {
        let position = self
            .links
            .binary_search_by_key(&index, |link| link.index)
            .ok()?;
        Some(&self.links[position])
    }

    /// The interface the route to `dest` goes out of; `None` when there is
    /// no route (or an unreachable one), which for a builder means it
    /// cannot be reached.
    pub fn egress(&self, dest: IpAddr) -> Option<&Link> {
        self.link(route::egress_index(&self.routes, dest)?)
    }
}

#[cfg(test)]
impl LinkState {
    /// A state with `links` and one main-table route per `("prefix/len",
    /// interface index)`, for other modules' tests.
    pub fn with_routes(links: Vec<Link>, routes: &[(&str, u32)]) -> Self {
        let routes = routes
            .iter()
            .map(|(prefix, oif)| {
                let (destination, len) = prefix.split_once('/').expect("prefix/len");
                Route {
                    table: route::RouteTable::Main,
                    destination: destination.parse().expect("an address"),
                    prefix_len: len.parse().expect("a length"),
                    metric: 0,
                    oif: Some(*oif),
                }
            })
            .collect();
        LinkState::new(links, routes)
    }
}

#[cfg(test)]
mod tests {
    use super::{route::RouteTable, *};

    fn link(index: u32, name: &str, kind: LinkKind, up: bool) -> Link {
        Link {
            index,
            name: name.to_owned(),
            kind,
            up,
            speed_mbps: None,
        }
    }

    fn route(prefix: &str, oif: u32) -> Route {
        let (destination, prefix_len) = prefix.split_once('/').unwrap();
        Route {
            table: RouteTable::Main,
            destination: destination.parse().unwrap(),
            prefix_len: prefix_len.parse().unwrap(),
            metric: 0,
            oif: Some(oif),
        }
    }

    fn laptop() -> LinkState {
        LinkState::new(
            vec![
                link(3, "wlp2s0", LinkKind::Wifi, true),
                link(1, "lo", LinkKind::Loopback, true),
                Link {
                    speed_mbps: Some(1000),
                    ..link(2, "enp0s31f6", LinkKind::Ethernet, true)
                },
            ],
            vec![
                route("0.0.0.0/0", 3),
                route("198.18.0.0/24", 2),
                route("198.19.0.0/16", 42),
            ],
        )
    }

    #[test]
    fn egress_names_the_interface_of_the_best_route() {
        let state = laptop();
        let ethernet = state.egress("198.18.0.7".parse().unwrap()).unwrap();
        assert_eq!(ethernet.name, "enp0s31f6");
        assert_eq!(ethernet.kind, LinkKind::Ethernet);
        assert_eq!(ethernet.speed_mbps, Some(1000));
        let wifi = state.egress("203.0.113.9".parse().unwrap()).unwrap();
        assert_eq!(wifi.name, "wlp2s0");
    }

    #[test]
    fn no_egress_without_a_route_or_for_an_unknown_interface() {
        let state = laptop();
        assert_eq!(state.egress("2001:db8::1".parse().unwrap()), None);
        // The route names an interface the snapshot does not have (it
        // vanished between the two dumps).
        assert_eq!(state.egress("198.19.0.1".parse().unwrap()), None);
    }

    #[test]
    fn links_are_kept_by_index() {
        let state = laptop();
        let names: Vec<_> = state.links().iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["lo", "enp0s31f6", "wlp2s0"]);
        assert_eq!(state.link(3).unwrap().name, "wlp2s0");
        assert_eq!(state.link(4), None);
    }

    #[test]
    fn snapshots_compare_equal_whatever_the_dump_order() {
        let state = laptop();
        let mut links = state.links.clone();
        let mut routes = state.routes.clone();
        links.reverse();
        routes.reverse();
        assert_eq!(LinkState::new(links, routes), state);
        let mut down = state.clone();
        down.links[1].up = false;
        assert_ne!(down, state);
    }

    #[test]
    fn the_json_document_lists_links_without_routes() {
        let json = serde_json::to_value(laptop()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"links": [
                {"index": 1, "name": "lo", "kind": "loopback", "up": true, "speed_mbps": null},
                {"index": 2, "name": "enp0s31f6", "kind": "ethernet", "up": true, "speed_mbps": 1000},
                {"index": 3, "name": "wlp2s0", "kind": "wifi", "up": true, "speed_mbps": null},
            ]})
        );
    }
}
