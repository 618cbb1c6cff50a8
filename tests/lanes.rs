//! A server running its sessions on lanes ([`holdfast::net::Lanes`], as `holdfast server`
//! does): streams through a link reset arrive intact, each session sits on a lane of its own
//! while there is an empty one, and a session leaves its lane when it ends. Loopback only,
//! through the library. Run: `cargo test --release --test lanes`.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::chaos::ChaosProxy;
use common::cli::echo_service;
use common::harness::{fast_session, pattern_hash, recv_hash, send_pattern};
use holdfast::keys::{AllowList, Keypair};
use holdfast::net::Lanes;
use holdfast::tunnel::{self, MuxPool, Services};
use holdfast::{ClientConfig, ServerConfig};
use tokio::time::timeout;

const LIMIT: Duration = Duration::from_secs(60);

/// Polls `cond` (bounded) until it holds: waiting for a state, not for time.
async fn until(what: &str, cond: impl Fn() -> bool) {
    let wait = async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    timeout(LIMIT, wait).await.unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_on_lanes_carry_streams_through_a_reset_and_leave_their_lanes() {
    let echo = echo_service().await;
    let mut services = Services::new();
    services.add("echo", &echo.to_string()).unwrap();
    let lanes = Lanes::start(2).unwrap();
    let server_keys = Keypair::generate();
    let server_pub = server_keys.public;
    let (a, b) = (Keypair::generate(), Keypair::generate());
    let allow = AllowList::from_keys([(a.public, Some("a".to_string())), (b.public, Some("b".to_string()))]);
    let mut scfg = ServerConfig::new(server_keys, allow);
    scfg.session = fast_session();
    scfg.lanes = Some(lanes.clone());
    let listener = holdfast::bind("127.0.0.1:0", scfg).await.expect("bind loopback");
    let addr = listener.local_addr();
    let server = tokio::spawn(tunnel::serve(listener, Arc::new(services)));
    let proxy = ChaosProxy::start(addr).await.unwrap();
    let pool = |k: Keypair, to: SocketAddr| {
        let mut c = ClientConfig::new(k, server_pub);
        c.session = fast_session();
        c.recovery.backoff_initial = Duration::from_millis(10);
        c.recovery.backoff_max = Duration::from_millis(100);
        MuxPool::new(to.to_string(), c, None)
    };
    let (pa, pb) = (pool(a, proxy.addr()), pool(b, addr));

    // Two sessions, each on a lane of its own.
    let mut streams = Vec::new();
    for (i, p) in [&pa, &pb].into_iter().enumerate() {
        for j in 0..3u64 {
            let s = timeout(LIMIT, p.open("echo")).await.expect("open timed out");
            streams.push((i as u64 * 10 + j, s.expect("refused").expect("the server multiplexes")));
        }
    }
    assert_eq!(lanes.sessions(), vec![1, 1], "two sessions on two lanes");

    // Each stream echoes 4 MiB of its own pattern while `a`'s link is reset twice.
    const LEN: usize = 4 << 20;
    let mut tasks = Vec::new();
    for (seed, s) in streams {
        tasks.push(tokio::spawn(async move {
            let (mut r, mut w) = tokio::io::split(s);
            let (sent, got) = tokio::try_join!(send_pattern(&mut w, seed, LEN), recv_hash(&mut r))?;
            Ok::<_, std::io::Error>((seed, sent, got))
        }));
    }
    for _ in 0..2 {
        let before = proxy.bytes_forwarded();
        assert!(proxy.wait_for_bytes(before + (2 << 20), LIMIT).await, "no traffic through the proxy");
        proxy.kill_all();
    }
    for t in tasks {
        let (seed, sent, (n, got)) =
            timeout(LIMIT, t).await.expect("a stream timed out").unwrap().expect("a stream failed");
        assert_eq!(n, LEN as u64, "stream {seed}: bytes echoed");
        assert_eq!(sent, pattern_hash(seed, LEN));
        assert_eq!(got, sent, "stream {seed}: the echo differs from what was sent");
    }
    assert!(proxy.faults_injected() >= 2, "the links were not reset");

    pa.close().await;
    pb.close().await;
    until("both sessions left their lanes", || lanes.sessions() == vec![0, 0]).await;
    server.abort();
}
