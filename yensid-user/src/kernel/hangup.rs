//! Waits for the end of spliced sockets without waking on their traffic.
//!
//! A spliced socket's data never reaches userspace, yet the kernel still
//! signals "readable" to every waiter after each segment the verdict
//! program redirected (`sk_psock_verdict_data_ready` calls the socket's
//! original `sk_data_ready`). Registered in tokio's epoll, whose interest
//! always includes `EPOLLIN`, the daemon woke once per segment only to find
//! nothing to read: about 10 000 wake-ups per GiB forwarded.
//!
//! Here the sockets sit in an epoll instance of yensid's own that asks for
//! `EPOLLRDHUP` only (errors and hang-ups are always reported). The kernel
//! drops a wake-up whose events the interest does not include before it
//! wakes anyone, so only a FIN, RST or error reaches the daemon.
//!
//! One instance serves every spliced pair, so a connection costs no
//! descriptor beyond its two sockets (a process may be limited to 20 000
//! descriptors, and 10 000 idle connections must fit). One task owns the
//! instance and hands each event, by the token registered with the socket,
//! to the connection task waiting on that pair.

use std::{
    collections::HashMap,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU8, AtomicU64, Ordering},
    },
};

use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::Notify,
};
use tracing::error;

/// Events taken from the kernel per `epoll_wait`.
const BATCH: usize = 64;

/// The shared epoll instance; cheap to clone. Its task runs for as long as
/// the runtime it was created on.
#[derive(Clone)]
pub struct Hangups {
    shared: Arc<Shared>,
}

struct Shared {
    epoll: AsyncFd<OwnedFd>,
    /// Pair id -> the pair's waiter.
    pairs: Mutex<HashMap<u64, Arc<Waiter>>>,
    next_id: AtomicU64,
    /// Set if the task stopped: every waiter then gets this error.
    broken: OnceLock<io::ErrorKind>,
}

/// What the task leaves for one pair.
#[derive(Default)]
struct Waiter {
    /// Bit `i`: socket `i` of the pair had an event not yet taken.
    events: AtomicU8,
    notify: Notify,
}

/// Token of socket `index` (0 or 1) of pair `id`, as epoll returns it.
fn token(id: u64, index: usize) -> u64 {
    id << 1 | index as u64
}

/// The pair id and socket index of a token.
fn untoken(token: u64) -> (u64, usize) {
    (token >> 1, (token & 1) as usize)
}

impl Hangups {
    /// Creates the epoll instance and spawns the task that dispatches its
    /// events; must be called within a tokio runtime.
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain syscall; the result is checked.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let epoll = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: an OwnedFd keeps returning the descriptor it owns, which
        // stays open until the AsyncFd drops it.
        let epoll = unsafe { AsyncFd::register_with_interest(epoll, Interest::READABLE) }
            .map_err(io::Error::from)?;
        let shared = Arc::new(Shared {
            epoll,
            pairs: Mutex::default(),
            next_id: AtomicU64::new(0),
            broken: OnceLock::new(),
        });
        tokio::spawn(dispatch(shared.clone()));
        Ok(Self { shared })
    }

    /// Watches a pair of sockets; events name a socket by its position
    /// here. The sockets must not be registered with tokio at the same
    /// time, or tokio keeps waking on their traffic. They leave the epoll
    /// instance when they are closed (no `EPOLL_CTL_DEL`, which would cost
    /// two syscalls per connection); events after the [`Pair`] is dropped
    /// are ignored.
    pub fn watch(&self, sockets: [RawFd; 2]) -> io::Result<Pair> {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let waiter = Arc::new(Waiter::default());
        self.shared
            .pairs
            .lock()
            .expect("hang-up waiters poisoned")
            .insert(id, waiter.clone());
        let pair = Pair {
            shared: self.shared.clone(),
            id,
            waiter,
        };
        for (index, socket) in sockets.into_iter().enumerate() {
            let mut event = libc::epoll_event {
                events: (libc::EPOLLRDHUP | libc::EPOLLET) as u32,
                u64: token(id, index),
            };
            let control = |op, event: &mut libc::epoll_event| {
                // SAFETY: valid epoll and socket descriptors, valid event.
                match unsafe { libc::epoll_ctl(self.shared.epoll.as_raw_fd(), op, socket, event) } {
                    0 => Ok(()),
                    _ => Err(io::Error::last_os_error()),
                }
            };
            match control(libc::EPOLL_CTL_ADD, &mut event) {
                // Watched before by this process (a pair recalled for a
                // successor that then failed): only its token changes.
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                    control(libc::EPOLL_CTL_MOD, &mut event)?
                }
                other => other?,
            }
        }
        Ok(pair)
    }
}

/// A watched pair of sockets.
pub struct Pair {
    shared: Arc<Shared>,
    id: u64,
    waiter: Arc<Waiter>,
}

