//! What only the host can tell about a valid configuration: whether its
//! groups exist, and whether a claim would take the address another local
//! program listens on. `yensid check-config` runs these checks where it
//! runs; `yensid run` runs them at start and at every reload, in the
//! network namespace it serves.
//!
//! A listener on a specific address inside a claimed prefix, on the
//! service's port, would lose its connections to yensid. A wildcard
//! listener (`0.0.0.0:22`, `[::]:22`, like the host's sshd) does not:
//! claiming is per address, so it keeps every address yensid does not
//! claim. `allow_host_addresses = true` in a service allows both this and
//! the loopback claims [`crate::config`] refuses.

use std::{
    io,
    net::{IpAddr, Ipv6Addr, SocketAddr},
};

use crate::{
    config::{Config, Prefix, Problem},
    operate::access::Group,
};

/// One listening TCP socket of this network namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Listener {
    pub addr: SocketAddr,
    /// The socket's inode, to tell this process's own sockets apart.
    pub inode: u64,
}

/// Every problem the host finds with `config`: unknown groups, and claims
/// of addresses other local programs listen on (this process's own
/// listeners left out). An unreadable `/proc/net/tcp` is itself reported:
/// the check must not pass silently.
pub fn check(config: &Config) -> Vec<Problem> {
    let mut problems = Vec::new();
    let groups = [
        ("daemon.read_group", config.daemon.read_group.as_deref()),
        (
            "policy.control_group",
            config.policy.control_group.as_deref(),
        ),
    ];
    for (key, name) in groups {
        if let Some(Err(e)) = name.map(|name| Group::resolve(key, name)) {
            problems.push(Problem {
                key: key.to_owned(),
                line: None,
                message: format!("no group `{}` on this machine", e.name),
            });
        }
    }
    match local_listeners() {
        Ok(listeners) => {
            let own = own_socket_inodes();
            let others: Vec<Listener> = listeners
                .into_iter()
                .filter(|l| !own.contains(&l.inode))
                .collect();
            problems.extend(listener_conflicts(config, &others, socket_owner));
        }
        Err(e) => problems.push(Problem {
            key: "service.listen".to_owned(),
            line: None,
            message: format!("cannot read this host's listeners (/proc/net/tcp): {e}"),
        }),
    }
    problems
}

/// The claims of `config` that contain the specific address one of
/// `listeners` is bound to, on its port; wildcard listeners never
/// conflict. `owner` names the program holding a socket (by inode), when
/// it can tell.
pub fn listener_conflicts(
    config: &Config,
    listeners: &[Listener],
    owner: impl Fn(u64) -> Option<String>,
) -> Vec<Problem> {
    let mut problems = Vec::new();
    for (i, service) in config.services.iter().enumerate() {
        if service.allow_host_addresses {
            continue;
        }
        for listener in listeners {
            let addr = listener.addr;
            if addr.port() != service.port || addr.ip().is_unspecified() {
                continue;
            }
            let host = Prefix {
                addr: addr.ip(),
                len: if addr.is_ipv4() { 32 } else { 128 },
            };
            if let Some(prefix) = service.listen.iter().find(|p| p.overlaps(&host)) {
                let who = owner(listener.inode).unwrap_or_else(|| "another program".to_owned());
                problems.push(Problem {
                    key: format!("service[{i}].listen"),
                    line: None,
                    message: format!(
                        "{prefix} port {} contains {addr}, where {who} listens: claiming it \
                         would take that listener's connections; set allow_host_addresses = \
                         true in this service if that is intended",
                        service.port
                    ),
                });
            }
        }
    }
    problems
}

/// The program holding the socket with this inode, as `sshd (pid 812)`:
/// found by looking through every process's descriptors, which only a
/// conflict costs, and only those the caller may see.
fn socket_owner(inode: u64) -> Option<String> {
    let wanted = format!("socket:[{inode}]");
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|process| {
            let pid: u32 = process.file_name().to_str()?.parse().ok()?;
            let holds = std::fs::read_dir(process.path().join("fd"))
                .ok()?
                .flatten()
                .any(|fd| {
                    std::fs::read_link(fd.path()).is_ok_and(|t| t.as_os_str() == wanted.as_str())
                });
            if !holds {
                return None;
            }
            let comm = std::fs::read(process.path().join("comm")).unwrap_or_default();
            Some(format!(
                "{} (pid {pid})",
                crate::dataplane::ident::escape(comm.trim_ascii())
            ))
        })
}

