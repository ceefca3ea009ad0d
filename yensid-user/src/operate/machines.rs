//! What a Nix client needs to build through a service: `/etc/nix/machines` lines
//! (`yensid nix-machines`) on several alias addresses, and the names `yensid
//! known-hosts` trusts the builders under.
//!
//! Nix takes one upload lock per machine entry, so one service address would
//! serialize every upload to the whole pool. A service that claims a prefix
//! covering several addresses is reachable on each of them; listing the first
//! N as N machine entries lets N uploads run at once. The NixOS module
//! (`services.yensid.client`) computes the same addresses and `maxJobs`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use thiserror::Error;

use crate::config::{Config, Prefix, Service};

/// The most alias entries a client may ask for.
pub const MAX_ALIASES: u32 = 256;

#[derive(Debug, Error)]
pub enum MachinesError {
    #[error("unknown service `{name}` (configured: {known})")]
    UnknownService { name: String, known: String },
    #[error("the configuration has no service")]
    NoService,
    #[error("--aliases must be between 1 and {MAX_ALIASES}, not {0}")]
    Aliases(u32),
    #[error("{what} `{}` would break the machines line: it must be one non-empty word (and, in a list, without commas)", crate::dataplane::ident::escape(value.as_bytes()))]
    Field { what: &'static str, value: String },
}

/// How the client reaches the builders.
#[derive(Clone, Debug)]
pub struct ClientSide {
    /// Number of machine entries wanted (fewer if the prefix is smaller).
    pub aliases: u32,
    pub user: String,
    /// The private key Nix logs in with; `None`: ssh's default.
    pub key: Option<String>,
    pub systems: Vec<String>,
    pub features: Vec<String>,
    /// `ssh-ng` or `ssh`.
    pub protocol: String,
}

/// The service `name`, or the first one.
pub fn service<'c>(config: &'c Config, name: Option<&str>) -> Result<&'c Service, MachinesError> {
    match name {
        None => config.services.first().ok_or(MachinesError::NoService),
        Some(name) => config
            .services
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| MachinesError::UnknownService {
                name: name.to_owned(),
                known: config
                    .services
                    .iter()
                    .map(|s| s.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
    }
}

/// The first `count` addresses of the service's first prefix (all of them if
/// the prefix is smaller): the alias addresses clients list.
pub fn alias_addresses(service: &Service, count: u32) -> Vec<IpAddr> {
    service
        .listen
        .first()
        .map(|prefix| first_addresses(prefix, count))
        .unwrap_or_default()
}

fn first_addresses(prefix: &Prefix, count: u32) -> Vec<IpAddr> {
    let host_bits = u32::from(match prefix.addr {
        IpAddr::V4(_) => 32 - prefix.len.min(32),
        IpAddr::V6(_) => 128 - prefix.len.min(128),
    });
    // 2^host_bits addresses; more than `count` as soon as host_bits reaches 32.
    let size = if host_bits >= 32 {
        u64::from(count)
    } else {
        (1u64 << host_bits).min(u64::from(count))
    };
    (0..size)
        .map(|i| match prefix.addr {
            IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(
                u32::from(a).wrapping_add(u32::try_from(i).unwrap_or(u32::MAX)),
            )),
            IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a).wrapping_add(u128::from(i)))),
        })
        .collect()
}

/// How many builds the service's pool runs at once: each builder's
/// `max_connections`, or its weight for a builder without a limit.
pub fn capacity(config: &Config, service: &Service) -> u32 {
    service
        .builders
        .iter()
        .filter_map(|name| config.builder(name))
        .map(|b| b.max_connections.unwrap_or(b.weight))
        .fold(0u32, u32::saturating_add)
        .max(1)
}

/// The host part of a URI or ssh host name.
fn host(address: IpAddr) -> String {
    match address {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => format!("[{a}]"),
    }
}

/// One machines line per alias address, each with its share of the pool's
/// capacity as `maxJobs`.
pub fn nix_machines(
    config: &Config,
    service_name: Option<&str>,
    client: &ClientSide,
) -> Result<String, MachinesError> {
    if !(1..=MAX_ALIASES).contains(&client.aliases) {
        return Err(MachinesError::Aliases(client.aliases));
    }
    check_fields(client)?;
    let service = service(config, service_name)?;
    let addresses = alias_addresses(service, client.aliases);
    let entries = u32::try_from(addresses.len()).unwrap_or(u32::MAX).max(1);
    let max_jobs = capacity(config, service).div_ceil(entries);
    let port = match service.port {
        22 => String::new(),
        port => format!(":{port}"),
    };
    let list = |items: &[String]| {
        if items.is_empty() {
            "-".to_owned()
        } else {
            items.join(",")
        }
    };
    let mut out = String::new();
    for address in addresses {
        out.push_str(&format!(
            "{}://{}@{}{port} {} {} {max_jobs} 1 {} - -\n",
            client.protocol,
            client.user,
            host(address),
            list(&client.systems),
            client.key.as_deref().unwrap_or("-"),
            list(&client.features),
        ));
    }
    Ok(out)
}

