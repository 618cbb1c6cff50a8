//! Self-tests for the chaos proxy in `tests/common/chaos.rs`, run against plain
//! tokio echo / hold servers on loopback.

mod common;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::chaos::{ChaosProxy, Dir};
use rand::RngCore;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

const TEST_TIMEOUT: Duration = Duration::from_secs(30);
const WAIT: Duration = Duration::from_secs(10);

async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(TEST_TIMEOUT, f).await.expect("test timed out")
}

/// What the echo server saw on one connection.
struct Report {
    data: Vec<u8>,
    result: io::Result<()>,
}

/// Echoes everything; records all bytes read. If echoing fails it keeps reading
/// (to record what arrived before a reset) and reports the first error.
struct EchoServer {
    addr: SocketAddr,
    accepted: Arc<AtomicU64>,
    reports: mpsc::UnboundedReceiver<Report>,
    task: JoinHandle<()>,
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl EchoServer {
    async fn start() -> EchoServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicU64::new(0));
        let (tx, reports) = mpsc::unbounded_channel();
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let tx = tx.clone();
                tokio::spawn(async move {
                    let _ = tx.send(echo_conn(s).await);
                });
            }
        });
        EchoServer { addr, accepted, reports, task }
    }

    async fn report(&mut self) -> Report {
        tokio::time::timeout(WAIT, self.reports.recv()).await.expect("no server report in time").expect("server gone")
    }
}

async fn echo_conn(mut s: TcpStream) -> Report {
    let mut buf = vec![0u8; 64 * 1024];
    let mut data = Vec::new();
    let mut write_err = None;
    let result = loop {
        match s.read(&mut buf).await {
            Ok(0) => {
                if write_err.is_none() {
                    let _ = s.shutdown().await;
                }
                break write_err.map_or(Ok(()), Err);
            }
            Ok(n) => {
                data.extend_from_slice(&buf[..n]);
                if write_err.is_none() {
                    if let Err(e) = s.write_all(&buf[..n]).await {
                        write_err = Some(e);
                    }
                }
            }
            Err(e) => break Err(write_err.unwrap_or(e)),
        }
    };
    Report { data, result }
}

/// Accepts connections and never reads from them.
async fn hold_server() -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    (addr, task)
}

fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rand::thread_rng().fill_bytes(&mut v);
    v
}

async fn roundtrip(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).await.unwrap();
    let mut back = vec![0u8; msg.len()];
    tokio::time::timeout(WAIT, s.read_exact(&mut back)).await.expect("roundtrip timed out").unwrap();
    assert_eq!(back, msg);
}

/// Reads until EOF or error; returns the bytes and how it ended.
async fn read_until_end(s: &mut TcpStream) -> (Vec<u8>, io::Result<()>) {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match tokio::time::timeout(WAIT, s.read(&mut buf)).await {
            Err(_) => panic!("read neither ended nor failed in time"),
            Ok(Ok(0)) => return (out, Ok(())),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Ok(Err(e)) => return (out, Err(e)),
        }
    }
}

fn assert_reset(r: &io::Result<()>) {
    match r {
        Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}"),
        Ok(()) => panic!("expected a reset, got a clean EOF"),
    }
}

/// Connects to a proxy that resets the connection right after accepting it.
/// The reset can already surface from `connect` itself (the proxy accepts and
/// resets before tokio reads the connect result), else on the first read.
async fn expect_reset_connection(proxy: &ChaosProxy, nth: u64) {
    let res = TcpStream::connect(proxy.addr()).await;
    assert!(proxy.wait_for_connections(nth, WAIT).await);
    match res {
        Ok(mut s) => {
            let (rest, end) = read_until_end(&mut s).await;
            assert!(rest.is_empty());
            assert_reset(&end);
        }
        Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}"),
    }
}

/// Linux reports a received RST as ECONNRESET to only one call on the socket
/// (the pending error is consumed); later reads see EOF and writes EPIPE. When
/// a socket is written and read, the reset may surface on either.
fn assert_reset_on_either(write: &io::Result<()>, read_end: &io::Result<()>) {
    match (write, read_end) {
        (_, Err(_)) => assert_reset(read_end),
        (Err(e), Ok(())) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}"),
        (Ok(()), Ok(())) => panic!("expected a reset, got a clean EOF"),
    }
}

