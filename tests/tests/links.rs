//! Local or remote, decided by the link and by the operator (issue 4): builders are
//! used only over the links `remote_via` allows, a link event refuses connections at
//! once, an operator override wins until it expires (also across restarts), a route
//! change moves a builder between links, and a policy hook decides unless it fails.
//!
//! The world of most tests: b1 behind a veth labelled `ethernet`, b2 behind one
//! labelled `wifi`, `remote_via = ["ethernet"]`. veths are `virtual` to the kernel;
//! `[links]` labels give them the kinds a test needs. The daemon reads the host's /sys,
//! where the test veths do not exist, so their speed is unknown.
//!
//! Some tests print a `links report:` line with what they measured (run with
//! `--nocapture` to see them); no timing is asserted.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use yensid_tests::wait::wait_until;
use yensid_tests::{
    ConnectAttempt, Daemon, DaemonConfig, Dataplane, Forward, HealthConfig, LinkEnd, LinkKind,
    LinkRules, PolicyConfig, PolicyMode, RawClient, ServiceConfig, Status, Strategy, Topology,
    service,
};

common::dataplane_tests!(
    sessions_go_only_over_ethernet,
    ethernet_route_gone_refuses_until_it_is_back,
    ethernet_carrier_lost_refuses_until_it_is_back,
    remote_override_reaches_wifi_until_it_expires,
    local_override_refuses_even_over_ethernet,
    override_survives_a_restart,
    route_change_moves_a_builder_between_links,
);

/// For every `name`, a test that runs `name()` after the privilege check: the tests
/// whose subject does not depend on the data path.
macro_rules! privileged_tests {
    ($($test:ident),+ $(,)?) => {
        mod privileged {
            $(
                #[test]
                fn $test() -> anyhow::Result<()> {
                    let name = concat!(module_path!(), "::", stringify!($test));
                    if !yensid_tests::privileged_or_skip(name) {
                        return Ok(());
                    }
                    super::$test()
                }
            )+
        }
    };
}

privileged_tests!(
    timed_local_override_expires_while_the_daemon_is_down,
    override_and_drain_recorded_while_stopped_hold_from_the_start,
    min_healthy_builders_above_one_refuses_a_thin_pool,
    control_group_members_may_drain,
    service_rules_override_the_global_ones,
    min_link_mbps_excludes_a_link_of_unknown_speed,
    hook_deciding_local_refuses_until_the_operator_says_otherwise,
    crashing_hook_leaves_the_declarative_decision,
    hanging_hook_leaves_the_declarative_decision,
    garbage_printing_hook_leaves_the_declarative_decision,
    hung_hook_leaves_no_process_behind,
    hook_weights_shift_the_balance,
    hook_weights_shape_source_affinity_too,
    only_root_or_the_control_group_may_change_the_mode,
    unprivileged_cli_is_not_told_the_daemon_is_down,
);

const SERVICE: &str = "ssh";
/// Only against hangs: every state change here takes milliseconds to a few seconds.
const WAIT: Duration = Duration::from_secs(30);
/// Sequential connections per check.
const BANNERS: usize = 10;
const HOOK_FAILED: &str = "policy hook failed; the declarative decision stays in force";

/// Probes every 200 ms so the state is fresh, but a builder is never taken down by
/// failed probes (fall is out of reach): whatever excludes a builder in these tests is
/// a link rule, never health, and a builder whose link comes back is eligible at once.
fn steady_health() -> HealthConfig {
    HealthConfig {
        interval: Some(Duration::from_millis(200)),
        max_interval: Some(Duration::from_secs(1)),
        fall: Some(1_000_000),
        ..HealthConfig::default()
    }
}

/// b1 over `ethernet`, b2 over `wifi`, `remote_via = ["ethernet"]`, least-connections.
fn ethernet_and_wifi(topology: &Topology, dataplane: Dataplane) -> DaemonConfig {
    let mut config = DaemonConfig::for_topology(topology, dataplane, Strategy::LeastConnections);
    config.policy.rules.remote_via = Some(vec![LinkKind::Ethernet]);
    config.links = vec![
        label(topology, "b1", LinkKind::Ethernet),
        label(topology, "b2", LinkKind::Wifi),
    ];
    config.health = Some(steady_health());
    config
}

/// A `[links]` entry naming builder `name`'s link (its veth's client end) exactly.
fn label(topology: &Topology, name: &str, kind: LinkKind) -> (String, LinkKind) {
    (topology.builder(name).client_link().to_owned(), kind)
}

/// How many of `count` sequential connections each builder served.
fn tally(raw: &RawClient<'_>, count: usize) -> Result<BTreeMap<String, usize>> {
    let mut tally = BTreeMap::new();
    for name in raw.banners(service(), count)? {
        *tally.entry(name).or_default() += 1;
    }
    Ok(tally)
}

/// [`BANNERS`] sequential connections all end on `builder`.
fn ensure_only(raw: &RawClient<'_>, builder: &str, when: &str) -> Result<()> {
    let served = tally(raw, BANNERS)?;
    ensure!(
        served.len() == 1 && served.contains_key(builder),
        "{when}: {BANNERS} connections should all have gone to {builder}, went to {served:?}"
    );
    Ok(())
}

/// `count` connections in a row are each refused (ECONNREFUSED: the kernel's RST).
fn ensure_refused(raw: &RawClient<'_>, count: usize, when: &str) -> Result<()> {
    for i in 0..count {
        let attempt = raw.connect(service());
        ensure!(
            attempt.is_refused(),
            "{when}: connection {i} was not refused: {attempt:?}"
        );
    }
    Ok(())
}

/// A real ssh client is refused too (and would build locally).
fn ensure_ssh_refused(topology: &Topology, when: &str) -> Result<()> {
    match topology.ssh_client()?.served_by(service()) {
        Ok(builder) => bail!("{when}: an ssh session was served by {builder}"),
        Err(e) => {
            let message = format!("{e:#}");
            ensure!(
                message.contains("Connection refused"),
                "{when}: ssh failed, but not with `Connection refused`: {message}"
            );
            Ok(())
        }
    }
}

/// The next connection's builder, failing if it is refused.
fn next_builder(raw: &RawClient<'_>, when: &str) -> Result<String> {
    raw.banner(service())
        .with_context(|| format!("{when}: the next connection"))
}

fn refusing(status: &Status) -> Result<bool> {
    Ok(status.refusal(SERVICE)?.is_some())
}

fn serving(status: &Status) -> Result<bool> {
    Ok(status.refusal(SERVICE)?.is_none())
}

/// `builder="bK"`, as the daemon's log lines name a builder.
fn builder_field(name: &str) -> String {
    format!("builder=\"{name}\"")
}

/// Goes to stderr through its handle: libtest shows it with `--nocapture` only.
fn report(line: &str) {
    let _ = writeln!(std::io::stderr(), "links report: {line}");
}

