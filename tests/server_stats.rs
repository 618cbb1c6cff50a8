//! `Listener::stats()` and `StatsHandle` through the library API: attached and detached
//! sessions, opened sessions, resumes, per-key counts, bytes of ended sessions, and refusals by
//! reason. Loopback only; every wait is a bounded poll of the counters or an event.

mod common;

use std::time::{Duration, Instant};

use common::chaos::ChaosProxy;
use common::harness::{next_resume, server_and_client};
use holdfast::keys::Keypair;
use holdfast::net::{ServerStats, StatsHandle};
use holdfast::LinkEvent;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LIMIT: Duration = Duration::from_secs(30);

/// Polls the counters until `done` holds (bounded); panics with the last snapshot.
async fn wait_stats(stats: &StatsHandle, what: &str, done: impl Fn(&ServerStats) -> bool) -> ServerStats {
    let deadline = Instant::now() + LIMIT;
    loop {
        let s = stats.stats();
        if done(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "stats never reached {what}: {s:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_is_counted_attached_detached_resumed_and_ended() {
    let (mut listener, ccfg) = server_and_client().await;
    let client_key = ccfg.keypair.public;
    let stats = listener.stats_handle();
    let proxy = ChaosProxy::start(listener.local_addr()).await.unwrap();
    let mut client = holdfast::connect(proxy.addr().to_string(), ccfg).await.unwrap();
    let (mut server, peer) = tokio::time::timeout(LIMIT, listener.accept()).await.unwrap().unwrap();
    assert_eq!(peer.key, client_key);
    // Read by the handle while something else owns the listener, as the CLI's metrics do.
    let owner = tokio::spawn(async move {
        let _keep = listener;
        std::future::pending::<()>().await
    });
    let s = wait_stats(&stats, "one attached session", |s| s.attached == 1).await;
    assert_eq!((s.sessions, s.detached, s.opened, s.resumes), (1, 0, 1, 0), "{s:?}");
    assert_eq!(stats.sessions_per_key(), vec![(client_key, 1)]);

    client.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    server.read_exact(&mut buf).await.unwrap();

    let mut events = client.events();
    proxy.refuse_new(true);
    proxy.kill_all();
    let s = wait_stats(&stats, "the session detached", |s| s.detached == 1).await;
    assert_eq!((s.sessions, s.attached), (1, 0), "{s:?}");
    proxy.refuse_new(false);
    assert!(matches!(next_resume(&mut events, LIMIT).await, Some(LinkEvent::Resumed { .. })));
    let s = wait_stats(&stats, "attached again after a resume", |s| s.attached == 1 && s.resumes == 1).await;
    assert_eq!((s.sessions, s.detached, s.opened), (1, 0, 1), "{s:?}");

    server.write_all(b"pong!").await.unwrap();
    let mut buf = [0u8; 5];
    client.read_exact(&mut buf).await.unwrap();
    client.shutdown().await.unwrap();
    server.shutdown().await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(LIMIT, server.read_to_end(&mut rest)).await;
    drop((client, server));
    let s = wait_stats(&stats, "the session ended and counted", |s| s.sessions == 0 && s.bytes_from_clients > 0).await;
    assert_eq!((s.attached, s.detached, s.expired), (0, 0, 0), "{s:?}");
    assert_eq!((s.bytes_from_clients, s.bytes_to_clients), (4, 5), "{s:?}");
    assert!(stats.sessions_per_key().is_empty());
    owner.abort();
}

#[tokio::test]
async fn refusals_are_counted_by_reason() {
    let (listener, mut ccfg) = server_and_client().await;
    let stats = listener.stats_handle();
    ccfg.keypair = std::sync::Arc::new(Keypair::generate()); // not on the allow-list
    assert!(holdfast::connect(listener.local_addr().to_string(), ccfg).await.is_err());
    let s = wait_stats(&stats, "one refusal", |s| s.refused.not_allowed == 1).await;
    assert_eq!(s.refused, holdfast::net::Refusals { not_allowed: 1, ..Default::default() }, "{s:?}");
    // Garbage instead of a hello: a failed handshake, counted apart.
    let mut sock = tokio::net::TcpStream::connect(listener.local_addr()).await.unwrap();
    sock.write_all(&[0, 8, 1, 2, 3, 4, 5, 6, 7, 8]).await.unwrap();
    let s = wait_stats(&stats, "a failed handshake", |s| s.refused.failed == 1).await;
    assert_eq!((s.sessions, s.opened, s.refused.not_allowed), (0, 0, 1), "{s:?}");
}
