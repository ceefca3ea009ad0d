//! What the daemon knows about builders right now: health, drains, open
//! connections and totals. Shared by the controller, the probe tasks and
//! the connection tasks (it is the proxy's [`Dispatcher`]).
//!
//! Every change that affects where new connections may go wakes the
//! controller (`replan`), which recomputes the plan and rewrites the
//! kernel's maps.

use std::{
    collections::{BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use tokio::sync::Notify;
use tracing::{error, info, warn};
use yensid_ebpf::{
    maps::AFFINITY_SLOTS,
    select::{self, Candidate, Draw, Pool},
};

use crate::{
    config::{Config, Mode, QueueSettings, Service, Strategy, WhenFull},
    dataplane::admission::Handoffs,
    dataplane::admission::Ticket,
    dataplane::proxy::{Dispatcher, Outcome},
    dataplane::queue::{self, Queues},
    decide::health::{Answer, Failure, Tracker, Transition},
    decide::hook::Decision,
    decide::link::LinkState,
    decide::load::{self, Load},
    decide::policy::{Plan, ServicePlan, Unavailable},
    decide::scrape::LoadTracker,
    kernel::bpf::{Kernel, Observation},
    kernel::path::{self, PathTracker, Rtt},
    operate::metrics::Histogram,
    state::{ModeOverride, OperatorState, unix_now},
};

pub struct Registry {
    kernel: Option<Arc<Kernel>>,
    /// Set while a successor takes over: the maps are the successor's to
    /// write from then on (both daemons share them).
    frozen: std::sync::atomic::AtomicBool,
    /// Connections in handoff (not counted for any builder yet).
    pub handoffs: Arc<Handoffs>,
    inner: Mutex<Inner>,
    /// Wakes the controller to recompute the plan.
    pub replan: Notify,
    /// Wakes the policy hook: something it is told about changed.
    pub state_changed: Notify,
    /// Connections held while every builder is full (`when_full = "queue"`).
    pub queues: Arc<Queues>,
}

pub struct Inner {
    pub config: Arc<Config>,
    pub health: HashMap<String, Tracker>,
    pub drained: BTreeSet<String>,
    /// Open connections per builder, as userspace counts them: from the
    /// moment the client identified itself and the builder was chosen for
    /// it (the upstream connect) until the connection ends. A connection
    /// still in handoff is not counted, here or in the kernel.
    pub active: HashMap<String, u64>,
    /// Per service, the affinity table by builder name.
    pub affinity: HashMap<String, Vec<String>>,
    pub totals: HashMap<String, BuilderTotals>,
    /// Upstream connect-to-banner times per builder.
    pub connect_times: HashMap<String, Histogram>,
    /// Kernel index of each builder (for the RELEASED counters).
    pub builder_index: HashMap<String, u32>,
    /// What the kernel measured on the connections to each builder.
    pub paths: HashMap<String, PathTracker>,
    /// The plan in force: what the kernel was last told. Userspace's own
    /// choices (failover, the no-BPF fallback, `explain`) honour its
    /// exclusions and refusals too.
    pub plan: Option<Plan>,
    sequence: u64,
    /// Interfaces and routes; `None` while unknown.
    pub links: Option<LinkState>,
    /// Each builder's IP address (parsed, or learnt from its probes).
    pub addresses: HashMap<String, IpAddr>,
    pub mode_override: Option<ModeOverride>,
    /// The policy hook's last valid decision.
    pub hook: Option<Decision>,
    /// What this daemon took over from its predecessor, if it did.
    pub takeover: Option<crate::operate::status::TakeoverStatus>,
    /// The local path (clients on this host straight to the builder).
    pub local: crate::decide::local::LocalPath,
    /// For the local path's counts, which the kernel keeps.
    kernel: Option<Arc<Kernel>>,
    /// Each scraped builder's load (see `decide::scrape`).
    pub load: HashMap<String, LoadTracker>,
}

/// Where the mode in force comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModeSource {
    Config,
    Hook { reason: Option<String> },
    Override { until: Option<u64> },
}

/// What a builder served over the daemon's life.
#[derive(Debug, Default)]
pub struct BuilderTotals {
    pub connections: u64,
    /// Clients steered to this builder that did not speak SSH.
    pub rejected_clients: u64,
    /// Connections moved away from this builder because it failed.
    pub failed_over: u64,
    /// Connections whose bytes the kernel forwarded (sockmap splice).
    pub spliced: u64,
    /// Connections whose bytes the daemon copied in userspace.
    pub copied: u64,
    pub to_builder: u64,
    pub from_builder: u64,
}

impl Registry {
    pub fn new(config: Config, state: OperatorState, kernel: Option<Arc<Kernel>>) -> Self {
        let mut inner = Inner {
            config: Arc::new(config),
            health: HashMap::new(),
            drained: state.drained,
            links: None,
            addresses: HashMap::new(),
            mode_override: state.mode_override,
            hook: None,
            takeover: None,
            active: HashMap::new(),
            affinity: HashMap::new(),
            totals: HashMap::new(),
            connect_times: HashMap::new(),
            builder_index: HashMap::new(),
            paths: HashMap::new(),
            plan: None,
            sequence: 0,
            local: Default::default(),
            kernel: kernel.clone(),
            load: HashMap::new(),
        };
        inner.sync_health();
        Self {
            kernel,
            frozen: std::sync::atomic::AtomicBool::new(false),
            handoffs: Handoffs::new(inner.config.daemon.handoff),
            inner: Mutex::new(inner),
            replan: Notify::new(),
            state_changed: Notify::new(),
            queues: Arc::default(),
        }
    }

    pub fn kernel(&self) -> Option<Arc<Kernel>> {
        self.kernel.clone()
    }

    /// Stops (`true`) or resumes writing the kernel's maps from connection
    /// events: a successor that takes over writes them from then on.
    pub fn freeze(&self, frozen: bool) {
        self.frozen
            .store(frozen, std::sync::atomic::Ordering::SeqCst);
    }

    fn writable_kernel(&self) -> Option<&Arc<Kernel>> {
        if self.frozen.load(std::sync::atomic::Ordering::SeqCst) {
            return None;
        }
        self.kernel.as_ref()
    }

    /// A connection to `builder` a predecessor handed over: counted as
    /// open (the kernel's count follows at the next plan).
    pub fn adopt_connection(&self, builder: &str) {
        *self.inner().active.entry(builder.to_owned()).or_default() += 1;
    }

    pub fn kernel_loaded(&self) -> bool {
        self.kernel.is_some()
    }

    pub fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().expect("registry poisoned")
    }

    /// A connection the kernel steered to `builder` was accepted. The
    /// kernel counted it at its SYN; in handoff it must not count against
    /// the builder's `max_connections` (a client that never speaks would
    /// hold a slot), so that count is given back at once.
    /// [`Dispatcher::reserve`] counts it again once the client identified.
    pub fn accepted(&self, builder: &str) {
        self.sync_kernel_count(&self.inner(), builder);
    }

    /// Records a probe result; a change of health is logged and replanned.
    pub fn probed(&self, builder: &str, result: Result<Answer, Failure>) {
        let mut inner = self.inner();
        if let Ok(answer) = &result
            && inner.addresses.insert(builder.to_owned(), answer.peer) != Some(answer.peer)
        {
            self.changed();
        }
        let max_rtt = inner
            .config
            .services
            .iter()
            .any(|s| s.rules.max_rtt_ms.is_some());
        let Some(tracker) = inner.health.get_mut(builder) else {
            return;
        };
        let before = tracker.last_rtt();
        match tracker.on_probe(Instant::now(), result.map(|a| a.rtt)) {
            Some(Transition::Down(failure)) => {
                warn!(builder, reason = %failure, "builder unhealthy: no new connections");
                self.changed();
            }
            Some(Transition::Up) => {
                let rtt_ms = tracker.last_rtt().map(|d| d.as_secs_f64() * 1e3);
                info!(builder, ?rtt_ms, "builder healthy again");
                self.changed();
            }
            // A new RTT can change eligibility only under a max_rtt_ms rule.
            None if max_rtt && tracker.last_rtt() != before => self.replan.notify_one(),
            None => {}
        }
    }

    /// Makes `plan`, just given to the kernel, the plan in force.
    pub fn follow_plan(&self, plan: Plan) {
        self.inner().plan = Some(plan);
    }

    /// Something a decision depends on changed: replan, and tell the hook.
    pub fn changed(&self) {
        self.replan.notify_one();
        self.state_changed.notify_one();
    }

    /// Chooses a builder for a connection the kernel did not steer (the
    /// userspace fallback); like a steered one, it is counted only by
    /// [`Dispatcher::reserve`].
    pub fn route(&self, service: &str, peer: SocketAddr) -> Option<String> {
        let mut inner = self.inner();
        let config = inner.config.clone();
        let svc = config.services.iter().find(|s| s.name == service)?;
        if inner.mode_in_force(unix_now()).0 == Mode::Local
            || inner
                .service_plan(service)
                .is_some_and(|s| s.refusal.is_some())
        {
            return None;
        }
        inner.choose_for(svc, peer.ip())
    }

    /// Makes the kernel's count of `builder`'s open connections (ASSIGNED
    /// minus RELEASED) the count userspace keeps: identified clients only.
    /// The kernel counts a connection at its SYN, which userspace cannot
    /// see; writing RELEASED from what ASSIGNED holds now (not by adding
    /// to it) gives back every SYN counted so far, including those that
    /// never became a connection (a SYN dropped on a full accept queue is
    /// counted again when it is retransmitted). A SYN counted after the
    /// read stays counted until the next write, at its accept at the
    /// latest. Called with the registry locked, so writes do not race.
    fn sync_kernel_count(&self, inner: &Inner, builder: &str) {
        let (Some(kernel), Some(&index)) =
            (self.writable_kernel(), inner.builder_index.get(builder))
        else {
            return;
        };
        let active = inner.active.get(builder).copied().unwrap_or(0);
        let synced = kernel
            .assigned(index)
            .and_then(|assigned| kernel.set_released(index, assigned.wrapping_sub(active)));
        if let Err(e) = synced {
            error!(builder, error = %e, "cannot update the kernel's connection count");
        }
    }

    /// Starts counting a builder index afresh: no connection of this
    /// daemon is open to it, whatever the kernel's counters say (the
    /// caller wrote RELEASED = ASSIGNED).
    pub fn adopt_index(&self, builder: &str, index: u32) {
        let paths = self
            .kernel
            .as_ref()
            .and_then(|k| k.path_stats(index).ok())
            .unwrap_or_default();
        let mut inner = self.inner();
        inner.builder_index.insert(builder.to_owned(), index);
        inner.paths.insert(
            builder.to_owned(),
            PathTracker::adopt(paths, path::boottime_ns()),
        );
    }

    /// Reads what the kernel measured on the builder connections. Under a
    /// `max_rtt_ms` rule, a change of a builder's RTT (in whole
    /// milliseconds, or of its source) replans.
    pub fn read_paths(&self) {
        let Some(kernel) = &self.kernel else {
            return;
        };
        let mut inner = self.inner();
        let before = inner.rtt();
        let indices: Vec<(String, u32)> = inner
            .builder_index
            .iter()
            .map(|(name, &index)| (name.clone(), index))
            .collect();
        for (name, index) in indices {
            let Some(tracker) = inner.paths.get_mut(&name) else {
                continue;
            };
            match kernel.path_stats(index) {
                Ok(stats) => tracker.update(stats),
                Err(e) => {
                    warn!(builder = name, error = %e, "cannot read the kernel's path measurements")
                }
            }
            // Local clients' direct connections measure the same path.
            if let Ok(local) = kernel.local_stats(index) {
                tracker.update_local(local.srtt_us, local.sampled_boot_ns);
            }
        }
        let max_rtt = inner
            .config
            .services
            .iter()
            .any(|s| s.rules.max_rtt_ms.is_some());
        let whole_ms = |rtt: &HashMap<String, Rtt>| -> Vec<(String, u128, path::RttSource)> {
            let mut v: Vec<_> = rtt
                .iter()
                .map(|(n, r)| (n.clone(), r.value.as_millis(), r.source))
                .collect();
            v.sort();
            v
        };
        if max_rtt && whole_ms(&before) != whole_ms(&inner.rtt()) {
            self.replan.notify_one();
        }
    }
}