/// Waits until `yensid mode` prints something containing `needle`, and returns it.
fn wait_for_mode(daemon: &Daemon, needle: &str) -> Result<String> {
    let mut last = String::new();
    wait_until(&format!("`yensid mode` to say {needle:?}"), WAIT, || {
        last = daemon.mode()?;
        Ok(last.contains(needle))
    })
    .with_context(|| format!("it last said {last:?}"))?;
    Ok(last)
}

/// Only the ethernet builder takes sessions, from the first connection on: raw
/// connections and real ssh sessions all reach b1, and the status says why b2 is left
/// out (its egress link is wifi).
fn sessions_go_only_over_ethernet(dataplane: Dataplane) -> Result<()> {
    let topology = Topology::new(2)?;
    let config = ethernet_and_wifi(&topology, dataplane);
    let daemon = Daemon::start(topology.client_ns(), &config)?;
    let raw = topology.raw_client();

    // No wait: the link rules apply from the moment the daemon is ready.
    ensure_only(&raw, "b1", "right after start")?;
    let ssh = topology.ssh_client()?;
    for i in 0..3 {
        let builder = ssh.served_by(service())?;
        ensure!(builder == "b1", "ssh session {i} was served by {builder}");
    }

    let status = daemon.status()?;
    let (b1, b2) = (topology.builder("b1"), topology.builder("b2"));
    let egress = status.egress("b1")?.context("b1 has no egress link")?;
    ensure!(
        egress.name == b1.client_link() && egress.kind == "ethernet" && egress.up,
        "b1's egress: {egress:?}"
    );
    let egress = status.egress("b2")?.context("b2 has no egress link")?;
    ensure!(
        egress.name == b2.client_link() && egress.kind == "wifi" && egress.up,
        "b2's egress: {egress:?}"
    );
    ensure!(
        egress.speed_mbps.is_none(),
        "a test veth has no speed in the host's /sys, yet: {egress:?}"
    );
    ensure!(
        status.exclusion(SERVICE, "b1")?.is_none(),
        "b1 excluded: {}",
        status.json()
    );
    let expected = format!(
        "egress link {} is wifi, not in remote_via",
        b2.client_link()
    );
    ensure!(
        status.exclusion(SERVICE, "b2")?.as_deref() == Some(expected.as_str()),
        "b2 should be excluded with {expected:?}: {}",
        status.json()
    );
    ensure!(serving(&status)?, "the service refuses: {}", status.json());
    daemon.wait_for_log(
        &["builder excluded", &builder_field("b2"), "is wifi"],
        SystemTime::UNIX_EPOCH,
        WAIT,
    )?;
    daemon.expect_data_path(dataplane)?;
    Ok(())
}

fn ethernet_route_gone_refuses_until_it_is_back(dataplane: Dataplane) -> Result<()> {
    link_down_refuses_until_it_is_back(dataplane, LinkEnd::Client)
}

fn ethernet_carrier_lost_refuses_until_it_is_back(dataplane: Dataplane) -> Result<()> {
    link_down_refuses_until_it_is_back(dataplane, LinkEnd::Builder)
}

/// b1's link goes down, at the client's end (its connected route goes: "no route to
/// it") or at the builder's (the client's end loses carrier: "egress link ... is
/// down"). b2 is wifi, so no builder is left: the service refuses, raw connections and
/// a real ssh client get ECONNREFUSED. The link back up, b1 serves again.
fn link_down_refuses_until_it_is_back(dataplane: Dataplane, end: LinkEnd) -> Result<()> {
    let topology = Topology::new(2)?;
    let config = ethernet_and_wifi(&topology, dataplane);
    let daemon = Daemon::start(topology.client_ns(), &config)?;
    let raw = topology.raw_client();
    ensure_only(&raw, "b1", "before the link event")?;
    let link = topology.builder("b1").client_link().to_owned();
    let expected = match end {
        LinkEnd::Client => "no route to it".to_owned(),
        LinkEnd::Builder => format!("egress link {link} is down"),
    };

    let down_at = SystemTime::now();
    let started = Instant::now();
    topology.set_link("b1", end, false)?;
    let after_command = started.elapsed();
    let status = daemon.wait_for_status("the service to refuse", WAIT, refusing)?;
    let refused_after = started.elapsed();
    ensure!(
        status.refusal(SERVICE)?.as_deref() == Some("no eligible builder"),
        "refusal: {}",
        status.json()
    );
    ensure!(
        status.exclusion(SERVICE, "b1")?.as_deref() == Some(expected.as_str()),
        "b1 should be excluded with {expected:?}: {}",
        status.json()
    );
    ensure_refused(&raw, 5, &format!("{end:?} end of b1's link down"))?;
    ensure_ssh_refused(&topology, &format!("{end:?} end of b1's link down"))?;
    let excluded = daemon.wait_for_log(
        &[
            "builder excluded",
            &builder_field("b1"),
            &format!("reason={expected}"),
        ],
        down_at,
        WAIT,
    )?;
    daemon.wait_for_log(&["service refuses connections"], down_at, WAIT)?;

    let up_at = Instant::now();
    topology.set_link("b1", end, true)?;
    let status = daemon.wait_for_status("b1 to be eligible again", WAIT, |s| {
        Ok(serving(s)? && s.exclusion(SERVICE, "b1")?.is_none())
    })?;
    let served_after = up_at.elapsed();
    ensure!(
        status.egress("b1")?.is_some_and(|e| e.up && e.name == link),
        "b1's egress after the link came back: {}",
        status.json()
    );
    ensure_only(&raw, "b1", "after the link came back")?;
    let builder = topology.ssh_client()?.served_by(service())?;
    ensure!(
        builder == "b1",
        "after the link came back, ssh was served by {builder}"
    );
    report(&format!(
        "{dataplane:?}, {end:?} end down: `ip link set` took {after_command:?}; status \
         refusing {refused_after:?} after the command started (log: excluded {:?} after); \
         eligible again {served_after:?} after `ip link set up` started",
        excluded.at.duration_since(down_at).unwrap_or_default(),
    ));
    daemon.expect_data_path(dataplane)?;
    Ok(())
}

