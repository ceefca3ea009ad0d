//! `cargo xtask fuzz`: the cargo-fuzz targets in `fuzz/` (libFuzzer, nightly),
//! each for a given time, with executions and crashes per target.
//!
//! Each run reads the committed seeds in `fuzz/corpus/<target>/` and writes
//! what it discovers to `target/fuzz/<target>/corpus/` (kept between runs,
//! never committed), so the committed corpus stays a few dozen small seeds.
//! A crash leaves its input in `fuzz/artifacts/<target>/`, and the run
//! fails.

use std::{
    fs,
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};

use crate::build::{ebpf, ebpf_object, path_with_cargo_bin, progress, run, workspace_root};

/// Every target in `fuzz/Cargo.toml`, and what it reads.
pub const TARGETS: &[(&str, &str)] = &[
    ("config", "the configuration file (config::Config::parse)"),
    ("duration", "durations (config::parse_duration)"),
    (
        "ident",
        "SSH identification lines (dataplane::ident::parse, escape)",
    ),
    (
        "control_request",
        "control socket requests (operate::control::parse_request)",
    ),
    (
        "hook_decision",
        "the policy hook's stdout (decide::hook::parse)",
    ),
    ("state_file", "the state file (state::OperatorState::parse)"),
    (
        "metrics_request",
        "metrics request heads (operate::metrics::route)",
    ),
    (
        "scrape_response",
        "builders' metrics responses (decide::scrape::complete_body, decide::load::Sample::parse)",
    ),
];

/// How long `cargo xtask test` runs each target.
pub const TEST_SECONDS: u64 = 10;

/// Inputs up to this size: beyond the control socket's 4 KiB request cap
/// and the metrics endpoint's 8 KiB head cap.
const MAX_LEN: usize = 9000;

#[derive(clap::Args)]
pub struct Options {
    /// Seconds each target runs.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Targets to run (default: every one).
    targets: Vec<String>,
}

/// What one target's run did.
struct Outcome {
    target: &'static str,
    executions: Option<u64>,
    /// The input that crashed it, if one did (libFuzzer stops at the first).
    crash: Option<String>,
}

pub fn run_options(options: &Options) -> Result<()> {
    let targets = if options.targets.is_empty() {
        TARGETS.iter().map(|(name, _)| *name).collect()
    } else {
        options
            .targets
            .iter()
            .map(|wanted| {
                TARGETS
                    .iter()
                    .map(|(name, _)| *name)
                    .find(|name| name == wanted)
                    .with_context(|| {
                        let known: Vec<&str> = TARGETS.iter().map(|(name, _)| *name).collect();
                        format!("no fuzz target `{wanted}` (targets: {})", known.join(", "))
                    })
            })
            .collect::<Result<Vec<_>>>()?
    };
    fuzz(&targets, options.seconds)
}

