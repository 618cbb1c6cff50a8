//! What one client of dynamic or reverse forwarding can hold on the server is bounded, and
//! does not stop another key (the second security review, issue 21, items 2, 3 and 8): plain
//! connections to a reverse forward's listener, name look-ups that never return, and names
//! tested for existence. Everything runs in this process, on loopback, through the library.
//! Run: `cargo test --release --test tunnel_bounds`.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use common::chaos::ChaosProxy;
use common::cli::echo_service;
use common::harness::fast_session;
use holdfast::keys::{AllowList, Keypair};
use holdfast::net::StatsHandle;
use holdfast::tunnel::{self, MuxPool, ResolveFn, Services, TunnelError, TunnelLimits};
use holdfast::{ClientConfig, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

const LIMIT: Duration = Duration::from_secs(60);

/// A tunnel server on loopback offering `services` to two keys, `a` and `b`; a pool (one
/// multiplexed session) for each. The server stops when the returned task is dropped.
async fn start(services: Arc<Services>) -> (Arc<MuxPool>, Arc<MuxPool>, tokio::task::JoinHandle<()>) {
    let (a, b, task, _, _) = start_with(services, false).await;
    (a, b, task)
}

/// [`start`], with `a` reaching the server through a chaos proxy if `proxied`; also the
/// server's counters.
async fn start_with(
    services: Arc<Services>,
    proxied: bool,
) -> (Arc<MuxPool>, Arc<MuxPool>, tokio::task::JoinHandle<()>, Option<ChaosProxy>, StatsHandle) {
    let server_keys = Keypair::generate();
    let server_pub = server_keys.public;
    let (a, b) = (Keypair::generate(), Keypair::generate());
    let allow = AllowList::from_keys([(a.public, Some("a".to_string())), (b.public, Some("b".to_string()))]);
    let mut scfg = ServerConfig::new(server_keys, allow);
    scfg.session = fast_session();
    let listener = holdfast::bind("127.0.0.1:0", scfg).await.expect("bind loopback");
    let addr = listener.local_addr();
    let stats = listener.stats_handle();
    let task = tokio::spawn(async move {
        let _ = tunnel::serve(listener, services).await;
    });
    let proxy = if proxied { Some(ChaosProxy::start(addr).await.unwrap()) } else { None };
    let pool = |k: Keypair, to: SocketAddr| {
        let mut c = ClientConfig::new(k, server_pub);
        c.session = fast_session();
        c.recovery.backoff_initial = Duration::from_millis(10);
        c.recovery.backoff_max = Duration::from_millis(100);
        MuxPool::new(to.to_string(), c, None)
    };
    let a_to = proxy.as_ref().map_or(addr, ChaosProxy::addr);
    (pool(a, a_to), pool(b, addr), task, proxy, stats)
}

/// Polls `cond` (bounded) until it holds: waiting for a state, not for time.
async fn until(what: &str, cond: impl Fn() -> bool) {
    let wait = async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    timeout(LIMIT, wait).await.unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

/// `b`'s service `web` echoes a line.
async fn web_echoes(pool: &MuxPool) {
    let mut s = pool.open("web").await.expect("service web refused").expect("the server multiplexes");
    s.write_all(b"ping\n").await.unwrap();
    let mut got = [0u8; 5];
    timeout(LIMIT, s.read_exact(&mut got)).await.expect("no echo in time").unwrap();
    assert_eq!(&got, b"ping\n");
}

/// Item 2: plain connections (no key needed) to a reverse forward's listener: the server
/// accepts only as many as the listener's bound, the rest wait in the kernel's backlog, and
/// another key's service still answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reverse_listener_holds_at_most_its_bound_and_another_key_gets_in() {
    const BOUND: usize = 8;
    let echo = echo_service().await;
    let mut services = Services::new();
    services.add("web", &echo.to_string()).unwrap();
    services.allow_listen("127.0.0.1:*".parse().unwrap());
    services.set_limits(TunnelLimits { reverse_per_listener: BOUND, ..TunnelLimits::default() });
    let services = Arc::new(services);
    let (a, b, server) = start(services.clone()).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let at = SocketAddr::from(([127, 0, 0, 1], port));
    let forward = tokio::spawn(tunnel::remote(a.clone(), at.to_string(), echo.to_string()));
    until("the reverse forward's listener", || services.reverse_counts().2 == 1).await;

    // Five times the bound, each held open by the echo service behind the client.
    let mut plain = Vec::new();
    for _ in 0..5 * BOUND {
        plain.push(timeout(LIMIT, TcpStream::connect(at)).await.expect("connect timed out").unwrap());
    }
    until("the bound's worth of accepted connections", || services.reverse_counts().0 >= BOUND).await;
    // A round trip of another key through the same server, while they wait.
    web_echoes(&b).await;
    let (open, most, _) = services.reverse_counts();
    assert_eq!((open, most), (BOUND, BOUND), "the server held more connections than the listener's bound");

    // Closing the held ones lets the waiting ones in, still within the bound.
    drop(plain);
    until("every connection released", || services.reverse_counts().0 == 0).await;
    assert_eq!(services.reverse_counts().1, BOUND);
    forward.abort();
    a.close().await;
    b.close().await;
    server.abort();
}

/// Item 2: while the session that asked for a reverse forward is detached, its listener
/// accepts nothing (the kernel's backlog holds the connections); when the client is back, they
/// are carried to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_detached_sessions_listener_accepts_nothing_until_it_resumes() {
    let echo = echo_service().await;
    let mut services = Services::new();
    services.add("web", &echo.to_string()).unwrap();
    services.allow_listen("127.0.0.1:*".parse().unwrap());
    let services = Arc::new(services);
    let (a, b, server, proxy, stats) = start_with(services.clone(), true).await;
    let proxy = proxy.unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let at = SocketAddr::from(([127, 0, 0, 1], port));
    let forward = tokio::spawn(tunnel::remote(a.clone(), at.to_string(), echo.to_string()));
    until("the reverse forward's listener", || services.reverse_counts().2 == 1).await;

    proxy.refuse_new(true);
    proxy.kill_all();
    until("the session detached", || stats.stats().detached == 1).await;
    let mut plain = Vec::new();
    for _ in 0..20 {
        plain.push(timeout(LIMIT, TcpStream::connect(at)).await.expect("connect timed out").unwrap());
    }
    // A round trip of another key through the same server, while they wait.
    web_echoes(&b).await;
    assert_eq!(services.reverse_counts().1, 0, "a listener accepted while its session was detached");

    proxy.refuse_new(false);
    until("the waiting connections carried", || services.reverse_counts().0 == 20).await;
    let mut first = plain.swap_remove(0);
    first.write_all(b"back\n").await.unwrap();
    let mut got = [0u8; 5];
    timeout(LIMIT, first.read_exact(&mut got)).await.expect("no echo in time").unwrap();
    assert_eq!(&got, b"back\n");
    forward.abort();
    a.close().await;
    b.close().await;
    server.abort();
}