/// `yensid mode remote --for 20s`: the link rules no longer apply, so the wifi builder
/// takes connections too (least-connections rotates ties over both); `yensid mode`
/// says it is an override that expires. When it has expired (never before its twenty
/// seconds), only the ethernet builder again, and `yensid mode` says configuration.
/// (Twenty seconds, not a few: the checks during the override must not race its end
/// on a busy machine.)
fn remote_override_reaches_wifi_until_it_expires(dataplane: Dataplane) -> Result<()> {
    const FOR: Duration = Duration::from_secs(20);
    let topology = Topology::new(2)?;
    let config = ethernet_and_wifi(&topology, dataplane);
    let daemon = Daemon::start(topology.client_ns(), &config)?;
    let raw = topology.raw_client();
    ensure_only(&raw, "b1", "before the override")?;

    let set_at = SystemTime::now();
    daemon.set_mode(PolicyMode::Remote, Some(FOR))?;
    let served = tally(&raw, BANNERS)?;
    let shown = daemon.mode()?;
    let status = daemon.status()?;
    ensure!(
        served.get("b2").is_some_and(|&n| n > 0) && served.get("b1").is_some_and(|&n| n > 0),
        "with mode remote, {BANNERS} connections went to {served:?}, not to both builders"
    );
    ensure!(
        shown.contains("mode remote (operator override, expires in"),
        "`yensid mode` during the override: {shown:?}"
    );
    let mode = status.mode()?;
    ensure!(
        mode.in_force == "remote" && mode.source == "override" && mode.until.is_some(),
        "status mode during the override: {mode:?}"
    );
    ensure!(
        status.exclusion(SERVICE, "b2")?.is_none(),
        "b2 excluded during mode remote: {}",
        status.json()
    );

    let expired = daemon.wait_for_log(&["mode override expired"], set_at, WAIT)?;
    let shown = wait_for_mode(&daemon, "mode auto (from the configuration)")?;
    ensure_only(&raw, "b1", "after the override expired")?;
    let lasted = expired.at.duration_since(set_at).unwrap_or_default();
    ensure!(
        lasted >= FOR,
        "an override for {FOR:?} expired after {lasted:?}"
    );
    let status = daemon.status()?;
    ensure!(
        status.mode()?.source == "config",
        "after expiry: {}",
        status.json()
    );
    report(&format!(
        "{dataplane:?}: during `mode remote --for 20s` {served:?}; expired {lasted:?} after \
         it was set; then `yensid mode` said {:?}",
        shown.trim()
    ));
    daemon.expect_data_path(dataplane)?;
    Ok(())
}

/// `yensid mode local`: the very next connection is refused although the ethernet
/// builder is fine; `yensid mode` says it is an override until changed. `--reset`:
/// the very next connection goes to b1 again.
fn local_override_refuses_even_over_ethernet(dataplane: Dataplane) -> Result<()> {
    let topology = Topology::new(2)?;
    let config = ethernet_and_wifi(&topology, dataplane);
    let daemon = Daemon::start(topology.client_ns(), &config)?;
    let raw = topology.raw_client();
    ensure_only(&raw, "b1", "before the override")?;

    daemon.set_mode(PolicyMode::Local, None)?;
    ensure_refused(&raw, 5, "right after `yensid mode local`")?;
    ensure_ssh_refused(&topology, "mode local")?;
    let shown = daemon.mode()?;
    ensure!(
        shown.contains("mode local (operator override, until changed"),
        "`yensid mode` during the override: {shown:?}"
    );
    let status = daemon.status()?;
    ensure!(
        status.refusal(SERVICE)?.as_deref() == Some("mode is local"),
        "refusal: {}",
        status.json()
    );
    ensure!(
        status.exclusion(SERVICE, "b1")?.is_none(),
        "mode local should refuse although b1 is eligible: {}",
        status.json()
    );
    let mode = status.mode()?;
    ensure!(
        mode.in_force == "local" && mode.source == "override" && mode.until.is_none(),
        "status mode: {mode:?}"
    );

    daemon.reset_mode()?;
    let builder = next_builder(&raw, "right after `yensid mode --reset`")?;
    ensure!(builder == "b1", "after the reset, served by {builder}");
    ensure_only(&raw, "b1", "after the reset")?;
    let shown = daemon.mode()?;
    ensure!(
        shown.contains("mode auto (from the configuration)"),
        "`yensid mode` after the reset: {shown:?}"
    );
    daemon.expect_data_path(dataplane)?;
    Ok(())
}

/// An override is kept in the state file: `local` holds across a stop and a start
/// (the stopped daemon's CLI says it is recorded), and so does a timed `remote`.
fn override_survives_a_restart(dataplane: Dataplane) -> Result<()> {
    let topology = Topology::new(2)?;
    let config = ethernet_and_wifi(&topology, dataplane);
    let mut daemon = Daemon::start(topology.client_ns(), &config)?;
    let raw = topology.raw_client();

    daemon.set_mode(PolicyMode::Local, None)?;
    ensure_refused(&raw, 2, "mode local")?;
    let status = daemon.stop()?;
    ensure!(status.success(), "yensid exited with {status}");
    let shown = daemon.mode()?;
    ensure!(
        shown.contains("override to local is recorded"),
        "`yensid mode` while stopped: {shown:?}"
    );
    let restarted_at = SystemTime::now();
    daemon.restart()?;
    daemon.wait_for_log(&["mode override restored"], restarted_at, WAIT)?;
    ensure_refused(&raw, 5, "after a restart with mode local")?;
    let shown = daemon.mode()?;
    ensure!(
        shown.contains("mode local (operator override"),
        "`yensid mode` after the restart: {shown:?}"
    );
    daemon.reset_mode()?;
    ensure_only(&raw, "b1", "after the reset")?;

    daemon.set_mode(PolicyMode::Remote, Some(Duration::from_secs(3600)))?;
    let status = daemon.stop()?;
    ensure!(status.success(), "yensid exited with {status}");
    let restarted_at = SystemTime::now();
    daemon.restart()?;
    daemon.wait_for_log(&["mode override restored"], restarted_at, WAIT)?;
    let served = tally(&raw, BANNERS)?;
    ensure!(
        served.contains_key("b2"),
        "after a restart with mode remote, {BANNERS} connections went to {served:?}"
    );
    let shown = daemon.mode()?;
    ensure!(
        shown.contains("mode remote (operator override, expires in"),
        "`yensid mode` after the restart: {shown:?}"
    );
    daemon.reset_mode()?;
    ensure_only(&raw, "b1", "after the second reset")?;
    daemon.expect_data_path(dataplane)?;
    Ok(())
}

/// A timed override recorded while the daemon is stopped, whose end comes before it
/// starts again, is over when it starts: it says so, and serves by the configuration.
/// (Set while stopped, so that no check has to beat the override's end.)
fn timed_local_override_expires_while_the_daemon_is_down() -> Result<()> {
    let topology = Topology::new(2)?;
    let config = ethernet_and_wifi(&topology, Dataplane::Kernel);
    let mut daemon = Daemon::start(topology.client_ns(), &config)?;
    let raw = topology.raw_client();
    ensure_only(&raw, "b1", "before the stop")?;
    let status = daemon.stop()?;
    ensure!(status.success(), "yensid exited with {status}");

    let recorded = daemon.set_mode(PolicyMode::Local, Some(Duration::from_secs(2)))?;
    ensure!(
        recorded.contains("recorded"),
        "`yensid mode local --for 2s` with the daemon stopped said {recorded:?}"
    );
    // The stopped daemon's CLI reads the state file: it knows when the override ends.
    wait_for_mode(&daemon, "start in mode auto")?;
    let restarted_at = SystemTime::now();
    daemon.restart()?;
    daemon.wait_for_log(
        &["mode override expired while the daemon was down"],
        restarted_at,
        WAIT,
    )?;
    ensure_only(&raw, "b1", "after the restart")?;
    let shown = daemon.mode()?;
    ensure!(
        shown.contains("mode auto (from the configuration)"),
        "`yensid mode` after the restart: {shown:?}"
    );
    Ok(())
}

