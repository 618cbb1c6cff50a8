//! Denial-of-service limits of the server, each against real sockets on loopback.
//!
//! Junk connections bind source addresses in 127.0.0.2–127.0.0.254 so that the per-source rate
//! limit applies to them and not to the legitimate client on 127.0.0.1. Every test is bounded
//! in time and in the number of sockets it opens.
//!
//! Run: `cargo test --release --test dos`.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use common::chaos::ChaosProxy;
use common::harness::{fast_session, next_resume};
use holdfast::keys::{AllowList, Keypair};
use holdfast::net::Limits;
use holdfast::{ClientConfig, Error, LinkEvent, Listener, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Upper bound on any one test.
const LIMIT: Duration = Duration::from_secs(60);

async fn bounded<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(LIMIT, f).await.expect("test exceeded its time bound")
}

/// A server on 127.0.0.1:0 with `limits`, allowing `n` client keys; their configurations.
async fn server(limits: Limits, n: usize) -> (Listener, Vec<ClientConfig>) {
    let server_keys = Keypair::generate();
    let clients: Vec<Keypair> = (0..n).map(|_| Keypair::generate()).collect();
    let allow = AllowList::from_keys(clients.iter().map(|k| (k.public, None)));
    let server_pub = server_keys.public;
    let mut scfg = ServerConfig::new(server_keys, allow);
    scfg.limits = limits;
    scfg.session = fast_session();
    let listener = holdfast::bind("127.0.0.1:0", scfg).await.expect("bind loopback");
    let cfgs = clients
        .into_iter()
        .map(|k| {
            let mut c = ClientConfig::new(k, server_pub);
            c.session = fast_session();
            c.recovery.backoff_initial = Duration::from_millis(10);
            c.recovery.backoff_max = Duration::from_millis(100);
            c.recovery.handshake_timeout = Duration::from_secs(10);
            // These tests look at BUSY answers themselves.
            c.recovery.busy_wait = Duration::ZERO;
            c
        })
        .collect();
    (listener, cfgs)
}

/// A TCP connection to `server` from source address 127.0.0.`last`.
async fn connect_from(last: u8, server: SocketAddr) -> std::io::Result<TcpStream> {
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)), 0))?;
    sock.connect(server).await
}

/// Waits until the server closes `sock` (EOF or reset), returning how long that took, or `None`
/// if it is still open after `limit`. Anything the server sends first is skipped.
async fn closed_within(sock: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut buf = [0u8; 512];
    tokio::time::timeout(limit, async {
        loop {
            match sock.read(&mut buf).await {
                Ok(0) | Err(_) => return start.elapsed(),
                Ok(_) => {}
            }
        }
    })
    .await
    .ok()
}

