//! The inspection commands as a black box: `yensid status --json`, `maps --json`,
//! `explain` and `known-hosts` run against an instance's config file (with or without a
//! running daemon), and the Prometheus endpoint scraped over HTTP and parsed.
//!
//! Everything here reads what the CLI prints; nothing reaches into the daemon.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

use crate::command::run_within;
use crate::config::{DaemonConfig, InstancePaths};
use crate::daemon::{CLI_TIMEOUT, Daemon, yensid_binary};
use crate::netns::Netns;
use crate::wait::wait_until;

/// What a CLI run printed and how it ended.
#[derive(Clone, Debug)]
pub struct CliOutput {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

/// `yensid <args> --config <config>` with [`yensid_binary`], whatever its exit status;
/// killed after 30 s.
pub fn yensid(config: &Path, args: &[&str]) -> Result<CliOutput> {
    let mut child = Command::new(yensid_binary())
        .args(args)
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawn yensid {args:?}"))?;
    let stdout = crate::command::drain(child.stdout.take());
    let stderr = crate::command::drain(child.stderr.take());
    let status =
        crate::command::wait_or_kill(&mut child, &format!("yensid {args:?}"), CLI_TIMEOUT)?;
    Ok(CliOutput {
        success: status.success(),
        stdout: String::from_utf8_lossy(&stdout.join().unwrap_or_default()).into_owned(),
        stderr: String::from_utf8_lossy(&stderr.join().unwrap_or_default()).into_owned(),
    })
}

/// Like [`yensid`], but a non-zero exit is an error carrying stderr; returns stdout.
pub fn yensid_ok(config: &Path, args: &[&str]) -> Result<String> {
    let out = yensid(config, args)?;
    ensure!(
        out.success,
        "yensid {args:?} failed: {}{}",
        out.stderr.trim(),
        out.stdout.trim()
    );
    Ok(out.stdout)
}

/// `yensid status --json`, parsed as it is: a running daemon's document, or
/// `{"running": false, ...}` without one.
pub fn status_json(config: &Path) -> Result<Value> {
    parse_json("status --json", &yensid_ok(config, &["status", "--json"])?)
}

/// `yensid maps --json`, parsed.
pub fn maps_json(config: &Path) -> Result<Value> {
    parse_json("maps --json", &yensid_ok(config, &["maps", "--json"])?)
}

fn parse_json(what: &str, text: &str) -> Result<Value> {
    serde_json::from_str(text).with_context(|| format!("`yensid {what}` printed no JSON: {text:?}"))
}

/// `yensid status --json` of an instance whose daemon is not running.
#[derive(Clone, Debug)]
pub struct NotRunning {
    /// `refused` (the pinned dispatch program still claims the addresses) or
    /// `not claimed`.
    pub claimed_traffic: String,
    pub message: String,
}

/// Reads `status --json` and fails unless it says the daemon is not running.
pub fn status_not_running(config: &Path) -> Result<NotRunning> {
    let doc = status_json(config)?;
    ensure!(
        doc.get("running") == Some(&Value::Bool(false)),
        "status says the daemon runs: {doc}"
    );
    Ok(NotRunning {
        claimed_traffic: str_at(&doc, "claimed_traffic")?,
        message: str_at(&doc, "message")?,
    })
}

/// A status document's service called `name`.
pub fn service<'a>(doc: &'a Value, name: &str) -> Result<&'a Value> {
    named(doc, "services", "name", name)
}

/// A status document's builder called `name`.
pub fn builder<'a>(doc: &'a Value, name: &str) -> Result<&'a Value> {
    named(doc, "builders", "name", name)
}

/// The entry of array `array` whose `key` is `name`.
fn named<'a>(doc: &'a Value, array: &str, key: &str, name: &str) -> Result<&'a Value> {
    doc.get(array)
        .and_then(Value::as_array)
        .with_context(|| format!("no array `{array}` in {doc}"))?
        .iter()
        .find(|entry| entry.get(key).and_then(Value::as_str) == Some(name))
        .with_context(|| format!("no {array} entry with {key} {name:?} in {doc}"))
}

/// `value[key]` as an unsigned integer.
pub fn u64_at(value: &Value, key: &str) -> Result<u64> {
    value
        .get(key)
        .and_then(Value::as_u64)
        .with_context(|| format!("no unsigned integer `{key}` in {value}"))
}

/// `value[key]` as a string.
pub fn str_at(value: &Value, key: &str) -> Result<String> {
    value
        .get(key)
        .and_then(Value::as_str)
        .map(str::to_owned)
        .with_context(|| format!("no string `{key}` in {value}"))
}

