//! The local path's decisions: whether clients on this host connect
//! straight to the builder (the kernel rewrites their connect; see
//! `kernel::local`), the builder addresses the kernel rewrites to, and
//! what a failed local connect means for the builder's health.
//!
//! The selection itself is the kernel's, with the same code and maps as
//! the gateway path, so everything the plan decides holds for both.

use std::{collections::HashMap, net::IpAddr, path::PathBuf, time::Instant};

use tracing::{error, warn};
use yensid_ebpf::maps::LocalBuilder;

use crate::{
    config::{Config, LocalClients},
    decide::{health::Transition, registry::Registry},
    kernel::{bpf::Kernel, local::root_cgroup},
};

/// The local path as the daemon runs it.
#[derive(Debug, Default)]
pub struct LocalPath {
    /// The cgroup the programs are attached to.
    pub cgroup: Option<PathBuf>,
    /// Why local clients go through the proxy although a service asks
    /// for direct (the programs could not be loaded or attached).
    pub unavailable: Option<String>,
    /// The cgroup that attempt was for: a reload naming another one tries
    /// again.
    tried: Option<PathBuf>,
    /// Per builder, the kernel's count of failed local connects that the
    /// daemon has acted on (`LocalBuilder::failures_seen`).
    pub failures_seen: HashMap<String, u64>,
}

/// Which path the next local connection of a service takes, in words.
pub fn path_of(local: &LocalPath, wanted: LocalClients) -> String {
    match (wanted, &local.cgroup, &local.unavailable) {
        (LocalClients::Proxy, ..) => "proxy (local_clients = \"proxy\")".to_owned(),
        (LocalClients::Direct, Some(cgroup), _) => format!(
            "direct: a process in cgroup {} connects straight to the builder",
            cgroup.display()
        ),
        (LocalClients::Direct, None, Some(why)) => {
            format!("proxy: the local path is unavailable: {why}")
        }
        (LocalClients::Direct, None, None) => "proxy: BPF is unavailable".to_owned(),
    }
}

/// A builder's address as the connect programs write it; family 0 while
/// it is unknown (a host name not resolved by a probe yet).
pub fn local_builder(ip: Option<IpAddr>, address: &str, failures_seen: u64) -> LocalBuilder {
    let port = address
        .rsplit_once(':')
        .and_then(|(_, port)| port.parse::<u16>().ok());
    let (Some(ip), Some(port)) = (ip, port) else {
        return LocalBuilder {
            failures_seen,
            ..LocalBuilder::default()
        };
    };
    let words = |o: [u8; 16]| {
        [0, 4, 8, 12].map(|i| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]))
    };
    let (family, ip4, ip6) = match ip {
        IpAddr::V4(v4) => (
            4,
            u32::from_ne_bytes(v4.octets()),
            words(v4.to_ipv6_mapped().octets()),
        ),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => (4, u32::from_ne_bytes(v4.octets()), words(v6.octets())),
            None => (6, 0, words(v6.octets())),
        },
    };
    LocalBuilder {
        family,
        port: u32::from(port.to_be()),
        ip4,
        _reserved: 0,
        ip6,
        failures_seen,
    }
}

/// Attaches the local path when a service wants it (once; a failure is
/// logged once and kept for `status`), then tells the kernel each
/// builder's address and each service's path. `services` pairs each
/// service's kernel index with its configuration's position.
pub fn sync(
    kernel: &Kernel,
    registry: &Registry,
    config: &Config,
    services: &[(u32, LocalClients)],
) {
    let wanted = services.iter().any(|(_, c)| *c == LocalClients::Direct);
    let cgroup = match &config.daemon.local_cgroup {
        Some(c) => Ok(c.clone()),
        None => root_cgroup(),
    };
    let attach = {
        let inner = registry.inner();
        wanted
            && inner.local.cgroup.is_none()
            && (inner.local.tried.is_none() || inner.local.tried.as_ref() != cgroup.as_ref().ok())
    };
    if attach {
        let tried = cgroup.as_ref().ok().cloned();
        let attached = cgroup
            .map_err(|e| format!("cannot find the root cgroup (v2): {e}"))
            .and_then(|c| {
                kernel
                    .attach_local(&c)
                    .map(|()| c)
                    .map_err(|e| crate::error_chain(&e))
            });
        let mut inner = registry.inner();
        inner.local.tried = tried;
        match attached {
            Ok(c) => {
                inner.local.cgroup = Some(c);
                inner.local.unavailable = None;
            }
            Err(why) => {
                error!(error = %why, "LOCAL PATH UNAVAILABLE: local clients go through the proxy");
                inner.local.unavailable = Some(why);
            }
        }
    }
    let mut inner = registry.inner();
    let attached = inner.local.cgroup.is_some();
    let builders: Vec<(String, u32)> = inner
        .builder_index
        .iter()
        .map(|(n, &i)| (n.clone(), i))
        .collect();
    for (name, index) in builders {
        let Some(b) = config.builder(&name) else {
            continue;
        };
        let seen = match inner.local.failures_seen.get(&name) {
            Some(&seen) => seen,
            // A failure counted before this daemon knew the index is no
            // news about the builder now.
            None => kernel.local_stats(index).map_or(0, |s| s.failed),
        };
        inner.local.failures_seen.insert(name.clone(), seen);
        let value = local_builder(inner.addresses.get(&name).copied(), &b.address, seen);
        if let Err(e) = kernel.set_local_builder(index, value) {
            error!(builder = name, error = %e, "cannot give the kernel the builder's address for local clients");
        }
    }
    for &(index, clients) in services {
        let direct = attached && clients == LocalClients::Direct;
        if let Err(e) = kernel.set_local_service(index, direct) {
            error!(error = %e, "cannot set the path of a service's local clients");
        }
    }
}

