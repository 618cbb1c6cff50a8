//! Budgets of log lines. A client, or a stranger reaching a reverse forward, decides how many
//! sessions, resumes, streams, requests and connections there are, so without them they would
//! decide how fast the server's log grows (red-team reviews wrote 33,800 lines a second through
//! one session, 21,600 a second by opening one session after another, and 1,294 a second with
//! nothing but sessions opened and closed from many addresses). Every line a client causes,
//! from "session opened" to its streams' lines, is charged to three buckets: its session's
//! ([`Level::SESSION`]), its key's ([`Level::KEY`], which outlives the key's sessions, so that a
//! new session starts with what the last one left) and the server's ([`Level::SERVER`]). A
//! burst is logged in full (a browser's hundreds of connections at once); past it, the refill
//! rate. The server keeps two sets of these, one for sessions' own lines and one for their
//! streams', so that one cannot spend the other's. A line is logged only if every bucket of its chain has one. The lines held back are
//! counted in the bucket they were asked of and reported with the next line logged through it
//! (`suppressed=N`); a bucket that goes hands its count to its parent, whose count is reported
//! with the next line of any bucket under it. No line is ever written outside the budgets,
//! except the server's own count at its end.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::keys::PublicKey;

/// The size and refill rate of one kind of bucket.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Level {
    /// Lines logged at once before the bucket holds any back.
    pub(crate) burst: f64,
    /// Lines per second the bucket refills.
    pub(crate) per_second: f64,
}

impl Level {
    /// One session's streams (or one reverse listener's connections, within their session's).
    pub(crate) const SESSION: Level = Level { burst: 1000.0, per_second: 50.0 };
    /// Every session of one key.
    pub(crate) const KEY: Level = Level { burst: 2000.0, per_second: 50.0 };
    /// The whole server.
    pub(crate) const SERVER: Level = Level { burst: 10_000.0, per_second: 200.0 };
}

/// A bucket of lines, refilled over time, within the buckets of its `parent` chain.
#[derive(Debug)]
pub(crate) struct LogBudget {
    level: Level,
    parent: Option<Arc<LogBudget>>,
    state: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    /// When the bucket was last filled.
    at: Instant,
    /// The lines in it.
    lines: f64,
    /// Lines held back since the last one logged through this bucket (counted in the bucket a
    /// line was asked of, not in its parents).
    held: u64,
}

impl LogBudget {
    /// A full budget of `level`, alone (for a client's own lines, and tests).
    pub(crate) fn new(level: Level) -> LogBudget {
        LogBudget::under(level, None)
    }

    /// A full budget of `level` whose lines are also charged to `parent`'s chain.
    pub(crate) fn under(level: Level, parent: Option<Arc<LogBudget>>) -> LogBudget {
        let state = Mutex::new(Bucket { at: Instant::now(), lines: level.burst, held: 0 });
        LogBudget { level, parent, state }
    }

    /// A budget of [`Level::SESSION`] within `session`'s (a reverse listener's): what it holds
    /// back and has not reported when it goes is reported through `session`'s, like that of
    /// every budget with a parent (a client opening listener after listener would otherwise
    /// decide how many report lines there are).
    pub(crate) fn within(session: &Arc<LogBudget>) -> LogBudget {
        LogBudget::under(Level::SESSION, Some(session.clone()))
    }

    /// `Some(held back)` if a line may be logged now, with how many were held back since the
    /// last one (to be logged with it, as `suppressed`); `None` if it must be held back.
    pub(crate) fn take(&self) -> Option<u64> {
        self.take_at(Instant::now())
    }

    fn take_at(&self, now: Instant) -> Option<u64> {
        match self.take_one(now) {
            Some(held) => Some(held),
            None => {
                self.lock().held += 1;
                None
            }
        }
    }

    /// Takes one line from this bucket and its parents, with the lines held back that they
    /// had counted (which the line taken reports); or none if one of them is empty.
    fn take_one(&self, now: Instant) -> Option<u64> {
        let mut s = self.lock();
        s.refill(self.level, now);
        if s.lines < 1.0 {
            return None;
        }
        // The chain is locked from here to the root, always in that order.
        let above = match &self.parent {
            Some(p) => p.take_one(now)?,
            None => 0,
        };
        s.lines -= 1.0;
        Some(above + std::mem::take(&mut s.held))
    }

