# services.yensid.builder: a builder of a yensid pool. Nix clients log in over SSH as
# `user`, which is a trusted Nix user (it may build derivations the store does not
# know) without being in `wheel`. sshd's MaxStartups is raised: a pool's clients open
# many connections at once (one per build), and sshd's default (10:30:100) starts
# dropping them at 10 unauthenticated ones. No CA: clients trust the host key itself.
{ config, lib, ... }:

let
  inherit (lib) mkOption mkEnableOption mkIf types;
  cfg = config.services.yensid.builder;
in
{
  options.services.yensid.builder = {
    enable = mkEnableOption "this machine as a builder of a yensid pool";

    user = mkOption {
      type = types.str;
      default = "nix-builder";
      description = "The user Nix clients log in as.";
    };

    authorizedKeys = mkOption {
      type = types.listOf types.str;
      default = [ ];
      description = "SSH public keys of the clients (the Nix daemon's key on each client or gateway).";
    };

    authorizedKeyFiles = mkOption {
      type = types.listOf types.path;
      default = [ ];
      description = "Files of SSH public keys of the clients.";
    };

    maxStartups = mkOption {
      type = types.str;
      default = "128:30:512";
      description = "sshd's MaxStartups (start:rate:full): unauthenticated connections before sshd starts dropping new ones.";
    };
  };

  config = mkIf cfg.enable {
    users.users.${cfg.user} = {
      isSystemUser = true;
      group = cfg.user;
      description = "Nix remote builds (yensid pool)";
      # Nix runs `nix-daemon --stdio` (ssh-ng) or `nix-store --serve` (ssh) through it.
      useDefaultShell = true;
      openssh.authorizedKeys.keys = cfg.authorizedKeys;
      openssh.authorizedKeys.keyFiles = cfg.authorizedKeyFiles;
    };
    users.groups.${cfg.user} = { };

    nix.settings.trusted-users = [ cfg.user ];

    services.openssh.enable = true;
    services.openssh.settings.MaxStartups = cfg.maxStartups;

    assertions = [
      {
        assertion = cfg.authorizedKeys != [ ] || cfg.authorizedKeyFiles != [ ];
        message = "services.yensid.builder: no client may log in; set authorizedKeys or authorizedKeyFiles.";
      }
    ];
  };
}
