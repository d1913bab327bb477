//! Durations in the config file are written the way operators write them: `500ms`, `2s`, `1m`, `90d`.
//! A bare number is refused because its unit would be a guess.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A [`Duration`] read from and written back to `"<number><unit>"` text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl Dur {
    pub const fn ms(ms: u64) -> Dur {
        Dur(Duration::from_millis(ms))
    }
}

pub fn parse(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let bad = || {
        format!("invalid duration {text:?}: write a whole number and a unit: ms, s, m, h or d (e.g. 500ms, 2s, 90d)")
    };
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let ms_per = match unit.trim() {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(bad()),
    };
    n.checked_mul(ms_per)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("duration {text:?} is too long"))
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms != 0 && ms % 3_600_000 == 0 {
            write!(f, "{}h", ms / 3_600_000)
        } else if ms != 0 && ms % 60_000 == 0 {
            write!(f, "{}m", ms / 60_000)
        } else if ms % 1_000 == 0 {
            write!(f, "{}s", ms / 1_000)
        } else {
            write!(f, "{ms}ms")
        }
    }
}

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        parse(&text).map(Dur).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_parse_and_print_back() {
        for (text, ms, shown) in [
            ("500ms", 500, "500ms"),
            ("2s", 2_000, "2s"),
            ("90s", 90_000, "90s"),
            ("1m", 60_000, "1m"),
            ("2h", 7_200_000, "2h"),
            ("0s", 0, "0s"),
        ] {
            let d = parse(text).unwrap();
            assert_eq!(d, Duration::from_millis(ms), "{text}");
            assert_eq!(Dur(d).to_string(), shown);
        }
    }

    #[test]
    fn numbers_without_units_and_unknown_units_are_refused() {
        for text in ["5", "5 seconds", "s", "-1s", "1.5s", "", "3w"] {
            let e = parse(text).unwrap_err();
            assert!(e.contains("invalid duration"), "{text}: {e}");
        }
    }
}