impl Inner {
    /// Keeps one health tracker per configured builder, carrying state
    /// over reloads.
    pub fn sync_health(&mut self) {
        let now = Instant::now();
        let config = self.config.clone();
        self.health
            .retain(|name, _| config.builders.iter().any(|b| &b.name == name));
        for b in &config.builders {
            self.health
                .entry(b.name.clone())
                .and_modify(|t| t.update_settings(b.health))
                .or_insert_with(|| Tracker::new(b.health, now));
        }
    }

    /// The mode in force and where it comes from: the operator's override
    /// wins over the hook, which wins over the configuration.
    pub fn mode_in_force(&self, now: u64) -> (Mode, ModeSource) {
        if let Some(o) = self.mode_override
            && o.in_force(now)
        {
            return (o.mode, ModeSource::Override { until: o.until });
        }
        if let Some(mode) = self.hook.as_ref().and_then(|d| d.mode) {
            let reason = self.hook.as_ref().and_then(|d| d.reason.clone());
            return (mode, ModeSource::Hook { reason });
        }
        (self.config.policy.mode, ModeSource::Config)
    }

    /// The mode once the operator's override ends: the hook's, else the
    /// configured one.
    pub fn mode_after_override(&self) -> Mode {
        self.hook
            .as_ref()
            .and_then(|d| d.mode)
            .unwrap_or(self.config.policy.mode)
    }

