//! Building the BPF object and the daemon, installing what is missing.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const LLVM_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "libxml2-dev",
];

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

/// The path of the built BPF object.
pub fn ebpf_object() -> PathBuf {
    yensid_tests::target_dir().join("bpfel-unknown-none/release/yensid-ebpf")
}

/// The path of the built daemon: the harness decides (it honours
/// `CARGO_TARGET_DIR`), so xtask and the tests always agree.
pub fn yensid_binary(release: bool) -> PathBuf {
    yensid_tests::built_binary(if release { "release" } else { "debug" })
}

pub fn ebpf() -> Result<()> {
    ensure_rust_src()?;
    ensure_bpf_linker()?;
    progress("building the BPF object (nightly, bpfel-unknown-none)");
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root())
        .args([
            "+nightly",
            "build",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "-p",
            "yensid-ebpf",
            "--bin",
            "yensid-ebpf",
        ])
        // The outer (stable) cargo's settings must not leak into the
        // nightly BPF build.
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env("PATH", path_with_cargo_bin());
    run(&mut cmd)?;
    progress(&format!("BPF object: {}", ebpf_object().display()));
    Ok(())
}

/// Builds the BPF object and the daemon.
pub fn all(release: bool) -> Result<()> {
    ebpf()?;
    progress(if release {
        "building yensid (release)"
    } else {
        "building yensid"
    });
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root())
        .args(["build", "-p", "yensid"]);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)
}

/// `cargo xtask test`: builds everything and runs every test, then prints one line
/// `N passed, N failed, N skipped` (with why they skipped). Skipped tests are the
/// black-box tests that could not run (not root, no `ip netns`); they record
/// themselves in a file this sets (`YENSID_TEST_SKIPS`). A skip fails the run in CI
/// (`CI=true`) and with `--all`; otherwise it is counted and printed loudly.
pub fn test(args: &[String], require_all: bool) -> Result<()> {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    let strict = require_all || ci;
    all(false)?;
    if is_root() {
        ensure_packages(TEST_PACKAGES)?;
    } else {
        eprintln!(
            "\n*** NOT ROOT: the black-box tests (namespaces, real sshd) cannot run and will be \
             counted as SKIPPED{}. ***\n",
            if strict { ", which fails this run" } else { "" }
        );
    }
    let skips = yensid_tests::target_dir().join(format!("test-skips-{}.txt", std::process::id()));
    let _ = std::fs::remove_file(&skips);
    progress("running every test");
    let mut totals = Totals::default();
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root())
        .args([
            "test",
            "--workspace",
            "--exclude",
            "yensid-ebpf",
            "--no-fail-fast",
        ])
        .env("YENSID_BIN", yensid_binary(false))
        .env(yensid_tests::SKIPS_FILE_ENV, &skips)
        .args(args);
    let workspace = run_counting(&mut cmd, &mut totals);
    // The shared selection code is tested on the host too.
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root())
        .args(["test", "-p", "yensid-ebpf", "--lib"]);
    let selection = run_counting(&mut cmd, &mut totals);

    let skipped = read_skips(&skips)?;
    let _ = std::fs::remove_file(&skips);
    println!("{}", totals.summary(&skipped));
    workspace?;
    selection?;
    if !skipped.is_empty() {
        if strict {
            bail!(
                "{} test(s) skipped; a skip fails the run {}",
                skipped.len(),
                if ci { "in CI (CI=true)" } else { "with --all" }
            );
        }
        eprintln!(
            "\n*** {} TEST(S) SKIPPED: this run does not show that they pass (run as root; \
             `cargo xtask test --all` makes a skip fail the run). ***\n",
            skipped.len()
        );
    }
    Ok(())
}

/// What libtest's `test result:` lines add up to.
#[derive(Default)]
struct Totals {
    passed: u64,
    failed: u64,
}

