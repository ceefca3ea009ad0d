//! The local path: a client on the daemon's host connects straight to the builder the
//! kernel chooses (cgroup/connect rewrite), with no middle. The tests attach it to a
//! cgroup of the test process's own (`TestCgroup`), never to the root cgroup, and the
//! daemon's programs only act in the daemon's (the test's client) namespace.

use std::collections::BTreeMap;
use std::fs;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use anyhow::{Result, ensure};
use yensid_tests::cgroup::TestCgroup;
use yensid_tests::cli;
use yensid_tests::{
    ConnectAttempt, Daemon, DaemonConfig, Dataplane, HealthConfig, LinkKind, LinkRules,
    LocalPathConfig, PolicyMode, RandomFile, SshClient, Status, Strategy, Topology, service,
};

/// Only against hangs.
const WAIT: Duration = Duration::from_secs(30);

macro_rules! local_tests {
    ($($test:ident),+ $(,)?) => {
        $(
            #[test]
            fn $test() -> Result<()> {
                if !yensid_tests::privileged_or_skip(concat!("local_path::", stringify!($test))) {
                    return Ok(());
                }
                let cgroup = TestCgroup::join()?;
                super_test::$test(&cgroup)
            }
        )+
    };
}

local_tests!(
    a_local_ssh_client_reaches_the_builder_directly_and_trusts_the_service_name,
    refusal_is_econnrefused,
    counts_return_to_zero_after_a_thousand_connections,
    round_robin_alternates_without_the_proxy,
    random_follows_weights_without_the_proxy,
    least_connections_and_max_connections_hold_across_both_paths,
    priority_fills_in_list_order,
    a_drained_builder_gets_no_local_connection,
    a_dead_builder_costs_at_most_one_failed_connect,
    source_affinity_keeps_this_host_on_one_builder,
    mode_changes_apply_to_local_clients,
    both_paths_at_once_share_one_count_per_builder,
    local_clients_proxy_takes_the_gateway_path,
    an_unattachable_cgroup_falls_back_to_the_proxy,
    link_rules_apply_to_local_clients,
    max_rtt_ms_follows_the_rtt_of_local_connections,
    a_black_holed_builder_costs_one_timed_out_connect,
);

/// The topology's config with the local path on for every service, attached to the
/// test's cgroup.
fn local_config(topology: &Topology, cgroup: &TestCgroup, strategy: Strategy) -> DaemonConfig {
    let mut config = DaemonConfig::for_topology(topology, Dataplane::Kernel, strategy);
    config.local_path = Some(LocalPathConfig {
        cgroup: cgroup.path().to_owned(),
        proxied: Vec::new(),
    });
    config
}

/// A number at a JSON pointer of the status document.
fn number(status: &Status, pointer: &str) -> Result<u64> {
    status
        .json()
        .pointer(pointer)
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| anyhow::anyhow!("no unsigned integer at {pointer} in {}", status.json()))
}

fn local(status: &Status, builder: &str, field: &str) -> Result<u64> {
    number(
        status,
        &format!("/builders/{}/local/{field}", index(status, builder)?),
    )
}

fn index(status: &Status, builder: &str) -> Result<usize> {
    status
        .builder_names()?
        .iter()
        .position(|n| n == builder)
        .ok_or_else(|| anyhow::anyhow!("no builder {builder} in status"))
}

/// Local connections the kernel counted, over every builder.
fn local_total(status: &Status, field: &str) -> Result<u64> {
    let mut total = 0;
    for name in status.builder_names()? {
        total += local(status, &name, field)?;
    }
    Ok(total)
}

/// The daemon counted exactly `expected` connections on the local path.
fn expect_went_direct(daemon: &Daemon, expected: u64) -> Result<()> {
    let status = daemon.status()?;
    let went = local_total(&status, "connections")?;
    ensure!(
        went == expected,
        "{went} connections went direct, expected {expected}: {}",
        status.json()
    );
    Ok(())
}

fn tally<'a>(names: impl IntoIterator<Item = &'a str>) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for n in names {
        *counts.entry(n.to_owned()).or_default() += 1;
    }
    counts
}

