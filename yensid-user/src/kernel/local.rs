//! The local path's BPF side (clients on this host connect straight to
//! the chosen builder): loads and attaches the `connect4`/`connect6`,
//! `getpeername4`/`getpeername6`, `account` (sock_ops) and `release`
//! (sock_release) programs to a cgroup v2, pins their links next to the
//! dispatch link, and gives typed access to the `LOCAL_*` maps. Part of
//! [`super::bpf`]'s aya boundary: nothing else here talks to aya.
//!
//! Pinned layout (under the pin path): `local-<program>` links. While
//! they are pinned the programs stay attached, like `dispatch`.

use std::{
    fs::File,
    io,
    mem::offset_of,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData},
    programs::{CgroupAttachMode, CgroupSock, CgroupSockAddr, SockOps, links::FdLink},
};
use tracing::info;
use yensid_ebpf::maps::{self as names, LocalBuilder, LocalSocket, LocalStats};

use super::bpf::{BpfError, Kernel, map_err, program, take};
use super::pins::{open, written};

/// The programs, in the order they are attached: the accounting before
/// anything is rewritten, the rewrite last.
const PROGRAMS: [&str; 6] = [
    "account",
    "release",
    "getpeername4",
    "getpeername6",
    "connect4",
    "connect6",
];

/// The link pin of a local-path program.
fn link_pin(pin_path: &Path, program: &str) -> PathBuf {
    pin_path.join(format!("local-{program}"))
}

/// Every link pin the local path may leave under `pin_path`.
pub(super) fn link_pins(pin_path: &Path) -> impl Iterator<Item = PathBuf> + '_ {
    PROGRAMS.iter().map(|p| link_pin(pin_path, p))
}

/// The local path's maps, taken from the object at load.
pub(super) struct LocalMaps {
    services: Array<MapData, u32>,
    builders: Array<MapData, LocalBuilder>,
    netns: Array<MapData, u64>,
    stats: Array<MapData, LocalStats>,
}

impl LocalMaps {
    pub(super) fn take(ebpf: &mut Ebpf) -> Result<Self, BpfError> {
        Ok(Self {
            services: take(ebpf, names::LOCAL_SERVICES)?,
            builders: take(ebpf, names::LOCAL_BUILDERS)?,
            netns: take(ebpf, names::LOCAL_NETNS)?,
            stats: take(ebpf, names::LOCAL_STATS)?,
        })
    }
}

/// Where the local path's programs are attached.
#[derive(Default)]
pub(super) struct Attachment {
    cgroup: Option<PathBuf>,
    /// Held so the links live as long as the daemon (they are pinned too).
    links: Vec<FdLink>,
}

impl Kernel {
    /// Attaches the local path's programs to `cgroup` (a cgroup v2
    /// directory) and lets them rewrite connects made in this thread's
    /// network namespace. Attaching to the cgroup it is attached to
    /// already does nothing; another cgroup is refused (it takes a
    /// restart, so that no connection is counted by two attachments).
    pub fn attach_local(&self, cgroup: &Path) -> Result<(), BpfError> {
        let mut attachment = self.local_attachment();
        match &attachment.cgroup {
            Some(current) if current == cgroup => return Ok(()),
            Some(current) => {
                return Err(BpfError::LocalCgroup {
                    path: cgroup.to_owned(),
                    why: format!(
                        "the local path is attached to {} until a restart",
                        current.display()
                    ),
                });
            }
            None => {}
        }
        let dir = File::open(cgroup).map_err(|source| BpfError::LocalCgroup {
            path: cgroup.to_owned(),
            why: source.to_string(),
        })?;
        let netns = netns_cookie().map_err(BpfError::Netns)?;
        self.local_maps()
            .netns
            .set(0, netns, 0)
            .map_err(map_err(names::LOCAL_NETNS))?;
        let mut ebpf = self.ebpf();
        let mut links = Vec::new();
        for name in PROGRAMS {
            match attach_one(&mut ebpf, name, dir.as_fd(), self.pin_path()) {
                Ok(link) => links.push(link),
                Err(e) => {
                    // All or nothing: a rewrite without its accounting
                    // would count connections that never end.
                    for done in PROGRAMS.iter().take(links.len()) {
                        let _ = std::fs::remove_file(link_pin(self.pin_path(), done));
                    }
                    return Err(e);
                }
            }
        }
        info!(cgroup = %cgroup.display(), "local path attached: local clients connect straight to builders");
        attachment.cgroup = Some(cgroup.to_owned());
        attachment.links = links;
        Ok(())
    }

