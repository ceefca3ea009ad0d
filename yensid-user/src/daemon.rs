//! `yensid run`: the controller. It owns the configuration and the
//! builders' state, asks `policy` for a plan whenever something changes,
//! writes the plan into the kernel's maps, and runs one listener per
//! (service, builder) whose accepted connections go to `proxy`.
//!
//! Without BPF (no privileges, old kernel) the same daemon binds the
//! services' addresses itself, chooses builders in userspace with the same
//! selection code, and copies bytes in userspace.

use std::{
    collections::{BTreeSet, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use tokio::{
    net::{TcpListener, TcpStream},
    signal::unix::{SignalKind, signal},
    sync::Notify,
    task::JoinHandle,
};
use tracing::{error, info, warn};
use yensid_ebpf::{
    maps::{
        AFFINITY_SLOTS, Backend, BuilderState, MAX_BUILDERS, MAX_LISTENERS, MAX_SERVICES,
        ServiceState,
    },
    select::{self, Candidate, Draw, Pool},
};

use crate::{
    bpf::{self, Kernel},
    config::{Config, Dataplane, Mode, Service},
    policy::{self, Plan, Refusal, Snapshot, Unavailable},
    proxy::{self, DataPath, Dispatcher, Outcome},
};

/// How long an upstream connect may take before the next builder is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// First and longest wait before a builder that failed is tried again.
const RETRY_FIRST: Duration = Duration::from_secs(5);
const RETRY_MAX: Duration = Duration::from_secs(120);
/// How long a listener that left the plan keeps accepting what the kernel
/// already queued on it.
const LISTENER_GRACE: Duration = Duration::from_secs(2);

pub async fn run(config_path: &Path) -> Result<()> {
    let config = Config::load(config_path)
        .with_context(|| format!("invalid configuration {}", config_path.display()))?;
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
    let shared = Arc::new(Shared::new(config, kernel.clone()));
    let mut controller = Controller {
        config_path: config_path.to_owned(),
        shared: shared.clone(),
        path,
        listeners: HashMap::new(),
        services: Indices::new(MAX_SERVICES),
        builders: Indices::new(MAX_BUILDERS),
        listener_ids: Indices::new(MAX_LISTENERS),
        last_plan: None,
    };
    let result = match controller.apply().await {
        Ok(()) => controller.serve().await,
        Err(e) => Err(e),
    };
    let cut = shared.inner().active.values().sum::<u64>();
    controller.close_all();
    for (builder, t) in &shared.inner().totals {
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

/// State shared by the controller and the connection tasks.
pub struct Shared {
    kernel: Option<Arc<Kernel>>,
    inner: Mutex<Inner>,
    replan: Notify,
}

struct Inner {
    config: Arc<Config>,
    unavailable: HashMap<String, Failure>,
    /// Open connections per builder, as userspace counts them.
    active: HashMap<String, u64>,
    /// What userspace last wrote to the kernel's RELEASED map, by index.
    released: HashMap<u32, u64>,
    builder_index: HashMap<String, u32>,
    /// Per service, the affinity table by builder name.
    affinity: HashMap<String, Vec<String>>,
    totals: HashMap<String, BuilderTotals>,
    sequence: u64,
}

/// What a builder served over the daemon's life.
#[derive(Debug, Default)]
struct BuilderTotals {
    connections: u64,
    /// Clients steered to this builder that did not speak SSH.
    rejected_clients: u64,
    /// Connections moved away from this builder because it failed.
    failed_over: u64,
    to_builder: u64,
    from_builder: u64,
}

struct Failure {
    reason: String,
    failures: u32,
    retry_at: Instant,
}

impl Shared {
    fn new(config: Config, kernel: Option<Arc<Kernel>>) -> Self {
        Self {
            kernel,
            inner: Mutex::new(Inner {
                config: Arc::new(config),
                unavailable: HashMap::new(),
                active: HashMap::new(),
                released: HashMap::new(),
                builder_index: HashMap::new(),
                affinity: HashMap::new(),
                totals: HashMap::new(),
                sequence: 0,
            }),
            replan: Notify::new(),
        }
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("daemon state poisoned")
    }

    /// A connection counted for `builder` was accepted.
    fn accepted(&self, builder: &str) {
        *self.inner().active.entry(builder.to_owned()).or_default() += 1;
    }

    /// Moves one connection's count in the kernel: `delta` is added to the
    /// RELEASED counter of `builder` (wrapping, see the map's docs).
    fn adjust_released(&self, inner: &mut Inner, builder: &str, delta: i64) {
        let (Some(kernel), Some(&index)) = (&self.kernel, inner.builder_index.get(builder)) else {
            return;
        };
        let released = inner.released.entry(index).or_default();
        *released = released.wrapping_add_signed(delta);
        if let Err(e) = kernel.set_released(index, *released) {
            error!(builder, error = %e, "cannot update the kernel's connection count");
        }
    }

    /// Chooses a builder for a connection the kernel did not steer (the
    /// userspace fallback), and counts it.
    fn route(&self, service: &str, peer: SocketAddr) -> Option<String> {
        let mut inner = self.inner();
        let config = inner.config.clone();
        let svc = config.services.iter().find(|s| s.name == service)?;
        if effective_mode(&config) == Mode::Local {
            return None;
        }
        inner.sequence += 1;
        let affinity = inner.affinity.get(service).and_then(|table| {
            let slot = select::client_hash(address_words(peer.ip())) % AFFINITY_SLOTS;
            let name = table.get(slot as usize)?;
            let b = config.builder(name)?;
            let active = inner.active.get(name).copied().unwrap_or(0);
            let eligible = !inner.unavailable.contains_key(name);
            let available =
                Candidate::new(b.weight, b.max_connections.unwrap_or(0), eligible, active)
                    .available;
            let position = svc.builders.iter().position(|b| b == name)?;
            available.then_some(position as u32)
        });
        let draw = Draw {
            random: rand_u32(),
            sequence: inner.sequence,
            affinity,
        };
        let chosen = choose_in_userspace(&inner, svc, &[], &draw)?;
        *inner.active.entry(chosen.clone()).or_default() += 1;
        Some(chosen)
    }
}

fn effective_mode(config: &Config) -> Mode {
    config.policy.mode
}

/// The shared selection code over userspace's view of a service.
fn choose_in_userspace(
    inner: &Inner,
    svc: &Service,
    exclude: &[String],
    draw: &Draw,
) -> Option<String> {
    let mut pool = Pool::new();
    for name in &svc.builders {
        let b = inner.config.builder(name);
        let eligible = !exclude.contains(name) && !inner.unavailable.contains_key(name);
        pool.push(Candidate::new(
            b.map_or(0, |b| b.weight),
            b.and_then(|b| b.max_connections).unwrap_or(0),
            eligible,
            inner.active.get(name).copied().unwrap_or(0),
        ));
    }
    let position = select::choose(svc.strategy.kernel_id(), &pool, draw)?;
    svc.builders.get(position as usize).cloned()
}

/// A client address as the kernel hashes it: IPv4 mapped into IPv6, four
/// big-endian words.
fn address_words(ip: IpAddr) -> [u32; 4] {
    let octets = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    };
    let word =
        |i: usize| u32::from_be_bytes([octets[i], octets[i + 1], octets[i + 2], octets[i + 3]]);
    [word(0), word(4), word(8), word(12)]
}

fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    h.finish() as u32
}

impl Dispatcher for Shared {
    fn address(&self, builder: &str) -> Option<String> {
        self.inner()
            .config
            .builder(builder)
            .map(|b| b.address.clone())
    }

    fn connect_timeout(&self) -> Duration {
        CONNECT_TIMEOUT
    }

    fn fail_over(
        &self,
        service: &str,
        failed: &str,
        reason: &str,
        tried: &[String],
    ) -> Option<String> {
        let mut inner = self.inner();
        let failures = inner.unavailable.get(failed).map_or(0, |f| f.failures) + 1;
        let wait = RETRY_FIRST
            .saturating_mul(1 << (failures - 1).min(10))
            .min(RETRY_MAX);
        warn!(
            builder = failed,
            reason,
            retry_in_seconds = wait.as_secs(),
            "builder marked unavailable"
        );
        inner.unavailable.insert(
            failed.to_owned(),
            Failure {
                reason: reason.to_owned(),
                failures,
                retry_at: Instant::now() + wait,
            },
        );
        self.replan.notify_one();
        inner.totals.entry(failed.to_owned()).or_default().failed_over += 1;
        let config = inner.config.clone();
        let svc = config.services.iter().find(|s| s.name == service)?;
        inner.sequence += 1;
        let draw = Draw {
            random: rand_u32(),
            sequence: inner.sequence,
            affinity: None,
        };
        let next = choose_in_userspace(&inner, svc, tried, &draw)?;
        if let Some(n) = inner.active.get_mut(failed) {
            *n = n.saturating_sub(1);
        }
        *inner.active.entry(next.clone()).or_default() += 1;
        self.adjust_released(&mut inner, failed, 1);
        self.adjust_released(&mut inner, &next, -1);
        Some(next)
    }

    fn finished(&self, builder: &str, outcome: &Outcome) {
        let mut inner = self.inner();
        if let Some(n) = inner.active.get_mut(builder) {
            *n = n.saturating_sub(1);
        }
        let totals = inner.totals.entry(builder.to_owned()).or_default();
        if outcome.rejected {
            totals.rejected_clients += 1;
        } else if !outcome.unserved {
            totals.connections += 1;
            totals.to_builder += outcome.to_builder;
            totals.from_builder += outcome.from_builder;
        }
        if !outcome.unserved && !outcome.rejected && inner.unavailable.remove(builder).is_some() {
            info!(builder, "builder served a connection again");
            self.replan.notify_one();
        }
        self.adjust_released(&mut inner, builder, 1);
    }
}

struct ListenerHandle {
    id: u32,
    task: JoinHandle<()>,
}

struct Controller {
    config_path: PathBuf,
    shared: Arc<Shared>,
    path: DataPath,
    /// Keyed by (service, builder); in the fallback by (service, address).
    listeners: HashMap<(String, String), ListenerHandle>,
    services: Indices,
    builders: Indices,
    listener_ids: Indices,
    last_plan: Option<Plan>,
}

impl Controller {
    async fn serve(&mut self) -> Result<()> {
        let mut hangup = signal(SignalKind::hangup())?;
        let mut terminate = signal(SignalKind::terminate())?;
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let shared = self.shared.clone();
        let config = self.shared.inner().config.clone();
        info!(
            services = config.services.len(),
            builders = config.builders.len(),
            dataplane = match self.path {
                DataPath::Kernel(_) => "kernel",
                DataPath::Userspace => "userspace",
            },
            bpf = self.shared.kernel.is_some(),
            "yensid ready"
        );
        loop {
            tokio::select! {
                _ = hangup.recv() => self.reload().await,
                _ = terminate.recv() => return Ok(()),
                _ = interrupt.recv() => return Ok(()),
                _ = shared.replan.notified() => self.apply_logged().await,
                _ = tick.tick() => {
                    if self.expire_failures() {
                        self.apply_logged().await;
                    }
                }
            }
        }
    }

    async fn reload(&mut self) {
        match Config::load(&self.config_path) {
            Ok(mut config) => {
                let running = self.shared.inner().config.clone();
                if config.daemon != running.daemon {
                    config.daemon = running.daemon.clone();
                    warn!("[daemon] settings (pin_path, dataplane) change only with a restart; keeping the running ones");
                }
                info!(path = %self.config_path.display(), "configuration reloaded");
                self.shared.inner().config = Arc::new(config);
                self.apply_logged().await;
            }
            Err(e) => {
                error!(path = %self.config_path.display(), error = %e, "reload refused; keeping the running configuration")
            }
        }
    }

    /// Builders whose retry time has come become candidates again.
    fn expire_failures(&self) -> bool {
        let now = Instant::now();
        let mut inner = self.shared.inner();
        let before = inner.unavailable.len();
        inner.unavailable.retain(|name, f| {
            let keep = f.retry_at > now;
            if !keep {
                info!(
                    builder = name,
                    after_failures = f.failures,
                    "retrying builder"
                );
            }
            keep
        });
        inner.unavailable.len() != before
    }

    async fn apply_logged(&mut self) {
        if let Err(e) = self.apply().await {
            error!(error = format!("{e:#}"), "cannot apply the plan");
        }
    }

    /// Computes the plan for the current state and makes it so.
    async fn apply(&mut self) -> Result<()> {
        let (config, plan) = {
            let inner = self.shared.inner();
            let unavailable: HashMap<String, Unavailable> = inner
                .unavailable
                .iter()
                .map(|(n, f)| {
                    (
                        n.clone(),
                        Unavailable::Failed {
                            reason: f.reason.clone(),
                        },
                    )
                })
                .collect();
            let plan = policy::decide(Snapshot {
                config: &inner.config,
                mode: effective_mode(&inner.config),
                unavailable: &unavailable,
            });
            (inner.config.clone(), plan)
        };
        self.log_changes(&plan);
        match self.shared.kernel.clone() {
            Some(kernel) => self.apply_kernel(&kernel, &config, &plan).await?,
            None => self.apply_fallback(&config).await?,
        }
        self.last_plan = Some(plan);
        Ok(())
    }

    async fn apply_kernel(&mut self, kernel: &Kernel, config: &Config, plan: &Plan) -> Result<()> {
        for (builder, bp) in config.builders.iter().zip(&plan.builders) {
            let index = self.builders.get_or_assign(&builder.name)?;
            let first_time = self
                .shared
                .inner()
                .builder_index
                .insert(builder.name.clone(), index)
                .is_none();
            if first_time {
                // No connection of this daemon is open to a new index: the
                // kernel's count restarts from whatever it holds.
                let assigned = kernel.assigned(index)?;
                self.shared.inner().released.insert(index, assigned);
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
            let members: Vec<(String, u32)> = svc
                .builders
                .iter()
                .map(|n| (n.clone(), config.builder(n).map_or(1, |b| b.weight)))
                .collect();
            let previous = self
                .shared
                .inner()
                .affinity
                .remove(&svc.name)
                .unwrap_or_default();
            let table = policy::affinity_table(&previous, &members);
            let positions: Vec<u32> = table
                .iter()
                .map(|n| svc.builders.iter().position(|b| b == n).unwrap_or(0) as u32)
                .collect();
            kernel.set_affinity(service, &positions)?;
            self.shared.inner().affinity.insert(svc.name.clone(), table);
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
        self.shared
            .inner()
            .affinity
            .retain(|n, _| names.contains(n.as_str()));
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
            self.shared.clone(),
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
                    self.shared.clone(),
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

    fn close_all(&mut self) {
        for (_, handle) in self.listeners.drain() {
            handle.task.abort();
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
    shared: Arc<Shared>,
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
                shared.accepted(b);
                b.clone()
            }
            None => match shared.route(&service, peer) {
                Some(b) => b,
                None => {
                    refuse(stream);
                    continue;
                }
            },
        };
        let dispatcher: Arc<dyn Dispatcher> = shared.clone();
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

    #[test]
    fn client_addresses_hash_as_the_kernel_sees_them() {
        let v4: IpAddr = "198.18.250.7".parse().unwrap();
        assert_eq!(address_words(v4), [0, 0, 0xffff, 0xc612_fa07]);
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(address_words(v6), [0x2001_0db8, 0, 0, 1]);
    }
}
