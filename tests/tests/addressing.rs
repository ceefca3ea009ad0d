//! Addressing end to end (issue 15): IPv6 service prefixes and IPv6 builders, the local
//! routes yensid adds so that a claimed prefix reaches it at all, dual-stack services,
//! several services on different ports and prefixes at once, prefixes wider than one
//! address, builders given as `host:port` and `[v6]:port`, and a real Nix build over
//! IPv6.
//!
//! Every session is a real ssh client on real sshd builders. Where a session landed is
//! what the builder says: its name (`$YENSID_BUILDER`) and the address and port its
//! sshd saw the session arrive on (`$SSH_CONNECTION`), so a test knows not only which
//! builder served but over which family and port yensid reached it.
//!
//! IPv6 addresses come from the benchmarking range 2001:2::/48 and exist only inside
//! the test's namespaces: builders at `2001:2:0:K::2`, services in `2001:2:0:ff::/64`
//! and `2001:2:0:ee::/64`.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Child, ChildStdin, ChildStdout, Stdio};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail, ensure};
use yensid_tests::cli;
use yensid_tests::wait::wait_child;
use yensid_tests::{
    ALT_SSH_PORT, ConnectAttempt, Daemon, DaemonConfig, Dataplane, Derivation, Gate, HostNames,
    Netns, NixClient, PrefixDelivery, ServiceConfig, Site, SshClient, StoreScheme, Strategy,
    Topology, benchmarking_v6, remote_builder, service,
};

common::dataplane_tests!(
    ipv6_service_sessions_land_on_ipv6_builders,
    dual_stack_service_shares_one_count_per_builder,
    several_services_on_different_ports_and_prefixes,
    wider_prefixes_claim_every_address_inside_and_nothing_outside,
    builders_by_host_name_and_ipv6_literal_on_another_port,
);

common::variant_tests!(
    StoreScheme { ssh_ng: SshNg, ssh: Ssh }:
    nix_builds_over_ipv6_on_both_builders,
);

#[test]
fn local_routes_follow_the_claims_and_leave_others_alone() -> Result<()> {
    if !yensid_tests::privileged_or_skip("local_routes_follow_the_claims_and_leave_others_alone") {
        return Ok(());
    }
    local_routes_follow_the_claims(Dataplane::Kernel)
}

/// The route yensid adds, as `ip route show table local` prints it.
const OUR_PROTOCOL: &str = "proto 121";
/// How long the daemon may take to act on a reload or report a state; only a hang
/// reaches it.
const WAIT: Duration = Duration::from_secs(30);
const BUILD_TIMEOUT: Duration = Duration::from_secs(300);

/// `2001:2:0:ff::22`, port 22: the IPv6 service address.
fn service6() -> SocketAddr {
    SocketAddr::new(benchmarking_v6(0xff, 0x22).into(), 22)
}

fn host_prefix(addr: SocketAddr) -> String {
    match addr.ip() {
        IpAddr::V4(ip) => format!("{ip}/32"),
        IpAddr::V6(ip) => format!("{ip}/128"),
    }
}

fn at(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// Both families of the local table of `ns`, as `ip` prints them.
fn local_table(ns: &Netns) -> Result<String> {
    let v4 = ns.ip_output(&["route", "show", "table", "local"])?;
    let v6 = ns.ip_output(&["-6", "route", "show", "table", "local"])?;
    Ok(v4 + &v6)
}

/// The line of yensid's route for `prefix` in `table` (`ip` writes a host prefix without
/// its length).
fn our_route<'a>(table: &'a str, prefix: &str) -> Option<&'a str> {
    let shown = prefix
        .strip_suffix("/128")
        .or_else(|| prefix.strip_suffix("/32"))
        .unwrap_or(prefix);
    let start = format!("local {shown} dev lo ");
    table
        .lines()
        .find(|line| line.starts_with(&start) && line.contains(OUR_PROTOCOL))
}

fn ensure_no_routes_of_ours(ns: &Netns, when: &str) -> Result<()> {
    let table = local_table(ns)?;
    ensure!(
        !table.contains(OUR_PROTOCOL),
        "{when}, the local table holds routes of yensid:\n{table}"
    );
    Ok(())
}

