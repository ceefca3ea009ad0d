# Evaluates yensid's modules for one machine with nixpkgs' real module system and
# returns, as JSON-able values, what the tests feed to the real daemon and Nix:
#  - settings: the configuration file's content (services.yensid.finalSettings);
#  - machines: the /etc/nix/machines lines NixOS writes for nix.buildMachines;
#  - knownHosts: the ssh_known_hosts lines NixOS writes for programs.ssh.knownHosts;
#  - unit, builderUser, sshdSettings, trustedUsers, firewall: for the assertions.
# Failed assertions throw, the way NixOS's toplevel does.
{
  lib,
  system ? "x86_64-linux",
  machine,
}:
let
  # The flake's modules, as a system imports them (both: the keys make that work).
  # Only `lib` of the nixpkgs input is used while the modules are evaluated.
  flake = (import ../../../flake.nix).outputs {
    self = flake;
    nixpkgs = { inherit lib; };
  };
  evaluated = lib.evalModules {
    modules = [
      flake.nixosModules.default
      flake.nixosModules.garnix-compat
      ./nixos-options.nix
      {
        _module.args.pkgs = import ./pkgs-stub.nix { inherit lib system; };
        # As the flake's nixosModules.default does with the built package; here a
        # derivation-shaped value, since the package cannot be built by Nix here.
        services.yensid.package = {
          type = "derivation";
          name = "yensid";
          outPath = "/nix/store/not-built-in-this-test-yensid";
        };
      }
      machine
    ];
  };
  config = evaluated.config;
  failed = map (a: a.message) (lib.filter (a: !a.assertion) config.assertions);

  # nixos/modules/config/nix-remote-build.nix: one line per machine.
  orDash = list: if list == [ ] then "-" else lib.concatStringsSep "," list;
  machineLine =
    m:
    lib.concatStringsSep " " [
      "${if m.protocol == null then "" else "${m.protocol}://"}${lib.optionalString (m.sshUser != null) "${m.sshUser}@"}${m.hostName}"
      (orDash m.systems)
      (if m.sshKey == null then "-" else m.sshKey)
      (toString m.maxJobs)
      (toString m.speedFactor)
      (orDash m.supportedFeatures)
      (orDash m.mandatoryFeatures)
      (if m.publicHostKey == null then "-" else m.publicHostKey)
    ];
  # nixos/modules/programs/ssh.nix: "<names> <key>" per entry.
  knownHostLine = h: "${lib.concatStringsSep "," h.hostNames} ${h.publicKey}";
in
if failed != [ ] then
  throw "Failed assertions:\n${lib.concatMapStringsSep "\n" (m: "- ${m}") failed}"
else
  {
    settings = if config.services.yensid.enable then config.services.yensid.finalSettings else null;
    machines = map machineLine config.nix.buildMachines;
    knownHosts = map knownHostLine (lib.attrValues config.programs.ssh.knownHosts);
    distributedBuilds = config.nix.distributedBuilds;
    unit = config.systemd.services.yensid or null;
    firewall = config.networking.firewall.allowedTCPPorts;
    trustedUsers = config.nix.settings.trusted-users;
    sshdSettings = config.services.openssh.settings;
    users = lib.mapAttrs (_: u: { inherit (u) isSystemUser extraGroups useDefaultShell; keys = u.openssh.authorizedKeys.keys; }) config.users.users;
  }
