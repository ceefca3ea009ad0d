//! `yensid run`: the controller. It owns the configuration and the
//! operator's state, asks `policy` for a plan whenever something changes,
//! writes the plan into the kernel's maps, runs one listener per
//! (service, builder) whose accepted connections go to `proxy`, one probe
//! task per builder, and the control socket.
//!
//! Without BPF (no privileges, old kernel) the same daemon binds the
//! services' addresses itself, chooses builders in userspace with the same
//! selection code, and copies bytes in userspace.

use std::{
    collections::{BTreeSet, HashMap},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result};
use tokio::{
    net::{TcpListener, TcpStream},
    signal::unix::{SignalKind, signal},
    sync::mpsc,
    task::JoinHandle,
};
use tracing::{error, info, warn};
use yensid_ebpf::maps::{
    Backend, BuilderState, MAX_BUILDERS, MAX_LISTENERS, MAX_SERVICES, ServiceState,
};

use crate::{
    bpf::{self, Kernel},
    config::{Config, Dataplane, Service},
    control::{self, Pending, Reply, Request},
    health,
    policy::{self, Plan, Refusal, Snapshot},
    proxy::{self, DataPath, Dispatcher},
    registry::Registry,
    state::OperatorState,
};

/// How long a listener that left the plan keeps accepting what the kernel
/// already queued on it.
const LISTENER_GRACE: Duration = Duration::from_secs(2);

pub async fn run(config_path: &Path) -> Result<()> {
    let config = Config::load(config_path)
        .with_context(|| format!("invalid configuration {}", config_path.display()))?;
    let state_file = config.daemon.state_file();
    let state = OperatorState::load(&state_file)?;
    if !state.drained.is_empty() {
        info!(drained = ?state.drained, file = %state_file.display(), "drains restored");
    }
    let control = control::bind(&config.daemon.control_socket()).await?;
    let kernel = match Kernel::load(&config.daemon.pin_path) {
        Ok(kernel) => Some(Arc::new(kernel)),
        Err(e) => {
            error!(
                error = %brief(&e.to_string()),
                "BPF UNAVAILABLE: falling back to userspace. yensid binds the service addresses \
                 itself (host prefixes only) and copies every byte in userspace"
            );
            None
        }
    };
    let path = match (&kernel, config.daemon.dataplane) {
        (Some(k), Dataplane::Kernel) => DataPath::Kernel(k.clone()),
        _ => DataPath::Userspace,
    };
    let control_path = config.daemon.control_socket();
    let registry = Arc::new(Registry::new(config, state.drained, kernel.clone()));
    let (requests, incoming) = mpsc::channel(16);
    let control_task = tokio::spawn(control::serve(control, requests));
    let mut controller = Controller {
        config_path: config_path.to_owned(),
        state_file,
        registry: registry.clone(),
        path,
        listeners: HashMap::new(),
        probes: HashMap::new(),
        services: Indices::new(MAX_SERVICES),
        builders: Indices::new(MAX_BUILDERS),
        listener_ids: Indices::new(MAX_LISTENERS),
        last_plan: None,
    };
    let result = match controller.apply().await {
        Ok(()) => controller.serve(incoming).await,
        Err(e) => Err(e),
    };
    control_task.abort();
    let _ = std::fs::remove_file(&control_path);
    let cut = registry.inner().active.values().sum::<u64>();
    controller.close_all();
    for (builder, t) in &registry.inner().totals {
        info!(
            builder,
            connections = t.connections,
            rejected_clients = t.rejected_clients,
            failed_over = t.failed_over,
            to_builder = t.to_builder,
            from_builder = t.from_builder,
            "builder totals"
        );
    }
    if let Some(k) = &kernel {
        log_totals(k, &controller.services);
        release_kernel(k);
    }
    info!(open_connections_closed = cut, "yensid stopped");
    result
}

/// An error without the verifier's full log: its last lines say why.
fn brief(error: &str) -> String {
    match error.split_once("Verifier output:") {
        Some((head, log)) => {
            let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
            let tail = &lines[lines.len().saturating_sub(3)..];
            format!("{head}verifier: {}", tail.join(" | "))
        }
        None => error.to_owned(),
    }
}

/// Removes every pinned object. The programs detach when the process's
/// last file descriptors close, right after.
fn release_kernel(kernel: &Kernel) {
    if let Err(e) = kernel.remove_pins() {
        error!(error = %e, "could not remove pinned BPF objects");
    }
}