mod super_test {
    use super::*;

    /// A real `ssh` to the service address, trusting only what `yensid known-hosts`
    /// prints under the service name, lands on a builder; the kernel counted it on the
    /// local path and the daemon proxied nothing; getpeername reports the service
    /// address although the socket talks to the builder.
    pub fn a_local_ssh_client_reaches_the_builder_directly_and_trusts_the_service_name(
        cgroup: &TestCgroup,
    ) -> Result<()> {
        let topology = Topology::new(2)?;
        let config = local_config(&topology, cgroup, Strategy::LeastConnections);
        let daemon = Daemon::start(topology.client_ns(), &config)?;
        let status = daemon.status()?;
        let path = status
            .json()
            .pointer("/services/0/local_clients")
            .and_then(serde_json::Value::as_str)
            .unwrap_or_default()
            .to_owned();
        ensure!(
            path.starts_with("direct"),
            "status says local clients take {path:?}"
        );

        let out = cli::known_hosts(daemon.config_path(), Some("127.0.0.22"))?;
        let known_hosts = topology.new_file("known_hosts");
        fs::write(&known_hosts, &out.stdout)?;
        let ssh = SshClient::new(
            topology.client_ns(),
            topology.client_identity(),
            &known_hosts,
        );
        let builder = ssh.served_by(service())?;
        ensure!(
            ["b1", "b2"].contains(&builder.as_str()),
            "ssh reached {builder:?}"
        );

        let raw = topology.raw_client();
        let held = raw.open_ssh(service())?;
        let peer: SocketAddr = held.peer_addr()?;
        ensure!(
            peer == service(),
            "getpeername said {peer}, not the service address"
        );
        drop(held);

        let status = daemon.wait_for_status("both local connections closed", WAIT, |s| {
            Ok(local_total(s, "open")? == 0 && local_total(s, "connections")? == 2)
        })?;
        for name in ["b1", "b2"] {
            let proxied = number(
                &status,
                &format!("/builders/{}/connections", index(&status, name)?),
            )?;
            ensure!(
                proxied == 0,
                "the daemon proxied {proxied} connection(s) to {name}"
            );
        }
        let explained = daemon.cli(&["explain"])?;
        ensure!(
            explained
                .contains("next local connection (a client on this host) takes the path: direct"),
            "explain said:\n{explained}"
        );
        Ok(())
    }

    /// Mode local: the connect is left to the gateway path, which refuses it with RST.
    pub fn refusal_is_econnrefused(cgroup: &TestCgroup) -> Result<()> {
        let topology = Topology::new(1)?;
        let mut config = local_config(&topology, cgroup, Strategy::LeastConnections);
        config.policy_mode = Some(PolicyMode::Local);
        let daemon = Daemon::start(topology.client_ns(), &config)?;
        let attempt = topology.raw_client().connect(service());
        ensure!(
            matches!(attempt, ConnectAttempt::Refused),
            "mode local: {attempt:?}, expected ECONNREFUSED"
        );
        let status = daemon.status()?;
        ensure!(
            local_total(&status, "connections")? == 0,
            "a refused connect was counted"
        );
        Ok(())
    }

