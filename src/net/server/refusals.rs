//! Refused connections in the log at the default level, summarised so that a flood cannot flood
//! it: the first refusal of each (reason, source) in a [`WINDOW`] is logged with its detail;
//! the others are counted, and one summary line per (reason, source) that had more says how
//! many at the end of the window. At most [`MAX_SOURCES`] pairs are tracked per window; the
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
    /// Per (reason, source): refusals after the first one, which was logged.
    seen: HashMap<(Refusal, IpAddr), u64>,
    /// Per reason: refusals from sources beyond [`MAX_SOURCES`].
    others: HashMap<Refusal, u64>,
}

/// A summary line: the reason, the source (`None` for the others), how many.
pub(super) type Line = (Refusal, Option<IpAddr>, u64);

impl Summary {
    /// Notes a refusal of a connection from `addr` for `why`; logs it if it is the first of its
    /// (reason, source) in this window, unless `logged` (a line about it was already written).
    pub(super) fn note(&self, why: Refusal, addr: SocketAddr, detail: Option<&str>, logged: bool) {
        let source = rate_key(addr.ip());
        let first = {
            let mut w = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            let full = w.seen.len() >= MAX_SOURCES;
            match w.seen.get_mut(&(why, source)) {
                Some(n) => {
                    *n += 1;
                    false
                }
                None if full => {
                    *w.others.entry(why).or_insert(0) += 1;
                    false
                }
                None => {
                    w.seen.insert((why, source), 0);
                    true
                }
            }
        };
        if !first || logged {
            return;
        }
        let reason = why.name();
        let detail = detail.map(printable).unwrap_or_default();
        let more = "more from this source for this reason are counted, and summed up every minute";
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
            w.seen.into_iter().filter(|(_, n)| *n > 0).map(|((r, a), n)| (r, Some(a), n)).collect();
        lines.extend(w.others.into_iter().map(|(r, n)| (r, None, n)));
        lines.sort_by_key(|(r, a, _)| (*r as usize, *a));
        lines
    }
}

impl State {
    /// Counts a refused or failed connection from `addr`, and notes it in the log's summary
    /// (see [`Summary::note`]).
    pub(super) fn refused(&self, why: Refusal, addr: SocketAddr, detail: Option<&str>, logged: bool) {
        self.counters.refused(why);
        self.refusal_summary.note(why, addr, detail, logged);
    }
}

/// Writes the summary lines every [`WINDOW`], for as long as the server's state lives.
pub(super) async fn summarise(state: Weak<State>) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + WINDOW, WINDOW);
    loop {
        tick.tick().await;
        let Some(state) = state.upgrade() else { return };
        for (why, source, n) in state.refusal_summary.flush() {
            let source = source.map_or_else(|| "others".to_string(), |a| a.to_string());
            info!(reason = why.name(), %source, refused = n, window = %crate::human::Rounded(WINDOW), "connections refused (after the first one logged)");
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
            s.note(Refusal::UnknownSession, a, None, false);
        }
        s.note(Refusal::RateLimited, a, None, false);
        for i in 0..MAX_SOURCES as u32 + 10 {
            let b = SocketAddr::from((std::net::Ipv4Addr::from(0x0a00_0000 + i), 1));
            s.note(Refusal::Busy, b, None, false);
        }
        let lines = s.flush();
        assert!(lines.contains(&(Refusal::UnknownSession, Some(a.ip()), 99)), "{lines:?}");
        assert!(!lines.iter().any(|l| l.0 as usize == Refusal::RateLimited as usize), "{lines:?}");
        // 62 pairs fitted (with the two of `a`), 12 did not.
        assert!(lines.contains(&(Refusal::Busy, None, 12)), "{lines:?}");
        assert!(s.flush().is_empty(), "a flush starts a new window");
    }
}
