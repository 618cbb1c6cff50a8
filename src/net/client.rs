//! The client connector and its reconnect loop.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tracing::debug;

use crate::net::config::{ClientConfig, Recovery};
use crate::net::events::{LinkEvent, LinkLost, LinkStatus};
use crate::net::pump::{pump, PumpEnd};
use crate::net::race::{Outcome, Race, Won};
use crate::net::stream::{Inner, Session as StreamSession, Shared, Stream};
use crate::net::watch;
use crate::net::wire::{read_record, write_record};
use crate::net::Error;
use crate::proto::handshake::MAX_HANDSHAKE;
use crate::proto::{ClientHandshake, CloseCode, Event, HandshakeError, Role, Session, SessionError};

/// Connects to a holdfast server at `addr` (`host:port`; re-resolved on every reconnect) and
/// returns the stream after one round trip, as soon as the server's reply (which carries the
/// first resumption ticket) is read. The server commits the session when it reads the key
/// confirmation that follows; if the link breaks before that, the stream fails with a lost
/// session (the server accepted nothing) rather than resuming.
///
/// # Errors
/// [`Error::Connect`] if the server cannot be reached, [`Error::HandshakeReset`] if it resets
/// the connection before answering, [`Error::HandshakeRefused`] if it drops
/// the handshake (wrong pinned key or client not allowed), [`Error::Handshake`] for protocol
/// failures, [`Error::NoAnswer`] if the TCP connection attempt gets no answer within the
/// policy's handshake timeout, [`Error::NoReply`] if the connection was made and no reply came
/// within it.
///
/// # Example
/// ```no_run
/// # async fn run() -> Result<(), holdfast::Error> {
/// use holdfast::{keys::Keypair, ClientConfig};
/// use tokio::io::AsyncWriteExt;
/// let server_key = holdfast::keys::load_public_key("keys/server.pub".as_ref())?;
/// let me = Keypair::from_private(holdfast::keys::load_private_key("keys/client.key".as_ref())?);
/// let mut stream = holdfast::connect("example.net:7700", ClientConfig::new(me, server_key)).await?;
/// stream.write_all(b"hello").await?;
/// # Ok(()) }
/// ```
pub async fn connect(addr: impl Into<String>, cfg: ClientConfig) -> Result<Stream, Error> {
    // The first stream is opened before the driver starts: the server's program may write on
    // it as soon as the key confirmation reaches the server (`Listener::accept` hands it out
    // before its OPEN arrives), and a DATA for a stream this end has not opened yet would end
    // the session.
    let (shared, id) = start(addr.into(), cfg, 0, |inner| {
        if let Some(st) = inner.session.streams_mut() {
            st.set_accepting(false);
        }
        inner.session.stream_open(usize::MAX)
    })
    .await?;
    match id {
        Ok(Some(id)) => {
            shared.wake_driver.notify_one();
            Ok(Stream::new(shared, id))
        }
        // A new session may open its first streams at once (protocol constant).
        _ => Err(Error::Session(SessionError::Aborted("could not open the session's first stream".into()))),
    }
}

/// Connects to a holdfast server like [`connect`], and returns the session, on which the
/// program opens streams ([`StreamSession::open`]) and accepts those the server opens
/// ([`StreamSession::accept`]). Every stream shares the one connection, its resumes and its link
/// events.
///
/// # Errors
/// As [`connect`].
pub async fn connect_session(addr: impl Into<String>, cfg: ClientConfig) -> Result<StreamSession, Error> {
    Ok(StreamSession::from_counted(start(addr.into(), cfg, 1, |_| ()).await?.0))
}

