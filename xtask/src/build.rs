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
    workspace_root().join("target/bpfel-unknown-none/release/yensid-ebpf")
}

/// The path of the built daemon.
pub fn yensid_binary(release: bool) -> PathBuf {
    let profile = if release { "release" } else { "debug" };
    workspace_root().join("target").join(profile).join("yensid")
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

pub fn test(args: &[String]) -> Result<()> {
    all(false)?;
    if is_root() {
        ensure_packages(TEST_PACKAGES)?;
    } else {
        eprintln!(
            "\n*** NOT ROOT: the black-box tests (namespaces, real sshd) will report SKIPPED. ***\n"
        );
    }
    progress("running every test");
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root())
        .args(["test", "--workspace", "--exclude", "yensid-ebpf"])
        .env("YENSID_BIN", yensid_binary(false))
        .args(args);
    run(&mut cmd)?;
    // The shared selection code is tested on the host too.
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root())
        .args(["test", "-p", "yensid-ebpf", "--lib"]);
    run(&mut cmd)
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
        if is_root() && Path::new("/usr/bin/apt-get").exists() {
            progress(&format!("installing {} (apt)", LLVM_PACKAGES.join(" ")));
            run(Command::new("apt-get")
                .args(["install", "-y", "-q"])
                .args(LLVM_PACKAGES)
                .env("DEBIAN_FRONTEND", "noninteractive"))?;
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
/// (`ip`, `tc`), other users and namespaces (`setpriv`, `nsenter`), and
/// lossy links (`nft`).
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
    if !(is_root() && Path::new("/usr/bin/apt-get").exists()) {
        bail!(
            "missing {}. Install it, then run this again:\n\n    sudo apt-get install -y {}\n",
            missing.join(", "),
            missing.join(" ")
        );
    }
    progress(&format!("installing {} (apt)", missing.join(" ")));
    let install = || {
        run(Command::new("apt-get")
            .args(["install", "-y", "-q"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))
    };
    if install().is_err() {
        // A machine that never ran `apt-get update` has no package lists.
        run(Command::new("apt-get").args(["update", "-q"]))?;
        install()?;
    }
    for (file, package) in needed {
        if !Path::new(file).exists() {
            bail!("{package} is installed but there is no {file}");
        }
    }
    Ok(())
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
