//! `yensid status --json`, read: what the daemon decided and why, so a test can assert a
//! decision precisely and wait for a state instead of sleeping.

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// One status document of a running daemon.
#[derive(Clone, Debug)]
pub struct Status {
    doc: Value,
}

/// A builder's egress link: the interface the route to it goes out of.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Egress {
    pub name: String,
    /// `ethernet`, `wifi`, ..., `virtual`.
    pub kind: String,
    pub up: bool,
    pub speed_mbps: Option<u64>,
}

/// Whether one claimed prefix of a service reaches the client namespace's own stack.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrefixDelivery {
    pub prefix: String,
    /// `None`: the daemon could not tell.
    pub deliverable: Option<bool>,
    /// The route that delivers it, or what is missing.
    pub how: String,
}

/// The mode in force and where it comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModeStatus {
    /// `auto`, `remote` or `local`.
    pub in_force: String,
    /// `config`, `hook` or `override`.
    pub source: String,
    /// When an override ends, in seconds since the epoch.
    pub until: Option<u64>,
    /// The hook's reason.
    pub reason: Option<String>,
}

impl Status {
    pub fn parse(text: &str) -> Result<Self> {
        let doc: Value = serde_json::from_str(text)
            .with_context(|| format!("`yensid status --json` printed no JSON: {text:?}"))?;
        if doc.get("running") == Some(&Value::Bool(false)) {
            bail!("yensid is not running: {doc}");
        }
        Ok(Self { doc })
    }

    /// The whole document, for failure messages and for fields without an accessor.
    pub fn json(&self) -> &Value {
        &self.doc
    }

    /// Why service `service` refuses every connection; `None` while it serves.
    pub fn refusal(&self, service: &str) -> Result<Option<String>> {
        optional_string(self.service(service)?, "refusal")
    }

    /// Why `builder` takes no new connections of `service`; `None` when eligible.
    pub fn exclusion(&self, service: &str, builder: &str) -> Result<Option<String>> {
        let member = array(self.service(service)?, "members")?
            .iter()
            .find(|m| m.get("builder").and_then(Value::as_str) == Some(builder))
            .with_context(|| {
                format!("builder {builder} is no member of {service}: {}", self.doc)
            })?;
        optional_string(member, "excluded")
    }

    /// `builders[].state` of `builder`: `healthy`, `unhealthy`, `draining` or `full`.
    pub fn builder_state(&self, builder: &str) -> Result<String> {
        string(self.builder(builder)?, "state")
    }

    /// The weight the daemon uses for `builder` (the hook's, else the configured one).
    pub fn weight(&self, builder: &str) -> Result<u64> {
        self.builder(builder)?
            .get("weight")
            .and_then(Value::as_u64)
            .with_context(|| format!("no weight for {builder}: {}", self.doc))
    }

    /// The link the route to `builder` goes out of; `None` without a route.
    pub fn egress(&self, builder: &str) -> Result<Option<Egress>> {
        let egress = match field(self.builder(builder)?, "egress")? {
            Value::Null => return Ok(None),
            egress => egress,
        };
        Ok(Some(Egress {
            name: string(egress, "name")?,
            kind: string(egress, "kind")?,
            up: egress
                .get("up")
                .and_then(Value::as_bool)
                .with_context(|| format!("egress without `up`: {egress}"))?,
            speed_mbps: optional_u64(egress, "speed_mbps")?,
        }))
    }

    pub fn mode(&self) -> Result<ModeStatus> {
        let mode = self
            .doc
            .get("mode")
            .with_context(|| format!("no mode in {}", self.doc))?;
        Ok(ModeStatus {
            in_force: string(mode, "in_force")?,
            source: string(mode, "source")?,
            until: optional_u64(mode, "until")?,
            reason: optional_string(mode, "reason")?,
        })
    }

    /// `services[].local_delivery` of `service`: one entry per claimed prefix.
    pub fn local_delivery(&self, service: &str) -> Result<Vec<PrefixDelivery>> {
        array(self.service(service)?, "local_delivery")?
            .iter()
            .map(|entry| {
                Ok(PrefixDelivery {
                    prefix: string(entry, "prefix")?,
                    deliverable: match entry.get("deliverable") {
                        Some(Value::Bool(b)) => Some(*b),
                        Some(Value::Null) => None,
                        other => bail!("`deliverable` is neither a boolean nor null: {other:?}"),
                    },
                    how: string(entry, "how")?,
                })
            })
            .collect()
    }

    /// `builders[].active` of `builder`: its open connections.
    pub fn active(&self, builder: &str) -> Result<u64> {
        unsigned(self.builder(builder)?, "active")
    }

    /// How the connections that `builder` served and that have ended travelled, as
    /// the daemon recorded them: `(spliced in the kernel, copied in userspace)`.
    pub fn data_path_counts(&self, builder: &str) -> Result<(u64, u64)> {
        let b = self.builder(builder)?;
        Ok((unsigned(b, "spliced")?, unsigned(b, "copied")?))
    }

