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
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result};
use std::os::fd::{AsFd, OwnedFd};
use tokio::{
    io::unix::AsyncFd,
    net::{TcpListener, TcpStream},
    signal::unix::{Signal, SignalKind, signal},
    sync::{mpsc, watch},
    task::JoinHandle,
};
use tracing::{error, info, warn};
use yensid_ebpf::maps::{
    Backend, BuilderState, MAX_BUILDERS, MAX_LISTENERS, MAX_SERVICES, ServiceState, queue_listener,
    refusal,
};

use crate::{
    config::{Config, ConfigError, Dataplane, Mode, Service, WhenFull, describe_duration},
    dataplane::admission::Quiet,
    dataplane::handover::{self, Recaller},
    dataplane::ident::escape,
    dataplane::proxy::{self, DataPath},
    dataplane::queue,
    decide::health,
    decide::hook::{self, BuilderInput, Decision, HookError, HookInput, OverrideInput},
    decide::link::{self, LinkState},
    decide::policy::{self, Plan, Refusal, Snapshot},
    decide::registry::Registry,
    decide::scrape::Scrapers,
    kernel::bpf::{self, Kernel},
    kernel::hangup::Hangups,
    kernel::local_route::{self, LocalRoutes},
    kernel::path,
    operate::access::{Access, Group},
    operate::control::{self, ModeChange, Pending, Reply, Request},
    operate::fdstore,
    operate::metrics,
    operate::notify,
    operate::report,
    operate::status::PrefixDelivery,
    preflight,
    state::{ModeOverride, OperatorState, unix_now, unix_now_rounded_up},
};

mod takeover;

/// How long a listener that left the plan keeps accepting what the kernel
/// already queued on it.
const LISTENER_GRACE: Duration = Duration::from_secs(2);

pub use takeover::start_successor;

