//! The chat room and the chat client as functions over a holdfast [`Stream`], with input and
//! output passed in as channels so that `tests/chat.rs` can drive them (it includes this file
//! with `#[path]`). The terminal glue is in `main.rs`, key files and the allow-list in
//! `setup.rs`.
//!
//! The protocol on the stream is newline-terminated UTF-8 lines:
//! - client to room: first `HELLO <name>`, then one chat line per line;
//! - room to client: `<name>: <text>` for a message, `* <notice>` for the welcome, joins and
//!   leaves, and `! <reason>` for a refusal, after which the room closes the stream.
//!
//! The application never resends anything. holdfast delivers every byte written exactly once,
//! in order, across faults. So each line is written once and read once, and a reconnect is not
//! something this file has to handle: it only shows it to the user.

#![allow(dead_code)] // the example uses one part, the test another

use std::collections::{BTreeMap, VecDeque};
use std::future::{poll_fn, Future};
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use holdfast::keys::AllowList;
use holdfast::{LinkEvent, LinkStatus, Listener, Peer, Stream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

/// Longest chat line, in bytes.
pub const MAX_LINE: usize = 4096;
/// Longest member name.
pub const MAX_NAME: usize = 32;
/// Lines queued for one member before the room drops that member as too far behind.
const MEMBER_QUEUE: usize = 4096;
/// How long a new session may take to say `HELLO`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(60);
/// How long closing a stream (FIN until acknowledged) may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// After a client's FIN was acknowledged, how long it waits for the room to close its side.
const EOF_GRACE: Duration = Duration::from_secs(3);

/// Something to show the user: chat text (stdout) or a status line (stderr).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Show {
    /// A line of the conversation.
    Text(String),
    /// A `[link]`, `[room]` or `[chat]` status line.
    Status(String),
}

/// Where the room and the client send what they show.
pub type Out = mpsc::UnboundedSender<Show>;

fn status(out: &Out, s: impl Into<String>) {
    let _ = out.send(Show::Status(s.into()));
}

fn text(out: &Out, s: impl Into<String>) {
    let _ = out.send(Show::Text(s.into()));
}

/// Checks a member name: 1 to 32 of `A-Z a-z 0-9 _ . -`, starting with a letter or digit.
/// `seat-*` is reserved for the room's pre-generated keys (see `setup.rs`).
pub fn check_name(name: &str) -> Result<(), String> {
    let ok_chars = name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    let ok_start = name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
    if name.len() > MAX_NAME || !ok_chars || !ok_start {
        return Err(format!(
            "{name:?} is not a valid name: use 1 to {MAX_NAME} letters, digits, '_', '.' or '-', starting with a letter or digit"
        ));
    }
    if name.starts_with("seat-") {
        return Err(format!("{name:?} is not a valid name: names starting with \"seat-\" are reserved"));
    }
    Ok(())
}

/// Replaces control characters (terminal escapes) by `?`, so that a line cannot rewrite the
/// reader's screen.
pub fn clean(line: &str) -> String {
    line.chars().map(|c| if c.is_control() && c != '\t' { '?' } else { c }).collect()
}

fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

/// Splits received bytes into lines.
#[derive(Default)]
pub struct Lines {
    partial: Vec<u8>,
    ready: VecDeque<String>,
}

impl Lines {
    /// Adds received bytes. Fails if a line grows longer than [`MAX_LINE`].
    pub fn feed(&mut self, mut data: &[u8]) -> Result<(), String> {
        while let Some(i) = data.iter().position(|&b| b == b'\n') {
            self.partial.extend_from_slice(&data[..i]);
            data = &data[i + 1..];
            if self.partial.len() > MAX_LINE {
                return Err(format!("line longer than {MAX_LINE} bytes"));
            }
            let mut line = String::from_utf8_lossy(&self.partial).into_owned();
            if line.ends_with('\r') {
                line.pop();
            }
            self.ready.push_back(line);
            self.partial.clear();
        }
        self.partial.extend_from_slice(data);
        if self.partial.len() > MAX_LINE {
            return Err(format!("line longer than {MAX_LINE} bytes"));
        }
        Ok(())
    }

    /// The next complete line.
    pub fn next_line(&mut self) -> Option<String> {
        self.ready.pop_front()
    }
}

