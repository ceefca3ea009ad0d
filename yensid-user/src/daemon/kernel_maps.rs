//! Writing a plan into the kernel's maps: builders, services, their
//! backends and affinity tables, and the claimed prefixes, by stable map
//! indices.

use std::collections::{BTreeSet, HashMap};

use anyhow::{Context, Result};
use yensid_ebpf::maps::{Backend, BuilderState, ServiceState, refusal};

use super::Controller;
use crate::{
    config::Config,
    decide::policy::{self, Plan, Refusal},
    kernel::bpf::{self, Kernel},
};

/// Stable small numbers for names (map indices), reused only after a name
/// has left.
pub(super) struct Indices {
    pub(super) by_name: HashMap<String, u32>,
    pub(super) limit: u32,
}

impl Indices {
    pub(super) fn new(limit: u32) -> Self {
        Self {
            by_name: HashMap::new(),
            limit,
        }
    }

    pub(super) fn get_or_assign(&mut self, name: &str) -> Result<u32> {
        if let Some(&i) = self.by_name.get(name) {
            return Ok(i);
        }
        let used: BTreeSet<u32> = self.by_name.values().copied().collect();
        let free = (0..self.limit)
            .find(|i| !used.contains(i))
            .with_context(|| format!("more than {} entries", self.limit))?;
        self.by_name.insert(name.to_owned(), free);
        Ok(free)
    }

    pub(super) fn retain(&mut self, keep: impl Fn(&str) -> bool) -> Vec<u32> {
        let gone: Vec<String> = self.by_name.keys().filter(|n| !keep(n)).cloned().collect();
        gone.iter().filter_map(|n| self.by_name.remove(n)).collect()
    }
}

impl Controller {
    pub(super) async fn apply_kernel(
        &mut self,
        kernel: &Kernel,
        config: &Config,
        plan: &Plan,
    ) -> Result<()> {
        for (builder, bp) in config.builders.iter().zip(&plan.builders) {
            let index = self.builders.get_or_assign(&builder.name)?;
            let first_time = !self
                .registry
                .inner()
                .builder_index
                .contains_key(&builder.name);
            if first_time {
                // The kernel's count restarts from whatever it holds, with
                // the connections a predecessor handed over (none at a
                // plain start).
                let open = self
                    .registry
                    .inner()
                    .active
                    .get(&builder.name)
                    .copied()
                    .unwrap_or(0);
                let assigned = kernel.assigned(index)?;
                kernel.set_released(index, assigned.wrapping_sub(open))?;
                self.registry.adopt_index(&builder.name, index);
            }
            let weight = self.registry.inner().weight(&builder.name);
            kernel.set_builder(
                index,
                BuilderState {
                    weight,
                    max_connections: builder.max_connections.unwrap_or(0),
                    eligible: bp.eligible as u32,
                    load_cost: self.registry.inner().load_cost(&builder.name),
                },
            )?;
        }
        let mut wanted_listeners = BTreeSet::new();
        let mut bindings = Vec::new();
        for (svc, sp) in config.services.iter().zip(&plan.services) {
            let service = self.services.get_or_assign(&svc.name)?;
            let mut backends = Vec::new();
            for member in &sp.members {
                let name = &member.builder;
                let key = (svc.name.clone(), name.clone());
                wanted_listeners.insert(key.clone());
                let listener = match self.listeners.get(&key) {
                    Some(h) => h.id,
                    None => self.open_listener(kernel, svc, name).await?,
                };
                backends.push(Backend {
                    builder: self.builders.get_or_assign(name)?,
                    listener,
                    eligible: member.excluded.is_none() as u32,
                    _reserved: 0,
                });
            }
            let positions: Vec<u32> = self
                .registry
                .inner()
                .affinity
                .get(&svc.name)
                .map(|table| {
                    table
                        .iter()
                        .map(|n| svc.builders.iter().position(|b| b == n).unwrap_or(0) as u32)
                        .collect()
                })
                .unwrap_or_default();
            kernel.set_affinity(service, &positions)?;
            kernel.set_backends(
                service,
                &backends,
                ServiceState {
                    accept: sp.refusal.is_none() as u32,
                    strategy: svc.strategy.kernel_id(),
                    backends: backends.len() as u32,
                    refusal: match sp.refusal {
                        Some(Refusal::TooFewEligible { .. }) => refusal::NO_BUILDER,
                        _ => refusal::MODE_LOCAL,
                    },
                },
            )?;
            for prefix in &svc.listen {
                let (addr, len) = prefix.mapped();
                bindings.push((bpf::binding_key(svc.port, &addr, len), service));
            }
        }
        kernel.set_bindings(&bindings)?;
        self.sync_queue_listeners(kernel, config)?;
        let local_services: Vec<_> = config
            .services
            .iter()
            .filter_map(|s| Some((*self.services.by_name.get(&s.name)?, s.local_clients)))
            .collect();
        crate::decide::local::sync(kernel, &self.registry, config, &local_services);
        let names: BTreeSet<&str> = config.services.iter().map(|s| s.name.as_str()).collect();
        for gone in self.services.retain(|n| names.contains(n)) {
            kernel.set_service(gone, ServiceState::default())?;
        }
        self.retire_listeners(|key| wanted_listeners.contains(key));
        Ok(())
    }

    /// Rebuilds each service's affinity table from the previous one, so
    /// clients keep their builder across reloads (see `policy`).
    pub(super) fn update_affinity(&self, config: &Config) {
        let mut inner = self.registry.inner();
        let mut tables = HashMap::new();
        for svc in &config.services {
            // The weights in force: the hook's where it gave some.
            let members: Vec<(String, u32)> = svc
                .builders
                .iter()
                .map(|n| (n.clone(), inner.weight(n)))
                .collect();
            let previous = inner.affinity.remove(&svc.name).unwrap_or_default();
            tables.insert(
                svc.name.clone(),
                policy::affinity_table(&previous, &members),
            );
        }
        inner.affinity = tables;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_are_stable_and_reused_after_removal() {
        let mut i = Indices::new(3);
        assert_eq!(i.get_or_assign("a").unwrap(), 0);
        assert_eq!(i.get_or_assign("b").unwrap(), 1);
        assert_eq!(i.get_or_assign("a").unwrap(), 0);
        assert_eq!(i.retain(|n| n != "a"), vec![0]);
        assert_eq!(i.get_or_assign("c").unwrap(), 0);
        assert_eq!(i.get_or_assign("d").unwrap(), 2);
        assert!(i.get_or_assign("e").is_err());
    }
}