/// Every field is one word of the line; lists are comma-separated.
fn check_fields(client: &ClientSide) -> Result<(), MachinesError> {
    let words = [("--user", &client.user, false)]
        .into_iter()
        .chain(client.key.iter().map(|k| ("--key", k, false)))
        .chain(client.systems.iter().map(|s| ("--systems", s, true)))
        .chain(client.features.iter().map(|f| ("--features", f, true)));
    for (what, value, in_list) in words {
        if value.is_empty() || value.contains(|c: char| c.is_whitespace() || (in_list && c == ','))
        {
            return Err(MachinesError::Field {
                what,
                value: value.clone(),
            });
        }
    }
    Ok(())
}

/// The names a client connects to for `service`: each alias address, as
/// `[addr]:port` for a port other than 22 (known_hosts syntax).
pub fn known_host_names(service: &Service, aliases: u32) -> Vec<String> {
    alias_addresses(service, aliases)
        .into_iter()
        .map(|address| match service.port {
            22 => address.to_string(),
            port => format!("[{address}]:{port}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        Config::parse(text).expect("valid test configuration")
    }

    fn client(aliases: u32) -> ClientSide {
        ClientSide {
            aliases,
            user: "nix-builder".to_owned(),
            key: None,
            systems: vec!["x86_64-linux".to_owned()],
            features: vec![],
            protocol: "ssh-ng".to_owned(),
        }
    }

    const POOL: &str = r#"
[[service]]
name = "x86"
listen = ["127.0.0.20/30"]

[builders.b1]
address = "198.18.1.2:22"
max_connections = 4

[builders.b2]
address = "198.18.2.2:22"
weight = 3
"#;

    #[test]
    fn four_aliases_share_the_pools_capacity() {
        let lines = nix_machines(&config(POOL), None, &client(4)).unwrap();
        // Capacity 4 + 3 (b2's weight, no limit) = 7, over 4 entries: 2 each.
        assert_eq!(
            lines,
            "ssh-ng://nix-builder@127.0.0.20 x86_64-linux - 2 1 - - -\n\
             ssh-ng://nix-builder@127.0.0.21 x86_64-linux - 2 1 - - -\n\
             ssh-ng://nix-builder@127.0.0.22 x86_64-linux - 2 1 - - -\n\
             ssh-ng://nix-builder@127.0.0.23 x86_64-linux - 2 1 - - -\n"
        );
    }

    #[test]
    fn a_host_prefix_gives_one_entry_with_the_whole_capacity() {
        let text = POOL.replace("127.0.0.20/30", "127.0.0.22/32");
        let lines = nix_machines(&config(&text), Some("x86"), &client(4)).unwrap();
        assert_eq!(
            lines,
            "ssh-ng://nix-builder@127.0.0.22 x86_64-linux - 7 1 - - -\n"
        );
    }

    #[test]
    fn ipv6_and_other_ports_are_bracketed() {
        let text = POOL.replace("[\"127.0.0.20/30\"]", "[\"fd00::10/126\"]\nport = 2222");
        let config = config(&text);
        let lines = nix_machines(&config, None, &client(2)).unwrap();
        assert!(
            lines.starts_with("ssh-ng://nix-builder@[fd00::10]:2222 "),
            "{lines}"
        );
        assert_eq!(
            known_host_names(&config.services[0], 2),
            ["[fd00::10]:2222", "[fd00::11]:2222"]
        );
    }

    #[test]
    fn unknown_service_and_bad_alias_counts_are_errors() {
        let config = config(POOL);
        let err = nix_machines(&config, Some("arm"), &client(4)).unwrap_err();
        assert_eq!(err.to_string(), "unknown service `arm` (configured: x86)");
        let err = nix_machines(&config, None, &client(0)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--aliases must be between 1 and 256, not 0"
        );
        let mut spaced = client(4);
        spaced.key = Some("/root/my key".to_owned());
        let err = nix_machines(&config, None, &spaced).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("--key `/root/my key` would break"),
            "{err}"
        );
    }
}
