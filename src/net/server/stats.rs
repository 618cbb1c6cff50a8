//! What a running server tells its operator: counters kept with atomics on the data path (no
//! lock is taken to count), and snapshots of them ([`ServerStats`]) for status output, metrics
//! and tests.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use super::state::State;
use crate::keys::PublicKey;
use crate::net::Error;
use crate::proto::HandshakeError;

/// A snapshot of a server's counters (see [`Listener::stats`](super::Listener::stats) and
/// [`StatsHandle`]). Gauges say how things are now; the fields named "since start" only grow.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServerStats {
    /// Sessions alive (attached or detached), counting first connections that hold a session
    /// slot until their handshake ends.
    pub sessions: usize,
    /// Sessions with a live connection now.
    pub attached: usize,
    /// Sessions without a connection now, kept for their client to resume until they expire.
    pub detached: usize,
    /// Connections in their handshake now.
    pub handshakes: usize,
    /// Bytes the sessions' buffers hold now (replay buffers: sent and not yet acknowledged;
    /// receive buffers of sessions without streams), charged against `Limits::buffer_budget`
    /// (`net::budget`). Streams' received bytes are not in it: their receive windows are
    /// reserved whole, and counted in [`ServerStats::budget_used`].
    pub buffered: usize,
    /// Bytes taken from `Limits::buffer_budget` now: what the buffers hold and what streams'
    /// receive windows reserve (never above the budget).
    pub budget_used: usize,
    /// Sessions opened since start (first connections whose handshake completed).
    pub opened: u64,
    /// Sessions expired since start.
    pub expired: usize,
    /// Successful resumes since start.
    pub resumes: usize,
    /// Stream bytes sent to clients since start: those of the sessions that ended, and those of
    /// the live sessions so far (read at each snapshot). It never goes down.
    pub bytes_to_clients: u64,
    /// Stream bytes received from clients since start, as [`ServerStats::bytes_to_clients`].
    pub bytes_from_clients: u64,
    /// Connections refused or failed before a session, since start, by reason.
    pub refused: Refusals,
    /// Streams refused since start (RESET LIMIT) for want of a stream slot: their key's share
    /// of the slots, or the server's (each slot may hold a file descriptor).
    pub streams_refused_slots: u64,
    /// Streams refused since start (RESET LIMIT) for want of room for their receive window:
    /// their key's share of the buffer budget, or the budget.
    pub streams_refused_memory: u64,
    /// Sessions that earlier server processes still hold after an upgrade (they resume and
    /// end there, and count against the caps here): as they last reported them; 0 once they
    /// have exited, or without an upgrade. Not in [`ServerStats::sessions`].
    pub earlier_sessions: usize,
}

/// Connections that did not become (or resume) a session, by reason, since start. The set of
/// reasons is fixed, so that a metric labelled by it stays bounded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Refusals {
    /// Over the handshake rate of their source address (answered BUSY at once).
    pub rate_limited: u64,
    /// Refused by a limit: sessions, per-key sessions, buffer budget, resume rate (BUSY).
    pub busy: u64,
    /// A client key not on the allow-list (or removed from it).
    pub not_allowed: u64,
    /// A recorded hello sent again, or one older than the replay window.
    pub replayed: u64,
    /// A resume naming a session this server does not have (expired, or from before a restart).
    pub unknown_session: u64,
    /// No complete handshake within the handshake timeout.
    pub timed_out: u64,
    /// Closed to make room at the handshake cap (the oldest unfinished handshake).
    pub evicted: u64,
    /// Resumes closed before their key confirmation by a newer resume of the same session
    /// (a session has at most two unconfirmed resumes).
    pub superseded: u64,
    /// Anything else: malformed or undecryptable messages, a wrong protocol version, I/O errors.
    pub failed: u64,
}

/// Which [`Refusals`] field an event counts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Refusal {
    RateLimited,
    Busy,
    NotAllowed,
    Replayed,
    UnknownSession,
    TimedOut,
    Evicted,
    Superseded,
    Failed,
}

impl Refusal {
    const COUNT: usize = 9;

    /// Its name, as the metrics label it and the log gives it.
    pub(super) fn name(self) -> &'static str {
        match self {
            Refusal::RateLimited => "rate_limited",
            Refusal::Busy => "busy",
            Refusal::NotAllowed => "not_allowed",
            Refusal::Replayed => "replayed",
            Refusal::UnknownSession => "unknown_session",
            Refusal::TimedOut => "timed_out",
            Refusal::Evicted => "evicted",
            Refusal::Superseded => "superseded",
            Refusal::Failed => "failed",
        }
    }

    /// The reason a failed handshake counts under.
    pub(super) fn of(e: &Error) -> Refusal {
        match e {
            Error::SessionCap { .. } => Refusal::Busy,
            Error::Handshake { source, .. } => match source {
                HandshakeError::Busy => Refusal::Busy,
                // A resume of a session whose key was removed counts here too (found by an
                // operator's day: it counted as `failed`).
                HandshakeError::NotAllowed(_) | HandshakeError::UnknownClient | HandshakeError::NoLongerAllowed => {
                    Refusal::NotAllowed
                }
                HandshakeError::Replayed | HandshakeError::Stale => Refusal::Replayed,
                HandshakeError::UnknownSession => Refusal::UnknownSession,
                _ => Refusal::Failed,
            },
            _ => Refusal::Failed,
        }
    }
}