/// Reads until one complete line is available; `None` at end of stream.
async fn read_line<S: AsyncRead + Unpin>(s: &mut S, lines: &mut Lines) -> io::Result<Option<String>> {
    let mut buf = [0u8; 4096];
    loop {
        if let Some(line) = lines.next_line() {
            return Ok(Some(line));
        }
        let n = s.read(&mut buf).await?;
        if n == 0 {
            return Ok(None);
        }
        lines.feed(&buf[..n]).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    }
}

// ---- the room -------------------------------------------------------------------------------

/// How the room checks names.
#[derive(Debug, Clone, Default)]
pub struct RoomOpts {
    /// The allow-list file, re-read for every new member: the key's entry must still be there,
    /// and if it has a name, the member must use that name. Without a file, the names the
    /// listener's allow-list gave at bind time are used the same way.
    pub allow_file: Option<PathBuf>,
}

enum ToRoom {
    Join { id: u64, name: String, tx: mpsc::Sender<Arc<str>>, reply: oneshot::Sender<Result<String, String>> },
    Said { id: u64, text: String },
    Gone { id: u64, why: Option<String> },
}

struct Member {
    name: String,
    tx: mpsc::Sender<Arc<str>>,
}

/// Runs a room on `listener` until `stop` completes, then tells every member the room is
/// closing and closes their streams.
///
/// # Errors
/// If the listener stops accepting.
pub async fn run_room(
    mut listener: Listener,
    opts: RoomOpts,
    out: Out,
    stop: impl Future<Output = ()>,
) -> io::Result<()> {
    let opts = Arc::new(opts);
    let closing = Arc::new(AtomicBool::new(false));
    let (room_tx, mut room_rx) = mpsc::unbounded_channel();
    let mut members: BTreeMap<u64, Member> = BTreeMap::new();
    let mut tasks = JoinSet::new();
    let mut next_id = 0u64;
    tokio::pin!(stop);
    let result = loop {
        tokio::select! {
            () = &mut stop => break Ok(()),
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    next_id += 1;
                    let job = member(next_id, stream, peer, opts.clone(), room_tx.clone(), out.clone(), closing.clone());
                    tasks.spawn(job);
                }
                Err(e) => break Err(io::Error::from(e)),
            },
            Some(msg) = room_rx.recv() => handle(&mut members, msg, &out),
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    };
    status(&out, format!("[room] closing; saying goodbye to {} member(s)", members.len()));
    closing.store(true, Ordering::SeqCst);
    drop(listener);
    members.clear(); // each member task sees its queue end, says goodbye and closes its stream
    let all_done = async { while tasks.join_next().await.is_some() {} };
    let _ = tokio::time::timeout(CLOSE_TIMEOUT + Duration::from_secs(1), all_done).await;
    result
}

fn handle(members: &mut BTreeMap<u64, Member>, msg: ToRoom, out: &Out) {
    match msg {
        ToRoom::Join { id, name, tx, reply } => {
            if members.values().any(|m| m.name == name) {
                let _ = reply.send(Err(format!("{name} is already in the room")));
                return;
            }
            let here: Vec<&str> = members.values().map(|m| m.name.as_str()).collect();
            let welcome = if here.is_empty() {
                format!("* welcome, {name}. You are the first one here.")
            } else {
                format!("* welcome, {name}. Here: {}.", here.join(", "))
            };
            if reply.send(Ok(welcome)).is_ok() {
                broadcast(members, id, &format!("* {name} joined"), out);
                status(out, format!("[room] {name} joined ({} here)", members.len() + 1));
                members.insert(id, Member { name, tx });
            }
        }
        ToRoom::Said { id, text } => {
            if let Some(m) = members.get(&id) {
                let line = format!("{}: {}", m.name, clean(&text));
                broadcast(members, id, &line, out);
            }
        }
        ToRoom::Gone { id, why } => {
            if let Some(m) = members.remove(&id) {
                let notice = match why {
                    None => format!("* {} left", m.name),
                    Some(why) => format!("* {} is gone: {why}", m.name),
                };
                status(out, format!("[room] {} ({} here)", &notice[2..], members.len()));
                broadcast(members, id, &notice, out);
            }
        }
    }
}

