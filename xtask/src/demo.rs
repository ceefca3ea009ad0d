//! `cargo xtask demo`: yensid doing its main job on this machine, with
//! throwaway builders. Everything it makes (namespaces, sshd processes, the
//! daemon, pins) is removed when it ends, also on error.

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use yensid_tests::{Daemon, DaemonConfig, Dataplane, PolicyMode, Strategy, Topology, service};

use crate::build;

pub fn run() -> Result<()> {
    if !build::is_root() {
        bail!(
            "the demo creates network namespaces and loads BPF programs: run it as root (sudo -E cargo xtask demo)"
        );
    }
    build::all(false)?;

    say(
        "Two throwaway builders b1 and b2 (real sshd, each with its own host key) in network namespaces,",
    );
    say(
        "reached over veths at 198.18.1.2 and 198.18.2.2; the client namespace also runs its own sshd on *:22.",
    );
    let mut topology = Topology::new(2)?;
    topology.start_host_sshd()?;
    let config =
        DaemonConfig::for_topology(&topology, Dataplane::Kernel, Strategy::LeastConnections);
    say(&format!(
        "Starting `yensid run` in the client namespace; it claims {} in the kernel.",
        service()
    ));
    let mut daemon =
        Daemon::start_binary(&build::yensid_binary(false), topology.client_ns(), &config)?;

    let ssh = topology.ssh_client()?;
    say(
        "Real ssh sessions to the one service address (known_hosts holds both builders' keys under 127.0.0.22):",
    );
    let mut held = ssh.command(service(), "sleep 3").spawn()?;
    std::thread::sleep(std::time::Duration::from_millis(700));
    say("  (one session to the service is held open for 3 s)");
    for i in 1..=3 {
        let who = ssh.served_by(service())?;
        say(&format!("  ssh root@127.0.0.22 #{i}: served by {who}"));
    }
    held.wait()?;
    say("  least-connections sent the short sessions to the builder without the long one.");

    let host: SocketAddr = (Ipv4Addr::LOCALHOST, 22).into();
    let banner = topology.raw_client().banner(host)?;
    say(&format!(
        "The host's own sshd keeps port 22 on every other address: 127.0.0.1:22 is served by `{}`.",
        banner.trim()
    ));

    say("The operator switches to local builds for ten minutes: `yensid mode local --for 10m`");
    let answer = daemon.set_mode(PolicyMode::Local, Some(Duration::from_secs(600)))?;
    say(&format!("  yensid: {}", answer.trim()));
    let started = Instant::now();
    let attempt = topology.raw_client().connect(service());
    let elapsed = started.elapsed();
    if !attempt.is_refused() {
        bail!("expected the service to refuse in local mode");
    }
    say(&format!(
        "  connect to {} -> refused (RST) after {} us: Nix would now build locally at once.",
        service(),
        elapsed.as_micros()
    ));

    say("Back to the rules of the configuration: `yensid mode --reset`");
    daemon.reset_mode()?;
    let who = ssh.served_by(service())?;
    say(&format!("  served by {who} again."));

    say("`yensid status` meanwhile:");
    for line in daemon.cli(&["status"])?.lines() {
        say(&format!("  | {line}"));
    }

    say("The daemon's log (one line per decision and per connection):");
    for line in daemon.log().lines().filter(|l| !l.trim().is_empty()) {
        say(&format!("  | {line}"));
    }
    let status = daemon.stop()?;
    say(&format!(
        "Stopped with SIGTERM ({status}); pins removed, namespaces and builders are being torn down."
    ));
    Ok(())
}

fn say(line: &str) {
    println!("{line}");
}
