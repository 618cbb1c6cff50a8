//! The service request and reply that open every tunnel stream (see the module documentation
//! of [`crate::tunnel`] for the bytes).

use std::io;
use std::time::{Duration, Instant};

use rand::Rng;
use tracing::debug;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use zeroize::Zeroizing;

use super::{check_name, Status, TunnelError, MAX_SERVICE_NAME, REQUEST_TIMEOUT};
use crate::human::printable;
use crate::net::{self, ClientConfig, ReadHalf, Stream, WriteHalf};

/// Client side: opens a stream to `service` on the server at `addr`. If the server refuses
/// the service, the stream is closed cleanly ([`finish`]) before the error is returned, so the
/// session ends as a normal close on both sides.
///
/// # Errors
/// [`TunnelError::Net`] for connection and handshake failures, [`TunnelError::UnknownService`],
/// [`TunnelError::ServiceRefused`], [`TunnelError::UnknownStatus`], [`TunnelError::Timeout`].
pub async fn open(addr: &str, cfg: ClientConfig, service: &str) -> Result<Stream, TunnelError> {
    let mut stream = request(addr, cfg, service).await?;
    let ended =
        |s: &crate::net::LinkStatus| matches!(s, crate::net::LinkStatus::Closed | crate::net::LinkStatus::Failed(_));
    match read_reply(&mut stream, service).await {
        Ok(_) => Ok(stream),
        Err(e) if e.is_refusal() => {
            // The stream is its session's only one: once it is finished the session ends
            // (both ends' FIN, CLOSE Normal); wait for that (bounded), so that a program that
            // exits at once does not leave the server holding a detached session.
            let mut status = stream.status();
            let _ = finish(stream, REFUSAL_DRAIN).await;
            let _ = tokio::time::timeout(Duration::from_secs(5), status.wait_for(ended)).await;
            Err(e)
        }
        Err(e) => {
            // No usable reply (none in time, or a malformed one): the stream is reset, and the
            // session, which holds no other, ends with it; wait for that (bounded), so that the
            // server is told rather than left holding a detached session until it expires.
            let mut status = stream.status();
            stream.reset();
            let _ = tokio::time::timeout(Duration::from_secs(5), status.wait_for(ended)).await;
            Err(e)
        }
    }
}

/// How long [`finish`] waits for the peer's end of stream, and for ours to be acknowledged.
pub const FINISH_TIMEOUT: Duration = Duration::from_secs(10);
/// Most bytes the server discards after refusing a service (what the client sent behind its
/// request before it read the refusal), and a client after a refusal (nothing is expected).
pub(super) const REFUSAL_DRAIN: u64 = 16 << 20;

/// Ends a tunnel stream cleanly: half-closes it and reads, discarding, whatever the peer still
/// sends until its end of stream (at most `limit` bytes, within [`FINISH_TIMEOUT`]). Both ends
/// of the stream are then finished, and the session ends with a normal close instead of being
/// aborted. Returns the bytes discarded.
///
/// # Errors
/// The stream's failure, or `TimedOut` / `InvalidData` if the peer did not end its stream in
/// time or sent more than `limit`; the stream is then reset (the session goes on).
pub async fn finish(stream: Stream, limit: u64) -> io::Result<u64> {
    let (mut r, mut w) = stream.into_split();
    finish_halves(&mut r, &mut w, limit).await
}

/// [`finish`] for a stream already split into halves.
pub(super) async fn finish_halves(r: &mut ReadHalf, w: &mut WriteHalf, limit: u64) -> io::Result<u64> {
    let drain = async {
        // On the heap, allocated only here: an array would sit in the future of every tunnel.
        let mut sink = Zeroizing::new(vec![0u8; 16 * 1024]);
        let mut total = 0u64;
        loop {
            match r.read(&mut sink[..]).await? {
                0 => return Ok(total),
                n => total += n as u64,
            }
            if total > limit {
                return Err(io::Error::new(io::ErrorKind::InvalidData, format!("peer sent more than {limit} bytes")));
            }
        }
    };
    let both = async {
        let (shut, drained) = tokio::join!(w.shutdown(), drain);
        shut?;
        drained
    };
    let r = match tokio::time::timeout(FINISH_TIMEOUT, both).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "the peer did not end its stream in time")),
    };
    if r.is_err() {
        // Abandoned, not left open: a talk-first service behind a start-up check would
        // otherwise go on sending (an operator's 256 MiB went through, read by nobody).
        w.reset();
    }
    r
}

