//! Joining a TCP connection and a tunnel's stream, both ways, with half-close.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use zeroize::Zeroizing;

use super::request::read_reply;
use super::TunnelError;

/// Copy buffer of each direction.
const COPY_BUF: usize = 64 * 1024;

/// The server's refusal (or a bad reply) of a request sent ahead of its answer, carried in an
/// `io::Error` out of [`join`].
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub(super) struct Refused(pub(super) TunnelError);

impl Refused {
    fn wrap(e: TunnelError) -> io::Error {
        io::Error::other(Refused(e))
    }

    /// The refusal inside `e`, if [`join`] failed because of one.
    pub(super) fn of(e: &io::Error) -> Option<&TunnelError> {
        e.get_ref().and_then(|i| i.downcast_ref::<Refused>()).map(|r| &r.0)
    }
}

/// Joins a TCP connection and a stream both ways, with half-close; returns the bytes moved
/// (TCP to stream, stream to TCP). With `answer`, the stream's first bytes are the reply to a
/// request for that service, sent without waiting for it (the program's first bytes go out
/// behind the request, saving a round trip); a refusal is an error that [`Refused::of`] finds. With `stop`, the TCP side is read no more once it turns true
/// and the stream is half-closed, as at EOF. On an error the TCP connection is reset, so that
/// the program does not take a failure for a clean end.
///
/// # Errors
/// The first I/O error of either direction.
pub(super) async fn join<S: AsyncRead + AsyncWrite + Unpin>(
    mut tcp: TcpStream,
    stream: S,
    mut stop: Option<watch::Receiver<bool>>,
    answer: Option<&str>,
) -> io::Result<(u64, u64)> {
    let (mut sr, mut sw) = tokio::io::split(stream);
    let res = {
        let (mut tr, mut tw) = tcp.split();
        let up = async {
            let mut buf = Zeroizing::new(vec![0u8; COPY_BUF]);
            let mut total = 0u64;
            loop {
                let stopping = async {
                    match stop.as_mut() {
                        Some(rx) => drop(rx.wait_for(|s| *s).await),
                        None => std::future::pending().await,
                    }
                };
                let n = tokio::select! {
                    r = tr.read(&mut buf[..]) => r?,
                    () = stopping => 0,
                };
                if n == 0 {
                    sw.shutdown().await?;
                    return Ok::<_, io::Error>(total);
                }
                sw.write_all(&buf[..n]).await?;
                total += n as u64;
            }
        };
        let down = async {
            if let Some(service) = answer {
                read_reply(&mut sr, service).await.map_err(Refused::wrap)?;
            }
            let mut buf = Zeroizing::new(vec![0u8; COPY_BUF]);
            let mut total = 0u64;
            loop {
                let n = sr.read(&mut buf[..]).await?;
                if n == 0 {
                    tw.shutdown().await?;
                    return Ok::<_, io::Error>(total);
                }
                tw.write_all(&buf[..n]).await?;
                total += n as u64;
            }
        };
        tokio::try_join!(up, down)
    };
    if res.is_err() {
        let _ = tcp.set_zero_linger();
        drop(tcp);
        // A stream whose sending half is already closed (FIN sent) is dropped by the multiplexer
        // without a reset, and a peer blocked on a full window would then wait for credit
        // forever, holding its connection. Reading what the peer still sends, for a bounded
        // time, gives it the credit to finish (or to hit the reset that a frame for a dropped
        // stream draws).
        let drain = async {
            let mut sink = Zeroizing::new(vec![0u8; COPY_BUF]);
            while matches!(sr.read(&mut sink[..]).await, Ok(1..)) {}
        };
        let _ = tokio::time::timeout(DRAIN, drain).await;
    }
    res
}

/// How long [`join`] reads what the stream's peer still sends after a failure.
const DRAIN: std::time::Duration = std::time::Duration::from_secs(5);
