//! `when_full = "queue"`: a connection that finds every builder at its
//! `max_connections` is held (no byte sent) until a slot frees, handed on fairly
//! between client addresses, refused at `queue_timeout`; `refuse` stays the default.
//!
//! Two builders with `max_connections = 1` each: two held sessions fill the pool.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use yensid_tests::cli;
use yensid_tests::tcp::{CLIENT_IDENTIFICATION, ConnectAttempt};
use yensid_tests::wait::wait_until;
use yensid_tests::{
    Daemon, DaemonConfig, Dataplane, Derivation, Gate, Launch, NixClient, Site, StoreScheme,
    Strategy, Topology, WhenFull, remote_builder, service,
};

/// Only against hangs.
const WAIT: Duration = Duration::from_secs(60);
const BUILD_TIMEOUT: Duration = Duration::from_secs(300);
const SERVED: &str = "queued connection handed to a builder";

macro_rules! privileged_tests {
    ($($test:ident),+ $(,)?) => {
        $(
            #[test]
            fn $test() -> Result<()> {
                if !yensid_tests::privileged_or_skip(concat!(module_path!(), "::", stringify!($test))) {
                    return Ok(());
                }
                super::$test()
            }
        )+
    };
}

mod kernel {
    use super::Result;
    privileged_tests!(
        six_thin_clients_all_build_through_a_full_pool_ssh_ng,
        six_thin_clients_all_build_through_a_full_pool_ssh,
        queue_limit_refuses_the_rest,
        a_client_with_few_connections_is_not_served_last,
        queue_timeout_refuses_and_a_client_that_leaves_is_dropped,
        refuse_stays_the_default,
        without_bpf_a_full_pool_queues_too,
    );
}

/// Both builders at `max_connections = 1`, the service queueing.
fn queue_config(topology: &Topology, timeout: Option<Duration>) -> DaemonConfig {
    let mut config =
        DaemonConfig::for_topology(topology, Dataplane::Kernel, Strategy::LeastConnections);
    for b in &mut config.builders {
        b.max_connections = Some(1);
    }
    config.service_mut().when_full = Some(WhenFull::Queue {
        timeout,
        limit: None,
    });
    config
}

/// The service's `queue` object of `yensid status --json`.
fn queue_status(daemon: &Daemon) -> Result<Value> {
    let status = daemon.status()?;
    let service = cli::service(status.json(), "ssh")?;
    Ok(cli::field(service, "queue")?.clone())
}

fn wait_for_queue(
    daemon: &Daemon,
    what: &str,
    mut condition: impl FnMut(&Value) -> Result<bool>,
) -> Result<Value> {
    let mut last = Value::Null;
    wait_until(what, WAIT, || {
        last = queue_status(daemon)?;
        condition(&last)
    })
    .with_context(|| format!("last queue status: {last}"))?;
    Ok(last)
}

/// A raw client from `source` that connects to the service and sends its SSH
/// identification line, then waits (as an SSH client does for the server's line).
fn connect_and_identify(topology: &Topology, source: IpAddr) -> Result<TcpStream> {
    let mut stream = topology
        .raw_client()
        .from_source(source)
        .connect(service())
        .accepted()?;
    stream.write_all(CLIENT_IDENTIFICATION)?;
    Ok(stream)
}

fn six_thin_clients_all_build_through_a_full_pool_ssh_ng() -> Result<()> {
    six_thin_clients_all_build_through_a_full_pool(StoreScheme::SshNg)
}

fn six_thin_clients_all_build_through_a_full_pool_ssh() -> Result<()> {
    six_thin_clients_all_build_through_a_full_pool(StoreScheme::Ssh)
}

