//! The two handshakes, as sans-IO values: the first connection (`Noise_IK`) and resumption
//! (`Noise_KKpsk0` keyed by a ticket). See `docs/PROTOCOL.md` for every byte.
//!
//! Client side: [`ClientHandshake::initial`] or [`ClientHandshake::resume`] give the first record
//! to send; [`ClientHandshake::read_reply`] turns the server's reply into a [`Transport`].
//! Server side: [`respond`] reads the client's first record and gives the reply and a
//! [`Transport`] that is *not yet confirmed*: the server commits nothing until the first
//! transport record from the client decrypts.

use thiserror::Error;
use zeroize::Zeroizing;

use super::cipher::Cipher;
use super::frame::{RESUME_ID_LEN, SECRET_LEN};

use super::dh::Miss;
use super::statics::StaticSecrets;
use super::transport::Transport;
use crate::keys::{PrivateKey, PublicKey};

/// Length of the first connection's reply payload: the session's first ticket (resume id then
/// secret).
const TICKET_PAYLOAD: usize = RESUME_ID_LEN + SECRET_LEN;
/// Length of the first connection's hello payload: the client's timestamp.
const STAMP_LEN: usize = 8;
/// Length of the INITIAL header: magic, version, kind.
pub const INITIAL_HEADER: usize = 6;
/// Length of the RESUME header: magic, version, kind, resume id, attempt.
pub const RESUME_HEADER: usize = 6 + RESUME_ID_LEN + 8;

/// Magic bytes that open every client hello.
pub const MAGIC: [u8; 4] = *b"HFST";
/// Protocol version.
pub const VERSION: u8 = 4;
/// Noise protocol of the first connection (with [`Cipher::ChaChaPoly`]; see [`protocol_name`]).
pub const INITIAL_PATTERN: &str = "Noise_IK_25519_ChaChaPoly_BLAKE2s";
/// Noise protocol of a resume (with [`Cipher::ChaChaPoly`]; see [`protocol_name`]).
pub const RESUME_PATTERN: &str = "Noise_KKpsk0_25519_ChaChaPoly_BLAKE2s";
/// Largest handshake record accepted before authentication, in bytes.
pub const MAX_HANDSHAKE: usize = 256;

/// Client hello kinds: the low four bits of byte 5 of the hello. The high four bits are the
/// [`Cipher`] code, so `0x01` is a first connection with ChaChaPoly and `0x12` a resume with
/// AESGCM.
pub mod hello {
    /// First connection: Noise IK.
    pub const INITIAL: u8 = 0x01;
    /// Resume with a ticket: Noise KKpsk0.
    pub const RESUME: u8 = 0x02;
}

/// The full Noise protocol name of a first connection (`resume == false`) or a resume with
/// `cipher`, for example `Noise_IK_25519_AESGCM_BLAKE2s`.
pub fn protocol_name(resume: bool, cipher: Cipher) -> &'static str {
    match (resume, cipher) {
        (false, Cipher::ChaChaPoly) => INITIAL_PATTERN,
        (true, Cipher::ChaChaPoly) => RESUME_PATTERN,
        (false, Cipher::AesGcm) => "Noise_IK_25519_AESGCM_BLAKE2s",
        (true, Cipher::AesGcm) => "Noise_KKpsk0_25519_AESGCM_BLAKE2s",
    }
}

/// Byte 5 of a hello: the handshake kind and the cipher code.
fn kind_byte(kind: u8, cipher: Cipher) -> u8 {
    kind | cipher.code() << 4
}

/// Server reply kinds (byte 0 of the reply).
pub mod reply {
    /// The Noise response follows.
    pub const ACCEPT: u8 = 0x01;
    /// The server refuses; one reject code byte follows.
    pub const REJECT: u8 = 0x02;
}

/// Why a server refused a hello, sent in clear in a REJECT reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectCode {
    /// The resume id is unknown or expired: the session is lost.
    UnknownSession,
    /// The server is at a limit; try again later.
    Busy,
    /// A first connection whose timestamp is not newer than one the server already accepted for
    /// this client key: a replay, another machine using the same key, or a clock that went back.
    Stale,
    /// (RESUME) The session's client key is no longer on the server's allow-list: the session
    /// was ended when the key was removed.
    NotAllowed,
    /// The hello's protocol version is not the server's.
    Version,
}

impl RejectCode {
    /// Wire value.
    pub fn to_u8(self) -> u8 {
        match self {
            RejectCode::UnknownSession => 1,
            RejectCode::Busy => 2,
            RejectCode::Stale => 3,
            RejectCode::NotAllowed => 4,
            RejectCode::Version => 5,
        }
    }
}

