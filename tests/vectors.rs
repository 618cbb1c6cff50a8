//! Deterministic test vectors for the wire protocol (`docs/PROTOCOL.md`, section "Test vectors").
//!
//! Every value is derived from fixed static keys, fixed ephemeral keys and fixed tickets. Noise
//! with fixed keys is deterministic (the nonces of both ciphers are counters), so the bytes never change
//! unless the protocol does: any change to a byte on the wire makes `vectors_are_unchanged`
//! fail. The same hex is copied into `docs/PROTOCOL.md`.
//!
//! To print the vectors (as a Rust table and as the Markdown used in the spec):
//!
//! ```text
//! HOLDFAST_PRINT_VECTORS=1 cargo test --release --test vectors -- --nocapture print_vectors
//! ```
//!
//! Besides the comparison with hard-coded hex, the tests check that
//! - an independent construction with plain `snow`, following only the text of the spec (hello
//!   header = Noise prologue, payload layouts, reply kind byte), gives the same bytes;
//! - two real [`Session`]s, fed the same transports, emit exactly the transcript records;
//! - every record opens with the peer's transport and every frame decodes back;
//! - every refusal record reads, on the client, as its code;
//! - section 21.5 of `docs/PROTOCOL.md` lists exactly these vectors, in this order, with these
//!   bytes.

use std::time::Instant;

use holdfast::keys::{PrivateKey, PublicKey};
use holdfast::proto::frame::{push_record, split_record};
use holdfast::proto::handshake::{
    reject, respond_with, ClientHandshake, HandshakeError, Hello, RejectCode, ResumeLookup, Ticket,
};
use holdfast::proto::{Cipher, CloseCode, Event, Frame, Role, Session, SessionConfig, SessionError, Transport};
use zeroize::Zeroizing;

// ---- fixed inputs -------------------------------------------------------------------------

/// 32 bytes `start, start+1, ..., start+31`.
fn seq32(start: u8) -> [u8; 32] {
    std::array::from_fn(|i| start.wrapping_add(i as u8))
}

/// 16 bytes `start, start+1, ..., start+15`.
fn seq16(start: u8) -> [u8; 16] {
    std::array::from_fn(|i| start.wrapping_add(i as u8))
}

/// Client static private key: `01 02 .. 20`.
fn client_static() -> PrivateKey {
    PrivateKey::from_bytes(seq32(0x01))
}

/// Server static private key: `21 22 .. 40`.
fn server_static() -> PrivateKey {
    PrivateKey::from_bytes(seq32(0x21))
}

/// Ephemeral private keys: client and server of the first connection (IK), then of the resume
/// (KKpsk0). Each is 32 consecutive byte values starting here.
const CLIENT_E_IK: u8 = 0x41;
const SERVER_E_IK: u8 = 0x61;
const CLIENT_E_KK: u8 = 0x81;
const SERVER_E_KK: u8 = 0xa1;

/// The first connection's timestamp (IK message 1 payload) and the resume's attempt number (in
/// the RESUME header).
const IK_STAMP: u64 = 0x1880_0000_0000_0001;
const KK_ATTEMPT: u64 = 1;

/// The ticket issued on the first connection: id `c1 .. d0`, secret `d1 .. f0`.
fn ticket1() -> Ticket {
    Ticket { resume_id: seq16(0xc1), secret: Zeroizing::new(seq32(0xd1)) }
}

/// The ticket issued on the resumed connection: id `11` x 16, secret `22` x 32.
fn ticket2() -> Ticket {
    Ticket { resume_id: [0x11; 16], secret: Zeroizing::new([0x22; 32]) }
}

/// Application bytes of the transcript.
/// Version 4: the client opens stream 1 and sends "hello" on it (OPEN 1, DATA 1).
const CLIENT_DATA: &[u8] = b"\x01\x00\x00\x00\x00\x00\x00\x00\x01\x02\x00\x00\x00\x00\x00\x00\x00\x01\x00\x05hello";
/// The server answers "world!" on stream 1 (DATA 1).
const SERVER_DATA: &[u8] = b"\x02\x00\x00\x00\x00\x00\x00\x00\x01\x00\x06world!";
/// The CLOSE reason this implementation sends on a normal finish (free text on the wire).
const FINISHED_REASON: &str = "session finished";

/// Offsets when the first link breaks: the client wrote its OPEN and "hello" (acknowledged) and
/// received "world!" (not yet acknowledged).
const CLIENT_RECEIVED: u64 = SERVER_DATA.len() as u64;
const CLIENT_WRITTEN: u64 = CLIENT_DATA.len() as u64;
const SERVER_RECEIVED: u64 = CLIENT_DATA.len() as u64;
const SERVER_WRITTEN: u64 = SERVER_DATA.len() as u64;

/// Plaintext-frame examples: values chosen so that byte order is visible.
const FRAME_DATA_OFFSET: u64 = 0x0102_0304_0506_0708;
const FRAME_ACK: u64 = 0x1112_1314_1516_1718;
const FRAME_FIN: u64 = 0x2122_2324_2526_2728;

// ---- helpers ------------------------------------------------------------------------------

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn encode(f: Frame<'_>) -> Vec<u8> {
    let mut v = Vec::new();
    f.encode(&mut v);
    v
}

fn record(body: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    push_record(&mut v, body);
    v
}

/// Seals one frame into a whole record (length prefix included).
fn seal(t: &mut Transport, f: Frame<'_>) -> Vec<u8> {
    let mut v = Vec::new();
    t.seal(&encode(f), &mut v).expect("seal");
    v
}

/// Opens one whole record (length prefix included) and returns its plaintext.
fn open(t: &mut Transport, rec: &[u8]) -> Vec<u8> {
    let (body, used) = split_record(rec).expect("a whole record");
    assert_eq!(used, rec.len(), "exactly one record");
    let mut out = vec![0u8; body.len()];
    let n = t.open(body, &mut out).expect("record opens");
    out.truncate(n);
    out
}

fn offsets(received: u64, written: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&received.to_be_bytes());
    b[8..].copy_from_slice(&written.to_be_bytes());
    b
}

// ---- the handshakes through the holdfast API ----------------------------------------------

struct Ik {
    hello: Vec<u8>,
    reply: Vec<u8>,
    client: Transport,
    server: Transport,
}

/// The first connection (IK) with ChaChaPoly, through the holdfast API.
fn ik() -> Ik {
    ik_with(Cipher::ChaChaPoly)
}

