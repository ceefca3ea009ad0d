//! The only module that talks to aya, with its parts `local` (the local
//! path's programs) and `mapped` (the arrays mapped into memory): loads the
//! BPF object, pins its state, attaches the programs and offers typed
//! access to the maps.
//!
//! Pinned layout under the pin path (a bpffs directory):
//! - `dispatch`: the sk_lookup link. While it is pinned the program stays
//!   attached to the network namespace, even if the daemon dies, so claimed
//!   connections keep being refused (their listeners are gone) instead of
//!   reaching another local listener.
//! - `maps-v<ABI>/`: the dispatch maps and the path measurements, readable
//!   without the daemon, and the splice maps (`SPLICED`, `PEERS`): a
//!   spliced pair keeps flowing while its descriptors are on their way to
//!   the next daemon or in systemd's file descriptor store, and that daemon
//!   finds it there. The ABI version in the name keeps a daemon from
//!   reusing maps of another layout.
//!
//! With a read group, the pin directories are `0750` and the pins `0640`,
//! owned by root and that group: its members can open the maps read-only
//! (what `yensid status` and `yensid maps` do), and only root can write.
//! Since Linux 6.5 `bpf()` checks no capability for opening a pin; the
//! file's mode decides.
//!
//! The `observe` program is attached to the daemon's own cgroup (v2) with
//! an unpinned link: it measures the daemon's sockets and has nothing to do
//! once the daemon is gone.
//!
//! Requirements: Linux >= 5.9 (sk_lookup), >= 5.10 for verdict-only
//! stream_verdict; CAP_BPF + CAP_NET_ADMIN (or root).

use std::{
    fs::File,
    io,
    os::{
        fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
        unix::fs::PermissionsExt,
    },
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, MapData, SockHash, SockMap,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{CgroupAttachMode, SkLookup, SkSkb, SockOps, links::FdLink},
};
use tracing::{info, warn};

use super::mapped::Mapped;
use yensid_ebpf::{
    ABI_VERSION,
    maps::{
        self as names, AFFINITY_SLOTS, BINDING_KEY_LEN, BINDING_PORT_BITS, Backend, BuilderState,
        MAX_BACKENDS, Override, PathStats, ServiceCounters, ServiceState,
    },
};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const BPFFS_MOUNT: &str = crate::config::BPFFS_MOUNT;
const LINK_PIN: &str = "dispatch";
/// The maps the BPF object declares pinned (`Array::pinned` and friends):
/// what `maps-v<ABI>/` holds, and all that a stop removes from it.
const PINNED_MAPS: [&str; 18] = [
    names::BINDINGS,
    names::SERVICES,
    names::SERVICE_BACKENDS,
    names::BUILDERS,
    names::ASSIGNED,
    names::RELEASED,
    names::SERVICE_COUNTERS,
    names::AFFINITY,
    names::OVERRIDE,
    names::LISTENERS,
    names::PATH_STATS,
    names::SPLICED,
    names::PEERS,
    names::LOCAL_SERVICES,
    names::LOCAL_BUILDERS,
    names::LOCAL_NETNS,
    names::LOCAL_STATS,
    names::LOCAL_SOCKETS,
];

static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("YENSID_EBPF_OBJECT"));

#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error("cannot prepare bpffs at {path}: {source}")]
    Bpffs { path: PathBuf, source: io::Error },
    #[error("cannot load the BPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("BPF program `{name}`: {}", with_causes(.source))]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("BPF map `{name}`: {}", with_causes(.source))]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("cannot pin the dispatch link at {path}: {source}")]
    Pin {
        path: PathBuf,
        source: aya::pin::PinError,
    },
    #[error("cannot open this network namespace: {0}")]
    Netns(io::Error),
    #[error("cannot find this process's cgroup (v2): {0}")]
    Cgroup(io::Error),
    #[error("cannot give group {gid} read access to {path}: {source}")]
    Share {
        gid: u32,
        path: PathBuf,
        source: io::Error,
    },
    #[error("cannot open the pinned map {path} read-only: {source}")]
    OpenPin { path: PathBuf, source: io::Error },
    #[error("cannot remove {path}: {source}")]
    Unpin { path: PathBuf, source: io::Error },
    #[error("BPF program `{name}`: no BPF link to pin (Linux >= 5.7 needed): {source}")]
    Link {
        name: &'static str,
        source: aya::programs::links::LinkError,
    },
    #[error("cannot map BPF map `{name}` into memory (Linux >= 5.5 needed): {source}")]
    Mmap {
        name: &'static str,
        source: io::Error,
    },
    #[error("daemon.local_cgroup {path}: {why}")]
    LocalCgroup { path: PathBuf, why: String },
    #[error("daemon.pin_path {path} {why}")]
    PinPath { path: PathBuf, why: String },
}

