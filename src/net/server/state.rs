//! The server's shared state: the session table, the limits (rates, caps, the buffer budget)
//! and the reservations that enforce them.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

use crate::keys::{AllowList, PublicKey};
use crate::net::budget::Budget;
use crate::net::config::ServerConfig;
use crate::net::stream::{Shared, Stream};
use crate::proto::frame::RESUME_ID_LEN;
use crate::proto::{StaticSecrets, Transport};

use super::Peer;

/// A new connection for an existing session, confirmed and ready to attach.
pub(super) struct NewLink {
    pub(super) sock: TcpStream,
    pub(super) transport: Transport,
    pub(super) confirm: zeroize::Zeroizing<Vec<u8>>,
    pub(super) resume_id: [u8; RESUME_ID_LEN],
    pub(super) client_received: u64,
    pub(super) client_written: u64,
    pub(super) peer: SocketAddr,
    /// The link's number in its session, the attempt number of its hello (the first link is
    /// 0): a session attaches only a link numbered above the one it has (a delayed, older link
    /// is dropped).
    pub(super) number: u64,
}

pub(super) struct Entry {
    pub(super) shared: Arc<Shared>,
    pub(super) client: PublicKey,
    /// The client as logs name it: its allow-list name, or its key.
    pub(super) who: String,
    /// When the session was committed.
    pub(super) opened: Instant,
    pub(super) replace: mpsc::Sender<NewLink>,
    /// Token bucket for `resumes_per_sec_per_session`: (tokens, last refill).
    pub(super) resume_tokens: Mutex<Option<(f64, Instant)>>,
    /// The highest resume attempt number whose hello authenticated: a hello whose number is not
    /// above it is a replay, refused before any cryptography.
    pub(super) resume_mark: AtomicU64,
}

impl Entry {
    /// The session's resume bucket (burst `rate`, refilled at `rate` per second), refilled to
    /// `now`; `take` spends a token if there is one. True if a token was there. Only a confirmed
    /// resume spends one, so a replayed or unconfirmed hello cannot use up a real client's
    /// budget; a client looping on resumes is still held to `rate` per second on average.
    pub(super) fn resume_tokens(&self, now: Instant, rate: u32, take: bool) -> bool {
        let rate = f64::from(rate.max(1));
        let mut bucket = self.resume_tokens.lock().unwrap_or_else(|p| p.into_inner());
        let (tokens, at) = bucket.get_or_insert((rate, now));
        *tokens = (*tokens + now.saturating_duration_since(*at).as_secs_f64() * rate).min(rate);
        *at = now;
        let had = *tokens >= 1.0;
        if had && take {
            *tokens -= 1.0;
        }
        had
    }
}

/// Handshakes in progress, oldest first, so the oldest can be evicted at the cap.
#[derive(Default)]
pub(super) struct Pending {
    pub(super) next_id: u64,
    /// Each handshake in progress, oldest first.
    pub(super) live: VecDeque<Live>,
}

/// A handshake in progress, as the cap sees it.
pub(super) struct Live {
    pub(super) id: u64,
    pub(super) started: Instant,
    pub(super) task: AbortHandle,
    pub(super) claim: Claim,
    /// A second descriptor of its connection, to answer BUSY on if it is evicted.
    pub(super) busy: Option<std::os::fd::OwnedFd>,
}

/// Who speaks next on a handshake's connection: its task (to send its reply, or to hand the
/// connection to an earlier process) or the cap evicting it (to answer BUSY). Whichever claims
/// it first; the other stays silent, so the two never write into each other's bytes.
#[derive(Clone, Default)]
pub(super) struct Claim(Arc<std::sync::atomic::AtomicU8>);

impl Claim {
    const OPEN: u8 = 0;
    const EVICTED: u8 = 1;
    const TASK: u8 = 2;