    /// 1,000 sequential local connections: every one is counted and every one released,
    /// in status and in the pinned maps `yensid maps` reads.
    pub fn counts_return_to_zero_after_a_thousand_connections(cgroup: &TestCgroup) -> Result<()> {
        let topology = Topology::new(2)?;
        let config = local_config(&topology, cgroup, Strategy::LeastConnections);
        let daemon = Daemon::start(topology.client_ns(), &config)?;
        let served = topology.raw_client().banners(service(), 1000)?;
        ensure!(served.len() == 1000, "{} connections served", served.len());
        daemon.wait_for_status("every local connection released", WAIT, |s| {
            Ok(local_total(s, "open")? == 0
                && local_total(s, "connections")? == 1000
                && s.active("b1")? == 0
                && s.active("b2")? == 0)
        })?;
        let maps = cli::maps_json(daemon.config_path())?;
        let local = &maps["local"];
        let stats = local["stats"].as_array().cloned().unwrap_or_default();
        let summed =
            |field: &str| -> u64 { stats.iter().filter_map(|e| e[1][field].as_u64()).sum() };
        ensure!(
            local["attached"] == true
                && local["open_sockets"] == 0
                && summed("opened") == 1000
                && summed("closed") == 1000,
            "the pinned local maps after 1,000 connections: {local}"
        );
        let mut targets: Vec<&str> = local["builders"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e[1]["address"].as_str())
            .collect();
        targets.sort_unstable();
        let mut expected: Vec<String> = topology
            .builders()
            .iter()
            .map(|b| b.ssh_addr().to_string())
            .collect();
        expected.sort_unstable();
        ensure!(
            targets == expected,
            "LOCAL_BUILDERS sends connects to {targets:?}, expected {expected:?}"
        );
        let text = cli::yensid_ok(daemon.config_path(), &["maps"])?;
        ensure!(
            text.contains("LOCAL connect-time rewrite attached")
                && text.contains("LOCAL_SOCKETS 0 local socket(s)"),
            "`yensid maps` on the local path:\n{text}"
        );
        Ok(())
    }

    /// Round-robin on the local path alternates strictly, like on the gateway path.
    pub fn round_robin_alternates_without_the_proxy(cgroup: &TestCgroup) -> Result<()> {
        let topology = Topology::new(2)?;
        let config = local_config(&topology, cgroup, Strategy::RoundRobin);
        let daemon = Daemon::start(topology.client_ns(), &config)?;
        let served = topology.raw_client().banners(service(), 20)?;
        ensure!(
            served.windows(2).all(|pair| pair[0] != pair[1]),
            "round-robin did not alternate: {served:?}"
        );
        expect_went_direct(&daemon, 20)?;
        Ok(())
    }

    /// Random on the local path draws by weight, like on the gateway path: weights 3:1
    /// over 400 connections give b1 75% ± 15 points (the binomial standard deviation
    /// is 2.2 points, so chance alone fails this less than once in 10^11 runs; ignored
    /// weights give 50%, a fixed pick 0 or 100%).
    pub fn random_follows_weights_without_the_proxy(cgroup: &TestCgroup) -> Result<()> {
        let topology = Topology::new(2)?;
        let mut config = local_config(&topology, cgroup, Strategy::Random);
        config.builder_mut("b1").weight = Some(3);
        let daemon = Daemon::start(topology.client_ns(), &config)?;
        let served = tally(
            topology
                .raw_client()
                .banners(service(), 400)?
                .iter()
                .map(String::as_str),
        );
        let b1 = served.get("b1").copied().unwrap_or(0);
        ensure!(
            (240..=360).contains(&b1) && served.values().sum::<usize>() == 400,
            "weights 3:1 gave {served:?} of 400"
        );
        expect_went_direct(&daemon, 400)?;
        Ok(())
    }

    /// Least connections with held local connections spreads them evenly, and
    /// `max_connections` counts the local ones: with every slot taken by local clients,
    /// the next connection is refused by the gateway path (one count per builder).
    pub fn least_connections_and_max_connections_hold_across_both_paths(
        cgroup: &TestCgroup,
    ) -> Result<()> {
        let topology = Topology::new(2)?;
        let mut config = local_config(&topology, cgroup, Strategy::LeastConnections);
        config.builder_mut("b1").max_connections = Some(2);
        config.builder_mut("b2").max_connections = Some(2);
        let daemon = Daemon::start(topology.client_ns(), &config)?;
        let raw = topology.raw_client();
        let held = (0..4)
            .map(|_| raw.open_ssh(service()))
            .collect::<Result<Vec<_>>>()?;
        let counts = tally(held.iter().map(|c| c.served_by()));
        ensure!(
            counts == tally(["b1", "b1", "b2", "b2"]),
            "4 held local connections split {counts:?}"
        );
        let status = daemon.status()?;
        ensure!(
            status.active("b1")? == 2 && status.active("b2")? == 2,
            "status counts b1={} b2={}",
            status.active("b1")?,
            status.active("b2")?
        );
        let attempt = raw.connect(service());
        ensure!(
            matches!(attempt, ConnectAttempt::Refused),
            "every builder full: {attempt:?}, expected ECONNREFUSED"
        );
        drop(held);
        daemon.wait_for_status("the local connections released", WAIT, |s| {
            Ok(s.active("b1")? == 0 && s.active("b2")? == 0)
        })?;
        ensure!(raw.open_ssh(service()).is_ok(), "no room after the release");
        Ok(())
    }