/// Handshake failures.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The record is not a holdfast hello (wrong magic, kind or size).
    #[error("not a holdfast handshake message")]
    Malformed,
    /// The peer speaks another protocol version.
    #[error("the client speaks protocol version {0}, this server version {VERSION}: install the same holdfast release on both ends")]
    Version(u8),
    /// A Noise message failed to authenticate: wrong key, tampering, or a replay.
    #[error("handshake failed authentication (wrong key or tampered message)")]
    Auth,
    /// The client's static key is not on the server's allow-list.
    #[error("client key is not authorized")]
    UnknownClient,
    /// Server: a first-connection hello claimed this key, which is not on the allow-list (the
    /// hello then fails to authenticate; nothing proves the claimant holds the key). Handled as
    /// a silent refusal, like [`HandshakeError::Auth`].
    #[error("client key {0} is not on the allow-list")]
    NotAllowed(PublicKey),
    /// The resume id names no live session's ticket.
    #[error(
        "the resume ticket names no live session (expired or unknown, or a ticket its session has since replaced: \
         an attempt overtaken by a newer resume)"
    )]
    UnknownSession,
    /// The server refused: it is at a limit.
    #[error("server is busy")]
    Busy,
    /// A resume hello whose attempt number the server has already seen: a replay.
    #[error("a replayed resume hello (its attempt number was already used)")]
    Replayed,
    /// The server refused a first connection's timestamp: it has accepted a newer one from this
    /// client key, or the timestamp is more than 60 s ahead of the server's clock.
    #[error(
        "the server refused the hello as stale: it has seen a newer connection from this client key, or this \
         machine's clock is more than 60 s ahead of the server's (a replayed hello, another machine using the same \
         key, or this machine's clock went back or runs ahead); check the clocks of both machines"
    )]
    Stale,
    /// (RESUME) REJECT 4: the server no longer allows this client key; the session was ended.
    #[error("the server no longer allows this key (it was removed from the server's allow-list)")]
    NoLongerAllowed,
    /// REJECT 5: the server speaks another protocol version.
    #[error(
        "the server speaks another protocol version than this client's (version {VERSION}); install the same \
         holdfast release on both ends"
    )]
    OtherVersion,
    /// The server answered with a reject code this version does not know.
    #[error("server rejected the handshake with code {0}")]
    Rejected(u8),
    /// Noise refused to build a state (bad key material).
    #[error("noise setup failed")]
    Setup,
}

/// A resumption ticket: a public id and a secret used as the PSK of one resume handshake.
#[derive(Clone)]
pub struct Ticket {
    /// Public id, sent in clear in the resume hello.
    pub resume_id: [u8; RESUME_ID_LEN],
    /// Secret PSK. Zeroized on drop.
    pub secret: Zeroizing<[u8; SECRET_LEN]>,
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Ticket({}, <secret>)", hex_id(&self.resume_id))
    }
}

impl Ticket {
    /// A fresh random ticket from the operating system's CSPRNG.
    pub fn generate() -> Self {
        use rand::RngCore;
        let mut t = Ticket { resume_id: [0; RESUME_ID_LEN], secret: Zeroizing::new([0; SECRET_LEN]) };
        rand::rngs::OsRng.fill_bytes(&mut t.resume_id);
        rand::rngs::OsRng.fill_bytes(&mut t.secret[..]);
        t
    }

    /// A fresh random ticket whose resume id begins with `server_id` (big-endian), for a
    /// server in a fleet; the other 14 bytes of the id and the secret are random.
    pub fn for_server(server_id: Option<u16>) -> Self {
        let mut t = Ticket::generate();
        if let Some(id) = server_id {
            t.resume_id[..2].copy_from_slice(&id.to_be_bytes());
        }
        t
    }
}

/// Short printable form of a resume id, for logs (the id is public).
pub fn hex_id(id: &[u8]) -> String {
    id.iter().take(6).map(|b| format!("{b:02x}")).collect()
}

fn builder<'a>(
    pattern: &str,
    prologue: &'a [u8],
    local: &'a PrivateKey,
    statics: Option<(StaticSecrets, Miss)>,
) -> Result<snow::Builder<'a>, HandshakeError> {
    let params = pattern.parse().map_err(|_| HandshakeError::Setup)?;
    snow::Builder::with_resolver(params, super::dh::resolver(statics))
        .prologue(prologue)
        .and_then(|b| b.local_private_key(local.as_bytes()))
        .map_err(|_| HandshakeError::Setup)
}

/// The transport of a finished handshake, from the two keys of Noise's `Split()`: the
/// initiator sends with the first and the responder with the second. The record layer does its
/// own AEAD (see `transport`) so that it can encrypt and decrypt in place.
fn into_transport(mut hs: snow::HandshakeState, cipher: Cipher) -> Result<Transport, HandshakeError> {
    if !hs.is_handshake_finished() {
        return Err(HandshakeError::Setup);
    }
    let (k1, k2) = hs.dangerously_get_raw_split();
    let (k1, k2) = (Zeroizing::new(k1), Zeroizing::new(k2));
    let (send, recv) = if hs.is_initiator() { (&k1, &k2) } else { (&k2, &k1) };
    Transport::from_split(cipher, send, recv).map_err(|_| HandshakeError::Setup)
}

