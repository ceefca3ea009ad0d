//! The file as serde reads it: every value worth complaining about keeps
//! its byte span, for `validate` to name its line.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    #[serde(default)]
    pub daemon: Option<Spanned<Daemon>>,
    #[serde(default)]
    pub service: Vec<Spanned<Service>>,
    #[serde(default)]
    pub builders: BTreeMap<String, Spanned<Builder>>,
    #[serde(default)]
    pub policy: Option<Policy>,
    #[serde(default)]
    pub health: Option<Health>,
    #[serde(default)]
    pub links: BTreeMap<String, Spanned<String>>,
    #[serde(default)]
    pub metrics: Option<Metrics>,
    #[serde(default)]
    pub load: Option<super::load::raw::Section>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    pub listen: Spanned<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Health {
    pub interval: Option<Spanned<String>>,
    pub timeout: Option<Spanned<String>>,
    pub rise: Option<Spanned<i64>>,
    pub fall: Option<Spanned<i64>>,
    pub max_interval: Option<Spanned<String>>,
    pub connect_timeout: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Daemon {
    pub pin_path: Option<Spanned<String>>,
    pub dataplane: Option<super::Dataplane>,
    pub state_dir: Option<Spanned<String>>,
    pub runtime_dir: Option<Spanned<String>>,
    pub read_group: Option<Spanned<String>>,
    pub ident_timeout: Option<Spanned<String>>,
    pub max_handoffs: Option<Spanned<i64>>,
    pub max_handoffs_per_client: Option<Spanned<i64>>,
    pub shutdown_grace: Option<Spanned<String>>,
    pub local_cgroup: Option<Spanned<String>>,
    pub forward: Option<super::ForwardSetting>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    pub name: Spanned<String>,
    pub listen: Spanned<Vec<Spanned<String>>>,
    pub port: Option<Spanned<i64>>,
    pub builders: Option<Vec<Spanned<String>>>,
    pub strategy: Option<super::Strategy>,
    pub policy: Option<Rules>,
    pub allow_host_addresses: Option<bool>,
    pub when_full: Option<Spanned<String>>,
    pub queue_timeout: Option<Spanned<String>>,
    pub queue_limit: Option<Spanned<i64>>,
    pub local_clients: Option<super::LocalClients>,
    pub load: Option<super::load::raw::Limits>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Builder {
    pub address: Spanned<String>,
    pub weight: Option<Spanned<i64>>,
    pub max_connections: Option<Spanned<i64>>,
    pub host_key: Option<Spanned<String>>,
    pub health: Option<Health>,
    pub metrics_url: Option<Spanned<String>>,
    pub store_mountpoint: Option<Spanned<String>>,
    pub load: Option<super::load::raw::Limits>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    pub mode: Option<super::Mode>,
    // The rules a service's `policy` can override (serde's flatten
    // would lose the spans that error messages need).
    pub remote_via: Option<Vec<Spanned<String>>>,
    pub min_link_mbps: Option<Spanned<i64>>,
    pub max_rtt_ms: Option<Spanned<i64>>,
    pub min_healthy_builders: Option<Spanned<i64>>,
    pub command: Option<Spanned<String>>,
    pub hook_interval: Option<Spanned<String>>,
    pub hook_timeout: Option<Spanned<String>>,
    pub control_group: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Rules {
    pub remote_via: Option<Vec<Spanned<String>>>,
    pub min_link_mbps: Option<Spanned<i64>>,
    pub max_rtt_ms: Option<Spanned<i64>>,
    pub min_healthy_builders: Option<Spanned<i64>>,
}
