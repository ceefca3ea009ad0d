//! Tells the service manager what the daemon is doing (systemd's
//! `Type=notify` protocol, a datagram to `$NOTIFY_SOCKET`): `READY=1` once
//! it serves, `RELOADING=1` with the reload's start time and then `READY=1`
//! around a SIGHUP reload, `STOPPING=1` when it stops, and a `STATUS=` line
//! that `systemctl status` shows. Without `$NOTIFY_SOCKET` (not started by
//! systemd) every call does nothing.

use sd_notify::NotifyState;
use tracing::warn;

/// The daemon serves: systemd marks the unit active.
pub fn ready(status: &str) {
    let status = one_line(status);
    send(&[NotifyState::Ready, NotifyState::Status(&status)]);
}

/// A status on one line: the protocol separates assignments with newlines, so
/// a multi-line message (a configuration error per line) would end the status
/// early and smuggle its later lines in as assignments.
fn one_line(status: &str) -> String {
    status
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

/// A reload begins. systemd (>= 253) wants the monotonic time of the
/// request with it, to tell this reload from an earlier one.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[
            NotifyState::Reloading,
            now,
            NotifyState::Status("reloading the configuration"),
        ]),
        Err(e) => {
            warn!(error = %e, "cannot read CLOCK_MONOTONIC; telling systemd of the reload without it");
            send(&[NotifyState::Reloading]);
        }
    }
}

/// The daemon is stopping: systemd does not mistake the exit for a crash
/// while it releases the kernel's objects.
pub fn stopping() {
    send(&[
        NotifyState::Stopping,
        NotifyState::Status("stopping: releasing pins and connections"),
    ]);
}

/// This process took over from the daemon that ran: it is the service's
/// main process now (systemd takes `MAINPID=` from any process of the
/// service with `NotifyAccess=all`), and it serves.
pub fn took_over(pid: u32) {
    send(&[
        NotifyState::MainPid(pid),
        NotifyState::Ready,
        NotifyState::Status("took over from the previous daemon"),
    ]);
}

/// What `systemctl status` shows, without a change of state (the open
/// connections a stop waits for).
pub fn status(status: &str) {
    let status = one_line(status);
    send(&[NotifyState::Status(&status)]);
}

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        let sent: Vec<String> = states.iter().map(ToString::to_string).collect();
        warn!(error = %e, states = ?sent, "cannot notify the service manager");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_multi_line_status_becomes_one_line() {
        assert_eq!(
            one_line("reload refused: invalid configuration\nline 3: unknown key `strategyy`\n"),
            "reload refused: invalid configuration; line 3: unknown key `strategyy`"
        );
        assert_eq!(one_line("serving"), "serving");
    }
}
