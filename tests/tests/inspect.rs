//! Seeing what yensid does (issue 5): `yensid status --json`, `maps --json` and
//! `explain` checked against states the tests create (healthy, one builder down,
//! draining, full, local override, daemon killed, daemon stopped); the counters checked
//! against connections the tests make; `known-hosts` output used by a real `ssh` with
//! `StrictHostKeyChecking yes`; and the Prometheus endpoint scraped with a real HTTP
//! client and parsed.
//!
//! Everything goes through the CLI a user runs (the same `yensid` binary, pointed at the
//! instance's config file); nothing reads the daemon's insides.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use yensid_tests::cli::{self, Metrics, Verdict};
use yensid_tests::wait::wait_until;
use yensid_tests::{
    Daemon, DaemonConfig, Dataplane, HealthConfig, LiveSession, PolicyMode, RandomFile, SshClient,
    Strategy, Topology, service,
};

common::dataplane_tests!(
    status_maps_and_explain_follow_health_and_drain,
    full_pool_is_shown_and_explained,
    local_override_is_shown_explained_and_counted,
    killed_and_stopped_daemon_are_reported,
    counters_add_up_after_served_connections,
);

const NOBODY: u32 = 65534;
const NOGROUP: u32 = 65534;
const USERS: u32 = 100;

/// Only against hangs: every state change here takes a second or two at most.
const WAIT: Duration = Duration::from_secs(30);
/// The one service every test's config has.
const SERVICE: &str = "ssh";

/// Probes every 200 ms, so a killed or returning builder is noticed within a second.
fn fast_health() -> HealthConfig {
    HealthConfig {
        interval: Some(Duration::from_millis(200)),
        max_interval: Some(Duration::from_secs(1)),
        ..HealthConfig::default()
    }
}

fn state(doc: &Value, builder: &str) -> Result<String> {
    cli::str_at(cli::builder(doc, builder)?, "state")
}

fn builder_u64(doc: &Value, builder: &str, key: &str) -> Result<u64> {
    cli::u64_at(cli::builder(doc, builder)?, key)
}

fn service_u64(doc: &Value, key: &str) -> Result<u64> {
    cli::u64_at(cli::service(doc, SERVICE)?, key)
}

fn refusal(doc: &Value) -> Result<Option<String>> {
    cli::opt_str_at(cli::service(doc, SERVICE)?, "refusal")
}

fn exclusion(doc: &Value, builder: &str) -> Result<Option<String>> {
    let members = cli::service(doc, SERVICE)?
        .get("members")
        .and_then(Value::as_array)
        .with_context(|| format!("no members in {doc}"))?;
    let member = members
        .iter()
        .find(|m| m.get("builder").and_then(Value::as_str) == Some(builder))
        .with_context(|| format!("{builder} is no member of {SERVICE}: {doc}"))?;
    cli::opt_str_at(member, "excluded")
}

/// Every builder's state, by name.
fn states(doc: &Value) -> Result<BTreeMap<String, String>> {
    doc.get("builders")
        .and_then(Value::as_array)
        .with_context(|| format!("no builders in {doc}"))?
        .iter()
        .map(|b| Ok((cli::str_at(b, "name")?, cli::str_at(b, "state")?)))
        .collect()
}

fn expect_states(doc: &Value, expected: &[(&str, &str)]) -> Result<()> {
    let expected: BTreeMap<String, String> = expected
        .iter()
        .map(|(b, s)| ((*b).to_owned(), (*s).to_owned()))
        .collect();
    let actual = states(doc)?;
    ensure!(
        actual == expected,
        "builder states {actual:?}, expected {expected:?}: {doc}"
    );
    Ok(())
}

/// The `BUILDERS` index of each builder of the (only) service, by name: positions
/// follow the config's builder order, b1, b2, ...
fn builder_indices(maps: &Value, topology: &Topology) -> Result<BTreeMap<String, u64>> {
    let indices = cli::backend_builders(maps, 0)?;
    ensure!(
        indices.len() == topology.builders().len(),
        "the service has {} backends in the maps, the config {} builders: {maps}",
        indices.len(),
        topology.builders().len()
    );
    Ok(topology
        .builders()
        .iter()
        .map(|b| b.name().to_owned())
        .zip(indices)
        .collect())
}

/// `BUILDERS[index].eligible` of each builder, by name, as the kernel sees it.
fn kernel_eligibility(maps: &Value, topology: &Topology) -> Result<BTreeMap<String, u64>> {
    builder_indices(maps, topology)?
        .into_iter()
        .map(|(name, index)| {
            let entry = cli::map_entry(maps, "builders", &Value::from(index))?;
            Ok((name, cli::u64_at(entry, "eligible")?))
        })
        .collect()
}

fn eligibility(expected: &[(&str, u64)]) -> BTreeMap<String, u64> {
    expected
        .iter()
        .map(|(b, e)| ((*b).to_owned(), *e))
        .collect()
}

/// Waits until the kernel's eligibility flags are `expected`, and returns that dump.
fn wait_for_eligibility(
    config: &Path,
    topology: &Topology,
    expected: &[(&str, u64)],
) -> Result<Value> {
    let expected = eligibility(expected);
    cli::wait_for_maps(
        config,
        &format!("the kernel's builder eligibility to be {expected:?}"),
        WAIT,
        |maps| Ok(kernel_eligibility(maps, topology)? == expected),
    )
}

/// The counters of service 0 in a `maps --json` dump.
fn kernel_counters(maps: &Value) -> Result<&Value> {
    cli::map_entry(maps, "service_counters", &Value::from(0))
}

fn expect_verdict_builder(explanation: &cli::Explanation, builder: &str) -> Result<()> {
    match explanation.verdict()? {
        Verdict::Builder { name, .. } if name == builder => Ok(()),
        other => bail!(
            "explain says {other:?}, expected {builder}:\n{}",
            explanation.text()
        ),
    }
}

fn expect_verdict_refused(explanation: &cli::Explanation, because: &str) -> Result<()> {
    match explanation.verdict()? {
        Verdict::Refused { why } if why.contains(because) => Ok(()),
        other => bail!(
            "explain says {other:?}, expected a refusal because {because:?}:\n{}",
            explanation.text()
        ),
    }
}

/// A connection to the service: the builder that answered it (the connection is
/// closed after the banner).
fn served_by(topology: &Topology) -> Result<String> {
    topology.raw_client().banner(service())
}

