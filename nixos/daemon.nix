# services.yensid: the daemon. `settings` maps 1:1 onto /etc/yensid/yensid.toml (RFC 42):
# every key of the configuration file may be set, the common ones are typed and
# documented here; the file is validated with `yensid check-config` while the system
# is built, so a typo fails `nixos-rebuild` and names the key.
{
  config,
  lib,
  pkgs,
  ...
}:

let
  inherit (lib)
    mkOption
    mkEnableOption
    mkIf
    types
    literalExpression
    ;
  cfg = config.services.yensid;
  settingsFormat = pkgs.formats.toml { };

  strategies = [
    "least-connections"
    "round-robin"
    "random"
    "source-affinity"
    "priority"
    "least-loaded"
  ];
  linkKinds = [
    "ethernet"
    "wifi"
    "wwan"
    "vpn"
    "loopback"
    "virtual"
    "other"
  ];

  # A typed key that may be left out: null is not written to the file.
  optional =
    type: description:
    mkOption {
      type = types.nullOr type;
      default = null;
      inherit description;
    };

  linkRuleOptions = {
    remote_via = optional (types.listOf (types.enum linkKinds)) "Link kinds builders may be reached over (default: any).";
    min_link_mbps = optional types.ints.positive "Minimum link speed; a link of unknown speed fails it.";
    max_rtt_ms = optional types.ints.positive "Maximum round-trip time to a builder (the kernel's RTT on live connections, else the probes').";
    min_healthy_builders = optional types.ints.unsigned "Fewer eligible builders than this: refuse, so Nix builds locally.";
  };

  serviceType = types.submodule {
    freeformType = settingsFormat.type;
    options = {
      name = mkOption {
        type = types.str;
        description = "The service's name (for `yensid status`, `--service`).";
      };
      listen = mkOption {
        type = types.nonEmptyListOf types.str;
        example = [ "127.0.0.20/30" ];
        description = ''
          Address prefixes claimed in the kernel, IPv4 and IPv6, without host bits set.
          A prefix covering several addresses lets Nix clients list several machine
          entries (see `services.yensid.client.aliases`), so their uploads run in parallel.
        '';
      };
      port = mkOption {
        type = types.port;
        default = 22;
        description = "The port claimed on those addresses.";
      };
      builders = optional (types.listOf types.str) "Builder names (keys of `settings.builders`); default: every builder. Order matters for `priority`.";
      strategy = mkOption {
        type = types.enum strategies;
        default = "least-connections";
        description = "How the kernel picks a builder for each new connection.";
      };
      policy = mkOption {
        type = types.nullOr (
          types.submodule {
            freeformType = settingsFormat.type;
            options = linkRuleOptions;
          }
        );
        default = null;
        description = "This service's link rules, overriding those of `settings.policy`.";
      };
    };
  };

  builderType = types.submodule {
    freeformType = settingsFormat.type;
    options = {
      address = mkOption {
        type = types.str;
        example = "198.18.1.2:22";
        description = "The builder's sshd: `ip:port`, `[v6]:port` or `host:port`.";
      };
      weight = optional types.ints.positive "Relative capacity (default 1).";
      max_connections = optional types.ints.positive "At this many open connections the builder takes no new one (default: unlimited).";
      host_key = optional types.str "The builder's SSH host public key (`ssh-ed25519 AAAA...`), for the clients' known_hosts.";
    };
  };

  # What is written: the settings without the typed keys left at null, and without
  # the tables that are then empty (`[metrics]` without `listen` would be an error).
  withoutNulls =
    value:
    if builtins.isAttrs value then
      lib.filterAttrs (_: v: v != null && v != { }) (lib.mapAttrs (_: withoutNulls) value)
    else if builtins.isList value then
      map withoutNulls value
    else
      value;

  # The configuration file, checked like nixpkgs checks nginx's: a configuration the
  # daemon would refuse fails the build with the daemon's own message (key and line).
  configFile =
    pkgs.runCommand "yensid.toml"
      {
        nativeBuildInputs = [ cfg.package ];
        unchecked = settingsFormat.generate "yensid-unchecked.toml" cfg.finalSettings;
      }
      ''
        # The file alone: groups and listeners are the running host's (groups
        # are checked against users.groups below; listeners at every start).
        yensid check-config --file-only "$unchecked"
        cp "$unchecked" "$out"
      '';

  policyCommand =
    if cfg.policyHook == null then
      null
    else if types.path.check cfg.policyHook then
      toString cfg.policyHook
    else
      toString (pkgs.writeShellScript "yensid-policy-hook" cfg.policyHook);

  knownBuilders = lib.attrNames cfg.settings.builders;

  # `[daemon] shutdown_grace` plus 15s to release the kernel's objects, as in
  # dist/yensid.service (45s for the default grace of 30s). systemd sums the
  # parts of "<grace> 15s", and reads the daemon's units (ms, s, m, h, d) alike.
  shutdownGrace = cfg.settings.daemon.shutdown_grace or null;
  timeoutStop = if shutdownGrace == null then "45s" else "${toString shutdownGrace} 15s";
