//! The thin tokio driver of one real connection: it moves records between the socket and the
//! session, and runs the session's timers. Both the client and the server use it.

use std::time::Instant;

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::net::short_read;
use crate::net::stream::Shared;
use crate::proto::frame::{split_record, MAX_FRAME, MAX_RECORD, RECORD_HEADER};
use crate::proto::transport::TAG_LEN;
use crate::proto::{CloseCode, Event, SessionError};

/// Bytes of records produced per socket write.
const WRITE_BUDGET: usize = 256 * 1024;
/// How long a finished connection waits for the peer to close its side.
const CLOSE_LINGER: std::time::Duration = std::time::Duration::from_secs(2);
/// Read buffer size.
const READ_CHUNK: usize = 128 * 1024;

/// Bytes the driver moves (read from the link, or written to it) before it lets the other tasks
/// of its thread run. A socket that stays ready would otherwise keep the task busy until tokio's
/// cooperative budget runs out, megabytes later: on a lane that other sessions share, their
/// round trips then waited for milliseconds (BENCHMARKS.md, *Stop 35*).
const YIELD_EVERY: usize = 256 * 1024;
/// How often the timers are looked at while a write waits for room in the socket.
const PENDING_WRITE_TICK: std::time::Duration = std::time::Duration::from_millis(50);

/// How a connection's pump ended.
pub(crate) enum PumpEnd<R> {
    /// The real connection failed; the session can resume.
    Fault(SessionError),
    /// The session is over (finished or failed); nothing more to do.
    Over,
    /// A newer connection replaced this one (server).
    Replaced(R),
}

/// Drives `sock` for the session in `shared` until the link fails, the session ends, or
/// `replace` yields a connection that its filter accepts as newer (others are dropped).
/// `on_event` sees session events (tickets).
pub(crate) async fn pump<R>(
    shared: &Shared,
    mut sock: TcpStream,
    replace: Option<(&mut mpsc::Receiver<R>, impl Fn(&R) -> bool)>,
    on_event: impl FnMut(Event),
) -> PumpEnd<R> {
    let end = drive(shared, &mut sock, replace, on_event).await;
    if !matches!(end, PumpEnd::Over) {
        // A link the session no longer uses is reset, not closed: what it still queues is in
        // the replay buffer, and a closed socket with queued bytes would stay in the kernel (no
        // descriptor, no budget) for as long as its peer acknowledges probes without reading.
        let _ = sock.set_zero_linger();
    }
    end
}

