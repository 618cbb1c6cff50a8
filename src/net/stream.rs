//! The public [`Stream`]: one stream of a session, the program's virtual socket. It implements
//! tokio's `AsyncRead` and `AsyncWrite` on the sans-IO [`Core`] session and its streams, which the
//! session's one driver task pumps: a handle copies bytes into the replay buffer and out of its
//! stream's receive queue under the session's lock, and nothing else runs per stream.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{broadcast, watch, Notify};

use crate::keys::PublicKey;
use crate::net::budget::Charge;
use crate::net::events::{LinkEvent, LinkStatus};
use crate::proto::streams::capped::Capped;
use crate::proto::streams::wire::{reset, MAX_HEADER};
use crate::proto::streams::StreamsConfig;
use crate::proto::{Session as Core, SessionError, StreamError};

/// State shared by a session's handles and its driver task.
pub(crate) struct Shared {
    inner: Mutex<Inner>,
    /// Wakes the driver (new data to send, frames due, buffer space freed, shutdown).
    pub(crate) wake_driver: Notify,
    pub(crate) events: broadcast::Sender<LinkEvent>,
    pub(crate) status: watch::Sender<LinkStatus>,
    pub(crate) peer_key: PublicKey,
    /// The runtime of the lane the session runs on ([`crate::net::Lanes`]), if it has one: its
    /// streams are best served there too.
    pub(crate) lane: std::sync::OnceLock<tokio::runtime::Handle>,
}

#[derive(Default)]
struct Wakers {
    read: Option<Waker>,
    write: Option<Waker>,
}

pub(crate) struct Inner {
    pub(crate) session: Core,
    wakers: HashMap<u64, Wakers>,
    accept_waker: Option<Waker>,
    open_waker: Option<Waker>,
    /// An open has waited for the peer's open credit: said once per session.
    credit_wait_told: bool,
    /// Writers waiting for room in the replay buffer or the memory budget.
    room_waiters: Vec<Waker>,
    /// Streams whose `shutdown` waits for the peer's acknowledgement of their FIN.
    fin_waiters: Vec<u64>,
    /// Session handles alive: while there is one, streams may still be opened or accepted.
    pub(crate) handles: usize,
    /// [`Session::close`] was called: no more streams; the session ends once its streams have.
    closing: bool,
    /// A server session's charge against the server's memory budget (`None` on a client).
    pub(crate) charge: Option<Charge>,
    scratch: Vec<u64>,
}

