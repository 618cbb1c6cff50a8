//! A new connection's handshake task: the hello, the server's decisions (allow-list, limits,
//! resume rate), the reply and the key confirmation, then the commit of a new session or the
//! hand-over of a resumed link to its session.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::session::{session_task, sync_tickets};
use super::state::{Claim, Entry, NewLink, Reservation, ResumesFull, Slot, State};
use super::stats::Refusal;
use super::Peer;
use super::{handover, proxy};
use crate::keys::PublicKey;
use crate::net::budget::{Charge, StreamCharge};
use crate::net::events::LinkEvent;
use crate::net::quiet::quiet;
use crate::net::stream::{Session as StreamSession, Shared};
use crate::net::wire::{read_record, write_record};
use crate::net::Error;
use crate::proto::frame::{MAX_FRAME, RESUME_ID_LEN};
use crate::proto::handshake::{self, hex_id, MAX_HANDSHAKE};
use crate::proto::transport::TAG_LEN;
use crate::proto::StreamsConfig;
use crate::proto::{
    CloseCode, Event, HandshakeError, Hello, RejectCode, ResumeLookup, Role, Session, SessionError, Ticket, Transport,
};

/// Answers a connection over its source's handshake rate with REJECT BUSY before reading
/// anything, so the client can tell "try again shortly" from an authentication refusal (the
/// answer depends on nothing the client sent). It then waits, briefly, for the hello, so that
/// closing does not reset the connection and destroy the answer in flight. At most
/// [`crate::net::Limits::max_busy_answers`] connections are answered this way at once; beyond that the answer is only
/// written if the socket takes it at once, and the connection closed.
pub(super) fn refuse_busy(state: &Arc<State>, mut sock: TcpStream) {
    if state.refusing.fetch_add(1, Ordering::Relaxed) >= state.cfg.limits.max_busy_answers() {
        state.refusing.fetch_sub(1, Ordering::Relaxed);
        // Past the cap, the answer is written if the socket takes it at once, without waiting
        // to read what the client sent: closing may then reset the connection and lose it, but
        // a client that does read it retries instead of taking the close for a refusal.
        let _ = sock.try_write(&handshake::busy_record());
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

/// How long an over-rate connection is kept open for its BUSY answer to be read.
pub(super) const REFUSE_LINGER: Duration = Duration::from_millis(500);

/// A connection's handshake, from its first byte, or (`hello`) from the hello a newer process
/// already read from it before handing it over.
pub(super) async fn handshake(
    mut sock: TcpStream,
    addr: SocketAddr,
    state: &Arc<State>,
    hello: Option<Vec<u8>>,
    slot: &Slot,
) -> Result<(), Error> {
    crate::net::kernel::bound(&sock);
    let (addr, body) = match hello {
        Some(body) => (addr, body),
        None => {
            let addr = client_addr(&mut sock, addr, state).await?;
            (addr, read_record(&mut sock, MAX_HANDSHAKE).await.map_err(Error::Io)?)
        }
    };
    hello_read(sock, addr, body, state, slot).await
}

/// The client of a connection: its peer, or, from a load balancer, the client its PROXY header
/// names, held to the per-source handshake rate (which the accept loop skips for the balancer).
async fn client_addr(sock: &mut TcpStream, addr: SocketAddr, state: &State) -> Result<SocketAddr, Error> {
    if !proxy::trusted(&state.cfg.proxy_from, addr.ip()) {
        return Ok(addr);
    }
    let client =
        proxy::read_header(sock, addr).await.map_err(|source| Error::ProxyHeader { addr: addr.to_string(), source })?;
    if client != addr && !state.rate_ok(client.ip()) {
        debug!(%client, "handshake rate limit");
        let _ = write_record(sock, &handshake::reject(RejectCode::Busy)).await;
        return Err(Error::Handshake { addr: client.to_string(), source: HandshakeError::Busy });
    }
    Ok(client)
}

async fn hello_read(
    mut sock: TcpStream,
    addr: SocketAddr,
    body: Vec<u8>,
    state: &Arc<State>,
    slot: &Slot,
) -> Result<(), Error> {
    let claim = &slot.claim;
    let fail = |source| Error::Handshake { addr: addr.to_string(), source };
    let head = match handshake::parse_header(&body) {
        Err(HandshakeError::Version(v)) => {
            // Not silent: a client of another release learns why instead of guessing. The log
            // line is the refusal summary's (the first per source a minute, with both versions):
            // anyone can send such a hello.
            let _ = write_record(&mut sock, &handshake::reject(RejectCode::Version)).await;
            return Err(fail(HandshakeError::Version(v)));
        }
        r => r.map_err(fail)?,
    };
    let cfg = &state.cfg;
    let rate = cfg.limits.resumes_per_sec_per_session;
    // A resume is judged before any cryptography: its session, its attempt number (a replay
    // carries one already seen), its session's resume budget (spent only once the hello has
    // authenticated), its session's unconfirmed resumes and its key's handshakes.
    let entry = match head.resume {
        None => None,
        Some((id, attempt)) => {
            let (entry, pending_first, revoked) = {
                let t = state.table();
                (t.by_ticket.get(&id).cloned(), t.first_pending.contains(&id), t.revoked.contains_key(&id))
            };
            // A session whose key was removed from the allow-list: told so (REJECT 4).
            if revoked || entry.as_ref().is_some_and(|e| state.allow().lookup(&e.client).is_none()) {
                let _ = write_record(&mut sock, &handshake::reject(RejectCode::NotAllowed)).await;
                return Err(fail(HandshakeError::NoLongerAllowed));
            }
            let Some(entry) = entry else {
                // Not a session of this process: perhaps of the one it took over from.
                if !pending_first && claim.for_task() && hand_down(&sock, addr, &body, state).await {
                    return Ok(());
                }
                // A first ticket whose connection has not confirmed (yet) is not lost, not
                // usable: BUSY makes the client try again shortly; by then the session is
                // committed, or the first handshake has ended and the answer is UNKNOWN_SESSION.
                let (code, e) = if pending_first {
                    (RejectCode::Busy, HandshakeError::Busy)
                } else {
                    (RejectCode::UnknownSession, HandshakeError::UnknownSession)
                };
                let _ = write_record(&mut sock, &handshake::reject(code)).await;
                return Err(fail(e));
            };
            if attempt <= entry.resume_mark.load(Ordering::Relaxed) {
                return Err(fail(HandshakeError::Replayed));
            }
            let now = Instant::now();
            if !entry.resume_tokens(now, rate, false)
                || entry.resumes_full(now)
                || Unconfirmed::full(state, &entry.client)
            {
                debug!(%addr, id = %hex_id(&id), "resume refused: rate limit, two unconfirmed resumes of the session, or its key's limit");
                let _ = write_record(&mut sock, &handshake::reject(RejectCode::Busy)).await;
                return Err(fail(HandshakeError::Busy));
            }
            Some(entry)
        }
    };
    let lookup = |id: &[u8; RESUME_ID_LEN]| {
        let entry = entry.as_ref()?;
        let inner = entry.shared.lock();
        let t = inner.session.ticket_secret(id)?;
        Some(ResumeLookup {
            client: entry.client,
            psk: t.secret.clone(),
            received: inner.session.received_offset(),
            written: inner.session.written_offset(),
        })
    };
    let read = match handshake::read_hello(&body, &cfg.keypair.private, Some(&state.statics()), lookup) {
        Ok(r) => r,
        Err(HandshakeError::NotAllowed(key)) => {
            // Silent to the client (it learns nothing about the list); the operator is told,
            // within a rate, which key to add.
            if state.refusal_log.allow(key) {
                warn!(
                    %addr,
                    key = %key,
                    "refused a client whose key is not on the allow-list; to let it in, add this line to the --authorized file: {key} NAME"
                );
            }
            return Err(fail(HandshakeError::NotAllowed(key)));
        }
        Err(HandshakeError::UnknownSession) => {
            // The ticket was retired between the look-up above and this one.
            let _ = write_record(&mut sock, &handshake::reject(RejectCode::UnknownSession)).await;
            return Err(fail(HandshakeError::UnknownSession));
        }
        Err(e) => return Err(fail(e)),
    };
    // The hello authenticated. Decide, still committing nothing.
    let mut _unconfirmed = None;
    let mut _resuming = None;
    let mut reservation = None;
    let mut number = 0;
    match read.hello() {
        Hello::Initial { client, stamp } => {
            if state.allow().lookup(client).is_none() {
                return Err(fail(HandshakeError::UnknownClient));
            }
            if !state.accept_stamp(client, *stamp) {
                let _ = write_record(&mut sock, &handshake::reject(RejectCode::Stale)).await;
                return Err(fail(HandshakeError::Stale));
            }
            // The hello is fresh (a recorded one was refused just above), so it may hold a
            // session slot until its handshake ends: concurrent first connections cannot then
            // overshoot a cap, and no replay can take one.
            _unconfirmed = Unconfirmed::new(state, *client);
            if _unconfirmed.is_none() {
                let _ = write_record(&mut sock, &handshake::reject(RejectCode::Busy)).await;
                return Err(fail(HandshakeError::Busy));
            }
            match state.reserve(*client) {
                Ok(r) => reservation = Some(r),
                Err(cap) => {
                    let _ = write_record(&mut sock, &handshake::reject(RejectCode::Busy)).await;
                    let name = state.allow().lookup(client).and_then(|p| p.name.clone());
                    let client = super::client_label(name.as_deref(), client);
                    return Err(Error::SessionCap { addr: addr.to_string(), client, cap });
                }
            }
        }
        Hello::Resume { attempt, .. } => {
            let entry = entry.as_ref().ok_or(fail(HandshakeError::UnknownSession))?;
            if entry.resume_mark.fetch_max(*attempt, Ordering::Relaxed) >= *attempt {
                // A copy of this hello got here first.
                return Err(fail(HandshakeError::Replayed));
            }
            // The attempt number orders the session's links: it grows with every attempt and is
            // authenticated (the header is the prologue). The first link is 0.
            number = *attempt;
            // The hello authenticated: whatever the answer, it spends a token of the session's
            // resume rate (a replayed or forged hello never gets here).
            if !entry.resume_tokens(Instant::now(), rate, true) {
                busy(&mut sock, claim).await;
                return Err(fail(HandshakeError::Busy));
            }
            // Until it confirms, the resume counts against its key's handshakes and is one of
            // its session's (at most two) unconfirmed resumes.
            _unconfirmed = Unconfirmed::new(state, entry.client);
            if _unconfirmed.is_none() {
                busy(&mut sock, claim).await;
                return Err(fail(HandshakeError::Busy));
            }
            _resuming = match ResumeSlot::new(state, entry, slot) {
                Ok(r) => Some(r),
                Err(ResumesFull) => {
                    debug!(%addr, "resume refused: its session has two unconfirmed resumes already");
                    busy(&mut sock, claim).await;
                    return Err(fail(HandshakeError::Busy));
                }
            };
        }
    }
    let accept = read.accept(Some(Ticket::for_server(cfg.server_id))).map_err(fail)?;
    // Once the reply is sent the client holds the first ticket: it stays pending until this
    // handshake ends, committed or not. (Declared after the reservation, so that a failed
    // handshake gives its session slot back before the ticket stops being pending.)
    let _pending = accept.ticket.as_ref().map(|t| FirstPending::new(state, t.resume_id));
    if !claim.for_task() {
        return Err(fail(HandshakeError::Busy));
    }
    write_record(&mut sock, &accept.reply).await.map_err(Error::Io)?;
    if _resuming.is_some() {
        // Only reading from now on: a resume waiting for its confirmation may be evicted.
        claim.awaiting();
    }
    // Key confirmation: nothing is committed until the client's first record decrypts.
    let first = read_record(&mut sock, MAX_FRAME + TAG_LEN).await.map_err(Error::Io)?;
    if !claim.confirmed() {
        return Err(fail(HandshakeError::Busy));
    }
    drop((_resuming, _unconfirmed));
    let (mut transport, first_ticket) = (accept.transport, accept.ticket);
    let mut confirm = zeroize::Zeroizing::new(vec![0u8; first.len()]);
    let n = transport.open(&first, &mut confirm).map_err(|_| fail(HandshakeError::Auth))?;
    confirm.truncate(n);
    match accept.hello {
        Hello::Initial { client, .. } => {
            let ticket = first_ticket.ok_or(fail(HandshakeError::Setup))?;
            let r = reservation.ok_or(fail(HandshakeError::Busy))?;
            commit_new(state, r, sock, addr, (client, ticket), (transport, &confirm))
        }
        Hello::Resume { resume_id, client_received, client_written, .. } => {
            let entry = entry.ok_or(fail(HandshakeError::UnknownSession))?;
            let link =
                NewLink { sock, transport, confirm, resume_id, client_received, client_written, peer: addr, number };
            let _ = entry.replace.send(link).await;
            Ok(())
        }
    }
}

/// Hands a resume for a session this process does not hold to the process it took over from,
/// if there is one. True if it was handed (this process is then done with the connection).
async fn hand_down(sock: &TcpStream, addr: SocketAddr, body: &[u8], state: &State) -> bool {
    use std::os::fd::AsFd;
    let Some(old) = state.predecessor() else { return false };
    match handover::forward(&old, sock.as_fd(), addr, body).await {
        Ok(()) => {
            debug!(%addr, "a resume for a session of the earlier server process: handed to it");
            true
        }
        Err(e) => {
            warn!(error = %e, "cannot hand a resume to the earlier server process; its sessions can no longer resume");
            state.lose_predecessor();
            false
        }
    }
}

/// Answers BUSY on a connection nobody has written on yet (see [`Claim`]).
async fn busy(sock: &mut TcpStream, claim: &Claim) {
    if claim.for_task() {
        let _ = write_record(sock, &handshake::reject(RejectCode::Busy)).await;
    }
}

/// A resume between its authenticated hello and its key confirmation, registered with its
/// session (see [`Entry::start_resume`]) for as long as it lives.
struct ResumeSlot<'a> {
    entry: &'a Entry,
    id: u64,
}

impl<'a> ResumeSlot<'a> {
    /// Registers the handshake of `slot` with `entry`; closes the older unconfirmed resume it
    /// supersedes, if any.
    fn new(state: &State, entry: &'a Entry, slot: &Slot) -> Result<Self, ResumesFull> {
        let victim = entry.start_resume(slot.id, &slot.claim, Instant::now())?;
        if let Some((id, open)) = victim {
            state.close_handshake(id, open);
            state.counters.refused(Refusal::Superseded);
        }
        Ok(ResumeSlot { entry, id: slot.id })
    }
}

impl Drop for ResumeSlot<'_> {
    fn drop(&mut self) {
        self.entry.end_resume(self.id);
    }
}