/// A local override without end recorded while the daemon is stopped is in force
/// from its first connection on; so is a drain recorded while stopped.
fn override_and_drain_recorded_while_stopped_hold_from_the_start() -> Result<()> {
    let topology = Topology::new(2)?;
    let mut config = ethernet_and_wifi(&topology, Dataplane::Kernel);
    config.links = vec![
        label(&topology, "b1", LinkKind::Ethernet),
        label(&topology, "b2", LinkKind::Ethernet),
    ];
    let mut daemon = Daemon::start(topology.client_ns(), &config)?;
    let raw = topology.raw_client();
    ensure!(tally(&raw, 4)?.len() == 2, "both builders serve at first");
    let status = daemon.stop()?;
    ensure!(status.success(), "yensid exited with {status}");

    let drained = daemon.drain("b1")?;
    ensure!(
        drained.contains("not running")
            && drained.contains("recorded")
            && drained.contains("takes effect when it starts"),
        "`yensid drain b1` with the daemon stopped said {drained:?}"
    );
    daemon.restart()?;
    let status = daemon.status()?;
    ensure!(
        status.builder_state("b1")? == "draining"
            && status.exclusion(SERVICE, "b1")?.as_deref() == Some("draining"),
        "b1 drained while stopped, after the start: {}",
        status.json()
    );
    ensure_only(&raw, "b2", "b1 drained while the daemon was stopped")?;
    daemon.undrain("b1")?;
    let status = daemon.stop()?;
    ensure!(status.success(), "yensid exited with {status}");

    daemon.set_mode(PolicyMode::Local, None)?;
    daemon.restart()?;
    ensure_refused(&raw, 3, "mode local recorded while the daemon was stopped")?;
    let mode = daemon.status()?.mode()?;
    ensure!(
        mode.in_force == "local" && mode.source == "override" && mode.until.is_none(),
        "mode local recorded while stopped, after the start: {mode:?}"
    );
    Ok(())
}

/// A second veth between the client and b2, labelled ethernet, and a /32 route to b2
/// over it: b2's egress becomes that link, so b2 is eligible and takes connections
/// (really over the new link: the first one carries no route to b2 any more than it
/// did). The route deleted, b2 is back behind wifi and excluded.
fn route_change_moves_a_builder_between_links(dataplane: Dataplane) -> Result<()> {
    let topology = Topology::new(2)?;
    let second = topology.add_second_link("b2")?;
    let mut config = ethernet_and_wifi(&topology, dataplane);
    config
        .links
        .push((second.client_end().to_owned(), LinkKind::Ethernet));
    let daemon = Daemon::start(topology.client_ns(), &config)?;
    let raw = topology.raw_client();
    let wifi = topology.builder("b2").client_link().to_owned();
    ensure_only(&raw, "b1", "before the route change")?;
    let status = daemon.status()?;
    ensure!(
        status.egress("b2")?.is_some_and(|e| e.name == wifi),
        "before the route change: {}",
        status.json()
    );

    let started = Instant::now();
    second.route_builder()?;
    ensure!(
        second.kernel_egress()? == second.client_end(),
        "the kernel does not route b2 over {}",
        second.client_end()
    );
    let status = daemon.wait_for_status("b2 to be eligible over the new link", WAIT, |s| {
        Ok(s.exclusion(SERVICE, "b2")?.is_none())
    })?;
    let eligible_after = started.elapsed();
    let egress = status.egress("b2")?.context("b2 has no egress")?;
    ensure!(
        egress.name == second.client_end() && egress.kind == "ethernet" && egress.up,
        "b2's egress after the route change: {egress:?}"
    );
    let served = tally(&raw, BANNERS)?;
    ensure!(
        served.get("b2").is_some_and(|&n| n > 0),
        "b2 over ethernet took none of {BANNERS} connections: {served:?}"
    );
    let builders: Vec<String> = (0..4)
        .map(|_| topology.ssh_client()?.served_by(service()))
        .collect::<Result<_>>()?;
    ensure!(
        builders.iter().any(|b| b == "b2"),
        "no ssh session reached b2 over the new link: {builders:?}"
    );

    let started = Instant::now();
    second.unroute_builder()?;
    let status = daemon.wait_for_status("b2 to be excluded again", WAIT, |s| {
        Ok(s.exclusion(SERVICE, "b2")?.is_some())
    })?;
    let excluded_after = started.elapsed();
    let expected = format!("egress link {wifi} is wifi, not in remote_via");
    ensure!(
        status.exclusion(SERVICE, "b2")?.as_deref() == Some(expected.as_str()),
        "after the route went: {}",
        status.json()
    );
    ensure!(
        status.egress("b2")?.is_some_and(|e| e.name == wifi),
        "b2's egress after the route went: {}",
        status.json()
    );
    ensure_only(&raw, "b1", "after the route went")?;
    report(&format!(
        "{dataplane:?}: b2 eligible {eligible_after:?} after `ip route add` started, \
         excluded {excluded_after:?} after `ip route del` started; over ethernet: {served:?}"
    ));
    daemon.expect_data_path(dataplane)?;
    Ok(())
}