/// Acts on local connects that failed (refused, timed out) since the last
/// look: the builder goes down like after a passive failure. The kernel
/// already keeps new connections away from it until this is done.
pub fn poll(registry: &Registry) {
    let Some(kernel) = registry.kernel() else {
        return;
    };
    let mut inner = registry.inner();
    if inner.local.cgroup.is_none() {
        return;
    }
    let builders: Vec<(String, u32)> = inner
        .builder_index
        .iter()
        .map(|(n, &i)| (n.clone(), i))
        .collect();
    for (name, index) in builders {
        let Ok(stats) = kernel.local_stats(index) else {
            continue;
        };
        let seen = inner
            .local
            .failures_seen
            .get(&name)
            .copied()
            .unwrap_or(stats.failed);
        if stats.failed == seen {
            continue;
        }
        let failed = stats.failed.wrapping_sub(seen);
        let transition = inner.health.get_mut(&name).and_then(|t| {
            t.on_passive_failure(
                Instant::now(),
                format!("local connect failed ({failed} since the last look)"),
            )
        });
        if let Some(Transition::Down(failure)) = transition {
            warn!(builder = name, reason = %failure, "builder unhealthy: no new connections");
        }
        // Out of the selection for good before the kernel's own stop-gap
        // (failed != seen) is lifted.
        let taken_out = kernel.make_ineligible(index).and_then(|()| {
            let mut value = kernel.local_builder(index)?;
            value.failures_seen = stats.failed;
            kernel.set_local_builder(index, value)
        });
        match taken_out {
            Ok(()) => {
                inner.local.failures_seen.insert(name, stats.failed);
            }
            Err(e) => {
                error!(builder = name, error = %e, "cannot take the builder out of the kernel's selection")
            }
        }
        registry.changed();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The connect programs write these words into the socket address as they
    /// are: network byte order, as `sin_addr`, `sin6_addr` and `sin_port` hold them.
    #[test]
    fn builder_addresses_are_in_the_socket_address_byte_order() {
        let v4 = local_builder(Some("198.18.1.2".parse().unwrap()), "b1.example:2222", 3);
        assert_eq!(v4.family, 4);
        assert_eq!(v4.ip4.to_ne_bytes(), [198, 18, 1, 2]);
        assert_eq!((v4.port as u16).to_ne_bytes(), 2222u16.to_be_bytes());
        assert_eq!(v4.ip6[2].to_ne_bytes(), [0, 0, 0xff, 0xff]);
        assert_eq!(v4.ip6[3].to_ne_bytes(), [198, 18, 1, 2]);
        assert_eq!(v4.failures_seen, 3);

        let v6 = local_builder(
            Some("2001:2:0:1::2".parse().unwrap()),
            "[2001:2:0:1::2]:22",
            0,
        );
        assert_eq!(v6.family, 6);
        assert_eq!(v6.ip6[0].to_ne_bytes(), [0x20, 0x01, 0, 2]);
        assert_eq!(v6.ip6[3].to_ne_bytes(), [0, 0, 0, 2]);

        let mapped = local_builder(Some("::ffff:198.18.1.2".parse().unwrap()), "x:22", 0);
        assert_eq!(
            mapped.family, 4,
            "an IPv4-mapped address is an IPv4 builder"
        );

        // `yensid maps` reads them back.
        use crate::kernel::local::target_address;
        assert_eq!(
            target_address(&v4),
            Some("198.18.1.2:2222".parse().unwrap())
        );
        assert_eq!(
            target_address(&v6),
            Some("[2001:2:0:1::2]:22".parse().unwrap())
        );
        assert_eq!(
            target_address(&mapped),
            Some("198.18.1.2:22".parse().unwrap())
        );
        assert_eq!(target_address(&local_builder(None, "x:22", 1)), None);
    }

    /// A host name not resolved yet (or an address without a port) gives family 0:
    /// the kernel leaves such connects to the gateway path. The failure count the
    /// daemon acted on is kept either way.
    #[test]
    fn an_unknown_address_leaves_connects_untouched() {
        let unresolved = local_builder(None, "builder.example:22", 7);
        assert_eq!(unresolved.family, 0);
        assert_eq!(unresolved.failures_seen, 7);
        assert_eq!(
            local_builder(Some("198.18.1.2".parse().unwrap()), "198.18.1.2", 0).family,
            0
        );
    }

    #[test]
    fn the_path_in_words_says_why_it_is_the_proxy() {
        let mut local = LocalPath::default();
        assert_eq!(
            path_of(&local, LocalClients::Direct),
            "proxy: BPF is unavailable"
        );
        local.unavailable = Some("no such cgroup".into());
        assert_eq!(
            path_of(&local, LocalClients::Direct),
            "proxy: the local path is unavailable: no such cgroup"
        );
        local.cgroup = Some("/sys/fs/cgroup".into());
        assert!(path_of(&local, LocalClients::Direct).starts_with("direct"));
        assert!(path_of(&local, LocalClients::Proxy).starts_with("proxy (local_clients"));
    }
}
