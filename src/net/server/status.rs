//! What `holdfast status` shows of each live session: its short id (also on every log line
//! about it), where it is connected from, whether it is attached and since when, its round-trip
//! time, bytes, resumes, and the tunnel streams and forwards it has open. The listener keeps
//! each live session in a registry ([`Registry`]); [`StatsHandle::sessions`] takes a snapshot.
//!
//! The tunnel layer (or any code that serves sessions from a [`Listener`](super::Listener))
//! tells a session's [`Peer`] what it carries: [`Peer::stream_opened`] per open tunnel stream,
//! [`Peer::forward_opened`] per reverse listener, [`Peer::carried`] with each tunnel's bytes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use super::state::Entry;
use super::stats::{Counters, StatsHandle};
use super::Peer;
use crate::keys::PublicKey;

/// A session's short id: 8 hex digits, random per session (not derived from any ticket or key),
/// shown by `holdfast status` and on every log line about the session (`session{id=…}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionTag(pub u32);

impl std::fmt::Display for SessionTag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:08x}", self.0)
    }
}

impl SessionTag {
    /// The span every log line about the session is in: at ERROR level, so that it is kept
    /// whatever level the log is filtered at.
    pub fn span(self) -> tracing::Span {
        tracing::error_span!("session", id = %self)
    }
}

/// One live session as [`StatsHandle::sessions`] saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionStatus {
    /// Its short id, as in the log.
    pub id: SessionTag,
    /// The client's allow-list name now (its name when the session opened if its key has
    /// been removed from the list since), if it has one.
    pub name: Option<String>,
    /// The client's public key.
    pub key: PublicKey,
    /// The source address of its current (or last) connection.
    pub addr: SocketAddr,
    /// True if it has a connection now; false while it waits for a resume.
    pub attached: bool,
    /// When it was last attached or detached (wall clock).
    pub since: SystemTime,
    /// When it opened (wall clock).
    pub opened: SystemTime,
    /// The smoothed round-trip time of its link, once measured.
    pub rtt: Option<Duration>,
    /// Stream bytes sent to the client so far.
    pub bytes_to_client: u64,
    /// Stream bytes received from the client so far.
    pub bytes_from_client: u64,
    /// Resumes so far.
    pub resumes: u64,
    /// Tunnel streams open now ([`Peer::stream_opened`]).
    pub streams: usize,
    /// Forwards open now, as the tunnel layer describes them ([`Peer::forward_opened`]), for
    /// example `listen 127.0.0.1:8080`.
    pub forwards: Vec<String>,
}

/// Logs a session's end line, given its closed tunnels' bytes (to the client, from the client,
/// how many tunnels) and how many tunnels were reset, if the tunnel layer reported any.
pub(super) type EndLine = Box<dyn FnOnce(Option<((u64, u64, u64), u64)>) + Send>;

/// What a session's [`Peer`] and its server-side entry share: counters the tunnel layer keeps,
/// and the session's end line, logged once both the session's driver and every `Peer` of it
/// are done, so that it comes after the lines of its tunnels.
pub(crate) struct Activity {
    pub(super) tag: SessionTag,
    streams: AtomicUsize,
    forwards: Mutex<Vec<(u64, String)>>,
    next_forward: AtomicU64,
    /// Bytes of the session's tunnels that ended, (to the client, from the client), and how
    /// many of them.
    carried: Mutex<(u64, u64, u64)>,
    /// How many of the session's tunnels ended with a reset (their bytes are not counted).
    reset_tunnels: AtomicU64,
    /// The end line to log on drop, set by the session's driver.
    pub(super) end: Mutex<Option<EndLine>>,
}

impl Activity {
    pub(super) fn new(tag: SessionTag) -> Arc<Activity> {
        Arc::new(Activity {
            tag,
            streams: AtomicUsize::new(0),
            forwards: Mutex::new(Vec::new()),
            next_forward: AtomicU64::new(0),
            carried: Mutex::new((0, 0, 0)),
            reset_tunnels: AtomicU64::new(0),
            end: Mutex::new(None),
        })
    }
}

impl PartialEq for Activity {
    fn eq(&self, other: &Self) -> bool {
        self.tag == other.tag
    }
}

impl Eq for Activity {}

impl std::fmt::Debug for Activity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Activity").field("session", &self.tag).finish_non_exhaustive()
    }
}

