//! Review 2, item 1: one key's resume hellos must not take every handshake slot. A client
//! holding a valid session sends resume hellos with rising attempt numbers from many loopback
//! addresses (so the per-source rate is not what stops them) and never confirms one. The server
//! holds at most two unconfirmed resumes per session and the key's `max_unconfirmed_per_key` in
//! all, so another key's first connection and another session's resume still get in.
//!
//! Run: `cargo test --release --test resume_flood`.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::raw::{connect_from, recv_record, seal, send_record};
use holdfast::keys::{AllowList, Keypair, PublicKey};
use holdfast::net::Limits;
use holdfast::proto::{Cipher, ClientHandshake, Frame, Ticket};
use holdfast::{ClientConfig, Listener, ServerConfig, Stream};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const LIMIT: Duration = Duration::from_secs(60);
/// The first byte of a REJECT reply, and BUSY's code.
const REJECT_BUSY: [u8; 2] = [0x02, 0x02];

async fn bounded<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(LIMIT, f).await.expect("test exceeded its time bound")
}

/// A server allowing `clients`, with `limits`: a handshake deadline longer than the test, so
/// that nothing the flood holds expires on its own.
async fn server(limits: Limits, clients: &[&Keypair]) -> (Listener, PublicKey) {
    let server_keys = Keypair::generate();
    let public = server_keys.public;
    let allow = AllowList::from_keys(clients.iter().map(|k| (k.public, None)));
    let mut scfg = ServerConfig::new(server_keys, allow);
    scfg.limits = Limits { handshake_timeout: 2 * LIMIT, handshakes_per_sec_per_ip: 1000, ..limits };
    (holdfast::bind("127.0.0.1:0", scfg).await.expect("bind loopback"), public)
}

fn copy(k: &Keypair) -> Keypair {
    Keypair::from_private(k.private.clone())
}

/// A session opened by hand (hello, reply, confirmation); its link is dropped at once, so the
/// session waits detached. Its first ticket, and the server's end of it (kept, so that the
/// session lives).
async fn session(listener: &mut Listener, me: &Keypair, server: &PublicKey, stamp: u64) -> (Ticket, Stream) {
    let mut sock = TcpStream::connect(listener.local_addr()).await.unwrap();
    let (hs, hello) = ClientHandshake::initial(&me.private, server, Cipher::AesGcm, stamp).unwrap();
    send_record(&mut sock, &hello).await;
    let mut done = hs.read_reply(&recv_record(&mut sock).await.expect("IK reply")).unwrap();
    let ticket = done.ticket.take().expect("first ticket");
    sock.write_all(&seal(&mut done.transport, Frame::Ack(0))).await.unwrap();
    let (stream, _) = listener.accept().await.expect("the session was committed");
    (ticket, stream)
}

/// The flood: `n` resume hellos of the session of `ticket`, attempts `first..`, each from its
/// own connection and one of many source addresses, never confirmed. The connections the server
/// answered with ACCEPT are kept open (the attacker holds them); those told BUSY are not.
async fn flood(
    addr: SocketAddr,
    me: &Keypair,
    server: &PublicKey,
    ticket: &Ticket,
    attempts: std::ops::Range<u64>,
    held: &mut Vec<TcpStream>,
) {
    for attempt in attempts {
        let mut sock = connect_from(2 + (attempt % 200) as u8, addr).await;
        let (_hs, hello) =
            ClientHandshake::resume(&me.private, server, ticket, attempt, (0, 0), Cipher::AesGcm).unwrap();
        send_record(&mut sock, &hello).await;
        match recv_record(&mut sock).await {
            Some(r) if r == REJECT_BUSY => {}
            Some(r) => {
                assert_ne!(r[0], REJECT_BUSY[0], "attempt {attempt} was refused: {r:?}");
                held.push(sock);
            }
            None => panic!("attempt {attempt} was closed without an answer"),
        }
    }
}

/// A resume by hand, confirmed: true once the server has attached it (its first record comes).
async fn resumes(addr: SocketAddr, me: &Keypair, server: &PublicKey, ticket: &Ticket, attempt: u64) -> bool {
    let mut sock = TcpStream::connect(addr).await.unwrap();
    let (hs, hello) = ClientHandshake::resume(&me.private, server, ticket, attempt, (0, 0), Cipher::AesGcm).unwrap();
    send_record(&mut sock, &hello).await;
    let Some(reply) = recv_record(&mut sock).await else { return false };
    let Ok(mut done) = hs.read_reply(&reply) else { return false };
    sock.write_all(&seal(&mut done.transport, Frame::Ack(0))).await.unwrap();
    recv_record(&mut sock).await.is_some()
}

/// Waits (bounded) until the server has at most `n` handshakes in progress: the refused ones of
/// the flood end at once, the held ones do not. Panics with the count otherwise.
async fn handshakes_at_most(listener: &Listener, n: usize) {
    for _ in 0..500 {
        if listener.stats().handshakes <= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await; // sampling a counter, bounded
    }
    panic!("the server still holds {} handshakes, more than {n}", listener.stats().handshakes);
}