/// The first connection (IK) with `cipher`, through the holdfast API.
fn ik_with(cipher: Cipher) -> Ik {
    let (c, s) = (client_static(), server_static());
    let c_pub = c.public_key();
    let (hs, hello) = ClientHandshake::initial_with(&c, &s.public_key(), cipher, IK_STAMP, Some(&seq32(CLIENT_E_IK)))
        .expect("initial");
    let acc = respond_with(&hello, &s, |k| *k == c_pub, |_| None, Some(&seq32(SERVER_E_IK)), Some(ticket1()))
        .expect("respond IK");
    assert_eq!(acc.hello, Hello::Initial { client: c_pub, stamp: IK_STAMP });
    assert_eq!(acc.ticket.as_ref().map(|t| t.resume_id), Some(ticket1().resume_id));
    let done = hs.read_reply(&acc.reply).expect("IK reply");
    assert_eq!((done.server_received, done.server_written), (None, None));
    let t = done.ticket.expect("the IK reply carries the first ticket");
    assert_eq!((t.resume_id, *t.secret), (ticket1().resume_id, *ticket1().secret));
    Ik { hello, reply: acc.reply, client: done.transport, server: acc.transport }
}

/// The resume (KKpsk0) with ChaChaPoly, ticket 1 and the transcript's offsets, through the
/// holdfast API.
fn kk() -> Ik {
    kk_with(Cipher::ChaChaPoly)
}

/// The resume (KKpsk0) with `cipher`, ticket 1 and the transcript's offsets.
fn kk_with(cipher: Cipher) -> Ik {
    let (c, s) = (client_static(), server_static());
    let c_pub = c.public_key();
    let t1 = ticket1();
    let e = seq32(CLIENT_E_KK);
    let (hs, hello) = ClientHandshake::resume_with(
        &c,
        &s.public_key(),
        &t1,
        KK_ATTEMPT,
        (CLIENT_RECEIVED, CLIENT_WRITTEN),
        cipher,
        Some(&e),
    )
    .expect("resume");
    let lookup = |id: &[u8; 16]| {
        assert_eq!(id, &t1.resume_id);
        Some(ResumeLookup { client: c_pub, psk: t1.secret.clone(), received: SERVER_RECEIVED, written: SERVER_WRITTEN })
    };
    let allowed = |_: &PublicKey| -> bool { panic!("a resume never consults the allow-list") };
    let acc = respond_with(&hello, &s, allowed, lookup, Some(&seq32(SERVER_E_KK)), None).expect("respond KK");
    assert_eq!(
        acc.hello,
        Hello::Resume {
            resume_id: t1.resume_id,
            attempt: KK_ATTEMPT,
            client_received: CLIENT_RECEIVED,
            client_written: CLIENT_WRITTEN
        }
    );
    let done = hs.read_reply(&acc.reply).expect("KK reply");
    assert_eq!((done.server_received, done.server_written), (Some(SERVER_RECEIVED), Some(SERVER_WRITTEN)));
    Ik { hello, reply: acc.reply, client: done.transport, server: acc.transport }
}

// ---- the handshakes from the spec alone, with plain snow ----------------------------------

struct Spec {
    hello: Vec<u8>,
    reply: Vec<u8>,
    hash: Vec<u8>,
    client: snow::TransportState,
    server: snow::TransportState,
}

/// Builds one handshake as `docs/PROTOCOL.md` describes it, without holdfast's handshake code.
#[allow(clippy::too_many_arguments)]
fn spec_handshake(
    pattern: &str,
    header: &[u8],
    psk: Option<&[u8; 32]>,
    payload1: &[u8],
    payload2: &[u8],
    client_e: u8,
    server_e: u8,
) -> Spec {
    let (c, s) = (client_static(), server_static());
    let (c_pub, s_pub) = (c.public_key(), s.public_key());
    let mut ib = snow::Builder::new(pattern.parse().expect("pattern"))
        .prologue(header)
        .and_then(|b| b.local_private_key(c.as_bytes()))
        .and_then(|b| b.remote_public_key(s_pub.as_bytes()))
        .expect("initiator builder");
    let mut rb = snow::Builder::new(pattern.parse().expect("pattern"))
        .prologue(header)
        .and_then(|b| b.local_private_key(s.as_bytes()))
        .expect("responder builder");
    if pattern.contains("KK") {
        rb = rb.remote_public_key(c_pub.as_bytes()).expect("responder knows the client key");
    }
    if let Some(psk) = psk {
        ib = ib.psk(0, psk).expect("psk");
        rb = rb.psk(0, psk).expect("psk");
    }
    let (ie, re) = (seq32(client_e), seq32(server_e));
    let mut init = ib.fixed_ephemeral_key_for_testing_only(&ie).build_initiator().expect("initiator");
    let mut resp = rb.fixed_ephemeral_key_for_testing_only(&re).build_responder().expect("responder");

    let mut buf = [0u8; 1024];
    let n = init.write_message(payload1, &mut buf).expect("message 1");
    let mut hello = header.to_vec();
    hello.extend_from_slice(&buf[..n]);
    let mut got = [0u8; 1024];
    let k = resp.read_message(&buf[..n], &mut got).expect("read message 1");
    assert_eq!(&got[..k], payload1);

    let n = resp.write_message(payload2, &mut buf).expect("message 2");
    let mut reply = vec![0x01]; // ACCEPT
    reply.extend_from_slice(&buf[..n]);
    let k = init.read_message(&buf[..n], &mut got).expect("read message 2");
    assert_eq!(&got[..k], payload2);

    let hash = init.get_handshake_hash().to_vec();
    assert_eq!(hash, resp.get_handshake_hash());
    Spec {
        hello,
        reply,
        hash,
        client: init.into_transport_mode().expect("transport"),
        server: resp.into_transport_mode().expect("transport"),
    }
}

/// The IK reply's payload: ticket 1's resume id, then its secret.
fn ticket1_payload() -> Vec<u8> {
    let t1 = ticket1();
    [&t1.resume_id[..], &t1.secret[..]].concat()
}

fn spec_ik() -> Spec {
    let p = ticket1_payload();
    let stamp = IK_STAMP.to_be_bytes();
    spec_handshake("Noise_IK_25519_ChaChaPoly_BLAKE2s", b"HFST\x04\x01", None, &stamp, &p, CLIENT_E_IK, SERVER_E_IK)
}