fn offsets(received: u64, written: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&received.to_be_bytes());
    b[8..].copy_from_slice(&written.to_be_bytes());
    b
}

fn ticket_payload(t: &Ticket) -> Zeroizing<[u8; TICKET_PAYLOAD]> {
    let mut b = Zeroizing::new([0u8; TICKET_PAYLOAD]);
    b[..RESUME_ID_LEN].copy_from_slice(&t.resume_id);
    b[RESUME_ID_LEN..].copy_from_slice(&t.secret[..]);
    b
}

fn parse_ticket(b: &[u8]) -> Result<Ticket, HandshakeError> {
    let (id, secret) = (b.get(..RESUME_ID_LEN), b.get(RESUME_ID_LEN..TICKET_PAYLOAD));
    let (Some(id), Some(secret)) = (id, secret) else { return Err(HandshakeError::Malformed) };
    let mut t = Ticket { resume_id: [0; RESUME_ID_LEN], secret: Zeroizing::new([0; SECRET_LEN]) };
    t.resume_id.copy_from_slice(id);
    t.secret.copy_from_slice(secret);
    Ok(t)
}

fn parse_offsets(b: &[u8]) -> Result<(u64, u64), HandshakeError> {
    let r: [u8; 8] = b.get(..8).and_then(|s| s.try_into().ok()).ok_or(HandshakeError::Malformed)?;
    let w: [u8; 8] = b.get(8..16).and_then(|s| s.try_into().ok()).ok_or(HandshakeError::Malformed)?;
    Ok((u64::from_be_bytes(r), u64::from_be_bytes(w)))
}

/// A client waiting for the server's reply.
pub struct ClientHandshake {
    state: snow::HandshakeState,
    resume: bool,
    cipher: Cipher,
}

impl std::fmt::Debug for ClientHandshake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientHandshake")
            .field("resume", &self.resume)
            .field("cipher", &self.cipher)
            .finish_non_exhaustive()
    }
}

/// What the client learns from a successful handshake.
#[derive(Debug)]
pub struct ClientDone {
    /// The new transport.
    pub transport: Transport,
    /// For a first connection: the session's first ticket, from the server's reply, so the
    /// session can be resumed from its first byte (see [`crate::proto::Session::adopt_ticket`]).
    pub ticket: Option<Ticket>,
    /// For a resume: how much of the client's stream the server has received.
    pub server_received: Option<u64>,
    /// For a resume: the end of the server's stream so far (so the client can tell how much the
    /// server is about to replay).
    pub server_written: Option<u64>,
}

impl ClientHandshake {
    /// Starts a first connection (IK) with `cipher`. `stamp` must be larger than that of every
    /// earlier first connection of this client key to this server: the server refuses a hello
    /// whose stamp is not newer than one it accepted (so a recorded hello cannot be replayed).
    /// This implementation uses the wall-clock time in nanoseconds, forced to increase within a
    /// process. Returns the handshake and the hello record body.
    ///
    /// # Errors
    /// [`HandshakeError::Setup`] if Noise rejects the keys.
    pub fn initial(
        local: &PrivateKey,
        server: &PublicKey,
        cipher: Cipher,
        stamp: u64,
    ) -> Result<(Self, Vec<u8>), HandshakeError> {
        Self::initial_with(local, server, cipher, stamp, None)
    }

    #[doc(hidden)]
    /// Like [`ClientHandshake::initial`] with a fixed ephemeral key: for test vectors only.
    pub fn initial_with(
        local: &PrivateKey,
        server: &PublicKey,
        cipher: Cipher,
        stamp: u64,
        ephemeral: Option<&[u8; 32]>,
    ) -> Result<(Self, Vec<u8>), HandshakeError> {
        let mut header = Vec::with_capacity(MAX_HANDSHAKE);
        header.extend_from_slice(&MAGIC);
        header.extend_from_slice(&[VERSION, kind_byte(hello::INITIAL, cipher)]);
        let mut b = builder(protocol_name(false, cipher), &header, local, None)?
            .remote_public_key(server.as_bytes())
            .map_err(|_| HandshakeError::Setup)?;
        if let Some(e) = ephemeral {
            b = b.fixed_ephemeral_key_for_testing_only(e);
        }
        let state = b.build_initiator().map_err(|_| HandshakeError::Setup)?;
        let mut hs = ClientHandshake { state, resume: false, cipher };
        let out = hs.write_hello(header, &stamp.to_be_bytes())?;
        Ok((hs, out))
    }

