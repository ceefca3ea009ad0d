//! HAProxy 2.6 as the anchor intends it (shared/notes/anchor-yensid.md), so
//! the comparison is with what the anchor's proxy would be once its bugs
//! were fixed: `mode tcp`, a frontend on the service address, a backend that
//! holds the builders and balances by least connections, an SSH banner
//! health check in that same backend, and kernel splicing. It runs in the
//! client namespace, where yensid runs.
//!
//! "Build locally" is what the anchor's users do: a Lua fetch that names no
//! backend, so HAProxy accepts the connection and closes it. That frontend
//! listens on its own port beside the service.

use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use yensid_tests::Topology;
use yensid_tests::wait::{wait_child, wait_until};

use super::contender::{Middlebox, QUOTED_LOG_PROBLEMS, Upstream};

pub const HAPROXY: &str = "/usr/sbin/haproxy";
/// Connections beyond the sessions it must hold: health checks, the stats
/// socket, the refusal frontend's.
const SPARE_CONNECTIONS: usize = 100;
/// Pipes for splicing. HAProxy takes one per direction while data is in
/// flight and gives it back when it is empty, so this only bounds how many
/// transfers splice at once; the default (maxconn / 4) would cost two
/// descriptors each, which a 20,000-descriptor limit cannot spare next to
/// two per connection.
const MAXPIPES: usize = 256;
const READY_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
const BACKEND: &str = "builders";
const LUA_FETCH: &str = "build_locally";

/// Where it listens and what it forwards to.
pub struct HaproxySpec<'a> {
    pub service: SocketAddr,
    /// The "build locally" frontend.
    pub refusal: SocketAddr,
    pub servers: &'a [Upstream],
    /// The most connections it must hold at once.
    pub sessions: usize,
}

/// A running `haproxy -db`; killed on drop.
pub struct Haproxy {
    child: Child,
    exit: Option<ExitStatus>,
    /// Processes a reload replaced: each finishes its own connections, then
    /// exits by itself; killed on drop if it has not.
    replaced: Vec<Child>,
    config: PathBuf,
    stats_socket: PathBuf,
    log: PathBuf,
    refusal: SocketAddr,
}

impl Haproxy {
    /// Starts it in `topology`'s client namespace, its files in the
    /// topology's temp dir, and waits until every server passed the SSH
    /// banner check.
    pub fn start(topology: &Topology, spec: &HaproxySpec) -> Result<Self> {
        let stats_socket = topology.new_file("haproxy-stats");
        let lua = topology.new_file("haproxy-local.lua");
        fs::write(&lua, LUA)?;
        let config = topology.new_file("haproxy.cfg");
        fs::write(&config, render(spec, &stats_socket, &lua))?;
        let log = topology.new_file("haproxy.log");
        let check = Command::new(HAPROXY)
            .args(["-c", "-q", "-f"])
            .arg(&config)
            .output()
            .with_context(|| format!("run {HAPROXY} -c"))?;
        ensure!(
            check.status.success(),
            "haproxy rejects its config: {}",
            String::from_utf8_lossy(&check.stderr).trim()
        );
        let output = File::create(&log)?;
        // `ip netns exec` execs haproxy, so the child's pid is haproxy's own;
        // -db keeps it in the foreground as one process (its threads are
        // the default, one per CPU).
        let child = topology
            .client_ns()
            .command(HAPROXY)
            .arg("-db")
            .arg("-f")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(output.try_clone()?)
            .stderr(output)
            .spawn()
            .context("spawn haproxy")?;
        let mut haproxy = Self {
            child,
            exit: None,
            replaced: Vec::new(),
            config,
            stats_socket,
            log,
            refusal: spec.refusal,
        };
        haproxy.wait_ready(spec.servers.len())?;
        Ok(haproxy)
    }

