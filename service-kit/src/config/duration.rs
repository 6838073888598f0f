//! The one duration format of every configuration file: `250ms`, `10s`,
//! `5m`, `1h`, or `0`.

use std::time::Duration;

/// Parses `250ms`, `10s`, `5m`, `1h` (and `0`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits.parse().map_err(|_| format!("{text:?} is not a duration like 500ms, 10s, 5m or 1h"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.checked_mul(60).ok_or_else(|| format!("{text:?} is too long"))?),
        "h" => Duration::from_secs(n.checked_mul(3600).ok_or_else(|| format!("{text:?} is too long"))?),
        _ => return Err(format!("{text:?} is not a duration like 500ms, 10s, 5m or 1h")),
    };
    Ok(d)
}

/// The unit of an old spelling of a duration key (`stall_timeout_ms = 3000`,
/// `ttl_secs = 600`), still read so that no operator's file breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Legacy {
    /// `<key>_ms`, an integer of milliseconds.
    Millis,
    /// `<key>_secs`, an integer of seconds.
    Secs,
}

impl Legacy {
    /// The old key's suffix.
    pub fn suffix(self) -> &'static str {
        match self {
            Legacy::Millis => "_ms",
            Legacy::Secs => "_secs",
        }
    }

    /// The old key's value, when the file has it, for `Checker::duration_in`.
    pub fn of(self, old: &Option<toml::Spanned<u64>>) -> Option<(Legacy, &toml::Spanned<u64>)> {
        old.as_ref().map(|o| (self, o))
    }

    /// The duration an old integer value meant.
    pub fn duration(self, n: u64) -> Duration {
        match self {
            Legacy::Millis => Duration::from_millis(n),
            Legacy::Secs => Duration::from_secs(n),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration(" 0 ").unwrap(), Duration::ZERO);
        assert!(parse_duration("2 minutes").is_err());
        assert!(parse_duration("3").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn a_duration_too_long_is_an_error_not_an_overflow() {
        assert!(parse_duration("307445734561825861m").is_err());
        assert!(parse_duration("5124095576030432h").is_err());
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
    }
}
