//! Security properties on the stable toolchain, so CI covers what the fuzzers cover:
//!
//! - the fuzz entry points (`fuzz/src/lib.rs`, included here) on proptest-generated input
//!   and on every file of the committed seed corpus (`fuzz/corpus/<target>/`);
//! - no secret in `Debug` output;
//! - private key file permissions;
//! - core dumps disabled by `holdfast::harden`.
//!
//! Run: `cargo test --release --test security`.

#[path = "../fuzz/src/lib.rs"]
#[allow(dead_code)]
mod harness;

use std::path::Path;

use holdfast::keys::{self, AllowList, KeyError, Keypair, PrivateKey};
use holdfast::proto::frame::{push_record, Frame, MAX_DATA};
use holdfast::proto::handshake::{self, ClientHandshake, ResumeLookup};
use holdfast::proto::{Role, Session, SessionConfig};
use holdfast::{ClientConfig, ServerConfig};
use proptest::prelude::*;

/// Every file of `fuzz/corpus/<target>/`, the seeds and any crash input added as a regression.
fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no seeds in {}", dir.display());
    files.iter().map(|p| std::fs::read(p).expect("read seed")).collect()
}

#[test]
fn seed_corpora_pass_every_target() {
    for data in corpus("frame_decode") {
        harness::frame_decode(&data);
    }
    for data in corpus("server_hello") {
        harness::server_hello(&data);
    }
    for data in corpus("client_reply") {
        harness::client_reply(&data);
    }
    for data in corpus("session_events") {
        harness::session_events(&data);
    }
}