/// One builder healthy, then down (sshd killed), back, drained and undrained: after each
/// change `status` shows the state and why, `maps` shows the kernel's eligibility flag
/// and `explain` excludes the builder and names the one the next connection gets, which
/// is the one that answers.
fn status_maps_and_explain_follow_health_and_drain(dataplane: Dataplane) -> Result<()> {
    let topology = Topology::new(2)?;
    let mut config = DaemonConfig::for_topology(&topology, dataplane, Strategy::LeastConnections);
    config.health = Some(fast_health());
    let daemon = Daemon::start(topology.client_ns(), &config)?;
    let file = daemon.config_path();

    // All healthy, with the probes' RTT measured.
    let doc = cli::wait_for_status(file, "both builders healthy with a probe RTT", WAIT, |d| {
        Ok(["b1", "b2"].iter().all(|b| {
            state(d, b).is_ok_and(|s| s == "healthy")
                && cli::builder(d, b).is_ok_and(|b| b["rtt_ms"].as_f64().is_some_and(|r| r > 0.0))
        }))
    })?;
    ensure!(
        doc["pid"].as_u64() == Some(u64::from(daemon.pid())),
        "pid {} is not the daemon's ({}): {doc}",
        doc["pid"],
        daemon.pid()
    );
    ensure!(
        doc["dataplane"] == dataplane.as_str() && doc["bpf"] == true,
        "dataplane/bpf: {doc}"
    );
    let mode = &doc["mode"];
    ensure!(
        mode["in_force"] == "auto"
            && mode["source"] == "config"
            && cli::is_null_at(mode, "until")?
            && cli::is_null_at(mode, "reason")?,
        "mode of a config without [policy]: {mode}"
    );
    let svc = cli::service(&doc, SERVICE)?;
    ensure!(
        svc["listen"] == serde_json::json!(["127.0.0.22/32"])
            && svc["port"] == 22
            && svc["strategy"] == "least-connections",
        "the service as configured: {svc}"
    );
    ensure!(refusal(&doc)?.is_none(), "refusal while healthy: {doc}");
    for builder in topology.builders() {
        let name = builder.name();
        let b = cli::builder(&doc, name)?;
        ensure!(
            exclusion(&doc, name)?.is_none(),
            "{name} excluded while healthy"
        );
        ensure!(
            b["address"] == builder.ssh_addr().to_string()
                && cli::is_null_at(b, "reason")?
                && b["weight"] == 1
                && cli::is_null_at(b, "max_connections")?
                && b["active"] == 0
                && b["failed_over"] == 0,
            "{name} as configured and idle: {b}"
        );
        let egress = &b["egress"];
        ensure!(
            egress["name"] == builder.client_link()
                && egress["kind"] == "virtual"
                && egress["up"] == true,
            "{name}'s egress is its veth {}: {egress}",
            builder.client_link()
        );
    }
    let maps = cli::maps_json(file)?;
    ensure!(
        maps["dispatch_attached"] == true
            && maps["bindings"] == serde_json::json!([["127.0.0.22/32 port 22", 0]]),
        "claims in the maps: {maps}"
    );
    let svc_state = cli::map_entry(&maps, "services", &Value::from(0))?;
    ensure!(
        svc_state["accept"] == 1 && svc_state["backends"] == 2,
        "service 0 in the kernel: {svc_state}"
    );
    ensure!(
        kernel_eligibility(&maps, &topology)? == eligibility(&[("b1", 1), ("b2", 1)]),
        "kernel eligibility while healthy: {maps}"
    );
    let explanation = cli::explain(file, Some(SERVICE), None)?;
    ensure!(
        explanation.lines[0] == "service ssh (127.0.0.22/32 port 22, strategy least-connections)"
            && explanation.lines[1] == "mode auto (from the configuration)",
        "explain's header:\n{}",
        explanation.text()
    );
    for name in ["b1", "b2"] {
        let line = explanation.member_line(name)?;
        ensure!(
            line.starts_with(&format!("{name}: eligible, 0 open connection(s), weight 1")),
            "explain on healthy {name}: {line:?}"
        );
    }
    match explanation.verdict()? {
        Verdict::Builder { name, .. } if name == "b1" || name == "b2" => {}
        other => bail!("explain while healthy: {other:?}"),
    }
    let unknown = cli::yensid(file, &["explain", "--service", "nope"])?;
    ensure!(
        !unknown.success && unknown.stderr.contains("nope"),
        "explain of an unknown service: {unknown:?}"
    );

    // b1's sshd dies: unhealthy, with the probe's reason. Health is shown at once, the
    // exclusion once the plan that follows is made: both are waited for.
    topology.builder("b1").sshd().kill()?;
    let doc = cli::wait_for_status(file, "b1 unhealthy and excluded", WAIT, |d| {
        Ok(state(d, "b1")? == "unhealthy" && exclusion(d, "b1")?.is_some())
    })?;
    expect_states(&doc, &[("b1", "unhealthy"), ("b2", "healthy")])?;
    let reason = cli::opt_str_at(cli::builder(&doc, "b1")?, "reason")?.unwrap_or_default();
    ensure!(
        reason.contains("refused"),
        "b1's reason does not say its connections are refused: {reason:?}"
    );
    let excluded = exclusion(&doc, "b1")?.unwrap_or_default();
    ensure!(
        excluded.starts_with("unhealthy") && excluded.contains(&reason),
        "b1's exclusion {excluded:?} does not say unhealthy ({reason})"
    );
    ensure!(exclusion(&doc, "b2")?.is_none() && refusal(&doc)?.is_none());
    wait_for_eligibility(file, &topology, &[("b1", 0), ("b2", 1)])?;
    let explanation = cli::explain(file, None, None)?;
    let line = explanation.member_line("b1")?;
    ensure!(
        line.starts_with("b1: excluded: unhealthy"),
        "explain on dead b1: {line:?}"
    );
    expect_verdict_builder(&explanation, "b2")?;
    for _ in 0..3 {
        let answer = served_by(&topology)?;
        ensure!(answer == "b2", "b1 is down, yet {answer} answered");
    }

    // b1 back.
    topology.builder("b1").sshd().restart()?;
    let doc = cli::wait_for_status(file, "b1 healthy again and no longer excluded", WAIT, |d| {
        Ok(state(d, "b1")? == "healthy" && exclusion(d, "b1")?.is_none())
    })?;
    ensure!(
        cli::is_null_at(cli::builder(&doc, "b1")?, "reason")?,
        "{doc}"
    );
    wait_for_eligibility(file, &topology, &[("b1", 1), ("b2", 1)])?;

    // b2 drained.
    daemon.drain("b2")?;
    let doc = cli::wait_for_status(file, "b2 draining and excluded", WAIT, |d| {
        Ok(state(d, "b2")? == "draining" && exclusion(d, "b2")?.is_some())
    })?;
    expect_states(&doc, &[("b1", "healthy"), ("b2", "draining")])?;
    ensure!(
        exclusion(&doc, "b2")?.as_deref() == Some("draining"),
        "b2's exclusion while drained: {doc}"
    );
    wait_for_eligibility(file, &topology, &[("b1", 1), ("b2", 0)])?;
    let explanation = cli::explain(file, None, None)?;
    ensure!(
        explanation.member_line("b2")? == "b2: excluded: draining",
        "explain on drained b2:\n{}",
        explanation.text()
    );
    expect_verdict_builder(&explanation, "b1")?;
    for _ in 0..3 {
        let answer = served_by(&topology)?;
        ensure!(answer == "b1", "b2 is drained, yet {answer} answered");
    }

    daemon.undrain("b2")?;
    cli::wait_for_status(file, "b2 undrained and no longer excluded", WAIT, |d| {
        Ok(state(d, "b2")? == "healthy" && exclusion(d, "b2")?.is_none())
    })?;
    wait_for_eligibility(file, &topology, &[("b1", 1), ("b2", 1)])?;
    daemon.expect_data_path(dataplane)?;
    Ok(())
}

