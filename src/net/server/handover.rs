//! Upgrading a running server without losing a session: the listening socket is handed to a
//! new process over a local Unix socket, and the old process keeps its sessions.
//!
//! A server bound with a handover path ([`crate::net::bind_with_handover`]) first connects to
//! that path. If a server answers there, the new process asks it for its listener, which comes
//! back as a file descriptor (`SCM_RIGHTS`): both processes then hold one and the same socket,
//! so no connection is refused or lost in between. The old process stops accepting, keeps its
//! live and detached sessions with their connections to the services, and keeps the Unix
//! connection open. The new process serves every new session and binds the path itself, for
//! the next upgrade.
//!
//! A resume that reaches the new process for a session it does not know is handed down that
//! Unix connection to the old process, with its socket and the bytes already read (the hello,
//! and the client's address from a PROXY header). The old process runs the handshake as if it
//! had accepted the connection, and, if it does not know the session either, hands it to its
//! own predecessor, if it has one. The oldest answers "unknown session". So after two upgrades,
//! a session of the first process still resumes.
//!
//! Only a process of the same user may take over (the socket file is made 0600, and the peer's
//! credentials are checked on both ends).
//!
//! # The exchange (protocol 2)
//!
//! Every message on the Unix connection is [`MSG`] bytes: a kind byte, an address
//! (length-prefixed text), a body (length-prefixed), zero padding; at most one descriptor rides
//! with its first byte. In order:
//!
//! 1. new → old: `TakeOver`, body `[2]` (the protocol).
//! 2. old → new: `Listener` with the listening socket, body `[2, N]`; then N `Socket` messages,
//!    each with another listening socket of the old process and its local address as the
//!    address (the metrics endpoint: see [`super::Listener::hand_over_also`]). Then the old
//!    process's state, as `Stamps` and `Sessions` messages (below), and from then on every change
//!    of it. The old process still accepts connections meanwhile.
//! 3. The new process binds whatever else it needs; if anything fails, it exits (or closes the
//!    connection), and the old process, which has not stopped, goes on serving.
//! 4. new → old: `Commit`. The old process stops accepting (and serving the sockets it handed
//!    over), and answers `Committed` after the state messages already queued. Only then does
//!    the new process accept connections and tell systemd it is ready. An old process that does
//!    not see `Commit` within [`ANSWER_TIME`] of its offer drops the connection and goes on.
//! 5. From then on, new → old: `Resume` messages (above); old → new: `Stamps` and `Sessions`
//!    messages for as long as the old process lives.
//!
//! The state messages, so that an upgrade forgets neither the replay defence nor the caps:
//! - `Stamps`, body: a client key (32 bytes), a floor (u64, big-endian), then up to
//!   [`STAMPS_PER_MSG`] first-connection timestamps (u64 each): the stamps the old process
//!   accepted for that key within its window, and the floor at or below which it refuses every
//!   stamp. The new process merges them into its own (see `Stamps::merge`), so a hello refused
//!   (or accepted) before the upgrade is refused after it.
//! - `Sessions`, body: the old process's sessions in all (u64), then optionally a client key
//!   and that key's sessions (u64): the new process counts them with its own against
//!   `max_sessions` and `max_sessions_per_key`. A process that took over passes its own
//!   predecessor's figures on, added to its own.
//!
//! A predecessor of protocol 1 (an empty `Listener` body) stopped accepting as it handed the
//! listener over, sends no state and expects no `Commit`; a successor of protocol 1 (an empty
//! `TakeOver` body) is served the same way.

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer, SendAncillaryMessage,
    SendFlags,
};
use thiserror::Error;
use tokio::io::Interest;
use tokio::net::{UnixListener, UnixStream};

use crate::keys::PublicKey;

