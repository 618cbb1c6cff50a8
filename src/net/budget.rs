//! The server's memory budget for session buffers, charged by what sessions actually hold.
//!
//! Every server session holds a [`Charge`] against two [`Budget`]s: the server's
//! (`Limits::buffer_budget`) and its client key's (`Limits::buffer_per_key`). What a session
//! holds is the bytes in its replay buffer (written, not yet acknowledged) and in its receive
//! buffer (received, not yet read by the program). Before either grows, the session takes room
//! from both budgets; when they shrink, it gives the room back. When a budget is spent, writers
//! wait and the session stops reading its socket (TCP then holds the peer back) until room
//! comes back: the bound is never exceeded and nothing is dropped or refused. An idle session
//! holds nothing, so admission no longer charges each session its worst case.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use crate::proto::Session;

/// Bytes a session keeps taken beyond what it holds. None: room an idle session kept would be
/// room thousands of idle sessions take from the busy ones (two atomic operations a read are
/// cheap beside its decryption).
const SLACK: usize = 0;
/// The least a session takes at once when it needs room.
const STEP: usize = 64 * 1024;
/// Streams' windows grow only while more than one part in this many of each budget stays free
/// (for new streams' first windows and the sessions' buffers). A window that grew stays
/// charged until its stream ends, so without it a key's few streams that once moved bytes fast
/// (16 MiB windows each, at most) could leave no room for the key's next stream, which is then
/// reset with LIMIT.
const GROWTH_RESERVE: usize = 4;
/// Streams' first windows are taken only while one part in this many of each budget stays
/// free for the sessions' buffers. A window is held while its stream lives, and a stream ends
/// only when its service's bytes have gone out through the replay buffer: windows that took
/// the whole budget left the replay buffer no room, so no stream could end and every session
/// of the key froze for good (an operator's key share of 4 MiB and 64 idle connections).
/// Buffers give their room back by themselves (the peer's ACKs, the program's reads), so the
/// part kept always comes back.
const BUFFER_RESERVE: usize = 16;

/// A bound on the bytes that sessions may hold together, with the tasks waiting for room.
#[derive(Debug)]
pub(crate) struct Budget {
    limit: usize,
    /// Bytes taken by sessions (what they hold, and some room ahead).
    used: AtomicUsize,
    /// Bytes the sessions' buffers held when each last looked (never above `used`).
    held: AtomicUsize,
    waiters: Mutex<Vec<Waker>>,
    /// Streams holding a slot (each may hold a file descriptor: its outbound connection), and
    /// the most at once.
    streams: AtomicUsize,
    max_streams: usize,
}

impl Budget {
    #[cfg(test)]
    pub(crate) fn new(limit: usize) -> Arc<Budget> {
        Budget::with_streams(limit, usize::MAX)
    }

    /// A budget of `limit` bytes and `max_streams` stream slots.
    pub(crate) fn with_streams(limit: usize, max_streams: usize) -> Arc<Budget> {
        Arc::new(Budget {
            limit,
            used: AtomicUsize::new(0),
            held: AtomicUsize::new(0),
            waiters: Mutex::new(Vec::new()),
            streams: AtomicUsize::new(0),
            max_streams,
        })
    }