/// `value[key]`, which must be there (a missing field is an error, never a null:
/// a check that a field is null must not pass because the field is gone).
pub fn field<'a>(value: &'a Value, key: &str) -> Result<&'a Value> {
    value
        .get(key)
        .with_context(|| format!("no field `{key}` in {value}"))
}

/// Whether `value[key]` is null; an error when the field is missing.
pub fn is_null_at(value: &Value, key: &str) -> Result<bool> {
    Ok(field(value, key)?.is_null())
}

/// `value[key]` as a string, or `None` when it is null; an error when it is missing
/// or of another type.
pub fn opt_str_at(value: &Value, key: &str) -> Result<Option<String>> {
    match field(value, key)? {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s.clone())),
        other => bail!("`{key}` is neither a string nor null: {other}"),
    }
}

/// `value[key]` as an unsigned integer, or `None` when it is null; an error when it
/// is missing or of another type.
pub fn opt_u64_at(value: &Value, key: &str) -> Result<Option<u64>> {
    match field(value, key)? {
        Value::Null => Ok(None),
        other => other
            .as_u64()
            .map(Some)
            .with_context(|| format!("`{key}` is neither an unsigned integer nor null: {other}")),
    }
}

/// `value[key]` as a number, or `None` when it is null; an error when it is missing
/// or of another type.
pub fn opt_f64_at(value: &Value, key: &str) -> Result<Option<f64>> {
    match field(value, key)? {
        Value::Null => Ok(None),
        other => other
            .as_f64()
            .map(Some)
            .with_context(|| format!("`{key}` is neither a number nor null: {other}")),
    }
}

/// Polls `yensid status --json` until `condition` holds of the document (a running
/// daemon's or a stopped one's), and returns that document; on a timeout the error
/// carries the last one.
pub fn wait_for_status(
    config: &Path,
    what: &str,
    timeout: Duration,
    mut condition: impl FnMut(&Value) -> Result<bool>,
) -> Result<Value> {
    wait_for_doc(what, timeout, || status_json(config), &mut condition)
}

/// Like [`wait_for_status`], for `yensid maps --json`.
pub fn wait_for_maps(
    config: &Path,
    what: &str,
    timeout: Duration,
    mut condition: impl FnMut(&Value) -> Result<bool>,
) -> Result<Value> {
    wait_for_doc(what, timeout, || maps_json(config), &mut condition)
}

fn wait_for_doc(
    what: &str,
    timeout: Duration,
    mut read: impl FnMut() -> Result<Value>,
    condition: &mut impl FnMut(&Value) -> Result<bool>,
) -> Result<Value> {
    let mut last = None;
    wait_until(what, timeout, || {
        let doc = read()?;
        let done = condition(&doc)?;
        last = Some(doc);
        Ok(done)
    })
    .with_context(|| match &last {
        Some(doc) => format!("last document: {doc}"),
        None => "no document".to_owned(),
    })?;
    Ok(last.expect("wait_until returned after reading a document"))
}

/// In a `maps --json` dump, the value stored under `key` in map `map` (dumped as an
/// array of `[key, value]` pairs).
pub fn map_entry<'a>(maps: &'a Value, map: &str, key: &Value) -> Result<&'a Value> {
    maps.get(map)
        .and_then(Value::as_array)
        .with_context(|| format!("no map `{map}` in {maps}"))?
        .iter()
        .find_map(|pair| match pair.as_array().map(Vec::as_slice) {
            Some([k, v]) if k == key => Some(v),
            _ => None,
        })
        .with_context(|| format!("no key {key} in map `{map}`: {maps}"))
}

/// In a `maps --json` dump, the `BUILDERS` index of each backend position of service
/// `service` (a service's positions follow its `builders` list in the config).
pub fn backend_builders(maps: &Value, service: u64) -> Result<Vec<u64>> {
    let count = u64_at(
        map_entry(maps, "services", &Value::from(service))?,
        "backends",
    )?;
    (0..count)
        .map(|position| {
            let key = serde_json::json!([service, position]);
            u64_at(map_entry(maps, "service_backends", &key)?, "builder")
        })
        .collect()
}

/// In a `maps --json` dump, `(assigned, released, active)` of builder index `index`
/// (all zero when the map has no entry: nothing was ever assigned).
pub fn builder_connections(maps: &Value, index: u64) -> Result<(u64, u64, u64)> {
    let Ok(entry) = map_entry(maps, "connections", &Value::from(index)) else {
        return Ok((0, 0, 0));
    };
    let numbers: Vec<u64> = entry
        .as_array()
        .context("connection counts are no array")?
        .iter()
        .filter_map(Value::as_u64)
        .collect();
    match numbers.as_slice() {
        &[assigned, released, active] => Ok((assigned, released, active)),
        _ => bail!("connection counts are not three numbers: {entry}"),
    }
}

