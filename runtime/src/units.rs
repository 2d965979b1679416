//! Parsing of the two value syntaxes users already know from Kubernetes and Go:
//! memory quantities (`64Mi`, `1G`, `512k`) and durations (`250ms`, `30s`, `1h30m`).
//!
//! Both parsers are strict: anything they do not fully understand is an error, never a
//! best guess, because a misread limit is a limit that does not hold.

use std::fmt;
use std::time::Duration;

/// Why a value could not be read. The caller adds which key or flag it came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UnitError(String);

const BINARY_SUFFIXES: [(&str, u32); 6] = [
    ("Ki", 1),
    ("Mi", 2),
    ("Gi", 3),
    ("Ti", 4),
    ("Pi", 5),
    ("Ei", 6),
];
const DECIMAL_SUFFIXES: [(&str, u32); 6] =
    [("k", 1), ("M", 2), ("G", 3), ("T", 4), ("P", 5), ("E", 6)];

/// Parses a Kubernetes memory quantity into bytes: a whole number with an optional binary
/// (`Ki`..`Ei`) or decimal (`k`..`E`) suffix, or a decimal fraction that comes out to whole
/// bytes (`1.5Gi`). Milli-units and exponents are refused: they are legal Kubernetes
/// quantities but never a sensible memory size, and refusing them is clearer than rounding.
pub fn parse_memory(text: &str) -> Result<u64, UnitError> {
    let expected = || {
        UnitError(format!(
            "expected a memory quantity such as 64Mi, 1Gi or 512000000, got {text:?}"
        ))
    };
    let text_trimmed = text.trim();
    let (number, multiplier) = split_memory_suffix(text_trimmed).ok_or_else(expected)?;
    if number.is_empty() || number.starts_with('.') || number.ends_with('.') {
        return Err(expected());
    }
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if !whole.bytes().all(|b| b.is_ascii_digit()) || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return Err(expected());
    }
    let too_large = || UnitError(format!("memory quantity {text:?} is too large"));
    let whole: u128 = whole.parse().map_err(|_| too_large())?;
    let mut bytes = whole.checked_mul(multiplier).ok_or_else(too_large)?;
    if !fraction.is_empty() {
        if fraction.len() > 18 {
            return Err(expected());
        }
        let scale = 10u128.pow(fraction.len() as u32);
        let numerator: u128 = fraction.parse().map_err(|_| expected())?;
        let scaled = numerator.checked_mul(multiplier).ok_or_else(too_large)?;
        if scaled % scale != 0 {
            return Err(UnitError(format!(
                "memory quantity {text:?} is not a whole number of bytes"
            )));
        }
        bytes = bytes.checked_add(scaled / scale).ok_or_else(too_large)?;
    }
    u64::try_from(bytes).map_err(|_| too_large())
}

fn split_memory_suffix(text: &str) -> Option<(&str, u128)> {
    for (suffix, power) in BINARY_SUFFIXES {
        if let Some(number) = text.strip_suffix(suffix) {
            return Some((number, 1024u128.pow(power)));
        }
    }
    for (suffix, power) in DECIMAL_SUFFIXES {
        if let Some(number) = text.strip_suffix(suffix) {
            return Some((number, 1000u128.pow(power)));
        }
    }
    if text.ends_with(|c: char| c.is_ascii_alphabetic()) {
        return None;
    }
    Some((text, 1))
}

/// Formats a byte count the way a Kubernetes user writes it: the largest binary suffix
/// that divides it exactly (`16Mi`), else plain bytes.
pub fn format_memory(bytes: u64) -> String {
    for (suffix, power) in BINARY_SUFFIXES.iter().rev() {
        let unit = 1024u64.pow(*power);
        if bytes >= unit && bytes.is_multiple_of(unit) {
            return format!("{}{suffix}", bytes / unit);
        }
    }
    bytes.to_string()
}

/// Formats a byte count for a message: exactly where a binary suffix divides it (`16Mi`),
/// else to a tenth of the largest suffix it reaches (`17.6Mi`).
pub fn format_size(bytes: u64) -> String {
    for (suffix, power) in BINARY_SUFFIXES.iter().rev() {
        let unit = 1024u64.pow(*power);
        if bytes >= unit {
            return match bytes.is_multiple_of(unit) {
                true => format!("{}{suffix}", bytes / unit),
                false => format!("{:.1}{suffix}", bytes as f64 / unit as f64),
            };
        }
    }
    bytes.to_string()
}