impl Pair {
    /// Waits until at least one socket was half-closed, reset or failed,
    /// and returns the positions of those that were.
    pub async fn next(&self) -> io::Result<Vec<usize>> {
        loop {
            // A notification that comes before `notified()` is stored as a
            // permit, so checking first loses none.
            let events = self.waiter.events.swap(0, Ordering::AcqRel);
            if events != 0 {
                return Ok((0..2).filter(|i| events & 1 << i != 0).collect());
            }
            if let Some(&kind) = self.shared.broken.get() {
                return Err(io::Error::new(kind, "the hang-up watcher stopped"));
            }
            self.waiter.notify.notified().await;
        }
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        self.shared
            .pairs
            .lock()
            .expect("hang-up waiters poisoned")
            .remove(&self.id);
    }
}

/// The task that owns the epoll instance: hands each event to its pair.
async fn dispatch(shared: Arc<Shared>) {
    let mut events = [libc::epoll_event { events: 0, u64: 0 }; BATCH];
    let failure = loop {
        let mut guard = match shared.epoll.readable().await {
            Ok(guard) => guard,
            Err(e) => break e,
        };
        let n = match guard.try_io(|epoll| ready(epoll.as_raw_fd(), &mut events)) {
            Ok(Ok(n)) => n,
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
            Ok(Err(e)) => break e,
            Err(_would_block) => continue,
        };
        let pairs = shared.pairs.lock().expect("hang-up waiters poisoned");
        for event in &events[..n] {
            let (id, index) = untoken(event.u64);
            if let Some(waiter) = pairs.get(&id) {
                waiter.events.fetch_or(1 << index, Ordering::AcqRel);
                waiter.notify.notify_one();
            }
        }
    };
    error!(error = %failure, "the hang-up watcher of spliced connections stopped");
    let _ = shared.broken.set(failure.kind());
    for waiter in shared
        .pairs
        .lock()
        .expect("hang-up waiters poisoned")
        .values()
    {
        waiter.notify.notify_one();
    }
}

/// Takes pending events without blocking; `WouldBlock` when there are none
/// (the readiness was stale).
fn ready(epoll: RawFd, events: &mut [libc::epoll_event; BATCH]) -> io::Result<usize> {
    // SAFETY: valid epoll descriptor and a buffer of BATCH events.
    let n = unsafe { libc::epoll_wait(epoll, events.as_mut_ptr(), BATCH as i32, 0) };
    match n {
        0 => Err(io::ErrorKind::WouldBlock.into()),
        1.. => Ok(n as usize),
        _ => Err(io::Error::last_os_error()),
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::Write,
        net::{Shutdown, TcpListener, TcpStream},
        time::Duration,
    };

    use super::*;

    fn connected(listener: &TcpListener) -> (TcpStream, TcpStream) {
        let near = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (far, _) = listener.accept().unwrap();
        (near, far)
    }

    #[test]
    fn tokens_name_the_pair_and_the_socket() {
        for (id, index) in [(0, 0), (0, 1), (7, 1), (u64::MAX >> 1, 0)] {
            assert_eq!(untoken(token(id, index)), (id, index));
        }
        assert_ne!(token(1, 0), token(0, 1));
    }

    #[tokio::test]
    async fn data_does_not_wake_but_half_close_does() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let (mut near, far) = connected(&listener);
        let (_other_near, other_far) = connected(&listener);
        let hangups = Hangups::new().unwrap();
        let pair = hangups
            .watch([other_far.as_raw_fd(), far.as_raw_fd()])
            .unwrap();

        near.write_all(b"data").unwrap();
        let woke = tokio::time::timeout(Duration::from_millis(200), pair.next()).await;
        assert!(woke.is_err(), "woke on data: {woke:?}");

        near.shutdown(Shutdown::Write).unwrap();
        let woke = tokio::time::timeout(Duration::from_secs(5), pair.next()).await;
        assert_eq!(woke.unwrap().unwrap(), vec![1]);
    }

    #[tokio::test]
    async fn each_pair_gets_its_own_events_only() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let hangups = Hangups::new().unwrap();
        let ends: Vec<_> = (0..4).map(|_| connected(&listener)).collect();
        let first = hangups
            .watch([ends[0].1.as_raw_fd(), ends[1].1.as_raw_fd()])
            .unwrap();
        let second = hangups
            .watch([ends[2].1.as_raw_fd(), ends[3].1.as_raw_fd()])
            .unwrap();

        ends[2].0.shutdown(Shutdown::Write).unwrap();
        let woke = tokio::time::timeout(Duration::from_secs(5), second.next()).await;
        assert_eq!(woke.unwrap().unwrap(), vec![0]);
        let woke = tokio::time::timeout(Duration::from_millis(200), first.next()).await;
        assert!(woke.is_err(), "woke for another pair: {woke:?}");

        // A pair that is gone gets nothing; the others still do.
        drop(second);
        ends[3].0.shutdown(Shutdown::Write).unwrap();
        ends[1].0.shutdown(Shutdown::Write).unwrap();
        let woke = tokio::time::timeout(Duration::from_secs(5), first.next()).await;
        assert_eq!(woke.unwrap().unwrap(), vec![1]);
    }
}
