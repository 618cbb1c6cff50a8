//! Harness shared by the cargo-fuzz targets in `fuzz/fuzz_targets/` (all but `config`, which
//! includes the command-line program's parser itself) and by the stable property
//! tests in `tests/security.rs` (which include this file with `#[path]`), so CI runs the same
//! entry points as the fuzzers.
//!
//! Every function takes untrusted input and panics only when it finds a bug: a crash, a broken
//! round trip, an accepted forgery, a lost or duplicated byte, or a session that would spin.
//! Keys and ephemeral keys are fixed so that every input replays exactly.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use arbitrary::{Arbitrary, Unstructured};
use holdfast::keys::{Keypair, PrivateKey};
use holdfast::proto::frame::{push_record, split_record, MAX_DATA, RECORD_HEADER, RESUME_ID_LEN, SECRET_LEN};
use holdfast::proto::handshake::{self, ClientDone, ClientHandshake, Hello, ResumeLookup, MAX_HANDSHAKE};
use holdfast::proto::transport::TAG_LEN;
use holdfast::proto::{Cipher, Frame, Role, Session, SessionConfig, SessionError, Ticket, Transport};
use zeroize::Zeroizing;

/// The fixed parties of every harness.
pub struct Keys {
    /// The client's static key pair.
    pub client: Keypair,
    /// The server's static key pair.
    pub server: Keypair,
}

/// Fixed keys, derived once.
pub fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| Keys {
        client: Keypair::from_private(PrivateKey::from_bytes([0x11; 32])),
        server: Keypair::from_private(PrivateKey::from_bytes([0x22; 32])),
    })
}

const CLIENT_EPHEMERAL: [u8; 32] = [0x33; 32];
const SERVER_EPHEMERAL: [u8; 32] = [0x44; 32];
/// The resume id the server harness knows.
pub const KNOWN_ID: [u8; RESUME_ID_LEN] = [0x55; RESUME_ID_LEN];
const KNOWN_SECRET: [u8; SECRET_LEN] = [0x66; SECRET_LEN];

/// The ticket the server harness knows.
pub fn known_ticket() -> Ticket {
    Ticket { resume_id: KNOWN_ID, secret: Zeroizing::new(KNOWN_SECRET) }
}

fn lookup_known(id: &[u8; RESUME_ID_LEN]) -> Option<ResumeLookup> {
    (id == &KNOWN_ID).then(|| ResumeLookup {
        client: keys().client.public,
        psk: Zeroizing::new(KNOWN_SECRET),
        received: 10,
        written: 20,
    })
}

/// A valid client hello: `resume` picks KKpsk0 with the known ticket, else IK.
pub fn valid_hello(resume: bool) -> (ClientHandshake, Vec<u8>) {
    let k = keys();
    let r = if resume {
        ClientHandshake::resume_with(
            &k.client.private,
            &k.server.public,
            &known_ticket(),
            1,
            (7, 9),
            Cipher::ChaChaPoly,
            Some(&CLIENT_EPHEMERAL),
        )
    } else {
        ClientHandshake::initial_with(
            &k.client.private,
            &k.server.public,
            Cipher::ChaChaPoly,
            1,
            Some(&CLIENT_EPHEMERAL),
        )
    };
    r.expect("valid keys")
}

fn server_respond(body: &[u8]) -> Result<handshake::ServerAccept, handshake::HandshakeError> {
    let k = keys();
    let allowed = |c: &holdfast::keys::PublicKey| *c == k.client.public;
    handshake::respond_with(
        body,
        &k.server.private,
        allowed,
        lookup_known,
        Some(&SERVER_EPHEMERAL),
        Some(known_ticket()),
    )
}

/// Applies `(position, xor)` edits and an optional cut to `msg`. Returns true if it changed.
fn mutate(msg: &mut Vec<u8>, edits: &[u8]) -> bool {
    let before = msg.clone();
    let mut it = edits.chunks_exact(2);
    for pair in &mut it {
        if msg.is_empty() {
            break;
        }
        let at = usize::from(pair[0]) % msg.len();
        msg[at] ^= pair[1];
    }
    if let [cut] = it.remainder() {
        let keep = usize::from(*cut) % (msg.len() + 1);
        msg.truncate(keep);
    }
    *msg != before
}

