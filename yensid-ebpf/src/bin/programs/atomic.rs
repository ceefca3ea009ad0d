//! Atomic additions to kernel-owned counters in map memory.

use core::ptr::read_volatile;

/// Adds `n` to a counter with a BPF `lock xadd` (the target has no
/// fetch-and-add in core's atomics) and returns the value it had just
/// before. Concurrent callers may read the same old value; the total is
/// never wrong.
#[inline(always)]
pub fn add(counter: *mut u64, n: u64) -> u64 {
    // SAFETY: callers pass counters that live in map memory, are 8-byte
    // aligned, and are only ever written through this atomic add.
    unsafe {
        let old = read_volatile(counter);
        core::arch::asm!("lock *(u64 *)({0} + 0) += {1}", in(reg) counter, in(reg) n);
        old
    }
}