/// Server side: writes the reply. The message is cut to 255 bytes on a character boundary.
pub(super) async fn write_reply<W: tokio::io::AsyncWrite + Unpin>(
    stream: &mut W,
    status: Status,
    msg: &str,
) -> io::Result<()> {
    let mut end = msg.len().min(255);
    while !msg.is_char_boundary(end) {
        end -= 1;
    }
    let mut buf = vec![status as u8, end as u8];
    buf.extend_from_slice(&msg.as_bytes()[..end]);
    stream.write_all(&buf).await
}

/// What a request asks for.
pub(crate) enum Request {
    /// A service, by name.
    Service(String),
    /// A listener on the server for reverse forwarding (first byte [`LISTEN_REQUEST`]).
    Listen(std::net::SocketAddr),
    /// A connection to `host:port`, for dynamic forwarding (first byte [`CONNECT_REQUEST`]).
    Connect {
        /// A host name or address, checked by [`super::check_host`].
        host: String,
        /// The port.
        port: u16,
    },
}

/// The first byte of a listen request (reverse forwarding): `0xFE || addr_len: u8 || addr`,
/// `addr` an `IP:PORT` for the server to listen on.
pub(crate) const LISTEN_REQUEST: u8 = 0xFE;
/// The first byte of a stream the server opens for a connection to a reverse forward's
/// listener: `0xFD || addr_len: u8 || addr`, `addr` the listener's address as the server
/// answered the listen request.
pub(crate) const REVERSE_OPEN: u8 = 0xFD;

/// Writes `tag || len || text` (a listen request or a reverse open).
pub(crate) fn tagged(tag: u8, text: &str) -> Vec<u8> {
    let text = &text.as_bytes()[..text.len().min(255)];
    let mut v = vec![tag, text.len() as u8];
    v.extend_from_slice(text);
    v
}

/// Reads the `len || text` behind a tag, as an `IP:PORT`.
///
/// # Errors
/// [`TunnelError::Malformed`] if it is not one, [`TunnelError::Io`].
pub(crate) async fn read_addr<R: AsyncRead + Unpin>(stream: &mut R) -> Result<std::net::SocketAddr, TunnelError> {
    let n = stream.read_u8().await? as usize;
    let mut text = vec![0u8; n];
    stream.read_exact(&mut text).await?;
    let text = std::str::from_utf8(&text).map_err(|_| TunnelError::Malformed("listen address"))?;
    text.parse().map_err(|_| TunnelError::Malformed("listen address (want IP:PORT)"))
}

/// The first byte of a connect request: `0xFF || host_len: u8 || host || port: u16 BE`.
pub(crate) const CONNECT_REQUEST: u8 = 0xFF;

/// The bytes of a connect request to `host:port`.
///
/// # Errors
/// [`TunnelError::Malformed`] for a host [`super::check_host`] refuses.
pub(crate) fn connect_request(host: &str, port: u16) -> Result<Vec<u8>, TunnelError> {
    super::check_host(host)?;
    let mut req = vec![CONNECT_REQUEST, host.len() as u8];
    req.extend_from_slice(host.as_bytes());
    req.extend_from_slice(&port.to_be_bytes());
    Ok(req)
}

/// Server side: reads the request (the caller bounds the wait).
///
/// # Errors
/// [`TunnelError::Malformed`] for a length out of range or a name that is not UTF-8,
/// [`TunnelError::BadName`] for other characters, [`TunnelError::Io`].
pub(crate) async fn read_request<R: AsyncRead + Unpin>(stream: &mut R) -> Result<Request, TunnelError> {
    let len = stream.read_u8().await? as usize;
    if len == 0 {
        return Err(TunnelError::Malformed("request (name length 0)"));
    }
    if len == LISTEN_REQUEST as usize {
        return Ok(Request::Listen(read_addr(stream).await?));
    }
    if len == CONNECT_REQUEST as usize {
        let n = stream.read_u8().await? as usize;
        let mut host = vec![0u8; n];
        stream.read_exact(&mut host).await?;
        let port = stream.read_u16().await?;
        let host = String::from_utf8(host).map_err(|_| TunnelError::Malformed("connect host"))?;
        super::check_host(&host)?;
        return Ok(Request::Connect { host, port });
    }
    if len > MAX_SERVICE_NAME {
        return Err(TunnelError::Malformed("request"));
    }
    let mut name = vec![0u8; len];
    stream.read_exact(&mut name).await?;
    let name = String::from_utf8(name).map_err(|_| TunnelError::Malformed("request"))?;
    check_name(&name)?;
    Ok(Request::Service(name))
}