/// What `yensid explain` printed: one line per rule, the decision last.
#[derive(Clone, Debug)]
pub struct Explanation {
    pub lines: Vec<String>,
}

/// What `explain` says happens to the next connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// `-> bN (why)`: the builder, and the rest of the line.
    Builder { name: String, why: String },
    /// `REFUSED (RST) ...`: the rest of the line after `REFUSED (RST)`.
    Refused { why: String },
}

impl Explanation {
    pub fn text(&self) -> String {
        self.lines.join("\n")
    }

    /// The last line, parsed: `next connection from <client>: -> bN (...)` or
    /// `...: REFUSED (RST) ...`.
    pub fn verdict(&self) -> Result<Verdict> {
        let last = self.lines.last().context("explain printed nothing")?;
        let rest = last
            .strip_prefix("next connection from ")
            .and_then(|rest| rest.split_once(": "))
            .map(|(_, decision)| decision)
            .with_context(|| format!("last line of explain is no decision: {last:?}"))?;
        if let Some(why) = rest.strip_prefix("REFUSED (RST)") {
            return Ok(Verdict::Refused {
                why: why.trim().to_owned(),
            });
        }
        if let Some(choice) = rest.strip_prefix("-> ") {
            let (name, why) = choice.split_once(' ').unwrap_or((choice, ""));
            return Ok(Verdict::Builder {
                name: name.to_owned(),
                why: why.to_owned(),
            });
        }
        bail!("explain's decision is neither a builder nor a refusal: {last:?}")
    }

    /// The line about builder `name` (`  bN: eligible, ...` or `  bN: excluded: ...`).
    pub fn member_line(&self, name: &str) -> Result<&str> {
        let prefix = format!("{name}: ");
        self.lines
            .iter()
            .map(|line| line.trim_start())
            .find(|line| line.starts_with(&prefix))
            .with_context(|| format!("explain has no line about {name}:\n{}", self.text()))
    }
}

/// `yensid explain [--service S] [--from ADDR]`.
pub fn explain(config: &Path, service: Option<&str>, from: Option<IpAddr>) -> Result<Explanation> {
    let from = from.map(|ip| ip.to_string());
    let mut args = vec!["explain"];
    if let Some(service) = service {
        args.extend(["--service", service]);
    }
    if let Some(from) = &from {
        args.extend(["--from", from]);
    }
    let text = yensid_ok(config, &args)?;
    let lines: Vec<String> = text.lines().map(str::to_owned).collect();
    ensure!(!lines.is_empty(), "explain printed nothing");
    Ok(Explanation { lines })
}

/// `yensid known-hosts [--name NAME]`: stdout (the lines) and stderr (builders left
/// out); an error if it exits non-zero.
pub fn known_hosts(config: &Path, name: Option<&str>) -> Result<CliOutput> {
    let mut args = vec!["known-hosts"];
    if let Some(name) = name {
        args.extend(["--name", name]);
    }
    let out = yensid(config, &args)?;
    ensure!(
        out.success,
        "yensid known-hosts failed: {}",
        out.stderr.trim()
    );
    Ok(out)
}

/// Writes `config` plus `extra` raw TOML to `file`, with instance paths under `dir` (a
/// pin path that is never created): a config for the commands that only read it, such
/// as `known-hosts`, without a daemon.
pub fn write_config(file: &Path, dir: &Path, config: &DaemonConfig, extra: &str) -> Result<()> {
    let paths = InstancePaths {
        pin_path: dir.join("no-pins"),
        state_dir: dir.join("state"),
        runtime_dir: dir.join("run"),
    };
    let text = format!("{}{extra}", config.render(&paths));
    fs::write(file, text).with_context(|| format!("write {}", file.display()))
}

/// Appends raw TOML (e.g. a `[metrics]` table the harness cannot render) to the running
/// instance's config file and restarts the daemon (clean stop, start), so it reads it.
/// A later [`Daemon::reload`] rewrites the file and drops `toml`.
pub fn restart_with_extra_toml(daemon: &mut Daemon, toml: &str) -> Result<()> {
    let status = daemon.stop()?;
    ensure!(status.success(), "yensid stopped with {status}");
    let mut file = OpenOptions::new()
        .append(true)
        .open(daemon.config_path())
        .with_context(|| format!("open {}", daemon.config_path().display()))?;
    write!(file, "\n{toml}\n")?;
    drop(file);
    daemon.restart()
}

