//! Refused connections in the log at the default level, summarised so that a flood cannot flood
//! it: the first refusal of each (reason, source, and for a session cap the client and the cap)
//! in a [`WINDOW`] is logged with its detail; the others are counted, and one summary line per
//! such key that had more says how many at the end of the window. At most [`MAX_SOURCES`] pairs are tracked per window; the
//! refusals beyond are counted per reason alone (`source="others"`).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Mutex, Weak};
use std::time::Duration;

use tracing::{info, warn};

use super::state::{rate_key, State};
use super::stats::Refusal;
use crate::human::printable;

/// How often the summary lines are written.
pub(super) const WINDOW: Duration = Duration::from_secs(60);
/// Most (reason, source) pairs tracked in a window.
pub(super) const MAX_SOURCES: usize = 64;

/// The refusals of the current window.
#[derive(Default)]
pub(super) struct Summary {
    inner: Mutex<Window>,
}

#[derive(Default)]
struct Window {
    /// Per (reason, source, what within the reason): refusals after the first one, which was
    /// logged.
    seen: HashMap<(Refusal, IpAddr, Option<String>), u64>,
    /// Per reason: refusals from sources beyond [`MAX_SOURCES`].
    others: HashMap<Refusal, u64>,
}

/// A summary line: the reason, the source (`None` for the others), what within the reason, how
/// many.
pub(super) type Line = (Refusal, Option<IpAddr>, Option<String>, u64);

impl Summary {
    /// Notes a refusal of a connection from `addr` for `why`; logs it if it is the first of its
    /// (reason, source) in this window, unless `logged` (a line about it was already written).
    /// `what` tells refusals of one reason apart within a source (a session cap: which cap, and
    /// the client): found by an operator's day, a second client refused at another cap from the
    /// same address behind NAT was never named. Its values must be bounded (the allow-list).
    pub(super) fn note(
        &self,
        why: Refusal,
        addr: SocketAddr,
        detail: Option<&str>,
        logged: bool,
        what: Option<String>,
    ) {
        let source = rate_key(addr.ip());
        let key = (why, source, what);
        let first = {
            let mut w = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            let full = w.seen.len() >= MAX_SOURCES;
            match w.seen.get_mut(&key) {
                Some(n) => {
                    *n += 1;
                    false
                }
                None if full => {
                    *w.others.entry(why).or_insert(0) += 1;
                    false
                }
                None => {
                    w.seen.insert(key, 0);
                    true
                }
            }
        };
        if !first || logged {
            return;
        }
        let reason = why.name();
        let detail = detail.map(printable).unwrap_or_default();
        let more =
            "more from this source for this reason (and this client and cap) are counted, and summed up every minute";
        if matches!(why, Refusal::NotAllowed | Refusal::Failed) {
            warn!(%addr, reason, %detail, "connection refused; {more}");
        } else {
            info!(%addr, reason, %detail, "connection refused; {more}");
        }
    }

    /// Ends the window: returns its summary lines (pairs with more than their first refusal),
    /// and starts a new one.
    pub(super) fn flush(&self) -> Vec<Line> {
        let w = std::mem::take(&mut *self.inner.lock().unwrap_or_else(|p| p.into_inner()));
        let mut lines: Vec<Line> =
            w.seen.into_iter().filter(|(_, n)| *n > 0).map(|((r, a, what), n)| (r, Some(a), what, n)).collect();
        lines.extend(w.others.into_iter().map(|(r, n)| (r, None, None, n)));
        lines.sort_by(|x, y| (x.0 as usize, x.1, &x.2).cmp(&(y.0 as usize, y.1, &y.2)));
        lines
    }
}

impl State {
    /// Counts a refused or failed connection from `addr`, and notes it in the log's summary
    /// (see [`Summary::note`]).
    pub(super) fn refused(&self, why: Refusal, addr: SocketAddr, detail: Option<&str>, logged: bool) {
        self.refused_for(why, addr, detail, logged, None);
    }

    /// [`State::refused`], told apart within its reason and source by `what` (see
    /// [`Summary::note`]).
    pub(super) fn refused_for(
        &self,
        why: Refusal,
        addr: SocketAddr,
        detail: Option<&str>,
        logged: bool,
        what: Option<String>,
    ) {
        self.counters.refused(why);
        self.refusal_summary.note(why, addr, detail, logged, what);
    }
}

/// Writes the summary lines every [`WINDOW`], for as long as the server's state lives.
pub(super) async fn summarise(state: Weak<State>) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + WINDOW, WINDOW);
    loop {
        tick.tick().await;
        let Some(state) = state.upgrade() else { return };
        for (why, source, what, n) in state.refusal_summary.flush() {
            let source = source.map_or_else(|| "others".to_string(), |a| a.to_string());
            match what {
                Some(what) => {
                    info!(reason = why.name(), %source, of = %what, refused = n, window = %crate::human::Rounded(WINDOW), "connections refused (after the first one logged)")
                }
                None => {
                    info!(reason = why.name(), %source, refused = n, window = %crate::human::Rounded(WINDOW), "connections refused (after the first one logged)")
                }
            }
        }
        // Lines held back by a key's log budget that no later line of the key reported.
        for (key, suppressed) in state.life.held_reports().into_iter().chain(state.logs.held_reports()) {
            info!(%key, suppressed, "log lines held back by the log budget were not written");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A flood from one source is one line at once and one summary line; beyond the tracked
    /// sources, refusals are counted per reason.
    #[test]
    fn a_flood_is_one_line_and_a_count() {
        let s = Summary::default();
        let a: SocketAddr = "127.0.0.2:5000".parse().unwrap();
        for _ in 0..100 {
            s.note(Refusal::UnknownSession, a, None, false, None);
        }
        s.note(Refusal::RateLimited, a, None, false, None);
        for i in 0..MAX_SOURCES as u32 + 10 {
            let b = SocketAddr::from((std::net::Ipv4Addr::from(0x0a00_0000 + i), 1));
            s.note(Refusal::Busy, b, None, false, None);
        }
        let lines = s.flush();
        assert!(lines.contains(&(Refusal::UnknownSession, Some(a.ip()), None, 99)), "{lines:?}");
        assert!(!lines.iter().any(|l| l.0 as usize == Refusal::RateLimited as usize), "{lines:?}");
        // 62 pairs fitted (with the two of `a`), 12 did not.
        assert!(lines.contains(&(Refusal::Busy, None, None, 12)), "{lines:?}");
        assert!(s.flush().is_empty(), "a flush starts a new window");
    }

    /// Two clients behind one address refused at two caps are each logged once.
    #[test]
    fn each_client_and_cap_is_logged_once_per_source() {
        let s = Summary::default();
        let a: SocketAddr = "127.0.0.2:5000".parse().unwrap();
        for _ in 0..3 {
            s.note(Refusal::Busy, a, None, false, Some("laptop, max-sessions-per-key".into()));
            s.note(Refusal::Busy, a, None, false, Some("phone, max-sessions".into()));
        }
        let lines = s.flush();
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines.contains(&(Refusal::Busy, Some(a.ip()), Some("phone, max-sessions".into()), 2)), "{lines:?}");
    }
}