    /// The cgroup the local path is attached to, if it is.
    pub fn local_cgroup(&self) -> Option<PathBuf> {
        self.local_attachment().cgroup.clone()
    }

    /// Whether local clients of a service connect straight to the builder.
    pub fn set_local_service(&self, service: u32, direct: bool) -> Result<(), BpfError> {
        self.local_maps()
            .services
            .set(service, u32::from(direct), 0)
            .map_err(map_err(names::LOCAL_SERVICES))
    }

    pub fn set_local_builder(&self, builder: u32, value: LocalBuilder) -> Result<(), BpfError> {
        self.local_maps()
            .builders
            .set(builder, value, 0)
            .map_err(map_err(names::LOCAL_BUILDERS))
    }

    pub fn local_builder(&self, builder: u32) -> Result<LocalBuilder, BpfError> {
        self.local_maps()
            .builders
            .get(&builder, 0)
            .map_err(map_err(names::LOCAL_BUILDERS))
    }

    /// A builder's open connections on the local path, and whether a
    /// failed local connect that the daemon has not acted on yet keeps it
    /// out of the selection: read from the mapped arrays, no syscall.
    pub fn local_counts(&self, builder: u32) -> Result<(u64, bool), BpfError> {
        let stats = &self.mapped.local_stats;
        let opened = stats.load(builder, offset_of!(LocalStats, opened))?;
        let closed = stats.load(builder, offset_of!(LocalStats, closed))?;
        let failed = stats.load(builder, offset_of!(LocalStats, failed))?;
        let seen = self
            .mapped
            .local_builders
            .load(builder, offset_of!(LocalBuilder, failures_seen))?;
        Ok((opened.wrapping_sub(closed), failed != seen))
    }

    /// What the local path counted for a builder.
    pub fn local_stats(&self, builder: u32) -> Result<LocalStats, BpfError> {
        self.local_maps()
            .stats
            .get(&builder, 0)
            .map_err(map_err(names::LOCAL_STATS))
    }
}

/// The local path's pinned maps, decoded for `yensid maps`; entries never
/// written (all zero) are left out.
#[derive(Debug, serde::Serialize)]
pub struct LocalDump {
    /// Whether every program's link is pinned: local connects are
    /// rewritten (in the namespace below).
    pub attached: bool,
    /// The network namespace whose connects are rewritten; 0: none.
    pub netns_cookie: u64,
    /// Service indices whose local clients connect straight to the builder.
    pub direct_services: Vec<u32>,
    /// Builder index -> where a rewritten connect goes.
    pub builders: Vec<(u32, LocalTarget)>,
    /// Builder index -> what the programs counted.
    pub stats: Vec<(u32, LocalStats)>,
    /// Sockets rewritten and not yet counted closed.
    pub open_sockets: u64,
}

/// A `LOCAL_BUILDERS` entry, readable.
#[derive(Debug, serde::Serialize)]
pub struct LocalTarget {
    /// `None`: not known yet (connects to it stay untouched).
    pub address: Option<SocketAddr>,
    /// The failed local connects the daemon has acted on.
    pub failures_seen: u64,
}

/// Reads the local path's maps from the pin directory `dir`.
pub(super) fn read_pinned(pin_path: &Path, dir: &Path) -> Result<LocalDump, BpfError> {
    let services: Array<MapData, u32> = open(dir, names::LOCAL_SERVICES)?;
    let builders: Array<MapData, LocalBuilder> = open(dir, names::LOCAL_BUILDERS)?;
    let netns: Array<MapData, u64> = open(dir, names::LOCAL_NETNS)?;
    let stats: Array<MapData, LocalStats> = open(dir, names::LOCAL_STATS)?;
    let sockets: HashMap<MapData, u64, LocalSocket> = open(dir, names::LOCAL_SOCKETS)?;
    Ok(LocalDump {
        attached: link_pins(pin_path).all(|p| p.exists()),
        netns_cookie: netns.get(&0, 0).unwrap_or(0),
        direct_services: services
            .iter()
            .enumerate()
            .filter_map(written)
            .map(|(i, _)| i)
            .collect(),
        builders: builders
            .iter()
            .enumerate()
            .filter_map(written)
            .map(|(i, b): (u32, LocalBuilder)| {
                let target = LocalTarget {
                    address: target_address(&b),
                    failures_seen: b.failures_seen,
                };
                (i, target)
            })
            .collect(),
        stats: stats.iter().enumerate().filter_map(written).collect(),
        open_sockets: sockets.keys().filter(Result::is_ok).count() as u64,
    })
}

