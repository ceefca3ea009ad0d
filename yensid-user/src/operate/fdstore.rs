//! systemd's file descriptor store: the listeners and both sockets of every
//! spliced pair are kept there (`FDSTORE=1` with a name), so that they
//! outlive the daemon. After a crash, systemd restarts the service
//! (`Restart=on-failure`) and passes them back (`LISTEN_FDS`,
//! `LISTEN_FDNAMES`): connections wait in the listeners' queues meanwhile
//! instead of being refused, and spliced pairs, which the kernel forwards
//! whoever holds them, go on; the new daemon adopts them. With
//! `FileDescriptorStorePreserve=restart` (systemd >= 254) the same holds
//! across an explicit restart. Copied connections and those in their
//! handoff have state in the daemon's memory only: a crash ends them.
//!
//! The store is used when systemd says how large it is (`$FDSTORE`, set by
//! systemd >= 254 from `FileDescriptorStoreMax=`, and by the shipped unit
//! for older versions) and `$NOTIFY_SOCKET` is set. Names:
//! `l.<service>.<builder>` for a listener, `c.<cookie>.<service>.<builder>`
//! and `b.<cookie>...` for the client and builder sockets of a pair (the
//! client socket's cookie: unique until reboot), every name part
//! percent-encoded outside `[A-Za-z0-9_-]`, since systemd forbids `:` and
//! control characters and the parts are split on `.`. A few lines of
//! encoding, not worth a dependency.

use std::{
    os::fd::{AsFd, FromRawFd, OwnedFd},
    sync::{
        OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
};

use sd_notify::NotifyState;
use tracing::{info, warn};

/// Descriptors kept free of the store's limit, for the listeners.
const LISTENER_RESERVE: usize = 64;

struct Store {
    limit: usize,
    stored: AtomicUsize,
    full_reported: std::sync::atomic::AtomicBool,
}

static STORE: OnceLock<Option<Store>> = OnceLock::new();

fn store() -> Option<&'static Store> {
    STORE
        .get_or_init(|| {
            std::env::var_os("NOTIFY_SOCKET")?;
            let limit: usize = std::env::var("FDSTORE").ok()?.parse().ok()?;
            (limit > 0).then(|| {
                info!(
                    limit,
                    "keeping listeners and spliced connections in systemd's file descriptor store"
                );
                Store {
                    limit,
                    stored: AtomicUsize::new(0),
                    full_reported: std::sync::atomic::AtomicBool::new(false),
                }
            })
        })
        .as_ref()
}

/// Whether systemd's store keeps this daemon's descriptors (listeners and
/// spliced pairs) through a crash.
pub fn available() -> bool {
    store().is_some()
}

impl Store {
    fn add(&self, n: usize) -> usize {
        let before = self
            .stored
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| {
                Some(s.saturating_add(n))
            })
            .unwrap_or_default();
        before.saturating_add(n)
    }

    fn sub(&self, n: usize) {
        let _ = self
            .stored
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| {
                Some(s.saturating_sub(n))
            });
    }
}

/// Says once, at start, whether the store is used.
pub fn init() {
    if store().is_none() {
        info!(
            "no file descriptor store (not under systemd with FDSTORE set): a crash ends every connection"
        );
    }
}

/// Counts descriptors already in the store that this daemon took over (from
/// systemd at start, or with a handover): they leave it when their
/// connection or listener ends.
pub fn adopted(descriptors: usize) {
    if let Some(store) = store() {
        store.add(descriptors);
    }
}