/// One session's holder floods resume hellos: the server answers at most two that are
/// unconfirmed at once (the rest are told BUSY, or replace the older), the handshake slots stay
/// free for others, and another key's first connection and another session's resume succeed
/// while the flood holds its connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_sessions_resume_flood_holds_two_handshakes_and_others_get_in() {
    bounded(async {
        const CAP: usize = 8;
        let (a, b) = (Keypair::generate(), Keypair::generate());
        let limits = Limits { max_handshakes: CAP, resumes_per_sec_per_session: 1000, ..Limits::default() };
        let (mut listener, server) = server(limits, &[&a, &b]).await;
        let addr = listener.local_addr();
        let (ticket_a, _sa) = session(&mut listener, &a, &server, 1).await;
        let (ticket_b, _sb) = session(&mut listener, &b, &server, 1).await;

        let mut held = Vec::new();
        flood(addr, &a, &server, &ticket_a, 1..(4 * CAP as u64), &mut held).await;
        handshakes_at_most(&listener, 2).await;

        // Another key's first connection, at its first BUSY it would fail.
        let mut cfg = ClientConfig::new(copy(&b), server);
        cfg.recovery.busy_wait = Duration::ZERO;
        let other = holdfast::connect(addr.to_string(), cfg).await.expect("another key's first connection");

        // The flood goes on; another session (of the other key) resumes meanwhile.
        let more = 4 * CAP as u64;
        flood(addr, &a, &server, &ticket_a, more..(2 * more), &mut held).await;
        handshakes_at_most(&listener, 2).await;
        assert!(resumes(addr, &b, &server, &ticket_b, 1).await, "another session's resume");
        drop((held, other));
    })
    .await;
}

/// One key's unconfirmed resumes of all its sessions together are bounded by
/// `max_unconfirmed_per_key`, and the key's real resume gets in once its flood ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keys_unconfirmed_resumes_count_in_its_per_key_limit() {
    bounded(async {
        const PER_KEY: usize = 3;
        let (a, b) = (Keypair::generate(), Keypair::generate());
        let limits = Limits {
            max_handshakes: 32,
            max_unconfirmed_per_key: PER_KEY,
            resumes_per_sec_per_session: 1000,
            ..Limits::default()
        };
        let (mut listener, server) = server(limits, &[&a, &b]).await;
        let addr = listener.local_addr();
        let mut tickets = Vec::new();
        let mut streams = Vec::new();
        for stamp in 1..=4 {
            let (t, s) = session(&mut listener, &a, &server, stamp).await;
            tickets.push(t);
            streams.push(s);
        }
        let mut held = Vec::new();
        for (i, t) in tickets.iter().enumerate() {
            let from = 1 + 10 * i as u64;
            flood(addr, &a, &server, t, from..from + 4, &mut held).await;
        }
        handshakes_at_most(&listener, PER_KEY).await;
        // Another key is not held to this key's limit.
        let (t, _sb) = session(&mut listener, &b, &server, 1).await;
        assert!(resumes(addr, &b, &server, &t, 1).await, "another key's resume");
        drop(held);
        // The flood's connections closed: the key's own resume gets in again.
        handshakes_at_most(&listener, 0).await;
        assert!(resumes(addr, &a, &server, &tickets[0], 100).await, "the key's resume after its flood");
    })
    .await;
}

/// Resumes that replied and never confirm can be evicted at the handshake cap: closed silently
/// (their reply is already on the wire, so nothing else is written after it), and another
/// key's first connection gets in instead of being told BUSY.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answered_unconfirmed_resumes_are_evicted_at_the_cap_silently() {
    bounded(async {
        const CAP: usize = 4;
        let (a, b) = (Keypair::generate(), Keypair::generate());
        // Every handshake counts as slow at once: evictable as soon as it can be.
        let limits = Limits {
            max_handshakes: CAP,
            slow_handshake: Duration::ZERO,
            resumes_per_sec_per_session: 1000,
            ..Limits::default()
        };
        let (mut listener, server) = server(limits, &[&a, &b]).await;
        let addr = listener.local_addr();
        let (t1, _s1) = session(&mut listener, &a, &server, 1).await;
        let (t2, _s2) = session(&mut listener, &a, &server, 2).await;
        let mut held = Vec::new();
        flood(addr, &a, &server, &t1, 1..3, &mut held).await;
        flood(addr, &a, &server, &t2, 1..3, &mut held).await;
        assert_eq!(held.len(), CAP, "the flood's resumes were not all answered");
        assert_eq!(listener.stats().handshakes, CAP);

        let mut cfg = ClientConfig::new(copy(&b), server);
        cfg.recovery.busy_wait = Duration::ZERO;
        let other = holdfast::connect(addr.to_string(), cfg).await.expect("another key's first connection at the cap");
        assert_eq!(listener.stats().refused.evicted, 1);
        // One of them was evicted (the oldest, unless a busy machine reordered their starts):
        // after its ACCEPT, the server closed it and wrote nothing more. The others stay open,
        // waiting for their confirmation, so the first of them to end is the evicted one.
        let ends = held.iter_mut().map(|s| {
            Box::pin(async move {
                let mut b = [0u8; 1];
                tokio::io::AsyncReadExt::read(s, &mut b).await
            })
        });
        let (first, _, _) = tokio::time::timeout(LIMIT, futures_select_all(ends)).await.expect("no resume was closed");
        assert!(matches!(first, Ok(0)), "bytes after the ACCEPT of an evicted resume: {first:?}");
        drop((held, other));
    })
    .await;
}

/// The first of `futs` to finish, its index and the rest (as `futures::future::select_all`).
async fn futures_select_all<F: std::future::Future + Unpin>(
    futs: impl IntoIterator<Item = F>,
) -> (F::Output, usize, Vec<F>) {
    let mut futs: Vec<F> = futs.into_iter().collect();
    std::future::poll_fn(move |cx| {
        for i in 0..futs.len() {
            if let std::task::Poll::Ready(out) = std::pin::Pin::new(&mut futs[i]).poll(cx) {
                let rest = std::mem::take(&mut futs);
                return std::task::Poll::Ready((out, i, rest));
            }
        }
        std::task::Poll::Pending
    })
    .await
}
