//! The server side of the tunnel's sessions: every stream a client opens carries one request
//! (a service, a connect or a listen request, `docs/PROTOCOL.md` Appendix A) and then its
//! connection's bytes.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tracing::debug;
use zeroize::Zeroizing;

use super::join::join_counted;
use super::request::{read_request, write_reply, Request};
use super::rights;
use super::target::{connect_offered, connect_target, resolve};
use super::{Services, Status, REQUEST_TIMEOUT};
use crate::human::printable;
use crate::keys::AllowedPeer;
use crate::net::quiet::{quiet, LogBudget};
use crate::net::{self, AllowListHandle, LinkStatus, Peer, Session, Stream};

/// Why the sessions still open when a stopping server's drain time is over are ended.
const DRAIN_OVER: &str =
    "the server process is stopping (stopped, or retired after an upgrade), and its drain time is over";

/// Server side: serves every stream the client opens on `session` as a tunnel of its own,
/// until the session ends or `stop` turns true (then the streams open run to their end, until
/// `drained` turns true: those still open then fail with the session).
pub(super) async fn serve_session(
    session: Session,
    peer: Peer,
    services: Arc<Services>,
    allow: AllowListHandle,
    (stop, mut drained): (watch::Receiver<bool>, watch::Receiver<bool>),
) {
    let who = peer.label();
    let status = session.status();
    let mut open = tokio::task::JoinSet::new();
    let mut stopping = stop.clone();
    let mut stopped = false;
    let ctx =
        SessionCtx { lookups: services.bounds().session_lookups(), status: status.clone(), log: peer.log().clone() };
    let mut shut = false;
    // On a stop the session is closed: no new stream is accepted (the client's are refused), and
    // the streams open run to their end, as they would have without the stop, until the
    // server's drain time is over. A stream's bytes are never cut short with a clean end: what
    // is still open then fails with the session, and its programs see a reset.
    loop {
        tokio::select! {
            sub = session.accept() => match sub {
                Some(sub) => {
                    let (peer, services, allow, stop) = (peer.clone(), services.clone(), allow.clone(), stop.clone());
                    // The request is served in a future of its own, on the heap only until the
                    // stream carries bytes: an open stream's task then holds what carrying needs
                    // and nothing else (issue 22: server memory per idle stream).
                    let opening = Box::pin(open_sub(sub, session.clone(), peer, services, allow, stop, ctx.clone()));
                    let sub = async move {
                        if let Some(open) = opening.await {
                            open.carry().await;
                        }
                    };
                    open.spawn(tracing::Instrument::in_current_span(sub));
                }
                None => break,
            },
            Some(_) = open.join_next(), if !open.is_empty() => {}
            _ = stopping.wait_for(|s| *s), if !stopped => {
                stopped = true;
                session.close();
            }
            Ok(_) = drained.wait_for(|d| *d), if !shut => {
                session.shut_down(DRAIN_OVER);
                shut = true;
            }
        }
    }
    // The streams left run to their end, or to the end of a stopping server's drain time.
    while !open.is_empty() {
        tokio::select! {
            _ = open.join_next() => {}
            Ok(_) = drained.wait_for(|d| *d), if !shut => {
                session.shut_down(DRAIN_OVER);
                shut = true;
            }
        }
    }
    // On a stop, the session's own end too: a reverse forward's connections are streams of it
    // that no task here holds. (The server may have closed the session before this task saw
    // the stop: its accept then ended first.)
    if stopped || *stop.borrow() {
        let mut watching = status.clone();
        let ended = |s: &LinkStatus| matches!(s, LinkStatus::Closed | LinkStatus::Failed(_));
        tokio::select! {
            _ = watching.wait_for(ended) => {}
            Ok(_) = drained.wait_for(|d| *d), if !shut => session.shut_down(DRAIN_OVER),
        }
    }
    drop(session);
    // The session's own last line ("session ended", with its reason and totals) says how it
    // failed: a warning here too made three lines of one expiry or drain.
    match &*status.borrow() {
        LinkStatus::Failed(e) => debug!(client = %who, error = %printable(e), "session failed"),
        _ => debug!(client = %who, "session's streams ended"),
    }
    session_end(status).await;
}