/// Whether a program is on `$PATH`.
fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

/// `GET http://<addr><path>` from inside namespace `ns`: the body of a 200 answer. With
/// `curl` when it is installed (a real HTTP client), else a minimal HTTP/1.0 request.
pub fn http_get(ns: &Netns, addr: SocketAddr, path: &str) -> Result<String> {
    let url = format!("http://{addr}{path}");
    if on_path("curl") {
        return run_within(
            ns.command("curl")
                .args(["--silent", "--show-error", "--fail", "--max-time", "20"])
                .arg(&url),
            Stdio::null(),
            CLI_TIMEOUT,
        );
    }
    let response = ns.run(|| -> Result<Vec<u8>> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .with_context(|| format!("connect to {addr}"))?;
        stream.set_read_timeout(Some(Duration::from_secs(20)))?;
        write!(
            stream,
            "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response)?;
        Ok(response)
    })??;
    let response = String::from_utf8(response).context("the HTTP answer is not UTF-8")?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .with_context(|| format!("no HTTP header end in {response:?}"))?;
    let status_line = head.lines().next().unwrap_or_default();
    ensure!(
        status_line.split_whitespace().nth(1) == Some("200"),
        "GET {url}: {status_line}"
    );
    Ok(body.to_owned())
}

/// One sample of a Prometheus text exposition: `name{labels} value`.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed Prometheus text exposition (format 0.0.4).
#[derive(Clone, Debug)]
pub struct Metrics {
    pub samples: Vec<Sample>,
    /// `# TYPE` lines: metric family name -> type.
    pub types: BTreeMap<String, String>,
    pub text: String,
}

impl Metrics {
    /// Parses the text format strictly: every non-comment line must be a sample, and
    /// every sample name unique with its labels.
    pub fn parse(text: &str) -> Result<Self> {
        let mut samples = Vec::new();
        let mut types = BTreeMap::new();
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            if let Some(comment) = line.strip_prefix('#') {
                let mut words = comment.split_whitespace();
                if words.next() == Some("TYPE") {
                    let name = words.next().context("# TYPE without a name")?;
                    let kind = words.next().context("# TYPE without a type")?;
                    types.insert(name.to_owned(), kind.to_owned());
                }
                continue;
            }
            let sample = parse_sample(line)
                .with_context(|| format!("metrics line {}: {line:?}", number + 1))?;
            ensure!(
                !samples
                    .iter()
                    .any(|s: &Sample| s.name == sample.name && s.labels == sample.labels),
                "metrics line {}: duplicate sample {line:?}",
                number + 1
            );
            samples.push(sample);
        }
        Ok(Self {
            samples,
            types,
            text: text.to_owned(),
        })
    }

    /// Samples called `name` whose labels include every one of `labels`.
    pub fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// The one sample called `name` with (at least) `labels`; an error naming what is
    /// there when there is none or more than one.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
        let found: Vec<&Sample> = self.matching(name, labels).collect();
        match found.as_slice() {
            [one] => Ok(one.value),
            [] => bail!("no sample {name}{labels:?} in\n{}", self.text),
            many => bail!("{} samples {name}{labels:?}: {many:?}", many.len()),
        }
    }

    /// The sum of every sample called `name` with (at least) `labels`; 0 when none.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|s| s.value).sum()
    }

    /// Every metric name present.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.samples.iter().map(|s| s.name.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        names
    }
}