/// The size of every message on a handover connection.
pub(super) const MSG: usize = 512;
/// Most bytes of a client address in a message (its text form).
const MAX_ADDR: usize = 64;
/// Where the hello's length starts in a message: after the kind, the address length and the
/// longest address.
const BODY_AT: usize = 2 + MAX_ADDR;
/// Most bytes of a hello in a message.
pub(super) const MAX_BODY: usize = MSG - BODY_AT - 2;
/// How long a new process waits for the old one to hand over its listener, and the old one for
/// the new one to commit.
pub(super) const ANSWER_TIME: Duration = Duration::from_secs(10);
/// This side's protocol (see the module docs).
const PROTOCOL: u8 = 2;
/// Most timestamps in one `Stamps` message.
pub(super) const STAMPS_PER_MSG: usize = (MAX_BODY - 32 - 8) / 8;
/// Most listening sockets handed over besides the main one.
const MAX_SOCKETS: u8 = 8;

/// A message on the handover connection.
pub(super) type Msg = [u8; MSG];

/// What a message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Kind {
    /// New to old: hand me the listener.
    TakeOver = 1,
    /// Old to new: here it is (with the descriptor).
    Listener = 2,
    /// New to old: a resume for one of your sessions (with the connection's descriptor).
    Resume = 3,
    /// Old to new: another listening socket (with its descriptor).
    Socket = 4,
    /// Old to new: a client key's first-connection timestamps.
    Stamps = 5,
    /// Old to new: how many sessions the old process holds.
    Sessions = 6,
    /// New to old: everything is bound; stop accepting.
    Commit = 7,
    /// Old to new: stopped.
    Committed = 8,
}

/// Why a handover did not happen.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum HandoverError {
    /// The handover socket could not be reached for a reason other than "nobody there".
    #[error("cannot connect to the handover socket: {0}")]
    Connect(io::Error),
    /// The process at the handover socket runs as another user.
    #[error("the process at the handover socket runs as user {0}, not as this server's user; refusing to hand over")]
    OtherUser(u32),
    /// The old server did not hand over its listener in time.
    #[error(
        "the server at the handover socket did not hand over its listener within {}",
        crate::human::Rounded(ANSWER_TIME)
    )]
    NoAnswer,
    /// The old server went on serving instead of letting this one take over.
    #[error("the running server did not confirm the takeover (it goes on serving); try the upgrade again")]
    NotCommitted,
    /// A message broke the handover protocol (a bug, or not a holdfast server at the path).
    #[error("the handover protocol was broken: {0}")]
    Protocol(&'static str),
    /// The directory of the handover socket does not exist.
    #[error(
        "the directory {} does not exist. Under systemd, RuntimeDirectory=holdfast creates /run/holdfast \
         (examples/holdfast-server.service); elsewhere create the directory (mode 0700, owned by the \
         server's user) or give --handover a path in a directory that exists",
        .0.display()
    )]
    NoDirectory(PathBuf),
    /// Binding the handover socket failed.
    #[error("cannot listen on the handover socket: {0}")]
    Bind(io::Error),
    /// Another I/O error on the handover connection.
    #[error("handover connection: {0}")]
    Io(#[from] io::Error),
}

/// A message as received.
pub(super) struct Received {
    kind: Kind,
    pub(super) addr: Option<SocketAddr>,
    pub(super) body: Vec<u8>,
    pub(super) fd: Option<OwnedFd>,
}

fn encode(kind: Kind, addr: Option<SocketAddr>, body: &[u8]) -> Result<Msg, HandoverError> {
    let mut m = [0u8; MSG];
    m[0] = kind as u8;
    let text = addr.map(|a| a.to_string()).unwrap_or_default();
    if text.len() > MAX_ADDR || body.len() > MAX_BODY {
        return Err(HandoverError::Protocol("message field too long"));
    }
    m[1] = text.len() as u8;
    m[2..2 + text.len()].copy_from_slice(text.as_bytes());
    m[BODY_AT..BODY_AT + 2].copy_from_slice(&(body.len() as u16).to_be_bytes());
    m[BODY_AT + 2..BODY_AT + 2 + body.len()].copy_from_slice(body);
    Ok(m)
}