/// The seed corpora of the parser targets (`config` runs in the binary's own tests).
#[test]
fn seed_corpora_pass_every_parser_target() {
    type Target = (&'static str, fn(&[u8]));
    let targets: [Target; 5] = [
        ("tunnel_request", harness::tunnel_request),
        ("proxy_header", harness::proxy_header),
        ("handover", harness::handover_message),
        ("metrics_head", harness::metrics_head),
        ("allow_list", harness::allow_list),
    ];
    for (target, run) in targets {
        for data in corpus(target) {
            run(&data);
        }
    }
}

fn enc(f: Frame<'_>) -> Vec<u8> {
    let mut v = Vec::new();
    f.encode(&mut v);
    v
}

/// A record stream mixing valid frames of every type and noise, for `frame_decode`.
fn frames_and_noise() -> impl Strategy<Value = Vec<u8>> {
    let body = prop_oneof![
        (any::<u64>(), proptest::collection::vec(any::<u8>(), 1..64))
            .prop_map(|(o, d)| enc(Frame::Data { offset: o, data: &d })),
        any::<u64>().prop_map(|v| enc(Frame::Ack(v))),
        any::<u64>().prop_map(|v| enc(Frame::Fin(v))),
        Just(enc(Frame::Ping)),
        Just(enc(Frame::Pong)),
        (any::<[u8; 16]>(), any::<[u8; 32]>()).prop_map(|(id, s)| enc(Frame::Ticket { resume_id: id, secret: &s })),
        any::<[u8; 16]>().prop_map(|id| enc(Frame::TicketAck(id))),
        (any::<u16>(), "[a-zé]{0,40}").prop_map(|(c, r)| enc(Frame::Close { code: c, reason: &r })),
        proptest::collection::vec(any::<u8>(), 0..40),
    ];
    proptest::collection::vec(body, 0..8).prop_map(|bodies| {
        let mut wire = Vec::new();
        for b in bodies {
            push_record(&mut wire, &b);
        }
        wire
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn frame_decode_on_any_bytes(data in proptest::collection::vec(any::<u8>(), 0..600)) {
        harness::frame_decode(&data);
    }

    #[test]
    fn frame_decode_on_record_streams(wire in frames_and_noise(), cut in any::<prop::sample::Index>()) {
        harness::frame_decode(&wire);
        // A stream cut anywhere still splits cleanly up to the cut.
        let at = if wire.is_empty() { 0 } else { cut.index(wire.len()) };
        harness::frame_decode(&wire[..at]);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// The parser targets on random bytes, and on random bytes behind each opener the tunnel
    /// parsers branch on (service length, multiplex, connect, listen, reverse open).
    #[test]
    fn parser_targets_on_any_input(
        tag in prop_oneof![Just(None), (0u8..=255).prop_map(Some), Just(Some(0xFF)), Just(Some(0xFE)), Just(Some(0xFD))],
        rest in proptest::collection::vec(any::<u8>(), 0..1200),
    ) {
        let data: Vec<u8> = tag.into_iter().chain(rest).collect();
        harness::tunnel_request(&data);
        harness::proxy_header(&data);
        harness::handover_message(&data);
        harness::metrics_head(&data);
        harness::allow_list(&data);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Mode byte then raw hello or edits of a valid IK / KKpsk0 hello.
    #[test]
    fn server_hello_on_any_input(mode in 0u8..3, rest in proptest::collection::vec(any::<u8>(), 0..300)) {
        let mut data = vec![mode];
        data.extend_from_slice(&rest);
        harness::server_hello(&data);
    }

    /// Mode byte then raw reply or edits of the genuine reply.
    #[test]
    fn client_reply_on_any_input(mode in 0u8..4, rest in proptest::collection::vec(any::<u8>(), 0..120)) {
        let mut data = vec![mode];
        data.extend_from_slice(&rest);
        harness::client_reply(&data);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Arbitrary op sequences for an honest pair over a faulty network (even mode) and a lone
    /// session against a hostile authenticated peer (odd modes).
    #[test]
    fn session_events_on_any_ops(mode in 0u8..4, ops in proptest::collection::vec(any::<u8>(), 0..2000)) {
        let mut data = vec![mode];
        data.extend_from_slice(&ops);
        harness::session_events(&data);
    }
}

/// Every rendering of a secret that could leak it: base64, hex, and Rust's array formatting.
fn renderings(secret: &[u8]) -> Vec<String> {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(secret);
    let dec = format!("{secret:?}");
    vec![
        b64[..12].to_string(),
        hex(&secret[..8]),
        hex(&secret[..8]).to_uppercase(),
        dec[..dec.len().min(24)].to_string(),
        format!("{:?}", &secret[..6]).trim_end_matches(']').to_string(),
    ]
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn assert_hidden(what: &str, shown: &str, secret: &[u8]) {
    for r in renderings(secret) {
        assert!(!shown.contains(&r), "{what} reveals a secret ({r}) in: {shown}");
    }
}

/// A private key with recognisable bytes and its base64 text.
fn marked_key() -> Keypair {
    let mut b = [0u8; 32];
    for (i, x) in b.iter_mut().enumerate() {
        *x = 0xa0 ^ (i as u8).wrapping_mul(37);
    }
    b[0] &= 248;
    b[31] = (b[31] & 127) | 64;
    Keypair::from_private(PrivateKey::from_bytes(b))
}

#[test]
fn debug_output_never_contains_secrets() {
    let kp = marked_key();
    let secret = *kp.private.as_bytes();
    let b64 = kp.private.to_base64();
    assert_eq!(b64.len(), 44);

    let server = Keypair::generate();
    let ccfg = ClientConfig::new(kp.clone(), server.public);
    let allow = AllowList::from_keys([(kp.public, Some("c".into()))]);
    let scfg = ServerConfig::new(marked_key(), allow);
    let shown = [
        ("PrivateKey", format!("{:?} {:#?}", kp.private, kp.private)),
        ("Keypair", format!("{kp:?} {kp:#?}")),
        ("ClientConfig", format!("{ccfg:?} {ccfg:#?}")),
        ("ServerConfig", format!("{scfg:?} {scfg:#?}")),
    ];
    for (what, text) in &shown {
        assert!(!text.contains(&b64[..]), "{what} reveals the base64 key: {text}");
        assert_hidden(what, text, &secret);
    }
    // The public key is fine to show, and is shown.
    assert!(shown[1].1.contains(&kp.public.to_string()));

    // A ticket and a session holding one: the secret is the PSK of the next resume.
    let ticket = harness::known_ticket();
    let t = format!("{ticket:?} {ticket:#?}");
    assert_hidden("Ticket", &t, &ticket.secret[..]);

    let k = harness::keys();
    let (hs, hello) =
        ClientHandshake::initial(&k.client.private, &k.server.public, holdfast::proto::Cipher::AesGcm, 1).unwrap();
    let lookup = |_: &[u8; 16]| -> Option<ResumeLookup> { None };
    let acc = handshake::respond(&hello, &k.server.private, |_| true, lookup).unwrap();
    let done = hs.read_reply(&acc.reply).unwrap();
    let now = std::time::Instant::now();
    let mut server_s = Session::new(Role::Server, SessionConfig::default());
    let mut client_s = Session::new(Role::Client, SessionConfig::default());
    server_s.attach(now, acc.transport, 0, None, Some(ticket.clone())).unwrap();
    client_s.attach(now, done.transport, 0, None, None).unwrap();
    let mut wire = Vec::new();
    server_s.poll_transmit(now, &mut wire, usize::MAX).unwrap();
    let mut rest = &wire[..];
    while let Some((body, used)) = holdfast::proto::frame::split_record(rest) {
        client_s.handle_record(now, body).unwrap();
        rest = &rest[used..];
    }
    assert_eq!(client_s.ticket().map(|t| *t.secret), Some(*ticket.secret), "the ticket arrived");
    for (what, s) in [("server Session", &server_s), ("client Session", &client_s)] {
        let text = format!("{s:?} {s:#?}");
        assert_hidden(what, &text, &ticket.secret[..]);
        assert_hidden(what, &text, k.client.private.as_bytes());
        assert_hidden(what, &text, k.server.private.as_bytes());
    }
    let text = format!("{:?} {:?}", client_s.ticket(), server_s.ticket_secret(&ticket.resume_id));
    assert_hidden("ticket accessors", &text, &ticket.secret[..]);
}

#[test]
fn key_errors_never_contain_the_key() {
    let kp = marked_key();
    let b64 = kp.private.to_base64();
    // A key with one character changed is refused; the message must not echo the key text.
    let mut bad = b64.to_string();
    bad.replace_range(10..11, "!");
    let err = PrivateKey::from_base64(&bad).unwrap_err();
    let text = format!("{err} {err:?}");
    assert!(!text.contains(&bad[..12]) && !text.contains(&b64[12..24]), "{text}");
}

#[cfg(unix)]
#[test]
fn private_key_permissions_are_enforced_on_load() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = std::env::temp_dir().join(format!("holdfast-sec-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("id.key");
    let _ = std::fs::remove_file(&path);
    let kp = Keypair::generate();
    keys::save_private_key(&path, &kp.private).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600, "saved 0600");
    assert_eq!(keys::load_private_key(&path).unwrap().as_bytes(), kp.private.as_bytes());
    for mode in [0o644, 0o640, 0o604, 0o660, 0o700 | 0o004] {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        match keys::load_private_key(&path) {
            Err(KeyError::Permissions { mode: m, .. }) => assert_eq!(m, mode),
            other => panic!("mode {mode:o} was accepted: {other:?}"),
        }
    }
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
    assert!(keys::load_private_key(&path).is_ok());
    // Saving never overwrites, so a key cannot be replaced through a race or a typo.
    assert!(matches!(keys::save_private_key(&path, &kp.private), Err(KeyError::Exists { .. })));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[cfg(target_os = "linux")]
#[test]
fn core_dumps_can_be_disabled() {
    // This changes the test process itself: harmless (no test needs a core dump).
    holdfast::harden::disable_core_dumps().expect("setrlimit and prctl succeed");
    assert!(holdfast::harden::core_dumps_disabled());
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let core = limits.lines().find(|l| l.starts_with("Max core file size")).unwrap();
    let fields: Vec<_> = core.split_whitespace().collect();
    assert_eq!(&fields[4..6], ["0", "0"], "{core}");
    // Calling it again is fine (the binary may call it more than once).
    holdfast::harden::disable_core_dumps().unwrap();
}

#[test]
fn data_frames_are_bounded() {
    // A peer-sent frame never exceeds the limits the codec promises.
    let mut big = vec![0x01];
    big.extend_from_slice(&0u64.to_be_bytes());
    big.resize(9 + MAX_DATA + 1, 0);
    assert!(Frame::decode(&big).is_err());
    big.pop();
    assert!(Frame::decode(&big).is_ok());
}
