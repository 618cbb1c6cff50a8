//! The server listener: the accept loop, handshake tasks with limits, the session table and
//! each session's driver, which keeps a detached session until it resumes or expires.

mod handshake;
mod session;
mod state;
mod stats;

use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use handshake::{handshake, refuse_busy};
use state::{Pending, State, Table};
use stats::Refusal;
pub use stats::{Refusals, ServerStats, StatsHandle};

use crate::keys::{AllowList, PublicKey};
use crate::net::config::ServerConfig;
use crate::net::stream::Stream;
use crate::net::Error;
use crate::proto::StaticSecrets;

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
    /// Puts `list` in force for new connections. Its keys' static-static results are computed
    /// here, once (about 40 µs per key), so that no first connection waits for them.
    pub fn set(&self, list: AllowList) {
        self.state.set_allow(Arc::new(list));
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
    /// How logs name the client: its allow-list name, or else its key.
    pub fn label(&self) -> String {
        self.name.clone().unwrap_or_else(|| self.key.to_string())
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
    let statics = StaticSecrets::new(&cfg.keypair.private, cfg.allow.iter().map(|p| &p.key));
    let state = Arc::new(State {
        allow: std::sync::RwLock::new(cfg.allow.clone()),
        statics: std::sync::RwLock::new(statics),
        cfg,
        table: Mutex::new(Table::default()),
        sessions: AtomicUsize::new(0),
        buffered: AtomicUsize::new(0),
        expired: AtomicUsize::new(0),
        resumes: AtomicUsize::new(0),
        counters: Default::default(),
        refusal_log: Default::default(),
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
        self.stats_handle().stats()
    }

    /// A handle that reads the counters while something else owns the listener (for example a
    /// metrics endpoint beside [`crate::tunnel::serve_until`]).
    pub fn stats_handle(&self) -> StatsHandle {
        StatsHandle { state: self.state.clone() }
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
            state.counters.refused(Refusal::RateLimited);
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
            state.counters.refused(Refusal::Evicted);
        }
        let id = pending.next_id;
        pending.next_id += 1;
        let st = state.clone();
        // The task cannot deregister before it is registered: it needs the lock held here.
        let task = tokio::spawn(async move {
            let limit = st.cfg.limits.handshake_timeout;
            match tokio::time::timeout(limit, handshake(sock, addr, &st)).await {
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
            st.pending().live.retain(|(i, _)| *i != id);
        });
        pending.live.push_back((id, task.abort_handle()));
    }
}