    /// Waits until every server is UP by a passed banner check (L7OK), so
    /// the check really reads the SSH identification line.
    fn wait_ready(&mut self, servers: usize) -> Result<()> {
        let mut last = Vec::new();
        wait_until("HAProxy's servers UP (L7OK)", READY_TIMEOUT, || {
            if let Some(status) = self.child.try_wait()? {
                self.exit = Some(status);
                bail!("haproxy exited ({status}): {}", self.log_text().trim());
            }
            // The socket appears once the config is loaded.
            let Ok(stat) = self.query("show stat") else {
                return Ok(false);
            };
            last = servers_state(&stat)?;
            Ok(last.len() == servers
                && last
                    .iter()
                    .all(|s| s.status == "UP" && s.check_status == "L7OK"))
        })
        .with_context(|| format!("servers: {last:?}"))
    }

    /// HAProxy's reload: a new process with the same configuration takes
    /// the listening sockets from this one over the stats socket (`-x`,
    /// which `expose-fd listeners` allows) and, once it listens, tells this
    /// one to stop accepting and finish its connections (`-sf`). Returns
    /// once the new process answers on the stats socket.
    pub fn reload(&mut self, topology: &Topology) -> Result<()> {
        let old = self.child.id();
        let output = fs::OpenOptions::new().append(true).open(&self.log)?;
        let child = topology
            .client_ns()
            .command(HAPROXY)
            .arg("-db")
            .arg("-f")
            .arg(&self.config)
            .arg("-x")
            .arg(&self.stats_socket)
            .arg("-sf")
            .arg(old.to_string())
            .stdin(Stdio::null())
            .stdout(output.try_clone()?)
            .stderr(output)
            .spawn()
            .context("spawn the reloading haproxy")?;
        let new = child.id();
        self.replaced
            .push(std::mem::replace(&mut self.child, child));
        wait_until(
            "the reloaded HAProxy on its stats socket",
            READY_TIMEOUT,
            || {
                if let Some(status) = self.child.try_wait()? {
                    self.exit = Some(status);
                    bail!(
                        "the reloading haproxy exited ({status}): {}",
                        self.log_text().trim()
                    );
                }
                // The new process binds the stats socket anew once it runs.
                Ok(self
                    .query("show info")
                    .is_ok_and(|info| info_pid(&info) == Some(new)))
            },
        )
    }

