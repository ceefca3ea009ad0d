//! `yensid run`: the controller. It owns the configuration and the
//! operator's state, asks `policy` for a plan whenever something changes,
//! writes the plan into the kernel's maps, runs one listener per
//! (service, builder) whose accepted connections go to `proxy`, one probe
//! task per builder, and the control socket.
//!
//! Without BPF (no privileges, old kernel) the same daemon binds the
//! services' addresses itself, chooses builders in userspace with the same
//! selection code, and copies bytes in userspace.
//!
//! This file is the dispatcher: `run` and the loop that turns events
//! (signals, control requests, link changes, probes, the hook) into plans.
//! The rest is in its parts: `startup` (what `run` sets up first),
//! `listeners` (the sockets connections arrive on), `kernel_maps` (a plan
//! written into the maps), `policy_hook`, `operator` (the control
//! socket's requests), `stop` (signals and the graceful stop) and
//! `takeover` (handing everything to a successor).

use std::{
    collections::HashMap,
    net::SocketAddr,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
    sync::{mpsc, watch},
    task::JoinHandle,
};
use tracing::{error, info, warn};
use yensid_ebpf::maps::{MAX_BUILDERS, MAX_LISTENERS, MAX_SERVICES};

use crate::{
    config::{Config, ConfigError, Dataplane, Mode},
    dataplane::handover::{self, Recaller},
    dataplane::proxy::{self, DataPath},
    dataplane::queue,
    decide::health,
    decide::hook::{Decision, HookError},
    decide::link::LinkState,
    decide::policy::{self, Plan, Refusal, Snapshot},
    decide::registry::Registry,
    decide::scrape::Scrapers,
    kernel::bpf::{self, Kernel},
    kernel::hangup::Hangups,
    kernel::local_route::{self, LocalRoutes},
    kernel::path,
    operate::access::{Access, Group},
    operate::control::{self, Pending},
    operate::fdstore,
    operate::metrics,
    operate::notify,
    preflight,
    state::{ModeOverride, unix_now},
};

mod kernel_maps;
mod listeners;
mod operator;
mod policy_hook;
mod startup;
mod stop;
mod takeover;

use kernel_maps::Indices;
use listeners::ListenerHandle;
use policy_hook::HookRunner;
use startup::{
    Endpoint, brief, load_state, open_local_routes, raise_descriptor_limit, watch_links,
};
use stop::{
    Stop, StopSignals, log_totals, open_connections, refuse_while_stopping, release_kernel,
};

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

/// How often the kernel's path measurements are read (for status,
/// metrics and `max_rtt_ms`).
const PATH_READ_INTERVAL: Duration = Duration::from_secs(1);
/// How often the daemon looks for failed local connects (the kernel keeps
/// new connections away from the builder meanwhile).
const LOCAL_POLL_INTERVAL: Duration = Duration::from_millis(100);

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

    /// Makes every claimed prefix locally deliverable (see
    /// `kernel::local_route`); what cannot be is in the log and in status.
    fn deliver_claims(&mut self, config: &Config) {
        if let Some(routes) = &mut self.local_routes
            && let Err(e) = routes.sync(&local_route::claimed(&config.services))
        {
            error!(error = %e, "cannot check that the claimed prefixes are locally deliverable");
        }
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