    /// A builder's weight: the hook's, else the configured one.
    pub fn weight(&self, builder: &str) -> u32 {
        self.hook
            .as_ref()
            .and_then(|d| d.weights.get(builder).copied())
            .or_else(|| self.config.builder(builder).map(|b| b.weight))
            .unwrap_or(1)
    }

    /// Each builder's RTT as `max_rtt_ms` sees it: the kernel's while
    /// fresh, else its last successful probe's.
    pub fn rtt(&self) -> HashMap<String, Rtt> {
        let now = path::boottime_ns();
        self.health
            .iter()
            .filter_map(|(name, t)| {
                let kernel = self.paths.get(name).and_then(|p| p.fresh_rtt(now));
                Some((name.clone(), Rtt::pick(kernel, t.last_rtt())?))
            })
            .collect()
    }

    /// Each builder's load while its last sample is fresh; a builder
    /// missing here is judged on connection counts alone.
    pub fn loads(&self) -> HashMap<String, Load> {
        let now = Instant::now();
        let interval = self.config.scrape.interval;
        self.load
            .iter()
            .filter_map(|(name, t)| Some((name.clone(), t.fresh(now, interval)?.clone())))
            .collect()
    }

    /// The measured part of `least-loaded`'s score for `builder` (see
    /// [`load::load_cost`]); 0 when its load is unknown.
    pub fn load_cost(&self, builder: &str) -> u32 {
        let Some(tracker) = self.load.get(builder) else {
            return 0;
        };
        tracker
            .fresh(Instant::now(), self.config.scrape.interval)
            .map_or(0, |l| {
                load::load_cost(l, tracker.own_at_sample(), self.weight(builder))
            })
    }

    /// The sequence number userspace's next own choice will use.
    pub fn next_sequence(&self) -> u64 {
        self.sequence + 1
    }

