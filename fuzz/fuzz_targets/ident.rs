//! The SSH identification reader (RFC 4253 4.2) the data plane runs on
//! every client's and builder's first line, and the escaping of untrusted
//! bytes for logs.
#![no_main]

use libfuzzer_sys::fuzz_target;
use yensid::dataplane::ident::{MAX_LINE, escape, parse};

fn printable(text: &str) -> bool {
    text.bytes().all(|b| (b' '..=b'~').contains(&b))
}

fuzz_target!(|data: &[u8]| {
    assert!(printable(&escape(data)), "escape let a byte through");
    match parse(data) {
        Ok(id) => {
            assert!(data.len() <= MAX_LINE, "{} bytes accepted", data.len());
            assert!(data.starts_with(b"SSH-") && data.ends_with(b"\n"));
            assert!(id.protocol == "2.0" || id.protocol == "1.99");
            assert!(!id.software.is_empty() && printable(id.software));
            assert!(!id.software.contains(' '));
        }
        Err(e) => assert!(printable(&e.to_string()), "{e:?}"),
    }
});
