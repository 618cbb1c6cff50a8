//! Tunnels as streams of one session (protocol version 4, `docs/PROTOCOL.md` section 13): the
//! client opens one session per server and key and carries every forwarded connection as a
//! stream inside it. Opening one costs no handshake, no new TCP connection and no round trip
//! (the stream's OPEN goes out with its request), and one fault costs one resume for all.
//! Each stream starts with a request (a service, a connect or a listen request) and its reply
//! (Appendix A).

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};
use zeroize::Zeroizing;

use super::join::join;
use super::request::{connect_session_when_not_busy, read_reply, read_request, write_reply, Request};
use super::rights;
use super::serve::{connect_service, connect_target, resolve};
use super::{Services, Status, TunnelError, REQUEST_TIMEOUT};
use crate::human::printable;
use crate::keys::AllowedPeer;
use crate::net::{AllowListHandle, ClientConfig, LinkEvent, LinkStatus, Peer, Session, Stream};

/// Client side: the session of a forward (or of several), opened on first use, shared by every
/// connection.
pub struct MuxPool {
    server: String,
    cfg: ClientConfig,
    events: Option<mpsc::UnboundedSender<(std::net::SocketAddr, LinkEvent)>>,
    mux: tokio::sync::Mutex<Option<Session>>,
    /// [`MuxPool::close`] was called: no new session is started.
    closed: std::sync::atomic::AtomicBool,
    /// Reverse forwards in force: the server's listener address to the local target.
    pub(super) remotes: super::reverse::Remotes,
    /// Why a session of this pool failed for good (lost, given up, closed by an error), once one
    /// did: then no new one is started.
    failed: watch::Sender<Option<String>>,
}

impl std::fmt::Debug for MuxPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MuxPool").field("server", &self.server).finish_non_exhaustive()
    }
}

impl MuxPool {
    /// A pool for `server`; the session's link events go to `events` (with the server's address
    /// as the "from" of each, since they concern every stream).
    pub fn new(
        server: String,
        cfg: ClientConfig,
        events: Option<mpsc::UnboundedSender<(std::net::SocketAddr, LinkEvent)>>,
    ) -> Arc<Self> {
        Arc::new(MuxPool {
            server,
            cfg,
            events,
            mux: tokio::sync::Mutex::new(None),
            closed: Default::default(),
            remotes: Default::default(),
            failed: watch::channel(None).0,
        })
    }

    /// Resolves when a session of this pool has failed for good (the server lost it, the client
    /// gave up reconnecting, or it ended with an error), with the reason. The pool then starts
    /// no new session: every later open fails with that reason, as a lone stream would, since a
    /// new session would silently drop what the old one had in flight.
    pub async fn failed(&self) -> String {
        let mut rx = self.failed.subscribe();
        let reason = match rx.wait_for(Option::is_some).await {
            Ok(r) => r.clone(),
            Err(_) => None,
        };
        match reason {
            Some(r) => r,
            None => std::future::pending().await,
        }
    }

    /// Ends the multiplexed session cleanly, if one is open (waits at most 3 s): its streams
    /// end, and the server releases what the session held at once (its reverse forwards'
    /// listeners above all), instead of keeping the session for a resume that will not come.
    pub async fn close(&self) {
        self.closed.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(m) = self.mux.lock().await.take() {
            let mut status = m.status();
            // The process is going away with every connection it carried: their streams are
            // reset (a reverse forward's listener goes with its stream), then the session
            // ends cleanly.
            m.reset_streams();
            m.close();
            drop(m);
            let ended = |s: &LinkStatus| matches!(s, LinkStatus::Closed | LinkStatus::Failed(_));
            let _ = tokio::time::timeout(Duration::from_secs(3), status.wait_for(ended)).await;
        }
    }

    /// A stream to `service`, its request answered. `Ok(None)` if the server does not
    /// multiplex (the caller opens a session of its own instead).
    ///
    /// # Errors
    /// As [`crate::tunnel::open`].
    pub async fn open(&self, service: &str) -> Result<Option<Stream>, TunnelError> {
        let mut req = vec![service.len() as u8];
        req.extend_from_slice(service.as_bytes());
        Ok(self.open_with(&req, service).await?.map(|(s, _)| s))
    }

    /// A stream connected by the server to `host:port` (dynamic forwarding; the server's
    /// `--allow-connect` rules decide). `Ok(None)` if the server does not multiplex.
    ///
    /// # Errors
    /// As [`MuxPool::open`]; a destination not allowed is [`TunnelError::UnknownService`], one
    /// that refused the connection [`TunnelError::DestinationRefused`], and one the server
    /// cannot reach otherwise [`TunnelError::ServiceRefused`], all named `host:port`.
    pub async fn open_connect(&self, host: &str, port: u16) -> Result<Option<Stream>, TunnelError> {
        let req = super::request::connect_request(host, port)?;
        Ok(self.open_with(&req, &format!("{host}:{port}")).await?.map(|(s, _)| s))
    }

