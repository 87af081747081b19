//! Time, behind one trait so that every decision about age and deadlines can be driven by a
//! manual clock in tests. Wall-clock time (`SystemTime`) is used because `last_used` must
//! survive restarts; nothing in the pure state reads a clock itself.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::sync::Mutex;

pub trait Clock: Send + Sync {
    fn now(&self) -> SystemTime;
}

#[derive(Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that moves only when told to.
#[derive(Debug)]
pub struct ManualClock {
    now: Mutex<SystemTime>,
}

impl ManualClock {
    pub fn new(start: SystemTime) -> Arc<Self> {
        Arc::new(ManualClock { now: Mutex::new(start) })
    }

    pub fn advance(&self, d: Duration) {
        let mut now = self.now.lock();
        *now = add(*now, d);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        *self.now.lock()
    }
}

/// RFC 3339 UTC, whole seconds: `2026-11-21T09:00:00Z` (humantime's formatter). Times
/// before the epoch show as the epoch and times past [`far_future`] as it, where humantime
/// would panic.
pub fn rfc3339(t: SystemTime) -> String {
    let t = from_unix_secs(unix_secs(t));
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Seconds since the epoch (0 before it).
pub fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The epoch plus `s` seconds, saturating at [`far_future`].
pub fn from_unix_secs(s: u64) -> SystemTime {
    add_secs(SystemTime::UNIX_EPOCH, s)
}

/// The latest time any deadline is set to: 9999-12-31T23:59:59Z (RFC 3339 keeps its four-digit
/// year, and `SystemTime` holds it on every platform).
pub const FAR_FUTURE_SECS: u64 = 253_402_300_799;

/// [`FAR_FUTURE_SECS`] as a time.
pub fn far_future() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(FAR_FUTURE_SECS)
}

/// `t + secs`, saturating at [`far_future`]: every deadline is computed through here, because
/// `SystemTime + Duration` panics on overflow and the values come from the configuration.
pub fn add_secs(t: SystemTime, secs: u64) -> SystemTime {
    add(t, Duration::from_secs(secs))
}

/// `t + d`, saturating at [`far_future`] (a time already later stays as it is).
pub fn add(t: SystemTime, d: Duration) -> SystemTime {
    let end = far_future();
    if t >= end {
        return t;
    }
    match t.checked_add(d) {
        Some(sum) if sum <= end => sum,
        _ => end,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_when_told() {
        let c = ManualClock::new(from_unix_secs(1_000));
        c.advance(Duration::from_secs(5));
        assert_eq!(unix_secs(c.now()), 1_005);
    }

    #[test]
    fn adding_saturates_at_the_far_future() {
        let t = from_unix_secs(1_000);
        assert_eq!(unix_secs(add_secs(t, 5)), 1_005);
        for huge in [u64::MAX, i64::MAX as u64, FAR_FUTURE_SECS] {
            assert_eq!(add_secs(t, huge), far_future());
            assert_eq!(from_unix_secs(huge), far_future());
            assert_eq!(add(far_future(), Duration::from_secs(huge)), far_future());
        }
        assert_eq!(add(t, Duration::MAX), far_future());
        assert_eq!(rfc3339(far_future()), "9999-12-31T23:59:59Z");
    }

    #[test]
    fn rfc3339_is_utc_seconds() {
        assert_eq!(rfc3339(from_unix_secs(1_795_251_600)), "2026-11-21T09:00:00Z");
        assert_eq!(rfc3339(from_unix_secs(0)), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(from_unix_secs(951_782_400)), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(from_unix_secs(4_107_542_399)), "2100-02-28T23:59:59Z");
        let before = SystemTime::UNIX_EPOCH - Duration::from_secs(86_400);
        assert_eq!(rfc3339(before), "1970-01-01T00:00:00Z");
        let after = far_future() + Duration::from_secs(86_400 * 366);
        assert_eq!(rfc3339(after), "9999-12-31T23:59:59Z");
    }
}
