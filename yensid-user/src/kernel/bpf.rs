//! The only module that talks to aya, with its parts `local` (the local
//! path's programs), `mapped` (the arrays mapped into memory) and `pins`
//! (the pin directory, and the pins read back without the daemon): loads
//! the BPF object, pins its state, attaches the programs and offers typed
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
    os::fd::{AsFd, AsRawFd},
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
use super::pins::{prepare_bpffs, remove_other_versions, share_with_group};
use yensid_ebpf::{
    ABI_VERSION,
    maps::{
        self as names, AFFINITY_SLOTS, BINDING_KEY_LEN, BINDING_PORT_BITS, Backend, BuilderState,
        MAX_BACKENDS, Override, PathStats, ServiceCounters, ServiceState,
    },
};

pub(super) const BPFFS_MOUNT: &str = crate::config::BPFFS_MOUNT;
pub(super) const LINK_PIN: &str = "dispatch";
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
    fn this_process_has_a_cgroup_directory() {
        let dir = own_cgroup().unwrap();
        assert!(dir.join("cgroup.procs").exists(), "{}", dir.display());
    }
}
