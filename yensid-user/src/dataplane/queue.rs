//! `when_full = "queue"`: connections held while every builder is full.
//!
//! The kernel's `dispatch` steers a SYN that finds every eligible builder
//! of a queueing service at its `max_connections` to the service's queue
//! listener (see `yensid_ebpf::maps::queue_listener`). Its accepted
//! connections are held here as [`QueuedConnection`]s: nothing is read
//! from them and nothing is sent, so the client's identification line
//! waits in the socket for the normal handoff (`proxy::serve`) to read,
//! and the client sees nothing but a connect that succeeded.
//!
//! The order is that of arrival, fair between client addresses: each
//! address has its own FIFO and the FIFOs take turns ([`FairQueue`]), so
//! one client's 50 connections do not starve another's 2.
//!
//! Whenever a slot may have freed (a connection to a builder ended, a
//! reservation was given back, a replan: capacity, health, drains, mode;
//! a connection was queued) the registry asks [`Queues::serve`] to hand
//! the heads to builders. It picks each builder with the service's
//! strategy over userspace's counts and counts the connection for it at
//! once, under the registry's lock, before the kernel's count of the
//! builder that freed the slot drops: while connections wait, a new SYN
//! never finds that slot free and never overtakes them. The connection
//! then goes through the normal handoff with that builder reserved
//! ([`Reserved`]), so the kernel's per-builder count (ASSIGNED minus
//! RELEASED) stays exactly the number of connections userspace counts.
//!
//! A held connection ends in one of these ways, each counted per service:
//! handed to a builder (`served`), refused with RST at `queue_timeout`
//! (`timed_out`), dropped because the client left (`left`), refused at
//! once because the queue held `queue_limit` connections (`refused_full`),
//! or refused because the service stopped taking connections (mode
//! `local`, too few eligible builders, the service or its queue removed
//! by a reload: `refused`). Each waiting connection has one small task
//! that watches for its client leaving and for its timeout; the state
//! itself is in the [`QueuedConnection`] (its socket a plain descriptor),
//! never in that task.

