//! Who may do what through the control socket.
//!
//! Looking is not changing. `status`, `explain` and `mode` without a change
//! need root or membership of `daemon.read_group` or `policy.control_group`;
//! `drain`, `undrain` and changing the mode need root or membership of
//! `policy.control_group` (the operator's explicit delegation, e.g. to a
//! laptop's own user). The socket itself is `0600` while no group is
//! configured, and `0666` otherwise, in which case every caller is
//! checked against its credentials as the kernel reports them
//! (`SO_PEERCRED`, `SO_PEERGROUPS`), which it cannot forge: at accept,
//! before a byte is read, whether it may look at all ([`Right::Read`]);
//! then, once its request is read, whether it may do what it asks.

use std::{io, os::fd::AsRawFd};

use crate::operate::control::Request;

/// What a request needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Right {
    Read,
    Change,
}

impl Right {
    pub fn of(request: &Request) -> Self {
        match request {
            Request::Status | Request::Explain { .. } | Request::Mode { change: None } => {
                Right::Read
            }
            Request::Drain { .. } | Request::Undrain { .. } | Request::Mode { change: Some(_) } => {
                Right::Change
            }
        }
    }
}

/// The caller of a request, as the kernel saw it connect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

impl Peer {
    fn in_group(&self, gid: Option<u32>) -> bool {
        gid.is_some_and(|g| self.gid == g || self.groups.contains(&g))
    }
}

/// A configured group, by name and by id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    /// The key it was configured with (for messages).
    pub key: &'static str,
    pub name: String,
    pub gid: u32,
}

#[derive(Debug, thiserror::Error)]
#[error("no group `{name}` on this machine ({key})")]
pub struct UnknownGroup {
    pub key: &'static str,
    pub name: String,
}

impl Group {
    pub fn resolve(key: &'static str, name: &str) -> Result<Self, UnknownGroup> {
        let unknown = || UnknownGroup {
            key,
            name: name.to_owned(),
        };
        let c_name = std::ffi::CString::new(name).map_err(|_| unknown())?;
        // SAFETY: valid C string; the result is read at once, before any
        // other call that could reuse libc's static buffer.
        let entry = unsafe { libc::getgrnam(c_name.as_ptr()) };
        if entry.is_null() {
            return Err(unknown());
        }
        Ok(Self {
            key,
            name: name.to_owned(),
            // SAFETY: non-null entry returned just above.
            gid: unsafe { (*entry).gr_gid },
        })
    }
}

/// The daemon's access rules.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Access {
    pub read: Option<Group>,
    pub control: Option<Group>,
}

impl Access {
    /// The control socket's mode: only root can connect while no group is
    /// configured; otherwise anyone can, and requests are checked.
    pub fn socket_mode(&self) -> u32 {
        if self.read.is_none() && self.control.is_none() {
            0o600
        } else {
            0o666
        }
    }

    /// `None` when `peer` may; otherwise why not, in words.
    pub fn check(&self, peer: &Peer, right: Right) -> Option<String> {
        if peer.uid == 0 {
            return None;
        }
        let control = self.control.as_ref().map(|g| g.gid);
        let read = self.read.as_ref().map(|g| g.gid);
        let allowed = match right {
            Right::Change => peer.in_group(control),
            Right::Read => peer.in_group(control) || peer.in_group(read),
        };
        if allowed {
            return None;
        }
        let groups: Vec<String> = match right {
            Right::Change => vec![self.control.as_ref()],
            Right::Read => vec![self.read.as_ref(), self.control.as_ref()],
        }
        .into_iter()
        .flatten()
        .map(|g| format!("{} (`{}`)", g.key, g.name))
        .collect();
        let what = match right {
            Right::Change => "changing the daemon's state",
            Right::Read => "reading the daemon's state",
        };
        Some(if groups.is_empty() {
            format!("permission denied: {what} needs root")
        } else {
            format!(
                "permission denied: {what} needs root or membership of {} (uid {} is not a member)",
                groups.join(" or "),
                peer.uid
            )
        })
    }
}

/// The credentials of the process at the other end of a unix socket.
pub fn peer(socket: &impl AsRawFd) -> io::Result<Peer> {
    let fd = socket.as_raw_fd();
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: valid fd, out pointer and length of a ucred.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Peer {
        uid: cred.uid,
        gid: cred.gid,
        groups: peer_groups(fd)?,
    })
}