/// A handshake between its authenticated hello and the end of its handshake (a first
/// connection) or its key confirmation (a resume), counted against its key's
/// `max_unconfirmed_per_key`.
struct Unconfirmed<'a> {
    state: &'a State,
    client: PublicKey,
}

impl<'a> Unconfirmed<'a> {
    /// True if `client` is at its limit now (looked at before any cryptography).
    fn full(state: &State, client: &PublicKey) -> bool {
        let n = state.table().unconfirmed.get(client).copied().unwrap_or(0);
        n >= state.cfg.limits.max_unconfirmed_per_key.max(1)
    }

    fn new(state: &'a State, client: PublicKey) -> Option<Self> {
        let mut t = state.table();
        let n = t.unconfirmed.entry(client).or_insert(0);
        if *n >= state.cfg.limits.max_unconfirmed_per_key.max(1) {
            return None;
        }
        *n += 1;
        Some(Unconfirmed { state, client })
    }
}

impl Drop for Unconfirmed<'_> {
    fn drop(&mut self) {
        let mut t = self.state.table();
        if let Some(n) = t.unconfirmed.get_mut(&self.client) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                t.unconfirmed.remove(&self.client);
            }
        }
    }
}

pub(super) fn commit_new(
    state: &Arc<State>,
    reservation: Reservation<'_>,
    sock: TcpStream,
    addr: SocketAddr,
    (client, ticket): (PublicKey, Ticket),
    (transport, confirm): (Transport, &[u8]),
) -> Result<(), Error> {
    let cfg = &state.cfg;
    let now = Instant::now();
    let cipher = transport.cipher();
    let mut session = Session::new(Role::Server, cfg.session.clone());
    // The streams exist before the confirmation is read: its record may already open one.
    let streams = StreamsConfig { max_streams: cfg.limits.max_streams_per_session, ..StreamsConfig::default() };
    let name = state.allow().lookup(&client).and_then(|p| p.name.clone());
    let who = super::client_label(name.as_deref(), &client);
    let log = state.logs.session(&client);
    let charge = StreamCharge::new(state.budget.clone(), state.key_budget(&client)).told(
        state.counters.streams_refused.clone(),
        who.clone(),
        log.clone(),
    );
    session.enable_streams(streams, Box::new(charge));
    session.attach(now, transport, 0, None, None).map_err(Error::Session)?;
    session.adopt_ticket(ticket);
    // The confirmation decrypted: the session exists whatever its frame holds. A frame that
    // breaks a rule is a fault of this link, as on any link: the session waits for a resume.
    let first = session.handle_frame(now, confirm);
    let link = match &first {
        Err(e) if e.is_link_fault() => {
            debug!(%addr, error = %e, "first link's confirmation frame is invalid; waiting for a resume");
            session.detach();
            None
        }
        _ => Some(sock),
    };
    let shared = Shared::new(session, client, 1);
    shared.lock().charge = Some(Charge::new(state.budget.clone(), state.key_budget(&client)));
    // The lane the session will run on, known before its streams can be served.
    let seat = state.cfg.lanes.as_ref().map(crate::net::Lanes::seat);
    if let Some(seat) = &seat {
        let _ = shared.lane.set(seat.handle().clone());
    }
    let (tx, rx) = mpsc::channel(4);
    let activity = super::status::Activity::new(state.registry.fresh_tag());
    let span = activity.tag.span();
    let entry = Arc::new(Entry {
        shared: shared.clone(),
        client,
        who,
        name: name.clone(),
        activity: activity.clone(),
        life: state.life.session(&client),
        track: super::status::Track::new(addr, link.is_some()),
        opened: now,
        replace: tx,
        resume_tokens: Mutex::new(None),
        resume_mark: AtomicU64::new(0),
        resuming: Mutex::new(Vec::new()),
    });
    reservation.keep();
    state.counters.opened.fetch_add(1, Ordering::Relaxed);
    // The client already holds the first ticket: map it to the session before anything else
    // runs, so that a resume arriving at once finds it.
    let events: Vec<Event> = std::iter::from_fn(|| shared.lock().session.poll_event()).collect();
    for ev in events {
        sync_tickets(state, &entry, ev);
    }
    state.registry.insert(entry.clone());
    let peer = Peer { key: client, name, addr, activity, log };
    let _in = span.enter();
    quiet!(entry.life, info!(client = %entry.who, key = %client, %addr, %cipher, "session opened"));
    shared.emit(LinkEvent::Connected { peer: addr });
    match state.accepted.try_send((StreamSession::from_counted(shared.clone()), peer)) {
        Ok(()) => {}
        Err(mpsc::error::TrySendError::Full(_)) => {
            quiet!(entry.life, warn!(client = %entry.who, %addr, "accept queue full; dropping new session"));
            shared.fail(CloseCode::Limit, SessionError::Aborted("server accept queue full".into()));
        }
        Err(mpsc::error::TrySendError::Closed(_)) => {
            quiet!(
                entry.life,
                info!(client = %entry.who, %addr, "the server is stopping: closing the session it just opened")
            );
            shared.fail(CloseCode::Shutdown, SessionError::Aborted("the server is stopping".into()));
        }
    }
    // The allow-list changed during the handshake (`State::revoke` did not see this session).
    if state.allow().lookup(&client).is_none() {
        entry.revoke();
    }
    drop(_in);
    let task = tracing::Instrument::instrument(session_task(state.clone(), entry, link, rx), span);
    match seat {
        Some(seat) => {
            seat.handle().clone().spawn(async move {
                let _seat = seat;
                task.await;
            });
        }
        None => {
            tokio::spawn(task);
        }
    }
    Ok(())
}

/// A first ticket marked pending for as long as its handshake task runs.
pub(super) struct FirstPending<'a> {
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
