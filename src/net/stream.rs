//! The public [`Stream`]: the program's virtual socket. It implements tokio's `AsyncRead` and
//! `AsyncWrite` on top of a sans-IO [`Session`] that a driver task pumps.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{broadcast, watch, Notify};

use crate::keys::PublicKey;
use crate::net::budget::Charge;
use crate::net::events::{LinkEvent, LinkStatus};
use crate::proto::{Session, SessionError};

/// State shared by a stream's handles and its driver task.
pub(crate) struct Shared {
    inner: Mutex<Inner>,
    /// Wakes the driver (new data to send, buffer space freed, shutdown).
    pub(crate) wake_driver: Notify,
    pub(crate) events: broadcast::Sender<LinkEvent>,
    pub(crate) status: watch::Sender<LinkStatus>,
    pub(crate) peer_key: PublicKey,
}

pub(crate) struct Inner {
    pub(crate) session: Session,
    read_waker: Option<Waker>,
    write_waker: Option<Waker>,
    /// Handles (read side, write side) still alive.
    pub(crate) reader_alive: bool,
    pub(crate) writer_alive: bool,
    /// A server session's charge against the server's memory budget (`None` on a client).
    pub(crate) charge: Option<Charge>,
}

impl Shared {
    pub(crate) fn new(session: Session, peer_key: PublicKey) -> Arc<Self> {
        Arc::new(Shared {
            inner: Mutex::new(Inner {
                session,
                read_waker: None,
                write_waker: None,
                reader_alive: true,
                writer_alive: true,
                charge: None,
            }),
            wake_driver: Notify::new(),
            events: broadcast::channel(256).0,
            status: watch::channel(LinkStatus::Connected).0,
            peer_key,
        })
    }

    /// Locks the state. A poisoned lock (a panic elsewhere) is recovered: the session's state
    /// is always consistent between calls.
    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn emit(&self, ev: LinkEvent) {
        let _ = self.events.send(ev);
    }

    pub(crate) fn set_status(&self, s: LinkStatus) {
        self.status.send_replace(s);
    }

    /// Publishes how the session ended (status and event) once its driver has stopped: closed
    /// after a clean finish, failed otherwise.
    /// Nothing is published twice: a failure already reported by [`Shared::fail`] stands.
    pub(crate) fn report_end(&self) {
        if matches!(*self.status.borrow(), LinkStatus::Failed(_)) {
            return;
        }
        let failure = self.lock().session.failure().cloned();
        match failure {
            Some(SessionError::Finished) | None => {
                self.set_status(LinkStatus::Closed);
                self.emit(LinkEvent::Closed);
            }
            Some(e) => {
                self.set_status(LinkStatus::Failed(e.to_string()));
                self.emit(LinkEvent::Failed { reason: e.to_string() });
            }
        }
    }

    /// Ends the session with `err` and wakes everyone.
    pub(crate) fn fail(&self, code: crate::proto::CloseCode, err: SessionError) {
        let reason = err.to_string();
        {
            let mut inner = self.lock();
            inner.session.close(code, err);
            inner.wake_all();
        }
        self.set_status(LinkStatus::Failed(reason.clone()));
        self.emit(LinkEvent::Failed { reason });
    }
}

/// The program's writes run at most this far ahead of what the driver has handed to a socket.
/// The replay buffer still holds everything unacknowledged, up to its bound; this only keeps
/// bytes that nobody has sent yet from piling up there. A bulk transfer's buffers stay small and
/// warm in the cache, and during an outage a busy writer queues 1 MiB rather than the whole
/// replay bound, so the resume has less to replay and the process less to copy meanwhile.
const WRITE_AHEAD: usize = 1 << 20;

impl Inner {
    /// Bytes the program may write now.
    fn write_room(&self) -> usize {
        let s = &self.session;
        s.send_space().min(WRITE_AHEAD.saturating_sub(s.unsent()))
    }

    /// Of `want` more bytes for the session's buffers, how many the memory budget allows now
    /// (all of them without a budget); with none, `cx` is woken when room comes back.
    pub(crate) fn budget_room(&mut self, want: usize, cx: &mut Context<'_>) -> usize {
        match self.charge.as_mut() {
            Some(c) => c.room(&self.session, want, cx),
            None => want,
        }
    }

    /// Gives back to the budget what the session's buffers no longer hold. True if the
    /// session was waiting for room and now has some: the caller wakes the driver.
    pub(crate) fn settle(&mut self) -> bool {
        match self.charge.as_mut() {
            Some(c) => c.settle(&self.session),
            None => false,
        }
    }