/// Checks that both ends of a finished handshake hold matching transports.
fn check_transports(client: &mut Transport, server: &mut Transport) {
    fn one_way(a: &mut Transport, b: &mut Transport) {
        let mut rec = Vec::new();
        a.seal(b"\x03", &mut rec).expect("seal");
        let (body, _) = split_record(&rec).expect("whole record");
        let mut out = [0u8; 64];
        let n = b.open(body, &mut out).expect("the peer opens what was sealed");
        assert_eq!(&out[..n], b"\x03");
    }
    one_way(client, server);
    one_way(server, client);
}

// ---- frame_decode ------------------------------------------------------------------------

/// Frame codec: decodes `data` as one frame and as a stream of records. Every frame that
/// decodes must re-encode to exactly its input, and record splitting must account for every
/// byte.
pub fn frame_decode(data: &[u8]) {
    roundtrip_frame(data);
    let mut rest = data;
    while let Some((body, used)) = split_record(rest) {
        assert_eq!(used, RECORD_HEADER + body.len());
        let mut again = Vec::new();
        push_record(&mut again, body);
        assert_eq!(again, &rest[..used], "record re-encoding differs");
        roundtrip_frame(body);
        rest = &rest[used..];
    }
    if let [a, b, tail @ ..] = rest {
        assert!(usize::from(u16::from_be_bytes([*a, *b])) > tail.len(), "a whole record was left unsplit");
    }
}

fn roundtrip_frame(data: &[u8]) {
    if let Ok(frame) = Frame::decode(data) {
        let mut out = Vec::new();
        frame.encode(&mut out);
        assert_eq!(out, data, "{frame:?} does not re-encode to its input");
        if let Frame::Data { data, .. } = frame {
            assert!(!data.is_empty() && data.len() <= MAX_DATA);
        }
    }
}

// ---- server_hello ------------------------------------------------------------------------

/// Server side of both handshakes. `data[0]` picks the mode: raw bytes as the hello, or a valid
/// IK or KKpsk0 hello with the rest of `data` applied as edits. A valid hello must be accepted
/// and complete with the client; any edit of one must be refused.
pub fn server_hello(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    match mode % 3 {
        0 => {
            if let Ok(acc) = server_respond(rest) {
                // Only a genuine hello from the allowed key can get here (it decrypted).
                assert!(acc.reply.len() <= MAX_HANDSHAKE + 1);
                match acc.hello {
                    Hello::Initial { client, .. } => assert_eq!(client, keys().client.public),
                    Hello::Resume { resume_id, .. } => assert_eq!(resume_id, KNOWN_ID),
                }
            }
        }
        m => {
            let resume = m == 2;
            let (hs, mut hello) = valid_hello(resume);
            let changed = mutate(&mut hello, rest);
            let res = server_respond(&hello);
            if changed {
                assert!(res.is_err(), "an edited hello was accepted");
                return;
            }
            let mut acc = res.expect("a valid hello is accepted");
            let mut done = hs.read_reply(&acc.reply).expect("the client accepts the genuine reply");
            check_transports(&mut done.transport, &mut acc.transport);
            if resume {
                assert_eq!((done.server_received, done.server_written), (Some(10), Some(20)));
                assert_eq!(
                    acc.hello,
                    Hello::Resume { resume_id: KNOWN_ID, attempt: 1, client_received: 7, client_written: 9 }
                );
            }
        }
    }
}

// ---- client_reply ------------------------------------------------------------------------

