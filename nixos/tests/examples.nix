# Three example configurations, each a pair of NixOS modules: the machine running the
# daemon and the machine whose Nix builds through it (the same one on a laptop).
# The arguments are what differs between a real deployment and the test harness
# (tests/tests/nixos.rs), which passes its builders' addresses and host keys, the name
# pattern of the links its builders are reached through, its policy hook and the user
# its builders let in. The defaults are illustrative values (the host keys are real
# ed25519 public keys whose private halves were thrown away).
{
  builders ? [
    {
      address = "10.0.0.11:22";
      hostKey = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIM6+K89ndDpJOvBCdTFoADF+1Xvctn6J0Sd4ig+hcC5x";
    }
    {
      address = "10.0.0.12:22";
      hostKey = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILSL6uY6dwbqiWzBrVEjTZk3VqVlSJSHAoSBgtE1sYnq";
    }
    {
      address = "10.0.0.13:22";
      hostKey = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIF5KWUXp4JIcnjrzNC+7bR6iel7mLyuP061XQd67AkZS";
    }
  ],
  ethernetLinks ? [ "enp*" ],
  policyHook ? ''
    cat > /dev/null
    echo '{"reason": "gateway hook: no opinion"}'
  '',
  sshUser ? "nix-builder",
}:
let
  builder = i: builtins.elemAt builders i;
  ipOf = address: builtins.head (builtins.match "\\[?([^]]*)]?:[0-9]+" address);
  portOf = address: builtins.fromJSON (builtins.head (builtins.match ".*:([0-9]+)" address));
in
{
  # A laptop: daemon and Nix on one host, two builders, remote builds only over
  # ethernet; the builders' links are labelled ethernet by name.
  laptop = rec {
    daemon = {
      services.yensid = {
        enable = true;
        settings = {
          service = [
            {
              name = "builds";
              listen = [ "127.0.0.20/30" ];
              builders = [
                "b1"
                "b2"
              ];
            }
          ];
          builders.b1 = {
            inherit (builder 0) address;
            host_key = (builder 0).hostKey;
            max_connections = 4;
          };
          builders.b2 = {
            inherit (builder 1) address;
            host_key = (builder 1).hostKey;
            max_connections = 4;
          };
          policy.remote_via = [ "ethernet" ];
          links = builtins.listToAttrs (
            map (pattern: {
              name = pattern;
              value = "ethernet";
            }) ethernetLinks
          );
        };
        client = {
          enable = true;
          inherit sshUser;
        };
      };
    };
    client = daemon;
  };

  # A gateway for thin clients: three builders, round-robin, a policy hook; the
  # clients list its claimed prefix.
  gateway = {
    daemon = {
      services.yensid = {
        enable = true;
        openFirewall = true;
        inherit policyHook;
        settings = {
          service = [
            {
              name = "pool";
              listen = [ "127.0.0.24/30" ];
              strategy = "round-robin";
            }
          ];
          builders = builtins.listToAttrs (
            builtins.genList (i: {
              name = "b${toString (i + 1)}";
              value = {
                inherit (builder i) address;
                host_key = (builder i).hostKey;
                max_connections = 2;
              };
            }) 3
          );
          health.interval = "2s";
        };
      };
    };
    client = {
      services.yensid.client = {
        enable = true;
        prefix = "127.0.0.24/30";
        hostKeys = map (b: b.hostKey) builders;
        capacity = 6;
        inherit sshUser;
      };
    };
  };

  # garnix's module options, unchanged but for `listen`.
  garnix = {
    daemon = {
      yensid.proxy = {
        enable = true;
        listen = [ "127.0.0.28/30" ];
        builders.b1 = {
          ip = ipOf (builder 0).address;
          port = portOf (builder 0).address;
        };
        builders.b2 = {
          ip = ipOf (builder 1).address;
          port = portOf (builder 1).address;
        };
        loadBalancing.strategy = "roundrobin";
      };
    };
    client = {
      services.yensid.client = {
        enable = true;
        prefix = "127.0.0.28/30";
        hostKeys = [
          (builder 0).hostKey
          (builder 1).hostKey
        ];
        capacity = 4;
        inherit sshUser;
      };
    };
  };
}
