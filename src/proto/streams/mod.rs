//! Many streams on one session (protocol version 4): per-stream state, credit, open, FIN and
//! RESET, and the limits that bound what a peer can make this end hold.
//!
//! The session below delivers one byte stream each way, exactly once and in order, across link
//! faults; [`wire`] cuts it into stream frames. [`Streams`] is the state machine of one end: it
//! parses what the session delivers ([`Streams::ingest`]), copying each DATA payload straight
//! into its stream's receive queue, and writes its own frames into the session's replay buffer.
//! It does no I/O and reads no clock: the session calls it with `now`.
//!
//! Flow control is per stream. A stream starts with [`INITIAL_WINDOW`] bytes of credit each way;
//! the receiver grants more (WINDOW) as its program reads, so a stream whose reader stops holds
//! at most its window and stalls nothing else: the session's own receive path never waits.
//! Opening is credited too: each end may open [`INITIAL_STREAMS`] streams, and the receiver
//! raises that number (STREAMS) as streams end, within its per-session cap, so a burst of opens
//! waits instead of failing. Every window a receiver grants is first taken from its
//! [`StreamBudget`] (on a server: its memory budget and the client key's share, and a stream
//! slot that stands for the outbound connection's file descriptor).

pub mod capped;
pub mod wire;

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use thiserror::Error;

use super::buffer::{ByteQueue, MAX_IOV};
use wire::{reset, Header, Item, Parser, WireError, DATA_HEADER, MAX_HEADER, MAX_PAYLOAD};

/// Credit each direction of a new stream starts with, before any WINDOW (protocol constant).
pub const INITIAL_WINDOW: u64 = 64 * 1024;
/// Streams each end may open before its peer's first STREAMS frame (protocol constant).
pub const INITIAL_STREAMS: u64 = 64;
/// Largest credit a sender may hold on one stream (protocol limit: more is a violation).
pub const MAX_CREDIT: u64 = 1 << 32;

/// Limits of one end's streams (implementation choices; see `docs/PROTOCOL.md` section 13).
#[derive(Debug, Clone)]
pub struct StreamsConfig {
    /// Streams opened by the peer that this end holds at once, at most. The peer's open
    /// credit never runs past it. Default 1024.
    pub max_streams: u64,
    /// Largest receive window one stream grows to (while its reader keeps up and the budget
    /// allows). Default 16 MiB.
    pub max_window: u64,
    /// Open credit kept ahead of the peer's opens, at most. Default 64.
    pub credit_ahead: u64,
}

impl Default for StreamsConfig {
    fn default() -> Self {
        StreamsConfig { max_streams: 1024, max_window: 16 << 20, credit_ahead: INITIAL_STREAMS }
    }
}

/// What a stream's windows and its slot are charged to. A server charges its memory budget and
/// the client key's share; a client charges its session's own caps ([`capped::Capped`]). Every call is non-blocking:
/// a refusal resets the new stream (RESET LIMIT) or leaves a window where it is.
pub trait StreamBudget: Send {
    /// Takes `n` bytes of receive window; false if the budget cannot give them now.
    fn take_window(&mut self, n: u64) -> bool;
    /// Takes `n` more bytes for a window that grows. A budget may refuse it sooner than
    /// [`take_window`](Self::take_window): a grown window stays charged while its stream lives
    /// (credit granted cannot be taken back), so growth must not take the room new streams
    /// need. By default the same as `take_window`.
    fn grow_window(&mut self, n: u64) -> bool {
        self.take_window(n)
    }
    /// Gives back `n` bytes of receive window.
    fn give_window(&mut self, n: u64);
    /// Takes a stream slot (a stream and the file descriptor it may use); false at a limit.
    fn take_stream(&mut self) -> bool;
    /// Gives back a stream slot.
    fn give_stream(&mut self);
}

/// A budget with no limits (a client's).
#[derive(Debug, Default)]
pub struct Unlimited;

impl StreamBudget for Unlimited {
    fn take_window(&mut self, _: u64) -> bool {
        true
    }
    fn give_window(&mut self, _: u64) {}
    fn take_stream(&mut self) -> bool {
        true
    }
    fn give_stream(&mut self) {}
}

/// Errors of one stream. The session's own failure is reported by the session instead.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StreamError {
    /// The peer reset the stream.
    #[error("the peer reset the stream ({})", reset_name(*.0))]
    ResetByPeer(u8),
    /// This end reset the stream.
    #[error("the stream was reset")]
    Reset,
    /// A write after `shutdown`.
    #[error("the stream was shut down for writing")]
    WriteAfterShutdown,
    /// No such stream on this session (it ended, or was never opened here).
    #[error("no such stream on this session")]
    Unknown,
    /// This end's limits leave no room for another stream.
    #[error("no room for another stream within this end's limits")]
    Limit,
}

