//! Upgrades as the server runs them (the messages are in [`super::handover`]): a new process
//! prepares everything it needs with the old process's sockets in hand, then commits; the old
//! process stops accepting only then, and keeps its successor told of its first-connection
//! stamps and its session counts, so that an upgrade forgets neither the replay defence nor the
//! caps.

use std::collections::HashSet;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tracing::{info, warn};

use super::handover::{self, HandoverError, Msg, Update, ANSWER_TIME};
use super::state::{State, Table};
use super::{listen, new_state, run, spawn_handshake, Listener};
use crate::keys::PublicKey;
use crate::net::config::ServerConfig;
use crate::net::Error;

/// How long a process that handed its listener over waits, when the new process closes the
/// handover connection, for a stop of its own before it warns that the new one is gone: a stop
/// of the whole service signals both at about the same time.
const STOP_TOGETHER: std::time::Duration = std::time::Duration::from_secs(2);

/// A server upgrade half done ([`prepare_handover`]): this process holds the listening socket
/// (the running server's, or its own if none runs) and the other listening sockets the running
/// server offered, and the running server still serves. [`Upgrade::commit`] completes it;
/// dropping it instead leaves the running server serving.
pub struct Upgrade {
    path: PathBuf,
    /// Where this process's handover socket is bound until the commit renames it to `path`.
    tmp: PathBuf,
    addr: String,
    tcp: Option<TcpListener>,
    unix: Option<UnixListener>,
    /// The running server: the connection to it, its id, and whether it speaks protocol 1.
    old: Option<(UnixStream, u32, bool)>,
    sockets: Vec<(SocketAddr, std::net::TcpListener)>,
}

impl std::fmt::Debug for Upgrade {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upgrade")
            .field("path", &self.path)
            .field("from_pid", &self.old.as_ref().map(|o| o.1))
            .field("sockets", &self.sockets.iter().map(|s| s.0).collect::<Vec<_>>())
            .finish()
    }
}