/// A resolver whose names ending `.stuck` never answer until released; `exists.test` and
/// `localhost` are 127.0.0.1 and other names do not exist. It counts the look-ups it was asked
/// for: of `.stuck` names (`asked`), and of the others (`other`).
struct Resolver {
    gate: Arc<(Mutex<bool>, Condvar)>,
    asked: Arc<AtomicUsize>,
    other: Arc<AtomicUsize>,
}

impl Resolver {
    fn new() -> (Resolver, Arc<ResolveFn>) {
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let (asked, other) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (g, n, o) = (gate.clone(), asked.clone(), other.clone());
        let f: Arc<ResolveFn> = Arc::new(move |host: &str, port| {
            if !host.ends_with(".stuck") {
                o.fetch_add(1, Ordering::SeqCst);
            }
            if host.ends_with(".stuck") {
                n.fetch_add(1, Ordering::SeqCst);
                let (open, cv) = &*g;
                let mut open = open.lock().unwrap();
                while !*open {
                    open = cv.wait(open).unwrap();
                }
                return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "released"));
            }
            match host {
                "exists.test" | "localhost" => Ok(vec![SocketAddr::from(([127, 0, 0, 1], port))]),
                _ => Err(std::io::Error::new(std::io::ErrorKind::NotFound, "no such name")),
            }
        });
        (Resolver { gate, asked, other }, f)
    }

    fn release(&self) {
        *self.gate.0.lock().unwrap() = true;
        self.gate.1.notify_all();
    }
}

