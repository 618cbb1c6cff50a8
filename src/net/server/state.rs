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
use crate::net::stream::{Session, Shared};
use crate::proto::frame::RESUME_ID_LEN;
use crate::proto::{StaticSecrets, Transport};

use super::stamps::{wall_clock, Stamps};
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
    /// The client's allow-list name when the session opened.
    pub(super) name: Option<String>,
    /// Its id, and what its tunnels report (shared with its [`Peer`]s).
    pub(super) activity: Arc<super::status::Activity>,
    /// The budget of the session's own lines (see [`State::life`]).
    pub(super) life: Arc<crate::net::quiet::LogBudget>,
    /// Where it is connected from, and since when (for `holdfast status`).
    pub(super) track: super::status::Track,
    /// When the session was committed.
    pub(super) opened: Instant,
    pub(super) replace: mpsc::Sender<NewLink>,
    /// Token bucket for `resumes_per_sec_per_session`: (tokens, last refill).
    pub(super) resume_tokens: Mutex<Option<(f64, Instant)>>,
    /// The highest resume attempt number whose hello authenticated: a hello whose number is not
    /// above it is a replay, refused before any cryptography.
    pub(super) resume_mark: AtomicU64,
    /// The session's resumes between their authenticated hello and their key confirmation,
    /// oldest first: at most [`Entry::MAX_RESUMING`] (see [`Entry::start_resume`]).
    pub(super) resuming: Mutex<Vec<Resuming>>,
}

/// A resume handshake of a session, past its authenticated hello and not yet confirmed.
pub(super) struct Resuming {
    /// Its handshake's id in [`Pending`].
    pub(super) id: u64,
    /// When its hello authenticated.
    pub(super) since: Instant,
    pub(super) claim: Claim,
}

/// Why [`Entry::start_resume`] refused a resume.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct ResumesFull;

impl Entry {
    /// Most resumes of one session between their authenticated hello and their key confirmation.
    pub(super) const MAX_RESUMING: usize = 2;
    /// How long the older of a session's unconfirmed resumes is kept from a newer one: a real
    /// resume confirms one round trip after its reply, and a client retrying on a slow link
    /// (its attempts staggered by about 250 ms) must not have each attempt cut by the next.
    pub(super) const SUPERSEDE_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

    /// Registers handshake `id` (whose claim is `claim`) as one of the session's unconfirmed
    /// resumes. If the session already has [`Entry::MAX_RESUMING`], the oldest of them is
    /// claimed for eviction, if it has waited [`Entry::SUPERSEDE_AFTER`] and has not confirmed:
    /// its id is returned, with true if it had not replied yet (it may be told BUSY), and the
    /// caller closes it ([`State::close_handshake`]). Otherwise the new one is refused.
    pub(super) fn start_resume(
        &self,
        id: u64,
        claim: &Claim,
        now: Instant,
    ) -> Result<Option<(u64, bool)>, ResumesFull> {
        let mut list = self.resuming.lock().unwrap_or_else(|p| p.into_inner());
        let mut victim = None;
        if list.len() >= Self::MAX_RESUMING {
            let oldest = &list[0];
            if now.saturating_duration_since(oldest.since) < Self::SUPERSEDE_AFTER {
                return Err(ResumesFull);
            }
            let open = oldest.claim.for_eviction().ok_or(ResumesFull)?;
            victim = Some((list.remove(0).id, open));
        }
        list.push(Resuming { id, since: now, claim: claim.clone() });
        Ok(victim)
    }

    /// True if a new resume of the session would be refused now by [`Entry::start_resume`]
    /// because its two unconfirmed resumes are too young to be replaced: checked before any
    /// cryptography, so that a flood of hellos for a session that has two costs no
    /// Diffie-Hellman operation.
    pub(super) fn resumes_full(&self, now: Instant) -> bool {
        let list = self.resuming.lock().unwrap_or_else(|p| p.into_inner());
        list.len() >= Self::MAX_RESUMING
            && list.first().is_some_and(|o| now.saturating_duration_since(o.since) < Self::SUPERSEDE_AFTER)
    }

