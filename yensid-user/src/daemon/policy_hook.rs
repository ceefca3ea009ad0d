//! Running the policy hook: one run at a time, when something changed or
//! its interval passed, and keeping what it decided when it is valid.

use tokio::sync::mpsc;
use tracing::{info, warn};

use super::Controller;
use crate::{
    dataplane::ident::escape,
    decide::hook::{self, BuilderInput, Decision, HookError, HookInput, OverrideInput},
    decide::registry::{Inner, Registry},
    state::unix_now,
};

/// Runs the policy hook, one run at a time, when something changed or its
/// interval passed.
pub(super) struct HookRunner {
    pub(super) results: mpsc::Sender<Result<Decision, HookError>>,
    pub(super) running: bool,
    /// Another run is due once the current one ends.
    pub(super) pending: bool,
}

impl HookRunner {
    pub(super) fn start_if_due(&mut self, registry: &Registry) {
        if self.running || !self.pending {
            return;
        }
        let (command, limit, input) = {
            let inner = registry.inner();
            let Some(command) = inner.config.policy.command.clone() else {
                self.pending = false;
                return;
            };
            (
                command,
                inner.config.policy.hook_timeout,
                hook_input(&inner),
            )
        };
        self.pending = false;
        self.running = true;
        let results = self.results.clone();
        tokio::spawn(async move {
            let _ = results.send(hook::run(&command, &input, limit).await).await;
        });
    }
}

/// What the hook is told.
fn hook_input(inner: &Inner) -> HookInput {
    let now = unix_now();
    let links = inner.links.as_ref();
    HookInput {
        time: now,
        config_mode: inner.config.policy.mode,
        operator_override: inner
            .mode_override
            .filter(|o| o.in_force(now))
            .map(|o| OverrideInput {
                mode: o.mode,
                until: o.until,
            }),
        links: links.map(|l| l.links().to_vec()).unwrap_or_default(),
        builders: inner
            .config
            .builders
            .iter()
            .map(|b| {
                let tracker = inner.health.get(&b.name);
                let failure = tracker.and_then(|t| t.failure());
                let address = inner.addresses.get(&b.name);
                BuilderInput {
                    name: b.name.clone(),
                    address: b.address.clone(),
                    healthy: failure.is_none(),
                    health_reason: failure.map(ToString::to_string),
                    drained: inner.drained.contains(&b.name),
                    rtt_ms: tracker
                        .and_then(|t| t.last_rtt())
                        .map(|d| d.as_secs_f64() * 1e3),
                    kernel_rtt_ms: inner
                        .paths
                        .get(&b.name)
                        .and_then(|p| p.rtt())
                        .map(|d| d.as_secs_f64() * 1e3),
                    egress: links
                        .zip(address)
                        .and_then(|(l, ip)| l.egress(*ip).cloned()),
                    active_connections: inner.active.get(&b.name).copied().unwrap_or(0),
                    weight: b.weight,
                    load: crate::operate::report::load_status(inner, b),
                }
            })
            .collect(),
    }
}

impl Controller {
    pub(super) async fn hook_finished(&mut self, result: Result<Decision, HookError>) {
        if self.take_hook_result(result) {
            self.apply_logged().await;
        }
    }

    /// Keeps a valid decision of the hook; returns whether the decision in
    /// force changed.
    fn take_hook_result(&self, result: Result<Decision, HookError>) -> bool {
        let mut inner = self.registry.inner();
        match result {
            Ok(decision) => {
                let unknown: Vec<&String> = decision
                    .weights
                    .keys()
                    .filter(|n| inner.config.builder(n).is_none())
                    .collect();
                if !unknown.is_empty() {
                    let unknown: Vec<String> =
                        unknown.iter().map(|n| escape(n.as_bytes())).collect();
                    warn!(
                        ?unknown,
                        "policy hook named unknown builders; decision ignored, the declarative one stays in force"
                    );
                    return false;
                }
                if inner.hook.as_ref() == Some(&decision) {
                    return false;
                }
                info!(
                    mode = ?decision.mode,
                    weights = ?decision.weights,
                    reason = decision.reason.as_deref().map(|r| escape(r.as_bytes())),
                    "policy hook decided"
                );
                inner.hook = Some(decision);
                true
            }
            Err(e) => {
                warn!(error = %e, "policy hook failed; the declarative decision stays in force");
                inner.hook.take().is_some()
            }
        }
    }
}