fn spec_kk() -> Spec {
    spec_kk_with("Noise_KKpsk0_25519_ChaChaPoly_BLAKE2s", 0x02)
}

/// The AESGCM handshakes: kind bytes 0x11 and 0x12 (cipher code 1 in the high four bits).
fn spec_aes_ik() -> Spec {
    let p = ticket1_payload();
    let stamp = IK_STAMP.to_be_bytes();
    spec_handshake("Noise_IK_25519_AESGCM_BLAKE2s", b"HFST\x04\x11", None, &stamp, &p, CLIENT_E_IK, SERVER_E_IK)
}

fn spec_kk_with(pattern: &str, kind: u8) -> Spec {
    let t1 = ticket1();
    let mut header = b"HFST\x04".to_vec();
    header.push(kind);
    header.extend_from_slice(&t1.resume_id);
    header.extend_from_slice(&KK_ATTEMPT.to_be_bytes());
    spec_handshake(
        pattern,
        &header,
        Some(&t1.secret),
        &offsets(CLIENT_RECEIVED, CLIENT_WRITTEN),
        &offsets(SERVER_RECEIVED, SERVER_WRITTEN),
        CLIENT_E_KK,
        SERVER_E_KK,
    )
}

// ---- the vectors --------------------------------------------------------------------------