impl Totals {
    /// Adds one `test result: ok. 8 passed; 0 failed; 0 ignored; ...` line.
    fn add_result_line(&mut self, line: &str) {
        let Some(rest) = line.trim().strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(what), Some(count)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(count) = count.parse::<u64>() else {
                continue;
            };
            match what {
                "passed" => self.passed += count,
                "failed" => self.failed += count,
                _ => {}
            }
        }
    }

    /// `N passed, N failed, N skipped[: N reason, ...]`: a skipped test returns
    /// early and libtest counts it as passed, so it is taken out of the passed ones.
    fn summary(&self, skipped: &[(String, String)]) -> String {
        let mut reasons = std::collections::BTreeMap::<&str, usize>::new();
        for (_, reason) in skipped {
            *reasons.entry(reason.as_str()).or_default() += 1;
        }
        let passed = self.passed.saturating_sub(skipped.len() as u64);
        let mut line = format!(
            "{passed} passed, {} failed, {} skipped",
            self.failed,
            skipped.len()
        );
        if reasons.len() == 1 {
            let (reason, _) = reasons.iter().next().expect("one reason");
            line.push_str(&format!(": {reason}"));
        } else if !reasons.is_empty() {
            let parts: Vec<String> = reasons.iter().map(|(r, n)| format!("{n} {r}")).collect();
            line.push_str(&format!(": {}", parts.join(", ")));
        }
        line
    }
}

/// Runs `cmd` with its stdout passed through line by line and counted into `totals`;
/// an error if it fails.
fn run_counting(cmd: &mut Command, totals: &mut Totals) -> Result<()> {
    use std::io::{BufRead, BufReader, Write};
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    let stdout = child.stdout.take().context("the test run's stdout")?;
    let mut out = std::io::stdout().lock();
    for line in BufReader::new(stdout).lines() {
        let line = line.context("read the test run's output")?;
        totals.add_result_line(&line);
        let _ = writeln!(out, "{line}");
    }
    drop(out);
    let status = child.wait().context("wait for the test run")?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

/// The `<test>\t<reason>` lines the skipped tests wrote; none when no file was made.
fn read_skips(path: &Path) -> Result<Vec<(String, String)>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
    };
    Ok(text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| match l.split_once('\t') {
            Some((test, reason)) => (test.to_owned(), reason.to_owned()),
            None => (l.to_owned(), "unknown reason".to_owned()),
        })
        .collect())
}

fn ensure_rust_src() -> Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]));
    match installed {
        Some(list) if list.lines().any(|l| l.starts_with("rust-src")) => Ok(()),
        Some(_) => {
            progress("installing rust-src for the nightly toolchain");
            run(Command::new("rustup").args([
                "component",
                "add",
                "rust-src",
                "--toolchain",
                "nightly",
            ]))
        }
        None => {
            progress("installing the nightly toolchain with rust-src");
            run(Command::new("rustup").args([
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
                "--component",
                "rust-src",
            ]))
        }
    }
}

fn ensure_bpf_linker() -> Result<()> {
    let version = output(
        Command::new("bpf-linker")
            .arg("--version")
            .env("PATH", path_with_cargo_bin()),
    );
    if version.is_some_and(|v| v.contains(BPF_LINKER_VERSION)) {
        return Ok(());
    }
    if !Path::new(LLVM_PREFIX).join("bin/llvm-config").exists() {
        if is_root() && Path::new(APT_GET).exists() {
            apt_install(LLVM_PACKAGES)?;
        } else {
            bail!(
                "bpf-linker needs LLVM 22. Install it, then run this again:\n\n    sudo apt-get install -y {}\n",
                LLVM_PACKAGES.join(" ")
            );
        }
    }
    progress(&format!(
        "installing bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about a minute)"
    ));
    // llvm-sys finds LLVM through llvm-config on PATH first: an older
    // /usr/bin/llvm-config would win without the prefix.
    let path = format!("{LLVM_PREFIX}/bin:{}", path_with_cargo_bin());
    run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--version",
            BPF_LINKER_VERSION,
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX)
        .env("PATH", path)
        .env_remove("RUSTUP_TOOLCHAIN"))
    .with_context(|| {
        format!(
            "installing bpf-linker failed; the command was:\n    LLVM_SYS_221_PREFIX={LLVM_PREFIX} PATH={LLVM_PREFIX}/bin:$PATH cargo install bpf-linker --version {BPF_LINKER_VERSION} --no-default-features --features llvm-22"
        )
    })
}

