//! Small uncached derivations that record where they were built, and a gate that holds
//! builds open until the test lets them finish.
//!
//! A derivation's output is one line: the network interfaces of the namespace its
//! builder ran in, read from `/proc/self/net/dev` (per reader's network namespace,
//! unlike /sys/class/net, which shows the namespace sysfs was mounted in). Every
//! builder namespace has its own end of its veth and the client namespace the other
//! ends, so the line names the site: [`Sites::resolve`].

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::topology::Topology;
use crate::unique;
use crate::wait::wait_until;

/// Where a derivation was built.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Site {
    /// Locally, in the client namespace.
    Client,
    /// On builder `bK`.
    Builder(String),
    /// In a namespace the topology does not know: the interfaces it saw.
    Unknown(String),
}

/// Interface names and the site each one identifies: [`Topology::sites`].
#[derive(Clone, Debug, Default)]
pub struct Sites {
    links: Vec<(String, Site)>,
}

impl Sites {
    pub(crate) fn add_client_link(&mut self, link: &str) {
        self.links.push((link.to_owned(), Site::Client));
    }

    pub(crate) fn add_builder_link(&mut self, link: &str, builder: &str) {
        self.links
            .push((link.to_owned(), Site::Builder(builder.to_owned())));
    }

    /// The site of a derivation's record (its interface names, space-separated).
    pub fn resolve(&self, record: &str) -> Site {
        record
            .split_whitespace()
            .find_map(|name| {
                self.links
                    .iter()
                    .find(|(link, _)| link == name)
                    .map(|(_, site)| site.clone())
            })
            .unwrap_or_else(|| Site::Unknown(record.trim().to_owned()))
    }
}

/// Sets `sites` to the interface names of the namespace the builder runs in. Plain sh
/// builtins: a builder's environment has no PATH.
const RECORD_SITE: &str = r#"sites=; while IFS=: read -r dev counters; do if [ -n "$counters" ]; then sites="$sites $dev"; fi; done < /proc/self/net/dev"#;

/// How long a gated build waits for its gate before it fails (a test that died
/// without opening it leaves no build behind for longer).
const GATE_LIMIT: Duration = Duration::from_secs(600);
const GATE_POLL: Duration = Duration::from_millis(50);

/// One derivation `derivation { name; system; builder = "/bin/sh"; args; }` whose name
/// is unique on this machine, so no store has its output yet: it really builds.
#[derive(Clone, Debug)]
pub struct Derivation {
    name: String,
    /// Holds the build open until this gate opens.
    gate: Option<PathBuf>,
    /// A file of the client's that becomes an input (a source in the client's store),
    /// so Nix must upload it to the builder before the build.
    input: Option<PathBuf>,
}

impl Derivation {
    /// Builds at once: records its site in its output.
    pub fn uncached() -> Self {
        Self {
            name: format!("yensid-{}", unique::next_id()),
            gate: None,
            input: None,
        }
    }

    /// Also takes the client's file `path` as an input: a remote build first uploads
    /// it. The file must stay until the run has evaluated.
    pub fn with_input(self, path: &Path) -> Self {
        Self {
            input: Some(path.to_owned()),
            ..self
        }
    }

    /// Records its site at [`Gate`] `gate` as soon as it runs, then waits for the gate
    /// to open before it writes its output and ends: its connection stays open until
    /// then.
    pub fn behind(gate: &Gate) -> Self {
        Self {
            gate: Some(gate.dir.clone()),
            ..Self::uncached()
        }
    }

    /// Also the last component of its output path, `/nix/store/<hash>-<name>`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The shell script its builder runs.
    fn script(&self) -> String {
        let Some(gate) = &self.gate else {
            return format!("{RECORD_SITE}; echo $sites > $out");
        };
        let name = &self.name;
        let gate = gate.display();
        let polls = GATE_LIMIT.as_millis() / GATE_POLL.as_millis();
        let poll = GATE_POLL.as_secs_f64();
        format!(
            "{RECORD_SITE}; \
             echo $sites > '{gate}/{name}.tmp' && /bin/mv '{gate}/{name}.tmp' '{gate}/{name}.started'; \
             i=0; while [ ! -e '{gate}/open' ]; do \
             i=$((i+1)); if [ $i -gt {polls} ]; then echo 'the gate never opened' >&2; exit 1; fi; \
             /bin/sleep {poll}; done; \
             echo $sites > $out"
        )
    }

    /// The Nix expression.
    fn expression(&self) -> String {
        format!(
            "derivation {{ name = {}; system = builtins.currentSystem; builder = \"/bin/sh\"; \
             args = [ \"-c\" {} ];{} }}",
            nix_string(&self.name),
            nix_string(&self.script()),
            self.input.as_ref().map_or(String::new(), |path| format!(
                " input = builtins.path {{ path = {}; name = \"input\"; }};",
                nix_path(path)
            ))
        )
    }
}

/// A Nix file whose value is the list of `derivations`.
pub(crate) fn expression_of(derivations: &[Derivation]) -> String {
    let items: Vec<String> = derivations
        .iter()
        .map(|d| format!("  ({})\n", d.expression()))
        .collect();
    format!("[\n{}]\n", items.concat())
}

/// A Nix path value of the absolute path `path` (as a string, so any byte is fine).
fn nix_path(path: &Path) -> String {
    format!("(/. + {})", nix_string(&path.display().to_string()))
}

/// A Nix string literal of `text`.
fn nix_string(text: &str) -> String {
    let escaped = text
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace("${", "\\${");
    format!("\"{escaped}\"")
}

/// A directory in which gated derivations ([`Derivation::behind`]) say they started,
/// and which tells them to finish. It goes away with its topology.
pub struct Gate {
    dir: PathBuf,
    sites: Sites,
}

impl Gate {
    pub fn new(topology: &Topology) -> Result<Self> {
        let dir = topology.new_file("gate");
        fs::create_dir(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        Ok(Self {
            dir,
            sites: topology.sites(),
        })
    }

    /// The gated derivations that are running, by name, and where.
    pub fn started(&self) -> Result<Vec<(String, Site)>> {
        let mut started = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let path = entry?.path();
            let Some(name) = path
                .file_name()
                .and_then(|f| f.to_str())
                .and_then(|f| f.strip_suffix(".started"))
            else {
                continue;
            };
            let record = fs::read_to_string(&path)?;
            started.push((name.to_owned(), self.sites.resolve(&record)));
        }
        started.sort();
        Ok(started)
    }

    /// Waits until at least `count` gated derivations run, and returns them.
    pub fn wait_started(&self, count: usize, timeout: Duration) -> Result<Vec<(String, Site)>> {
        let mut started = Vec::new();
        wait_until(&format!("{count} gated builds to start"), timeout, || {
            started = self.started()?;
            Ok(started.len() >= count)
        })
        .with_context(|| format!("started: {started:?}"))?;
        Ok(started)
    }

    /// Lets every gated derivation, running or not yet, finish.
    pub fn open(&self) -> Result<()> {
        let open = self.dir.join("open");
        fs::write(&open, "").with_context(|| format!("create {}", open.display()))
    }
}
