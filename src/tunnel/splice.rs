//! Joining a plain TCP connection and a holdfast stream, both ways, with half-close and without
//! intermediate copy buffers.

use std::io;

use tokio::io::AsyncWriteExt;
use tokio::net::{tcp, TcpStream};
use tokio::sync::watch;

use super::request::{finish_halves, read_reply_on, REFUSAL_DRAIN};
use super::TunnelError;
use crate::net::{ReadHalf, Stream, WriteHalf};

/// Like [`splice`] for a stream whose service request was sent but not yet answered: the
/// program's first bytes go up right behind the request, without waiting a round trip for the
/// reply (the server reads them only after it connected the service and answered 0; otherwise
/// it discards them). The reply is read before anything goes down. After a refusal the upload
/// stops and the stream is ended cleanly ([`finish_halves`]), so the session closes normally.
pub(super) async fn splice_requested(
    mut tcp: TcpStream,
    stream: Stream,
    service: &str,
) -> Result<(u64, u64), TunnelError> {
    let (mut sr, mut sw) = stream.into_split();
    let res = {
        let (tr, tw) = tcp.split();
        let up = tcp_to_stream(tr, &mut sw);
        let down = async {
            let link = super::link_time::Link::of(sr.events(), &sr.status().borrow());
            read_reply_on(&mut sr, service, Some(link)).await?;
            Ok::<_, TunnelError>(stream_to_tcp(&mut sr, tw).await?)
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
                    // The stream failing under the upload may come with the server's refusal:
                    // let its reply say so, if it comes at once.
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
    if let Err(e) = &res {
        if e.is_refusal() {
            let _ = finish_halves(&mut sr, &mut sw, REFUSAL_DRAIN).await;
        }
        // Reset rather than close, so the program does not mistake a failure for a clean end.
        let _ = tcp.set_zero_linger();
    }
    res
}

/// Bytes moved from a socket into a stream per read (one vectored read into the stream's own
/// buffer).
const FILL: usize = 256 * 1024;

/// How long a connection may take nothing of what is left for it once its session has finished
/// (nothing is charged for it any more), before it is reset.
const LINGER: std::time::Duration = std::time::Duration::from_secs(30);

/// The error of a connection that took nothing for [`LINGER`] after its session finished.
#[derive(Debug, thiserror::Error)]
#[error(
    "the connection took none of the bytes left for it for {} after the session had finished",
    crate::human::Rounded(LINGER)
)]
struct LingerOver;

/// Waits for room in `sock`. While it is full, a RESET or the session's failure still ends the
/// wait with an error (the socket's reader may never read again, and the other direction may be
/// over already). After a session that finished cleanly, what is left is owed to the socket's
/// reader, which gets [`LINGER`] without progress to take it.
async fn room_or_stopped(sock: &TcpStream, from: &ReadHalf) -> io::Result<()> {
    let stopped = tokio::select! {
        biased;
        r = sock.writable() => return r,
        e = from.stopped() => e,
    };
    if !crate::net::is_finished(&stopped) {
        return Err(stopped);
    }
    match tokio::time::timeout(LINGER, sock.writable()).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, LingerOver)),
    }
}

/// Copies a TCP socket into a stream until EOF, then half-closes the stream. The socket is read
/// straight into the stream's replay buffer: no copy buffer, so an idle tunnel holds none.
async fn tcp_to_stream(from: tcp::ReadHalf<'_>, to: &mut WriteHalf) -> io::Result<u64> {
    let mut total = 0;
    tcp_to_stream_until(from, to, &mut None, &mut total).await?;
    Ok(total)
}

/// Like [`tcp_to_stream`], and when `stop` turns true it stops reading the socket and
/// half-closes the stream as at EOF (the server is shutting down). The bytes moved are added
/// to `total` as they go, so that a failure still tells how many.
pub(super) async fn tcp_to_stream_until(
    from: tcp::ReadHalf<'_>,
    to: &mut WriteHalf,
    stop: &mut Option<watch::Receiver<bool>>,
    total: &mut u64,
) -> io::Result<()> {
    let sock: &TcpStream = from.as_ref();
    loop {
        let stopping = async {
            match stop.as_mut() {
                Some(rx) => {
                    let _ = rx.wait_for(|s| *s).await;
                }
                None => std::future::pending().await,
            }
        };
        // The peer's RESET ends this direction too, even while the socket has nothing to read
        // (after the peer's FIN, nothing else would notice it).
        let stop_now = tokio::select! {
            // Readable first: while bytes keep coming, nothing else is polled (or locked).
            biased;
            r = sock.readable() => {
                r?;
                false
            }
            () = stopping => true,
            e = to.stopped() => return Err(e),
        };
        if stop_now {
            to.shutdown().await?;
            return Ok(());
        }
        let read = |bufs: &mut [io::IoSliceMut<'_>]| {
            let asked = bufs.iter().map(|b| b.len()).sum();
            crate::net::short_read::read_once(sock, asked, || sock.try_read_vectored(bufs))
        };
        match to.write_with(FILL, read).await {
            Ok(0) => {
                to.shutdown().await?;
                return Ok(());
            }
            Ok(n) => *total += n as u64,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}

/// Copies a stream into a TCP socket until the stream ends, then half-closes the socket. The
/// socket is written straight from the stream's receive buffer.
pub(super) async fn stream_to_tcp(from: &mut ReadHalf, to: tcp::WriteHalf<'_>) -> io::Result<u64> {
    let mut total = 0;
    stream_to_tcp_counted(from, to, &mut total).await?;
    Ok(total)
}

/// [`stream_to_tcp`], adding the bytes moved to `total` as they go (a failure still tells how
/// many).
pub(super) async fn stream_to_tcp_counted(
    from: &mut ReadHalf,
    mut to: tcp::WriteHalf<'_>,
    total: &mut u64,
) -> io::Result<()> {
    loop {
        let sock: &TcpStream = to.as_ref();
        match from.read_with(|bufs| sock.try_write_vectored(bufs)).await {
            Ok(0) => {
                to.shutdown().await?;
                return Ok(());
            }
            Ok(n) => *total += n as u64,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => room_or_stopped(sock, from).await?,
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
pub async fn splice(tcp: TcpStream, stream: Stream) -> io::Result<(u64, u64)> {
    splice_until(tcp, stream, None).await
}

/// Like [`splice`]; when `stop` turns true, the TCP side is read no more and the stream is
/// half-closed (a FIN after every byte already read), then the copy goes on until the peer ends
/// its side too: a clean end of the stream, as if the service had closed its connection.
///
/// # Errors
/// As [`splice`].
pub async fn splice_until(
    mut tcp: TcpStream,
    stream: Stream,
    mut stop: Option<watch::Receiver<bool>>,
) -> io::Result<(u64, u64)> {
    let (mut sr, mut sw) = stream.into_split();
    let (mut up, mut down) = (0, 0);
    let res = {
        let (tr, tw) = tcp.split();
        tokio::try_join!(
            tcp_to_stream_until(tr, &mut sw, &mut stop, &mut up),
            stream_to_tcp_counted(&mut sr, tw, &mut down)
        )
    };
    if res.is_err() {
        // Reset rather than close, so the program does not mistake a failure for a clean end.
        let _ = tcp.set_zero_linger();
    }
    res.map(|_| (up, down))
}