async fn drive<R>(
    shared: &Shared,
    sock: &mut TcpStream,
    mut replace: Option<(&mut mpsc::Receiver<R>, impl Fn(&R) -> bool)>,
    mut on_event: impl FnMut(Event),
) -> PumpEnd<R> {
    let (mut rd, mut wr) = sock.split();
    let mut inbuf = BytesMut::with_capacity(READ_CHUNK + MAX_RECORD + RECORD_HEADER);
    let mut out: Vec<u8> = Vec::with_capacity(WRITE_BUDGET + MAX_RECORD);
    let mut out_pos = 0usize;
    // False once the session ended on something the peer sent: what follows it is not read.
    let mut reading = true;
    // Bytes moved since the task last let others run (see [`YIELD_EVERY`]).
    let mut moved = 0usize;
    'link: loop {
        if moved >= YIELD_EVERY {
            moved = 0;
            tokio::task::yield_now().await;
        }
        let now = Instant::now();
        let (deadline, want_read, over) = {
            let mut inner = shared.lock();
            // Room taken for a read that did not happen (no bytes after all, or another branch
            // won) goes back to the budget: an idle session holds none.
            if inner.settle() {
                inner.wake_all();
            }
            if inner.session.is_finished() && inner.session.failure().is_none() {
                inner.session.close(CloseCode::Normal, SessionError::Finished);
            }
            inner.end_if_unused();
            if out_pos == out.len() {
                out.clear();
                out_pos = 0;
                if let Err(e) = inner.session.poll_transmit(now, &mut out, WRITE_BUDGET) {
                    return PumpEnd::Fault(e);
                }
                if !out.is_empty() {
                    inner.wake_writer();
                }
                inner.wake_streams();
            }
            while let Some(ev) = inner.session.poll_event() {
                on_event(ev);
            }
            let over = inner.session.failure().is_some() && out_pos == out.len();
            (inner.session.poll_timeout(), reading, over)
        };
        if over {
            let _ = wr.shutdown().await;
            // Read until the peer closes too (bounded). Closing a socket with unread bytes makes
            // the kernel send a reset, which can destroy our last ACK and CLOSE in flight.
            let drain = async {
                // On the heap: an array would sit in every session's pump future.
                let mut sink = vec![0u8; 4096];
                while let Ok(n) = rd.read(&mut sink).await {
                    if n == 0 {
                        break;
                    }
                }
            };
            if tokio::time::timeout(CLOSE_LINGER, drain).await.is_err() {
                // The peer did not close in time: its last bytes are not waited for in the
                // kernel either (see `pump`).
                let _ = rd.as_ref().set_zero_linger();
            }
            return PumpEnd::Over;
        }
        // While a write waits for room, a due keepalive or ACK cannot go out, so its deadline
        // stays in the past: the timers are looked at again after a tick, not at once (the
        // loop spun at 100 % of a core for a peer that stopped reading its link). The dead-peer
        // time is then judged up to a tick late.
        let deadline = match deadline {
            Some(d) if out_pos < out.len() => Some(d.max(now + PENDING_WRITE_TICK)),
            d => d,
        };
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                None => std::future::pending().await,
            }
        };
        let replaced = async {
            match replace.as_mut() {
                Some((rx, newer)) => loop {
                    match rx.recv().await {
                        Some(r) if newer(&r) => break Some(r),
                        Some(_) => {}
                        None => break None,
                    }
                },
                None => std::future::pending().await,
            }
        };
        // The session's receive path never waits: what arrives goes to the streams' queues, each
        // bounded by the credit its receiver granted (and charged to the budget when granted).
        let readable = async {
            rd.readable().await?;
            Ok::<usize, std::io::Error>(READ_CHUNK)
        };
        tokio::select! {
            res = readable, if want_read => {
                let res = res.and_then(|grant| {
                    // Exactly what the read may fill: a read that fills less emptied the socket.
                    let asked = grant.min(inbuf.capacity() - inbuf.len());
                    let asked = if asked == 0 { usize::MAX } else { asked };
                    short_read::read_once(rd.as_ref(), asked, || rd.try_read_buf(&mut (&mut inbuf).limit(grant)))
                });
                let closed = match res {
                    Ok(0) => Some("connection closed without a FIN frame".to_string()),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(e) => Some(e.to_string()),
                    Ok(n) => {
                        moved += n;
                        None
                    }
                };
                if let Some(why) = closed {
                    // After the session ended (a CLOSE either way), the peer closing TCP is the
                    // normal end, not a link fault to recover from.
                    if shared.lock().session.failure().is_some() {
                        return PumpEnd::Over;
                    }
                    return PumpEnd::Fault(SessionError::Link(why));
                }
                let now = Instant::now();
                let mut inner = shared.lock();
                let mut used = 0;
                while let Some((body, n)) = split_record(&inbuf[used..]) {
                    let body = used + RECORD_HEADER..used + RECORD_HEADER + body.len();
                    if let Err(e) = inner.session.handle_record_in_place(now, &mut inbuf[body]) {
                        inner.wake_all();
                        if inner.session.failure().is_none() {
                            return PumpEnd::Fault(e);
                        }
                        // A violation that ends the session queued a CLOSE saying why: nothing
                        // more is read, and the loop's top sends the CLOSE before the link ends.
                        inbuf.clear();
                        reading = false;
                        continue 'link;
                    }
                    used += n;
                }
                inbuf.advance(used);
                if let Some(len) = inbuf.get(..RECORD_HEADER).map(|h| u16::from_be_bytes([h[0], h[1]]) as usize) {
                    if len > MAX_FRAME + TAG_LEN {
                        return PumpEnd::Fault(SessionError::Protocol("record length over the frame limit"));
                    }
                }
                if inbuf.capacity() - inbuf.len() < MAX_RECORD {
                    inbuf.reserve(READ_CHUNK);
                }
                let _ = inner.settle();
                inner.wake_streams();
                inner.wake_writer();
            }
            res = wr.write(&out[out_pos..]), if out_pos < out.len() => {
                match res {
                    Ok(0) => return PumpEnd::Fault(SessionError::Link("socket closed for writing".into())),
                    Ok(n) => {
                        out_pos += n;
                        moved += n;
                    }
                    Err(e) => return PumpEnd::Fault(SessionError::Link(e.to_string())),
                }
            }
            _ = shared.wake_driver.notified() => {}
            _ = sleep => {
                let mut inner = shared.lock();
                if let Err(e) = inner.session.handle_timeout(Instant::now()) {
                    return PumpEnd::Fault(e);
                }
            }
            r = replaced => {
                return match r {
                    Some(r) => PumpEnd::Replaced(r),
                    None => PumpEnd::Fault(SessionError::Link("listener closed".into())),
                };
            }
        }
    }
}
