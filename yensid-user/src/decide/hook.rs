//! The policy hook: arbitrary logic without touching the data path.
//!
//! The daemon runs `[policy] command` on every state change and at least
//! every `hook_interval`, writes the state as one JSON document on its
//! stdin ([`HookInput`]) and reads one JSON decision from its stdout
//! ([`Decision`]). A hook that fails, hangs past `hook_timeout` or prints
//! something invalid changes nothing: the declarative decision stays in
//! force and the reason is logged.

use std::{collections::BTreeMap, path::Path, process::Stdio, time::Duration};

use serde::{Deserialize, Serialize};
use tokio::{io::AsyncWriteExt, process::Command, time::timeout};

use crate::{config::Mode, decide::link::Link};

/// What the hook is told (stdin).
#[derive(Clone, Debug, Serialize)]
pub struct HookInput {
    /// Seconds since the Unix epoch.
    pub time: u64,
    /// The mode from the configuration file.
    pub config_mode: Mode,
    /// The operator's override, if one is in force.
    #[serde(rename = "override")]
    pub operator_override: Option<OverrideInput>,
    pub links: Vec<Link>,
    pub builders: Vec<BuilderInput>,
}

#[derive(Clone, Debug, Serialize)]
pub struct OverrideInput {
    pub mode: Mode,
    /// Seconds since the Unix epoch; absent: until changed.
    pub until: Option<u64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct BuilderInput {
    pub name: String,
    pub address: String,
    pub healthy: bool,
    /// Why not, when not healthy.
    pub health_reason: Option<String>,
    pub drained: bool,
    /// From the last successful probe.
    pub rtt_ms: Option<f64>,
    /// TCP's smoothed RTT on the daemon's connections to the builder, at
    /// the kernel's latest sample (absent before any).
    pub kernel_rtt_ms: Option<f64>,
    /// The interface the route to the builder goes out of.
    pub egress: Option<Link>,
    pub active_connections: u64,
    pub weight: u32,
}

/// What the hook decides (stdout). Every field is optional.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Decision {
    /// The mode to use instead of the configured one.
    pub mode: Option<Mode>,
    /// Weights to use instead of the configured ones, by builder name.
    #[serde(default)]
    pub weights: BTreeMap<String, u32>,
    /// Logged and shown with the decision.
    pub reason: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("cannot start {command}: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("did not answer within {0:?}")]
    Timeout(Duration),
    #[error("exited with {status}: {stderr}")]
    Failed { status: String, stderr: String },
    #[error("printed an invalid decision ({error}): {output}")]
    Invalid { error: String, output: String },
}

/// Runs the hook once. The hook runs in a process group of its own, and
/// the whole group is killed when the run ends, so a hook stuck in a
/// command (or one that left something in the background) leaves nothing
/// behind.
pub async fn run(
    command: &Path,
    input: &HookInput,
    limit: Duration,
) -> Result<Decision, HookError> {
    let mut child = Command::new(command)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| HookError::Spawn {
            command: command.display().to_string(),
            source,
        })?;
    let group = child.id();
    let document = serde_json::to_vec(input).expect("hook input serializes");
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let exchange = async move {
        // A hook that does not read its input must not block us: write
        // errors (EPIPE) are ignored, the exit status tells.
        let _ = stdin.write_all(&document).await;
        drop(stdin);
        child.wait_with_output().await
    };
    let output = timeout(limit, exchange).await;
    if let Some(group) = group {
        // SAFETY: signals the process group this run created; no memory.
        unsafe { libc::kill(-(group as i32), libc::SIGKILL) };
    }
    let output = output
        .map_err(|_| HookError::Timeout(limit))?
        .map_err(|source| HookError::Spawn {
            command: command.display().to_string(),
            source,
        })?;
    if !output.status.success() {
        return Err(HookError::Failed {
            status: output.status.to_string(),
            stderr: shorten(&String::from_utf8_lossy(&output.stderr)),
        });
    }
    parse(&output.stdout)
}