impl Drop for Resolver {
    fn drop(&mut self) {
        self.release();
    }
}

/// Item 3: one key's look-ups that never return hold only its session's bound, and another
/// key's service, whose target is a name, still connects. The runtime has two blocking
/// threads, as a busy server's pool might have none to spare: clients' look-ups must not use it.
#[test]
fn one_keys_stuck_lookups_do_not_hold_up_another_keys_service() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let echo = echo_service().await;
        let (resolver, resolve) = Resolver::new();
        let mut services = Services::new();
        services.add("web", &format!("localhost:{}", echo.port())).unwrap();
        services.allow_connect("*:*".parse().unwrap());
        services.set_resolver(resolve);
        let per_session = services.limits().lookups_per_session;
        let (a, b, server) = start(Arc::new(services)).await;
        let mut stuck = tokio::task::JoinSet::new();
        for i in 0..64 {
            let a = a.clone();
            stuck.spawn(async move { a.open_connect(&format!("n{i}.stuck"), 80).await.map(|_| ()) });
        }
        // Two look-ups stuck (what the runtime's two blocking threads could hold) before `b`
        // asks; then the session's bound, and not one more.
        until("stuck look-ups", || resolver.asked.load(Ordering::SeqCst) >= 2).await;
        web_echoes(&b).await;
        until("the session's bound of look-ups", || resolver.asked.load(Ordering::SeqCst) >= per_session).await;
        web_echoes(&b).await;
        assert_eq!(resolver.asked.load(Ordering::SeqCst), per_session, "one session ran more look-ups than its bound");
        resolver.release();
        stuck.abort_all();
        a.close().await;
        b.close().await;
        server.abort();
    });
}

/// Red team T1: a service whose target is a name was looked up once per stream, each on
/// tokio's blocking pool: a key opening streams fast behind a slow resolver held hundreds of
/// threads and delayed every other key's streams to named services past their timeout. Now
/// each target has one look-up at a time, its answer reused a while: fifty streams at once from
/// one key, and another key's, make one look-up between them, and every one echoes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_to_a_service_named_by_host_share_one_lookup() {
    let echo = echo_service().await;
    let (resolver, resolve) = Resolver::new();
    let mut services = Services::new();
    services.add("web", &format!("exists.test:{}", echo.port())).unwrap();
    services.set_resolver(resolve);
    let (a, b, server) = start(Arc::new(services)).await;
    let mut all = tokio::task::JoinSet::new();
    for _ in 0..50 {
        let a = a.clone();
        all.spawn(async move { web_echoes(&a).await });
    }
    web_echoes(&b).await;
    while let Some(r) = all.join_next().await {
        r.unwrap();
    }
    assert_eq!(resolver.other.load(Ordering::SeqCst), 1, "look-ups of the service's target");
    a.close().await;
    b.close().await;
    server.abort();
}