    /// Priority fills the first builder up to its limit, then spills.
    pub fn priority_fills_in_list_order(cgroup: &TestCgroup) -> Result<()> {
        let topology = Topology::new(2)?;
        let mut config = local_config(&topology, cgroup, Strategy::Priority);
        config.builder_mut("b1").max_connections = Some(2);
        let daemon = Daemon::start(topology.client_ns(), &config)?;
        let raw = topology.raw_client();
        let held = (0..3)
            .map(|_| raw.open_ssh(service()))
            .collect::<Result<Vec<_>>>()?;
        let order: Vec<&str> = held.iter().map(|c| c.served_by()).collect();
        ensure!(order == ["b1", "b1", "b2"], "priority placed {order:?}");
        drop(held);
        daemon.wait_for_status("released", WAIT, |s| Ok(local_total(s, "open")? == 0))?;
        Ok(())
    }

    /// A drained builder gets no new local connection.
    pub fn a_drained_builder_gets_no_local_connection(cgroup: &TestCgroup) -> Result<()> {
        let topology = Topology::new(2)?;
        let config = local_config(&topology, cgroup, Strategy::RoundRobin);
        let daemon = Daemon::start(topology.client_ns(), &config)?;
        daemon.cli(&["drain", "b1"])?;
        let served = topology.raw_client().banners(service(), 10)?;
        ensure!(
            served.iter().all(|s| s == "b2"),
            "with b1 drained: {served:?}"
        );
        let status = daemon.status()?;
        ensure!(
            local(&status, "b2", "connections")? == 10,
            "not all went direct to b2"
        );
        Ok(())
    }

    /// b1's sshd dies: the first local connect that goes there fails (the local path
    /// cannot move it), the kernel takes b1 out of the selection at once, every later
    /// connect goes to b2, and the daemon marks b1 unhealthy.
    pub fn a_dead_builder_costs_at_most_one_failed_connect(cgroup: &TestCgroup) -> Result<()> {
        let topology = Topology::new(2)?;
        let config = local_config(&topology, cgroup, Strategy::RoundRobin);
        let daemon = Daemon::start(topology.client_ns(), &config)?;
        let since = SystemTime::now();
        topology.builder("b1").sshd().kill()?;
        let raw = topology.raw_client();
        let mut failed = 0;
        let mut served = Vec::new();
        for _ in 0..20 {
            match raw.connect(service()) {
                ConnectAttempt::Accepted(stream) => served.push(
                    yensid_tests::SshConnection::handshake(stream)?
                        .served_by()
                        .to_owned(),
                ),
                other => {
                    ensure!(
                        matches!(other, ConnectAttempt::Refused),
                        "connect: {other:?}"
                    );
                    failed += 1;
                }
            }
        }
        ensure!(failed <= 1, "{failed} connects failed; served {served:?}");
        ensure!(served.iter().all(|s| s == "b2"), "served {served:?}");
        daemon.wait_for_log(
            &["builder unhealthy", "b1", "local connect failed"],
            since,
            WAIT,
        )?;
        let status = daemon.status()?;
        ensure!(
            status.builder_state("b1")? == "unhealthy",
            "b1 is {}",
            status.builder_state("b1")?
        );
        Ok(())
    }

