//! What `run` sets up before the controller serves: the operator's saved
//! state, the open-file limit, the link watcher, the local routes and the
//! control and metrics endpoints.

use std::{
    os::fd::{AsFd, OwnedFd},
    path::Path,
};

use anyhow::{Context, Result};
use tokio::{
    net::TcpListener,
    sync::{mpsc, watch},
    task::JoinHandle,
};
use tracing::{error, info, warn};

use crate::{
    config::Config,
    decide::link::{self, LinkState},
    kernel::local_route::LocalRoutes,
    operate::access::Access,
    operate::control::{self, Pending},
    operate::metrics,
    state::{OperatorState, unix_now},
};

/// The operator's saved state, as far as it is valid: an unreadable file,
/// or what no daemon could have written in it, is reported once and left
/// out, so a bad file never keeps the daemon from starting (or makes it
/// start and crash again).
pub(super) fn load_state(file: &Path, config: &Config) -> OperatorState {
    let mut state = OperatorState::load(file).unwrap_or_else(|e| {
        error!(file = %file.display(), error = %e, "state file ignored: starting without drains or mode override");
        OperatorState::default()
    });
    for problem in state.sanitize(|name| config.builder(name).is_some(), unix_now()) {
        warn!(file = %file.display(), "state file: {problem}");
    }
    state
}

/// Every proxied connection holds two descriptors (client and builder), so
/// the usual soft limit of 1024 would cap the daemon near 500 connections:
/// raise it to the hard limit (systemd's default hard limit is 524288).
pub(super) fn raise_descriptor_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return;
    }
    if limit.rlim_cur >= limit.rlim_max {
        return;
    }
    let from = limit.rlim_cur;
    limit.rlim_cur = limit.rlim_max;
    // SAFETY: valid pointer; raising the soft limit up to the hard one needs
    // no privilege.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } == 0 {
        info!(from, to = limit.rlim_max, "raised the open-file limit");
    } else {
        warn!(error = %std::io::Error::last_os_error(), limit = from, "cannot raise the open-file limit");
    }
}

/// Starts watching links and routes with the configured labels; without
/// it, link rules cannot be applied (said loudly).
pub(super) async fn watch_links(config: &Config) -> Option<watch::Receiver<LinkState>> {
    match link::watch(config.links.clone()).await {
        Ok(rx) => Some(rx),
        Err(e) => {
            error!(error = %e, "LINK STATE UNKNOWN: link rules (remote_via, min_link_mbps) are not applied");
            None
        }
    }
}

/// The netlink socket that keeps claimed prefixes locally deliverable;
/// without it, said loudly, the operator must add the routes.
pub(super) fn open_local_routes() -> Option<LocalRoutes> {
    match LocalRoutes::open() {
        Ok(routes) => Some(routes),
        Err(e) => {
            error!(error = %e, "LOCAL ROUTES UNMANAGED: claimed prefixes outside 127.0.0.0/8 need `ip route add local <prefix> dev lo`");
            None
        }
    }
}

/// An error without the verifier's full log: its last lines say why.
pub(super) fn brief(error: &str) -> String {
    match error.split_once("Verifier output:") {
        Some((head, log)) => {
            let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
            let tail = &lines[lines.len().saturating_sub(3)..];
            format!("{head}verifier: {}", tail.join(" | "))
        }
        None => error.to_owned(),
    }
}

/// A listener the daemon serves on besides the builders' (the control
/// socket, the metrics endpoint): its socket and the task that serves it.
pub(super) struct Endpoint {
    pub(super) socket: OwnedFd,
    pub(super) task: JoinHandle<()>,
}

impl Endpoint {
    pub(super) fn start_control(
        listener: tokio::net::UnixListener,
        requests: mpsc::Sender<Pending>,
        access: Access,
    ) -> Result<Self> {
        let socket = listener
            .as_fd()
            .try_clone_to_owned()
            .context("cannot duplicate the control socket")?;
        let task = tokio::spawn(control::serve(listener, requests, access));
        Ok(Endpoint { socket, task })
    }

    pub(super) fn start_metrics(
        listener: TcpListener,
        requests: mpsc::Sender<Pending>,
    ) -> Result<Self> {
        let socket = listener
            .as_fd()
            .try_clone_to_owned()
            .context("cannot duplicate the metrics socket")?;
        let task = tokio::spawn(metrics::serve(listener, requests));
        Ok(Endpoint { socket, task })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn brief_keeps_the_verifiers_conclusion() {
        let e = "BPF program `dispatch`: load failed. Verifier output: 0: r1 = 1\n1: exit\nR3 unbounded memory access\nprocessed 2 insns\n";
        assert_eq!(
            brief(e),
            "BPF program `dispatch`: load failed. verifier: 1: exit | R3 unbounded memory access | processed 2 insns"
        );
        assert_eq!(brief("plain"), "plain");
    }
}