fn decode(m: &Msg, fd: Option<OwnedFd>) -> Result<Received, HandoverError> {
    let kind = match m[0] {
        1 => Kind::TakeOver,
        2 => Kind::Listener,
        3 => Kind::Resume,
        4 => Kind::Socket,
        5 => Kind::Stamps,
        6 => Kind::Sessions,
        7 => Kind::Commit,
        8 => Kind::Committed,
        _ => return Err(HandoverError::Protocol("unknown message kind")),
    };
    let alen = usize::from(m[1]);
    let blen = usize::from(u16::from_be_bytes([m[BODY_AT], m[BODY_AT + 1]]));
    if alen > MAX_ADDR || blen > MAX_BODY {
        return Err(HandoverError::Protocol("message field too long"));
    }
    let addr = match alen {
        0 => None,
        _ => Some(
            std::str::from_utf8(&m[2..2 + alen])
                .ok()
                .and_then(|t| t.parse().ok())
                .ok_or(HandoverError::Protocol("bad client address"))?,
        ),
    };
    Ok(Received { kind, addr, body: m[BODY_AT + 2..BODY_AT + 2 + blen].to_vec(), fd })
}

/// Sends one message, with `fd` riding on its first byte. One writer at a time per connection
/// (a message may take more than one write).
pub(super) async fn send(sock: &UnixStream, m: &Msg, fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
    let mut off = 0;
    while off < MSG {
        off += sock
            .async_io(Interest::WRITABLE, || {
                let fds: Vec<BorrowedFd<'_>> = fd.filter(|_| off == 0).into_iter().collect();
                let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
                let mut control = SendAncillaryBuffer::new(&mut space);
                if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(&fds)) {
                    return Err(io::Error::other("no room for the descriptor"));
                }
                Ok(sendmsg(sock, &[IoSlice::new(&m[off..])], &mut control, SendFlags::NOSIGNAL)?)
            })
            .await?;
    }
    Ok(())
}

/// Receives one message; `None` at a clean end of the connection.
async fn recv(sock: &UnixStream) -> Result<Option<Received>, HandoverError> {
    let mut m = [0u8; MSG];
    let mut got = 0;
    let mut fd: Option<OwnedFd> = None;
    while got < MSG {
        let n = sock
            .async_io(Interest::READABLE, || {
                let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
                let mut control = RecvAncillaryBuffer::new(&mut space);
                let r = recvmsg(sock, &mut [IoSliceMut::new(&mut m[got..])], &mut control, RecvFlags::CMSG_CLOEXEC)?;
                for msg in control.drain() {
                    if let RecvAncillaryMessage::ScmRights(fds) = msg {
                        // One descriptor per message: any other is closed as it drops.
                        for f in fds {
                            fd.get_or_insert(f);
                        }
                    }
                }
                Ok(r.bytes)
            })
            .await?;
        if n == 0 {
            return match got {
                0 => Ok(None),
                _ => Err(HandoverError::Protocol("connection ended inside a message")),
            };
        }
        got += n;
    }
    decode(&m, fd).map(Some)
}

/// Checks that the process at the other end of `sock` runs as this process's user.
fn same_user(sock: &UnixStream) -> Result<(), HandoverError> {
    let uid = sock.peer_cred()?.uid();
    if uid == rustix::process::geteuid().as_raw() {
        Ok(())
    } else {
        Err(HandoverError::OtherUser(uid))
    }
}

/// A listening TCP socket received as a descriptor, checked and made non-blocking.
fn tcp_listener(fd: OwnedFd) -> Result<std::net::TcpListener, HandoverError> {
    let listener = std::net::TcpListener::from(fd);
    listener.set_nonblocking(true)?;
    listener.local_addr().map_err(|_| HandoverError::Protocol("the descriptor handed over is not a TCP listener"))?;
    Ok(listener)
}

