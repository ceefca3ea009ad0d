//! Both sides of a takeover (the exchange is in `dataplane::handover`):
//! the successor greets the running daemon, loads its BPF side, receives
//! the listeners and connections and adopts them; the predecessor stops
//! accepting, recalls its connection tasks, sends everything and exits, or
//! serves on if the successor fails.

use std::{
    net::SocketAddr,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use tokio::{io::unix::AsyncFd, net::TcpListener};
use tracing::{error, info, warn};
use yensid_ebpf::ABI_VERSION;

use super::{Controller, Indices};
use crate::{
    dataplane::handover::{
        self, HandoverError, Item, Message, PROTOCOL, Parked, Received, describe,
    },
    dataplane::proxy,
    operate::{fdstore, notify, status::TakeoverStatus},
    state::unix_now,
};

/// How long the predecessor waits for its connection tasks to park. A task
/// that is relaying the first key-exchange packets cannot stop in the
/// middle; it takes a few milliseconds unless its peer stalls.
const COLLECT_LIMIT: Duration = Duration::from_secs(1);

/// A running daemon that agreed to hand over.
pub(super) struct Predecessor {
    socket: OwnedFd,
    pid: u32,
    bpf: bool,
    indices: handover::Indices,
}

/// What a predecessor handed over.
pub(super) struct Inherited {
    pub control: Option<OwnedFd>,
    pub metrics: Option<OwnedFd>,
    listeners: Vec<(String, String, u32, bool, OwnedFd)>,
    connections: Vec<Parked>,
    indices: handover::Indices,
    socket: OwnedFd,
    from_pid: u32,
    /// When the predecessor was told to stop accepting.
    proceeded: Instant,
}

/// Adopted, waiting for the plan to be applied.
pub(super) struct Adopted {
    socket: OwnedFd,
    connections: Vec<Parked>,
    from_pid: u32,
    proceeded: Instant,
    listeners: u64,
}

/// Runs a blocking exchange step off the runtime's workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, HandoverError> + Send + 'static,
) -> Result<T, HandoverError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| HandoverError::Io(std::io::Error::other(e)))?
}

/// Greets the daemon that listens on `path`, if one does.
pub(super) async fn greet(path: &Path) -> Result<Option<Predecessor>> {
    let path = path.to_owned();
    let greeted = blocking(move || {
        let Some(socket) = handover::connect(&path)? else {
            return Ok(None);
        };
        let hello = Message::Hello {
            protocol: PROTOCOL,
            abi: ABI_VERSION,
            pid: std::process::id(),
        };
        handover::send(&socket, &hello, &[])?;
        match handover::expect(&socket, "offer")? {
            (Message::Offer { pid, bpf, indices }, _) => Ok(Some(Predecessor {
                socket,
                pid,
                bpf,
                indices,
            })),
            (other, _) => Err(HandoverError::Malformed(format!("{other:?}"))),
        }
    })
    .await
    .context("cannot take over from the running daemon")?;
    if let Some(p) = &greeted {
        info!(
            pid = p.pid,
            "a daemon of this instance runs: taking over from it"
        );
    }
    Ok(greeted)
}

impl Predecessor {
    /// Tells the predecessor to stop accepting and receives what it hands
    /// over. Call it once this daemon's BPF side is loaded: from here on
    /// nobody accepts until this daemon does.
    pub(super) async fn receive(self, bpf: bool) -> Result<Inherited> {
        if self.bpf && !bpf {
            anyhow::bail!(
                "cannot take over: the running daemon (pid {}) splices connections in the kernel \
                 and this one could not load BPF; it serves on",
                self.pid
            );
        }
        let Predecessor {
            socket,
            pid,
            indices,
            ..
        } = self;
        let proceeded = Instant::now();
        let (socket, received) = blocking(move || {
            handover::send(&socket, &Message::Proceed, &[])?;
            let received = handover::recv_items(&socket)?;
            Ok((socket, received))
        })
        .await
        .with_context(|| format!("taking over from pid {pid} failed; it serves on"))?;
        let mut inherited = Inherited {
            control: None,
            metrics: None,
            listeners: Vec::new(),
            connections: Vec::new(),
            indices,
            socket,
            from_pid: pid,
            proceeded,
        };
        for r in received {
            match r {
                Received::Control(fd) => inherited.control = Some(fd),
                Received::Metrics(fd) => inherited.metrics = Some(fd),
                Received::Listener {
                    service,
                    key,
                    id,
                    steered,
                    socket,
                } => inherited
                    .listeners
                    .push((service, key, id, steered, socket)),
                Received::Connection(c) => inherited.connections.push(c),
            }
        }
        Ok(inherited)
    }
}