/// Both builders at max_connections with held connections: both `full`, the kernel's
/// counts at the limit, `explain` refuses because every eligible builder is at
/// max_connections, and the refused attempts are counted as "no builder". Once a slot
/// frees, its builder is healthy again and explain names it.
fn full_pool_is_shown_and_explained(dataplane: Dataplane) -> Result<()> {
    const MAX: u64 = 2;
    const REFUSED: u64 = 3;
    let topology = Topology::new(2)?;
    let mut config = DaemonConfig::for_topology(&topology, dataplane, Strategy::LeastConnections);
    for builder in &mut config.builders {
        builder.max_connections = Some(MAX as u32);
    }
    let daemon = Daemon::start(topology.client_ns(), &config)?;
    let file = daemon.config_path();
    let raw = topology.raw_client();

    let before = cli::status_json(file)?;
    expect_states(&before, &[("b1", "healthy"), ("b2", "healthy")])?;
    let mut held = (0..2 * MAX)
        .map(|_| raw.open_ssh(service()))
        .collect::<Result<Vec<_>>>()?;
    let doc = cli::wait_for_status(file, "both builders full", WAIT, |d| {
        Ok(states(d)?.values().all(|s| s == "full"))
    })?;
    for name in ["b1", "b2"] {
        let b = cli::builder(&doc, name)?;
        ensure!(
            b["active"] == MAX && b["max_connections"] == MAX && cli::is_null_at(b, "reason")?,
            "{name} full: {b}"
        );
        // Full is no exclusion: the builder is eligible, it just has no free slot.
        ensure!(exclusion(&doc, name)?.is_none(), "{name} excluded: {doc}");
    }
    let maps = cli::maps_json(file)?;
    for (name, index) in builder_indices(&maps, &topology)? {
        let (_, _, active) = cli::builder_connections(&maps, index)?;
        ensure!(
            active == MAX,
            "the kernel counts {active} active connections on {name}, expected {MAX}: {maps}"
        );
        let state = cli::map_entry(&maps, "builders", &Value::from(index))?;
        ensure!(
            state["max_connections"] == MAX && state["eligible"] == 1,
            "{name} in the kernel: {state}"
        );
    }
    let explanation = cli::explain(file, None, None)?;
    expect_verdict_refused(&explanation, "every eligible builder is at max_connections")?;
    for name in ["b1", "b2"] {
        let line = explanation.member_line(name)?;
        ensure!(
            line.starts_with(&format!("{name}: eligible, {MAX} open connection(s)")),
            "explain on full {name}: {line:?}"
        );
    }

    let refused_before = service_u64(&doc, "refused_no_builder")?;
    let dispatched_before = service_u64(&doc, "dispatched")?;
    for _ in 0..REFUSED {
        let attempt = raw.connect(service());
        ensure!(attempt.is_refused(), "full pool: {attempt:?}");
    }
    let doc = cli::status_json(file)?;
    let refused = service_u64(&doc, "refused_no_builder")? - refused_before;
    ensure!(
        refused == REFUSED && service_u64(&doc, "dispatched")? == dispatched_before,
        "{REFUSED} refusals of a full pool counted as {refused} refused_no_builder: {doc}"
    );

    let freed = held.pop().expect("held connections");
    let freed_builder = freed.served_by().to_owned();
    freed.close()?;
    let doc = cli::wait_for_status(file, "the freed builder no longer full", WAIT, |d| {
        Ok(state(d, &freed_builder)? == "healthy")
    })?;
    ensure!(
        builder_u64(&doc, &freed_builder, "active")? == MAX - 1,
        "{freed_builder} after one close: {doc}"
    );
    let explanation = cli::explain(file, None, None)?;
    expect_verdict_builder(&explanation, &freed_builder)?;
    let answer = served_by(&topology)?;
    ensure!(
        answer == freed_builder,
        "explain named {freed_builder}, but {answer} answered"
    );
    drop(held);
    daemon.expect_data_path(dataplane)?;
    Ok(())
}

/// CLOCK_BOOTTIME in nanoseconds: the clock of the kernel's override deadline.
fn boot_time_ns() -> Result<u64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which `ts` is.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) } != 0 {
        return Err(std::io::Error::last_os_error()).context("clock_gettime");
    }
    Ok(u64::try_from(ts.tv_sec)? * 1_000_000_000 + u64::try_from(ts.tv_nsec)?)
}

fn unix_now() -> Result<u64> {
    Ok(SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)?
        .as_secs())
}

/// `yensid mode local`: mode local from an override without expiry, the service refuses
/// because the mode is local (status, explain, the kernel's override and accept flag),
/// and refused attempts count as refused_mode_local. With `--for 1h` the expiry shows in
/// status and in the kernel's deadline; `--reset` brings back the config's mode.
fn local_override_is_shown_explained_and_counted(dataplane: Dataplane) -> Result<()> {
    const REFUSED: u64 = 4;
    let topology = Topology::new(2)?;
    let config = DaemonConfig::for_topology(&topology, dataplane, Strategy::RoundRobin);
    let daemon = Daemon::start(topology.client_ns(), &config)?;
    let file = daemon.config_path();
    let raw = topology.raw_client();
    let before = cli::status_json(file)?;

    daemon.set_mode(PolicyMode::Local, None)?;
    let doc = cli::wait_for_status(file, "mode local in force", WAIT, |d| {
        Ok(d["mode"]["in_force"] == "local")
    })?;
    let mode = &doc["mode"];
    ensure!(
        mode["source"] == "override" && cli::is_null_at(mode, "until")?,
        "a local override without --for: {mode}"
    );
    ensure!(
        refusal(&doc)?.as_deref() == Some("mode is local"),
        "refusal in local mode: {doc}"
    );
    // The builders themselves are fine.
    expect_states(&doc, &[("b1", "healthy"), ("b2", "healthy")])?;
    let maps = cli::wait_for_maps(file, "the kernel to refuse", WAIT, |m| {
        Ok(cli::map_entry(m, "services", &Value::from(0))?["accept"] == 0)
    })?;
    ensure!(
        cli::u64_at(&maps, "local_override_until_boot_ns")? == u64::MAX,
        "the kernel's override of `mode local` (until changed): {}",
        maps["local_override_until_boot_ns"]
    );
    let explanation = cli::explain(file, None, None)?;
    ensure!(
        explanation.lines[1].contains("local"),
        "explain's mode line in local mode: {:?}",
        explanation.lines[1]
    );
    expect_verdict_refused(&explanation, "mode is local")?;

    for _ in 0..REFUSED {
        let attempt = raw.connect(service());
        ensure!(attempt.is_refused(), "mode local: {attempt:?}");
    }
    let doc = cli::status_json(file)?;
    let counted =
        service_u64(&doc, "refused_mode_local")? - service_u64(&before, "refused_mode_local")?;
    ensure!(
        counted == REFUSED
            && service_u64(&doc, "dispatched")? == service_u64(&before, "dispatched")?
            && service_u64(&doc, "refused_no_builder")?
                == service_u64(&before, "refused_no_builder")?,
        "{REFUSED} refusals in local mode, counted as {counted} refused_mode_local: {doc}"
    );
    let maps = cli::maps_json(file)?;
    ensure!(
        kernel_counters(&maps)?["refused_mode"] == service_u64(&doc, "refused_mode_local")?,
        "status and maps disagree on refusals: {maps} vs {doc}"
    );

    // With an expiry: in status (epoch seconds) and in the kernel (boot time).
    // Bracketed by clock readings before and after the command (no budget): the
    // expiry is an hour after the moment the daemon took the command, which lies
    // between them.
    let set_at = unix_now()?;
    let boot_at = boot_time_ns()?;
    daemon.set_mode(PolicyMode::Local, Some(Duration::from_secs(3600)))?;
    let set_by = unix_now()?;
    let doc = cli::wait_for_status(file, "an override with an expiry", WAIT, |d| {
        Ok(cli::opt_u64_at(cli::field(d, "mode")?, "until")?.is_some())
    })?;
    let until = cli::u64_at(&doc["mode"], "until")?;
    // The daemon rounds the moment up to the next whole second.
    ensure!(
        (set_at + 3600..=set_by + 3601).contains(&until),
        "`mode local --for 1h` set between {set_at} and {set_by} ends at {until}"
    );
    let maps = cli::wait_for_maps(file, "the kernel's deadline", WAIT, |m| {
        Ok(cli::u64_at(m, "local_override_until_boot_ns")? != u64::MAX)
    })?;
    let boot_by = boot_time_ns()?;
    let deadline = cli::u64_at(&maps, "local_override_until_boot_ns")?;
    let hour = 3_600_000_000_000_u64;
    // The daemon converts whole seconds of wall time: up to a second either way.
    let second = 1_000_000_000_u64;
    ensure!(
        (boot_at + hour - second..=boot_by + hour + second).contains(&deadline),
        "the kernel's deadline {deadline} is not an hour after the command, between \
         {boot_at} and {boot_by} (boot time)"
    );

    daemon.reset_mode()?;
    let doc = cli::wait_for_status(file, "the override gone", WAIT, |d| {
        Ok(d["mode"]["in_force"] == "auto")
    })?;
    ensure!(
        doc["mode"]["source"] == "config" && refusal(&doc)?.is_none(),
        "after --reset: {doc}"
    );
    cli::wait_for_maps(file, "the kernel to accept again", WAIT, |m| {
        Ok(
            cli::map_entry(m, "services", &Value::from(0))?["accept"] == 1
                && m["local_override_until_boot_ns"] == 0,
        )
    })?;
    let explanation = cli::explain(file, None, None)?;
    ensure!(
        matches!(explanation.verdict()?, Verdict::Builder { .. }),
        "explain after --reset:\n{}",
        explanation.text()
    );
    let answer = served_by(&topology)?;
    ensure!(answer == "b1" || answer == "b2", "after --reset: {answer}");
    daemon.expect_data_path(dataplane)?;
    Ok(())
}

