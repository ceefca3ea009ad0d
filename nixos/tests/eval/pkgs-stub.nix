# THE ONLY STUB: the few `pkgs` attributes the modules touch, because nixpkgs' package
# set cannot be brought onto the machines the tests run on (nixpkgs' lib can).
#  - formats.toml: its `type` is the one nixpkgs' pkgs/pkgs-lib/formats.nix declares;
#    its `generate` would run remarshal in a derivation, which cannot be built here.
#    The tests take the settings out of the evaluation as JSON instead
#    (services.yensid.finalSettings) and write the TOML with Rust's toml crate, then
#    run `yensid check-config` on it: the same check the module's derivation runs.
#  - runCommand, writeShellScript, coreutils: derivations; here they evaluate to
#    strings naming what would be built, and nothing the tests check reads them.
{ lib, system }:
let
  tomlValue =
    with lib.types;
    let
      valueType =
        nullOr (oneOf [
          bool
          int
          float
          str
          path
          (attrsOf valueType)
          (listOf valueType)
        ])
        // {
          description = "TOML value";
        };
    in
    valueType;
  notBuilt = what: "/nix/store/not-built-in-this-test-${what}";
in
{
  formats.toml = _: {
    type = tomlValue;
    generate = name: _value: notBuilt name;
  };
  runCommand = name: _env: _script: notBuilt name;
  writeShellScript = name: _text: notBuilt name;
  coreutils = notBuilt "coreutils";
  stdenv.hostPlatform.system = system;
}