/// Every vector, in the order of `docs/PROTOCOL.md`. Records include their 2-byte length prefix.
fn compute() -> Vec<(&'static str, Vec<u8>)> {
    let mut v: Vec<(&'static str, Vec<u8>)> = Vec::new();
    let (c, s) = (client_static(), server_static());
    let (t1, t2) = (ticket1(), ticket2());

    // Keys.
    v.push(("client_static_private", c.as_bytes().to_vec()));
    v.push(("client_static_public", c.public_key().as_bytes().to_vec()));
    v.push(("server_static_private", s.as_bytes().to_vec()));
    v.push(("server_static_public", s.public_key().as_bytes().to_vec()));

    // Plaintext frames.
    v.push(("frame_data", encode(Frame::Data { offset: FRAME_DATA_OFFSET, data: b"abc" })));
    v.push(("frame_ack", encode(Frame::Ack(FRAME_ACK))));
    v.push(("frame_ping", encode(Frame::Ping)));
    v.push(("frame_pong", encode(Frame::Pong)));
    v.push(("frame_ticket", encode(Frame::Ticket { resume_id: t1.resume_id, secret: &t1.secret })));
    v.push(("frame_ticket_ack", encode(Frame::TicketAck(t1.resume_id))));
    v.push(("frame_fin", encode(Frame::Fin(FRAME_FIN))));
    v.push(("frame_close", encode(Frame::Close { code: CloseCode::Expired.to_u16(), reason: "gave up" })));
    v.push(("frame_close_empty", encode(Frame::Close { code: CloseCode::Normal.to_u16(), reason: "" })));

    // First connection: IK handshake, then transport records in the order they are sent.
    let mut ik = ik();
    v.push(("ik_hello", record(&ik.hello)));
    v.push(("ik_reply", record(&ik.reply)));
    v.push(("ik_handshake_hash", spec_ik().hash));
    v.push(("ik_c0_ack", seal(&mut ik.client, Frame::Ack(0))));
    v.push(("ik_c1_data", seal(&mut ik.client, Frame::Data { offset: 0, data: CLIENT_DATA })));
    v.push(("ik_s0_ack", seal(&mut ik.server, Frame::Ack(0))));
    v.push(("ik_s1_ack", seal(&mut ik.server, Frame::Ack(CLIENT_DATA.len() as u64))));
    v.push(("ik_s2_data", seal(&mut ik.server, Frame::Data { offset: 0, data: SERVER_DATA })));

    // The link breaks. Resume with ticket 1: KKpsk0 handshake, then records.
    let mut kk = kk();
    v.push(("kk_hello", record(&kk.hello)));
    v.push(("kk_reply", record(&kk.reply)));
    v.push(("kk_handshake_hash", spec_kk().hash));
    v.push(("kk_c0_ack", seal(&mut kk.client, Frame::Ack(CLIENT_RECEIVED))));
    v.push(("kk_s0_ack", seal(&mut kk.server, Frame::Ack(SERVER_RECEIVED))));
    v.push(("kk_s1_ticket", seal(&mut kk.server, Frame::Ticket { resume_id: t2.resume_id, secret: &t2.secret })));
    v.push(("kk_c1_ticket_ack", seal(&mut kk.client, Frame::TicketAck(t2.resume_id))));
    v.push(("kk_c2_fin", seal(&mut kk.client, Frame::Fin(CLIENT_WRITTEN))));
    v.push(("kk_s2_ack", seal(&mut kk.server, Frame::Ack(CLIENT_WRITTEN + 1))));
    v.push(("kk_s3_fin", seal(&mut kk.server, Frame::Fin(SERVER_WRITTEN))));
    v.push(("kk_c3_ack", seal(&mut kk.client, Frame::Ack(SERVER_WRITTEN + 1))));
    v.push(("kk_c4_close", seal(&mut kk.client, Frame::Close { code: 0, reason: FINISHED_REASON })));
    v.push(("kk_s4_close", seal(&mut kk.server, Frame::Close { code: 0, reason: FINISHED_REASON })));

    // Refusals.
    v.push(("reject_unknown_session", record(&reject(RejectCode::UnknownSession))));
    v.push(("reject_busy", record(&reject(RejectCode::Busy))));
    v.push(("reject_stale", record(&reject(RejectCode::Stale))));
    v.push(("reject_not_allowed", record(&reject(RejectCode::NotAllowed))));
    v.push(("reject_version", record(&reject(RejectCode::Version))));

    // Rekey: a fresh copy of the first connection; each side sends PINGs only. The record with
    // nonce 65535 is the last under the handshake key, nonce 65536 the first under REKEY(k).
    let mut ik = self::ik();
    let (mut c_last, mut s_last) = (Vec::new(), Vec::new());
    for n in 0..=65536u32 {
        let cr = seal(&mut ik.client, Frame::Ping);
        let sr = seal(&mut ik.server, Frame::Ping);
        assert_eq!(open(&mut ik.server, &cr), [0x03]);
        assert_eq!(open(&mut ik.client, &sr), [0x03]);
        if n == 65535 {
            v.push(("rekey_c65535_ping", cr));
            v.push(("rekey_s65535_ping", sr));
        } else if n == 65536 {
            c_last = cr;
            s_last = sr;
        }
    }
    v.push(("rekey_c65536_ping", c_last));
    v.push(("rekey_s65536_ping", s_last));

    // The same first connection and resume with AESGCM, and its rekey.
    let mut ik = ik_with(Cipher::AesGcm);
    v.push(("aes_ik_hello", record(&ik.hello)));
    v.push(("aes_ik_reply", record(&ik.reply)));
    v.push(("aes_ik_handshake_hash", spec_aes_ik().hash));
    v.push(("aes_ik_c0_ack", seal(&mut ik.client, Frame::Ack(0))));
    v.push(("aes_ik_c1_data", seal(&mut ik.client, Frame::Data { offset: 0, data: CLIENT_DATA })));
    v.push(("aes_ik_s0_ack", seal(&mut ik.server, Frame::Ack(0))));
    let mut kk = kk_with(Cipher::AesGcm);
    v.push(("aes_kk_hello", record(&kk.hello)));
    v.push(("aes_kk_reply", record(&kk.reply)));
    v.push(("aes_kk_c0_ack", seal(&mut kk.client, Frame::Ack(CLIENT_RECEIVED))));
    v.push(("aes_kk_s0_ack", seal(&mut kk.server, Frame::Ack(SERVER_RECEIVED))));
    let mut ik = ik_with(Cipher::AesGcm);
    for n in 0..=65536u32 {
        let cr = seal(&mut ik.client, Frame::Ping);
        assert_eq!(open(&mut ik.server, &cr), [0x03]);
        if n == 65535 {
            v.push(("aes_rekey_c65535_ping", cr));
        } else if n == 65536 {
            v.push(("aes_rekey_c65536_ping", cr));
        }
    }
    v
}

/// The expected vectors, as printed by `print_vectors`.
const EXPECTED: &[(&str, &str)] = &[
    ("client_static_private", "0102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f20"),
    ("client_static_public", "07a37cbc142093c8b755dc1b10e86cb426374ad16aa853ed0bdfc0b2b86d1c7c"),
    ("server_static_private", "2122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f40"),
    ("server_static_public", "5869aff450549732cbaaed5e5df9b30a6da31cb0e5742bad5ad4a1a768f1a67b"),
    ("frame_data", "010102030405060708616263"),
    ("frame_ack", "021112131415161718"),
    ("frame_ping", "03"),
    ("frame_pong", "04"),
    ("frame_ticket", "05c1c2c3c4c5c6c7c8c9cacbcccdcecfd0d1d2d3d4d5d6d7d8d9dadbdcdddedfe0e1e2e3e4e5e6e7e8e9eaebecedeeeff0"),
    ("frame_ticket_ack", "06c1c2c3c4c5c6c7c8c9cacbcccdcecfd0"),
    ("frame_fin", "072122232425262728"),
    ("frame_close", "08000367617665207570"),
    ("frame_close_empty", "080000"),
    ("ik_hello", "006e48465354040164b101b1d0be5a8704bd078f9895001fc03e8e9f9522f188dd128d9846d48466822e8514e6389169bdfd10afecae5bded9cda3f0157ac1d03cd3620b3bb73a869f70c63e9719032887af39f19a5bc71a1f4cd6e8ca28b11b6c0b52d16c805fa3edc627ece83e0888"),
    ("ik_reply", "006101244fe3b963e899dd295baffce248d3530f3a9a7479ba063002680ebfe7adad492c17683439e4e76736b50e6af787d681c501825b2b1c6c819aebbfe17ac66a4391e0f1410355fe45a1ba8ea1c2851c4fb58e760edfe4ac0b3ece30c88599e884"),
    ("ik_handshake_hash", "2551b49598c650ec369ed34e2111be9d0503137c8070f7cbf654786821f00640"),
    ("ik_c0_ack", "00197b686105d5982fa781811601c3ae2010089cf3818e18dc7dbf"),
    ("ik_c1_data", "003238bb6c3d302d1ed6835e428cf7806f7506c2282963e3eda5bfc727556b76c5d96ae703a3d8e5ccddfa1c8b80ac1ce63fec55"),
    ("ik_s0_ack", "0019672eacae43463e51c76c04ced4803a3a686916ed9fe95b5d65"),
    ("ik_s1_ack", "0019972a0c4112713d5d417e7bddf044fea516d4ff57507df7a3aa"),
    ("ik_s2_data", "002a876fd19e580bc6821865403cd8f95703b95391e99b6215c9c56dc53fae8af42a9b48fb7cb7fddca21b4b"),
    ("kk_hello", "005e484653540402c1c2c3c4c5c6c7c8c9cacbcccdcecfd00000000000000001883186b800b41d5cf0429695da9b3cc4f328ebcd184a6e482fa578c103f06c7765e789e7ac8e01ba74ab5e608ee2eb5a345eb9f054405df79a726b0ebe1a2c7f"),
    ("kk_reply", "004101ad438bfae31f6c093d61d4339255ea798092c9fadd07b97827f4b0ae9dee7c1c4aec0bd1ff7c691e894a4fb4c631f37488569125c4b3cf2b3500a1b871b934b6"),
    ("kk_handshake_hash", "1bb025037bd6499fd0fe0c388c420ae72d18057d40d33f0db6655644287f66a3"),
    ("kk_c0_ack", "00198f3ac7835f1e95f7b4f42f51f0d26bfa68ada46146ed32ae75"),
    ("kk_s0_ack", "0019c3b84864a97e6dfb72654cdf27e2ddd2604883128ee4e4ff95"),
    ("kk_s1_ticket", "00410d41bcb127569b83abcbcb5d44ae63e4c0904b8ef43471ea709ff38173dd7ebd5a16e19ac3bdfd101c0de97771337c87298adc374d5e410f249ce5b272fb7461af"),
    ("kk_c1_ticket_ack", "00218184bf603f93918b93a8df98696a8da7e86021d0688a42b63170168c63b2155ee3"),
    ("kk_c2_fin", "00190eab91ae64429ac7d6bb588fee02682171f8e66325d97efc9e"),
    ("kk_s2_ack", "00195af8e5aeee05edcd99db155258e03033a3b61a8bfe98cd7a35"),
    ("kk_s3_fin", "0019e8d197d092fbdcfd64c9ad0a2dffb971e81ab15ecca3da1823"),
    ("kk_c3_ack", "001966e8faffd0fc67dbd03bc44ba4514b45b4177da1dfc50a9f7c"),
    ("kk_c4_close", "00235d7c5273de8860b63c2b4ccafe31559c1173d7eba341866367fb11fa068baa56ffa66f"),
    ("kk_s4_close", "00233c67b9bb5b632313590cea8f35bbfe4f67b43a7fd17351f35a15751db55711ae0256cc"),
    ("reject_unknown_session", "00020201"),
    ("reject_busy", "00020202"),
    ("reject_stale", "00020203"),
    ("reject_not_allowed", "00020204"),
    ("reject_version", "00020205"),
    ("rekey_c65535_ping", "00113c3f03a4cd7b397a8558ef0b4108600993"),
    ("rekey_s65535_ping", "0011b3f0fac3d6b2f7d24b060b97d0cd030efb"),
    ("rekey_c65536_ping", "0011bce4ebce1446167c9da6bfb2c533bd60c7"),
    ("rekey_s65536_ping", "00110f0998ebe98875e190f2772bcd5c882a8c"),
    ("aes_ik_hello", "006e48465354041164b101b1d0be5a8704bd078f9895001fc03e8e9f9522f188dd128d9846d4846646827802af3740a34789100b896912f09bcf44ba01197fbf5abe55aac99e8b776c70d45037520a31ad53a24adbe2af19b02297349e6b136ae94680bddd54ae313afc60a3daea0435"),
    ("aes_ik_reply", "006101244fe3b963e899dd295baffce248d3530f3a9a7479ba063002680ebfe7adad494de19aeaf5abebac6f3b284de6dae017f41479515a17dfc14e1072e393d067a0bf2a88a56758e9ee9b1074d95e23fc029aef3f545234c98fe02b2967d5e68eff"),
    ("aes_ik_handshake_hash", "98371902b8e4309910f7886840a50137e824ee860c35d08d55b0017cced0ab07"),
    ("aes_ik_c0_ack", "0019dfacd5310f2829b7223da777efcbf68e0d3dcb37f953681248"),
    ("aes_ik_c1_data", "0032eefd9070fdf67b0e894f92d2d3571d893e690f56cc11bfb70f1000398b91870e14b12b6ea6cc46e2c0cc66deed6ab9a09df9"),
    ("aes_ik_s0_ack", "0019255db59af3e136081eee84d3c0891f798873da72b8e5dcef96"),
    ("aes_kk_hello", "005e484653540412c1c2c3c4c5c6c7c8c9cacbcccdcecfd00000000000000001883186b800b41d5cf0429695da9b3cc4f328ebcd184a6e482fa578c103f06c778b6e615514c90f06ee3318f47d85cd2c616e53abcda07f5da3f1d4ad03ce96a4"),
    ("aes_kk_reply", "004101ad438bfae31f6c093d61d4339255ea798092c9fadd07b97827f4b0ae9dee7c1c5d496f89e17e270e778330ceb6cbd552202bcde8d9e03aa86040114623b96712"),
    ("aes_kk_c0_ack", "0019b5e6b608c74dc8d45507f3d73d3737611ebbcaf70cb5a335ff"),
    ("aes_kk_s0_ack", "0019def3448a67be4533b5f8044ebb96a0e4c14adf69b8e96f8c11"),
    ("aes_rekey_c65535_ping", "001189704f39f23d651ac0e5994c790f850acb"),
    ("aes_rekey_c65536_ping", "0011a0e4b666d5f9c6d29a968ffdf9d59f9d0d"),
];

#[test]
fn vectors_are_unchanged() {
    let got = compute();
    let names: Vec<_> = got.iter().map(|(n, _)| *n).collect();
    let want: Vec<_> = EXPECTED.iter().map(|(n, _)| *n).collect();
    assert_eq!(names, want, "the set of vectors changed");
    for ((name, bytes), (_, hexed)) in got.iter().zip(EXPECTED) {
        assert_eq!(hex(bytes), *hexed, "vector {name} changed: the wire protocol is no longer the documented one");
    }
}

fn get(v: &[(&'static str, Vec<u8>)], name: &str) -> Vec<u8> {
    v.iter().find(|(n, _)| *n == name).map(|(_, b)| b.clone()).unwrap_or_else(|| panic!("no vector {name}"))
}

#[test]
fn spec_construction_matches_the_implementation() {
    let v = compute();
    let c_pub = client_static().public_key();

    // IK: header "HFST" 03 01 is the prologue; message 1's payload is the timestamp, message 2's is
    // ticket 1 (id || secret); reply = 0x01 || message 2.
    let mut ik = spec_ik();
    assert_eq!(record(&ik.hello), get(&v, "ik_hello"));
    assert_eq!(record(&ik.reply), get(&v, "ik_reply"));
    // The client's static key travels (encrypted) in message 1: bytes 6+32 .. 6+32+48.
    let mut plain = [0u8; 64];
    let n = ik.client.write_message(&[0x02, 0, 0, 0, 0, 0, 0, 0, 0], &mut plain).expect("seal ACK(0)");
    assert_eq!(record(&plain[..n]), get(&v, "ik_c0_ack"));
    let body = get(&v, "ik_s0_ack");
    let n = ik.client.read_message(&body[2..], &mut plain).expect("open ACK(0)");
    assert_eq!(&plain[..n], &[0x02, 0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(ik.server.get_remote_static(), Some(&c_pub.as_bytes()[..]));

    // KKpsk0: header "HFST" 03 02 || resume_id || attempt is the prologue; psk = ticket secret at
    // position 0; payloads = received || written, u64 big-endian each.
    let mut kk = spec_kk();
    assert_eq!(record(&kk.hello), get(&v, "kk_hello"));
    assert_eq!(record(&kk.reply), get(&v, "kk_reply"));
    let ack = encode(Frame::Ack(CLIENT_RECEIVED));
    let n = kk.client.write_message(&ack, &mut plain).expect("seal ACK(6)");
    assert_eq!(record(&plain[..n]), get(&v, "kk_c0_ack"));
    let body = get(&v, "kk_s0_ack");
    let n = kk.client.read_message(&body[2..], &mut plain).expect("open ACK(5)");
    assert_eq!(&plain[..n], encode(Frame::Ack(SERVER_RECEIVED)));

    // AESGCM: the same construction with kind bytes 0x11 / 0x12 and the AESGCM protocol names.
    // snow's own transport (big-endian nonces, its own REKEY) gives the same records.
    let mut aes = spec_aes_ik();
    assert_eq!(record(&aes.hello), get(&v, "aes_ik_hello"));
    assert_eq!(record(&aes.reply), get(&v, "aes_ik_reply"));
    assert_eq!(aes.hash, get(&v, "aes_ik_handshake_hash"));
    let n = aes.client.write_message(&encode(Frame::Ack(0)), &mut plain).expect("seal ACK(0)");
    assert_eq!(record(&plain[..n]), get(&v, "aes_ik_c0_ack"));
    let body = get(&v, "aes_ik_s0_ack");
    let n = aes.client.read_message(&body[2..], &mut plain).expect("open ACK(0)");
    assert_eq!(&plain[..n], encode(Frame::Ack(0)));
    let aes_kk = spec_kk_with("Noise_KKpsk0_25519_AESGCM_BLAKE2s", 0x12);
    assert_eq!(record(&aes_kk.hello), get(&v, "aes_kk_hello"));
    assert_eq!(record(&aes_kk.reply), get(&v, "aes_kk_reply"));
    let mut aes = spec_aes_ik();
    for k in 0..=65536u32 {
        if k == 65536 {
            aes.client.rekey_outgoing();
        }
        let n = aes.client.write_message(&[0x03], &mut plain).expect("seal PING");
        if k == 65535 {
            assert_eq!(record(&plain[..n]), get(&v, "aes_rekey_c65535_ping"));
        }
        if k == 65536 {
            assert_eq!(record(&plain[..n]), get(&v, "aes_rekey_c65536_ping"));
        }
    }

    // Sizes stated in the spec.
    assert_eq!(ik.hello.len(), 6 + 32 + 48 + 8 + 16);
    assert_eq!(ik.reply.len(), 1 + 32 + 48 + 16);
    assert_eq!(kk.hello.len(), 30 + 32 + 16 + 16);
    assert_eq!(kk.reply.len(), 1 + 32 + 16 + 16);
}

/// Two real sessions, fed the transports of the vectors, emit exactly the transcript.
#[test]
fn sessions_emit_the_transcript() {
    let v = compute();
    let now = Instant::now();
    let big = 1 << 20;
    let mut client = Session::new(Role::Client, SessionConfig::default());
    let mut server = Session::new(Role::Server, SessionConfig::default());

    // First connection. The reply carried ticket 1; the client writes at once, so its data
    // follows the confirming ACK in the same flight.
    let ik = ik();
    client.attach(now, ik.client, 0, None, None).expect("client attach");
    client.adopt_ticket(ticket1());
    assert_eq!(client.poll_event(), Some(Event::TicketReceived));
    assert_eq!(client.write(CLIENT_DATA), Ok(CLIENT_DATA.len()));
    let mut out = Vec::new();
    client.poll_transmit(now, &mut out, big).expect("client transmit");
    let first = get(&v, "ik_c0_ack");
    assert_eq!(hex(&out), hex(&[first.clone(), get(&v, "ik_c1_data")].concat()), "the first record on a link is ACK");

    // Key confirmation: the server opens the first record, then commits and adopts ticket 1.
    let mut st = ik.server;
    let confirm = open(&mut st, &first);
    server.attach(now, st, 0, None, None).expect("server attach");
    server.adopt_ticket(ticket1());
    server.handle_frame(now, &confirm).expect("confirmation frame");
    assert_eq!(server.poll_event(), Some(Event::TicketIssued(ticket1().resume_id)));
    let mut out = Vec::new();
    server.poll_transmit(now, &mut out, big).expect("server transmit");
    assert_eq!(hex(&out), hex(&get(&v, "ik_s0_ack")));
    feed(&mut client, now, &out);
    let data = get(&v, "ik_c1_data");
    feed(&mut server, now, &data);

    assert_eq!(server.write(SERVER_DATA), Ok(SERVER_DATA.len()));
    let mut out = Vec::new();
    server.poll_transmit(now, &mut out, big).expect("server transmit");
    assert_eq!(hex(&out), hex(&[get(&v, "ik_s1_ack"), get(&v, "ik_s2_data")].concat()));
    feed(&mut client, now, &out);

    // The link breaks before the client acknowledges "world!".
    client.detach();
    server.detach();
    assert_eq!((client.received_offset(), client.written_offset()), (CLIENT_RECEIVED, CLIENT_WRITTEN));
    assert_eq!((server.received_offset(), server.written_offset()), (SERVER_RECEIVED, SERVER_WRITTEN));
    assert_eq!(client.ticket().map(|t| t.resume_id), Some(ticket1().resume_id));

    // Resume.
    let kk = kk();
    let a = client.attach(now, kk.client, SERVER_RECEIVED, None, None).expect("client resume attach");
    assert_eq!(a.replayed, 0);
    let mut out = Vec::new();
    client.poll_transmit(now, &mut out, big).expect("client transmit");
    assert_eq!(hex(&out), hex(&get(&v, "kk_c0_ack")));
    let mut st = kk.server;
    let confirm = open(&mut st, &out);
    let a = server
        .attach(now, st, CLIENT_RECEIVED, Some(ticket1().resume_id), Some(ticket2()))
        .expect("server resume attach");
    assert_eq!(a.replayed, 0);
    server.handle_frame(now, &confirm).expect("confirmation frame");
    assert_eq!(server.poll_event(), Some(Event::TicketIssued(ticket2().resume_id)));
    let mut ids: Vec<_> = server.ticket_ids().collect();
    ids.sort();
    assert_eq!(ids, vec![ticket2().resume_id, ticket1().resume_id], "used and new ticket both live");
    let mut out = Vec::new();
    server.poll_transmit(now, &mut out, big).expect("server transmit");
    assert_eq!(hex(&out), hex(&[get(&v, "kk_s0_ack"), get(&v, "kk_s1_ticket")].concat()));
    feed(&mut client, now, &out);
    assert_eq!(client.poll_event(), Some(Event::TicketReceived));

    // The client finishes its stream.
    client.shutdown();
    let mut out = Vec::new();
    client.poll_transmit(now, &mut out, big).expect("client transmit");
    assert_eq!(hex(&out), hex(&[get(&v, "kk_c1_ticket_ack"), get(&v, "kk_c2_fin")].concat()));
    feed(&mut server, now, &out);
    assert_eq!(server.poll_event(), Some(Event::TicketRetired(ticket1().resume_id)));
    assert_eq!(server.ticket_ids().collect::<Vec<_>>(), vec![ticket2().resume_id]);
    assert!(server.peer_finished());

    server.shutdown();
    let mut out = Vec::new();
    server.poll_transmit(now, &mut out, big).expect("server transmit");
    assert_eq!(hex(&out), hex(&[get(&v, "kk_s2_ack"), get(&v, "kk_s3_fin")].concat()));
    feed(&mut client, now, &out);
    assert!(client.is_finished());

    // Both FINs are acknowledged on the client: it closes (as the driver does).
    client.close(CloseCode::Normal, SessionError::Finished);
    let mut out = Vec::new();
    client.poll_transmit(now, &mut out, big).expect("client transmit");
    assert_eq!(hex(&out), hex(&[get(&v, "kk_c3_ack"), get(&v, "kk_c4_close")].concat()), "ACK, then CLOSE");
    feed(&mut server, now, &out);
    assert!(server.is_finished(), "CLOSE Normal after both FINs completes the server's FIN");
    server.close(CloseCode::Normal, SessionError::Finished);
    let mut out = Vec::new();
    server.poll_transmit(now, &mut out, big).expect("server transmit");
    assert_eq!(hex(&out), hex(&get(&v, "kk_s4_close")));

    let mut buf = [0u8; 64];
    assert_eq!(client.read(&mut buf), Ok(Some(SERVER_DATA.len())));
    assert_eq!(&buf[..SERVER_DATA.len()], SERVER_DATA);
    assert_eq!(client.read(&mut buf), Ok(Some(0)), "EOF after every byte");
    assert_eq!(server.read(&mut buf), Ok(Some(CLIENT_DATA.len())));
    assert_eq!(&buf[..CLIENT_DATA.len()], CLIENT_DATA);
    assert_eq!(server.read(&mut buf), Ok(Some(0)));
}

/// Feeds a run of records to a session.
fn feed(s: &mut Session, now: Instant, mut wire: &[u8]) {
    while let Some((body, used)) = split_record(wire) {
        s.handle_record(now, body).expect("record accepted");
        wire = &wire[used..];
    }
    assert!(wire.is_empty(), "trailing partial record");
}

/// Every frame vector decodes back to its frame; every transcript record opens to its frame.
#[test]
fn frames_decode_and_records_open() {
    let v = compute();
    let t1 = ticket1();
    let frames: &[(&str, Frame<'_>)] = &[
        ("frame_data", Frame::Data { offset: FRAME_DATA_OFFSET, data: b"abc" }),
        ("frame_ack", Frame::Ack(FRAME_ACK)),
        ("frame_ping", Frame::Ping),
        ("frame_pong", Frame::Pong),
        ("frame_ticket", Frame::Ticket { resume_id: t1.resume_id, secret: &t1.secret }),
        ("frame_ticket_ack", Frame::TicketAck(t1.resume_id)),
        ("frame_fin", Frame::Fin(FRAME_FIN)),
        ("frame_close", Frame::Close { code: 3, reason: "gave up" }),
        ("frame_close_empty", Frame::Close { code: 0, reason: "" }),
    ];
    for (name, f) in frames {
        let bytes = get(&v, name);
        assert_eq!(&Frame::decode(&bytes).expect(name), f, "{name}");
    }

    let mut ik = ik();
    for name in ["ik_c0_ack", "ik_c1_data"] {
        let plain = open(&mut ik.server, &get(&v, name));
        Frame::decode(&plain).expect(name);
    }
    for name in ["ik_s0_ack", "ik_s1_ack", "ik_s2_data"] {
        let plain = open(&mut ik.client, &get(&v, name));
        Frame::decode(&plain).expect(name);
    }
    let mut kk = kk();
    for name in ["kk_c0_ack", "kk_c1_ticket_ack", "kk_c2_fin", "kk_c3_ack", "kk_c4_close"] {
        let plain = open(&mut kk.server, &get(&v, name));
        Frame::decode(&plain).expect(name);
    }
    for name in ["kk_s0_ack", "kk_s1_ticket", "kk_s2_ack", "kk_s3_fin", "kk_s4_close"] {
        let plain = open(&mut kk.client, &get(&v, name));
        Frame::decode(&plain).expect(name);
    }
}

/// The refusal vectors are what the server sends (`reject`, above) and what a client reads as
/// each refusal.
#[test]
fn refusals_read_as_their_codes() {
    let v = compute();
    // UNKNOWN_SESSION and NOT_ALLOWED are about a session: only a resume reads them as such; to
    // a first connection they are unknown codes (docs/PROTOCOL.md section 8).
    for (name, want, resume_only) in [
        ("reject_unknown_session", HandshakeError::UnknownSession, Some(1)),
        ("reject_busy", HandshakeError::Busy, None),
        ("reject_stale", HandshakeError::Stale, None),
        ("reject_not_allowed", HandshakeError::NoLongerAllowed, Some(4)),
        ("reject_version", HandshakeError::OtherVersion, None),
    ] {
        let rec = get(&v, name);
        let (body, used) = split_record(&rec).expect("a whole record");
        assert_eq!(used, rec.len());
        let (hs, _) = ClientHandshake::initial_with(
            &client_static(),
            &server_static().public_key(),
            Cipher::ChaChaPoly,
            IK_STAMP,
            Some(&seq32(CLIENT_E_IK)),
        )
        .expect("hello");
        let first = hs.read_reply(body).err();
        match resume_only {
            None => assert_eq!(first, Some(want), "{name}"),
            Some(code) => {
                assert_eq!(first, Some(HandshakeError::Rejected(code)), "{name} to a first connection");
                let ticket = holdfast::proto::Ticket::generate();
                let (hs, _) = ClientHandshake::resume(
                    &client_static(),
                    &server_static().public_key(),
                    &ticket,
                    1,
                    (0, 0),
                    Cipher::ChaChaPoly,
                )
                .expect("resume hello");
                assert_eq!(hs.read_reply(body).err(), Some(want), "{name}");
            }
        }
    }
}

/// `docs/PROTOCOL.md` section 21.5 holds every vector, in the order of [`compute`], with the
/// same bytes: the text cannot fall behind the code.
#[test]
fn the_document_holds_every_vector() {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/PROTOCOL.md")).expect("read PROTOCOL.md");
    let start = doc.find("\n### 21.5 Values").expect("section 21.5");
    let end = start + doc[start..].find("\n## 22.").expect("section 22 after 21.5");
    let mut documented: Vec<(String, String)> = Vec::new();
    let mut lines = doc[start..end].lines();
    while let Some(line) = lines.next() {
        let Some(rest) = line.strip_prefix("#### `") else { continue };
        let name = rest.split('`').next().expect("a name").to_string();
        let mut hexed = String::new();
        let mut inside = false;
        for l in lines.by_ref() {
            match (inside, l.trim()) {
                (false, "```") => inside = true,
                (true, "```") => break,
                (true, h) => hexed.push_str(h),
                (false, _) => {}
            }
        }
        documented.push((name, hexed));
    }
    let got: Vec<(String, String)> = compute().iter().map(|(n, b)| (n.to_string(), hex(b))).collect();
    let names = |v: &[(String, String)]| v.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(names(&documented), names(&got), "section 21.5 does not list the vectors of the code, in order");
    for ((name, doc_hex), (_, code_hex)) in documented.iter().zip(&got) {
        assert_eq!(doc_hex, code_hex, "section 21.5 gives other bytes for {name}");
    }
}

/// Prints the vectors when `HOLDFAST_PRINT_VECTORS=1`.
#[test]
fn print_vectors() {
    if std::env::var_os("HOLDFAST_PRINT_VECTORS").is_none_or(|v| v != "1") {
        return;
    }
    let v = compute();
    println!("const EXPECTED: &[(&str, &str)] = &[");
    for (name, bytes) in &v {
        println!("    (\"{name}\", \"{}\"),", hex(bytes));
    }
    println!("];\n");
    for (name, bytes) in &v {
        println!("{name} ({} bytes):\n```", bytes.len());
        for line in bytes.chunks(32) {
            println!("{}", hex(line));
        }
        println!("```");
    }
}

/// Section 13.10's table of stream frames gives the bytes [`Header::encode`] writes.
#[test]
fn the_stream_frame_examples_are_the_codes_own() {
    use holdfast::proto::streams::wire::{Header, MAX_HEADER};
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/PROTOCOL.md")).expect("read PROTOCOL.md");
    let table = &doc[doc.find("### 13.10 Examples").expect("section 13.10")..];
    let cases = [
        ("OPEN, id 1", Header::Open(1), &b""[..]),
        ("DATA, id 1, `\"hi\"`", Header::Data { id: 1, len: 2 }, &b"hi"[..]),
        ("WINDOW, id 2, add 65536", Header::Window { id: 2, add: 65536 }, &b""[..]),
        ("FIN, id 1", Header::Fin(1), &b""[..]),
        ("RESET, id 3, code 1 (LIMIT)", Header::Reset { id: 3, code: 1 }, &b""[..]),
        ("STREAMS, max 128", Header::Streams(128), &b""[..]),
    ];
    for (label, head, payload) in cases {
        let row =
            table.lines().find(|l| l.starts_with(&format!("| {label} |"))).unwrap_or_else(|| panic!("no row {label}"));
        let documented: String =
            row.split('`').nth(if label.contains('`') { 3 } else { 1 }).unwrap().split_whitespace().collect();
        let mut b = [0u8; MAX_HEADER];
        let n = head.encode(&mut b);
        let mut bytes = b[..n].to_vec();
        bytes.extend_from_slice(payload);
        assert_eq!(documented, hex(&bytes), "{label}");
    }
}

/// Section 21.2's layout of the handshake records gives, field by field, the bytes of the
/// records in section 21.5 (whole or as `first…last`): an independent implementation found
/// five of them left from an earlier version.
#[test]
fn the_layout_of_the_handshake_records_is_the_vectors_own() {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/PROTOCOL.md")).expect("read PROTOCOL.md");
    let from = doc.find("Layout of the handshake records:").expect("the layout in section 21.2");
    let block = doc[from..].split("```").nth(1).expect("the layout's block");
    let vectors = compute();
    // Each record's name and its fields: the hex as written, and its length in bytes if given.
    type Fields = Vec<(String, Option<usize>)>;
    let mut fields: Vec<(String, Fields)> = Vec::new();
    for line in block.lines().skip(1).filter(|l| !l.trim().is_empty()) {
        let chars: Vec<char> = line.chars().collect();
        let name: String = chars[..10].iter().collect::<String>().trim().to_string();
        let column: String = chars[10..49.min(chars.len())].iter().collect();
        let described: String = chars[49.min(chars.len())..].iter().collect();
        let len = described.rsplit_once('(').and_then(|(_, n)| n.trim_end_matches(')').parse::<usize>().ok());
        if !name.is_empty() {
            fields.push((name, Vec::new()));
        }
        let tokens: Vec<&str> = column.split_whitespace().collect();
        let record = &mut fields.last_mut().expect("a record's name first").1;
        for (i, t) in tokens.iter().enumerate() {
            record.push((t.to_string(), if i + 1 == tokens.len() { len } else { None }));
        }
    }
    assert_eq!(fields.len(), 4, "four handshake records in the layout");
    for (name, tokens) in fields {
        let bytes = &vectors.iter().find(|(n, _)| *n == name).unwrap_or_else(|| panic!("no vector {name}")).1;
        let whole = hex(bytes);
        let mut at = 0;
        for (token, len) in tokens {
            let rest = &whole[at..];
            let taken = match token.split_once('…') {
                None => {
                    assert!(rest.starts_with(&token), "{name}: {token} where the record has {}", &rest[..token.len()]);
                    token.len()
                }
                Some((first, last)) => {
                    let n = match len {
                        Some(n) => 2 * n,
                        None => rest[first.len()..].find(last).expect("the field's end") + first.len() + last.len(),
                    };
                    let field = &rest[..n];
                    assert!(
                        field.starts_with(first) && field.ends_with(last),
                        "{name}: {token} where the record has {}…{}",
                        &field[..first.len()],
                        &field[n - last.len()..]
                    );
                    n
                }
            };
            at += taken;
        }
        assert_eq!(at, whole.len(), "{name}: the layout does not cover the whole record");
    }
}