/// aya's syscall errors keep the errno in their source, which `Display`
/// alone leaves out.
fn with_causes(error: &dyn std::error::Error) -> String {
    crate::error_chain(error)
}

pub(super) fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> BpfError {
    move |source| BpfError::Map { name, source }
}

/// The loaded and attached BPF side.
pub struct Kernel {
    pin_path: PathBuf,
    // Keeps the programs loaded (the link and the SOCKHASH reference them);
    // the local path loads its programs from it later.
    ebpf: Mutex<Ebpf>,
    local_maps: Mutex<super::local::LocalMaps>,
    local: Mutex<super::local::Attachment>,
    /// `None` only for the instant of a re-pin.
    link: Mutex<Option<FdLink>>,
    tables: Mutex<Tables>,
    splice: Mutex<Splice>,
    observed: Mutex<HashMap<MapData, u64, u32>>,
    path_stats: Array<MapData, PathStats>,
    /// The arrays read or written around every connection, in memory.
    pub(super) mapped: Mapped,
    /// Why the path is not measured, when the `observe` program could not
    /// be attached.
    observe_error: Option<String>,
}

struct Tables {
    bindings: LpmTrie<MapData, [u8; BINDING_KEY_LEN], u32>,
    services: Array<MapData, ServiceState>,
    backends: Array<MapData, Backend>,
    builders: Array<MapData, BuilderState>,
    counters: Array<MapData, ServiceCounters>,
    affinity: Array<MapData, u32>,
    listeners: SockMap<MapData>,
    mode_override: Array<MapData, Override>,
}

struct Splice {
    spliced: SockHash<MapData, u64>,
    peers: HashMap<MapData, u64, u64>,
}

/// A claimed (port, prefix) as the binding trie keys it.
pub type BindingKey = Key<[u8; BINDING_KEY_LEN]>;

pub fn binding_key(port: u16, mapped_addr: &[u8; 16], mapped_len: u32) -> BindingKey {
    Key::new(
        BINDING_PORT_BITS + mapped_len,
        names::binding_key(port, mapped_addr),
    )
}

impl Kernel {
    /// Loads the programs, pins the maps under `pin_path` (reusing maps a
    /// crashed daemon of the same version left there, and readable by
    /// `read_group` when given), attaches `dispatch` to the calling
    /// thread's network namespace, `splice` to the SOCKHASH and `observe`
    /// to this process's cgroup.
    pub fn load(pin_path: &Path, read_group: Option<u32>) -> Result<Kernel, BpfError> {
        prepare_bpffs(pin_path)?;
        let maps_dir = pin_path.join(format!("maps-v{ABI_VERSION}"));
        std::fs::create_dir_all(&maps_dir).map_err(|source| BpfError::Bpffs {
            path: maps_dir.clone(),
            source,
        })?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&maps_dir)
            .load(OBJECT)?;

        let splice: &mut SkSkb = program(&mut ebpf, "splice")?;
        splice.load().map_err(|source| BpfError::Program {
            name: "splice",
            source,
        })?;
        let spliced: SockHash<MapData, u64> = take(&mut ebpf, names::SPLICED)?;
        let splice: &mut SkSkb = program(&mut ebpf, "splice")?;
        let attached = splice
            .attach(spliced.fd())
            .map_err(|source| BpfError::Program {
                name: "splice",
                source,
            })?;
        // The SOCKHASH is pinned and shared with the daemon before and after
        // this one: the program attached to it must not be detached when
        // this process lets go (a successor that fails would otherwise leave
        // the running daemon's pairs without one). Attaching replaces it; it
        // goes with the map.
        let attachment = splice
            .take_link(attached)
            .map_err(|source| BpfError::Program {
                name: "splice",
                source,
            })?;
        std::mem::forget(attachment);

        let dispatch: &mut SkLookup = program(&mut ebpf, "dispatch")?;
        dispatch.load().map_err(|source| BpfError::Program {
            name: "dispatch",
            source,
        })?;
        let netns = File::open("/proc/self/ns/net").map_err(BpfError::Netns)?;
        let link_id = dispatch
            .attach(netns.as_fd())
            .map_err(|source| BpfError::Program {
                name: "dispatch",
                source,
            })?;
        let link: FdLink = dispatch
            .take_link(link_id)
            .map_err(|source| BpfError::Program {
                name: "dispatch",
                source,
            })?
            .into();
        // The new program is attached next to any stale one (they share the
        // maps), so replacing the pin leaves no instant without a claim.
        let link_pin = pin_path.join(LINK_PIN);
        if link_pin.exists() {
            info!(path = %link_pin.display(), "replacing the pinned dispatch link (of the daemon this one takes over from, or of one that did not stop cleanly)");
            std::fs::remove_file(&link_pin).map_err(|source| BpfError::Bpffs {
                path: link_pin.clone(),
                source,
            })?;
        }
        let pinned = link.pin(&link_pin).map_err(|source| BpfError::Pin {
            path: link_pin.clone(),
            source,
        })?;
        let link = FdLink::from(pinned);
        remove_other_versions(pin_path, &maps_dir);
        if let Some(gid) = read_group {
            share_with_group(pin_path, gid)?;
        }
        let observe_error = attach_observe(&mut ebpf).err().map(|e| e.to_string());
        if let Some(error) = &observe_error {
            warn!(%error, "the kernel will not measure builder RTT and retransmits; max_rtt_ms uses the probes' RTT");
        }