/// Client side of both handshakes. `data[0]` picks IK or KKpsk0 and whether the rest of `data`
/// is the raw reply or edits applied to the server's genuine reply. Edited replies must fail.
pub fn client_reply(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    let resume = mode & 1 == 1;
    let (hs, hello) = valid_hello(resume);
    if mode & 2 == 0 {
        if let Ok(done) = hs.read_reply(rest) {
            check_done(&done, resume);
        }
        return;
    }
    let mut acc = server_respond(&hello).expect("a valid hello is accepted");
    let mut reply = acc.reply.clone();
    let changed = mutate(&mut reply, rest);
    match hs.read_reply(&reply) {
        Ok(mut done) => {
            assert!(!changed, "an edited reply was accepted");
            check_done(&done, resume);
            check_transports(&mut done.transport, &mut acc.transport);
        }
        Err(e) => assert!(changed, "the genuine reply was refused: {e}"),
    }
}

fn check_done(done: &ClientDone, resume: bool) {
    assert_eq!(done.server_received.is_some(), resume);
    assert_eq!(done.server_written.is_some(), resume);
}

// ---- session_events ----------------------------------------------------------------------

/// New links (handshakes) one input may make: each costs eight X25519 operations, so more
/// would only slow the fuzzer down without reaching new states.
const MAX_LINKS: u8 = 6;

/// Small buffers so that backpressure, windows and multi-record flights happen quickly.
fn small_config() -> SessionConfig {
    SessionConfig {
        max_buffer: 48 * 1024,
        recv_window: 24 * 1024,
        keepalive: Duration::from_millis(500),
        dead_after: Duration::from_millis(1500),
        ack_delay: Duration::from_millis(10),
        ack_threshold: 8 * 1024,
        ack_spacing: Duration::from_millis(1),
    }
}

/// Byte `i` of the stream written by one side.
fn pattern(side: u8, i: u64) -> u8 {
    (i.wrapping_mul(0x9E37_79B9) >> 11) as u8 ^ side.wrapping_mul(0x5b) ^ (i as u8)
}

/// Which side of the pair.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The client session.
    Client,
    /// The server session.
    Server,
}

/// One step of an honest pair's life over an unreliable network.
#[derive(Arbitrary, Debug)]
pub enum PairOp {
    /// The program writes up to `len` bytes on `side`.
    Write(Side, u16),
    /// The program reads up to `len` bytes on `side`.
    Read(Side, u16),
    /// The program shuts down writing on `side`.
    Shutdown(Side),
    /// `from` transmits up to `budget` bytes; the first `keep` records arrive, and if any
    /// record is lost the connection is dead (TCP loses nothing on a live connection).
    Flow {
        /// The sender.
        from: Side,
        /// Transmit budget.
        budget: u16,
        /// Records delivered.
        keep: u8,
    },
    /// Like `Flow`, but the first record has one bit flipped on the way.
    Corrupt {
        /// The sender.
        from: Side,
        /// Which bit of the record body.
        bit: u16,
    },
    /// Time passes.
    Advance(u16),
    /// The real connection fails.
    Fault,
    /// The client reconnects and resumes (with its ticket, if it has one).
    Resume,
}

/// A session under the harness with the model of what it has written and read.
struct End {
    s: Session,
    side: u8,
    written: u64,
    read: u64,
    shut: bool,
}

impl End {
    fn write(&mut self, len: u16) {
        let data: Vec<u8> = (0..u64::from(len)).map(|i| pattern(self.side, self.written + i)).collect();
        match self.s.write(&data) {
            Ok(n) => self.written += n as u64,
            Err(SessionError::WriteAfterShutdown) => assert!(self.shut),
            Err(e) => panic!("honest write failed: {e}"),
        }
    }

    /// Reads and checks bytes against what the peer wrote; true at end of stream.
    fn read(&mut self, len: u16, peer_side: u8, peer_written: u64, peer_shut: bool) -> bool {
        let mut buf = vec![0u8; usize::from(len)];
        match self.s.read(&mut buf) {
            Ok(Some(0)) if !buf.is_empty() => {
                assert!(peer_shut && self.read == peer_written, "EOF before every byte");
                true
            }
            Ok(Some(n)) => {
                for (k, b) in buf[..n].iter().enumerate() {
                    assert_eq!(*b, pattern(peer_side, self.read + k as u64), "wrong byte at {}", self.read + k as u64);
                }
                self.read += n as u64;
                assert!(self.read <= peer_written, "read more than the peer wrote");
                false
            }
            Ok(None) => false,
            Err(e) => panic!("honest read failed: {e}"),
        }
    }
}

