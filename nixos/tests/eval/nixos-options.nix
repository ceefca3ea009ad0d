# DECLARATIONS MATCHING NIXOS, NOT NIXOS ITSELF.
#
# The options yensid's modules set, declared with the types NixOS gives them
# (nixos/modules/{misc/assertions.nix, system/boot/systemd.nix, config/users-groups.nix,
# system/etc/etc.nix, services/networking/firewall.nix, config/nix-remote-build.nix,
# config/nix.nix, programs/ssh.nix, services/networking/ssh/sshd.nix}), reduced to the
# sub-options the modules use. The full nixpkgs tree cannot be brought onto the
# machines the tests run on; this lets the real module system (lib.evalModules, from
# nixpkgs' lib) type-check and merge what the modules define. A definition NixOS would
# reject for its type is rejected here too; an option NixOS lacks is an error here too.
{ lib, ... }:

let
  inherit (lib) mkOption types;
  freeform =
    options:
    types.submodule {
      freeformType = types.attrsOf types.anything;
      inherit options;
    };
in
{
  options = {
    assertions = mkOption {
      type = types.listOf types.unspecified;
      internal = true;
      default = [ ];
    };
    warnings = mkOption {
      type = types.listOf types.str;
      internal = true;
      default = [ ];
    };

    systemd.services = mkOption {
      default = { };
      type = types.attrsOf (
        types.submodule {
          options = {
            description = mkOption {
              type = types.str;
              default = "";
            };
            wantedBy = mkOption {
              type = types.listOf types.str;
              default = [ ];
            };
            after = mkOption {
              type = types.listOf types.str;
              default = [ ];
            };
            reloadTriggers = mkOption {
              type = types.listOf types.unspecified;
              default = [ ];
            };
            restartTriggers = mkOption {
              type = types.listOf types.unspecified;
              default = [ ];
            };
            reloadIfChanged = mkOption {
              type = types.bool;
              default = false;
            };
            # NixOS: attrsOf unitOption, a value or a list of values.
            serviceConfig = mkOption {
              type = types.attrsOf (
                types.oneOf [
                  types.bool
                  types.int
                  types.str
                  types.path
                  (types.listOf (
                    types.oneOf [
                      types.bool
                      types.int
                      types.str
                      types.path
                    ]
                  ))
                ]
              );
              default = { };
            };
          };
        }
      );
    };

    users.users = mkOption {
      default = { };
      type = types.attrsOf (
        types.submodule {
          options = {
            isSystemUser = mkOption {
              type = types.bool;
              default = false;
            };
            group = mkOption {
              type = types.str;
              default = "";
            };
            description = mkOption {
              type = types.str;
              default = "";
            };
            useDefaultShell = mkOption {
              type = types.bool;
              default = false;
            };
            extraGroups = mkOption {
              type = types.listOf types.str;
              default = [ ];
            };
            openssh.authorizedKeys.keys = mkOption {
              type = types.listOf types.singleLineStr;
              default = [ ];
            };
            openssh.authorizedKeys.keyFiles = mkOption {
              type = types.listOf types.path;
              default = [ ];
            };
          };
        }
      );
    };
    users.groups = mkOption {
      default = { };
      type = types.attrsOf (types.submodule { });
    };

    environment.etc = mkOption {
      default = { };
      type = types.attrsOf (
        types.submodule {
          options.source = mkOption { type = types.path; };
        }
      );
    };

    networking.firewall.allowedTCPPorts = mkOption {
      type = types.listOf types.port;
      default = [ ];
    };

    nix.distributedBuilds = mkOption {
      type = types.bool;
      default = false;
    };
    nix.buildMachines = mkOption {
      default = [ ];
      type = types.listOf (
        types.submodule {
          options = {
            hostName = mkOption { type = types.str; };
            protocol = mkOption {
              type = types.enum [
                null
                "ssh"
                "ssh-ng"
              ];
              default = "ssh";
            };
            systems = mkOption {
              type = types.listOf types.str;
              default = [ ];
            };
            sshUser = mkOption {
              type = types.nullOr types.str;
              default = null;
            };
            sshKey = mkOption {
              type = types.nullOr types.str;
              default = null;
            };
            maxJobs = mkOption {
              type = types.int;
              default = 1;
            };
            speedFactor = mkOption {
              type = types.int;
              default = 1;
            };
            supportedFeatures = mkOption {
              type = types.listOf types.str;
              default = [ ];
            };
            mandatoryFeatures = mkOption {
              type = types.listOf types.str;
              default = [ ];
            };
            publicHostKey = mkOption {
              type = types.nullOr types.str;
              default = null;
            };
          };
        }
      );
    };
    nix.settings = mkOption {
      default = { };
      type = freeform {
        trusted-users = mkOption {
          type = types.listOf types.str;
          default = [ "root" ];
        };
      };
    };

    programs.ssh.knownHosts = mkOption {
      default = { };
      type = types.attrsOf (
        types.submodule (
          { name, ... }:
          {
            options = {
              certAuthority = mkOption {
                type = types.bool;
                default = false;
              };
              hostNames = mkOption {
                type = types.listOf types.str;
                default = [ name ];
              };
              publicKey = mkOption {
                type = types.nullOr types.singleLineStr;
                default = null;
              };
            };
          }
        )
      );
    };
    programs.ssh.extraConfig = mkOption {
      type = types.lines;
      default = "";
    };

    services.openssh.enable = mkOption {
      type = types.bool;
      default = false;
    };
    services.openssh.settings = mkOption {
      default = { };
      type = freeform {
        MaxStartups = mkOption {
          type = types.nullOr types.str;
          default = null;
        };
      };
    };
  };
}
