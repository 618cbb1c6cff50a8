//! Many streams on one session (issue 15): a forward carries every local connection as a
//! stream of one multiplexed session. A burst opens no new sessions, one fault costs one resume
//! for every stream, a stalled stream stalls no other, and the library API opens, half-closes
//! and resets streams one by one.

mod common;

use common::chaos::ChaosProxy;
use common::cli::{echo_service, strs, Keys, Proc, LIMIT, MIB};
use common::harness::{pattern_hash, recv_hash, send_pattern, server_and_client};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

/// A server with an echo service and a client forwarding to it through a chaos proxy.
async fn forward(tag: &str) -> (Keys, Proc, ChaosProxy, Proc, std::net::SocketAddr) {
    let keys = Keys::new(tag);
    let echo = echo_service().await;
    let (server, addr) = keys.server(&[format!("echo={echo}")]).await;
    let proxy = ChaosProxy::start(addr).await.unwrap();
    let mut args = keys.client_args("client", proxy.addr(), "echo");
    args.extend(["--local", "127.0.0.1:0", "--no-check"].map(String::from));
    let client = Proc::spawn(&strs(&args), false);
    let local = client.logged_addr("forwarding", "local=").await;
    (keys, server, proxy, client, local)
}

/// Echoes `len` pattern bytes through `local` on a new connection; true if the SHA-256 of
/// what came back is the pattern's.
async fn echoed(local: std::net::SocketAddr, seed: u64, len: usize) -> std::io::Result<bool> {
    let (mut r, mut w) = TcpStream::connect(local).await?.into_split();
    let send = tokio::spawn(async move { send_pattern(&mut w, seed, len).await });
    let (n, got) = recv_hash(&mut r).await?;
    let sent = send.await.map_err(std::io::Error::other)??;
    Ok(n == len as u64 && got == sent && sent == pattern_hash(seed, len))
}

/// 200 connections opened as fast as possible all succeed, on one session: no handshake each,
/// so no per-source handshake limit to meet and nothing to refuse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_200_connections_all_succeed_on_one_session() {
    let (_keys, server, proxy, client, local) = forward("mux-burst").await;
    let mut burst = tokio::task::JoinSet::new();
    for i in 0..200u64 {
        burst.spawn(echoed(local, i, 1000 + i as usize));
    }
    let results = timeout(LIMIT, burst.join_all()).await.expect("the burst did not finish in time");
    let ok = results.iter().filter(|r| matches!(r, Ok(true))).count();
    assert_eq!(ok, 200, "{ok} of 200 connections echoed intact; client log:\n{}", client.stderr());
    assert_eq!(proxy.connections_accepted(), 1, "the burst opened more than one connection to the server");
    let log = server.wait_log("tunnel closed", 200).await;
    assert_eq!(log.matches("session opened").count(), 1, "{log}");
}

/// 40 streams moving data both ways through a reset of the session's connection: one resume,
/// and every stream's bytes intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_streams_survive_a_reset_with_one_resume() {
    let (_keys, server, proxy, client, local) = forward("mux-40").await;
    const LEN: usize = 2 * MIB;
    let mut streams = tokio::task::JoinSet::new();
    for i in 0..40u64 {
        streams.spawn(echoed(local, 100 + i, LEN));
    }
    // Mid-transfer: a quarter of all the bytes have crossed.
    assert!(proxy.wait_for_bytes((40 * LEN / 2) as u64, LIMIT).await, "the streams did not start");
    proxy.kill_all();
    let results = timeout(LIMIT * 2, streams.join_all()).await.expect("the streams did not finish in time");
    let ok = results.iter().filter(|r| matches!(r, Ok(true))).count();
    assert_eq!(ok, 40, "{ok} of 40 streams intact: {results:?}\nclient log:\n{}", client.stderr());
    let log = client.wait_log("link resumed", 1).await;
    assert_eq!(log.matches("link lost").count(), 1, "one reset, one loss:\n{log}");
    assert_eq!(log.matches("link resumed").count(), 1, "one reset, one resume:\n{log}");
    let slog = server.wait_log("tunnel closed", 40).await;
    assert_eq!(slog.matches("session opened").count(), 1, "{slog}");
    assert_eq!(slog.matches("session resumed").count(), 1, "{slog}");
}