fn encode(part: &str) -> String {
    let mut out = String::with_capacity(part.len());
    for b in part.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn decode(part: &str) -> Option<String> {
    let bytes = part.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = part.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn listener_name(service: &str, builder: &str) -> String {
    format!("l.{}.{}", encode(service), encode(builder))
}

fn pair_names(cookie: u64, service: &str, builder: &str) -> [String; 2] {
    let rest = format!("{cookie}.{}.{}", encode(service), encode(builder));
    [format!("c.{rest}"), format!("b.{rest}")]
}

fn put(name: &str, fd: impl AsFd) -> bool {
    let fd = fd.as_fd();
    match sd_notify::notify_with_fds(
        &[NotifyState::FdStore, NotifyState::FdName(name)],
        std::slice::from_ref(&fd),
    ) {
        Ok(()) => true,
        Err(e) => {
            warn!(name, error = %e, "cannot put a descriptor in systemd's store");
            false
        }
    }
}

fn remove(name: &str) {
    if let Err(e) = sd_notify::notify(&[NotifyState::FdStoreRemove, NotifyState::FdName(name)]) {
        warn!(name, error = %e, "cannot remove a descriptor from systemd's store");
    }
}

/// Keeps a listener in the store.
pub fn store_listener(service: &str, builder: &str, socket: impl AsFd) {
    let Some(store) = store() else { return };
    if put(&listener_name(service, builder), socket) {
        store.add(1);
    }
}

/// Takes a listener out of the store (it is closing).
pub fn remove_listener(service: &str, builder: &str) {
    let Some(store) = store() else { return };
    remove(&listener_name(service, builder));
    store.sub(1);
}

/// Keeps both sockets of a spliced pair in the store; whether it did.
pub fn store_pair(
    cookie: u64,
    service: &str,
    builder: &str,
    client: impl AsFd,
    upstream: impl AsFd,
) -> bool {
    let Some(store) = store() else { return false };
    let used = store.add(2);
    if used.saturating_add(LISTENER_RESERVE) > store.limit {
        store.sub(2);
        if !store.full_reported.swap(true, Ordering::Relaxed) {
            warn!(
                limit = store.limit,
                "systemd's file descriptor store is full: new spliced connections are not kept there \
                 (raise FileDescriptorStoreMax=); a crash would end them"
            );
        }
        return false;
    }
    let [c, b] = pair_names(cookie, service, builder);
    if put(&c, client) {
        if put(&b, upstream) {
            return true;
        }
        remove(&c);
    }
    store.sub(2);
    false
}

/// Takes a pair out of the store (it ended).
pub fn remove_pair(cookie: u64, service: &str, builder: &str) {
    let Some(store) = store() else { return };
    for name in pair_names(cookie, service, builder) {
        remove(&name);
    }
    store.sub(2);
}

/// What systemd passed back at start.
#[derive(Default)]
pub struct Stored {
    /// (service, builder, socket)
    pub listeners: Vec<(String, String, OwnedFd)>,
    /// (cookie, service, builder, client socket, builder socket)
    pub pairs: Vec<(u64, String, String, OwnedFd, OwnedFd)>,
    /// Descriptors with names this daemon does not know (closed).
    pub unknown: usize,
}

impl Stored {
    pub fn is_empty(&self) -> bool {
        self.listeners.is_empty() && self.pairs.is_empty()
    }
}

/// One stored name, parsed.
#[derive(Debug, PartialEq, Eq)]
enum Name {
    Listener {
        service: String,
        builder: String,
    },
    Client {
        cookie: u64,
        service: String,
        builder: String,
    },
    Builder {
        cookie: u64,
        service: String,
        builder: String,
    },
}

fn parse(name: &str) -> Option<Name> {
    let parts: Vec<&str> = name.split('.').collect();
    match parts.as_slice() {
        ["l", service, builder] => Some(Name::Listener {
            service: decode(service)?,
            builder: decode(builder)?,
        }),
        [side @ ("c" | "b"), cookie, service, builder] => {
            let (cookie, service, builder) =
                (cookie.parse().ok()?, decode(service)?, decode(builder)?);
            Some(if *side == "c" {
                Name::Client {
                    cookie,
                    service,
                    builder,
                }
            } else {
                Name::Builder {
                    cookie,
                    service,
                    builder,
                }
            })
        }
        _ => None,
    }
}

/// Takes the descriptors systemd passed (`LISTEN_FDS`) and clears the
/// variables, so that no child process sees them.
///
/// # Safety
/// Changes the environment: call it before any other thread runs.
pub unsafe fn take_from_environment() -> Stored {
    // SAFETY: the caller runs this before any thread is started.
    let passed = match unsafe { sd_notify::listen_fds_with_names_and_unset_env() } {
        Ok(passed) => passed.collect::<Vec<_>>(),
        Err(e) => {
            warn!(error = %e, "cannot read the descriptors systemd passed");
            return Stored::default();
        }
    };
    let mut stored = Stored::default();
    let mut clients = std::collections::HashMap::new();
    let mut builders = std::collections::HashMap::new();
    for (raw, name) in passed {
        // SAFETY: systemd passed this descriptor to this process, which owns it now.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        match parse(&name) {
            Some(Name::Listener { service, builder }) => {
                stored.listeners.push((service, builder, fd))
            }
            Some(Name::Client {
                cookie,
                service,
                builder,
            }) => {
                clients.insert(cookie, (service, builder, fd));
            }
            Some(Name::Builder { cookie, .. }) => {
                builders.insert(cookie, fd);
            }
            None => stored.unknown += 1,
        }
    }
    for (cookie, (service, builder, client)) in clients {
        match builders.remove(&cookie) {
            Some(upstream) => stored
                .pairs
                .push((cookie, service, builder, client, upstream)),
            None => {
                stored.unknown += 1;
                remove(&pair_names(cookie, &service, &builder)[0]);
            }
        }
    }
    stored.unknown += builders.len();
    stored
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_survive_any_service_and_builder_name() {
        for (service, builder) in [("x86", "b1"), ("a.b", "c:d"), ("sp ace", "ü%.\n")] {
            let l = listener_name(service, builder);
            assert!(!l.contains(':') && !l.chars().any(char::is_control), "{l}");
            assert_eq!(
                parse(&l),
                Some(Name::Listener {
                    service: service.to_owned(),
                    builder: builder.to_owned()
                })
            );
            let [c, b] = pair_names(42, service, builder);
            assert_eq!(
                parse(&c),
                Some(Name::Client {
                    cookie: 42,
                    service: service.to_owned(),
                    builder: builder.to_owned()
                })
            );
            assert!(matches!(parse(&b), Some(Name::Builder { cookie: 42, .. })));
        }
    }

    #[test]
    fn foreign_names_are_not_taken_for_ours() {
        for name in [
            "unknown",
            "stored",
            "l.x",
            "c.notanumber.s.b",
            "l.%zz.b",
            "c.1.s.b.extra",
        ] {
            assert_eq!(parse(name), None, "{name}");
        }
    }
}
