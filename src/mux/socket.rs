//! The session under a multiplexer, lent to yamux and handed back when yamux lets go of it, so
//! that the session can be ended cleanly (both ends' FINs exchanged) instead of aborted.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::io::{AsyncRead, AsyncWrite};
use tokio::sync::oneshot;
use tokio_util::compat::{Compat, TokioAsyncReadCompatExt};

use crate::net::Stream;

/// A [`Stream`] as yamux's socket; dropped, it sends the stream back on its channel.
pub(super) struct Lent {
    stream: Option<Compat<Stream>>,
    back: Option<oneshot::Sender<Stream>>,
}

impl Lent {
    /// Lends `stream`; the receiver gets it back when the returned socket is dropped.
    pub(super) fn new(stream: Stream) -> (Lent, oneshot::Receiver<Stream>) {
        let (tx, rx) = oneshot::channel();
        (Lent { stream: Some(stream.compat()), back: Some(tx) }, rx)
    }

    fn inner(&mut self) -> io::Result<Pin<&mut Compat<Stream>>> {
        match self.stream.as_mut() {
            Some(s) => Ok(Pin::new(s)),
            None => Err(io::ErrorKind::NotConnected.into()),
        }
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        if let (Some(s), Some(back)) = (self.stream.take(), self.back.take()) {
            let _ = back.send(s.into_inner());
        }
    }
}

impl AsyncRead for Lent {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        self.inner()?.poll_read(cx, buf)
    }
}

impl AsyncWrite for Lent {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.inner()?.poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.inner()?.poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.inner()?.poll_close(cx)
    }
}