    /// Starts a resume (KKpsk0) with `ticket` and `cipher`, telling the server that the client
    /// has received `received` positions of the server's stream and has written `written`
    /// positions of its own. `attempt` numbers the session's resume attempts: it must be larger
    /// than that of every earlier attempt of the session (the server refuses one that is not, so
    /// that a recorded attempt cannot be replayed). The cipher need not be the one of earlier
    /// connections.
    ///
    /// # Errors
    /// [`HandshakeError::Setup`] if Noise rejects the keys.
    pub fn resume(
        local: &PrivateKey,
        server: &PublicKey,
        ticket: &Ticket,
        attempt: u64,
        (received, written): (u64, u64),
        cipher: Cipher,
    ) -> Result<(Self, Vec<u8>), HandshakeError> {
        Self::resume_with(local, server, ticket, attempt, (received, written), cipher, None)
    }

    #[doc(hidden)]
    /// Like [`ClientHandshake::resume`] with a fixed ephemeral key: for test vectors only.
    pub fn resume_with(
        local: &PrivateKey,
        server: &PublicKey,
        ticket: &Ticket,
        attempt: u64,
        (received, written): (u64, u64),
        cipher: Cipher,
        ephemeral: Option<&[u8; 32]>,
    ) -> Result<(Self, Vec<u8>), HandshakeError> {
        let mut header = Vec::with_capacity(MAX_HANDSHAKE);
        header.extend_from_slice(&MAGIC);
        header.extend_from_slice(&[VERSION, kind_byte(hello::RESUME, cipher)]);
        header.extend_from_slice(&ticket.resume_id);
        header.extend_from_slice(&attempt.to_be_bytes());
        let mut b = builder(protocol_name(true, cipher), &header, local, None)?
            .remote_public_key(server.as_bytes())
            .and_then(|b| b.psk(0, &ticket.secret))
            .map_err(|_| HandshakeError::Setup)?;
        if let Some(e) = ephemeral {
            b = b.fixed_ephemeral_key_for_testing_only(e);
        }
        let state = b.build_initiator().map_err(|_| HandshakeError::Setup)?;
        let mut hs = ClientHandshake { state, resume: true, cipher };
        let out = hs.write_hello(header, &offsets(received, written))?;
        Ok((hs, out))
    }

    fn write_hello(&mut self, mut header: Vec<u8>, payload: &[u8]) -> Result<Vec<u8>, HandshakeError> {
        let start = header.len();
        header.resize(MAX_HANDSHAKE, 0);
        let n = self.state.write_message(payload, &mut header[start..]).map_err(|_| HandshakeError::Setup)?;
        header.truncate(start + n);
        Ok(header)
    }

    /// Reads the server's reply record body.
    ///
    /// # Errors
    /// [`HandshakeError::UnknownSession`] or [`HandshakeError::Busy`] if the server refused,
    /// [`HandshakeError::Auth`] if the reply does not come from the pinned server key,
    /// [`HandshakeError::Malformed`] for anything else unexpected.
    pub fn read_reply(mut self, body: &[u8]) -> Result<ClientDone, HandshakeError> {
        let (&kind, rest) = body.split_first().ok_or(HandshakeError::Malformed)?;
        match kind {
            reply::ACCEPT => {}
            reply::REJECT => {
                // REJECT 1 and 4 are about a session, so only a resume can get them; to a first
                // connection they are unknown codes (a REJECT is not authenticated: an on-path
                // attacker must not make a user believe their key was removed).
                return Err(match rest {
                    [1] if self.resume => HandshakeError::UnknownSession,
                    [2] => HandshakeError::Busy,
                    [3] => HandshakeError::Stale,
                    [4] if self.resume => HandshakeError::NoLongerAllowed,
                    [5] => HandshakeError::OtherVersion,
                    [c] => HandshakeError::Rejected(*c),
                    _ => HandshakeError::Malformed,
                });
            }
            _ => return Err(HandshakeError::Malformed),
        }
        if rest.len() > MAX_HANDSHAKE {
            return Err(HandshakeError::Malformed);
        }
        let mut payload = Zeroizing::new([0u8; MAX_HANDSHAKE]);
        let n = self.state.read_message(rest, &mut payload[..]).map_err(|_| HandshakeError::Auth)?;
        let (ticket, server_received, server_written) = match (self.resume, n) {
            (false, TICKET_PAYLOAD) => (Some(parse_ticket(&payload[..n])?), None, None),
            (true, 16) => {
                let (r, w) = parse_offsets(&payload[..16])?;
                (None, Some(r), Some(w))
            }
            _ => return Err(HandshakeError::Malformed),
        };
        let transport = into_transport(self.state, self.cipher)?;
        Ok(ClientDone { transport, ticket, server_received, server_written })
    }
}