/// One config for `topology`: every builder (at `address(builder)`), one service `ssh`
/// claiming `listen` on port 22.
fn config_with(
    topology: &Topology,
    dataplane: Dataplane,
    strategy: Strategy,
    listen: &[SocketAddr],
    address: impl Fn(&yensid_tests::Builder) -> SocketAddr,
) -> DaemonConfig {
    let mut config = DaemonConfig::for_topology(topology, dataplane, strategy);
    config.service_mut().listen = listen.iter().map(|a| host_prefix(*a)).collect();
    for builder in topology.builders() {
        config.builder_mut(builder.name()).address = address(builder);
    }
    config
}

/// Where a real ssh session landed.
#[derive(Debug, PartialEq, Eq)]
struct Landing {
    builder: String,
    /// The address and port the builder's sshd saw the session arrive on.
    server: SocketAddr,
}

impl Landing {
    /// `$YENSID_BUILDER $SSH_CONNECTION` (`client port server port`).
    fn parse(line: &str) -> Result<Self> {
        let words: Vec<&str> = line.split_whitespace().collect();
        let [builder, _client, _client_port, server, server_port] = words[..] else {
            bail!("a session printed {line:?}, not `builder client port server port`");
        };
        Ok(Self {
            builder: builder.to_owned(),
            server: SocketAddr::new(server.parse()?, server_port.parse()?),
        })
    }
}

const LANDING: &str = "echo $YENSID_BUILDER $SSH_CONNECTION";

/// One real ssh session to `target`: where it landed.
fn land(ssh: &SshClient, target: SocketAddr) -> Result<Landing> {
    Landing::parse(ssh.run(target, LANDING)?.trim())
}

/// A real ssh session held open until [`Held::finish`]; killed on drop.
struct Held {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    landing: Landing,
}

