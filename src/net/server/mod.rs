//! The server listener: the accept loop, handshake tasks with limits, the session table and
//! each session's driver, which keeps a detached session until it resumes or expires.

pub mod handover;
mod handshake;
pub mod proxy;
mod session;
mod stamps;
mod state;
mod stats;

use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinHandle};
use tracing::{debug, info, warn};

use handshake::{handshake, refuse_busy};
use state::{Claim, Live, Pending, Slot, State, Table};
use stats::Refusal;
pub use stats::{Refusals, ServerStats, StatsHandle};

use crate::keys::{AllowList, PublicKey};
use crate::net::config::ServerConfig;
use crate::net::stream::Stream;
use crate::net::Error;
use crate::proto::StaticSecrets;

/// Replaces a running listener's allow-list (see [`Listener::allow_list_handle`]). The new list
/// decides every first connection from then on, and the rights of every session on every
/// request (`crate::tunnel`). A key no longer on it is cut off at once: each of its sessions is
/// ended with CLOSE code 6 (its client reports [`crate::proto::SessionError::NotAllowed`]), and a
/// resume of one is refused with REJECT 4 (`docs/PROTOCOL.md`, section 18; `SECURITY.md`).
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
    /// Puts `list` in force, and ends every session of a key that is not on it; returns the
    /// number of sessions ended. Its keys' static-static results are computed here, once (about
    /// 40 µs per key), so that no first connection waits for them.
    pub fn set(&self, list: AllowList) -> usize {
        self.state.set_allow(Arc::new(list))
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

impl Peer {
    /// How logs name the client: its allow-list name when the session opened, or else its key,
    /// quoted as Rust's `Debug` quotes a string (`"alice laptop"`), so that a name with spaces
    /// or `=` reads as one field.
    pub fn label(&self) -> String {
        client_label(self.name.as_deref(), &self.key)
    }
}

/// How logs name a client: its allow-list name, or else its key, quoted (see [`Peer::label`]).
pub fn client_label(name: Option<&str>, key: &PublicKey) -> String {
    match name {
        Some(n) => format!("{n:?}"),
        None => format!("{:?}", key.to_string()),
    }
}

/// A bound holdfast server. Dropping it stops accepting; live sessions keep running until they
/// end or expire.
pub struct Listener {
    state: Arc<State>,
    incoming: mpsc::Receiver<(Stream, Peer)>,
    local: SocketAddr,
    task: JoinHandle<()>,
    /// Waits for a new process to take the listener over (with a handover path).
    handover: Option<JoinHandle<()>>,
    took_over_from: Option<u32>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
        if let Some(h) = &self.handover {
            h.abort();
        }
    }
}

/// Binds a server on `addr`.
///
/// # Errors
/// [`Error::Bind`] if the address cannot be bound (for example it is in use).
pub async fn bind(addr: impl Into<String>, cfg: ServerConfig) -> Result<Listener, Error> {
    let addr = addr.into();
    let tcp = listen(&addr).await.map_err(|source| Error::Bind { addr: addr.clone(), source })?;
    start(tcp, cfg, None)
}

/// Connections the kernel queues for the accept loop. After an outage every client of a server
/// reconnects at once; with the usual 1024, the excess SYNs are dropped and retried by the
/// clients' kernels a second or more later (Linux caps it at `net.core.somaxconn`).
const BACKLOG: u32 = 8192;

/// Binds and listens on `addr` (the first of its addresses that binds), with [`BACKLOG`].
async fn listen(addr: &str) -> std::io::Result<TcpListener> {
    let mut last = None;
    for a in tokio::net::lookup_host(addr).await? {
        let sock = if a.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
        sock.set_reuseaddr(true)?;
        match sock.bind(a).and_then(|()| sock.listen(BACKLOG)) {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::new(std::io::ErrorKind::AddrNotAvailable, "the name has no address")))
}

/// Binds a server that can be upgraded without losing a session (see [`handover`]): if a
/// server already runs with the same `handover` path, its listening socket is taken over (and
/// `addr` is not bound: the socket keeps its address), and resumes of its sessions are handed
/// to it; otherwise `addr` is bound. Either way this server then listens at `handover` for the
/// next process to take over from it, and [`Listener::retirement`] says when that happened.
///
/// # Errors
/// [`Error::Bind`] as for [`bind`]; [`Error::Handover`] if the running server did not hand its
/// listener over, or the handover socket cannot be bound.
pub async fn bind_with_handover(
    addr: impl Into<String>,
    cfg: ServerConfig,
    handover: impl AsRef<Path>,
) -> Result<Listener, Error> {
    let addr = addr.into();
    let path = handover.as_ref();
    let fail = |source| Error::Handover { path: path.display().to_string(), source };
    let (tcp, old) = match handover::take_over(path).await.map_err(fail)? {
        Some((std, sock, pid)) => (TcpListener::from_std(std).map_err(Error::Io)?, Some((sock, pid))),
        None => (listen(&addr).await.map_err(|source| Error::Bind { addr: addr.clone(), source })?, None),
    };
    let unix = handover::bind(path).map_err(fail)?;
    let listen = tcp.as_fd().try_clone_to_owned().map_err(Error::Io)?;
    let (sock, pid) = old.unzip();
    let mut listener = start(tcp, cfg, sock)?;
    if let Some(pid) = pid {
        info!(from_pid = pid, local = %listener.local, "took over the listener of the running server");
        if addr.parse::<SocketAddr>().is_ok_and(|a| a != listener.local && a.port() != 0) {
            warn!(listen = %addr, local = %listener.local, "a handover keeps the listening socket's address; to move the server to another address, stop it and start it again there");
        }
    }
    listener.took_over_from = pid;
    let (state, accept) = (listener.state.clone(), listener.task.abort_handle());
    listener.handover = Some(tokio::spawn(retire_when_asked(unix, listen, state, accept)));
    Ok(listener)
}

