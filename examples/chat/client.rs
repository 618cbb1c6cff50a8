//! The chat client over a holdfast `Stream`: sends `HELLO` and typed lines, shows the room's
//! lines and the link's events, leaves cleanly or says plainly why it could not. Input and output
//! are channels, so `tests/chat.rs` drives it through `#[path]` like `main.rs` does.

#![allow(dead_code)] // the example uses one part, the test another

use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::task::Poll;
use std::time::{Duration, Instant};

use holdfast::{LinkEvent, LinkStatus, Stream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;

use crate::line::{clean, secs, status, text, Lines, Out, CLOSE_TIMEOUT, EOF_GRACE, MAX_LINE};

/// What the user does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// A typed line (`/quit`, `/status` and `/help` are commands).
    Line(String),
    /// Leave cleanly: every typed line is delivered first (Ctrl-C, end of input).
    Quit,
    /// Leave now, even if typed lines are not delivered yet (a second Ctrl-C).
    Abort,
}

/// How a client session ended, other than by leaving cleanly.
#[derive(Debug)]
pub enum ClientError {
    /// The room refused to let us in.
    Refused(String),
    /// The room closed the conversation.
    RoomClosed,
    /// The link stayed down longer than the recovery policy allows.
    GaveUp {
        /// The library's reason.
        reason: String,
        /// Typed lines the room did not confirm.
        undelivered: Vec<String>,
    },
    /// The session failed for another reason (for example, the room restarted and forgot it).
    Failed {
        /// The library's reason.
        reason: String,
        /// Typed lines the room did not confirm.
        undelivered: Vec<String>,
    },
    /// The user left without waiting for delivery.
    Aborted {
        /// Typed lines the room did not confirm.
        undelivered: Vec<String>,
    },
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::Refused(why) => write!(f, "the room refused to let you in: {why}"),
            ClientError::RoomClosed => write!(f, "the room closed the conversation"),
            ClientError::GaveUp { reason, .. } => write!(f, "gave up: {reason}"),
            ClientError::Failed { reason, .. } => write!(f, "the chat session failed: {reason}"),
            ClientError::Aborted { .. } => write!(f, "left without waiting for delivery"),
        }
    }
}

impl ClientError {
    /// Typed lines the room did not confirm.
    pub fn undelivered(&self) -> &[String] {
        match self {
            ClientError::GaveUp { undelivered, .. }
            | ClientError::Failed { undelivered, .. }
            | ClientError::Aborted { undelivered } => undelivered,
            _ => &[],
        }
    }
}

/// Typed lines with their end offsets in the stream, until the room acknowledges them.
#[derive(Default)]
struct Sent {
    total: u64,
    lines: VecDeque<(u64, String)>,
}

impl Sent {
    fn push(&mut self, bytes: usize, line: Option<String>) {
        self.total += bytes as u64;
        if let Some(line) = line {
            self.lines.push_back((self.total, line));
        }
    }

    /// Forgets lines the peer acknowledged, given the stream's unacknowledged byte count.
    fn prune(&mut self, unacked: usize) {
        let acked = self.total.saturating_sub(unacked as u64);
        while self.lines.front().is_some_and(|(end, _)| *end <= acked) {
            self.lines.pop_front();
        }
    }

    fn undelivered(&mut self, unacked: usize) -> Vec<String> {
        self.prune(unacked);
        self.lines.iter().map(|(_, l)| l.clone()).collect()
    }
}

/// What the client shows about its link.
#[derive(Default)]
struct LinkView {
    down_since: Option<Instant>,
    /// The link is suspect or lost: lines typed now wait for a resume.
    quiet: bool,
    /// When a "reconnecting" line was last shown.
    last_shown: Option<Instant>,
}

/// A link-loss cause without the library's generic prefix.
fn cause(c: &str) -> &str {
    c.strip_prefix("link failed: ").unwrap_or(c)
}

/// Reconnect attempts are shown at most this often (backoff retries up to every 2 s).
const RECONNECT_EVERY: Duration = Duration::from_secs(3);

impl LinkView {
    /// Shows what a received link event means; returns false once the event channel closed.
    fn show(&mut self, ev: Result<LinkEvent, RecvError>, out: &Out, pending: usize) -> bool {
        match ev {
            Ok(ev) => {
                if let Some(s) = self.on_event(&ev, pending) {
                    status(out, s);
                }
                true
            }
            Err(RecvError::Lagged(_)) => true,
            Err(RecvError::Closed) => false,
        }
    }