    /// Forgets handshake `id` as an unconfirmed resume of the session (it confirmed or ended).
    pub(super) fn end_resume(&self, id: u64) {
        self.resuming.lock().unwrap_or_else(|p| p.into_inner()).retain(|r| r.id != id);
    }

    /// Ends the session because its key is no longer allowed: CLOSE code 6 goes out on its link
    /// (if it has one), and its driver is woken to end it, attached or detached.
    pub(super) fn revoke(&self) {
        use crate::proto::{CloseCode, SessionError};
        self.shared.fail(CloseCode::NotAllowed, SessionError::NotAllowed);
        self.shared.wake_driver.notify_one();
    }

    /// The session's resume bucket (burst `rate`, refilled at `rate` per second), refilled to
    /// `now`; `take` spends a token if there is one. True if a token was there. A token is spent
    /// by every resume hello that authenticates, whatever the answer (never by one that does
    /// not, so a replayed or forged hello cannot use up a real client's budget); a client
    /// looping on resumes, confirming them or not, is held to `rate` per second on average.
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
    /// Its connection's source.
    pub(super) addr: SocketAddr,
    pub(super) started: Instant,
    pub(super) task: AbortHandle,
    pub(super) claim: Claim,
    /// A second descriptor of its connection, to answer BUSY on if it is evicted.
    pub(super) busy: Option<std::os::fd::OwnedFd>,
}

impl Live {
    /// Closes the handshake, which an evictor has claimed ([`Claim::for_eviction`]): tells its
    /// client BUSY if nothing was written on the connection yet (`open`), so that it retries
    /// after its backoff instead of taking the close for an authentication refusal, and stops
    /// its task (which drops the connection).
    pub(super) fn close(self, open: bool) {
        if open {
            if let Some(fd) = self.busy {
                let mut s = std::net::TcpStream::from(fd);
                let _ = s.set_nonblocking(true);
                let _ = std::io::Write::write(&mut s, &crate::proto::handshake::busy_record());
            }
        }
        self.task.abort();
    }
}

/// The id and claim of a handshake in progress, as its own task knows them.
#[derive(Clone, Default)]
pub(super) struct Slot {
    pub(super) id: u64,
    pub(super) claim: Claim,
}

/// Who speaks next on a handshake's connection: its task (to send its reply, or to hand the
/// connection to an earlier process) or an evictor (the handshake cap, or a newer resume of the
/// same session) closing it. Whichever claims it first; the other stays silent, so the two
/// never write into each other's bytes. A resume's task gives its claim back once its reply is
/// written ([`Claim::awaiting`]): it then only reads, and an evictor may close it, silently,
/// until its key confirmation arrives ([`Claim::confirmed`]).
#[derive(Clone, Default)]
pub(super) struct Claim(Arc<std::sync::atomic::AtomicU8>);

impl Claim {
    const OPEN: u8 = 0;
    const EVICTED: u8 = 1;
    const TASK: u8 = 2;
    /// The task has written its whole reply and waits for the key confirmation, writing
    /// nothing: an evictor may close the connection, and writes nothing either.
    const AWAITING: u8 = 3;

    /// The task claims the connection; false if it was evicted first.
    pub(super) fn for_task(&self) -> bool {
        let r = self.0.compare_exchange(Self::OPEN, Self::TASK, Ordering::AcqRel, Ordering::Acquire);
        matches!(r, Ok(_) | Err(Self::TASK))
    }

    /// The task has written its reply and now only waits for the key confirmation: until
    /// [`Claim::confirmed`], the connection may be evicted.
    pub(super) fn awaiting(&self) {
        let _ = self.0.compare_exchange(Self::TASK, Self::AWAITING, Ordering::AcqRel, Ordering::Acquire);
    }

