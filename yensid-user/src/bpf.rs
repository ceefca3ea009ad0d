//! The only module that talks to aya: loads the BPF object, pins its state,
//! attaches the programs and offers typed access to the maps.
//!
//! Pinned layout under the pin path (a bpffs directory):
//! - `dispatch`: the sk_lookup link. While it is pinned the program stays
//!   attached to the network namespace, even if the daemon dies, so claimed
//!   connections keep being refused (their listeners are gone) instead of
//!   reaching another local listener.
//! - `maps-v<ABI>/`: the dispatch maps, readable without the daemon. The ABI
//!   version in the name keeps a daemon from reusing maps of another layout.
//!
//! Requirements: Linux >= 5.9 (sk_lookup), >= 5.10 for verdict-only
//! stream_verdict; CAP_BPF + CAP_NET_ADMIN (or root).

use std::{
    fs::File,
    io,
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, MapData, SockHash, SockMap,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{SkLookup, SkSkb, links::FdLink},
};
use tracing::{info, warn};
use yensid_ebpf::{
    ABI_VERSION,
    maps::{
        self as names, AFFINITY_SLOTS, BINDING_KEY_LEN, BINDING_PORT_BITS, Backend, BuilderState,
        MAX_BACKENDS, Override, ServiceCounters, ServiceState,
    },
};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const BPFFS_MOUNT: &str = "/sys/fs/bpf";
const LINK_PIN: &str = "dispatch";

static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("YENSID_EBPF_OBJECT"));

#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error("cannot prepare bpffs at {path}: {source}")]
    Bpffs { path: PathBuf, source: io::Error },
    #[error("cannot load the BPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("BPF program `{name}`: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("BPF map `{name}`: {source}")]
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
}

fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> BpfError {
    move |source| BpfError::Map { name, source }
}

/// The loaded and attached BPF side.
pub struct Kernel {
    pin_path: PathBuf,
    // Keeps the programs loaded (the link and the SOCKHASH reference them).
    _ebpf: Ebpf,
    _link: FdLink,
    tables: Mutex<Tables>,
    splice: Mutex<Splice>,
}

struct Tables {
    bindings: LpmTrie<MapData, [u8; BINDING_KEY_LEN], u32>,
    services: Array<MapData, ServiceState>,
    backends: Array<MapData, Backend>,
    builders: Array<MapData, BuilderState>,
    assigned: Array<MapData, u64>,
    released: Array<MapData, u64>,
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
    /// crashed daemon of the same version left there), attaches `dispatch`
    /// to the calling thread's network namespace and `splice` to the
    /// SOCKHASH.
    pub fn load(pin_path: &Path) -> Result<Kernel, BpfError> {
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
        splice
            .attach(spliced.fd())
            .map_err(|source| BpfError::Program {
                name: "splice",
                source,
            })?;

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
            warn!(path = %link_pin.display(), "replacing the dispatch link of a daemon that did not stop cleanly");
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

        let tables = Tables {
            bindings: take(&mut ebpf, names::BINDINGS)?,
            services: take(&mut ebpf, names::SERVICES)?,
            backends: take(&mut ebpf, names::SERVICE_BACKENDS)?,
            builders: take(&mut ebpf, names::BUILDERS)?,
            assigned: take(&mut ebpf, names::ASSIGNED)?,
            released: take(&mut ebpf, names::RELEASED)?,
            counters: take(&mut ebpf, names::SERVICE_COUNTERS)?,
            affinity: take(&mut ebpf, names::AFFINITY)?,
            listeners: take(&mut ebpf, names::LISTENERS)?,
            mode_override: take(&mut ebpf, names::OVERRIDE)?,
        };
        let peers = take(&mut ebpf, names::PEERS)?;
        info!(pin_path = %pin_path.display(), "BPF programs loaded and attached");
        Ok(Kernel {
            pin_path: pin_path.to_owned(),
            _ebpf: ebpf,
            _link: link,
            tables: Mutex::new(tables),
            splice: Mutex::new(Splice { spliced, peers }),
        })
    }

    /// Removes every pinned object. The programs stay attached only while
    /// this process holds them, so they detach when it exits.
    pub fn remove_pins(&self) -> io::Result<()> {
        std::fs::remove_dir_all(&self.pin_path)
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
        self.tables()
            .assigned
            .get(&builder, 0)
            .map_err(map_err(names::ASSIGNED))
    }

    pub fn set_released(&self, builder: u32, released: u64) -> Result<(), BpfError> {
        self.tables()
            .released
            .set(builder, released, 0)
            .map_err(map_err(names::RELEASED))
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

    fn tables(&self) -> std::sync::MutexGuard<'_, Tables> {
        self.tables.lock().expect("BPF tables poisoned")
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
    /// Service -> slots per backend position.
    pub affinity: Vec<(u32, Vec<(u32, u32)>)>,
    pub local_override_until_boot_ns: u64,
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
        affinity: Vec::new(),
        local_override_until_boot_ns: mode_override.get(&0, 0).map_or(0, |o| o.local_until_ns),
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
    for (i, state) in builders.iter().enumerate() {
        let Ok(state) = state else { continue };
        if state != BuilderState::default() {
            dump.builders.push((i as u32, state));
        }
    }
    for i in 0..assigned.len() {
        let a = assigned.get(&i, 0).unwrap_or(0);
        let r = released.get(&i, 0).unwrap_or(0);
        if a != 0 || r != 0 {
            dump.connections.push((i, (a, r, a.wrapping_sub(r))));
        }
    }
    for (i, c) in counters.iter().enumerate() {
        let Ok(c) = c else { continue };
        if c != ServiceCounters::default() {
            dump.service_counters.push((i as u32, c));
        }
    }
    Ok(dump)
}

fn open<T>(dir: &Path, name: &'static str) -> Result<T, BpfError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let data = MapData::from_pin(dir.join(name)).map_err(map_err(name))?;
    let map = aya::maps::Map::from_map_data(data).map_err(map_err(name))?;
    T::try_from(map).map_err(map_err(name))
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

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, BpfError>
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

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, BpfError>
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
/// mounted yet, then creates the pin directory.
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
    std::fs::create_dir_all(pin_path).map_err(err(pin_path))?;
    if !is_bpffs(pin_path) {
        return Err(BpfError::Bpffs {
            path: pin_path.to_owned(),
            source: io::Error::other("not on a bpffs (mount -t bpf bpf <dir>)"),
        });
    }
    Ok(())
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
/// that crashed); the stale link that used them is already unpinned.
fn remove_other_versions(pin_path: &Path, current: &Path) {
    let Ok(entries) = std::fs::read_dir(pin_path) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let is_maps_dir = entry.file_name().to_string_lossy().starts_with("maps-v");
        if is_maps_dir && path != current {
            warn!(path = %path.display(), "removing maps of another yensid version");
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}
