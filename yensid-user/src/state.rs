//! Operator state that must survive a daemon restart (drained builders and
//! the mode override), kept in a small JSON file written atomically.
//!
//! The file is input like any other: at most [`MAX_STATE_BYTES`] are read,
//! and what the daemon could not have written (an override beyond
//! [`MAX_OVERRIDE`], unknown builders) is reported and left out by
//! [`OperatorState::sanitize`], so a bad file never stops the daemon.

use std::{
    collections::BTreeSet,
    io::{self, Read},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::config::{MAX_OVERRIDE, Mode, describe_duration};

/// The largest state file read: far more than any real set of drains.
pub const MAX_STATE_BYTES: u64 = 64 * 1024;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorState {
    /// Builders that take no new connections until undrained.
    #[serde(default)]
    pub drained: BTreeSet<String>,
    /// The operator's mode, over the configured one and the hook's.
    #[serde(default, rename = "override", skip_serializing_if = "Option::is_none")]
    pub mode_override: Option<ModeOverride>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModeOverride {
    pub mode: Mode,
    /// Seconds since the Unix epoch (wall clock, so it means the same after
    /// a reboot); `None`: until changed.
    pub until: Option<u64>,
}

impl ModeOverride {
    /// The override `yensid mode MODE [--for SECONDS]` asks for at `now`
    /// (seconds since the epoch), checked: a duration from the control
    /// socket is as untrusted as one from the command line.
    pub fn starting(mode: Mode, for_seconds: Option<u64>, now: u64) -> Result<Self, String> {
        let until = match for_seconds {
            None => None,
            Some(0) => return Err("--for must be at least 1s".to_owned()),
            Some(s) if s > MAX_OVERRIDE.as_secs() => {
                return Err(format!(
                    "--for must be at most {} ({} seconds); for longer, leave out --for",
                    describe_duration(MAX_OVERRIDE),
                    MAX_OVERRIDE.as_secs()
                ));
            }
            Some(s) => Some(
                now.checked_add(s)
                    .ok_or("--for ends after the year 292277026596")?,
            ),
        };
        Ok(Self { mode, until })
    }

    /// Whether it still applies at `now` (seconds since the epoch).
    pub fn in_force(&self, now: u64) -> bool {
        self.until.is_none_or(|until| now < until)
    }

    /// Seconds left at `now`; `None`: until changed.
    pub fn seconds_left(&self, now: u64) -> Option<u64> {
        self.until.map(|until| until.saturating_sub(now))
    }

    /// Its end on CLOCK_BOOTTIME (the kernel's clock), in nanoseconds,
    /// given both clocks read at the same moment: `unix_now` since the
    /// epoch, `boot_now_ns` since boot. `u64::MAX`: until changed. Exact to
    /// the nanosecond, not the second, so that a deadline computed again a
    /// moment later lands on the same instant.
    pub fn boottime_deadline(&self, unix_now: Duration, boot_now_ns: u64) -> u64 {
        let Some(until) = self.until else {
            return u64::MAX;
        };
        let left = Duration::from_secs(until).saturating_sub(unix_now);
        let left_ns = u64::try_from(left.as_nanos()).unwrap_or(u64::MAX);
        boot_now_ns.saturating_add(left_ns).min(u64::MAX - 1)
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Now in whole seconds since the epoch, rounded up so that an override
/// starting now never ends early.
pub fn unix_now_rounded_up() -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    now.as_secs() + u64::from(now.subsec_nanos() > 0)
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path} is not valid yensid state ({source}); fix or remove it")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("{path} is larger than {MAX_STATE_BYTES} bytes: not yensid state; fix or remove it")]
    TooLarge { path: PathBuf },
}

impl OperatorState {
    /// The saved state; a missing file is the empty state. Reads at most
    /// [`MAX_STATE_BYTES`].
    pub fn load(path: &Path) -> Result<Self, StateError> {
        let read_error = |source| StateError::Read {
            path: path.to_owned(),
            source,
        };
        let file = match std::fs::File::open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(source) => return Err(read_error(source)),
        };
        let mut bytes = Vec::new();
        file.take(MAX_STATE_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(read_error)?;
        if bytes.len() as u64 > MAX_STATE_BYTES {
            return Err(StateError::TooLarge {
                path: path.to_owned(),
            });
        }
        Self::parse(&bytes).map_err(|source| StateError::Parse {
            path: path.to_owned(),
            source,
        })
    }

    /// Leaves out what this daemon could not have written: drains of
    /// builders the configuration does not have and an override that ends
    /// further than [`MAX_OVERRIDE`] from `now`. Returns what was left out,
    /// in words, for the log.
    pub fn sanitize(&mut self, is_builder: impl Fn(&str) -> bool, now: u64) -> Vec<String> {
        let mut dropped = Vec::new();
        self.drained.retain(|name| {
            let known = is_builder(name);
            if !known {
                dropped.push(format!(
                    "drain of unknown builder `{}` ignored",
                    crate::dataplane::ident::escape(name.as_bytes())
                ));
            }
            known
        });
        if let Some(until) = self.mode_override.and_then(|o| o.until) {
            // `starting` rounds up by at most a second.
            let latest = now.saturating_add(MAX_OVERRIDE.as_secs() + 1);
            if until > latest {
                dropped.push(format!(
                    "mode override until {until} ignored: more than {} from now",
                    describe_duration(MAX_OVERRIDE)
                ));
                self.mode_override = None;
            }
        }
        dropped
    }

    /// The state in a file's bytes, whatever they hold.
    pub fn parse(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    /// Writes to a temporary file and renames it over `path`, so a crash
    /// never leaves half a file.
    pub fn save(&self, path: &Path) -> Result<(), StateError> {
        let err = |source| StateError::Write {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_string_pretty(self).expect("state serializes");
        std::fs::write(&tmp, text + "\n").map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_treats_a_missing_file_as_empty() {
        let dir = std::env::temp_dir().join(format!("yensid-state-{}", std::process::id()));
        let path = dir.join("state.json");
        assert_eq!(
            OperatorState::load(&path).unwrap(),
            OperatorState::default()
        );
        let state = OperatorState {
            drained: ["b2".to_owned()].into(),
            mode_override: Some(ModeOverride {
                mode: Mode::Local,
                until: Some(100),
            }),
        };
        state.save(&path).unwrap();
        assert_eq!(OperatorState::load(&path).unwrap(), state);
        std::fs::write(&path, "{\"drained\": 3}").unwrap();
        let err = OperatorState::load(&path).unwrap_err().to_string();
        assert!(err.contains("is not valid yensid state"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_override_expires_at_its_time() {
        let o = ModeOverride {
            mode: Mode::Remote,
            until: Some(100),
        };
        assert!(o.in_force(99));
        assert!(!o.in_force(100));
        let forever = ModeOverride { until: None, ..o };
        assert!(forever.in_force(u64::MAX));
    }

    #[test]
    fn an_override_from_a_request_is_bounded() {
        let o = ModeOverride::starting(Mode::Local, Some(60), 1000).unwrap();
        assert_eq!(o.until, Some(1060));
        assert_eq!(o.seconds_left(1030), Some(30));
        assert_eq!(o.seconds_left(2000), Some(0));
        assert_eq!(
            ModeOverride::starting(Mode::Local, None, 1000)
                .unwrap()
                .until,
            None
        );
        let max = MAX_OVERRIDE.as_secs();
        assert!(ModeOverride::starting(Mode::Local, Some(max), u64::MAX - max).is_ok());
        for bad in [0, max + 1, 9_223_372_036_854_775_807, u64::MAX] {
            let e = ModeOverride::starting(Mode::Local, Some(bad), 1000).unwrap_err();
            assert!(e.starts_with("--for must be at"), "{bad}: {e}");
        }
        let e = ModeOverride::starting(Mode::Local, Some(max + 1), 1000).unwrap_err();
        assert!(e.contains("at most 365d (31536000 seconds)"), "{e}");
        assert!(ModeOverride::starting(Mode::Remote, Some(max), u64::MAX - 5).is_err());
    }

    #[test]
    fn what_the_daemon_could_not_have_written_is_left_out() {
        let mut state = OperatorState {
            drained: ["b1".to_owned(), "b\u{1b}[2J".to_owned()].into(),
            mode_override: Some(ModeOverride {
                mode: Mode::Local,
                until: Some(u64::MAX),
            }),
        };
        let dropped = state.sanitize(|n| n == "b1", 1000);
        assert_eq!(dropped.len(), 2, "{dropped:?}");
        assert_eq!(dropped[0], "drain of unknown builder `b\\x1b[2J` ignored");
        assert!(
            dropped[1].contains("more than 365d from now"),
            "{dropped:?}"
        );
        assert_eq!(state.drained, ["b1".to_owned()].into());
        assert_eq!(state.mode_override, None);
        let mut fine = OperatorState {
            drained: BTreeSet::new(),
            mode_override: Some(
                ModeOverride::starting(Mode::Local, Some(MAX_OVERRIDE.as_secs()), 1000).unwrap(),
            ),
        };
        assert!(fine.sanitize(|_| true, 1000).is_empty());
        assert!(fine.mode_override.is_some());
    }

    #[test]
    fn huge_and_garbage_files_are_errors_not_panics() {
        let dir = std::env::temp_dir().join(format!("yensid-state-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.json");
        std::fs::write(&path, vec![b' '; MAX_STATE_BYTES as usize + 1]).unwrap();
        assert!(matches!(
            OperatorState::load(&path),
            Err(StateError::TooLarge { .. })
        ));
        for garbage in [&b"\xff\xfe"[..], b"{\"override\": {\"mode\": \"local\", \"until\": 1e400}}", b"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[", b"{\"override\": {\"mode\": \"local\", \"until\": 18446744073709551616}}"] {
            std::fs::write(&path, garbage).unwrap();
            assert!(matches!(
                OperatorState::load(&path),
                Err(StateError::Parse { .. })
            ));
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_kernel_deadline_is_exact_and_does_not_move_when_computed_again() {
        let timed = ModeOverride {
            mode: Mode::Local,
            until: Some(1_000),
        };
        // 2.25 s before the end, 5 s after boot.
        let first = timed.boottime_deadline(Duration::from_millis(997_750), 5_000_000_000);
        assert_eq!(first, 7_250_000_000);
        // Computed again 0.4 s later (same whole second): the same instant.
        let again = timed.boottime_deadline(Duration::from_millis(998_150), 5_400_000_000);
        assert_eq!(again, first);
        // Past the end: now.
        assert_eq!(
            timed.boottime_deadline(Duration::from_secs(1_001), 9_000_000_000),
            9_000_000_000
        );
        let open = ModeOverride {
            mode: Mode::Local,
            until: None,
        };
        assert_eq!(open.boottime_deadline(Duration::ZERO, 1), u64::MAX);
        let far = ModeOverride {
            mode: Mode::Local,
            until: Some(u64::MAX),
        };
        assert_eq!(
            far.boottime_deadline(Duration::ZERO, u64::MAX),
            u64::MAX - 1
        );
    }
}
