//! `holdfast status` against a real `holdfast server --status`: an attached session, a session
//! detached (its link killed by a proxy that refuses new connections) and then resumed, and a
//! multiplexed session of `holdfast client` with two open streams and a reverse forward; every
//! field checked against what the test did. And the server's log, followed by one session's id
//! through open, detach, resume and close; and refusals at the default level, one line for a
//! flood. Loopback only; every wait is bounded (log lines, or a bounded poll of the status).
#![cfg(unix)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::chaos::ChaosProxy;
use common::cli::*;
use holdfast::keys::{self, Keypair};
use holdfast::ClientConfig;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::time::timeout;

/// A session of `holdfast status --json`: its fields as raw JSON text, by name.
#[derive(Debug)]
struct Session(String);

impl Session {
    /// The raw JSON value of `field` (a number, `null`, a quoted string, an array).
    fn get(&self, field: &str) -> &str {
        let key = format!("\"{field}\":");
        let at = self.0.find(&key).unwrap_or_else(|| panic!("no {field} in {}", self.0)) + key.len();
        let rest = &self.0[at..];
        let end = if rest.starts_with('[') {
            rest.find(']').unwrap() + 1
        } else if let Some(quoted) = rest.strip_prefix('"') {
            quoted.find('"').unwrap() + 2
        } else {
            rest.find([',', '}']).unwrap()
        };
        &rest[..end]
    }

    fn str(&self, field: &str) -> &str {
        self.get(field).trim_matches('"')
    }

    fn num(&self, field: &str) -> u64 {
        self.get(field).parse().unwrap_or_else(|_| panic!("{field} is not a count in {}", self.0))
    }
}

/// Runs `holdfast status --socket SOCKET --json` and splits its sessions.
async fn status(socket: &std::path::Path) -> Vec<Session> {
    let (st, out, err) = run(&["status", "--socket", s(socket), "--json"], b"").await;
    assert!(st.success(), "holdfast status failed: {err}");
    let out = String::from_utf8(out).unwrap();
    assert!(out.starts_with("{\"sessions\":[") && out.ends_with("],\"earlier_process_sessions\":0}\n"), "{out}");
    out.split("{\"id\":").skip(1).map(|s| Session(format!("\"id\":{s}"))).collect()
}

