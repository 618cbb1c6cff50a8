//! Many streams on one session: yamux over the resilient [`Stream`].
//!
//! The session below already delivers every byte exactly once and in order through link
//! faults, so a multiplexer on top needs no recovery of its own: one fault costs one resume for
//! every stream. yamux (the HashiCorp framing, spec version 0) brings what a multiplexer must
//! have, well tested: per-stream windows and flow control (a stream whose reader stops fills
//! only its own window, so it stalls neither the other streams nor the session's ACKs and
//! keepalives, which live below), an open, a half-close (FIN) and a reset (RST) per stream, and
//! a cap on the number of streams. `docs/PROTOCOL.md` appendix B gives the reasons and figures.
//!
//! A [`Mux`] is driven by one task, which reads the session continuously (a stalled stream
//! never stops it) and opens streams on request. Opening waits, instead of failing, while the
//! session has [`MAX_STREAMS`] open: a burst of connections is queued, not refused.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt};
use tokio_util::sync::CancellationToken;

use crate::net::Stream;

mod socket;
use socket::Lent;

/// Most streams open on one session at once; opening more waits.
pub const MAX_STREAMS: usize = 64;
/// Most streams yamux keeps per session, in both directions together. Twice what one end
/// opens: a stream that has ended at the opener may not have ended at the peer yet, and must
/// not make the peer's multiplexer refuse the next one.
pub const MAX_KEPT: usize = 2 * MAX_STREAMS;
/// The receive window all streams of a session may use together (yamux gives each stream
/// 256 KiB at first and tunes it up to this share).
pub const SESSION_WINDOW: usize = MAX_KEPT * 256 * 1024;

/// Errors of the multiplexing layer.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum MuxError {
    /// The session under the streams ended (its failure is reported by its link events).
    #[error("the multiplexed session ended")]
    Closed,
    /// The multiplexer failed: the peer broke the yamux protocol, or the session failed.
    #[error("multiplexing failed: {0}")]
    Yamux(#[from] yamux::ConnectionError),
}

impl From<MuxError> for io::Error {
    fn from(e: MuxError) -> io::Error {
        io::Error::new(io::ErrorKind::ConnectionAborted, e)
    }
}

/// Most data in one yamux frame. Measured for one stream's download (`cargo bench --bench
/// tunnel`, metrics tput): 16 KiB (yamux's default) 3.3 Gbit/s, 32 KiB 2.9, 64 KiB 3.9-4.1,
/// 256 KiB 3.6-3.8 (a frame as large as a stream's first window leaves nothing in flight).
const FRAME: usize = 64 * 1024;

fn config() -> yamux::Config {
    let mut c = yamux::Config::default();
    c.set_max_num_streams(MAX_KEPT);
    c.set_max_connection_receive_window(Some(SESSION_WINDOW));
    c.set_split_send_size(FRAME);
    c
}

type Opener = oneshot::Sender<Result<yamux::Stream, MuxError>>;

/// One end of a multiplexed session: opens streams ([`Mux::open`]) and, on the side that
/// accepts them, hands each new one to the `inbound` channel given to [`Mux::start`].
#[derive(Clone)]
pub struct Mux {
    opens: mpsc::Sender<Opener>,
    slots: Arc<Semaphore>,
    close: CancellationToken,
}

impl std::fmt::Debug for Mux {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mux").field("free_slots", &self.slots.available_permits()).finish()
    }
}

impl Mux {
    /// Starts multiplexing `stream`. `client` is true on the end that connected. Streams the
    /// peer opens are sent on `inbound`, or reset at once without it. The returned task ends
    /// when the session does.
    pub fn start(
        stream: Stream,
        client: bool,
        inbound: Option<mpsc::Sender<MuxStream>>,
    ) -> (Mux, tokio::task::JoinHandle<Result<(), MuxError>>) {
        let mode = if client { yamux::Mode::Client } else { yamux::Mode::Server };
        let (socket, back) = Lent::new(stream);
        let conn = yamux::Connection::new(socket, config(), mode);
        let (opens, rx) = mpsc::channel(MAX_STREAMS);
        let slots = Arc::new(Semaphore::new(MAX_STREAMS));
        let close = CancellationToken::new();
        let task = tokio::spawn(drive(conn, back, rx, inbound, slots.clone(), close.clone()));
        (Mux { opens, slots, close }, task)
    }

