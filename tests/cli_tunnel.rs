//! The `client` binary's forwards, as an operator meets them (issue 21, items 10 and 14): a
//! SOCKS listener open to the network is said to be, a lost session ends the client with an
//! error instead of a new session started unasked, and a refused `--remote` is logged once.
//! Run: `cargo test --release --test cli_tunnel`.

mod common;

use common::chaos::ChaosProxy;
use common::cli::{assert_error, echo_service, run, strs, Keys, Proc, LIMIT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

/// `--socks` on a non-loopback address is logged as a warning (once, at start), and the help
/// says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socks_on_a_non_loopback_address_is_warned_about() {
    let keys = Keys::new("socks-open");
    let mut args = keys.client_args("client", common::cli::closed_port(), "unused");
    args.extend(["--socks", "0.0.0.0:0"].map(String::from));
    let open = Proc::spawn(&strs(&args), false);
    let log = open.wait_log("dynamic forwarding (SOCKS5)", 1).await;
    let warned: Vec<&str> =
        log.lines().filter(|l| l.contains(" WARN ") && l.contains("not a loopback address")).collect();
    assert_eq!(warned.len(), 1, "no single warning for --socks 0.0.0.0:\n{log}");
    drop(open);

    let mut args = keys.client_args("client", common::cli::closed_port(), "unused");
    args.extend(["--socks", "127.0.0.1:0"].map(String::from));
    let local = Proc::spawn(&strs(&args), false);
    let log = local.wait_log("dynamic forwarding (SOCKS5)", 1).await;
    assert!(!log.contains("not a loopback address"), "a loopback --socks was warned about:\n{log}");
    drop(local);

    let (st, out, _) = run(&["client", "--help"], b"").await;
    let help = String::from_utf8_lossy(&out);
    assert!(st.success() && help.contains("no authentication") && help.contains("loopback"), "{help}");
}

/// A `holdfast client --local` forward of service `echo` through `server` (no start-up check),
/// and a connection through it that echoed a line.
async fn forwarding_client(keys: &Keys, server: std::net::SocketAddr) -> (Proc, TcpStream) {
    let mut args = keys.client_args("client", server, "echo");
    args.extend(["--local", "127.0.0.1:0", "--no-check"].map(String::from));
    let client = Proc::spawn(&strs(&args), false);
    let local = client.logged_addr("forwarding", "local=").await;
    let mut conn = TcpStream::connect(local).await.unwrap();
    conn.write_all(b"hello\n").await.unwrap();
    let mut echoed = [0u8; 6];
    timeout(LIMIT, conn.read_exact(&mut echoed)).await.expect("no echo").unwrap();
    assert_eq!(&echoed, b"hello\n");
    (client, conn)
}

/// The server restarts under a `client --local` forward: its multiplexed session is lost, and
/// the client exits with an error that says so, without opening a session on the new server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_exits_with_an_error_when_its_session_is_lost() {
    let keys = Keys::new("client-lost");
    let echo = echo_service().await;
    let svc = [format!("echo={echo}")];
    let (mut old, old_addr) = keys.server(&svc).await;
    let proxy = ChaosProxy::start(old_addr).await.unwrap();
    let (mut client, _conn) = forwarding_client(&keys, proxy.addr()).await;

    let (new, new_addr) = keys.server(&svc).await;
    old.child.start_kill().unwrap();
    let _ = old.exit().await;
    proxy.set_target(new_addr);
    proxy.kill_all();

    let (st, err) = client.exit().await;
    assert_error(st, &err, &["session lost", "run it again"]);
    assert!(!new.stderr().contains("session opened"), "the client opened a new session:\n{}", new.stderr());
}

/// A `--remote` the server refuses is logged by the client once, with its back-off, and asked
/// again less and less often: the server logs the first refusal, and not one every 5 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_remote_is_logged_once() {
    let keys = Keys::new("remote-refused");
    let echo = echo_service().await;
    let (server, addr) = keys.server(&[format!("echo={echo}")]).await;
    let mut args = keys.client_args("client", addr, "echo");
    args.extend(["--remote", "127.0.0.1:0=127.0.0.1:1", "--no-check"].map(String::from));
    let client = Proc::spawn(&strs(&args), false);
    let log = client.wait_log("does not allow listening", 1).await;
    let line = log.lines().find(|l| l.contains("does not allow listening")).unwrap();
    assert!(line.contains(" WARN ") && line.contains("logged again only if the cause changes"), "{line}");
    server.wait_log("reverse forward refused", 1).await;
    assert!(log.matches("does not allow listening").count() == 1, "{log}");
}

