//! Operator state that must survive a daemon restart (today: drained
//! builders), kept in a small JSON file written atomically.

use std::{
    collections::BTreeSet,
    io,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::config::Mode;

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
    /// Whether it still applies at `now` (seconds since the epoch).
    pub fn in_force(&self, now: u64) -> bool {
        self.until.is_none_or(|until| now < until)
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The end of an override lasting `seconds` from now, rounded up to the
/// next whole second so that it never ends early.
pub fn unix_deadline(seconds: u64) -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    now.as_secs() + u64::from(now.subsec_nanos() > 0) + seconds
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
}

impl OperatorState {
    /// The saved state; a missing file is the empty state.
    pub fn load(path: &Path) -> Result<Self, StateError> {
        match std::fs::read(path) {
            Ok(bytes) => Self::parse(&bytes).map_err(|source| StateError::Parse {
                path: path.to_owned(),
                source,
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(StateError::Read {
                path: path.to_owned(),
                source,
            }),
        }
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
}
