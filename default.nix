# For users without flakes: `nix-build` builds the package with the nixpkgs on
# NIX_PATH; the modules are at ./nixos (add `imports = [ <yensid/nixos> ];` or a path).
{
  pkgs ? import <nixpkgs> { },
}:
pkgs.callPackage ./nix/package.nix { }