/// The address a `LOCAL_BUILDERS` entry sends rewritten connects to;
/// `None` while it is unknown (family 0).
pub fn target_address(b: &LocalBuilder) -> Option<SocketAddr> {
    let port = u16::from_be(b.port as u16);
    let ip = match b.family {
        4 => IpAddr::V4(Ipv4Addr::from(b.ip4.to_ne_bytes())),
        6 => {
            let mut octets = [0u8; 16];
            for (chunk, word) in octets.chunks_exact_mut(4).zip(b.ip6) {
                chunk.copy_from_slice(&word.to_ne_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Loads one program (unless an earlier attempt did), attaches it to the cgroup through a BPF link
/// (links stack with other programs on the cgroup) and pins the link,
/// replacing the pin of a daemon that did not stop cleanly (its program
/// stays attached until then, so no instant goes unhandled).
fn attach_one(
    ebpf: &mut Ebpf,
    name: &'static str,
    cgroup: std::os::fd::BorrowedFd<'_>,
    pin_path: &Path,
) -> Result<FdLink, BpfError> {
    let err = |source| BpfError::Program { name, source };
    let link: FdLink = match name {
        "account" => {
            let p: &mut SockOps = program(ebpf, name)?;
            if p.fd().is_err() {
                p.load().map_err(err)?;
            }
            let id = p.attach(cgroup, CgroupAttachMode::Single).map_err(err)?;
            p.take_link(id)
                .map_err(err)?
                .try_into()
                .map_err(|source| BpfError::Link { name, source })?
        }
        "release" => {
            let p: &mut CgroupSock = program(ebpf, name)?;
            if p.fd().is_err() {
                p.load().map_err(err)?;
            }
            let id = p.attach(cgroup, CgroupAttachMode::Single).map_err(err)?;
            p.take_link(id)
                .map_err(err)?
                .try_into()
                .map_err(|source| BpfError::Link { name, source })?
        }
        _ => {
            let p: &mut CgroupSockAddr = program(ebpf, name)?;
            if p.fd().is_err() {
                p.load().map_err(err)?;
            }
            let id = p.attach(cgroup, CgroupAttachMode::Single).map_err(err)?;
            p.take_link(id)
                .map_err(err)?
                .try_into()
                .map_err(|source| BpfError::Link { name, source })?
        }
    };
    let pin = link_pin(pin_path, name);
    if pin.exists() {
        info!(path = %pin.display(), "replacing a pinned local-path link (of the daemon this one takes over from, or of one that did not stop cleanly)");
        std::fs::remove_file(&pin).map_err(|source| BpfError::Bpffs {
            path: pin.clone(),
            source,
        })?;
    }
    let pinned = link.pin(&pin).map_err(|source| BpfError::Pin {
        path: pin.clone(),
        source,
    })?;
    Ok(FdLink::from(pinned))
}

/// The cookie of this thread's network namespace (`SO_NETNS_COOKIE`,
/// Linux >= 5.14), the value `bpf_get_netns_cookie` gives the programs.
fn netns_cookie() -> io::Result<u64> {
    /// From `asm-generic/socket.h`; not in every libc target's constants.
    const SO_NETNS_COOKIE: libc::c_int = 71;
    // SAFETY: plain socket(2); the descriptor is owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor that nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid socket and an out buffer of the given length.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// The root of the cgroup v2 hierarchy: where the local path attaches
/// unless `[daemon] local_cgroup` says otherwise.
pub fn root_cgroup() -> io::Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
    super::bpf::cgroup2_mount(&mounts)
        .map(PathBuf::from)
        .ok_or_else(|| io::Error::other("no cgroup2 file system is mounted"))
}
