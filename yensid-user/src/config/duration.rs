//! Durations in the configuration file and on the command line.

use std::time::Duration;

/// The longest any timing key of the configuration file may be
/// (`[health]` and `[policy]` durations): one day. Longer probe intervals,
/// timeouts or hook intervals mean a builder or a hook nobody watches.
pub const MAX_CONFIG_DURATION: Duration = Duration::from_secs(86_400);

/// The longest `yensid mode ... --for`: 365 days. An override meant to last
/// longer is one without `--for`.
pub const MAX_OVERRIDE: Duration = Duration::from_secs(365 * 86_400);

/// `"500ms"`, `"5s"`, `"2m"`, `"1h"`, `"1d"`, or a combination like
/// `"1m30s"`. Sums and unit conversions are checked: a duration that does
/// not fit is an error, never a panic or a shorter duration.
///
/// Parsed here rather than by `humantime` (or `jiff`'s friendly format),
/// because the grammar is meant to be this narrow: whole milliseconds to
/// days, no spaces, no months or years of inexact length. It is exactly
/// what [`describe_duration`] prints, so every duration the daemon shows
/// (in `status`, the log, errors) reads back as the same value.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("`{text}` is not a duration (examples: 500ms, 5s, 2m, 1h, 1d, 1m30s)");
    let too_long = || format!("`{text}` is too long a duration");
    let mut total = Duration::ZERO;
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        if digits == 0 {
            return Err(bad());
        }
        // Only digits: a parse error is an overflow.
        let value: u64 = rest[..digits].parse().map_err(|_| too_long())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let millis_per_unit: u64 = match &rest[..unit_len] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(bad()),
        };
        let part = value
            .checked_mul(millis_per_unit)
            .map(Duration::from_millis)
            .ok_or_else(too_long)?;
        total = total.checked_add(part).ok_or_else(too_long)?;
        rest = &rest[unit_len..];
    }
    Ok(total)
}

/// [`parse_duration`] for a value that must be longer than zero (an
/// interval of zero would spin or panic) and at most `max`.
pub fn parse_bounded_duration(text: &str, max: Duration) -> Result<Duration, String> {
    match parse_duration(text)? {
        d if d.is_zero() => Err("must be longer than zero".to_owned()),
        d if d > max => Err(format!(
            "`{text}` is longer than the maximum of {}",
            describe_duration(max)
        )),
        d => Ok(d),
    }
}

/// A whole duration in the largest unit that divides it: `1d`, `90s`.
pub fn describe_duration(d: Duration) -> String {
    let ms = d.as_millis();
    for (unit, per) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
    ] {
        if ms.is_multiple_of(per) && ms >= per {
            return format!("{}{unit}", ms / per);
        }
    }
    format!("{ms}ms")
}