fn start(tcp: TcpListener, cfg: ServerConfig, predecessor: Option<tokio::net::UnixStream>) -> Result<Listener, Error> {
    let local = tcp.local_addr().map_err(Error::Io)?;
    let (tx, rx) = mpsc::channel(64);
    let statics = StaticSecrets::new(&cfg.keypair.private, cfg.allow.iter().map(|p| &p.key));
    let budget = crate::net::budget::Budget::new(cfg.limits.buffer_budget);
    let state = Arc::new(State {
        allow: std::sync::RwLock::new(cfg.allow.clone()),
        statics: std::sync::RwLock::new(statics),
        cfg,
        table: Mutex::new(Table::default()),
        sessions: AtomicUsize::new(0),
        budget,
        expired: AtomicUsize::new(0),
        resumes: AtomicUsize::new(0),
        counters: Default::default(),
        refusal_log: Default::default(),
        refusing: AtomicUsize::new(0),
        pending: Mutex::new(Pending::default()),
        accepted: tx,
        predecessor: Mutex::new(None),
        retired: Default::default(),
        changed: Default::default(),
    });
    if let Some(sock) = predecessor {
        let sock = Arc::new(sock);
        *state.predecessor.lock().unwrap_or_else(|p| p.into_inner()) = Some(sock.clone());
        tokio::spawn(watch_predecessor(sock, state.clone()));
    }
    let task = tokio::spawn(accept_loop(tcp, state.clone()));
    info!(%local, "listening");
    Ok(Listener { state, incoming: rx, local, task, handover: None, took_over_from: None })
}

/// Forgets the predecessor when it exits (its end of the handover connection closes): its
/// sessions are gone, and their resumes are answered "unknown session" from then on.
async fn watch_predecessor(sock: Arc<tokio::net::UnixStream>, state: Arc<State>) {
    let mut buf = [0u8; 64];
    loop {
        if sock.readable().await.is_err() {
            break;
        }
        match sock.try_read(&mut buf) {
            // The old process sends nothing after the listener: only its end matters.
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => break,
        }
    }
    info!("the earlier server process has exited; resumes of its sessions are now answered \"unknown session\"");
    state.lose_predecessor();
}

/// Waits for a new process to take the listener over; then stops accepting, and runs the
/// handshakes of the resumes the new process hands down, for as long as it lives.
async fn retire_when_asked(unix: tokio::net::UnixListener, listen: OwnedFd, state: Arc<State>, accept: AbortHandle) {
    let (new, pid) = handover::hand_over(&unix, listen.as_fd()).await;
    accept.abort();
    drop((listen, unix));
    state.retired.store(true, Ordering::Relaxed);
    state.changed.notify_waiters();
    let sessions = state.sessions.load(Ordering::Relaxed);
    info!(
        new_pid = pid,
        sessions, "handed the listener over to a new server process; keeping this process's sessions until they end"
    );
    tokio::spawn(async move {
        loop {
            match handover::next_resume(&new).await {
                Ok(Some((sock, addr, body))) => spawn_handshake(&state, sock, addr, Some(body)),
                Ok(None) => {
                    info!("the new server process closed the handover connection (it exited): this process's sessions can no longer resume");
                    break;
                }
                Err(e) => {
                    warn!(error = %e, "the handover connection failed: this process's sessions can no longer resume");
                    break;
                }
            }
        }
    });
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

    /// A handle that replaces the allow-list while the listener runs (for example on `SIGHUP`);
    /// sessions of keys no longer on it are ended ([`AllowListHandle::set`]).
    pub fn allow_list_handle(&self) -> AllowListHandle {
        AllowListHandle { state: self.state.clone() }
    }

    /// The id of the process this listener was taken over from ([`bind_with_handover`]), if
    /// it was.
    pub fn took_over_from(&self) -> Option<u32> {
        self.took_over_from
    }

    /// A handle that tells when this server has handed its listener to a new process, and when
    /// its last session has ended: then it can exit.
    pub fn retirement(&self) -> Retirement {
        Retirement { state: self.state.clone() }
    }

    /// Current counters.
    pub fn stats(&self) -> ServerStats {
        self.stats_handle().stats()
    }

    /// A handle that reads the counters while something else owns the listener (for example a
    /// metrics endpoint beside [`crate::tunnel::serve_until`]).
    pub fn stats_handle(&self) -> StatsHandle {
        StatsHandle { state: self.state.clone() }
    }
}