/// Reads until the server closes `sock`, returning what it sent, or `None` if it is still open
/// after `limit`.
async fn read_until_closed(sock: &mut TcpStream, limit: Duration) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    tokio::time::timeout(limit, async {
        loop {
            match sock.read(&mut buf).await {
                Ok(0) | Err(_) => return got,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .ok()
}

/// Raises the open-files soft limit towards the hard limit, for the flood test.
fn raise_fd_limit(want: u64) {
    #[cfg(unix)]
    {
        use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
        let cur = getrlimit(Resource::Nofile);
        if cur.current.is_some_and(|c| c < want) {
            let target = cur.maximum.map_or(want, |m| m.min(want));
            let _ = setrlimit(Resource::Nofile, Rlimit { current: Some(target), maximum: cur.maximum });
        }
    }
}

/// A legitimate client connects, sends `len` bytes, and reads the server's echo of them.
async fn echo_round_trip(listener: &mut Listener, cfg: ClientConfig, len: usize) -> Result<(), Error> {
    let addr = listener.local_addr().to_string();
    let client = async {
        let mut stream = holdfast::connect(addr, cfg).await?;
        let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 251) as u8).collect();
        stream.write_all(&data).await?;
        stream.shutdown().await?;
        let mut back = Vec::new();
        stream.read_to_end(&mut back).await?;
        assert!(back == data, "echo differs");
        Ok::<_, Error>(())
    };
    let server = async {
        let (mut stream, _) = listener.accept().await?;
        let mut got = Vec::new();
        stream.read_to_end(&mut got).await?;
        stream.write_all(&got).await?;
        stream.shutdown().await?;
        Ok::<_, Error>(())
    };
    // A client that fails ends the round trip at once: the server side would wait forever.
    tokio::pin!(client, server);
    let mut served = None;
    loop {
        tokio::select! {
            c = &mut client => {
                c?;
                return match served {
                    Some(s) => s,
                    None => server.await,
                };
            }
            s = &mut server, if served.is_none() => served = Some(s),
        }
    }
}

fn is_busy(e: &Error) -> bool {
    matches!(e, Error::Busy { .. })
}

#[tokio::test]
async fn silent_and_trickling_clients_are_cut_at_the_handshake_deadline() {
    bounded(async {
        let deadline = Duration::from_millis(1500);
        let limits = Limits { handshake_timeout: deadline, ..Limits::default() };
        let (listener, _) = server(limits, 1).await;
        let addr = listener.local_addr();

        let mut silent = connect_from(2, addr).await.unwrap();
        let mut trickle = connect_from(3, addr).await.unwrap();
        // A plausible start: a length prefix and the magic, one byte at a time, every 400 ms.
        let trickler = async {
            let mut sent = 0;
            for b in [0u8, 96, b'H', b'F', b'S', b'T', 1, 1, 0, 0, 0, 0, 0, 0, 0, 0] {
                tokio::time::sleep(Duration::from_millis(400)).await;
                if trickle.write_all(&[b]).await.is_err() {
                    break;
                }
                sent += 1;
            }
            let closed = closed_within(&mut trickle, Duration::from_secs(10)).await;
            (sent, closed)
        };
        let (silent_closed, (sent, trickle_closed)) =
            tokio::join!(closed_within(&mut silent, Duration::from_secs(10)), trickler);
        let silent_closed = silent_closed.expect("silent connection was never closed");
        assert!(
            silent_closed >= deadline - Duration::from_millis(100),
            "closed before the deadline: {silent_closed:?}"
        );
        assert!(silent_closed < deadline + Duration::from_secs(3), "closed late: {silent_closed:?}");
        // The trickler kept sending, yet it was cut at the same deadline (within a few bytes).
        assert!(trickle_closed.is_some(), "trickling connection was never closed");
        assert!((2..=8).contains(&sent), "trickler sent {sent} bytes before being cut");
        assert_eq!(listener.stats().handshakes, 0);
    })
    .await;
}

#[tokio::test]
async fn unauthenticated_connections_are_capped_and_the_oldest_is_evicted() {
    bounded(async {
        let cap = 8;
        // Every handshake counts as slow at once: the silent ones are evicted, oldest first.
        let limits = Limits {
            max_handshakes: cap,
            slow_handshake: Duration::ZERO,
            handshake_timeout: Duration::from_secs(30),
            ..Limits::default()
        };
        let (mut listener, mut cfgs) = server(limits, 1).await;
        let addr = listener.local_addr();

        let mut old = Vec::new();
        for i in 0..cap {
            old.push(connect_from(10 + i as u8, addr).await.unwrap());
        }
        wait_for(|| listener.stats().handshakes == cap, "the first connections to be in handshake").await;
        // Four more: the four oldest make room, and the count never passes the cap.
        let mut new = Vec::new();
        for i in 0..4 {
            new.push(connect_from(30 + i, addr).await.unwrap());
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert!(listener.stats().handshakes <= cap);
        }
        for (i, sock) in old.iter_mut().enumerate() {
            if i < 4 {
                // Evicted, and told BUSY first (not a silent close, which means "refused").
                let answer = read_until_closed(sock, Duration::from_secs(3)).await;
                assert_eq!(
                    answer.as_deref(),
                    Some(&[0, 2, 0x02, 0x02][..]),
                    "connection {i} was not evicted with BUSY"
                );
            } else {
                assert!(closed_within(sock, Duration::from_millis(200)).await.is_none(), "connection {i} was evicted");
            }
        }
        for sock in &mut new {
            assert!(closed_within(sock, Duration::from_millis(100)).await.is_none(), "a new connection was cut");
        }
        assert_eq!(listener.stats().handshakes, cap);
        // A real client still gets in: it evicts a silent one and finishes in a round trip.
        echo_round_trip(&mut listener, cfgs.remove(0), 1000).await.expect("real client connects at the cap");
    })
    .await;
}

/// In a storm (every handshake at the cap young), a new connection is told BUSY instead of
/// evicting a handshake under way.
#[tokio::test]
async fn at_the_cap_young_handshakes_are_kept_and_the_newcomer_told_busy() {
    bounded(async {
        let cap = 8;
        let limits = Limits {
            max_handshakes: cap,
            slow_handshake: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(30),
            ..Limits::default()
        };
        let (listener, _) = server(limits, 1).await;
        let addr = listener.local_addr();
        let mut young = Vec::new();
        for i in 0..cap {
            young.push(connect_from(10 + i as u8, addr).await.unwrap());
        }
        wait_for(|| listener.stats().handshakes == cap, "the first connections to be in handshake").await;
        let mut late = connect_from(40, addr).await.unwrap();
        let answer = read_until_closed(&mut late, Duration::from_secs(5)).await;
        assert_eq!(answer.as_deref(), Some(&[0, 2, 0x02, 0x02][..]), "the newcomer was not answered REJECT BUSY");
        for (i, sock) in young.iter_mut().enumerate() {
            assert!(closed_within(sock, Duration::from_millis(100)).await.is_none(), "handshake {i} was evicted");
        }
        assert_eq!(listener.stats().handshakes, cap);
    })
    .await;
}

#[tokio::test]
async fn handshakes_are_rate_limited_per_source() {
    bounded(async {
        let limits =
            Limits { handshakes_per_sec_per_ip: 5, handshake_timeout: Duration::from_secs(30), ..Limits::default() };
        let (mut listener, mut cfgs) = server(limits, 1).await;
        let addr = listener.local_addr();
        let start = Instant::now();
        let mut socks = Vec::new();
        for _ in 0..20 {
            socks.push(connect_from(20, addr).await.unwrap());
        }
        let took = start.elapsed();
        // Refused connections are answered BUSY and closed at once (so the client can tell a
        // rate limit from an authentication refusal); admitted ones wait in their handshake.
        let closed = futures_join_all(socks.into_iter().map(|mut sock| async move {
            let answer = read_until_closed(&mut sock, Duration::from_secs(1)).await;
            if let Some(answer) = &answer {
                assert_eq!(answer, &[0, 2, 0x02, 0x02], "a refused connection was not answered REJECT BUSY");
            }
            (answer.is_some(), sock)
        }))
        .await;
        let admitted = closed.iter().filter(|(c, _)| !c).count();
        // A burst of 5, plus what refilled while the 20 connected (at 5 per second).
        let refill = (took.as_secs_f64() * 5.0).ceil() as usize;
        assert!((5..=5 + refill + 1).contains(&admitted), "{admitted} of 20 admitted from one source in {took:?}");
        assert_eq!(listener.stats().handshakes, admitted);
        // Another source, and the legitimate client on 127.0.0.1, are not affected.
        let mut other = connect_from(21, addr).await.unwrap();
        assert!(closed_within(&mut other, Duration::from_millis(150)).await.is_none());
        echo_round_trip(&mut listener, cfgs.remove(0), 1000).await.expect("other sources still connect");
    })
    .await;
}

#[tokio::test]
async fn sessions_are_capped_in_total_and_per_client_key() {
    bounded(async {
        let limits = Limits { max_sessions: 3, max_sessions_per_key: 2, ..Limits::default() };
        let (listener, cfgs) = server(limits, 2).await;
        let addr = listener.local_addr().to_string();
        // Five concurrent sessions for key A: exactly two are admitted, even racing.
        let tries = (0..5).map(|_| holdfast::connect(addr.clone(), cfgs[0].clone()));
        let results = futures_join_all(tries).await;
        let ok = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(
            ok,
            2,
            "per-key cap: {:?}",
            results.iter().map(|r| r.as_ref().err().map(ToString::to_string)).collect::<Vec<_>>()
        );
        assert!(results.iter().filter_map(|r| r.as_ref().err()).all(is_busy));
        let mut a: Vec<_> = results.into_iter().filter_map(Result::ok).collect();
        // Key B gets the third and last slot, then the total cap refuses it too.
        let b1 = holdfast::connect(addr.clone(), cfgs[1].clone()).await.expect("third session");
        let err = holdfast::connect(addr.clone(), cfgs[1].clone()).await.unwrap_err();
        assert!(is_busy(&err), "total cap: {err}");
        assert_eq!(listener.stats().sessions, 3);
        // Ending one of A's sessions gives its slot back.
        let mut gone = a.pop().unwrap();
        let _ = gone.shutdown().await;
        drop(gone);
        let mut b2 = None;
        for _ in 0..100 {
            match holdfast::connect(addr.clone(), cfgs[1].clone()).await {
                Ok(s) => {
                    b2 = Some(s);
                    break;
                }
                Err(e) if is_busy(&e) => tokio::time::sleep(Duration::from_millis(50)).await,
                Err(e) => panic!("{e}"),
            }
        }
        assert!(b2.is_some(), "the freed slot was never given back");
        drop((a, b1, b2));
    })
    .await;
}

/// Joins futures without an extra dependency.
async fn futures_join_all<F>(futs: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.expect("task"));
    }
    out
}

