//! Points the daemon at the BPF object that `cargo xtask build-ebpf` makes.
//! The object is embedded in the binary, so a missing one is a build error
//! that says how to make it.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=YENSID_EBPF_OBJECT");
    let object = match std::env::var_os("YENSID_EBPF_OBJECT") {
        Some(path) => PathBuf::from(path),
        None => {
            let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap());
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| manifest.join("../target"));
            target.join("bpfel-unknown-none/release/yensid-ebpf")
        }
    };
    println!("cargo:rerun-if-changed={}", object.display());
    if !object.exists() {
        panic!(
            "\n\nThe BPF object {} does not exist.\nBuild it first with:\n\n    cargo xtask build-ebpf\n\n(`cargo xtask test` and `cargo xtask demo` do this for you.)\n",
            object.display()
        );
    }
    println!("cargo:rustc-env=YENSID_EBPF_OBJECT={}", object.display());
}
