//! The server listener: the accept loop, handshake tasks with limits, the session table and
//! each session's driver, which keeps a detached session until it resumes or expires.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinHandle};
use tracing::{debug, info, warn};

use crate::human::Rounded;
use crate::keys::{AllowList, PublicKey};
use crate::net::config::ServerConfig;
use crate::net::events::{LinkEvent, LinkLost, LinkStatus};
use crate::net::pump::{pump, PumpEnd};
use crate::net::stream::{Shared, Stream};
use crate::net::wire::{read_record, write_record};
use crate::net::Error;
use crate::proto::frame::{MAX_FRAME, RESUME_ID_LEN};
use crate::proto::handshake::{self, hex_id, MAX_HANDSHAKE};
use crate::proto::transport::TAG_LEN;
use crate::proto::{
    CloseCode, Event, HandshakeError, Hello, RejectCode, ResumeLookup, Role, Session, SessionError, Ticket, Transport,
};

/// Replaces a running listener's allow-list (see [`Listener::allow_list_handle`]). The new list
/// decides every first connection from then on. Sessions already established go on and can
/// still resume: a resume is authorized by the session's ticket and the client key stored with
/// it, never by the allow-list (`SECURITY.md`).
#[derive(Clone)]
pub struct AllowListHandle {
    state: Arc<State>,
}

impl std::fmt::Debug for AllowListHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AllowListHandle").field("allowed_clients", &self.state.allow().len()).finish()
    }
}

impl AllowListHandle {
    /// Puts `list` in force for new connections.
    pub fn set(&self, list: AllowList) {
        *self.state.allow.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(list);
    }

    /// The list in force.
    pub fn get(&self) -> Arc<AllowList> {
        self.state.allow()
    }
}

/// The authenticated peer of an accepted stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// The client's static public key (on the allow-list).
    pub key: PublicKey,
    /// The client's name from the allow-list, if it has one.
    pub name: Option<String>,
    /// The address of the first connection.
    pub addr: SocketAddr,
}

/// Counters describing a server's state, for status output and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServerStats {
    /// Sessions alive (attached or detached).
    pub sessions: usize,
    /// Connections in their handshake now.
    pub handshakes: usize,
    /// Sessions expired since start.
    pub expired: usize,
    /// Successful resumes since start.
    pub resumes: usize,
}

/// A new connection for an existing session, confirmed and ready to attach.
struct NewLink {
    sock: TcpStream,
    transport: Transport,
    confirm: zeroize::Zeroizing<Vec<u8>>,
    resume_id: [u8; RESUME_ID_LEN],
    client_received: u64,
    client_written: u64,
    peer: SocketAddr,
}

struct Entry {
    shared: Arc<Shared>,
    client: PublicKey,
    /// The client as logs name it: its allow-list name, or its key.
    who: String,
    /// When the session was committed.
    opened: Instant,
    replace: mpsc::Sender<NewLink>,
    /// Token bucket for `resumes_per_sec_per_session`: (tokens, last refill).
    resume_tokens: Mutex<Option<(f64, Instant)>>,
}

