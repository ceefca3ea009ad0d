//! `cargo xtask demo`: yensid doing its main job on this machine, with
//! throwaway builders: ssh sessions spread over them, a real `nix-build`
//! through yensid to one of them, the host's sshd untouched, and a build
//! made locally at once in mode `local`. Everything it makes (namespaces,
//! sshd processes, Nix stores, the daemon, pins) is removed when it ends,
//! also on error.

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use yensid_tests::{
    Daemon, DaemonConfig, Dataplane, Derivation, NixClient, NixRun, PolicyMode, Site, StoreScheme,
    Strategy, Topology, cli, remote_builder, service,
};

use crate::build;

/// What the demo runs, by file and Debian package: the builders' sshd and
/// the client's ssh, Nix on both sides, and namespaces (`ip`, `nsenter`,
/// `unshare`, `sysctl`).
const DEMO_PACKAGES: &[(&str, &str)] = &[
    ("/usr/sbin/sshd", "openssh-server"),
    ("/usr/bin/ssh", "openssh-client"),
    (yensid_tests::nix::NIX_BUILD, "nix-bin"),
    ("/usr/sbin/ip", "iproute2"),
    ("/usr/bin/nsenter", "util-linux"),
    ("/usr/bin/unshare", "util-linux"),
    ("/usr/sbin/sysctl", "procps"),
];

/// A Nix build here takes seconds; only a hang reaches this.
const BUILD_TIMEOUT: Duration = Duration::from_secs(300);

pub fn run() -> Result<()> {
    if !build::is_root() {
        bail!(
            "the demo creates network namespaces and loads BPF programs: run it as root (sudo -E cargo xtask demo)"
        );
    }
    build::all(false)?;
    build::ensure_packages(DEMO_PACKAGES)?;

    say(
        "Two throwaway builders b1 and b2 (real sshd, each with its own host key) in network namespaces,",
    );
    say(
        "reached over veths at 198.18.1.2 and 198.18.2.2; the client namespace also runs its own sshd on *:22.",
    );
    say("Each builder also has a Nix store of its own; the client's store is a throwaway one.");
    let mut topology = Topology::with_stores(2)?;
    topology.start_host_sshd()?;
    let mut config =
        DaemonConfig::for_topology(&topology, Dataplane::Kernel, Strategy::LeastConnections);
    // What a user gets: `forward` left to `auto` (here, with no systemd, splice(2)).
    config.forward = None;
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

    say(
        "A real `nix-build` through yensid: the client lists one remote machine, ssh-ng://root@127.0.0.22,",
    );
    say("and trusts exactly what `yensid known-hosts` prints for it.");
    let known_hosts = cli::known_hosts(daemon.config_path(), None)?;
    let nix = NixClient::new(&topology, &known_hosts.stdout)?;
    let builders = remote_builder(StoreScheme::SshNg, service().ip(), 1);
    say(&format!("  nix-build --max-jobs 1 --builders '{builders}'"));
    let run = build_one(&nix, &builders)?;
    let (path, site) = built(&run)?;
    let Site::Builder(builder) = site else {
        bail!(
            "expected a remote build, it was built at {site:?}:\n{}",
            run.stderr
        );
    };
    let stored = topology
        .builder(builder)
        .store()
        .context("builders with stores")?
        .contains(path);
    say(&format!(
        "  built on {builder} (the derivation records the network it ran in): {path}"
    ));
    say(&format!(
        "  {builder}'s store {} it; the client copied the result back.",
        if stored { "holds" } else { "does NOT hold" }
    ));

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

    say("The same nix-build in mode local: Nix is refused at once and builds on this machine.");
    let run = build_one(&nix, &builders)?;
    let (path, site) = built(&run)?;
    if *site != Site::Client {
        bail!("expected a local build in mode local, it was built at {site:?}");
    }
    say(&format!(
        "  built locally, in the client's namespace: {path}"
    ));
    for said in ["Connection refused", "cannot build on"] {
        if let Some(line) = run.stderr.lines().find(|l| l.contains(said)) {
            say(&format!("  Nix said: {}", line.trim()));
        }
    }

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

/// One `nix-build` of one fresh (never cached) derivation.
fn build_one(nix: &NixClient, builders: &str) -> Result<NixRun> {
    let run = nix.build(&[Derivation::uncached()], builders, 1, BUILD_TIMEOUT)?;
    run.ensure_built()?;
    Ok(run)
}

/// The output path of the run's one derivation and where it was built.
fn built(run: &NixRun) -> Result<(&str, &Site)> {
    let output = run
        .builds
        .first()
        .and_then(|b| b.output.as_ref())
        .context("the build has an output")?;
    Ok((&output.path, &output.site))
}

fn say(line: &str) {
    println!("{line}");
}