    /// True if the bucket is full again (forgetting it gives nothing back; what it held back
    /// goes to its parent).
    fn is_full(&self, now: Instant) -> bool {
        let mut s = self.lock();
        s.refill(self.level, now);
        s.lines >= self.level.burst
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Bucket> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Bucket {
    fn refill(&mut self, level: Level, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = self.at.max(now);
        self.lines = (self.lines + elapsed * level.per_second).min(level.burst);
    }
}

impl Drop for LogBudget {
    /// The lines held back and not reported yet go to the parent, reported with the next line
    /// of any budget under it; a budget of its own (the server's, a client's) reports them in
    /// one line, its last.
    fn drop(&mut self) {
        let held = std::mem::take(&mut self.lock().held);
        if held == 0 {
            return;
        }
        match &self.parent {
            Some(p) => p.lock().held += held,
            None => tracing::info!(suppressed = held, "log lines held back by the log budget were not written"),
        }
    }
}

/// The server's bucket and one per key, kept while a session of the key holds it or while it is
/// not full again (so that closing a session and opening another does not refill it).
#[derive(Debug)]
pub(crate) struct KeyedLogs {
    server: Arc<LogBudget>,
    keys: Mutex<KeyMap>,
}

#[derive(Debug, Default)]
struct KeyMap {
    map: HashMap<PublicKey, Arc<LogBudget>>,
    /// The map's size after it was last pruned: it is pruned again when it has doubled.
    pruned_at: usize,
}

impl Default for KeyedLogs {
    fn default() -> Self {
        KeyedLogs { server: Arc::new(LogBudget::new(Level::SERVER)), keys: Mutex::default() }
    }
}

impl KeyedLogs {
    /// A new session's budget, charged to its key's and the server's.
    pub(crate) fn session(&self, key: &PublicKey) -> Arc<LogBudget> {
        Arc::new(LogBudget::under(Level::SESSION, Some(self.key(key))))
    }

    /// The lines held back that no later line reported (a key that stopped logging after its
    /// budget ran out), per key, taken through each key's budget: a key whose budget has no line
    /// yet waits for the next call. The server calls it once a minute and logs one line for each.
    pub(crate) fn held_reports(&self) -> Vec<(PublicKey, u64)> {
        self.held_reports_at(Instant::now())
    }

    fn held_reports_at(&self, now: Instant) -> Vec<(PublicKey, u64)> {
        let holding: Vec<(PublicKey, Arc<LogBudget>)> = {
            let k = self.keys.lock().unwrap_or_else(|p| p.into_inner());
            k.map.iter().filter(|(_, b)| b.lock().held > 0).map(|(key, b)| (*key, b.clone())).collect()
        };
        holding.into_iter().filter_map(|(key, b)| b.take_one(now).filter(|n| *n > 0).map(|n| (key, n))).collect()
    }

    fn key(&self, key: &PublicKey) -> Arc<LogBudget> {
        let mut k = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = k.map.get(key) {
            return b.clone();
        }
        // Forget the keys that nobody holds and whose buckets are full: the map holds at most
        // the keys with a session, or with lines spent in the last `burst / per_second`
        // seconds (40 s), at most twice over.
        if k.map.len() >= 2 * k.pruned_at.max(64) {
            let now = Instant::now();
            k.map.retain(|_, b| Arc::strong_count(b) > 1 || !b.is_full(now));
            k.pruned_at = k.map.len();
        }
        let b = Arc::new(LogBudget::under(Level::KEY, Some(self.server.clone())));
        k.map.insert(*key, b.clone());
        b
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
pub(crate) use quiet;

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_burst_is_logged_then_lines_are_held_back_and_counted_with_the_next_one() {
        let b = LogBudget::new(Level::SESSION);
        let t0 = b.lock().at;
        for _ in 0..1000 {
            assert_eq!(b.take_at(t0), Some(0));
        }
        for _ in 0..1000 {
            assert_eq!(b.take_at(t0), None);
        }
        // One line's worth of refill later: one line, with the count of those held back.
        let one = Duration::from_secs_f64(1.0 / Level::SESSION.per_second);
        assert_eq!(b.take_at(t0 + one), Some(1000));
        assert_eq!(b.take_at(t0 + one), None);
        // A second later, a second's worth.
        let later = t0 + one + Duration::from_secs(1);
        let logged = (0..200).filter(|_| b.take_at(later).is_some()).count();
        assert_eq!(logged, Level::SESSION.per_second as usize);
        b.lock().held = 0;
    }

    /// One session after another of one key get the key's budget, not a fresh one each; the
    /// server's budget bounds every key together.
    #[test]
    fn sessions_share_their_keys_budget_and_keys_the_servers() {
        let logs = KeyedLogs::default();
        let (a, b) = (crate::keys::Keypair::generate().public, crate::keys::Keypair::generate().public);
        let t0 = Instant::now() + Duration::from_secs(1);
        let mut logged = 0;
        for _ in 0..10 {
            let s = logs.session(&a);
            logged += (0..1000).filter(|_| s.take_at(t0).is_some()).count();
            s.lock().held = 0;
        }
        assert_eq!(logged, Level::KEY.burst as usize, "ten sessions of one key log the key's burst");
        // The key's budget was kept although no session holds it.
        let s = logs.session(&a);
        assert_eq!(s.take_at(t0), None);
        s.lock().held = 0;
        // Another key has its own; the server's runs out after its burst, whoever asks.
        let mut all = logged;
        for _ in 0..20 {
            let c = crate::keys::Keypair::generate().public;
            let s = logs.session(&c);
            all += (0..1000).filter(|_| s.take_at(t0).is_some()).count();
            s.lock().held = 0;
        }
        assert_eq!(all, Level::SERVER.burst as usize);
        let s = logs.session(&b);
        assert_eq!(s.take_at(t0), None, "the server's budget is spent for every key");
        s.lock().held = 0;
    }

    /// Keys nobody holds whose buckets are full again are forgotten: the map stays bounded.
    #[test]
    fn forgotten_keys_are_pruned() {
        let logs = KeyedLogs::default();
        for _ in 0..1000 {
            drop(logs.session(&crate::keys::Keypair::generate().public));
        }
        assert!(logs.keys.lock().unwrap().map.len() <= 128, "{}", logs.keys.lock().unwrap().map.len());
    }

    /// What a session held back and did not report goes to its key's budget when it goes, and
    /// the key's next line, in any session, reports it: no line of its own is written.
    #[test]
    fn a_sessions_unreported_lines_are_reported_by_its_keys_next_line() {
        let logs = KeyedLogs::default();
        let key = crate::keys::Keypair::generate().public;
        let t0 = Instant::now() + Duration::from_secs(1);
        let first = logs.session(&key);
        let logged = (0..2100).filter(|_| first.take_at(t0).is_some()).count();
        assert_eq!(logged, Level::SESSION.burst as usize);
        let second = logs.session(&key);
        let logged = (0..1100).filter(|_| second.take_at(t0).is_some()).count();
        assert_eq!(logged, (Level::KEY.burst - Level::SESSION.burst) as usize, "the key's burst is spent");
        drop(first);
        assert_eq!(logs.key(&key).lock().held, 1100, "handed to the key");
        // A line's worth of refill later, another session's line carries both counts.
        let one = Duration::from_secs_f64(1.0 / Level::KEY.per_second);
        let third = logs.session(&key);
        assert_eq!(third.take_at(t0 + one), Some(1100));
        assert_eq!(second.take_at(t0 + 2 * one), Some(100));
        assert_eq!(logs.key(&key).lock().held, 0);
    }

    /// A key that stopped logging after its budget ran out has what it held back reported by
    /// the periodic report, once its budget has a line again, and only once.
    #[test]
    fn a_keys_unreported_lines_are_reported_by_the_periodic_report() {
        let logs = KeyedLogs::default();
        let key = crate::keys::Keypair::generate().public;
        let t0 = Instant::now() + Duration::from_secs(1);
        let (first, second) = (logs.session(&key), logs.session(&key));
        let logged = (0..1000).filter(|_| first.take_at(t0).is_some()).count()
            + (0..1500).filter(|_| second.take_at(t0).is_some()).count();
        assert_eq!(logged, Level::KEY.burst as usize);
        drop((first, second));
        assert_eq!(logs.held_reports_at(t0), vec![], "the key's budget is spent");
        let one = Duration::from_secs_f64(1.0 / Level::KEY.per_second);
        assert_eq!(logs.held_reports_at(t0 + one), vec![(key, 500)]);
        assert_eq!(logs.held_reports_at(t0 + 3 * one), vec![]);
    }

    /// A listener's budget hands what it held back to its session's when it goes: one report
    /// per session, however many listeners it opened.
    #[test]
    fn a_listeners_held_lines_are_reported_by_its_session() {
        let logs = KeyedLogs::default();
        let session = logs.session(&crate::keys::Keypair::generate().public);
        let t0 = Instant::now() + Duration::from_secs(1);
        while session.take_at(t0).is_some() {}
        let before = session.lock().held;
        for _ in 0..10 {
            let listener = LogBudget::within(&session);
            assert_eq!(listener.take_at(t0), None, "the session's budget is spent");
        }
        assert_eq!(session.lock().held, before + 10);
        session.lock().held = 0;
    }
}