/// What a server needs to know about a session to answer a resume for it.
pub struct ResumeLookup {
    /// The client static key stored with the session (never the client's claim).
    pub client: PublicKey,
    /// The ticket secret for the requested resume id.
    pub psk: Zeroizing<[u8; SECRET_LEN]>,
    /// How much of the client's stream the server has received.
    pub received: u64,
    /// The end of the server's stream so far.
    pub written: u64,
}

/// What kind of connection a verified hello asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hello {
    /// A new session from this client key.
    Initial {
        /// The client's authenticated static key.
        client: PublicKey,
        /// The client's timestamp: the server accepts it only if it is newer than every one it
        /// accepted before for this key.
        stamp: u64,
    },
    /// A resume of an existing session.
    Resume {
        /// The ticket id used.
        resume_id: [u8; RESUME_ID_LEN],
        /// The attempt number (from the cleartext header, authenticated as the prologue).
        attempt: u64,
        /// How much of the server's stream the client has received.
        client_received: u64,
        /// The end of the client's stream so far.
        client_written: u64,
    },
}

/// The cleartext header of a hello, read before any cryptography (so that a server can refuse
/// cheaply; nothing in it is authenticated until the Noise message is read).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The cipher the client chose.
    pub cipher: Cipher,
    /// For a RESUME: the resume id and the attempt number. `None` for INITIAL.
    pub resume: Option<([u8; RESUME_ID_LEN], u64)>,
}

/// Parses the cleartext header of a hello record body.
///
/// # Errors
/// [`HandshakeError::Malformed`] for a wrong size, magic, kind or cipher code,
/// [`HandshakeError::Version`] for another protocol version.
pub fn parse_header(body: &[u8]) -> Result<Header, HandshakeError> {
    if body.len() > MAX_HANDSHAKE || body.len() < INITIAL_HEADER || body[..4] != MAGIC {
        return Err(HandshakeError::Malformed);
    }
    if body[4] != VERSION {
        return Err(HandshakeError::Version(body[4]));
    }
    let cipher = Cipher::from_code(body[5] >> 4).ok_or(HandshakeError::Malformed)?;
    match body[5] & 0x0f {
        hello::INITIAL => Ok(Header { cipher, resume: None }),
        hello::RESUME => {
            let h = body.get(..RESUME_HEADER).ok_or(HandshakeError::Malformed)?;
            let mut id = [0u8; RESUME_ID_LEN];
            id.copy_from_slice(&h[6..6 + RESUME_ID_LEN]);
            let attempt: [u8; 8] = h[6 + RESUME_ID_LEN..].try_into().map_err(|_| HandshakeError::Malformed)?;
            Ok(Header { cipher, resume: Some((id, u64::from_be_bytes(attempt))) })
        }
        _ => Err(HandshakeError::Malformed),
    }
}

/// A server's answer to a valid hello: the reply to send and an unconfirmed transport.
#[derive(Debug)]
pub struct ServerAccept {
    /// What the hello asked for.
    pub hello: Hello,
    /// Reply record body to send.
    pub reply: Vec<u8>,
    /// Transport to use once the client's first record decrypts (key confirmation).
    pub transport: Transport,
    /// For a first connection: the session's first ticket, already sent (encrypted) in the
    /// reply. On commit the session adopts it ([`crate::proto::Session::adopt_ticket`]); without
    /// a commit it is simply dropped.
    pub ticket: Option<Ticket>,
}

/// The reply body for a refusal.
pub fn reject(code: RejectCode) -> Vec<u8> {
    vec![reply::REJECT, code.to_u8()]
}

/// The whole record of a REJECT BUSY reply, length prefix included (4 bytes).
pub fn busy_record() -> [u8; 4] {
    [0, 2, reply::REJECT, RejectCode::Busy.to_u8()]
}

/// A hello whose Noise message 1 authenticated, before the server answers it: the server decides
/// here (allow-list, timestamp, limits) and then [`HelloRead::accept`]s or rejects it.
pub struct HelloRead {
    hello: Hello,
    state: snow::HandshakeState,
    cipher: Cipher,
    /// For a resume: the server's `(received, written)` from the look-up.
    offsets: Option<(u64, u64)>,
}

impl std::fmt::Debug for HelloRead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HelloRead").field("hello", &self.hello).field("cipher", &self.cipher).finish_non_exhaustive()
    }
}

impl HelloRead {
    /// What the hello asks for.
    pub fn hello(&self) -> &Hello {
        &self.hello
    }

