# yensid's NixOS modules: the daemon (`services.yensid`), the Nix client wired to
# it (`services.yensid.client`) and a builder of its pool (`services.yensid.builder`).
# The flake's `nixosModules.default` is this plus the package.
{
  imports = [
    ./daemon.nix
    ./client.nix
    ./builder.nix
  ];
}
