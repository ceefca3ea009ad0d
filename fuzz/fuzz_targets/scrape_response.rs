//! A builder's metrics response, as the scraper reads it: the HTTP head
//! and body framing, then the Prometheus text of the body.
#![no_main]

use libfuzzer_sys::fuzz_target;
use yensid::decide::{load::Sample, scrape::complete_body};

fuzz_target!(|data: &[u8]| {
    match complete_body(data) {
        Ok(Some(body)) => {
            assert!(body.len() <= data.len(), "a body longer than the response");
            if let Ok(sample) = Sample::parse(&body, None) {
                let cores = sample.cores.unwrap_or(1);
                assert!(cores >= 1, "a CPU count of zero");
            }
        }
        Ok(None) => {}
        Err(e) => {
            let message = e.to_string();
            assert!(
                !message.chars().any(char::is_control),
                "unescaped: {message:?}"
            );
        }
    }
});
