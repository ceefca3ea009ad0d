{
  description = "yensid: a kernel-level redirector for Nix remote builds";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
    in
    {
      overlays.default = final: _prev: {
        yensid = final.callPackage ./nix/package.nix { };
      };

      packages = forAllSystems (pkgs: rec {
        yensid = pkgs.callPackage ./nix/package.nix { };
        default = yensid;
      });

      # The module takes its package from `pkgs.yensid` when the overlay is applied,
      # else from this flake. The keys let a system import both modules: the module
      # system imports a keyed module once.
      nixosModules = {
        default = {
          key = "yensid#nixosModules.default";
          imports = [
            ./nixos
            (
              { pkgs, lib, ... }:
              {
                services.yensid.package = lib.mkDefault (
                  pkgs.yensid or self.packages.${pkgs.stdenv.hostPlatform.system}.default
                );
              }
            )
          ];
        };
        garnix-compat = {
          key = "yensid#nixosModules.garnix-compat";
          imports = [
            self.nixosModules.default
            ./nixos/garnix-compat.nix
          ];
        };
      };

      checks = forAllSystems (pkgs: {
        package = self.packages.${pkgs.stdenv.hostPlatform.system}.default;
        # The example configurations of the tests (nixos/tests/examples.nix) built as
        # NixOS systems: each daemon's configuration file is validated by
        # `yensid check-config` while the system is built.
        module-evaluation =
          let
            system =
              module:
              (nixpkgs.lib.nixosSystem {
                inherit (pkgs.stdenv.hostPlatform) system;
                modules = [
                  self.nixosModules.garnix-compat
                  module
                  {
                    boot.loader.grub.enable = false;
                    fileSystems."/".device = "none";
                    system.stateVersion = "25.11";
                  }
                ];
              }).config.system.build.toplevel;
          in
          pkgs.linkFarm "yensid-module-evaluation" (
            lib.concatLists (
              lib.mapAttrsToList (name: example: [
                {
                  name = "${name}-daemon";
                  path = system example.daemon;
                }
                {
                  name = "${name}-client";
                  path = system example.client;
                }
              ]) (import ./nixos/tests/examples.nix { })
            )
          );
        vm = pkgs.testers.runNixOSTest (import ./nixos/tests/vm.nix { yensid = self; });
      });
    };
}