fn reset_name(code: u8) -> &'static str {
    match code {
        reset::CANCEL => "cancelled",
        reset::LIMIT => {
            "the peer has no room for another stream (its limit on streams, or on the memory their windows take)"
        }
        reset::REFUSED => {
            "the peer takes no new streams on this session (it is ending the session, or never takes them)"
        }
        reset::SHUTDOWN => "the peer is shutting down",
        _ => "unknown code",
    }
}

/// The sender's half of a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fin {
    Open,
    /// Asked for; written by the next [`Streams::flush`].
    Pending,
    /// Written; the byte stream position just after it.
    Written(u64),
}

#[derive(Debug)]
struct Entry {
    recv: ByteQueue,
    recv_fin: bool,
    /// Receive window reserved for this stream (taken from the budget).
    window: u64,
    /// Bytes the peer may still send.
    credit_out: u64,
    /// Bytes read (or discarded) and not yet granted back.
    unannounced: u64,
    last_update: Option<Instant>,
    send_credit: u64,
    fin: Fin,
    /// Set once the stream is reset (by either end); `true` if by the peer, with its code.
    reset: Option<(bool, u8)>,
    reset_pending: Option<u8>,
    /// The OPEN arrived (false only for an expected first stream not yet opened).
    opened: bool,
    reader: bool,
    writer: bool,
    /// Waiting in the accept queue.
    queued: bool,
    by_peer: bool,
    slot: bool,
    dirty: bool,
    woken: bool,
}

impl Entry {
    fn new(by_peer: bool, opened: bool) -> Entry {
        Entry {
            recv: ByteQueue::new(),
            recv_fin: false,
            window: INITIAL_WINDOW,
            credit_out: INITIAL_WINDOW,
            unannounced: 0,
            last_update: None,
            send_credit: INITIAL_WINDOW,
            fin: Fin::Open,
            reset: None,
            reset_pending: None,
            opened,
            reader: true,
            writer: true,
            queued: false,
            by_peer,
            slot: true,
            dirty: false,
            woken: false,
        }
    }

    fn held(&self) -> bool {
        self.reader || self.writer || self.queued
    }

    /// Nothing more to do for this stream on this end.
    fn done(&self) -> bool {
        if self.held() || self.reset_pending.is_some() {
            return false;
        }
        self.reset.is_some() || (matches!(self.fin, Fin::Written(_)) && self.recv_fin)
    }
}

/// Result of a read: bytes, the end of the peer's half, or nothing yet.
pub type ReadResult = Result<Option<usize>, StreamError>;

/// The streams of one end of a session. See the module documentation.
pub struct Streams {
    cfg: StreamsConfig,
    map: HashMap<u64, Entry>,
    parser: Parser,
    /// The id of this end's next stream (odd on a client, even on a server).
    next_local: u64,
    local_max: u64,
    local_opened: u64,
    next_peer: u64,
    peer_opened: u64,
    /// Open credit granted to the peer, and the value last written.
    peer_max: u64,
    peer_max_sent: u64,
    peer_live: u64,
    incoming: VecDeque<u64>,
    accepting: bool,
    /// The peer ended its half of the session: no more opens.
    ended: bool,
    dirty: VecDeque<u64>,
    woken: Vec<u64>,
    accept_woken: bool,
    open_woken: bool,
    budget: Box<dyn StreamBudget>,
    /// Payload bytes received (every DATA payload) and written, over the session's life.
    payload_in: u64,
    payload_out: u64,
}

impl std::fmt::Debug for Streams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Streams")
            .field("open", &self.map.len())
            .field("local_opened", &self.local_opened)
            .field("peer_opened", &self.peer_opened)
            .finish_non_exhaustive()
    }
}

impl Streams {
    /// The streams of a client (`client` true: it opens odd ids) or a server (even ids).
    pub fn new(client: bool, cfg: StreamsConfig, budget: Box<dyn StreamBudget>) -> Streams {
        let (next_local, next_peer) = if client { (1, 2) } else { (2, 1) };
        Streams {
            cfg,
            map: HashMap::new(),
            parser: Parser::default(),
            next_local,
            local_max: INITIAL_STREAMS,
            local_opened: 0,
            next_peer,
            peer_opened: 0,
            peer_max: INITIAL_STREAMS,
            peer_max_sent: INITIAL_STREAMS,
            peer_live: 0,
            incoming: VecDeque::new(),
            accepting: true,
            ended: false,
            dirty: VecDeque::new(),
            woken: Vec::new(),
            accept_woken: false,
            open_woken: false,
            budget,
            payload_in: 0,
            payload_out: 0,
        }
    }