/// What the streams of one multiplexed session share: its look-up permits, and its link's
/// status (a reverse forward accepts only while the session is attached).
#[derive(Clone)]
pub(super) struct SessionCtx {
    pub(super) lookups: Arc<tokio::sync::Semaphore>,
    pub(super) status: watch::Receiver<crate::net::LinkStatus>,
    /// What the session's streams may log ([`super::quiet`]).
    pub(super) log: Arc<LogBudget>,
}

/// A stream whose request was answered with its connection (status 0): what carrying it needs.
struct Carry {
    tcp: TcpStream,
    sub: Stream,
    peer: Peer,
    who: String,
    name: String,
    log: Arc<LogBudget>,
}

impl Carry {
    /// Joins the connection and the stream until both ends are done; logs how it ended.
    async fn carry(self) {
        let Carry { tcp, sub, peer, who, name, log } = self;
        let counted = peer.stream_opened();
        let (carried, (to_client, to_service)) = join_counted(tcp, sub, None).await;
        drop(counted);
        match carried {
            Ok(()) => {
                peer.carried(to_client, to_service);
                quiet!(log, info!(client = %who, service = %name, to_service, to_client, "tunnel closed"))
            }
            // A reset, of the stream by the client or of the connection by the service, ends a
            // tunnel as a close does. The stream's own errors carry a `StreamError`.
            Err(e) if matches!(e.kind(), io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe) => {
                peer.tunnel_reset(to_client, to_service);
                if super::join::reset_by_stream(&e) {
                    quiet!(
                        log,
                        info!(client = %who, service = %name, to_service, to_client, error = %e, "tunnel ended: reset by the client")
                    )
                } else {
                    quiet!(
                        log,
                        info!(client = %who, service = %name, to_service, to_client, error = %e, "tunnel ended: the service reset its connection")
                    )
                }
            }
            Err(e) => {
                peer.tunnel_reset(to_client, to_service);
                quiet!(
                    log,
                    warn!(client = %who, service = %name, to_service, to_client, error = %printable(&e.to_string()), "tunnel failed")
                )
            }
        }
    }
}

/// One stream of a multiplexed session, until its request is answered: reads the request (a
/// service, a connect or a listen request) and answers it. `Some` once the stream is connected and answered,
/// `None` if it was refused, reset, or served here (a listen request).
async fn open_sub(
    mut sub: Stream,
    mux: Session,
    peer: Peer,
    services: Arc<Services>,
    allow: AllowListHandle,
    stop: watch::Receiver<bool>,
    ctx: SessionCtx,
) -> Option<Carry> {
    let who = peer.label();
    let request = match tokio::time::timeout(REQUEST_TIMEOUT, read_request(&mut sub)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            sub.reset();
            quiet!(
                ctx.log,
                warn!(client = %who, error = %printable(&e.to_string()), "bad service request; stream reset")
            );
            return None;
        }
        Err(_) => {
            sub.reset();
            quiet!(ctx.log, warn!(client = %who, "no service request in time; stream reset"));
            return None;
        }
    };
    // The rights of the key now, from the list in force: not the name the session opened with.
    let Some(entry) = rights::current(&peer, &allow) else {
        let gone = "the client is no longer on the allow-list";
        refuse_sub(sub, Status::UnknownService, (&who, &ctx.log), &request_label(&request), gone).await;
        return None;
    };
    let who = rights::label(&entry);
    let (name, tcp, target) = match request {
        Request::Service(name) => {
            let target = match resolve(&name, &peer, &services, &allow) {
                Ok(t) => t,
                Err((status, why)) => {
                    refuse_sub(sub, status, (&who, &ctx.log), &name, why).await;
                    return None;
                }
            };
            let Some(tcp) = connect_offered(services.bounds(), &who, &name, target, &ctx.log).await else {
                refuse_sub(sub, Status::Unavailable, (&who, &ctx.log), &name, "service unavailable").await;
                return None;
            };
            (name, tcp, target.to_string())
        }
        Request::Connect { host, port } => {
            let name = request_label(&Request::Connect { host: host.clone(), port });
            let (tcp, target) = match connect_destination(&entry, &services, &who, &ctx, (&host, port)).await {
                Ok(t) => t,
                Err((status, why)) => {
                    refuse_sub(sub, status, (&who, &ctx.log), &name, why).await;
                    return None;
                }
            };
            (name, tcp, target.to_string())
        }
        Request::Listen(addr) => {
            super::reverse::serve_listen(sub, addr, mux, (entry, services), stop, (ctx.status, &peer, ctx.log)).await;
            return None;
        }
    };
    if write_reply(&mut sub, Status::Connected, "").await.is_err() {
        return None;
    }
    quiet!(ctx.log, info!(client = %who, service = %name, target = %printable(&target), "tunnel open"));
    Some(Carry { tcp, sub, peer, who, name, log: ctx.log })
}

