use super::*;

const GOOD: &str = r#"
[[service]]
name = "x86"
listen = ["127.0.0.22/32", "fd00::22"]
builders = ["b2", "b1"]
strategy = "priority"

[builders.b1]
address = "198.18.1.2:22"
weight = 2
max_connections = 8
host_key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHJ0"

[builders.b2]
address = "builder-2.example:2222"

[policy]
mode = "local"
"#;

fn problems(text: &str) -> Vec<String> {
    match Config::parse(text) {
        Ok(_) => panic!("expected problems in:\n{text}"),
        Err(ConfigError::Invalid(p)) => p.iter().map(ToString::to_string).collect(),
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn when_full_defaults_to_refuse_and_queue_keys_are_checked_with_their_key() {
    assert_eq!(
        Config::parse(GOOD).unwrap().services[0].when_full,
        WhenFull::Refuse
    );
    let with = |keys: &str| GOOD.replace("strategy = \"priority\"", keys);
    let c = Config::parse(&with("when_full = \"queue\"")).unwrap();
    assert_eq!(
        c.services[0].when_full,
        WhenFull::Queue(QueueSettings {
            timeout: Duration::from_secs(60),
            limit: 256
        })
    );
    let c = Config::parse(&with(
        "when_full = \"queue\"\nqueue_timeout = \"2m\"\nqueue_limit = 10",
    ))
    .unwrap();
    assert_eq!(
        c.services[0].when_full,
        WhenFull::Queue(QueueSettings {
            timeout: Duration::from_secs(120),
            limit: 10
        })
    );
    let p = problems(&with("queue_timeout = \"10s\""));
    assert!(
        p[0].contains("service[0].queue_timeout") && p[0].contains("only with"),
        "{p:?}"
    );
    let p = problems(&with("when_full = \"refuse\"\nqueue_limit = 3"));
    assert!(p[0].contains("service[0].queue_limit"), "{p:?}");
    let p = problems(&with("when_full = \"queue\"\nqueue_timeout = \"2d\""));
    assert!(
        p[0].contains("service[0].queue_timeout") && p[0].contains("maximum"),
        "{p:?}"
    );
    let p = problems(&with("when_full = \"queue\"\nqueue_timeout = \"0s\""));
    assert!(p[0].contains("service[0].queue_timeout"), "{p:?}");
    for bad in ["0", "-1", "4097"] {
        let p = problems(&with(&format!(
            "when_full = \"queue\"\nqueue_limit = {bad}"
        )));
        assert!(p[0].contains("service[0].queue_limit"), "{bad}: {p:?}");
    }
    let p = problems(&with("when_full = \"wait\""));
    assert!(
        p[0].contains("service[0].when_full") && p[0].contains("`wait`"),
        "{p:?}"
    );
}

#[test]
fn a_full_config_parses_with_defaults_filled_in() {
    let c = Config::parse(GOOD).unwrap();
    assert_eq!(c.daemon.pin_path, PathBuf::from(DEFAULT_PIN_PATH));
    assert_eq!(c.daemon.dataplane, Dataplane::Kernel);
    assert_eq!(
        c.daemon.control_socket(),
        PathBuf::from("/run/yensid/yensid.sock")
    );
    assert_eq!(
        c.daemon.state_file(),
        PathBuf::from("/var/lib/yensid/yensid.json")
    );
    assert_eq!(c.services[0].port, 22);
    assert_eq!(c.services[0].builders, ["b2", "b1"]);
    assert_eq!(c.services[0].strategy, Strategy::Priority);
    assert_eq!(c.services[0].listen[1].to_string(), "fd00::22/128");
    assert_eq!(c.builder("b1").unwrap().weight, 2);
    assert_eq!(c.builder("b2").unwrap().weight, 1);
    assert_eq!(c.builder("b2").unwrap().max_connections, None);
    assert_eq!(c.policy.mode, Mode::Local);
}

#[test]
fn service_builders_default_to_every_builder() {
    let c = Config::parse(&GOOD.replace("builders = [\"b2\", \"b1\"]\n", "")).unwrap();
    assert_eq!(c.services[0].builders, ["b1", "b2"]);
    assert_eq!(c.services[0].strategy, Strategy::Priority);
}

#[test]
fn shutdown_grace_defaults_allows_zero_and_is_bounded() {
    let grace = |line: &str| Config::parse(&format!("[daemon]\n{line}\n{GOOD}"));
    assert_eq!(
        Config::parse(GOOD).unwrap().daemon.shutdown_grace,
        DEFAULT_SHUTDOWN_GRACE
    );
    assert_eq!(
        grace("shutdown_grace = \"0s\"")
            .unwrap()
            .daemon
            .shutdown_grace,
        Duration::ZERO
    );
    assert_eq!(
        grace("shutdown_grace = \"2m\"")
            .unwrap()
            .daemon
            .shutdown_grace,
        Duration::from_secs(120)
    );
    for bad in ["\"2d\"", "\"soon\"", "\"-1s\""] {
        let p = problems(&format!("[daemon]\nshutdown_grace = {bad}\n{GOOD}"));
        assert!(
            p.len() == 1 && p[0].contains("daemon.shutdown_grace"),
            "{bad}: {p:?}"
        );
    }
}

#[test]
fn handoff_limits_have_defaults_and_are_checked_with_their_key() {
    let c = Config::parse(GOOD).unwrap();
    assert_eq!(c.daemon.handoff, HandoffLimits::default());
    let set = format!(
        "[daemon]\nident_timeout = \"2s\"\nmax_handoffs = 64\nmax_handoffs_per_client = 8\n{GOOD}"
    );
    let h = Config::parse(&set).unwrap().daemon.handoff;
    assert_eq!(
        (h.ident_timeout, h.max_handoffs, h.max_handoffs_per_client),
        (Duration::from_secs(2), 64, 8)
    );
    // Below the per-client default, the total caps it.
    let small = format!("[daemon]\nmax_handoffs = 16\n{GOOD}");
    assert_eq!(
        Config::parse(&small)
            .unwrap()
            .daemon
            .handoff
            .max_handoffs_per_client,
        16
    );
    let bad = format!(
        "[daemon]\nident_timeout = \"0s\"\nmax_handoffs = 0\nmax_handoffs_per_client = -1\n{GOOD}"
    );
    assert_eq!(
        problems(&bad),
        [
            "line 2: daemon.ident_timeout: must be longer than zero",
            "line 3: daemon.max_handoffs: must be a whole number of at least 1",
            "line 4: daemon.max_handoffs_per_client: must be a whole number of at least 1",
        ]
    );
    let above = format!("[daemon]\nmax_handoffs = 4\nmax_handoffs_per_client = 5\n{GOOD}");
    assert_eq!(
        problems(&above),
        ["line 3: daemon.max_handoffs_per_client: must not be above daemon.max_handoffs (4)"]
    );
}

#[test]
fn read_group_is_optional_and_must_name_a_group() {
    assert_eq!(Config::parse(GOOD).unwrap().daemon.read_group, None);
    let with = |group: &str| format!("[daemon]\nread_group = \"{group}\"\n{GOOD}");
    assert_eq!(
        Config::parse(&with("adm"))
            .unwrap()
            .daemon
            .read_group
            .as_deref(),
        Some("adm")
    );
    assert_eq!(
        problems(&with(" ")),
        ["line 2: daemon.read_group: must name a group"]
    );
}

#[test]
fn unknown_keys_are_named_with_their_line() {
    let p = problems(&GOOD.replace("weight = 2", "wieght = 2"));
    assert_eq!(p.len(), 1);
    assert!(p[0].starts_with("line 10: wieght: unknown field"), "{p:?}");
}

#[test]
fn unknown_builder_names_are_reported() {
    let p = problems(&GOOD.replace("[\"b2\", \"b1\"]", "[\"b2\", \"b3\"]"));
    assert_eq!(
        p,
        ["line 5: service[0].builders: unknown builder `b3` (no [builders.b3])"]
    );
}

#[test]
fn bad_values_are_all_reported_at_once() {
    let text = GOOD
        .replace("weight = 2", "weight = 0")
        .replace("198.18.1.2:22", "198.18.1.2")
        .replace("max_connections = 8", "max_connections = -1")
        .replace("127.0.0.22/32", "127.0.0.22/33");
    let p = problems(&text);
    assert_eq!(p.len(), 4, "{p:?}");
    assert!(p[0].starts_with("line 4: service[0].listen: `127.0.0.22/33`"));
    assert!(p[1].starts_with("line 9: builders.b1.address: `198.18.1.2` needs a port"));
    assert!(p[2].starts_with("line 10: builders.b1.weight: must be"));
    assert!(p[3].starts_with("line 11: builders.b1.max_connections: must be"));
}

#[test]
fn overlapping_prefixes_on_one_port_are_refused() {
    let text = format!("{GOOD}\n[[service]]\nname = \"arm\"\nlisten = [\"127.0.0.16/28\"]\n");
    let p = problems(&text);
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(p[0].contains(
        "service[1].listen: 127.0.0.16/28 port 22 overlaps 127.0.0.22/32 claimed by service `x86`"
    ));
    let other_port = text.replace(
        "listen = [\"127.0.0.16/28\"]",
        "listen = [\"127.0.0.16/28\"]\nport = 2222",
    );
    assert!(Config::parse(&other_port).is_ok());
}

#[test]
fn host_bits_and_bad_strategy_and_mode_are_named() {
    let p = problems(&GOOD.replace("127.0.0.22/32", "127.0.0.22/24"));
    assert!(p[0].contains("did you mean 127.0.0.0/24"), "{p:?}");
    let p = problems(&GOOD.replace("\"priority\"", "\"fastest\""));
    assert!(
        p[0].starts_with("line 6: file: unknown variant `fastest`"),
        "{p:?}"
    );
    let p = problems(&GOOD.replace("\"local\"", "\"sometimes\""));
    assert!(p[0].contains("unknown variant `sometimes`"), "{p:?}");
}

#[test]
fn duplicate_services_and_empty_configs_are_refused() {
    let p = problems(&format!(
        "{GOOD}\n[[service]]\nname = \"x86\"\nlisten = [\"127.0.0.23\"]\n"
    ));
    assert!(p[0].contains("service `x86` is defined twice"), "{p:?}");
    let p = problems("");
    assert_eq!(p, ["service: no [[service]] defined: nothing to claim"]);
}

#[test]
fn health_defaults_global_settings_and_per_builder_overrides() {
    let text = format!(
        "{GOOD}\n[health]\ninterval = \"1s\"\nfall = 3\n\n[builders.b3]\naddress = \"198.18.3.2:22\"\nhealth = {{ interval = \"250ms\", rise = 2 }}\n"
    );
    let c = Config::parse(&text).unwrap();
    let b1 = c.builder("b1").unwrap().health;
    assert_eq!(
        (b1.interval, b1.fall, b1.rise),
        (Duration::from_secs(1), 3, 1)
    );
    assert_eq!(b1.timeout, Duration::from_secs(2));
    assert_eq!(b1.connect_timeout, Duration::from_secs(3));
    let b3 = c.builder("b3").unwrap().health;
    assert_eq!(
        (b3.interval, b3.fall, b3.rise),
        (Duration::from_millis(250), 3, 2)
    );
    let p = problems(&format!(
        "{GOOD}\n[health]\ninterval = \"soon\"\nrise = 0\n"
    ));
    assert_eq!(p.len(), 2, "{p:?}");
    assert!(
        p[0].starts_with("line 21: health.interval: `soon` is not a duration"),
        "{p:?}"
    );
    assert!(p[1].starts_with("line 22: health.rise: must be"), "{p:?}");
}

#[test]
fn link_rules_are_global_and_overridable_per_service() {
    let text = GOOD.replace(
            "[policy]\nmode = \"local\"",
            "[policy]\nmode = \"auto\"\nremote_via = [\"ethernet\", \"vpn\"]\nmin_link_mbps = 100\ncommand = \"/etc/yensid/policy\"\nhook_interval = \"10s\"\n\n[links]\n\"enx*\" = \"wwan\"",
        );
    let text = text.replace(
        "strategy = \"priority\"",
        "strategy = \"priority\"\npolicy = { remote_via = [\"ethernet\"], max_rtt_ms = 20 }",
    );
    let c = Config::parse(&text).unwrap();
    let rules = &c.services[0].rules;
    assert_eq!(rules.remote_via, Some(vec![LinkKind::Ethernet]));
    assert_eq!(rules.min_link_mbps, Some(100), "inherited");
    assert_eq!(rules.max_rtt_ms, Some(20));
    assert_eq!(rules.min_healthy_builders, 1);
    assert_eq!(c.links, vec![("enx*".to_owned(), LinkKind::Wwan)]);
    assert_eq!(c.policy.command, Some(PathBuf::from("/etc/yensid/policy")));
    assert_eq!(c.policy.hook_interval, Duration::from_secs(10));
    let p = problems(
        &text
            .replace("\"vpn\"]", "\"carrier-pigeon\"]")
            .replace("\"wwan\"", "\"modem\""),
    );
    assert_eq!(p.len(), 2, "{p:?}");
    assert!(
        p.iter()
            .any(|p| p.contains("policy.remote_via: ") && p.contains("carrier-pigeon")),
        "{p:?}"
    );
    assert!(
        p.iter()
            .any(|p| p.contains("links.\"enx*\"") && p.contains("modem")),
        "{p:?}"
    );
}

#[test]
fn durations_parse_with_units() {
    assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
    assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
    assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
    // Found by the `duration` fuzz target: units and sums that overflow.
    assert!(parse_duration("307445734561825861m").is_err());
    assert!(parse_duration("5124095576030432h").is_err());
    assert!(parse_duration("18446744073709551615s1s").is_err());
    assert!(parse_duration("5").is_err());
    assert!(parse_duration("5 s").is_err());
    assert!(parse_duration("").is_err());
    assert!(parse_duration("s").is_err());
}

#[test]
fn durations_never_overflow_or_wrap() {
    let too_long = |t: &str| {
        let e = parse_duration(t).unwrap_err();
        assert!(e.contains("too long"), "{t}: {e}");
    };
    too_long("18446744073709551616s");
    too_long("18446744073709551615s");
    too_long("5124095576030432h");
    too_long("9223372036854775807s9223372036854775807s");
    too_long("99999999999999999999999999ms");
    assert_eq!(parse_duration("1d2h"), Ok(Duration::from_secs(93_600)));
    assert_eq!(
        parse_duration("18446744073709551s"),
        Ok(Duration::from_secs(18_446_744_073_709_551))
    );
    assert!(parse_duration("1x").is_err());
    assert!(parse_duration("ms").is_err());
}

#[test]
fn bounded_durations_reject_zero_and_too_long() {
    let day = MAX_CONFIG_DURATION;
    assert_eq!(parse_bounded_duration("1d", day), Ok(day));
    assert_eq!(
        parse_bounded_duration("0s", day),
        Err("must be longer than zero".to_owned())
    );
    assert_eq!(
        parse_bounded_duration("25h", day),
        Err("`25h` is longer than the maximum of 1d".to_owned())
    );
    assert!(parse_bounded_duration("366d", MAX_OVERRIDE).is_err());
    assert_eq!(describe_duration(Duration::from_millis(1500)), "1500ms");
    assert_eq!(describe_duration(MAX_OVERRIDE), "365d");
}

#[test]
fn timing_keys_are_bounded_and_named() {
    let p = problems(&format!(
        "{GOOD}\n[health]\ninterval = \"18446744073709551615s\"\ntimeout = \"0s\"\nmax_interval = \"2d\"\n"
    ));
    assert_eq!(p.len(), 3, "{p:?}");
    assert!(
        p[0].starts_with("line 21: health.interval: `18446744073709551615s` is too long"),
        "{p:?}"
    );
    assert!(
        p[1].starts_with("line 22: health.timeout: must be longer than zero"),
        "{p:?}"
    );
    assert!(
        p[2].starts_with("line 23: health.max_interval: `2d` is longer than the maximum of 1d"),
        "{p:?}"
    );
    let p = problems(&GOOD.replace(
        "mode = \"local\"",
        "mode = \"local\"\nhook_interval = \"0ms\"\nhook_timeout = \"100000h\"",
    ));
    assert_eq!(p.len(), 2, "{p:?}");
    assert!(
        p[0].contains("policy.hook_interval: must be longer than zero"),
        "{p:?}"
    );
    assert!(
        p[1].contains("policy.hook_timeout: `100000h` is longer"),
        "{p:?}"
    );
}

#[test]
fn weights_are_bounded() {
    let p = problems(&GOOD.replace("weight = 2", "weight = 1001"));
    assert_eq!(
        p,
        ["line 10: builders.b1.weight: must be a whole number from 1 to 1000"]
    );
    assert!(Config::parse(&GOOD.replace("weight = 2", "weight = 1000")).is_ok());
}

#[test]
fn pin_path_must_be_a_directory_of_its_own() {
    for bad in [
        "/sys/fs/bpf",
        "/sys/fs/bpf/",
        "/",
        "/sys/fs/bpf/../bpf",
        "//sys/fs/bpf",
    ] {
        let p = problems(&format!("[daemon]\npin_path = \"{bad}\"\n{GOOD}"));
        assert_eq!(p.len(), 1, "{bad}: {p:?}");
        assert!(p[0].starts_with("line 2: daemon.pin_path: "), "{p:?}");
    }
    assert!(Config::parse(&format!("[daemon]\npin_path = \"/sys/fs/bpf/x\"\n{GOOD}")).is_ok());
}

#[test]
fn claims_of_the_hosts_own_addresses_need_an_explicit_key() {
    for (claim, why) in [
        (
            "127.0.0.0/8",
            "contains 127.0.0.1: it would take the host's own SSH on 127.0.0.1:22",
        ),
        ("127.0.0.1", "contains 127.0.0.1"),
        ("0.0.0.0/0", "claims a whole address family"),
        ("::/0", "claims a whole address family"),
        (
            "::1",
            "contains ::1: it would take the host's own SSH on [::1]:22",
        ),
        ("::ffff:0.0.0.0/96", "contains 127.0.0.1"),
    ] {
        let text = GOOD
            .replace("\"127.0.0.22/32\", \"fd00::22\"", &format!("\"{claim}\""))
            .replace("198.18.1.2:22", "builder-1.example:22");
        let p = problems(&text);
        assert_eq!(p.len(), 1, "{claim}: {p:?}");
        assert!(p[0].starts_with("line 4: service[0].listen: "), "{p:?}");
        assert!(p[0].contains(why), "{claim}: {p:?}");
        assert!(p[0].contains("allow_host_addresses = true"), "{p:?}");
        let allowed = text.replace(
            "strategy = \"priority\"",
            "strategy = \"priority\"\nallow_host_addresses = true",
        );
        let c = Config::parse(&allowed).unwrap();
        assert!(c.services[0].allow_host_addresses);
    }
    assert!(!Config::parse(GOOD).unwrap().services[0].allow_host_addresses);
    let p = problems(
        &GOOD
            .replace("[[service]]", "[[service]]\nport = 2222")
            .replace("\"127.0.0.22/32\", ", "\"127.0.0.0/8\", "),
    );
    assert!(
        p[0].contains("the host's own service on 127.0.0.1:2222"),
        "{p:?}"
    );
}

#[test]
fn builders_and_metrics_must_not_be_claimed_and_ports_are_not_zero() {
    let p = problems(&GOOD.replace("198.18.1.2:22", "198.18.1.2:0"));
    assert_eq!(
        p,
        ["line 9: builders.b1.address: `198.18.1.2:0`: port 0 is not a port (1 to 65535)"]
    );
    let p = problems(&GOOD.replace("198.18.1.2:22", "127.0.0.22:22"));
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(p[0].starts_with("line 9: builders.b1.address: 127.0.0.22:22 is inside 127.0.0.22/32 port 22 claimed by service `x86`"), "{p:?}");
    assert!(Config::parse(&GOOD.replace("198.18.1.2:22", "127.0.0.22:2222")).is_ok());
    let p = problems(&format!("{GOOD}\n[metrics]\nlisten = \"[fd00::22]:22\"\n"));
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(
        p[0].contains("metrics.listen: [fd00::22]:22 is inside fd00::22/128 port 22"),
        "{p:?}"
    );
    let p = problems(&format!("{GOOD}\n[metrics]\nlisten = \"127.0.0.1:0\"\n"));
    assert!(p[0].contains("metrics.listen: port 0"), "{p:?}");
}

#[test]
fn min_healthy_builders_cannot_exceed_the_pool() {
    let p = problems(&GOOD.replace(
        "mode = \"local\"",
        "mode = \"local\"\nmin_healthy_builders = 3",
    ));
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(
        p[0].starts_with(
            "line 19: policy.min_healthy_builders: 3 is more than the 2 builder(s) of service `x86`"
        ),
        "{p:?}"
    );
    let p = problems(&GOOD.replace(
        "strategy = \"priority\"",
        "strategy = \"priority\"\npolicy = { min_healthy_builders = 5 }",
    ));
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(
        p[0].starts_with("line 7: service[0].policy.min_healthy_builders: 5 is more"),
        "{p:?}"
    );
    assert!(
        Config::parse(&GOOD.replace(
            "mode = \"local\"",
            "mode = \"local\"\nmin_healthy_builders = 2"
        ))
        .is_ok()
    );
}

#[test]
fn addresses_accept_hosts_and_bracketed_ipv6() {
    assert!(check_address("[::1]:22").is_ok());
    assert!(check_address("builder.example:22").is_ok());
    assert!(check_address("::1:22").is_err());
    assert!(check_address("builder:0").is_err());
    assert!(check_address("bad host:22").is_err());
}

#[test]
fn prefixes_overlap_by_their_common_bits() {
    let p = |s: &str| s.parse::<Prefix>().unwrap();
    assert!(p("198.18.0.0/15").overlaps(&p("198.19.4.4")));
    assert!(!p("198.18.0.0/16").overlaps(&p("198.19.4.4")));
    assert!(!p("127.0.0.22").overlaps(&p("::ffff:127.0.0.23")));
    assert!(p("::ffff:127.0.0.0/104").overlaps(&p("127.0.0.22")));
}

mod local_path {
    use crate::config::*;

    const SERVICE: &str = "[[service]]\nname = \"s\"\nlisten = [\"127.0.0.22/32\"]\n";
    const BUILDER: &str = "[builders.b1]\naddress = \"198.18.1.2:22\"\n";

    #[test]
    fn local_clients_default_to_direct_and_the_cgroup_to_the_root() {
        let c = Config::parse(&format!("{SERVICE}{BUILDER}")).unwrap();
        assert_eq!(c.services[0].local_clients, LocalClients::Direct);
        assert_eq!(c.daemon.local_cgroup, None);
        let c = Config::parse(&format!(
            "[daemon]\nlocal_cgroup = \"/sys/fs/cgroup/nix\"\n{SERVICE}local_clients = \"proxy\"\n{BUILDER}"
        ))
        .unwrap();
        assert_eq!(c.services[0].local_clients, LocalClients::Proxy);
        assert_eq!(
            c.daemon.local_cgroup,
            Some(PathBuf::from("/sys/fs/cgroup/nix"))
        );
    }

    #[test]
    fn bad_local_settings_name_their_key() {
        let p = Config::parse(&format!(
            "[daemon]\nlocal_cgroup = \"nix\"\n{SERVICE}{BUILDER}"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            p.contains("daemon.local_cgroup") && p.contains("absolute"),
            "{p}"
        );
        let p = Config::parse(&format!(
            "{SERVICE}local_clients = \"sometimes\"\n{BUILDER}"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            p.contains("local_clients") || p.contains("sometimes"),
            "{p}"
        );
    }
}

mod forward {
    use crate::config::*;

    const SERVICE_AND_BUILDER: &str = "[[service]]\nname = \"s\"\nlisten = [\"127.0.0.22/32\"]\n[builders.b1]\naddress = \"198.18.1.2:22\"\n";

    #[test]
    fn forward_defaults_to_auto_and_takes_either_way() {
        let c = Config::parse(SERVICE_AND_BUILDER).unwrap();
        assert_eq!(c.daemon.forward, ForwardSetting::Auto);
        for (value, setting) in [
            ("auto", ForwardSetting::Auto),
            ("sockmap", ForwardSetting::Sockmap),
            ("splice", ForwardSetting::Splice),
        ] {
            let c = Config::parse(&format!(
                "[daemon]\nforward = \"{value}\"\n{SERVICE_AND_BUILDER}"
            ))
            .unwrap();
            assert_eq!(c.daemon.forward, setting);
        }
    }

    #[test]
    fn auto_keeps_the_socket_map_only_where_a_store_keeps_its_sessions() {
        assert_eq!(ForwardSetting::Auto.resolve(true).0, Forward::Sockmap);
        assert_eq!(ForwardSetting::Auto.resolve(false).0, Forward::Splice);
        for store in [true, false] {
            assert_eq!(ForwardSetting::Sockmap.resolve(store).0, Forward::Sockmap);
            assert_eq!(ForwardSetting::Splice.resolve(store).0, Forward::Splice);
        }
        assert!(ForwardSetting::Auto.resolve(false).1.starts_with("auto:"));
        assert!(
            ForwardSetting::Splice
                .resolve(true)
                .1
                .contains("[daemon] forward")
        );
    }

    #[test]
    fn an_unknown_forward_names_the_choices() {
        let p = Config::parse(&format!(
            "[daemon]\nforward = \"copy\"\n{SERVICE_AND_BUILDER}"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            p.contains("copy")
                && p.contains("auto")
                && p.contains("sockmap")
                && p.contains("splice"),
            "{p}"
        );
    }
}