        let tables = Tables {
            bindings: take(&mut ebpf, names::BINDINGS)?,
            services: take(&mut ebpf, names::SERVICES)?,
            backends: take(&mut ebpf, names::SERVICE_BACKENDS)?,
            builders: take(&mut ebpf, names::BUILDERS)?,
            counters: take(&mut ebpf, names::SERVICE_COUNTERS)?,
            affinity: take(&mut ebpf, names::AFFINITY)?,
            listeners: take(&mut ebpf, names::LISTENERS)?,
            mode_override: take(&mut ebpf, names::OVERRIDE)?,
        };
        let local_maps = super::local::LocalMaps::take(&mut ebpf)?;
        let peers = take(&mut ebpf, names::PEERS)?;
        let observed = take(&mut ebpf, names::OBSERVED)?;
        let path_stats = take(&mut ebpf, names::PATH_STATS)?;
        let mapped = Mapped::open(&maps_dir)?;
        info!(pin_path = %pin_path.display(), "BPF programs loaded and attached");
        Ok(Kernel {
            pin_path: pin_path.to_owned(),
            ebpf: Mutex::new(ebpf),
            local_maps: Mutex::new(local_maps),
            local: Mutex::default(),
            link: Mutex::new(Some(link)),
            tables: Mutex::new(tables),
            splice: Mutex::new(Splice { spliced, peers }),
            observed: Mutex::new(observed),
            path_stats,
            mapped,
            observe_error,
        })
    }

    // Access for the local path (`super::local`).
    pub(super) fn ebpf(&self) -> std::sync::MutexGuard<'_, Ebpf> {
        self.ebpf.lock().expect("BPF object poisoned")
    }

    pub(super) fn local_maps(&self) -> std::sync::MutexGuard<'_, super::local::LocalMaps> {
        self.local_maps.lock().expect("local maps poisoned")
    }

    pub(super) fn local_attachment(&self) -> std::sync::MutexGuard<'_, super::local::Attachment> {
        self.local.lock().expect("local attachment poisoned")
    }

    pub(super) fn pin_path(&self) -> &Path {
        &self.pin_path
    }

    /// Whether the kernel measures the path to builders; if not, why.
    pub fn observing(&self) -> Result<(), &str> {
        match &self.observe_error {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }

    /// Has the kernel measure the path of an upstream socket to `builder`
    /// until the returned guard is dropped. Call it before the socket
    /// connects: the handshake gives the first sample.
    pub fn observe(self: &Arc<Self>, cookie: u64, builder: u32) -> Result<Observation, BpfError> {
        self.observed
            .lock()
            .expect("observed map poisoned")
            .insert(cookie, builder, 0)
            .map_err(map_err(names::OBSERVED))?;
        Ok(Observation {
            kernel: self.clone(),
            cookie,
        })
    }

    /// What the kernel measured on the connections to a builder.
    pub fn path_stats(&self, builder: u32) -> Result<PathStats, BpfError> {
        self.path_stats
            .get(&builder, 0)
            .map_err(map_err(names::PATH_STATS))
    }

    /// Removes the objects yensid pinned, by name (the dispatch link and
    /// its maps), then their directories if that left them empty; whatever
    /// else someone put there stays. The programs stay attached only while
    /// this process holds them, so they detach when it exits.
    pub fn remove_pins(&self) -> Result<(), BpfError> {
        let maps_dir = self.pin_path.join(format!("maps-v{ABI_VERSION}"));
        let pins = std::iter::once(self.pin_path.join(LINK_PIN))
            .chain(super::local::link_pins(&self.pin_path))
            .chain(PINNED_MAPS.iter().map(|name| maps_dir.join(name)));
        let mut first_error = None;
        for path in pins {
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    first_error.get_or_insert(BpfError::Unpin { path, source: e });
                }
                _ => {}
            }
        }
        for dir in [&maps_dir, &self.pin_path] {
            if let Err(e) = std::fs::remove_dir(dir)
                && e.kind() != io::ErrorKind::NotFound
            {
                first_error.get_or_insert(BpfError::Unpin {
                    path: dir.clone(),
                    source: e,
                });
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Makes the kernel refuse (RST) every claimed connection from now on:
    /// the first step of a stop, so that no connection reaches another
    /// local listener while listeners close and pins go.
    pub fn refuse_all(&self) -> Result<(), BpfError> {
        self.set_local_override(Some(u64::MAX))
    }

    pub fn set_service(&self, service: u32, state: ServiceState) -> Result<(), BpfError> {
        self.tables()
            .services
            .set(service, state, 0)
            .map_err(map_err(names::SERVICES))
    }

    /// Writes a service's backend list. Entries are written before the
    /// count grows and after it shrinks, so the kernel never reads a
    /// position that is not a valid (builder, listener) pair.
    pub fn set_backends(
        &self,
        service: u32,
        backends: &[Backend],
        state: ServiceState,
    ) -> Result<(), BpfError> {
        let mut t = self.tables();
        let base = service * MAX_BACKENDS;
        for (position, backend) in backends.iter().enumerate() {
            t.backends
                .set(base + position as u32, backend, 0)
                .map_err(map_err(names::SERVICE_BACKENDS))?;
        }
        t.services
            .set(service, state, 0)
            .map_err(map_err(names::SERVICES))
    }

    pub fn set_builder(&self, builder: u32, state: BuilderState) -> Result<(), BpfError> {
        self.tables()
            .builders
            .set(builder, state, 0)
            .map_err(map_err(names::BUILDERS))
    }

    /// Makes the kernel refuse every claimed connection until `until` on
    /// CLOCK_BOOTTIME (`Some(u64::MAX)`: until changed); `None` lifts it.
    pub fn set_local_override(&self, until_boot_ns: Option<u64>) -> Result<(), BpfError> {
        let value = Override {
            local_until_ns: until_boot_ns.unwrap_or(0),
        };
        self.tables()
            .mode_override
            .set(0, value, 0)
            .map_err(map_err(names::OVERRIDE))
    }

    /// Takes a builder out of selection at once, keeping its other
    /// settings (userspace is the only writer of this map).
    pub fn make_ineligible(&self, builder: u32) -> Result<(), BpfError> {
        let mut t = self.tables();
        let mut state = t
            .builders
            .get(&builder, 0)
            .map_err(map_err(names::BUILDERS))?;
        state.eligible = 0;
        t.builders
            .set(builder, state, 0)
            .map_err(map_err(names::BUILDERS))
    }

    pub fn set_affinity(&self, service: u32, positions: &[u32]) -> Result<(), BpfError> {
        let mut t = self.tables();
        for (slot, position) in positions.iter().enumerate().take(AFFINITY_SLOTS as usize) {
            t.affinity
                .set(service * AFFINITY_SLOTS + slot as u32, position, 0)
                .map_err(map_err(names::AFFINITY))?;
        }
        Ok(())
    }

    /// Replaces the set of claimed bindings: adds the new ones first, then
    /// removes the ones no longer wanted.
    pub fn set_bindings(&self, wanted: &[(BindingKey, u32)]) -> Result<(), BpfError> {
        let mut t = self.tables();
        for (key, service) in wanted {
            t.bindings
                .insert(key, service, 0)
                .map_err(map_err(names::BINDINGS))?;
        }
        let present: Vec<BindingKey> = t.bindings.keys().filter_map(Result::ok).collect();
        for key in present {
            let keep = wanted
                .iter()
                .any(|(w, _)| w.prefix_len() == key.prefix_len() && w.data() == key.data());
            if !keep {
                t.bindings.remove(&key).map_err(map_err(names::BINDINGS))?;
            }
        }
        Ok(())
    }

    pub fn register_listener(&self, id: u32, socket: &impl AsRawFd) -> Result<(), BpfError> {
        self.tables()
            .listeners
            .set(id, socket, 0)
            .map_err(map_err(names::LISTENERS))
    }

    /// Connections the kernel has assigned to a builder, ever.
    pub fn assigned(&self, builder: u32) -> Result<u64, BpfError> {
        self.mapped.assigned.load(builder, 0)
    }

    pub fn set_released(&self, builder: u32, released: u64) -> Result<(), BpfError> {
        self.mapped.released.store(builder, 0, released)
    }

    /// The kernel's counters of a service.
    pub fn counters(&self, service: u32) -> Result<ServiceCounters, BpfError> {
        self.tables()
            .counters
            .get(&service, 0)
            .map_err(map_err(names::SERVICE_COUNTERS))
    }

    /// Joins two established sockets: from now on every byte either one
    /// receives is sent out of the other by the kernel.
    pub fn splice(&self, a: (u64, &impl AsRawFd), b: (u64, &impl AsRawFd)) -> Result<(), BpfError> {
        let mut s = self.splice.lock().expect("splice maps poisoned");
        s.spliced
            .insert(a.0, a.1.as_raw_fd(), 0)
            .map_err(map_err(names::SPLICED))?;
        s.spliced
            .insert(b.0, b.1.as_raw_fd(), 0)
            .map_err(map_err(names::SPLICED))?;
        s.peers.insert(a.0, b.0, 0).map_err(map_err(names::PEERS))?;
        s.peers.insert(b.0, a.0, 0).map_err(map_err(names::PEERS))
    }

    /// Undoes [`Kernel::splice`] for sockets about to be closed: removes
    /// their peer entries. Closing a socket takes it out of the SOCKHASH,
    /// so removing it here first would only cost two more syscalls per
    /// connection.
    pub fn unsplice(&self, a: u64, b: u64) {
        let mut s = self.splice.lock().expect("splice maps poisoned");
        for cookie in [a, b] {
            let _ = s.peers.remove(&cookie);
        }
    }

    /// Removes the peer entries of every spliced pair but `keep`'s: what
    /// a daemon that died without handing its pairs on left behind (their
    /// sockets closed with it and left the SOCKHASH; the peer map is keyed
    /// by cookies, which are never reused, so those entries only take room).
    pub fn forget_peers_except(&self, keep: &std::collections::HashSet<u64>) -> usize {
        let mut s = self.splice.lock().expect("splice maps poisoned");
        let stale: Vec<u64> = s
            .peers
            .keys()
            .filter_map(Result::ok)
            .filter(|cookie| !keep.contains(cookie))
            .collect();
        for cookie in &stale {
            let _ = s.peers.remove(cookie);
        }
        stale.len()
    }

    /// Pins this daemon's dispatch link again, replacing whatever is
    /// pinned in its place: after a successor that replaced the pin failed
    /// to take over, this daemon serves on and its link must outlive it.
    pub fn repin_link(&self) -> Result<(), BpfError> {
        let link_pin = self.pin_path.join(LINK_PIN);
        match std::fs::remove_file(&link_pin) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(BpfError::Bpffs {
                    path: link_pin,
                    source: e,
                });
            }
            _ => {}
        }
        let mut slot = self.link.lock().expect("dispatch link poisoned");
        let Some(link) = slot.take() else {
            return Ok(());
        };
        // Pinning consumes the link and gives it back inside the pin; on
        // failure it is gone, and with it the claim once this process exits.
        let pinned = link.pin(&link_pin).map_err(|source| BpfError::Pin {
            path: link_pin,
            source,
        })?;
        *slot = Some(FdLink::from(pinned));
        Ok(())
    }

    fn tables(&self) -> std::sync::MutexGuard<'_, Tables> {
        self.tables.lock().expect("BPF tables poisoned")
    }
}