/// What the old process offered a new one: its sockets, not yet given up.
pub(super) struct Offer {
    /// The main listening socket.
    pub(super) listener: std::net::TcpListener,
    /// The other listening sockets, by local address.
    pub(super) sockets: Vec<(SocketAddr, std::net::TcpListener)>,
    /// The connection to the old process.
    pub(super) sock: UnixStream,
    /// The old process's id.
    pub(super) pid: u32,
    /// The old process speaks protocol 1: it stopped accepting already, and sends no state.
    pub(super) legacy: bool,
}

/// A new process's side: asks the server at `path` for its listener. `Ok(None)` if no server
/// is there (no socket file, or a stale one nobody listens on).
pub(super) async fn take_over(path: &Path) -> Result<Option<Offer>, HandoverError> {
    let sock = match UnixStream::connect(path).await {
        Ok(s) => s,
        Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused) => return Ok(None),
        Err(e) => return Err(HandoverError::Connect(e)),
    };
    same_user(&sock)?;
    let pid = sock.peer_cred()?.pid().map_or(0, |p| p as u32);
    send(&sock, &encode(Kind::TakeOver, None, &[PROTOCOL])?, None).await?;
    let offered = async {
        let Some(Received { kind: Kind::Listener, fd: Some(fd), body, .. }) = recv(&sock).await? else {
            return Err(HandoverError::Protocol("expected the listener"));
        };
        let listener = tcp_listener(fd)?;
        let (legacy, n) = match body[..] {
            [] => (true, 0),
            [_, n] if n <= MAX_SOCKETS => (false, n),
            _ => return Err(HandoverError::Protocol("bad listener message")),
        };
        let mut sockets = Vec::new();
        for _ in 0..n {
            let Some(Received { kind: Kind::Socket, fd: Some(fd), addr: Some(addr), .. }) = recv(&sock).await? else {
                return Err(HandoverError::Protocol("expected a listening socket"));
            };
            sockets.push((addr, tcp_listener(fd)?));
        }
        Ok((listener, sockets, legacy))
    };
    let (listener, sockets, legacy) =
        tokio::time::timeout(ANSWER_TIME, offered).await.map_err(|_| HandoverError::NoAnswer)??;
    Ok(Some(Offer { listener, sockets, sock, pid, legacy }))
}

/// A state message from the old process (see the module docs).
pub(super) enum Update {
    /// A key's stamps: its floor and the stamps accepted above it.
    Stamps { key: PublicKey, floor: u64, stamps: Vec<u64> },
    /// The old process's sessions in all, and one key's.
    Sessions { total: u64, key: Option<(PublicKey, u64)> },
    /// The old process has stopped accepting.
    Committed,
}