/// Asks the status until `done` holds for it (a bounded poll: the server's state changes by
/// itself, with no line to wait for); panics with the last answer.
async fn wait_status(socket: &std::path::Path, what: &str, done: impl Fn(&[Session]) -> bool) -> Vec<Session> {
    let deadline = Instant::now() + LIMIT;
    loop {
        let list = status(socket).await;
        if done(&list) {
            return list;
        }
        assert!(Instant::now() < deadline, "status never showed {what}; last:\n{list:#?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The session whose id is `id`.
fn by_id<'a>(list: &'a [Session], id: &str) -> &'a Session {
    list.iter().find(|s| s.str("id") == id).unwrap_or_else(|| panic!("no session {id} in {list:#?}"))
}

/// The test's keys, with the client's keypair (for library clients) and its public key.
struct Setup {
    keys: Keys,
    client: Keypair,
    server_pub: holdfast::keys::PublicKey,
}

impl Setup {
    fn new(tag: &str) -> Setup {
        let keys = Keys::new(tag);
        let client = Keypair::from_private(keys::load_private_key(&keys.client_key).unwrap());
        let server_pub = keys::load_public_key(&keys.server_pub).unwrap();
        Setup { keys, client, server_pub }
    }

    fn client_cfg(&self) -> ClientConfig {
        let mut cfg = ClientConfig::new(Keypair::from_private(self.client.private.clone()), self.server_pub);
        cfg.session.keepalive = Duration::from_millis(200);
        cfg.session.dead_after = Duration::from_secs(1);
        cfg.recovery.backoff_initial = Duration::from_millis(10);
        cfg.recovery.backoff_max = Duration::from_millis(100);
        cfg
    }

    /// `holdfast server` with `--status`, an echo service and `extra` flags.
    async fn server(&self, echo: SocketAddr, socket: &std::path::Path, extra: &[&str]) -> (Proc, SocketAddr) {
        let k = &self.keys;
        let svc = format!("echo={echo}");
        let mut args = vec!["server", "--listen", "127.0.0.1:0", "--key", s(&k.server_key)];
        args.extend(["--authorized", s(&k.authorized), "--service", &svc, "--status", s(socket)]);
        args.extend(FAST);
        args.extend(extra);
        let p = Proc::spawn(&args, false);
        let addr = p.logged_addr("server ready", "listen=").await;
        (p, addr)
    }
}

/// Writes `n` bytes on `stream` and reads their echo back.
async fn echo_through<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(stream: &mut S, n: usize) {
    let data: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
    stream.write_all(&data).await.unwrap();
    let mut back = vec![0u8; n];
    timeout(LIMIT, stream.read_exact(&mut back)).await.expect("echo in time").unwrap();
    assert_eq!(back, data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_attached_detached_and_multiplexed_sessions() {
    let setup = Setup::new("status");
    let echo = echo_service().await;
    let socket = setup.keys.dir.path("status.sock");
    let (server, addr) = setup.server(echo, &socket, &["--allow-listen", "127.0.0.1:*"]).await;
    let key = setup.client.public.to_string();
    assert!(status(&socket).await.is_empty());

    // A: one tunnel, attached. Its stream bytes: the request (1 + "echo") and reply (2) too.
    let mut a = holdfast::tunnel::open(&addr.to_string(), setup.client_cfg(), "echo").await.unwrap();
    echo_through(&mut a, 1000).await;
    let list = wait_status(&socket, "session A", |l| l.len() == 1).await;
    let a_id = list[0].str("id").to_string();
    let sa = &list[0];
    assert_eq!(a_id.len(), 8, "{sa:?}");
    assert!(a_id.chars().all(|c| c.is_ascii_hexdigit()), "{sa:?}");
    assert_eq!((sa.str("client"), sa.str("key"), sa.str("state")), ("test-client", key.as_str(), "attached"));
    assert!(sa.str("addr").starts_with("127.0.0.1:"), "{sa:?}");
    assert_ne!(sa.get("rtt_ms"), "null", "{sa:?}");
    assert_eq!((sa.num("bytes_to_client"), sa.num("bytes_from_client")), (2 + 1000, 5 + 1000), "{sa:?}");
    assert_eq!((sa.num("resumes"), sa.num("streams"), sa.get("forwards")), (0, 1, "[]"), "{sa:?}");
    assert!(sa.num("since_seconds") < LIMIT.as_secs(), "{sa:?}");

    // B: one tunnel through a proxy, whose link is killed while the proxy refuses new ones.
    let proxy = ChaosProxy::start(addr).await.unwrap();
    let mut b = holdfast::tunnel::open(&proxy.addr().to_string(), setup.client_cfg(), "echo").await.unwrap();
    echo_through(&mut b, 3000).await;
    let list = wait_status(&socket, "session B", |l| l.len() == 2).await;
    let b_id = list.iter().map(|s| s.str("id")).find(|id| *id != a_id).unwrap().to_string();
    let first_addr = by_id(&list, &b_id).str("addr").to_string();
    proxy.refuse_new(true);
    proxy.kill_all();
    let list = wait_status(&socket, "B detached", |l| l.iter().any(|s| s.str("state") == "detached")).await;
    let sb = by_id(&list, &b_id);
    assert_eq!((sb.str("client"), sb.str("key"), sb.str("addr")), ("test-client", key.as_str(), first_addr.as_str()));
    assert_eq!((sb.num("bytes_to_client"), sb.num("bytes_from_client")), (2 + 3000, 5 + 3000), "{sb:?}");
    assert_eq!((sb.num("resumes"), sb.num("streams")), (0, 1), "{sb:?}");
    assert!(sb.num("since_seconds") < LIMIT.as_secs(), "{sb:?}");
    assert_eq!(by_id(&list, &a_id).str("state"), "attached");
    proxy.refuse_new(false);
    let list = wait_status(&socket, "B resumed", |l| l.iter().all(|s| s.str("state") == "attached")).await;
    let sb = by_id(&list, &b_id);
    assert_eq!(sb.num("resumes"), 1, "{sb:?}");
    assert_ne!(sb.str("addr"), first_addr, "the address of the new link");
    echo_through(&mut b, 500).await;
    let list = status(&socket).await;
    let sb = by_id(&list, &b_id);
    assert_eq!((sb.num("bytes_to_client"), sb.num("bytes_from_client")), (2 + 3500, 5 + 3500), "{sb:?}");

    // C: `holdfast client`, one multiplexed session with two open connections and a reverse
    // forward; its own --status socket lists them.
    let client_socket = setup.keys.dir.path("client.sock");
    let mut args = setup.keys.client_args("client", addr, "echo");
    let remote = format!("127.0.0.1:0={echo}");
    args.extend(
        ["--local", "127.0.0.1:0", "--remote", &remote, "--no-check", "--status", s(&client_socket)].map(String::from),
    );
    let client = Proc::spawn(&strs(&args), false);
    let local = client.logged_addr("forwarding", "local=").await;
    let listens = client.logged_addr("reverse forward open", "server_listens=").await;
    let mut c1 = TcpStream::connect(local).await.unwrap();
    let mut c2 = TcpStream::connect(local).await.unwrap();
    echo_through(&mut c1, 100).await;
    echo_through(&mut c2, 200).await;
    let list =
        wait_status(&socket, "C with two streams", |l| l.len() == 3 && l.iter().any(|s| s.num("streams") == 2)).await;
    let sc = list.iter().find(|s| s.str("id") != a_id && s.str("id") != b_id).unwrap();
    assert_eq!((sc.str("client"), sc.str("key"), sc.str("state")), ("test-client", key.as_str(), "attached"));
    assert_eq!(sc.get("forwards"), format!("[\"listen {listens}\"]"), "{sc:?}");
    assert_eq!(sc.num("resumes"), 0, "{sc:?}");
    // The streams' bytes, and each one's request and reply, and the multiplexing's framing.
    assert!(sc.num("bytes_to_client") > 300 && sc.num("bytes_from_client") > 300, "{sc:?}");
    drop(c2);
    let list = wait_status(&socket, "C with one stream", |l| {
        l.iter().any(|s| s.str("forwards") != "[]" && s.num("streams") == 1)
    })
    .await;
    assert_eq!(list.len(), 3);
    // A key renamed on the allow-list (SIGHUP) is shown by its new name, as the log and the
    // metrics give it (found by an operator's day: status kept the old one).
    std::fs::write(&setup.keys.authorized, format!("{} renamed-client\n", setup.client.public)).unwrap();
    let pid = rustix::process::Pid::from_raw(server.child.id().unwrap() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::HUP).unwrap();
    let list = wait_status(&socket, "the new name", |l| l.iter().all(|s| s.str("client") == "renamed-client")).await;
    assert_eq!(list.len(), 3);

    let (st, out, err) = run(&["status", "--socket", s(&client_socket), "--json"], b"").await;
    assert!(st.success(), "{err}");
    let out = String::from_utf8(out).unwrap();
    assert!(out.contains("\"state\":\"attached\""), "{out}");
    assert!(out.contains(&format!("{{\"kind\":\"local\",\"listen\":\"{local}\",\"to\":\"service echo\"}}")), "{out}");
    assert!(
        out.contains(&format!("{{\"kind\":\"remote\",\"listen\":\"127.0.0.1:0 (on the server)\",\"to\":\"{echo}\"}}")),
        "{out}"
    );

    // The table: a header and one line per session, each with its id.
    let (st, out, _) = run(&["status", "--socket", s(&socket)], b"").await;
    assert!(st.success());
    let out = String::from_utf8(out).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
    assert!(lines[0].starts_with("ID ") && lines[0].contains("STREAMS"), "{out}");
    assert!(lines.iter().any(|l| l.starts_with(&a_id) && l.contains("attached")), "{out}");

    // A ends: it is gone from the status.
    a.shutdown().await.unwrap();
    let mut rest = Vec::new();
    let _ = timeout(LIMIT, a.read_to_end(&mut rest)).await;
    drop(a);
    wait_status(&socket, "A gone", |l| l.len() == 2 && l.iter().all(|s| s.str("id") != a_id)).await;
    drop((b, c1, client, server));
}

/// Someone else's process cannot be asked, and a file that is not a socket is never replaced.
#[tokio::test]
async fn the_status_socket_is_private_and_never_replaces_a_file() {
    let setup = Setup::new("status-private");
    let echo = echo_service().await;
    let socket = setup.keys.dir.path("status.sock");
    let (_server, _) = setup.server(echo, &socket, &[]).await;
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777, 0o600);
    let file = setup.keys.dir.path("not-a-socket");
    std::fs::write(&file, "keep me").unwrap();
    let k = &setup.keys;
    let svc = format!("echo={echo}");
    let args = ["server", "--listen", "127.0.0.1:0", "--key", s(&k.server_key), "--authorized", s(&k.authorized)];
    let mut p = Proc::spawn(&[&args[..], &["--service", &svc, "--status", s(&file)]].concat(), false);
    let (st, err) = p.exit().await;
    assert_error(st, &err, &["--status", "not a socket"]);
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
    let (st, _, err) = run(&["status", "--socket", s(&setup.keys.dir.path("none.sock"))], b"").await;
    assert_error(st, &err, &["nothing answers"]);
}

/// A server running as root answers its status socket to root only, even when the socket's
/// mode lets another user connect (a red team found that any user got the answer: the check
/// passed everyone when the answering process was root). Needs root, to ask as another user.
#[tokio::test]
async fn a_root_server_answers_no_other_user_on_its_status_socket() {
    let name = "a_root_server_answers_no_other_user_on_its_status_socket";
    if let Err(reason) = common::procs::check_tools(&["setpriv"]) {
        common::procs::skip(name, &reason);
        return;
    }
    let setup = Setup::new("status-root");
    let echo = echo_service().await;
    // A directory anyone may enter, and the socket opened to everyone after it is made.
    let open = common::cli::TempDir::new("status-open");
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&open.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = open.path("status.sock");
    let (_server, _) = setup.server(echo, &socket, &[]).await;
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    assert_eq!(status(&socket).await.len(), 0, "root is answered");
    let out = tokio::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", BIN, "status", "--socket", s(&socket)])
        .env_remove("RUST_LOG")
        .output()
        .await
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success() && !stdout.contains("ID"), "another user was answered:\n{stdout}\n{stderr}");
    assert!(stderr.contains("without an answer"), "{stderr}");
}

/// One session's id follows it through the log: opened, detached, resumed, its tunnel closed,
/// then the session closed, with the tunnel's byte counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_session_id_follows_a_session_through_the_log() {
    let setup = Setup::new("status-log");
    let echo = echo_service().await;
    let socket = setup.keys.dir.path("status.sock");
    let (server, addr) = setup.server(echo, &socket, &[]).await;
    let proxy = ChaosProxy::start(addr).await.unwrap();
    let mut b = holdfast::tunnel::open(&proxy.addr().to_string(), setup.client_cfg(), "echo").await.unwrap();
    echo_through(&mut b, 3000).await;
    let id = wait_status(&socket, "the session", |l| l.len() == 1).await[0].str("id").to_string();
    // Another session, whose lines must not carry this id.
    let mut other = holdfast::tunnel::open(&addr.to_string(), setup.client_cfg(), "echo").await.unwrap();
    echo_through(&mut other, 10).await;
    proxy.refuse_new(true);
    proxy.kill_all();
    server.wait_log("session detached", 1).await;
    proxy.refuse_new(false);
    server.wait_log("session resumed", 1).await;
    echo_through(&mut b, 1000).await;
    b.shutdown().await.unwrap();
    let mut rest = Vec::new();
    timeout(LIMIT, b.read_to_end(&mut rest)).await.unwrap().unwrap();
    drop(b);
    let log = server.wait_log("session closed", 1).await;
    let tag = format!("session{{id={id}}}: ");
    let mine: Vec<&str> = log.lines().filter(|l| l.contains(&tag)).collect();
    let steps =
        ["session opened", "tunnel open", "session detached", "session resumed", "tunnel closed", "session closed"];
    let mut at = 0;
    for step in steps {
        let i = mine[at..]
            .iter()
            .position(|l| l.contains(step))
            .unwrap_or_else(|| panic!("no {step:?} after line {at} for {id}:\n{log}"));
        at += i + 1;
    }
    // Every line of this session carries its id once, and no line of the other one does.
    assert!(mine.iter().all(|l| l.matches("session{").count() == 1), "{log}");
    let tunnel = mine.iter().find(|l| l.contains("tunnel closed")).unwrap();
    let closed = mine.iter().find(|l| l.contains("session closed")).unwrap();
    assert_eq!((field(tunnel, "to_client"), field(tunnel, "to_service")), (4000, 4000), "{tunnel}");
    assert_eq!((field(closed, "to_client"), field(closed, "from_client")), (4000, 4000), "{closed}");
    let other_opened = log.lines().filter(|l| l.contains("session opened")).count();
    assert_eq!(other_opened, 2, "{log}");
    drop(other);
}

