//! Hostile numbers and unlucky configurations: what an operator or a local user can
//! type, and what a stop does, must never crash the daemon, lock its state or harm the
//! host. Overflowing durations through every entry point (check-config, start, SIGHUP,
//! `yensid mode --for`, the control socket, the state file), the host-safety rules of
//! check-config, and a stop with a stand-in listener on 0.0.0.0:22.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail, ensure};
use yensid_tests::cli::restart_with_extra_toml;
use yensid_tests::wait::wait_until;
use yensid_tests::{
    Daemon, DaemonConfig, Dataplane, Fake, FakeServer, InstancePaths, Strategy, Topology,
    check_config_text, service,
};

/// Durations no daemon may accept: each overflows, wraps or is out of bounds.
const BAD_DURATIONS: [&str; 6] = [
    "18446744073709551615s",
    "9223372036854775807s9223372036854775807s",
    "5124095576030432h",
    "99999999999999999999ms",
    "2d",
    "0s",
];

macro_rules! privileged_tests {
    ($($test:ident),+ $(,)?) => {
        $(
            #[test]
            fn $test() -> Result<()> {
                if !yensid_tests::privileged_or_skip(concat!("hostile_config::", stringify!($test))) {
                    return Ok(());
                }
                self::tests::$test()
            }
        )+
    };
}

privileged_tests!(
    check_config_rejects_overflowing_durations,
    check_config_rejects_what_would_harm_the_host,
    a_claim_of_a_local_listeners_address_is_refused,
    start_refuses_overflowing_durations_without_a_panic,
    sighup_with_overflowing_durations_keeps_the_old_config,
    mode_for_huge_values_is_refused_and_the_daemon_lives,
    a_bad_state_file_is_reported_once_and_ignored,
    a_stop_removes_only_what_yensid_pinned,
    a_bpffs_mount_itself_is_no_pin_path,
);

common::dataplane_tests!(stop_refuses_claimed_connections_until_the_process_exits);

mod tests {
    use super::*;

    /// Every bad duration in every timing key: exit 1, the key and line named, no panic.
    pub fn check_config_rejects_overflowing_durations() -> Result<()> {
        for key in ["interval", "timeout", "max_interval", "connect_timeout"] {
            for bad in BAD_DURATIONS {
                let why = if bad == "0s" { "longer than zero" } else { bad };
                let text = format!("{}\n[health]\n{key} = \"{bad}\"\n", base_toml());
                expect_rejected(&text, &format!("health.{key}"), why)?;
                let per_builder = base_toml().replace(
                    "address = \"198.18.1.2:22\"",
                    &format!("address = \"198.18.1.2:22\"\nhealth = {{ {key} = \"{bad}\" }}"),
                );
                expect_rejected(&per_builder, &format!("builders.b1.health.{key}"), why)?;
            }
        }
        for key in ["hook_interval", "hook_timeout"] {
            for bad in BAD_DURATIONS {
                let why = if bad == "0s" { "longer than zero" } else { bad };
                let text = format!("{}\n[policy]\n{key} = \"{bad}\"\n", base_toml());
                expect_rejected(&text, &format!("policy.{key}"), why)?;
            }
        }
        Ok(())
    }

