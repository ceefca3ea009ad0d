//! The shipped unit, `dist/yensid.service`, with all its hardening, under a real
//! systemd: Debian 12 booted in a container (see `yensid_tests::container`), yensid
//! installed as /usr/bin/yensid, two real sshd builders on the container's loopback
//! (127.0.0.2:2222 and 127.0.0.3:2222), the container's own sshd on *:22, and
//! yensid claiming 127.0.0.22:22 in front of them. `systemctl reload` is a takeover
//! by a new daemon that becomes the main process while a session goes on;
//! `kill -9` of the daemon during a spliced transfer is survived through systemd's
//! file descriptor store; `systemctl stop` with a session open waits for it (the
//! graceful stop). All issue 12.
//!
//! The first run builds the cached root file system with debootstrap (minutes); later
//! runs boot a copy-on-write overlay of it in seconds.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use yensid_tests::container::{Container, DEBOOTSTRAP, NSPAWN};
use yensid_tests::wait::wait_until;
use yensid_tests::{KeyPair, privileged_or_skip, yensid_binary};

const SERVICE: &str = "127.0.0.22";
const BUILDERS: [(&str, &str); 2] = [("b1", "127.0.0.2"), ("b2", "127.0.0.3")];
const BUILDER_PORT: u16 = 2222;
const CONFIG: &str = "/etc/yensid/yensid.toml";
const CLIENT_KEY: &str = "/etc/yensid/test-client-key";
const KNOWN_HOSTS: &str = "/etc/yensid/test-known-hosts";
/// `CapabilityBoundingSet=CAP_BPF CAP_NET_ADMIN CAP_CHOWN` (capability numbers 39, 12
/// and 0 of linux/capability.h).
const UNIT_CAPABILITIES: u64 = 1 << 39 | 1 << 12 | 1;
/// Only a hang reaches it.
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// One boot for the whole life of the unit: start (readiness through sd_notify),
/// sessions spliced through it, reload under a live session, stop.
#[test]
fn the_shipped_unit_runs_under_systemd() -> Result<()> {
    if !privileged_or_skip("the_shipped_unit_runs_under_systemd") {
        return Ok(());
    }
    for tool in [NSPAWN, DEBOOTSTRAP] {
        ensure!(
            Path::new(tool).exists(),
            "no {tool}: install Debian's systemd-container and debootstrap (`cargo xtask test` does)"
        );
    }
    let mut container = Container::prepare()?;
    install(&container)?;
    container.boot()?;

    // Type=notify: `systemctl start` returns once the daemon sent READY=1, and the
    // STATUS= line it sent with it is the unit's status text.
    systemctl_showing_the_journal(&container, "start")?;
    ensure!(container.unit_property("yensid", "Type")? == "notify");
    // The default shutdown_grace (30s) plus the margin to release the kernel's objects.
    let stop_timeout = container.unit_property("yensid", "TimeoutStopUSec")?;
    ensure!(stop_timeout == "45s", "TimeoutStopUSec={stop_timeout}");
    ensure!(container.unit_property("yensid", "ActiveState")? == "active");
    let status = container.unit_property("yensid", "StatusText")?;
    ensure!(
        status == "serving 1 service(s) with 2 builder(s), kernel dataplane, forwarding by sockmap",
        "status text after start: {status:?}"
    );
    let journal = container.journal("yensid")?;
    ensure!(
        journal.contains("yensid ready") && journal.contains("bpf=true"),
        "no ready line with BPF in the journal:\n{journal}"
    );
    for failure in [
        "BPF UNAVAILABLE",
        "will not measure builder RTT",
        "ERROR",
        "WARN",
    ] {
        ensure!(
            !journal.contains(failure),
            "the hardened unit kept yensid from something (`{failure}`):\n{journal}"
        );
    }
    // It did all that with the unit's capabilities only, no new privileges, under
    // its system call filter.
    let pid = container.unit_property("yensid", "MainPID")?;
    let process = container.run(&["cat", &format!("/proc/{pid}/status")])?;
    let field = |name: &str| {
        process
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
            .with_context(|| format!("no {name} in /proc/{pid}/status"))
    };
    let effective = u64::from_str_radix(field("CapEff")?, 16)?;
    ensure!(
        effective == UNIT_CAPABILITIES,
        "effective capabilities {effective:#x}, the unit allows {UNIT_CAPABILITIES:#x}"
    );
    ensure!(field("NoNewPrivs")? == "1" && field("Seccomp")? == "2");
    let pins = container.run(&["ls", "/sys/fs/bpf/yensid"])?;
    ensure!(pins.contains("dispatch"), "pins while it serves: {pins:?}");
    ensure!(
        banner(&container, SERVICE)?.contains("yensid-builder-"),
        "127.0.0.22:22 is not served by a builder"
    );
    ensure!(
        banner(&container, "127.0.0.1")?.contains("container-host"),
        "the container's own sshd lost 127.0.0.1:22"
    );

    let known_hosts = container.run(&[
        "yensid",
        "known-hosts",
        "--name",
        SERVICE,
        "--config",
        CONFIG,
    ])?;
    container.write(KNOWN_HOSTS, &known_hosts, 0o644)?;
    let mut served = Vec::new();
    for _ in 0..4 {
        let out = container.run(&ssh(&[r#"echo "$SSH_CONNECTION""#]))?;
        served.push(builder_of(&out)?);
    }
    for (name, _) in BUILDERS {
        ensure!(served.contains(&name), "sessions went to {served:?} only");
    }

    // A live session through the daemon, then a reload (a takeover by a new
    // daemon) that changes what new connections get (mode local: refused) while the
    // session goes on.
    let mut session = LiveSession::open(&container)?;
    let first = session.ask("before")?;
    container.write(
        CONFIG,
        &format!("{}\n[policy]\nmode = \"local\"\n", config(&container)?),
        0o644,
    )?;
    let before_reload = container.unit_property("yensid", "MainPID")?;
    systemctl_showing_the_journal(&container, "reload")?;
    ensure!(container.unit_property("yensid", "ActiveState")? == "active");
    let after_reload = container.unit_property("yensid", "MainPID")?;
    ensure!(
        after_reload != before_reload,
        "the reload did not make the new daemon the main process (MainPID {after_reload})"
    );
    let status = container.unit_property("yensid", "StatusText")?;
    ensure!(
        status.starts_with("serving "),
        "status text after reload: {status:?}"
    );
    let journal = container.journal("yensid")?;
    ensure!(
        journal.contains("took over 1 connection(s) (1 spliced")
            && journal.contains("yensid handed over; exiting"),
        "no takeover in the journal:\n{journal}"
    );
    let left = container.command(&["pgrep", "-x", "yensid"]).output()?;
    ensure!(
        String::from_utf8_lossy(&left.stdout).trim() == after_reload,
        "yensid processes after the takeover: {left:?}"
    );
    let refused = container
        .command(&["bash", "-c", &tcp_banner(SERVICE)])
        .output()?;
    ensure!(
        !refused.status.success()
            && String::from_utf8_lossy(&refused.stderr).contains("Connection refused"),
        "a new connection after the reload to mode local was not refused: {refused:?}"
    );
    let second = session.ask("after")?;
    ensure!(
        first == second,
        "the live session moved from {first} to {second}"
    );
    session.close()?;
    let journal = container.journal("yensid")?;
    ensure!(
        journal
            .lines()
            .any(|l| l.contains("connection closed") && l.contains("spliced=true")),
        "no spliced connection in the journal:\n{journal}"
    );

    // An invalid configuration: the reload fails and says why, the running daemon
    // serves on.
    container.write(
        CONFIG,
        &config(&container)?.replace("mode = \"local\"", "mode = \"nowhere\""),
        0o644,
    )?;
    let reload = container
        .command(&["systemctl", "reload", "yensid"])
        .output()?;
    ensure!(!reload.status.success(), "an invalid reload succeeded");
    ensure!(container.unit_property("yensid", "ActiveState")? == "active");
    ensure!(container.unit_property("yensid", "MainPID")? == after_reload);
    let journal = container.journal("yensid")?;
    ensure!(
        journal.contains("invalid configuration") && journal.contains("serves on"),
        "the failed reload is not explained in the journal:\n{journal}"
    );

    // A stop with a session open: the unit deactivates, saying so in its status,
    // while the session goes on and new connections are refused; it stops once the
    // session ends.
    container.write(
        CONFIG,
        &config(&container)?.replace("mode = \"nowhere\"", "mode = \"remote\""),
        0o644,
    )?;
    container.run(&["systemctl", "reload", "yensid"])?;
    ensure!(
        banner(&container, SERVICE)?.contains("yensid-builder-"),
        "127.0.0.22:22 is not served after the reload to mode remote"
    );

    // kill -9 during a spliced transfer and with a live session: systemd keeps
    // their sockets and the listeners in its store, restarts the daemon, which
    // adopts them; the transfer completes byte for byte, the session goes on.
    container.run(&[
        "sh",
        "-c",
        "head -c 268435456 /dev/urandom > /var/tmp/payload && sha256sum < /var/tmp/payload > /var/tmp/payload.sha256",
    ])?;
    let mut session = LiveSession::open(&container)?;
    let before_kill = session.ask("before the kill")?;
    // 4 MiB every 0.2 s, so that it outlasts the restart.
    container.write(
        "/var/tmp/paced.sh",
        "i=0\nwhile [ $i -lt 64 ]; do\n  dd bs=4194304 count=1 iflag=fullblock status=none\n  sleep 0.2\n  i=$((i+1))\ndone < /var/tmp/payload\n",
        0o755,
    )?;
    let transfer_line = format!(
        "{} | sha256sum > /var/tmp/received.sha256",
        ssh(&["sh", "/var/tmp/paced.sh"]).join(" ")
    );
    let mut transfer = container
        .command(&["sh", "-c", &transfer_line])
        .spawn()
        .context("spawn the transfer")?;
    wait_until("the transfer to be spliced", REPLY_TIMEOUT, || {
        let status: serde_json::Value = serde_json::from_str(
            &container.run(&["yensid", "status", "--json", "--config", CONFIG])?,
        )?;
        let active: u64 = status["builders"]
            .as_array()
            .context("builders")?
            .iter()
            .filter_map(|b| b["active"].as_u64())
            .sum();
        Ok(active == 2)
    })?;
    let killed = container.unit_property("yensid", "MainPID")?;
    container.run(&["kill", "-9", &killed])?;
    wait_until("systemd to restart yensid", REPLY_TIMEOUT, || {
        let pid = container.unit_property("yensid", "MainPID")?;
        Ok(pid != killed
            && pid != "0"
            && container.unit_property("yensid", "ActiveState")? == "active")
    })?;
    let journal = container.journal("yensid")?;
    ensure!(
        journal.contains("adopted 2 spliced connection(s)"),
        "the restarted daemon did not adopt the spliced connections:\n{journal}"
    );
    let status = transfer.wait().context("wait for the transfer")?;
    ensure!(
        status.success(),
        "the transfer across the kill ended with {status}"
    );
    let sent = container.run(&["cat", "/var/tmp/payload.sha256"])?;
    let received = container.run(&["cat", "/var/tmp/received.sha256"])?;
    ensure!(
        sent == received,
        "the transfer across the kill is not byte-exact: sent {sent}, received {received}"
    );
    let after_kill = session.ask("after the kill")?;
    ensure!(
        before_kill == after_kill,
        "the live session moved from {before_kill} to {after_kill}"
    );
    session.close()?;
    ensure!(
        banner(&container, SERVICE)?.contains("yensid-builder-"),
        "127.0.0.22:22 is not served after the restart"
    );

    let mut session = LiveSession::open(&container)?;
    session.ask("before the stop").with_context(|| {
        format!(
            "journal:\n{}",
            container.journal("yensid").unwrap_or_default()
        )
    })?;
    container.run(&["systemctl", "stop", "--no-block", "yensid"])?;
    wait_until(
        "the unit to wait for the open session",
        REPLY_TIMEOUT,
        || {
            Ok(
                container.unit_property("yensid", "ActiveState")? == "deactivating"
                    && container
                        .unit_property("yensid", "StatusText")?
                        .starts_with("stopping: 1 connection(s) still open"),
            )
        },
    )?;
    let refused = container
        .command(&["bash", "-c", &tcp_banner(SERVICE)])
        .output()?;
    ensure!(
        !refused.status.success()
            && String::from_utf8_lossy(&refused.stderr).contains("Connection refused"),
        "a new connection during the stop was not refused: {refused:?}"
    );
    session.ask("during the stop")?;
    session.close()?;
    wait_until("the unit to stop after the session", REPLY_TIMEOUT, || {
        Ok(container.unit_property("yensid", "ActiveState")? == "inactive")
    })?;
    ensure!(
        container
            .journal("yensid")?
            .contains("stopping: every connection ended")
    );

    // It stopped cleanly: nothing pinned, nothing claiming the address, no process
    // left.
    ensure!(container.unit_property("yensid", "Result")? == "success");
    let bpffs = container.run(&["ls", "-A", "/sys/fs/bpf"])?;
    ensure!(
        !bpffs.lines().any(|entry| entry == "yensid"),
        "left pinned after stop: {bpffs:?}"
    );
    ensure!(
        banner(&container, SERVICE)?.contains("container-host"),
        "127.0.0.22:22 is still claimed after stop"
    );
    let left = container.command(&["pgrep", "-x", "yensid"]).output()?;
    ensure!(!left.status.success(), "yensid processes left: {left:?}");
    Ok(())
}

/// Installs yensid, the shipped unit, its configuration and two builders into the
/// container before it boots.
fn install(container: &Container) -> Result<()> {
    let root = container.root();
    container.install(&yensid_binary(), "/usr/bin/yensid", 0o755)?;
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/yensid.service");
    container.install(&unit, "/etc/systemd/system/yensid.service", 0o644)?;
    std::fs::create_dir_all(root.join("etc/yensid"))?;
    KeyPair::generate(&root.join(CLIENT_KEY.trim_start_matches('/')), "client")?;
    container.write(
        "/etc/ssh/sshd_config.d/yensid-test.conf",
        "VersionAddendum container-host\n",
        0o644,
    )?;
    for (name, address) in BUILDERS {
        let key_path = format!("/etc/ssh/yensid-test-{name}-key");
        KeyPair::generate(&root.join(key_path.trim_start_matches('/')), name)?;
        container.write(
            &format!("/etc/ssh/yensid-test-{name}.conf"),
            &format!(
                "ListenAddress {address}:{BUILDER_PORT}\nHostKey {key_path}\n\
                 AuthorizedKeysFile {CLIENT_KEY}.pub\nVersionAddendum yensid-builder-{name}\n\
                 PidFile none\n"
            ),
            0o644,
        )?;
    }
    container.write(
        "/etc/systemd/system/yensid-test-builder@.service",
        "[Unit]\nDescription=throwaway builder %i\n\n[Service]\n\
         ExecStart=/usr/sbin/sshd -D -f /etc/ssh/yensid-test-%i.conf\n\
         RuntimeDirectory=sshd\nRuntimeDirectoryPreserve=yes\n\n\
         [Install]\nWantedBy=multi-user.target\n",
        0o644,
    )?;
    // Enabled, as `systemctl enable` would.
    let wants = root.join("etc/systemd/system/multi-user.target.wants");
    std::fs::create_dir_all(&wants)?;
    for (name, _) in BUILDERS {
        let link = wants.join(format!("yensid-test-builder@{name}.service"));
        std::os::unix::fs::symlink("/etc/systemd/system/yensid-test-builder@.service", &link)?;
    }
    let mut toml = format!(
        "[[service]]\nname = \"x86\"\nlisten = [\"{SERVICE}/32\"]\nstrategy = \"least-connections\"\n"
    );
    for (name, address) in BUILDERS {
        let public =
            std::fs::read_to_string(root.join(format!("etc/ssh/yensid-test-{name}-key.pub")))?;
        let key: Vec<&str> = public.split_whitespace().take(2).collect();
        toml.push_str(&format!(
            "\n[builders.{name}]\naddress = \"{address}:{BUILDER_PORT}\"\nhost_key = \"{}\"\n",
            key.join(" ")
        ));
    }
    container.write(CONFIG, &toml, 0o644)
}

/// The configuration as installed.
fn config(container: &Container) -> Result<String> {
    std::fs::read_to_string(container.root().join(CONFIG.trim_start_matches('/')))
        .context("read the installed configuration")
}

/// The command line of an ssh session to the service as root, trusting exactly what
/// `yensid known-hosts` printed.
fn ssh<'a>(remote: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "ssh",
        "-F",
        "/dev/null",
        "-i",
        CLIENT_KEY,
        "-o",
        "UserKnownHostsFile=/etc/yensid/test-known-hosts",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        "BatchMode=yes",
        "-o",
        "LogLevel=ERROR",
        "-o",
        "ConnectTimeout=10",
        "root@127.0.0.22",
    ];
    args.extend_from_slice(remote);
    args
}

/// The builder whose address is the server side of `$SSH_CONNECTION`.
fn builder_of(ssh_connection: &str) -> Result<&'static str> {
    let server = ssh_connection
        .split_whitespace()
        .nth(2)
        .with_context(|| format!("SSH_CONNECTION {ssh_connection:?}"))?;
    BUILDERS
        .iter()
        .find(|(_, address)| *address == server)
        .map(|(name, _)| *name)
        .with_context(|| format!("served by {server}, not a builder"))
}