/// The buffer budget is charged by what sessions hold and by the receive windows of their
/// streams (64 KiB each at first), not by their worst case: more sessions than the worst case
/// would allow are admitted, each stream's window bounds what the server holds for it while its
/// program reads nothing (its sender waits for credit), the budget is never exceeded, and every
/// byte arrives once the program reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_buffer_budget_holds_senders_back_instead_of_refusing_sessions() {
    bounded(async {
        const SESSIONS: usize = 12;
        const WINDOW: usize = holdfast::proto::streams::INITIAL_WINDOW as usize;
        const BUDGET: usize = SESSIONS * WINDOW + (256 << 10);
        const LEN: usize = 512 << 10;
        // Each session could buffer 1 MiB received plus 8 MiB to replay: the old worst-case
        // charge would admit none of them into this budget.
        let limits = Limits { buffer_budget: BUDGET, ..Limits::default() };
        let (mut listener, cfgs) = server(limits, 1).await;
        let addr = listener.local_addr().to_string();
        let mut senders = Vec::new();
        for i in 0..SESSIONS {
            let mut s =
                holdfast::connect(addr.clone(), cfgs[0].clone()).await.unwrap_or_else(|e| panic!("session {i}: {e}"));
            senders.push(tokio::spawn(async move {
                let data: Vec<u8> = (0..LEN).map(|j| (j * 7 + i) as u8).collect();
                s.write_all(&data).await.unwrap();
                s.shutdown().await.unwrap();
                s
            }));
        }
        let mut streams = Vec::new();
        for _ in 0..SESSIONS {
            streams.push(listener.accept().await.unwrap().0);
        }
        assert_eq!(listener.stats().sessions, SESSIONS, "a session was refused");
        for _ in 0..200 {
            let s = listener.stats();
            assert!(s.buffered <= BUDGET, "over the budget: {s:?}");
            tokio::task::yield_now().await;
        }
        // The program reads: every byte of every session arrives.
        let mut readers = Vec::new();
        for (i, mut s) in streams.into_iter().enumerate() {
            readers.push(tokio::spawn(async move {
                let mut got = Vec::new();
                s.read_to_end(&mut got).await.unwrap();
                (i, got)
            }));
        }
        let mut order = Vec::new();
        for r in readers {
            let (_, got) = r.await.unwrap();
            assert_eq!(got.len(), LEN);
            order.push(got);
        }
        // The streams were accepted in an unknown order: match each by its pattern.
        let mut seen: Vec<usize> = order.iter().map(|g| usize::from(g[0])).collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..SESSIONS).collect::<Vec<_>>());
        for got in &order {
            let i = usize::from(got[0]);
            assert!(got.iter().enumerate().all(|(j, &b)| b == (j * 7 + i) as u8), "session {i}'s bytes differ");
        }
        for s in senders {
            drop(s.await.unwrap());
        }
    })
    .await;
}