    /// Whether the process a reload replaced has exited.
    pub fn replaced_exited(&mut self) -> Result<bool> {
        for child in &mut self.replaced {
            if child.try_wait()?.is_none() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// One command on the stats socket; its answer.
    fn query(&self, command: &str) -> Result<String> {
        let mut socket = UnixStream::connect(&self.stats_socket)?;
        socket.write_all(format!("{command}\n").as_bytes())?;
        let mut answer = String::new();
        socket.read_to_string(&mut answer)?;
        Ok(answer)
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn stop(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.exit {
            bail!("haproxy already exited ({status})");
        }
        let pid = libc::pid_t::try_from(self.child.id())?;
        // SIGTERM: HAProxy's immediate stop. SAFETY: kill(2) on our own,
        // unreaped child.
        if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
            return Err(std::io::Error::last_os_error()).context("kill haproxy");
        }
        let status = match wait_child(&mut self.child, STOP_TIMEOUT)? {
            Some(status) => status,
            None => {
                self.child.kill()?;
                self.child.wait()?;
                bail!("haproxy did not exit within {STOP_TIMEOUT:?} of SIGTERM");
            }
        };
        self.exit = Some(status);
        Ok(status)
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        for child in &mut self.replaced {
            let _ = child.kill();
            let _ = child.wait();
        }
        if self.exit.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Middlebox for Haproxy {
    fn pid(&self) -> Option<u32> {
        Some(self.child.id())
    }

    fn refuse(&mut self) -> Result<SocketAddr> {
        Ok(self.refusal)
    }

    fn finish(mut self: Box<Self>) -> Result<Vec<String>> {
        let mut notes = Vec::new();
        match self.query("show stat") {
            Ok(stat) => {
                for server in servers_state(&stat)? {
                    notes.push(format!(
                        "server {}: {} ({}), {} sessions in all",
                        server.name, server.status, server.check_status, server.sessions
                    ));
                }
            }
            Err(e) => notes.push(format!("no stats at the end: {e:#}")),
        }
        // SIGTERM's exit status is HAProxy's own business (it reports 0 or
        // 143 depending on the version); that it exits is what matters.
        self.stop()?;
        notes.extend(
            self.log_text()
                .lines()
                .filter(|l| l.contains("[WARNING]") || l.contains("[ALERT]"))
                .take(QUOTED_LOG_PROBLEMS)
                .map(|l| format!("haproxy log: {}", l.trim())),
        );
        Ok(notes)
    }
}

/// The anchor's "build locally" strategy: a fetch that returns nothing.
const LUA: &str = "-- A strategy that picks no backend: HAProxy accepts, then closes.\n\
                   core.register_fetches(\"build_locally\", function(txn) return nil end)\n";

/// The configuration file.
fn render(spec: &HaproxySpec, stats_socket: &Path, lua: &Path) -> String {
    let mut cfg = String::new();
    let c = &mut cfg;
    let _ = writeln!(
        c,
        "# Written by `cargo xtask bench` (xtask/src/bench/haproxy.rs)."
    );
    let maxconn = spec.sessions + SPARE_CONNECTIONS;
    let _ = writeln!(c, "global");
    let _ = writeln!(c, "    maxconn {maxconn}");
    let _ = writeln!(c, "    maxpipes {MAXPIPES}");
    let _ = writeln!(
        c,
        "    stats socket {} mode 600 level admin expose-fd listeners",
        stats_socket.display()
    );
    let _ = writeln!(c, "    lua-load {}", lua.display());
    let _ = writeln!(c, "\ndefaults");
    let _ = writeln!(c, "    mode tcp");
    let _ = writeln!(c, "    maxconn {maxconn}");
    // The anchor's timeouts: SSH sessions of a long build stay open.
    let _ = writeln!(c, "    timeout connect 10s");
    let _ = writeln!(c, "    timeout client 36h");
    let _ = writeln!(c, "    timeout server 36h");
    // Always splice, both ways (splice-auto guesses per connection).
    let _ = writeln!(c, "    option splice-request");
    let _ = writeln!(c, "    option splice-response");
    let _ = writeln!(c, "\nfrontend ssh");
    let _ = writeln!(c, "    bind {}", spec.service);
    let _ = writeln!(c, "    default_backend {BACKEND}");
    let _ = writeln!(c, "\nfrontend build-locally");
    let _ = writeln!(c, "    bind {}", spec.refusal);
    let _ = writeln!(c, "    use_backend %[lua.{LUA_FETCH}]");
    // The balance and the check sit in the backend that holds the servers;
    // the anchor's put them where no server is, so neither applied.
    let _ = writeln!(c, "\nbackend {BACKEND}");
    let _ = writeln!(c, "    balance leastconn");
    let _ = writeln!(c, "    option tcp-check");
    let _ = writeln!(c, "    tcp-check expect rstring ^SSH-");
    for server in spec.servers {
        let _ = writeln!(c, "    server {} {} check", server.builder, server.address);
    }
    cfg
}

/// The `Pid:` of `show info`.
fn info_pid(info: &str) -> Option<u32> {
    info.lines()
        .find_map(|l| l.strip_prefix("Pid:"))
        .and_then(|pid| pid.trim().parse().ok())
}

/// One server's line of `show stat`.
#[derive(Debug, PartialEq, Eq)]
struct ServerState {
    name: String,
    status: String,
    check_status: String,
    /// Sessions it has had (`stot`).
    sessions: String,
}

/// The servers of [`BACKEND`] in `show stat`'s CSV.
fn servers_state(csv: &str) -> Result<Vec<ServerState>> {
    let mut lines = csv.lines();
    let header = lines
        .next()
        .and_then(|l| l.strip_prefix("# "))
        .context("`show stat` without its header line")?;
    let columns: Vec<&str> = header.split(',').collect();
    let column = |name: &str| {
        columns
            .iter()
            .position(|c| *c == name)
            .with_context(|| format!("no column {name} in `show stat`"))
    };
    let (proxy, server, status, check, sessions) = (
        column("pxname")?,
        column("svname")?,
        column("status")?,
        column("check_status")?,
        column("stot")?,
    );
    Ok(lines
        .map(|l| l.split(',').collect::<Vec<_>>())
        .filter(|f| f.len() == columns.len() && f[proxy] == BACKEND)
        .filter(|f| f[server] != "BACKEND")
        .map(|f| ServerState {
            name: f[server].to_owned(),
            status: f[status].to_owned(),
            check_status: f[check].to_owned(),
            sessions: f[sessions].to_owned(),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(builder: &str, address: &str) -> Upstream {
        Upstream {
            builder: builder.to_owned(),
            address: address.parse().expect("an address"),
        }
    }

    #[test]
    fn config_balances_and_checks_in_the_backend_with_the_servers() {
        let servers = [
            upstream("b1", "198.18.1.2:2222"),
            upstream("b2", "198.18.2.2:2222"),
        ];
        let spec = HaproxySpec {
            service: "127.0.0.22:22".parse().expect("an address"),
            refusal: "127.0.0.22:2200".parse().expect("an address"),
            servers: &servers,
            sessions: 1000,
        };
        let cfg = render(&spec, Path::new("/tmp/s"), Path::new("/tmp/l.lua"));
        let backend = cfg.split("\nbackend builders\n").nth(1).expect("a backend");
        for line in [
            "balance leastconn",
            "option tcp-check",
            "tcp-check expect rstring ^SSH-",
            "server b1 198.18.1.2:2222 check",
            "server b2 198.18.2.2:2222 check",
        ] {
            assert!(
                backend.contains(line),
                "{line:?} not in the backend:\n{cfg}"
            );
        }
        assert!(cfg.contains("frontend ssh\n    bind 127.0.0.22:22\n    default_backend builders"));
        assert!(cfg.contains("bind 127.0.0.22:2200\n    use_backend %[lua.build_locally]"));
        assert!(cfg.contains("mode tcp") && cfg.contains("option splice-response"));
        assert!(cfg.contains("global\n    maxconn 1100\n"));
        assert!(LUA.contains("\"build_locally\""));
        assert!(cfg.contains("level admin expose-fd listeners\n"));
    }

    #[test]
    fn stats_name_each_server_of_the_backend() {
        let csv = "# pxname,svname,qcur,stot,status,check_status,\n\
                   ssh,FRONTEND,,12,OPEN,,\n\
                   builders,b1,0,7,UP,L7OK,\n\
                   builders,b2,0,5,DOWN,L7RSP,\n\
                   builders,BACKEND,0,12,UP,,\n";
        let servers = servers_state(csv).expect("valid");
        assert_eq!(
            servers,
            vec![
                ServerState {
                    name: "b1".into(),
                    status: "UP".into(),
                    check_status: "L7OK".into(),
                    sessions: "7".into(),
                },
                ServerState {
                    name: "b2".into(),
                    status: "DOWN".into(),
                    check_status: "L7RSP".into(),
                    sessions: "5".into(),
                },
            ]
        );
        assert!(servers_state("no header").is_err());
    }

    #[test]
    fn show_info_names_the_process() {
        let info = "Name: HAProxy\nVersion: 2.6.12\nPid: 4321\nUptime: 0d 0h00m01s\n";
        assert_eq!(info_pid(info), Some(4321));
        assert_eq!(info_pid("Name: HAProxy\n"), None);
    }
}
