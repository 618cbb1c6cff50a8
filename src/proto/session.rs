//! The session state machine: one virtual stream that outlives its real connections.
//!
//! A [`Session`] owns the replay buffer (plaintext the program wrote, kept until the peer
//! acknowledges it), the receive buffer, the stream offsets, tickets and timers. It does no I/O
//! and reads no clock: the driver feeds it records and `now`, and asks it for records to send and
//! the next deadline. A real connection is plugged in with [`Session::attach`] after a handshake
//! and unplugged with [`Session::detach`] when it fails; the stream itself goes on.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use thiserror::Error;
use zeroize::Zeroizing;

use super::buffer::ByteQueue;
use super::frame::{CloseCode, Frame, FrameError, MAX_DATA, MAX_FRAME, RESUME_ID_LEN};
use super::handshake::Ticket;
use super::rtt::{threshold, Check, Liveness, RttEstimate};
use super::streams::{StreamBudget, StreamError, Streams, StreamsConfig};
use super::transport::{CryptoError, Transport, TAG_LEN};
use crate::human::Rounded;

/// Tunable limits and timers of a session. All have documented defaults.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Replay buffer bound: bytes written but not yet acknowledged. Writes wait when it is full.
    /// Default 8 MiB.
    pub max_buffer: usize,
    /// Receive buffer level above which the driver stops reading the socket. Default 1 MiB.
    pub recv_window: usize,
    /// Send a PING after this long without sending anything. Default 5 s.
    pub keepalive: Duration,
    /// Declare the real connection dead after this long without receiving anything. Default 15 s.
    pub dead_after: Duration,
    /// Longest delay before acknowledging received data. Default 10 ms.
    pub ack_delay: Duration,
    /// Acknowledge at once when this many received bytes are unacknowledged. Default 64 KiB.
    pub ack_threshold: u64,
    /// Least time between two ACKs sent for the threshold: one reached sooner after the last
    /// ACK waits for the rest of this. Default 1 ms. At full speed on a fast path every 64 KiB
    /// made an ACK record, each a wake-up of the peer's driver for nothing it needed: spacing
    /// them out gave 8–12 % more download throughput through a forward on loopback.
    pub ack_spacing: Duration,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            max_buffer: 8 << 20,
            recv_window: 1 << 20,
            keepalive: Duration::from_secs(5),
            dead_after: Duration::from_secs(15),
            ack_delay: Duration::from_millis(10),
            ack_threshold: 64 << 10,
            ack_spacing: Duration::from_millis(1),
        }
    }
}

/// Which end of the session this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Connects and resumes; receives tickets.
    Client,
    /// Accepts; issues tickets.
    Server,
}

/// Session-layer errors. Those for which [`SessionError::is_link_fault`] is true end only the
/// real connection (the session resumes); the others end the session.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SessionError {
    /// A record failed to decrypt or authenticate.
    #[error("crypto failure on the link: {0}")]
    Crypto(#[from] CryptoError),
    /// A record decrypted to an invalid frame.
    #[error("invalid frame on the link: {0}")]
    Frame(#[from] FrameError),
    /// The peer broke a protocol rule on this connection.
    #[error("protocol violation on the link: {0}")]
    Protocol(&'static str),
    /// Nothing was received for the dead-peer time.
    #[error("peer silent for {}, link presumed dead", Rounded(*.0))]
    Dead(Duration),
    /// The real connection closed or failed.
    #[error("link failed: {0}")]
    Link(String),
    /// The peer ended the session with a CLOSE frame.
    #[error("peer closed the session ({code:?}): {reason}")]
    PeerClosed {
        /// The peer's close code.
        code: CloseCode,
        /// The peer's reason text.
        reason: String,
    },
    /// The peer resumed claiming offsets this end cannot honour.
    #[error("resume offsets are inconsistent: {0}")]
    BadResume(&'static str),
    /// A write after `shutdown`.
    #[error("stream was shut down for writing")]
    WriteAfterShutdown,
    /// The client's recovery policy gave up after this long without a link.
    #[error("gave up reconnecting after {} without a link", Rounded(*.0))]
    GaveUp(Duration),
    /// The recovery hook answered "fail".
    #[error("recovery declined: the on-fault hook answered no, after: {0}")]
    Declined(String),
    /// The server no longer knows the session (it restarted, or the session expired there).
    #[error(
        "session lost: the server no longer knows it (restarted, expired, the first link broke before the \
         server confirmed it, or a load balancer sent the resume to another server); not starting a new one"
    )]
    Lost,
    /// The server ended the session because the client's key is no longer on its allow-list
    /// (CLOSE code 6, or REJECT 4 to a resume). Not retried: a new session would be refused too.
    #[error(
        "the server no longer allows this key: it was removed from the server's allow-list, and the session \
         was ended; ask the server's operator if that is a mistake"
    )]
    NotAllowed,
    /// Every reconnect attempt was refused (nothing listening) for this long, where the
    /// client's policy says a server that is gone does not come back
    /// (`RecoveryPolicy::refused_ends_after`).
    #[error(
        "nothing listens at the server's address any more: every connection was refused for {}, and this session's server does not come back once it has ended",
        Rounded(*.0)
    )]
    ServerGone(Duration),
    /// The server expired the detached session.
    #[error("session expired after {} without a resume", Rounded(*.0))]
    Expired(Duration),
    /// The program dropped or aborted the stream.
    #[error("stream aborted: {0}")]
    Aborted(String),
    /// The session ended normally.
    #[error("session finished")]
    Finished,
    /// The peer broke a rule of the stream frames (`docs/PROTOCOL.md` section 13). The bytes
    /// are in the peer's replay buffer and a resume would send them again, so the session ends.
    #[error("protocol violation in the streams: {0}")]
    StreamProtocol(&'static str),
}

impl SessionError {
    /// True for faults of one real connection, after which the session should resume.
    pub fn is_link_fault(&self) -> bool {
        matches!(
            self,
            SessionError::Crypto(_)
                | SessionError::Frame(_)
                | SessionError::Protocol(_)
                | SessionError::Dead(_)
                | SessionError::Link(_)
        )
    }
}