/// Connects and starts the session's driver. `prepare` runs on the session before the driver
/// does (before the key confirmation is sent, so before anything of the server's is read).
async fn start<T>(
    addr: String,
    cfg: ClientConfig,
    handles: usize,
    prepare: impl FnOnce(&mut Inner) -> T,
) -> Result<(Arc<Shared>, T), Error> {
    // A BUSY server is at a limit for now: try again, backing off, for a while.
    let start = Instant::now();
    let mut attempt = 0;
    let (sock, done, peer) = loop {
        match dial(&addr, &cfg, None).await {
            Err(Error::Busy { .. }) if start.elapsed() < cfg.recovery.busy_wait => {
                if attempt == 0 {
                    // Found by an operator's day: ten silent seconds, then the error.
                    tracing::warn!(
                        server = %addr,
                        "the server answered BUSY: it is at a limit (its sessions, this client key's, or new connections per second from this address; its log names which); trying again for up to {}",
                        crate::human::Rounded(cfg.recovery.busy_wait)
                    );
                }
                let delay = super::race::jittered(cfg.recovery.backoff(attempt), cfg.recovery.jitter);
                attempt += 1;
                tokio::time::sleep(delay.min(cfg.recovery.busy_wait.saturating_sub(start.elapsed()))).await;
            }
            r => break r?,
        }
    };
    let ticket = done.ticket.ok_or(Error::Handshake { addr: addr.clone(), source: HandshakeError::Malformed })?;
    let mut session = Session::new(Role::Client, cfg.session.clone());
    session.attach(Instant::now(), done.transport, 0, None, None).map_err(Error::Session)?;
    // The reply carried the first ticket: the stream is resumable before its first byte, so
    // it is returned now and the program's first bytes follow the key confirmation at once.
    session.adopt_ticket(ticket);
    let shared = Shared::new(session, cfg.server_key, handles);
    let prepared = prepare(&mut shared.lock());
    shared.emit(LinkEvent::Connected { peer });
    tokio::spawn(client_task(shared.clone(), cfg, addr, sock));
    tokio::spawn(watch_path(shared.clone()));
    Ok((shared, prepared))
}

/// One connection attempt: TCP connect plus handshake, within the handshake timeout.
pub(crate) async fn dial(
    addr: &str,
    cfg: &ClientConfig,
    resume: Option<(&crate::proto::Ticket, u64, (u64, u64))>,
) -> Result<(TcpStream, crate::proto::handshake::ClientDone, SocketAddr), Error> {
    let limit = cfg.recovery.handshake_timeout;
    let hs_err = |source| Error::Handshake { addr: addr.to_string(), source };
    // Set once TCP connected: a timeout after it is a peer that does not answer the handshake.
    let connected = std::sync::atomic::AtomicBool::new(false);
    let attempt = async {
        // The hello does not depend on the connection: it is computed while the TCP handshake
        // is in flight (the connect future sends its SYN when first polled, before this runs).
        let hello = async {
            match resume {
                None => ClientHandshake::initial(&cfg.keypair.private, &cfg.server_key, cfg.cipher, next_stamp()),
                Some((t, attempt, offsets)) => {
                    ClientHandshake::resume(&cfg.keypair.private, &cfg.server_key, t, attempt, offsets, cfg.cipher)
                }
            }
        };
        let (sock, hello) = tokio::join!(TcpStream::connect(addr), hello);
        let mut sock = sock.map_err(|source| Error::Connect { addr: addr.to_string(), source })?;
        connected.store(true, std::sync::atomic::Ordering::Relaxed);
        let (hs, hello) = hello.map_err(hs_err)?;
        let _ = sock.set_nodelay(true);
        let peer = sock.peer_addr().map_err(Error::Io)?;
        write_record(&mut sock, &hello).await.map_err(Error::Io)?;
        let reply = match read_record(&mut sock, MAX_HANDSHAKE + 1).await {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(Error::HandshakeRefused { addr: addr.to_string() })
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return Err(Error::HandshakeReset { addr: addr.to_string() })
            }
            Err(e) => return Err(Error::Io(e)),
        };
        let done = match hs.read_reply(&reply) {
            Err(HandshakeError::Busy) => return Err(Error::Busy { addr: addr.to_string() }),
            r => r.map_err(hs_err)?,
        };
        Ok((sock, done, peer))
    };
    match tokio::time::timeout(limit, attempt).await {
        Ok(r) => r,
        Err(_) if connected.load(std::sync::atomic::Ordering::Relaxed) => {
            Err(Error::NoReply { addr: addr.to_string(), after: limit })
        }
        // Found by a walk: a black-holed path was reported as a handshake that timed out.
        Err(_) => Err(Error::NoAnswer { addr: addr.to_string(), after: limit }),
    }
}