/// One upstream socket the kernel measures; dropping it stops that.
pub struct Observation {
    kernel: Arc<Kernel>,
    cookie: u64,
}

impl Observation {
    /// The observed socket's cookie.
    pub fn cookie(&self) -> u64 {
        self.cookie
    }
}

impl Drop for Observation {
    fn drop(&mut self) {
        let _ = self
            .kernel
            .observed
            .lock()
            .expect("observed map poisoned")
            .remove(&self.cookie);
    }
}

/// Every pinned dispatch map, decoded; entries that were never written
/// (all zero) are left out. Read without the daemon, from the pins.
#[derive(Debug, serde::Serialize)]
pub struct MapsDump {
    pub pin_path: PathBuf,
    /// Whether the dispatch link is pinned (the program claims traffic).
    pub dispatch_attached: bool,
    /// `"<prefix> port <port>"` -> service index.
    pub bindings: Vec<(String, u32)>,
    pub services: Vec<(u32, ServiceState)>,
    /// `(service, position)` -> backend.
    pub service_backends: Vec<((u32, u32), Backend)>,
    pub builders: Vec<(u32, BuilderState)>,
    /// Builder index -> (assigned by the kernel, released by userspace,
    /// active = assigned - released).
    pub connections: Vec<(u32, (u64, u64, u64))>,
    pub service_counters: Vec<(u32, ServiceCounters)>,
    /// Builder index -> what the kernel measured on its connections.
    pub path_stats: Vec<(u32, PathStats)>,
    /// Service -> slots per backend position.
    pub affinity: Vec<(u32, Vec<(u32, u32)>)>,
    pub local_override_until_boot_ns: u64,
    /// Sockets joined to a peer in the kernel (two per spliced pair),
    /// whoever holds them: a daemon, a successor taking over, or systemd's
    /// file descriptor store.
    pub spliced_sockets: u64,
    /// The local path's maps (clients on this host connect straight to
    /// the builder).
    pub local: super::local::LocalDump,
}