/// `min_healthy_builders = 2` with two builders: while both are eligible, connections
/// go to them; with one drained, or one's sshd dead, the other one alone is too few, so
/// the service refuses (RST, Nix builds locally) and status and `explain` say why.
fn min_healthy_builders_above_one_refuses_a_thin_pool() -> Result<()> {
    const THIN: &str = "1 eligible builder(s), min_healthy_builders is 2";
    let topology = Topology::new(2)?;
    let mut config = ethernet_and_wifi(&topology, Dataplane::Kernel);
    config.links = vec![
        label(&topology, "b1", LinkKind::Ethernet),
        label(&topology, "b2", LinkKind::Ethernet),
    ];
    config.policy.rules.min_healthy_builders = Some(2);
    config.health = Some(HealthConfig {
        interval: Some(Duration::from_millis(200)),
        max_interval: Some(Duration::from_secs(1)),
        ..HealthConfig::default()
    });
    let daemon = Daemon::start(topology.client_ns(), &config)?;
    let raw = topology.raw_client();
    ensure!(
        tally(&raw, 4)?.len() == 2,
        "both builders should serve while both are eligible"
    );

    daemon.drain("b1")?;
    let status = daemon.wait_for_status("the service to refuse", WAIT, refusing)?;
    ensure!(
        status.refusal(SERVICE)?.as_deref() == Some(THIN)
            && status.exclusion(SERVICE, "b2")?.is_none(),
        "b1 drained, b2 eligible: {}",
        status.json()
    );
    ensure_refused(
        &raw,
        3,
        "one eligible builder of the two min_healthy_builders wants",
    )?;
    let explained = yensid_tests::cli::explain(daemon.config_path(), None, None)?;
    ensure!(
        matches!(
            explained.verdict()?,
            yensid_tests::cli::Verdict::Refused { ref why } if why.contains(THIN)
        ),
        "explain with a thin pool:\n{}",
        explained.text()
    );
    daemon.undrain("b1")?;
    daemon.wait_for_status("the service to serve again", WAIT, serving)?;
    ensure!(tally(&raw, 4)?.len() == 2, "both serve after the undrain");

    topology.builder("b2").sshd().kill()?;
    let status = daemon.wait_for_status("the service to refuse", WAIT, refusing)?;
    ensure!(
        status.refusal(SERVICE)?.as_deref() == Some(THIN)
            && status.builder_state("b2")? == "unhealthy",
        "b2 dead, b1 eligible: {}",
        status.json()
    );
    ensure_refused(
        &raw,
        3,
        "one healthy builder of the two min_healthy_builders wants",
    )?;
    Ok(())
}

/// `users` (gid 100), which `nobody` is not in by default.
const USERS_GROUP: &str = "users";

/// With `control_group = "users"`, `nobody` holding `users` as a supplementary group
/// (as a real member of a group does) may drain and undrain a builder, and the drain
/// takes effect; `nobody` without the group may not, and is told which group would let
/// it.
fn control_group_members_may_drain() -> Result<()> {
    let topology = Topology::new(2)?;
    let mut config = ethernet_and_wifi(&topology, Dataplane::Kernel);
    config.links = vec![
        label(&topology, "b1", LinkKind::Ethernet),
        label(&topology, "b2", LinkKind::Ethernet),
    ];
    config.policy.control_group = Some(USERS_GROUP.to_owned());
    let daemon = Daemon::start(topology.client_ns(), &config)?;
    let raw = topology.raw_client();

    let denied = daemon.cli_as(NOBODY, NOGROUP, &["drain", "b1"]);
    let why = format!("{:#}", denied.err().context("a non-member drained b1")?);
    ensure!(
        why.contains("permission denied") && why.contains("policy.control_group (`users`)"),
        "a non-member's drain: {why}"
    );
    ensure!(
        daemon.status()?.builder_state("b1")? == "healthy",
        "b1 after a non-member's drain"
    );

    let said = daemon.cli_as_member(NOBODY, NOGROUP, &[USERS], &["drain", "b1"])?;
    ensure!(
        said.contains("b1") && said.contains("drained"),
        "a member's drain said {said:?}"
    );
    let status = daemon.wait_for_status("b1 draining", WAIT, |s| {
        Ok(s.builder_state("b1")? == "draining")
    })?;
    ensure!(
        status.exclusion(SERVICE, "b1")?.as_deref() == Some("draining"),
        "{}",
        status.json()
    );
    ensure_only(&raw, "b2", "b1 drained by a control_group member")?;
    daemon.cli_as_member(NOBODY, NOGROUP, &[USERS], &["undrain", "b1"])?;
    daemon.wait_for_status("b1 healthy again", WAIT, |s| {
        Ok(s.builder_state("b1")? == "healthy")
    })?;
    ensure!(
        tally(&raw, 4)?.len() == 2,
        "after a member's undrain both builders serve"
    );
    Ok(())
}

/// A service's `policy = { remote_via = ["wifi"] }` replaces the global
/// `remote_via = ["ethernet"]` for it: only b2 takes its connections.
fn service_rules_override_the_global_ones() -> Result<()> {
    let topology = Topology::new(2)?;
    let mut config = ethernet_and_wifi(&topology, Dataplane::Kernel);
    config.service_mut().policy = Some(LinkRules {
        remote_via: Some(vec![LinkKind::Wifi]),
        ..LinkRules::default()
    });
    let daemon = Daemon::start(topology.client_ns(), &config)?;
    let raw = topology.raw_client();
    ensure_only(&raw, "b2", "with the service's remote_via = [\"wifi\"]")?;
    let status = daemon.status()?;
    let expected = format!(
        "egress link {} is ethernet, not in remote_via",
        topology.builder("b1").client_link()
    );
    ensure!(
        status.exclusion(SERVICE, "b1")?.as_deref() == Some(expected.as_str()),
        "b1 should be excluded with {expected:?}: {}",
        status.json()
    );
    Ok(())
}

/// `min_link_mbps` excludes a link whose speed is unknown (the test veths' speed is
/// not in the host's /sys): both builders are out and the service refuses. Reloaded
/// without it, the same builders serve, so the refusal was that rule's.
fn min_link_mbps_excludes_a_link_of_unknown_speed() -> Result<()> {
    let topology = Topology::new(2)?;
    let mut config = DaemonConfig::for_topology(&topology, Dataplane::Kernel, Strategy::RoundRobin);
    config.health = Some(steady_health());
    config.policy.rules.min_link_mbps = Some(100);
    let mut daemon = Daemon::start(topology.client_ns(), &config)?;
    let raw = topology.raw_client();
    ensure_refused(&raw, 3, "min_link_mbps = 100 over links of unknown speed")?;
    let status = daemon.status()?;
    for builder in ["b1", "b2"] {
        let expected = format!(
            "egress link {} has no known speed (min_link_mbps 100)",
            topology.builder(builder).client_link()
        );
        ensure!(
            status.exclusion(SERVICE, builder)?.as_deref() == Some(expected.as_str()),
            "{builder} should be excluded with {expected:?}: {}",
            status.json()
        );
    }

    config.policy.rules.min_link_mbps = None;
    daemon.reload(&config)?;
    daemon.wait_for_status("the service to serve after the reload", WAIT, serving)?;
    let served = tally(&raw, 4)?;
    ensure!(
        served.len() == 2,
        "without min_link_mbps, round-robin served {served:?}"
    );
    Ok(())
}

/// A config whose hook is `body` (a `#!/bin/sh` script in the topology's temp dir),
/// run every second with `timeout`.
fn with_hook(
    topology: &Topology,
    config: &mut DaemonConfig,
    body: &str,
    timeout: Duration,
) -> Result<()> {
    let script = topology.write_script("hook", body)?;
    config.policy = PolicyConfig {
        command: Some(script),
        hook_interval: Some(Duration::from_secs(1)),
        hook_timeout: Some(timeout),
        ..config.policy.clone()
    };
    Ok(())
}

