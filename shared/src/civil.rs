//! Unix time as a UTC calendar date and time, without a date crate: the data plane's access log
//! and the agent's command line print times with it.

/// A UTC date and time of day, to the second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Civil {
    pub year: i64,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
}

impl Civil {
    /// The calendar time `secs` seconds after 1970-01-01T00:00:00Z (before it when negative).
    pub fn from_unix(secs: i64) -> Civil {
        let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
        // Howard Hinnant's days-to-civil.
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        Civil {
            year: yoe + era * 400 + i64::from(month <= 2),
            month,
            day,
            hour: (rem / 3600) as u32,
            minute: (rem % 3600 / 60) as u32,
            second: (rem % 60) as u32,
        }
    }

    /// `YYYY-MM-DDTHH:MM:SSZ`.
    pub fn rfc3339(&self) -> String {
        format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            self.year, self.month, self.day, self.hour, self.minute, self.second
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_the_calendars() {
        // 2000-02-29 is the leap day of a century year.
        assert_eq!(
            Civil::from_unix(951_782_400),
            Civil {
                year: 2000,
                month: 2,
                day: 29,
                hour: 0,
                minute: 0,
                second: 0
            }
        );
        assert_eq!(Civil::from_unix(0).rfc3339(), "1970-01-01T00:00:00Z");
        assert_eq!(
            Civil::from_unix(1_796_148_123).rfc3339(),
            "2026-12-01T18:02:03Z"
        );
        assert_eq!(
            Civil::from_unix(1_796_136_061).rfc3339(),
            "2026-12-01T14:41:01Z"
        );
        assert_eq!(Civil::from_unix(-1).rfc3339(), "1969-12-31T23:59:59Z");
        // Every day of a few years turns over at midnight into the next date.
        for day in 0..(4 * 366) {
            let last = Civil::from_unix(day * 86_400 + 86_399);
            let next = Civil::from_unix((day + 1) * 86_400);
            assert_eq!((last.hour, last.minute, last.second), (23, 59, 59));
            assert_eq!((next.hour, next.day == 1), (0, next.day < last.day));
        }
    }
}