impl Entry {
    /// Lets a resume through if the session's bucket (burst `rate`, refilled at `rate` per
    /// second) has a token. Occasional faults in quick succession resume at once; a client
    /// looping on resumes is held to `rate` per second on average.
    fn resume_allowed(&self, now: Instant, rate: u32) -> bool {
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
struct Pending {
    next_id: u64,
    live: VecDeque<(u64, AbortHandle)>,
}

#[derive(Default)]
struct Table {
    by_ticket: HashMap<[u8; RESUME_ID_LEN], Arc<Entry>>,
    /// First tickets sent in an IK reply whose handshake has not ended yet: the client may hold
    /// one (and try to resume with it) before the server has committed its session.
    first_pending: HashSet<[u8; RESUME_ID_LEN]>,
    per_key: HashMap<PublicKey, usize>,
    rate: HashMap<IpAddr, (f64, Instant)>,
}

struct State {
    cfg: ServerConfig,
    /// The allow-list in force: `cfg.allow` at first, replaced by [`AllowListHandle::set`].
    allow: std::sync::RwLock<Arc<AllowList>>,
    table: Mutex<Table>,
    sessions: AtomicUsize,
    buffered: AtomicUsize,
    expired: AtomicUsize,
    resumes: AtomicUsize,
    /// Over-rate connections being answered with BUSY.
    refusing: AtomicUsize,
    pending: Mutex<Pending>,
    accepted: mpsc::Sender<(Stream, Peer)>,
}

impl State {
    fn allow(&self) -> Arc<AllowList> {
        self.allow.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Memory charged to one session against `buffer_budget`: its worst-case buffers.
    fn charge(&self) -> usize {
        self.cfg.session.max_buffer.saturating_add(self.cfg.session.recv_window)
    }

    /// Takes a session slot for `client` if every session limit allows it. Checking and
    /// counting happen under one lock, so concurrent handshakes cannot overshoot a cap.
    fn reserve(&self, client: PublicKey) -> Option<Reservation<'_>> {
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
    fn release(&self, client: &PublicKey) {
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
    fn rate_ok(&self, ip: IpAddr) -> bool {
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
struct Reservation<'a> {
    state: &'a State,
    client: PublicKey,
    kept: bool,
}

impl Reservation<'_> {
    /// The session now exists: its task releases the slot when it ends.
    fn keep(mut self) {
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
fn rate_key(ip: IpAddr) -> IpAddr {
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

/// A bound holdfast server. Dropping it stops accepting; live sessions keep running until they
/// end or expire.
pub struct Listener {
    state: Arc<State>,
    incoming: mpsc::Receiver<(Stream, Peer)>,
    local: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Binds a server on `addr`.
///
/// # Errors
/// [`Error::Bind`] if the address cannot be bound (for example it is in use).
pub async fn bind(addr: impl Into<String>, cfg: ServerConfig) -> Result<Listener, Error> {
    let addr = addr.into();
    let tcp = TcpListener::bind(&addr).await.map_err(|source| Error::Bind { addr: addr.clone(), source })?;
    let local = tcp.local_addr().map_err(Error::Io)?;
    let (tx, rx) = mpsc::channel(64);
    let state = Arc::new(State {
        allow: std::sync::RwLock::new(cfg.allow.clone()),
        cfg,
        table: Mutex::new(Table::default()),
        sessions: AtomicUsize::new(0),
        buffered: AtomicUsize::new(0),
        expired: AtomicUsize::new(0),
        resumes: AtomicUsize::new(0),
        refusing: AtomicUsize::new(0),
        pending: Mutex::new(Pending::default()),
        accepted: tx,
    });
    let task = tokio::spawn(accept_loop(tcp, state.clone()));
    info!(%local, "listening");
    Ok(Listener { state, incoming: rx, local, task })
}

impl Listener {
    /// Waits for the next new session: a stream and its authenticated peer.
    ///
    /// # Errors
    /// [`Error::Io`] if the accept loop stopped.
    pub async fn accept(&mut self) -> Result<(Stream, Peer), Error> {
        self.incoming
            .recv()
            .await
            .ok_or_else(|| Error::Io(std::io::Error::new(std::io::ErrorKind::BrokenPipe, "listener stopped")))
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// A handle that replaces the allow-list while the listener runs (for example on `SIGHUP`),
    /// without touching live sessions.
    pub fn allow_list_handle(&self) -> AllowListHandle {
        AllowListHandle { state: self.state.clone() }
    }

    /// Current counters.
    pub fn stats(&self) -> ServerStats {
        let s = &self.state;
        ServerStats {
            sessions: s.sessions.load(Ordering::Relaxed),
            handshakes: s.pending().live.len(),
            expired: s.expired.load(Ordering::Relaxed),
            resumes: s.resumes.load(Ordering::Relaxed),
        }
    }
}

async fn accept_loop(tcp: TcpListener, state: Arc<State>) {
    loop {
        let (sock, addr) = match tcp.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if !state.rate_ok(addr.ip()) {
            debug!(%addr, "handshake rate limit");
            refuse_busy(&state, sock);
            continue;
        }
        // At the cap, close the oldest unfinished handshake: real ones finish in a round trip,
        // so the evicted one is almost always slow, silent or hostile.
        let mut pending = state.pending();
        while pending.live.len() >= state.cfg.limits.max_handshakes.max(1) {
            let Some((_, oldest)) = pending.live.pop_front() else { break };
            debug!(%addr, "handshake cap reached; evicting the oldest handshake");
            oldest.abort();
        }
        let id = pending.next_id;
        pending.next_id += 1;
        let st = state.clone();
        // The task cannot deregister before it is registered: it needs the lock held here.
        let task = tokio::spawn(async move {
            let limit = st.cfg.limits.handshake_timeout;
            match tokio::time::timeout(limit, handshake(sock, addr, &st)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!(%addr, error = %e, "handshake failed"),
                Err(_) => debug!(%addr, "handshake deadline passed"),
            }
            st.pending().live.retain(|(i, _)| *i != id);
        });
        pending.live.push_back((id, task.abort_handle()));
    }
}

/// Answers a connection over its source's handshake rate with REJECT BUSY before reading
/// anything, so the client can tell "try again shortly" from an authentication refusal (the
/// answer depends on nothing the client sent). It then waits, briefly, for the hello, so that
/// closing does not reset the connection and destroy the answer in flight. At most
/// [`MAX_REFUSING`] connections are answered at once; beyond that they are closed silently.
fn refuse_busy(state: &Arc<State>, mut sock: TcpStream) {
    if state.refusing.fetch_add(1, Ordering::Relaxed) >= MAX_REFUSING {
        state.refusing.fetch_sub(1, Ordering::Relaxed);
        return;
    }
    let state = state.clone();
    tokio::spawn(async move {
        let answer = async {
            write_record(&mut sock, &handshake::reject(RejectCode::Busy)).await?;
            sock.shutdown().await?;
            let mut sink = [0u8; MAX_HANDSHAKE + 2];
            while sock.read(&mut sink).await? > 0 {}
            Ok::<_, std::io::Error>(())
        };
        let _ = tokio::time::timeout(REFUSE_LINGER, answer).await;
        state.refusing.fetch_sub(1, Ordering::Relaxed);
    });
}

/// Most over-rate connections answered with BUSY at once (see [`refuse_busy`]).
const MAX_REFUSING: usize = 64;
/// How long an over-rate connection is kept open for its BUSY answer to be read.
const REFUSE_LINGER: Duration = Duration::from_millis(500);

async fn handshake(mut sock: TcpStream, addr: SocketAddr, state: &Arc<State>) -> Result<(), Error> {
    let _ = sock.set_nodelay(true);
    let hello = read_record(&mut sock, MAX_HANDSHAKE).await.map_err(Error::Io)?;
    let cfg = &state.cfg;
    let mut pending_first = false;
    let lookup = |id: &[u8; RESUME_ID_LEN]| {
        let entry = {
            let t = state.table();
            pending_first = t.first_pending.contains(id);
            t.by_ticket.get(id).cloned()
        }?;
        let inner = entry.shared.lock();
        let t = inner.session.ticket_secret(id)?;
        Some(ResumeLookup {
            client: entry.client,
            psk: t.secret.clone(),
            received: inner.session.received_offset(),
            written: inner.session.written_offset(),
        })
    };
    let allow = state.allow();
    let accept = match handshake::respond(&hello, &cfg.keypair.private, |k| allow.lookup(k).is_some(), lookup) {
        Ok(a) => a,
        Err(HandshakeError::UnknownSession) if pending_first => {
            // The ticket came with a first connection whose confirmation has not arrived (yet):
            // not lost, not usable. Busy makes the client try again shortly; by then the session
            // is committed, or the first handshake has ended and the answer is UNKNOWN_SESSION.
            let _ = write_record(&mut sock, &handshake::reject(RejectCode::Busy)).await;
            return Err(Error::Handshake { addr: addr.to_string(), source: HandshakeError::Busy });
        }
        Err(HandshakeError::UnknownSession) => {
            let _ = write_record(&mut sock, &handshake::reject(RejectCode::UnknownSession)).await;
            return Err(Error::Handshake { addr: addr.to_string(), source: HandshakeError::UnknownSession });
        }
        Err(e) => return Err(Error::Handshake { addr: addr.to_string(), source: e }),
    };
    // Once the reply is sent the client holds the first ticket: it stays pending until this
    // handshake ends, committed or not. (Declared before the reservation, so that a failed
    // handshake gives its session slot back before the ticket stops being pending.)
    let _pending = accept.ticket.as_ref().map(|t| FirstPending::new(state, t.resume_id));
    let mut reservation = None;
    match &accept.hello {
        Hello::Initial { client } => match state.reserve(*client) {
            Some(r) => reservation = Some(r),
            None => {
                let _ = write_record(&mut sock, &handshake::reject(RejectCode::Busy)).await;
                return Err(Error::Handshake { addr: addr.to_string(), source: HandshakeError::Busy });
            }
        },
        Hello::Resume { resume_id, .. } => {
            let entry = state.table().by_ticket.get(resume_id).cloned();
            let rate = cfg.limits.resumes_per_sec_per_session;
            if entry.is_some_and(|e| !e.resume_allowed(Instant::now(), rate)) {
                debug!(%addr, id = %hex_id(resume_id), "resume rate limit");
                let _ = write_record(&mut sock, &handshake::reject(RejectCode::Busy)).await;
                return Err(Error::Handshake { addr: addr.to_string(), source: HandshakeError::Busy });
            }
        }
    }
    write_record(&mut sock, &accept.reply).await.map_err(Error::Io)?;
    // Key confirmation: nothing is committed until the client's first record decrypts.
    let first = read_record(&mut sock, MAX_FRAME + TAG_LEN).await.map_err(Error::Io)?;
    let (mut transport, first_ticket) = (accept.transport, accept.ticket);
    let mut confirm = zeroize::Zeroizing::new(vec![0u8; first.len()]);
    let n = transport
        .open(&first, &mut confirm)
        .map_err(|_| Error::Handshake { addr: addr.to_string(), source: HandshakeError::Auth })?;
    confirm.truncate(n);
    match accept.hello {
        Hello::Initial { client } => match reservation {
            Some(r) => {
                let ticket =
                    first_ticket.ok_or(Error::Handshake { addr: addr.to_string(), source: HandshakeError::Setup })?;
                commit_new(state, r, sock, addr, (client, ticket), transport, &confirm)
            }
            None => Err(Error::Handshake { addr: addr.to_string(), source: HandshakeError::Busy }),
        },
        Hello::Resume { resume_id, client_received, client_written } => {
            let entry = state.table().by_ticket.get(&resume_id).cloned();
            let Some(entry) = entry else {
                return Err(Error::Handshake { addr: addr.to_string(), source: HandshakeError::UnknownSession });
            };
            let link = NewLink { sock, transport, confirm, resume_id, client_received, client_written, peer: addr };
            let _ = entry.replace.send(link).await;
            Ok(())
        }
    }
}

fn commit_new(
    state: &Arc<State>,
    reservation: Reservation<'_>,
    sock: TcpStream,
    addr: SocketAddr,
    (client, ticket): (PublicKey, Ticket),
    transport: Transport,
    confirm: &[u8],
) -> Result<(), Error> {
    let cfg = &state.cfg;
    let now = Instant::now();
    let cipher = transport.cipher();
    let mut session = Session::new(Role::Server, cfg.session.clone());
    session.attach(now, transport, 0, None, None).map_err(Error::Session)?;
    session.adopt_ticket(ticket);
    session.handle_frame(now, confirm).map_err(Error::Session)?;
    let shared = Shared::new(session, client);
    let (tx, rx) = mpsc::channel(4);
    let name = state.allow().lookup(&client).and_then(|p| p.name.clone());
    let who = name.clone().unwrap_or_else(|| client.to_string());
    let entry = Arc::new(Entry {
        shared: shared.clone(),
        client,
        who,
        opened: now,
        replace: tx,
        resume_tokens: Mutex::new(None),
    });
    reservation.keep();
    // The client already holds the first ticket: map it to the session before anything else
    // runs, so that a resume arriving at once finds it.
    let events: Vec<Event> = std::iter::from_fn(|| shared.lock().session.poll_event()).collect();
    for ev in events {
        sync_tickets(state, &entry, ev);
    }
    let peer = Peer { key: client, name, addr };
    info!(client = %entry.who, key = %client, %addr, %cipher, "session opened");
    shared.emit(LinkEvent::Connected { peer: addr });
    if state.accepted.try_send((Stream::new(shared.clone()), peer)).is_err() {
        warn!(%addr, "accept queue full; dropping new session");
        shared.fail(CloseCode::Limit, SessionError::Aborted("server accept queue full".into()));
    }
    tokio::spawn(session_task(state.clone(), entry, sock, rx));
    Ok(())
}

/// A first ticket marked pending for as long as its handshake task runs.
struct FirstPending<'a> {
    state: &'a State,
    id: [u8; RESUME_ID_LEN],
}

impl<'a> FirstPending<'a> {
    fn new(state: &'a State, id: [u8; RESUME_ID_LEN]) -> Self {
        state.table().first_pending.insert(id);
        FirstPending { state, id }
    }
}

impl Drop for FirstPending<'_> {
    fn drop(&mut self) {
        self.state.table().first_pending.remove(&self.id);
    }
}

/// Applies ticket events to the table.
fn sync_tickets(state: &State, entry: &Arc<Entry>, ev: Event) {
    let mut t = state.table();
    match ev {
        Event::TicketIssued(id) => {
            t.by_ticket.insert(id, entry.clone());
        }
        Event::TicketRetired(id) => {
            t.by_ticket.remove(&id);
        }
        Event::TicketReceived => {}
    }
}

async fn session_task(state: Arc<State>, entry: Arc<Entry>, sock: TcpStream, mut rx: mpsc::Receiver<NewLink>) {
    let shared = entry.shared.clone();
    let expiry = state.cfg.limits.session_expiry;
    let mut link = Some(sock);
    let mut faults = 0u64;
    let mut lost_at = Instant::now();
    loop {
        let new = match link.take() {
            Some(sock) => match pump(&shared, sock, Some(&mut rx), |ev| sync_tickets(&state, &entry, ev)).await {
                PumpEnd::Over => break,
                PumpEnd::Replaced(new) => {
                    lost_at = Instant::now();
                    new
                }
                PumpEnd::Fault(cause) => {
                    let ended = {
                        let mut inner = shared.lock();
                        inner.session.detach();
                        inner.session.failure().is_some()
                    };
                    if ended || !cause.is_link_fault() {
                        break;
                    }
                    faults += 1;
                    lost_at = Instant::now();
                    info!(client = %entry.who, %cause, "session detached; waiting for resume");
                    let lost = LinkLost { cause: cause.to_string(), faults };
                    shared.set_status(LinkStatus::Reconnecting { cause: lost.cause.clone(), attempt: 0 });
                    shared.emit(LinkEvent::Lost(lost));
                    continue;
                }
            },
            None => match tokio::time::timeout_at((lost_at + expiry).into(), rx.recv()).await {
                Ok(Some(new)) => new,
                Ok(None) | Err(_) => {
                    info!(client = %entry.who, expiry = %Rounded(expiry), "session expired without a resume");
                    state.expired.fetch_add(1, Ordering::Relaxed);
                    shared.fail(CloseCode::Expired, SessionError::Expired(expiry));
                    break;
                }
            },
        };
        let now = Instant::now();
        let attached = {
            let mut inner = shared.lock();
            inner.session.detach();
            let r = inner
                .session
                .attach(now, new.transport, new.client_received, Some(new.resume_id), Some(Ticket::generate()))
                .and_then(|a| inner.session.handle_frame(now, &new.confirm).map(|()| a));
            while let Some(ev) = inner.session.poll_event() {
                sync_tickets(&state, &entry, ev);
            }
            inner.wake_all();
            r
        };
        match attached {
            Ok(a) => {
                state.resumes.fetch_add(1, Ordering::Relaxed);
                let replayed_received = new.client_written.saturating_sub(shared.lock().session.received_offset());
                info!(
                    client = %entry.who,
                    addr = %new.peer,
                    after = %Rounded(now.saturating_duration_since(lost_at)),
                    replayed_to_client = a.replayed,
                    replayed_from_client = replayed_received,
                    "session resumed"
                );
                shared.set_status(LinkStatus::Connected);
                shared.emit(LinkEvent::Resumed {
                    peer: new.peer,
                    after: now.saturating_duration_since(lost_at),
                    replayed_sent: a.replayed,
                    replayed_received,
                });
                link = Some(new.sock);
            }
            Err(e) if e.is_link_fault() => {
                // The confirmation frame was bad: drop this connection only, as on a live link.
                warn!(error = %e, "resumed connection sent a bad first frame; waiting for another");
                shared.lock().session.detach();
                lost_at = Instant::now();
            }
            Err(e) => {
                warn!(client = %entry.who, error = %e, "resume failed; ending session");
                shared.fail(CloseCode::Protocol, e);
                break;
            }
        }
    }
    // Clean up: forget tickets and release the session's share of the limits.
    state.table().by_ticket.retain(|_, e| !Arc::ptr_eq(e, &entry));
    state.release(&entry.client);
    shared.report_end();
    log_end(&entry);
}

/// Logs how a session ended, once, with its client and the bytes each way.
fn log_end(entry: &Entry) {
    let (failure, to_client, from_client) = {
        let inner = entry.shared.lock();
        (inner.session.failure().cloned(), inner.session.written_offset(), inner.session.received_offset())
    };
    let lasted = Rounded(entry.opened.elapsed());
    let who = &entry.who;
    match failure {
        None | Some(SessionError::Finished) => {
            info!(client = %who, to_client, from_client, %lasted, "session closed")
        }
        Some(e @ SessionError::Expired(_)) => {
            info!(client = %who, to_client, from_client, %lasted, reason = %e, "session ended")
        }
        Some(e) => warn!(client = %who, to_client, from_client, %lasted, reason = %e, "session ended"),
    }
}
