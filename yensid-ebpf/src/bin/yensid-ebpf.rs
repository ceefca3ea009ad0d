//! yensid's BPF programs. Built only for `bpfel-unknown-none` by
//! `cargo xtask build-ebpf`; on the host this file is an empty binary so the
//! workspace builds everywhere.
#![cfg_attr(target_arch = "bpf", no_std, no_main, feature(asm_experimental_arch))]

#[cfg(target_arch = "bpf")]
mod programs;

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(all(target_arch = "bpf", not(test)))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
