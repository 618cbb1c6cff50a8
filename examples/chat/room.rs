//! The chat room: accepts holdfast sessions, checks each member's `HELLO` against its key, and
//! relays lines between members. Used by `main.rs` and, through `#[path]`, by `tests/chat.rs`.

#![allow(dead_code)] // the example uses one part, the test another

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use holdfast::keys::{AllowList, PublicKey};
use holdfast::{LinkEvent, Listener, Peer, Stream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

use crate::line::{check_name, clean, read_line, secs, status, Lines, Out, CLOSE_TIMEOUT, HELLO_TIMEOUT, MEMBER_QUEUE};

/// How the room checks names.
#[derive(Debug, Clone, Default)]
pub struct RoomOpts {
    /// The allow-list file, re-read for every new member: the key's entry must still be there,
    /// and if it has a name, the member must use that name. Without a file, the names the
    /// listener's allow-list gave at bind time are used the same way.
    pub allow_file: Option<PathBuf>,
}

enum ToRoom {
    Join {
        id: u64,
        name: String,
        key: PublicKey,
        tx: Queue,
        bye: Bye,
        reply: oneshot::Sender<Result<String, String>>,
    },
    Said {
        id: u64,
        text: String,
    },
    Gone {
        id: u64,
        why: Option<String>,
    },
    /// A member's link went down (`up == false`) or came back: the others are told, so that a
    /// member who leaves during an outage is not simply silent.
    Link {
        id: u64,
        up: bool,
    },
}

/// Lines queued for one member.
type Queue = mpsc::Sender<Arc<str>>;
/// Tells a member task to say this (a `! ...` or `* ...` line) and close.
type Bye = oneshot::Sender<String>;

struct Member {
    name: String,
    key: PublicKey,
    tx: Queue,
    bye: Bye,
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
                    let job = member(next_id, stream, peer, opts.clone(), room_tx.clone(), out.clone());
                    tasks.spawn(job);
                }
                Err(e) => break Err(io::Error::from(e)),
            },
            Some(msg) = room_rx.recv() => handle(&mut members, msg, &out),
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    };
    status(&out, format!("[room] closing; saying goodbye to {} member(s)", members.len()));
    drop(listener);
    for m in std::mem::take(&mut members).into_values() {
        let _ = m.bye.send("* the room is closing. Goodbye.".to_string());
    }
    let all_done = async { while tasks.join_next().await.is_some() {} };
    let _ = tokio::time::timeout(CLOSE_TIMEOUT + Duration::from_secs(1), all_done).await;
    result
}

fn handle(members: &mut BTreeMap<u64, Member>, msg: ToRoom, out: &Out) {
    match msg {
        ToRoom::Join { id, name, key, tx, bye, reply } => {
            let mut rejoined = false;
            if let Some((&old, m)) = members.iter().find(|(_, m)| m.name == name) {
                if m.key != key {
                    let _ = reply.send(Err(format!("{name} is already in the room")));
                    return;
                }
                // The same key again: the member came back (after giving up, a crash, or from
                // another terminal) while the room still held the old session. The latest
                // authenticated session wins.
                if let Some(m) = members.remove(&old) {
                    let _ = m.bye.send("! you joined again from a newer session; this one is closed".to_string());
                }
                rejoined = true;
            }
            let here: Vec<&str> = members.values().map(|m| m.name.as_str()).collect();
            let welcome = if here.is_empty() {
                format!("* welcome, {name}. You are the first one here.")
            } else {
                format!("* welcome, {name}. Here: {}.", here.join(", "))
            };
            if reply.send(Ok(welcome)).is_ok() {
                let how = if rejoined { "rejoined" } else { "joined" };
                broadcast(members, id, &format!("* {name} {how}"), out);
                status(out, format!("[room] {name} {how} ({} here)", members.len() + 1));
                members.insert(id, Member { name, key, tx, bye });
            }
        }
        ToRoom::Said { id, text } => {
            if let Some(m) = members.get(&id) {
                let line = format!("{}: {}", m.name, clean(&text));
                broadcast(members, id, &line, out);
            }
        }
        ToRoom::Link { id, up } => {
            if let Some(m) = members.get(&id) {
                let notice = if up {
                    format!("* {} is back", m.name)
                } else {
                    format!("* {}'s link is down; the room keeps their place until they are back or it expires", m.name)
                };
                broadcast(members, id, &notice, out);
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
            let _ = m.bye.send("! you were dropped: too far behind".to_string());
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
    let (bye, mut bye_rx) = oneshot::channel();
    let (reply, answer) = oneshot::channel();
    let _ = room.send(ToRoom::Join { id, name: name.clone(), key: peer.key, tx, bye, reply });
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
            Some(line) = rx.recv() => {
                why = stream.write_all(line.as_bytes()).await.err().map(|e| e.to_string());
            }
            said = &mut bye_rx => {
                // Lines queued before the goodbye go first.
                while let Ok(line) = rx.try_recv() {
                    let _ = stream.write_all(line.as_bytes()).await;
                }
                let said = said.unwrap_or_else(|_| "* the room is closing. Goodbye.".to_string());
                let _ = stream.write_all(format!("{said}\n").as_bytes()).await;
                why = Some(said[2..].to_string());
            }
            ev = events.recv(), if events_open => match ev {
                Ok(ev) => {
                    if let Some(s) = room_event(&name, &ev) {
                        status(&out, s);
                    }
                    match ev {
                        LinkEvent::Lost(_) => {
                            let _ = room.send(ToRoom::Link { id, up: false });
                        }
                        LinkEvent::Resumed { .. } => {
                            let _ = room.send(ToRoom::Link { id, up: true });
                        }
                        _ => {}
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