    /// The task claims the connection; false if it was evicted first.
    pub(super) fn for_task(&self) -> bool {
        let r = self.0.compare_exchange(Self::OPEN, Self::TASK, Ordering::AcqRel, Ordering::Acquire);
        matches!(r, Ok(_) | Err(Self::TASK))
    }

    /// The cap claims the connection to evict it; false if its task got there first (it has
    /// replied to an authenticated client, or handed the connection on).
    pub(super) fn for_eviction(&self) -> bool {
        self.0.compare_exchange(Self::OPEN, Self::EVICTED, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }

    /// True once the task has claimed the connection.
    pub(super) fn by_task(&self) -> bool {
        self.0.load(Ordering::Acquire) == Self::TASK
    }
}

#[derive(Default)]
pub(super) struct Table {
    pub(super) by_ticket: HashMap<[u8; RESUME_ID_LEN], Arc<Entry>>,
    /// First tickets sent in an IK reply whose handshake has not ended yet: the client may hold
    /// one (and try to resume with it) before the server has committed its session.
    pub(super) first_pending: HashSet<[u8; RESUME_ID_LEN]>,
    pub(super) per_key: HashMap<PublicKey, usize>,
    /// Per client key with sessions: its sessions' memory budget.
    pub(super) key_budgets: HashMap<PublicKey, Arc<Budget>>,
    pub(super) rate: HashMap<IpAddr, (f64, Instant)>,
    /// Per allowed client key: the first-connection timestamps whose hello authenticated (see
    /// [`Stamps`]).
    pub(super) first_marks: HashMap<PublicKey, Stamps>,
    /// First-connection handshakes past their hello and not yet ended, per client key.
    pub(super) unconfirmed: HashMap<PublicKey, usize>,
    /// The sessions of the process this one took over from, as it last reported them (see
    /// `upgrade`): counted with this process's own against the caps.
    pub(super) inherited: Inherited,
    /// While a new process takes over or has taken over: where this process's stamps and
    /// session counts go as they change (see `upgrade`).
    pub(super) successor: Option<mpsc::UnboundedSender<super::handover::Msg>>,
}

/// The sessions of the earlier processes that live on after an upgrade: in all and per key.
#[derive(Default)]
pub(super) struct Inherited {
    pub(super) total: usize,
    pub(super) per_key: HashMap<PublicKey, usize>,
}

pub(super) struct State {
    pub(super) cfg: ServerConfig,
    /// The allow-list in force: `cfg.allow` at first, replaced by [`AllowListHandle::set`].
    pub(super) allow: std::sync::RwLock<Arc<AllowList>>,
    /// The `ss` results of the allowed keys, recomputed with the allow-list (see
    /// [`StaticSecrets`]).
    pub(super) statics: std::sync::RwLock<StaticSecrets>,
    pub(super) table: Mutex<Table>,
    pub(super) sessions: AtomicUsize,
    /// The memory budget of every session's buffers together (`Limits::buffer_budget`).
    pub(super) budget: Arc<Budget>,
    pub(super) expired: AtomicUsize,
    pub(super) resumes: AtomicUsize,
    /// The counters only [`super::StatsHandle`] reads.
    pub(super) counters: super::stats::Counters,
    /// Which refused client keys were logged lately (see [`RefusalLog`]).
    pub(super) refusal_log: RefusalLog,
    /// Over-rate connections being answered with BUSY.
    pub(super) refusing: AtomicUsize,
    pub(super) pending: Mutex<Pending>,
    pub(super) accepted: mpsc::Sender<(Stream, Peer)>,
    /// The connection to the process this one took the listener over from, while it lives:
    /// resumes of sessions this process does not know are handed to it (see `handover`).
    pub(super) predecessor: Mutex<Option<Arc<tokio::net::UnixStream>>>,
    /// True once this process has handed its listener to a new one.
    pub(super) retired: std::sync::atomic::AtomicBool,
    /// Woken when a session ends or the process retires.
    pub(super) changed: tokio::sync::Notify,
    /// Other listening sockets handed to the next process with the listener, by local address
    /// (see [`super::Listener::hand_over_also`]).
    pub(super) extras: Mutex<Vec<(SocketAddr, std::os::fd::OwnedFd)>>,
}

impl State {
    pub(super) fn allow(&self) -> Arc<AllowList> {
        self.allow.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(super) fn statics(&self) -> StaticSecrets {
        self.statics.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Puts a new allow-list in force, with its precomputed secrets; forgets the timestamps of
    /// keys no longer on it.
    pub(super) fn set_allow(&self, list: Arc<AllowList>) {
        let statics = StaticSecrets::new(&self.cfg.keypair.private, list.iter().map(|p| &p.key));
        *self.statics.write().unwrap_or_else(|p| p.into_inner()) = statics;
        self.table().first_marks.retain(|k, _| list.lookup(k).is_some());
        *self.allow.write().unwrap_or_else(|p| p.into_inner()) = list;
    }

    pub(super) fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The memory budget of `client`'s sessions together (`Limits::buffer_per_key`), made on
    /// its first session and dropped with its last.
    pub(super) fn key_budget(&self, client: &PublicKey) -> Arc<Budget> {
        let limit = self.cfg.limits.buffer_per_key;
        self.table().key_budgets.entry(*client).or_insert_with(|| Budget::new(limit)).clone()
    }

    /// Accepts a first connection's timestamp if it is newer than every one accepted before for
    /// `client` (an allowed key), and remembers it.
    pub(super) fn accept_stamp(&self, client: &PublicKey, stamp: u64) -> bool {
        let mut t = self.table();
        let fresh = t.first_marks.entry(*client).or_default().accept(stamp);
        if fresh {
            self.report_stamps(&t, client, 0, &[stamp]);
        }
        fresh
    }

    /// True if every session limit would admit one more session for `client` now.
    fn admits(&self, t: &Table, client: &PublicKey) -> bool {
        let limits = &self.cfg.limits;
        // Buffers are charged as they fill (`net::budget`), not here: an idle session holds
        // none, and a full budget makes writers wait instead of refusing sessions.
        // An earlier process's sessions (after an upgrade) count too.
        let inherited = t.inherited.per_key.get(client).copied().unwrap_or(0);
        let per_key = t.per_key.get(client).copied().unwrap_or(0) + inherited;
        let sessions = self.sessions.load(Ordering::Relaxed) + t.inherited.total;
        sessions < limits.max_sessions && per_key < limits.max_sessions_per_key
    }

    /// Takes a session slot for `client` if every session limit allows it. Only a fresh hello
    /// (its timestamp never seen) gets here, so a replayed one holds none. Checking and counting
    /// happen under one lock, so concurrent handshakes cannot overshoot a cap.
    pub(super) fn reserve(&self, client: PublicKey) -> Option<Reservation<'_>> {
        let mut t = self.table();
        if !self.admits(&t, &client) {
            return None;
        }
        *t.per_key.entry(client).or_insert(0) += 1;
        self.sessions.fetch_add(1, Ordering::Relaxed);
        self.report_sessions(&t, &client);
        Some(Reservation { state: self, client, kept: false })
    }

    /// Gives back a session slot taken by [`State::reserve`].
    pub(super) fn release(&self, client: &PublicKey) {
        let mut t = self.table();
        if let Some(n) = t.per_key.get_mut(client) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                t.per_key.remove(client);
                t.key_budgets.remove(client);
            }
        }
        self.sessions.fetch_sub(1, Ordering::Relaxed);
        self.report_sessions(&t, client);
        drop(t);
        self.changed.notify_waiters();
    }