in
{
  options.services.yensid = {
    enable = mkEnableOption "yensid, the kernel-level redirector for Nix remote builds";

    package = mkOption {
      type = types.package;
      description = "The yensid package (the flake's `packages.<system>.default`, or `pkgs.yensid` with its overlay).";
    };

    settings = mkOption {
      default = { };
      description = ''
        The configuration file /etc/yensid/yensid.toml as Nix values, key for key
        (see the README's "Configuration"). Keys not typed here are passed on as
        written and checked by `yensid check-config` at build time.
      '';
      example = literalExpression ''
        {
          service = [ { name = "x86"; listen = [ "127.0.0.20/30" ]; strategy = "least-connections"; } ];
          builders.b1 = { address = "10.0.0.2:22"; max_connections = 8; host_key = "ssh-ed25519 AAAA..."; };
          policy.remote_via = [ "ethernet" ];
        }
      '';
      type = types.submodule {
        freeformType = settingsFormat.type;
        options = {
          service = mkOption {
            type = types.listOf serviceType;
            default = [ ];
            description = "The services (`[[service]]`): claimed addresses and port, builders, strategy.";
          };
          builders = mkOption {
            type = types.attrsOf builderType;
            default = { };
            description = "The builders (`[builders.<name>]`).";
          };
          policy = mkOption {
            default = { };
            description = "`[policy]`: mode, link rules, the policy hook.";
            type = types.submodule {
              freeformType = settingsFormat.type;
              options = linkRuleOptions // {
                mode = optional (types.enum [
                  "auto"
                  "remote"
                  "local"
                ]) "auto (the link rules decide), remote, or local (refuse everything: Nix builds locally).";
                command = optional types.str "The policy hook; set by `services.yensid.policyHook`.";
              };
            };
          };
          health = mkOption {
            default = { };
            description = "`[health]`: probe interval, timeout, rise, fall, max_interval, connect_timeout.";
            type = types.submodule {
              freeformType = settingsFormat.type;
              options = {
                interval = optional types.str "Probe period of a healthy builder, e.g. `5s`.";
                timeout = optional types.str "How long a probe may take, e.g. `2s`.";
                connect_timeout = optional types.str "A real connection's connect timeout before the client moves to another builder.";
              };
            };
          };
          metrics = mkOption {
            default = { };
            description = "`[metrics]`: the Prometheus endpoint.";
            type = types.submodule {
              freeformType = settingsFormat.type;
              options.listen = optional types.str "`ip:port` serving `GET /metrics`, e.g. `127.0.0.1:9422`.";
            };
          };
          links = mkOption {
            type = types.attrsOf (types.enum linkKinds);
            default = { };
            example = {
              "enx*" = "wwan";
            };
            description = "Interface name patterns labelled with a link kind (first match wins).";
          };
        };
      };
    };

    policyHook = mkOption {
      type = types.nullOr (types.either types.path types.lines);
      default = null;
      example = literalExpression ''
        '''
          cat > /dev/null
          if grep -q 0 /sys/class/power_supply/AC/online; then echo '{"mode": "local", "reason": "on battery"}'; fi
        '''
      '';
      description = ''
        The policy hook (`policy.command`): a path to an executable, or the text of a
        shell script. It reads the daemon's state as JSON on stdin and prints a
        decision (`{"mode": "local", "reason": "..."}`); see the README.
      '';
    };

    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = "Open the services' ports in the firewall (a gateway serving other machines).";
    };

    finalSettings = mkOption {
      type = settingsFormat.type;
      readOnly = true;
      internal = true;
      description = "The settings as written to the configuration file (typed keys left at null dropped).";
    };
  };

  config = lib.mkMerge [
    {
      services.yensid.finalSettings = withoutNulls (
        lib.recursiveUpdate cfg.settings (
          lib.optionalAttrs (policyCommand != null) { policy.command = policyCommand; }
        )
      );
    }
    (mkIf cfg.enable {
      assertions =
        lib.concatMap (
          service:
          map (builder: {
            assertion = lib.elem builder knownBuilders;
            message = "services.yensid.settings.service.\"${service.name}\".builders names `${builder}`, which is not in services.yensid.settings.builders (${lib.concatStringsSep ", " knownBuilders}).";
          }) (if service.builders == null then [ ] else service.builders)
        ) cfg.settings.service
        ++ [
          {
            assertion = cfg.policyHook == null || cfg.settings.policy.command == null;
            message = "services.yensid.policyHook and services.yensid.settings.policy.command are both set; set one.";
          }
        ]
        # The daemon refuses to start with a group the host lacks; the build
        # sandbox cannot see the host's groups (check-config --file-only), but
        # the system's own declaration can.
        ++ map (
          key:
          let
            group = lib.attrByPath key null cfg.settings;
          in
          {
            assertion = group == null || config.users.groups ? ${group};
            message = "services.yensid.settings.${lib.concatStringsSep "." key} names the group `${toString group}`, which is not in users.groups: declare it (users.groups.${toString group} = { };) or name another.";
          }
        ) [
          [
            "daemon"
            "read_group"
          ]
          [
            "policy"
            "control_group"
          ]
        ];

      environment.etc."yensid/yensid.toml".source = configFile;

      networking.firewall.allowedTCPPorts = mkIf cfg.openFirewall (
        lib.unique (map (s: s.port) cfg.settings.service)
      );

      # The capabilities and hardening below are those of dist/yensid.service, where
      # they are measured under a real systemd; tests/tests/nixos.rs keeps the two
      # equal.
      systemd.services.yensid = {
        description = "yensid, kernel-level redirector for Nix remote builds";
        wantedBy = [ "multi-user.target" ];
        after = [ "network.target" ];
        # A changed package or configuration is applied by a takeover, not a
        # restart: `nixos-rebuild switch` reloads the unit, whose ExecReload starts
        # the new daemon, which takes every listener and live connection over from
        # the running one (no connection refused or cut; see README "Takeover").
        reloadIfChanged = true;
        reloadTriggers = [
          configFile
          cfg.package
        ];
        serviceConfig = {
          Type = "notify";
          ExecStart = "${lib.getExe' cfg.package "yensid"} run --config /etc/yensid/yensid.toml";
          ExecReload = "${lib.getExe' cfg.package "yensid"} takeover --config /etc/yensid/yensid.toml";
          NotifyAccess = "all";
          Restart = "on-failure";
          RestartSec = "1s";
          TimeoutStopSec = timeoutStop;
          FileDescriptorStoreMax = 16384;
          FileDescriptorStorePreserve = "restart";
          Environment = "FDSTORE=16384";
          StateDirectory = "yensid";
          RuntimeDirectory = "yensid";
          # Two descriptors per proxied connection (client and builder side).
          LimitNOFILE = 65536;
          # The same set as dist/yensid.service, measured there and proven under a
          # real systemd by tests/tests/systemd.rs: BPF maps and programs (CAP_BPF),
          # sk_lookup attach, SOCKHASH, local routes and netlink (CAP_NET_ADMIN), the
          # pins' group with `daemon.read_group` (CAP_CHOWN). systemd mounts bpffs,
          # so CAP_SYS_ADMIN is not needed.
          CapabilityBoundingSet = [
            "CAP_BPF"
            "CAP_NET_ADMIN"
            "CAP_CHOWN"
          ];
          NoNewPrivileges = true;
          ProtectSystem = "strict";
          # ProtectKernelTunables would make /sys/fs/bpf read-only beyond what
          # ReadWritePaths can reopen: the same read-only view without it.
          ReadWritePaths = [ "/sys/fs/bpf" ];
          ReadOnlyPaths = [
            "/sys"
            "/proc/sys"
            "-/proc/sysrq-trigger"
            "-/proc/acpi"
            "-/proc/bus"
            "-/proc/fs"
            "-/proc/irq"
          ];
          ProtectHome = true;
          PrivateTmp = true;
          PrivateDevices = true;
          ProtectClock = true;
          ProtectHostname = true;
          ProtectKernelLogs = true;
          ProtectKernelModules = true;
          ProtectControlGroups = true;
          RestrictAddressFamilies = [
            "AF_UNIX"
            "AF_INET"
            "AF_INET6"
            "AF_NETLINK"
          ];
          RestrictNamespaces = true;
          RestrictRealtime = true;
          RestrictSUIDSGID = true;
          LockPersonality = true;
          MemoryDenyWriteExecute = true;
          SystemCallArchitectures = "native";
          SystemCallFilter = [
            "@system-service"
            "bpf"
          ];
          SystemCallErrorNumber = "EPERM";
          RemoveIPC = true;
        };
      };
    })
  ];
}