use std::{
    collections::{HashMap, VecDeque},
    io,
    net::{IpAddr, SocketAddr, TcpStream as StdTcpStream},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::{
    io::Interest,
    net::{TcpListener, TcpStream},
    sync::mpsc,
    task::AbortHandle,
};
use tracing::{info, warn};

use crate::{
    config::{QueueSettings, WhenFull},
    dataplane::admission::{Quiet, Ticket},
    dataplane::proxy::{self, Dispatcher, Outcome},
    decide::registry::Registry,
    kernel::{bpf::Observation, sock},
    operate::metrics::Histogram,
    operate::status::QueueStatus,
};

/// Upper bounds of the queue wait histogram, in seconds.
pub const WAIT_BUCKETS: [f64; 12] = [
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// One connection held in a queue: everything needed to serve it later,
/// or to hand it to another process.
pub struct QueuedConnection {
    /// The client's socket, in non-blocking mode. Nothing was read from
    /// it: its identification line is still in the socket.
    pub stream: StdTcpStream,
    pub peer: SocketAddr,
    /// When it was accepted; `queue_timeout` counts from here.
    pub arrived: Instant,
    pub service: String,
    /// Its place among the connections in handoff (`daemon.max_handoffs`
    /// and `max_handoffs_per_client` bound queued connections too).
    pub ticket: Ticket,
    /// What was read from the client: empty when the kernel steered it to
    /// the queue; its identification line when it was queued after its
    /// handoff had read the line and found no builder with a free slot
    /// (the kernel had steered it to a builder whose slot was taken since).
    pub read: Vec<u8>,
}

/// Round-robin over per-client FIFOs: [`FairQueue::pop`] takes the oldest
/// entry of the client whose turn it is, then that client goes to the back
/// of the rotation. A client that had nothing queued joins at the back.
#[derive(Debug)]
pub struct FairQueue<T> {
    fifos: HashMap<IpAddr, VecDeque<T>>,
    /// Clients with at least one entry, in turn order.
    turns: VecDeque<IpAddr>,
    len: usize,
}

impl<T> Default for FairQueue<T> {
    fn default() -> Self {
        Self {
            fifos: HashMap::new(),
            turns: VecDeque::new(),
            len: 0,
        }
    }
}

impl<T> FairQueue<T> {
    pub fn push(&mut self, client: IpAddr, item: T) {
        let client = client.to_canonical();
        let fifo = self.fifos.entry(client).or_default();
        if fifo.is_empty() {
            self.turns.push_back(client);
        }
        fifo.push_back(item);
        self.len += 1;
    }

    /// The entry [`pop`](Self::pop) would return.
    pub fn peek(&self) -> Option<&T> {
        self.fifos.get(self.turns.front()?)?.front()
    }

    pub fn pop(&mut self) -> Option<T> {
        let client = self.turns.pop_front()?;
        let fifo = self.fifos.get_mut(&client)?;
        let item = fifo.pop_front();
        if fifo.is_empty() {
            self.fifos.remove(&client);
        } else {
            self.turns.push_back(client);
        }
        self.len -= usize::from(item.is_some());
        item
    }

    /// Takes out the first entry of `client` that `matches`, wherever it
    /// is; the client keeps its turn.
    pub fn remove(&mut self, client: IpAddr, matches: impl Fn(&T) -> bool) -> Option<T> {
        let client = client.to_canonical();
        let fifo = self.fifos.get_mut(&client)?;
        let item = fifo.remove(fifo.iter().position(matches)?)?;
        if fifo.is_empty() {
            self.fifos.remove(&client);
            self.turns.retain(|c| *c != client);
        }
        self.len -= 1;
        Some(item)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A waiting connection and the task that watches it.
struct Held {
    id: u64,
    connection: QueuedConnection,
    watcher: AbortHandle,
}

/// Counters of one service's queue over the daemon's life.
#[derive(Debug, Default)]
struct Counts {
    queued: u64,
    served: u64,
    timed_out: u64,
    refused_full: u64,
    left: u64,
    refused: u64,
    wait: Histogram,
}

#[derive(Default)]
struct ServiceQueue {
    waiting: FairQueue<Held>,
    counts: Counts,
}

/// A connection taken from a queue with a builder counted for it.
pub struct Handed {
    pub connection: QueuedConnection,
    pub builder: String,
}

/// Why a watcher ended a connection's wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expiry {
    TimedOut,
    Left,
}

/// Every service's queue.
pub struct Queues {
    services: Mutex<HashMap<String, ServiceQueue>>,
    next_id: AtomicU64,
    handed: mpsc::UnboundedSender<Handed>,
    /// Taken once by [`run_handoffs`].
    handed_rx: Mutex<Option<mpsc::UnboundedReceiver<Handed>>>,
}

/// Log limits: a flood of queued connections must not flood the log.
static QUEUED: Quiet = Quiet::new(Duration::from_secs(10), 20);
static SERVED: Quiet = Quiet::new(Duration::from_secs(10), 20);
static TIMED_OUT: Quiet = Quiet::new(Duration::from_secs(10), 20);
static REFUSED: Quiet = Quiet::new(Duration::from_secs(10), 20);

impl Default for Queues {
    fn default() -> Self {
        let (handed, rx) = mpsc::unbounded_channel();
        Self {
            services: Mutex::default(),
            next_id: AtomicU64::new(0),
            handed,
            handed_rx: Mutex::new(Some(rx)),
        }
    }
}

impl Queues {
    fn services(&self) -> MutexGuard<'_, HashMap<String, ServiceQueue>> {
        self.services.lock().expect("queues poisoned")
    }

    /// Whether no connection waits anywhere.
    pub fn is_empty(&self) -> bool {
        self.services().values().all(|q| q.waiting.is_empty())
    }

    /// Holds `connection` until a builder has a slot, its timeout, or its
    /// client leaves; refuses it (RST) if the queue is at its limit.
    /// Must be called without the registry's lock (it takes it to serve).
    pub fn enqueue(
        self: &Arc<Self>,
        registry: &Registry,
        connection: QueuedConnection,
        settings: QueueSettings,
    ) {
        let watch = match connection.stream.try_clone().and_then(TcpStream::from_std) {
            Ok(watch) => watch,
            Err(e) => {
                warn!(service = connection.service, peer = %connection.peer, error = %e, "cannot watch a queued connection; refused");
                refuse(connection.stream);
                return;
            }
        };
        let mut services = self.services();
        let queue = services.entry(connection.service.clone()).or_default();
        let length = queue.waiting.len();
        if length >= settings.limit as usize {
            queue.counts.refused_full += 1;
            drop(services);
            if let Some(left_out) = REFUSED.allow(Instant::now()) {
                warn!(
                    service = connection.service,
                    peer = %connection.peer,
                    queue_limit = settings.limit,
                    similar_left_out = left_out,
                    "queue full (queue_limit): connection refused"
                );
            }
            refuse(connection.stream);
            return;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (service, peer) = (connection.service.clone(), connection.peer);
        let deadline = connection.arrived + settings.timeout;
        // Spawned under the lock: if the client is already gone, the
        // watcher waits for the entry to be in the queue before it looks.
        let watcher = tokio::spawn(watch_one(
            self.clone(),
            service.clone(),
            peer.ip(),
            id,
            watch,
            deadline,
        ))
        .abort_handle();
        queue.waiting.push(
            peer.ip(),
            Held {
                id,
                connection,
                watcher,
            },
        );
        queue.counts.queued += 1;
        drop(services);
        if let Some(left_out) = QUEUED.allow(Instant::now()) {
            info!(
                service,
                %peer,
                waiting = length + 1,
                similar_left_out = left_out,
                "every builder is full: connection queued"
            );
        }
        registry.serve_queues();
    }

    /// Hands the heads of `service`'s queue to the builders `pick` counts
    /// them for, until it finds none; with `refusing`, refuses them all.
    /// Called with the registry locked (`pick` works on its state).
    pub fn serve(
        &self,
        service: &str,
        refusing: bool,
        mut pick: impl FnMut(IpAddr) -> Option<String>,
    ) {
        let mut services = self.services();
        let Some(queue) = services.get_mut(service) else {
            return;
        };
        if refusing {
            let mut refused = Vec::new();
            while let Some(held) = queue.waiting.pop() {
                held.watcher.abort();
                queue.counts.refused += 1;
                refused.push(held.connection);
            }
            drop(services);
            refuse_all(refused, "the service refuses connections now");
            return;
        }
        while let Some(head) = queue.waiting.peek() {
            let Some(builder) = pick(head.connection.peer.ip()) else {
                break;
            };
            let Some(held) = queue.waiting.pop() else {
                break;
            };
            held.watcher.abort();
            let waited = held.connection.arrived.elapsed();
            queue.counts.served += 1;
            queue.counts.wait.observe_in(&WAIT_BUCKETS, waited);
            if let Some(left_out) = SERVED.allow(Instant::now()) {
                info!(
                    service,
                    builder,
                    peer = %held.connection.peer,
                    waited_ms = waited.as_millis() as u64,
                    waiting = queue.waiting.len(),
                    similar_left_out = left_out,
                    "queued connection handed to a builder"
                );
            }
            // The receiver lives as long as the daemon; without it (the
            // daemon stopping) the connection and its count go with the
            // dropped message, which gives the reservation back.
            let _ = self.handed.send(Handed {
                connection: held.connection,
                builder,
            });
        }
    }

    /// Takes every waiting connection out of the queues, in each queue's
    /// order, for a successor that takes over (it queues them again).
    pub fn take_all(&self) -> Vec<QueuedConnection> {
        let mut taken = Vec::new();
        for queue in self.services().values_mut() {
            while let Some(held) = queue.waiting.pop() {
                held.watcher.abort();
                taken.push(held.connection);
            }
        }
        taken
    }

    /// Refuses what waits in queues of services that no longer queue
    /// (removed, or `when_full` changed by a reload).
    pub fn refuse_unless(&self, queueing: impl Fn(&str) -> bool) {
        let mut refused = Vec::new();
        let mut services = self.services();
        services.retain(|name, queue| {
            if queueing(name) {
                return true;
            }
            while let Some(held) = queue.waiting.pop() {
                held.watcher.abort();
                refused.push(held.connection);
            }
            false
        });
        drop(services);
        refuse_all(refused, "the service no longer queues");
    }

    /// A watcher's verdict; nothing if the connection left the queue
    /// already (served or refused).
    fn expire(&self, service: &str, client: IpAddr, id: u64, why: Expiry) {
        let mut services = self.services();
        let Some(queue) = services.get_mut(service) else {
            return;
        };
        let Some(held) = queue.waiting.remove(client, |h| h.id == id) else {
            return;
        };
        match why {
            Expiry::TimedOut => queue.counts.timed_out += 1,
            Expiry::Left => queue.counts.left += 1,
        }
        let waiting = queue.waiting.len();
        drop(services);
        let QueuedConnection {
            stream,
            peer,
            arrived,
            ..
        } = held.connection;
        if why == Expiry::TimedOut {
            if let Some(left_out) = TIMED_OUT.allow(Instant::now()) {
                warn!(
                    service,
                    %peer,
                    waited_ms = arrived.elapsed().as_millis() as u64,
                    waiting,
                    similar_left_out = left_out,
                    "queue_timeout reached: queued connection refused"
                );
            }
            refuse(stream);
        }
    }

    /// `status`'s view of one service's queue.
    pub fn status(
        &self,
        service: &str,
        settings: QueueSettings,
        kernel_queued: Option<u64>,
    ) -> QueueStatus {
        let services = self.services();
        let queue = services.get(service);
        let counts = queue.map(|q| &q.counts);
        let count = |f: fn(&Counts) -> u64| counts.map_or(0, f);
        QueueStatus {
            waiting: queue.map_or(0, |q| q.waiting.len()) as u64,
            limit: settings.limit,
            timeout_seconds: settings.timeout.as_secs_f64(),
            queued: count(|c| c.queued),
            served: count(|c| c.served),
            timed_out: count(|c| c.timed_out),
            refused_full: count(|c| c.refused_full),
            left: count(|c| c.left),
            refused: count(|c| c.refused),
            wait_seconds: counts.map(|c| c.wait.clone()).unwrap_or_default(),
            kernel_queued,
        }
    }
}

/// Waits until the queued connection's client leaves or its deadline
/// passes, then ends its wait (if it is still waiting).
async fn watch_one(
    queues: Arc<Queues>,
    service: String,
    client: IpAddr,
    id: u64,
    watch: TcpStream,
    deadline: Instant,
) {
    let why = tokio::select! {
        () = client_left(&watch) => Expiry::Left,
        () = tokio::time::sleep_until(deadline.into()) => Expiry::TimedOut,
    };
    queues.expire(&service, client, id, why);
}

/// Resolves when the peer closed or reset the connection. Its
/// identification line may be in the socket already, so readability says
/// nothing: the kernel's hang-up flags (EPOLLRDHUP, EPOLLHUP, EPOLLERR) do.
/// Each other wake-up is acknowledged without reading a byte.
async fn client_left(stream: &TcpStream) {
    loop {
        match stream.ready(Interest::READABLE).await {
            Ok(ready) if ready.is_read_closed() || ready.is_error() => return,
            Ok(_) => {
                let _ = stream.try_io(Interest::READABLE, || {
                    Err::<(), _>(io::ErrorKind::WouldBlock.into())
                });
            }
            Err(_) => return,
        }
    }
}

/// Closes with RST: the refusal the kernel would have sent at SYN time.
fn refuse(stream: StdTcpStream) {
    let _ = sock::reset_on_close(&stream);
}

fn refuse_all(connections: Vec<QueuedConnection>, why: &str) {
    for c in connections {
        if let Some(left_out) = REFUSED.allow(Instant::now()) {
            warn!(
                service = c.service,
                peer = %c.peer,
                reason = why,
                similar_left_out = left_out,
                "queued connection refused"
            );
        }
        refuse(c.stream);
    }
}

/// Accepts the connections the kernel steered to `service`'s queue.
pub async fn accept_loop(listener: TcpListener, service: String, registry: Arc<Registry>) {
    let handoffs = registry.handoffs.clone();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                warn!(service, error = %e, "accept failed on the queue listener");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let arrived = Instant::now();
        let ticket = match handoffs.admit(peer.ip()) {
            Ok(ticket) => ticket,
            Err(full) => {
                if let Some(left_out) = REFUSED.allow(arrived) {
                    warn!(service, %peer, reason = %full, similar_left_out = left_out, "too many connections in handoff: queued connection refused");
                }
                let _ = sock::reset_on_close(&stream);
                continue;
            }
        };
        let settings = match registry
            .inner()
            .config
            .services
            .iter()
            .find(|s| s.name == service)
            .map(|s| s.when_full)
        {
            Some(WhenFull::Queue(settings)) => settings,
            _ => {
                let _ = sock::reset_on_close(&stream);
                continue;
            }
        };
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(e) => {
                warn!(service, %peer, error = %e, "cannot hold a queued connection");
                continue;
            }
        };
        registry.queues.enqueue(
            &registry,
            QueuedConnection {
                stream,
                peer,
                arrived,
                service: service.clone(),
                ticket,
                read: Vec::new(),
            },
            settings,
        );
    }
}

/// Queues a client that no builder could take, if `service` queues and
/// takes connections now; else gives it back (to be refused). `read` is
/// what was read from it: its identification line when its handoff found
/// no builder ([`Dispatcher::hold`]), nothing when the userspace fallback
/// (no BPF) found every builder full at its accept.
pub fn hold(
    registry: &Registry,
    service: &str,
    client: TcpStream,
    read: Vec<u8>,
    ticket: Ticket,
) -> Option<TcpStream> {
    let Some(settings) = registry.queueing(service) else {
        return Some(client);
    };
    let peer = client.peer_addr().ok()?;
    let stream = match client.into_std() {
        Ok(stream) => stream,
        Err(e) => {
            warn!(service, %peer, error = %e, "cannot hold a connection in the queue");
            return None;
        }
    };
    registry.queues.enqueue(
        registry,
        QueuedConnection {
            stream,
            peer,
            arrived: Instant::now(),
            service: service.to_owned(),
            ticket,
            read,
        },
        settings,
    );
    None
}

/// Serves the connections taken from the queues, each through the normal
/// handoff with its builder reserved. Runs for the daemon's life.
pub async fn run_handoffs(registry: Arc<Registry>, cx: proxy::Context) {
    let Some(mut handed) = registry
        .queues
        .handed_rx
        .lock()
        .expect("queues poisoned")
        .take()
    else {
        return;
    };
    while let Some(Handed {
        connection,
        builder,
    }) = handed.recv().await
    {
        let reserved = Arc::new(Reserved {
            registry: registry.clone(),
            builder: builder.clone(),
            consumed: AtomicBool::new(false),
        });
        let QueuedConnection {
            stream,
            service,
            ticket,
            read,
            arrived,
            ..
        } = connection;
        let stream = match TcpStream::from_std(stream) {
            Ok(stream) => stream,
            Err(e) => {
                warn!(service, builder, error = %e, "cannot serve a queued connection");
                reserved.give_back();
                continue;
            }
        };
        let cx = proxy::Context {
            dispatcher: reserved,
            ..cx.clone()
        };
        let accepted = proxy::Accepted {
            client: stream,
            service,
            steered: builder,
            // A line read before the client was queued is finished already:
            // the handoff goes straight on to the builder.
            consumed: read,
            opened_unix_ms: proxy::unix_ms().saturating_sub(arrived.elapsed().as_millis() as u64),
        };
        proxy::spawn_serve(accepted, ticket, cx);
    }
}

/// The registry as the dispatcher of a connection taken from a queue: its
/// builder was counted when it left the queue, so the handoff's
/// [`Dispatcher::reserve`] takes that count instead of counting again, and
/// a connection that ends before (its client never identified itself)
/// gives it back.
struct Reserved {
    registry: Arc<Registry>,
    builder: String,
    consumed: AtomicBool,
}

impl Reserved {
    fn give_back(&self) {
        if !self.consumed.swap(true, Ordering::AcqRel) {
            self.registry.release_reserved(&self.builder);
        }
    }
}

impl Dispatcher for Reserved {
    fn address(&self, builder: &str) -> Option<String> {
        self.registry.address(builder)
    }

    fn connect_timeout(&self, builder: &str) -> Duration {
        self.registry.connect_timeout(builder)
    }

    fn reserve(&self, service: &str, steered: &str) -> Option<String> {
        if steered == self.builder && !self.consumed.swap(true, Ordering::AcqRel) {
            return Some(self.builder.clone());
        }
        self.registry.reserve(service, steered)
    }

    fn hold(
        &self,
        service: &str,
        client: TcpStream,
        client_line: Vec<u8>,
        ticket: Ticket,
    ) -> Option<TcpStream> {
        self.registry.hold(service, client, client_line, ticket)
    }

    fn fail_over(
        &self,
        service: &str,
        failed: &str,
        reason: &str,
        tried: &[String],
        busy: bool,
    ) -> Option<String> {
        self.registry
            .fail_over(service, failed, reason, tried, busy)
    }

    fn observe(&self, builder: &str, cookie: u64) -> Option<Observation> {
        self.registry.observe(builder, cookie)
    }

    fn connected(&self, builder: &str, elapsed: Duration) {
        self.registry.connected(builder, elapsed)
    }

    fn finished(&self, builder: &str, outcome: &Outcome) {
        self.give_back();
        self.registry.finished(builder, outcome)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([198, 18, 0, last])
    }

    fn drain(q: &mut FairQueue<(u8, u32)>) -> Vec<(u8, u32)> {
        std::iter::from_fn(|| q.pop()).collect()
    }

    #[test]
    fn clients_take_turns_in_the_order_they_arrived() {
        let mut q = FairQueue::default();
        for n in 0..10 {
            q.push(ip(1), (1, n));
        }
        q.push(ip(2), (2, 0));
        q.push(ip(2), (2, 1));
        assert_eq!(q.len(), 12);
        assert_eq!(q.peek(), Some(&(1, 0)));
        let order = drain(&mut q);
        assert_eq!(
            &order[..5],
            &[(1, 0), (2, 0), (1, 1), (2, 1), (1, 2)],
            "the client with 2 is served between the other's first ones"
        );
        let ones: Vec<u32> = order.iter().filter(|e| e.0 == 1).map(|e| e.1).collect();
        assert_eq!(
            ones,
            (0..10).collect::<Vec<_>>(),
            "each client in FIFO order"
        );
        assert!(q.is_empty() && q.fifos.is_empty() && q.turns.is_empty());
    }

    #[test]
    fn a_client_that_comes_back_waits_for_its_turn_at_the_back() {
        let mut q = FairQueue::default();
        q.push(ip(1), (1, 0));
        q.push(ip(2), (2, 0));
        assert_eq!(q.pop(), Some((1, 0)));
        q.push(ip(1), (1, 1));
        q.push(ip(3), (3, 0));
        assert_eq!(drain(&mut q), [(2, 0), (1, 1), (3, 0)]);
    }

    #[test]
    fn removal_keeps_the_others_turns_and_the_counts() {
        let mut q = FairQueue::default();
        q.push(ip(1), (1, 0));
        q.push(ip(2), (2, 0));
        q.push(ip(1), (1, 1));
        q.push(ip(3), (3, 0));
        assert_eq!(q.remove(ip(2), |e| e.1 == 0), Some((2, 0)));
        assert_eq!(q.remove(ip(2), |_| true), None, "client 2 has nothing left");
        assert_eq!(q.remove(ip(1), |e| e.1 == 7), None);
        assert_eq!(q.remove(ip(1), |e| e.1 == 1), Some((1, 1)));
        assert_eq!(q.len(), 2);
        assert_eq!(drain(&mut q), [(1, 0), (3, 0)]);
    }

    #[test]
    fn an_ipv4_client_on_a_dual_stack_listener_is_one_client() {
        let mut q = FairQueue::default();
        q.push(ip(1), (1, 0));
        q.push("::ffff:198.18.0.1".parse().unwrap(), (1, 1));
        q.push(ip(2), (2, 0));
        assert_eq!(drain(&mut q), [(1, 0), (2, 0), (1, 1)]);
    }

    #[test]
    fn a_flood_from_one_client_does_not_delay_another_beyond_one_turn() {
        let mut q = FairQueue::default();
        for n in 0..1000 {
            q.push(ip(1), (1, n));
        }
        q.push(ip(2), (2, 0));
        let position = drain(&mut q).iter().position(|e| e.0 == 2);
        assert_eq!(position, Some(1));
    }
}