    /// The connection to the predecessor process, if there is one.
    pub(super) fn predecessor(&self) -> Option<Arc<tokio::net::UnixStream>> {
        self.predecessor.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Forgets the predecessor (it exited, or its connection failed).
    pub(super) fn lose_predecessor(&self) {
        *self.predecessor.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.changed.notify_waiters();
    }

    /// Token bucket per source address (per /64 for IPv6).
    pub(super) fn rate_ok(&self, ip: IpAddr) -> bool {
        let ip = rate_key(ip);
        let rate = f64::from(self.cfg.limits.handshakes_per_sec_per_ip.max(1));
        let now = Instant::now();
        let mut t = self.table();
        if t.rate.len() > 4096 {
            t.rate.retain(|_, (tokens, at)| *tokens + now.duration_since(*at).as_secs_f64() * rate < rate);
        }
        let (tokens, at) = t.rate.entry(ip).or_insert((rate, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * rate).min(rate);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The first-connection timestamps one client key has used, as a sliding window: a timestamp is
/// accepted once, and only if it is no more than [`Stamps::WINDOW`] older than the newest one
/// accepted. The window lets one client's concurrent connections (each stamped when it starts)
/// arrive out of order; a recorded hello is refused, whatever its age: inside the window its
/// stamp is remembered, and below the window it is too old.
#[derive(Default)]
pub(super) struct Stamps {
    /// Accepted stamps within the window of the newest.
    recent: std::collections::BTreeSet<u64>,
    /// Stamps at or below this are refused (the bottom of the window, or above stamps evicted
    /// to bound memory).
    floor: u64,
}

impl Stamps {
    /// The floor and the stamps accepted above it, for a new process taking over.
    pub(super) fn snapshot(&self) -> (u64, Vec<u64>) {
        (self.floor, self.recent.iter().copied().collect())
    }

    /// Merges another process's floor and accepted stamps for the same key: whatever either
    /// would refuse, the result refuses.
    pub(super) fn merge(&mut self, floor: u64, stamps: &[u64]) {
        self.floor = self.floor.max(floor);
        self.recent.extend(stamps.iter().copied());
        let newest = self.recent.last().copied().unwrap_or(0);
        self.floor = self.floor.max(newest.saturating_sub(Self::WINDOW));
        let floor = self.floor;
        self.recent.retain(|&s| s > floor);
        while self.recent.len() > Self::MAX {
            if let Some(oldest) = self.recent.pop_first() {
                self.floor = oldest;
            }
        }
    }

    /// How much older than the newest accepted stamp a stamp may be: 10 s, in nanoseconds.
    pub(super) const WINDOW: u64 = 10_000_000_000;
    /// Most stamps remembered per key; beyond this the oldest are dropped (and refused).
    const MAX: usize = 4096;

    /// Accepts `stamp` if it was never accepted and is within the window, and remembers it.
    pub(super) fn accept(&mut self, stamp: u64) -> bool {
        if stamp <= self.floor || self.recent.contains(&stamp) {
            return false;
        }
        let newest = self.recent.last().copied().unwrap_or(0).max(stamp);
        self.floor = self.floor.max(newest.saturating_sub(Self::WINDOW));
        if stamp <= self.floor {
            return false;
        }
        self.recent.insert(stamp);
        let floor = self.floor;
        self.recent.retain(|&s| s > floor);
        while self.recent.len() > Self::MAX {
            if let Some(oldest) = self.recent.pop_first() {
                self.floor = oldest;
            }
        }
        true
    }
}

/// Rate limit of the "refused a client key" log line: each key at most once a minute, and at
/// most [`RefusalLog::PER_MINUTE`] lines a minute in all, so that a scanner claiming random keys
/// cannot flood the log.
#[derive(Default)]
pub(super) struct RefusalLog {
    inner: Mutex<RefusalWindow>,
}

#[derive(Default)]
struct RefusalWindow {
    start: Option<Instant>,
    lines: usize,
    keys: HashMap<PublicKey, Instant>,
}

impl RefusalLog {
    const PER_MINUTE: usize = 10;

    /// True if a line for `key` may be logged now (and counts it).
    pub(super) fn allow(&self, key: PublicKey) -> bool {
        let now = Instant::now();
        let minute = std::time::Duration::from_secs(60);
        let mut w = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if w.start.is_none_or(|s| now.duration_since(s) >= minute) {
            w.start = Some(now);
            w.lines = 0;
            w.keys.retain(|_, at| now.duration_since(*at) < minute);
        }
        if w.lines >= Self::PER_MINUTE || w.keys.get(&key).is_some_and(|at| now.duration_since(*at) < minute) {
            return false;
        }
        w.lines += 1;
        w.keys.insert(key, now);
        true
    }
}

/// A session slot held by a handshake; released on drop unless the session was committed.
pub(super) struct Reservation<'a> {
    pub(super) state: &'a State,
    pub(super) client: PublicKey,
    pub(super) kept: bool,
}

impl Reservation<'_> {
    /// The session now exists: its task releases the slot when it ends.
    pub(super) fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if !self.kept {
            self.state.release(&self.client);
        }
    }
}

/// The rate-limit bucket of a source address: IPv4 addresses (also when IPv4-mapped) alone,
/// IPv6 addresses by their /64 prefix.
pub(super) fn rate_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::Stamps;