    /// Writes the reply: for a first connection with the session's first ticket (`ticket`, or a
    /// fresh one), for a resume with the server's offsets. Nothing is committed.
    ///
    /// # Errors
    /// [`HandshakeError::Setup`] if Noise fails.
    pub fn accept(mut self, ticket: Option<Ticket>) -> Result<ServerAccept, HandshakeError> {
        let mut out = vec![0u8; MAX_HANDSHAKE];
        out[0] = reply::ACCEPT;
        let (n, ticket) = match self.offsets {
            None => {
                let ticket = ticket.unwrap_or_else(Ticket::generate);
                let n = self
                    .state
                    .write_message(&ticket_payload(&ticket)[..], &mut out[1..])
                    .map_err(|_| HandshakeError::Setup)?;
                (n, Some(ticket))
            }
            Some((received, written)) => {
                let n = self
                    .state
                    .write_message(&offsets(received, written), &mut out[1..])
                    .map_err(|_| HandshakeError::Setup)?;
                (n, None)
            }
        };
        out.truncate(1 + n);
        let transport = into_transport(self.state, self.cipher)?;
        Ok(ServerAccept { hello: self.hello, reply: out, transport, ticket })
    }
}

/// Server side: reads a client hello record body and answers it.
///
/// `allowed` decides whether an initial client key is on the allow-list; `lookup` finds the
/// session for a resume id. Nothing is committed here: the caller must wait for the client's
/// first transport record to decrypt before it creates or attaches a session. The timestamp of
/// a first connection and the attempt number of a resume are returned in [`Hello`] but not
/// checked: a server that keeps them uses [`read_hello`] and decides before answering.
///
/// # Errors
/// [`HandshakeError::UnknownClient`] (drop silently), [`HandshakeError::UnknownSession`] (send
/// [`reject`]), [`HandshakeError::Auth`] (drop silently), [`HandshakeError::Malformed`] or
/// [`HandshakeError::Version`].
pub fn respond(
    body: &[u8],
    local: &PrivateKey,
    allowed: impl FnOnce(&PublicKey) -> bool,
    lookup: impl FnOnce(&[u8; RESUME_ID_LEN]) -> Option<ResumeLookup>,
) -> Result<ServerAccept, HandshakeError> {
    respond_with(body, local, allowed, lookup, None, None)
}

#[doc(hidden)]
/// Like [`respond`] with a fixed ephemeral key and first ticket: for test vectors only.
pub fn respond_with(
    body: &[u8],
    local: &PrivateKey,
    allowed: impl FnOnce(&PublicKey) -> bool,
    lookup: impl FnOnce(&[u8; RESUME_ID_LEN]) -> Option<ResumeLookup>,
    ephemeral: Option<&[u8; 32]>,
    first_ticket: Option<Ticket>,
) -> Result<ServerAccept, HandshakeError> {
    let read = read_hello_with(body, local, None, lookup, ephemeral)?;
    if let Hello::Initial { client, .. } = read.hello() {
        if !allowed(client) {
            return Err(HandshakeError::UnknownClient);
        }
    }
    read.accept(first_ticket)
}

/// Server side, first half: reads the hello's Noise message 1 and returns what it asks for,
/// without answering. With `statics`, a first connection's `ss` comes from that table (every
/// claimed key costs the same, and a key without an entry fails to authenticate, as if it were
/// forged); without, it is computed.
///
/// # Errors
/// As [`respond`], except that [`HandshakeError::UnknownClient`] is never returned (the caller
/// checks the key in [`Hello::Initial`]).
pub fn read_hello(
    body: &[u8],
    local: &PrivateKey,
    statics: Option<&StaticSecrets>,
    lookup: impl FnOnce(&[u8; RESUME_ID_LEN]) -> Option<ResumeLookup>,
) -> Result<HelloRead, HandshakeError> {
    read_hello_with(body, local, statics, lookup, None)
}