/// Queues `line` for every member but `except`. A member whose queue is full (its link has been
/// down for thousands of lines) is dropped rather than letting the room grow without bound.
fn broadcast(members: &mut BTreeMap<u64, Member>, except: u64, line: &str, out: &Out) {
    let line: Arc<str> = format!("{line}\n").into();
    let mut behind = Vec::new();
    for (&id, m) in members.iter() {
        if id != except && m.tx.try_send(line.clone()).is_err() {
            behind.push(id);
        }
    }
    for id in behind {
        if let Some(m) = members.remove(&id) {
            let notice: Arc<str> = format!("* {} was dropped: too far behind\n", m.name).into();
            status(out, format!("[room] {} dropped: too far behind", m.name));
            for m in members.values() {
                let _ = m.tx.try_send(notice.clone());
            }
        }
    }
}

/// The name the room knows for this key: `Err` if the key is no longer allowed.
fn listed_name(opts: &RoomOpts, peer: &Peer) -> Result<Option<String>, String> {
    let Some(path) = &opts.allow_file else { return Ok(peer.name.clone()) };
    let list = AllowList::load(path).map_err(|e| format!("the room cannot read its allow-list: {e}"))?;
    match list.lookup(&peer.key) {
        Some(entry) => Ok(entry.name.clone()),
        None => Err("your key is no longer on the room's allow-list".to_string()),
    }
}

fn check_hello(line: Option<String>, opts: &RoomOpts, peer: &Peer) -> Result<String, String> {
    let line = line.ok_or("the stream ended before HELLO")?;
    let name = line.strip_prefix("HELLO ").ok_or("the first line must be HELLO <name>")?.trim().to_string();
    check_name(&name)?;
    match listed_name(opts, peer)? {
        Some(listed) if listed != name => {
            Err(format!("your key is listed as {listed:?} on the room's allow-list: join as {listed}"))
        }
        _ => Ok(name),
    }
}

async fn refuse(mut stream: Stream, why: &str) {
    let _ = stream.write_all(format!("! {why}\n").as_bytes()).await;
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, stream.shutdown()).await;
}

/// One member's session: HELLO, then relay lines both ways until it leaves or fails.
async fn member(
    id: u64,
    mut stream: Stream,
    peer: Peer,
    opts: Arc<RoomOpts>,
    room: mpsc::UnboundedSender<ToRoom>,
    out: Out,
    closing: Arc<AtomicBool>,
) {
    let mut events = stream.events();
    let mut lines = Lines::default();
    let hello = tokio::time::timeout(HELLO_TIMEOUT, read_line(&mut stream, &mut lines)).await;
    let hello = match hello {
        Ok(Ok(line)) => check_hello(line, &opts, &peer),
        Ok(Err(e)) => Err(format!("bad HELLO: {e}")),
        Err(_) => Err("no HELLO in time".to_string()),
    };
    let name = match hello {
        Ok(name) => name,
        Err(why) => {
            status(&out, format!("[room] refused {} ({}): {why}", peer.addr, peer.name.as_deref().unwrap_or("?")));
            return refuse(stream, &why).await;
        }
    };
    let (tx, mut rx) = mpsc::channel(MEMBER_QUEUE);
    let (reply, answer) = oneshot::channel();
    let _ = room.send(ToRoom::Join { id, name: name.clone(), tx, reply });
    let welcome = match answer.await {
        Ok(Ok(welcome)) => welcome,
        Ok(Err(why)) => return refuse(stream, &why).await,
        Err(_) => return refuse(stream, "the room is closing").await,
    };
    let mut why = stream.write_all(format!("{welcome}\n").as_bytes()).await.err().map(|e| e.to_string());
    while let Some(line) = lines.next_line() {
        let _ = room.send(ToRoom::Said { id, text: line });
    }
    let mut buf = vec![0u8; 16 * 1024];
    let mut events_open = true;
    while why.is_none() {
        tokio::select! {
            r = stream.read(&mut buf) => match r {
                Ok(0) => break,
                Ok(n) => {
                    if let Err(e) = lines.feed(&buf[..n]) {
                        let _ = stream.write_all(format!("! {e}\n").as_bytes()).await;
                        why = Some(e);
                    }
                    while let Some(line) = lines.next_line() {
                        let _ = room.send(ToRoom::Said { id, text: line });
                    }
                }
                Err(e) => why = Some(e.to_string()),
            },
            msg = rx.recv() => match msg {
                Some(line) => why = stream.write_all(line.as_bytes()).await.err().map(|e| e.to_string()),
                None => {
                    let bye = if closing.load(Ordering::SeqCst) {
                        "* the room is closing. Goodbye."
                    } else {
                        "! you were dropped: too far behind"
                    };
                    let _ = stream.write_all(format!("{bye}\n").as_bytes()).await;
                    why = Some(bye[2..].to_string());
                }
            },
            ev = events.recv(), if events_open => match ev {
                Ok(ev) => {
                    if let Some(s) = room_event(&name, &ev) {
                        status(&out, s);
                    }
                }
                Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => events_open = false,
            },
        }
    }
    let left = why.is_none();
    let _ = room.send(ToRoom::Gone { id, why });
    // Our FIN follows every line queued so far; it completes once the member acknowledged it.
    let close = async move {
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, stream.shutdown()).await;
    };
    if left {
        // The member left and has nothing more to receive: do not hold the room up for the
        // courtesy FIN (its acknowledgement can be lost when the member's socket closes first).
        tokio::spawn(close);
    } else {
        close.await; // "the room is closing" and refusals are delivered before we go
    }
}