/// The hook decides `local`: the service refuses although b1 is eligible, `yensid mode`
/// gives the hook's reason, and the hook was told the state (links, builders, egress).
/// The operator's override beats the hook; reset, the hook's decision is back.
fn hook_deciding_local_refuses_until_the_operator_says_otherwise() -> Result<()> {
    const REASON: &str = "the test hook says local";
    let topology = Topology::new(2)?;
    let mut config = ethernet_and_wifi(&topology, Dataplane::Kernel);
    let input = topology.new_file("hook-input");
    let body = format!(
        "#!/bin/sh\ncat > {input}.part && mv {input}.part {input}\n\
         echo '{{\"mode\": \"local\", \"reason\": \"{REASON}\"}}'\n",
        input = input.display()
    );
    with_hook(&topology, &mut config, &body, Duration::from_secs(2))?;
    let daemon = Daemon::start(topology.client_ns(), &config)?;
    let raw = topology.raw_client();

    let status = daemon.wait_for_status("the hook's decision", WAIT, |s| {
        Ok(s.mode()?.source == "hook")
    })?;
    let mode = status.mode()?;
    ensure!(
        mode.in_force == "local" && mode.reason.as_deref() == Some(REASON),
        "mode from the hook: {mode:?}"
    );
    ensure!(
        status.refusal(SERVICE)?.as_deref() == Some("mode is local")
            && status.exclusion(SERVICE, "b1")?.is_none(),
        "with the hook's local: {}",
        status.json()
    );
    ensure_refused(&raw, 5, "the hook decided local")?;
    let shown = daemon.mode()?;
    ensure!(
        shown.contains(&format!("mode local (from the policy hook: {REASON})")),
        "`yensid mode`: {shown:?}"
    );
    daemon.wait_for_log(
        &["policy hook decided", REASON],
        SystemTime::UNIX_EPOCH,
        WAIT,
    )?;
    check_hook_input(&topology, &input)?;

    daemon.set_mode(PolicyMode::Remote, None)?;
    let builder = next_builder(&raw, "the operator's mode remote over the hook's local")?;
    ensure!(
        builder == "b1" || builder == "b2",
        "mode remote: served by {builder}"
    );
    daemon.reset_mode()?;
    ensure_refused(&raw, 3, "after the reset, the hook's local again")?;
    Ok(())
}

/// What the hook got on stdin: the state, with each builder's egress link.
fn check_hook_input(topology: &Topology, path: &Path) -> Result<()> {
    let text = fs::read_to_string(path).context("the hook saved no input")?;
    let input: Value = serde_json::from_str(&text)
        .with_context(|| format!("the hook's input is not JSON: {text}"))?;
    ensure!(
        input["config_mode"] == "auto" && input["time"].as_u64().is_some(),
        "hook input: {input}"
    );
    for (builder, kind) in [("b1", "ethernet"), ("b2", "wifi")] {
        let entry = input["builders"]
            .as_array()
            .and_then(|all| all.iter().find(|b| b["name"] == builder))
            .with_context(|| format!("no {builder} in the hook input: {input}"))?;
        let link = topology.builder(builder).client_link();
        ensure!(
            entry["egress"]["name"] == link
                && entry["egress"]["kind"] == kind
                && entry["healthy"] == true,
            "{builder} in the hook input: {entry}"
        );
        ensure!(
            input["links"]
                .as_array()
                .is_some_and(|links| links.iter().any(|l| l["name"] == link)),
            "no link {link} in the hook input: {input}"
        );
    }
    Ok(())
}

/// A hook printing `{"mode": "local"}` but failing the way `body` does changes
/// nothing: the failure is logged (with `reason`), `yensid mode` says configuration,
/// and only the ethernet builder takes connections.
fn failing_hook_leaves_the_declarative_decision(
    body: &str,
    timeout: Duration,
    reason: &str,
) -> Result<()> {
    let topology = Topology::new(2)?;
    let mut config = ethernet_and_wifi(&topology, Dataplane::Kernel);
    with_hook(&topology, &mut config, body, timeout)?;
    let daemon = Daemon::start(topology.client_ns(), &config)?;
    let raw = topology.raw_client();

    let failed = daemon.wait_for_log(&[HOOK_FAILED, reason], SystemTime::UNIX_EPOCH, WAIT)?;
    ensure_only(&raw, "b1", "with a failing hook")?;
    let status = daemon.status()?;
    let mode = status.mode()?;
    ensure!(
        mode.in_force == "auto" && mode.source == "config",
        "mode with a failing hook: {mode:?}"
    );
    ensure!(serving(&status)?, "refusing: {}", status.json());
    let shown = daemon.mode()?;
    ensure!(
        shown.contains("mode auto (from the configuration)"),
        "`yensid mode` with a failing hook: {shown:?}"
    );
    let obeyed: Vec<String> = daemon
        .log_since(SystemTime::UNIX_EPOCH)
        .into_iter()
        .filter(|l| l.text.contains("policy hook decided"))
        .map(|l| l.text)
        .collect();
    ensure!(
        obeyed.is_empty(),
        "the daemon took a failing hook's decision: {obeyed:#?}"
    );
    report(&format!("failing hook logged: {}", failed.text));
    Ok(())
}

fn crashing_hook_leaves_the_declarative_decision() -> Result<()> {
    failing_hook_leaves_the_declarative_decision(
        "#!/bin/sh\ncat > /dev/null\necho '{\"mode\": \"local\", \"reason\": \"crashing\"}'\n\
         echo 'the hook fell over' >&2\nexit 3\n",
        Duration::from_secs(2),
        "the hook fell over",
    )
}

fn hanging_hook_leaves_the_declarative_decision() -> Result<()> {
    failing_hook_leaves_the_declarative_decision(
        "#!/bin/sh\ncat > /dev/null\necho '{\"mode\": \"local\", \"reason\": \"hanging\"}'\n\
         exec sleep 600\n",
        Duration::from_millis(500),
        "did not answer within",
    )
}

fn garbage_printing_hook_leaves_the_declarative_decision() -> Result<()> {
    failing_hook_leaves_the_declarative_decision(
        "#!/bin/sh\ncat > /dev/null\necho 'mode = local'\n",
        Duration::from_secs(2),
        "printed an invalid decision",
    )
}

