//! The service request and reply that open every tunnel stream (see the module documentation
//! of [`crate::tunnel`] for the bytes).

use std::io;
use std::time::{Duration, Instant};

use rand::Rng;
use tracing::debug;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use super::{check_name, TunnelError, MAX_SERVICE_NAME, REQUEST_TIMEOUT};
use crate::human::printable;
use crate::net::{self, ClientConfig, Stream};

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

pub(super) async fn write_reply(stream: &mut Stream, status: u8, msg: &str) -> io::Result<()> {
    let mut end = msg.len().min(255);
    while !msg.is_char_boundary(end) {
        end -= 1;
    }
    let mut buf = vec![status, end as u8];
    buf.extend_from_slice(&msg.as_bytes()[..end]);
    stream.write_all(&buf).await
}

pub(super) async fn read_request(stream: &mut Stream) -> Result<String, TunnelError> {
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
pub(super) async fn read_reply<R: AsyncRead + Unpin>(stream: &mut R, service: &str) -> Result<(), TunnelError> {
    let reply = async {
        let status = stream.read_u8().await?;
        let len = stream.read_u8().await? as usize;
        let mut msg = vec![0u8; len];
        stream.read_exact(&mut msg).await?;
        Ok::<_, io::Error>((status, printable(&String::from_utf8_lossy(&msg)).into_owned()))
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

/// How long a new tunnel keeps trying while the server answers BUSY (a burst of local
/// connections can exceed the server's per-source handshake rate).
pub const BUSY_PATIENCE: Duration = Duration::from_secs(10);

/// Connects, retrying for up to [`BUSY_PATIENCE`] while the server is busy, with a jittered
/// backoff from 50 ms to 1 s so that a burst spreads out instead of retrying in lockstep.
async fn connect_when_not_busy(addr: &str, cfg: ClientConfig) -> Result<Stream, net::Error> {
    let start = Instant::now();
    let mut delay = Duration::from_millis(50);
    loop {
        match net::connect(addr, cfg.clone()).await {
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