    /// What the selection would do with the next connection of `svc` from
    /// `from`, in words (the same code the kernel runs, with the service's
    /// `sequence`).
    pub fn predict(&self, svc: &Service, from: Option<IpAddr>, sequence: u64) -> String {
        let inner = self;
        let mut pool = Pool::new();
        for name in &svc.builders {
            pool.push(inner.candidate(&svc.name, name, &[]));
        }
        let name_of = |p: Option<u32>| p.and_then(|p| svc.builders.get(p as usize).cloned());
        let draw = |affinity| Draw {
            random: 0,
            sequence,
            affinity,
        };
        match svc.strategy {
            Strategy::Random => {
                let total: u64 = svc
                    .builders
                    .iter()
                    .map(|n| inner.candidate(&svc.name, n, &[]))
                    .filter(|c| c.available)
                    .map(|c| c.weight as u64)
                    .sum();
                let shares: Vec<String> = svc
                    .builders
                    .iter()
                    .map(|n| (n, inner.candidate(&svc.name, n, &[])))
                    .filter(|(_, c)| c.available && total > 0)
                    .map(|(n, c)| format!("{n} {:.0}%", c.weight as f64 * 100.0 / total as f64))
                    .collect();
                format!("a random builder by weight: {}", shares.join(", "))
            }
            Strategy::SourceAffinity => {
                let Some(ip) = from else {
                    return "depends on the client address (source-affinity): pass --from".into();
                };
                let slot = select::client_hash(address_words(ip)) % AFFINITY_SLOTS;
                let pinned = inner
                    .affinity
                    .get(&svc.name)
                    .and_then(|t| t.get(slot as usize))
                    .cloned();
                match pinned {
                    Some(b) if inner.candidate(&svc.name, &b, &[]).available => {
                        format!("-> {b} (its affinity slot {slot})")
                    }
                    Some(b) => {
                        match name_of(select::choose(svc.strategy.kernel_id(), &pool, &draw(None)))
                        {
                            Some(n) => format!(
                                "-> {n} (slot {slot} belongs to {b}, which is not available; least connections)"
                            ),
                            None => "REFUSED (RST): no builder available".into(),
                        }
                    }
                    None => "no affinity table yet".into(),
                }
            }
            Strategy::LeastLoaded => {
                // The kernel's score, from the same inputs: its own count
                // of open connections and the cost userspace wrote.
                let scores: Vec<String> = svc
                    .builders
                    .iter()
                    .map(|n| (n, inner.candidate(&svc.name, n, &[])))
                    .filter(|(_, c)| c.available)
                    .map(|(n, c)| {
                        let active = c.active.min(u32::MAX as u64) as u32;
                        let score = select::load_score(active, c.weight, c.load_cost);
                        format!(
                            "{n} {:.2} = ({active} own + 1) / weight {} + measured {:.2}",
                            score as f64 / select::LOAD_UNIT as f64,
                            c.weight,
                            c.load_cost as f64 / select::LOAD_UNIT as f64
                        )
                    })
                    .collect();
                match name_of(select::choose(svc.strategy.kernel_id(), &pool, &draw(None))) {
                    Some(n) => format!("-> {n} (lowest load score: {})", scores.join("; ")),
                    None => "REFUSED (RST): every eligible builder is at max_connections".into(),
                }
            }
            strategy => match name_of(select::choose(strategy.kernel_id(), &pool, &draw(None))) {
                Some(n) => format!(
                    "-> {n} ({})",
                    match strategy {
                        Strategy::LeastConnections => "fewest open connections per unit of weight",
                        Strategy::RoundRobin => "next in the weighted rotation",
                        _ => "first available in list order",
                    }
                ),
                None => match svc.when_full {
                    WhenFull::Queue(q) => format!(
                        "QUEUED: every eligible builder is at max_connections; held up to {} for a slot",
                        crate::config::describe_duration(q.timeout)
                    ),
                    WhenFull::Refuse => {
                        "REFUSED (RST): every eligible builder is at max_connections".into()
                    }
                },
            },
        }
    }

    /// Why each builder that may not take new connections may not.
    pub fn unavailable(&self) -> HashMap<String, Unavailable> {
        let mut out = HashMap::new();
        for (name, tracker) in &self.health {
            if let Some(failure) = tracker.failure() {
                out.insert(
                    name.clone(),
                    Unavailable::Unhealthy {
                        reason: failure.to_string(),
                    },
                );
            }
        }
        for name in &self.drained {
            out.insert(name.clone(), Unavailable::Draining);
        }
        out
    }

    /// Whether `service` refuses every connection now: mode `local`, or
    /// its plan's refusal (too few eligible builders).
    pub fn refusing(&self, service: &str) -> bool {
        self.mode_in_force(unix_now()).0 == Mode::Local
            || self
                .service_plan(service)
                .is_some_and(|s| s.refusal.is_some())
    }

    /// The plan in force for `service`, if there is one yet.
    pub fn service_plan(&self, service: &str) -> Option<&ServicePlan> {
        self.plan
            .as_ref()?
            .services
            .iter()
            .find(|s| s.name == service)
    }