pub(super) fn unix_listener(fd: OwnedFd) -> std::io::Result<tokio::net::UnixListener> {
    let listener = std::os::unix::net::UnixListener::from(fd);
    listener.set_nonblocking(true)?;
    tokio::net::UnixListener::from_std(listener)
}

pub(super) fn tcp_listener(fd: OwnedFd) -> std::io::Result<TcpListener> {
    let listener = std::net::TcpListener::from(fd);
    listener.set_nonblocking(true)?;
    TcpListener::from_std(listener)
}

/// The inherited metrics listener if it listens on `listen`.
pub(super) fn tcp_listener_at(fd: Option<OwnedFd>, listen: SocketAddr) -> Option<TcpListener> {
    let listener = tcp_listener(fd?).ok()?;
    (listener.local_addr().ok()? == listen).then_some(listener)
}

/// The next successor that connects; never without a handover socket.
pub(super) async fn successor(listener: Option<&AsyncFd<OwnedFd>>) -> OwnedFd {
    let Some(listener) = listener else {
        return std::future::pending().await;
    };
    loop {
        let Ok(mut ready) = listener.readable().await else {
            return std::future::pending().await;
        };
        match handover::accept(listener.get_ref()) {
            Ok(Some(socket)) => return socket,
            Ok(None) => ready.clear_ready(),
            Err(e) => warn!(error = %e, "handover connection refused"),
        }
    }
}

impl Indices {
    fn seed(&mut self, entries: &[(String, u32)]) {
        for (name, index) in entries {
            if *index < self.limit {
                self.by_name.insert(name.clone(), *index);
            }
        }
    }

    fn entries(&self) -> Vec<(String, u32)> {
        self.by_name.iter().map(|(n, &i)| (n.clone(), i)).collect()
    }
}

impl Controller {
    /// Takes in what a predecessor handed over, before the first plan:
    /// the map indices it used (so both daemons' maps agree), its
    /// listeners and the count of each builder's connections.
    pub(super) fn adopt(&mut self, inherited: Inherited) -> Adopted {
        self.services.seed(&inherited.indices.services);
        self.builders.seed(&inherited.indices.builders);
        self.listener_ids.seed(&inherited.indices.listeners);
        let listeners = inherited.listeners.len() as u64;
        for (service, key, id, steered, socket) in inherited.listeners {
            if steered && self.registry.kernel().is_some() {
                self.inherited_listeners
                    .insert((service, key), (id, socket));
                continue;
            }
            // A fallback listener binds the service address itself: keep
            // accepting on it, or a new bind would find the address taken.
            let started = tcp_listener(socket)
                .map_err(anyhow::Error::from)
                .and_then(|l| self.start_listener((service, key), id, l, steered));
            if let Err(e) = started {
                error!(error = %e, "cannot accept on a listener handed over");
            }
        }
        for c in &inherited.connections {
            match c {
                Parked::Spliced { meta, .. } | Parked::Copied { meta, .. } => {
                    self.registry.adopt_connection(&meta.builder);
                    if meta.in_fd_store {
                        fdstore::adopted(2);
                    }
                }
                Parked::Fresh { .. } => {}
            }
        }
        // The predecessor's listeners are in the store too, if it keeps one.
        fdstore::adopted(listeners as usize);
        Adopted {
            socket: inherited.socket,
            connections: inherited.connections,
            from_pid: inherited.from_pid,
            proceeded: inherited.proceeded,
            listeners,
        }
    }

