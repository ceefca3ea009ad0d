//! `cargo xtask`: the project's build, test, demo and benchmark driver.

mod bench;
mod build;
mod demo;
mod fuzz;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Build, test, demo and benchmark yensid")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build the BPF object (nightly, -Z build-std=core, bpf-linker).
    ///
    /// Installs what is missing, with a line each: rust-src for nightly,
    /// bpf-linker built against LLVM 22, and (as root on Debian) the
    /// llvm-22-dev packages it needs. Otherwise it stops with the exact
    /// command to run.
    BuildEbpf,
    /// Build everything and run every test (unit and black-box).
    ///
    /// The black-box tests need root: they create network namespaces with
    /// real sshd builders. Unprivileged, they skip; the summary line counts
    /// them (`N passed, N failed, N skipped: not root`), and a skip fails the
    /// run in CI (`CI=true`) or with `--all`.
    /// Without extra arguments, every fuzz target then runs for 10 s.
    Test {
        /// Every test must run: any skipped test fails the run (as in CI).
        #[arg(long)]
        all: bool,
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Show yensid working on this machine: two throwaway sshd builders in
    /// network namespaces, the daemon in front of them, real ssh sessions.
    Demo,
    /// Measure direct, HAProxy, kernel path and userspace path side by side.
    Bench(bench::Options),
    /// Fuzz every parser of untrusted input (cargo-fuzz, nightly): each
    /// target for a given time, with executions and crashes per target.
    ///
    /// Installs cargo-fuzz when it is missing. Fails if a target crashed;
    /// the input is left in fuzz/artifacts/<target>/.
    Fuzz(fuzz::Options),
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::BuildEbpf => build::ebpf(),
        Command::Test { all, args } => {
            build::test(&args, all)?;
            // The whole suite (as CI runs it) also fuzzes every target briefly.
            if args.is_empty() {
                let targets: Vec<&str> = fuzz::TARGETS.iter().map(|(name, _)| *name).collect();
                fuzz::fuzz(&targets, fuzz::TEST_SECONDS)?;
            }
            Ok(())
        }
        Command::Demo => demo::run(),
        Command::Bench(options) => bench::run(&options),
        Command::Fuzz(options) => fuzz::run_options(&options),
    }
}