/// Item 8: with only an address rule, a name that does not exist and one that resolves outside
/// the rule get the same answer (status 1), so a client cannot probe which names exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_gets_one_answer_whether_it_exists_or_not() {
    let (_resolver, resolve) = Resolver::new();
    let mut services = Services::new();
    services.allow_connect("10.0.0.0/8:5432".parse().unwrap());
    services.set_resolver(resolve);
    let (a, b, server) = start(Arc::new(services)).await;
    for name in ["exists.test", "missing.test"] {
        let r = timeout(LIMIT, a.open_connect(name, 5432)).await.expect("no answer in time");
        assert!(matches!(r, Err(TunnelError::UnknownService(_))), "{name}: {r:?}");
    }
    a.close().await;
    b.close().await;
    server.abort();
}

/// A server offering one service `name` (a listener of the test's own, which nobody reads
/// unless the test does), the client's pools, a tunnel to it and the service's side of it.
async fn one_tunnel(
    name: &str,
) -> (Arc<MuxPool>, Arc<MuxPool>, tokio::task::JoinHandle<()>, holdfast::Stream, tokio::net::TcpStream) {
    let service = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut services = Services::new();
    services.add(name, &service.local_addr().unwrap().to_string()).unwrap();
    let (a, b, server) = start(Arc::new(services)).await;
    let s = a.open(name).await.expect("service refused").expect("the server multiplexes");
    let (conn, _) = timeout(LIMIT, service.accept()).await.expect("no connection to the service").unwrap();
    (a, b, server, s, conn)
}

/// Found by an implementation written from docs/PROTOCOL.md alone: a client's RESET after its
/// FIN did not end the tunnel while the service stayed silent. The server kept the service's
/// connection (a descriptor, though the stream's slot was given back) until the service next
/// spoke, and the session could not finish. A RESET now resets the service's connection at once
/// (Appendix A.5), whatever the service does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_after_the_fin_ends_the_tunnel_while_the_service_is_silent() {
    let (a, b, server, mut s, mut conn) = one_tunnel("silent").await;
    s.shutdown().await.unwrap();
    let mut buf = [0u8; 16];
    let n = timeout(LIMIT, conn.read(&mut buf)).await.expect("the FIN never reached the service").unwrap();
    assert_eq!(n, 0, "the service read bytes nobody sent");
    s.reset();
    // The service's connection is reset. Its reads still say end of file (the FIN came first),
    // but the reset leaves its error on the socket.
    assert_reset(&conn, "the service's connection outlived the client's RESET").await;
    a.close().await;
    b.close().await;
    server.abort();
}

/// Found by a red-team review: a tunnel whose service closed its side and then never read held
/// the service's connection forever once its stream was reset or its session ended (the
/// direction to the service waited for room in the socket and watched nothing else), its slot
/// given back: descriptors outside every bound. A RESET now ends it at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_ends_a_tunnel_whose_service_never_reads() {
    let (a, b, server, s, conn) = one_tunnel("half").await;
    // The service ends its side at once and never reads.
    let conn = conn.into_std().unwrap();
    conn.shutdown(std::net::Shutdown::Write).unwrap();
    let conn = TcpStream::from_std(conn).unwrap();
    let (mut rd, mut wr) = s.into_split();
    let mut eof = [0u8; 1];
    assert_eq!(timeout(LIMIT, rd.read(&mut eof)).await.expect("no FIN from the service").unwrap(), 0);
    // Writes until the path to the service is full: the server then waits for room (were the
    // server not yet waiting, the RESET below would find it still writing, and this test would
    // pass without the fix).
    fill_until_stalled(&mut wr).await;
    wr.reset();
    drop(rd);
    assert_reset(&conn, "the service's connection outlived the RESET").await;
    a.close().await;
    b.close().await;
    server.abort();
}