impl Drop for Activity {
    fn drop(&mut self) {
        let carried = *self.carried.get_mut().unwrap_or_else(|p| p.into_inner());
        let reset = self.reset_tunnels.load(Ordering::Relaxed);
        let tunnels = (carried.2 > 0 || reset > 0).then_some((carried, reset));
        if let Some(log) = self.end.get_mut().unwrap_or_else(|p| p.into_inner()).take() {
            // Dropped by a task about this session, the line is in its span already.
            let inside = tracing::Span::current().metadata().is_some_and(|m| m.name() == "session");
            let _in = (!inside).then(|| self.tag.span().entered());
            log(tunnels);
        }
    }
}

/// Counts one open tunnel stream of a session until dropped (see [`Peer::stream_opened`]).
#[must_use = "the stream counts as open until this is dropped"]
pub struct StreamGuard(Arc<Activity>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for StreamGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("StreamGuard").field(&self.0.tag).finish()
    }
}

/// Lists one forward of a session until dropped (see [`Peer::forward_opened`]).
#[must_use = "the forward is listed until this is dropped"]
pub struct ForwardGuard(Arc<Activity>, u64);

impl Drop for ForwardGuard {
    fn drop(&mut self) {
        self.0.forwards.lock().unwrap_or_else(|p| p.into_inner()).retain(|(n, _)| *n != self.1);
    }
}

impl std::fmt::Debug for ForwardGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("ForwardGuard").field(&self.0.tag).finish()
    }
}

impl Peer {
    /// The session's short id, as logged and as `holdfast status` shows it.
    pub fn session(&self) -> SessionTag {
        self.activity.tag
    }

    /// Counts a tunnel stream of this session as open (in [`SessionStatus::streams`]) until
    /// the guard is dropped. The hook for whatever carries streams on a session.
    pub fn stream_opened(&self) -> StreamGuard {
        self.activity.streams.fetch_add(1, Ordering::Relaxed);
        StreamGuard(self.activity.clone())
    }

    /// Lists `what` (for example `listen 127.0.0.1:8080`) in [`SessionStatus::forwards`] until
    /// the guard is dropped.
    pub fn forward_opened(&self, what: String) -> ForwardGuard {
        let n = self.activity.next_forward.fetch_add(1, Ordering::Relaxed);
        self.activity.forwards.lock().unwrap_or_else(|p| p.into_inner()).push((n, what));
        ForwardGuard(self.activity.clone(), n)
    }

    /// Counts one tunnel of this session that ended with a reset (of its stream or its
    /// connection), with the bytes it moved before (to the client, from the client): the
    /// session's "session closed" line gives how many (`tunnels_reset`), beside the closed
    /// ones, and sums the bytes of both.
    pub fn tunnel_reset(&self, to_client: u64, from_client: u64) {
        self.activity.reset_tunnels.fetch_add(1, Ordering::Relaxed);
        let mut c = self.activity.carried.lock().unwrap_or_else(|p| p.into_inner());
        *c = (c.0.saturating_add(to_client), c.1.saturating_add(from_client), c.2);
    }

    /// Adds the bytes of one tunnel that ended cleanly (as its "tunnel closed" line gives them)
    /// to the session's: its "session closed" line then gives the sum over its tunnels, reset
    /// ones included ([`Peer::tunnel_reset`]), so that the lines agree (the stream bytes, which
    /// include the tunnel requests and replies, are in the metrics and `holdfast status`).
    pub fn carried(&self, to_client: u64, from_client: u64) {
        let mut c = self.activity.carried.lock().unwrap_or_else(|p| p.into_inner());
        *c = (c.0.saturating_add(to_client), c.1.saturating_add(from_client), c.2 + 1);
    }
}

/// Where a session is now, kept by its driver for [`SessionStatus`].
pub(super) struct Track {
    inner: Mutex<TrackInner>,
    resumes: AtomicU64,
}

struct TrackInner {
    addr: SocketAddr,
    attached: bool,
    since: SystemTime,
}

