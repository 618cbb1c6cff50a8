//! An upgrade forgets neither the replay defence nor the caps (security review 2, item 9): two
//! listeners bound with the same handover path in one process, the second taking over from the
//! first, as `holdfast server --handover` does across processes. Hellos are made by hand, so the
//! tests choose their timestamps.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::harness::fast_session;
use common::procs::TempDir;
use holdfast::keys::{AllowList, Keypair, PublicKey};
use holdfast::net::Limits;
use holdfast::proto::handshake::reject;
use holdfast::proto::{Cipher, ClientHandshake, Frame, RejectCode};
use holdfast::{Listener, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const LIMIT: Duration = Duration::from_secs(30);

async fn bounded<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(LIMIT, f).await.expect("test exceeded its time bound")
}

/// A server process's configuration: one allowed client, `limits`.
fn config(server: &Keypair, client: &PublicKey, limits: &Limits) -> ServerConfig {
    let keys = Keypair::from_private(holdfast::keys::PrivateKey::from_bytes(*server.private.as_bytes()));
    let mut cfg = ServerConfig::new(keys, AllowList::from_keys([(*client, None)]));
    cfg.limits = limits.clone();
    cfg.session = fast_session();
    cfg
}

async fn send_record(sock: &mut TcpStream, body: &[u8]) {
    let mut rec = Vec::new();
    holdfast::proto::frame::push_record(&mut rec, body);
    sock.write_all(&rec).await.unwrap();
}

/// The next record body, or `None` if the server closed first.
async fn recv_record(sock: &mut TcpStream) -> Option<Vec<u8>> {
    let len = sock.read_u16().await.ok()? as usize;
    let mut body = vec![0u8; len];
    sock.read_exact(&mut body).await.ok()?;
    Some(body)
}

/// What the server answers `hello` with on a new connection: the reply's bytes, or `None` if
/// it closed without one.
async fn answer(addr: SocketAddr, hello: &[u8]) -> (TcpStream, Option<Vec<u8>>) {
    let mut sock = TcpStream::connect(addr).await.unwrap();
    send_record(&mut sock, hello).await;
    let reply = recv_record(&mut sock).await;
    (sock, reply)
}

/// A first connection with `stamp`, confirmed: the session is opened. Returns its connection
/// and its hello's bytes (what an attacker on the path records); panics if refused.
async fn open(addr: SocketAddr, me: &Keypair, server: &PublicKey, stamp: u64) -> (TcpStream, Vec<u8>) {
    let (hs, hello) = ClientHandshake::initial(&me.private, server, Cipher::AesGcm, stamp).unwrap();
    let (mut sock, reply) = answer(addr, &hello).await;
    let reply = reply.expect("no reply to a fresh hello");
    let mut done = hs.read_reply(&reply).unwrap_or_else(|e| panic!("stamp {stamp} refused: {e} ({reply:?})"));
    let mut plain = Vec::new();
    Frame::Ack(0).encode(&mut plain);
    let mut rec = Vec::new();
    done.transport.seal(&plain, &mut rec).unwrap();
    sock.write_all(&rec).await.unwrap();
    (sock, hello)
}

/// The reply to a fresh first-connection hello with `stamp` (its connection is then dropped).
async fn try_first(addr: SocketAddr, me: &Keypair, server: &PublicKey, stamp: u64) -> Option<Vec<u8>> {
    let (_hs, hello) = ClientHandshake::initial(&me.private, server, Cipher::AesGcm, stamp).unwrap();
    answer(addr, &hello).await.1
}

/// Waits for the `n`th session a listener commits.
async fn sessions(listener: &mut Listener, n: usize) -> Vec<holdfast::Stream> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(listener.accept().await.expect("accept").0);
    }
    out
}

