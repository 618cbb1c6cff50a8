//! Joining a TCP connection and a tunnel's stream, both ways, with half-close.

use std::io;

use tokio::net::TcpStream;

use super::request::{finish_halves, read_reply_on, REFUSAL_DRAIN};
use super::splice::{stream_to_tcp_counted, tcp_to_stream_until};
use super::TunnelError;
use crate::net::Stream;

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

/// True if `e`, a reset that ended a joined pair, came from the stream (the peer or the
/// session reset it), not from the TCP connection.
pub(super) fn reset_by_stream(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|i| i.is::<crate::proto::StreamError>())
}

/// Joins a TCP connection and a tunnel's stream both ways, with half-close and no copy buffer
/// (the socket is read straight into the session's replay buffer and written straight from the
/// stream's receive queue); returns the bytes moved (TCP to stream, stream to TCP). With
/// `answer`, the stream's first bytes are the reply to a request for that service, sent without
/// waiting for it (the program's first bytes go out behind the request, saving a round trip); a
/// refusal is an error that [`Refused::of`] finds, after which the stream is ended cleanly. On
/// any other error the TCP connection is reset and so is the stream, so that neither
/// the program nor the peer takes a failure for a clean end.
///
/// # Errors
/// The first I/O error of either direction.
pub(super) async fn join(tcp: TcpStream, stream: Stream, answer: Option<&str>) -> io::Result<(u64, u64)> {
    let (res, moved) = join_counted(tcp, stream, answer).await;
    res.map(|()| moved)
}

/// [`join`], with the bytes moved (TCP to stream, stream to TCP) whether it ended cleanly or
/// not: the server's lines and its session totals count a tunnel that was reset too.
pub(super) async fn join_counted(
    mut tcp: TcpStream,
    stream: Stream,
    answer: Option<&str>,
) -> (io::Result<()>, (u64, u64)) {
    let (mut sr, mut sw) = stream.into_split();
    let (mut up_bytes, mut down_bytes) = (0, 0);
    let mut no_stop = None;
    let res = {
        let (tr, tw) = tcp.split();
        let up = tcp_to_stream_until(tr, &mut sw, &mut no_stop, &mut up_bytes);
        let down = async {
            if let Some(service) = answer {
                // Boxed: a stream waits for its answer once, and the reply's reader would
                // otherwise size every joined stream's future for its whole life.
                let link = super::link_time::Link::of(sr.events(), &sr.status().borrow());
                Box::pin(read_reply_on(&mut sr, service, Some(link))).await.map_err(Refused::wrap)?;
            }
            stream_to_tcp_counted(&mut sr, tw, &mut down_bytes).await
        };
        tokio::try_join!(up, down).map(|_| ())
    };
    if res.is_ok() {
        crate::net::kernel::closing(&tcp);
    }
    if let Err(e) = &res {
        let _ = tcp.set_zero_linger();
        drop(tcp);
        if Refused::of(e).is_some() {
            let _ = finish_halves(&mut sr, &mut sw, REFUSAL_DRAIN).await;
        } else {
            sw.reset();
        }
    }
    (res, (up_bytes, down_bytes))
}
