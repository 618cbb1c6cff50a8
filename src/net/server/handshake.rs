//! A new connection's handshake task: the hello, the server's decisions (allow-list, limits,
//! resume rate), the reply and the key confirmation, then the commit of a new session or the
//! hand-over of a resumed link to its session.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::session::{session_task, sync_tickets};
use super::state::{Entry, NewLink, Reservation, State};
use super::Peer;
use crate::keys::PublicKey;
use crate::net::events::LinkEvent;
use crate::net::stream::{Shared, Stream};
use crate::net::wire::{read_record, write_record};
use crate::net::Error;
use crate::proto::frame::{MAX_FRAME, RESUME_ID_LEN};
use crate::proto::handshake::{self, hex_id, MAX_HANDSHAKE};
use crate::proto::transport::TAG_LEN;
use crate::proto::{
    CloseCode, Event, HandshakeError, Hello, RejectCode, ResumeLookup, Role, Session, SessionError, Ticket, Transport,
};

/// Answers a connection over its source's handshake rate with REJECT BUSY before reading
/// anything, so the client can tell "try again shortly" from an authentication refusal (the
/// answer depends on nothing the client sent). It then waits, briefly, for the hello, so that
/// closing does not reset the connection and destroy the answer in flight. At most
/// [`MAX_REFUSING`] connections are answered at once; beyond that they are closed silently.
pub(super) fn refuse_busy(state: &Arc<State>, mut sock: TcpStream) {
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
pub(super) const MAX_REFUSING: usize = 64;
/// How long an over-rate connection is kept open for its BUSY answer to be read.
pub(super) const REFUSE_LINGER: Duration = Duration::from_millis(500);

pub(super) async fn handshake(mut sock: TcpStream, addr: SocketAddr, state: &Arc<State>) -> Result<(), Error> {
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

pub(super) fn commit_new(
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