/// Opens the pinned maps under `pin_path` and decodes them.
pub fn read_pinned(pin_path: &Path) -> Result<MapsDump, BpfError> {
    let dir = pin_path.join(format!("maps-v{ABI_VERSION}"));
    let bindings: LpmTrie<MapData, [u8; BINDING_KEY_LEN], u32> = open(&dir, names::BINDINGS)?;
    let services: Array<MapData, ServiceState> = open(&dir, names::SERVICES)?;
    let backends: Array<MapData, Backend> = open(&dir, names::SERVICE_BACKENDS)?;
    let builders: Array<MapData, BuilderState> = open(&dir, names::BUILDERS)?;
    let assigned: Array<MapData, u64> = open(&dir, names::ASSIGNED)?;
    let released: Array<MapData, u64> = open(&dir, names::RELEASED)?;
    let counters: Array<MapData, ServiceCounters> = open(&dir, names::SERVICE_COUNTERS)?;
    let affinity: Array<MapData, u32> = open(&dir, names::AFFINITY)?;
    let mode_override: Array<MapData, Override> = open(&dir, names::OVERRIDE)?;
    let path_stats: Array<MapData, PathStats> = open(&dir, names::PATH_STATS)?;
    let peers: HashMap<MapData, u64, u64> = open(&dir, names::PEERS)?;
    let mut dump = MapsDump {
        pin_path: pin_path.to_owned(),
        dispatch_attached: pin_path.join(LINK_PIN).exists(),
        bindings: bindings
            .iter()
            .filter_map(Result::ok)
            .map(|(key, service)| (describe_binding(&key), service))
            .collect(),
        services: Vec::new(),
        service_backends: Vec::new(),
        builders: Vec::new(),
        connections: Vec::new(),
        service_counters: Vec::new(),
        path_stats: Vec::new(),
        affinity: Vec::new(),
        local_override_until_boot_ns: mode_override.get(&0, 0).map_or(0, |o| o.local_until_ns),
        spliced_sockets: peers.keys().filter(Result::is_ok).count() as u64,
        local: super::local::read_pinned(pin_path, &dir)?,
    };
    for (i, state) in services.iter().enumerate() {
        let Ok(state) = state else { continue };
        let i = i as u32;
        if state == ServiceState::default() {
            continue;
        }
        dump.services.push((i, state));
        for position in 0..state.backends.min(MAX_BACKENDS) {
            if let Ok(b) = backends.get(&(i * MAX_BACKENDS + position), 0) {
                dump.service_backends.push(((i, position), b));
            }
        }
        let mut slots: std::collections::BTreeMap<u32, u32> = Default::default();
        for slot in 0..AFFINITY_SLOTS {
            if let Ok(position) = affinity.get(&(i * AFFINITY_SLOTS + slot), 0) {
                *slots.entry(position).or_default() += 1;
            }
        }
        if state.strategy == yensid_ebpf::maps::strategy::SOURCE_AFFINITY {
            dump.affinity.push((i, slots.into_iter().collect()));
        }
    }
    dump.builders = builders.iter().enumerate().filter_map(written).collect();
    for i in 0..assigned.len() {
        let a = assigned.get(&i, 0).unwrap_or(0);
        let r = released.get(&i, 0).unwrap_or(0);
        if a != 0 || r != 0 {
            dump.connections.push((i, (a, r, a.wrapping_sub(r))));
        }
    }
    dump.service_counters = counters.iter().enumerate().filter_map(written).collect();
    dump.path_stats = path_stats.iter().enumerate().filter_map(written).collect();
    Ok(dump)
}

