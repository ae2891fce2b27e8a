//! One clock for the whole soak, and what the churn did on it: the context a failed request is
//! judged in.
use std::{
    sync::Mutex,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

/// Times since the load started, and their wall-clock equivalent (the agent logs in UTC).
pub struct Clock {
    start: Instant,
    wall: SystemTime,
}

impl Clock {
    pub fn start() -> Self {
        Self {
            start: Instant::now(),
            wall: SystemTime::now(),
        }
    }

    pub fn now(&self) -> Duration {
        self.start.elapsed()
    }

    pub fn at(&self, instant: Instant) -> Duration {
        instant.saturating_duration_since(self.start)
    }

    /// `at` as the agent's log prints it (`2026-01-02T03:04:05.678901Z`), so that log lines
    /// compare with it as text.
    pub fn log_time(&self, at: Duration) -> String {
        utc_text(self.wall + at)
    }
}

/// `t=12.345s`: how every time of the soak is printed.
pub fn show(at: Duration) -> String {
    format!("t={:.3}s", at.as_secs_f64())
}

/// The churn's changes, each with when it happened.
#[derive(Default)]
pub struct Events(Mutex<Vec<(Duration, String)>>);

impl Events {
    pub fn record(&self, at: Duration, what: String) {
        self.0.lock().unwrap().push((at, what));
    }

    /// The changes between `from` and `to` that concern `service` (by name), in order.
    pub fn between(&self, from: Duration, to: Duration, service: &str) -> Vec<(Duration, String)> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|(at, what)| (from..=to).contains(at) && what.starts_with(service))
            .cloned()
            .collect()
    }
}

/// RFC 3339 in UTC with microseconds, as tracing-subscriber writes it.
fn utc_text(time: SystemTime) -> String {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let seconds = since.as_secs();
    let (days, of_day) = (seconds / 86_400, seconds % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        of_day / 3600,
        of_day / 60 % 60,
        of_day % 60,
        since.subsec_micros()
    )
}

/// The Gregorian date of a day counted from 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * shifted_month + 2) / 5 + 1) as u32;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_text_matches_known_dates() {
        assert_eq!(utc_text(UNIX_EPOCH), "1970-01-01T00:00:00.000000Z");
        // 2024-02-29T12:34:56.789012Z, a leap day.
        let leap = UNIX_EPOCH + Duration::from_micros(1_709_210_096_789_012);
        assert_eq!(utc_text(leap), "2024-02-29T12:34:56.789012Z");
    }
}