/// Tells when a server bound with [`bind_with_handover`] has handed its listener over, and when
/// its last session has ended (see [`Listener::retirement`]).
#[derive(Clone)]
pub struct Retirement {
    state: Arc<State>,
}

impl std::fmt::Debug for Retirement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Retirement")
            .field("handed_over", &self.handed_over())
            .field("sessions", &self.sessions())
            .finish()
    }
}

impl Retirement {
    /// True once a new process has taken the listener over.
    pub fn handed_over(&self) -> bool {
        self.state.retired.load(Ordering::Relaxed)
    }

    /// Sessions alive in this process (attached, detached, or being set up).
    pub fn sessions(&self) -> usize {
        self.state.sessions.load(Ordering::Relaxed)
    }

    /// Waits until a new process has taken the listener over, every session of this one has
    /// ended (or expired), and the process this one took over from, if any, has exited: until
    /// then, resumes of that one's sessions pass through this one. Then nothing is left for this
    /// process to do.
    pub async fn done(&self) {
        loop {
            let changed = self.state.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.handed_over() && self.sessions() == 0 && self.state.predecessor().is_none() {
                return;
            }
            changed.await;
        }
    }

    /// Waits until a new process has taken the listener over.
    pub async fn until_handed_over(&self) {
        loop {
            let changed = self.state.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.handed_over() {
                return;
            }
            changed.await;
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
        // A load balancer's connections are limited per client, once its PROXY header is read.
        if !proxy::trusted(&state.cfg.proxy_from, addr.ip()) && !state.rate_ok(addr.ip()) {
            debug!(%addr, "handshake rate limit");
            state.counters.refused(Refusal::RateLimited);
            refuse_busy(&state, sock);
            continue;
        }
        spawn_handshake(&state, sock, addr, None);
    }
}

/// Runs a connection's handshake in a task of its own, bounded in time and in number. At the
/// cap, the oldest handshake that can be evicted is closed if it has run longer than
/// `Limits::slow_handshake` (real ones finish in a round trip, so an old one is slow, silent or
/// hostile: a flood of those cannot lock real clients out). A handshake can be evicted until it
/// writes its reply, and a resume again once its reply is written, until its key confirmation
/// arrives (a resume that never confirms holds nothing); a first connection that has replied is
/// left to finish (its client holds the first ticket; it is bounded by the handshake deadline
/// and `Limits::max_unconfirmed_per_key`). If none can be evicted, as in a storm of resumes
/// after a network outage where every handshake is young, the new connection is told BUSY, to
/// retry after its backoff, so that the handshakes already under way can finish. `hello` is the
/// hello already read from it, for a connection handed over by a newer process.
fn spawn_handshake(state: &Arc<State>, sock: tokio::net::TcpStream, addr: SocketAddr, hello: Option<Vec<u8>>) {
    let mut pending = state.pending();
    let now = std::time::Instant::now();
    while pending.live.len() >= state.cfg.limits.max_handshakes.max(1) {
        let slow = state.cfg.limits.slow_handshake;
        let mut open = false;
        let victim = pending.live.iter().position(|l| {
            now.saturating_duration_since(l.started) >= slow && l.claim.for_eviction().inspect(|&o| open = o).is_some()
        });
        let Some(live) = victim.and_then(|i| pending.live.remove(i)) else {
            drop(pending);
            debug!(%addr, "handshake cap reached, every handshake young or replying; answering BUSY");
            state.counters.refused(Refusal::Busy);
            refuse_busy(state, sock);
            return;
        };
        debug!(%addr, "handshake cap reached; evicting the oldest handshake");
        live.close(open);
        state.counters.refused(Refusal::Evicted);
    }
    let id = pending.next_id;
    pending.next_id += 1;
    let st = state.clone();
    let slot = Slot { id, claim: Claim::default() };
    let claim = slot.claim.clone();
    let busy = sock.as_fd().try_clone_to_owned().ok();
    // The task cannot deregister before it is registered: it needs the lock held here.
    let task = tokio::spawn(async move {
        let limit = st.cfg.limits.handshake_timeout;
        match tokio::time::timeout(limit, handshake(sock, addr, &st, hello, &slot)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                st.counters.refused(Refusal::of(&e));
                debug!(%addr, error = %e, "handshake failed");
            }
            Err(_) => {
                st.counters.refused(Refusal::TimedOut);
                debug!(%addr, "handshake deadline passed");
            }
        }
        st.pending().live.retain(|l| l.id != id);
    });
    pending.live.push_back(Live { id, started: now, task: task.abort_handle(), claim, busy });
}
