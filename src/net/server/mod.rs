//! The server listener: the accept loop, handshake tasks with limits, the session table and
//! each session's driver, which keeps a detached session until it resumes or expires.

pub mod handover;
mod handshake;
pub mod proxy;
mod refusals;
mod session;
mod stamps;
mod state;
mod stats;
mod status;
mod upgrade;

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::debug;

use handshake::{handshake, refuse_busy};
pub use state::CapReached;
use state::{Claim, Live, Pending, Slot, State, Table};
use stats::Refusal;
pub use stats::{Refusals, ServerStats, StatsHandle};
pub use status::{ForwardGuard, SessionStatus, SessionTag, StreamGuard};
pub use upgrade::{bind_with_handover, prepare_handover, ExtraSockets, Upgrade};

use crate::keys::{AllowList, PublicKey};
use crate::net::config::ServerConfig;
use crate::net::quiet::{self, quiet};
use crate::net::stream::{Session, Stream};
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
///
/// The session's "session closed" line is logged once its driver is done and every clone of
/// its `Peer` is dropped: so that the lines about its tunnels, which hold the `Peer`, come first.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The client's static public key (on the allow-list).
    pub key: PublicKey,
    /// The client's name from the allow-list, if it has one.
    pub name: Option<String>,
    /// The address of the first connection.
    pub addr: SocketAddr,
    /// The session's id and what its tunnels report (see [`Peer::stream_opened`]).
    activity: Arc<status::Activity>,
    /// The budget of the lines the session causes (see [`crate::net::quiet`]).
    log: Arc<quiet::LogBudget>,
}

/// Two peers are equal when they are the same session's (the log budget follows the session).
impl PartialEq for Peer {
    fn eq(&self, other: &Self) -> bool {
        (self.key, &self.name, self.addr, &self.activity) == (other.key, &other.name, other.addr, &other.activity)
    }
}

impl Eq for Peer {}

impl Peer {
    /// How logs name the client: its allow-list name when the session opened, or else its key,
    /// quoted as Rust's `Debug` quotes a string (`"alice laptop"`), so that a name with spaces
    /// or `=` reads as one field.
    pub fn label(&self) -> String {
        client_label(self.name.as_deref(), &self.key)
    }

    /// The budget of the lines the session causes, charged to its key's and the server's.
    pub(crate) fn log(&self) -> &Arc<quiet::LogBudget> {
        &self.log
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
    incoming: mpsc::Receiver<(Session, Peer)>,
    local: SocketAddr,
    task: JoinHandle<()>,
    /// Waits for a new process to take the listener over (with a handover path).
    handover: Option<JoinHandle<()>>,
    /// The handover socket's path and its file's (device, inode) once in place: removed when
    /// the listener is dropped, unless a newer process has put its own there since.
    handover_file: Option<(std::path::PathBuf, (u64, u64))>,
    took_over_from: Option<u32>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.state.stopping.store(true, Ordering::Relaxed);
        self.state.changed.notify_waiters();
        self.task.abort();
        if let Some(h) = &self.handover {
            h.abort();
        }
        if let Some((path, file)) = &self.handover_file {
            use std::os::unix::fs::MetadataExt;
            let now = std::fs::symlink_metadata(path).ok().map(|m| (m.dev(), m.ino()));
            if now == Some(*file) {
                let _ = std::fs::remove_file(path);
            }
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
    start(tcp, cfg)
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

fn start(tcp: TcpListener, cfg: ServerConfig) -> Result<Listener, Error> {
    let (state, incoming) = new_state(cfg);
    run(tcp, state, incoming, None)
}

/// A server's state, before it accepts anything; and where its new sessions will come out.
fn new_state(cfg: ServerConfig) -> (Arc<State>, mpsc::Receiver<(Session, Peer)>) {
    let (tx, rx) = mpsc::channel(64);
    let statics = StaticSecrets::new(&cfg.keypair.private, cfg.allow.iter().map(|p| &p.key));
    let budget = crate::net::budget::Budget::with_streams(cfg.limits.buffer_budget, cfg.limits.max_streams);
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
        registry: Default::default(),
        refusal_summary: Default::default(),
        refusal_log: Default::default(),
        logs: Default::default(),
        life: Default::default(),
        refusing: AtomicUsize::new(0),
        pending: Mutex::new(Pending::default()),
        accepted: tx,
        predecessor: Mutex::new(None),
        retired: Default::default(),
        stopping: Default::default(),
        changed: Default::default(),
        extras: Default::default(),
    });
    (state, rx)
}

/// Starts accepting on `tcp`, with the connection to the `predecessor` process, if any.
fn run(
    tcp: TcpListener,
    state: Arc<State>,
    incoming: mpsc::Receiver<(Session, Peer)>,
    predecessor: Option<tokio::net::UnixStream>,
) -> Result<Listener, Error> {
    let local = tcp.local_addr().map_err(Error::Io)?;
    if let Some(sock) = predecessor {
        let sock = Arc::new(sock);
        *state.predecessor.lock().unwrap_or_else(|p| p.into_inner()) = Some(sock.clone());
        tokio::spawn(upgrade::watch_predecessor(sock, state.clone()));
    }
    let task = tokio::spawn(accept_loop(tcp, state.clone()));
    tokio::spawn(refusals::summarise(Arc::downgrade(&state)));
    // The program says it is ready (the CLI's "server ready" line names the address).
    debug!(%local, "listening");
    Ok(Listener { state, incoming, local, task, handover: None, handover_file: None, took_over_from: None })
}

impl Listener {
    /// Waits for the next new session and returns its first stream (the first one its client
    /// opens, which may not have arrived yet) and its authenticated peer. Streams the client
    /// opens after the first are refused; take the whole session with
    /// [`Listener::accept_session`] to accept them.
    ///
    /// A session whose stream finds the server's stream limits spent (its key's share of the
    /// buffer budget, or its stream slots) is dropped and not returned.
    ///
    /// # Errors
    /// [`Error::Io`] if the accept loop stopped.
    pub async fn accept(&mut self) -> Result<(Stream, Peer), Error> {
        loop {
            let (session, peer) = self.accept_session().await?;
            match session.into_first_stream() {
                Ok(stream) => return Ok((stream, peer)),
                // The session is dropped: its client's stream is refused, and it ends.
                Err(e) => {
                    quiet!(
                        peer.log,
                        warn!(client = %peer.label(), error = %e, "cannot take the session's first stream (it ended before it was accepted, or the stream limits are spent); session dropped")
                    )
                }
            }
        }
    }

