//! Back-off for accept loops. When `accept` fails (the process is out of file descriptors, say),
//! trying again at once spins a core and writes a log line per try; every accept loop of the
//! library and the binary waits instead, longer after each failure in a row, and logs at most
//! one line in [`AcceptBackoff::LOG_EVERY`] with the number of failures held back. Also the
//! client's wait after links that die as soon as they were resumed ([`Flaps`]).

use std::time::{Duration, Instant};

/// The state of one accept loop's back-off.
#[derive(Debug, Default)]
pub struct AcceptBackoff {
    pause: Duration,
    logged: Option<Instant>,
    held: u64,
}

/// What an accept loop does after a failed accept (see [`AcceptBackoff::failed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AfterFailure {
    /// How long to wait before accepting again.
    pub pause: Duration,
    /// `Some(failures not logged since the last line)` if this failure may be logged.
    pub log: Option<u64>,
}

impl AcceptBackoff {
    /// The first pause after a failure.
    pub const FIRST: Duration = Duration::from_millis(50);
    /// The longest pause.
    pub const MAX: Duration = Duration::from_secs(1);
    /// At most one log line in this long.
    pub const LOG_EVERY: Duration = Duration::from_secs(10);

    /// An accept succeeded: the next failure starts from [`AcceptBackoff::FIRST`] again.
    pub fn succeeded(&mut self) {
        self.pause = Duration::ZERO;
    }

    /// An accept failed at `now`: the pause to wait (doubling from [`AcceptBackoff::FIRST`] to
    /// [`AcceptBackoff::MAX`]) and whether to log it.
    pub fn failed(&mut self, now: Instant) -> AfterFailure {
        self.pause = (self.pause * 2).clamp(Self::FIRST, Self::MAX);
        let log = if self.logged.is_some_and(|t| now.saturating_duration_since(t) < Self::LOG_EVERY) {
            self.held += 1;
            None
        } else {
            self.logged = Some(now);
            Some(std::mem::take(&mut self.held))
        };
        AfterFailure { pause: self.pause, log }
    }

    /// The next connection of `listener`: a failed accept is logged as `what`'s (rate-limited)
    /// and tried again after the pause.
    pub async fn accept(
        &mut self,
        listener: &tokio::net::TcpListener,
        what: &str,
    ) -> (tokio::net::TcpStream, std::net::SocketAddr) {
        loop {
            match listener.accept().await {
                Ok(x) => {
                    self.succeeded();
                    return x;
                }
                Err(e) => self.wait_after(what, &e).await,
            }
        }
    }

    /// Logs a failed accept of `what` (rate-limited), then waits for the pause.
    pub async fn wait_after(&mut self, what: &str, error: &std::io::Error) {
        let after = self.failed(Instant::now());
        if let Some(held) = after.log {
            tracing::warn!(error = %error, failures_not_logged = held, "{what}: accept failed; backing off (this is logged at most every 10 s)");
        }
        tokio::time::sleep(after.pause).await; // back-off pace, not synchronisation
    }
}

/// Links that die soon after they were attached having carried nothing new either way (a
/// server or a path that takes the resume and then drops the connection): the first such loss
/// resumes at once, like any other; each one in a row after it waits the recovery backoff,
/// doubling, before the next race, so that a client cannot be made to resume hundreds of times
/// a second. A link that moved bytes is no flap, however short: a path with frequent faults
/// under a transfer still resumes at once every time.
#[derive(Debug, Default)]
pub(crate) struct Flaps {
    in_a_row: u32,
}

impl Flaps {
    /// A link that lived less than this counts as a flap.
    pub(crate) const SHORT: Duration = Duration::from_secs(1);

    /// A link ended after living `lived`, having `moved` bytes (new positions received or
    /// acknowledged) or not: how long to wait before racing for the next one.
    pub(crate) fn link_ended(&mut self, lived: Duration, moved: bool, policy: &crate::net::RecoveryPolicy) -> Duration {
        if lived >= Self::SHORT || moved {
            self.in_a_row = 0;
            return Duration::ZERO;
        }
        self.in_a_row += 1;
        match self.in_a_row {
            1 => Duration::ZERO,
            n => policy.backoff(n - 2),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_to_a_cap_and_lines_are_held_back() {
        let mut b = AcceptBackoff::default();
        let t = Instant::now();
        let a = b.failed(t);
        assert_eq!(a, AfterFailure { pause: AcceptBackoff::FIRST, log: Some(0) });
        let pauses: Vec<_> = (0..6).map(|_| b.failed(t).pause.as_millis()).collect();
        assert_eq!(pauses, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(b.failed(t + Duration::from_secs(5)).log, None);
        assert_eq!(b.failed(t + AcceptBackoff::LOG_EVERY).log, Some(7), "the failures held back are counted");
        b.succeeded();
        assert_eq!(b.failed(t + AcceptBackoff::LOG_EVERY).pause, AcceptBackoff::FIRST);
    }

    #[test]
    fn links_that_die_at_once_wait_longer_each_time_in_a_row() {
        let p = crate::net::RecoveryPolicy::default();
        let mut f = Flaps::default();
        let short = Duration::from_millis(5);
        assert_eq!(f.link_ended(short, false, &p), Duration::ZERO, "the first loss resumes at once");
        assert_eq!(f.link_ended(short, false, &p), p.backoff_initial);
        assert_eq!(f.link_ended(short, false, &p), p.backoff_initial * 2);
        for _ in 0..30 {
            assert!(f.link_ended(short, false, &p) <= p.backoff_max);
        }
        assert_eq!(f.link_ended(short, false, &p), p.backoff_max);
        // A link that lived starts over.
        assert_eq!(f.link_ended(Flaps::SHORT, false, &p), Duration::ZERO);
        assert_eq!(f.link_ended(short, false, &p), Duration::ZERO);
        assert_eq!(f.link_ended(short, false, &p), p.backoff_initial);
        // So does a short one that moved bytes.
        assert_eq!(f.link_ended(short, true, &p), Duration::ZERO);
        assert_eq!(f.link_ended(short, false, &p), Duration::ZERO);
    }
}