/// A server that stops listening resets the connections it had not taken yet (the kernel does);
/// a client meeting that is told so, not that its key may be refused (a refusal is a clean
/// close, which still gets the key message).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_before_the_answer_is_not_called_a_key_problem() {
    let keys = Keys::new("reset-hello");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let resetter = tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            // Read the hello's length, then reset, as a closed listener's backlog is.
            let mut sock = sock;
            let mut len = [0u8; 2];
            let _ = sock.read_exact(&mut len).await;
            let _ = sock.set_zero_linger();
            drop(sock);
        }
    });
    let args = keys.client_args("connect", addr, "echo");
    let (st, _, err) = run(&strs(&args), b"").await;
    assert_error(st, &err, &["reset the connection before answering", "stopping"]);
    assert!(!err.contains("allow-list"), "a reset was called a key problem:\n{err}");
    resetter.abort();
}

/// SOCKS5 CONNECT to `dest` through the listener at `socks`; returns RFC 1928's reply code.
async fn socks_connect(socks: std::net::SocketAddr, dest: std::net::SocketAddrV4) -> u8 {
    let talk = async {
        let mut c = TcpStream::connect(socks).await.unwrap();
        c.write_all(&[5, 1, 0]).await.unwrap();
        let mut method = [0u8; 2];
        c.read_exact(&mut method).await.unwrap();
        assert_eq!(method, [5, 0], "no-authentication not accepted");
        let mut req = vec![5, 1, 0, 1];
        req.extend_from_slice(&dest.ip().octets());
        req.extend_from_slice(&dest.port().to_be_bytes());
        c.write_all(&req).await.unwrap();
        let mut reply = [0u8; 2];
        c.read_exact(&mut reply).await.unwrap();
        assert_eq!(reply[0], 5, "not a SOCKS5 reply");
        reply[1]
    };
    timeout(LIMIT, talk).await.expect("no SOCKS reply in time")
}

/// Issue 24: a SOCKS CONNECT whose destination refuses the connection is answered reply 5
/// (connection refused, status 3 from the server), not 4 (host unreachable); a destination the
/// rules do not allow is still 2 (not allowed by the ruleset).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socks_reply_for_a_refused_connection_is_5() {
    let keys = Keys::new("socks-refused");
    let closed = match common::cli::closed_port() {
        std::net::SocketAddr::V4(a) => a,
        other => panic!("not IPv4: {other}"),
    };
    let rule = format!("127.0.0.1:{}", closed.port());
    let (key, authorized) = (common::cli::s(&keys.server_key), common::cli::s(&keys.authorized));
    let server = Proc::spawn(
        &["server", "--listen", "127.0.0.1:0", "--key", key, "--authorized", authorized, "--allow-connect", &rule],
        false,
    );
    let addr = server.logged_addr("server ready", "listen=").await;
    let mut args = keys.client_args("client", addr, "unused");
    args.extend(["--socks", "127.0.0.1:0", "--no-check"].map(String::from));
    let client = Proc::spawn(&strs(&args), false);
    let socks = client.logged_addr("dynamic forwarding", "socks=").await;
    assert_eq!(socks_connect(socks, closed).await, 5, "a refused connection");
    let not_allowed = std::net::SocketAddrV4::new(*closed.ip(), 1);
    assert_eq!(socks_connect(socks, not_allowed).await, 2, "a destination the rules do not allow");
    let log = client.wait_log("the destination refused the connection", 1).await;
    assert!(!log.contains("ERROR"), "{log}");
}