/// Builds the targets and runs each of `targets` for `seconds`; fails if
/// any crashed.
pub fn fuzz(targets: &[&'static str], seconds: u64) -> Result<()> {
    ensure_tools()?;
    progress("building the fuzz targets (nightly, libFuzzer, AddressSanitizer)");
    // Without -O, cargo fuzz keeps debug assertions and overflow checks on.
    run(cargo_fuzz().arg("build"))?;
    let mut outcomes = Vec::new();
    for target in targets {
        progress(&format!("fuzzing {target} for {seconds} s"));
        outcomes.push(fuzz_one(target, seconds)?);
    }
    eprintln!("\nfuzzing, {seconds} s per target:");
    for outcome in &outcomes {
        let executions = outcome
            .executions
            .map_or_else(|| "unknown".to_owned(), |n| n.to_string());
        let crashes = match &outcome.crash {
            None => "0 crashes".to_owned(),
            Some(input) => format!("CRASHED on {input}"),
        };
        eprintln!(
            "  {:<16} {executions:>12} executions  {crashes}",
            outcome.target
        );
    }
    let crashed: Vec<&str> = outcomes
        .iter()
        .filter(|o| o.crash.is_some())
        .map(|o| o.target)
        .collect();
    if !crashed.is_empty() {
        bail!(
            "fuzz target(s) crashed: {} (reproduce with `cd fuzz && cargo +nightly fuzz run TARGET INPUT`)",
            crashed.join(", ")
        );
    }
    Ok(())
}

fn fuzz_one(target: &'static str, seconds: u64) -> Result<Outcome> {
    let fuzz = workspace_root().join("fuzz");
    let work = workspace_root().join("target/fuzz").join(target);
    let corpus = work.join("corpus");
    fs::create_dir_all(&corpus).with_context(|| format!("cannot create {}", corpus.display()))?;
    let log_path = work.join("last-run.log");
    let log = fs::File::create(&log_path)
        .with_context(|| format!("cannot create {}", log_path.display()))?;
    // The first corpus directory is where libFuzzer writes new inputs.
    let status = cargo_fuzz()
        .args(["run", target])
        .arg(&corpus)
        .arg(fuzz.join("corpus").join(target))
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-max_len={MAX_LEN}"))
        .arg("-timeout=10")
        .arg("-print_final_stats=1")
        .stdout(Stdio::null())
        .stderr(log.try_clone()?)
        .status()
        .with_context(|| format!("cannot run cargo fuzz run {target}"))?;
    let text = fs::read_to_string(&log_path).unwrap_or_default();
    let outcome = Outcome {
        target,
        executions: executions(&text),
        crash: crash_input(&text),
    };
    if !status.success() {
        let tail: Vec<&str> = text.lines().rev().take(40).collect();
        eprintln!("{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
        if outcome.crash.is_none() {
            bail!(
                "cargo fuzz run {target} failed with {status} without a crash input; log: {}",
                log_path.display()
            );
        }
    }
    Ok(outcome)
}

/// libFuzzer's count of executed inputs: `stat::number_of_executed_runs`
/// (`-print_final_stats=1`), else its `Done N runs` line, else the last
/// status line (`#N ...`).
fn executions(log: &str) -> Option<u64> {
    let number = |text: &str| text.trim().parse::<u64>().ok();
    log.lines()
        .rev()
        .find_map(|line| number(line.strip_prefix("stat::number_of_executed_runs:")?))
        .or_else(|| {
            log.lines()
                .rev()
                .find_map(|line| number(line.strip_prefix("Done ")?.split_once(" runs")?.0))
        })
        .or_else(|| {
            log.lines()
                .rev()
                .find_map(|line| number(line.strip_prefix('#')?.split_whitespace().next()?))
        })
}

/// Where libFuzzer wrote the input that crashed the target.
fn crash_input(log: &str) -> Option<String> {
    log.lines().find_map(|line| {
        let path = line.split_once("Test unit written to ")?.1.trim();
        Some(path.to_owned())
    })
}

/// `cargo +nightly fuzz` in `fuzz/`, finding the BPF object the yensid
/// crate embeds.
fn cargo_fuzz() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root().join("fuzz"))
        .args(["+nightly", "fuzz"])
        .env("YENSID_EBPF_OBJECT", ebpf_object())
        // The outer (stable) cargo's settings must not leak into the
        // nightly build.
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env("PATH", path_with_cargo_bin());
    cmd
}

/// The BPF object (which also installs nightly) and cargo-fuzz.
fn ensure_tools() -> Result<()> {
    if !ebpf_object().exists() {
        ebpf()?;
    }
    let installed = Command::new("cargo")
        .args(["fuzz", "--version"])
        .env("PATH", path_with_cargo_bin())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !installed {
        progress("installing cargo-fuzz (cargo install, about two minutes)");
        run(Command::new("cargo")
            .args(["install", "cargo-fuzz", "--locked"])
            .env("PATH", path_with_cargo_bin())
            .env_remove("RUSTUP_TOOLCHAIN"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The committed seeds of `target`.
    fn seeds(target: &str) -> std::path::PathBuf {
        workspace_root().join("fuzz/corpus").join(target)
    }

    #[test]
    fn executions_come_from_the_final_stats_or_the_last_status_line() {
        let log = "#2\tINITED cov: 10 ft: 10 corp: 1/1b exec/s: 0 rss: 30Mb\n\
                   #1048576\tpulse  cov: 10\n\
                   Done 1234567 runs in 61 second(s)\n\
                   stat::number_of_executed_runs: 1234568\n\
                   stat::average_exec_per_sec:     20238\n";
        assert_eq!(executions(log), Some(1234568));
        assert_eq!(
            executions("#100\tNEW cov: 1\nDone 1234 runs in 1 second(s)\n"),
            Some(1234)
        );
        assert_eq!(
            executions("#100\tNEW cov: 1\n#220\tREDUCE cov: 2\n"),
            Some(220)
        );
        assert_eq!(executions("error: could not compile\n"), None);
    }

    #[test]
    fn a_crash_is_found_by_the_input_libfuzzer_wrote() {
        let log = "==1== ERROR: libFuzzer: deadly signal\n\
                   artifact_prefix='/w/fuzz/artifacts/duration/'; Test unit written to /w/fuzz/artifacts/duration/crash-da39a3ee\n\
                   Base64: MQ==\n";
        assert_eq!(
            crash_input(log).as_deref(),
            Some("/w/fuzz/artifacts/duration/crash-da39a3ee")
        );
        assert_eq!(crash_input("Done 5 runs in 1 second(s)\n"), None);
    }

    #[test]
    fn every_target_has_committed_seeds_and_is_declared() {
        let manifest = fs::read_to_string(workspace_root().join("fuzz/Cargo.toml")).unwrap();
        for (target, _) in TARGETS {
            assert!(
                manifest.contains(&format!("name = \"{target}\"")),
                "{target} not in fuzz/Cargo.toml"
            );
            let seeds = fs::read_dir(seeds(target)).unwrap().count();
            assert!(seeds >= 10, "{target}: only {seeds} seeds");
        }
    }
}
