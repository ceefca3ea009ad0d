//! The policy hook: arbitrary logic without touching the data path.
//!
//! The daemon runs `[policy] command` on every state change and at least
//! every `hook_interval`, writes the state as one JSON document on its
//! stdin ([`HookInput`]) and reads one JSON decision from its stdout
//! ([`Decision`]). A hook that fails, hangs past `hook_timeout` or prints
//! something invalid changes nothing: the declarative decision stays in
//! force and the reason is logged.
//!
//! The hook's output is untrusted: at most [`MAX_OUTPUT`] bytes of stdout
//! are read, weights must be 1 to [`MAX_WEIGHT`], unknown keys are
//! refused, and whatever of it reaches the log (stderr, invalid output,
//! the reason) is cut short and escaped.

use std::{collections::BTreeMap, path::Path, process::Stdio, time::Duration};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWriteExt},
    process::Command,
    time::timeout,
};

use crate::{
    config::{MAX_WEIGHT, Mode},
    dataplane::ident::escape,
    decide::link::Link,
};

/// The most a hook may print on stdout; a decision is a few hundred bytes.
pub const MAX_OUTPUT: usize = 64 * 1024;
/// How much of a hook's stderr is kept for the log (the rest is read and
/// dropped, so the hook never blocks on a full pipe).
const MAX_STDERR: usize = 4 * 1024;
/// How much of the hook's text (reason, stderr, bad output) is shown.
const EXCERPT: usize = 200;

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
    /// TCP's smoothed RTT on connections to the builder (the daemon's, or
    /// local clients' direct ones), at the kernel's latest sample (absent
    /// before any).
    pub kernel_rtt_ms: Option<f64>,
    /// The interface the route to the builder goes out of.
    pub egress: Option<Link>,
    pub active_connections: u64,
    pub weight: u32,
    /// The builder's load from its node_exporter, as `status --json` shows
    /// it; absent without a `metrics_url`.
    pub load: Option<crate::operate::status::LoadStatus>,
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
    #[error("printed more than {MAX_OUTPUT} bytes")]
    TooMuchOutput,
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
    let stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");
    let exchange = async move {
        // Written while the outputs are read, so a hook that prints before
        // reading cannot deadlock with us. A hook that does not read its
        // input must not block us: write errors (EPIPE) are ignored, the
        // exit status tells.
        let write = async {
            let _ = stdin.write_all(&document).await;
            drop(stdin);
        };
        let ((), out, err) = tokio::join!(
            write,
            read_at_most(stdout, MAX_OUTPUT),
            read_keeping(stderr, MAX_STDERR)
        );
        let out = out?;
        if out.len() > MAX_OUTPUT {
            return Ok(None);
        }
        let err = err?;
        let status = child.wait().await?;
        Ok::<_, std::io::Error>(Some((status, out, err)))
    };
    let output = timeout(limit, exchange).await;
    if let Some(group) = group {
        // SAFETY: signals the process group this run created; no memory.
        unsafe { libc::kill(-(group as i32), libc::SIGKILL) };
    }
    let (status, stdout, stderr) = output
        .map_err(|_| HookError::Timeout(limit))?
        .map_err(|source| HookError::Spawn {
            command: command.display().to_string(),
            source,
        })?
        .ok_or(HookError::TooMuchOutput)?;
    if !status.success() {
        return Err(HookError::Failed {
            status: status.to_string(),
            stderr: excerpt(&stderr),
        });
    }
    parse(&stdout)
}

/// Reads until the end, but at most `limit + 1` bytes (one more tells that
/// there was more).
async fn read_at_most(reader: impl AsyncRead + Unpin, limit: usize) -> std::io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    reader
        .take(limit as u64 + 1)
        .read_to_end(&mut bytes)
        .await?;
    Ok(bytes)
}

/// Reads until the end and keeps the first `limit` bytes.
async fn read_keeping(
    mut reader: impl AsyncRead + Unpin,
    limit: usize,
) -> std::io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    (&mut reader)
        .take(limit as u64)
        .read_to_end(&mut bytes)
        .await?;
    tokio::io::copy(&mut reader, &mut tokio::io::sink()).await?;
    Ok(bytes)
}