/// A room-side status line for a member's link event.
fn room_event(name: &str, ev: &LinkEvent) -> Option<String> {
    Some(match ev {
        LinkEvent::Lost(lost) => format!("[link] {name}: lost ({}); holding the session for a resume", lost.cause),
        LinkEvent::Resumed { peer, after, replayed_sent, replayed_received } => format!(
            "[link] {name}: resumed from {peer} after {}, replayed {replayed_sent} B to them, {replayed_received} B from them",
            secs(*after)
        ),
        LinkEvent::Failed { reason } => format!("[link] {name}: failed: {reason}"),
        _ => return None,
    })
}

// ---- the client -----------------------------------------------------------------------------

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
    typed_while_down: usize,
}

impl LinkView {
    fn on_event(&mut self, ev: &LinkEvent) -> Option<String> {
        Some(match ev {
            LinkEvent::Lost(lost) => {
                self.down_since = Some(Instant::now());
                self.typed_while_down = 0;
                format!(
                    "[link] lost: {} (fault {}); reconnecting. Keep typing: lines are kept.",
                    lost.cause, lost.faults
                )
            }
            // Attempt 1 starts at once; the "lost" line already says we are reconnecting.
            LinkEvent::Reconnecting { attempt, elapsed } if *attempt > 1 => {
                format!("[link] reconnecting: attempt {attempt}, down for {}", secs(*elapsed))
            }
            LinkEvent::Resumed { peer, after, replayed_sent, replayed_received } => {
                self.down_since = None;
                let typed = std::mem::take(&mut self.typed_while_down);
                let typed = match typed {
                    0 => String::new(),
                    1 => "; the line typed meanwhile is on its way".to_string(),
                    n => format!("; the {n} lines typed meanwhile are on their way"),
                };
                format!(
                    "[link] resumed after {} via {peer}: replayed {replayed_sent} B sent, {replayed_received} B received{typed}",
                    secs(*after)
                )
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
                                LinkStatus::Reconnecting { cause, attempt } => format!(
                                    "down for {} ({cause}), reconnect attempt {attempt}",
                                    secs(view.down_since.map(|t| t.elapsed()).unwrap_or_default())
                                ),
                                LinkStatus::Closed => "closed".to_string(),
                                LinkStatus::Failed(why) => format!("failed: {why}"),
                            };
                            status(&out, format!("[link] {s}; {} typed line(s) not yet acknowledged by the room", sent.lines.len()));
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
                            if matches!(*link.borrow(), LinkStatus::Reconnecting { .. }) {
                                view.typed_while_down += 1;
                                status(&out, format!("[link] down: line kept, it is sent after the resume ({} waiting)", view.typed_while_down));
                            }
                        }
                    },
                },
                ev = events.recv(), if events_open => match ev {
                    Ok(ev) => {
                        if let Some(s) = view.on_event(&ev) {
                            status(&out, s);
                        }
                    }
                    Err(RecvError::Lagged(_)) => {}
                    Err(RecvError::Closed) => events_open = false,
                },
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
            if waiting > 0 && matches!(*link.borrow(), LinkStatus::Reconnecting { .. }) {
                status(
                    &out,
                    format!("[link] leaving once the link is back and {waiting} typed line(s) are delivered; Ctrl-C again leaves at once"),
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
                        ev = events.recv(), if events_open => match ev {
                            Ok(ev) => {
                                if let Some(s) = view.on_event(&ev) {
                                    status(&out, s);
                                }
                            }
                            Err(RecvError::Lagged(_)) => {}
                            Err(RecvError::Closed) => events_open = false,
                        },
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
