//! The client side of the tunnel's session: one session per server and key, opened on first
//! use, carrying every forwarded connection as a stream (protocol version 4, `docs/PROTOCOL.md`
//! section 13). Opening one costs no handshake, no new TCP connection and no round trip (its
//! OPEN goes out with its request), and one fault costs one resume for all. Streams the server
//! opens are connections to this client's reverse forwards ([`accept_inbound`]).

use std::io;
use std::sync::Arc;
use std::time::Duration;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tracing::debug;

use super::join::join;
use super::request::{connect_session_when_not_busy, read_addr, read_reply, read_reply_on, write_reply, REVERSE_OPEN};
use super::target::connect_service;
use super::{Status, TunnelError, REQUEST_TIMEOUT};
use crate::human::printable;
use crate::net::quiet::{quiet, Level, LogBudget};
use crate::net::{ClientConfig, LinkEvent, LinkStatus, Session, Stream};

/// Most bytes a start-up check reads from its service after the reply before it gives up on
/// the service ending its side, and resets the stream.
const CHECK_READ: u64 = 64 << 10;

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
    pub(super) remotes: Remotes,
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

    /// Ends the multiplexed session cleanly, if one is open: its streams end, and the server
    /// releases what the session held at once (its reverse forwards' listeners above all),
    /// instead of keeping the session for a resume that will not come. It waits for the
    /// server's answer at most as long as the link may be silent before it is suspect (a few
    /// round trips; 3 s at most), and not at all while the link is down: a server that cannot
    /// be told keeps the session until its expiry. Returns true if the session ended cleanly or none was open.
    pub async fn close(&self) -> bool {
        self.closed.store(true, std::sync::atomic::Ordering::Relaxed);
        let Some(m) = self.mux.lock().await.take() else { return true };
        let mut status = m.status();
        // A link that does not answer the CLOSE within the time after which it would be
        // suspect is not waited for (the user who stopped the client is).
        let limit = m.answer_time().min(Duration::from_secs(3));
        // The process is going away with every connection it carried: their streams are
        // reset (a reverse forward's listener goes with its stream), then the session ends
        // cleanly.
        m.reset_streams();
        m.close();
        drop(m);
        if matches!(*status.borrow(), LinkStatus::Reconnecting { .. }) {
            return false;
        }
        let ended = |s: &LinkStatus| matches!(s, LinkStatus::Closed | LinkStatus::Failed(_));
        let _ = tokio::time::timeout(limit, status.wait_for(ended)).await;
        let closed = matches!(*status.borrow(), LinkStatus::Closed);
        closed
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

    /// Asks the server for `service` without waiting for its answer, opening the session first
    /// if there is none, and returns a future that reads the answer and ends the stream
    /// cleanly: the start-up check of `holdfast client`, during which the forwards can already
    /// carry connections on the same session.
    ///
    /// # Errors
    /// As [`MuxPool::open`] for opening the session; the future's error is the server's
    /// refusal (unknown service, service unavailable) or the stream's failure.
    pub async fn check(
        &self,
        service: &str,
    ) -> Result<impl std::future::Future<Output = Result<(), TunnelError>> + Send + 'static, TunnelError> {
        let label = service.to_string();
        let mut sub = self
            .open_unanswered(service)
            .await?
            .ok_or_else(|| TunnelError::Io(io::Error::new(io::ErrorKind::Unsupported, "no multiplexed session")))?;
        Ok(async move {
            read_reply(&mut sub, &label).await?;
            // A normal close (both ends finished), not an abort that the server would log, in
            // the background: the answer is known. A talk-first service (a banner, a stream) is
            // not read past 64 KiB: the stream is then reset.
            tokio::spawn(async move {
                if let Err(e) = super::request::finish(sub, CHECK_READ).await {
                    debug!(error = %printable(&e.to_string()), "start-up check did not end cleanly");
                }
            });
            Ok(())
        })
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
        let link = super::link_time::Link::of(sub.events(), &sub.status().borrow());
        let msg = read_reply_on(&mut sub, label, Some(link)).await?;
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
        tokio::spawn(accept_inbound(session.clone(), self.remotes.clone()));
        Ok(session)
    }
}

/// The address shown with a multiplexed session's events: the server's, if it parses.
fn stream_peer(server: &str) -> std::net::SocketAddr {
    server.parse().unwrap_or_else(|_| std::net::SocketAddr::from(([0, 0, 0, 0], 0)))
}

/// Client side: the reverse forwards in force, by the server's listener address.
pub(super) type Remotes = Arc<Mutex<HashMap<SocketAddr, String>>>;

pub(super) fn lock(r: &Remotes) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, String>> {
    r.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Most connections the server's streams make this client hold at once (to its reverse
/// forwards' targets: a descriptor each). An honest server sends no more (it holds at most 256
/// reverse connections per key); a hostile one would otherwise take every descriptor of the
/// client (a review: 1,006 of 1,024, and `--local` could accept nothing).
pub const REVERSE_MAX: usize = 256;

/// Client side: streams the server opens, each a connection to one of `remotes`' listeners, at
/// most [`REVERSE_MAX`] at once; past it a stream is reset.
pub(super) async fn accept_inbound(session: Session, remotes: Remotes) {
    let permits = Arc::new(tokio::sync::Semaphore::new(REVERSE_MAX));
    while let Some(sub) = session.accept().await {
        match permits.clone().try_acquire_owned() {
            Ok(permit) => {
                tokio::spawn(carry_back(sub, remotes.clone(), permit));
            }
            Err(_) => {
                sub.reset();
                quiet!(
                    &*REVERSE_LOG,
                    warn!(limit = REVERSE_MAX, "the server opened more reverse connections than this client carries at once; the stream was reset")
                );
            }
        }
    }
}

/// What the reverse forwards' connections may log: the server, and whoever reaches its
/// listeners, decide how many there are ([`super::quiet`]).
static REVERSE_LOG: std::sync::LazyLock<LogBudget> = std::sync::LazyLock::new(|| LogBudget::new(Level::SESSION));

async fn carry_back(mut sub: Stream, remotes: Remotes, _permit: tokio::sync::OwnedSemaphorePermit) {
    let log = &*REVERSE_LOG;
    let head = async {
        match sub.read_u8().await? {
            REVERSE_OPEN => Ok(read_addr(&mut sub).await?),
            _ => Err(TunnelError::Malformed("stream opened by the server")),
        }
    };
    let at = match tokio::time::timeout(REQUEST_TIMEOUT, head).await {
        Ok(Ok(at)) => at,
        Ok(Err(e)) => return quiet!(log, warn!(error = %printable(&e.to_string()), "bad stream from the server")),
        Err(_) => return quiet!(log, warn!("a stream from the server said nothing in time")),
    };
    let target = lock(&remotes).get(&at).cloned();
    let Some(target) = target else {
        let _ = write_reply(&mut sub, Status::UnknownService, "").await;
        return quiet!(
            log,
            warn!(server_listens = %at, "a connection for a reverse forward this client no longer has")
        );
    };
    let Some(tcp) = connect_service("this client", "reverse forward", &target, log).await else {
        let _ = write_reply(&mut sub, Status::Unavailable, "").await;
        return;
    };
    if write_reply(&mut sub, Status::Connected, "").await.is_err() {
        return;
    }
    match join(tcp, sub, None).await {
        Ok((to_server, to_target)) => {
            quiet!(log, info!(server_listens = %at, %target, to_server, to_target, "reverse connection closed"))
        }
        Err(e) => quiet!(log, info!(server_listens = %at, %target, error = %e, "reverse connection ended by a reset")),
    }
}