    /// A stream asking the server to listen on `bind` (reverse forwarding), and the address it
    /// listens on; the listener lives as long as the stream. `Ok(None)` if the server does not
    /// multiplex.
    ///
    /// # Errors
    /// As [`MuxPool::open`]: not allowed is [`TunnelError::UnknownService`], cannot listen
    /// [`TunnelError::ServiceRefused`].
    pub async fn open_listen(&self, bind: &str) -> Result<Option<(Stream, String)>, TunnelError> {
        let req = super::request::tagged(super::request::LISTEN_REQUEST, bind);
        self.open_with(&req, bind).await
    }

    /// A stream with a request for `service` sent and its reply not yet read: the caller reads
    /// it (as [`super::join::join`] does with its `answer`), and may send the service's first
    /// bytes before it, which saves a round trip. `Ok(None)` if the server does not multiplex.
    ///
    /// # Errors
    /// As [`MuxPool::open`], except the refusals, which come with the reply.
    pub async fn open_unanswered(&self, service: &str) -> Result<Option<Stream>, TunnelError> {
        let mut req = vec![service.len() as u8];
        req.extend_from_slice(service.as_bytes());
        let Some(mut sub) = self.open_raw().await? else { return Ok(None) };
        sub.write_all(&req).await?;
        Ok(Some(sub))
    }

    /// A new stream of the session (opening the session first if there is none).
    async fn open_raw(&self) -> Result<Option<Stream>, TunnelError> {
        if self.closed.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(TunnelError::Io(io::Error::new(io::ErrorKind::NotConnected, "the forward is stopping")));
        }
        if let Some(reason) = self.failed.borrow().clone() {
            return Err(TunnelError::Io(io::Error::other(format!(
                "the multiplexed session failed ({reason}); this pool starts no new one"
            ))));
        }
        let mux = {
            let mut slot = self.mux.lock().await;
            // A session that ended cleanly (the server stopped, say) is replaced by a new one;
            // one that failed was refused above.
            match slot.as_ref().filter(|m| !m.is_ended()) {
                Some(m) => m.clone(),
                None => slot.insert(self.start().await?).clone(),
            }
        };
        Ok(Some(mux.open().await?))
    }

    async fn open_with(&self, req: &[u8], label: &str) -> Result<Option<(Stream, String)>, TunnelError> {
        let Some(mut sub) = self.open_raw().await? else { return Ok(None) };
        sub.write_all(req).await?;
        let msg = read_reply(&mut sub, label).await?;
        Ok(Some((sub, msg)))
    }

    /// Opens the session.
    async fn start(&self) -> Result<Session, TunnelError> {
        let session = connect_session_when_not_busy(&self.server, self.cfg.clone()).await?;
        if let Some(tx) = self.events.clone() {
            let mut rx = session.events();
            let from = stream_peer(&self.server);
            // Its connection came before this subscription: said here (`holdfast status`).
            let _ = tx.send((from, crate::net::LinkEvent::Connected { peer: from }));
            tokio::spawn(async move {
                while let Ok(ev) = rx.recv().await {
                    if tx.send((from, ev)).is_err() {
                        break;
                    }
                }
            });
        }
        let mut status = session.status();
        let failed = self.failed.clone();
        tokio::spawn(async move {
            if let Ok(s) = status.wait_for(|s| matches!(s, LinkStatus::Failed(_) | LinkStatus::Closed)).await {
                if let LinkStatus::Failed(reason) = &*s {
                    let reason = reason.clone();
                    failed.send_replace(Some(reason));
                }
            }
        });
        debug!(server = %self.server, "session open");
        // Streams the server opens are connections to this client's reverse forwards.
        tokio::spawn(super::reverse::accept_inbound(session.clone(), self.remotes.clone()));
        Ok(session)
    }
}

/// The address shown with a multiplexed session's events: the server's, if it parses.
fn stream_peer(server: &str) -> std::net::SocketAddr {
    server.parse().unwrap_or_else(|_| std::net::SocketAddr::from(([0, 0, 0, 0], 0)))
}

