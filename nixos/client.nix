# services.yensid.client: this machine's Nix builds through a yensid service, on this
# host (a laptop running the daemon) or on a gateway.
#
# Nix serializes every upload to one machine entry (one lock per store URI), so one
# service address would serialize all uploads to the whole pool. The client therefore
# lists `aliases` machine entries on distinct addresses inside the service's claimed
# prefix; the daemon claims the whole prefix, so each entry reaches the same pool and
# their uploads run side by side. `yensid nix-machines` prints the same lines for
# machines without NixOS.
{
  config,
  lib,
  pkgs,
  ...
}:

let
  inherit (lib) mkOption mkEnableOption mkIf types;
  cfg = config.services.yensid.client;
  daemon = config.services.yensid;
  addresses = import ./addresses.nix { inherit lib; };

  # The service of the daemon on this host that the client uses, if any.
  localService =
    if !daemon.enable then
      null
    else if cfg.service == null then
      lib.head (daemon.settings.service ++ [ null ])
    else
      lib.findFirst (s: s.name == cfg.service) (throw "services.yensid.client.service: no service `${cfg.service}` in services.yensid.settings.service") daemon.settings.service;

  localBuilders =
    if localService == null then
      [ ]
    else
      lib.attrValues (
        if localService.builders == null then
          daemon.settings.builders
        else
          lib.getAttrs (lib.filter (b: daemon.settings.builders ? ${b}) localService.builders) daemon.settings.builders
      );

  # A builder takes max_connections builds at a time; one without a limit counts
  # as many as its weight.
  jobsOf = b: if b.max_connections != null then b.max_connections else (if b.weight != null then b.weight else 1);

  hostName = address: if lib.hasInfix ":" address then "[${address}]" else address;
  knownHostName = address: if cfg.port == 22 then address else "[${address}]:${toString cfg.port}";
in
{
  options.services.yensid.client = {
    enable = mkEnableOption "Nix remote builds through a yensid service";

    service = mkOption {
      type = types.nullOr types.str;
      default = null;
      description = "The local daemon's service to use (default: its first). Ignored when `prefix` or `addresses` are set for a remote gateway.";
    };

    prefix = mkOption {
      type = types.nullOr types.str;
      default = if localService == null then null else lib.head localService.listen;
      defaultText = lib.literalMD "the local service's first `listen` prefix";
      example = "198.18.5.20/30";
      description = "The prefix the service claims (IPv4); the machine entries take its first `aliases` addresses.";
    };

    aliases = mkOption {
      type = types.ints.between 1 256;
      default = 4;
      description = "How many machine entries (distinct addresses in `prefix`) to list, so that up to this many uploads run in parallel.";
    };

    addresses = mkOption {
      type = types.nonEmptyListOf types.str;
      default =
        if cfg.prefix == null then
          throw "services.yensid.client: set `prefix` (the gateway's claimed prefix) or `addresses`, or enable services.yensid on this host"
        else
          addresses.first cfg.prefix cfg.aliases;
      defaultText = lib.literalMD "the first `aliases` addresses of `prefix`";
      description = "The addresses of the machine entries (set them yourself for IPv6).";
    };

    port = mkOption {
      type = types.port;
      default = if localService == null then 22 else localService.port;
      defaultText = lib.literalMD "the local service's port, else 22";
      description = "The service's port (other than 22: set for ssh in /etc/ssh/ssh_config).";
    };

    hostKeys = mkOption {
      type = types.listOf types.str;
      default = lib.filter (k: k != null) (map (b: b.host_key) localBuilders);
      defaultText = lib.literalMD "the local service's builders' `host_key`s";
      description = "Every builder's SSH host public key: each is trusted under every address, so no CA is needed.";
    };

    capacity = mkOption {
      type = types.ints.positive;
      default = lib.max 1 (lib.foldl' (sum: b: sum + jobsOf b) 0 localBuilders);
      defaultText = lib.literalMD "the sum of the local service's builders' `max_connections` (a builder without one counts its weight)";
      description = "How many builds the pool runs at once; each machine entry gets its share as `maxJobs`.";
    };

    sshUser = mkOption {
      type = types.str;
      default = "nix-builder";
      description = "The user Nix logs in as on the builders (`services.yensid.builder.user`).";
    };

    sshKey = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "/root/.ssh/nix-builder";
      description = "The private key the Nix daemon logs in with (default: root's).";
    };

    protocol = mkOption {
      type = types.enum [
        "ssh-ng"
        "ssh"
      ];
      default = "ssh-ng";
      description = "The store protocol Nix speaks to the builders.";
    };

    systems = mkOption {
      type = types.listOf types.str;
      default = [ pkgs.stdenv.hostPlatform.system ];
      defaultText = lib.literalExpression "[ pkgs.stdenv.hostPlatform.system ]";
      description = "The systems the pool builds for.";
    };

    supportedFeatures = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [
        "kvm"
        "big-parallel"
      ];
      description = "Features every builder of the pool supports.";
    };

    speedFactor = mkOption {
      type = types.ints.positive;
      default = 1;
      description = "Nix's speed factor for the pool's entries.";
    };

    machines = mkOption {
      type = types.listOf types.attrs;
      readOnly = true;
      internal = true;
      description = "The `nix.buildMachines` entries this module sets.";
    };
  };

  config = mkIf cfg.enable {
    services.yensid.client.machines = map (address: {
      hostName = hostName address;
      inherit (cfg)
        sshUser
        sshKey
        protocol
        systems
        supportedFeatures
        speedFactor
        ;
      maxJobs = (cfg.capacity + lib.length cfg.addresses - 1) / lib.length cfg.addresses;
    }) cfg.addresses;

    nix.distributedBuilds = true;
    nix.buildMachines = cfg.machines;

    # Every builder's key under every name: ssh accepts a host whose key matches any
    # of several lines for its name.
    programs.ssh.knownHosts = lib.listToAttrs (
      lib.imap1 (i: key: {
        name = "yensid-builder-${toString i}";
        value = {
          hostNames = map knownHostName cfg.addresses;
          publicKey = key;
        };
      }) cfg.hostKeys
    );

    programs.ssh.extraConfig = mkIf (cfg.port != 22) ''
      Host ${lib.concatStringsSep " " cfg.addresses}
        Port ${toString cfg.port}
    '';

    assertions = [
      {
        assertion = cfg.hostKeys != [ ];
        message = "services.yensid.client.hostKeys is empty: set host_key for the builders (services.yensid.settings.builders.<name>.host_key) or list the keys.";
      }
    ];
  };
}