    /// Bytes the program may write now, the memory budget allowing; `Pending` (with `cx` to be
    /// woken) if none and the session can still take bytes.
    fn poll_room(&mut self, want: usize, cx: &mut Context<'_>) -> Poll<usize> {
        let open = self.session.failure().is_none() && !self.session.is_shut_down();
        let room = self.write_room().min(want);
        if room == 0 && open {
            self.write_waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let room = if open { self.budget_room(room, cx) } else { room };
        if room == 0 && open {
            // Woken by the budget when room is given back, or by the driver when this
            // session's own buffers drain (acknowledgements).
            self.write_waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        Poll::Ready(room)
    }

    /// Wakes a write waiting for room (the driver handed bytes to the socket).
    pub(crate) fn wake_writer(&mut self) {
        if let Some(w) = self.write_waker.take() {
            w.wake();
        }
    }

    /// Wakes the program's pending reads and writes so they look at the new state.
    pub(crate) fn wake_all(&mut self) {
        if let Some(w) = self.read_waker.take() {
            w.wake();
        }
        if let Some(w) = self.write_waker.take() {
            w.wake();
        }
    }

    /// Discards input nobody will read (the read half was dropped).
    pub(crate) fn discard_unread(&mut self) {
        if !self.reader_alive {
            let mut sink = zeroize::Zeroizing::new([0u8; 4096]);
            while let Ok(Some(n)) = self.session.read(&mut sink[..]) {
                if n == 0 {
                    break;
                }
            }
        }
    }
}

/// Maps a session failure to the `io::Error` the program sees.
pub(crate) fn to_io(e: SessionError) -> io::Error {
    use io::ErrorKind as K;
    let kind = match &e {
        SessionError::GaveUp(_) | SessionError::Expired(_) => K::TimedOut,
        SessionError::Lost => K::NotConnected,
        SessionError::NotAllowed => K::PermissionDenied,
        SessionError::PeerClosed { .. } | SessionError::Declined(_) | SessionError::Aborted(_) => K::ConnectionAborted,
        SessionError::WriteAfterShutdown => K::BrokenPipe,
        SessionError::BadResume(_) => K::InvalidData,
        _ => K::Other,
    };
    io::Error::new(kind, e)
}

/// The read half of a [`Stream`], owned.
pub struct ReadHalf {
    shared: Arc<Shared>,
}

/// The write half of a [`Stream`], owned. Dropping it without `shutdown` still ends the stream
/// with a FIN after every written byte, as closing a TCP socket would.
pub struct WriteHalf {
    shared: Arc<Shared>,
}

/// A resilient, encrypted byte stream: the virtual socket.
///
/// It survives the loss of its real TCP connection: the client reconnects, both ends prove they
/// are the same pair, un-acknowledged bytes are replayed, and reads and writes go on. Watch the
/// link with [`Stream::events`] or [`Stream::status`].
///
/// `shutdown()` sends an authenticated FIN and completes once the peer acknowledged every byte;
/// the peer reads EOF only after all of them.
pub struct Stream {
    read: ReadHalf,
    write: WriteHalf,
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream").field("peer", &self.read.shared.peer_key).finish_non_exhaustive()
    }
}

impl Stream {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Stream { read: ReadHalf { shared: shared.clone() }, write: WriteHalf { shared } }
    }

    /// Splits into owned halves that can move to different tasks.
    pub fn into_split(self) -> (ReadHalf, WriteHalf) {
        (self.read, self.write)
    }

    /// Subscribes to link events from now on.
    pub fn events(&self) -> broadcast::Receiver<LinkEvent> {
        self.read.shared.events.subscribe()
    }

    /// Watches the link status (its current value is available at once).
    pub fn status(&self) -> watch::Receiver<LinkStatus> {
        self.read.shared.status.subscribe()
    }

    /// The peer's authenticated static public key.
    pub fn peer_key(&self) -> PublicKey {
        self.read.shared.peer_key
    }

    /// Bytes written but not yet acknowledged by the peer.
    pub fn unacked(&self) -> usize {
        self.read.shared.lock().session.unacked()
    }
}

impl ReadHalf {
    /// Subscribes to link events.
    pub fn events(&self) -> broadcast::Receiver<LinkEvent> {
        self.shared.events.subscribe()
    }

    /// Watches the link status.
    pub fn status(&self) -> watch::Receiver<LinkStatus> {
        self.shared.status.subscribe()
    }
}

impl WriteHalf {
    /// Subscribes to link events.
    pub fn events(&self) -> broadcast::Receiver<LinkEvent> {
        self.shared.events.subscribe()
    }