    /// The names of every builder in the document.
    pub fn builder_names(&self) -> Result<Vec<String>> {
        array(&self.doc, "builders")?
            .iter()
            .map(|b| string(b, "name"))
            .collect()
    }

    fn service(&self, name: &str) -> Result<&Value> {
        array(&self.doc, "services")?
            .iter()
            .find(|s| s.get("name").and_then(Value::as_str) == Some(name))
            .with_context(|| format!("no service {name} in {}", self.doc))
    }

    fn builder(&self, name: &str) -> Result<&Value> {
        array(&self.doc, "builders")?
            .iter()
            .find(|b| b.get("name").and_then(Value::as_str) == Some(name))
            .with_context(|| format!("no builder {name} in {}", self.doc))
    }
}

fn array<'a>(value: &'a Value, key: &str) -> Result<&'a Vec<Value>> {
    value
        .get(key)
        .and_then(Value::as_array)
        .with_context(|| format!("no array `{key}` in {value}"))
}

fn string(value: &Value, key: &str) -> Result<String> {
    value
        .get(key)
        .and_then(Value::as_str)
        .map(str::to_owned)
        .with_context(|| format!("no string `{key}` in {value}"))
}

/// A key that must be there: a missing field is an error, not a null.
fn field<'a>(value: &'a Value, key: &str) -> Result<&'a Value> {
    value
        .get(key)
        .with_context(|| format!("no field `{key}` in {value}"))
}

fn unsigned(value: &Value, key: &str) -> Result<u64> {
    field(value, key)?
        .as_u64()
        .with_context(|| format!("`{key}` is no unsigned integer in {value}"))
}

/// A key that is a string or null; absent is an error.
fn optional_string(value: &Value, key: &str) -> Result<Option<String>> {
    match field(value, key)? {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s.clone())),
        other => bail!("`{key}` is neither a string nor null: {other}"),
    }
}

/// A key that is an unsigned integer or null; absent is an error.
fn optional_u64(value: &Value, key: &str) -> Result<Option<u64>> {
    match field(value, key)? {
        Value::Null => Ok(None),
        other => other
            .as_u64()
            .map(Some)
            .with_context(|| format!("`{key}` is neither an unsigned integer nor null: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_decisions_from_a_status_document() {
        let status = Status::parse(
            r#"{"pid": 1, "dataplane": "kernel", "bpf": true,
                "mode": {"in_force": "local", "source": "override", "until": 1795000000,
                         "reason": null, "summary": "mode local"},
                "services": [{"name": "ssh", "refusal": "mode is local", "members": [
                    {"builder": "b1", "excluded": null},
                    {"builder": "b2", "excluded": "egress link y2 is wifi, not in remote_via"}]}],
                "builders": [{"name": "b1", "state": "healthy", "weight": 3,
                              "egress": {"index": 4, "name": "y1", "kind": "ethernet",
                                         "up": true, "speed_mbps": null}},
                             {"name": "b2", "state": "healthy", "weight": 1, "egress": null}]}"#,
        )
        .expect("valid");
        assert_eq!(
            status.refusal("ssh").unwrap().as_deref(),
            Some("mode is local")
        );
        assert_eq!(status.exclusion("ssh", "b1").unwrap(), None);
        assert!(
            status
                .exclusion("ssh", "b2")
                .unwrap()
                .unwrap()
                .contains("wifi")
        );
        assert!(status.exclusion("ssh", "b3").is_err());
        assert_eq!(
            status.egress("b1").unwrap(),
            Some(Egress {
                name: "y1".into(),
                kind: "ethernet".into(),
                up: true,
                speed_mbps: None
            })
        );
        assert_eq!(status.egress("b2").unwrap(), None);
        assert_eq!(status.weight("b1").unwrap(), 3);
        assert_eq!(status.builder_state("b2").unwrap(), "healthy");
        let mode = status.mode().unwrap();
        assert_eq!(
            (mode.in_force.as_str(), mode.source.as_str(), mode.until),
            ("local", "override", Some(1_795_000_000))
        );
        assert!(Status::parse(r#"{"running": false, "message": "x"}"#).is_err());
        // A field that is gone is no null.
        let without = Status::parse(
            r#"{"mode": {"in_force": "auto", "source": "config"},
                "services": [{"name": "ssh", "members": [{"builder": "b1"}]}],
                "builders": [{"name": "b1", "state": "healthy"}]}"#,
        )
        .expect("valid");
        assert!(without.mode().is_err());
        assert!(without.refusal("ssh").is_err());
        assert!(without.exclusion("ssh", "b1").is_err());
        assert!(without.egress("b1").is_err());
        assert!(without.data_path_counts("b1").is_err());
    }
}