/// The listening TCP sockets of this network namespace.
pub fn local_listeners() -> io::Result<Vec<Listener>> {
    let mut listeners = parse_proc_net_tcp(&std::fs::read_to_string("/proc/net/tcp")?);
    // Without IPv6 there is no tcp6 table, and no IPv6 listener.
    match std::fs::read_to_string("/proc/net/tcp6") {
        Ok(text) => listeners.extend(parse_proc_net_tcp(&text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    Ok(listeners)
}

/// The listeners in a `/proc/net/tcp` or `/proc/net/tcp6` table; lines
/// that do not parse are skipped (the kernel's format, not a person's).
pub fn parse_proc_net_tcp(text: &str) -> Vec<Listener> {
    const LISTEN: &str = "0A";
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (local, state, inode) = (fields.get(1)?, fields.get(3)?, fields.get(9)?);
            if *state != LISTEN {
                return None;
            }
            Some(Listener {
                addr: parse_address(local)?,
                inode: inode.parse().ok()?,
            })
        })
        .collect()
}

/// `0100007F:0016` or 32 hex digits and a port: the kernel prints each
/// 32-bit word of the address as a native-endian number.
fn parse_address(text: &str) -> Option<SocketAddr> {
    let (addr, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |hex: &str| u32::from_str_radix(hex, 16).ok().map(u32::to_ne_bytes);
    let ip: IpAddr = match addr.len() {
        8 => IpAddr::from(word(addr)?),
        32 => {
            let mut octets = [0u8; 16];
            for (i, chunk) in octets.chunks_exact_mut(4).enumerate() {
                chunk.copy_from_slice(&word(addr.get(i * 8..i * 8 + 8)?)?);
            }
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// The inodes of this process's sockets (`socket:[N]` in `/proc/self/fd`).
fn own_socket_inodes() -> Vec<u64> {
    let Ok(fds) = std::fs::read_dir("/proc/self/fd") else {
        return Vec::new();
    };
    fds.flatten()
        .filter_map(|fd| {
            let target = std::fs::read_link(fd.path()).ok()?;
            let target = target.to_str()?;
            target
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1001 1 0000000000000000 100 0 0 10 0
   1: 1600007F:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1002 1 0000000000000000 100 0 0 10 0
   2: 1600007F:0016 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 1003 1 0000000000000000 20 4 30 10 -1
   3: garbage
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:0016 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2001 1 0000000000000000 100 0 0 10 0
   1: 0000000000000000FFFF00001600007F:0016 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2002 1 0000000000000000 100 0 0 10 0
";

    #[test]
    fn listeners_are_read_from_the_kernels_tables() {
        let v4 = parse_proc_net_tcp(TCP);
        let addrs: Vec<String> = v4.iter().map(|l| l.addr.to_string()).collect();
        assert_eq!(addrs, ["0.0.0.0:22", "127.0.0.22:22"]);
        assert_eq!(v4[1].inode, 1002);
        let v6 = parse_proc_net_tcp(TCP6);
        let addrs: Vec<String> = v6.iter().map(|l| l.addr.to_string()).collect();
        if cfg!(target_endian = "little") {
            assert_eq!(addrs, ["[::1]:22", "[::ffff:127.0.0.22]:22"]);
        }
    }

    #[test]
    fn this_process_finds_its_own_listener() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let found: Vec<Listener> = local_listeners()
            .unwrap()
            .into_iter()
            .filter(|l| l.addr == addr)
            .collect();
        assert_eq!(found.len(), 1, "{addr} not in /proc/net/tcp");
        assert!(own_socket_inodes().contains(&found[0].inode));
    }

    fn config(listen: &str, extra: &str) -> Config {
        Config::parse(&format!(
            "[[service]]\nname = \"x86\"\nlisten = [\"{listen}\"]\n{extra}\n[builders.b1]\naddress = \"198.18.1.2:22\"\n"
        ))
        .unwrap()
    }

    #[test]
    fn specific_listeners_inside_a_claim_conflict_and_wildcards_do_not() {
        let at = |s: &str| Listener {
            addr: s.parse().unwrap(),
            inode: 7,
        };
        let c = config("127.0.0.16/28", "");
        let listeners = [
            at("0.0.0.0:22"),
            at("[::]:22"),
            at("127.0.0.22:2222"),
            at("127.0.0.33:22"),
            at("127.0.0.22:22"),
            at("[::ffff:127.0.0.23]:22"),
        ];
        let p = listener_conflicts(&c, &listeners, |_| None);
        let p: Vec<String> = p.iter().map(ToString::to_string).collect();
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(
            p[0].starts_with(
                "service[0].listen: 127.0.0.16/28 port 22 contains 127.0.0.22:22, where another program listens"
            ),
            "{p:?}"
        );
        assert!(p[1].contains("contains [::ffff:127.0.0.23]:22"), "{p:?}");
        let named = listener_conflicts(&c, &listeners[4..5], |inode| {
            Some(format!("sshd (pid {inode})"))
        });
        assert!(
            named[0]
                .message
                .contains("127.0.0.22:22, where sshd (pid 7) listens"),
            "{named:?}"
        );
        let allowed = config("127.0.0.16/28", "allow_host_addresses = true");
        assert!(listener_conflicts(&allowed, &listeners, |_| None).is_empty());
    }

    #[test]
    fn the_owner_of_a_socket_is_found() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let inode = local_listeners()
            .unwrap()
            .into_iter()
            .find(|l| l.addr == addr)
            .unwrap()
            .inode;
        let owner = socket_owner(inode).unwrap();
        assert!(
            owner.ends_with(&format!("(pid {})", std::process::id())),
            "{owner}"
        );
    }

    #[test]
    fn unknown_groups_are_named_with_their_key() {
        let mut c = config("127.0.0.22", "");
        c.daemon.read_group = Some("yensid-no-such-group".to_owned());
        c.policy.control_group = Some("root".to_owned());
        let p: Vec<String> = check(&c).iter().map(ToString::to_string).collect();
        assert!(
            p.contains(
                &"daemon.read_group: no group `yensid-no-such-group` on this machine".to_owned()
            ),
            "{p:?}"
        );
        assert!(!p.iter().any(|p| p.contains("control_group")), "{p:?}");
    }
}
