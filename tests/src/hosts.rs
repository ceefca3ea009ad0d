//! Builders given to the daemon by host name (`address = "b1.yensid.test:2222"`): the
//! names resolve for the daemon only, through a hosts file that
//! [`crate::Daemon::start_with_host_names`] bind-mounts on /etc/hosts in a private mount
//! namespace of the daemon. The host's /etc/hosts is never touched.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use anyhow::{Context, Result, ensure};

/// Under the `.test` top-level domain (RFC 6761), which never resolves elsewhere.
pub const HOST_DOMAIN: &str = "yensid.test";

/// Which builders the config names by host, and where those names point.
#[derive(Clone, Debug, Default)]
pub struct HostNames {
    /// (builder, host name, address).
    entries: Vec<(String, String, IpAddr)>,
}

impl HostNames {
    pub fn new() -> Self {
        Self::default()
    }

    /// Builder `builder` appears in the config as `<builder>.yensid.test:<its port>`, and
    /// that name resolves to `ip` for the daemon. Returns the host name.
    pub fn name(&mut self, builder: &str, ip: IpAddr) -> String {
        let host = format!("{builder}.{HOST_DOMAIN}");
        self.entries.push((builder.to_owned(), host.clone(), ip));
        host
    }

    /// The daemon's /etc/hosts: localhost and the names.
    pub(crate) fn hosts_file(&self) -> String {
        let mut text = String::from("127.0.0.1 localhost\n::1 localhost\n");
        for (_, host, ip) in &self.entries {
            let _ = writeln!(text, "{ip} {host}");
        }
        text
    }

    /// `rendered` (a config file) with each named builder's `address = "ip:port"`
    /// replaced by `address = "host:port"`.
    pub(crate) fn rewrite(&self, rendered: &str) -> Result<String> {
        let mut out = String::with_capacity(rendered.len());
        let mut section = "";
        let mut rewritten = 0;
        for line in rendered.lines() {
            if line.starts_with('[') {
                section = line.trim();
            }
            let named = self
                .entries
                .iter()
                .find(|(builder, _, _)| section == format!("[builders.{builder}]"));
            match (named, line.strip_prefix("address = ")) {
                (Some((builder, host, _)), Some(value)) => {
                    let address: SocketAddr = value
                        .trim_matches('"')
                        .parse()
                        .with_context(|| format!("builder {builder}: address {value}"))?;
                    let _ = writeln!(out, "address = \"{host}:{}\"", address.port());
                    rewritten += 1;
                }
                _ => {
                    let _ = writeln!(out, "{line}");
                }
            }
        }
        ensure!(
            rewritten == self.entries.len(),
            "named {} builders, the config has {rewritten} of them:\n{rendered}",
            self.entries.len()
        );
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_builders_get_host_and_port() {
        let mut names = HostNames::new();
        let host = names.name("b1", "198.18.1.2".parse().unwrap());
        assert_eq!(host, "b1.yensid.test");
        let config = "[daemon]\n\n[builders.b1]\naddress = \"198.18.1.2:2222\"\n\n[builders.b2]\naddress = \"[2001:2:0:2::2]:2222\"\n";
        let rewritten = names.rewrite(config).unwrap();
        assert!(rewritten.contains("[builders.b1]\naddress = \"b1.yensid.test:2222\"\n"));
        assert!(rewritten.contains("address = \"[2001:2:0:2::2]:2222\""));
        assert!(names.hosts_file().ends_with("198.18.1.2 b1.yensid.test\n"));
        names.name("b3", "198.18.3.2".parse().unwrap());
        assert!(names.rewrite(config).is_err(), "b3 is not in the config");
    }
}