impl Drop for Upgrade {
    fn drop(&mut self) {
        if self.unix.is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// The first half of [`bind_with_handover`]: takes the listening socket of the server running
/// with the same `handover` path (and the other sockets it offers), or binds `addr` if none
/// runs, and binds this process's handover socket beside `handover`. The running server goes on
/// serving until [`Upgrade::commit`]; if this process fails before that (or drops the
/// [`Upgrade`]), nothing changed for it.
///
/// # Errors
/// [`Error::Bind`] if no server runs and `addr` cannot be bound; [`Error::Handover`] if the
/// running server did not offer its listener, or the handover socket cannot be bound (for
/// example its directory does not exist).
pub async fn prepare_handover(addr: impl Into<String>, handover: impl AsRef<Path>) -> Result<Upgrade, Error> {
    let addr = addr.into();
    let path = handover.as_ref().to_owned();
    let fail = |source| Error::Handover { path: path.display().to_string(), source };
    let offer = handover::take_over(&path).await.map_err(fail)?;
    let mut tmp = OsString::from(path.as_os_str());
    tmp.push(format!(".{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let unix = handover::bind(&tmp).map_err(fail)?;
    let (tcp, sockets, old) = match offer {
        Some(o) => (TcpListener::from_std(o.listener).map_err(Error::Io)?, o.sockets, Some((o.sock, o.pid, o.legacy))),
        None => match listen(&addr).await {
            Ok(l) => (l, Vec::new(), None),
            Err(source) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(Error::Bind { addr: addr.clone(), source });
            }
        },
    };
    Ok(Upgrade { path, tmp, addr, tcp: Some(tcp), unix: Some(unix), old, sockets })
}

/// Binds a server that can be upgraded without losing a session (see [`handover`]): if a
/// server already runs with the same `handover` path, its listening socket is taken over (and
/// `addr` is not bound: the socket keeps its address), and resumes of its sessions are handed
/// to it; otherwise `addr` is bound. Either way this server then listens at `handover` for the
/// next process to take over from it, and [`Listener::retirement`] says when that happened.
/// [`prepare_handover`] and [`Upgrade::commit`] are its two halves, for a caller that binds
/// more sockets between them.
///
/// # Errors
/// As [`prepare_handover`] and [`Upgrade::commit`].
pub async fn bind_with_handover(
    addr: impl Into<String>,
    cfg: ServerConfig,
    handover: impl AsRef<Path>,
) -> Result<Listener, Error> {
    prepare_handover(addr, handover).await?.commit(cfg).await
}

impl Upgrade {
    /// The id of the running server whose listener this process holds, if one runs.
    pub fn from_pid(&self) -> Option<u32> {
        self.old.as_ref().map(|o| o.1)
    }

    /// True if the running server is an older holdfast that speaks the first handover protocol:
    /// it stopped accepting when it handed its listener over, offers no other socket, and keeps
    /// the ones it has (its metrics port, say) until it exits. This process is then the one
    /// that serves, whatever else fails: it should not exit because such a socket is taken.
    pub fn from_older_version(&self) -> bool {
        self.old.as_ref().is_some_and(|o| o.2)
    }

    /// The listening socket bound to `addr` that the running server offered with its listener
    /// (one it registered with [`Listener::hand_over_also`], such as its metrics endpoint), if
    /// there is one: use it instead of binding `addr`, which the running server holds.
    pub fn take_socket(&mut self, addr: SocketAddr) -> Option<std::net::TcpListener> {
        let i = self.sockets.iter().position(|(a, _)| *a == addr)?;
        Some(self.sockets.swap_remove(i).1)
    }

    /// Completes the upgrade: tells the running server to stop accepting, takes over its
    /// first-connection stamps and session counts, puts this process's handover socket at the
    /// path, and starts accepting. Call it once everything else this process needs is bound.
    ///
    /// # Errors
    /// [`Error::Handover`] if the running server did not confirm (it timed out waiting, or
    /// failed): it then goes on serving, and this process should exit.
    pub async fn commit(mut self, cfg: ServerConfig) -> Result<Listener, Error> {
        let path = self.path.display().to_string();
        let fail = |source| Error::Handover { path: path.clone(), source };
        let (state, incoming) = new_state(cfg);
        let old = self.old.take();
        if let Some((sock, _, false)) = &old {
            handover::commit(sock).await.map_err(fail)?;
            let confirmed = async {
                loop {
                    match handover::next_update(sock).await? {
                        Some(Update::Committed) => return Ok(()),
                        Some(u) => state.apply(u),
                        None => return Err(HandoverError::NotCommitted),
                    }
                }
            };
            tokio::time::timeout(ANSWER_TIME, confirmed)
                .await
                .map_err(|_| fail(HandoverError::NotCommitted))?
                .map_err(fail)?;
        }
        let unix = self.unix.take().ok_or_else(|| fail(HandoverError::Protocol("committed twice")))?;
        let placed = std::fs::rename(&self.tmp, &self.path);
        if let Err(e) = &placed {
            warn!(path = %self.path.display(), error = %e, "cannot put the handover socket in place: the next upgrade will not find this server; restart it to upgrade it");
        }
        let tcp = self.tcp.take().ok_or_else(|| fail(HandoverError::Protocol("committed twice")))?;
        let listen_fd = tcp.as_fd().try_clone_to_owned().map_err(Error::Io)?;
        let (sock, pid) = match old {
            Some((sock, pid, _)) => (Some(sock), Some(pid)),
            None => (None, None),
        };
        let mut listener = run(tcp, state, incoming, sock)?;
        if let Some(pid) = pid {
            info!(from_pid = pid, local = %listener.local, "took over the listener of the running server");
            if self.addr.parse::<SocketAddr>().is_ok_and(|a| a != listener.local && a.port() != 0) {
                warn!(listen = %self.addr, local = %listener.local, "a handover keeps the listening socket's address; to move the server to another address, stop it and start it again there");
            }
        }
        listener.took_over_from = pid;
        listener.handover_file = placed.ok().and_then(|()| std::fs::symlink_metadata(&self.path).ok()).map(|m| {
            use std::os::unix::fs::MetadataExt;
            (self.path.clone(), (m.dev(), m.ino()))
        });
        let (state, accept) = (listener.state.clone(), listener.task.abort_handle());
        listener.handover = Some(tokio::spawn(retire_when_asked(unix, listen_fd, state, accept)));
        Ok(listener)
    }
}

impl Listener {
    /// Hands `socket` (a listening TCP socket, such as a metrics endpoint) to the next process
    /// with the listener in an upgrade, so that it need not bind its address while this process
    /// holds it (see [`Upgrade::take_socket`]). The caller stops accepting on its own copy once
    /// [`super::Retirement::until_handed_over`] resolves.
    ///
    /// # Errors
    /// If the descriptor cannot be duplicated or is not a bound socket.
    pub fn hand_over_also(&self, socket: &impl AsFd) -> std::io::Result<()> {
        self.extra_sockets().add(socket)
    }

    /// A handle that does [`Listener::hand_over_also`] later, from a task that does not own the
    /// listener (for a socket bound after the server started).
    pub fn extra_sockets(&self) -> ExtraSockets {
        ExtraSockets { state: self.state.clone() }
    }
}

/// Adds sockets to those handed to the next process in an upgrade (see
/// [`Listener::extra_sockets`]).
#[derive(Clone)]
pub struct ExtraSockets {
    state: Arc<State>,
}

impl std::fmt::Debug for ExtraSockets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExtraSockets").finish_non_exhaustive()
    }
}

impl ExtraSockets {
    /// As [`Listener::hand_over_also`].
    ///
    /// # Errors
    /// If the descriptor cannot be duplicated or is not a bound socket.
    pub fn add(&self, socket: &impl AsFd) -> std::io::Result<()> {
        let l = std::net::TcpListener::from(socket.as_fd().try_clone_to_owned()?);
        let addr = l.local_addr()?;
        self.state.extras.lock().unwrap_or_else(|p| p.into_inner()).push((addr, OwnedFd::from(l)));
        Ok(())
    }
}

/// Waits for a new process to take the listener over; then stops accepting, and runs the
/// handshakes of the resumes the new process hands down, for as long as it lives. A new process
/// that does not commit leaves this one serving, ready for the next.
pub(super) async fn retire_when_asked(unix: UnixListener, listen: OwnedFd, state: Arc<State>, accept: AbortHandle) {
    let (new, pid, stream) = loop {
        let sockets = || {
            let extras = state.extras.lock().unwrap_or_else(|p| p.into_inner());
            extras.iter().filter_map(|(a, fd)| Some((*a, fd.try_clone().ok()?))).collect()
        };
        let (sock, pid, legacy) = handover::offer(&unix, listen.as_fd(), sockets).await;
        let sock = Arc::new(sock);
        if legacy {
            break (sock, pid, None);
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let (written_tx, written) = tokio::sync::oneshot::channel();
        let writer = tokio::spawn(write_updates(sock.clone(), rx, written_tx)).abort_handle();
        state.begin_succession(tx.clone());
        match handover::await_commit(&sock).await {
            Ok(()) => break (sock, pid, Some((tx, written))),
            Err(e) => {
                state.end_succession();
                writer.abort();
                warn!(new_pid = pid, error = %e, "the new server process did not take over; this one goes on serving");
            }
        }
    };
    accept.abort();
    drop((listen, unix));
    // "Committed" goes after the state queued so far, and is written before this process may
    // exit (as it does at once without sessions): the new process waits for it to accept.
    if let Some((tx, written)) = stream {
        let _ = tx.send(handover::committed_msg());
        if tokio::time::timeout(ANSWER_TIME, written).await.is_err() {
            warn!(new_pid = pid, "the new server process did not read the takeover confirmation in time");
        }
    }
    state.extras.lock().unwrap_or_else(|p| p.into_inner()).clear();
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
                    // A stop of the whole service (`systemctl stop`) signals both processes at
                    // once, and the new one may end first: if this one stops too, soon, that
                    // was the reason, and nothing is wrong.
                    if state.stops_within(STOP_TOGETHER).await {
                        info!(new_pid = pid, "the new server process ended, as this one is stopping too");
                        break;
                    }
                    // Also what a crash of the new process looks like: then nothing listens
                    // on the port, and an operator must hear of it.
                    warn!(
                        new_pid = pid,
                        "the new server process closed the handover connection (it ended: stopped, killed or crashed): this process's sessions can no longer resume, and this process does not listen for new ones; unless the new one was stopped on purpose, start the server again"
                    );
                    break;
                }
                Err(e) => {
                    warn!(error = %e, "the handover connection failed: this process's sessions can no longer resume");
                    break;
                }
            }
        }
        state.end_succession();
    });
}

