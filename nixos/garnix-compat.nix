# Migration from garnix's HAProxy-based module: `yensid.proxy.*` as that module
# declares it, mapped onto services.yensid. Two differences are deliberate:
#  - yensid claims addresses, not the whole port 22 (the host's own sshd keeps port 22
#    on every other address): name them in `yensid.proxy.listen`;
#  - there is no Lua: a `luaFile` fails evaluation with the equivalent policy hook or
#    link rule.
{ config, lib, ... }:

let
  inherit (lib) mkOption mkIf types;
  cfg = config.yensid.proxy;

  strategies = {
    leastconn = "least-connections";
    roundrobin = "round-robin";
    source = "source-affinity";
  };

  luaReplacement = ''
    yensid.proxy.loadBalancing.luaFile is not supported: yensid runs no Lua. What a Lua
    `custom-strategy` decided is a link rule or a policy hook in yensid:

    - build remotely only over ethernet (the published laptop recipe), a link rule:

        services.yensid.settings.policy.remote_via = [ "ethernet" ];

    - any other logic, a policy hook: a program that reads the daemon's state as JSON
      on stdin and prints a decision; `{"mode": "local"}` is what returning nil (close
      the connection) did, and `{"weights": {"b1": 4}}` steers most connections to
      one builder where the Lua picked a backend by name:

        services.yensid.policyHook = '''
          state=$(cat)
          if ${"$"}{pkgs.jq}/bin/jq -e '.links | any(.kind == "ethernet" and .up)' <<<"$state" >/dev/null; then
            echo '{"mode": "auto", "reason": "on ethernet"}'
          else
            echo '{"mode": "local", "reason": "no ethernet"}'
          fi
        ''';

    Remove loadBalancing.luaFile and set loadBalancing.strategy to one of
    leastconn, roundrobin, source.
  '';
in
{
  options.yensid.proxy = {
    enable = lib.mkEnableOption "the yensid proxy (garnix-compatible options, mapped onto services.yensid)";

    builders = mkOption {
      default = { };
      description = "The builders, as in garnix's module.";
      type = types.attrsOf (
        types.submodule {
          options = {
            ip = mkOption {
              type = types.str;
              description = "The builder's address.";
            };
            port = mkOption {
              type = types.port;
              default = 22;
              description = "The builder's sshd port.";
            };
          };
        }
      );
    };

    loadBalancing = {
      strategy = mkOption {
        type = types.enum [
          "leastconn"
          "roundrobin"
          "source"
          "custom"
        ];
        default = "leastconn";
        description = "leastconn, roundrobin and source map to yensid's least-connections, round-robin and source-affinity; custom needed luaFile, which yensid replaces (see luaFile).";
      };
      luaFile = mkOption {
        type = types.nullOr types.path;
        default = null;
        description = "Not supported: evaluation fails with the equivalent yensid policy hook or link rule.";
      };
    };

    listen = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "10.0.0.20/30" ];
      description = ''
        yensid-only: the address prefixes the proxy claims on port 22 (garnix's proxy
        took port 22 on every address). Clients use these addresses as their builder.
      '';
    };
  };

  config = mkIf cfg.enable {
    services.yensid = {
      enable = true;
      openFirewall = true;
      settings = {
        service = [
          {
            name = "proxy";
            inherit (cfg) listen;
            port = 22;
            builders = lib.attrNames cfg.builders;
            strategy =
              if cfg.loadBalancing.luaFile != null then
                throw luaReplacement
              else
                strategies.${cfg.loadBalancing.strategy}
                  or (throw "yensid.proxy.loadBalancing.strategy = \"custom\" needs a luaFile in garnix's module; yensid has none.\n\n${luaReplacement}");
          }
        ];
        builders = lib.mapAttrs (_: b: {
          address = if lib.hasInfix ":" b.ip then "[${b.ip}]:${toString b.port}" else "${b.ip}:${toString b.port}";
        }) cfg.builders;
      };
    };

    assertions = [
      {
        assertion = cfg.listen != [ ];
        message = ''
          yensid.proxy.listen is empty. garnix's proxy took port 22 on every address;
          yensid claims only the addresses you name, so the host's sshd keeps port 22:
          set yensid.proxy.listen = [ "<address clients use>/32" ] (or a /30 for four
          parallel-upload aliases, see services.yensid.client.aliases).
        '';
      }
    ];
  };
}
