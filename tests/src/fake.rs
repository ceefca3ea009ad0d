//! Fake builders: TCP listeners inside a namespace that accept connections but do not
//! speak SSH, and remember every connection they accepted and how long the peer kept
//! it open.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::netns::Netns;

/// How often the server's threads look at the stop flag.
const POLL: Duration = Duration::from_millis(20);
/// A connection the peer keeps open longer than this is closed by the server; only
/// against a peer that never hangs up.
const MAX_HOLD: Duration = Duration::from_secs(60);

/// What a fake builder does with each connection it accepts.
#[derive(Clone, Copy, Debug)]
pub enum Fake {
    /// Accepts and sends nothing, like a TCP port whose service is wedged.
    Silent,
    /// Sends these bytes at once, then keeps the connection open without a word more.
    Garbage(&'static [u8]),
    /// Closes each connection right after accepting it.
    CloseAtOnce,
}

/// One connection a [`FakeServer`] accepted.
#[derive(Clone, Debug)]
pub struct FakeConnection {
    pub accepted: Instant,
    /// How long the peer kept the connection open; `None` while it still does.
    pub held: Option<Duration>,
    /// What the peer sent.
    pub received: Vec<u8>,
}

/// A [`Fake`] listener on its own threads; stopped (every connection closed) on drop.
pub struct FakeServer {
    address: SocketAddr,
    connections: Arc<Mutex<Vec<FakeConnection>>>,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl FakeServer {
    /// Listens on `address` in namespace `ns` and serves every connection as `fake`.
    pub fn start(ns: &Netns, address: SocketAddr, fake: Fake) -> Result<Self> {
        let listener = ns
            .run(|| TcpListener::bind(address))?
            .with_context(|| format!("bind fake builder on {address}"))?;
        listener.set_nonblocking(true)?;
        let connections = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let acceptor = {
            let connections = connections.clone();
            let stop = stop.clone();
            thread::spawn(move || accept_loop(&listener, fake, &connections, &stop))
        };
        Ok(Self {
            address,
            connections,
            stop,
            acceptor: Some(acceptor),
        })
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Every connection accepted so far, in order.
    pub fn connections(&self) -> Vec<FakeConnection> {
        lock(&self.connections).clone()
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

fn accept_loop(
    listener: &TcpListener,
    fake: Fake,
    connections: &Arc<Mutex<Vec<FakeConnection>>>,
    stop: &Arc<AtomicBool>,
) {
    let mut serving = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                let accepted = Instant::now();
                let index = {
                    let mut all = lock(connections);
                    all.push(FakeConnection {
                        accepted,
                        held: None,
                        received: Vec::new(),
                    });
                    all.len() - 1
                };
                let connections = connections.clone();
                let stop = stop.clone();
                serving.push(thread::spawn(move || {
                    let received = serve(stream, fake, &stop);
                    let mut all = lock(&connections);
                    all[index].held = Some(accepted.elapsed());
                    all[index].received = received;
                }));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => thread::sleep(POLL),
            Err(_) => thread::sleep(POLL),
        }
    }
    for thread in serving {
        let _ = thread.join();
    }
}

/// Plays `fake` on one connection until the peer hangs up (or the server stops) and
/// returns what the peer sent.
fn serve(mut stream: TcpStream, fake: Fake, stop: &AtomicBool) -> Vec<u8> {
    let mut received = Vec::new();
    // Accepted sockets do not inherit O_NONBLOCK on Linux, but say so anyway.
    if stream.set_nonblocking(false).is_err() || stream.set_read_timeout(Some(POLL)).is_err() {
        return received;
    }
    match fake {
        Fake::CloseAtOnce => return received,
        Fake::Garbage(bytes) => {
            if stream.write_all(bytes).is_err() {
                return received;
            }
        }
        Fake::Silent => {}
    }
    let started = Instant::now();
    let mut chunk = [0u8; 1024];
    while !stop.load(Ordering::Relaxed) && started.elapsed() < MAX_HOLD {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => received.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    received
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