struct Pair {
    now: Instant,
    c: End,
    s: End,
    linked: bool,
    tickets: u8,
    links: u8,
}

impl Pair {
    fn new() -> Self {
        let mut p = Pair {
            now: Instant::now(),
            c: End { s: Session::new(Role::Client, small_config()), side: 1, written: 0, read: 0, shut: false },
            s: End { s: Session::new(Role::Server, small_config()), side: 2, written: 0, read: 0, shut: false },
            linked: false,
            tickets: 0,
            links: 1,
        };
        let (hs, hello) = valid_hello(false);
        let acc = server_respond(&hello).expect("hello");
        let done = hs.read_reply(&acc.reply).expect("reply");
        // The first ticket rides in the reply; both ends adopt it (no TICKET frame).
        p.s.s.attach(p.now, acc.transport, 0, None, None).expect("server attach");
        p.s.s.adopt_ticket(acc.ticket.expect("the IK reply carries a ticket"));
        p.c.s.attach(p.now, done.transport, 0, None, None).expect("client attach");
        p.c.s.adopt_ticket(done.ticket.expect("the IK reply carries a ticket"));
        p.linked = true;
        p
    }

    fn next_ticket(&mut self) -> Ticket {
        self.tickets = self.tickets.wrapping_add(1);
        Ticket { resume_id: [self.tickets; RESUME_ID_LEN], secret: Zeroizing::new([self.tickets ^ 0xa5; SECRET_LEN]) }
    }

    fn ends(&mut self, from: Side) -> (&mut End, &mut End) {
        match from {
            Side::Client => (&mut self.c, &mut self.s),
            Side::Server => (&mut self.s, &mut self.c),
        }
    }

    fn cut(&mut self) {
        self.c.s.detach();
        self.s.s.detach();
        self.linked = false;
        while self.s.s.poll_event().is_some() {}
        while self.c.s.poll_event().is_some() {}
    }

    /// The rotation invariant: a ticket the client holds is always one the server accepts.
    fn check_tickets(&mut self) {
        while self.s.s.poll_event().is_some() {}
        while self.c.s.poll_event().is_some() {}
        if let Some(t) = self.c.s.ticket() {
            let known = self.s.s.ticket_secret(&t.resume_id).expect("the client holds a ticket the server forgot");
            assert_eq!(*known.secret, *t.secret);
        }
        assert!(self.s.s.ticket_ids().count() <= 2, "the server keeps more than two tickets");
    }

    /// Transmits from `from`; delivers `keep` records (all if `None`), optionally corrupting
    /// bit `flip` of the first. Returns how many records there were.
    fn flow(&mut self, from: Side, budget: usize, keep: Option<usize>, flip: Option<usize>) -> usize {
        if !self.linked {
            return 0;
        }
        let now = self.now;
        let (a, b) = self.ends(from);
        let mut out = Vec::new();
        a.s.poll_transmit(now, &mut out, budget).expect("honest seal");
        if budget == usize::MAX {
            // After a full flight a session must not want to transmit, nor ask to be woken in
            // the past: its driver would spin.
            assert!(!a.s.has_transmit(now), "still wants to transmit after a full flight");
            if let Some(t) = a.s.poll_timeout() {
                assert!(t > now, "next deadline is not in the future");
            }
        }
        let mut rest = &out[..];
        let mut count = 0;
        let mut lost = false;
        while let Some((body, used)) = split_record(rest) {
            rest = &rest[used..];
            count += 1;
            if keep.is_some_and(|k| count > k) {
                lost = true;
                continue;
            }
            let mut body = body.to_vec();
            if let (1, Some(bit)) = (count, flip) {
                let at = (bit / 8) % body.len();
                body[at] ^= 1 << (bit % 8);
                let err = b.s.handle_record(now, &body).expect_err("a corrupted record was accepted");
                assert!(err.is_link_fault(), "corruption must only cost the link: {err}");
                lost = true;
                break;
            }
            b.s.handle_record(now, &body).expect("an honest record was refused");
        }
        assert!(lost || rest.is_empty(), "poll_transmit produced a partial record");
        if lost {
            self.cut();
        }
        self.check_tickets();
        count
    }