/// Six `nix-build --max-jobs 0` runs (thin clients: no local builds) against a pool of
/// two one-connection builders. Every build holds its connection until the test opens
/// the gate, so two build and four wait in the queue; then all six succeed, each on a
/// builder, the four through the queue.
fn six_thin_clients_all_build_through_a_full_pool(scheme: StoreScheme) -> Result<()> {
    const RUNS: usize = 6;
    let topology = Topology::with_stores(2)?;
    let config = queue_config(&topology, Some(Duration::from_secs(240)));
    let daemon = Daemon::start(topology.client_ns(), &config)?;
    let known_hosts = cli::known_hosts(daemon.config_path(), None)?;
    // A queued connection waits for the server's identification line: ssh's
    // ConnectTimeout bounds that wait, so it must outlast the queue's.
    let nix = NixClient::new(&topology, &known_hosts.stdout)?
        .with_ssh_connect_timeout(Duration::from_secs(250));
    let gate = Gate::new(&topology)?;
    let builders = remote_builder(scheme, service().ip(), 1);
    let batches: Vec<Vec<Derivation>> =
        (0..RUNS).map(|_| vec![Derivation::behind(&gate)]).collect();
    let running = batches
        .iter()
        .map(|batch| nix.spawn(batch, &builders, 0))
        .collect::<Result<Vec<_>>>()?;

    let started = gate.wait_started(2, WAIT)?;
    wait_for_queue(&daemon, "the other four runs to wait in the queue", |q| {
        Ok(cli::u64_at(q, "waiting")? == (RUNS - 2) as u64)
    })?;
    ensure!(
        started.len() == 2,
        "with two one-connection builders, {} builds started",
        started.len()
    );
    gate.open()?;
    let runs = running
        .into_iter()
        .map(|run| run.wait(BUILD_TIMEOUT))
        .collect::<Result<Vec<_>>>()?;
    for run in &runs {
        run.ensure_built()?;
        ensure!(
            matches!(run.sites()[..], [Some(Site::Builder(_))]),
            "a thin client's build ran at {:?}:\n{}",
            run.sites(),
            run.stderr
        );
    }
    let q = wait_for_queue(&daemon, "the queue to be empty", |q| {
        Ok(cli::u64_at(q, "waiting")? == 0)
    })?;
    let (queued, served) = (cli::u64_at(&q, "queued")?, cli::u64_at(&q, "served")?);
    ensure!(
        queued >= (RUNS - 2) as u64 && served == queued,
        "queued {queued}, served {served}: {q}"
    );
    for key in ["timed_out", "refused_full", "refused", "left"] {
        ensure!(cli::u64_at(&q, key)? == 0, "{key} is not 0: {q}");
    }
    ensure!(
        cli::u64_at(cli::field(&q, "wait_seconds")?, "count")? == served,
        "every served connection's wait is in the histogram: {q}"
    );
    // Besides the SYNs the kernel steered to the queue, a client the kernel steered to
    // a builder whose slot a queued connection took during its handoff is queued too.
    let kernel_queued = cli::opt_u64_at(&q, "kernel_queued")?.context("kernel counter")?;
    ensure!(
        (1..=queued).contains(&kernel_queued),
        "the kernel steered {kernel_queued} SYNs to the queue: {q}"
    );
    Ok(())
}

/// Client A queues 10 connections, then client B (another address) 2. As slots free
/// one by one, the daemon serves the clients in turn: B's connections are not the last
/// two served, as they would be in plain arrival order.
fn a_client_with_few_connections_is_not_served_last() -> Result<()> {
    let topology = Topology::new(2)?;
    let config = queue_config(&topology, Some(Duration::from_secs(300)));
    let daemon = Daemon::start(topology.client_ns(), &config)?;
    let raw = topology.raw_client();
    let occupiers = [raw.open_ssh(service())?, raw.open_ssh(service())?];

    let a = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 10));
    let b = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 11));
    let mut waiting: HashMap<SocketAddr, TcpStream> = HashMap::new();
    for (client, count, total) in [(a, 10, 10), (b, 2, 12)] {
        for _ in 0..count {
            let stream = connect_and_identify(&topology, client)?;
            waiting.insert(stream.local_addr()?, stream);
        }
        wait_for_queue(&daemon, &format!("{total} connections queued"), |q| {
            Ok(cli::u64_at(q, "waiting")? == total)
        })?;
    }

    let since = SystemTime::now() - Duration::from_secs(1);
    for occupier in occupiers {
        occupier.close()?;
    }
    let mut order = Vec::new();
    while order.len() < 12 {
        let mut lines = Vec::new();
        wait_until(
            &format!("queued connection {} to be served", order.len() + 1),
            WAIT,
            || {
                lines = daemon
                    .log_since(since)
                    .into_iter()
                    .filter(|l| l.text.contains(SERVED))
                    .collect();
                Ok(lines.len() > order.len())
            },
        )?;
        for line in &lines[order.len()..] {
            let peer: SocketAddr = line
                .text
                .split_whitespace()
                .find_map(|w| w.strip_prefix("peer="))
                .with_context(|| format!("no peer in {:?}", line.text))?
                .parse()?;
            // Leaving frees its slot for the next one.
            let stream = waiting
                .remove(&peer)
                .with_context(|| format!("{peer} served twice or unknown"))?;
            drop(stream);
            order.push(peer.ip());
        }
    }
    let b_positions: Vec<usize> = order
        .iter()
        .enumerate()
        .filter(|(_, ip)| **ip == b)
        .map(|(i, _)| i)
        .collect();
    ensure!(
        b_positions == [1, 3],
        "A (10 queued first) and B (2) should alternate from the start; served in order {order:?}"
    );
    let q = wait_for_queue(&daemon, "every queued connection served", |q| {
        Ok(cli::u64_at(q, "waiting")? == 0)
    })?;
    ensure!(cli::u64_at(&q, "served")? == 12, "{q}");
    Ok(())
}