    /// After the first plan: serves the adopted connections, accepts what
    /// was queued on listeners the plan does not keep, and lets the
    /// predecessor go.
    pub(super) async fn finish_takeover(
        &mut self,
        adopted: Adopted,
        report_pipe: Option<std::fs::File>,
    ) {
        self.retire_inherited_listeners();
        let mut report = TakeoverStatus {
            from: "handover".to_owned(),
            from_pid: adopted.from_pid,
            at: unix_now(),
            listeners: adopted.listeners,
            ..TakeoverStatus::default()
        };
        let mut peers = std::collections::HashSet::new();
        for c in adopted.connections {
            match &c {
                Parked::Spliced {
                    client, upstream, ..
                } => {
                    report.spliced += 1;
                    for s in [client, upstream] {
                        if let Ok(cookie) = crate::kernel::sock::cookie(s) {
                            peers.insert(cookie);
                        }
                    }
                }
                Parked::Copied { .. } => report.copied += 1,
                Parked::Fresh { .. } => report.in_handoff += 1,
            }
            proxy::spawn_resume(c, self.context());
        }
        report.handover_ms = adopted.proceeded.elapsed().as_secs_f64() * 1e3;
        if let Some(kernel) = self.registry.kernel() {
            let forgotten = kernel.forget_peers_except(&peers);
            if forgotten > 0 {
                info!(
                    entries = forgotten,
                    "removed peer entries of spliced pairs that are gone"
                );
            }
        }
        notify::took_over(std::process::id());
        let socket = adopted.socket;
        let done = blocking(move || handover::send(&socket, &Message::Done, &[])).await;
        if let Err(e) = done {
            // Everything is here already; the predecessor exits at its
            // timeout without touching what it handed over.
            warn!(error = %e, "cannot tell the predecessor that the takeover is done");
        }
        info!(
            from_pid = report.from_pid,
            spliced = report.spliced,
            copied = report.copied,
            in_handoff = report.in_handoff,
            listeners = report.listeners,
            handover_ms = report.handover_ms,
            "took over {} connection(s) ({} spliced, {} copied, {} in handoff) and {} listener(s) from pid {} in {:.1} ms",
            report.spliced + report.copied + report.in_handoff,
            report.spliced,
            report.copied,
            report.in_handoff,
            report.listeners,
            report.from_pid,
            report.handover_ms,
        );
        if let Some(mut pipe) = report_pipe {
            use std::io::Write;
            let _ = writeln!(
                pipe,
                "ok pid {} took over {} connection(s) ({} spliced, {} copied, {} in handoff) and {} listener(s) from pid {} in {:.1} ms",
                std::process::id(),
                report.spliced + report.copied + report.in_handoff,
                report.spliced,
                report.copied,
                report.in_handoff,
                report.listeners,
                report.from_pid,
                report.handover_ms
            );
        }
        self.registry.inner().takeover = Some(report);
    }

    /// Inherited listeners the first plan did not take: what is queued on
    /// them is served for a moment, then they close (and leave the store).
    fn retire_inherited_listeners(&mut self) {
        let leftover: Vec<(String, String)> = self.inherited_listeners.keys().cloned().collect();
        for key in &leftover {
            if let Some((id, socket)) = self.inherited_listeners.remove(key) {
                let started = tcp_listener(socket)
                    .map_err(anyhow::Error::from)
                    .and_then(|l| self.start_listener(key.clone(), id, l, true));
                if let Err(e) = started {
                    error!(service = key.0, builder = key.1, error = %e, "cannot accept on an inherited listener");
                }
            }
        }
        self.retire_listeners(|k| !leftover.contains(k));
    }

    /// Opens the handover socket for a successor; without it, a new
    /// `yensid run` cannot take over (said once).
    pub(super) fn listen_for_successors(&mut self, path: &Path) {
        let registered = handover::bind(path).and_then(|fd| {
            // SAFETY: an OwnedFd keeps returning the descriptor it owns,
            // which stays open until the AsyncFd drops it.
            unsafe { AsyncFd::register(fd) }.map_err(|e| HandoverError::Io(std::io::Error::from(e)))
        });
        match registered {
            Ok(listener) => self.handover = Some(listener),
            Err(e) => {
                warn!(error = %e, "no takeover possible: a new daemon will have to stop this one")
            }
        }
    }

    pub(super) fn stop_listening_for_successors(&mut self, path: &Path) {
        if self.handover.take().is_some() {
            let _ = std::fs::remove_file(path);
        }
    }