    fn advance(&mut self, ms: u16) {
        self.now += Duration::from_millis(u64::from(ms % 4000));
        if !self.linked {
            return;
        }
        let now = self.now;
        let dead = self.c.s.handle_timeout(now).is_err() | self.s.s.handle_timeout(now).is_err();
        if dead {
            self.cut();
            return;
        }
        self.flow(Side::Client, usize::MAX, None, None);
        self.flow(Side::Server, usize::MAX, None, None);
    }

    fn resume(&mut self) {
        self.cut();
        let k = keys();
        let now = self.now;
        let (c_recv, c_written) = (self.c.s.received_offset(), self.c.s.written_offset());
        let (s_transport, c_transport, client_received, server_received, used) = match self.c.s.ticket().cloned() {
            Some(t) => {
                let (hs, hello) = ClientHandshake::resume_with(
                    &k.client.private,
                    &k.server.public,
                    &t,
                    1,
                    (c_recv, c_written),
                    Cipher::AesGcm,
                    Some(&CLIENT_EPHEMERAL),
                )
                .expect("resume hello");
                let server = &self.s.s;
                let lookup = |id: &[u8; RESUME_ID_LEN]| {
                    server.ticket_secret(id).map(|t| ResumeLookup {
                        client: k.client.public,
                        psk: t.secret.clone(),
                        received: server.received_offset(),
                        written: server.written_offset(),
                    })
                };
                let acc = handshake::respond_with(
                    &hello,
                    &k.server.private,
                    |_| false,
                    lookup,
                    Some(&SERVER_EPHEMERAL),
                    None,
                )
                .expect("the server resumes with the client's ticket");
                let Hello::Resume { client_received, client_written, .. } = acc.hello else { panic!("not a resume") };
                assert_eq!((client_received, client_written), (c_recv, c_written));
                let done = hs.read_reply(&acc.reply).expect("resume reply");
                let server_received = done.server_received.expect("offsets");
                (acc.transport, done.transport, client_received, server_received, Some(t.resume_id))
            }
            None => {
                // No ticket (cannot happen since the first ticket rides in the IK reply; kept
                // so that a harness change cannot panic here). Reuse IK transports.
                let (hs, hello) = valid_hello(false);
                let acc = server_respond(&hello).expect("hello");
                let done = hs.read_reply(&acc.reply).expect("reply");
                (acc.transport, done.transport, c_recv, self.s.s.received_offset(), None)
            }
        };
        let ticket = self.next_ticket();
        self.s.s.attach(now, s_transport, client_received, used, Some(ticket)).expect("server re-attach");
        self.c.s.attach(now, c_transport, server_received, None, None).expect("client re-attach");
        self.linked = true;
        self.check_tickets();
    }

    fn apply(&mut self, op: PairOp) {
        match op {
            PairOp::Write(side, len) => self.ends(side).0.write(len),
            PairOp::Read(side, len) => {
                let (a, b) = self.ends(side);
                a.read(len, b.side, b.written, b.shut);
            }
            PairOp::Shutdown(side) => {
                let a = self.ends(side).0;
                a.s.shutdown();
                a.shut = true;
            }
            PairOp::Flow { from, budget, keep } => {
                self.flow(from, usize::from(budget), Some(usize::from(keep)), None);
            }
            PairOp::Corrupt { from, bit } => {
                self.flow(from, 1, None, Some(usize::from(bit)));
            }
            PairOp::Advance(ms) => self.advance(ms),
            PairOp::Fault => self.cut(),
            PairOp::Resume if self.links < MAX_LINKS => {
                self.links += 1;
                self.resume();
            }
            PairOp::Resume => self.cut(),
        }
    }