/// An array entry with its index, unless it was never written (all zero)
/// or cannot be read.
pub(super) fn written<T: Default + PartialEq, E>(
    (i, entry): (usize, Result<T, E>),
) -> Option<(u32, T)> {
    let entry = entry.ok()?;
    (entry != T::default()).then_some((i as u32, entry))
}

/// Opens a pinned map read-only: all a member of the read group may do.
pub(super) fn open<T>(dir: &Path, name: &'static str) -> Result<T, BpfError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let path = dir.join(name);
    let fd = open_pin_read_only(&path).map_err(|source| BpfError::OpenPin {
        path: path.clone(),
        source,
    })?;
    let data = MapData::from_fd(fd).map_err(map_err(name))?;
    let map = aya::maps::Map::from_map_data(data).map_err(map_err(name))?;
    T::try_from(map).map_err(map_err(name))
}

/// `BPF_OBJ_GET` with `BPF_F_RDONLY` (aya's `from_pin` asks for
/// read-write, which a `0640` pin refuses to its group).
fn open_pin_read_only(path: &Path) -> io::Result<OwnedFd> {
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_F_RDONLY: u32 = 1 << 3;
    /// The `BPF_OBJ_*` member of `union bpf_attr`.
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        _pad: [u8; 108],
    }
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    let attr = ObjGet {
        pathname: c_path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: BPF_F_RDONLY,
        path_fd: 0,
        _pad: [0; 108],
    };
    // SAFETY: a valid, zero-padded bpf_attr that outlives the call; the
    // path is a valid C string.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &attr as *const ObjGet,
            std::mem::size_of::<ObjGet>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: BPF_OBJ_GET returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Loads `observe` and attaches it to this process's cgroup next to any