    /// Source-affinity: every local client is this host, so all of them go to one
    /// builder.
    pub fn source_affinity_keeps_this_host_on_one_builder(cgroup: &TestCgroup) -> Result<()> {
        let topology = Topology::new(3)?;
        let config = local_config(&topology, cgroup, Strategy::SourceAffinity);
        let daemon = Daemon::start(topology.client_ns(), &config)?;
        let served = topology.raw_client().banners(service(), 12)?;
        ensure!(
            served.windows(2).all(|pair| pair[0] == pair[1]),
            "source-affinity spread one host over {served:?}"
        );
        expect_went_direct(&daemon, 12)?;
        Ok(())
    }

    /// `yensid mode local` refuses local clients too (ECONNREFUSED); `mode auto`
    /// sends them straight to a builder again.
    pub fn mode_changes_apply_to_local_clients(cgroup: &TestCgroup) -> Result<()> {
        let topology = Topology::new(1)?;
        let config = local_config(&topology, cgroup, Strategy::LeastConnections);
        let daemon = Daemon::start(topology.client_ns(), &config)?;
        let raw = topology.raw_client();
        ensure!(raw.banner(service())? == "b1", "before the change");
        daemon.cli(&["mode", "local"])?;
        let attempt = raw.connect(service());
        ensure!(
            matches!(attempt, ConnectAttempt::Refused),
            "mode local: {attempt:?}, expected ECONNREFUSED"
        );
        daemon.cli(&["mode", "auto"])?;
        ensure!(raw.banner(service())? == "b1", "after mode auto");
        expect_went_direct(&daemon, 2)?;
        Ok(())
    }

    /// Two services over the same builders, one for direct local clients and one
    /// through the gateway path (`local_clients = "proxy"`): least-connections and
    /// `max_connections` see one count per builder, whichever path holds it.
    pub fn both_paths_at_once_share_one_count_per_builder(cgroup: &TestCgroup) -> Result<()> {
        let topology = Topology::new(2)?;
        let mut config = local_config(&topology, cgroup, Strategy::LeastConnections);
        config.builder_mut("b1").max_connections = Some(1);
        config.builder_mut("b2").max_connections = Some(1);
        let mut proxied = config.service_mut().clone();
        proxied.name = "proxied".to_owned();
        proxied.listen = vec!["127.0.0.23/32".to_owned()];
        config.services.push(proxied);
        if let Some(local) = &mut config.local_path {
            local.proxied.push("proxied".to_owned());
        }
        let gateway: SocketAddr = "127.0.0.23:22".parse()?;
        let daemon = Daemon::start(topology.client_ns(), &config)?;
        let raw = topology.raw_client();

        let direct = raw.open_ssh(service())?;
        let through = raw.open_ssh(gateway)?;
        ensure!(
            direct.served_by() != through.served_by(),
            "both went to {} although the other builder was idle",
            direct.served_by()
        );
        let status = daemon.wait_for_status("one connection per builder", WAIT, |s| {
            Ok(s.active("b1")? == 1 && s.active("b2")? == 1)
        })?;
        ensure!(
            local(&status, direct.served_by(), "open")? == 1
                && local(&status, through.served_by(), "open")? == 0,
            "the direct connection is not the local one: {}",
            status.json()
        );
        for target in [service(), gateway] {
            let attempt = raw.connect(target);
            ensure!(
                matches!(attempt, ConnectAttempt::Refused),
                "every builder full, {target}: {attempt:?}, expected ECONNREFUSED"
            );
        }
        let freed = direct.served_by().to_owned();
        drop(direct);
        daemon.wait_for_status("the local connection released", WAIT, |s| {
            Ok(s.active(&freed)? == 0)
        })?;
        let next = raw.open_ssh(gateway)?;
        ensure!(
            next.served_by() == freed,
            "the gateway path sent the next client to {} instead of {freed}",
            next.served_by()
        );
        drop((through, next));
        Ok(())
    }