    /// Heals the link and runs it until quiet; then every byte written must have been read,
    /// exactly once and in order.
    fn finish(&mut self) {
        if !self.linked {
            self.resume();
        }
        for _ in 0..10_000 {
            let moved =
                self.flow(Side::Client, usize::MAX, None, None) + self.flow(Side::Server, usize::MAX, None, None);
            let (c, s) = (&mut self.c, &mut self.s);
            let c_eof = c.read(u16::MAX, s.side, s.written, s.shut);
            let s_eof = s.read(u16::MAX, c.side, c.written, c.shut);
            let _ = (c_eof, s_eof);
            let done = self.c.read == self.s.written && self.s.read == self.c.written;
            if moved == 0 && done && self.c.s.unacked() == 0 && self.s.s.unacked() == 0 {
                break;
            }
            // Time passes as for a driver: its timers are handled before it transmits again (a
            // deadline left in the past would otherwise fail `flow`'s check, which is about a
            // driver that does).
            self.now += Duration::from_millis(10);
            let now = self.now;
            if self.c.s.handle_timeout(now).is_err() | self.s.s.handle_timeout(now).is_err() {
                self.resume();
            }
        }
        assert_eq!(self.c.read, self.s.written, "client did not read everything the server wrote");
        assert_eq!(self.s.read, self.c.written, "server did not read everything the client wrote");
        assert_eq!((self.c.s.unacked(), self.s.s.unacked()), (0, 0), "data left unacknowledged");
        if self.c.shut {
            assert!(self.c.s.fin_acked() && self.s.s.peer_finished());
        }
        if self.s.shut {
            assert!(self.s.s.fin_acked() && self.c.s.peer_finished());
        }
    }
}

/// A frame a malicious (authenticated) peer sends. `*Near` values are relative to the
/// session's own offsets, to hit the edges.
#[derive(Arbitrary, Debug)]
pub enum PeerFrame {
    /// DATA at an absolute offset.
    Data(u64, u16),
    /// DATA near the next expected offset.
    DataNear(i16, u16),
    /// ACK of any value.
    Ack(u64),
    /// ACK near what the session has written.
    AckNear(i16),
    /// PING.
    Ping,
    /// PONG.
    Pong,
    /// A TICKET.
    Ticket([u8; RESUME_ID_LEN], [u8; SECRET_LEN]),
    /// A TICKET_ACK.
    TicketAck([u8; RESUME_ID_LEN]),
    /// FIN near the next expected offset.
    FinNear(i16),
    /// CLOSE.
    Close(u16, String),
    /// Any plaintext at all.
    Raw(Vec<u8>),
}

/// One step against a session whose peer is the fuzzer.
#[derive(Arbitrary, Debug)]
pub enum PeerOp {
    /// The program writes.
    Write(u16),
    /// The program reads.
    Read(u16),
    /// The program shuts down writing.
    Shutdown,
    /// The peer sends an authenticated frame.
    Send(PeerFrame),
    /// An unauthenticated record arrives.
    Junk(Vec<u8>),
    /// The session transmits; the peer checks every record.
    Transmit(u16),
    /// Time passes.
    Advance(u16),
    /// The link fails.
    Detach,
    /// A new link, the peer claiming to have received `n` bytes (or near the truth).
    Attach(Option<u64>, i16),
}

fn near(base: u64, delta: i16) -> u64 {
    base.wrapping_add_signed(i64::from(delta))
}

/// A session against a hostile but authenticated peer held by the harness.
struct Lone {
    now: Instant,
    server: bool,
    shut: bool,
    s: Session,
    peer: Option<Transport>,
    written: u64,
    tickets: u8,
    links: u8,
}