pub async fn run(
    config_path: &Path,
    require_predecessor: bool,
    stored: fdstore::Stored,
) -> Result<()> {
    let config = Config::load(config_path)
        .with_context(|| format!("invalid configuration {}", config_path.display()))?;
    let problems = preflight::check(&config);
    if !problems.is_empty() {
        anyhow::bail!(
            "configuration {} cannot run on this host: {}",
            config_path.display(),
            ConfigError::Invalid(problems)
        );
    }
    raise_descriptor_limit();
    let state_file = config.daemon.state_file();
    let mut state = load_state(&state_file, &config);
    if !state.drained.is_empty() {
        info!(drained = ?state.drained, file = %state_file.display(), "drains restored");
    }
    match state.mode_override {
        Some(o) if o.in_force(unix_now()) => {
            info!(mode = %o.mode, until = ?o.until, "mode override restored");
        }
        Some(o) => {
            info!(mode = %o.mode, "mode override expired while the daemon was down");
            state.mode_override = None;
            if let Err(e) = state.save(&state_file) {
                warn!(error = %e, "cannot record that the override expired");
            }
        }
        None => {}
    }
    let access = Access {
        read: config
            .daemon
            .read_group
            .as_deref()
            .map(|name| Group::resolve("daemon.read_group", name))
            .transpose()?,
        control: config
            .policy
            .control_group
            .as_deref()
            .map(|name| Group::resolve("policy.control_group", name))
            .transpose()?,
    };
    // A daemon of this instance that runs hands its listeners and live
    // connections over (see `dataplane::handover`).
    let handover_path =
        handover::socket_path(&config.daemon.runtime_dir, &config.daemon.instance());
    // Taken first, so that no child process inherits it.
    let report = takeover::report_pipe();
    fdstore::init();
    let predecessor = takeover::greet(&handover_path).await?;
    if require_predecessor && predecessor.is_none() {
        anyhow::bail!(
            "--take-over: no daemon of instance `{}` runs (nothing listens on {})",
            config.daemon.instance(),
            handover_path.display()
        );
    }
    let control = match &predecessor {
        Some(_) => None,
        None => Some(control::bind(&config.daemon.control_socket(), &access).await?),
    };
    let read_gid = access.read.as_ref().map(|g| g.gid);
    let kernel = match Kernel::load(&config.daemon.pin_path, read_gid) {
        Ok(kernel) => Some(Arc::new(kernel)),
        // A pin directory that is not yensid's own is the operator's
        // mistake, not a missing capability: no fallback.
        Err(e @ bpf::BpfError::PinPath { .. }) => return Err(e.into()),
        Err(e) => {
            error!(
                error = %brief(&e.to_string()),
                "BPF UNAVAILABLE: falling back to userspace. yensid binds the service addresses \
                 itself (host prefixes only) and copies every byte in userspace"
            );
            None
        }
    };
    let splicer = match &kernel {
        Some(k) => Some((
            k.clone(),
            Hangups::new().context("cannot create the epoll instance for spliced connections")?,
        )),
        None => None,
    };
    let (path, forward_reason) = match (&splicer, config.daemon.dataplane) {
        (Some((k, hangups)), Dataplane::Kernel) => {
            let (forward, why) = config.daemon.forward.resolve(fdstore::available());
            (DataPath::Kernel(k.clone(), hangups.clone(), forward), why)
        }
        _ => (
            DataPath::Userspace,
            "the userspace dataplane always splices",
        ),
    };
    let mut inherited = match predecessor {
        Some(predecessor) => Some(predecessor.receive(kernel.is_some()).await?),
        None => None,
    };
    let control = match (control, inherited.as_mut().and_then(|i| i.control.take())) {
        (Some(bound), _) => bound,
        (None, Some(fd)) => takeover::unix_listener(fd).context("the inherited control socket")?,
        (None, None) => control::bind(&config.daemon.control_socket(), &access).await?,
    };
    let control_path = config.daemon.control_socket();
    let links = watch_links(&config).await;
    let registry = Arc::new(Registry::new(config, state, kernel.clone()));
    let mut stop_signals = StopSignals::new()?;
    let (requests, mut incoming) = mpsc::channel(16);
    let (hook_results, hook_incoming) = mpsc::channel(1);
    let metrics_listen = registry.inner().config.metrics_listen;
    let metrics = match metrics_listen {
        Some(listen) => {
            let inherited_metrics = inherited.as_mut().and_then(|i| i.metrics.take());
            let listener = match takeover::tcp_listener_at(inherited_metrics, listen) {
                Some(listener) => listener,
                None => metrics::bind(listen)
                    .await
                    .with_context(|| format!("cannot serve metrics on {listen}"))?,
            };
            Some(Endpoint::start_metrics(listener, requests.clone())?)
        }
        None => None,
    };
    let control = Endpoint::start_control(control, requests.clone(), access.clone())?;
    let mut controller = Controller {
        config_path: config_path.to_owned(),
        state_file,
        registry: registry.clone(),
        path,
        forward_reason,
        splicer,
        listeners: HashMap::new(),
        probes: HashMap::new(),
        scrapers: Scrapers::default(),
        services: Indices::new(MAX_SERVICES),
        builders: Indices::new(MAX_BUILDERS),
        listener_ids: Indices::new(MAX_LISTENERS),
        queue_listeners: HashMap::new(),
        links,
        local_routes: open_local_routes(),
        hook: HookRunner {
            results: hook_results,
            running: false,
            pending: true,
        },
        recaller: Recaller::default(),
        requests,
        access,
        control,
        metrics,
        handover: None,
        inherited_listeners: HashMap::new(),
        kernel_override_end: None,
    };
    if let Some(rx) = &controller.links {
        registry.inner().links = Some(rx.borrow().clone());
    }
    let queue_handoffs = tokio::spawn(queue::run_handoffs(registry.clone(), controller.context()));
    let adopted = inherited.map(|i| controller.adopt(i));
    let recovered = (!stored.is_empty()).then(|| controller.adopt_stored(stored));
    let started = match controller.apply().await {
        // The predecessor serves on when this daemon goes without a word:
        // leave the shared pins, maps and routes to it.
        Err(e) if adopted.is_some() => {
            drop(adopted);
            if let Some(k) = kernel {
                std::mem::forget(k);
            }
            return Err(e.context("cannot serve what the running daemon handed over; it serves on"));
        }
        Ok(()) => {
            if let Some(adopted) = adopted {
                controller.finish_takeover(adopted, report).await;
            }
            if let Some(recovered) = recovered {
                controller.finish_recovery(recovered);
            }
            controller.listen_for_successors(&handover_path);
            Ok(())
        }
        Err(e) => Err(e),
    };
    let result = match started {
        Ok(()) => {
            controller
                .serve(&mut incoming, hook_incoming, &mut stop_signals)
                .await
        }
        Err(e) => Err(e),
    };
    if let Ok(Stop::HandedOver) = result {
        // The successor owns the pins, the routes, the sockets and the
        // control socket's path now: leave them all as they are. The
        // dispatch link (no longer pinned) detaches when this process exits.
        // Nothing is said to systemd: the successor is its main process.
        info!("yensid handed over; exiting");
        if let Some(k) = kernel {
            std::mem::forget(k);
        }
        return Ok(());
    }
    let result = result.map(drop);
    controller.stop_listening_for_successors(&handover_path);
    refuse_while_stopping(kernel.as_deref());
    notify::stopping();
    controller.close_all();
    if result.is_ok() {
        controller
            .let_connections_finish(&mut incoming, &mut stop_signals)
            .await;
    }
    controller.control.task.abort();
    queue_handoffs.abort();
    let _ = std::fs::remove_file(&control_path);
    let cut = open_connections(&registry);
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
    if let Some(routes) = &mut controller.local_routes {
        routes.remove_all();
    }
    info!(open_connections_closed = cut, "yensid stopped");
    // The dispatch link (unpinned now) must go with the process, not
    // before: dropped here, it would leave the addresses unclaimed, and
    // their connections free to reach other local listeners, while the
    // runtime shuts down. The kernel closes it at exit.
    if let Some(k) = kernel {
        std::mem::forget(k);
    }
    result
}