fn key_at(b: &[u8]) -> Option<PublicKey> {
    Some(PublicKey::from_bytes(b.get(..32)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// The next state message from the old process; `None` once it has closed the connection.
pub(super) async fn next_update(old: &UnixStream) -> Result<Option<Update>, HandoverError> {
    let Some(m) = recv(old).await? else { return Ok(None) };
    let b = &m.body;
    let bad = || HandoverError::Protocol("bad state message");
    Ok(Some(match m.kind {
        Kind::Stamps => {
            let (Some(key), Some(floor)) = (key_at(b), u64_at(b, 32)) else { return Err(bad()) };
            if (b.len() - 40) % 8 != 0 {
                return Err(bad());
            }
            let stamps = b[40..].chunks_exact(8).filter_map(|c| c.try_into().ok()).map(u64::from_be_bytes).collect();
            Update::Stamps { key, floor, stamps }
        }
        Kind::Sessions => {
            let total = u64_at(b, 0).ok_or_else(bad)?;
            let key = match b.len() {
                8 => None,
                48 => Some((key_at(&b[8..]).ok_or_else(bad)?, u64_at(b, 40).ok_or_else(bad)?)),
                _ => return Err(bad()),
            };
            Update::Sessions { total, key }
        }
        Kind::Committed => Update::Committed,
        _ => return Err(HandoverError::Protocol("expected a state message")),
    }))
}

/// `Stamps` messages for one key: its floor and its stamps, [`STAMPS_PER_MSG`] at most in each.
pub(super) fn stamps_msgs(key: &PublicKey, floor: u64, stamps: &[u64]) -> Vec<Msg> {
    let chunks: Vec<&[u64]> = if stamps.is_empty() { vec![&[]] } else { stamps.chunks(STAMPS_PER_MSG).collect() };
    chunks
        .into_iter()
        .filter_map(|chunk| {
            let mut body = Vec::with_capacity(40 + 8 * chunk.len());
            body.extend_from_slice(key.as_bytes());
            body.extend_from_slice(&floor.to_be_bytes());
            for s in chunk {
                body.extend_from_slice(&s.to_be_bytes());
            }
            encode(Kind::Stamps, None, &body).ok()
        })
        .collect()
}

/// A `Sessions` message: the sessions in all, and `key`'s.
pub(super) fn sessions_msg(total: u64, key: Option<(&PublicKey, u64)>) -> Msg {
    let mut body = total.to_be_bytes().to_vec();
    if let Some((k, n)) = key {
        body.extend_from_slice(k.as_bytes());
        body.extend_from_slice(&n.to_be_bytes());
    }
    let mut m = [0u8; MSG];
    m[0] = Kind::Sessions as u8;
    m[BODY_AT..BODY_AT + 2].copy_from_slice(&(body.len() as u16).to_be_bytes());
    m[BODY_AT + 2..BODY_AT + 2 + body.len()].copy_from_slice(&body);
    m
}

/// The `Committed` message.
pub(super) fn committed_msg() -> Msg {
    let mut m = [0u8; MSG];
    m[0] = Kind::Committed as u8;
    m
}

/// The new process's side: everything is bound, the old process may stop accepting.
pub(super) async fn commit(old: &UnixStream) -> Result<(), HandoverError> {
    send(old, &encode(Kind::Commit, None, &[])?, None).await?;
    Ok(())
}

/// Binds the handover socket at `path` (replacing a stale or handed-over one), mode 0600.
pub(super) fn bind(path: &Path) -> Result<UnixListener, HandoverError> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(HandoverError::Bind(e)),
    }
    let l = UnixListener::bind(path).map_err(|e| match path.parent() {
        Some(dir) if e.kind() == io::ErrorKind::NotFound && !dir.as_os_str().is_empty() && !dir.exists() => {
            HandoverError::NoDirectory(dir.to_owned())
        }
        _ => HandoverError::Bind(e),
    })?;
    rustix::fs::chmod(path, rustix::fs::Mode::from_raw_mode(0o600)).map_err(|e| HandoverError::Bind(e.into()))?;
    Ok(l)
}

/// An old process's side: waits for a new process to ask for the listener, and offers it
/// `listener` (a descriptor of the listening socket) and `sockets` (other listening sockets,
/// by local address, as they are when it asks). Returns the connection to the new process, the new process's id, and
/// whether it speaks protocol 1 (it needs no commit: the old process must stop at once).
pub(super) async fn offer(
    unix: &UnixListener,
    listener: BorrowedFd<'_>,
    sockets: impl Fn() -> Vec<(SocketAddr, OwnedFd)>,
) -> (UnixStream, u32, bool) {
    use std::os::fd::AsFd;
    let mut backoff = crate::net::AcceptBackoff::default();
    loop {
        let sock = match unix.accept().await {
            Ok((sock, _)) => {
                backoff.succeeded();
                sock
            }
            Err(e) => {
                backoff.wait_after("handover socket", &e).await;
                continue;
            }
        };
        let sockets = sockets();
        let asked = async {
            same_user(&sock)?;
            let legacy = match recv(&sock).await? {
                Some(Received { kind: Kind::TakeOver, body, .. }) => body.is_empty(),
                _ => return Err(HandoverError::Protocol("expected a take-over request")),
            };
            if legacy {
                send(&sock, &encode(Kind::Listener, None, &[])?, Some(listener)).await?;
            } else {
                let n = sockets.len().min(usize::from(MAX_SOCKETS));
                send(&sock, &encode(Kind::Listener, None, &[PROTOCOL, n as u8])?, Some(listener)).await?;
                for (addr, fd) in &sockets[..n] {
                    send(&sock, &encode(Kind::Socket, Some(*addr), &[])?, Some(fd.as_fd())).await?;
                }
            }
            Ok::<_, HandoverError>((sock.peer_cred()?.pid().map_or(0, |p| p as u32), legacy))
        };
        match tokio::time::timeout(ANSWER_TIME, asked).await {
            Ok(Ok((pid, legacy))) => return (sock, pid, legacy),
            Ok(Err(e)) => tracing::warn!(error = %e, "a handover request failed; still serving"),
            Err(_) => tracing::warn!("a handover request did not complete in time; still serving"),
        }
    }
}

/// The old process's side: waits (within [`ANSWER_TIME`]) for the new process to commit.
///
/// # Errors
/// [`HandoverError::NoAnswer`] if it did not in time, or another error if the connection
/// ended (the new process failed) or broke the protocol.
pub(super) async fn await_commit(new: &UnixStream) -> Result<(), HandoverError> {
    match tokio::time::timeout(ANSWER_TIME, recv(new)).await {
        Err(_) => Err(HandoverError::NoAnswer),
        Ok(Ok(Some(Received { kind: Kind::Commit, .. }))) => Ok(()),
        Ok(Ok(None)) => Err(HandoverError::Protocol("the new process closed the connection before committing")),
        Ok(Ok(Some(_))) => Err(HandoverError::Protocol("expected a commit")),
        Ok(Err(e)) => Err(e),
    }
}

/// The new process's side: hands a resume connection (`conn`, its client `addr` and the hello
/// already read, `body`) to the old process.
pub(super) async fn forward(
    old: &UnixStream,
    conn: BorrowedFd<'_>,
    addr: SocketAddr,
    body: &[u8],
) -> Result<(), HandoverError> {
    // Handshake tasks forward concurrently; a message must not interleave with another.
    static SENDING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let m = encode(Kind::Resume, Some(addr), body)?;
    let _one = SENDING.lock().await;
    send(old, &m, Some(conn)).await?;
    Ok(())
}

/// The old process's side: the next resume handed down by the new process; `None` once the new
/// process has closed the connection (it exited).
pub(super) async fn next_resume(
    new: &UnixStream,
) -> Result<Option<(tokio::net::TcpStream, SocketAddr, Vec<u8>)>, HandoverError> {
    let Some(m) = recv(new).await? else { return Ok(None) };
    let (Kind::Resume, Some(fd), Some(addr)) = (m.kind, m.fd, m.addr) else {
        return Err(HandoverError::Protocol("expected a resume with its connection"));
    };
    let std = std::net::TcpStream::from(fd);
    std.set_nonblocking(true)?;
    Ok(Some((tokio::net::TcpStream::from_std(std)?, addr, m.body)))
}

/// Decodes `data` (cut or zero-padded to a message) as a message read from the other process,
/// and checks that one that decodes encodes back to a message that decodes the same: the fuzz
/// target `handover` ([`crate::fuzzing::handover_message`]).
pub(crate) fn check_message(data: &[u8]) {
    let mut m = [0u8; MSG];
    let n = data.len().min(MSG);
    m[..n].copy_from_slice(&data[..n]);
    let Ok(r) = decode(&m, None) else { return };
    assert!(r.body.len() <= MAX_BODY);
    let again = encode(r.kind, r.addr, &r.body).expect("a decoded message encodes");
    let r2 = decode(&again, None).expect("an encoded message decodes");
    assert_eq!((r2.kind, r2.addr, &r2.body), (r.kind, r.addr, &r.body), "a message changed on its way back");
}

// Every hello a server reads fits in a message.
const _: () = assert!(crate::proto::handshake::MAX_HANDSHAKE <= MAX_BODY);

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn messages_round_trip_and_bad_ones_are_refused() {
        let addr: SocketAddr = "[2001:db8::7]:5555".parse().unwrap();
        let m = encode(Kind::Resume, Some(addr), b"hello").unwrap();
        let r = decode(&m, None).unwrap();
        assert_eq!((r.kind, r.addr, &r.body[..]), (Kind::Resume, Some(addr), &b"hello"[..]));
        assert!(encode(Kind::Resume, None, &[0; MAX_BODY + 1]).is_err());
        let mut bad = m;
        bad[0] = 9;
        assert!(decode(&bad, None).is_err());
        let mut bad = m;
        bad[1] = 3; // "[20": not an address
        assert!(decode(&bad, None).is_err());
        let mut bad = m;
        bad[BODY_AT..BODY_AT + 2].copy_from_slice(&500u16.to_be_bytes());
        assert!(decode(&bad, None).is_err());
    }

    #[tokio::test]
    async fn state_messages_round_trip_in_chunks() {
        let (a, b) = UnixStream::pair().unwrap();
        let key = crate::keys::Keypair::generate().public;
        let stamps: Vec<u64> = (1..=(STAMPS_PER_MSG as u64 + 3)).collect();
        let msgs = stamps_msgs(&key, 7, &stamps);
        assert_eq!(msgs.len(), 2, "{} stamps in two messages", stamps.len());
        for m in &msgs {
            send(&a, m, None).await.unwrap();
        }
        send(&a, &sessions_msg(5, Some((&key, 3))), None).await.unwrap();
        send(&a, &sessions_msg(4, None), None).await.unwrap();
        send(&a, &committed_msg(), None).await.unwrap();
        let mut got = Vec::new();
        for _ in 0..2 {
            let Some(Update::Stamps { key: k, floor: 7, stamps }) = next_update(&b).await.unwrap() else {
                panic!("not the stamps")
            };
            assert_eq!(k, key);
            got.extend(stamps);
        }
        assert_eq!(got, stamps);
        let Some(Update::Sessions { total: 5, key: Some((k, 3)) }) = next_update(&b).await.unwrap() else {
            panic!("not the key's sessions")
        };
        assert_eq!(k, key);
        assert!(matches!(next_update(&b).await.unwrap(), Some(Update::Sessions { total: 4, key: None })));
        assert!(matches!(next_update(&b).await.unwrap(), Some(Update::Committed)));
        // A resume is not a state message.
        send(&a, &encode(Kind::Resume, None, b"x").unwrap(), None).await.unwrap();
        assert!(next_update(&b).await.is_err());
    }

    #[tokio::test]
    async fn a_listener_and_a_connection_cross_with_their_bytes() {
        let (a, b) = UnixStream::pair().unwrap();
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = tcp.local_addr().unwrap().port();
        send(&a, &encode(Kind::Listener, None, &[]).unwrap(), Some(tcp.as_fd())).await.unwrap();
        let got = recv(&b).await.unwrap().unwrap();
        let l = std::net::TcpListener::from(got.fd.unwrap());
        assert_eq!(l.local_addr().unwrap().port(), port, "the same listening socket");

        let client = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let (conn, _) = tcp.accept().await.unwrap();
        let addr: SocketAddr = "192.0.2.7:4000".parse().unwrap();
        forward(&a, conn.as_fd(), addr, b"the hello").await.unwrap();
        drop(conn);
        let (mut moved, at, body) = next_resume(&b).await.unwrap().unwrap();
        assert_eq!((at, &body[..]), (addr, &b"the hello"[..]));
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut client = client;
        client.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        moved.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping", "the handed-over connection carries the client's bytes");
        drop(a);
        assert!(next_resume(&b).await.unwrap().is_none(), "a closed connection ends cleanly");
    }
}