impl Track {
    pub(super) fn new(addr: SocketAddr, attached: bool) -> Track {
        Track { inner: Mutex::new(TrackInner { addr, attached, since: SystemTime::now() }), resumes: AtomicU64::new(0) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TrackInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The session lost its link.
    pub(super) fn detached(&self) {
        let mut t = self.lock();
        if t.attached {
            t.attached = false;
            t.since = SystemTime::now();
        }
    }

    /// The session resumed on a link from `addr`.
    pub(super) fn resumed(&self, addr: SocketAddr) {
        self.resumes.fetch_add(1, Ordering::Relaxed);
        let mut t = self.lock();
        *t = TrackInner { addr, attached: true, since: SystemTime::now() };
    }
}

/// The live sessions of a listener, by id; and the bytes of those that ended, kept under the
/// same lock so that a session's bytes move from the live sum to the ended sum at once (the
/// byte counters never go down).
#[derive(Default)]
pub(super) struct Registry {
    inner: Mutex<RegistryInner>,
}

#[derive(Default)]
struct RegistryInner {
    live: HashMap<SessionTag, Arc<Entry>>,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, RegistryInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A fresh id, unused by any live session.
    pub(super) fn fresh_tag(&self) -> SessionTag {
        let r = self.lock();
        loop {
            let tag = SessionTag(rand::random());
            if !r.live.contains_key(&tag) {
                return tag;
            }
        }
    }

    pub(super) fn insert(&self, entry: Arc<Entry>) {
        self.lock().live.insert(entry.activity.tag, entry);
    }

    /// Removes a session that ended, and adds its stream bytes to the ended sessions' in
    /// `counters`; returns them (to the client, from the client).
    pub(super) fn remove(&self, entry: &Entry, counters: &Counters) -> (u64, u64) {
        let mut r = self.lock();
        let bytes = stream_bytes(entry);
        counters.bytes_to_clients.fetch_add(bytes.0, Ordering::Relaxed);
        counters.bytes_from_clients.fetch_add(bytes.1, Ordering::Relaxed);
        r.live.remove(&entry.activity.tag);
        bytes
    }

    /// The stream bytes of every session since start, (to clients, from clients): those of
    /// the sessions that ended, and those of the live ones so far.
    pub(super) fn bytes(&self, counters: &Counters) -> (u64, u64) {
        let r = self.lock();
        let mut sum =
            (counters.bytes_to_clients.load(Ordering::Relaxed), counters.bytes_from_clients.load(Ordering::Relaxed));
        for e in r.live.values() {
            let b = stream_bytes(e);
            sum = (sum.0.saturating_add(b.0), sum.1.saturating_add(b.1));
        }
        sum
    }

    fn snapshot(&self) -> Vec<Arc<Entry>> {
        self.lock().live.values().cloned().collect()
    }
}

/// A session's bytes so far, (to the client, from the client): its streams' payload (what the
/// programs and services moved, without framing), or for a session without streams its
/// positions less a FIN each way.
pub(super) fn stream_bytes(entry: &Entry) -> (u64, u64) {
    let inner = entry.shared.lock();
    let s = &inner.session;
    match s.streams() {
        Some(st) => {
            let (from_client, to_client) = st.payload_bytes();
            (to_client, from_client)
        }
        None => (
            s.written_offset().saturating_sub(u64::from(s.is_shut_down())),
            s.received_offset().saturating_sub(u64::from(s.peer_finished())),
        ),
    }
}

impl StatsHandle {
    /// Every live session now, oldest first: what `holdfast status` shows. Sessions of an
    /// earlier process that handed its listener to this one are not included (that process
    /// still serves them).
    pub fn sessions(&self) -> Vec<SessionStatus> {
        let wall = SystemTime::now();
        let now = Instant::now();
        let allow = self.state.allow();
        let mut list: Vec<SessionStatus> = self
            .state
            .registry
            .snapshot()
            .iter()
            .map(|e| {
                let (bytes_to_client, bytes_from_client) = stream_bytes(e);
                let rtt = e.shared.lock().session.rtt();
                let t = e.track.lock();
                let forwards = e.activity.forwards.lock().unwrap_or_else(|p| p.into_inner());
                SessionStatus {
                    id: e.activity.tag,
                    // The allow-list's name now, as the log and the metrics give it (found by
                    // an operator's day: a key renamed on SIGHUP kept its old name here).
                    name: allow.lookup(&e.client).map_or_else(|| e.name.clone(), |p| p.name.clone()),
                    key: e.client,
                    addr: t.addr,
                    attached: t.attached,
                    since: t.since,
                    opened: wall.checked_sub(now.saturating_duration_since(e.opened)).unwrap_or(wall),
                    rtt,
                    bytes_to_client,
                    bytes_from_client,
                    resumes: e.track.resumes.load(Ordering::Relaxed),
                    streams: e.activity.streams.load(Ordering::Relaxed),
                    forwards: forwards.iter().map(|(_, w)| w.clone()).collect(),
                }
            })
            .collect();
        list.sort_by_key(|s| (s.opened, s.id));
        list
    }
}