/// `name{k="v",...} value [timestamp]`.
fn parse_sample(line: &str) -> Result<Sample> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .context("a sample without a value")?;
    let name = &line[..name_end];
    ensure!(
        !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
            && !name.starts_with(|c: char| c.is_ascii_digit()),
        "bad metric name {name:?}"
    );
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(after) = rest.strip_prefix('{') {
        let mut chars = after.char_indices().peekable();
        let end = loop {
            // Skip separators.
            while let Some(&(_, c)) = chars.peek() {
                if c == ',' || c.is_whitespace() {
                    chars.next();
                } else {
                    break;
                }
            }
            let Some(&(start, c)) = chars.peek() else {
                bail!("unterminated label set");
            };
            if c == '}' {
                break start + 1;
            }
            let eq = after[start..]
                .find('=')
                .map(|i| start + i)
                .context("a label without `=`")?;
            let key = after[start..eq].trim();
            ensure!(
                !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                "bad label name {key:?}"
            );
            while chars.peek().is_some_and(|&(i, _)| i <= eq) {
                chars.next();
            }
            ensure!(
                chars.next().map(|(_, c)| c) == Some('"'),
                "label {key} has no quoted value"
            );
            let mut value = String::new();
            loop {
                match chars.next() {
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, c)) => value.push(c),
                        None => bail!("unterminated label value"),
                    },
                    Some((_, '"')) => break,
                    Some((_, c)) => value.push(c),
                    None => bail!("unterminated label value"),
                }
            }
            ensure!(
                labels.insert(key.to_owned(), value).is_none(),
                "label {key} twice"
            );
        };
        rest = &after[end..];
    }
    let mut words = rest.split_whitespace();
    let value = words.next().context("a sample without a value")?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse().with_context(|| format!("bad value {v:?}"))?,
    };
    if let Some(timestamp) = words.next() {
        timestamp
            .parse::<i64>()
            .with_context(|| format!("bad timestamp {timestamp:?}"))?;
    }
    ensure!(words.next().is_none(), "trailing text after the value");
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_parses() {
        let metrics = Metrics::parse(
            "# HELP yensid_connections_total Connections.\n\
             # TYPE yensid_connections_total counter\n\
             yensid_connections_total{service=\"ssh\",builder=\"b1\"} 3\n\
             yensid_connections_total{service=\"ssh\",builder=\"b2\"} 4 1700000000000\n\
             yensid_up 1\n\
             yensid_info{version=\"0.1\",note=\"a \\\"q\\\", b\"} 1\n\
             yensid_connect_seconds_bucket{le=\"+Inf\"} 7\n",
        )
        .expect("valid");
        assert_eq!(
            metrics
                .value("yensid_connections_total", &[("builder", "b2")])
                .unwrap(),
            4.0
        );
        assert_eq!(
            metrics.sum("yensid_connections_total", &[("service", "ssh")]),
            7.0
        );
        assert!(metrics.value("yensid_connections_total", &[]).is_err());
        assert_eq!(metrics.value("yensid_up", &[]).unwrap(), 1.0);
        assert_eq!(
            metrics
                .value("yensid_info", &[("note", "a \"q\", b")])
                .unwrap(),
            1.0
        );
        assert_eq!(
            metrics
                .types
                .get("yensid_connections_total")
                .map(String::as_str),
            Some("counter")
        );
        assert!(Metrics::parse("yensid_x{a=\"1\"}\n").is_err());
        assert!(Metrics::parse("yensid_x{a=1} 2\n").is_err());
        assert!(Metrics::parse("yensid_x 1\nyensid_x 2\n").is_err());
    }

    #[test]
    fn json_accessors_fail_on_a_missing_field() {
        let doc = serde_json::json!({"reason": null, "until": 7, "rtt": 1.5, "name": "b1"});
        assert_eq!(opt_str_at(&doc, "reason").unwrap(), None);
        assert!(opt_str_at(&doc, "missing").is_err());
        assert!(opt_str_at(&doc, "until").is_err());
        assert!(is_null_at(&doc, "reason").unwrap());
        assert!(!is_null_at(&doc, "until").unwrap());
        assert!(is_null_at(&doc, "missing").is_err());
        assert_eq!(opt_u64_at(&doc, "until").unwrap(), Some(7));
        assert_eq!(opt_u64_at(&doc, "reason").unwrap(), None);
        assert!(opt_u64_at(&doc, "missing").is_err());
        assert!(opt_u64_at(&doc, "name").is_err());
        assert_eq!(opt_f64_at(&doc, "rtt").unwrap(), Some(1.5));
        assert!(opt_f64_at(&doc, "missing").is_err());
        assert!(u64_at(&doc, "missing").is_err());
    }

    #[test]
    fn explain_verdicts_parse() {
        let explanation = Explanation {
            lines: vec![
                "service ssh (127.0.0.22/32 port 22, strategy least-connections)".into(),
                "  b1: excluded: draining".into(),
                "  b2: eligible, 0 open connection(s), weight 1".into(),
                "next connection from 198.18.250.7: -> b2 (fewest open connections)".into(),
            ],
        };
        assert_eq!(
            explanation.verdict().unwrap(),
            Verdict::Builder {
                name: "b2".into(),
                why: "(fewest open connections)".into()
            }
        );
        assert_eq!(
            explanation.member_line("b1").unwrap(),
            "b1: excluded: draining"
        );
        let refused = Explanation {
            lines: vec![
                "next connection from a client: REFUSED (RST) because mode is local: Nix builds locally"
                    .into(),
            ],
        };
        assert_eq!(
            refused.verdict().unwrap(),
            Verdict::Refused {
                why: "because mode is local: Nix builds locally".into()
            }
        );
    }
}