/// Writes to `wr` until the path behind it is full. Stalled: three writes in a row that make no
/// progress for 100 ms. (On a machine too busy for that, it stops early, with less queued: the
/// tests that use it then check less, and never fail for it.)
async fn fill_until_stalled<W: tokio::io::AsyncWrite + Unpin>(wr: &mut W) {
    let chunk = vec![7u8; 64 << 10];
    let fill = async {
        let mut stalls = 0;
        while stalls < 3 {
            match timeout(Duration::from_millis(100), wr.write_all(&chunk)).await {
                Ok(r) => {
                    r.expect("the stream failed while filling");
                    stalls = 0;
                }
                Err(_) => stalls += 1,
            }
        }
    };
    timeout(LIMIT, fill).await.expect("the writer never stalled");
}

/// True (and the test is reported skipped) if `ss` is not here.
fn without_ss(test: &str) -> bool {
    let missing = common::procs::check_tools(&["ss"]).err();
    if let Some(reason) = &missing {
        common::procs::skip(test, reason);
    }
    missing.is_some()
}

/// What `ss ARGS` prints.
fn ss(args: &[&str]) -> String {
    let out = std::process::Command::new("ss").args(args).output().expect("ss runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A service that never reads holds, in the server's socket to it, at most the unsent bytes
/// `TCP_NOTSENT_LOWAT` allows (256 KiB) and one write (256 KiB), not the kernel's largest send
/// buffer (a red-team review measured 3.8 MiB of kernel memory for each such stream, so that a
/// few hundred of one key's streams squeezed every TCP socket on the host). `ss` reads the
/// socket's send queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_that_never_reads_holds_little_kernel_memory() {
    if without_ss("a_service_that_never_reads_holds_little_kernel_memory") {
        return;
    }
    let (a, b, server, s, conn) = one_tunnel("silent").await;
    let port = conn.local_addr().unwrap().port();
    let (_rd, mut wr) = s.into_split();
    fill_until_stalled(&mut wr).await;
    // The server's socket to the service: its peer is the service's port.
    let out = ss(&["-tnH", "state", "established"]);
    let queued: Vec<u64> = out
        .lines()
        .filter(|l| l.split_whitespace().nth(3).is_some_and(|peer| peer == format!("127.0.0.1:{port}")))
        .map(|l| l.split_whitespace().nth(1).unwrap().parse().unwrap())
        .collect();
    assert_eq!(queued.len(), 1, "one socket to the service: {out}");
    assert!(queued[0] >= 64 << 10, "the test filled nothing: {} bytes queued", queued[0]);
    assert!(queued[0] <= 512 << 10, "{} bytes queued for a service that never reads", queued[0]);
    wr.reset();
    a.close().await;
    b.close().await;
    server.abort();
}

/// The receive side of the same: a download that flowed fast (so that the kernel would grow the
/// buffer) and then found no reader leaves little in the server's socket from a service on this
/// host, whose receive buffer is fixed at 256 KiB (`src/net/kernel.rs`). The reader stops; the
/// service writes until it stalls; `ss -m` reads what the kernel holds for the server's socket
/// (up to 3.5 MiB with the kernel's own tuning in runs here, 7.1 MiB in a red-team run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_nobody_reads_holds_little_in_the_servers_receive_buffer() {
    if without_ss("a_download_nobody_reads_holds_little_in_the_servers_receive_buffer") {
        return;
    }
    let (a, b, server, mut s, conn) = one_tunnel("fire").await;
    let port = conn.local_addr().unwrap().port();
    let (_rd, mut wr) = conn.into_split();
    let fire = tokio::spawn(async move {
        fill_until_stalled(&mut wr).await;
        wr
    });
    let mut buf = vec![0u8; 64 << 10];
    timeout(LIMIT, read_n(&mut s, &mut buf, 64 << 20)).await.expect("the download did not flow");
    let _wr = timeout(LIMIT, fire).await.expect("the service never stalled").unwrap();
    // The server's socket to the service: its peer is the service's port. `ss -m` gives what
    // the kernel holds for it (`r`) and its receive buffer (`rb`): fixed, it is exactly the
    // kernel's double of the 256 KiB set; tuned by the kernel, it grew to 0.4–3.5 MiB here.
    let out = ss(&["-tmnH", "state", "established", "dst", &format!("127.0.0.1:{port}")]);
    let skmem = |field: &str| -> u64 {
        let at = out.find("skmem:(").unwrap_or_else(|| panic!("no skmem in: {out}"));
        let list = &out[at + 7..];
        let list = &list[..list.find(')').unwrap()];
        let value =
            list.split(',').find_map(|f| f.strip_prefix(field).filter(|v| v.bytes().all(|b| b.is_ascii_digit())));
        value.unwrap_or_else(|| panic!("no {field} in: {out}")).parse().unwrap()
    };
    // No lower bound on what it holds: on a busy machine the fill may stop early (see
    // `fill_until_stalled`); the buffer's size is what bounds it.
    let (held, buffer) = (skmem("r"), skmem("rb"));
    assert_eq!(buffer, 512 << 10, "the receive buffer was not fixed: {out}");
    assert!(held <= buffer + (64 << 10), "{held} bytes held for a receive buffer of {buffer}: {out}");
    s.reset();
    a.close().await;
    b.close().await;
    server.abort();
}