    /// Payload bytes received and written on all streams over the session's life (frame
    /// headers and control frames not counted).
    pub fn payload_bytes(&self) -> (u64, u64) {
        (self.payload_in, self.payload_out)
    }

    /// Replaces the budget (before any stream exists).
    pub fn set_budget(&mut self, budget: Box<dyn StreamBudget>) {
        self.budget = budget;
    }

    /// Streams on this end (open, ending, or waiting to be accepted).
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when no stream exists.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Bytes held in all streams' receive queues.
    pub fn buffered(&self) -> usize {
        self.map.values().map(|e| e.recv.len()).sum()
    }

    /// Receive windows reserved by all streams.
    pub fn reserved(&self) -> u64 {
        self.map.values().filter(|e| e.slot).map(|e| e.window).sum()
    }

    fn mark_dirty(&mut self, id: u64) {
        if let Some(e) = self.map.get_mut(&id) {
            if !e.dirty {
                e.dirty = true;
                self.dirty.push_back(id);
            }
        }
    }

    fn wake(&mut self, id: u64) {
        if let Some(e) = self.map.get_mut(&id) {
            if !e.woken {
                e.woken = true;
                self.woken.push(id);
            }
        }
    }

    /// Streams whose state changed since the last call (their handles must look again).
    pub fn take_woken(&mut self, into: &mut Vec<u64>) {
        for id in self.woken.drain(..) {
            if let Some(e) = self.map.get_mut(&id) {
                e.woken = false;
            }
            into.push(id);
        }
    }

    /// True once if a stream arrived for [`Streams::accept`], or the peer ended the session.
    pub fn take_accept_woken(&mut self) -> bool {
        std::mem::take(&mut self.accept_woken)
    }

    /// True once if this end may open more streams than before.
    pub fn take_open_woken(&mut self) -> bool {
        std::mem::take(&mut self.open_woken)
    }

    /// True if pending frames (WINDOW, FIN, RESET, STREAMS) wait for [`Streams::flush`].
    pub fn has_pending(&self) -> bool {
        !self.dirty.is_empty() || self.streams_due()
    }

    /// A STREAMS frame is worth sending: the credit grew by 8 or more, or the peer is within 8
    /// opens of what it was last told.
    fn streams_due(&self) -> bool {
        self.peer_max > self.peer_max_sent
            && (self.peer_max - self.peer_max_sent >= 8 || self.peer_max_sent.saturating_sub(self.peer_opened) < 8)
    }

    fn is_local(&self, id: u64) -> bool {
        id % 2 == self.next_local % 2
    }

    /// True if `id` was opened on this session (by either end), whether or not it still exists.
    fn was_opened(&self, id: u64) -> bool {
        id != 0 && if self.is_local(id) { id < self.next_local } else { id < self.next_peer }
    }

    // ---- the peer's frames ----------------------------------------------------------------