/// A queued connection that waits `queue_timeout` is refused with RST, having received
/// no byte; one whose client leaves while queued is dropped. Both are counted.
fn queue_timeout_refuses_and_a_client_that_leaves_is_dropped() -> Result<()> {
    let topology = Topology::new(2)?;
    let config = queue_config(&topology, Some(Duration::from_secs(2)));
    let mut daemon = Daemon::start(topology.client_ns(), &config)?;
    let metrics_addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9422);
    cli::restart_with_extra_toml(
        &mut daemon,
        &format!("[metrics]\nlisten = \"{metrics_addr}\""),
    )?;
    let raw = topology.raw_client();
    let _occupiers = [raw.open_ssh(service())?, raw.open_ssh(service())?];
    let client = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 10));

    let leaving = connect_and_identify(&topology, client)?;
    wait_for_queue(&daemon, "one connection queued", |q| {
        Ok(cli::u64_at(q, "waiting")? == 1)
    })?;
    drop(leaving);
    wait_for_queue(&daemon, "the departure counted", |q| {
        Ok(cli::u64_at(q, "left")? == 1 && cli::u64_at(q, "waiting")? == 0)
    })?;

    let mut waiting = connect_and_identify(&topology, client)?;
    waiting.set_read_timeout(Some(WAIT))?;
    let mut buf = [0u8; 64];
    match waiting.read(&mut buf) {
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Ok(0) => bail!("the queued connection was closed without RST"),
        Ok(n) => bail!(
            "the queued connection received {:?}",
            String::from_utf8_lossy(&buf[..n])
        ),
        Err(e) => bail!("the queued connection ended with {e} instead of RST"),
    }
    let q = wait_for_queue(&daemon, "the timeout counted", |q| {
        Ok(cli::u64_at(q, "timed_out")? == 1)
    })?;
    ensure!(
        cli::u64_at(&q, "waiting")? == 0 && cli::u64_at(&q, "served")? == 0,
        "{q}"
    );
    daemon.wait_for_log(
        &["queue_timeout reached: queued connection refused"],
        SystemTime::now() - Duration::from_secs(60),
        WAIT,
    )?;
    let metrics = cli::Metrics::parse(&cli::http_get(
        topology.client_ns(),
        metrics_addr,
        "/metrics",
    )?)?;
    let svc = [("service", "ssh")];
    for (name, expected) in [
        ("yensid_queue_length", 0.0),
        ("yensid_queued_total", 2.0),
        ("yensid_queue_timed_out_total", 1.0),
        ("yensid_queue_left_total", 1.0),
        ("yensid_queue_served_total", 0.0),
        ("yensid_queue_wait_seconds_count", 0.0),
    ] {
        let value = metrics.value(name, &svc)?;
        ensure!(value == expected, "{name} is {value}, not {expected}");
    }
    ensure!(
        metrics
            .types
            .get("yensid_queue_wait_seconds")
            .map(String::as_str)
            == Some("histogram"),
        "the wait times are a histogram:\n{}",
        metrics.text
    );
    Ok(())
}

