//! What kind of link an interface is, decided from what the kernel tells.
//!
//! [`classify`] is a pure function of [`LinkFacts`]; gathering the facts
//! (netlink attributes, sysfs files) is done elsewhere.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

/// The kind of a network link, as the policy sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkKind {
    Ethernet,
    Wifi,
    /// Mobile broadband: a modem, or a phone tethered over USB.
    Wwan,
    /// A tunnel: tun/tap, wireguard, ipip, gre, xfrm...
    Vpn,
    Loopback,
    /// A software device local to the host: veth, bridge, bond, vlan,
    /// macvlan, dummy...
    Virtual,
    Other,
}

impl LinkKind {
    pub const ALL: [LinkKind; 7] = [
        LinkKind::Ethernet,
        LinkKind::Wifi,
        LinkKind::Wwan,
        LinkKind::Vpn,
        LinkKind::Loopback,
        LinkKind::Virtual,
        LinkKind::Other,
    ];

    /// The name used in the configuration and in JSON documents.
    pub fn name(self) -> &'static str {
        match self {
            LinkKind::Ethernet => "ethernet",
            LinkKind::Wifi => "wifi",
            LinkKind::Wwan => "wwan",
            LinkKind::Vpn => "vpn",
            LinkKind::Loopback => "loopback",
            LinkKind::Virtual => "virtual",
            LinkKind::Other => "other",
        }
    }
}