    /// `pending` is the number of typed lines the room has not acknowledged yet.
    fn on_event(&mut self, ev: &LinkEvent, pending: usize) -> Option<String> {
        let kept = match pending {
            0 => String::new(),
            1 => " The line typed and not yet delivered is kept.".to_string(),
            n => format!(" The {n} lines typed and not yet delivered are kept."),
        };
        Some(match ev {
            LinkEvent::Lost(lost) => {
                self.down_since.get_or_insert_with(Instant::now);
                self.quiet = true;
                self.last_shown = None;
                format!("[link] lost (fault {}): {}. Reconnecting; keep typing.{kept}", lost.faults, cause(&lost.cause))
            }
            // Attempt 1 starts at once and the "lost" line already says so; later attempts are
            // shown every few seconds, not every retry.
            LinkEvent::Reconnecting { attempt, elapsed }
                if *attempt > 1 && self.last_shown.is_none_or(|t| t.elapsed() >= RECONNECT_EVERY) =>
            {
                self.last_shown = Some(Instant::now());
                format!("[link] reconnecting: attempt {attempt}, down for {}", secs(*elapsed))
            }
            LinkEvent::Resumed { peer, after, replayed_sent, replayed_received } => {
                self.down_since = None;
                self.quiet = false;
                let typed = match pending {
                    0 => String::new(),
                    1 => "; the 1 line not yet delivered is on its way".to_string(),
                    n => format!("; the {n} lines not yet delivered are on their way"),
                };
                format!(
                    "[link] resumed after {} via {peer}: replayed {replayed_sent} B sent, {replayed_received} B received{typed}",
                    secs(*after)
                )
            }
            LinkEvent::Suspect { quiet } => {
                self.down_since.get_or_insert_with(Instant::now);
                self.quiet = true;
                format!("[link] suspect: no answer for {}; trying a new connection, keep typing.{kept}", secs(*quiet))
            }
            LinkEvent::NetworkChanged => {
                self.down_since.get_or_insert_with(Instant::now);
                self.quiet = true;
                format!("[link] the network changed; trying a new connection, keep typing.{kept}")
            }
            LinkEvent::Healthy => {
                self.down_since = None;
                self.quiet = false;
                "[link] answering again".to_string()
            }
            LinkEvent::Failed { reason } => format!("[link] failed: {reason}"),
            _ => return None,
        })
    }
}