#[tokio::test]
async fn resumes_are_rate_limited_per_session_and_still_succeed() {
    bounded(async {
        let interval = Duration::from_millis(500);
        let limits = Limits { resumes_per_sec_per_session: 2, ..Limits::default() };
        let (mut listener, mut cfgs) = server(limits, 1).await;
        let proxy = ChaosProxy::start(listener.local_addr()).await.unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            loop {
                let n = s.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                s.write_all(&buf[..n]).await.unwrap();
            }
            s.shutdown().await.unwrap();
            listener
        });
        let mut stream = holdfast::connect(proxy.addr().to_string(), cfgs.remove(0)).await.unwrap();
        let mut events = stream.events();
        let mut echo = [0u8; 16];
        stream.write_all(b"before").await.unwrap();
        stream.read_exact(&mut echo[..6]).await.unwrap();

        // Four faults in a row, each as soon as the previous resume has carried data both
        // ways: without the limit each resume would take a few milliseconds. The bucket's
        // burst (2) lets the first two through at once; after that they are spaced by 1/rate.
        let mut resumed_at = Vec::new();
        for i in 0..4 {
            proxy.kill_all();
            match next_resume(&mut events, Duration::from_secs(10)).await {
                Some(LinkEvent::Resumed { .. }) => resumed_at.push(Instant::now()),
                other => panic!("fault {i} did not resume: {other:?}"),
            }
            let msg = format!("after {i}");
            stream.write_all(msg.as_bytes()).await.unwrap();
            stream.read_exact(&mut echo[..msg.len()]).await.unwrap();
            assert_eq!(&echo[..msg.len()], msg.as_bytes());
        }
        // A bucket of burst b refilled at r/s lets at most b + r*t resumes through in t
        // seconds: the 3rd needs 0.5 s and the 4th 1 s after the first (100 ms of slack for the
        // bucket starting slightly before the first resume completed).
        let since_first = |k: usize| resumed_at[k] - resumed_at[0];
        assert!(since_first(2) >= interval - Duration::from_millis(100), "3rd resume after {:?}", since_first(2));
        assert!(since_first(3) >= 2 * interval - Duration::from_millis(100), "4th resume after {:?}", since_first(3));
        stream.shutdown().await.unwrap();
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        let listener = server.await.unwrap();
        assert_eq!(listener.stats().resumes, 4);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_client_gets_through_a_flood_of_junk() {
    bounded(async {
        raise_fd_limit(4096);
        let limits = Limits { max_handshakes: 256, handshake_timeout: Duration::from_secs(3), ..Limits::default() };
        let (mut listener, mut cfgs) = server(limits, 1).await;
        let addr = listener.local_addr();
        let junk_count = 500usize;
        let stop = std::sync::Arc::new(tokio::sync::Notify::new());
        let mut tasks = Vec::new();
        for i in 0..junk_count {
            let src = 2 + (i % 253) as u8;
            let stop = stop.clone();
            tasks.push(tokio::spawn(async move {
                let Ok(mut sock) = connect_from(src, addr).await else { return };
                let work = async {
                    // 200 silent, 100 trickling, 100 garbage hellos, 50 HTTP, 50 huge lengths:
                    // the 300 long-lived ones are more than the 256 handshake slots.
                    match i % 10 {
                        0..=3 => {}
                        4 | 5 => {
                            for b in [0u8, 96, b'H', b'F', b'S', b'T'] {
                                if sock.write_all(&[b]).await.is_err() {
                                    break;
                                }
                                tokio::time::sleep(Duration::from_millis(700)).await;
                            }
                        }
                        6 | 7 => {
                            // A valid-looking IK hello full of garbage: costs the server a DH.
                            let mut hello = vec![0, 100, b'H', b'F', b'S', b'T', 1, 1];
                            hello.extend((0..94).map(|k| (k * 13 + i) as u8));
                            let _ = sock.write_all(&hello).await;
                        }
                        8 => {
                            let _ = sock.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
                        }
                        _ => {
                            let _ = sock.write_all(&[0xff, 0xff, 1, 2, 3]).await;
                        }
                    }
                    let mut buf = [0u8; 64];
                    while let Ok(n) = sock.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                    }
                };
                tokio::select! {
                    _ = work => {}
                    _ = stop.notified() => {}
                }
            }));
        }
        // Let the flood fill the handshake slots (or 2 s pass), then the real client connects.
        let mut peak = 0;
        for _ in 0..200 {
            tokio::time::sleep(Duration::from_millis(10)).await;
            peak = peak.max(listener.stats().handshakes);
            if peak >= 256 {
                break;
            }
        }
        assert!(peak <= 256, "handshakes over the cap: {peak}");
        let start = Instant::now();
        // While every slot holds a young junk connection, the real client is told BUSY and
        // retries (as a first connection does by default), and gets in once they are slow.
        let mut real = cfgs.remove(0);
        real.recovery.busy_wait = Duration::from_secs(15);
        echo_round_trip(&mut listener, real, 256 * 1024).await.expect("real client during the flood");
        let took = start.elapsed();
        assert!(took < Duration::from_secs(20), "real client took {took:?}");
        assert!(listener.stats().handshakes <= 256, "handshakes over the cap");
        let closed_early = tasks.iter().filter(|t| t.is_finished()).count();
        stop.notify_waiters();
        for t in tasks {
            t.abort();
        }
        eprintln!(
            "flood: {junk_count} junk connections, peak {peak} handshakes, {closed_early} junk connections \
             closed by the server, real client done in {took:?}"
        );
    })
    .await;
}