/// Server side: serves every stream the client opens on `session` as a tunnel of its own,
/// until the session ends or `stop` turns true.
pub(super) async fn serve_session(
    session: Session,
    peer: Peer,
    services: Arc<Services>,
    allow: AllowListHandle,
    stop: watch::Receiver<bool>,
) {
    let who = peer.label();
    let status = session.status();
    let mut open = tokio::task::JoinSet::new();
    let mut stopping = stop.clone();
    let mut stopped = false;
    let ctx = SessionCtx { lookups: services.bounds().session_lookups(), status: status.clone() };
    // On a stop, the streams open finish as any tunnel does (the services are read no more
    // and each stream is half-closed); then the session is closed.
    loop {
        if stopped && open.is_empty() {
            session.close();
        }
        tokio::select! {
            sub = session.accept() => match sub {
                Some(sub) => {
                    let (peer, services, allow, stop) = (peer.clone(), services.clone(), allow.clone(), stop.clone());
                    let sub = serve_sub(sub, session.clone(), peer, services, allow, stop, ctx.clone());
                    open.spawn(tracing::Instrument::in_current_span(sub));
                }
                None => break,
            },
            Some(_) = open.join_next(), if !open.is_empty() => {}
            _ = stopping.wait_for(|s| *s), if !stopped => stopped = true,
        }
    }
    drop(session);
    while open.join_next().await.is_some() {}
    match &*status.borrow() {
        LinkStatus::Failed(e) => warn!(client = %who, error = %printable(e), "session failed"),
        _ => debug!(client = %who, "session's streams ended"),
    }
    super::serve::session_end(status).await;
}

/// What the streams of one multiplexed session share: its look-up permits, and its link's
/// status (a reverse forward accepts only while the session is attached).
#[derive(Clone)]
pub(super) struct SessionCtx {
    pub(super) lookups: Arc<tokio::sync::Semaphore>,
    pub(super) status: watch::Receiver<crate::net::LinkStatus>,
}

/// One stream of a multiplexed session: a service request, then the service's bytes.
async fn serve_sub(
    mut sub: Stream,
    mux: Session,
    peer: Peer,
    services: Arc<Services>,
    allow: AllowListHandle,
    stop: watch::Receiver<bool>,
    ctx: SessionCtx,
) {
    let who = peer.label();
    let request = match tokio::time::timeout(REQUEST_TIMEOUT, read_request(&mut sub)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            sub.reset();
            return warn!(client = %who, error = %printable(&e.to_string()), "bad service request; stream reset");
        }
        Err(_) => {
            sub.reset();
            return warn!(client = %who, "no service request in time; stream reset");
        }
    };
    // The rights of the key now, from the list in force: not the name the session opened with.
    let Some(entry) = rights::current(&peer, &allow) else {
        let gone = "the client is no longer on the allow-list";
        return refuse_sub(sub, Status::UnknownService, &who, &request_label(&request), gone).await;
    };
    let who = rights::label(&entry);
    let (name, tcp, target) = match request {
        Request::Service(name) => {
            let target = match resolve(&name, &peer, &services, &allow) {
                Ok(t) => t,
                Err((status, why)) => return refuse_sub(sub, status, &who, &name, why).await,
            };
            let Some(tcp) = connect_service(&who, &name, target).await else {
                return refuse_sub(sub, Status::Unavailable, &who, &name, "service unavailable").await;
            };
            (name, tcp, target.to_string())
        }
        Request::Connect { host, port } => {
            let name = request_label(&Request::Connect { host: host.clone(), port });
            let (tcp, target) = match connect_destination(&entry, &services, &who, &ctx, (&host, port)).await {
                Ok(t) => t,
                Err((status, why)) => return refuse_sub(sub, status, &who, &name, why).await,
            };
            (name, tcp, target.to_string())
        }
        Request::Listen(addr) => {
            return super::reverse::serve_listen(sub, addr, mux, (entry, services), stop, (ctx.status, &peer)).await;
        }
    };
    if write_reply(&mut sub, Status::Connected, "").await.is_err() {
        return;
    }
    info!(client = %who, service = %name, target = %printable(&target), "tunnel open");
    let counted = peer.stream_opened();
    let carried = join(tcp, sub, Some(stop), None).await;
    drop(counted);
    match carried {
        Ok((to_client, to_service)) => {
            peer.carried(to_client, to_service);
            info!(client = %who, service = %name, to_service, to_client, "tunnel closed")
        }
        // A stream reset by the client (its program reset its connection) is a close.
        Err(e) if matches!(e.kind(), io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe) => {
            info!(client = %who, service = %name, error = %e, "tunnel ended: reset by the client")
        }
        Err(e) => warn!(client = %who, service = %name, error = %printable(&e.to_string()), "tunnel failed"),
    }
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
                warn!(client = %who, host = %printable(host), port, error = %e, "cannot resolve the destination");
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
        match connect_target(who, &format!("connect {}", printable(host)), &addr.to_string()).await {
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
async fn refuse_sub(mut sub: Stream, status: Status, who: &str, name: &str, what: &str) {
    if write_reply(&mut sub, status, "").await.is_err() {
        return;
    }
    let _ = sub.shutdown().await;
    let mut sink = Zeroizing::new(vec![0u8; 4096]);
    let drain = async { while matches!(sub.read(&mut sink[..]).await, Ok(1..)) {} };
    let _ = tokio::time::timeout(Duration::from_secs(10), drain).await;
    info!(client = %who, service = %name, "tunnel refused: {what}");
}