    /// The host-safety rules, each naming its key.
    pub fn check_config_rejects_what_would_harm_the_host() -> Result<()> {
        let base = base_toml();
        let cases: Vec<(String, &str, &str)> = vec![
            (
                base.replace(PIN_PATH, "/sys/fs/bpf"),
                "daemon.pin_path",
                "a mount point other programs pin objects in",
            ),
            (
                base.replace(PIN_PATH, "/"),
                "daemon.pin_path",
                "a directory of its own",
            ),
            (
                base.replace(CLAIM, "127.0.0.0/8"),
                "service[0].listen",
                "would take the host's own SSH on 127.0.0.1:22",
            ),
            (
                base.replace(CLAIM, "0.0.0.0/0"),
                "service[0].listen",
                "claims a whole address family",
            ),
            (
                base.replace(CLAIM, "::/0"),
                "service[0].listen",
                "claims a whole address family",
            ),
            (
                base.replace(CLAIM, "::1"),
                "service[0].listen",
                "would take the host's own SSH on [::1]:22",
            ),
            (
                base.replace("198.18.1.2:22", "198.18.1.2:0"),
                "builders.b1.address",
                "port 0",
            ),
            (
                base.replace("198.18.1.2:22", "127.0.0.22:22"),
                "builders.b1.address",
                "claimed by service `x86`",
            ),
            (
                format!("{base}\n[metrics]\nlisten = \"127.0.0.22:22\"\n"),
                "metrics.listen",
                "claimed by service `x86`",
            ),
            (
                base.replace(
                    "[daemon]\n",
                    "[daemon]\nread_group = \"yensid-no-such-group\"\n",
                ),
                "daemon.read_group",
                "no group `yensid-no-such-group`",
            ),
            (
                format!("{base}\n[policy]\ncontrol_group = \"yensid-no-such-group\"\n"),
                "policy.control_group",
                "no group `yensid-no-such-group`",
            ),
            (
                format!("{base}\n[policy]\nmin_healthy_builders = 3\n"),
                "policy.min_healthy_builders",
                "more than the 2 builder(s)",
            ),
            (
                base.replace("[builders.b1]", "[builders.b1]\nweight = 1001"),
                "builders.b1.weight",
                "1 to 1000",
            ),
        ];
        for (text, key, why) in &cases {
            expect_rejected(text, key, why)?;
        }
        let allowed = base
            .replace(CLAIM, "127.0.0.0/8")
            .replace("strategy", "allow_host_addresses = true\nstrategy");
        let out = check_config_text(None, &allowed)?;
        ensure!(
            out.success,
            "allow_host_addresses = true refused: {}",
            out.stderr
        );
        Ok(())
    }

    /// A listener on exactly a claimed address and port (not a wildcard) would lose its
    /// connections: check-config in that namespace names it, and the daemon does not
    /// start.
    pub fn a_claim_of_a_local_listeners_address_is_refused() -> Result<()> {
        let topology = Topology::new(1)?;
        let config = DaemonConfig::for_topology(&topology, Dataplane::Kernel, Strategy::RoundRobin);
        let text = config.render(&throwaway_paths());
        let wildcard = FakeServer::start(
            topology.client_ns(),
            "0.0.0.0:22".parse()?,
            Fake::CloseAtOnce,
        )?;
        let out = check_config_text(Some(topology.client_ns()), &text)?;
        ensure!(
            out.success,
            "a wildcard listener was taken for a conflict: {}",
            out.stderr
        );
        drop(wildcard);

        // The wildcard's port may take a moment to be free for a specific bind.
        let mut specific = None;
        wait_until(
            "a listener on 127.0.0.22:22",
            Duration::from_secs(10),
            || {
                specific = FakeServer::start(topology.client_ns(), service(), Fake::Silent).ok();
                Ok(specific.is_some())
            },
        )?;
        let out = check_config_text(Some(topology.client_ns()), &text)?;
        ensure!(
            !out.success,
            "check-config accepted a claim of a listener's address"
        );
        // check-config runs as root here, so it can name the listener's process: us.
        let named = format!(
            "service[0].listen: 127.0.0.22/32 port 22 contains 127.0.0.22:22, where \
             hostile_config- (pid {}) listens",
            std::process::id()
        );
        ensure!(
            out.stderr.contains(&named),
            "check-config did not name the listener ({named}): {}",
            out.stderr
        );
        let error = match Daemon::start(topology.client_ns(), &config) {
            Ok(_) => bail!("the daemon started claiming another listener's address"),
            Err(e) => format!("{e:#}"),
        };
        ensure!(error.contains("before it was ready"), "{error}");
        Ok(())
    }

    /// A configuration with an overflowing duration does not start: the daemon exits
    /// with the key named, without a panic.
    pub fn start_refuses_overflowing_durations_without_a_panic() -> Result<()> {
        let topology = Topology::new(1)?;
        let config = DaemonConfig::for_topology(&topology, Dataplane::Kernel, Strategy::RoundRobin);
        let mut daemon = Daemon::start(topology.client_ns(), &config)?;
        let result = restart_with_extra_toml(
            &mut daemon,
            "[health]\ninterval = \"18446744073709551615s\"",
        );
        ensure!(
            result.is_err(),
            "the daemon started with an overflowing interval"
        );
        let log = daemon.log();
        ensure!(
            log.contains("health.interval: `18446744073709551615s` is too long a duration"),
            "the daemon did not name the key: {log}"
        );
        ensure!(!log.contains("panicked"), "{log}");
        Ok(())
    }

