//! Durations (`"250ms"`, `"3s"`, `"10m"`) and sizes (`"64KiB"`) as written in the config.

use std::time::Duration;

/// Parses a duration such as `"250ms"`, `"3s"`, `"1m30s"`, `"2h"`.
///
/// A bare number is refused: without a unit it is ambiguous.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("empty duration".into());
    }
    if t.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "duration {s:?} has no unit: write e.g. \"{t}s\" or \"{t}ms\""
        ));
    }
    let d = humantime::parse_duration(t).map_err(|e| format!("bad duration {s:?}: {e}"))?;
    if d > crate::clock::MAX_DURATION {
        return Err(format!(
            "duration {s:?} is longer than the longest allowed, \"3650d\" (ten years)"
        ));
    }
    Ok(d)
}

/// Parses a size such as `"64KiB"`, `"1MiB"`, `"256KB"` or `"4096"` (bytes).
///
/// `KiB`/`MiB`/`GiB` are powers of 1024, `KB`/`MB`/`GB` powers of 1000.
pub fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(format!(
            "bad size {s:?}: expected a number with a unit such as \"64KiB\""
        ));
    }
    let n: u64 = num
        .parse()
        .map_err(|_| format!("bad size {s:?}: number too large"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "KiB" | "K" | "k" => 1 << 10,
        "MiB" | "M" => 1 << 20,
        "GiB" | "G" => 1 << 30,
        other => {
            return Err(format!(
                "bad size {s:?}: unknown unit {other:?} (use B, KiB, MiB, GiB, KB, MB, GB)"
            ));
        }
    };
    n.checked_mul(mult)
        .and_then(|v| usize::try_from(v).ok())
        .ok_or_else(|| format!("bad size {s:?}: too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("3s").unwrap(), Duration::from_secs(3));
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert!(parse_duration("10").unwrap_err().contains("no unit"));
        assert!(parse_duration("ten seconds").is_err());
        assert!(parse_duration("").is_err());
        assert_eq!(parse_duration("3650d").unwrap(), crate::clock::MAX_DURATION);
        assert!(
            parse_duration("3651d")
                .unwrap_err()
                .contains("longest allowed")
        );
        // humantime's own overflow is an error, not a panic.
        assert!(parse_duration("300000000000y").is_err());
        assert!(parse_duration("99999999999999999999999s").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64KiB").unwrap(), 65536);
        assert_eq!(parse_size("256KiB").unwrap(), 262144);
        assert_eq!(parse_size("1MiB").unwrap(), 1 << 20);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("2KB").unwrap(), 2000);
        assert!(parse_size("KiB").is_err());
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("99999999999999999999GiB").is_err());
    }
}