/// A link the server gives up for a resume is reset, not closed: closed with bytes queued for a
/// peer that takes none, the kernel would keep it (no descriptor, no budget) for as long as the
/// peer acknowledges its probes (a red-team review left 800 such sockets, 276 MiB, by resuming
/// over and over and never reading the old links). Here a proxy stops reading the link in the
/// middle of a download; the client resumes on a new connection; once the download flows again,
/// `ss` finds no socket of the server's port still trying to deliver.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_given_up_for_a_resume_leaves_nothing_in_the_kernel() {
    if without_ss("a_link_given_up_for_a_resume_leaves_nothing_in_the_kernel") {
        return;
    }
    let service = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut services = Services::new();
    services.add("fire", &service.local_addr().unwrap().to_string()).unwrap();
    let (a, b, server, proxy, _) = start_with(Arc::new(services), true).await;
    let proxy = proxy.unwrap();
    let mut s = a.open("fire").await.expect("service refused").expect("the server multiplexes");
    let (mut conn, _) = timeout(LIMIT, service.accept()).await.expect("no connection to the service").unwrap();
    let fire = tokio::spawn(async move {
        let chunk = vec![5u8; 64 << 10];
        while conn.write_all(&chunk).await.is_ok() {}
    });
    let mut buf = vec![0u8; 64 << 10];
    timeout(LIMIT, read_n(&mut s, &mut buf, 4 << 20)).await.expect("the download did not start");
    let accepted = proxy.connections_accepted();
    proxy.stall_all();
    assert!(proxy.wait_for_connections(accepted + 1, LIMIT).await, "the client never resumed");
    timeout(LIMIT, read_n(&mut s, &mut buf, 4 << 20)).await.expect("the download did not go on after the resume");
    let port = proxy.target().port();
    let out = ss(&["-tnH", "state", "all", "sport", "=", &format!(":{port}")]);
    let stuck: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("FIN-WAIT-1") || l.starts_with("LAST-ACK") || l.starts_with("CLOSING"))
        .collect();
    assert!(stuck.is_empty(), "sockets of the server still delivering: {stuck:?}");
    fire.abort();
    proxy.kill_all();
    a.close().await;
    b.close().await;
    server.abort();
}

/// Reads `n` bytes or more from `s` into `buf`, over and over.
async fn read_n(s: &mut holdfast::Stream, buf: &mut [u8], n: usize) {
    let mut got = 0;
    while got < n {
        let k = s.read(buf).await.expect("the download failed");
        assert!(k > 0, "the download ended");
        got += k;
    }
}