/// SIGKILL: `status --json` says the daemon is not running and claimed traffic is
/// refused (which it is), `maps --json` still reads the pins, with the dispatch link
/// attached and the counters as they were. After a restart and a clean stop, status
/// says nothing is claimed and maps has nothing to read.
fn killed_and_stopped_daemon_are_reported(dataplane: Dataplane) -> Result<()> {
    const SERVED: u64 = 3;
    let topology = Topology::new(2)?;
    let config = DaemonConfig::for_topology(&topology, dataplane, Strategy::RoundRobin);
    let mut daemon = Daemon::start(topology.client_ns(), &config)?;
    let file = daemon.config_path().to_owned();
    let raw = topology.raw_client();
    for _ in 0..SERVED {
        served_by(&topology)?;
    }
    let before = cli::wait_for_status(&file, "the connections counted", WAIT, |d| {
        Ok(service_u64(d, "dispatched")? == SERVED)
    })?;
    ensure!(before["pid"].as_u64() == Some(u64::from(daemon.pid())));

    daemon.kill9()?;
    let status = cli::status_not_running(&file)?;
    ensure!(
        status.claimed_traffic == "refused",
        "after kill -9, status says claimed traffic is {:?}: {}",
        status.claimed_traffic,
        status.message
    );
    ensure!(
        status.message.contains("127.0.0.22/32 port 22"),
        "the message does not name the claim: {}",
        status.message
    );
    let attempt = raw.connect(service());
    ensure!(
        attempt.is_refused(),
        "status says refused, the connection was not: {attempt:?}"
    );
    // The pinned maps keep counting: the refusal above is there, named.
    let doc = cli::status_json(&file)?;
    let pinned = &doc["pinned"];
    ensure!(
        pinned["services"][0]["name"] == SERVICE
            && pinned["services"][0]["dispatched"] == SERVED
            && cli::u64_at(&pinned["services"][0], "refused_no_builder")? >= 1
            && pinned["builders"]
                .as_array()
                .is_some_and(|b| b.len() == 2 && b.iter().all(|b| b["eligible"] == true)),
        "the pinned state after kill -9: {doc}"
    );
    let text = cli::yensid_ok(&file, &["status"])?;
    ensure!(
        text.contains("NOT running")
            && text.contains("refused")
            && text.contains("Last state in the pinned maps"),
        "human status after kill -9: {text}"
    );
    let explained = cli::yensid_ok(&file, &["explain"])?;
    ensure!(
        explained.contains("NOT running") && explained.contains("refused"),
        "explain after kill -9: {explained}"
    );
    let maps = cli::maps_json(&file)?;
    ensure!(
        maps["dispatch_attached"] == true
            && maps["bindings"] == serde_json::json!([["127.0.0.22/32 port 22", 0]]),
        "maps after kill -9: {maps}"
    );
    ensure!(
        kernel_counters(&maps)?["dispatched"] == SERVED,
        "the kernel's counters after kill -9: {maps}"
    );
    let text = cli::yensid_ok(&file, &["maps"])?;
    ensure!(
        text.contains("dispatch link attached") && text.contains("127.0.0.22/32 port 22 -> 0"),
        "human maps after kill -9: {text}"
    );

    daemon.restart()?;
    let doc = cli::status_json(&file)?;
    ensure!(
        doc["pid"].as_u64() == Some(u64::from(daemon.pid())),
        "status after the restart: {doc}"
    );
    let answer = served_by(&topology)?;
    ensure!(
        answer == "b1" || answer == "b2",
        "after the restart: {answer}"
    );
    daemon.expect_data_path(dataplane)?;

    let exit = daemon.stop()?;
    ensure!(exit.success(), "clean stop: {exit}");
    let status = cli::status_not_running(&file)?;
    ensure!(
        status.claimed_traffic == "not claimed",
        "after a clean stop, status says claimed traffic is {:?}: {}",
        status.claimed_traffic,
        status.message
    );
    let explained = cli::yensid_ok(&file, &["explain"])?;
    ensure!(
        explained.contains("not running") && explained.contains("not claimed"),
        "explain after a clean stop: {explained}"
    );
    let maps = cli::yensid(&file, &["maps", "--json"])?;
    ensure!(
        !maps.success && maps.stderr.contains("no readable pinned maps"),
        "maps after a clean stop: {maps:?}"
    );
    Ok(())
}

/// Real ssh sessions through the service: the kernel's dispatched counter, the
/// builders' totals (connections, bytes each way) and the maps all count exactly them;
/// nothing stays active.
fn counters_add_up_after_served_connections(dataplane: Dataplane) -> Result<()> {
    const SESSIONS: usize = 6;
    let topology = Topology::new(2)?;
    let config = DaemonConfig::for_topology(&topology, dataplane, Strategy::LeastConnections);
    let daemon = Daemon::start(topology.client_ns(), &config)?;
    let file = daemon.config_path();
    let before = cli::status_json(file)?;
    ensure!(
        service_u64(&before, "dispatched")? == 0
            && builder_u64(&before, "b1", "connections")? == 0
            && builder_u64(&before, "b2", "connections")? == 0,
        "counters before any connection: {before}"
    );

    let ssh = topology.ssh_client()?;
    let mut served: BTreeMap<String, u64> = BTreeMap::new();
    for _ in 0..SESSIONS {
        *served.entry(ssh.served_by(service())?).or_default() += 1;
    }
    ensure!(
        served.len() == 2,
        "least connections over idle builders served only {served:?}"
    );
    let doc = cli::wait_for_status(file, "every session counted and closed", WAIT, |d| {
        let total: u64 = ["b1", "b2"]
            .iter()
            .map(|b| builder_u64(d, b, "connections"))
            .sum::<Result<u64>>()?;
        let active: u64 = ["b1", "b2"]
            .iter()
            .map(|b| builder_u64(d, b, "active"))
            .sum::<Result<u64>>()?;
        Ok(total >= SESSIONS as u64 && active == 0)
    })?;
    ensure!(
        service_u64(&doc, "dispatched")? == SESSIONS as u64,
        "{SESSIONS} sessions, dispatched {}: {doc}",
        service_u64(&doc, "dispatched")?
    );
    for (name, count) in &served {
        let b = cli::builder(&doc, name)?;
        ensure!(
            b["connections"] == *count,
            "{name} served {count} sessions, status counts {}: {b}",
            b["connections"]
        );
        // A session is key exchange, authentication and a command: kilobytes each way.
        for key in ["bytes_to_builder", "bytes_from_builder"] {
            let bytes = cli::u64_at(b, key)?;
            ensure!(
                bytes >= 1000 * count,
                "{name}: {key} {bytes} for {count} sessions"
            );
        }
        ensure!(
            b["rejected_clients"] == 0 && b["failed_over"] == 0,
            "{name}: {b}"
        );
    }
    ensure!(
        service_u64(&doc, "refused_mode_local")? == 0
            && service_u64(&doc, "refused_no_builder")? == 0,
        "refusals without any refusal: {doc}"
    );

    let maps = cli::maps_json(file)?;
    ensure!(
        kernel_counters(&maps)?["dispatched"] == SESSIONS as u64,
        "the kernel's dispatched counter: {maps}"
    );
    for (name, index) in builder_indices(&maps, &topology)? {
        let (assigned, released, active) = cli::builder_connections(&maps, index)?;
        let count = served.get(&name).copied().unwrap_or(0);
        ensure!(
            assigned == count && released == count && active == 0,
            "{name} served {count}; the kernel's counts: assigned {assigned}, released \
             {released}, active {active}"
        );
    }
    let path = daemon.expect_data_path(dataplane)?;
    ensure!(
        path.spliced + path.copied == SESSIONS as u64,
        "{SESSIONS} sessions, the daemon recorded {path:?}"
    );
    Ok(())
}

