# yensid: the daemon with its BPF object embedded, built offline in the Nix sandbox.
#
# Two cargo builds in one derivation:
#  1. the BPF programs (`yensid-ebpf`, target bpfel-unknown-none). That target has no
#     prebuilt `core`, so it is built with `-Z build-std=core` on nixpkgs' stable rustc
#     (RUSTC_BOOTSTRAP=1 unlocks the -Z flags and the crate's
#     `feature(asm_experimental_arch)`). build-std needs the standard library's sources
#     (`rustPlatform.rustLibSrc`, nixpkgs' rust-src) under the compiler's sysroot and
#     the crates its own Cargo.lock names, vendored next to ours; `bpf-linker` from
#     nixpkgs links the object.
#  2. the daemon (`yensid`), which embeds that object (YENSID_EBPF_OBJECT).
{
  lib,
  rustPlatform,
  rustc,
  bpf-linker,
  symlinkJoin,
  writeShellScript,
}:

let
  cargoToml = lib.importTOML ../yensid-user/Cargo.toml;

  # The crates of our lock and of the standard library's lock (compiler_builtins,
  # rustc-std-workspace-core, ...), in one vendor directory: both builds run with
  # --offline against it. Both vendor directories carry the same source replacement
  # config, so the first one's copy is the one kept.
  vendored = symlinkJoin {
    name = "yensid-${cargoToml.package.version}-vendor";
    paths = [
      (rustPlatform.importCargoLock { lockFile = ../Cargo.lock; })
      (rustPlatform.importCargoLock { lockFile = "${rustPlatform.rustLibSrc}/Cargo.lock"; })
    ];
  };

  # nixpkgs' rustc ships no rust-src in its sysroot; cargo's build-std looks for the
  # library at <sysroot>/lib/rustlib/src/rust/library. A sysroot of symlinks adds it,
  # and a wrapper points rustc at it (only the BPF build uses the wrapper).
  sysroot = symlinkJoin {
    name = "rustc-sysroot-with-src";
    paths = [ rustc.unwrapped or rustc ];
    postBuild = ''
      mkdir -p $out/lib/rustlib/src/rust
      ln -s ${rustPlatform.rustLibSrc} $out/lib/rustlib/src/rust/library
    '';
  };
  rustcWithSrc = writeShellScript "rustc-with-src" ''
    exec ${lib.getExe' rustc "rustc"} --sysroot ${sysroot} "$@"
  '';
in
rustPlatform.buildRustPackage {
  pname = "yensid";
  inherit (cargoToml.package) version;

  src = lib.fileset.toSource {
    root = ../.;
    # Every workspace member must be present for cargo to read the workspace.
    fileset = lib.fileset.unions [
      ../Cargo.toml
      ../Cargo.lock
      ../.cargo
      ../yensid-ebpf
      ../yensid-user
      ../xtask
      ../tests
    ];
  };

  cargoDeps = vendored;

  nativeBuildInputs = [ bpf-linker ];

  cargoBuildFlags = [
    "--package"
    "yensid"
  ];

  env = {
    RUSTC_BOOTSTRAP = "1";
    YENSID_EBPF_OBJECT = "target/bpfel-unknown-none/release/yensid-ebpf";
  };

  preBuild = ''
    RUSTC=${rustcWithSrc} cargo build --offline --release \
      --target bpfel-unknown-none -Z build-std=core \
      --package yensid-ebpf --bin yensid-ebpf
    export YENSID_EBPF_OBJECT=$PWD/$YENSID_EBPF_OBJECT
    test -s "$YENSID_EBPF_OBJECT"
  '';

  # The library's unit tests need no privileges; the black-box tests (namespaces,
  # BPF, sshd) need root and run with `cargo xtask test`, not in the sandbox.
  cargoTestFlags = [
    "--package"
    "yensid"
    "--lib"
  ];

  meta = {
    description = cargoToml.package.description;
    license = with lib.licenses; [
      mit
      asl20
    ];
    mainProgram = "yensid";
    platforms = [
      "x86_64-linux"
      "aarch64-linux"
    ];
  };
}