/// The server's counters that [`State`] has no other use for; all relaxed atomics.
#[derive(Default)]
pub(super) struct Counters {
    pub(super) attached: AtomicUsize,
    pub(super) detached: AtomicUsize,
    pub(super) opened: AtomicU64,
    pub(super) bytes_to_clients: AtomicU64,
    pub(super) bytes_from_clients: AtomicU64,
    refused: [AtomicU64; Refusal::COUNT],
    /// Streams refused (RESET LIMIT) for want of a slot or of memory.
    pub(super) streams_refused: Arc<crate::net::budget::StreamRefusals>,
}

impl Counters {
    /// Counts one refused or failed connection.
    pub(super) fn refused(&self, why: Refusal) {
        self.refused[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    fn refusals(&self) -> Refusals {
        let n = |r: Refusal| self.refused[r as usize].load(Ordering::Relaxed);
        Refusals {
            rate_limited: n(Refusal::RateLimited),
            busy: n(Refusal::Busy),
            not_allowed: n(Refusal::NotAllowed),
            replayed: n(Refusal::Replayed),
            unknown_session: n(Refusal::UnknownSession),
            timed_out: n(Refusal::TimedOut),
            evicted: n(Refusal::Evicted),
            superseded: n(Refusal::Superseded),
            failed: n(Refusal::Failed),
        }
    }
}

/// Whether a session is counted as attached or detached now; moving it between the two, and
/// dropping it, keeps [`Counters::attached`] and [`Counters::detached`] right on every path out
/// of a session's task.
pub(super) struct Phase<'a> {
    counters: &'a Counters,
    now: Option<&'a AtomicUsize>,
}

impl<'a> Phase<'a> {
    pub(super) fn new(counters: &'a Counters) -> Self {
        Phase { counters, now: None }
    }

    /// Counts the session as attached (`true`) or detached.
    pub(super) fn set(&mut self, attached: bool) {
        let next = if attached { &self.counters.attached } else { &self.counters.detached };
        if self.now.is_some_and(|now| std::ptr::eq(now, next)) {
            return;
        }
        if let Some(now) = self.now.take() {
            now.fetch_sub(1, Ordering::Relaxed);
        }
        next.fetch_add(1, Ordering::Relaxed);
        self.now = Some(next);
    }
}

impl Drop for Phase<'_> {
    fn drop(&mut self) {
        if let Some(now) = self.now.take() {
            now.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Reads a server's counters while something else owns its [`Listener`](super::Listener) (for
/// example [`crate::tunnel::serve_until`]); from [`Listener::stats_handle`](super::Listener::stats_handle).
#[derive(Clone)]
pub struct StatsHandle {
    pub(super) state: Arc<State>,
}

impl std::fmt::Debug for StatsHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatsHandle").field("stats", &self.stats()).finish()
    }
}

impl StatsHandle {
    /// The counters now. Cheap: atomic loads, and one short lock for the handshake count.
    pub fn stats(&self) -> ServerStats {
        let s = &self.state;
        let c = &s.counters;
        let (bytes_to_clients, bytes_from_clients) = s.registry.bytes(c);
        ServerStats {
            sessions: s.sessions.load(Ordering::Relaxed),
            attached: c.attached.load(Ordering::Relaxed),
            detached: c.detached.load(Ordering::Relaxed),
            handshakes: s.pending().live.len(),
            buffered: s.budget.held(),
            budget_used: s.budget.used(),
            opened: c.opened.load(Ordering::Relaxed),
            expired: s.expired.load(Ordering::Relaxed),
            resumes: s.resumes.load(Ordering::Relaxed),
            bytes_to_clients,
            bytes_from_clients,
            refused: c.refusals(),
            streams_refused_slots: c.streams_refused.slots.load(Ordering::Relaxed),
            streams_refused_memory: c.streams_refused.memory.load(Ordering::Relaxed),
            earlier_sessions: s.table().inherited.total,
        }
    }

    /// Sessions per client key now (as [`ServerStats::sessions`] counts them), in no particular
    /// order. Only keys with a session appear, and only allowed keys can have one, so the list
    /// is bounded by the allow-list (and the keys removed from it whose sessions live on).
    pub fn sessions_per_key(&self) -> Vec<(PublicKey, usize)> {
        self.state.table().per_key.iter().map(|(k, n)| (*k, *n)).collect()
    }
}
