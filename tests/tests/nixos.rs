//! The NixOS modules (issue 11): every `.nix` file parses; the modules, evaluated by
//! nixpkgs' real module system, generate a configuration file that `yensid
//! check-config` accepts, machines lines that agree with `yensid nix-machines`, and a
//! builder user outside `wheel`; typos fail evaluation naming the option; and for three
//! example configurations (nixos/tests/examples.nix) the generated file, machines lines
//! and known_hosts drive real Nix builds through a real daemon to real builders.
//!
//! Evaluation needs nixpkgs' `lib` (see `yensid_tests::nixos`); without it these tests
//! record a skip
//! (`SKIPPED (NixOS module evaluation: ...)`, counted and fatal in CI). The builds also need root
//! (`SKIPPED (needs root)`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, anyhow, bail, ensure};
use serde_json::{Value, json};
use yensid_tests::nixos::{Generated, NIX_INSTANTIATE, NixpkgsLib, repository};
use yensid_tests::{
    Daemon, Derivation, NixClient, Site, Topology, privileged_or_skip, yensid_binary,
};

const BUILD_TIMEOUT: Duration = Duration::from_secs(300);
const LOG_WAIT: Duration = Duration::from_secs(30);

/// The harness values the examples take when nothing runs: their own defaults.
fn defaults() -> Value {
    json!({})
}

fn evaluate(lib: &NixpkgsLib, machine: &str, harness: &Value) -> Result<Generated> {
    let json = lib
        .evaluate(machine, harness)?
        .map_err(|e| anyhow!("evaluating {machine} failed:\n{e}"))?;
    Ok(Generated { json })
}

/// Nix's error message for a machine that must not evaluate.
fn evaluation_error(lib: &NixpkgsLib, machine: &str) -> Result<String> {
    match lib.evaluate(machine, &defaults())? {
        Ok(json) => bail!("{machine} evaluated, to {json}"),
        Err(message) => Ok(message),
    }
}

fn nix_files(dir: &Path, found: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if path.is_dir() {
            if name != "target" && !name.starts_with('.') {
                nix_files(&path, found)?;
            }
        } else if name.ends_with(".nix") {
            found.push(path);
        }
    }
    Ok(())
}