/// A hook that hangs in a command it runs (as a hook stuck in `nmcli` would) is given
/// up on after `hook_timeout`, and nothing of it is left running: neither the script
/// nor the command it waits for.
fn hung_hook_leaves_no_process_behind() -> Result<()> {
    let topology = Topology::new(2)?;
    let mut config = ethernet_and_wifi(&topology, Dataplane::Kernel);
    let pids = topology.new_file("hook-pids");
    let body = format!(
        "#!/bin/sh\ncat > /dev/null\nsleep 600 &\necho $$ $! >> {}\nwait\n",
        pids.display()
    );
    with_hook(&topology, &mut config, &body, Duration::from_millis(300))?;
    let daemon = Daemon::start(topology.client_ns(), &config)?;
    let failed = daemon.wait_for_log(
        &[HOOK_FAILED, "did not answer within"],
        SystemTime::UNIX_EPOCH,
        WAIT,
    )?;
    // The first run is over: its processes must go (the namespace's teardown would
    // kill them anyway at the end of the test, so a leak must be caught here).
    let first_run: Vec<u32> = fs::read_to_string(&pids)?
        .lines()
        .next()
        .context("the hook recorded no pids")?
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let alive = |pid: &u32| Path::new(&format!("/proc/{pid}")).exists();
    let outcome = wait_until("the hung hook's processes to be gone", WAIT, || {
        Ok(!first_run.iter().any(alive))
    });
    let left: Vec<String> = first_run
        .iter()
        .filter(|pid| alive(pid))
        .map(|pid| {
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            format!(
                "{pid} ({})",
                String::from_utf8_lossy(&cmdline).replace('\0', " ")
            )
        })
        .collect();
    outcome.with_context(|| {
        format!(
            "after `{}`, left running: {left:?} (script pid, then the command it waits for)",
            failed.text
        )
    })?;
    Ok(())
}

/// The hook's weights replace the configured ones: with `{"weights": {"b1": 3}}` and
/// least-connections, eight held connections split 6:2 (b1 and b2 both over ethernet).
fn hook_weights_shift_the_balance() -> Result<()> {
    const HELD: usize = 8;
    let topology = Topology::new(2)?;
    let mut config = ethernet_and_wifi(&topology, Dataplane::Kernel);
    config.links = vec![
        label(&topology, "b1", LinkKind::Ethernet),
        label(&topology, "b2", LinkKind::Ethernet),
    ];
    with_hook(
        &topology,
        &mut config,
        "#!/bin/sh\ncat > /dev/null\necho '{\"weights\": {\"b1\": 3}, \"reason\": \"b1 is big\"}'\n",
        Duration::from_secs(2),
    )?;
    let daemon = Daemon::start(topology.client_ns(), &config)?;
    let raw = topology.raw_client();
    daemon.wait_for_status("the hook's weight for b1", WAIT, |s| {
        Ok(s.weight("b1")? == 3)
    })?;

    let held = (0..HELD)
        .map(|_| raw.open_ssh(service()))
        .collect::<Result<Vec<_>>>()?;
    let mut served = BTreeMap::new();
    for conn in &held {
        *served.entry(conn.served_by().to_owned()).or_insert(0) += 1;
    }
    for conn in held {
        conn.close()?;
    }
    ensure!(
        served == BTreeMap::from([("b1".to_owned(), 6), ("b2".to_owned(), 2)]),
        "with weights 3:1, {HELD} held connections split {served:?}"
    );
    let status = daemon.status()?;
    ensure!(
        status.mode()?.source == "config",
        "a hook without a mode changed the mode: {}",
        status.json()
    );
    Ok(())
}

/// The hook's weights are the weights for every strategy: with source-affinity the 256
/// slots are shared by weight, so with b1 at 3 (and b2 at 1) b1 owns exactly 192 slots
/// and b2 64, as with b1's weight 3 in the config; and every client address lands on
/// the builder that owns its slot (which `explain --from` names from the table).
fn hook_weights_shape_source_affinity_too() -> Result<()> {
    const SOURCES: u8 = 24;
    let topology = Topology::new(2)?;
    let sources = (1..=SOURCES)
        .map(|i| topology.add_client_address(i))
        .collect::<Result<Vec<_>>>()?;
    let mut config =
        DaemonConfig::for_topology(&topology, Dataplane::Kernel, Strategy::SourceAffinity);
    config.health = Some(steady_health());
    // Slots per backend position (b1 is position 0, b2 position 1), and every source on
    // the builder its slot names.
    let check = |daemon: &Daemon, weights_from: &str| -> Result<()> {
        daemon.wait_for_status("both builders eligible", WAIT, |s| {
            Ok(s.exclusion(SERVICE, "b1")?.is_none() && s.exclusion(SERVICE, "b2")?.is_none())
        })?;
        let expected = serde_json::json!([[0, [[0, 192], [1, 64]]]]);
        yensid_tests::cli::wait_for_maps(
            daemon.config_path(),
            &format!("the affinity table shared 192:64 by the {weights_from}'s weights"),
            WAIT,
            |maps| Ok(maps["affinity"] == expected),
        )?;
        for &source in &sources {
            let explained =
                yensid_tests::cli::explain(daemon.config_path(), Some(SERVICE), Some(source))?;
            let owner = match explained.verdict()? {
                yensid_tests::cli::Verdict::Builder { name, why }
                    if why.contains("affinity slot") =>
                {
                    name
                }
                other => bail!("explain --from {source}: {other:?}"),
            };
            let served = topology
                .raw_client()
                .from_source(source)
                .banner(service())?;
            ensure!(
                served == owner,
                "with the {weights_from}'s weights, {source}'s slot belongs to {owner}, but \
                 {served} served it"
            );
        }
        Ok(())
    };

    config.builder_mut("b1").weight = Some(3);
    let daemon = Daemon::start(topology.client_ns(), &config)?;
    check(&daemon, "configuration")?;
    drop(daemon);

    config.builder_mut("b1").weight = None;
    with_hook(
        &topology,
        &mut config,
        "#!/bin/sh\ncat > /dev/null\necho '{\"weights\": {\"b1\": 3}}'\n",
        Duration::from_secs(2),
    )?;
    let daemon = Daemon::start(topology.client_ns(), &config)?;
    daemon.wait_for_status("the hook's weight for b1", WAIT, |s| {
        Ok(s.weight("b1")? == 3)
    })?;
    check(&daemon, "hook")?;
    Ok(())
}

/// `nobody`/`nogroup`, and `users`, which `nobody` is not in.
const NOBODY: u32 = 65534;
const NOGROUP: u32 = 65534;
const USERS: u32 = 100;