/// The kernel counts a refusal under "the service refuses" whenever the plan refuses,
/// so `refused_mode_local` must only grow in local mode: with every builder drained the
/// service refuses because no builder is eligible, and those refusals are no
/// `mode_local` ones.
#[test]
fn refusals_without_builders_are_not_counted_as_mode_local() -> Result<()> {
    if !yensid_tests::privileged_or_skip("refusals_without_builders_are_not_counted_as_mode_local")
    {
        return Ok(());
    }
    const REFUSED: u64 = 3;
    let topology = Topology::new(2)?;
    let config =
        DaemonConfig::for_topology(&topology, Dataplane::Kernel, Strategy::LeastConnections);
    let daemon = Daemon::start(topology.client_ns(), &config)?;
    let file = daemon.config_path();
    daemon.drain("b1")?;
    daemon.drain("b2")?;
    let before = cli::wait_for_status(file, "the service to refuse", WAIT, |d| {
        Ok(refusal(d)?.is_some())
    })?;
    ensure!(
        refusal(&before)?.as_deref() == Some("no eligible builder")
            && before["mode"]["in_force"] == "auto",
        "every builder drained: {before}"
    );
    expect_verdict_refused(&cli::explain(file, None, None)?, "no eligible builder")?;
    for _ in 0..REFUSED {
        let attempt = topology.raw_client().connect(service());
        ensure!(attempt.is_refused(), "no eligible builder: {attempt:?}");
    }
    let doc = cli::status_json(file)?;
    let as_mode_local =
        service_u64(&doc, "refused_mode_local")? - service_u64(&before, "refused_mode_local")?;
    let as_no_builder =
        service_u64(&doc, "refused_no_builder")? - service_u64(&before, "refused_no_builder")?;
    ensure!(
        as_mode_local == 0 && as_no_builder == REFUSED,
        "mode auto, every builder drained: {REFUSED} refusals counted as {as_mode_local} \
         refused_mode_local and {as_no_builder} refused_no_builder"
    );
    Ok(())
}

/// `explain` names the builder the next connection gets: with round-robin, and with
/// least connections over idle builders (ties rotate), it must follow the kernel's
/// rotation from one connection to the next.
#[test]
fn explain_predicts_the_next_builder_in_rotation() -> Result<()> {
    if !yensid_tests::privileged_or_skip("explain_predicts_the_next_builder_in_rotation") {
        return Ok(());
    }
    const ROUNDS: usize = 4;
    let mut wrong = Vec::new();
    for strategy in [Strategy::RoundRobin, Strategy::LeastConnections] {
        let topology = Topology::new(2)?;
        let config = DaemonConfig::for_topology(&topology, Dataplane::Kernel, strategy);
        let daemon = Daemon::start(topology.client_ns(), &config)?;
        let file = daemon.config_path();
        for round in 0..ROUNDS {
            // Each connection is closed; wait until the daemon has seen it go.
            cli::wait_for_status(file, "no open connection", WAIT, |d| {
                Ok(builder_u64(d, "b1", "active")? == 0 && builder_u64(d, "b2", "active")? == 0)
            })?;
            let explanation = cli::explain(file, None, None)?;
            let Verdict::Builder { name, .. } = explanation.verdict()? else {
                bail!("explain refuses a healthy pool:\n{}", explanation.text());
            };
            let answer = served_by(&topology)?;
            if answer != name {
                wrong.push(format!(
                    "{}: round {round}: explain said {name}, {answer} answered",
                    strategy.as_str()
                ));
            }
        }
    }
    ensure!(
        wrong.is_empty(),
        "explain named the wrong builder:\n{}",
        wrong.join("\n")
    );
    Ok(())
}

/// `explain --from ADDR` with source-affinity names the builder a connection from ADDR
/// gets, for several client addresses.
#[test]
fn explain_from_predicts_source_affinity() -> Result<()> {
    if !yensid_tests::privileged_or_skip("explain_from_predicts_source_affinity") {
        return Ok(());
    }
    let topology = Topology::new(2)?;
    let config = DaemonConfig::for_topology(&topology, Dataplane::Kernel, Strategy::SourceAffinity);
    let daemon = Daemon::start(topology.client_ns(), &config)?;
    let file = daemon.config_path();
    let without = cli::explain(file, None, None)?;
    ensure!(
        without.lines.last().is_some_and(|l| l.contains("--from")),
        "source-affinity without --from:\n{}",
        without.text()
    );
    let mut reached = BTreeSet::new();
    for octet in 1..=16 {
        let source = topology.add_client_address(octet)?;
        let explanation = cli::explain(file, Some(SERVICE), Some(source))?;
        let Verdict::Builder { name, why } = explanation.verdict()? else {
            bail!("explain refuses a healthy pool:\n{}", explanation.text());
        };
        ensure!(
            why.contains("affinity slot"),
            "source-affinity explanation: {why:?}"
        );
        ensure!(
            explanation
                .lines
                .last()
                .is_some_and(|l| l.starts_with(&format!("next connection from {source}: "))),
            "explain does not name the client {source}:\n{}",
            explanation.text()
        );
        let answer = topology
            .raw_client()
            .from_source(source)
            .banner(service())?;
        ensure!(
            answer == name,
            "explain --from {source} said {name}, {answer} answered"
        );
        reached.insert(answer);
    }
    ensure!(
        reached.len() == 2,
        "16 client addresses all went to {reached:?}"
    );
    Ok(())
}