    /// Waits for the next new session: a handle to accept its streams ([`Session::accept`])
    /// and open streams to its client ([`Session::open`]), and its authenticated peer.
    ///
    /// # Errors
    /// [`Error::Io`] if the accept loop stopped.
    pub async fn accept_session(&mut self) -> Result<(Session, Peer), Error> {
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

    /// Waits until every session of this process has ended (its last line logged).
    pub async fn sessions_ended(&self) {
        loop {
            let changed = self.state.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.sessions() == 0 {
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
    let mut backoff = crate::net::AcceptBackoff::default();
    loop {
        let (sock, addr) = backoff.accept(&tcp, "server").await;
        // A load balancer's connections are limited per client, once its PROXY header is read.
        if !proxy::trusted(&state.cfg.proxy_from, addr.ip()) && !state.rate_ok(addr.ip()) {
            state.refused(Refusal::RateLimited, addr, Some("over the handshake rate of its source address"), false);
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
            let why = "handshake cap reached, every handshake young or replying; answered BUSY";
            state.refused(Refusal::Busy, addr, Some(why), false);
            refuse_busy(state, sock);
            return;
        };
        let live_addr = live.addr;
        live.close(open);
        let why = "handshake cap reached: the oldest handshake was closed to make room";
        state.refused(Refusal::Evicted, live_addr, Some(why), false);
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
                // A key not on the list was logged already, with the line to add.
                let logged = matches!(&e, Error::Handshake { source: crate::proto::HandshakeError::NotAllowed(_), .. });
                let what = match &e {
                    Error::SessionCap { client, cap: CapReached::Server { .. }, .. } => {
                        Some(format!("{client}, max-sessions"))
                    }
                    Error::SessionCap { client, cap: CapReached::Key { .. }, .. } => {
                        Some(format!("{client}, max-sessions-per-key"))
                    }
                    _ => None,
                };
                st.refused_for(Refusal::of(&e), addr, Some(&e.to_string()), logged, what);
            }
            Err(_) => {
                st.refused(Refusal::TimedOut, addr, Some("no complete handshake within the handshake timeout"), false);
            }
        }
        st.pending().live.retain(|l| l.id != id);
    });
    pending.live.push_back(Live { id, addr, started: now, task: task.abort_handle(), claim, busy });
}
