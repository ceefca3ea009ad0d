//! The daemon's listeners: one loopback listener per (service, builder)
//! that the kernel steers connections to, a queue listener per queueing
//! service, and without BPF the services' own addresses; their accept
//! loops hand each connection to `proxy`.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr},
    os::fd::{AsFd, OwnedFd},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result};
use tokio::{
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};
use tracing::warn;
use yensid_ebpf::maps::queue_listener;

use super::{Controller, takeover};
use crate::{
    config::{Config, Service, WhenFull},
    dataplane::{admission::Quiet, proxy, queue},
    decide::registry::Registry,
    kernel::{bpf::Kernel, sock},
    operate::fdstore,
};

/// How long a listener that left the plan keeps accepting what the kernel
/// already queued on it.
const LISTENER_GRACE: Duration = Duration::from_secs(2);

/// A listener the daemon accepts on, and its accept task.
pub(super) struct ListenerHandle {
    pub(super) id: u32,
    pub(super) task: JoinHandle<()>,
    /// The listening socket, held apart from its accept task: a takeover
    /// stops the task and hands the socket on with its queue.
    pub(super) socket: OwnedFd,
    /// The kernel steers connections to it for one builder (otherwise it
    /// is a fallback listener on a service address).
    pub(super) steered: bool,
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
        sock::set_v6only(&s, false)?;
        s.bind((Ipv4Addr::LOCALHOST.to_ipv6_mapped(), 0).into())?;
        s
    } else {
        let s = tokio::net::TcpSocket::new_v4()?;
        s.bind((Ipv4Addr::LOCALHOST, 0).into())?;
        s
    };
    Ok(socket)
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

impl Controller {
    /// Opens the loopback listener of one (service, builder) pair and
    /// registers it for the kernel to steer connections to.
    pub(super) async fn open_listener(
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
    pub(super) fn start_listener(
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

    /// Opens the queue listener of every service with `when_full =
    /// "queue"` at its reserved id in `LISTENERS`, and closes those of
    /// services that no longer queue (closing a listener empties its slot:
    /// the kernel then refuses, as with `refuse`).
    pub(super) fn sync_queue_listeners(&mut self, kernel: &Kernel, config: &Config) -> Result<()> {
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
    pub(super) fn retire_listeners(&mut self, keep: impl Fn(&(String, String)) -> bool) {
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
    pub(super) async fn apply_fallback(&mut self, config: &Config) -> Result<()> {
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
        sock::set_v6only(&loopback, false).unwrap();
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
}
