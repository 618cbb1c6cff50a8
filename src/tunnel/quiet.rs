//! A budget of log lines: what one session's streams (or one reverse listener's connections)
//! may log per second. A client, or a stranger reaching a reverse forward, decides how many
//! streams and connections there are, so without it they would decide how fast the server's
//! log grows (a red-team review wrote 33,800 lines a second through one session).

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines per second one budget allows; the rest are counted and reported with the next line
/// that is logged.
pub(super) const LINES_PER_SECOND: u32 = 20;

/// A budget of [`LINES_PER_SECOND`] lines per one-second window.
#[derive(Debug)]
pub(super) struct LogBudget {
    /// The window's start, the lines logged in it, and the lines held back since the last
    /// line logged.
    state: Mutex<(Instant, u32, u64)>,
}

impl LogBudget {
    /// A budget with a full first window.
    pub(super) fn new() -> LogBudget {
        LogBudget { state: Mutex::new((Instant::now(), 0, 0)) }
    }

    /// `Some(held back)` if a line may be logged now, with how many were held back since the
    /// last one (to be logged with it, as `suppressed`); `None` if it must be held back.
    pub(super) fn take(&self) -> Option<u64> {
        self.take_at(Instant::now())
    }

    fn take_at(&self, now: Instant) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if now.saturating_duration_since(s.0) >= Duration::from_secs(1) {
            s.0 = now;
            s.1 = 0;
        }
        if s.1 >= LINES_PER_SECOND {
            s.2 += 1;
            return None;
        }
        s.1 += 1;
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

    #[test]
    fn lines_past_the_budget_are_held_back_and_counted_with_the_next_one() {
        let b = LogBudget::new();
        let t0 = b.state.lock().unwrap().0;
        for _ in 0..LINES_PER_SECOND {
            assert_eq!(b.take_at(t0), Some(0));
        }
        for _ in 0..1000 {
            assert_eq!(b.take_at(t0 + Duration::from_millis(999)), None);
        }
        assert_eq!(b.take_at(t0 + Duration::from_secs(1)), Some(1000));
        assert_eq!(b.take_at(t0 + Duration::from_secs(1)), Some(0));
    }
}