/// Reads a decision; an empty output means "no opinion". The reason is
/// cut to 200 characters, its control characters escaped.
pub fn parse(stdout: &[u8]) -> Result<Decision, HookError> {
    let invalid = |error: String| HookError::Invalid {
        error,
        output: excerpt(stdout),
    };
    if stdout.len() > MAX_OUTPUT {
        return Err(HookError::TooMuchOutput);
    }
    let text = std::str::from_utf8(stdout).map_err(|e| invalid(e.to_string()))?;
    if text.trim().is_empty() {
        return Ok(Decision::default());
    }
    let mut decision: Decision =
        serde_json::from_str(text.trim()).map_err(|e| invalid(e.to_string()))?;
    if let Some((name, weight)) = decision
        .weights
        .iter()
        .find(|(_, w)| !(1..=MAX_WEIGHT).contains(*w))
    {
        return Err(invalid(format!(
            "weight {weight} of `{}` is not 1 to {MAX_WEIGHT}",
            escape(name.as_bytes())
        )));
    }
    if let Some(reason) = &mut decision.reason {
        // Shown by `yensid mode` and `status` on a terminal: no control
        // characters (escape sequences), and not a page long.
        let mut shown: String = reason
            .chars()
            .take(EXCERPT)
            .flat_map(|c| {
                let escaped: Vec<char> = if c.is_control() {
                    c.escape_default().collect()
                } else {
                    vec![c]
                };
                escaped
            })
            .collect();
        if reason.chars().nth(EXCERPT).is_some() {
            shown.push('…');
        }
        *reason = shown;
    }
    Ok(decision)
}

/// The start of what a hook printed, escaped for a log line.
pub fn excerpt(bytes: &[u8]) -> String {
    let bytes = bytes.trim_ascii();
    match bytes.get(..EXCERPT) {
        Some(start) if bytes.len() > EXCERPT => format!("{}…", escape(start)),
        _ => escape(bytes),
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
                load: None,
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
    fn hostile_decisions_are_bounded_and_escaped() {
        let err = parse(br#"{"weights": {"b1": 1001}}"#)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("weight 1001 of `b1` is not 1 to 1000"),
            "{err}"
        );
        assert!(matches!(
            parse(br#"{"weights": {"b1": 4294967296}}"#),
            Err(HookError::Invalid { .. })
        ));
        assert!(matches!(
            parse(br#"{"weights": {"b1": -1}}"#),
            Err(HookError::Invalid { .. })
        ));
        assert!(parse(br#"{"weights": {"b1": 1000}}"#).is_ok());
        let err = parse(b"\x1b[2J\xff{").unwrap_err().to_string();
        assert!(err.contains("\\x1b[2J\\xff{"), "{err}");
        assert!(!err.contains('\x1b'), "{err}");
        let long = format!(r#"{{"reason": "{}"}}"#, "é".repeat(300));
        let d = parse(long.as_bytes()).unwrap();
        assert_eq!(d.reason.unwrap().chars().count(), 201);
        let d = parse(br#"{"reason": "on battery\u001b[2J\n"}"#).unwrap();
        assert_eq!(d.reason.as_deref(), Some("on battery\\u{1b}[2J\\n"));
        assert!(matches!(
            parse(&vec![b' '; MAX_OUTPUT + 1]),
            Err(HookError::TooMuchOutput)
        ));
        assert_eq!(excerpt(&[b'x'; 500]).len(), 200 + '…'.len_utf8());
    }

    #[tokio::test]
    async fn a_hook_that_floods_its_outputs_is_cut_off() {
        let flood = Script::new("flood", "yes '{}' | head -c 100000000");
        let err = run(&flood.0, &input(), Duration::from_secs(20))
            .await
            .unwrap_err();
        assert!(matches!(err, HookError::TooMuchOutput), "{err}");
        let noisy = Script::new(
            "noisy",
            "printf '\\033[31m' >&2; head -c 10000000 /dev/zero | tr '\\0' 'e' >&2; exit 1",
        );
        let err = run(&noisy.0, &input(), Duration::from_secs(20))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.len() < 400, "{err}");
        assert!(err.contains("\\x1b[31meee"), "{err}");
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
