//! The configuration parser: any text, as `yensid check-config` and a
//! reload read it. An accepted configuration is consistent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use yensid::config::Config;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let Ok(config) = Config::parse(&text) else {
        return;
    };
    assert!(
        config.builders.windows(2).all(|w| w[0].name < w[1].name),
        "builders not sorted and unique"
    );
    for service in &config.services {
        assert!(
            !service.listen.is_empty(),
            "service {} claims nothing",
            service.name
        );
        for name in &service.builders {
            assert!(
                config.builder(name).is_some(),
                "unknown builder {name} accepted"
            );
        }
        assert_eq!(service.claims().count(), service.listen.len());
    }
    // What the daemon derives from every configuration it starts with.
    let _ = (
        config.daemon.instance(),
        config.daemon.control_socket(),
        config.daemon.state_file(),
    );
    // Parsing is a function of the text alone.
    assert_eq!(Config::parse(&text).ok(), Some(config));
});