/// Writes the state messages queued for the new process, in order, until its connection fails;
/// `committed` fires once the confirmation is written.
async fn write_updates(
    sock: Arc<UnixStream>,
    mut rx: mpsc::UnboundedReceiver<Msg>,
    committed: tokio::sync::oneshot::Sender<()>,
) {
    let mut committed = Some(committed);
    while let Some(m) = rx.recv().await {
        if handover::send(&sock, &m, None).await.is_err() {
            break;
        }
        if m == handover::committed_msg() {
            if let Some(c) = committed.take() {
                let _ = c.send(());
            }
        }
    }
}

/// Takes in the predecessor's state messages until it exits (its end of the handover connection
/// closes): then its sessions are gone, resumes of them are answered "unknown session", and
/// they count against the caps no more.
pub(super) async fn watch_predecessor(sock: Arc<UnixStream>, state: Arc<State>) {
    loop {
        match handover::next_update(&sock).await {
            Ok(Some(u)) => state.apply(u),
            Ok(None) => break,
            Err(e) => {
                warn!(error = %e, "the earlier server process's state messages failed; its sessions no longer count against the caps");
                break;
            }
        }
    }
    info!("the earlier server process has exited; resumes of its sessions are now answered \"unknown session\"");
    state.forget_inherited();
    state.lose_predecessor();
}