/// `known-hosts --name 127.0.0.22` lists every builder's key under that name; a real
/// `ssh` with `StrictHostKeyChecking yes` and nothing else to trust reaches both
/// builders through the service. With one builder's line left out it cannot reach that
/// builder, so the check is real. A builder without `host_key` is named on stderr.
#[test]
fn known_hosts_lets_strict_ssh_reach_every_builder() -> Result<()> {
    if !yensid_tests::privileged_or_skip("known_hosts_lets_strict_ssh_reach_every_builder") {
        return Ok(());
    }
    const SESSIONS: usize = 6;
    let topology = Topology::new(2)?;
    let config =
        DaemonConfig::for_topology(&topology, Dataplane::Kernel, Strategy::LeastConnections);
    let daemon = Daemon::start(topology.client_ns(), &config)?;
    let file = daemon.config_path();

    let out = cli::known_hosts(file, Some("127.0.0.22"))?;
    let lines: Vec<&str> = out.stdout.lines().collect();
    let expected: Vec<String> = topology
        .builders()
        .iter()
        .map(|b| format!("127.0.0.22 {}", b.host_key()))
        .collect();
    ensure!(
        lines == expected,
        "known-hosts --name 127.0.0.22 printed {lines:?}, expected {expected:?}"
    );
    ensure!(
        out.stderr.trim().is_empty(),
        "stderr with every host key: {}",
        out.stderr
    );
    // Without --name: the service's address (port 22 needs no brackets).
    let default = cli::known_hosts(file, None)?;
    ensure!(
        default.stdout == out.stdout,
        "known-hosts without --name: {:?}",
        default.stdout
    );

    let known_hosts = topology.new_file("known_hosts");
    fs::write(&known_hosts, &out.stdout)?;
    let ssh = SshClient::new(
        topology.client_ns(),
        topology.client_identity(),
        &known_hosts,
    );
    let reached = (0..SESSIONS)
        .map(|_| ssh.served_by(service()))
        .collect::<Result<BTreeSet<_>>>()?;
    ensure!(
        reached == BTreeSet::from(["b1".to_owned(), "b2".to_owned()]),
        "with the known-hosts output, sessions reached only {reached:?}"
    );

    // Only b1's line: b2's key is rejected, so trusting the output was what made b2
    // reachable.
    let only_b1 = topology.new_file("known_hosts");
    fs::write(&only_b1, format!("{}\n", lines[0]))?;
    let strict = SshClient::new(topology.client_ns(), topology.client_identity(), &only_b1);
    let mut rejected = 0;
    for _ in 0..SESSIONS {
        match strict.served_by(service()) {
            Ok(name) => ensure!(name == "b1", "b2's key is not trusted, yet {name} served"),
            Err(e) => {
                let e = format!("{e:#}");
                ensure!(
                    e.contains("Host key verification failed"),
                    "failed otherwise than on the host key: {e}"
                );
                rejected += 1;
            }
        }
    }
    ensure!(
        rejected > 0,
        "with b2's key missing no session was rejected"
    );

    // A builder without host_key: left out, and named on stderr.
    let mut partial = config.clone();
    partial.builder_mut("b2").host_key = None;
    let partial_file = topology.new_file("partial.toml");
    let scratch = topology.new_file("partial");
    cli::write_config(&partial_file, &scratch, &partial, "")?;
    let out = cli::known_hosts(&partial_file, Some("127.0.0.22"))?;
    ensure!(
        out.stdout.lines().collect::<Vec<_>>() == vec![expected[0].as_str()],
        "b2 without host_key: printed {:?}",
        out.stdout
    );
    ensure!(
        out.stderr.contains("b2") && out.stderr.contains("host_key"),
        "b2 without host_key is not reported on stderr: {:?}",
        out.stderr
    );
    Ok(())
}

/// Where the tests' metrics endpoint listens, inside the client namespace.
fn metrics_addr() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9422)
}

fn scrape(topology: &Topology) -> Result<Metrics> {
    Metrics::parse(&cli::http_get(
        topology.client_ns(),
        metrics_addr(),
        "/metrics",
    )?)
}

/// Polls the endpoint until `condition` holds of a scrape, and returns that scrape.
fn wait_for_metrics(
    topology: &Topology,
    what: &str,
    mut condition: impl FnMut(&Metrics) -> Result<bool>,
) -> Result<Metrics> {
    let mut last = None;
    wait_until(what, WAIT, || {
        let metrics = last.insert(scrape(topology)?);
        condition(metrics)
    })
    .with_context(|| match &last {
        Some(m) => format!("last scrape:\n{}", m.text),
        None => "no scrape".to_owned(),
    })?;
    Ok(last.expect("wait_until returned after a scrape"))
}

/// `[metrics] listen`: GET /metrics with curl, parsed as Prometheus text. Per-service
/// and per-builder counters grow by exactly the sessions made, the connect-time
/// histogram counts them, and the health, drain, accepting and mode gauges follow a
/// drained and a killed builder and a local override.
#[test]
fn metrics_endpoint_counts_and_reflects_state() -> Result<()> {
    if !yensid_tests::privileged_or_skip("metrics_endpoint_counts_and_reflects_state") {
        return Ok(());
    }
    const SESSIONS: usize = 4;
    const REFUSED: u64 = 3;
    let topology = Topology::new(2)?;
    let mut config =
        DaemonConfig::for_topology(&topology, Dataplane::Kernel, Strategy::LeastConnections);
    config.health = Some(fast_health());
    let mut daemon = Daemon::start(topology.client_ns(), &config)?;
    cli::restart_with_extra_toml(
        &mut daemon,
        &format!("[metrics]\nlisten = \"{}\"", metrics_addr()),
    )?;
    let svc = [("service", SERVICE)];
    let b1 = [("builder", "b1")];
    let b2 = [("builder", "b2")];

    let before = scrape(&topology)?;
    for (family, kind) in [
        ("yensid_dispatched_total", "counter"),
        ("yensid_refused_total", "counter"),
        ("yensid_connections_total", "counter"),
        ("yensid_bytes_total", "counter"),
        ("yensid_failovers_total", "counter"),
        ("yensid_active_connections", "gauge"),
        ("yensid_builder_healthy", "gauge"),
        ("yensid_mode", "gauge"),
        ("yensid_connect_seconds", "histogram"),
    ] {
        ensure!(
            before.types.get(family).map(String::as_str) == Some(kind),
            "{family} is not a {kind}:\n{}",
            before.text
        );
    }
    ensure!(
        before.value("yensid_mode", &[("mode", "auto"), ("source", "config")])? == 1.0
            && before.sum("yensid_mode", &[]) == 1.0,
        "mode gauges:\n{}",
        before.text
    );
    for builder in [&b1, &b2] {
        ensure!(
            before.value("yensid_builder_healthy", builder)? == 1.0
                && before.value("yensid_builder_draining", builder)? == 0.0
                && before.value("yensid_active_connections", builder)? == 0.0,
            "{builder:?} before any change:\n{}",
            before.text
        );
    }
    ensure!(before.value("yensid_service_accepting", &svc)? == 1.0);

    let ssh = topology.ssh_client()?;
    let mut served: BTreeMap<String, f64> = BTreeMap::new();
    for _ in 0..SESSIONS {
        *served.entry(ssh.served_by(service())?).or_default() += 1.0;
    }
    let after = wait_for_metrics(&topology, "the sessions counted", |m| {
        Ok(
            m.sum("yensid_connections_total", &[]) - before.sum("yensid_connections_total", &[])
                >= SESSIONS as f64
                && m.sum("yensid_active_connections", &[]) == 0.0,
        )
    })?;
    let grew = |name: &str, labels: &[(&str, &str)]| -> Result<f64> {
        Ok(after.value(name, labels)? - before.value(name, labels)?)
    };
    ensure!(
        grew("yensid_dispatched_total", &svc)? == SESSIONS as f64,
        "dispatched grew by {} for {SESSIONS} sessions",
        grew("yensid_dispatched_total", &svc)?
    );
    for (name, count) in &served {
        let builder = [("builder", name.as_str())];
        ensure!(
            grew("yensid_connections_total", &builder)? == *count,
            "{name} served {count}, its counter grew by {}",
            grew("yensid_connections_total", &builder)?
        );
        ensure!(
            grew("yensid_connect_seconds_count", &builder)? >= *count,
            "{name}'s connect-time histogram did not count its sessions"
        );
        for direction in ["to_builder", "from_builder"] {
            let labels = [("builder", name.as_str()), ("direction", direction)];
            ensure!(
                grew("yensid_bytes_total", &labels)? >= 1000.0 * count,
                "{name} {direction}: {} bytes for {count} sessions",
                grew("yensid_bytes_total", &labels)?
            );
        }
    }
    // The histogram is cumulative and ends at its count.
    for builder in [&b1, &b2] {
        let mut buckets: Vec<(f64, f64)> = after
            .matching("yensid_connect_seconds_bucket", builder)
            .map(|s| {
                let le = s.labels.get("le").map(String::as_str).unwrap_or_default();
                let bound = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().unwrap_or(f64::NAN)
                };
                (bound, s.value)
            })
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        ensure!(
            buckets.windows(2).all(|w| w[0].1 <= w[1].1)
                && buckets.last().map(|b| b.0) == Some(f64::INFINITY)
                && buckets.last().map(|b| b.1)
                    == Some(after.value("yensid_connect_seconds_count", builder)?),
            "{builder:?}'s histogram is not cumulative up to its count: {buckets:?}"
        );
    }

    // b2 drained, b1 killed: no builder left, the service refuses.
    daemon.drain("b2")?;
    topology.builder("b1").sshd().kill()?;
    let down = wait_for_metrics(&topology, "b1 unhealthy and b2 draining", |m| {
        Ok(m.value("yensid_builder_healthy", &b1)? == 0.0
            && m.value("yensid_builder_draining", &b2)? == 1.0)
    })?;
    ensure!(
        down.value("yensid_builder_draining", &b1)? == 0.0
            && down.value("yensid_builder_healthy", &b2)? == 1.0
            && down.value("yensid_service_accepting", &svc)? == 0.0,
        "b1 dead, b2 drained:\n{}",
        down.text
    );
    daemon.undrain("b2")?;
    topology.builder("b1").sshd().restart()?;
    wait_for_metrics(&topology, "both builders back", |m| {
        Ok(m.value("yensid_builder_healthy", &b1)? == 1.0
            && m.value("yensid_builder_draining", &b2)? == 0.0
            && m.value("yensid_service_accepting", &svc)? == 1.0)
    })?;

    // A local override: the mode gauge and refusals by reason.
    daemon.set_mode(PolicyMode::Local, None)?;
    let local = wait_for_metrics(&topology, "mode local", |m| {
        Ok(m.value("yensid_mode", &[("mode", "local")])? == 1.0)
    })?;
    ensure!(
        local.value("yensid_mode", &[("mode", "local"), ("source", "override")])? == 1.0
            && local.sum("yensid_mode", &[]) == 1.0
            && local.value("yensid_service_accepting", &svc)? == 0.0,
        "local override:\n{}",
        local.text
    );
    let mode_local = [("service", SERVICE), ("reason", "mode_local")];
    let refused_before = local.value("yensid_refused_total", &mode_local)?;
    for _ in 0..REFUSED {
        let attempt = topology.raw_client().connect(service());
        ensure!(attempt.is_refused(), "mode local: {attempt:?}");
    }
    let refused = scrape(&topology)?.value("yensid_refused_total", &mode_local)? - refused_before;
    ensure!(
        refused == REFUSED as f64,
        "{REFUSED} refusals in local mode, the counter grew by {refused}"
    );

    // Only GET /metrics is served.
    let other = cli::http_get(topology.client_ns(), metrics_addr(), "/other");
    ensure!(other.is_err(), "GET /other answered: {other:?}");
    Ok(())
}