/// The client's driver: pumps the link; on suspicion races a second connection while the old
/// one runs; on a fault asks the recovery hook, then waits for the race; attaches whichever
/// connection resumes first (the server keeps the newest).
async fn client_task(shared: Arc<Shared>, cfg: ClientConfig, addr: String, sock: TcpStream) {
    let (race_tx, mut race_rx) = mpsc::channel::<Outcome>(1);
    let mut race: Option<Race> = None;
    let mut link = Some(sock);
    let mut faults = 0u64;
    let mut attached_at = (Instant::now(), 0u64);
    // Positions received plus positions of ours acknowledged: it grows when a link moves bytes.
    let moved = |shared: &Shared| {
        let inner = shared.lock();
        let s = &inner.session;
        s.received_offset() + s.written_offset().saturating_sub(s.unacked() as u64)
    };
    let mut flaps = super::backoff::Flaps::default();
    // Racing on suspicion would recover without asking: with a hook, only faults recover.
    let races_on_suspicion = cfg.recovery.race && cfg.recovery.hook.is_none();
    loop {
        let won = match link.take() {
            Some(sock) => {
                let on_event = |ev| match ev {
                    Event::Suspect(_) | Event::PathSuspect => {
                        shared.emit(match ev {
                            Event::Suspect(quiet) => LinkEvent::Suspect { quiet },
                            _ => LinkEvent::NetworkChanged,
                        });
                        if races_on_suspicion && race.as_ref().is_none_or(Race::cancelled) {
                            debug!(event = ?ev, "link suspect; racing a new connection");
                            let since = Instant::now();
                            race = Some(Race::start(
                                shared.clone(),
                                cfg.clone(),
                                addr.clone(),
                                race_tx.clone(),
                                since,
                                true,
                            ));
                        }
                    }
                    Event::Healthy => {
                        shared.emit(LinkEvent::Healthy);
                        if let Some(r) = &race {
                            r.cancel();
                        }
                    }
                    _ => {}
                };
                let end = pump(&shared, sock, Some((&mut race_rx, |_: &Outcome| true)), on_event).await;
                match end {
                    PumpEnd::Over => break,
                    PumpEnd::Replaced(outcome) => outcome,
                    PumpEnd::Fault(cause) => {
                        let fatal = {
                            let mut inner = shared.lock();
                            inner.session.detach();
                            !cause.is_link_fault() || inner.session.failure().is_some()
                        };
                        if fatal {
                            break;
                        }
                        faults += 1;
                        debug!(%cause, faults, "link lost; resuming");
                        let lost = LinkLost { cause: cause.to_string(), faults };
                        shared.emit(LinkEvent::Lost(lost.clone()));
                        shared.set_status(LinkStatus::Reconnecting { cause: lost.cause.clone(), attempt: 0 });
                        if let Some(hook) = &cfg.recovery.hook {
                            if hook(lost.clone()).await == Recovery::Fail {
                                shared.fail(CloseCode::Abort, SessionError::Declined(lost.cause));
                                return;
                            }
                        }
                        if race.as_ref().is_none_or(Race::cancelled) {
                            // A link that died as soon as it was attached, again: wait first.
                            let lived = attached_at.0.elapsed();
                            let wait = flaps.link_ended(lived, moved(&shared) != attached_at.1, &cfg.recovery);
                            if !wait.is_zero() {
                                debug!(?wait, "the last links died as soon as they were resumed; waiting");
                                tokio::time::sleep(super::race::jittered(wait, cfg.recovery.jitter)).await;
                            }
                            // Kept, so that it is stopped once a connection resumes (a
                            // cancelled race's attempts still pending may also resume, and
                            // another race's too).
                            race = Some(Race::start(
                                shared.clone(),
                                cfg.clone(),
                                addr.clone(),
                                race_tx.clone(),
                                Instant::now(),
                                false,
                            ));
                        }
                        match race_rx.recv().await {
                            Some(outcome) => outcome,
                            None => Err(SessionError::Lost),
                        }
                    }
                }
            }
            None => match race_rx.recv().await {
                Some(outcome) => outcome,
                None => Err(SessionError::Lost),
            },
        };
        // A race still running (one cancelled by a link that answered again, then lost, has
        // another beside it) starts no new attempt once one resumed.
        if let Some(r) = race.take() {
            r.cancel();
        }
        match won.and_then(|w| attach(&shared, w)) {
            Ok(sock) => {
                attached_at = (Instant::now(), moved(&shared));
                link = Some(sock);
            }
            Err(e) => {
                debug!(error = %e, "session failed");
                let code = if matches!(e, SessionError::GaveUp(_)) { CloseCode::Expired } else { CloseCode::Abort };
                shared.fail(code, e);
                return;
            }
        }
    }
    shared.report_end();
}

