//! The policy hook's decision, as the hook printed it on stdout.
#![no_main]

use libfuzzer_sys::fuzz_target;
use yensid::decide::hook::parse;

fuzz_target!(|data: &[u8]| {
    if let Ok(decision) = parse(data) {
        assert!(
            decision.weights.values().all(|&w| w >= 1),
            "a zero weight accepted: {decision:?}"
        );
    }
});