/// Connects and sends the service request, without waiting for the reply.
pub(super) async fn request(addr: &str, cfg: ClientConfig, service: &str) -> Result<Stream, TunnelError> {
    check_name(service)?;
    let mut stream = connect_when_not_busy(addr, cfg).await?;
    let mut req = vec![service.len() as u8];
    req.extend_from_slice(service.as_bytes());
    stream.write_all(&req).await?;
    Ok(stream)
}

/// Reads the server's reply to a service request (within [`REQUEST_TIMEOUT`]).
pub(crate) async fn read_reply<R: AsyncRead + Unpin>(stream: &mut R, service: &str) -> Result<String, TunnelError> {
    read_reply_on(stream, service, None).await
}

/// [`read_reply`], on a stream whose `link` is followed: [`REQUEST_TIMEOUT`] counts only time
/// with the link up. Found by a walk: connections opened during an outage of over 10 s failed
/// while the link was still down, and the server still carried their requests out after the
/// resume.
pub(crate) async fn read_reply_on<R: AsyncRead + Unpin>(
    stream: &mut R,
    service: &str,
    link: Option<super::link_time::Link>,
) -> Result<String, TunnelError> {
    let reply = async {
        let status = stream.read_u8().await?;
        let len = stream.read_u8().await? as usize;
        let mut msg = vec![0u8; len];
        stream.read_exact(&mut msg).await?;
        Ok::<_, io::Error>((status, printable(&String::from_utf8_lossy(&msg)).into_owned()))
    };
    let (status, msg) = match super::link_time::within(REQUEST_TIMEOUT, link, reply).await {
        Some(Ok(r)) => r,
        Some(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(TunnelError::Malformed("reply")),
        Some(Err(e)) => return Err(e.into()),
        None => return Err(TunnelError::Timeout("reply")),
    };
    let service = service.to_string();
    match status {
        0 => Ok(msg),
        1 => Err(TunnelError::UnknownService(service)),
        2 => Err(TunnelError::ServiceRefused { service, reason: msg }),
        3 => Err(TunnelError::DestinationRefused { service }),
        status => Err(TunnelError::UnknownStatus { service, status }),
    }
}

/// How long a new tunnel keeps trying while the server answers BUSY (a burst of local
/// connections can exceed the server's per-source handshake rate).
pub const BUSY_PATIENCE: Duration = Duration::from_secs(10);

/// Connects, retrying for up to [`BUSY_PATIENCE`] while the server is busy, with a jittered
/// backoff from 50 ms to 1 s so that a burst spreads out instead of retrying in lockstep.
pub(super) async fn connect_when_not_busy(addr: &str, cfg: ClientConfig) -> Result<Stream, net::Error> {
    retry_busy(addr, || net::connect(addr, cfg.clone())).await
}

/// Like [`connect_when_not_busy`], for a session of many streams.
pub(super) async fn connect_session_when_not_busy(addr: &str, cfg: ClientConfig) -> Result<net::Session, net::Error> {
    retry_busy(addr, || net::connect_session(addr, cfg.clone())).await
}

async fn retry_busy<T, F: std::future::Future<Output = Result<T, net::Error>>>(
    addr: &str,
    mut connect: impl FnMut() -> F,
) -> Result<T, net::Error> {
    let start = Instant::now();
    let mut delay = Duration::from_millis(50);
    loop {
        match connect().await {
            Err(net::Error::Busy { .. }) if start.elapsed() + delay < BUSY_PATIENCE => {
                let jittered = delay.mul_f64(rand::thread_rng().gen_range(0.5..=1.0));
                debug!(addr, wait = ?jittered, "server busy; trying again");
                tokio::time::sleep(jittered).await;
                delay = (delay * 2).min(Duration::from_secs(1));
            }
            r => return r,
        }
    }
}