/// The number logged as `k=N` on `line`.
fn field(line: &str, k: &str) -> u64 {
    let v = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{k}=")))
        .unwrap_or_else(|| panic!("no {k} in {line}"));
    v.parse().unwrap()
}

/// A tunnel that ends with a reset still counts the bytes it moved: its line gives them, and the
/// session's line sums them with the closed tunnels' (a newcomer found `from_client=0` on the
/// session line of a client that had sent 2.8 MiB through tunnels the server's stop reset).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_tunnels_bytes_are_counted_in_its_line_and_its_sessions() {
    let setup = Setup::new("status-reset-bytes");
    let echo = echo_service().await;
    let socket = setup.keys.dir.path("status.sock");
    let (server, addr) = setup.server(echo, &socket, &[]).await;
    let mut b = holdfast::tunnel::open(&addr.to_string(), setup.client_cfg(), "echo").await.unwrap();
    echo_through(&mut b, 5000).await;
    b.reset();
    let log = server.wait_log("session closed", 1).await;
    let tunnel = log.lines().find(|l| l.contains("tunnel ended")).unwrap_or_else(|| panic!("no tunnel line:\n{log}"));
    assert_eq!((field(tunnel, "to_client"), field(tunnel, "to_service")), (5000, 5000), "{tunnel}");
    let end = log
        .lines()
        .find(|l| l.contains("session closed") || l.contains("session ended"))
        .unwrap_or_else(|| panic!("no session line:\n{log}"));
    assert_eq!((field(end, "to_client"), field(end, "from_client")), (5000, 5000), "{end}");
    assert_eq!((field(end, "tunnels"), field(end, "tunnels_reset")), (0, 1), "{end}");
}

