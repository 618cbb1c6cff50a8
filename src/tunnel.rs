//! Port forwarding and stdio mode, built only on the public library API.
//!
//! A tunnel stream starts with a *service request*: the client names a service, and the server
//! alone decides where that name goes (nothing else is reachable through it).
//!
//! ```text
//! request:  name_len: u8 (1..=64) | name: [A-Za-z0-9._-]
//! reply:    status: u8 | msg_len: u8 | msg: UTF-8
//!           status 0 = connected, 1 = unknown service, 2 = the service refused or failed
//! ```
//!
//! After a status-0 reply the stream carries the service's bytes both ways, with half-close:
//! EOF on one side becomes an authenticated FIN on the other. The port forwarder sends the
//! program's first bytes right behind the request instead of waiting a round trip for the reply;
//! the server reads them only after answering 0, and discards them with the stream otherwise.

use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{tcp, TcpListener, TcpStream};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};
use zeroize::Zeroizing;

use crate::net::{self, ClientConfig, LinkEvent, Listener, Peer, ReadHalf, Stream, WriteHalf};

/// Longest service name.
pub const MAX_SERVICE_NAME: usize = 64;
/// How long a server waits for a service request, and a client for its reply.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const COPY_BUF: usize = 64 * 1024;

/// Errors of the tunnel layer.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum TunnelError {
    /// Connecting or the session failed.
    #[error(transparent)]
    Net(#[from] net::Error),
    /// The server has no service of that name.
    #[error("the server has no service named '{0}'")]
    UnknownService(String),
    /// The server could not reach the service.
    #[error("service '{service}' refused the connection: {reason}")]
    ServiceRefused {
        /// The service asked for.
        service: String,
        /// What the server reported.
        reason: String,
    },
    /// The name is not a valid service name.
    #[error("invalid service name '{0}': use 1-64 characters from A-Z a-z 0-9 . _ -")]
    BadName(String),
    /// A malformed request or reply.
    #[error("malformed tunnel {0}")]
    Malformed(&'static str),
    /// A request or reply did not arrive in time.
    #[error("timed out waiting for the tunnel {0}")]
    Timeout(&'static str),
    /// An I/O error on a stream or socket.
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl From<TunnelError> for io::Error {
    fn from(e: TunnelError) -> io::Error {
        match e {
            TunnelError::Io(e) => e,
            TunnelError::Net(e) => e.into(),
            TunnelError::UnknownService(_) => io::Error::new(io::ErrorKind::NotFound, e),
            TunnelError::ServiceRefused { .. } => io::Error::new(io::ErrorKind::ConnectionRefused, e),
            TunnelError::Timeout(_) => io::Error::new(io::ErrorKind::TimedOut, e),
            _ => io::Error::new(io::ErrorKind::InvalidData, e),
        }
    }
}

/// Checks a service name.
///
/// # Errors
/// [`TunnelError::BadName`] if it is empty, too long, or has other characters.
pub fn check_name(name: &str) -> Result<(), TunnelError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_SERVICE_NAME
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(TunnelError::BadName(name.to_string()))
    }
}

/// The services a server offers: name to `host:port`.
#[derive(Debug, Clone, Default)]
pub struct Services(BTreeMap<String, String>);

impl Services {
    /// No services.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a service.
    ///
    /// # Errors
    /// [`TunnelError::BadName`] for an invalid name.
    pub fn add(&mut self, name: &str, target: &str) -> Result<(), TunnelError> {
        check_name(name)?;
        self.0.insert(name.to_string(), target.to_string());
        Ok(())
    }

    /// Parses `NAME=HOST:PORT`.
    ///
    /// # Errors
    /// [`TunnelError::BadName`] or [`TunnelError::Malformed`].
    pub fn add_spec(&mut self, spec: &str) -> Result<(), TunnelError> {
        let (name, target) =
            spec.split_once('=').ok_or(TunnelError::Malformed("service spec (want NAME=HOST:PORT)"))?;
        if !target.contains(':') {
            return Err(TunnelError::Malformed("service target (want HOST:PORT)"));
        }
        self.add(name, target)
    }

    /// The target of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    /// Number of services.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

async fn write_reply(stream: &mut Stream, status: u8, msg: &str) -> io::Result<()> {
    let mut end = msg.len().min(255);
    while !msg.is_char_boundary(end) {
        end -= 1;
    }
    let mut buf = vec![status, end as u8];
    buf.extend_from_slice(&msg.as_bytes()[..end]);
    stream.write_all(&buf).await
}

async fn read_request(stream: &mut Stream) -> Result<String, TunnelError> {
    let len = stream.read_u8().await? as usize;
    if len == 0 || len > MAX_SERVICE_NAME {
        return Err(TunnelError::Malformed("request"));
    }
    let mut name = vec![0u8; len];
    stream.read_exact(&mut name).await?;
    let name = String::from_utf8(name).map_err(|_| TunnelError::Malformed("request"))?;
    check_name(&name)?;
    Ok(name)
}

/// Server side: accepts streams forever and connects each to the service it names.
///
/// # Errors
/// Returns only if the listener stops.
pub async fn serve(mut listener: Listener, services: Arc<Services>) -> Result<(), net::Error> {
    loop {
        let (stream, peer) = listener.accept().await?;
        tokio::spawn(serve_one(stream, peer, services.clone()));
    }
}

async fn serve_one(mut stream: Stream, peer: Peer, services: Arc<Services>) {
    let who = peer.name.clone().unwrap_or_else(|| peer.key.to_string());
    let name = match tokio::time::timeout(REQUEST_TIMEOUT, read_request(&mut stream)).await {
        Ok(Ok(n)) => n,
        Ok(Err(e)) => return warn!(client = %who, error = %e, "bad service request"),
        Err(_) => return warn!(client = %who, "no service request in time"),
    };
    let Some(target) = services.get(&name) else {
        warn!(client = %who, service = %name, "unknown service");
        let _ = write_reply(&mut stream, 1, "unknown service").await;
        let _ = stream.shutdown().await;
        return;
    };
    let tcp = match TcpStream::connect(target).await {
        Ok(t) => t,
        Err(e) => {
            warn!(client = %who, service = %name, %target, error = %e, "service refused");
            let _ = write_reply(&mut stream, 2, &e.to_string()).await;
            let _ = stream.shutdown().await;
            return;
        }
    };
    let _ = tcp.set_nodelay(true);
    if write_reply(&mut stream, 0, "").await.is_err() {
        return;
    }
    info!(client = %who, service = %name, %target, "tunnel open");
    match splice(tcp, stream).await {
        Ok((up, down)) => info!(client = %who, service = %name, up, down, "tunnel closed"),
        Err(e) => warn!(client = %who, service = %name, error = %e, "tunnel failed"),
    }
}

/// Client side: opens a stream to `service` on the server at `addr`.
///
/// # Errors
/// [`TunnelError::Net`] for connection and handshake failures, [`TunnelError::UnknownService`],
/// [`TunnelError::ServiceRefused`], [`TunnelError::Timeout`].
pub async fn open(addr: &str, cfg: ClientConfig, service: &str) -> Result<Stream, TunnelError> {
    let mut stream = request(addr, cfg, service).await?;
    read_reply(&mut stream, service).await?;
    Ok(stream)
}

/// Connects and sends the service request, without waiting for the reply.
async fn request(addr: &str, cfg: ClientConfig, service: &str) -> Result<Stream, TunnelError> {
    check_name(service)?;
    let mut stream = net::connect(addr, cfg).await?;
    let mut req = vec![service.len() as u8];
    req.extend_from_slice(service.as_bytes());
    stream.write_all(&req).await?;
    Ok(stream)
}

/// Reads the server's reply to a service request (within [`REQUEST_TIMEOUT`]).
async fn read_reply<R: AsyncRead + Unpin>(stream: &mut R, service: &str) -> Result<(), TunnelError> {
    let reply = async {
        let status = stream.read_u8().await?;
        let len = stream.read_u8().await? as usize;
        let mut msg = vec![0u8; len];
        stream.read_exact(&mut msg).await?;
        Ok::<_, io::Error>((status, String::from_utf8_lossy(&msg).into_owned()))
    };
    let (status, msg) = match tokio::time::timeout(REQUEST_TIMEOUT, reply).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(TunnelError::Malformed("reply")),
        Ok(Err(e)) => return Err(e.into()),
        Err(_) => return Err(TunnelError::Timeout("reply")),
    };
    match status {
        0 => Ok(()),
        1 => Err(TunnelError::UnknownService(service.to_string())),
        2 => Err(TunnelError::ServiceRefused { service: service.to_string(), reason: msg }),
        _ => Err(TunnelError::Malformed("reply")),
    }
}

/// Like [`splice`] for a stream whose service request was sent but not yet answered: the
/// program's first bytes go up right behind the request, without waiting a round trip for the
/// reply (the server reads them only after it connected the service and answered 0; otherwise
/// it discards them with the stream). The reply is read before anything goes down.
async fn splice_requested(mut tcp: TcpStream, stream: Stream, service: &str) -> Result<(u64, u64), TunnelError> {
    let (mut sr, sw) = stream.into_split();
    let res = {
        let (tr, tw) = tcp.split();
        let up = tcp_to_stream(tr, sw);
        let down = async {
            read_reply(&mut sr, service).await?;
            Ok::<_, TunnelError>(stream_to_tcp(sr, tw).await?)
        };
        tokio::pin!(up, down);
        let (mut up_res, mut down_res) = (None, None);
        while up_res.is_none() || down_res.is_none() {
            tokio::select! {
                r = &mut up, if up_res.is_none() => up_res = Some(r),
                r = &mut down, if down_res.is_none() => down_res = Some(r),
            }
            if matches!(down_res, Some(Err(_))) {
                break;
            }
            if matches!(up_res, Some(Err(_))) {
                if down_res.is_none() {
                    // The stream failing under the upload is often the server refusing the
                    // service: let its reply say so, if it comes at once.
                    if let Ok(r) = tokio::time::timeout(std::time::Duration::from_millis(200), &mut down).await {
                        down_res = Some(r);
                    }
                }
                break;
            }
        }
        match (up_res, down_res) {
            (_, Some(Err(e))) => Err(e),
            (Some(Err(e)), _) => Err(TunnelError::Io(e)),
            (Some(Ok(up)), Some(Ok(down))) => Ok((up, down)),
            _ => Err(TunnelError::Malformed("reply")),
        }
    };
    if res.is_err() {
        // Reset rather than close, so the program does not mistake a failure for a clean end.
        let _ = tcp.set_zero_linger();
    }
    res
}

/// Copies `from` to `to` until EOF, then half-closes `to`. Returns the byte count.
async fn pipe<R, W>(mut from: R, mut to: W) -> io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = Zeroizing::new(vec![0u8; COPY_BUF]);
    let mut total = 0u64;
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            to.shutdown().await?;
            return Ok(total);
        }
        to.write_all(&buf[..n]).await?;
        total += n as u64;
    }
}

