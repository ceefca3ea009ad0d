# The first `count` IPv4 addresses of a prefix ("a.b.c.d/len"): the alias addresses a
# Nix client lists as separate machine entries. Pure lib, so the client module and
# the tests compute the same list; `yensid nix-machines` computes it in Rust.
# IPv6 prefixes are not expanded here: list the addresses yourself.
{ lib }:
let
  parse =
    prefix:
    let
      parts = lib.splitString "/" prefix;
      octets = lib.splitString "." (lib.head parts);
    in
    if lib.length parts != 2 || lib.length octets != 4 then
      throw "`${prefix}` is not an IPv4 prefix like 127.0.0.20/30; for IPv6 list the addresses yourself"
    else
      {
        address = lib.foldl' (acc: octet: acc * 256 + lib.toInt octet) 0 octets;
        length = lib.toInt (lib.elemAt parts 1);
      };
  pow2 = n: if n == 0 then 1 else 2 * pow2 (n - 1);
  show =
    n:
    lib.concatMapStringsSep "." toString [
      (n / 16777216)
      (lib.mod (n / 65536) 256)
      (lib.mod (n / 256) 256)
      (lib.mod n 256)
    ];
in
{
  # How many addresses the prefix holds.
  size = prefix: pow2 (32 - (parse prefix).length);

  first =
    prefix: count:
    let
      p = parse prefix;
      size = pow2 (32 - p.length);
    in
    map (i: show (p.address + i)) (lib.range 0 ((lib.min count size) - 1));
}