/// Refusals are logged at the default level, one line for a flood from one source and reason;
/// the rest is counted (and summed up every minute: `net::server::refusals`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_refusals_is_one_line_at_the_default_level() {
    let setup = Setup::new("status-refusals");
    let echo = echo_service().await;
    let socket = setup.keys.dir.path("status.sock");
    let (server, addr) = setup.server(echo, &socket, &["--metrics", "127.0.0.1:0"]).await;
    let metrics = server.logged_addr("metrics endpoint ready", "metrics=").await;
    // Hellos of another protocol version (anyone can send them): each is answered REJECT 5.
    for _ in 0..5 {
        let me = Keypair::generate();
        let (_, mut hello) = holdfast::proto::ClientHandshake::initial(
            &me.private,
            &setup.server_pub,
            holdfast::proto::Cipher::AesGcm,
            1,
        )
        .unwrap();
        hello[4] = 3;
        let mut sock = TcpStream::connect(addr).await.unwrap();
        sock.write_all(&(hello.len() as u16).to_be_bytes()).await.unwrap();
        sock.write_all(&hello).await.unwrap();
        let mut reply = Vec::new();
        timeout(LIMIT, sock.read_to_end(&mut reply)).await.unwrap().unwrap();
        assert_eq!(reply, [0, 2, 2, 5], "REJECT 5");
    }
    // A client that pins another server key: its hello cannot be read.
    let mut cfg = setup.client_cfg();
    cfg.server_key = Keypair::generate().public;
    for _ in 0..5 {
        assert!(timeout(LIMIT, holdfast::connect(addr.to_string(), cfg.clone())).await.unwrap().is_err());
    }
    let deadline = Instant::now() + LIMIT;
    loop {
        let body = scrape_body(metrics).await;
        if body.contains("holdfast_handshakes_refused_total{reason=\"failed\"} 10") {
            break;
        }
        assert!(Instant::now() < deadline, "never 10 failed handshakes:\n{body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Ten refusals from one source for one reason: one line, the first one's, which names both
    // protocol versions.
    let log = server.stderr();
    let refused: Vec<&str> = log.lines().filter(|l| l.contains("connection refused")).collect();
    assert_eq!(refused.len(), 1, "{log}");
    assert_eq!(log.matches("protocol version").count(), 1, "{log}");
    assert!(refused[0].contains("the client speaks protocol version 3, this server version 4"), "{log}");
    assert!(
        refused[0].contains(" WARN ") && refused[0].contains("reason=\"failed\"")
            || refused[0].contains("reason=failed"),
        "{log}"
    );
    assert!(refused[0].contains("addr=127.0.0.1:"), "{log}");
}

async fn scrape_body(addr: SocketAddr) -> String {
    let mut sock = TcpStream::connect(addr).await.unwrap();
    sock.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n").await.unwrap();
    let mut reply = String::new();
    timeout(LIMIT, sock.read_to_string(&mut reply)).await.unwrap().unwrap();
    reply
}

/// Start-up says what an operator needs: the control socket, and that the server is ready with
/// its address, key and services; nothing else at the default level but warnings (the
/// descriptor limit only when it holds fewer than 1024 sessions).
#[tokio::test]
async fn start_up_says_only_what_an_operator_needs() {
    let setup = Setup::new("status-startup");
    let echo = echo_service().await;
    let socket = setup.keys.dir.path("status.sock");
    // More sessions than any descriptor limit holds: the limit still holds thousands, which is
    // not worth a line at the default level.
    let (server, _) = setup.server(echo, &socket, &["--max-sessions", "100000000"]).await;
    let log = server.stderr();
    let info: Vec<&str> = log.lines().filter(|l| l.contains(" INFO ")).collect();
    assert_eq!(info.len(), 2, "{log}");
    assert!(info[0].contains("status socket ready") && info[1].contains("server ready"), "{log}");
    for l in log.lines().filter(|l| l.contains("file-descriptor")) {
        assert!(l.contains(" WARN "), "{log}");
    }
}

/// A second server given a running one's `--status` path refuses it and exits, and the first
/// one's socket still answers (found by a walk: the second took it over without a word, and
/// the running server could no longer be asked). A stale socket (its process gone) is replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_path_in_use_is_refused_and_a_stale_one_replaced() {
    let setup = Setup::new("status-in-use");
    let echo = echo_service().await;
    let socket = setup.keys.dir.path("status.sock");
    let (first, _) = setup.server(echo, &socket, &[]).await;
    let k = &setup.keys;
    let svc = format!("echo={echo}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_holdfast"))
        .args(["server", "--listen", "127.0.0.1:0", "--key", s(&k.server_key), "--authorized", s(&k.authorized)])
        .args(["--service", &svc, "--status", s(&socket)])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("another process answers at"), "{err}");
    let (st, _, e) = run(&["status", "--socket", s(&socket)], b"").await;
    assert!(st.success(), "the first server no longer answers: {e}");
    // Asked at a file that is not a socket: said so, not "nothing answers" (found by a walk).
    let (st, _, e) = run(&["status", "--socket", s(&k.authorized)], b"").await;
    assert!(!st.success() && e.contains("is not a socket: give the path"), "{e}");
    // Its process gone, the socket file left behind is replaced by the next server.
    drop(first);
    let deadline = Instant::now() + LIMIT;
    while std::os::unix::net::UnixStream::connect(&socket).is_ok() {
        assert!(Instant::now() < deadline, "the first server never went");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (mut second, _) = setup.server(echo, &socket, &[]).await;
    let (st, _, e) = run(&["status", "--socket", s(&socket)], b"").await;
    assert!(st.success(), "{e}");
    // A clean exit takes its socket file along (found by an operator's day: they were left).
    let pid = rustix::process::Pid::from_raw(second.child.id().unwrap() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let (status, log) = second.exit().await;
    assert!(status.success(), "{log}");
    assert!(!socket.exists(), "the socket file was left after a clean exit");
}