/// A program that stops reading fills only its own stream's window: the other streams, the
/// session's acknowledgements and its keepalives go on. Asserted on bytes and windows, not on
/// timers: while the stalled stream's reader reads nothing, its writer gets no more than the
/// stream's window into the session, another stream moves 32 MiB intact both ways, and the
/// link is never lost or suspected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_reader_stalls_no_other_stream() {
    let (mut listener, ccfg) = server_and_client().await;
    let addr = listener.local_addr().to_string();
    let accept = tokio::spawn(async move { listener.accept_session().await.unwrap() });
    let client = holdfast::connect_session(&addr, ccfg).await.unwrap();
    let (server, _peer) = accept.await.unwrap();
    let mut events = client.events();

    // The stalled stream: the client writes as fast as it can; the server never reads it.
    let stalled = client.open().await.unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let count = accepted.clone();
    let (_stalled_r, mut stalled_w) = stalled.into_split();
    let writer = tokio::spawn(async move {
        let block = vec![7u8; 4096];
        while stalled_w.write_all(&block).await.is_ok() {
            count.fetch_add(block.len() as u64, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let _stalled_srv = timeout(LIMIT, server.accept()).await.unwrap().unwrap();

    // Another stream echoes 32 MiB meanwhile.
    let busy = client.open().await.unwrap();
    let mut busy_srv = timeout(LIMIT, server.accept()).await.unwrap().unwrap();
    let echo = tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        loop {
            let n = busy_srv.read(&mut buf).await.unwrap();
            if n == 0 {
                busy_srv.shutdown().await.unwrap();
                break;
            }
            busy_srv.write_all(&buf[..n]).await.unwrap();
        }
    });
    const LEN: usize = 32 * MIB;
    let (mut r, mut w) = busy.into_split();
    let send = tokio::spawn(async move {
        let h = send_pattern(&mut w, 9, LEN).await;
        w.shutdown().await.unwrap();
        h
    });
    let (n, got) = timeout(LIMIT, recv_hash(&mut r)).await.expect("the busy stream stalled").unwrap();
    let sent = send.await.unwrap().unwrap();
    assert_eq!((n, got), (LEN as u64, sent), "the busy stream's bytes came back intact");
    echo.await.unwrap();
    // The stalled stream got its initial window into the session and no more: nobody read it.
    let stuck = accepted.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        stuck <= holdfast::proto::streams::INITIAL_WINDOW + 4096,
        "the stalled stream's writer put {stuck} bytes into the session"
    );
    while let Ok(ev) = events.try_recv() {
        assert!(
            !matches!(ev, holdfast::LinkEvent::Lost(_) | holdfast::LinkEvent::Suspect { .. }),
            "the stall reached the session: {ev:?}"
        );
    }
    writer.abort();
}

/// The library API: streams opened from either end, each half-closed or reset alone, over one
/// resilient session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn library_streams_open_half_close_and_reset_alone() {
    let (mut listener, ccfg) = server_and_client().await;
    let addr = listener.local_addr().to_string();
    let accept = tokio::spawn(async move { listener.accept_session().await.unwrap() });
    let client_mux = holdfast::connect_session(&addr, ccfg).await.unwrap();
    let (server_mux, _peer) = accept.await.unwrap();

    // Client to server: bytes, then a half-close; the server answers after the EOF.
    let mut a = client_mux.open().await.unwrap();
    a.write_all(b"question").await.unwrap();
    a.shutdown().await.unwrap();
    let mut a_srv = timeout(LIMIT, server_mux.accept()).await.unwrap().unwrap();
    let mut got = Vec::new();
    a_srv.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"question");
    a_srv.write_all(b"answer").await.unwrap();
    a_srv.shutdown().await.unwrap();
    let mut back = Vec::new();
    a.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"answer");

    // Server to client, while another stream is reset: the reset ends that stream alone.
    let mut b = client_mux.open().await.unwrap();
    b.write_all(b"x").await.unwrap();
    let mut b_srv = timeout(LIMIT, server_mux.accept()).await.unwrap().unwrap();
    let mut one = [0u8; 1];
    b_srv.read_exact(&mut one).await.unwrap();
    let mut c_srv = server_mux.open().await.unwrap();
    c_srv.write_all(b"from the server").await.unwrap();
    let mut c = timeout(LIMIT, client_mux.accept()).await.unwrap().unwrap();
    b.reset();
    let mut rest = Vec::new();
    let end = timeout(LIMIT, b_srv.read_to_end(&mut rest)).await.expect("the reset did not reach the server");
    assert_eq!(end.map_err(|e| e.kind()), Err(std::io::ErrorKind::ConnectionReset), "a reset reads as one");
    let mut got = [0u8; 15];
    c.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"from the server");
    c.write_all(b"still here").await.unwrap();
    let mut got = [0u8; 10];
    c_srv.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"still here");
    assert_eq!(*client_mux.status().borrow(), holdfast::LinkStatus::Connected);
}

