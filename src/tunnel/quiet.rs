//! A budget of log lines: what one session's streams (or one reverse listener's connections)
//! may log. A client, or a stranger reaching a reverse forward, decides how many streams and
//! connections there are, so without it they would decide how fast the server's log grows (a
//! red-team review wrote 33,800 lines a second through one session). A burst of
//! [`BURST`] lines is logged in full (a browser's hundreds of connections at once); past it,
//! [`LINES_PER_SECOND`].

use std::sync::Mutex;
use std::time::Instant;

/// Lines logged at once before the budget holds any back.
pub(super) const BURST: f64 = 1000.0;
/// Lines per second the budget refills; the lines held back are counted and reported with the
/// next line that is logged.
pub(super) const LINES_PER_SECOND: f64 = 50.0;

/// A bucket of [`BURST`] lines, refilled at [`LINES_PER_SECOND`].
#[derive(Debug)]
pub(super) struct LogBudget {
    /// When the bucket was last filled, the lines in it, and the lines held back since the
    /// last line logged.
    state: Mutex<(Instant, f64, u64)>,
}

impl LogBudget {
    /// A full budget.
    pub(super) fn new() -> LogBudget {
        LogBudget { state: Mutex::new((Instant::now(), BURST, 0)) }
    }

    /// `Some(held back)` if a line may be logged now, with how many were held back since the
    /// last one (to be logged with it, as `suppressed`); `None` if it must be held back.
    pub(super) fn take(&self) -> Option<u64> {
        self.take_at(Instant::now())
    }

    fn take_at(&self, now: Instant) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let refill = now.saturating_duration_since(s.0).as_secs_f64() * LINES_PER_SECOND;
        s.0 = s.0.max(now);
        s.1 = (s.1 + refill).min(BURST);
        if s.1 < 1.0 {
            s.2 += 1;
            return None;
        }
        s.1 -= 1.0;
        Some(std::mem::take(&mut s.2))
    }
}

/// Logs with `tracing`'s macro `$level` if `$budget` allows, adding `suppressed = N` (the lines
/// held back since the last one logged).
macro_rules! quiet {
    ($budget:expr, $level:ident!($($arg:tt)*)) => {
        if let Some(suppressed) = $budget.take() {
            if suppressed > 0 {
                tracing::$level!(suppressed, $($arg)*);
            } else {
                tracing::$level!($($arg)*);
            }
        }
    };
}
pub(super) use quiet;

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_burst_is_logged_then_lines_are_held_back_and_counted_with_the_next_one() {
        let b = LogBudget::new();
        let t0 = b.state.lock().unwrap().0;
        for _ in 0..BURST as usize {
            assert_eq!(b.take_at(t0), Some(0));
        }
        for _ in 0..1000 {
            assert_eq!(b.take_at(t0), None);
        }
        // One line's worth of refill later: one line, with the count of those held back.
        let one = Duration::from_secs_f64(1.0 / LINES_PER_SECOND);
        assert_eq!(b.take_at(t0 + one), Some(1000));
        assert_eq!(b.take_at(t0 + one), None);
        // A second later, a second's worth.
        let later = t0 + one + Duration::from_secs(1);
        let logged = (0..200).filter(|_| b.take_at(later).is_some()).count();
        assert_eq!(logged, LINES_PER_SECOND as usize);
    }
}