impl Lone {
    fn link(&mut self, peer_received: u64) {
        let (hs, hello) = valid_hello(false);
        let acc = server_respond(&hello).expect("hello");
        let done = hs.read_reply(&acc.reply).expect("reply");
        let server = self.server;
        let (mine, theirs) = if server { (acc.transport, done.transport) } else { (done.transport, acc.transport) };
        self.s.detach();
        // The replay buffer holds [acked, written]; a FIN takes one position after the data.
        let high = self.s.written_offset();
        let low = high - u64::from(self.shut) - self.s.unacked() as u64;
        self.tickets = self.tickets.wrapping_add(1);
        let ticket = Ticket { resume_id: [self.tickets; RESUME_ID_LEN], secret: Zeroizing::new([1; SECRET_LEN]) };
        let failed_before = self.s.failure().is_some();
        match self.s.attach(self.now, mine, peer_received, None, server.then_some(ticket)) {
            Ok(a) => {
                // Below the replay buffer, the peer already acknowledged those positions: the
                // offset is taken as that ACK. Beyond what was written, it is refused.
                assert!(peer_received <= high, "attach took an offset beyond what was written");
                assert_eq!(a.replayed, high - peer_received.max(low));
                self.peer = Some(theirs);
            }
            Err(e) if failed_before => {
                let _ = e;
                self.peer = None;
            }
            Err(e) => {
                assert!(peer_received > high, "attach refused a valid offset: {e}");
                // The link stays attached so that the CLOSE(Protocol) reaches the peer.
                self.peer = Some(theirs);
            }
        }
    }

    fn fault(&mut self) {
        self.s.detach();
        self.peer = None;
    }

    fn apply(&mut self, op: PeerOp) {
        let now = self.now;
        match op {
            PeerOp::Write(len) => {
                let data = vec![0x5a; usize::from(len)];
                if let Ok(n) = self.s.write(&data) {
                    self.written += n as u64;
                }
            }
            PeerOp::Read(len) => {
                let mut buf = vec![0u8; usize::from(len)];
                let _ = self.s.read(&mut buf);
            }
            PeerOp::Shutdown => {
                self.s.shutdown();
                self.shut = true;
            }
            PeerOp::Send(f) => {
                let Some(peer) = self.peer.as_mut() else { return };
                let recv = self.s.received_offset();
                let data = vec![0xa5; usize::from(u16::MAX)];
                let reason;
                let frame = match &f {
                    PeerFrame::Data(off, len) => Frame::Data { offset: *off, data: &data[..usize::from(*len)] },
                    PeerFrame::DataNear(d, len) => {
                        Frame::Data { offset: near(recv, *d), data: &data[..usize::from(*len)] }
                    }
                    PeerFrame::Ack(v) => Frame::Ack(*v),
                    PeerFrame::AckNear(d) => Frame::Ack(near(self.s.written_offset(), *d)),
                    PeerFrame::Ping => Frame::Ping,
                    PeerFrame::Pong => Frame::Pong,
                    PeerFrame::Ticket(id, secret) => Frame::Ticket { resume_id: *id, secret },
                    PeerFrame::TicketAck(id) => Frame::TicketAck(*id),
                    PeerFrame::FinNear(d) => Frame::Fin(near(recv, *d)),
                    PeerFrame::Close(code, r) => {
                        reason = r.clone();
                        Frame::Close { code: *code, reason: &reason }
                    }
                    PeerFrame::Raw(_) => Frame::Ping,
                };
                let mut plain = Vec::new();
                match &f {
                    PeerFrame::Raw(bytes) => plain.extend_from_slice(bytes),
                    _ => frame.encode(&mut plain),
                }
                plain.truncate(u16::MAX as usize - TAG_LEN);
                let mut rec = Vec::new();
                peer.seal(&plain, &mut rec).expect("seal");
                let (body, _) = split_record(&rec).expect("record");
                if let Err(e) = self.s.handle_record(now, body) {
                    let _ = e.is_link_fault();
                    self.fault();
                }
            }
            PeerOp::Junk(bytes) => {
                if self.s.is_linked() {
                    let err = self.s.handle_record(now, &bytes).expect_err("an unauthenticated record was accepted");
                    assert!(err.is_link_fault(), "junk must only cost the link: {err}");
                    self.fault();
                }
            }
            PeerOp::Transmit(budget) => {
                let mut out = Vec::new();
                if self.s.poll_transmit(now, &mut out, usize::from(budget)).is_err() {
                    self.fault();
                    return;
                }
                let Some(peer) = self.peer.as_mut() else {
                    assert!(out.is_empty(), "transmitted without a link");
                    return;
                };
                let mut rest = &out[..];
                while let Some((body, used)) = split_record(rest) {
                    rest = &rest[used..];
                    let mut plain = vec![0u8; body.len()];
                    let n = peer.open(body, &mut plain).expect("the session sealed a record its peer cannot open");
                    let frame = Frame::decode(&plain[..n]).expect("the session sent an invalid frame");
                    if let Frame::Data { offset, data } = frame {
                        assert!(offset + data.len() as u64 <= self.written, "DATA beyond what was written");
                    }
                }
                assert!(rest.is_empty(), "partial record");
            }
            PeerOp::Advance(ms) => {
                self.now += Duration::from_millis(u64::from(ms % 4000));
                if self.s.handle_timeout(self.now).is_err() {
                    self.fault();
                }
            }
            PeerOp::Detach => self.fault(),
            PeerOp::Attach(abs, d) => {
                if self.links >= MAX_LINKS {
                    return;
                }
                self.links += 1;
                let off = abs.unwrap_or_else(|| near(self.s.written_offset(), d));
                self.link(off);
            }
        }
    }
}