    /// SIGHUP with an overflowing or zero duration: the reload is refused with the key
    /// named and the daemon keeps serving with its running configuration.
    pub fn sighup_with_overflowing_durations_keeps_the_old_config() -> Result<()> {
        let topology = Topology::new(1)?;
        let config = DaemonConfig::for_topology(&topology, Dataplane::Kernel, Strategy::RoundRobin);
        let mut daemon = Daemon::start(topology.client_ns(), &config)?;
        for (toml, key) in [
            (
                "[health]\ninterval = \"18446744073709551615s\"",
                "health.interval",
            ),
            (
                "[health]\nmax_interval = \"5124095576030432h\"",
                "health.max_interval",
            ),
            ("[policy]\nhook_interval = \"0s\"", "policy.hook_interval"),
            (
                "[policy]\nhook_timeout = \"9223372036854775807s9223372036854775807s\"",
                "policy.hook_timeout",
            ),
        ] {
            let since = SystemTime::now();
            daemon.reload_with_extra_toml(&config, toml)?;
            daemon.wait_for_log(&["reload refused", key], since, Duration::from_secs(20))?;
            ensure!(
                daemon.is_running()?,
                "the daemon died on a reload with {toml}"
            );
            let served = topology.raw_client().banner(service())?;
            ensure!(
                served == "b1",
                "after the refused reload, served by {served}"
            );
        }
        ensure!(!daemon.log().contains("panicked"), "{}", daemon.log());
        Ok(())
    }

    /// `yensid mode local --for <huge>` is refused by the CLI with the flag named; sent
    /// straight to the control socket, the daemon refuses it naming the bound. Either
    /// way the daemon lives on and the mode does not change.
    pub fn mode_for_huge_values_is_refused_and_the_daemon_lives() -> Result<()> {
        let topology = Topology::new(1)?;
        let config = DaemonConfig::for_topology(&topology, Dataplane::Kernel, Strategy::RoundRobin);
        let mut daemon = Daemon::start(topology.client_ns(), &config)?;
        for bad in [
            "9223372036854775807s",
            "18446744073709551615s",
            "5124095576030432h",
            "366d",
            "0s",
        ] {
            let error = match daemon.cli(&["mode", "local", "--for", bad]) {
                Ok(out) => bail!("`yensid mode local --for {bad}` answered {out}"),
                Err(e) => format!("{e:#}"),
            };
            ensure!(
                error.contains("--for"),
                "the error does not name --for: {error}"
            );
        }
        for seconds in [
            "18446744073709551615",
            "9223372036854775807",
            "31536001",
            "0",
        ] {
            let reply = control_request(
                &daemon,
                &format!(
                    r#"{{"verb":"mode","change":{{"mode":"local","for_seconds":{seconds}}}}}"#
                ),
            )?;
            ensure!(
                reply["ok"] == false,
                "for_seconds {seconds} was accepted: {reply}"
            );
            let message = reply["message"].as_str().unwrap_or_default();
            ensure!(
                message.contains("--for must be at"),
                "for_seconds {seconds}: {message}"
            );
        }
        ensure!(daemon.is_running()?, "the daemon died");
        let mode = daemon.mode()?;
        ensure!(
            mode.contains("from the configuration"),
            "the mode changed: {mode}"
        );
        let served = topology.raw_client().banner(service())?;
        ensure!(served == "b1", "served by {served}");
        // The largest allowed value is taken, and the daemon survives it too.
        daemon.cli(&["mode", "local", "--for", "365d"])?;
        ensure!(
            topology.raw_client().connect(service()).is_refused(),
            "mode local did not refuse"
        );
        daemon.reset_mode()?;
        ensure!(
            daemon.is_running()?,
            "the daemon died after a 365d override"
        );
        Ok(())
    }