#[test]
fn every_nix_file_in_the_repository_parses() -> Result<()> {
    if !Path::new(NIX_INSTANTIATE).exists() {
        yensid_tests::record_skip(
            "every_nix_file_in_the_repository_parses",
            "no nix-instantiate",
        );
        return Ok(());
    }
    let mut files = Vec::new();
    nix_files(&repository(), &mut files)?;
    ensure!(
        files.len() >= 10,
        "found only {files:?}: the modules and tests are missing"
    );
    let mut broken = Vec::new();
    for file in &files {
        let out = Command::new(NIX_INSTANTIATE)
            .arg("--parse")
            .arg(file)
            .output()?;
        if !out.status.success() {
            broken.push(format!(
                "{}: {}",
                file.display(),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    ensure!(broken.is_empty(), "unparsable:\n{}", broken.join("\n"));
    Ok(())
}

/// The three examples' daemon configurations, written out as the module writes them,
/// pass `yensid check-config`.
#[test]
fn every_example_configuration_passes_check_config() -> Result<()> {
    let Some(lib) = NixpkgsLib::find_or_skip("every_example_configuration_passes_check_config")?
    else {
        return Ok(());
    };
    let dir = std::env::temp_dir().join(format!("yensid-nixos-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = (|| -> Result<()> {
        for example in ["laptop", "gateway", "garnix"] {
            let generated = evaluate(&lib, &format!("examples.{example}.daemon"), &defaults())?;
            let paths = yensid_tests::InstancePaths {
                pin_path: "/sys/fs/bpf/yensid".into(),
                state_dir: "/var/lib/yensid".into(),
                runtime_dir: "/run/yensid".into(),
            };
            if example == "garnix" {
                let service = &generated.json["settings"]["service"][0];
                ensure!(
                    service["strategy"] == json!("round-robin")
                        && service["builders"] == json!(["b1", "b2"])
                        && generated.json["settings"]["builders"]["b1"]["address"]
                            == json!("10.0.0.11:22")
                        && generated.json["firewall"] == json!([22]),
                    "garnix's options mapped to {}",
                    generated.json
                );
            }
            let file = dir.join(format!("{example}.toml"));
            std::fs::write(&file, generated.config_file(&paths)?)?;
            let out = Command::new(yensid_binary())
                .arg("check-config")
                .arg(&file)
                .output()?;
            ensure!(
                out.status.success(),
                "{example}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// The laptop's client side: four machine entries on the service's /30, each with a
/// quarter of the pool's eight slots, every builder trusted under every address; the
/// same lines `yensid nix-machines` prints for the generated configuration. The unit
/// is Type=notify, reloads with SIGHUP and restarts on failure.
#[test]
fn client_side_lists_alias_entries_like_yensid_nix_machines() -> Result<()> {
    let Some(lib) =
        NixpkgsLib::find_or_skip("client_side_lists_alias_entries_like_yensid_nix_machines")?
    else {
        return Ok(());
    };
    let laptop = evaluate(&lib, "examples.laptop.daemon", &defaults())?;
    let machines = laptop.lines("machines")?;
    let system = format!("{}-linux", std::env::consts::ARCH);
    let expected: Vec<String> = (20..24)
        .map(|last| format!("ssh-ng://nix-builder@127.0.0.{last} {system} - 2 1 - - -"))
        .collect();
    ensure!(machines == expected, "machines lines: {machines:#?}");
    ensure!(laptop.json["distributedBuilds"] == json!(true));

    let known = laptop.lines("knownHosts")?;
    ensure!(known.len() == 2, "one line per builder key: {known:#?}");
    for line in &known {
        ensure!(
            line.starts_with("127.0.0.20,127.0.0.21,127.0.0.22,127.0.0.23 ssh-ed25519 "),
            "{line}"
        );
    }

    let dir = std::env::temp_dir().join(format!("yensid-nixos-machines-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("laptop.toml");
    let paths = yensid_tests::InstancePaths {
        pin_path: "/sys/fs/bpf/yensid".into(),
        state_dir: "/var/lib/yensid".into(),
        runtime_dir: "/run/yensid".into(),
    };
    std::fs::write(&file, laptop.config_file(&paths)?)?;
    let cli = Command::new(yensid_binary())
        .args(["nix-machines", "--config"])
        .arg(&file)
        .output();
    let _ = std::fs::remove_dir_all(&dir);
    let cli = cli?;
    ensure!(
        cli.status.success(),
        "{}",
        String::from_utf8_lossy(&cli.stderr)
    );
    let printed: Vec<String> = String::from_utf8(cli.stdout)?
        .lines()
        .map(str::to_owned)
        .collect();
    ensure!(
        printed == machines,
        "yensid nix-machines printed {printed:#?}, the module set {machines:#?}"
    );

    let unit = &laptop.json["unit"]["serviceConfig"];
    ensure!(unit["Type"] == json!("notify"), "{unit}");
    ensure!(unit["Restart"] == json!("on-failure"), "{unit}");
    ensure!(
        unit["ExecReload"]
            .as_str()
            .is_some_and(|r| r.ends_with("/bin/yensid takeover --config /etc/yensid/yensid.toml")),
        "{unit}"
    );
    ensure!(
        laptop.json["unit"]["reloadIfChanged"] == json!(true),
        "a changed package must be taken over, not restarted: {}",
        laptop.json["unit"]
    );
    ensure!(unit["StateDirectory"] == json!("yensid"), "{unit}");
    ensure!(unit["RuntimeDirectory"] == json!("yensid"), "{unit}");
    Ok(())
}

/// The module's unit carries exactly the capabilities and hardening of the shipped
/// `dist/yensid.service` (measured and proven under a real systemd by `systemd.rs`), so
/// the two cannot drift: every `[Service]` directive but the command lines has the same
/// value in the module, and the module sets no directive the shipped unit lacks.
#[test]
fn module_unit_matches_the_shipped_unit() -> Result<()> {
    let Some(lib) = NixpkgsLib::find_or_skip("module_unit_matches_the_shipped_unit")? else {
        return Ok(());
    };
    let laptop = evaluate(&lib, "examples.laptop.daemon", &defaults())?;
    let unit = laptop.json["unit"]["serviceConfig"]
        .as_object()
        .context("the module's serviceConfig is not an attribute set")?;
    let shipped = std::fs::read_to_string(repository().join("dist/yensid.service"))?;
    let mut in_service = false;
    let mut compared = Vec::new();
    for line in shipped.lines().map(str::trim) {
        if line.starts_with('[') {
            in_service = line == "[Service]";
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        if !in_service || line.starts_with('#') || key.starts_with("Exec") {
            continue;
        }
        let module = unit
            .get(key)
            .with_context(|| format!("the module's unit lacks {key}={value}"))?;
        let module = match module {
            Value::Bool(true) => "yes".to_owned(),
            Value::Bool(false) => "no".to_owned(),
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            Value::Array(items) => items
                .iter()
                .map(|i| {
                    i.as_str()
                        .map(str::to_owned)
                        .unwrap_or_else(|| i.to_string())
                })
                .collect::<Vec<_>>()
                .join(" "),
            other => other.to_string(),
        };
        ensure!(
            module == value,
            "{key}: the shipped unit says `{value}`, the module `{module}`"
        );
        compared.push(key.to_owned());
    }
    let extra: Vec<&String> = unit
        .keys()
        .filter(|k| !k.starts_with("Exec") && !compared.contains(k))
        .collect();
    ensure!(
        extra.is_empty(),
        "the module sets directives the shipped unit lacks: {extra:?}"
    );
    ensure!(compared.len() > 20, "only {compared:?} compared");
    Ok(())
}

/// A `shutdown_grace` in the settings sets the stop timeout to it plus the same 15 s
/// margin as the shipped unit's default (systemd sums the parts of `2m 15s`).
#[test]
fn stop_timeout_follows_the_shutdown_grace() -> Result<()> {
    let Some(lib) = NixpkgsLib::find_or_skip("stop_timeout_follows_the_shutdown_grace")? else {
        return Ok(());
    };
    let laptop = evaluate(
        &lib,
        r#"{ imports = [ examples.laptop.daemon ]; services.yensid.settings.daemon.shutdown_grace = "2m"; }"#,
        &defaults(),
    )?;
    let timeout = &laptop.json["unit"]["serviceConfig"]["TimeoutStopSec"];
    ensure!(timeout == &json!("2m 15s"), "TimeoutStopSec = {timeout}");
    ensure!(
        laptop.json["settings"]["daemon"]["shutdown_grace"] == json!("2m"),
        "the grace is not in the configuration file: {}",
        laptop.json["settings"]
    );
    Ok(())
}

/// The builder side: a system user for Nix to log in as, with the clients' keys, a
/// trusted Nix user without being in wheel; sshd's MaxStartups raised.
#[test]
fn builder_side_is_a_trusted_user_outside_wheel() -> Result<()> {
    let Some(lib) = NixpkgsLib::find_or_skip("builder_side_is_a_trusted_user_outside_wheel")?
    else {
        return Ok(());
    };
    let builder = evaluate(
        &lib,
        r#"{ services.yensid.builder = { enable = true; authorizedKeys = [ "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIM6+K89ndDpJOvBCdTFoADF+1Xvctn6J0Sd4ig+hcC5x client" ]; }; }"#,
        &defaults(),
    )?;
    let user = &builder.json["users"]["nix-builder"];
    ensure!(user["isSystemUser"] == json!(true), "{user}");
    ensure!(user["useDefaultShell"] == json!(true), "{user}");
    ensure!(user["extraGroups"] == json!([]), "in groups: {user}");
    ensure!(
        user["keys"].as_array().is_some_and(|k| k.len() == 1),
        "{user}"
    );
    let trusted = &builder.json["trustedUsers"];
    ensure!(
        trusted
            .as_array()
            .is_some_and(|t| t.contains(&json!("nix-builder"))),
        "trusted-users: {trusted}"
    );
    ensure!(
        builder.json["sshdSettings"]["MaxStartups"] == json!("128:30:512"),
        "{}",
        builder.json["sshdSettings"]
    );

    let keyless = evaluation_error(&lib, "{ services.yensid.builder.enable = true; }")?;
    ensure!(
        keyless.contains("services.yensid.builder: no client may log in"),
        "{keyless}"
    );
    Ok(())
}

#[test]
fn unknown_strategy_fails_evaluation_naming_the_option() -> Result<()> {
    let Some(lib) =
        NixpkgsLib::find_or_skip("unknown_strategy_fails_evaluation_naming_the_option")?
    else {
        return Ok(());
    };
    let error = evaluation_error(
        &lib,
        r#"{ services.yensid = { enable = true; settings.service = [ { name = "x"; listen = [ "127.0.0.20/30" ]; strategy = "fastest"; } ]; }; }"#,
    )?;
    ensure!(
        error.contains("services.yensid.settings.service.") && error.contains(".strategy"),
        "the message does not name the option:\n{error}"
    );
    ensure!(error.contains("fastest"), "{error}");
    ensure!(
        error.contains("least-connections"),
        "the message does not list the strategies:\n{error}"
    );
    Ok(())
}

/// A group the daemon would not find on the host fails evaluation (the build sandbox
/// cannot check the host's groups, the system's declaration can); a declared one
/// passes.
#[test]
fn undeclared_group_fails_evaluation_naming_the_option() -> Result<()> {
    let Some(lib) =
        NixpkgsLib::find_or_skip("undeclared_group_fails_evaluation_naming_the_option")?
    else {
        return Ok(());
    };
    let machine = |groups: &str| {
        format!(
            r#"{{ users.groups = {{ {groups} }}; services.yensid = {{ enable = true; settings = {{ daemon.read_group = "builders"; service = [ {{ name = "x"; listen = [ "127.0.0.20/30" ]; }} ]; builders.b1.address = "198.18.1.2:22"; }}; }}; }}"#
        )
    };
    let error = evaluation_error(&lib, &machine(""))?;
    ensure!(
        error.contains("services.yensid.settings.daemon.read_group names the group `builders`"),
        "{error}"
    );
    evaluate(&lib, &machine("builders = { };"), &defaults())?;
    Ok(())
}

#[test]
fn unknown_builder_fails_evaluation_naming_the_option() -> Result<()> {
    let Some(lib) = NixpkgsLib::find_or_skip("unknown_builder_fails_evaluation_naming_the_option")?
    else {
        return Ok(());
    };
    let error = evaluation_error(
        &lib,
        r#"{ services.yensid = { enable = true; settings = { service = [ { name = "x"; listen = [ "127.0.0.20/30" ]; builders = [ "b1" "b9" ]; } ]; builders.b1.address = "198.18.1.2:22"; }; }; }"#,
    )?;
    ensure!(
        error.contains("services.yensid.settings.service.\"x\".builders names `b9`"),
        "{error}"
    );
    ensure!(!error.contains("`b1`"), "b1 is known: {error}");
    Ok(())
}

#[test]
fn lua_file_fails_evaluation_with_the_equivalent_hook() -> Result<()> {
    let Some(lib) = NixpkgsLib::find_or_skip("lua_file_fails_evaluation_with_the_equivalent_hook")?
    else {
        return Ok(());
    };
    let error = evaluation_error(
        &lib,
        r#"{ yensid.proxy = { enable = true; listen = [ "127.0.0.28/30" ]; builders.b1.ip = "198.18.1.2"; loadBalancing = { strategy = "custom"; luaFile = "/etc/yensid/strategy.lua"; }; }; }"#,
    )?;
    for needle in [
        "yensid.proxy.loadBalancing.luaFile is not supported",
        "services.yensid.settings.policy.remote_via = [ \"ethernet\" ];",
        "services.yensid.policyHook",
        "{\"mode\": \"local\"",
    ] {
        ensure!(error.contains(needle), "no `{needle}` in:\n{error}");
    }
    let custom = evaluation_error(
        &lib,
        r#"{ yensid.proxy = { enable = true; listen = [ "127.0.0.28/30" ]; builders.b1.ip = "198.18.1.2"; loadBalancing.strategy = "custom"; }; }"#,
    )?;
    ensure!(
        custom.contains("yensid.proxy.loadBalancing.strategy = \"custom\" needs a luaFile"),
        "{custom}"
    );
    Ok(())
}

/// A policy hook for the gateway example: no opinion, a reason to find in the log.
const HOOK: &str = "#!/bin/sh\ncat > /dev/null\necho '{\"reason\": \"gateway example hook\"}'\n";

/// One example running for real: the daemon started with the configuration file the
/// module generated, and a Nix client with the machines lines and known_hosts the
/// module generated for the client machine.
struct Driven {
    // Field order is drop order.
    nix: NixClient,
    daemon: Daemon,
    topology: Topology,
    client: Generated,
}

fn drive(test: &str, example: &str, builders: usize) -> Result<Option<Driven>> {
    if !privileged_or_skip(test) {
        return Ok(None);
    }
    let Some(lib) = NixpkgsLib::find_or_skip(test)? else {
        return Ok(None);
    };
    let topology = Topology::with_stores(builders)?;
    let hook = topology.write_script("policy-hook", HOOK)?;
    let harness = json!({
        "builders": topology.builders().iter().map(|b| json!({
            "address": b.ssh_addr().to_string(),
            "hostKey": b.host_key().trim(),
        })).collect::<Vec<_>>(),
        "ethernetLinks": topology.builders().iter().map(|b| b.client_link()).collect::<Vec<_>>(),
        "policyHook": hook,
        "sshUser": "root",
    });
    let server = evaluate(&lib, &format!("examples.{example}.daemon"), &harness)?;
    let client = evaluate(&lib, &format!("examples.{example}.client"), &harness)?;
    let daemon = Daemon::start_with_file(topology.client_ns(), &|paths| server.config_file(paths))?;
    let checked = Command::new(yensid_binary())
        .arg("check-config")
        .arg(daemon.config_path())
        .output()?;
    ensure!(
        checked.status.success(),
        "check-config: {}",
        String::from_utf8_lossy(&checked.stderr)
    );
    let nix = NixClient::new(&topology, &client.known_hosts()?)?;
    Ok(Some(Driven {
        nix,
        daemon,
        topology,
        client,
    }))
}

impl Driven {
    /// `count` fresh derivations in one nix-build with no local build slot: every one
    /// must be built on a builder (whose store then holds it) through the generated
    /// machine entries.
    fn build_remotely(&self, count: usize) -> Result<()> {
        let derivations: Vec<Derivation> = (0..count).map(|_| Derivation::uncached()).collect();
        let run = self
            .nix
            .build(&derivations, &self.client.builders()?, 0, BUILD_TIMEOUT)?;
        run.ensure_built()?;
        for build in &run.builds {
            let output = build.output.as_ref().context("ensure_built checked it")?;
            let Site::Builder(name) = &output.site else {
                bail!(
                    "{} was built at {:?}:\n{}",
                    build.name,
                    output.site,
                    run.stderr
                );
            };
            let store = self
                .topology
                .builder(name)
                .store()
                .context("a topology with stores")?;
            ensure!(
                store.contains(&output.path),
                "{} names {name}, whose store lacks it",
                build.name
            );
        }
        Ok(())
    }
}

/// The laptop: the builders are reached over veths, which the kernel calls `virtual`;
/// the example builds remotely only over ethernet and labels those links ethernet by
/// name (`links`). So a remote build proves the link rules and labels were generated
/// as written, as well as the service on its /30 and the four alias entries.
#[test]
fn laptop_example_drives_real_nix_builds() -> Result<()> {
    let Some(world) = drive("laptop_example_drives_real_nix_builds", "laptop", 2)? else {
        return Ok(());
    };
    ensure!(world.client.lines("machines")?.len() == 4);
    world.build_remotely(2)
}

/// The gateway: three builders round-robin, a policy hook the daemon runs, and a
/// separate client machine that lists the gateway's prefix.
#[test]
fn gateway_example_with_a_hook_drives_real_nix_builds() -> Result<()> {
    let since = SystemTime::now();
    let Some(world) = drive(
        "gateway_example_with_a_hook_drives_real_nix_builds",
        "gateway",
        3,
    )?
    else {
        return Ok(());
    };
    world.daemon.wait_for_log(
        &["policy hook decided", "gateway example hook"],
        since,
        LOG_WAIT,
    )?;
    world.build_remotely(3)
}

/// garnix's options, mapped: their builders and strategy, our claimed prefix.
#[test]
fn garnix_compat_example_drives_real_nix_builds() -> Result<()> {
    let Some(world) = drive("garnix_compat_example_drives_real_nix_builds", "garnix", 2)? else {
        return Ok(());
    };
    world.build_remotely(2)
}