/// One line per service with what the kernel did over the daemon's life.
fn log_totals(kernel: &Kernel, services: &Indices) {
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

/// Stable small numbers for names (map indices), reused only after a name
/// has left.
struct Indices {
    by_name: HashMap<String, u32>,
    limit: u32,
}

impl Indices {
    fn new(limit: u32) -> Self {
        Self {
            by_name: HashMap::new(),
            limit,
        }
    }

    fn get_or_assign(&mut self, name: &str) -> Result<u32> {
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

    fn retain(&mut self, keep: impl Fn(&str) -> bool) -> Vec<u32> {
        let gone: Vec<String> = self.by_name.keys().filter(|n| !keep(n)).cloned().collect();
        gone.iter().filter_map(|n| self.by_name.remove(n)).collect()
    }
}

struct ListenerHandle {
    id: u32,
    task: JoinHandle<()>,
}

struct Controller {
    config_path: PathBuf,
    state_file: PathBuf,
    registry: Arc<Registry>,
    path: DataPath,
    /// One probe task per builder.
    probes: HashMap<String, JoinHandle<()>>,
    /// Keyed by (service, builder); in the fallback by (service, address).
    listeners: HashMap<(String, String), ListenerHandle>,
    services: Indices,
    builders: Indices,
    listener_ids: Indices,
    last_plan: Option<Plan>,
}

impl Controller {
    async fn serve(&mut self, mut requests: mpsc::Receiver<Pending>) -> Result<()> {
        let mut hangup = signal(SignalKind::hangup())?;
        let mut terminate = signal(SignalKind::terminate())?;
        let mut interrupt = signal(SignalKind::interrupt())?;
        let registry = self.registry.clone();
        let config = registry.inner().config.clone();
        info!(
            services = config.services.len(),
            builders = config.builders.len(),
            dataplane = match self.path {
                DataPath::Kernel(_) => "kernel",
                DataPath::Userspace => "userspace",
            },
            bpf = registry.kernel_loaded(),
            "yensid ready"
        );
        loop {
            tokio::select! {
                _ = hangup.recv() => self.reload().await,
                _ = terminate.recv() => return Ok(()),
                _ = interrupt.recv() => return Ok(()),
                _ = registry.replan.notified() => self.apply_logged().await,
                Some((request, reply)) = requests.recv() => {
                    let answer = self.handle(request).await;
                    let _ = reply.send(answer);
                }
            }
        }
    }

    /// Carries out an operator's request from the control socket.
    async fn handle(&mut self, request: Request) -> Reply {
        let (builder, drain) = match &request {
            Request::Drain { builder } => (builder, true),
            Request::Undrain { builder } => (builder, false),
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

    async fn reload(&mut self) {
        match Config::load(&self.config_path) {
            Ok(mut config) => {
                let running = self.registry.inner().config.clone();
                if config.daemon != running.daemon {
                    config.daemon = running.daemon.clone();
                    warn!(
                        "[daemon] settings (pin_path, dataplane) change only with a restart; keeping the running ones"
                    );
                }
                info!(path = %self.config_path.display(), "configuration reloaded");
                {
                    let mut inner = self.registry.inner();
                    inner.config = Arc::new(config);
                    inner.sync_health();
                }
                self.apply_logged().await;
            }
            Err(e) => {
                error!(path = %self.config_path.display(), error = %e, "reload refused; keeping the running configuration")
            }
        }
    }

    async fn apply_logged(&mut self) {
        if let Err(e) = self.apply().await {
            error!(error = format!("{e:#}"), "cannot apply the plan");
        }
    }

    /// Computes the plan for the current state and makes it so.
    async fn apply(&mut self) -> Result<()> {
        let (config, plan) = {
            let inner = self.registry.inner();
            let unavailable = inner.unavailable();
            let plan = policy::decide(Snapshot {
                config: &inner.config,
                mode: inner.config.policy.mode,
                unavailable: &unavailable,
            });
            (inner.config.clone(), plan)
        };
        self.sync_probes(&config);
        self.update_affinity(&config);
        self.log_changes(&plan);
        match self.registry.kernel() {
            Some(kernel) => self.apply_kernel(&kernel, &config, &plan).await?,
            None => self.apply_fallback(&config).await?,
        }
        self.last_plan = Some(plan);
        Ok(())
    }

    async fn apply_kernel(&mut self, kernel: &Kernel, config: &Config, plan: &Plan) -> Result<()> {
        for (builder, bp) in config.builders.iter().zip(&plan.builders) {
            let index = self.builders.get_or_assign(&builder.name)?;
            let first_time = !self
                .registry
                .inner()
                .builder_index
                .contains_key(&builder.name);
            if first_time {
                // No connection of this daemon is open to a new index: the
                // kernel's count restarts from whatever it holds.
                let assigned = kernel.assigned(index)?;
                self.registry.adopt_index(&builder.name, index, assigned);
                kernel.set_released(index, assigned)?;
            }
            kernel.set_builder(
                index,
                BuilderState {
                    weight: builder.weight,
                    max_connections: builder.max_connections.unwrap_or(0),
                    eligible: bp.eligible as u32,
                    _reserved: 0,
                },
            )?;
        }
        let mut wanted_listeners = BTreeSet::new();
        let mut bindings = Vec::new();
        for (svc, sp) in config.services.iter().zip(&plan.services) {
            let service = self.services.get_or_assign(&svc.name)?;
            let mut backends = Vec::new();
            for name in &svc.builders {
                let key = (svc.name.clone(), name.clone());
                wanted_listeners.insert(key.clone());
                let listener = match self.listeners.get(&key) {
                    Some(h) => h.id,
                    None => self.open_listener(kernel, svc, name).await?,
                };
                backends.push(Backend {
                    builder: self.builders.get_or_assign(name)?,
                    listener,
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
                    _reserved: 0,
                },
            )?;
            for prefix in &svc.listen {
                let (addr, len) = prefix.mapped();
                bindings.push((bpf::binding_key(svc.port, &addr, len), service));
            }
        }
        kernel.set_bindings(&bindings)?;
        let names: BTreeSet<&str> = config.services.iter().map(|s| s.name.as_str()).collect();
        for gone in self.services.retain(|n| names.contains(n)) {
            kernel.set_service(gone, ServiceState::default())?;
        }
        self.retire_listeners(|key| wanted_listeners.contains(key));
        Ok(())
    }

    /// Opens the loopback listener of one (service, builder) pair and
    /// registers it for the kernel to steer connections to.
    async fn open_listener(
        &mut self,
        kernel: &Kernel,
        svc: &Service,
        builder: &str,
    ) -> Result<u32> {
        let dual_stack = svc.listen.iter().any(|p| p.addr.is_ipv6());
        let bind: SocketAddr = if dual_stack {
            (Ipv6Addr::LOCALHOST, 0).into()
        } else {
            (Ipv4Addr::LOCALHOST, 0).into()
        };
        let socket = if dual_stack {
            let s = tokio::net::TcpSocket::new_v6()?;
            set_v6only(&s, false)?;
            s
        } else {
            tokio::net::TcpSocket::new_v4()?
        };
        socket.bind(bind)?;
        let listener = socket.listen(1024)?;
        let key = format!("{}/{}", svc.name, builder);
        let id = self.listener_ids.get_or_assign(&key)?;
        kernel.register_listener(id, &listener)?;
        let task = tokio::spawn(accept_loop(
            listener,
            svc.name.clone(),
            Some(builder.to_owned()),
            self.registry.clone(),
            self.path.clone(),
        ));
        self.listeners.insert(
            (svc.name.clone(), builder.to_owned()),
            ListenerHandle { id, task },
        );
        Ok(id)
    }

    /// Closes listeners that left the plan, after a grace period for
    /// connections the kernel already queued on them.
    fn retire_listeners(&mut self, keep: impl Fn(&(String, String)) -> bool) {
        let gone: Vec<(String, String)> = self
            .listeners
            .keys()
            .filter(|k| !keep(k))
            .cloned()
            .collect();
        for key in gone {
            if let Some(handle) = self.listeners.remove(&key) {
                self.listener_ids
                    .retain(|n| n != format!("{}/{}", key.0, key.1));
                tokio::spawn(async move {
                    tokio::time::sleep(LISTENER_GRACE).await;
                    handle.task.abort();
                });
            }
        }
    }

    /// Without BPF: bind the services' host addresses directly.
    async fn apply_fallback(&mut self, config: &Config) -> Result<()> {
        let mut wanted = BTreeSet::new();
        for svc in &config.services {
            for prefix in &svc.listen {
                if !prefix.is_host() {
                    warn!(service = svc.name, %prefix, "cannot claim a whole prefix without BPF; skipped");
                    continue;
                }
                let addr = SocketAddr::new(prefix.addr, svc.port);
                let key = (svc.name.clone(), addr.to_string());
                wanted.insert(key.clone());
                if self.listeners.contains_key(&key) {
                    continue;
                }
                let listener = TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("service {}: cannot bind {addr}", svc.name))?;
                let task = tokio::spawn(accept_loop(
                    listener,
                    svc.name.clone(),
                    None,
                    self.registry.clone(),
                    DataPath::Userspace,
                ));
                self.listeners.insert(key, ListenerHandle { id: 0, task });
            }
        }
        self.retire_listeners(|key| wanted.contains(key));
        Ok(())
    }

    fn log_changes(&self, plan: &Plan) {
        for sp in &plan.services {
            let before = self
                .last_plan
                .as_ref()
                .and_then(|p| p.services.iter().find(|s| s.name == sp.name))
                .map(|s| &s.refusal);
            if before == Some(&sp.refusal) {
                continue;
            }
            match &sp.refusal {
                None => info!(service = sp.name, "service sends connections to builders"),
                Some(Refusal::ModeLocal) => {
                    info!(service = sp.name, reason = %Refusal::ModeLocal, "service refuses connections: clients build locally")
                }
                Some(r) => {
                    warn!(service = sp.name, reason = %r, "service refuses connections: clients build locally")
                }
            }
        }
    }

    /// Rebuilds each service's affinity table from the previous one, so
    /// clients keep their builder across reloads (see `policy`).
    fn update_affinity(&self, config: &Config) {
        let mut inner = self.registry.inner();
        let mut tables = HashMap::new();
        for svc in &config.services {
            let members: Vec<(String, u32)> = svc
                .builders
                .iter()
                .map(|n| (n.clone(), config.builder(n).map_or(1, |b| b.weight)))
                .collect();
            let previous = inner.affinity.remove(&svc.name).unwrap_or_default();
            tables.insert(
                svc.name.clone(),
                policy::affinity_table(&previous, &members),
            );
        }
        inner.affinity = tables;
    }

    /// One probe task per configured builder; tasks of removed builders
    /// stop, new builders get one.
    fn sync_probes(&mut self, config: &Config) {
        self.probes.retain(|name, task| {
            let keep = config.builder(name).is_some();
            if !keep {
                task.abort();
            }
            keep
        });
        for b in &config.builders {
            if !self.probes.contains_key(&b.name) {
                let task = tokio::spawn(probe_loop(self.registry.clone(), b.name.clone()));
                self.probes.insert(b.name.clone(), task);
            }
        }
    }

    fn close_all(&mut self) {
        for (_, handle) in self.listeners.drain() {
            handle.task.abort();
        }
        for (_, task) in self.probes.drain() {
            task.abort();
        }
    }
}

fn set_v6only(socket: &tokio::net::TcpSocket, on: bool) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let value: libc::c_int = on as libc::c_int;
    // SAFETY: valid fd, pointer to a c_int of the given size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Accepts connections. With `builder` set the kernel already chose (the
/// listener is that builder's); without, userspace chooses.
async fn accept_loop(
    listener: TcpListener,
    service: String,
    builder: Option<String>,
    registry: Arc<Registry>,
    path: DataPath,
) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                warn!(service, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let chosen = match &builder {
            Some(b) => {
                registry.accepted(b);
                b.clone()
            }
            None => match registry.route(&service, peer) {
                Some(b) => b,
                None => {
                    refuse(stream);
                    continue;
                }
            },
        };
        let dispatcher: Arc<dyn Dispatcher> = registry.clone();
        let service = service.clone();
        let path = path.clone();
        tokio::spawn(async move {
            proxy::serve(stream, &service, chosen, dispatcher, path).await;
        });
    }
}

/// Closes with RST: the userspace equivalent of the kernel's refusal.
fn refuse(stream: TcpStream) {
    let _ = crate::sock::reset_on_close(&stream);
}

/// Probes one builder for as long as it is configured, at the times its
/// health tracker asks for.
async fn probe_loop(registry: Arc<Registry>, builder: String) {
    loop {
        let (next, address, limit) = {
            let inner = registry.inner();
            let (Some(tracker), Some(config)) =
                (inner.health.get(&builder), inner.config.builder(&builder))
            else {
                return;
            };
            (
                tracker.next_probe(),
                config.address.clone(),
                tracker.settings().timeout,
            )
        };
        tokio::time::sleep_until(next.into()).await;
        let result = health::probe(&address, limit).await;
        registry.probed(&builder, result);
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