/// What the black-box tests run, by file and Debian package: builders'
/// sshd and the clients' ssh, Nix on both sides, namespaces and links
/// (`ip`, `tc`), other users and namespaces (`setpriv`, `nsenter`),
/// lossy links (`nft`), builder load (`prometheus-node-exporter`), and a systemd in a container for the shipped unit
/// (`systemd-nspawn`, and `debootstrap` for its root file system).
const TEST_PACKAGES: &[(&str, &str)] = &[
    ("/usr/sbin/sshd", "openssh-server"),
    ("/usr/bin/ssh", "openssh-client"),
    (yensid_tests::nix::NIX_BUILD, "nix-bin"),
    ("/usr/sbin/ip", "iproute2"),
    ("/usr/sbin/tc", "iproute2"),
    ("/usr/bin/setpriv", "util-linux"),
    ("/usr/bin/nsenter", "util-linux"),
    ("/usr/sbin/sysctl", "procps"),
    ("/usr/sbin/nft", "nftables"),
    (
        yensid_tests::node_exporter::NODE_EXPORTER,
        "prometheus-node-exporter",
    ),
    (yensid_tests::container::NSPAWN, "systemd-container"),
    (yensid_tests::container::DEBOOTSTRAP, "debootstrap"),
];

/// Installs, with apt, the Debian package of each `(file, package)` whose
/// file is missing; without root or apt, stops with the command to run.
pub fn ensure_packages(needed: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = needed
        .iter()
        .filter(|(file, _)| !Path::new(file).exists())
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !(is_root() && Path::new(APT_GET).exists()) {
        bail!(
            "missing {}. Install it, then run this again:\n\n    sudo apt-get install -y {}\n",
            missing.join(", "),
            missing.join(" ")
        );
    }
    apt_install(&missing)?;
    for (file, package) in needed {
        if !Path::new(file).exists() {
            bail!("{package} is installed but there is no {file}");
        }
    }
    Ok(())
}

const APT_GET: &str = "/usr/bin/apt-get";

/// `apt-get install`s `packages` (as root), fetching the package lists first when
/// this machine has none (a fresh install where `apt-get update` never ran) or when
/// the lists it has do not know a package.
fn apt_install(packages: &[&str]) -> Result<()> {
    progress(&format!("installing {} (apt)", packages.join(" ")));
    let update = || {
        progress("fetching the package lists (apt-get update)");
        run(Command::new(APT_GET)
            .args(["update", "-q"])
            .env("DEBIAN_FRONTEND", "noninteractive"))
    };
    let install = || {
        run(Command::new(APT_GET)
            .args(["install", "-y", "-q"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive"))
    };
    if !has_package_lists() {
        update()?;
        return install();
    }
    if install().is_err() {
        update()?;
        install()?;
    }
    Ok(())
}

/// Whether apt has fetched any package list (`/var/lib/apt/lists/*_Packages*`).
fn has_package_lists() -> bool {
    std::fs::read_dir("/var/lib/apt/lists").is_ok_and(|entries| {
        entries
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .any(|name| name.contains("_Packages"))
    })
}

pub fn path_with_cargo_bin() -> String {
    let path = std::env::var("PATH").unwrap_or_default();
    match std::env::var_os("HOME") {
        Some(home) => format!("{}/.cargo/bin:{path}", Path::new(&home).display()),
        None => path,
    }
}

pub fn is_root() -> bool {
    // SAFETY: no arguments, cannot fail.
    unsafe { libc::geteuid() == 0 }
}

pub fn progress(message: &str) {
    eprintln!("xtask: {message}");
}

pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libtest_results_add_up_and_skips_are_taken_out_of_the_passed() {
        let mut totals = Totals::default();
        totals.add_result_line(
            "test result: ok. 8 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s",
        );
        totals.add_result_line(
            "test result: FAILED. 3 passed; 2 failed; 1 ignored; 0 measured; 5 filtered out",
        );
        totals.add_result_line("running 4 tests");
        assert_eq!((totals.passed, totals.failed), (11, 2));
        assert_eq!(totals.summary(&[]), "11 passed, 2 failed, 0 skipped");
        let skipped = vec![
            ("a".to_owned(), "not root".to_owned()),
            ("b".to_owned(), "not root".to_owned()),
        ];
        assert_eq!(
            totals.summary(&skipped),
            "9 passed, 2 failed, 2 skipped: not root"
        );
        let mixed = vec![
            ("a".to_owned(), "not root".to_owned()),
            ("b".to_owned(), "`ip netns` unusable".to_owned()),
        ];
        assert_eq!(
            totals.summary(&mixed),
            "9 passed, 2 failed, 2 skipped: 1 `ip netns` unusable, 1 not root"
        );
    }
}