    fn take_stream(&self) -> bool {
        self.streams
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| (n < self.max_streams).then_some(n + 1))
            .is_ok()
    }

    fn give_stream(&self) {
        self.streams.fetch_sub(1, Ordering::AcqRel);
    }

    /// Bytes taken now.
    pub(crate) fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Bytes the sessions' buffers hold, as of each one's last change.
    pub(crate) fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// Takes up to `want` bytes; returns how many were taken (0 when the budget is spent).
    fn take(&self, want: usize) -> usize {
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            let n = want.min(self.limit.saturating_sub(used));
            if n == 0 {
                return 0;
            }
            match self.used.compare_exchange_weak(used, used + n, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return n,
                Err(now) => used = now,
            }
        }
    }

    /// Takes exactly `want` bytes if at least `keep` are still free after it; else nothing.
    fn take_keeping(&self, want: usize, keep: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |used| {
                let after = used.checked_add(want)?;
                (after.checked_add(keep)? <= self.limit).then_some(after)
            })
            .is_ok()
    }

    /// What growing windows must leave free of this budget: a quarter.
    fn growth_reserve(&self) -> usize {
        self.limit / GROWTH_RESERVE
    }

    /// What first windows must leave free of this budget for the sessions' buffers.
    fn buffer_reserve(&self) -> usize {
        self.limit / BUFFER_RESERVE
    }

    /// Gives `n` bytes back and wakes every task waiting for room.
    fn give(&self, n: usize) {
        if n == 0 {
            return;
        }
        self.used.fetch_sub(n, Ordering::AcqRel);
        let waiters = std::mem::take(&mut *self.waiters.lock().unwrap_or_else(|p| p.into_inner()));
        for w in waiters {
            w.wake();
        }
    }

    /// Ready when the budget has room; otherwise wakes `cx` when some is given back.
    fn poll_room(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.used() < self.limit {
            return Poll::Ready(());
        }
        let mut waiters = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        if !waiters.iter().any(|w| w.will_wake(cx.waker())) {
            waiters.push(cx.waker().clone());
        }
        drop(waiters);
        // Room given back between the check and the registration would wake nobody.
        if self.used() < self.limit {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

/// What one session has taken from its budgets (the server's and its key's).
#[derive(Debug)]
pub(crate) struct Charge {
    budgets: [Arc<Budget>; 2],
    /// Taken from both budgets.
    held: usize,
    /// What the session's buffers held when last looked at, as counted in the budgets.
    seen: usize,
    /// A [`Charge::room`] found no room: whoever frees some must wake the session's tasks.
    blocked: bool,
}

impl Charge {
    pub(crate) fn new(server: Arc<Budget>, key: Arc<Budget>) -> Charge {
        Charge { budgets: [key, server], held: 0, seen: 0, blocked: false }
    }

    /// The bytes `session` holds in its buffers, counted in the budgets' `held`.
    fn in_use(&mut self, session: &Session) -> usize {
        let now = session.unacked().saturating_add(session.readable());
        if now != self.seen {
            for b in &self.budgets {
                if now > self.seen {
                    b.held.fetch_add(now - self.seen, Ordering::Relaxed);
                } else {
                    b.held.fetch_sub(self.seen - now, Ordering::Relaxed);
                }
            }
            self.seen = now;
        }
        now
    }

    /// Room for `want` more bytes in `session`'s buffers: takes what is missing from both
    /// budgets (at least [`STEP`] at a time), and returns how many bytes may be added now
    /// (`want` or fewer; 0 if the budgets are spent, and then `cx` is woken when room comes
    /// back).
    pub(crate) fn room(&mut self, session: &Session, want: usize, cx: &mut Context<'_>) -> usize {
        let in_use = self.in_use(session);
        let free = self.held.saturating_sub(in_use);
        if free < want {
            self.held += self.take((want - free).max(STEP));
        }
        let free = self.held.saturating_sub(in_use).min(want);
        self.blocked = free == 0;
        if free == 0 {
            for b in &self.budgets {
                if b.poll_room(cx).is_pending() {
                    return 0;
                }
            }
            // Room came back while registering: the caller polls again at once.
            cx.waker().wake_by_ref();
        }
        free
    }

    /// Takes up to `want` from both budgets alike.
    fn take(&self, want: usize) -> usize {
        let [key, server] = &self.budgets;
        let k = key.take(want);
        let s = server.take(k);
        key.give(k - s);
        s
    }

    /// Gives back what `session` no longer needs, beyond [`SLACK`]. True if the session had
    /// found no room and now has some: its waiting tasks must be woken (room it keeps as slack
    /// wakes nobody through the budgets).
    pub(crate) fn settle(&mut self, session: &Session) -> bool {
        let in_use = self.in_use(session);
        let keep = in_use.saturating_add(SLACK);
        if self.held > keep {
            let n = self.held - keep;
            self.held = keep;
            for b in &self.budgets {
                b.give(n);
            }
        }
        let unblocked = self.blocked && self.held > in_use;
        if unblocked {
            self.blocked = false;
        }
        unblocked
    }
}

/// What one server session's streams take from its budgets (the server's and its key's):
/// receive windows in bytes, and stream slots. Everything is given back when the session's
/// streams end, and whatever is left when the session ends.
#[derive(Debug)]
pub(crate) struct StreamCharge {
    budgets: [Arc<Budget>; 2],
    windows: u64,
    slots: usize,
    /// Where its refusals are counted and told (a server's sessions; `None` in unit tests).
    refusals: Option<RefusalLog>,
}

/// Streams a server refused (RESET LIMIT) since start, by what was missing.
#[derive(Debug, Default)]
pub(crate) struct StreamRefusals {
    /// No stream slot: its key's share of them, or the server's (each may hold a descriptor).
    pub(crate) slots: AtomicU64,
    /// No room for the stream's receive window: its key's share of the buffer budget, or the
    /// budget itself.
    pub(crate) memory: AtomicU64,
}

/// How often a session's refused streams are told in the log, after its first.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(60);

/// A session's refused streams: counted server-wide, and told in the log (the first at once,
/// then at most one line a minute with how many since).
#[derive(Debug)]
struct RefusalLog {
    counts: Arc<StreamRefusals>,
    who: String,
    /// The session's log budget (its key's and the server's above it): however many sessions a
    /// key opens, its lines stay within its share of the log.
    budget: Arc<crate::net::quiet::LogBudget>,
    last: Option<Instant>,
    unlogged: u64,
}

/// What a stream was refused for.
#[derive(Debug, Clone, Copy)]
enum Missing {
    KeySlots,
    ServerSlots,
    KeyMemory,
    ServerMemory,
}

impl Missing {
    fn why(self) -> &'static str {
        match self {
            Missing::KeySlots => "this client key holds its share of the server's stream slots (a quarter of them; each may hold a connection to a service)",
            Missing::ServerSlots => "the server holds all its stream slots (sized from its file-descriptor limit)",
            Missing::KeyMemory => "this client key's share of the buffer budget (buffer-per-key) has no room for another stream's receive window",
            Missing::ServerMemory => "the server's buffer budget (buffer-budget) has no room for another stream's receive window",
        }
    }
}

impl StreamCharge {
    pub(crate) fn new(server: Arc<Budget>, key: Arc<Budget>) -> StreamCharge {
        StreamCharge { budgets: [key, server], windows: 0, slots: 0, refusals: None }
    }

    /// Counts its refusals in `counts` and tells them in the log within `budget`, naming the
    /// client `who`.
    pub(crate) fn told(
        mut self,
        counts: Arc<StreamRefusals>,
        who: String,
        budget: Arc<crate::net::quiet::LogBudget>,
    ) -> StreamCharge {
        self.refusals = Some(RefusalLog { counts, who, budget, last: None, unlogged: 0 });
        self
    }

    fn refused(&mut self, missing: Missing) {
        let Some(log) = self.refusals.as_mut() else { return };
        let counter = match missing {
            Missing::KeySlots | Missing::ServerSlots => &log.counts.slots,
            Missing::KeyMemory | Missing::ServerMemory => &log.counts.memory,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        log.unlogged += 1;
        let now = Instant::now();
        if log.last.is_some_and(|t| now.saturating_duration_since(t) < REFUSAL_LOG_EVERY) {
            return;
        }
        crate::net::quiet::quiet!(
            log.budget,
            warn!(
                client = %log.who,
                refused = log.unlogged,
                "no room for a stream of this client's session: {}; the stream is refused and its connection reset (counted in holdfast_streams_refused_total; at most one such line a minute per session)",
                missing.why()
            )
        );
        log.last = Some(now);
        log.unlogged = 0;
    }
}

impl crate::proto::StreamBudget for StreamCharge {
    fn take_window(&mut self, n: u64) -> bool {
        let want = usize::try_from(n).unwrap_or(usize::MAX);
        let [key, server] = &self.budgets;
        if !key.take_keeping(want, key.buffer_reserve()) {
            self.refused(Missing::KeyMemory);
            return false;
        }
        if !server.take_keeping(want, server.buffer_reserve()) {
            key.give(want);
            self.refused(Missing::ServerMemory);
            return false;
        }
        self.windows += n;
        true
    }

    fn grow_window(&mut self, n: u64) -> bool {
        let want = usize::try_from(n).unwrap_or(usize::MAX);
        let [key, server] = &self.budgets;
        if !key.take_keeping(want, key.growth_reserve()) {
            return false;
        }
        if !server.take_keeping(want, server.growth_reserve()) {
            key.give(want);
            return false;
        }
        self.windows += n;
        true
    }

    fn give_window(&mut self, n: u64) {
        let n = n.min(self.windows);
        self.windows -= n;
        for b in &self.budgets {
            b.give(n as usize);
        }
    }

    fn take_stream(&mut self) -> bool {
        let [key, server] = &self.budgets;
        if !key.take_stream() {
            self.refused(Missing::KeySlots);
            return false;
        }
        if !server.take_stream() {
            key.give_stream();
            self.refused(Missing::ServerSlots);
            return false;
        }
        self.slots += 1;
        true
    }

    fn give_stream(&mut self) {
        if self.slots > 0 {
            self.slots -= 1;
            for b in &self.budgets {
                b.give_stream();
            }
        }
    }
}

impl Drop for StreamCharge {
    fn drop(&mut self) {
        for b in &self.budgets {
            b.give(self.windows as usize);
            for _ in 0..self.slots {
                b.give_stream();
            }
        }
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        for b in &self.budgets {
            b.held.fetch_sub(self.seen, Ordering::Relaxed);
            b.give(self.held);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Role, SessionConfig};

    fn noop_cx() -> Context<'static> {
        Context::from_waker(Waker::noop())
    }

    #[test]
    fn a_budget_is_never_exceeded_and_room_given_back_is_taken_again() {
        let (server, key) = (Budget::new(200 * 1024), Budget::new(1 << 30));
        let mut a = Charge::new(server.clone(), key.clone());
        let mut b = Charge::new(server.clone(), key.clone());
        let s = Session::new(Role::Server, SessionConfig::default());
        let mut cx = noop_cx();
        assert_eq!(a.room(&s, 150 * 1024, &mut cx), 150 * 1024);
        // The rest of the budget, and no more.
        assert_eq!(b.room(&s, 150 * 1024, &mut cx), 50 * 1024);
        assert_eq!(server.used(), 200 * 1024);
        // Nothing is in use in either session: settling gives back everything.
        a.settle(&s);
        assert_eq!(a.held, SLACK);
        assert_eq!(b.room(&s, 150 * 1024, &mut cx), 150 * 1024);
        assert!(server.used() <= 200 * 1024);
        drop((a, b));
        assert_eq!((server.used(), key.used()), (0, 0), "a session's end gives everything back");
    }

    #[test]
    fn a_key_budget_bounds_its_sessions_and_the_server_budget_is_not_leaked() {
        let (server, key) = (Budget::new(1 << 20), Budget::new(100 * 1024));
        let mut a = Charge::new(server.clone(), key.clone());
        let s = Session::new(Role::Server, SessionConfig::default());
        assert_eq!(a.room(&s, 1 << 20, &mut noop_cx()), 100 * 1024);
        assert_eq!((server.used(), key.used()), (100 * 1024, 100 * 1024));
    }

    #[test]
    fn growing_windows_leave_a_quarter_of_the_keys_share_for_new_streams() {
        use crate::proto::StreamBudget;
        let (server, key) = (Budget::new(1 << 30), Budget::new(16 << 20));
        let mut a = StreamCharge::new(server.clone(), key.clone());
        // Streams that move bytes fast double their windows from 64 KiB while the budget lets
        // them (as `Streams::flush` does).
        let mut windows = vec![64u64 << 10; 8];
        for w in &mut windows {
            assert!(a.take_window(*w));
        }
        let mut grew = true;
        while grew {
            grew = false;
            for w in windows.iter_mut().filter(|w| **w < 16 << 20) {
                if a.grow_window(*w) {
                    *w *= 2;
                    grew = true;
                }
            }
        }
        let grown: u64 = windows.iter().sum();
        assert!(grown <= 12 << 20, "windows grew into the last quarter: {grown} bytes");
        // New streams still get their first windows: the quarter kept is 64 of them, less the
        // sixteenth that first windows leave to the buffers.
        for _ in 0..44 {
            assert!(a.take_window(64 << 10), "a new stream found no room ({} bytes used)", key.used());
        }
        drop(a);
        assert_eq!((server.used(), key.used()), (0, 0));
    }

    /// Found by an operator's day: with a 4 MiB key share, 64 idle connections took it all in
    /// windows, the replay buffer had no room for a service's bytes, no stream could end, and
    /// the session froze for good. First windows leave a sixteenth for the buffers.
    #[test]
    fn first_windows_leave_room_for_the_sessions_buffers() {
        use crate::proto::StreamBudget;
        let (server, key) = (Budget::new(1 << 30), Budget::new(4 << 20));
        let mut streams = StreamCharge::new(server.clone(), key.clone());
        let mut opened = 0;
        while streams.take_window(64 << 10) {
            opened += 1;
            assert!(opened <= 64, "more windows than the share holds");
        }
        assert!(opened >= 56, "only {opened} first windows in a 4 MiB share");
        let s = Session::new(Role::Server, SessionConfig::default());
        let mut replay = Charge::new(server.clone(), key.clone());
        assert!(
            replay.room(&s, 16 << 10, &mut noop_cx()) >= 16 << 10,
            "the replay buffer found no room beside the windows ({} of {} bytes used)",
            key.used(),
            4 << 20
        );
        // The server's budget keeps its part too.
        let (server, key) = (Budget::new(1 << 20), Budget::new(1 << 30));
        let mut streams = StreamCharge::new(server.clone(), key.clone());
        while streams.take_window(64 << 10) {}
        let mut replay = Charge::new(server, key);
        assert!(replay.room(&s, 16 << 10, &mut noop_cx()) >= 16 << 10);
    }

    #[test]
    fn a_writer_without_room_is_woken_when_room_comes_back() {
        struct Flag(std::sync::atomic::AtomicBool);
        impl std::task::Wake for Flag {
            fn wake(self: Arc<Self>) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let (server, key) = (Budget::new(STEP), Budget::new(1 << 30));
        let s = Session::new(Role::Server, SessionConfig::default());
        let mut a = Charge::new(server.clone(), key.clone());
        assert_eq!(a.room(&s, STEP, &mut noop_cx()), STEP);
        let flag = Arc::new(Flag(Default::default()));
        let waker = Waker::from(flag.clone());
        let mut b = Charge::new(server.clone(), key);
        assert_eq!(b.room(&s, 1, &mut Context::from_waker(&waker)), 0);
        assert!(!flag.0.load(Ordering::SeqCst));
        drop(a);
        assert!(flag.0.load(Ordering::SeqCst), "giving room back wakes the waiting writer");
        assert_eq!(b.room(&s, 1, &mut Context::from_waker(&waker)), 1);
    }
}