/// other program there (other daemons in the same cgroup keep theirs):
/// cgroup programs attached through a BPF link always stack, and the
/// kernel rejects `BPF_F_ALLOW_MULTI` on a link, hence `Single`.
fn attach_observe(ebpf: &mut Ebpf) -> Result<(), BpfError> {
    let cgroup = own_cgroup().map_err(BpfError::Cgroup)?;
    let cgroup = File::open(&cgroup).map_err(BpfError::Cgroup)?;
    let observe: &mut SockOps = program(ebpf, "observe")?;
    observe.load().map_err(|source| BpfError::Program {
        name: "observe",
        source,
    })?;
    observe
        .attach(cgroup.as_fd(), CgroupAttachMode::Single)
        .map_err(|source| BpfError::Program {
            name: "observe",
            source,
        })?;
    Ok(())
}

/// This process's cgroup directory on the cgroup v2 hierarchy (its mount
/// point from `/proc/self/mountinfo`, its path from `/proc/self/cgroup`).
fn own_cgroup() -> io::Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
    let mount = cgroup2_mount(&mounts)
        .ok_or_else(|| io::Error::other("no cgroup2 file system is mounted"))?;
    let membership = std::fs::read_to_string("/proc/self/cgroup")?;
    let path = membership
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .ok_or_else(|| io::Error::other("this process is in no cgroup v2"))?;
    Ok(Path::new(mount).join(path.trim_start_matches('/')))
}

/// The mount point of the first cgroup2 file system in a mountinfo text.
pub(super) fn cgroup2_mount(mountinfo: &str) -> Option<&str> {
    mountinfo.lines().find_map(|line| {
        let (fields, rest) = line.split_once(" - ")?;
        (rest.split_whitespace().next()? == "cgroup2").then(|| fields.split_whitespace().nth(4))?
    })
}

/// Makes everything under `pin_path` readable by group `gid` and nobody
/// else but root.
fn share_with_group(pin_path: &Path, gid: u32) -> Result<(), BpfError> {
    let share = |path: &Path, mode: u32| {
        std::os::unix::fs::chown(path, Some(0), Some(gid))
            .and_then(|()| std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)))
            .map_err(|source| BpfError::Share {
                gid,
                path: path.to_owned(),
                source,
            })
    };
    share(pin_path, 0o750)?;
    let mut dirs = vec![pin_path.to_owned()];
    while let Some(dir) = dirs.pop() {
        let entries = std::fs::read_dir(&dir).map_err(|source| BpfError::Share {
            gid,
            path: dir.clone(),
            source,
        })?;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                share(&path, 0o750)?;
                dirs.push(path);
            } else {
                share(&path, 0o640)?;
            }
        }
    }
    Ok(())
}

/// `"127.0.0.22/32 port 22"` from a binding trie key.
fn describe_binding(key: &BindingKey) -> String {
    let data = key.data();
    let port = u16::from_be_bytes([data[0], data[1]]);
    let mut addr = [0u8; 16];
    addr.copy_from_slice(&data[4..20]);
    let v6 = std::net::Ipv6Addr::from(addr);
    let bits = key.prefix_len().saturating_sub(BINDING_PORT_BITS);
    match v6.to_ipv4_mapped() {
        Some(v4) if bits >= 96 => format!("{v4}/{} port {port}", bits - 96),
        _ => format!("{v6}/{bits} port {port}"),
    }
}

pub(super) fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, BpfError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let program = ebpf.program_mut(name).ok_or(BpfError::Program {
        name,
        source: aya::programs::ProgramError::NotLoaded,
    })?;
    program
        .try_into()
        .map_err(|source| BpfError::Program { name, source })
}

pub(super) fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, BpfError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(BpfError::Map {
        name,
        source: aya::maps::MapError::InvalidName { name: name.into() },
    })?;
    T::try_from(map).map_err(map_err(name))
}