    /// Garbage, a huge file, or an override no daemon could have written: the daemon
    /// starts, logs the problem once, and ignores what is invalid.
    pub fn a_bad_state_file_is_reported_once_and_ignored() -> Result<()> {
        let topology = Topology::new(2)?;
        let config = DaemonConfig::for_topology(&topology, Dataplane::Kernel, Strategy::RoundRobin);
        let mut daemon = Daemon::start(topology.client_ns(), &config)?;
        let file = daemon.state_file();

        for (bytes, says) in [
            (b"{\"drained\": [\x1b".to_vec(), "is not valid yensid state"),
            (vec![b' '; 1 << 20], "larger than 65536 bytes"),
        ] {
            stop_cleanly(&mut daemon)?;
            std::fs::write(&file, bytes)?;
            let since = SystemTime::now();
            daemon.restart()?;
            let lines: Vec<_> = daemon
                .log_since(since)
                .into_iter()
                .filter(|l| l.text.contains("state file ignored"))
                .collect();
            ensure!(lines.len() == 1, "expected one report, got {lines:?}");
            ensure!(lines[0].text.contains(says), "{lines:?}");
            ensure!(topology.raw_client().banner(service())?.starts_with('b'));
        }

        stop_cleanly(&mut daemon)?;
        std::fs::write(
            &file,
            r#"{"drained": ["b1", "nope"], "override": {"mode": "local", "until": 18446744073709551615}}"#,
        )?;
        let since = SystemTime::now();
        daemon.restart()?;
        daemon.wait_for_log(
            &["mode override until 18446744073709551615 ignored"],
            since,
            Duration::from_secs(5),
        )?;
        daemon.wait_for_log(
            &["drain of unknown builder `nope` ignored"],
            since,
            Duration::from_secs(5),
        )?;
        // b1's drain is valid and kept; the override is not: b2 serves.
        let served = topology.raw_client().banners(service(), 4)?;
        ensure!(served.iter().all(|b| b == "b2"), "served by {served:?}");
        ensure!(!daemon.log().contains("panicked"), "{}", daemon.log());
        Ok(())
    }

    /// Whatever else is in the pin directory survives a clean stop: yensid removes its
    /// own pins by name, and the directory only if that emptied it.
    pub fn a_stop_removes_only_what_yensid_pinned() -> Result<()> {
        let topology = Topology::new(1)?;
        let config = DaemonConfig::for_topology(&topology, Dataplane::Kernel, Strategy::RoundRobin);
        let mut daemon = Daemon::start(topology.client_ns(), &config)?;
        let pins = daemon.pin_path().to_owned();
        let foreign = pins.join("another-program");
        std::fs::create_dir(&foreign)?;
        ensure!(
            pins.join("dispatch").exists(),
            "no dispatch pin in {}",
            pins.display()
        );
        stop_cleanly(&mut daemon)?;
        ensure!(foreign.is_dir(), "the stop removed {}", foreign.display());
        let left: Vec<String> = std::fs::read_dir(&pins)?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        ensure!(
            left == ["another-program"],
            "left in {}: {left:?}",
            pins.display()
        );
        Ok(())
    }

    /// A bpffs mounted at pin_path itself is not a directory of its own: `yensid run`
    /// refuses it (no fallback) and touches nothing there.
    pub fn a_bpffs_mount_itself_is_no_pin_path() -> Result<()> {
        let topology = Topology::new(1)?;
        let mount = BpffsMount::new()?;
        let foreign = mount.path.join("another-program");
        std::fs::create_dir(&foreign)?;
        let config = DaemonConfig::for_topology(&topology, Dataplane::Kernel, Strategy::RoundRobin);
        let paths = InstancePaths {
            pin_path: mount.path.clone(),
            state_dir: mount.daemon_files().join("state"),
            runtime_dir: mount.daemon_files().join("run"),
        };
        let file = mount.config_file();
        std::fs::write(&file, config.render(&paths))?;
        let out = std::process::Command::new("timeout")
            .arg("20")
            .arg("nsenter")
            .arg(format!("--net={}", topology.client_ns().path().display()))
            .arg("--")
            .arg(yensid_tests::yensid_binary())
            .args(["run", "--config"])
            .arg(&file)
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            out.status.code() == Some(1),
            "yensid run ended with {}: {stderr}",
            out.status
        );
        ensure!(
            stderr.contains(&format!("daemon.pin_path {}", mount.path.display()))
                && stderr.contains("is not on a bpffs"),
            "{stderr}"
        );
        ensure!(!stderr.contains("yensid ready"), "{stderr}");
        ensure!(foreign.is_dir(), "{} was removed", foreign.display());
        Ok(())
    }
}

/// A bpffs of its own, mounted on a fresh directory; unmounted and removed on drop.
struct BpffsMount {
    path: std::path::PathBuf,
}