    /// The key confirmation arrived: the task takes the connection back; false if it was
    /// evicted meanwhile.
    pub(super) fn confirmed(&self) -> bool {
        let r = self.0.compare_exchange(Self::AWAITING, Self::TASK, Ordering::AcqRel, Ordering::Acquire);
        matches!(r, Ok(_) | Err(Self::TASK))
    }

    /// An evictor claims the connection: `Some(true)` if nothing was written on it yet (it may
    /// answer BUSY), `Some(false)` if the task's reply was (it must close silently), `None` if
    /// the task holds it (it is writing its reply, handing the connection on, or confirmed).
    pub(super) fn for_eviction(&self) -> Option<bool> {
        let evict = |from| self.0.compare_exchange(from, Self::EVICTED, Ordering::AcqRel, Ordering::Acquire).is_ok();
        if evict(Self::OPEN) {
            Some(true)
        } else if evict(Self::AWAITING) {
            Some(false)
        } else {
            None
        }
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
    /// Resume ids of sessions ended because their key was removed from the allow-list, with
    /// when: a resume with one gets REJECT 4 (not allowed) instead of 1 (unknown session), for a
    /// session expiry time.
    pub(super) revoked: HashMap<[u8; RESUME_ID_LEN], Instant>,
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
    /// The live sessions, for `holdfast status` and the live byte counts.
    pub(super) registry: super::status::Registry,
    /// Refusals logged and summarised per reason and source (see [`super::refusals`]).
    pub(super) refusal_summary: super::refusals::Summary,
    /// Which refused client keys were logged lately (see [`RefusalLog`]).
    pub(super) refusal_log: RefusalLog,
    /// The log budgets of the server and of each key (see [`crate::net::quiet`]), for the
    /// lines of sessions' streams.
    pub(super) logs: crate::net::quiet::KeyedLogs,
    /// The same, for sessions' own lines (opened, resumed, closed): lines of streams cannot
    /// spend them (a key could otherwise hide its own logins behind its streams' lines).
    pub(super) life: crate::net::quiet::KeyedLogs,
    /// Over-rate connections being answered with BUSY.
    pub(super) refusing: AtomicUsize,
    pub(super) pending: Mutex<Pending>,
    pub(super) accepted: mpsc::Sender<(Session, Peer)>,
    /// The connection to the process this one took the listener over from, while it lives:
    /// resumes of sessions this process does not know are handed to it (see `handover`).
    pub(super) predecessor: Mutex<Option<Arc<tokio::net::UnixStream>>>,
    /// True once this process has handed its listener to a new one.
    pub(super) retired: std::sync::atomic::AtomicBool,
    /// True once the [`super::Listener`] was dropped: the program is stopping this server.
    pub(super) stopping: std::sync::atomic::AtomicBool,
    /// Woken when a session ends, the process retires or the listener is dropped.
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
    /// keys no longer on it, and ends every session of those keys (see [`State::revoke`]).
    pub(super) fn set_allow(&self, list: Arc<AllowList>) -> usize {
        let statics = StaticSecrets::new(&self.cfg.keypair.private, list.iter().map(|p| &p.key));
        *self.statics.write().unwrap_or_else(|p| p.into_inner()) = statics;
        self.table().first_marks.retain(|k, _| list.lookup(k).is_some());
        *self.allow.write().unwrap_or_else(|p| p.into_inner()) = list.clone();
        self.revoke(&list)
    }

    /// Ends every session whose key is not on `list` (the list just put in force): each is
    /// failed with CLOSE code 6 (not allowed), sent at once on its link if it has one, and its
    /// resume ids are remembered so that a resume gets REJECT 4. The list is put in force
    /// first, so a session committed meanwhile is either seen here or checks the new list
    /// itself (`commit_new`). Returns the number of sessions ended.
    fn revoke(&self, list: &AllowList) -> usize {
        let allowed: HashSet<PublicKey> = list.iter().map(|p| p.key).collect();
        let now = Instant::now();
        let mut ended: Vec<Arc<Entry>> = Vec::new();
        {
            let mut t = self.table();
            let expiry = self.cfg.limits.session_expiry;
            t.revoked.retain(|_, at| now.saturating_duration_since(*at) < expiry);
            let gone: Vec<_> = t
                .by_ticket
                .iter()
                .filter(|(_, e)| !allowed.contains(&e.client))
                .map(|(id, e)| (*id, e.clone()))
                .collect();
            for (id, entry) in gone {
                t.revoked.insert(id, now);
                if !ended.iter().any(|e| Arc::ptr_eq(e, &entry)) {
                    ended.push(entry);
                }
            }
        }
        for entry in &ended {
            let _in = entry.activity.tag.span().entered();
            tracing::info!(client = %entry.who, "the client's key is no longer on the allow-list: ending its session");
            entry.revoke();
        }
        ended.len()
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
        let (limit, streams) = (self.cfg.limits.buffer_per_key, self.cfg.limits.max_streams_per_key);
        self.table().key_budgets.entry(*client).or_insert_with(|| Budget::with_streams(limit, streams)).clone()
    }

    /// Accepts a first connection's timestamp if `client`'s (an allowed key's) stamp window
    /// takes it ([`Stamps::accept`], against the server's clock now), and remembers it.
    pub(super) fn accept_stamp(&self, client: &PublicKey, stamp: u64) -> bool {
        let now = wall_clock();
        let mut t = self.table();
        let fresh = t.first_marks.entry(*client).or_default().accept(stamp, now);
        if fresh {
            self.report_stamps(&t, client, 0, &[stamp]);
        }
        fresh
    }

    /// True if every session limit would admit one more session for `client` now.
    fn admits(&self, t: &Table, client: &PublicKey) -> Result<(), CapReached> {
        let limits = &self.cfg.limits;
        // Buffers are charged as they fill (`net::budget`), not here: an idle session holds
        // none, and a full budget makes writers wait instead of refusing sessions.
        // An earlier process's sessions (after an upgrade) count too.
        let inherited = t.inherited.per_key.get(client).copied().unwrap_or(0);
        let per_key = t.per_key.get(client).copied().unwrap_or(0) + inherited;
        let sessions = self.sessions.load(Ordering::Relaxed) + t.inherited.total;
        if sessions >= limits.max_sessions {
            return Err(CapReached::Server { sessions, max: limits.max_sessions });
        }
        if per_key >= limits.max_sessions_per_key {
            return Err(CapReached::Key { sessions: per_key, max: limits.max_sessions_per_key });
        }
        Ok(())
    }

    /// Takes a session slot for `client` if every session limit allows it. Only a fresh hello
    /// (its timestamp never seen) gets here, so a replayed one holds none. Checking and counting
    /// happen under one lock, so concurrent handshakes cannot overshoot a cap.
    ///
    /// # Errors
    /// Which cap is reached.
    pub(super) fn reserve(&self, client: PublicKey) -> Result<Reservation<'_>, CapReached> {
        let mut t = self.table();
        self.admits(&t, &client)?;
        *t.per_key.entry(client).or_insert(0) += 1;
        self.sessions.fetch_add(1, Ordering::Relaxed);
        self.report_sessions(&t, &client);
        Ok(Reservation { state: self, client, kept: false })
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

    /// Closes handshake `id`, which an evictor has claimed (see [`Live::close`]), if it is
    /// still in progress.
    pub(super) fn close_handshake(&self, id: u64, open: bool) {
        let live = {
            let mut p = self.pending();
            let i = p.live.iter().position(|l| l.id == id);
            i.and_then(|i| p.live.remove(i))
        };
        if let Some(live) = live {
            live.close(open);
        }
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

/// The session cap a first connection found reached ([`State::reserve`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CapReached {
    /// The server holds `max` sessions (an earlier process's, after an upgrade, included).
    #[error(
        "the server is at its session limit ({sessions} held, max-sessions = {max}; detached sessions count until they resume or expire)"
    )]
    Server {
        /// Sessions held.
        sessions: usize,
        /// The limit.
        max: usize,
    },
    /// The client's key holds `max` sessions.
    #[error(
        "this client key is at its session limit ({sessions} held, max-sessions-per-key = {max}; detached sessions count until they resume or expire)"
    )]
    Key {
        /// Sessions the key holds.
        sessions: usize,
        /// The limit.
        max: usize,
    },
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

