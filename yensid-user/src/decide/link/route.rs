//! Which interface the kernel sends packets for a destination out of: a
//! route lookup over a snapshot of the routing tables.
//!
//! The model is the kernel's default policy routing: the `local` table
//! first (the host's own addresses go out of `lo`), then `main`. Rules
//! added with `ip rule` and other tables are not looked at.

use std::{cmp::Reverse, net::IpAddr};

/// A routing table the lookup consults, in the order it does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RouteTable {
    Local,
    Main,
}

/// One route of a table snapshot.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Route {
    pub table: RouteTable,
    /// The destination prefix; its family is the route's family.
    pub destination: IpAddr,
    pub prefix_len: u8,
    /// The kernel's metric (RTA_PRIORITY): lower is preferred.
    pub metric: u32,
    /// The output interface; `None` for routes that send nothing out
    /// (blackhole, unreachable, prohibit).
    pub oif: Option<u32>,
}

impl Route {
    fn contains(&self, ip: IpAddr) -> bool {
        match (self.destination, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => same_prefix(
                u32::from(net).into(),
                u32::from(ip).into(),
                self.prefix_len,
                32,
            ),
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                same_prefix(u128::from(net), u128::from(ip), self.prefix_len, 128)
            }
            _ => false,
        }
    }
}

/// Whether the first `prefix_len` of the `width` low bits of `a` and `b`
/// are equal.
fn same_prefix(a: u128, b: u128, prefix_len: u8, width: u32) -> bool {
    let host_bits = width - u32::from(prefix_len).min(width);
    (a ^ b).checked_shr(host_bits).unwrap_or(0) == 0
}

/// The output interface of the route to `dest`: in the first table that
/// has a route to it, the longest prefix wins, then the lowest metric.
/// `None` when no route matches or the best one sends nothing out.
pub fn egress_index(routes: &[Route], dest: IpAddr) -> Option<u32> {
    [RouteTable::Local, RouteTable::Main]
        .into_iter()
        .find_map(|table| best_route(routes, table, dest))
        .and_then(|route| route.oif)
}

fn best_route(routes: &[Route], table: RouteTable, dest: IpAddr) -> Option<&Route> {
    routes
        .iter()
        .filter(|route| route.table == table && route.contains(dest))
        .min_by_key(|route| (Reverse(route.prefix_len), route.metric))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(table: RouteTable, prefix: &str, metric: u32, oif: Option<u32>) -> Route {
        let (destination, prefix_len) = prefix.split_once('/').unwrap();
        Route {
            table,
            destination: destination.parse().unwrap(),
            prefix_len: prefix_len.parse().unwrap(),
            metric,
            oif,
        }
    }

    fn main(prefix: &str, metric: u32, oif: u32) -> Route {
        route(RouteTable::Main, prefix, metric, Some(oif))
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn prefixes_match_on_their_bits_only() {
        let net = main("198.18.0.0/15", 0, 1);
        assert!(net.contains(ip("198.18.0.1")));
        assert!(net.contains(ip("198.19.255.255")));
        assert!(!net.contains(ip("198.20.0.0")));
        assert!(!net.contains(ip("198.17.255.255")));
        let host = main("198.18.0.1/32", 0, 1);
        assert!(host.contains(ip("198.18.0.1")));
        assert!(!host.contains(ip("198.18.0.2")));
        let v6 = main("fd00::/8", 0, 1);
        assert!(v6.contains(ip("fd12::1")));
        assert!(!v6.contains(ip("fe80::1")));
        assert!(main("::1/128", 0, 1).contains(ip("::1")));
    }

    #[test]
    fn default_routes_match_everything_of_their_family_only() {
        let v4 = main("0.0.0.0/0", 0, 1);
        let v6 = main("::/0", 0, 1);
        assert!(v4.contains(ip("203.0.113.9")));
        assert!(!v4.contains(ip("2001:db8::1")));
        assert!(v6.contains(ip("2001:db8::1")));
        assert!(!v6.contains(ip("203.0.113.9")));
        // An IPv4-mapped IPv6 address is an IPv6 destination.
        assert!(!v4.contains(ip("::ffff:198.18.0.1")));
    }

    #[test]
    fn the_longest_prefix_wins_whatever_the_metric() {
        let routes = [
            main("0.0.0.0/0", 0, 1),
            main("198.18.0.0/15", 600, 2),
            main("198.18.5.0/24", 1000, 3),
        ];
        assert_eq!(egress_index(&routes, ip("198.18.5.7")), Some(3));
        assert_eq!(egress_index(&routes, ip("198.18.6.7")), Some(2));
        assert_eq!(egress_index(&routes, ip("203.0.113.9")), Some(1));
    }

    #[test]
    fn among_equal_prefixes_the_lowest_metric_wins() {
        // A laptop with ethernet and wifi both up: NetworkManager gives
        // ethernet the lower metric.
        let routes = [main("0.0.0.0/0", 600, 3), main("0.0.0.0/0", 100, 2)];
        assert_eq!(egress_index(&routes, ip("203.0.113.9")), Some(2));
        let v6 = [main("::/0", 1024, 3), main("::/0", 100, 2)];
        assert_eq!(egress_index(&v6, ip("2001:db8::1")), Some(2));
    }

    #[test]
    fn families_do_not_mix() {
        let routes = [main("0.0.0.0/0", 0, 1), main("2001:db8::/32", 0, 2)];
        assert_eq!(egress_index(&routes, ip("2001:db8::1")), Some(2));
        assert_eq!(egress_index(&routes, ip("2001:db9::1")), None);
        assert_eq!(egress_index(&routes, ip("198.18.0.1")), Some(1));
    }

    #[test]
    fn no_route_means_no_egress() {
        assert_eq!(egress_index(&[], ip("198.18.0.1")), None);
        let routes = [main("198.18.0.0/24", 0, 1)];
        assert_eq!(egress_index(&routes, ip("198.19.0.1")), None);
    }

    #[test]
    fn the_local_table_comes_before_main() {
        let routes = [
            main("198.18.0.0/24", 0, 2),
            route(RouteTable::Local, "198.18.0.1/32", 0, Some(1)),
        ];
        assert_eq!(egress_index(&routes, ip("198.18.0.1")), Some(1));
        assert_eq!(egress_index(&routes, ip("198.18.0.2")), Some(2));
        // Even a shorter prefix in `local` beats a longer one in `main`.
        let loopback = [
            route(RouteTable::Local, "127.0.0.0/8", 0, Some(1)),
            main("127.0.0.2/32", 0, 2),
        ];
        assert_eq!(egress_index(&loopback, ip("127.0.0.2")), Some(1));
    }

    #[test]
    fn a_route_that_sends_nothing_out_hides_less_specific_ones() {
        let routes = [
            main("0.0.0.0/0", 0, 1),
            route(RouteTable::Main, "198.18.0.0/15", 0, None),
        ];
        assert_eq!(egress_index(&routes, ip("198.18.0.1")), None);
        assert_eq!(egress_index(&routes, ip("203.0.113.9")), Some(1));
    }
}