/// Parses a duration in Go's syntax (as Kubernetes users write them): one or more
/// `<number><unit>` parts, units `ns`, `us`, `ms`, `s`, `m`, `h`, e.g. `250ms`, `30s`,
/// `1h30m`, `1.5s`. A bare number is refused: `30` could mean anything.
pub fn parse_duration(text: &str) -> Result<Duration, UnitError> {
    let expected = || {
        UnitError(format!(
            "expected a duration such as 250ms, 30s, 5m or 1h30m, got {text:?}"
        ))
    };
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(expected());
    }
    let mut total_nanos: u128 = 0;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(expected)?;
        let (number, after) = rest.split_at(number_len);
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        let unit_nanos: u128 = match unit {
            "ns" => 1,
            "us" | "µs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => return Err(expected()),
        };
        total_nanos = total_nanos
            .checked_add(scale_decimal(number, unit_nanos).ok_or_else(expected)?)
            .ok_or_else(expected)?;
        rest = after;
    }
    let secs = u64::try_from(total_nanos / 1_000_000_000).map_err(|_| expected())?;
    Ok(Duration::new(secs, (total_nanos % 1_000_000_000) as u32))
}

/// `number * unit` for a decimal `number` like `1.5`, truncated to whole nanoseconds.
fn scale_decimal(number: &str, unit: u128) -> Option<u128> {
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() {
        return None;
    }
    if fraction.contains('.') || fraction.len() > 18 {
        return None;
    }
    let whole: u128 = if whole.is_empty() {
        0
    } else {
        whole.parse().ok()?
    };
    let mut value = whole.checked_mul(unit)?;
    if !fraction.is_empty() {
        let scale = 10u128.pow(fraction.len() as u32);
        let numerator: u128 = fraction.parse().ok()?;
        value = value.checked_add(numerator.checked_mul(unit)? / scale)?;
    }
    Some(value)
}

/// Formats a duration compactly in the units it was most likely written in.
pub fn format_duration(duration: Duration) -> String {
    let nanos = duration.as_nanos();
    const UNITS: [(u128, &str); 6] = [
        (3_600_000_000_000, "h"),
        (60_000_000_000, "m"),
        (1_000_000_000, "s"),
        (1_000_000, "ms"),
        (1_000, "us"),
        (1, "ns"),
    ];
    if nanos == 0 {
        return "0s".to_string();
    }
    let mut out = String::new();
    let mut rest = nanos;
    for (unit, name) in UNITS {
        if rest >= unit {
            out.push_str(&format!("{}{name}", rest / unit));
            rest %= unit;
        }
    }
    out
}

/// A byte count that displays as a Kubernetes quantity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bytes(pub u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_memory(self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_quantities() {
        assert_eq!(parse_memory("64Mi"), Ok(64 << 20));
        assert_eq!(parse_memory("1Gi"), Ok(1 << 30));
        assert_eq!(parse_memory("1.5Gi"), Ok(3 << 29));
        assert_eq!(parse_memory("512k"), Ok(512_000));
        assert_eq!(parse_memory("2G"), Ok(2_000_000_000));
        assert_eq!(parse_memory("4096"), Ok(4096));
        assert_eq!(parse_memory(" 16Mi "), Ok(16 << 20));
    }

    #[test]
    fn malformed_memory_is_refused() {
        for bad in [
            "", "Mi", "64MB", "64mi", "-1Mi", "1e9", "100m", "0.1", "1..5Gi", ".5Gi", "5.Gi",
            "1 Gi", "64Xi",
        ] {
            let error = parse_memory(bad).expect_err(bad);
            assert!(error.to_string().contains(&format!("{bad:?}")), "{error}");
        }
        assert!(parse_memory("20Ei").is_err());
        assert!(parse_memory("99999999999999999999999999999999999999999").is_err());
    }

    #[test]
    fn memory_formats_back() {
        assert_eq!(format_memory(64 << 20), "64Mi");
        assert_eq!(format_size(64 << 20), "64Mi");
        assert_eq!(format_size(18_412_474), "17.6Mi");
        assert_eq!(format_size(1000), "1000");
        assert_eq!(format_size(18944 << 10), "18.5Mi");
        assert_eq!(format_memory(1 << 30), "1Gi");
        assert_eq!(format_memory(1000), "1000");
        assert_eq!(format_memory(1536), "1536");
        assert_eq!(format_memory(3 << 29), "1536Mi");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("10us"), Ok(Duration::from_micros(10)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn malformed_durations_are_refused() {
        for bad in [
            "",
            "30",
            "s",
            "5 m",
            "5min",
            "1.2.3s",
            "-5s",
            "1d",
            "ms5",
            "99999999999999999999h",
        ] {
            let error = parse_duration(bad).expect_err(bad);
            assert!(error.to_string().contains(&format!("{bad:?}")), "{error}");
        }
    }

    #[test]
    fn durations_format_back() {
        assert_eq!(format_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(format_duration(Duration::from_secs(5400)), "1h30m");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1s500ms");
    }
}