    fn candidate(&self, service: &str, name: &str, exclude: &[String]) -> Candidate {
        let b = self.config.builder(name);
        let healthy = self.health.get(name).is_some_and(|t| t.failure().is_none());
        let planned = !self.service_plan(service).is_some_and(|s| {
            s.members
                .iter()
                .any(|m| m.builder == name && m.excluded.is_some())
        });
        let (local_open, local_failing) = self.local_counts(name);
        let eligible = healthy
            && planned
            && !self.drained.contains(name)
            && !exclude.iter().any(|e| e == name)
            && !local_failing;
        Candidate::new(
            if b.is_some() { self.weight(name) } else { 0 },
            b.and_then(|b| b.max_connections).unwrap_or(0),
            eligible,
            self.active
                .get(name)
                .copied()
                .unwrap_or(0)
                .saturating_add(local_open),
        )
        .with_load_cost(self.load_cost(name))
    }

    /// What the local path counted for a builder (`None` without BPF).
    pub fn local_stats(&self, name: &str) -> Option<yensid_ebpf::maps::LocalStats> {
        let index = self.builder_index.get(name)?;
        self.kernel.as_ref()?.local_stats(*index).ok()
    }

    /// A builder's open connections on the local path, and whether a
    /// failed local connect keeps it out of the selection until the daemon
    /// acts on it: what the kernel's selection sees (one count per builder
    /// for both paths).
    pub fn local_counts(&self, name: &str) -> (u64, bool) {
        let (Some(kernel), Some(&index)) = (&self.kernel, self.builder_index.get(name)) else {
            return (0, false);
        };
        kernel.local_counts(index).unwrap_or((0, false))
    }

    /// The builder the service's strategy picks for a connection from
    /// `client`, affinity included, as the kernel would.
    fn choose_for(&mut self, svc: &Service, client: IpAddr) -> Option<String> {
        let affinity = self.affinity.get(&svc.name).and_then(|table| {
            let slot = select::client_hash(address_words(client)) % AFFINITY_SLOTS;
            let name = table.get(slot as usize)?;
            let position = svc.builders.iter().position(|b| b == name)?;
            self.candidate(&svc.name, name, &[])
                .available
                .then_some(position as u32)
        });
        self.choose(svc, &[], affinity)
    }

    /// The shared selection code over userspace's view of a service.
    fn choose(
        &mut self,
        svc: &Service,
        exclude: &[String],
        affinity: Option<u32>,
    ) -> Option<String> {
        let mut pool = Pool::new();
        for name in &svc.builders {
            pool.push(self.candidate(&svc.name, name, exclude));
        }
        self.sequence += 1;
        let draw = Draw {
            random: random_u32(),
            sequence: self.sequence,
            affinity,
        };
        let position = select::choose(svc.strategy.kernel_id(), &pool, &draw)?;
        svc.builders.get(position as usize).cloned()
    }
}

impl Dispatcher for Registry {
    fn observe(&self, builder: &str, cookie: u64) -> Option<Observation> {
        let kernel = self.kernel.as_ref()?;
        kernel.observing().ok()?;
        let index = *self.inner().builder_index.get(builder)?;
        kernel
            .observe(cookie, index)
            .inspect_err(
                |e| warn!(builder, error = %e, "the kernel will not measure this connection"),
            )
            .ok()
    }

    fn address(&self, builder: &str) -> Option<String> {
        self.inner()
            .config
            .builder(builder)
            .map(|b| b.address.clone())
    }

    fn connect_timeout(&self, builder: &str) -> Duration {
        self.inner()
            .config
            .builder(builder)
            .map_or(Duration::from_secs(3), |b| b.health.connect_timeout)
    }

    fn reserve(&self, service: &str, steered: &str) -> Option<String> {
        let mut inner = self.inner();
        let chosen = if inner.candidate(service, steered, &[]).available {
            steered.to_owned()
        } else {
            // Full or gone since the SYN: the strategy picks among the
            // others, as the kernel would now.
            let config = inner.config.clone();
            let svc = config.services.iter().find(|s| s.name == service)?;
            inner.choose(svc, &[steered.to_owned()], None)?
        };
        *inner.active.entry(chosen.clone()).or_default() += 1;
        self.sync_kernel_count(&inner, &chosen);
        Some(chosen)
    }

    fn hold(
        &self,
        service: &str,
        client: tokio::net::TcpStream,
        client_line: Vec<u8>,
        ticket: Ticket,
    ) -> Option<tokio::net::TcpStream> {
        queue::hold(self, service, client, client_line, ticket)
    }

    fn fail_over(
        &self,
        service: &str,
        failed: &str,
        reason: &str,
        tried: &[String],
        busy: bool,
    ) -> Option<String> {
        let mut inner = self.inner();
        if !busy
            && let Some(tracker) = inner.health.get_mut(failed)
            && let Some(Transition::Down(failure)) =
                tracker.on_passive_failure(Instant::now(), reason.to_owned())
        {
            warn!(builder = failed, reason = %failure, "builder unhealthy: no new connections");
            // The kernel must stop choosing it before the next SYN, not
            // when the controller gets round to replanning.
            if let (Some(kernel), Some(&index)) =
                (self.writable_kernel(), inner.builder_index.get(failed))
                && let Err(e) = kernel.make_ineligible(index)
            {
                error!(builder = failed, error = %e, "cannot take the builder out of the kernel's selection");
            }
            self.replan.notify_one();
        }
        inner
            .totals
            .entry(failed.to_owned())
            .or_default()
            .failed_over += 1;
        let config = inner.config.clone();
        let svc = config.services.iter().find(|s| s.name == service)?;
        let next = inner.choose(svc, tried, None)?;
        if let Some(n) = inner.active.get_mut(failed) {
            *n = n.saturating_sub(1);
        }
        *inner.active.entry(next.clone()).or_default() += 1;
        self.sync_kernel_count(&inner, failed);
        self.sync_kernel_count(&inner, &next);
        Some(next)
    }