impl BpffsMount {
    fn new() -> Result<Self> {
        // Short: the daemon's control socket path (runtime dir plus this name) must
        // fit a socket address.
        let path = std::env::temp_dir().join(format!(
            "yensid-hb-{:x}-{}",
            std::process::id(),
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)?
                .subsec_nanos()
        ));
        std::fs::create_dir(&path)?;
        let mount = Self { path };
        let status = std::process::Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&mount.path)
            .status()?;
        ensure!(
            status.success(),
            "mount -t bpf on {}: {status}",
            mount.path.display()
        );
        Ok(mount)
    }

    /// A file next to the mount, not on it (bpffs holds no regular files).
    fn config_file(&self) -> std::path::PathBuf {
        self.path.with_extension("toml")
    }

    /// State and runtime directories next to the mount, removed with it.
    fn daemon_files(&self) -> std::path::PathBuf {
        self.path.with_extension("d")
    }
}

impl Drop for BpffsMount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(&self.path)
            .status();
        let _ = std::fs::remove_dir(&self.path);
        let _ = std::fs::remove_file(self.config_file());
        let _ = std::fs::remove_dir_all(self.daemon_files());
    }
}

/// A stand-in listener on 0.0.0.0:22 (like the host's sshd) and a client connecting to
/// the claimed address in a tight loop while the daemon stops: nothing lands in the
/// stand-in before the daemon's last log line, and every attempt between its stop line
/// and its last line is refused. (Between the last line and the exit the kernel still
/// refuses, but the client cannot tell that time from after the exit.) After the process is gone nothing claims the address
/// any more (documented), and the stand-in gets it: proof that the test sees a leak.
fn stop_refuses_claimed_connections_until_the_process_exits(dataplane: Dataplane) -> Result<()> {
    let topology = Topology::new(1)?;
    let config = DaemonConfig::for_topology(&topology, dataplane, Strategy::RoundRobin);
    let mut daemon = Daemon::start(topology.client_ns(), &config)?;
    let stand_in = StandIn::start(&topology)?;
    let served = topology.raw_client().banner(service())?;
    ensure!(served == "b1", "before the stop, served by {served}");

    let attempts = Mutex::new(Vec::new());
    let done = AtomicBool::new(false);
    let since = SystemTime::now();
    std::thread::scope(|scope| -> Result<()> {
        let client = scope.spawn(|| {
            topology.client_ns().run(|| {
                while !done.load(Ordering::Relaxed) {
                    let started = SystemTime::now();
                    let outcome = TcpStream::connect_timeout(&service(), Duration::from_secs(5));
                    let ended = SystemTime::now();
                    lock(&attempts).push(Attempt {
                        started,
                        ended,
                        outcome: outcome.map(drop),
                    });
                }
            })
        });
        let result = (|| {
            wait_until(
                "the client's first attempts",
                Duration::from_secs(10),
                || Ok(lock(&attempts).len() >= 3),
            )?;
            daemon.terminate()?;
            wait_until("yensid to exit", Duration::from_secs(30), || {
                Ok(!daemon.is_running()?)
            })?;
            wait_until(
                "a connection in the stand-in after the exit",
                Duration::from_secs(10),
                || Ok(!stand_in.accepted().is_empty()),
            )
        })();
        done.store(true, Ordering::Relaxed);
        client
            .join()
            .map_err(|_| anyhow::anyhow!("the client thread panicked"))??;
        result
    })?;

    let stopping = daemon
        .wait_for_log(
            &["stopping: claimed connections are refused"],
            since,
            Duration::from_secs(1),
        )?
        .at;
    let stopped = daemon
        .wait_for_log(&["yensid stopped"], since, Duration::from_secs(1))?
        .at;
    let attempts = attempts.into_inner().unwrap_or_else(|e| e.into_inner());
    let refused = |a: &&Attempt| matches!(&a.outcome, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused);
    let in_window: Vec<&Attempt> = attempts
        .iter()
        .filter(|a| a.started >= stopping && a.ended <= stopped)
        .collect();
    let not_refused: Vec<String> = in_window
        .iter()
        .filter(|a| !refused(a))
        .map(|a| format!("{:?}", a.outcome))
        .collect();
    ensure!(
        not_refused.is_empty(),
        "while stopping, {} of {} attempts were not refused: {not_refused:?}",
        not_refused.len(),
        in_window.len()
    );
    let landed = stand_in.accepted();
    let early = landed.iter().filter(|at| **at < stopped).count();
    ensure!(
        early == 0,
        "{early} connection(s) reached the stand-in before the daemon's last line"
    );
    eprintln!(
        "stop: {} attempts, {} refused after SIGTERM, {} of them between the stop line and the \
         last line ({:?} apart), {} in the stand-in after the exit",
        attempts.len(),
        attempts.iter().filter(refused).count(),
        in_window.len(),
        stopped.duration_since(stopping).unwrap_or_default(),
        landed.len()
    );
    Ok(())
}

