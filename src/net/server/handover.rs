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
//! Every message on the Unix connection is [`MSG`] bytes: a kind byte, the client address
//! (length-prefixed text), the hello (length-prefixed), zero padding; at most one descriptor
//! rides with its first byte.

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer, SendAncillaryMessage,
    SendFlags,
};
use thiserror::Error;
use tokio::io::Interest;
use tokio::net::{UnixListener, UnixStream};

/// The size of every message on a handover connection.
const MSG: usize = 512;
/// Most bytes of a client address in a message (its text form).
const MAX_ADDR: usize = 64;
/// Where the hello's length starts in a message: after the kind, the address length and the
/// longest address.
const BODY_AT: usize = 2 + MAX_ADDR;
/// Most bytes of a hello in a message.
pub(super) const MAX_BODY: usize = MSG - BODY_AT - 2;
/// How long a new process waits for the old one to hand over its listener.
const ANSWER_TIME: Duration = Duration::from_secs(10);

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
    /// A message broke the handover protocol (a bug, or not a holdfast server at the path).
    #[error("the handover protocol was broken: {0}")]
    Protocol(&'static str),
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

fn encode(kind: Kind, addr: Option<SocketAddr>, body: &[u8]) -> Result<[u8; MSG], HandoverError> {
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

fn decode(m: &[u8; MSG], fd: Option<OwnedFd>) -> Result<Received, HandoverError> {
    let kind = match m[0] {
        1 => Kind::TakeOver,
        2 => Kind::Listener,
        3 => Kind::Resume,
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

/// Sends one message, with `fd` riding on its first byte.
async fn send(sock: &UnixStream, m: &[u8; MSG], fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
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

/// A new process's side: asks the server at `path` for its listener. `Ok(None)` if no server
/// is there (no socket file, or a stale one nobody listens on).
pub(super) async fn take_over(path: &Path) -> Result<Option<(std::net::TcpListener, UnixStream, u32)>, HandoverError> {
    let sock = match UnixStream::connect(path).await {
        Ok(s) => s,
        Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused) => return Ok(None),
        Err(e) => return Err(HandoverError::Connect(e)),
    };
    same_user(&sock)?;
    let pid = sock.peer_cred()?.pid().map_or(0, |p| p as u32);
    send(&sock, &encode(Kind::TakeOver, None, &[])?, None).await?;
    let answer = tokio::time::timeout(ANSWER_TIME, recv(&sock)).await.map_err(|_| HandoverError::NoAnswer)??;
    let Some(Received { kind: Kind::Listener, fd: Some(fd), .. }) = answer else {
        return Err(HandoverError::Protocol("expected the listener"));
    };
    let listener = std::net::TcpListener::from(fd);
    listener.set_nonblocking(true)?;
    listener.local_addr().map_err(|_| HandoverError::Protocol("the descriptor handed over is not a TCP listener"))?;
    Ok(Some((listener, sock, pid)))
}

/// Binds the handover socket at `path` (replacing a stale or handed-over one), mode 0600.
pub(super) fn bind(path: &Path) -> Result<UnixListener, HandoverError> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(HandoverError::Bind(e)),
    }
    let l = UnixListener::bind(path).map_err(HandoverError::Bind)?;
    rustix::fs::chmod(path, rustix::fs::Mode::from_raw_mode(0o600)).map_err(|e| HandoverError::Bind(e.into()))?;
    Ok(l)
}

/// An old process's side: waits for a new process to ask for the listener, and gives it
/// `listener` (a descriptor of the listening socket). Returns the connection to the new
/// process, on which its resumes will come, and the new process's id.
pub(super) async fn hand_over(unix: &UnixListener, listener: BorrowedFd<'_>) -> (UnixStream, u32) {
    loop {
        let Ok((sock, _)) = unix.accept().await else { continue };
        let asked = async {
            same_user(&sock)?;
            match recv(&sock).await? {
                Some(Received { kind: Kind::TakeOver, .. }) => {}
                _ => return Err(HandoverError::Protocol("expected a take-over request")),
            }
            send(&sock, &encode(Kind::Listener, None, &[])?, Some(listener)).await?;
            Ok::<_, HandoverError>(sock.peer_cred()?.pid().map_or(0, |p| p as u32))
        };
        match tokio::time::timeout(ANSWER_TIME, asked).await {
            Ok(Ok(pid)) => return (sock, pid),
            Ok(Err(e)) => tracing::warn!(error = %e, "a handover request failed; still serving"),
            Err(_) => tracing::warn!("a handover request did not complete in time; still serving"),
        }
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
    send(old, &encode(Kind::Resume, Some(addr), body)?, Some(conn)).await?;
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