    /// Hands everything to the successor on `socket`. Returns whether it
    /// took over (this daemon must then exit without touching the kernel);
    /// otherwise this daemon serves on.
    pub(super) async fn hand_over(&mut self, socket: OwnedFd) -> bool {
        let greeted = blocking(move || {
            let (hello, _) = handover::expect(&socket, "hello")?;
            Ok((socket, hello))
        })
        .await;
        let (socket, successor_pid) = match greeted {
            Ok((socket, Message::Hello { protocol, abi, pid })) => {
                if protocol != PROTOCOL || abi != ABI_VERSION {
                    let reason = format!(
                        "pid {} speaks handover protocol {protocol} with map ABI {abi}; this \
                         daemon (pid {}) speaks {PROTOCOL} with ABI {ABI_VERSION}: stop this one \
                         and start the new one instead",
                        pid,
                        std::process::id()
                    );
                    warn!(successor = pid, "takeover refused: {reason}");
                    let _ = blocking(move || {
                        handover::send(&socket, &Message::Refused { reason }, &[])
                    })
                    .await;
                    return false;
                }
                (socket, pid)
            }
            Ok(_) => return false,
            Err(e) => {
                warn!(error = %e, "takeover attempt ended before it began");
                return false;
            }
        };
        info!(
            successor = successor_pid,
            "a new daemon takes over: waiting while it loads"
        );
        let offer = Message::Offer {
            pid: std::process::id(),
            bpf: self.registry.kernel().is_some(),
            indices: handover::Indices {
                services: self.services.entries(),
                builders: self.builders.entries(),
                listeners: self.listener_ids.entries(),
            },
        };
        let proceeded = blocking(move || {
            handover::send(&socket, &offer, &[])?;
            handover::expect(&socket, "proceed")?;
            Ok(socket)
        })
        .await;
        let socket = match proceeded {
            Ok(socket) => socket,
            Err(e) => {
                // It may have pinned its dispatch link in place of ours.
                self.serve_on(Vec::new(), &e.to_string()).await;
                return false;
            }
        };
        let started = Instant::now();
        // From here the successor owns the maps and nobody accepts until
        // it does: new connections wait in the listeners' queues.
        self.registry.freeze(true);
        for handle in self.listeners.values_mut() {
            handle.task.abort();
            let _ = (&mut handle.task).await;
        }
        self.control.task.abort();
        if let Some(m) = &self.metrics {
            m.task.abort();
        }
        let (mut parked, stragglers) = self.recaller.collect(COLLECT_LIMIT).await;
        // Connections waiting for a slot: like those in their handoff, the
        // successor serves them anew (and queues them again while the pool
        // is full).
        for waiting in self.registry.queues.take_all() {
            let waited = waiting.arrived.elapsed().as_millis() as u64;
            parked.push(Parked::Fresh {
                client: waiting.stream,
                service: waiting.service,
                steered: String::new(),
                consumed: waiting.read,
                opened_unix_ms: proxy::unix_ms().saturating_sub(waited),
            });
        }
        if stragglers > 0 {
            warn!(
                connections = stragglers,
                "{stragglers} connection(s) in the middle of their key exchange could not be handed over; they end with this process"
            );
        }
        let mut listeners = Vec::new();
        for ((service, key), handle) in &self.listeners {
            listeners.push((
                Item::Listener {
                    service: service.clone(),
                    key: key.clone(),
                    id: handle.id,
                    steered: handle.steered,
                },
                dup(&handle.socket),
            ));
        }
        listeners.push((Item::Control, dup(&self.control.socket)));
        if let Some(m) = &self.metrics {
            listeners.push((Item::Metrics, dup(&m.socket)));
        }
        let counts = (parked.len(), stragglers);
        let sent = blocking(move || {
            let owned: Vec<(Item, OwnedFd)> = listeners
                .into_iter()
                .filter_map(|(item, fd)| Some((item, fd.ok()?)))
                .collect();
            let items: Vec<(Item, Vec<BorrowedFd<'_>>)> = owned
                .iter()
                .map(|(item, fd)| (item.clone(), vec![fd.as_fd()]))
                .chain(parked.iter().map(describe))
                .collect();
            let result = handover::send_items(&socket, items)
                .and_then(|()| handover::expect(&socket, "done").map(drop));
            Ok((parked, result))
        })
        .await;
        let (parked, result) = match sent {
            Ok(pair) => pair,
            Err(e) => {
                error!(error = %e, "handover failed; the connections it held are lost");
                self.serve_on(Vec::new(), &e.to_string()).await;
                return false;
            }
        };
        match result {
            Ok(()) => {
                info!(
                    successor = successor_pid,
                    connections = counts.0,
                    listeners = self.listeners.len(),
                    millis = started.elapsed().as_secs_f64() * 1e3,
                    "handed over to pid {successor_pid}"
                );
                // Closing our copies leaves the successor's.
                drop(parked);
                true
            }
            Err(e) => {
                self.serve_on(parked, &e.to_string()).await;
                false
            }
        }
    }

    /// After a takeover that failed: everything back into service.
    async fn serve_on(&mut self, parked: Vec<Parked>, why: &str) {
        error!(error = why, "takeover failed: this daemon serves on");
        self.recaller.reset();
        self.registry.freeze(false);
        for p in parked {
            proxy::spawn_resume(p, self.context());
        }
        let keys: Vec<(String, String)> = self.listeners.keys().cloned().collect();
        for key in keys {
            let Some(handle) = self.listeners.remove(&key) else {
                continue;
            };
            let restarted = handle
                .socket
                .try_clone()
                .and_then(tcp_listener)
                .map_err(anyhow::Error::from)
                .and_then(|l| self.start_listener(key.clone(), handle.id, l, handle.steered));
            if let Err(e) = restarted {
                error!(service = key.0, listener = key.1, error = %e, "cannot accept again on a listener");
            }
        }
        match self.control.socket.try_clone().and_then(unix_listener) {
            Ok(l) => {
                self.control.task = tokio::spawn(crate::operate::control::serve(
                    l,
                    self.requests.clone(),
                    self.access.clone(),
                ))
            }
            Err(e) => error!(error = %e, "cannot serve the control socket again"),
        }
        if let Some(m) = &mut self.metrics {
            match m.socket.try_clone().and_then(tcp_listener) {
                Ok(l) => {
                    m.task = tokio::spawn(crate::operate::metrics::serve(l, self.requests.clone()))
                }
                Err(e) => error!(error = %e, "cannot serve metrics again"),
            }
        }
        if let Some(kernel) = self.registry.kernel()
            && let Err(e) = kernel.repin_link()
        {
            error!(error = %e, "cannot pin the dispatch link again");
        }
        self.apply_logged().await;
    }
}

fn dup(fd: &OwnedFd) -> std::io::Result<OwnedFd> {
    fd.try_clone()
}

/// The environment variable naming the descriptor on which `yensid
/// takeover` waits for the new daemon's word.
pub const REPORT_FD_ENV: &str = "YENSID_TAKEOVER_REPORT_FD";

/// The pipe `yensid takeover` gave this process, if it did: taken (and
/// closed on exec) at once, so no child inherits it.
pub(super) fn report_pipe() -> Option<std::fs::File> {
    use std::os::fd::FromRawFd;
    let fd: i32 = std::env::var(REPORT_FD_ENV).ok()?.parse().ok()?;
    // SAFETY: fstat on a descriptor number, which may not be open: then it fails.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if fd < 3
        || unsafe { libc::fstat(fd, &mut st) } != 0
        || st.st_mode & libc::S_IFMT != libc::S_IFIFO
    {
        warn!(fd, "{REPORT_FD_ENV} names no pipe; ignored");
        return None;
    }
    // SAFETY: an open pipe descriptor that this process owns from here on.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    Some(unsafe { std::fs::File::from_raw_fd(fd) })
}

/// Starts `yensid run --take-over` from this binary with `config` in the
/// background and waits for its word: `Ok(summary)` once it took over.
pub fn start_successor(config: &Path, limit: Duration) -> Result<String> {
    use std::{io::Read, os::unix::process::CommandExt, process::Command};
    // A configuration the new daemon would refuse is said here, before
    // anything starts; the running daemon is not touched.
    crate::config::Config::load(config).with_context(|| {
        format!(
            "invalid configuration {}; the running daemon serves on",
            config.display()
        )
    })?;
    let mut fds = [0; 2];
    // SAFETY: valid out array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).context("cannot create a pipe");
    }
    use std::os::fd::FromRawFd;
    // SAFETY: fresh descriptors owned here.
    let (reader, writer) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    const CHILD_FD: i32 = 3;
    let exe = std::env::current_exe().context("cannot find this program's path")?;
    let raw_writer = std::os::fd::AsRawFd::as_raw_fd(&writer);
    let mut command = Command::new(&exe);
    command
        .args(["run", "--take-over", "--config"])
        .arg(config)
        .env(REPORT_FD_ENV, CHILD_FD.to_string())
        .stdin(std::process::Stdio::null());
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        command.pre_exec(move || {
            // Its own session: it outlives this command and its terminal.
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // dup2 clears close-on-exec on the copy.
            if libc::dup2(raw_writer, CHILD_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command
        .spawn()
        .with_context(|| format!("cannot start {}", exe.display()))?;
    drop(writer);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut word = String::new();
        let _ = std::fs::File::from(reader)
            .take(4096)
            .read_to_string(&mut word);
        let _ = tx.send(word);
    });
    let word = match rx.recv_timeout(limit) {
        Ok(word) => word,
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!(
                "the new daemon (pid {}) did not take over within {limit:?}; stopped it, the running daemon serves on",
                child.id()
            );
        }
    };
    match word.strip_prefix("ok ") {
        Some(summary) => Ok(summary.trim().to_owned()),
        None => {
            let status = child.wait().ok();
            anyhow::bail!(
                "the new daemon (pid {}) did not take over ({}); see its log. The running daemon serves on",
                child.id(),
                status.map_or("no exit status".to_owned(), |s| s.to_string())
            )
        }
    }
}