/// Without `control_group` only root may change the mode: `nobody`'s `yensid mode
/// local` fails and changes nothing. With `control_group = "nogroup"`, a member may
/// (and the next connection is refused); a non-member still may not.
fn only_root_or_the_control_group_may_change_the_mode() -> Result<()> {
    let topology = Topology::new(2)?;
    let mut config = ethernet_and_wifi(&topology, Dataplane::Kernel);
    let daemon = Daemon::start(topology.client_ns(), &config)?;
    let raw = topology.raw_client();
    let denied = daemon.cli_as(NOBODY, NOGROUP, &["mode", "local"]);
    ensure!(
        denied.is_err(),
        "nobody changed the mode without control_group: {denied:?}"
    );
    ensure_only(&raw, "b1", "after nobody's `yensid mode local`")?;
    let shown = daemon.mode()?;
    ensure!(
        shown.contains("mode auto (from the configuration)"),
        "after nobody's `yensid mode local`: {shown:?}"
    );
    drop(daemon);

    config.policy.control_group = Some("nogroup".to_owned());
    let daemon = Daemon::start(topology.client_ns(), &config)?;
    daemon
        .cli_as(NOBODY, NOGROUP, &["mode", "local"])
        .context("a member of control_group changes the mode")?;
    ensure_refused(
        &raw,
        3,
        "after a control_group member's `yensid mode local`",
    )?;
    let denied_reset = daemon.cli_as(NOBODY, USERS, &["mode", "--reset"]);
    ensure!(
        denied_reset.is_err(),
        "a non-member of control_group reset the mode: {denied_reset:?}"
    );
    ensure_refused(&raw, 1, "after a non-member's `yensid mode --reset`")?;
    daemon.cli_as(NOBODY, NOGROUP, &["mode", "--reset"])?;
    ensure_only(&raw, "b1", "after the member's reset")?;
    report(&format!(
        "nobody without control_group: {:#}; non-member: {:#}",
        denied.err().unwrap_or_else(|| anyhow::anyhow!("allowed")),
        denied_reset
            .err()
            .unwrap_or_else(|| anyhow::anyhow!("allowed")),
    ));
    Ok(())
}

/// A user without access to the control socket is told exactly that: `yensid status`
/// and `yensid mode local` as `nobody` fail saying it may not talk to the daemon and
/// what would allow it (not "not running",
/// and `mode` does not fall back to recording the change in the state file "for when
/// it starts"), and the mode in force is unchanged.
fn unprivileged_cli_is_not_told_the_daemon_is_down() -> Result<()> {
    let topology = Topology::new(1)?;
    let config =
        DaemonConfig::for_topology(&topology, Dataplane::Kernel, Strategy::LeastConnections);
    let daemon = Daemon::start(topology.client_ns(), &config)?;
    let status = daemon.cli_as(NOBODY, NOGROUP, &["status"]);
    let mode = daemon.cli_as(NOBODY, NOGROUP, &["mode", "local"]);
    report(&format!(
        "as nobody: `yensid status`: {status:?}; `yensid mode local`: {mode:?}"
    ));
    for (what, outcome) in [("status", status), ("mode local", mode)] {
        let why = format!(
            "{:#}",
            outcome
                .err()
                .with_context(|| format!("`yensid {what}` as nobody succeeded"))?
        );
        ensure!(
            why.contains("not allowed to talk to the daemon")
                && why.contains("run as root, or configure daemon.read_group")
                && !why.to_lowercase().contains("not running")
                && !why.contains("recorded"),
            "`yensid {what}` as nobody, with the daemon running (pid {}): {why}",
            daemon.pid()
        );
    }
    let shown = daemon.mode()?;
    ensure!(
        shown.contains("mode auto (from the configuration)"),
        "after nobody's `yensid mode local`: {shown:?}"
    );
    Ok(())
}

/// Every policy key the harness renders is one the daemon accepts.
#[test]
fn every_policy_key_renders_to_a_valid_config() -> Result<()> {
    let binary = yensid_tests::yensid_binary();
    if !binary.exists() {
        bail!("no yensid binary at {}", binary.display());
    }
    let builder = |name: &str, address: &str| yensid_tests::BuilderConfig {
        name: name.to_owned(),
        address: address.parse().expect("valid address"),
        weight: None,
        max_connections: None,
        host_key: None,
        health: None,
    };
    let config = DaemonConfig {
        dataplane: Dataplane::Kernel,
        services: vec![ServiceConfig {
            name: SERVICE.to_owned(),
            listen: vec!["127.0.0.22/32".to_owned()],
            port: 22,
            builders: None,
            strategy: Strategy::LeastConnections,
            policy: Some(LinkRules {
                remote_via: Some(vec![LinkKind::Ethernet, LinkKind::Wifi]),
                min_link_mbps: Some(10),
                max_rtt_ms: Some(20),
                min_healthy_builders: Some(1),
            }),
            when_full: None,
        }],
        builders: vec![
            builder("b1", "198.18.1.2:22"),
            builder("b2", "198.18.2.2:22"),
        ],
        policy_mode: Some(PolicyMode::Auto),
        policy: PolicyConfig {
            rules: LinkRules {
                remote_via: Some(vec![LinkKind::Ethernet, LinkKind::Vpn]),
                min_link_mbps: Some(100),
                max_rtt_ms: Some(50),
                min_healthy_builders: Some(2),
            },
            command: Some("/etc/yensid/policy".into()),
            hook_interval: Some(Duration::from_secs(30)),
            hook_timeout: Some(Duration::from_millis(2500)),
            control_group: Some("root".to_owned()),
        },
        links: vec![
            ("enx*".to_owned(), LinkKind::Wwan),
            ("wl?".to_owned(), LinkKind::Wifi),
            ("veth*".to_owned(), LinkKind::Other),
        ],
        health: None,
        read_group: Some("nogroup".to_owned()),
        shutdown_grace: Some(Duration::from_secs(45)),
        forward: Some(Forward::Splice),
        local_path: None,
    };
    let out = yensid_tests::check_config(&config)?;
    ensure!(out.starts_with("ok"), "check-config said {out:?}");
    Ok(())
}

/// The harness's link faults, without the daemon: the client end down takes the
/// route with it; the builder end down keeps the route on a link without carrier.
#[test]
fn harness_link_faults_behave_as_documented() -> Result<()> {
    if !yensid_tests::privileged_or_skip("links::harness_link_faults_behave_as_documented") {
        return Ok(());
    }
    let topology = Topology::new(1)?;
    let b1 = topology.builder("b1");
    let raw = topology
        .raw_client()
        .with_connect_timeout(Duration::from_secs(5));
    topology.set_link("b1", LinkEnd::Client, false)?;
    let attempt = raw.connect(b1.ssh_addr());
    ensure!(
        matches!(&attempt, ConnectAttempt::Failed(e) if e.raw_os_error() == Some(libc::ENETUNREACH)),
        "client end down: {attempt:?}"
    );
    topology.set_link("b1", LinkEnd::Client, true)?;
    wait_until("b1 reachable again", WAIT, || {
        Ok(matches!(
            raw.connect(b1.ssh_addr()),
            ConnectAttempt::Accepted(_)
        ))
    })?;
    topology.set_link("b1", LinkEnd::Builder, false)?;
    let attempt = raw.connect(b1.ssh_addr());
    ensure!(
        !matches!(attempt, ConnectAttempt::Accepted(_)),
        "builder end down, yet: {attempt:?}"
    );
    topology.set_link("b1", LinkEnd::Builder, true)?;
    wait_until("b1 reachable again", WAIT, || {
        Ok(matches!(
            raw.connect(b1.ssh_addr()),
            ConnectAttempt::Accepted(_)
        ))
    })?;
    Ok(())
}