/// A hello refused as a replay (and one refused as too old) before an upgrade is refused after
/// it too: the new process has the old one's first-connection stamps.
#[tokio::test]
async fn a_hello_refused_before_an_upgrade_is_refused_after_it() {
    bounded(async {
        let dir = TempDir::new("upgrade-stamps");
        let path = dir.path("handover.sock");
        let (server, me) = (Keypair::generate(), Keypair::generate());
        let limits = Limits { handshakes_per_sec_per_ip: 1000, ..Limits::default() };
        let mut old = holdfast::net::bind_with_handover("127.0.0.1:0", config(&server, &me.public, &limits), &path)
            .await
            .unwrap();
        let addr = old.local_addr();
        let t = 1_000_000_000_000_000u64;
        let (_live, recorded) = open(addr, &me, &server.public, t).await;
        let _s = sessions(&mut old, 1).await;
        let stale = Some(reject(RejectCode::Stale));
        assert_eq!(answer(addr, &recorded).await.1, stale, "the replay before the upgrade");
        let too_old = t - 11_000_000_000;
        assert_eq!(try_first(addr, &me, &server.public, too_old).await, stale, "11 s older, before the upgrade");

        let mut new = holdfast::net::bind_with_handover("127.0.0.1:0", config(&server, &me.public, &limits), &path)
            .await
            .unwrap();
        assert_eq!(new.local_addr(), addr);
        assert!(old.retirement().handed_over());
        assert_eq!(answer(addr, &recorded).await.1, stale, "the replay after the upgrade");
        assert_eq!(try_first(addr, &me, &server.public, too_old).await, stale, "11 s older, after the upgrade");
        // The new process serves fresh hellos, and its own first one is its session.
        let (_c, _) = open(addr, &me, &server.public, t + 1).await;
        let _n = sessions(&mut new, 1).await;
        assert_eq!(new.stats().sessions, 1);
    })
    .await;
}

/// `max_sessions_per_key` counts the sessions the old process still holds after an upgrade, and
/// stops counting each as it ends.
#[tokio::test]
async fn the_per_key_cap_holds_across_an_upgrade() {
    bounded(async {
        let dir = TempDir::new("upgrade-cap");
        let path = dir.path("handover.sock");
        let (server, me) = (Keypair::generate(), Keypair::generate());
        let limits = Limits { max_sessions_per_key: 2, handshakes_per_sec_per_ip: 1000, ..Limits::default() };
        let mut old = holdfast::net::bind_with_handover("127.0.0.1:0", config(&server, &me.public, &limits), &path)
            .await
            .unwrap();
        let addr = old.local_addr();
        // Two real clients' sessions, which can end cleanly.
        let mut client = holdfast::ClientConfig::new(Keypair::from_private(me.private.clone()), server.public);
        client.session = fast_session();
        let a = holdfast::connect(addr.to_string(), client.clone()).await.expect("session 1");
        let _b = holdfast::connect(addr.to_string(), client).await.expect("session 2");
        let mut held = sessions(&mut old, 2).await;
        // Hand-made hellos from here, stamped after the real clients' (a clock in nanoseconds).
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
        let t = u64::try_from(now.as_nanos()).unwrap() + 1_000_000_000;
        let busy = Some(reject(RejectCode::Busy));
        assert_eq!(try_first(addr, &me, &server.public, t + 2).await, busy, "a third session before the upgrade");

        let mut new = holdfast::net::bind_with_handover("127.0.0.1:0", config(&server, &me.public, &limits), &path)
            .await
            .unwrap();
        assert!(old.retirement().handed_over());
        assert_eq!(try_first(addr, &me, &server.public, t + 3).await, busy, "a third session after the upgrade");
        assert_eq!(new.stats().sessions, 0);

        // One of the old process's sessions ends (both ends close it): the new process is told,
        // and lets one in.
        drop((a, held.remove(0)));
        let mut stamp = t + 4;
        let reply = loop {
            // Bounded (the test's limit): the old process's count reaches the new one by itself.
            let reply = try_first(addr, &me, &server.public, stamp).await;
            if reply != busy {
                break reply;
            }
            stamp += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert!(reply.is_some_and(|r| r.first() != Some(&0x02)), "not accepted once a slot was free");
        let (_c, _) = open(addr, &me, &server.public, stamp + 1).await;
        let _n = sessions(&mut new, 1).await;
        assert_eq!(try_first(addr, &me, &server.public, stamp + 2).await, busy, "one old and one new: the cap");
    })
    .await;
}