/// With `read_group = "nogroup"`, a member looks without root: `status`, `explain`,
/// `mode` and `maps` (the pins are 0640 root:nogroup, their directories 0750, opened
/// read-only), also once the daemon is killed; it may not drain or change the mode, and
/// is told which group would let it. A non-member is told it may not look, and neither
/// the daemon nor the pins tell it anything.
#[test]
fn a_read_group_member_may_look_but_not_change() -> Result<()> {
    if !yensid_tests::privileged_or_skip("inspect::a_read_group_member_may_look_but_not_change") {
        return Ok(());
    }
    let topology = Topology::new(2)?;
    let mut config =
        DaemonConfig::for_topology(&topology, Dataplane::Kernel, Strategy::LeastConnections);
    config.read_group = Some("nogroup".to_owned());
    let mut daemon = Daemon::start(topology.client_ns(), &config)?;

    let doc: Value = serde_json::from_str(&member(&daemon, &["status", "--json"])?)?;
    ensure!(
        doc["pid"].as_u64() == Some(u64::from(daemon.pid())) && states(&doc)?.len() == 2,
        "a member's status: {doc}"
    );
    let explained = member(&daemon, &["explain"])?;
    ensure!(
        explained.contains("next connection"),
        "a member's explain: {explained}"
    );
    let mode = member(&daemon, &["mode"])?;
    ensure!(mode.contains("mode auto"), "a member's mode: {mode}");
    let maps: Value = serde_json::from_str(&member(&daemon, &["maps", "--json"])?)?;
    ensure!(
        maps["dispatch_attached"] == true && builder_indices(&maps, &topology)?.len() == 2,
        "a member's maps: {maps}"
    );
    let pins = Path::new(maps["pin_path"].as_str().context("no pin_path")?).to_owned();
    expect_shared(&pins, 0o750)?;
    // One directory of maps, named by the ABI version (`maps-v<N>`).
    let maps_dir = std::fs::read_dir(&pins)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("maps-v"))
        })
        .with_context(|| format!("no maps-v<N> directory in {}", pins.display()))?;
    expect_shared(&maps_dir, 0o750)?;
    expect_shared(&maps_dir.join("BUILDERS"), 0o640)?;

    for change in [&["mode", "local"][..], &["drain", "b1"]] {
        let denied = member(&daemon, change);
        let why = format!("{:#}", denied.as_ref().err().context("allowed")?);
        ensure!(
            why.contains("permission denied") && why.contains("needs root"),
            "a member's `{}`: {why}",
            change.join(" ")
        );
    }
    let doc = cli::status_json(daemon.config_path())?;
    ensure!(
        doc["mode"]["in_force"] == "auto"
            && states(&doc)?.get("b1").map(String::as_str) == Some("healthy"),
        "after the member's refused changes: {doc}"
    );

    let denied = format!(
        "{:#}",
        outsider(&daemon, &["status"])
            .err()
            .context("an outsider looked")?
    );
    ensure!(
        denied.contains("daemon.read_group (`nogroup`)"),
        "an outsider's status: {denied}"
    );
    let denied = format!(
        "{:#}",
        outsider(&daemon, &["maps"])
            .err()
            .context("an outsider read the maps")?
    );
    ensure!(
        denied.contains("permission denied") && denied.contains("daemon.read_group"),
        "an outsider's maps: {denied}"
    );

    daemon.kill9()?;
    let doc: Value = serde_json::from_str(&member(&daemon, &["status", "--json"])?)?;
    ensure!(
        doc["running"] == false && doc["claimed_traffic"] == "refused",
        "a member's status after kill -9: {doc}"
    );
    let doc: Value = serde_json::from_str(&outsider(&daemon, &["status", "--json"])?)?;
    ensure!(
        doc["running"] == false && doc["claimed_traffic"] == "unknown",
        "an outsider's status after kill -9: {doc}"
    );
    member(&daemon, &["maps"]).context("a member's maps after kill -9")?;
    Ok(())
}

/// The CLI as `nobody` in group `nogroup` (the configured read group).
fn member(daemon: &Daemon, args: &[&str]) -> Result<String> {
    daemon.cli_as(NOBODY, NOGROUP, args)
}