/// Session state machine: `data[0]` picks an honest pair over a faulty network (exactly-once
/// delivery and ticket rotation are checked) or a lone session of either role against a hostile
/// authenticated peer (no panic, only valid output). The rest is an `arbitrary` op sequence.
pub fn session_events(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    let mut u = Unstructured::new(rest);
    if mode % 2 == 0 {
        let mut pair = Pair::new();
        for _ in 0..256 {
            match PairOp::arbitrary(&mut u) {
                Ok(op) if !u.is_empty() => pair.apply(op),
                _ => break,
            }
        }
        pair.finish();
    } else {
        let role = if mode & 2 == 0 { Role::Client } else { Role::Server };
        let mut lone = Lone {
            now: Instant::now(),
            server: role == Role::Server,
            shut: false,
            s: Session::new(role, small_config()),
            peer: None,
            written: 0,
            tickets: 0,
            links: 0,
        };
        lone.link(0);
        for _ in 0..256 {
            match PeerOp::arbitrary(&mut u) {
                Ok(op) if !u.is_empty() => lone.apply(op),
                _ => break,
            }
        }
    }
}

// ---- parsers a peer or a stranger reaches --------------------------------------------------
//
// Each runs the real parser through `holdfast::fuzzing` (hidden from the library's docs), which
// also checks what the parser accepted against the encoder that writes it.

/// Tunnel stream openers: the service, multiplex, connect and listen requests the server reads,
/// the reverse open and the reply a client reads (PROTOCOL.md appendices A and B).
pub fn tunnel_request(data: &[u8]) {
    holdfast::fuzzing::tunnel_request(data);
}

/// The PROXY protocol v2 header a server reads from a trusted load balancer.
pub fn proxy_header(data: &[u8]) {
    holdfast::fuzzing::proxy_header(data);
}

/// A message one server process reads from the other during an upgrade (the handover socket).
pub fn handover_message(data: &[u8]) {
    holdfast::fuzzing::handover_message(data);
}

/// The request head of a metrics scrape, in reads of the size `data[0]`.
pub fn metrics_head(data: &[u8]) {
    holdfast::fuzzing::metrics_head(data);
}

/// The allow-list file.
pub fn allow_list(data: &[u8]) {
    holdfast::fuzzing::allow_list(data);
}

/// The stream frames of protocol version 4, as the peer's half of a session.
pub fn streams(data: &[u8]) {
    holdfast::fuzzing::streams(data);
}