async fn wait_for(mut cond: impl FnMut() -> bool, what: &str) {
    for _ in 0..200 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

/// A first connection told BUSY (here: the server is at its session cap) tries again, backing
/// off, and gets in once a slot frees, instead of failing at once.
#[tokio::test]
async fn a_first_connection_waits_out_a_busy_server() {
    bounded(async {
        let limits = Limits { max_sessions: 1, ..Limits::default() };
        let (mut listener, cfgs) = server(limits, 1).await;
        let addr = listener.local_addr().to_string();
        let first = holdfast::connect(addr.clone(), cfgs[0].clone()).await.expect("the first session");
        let (held, _) = listener.accept().await.unwrap();
        let mut patient = cfgs[0].clone();
        patient.recovery.busy_wait = Duration::from_secs(20);
        let second = tokio::spawn(holdfast::connect(addr, patient));
        wait_for(|| listener.stats().refused.busy >= 2, "the second connection to be told BUSY, twice").await;
        assert!(!second.is_finished(), "the second connection gave up at BUSY");
        drop((first, held));
        let mut s = second.await.unwrap().expect("the second connection got in once a slot freed");
        let (mut theirs, _) = listener.accept().await.unwrap();
        s.write_all(b"in").await.unwrap();
        let mut got = [0u8; 2];
        theirs.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"in");
    })
    .await;
}