/// Things the driver must act on, taken with [`Session::poll_event`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Server: a new ticket id now resolves to this session.
    TicketIssued([u8; RESUME_ID_LEN]),
    /// Server: this ticket id no longer resolves to this session.
    TicketRetired([u8; RESUME_ID_LEN]),
    /// Client: a new ticket was stored; the session can now be resumed.
    TicketReceived,
    /// The link has been silent this long with something outstanding, much longer than its
    /// round trip: it may be dead (the client races a second connection). Reported once until
    /// the link is heard from again.
    Suspect(Duration),
    /// The driver said the network changed ([`Session::path_changed`]): the attached link may
    /// be gone, whatever its silence (the client races a second connection). Reported once
    /// until the link is heard from again.
    PathSuspect,
    /// A link reported [`Event::Suspect`] or [`Event::PathSuspect`] was heard from again.
    Healthy,
}

/// Result of a successful [`Session::attach`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attached {
    /// Stream positions this end will send again because the peer never received them.
    pub replayed: u64,
}

struct Link {
    transport: Transport,
    last_recv: Instant,
    last_send: Instant,
    /// When the last PING left on this link.
    last_ping: Instant,
    /// What awaits an answer on this link, for the suspicion rule (see [`super::rtt`]).
    live: Liveness,
}

/// One end of a resumable stream. See the module documentation.
pub struct Session {
    role: Role,
    cfg: SessionConfig,
    /// Replay buffer: `start()` is the peer's cumulative ack, `end()` what the program wrote.
    send: ByteQueue,
    /// Next stream position to transmit on the current link.
    sent: u64,
    /// Highest stream position transmitted on any link (`sent` restarts lower after a resume).
    transmitted: u64,
    /// Our FIN offset once the program shut down writing.
    fin: Option<u64>,
    /// Peer acknowledged our FIN.
    fin_acked: bool,
    /// Receive buffer; `end()` is the next data offset expected.
    recv: ByteQueue,
    /// The peer's FIN offset, once received.
    peer_fin: Option<u64>,
    /// The last ACK value sent on the current link.
    ack_sent: u64,
    /// When the pending ACK must go out.
    ack_due: Option<Instant>,
    /// When the last ACK went out on the current link.
    ack_sent_at: Option<Instant>,
    link: Option<Link>,
    pong_due: bool,
    /// Server: live tickets (at most two). Client: the newest ticket at index 0.
    tickets: Vec<Ticket>,
    ticket_to_send: Option<Ticket>,
    ticket_ack_to_send: Option<[u8; RESUME_ID_LEN]>,
    close_to_send: Option<(CloseCode, String)>,
    failed: Option<SessionError>,
    events: VecDeque<Event>,
    scratch: Zeroizing<Vec<u8>>,
    /// Client: resume attempts numbered so far.
    attempts: u64,
    /// The round-trip estimate, across links, from every sample: DATA → ACK samples may
    /// include the peer's ack delay, so it errs long, which is safe for the suspicion rule.
    rtt: RttEstimate,
    /// The round trip as shown (status, metrics): PING → PONG samples only, which the peer
    /// answers at once, so a 10 ms ack delay does not pass for a 10 ms path.
    rtt_ping: RttEstimate,
    /// Races (second connections on suspicion) since the link last made progress for a while:
    /// each doubles the suspicion threshold.
    races: u32,
    /// When the last race was counted.
    raced_at: Option<Instant>,
    /// A probe PING is due (the peer stopped streaming to us).
    probe_due: bool,
    /// The streams carried in the byte stream (protocol version 4); `None` for a bare byte
    /// stream (this crate's own tests of the layer below).
    streams: Option<Box<Streams>>,
}

/// Room beyond [`SessionConfig::max_buffer`] for the streams' control frames (WINDOW, FIN,
/// RESET, STREAMS), so that a replay buffer full of data never holds back the credit that lets
/// the peer's data flow. They are bounded by the number of streams.
const CONTROL_ROOM: usize = 64 * 1024;

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("role", &self.role)
            .field("acked", &self.send.start())
            .field("written", &self.send.end())
            .field("received", &self.received_offset())
            .field("linked", &self.link.is_some())
            .finish_non_exhaustive()
    }
}

impl Session {
    /// A new session with no real connection yet.
    pub fn new(role: Role, cfg: SessionConfig) -> Self {
        Session {
            role,
            cfg,
            send: ByteQueue::new(),
            sent: 0,
            transmitted: 0,
            fin: None,
            fin_acked: false,
            recv: ByteQueue::new(),
            peer_fin: None,
            ack_sent: 0,
            ack_sent_at: None,
            ack_due: None,
            link: None,
            pong_due: false,
            tickets: Vec::new(),
            ticket_to_send: None,
            ticket_ack_to_send: None,
            close_to_send: None,
            failed: None,
            events: VecDeque::new(),
            scratch: Zeroizing::new(Vec::new()),
            attempts: 0,
            rtt: RttEstimate::default(),
            rtt_ping: RttEstimate::default(),
            races: 0,
            raced_at: None,
            probe_due: false,
            streams: None,
        }
    }

    /// Makes the byte stream carry streams (protocol version 4), charged to `budget`.
    pub fn enable_streams(&mut self, cfg: StreamsConfig, budget: Box<dyn StreamBudget>) {
        self.streams = Some(Box::new(Streams::new(self.role == Role::Client, cfg, budget)));
    }

    /// The streams, if enabled.
    pub fn streams(&self) -> Option<&Streams> {
        self.streams.as_deref()
    }

    /// The streams, if enabled, for the calls that need no room in the replay buffer (reads,
    /// shutdown, reset, accept, release).
    pub fn streams_mut(&mut self) -> Option<&mut Streams> {
        self.streams.as_deref_mut()
    }

    fn streams_for_write(&mut self, room: usize) -> Result<(&mut Streams, &mut ByteQueue, usize), StreamError> {
        let space = self.send_space();
        if self.fin.is_some() {
            return Err(StreamError::WriteAfterShutdown);
        }
        let st = self.streams.as_deref_mut().ok_or(StreamError::Unknown)?;
        Ok((st, &mut self.send, room.min(space)))
    }