/// The CLI as `nobody` in group `users` (no configured group).
fn outsider(daemon: &Daemon, args: &[&str]) -> Result<String> {
    daemon.cli_as(NOBODY, USERS, args)
}

/// `path` is owned by root:nogroup with exactly `mode`.
fn expect_shared(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = fs::metadata(path).with_context(|| format!("stat {}", path.display()))?;
    ensure!(
        meta.uid() == 0 && meta.gid() == NOGROUP && meta.permissions().mode() & 0o7777 == mode,
        "{}: uid {} gid {} mode {:o}, want root:nogroup {mode:o}",
        path.display(),
        meta.uid(),
        meta.gid(),
        meta.permissions().mode() & 0o7777
    );
    Ok(())
}

/// Every per-builder and per-service metrics family moves exactly with the event that
/// should move it: a client that is not speaking SSH (`rejected_clients_total`), the
/// probes (`probe_rtt_seconds`), a live session (`kernel_rtt_seconds`,
/// `rtt_samples_total`), an upload through a lossy link (`retransmits_total`), a
/// builder that died unnoticed (`failovers_total`), and refusals by reason
/// (`refused_total{reason}`: `mode_local` in mode local, `no_builder` with every builder
/// drained). What did not happen stays put.
#[test]
fn metrics_follow_the_events_that_move_them() -> Result<()> {
    if !yensid_tests::privileged_or_skip("inspect::metrics_follow_the_events_that_move_them") {
        return Ok(());
    }
    const REFUSED: u64 = 3;
    let topology = Topology::new(2)?;
    let mut config = DaemonConfig::for_topology(&topology, Dataplane::Kernel, Strategy::Priority);
    // Probes every 200 ms, but slow to take a builder down (fall): a dead builder is
    // found by the connection it fails.
    config.health = Some(HealthConfig {
        interval: Some(Duration::from_millis(200)),
        fall: Some(1_000_000),
        ..HealthConfig::default()
    });
    let mut daemon = Daemon::start(topology.client_ns(), &config)?;
    cli::restart_with_extra_toml(
        &mut daemon,
        &format!("[metrics]\nlisten = \"{}\"", metrics_addr()),
    )?;
    let b1 = [("builder", "b1")];
    let b2 = [("builder", "b2")];
    let mode_local = [("service", SERVICE), ("reason", "mode_local")];
    let no_builder = [("service", SERVICE), ("reason", "no_builder")];

    // The probes: an RTT for each healthy builder.
    // A builder has no RTT sample until its first probe has answered.
    let before = wait_for_metrics(&topology, "probe RTTs", |m| {
        Ok(m.value("yensid_probe_rtt_seconds", &b1)
            .is_ok_and(|rtt| rtt > 0.0)
            && m.value("yensid_probe_rtt_seconds", &b2)
                .is_ok_and(|rtt| rtt > 0.0))
    })?;
    for builder in [&b1, &b2] {
        ensure!(
            before.value("yensid_rejected_clients_total", builder)? == 0.0
                && before.value("yensid_failovers_total", builder)? == 0.0
                && before.value("yensid_retransmits_total", builder)? == 0.0
                && before.value("yensid_rtt_samples_total", builder)? == 0.0,
            "{builder:?} before any connection:\n{}",
            before.text
        );
    }

    // A client that is not speaking SSH, on b1 (priority).
    let reply = topology
        .raw_client()
        .send_junk(service(), b"GET / HTTP/1.0\r\n\r\n")?;
    ensure!(reply.closed, "the HTTP client was left open");
    let rejected = wait_for_metrics(&topology, "the rejected client counted", |m| {
        Ok(m.value("yensid_rejected_clients_total", &b1)? == 1.0)
    })?;
    ensure!(
        rejected.value("yensid_rejected_clients_total", &b2)? == 0.0
            && rejected.value("yensid_connections_total", &b1)?
                == before.value("yensid_connections_total", &b1)?,
        "one rejected client on b1:\n{}",
        rejected.text
    );

    // A live session on b1: the kernel's RTT and its samples, while it lives.
    let ssh = topology.ssh_client()?;
    let mut session = LiveSession::start(&ssh, service())?;
    ensure!(
        session.builder() == "b1",
        "priority chose {}",
        session.builder()
    );
    let live = wait_for_metrics(&topology, "a kernel RTT for b1", |m| {
        Ok(m.value("yensid_rtt_samples_total", &b1)? > 0.0)
    })?;
    ensure!(
        live.value("yensid_kernel_rtt_seconds", &b1)? > 0.0
            && live.value("yensid_active_connections", &b1)? == 1.0
            && live.value("yensid_rtt_samples_total", &b2)? == 0.0,
        "b1 with a live session:\n{}",
        live.text
    );
    session.finish()?;

    // An upload through a link that loses every fifth data packet to b1.
    topology.lose_data_packets("b1", 5)?;
    let payload = RandomFile::create(2 << 20)?;
    let out = ssh.run_with_input(service(), "sha256sum", payload.path(), WAIT * 4)?;
    ensure!(
        out.starts_with(payload.sha256()),
        "upload through loss: {out:?}"
    );
    let lossy = wait_for_metrics(&topology, "b1's retransmissions", |m| {
        Ok(m.value("yensid_retransmits_total", &b1)? > 0.0)
    })?;
    ensure!(
        lossy.value("yensid_retransmits_total", &b2)? == 0.0,
        "b2 lost nothing:\n{}",
        lossy.text
    );

    // b1 dies; the probes do not take it down, so the next connection fails over.
    topology.builder("b1").sshd().kill()?;
    let served = topology.raw_client().banner(service())?;
    ensure!(served == "b2", "with b1 dead, served by {served}");
    let failed = wait_for_metrics(&topology, "the failover counted", |m| {
        Ok(m.value("yensid_failovers_total", &b1)? == 1.0)
    })?;
    ensure!(
        failed.value("yensid_failovers_total", &b2)? == 0.0
            && failed.value("yensid_builder_healthy", &b1)? == 0.0,
        "one failover from b1:\n{}",
        failed.text
    );
    topology.builder("b1").sshd().restart()?;

    // Refusals by reason: mode local, then every builder drained.
    let refused_before = scrape(&topology)?;
    daemon.set_mode(PolicyMode::Local, None)?;
    for _ in 0..REFUSED {
        let attempt = topology.raw_client().connect(service());
        ensure!(attempt.is_refused(), "mode local: {attempt:?}");
    }
    let local = scrape(&topology)?;
    let grew = |m: &Metrics, labels: &[(&str, &str)]| -> Result<f64> {
        Ok(m.value("yensid_refused_total", labels)?
            - refused_before.value("yensid_refused_total", labels)?)
    };
    ensure!(
        grew(&local, &mode_local)? == REFUSED as f64 && grew(&local, &no_builder)? == 0.0,
        "{REFUSED} refusals in mode local:\n{}",
        local.text
    );
    daemon.reset_mode()?;
    daemon.drain("b1")?;
    daemon.drain("b2")?;
    cli::wait_for_status(daemon.config_path(), "the service to refuse", WAIT, |d| {
        Ok(refusal(d)?.as_deref() == Some("no eligible builder"))
    })?;
    for _ in 0..REFUSED {
        let attempt = topology.raw_client().connect(service());
        ensure!(attempt.is_refused(), "every builder drained: {attempt:?}");
    }
    let drained = scrape(&topology)?;
    ensure!(
        grew(&drained, &mode_local)? == REFUSED as f64
            && grew(&drained, &no_builder)? == REFUSED as f64,
        "{REFUSED} refusals with every builder drained:\n{}",
        drained.text
    );
    Ok(())
}
