//! yensid's pins under bpffs: the directory made ready (bpffs mounted
//! where it is missing, a directory of its own, older ABI versions
//! removed), shared read-only with the read group, and read back without
//! the daemon, for `yensid maps` and `yensid status`.

use std::{
    io,
    os::{
        fd::{FromRawFd, OwnedFd},
        unix::fs::PermissionsExt,
    },
    path::{Path, PathBuf},
};

use aya::maps::{Array, HashMap, MapData, lpm_trie::LpmTrie};
use tracing::{info, warn};
use yensid_ebpf::{
    ABI_VERSION,
    maps::{
        self as names, AFFINITY_SLOTS, BINDING_KEY_LEN, BINDING_PORT_BITS, Backend, BuilderState,
        MAX_BACKENDS, Override, PathStats, ServiceCounters, ServiceState,
    },
};

use super::bpf::{BPFFS_MOUNT, BindingKey, BpfError, LINK_PIN, map_err};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

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
pub(super) fn open_pin_read_only(path: &Path) -> io::Result<OwnedFd> {
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

/// Makes everything under `pin_path` readable by group `gid` and nobody
/// else but root.
pub(super) fn share_with_group(pin_path: &Path, gid: u32) -> Result<(), BpfError> {
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

/// Mounts bpffs at /sys/fs/bpf when the pin path lives there and it is not
/// mounted yet, then creates the pin directory, which must be a directory
/// of its own inside a bpffs: not the mount itself (where other programs
/// pin their objects) and not on another file system.
pub(super) fn prepare_bpffs(pin_path: &Path) -> Result<(), BpfError> {
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

pub(super) fn is_bpffs(path: &Path) -> bool {
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
pub(super) fn remove_other_versions(pin_path: &Path, current: &Path) {
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
}