    /// Opens a stream within `room` bytes of the replay buffer (see [`Streams::open`]).
    ///
    /// # Errors
    /// As [`Streams::open`].
    pub fn stream_open(&mut self, room: usize) -> Result<Option<u64>, StreamError> {
        let (st, send, room) = self.streams_for_write(room)?;
        st.open(send, room)
    }

    /// Writes stream bytes within `room` bytes of the replay buffer (see [`Streams::write`]).
    ///
    /// # Errors
    /// As [`Streams::write`].
    pub fn stream_write(&mut self, id: u64, data: &[u8], room: usize) -> Result<usize, StreamError> {
        let (st, send, room) = self.streams_for_write(room)?;
        st.write(id, data, send, room)
    }

    /// Writes stream bytes that `fill` puts straight into the replay buffer (see
    /// [`Streams::write_with`]).
    ///
    /// # Errors
    /// As [`Streams::write_with`].
    pub fn stream_write_with<E>(
        &mut self,
        id: u64,
        max: usize,
        room: usize,
        fill: impl FnOnce(&mut [std::io::IoSliceMut<'_>]) -> Result<usize, E>,
    ) -> Result<Option<Result<usize, E>>, StreamError> {
        let (st, send, room) = self.streams_for_write(room)?;
        st.write_with(id, max, send, room, fill)
    }

    /// True once stream `id`'s FIN was acknowledged with every byte before it.
    ///
    /// # Errors
    /// The stream was reset.
    pub fn stream_fin_acked(&self, id: u64) -> Result<bool, StreamError> {
        match &self.streams {
            Some(st) => st.fin_acked(id, self.send.start()),
            None => Err(StreamError::Unknown),
        }
    }

    /// The session's configuration.
    pub fn config(&self) -> &SessionConfig {
        &self.cfg
    }

    // ---- program side -------------------------------------------------------------------

    /// Buffers up to `data.len()` bytes for sending. Returns how many were taken; 0 means the
    /// replay buffer is full (backpressure: try again after acknowledgements arrive).
    ///
    /// # Errors
    /// The session's failure, or [`SessionError::WriteAfterShutdown`].
    pub fn write(&mut self, data: &[u8]) -> Result<usize, SessionError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if self.fin.is_some() {
            return Err(SessionError::WriteAfterShutdown);
        }
        let n = data.len().min(self.send_space());
        self.send.push(&data[..n]);
        Ok(n)
    }

    /// Like [`Session::write`], with the bytes written straight into the replay buffer by
    /// `fill` (for example a vectored socket read), at most `max` of them. `fill` is called only
    /// when there is room; `Ok(None)` means the buffer is full (try again after
    /// acknowledgements arrive).
    ///
    /// # Errors
    /// The session's failure, or [`SessionError::WriteAfterShutdown`]. `fill`'s own error is
    /// returned inside `Ok(Some(..))`.
    pub fn write_with<E>(
        &mut self,
        max: usize,
        fill: impl FnOnce(&mut [std::io::IoSliceMut<'_>]) -> Result<usize, E>,
    ) -> Result<Option<Result<usize, E>>, SessionError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if self.fin.is_some() {
            return Err(SessionError::WriteAfterShutdown);
        }
        let room = max.min(self.send_space());
        if room == 0 {
            return Ok(None);
        }
        Ok(Some(self.send.push_with(room, fill)))
    }

    /// Free space in the replay buffer.
    pub fn send_space(&self) -> usize {
        self.cfg.max_buffer.saturating_sub(self.send.len())
    }

    /// Bytes written and not yet handed to the current link (or to any link, while detached).
    pub fn unsent(&self) -> usize {
        self.send.end().saturating_sub(self.sent.max(self.send.start())) as usize
    }

    /// Bytes written and not yet acknowledged by the peer.
    pub fn unacked(&self) -> usize {
        self.send.len()
    }

    /// Reads received bytes. `Ok(Some(n))` with `n > 0` is data, `Ok(Some(0))` is the end of the
    /// peer's stream (after every byte), `Ok(None)` means nothing yet.
    ///
    /// # Errors
    /// The session's failure, once every byte received before it was read.
    pub fn read(&mut self, buf: &mut [u8]) -> Result<Option<usize>, SessionError> {
        if !self.recv.is_empty() {
            if buf.is_empty() {
                return Ok(Some(0));
            }
            return Ok(Some(self.recv.read_into(buf)));
        }
        if self.peer_fin.is_some() {
            return Ok(Some(0));
        }
        match &self.failed {
            Some(e) => Err(e.clone()),
            None => Ok(None),
        }
    }

    /// Like [`Session::read`], handing the received bytes to `drain` (for example a vectored
    /// socket write), which returns how many it took. `Ok(Some(Ok(0)))` is the end of the
    /// peer's stream (`drain` is not called then), `Ok(None)` means nothing yet.
    ///
    /// # Errors
    /// As [`Session::read`]; `drain`'s own error is returned inside `Ok(Some(..))`.
    pub fn read_with<E>(
        &mut self,
        drain: impl FnOnce(&[std::io::IoSlice<'_>]) -> Result<usize, E>,
    ) -> Result<Option<Result<usize, E>>, SessionError> {
        if !self.recv.is_empty() {
            return Ok(Some(self.recv.read_with(drain)));
        }
        if self.peer_fin.is_some() {
            return Ok(Some(Ok(0)));
        }
        match &self.failed {
            Some(e) => Err(e.clone()),
            None => Ok(None),
        }
    }

    /// Bytes received and not yet read.
    pub fn readable(&self) -> usize {
        self.recv.len()
    }

    /// True when the driver should read more from the socket.
    pub fn wants_input(&self) -> bool {
        self.recv.len() < self.cfg.recv_window
    }

    /// Ends the program's stream: a FIN follows the last written byte.
    pub fn shutdown(&mut self) {
        if self.fin.is_none() {
            self.fin = Some(self.send.end());
        }
    }

    /// True once the program shut down writing.
    pub fn is_shut_down(&self) -> bool {
        self.fin.is_some()
    }

    /// True once the peer acknowledged our FIN (every byte we wrote was delivered).
    pub fn fin_acked(&self) -> bool {
        self.fin_acked
    }

    /// True once the peer's FIN arrived.
    pub fn peer_finished(&self) -> bool {
        self.peer_fin.is_some()
    }

    /// True when both directions have ended and every byte was acknowledged.
    pub fn is_finished(&self) -> bool {
        self.fin_acked && self.peer_fin.is_some()
    }

    /// Ends the session locally. The error is returned to the program's reads and writes, and a
    /// CLOSE frame with `code` is queued for the peer if a link is up.
    pub fn close(&mut self, code: CloseCode, err: SessionError) {
        if self.failed.is_none() {
            self.close_to_send = Some((code, err.to_string()));
            self.failed = Some(err);
        }
    }

    /// The error that ended the session, if any.
    pub fn failure(&self) -> Option<&SessionError> {
        self.failed.as_ref()
    }

    // ---- link side ----------------------------------------------------------------------

    /// Stream positions of the peer's stream received so far (a FIN counts as one position).
    pub fn received_offset(&self) -> u64 {
        self.recv.end() + u64::from(self.peer_fin.is_some())
    }

    /// The number of the next resume attempt (client): 1, 2, 3… for the session's life. The
    /// server refuses a resume hello whose number it has already seen (a replay).
    pub fn next_resume_attempt(&mut self) -> u64 {
        self.attempts += 1;
        self.attempts
    }

    /// The ticket to resume with (client).
    pub fn ticket(&self) -> Option<&Ticket> {
        self.tickets.first()
    }

    /// Stores the first ticket that the handshake delivered (the first connection's reply
    /// carries it, see [`ClientDone::ticket`](crate::proto::handshake::ClientDone::ticket) and
    /// [`ServerAccept::ticket`](crate::proto::ServerAccept::ticket)), so the session can be
    /// resumed from its first byte. No TICKET frame is sent for it and no TICKET_ACK is due.
    /// Emits [`Event::TicketReceived`] (client) or [`Event::TicketIssued`] (server). Call it after
    /// [`Session::attach`] of the first link (attaching retires the server's other tickets).
    pub fn adopt_ticket(&mut self, ticket: Ticket) {
        debug_assert!(self.link.is_some(), "adopt_ticket before attach");
        match self.role {
            Role::Client => {
                self.tickets.clear();
                self.tickets.push(ticket);
                self.events.push_back(Event::TicketReceived);
            }
            Role::Server => {
                self.events.push_back(Event::TicketIssued(ticket.resume_id));
                self.tickets.push(ticket);
            }
        }
    }

    /// The secret for `resume_id` if it is one of this session's live tickets (server).
    pub fn ticket_secret(&self, resume_id: &[u8; RESUME_ID_LEN]) -> Option<&Ticket> {
        self.tickets.iter().find(|t| &t.resume_id == resume_id)
    }

    /// True while a real connection is attached.
    pub fn is_linked(&self) -> bool {
        self.link.is_some()
    }

    /// End of this side's stream so far (a FIN counts as one position).
    pub fn written_offset(&self) -> u64 {
        self.send.end() + u64::from(self.fin.is_some())
    }

    /// Plugs in a real connection after a handshake confirmed it.
    ///
    /// `peer_received` is how much of our stream the peer holds (0 on a first connection).
    /// On the server, `used` is the resume id the client used and `new_ticket` the ticket to
    /// issue: the server keeps only those two.
    ///
    /// A `peer_received` below what the peer has already acknowledged is taken as that ACK.
    ///
    /// # Errors
    /// [`SessionError::BadResume`] if `peer_received` is beyond what this end has written: the
    /// session is then failed, with a CLOSE(Protocol) queued on the new link.
    pub fn attach(
        &mut self,
        now: Instant,
        transport: Transport,
        peer_received: u64,
        used: Option<[u8; RESUME_ID_LEN]>,
        new_ticket: Option<Ticket>,
    ) -> Result<Attached, SessionError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        // Below what the peer already acknowledged: its offsets were taken before that ACK (a
        // hello that raced a live link). It has those positions; resend from the ACK.
        let peer_received = peer_received.max(self.send.start());
        self.link = Some(Link { transport, last_recv: now, last_send: now, last_ping: now, live: Liveness::new(now) });
        if peer_received > self.written_offset() {
            // The peer claims positions never written: nothing can repair that. The CLOSE that
            // says so goes out on this new link.
            let e = SessionError::BadResume("the peer claims to have received positions never written");
            self.close(CloseCode::Protocol, e.clone());
            return Err(e);
        }
        self.apply_ack(peer_received);
        self.transmitted = self.transmitted.max(self.sent);
        self.sent = peer_received;
        self.ack_sent = 0;
        self.ack_sent_at = None;
        self.ack_due = Some(now); // the first frame on a link is always an ACK
        self.pong_due = false;
        self.ticket_to_send = None;
        if self.role == Role::Server {
            let retired: Vec<_> =
                self.tickets.iter().filter(|t| Some(t.resume_id) != used).map(|t| t.resume_id).collect();
            self.tickets.retain(|t| Some(t.resume_id) == used);
            self.events.extend(retired.into_iter().map(Event::TicketRetired));
            if let Some(t) = new_ticket {
                self.events.push_back(Event::TicketIssued(t.resume_id));
                self.ticket_to_send = Some(t.clone());
                self.tickets.push(t);
            }
        }
        Ok(Attached { replayed: self.written_offset() - peer_received })
    }

    /// Unplugs the real connection (it failed or was replaced). Nothing in the stream is lost.
    pub fn detach(&mut self) {
        self.link = None;
        self.probe_due = false; // a probe of this link; a new one has nothing to probe yet
        self.ack_due = None;
        self.pong_due = false;
        self.ticket_ack_to_send = None;
        self.scratch = Zeroizing::new(Vec::new());
        self.send.shrink();
        self.recv.shrink();
    }

    /// Handles one record body received on the current link.
    ///
    /// # Errors
    /// A link fault ([`SessionError::is_link_fault`]): the driver must drop the connection and
    /// resume. Or [`SessionError::PeerClosed`], which ends the session.
    pub fn handle_record(&mut self, now: Instant, body: &[u8]) -> Result<(), SessionError> {
        if body.len() > MAX_FRAME + TAG_LEN {
            return Err(SessionError::Protocol("record larger than the largest frame"));
        }
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        scratch.extend_from_slice(body);
        let res = self.handle_record_in_place(now, &mut scratch);
        self.scratch = scratch;
        res
    }

    /// Like [`Session::handle_record`], decrypting `body` where it lies (the driver's read
    /// buffer): no copy before the plaintext reaches the receive buffer. Afterwards the plaintext
    /// part of `body` is zeroed (the rest is unspecified).
    ///
    /// # Errors
    /// As [`Session::handle_record`].
    pub fn handle_record_in_place(&mut self, now: Instant, body: &mut [u8]) -> Result<(), SessionError> {
        let link = self.link.as_mut().ok_or(SessionError::Protocol("record without a link"))?;
        if body.len() > MAX_FRAME + TAG_LEN {
            return Err(SessionError::Protocol("record larger than the largest frame"));
        }
        let n = link.transport.open_in_place(body)?;
        link.last_recv = now;
        if link.live.heard(now) {
            self.events.push_back(Event::Healthy);
        }
        let res = self.handle_frame(now, &body[..n]);
        // The plaintext now lives in the receive buffer (which wipes it when released); what
        // is left in the caller's buffer is wiped here.
        super::buffer::wipe_bytes(&mut body[..n]);
        res
    }

    /// Handles one decrypted frame. The driver calls this directly only for the key-confirmation
    /// record it decrypted itself before [`Session::attach`].
    ///
    /// # Errors
    /// As [`Session::handle_record`].
    pub fn handle_frame(&mut self, now: Instant, plain: &[u8]) -> Result<(), SessionError> {
        match Frame::decode(plain)? {
            Frame::Data { offset, data } => {
                let next = self.recv.end();
                if offset > next {
                    return Err(SessionError::Protocol("DATA offset beyond the next expected byte (a gap)"));
                }
                let end =
                    offset.checked_add(data.len() as u64).ok_or(SessionError::Protocol("DATA offset overflows"))?;
                // Duplicates are ignored even after the FIN: a resume's message 2 may be older
                // than what the old link went on to deliver, FIN included (section 12.2).
                if self.peer_fin.is_some() && end > next {
                    return Err(SessionError::Protocol("DATA past the FIN"));
                }
                if end > next {
                    if let Some(link) = &mut self.link {
                        link.live.data_arrived();
                    }
                    let fresh = &data[(next - offset) as usize..];
                    match self.streams.as_deref_mut() {
                        Some(st) => {
                            if let Err(why) = st.ingest(fresh) {
                                let e = SessionError::StreamProtocol(why);
                                self.close(CloseCode::Protocol, e.clone());
                                return Err(e);
                            }
                            self.recv.skip(fresh.len() as u64);
                        }
                        None => self.recv.push(fresh),
                    }
                    self.schedule_ack(now);
                    self.calm();
                }
            }
            Frame::Ack(v) => {
                // After a resume the peer may acknowledge bytes that reached it on the old link
                // after it answered the hello: they were sent, so skip resending them.
                if v > self.sent.max(self.transmitted) {
                    return Err(SessionError::Protocol("ACK of bytes never sent"));
                }
                self.sent = self.sent.max(v);
                let progress = v > self.send.start();
                self.apply_ack(v);
                if let Some(link) = &mut self.link {
                    let sampled = link.live.acked(now, v, &mut self.rtt);
                    // The first PING once there is a sample to judge its silence by.
                    if sampled && self.rtt_ping.smoothed().is_none() && !link.live.pinging() {
                        self.probe_due = true;
                    }
                }
                if progress {
                    self.calm();
                }
            }
            Frame::Ping => self.pong_due = true,
            Frame::Pong => {
                if let Some(link) = &mut self.link {
                    if let Some(r) = link.live.ponged(now, &mut self.rtt) {
                        self.rtt_ping.sample(r);
                    }
                }
            }
            Frame::Ticket { resume_id, secret } => {
                if self.role != Role::Client {
                    return Err(SessionError::Protocol("TICKET sent to a server"));
                }
                self.tickets.clear();
                self.tickets.push(Ticket { resume_id, secret: Zeroizing::new(*secret) });
                self.ticket_ack_to_send = Some(resume_id);
                self.events.push_back(Event::TicketReceived);
            }
            Frame::TicketAck(id) => {
                if self.role != Role::Server {
                    return Err(SessionError::Protocol("TICKET_ACK sent to a client"));
                }
                if self.tickets.iter().any(|t| t.resume_id == id) {
                    let retired: Vec<_> =
                        self.tickets.iter().filter(|t| t.resume_id != id).map(|t| t.resume_id).collect();
                    self.tickets.retain(|t| t.resume_id == id);
                    self.events.extend(retired.into_iter().map(Event::TicketRetired));
                }
            }
            Frame::Fin(off) => match self.peer_fin {
                Some(f) if f == off => {}
                Some(_) => return Err(SessionError::Protocol("FIN moved")),
                None if off == self.recv.end() => {
                    self.peer_fin = Some(off);
                    if let Some(st) = self.streams.as_deref_mut() {
                        st.peer_ended();
                    }
                    self.schedule_ack(now);
                    self.ack_due = Some(now);
                }
                None => return Err(SessionError::Protocol("FIN offset does not match the data received")),
            },
            Frame::Close { code, reason } => {
                let code = CloseCode::from_u16(code);
                if code == CloseCode::Normal && self.fin.is_some() && self.peer_fin.is_some() {
                    // The peer is done and so are we: treat our FIN as delivered.
                    self.fin_acked = true;
                    self.apply_ack(self.written_offset());
                } else if code == CloseCode::NotAllowed && self.role == Role::Client {
                    self.failed = Some(SessionError::NotAllowed);
                    return Err(SessionError::NotAllowed);
                } else {
                    let e = SessionError::PeerClosed { code, reason: reason.to_string() };
                    self.failed = Some(e.clone());
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    fn schedule_ack(&mut self, now: Instant) {
        if self.received_offset() - self.ack_sent >= self.cfg.ack_threshold {
            let at = self.ack_sent_at.map_or(now, |t| now.max(t + self.cfg.ack_spacing));
            self.ack_due = Some(self.ack_due.map_or(at, |d| d.min(at)));
        } else if self.ack_due.is_none() {
            self.ack_due = Some(now + self.cfg.ack_delay);
        }
    }

    fn apply_ack(&mut self, v: u64) {
        if let Some(f) = self.fin {
            if v > f {
                self.fin_acked = true;
            }
        }
        self.send.release_to(v.min(self.send.end()));
    }

    /// Appends records to send to `out` until it holds at least `budget` bytes or nothing is
    /// left to send now.
    ///
    /// # Errors
    /// [`SessionError::Crypto`] if encryption fails (the link must be dropped).
    pub fn poll_transmit(&mut self, now: Instant, out: &mut Vec<u8>, budget: usize) -> Result<(), SessionError> {
        let Some(link) = self.link.as_mut() else { return Ok(()) };
        if self.failed.is_some() && self.close_to_send.is_none() {
            // The session is over: its CLOSE (if any) was the last record on the link. An ACK
            // still due, a PONG or a PING must not follow it.
            return Ok(());
        }
        let before = out.len();
        let mut seal = |f: Frame<'_>, out: &mut Vec<u8>| -> Result<(), SessionError> {
            link.transport.seal_with(out, |o| f.encode(o)).map_err(SessionError::from)
        };
        let recv_off = self.recv.end() + u64::from(self.peer_fin.is_some());
        if let Some((code, reason)) = self.close_to_send.take() {
            // Acknowledge what arrived first (the peer's FIN above all), so that a lost CLOSE
            // still leaves the peer knowing its stream was delivered.
            if recv_off > self.ack_sent {
                seal(Frame::Ack(recv_off), out)?;
                self.ack_sent = recv_off;
            }
            seal(Frame::Close { code: code.to_u16(), reason: &reason }, out)?;
            link.last_send = now;
            return Ok(());
        }
        // A pending ACK goes out when due, or early when DATA is leaving anyway.
        let sending_data = self.sent < self.send.end();
        if self.ack_due.is_some_and(|d| d <= now || (sending_data && recv_off > self.ack_sent)) {
            seal(Frame::Ack(recv_off), out)?;
            self.ack_sent = recv_off;
            self.ack_sent_at = Some(now);
            self.ack_due = None;
        }
        if std::mem::take(&mut self.pong_due) {
            seal(Frame::Pong, out)?;
        }
        if let Some(t) = self.ticket_to_send.take() {
            seal(Frame::Ticket { resume_id: t.resume_id, secret: &t.secret }, out)?;
        }
        if let Some(id) = self.ticket_ack_to_send.take() {
            seal(Frame::TicketAck(id), out)?;
        }
        if self.fin.is_none() {
            if let Some(st) = self.streams.as_deref_mut().filter(|st| st.has_pending()) {
                let room = (self.cfg.max_buffer + CONTROL_ROOM).saturating_sub(self.send.len());
                st.flush(now, self.rtt.smoothed(), &mut self.send, room);
            }
        }
        let data_from = self.sent;
        while out.len() - before < budget && self.sent < self.send.end() {
            let data = self.send.slice_from(self.sent, MAX_DATA);
            if data.is_empty() {
                break;
            }
            let n = data.len() as u64;
            seal(Frame::Data { offset: self.sent, data }, out)?;
            self.sent += n;
        }
        if let Some(f) = self.fin {
            if self.sent == f {
                seal(Frame::Fin(f), out)?;
                self.sent = f + 1;
            }
        }
        let probe = std::mem::take(&mut self.probe_due);
        // A keepalive when idle; and while busy, one PING per keepalive interval goes out with
        // what is sent anyway, so that the round trip shown stays current (a frame every 5 s).
        let idle = out.len() == before && now >= link.last_send + self.cfg.keepalive;
        let busy = out.len() > before && now >= link.last_ping + self.cfg.keepalive && !link.live.pinging();
        if idle || busy || probe {
            seal(Frame::Ping, out)?;
            link.live.sent_ping(now);
            link.last_ping = now;
        }
        if self.sent > data_from {
            link.live.sent_data(now, self.sent);
        }
        if out.len() > before {
            link.last_send = now;
        }
        Ok(())
    }

    /// True when [`Session::poll_transmit`] would produce something now.
    pub fn has_transmit(&self, now: Instant) -> bool {
        let Some(link) = &self.link else { return false };
        if self.failed.is_some() {
            return self.close_to_send.is_some();
        }
        self.close_to_send.is_some()
            || self.ack_due.is_some_and(|d| d <= now)
            || self.pong_due
            || self.ticket_to_send.is_some()
            || self.ticket_ack_to_send.is_some()
            || self.sent < self.send.end()
            || (self.fin.is_none() && self.streams.as_ref().is_some_and(|st| st.has_pending()))
            || self.fin == Some(self.sent)
            || self.probe_due
            || now >= link.last_send + self.cfg.keepalive
    }

    /// The next instant at which [`Session::handle_timeout`] must be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let link = self.link.as_ref()?;
        let mut t = (link.last_send + self.cfg.keepalive).min(link.last_recv + self.cfg.dead_after);
        if let Some(a) = self.ack_due {
            t = t.min(a);
        }
        if let Some(s) = link.live.deadline(self.suspect_threshold()) {
            t = t.min(s);
        }
        Some(t)
    }

    /// Advances timers: a probe PING when the peer stopped streaming to us, [`Event::Suspect`]
    /// when the link has been silent for the suspicion threshold with something outstanding.
    ///
    /// # Errors
    /// [`SessionError::Dead`] when nothing was received for the dead-peer time: the driver must
    /// drop the connection and resume.
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), SessionError> {
        let reading = self.wants_input();
        let threshold = self.suspect_threshold();
        if let Some(link) = &mut self.link {
            if !reading {
                // The program is not reading, so the driver is not either: silence from the
                // peer proves nothing. Judge liveness again once reading resumes.
                link.last_recv = now;
                link.live.not_reading(now);
                return Ok(());
            }
            let silent = now.saturating_duration_since(link.last_recv);
            if silent >= self.cfg.dead_after {
                return Err(SessionError::Dead(silent));
            }
            match link.live.check(now, threshold) {
                Check::Nothing => {}
                Check::Probe => self.probe_due = true,
                Check::Suspect(quiet) => self.events.push_back(Event::Suspect(quiet)),
            }
        }
        Ok(())
    }

    /// The driver learned that the network changed (an address or route came or went) or that
    /// the machine slept: an attached link is suspect at once ([`Event::PathSuspect`]), since
    /// its path may be gone and no timer has noticed yet.
    pub fn path_changed(&mut self, now: Instant) {
        if self.link.as_mut().and_then(|l| l.live.force_suspect(now)).is_some() {
            self.events.push_back(Event::PathSuspect);
        }
    }

    /// The silence, with something outstanding, after which the link is suspect (see
    /// [`super::rtt`]): `max(4 × smoothed RTT, 250 ms)`, doubled per recent race, at most the
    /// dead-peer time.
    pub fn suspect_threshold(&self) -> Duration {
        threshold(&self.rtt, self.races, self.cfg.dead_after)
    }

    /// The smoothed round trip, once measured by PING → PONG (a round trip after the first
    /// acknowledged DATA, or a keepalive interval into an idle session): what status and
    /// metrics show. DATA → ACK samples are not used for it: the peer may hold an ACK up to its
    /// ack delay (10 ms by default), which would pass for a 10 ms path.
    pub fn rtt(&self) -> Option<Duration> {
        self.rtt_ping.smoothed()
    }

    /// Client: a race (a second connection opened because the link was suspect) was attached.
    /// Until the stream makes progress again, each race doubles the suspicion threshold, so that
    /// a link that is only slow (a peer whose program stopped reading) is raced less and less
    /// often.
    pub fn count_race(&mut self, now: Instant) {
        self.races = self.races.saturating_add(1);
        self.raced_at = Some(now);
    }

    /// Forgets past races once the stream makes progress (an ACK that releases bytes, or new
    /// DATA): the race was needed, the link it left behind was dead. A race after which nothing
    /// moves (a peer whose program stopped reading: the new link is as quiet as the old) keeps
    /// its doubling.
    fn calm(&mut self) {
        if self.raced_at.take().is_some() {
            self.races = 0;
        }
    }

    /// The next event for the driver.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Server: the ids of all live tickets.
    pub fn ticket_ids(&self) -> impl Iterator<Item = [u8; RESUME_ID_LEN]> + '_ {
        self.tickets.iter().map(|t| t.resume_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::Keypair;
    use crate::proto::handshake::{respond, ClientHandshake};
    use crate::proto::Cipher;

    fn linked(cfg: SessionConfig, now: Instant) -> (Session, Transport) {
        let (c, s) = (Keypair::generate(), Keypair::generate());
        let (hs, hello) = ClientHandshake::initial(&c.private, &s.public, Cipher::ChaChaPoly, 1).unwrap();
        let acc = respond(&hello, &s.private, |_| true, |_| None).unwrap();
        let mut client = Session::new(Role::Client, cfg);
        client.attach(now, hs.read_reply(&acc.reply).unwrap().transport, 0, None, None).unwrap();
        (client, acc.transport)
    }

    #[test]
    fn plaintext_decrypted_in_the_callers_buffer_is_wiped() {
        let now = Instant::now();
        let (mut client, mut server_t) = linked(SessionConfig::default(), now);
        let secret = [0x5au8; 3000];
        let mut rec = Vec::new();
        server_t.seal_with(&mut rec, |o| Frame::Data { offset: 0, data: &secret }.encode(o)).unwrap();
        let body = &mut rec[super::super::frame::RECORD_HEADER..];
        client.handle_record_in_place(now, body).unwrap();
        let plain_len = body.len() - TAG_LEN;
        assert!(body[..plain_len].iter().all(|&b| b == 0), "plaintext left in the read buffer");
        let mut got = [0u8; 3000];
        assert_eq!(client.read(&mut got), Ok(Some(3000)));
        assert_eq!(got, secret);
    }

    #[test]
    fn silence_while_the_program_does_not_read_is_not_death() {
        let t0 = Instant::now();
        let cfg = SessionConfig { recv_window: 100, ..SessionConfig::default() };
        let dead = cfg.dead_after;
        let (mut client, mut server) = linked(cfg, t0);
        // Fill the client's receive buffer past its window: the driver stops reading.
        let mut rec = Vec::new();
        let mut plain = Vec::new();
        Frame::Data { offset: 0, data: &[1u8; 200] }.encode(&mut plain);
        server.seal(&plain, &mut rec).unwrap();
        client.handle_record(t0, &rec[2..]).unwrap();
        assert!(!client.wants_input());
        assert_eq!(client.handle_timeout(t0 + dead * 3), Ok(()));
        // Once the program reads, silence counts again.
        let mut buf = [0u8; 200];
        assert_eq!(client.read(&mut buf), Ok(Some(200)));
        let later = t0 + dead * 3;
        assert_eq!(client.handle_timeout(later + dead / 2), Ok(()));
        assert!(matches!(client.handle_timeout(later + dead), Err(SessionError::Dead(_))));
    }
}

#[cfg(test)]
mod resume_ack_tests {
    use super::*;
    use crate::keys::Keypair;
    use crate::proto::frame::split_record;
    use crate::proto::handshake::{respond, ClientHandshake, ResumeLookup};
    use crate::proto::Cipher;

    fn feed(s: &mut Session, now: Instant, mut wire: &[u8]) -> Result<(), SessionError> {
        while let Some((body, used)) = split_record(wire) {
            s.handle_record(now, body)?;
            wire = &wire[used..];
        }
        Ok(())
    }

    /// The server answers a resume hello with its received offset, then the old link delivers
    /// more. Its first ACK on the new link covers bytes the client sent on the old link and has
    /// not resent yet: that is not a protocol error, and the client skips resending them.
    #[test]
    fn ack_of_bytes_sent_on_the_old_link_is_accepted_after_a_resume() {
        let now = Instant::now();
        let (c, s) = (Keypair::generate(), Keypair::generate());
        let mut client = Session::new(Role::Client, SessionConfig::default());
        let mut server = Session::new(Role::Server, SessionConfig::default());
        let (hs, hello) = ClientHandshake::initial(&c.private, &s.public, Cipher::ChaChaPoly, 1).unwrap();
        let acc = respond(&hello, &s.private, |_| true, |_| None).unwrap();
        client.attach(now, hs.read_reply(&acc.reply).unwrap().transport, 0, None, None).unwrap();
        server.attach(now, acc.transport, 0, None, Some(Ticket::generate())).unwrap();
        let mut out = Vec::new();
        client.poll_transmit(now, &mut out, usize::MAX).unwrap();
        feed(&mut server, now, &out).unwrap();
        out.clear();
        server.poll_transmit(now, &mut out, usize::MAX).unwrap();
        feed(&mut client, now, &out).unwrap();

        let data: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
        assert_eq!(client.write(&data), Ok(data.len()));
        let mut wire = Vec::new();
        client.poll_transmit(now, &mut wire, usize::MAX).unwrap();
        // The server has read only the first few records when the resume hello arrives.
        let mut pos = 0;
        for _ in 0..6 {
            let (body, used) = split_record(&wire[pos..]).unwrap();
            server.handle_record(now, body).unwrap();
            pos += used;
        }
        client.detach();
        let t = client.ticket().unwrap().clone();
        let (hs, hello) = ClientHandshake::resume(
            &c.private,
            &s.public,
            &t,
            1,
            (client.received_offset(), client.written_offset()),
            Cipher::ChaChaPoly,
        )
        .unwrap();
        let (x, w) = (server.received_offset(), server.written_offset());
        let lookup =
            |_: &[u8; 16]| Some(ResumeLookup { client: c.public, psk: t.secret.clone(), received: x, written: w });
        let acc = respond(&hello, &s.private, |_| true, lookup).unwrap();
        // Meanwhile the old link delivers the rest.
        feed(&mut server, now, &wire[pos..]).unwrap();
        assert_eq!(server.received_offset(), data.len() as u64);

        let done = hs.read_reply(&acc.reply).unwrap();
        client.attach(now, done.transport, done.server_received.unwrap(), None, None).unwrap();
        let mut first = Vec::new();
        client.poll_transmit(now, &mut first, 64 << 10).unwrap(); // less than the gap
        let mut st = acc.transport;
        let (body, used) = split_record(&first).unwrap();
        let mut confirm = vec![0u8; body.len()];
        let n = st.open(body, &mut confirm).unwrap();
        server.detach();
        server.attach(now, st, client.received_offset(), Some(t.resume_id), Some(Ticket::generate())).unwrap();
        server.handle_frame(now, &confirm[..n]).unwrap();
        feed(&mut server, now, &first[used..]).unwrap();
        out.clear();
        server.poll_transmit(now, &mut out, usize::MAX).unwrap();
        assert_eq!(feed(&mut client, now, &out), Ok(()), "the server's ACK covers bytes sent on the old link");
        assert_eq!(client.unacked(), 0);

        // The stream goes on: new bytes are sent from the right offset, nothing is resent twice.
        assert_eq!(client.write(b"more"), Ok(4));
        out.clear();
        client.poll_transmit(now, &mut out, usize::MAX).unwrap();
        feed(&mut server, now, &out).unwrap();
        let mut got = vec![0u8; data.len() + 16];
        let mut total = 0;
        while let Ok(Some(k)) = server.read(&mut got[total..]) {
            if k == 0 {
                break;
            }
            total += k;
        }
        assert_eq!(&got[..total - 4], &data[..]);
        assert_eq!(&got[total - 4..total], b"more");
    }

    /// Frames in a run of records, opened with the peer's transport.
    fn frames_of(t: &mut Transport, mut wire: &[u8]) -> Vec<String> {
        let mut v = Vec::new();
        while let Some((body, used)) = split_record(wire) {
            let mut plain = vec![0u8; body.len()];
            let n = t.open(body, &mut plain).unwrap();
            v.push(format!("{:?}", Frame::decode(&plain[..n]).unwrap()));
            wire = &wire[used..];
        }
        v
    }

    /// PROTOCOL.md section 17, step 3: a finished end sends the ACK of the peer's FIN, then its
    /// CLOSE, and nothing after the CLOSE, however often the driver polls (it used to repeat the
    /// ACK after the CLOSE when the peer's FIN had scheduled one).
    #[test]
    fn nothing_follows_the_close() {
        let now = Instant::now();
        let (c, s) = (Keypair::generate(), Keypair::generate());
        let (hs, hello) = ClientHandshake::initial(&c.private, &s.public, Cipher::ChaChaPoly, 1).unwrap();
        let acc = respond(&hello, &s.private, |_| true, |_| None).unwrap();
        let mut session = Session::new(Role::Client, SessionConfig::default());
        session.attach(now, hs.read_reply(&acc.reply).unwrap().transport, 0, None, None).unwrap();
        let mut peer = acc.transport;
        let mut out = Vec::new();
        session.shutdown();
        session.poll_transmit(now, &mut out, usize::MAX).unwrap();
        assert_eq!(frames_of(&mut peer, &out), ["Ack(0)", "Fin(0)"]);
        // The peer acknowledges our FIN, then ends its own stream: we are finished.
        let mut wire = Vec::new();
        peer.seal_with(&mut wire, |o| Frame::Ack(1).encode(o)).unwrap();
        peer.seal_with(&mut wire, |o| Frame::Fin(0).encode(o)).unwrap();
        feed(&mut session, now, &wire).unwrap();
        assert!(session.is_finished());
        session.close(CloseCode::Normal, SessionError::Finished);
        out.clear();
        session.poll_transmit(now, &mut out, usize::MAX).unwrap();
        let close = format!("{:?}", Frame::Close { code: 0, reason: "session finished" });
        assert_eq!(frames_of(&mut peer, &out), ["Ack(1)".to_string(), close]);
        let later = now + Duration::from_secs(60);
        assert!(!session.has_transmit(later), "something is due after the CLOSE");
        out.clear();
        session.poll_transmit(now, &mut out, usize::MAX).unwrap();
        session.poll_transmit(later, &mut out, usize::MAX).unwrap();
        assert_eq!(frames_of(&mut peer, &out), Vec::<String>::new(), "records after the CLOSE");
    }
}
