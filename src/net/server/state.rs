//! The server's shared state: the session table, the limits (rates, caps, the buffer budget)
//! and the reservations that enforce them.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

use crate::keys::{AllowList, PublicKey};
use crate::net::config::ServerConfig;
use crate::net::stream::{Shared, Stream};
use crate::proto::frame::RESUME_ID_LEN;
use crate::proto::Transport;

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
}

impl Entry {
    /// Lets a resume through if the session's bucket (burst `rate`, refilled at `rate` per
    /// second) has a token. Occasional faults in quick succession resume at once; a client
    /// looping on resumes is held to `rate` per second on average.
    pub(super) fn resume_allowed(&self, now: Instant, rate: u32) -> bool {
        let rate = f64::from(rate.max(1));
        let mut bucket = self.resume_tokens.lock().unwrap_or_else(|p| p.into_inner());
        let (tokens, at) = bucket.get_or_insert((rate, now));
        *tokens = (*tokens + now.saturating_duration_since(*at).as_secs_f64() * rate).min(rate);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Handshakes in progress, oldest first, so the oldest can be evicted at the cap.
#[derive(Default)]
pub(super) struct Pending {
    pub(super) next_id: u64,
    pub(super) live: VecDeque<(u64, AbortHandle)>,
}

#[derive(Default)]
pub(super) struct Table {
    pub(super) by_ticket: HashMap<[u8; RESUME_ID_LEN], Arc<Entry>>,
    /// First tickets sent in an IK reply whose handshake has not ended yet: the client may hold
    /// one (and try to resume with it) before the server has committed its session.
    pub(super) first_pending: HashSet<[u8; RESUME_ID_LEN]>,
    pub(super) per_key: HashMap<PublicKey, usize>,
    pub(super) rate: HashMap<IpAddr, (f64, Instant)>,
}

pub(super) struct State {
    pub(super) cfg: ServerConfig,
    /// The allow-list in force: `cfg.allow` at first, replaced by [`AllowListHandle::set`].
    pub(super) allow: std::sync::RwLock<Arc<AllowList>>,
    pub(super) table: Mutex<Table>,
    pub(super) sessions: AtomicUsize,
    pub(super) buffered: AtomicUsize,
    pub(super) expired: AtomicUsize,
    pub(super) resumes: AtomicUsize,
    /// Over-rate connections being answered with BUSY.
    pub(super) refusing: AtomicUsize,
    pub(super) pending: Mutex<Pending>,
    pub(super) accepted: mpsc::Sender<(Stream, Peer)>,
}

impl State {
    pub(super) fn allow(&self) -> Arc<AllowList> {
        self.allow.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(super) fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Memory charged to one session against `buffer_budget`: its worst-case buffers.
    pub(super) fn charge(&self) -> usize {
        self.cfg.session.max_buffer.saturating_add(self.cfg.session.recv_window)
    }

    /// Takes a session slot for `client` if every session limit allows it. Checking and
    /// counting happen under one lock, so concurrent handshakes cannot overshoot a cap.
    pub(super) fn reserve(&self, client: PublicKey) -> Option<Reservation<'_>> {
        let limits = &self.cfg.limits;
        let mut t = self.table();
        let per_key = t.per_key.get(&client).copied().unwrap_or(0);
        let budget_ok = self.buffered.load(Ordering::Relaxed).saturating_add(self.charge()) <= limits.buffer_budget;
        if self.sessions.load(Ordering::Relaxed) >= limits.max_sessions
            || per_key >= limits.max_sessions_per_key
            || !budget_ok
        {
            return None;
        }
        *t.per_key.entry(client).or_insert(0) += 1;
        self.sessions.fetch_add(1, Ordering::Relaxed);
        self.buffered.fetch_add(self.charge(), Ordering::Relaxed);
        Some(Reservation { state: self, client, kept: false })
    }

    /// Gives back a session slot taken by [`State::reserve`].
    pub(super) fn release(&self, client: &PublicKey) {
        let mut t = self.table();
        if let Some(n) = t.per_key.get_mut(client) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                t.per_key.remove(client);
            }
        }
        self.sessions.fetch_sub(1, Ordering::Relaxed);
        self.buffered.fetch_sub(self.charge(), Ordering::Relaxed);
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
