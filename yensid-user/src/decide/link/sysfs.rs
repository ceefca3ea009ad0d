//! What sysfs adds to netlink about an interface: wireless or not, the
//! DEVTYPE, the driver and the speed.
//!
//! sysfs shows the interfaces of the network namespace it was mounted in,
//! not those of the reading thread's namespace (`ip netns exec` remounts
//! it). A same-named interface of another namespace must not lend us its
//! facts, so the directory counts only if its `ifindex` is the one netlink
//! gave.

use std::{fs, path::Path};

/// Facts about an interface read from `/sys/class/net/<if>/`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SysfsFacts {
    pub wireless: bool,
    pub devtype: Option<String>,
    pub driver: Option<String>,
    pub speed_mbps: Option<u32>,
}

/// Reads the facts of interface `name` with index `index`; everything is
/// unknown when the directory is missing or belongs to another namespace.
pub fn read(name: &str, index: u32) -> SysfsFacts {
    let dir = Path::new("/sys/class/net").join(name);
    let same_interface = read_trimmed(&dir.join("ifindex")).and_then(|s| s.parse::<u32>().ok());
    if same_interface != Some(index) {
        return SysfsFacts::default();
    }
    SysfsFacts {
        wireless: dir.join("wireless").exists() || dir.join("phy80211").exists(),
        devtype: fs::read_to_string(dir.join("uevent"))
            .ok()
            .and_then(|uevent| devtype_of(&uevent)),
        driver: fs::read_link(dir.join("device/driver"))
            .ok()
            .and_then(|target| Some(target.file_name()?.to_string_lossy().into_owned())),
        speed_mbps: read_trimmed(&dir.join("speed")).and_then(|speed| speed_of(&speed)),
    }
}

fn read_trimmed(path: &Path) -> Option<String> {
    fs::read_to_string(path).ok().map(|s| s.trim().to_owned())
}

/// The DEVTYPE line of a uevent file.
fn devtype_of(uevent: &str) -> Option<String> {
    uevent
        .lines()
        .find_map(|line| line.strip_prefix("DEVTYPE="))
        .map(str::to_owned)
}

/// The speed file in Mbit/s. Reading it fails (EINVAL) while the link is
/// down or for devices without a speed, and gives -1 (SPEED_UNKNOWN, or
/// its u32 form on old kernels) when the driver does not know.
fn speed_of(speed: &str) -> Option<u32> {
    speed
        .parse::<u32>()
        .ok()
        .filter(|&mbps| mbps != 0 && mbps != u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devtype_comes_from_its_uevent_line() {
        let wlan = "DEVTYPE=wlan\nINTERFACE=wlp2s0\nIFINDEX=3\n";
        assert_eq!(devtype_of(wlan).as_deref(), Some("wlan"));
        let veth = "INTERFACE=veth0\nIFINDEX=3\n";
        assert_eq!(devtype_of(veth), None);
        assert_eq!(devtype_of(""), None);
    }

    #[test]
    fn unknown_speeds_are_none() {
        assert_eq!(speed_of("10000"), Some(10_000));
        assert_eq!(speed_of("100"), Some(100));
        assert_eq!(speed_of("-1"), None);
        assert_eq!(speed_of("4294967295"), None);
        assert_eq!(speed_of("0"), None);
        assert_eq!(speed_of(""), None);
    }

    #[test]
    fn an_interface_of_another_namespace_tells_nothing() {
        // Index 0 is never an interface's: whatever `lo` sysfs shows
        // belongs to another index.
        assert_eq!(read("lo", 0), SysfsFacts::default());
        assert_eq!(read("no-such-interface", 1), SysfsFacts::default());
    }
}