    /// Parses `bytes`, the next bytes of the peer's half of the session.
    ///
    /// # Errors
    /// A protocol violation by the peer (the session must end with CLOSE Protocol).
    pub fn ingest(&mut self, bytes: &[u8]) -> Result<(), &'static str> {
        let mut input = bytes;
        loop {
            let item = match self.parser.next(&mut input) {
                Ok(Some(i)) => i,
                Ok(None) => return Ok(()),
                Err(WireError::UnknownType(_)) => return Err("unknown stream frame type"),
                Err(WireError::EmptyData) => return Err("stream DATA of length 0"),
                Err(WireError::EmptyWindow) => return Err("stream WINDOW adding 0"),
            };
            match item {
                Item::Header(h) => self.header(h)?,
                Item::Payload { id, bytes } => self.payload(id, bytes),
            }
        }
    }

    fn header(&mut self, h: Header) -> Result<(), &'static str> {
        let seen = match h {
            Header::Data { id, .. } | Header::Window { id, .. } | Header::Fin(id) | Header::Reset { id, .. } => {
                self.was_opened(id)
            }
            _ => false,
        };
        match h {
            Header::Open(id) => self.peer_open(id)?,
            Header::Data { id, len } => {
                let len = len as u64;
                match self.map.get_mut(&id) {
                    Some(e) if e.opened => {
                        if e.reset.is_none() {
                            if e.recv_fin {
                                return Err("stream DATA after its FIN");
                            }
                            if len > e.credit_out {
                                return Err("stream DATA beyond its window");
                            }
                            e.credit_out -= len;
                        }
                    }
                    _ if seen => {}
                    _ => return Err("stream DATA for a stream never opened"),
                }
            }
            Header::Window { id, add } => match self.map.get_mut(&id) {
                Some(e) if e.opened => {
                    e.send_credit += u64::from(add);
                    if e.send_credit > MAX_CREDIT {
                        return Err("stream credit beyond 2^32 bytes");
                    }
                    if e.reset.is_none() {
                        self.wake(id);
                    }
                }
                _ if seen => {}
                _ => return Err("stream WINDOW for a stream never opened"),
            },
            Header::Fin(id) => match self.map.get_mut(&id) {
                Some(e) if e.opened => {
                    if e.reset.is_none() {
                        if e.recv_fin {
                            return Err("stream FIN twice");
                        }
                        e.recv_fin = true;
                        self.wake(id);
                        self.maybe_remove(id);
                    }
                }
                _ if seen => {}
                _ => return Err("stream FIN for a stream never opened"),
            },
            Header::Reset { id, code } => match self.map.get_mut(&id) {
                Some(e) if e.opened => {
                    if e.reset.is_none() {
                        e.reset = Some((true, code));
                        e.unannounced = 0;
                        e.recv = ByteQueue::new();
                        if e.fin == Fin::Pending {
                            e.fin = Fin::Open;
                        }
                        // Not accepted yet: nobody will, it is over.
                        if e.queued {
                            e.queued = false;
                            e.reader = false;
                            e.writer = false;
                            self.incoming.retain(|&i| i != id);
                        }
                        self.wake(id);
                        self.maybe_remove(id);
                    }
                }
                _ if seen => {}
                _ => return Err("stream RESET for a stream never opened"),
            },
            Header::Streams(max) => {
                if max > self.local_max {
                    self.local_max = max;
                    self.open_woken = true;
                }
            }
        }
        Ok(())
    }

    fn peer_open(&mut self, id: u64) -> Result<(), &'static str> {
        if self.ended {
            return Err("stream OPEN after the end of the session");
        }
        if id != self.next_peer {
            return Err("stream OPEN out of sequence");
        }
        // Against the credit the peer was told, not what this end will grant next.
        if self.peer_opened >= self.peer_max_sent {
            return Err("stream OPEN beyond the open credit");
        }
        self.next_peer += 2;
        self.peer_opened += 1;
        self.peer_live += 1;
        self.grant();
        if let Some(e) = self.map.get_mut(&id) {
            // The expected first stream (see `expect_first`): already charged and held.
            e.opened = true;
            self.wake(id);
            return Ok(());
        }
        let mut e = Entry::new(true, true);
        let refuse = if !self.accepting {
            Some(reset::REFUSED)
        } else if !self.budget.take_stream() {
            Some(reset::LIMIT)
        } else if !self.budget.take_window(INITIAL_WINDOW) {
            self.budget.give_stream();
            Some(reset::LIMIT)
        } else {
            None
        };
        if let Some(code) = refuse {
            e.slot = false;
            e.reader = false;
            e.writer = false;
            e.reset = Some((false, code));
            e.reset_pending = Some(code);
            self.map.insert(id, e);
            self.mark_dirty(id);
            return Ok(());
        }
        e.queued = true;
        self.map.insert(id, e);
        self.incoming.push_back(id);
        self.accept_woken = true;
        Ok(())
    }

    fn payload(&mut self, id: u64, bytes: &[u8]) {
        self.payload_in += bytes.len() as u64;
        let Some(e) = self.map.get_mut(&id) else { return };
        if e.reset.is_some() {
            return;
        }
        if e.reader {
            e.recv.push(bytes);
            self.wake(id);
        } else {
            // Nobody reads this stream any more: the bytes are dropped, and their credit given
            // back so that the peer can finish.
            e.unannounced += bytes.len() as u64;
            self.mark_dirty(id);
        }
    }

    /// The peer ended its half of the session (its session FIN): it opens and sends nothing
    /// more, not even credit. A stream it left open is treated as reset by it, and so is one
    /// whose FIN it sent while this end's half is still open (a conforming peer never leaves
    /// one: its session FIN waits for this end's FIN or RESET of every stream): without more
    /// credit, its bytes might never all be sent.
    pub fn peer_ended(&mut self) {
        self.ended = true;
        self.accept_woken = true;
        let ids: Vec<u64> = self.map.keys().copied().collect();
        for id in ids {
            if let Some(e) = self.map.get_mut(&id) {
                if e.reset.is_none() && (!e.recv_fin || e.fin == Fin::Open) {
                    e.reset = Some((true, reset::SHUTDOWN));
                    self.wake(id);
                    self.maybe_remove(id);
                }
            }
        }
    }

    fn maybe_remove(&mut self, id: u64) {
        let done = self.map.get(&id).is_some_and(Entry::done);
        if !done {
            return;
        }
        if let Some(e) = self.map.remove(&id) {
            if e.slot {
                self.budget.give_window(e.window);
                self.budget.give_stream();
            }
            if e.by_peer {
                self.peer_live -= 1;
                self.grant();
            }
        }
    }

    /// Raises the peer's open credit to keep `credit_ahead` opens ahead of it, within
    /// `max_streams` at once.
    fn grant(&mut self) {
        let room = self.cfg.max_streams.saturating_sub(self.peer_live);
        let target = self.peer_opened + room.min(self.cfg.credit_ahead);
        if target > self.peer_max {
            self.peer_max = target;
        }
    }

    // ---- this end's program ---------------------------------------------------------------

    /// Whether streams the peer opens are queued for [`Streams::accept`] (the default) or reset
    /// at once (RESET REFUSED). Turning it off refuses those already queued.
    pub fn set_accepting(&mut self, on: bool) {
        self.accepting = on;
        if !on {
            while let Some(id) = self.incoming.pop_front() {
                if let Some(e) = self.map.get_mut(&id) {
                    e.queued = false;
                    e.reader = false;
                    e.writer = false;
                }
                self.reset(id, reset::REFUSED);
            }
        }
    }

    /// The next stream the peer opened; `Ok(None)` if none yet.
    ///
    /// # Errors
    /// [`StreamError::Unknown`] once the peer ended the session (no more will come).
    pub fn accept(&mut self) -> Result<Option<u64>, StreamError> {
        while let Some(id) = self.incoming.pop_front() {
            if let Some(e) = self.map.get_mut(&id) {
                e.queued = false;
                self.grant();
                return Ok(Some(id));
            }
        }
        if self.ended {
            return Err(StreamError::Unknown);
        }
        Ok(None)
    }

    /// The peer's first stream, as a handle taken before it arrived (a server's one-stream
    /// sessions): if it is queued it is taken from the queue; if the peer has opened nothing
    /// yet, its entry is made now and the OPEN, when it comes, lands there. Other streams are
    /// refused from now on.
    ///
    /// # Errors
    /// [`StreamError::Limit`] if the budget has no room; [`StreamError::Unknown`] if the peer
    /// already opened streams and the first is gone.
    pub fn expect_first(&mut self) -> Result<u64, StreamError> {
        let first = if self.next_local % 2 == 1 { 2 } else { 1 };
        let res = if self.incoming.front() == Some(&first) {
            self.incoming.pop_front();
            if let Some(e) = self.map.get_mut(&first) {
                e.queued = false;
            }
            Ok(first)
        } else if self.peer_opened == 0 && !self.map.contains_key(&first) {
            if !self.budget.take_stream() {
                return Err(StreamError::Limit);
            }
            if !self.budget.take_window(INITIAL_WINDOW) {
                self.budget.give_stream();
                return Err(StreamError::Limit);
            }
            self.map.insert(first, Entry::new(true, false));
            Ok(first)
        } else {
            Err(StreamError::Unknown)
        };
        self.set_accepting(false);
        res
    }

    /// Opens a stream: writes its OPEN into `send` (the session's replay buffer), given `room`
    /// bytes free there. `Ok(None)` when the peer's open credit or the room is used up (wait
    /// for [`Streams::take_open_woken`] or for room).
    ///
    /// # Errors
    /// [`StreamError::Limit`] if this end's budget has no room for the stream.
    pub fn open(&mut self, send: &mut ByteQueue, room: usize) -> Result<Option<u64>, StreamError> {
        if self.local_opened >= self.local_max || room < MAX_HEADER {
            return Ok(None);
        }
        if !self.budget.take_stream() {
            return Err(StreamError::Limit);
        }
        if !self.budget.take_window(INITIAL_WINDOW) {
            self.budget.give_stream();
            return Err(StreamError::Limit);
        }
        let id = self.next_local;
        self.next_local += 2;
        self.local_opened += 1;
        push_header(send, Header::Open(id));
        self.map.insert(id, Entry::new(false, true));
        Ok(Some(id))
    }

    /// True if the stream exists and is open for writing.
    fn writable(&self, id: u64) -> Result<&Entry, StreamError> {
        let e = self.map.get(&id).ok_or(StreamError::Unknown)?;
        if let Some((by_peer, code)) = e.reset {
            return Err(if by_peer { StreamError::ResetByPeer(code) } else { StreamError::Reset });
        }
        if e.fin != Fin::Open {
            return Err(StreamError::WriteAfterShutdown);
        }
        Ok(e)
    }

    /// Why stream `id` carries nothing more either way, if it was reset (here or by the peer)
    /// or is unknown; `None` while it is open, half-closed included.
    pub fn stopped(&self, id: u64) -> Option<StreamError> {
        match self.map.get(&id) {
            None => Some(StreamError::Unknown),
            Some(Entry { reset: Some((true, code)), .. }) => Some(StreamError::ResetByPeer(*code)),
            Some(Entry { reset: Some((false, _)), .. }) => Some(StreamError::Reset),
            Some(_) => None,
        }
    }

    /// How many bytes stream `id` may send now (its credit; the replay buffer's room aside).
    ///
    /// # Errors
    /// The stream is reset, shut down, or unknown.
    pub fn send_credit(&self, id: u64) -> Result<u64, StreamError> {
        Ok(self.writable(id)?.send_credit)
    }

    /// Writes up to `data.len()` bytes of stream `id` into `send`, given `room` bytes free
    /// there. Returns how many; 0 when the stream's credit or the room is used up.
    ///
    /// # Errors
    /// The stream is reset, shut down, or unknown.
    pub fn write(&mut self, id: u64, data: &[u8], send: &mut ByteQueue, room: usize) -> Result<usize, StreamError> {
        let credit = self.writable(id)?.send_credit;
        let n = (data.len() as u64).min(credit).min(MAX_PAYLOAD as u64) as usize;
        let n = n.min(room.saturating_sub(DATA_HEADER));
        if n == 0 {
            return Ok(0);
        }
        push_header(send, Header::Data { id, len: n });
        send.push(&data[..n]);
        self.payload_out += n as u64;
        if let Some(e) = self.map.get_mut(&id) {
            e.send_credit -= n as u64;
        }
        Ok(n)
    }

    /// Like [`Streams::write`], with the payload written straight into `send` by `fill` (for
    /// example a vectored socket read), at most `max` bytes. `Ok(None)` when no byte can be
    /// taken now (credit or room); `fill`'s `Ok(0)` (end of file) or error appends nothing.
    ///
    /// # Errors
    /// The stream is reset, shut down, or unknown.
    pub fn write_with<E>(
        &mut self,
        id: u64,
        max: usize,
        send: &mut ByteQueue,
        room: usize,
        fill: impl FnOnce(&mut [std::io::IoSliceMut<'_>]) -> Result<usize, E>,
    ) -> Result<Option<Result<usize, E>>, StreamError> {
        let credit = self.writable(id)?.send_credit;
        let n = (max as u64).min(credit).min(MAX_PAYLOAD as u64) as usize;
        let n = n.min(room.saturating_sub(DATA_HEADER));
        if n == 0 {
            return Ok(None);
        }
        let res = send.push_with(DATA_HEADER + n, |bufs| {
            let mut head: [&mut [u8]; 2] = [&mut [], &mut []];
            // The payload's buffers, after the header's bytes: in an array, not allocated per
            // frame (`push_with` hands out at most `MAX_IOV`).
            let mut rest: [std::io::IoSliceMut<'_>; MAX_IOV] =
                std::array::from_fn(|_| std::io::IoSliceMut::new(&mut []));
            let mut used = 0;
            let mut need = DATA_HEADER;
            let mut h = 0;
            for b in bufs.iter_mut() {
                let s: &mut [u8] = b;
                if need > 0 {
                    let k = need.min(s.len());
                    let (a, tail) = s.split_at_mut(k);
                    head[h.min(1)] = a;
                    h += 1;
                    need -= k;
                    if !tail.is_empty() {
                        rest[used] = std::io::IoSliceMut::new(tail);
                        used += 1;
                    }
                } else {
                    rest[used] = std::io::IoSliceMut::new(s);
                    used += 1;
                }
            }
            let got = fill(&mut rest[..used])?;
            if got == 0 {
                return Ok(0);
            }
            let mut hb = [0u8; MAX_HEADER];
            Header::Data { id, len: got }.encode(&mut hb);
            let (a, b) = head.split_at_mut(1);
            let k = a[0].len();
            a[0].copy_from_slice(&hb[..k]);
            b[0][..DATA_HEADER - k].copy_from_slice(&hb[k..DATA_HEADER]);
            Ok(DATA_HEADER + got)
        });
        Ok(Some(res.map(|total| {
            let got = total.saturating_sub(DATA_HEADER);
            self.payload_out += got as u64;
            if let Some(e) = self.map.get_mut(&id) {
                e.send_credit -= got as u64;
            }
            got
        })))
    }

    fn readable_entry(&mut self, id: u64) -> Result<&mut Entry, StreamError> {
        self.map.get_mut(&id).ok_or(StreamError::Unknown)
    }

    fn after_read(&mut self, id: u64, n: usize) -> bool {
        let Some(e) = self.map.get_mut(&id) else { return false };
        e.unannounced += n as u64;
        let due = e.unannounced * 2 >= e.window && !e.recv_fin && e.reset.is_none();
        if due {
            self.mark_dirty(id);
        }
        due
    }

    /// Reads from stream `id` into `buf`: `Ok(Some(n))` bytes, `Ok(Some(0))` the end of the
    /// peer's half, `Ok(None)` nothing yet. The flag is true when a WINDOW became due (the
    /// driver should flush).
    ///
    /// # Errors
    /// The stream was reset (after every byte received before), or is unknown.
    pub fn read(&mut self, id: u64, buf: &mut [u8]) -> (ReadResult, bool) {
        let e = match self.readable_entry(id) {
            Ok(e) => e,
            Err(err) => return (Err(err), false),
        };
        if !e.recv.is_empty() {
            let n = e.recv.read_into(buf);
            return (Ok(Some(n)), self.after_read(id, n));
        }
        (Self::end_state(e), false)
    }

    /// Like [`Streams::read`], handing the received bytes to `drain` (for example a vectored
    /// socket write), which returns how many it took.
    pub fn read_with<E>(
        &mut self,
        id: u64,
        drain: impl FnOnce(&[std::io::IoSlice<'_>]) -> Result<usize, E>,
    ) -> (Result<Option<Result<usize, E>>, StreamError>, bool) {
        let e = match self.readable_entry(id) {
            Ok(e) => e,
            Err(err) => return (Err(err), false),
        };
        if !e.recv.is_empty() {
            let r = e.recv.read_with(drain);
            let n = *r.as_ref().unwrap_or(&0);
            return (Ok(Some(r)), self.after_read(id, n));
        }
        match Self::end_state(e) {
            Ok(Some(_)) => (Ok(Some(Ok(0))), false),
            Ok(None) => (Ok(None), false),
            Err(err) => (Err(err), false),
        }
    }

    fn end_state(e: &Entry) -> ReadResult {
        if let Some((by_peer, code)) = e.reset {
            return Err(if by_peer { StreamError::ResetByPeer(code) } else { StreamError::Reset });
        }
        if e.recv_fin {
            return Ok(Some(0));
        }
        Ok(None)
    }

    /// Bytes received on stream `id` and not read yet.
    pub fn readable(&self, id: u64) -> usize {
        self.map.get(&id).map_or(0, |e| e.recv.len())
    }

    /// Ends this end's half of stream `id`: a FIN follows its last byte (written by the next
    /// [`Streams::flush`]).
    pub fn shutdown(&mut self, id: u64) {
        if let Some(e) = self.map.get_mut(&id) {
            if e.fin == Fin::Open && e.reset.is_none() {
                e.fin = Fin::Pending;
                self.mark_dirty(id);
            }
        }
    }

    /// True once stream `id`'s FIN is written and the peer acknowledged every byte up to it
    /// (`acked` is the session's acknowledged position), or the stream is gone.
    ///
    /// # Errors
    /// The stream was reset.
    pub fn fin_acked(&self, id: u64, acked: u64) -> Result<bool, StreamError> {
        match self.map.get(&id) {
            None => Ok(true),
            Some(e) => match (e.reset, e.fin) {
                (Some((true, code)), _) => Err(StreamError::ResetByPeer(code)),
                (Some((false, _)), _) => Err(StreamError::Reset),
                (None, Fin::Written(at)) => Ok(acked >= at),
                _ => Ok(false),
            },
        }
    }

    /// Abandons stream `id` both ways: a RESET with `code` goes to the peer, and whatever it
    /// still sends is dropped.
    pub fn reset(&mut self, id: u64, code: u8) {
        if let Some(e) = self.map.get_mut(&id) {
            if e.reset.is_none() && !(matches!(e.fin, Fin::Written(_)) && e.recv_fin) {
                e.reset = Some((false, code));
                e.reset_pending = Some(code);
                e.recv = ByteQueue::new();
                e.unannounced = 0;
                self.mark_dirty(id);
                self.wake(id);
            }
        }
    }

    /// The program dropped stream `id`'s read side: what arrives is dropped (and its credit
    /// given back, so that the peer can finish).
    pub fn release_read(&mut self, id: u64) {
        if let Some(e) = self.map.get_mut(&id) {
            e.reader = false;
            let n = e.recv.len() as u64;
            e.recv = ByteQueue::new();
            e.unannounced += n;
            if n > 0 {
                self.mark_dirty(id);
            }
        }
        self.maybe_remove(id);
    }

    /// The program dropped stream `id`'s write side: a FIN follows its last byte, as when a
    /// TCP socket is closed.
    pub fn release_write(&mut self, id: u64) {
        self.shutdown(id);
        if let Some(e) = self.map.get_mut(&id) {
            e.writer = false;
        }
        self.maybe_remove(id);
    }

    /// Every stream still open; used when the program is gone.
    pub fn ids(&self) -> Vec<u64> {
        self.map.keys().copied().collect()
    }

    /// Resets (CANCEL) every stream that no handle holds and whose peer may still send: nobody
    /// will read what it sends, as when a TCP socket with unread input is closed. A stream whose
    /// peer has finished is left to end with its FIN.
    pub fn reset_unread(&mut self) {
        let ids: Vec<u64> =
            self.map.iter().filter(|(_, e)| !e.held() && e.reset.is_none() && !e.recv_fin).map(|(id, _)| *id).collect();
        for id in ids {
            self.reset(id, reset::CANCEL);
        }
    }

    /// True if no local handle holds any stream.
    pub fn unheld(&self) -> bool {
        self.map.values().all(|e| !e.held())
    }

    // ---- the driver -----------------------------------------------------------------------

    /// Writes pending frames (STREAMS, WINDOW, FIN, RESET) into `send`, within `room` bytes.
    /// A window whose reader keeps up (it was granted again within two round trips) doubles,
    /// up to `max_window`, if the budget gives the room.
    pub fn flush(&mut self, now: Instant, rtt: Option<Duration>, send: &mut ByteQueue, mut room: usize) {
        let fast = rtt.unwrap_or(Duration::from_millis(5)) * 2;
        while room >= 2 * MAX_HEADER {
            let Some(id) = self.dirty.pop_front() else { break };
            let Some(e) = self.map.get_mut(&id) else { continue };
            e.dirty = false;
            let before = send.end();
            let mut woke = false;
            if let Some(code) = e.reset_pending.take() {
                push_header(send, Header::Reset { id, code });
            } else if e.reset.is_none() {
                if e.unannounced > 0 && !e.recv_fin {
                    let mut add = e.unannounced;
                    let grow = e.last_update.is_some_and(|t| now.saturating_duration_since(t) < fast)
                        && e.window < self.cfg.max_window
                        && e.unannounced * 2 >= e.window;
                    if grow && self.budget.grow_window(e.window) {
                        add += e.window;
                        e.window *= 2;
                    }
                    e.unannounced = 0;
                    e.credit_out += add;
                    e.last_update = Some(now);
                    push_header(send, Header::Window { id, add: add.min(u64::from(u32::MAX)) as u32 });
                }
                if e.fin == Fin::Pending {
                    push_header(send, Header::Fin(id));
                    e.fin = Fin::Written(send.end());
                    woke = true;
                }
            }
            if woke {
                self.wake(id);
            }
            room = room.saturating_sub((send.end() - before) as usize);
            self.maybe_remove(id);
        }
        // Last, so that it counts the streams that ended above.
        if self.streams_due() && room >= MAX_HEADER {
            push_header(send, Header::Streams(self.peer_max));
            self.peer_max_sent = self.peer_max;
        }
    }
}

/// Appends a header to the byte stream.
fn push_header(send: &mut ByteQueue, h: Header) {
    let mut b = [0u8; MAX_HEADER];
    let n = h.encode(&mut b);
    send.push(&b[..n]);
}

#[cfg(test)]
mod tests;