fn read_hello_with(
    body: &[u8],
    local: &PrivateKey,
    statics: Option<&StaticSecrets>,
    lookup: impl FnOnce(&[u8; RESUME_ID_LEN]) -> Option<ResumeLookup>,
    ephemeral: Option<&[u8; 32]>,
) -> Result<HelloRead, HandshakeError> {
    let head = parse_header(body)?;
    let cipher = head.cipher;
    let mut payload = Zeroizing::new([0u8; MAX_HANDSHAKE]);
    match head.resume {
        None => {
            let (header, msg) = body.split_at(INITIAL_HEADER);
            let claimed = std::sync::Arc::new(std::sync::Mutex::new(None));
            let tables = statics.map(|t| (t.clone(), Miss::Refuse(claimed.clone())));
            let mut b = builder(protocol_name(false, cipher), header, local, tables)?;
            if let Some(e) = ephemeral {
                b = b.fixed_ephemeral_key_for_testing_only(e);
            }
            let mut state = b.build_responder().map_err(|_| HandshakeError::Setup)?;
            let n = state.read_message(msg, &mut payload[..]).map_err(|_| {
                match *claimed.lock().unwrap_or_else(|p| p.into_inner()) {
                    Some(k) => HandshakeError::NotAllowed(PublicKey::from_bytes(k)),
                    None => HandshakeError::Auth,
                }
            })?;
            let stamp: [u8; STAMP_LEN] = payload[..n].try_into().map_err(|_| HandshakeError::Malformed)?;
            let client = state
                .get_remote_static()
                .and_then(|k| <[u8; 32]>::try_from(k).ok())
                .map(PublicKey::from_bytes)
                .ok_or(HandshakeError::Auth)?;
            let hello = Hello::Initial { client, stamp: u64::from_be_bytes(stamp) };
            Ok(HelloRead { hello, state, cipher, offsets: None })
        }
        Some((resume_id, attempt)) => {
            let (header, msg) = body.split_at(RESUME_HEADER);
            let found = lookup(&resume_id).ok_or(HandshakeError::UnknownSession)?;
            let tables = statics.map(|t| (t.clone(), Miss::Compute));
            let mut b = builder(protocol_name(true, cipher), header, local, tables)?
                .remote_public_key(found.client.as_bytes())
                .and_then(|b| b.psk(0, &found.psk))
                .map_err(|_| HandshakeError::Setup)?;
            if let Some(e) = ephemeral {
                b = b.fixed_ephemeral_key_for_testing_only(e);
            }
            let mut state = b.build_responder().map_err(|_| HandshakeError::Setup)?;
            let n = state.read_message(msg, &mut payload[..]).map_err(|_| HandshakeError::Auth)?;
            if n != 16 {
                return Err(HandshakeError::Malformed);
            }
            let (client_received, client_written) = parse_offsets(&payload[..16])?;
            let hello = Hello::Resume { resume_id, attempt, client_received, client_written };
            Ok(HelloRead { hello, state, cipher, offsets: Some((found.received, found.written)) })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::Keypair;

    #[test]
    fn a_fleet_servers_resume_ids_begin_with_its_id_and_the_rest_is_random() {
        let (a, b) = (Ticket::for_server(Some(0x0102)), Ticket::for_server(Some(0x0102)));
        assert_eq!(a.resume_id[..2], [1, 2]);
        assert_eq!(b.resume_id[..2], [1, 2]);
        assert_ne!(a.resume_id[2..], b.resume_id[2..]);
        assert_ne!(a.secret[..], b.secret[..]);
        // Without an id the first bytes are random too (two zero bytes: 1 in 65536).
        let ids: std::collections::HashSet<[u8; 2]> =
            (0..16).map(|_| Ticket::for_server(None).resume_id[..2].try_into().unwrap()).collect();
        assert!(ids.len() > 1);
    }

    fn pair() -> (Keypair, Keypair) {
        (Keypair::generate(), Keypair::generate())
    }

    fn confirm(client: &mut Transport, server: &mut Transport) {
        let mut rec = Vec::new();
        client.seal(b"\x03", &mut rec).unwrap();
        let mut out = [0u8; 64];
        let n = server.open(&rec[2..], &mut out).unwrap();
        assert_eq!(&out[..n], b"\x03");
    }

    #[test]
    fn initial_handshake_authenticates_both_ends() {
        for cipher in Cipher::ALL {
            let (c, s) = pair();
            let (hs, hello) = ClientHandshake::initial(&c.private, &s.public, cipher, 1).unwrap();
            assert!(hello.len() <= MAX_HANDSHAKE);
            assert_eq!(hello[5], hello::INITIAL | cipher.code() << 4);
            let acc = respond(&hello, &s.private, |k| *k == c.public, |_| None).unwrap();
            assert_eq!(acc.hello, Hello::Initial { client: c.public, stamp: 1 });
            assert_eq!(acc.transport.cipher(), cipher);
            let mut done = hs.read_reply(&acc.reply).unwrap();
            assert_eq!(done.transport.cipher(), cipher);
            let mut st = acc.transport;
            confirm(&mut done.transport, &mut st);
        }
    }

    #[test]
    fn the_cipher_code_is_authenticated_and_unknown_codes_are_refused() {
        let (c, s) = pair();
        for cipher in Cipher::ALL {
            // Flipping the cipher code changes the prologue and the Noise protocol name: the
            // server cannot read message 1.
            let (_, mut hello) = ClientHandshake::initial(&c.private, &s.public, cipher, 1).unwrap();
            hello[5] ^= 0x10;
            assert_eq!(respond(&hello, &s.private, |_| true, |_| None).unwrap_err(), HandshakeError::Auth);
            hello[5] = hello::INITIAL | 0x20;
            assert_eq!(respond(&hello, &s.private, |_| true, |_| None).unwrap_err(), HandshakeError::Malformed);
        }
    }

    #[test]
    fn unknown_client_is_refused_after_message_one() {
        let (c, s) = pair();
        let (_, hello) = ClientHandshake::initial(&c.private, &s.public, Cipher::ChaChaPoly, 1).unwrap();
        let err = respond(&hello, &s.private, |_| false, |_| None).unwrap_err();
        assert_eq!(err, HandshakeError::UnknownClient);
    }

    #[test]
    fn wrong_server_key_is_detected() {
        let (c, s) = pair();
        let impostor = Keypair::generate();
        // The client pins `s`, but `impostor` answers: it cannot even read message 1.
        let (_, hello) = ClientHandshake::initial(&c.private, &s.public, Cipher::ChaChaPoly, 1).unwrap();
        assert_eq!(respond(&hello, &impostor.private, |_| true, |_| None).unwrap_err(), HandshakeError::Auth);
    }

    #[test]
    fn resume_carries_offsets_and_uses_the_stored_client_key() {
        for cipher in Cipher::ALL {
            resume_with_cipher(cipher);
        }
    }

    fn resume_with_cipher(cipher: Cipher) {
        let (c, s) = pair();
        let t = Ticket::generate();
        let (hs, hello) = ClientHandshake::resume(&c.private, &s.public, &t, 1, (77, 5), cipher).unwrap();
        let lookup = |id: &[u8; 16]| {
            assert_eq!(id, &t.resume_id);
            Some(ResumeLookup { client: c.public, psk: t.secret.clone(), received: 99, written: 120 })
        };
        let acc = respond(&hello, &s.private, |_| panic!("no allow-list on resume"), lookup).unwrap();
        assert_eq!(
            acc.hello,
            Hello::Resume { resume_id: t.resume_id, attempt: 1, client_received: 77, client_written: 5 }
        );
        assert_eq!(acc.transport.cipher(), cipher);
        let mut done = hs.read_reply(&acc.reply).unwrap();
        let mut st = acc.transport;
        confirm(&mut done.transport, &mut st);
        assert_eq!(done.server_received, Some(99));
        assert_eq!(done.server_written, Some(120));

        // Another allowed client using this id fails: the server uses the stored key.
        let other = Keypair::generate();
        let (_, hello) = ClientHandshake::resume(&other.private, &s.public, &t, 1, (0, 0), cipher).unwrap();
        let lookup =
            |_: &[u8; 16]| Some(ResumeLookup { client: c.public, psk: t.secret.clone(), received: 0, written: 0 });
        assert_eq!(respond(&hello, &s.private, |_| true, lookup).unwrap_err(), HandshakeError::Auth);
    }

    #[test]
    fn tampered_resume_header_breaks_the_handshake() {
        let (c, s) = pair();
        let t = Ticket::generate();
        let (_, mut hello) = ClientHandshake::resume(&c.private, &s.public, &t, 1, (1, 1), Cipher::ChaChaPoly).unwrap();
        hello[6] ^= 1; // change the id: the prologue no longer matches (and lookup fails)
        let lookup =
            |_: &[u8; 16]| Some(ResumeLookup { client: c.public, psk: t.secret.clone(), received: 0, written: 0 });
        assert_eq!(respond(&hello, &s.private, |_| true, lookup).unwrap_err(), HandshakeError::Auth);
    }

    #[test]
    fn rejects_are_typed() {
        let (c, s) = pair();
        let t = Ticket::generate();
        let resume = || ClientHandshake::resume(&c.private, &s.public, &t, 1, (1, 1), Cipher::ChaChaPoly).unwrap().0;
        assert_eq!(
            resume().read_reply(&reject(RejectCode::UnknownSession)).unwrap_err(),
            HandshakeError::UnknownSession
        );
        assert_eq!(resume().read_reply(&reject(RejectCode::NotAllowed)).unwrap_err(), HandshakeError::NoLongerAllowed);
        // About a session, so not for a first connection: there they are unknown codes (found by
        // an implementation written from docs/PROTOCOL.md alone; a REJECT is not authenticated).
        let (hs, _) = ClientHandshake::initial(&c.private, &s.public, Cipher::ChaChaPoly, 1).unwrap();
        assert_eq!(hs.read_reply(&reject(RejectCode::UnknownSession)).unwrap_err(), HandshakeError::Rejected(1));
        let (hs, _) = ClientHandshake::initial(&c.private, &s.public, Cipher::ChaChaPoly, 1).unwrap();
        assert_eq!(hs.read_reply(&reject(RejectCode::NotAllowed)).unwrap_err(), HandshakeError::Rejected(4));
        let (hs, _) = ClientHandshake::initial(&c.private, &s.public, Cipher::ChaChaPoly, 1).unwrap();
        assert_eq!(hs.read_reply(&reject(RejectCode::Busy)).unwrap_err(), HandshakeError::Busy);
        let (_, hello) = ClientHandshake::initial(&c.private, &s.public, Cipher::ChaChaPoly, 1).unwrap();
        let mut bad = hello.clone();
        bad[4] = 9;
        assert_eq!(respond(&bad, &s.private, |_| true, |_| None).unwrap_err(), HandshakeError::Version(9));
        assert_eq!(respond(&hello[..5], &s.private, |_| true, |_| None).unwrap_err(), HandshakeError::Malformed);
    }
}