async fn connect(proxy: &ChaosProxy, nth: u64) -> TcpStream {
    let s = TcpStream::connect(proxy.addr()).await.unwrap();
    assert!(proxy.wait_for_connections(nth, WAIT).await);
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forwards_both_ways_unchanged() {
    within(async {
        let mut server = EchoServer::start().await;
        let proxy = ChaosProxy::start(server.addr).await.unwrap();
        let client = connect(&proxy, 1).await;
        assert_eq!(proxy.live_connections(), 1);

        let sent = random_bytes(1 << 20);
        let (mut rd, mut wr) = client.into_split();
        let to_send = sent.clone();
        let writer = tokio::spawn(async move {
            wr.write_all(&to_send).await.unwrap();
            wr.shutdown().await.unwrap(); // half-close must propagate
            wr
        });
        let mut got = Vec::new();
        rd.read_to_end(&mut got).await.unwrap();
        let _wr = writer.await.unwrap();

        assert_eq!(got.len(), sent.len());
        assert_eq!(Sha256::digest(&got), Sha256::digest(&sent));
        let report = server.report().await;
        assert_eq!(Sha256::digest(&report.data), Sha256::digest(&sent));
        report.result.unwrap();
        assert!(proxy.wait_for_bytes(2 << 20, WAIT).await);
        assert_eq!(proxy.bytes_forwarded(), 2 << 20);
        assert_eq!(proxy.faults_injected(), 0);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_all_resets_both_sides() {
    within(async {
        let mut server = EchoServer::start().await;
        let proxy = ChaosProxy::start(server.addr).await.unwrap();
        let mut client = connect(&proxy, 1).await;
        roundtrip(&mut client, b"hello").await;

        proxy.kill_all();
        assert_eq!(proxy.live_connections(), 0);
        let (rest, end) = read_until_end(&mut client).await;
        assert!(rest.is_empty());
        assert_reset(&end);
        let report = server.report().await;
        assert_eq!(report.data, b"hello");
        assert_reset(&report.result);
        assert_eq!(proxy.faults_injected(), 1);

        // The proxy keeps working for new connections.
        let mut again = connect(&proxy, 2).await;
        roundtrip(&mut again, b"again").await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_all_while_blocked_in_write() {
    within(async {
        let (addr, _hold) = hold_server().await;
        let proxy = ChaosProxy::start(addr).await.unwrap();
        let mut client = connect(&proxy, 1).await;
        // The server never reads: buffers fill up and both the pump and this
        // writer block in write.
        let writer = tokio::spawn(async move {
            let chunk = vec![0x5a; 64 * 1024];
            loop {
                if let Err(e) = client.write_all(&chunk).await {
                    return e;
                }
            }
        });
        assert!(proxy.wait_for_bytes(1 << 20, WAIT).await);
        proxy.kill_all();
        let err = tokio::time::timeout(WAIT, writer).await.expect("blocked writer not released by kill_all").unwrap();
        assert!(matches!(err.kind(), io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe), "{err}");
        assert_eq!(proxy.live_connections(), 0);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stall_all_stops_data_but_new_connections_work() {
    within(async {
        let server = EchoServer::start().await;
        let proxy = ChaosProxy::start(server.addr).await.unwrap();
        let mut stalled = connect(&proxy, 1).await;
        roundtrip(&mut stalled, b"before").await;
        assert!(proxy.wait_for_bytes(12, WAIT).await);

        proxy.stall_all();
        let before = proxy.bytes_forwarded();
        stalled.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 16];
        // Asserting absence: a short timeout is the point here.
        let r = tokio::time::timeout(Duration::from_millis(300), stalled.read(&mut buf)).await;
        assert!(r.is_err(), "stalled connection delivered data: {r:?}");
        assert_eq!(proxy.bytes_forwarded(), before);
        assert_eq!(proxy.live_connections(), 1);

        let mut fresh = connect(&proxy, 2).await;
        roundtrip(&mut fresh, b"fresh connection").await;
        assert_eq!(proxy.faults_injected(), 1);

        proxy.kill_all();
        let (rest, end) = read_until_end(&mut stalled).await;
        assert!(rest.is_empty(), "stalled data leaked: {rest:?}");
        assert_reset(&end);
        assert_reset(&read_until_end(&mut fresh).await.1);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cut_after_client_to_server() {
    within(async {
        let mut server = EchoServer::start().await;
        let proxy = ChaosProxy::start(server.addr).await.unwrap();
        let mut client = connect(&proxy, 1).await;
        proxy.cut_after(Dir::ClientToServer, 1234);
        let sent = random_bytes(10_000);
        let wrote = client.write_all(&sent).await; // may fail once the cut happened
        let report = server.report().await;
        assert_eq!(report.data.len(), 1234);
        assert_eq!(report.data, sent[..1234]);
        assert_reset(&report.result);
        let (back, end) = read_until_end(&mut client).await;
        assert!(back.len() <= 1234 && back == sent[..back.len()]);
        assert_reset_on_either(&wrote, &end);
        assert_eq!(proxy.faults_injected(), 1);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cut_after_server_to_client() {
    within(async {
        let server = EchoServer::start().await;
        let proxy = ChaosProxy::start(server.addr).await.unwrap();
        let mut client = connect(&proxy, 1).await;
        proxy.cut_after(Dir::ServerToClient, 777);
        let sent = random_bytes(100_000);
        let wrote = client.write_all(&sent).await;
        let (back, end) = read_until_end(&mut client).await;
        assert_eq!(back.len(), 777);
        assert_eq!(back, sent[..777]);
        assert_reset_on_either(&wrote, &end);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cut_after_is_exact_under_bulk_traffic() {
    within(async {
        let server = EchoServer::start().await;
        let proxy = ChaosProxy::start(server.addr).await.unwrap();
        let client = connect(&proxy, 1).await;
        let n = (3 << 20) + 17;
        proxy.cut_after(Dir::ServerToClient, n);
        let sent = random_bytes(8 << 20);
        let (mut rd, mut wr) = client.into_split();
        let to_send = sent.clone();
        let writer = tokio::spawn(async move {
            let wrote = wr.write_all(&to_send).await;
            (wr, wrote)
        });
        let mut back = Vec::new();
        let mut buf = vec![0u8; 4096];
        let end = loop {
            match rd.read(&mut buf).await {
                Ok(0) => break Ok(()),
                Ok(k) => back.extend_from_slice(&buf[..k]),
                Err(e) => break Err(e),
            }
        };
        assert_eq!(back.len(), n);
        assert_eq!(Sha256::digest(&back), Sha256::digest(&sent[..n]));
        let (_wr, wrote) = writer.await.unwrap();
        assert_reset_on_either(&wrote, &end);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cut_after_zero_resets_idle_connection() {
    within(async {
        let mut server = EchoServer::start().await;
        let proxy = ChaosProxy::start(server.addr).await.unwrap();
        let mut client = connect(&proxy, 1).await;
        roundtrip(&mut client, b"x").await;
        proxy.cut_after(Dir::ClientToServer, 0);
        let (rest, end) = read_until_end(&mut client).await;
        assert!(rest.is_empty());
        assert_reset(&end);
        assert_reset(&server.report().await.result);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn flip_bit_changes_exactly_one_bit_once() {
    within(async {
        for dir in [Dir::ClientToServer, Dir::ServerToClient] {
            let server = EchoServer::start().await;
            let proxy = ChaosProxy::start(server.addr).await.unwrap();
            let mut client = connect(&proxy, 1).await;
            proxy.flip_bit(dir);
            let sent = random_bytes(4096);
            client.write_all(&sent).await.unwrap();
            let mut back = vec![0u8; sent.len()];
            client.read_exact(&mut back).await.unwrap();
            let flipped: u32 = sent.iter().zip(&back).map(|(a, b)| (a ^ b).count_ones()).sum();
            assert_eq!(flipped, 1, "{dir:?}");
            assert_eq!(proxy.faults_injected(), 1);
            // One-shot: later traffic is untouched.
            roundtrip(&mut client, &random_bytes(4096)).await;
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn inject_garbage_appears_before_next_chunk() {
    within(async {
        for dir in [Dir::ClientToServer, Dir::ServerToClient] {
            let server = EchoServer::start().await;
            let proxy = ChaosProxy::start(server.addr).await.unwrap();
            let mut client = connect(&proxy, 1).await;
            proxy.inject_garbage(dir, b"GARBAGE".to_vec());
            client.write_all(b"hello").await.unwrap();
            let mut back = [0u8; 12];
            client.read_exact(&mut back).await.unwrap();
            assert_eq!(&back, b"GARBAGEhello", "{dir:?}");
            roundtrip(&mut client, b"clean").await;
            assert_eq!(proxy.faults_injected(), 1);
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refuse_new_resets_new_connections() {
    within(async {
        let server = EchoServer::start().await;
        let proxy = ChaosProxy::start(server.addr).await.unwrap();
        proxy.refuse_new(true);
        expect_reset_connection(&proxy, 1).await;
        assert_eq!(server.accepted.load(Ordering::SeqCst), 0);
        assert_eq!(proxy.live_connections(), 0);
        assert_eq!(proxy.faults_injected(), 1);

        proxy.refuse_new(false);
        let mut ok = connect(&proxy, 2).await;
        roundtrip(&mut ok, b"let me in").await;
        assert_eq!(server.accepted.load(Ordering::SeqCst), 1);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn set_target_and_drop_kills_everything() {
    within(async {
        let a = EchoServer::start().await;
        let b = EchoServer::start().await;
        let proxy = ChaosProxy::start(a.addr).await.unwrap();
        let mut to_a = connect(&proxy, 1).await;
        roundtrip(&mut to_a, b"a").await;
        proxy.set_target(b.addr);
        let mut to_b = connect(&proxy, 2).await;
        roundtrip(&mut to_b, b"b").await;
        assert_eq!(a.accepted.load(Ordering::SeqCst), 1);
        assert_eq!(b.accepted.load(Ordering::SeqCst), 1);
        assert_eq!(proxy.connections_accepted(), 2);
        assert_eq!(proxy.live_connections(), 2);

        let clone = proxy.clone();
        drop(proxy);
        roundtrip(&mut to_a, b"clone keeps it alive").await;
        drop(clone);
        assert_reset(&read_until_end(&mut to_a).await.1);
        assert_reset(&read_until_end(&mut to_b).await.1);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unreachable_target_resets_client() {
    within(async {
        // Bind then drop to get a port nobody listens on.
        let dead = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        let proxy = ChaosProxy::start(dead).await.unwrap();
        expect_reset_connection(&proxy, 1).await;
        assert!(proxy.wait_for_connections(1, WAIT).await);
    })
    .await
}