    #[test]
    fn a_stamp_is_accepted_once_and_only_within_the_window() {
        let w = Stamps::WINDOW;
        let mut s = Stamps::default();
        let t = 100 * w;
        assert!(s.accept(t));
        assert!(!s.accept(t), "the same stamp twice (a replay)");
        // Concurrent connections arrive out of order: an older stamp within the window is new.
        assert!(s.accept(t - w / 2));
        assert!(!s.accept(t - w / 2));
        assert!(s.accept(t + 1));
        // Older than the window of the newest: refused, even if never seen.
        assert!(!s.accept(t + 1 - w));
        assert!(s.accept(t + 3 * w));
        assert!(!s.accept(t + 2), "below the moved window");
        assert!(!s.accept(t), "an old stamp, seen before and now below the window");
    }

    #[test]
    fn merged_stamps_refuse_what_either_side_refused() {
        let w = Stamps::WINDOW;
        let t = 100 * w;
        let mut old = Stamps::default();
        assert!(old.accept(t));
        assert!(old.accept(t - w / 2));
        let (floor, list) = old.snapshot();
        let mut new = Stamps::default();
        assert!(new.accept(t - w / 4), "the new process's own stamp");
        new.merge(floor, &list);
        assert!(!new.accept(t), "accepted by the old process");
        assert!(!new.accept(t - w / 2), "accepted by the old process");
        assert!(!new.accept(t - w / 4), "accepted by the new process");
        assert!(!new.accept(t - w - 1), "below the window of the old process's newest");
        assert!(new.accept(t - w / 3), "within the window, never seen");
        // A later single stamp (floor 0) moves the window.
        new.merge(0, &[t + 2 * w]);
        assert!(!new.accept(t + w / 2), "below the moved window");
    }

    #[test]
    fn the_window_is_bounded_and_evicted_stamps_stay_refused() {
        let mut s = Stamps::default();
        let base = 1_000 * Stamps::WINDOW;
        for i in 0..(Stamps::MAX as u64 + 10) {
            assert!(s.accept(base + i));
        }
        assert!(s.recent.len() <= Stamps::MAX);
        for i in 0..10 {
            assert!(!s.accept(base + i), "an evicted stamp was accepted again");
        }
    }
}

#[cfg(test)]
mod refusal_tests {
    use super::RefusalLog;
    use crate::keys::Keypair;

    #[test]
    fn each_key_is_logged_once_a_minute_and_at_most_ten_lines_in_all() {
        let log = RefusalLog::default();
        let first = Keypair::generate().public;
        assert!(log.allow(first));
        assert!(!log.allow(first), "the same key twice in a minute");
        let logged = (0..50).filter(|_| log.allow(Keypair::generate().public)).count();
        assert_eq!(logged, RefusalLog::PER_MINUTE - 1);
    }
}
