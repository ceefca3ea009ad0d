//! The operator's state file (`<state_dir>/<instance>.json`), which the
//! daemon reads at every start. What it accepts, it writes back the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use yensid::state::OperatorState;

fuzz_target!(|data: &[u8]| {
    if let Ok(state) = OperatorState::parse(data) {
        let written = serde_json::to_vec(&state).expect("state serializes");
        let read = OperatorState::parse(&written).expect("written state reads back");
        assert_eq!(read, state);
    }
});