/// What systemd's file descriptor store gave back, adopted before the
/// first plan.
pub(super) struct Recovered {
    connections: Vec<Parked>,
    listeners: u64,
}

impl Controller {
    /// Takes in the listeners and spliced pairs systemd kept for this
    /// service (the daemon before this one crashed, or was restarted with
    /// the store preserved).
    pub(super) fn adopt_stored(&mut self, stored: fdstore::Stored) -> Recovered {
        if stored.unknown > 0 {
            warn!(
                descriptors = stored.unknown,
                "systemd passed descriptors yensid does not know; closed"
            );
        }
        let listeners = stored.listeners.len() as u64;
        for (service, builder, socket) in stored.listeners {
            let id = match self
                .listener_ids
                .get_or_assign(&format!("{service}/{builder}"))
            {
                Ok(id) => id,
                Err(e) => {
                    warn!(service, builder, error = %e, "a stored listener has no room; closed");
                    fdstore::remove_listener(&service, &builder);
                    continue;
                }
            };
            self.inherited_listeners
                .insert((service, builder), (id, socket));
        }
        let mut connections = Vec::new();
        for (_cookie, service, builder, client, upstream) in stored.pairs {
            let client = std::net::TcpStream::from(client);
            let upstream = std::net::TcpStream::from(upstream);
            self.registry.adopt_connection(&builder);
            connections.push(Parked::Spliced {
                meta: handover::Meta {
                    service,
                    builder,
                    peer: client.peer_addr().ok(),
                    opened_unix_ms: proxy::unix_ms(),
                    failovers: 0,
                    in_fd_store: true,
                },
                client,
                upstream,
                ended: [false, false],
            });
        }
        fdstore::adopted(connections.len() * 2 + listeners as usize);
        Recovered {
            connections,
            listeners,
        }
    }

    /// After the first plan: serves what the store gave back.
    pub(super) fn finish_recovery(&mut self, recovered: Recovered) {
        self.retire_inherited_listeners();
        let mut peers = std::collections::HashSet::new();
        let spliced = recovered.connections.len() as u64;
        for c in recovered.connections {
            if let Parked::Spliced {
                client, upstream, ..
            } = &c
            {
                for s in [client, upstream] {
                    if let Ok(cookie) = crate::kernel::sock::cookie(s) {
                        peers.insert(cookie);
                    }
                }
            }
            proxy::spawn_resume(c, self.context());
        }
        if let Some(kernel) = self.registry.kernel() {
            kernel.forget_peers_except(&peers);
        }
        info!(
            spliced,
            listeners = recovered.listeners,
            "adopted {spliced} spliced connection(s) and {} listener(s) from systemd's file descriptor store",
            recovered.listeners
        );
        self.registry.inner().takeover = Some(TakeoverStatus {
            from: "fd store".to_owned(),
            at: unix_now(),
            listeners: recovered.listeners,
            spliced,
            ..TakeoverStatus::default()
        });
    }
}