impl fmt::Display for LinkKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A link kind name that is not one of [`LinkKind::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown link kind {0:?} (expected one of ethernet, wifi, wwan, vpn, loopback, virtual, other)"
)]
pub struct UnknownLinkKind(pub String);

impl FromStr for LinkKind {
    type Err = UnknownLinkKind;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        LinkKind::ALL
            .into_iter()
            .find(|kind| kind.name() == s)
            .ok_or_else(|| UnknownLinkKind(s.to_owned()))
    }
}

/// What the kernel tells about an interface, as far as classification
/// needs it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LinkFacts {
    /// IFLA_INFO_KIND: the rtnetlink driver of a software device ("veth",
    /// "wireguard"...). Physical NICs have none.
    pub info_kind: Option<String>,
    /// The ARPHRD_* hardware type.
    pub arphrd: u16,
    /// `/sys/class/net/<if>/wireless` or `phy80211` exists.
    pub wireless: bool,
    /// DEVTYPE from `/sys/class/net/<if>/uevent` ("wlan", "wwan"...).
    pub devtype: Option<String>,
    /// The name of the bound device driver, for hardware devices.
    pub driver: Option<String>,
}

/// Raw IP without link-layer header, as used by mobile broadband modems
/// (not in libc).
const ARPHRD_RAWIP: u16 = 519;

/// Drivers of USB network functions that are phones sharing their mobile
/// connection; the kernel reports them as plain ethernet.
const TETHERING_DRIVERS: [&str; 2] = ["ipheth", "rndis_host"];

/// Software devices that carry their traffic inside another link's packets.
const TUNNEL_KINDS: [&str; 16] = [
    "tun",
    "wireguard",
    "ovpn",
    "ipip",
    "ip6tnl",
    "sit",
    "gre",
    "gretap",
    "ip6gre",
    "ip6gretap",
    "vti",
    "vti6",
    "xfrm",
    "l2tpeth",
    "vxlan",
    "geneve",
];

/// Classifies an interface. Where the kernel leaves it ambiguous (ppp,
/// raw-IP devices), the answer is `wwan`: the kind a policy is least likely
/// to send builds over, so a wrong guess builds locally rather than over a
/// metered link. Labels fix any guess.
pub fn classify(facts: &LinkFacts) -> LinkKind {
    if facts.arphrd == libc::ARPHRD_LOOPBACK {
        return LinkKind::Loopback;
    }
    if let Some(kind) = devtype_kind(facts) {
        return kind;
    }
    if let Some(kind) = facts.info_kind.as_deref() {
        return info_kind_kind(kind);
    }
    if facts
        .driver
        .as_deref()
        .is_some_and(|driver| TETHERING_DRIVERS.contains(&driver))
    {
        return LinkKind::Wwan;
    }
    arphrd_kind(facts.arphrd)
}

/// The kind that sysfs states outright: wireless extensions, a phy, or the
/// DEVTYPE the driver announces.
fn devtype_kind(facts: &LinkFacts) -> Option<LinkKind> {
    match facts.devtype.as_deref() {
        _ if facts.wireless => Some(LinkKind::Wifi),
        Some("wlan") => Some(LinkKind::Wifi),
        Some("wwan") => Some(LinkKind::Wwan),
        _ => None,
    }
}

fn info_kind_kind(info_kind: &str) -> LinkKind {
    match info_kind {
        "virt_wifi" => LinkKind::Wifi,
        "wwan" | "rmnet" | "ppp" => LinkKind::Wwan,
        kind if TUNNEL_KINDS.contains(&kind) => LinkKind::Vpn,
        // Every other rtnetlink driver is a software device local to the
        // host (veth, bridge, bond, vlan, macvlan, dummy, vrf, ...).
        _ => LinkKind::Virtual,
    }
}

fn arphrd_kind(arphrd: u16) -> LinkKind {
    match arphrd {
        libc::ARPHRD_ETHER => LinkKind::Ethernet,
        libc::ARPHRD_IEEE80211 | libc::ARPHRD_IEEE80211_PRISM | libc::ARPHRD_IEEE80211_RADIOTAP => {
            LinkKind::Wifi
        }
        libc::ARPHRD_PPP | libc::ARPHRD_NONE | ARPHRD_RAWIP => LinkKind::Wwan,
        _ => LinkKind::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ether() -> LinkFacts {
        LinkFacts {
            arphrd: libc::ARPHRD_ETHER,
            ..LinkFacts::default()
        }
    }

    fn with_info_kind(kind: &str) -> LinkFacts {
        LinkFacts {
            info_kind: Some(kind.to_owned()),
            ..ether()
        }
    }

    #[test]
    fn names_round_trip_through_display_from_str_and_serde() {
        for kind in LinkKind::ALL {
            let name = kind.to_string();
            assert_eq!(name.parse::<LinkKind>(), Ok(kind));
            assert_eq!(serde_json::to_string(&kind).unwrap(), format!("\"{name}\""));
            assert_eq!(
                serde_json::from_str::<LinkKind>(&format!("\"{name}\"")).unwrap(),
                kind
            );
        }
        let names: Vec<_> = LinkKind::ALL.iter().map(|k| k.name()).collect();
        assert_eq!(
            names,
            [
                "ethernet", "wifi", "wwan", "vpn", "loopback", "virtual", "other"
            ]
        );
    }

    #[test]
    fn unknown_names_are_rejected_with_the_name() {
        let err = "Ethernet".parse::<LinkKind>().unwrap_err();
        assert_eq!(err, UnknownLinkKind("Ethernet".into()));
        assert!(err.to_string().contains("\"Ethernet\""));
        assert!(serde_json::from_str::<LinkKind>("\"lte\"").is_err());
    }

    #[test]
    fn a_plain_nic_is_ethernet() {
        let facts = LinkFacts {
            driver: Some("e1000e".into()),
            ..ether()
        };
        assert_eq!(classify(&facts), LinkKind::Ethernet);
        assert_eq!(classify(&ether()), LinkKind::Ethernet);
    }

    #[test]
    fn loopback_wins_over_everything() {
        let facts = LinkFacts {
            arphrd: libc::ARPHRD_LOOPBACK,
            wireless: true,
            info_kind: Some("veth".into()),
            ..LinkFacts::default()
        };
        assert_eq!(classify(&facts), LinkKind::Loopback);
    }

    #[test]
    fn wireless_sysfs_entries_and_wlan_devtype_are_wifi() {
        let wireless = LinkFacts {
            wireless: true,
            ..ether()
        };
        let wlan = LinkFacts {
            devtype: Some("wlan".into()),
            ..ether()
        };
        assert_eq!(classify(&wireless), LinkKind::Wifi);
        assert_eq!(classify(&wlan), LinkKind::Wifi);
        assert_eq!(classify(&with_info_kind("virt_wifi")), LinkKind::Wifi);
        for arphrd in [
            libc::ARPHRD_IEEE80211,
            libc::ARPHRD_IEEE80211_PRISM,
            libc::ARPHRD_IEEE80211_RADIOTAP,
        ] {
            let monitor = LinkFacts {
                arphrd,
                ..LinkFacts::default()
            };
            assert_eq!(classify(&monitor), LinkKind::Wifi);
        }
    }

    #[test]
    fn modems_and_phone_tethers_are_wwan() {
        let usb_modem = LinkFacts {
            devtype: Some("wwan".into()),
            driver: Some("qmi_wwan".into()),
            ..ether()
        };
        assert_eq!(classify(&usb_modem), LinkKind::Wwan);
        for driver in ["ipheth", "rndis_host"] {
            let tether = LinkFacts {
                driver: Some(driver.into()),
                ..ether()
            };
            assert_eq!(classify(&tether), LinkKind::Wwan, "{driver}");
        }
        for kind in ["wwan", "rmnet", "ppp"] {
            assert_eq!(classify(&with_info_kind(kind)), LinkKind::Wwan, "{kind}");
        }
        for arphrd in [libc::ARPHRD_PPP, libc::ARPHRD_NONE, ARPHRD_RAWIP] {
            let raw = LinkFacts {
                arphrd,
                ..LinkFacts::default()
            };
            assert_eq!(classify(&raw), LinkKind::Wwan, "{arphrd}");
        }
    }

    #[test]
    fn tunnels_are_vpn() {
        for kind in TUNNEL_KINDS {
            assert_eq!(classify(&with_info_kind(kind)), LinkKind::Vpn, "{kind}");
        }
        // wireguard and tun have no link-layer header: the kind decides,
        // not ARPHRD_NONE.
        let wireguard = LinkFacts {
            info_kind: Some("wireguard".into()),
            arphrd: libc::ARPHRD_NONE,
            devtype: Some("wireguard".into()),
            ..LinkFacts::default()
        };
        assert_eq!(classify(&wireguard), LinkKind::Vpn);
    }

    #[test]
    fn software_devices_are_virtual() {
        for kind in [
            "veth",
            "bridge",
            "bond",
            "team",
            "vlan",
            "macvlan",
            "macvtap",
            "ipvlan",
            "dummy",
            "vrf",
            "netkit",
            "ifb",
            "something_new",
        ] {
            assert_eq!(classify(&with_info_kind(kind)), LinkKind::Virtual, "{kind}");
        }
        // A bridge announces DEVTYPE=bridge, which says nothing more.
        let bridge = LinkFacts {
            devtype: Some("bridge".into()),
            ..with_info_kind("bridge")
        };
        assert_eq!(classify(&bridge), LinkKind::Virtual);
    }

    #[test]
    fn unknown_hardware_is_other() {
        let infiniband = LinkFacts {
            arphrd: libc::ARPHRD_INFINIBAND,
            ..LinkFacts::default()
        };
        assert_eq!(classify(&infiniband), LinkKind::Other);
    }
}