    fn connected(&self, builder: &str, elapsed: Duration) {
        self.inner()
            .connect_times
            .entry(builder.to_owned())
            .or_default()
            .observe(elapsed);
    }

    fn finished(&self, builder: &str, outcome: &Outcome) {
        let mut inner = self.inner();
        if outcome.counted
            && let Some(n) = inner.active.get_mut(builder)
        {
            *n = n.saturating_sub(1);
            // Before the kernel's count drops: a freed slot goes to a
            // waiting connection, not to a newer SYN.
            self.serve_queues_locked(&mut inner);
        }
        self.sync_kernel_count(&inner, builder);
        let totals = inner.totals.entry(builder.to_owned()).or_default();
        if outcome.rejected {
            totals.rejected_clients += 1;
        } else if !outcome.unserved {
            totals.connections += 1;
            totals.spliced += u64::from(outcome.spliced);
            totals.copied += u64::from(outcome.copied);
            totals.to_builder += outcome.to_builder;
            totals.from_builder += outcome.from_builder;
        }
    }
}

/// `when_full = "queue"` (see `dataplane::queue`).
impl Registry {
    /// Hands waiting connections to builders with a free slot; refuses
    /// those of services that refuse connections now or no longer queue.
    pub fn serve_queues(&self) {
        self.serve_queues_locked(&mut self.inner());
    }

    fn serve_queues_locked(&self, inner: &mut Inner) {
        if self.queues.is_empty() {
            return;
        }
        let config = inner.config.clone();
        self.queues.refuse_unless(|name| {
            config
                .services
                .iter()
                .any(|s| s.name == name && matches!(s.when_full, WhenFull::Queue(_)))
        });
        for svc in &config.services {
            let refusing = inner.refusing(&svc.name);
            self.queues.serve(&svc.name, refusing, |peer| {
                let chosen = inner.choose_for(svc, peer)?;
                *inner.active.entry(chosen.clone()).or_default() += 1;
                self.sync_kernel_count(inner, &chosen);
                Some(chosen)
            });
        }
    }

    /// The queue settings of `service` while it takes connections (not in
    /// mode `local`, enough eligible builders); `None` if it does not
    /// queue or refuses now.
    pub fn queueing(&self, service: &str) -> Option<QueueSettings> {
        let inner = self.inner();
        let svc = inner.config.services.iter().find(|s| s.name == service)?;
        match svc.when_full {
            WhenFull::Queue(settings) if !inner.refusing(service) => Some(settings),
            _ => None,
        }
    }

    /// Gives back the count of a builder taken for a queued connection
    /// that ended before its handoff took it (its client never identified
    /// itself, or it could not be served).
    pub fn release_reserved(&self, builder: &str) {
        let mut inner = self.inner();
        if let Some(n) = inner.active.get_mut(builder) {
            *n = n.saturating_sub(1);
        }
        self.serve_queues_locked(&mut inner);
        self.sync_kernel_count(&inner, builder);
    }
}

/// A client address as the kernel hashes it: IPv4 mapped into IPv6, four
/// big-endian words.
pub fn address_words(ip: IpAddr) -> [u32; 4] {
    let octets = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    };
    let word =
        |i: usize| u32::from_be_bytes([octets[i], octets[i + 1], octets[i + 2], octets[i + 3]]);
    [word(0), word(4), word(8), word(12)]
}

