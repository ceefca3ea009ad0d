//! The operator's requests from the control socket: status and explain,
//! drains, and the mode override.

use std::{collections::HashMap, time::Duration};

use tracing::{info, warn};

use super::Controller;
use crate::{
    operate::control::{ModeChange, Reply, Request},
    operate::report,
    operate::status::{HandoffStatus, PrefixDelivery},
    state::{ModeOverride, OperatorState, unix_now, unix_now_rounded_up},
};

impl Controller {
    /// Carries out an operator's request from the control socket.
    pub(super) async fn handle(&mut self, request: Request) -> Reply {
        let (builder, drain) = match &request {
            Request::Drain { builder } => (builder, true),
            Request::Undrain { builder } => (builder, false),
            Request::Mode { change } => return self.change_mode(*change).await,
            Request::Status => {
                let status = report::status(&self.registry.inner(), &self.report_context());
                return Reply {
                    ok: true,
                    message: serde_json::to_string(&status).expect("status serializes"),
                };
            }
            Request::Explain { service, from } => {
                let context = self.report_context();
                let explained =
                    report::explain(&self.registry.inner(), &context, service.as_deref(), *from);
                return match explained {
                    Ok(lines) => Reply {
                        ok: true,
                        message: lines.join("\n"),
                    },
                    Err(message) => Reply { ok: false, message },
                };
            }
        };
        let mut state = {
            let inner = self.registry.inner();
            if inner.config.builder(builder).is_none() {
                let known: Vec<&str> = inner
                    .config
                    .builders
                    .iter()
                    .map(|b| b.name.as_str())
                    .collect();
                return Reply {
                    ok: false,
                    message: format!(
                        "unknown builder `{builder}` (configured: {})",
                        known.join(", ")
                    ),
                };
            }
            OperatorState {
                drained: inner.drained.clone(),
                mode_override: inner.mode_override,
            }
        };
        let changed = if drain {
            state.drained.insert(builder.clone())
        } else {
            state.drained.remove(builder)
        };
        if let Err(e) = state.save(&self.state_file) {
            return Reply {
                ok: false,
                message: format!("not changed: {e}"),
            };
        }
        self.registry.inner().drained = state.drained;
        self.apply_logged().await;
        let open = self
            .registry
            .inner()
            .active
            .get(builder)
            .copied()
            .unwrap_or(0);
        let message = match (drain, changed) {
            (true, true) => {
                info!(
                    builder,
                    open_connections = open,
                    "builder drained by the operator: no new connections, open ones continue"
                );
                format!("{builder} drained: no new connections; {open} open connection(s) continue")
            }
            (true, false) => format!("{builder} was already drained ({open} open connection(s))"),
            (false, true) => {
                info!(builder, "builder undrained by the operator");
                format!("{builder} undrained: takes new connections when healthy")
            }
            (false, false) => format!("{builder} was not drained"),
        };
        Reply { ok: true, message }
    }

    /// `yensid mode`: shows, sets or resets the operator's override.
    async fn change_mode(&mut self, change: Option<ModeChange>) -> Reply {
        if let Some(change) = change {
            let value = match change
                .mode
                .map(|mode| ModeOverride::starting(mode, change.for_seconds, unix_now_rounded_up()))
                .transpose()
            {
                Ok(value) => value,
                Err(e) => {
                    warn!(error = %e, "mode change refused");
                    return Reply {
                        ok: false,
                        message: format!("not changed: {e}"),
                    };
                }
            };
            if let Some(e) = self.set_override(value) {
                return Reply {
                    ok: false,
                    message: format!("not changed: {e}"),
                };
            }
            match value {
                Some(o) => {
                    info!(mode = %o.mode, until = ?o.until, "mode override set by the operator")
                }
                None => info!("mode override removed by the operator"),
            }
            self.apply_logged().await;
        }
        Reply {
            ok: true,
            message: report::describe_mode(&self.registry.inner()),
        }
    }

    pub(super) fn set_override(&mut self, value: Option<ModeOverride>) -> Option<String> {
        let mut state = OperatorState::load(&self.state_file).unwrap_or_default();
        state.drained = self.registry.inner().drained.clone();
        state.mode_override = value;
        if let Err(e) = state.save(&self.state_file) {
            return Some(e.to_string());
        }
        self.registry.inner().mode_override = value;
        self.registry.state_changed.notify_one();
        None
    }

    /// When the operator's override ends, if it is timed (and the end is
    /// representable: overrides are bounded, so it always is).
    pub(super) fn override_deadline(&self) -> Option<std::time::Instant> {
        let left = self
            .registry
            .inner()
            .mode_override?
            .seconds_left(unix_now())?;
        std::time::Instant::now().checked_add(Duration::from_secs(left))
    }

    /// The facts `report` needs besides the registry.
    pub(super) fn report_context(&self) -> report::Context {
        let kernel = self.registry.kernel();
        let counters = self
            .services
            .by_name
            .iter()
            .filter_map(|(name, &index)| {
                Some((name.clone(), kernel.as_ref()?.counters(index).ok()?))
            })
            .collect();
        let handoffs = &self.registry.handoffs;
        let limits = handoffs.limits();
        report::Context {
            // Not read here: the caller may hold the registry's lock.
            queues: self.registry.queues.clone(),
            handoffs: HandoffStatus {
                in_progress: handoffs.in_progress(),
                refused: handoffs.refused(),
                max_handoffs: limits.max_handoffs,
                max_handoffs_per_client: limits.max_handoffs_per_client,
            },
            counters,
            dataplane: self.path.dataplane(),
            forward: self.path.forward().as_str(),
            forward_reason: self.forward_reason,
            bpf: kernel.is_some(),
            path_measurement: match kernel.as_ref().map(|k| k.observing()) {
                Some(Ok(())) => "kernel".to_owned(),
                Some(Err(why)) => format!("probes only: {why}"),
                None => "probes only: BPF is unavailable".to_owned(),
            },
            local_delivery: self.local_delivery(),
        }
    }

    /// How each claimed prefix is delivered, by prefix text, as of the last
    /// plan (empty if local routes are not managed).
    fn local_delivery(&self) -> HashMap<String, PrefixDelivery> {
        let Some(routes) = &self.local_routes else {
            return HashMap::new();
        };
        routes
            .deliveries()
            .map(|(prefix, delivery)| {
                let status = PrefixDelivery {
                    prefix: prefix.to_string(),
                    deliverable: Some(delivery.deliverable()),
                    how: delivery.to_string(),
                };
                (prefix.to_string(), status)
            })
            .collect()
    }
}