/// Reads a decision; an empty output means "no opinion".
pub fn parse(stdout: &[u8]) -> Result<Decision, HookError> {
    let text = String::from_utf8_lossy(stdout);
    if text.trim().is_empty() {
        return Ok(Decision::default());
    }
    let decision: Decision = serde_json::from_str(text.trim()).map_err(|e| HookError::Invalid {
        error: e.to_string(),
        output: shorten(&text),
    })?;
    if let Some((name, _)) = decision.weights.iter().find(|(_, w)| **w == 0) {
        return Err(HookError::Invalid {
            error: format!("weight of `{name}` must be at least 1"),
            output: shorten(&text),
        });
    }
    Ok(decision)
}

fn shorten(text: &str) -> String {
    let text = text.trim();
    match text.char_indices().nth(200) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn input() -> HookInput {
        HookInput {
            time: 1,
            config_mode: Mode::Auto,
            operator_override: None,
            links: Vec::new(),
            builders: vec![BuilderInput {
                name: "b1".into(),
                address: "198.18.1.2:22".into(),
                healthy: true,
                health_reason: None,
                drained: false,
                rtt_ms: Some(0.4),
                kernel_rtt_ms: Some(0.1),
                egress: None,
                active_connections: 2,
                weight: 1,
            }],
        }
    }

    /// An executable script in a directory of its own, removed on drop
    /// (also when the test fails).
    struct Script(std::path::PathBuf);

    impl Script {
        fn new(name: &str, body: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("yensid-hook-{}-{name}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join(name);
            std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
            Script(path)
        }
    }

    impl Drop for Script {
        fn drop(&mut self) {
            if let Some(dir) = self.0.parent() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }

    #[test]
    fn decisions_parse_and_bad_ones_are_refused() {
        let d =
            parse(br#"{"mode": "local", "weights": {"b1": 2}, "reason": "on battery"}"#).unwrap();
        assert_eq!(d.mode, Some(Mode::Local));
        assert_eq!(d.weights.get("b1"), Some(&2));
        assert_eq!(parse(b"\n").unwrap(), Decision::default());
        assert!(matches!(parse(b"local"), Err(HookError::Invalid { .. })));
        assert!(matches!(
            parse(br#"{"mode": "maybe"}"#),
            Err(HookError::Invalid { .. })
        ));
        assert!(matches!(
            parse(br#"{"mood": "local"}"#),
            Err(HookError::Invalid { .. })
        ));
        assert!(matches!(
            parse(br#"{"weights": {"b1": 0}}"#),
            Err(HookError::Invalid { .. })
        ));
    }

    #[test]
    fn the_input_document_has_the_documented_shape() {
        let json = serde_json::to_value(input()).unwrap();
        assert_eq!(json["config_mode"], "auto");
        assert_eq!(json["override"], serde_json::Value::Null);
        assert_eq!(json["builders"][0]["name"], "b1");
        assert_eq!(json["builders"][0]["active_connections"], 2);
    }

    #[tokio::test]
    async fn a_hook_reads_the_state_and_answers() {
        let hook = Script::new(
            "answers",
            r#"grep -q '"name":"b1"' && echo '{"mode":"remote","reason":"b1 seen"}'"#,
        );
        let d = run(&hook.0, &input(), Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(d.mode, Some(Mode::Remote));
        assert_eq!(d.reason.as_deref(), Some("b1 seen"));
    }

    #[tokio::test]
    async fn crashing_hanging_and_missing_hooks_are_errors() {
        let crash = Script::new("crash", "echo boom >&2; exit 3");
        let err = run(&crash.0, &input(), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("boom"), "{err}");
        let hang = Script::new("hang", "sleep 77.5 & sleep 77.5");
        let err = run(&hang.0, &input(), Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(matches!(err, HookError::Timeout(_)));
        let leftover = std::process::Command::new("pgrep")
            .args(["-f", "sleep 77.5"])
            .output()
            .unwrap();
        assert!(leftover.stdout.is_empty(), "left running: {leftover:?}");
        let missing = Path::new("/nonexistent/yensid-hook");
        assert!(matches!(
            run(missing, &input(), Duration::from_secs(1)).await,
            Err(HookError::Spawn { .. })
        ));
    }
}
