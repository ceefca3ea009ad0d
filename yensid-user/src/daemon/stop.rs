//! Stopping: the signals that ask for it, refusing new connections from
//! its first step, and the grace in which open connections finish.

use std::time::Duration;

use anyhow::{Context, Result};
use tokio::{
    signal::unix::{Signal, SignalKind, signal},
    sync::mpsc,
};
use tracing::{error, info, warn};

use super::{Controller, Indices};
use crate::{
    config::describe_duration,
    decide::registry::Registry,
    kernel::bpf::Kernel,
    operate::control::{Pending, Reply, Request},
    operate::{fdstore, notify},
};

/// Why the controller stopped serving.
pub(super) enum Stop {
    /// A stop signal: the graceful stop follows.
    Signal,
    /// A successor took everything over.
    HandedOver,
}

/// SIGTERM and SIGINT, held from serving through the stop: the first
/// begins the stop, a second one during the grace cuts what is left.
pub(super) struct StopSignals {
    terminate: Signal,
    interrupt: Signal,
}

impl StopSignals {
    pub(super) fn new() -> Result<Self> {
        Ok(Self {
            terminate: signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?,
            interrupt: signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?,
        })
    }

    /// The name of the next stop signal, when it comes.
    pub(super) async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.terminate.recv() => "SIGTERM",
            _ = self.interrupt.recv() => "SIGINT",
        }
    }
}

/// How often a stop reports the connections it waits for.
const STOP_REPORT_INTERVAL: Duration = Duration::from_secs(5);

/// How often a stop looks whether the last connection ended. Polled, not
/// signalled: connections end in the registry's count and, still in their
/// handoff, in the handoff limits, and a short poll covers both.
const STOP_CHECK_INTERVAL: Duration = Duration::from_millis(100);

/// Connections the daemon serves: those with a builder, and those still in
/// their handoff (a connection in both is counted twice for a moment,
/// never zero times).
pub(super) fn open_connections(registry: &Registry) -> u64 {
    let assigned: u64 = registry.inner().active.values().sum();
    assigned + u64::from(registry.handoffs.in_progress())
}

/// The first step of every stop: from here until the process exits, every
/// claimed connection is refused (RST), so none reaches another local
/// listener (the host's sshd) while listeners close and pins go. Once the
/// process is gone, nothing claims the addresses any more.
pub(super) fn refuse_while_stopping(kernel: Option<&Kernel>) {
    match kernel.map(Kernel::refuse_all) {
        Some(Ok(())) => {
            info!("stopping: claimed connections are refused until the process exits")
        }
        Some(Err(e)) => {
            error!(error = %e, "stopping, but cannot make the kernel refuse claimed connections")
        }
        None => info!(
            "stopping: without BPF, connections to the service addresses reach other local \
             listeners once ours close"
        ),
    }
}

/// Removes the pinned objects yensid created. The programs detach when the
/// process's last file descriptors close, right after.
pub(super) fn release_kernel(kernel: &Kernel) {
    if let Err(e) = kernel.remove_pins() {
        error!(error = %e, "could not remove pinned BPF objects");
    }
}

/// One line per service with what the kernel did over the daemon's life.
pub(super) fn log_totals(kernel: &Kernel, services: &Indices) {
    for (name, &index) in &services.by_name {
        if let Ok(c) = kernel.counters(index) {
            info!(
                service = name,
                dispatched = c.dispatched,
                refused_mode_local = c.refused_mode,
                refused_no_builder = c.refused_unavailable,
                "kernel totals"
            );
        }
    }
}

impl Controller {
    /// The graceful part of a stop, with listeners closed and the kernel
    /// refusing new connections: the open ones go on until they end, the
    /// grace expires or a second stop signal comes. Meanwhile the control
    /// socket answers `status` and `mode` and refuses changes.
    pub(super) async fn let_connections_finish(
        &mut self,
        requests: &mut mpsc::Receiver<Pending>,
        stop_signals: &mut StopSignals,
    ) {
        let grace = self.registry.inner().config.daemon.shutdown_grace;
        let open = open_connections(&self.registry);
        if open == 0 || grace.is_zero() {
            return;
        }
        let waiting = |open: u64| {
            let line = format!(
                "stopping: {open} connection(s) still open; waiting up to {}",
                describe_duration(grace)
            );
            info!(connections = open, "{line}");
            notify::status(&line);
        };
        waiting(open);
        let start = tokio::time::Instant::now();
        let deadline = tokio::time::sleep_until(start + grace);
        tokio::pin!(deadline);
        let mut report =
            tokio::time::interval_at(start + STOP_REPORT_INTERVAL, STOP_REPORT_INTERVAL);
        let mut check = tokio::time::interval(STOP_CHECK_INTERVAL);
        loop {
            tokio::select! {
                _ = check.tick() => {
                    if open_connections(&self.registry) == 0 {
                        info!("stopping: every connection ended");
                        return;
                    }
                }
                _ = report.tick() => waiting(open_connections(&self.registry)),
                () = &mut deadline => {
                    let open = open_connections(&self.registry);
                    warn!(connections = open, "grace expired: cutting {open} connection(s)");
                    return;
                }
                signal = stop_signals.recv() => {
                    let open = open_connections(&self.registry);
                    warn!(signal, connections = open, "second stop signal: cutting {open} connection(s) at once");
                    return;
                }
                Some((request, reply)) = requests.recv() => {
                    let answer = match request {
                        Request::Status | Request::Mode { change: None } => {
                            self.handle(request).await
                        }
                        _ => Reply {
                            ok: false,
                            message: "yensid is stopping; it takes no changes".to_owned(),
                        },
                    };
                    let _ = reply.send(answer);
                }
            }
        }
    }

    pub(super) fn close_all(&mut self) {
        for ((service, builder), handle) in self.listeners.drain() {
            handle.task.abort();
            if handle.steered {
                fdstore::remove_listener(&service, &builder);
            }
        }
        for (_, task) in self.queue_listeners.drain() {
            task.abort();
        }
        for (_, task) in self.probes.drain() {
            task.abort();
        }
        self.scrapers.close();
    }
}