impl State {
    /// A new process is taking over: sends it this process's stamps and session counts, and
    /// from now on every change of them, on `tx`.
    fn begin_succession(&self, tx: mpsc::UnboundedSender<Msg>) {
        let mut t = self.table();
        for (key, stamps) in &t.first_marks {
            let (floor, list) = stamps.snapshot();
            for m in handover::stamps_msgs(key, floor, &list) {
                let _ = tx.send(m);
            }
        }
        let total = self.total_sessions(&t) as u64;
        let _ = tx.send(handover::sessions_msg(total, None));
        let keys: HashSet<PublicKey> = t.per_key.keys().chain(t.inherited.per_key.keys()).copied().collect();
        for key in keys {
            let _ = tx.send(handover::sessions_msg(total, Some((&key, key_sessions(&t, &key)))));
        }
        t.successor = Some(tx);
    }

    /// The new process went away (before or after committing): no more state messages.
    /// True if the program stops this server (drops its listener) within `limit`.
    async fn stops_within(&self, limit: std::time::Duration) -> bool {
        let wait = async {
            loop {
                let changed = self.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                if self.stopping.load(Ordering::Relaxed) {
                    return;
                }
                changed.await;
            }
        };
        tokio::time::timeout(limit, wait).await.is_ok()
    }

    fn end_succession(&self) {
        self.table().successor = None;
    }

    fn total_sessions(&self, t: &Table) -> usize {
        self.sessions.load(Ordering::Relaxed) + t.inherited.total
    }

    /// Tells the successor, if there is one, `key`'s sessions and the total now.
    pub(super) fn report_sessions(&self, t: &Table, key: &PublicKey) {
        if let Some(tx) = &t.successor {
            let _ = tx.send(handover::sessions_msg(self.total_sessions(t) as u64, Some((key, key_sessions(t, key)))));
        }
    }

    /// Tells the successor, if there is one, stamps of `key` accepted (or merged) here.
    pub(super) fn report_stamps(&self, t: &Table, key: &PublicKey, floor: u64, stamps: &[u64]) {
        if let Some(tx) = &t.successor {
            for m in handover::stamps_msgs(key, floor, stamps) {
                let _ = tx.send(m);
            }
        }
    }

    /// Takes in a state message of the predecessor (and passes it on to a successor).
    fn apply(&self, u: Update) {
        let mut t = self.table();
        match u {
            Update::Stamps { key, floor, stamps } => {
                t.first_marks.entry(key).or_default().merge(floor, &stamps, super::stamps::wall_clock());
                self.report_stamps(&t, &key, floor, &stamps);
            }
            Update::Sessions { total, key } => {
                t.inherited.total = usize::try_from(total).unwrap_or(usize::MAX);
                match key {
                    Some((key, n)) => {
                        match usize::try_from(n).unwrap_or(usize::MAX) {
                            0 => t.inherited.per_key.remove(&key),
                            n => t.inherited.per_key.insert(key, n),
                        };
                        self.report_sessions(&t, &key);
                    }
                    None => {
                        if let Some(tx) = &t.successor {
                            let _ = tx.send(handover::sessions_msg(self.total_sessions(&t) as u64, None));
                        }
                    }
                }
            }
            Update::Committed => {}
        }
    }

    /// The predecessor exited: its sessions count no more.
    fn forget_inherited(&self) {
        let mut t = self.table();
        let gone = std::mem::take(&mut t.inherited);
        for key in gone.per_key.keys() {
            self.report_sessions(&t, key);
        }
        if let Some(tx) = &t.successor {
            let _ = tx.send(handover::sessions_msg(self.total_sessions(&t) as u64, None));
        }
    }
}

/// `key`'s sessions here and in the earlier processes.
fn key_sessions(t: &Table, key: &PublicKey) -> u64 {
    let own = t.per_key.get(key).copied().unwrap_or(0);
    (own + t.inherited.per_key.get(key).copied().unwrap_or(0)) as u64
}