impl Shared {
    /// Shared state for `session`, whose streams are enabled here if they are not yet (a
    /// client's: within its own caps, [`Capped`]). `handles` session handles exist from the
    /// start.
    pub(crate) fn new(mut session: Core, peer_key: PublicKey, handles: usize) -> Arc<Self> {
        if session.streams().is_none() {
            session.enable_streams(StreamsConfig::default(), Box::new(Capped::default()));
        }
        Arc::new(Shared {
            inner: Mutex::new(Inner {
                session,
                wakers: HashMap::new(),
                accept_waker: None,
                open_waker: None,
                credit_wait_told: false,
                room_waiters: Vec::new(),
                fin_waiters: Vec::new(),
                handles,
                closing: false,
                charge: None,
                scratch: Vec::new(),
            }),
            wake_driver: Notify::new(),
            events: broadcast::channel(256).0,
            status: watch::channel(LinkStatus::Connected).0,
            peer_key,
            lane: std::sync::OnceLock::new(),
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

    /// Room in the replay buffer for a write of `want` bytes (frame header included), the
    /// memory budget allowing; `Pending` (with `cx` to be woken) if there is none.
    fn poll_room(&mut self, want: usize, cx: &mut Context<'_>) -> Poll<usize> {
        let room = self.write_room().min(want);
        let room = if room > MAX_HEADER { self.budget_room(room, cx) } else { 0 };
        if room <= MAX_HEADER {
            self.wait_for_room(cx);
            return Poll::Pending;
        }
        Poll::Ready(room)
    }

    /// Registers `cx` to be woken when there is room: once per task, however often a task
    /// that waits is polled again (a task carrying both directions of a tunnel is polled for
    /// each byte the other direction moves), so the list stays one entry per waiting task.
    fn wait_for_room(&mut self, cx: &Context<'_>) {
        if !self.room_waiters.iter().any(|w| w.will_wake(cx.waker())) {
            self.room_waiters.push(cx.waker().clone());
        }
    }

    /// Wakes the writers waiting for room (the driver handed bytes to the socket).
    pub(crate) fn wake_writer(&mut self) {
        for w in self.room_waiters.drain(..) {
            w.wake();
        }
    }

    /// Wakes the handles of the streams whose state changed, and the acceptor and opener if
    /// they have something new; then the `shutdown`s whose FIN was acknowledged.
    pub(crate) fn wake_streams(&mut self) {
        let mut ids = std::mem::take(&mut self.scratch);
        let Some(st) = self.session.streams_mut() else { return };
        st.take_woken(&mut ids);
        let accept = st.take_accept_woken();
        let open = st.take_open_woken();
        for id in ids.drain(..) {
            if let Some(w) = self.wakers.get_mut(&id) {
                if let Some(r) = w.read.take() {
                    r.wake();
                }
                if let Some(r) = w.write.take() {
                    r.wake();
                }
            }
        }
        self.scratch = ids;
        if accept {
            if let Some(w) = self.accept_waker.take() {
                w.wake();
            }
        }
        if open {
            if let Some(w) = self.open_waker.take() {
                w.wake();
            }
        }
        if !self.fin_waiters.is_empty() {
            let session = &self.session;
            let wakers = &mut self.wakers;
            self.fin_waiters.retain(|id| {
                if matches!(session.stream_fin_acked(*id), Ok(false)) {
                    return true;
                }
                if let Some(w) = wakers.get_mut(id).and_then(|w| w.write.take()) {
                    w.wake();
                }
                false
            });
        }
    }

    /// Wakes every waiting task so it looks at the new state (the session failed or ended).
    pub(crate) fn wake_all(&mut self) {
        for w in self.wakers.values_mut() {
            if let Some(r) = w.read.take() {
                r.wake();
            }
            if let Some(r) = w.write.take() {
                r.wake();
            }
        }
        for w in [self.accept_waker.take(), self.open_waker.take()].into_iter().flatten() {
            w.wake();
        }
        self.wake_writer();
    }

    /// Called by the driver before each transmit: once no handle of the program can open,
    /// accept, read or write a stream any more, the streams still left are reset (nobody would
    /// read them), and the session's own byte stream ends (its FIN; the session then finishes
    /// normally once the peer ends its own).
    pub(crate) fn end_if_unused(&mut self) {
        // Once the peer has ended its half it opens nothing and answers nothing more: this end
        // follows as soon as its own streams are done, handles or not.
        let peer_gone = self.session.peer_finished();
        if (self.handles > 0 && !self.closing && !peer_gone)
            || self.session.failure().is_some()
            || self.session.is_shut_down()
        {
            return;
        }
        let Some(st) = self.session.streams_mut() else { return };
        if st.is_empty() {
            self.session.shutdown();
        } else if st.unheld() {
            st.reset_unread();
        }
    }

    fn set_read_waker(&mut self, id: u64, cx: &Context<'_>) {
        self.wakers.entry(id).or_default().read = Some(cx.waker().clone());
    }

    fn set_write_waker(&mut self, id: u64, cx: &Context<'_>) {
        self.wakers.entry(id).or_default().write = Some(cx.waker().clone());
    }

    fn streams(&mut self) -> &mut crate::proto::Streams {
        // Every session of this crate's driver has its streams enabled (`Shared::new`).
        self.session.streams_mut().expect("streams are enabled in Shared::new")
    }
}

/// True if `e` is a stream's error because its session finished cleanly (both ends done).
pub(crate) fn is_finished(e: &io::Error) -> bool {
    e.get_ref().and_then(|i| i.downcast_ref::<SessionError>()).is_some_and(|s| matches!(s, SessionError::Finished))
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
        SessionError::BadResume(_) | SessionError::StreamProtocol(_) => K::InvalidData,
        _ => K::Other,
    };
    io::Error::new(kind, e)
}

/// Maps a stream's own error to the `io::Error` the program sees: a reset is
/// `ConnectionReset`, as for a TCP socket.
pub(crate) fn stream_io(e: StreamError) -> io::Error {
    use io::ErrorKind as K;
    let kind = match &e {
        StreamError::ResetByPeer(_) | StreamError::Reset => K::ConnectionReset,
        StreamError::WriteAfterShutdown => K::BrokenPipe,
        StreamError::Limit => K::OutOfMemory,
        _ => K::NotConnected,
    };
    io::Error::new(kind, e)
}

/// The error for a stream of a session that failed (its failure), or the stream's own.
fn failed(inner: &Inner, e: StreamError) -> io::Error {
    match inner.session.failure() {
        Some(f) if !matches!(f, SessionError::Finished) => to_io(f.clone()),
        _ => stream_io(e),
    }
}

/// The read half of a [`Stream`], owned.
pub struct ReadHalf {
    shared: Arc<Shared>,
    id: u64,
}

/// The write half of a [`Stream`], owned. Dropping it without `shutdown` still ends the stream
/// with a FIN after every written byte, as closing a TCP socket would.
pub struct WriteHalf {
    shared: Arc<Shared>,
    id: u64,
}

/// A resilient, encrypted byte stream: the virtual socket. One of the streams of a session
/// ([`crate::Session`]); [`crate::connect`] and [`crate::Listener::accept`] give a session's
/// first stream.
///
/// It survives the loss of its real TCP connection: the client reconnects, both ends prove they
/// are the same pair, un-acknowledged bytes are replayed, and reads and writes go on. Watch the
/// link with [`Stream::events`] or [`Stream::status`].
///
/// `shutdown()` sends an authenticated FIN and completes once the peer acknowledged every byte;
/// the peer reads EOF only after all of them. [`Stream::reset`] abandons the stream both ways
/// (the peer's reads and writes fail with `ConnectionReset`); other streams go on.
pub struct Stream {
    read: ReadHalf,
    write: WriteHalf,
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream")
            .field("id", &self.read.id)
            .field("peer", &self.read.shared.peer_key)
            .finish_non_exhaustive()
    }
}

impl Stream {
    pub(crate) fn new(shared: Arc<Shared>, id: u64) -> Self {
        Stream { read: ReadHalf { shared: shared.clone(), id }, write: WriteHalf { shared, id } }
    }

