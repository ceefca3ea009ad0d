//! `config::parse_duration`, which reads every duration in the
//! configuration and `yensid mode ... --for`. An accepted duration is whole
//! milliseconds and reads back from its own spelling in milliseconds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use yensid::config::parse_duration;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let Ok(duration) = parse_duration(&text) else {
        return;
    };
    assert_eq!(
        duration.subsec_nanos() % 1_000_000,
        0,
        "{text:?}: not whole ms"
    );
    if let Ok(millis) = u64::try_from(duration.as_millis()) {
        assert_eq!(
            parse_duration(&format!("{millis}ms")),
            Ok(duration),
            "{text:?} read as {duration:?}"
        );
    }
});