/// How logs name a request.
fn request_label(request: &Request) -> String {
    match request {
        Request::Service(name) => name.clone(),
        Request::Connect { host, port } => format!("connect {}", printable(&format!("{host}:{port}"))),
        Request::Listen(addr) => format!("listen {addr}"),
    }
}

/// Connects to `host:port` for a dynamic forward, if the `--allow-connect` rules that apply to
/// this client's key (see [`rights::connect_rules`]) give it; else the refusal: status 1 for a
/// destination not allowed, 3 if every address refused the connection, 2 for one that a name
/// rule gives but that does not resolve or answer (the cause is logged here). A name that only address rules could give is looked up, and any
/// failure is answered 1, as for a name that resolves outside them: the answer does not tell
/// whether a name exists. IP literals are never looked up; names are looked up within the
/// session's and the key's bounds ([`super::TunnelLimits`]).
async fn connect_destination(
    entry: &AllowedPeer,
    services: &Services,
    who: &str,
    ctx: &SessionCtx,
    (host, port): (&str, u16),
) -> Result<(TcpStream, std::net::SocketAddr), (Status, &'static str)> {
    let rules = rights::connect_rules(services, entry);
    let client = entry.name.as_deref();
    let not_allowed = (Status::UnknownService, "destination not allowed (--allow-connect)");
    let addrs = match super::plan(&rules, client, host, port) {
        super::Plan::Refuse => return Err(not_allowed),
        super::Plan::Addr(a) => vec![a],
        super::Plan::Lookup { by_name } => match services.bounds().lookup(entry.key, &ctx.lookups, host, port).await {
            Ok(found) => super::allowed_of(&rules, client, by_name, found),
            Err(e) if by_name => {
                quiet!(
                    ctx.log,
                    warn!(client = %who, host = %printable(host), port, error = %e, "cannot resolve the destination")
                );
                return Err((Status::Unavailable, "destination does not resolve"));
            }
            Err(e) => {
                debug!(client = %who, host = %printable(host), port, error = %e, "cannot resolve a destination only address rules could give");
                Vec::new()
            }
        },
    };
    if addrs.is_empty() {
        return Err(not_allowed);
    }
    // Status 3 only when every address refused (a reset): the SOCKS client's "connection refused".
    let mut refused = true;
    for addr in addrs {
        match connect_target(who, &format!("connect {}", printable(host)), &addr.to_string(), &ctx.log).await {
            Ok(tcp) => return Ok((tcp, addr)),
            Err(kind) => refused &= kind == Some(std::io::ErrorKind::ConnectionRefused),
        }
    }
    if refused {
        return Err((Status::Refused, "destination refused the connection"));
    }
    Err((Status::Unavailable, "destination unavailable"))
}

/// Answers a refusal on a stream and ends it: FIN, then what the client still sends is read
/// and dropped until its FIN (bounded).
async fn refuse_sub(mut sub: Stream, status: Status, (who, log): (&str, &LogBudget), name: &str, what: &str) {
    // Logged when it happens, not once the client has ended its side (a client that exits on
    // the refusal may end it only with its session, an hour later).
    quiet!(log, info!(client = %who, service = %name, "tunnel refused: {what}"));
    if write_reply(&mut sub, status, "").await.is_err() {
        return;
    }
    let _ = sub.shutdown().await;
    let mut sink = Zeroizing::new(vec![0u8; 4096]);
    let drain = async { while matches!(sub.read(&mut sink[..]).await, Ok(1..)) {} };
    let _ = tokio::time::timeout(Duration::from_secs(10), drain).await;
}

/// The stream's end goes out with its session's last records: waits for them (bounded), so
/// that a stopping server does not exit before its clients heard the close.
pub(super) async fn session_end(mut status: watch::Receiver<net::LinkStatus>) {
    let ended = |s: &net::LinkStatus| matches!(s, net::LinkStatus::Closed | net::LinkStatus::Failed(_));
    let _ = tokio::time::timeout(Duration::from_secs(3), status.wait_for(ended)).await;
}