/// Tells the session when the operating system reports a network change or a wake from sleep,
/// until the stream ends: its link is then suspect at once (and a race resumes it on the new
/// path, if it is gone).
async fn watch_path(shared: Arc<Shared>) {
    let mut signals = watch::signals();
    let mut status = shared.status.subscribe();
    let ended = |s: &LinkStatus| matches!(s, LinkStatus::Closed | LinkStatus::Failed(_));
    loop {
        tokio::select! {
            r = signals.changed() => {
                if r.is_err() {
                    return;
                }
                let s = *signals.borrow_and_update();
                debug!(net_changes = s.net_changes, wakes = s.wakes, "network change or wake: the link is suspect");
                shared.lock().session.path_changed(Instant::now());
                shared.wake_driver.notify_one();
            }
            r = status.wait_for(ended) => {
                let _ = r;
                return;
            }
        }
    }
}

/// Attaches a connection that won a race: the stream goes on over it.
fn attach(shared: &Shared, won: Won) -> Result<TcpStream, SessionError> {
    let Won { sock, done, peer, received, started, suspicion } = won;
    let server_received = done.server_received.unwrap_or(0);
    let replayed_received = done.server_written.unwrap_or(received).saturating_sub(received);
    let attached = {
        let mut inner = shared.lock();
        inner.session.detach();
        let r = inner.session.attach(Instant::now(), done.transport, server_received, None, None);
        if suspicion && r.is_ok() {
            inner.session.count_race(Instant::now());
        }
        inner.wake_all();
        r
    };
    let attached = match attached {
        Ok(a) => a,
        // The server claims positions never written: the session has failed, and the CLOSE that
        // tells the server is queued on this link, which the pump sends.
        Err(SessionError::BadResume(_)) => return Ok(sock),
        Err(e) => return Err(e),
    };
    let after = started.elapsed();
    debug!(?after, suspicion, replayed = attached.replayed, "resumed");
    shared.set_status(LinkStatus::Connected);
    shared.emit(LinkEvent::Resumed { peer, after, replayed_sent: attached.replayed, replayed_received });
    shared.wake_driver.notify_one();
    Ok(sock)
}

/// The timestamp of a first-connection hello: the wall-clock time in nanoseconds since the UNIX
/// epoch, forced to increase within this process (the server refuses a hello that is not newer
/// than one it accepted from the same key, so a recorded hello cannot be replayed).
fn next_stamp() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    let prev = LAST.fetch_max(now, Ordering::Relaxed);
    if prev < now {
        now
    } else {
        LAST.fetch_add(1, Ordering::Relaxed) + 1
    }
}