/// Issue 22: 1,000 streams open at once on one session, idle, all echo: the server grants open
/// credit as the streams arrive (up to 1024 at once), and each holds only its window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_idle_streams_on_one_session_all_echo() {
    let (mut listener, ccfg) = server_and_client().await;
    let addr = listener.local_addr().to_string();
    let server = tokio::spawn(async move {
        let (session, _) = listener.accept_session().await.unwrap();
        while let Some(mut st) = session.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 16];
                while let Ok(n @ 1..) = st.read(&mut buf).await {
                    if st.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    let client = holdfast::connect_session(&addr, ccfg).await.unwrap();
    let mut streams = Vec::new();
    timeout(LIMIT, async {
        for i in 0..1000u32 {
            let mut st = client.open().await.unwrap();
            st.write_all(&i.to_be_bytes()).await.unwrap();
            streams.push(st);
        }
        assert_eq!(client.streams(), 1000, "every stream is open at once");
        for (i, st) in streams.iter_mut().enumerate() {
            let mut b = [0u8; 4];
            st.read_exact(&mut b).await.unwrap();
            assert_eq!(u32::from_be_bytes(b), i as u32, "stream {i} echoed another's bytes");
        }
        // Idle and all still open: each echoes again.
        for (i, st) in streams.iter_mut().enumerate().rev() {
            st.write_all(&(i as u32).to_be_bytes()).await.unwrap();
            let mut b = [0u8; 4];
            st.read_exact(&mut b).await.unwrap();
            assert_eq!(u32::from_be_bytes(b), i as u32);
        }
    })
    .await
    .expect("1,000 streams did not all echo in time");
    server.abort();
}

/// Issue 22: a burst of opens from many tasks at once, more than the open credit (64 at first):
/// every one completes as the server grants credit, none waits for unrelated traffic. The
/// keepalives are an hour apart, so an opener that was not woken when credit came would wait
/// for the test's bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_opens_past_the_open_credit_all_complete() {
    use holdfast::keys::{AllowList, Keypair};
    use holdfast::proto::SessionConfig;
    use holdfast::{ClientConfig, ServerConfig};
    use std::time::Duration;
    let quiet = SessionConfig {
        keepalive: Duration::from_secs(3600),
        dead_after: Duration::from_secs(7200),
        ..SessionConfig::default()
    };
    let (server_keys, client_keys) = (Keypair::generate(), Keypair::generate());
    let server_pub = server_keys.public;
    let mut scfg =
        ServerConfig::new(server_keys, AllowList::from_keys([(client_keys.public, Some("test-client".to_string()))]));
    scfg.session = quiet.clone();
    let mut listener = holdfast::bind("127.0.0.1:0", scfg).await.unwrap();
    let addr = listener.local_addr().to_string();
    let mut ccfg = ClientConfig::new(client_keys, server_pub);
    ccfg.session = quiet;
    let server = tokio::spawn(async move {
        let (session, _) = listener.accept_session().await.unwrap();
        let mut held = Vec::new();
        while let Some(st) = session.accept().await {
            held.push(st);
        }
    });
    let client = holdfast::connect_session(&addr, ccfg).await.unwrap();
    const OPENERS: usize = 300;
    let tasks: Vec<_> = (0..OPENERS)
        .map(|_| {
            let c = client.clone();
            tokio::spawn(async move { c.open().await.map(|s| s.id()) })
        })
        .collect();
    let mut ids = std::collections::BTreeSet::new();
    timeout(LIMIT, async {
        for t in tasks {
            ids.insert(t.await.unwrap().unwrap());
        }
    })
    .await
    .unwrap_or_else(|_| panic!("only {} of {OPENERS} opens completed: the others were never woken", ids.len()));
    assert_eq!(ids.len(), OPENERS, "two opens got the same stream");
    server.abort();
}