/// Waits (bounded) until `conn` was reset: its error (`take_error`) is a reset or a broken
/// pipe. Reads cannot tell once they returned end of file.
async fn assert_reset(conn: &TcpStream, what: &str) {
    let reset = async {
        loop {
            match conn.take_error() {
                Ok(Some(e)) => break e.kind(),
                Ok(None) => tokio::time::sleep(Duration::from_millis(5)).await,
                Err(e) => break e.kind(),
            }
        }
    };
    let kind = timeout(LIMIT, reset).await.expect(what);
    assert!(
        matches!(kind, std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe),
        "the service's connection ended with {kind:?}, not a reset"
    );
}

/// A hostile server (one holding the key the client pins) opening more reverse connections
/// than any honest server would: the client carries at most `REVERSE_MAX` at once (each a
/// descriptor for its target) and resets the rest, instead of taking every descriptor it has
/// (a review: 1,006 of 1,024, and `--local` could accept nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_server_gets_at_most_the_clients_reverse_connection_cap() {
    const OPENS: usize = tunnel::REVERSE_MAX + 44;
    let (server_keys, client_keys) = (Keypair::generate(), Keypair::generate());
    let server_pub = server_keys.public;
    let allow = AllowList::from_keys([(client_keys.public, Some("c".to_string()))]);
    let mut scfg = ServerConfig::new(server_keys, allow);
    scfg.session = fast_session();
    let mut listener = holdfast::bind("127.0.0.1:0", scfg).await.expect("bind loopback");
    let target = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut ccfg = ClientConfig::new(client_keys, server_pub);
    ccfg.session = fast_session();
    let pool = MuxPool::new(listener.local_addr().to_string(), ccfg, None);
    let forward = tokio::spawn(tunnel::remote(pool, "127.0.0.1:9999".into(), target.local_addr().unwrap().to_string()));
    // The target takes every connection and holds it (the kernel's backlog may be small).
    let at_target = Arc::new(AtomicUsize::new(0));
    let counted = at_target.clone();
    let acceptor = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((c, _)) = target.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            conns.push(c);
        }
    });
    // The hostile server: answers the listen request, then opens stream after stream for it.
    let (session, _) = timeout(LIMIT, listener.accept_session()).await.expect("no session").unwrap();
    let mut control = timeout(LIMIT, session.accept()).await.expect("no listen request").unwrap();
    let mut head = [0u8; 2];
    control.read_exact(&mut head).await.unwrap();
    let mut bind = vec![0u8; head[1] as usize];
    control.read_exact(&mut bind).await.unwrap();
    assert_eq!((head[0], bind.as_slice()), (0xFE, &b"127.0.0.1:9999"[..]));
    let at = b"127.0.0.1:9999";
    control.write_all(&[&[0u8, at.len() as u8][..], at].concat()).await.unwrap();
    let mut answers = tokio::task::JoinSet::new();
    for _ in 0..OPENS {
        let mut s = timeout(LIMIT, session.open()).await.expect("no stream credit").unwrap();
        s.write_all(&[&[0xFDu8, at.len() as u8][..], at].concat()).await.unwrap();
        answers.spawn(async move {
            let mut reply = [0u8; 2];
            let r = timeout(LIMIT, s.read_exact(&mut reply)).await.expect("no answer to a reverse open");
            (r.is_ok() && reply == [0, 0], s)
        });
    }
    let (mut carried, mut held) = (0, Vec::new());
    while let Some(r) = answers.join_next().await {
        let (ok, s) = r.unwrap();
        carried += usize::from(ok);
        held.push(s);
    }
    assert_eq!(carried, tunnel::REVERSE_MAX, "reverse connections the client carried at once");
    // Each carried one was answered once its connection was made (the target's accept may
    // lag behind the kernel's); the others never connected.
    until("the target's accepts", || at_target.load(Ordering::SeqCst) >= tunnel::REVERSE_MAX).await;
    assert_eq!(at_target.load(Ordering::SeqCst), tunnel::REVERSE_MAX, "connections the client made to its target");
    forward.abort();
    acceptor.abort();
    drop((held, control, session));
}
