//! The control socket's request reader: whatever a local user sends,
//! complete or not. A request is one line within the size cap, reads
//! back from its own serialization, and every refusal is printable.
#![no_main]

use libfuzzer_sys::fuzz_target;
use yensid::operate::control::{MAX_REQUEST, parse_request};

fuzz_target!(|data: &[u8]| {
    let line_end = data[..data.len().min(MAX_REQUEST)]
        .iter()
        .position(|&b| b == b'\n');
    for eof in [false, true] {
        match parse_request(data, eof) {
            Ok(None) => {
                assert!(!eof, "end of stream must settle the request");
                assert!(data.len() < MAX_REQUEST && line_end.is_none());
            }
            Ok(Some(request)) => {
                assert!(eof || line_end.is_some(), "a request before its line feed");
                let mut again = serde_json::to_vec(&request).expect("requests serialize");
                again.push(b'\n');
                if again.len() <= MAX_REQUEST {
                    assert_eq!(parse_request(&again, false), Ok(Some(request)));
                }
            }
            Err(e) => {
                let message = e.to_string();
                assert!(
                    !message.chars().any(char::is_control),
                    "unescaped: {message:?}"
                );
            }
        }
    }
});