    /// Splits into owned halves that can move to different tasks.
    pub fn into_split(self) -> (ReadHalf, WriteHalf) {
        (self.read, self.write)
    }

    /// The stream's id in its session (odd: opened by the client; even: by the server).
    pub fn id(&self) -> u64 {
        self.read.id
    }

    /// Subscribes to the session's link events from now on.
    pub fn events(&self) -> broadcast::Receiver<LinkEvent> {
        self.read.shared.events.subscribe()
    }

    /// Watches the session's link status (its current value is available at once).
    pub fn status(&self) -> watch::Receiver<LinkStatus> {
        self.read.shared.status.subscribe()
    }

    /// The peer's authenticated static public key.
    pub fn peer_key(&self) -> PublicKey {
        self.read.shared.peer_key
    }

    /// Bytes written on the session (all its streams) but not yet acknowledged by the peer.
    pub fn unacked(&self) -> usize {
        self.read.shared.lock().session.unacked()
    }

    /// Abandons the stream both ways: the peer's reads and writes on it fail with
    /// `ConnectionReset`, and whatever it still sends is dropped. The session and its other
    /// streams go on.
    pub fn reset(self) {
        self.write.reset();
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

    /// Waits until nothing more can be read from the stream because it was reset (by the peer
    /// or here) or the session ended, and returns why; while it is open, or finished by the
    /// peer's FIN with bytes left to read, it waits. For a reader that is waiting for something
    /// else (room in a socket to write what it read), so that a RESET or the session's end
    /// ends it at once.
    pub async fn stopped(&self) -> io::Error {
        stopped(&self.shared, self.id, Inner::set_read_waker).await
    }

    /// Reads without an intermediate buffer: waits until bytes arrived (or the stream ended),
    /// then calls `drain` once with the received bytes (as a list of buffers); those it says
    /// it took are consumed. Made for `|bufs| socket.try_write_vectored(bufs)`. Returns 0 at the
    /// end of the stream, without calling `drain`. `drain` runs while the stream's state is
    /// locked, so it must not block.
    ///
    /// # Errors
    /// The stream's reset or the session's failure, or `drain`'s error (for example
    /// `WouldBlock`, then nothing was consumed).
    pub async fn read_with(
        &mut self,
        mut drain: impl FnMut(&[io::IoSlice<'_>]) -> io::Result<usize>,
    ) -> io::Result<usize> {
        std::future::poll_fn(|cx| {
            let mut inner = self.shared.lock();
            let (res, due) = inner.streams().read_with(self.id, &mut drain);
            if due {
                self.shared.wake_driver.notify_one();
            }
            match res {
                Ok(Some(Ok(n))) => {
                    if inner.settle() {
                        self.shared.wake_driver.notify_one();
                    }
                    Poll::Ready(Ok(n))
                }
                Ok(Some(Err(e))) => Poll::Ready(Err(e)),
                Ok(None) => match inner.session.failure() {
                    Some(f) => Poll::Ready(Err(to_io(f.clone()))),
                    None => {
                        inner.set_read_waker(self.id, cx);
                        Poll::Pending
                    }
                },
                Err(e) => Poll::Ready(Err(failed(&inner, e))),
            }
        })
        .await
    }
}

impl WriteHalf {
    /// Subscribes to link events.
    pub fn events(&self) -> broadcast::Receiver<LinkEvent> {
        self.shared.events.subscribe()
    }

    /// Abandons the stream both ways (see [`Stream::reset`]).
    pub fn reset(&self) {
        let mut inner = self.shared.lock();
        inner.streams().reset(self.id, reset::CANCEL);
        drop(inner);
        self.shared.wake_driver.notify_one();
    }

    /// Waits until this end can send nothing more on the stream because it was reset (by the
    /// peer or here) or the session ended, and returns why; while the stream is open, or only
    /// half-closed by this end, it waits. For a writer that is waiting for something else to
    /// write (a socket to read from), so that the peer's RESET ends it at once.
    pub async fn stopped(&self) -> io::Error {
        stopped(&self.shared, self.id, Inner::set_write_waker).await
    }

    /// Writes without an intermediate buffer: waits until the stream can take bytes, then calls
    /// `fill` once with free space of the session's replay buffer (at most `max` bytes, as a
    /// list of buffers), and sends the bytes `fill` says it wrote, from the first buffer on.
    /// Made for `|bufs| socket.try_read_vectored(bufs)`: `Ok(0)` from `fill` means EOF and is
    /// passed on. `fill` runs while the stream's state is locked, so it must not block.
    ///
    /// # Errors
    /// The stream's reset or the session's failure, or `fill`'s error (for example
    /// `WouldBlock`, then nothing was taken).
    pub async fn write_with(
        &mut self,
        max: usize,
        mut fill: impl FnMut(&mut [io::IoSliceMut<'_>]) -> io::Result<usize>,
    ) -> io::Result<usize> {
        std::future::poll_fn(|cx| {
            let mut inner = self.shared.lock();
            if let Some(e) = inner.session.failure() {
                return Poll::Ready(Err(to_io(e.clone())));
            }
            let credit = match inner.streams().send_credit(self.id) {
                Ok(0) => {
                    inner.set_write_waker(self.id, cx);
                    return Poll::Pending;
                }
                Ok(c) => c,
                Err(e) => return Poll::Ready(Err(failed(&inner, e))),
            };
            let want = max.min(usize::try_from(credit).unwrap_or(usize::MAX)) + MAX_HEADER;
            let room = std::task::ready!(inner.poll_room(want, cx));
            match inner.session.stream_write_with(self.id, max, room, &mut fill) {
                Ok(Some(Ok(n))) => {
                    drop(inner);
                    if n > 0 {
                        self.shared.wake_driver.notify_one();
                    }
                    Poll::Ready(Ok(n))
                }
                Ok(Some(Err(e))) => Poll::Ready(Err(e)),
                Ok(None) => {
                    inner.wait_for_room(cx);
                    Poll::Pending
                }
                Err(e) => Poll::Ready(Err(failed(&inner, e))),
            }
        })
        .await
    }
}

impl Drop for ReadHalf {
    fn drop(&mut self) {
        let mut inner = self.shared.lock();
        inner.streams().release_read(self.id);
        if let Some(w) = inner.wakers.get_mut(&self.id) {
            w.read = None;
            if w.write.is_none() {
                inner.wakers.remove(&self.id);
            }
        }
        drop(inner);
        self.shared.wake_driver.notify_one();
    }
}

impl Drop for WriteHalf {
    fn drop(&mut self) {
        let mut inner = self.shared.lock();
        inner.streams().release_write(self.id);
        if let Some(w) = inner.wakers.get_mut(&self.id) {
            w.write = None;
            if w.read.is_none() {
                inner.wakers.remove(&self.id);
            }
        }
        drop(inner);
        self.shared.wake_driver.notify_one();
    }
}

/// Waits until stream `id` was reset or its session failed (see [`ReadHalf::stopped`] and
/// [`WriteHalf::stopped`]); `wait` registers the half's waker meanwhile.
async fn stopped(shared: &Shared, id: u64, wait: fn(&mut Inner, u64, &Context<'_>)) -> io::Error {
    std::future::poll_fn(|cx| {
        let mut inner = shared.lock();
        if let Some(e) = inner.session.failure() {
            return Poll::Ready(to_io(e.clone()));
        }
        match inner.streams().stopped(id) {
            Some(e) => Poll::Ready(failed(&inner, e)),
            None => {
                wait(&mut inner, id, cx);
                Poll::Pending
            }
        }
    })
    .await
}

fn poll_read(shared: &Shared, id: u64, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
    let mut inner = shared.lock();
    let (res, due) = inner.streams().read(id, buf.initialize_unfilled());
    if due {
        shared.wake_driver.notify_one();
    }
    match res {
        Ok(Some(n)) => {
            buf.advance(n);
            Poll::Ready(Ok(()))
        }
        Ok(None) => match inner.session.failure() {
            Some(f) => Poll::Ready(Err(to_io(f.clone()))),
            None => {
                inner.set_read_waker(id, cx);
                Poll::Pending
            }
        },
        Err(e) => Poll::Ready(Err(failed(&inner, e))),
    }
}

fn poll_write(shared: &Shared, id: u64, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
    if data.is_empty() {
        return Poll::Ready(Ok(0));
    }
    let mut inner = shared.lock();
    if let Some(e) = inner.session.failure() {
        return Poll::Ready(Err(to_io(e.clone())));
    }
    let credit = match inner.streams().send_credit(id) {
        Ok(0) => {
            inner.set_write_waker(id, cx);
            return Poll::Pending;
        }
        Ok(c) => c,
        Err(e) => return Poll::Ready(Err(failed(&inner, e))),
    };
    let want = data.len().min(usize::try_from(credit).unwrap_or(usize::MAX)) + MAX_HEADER;
    let room = std::task::ready!(inner.poll_room(want, cx));
    match inner.session.stream_write(id, data, room) {
        Ok(0) => {
            inner.wait_for_room(cx);
            Poll::Pending
        }
        Ok(n) => {
            drop(inner);
            shared.wake_driver.notify_one();
            Poll::Ready(Ok(n))
        }
        Err(e) => Poll::Ready(Err(failed(&inner, e))),
    }
}

fn poll_shutdown(shared: &Shared, id: u64, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
    let mut inner = shared.lock();
    inner.streams().shutdown(id);
    match inner.session.stream_fin_acked(id) {
        Ok(true) => return Poll::Ready(Ok(())),
        Ok(false) => {}
        Err(e) => return Poll::Ready(Err(failed(&inner, e))),
    }
    if let Some(e) = inner.session.failure() {
        return Poll::Ready(Err(to_io(e.clone())));
    }
    inner.set_write_waker(id, cx);
    if !inner.fin_waiters.contains(&id) {
        inner.fin_waiters.push(id);
    }
    drop(inner);
    shared.wake_driver.notify_one();
    Poll::Pending
}

impl AsyncRead for ReadHalf {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        poll_read(&self.shared, self.id, cx, buf)
    }
}

impl AsyncWrite for WriteHalf {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        poll_write(&self.shared, self.id, cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Written bytes are already in the replay buffer and will be delivered.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        poll_shutdown(&self.shared, self.id, cx)
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

/// A session: many [`Stream`]s over one resilient, encrypted connection. Open streams with
/// [`Session::open`] and take those the peer opens with [`Session::accept`]. A fault of the
/// real connection costs one resume for all of them. Clones share the session; when the last
/// clone is dropped no more streams are opened or accepted, and once its streams have ended
/// the session ends cleanly.
pub struct Session {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("peer", &self.shared.peer_key).finish_non_exhaustive()
    }
}

impl Clone for Session {
    fn clone(&self) -> Self {
        self.shared.lock().handles += 1;
        Session { shared: self.shared.clone() }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let mut inner = self.shared.lock();
        inner.handles -= 1;
        if inner.handles == 0 {
            inner.streams().set_accepting(false);
        }
        drop(inner);
        self.shared.wake_driver.notify_one();
    }
}

impl Session {
    /// A handle on `shared`, which already counts it in its `handles`.
    pub(crate) fn from_counted(shared: Arc<Shared>) -> Session {
        Session { shared }
    }

    /// How long an answer on this session's link may take before the link is suspect (a
    /// multiple of its round trip, see [`Core::suspect_threshold`]).
    pub(crate) fn answer_time(&self) -> std::time::Duration {
        self.shared.lock().session.suspect_threshold()
    }

    /// The runtime of the lane this session runs on, if the server gave it one
    /// ([`crate::net::ServerConfig::lanes`]): the tasks serving its streams belong there.
    pub(crate) fn lane(&self) -> Option<tokio::runtime::Handle> {
        self.shared.lane.get().cloned()
    }

    /// Opens a stream. No round trip: its OPEN goes out with its first bytes. Waits, instead of
    /// failing, while the peer's open credit or the replay buffer is used up.
    ///
    /// # Errors
    /// The session's failure, or `OutOfMemory` if this end's own limits leave no room.
    pub async fn open(&self) -> io::Result<Stream> {
        let id = std::future::poll_fn(|cx| {
            let mut inner = self.shared.lock();
            if let Some(e) = inner.session.failure() {
                return Poll::Ready(Err(to_io(e.clone())));
            }
            if inner.session.is_shut_down() || inner.closing || inner.session.peer_finished() {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::NotConnected,
                    "the session is ending: it opens no more streams",
                )));
            }
            let room = std::task::ready!(inner.poll_room(MAX_HEADER + 1, cx));
            match inner.session.stream_open(room) {
                Ok(Some(id)) => Poll::Ready(Ok(id)),
                Ok(None) => {
                    inner.open_waker = Some(cx.waker().clone());
                    inner.wait_for_room(cx);
                    // Found by an operator's day: 4,095 connections through one forward, the
                    // 1,025th and later waited (as designed) with no word on either side.
                    if !std::mem::replace(&mut inner.credit_wait_told, true) {
                        drop(inner);
                        tracing::warn!("the peer's limit on streams open at once on this session is reached: new streams wait until one ends (this is said once per session)");
                    }
                    Poll::Pending
                }
                Err(e) => Poll::Ready(Err(stream_io(e))),
            }
        })
        .await?;
        self.shared.wake_driver.notify_one();
        Ok(Stream::new(self.shared.clone(), id))
    }

    /// The next stream the peer opened; `None` once the session has ended (or the peer ended
    /// its half: it opens no more).
    pub async fn accept(&self) -> Option<Stream> {
        let id = std::future::poll_fn(|cx| {
            let mut inner = self.shared.lock();
            if inner.closing {
                return Poll::Ready(None);
            }
            match inner.streams().accept() {
                Ok(Some(id)) => {
                    drop(inner);
                    // The open credit may have grown: the driver sends it.
                    self.shared.wake_driver.notify_one();
                    Poll::Ready(Some(id))
                }
                Ok(None) if inner.session.failure().is_none() => {
                    inner.accept_waker = Some(cx.waker().clone());
                    Poll::Pending
                }
                _ => Poll::Ready(None),
            }
        })
        .await?;
        Some(Stream::new(self.shared.clone(), id))
    }

    /// The peer's first stream, taken before it arrives: the handle of a session that carries
    /// one stream. Streams the peer opens after it are refused.
    pub(crate) fn into_first_stream(self) -> io::Result<Stream> {
        let id = self.shared.lock().streams().expect_first().map_err(stream_io)?;
        Ok(Stream::new(self.shared.clone(), id))
    }

    /// True once the session has ended (closed or failed), or is ending: it opens no more
    /// streams.
    pub fn is_ended(&self) -> bool {
        let inner = self.shared.lock();
        inner.closing
            || inner.session.peer_finished()
            || inner.session.is_shut_down()
            || inner.session.failure().is_some()
    }

    /// Streams on the session now (open, ending, or waiting to be accepted).
    pub fn streams(&self) -> usize {
        self.shared.lock().session.streams().map_or(0, |s| s.len())
    }

    /// Subscribes to link events from now on.
    pub fn events(&self) -> broadcast::Receiver<LinkEvent> {
        self.shared.events.subscribe()
    }

    /// Watches the link status (its current value is available at once).
    pub fn status(&self) -> watch::Receiver<LinkStatus> {
        self.shared.status.subscribe()
    }

    /// The peer's authenticated static public key.
    pub fn peer_key(&self) -> PublicKey {
        self.shared.peer_key
    }

    /// Ends the session cleanly: no more streams are opened or accepted (a pending
    /// [`Session::accept`] returns `None`), the streams still open go on until they end, and
    /// then the session finishes (both ends' FIN, CLOSE Normal).
    pub fn close(&self) {
        let mut inner = self.shared.lock();
        inner.closing = true;
        inner.streams().set_accepting(false);
        if let Some(w) = inner.accept_waker.take() {
            w.wake();
        }
        drop(inner);
        self.shared.wake_driver.notify_one();
    }

    /// Resets every stream of the session (its program is going away): each one's peer sees
    /// `ConnectionReset`. The session itself goes on; [`Session::close`] then ends it cleanly.
    pub fn reset_streams(&self) {
        let mut inner = self.shared.lock();
        let st = inner.streams();
        for id in st.ids() {
            st.reset(id, reset::CANCEL);
        }
        inner.wake_streams();
        drop(inner);
        self.shared.wake_driver.notify_one();
    }

    /// Ends the session at once: every stream on it fails (`ConnectionAborted`), and the peer
    /// is told with CLOSE (code Abort).
    pub fn abort(&self) {
        self.shared.fail(crate::proto::CloseCode::Abort, SessionError::Aborted("the program ended the session".into()));
        self.shared.wake_driver.notify_one();
    }

    /// Ends the session at once because the server stops and waited long enough for it to end
    /// cleanly: like [`Session::abort`], with CLOSE code Shutdown and `why` as its reason.
    pub(crate) fn shut_down(&self, why: &str) {
        self.shared.fail(crate::proto::CloseCode::Shutdown, SessionError::Aborted(why.into()));
        self.shared.wake_driver.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Role, SessionConfig};

    struct Count(std::sync::atomic::AtomicUsize);
    impl std::task::Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// A task that waits for room and is polled again and again (for each byte the other
    /// direction of its tunnel moves) is one entry in the waiting list, not one per poll; each
    /// task is woken once.
    #[test]
    fn a_writer_polled_again_waits_once() {
        let shared =
            Shared::new(Core::new(Role::Client, SessionConfig::default()), crate::keys::Keypair::generate().public, 1);
        let (a, b) = (Arc::new(Count(0.into())), Arc::new(Count(0.into())));
        let (wa, wb) = (Waker::from(a.clone()), Waker::from(b.clone()));
        let mut inner = shared.lock();
        for _ in 0..1000 {
            inner.wait_for_room(&Context::from_waker(&wa));
        }
        inner.wait_for_room(&Context::from_waker(&wb));
        assert_eq!(inner.room_waiters.len(), 2);
        inner.wake_writer();
        let woken = |c: &Count| c.0.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!((woken(&a), woken(&b), inner.room_waiters.len()), (1, 1, 0));
    }
}