/// A shell line that opens SSH to `address`:22 and prints the server's
/// identification line (yensid hands a connection to a builder once the client has
/// sent its own).
fn tcp_banner(address: &str) -> String {
    format!(
        "exec 3<>/dev/tcp/{address}/22 && printf 'SSH-2.0-probe\\r\\n' >&3 && timeout 10 head -n 1 <&3"
    )
}

/// The SSH banner of `address`:22 inside the container.
fn banner(container: &Container, address: &str) -> Result<String> {
    container.run(&["bash", "-c", &tcp_banner(address)])
}

/// An ssh session through the service that answers each line with the builder it
/// runs on.
struct LiveSession {
    child: Child,
    stdin: Option<ChildStdin>,
    replies: Receiver<String>,
}

impl LiveSession {
    fn open(container: &Container) -> Result<Self> {
        let mut child = container
            .command(&ssh(&[
                r#"while read -r line; do echo "$line $SSH_CONNECTION"; done"#,
            ]))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("spawn ssh")?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().context("ssh's stdout")?;
        let (tx, replies) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self {
            child,
            stdin,
            replies,
        })
    }

    /// Sends `word`; the builder that echoed it back.
    fn ask(&mut self, word: &str) -> Result<&'static str> {
        let stdin = self.stdin.as_mut().context("session closed")?;
        writeln!(stdin, "{word}").context("write to the session")?;
        let reply = self
            .replies
            .recv_timeout(REPLY_TIMEOUT)
            .with_context(|| format!("no answer to {word:?} from the live session"))?;
        let Some(connection) = reply.strip_prefix(&format!("{word} ")) else {
            bail!("the session answered {reply:?} to {word:?}");
        };
        builder_of(connection)
    }

    /// Ends the session (EOF on its stdin); fails unless ssh exits 0.
    fn close(mut self) -> Result<()> {
        drop(self.stdin.take());
        let status = self.child.wait().context("wait for ssh")?;
        ensure!(status.success(), "the live session ended with {status}");
        Ok(())
    }
}

impl Drop for LiveSession {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `systemctl <verb> yensid`; on failure the error carries yensid's journal.
fn systemctl_showing_the_journal(container: &Container, verb: &str) -> Result<()> {
    container
        .run(&["systemctl", verb, "yensid"])
        .with_context(|| {
            format!(
                "journal:\n{}",
                container.journal("yensid").unwrap_or_default()
            )
        })
        .map(drop)
}