/// Mounts bpffs at /sys/fs/bpf when the pin path lives there and it is not
/// mounted yet, then creates the pin directory, which must be a directory
/// of its own inside a bpffs: not the mount itself (where other programs
/// pin their objects) and not on another file system.
fn prepare_bpffs(pin_path: &Path) -> Result<(), BpfError> {
    let err = |path: &Path| {
        let path = path.to_owned();
        move |source| BpfError::Bpffs { path, source }
    };
    if pin_path.starts_with(BPFFS_MOUNT) && !is_bpffs(Path::new(BPFFS_MOUNT)) {
        std::fs::create_dir_all(BPFFS_MOUNT).map_err(err(Path::new(BPFFS_MOUNT)))?;
        mount_bpffs(Path::new(BPFFS_MOUNT)).map_err(err(Path::new(BPFFS_MOUNT)))?;
        info!(path = BPFFS_MOUNT, "mounted bpffs");
    }
    let not_own = |why: String| BpfError::PinPath {
        path: pin_path.to_owned(),
        why,
    };
    // The nearest existing ancestor: the directories created below it are
    // on its file system.
    let ancestor = pin_path
        .ancestors()
        .skip(1)
        .find(|a| a.exists())
        .ok_or_else(|| not_own("has no parent directory".to_owned()))?;
    if !is_bpffs(ancestor) {
        return Err(not_own(format!(
            "{} is not on a bpffs: pin_path must be a directory of its own inside a bpffs \
             mount (mount -t bpf bpf <dir>)",
            ancestor.display()
        )));
    }
    std::fs::create_dir_all(pin_path).map_err(err(pin_path))?;
    let parent = pin_path.parent().unwrap_or(ancestor);
    if !is_bpffs(pin_path)
        || device(pin_path).map_err(err(pin_path))? != device(parent).map_err(err(parent))?
    {
        return Err(not_own(
            "is a mount point of its own: pin_path must be a directory inside a bpffs mount, \
             not the mount itself"
                .to_owned(),
        ));
    }
    Ok(())
}

/// The device a path's file system is on.
fn device(path: &Path) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(path)?.dev())
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out pointer.
    let rc = unsafe { libc::statfs(c_path.as_ptr(), &mut stat) };
    rc == 0 && stat.f_type as i64 == BPF_FS_MAGIC
}

fn mount_bpffs(path: &Path) -> io::Result<()> {
    let target = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    // SAFETY: valid C strings; no data argument.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Removes map directories of other ABI versions (left by an older daemon
/// that crashed; the stale link that used them is already unpinned): the
/// pins directly in them, then the directory if that emptied it.
fn remove_other_versions(pin_path: &Path, current: &Path) {
    let Ok(entries) = std::fs::read_dir(pin_path) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let is_maps_dir = entry.file_name().to_string_lossy().starts_with("maps-v")
            && entry.file_type().is_ok_and(|t| t.is_dir());
        if !is_maps_dir || path == current {
            continue;
        }
        warn!(path = %path.display(), "removing maps of another yensid version");
        for pin in std::fs::read_dir(&path).into_iter().flatten().flatten() {
            if pin.file_type().is_ok_and(|t| t.is_file()) {
                let _ = std::fs::remove_file(pin.path());
            }
        }
        let _ = std::fs::remove_dir(&path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cgroup2_mount_is_found_among_v1_hierarchies() {
        let mountinfo = "\
30 23 0:26 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
31 30 0:27 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
40 30 0:36 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
        assert_eq!(cgroup2_mount(mountinfo), Some("/sys/fs/cgroup/unified"));
        let optional_fields =
            "29 1 0:25 / /sys/fs/cgroup rw shared:4 - cgroup2 cgroup2 rw,nsdelegate";
        assert_eq!(cgroup2_mount(optional_fields), Some("/sys/fs/cgroup"));
        assert_eq!(
            cgroup2_mount("31 30 0:27 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw"),
            None
        );
    }

    #[test]
    fn the_pin_directory_must_be_its_own_inside_a_bpffs() {
        // Root with bpffs mounted where the daemon expects it: as the daemon runs.
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 || !is_bpffs(Path::new(BPFFS_MOUNT)) {
            eprintln!("SKIPPED (needs root and bpffs at {BPFFS_MOUNT})");
            return;
        }
        let err = prepare_bpffs(Path::new(BPFFS_MOUNT))
            .unwrap_err()
            .to_string();
        assert!(err.contains("is not on a bpffs"), "{err}");
        let elsewhere = std::env::temp_dir().join(format!("yensid-pins-{}", std::process::id()));
        let err = prepare_bpffs(&elsewhere.join("pins"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("is not on a bpffs"), "{err}");
        assert!(!elsewhere.exists(), "created a pin directory off bpffs");
        let own = Path::new(BPFFS_MOUNT).join(format!("yensid-unit-{}", std::process::id()));
        prepare_bpffs(&own.join("nested")).unwrap();
        assert!(is_bpffs(&own.join("nested")));
        std::fs::remove_dir(own.join("nested")).unwrap();
        std::fs::remove_dir(&own).unwrap();
    }

    #[test]
    fn this_process_has_a_cgroup_directory() {
        let dir = own_cgroup().unwrap();
        assert!(dir.join("cgroup.procs").exists(), "{}", dir.display());
    }
}