fn random_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    h.finish() as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry() -> Registry {
        let config = Config::parse(
            "[[service]]\nname = \"s\"\nlisten = [\"127.0.0.22\"]\nstrategy = \"priority\"\n\
             [builders.b1]\naddress = \"198.18.1.2:22\"\n[builders.b2]\naddress = \"198.18.2.2:22\"\n",
        )
        .unwrap();
        Registry::new(config, OperatorState::default(), None)
    }

    /// A plan that excludes b1 (say, for its RTT) from service `s`: userspace must
    /// not pick it either, and a refusing plan refuses the fallback's clients.
    #[test]
    fn userspace_choices_follow_the_plans_exclusions_and_refusals() {
        use crate::decide::policy::{Exclusion, MemberPlan, Refusal, ServicePlan};
        let r = registry();
        let svc = r.inner().config.services[0].clone();
        let peer: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        for name in ["b1", "b2"] {
            r.probed(
                name,
                Ok(Answer {
                    rtt: Duration::from_millis(1),
                    peer: "198.18.1.2".parse().unwrap(),
                }),
            );
        }
        assert!(r.inner().predict(&svc, None, 1).contains("b1"));
        let member = |builder: &str, excluded| MemberPlan {
            builder: builder.to_owned(),
            excluded,
        };
        let slow = Exclusion::SlowBuilder {
            rtt_ms: Some((900, crate::kernel::path::RttSource::Kernel)),
            max: 100,
        };
        let mut plan = Plan {
            services: vec![ServicePlan {
                name: "s".into(),
                refusal: None,
                members: vec![member("b1", Some(slow)), member("b2", None)],
            }],
            builders: Vec::new(),
        };
        r.follow_plan(plan.clone());
        let prediction = r.inner().predict(&svc, None, 1);
        assert!(prediction.starts_with("-> b2"), "{prediction}");
        assert_eq!(r.route("s", peer).as_deref(), Some("b2"));
        r.accepted("b2");
        assert_eq!(r.reserve("s", "b2").as_deref(), Some("b2"));
        assert_eq!(
            r.fail_over("s", "b2", "reset", &["b2".to_owned()], false),
            None
        );

        plan.services[0].refusal = Some(Refusal::TooFewEligible {
            eligible: 1,
            needed: 2,
        });
        r.follow_plan(plan);
        assert_eq!(r.route("s", peer), None);
    }

    #[test]
    fn client_addresses_hash_as_the_kernel_sees_them() {
        let v4: IpAddr = "198.18.250.7".parse().unwrap();
        assert_eq!(address_words(v4), [0, 0, 0xffff, 0xc612_fa07]);
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(address_words(v6), [0x2001_0db8, 0, 0, 1]);
    }

    #[test]
    fn failover_marks_the_builder_down_and_moves_the_count() {
        let r = registry();
        r.accepted("b1");
        assert_eq!(r.reserve("s", "b1").as_deref(), Some("b1"));
        let next = r.fail_over("s", "b1", "connection refused", &["b1".to_owned()], false);
        assert_eq!(next.as_deref(), Some("b2"));
        let inner = r.inner();
        assert_eq!(inner.active.get("b1"), Some(&0));
        assert_eq!(inner.active.get("b2"), Some(&1));
        assert_eq!(
            inner.unavailable().get("b1"),
            Some(&Unavailable::Unhealthy {
                reason: "passive failure: connection refused".into()
            })
        );
    }

    #[test]
    fn failover_finds_nothing_when_every_builder_was_tried() {
        let r = registry();
        r.accepted("b1");
        let tried = ["b1".to_owned(), "b2".to_owned()];
        assert_eq!(r.fail_over("s", "b2", "timeout", &tried, false), None);
    }

    fn limited(max_connections: u32) -> Registry {
        let config = Config::parse(&format!(
            "[[service]]\nname = \"s\"\nlisten = [\"127.0.0.22\"]\n\
             [builders.b1]\naddress = \"198.18.1.2:22\"\nmax_connections = {max_connections}\n\
             [builders.b2]\naddress = \"198.18.2.2:22\"\nmax_connections = {max_connections}\n"
        ))
        .unwrap();
        Registry::new(config, OperatorState::default(), None)
    }

    #[test]
    fn a_full_queueing_service_queues_only_while_it_takes_connections() {
        let config = Config::parse(
            "[[service]]\nname = \"s\"\nlisten = [\"127.0.0.22\"]\nwhen_full = \"queue\"\n\
             queue_timeout = \"90s\"\n\
             [builders.b1]\naddress = \"198.18.1.2:22\"\nmax_connections = 1\n",
        )
        .unwrap();
        let r = Registry::new(config, OperatorState::default(), None);
        let svc = r.inner().config.services[0].clone();
        assert_eq!(r.reserve("s", "b1").as_deref(), Some("b1"));
        assert_eq!(r.reserve("s", "b1"), None, "full");
        let prediction = r.inner().predict(&svc, None, 1);
        assert!(
            prediction.starts_with("QUEUED") && prediction.contains("90s"),
            "{prediction}"
        );
        assert!(r.queueing("s").is_some());
        r.inner().mode_override = Some(ModeOverride {
            mode: Mode::Local,
            until: None,
        });
        assert_eq!(r.queueing("s"), None, "mode local refuses, never queues");
    }

    fn active(r: &Registry, builder: &str) -> u64 {
        r.inner().active.get(builder).copied().unwrap_or(0)
    }

    /// Connections in handoff hold no slot: any number of silent clients
    /// leave max_connections to the clients that identify themselves.
    #[test]
    fn only_identified_clients_count_against_max_connections() {
        let r = limited(1);
        for _ in 0..8 {
            r.accepted("b1");
        }
        assert_eq!((active(&r, "b1"), active(&r, "b2")), (0, 0));
        let silent = Outcome {
            rejected: true,
            ..Outcome::default()
        };
        for _ in 0..8 {
            r.finished("b1", &silent);
        }
        assert_eq!(active(&r, "b1"), 0, "a rejected client releases nothing");
        assert_eq!(r.inner().totals["b1"].rejected_clients, 8);

        r.accepted("b1");
        assert_eq!(r.reserve("s", "b1").as_deref(), Some("b1"));
        assert_eq!(active(&r, "b1"), 1);
        // The kernel steered the next one to b1 too (its SYN came before
        // the first identified): b1 is full now, so b2 serves it.
        r.accepted("b1");
        assert_eq!(r.reserve("s", "b1").as_deref(), Some("b2"));
        r.accepted("b2");
        assert_eq!(r.reserve("s", "b2"), None, "both full: refused");
        assert_eq!((active(&r, "b1"), active(&r, "b2")), (1, 1));
        let served = Outcome {
            counted: true,
            ..Outcome::default()
        };
        r.finished("b1", &served);
        r.finished("b2", &served);
        assert_eq!((active(&r, "b1"), active(&r, "b2")), (0, 0));
        assert_eq!(r.inner().totals["b1"].connections, 1);
    }

    /// A builder that accepted and then dropped the connection (an sshd at
    /// MaxStartups) is failed over but stays healthy; the count moves with
    /// the client.
    #[test]
    fn a_busy_builder_is_failed_over_without_being_marked_down() {
        let r = registry();
        r.accepted("b1");
        assert_eq!(r.reserve("s", "b1").as_deref(), Some("b1"));
        let next = r.fail_over(
            "s",
            "b1",
            "closed before its identification line",
            &["b1".to_owned()],
            true,
        );
        assert_eq!(next.as_deref(), Some("b2"));
        let inner = r.inner();
        assert!(inner.unavailable().is_empty(), "{:?}", inner.unavailable());
        assert_eq!(inner.active.get("b1"), Some(&0));
        assert_eq!(inner.active.get("b2"), Some(&1));
        assert_eq!(inner.totals["b1"].failed_over, 1);
    }

    #[test]
    fn drained_builders_are_skipped_by_userspace_routing_and_reported() {
        let r = registry();
        r.inner().drained.insert("b1".into());
        let peer: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        assert_eq!(r.route("s", peer).as_deref(), Some("b2"));
        assert_eq!(
            r.inner().unavailable().get("b1"),
            Some(&Unavailable::Draining)
        );
    }

    /// Source-affinity with a real owner: every slot belongs to b1, so a client goes
    /// to b1 even though b1 is busier; once b1 is drained (or down) its clients fall
    /// back to least connections (b2), and come back to b1 when it returns.
    #[test]
    fn affinity_falls_back_when_the_owner_is_unavailable() {
        let config = Config::parse(
            "[[service]]\nname = \"s\"\nlisten = [\"127.0.0.22\"]\n\
             strategy = \"source-affinity\"\n\
             [builders.b1]\naddress = \"198.18.1.2:22\"\n[builders.b2]\naddress = \"198.18.2.2:22\"\n",
        )
        .unwrap();
        let r = Registry::new(config, OperatorState::default(), None);
        r.inner()
            .affinity
            .insert("s".into(), vec!["b1".to_owned(); AFFINITY_SLOTS as usize]);
        let peer: SocketAddr = "198.18.250.7:40000".parse().unwrap();
        assert_eq!(r.route("s", peer).as_deref(), Some("b1"));
        assert_eq!(
            r.route("s", peer).as_deref(),
            Some("b1"),
            "the owner, busy or not"
        );
        r.inner().drained.insert("b1".into());
        assert_eq!(r.route("s", peer).as_deref(), Some("b2"));
        let svc = r.inner().config.services[0].clone();
        let explained = r.inner().predict(&svc, Some(peer.ip()), 1);
        assert!(
            explained.starts_with("-> b2") && explained.contains("belongs to b1"),
            "{explained}"
        );
        r.inner().drained.remove("b1");
        assert_eq!(r.route("s", peer).as_deref(), Some("b1"));
        r.probed("b1", Err(Failure::Timeout));
        r.probed("b1", Err(Failure::Timeout));
        assert_eq!(r.route("s", peer).as_deref(), Some("b2"), "b1 down");
    }

    #[test]
    fn probe_results_change_health() {
        let r = registry();
        r.probed("b2", Err(Failure::Timeout));
        assert!(r.inner().unavailable().is_empty(), "fall = 2");
        r.probed("b2", Err(Failure::Timeout));
        assert!(r.inner().unavailable().contains_key("b2"));
        let answer = Answer {
            rtt: Duration::from_millis(1),
            peer: "198.18.2.2".parse().unwrap(),
        };
        r.probed("b2", Ok(answer));
        assert!(r.inner().unavailable().is_empty(), "rise = 1");
        assert_eq!(r.inner().addresses.get("b2"), Some(&answer.peer));
        assert_eq!(
            r.inner().rtt().get("b2"),
            Some(&Rtt {
                value: answer.rtt,
                source: path::RttSource::Probe
            })
        );
    }

    #[test]
    fn the_override_beats_the_hook_which_beats_the_config() {
        let r = registry();
        let mut inner = r.inner();
        assert_eq!(inner.mode_in_force(10), (Mode::Auto, ModeSource::Config));
        inner.hook = Some(Decision {
            mode: Some(Mode::Local),
            weights: [("b2".to_owned(), 5)].into(),
            reason: Some("metered".into()),
        });
        assert_eq!(
            inner.mode_in_force(10),
            (
                Mode::Local,
                ModeSource::Hook {
                    reason: Some("metered".into())
                }
            )
        );
        assert_eq!((inner.weight("b1"), inner.weight("b2")), (1, 5));
        inner.mode_override = Some(ModeOverride {
            mode: Mode::Remote,
            until: Some(20),
        });
        assert_eq!(
            inner.mode_in_force(10),
            (Mode::Remote, ModeSource::Override { until: Some(20) })
        );
        assert_eq!(inner.mode_in_force(20).0, Mode::Local, "expired");
    }
}