/// `SO_PEERGROUPS` (Linux >= 4.13): the supplementary groups the peer had
/// when it connected.
fn peer_groups(fd: i32) -> io::Result<Vec<u32>> {
    let mut groups = vec![0 as libc::gid_t; 64];
    loop {
        let mut len = std::mem::size_of_val(groups.as_slice()) as libc::socklen_t;
        // SAFETY: valid fd; the buffer holds `len` bytes.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        if rc == 0 {
            groups.truncate(len as usize / std::mem::size_of::<libc::gid_t>());
            return Ok(groups);
        }
        let error = io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::ERANGE) {
            return Err(error);
        }
        // The kernel said how much room it needs.
        groups.resize(len as usize / std::mem::size_of::<libc::gid_t>() + 1, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operate::control::ModeChange;

    fn group(key: &'static str, gid: u32) -> Option<Group> {
        Some(Group {
            key,
            name: format!("g{gid}"),
            gid,
        })
    }

    fn user(gid: u32, groups: &[u32]) -> Peer {
        Peer {
            uid: 1000,
            gid,
            groups: groups.to_vec(),
        }
    }

    const READ_GROUP: u32 = 50;
    const CONTROL_GROUP: u32 = 60;
    const OTHER: u32 = 70;

    fn both() -> Access {
        Access {
            read: group("daemon.read_group", READ_GROUP),
            control: group("policy.control_group", CONTROL_GROUP),
        }
    }

    #[test]
    fn requests_that_only_look_need_read_and_the_rest_change() {
        let change = Some(ModeChange {
            mode: None,
            for_seconds: None,
        });
        assert_eq!(Right::of(&Request::Status), Right::Read);
        assert_eq!(
            Right::of(&Request::Explain {
                service: None,
                from: None
            }),
            Right::Read
        );
        assert_eq!(Right::of(&Request::Mode { change: None }), Right::Read);
        assert_eq!(Right::of(&Request::Mode { change }), Right::Change);
        let builder = "b1".to_owned();
        assert_eq!(
            Right::of(&Request::Drain {
                builder: builder.clone()
            }),
            Right::Change
        );
        assert_eq!(Right::of(&Request::Undrain { builder }), Right::Change);
    }

    #[test]
    fn root_may_do_anything_whatever_is_configured() {
        let root = Peer {
            uid: 0,
            gid: 0,
            groups: vec![],
        };
        for access in [Access::default(), both()] {
            assert_eq!(access.check(&root, Right::Read), None);
            assert_eq!(access.check(&root, Right::Change), None);
        }
    }

    #[test]
    fn each_group_grants_exactly_its_rights_by_primary_or_supplementary_membership() {
        let access = both();
        let cases = [
            (user(READ_GROUP, &[]), true, false),
            (user(OTHER, &[READ_GROUP]), true, false),
            (user(CONTROL_GROUP, &[]), true, true),
            (user(OTHER, &[OTHER, CONTROL_GROUP]), true, true),
            (user(OTHER, &[]), false, false),
            (user(OTHER, &[OTHER + 1]), false, false),
        ];
        for (peer, read, change) in cases {
            assert_eq!(access.check(&peer, Right::Read).is_none(), read, "{peer:?}");
            assert_eq!(
                access.check(&peer, Right::Change).is_none(),
                change,
                "{peer:?}"
            );
        }
    }

    #[test]
    fn without_groups_only_root_gets_in_and_the_socket_says_so() {
        let access = Access::default();
        assert_eq!(access.socket_mode(), 0o600);
        let why = access.check(&user(READ_GROUP, &[]), Right::Read).unwrap();
        assert_eq!(
            why,
            "permission denied: reading the daemon's state needs root"
        );
        let read_only = Access {
            read: group("daemon.read_group", READ_GROUP),
            control: None,
        };
        assert_eq!(read_only.socket_mode(), 0o666);
        assert_eq!(both().socket_mode(), 0o666);
    }

    #[test]
    fn a_refusal_names_the_groups_that_would_grant_the_right() {
        let access = both();
        let why = access.check(&user(READ_GROUP, &[]), Right::Change).unwrap();
        assert_eq!(
            why,
            "permission denied: changing the daemon's state needs root or membership of \
             policy.control_group (`g60`) (uid 1000 is not a member)"
        );
        let why = access.check(&user(OTHER, &[]), Right::Read).unwrap();
        assert!(
            why.contains("daemon.read_group (`g50`) or policy.control_group (`g60`)"),
            "{why}"
        );
    }

    #[test]
    fn groups_resolve_by_name_and_unknown_ones_are_named() {
        assert_eq!(Group::resolve("daemon.read_group", "root").unwrap().gid, 0);
        let e = Group::resolve("daemon.read_group", "no-such-group-yensid").unwrap_err();
        assert_eq!(
            e.to_string(),
            "no group `no-such-group-yensid` on this machine (daemon.read_group)"
        );
    }
}