/// Bytes moved from a socket into a stream per read (one vectored read into the stream's own
/// buffer).
const FILL: usize = 256 * 1024;

/// Copies a TCP socket into a stream until EOF, then half-closes the stream. The socket is read
/// straight into the stream's replay buffer: no copy buffer, so an idle tunnel holds none.
async fn tcp_to_stream(from: tcp::ReadHalf<'_>, mut to: WriteHalf) -> io::Result<u64> {
    let sock: &TcpStream = from.as_ref();
    let mut total = 0u64;
    loop {
        sock.readable().await?;
        match to.write_with(FILL, |bufs| sock.try_read_vectored(bufs)).await {
            Ok(0) => {
                to.shutdown().await?;
                return Ok(total);
            }
            Ok(n) => total += n as u64,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}

/// Copies a stream into a TCP socket until the stream ends, then half-closes the socket. The
/// socket is written straight from the stream's receive buffer.
async fn stream_to_tcp(mut from: ReadHalf, mut to: tcp::WriteHalf<'_>) -> io::Result<u64> {
    let mut total = 0u64;
    loop {
        let sock: &TcpStream = to.as_ref();
        match from.read_with(|bufs| sock.try_write_vectored(bufs)).await {
            Ok(0) => {
                to.shutdown().await?;
                return Ok(total);
            }
            Ok(n) => total += n as u64,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => sock.writable().await?,
            Err(e) => return Err(e),
        }
    }
}

/// Joins a plain TCP connection and a holdfast stream, both ways, with half-close. Returns the
/// bytes moved (TCP to stream, stream to TCP). If the holdfast stream fails, the TCP connection
/// is reset so the program sees an error rather than a clean end.
///
/// # Errors
/// The first I/O error of either direction.
pub async fn splice(mut tcp: TcpStream, stream: Stream) -> io::Result<(u64, u64)> {
    let (sr, sw) = stream.into_split();
    let res = {
        let (tr, tw) = tcp.split();
        tokio::try_join!(tcp_to_stream(tr, sw), stream_to_tcp(sr, tw))
    };
    if res.is_err() {
        // Reset rather than close, so the program does not mistake a failure for a clean end.
        let _ = tcp.set_zero_linger();
    }
    res
}

/// Joins standard input and output to a holdfast stream (for `ssh -o ProxyCommand`). EOF on
/// stdin is a half-close; the function returns when both directions are done.
///
/// # Errors
/// The first I/O error of either direction.
pub async fn stdio(stream: Stream) -> io::Result<(u64, u64)> {
    let (sr, sw) = stream.into_split();
    let up = pipe(tokio::io::stdin(), sw);
    let down = async {
        let mut out = tokio::io::stdout();
        let n = pipe(sr, &mut out).await?;
        out.flush().await?;
        Ok(n)
    };
    tokio::try_join!(up, down)
}

/// Local port forwarding: every connection accepted on `local` gets its own resilient stream to
/// `service` (one virtual socket per real local connection). Link events of every stream are
/// sent to `events` with the local peer's address, if given. Runs until the listener fails.
///
/// # Errors
/// Returns only if accepting on `local` fails.
pub async fn forward(
    local: TcpListener,
    server: String,
    cfg: ClientConfig,
    service: String,
    events: Option<mpsc::UnboundedSender<(std::net::SocketAddr, LinkEvent)>>,
) -> io::Result<()> {
    check_name(&service)?;
    loop {
        let (tcp, from) = local.accept().await?;
        let _ = tcp.set_nodelay(true);
        let (server, cfg, service, events) = (server.clone(), cfg.clone(), service.clone(), events.clone());
        tokio::spawn(async move {
            let stream = match request(&server, cfg, &service).await {
                Ok(s) => s,
                Err(e) => {
                    warn!(%from, error = %e, "cannot open tunnel");
                    let _ = tcp.set_zero_linger();
                    return;
                }
            };
            if let Some(tx) = events {
                let mut rx = stream.events();
                tokio::spawn(async move {
                    while let Ok(ev) = rx.recv().await {
                        if tx.send((from, ev)).is_err() {
                            break;
                        }
                    }
                });
            }
            debug!(%from, service = %service, "forwarding");
            match splice_requested(tcp, stream, &service).await {
                Ok((up, down)) => info!(%from, up, down, "connection closed"),
                Err(e @ (TunnelError::UnknownService(_) | TunnelError::ServiceRefused { .. })) => {
                    warn!(%from, error = %e, "cannot open tunnel")
                }
                Err(e) => warn!(%from, error = %e, "connection failed"),
            }
        });
    }
}