/// Runs a chat client on a connected `stream`: sends `HELLO name`, then every typed line, and
/// shows what the room sends and what happens to the link. Returns `Ok` after a clean leave
/// (every typed line acknowledged by the room).
///
/// # Errors
/// See [`ClientError`].
pub async fn run_client(
    mut stream: Stream,
    name: &str,
    mut input: mpsc::Receiver<Input>,
    out: Out,
) -> Result<(), ClientError> {
    let mut events = stream.events();
    let link = stream.status();
    let mut view = LinkView::default();
    let mut sent = Sent::default();
    let mut lines = Lines::default();
    let mut refused: Option<String> = None;
    let mut welcomed = false;
    let mut buf = vec![0u8; 16 * 1024];
    let mut events_open = true;

    let hello = format!("HELLO {name}\n");
    let first = stream.write_all(hello.as_bytes()).await;
    sent.push(hello.len(), None);

    enum Next {
        Quit,
        Abort,
        Eof,
        Fail(io::Error),
    }
    let next = match first {
        Err(e) => Next::Fail(e),
        Ok(()) => loop {
            tokio::select! {
                r = stream.read(&mut buf) => match r {
                    Ok(0) => break Next::Eof,
                    Ok(n) => {
                        let _ = lines.feed(&buf[..n]);
                        while let Some(line) = lines.next_line() {
                            if !welcomed && refused.is_none() {
                                if let Some(why) = line.strip_prefix("! ") {
                                    refused = Some(clean(why));
                                }
                                welcomed = refused.is_none();
                            }
                            text(&out, clean(&line));
                        }
                    }
                    Err(e) => break Next::Fail(e),
                },
                i = input.recv() => match i {
                    None | Some(Input::Quit) => break Next::Quit,
                    Some(Input::Abort) => break Next::Abort,
                    Some(Input::Line(line)) => match line.trim() {
                        "" => {}
                        "/quit" => break Next::Quit,
                        "/help" => status(&out, "[chat] type a line and Enter to send it. /status shows the link, /quit or Ctrl-C leaves."),
                        "/status" => {
                            sent.prune(stream.unacked());
                            let s = match &*link.borrow() {
                                LinkStatus::Connected => "connected".to_string(),
                                LinkStatus::Reconnecting { cause: why, attempt } => format!(
                                    "down for {} ({}), attempt {attempt}",
                                    secs(view.down_since.map(|t| t.elapsed()).unwrap_or_default()),
                                    cause(why)
                                ),
                                LinkStatus::Closed => "closed".to_string(),
                                LinkStatus::Failed(why) => format!("failed: {why}"),
                            };
                            status(&out, format!("[link] {s}; {} typed line(s) not yet acknowledged", sent.lines.len()));
                        }
                        cmd if cmd.starts_with('/') => status(&out, format!("[chat] unknown command {cmd}; /help lists them")),
                        _ if line.len() > MAX_LINE => status(&out, format!("[chat] not sent: a line has at most {MAX_LINE} bytes")),
                        _ => {
                            let data = format!("{line}\n");
                            if let Err(e) = stream.write_all(data.as_bytes()).await {
                                break Next::Fail(e);
                            }
                            sent.push(data.len(), Some(line));
                            sent.prune(stream.unacked());
                            if view.quiet || matches!(*link.borrow(), LinkStatus::Reconnecting { .. }) {
                                let waiting = sent.undelivered(stream.unacked()).len();
                                status(&out, format!("[link] down: line kept, it is sent after the resume ({waiting} waiting)"));
                            }
                        }
                    },
                },
                ev = events.recv(), if events_open => events_open = view.show(ev, &out, sent.undelivered(stream.unacked()).len()),
            }
        },
    };

    let failed = |e: io::Error, stream: &Stream, sent: &mut Sent| {
        let undelivered = sent.undelivered(stream.unacked());
        let reason = e.to_string();
        if e.kind() == io::ErrorKind::TimedOut {
            ClientError::GaveUp { reason, undelivered }
        } else {
            ClientError::Failed { reason, undelivered }
        }
    };
    match next {
        Next::Fail(e) => Err(failed(e, &stream, &mut sent)),
        Next::Abort => Err(ClientError::Aborted { undelivered: sent.undelivered(stream.unacked()) }),
        Next::Eof => {
            // The room ended the conversation; finish our side so its session ends cleanly.
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, stream.shutdown()).await;
            Err(refused.map_or(ClientError::RoomClosed, ClientError::Refused))
        }
        Next::Quit => {
            let waiting = sent.undelivered(stream.unacked()).len();
            let down = view.quiet || matches!(*link.borrow(), LinkStatus::Reconnecting { .. });
            if down {
                status(
                    &out,
                    format!("[link] leaving once the link is back and {waiting} typed line(s) are delivered; Ctrl-C again leaves at once"),
                );
            } else if waiting > 0 {
                status(
                    &out,
                    format!("[chat] leaving once {waiting} typed line(s) are delivered; Ctrl-C again leaves at once"),
                );
            } else {
                status(&out, "[chat] leaving");
            }
            let mut input_open = true;
            let ended = {
                let leave = leave(&mut stream, &mut lines, &out);
                tokio::pin!(leave);
                loop {
                    tokio::select! {
                        r = &mut leave => break Some(r),
                        i = input.recv(), if input_open => match i {
                            Some(Input::Abort) => break None,
                            None => input_open = false,
                            Some(_) => {}
                        },
                        ev = events.recv(), if events_open => events_open = view.show(ev, &out, waiting),
                    }
                }
            };
            match ended {
                Some(Ok(())) => Ok(()),
                Some(Err(e)) => Err(failed(e, &stream, &mut sent)),
                None => Err(ClientError::Aborted { undelivered: sent.undelivered(stream.unacked()) }),
            }
        }
    }
}

/// Leaves: sends our FIN (it completes once the room acknowledged every byte we wrote) while
/// still reading and showing what the room sends, until the room closes its side too (or a
/// short grace time after our FIN was acknowledged).
async fn leave<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S, lines: &mut Lines, out: &Out) -> io::Result<()> {
    let mut buf = vec![0u8; 16 * 1024];
    let (mut shut, mut eof) = (false, false);
    let mut grace: Option<Pin<Box<tokio::time::Sleep>>> = None;
    poll_fn(|cx| loop {
        if !shut {
            match Pin::new(&mut *stream).poll_shutdown(cx) {
                Poll::Ready(Ok(())) => {
                    shut = true;
                    grace = Some(Box::pin(tokio::time::sleep(EOF_GRACE)));
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {}
            }
        }
        if !eof {
            let mut rb = ReadBuf::new(&mut buf);
            match Pin::new(&mut *stream).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) if rb.filled().is_empty() => eof = true,
                Poll::Ready(Ok(())) => {
                    let _ = lines.feed(rb.filled());
                    while let Some(line) = lines.next_line() {
                        text(out, clean(&line));
                    }
                    continue;
                }
                // Every byte we wrote is acknowledged; a failure after that loses nothing.
                Poll::Ready(Err(_)) if shut => eof = true,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {}
            }
        }
        if shut && (eof || grace.as_mut().is_some_and(|g| g.as_mut().poll(cx).is_ready())) {
            return Poll::Ready(Ok(()));
        }
        return Poll::Pending;
    })
    .await
}