/// With `queue_limit = 2`, a third connection that finds the pool full is refused with
/// RST (after the kernel steered it to the queue) and counted; the two queued wait on.
fn queue_limit_refuses_the_rest() -> Result<()> {
    let topology = Topology::new(2)?;
    let mut config = queue_config(&topology, Some(Duration::from_secs(300)));
    config.service_mut().when_full = Some(WhenFull::Queue {
        timeout: Some(Duration::from_secs(300)),
        limit: Some(2),
    });
    let daemon = Daemon::start(topology.client_ns(), &config)?;
    let raw = topology.raw_client();
    let _occupiers = [raw.open_ssh(service())?, raw.open_ssh(service())?];
    let client = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 10));
    let _queued = [
        connect_and_identify(&topology, client)?,
        connect_and_identify(&topology, client)?,
    ];
    wait_for_queue(&daemon, "two connections queued", |q| {
        Ok(cli::u64_at(q, "waiting")? == 2)
    })?;
    // Not identifying itself: the RST may come before anything could be written, even
    // before the connect returned.
    match topology.raw_client().from_source(client).connect(service()) {
        ConnectAttempt::Accepted(mut third) => {
            third.set_read_timeout(Some(WAIT))?;
            let mut buf = [0u8; 64];
            match third.read(&mut buf) {
                Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
                other => bail!("the connection beyond queue_limit ended with {other:?}, not RST"),
            }
        }
        ConnectAttempt::Failed(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => bail!("the connection beyond queue_limit ended with {other:?}"),
    }
    let q = wait_for_queue(&daemon, "the refusal counted", |q| {
        Ok(cli::u64_at(q, "refused_full")? == 1)
    })?;
    ensure!(
        cli::u64_at(&q, "waiting")? == 2 && cli::u64_at(&q, "queued")? == 2,
        "{q}"
    );
    ensure!(
        cli::opt_u64_at(&q, "kernel_queued")? == Some(3),
        "the kernel steered all three to the queue (not refused at SYN): {q}"
    );
    Ok(())
}

/// Without `when_full` a full pool refuses new connections at once (RST), as before,
/// and status shows no queue.
fn refuse_stays_the_default() -> Result<()> {
    let topology = Topology::new(2)?;
    let mut config = queue_config(&topology, None);
    config.service_mut().when_full = None;
    let daemon = Daemon::start(topology.client_ns(), &config)?;
    let raw = topology.raw_client();
    let _occupiers = [raw.open_ssh(service())?, raw.open_ssh(service())?];
    daemon.wait_for_status("both builders full", WAIT, |s| {
        Ok(s.active("b1")? == 1 && s.active("b2")? == 1)
    })?;
    let attempt = raw.connect(service());
    ensure!(
        attempt.is_refused(),
        "a full pool answered {attempt:?} instead of RST"
    );
    ensure!(
        queue_status(&daemon)?.is_null(),
        "a refusing service has no queue"
    );
    Ok(())
}

/// Without BPF (the daemon lacks CAP_BPF, CAP_SYS_ADMIN and CAP_PERFMON) the daemon binds
/// the service address itself and chooses in userspace: a connection that finds both
/// builders full is held there too, and when a slot frees it reaches that builder.
fn without_bpf_a_full_pool_queues_too() -> Result<()> {
    const WITHOUT_BPF: &str = "-bpf,-sys_admin,-perfmon";
    let topology = Topology::new(2)?;
    let config = queue_config(&topology, Some(Duration::from_secs(300)));
    let launch = Launch {
        outer: Vec::new(),
        inner: vec![
            "setpriv".to_owned(),
            format!("--inh-caps={WITHOUT_BPF}"),
            format!("--bounding-set={WITHOUT_BPF}"),
            "--".to_owned(),
        ],
    };
    let daemon = Daemon::start_wrapped(topology.client_ns(), &config, launch)?;
    daemon.wait_for_log(
        &["BPF UNAVAILABLE: falling back to userspace"],
        SystemTime::UNIX_EPOCH,
        WAIT,
    )?;
    let raw = topology.raw_client();
    let mut occupiers = vec![raw.open_ssh(service())?, raw.open_ssh(service())?];
    let mut queued = connect_and_identify(&topology, IpAddr::V4(Ipv4Addr::new(127, 0, 0, 10)))?;
    let q = wait_for_queue(&daemon, "one connection queued", |q| {
        Ok(cli::u64_at(q, "waiting")? == 1)
    })?;
    ensure!(
        cli::opt_u64_at(&q, "kernel_queued")?.is_none(),
        "no kernel counter without BPF: {q}"
    );
    let freed = occupiers.pop().context("two occupiers")?;
    let builder = freed.served_by().to_owned();
    freed.close()?;
    queued.set_read_timeout(Some(WAIT))?;
    let mut banner = Vec::new();
    let mut byte = [0u8; 1];
    while !banner.ends_with(b"\n") && banner.len() < 256 {
        let n = queued
            .read(&mut byte)
            .context("the queued client's banner")?;
        ensure!(
            n == 1,
            "closed after {:?}",
            String::from_utf8_lossy(&banner)
        );
        banner.push(byte[0]);
    }
    let banner = String::from_utf8_lossy(&banner);
    ensure!(
        banner.starts_with("SSH-2.0-") && banner.trim_end().ends_with(&builder),
        "the queued client got {banner:?}, not the banner of {builder}, whose slot freed"
    );
    let q = queue_status(&daemon)?;
    ensure!(cli::u64_at(&q, "served")? == 1, "{q}");
    Ok(())
}