/// A listener on 0.0.0.0:22 in the client namespace that accepts on a blocking thread
/// and records when, to the microsecond; closed on drop.
struct StandIn<'a> {
    ns: &'a yensid_tests::Netns,
    accepted: std::sync::Arc<Mutex<Vec<SystemTime>>>,
    stop: std::sync::Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl<'a> StandIn<'a> {
    fn start(topology: &'a Topology) -> Result<Self> {
        let listener = topology
            .client_ns()
            .run(|| std::net::TcpListener::bind("0.0.0.0:22"))??;
        let accepted = std::sync::Arc::new(Mutex::new(Vec::new()));
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let thread = {
            let (accepted, stop) = (accepted.clone(), stop.clone());
            std::thread::spawn(move || {
                while let Ok((stream, _)) = listener.accept() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    lock(&accepted).push(SystemTime::now());
                    drop(stream);
                }
            })
        };
        Ok(Self {
            ns: topology.client_ns(),
            accepted,
            stop,
            thread: Some(thread),
        })
    }

    fn accepted(&self) -> Vec<SystemTime> {
        lock(&self.accepted).clone()
    }
}

impl Drop for StandIn<'_> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes the blocking accept, from inside the namespace, where nothing claims
        // 127.0.0.1:22.
        let wake: SocketAddr = (std::net::Ipv4Addr::LOCALHOST, 22).into();
        let _ = self
            .ns
            .run(|| TcpStream::connect_timeout(&wake, Duration::from_secs(1)));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct Attempt {
    started: SystemTime,
    ended: SystemTime,
    outcome: std::io::Result<()>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

const PIN_PATH: &str = "/sys/fs/bpf/yensid-hostile-check";
const CLAIM: &str = "127.0.0.22/32";

/// A valid configuration to break one key at a time (check-config never creates its
/// paths).
fn base_toml() -> String {
    format!(
        "[daemon]\npin_path = \"{PIN_PATH}\"\n\n[[service]]\nname = \"x86\"\nlisten = [\"{CLAIM}\"]\nstrategy = \"round-robin\"\n\n[builders.b1]\naddress = \"198.18.1.2:22\"\n\n[builders.b2]\naddress = \"198.18.2.2:22\"\n"
    )
}

/// Paths for a config that is only checked, never run: nothing is created there.
fn throwaway_paths() -> InstancePaths {
    let dir = std::env::temp_dir().join(format!("yensid-hostile-{}", std::process::id()));
    InstancePaths {
        pin_path: PIN_PATH.into(),
        state_dir: dir.join("state"),
        runtime_dir: dir.join("run"),
    }
}

/// check-config refuses `text`, names `key` and says `why`, without a panic.
fn expect_rejected(text: &str, key: &str, why: &str) -> Result<()> {
    let out = check_config_text(None, text)?;
    ensure!(!out.success, "check-config accepted:\n{text}");
    ensure!(
        !out.stderr.contains("panicked"),
        "check-config panicked: {}",
        out.stderr
    );
    out.stderr
        .lines()
        .find(|l| l.contains(&format!("{key}: ")) && l.contains(why))
        .with_context(|| format!("no `{key}: ...{why}` in:\n{}\nfor:\n{text}", out.stderr))?;
    Ok(())
}

/// Sends one raw JSON line to the daemon's control socket and returns its reply.
fn control_request(daemon: &Daemon, line: &str) -> Result<serde_json::Value> {
    let mut stream = UnixStream::connect(daemon.control_socket())?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(format!("{line}\n").as_bytes())?;
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply)?;
    serde_json::from_str(&reply).with_context(|| format!("reply: {reply}"))
}

fn stop_cleanly(daemon: &mut Daemon) -> Result<()> {
    let status = daemon.stop()?;
    ensure!(status.success(), "yensid stopped with {status}");
    Ok(())
}
