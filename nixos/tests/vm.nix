# A NixOS VM test (`nix flake check` or `nix build .#checks.x86_64-linux.vm` on a
# machine with Nix and KVM): a gateway running yensid in front of two builders, and a
# client whose Nix lists the gateway's claimed prefix. It has NOT been run where
# yensid is developed (no Nix daemon, no KVM there); the README says so.
#
# It checks: a remote build lands on a builder; after one builder is killed the next
# build lands on the other; `yensid mode local` makes the client build locally.
{ yensid }:
{ pkgs, lib, ... }:
let
  # nixpkgs' throwaway test keys: builder1's host key is the ECDSA one, builder2's the
  # ed25519 one (so the client trusts two different keys under the same names), and
  # the client logs in with the ed25519 one.
  keys = import "${pkgs.path}/nixos/tests/ssh-keys.nix" pkgs;
  prefix = "10.77.0.0/30";

  builder =
    { hostKey, hostKeyType }:
    {
      imports = [ yensid.nixosModules.default ];
      services.yensid.builder = {
        enable = true;
        authorizedKeys = [ keys.snakeOilEd25519PublicKey ];
      };
      services.openssh.hostKeys = [
        {
          path = "/etc/ssh/test_host_key";
          type = hostKeyType;
        }
      ];
      environment.etc."ssh/test_host_key" = {
        source = hostKey;
        mode = "0600";
      };
      # Off so that a build sees the machine's host name and records where it ran.
      nix.settings.sandbox = false;
      networking.firewall.allowedTCPPorts = [ 22 ];
    };

  # Records the host it was built on; `seed` makes each derivation new.
  derivation =
    seed:
    pkgs.writeText "where-${seed}.nix" ''
      derivation {
        name = "where-${seed}";
        system = "${pkgs.stdenv.hostPlatform.system}";
        builder = "/bin/sh";
        args = [ "-c" "cat /proc/sys/kernel/hostname > $out" ];
      }
    '';
in
{
  name = "yensid";

  nodes = {
    builder1 = builder {
      hostKey = keys.snakeOilPrivateKey;
      hostKeyType = "ecdsa";
    };
    builder2 = builder {
      hostKey = keys.snakeOilEd25519PrivateKey;
      hostKeyType = "ed25519";
    };

    gateway =
      { nodes, ... }:
      {
        imports = [ yensid.nixosModules.default ];
        services.yensid = {
          enable = true;
          openFirewall = true;
          settings = {
            service = [
              {
                name = "pool";
                listen = [ prefix ];
              }
            ];
            builders.b1.address = "${nodes.builder1.networking.primaryIPAddress}:22";
            builders.b2.address = "${nodes.builder2.networking.primaryIPAddress}:22";
            health.interval = "1s";
          };
        };
        # No local route for the claimed prefix: yensid adds it itself (proto 121).
      };

    client =
      { nodes, ... }:
      {
        imports = [ yensid.nixosModules.default ];
        services.yensid.client = {
          enable = true;
          inherit prefix;
          hostKeys = [
            keys.snakeOilPublicKey
            keys.snakeOilEd25519PublicKey
          ];
          capacity = 2;
          sshKey = "/etc/yensid-test/client-key";
        };
        environment.etc."yensid-test/client-key" = {
          source = keys.snakeOilEd25519PrivateKey;
          mode = "0600";
        };
        networking.interfaces.eth1.ipv4.routes = [
          {
            address = "10.77.0.0";
            prefixLength = 30;
            via = nodes.gateway.networking.primaryIPAddress;
          }
        ];
        nix.settings.substituters = lib.mkForce [ ];
        nix.settings.sandbox = false;
      };
  };

  testScript = ''
    start_all()
    builder1.wait_for_unit("sshd.service")
    builder2.wait_for_unit("sshd.service")
    gateway.wait_for_unit("yensid.service")
    client.wait_for_unit("multi-user.target")

    expressions = {
        "remote1": "${derivation "remote1"}",
        "remote2": "${derivation "remote2"}",
        "local1": "${derivation "local1"}",
    }

    def build(seed, local_jobs):
        out = client.succeed(
            f"nix-build --no-out-link --max-jobs {local_jobs} {expressions[seed]}"
        ).strip()
        return client.succeed(f"cat {out}").strip()

    with subtest("a remote build lands on a builder"):
        where = build("remote1", 0)
        assert where in ("builder1", "builder2"), where

    with subtest("a killed builder: the next build lands on the other one"):
        builder1.crash()
        where = build("remote2", 0)
        assert where == "builder2", where

    with subtest("mode local: the client builds locally"):
        gateway.succeed("yensid mode local")
        where = build("local1", 1)
        assert where == "client", where
  '';
}