    /// `local_clients = "proxy"`: local clients go through the daemon as before.
    pub fn local_clients_proxy_takes_the_gateway_path(cgroup: &TestCgroup) -> Result<()> {
        let topology = Topology::new(1)?;
        let mut config = local_config(&topology, cgroup, Strategy::LeastConnections);
        if let Some(local) = &mut config.local_path {
            local.proxied.push("ssh".to_owned());
        }
        let daemon = Daemon::start(topology.client_ns(), &config)?;
        ensure!(
            topology.raw_client().banner(service())? == "b1",
            "not served"
        );
        let status = daemon.wait_for_status("the proxied connection counted", WAIT, |s| {
            Ok(number(s, "/builders/0/connections")? == 1)
        })?;
        ensure!(
            local_total(&status, "connections")? == 0,
            "a connection went direct"
        );
        let explained = daemon.cli(&["explain"])?;
        ensure!(
            explained
                .contains("next local connection (a client on this host) takes the path: proxy"),
            "explain said:\n{explained}"
        );
        daemon.expect_data_path(Dataplane::Kernel)?;
        Ok(())
    }

    /// A `local_cgroup` the programs cannot attach to: said once in the log, status
    /// says why, and local clients go through the proxy.
    pub fn an_unattachable_cgroup_falls_back_to_the_proxy(cgroup: &TestCgroup) -> Result<()> {
        let topology = Topology::new(1)?;
        let mut config = local_config(&topology, cgroup, Strategy::LeastConnections);
        let missing = cgroup.path().join("no-such-cgroup");
        if let Some(local) = &mut config.local_path {
            local.cgroup = missing.clone();
        }
        let daemon = Daemon::start(topology.client_ns(), &config)?;
        let since = SystemTime::UNIX_EPOCH;
        daemon.wait_for_log(&["LOCAL PATH UNAVAILABLE", "no-such-cgroup"], since, WAIT)?;
        let status = daemon.status()?;
        let path = status
            .json()
            .pointer("/services/0/local_clients")
            .and_then(serde_json::Value::as_str)
            .unwrap_or_default()
            .to_owned();
        ensure!(
            path.starts_with("proxy: the local path is unavailable")
                && path.contains("no-such-cgroup"),
            "status says {path:?}"
        );
        ensure!(
            topology.raw_client().banner(service())? == "b1",
            "not served"
        );
        daemon.expect_data_path(Dataplane::Kernel)?;
        let unavailable = daemon
            .log_since(since)
            .into_iter()
            .filter(|l| l.contains_all(&["LOCAL PATH UNAVAILABLE"]))
            .count();
        ensure!(unavailable == 1, "said {unavailable} times");
        Ok(())
    }

    /// Link rules: b1 over `ethernet`, b2 over `wifi`, `remote_via = ["ethernet"]`:
    /// every local client goes to b1; with `min_healthy_builders = 2` the service
    /// refuses and local clients get ECONNREFUSED.
    pub fn link_rules_apply_to_local_clients(cgroup: &TestCgroup) -> Result<()> {
        let topology = Topology::new(2)?;
        let mut config = local_config(&topology, cgroup, Strategy::RoundRobin);
        config.policy.rules.remote_via = Some(vec![LinkKind::Ethernet]);
        let label = |name: &str, kind| (topology.builder(name).client_link().to_owned(), kind);
        config.links = vec![label("b1", LinkKind::Ethernet), label("b2", LinkKind::Wifi)];
        let daemon = Daemon::start(topology.client_ns(), &config)?;
        daemon.wait_for_status("b2 excluded by the link rule", WAIT, |s| {
            Ok(s.exclusion("ssh", "b2")?.is_some())
        })?;
        let served = topology.raw_client().banners(service(), 10)?;
        ensure!(
            served.iter().all(|s| s == "b1"),
            "remote_via ethernet: {served:?}"
        );
        ensure!(
            local(&daemon.status()?, "b1", "connections")? == 10,
            "not all went direct"
        );
        drop(daemon);

        config.policy.rules.min_healthy_builders = Some(2);
        let daemon = Daemon::start(topology.client_ns(), &config)?;
        daemon.wait_for_status("the service refusing", WAIT, |s| {
            Ok(s.refusal("ssh")?.is_some())
        })?;
        let attempt = topology.raw_client().connect(service());
        ensure!(
            matches!(attempt, ConnectAttempt::Refused),
            "too few eligible builders: {attempt:?}, expected ECONNREFUSED"
        );
        Ok(())
    }