/// The operator's saved state, as far as it is valid: an unreadable file,
/// or what no daemon could have written in it, is reported once and left
/// out, so a bad file never keeps the daemon from starting (or makes it
/// start and crash again).
fn load_state(file: &Path, config: &Config) -> OperatorState {
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
fn raise_descriptor_limit() {
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

/// How often the kernel's path measurements are read (for status,
/// metrics and `max_rtt_ms`).
const PATH_READ_INTERVAL: Duration = Duration::from_secs(1);
/// How often the daemon looks for failed local connects (the kernel keeps
/// new connections away from the builder meanwhile).
const LOCAL_POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Starts watching links and routes with the configured labels; without
/// it, link rules cannot be applied (said loudly).
async fn watch_links(config: &Config) -> Option<watch::Receiver<LinkState>> {
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
fn open_local_routes() -> Option<LocalRoutes> {
    match LocalRoutes::open() {
        Ok(routes) => Some(routes),
        Err(e) => {
            error!(error = %e, "LOCAL ROUTES UNMANAGED: claimed prefixes outside 127.0.0.0/8 need `ip route add local <prefix> dev lo`");
            None
        }
    }
}

/// Runs the policy hook, one run at a time, when something changed or its
/// interval passed.
struct HookRunner {
    results: mpsc::Sender<Result<Decision, HookError>>,
    running: bool,
    /// Another run is due once the current one ends.
    pending: bool,
}

impl HookRunner {
    fn start_if_due(&mut self, registry: &Registry) {
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
fn hook_input(inner: &crate::decide::registry::Inner) -> HookInput {
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

/// The first step of every stop: from here until the process exits, every
/// claimed connection is refused (RST), so none reaches another local
/// listener (the host's sshd) while listeners close and pins go. Once the
/// process is gone, nothing claims the addresses any more.
fn refuse_while_stopping(kernel: Option<&Kernel>) {
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
    /// The listening socket, held apart from its accept task: a takeover
    /// stops the task and hands the socket on with its queue.
    socket: OwnedFd,
    /// The kernel steers connections to it for one builder (otherwise it
    /// is a fallback listener on a service address).
    steered: bool,
}

/// A listener the daemon serves on besides the builders' (the control
/// socket, the metrics endpoint): its socket and the task that serves it.
struct Endpoint {
    socket: OwnedFd,
    task: JoinHandle<()>,
}

impl Endpoint {
    fn start_control(
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

    fn start_metrics(listener: TcpListener, requests: mpsc::Sender<Pending>) -> Result<Self> {
        let socket = listener
            .as_fd()
            .try_clone_to_owned()
            .context("cannot duplicate the metrics socket")?;
        let task = tokio::spawn(metrics::serve(listener, requests));
        Ok(Endpoint { socket, task })
    }
}

/// Why the controller stopped serving.
enum Stop {
    /// A stop signal: the graceful stop follows.
    Signal,
    /// A successor took everything over.
    HandedOver,
}

struct Controller {
    config_path: PathBuf,
    state_file: PathBuf,
    registry: Arc<Registry>,
    path: DataPath,
    /// Why sessions are forwarded the way they are (`[daemon] forward`).
    forward_reason: &'static str,
    /// One probe task per builder.
    probes: HashMap<String, JoinHandle<()>>,
    /// One metrics scrape task per builder with a `metrics_url`.
    scrapers: Scrapers,
    /// Keyed by (service, builder); in the fallback by (service, address).
    listeners: HashMap<(String, String), ListenerHandle>,
    services: Indices,
    builders: Indices,
    listener_ids: Indices,
    /// The queue listener of each service with `when_full = "queue"`.
    queue_listeners: HashMap<String, JoinHandle<()>>,
    links: Option<watch::Receiver<LinkState>>,
    /// `None` if rtnetlink could not be opened.
    local_routes: Option<LocalRoutes>,
    hook: HookRunner,
    /// The kernel side for spliced pairs, also when new connections are
    /// copied (pairs a predecessor spliced).
    splicer: Option<(Arc<Kernel>, Hangups)>,
    /// Stops the connection tasks for a successor.
    recaller: Recaller,
    requests: mpsc::Sender<Pending>,
    access: Access,
    control: Endpoint,
    metrics: Option<Endpoint>,
    /// The handover socket a successor connects to.
    handover: Option<AsyncFd<OwnedFd>>,
    /// Listeners a predecessor handed over, by (service, builder), with
    /// their ids: used by the plan before any new one is opened.
    inherited_listeners: HashMap<(String, String), (u32, OwnedFd)>,
    /// The timed local override last given to the kernel, with the end it
    /// was given (CLOCK_BOOTTIME ns).
    kernel_override_end: Option<(ModeOverride, u64)>,
}

/// SIGTERM and SIGINT, held from serving through the stop: the first
/// begins the stop, a second one during the grace cuts what is left.
struct StopSignals {
    terminate: Signal,
    interrupt: Signal,
}

impl StopSignals {
    fn new() -> Result<Self> {
        Ok(Self {
            terminate: signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?,
            interrupt: signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?,
        })
    }

    /// The name of the next stop signal, when it comes.
    async fn recv(&mut self) -> &'static str {
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
fn open_connections(registry: &Registry) -> u64 {
    let assigned: u64 = registry.inner().active.values().sum();
    assigned + u64::from(registry.handoffs.in_progress())
}

impl Controller {
    async fn serve(
        &mut self,
        requests: &mut mpsc::Receiver<Pending>,
        mut hook_results: mpsc::Receiver<Result<Decision, HookError>>,
        stop_signals: &mut StopSignals,
    ) -> Result<Stop> {
        let mut hangup = signal(SignalKind::hangup())?;
        let registry = self.registry.clone();
        let config = registry.inner().config.clone();
        let mut hook_tick = tokio::time::interval(config.policy.hook_interval);
        let mut path_tick = tokio::time::interval(PATH_READ_INTERVAL);
        let mut local_tick = tokio::time::interval(LOCAL_POLL_INTERVAL);
        let measuring = registry.kernel().is_some();
        info!(
            services = config.services.len(),
            builders = config.builders.len(),
            dataplane = self.path.dataplane(),
            forward = self.path.forward().as_str(),
            forward_reason = self.forward_reason,
            bpf = registry.kernel_loaded(),
            "yensid ready"
        );
        notify::ready(&self.serving());
        loop {
            self.hook.start_if_due(&registry);
            let override_ends = self.override_deadline();
            tokio::select! {
                _ = hangup.recv() => {
                    notify::reloading();
                    match self.reload().await {
                        Ok(()) => notify::ready(&self.serving()),
                        Err(e) => notify::ready(&format!("{}; reload refused: {e:#}", self.serving())),
                    }
                    hook_tick = tokio::time::interval(registry.inner().config.policy.hook_interval);
                }
                signal = stop_signals.recv() => {
                    info!(signal, "stop requested");
                    return Ok(Stop::Signal);
                }
                successor = takeover::successor(self.handover.as_ref()) => {
                    if self.hand_over(successor).await {
                        return Ok(Stop::HandedOver);
                    }
                }
                _ = registry.replan.notified() => self.apply_logged().await,
                Some((request, reply)) = requests.recv() => {
                    let answer = self.handle(request).await;
                    let _ = reply.send(answer);
                }
                Some(()) = changed(&mut self.links) => {
                    let snapshot = self.links.as_ref().map(|rx| rx.borrow().clone());
                    registry.inner().links = snapshot;
                    registry.state_changed.notify_one();
                    self.apply_logged().await;
                }
                _ = registry.state_changed.notified() => self.hook.pending = true,
                _ = hook_tick.tick() => self.hook.pending = true,
                _ = path_tick.tick(), if measuring => registry.read_paths(),
                _ = local_tick.tick() => crate::decide::local::poll(&registry),
                Some(result) = hook_results.recv() => {
                    self.hook.running = false;
                    self.hook_finished(result).await;
                }
                _ = sleep_until(override_ends) => {
                    info!("mode override expired");
                    self.set_override(None);
                    self.apply_logged().await;
                }
            }
        }
    }

    /// The graceful part of a stop, with listeners closed and the kernel
    /// refusing new connections: the open ones go on until they end, the
    /// grace expires or a second stop signal comes. Meanwhile the control
    /// socket answers `status` and `mode` and refuses changes.
    async fn let_connections_finish(
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

    /// What `systemctl status` shows while the daemon serves.
    fn serving(&self) -> String {
        let inner = self.registry.inner();
        format!(
            "serving {} service(s) with {} builder(s), {} dataplane, forwarding by {}",
            inner.config.services.len(),
            inner.config.builders.len(),
            self.path.dataplane(),
            self.path.forward().as_str(),
        )
    }

    /// When the operator's override ends, if it is timed (and the end is
    /// representable: overrides are bounded, so it always is).
    fn override_deadline(&self) -> Option<std::time::Instant> {
        let left = self
            .registry
            .inner()
            .mode_override?
            .seconds_left(unix_now())?;
        std::time::Instant::now().checked_add(Duration::from_secs(left))
    }

    fn set_override(&mut self, value: Option<ModeOverride>) -> Option<String> {
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

    async fn hook_finished(&mut self, result: Result<Decision, HookError>) {
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

    /// Carries out an operator's request from the control socket.
    async fn handle(&mut self, request: Request) -> Reply {
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

    /// Reloads the configuration file; an invalid one is refused (logged and
    /// returned) and the running configuration stays.
    async fn reload(&mut self) -> Result<()> {
        let loaded = Config::load(&self.config_path).and_then(|c| match preflight::check(&c) {
            problems if problems.is_empty() => Ok(c),
            problems => Err(ConfigError::Invalid(problems)),
        });
        match loaded {
            Ok(mut config) => {
                let running = self.registry.inner().config.clone();
                if config.daemon != running.daemon
                    || config.metrics_listen != running.metrics_listen
                    || config.policy.control_group != running.policy.control_group
                {
                    config.daemon = running.daemon.clone();
                    config.metrics_listen = running.metrics_listen;
                    config.policy.control_group = running.policy.control_group.clone();
                    warn!(
                        "[daemon], [metrics] and policy.control_group change only with a restart; keeping the running ones"
                    );
                }
                let relabel = config.links != running.links;
                info!(path = %self.config_path.display(), "configuration reloaded");
                {
                    let mut inner = self.registry.inner();
                    inner.config = Arc::new(config);
                    inner.sync_health();
                }
                if relabel {
                    let config = self.registry.inner().config.clone();
                    self.links = watch_links(&config).await;
                    let snapshot = self.links.as_ref().map(|rx| rx.borrow().clone());
                    self.registry.inner().links = snapshot;
                }
                self.apply_logged().await;
            }
            Err(e) => {
                error!(path = %self.config_path.display(), error = %e.to_string().replace('\n', "; "), "reload refused; keeping the running configuration");
                return Err(e.into());
            }
        }
        Ok(())
    }

    async fn apply_logged(&mut self) {
        if let Err(e) = self.apply().await {
            error!(
                error = crate::error_chain(e.as_ref()),
                "cannot apply the plan"
            );
        }
    }

    /// Computes the plan for the current state and makes it so.
    async fn apply(&mut self) -> Result<()> {
        let (config, plan, kernel_plan, local_until) = {
            let mut inner = self.registry.inner();
            for b in &inner.config.builders.clone() {
                if let Ok(addr) = b.address.parse::<SocketAddr>() {
                    inner.addresses.insert(b.name.clone(), addr.ip());
                }
            }
            let unavailable = inner.unavailable();
            let rtt = inner.rtt();
            let load = inner.loads();
            let now = unix_now();
            let decide = |mode| {
                policy::decide(Snapshot {
                    config: &inner.config,
                    mode,
                    unavailable: &unavailable,
                    links: inner.links.as_ref(),
                    addresses: &inner.addresses,
                    rtt: &rtt,
                    load: &load,
                })
            };
            let (mode, _) = inner.mode_in_force(now);
            let plan = decide(mode);
            let local_override = inner
                .mode_override
                .filter(|o| o.mode == Mode::Local && o.in_force(now));
            // A timed local override is the kernel's to end: its deadline (below)
            // refuses until then, and the kernel is given the plan of the mode
            // that follows, so that it serves on time even if this daemon hangs.
            let kernel_plan = local_override
                .is_some_and(|o| o.until.is_some())
                .then(|| decide(inner.mode_after_override()));
            // Fixed when the override is first applied: a plan applied again
            // while it lasts (a probe, a link event) must not move its end.
            let local_until = local_override.map(|o| match self.kernel_override_end {
                Some((applied, deadline)) if applied == o => deadline,
                _ => {
                    let unix_now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap_or_default();
                    let deadline = o.boottime_deadline(unix_now, path::boottime_ns());
                    self.kernel_override_end = Some((o, deadline));
                    deadline
                }
            });
            (inner.config.clone(), plan, kernel_plan, local_until)
        };
        self.sync_probes(&config);
        self.update_affinity(&config);
        self.deliver_claims(&config);
        self.log_changes(&plan);
        // Userspace follows the plan before the kernel does: a builder the
        // kernel starts steering to must already be one the handoff accepts,
        // or the first client steered to it (a link just came back) is
        // reset at its handoff. The other way round costs nothing: a client
        // steered by the old plan to a builder the new one excludes is moved
        // to another at its handoff, as when a builder fills up.
        self.registry.follow_plan(plan.clone());
        match self.registry.kernel() {
            Some(kernel) => {
                kernel.set_local_override(local_until)?;
                self.apply_kernel(&kernel, &config, kernel_plan.as_ref().unwrap_or(&plan))
                    .await?
            }
            None => self.apply_fallback(&config).await?,
        }
        self.registry.serve_queues();
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

    /// Makes every claimed prefix locally deliverable (see
    /// `kernel::local_route`); what cannot be is in the log and in status.
    fn deliver_claims(&mut self, config: &Config) {
        if let Some(routes) = &mut self.local_routes
            && let Err(e) = routes.sync(&local_route::claimed(&config.services))
        {
            error!(error = %e, "cannot check that the claimed prefixes are locally deliverable");
        }
    }

    /// Opens the loopback listener of one (service, builder) pair and
    /// registers it for the kernel to steer connections to.
    async fn open_listener(
        &mut self,
        kernel: &Kernel,
        svc: &Service,
        builder: &str,
    ) -> Result<u32> {
        let key = format!("{}/{}", svc.name, builder);
        let inherited = self
            .inherited_listeners
            .remove(&(svc.name.clone(), builder.to_owned()));
        let (id, listener) = match inherited {
            // Already in the socket map at its id, its queue intact.
            Some((id, socket)) => (id, takeover::tcp_listener(socket)?),
            None => {
                let listener = listener_socket(svc)?.listen(1024)?;
                fdstore::store_listener(&svc.name, builder, &listener);
                (self.listener_ids.get_or_assign(&key)?, listener)
            }
        };
        kernel.register_listener(id, &listener)?;
        self.start_listener((svc.name.clone(), builder.to_owned()), id, listener, true)?;
        Ok(id)
    }

    /// Starts accepting on a listener. `steered`: the kernel chose the
    /// builder (the key's second part); otherwise userspace chooses.
    fn start_listener(
        &mut self,
        key: (String, String),
        id: u32,
        listener: TcpListener,
        steered: bool,
    ) -> Result<()> {
        let socket = listener
            .as_fd()
            .try_clone_to_owned()
            .context("cannot duplicate a listening socket")?;
        let task = tokio::spawn(accept_loop(
            listener,
            key.0.clone(),
            steered.then(|| key.1.clone()),
            self.registry.clone(),
            self.context(),
        ));
        self.listeners.insert(
            key,
            ListenerHandle {
                id,
                task,
                socket,
                steered,
            },
        );
        Ok(())
    }

    /// What connection tasks work with.
    fn context(&self) -> proxy::Context {
        let registry = self.registry.clone();
        proxy::Context {
            handoffs: registry.handoffs.clone(),
            ident_timeout: registry.handoffs.limits().ident_timeout,
            dispatcher: registry,
            path: self.path.clone(),
            splicer: self.splicer.clone(),
            recall: self.recaller.recall(),
        }
    }

    /// Opens the queue listener of every service with `when_full =
    /// "queue"` at its reserved id in `LISTENERS`, and closes those of
    /// services that no longer queue (closing a listener empties its slot:
    /// the kernel then refuses, as with `refuse`).
    fn sync_queue_listeners(&mut self, kernel: &Kernel, config: &Config) -> Result<()> {
        let queueing: BTreeSet<&str> = config
            .services
            .iter()
            .filter(|s| matches!(s.when_full, WhenFull::Queue(_)))
            .map(|s| s.name.as_str())
            .collect();
        self.queue_listeners.retain(|name, task| {
            let keep = queueing.contains(name.as_str());
            if !keep {
                task.abort();
            }
            keep
        });
        for svc in config
            .services
            .iter()
            .filter(|s| queueing.contains(s.name.as_str()))
        {
            if self.queue_listeners.contains_key(&svc.name) {
                continue;
            }
            let listener = listener_socket(svc)?.listen(1024)?;
            let service = self.services.get_or_assign(&svc.name)?;
            kernel.register_listener(queue_listener(service), &listener)?;
            let task = tokio::spawn(queue::accept_loop(
                listener,
                svc.name.clone(),
                self.registry.clone(),
            ));
            self.queue_listeners.insert(svc.name.clone(), task);
        }
        Ok(())
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
                if handle.steered {
                    fdstore::remove_listener(&key.0, &key.1);
                }
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
                self.start_listener(key, 0, listener, false)?;
            }
        }
        self.retire_listeners(|key| wanted.contains(key));
        Ok(())
    }

    /// One line per decision that changed: a service starts or stops
    /// refusing, a builder is excluded from a service or back.
    fn log_changes(&self, plan: &Plan) {
        let inner = self.registry.inner();
        for sp in &plan.services {
            let previous = inner.service_plan(&sp.name);
            for m in &sp.members {
                let before = previous
                    .and_then(|p| p.members.iter().find(|b| b.builder == m.builder))
                    .map(|b| &b.excluded);
                if before == Some(&m.excluded) || (before.is_none() && m.excluded.is_none()) {
                    continue;
                }
                match &m.excluded {
                    None => info!(service = sp.name, builder = m.builder, "builder eligible"),
                    Some(why) => {
                        info!(service = sp.name, builder = m.builder, reason = %why, "builder excluded")
                    }
                }
            }
            let before = previous.map(|s| &s.refusal);
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

    /// The facts `report` needs besides the registry.
    fn report_context(&self) -> report::Context {
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
            handoffs: crate::operate::status::HandoffStatus {
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

    /// Rebuilds each service's affinity table from the previous one, so
    /// clients keep their builder across reloads (see `policy`).
    fn update_affinity(&self, config: &Config) {
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
        self.scrapers.sync(&self.registry, config);
    }

    fn close_all(&mut self) {
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

/// Waits for the next link snapshot; never returns without a watcher (or
/// after it stopped).
async fn changed(links: &mut Option<watch::Receiver<LinkState>>) -> Option<()> {
    match links {
        Some(rx) => match rx.changed().await {
            Ok(()) => Some(()),
            Err(_) => {
                error!(
                    "LINK STATE UNKNOWN: the link watcher stopped; link rules are no longer applied"
                );
                *links = None;
                None
            }
        },
        None => std::future::pending().await,
    }
}

/// Sleeps until `deadline`; forever without one.
async fn sleep_until(deadline: Option<std::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

/// The bound socket of one of `svc`'s builders' loopback listeners. The
/// kernel's `dispatch` hands it SYNs whatever their destination, so only
/// the family matters: IPv4 for a service of IPv4 prefixes only; with an
/// IPv6 prefix, an IPv6 socket on `::ffff:127.0.0.1`, which takes both
/// families. Not `::1`: binding an IPv6 socket to any address but the
/// wildcard or a v4-mapped one makes the kernel set IPV6_V6ONLY, and
/// `bpf_sk_assign` then refuses the service's IPv4 SYNs (EAFNOSUPPORT: the
/// client gets RST). Not the wildcard either: like 127.0.0.1, the mapped
/// address keeps the listener out of other hosts' reach.
fn listener_socket(svc: &Service) -> std::io::Result<tokio::net::TcpSocket> {
    let socket = if svc.listen.iter().any(|p| p.addr.is_ipv6()) {
        let s = tokio::net::TcpSocket::new_v6()?;
        set_v6only(&s, false)?;
        s.bind((Ipv4Addr::LOCALHOST.to_ipv6_mapped(), 0).into())?;
        s
    } else {
        let s = tokio::net::TcpSocket::new_v4()?;
        s.bind((Ipv4Addr::LOCALHOST, 0).into())?;
        s
    };
    Ok(socket)
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
/// listener is that builder's); without, userspace chooses. Beyond the
/// caps on connections in handoff, a new connection is refused at once.
async fn accept_loop(
    listener: TcpListener,
    service: String,
    builder: Option<String>,
    registry: Arc<Registry>,
    cx: proxy::Context,
) {
    let handoffs = registry.handoffs.clone();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                warn!(service, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if let Some(b) = &builder {
            // Counted by the kernel at its SYN; in handoff it is not.
            registry.accepted(b);
        }
        let ticket = match handoffs.admit(peer.ip()) {
            Ok(ticket) => ticket,
            Err(full) => {
                if let Some(left_out) = HANDOFFS_FULL.allow(std::time::Instant::now()) {
                    warn!(
                        service,
                        %peer,
                        reason = %full,
                        refused_in_total = handoffs.refused(),
                        similar_left_out = left_out,
                        "too many connections in handoff: new connection refused"
                    );
                }
                refuse(stream);
                continue;
            }
        };
        let chosen = match &builder {
            Some(b) => b.clone(),
            None => match registry.route(&service, peer) {
                Some(b) => b,
                None => {
                    // Every builder full: a queueing service holds it.
                    if let Some(stream) =
                        queue::hold(&registry, &service, stream, Vec::new(), ticket)
                    {
                        refuse(stream);
                    }
                    continue;
                }
            },
        };
        let accepted = proxy::Accepted {
            client: stream,
            service: service.clone(),
            steered: chosen,
            consumed: Vec::new(),
            opened_unix_ms: proxy::unix_ms(),
        };
        proxy::spawn_serve(accepted, ticket, cx.clone());
    }
}

/// At most one line per five seconds about connections refused at the
/// handoff caps: a flood must not flood the log too.
static HANDOFFS_FULL: Quiet = Quiet::new(Duration::from_secs(5), 1);

/// Closes with RST: the userspace equivalent of the kernel's refusal.
fn refuse(stream: TcpStream) {
    let _ = crate::kernel::sock::reset_on_close(&stream);
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

    fn v6only(socket: &tokio::net::TcpSocket) -> libc::c_int {
        use std::os::fd::AsRawFd;
        let mut value: libc::c_int = -1;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: valid fd, out pointers to a c_int and its size.
        let rc = unsafe {
            libc::getsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_IPV6,
                libc::IPV6_V6ONLY,
                (&mut value as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0, "getsockopt: {}", std::io::Error::last_os_error());
        value
    }

    #[test]
    fn a_service_with_an_ipv6_prefix_listens_for_both_families() {
        let config = Config::parse(
            "[[service]]\nname = \"x\"\nlisten = [\"127.0.0.22/32\", \"2001:2:0:ff::22/128\"]\n\
             [builders.b1]\naddress = \"198.18.1.2:22\"\n",
        )
        .unwrap();
        let socket = listener_socket(&config.services[0]).unwrap();
        assert_eq!(
            socket.local_addr().unwrap().ip(),
            Ipv4Addr::LOCALHOST.to_ipv6_mapped()
        );
        // Still dual-stack after the bind, so bpf_sk_assign takes IPv4 SYNs.
        assert_eq!(v6only(&socket), 0);
        // What binding ::1 would have done.
        let loopback = tokio::net::TcpSocket::new_v6().unwrap();
        set_v6only(&loopback, false).unwrap();
        loopback
            .bind((std::net::Ipv6Addr::LOCALHOST, 0).into())
            .unwrap();
        assert_eq!(v6only(&loopback), 1);

        let v4_only = Config::parse(
            "[[service]]\nname = \"x\"\nlisten = [\"127.0.0.22/32\"]\n\
             [builders.b1]\naddress = \"198.18.1.2:22\"\n",
        )
        .unwrap();
        let socket = listener_socket(&v4_only.services[0]).unwrap();
        assert_eq!(
            socket.local_addr().unwrap().ip(),
            std::net::IpAddr::V4(Ipv4Addr::LOCALHOST)
        );
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