    /// Opens a stream: waits while [`MAX_STREAMS`] are open (backpressure, not refusal).
    ///
    /// # Errors
    /// [`MuxError::Closed`] once the session has ended, or the multiplexer's failure.
    pub async fn open(&self) -> Result<MuxStream, MuxError> {
        let permit = self.slots.clone().acquire_owned().await.map_err(|_| MuxError::Closed)?;
        let (tx, rx) = oneshot::channel();
        self.opens.send(tx).await.map_err(|_| MuxError::Closed)?;
        let inner = rx.await.map_err(|_| MuxError::Closed)??;
        Ok(MuxStream { inner: inner.compat(), _slot: Some(permit) })
    }

    /// Ends the multiplexed session: every stream still open is closed, then the session
    /// itself (a clean close of the [`Stream`] below). The driver task ends when that is done.
    pub fn close(&self) {
        self.close.cancel();
    }

    /// True once the session under the streams has ended: open no more on it.
    pub fn is_closed(&self) -> bool {
        self.opens.is_closed()
    }
}

/// Runs the yamux connection: reads the session all the time (so that one stalled stream
/// stops nothing else), opens streams on request and passes on inbound ones.
async fn drive(
    mut conn: yamux::Connection<Lent>,
    back: oneshot::Receiver<Stream>,
    mut opens: mpsc::Receiver<Opener>,
    inbound: Option<mpsc::Sender<MuxStream>>,
    slots: Arc<Semaphore>,
    close: CancellationToken,
) -> Result<(), MuxError> {
    let mut waiting: std::collections::VecDeque<Opener> = std::collections::VecDeque::new();
    let closed = close.cancelled();
    tokio::pin!(closed);
    let mut closing = false;
    let result = std::future::poll_fn(|cx| {
        if closing || closed.as_mut().poll(cx).is_ready() {
            closing = true;
            return conn.poll_close(cx).map_err(MuxError::from);
        }
        while let Poll::Ready(Some(tx)) = opens.poll_recv(cx) {
            waiting.push_back(tx);
        }
        while !waiting.is_empty() {
            match conn.poll_new_outbound(cx) {
                Poll::Ready(Ok(s)) => {
                    if let Some(tx) = waiting.pop_front() {
                        let _ = tx.send(Ok(s));
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(MuxError::from(e))),
                Poll::Pending => break,
            }
        }
        loop {
            match conn.poll_next_inbound(cx) {
                Poll::Ready(Some(Ok(s))) => {
                    // yamux bounds inbound streams (MAX_KEPT); one without a taker (or past a
                    // full queue) is dropped, which resets it.
                    if let Some(tx) = &inbound {
                        let _ = tx.try_send(MuxStream { inner: s.compat(), _slot: None });
                    }
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(MuxError::from(e))),
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    })
    .await;
    for tx in waiting {
        let _ = tx.send(Err(MuxError::Closed));
    }
    opens.close();
    slots.close();
    // yamux is done with the session: end it cleanly (this end's FIN, and the peer's awaited).
    drop(conn);
    if let Ok(stream) = back.await {
        let _ = crate::tunnel::finish(stream, LEFTOVER).await;
    }
    result
}

/// Most bytes read and dropped from the session after yamux has ended, while waiting for the
/// peer's end of stream.
const LEFTOVER: u64 = 1 << 20;

/// One stream of a multiplexed session: tokio `AsyncRead + AsyncWrite`, with half-close
/// (`shutdown` sends the stream's FIN); dropping it without one resets only this stream.
pub struct MuxStream {
    inner: Compat<yamux::Stream>,
    _slot: Option<OwnedSemaphorePermit>,
}

impl std::fmt::Debug for MuxStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MuxStream").field("id", &self.inner.get_ref().id()).finish()
    }
}

impl AsyncRead for MuxStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for MuxStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