    /// With `max_rtt_ms = 100` and nothing but local clients, an upload through the
    /// local path over a throttled link to b1 (100 kbit/s, so every queued packet adds
    /// 120 ms) leaves a kernel RTT sample far above the limit when it closes: b1 is
    /// excluded for the kernel's RTT (the probes, a minute apart, still remember the
    /// fast path) and the next session goes to b2, although priority prefers b1.
    pub fn max_rtt_ms_follows_the_rtt_of_local_connections(cgroup: &TestCgroup) -> Result<()> {
        let topology = Topology::new(2)?;
        let mut config = local_config(&topology, cgroup, Strategy::Priority);
        config.services[0].policy = Some(LinkRules {
            max_rtt_ms: Some(100),
            ..LinkRules::default()
        });
        config.health = Some(HealthConfig {
            interval: Some(Duration::from_secs(60)),
            ..HealthConfig::default()
        });
        let daemon = Daemon::start(topology.client_ns(), &config)?;
        daemon.wait_for_status("both builders eligible after their probes", WAIT, |s| {
            Ok(s.exclusion("ssh", "b1")?.is_none()
                && s.exclusion("ssh", "b2")?.is_none()
                && s.json()["builders"]
                    .as_array()
                    .is_some_and(|b| b.iter().all(|b| b["rtt_ms"].is_number())))
        })?;
        topology.throttle("b1", 100)?;
        let payload = RandomFile::create(48 << 10)?;
        let ssh = topology.ssh_client()?;
        let served = ssh.upload_checked(
            service(),
            payload.path(),
            payload.sha256(),
            Duration::from_secs(120),
        )?;
        ensure!(
            served == "b1",
            "the upload went to {served}, not the slow b1"
        );
        let status = daemon.wait_for_status("b1 excluded for its kernel RTT", WAIT, |s| {
            Ok(s.exclusion("ssh", "b1")?
                .is_some_and(|e| e.starts_with("kernel round-trip time")))
        })?;
        let b1 = &status.json()["builders"][index(&status, "b1")?];
        ensure!(
            b1["kernel_rtt_ms"].as_f64().is_some_and(|r| r > 100.0)
                && b1["local"]["rtt_ms"].as_f64().is_some_and(|r| r > 100.0),
            "b1 excluded, but its RTTs: {b1}"
        );
        let next = ssh.served_by(service())?;
        ensure!(next == "b2", "the next session went to {next}, not b2");
        expect_went_direct(&daemon, 2)?;
        Ok(())
    }

    /// b1 drops every reply (no RST): the client whose connect went there gives up
    /// after its own timeout, which the kernel counts as a failed connect (SYN_SENT to
    /// CLOSE); every later connect goes to b2.
    pub fn a_black_holed_builder_costs_one_timed_out_connect(cgroup: &TestCgroup) -> Result<()> {
        let topology = Topology::new(2)?;
        let config = local_config(&topology, cgroup, Strategy::RoundRobin);
        let daemon = Daemon::start(topology.client_ns(), &config)?;
        let since = SystemTime::now();
        topology.builder("b1").black_hole()?;
        let raw = topology
            .raw_client()
            .with_connect_timeout(Duration::from_secs(2));
        let mut timed_out = 0;
        let mut served = Vec::new();
        for _ in 0..10 {
            match raw.connect(service()) {
                ConnectAttempt::Accepted(stream) => served.push(
                    yensid_tests::SshConnection::handshake(stream)?
                        .served_by()
                        .to_owned(),
                ),
                ConnectAttempt::TimedOut => timed_out += 1,
                other => anyhow::bail!("connect: {other:?}"),
            }
        }
        ensure!(
            timed_out <= 1,
            "{timed_out} connects timed out; served {served:?}"
        );
        ensure!(served.iter().all(|s| s == "b2"), "served {served:?}");
        daemon.wait_for_log(&["builder unhealthy", "b1"], since, WAIT)?;
        topology.builder("b1").heal()?;
        Ok(())
    }
}