impl Held {
    fn open(ssh: &SshClient, target: SocketAddr) -> Result<Self> {
        let mut child = ssh
            .command(target, &format!("{LANDING}; read line; echo $line"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("spawn ssh")?;
        let stdin = child.stdin.take().context("ssh stdin")?;
        let mut stdout = BufReader::new(child.stdout.take().context("ssh stdout")?);
        let mut first = String::new();
        stdout.read_line(&mut first)?;
        let landing =
            Landing::parse(first.trim()).with_context(|| format!("held session to {target}"))?;
        Ok(Self {
            child,
            stdin,
            stdout,
            landing,
        })
    }

    /// Ends the session and checks it ended normally.
    fn finish(mut self) -> Result<()> {
        self.stdin.write_all(b"done\n")?;
        let mut last = String::new();
        self.stdout.read_line(&mut last)?;
        let status = wait_child(&mut self.child, WAIT)?.context("held session did not end")?;
        ensure!(
            status.success() && last.trim() == "done",
            "held session on {} ended with {status}, last line {last:?}",
            self.landing.builder
        );
        Ok(())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `builders[].active` of `builder` in a status document.
fn active(status: &yensid_tests::Status, builder: &str) -> Result<u64> {
    status.json()["builders"]
        .as_array()
        .and_then(|all| all.iter().find(|b| b["name"] == builder))
        .and_then(|b| b["active"].as_u64())
        .with_context(|| format!("no active count of {builder} in {}", status.json()))
}

fn delivery(prefix: &str, deliverable: bool, how: &str) -> PrefixDelivery {
    PrefixDelivery {
        prefix: prefix.to_owned(),
        deliverable: Some(deliverable),
        how: how.to_owned(),
    }
}

const ADDED: &str = "local route added by yensid (proto 121)";

/// A service on an IPv6 address with IPv6 builders: the daemon adds the local route the
/// address needs (absent before, removed at the stop), and real ssh sessions, their host
/// key verified under the service address, land on both builders by least-connections,
/// each reached over IPv6.
fn ipv6_service_sessions_land_on_ipv6_builders(dataplane: Dataplane) -> Result<()> {
    let topology = Topology::dual_stack(2)?;
    let ns = topology.client_ns();
    let config = config_with(
        &topology,
        dataplane,
        Strategy::LeastConnections,
        &[service6()],
        |b| b.ssh_addr6(22),
    );
    let prefix = host_prefix(service6());
    ensure_no_routes_of_ours(ns, "before the daemon starts")?;
    let unclaimed = topology.raw_client().connect(service6());
    ensure!(
        matches!(&unclaimed, ConnectAttempt::Failed(e) if e.raw_os_error() == Some(libc::ENETUNREACH)),
        "before the daemon runs, {} should be unreachable: {unclaimed:?}",
        service6()
    );
    let mut daemon = Daemon::start(ns, &config)?;

    let table = local_table(ns)?;
    ensure!(
        our_route(&table, &prefix).is_some(),
        "no route of yensid for {prefix}:\n{table}"
    );
    let status = daemon.status()?;
    ensure!(
        status.local_delivery("ssh")? == [delivery(&prefix, true, ADDED)],
        "status: {}",
        status.json()
    );
    let human = daemon.cli(&["status"])?;
    ensure!(
        human.contains(&format!("ssh: {prefix}: {ADDED}")),
        "human status:\n{human}"
    );

    let ssh = topology.ssh_client_with(&topology.pool_known_hosts(&[service6()]))?;
    let held = Held::open(&ssh, service6())?;
    let second = land(&ssh, service6())?;
    ensure!(
        second.builder != held.landing.builder,
        "both sessions went to {} although the other builder was idle",
        second.builder
    );
    for landing in [&held.landing, &second] {
        let builder = topology.builder(&landing.builder);
        ensure!(
            landing.server == builder.ssh_addr6(22),
            "{} was reached at {}, not over IPv6 at {}",
            landing.builder,
            landing.server,
            builder.ssh_addr6(22)
        );
    }
    held.finish()?;

    // The keys are checked under the name the client used: listed under another one,
    // ssh refuses the builder.
    let elsewhere = at(benchmarking_v6(0xff, 0x23), 22);
    let misnamed = topology.ssh_client_with(&topology.pool_known_hosts(&[elsewhere]))?;
    let refused = misnamed.run(service6(), "true");
    ensure!(
        refused
            .as_ref()
            .is_err_and(|e| format!("{e:#}").contains("Host key verification failed")),
        "a client trusting the keys under another name got {refused:?}"
    );

    ensure!(daemon.stop()?.success(), "yensid did not stop cleanly");
    ensure_no_routes_of_ours(ns, "after a clean stop")?;
    Ok(())
}

/// One service on an IPv4 and an IPv6 address, one builder reached over each family: a
/// client of either family is served by the same pool, and least-connections counts
/// each builder's connections once, whatever family they came in by.
fn dual_stack_service_shares_one_count_per_builder(dataplane: Dataplane) -> Result<()> {
    let topology = Topology::dual_stack(2)?;
    let config = config_with(
        &topology,
        dataplane,
        Strategy::LeastConnections,
        &[service(), service6()],
        |b| match b.name() {
            "b1" => b.ssh_addr(),
            _ => b.ssh_addr6(22),
        },
    );
    let daemon = Daemon::start(topology.client_ns(), &config)?;
    let status = daemon.status()?;
    ensure!(
        status.local_delivery("ssh")?
            == [
                delivery(
                    "127.0.0.22/32",
                    true,
                    "covered by the local route 127.0.0.0/8"
                ),
                delivery(&host_prefix(service6()), true, ADDED),
            ],
        "status: {}",
        status.json()
    );
    let expected = |landing: &Landing| match landing.builder.as_str() {
        "b1" => topology.builder("b1").ssh_addr(),
        _ => topology.builder("b2").ssh_addr6(22),
    };
    let ssh = topology.ssh_client_with(&topology.pool_known_hosts(&[service(), service6()]))?;

    let over_v4 = Held::open(&ssh, service())?;
    let over_v6 = Held::open(&ssh, service6())?;
    ensure!(
        over_v4.landing.builder != over_v6.landing.builder,
        "the IPv6 client joined the IPv4 client on {}: the counts are not shared",
        over_v4.landing.builder
    );
    for landing in [&over_v4.landing, &over_v6.landing] {
        ensure!(
            landing.server == expected(landing),
            "{} reached at {}",
            landing.builder,
            landing.server
        );
    }
    let freed = over_v4.landing.builder.clone();
    over_v4.finish()?;
    daemon.wait_for_status(&format!("{freed} to have no connection"), WAIT, |s| {
        Ok(active(s, &freed)? == 0)
    })?;
    let next = Held::open(&ssh, service6())?;
    ensure!(
        next.landing.builder == freed,
        "an IPv6 client went to {} (busy) instead of {freed}, which the IPv4 client freed",
        next.landing.builder
    );
    let status = daemon.status()?;
    for builder in ["b1", "b2"] {
        ensure!(
            active(&status, builder)? == 1,
            "{builder} should count one connection: {}",
            status.json()
        );
    }
    next.finish()?;
    over_v6.finish()?;
    Ok(())
}

/// Service `a` on 127.0.0.22/32 port 22 (b1, b2, round-robin) and service `b` on
/// 127.0.0.64/26 port 2222 (b3 alone, least-connections) at once: each client reaches
/// only its service's builders, and a claim is per (prefix, port): `b`'s addresses on
/// port 22 reach the host's own sshd, `a`'s address on port 2222 nothing.
fn several_services_on_different_ports_and_prefixes(dataplane: Dataplane) -> Result<()> {
    let mut topology = Topology::new(3)?;
    topology.start_host_sshd()?;
    let mut config = DaemonConfig::for_topology(&topology, dataplane, Strategy::RoundRobin);
    config.service_mut().builders = Some(vec!["b1".into(), "b2".into()]);
    config.service_mut().name = "a".into();
    config.services.push(ServiceConfig {
        name: "b".into(),
        listen: vec!["127.0.0.64/26".into()],
        port: ALT_SSH_PORT,
        builders: Some(vec!["b3".into()]),
        strategy: Strategy::LeastConnections,
        policy: None,
        when_full: None,
    });
    let _daemon = Daemon::start(topology.client_ns(), &config)?;
    let raw = topology.raw_client();

    let served_a = raw.banners(service(), 10)?;
    ensure!(
        served_a.windows(2).all(|pair| pair[0] != pair[1])
            && served_a.iter().all(|b| b == "b1" || b == "b2"),
        "service a (b1, b2, round-robin) served {served_a:?}"
    );
    let b_addresses =
        [64, 65, 100, 127].map(|last| at(Ipv4Addr::new(127, 0, 0, last), ALT_SSH_PORT));
    for target in b_addresses {
        let served = raw.banners(target, 3)?;
        ensure!(
            served.iter().all(|b| b == "b3"),
            "service b (b3 alone) at {target} served {served:?}"
        );
    }
    // Real sessions, each host key verified under the address the client used.
    let ssh = topology.ssh_client_with(&topology.pool_known_hosts(&[service(), b_addresses[1]]))?;
    let landed = ssh.served_by(service())?;
    ensure!(
        landed == "b1" || landed == "b2",
        "a session of a landed on {landed}"
    );
    ensure!(
        ssh.served_by(b_addresses[1])? == "b3",
        "a session of b did not land on b3"
    );

    let b_on_22 = raw.banner(at(Ipv4Addr::new(127, 0, 0, 64), 22))?;
    ensure!(
        b_on_22 == "host",
        "127.0.0.64:22 (b's prefix, a's port) should reach the host's sshd: {b_on_22:?}"
    );
    let a_on_2222 = raw.connect(at(Ipv4Addr::new(127, 0, 0, 22), ALT_SSH_PORT));
    ensure!(
        a_on_2222.is_refused(),
        "127.0.0.22:2222 (a's address, b's port) is claimed by no one: {a_on_2222:?}"
    );
    Ok(())
}

/// Prefixes wider than one address: 127.0.0.64/26 (covered by lo's 127.0.0.0/8),
/// 198.18.240.0/28 and 2001:2:0:ff::100/120 (both need a route, which the daemon adds).
/// Addresses across each are served; addresses just outside are not claimed: the
/// host's sshd answers on 127.0.0.x, and nothing on the others.
fn wider_prefixes_claim_every_address_inside_and_nothing_outside(
    dataplane: Dataplane,
) -> Result<()> {
    let mut topology = Topology::dual_stack(2)?;
    topology.start_host_sshd()?;
    let ns = topology.client_ns();
    let mut config = DaemonConfig::for_topology(&topology, dataplane, Strategy::RoundRobin);
    let prefixes = ["127.0.0.64/26", "198.18.240.0/28", "2001:2:0:ff::100/120"];
    config.service_mut().listen = prefixes.iter().map(|p| p.to_string()).collect();
    let daemon = Daemon::start(ns, &config)?;

    let status = daemon.status()?;
    ensure!(
        status.local_delivery("ssh")?
            == [
                delivery(prefixes[0], true, "covered by the local route 127.0.0.0/8"),
                delivery(prefixes[1], true, ADDED),
                delivery(prefixes[2], true, ADDED),
            ],
        "status: {}",
        status.json()
    );
    let table = local_table(ns)?;
    for prefix in &prefixes[1..] {
        ensure!(
            our_route(&table, prefix).is_some(),
            "no route of yensid for {prefix}:\n{table}"
        );
    }
    ensure!(
        our_route(&table, prefixes[0]).is_none(),
        "yensid added a route for {} that lo's 127.0.0.0/8 covers:\n{table}",
        prefixes[0]
    );

    let v6 = |last: u16| at(benchmarking_v6(0xff, last), 22);
    let v4 = |a: u8, b: u8, c: u8, d: u8| at(Ipv4Addr::new(a, b, c, d), 22);
    let inside = [
        v4(127, 0, 0, 64),
        v4(127, 0, 0, 90),
        v4(127, 0, 0, 127),
        v4(198, 18, 240, 0),
        v4(198, 18, 240, 9),
        v4(198, 18, 240, 15),
        v6(0x100),
        v6(0x1a5),
        v6(0x1ff),
    ];
    let raw = topology.raw_client();
    for target in inside {
        let served = raw.banners(target, 2)?;
        ensure!(
            served.iter().any(|b| b == "b1") && served.iter().any(|b| b == "b2"),
            "{target} (claimed) served {served:?}"
        );
    }
    for target in [v4(127, 0, 0, 63), v4(127, 0, 0, 128)] {
        let banner = raw.banner(target)?;
        ensure!(
            banner == "host",
            "{target} is outside 127.0.0.64/26: the host's sshd should answer, not {banner:?}"
        );
    }
    for target in [v4(198, 18, 240, 16), v6(0xff), v6(0x200)] {
        let attempt = raw.connect(target);
        ensure!(
            matches!(&attempt, ConnectAttempt::Failed(e) if e.raw_os_error() == Some(libc::ENETUNREACH)),
            "{target} is outside every claim and has no route: {attempt:?}"
        );
    }
    Ok(())
}

/// b1 given as `b1.yensid.test:2222` (a name the daemon resolves through its hosts
/// file) and b2 as `[2001:2:0:2::2]:2222`: probes and real sessions reach each on port
/// 2222, by the family its address says.
fn builders_by_host_name_and_ipv6_literal_on_another_port(dataplane: Dataplane) -> Result<()> {
    let topology = Topology::dual_stack(2)?;
    let b1 = topology.builder("b1");
    let b2 = topology.builder("b2");
    let mut names = HostNames::new();
    let host = names.name("b1", IpAddr::V4(b1.address()));
    let config = config_with(
        &topology,
        dataplane,
        Strategy::RoundRobin,
        &[service()],
        |b| match b.name() {
            "b1" => at(b.address(), ALT_SSH_PORT),
            _ => b.ssh_addr6(ALT_SSH_PORT),
        },
    );
    let daemon = Daemon::start_with_host_names(topology.client_ns(), &config, &names)?;
    // A name is resolved by the builder's probes: until the first answer, the daemon
    // knows no route to b1 and excludes it.
    let status = daemon.wait_for_status("both builders probed and eligible", WAIT, |s| {
        Ok(s.exclusion("ssh", "b1")?.is_none()
            && s.exclusion("ssh", "b2")?.is_none()
            && s.builder_state("b1")? == "healthy"
            && s.builder_state("b2")? == "healthy")
    })?;
    let address_of = |name: &str| {
        status.json()["builders"]
            .as_array()
            .and_then(|all| all.iter().find(|b| b["name"] == name))
            .and_then(|b| b["address"].as_str())
            .map(str::to_owned)
    };
    ensure!(
        address_of("b1") == Some(format!("{host}:{ALT_SSH_PORT}"))
            && address_of("b2") == Some(format!("[{}]:{ALT_SSH_PORT}", b2.address6())),
        "status shows the builders at {:?} and {:?}",
        address_of("b1"),
        address_of("b2")
    );

    let ssh = topology.ssh_client()?;
    let landings = (0..4)
        .map(|_| land(&ssh, service()))
        .collect::<Result<Vec<_>>>()?;
    let names_seen: Vec<&str> = landings.iter().map(|l| l.builder.as_str()).collect();
    ensure!(
        names_seen.windows(2).all(|pair| pair[0] != pair[1]),
        "round-robin did not alternate: {names_seen:?}"
    );
    for landing in &landings {
        let expected = match landing.builder.as_str() {
            "b1" => at(b1.address(), ALT_SSH_PORT),
            _ => b2.ssh_addr6(ALT_SSH_PORT),
        };
        ensure!(
            landing.server == expected,
            "{} was reached at {}, not at {expected}",
            landing.builder,
            landing.server
        );
    }
    Ok(())
}

/// Local routes over a daemon's life: added for the prefixes no route covers, none for
/// a prefix the operator's own local route covers (which yensid never touches), removed
/// when a prefix leaves at a reload and added for one that arrives, added again when
/// someone else removes one; left in place by a
/// crash (the pinned program still refuses there) and adopted by the next run; all of
/// yensid's gone after a clean stop, the operator's still there.
fn local_routes_follow_the_claims(dataplane: Dataplane) -> Result<()> {
    let topology = Topology::dual_stack(2)?;
    let ns = topology.client_ns();
    ns.ip(&[
        "-6",
        "route",
        "add",
        "local",
        "2001:2:0:ee::/64",
        "dev",
        "lo",
    ])?;
    let operators = "local 2001:2:0:ee::/64 dev lo";
    let ee = at(benchmarking_v6(0xee, 0x22), 22);
    let v4_outside_lo = "198.18.240.0/28";
    let first = [
        host_prefix(service6()),
        host_prefix(ee),
        v4_outside_lo.to_owned(),
        host_prefix(service()),
    ];
    let mut config = DaemonConfig::for_topology(&topology, dataplane, Strategy::RoundRobin);
    config.service_mut().listen = first.to_vec();
    let mut daemon = Daemon::start(ns, &config)?;

    let table = local_table(ns)?;
    ensure!(
        our_route(&table, &first[0]).is_some() && our_route(&table, &first[2]).is_some(),
        "yensid's routes for {} and {} are missing:\n{table}",
        first[0],
        first[2]
    );
    ensure!(
        our_route(&table, &first[1]).is_none() && table.contains(operators),
        "{} is covered by the operator's route; yensid must add none:\n{table}",
        first[1]
    );
    let status = daemon.status()?;
    ensure!(
        status.local_delivery("ssh")?
            == [
                delivery(&first[0], true, ADDED),
                delivery(
                    &first[1],
                    true,
                    "covered by the local route 2001:2:0:ee::/64"
                ),
                delivery(&first[2], true, ADDED),
                delivery(&first[3], true, "covered by the local route 127.0.0.0/8"),
            ],
        "status: {}",
        status.json()
    );
    let raw = topology.raw_client();
    for target in [
        service6(),
        ee,
        at(Ipv4Addr::new(198, 18, 240, 7), 22),
        service(),
    ] {
        raw.banner(target)
            .with_context(|| format!("{target} is claimed and deliverable"))?;
    }

    // A reload: 2001:2:0:ff::22 and 198.18.240.0/28 leave, 2001:2:0:ff::100/120 comes.
    let wide = "2001:2:0:ff::100/120";
    let since = SystemTime::now();
    config.service_mut().listen = vec![first[1].clone(), first[3].clone(), wide.to_owned()];
    daemon.reload(&config)?;
    daemon.wait_for_log(&["local route added", wide], since, WAIT)?;
    for gone in [&first[0], &first[2]] {
        daemon.wait_for_log(&["local route removed", gone], since, WAIT)?;
    }
    let table = local_table(ns)?;
    ensure!(
        our_route(&table, wide).is_some()
            && our_route(&table, &first[0]).is_none()
            && our_route(&table, &first[2]).is_none()
            && table.contains(operators),
        "after the reload:\n{table}"
    );
    raw.banner(at(benchmarking_v6(0xff, 0x1ee), 22))
        .context("an address of the prefix the reload brought")?;

    // Removed by someone else: the daemon follows the routes and adds it again.
    let since = SystemTime::now();
    ns.ip(&[
        "-6", "route", "del", "local", wide, "dev", "lo", "table", "local",
    ])?;
    daemon.wait_for_log(&["local route added", wide], since, WAIT)?;
    ensure!(
        our_route(&local_table(ns)?, wide).is_some(),
        "yensid's route for {wide} was not added again"
    );

    // A crash leaves the route (the pinned program refuses there: RST, not
    // unreachable); the next run adopts it.
    daemon.kill9()?;
    ensure!(
        our_route(&local_table(ns)?, wide).is_some(),
        "yensid's route for {wide} went with the crash"
    );
    let refused = raw.connect(at(benchmarking_v6(0xff, 0x1ee), 22));
    ensure!(
        refused.is_refused(),
        "with the daemon dead, the claimed address should refuse: {refused:?}"
    );
    let since = SystemTime::now();
    daemon.restart()?;
    daemon.wait_for_log(
        &["local route adopted from an earlier run", wide],
        since,
        WAIT,
    )?;
    raw.banner(at(benchmarking_v6(0xff, 0x1ee), 22))
        .context("served again after the restart")?;

    ensure!(daemon.stop()?.success(), "yensid did not stop cleanly");
    ensure_no_routes_of_ours(ns, "after a clean stop")?;
    let table = local_table(ns)?;
    ensure!(
        table.contains(operators),
        "the operator's route is gone:\n{table}"
    );
    Ok(())
}

/// A real Nix client lists the IPv6 service address as its one machine (`ssh-ng://` or
/// `ssh://root@2001:2:0:ff::22`: Nix 2.8 takes the IPv6 literal without brackets) with
/// two jobs; two derivations that hold their connections until both started land on
/// the two builders, reached over IPv6, and their outputs come back.
fn nix_builds_over_ipv6_on_both_builders(scheme: StoreScheme) -> Result<()> {
    let topology = Topology::dual_stack_with_stores(2)?;
    let config = config_with(
        &topology,
        Dataplane::Kernel,
        Strategy::LeastConnections,
        &[service6()],
        |b| b.ssh_addr6(22),
    );
    let daemon = Daemon::start(topology.client_ns(), &config)?;
    let known_hosts = cli::known_hosts(daemon.config_path(), None)?;
    ensure!(
        known_hosts
            .stdout
            .lines()
            .all(|line| line.starts_with(&format!("{} ", service6().ip())))
            && known_hosts.stdout.lines().count() == 2,
        "yensid known-hosts printed {:?}",
        known_hosts.stdout
    );
    let nix = NixClient::new(&topology, &known_hosts.stdout)?;
    let gate = Gate::new(&topology)?;
    let derivations = [Derivation::behind(&gate), Derivation::behind(&gate)];
    let running = nix.spawn(&derivations, &remote_builder(scheme, service6().ip(), 2), 2)?;
    let started = gate.wait_started(2, BUILD_TIMEOUT)?;
    let mut sites: Vec<Site> = started.into_iter().map(|(_, site)| site).collect();
    sites.sort_by_key(|s| format!("{s:?}"));
    ensure!(
        sites == [Site::Builder("b1".into()), Site::Builder("b2".into())],
        "the two builds started at {sites:?}"
    );
    gate.open()?;
    let run = running.wait(BUILD_TIMEOUT)?;
    run.ensure_built()?;
    for build in &run.builds {
        let output = build.output.as_ref().context("ensure_built checked it")?;
        let Site::Builder(name) = &output.site else {
            bail!("{} was built at {:?}", build.name, output.site);
        };
        let store = topology
            .builder(name)
            .store()
            .context("a topology with stores")?;
        ensure!(
            store.contains(&output.path),
            "{}'s store lacks {}",
            name,
            output.path
        );
    }
    Ok(())
}