    /// Writes without an intermediate buffer: waits until the stream can take bytes, then calls
    /// `fill` once with free space of the stream's own buffer (at most `max` bytes, as a list of
    /// buffers), and sends the bytes `fill` says it wrote, from the first buffer on. Made for
    /// `|bufs| socket.try_read_vectored(bufs)`: `Ok(0)` from `fill` means EOF and is passed on.
    /// `fill` runs while the stream's state is locked, so it must not block.
    ///
    /// # Errors
    /// The stream's failure, or `fill`'s error (for example `WouldBlock`, then nothing was taken).
    pub async fn write_with(
        &mut self,
        max: usize,
        mut fill: impl FnMut(&mut [io::IoSliceMut<'_>]) -> io::Result<usize>,
    ) -> io::Result<usize> {
        std::future::poll_fn(|cx| {
            let mut inner = self.shared.lock();
            let room = std::task::ready!(inner.poll_room(max, cx));
            match inner.session.write_with(room.max(1), &mut fill) {
                Ok(Some(Ok(n))) => {
                    drop(inner);
                    if n > 0 {
                        self.shared.wake_driver.notify_one();
                    }
                    Poll::Ready(Ok(n))
                }
                Ok(Some(Err(e))) => Poll::Ready(Err(e)),
                Ok(None) => {
                    inner.write_waker = Some(cx.waker().clone());
                    Poll::Pending
                }
                Err(e) => Poll::Ready(Err(to_io(e))),
            }
        })
        .await
    }
}

impl ReadHalf {
    /// Reads without an intermediate buffer: waits until bytes arrived (or the stream ended),
    /// then calls `drain` once with the received bytes (as a list of buffers); those it says
    /// it took are consumed. Made for `|bufs| socket.try_write_vectored(bufs)`. Returns 0 at the
    /// end of the stream, without calling `drain`. `drain` runs while the stream's state is
    /// locked, so it must not block.
    ///
    /// # Errors
    /// The stream's failure, or `drain`'s error (for example `WouldBlock`, then nothing was
    /// consumed).
    pub async fn read_with(
        &mut self,
        mut drain: impl FnMut(&[io::IoSlice<'_>]) -> io::Result<usize>,
    ) -> io::Result<usize> {
        std::future::poll_fn(|cx| {
            let mut inner = self.shared.lock();
            let was_full = !inner.session.wants_input();
            match inner.session.read_with(&mut drain) {
                Ok(Some(Ok(n))) => {
                    if inner.settle() || (was_full && inner.session.wants_input()) {
                        drop(inner);
                        self.shared.wake_driver.notify_one();
                    }
                    Poll::Ready(Ok(n))
                }
                Ok(Some(Err(e))) => Poll::Ready(Err(e)),
                Ok(None) => {
                    inner.read_waker = Some(cx.waker().clone());
                    Poll::Pending
                }
                Err(e) => Poll::Ready(Err(to_io(e))),
            }
        })
        .await
    }
}

impl Drop for ReadHalf {
    fn drop(&mut self) {
        let mut inner = self.shared.lock();
        inner.reader_alive = false;
        inner.discard_unread();
        drop(inner);
        self.shared.wake_driver.notify_one();
    }
}

impl Drop for WriteHalf {
    fn drop(&mut self) {
        let mut inner = self.shared.lock();
        inner.writer_alive = false;
        inner.session.shutdown();
        drop(inner);
        self.shared.wake_driver.notify_one();
    }
}

fn poll_read(shared: &Shared, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
    let mut inner = shared.lock();
    let was_full = !inner.session.wants_input();
    match inner.session.read(buf.initialize_unfilled()) {
        Ok(Some(n)) => {
            buf.advance(n);
            if inner.settle() || (was_full && inner.session.wants_input()) {
                drop(inner);
                shared.wake_driver.notify_one();
            }
            Poll::Ready(Ok(()))
        }
        Ok(None) => {
            inner.read_waker = Some(cx.waker().clone());
            Poll::Pending
        }
        Err(e) => Poll::Ready(Err(to_io(e))),
    }
}

fn poll_write(shared: &Shared, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
    if data.is_empty() {
        return Poll::Ready(Ok(0));
    }
    let mut inner = shared.lock();
    let room = std::task::ready!(inner.poll_room(data.len(), cx));
    match inner.session.write(&data[..data.len().min(room.max(1))]) {
        Ok(0) => {
            inner.write_waker = Some(cx.waker().clone());
            Poll::Pending
        }
        Ok(n) => {
            drop(inner);
            shared.wake_driver.notify_one();
            Poll::Ready(Ok(n))
        }
        Err(e) => Poll::Ready(Err(to_io(e))),
    }
}

fn poll_shutdown(shared: &Shared, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
    let mut inner = shared.lock();
    inner.session.shutdown();
    if inner.session.fin_acked() {
        return Poll::Ready(Ok(()));
    }
    if let Some(e) = inner.session.failure() {
        return Poll::Ready(Err(to_io(e.clone())));
    }
    inner.write_waker = Some(cx.waker().clone());
    drop(inner);
    shared.wake_driver.notify_one();
    Poll::Pending
}

impl AsyncRead for ReadHalf {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        poll_read(&self.shared, cx, buf)
    }
}

impl AsyncWrite for WriteHalf {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        poll_write(&self.shared, cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Written bytes are already in the replay buffer and will be delivered.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        poll_shutdown(&self.shared, cx)
    }
}

impl AsyncRead for Stream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.read).poll_read(cx, buf)
    }
}

impl AsyncWrite for Stream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.write).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.write).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.write).poll_shutdown(cx)
    }
}