/// `--local PORT:HOST:HOSTPORT` in ssh's syntax (issue 23, item 4): each connection is a
/// connect request, which the server's `--allow-connect` rules decide: an allowed destination
/// carries bytes, another one is closed without any.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_in_ssh_syntax_connects_under_allow_connect() {
    let keys = Keys::new("local-ssh");
    let (allowed, denied) = (echo_service().await, echo_service().await);
    let rule = format!("127.0.0.1:{}", allowed.port());
    let mut args = vec!["server", "--listen", "127.0.0.1:0", "--key", common::cli::s(&keys.server_key)];
    args.extend(["--authorized", common::cli::s(&keys.authorized), "--allow-connect", &rule]);
    args.extend(common::cli::FAST);
    let server = Proc::spawn(&args, false);
    let addr = server.logged_addr("server ready", "listen=").await;
    let mut args = keys.client_args("client", addr, "unused");
    args.extend(["--local".into(), format!("127.0.0.1:0:127.0.0.1:{}", allowed.port())]);
    args.extend(["--local".into(), format!("0:127.0.0.1:{}", denied.port())]);
    let client = Proc::spawn(&strs(&args), false);
    let log = client.wait_log("forwarding (connected by the server)", 2).await;
    let locals: Vec<std::net::SocketAddr> = log
        .lines()
        .filter(|l| l.contains("forwarding (connected by the server)"))
        .filter_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("local="))?.parse().ok())
        .collect();
    assert_eq!(locals.len(), 2, "{log}");
    let mut tcp = TcpStream::connect(locals[0]).await.unwrap();
    tcp.write_all(b"through the server").await.unwrap();
    let mut buf = [0u8; 18];
    timeout(LIMIT, tcp.read_exact(&mut buf)).await.unwrap().unwrap();
    assert_eq!(&buf, b"through the server");
    let mut tcp = TcpStream::connect(locals[1]).await.unwrap();
    let _ = tcp.write_all(b"x").await;
    let mut rest = Vec::new();
    let read = timeout(LIMIT, tcp.read_to_end(&mut rest)).await.unwrap();
    assert!(rest.is_empty(), "a destination no rule gives carried bytes: {read:?} {rest:?}");
    let log = client.wait_log("does not allow this destination", 1).await;
    assert!(log.contains(&format!("127.0.0.1:{}", denied.port())), "{log}");
}

/// Found by a server written from docs/PROTOCOL.md alone: `holdfast connect` whose request got
/// no reply exited after 10 s without a word to the server, which then held the session,
/// detached, until it expired. It now resets its stream, and the session ends on both sides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_without_a_reply_ends_its_session_on_the_server() {
    use holdfast::keys::{load_private_key, AllowList, Keypair};
    let keys = Keys::new("noreply");
    let server = Keypair::from_private(load_private_key(&keys.server_key).unwrap());
    let client = Keypair::from_private(load_private_key(&keys.client_key).unwrap()).public;
    let mut cfg = holdfast::ServerConfig::new(server, AllowList::from_keys([(client, None)]));
    cfg.session = common::harness::fast_session();
    let mut listener = holdfast::bind("127.0.0.1:0", cfg).await.unwrap();
    let mut conn = Proc::spawn(&strs(&keys.client_args("connect", listener.local_addr(), "echo")), true);
    let (mut stream, _) = timeout(LIMIT, listener.accept()).await.expect("no session").expect("listener closed");
    // The service request arrives (A.2: name_len, name); no reply is ever sent.
    let mut request = [0u8; 5];
    timeout(LIMIT, stream.read_exact(&mut request)).await.expect("no request").unwrap();
    assert_eq!(&request, b"\x04echo");
    let mut more = [0u8; 1];
    let end = timeout(LIMIT, stream.read(&mut more)).await.expect("the client left the stream open after giving up");
    let e = end.expect_err("the client ended its stream without a reset");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
    drop(stream);
    let (status, err) = timeout(LIMIT, conn.exit()).await.expect("connect did not exit");
    assert_error(status, &err, &["timed out waiting for the tunnel reply"]);
}

/// Stopping a `client` ends its session with the server: at once while the link answers (the
/// server logs the session closed), and without waiting on a link that does not answer, saying
/// that the server keeps the session until its expiry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_client_ends_its_session_or_says_it_could_not() {
    let keys = Keys::new("client-stop");
    let echo = echo_service().await;
    let (server, addr) = keys.server(&[format!("echo={echo}")]).await;
    let proxy = ChaosProxy::start(addr).await.unwrap();
    for silent in [false, true] {
        let (mut client, conn) = forwarding_client(&keys, proxy.addr()).await;
        if silent {
            proxy.stall_all();
        }
        let pid = rustix::process::Pid::from_raw(client.child.id().unwrap() as i32).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::INT).unwrap();
        let (st, err) = client.exit().await;
        assert!(st.success(), "{err}");
        if silent {
            assert!(err.contains("the server could not be told"), "{err}");
        } else {
            assert!(!err.contains("could not be told"), "{err}");
            server.wait_log("session closed", 1).await;
        }
        drop(conn);
    }
    proxy.kill_all();
}