#[cfg(test)]
mod resume_tests {
    use std::sync::atomic::AtomicU64;
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    use super::{Claim, Entry, ResumesFull};
    use crate::keys::Keypair;
    use crate::net::stream::Shared;
    use crate::proto::{Role, Session, SessionConfig};

    fn entry() -> Entry {
        let client = Keypair::generate().public;
        let (replace, _) = tokio::sync::mpsc::channel(1);
        Entry {
            shared: Shared::new(Session::new(Role::Server, SessionConfig::default()), client, 0),
            client,
            who: String::new(),
            name: None,
            activity: super::super::status::Activity::new(super::super::status::SessionTag(0)),
            life: std::sync::Arc::new(crate::net::quiet::LogBudget::new(crate::net::quiet::Level::SESSION)),
            track: super::super::status::Track::new(std::net::SocketAddr::from(([127, 0, 0, 1], 1)), true),
            opened: Instant::now(),
            replace,
            resume_tokens: Mutex::new(None),
            resume_mark: AtomicU64::new(0),
            resuming: Mutex::new(Vec::new()),
        }
    }

    /// Review 2, item 1: a session holds at most two unconfirmed resumes; a newer one replaces
    /// the older once that one has waited a second (silently if it has replied), and never one
    /// whose task holds its connection (writing its reply, or confirmed).
    #[test]
    fn a_session_holds_two_unconfirmed_resumes_and_a_newer_one_replaces_the_older() {
        let e = entry();
        let (t0, later) = (Instant::now(), Entry::SUPERSEDE_AFTER);
        let c: Vec<Claim> = (0..5).map(|_| Claim::default()).collect();
        assert_eq!(e.start_resume(1, &c[1], t0), Ok(None));
        assert_eq!(e.start_resume(2, &c[2], t0), Ok(None));
        let young = t0 + later - Duration::from_millis(1);
        assert!(e.resumes_full(young));
        assert_eq!(e.start_resume(3, &c[3], young), Err(ResumesFull), "a young resume was replaced");
        // The oldest has replied and waits for its confirmation: replaced, silently.
        assert!(c[1].for_task());
        c[1].awaiting();
        assert!(!e.resumes_full(t0 + later));
        assert_eq!(e.start_resume(3, &c[3], t0 + later), Ok(Some((1, false))));
        assert!(!c[1].confirmed(), "an evicted resume confirmed");
        // The next oldest has not replied: replaced, and may be told BUSY.
        assert_eq!(e.start_resume(4, &c[4], t0 + 2 * later), Ok(Some((2, true))));
        assert!(!c[2].for_task(), "an evicted resume's task took the connection");
        // The oldest now is writing its reply: not replaced.
        assert!(c[3].for_task());
        assert_eq!(e.start_resume(5, &c[0], t0 + 4 * later), Err(ResumesFull));
        // It confirmed and ended: room again.
        c[3].awaiting();
        assert!(c[3].confirmed());
        e.end_resume(3);
        assert_eq!(e.start_resume(5, &c[0], t0 + 4 * later), Ok(None));
        assert_eq!(e.resuming.lock().unwrap().len(), Entry::MAX_RESUMING);
    }
}
