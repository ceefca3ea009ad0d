//! The metrics endpoint's request routing: whatever reaches the port.
#![no_main]

use libfuzzer_sys::fuzz_target;
use yensid::operate::metrics::{MAX_HEAD, Route, route};

fuzz_target!(|data: &[u8]| {
    let head = &data[..data.len().min(MAX_HEAD)];
    match route(head) {
        Route::NeedMore => assert!(head.len() < MAX_HEAD, "a full head left undecided"),
        // RFC 9112 2.2: empty lines before the request line are ignored.
        Route::Metrics => assert!(
            head.trim_ascii_start().starts_with(b"GET /metrics"),
            "served {head:?}"
        ),
        Route::Refuse { status, body } => {
            assert!(status.as_bytes()[0].is_ascii_digit());
            assert!(
                !body.trim_end().chars().any(char::is_control),
                "unescaped: {body:?}"
            );
        }
    }
});
