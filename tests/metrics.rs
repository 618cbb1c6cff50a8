//! `holdfast server --config FILE --metrics ADDR`: a real server started from a config file
//! alone (its keys named relative to the file), scraped over TCP while a real client's session
//! opens, loses its link, resumes and ends.
#![cfg(unix)]

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::chaos::ChaosProxy;
use common::cli::*;
use holdfast::keys::Keypair;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::time::timeout;

/// One HTTP request to the metrics endpoint: the status line and the body.
async fn get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut sock = TcpStream::connect(addr).await.unwrap();
    sock.write_all(format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes()).await.unwrap();
    let mut reply = String::new();
    timeout(LIMIT, sock.read_to_string(&mut reply)).await.expect("no answer in time").unwrap();
    let (head, body) = reply.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no head: {reply}"));
    (head.lines().next().unwrap().to_string(), body.to_string())
}

/// `/metrics` as a map from `name{labels}` to value (comments skipped).
async fn scrape(addr: SocketAddr) -> BTreeMap<String, f64> {
    let (status, body) = get(addr, "/metrics").await;
    assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (name, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("bad line {l:?}"));
            (name.to_string(), value.parse().unwrap_or_else(|_| panic!("bad value in {l:?}")))
        })
        .collect()
}

/// Scrapes until every `(metric, value)` holds, within [`LIMIT`]; panics with the last scrape.
async fn wait_metrics(addr: SocketAddr, want: &[(&str, f64)]) -> BTreeMap<String, f64> {
    wait_until(addr, &format!("{want:?}"), |m| want.iter().all(|(k, v)| m.get(*k) == Some(v))).await
}

/// Scrapes until `done` holds, within [`LIMIT`] (a bounded poll: the server's state changes
/// by itself, with no log line to wait for); panics with the last scrape.
async fn wait_until(
    addr: SocketAddr,
    what: &str,
    done: impl Fn(&BTreeMap<String, f64>) -> bool,
) -> BTreeMap<String, f64> {
    let deadline = Instant::now() + LIMIT;
    loop {
        let m = scrape(addr).await;
        if done(&m) {
            return m;
        }
        assert!(Instant::now() < deadline, "metrics never reached {what}; last scrape:\n{m:#?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_a_session_through_a_resume() {
    let keys = Keys::new("metrics");
    let echo = echo_service().await;
    // Everything from the file, its paths relative to it (the keys are in the same directory).
    let config = keys.dir.path("server.toml");
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nkey = \"server.key\"\nauthorized = \"authorized\"\n\
         service = [\"echo={echo}\"]\nkeepalive = \"200ms\"\ndead-after = \"1s\"\n"
    );
    std::fs::write(&config, text).unwrap();
    let server = Proc::spawn(&["server", "--config", s(&config), "--metrics", "127.0.0.1:0"], false);
    let addr = server.logged_addr("server ready", "listen=").await;
    let metrics = server.logged_addr("metrics endpoint ready", "metrics=").await;

    let m = scrape(metrics).await;
    for (k, v) in [
        ("holdfast_sessions{state=\"attached\"}", 0.0),
        ("holdfast_sessions{state=\"detached\"}", 0.0),
        ("holdfast_sessions_opened_total", 0.0),
        ("holdfast_resumes_total", 0.0),
        ("holdfast_allowed_clients", 1.0),
    ] {
        assert_eq!(m.get(k), Some(&v), "{k} at start; scrape:\n{m:#?}");
    }
    assert_eq!(get(metrics, "/other").await.0, "HTTP/1.1 404 Not Found");

    let proxy = ChaosProxy::start(addr).await.unwrap();
    let args = keys.client_args("connect", proxy.addr(), "echo");
    let mut client = Proc::spawn(&strs(&args), true);
    let mut stdin = client.child.stdin.take().unwrap();
    let mut stdout = client.child.stdout.take().unwrap();
    let mut echoed = [0u8; 6];
    stdin.write_all(b"hello\n").await.unwrap();
    timeout(LIMIT, stdout.read_exact(&mut echoed)).await.expect("no echo").unwrap();
    assert_eq!(&echoed, b"hello\n");
    wait_metrics(
        metrics,
        &[
            ("holdfast_sessions{state=\"attached\"}", 1.0),
            ("holdfast_sessions{state=\"detached\"}", 0.0),
            ("holdfast_sessions_opened_total", 1.0),
            ("holdfast_client_sessions{client=\"test-client\"}", 1.0),
            ("holdfast_handshakes", 0.0),
        ],
    )
    .await;

    // The link dies and no new one gets through: the session waits, detached.
    proxy.refuse_new(true);
    proxy.kill_all();
    wait_metrics(
        metrics,
        &[("holdfast_sessions{state=\"attached\"}", 0.0), ("holdfast_sessions{state=\"detached\"}", 1.0)],
    )
    .await;
    // Let it through: the session resumes on a new link and carries bytes again.
    proxy.refuse_new(false);
    wait_metrics(
        metrics,
        &[
            ("holdfast_sessions{state=\"attached\"}", 1.0),
            ("holdfast_sessions{state=\"detached\"}", 0.0),
            ("holdfast_resumes_total", 1.0),
            ("holdfast_sessions_opened_total", 1.0),
        ],
    )
    .await;
    stdin.write_all(b"again\n").await.unwrap();
    timeout(LIMIT, stdout.read_exact(&mut echoed)).await.expect("no echo after the resume").unwrap();
    assert_eq!(&echoed, b"again\n");

    // The client ends its stream: the session closes, and its bytes are counted.
    drop(stdin);
    let (status, err) = client.exit().await;
    assert!(status.success(), "connect failed: {err}");
    let m = wait_metrics(
        metrics,
        &[("holdfast_sessions{state=\"attached\"}", 0.0), ("holdfast_sessions{state=\"detached\"}", 0.0)],
    )
    .await;
    // The client's series goes to 0; it does not vanish.
    assert_eq!(m.get("holdfast_client_sessions{client=\"test-client\"}"), Some(&0.0), "{m:#?}");
    // Each way: the two lines, and the tunnel's request (or reply) before them.
    let bytes = |m: &BTreeMap<String, f64>, dir: &str| {
        m.get(&format!("holdfast_session_bytes_total{{direction=\"{dir}\"}}")).copied().unwrap_or(0.0)
    };
    wait_until(metrics, "the session's bytes counted", |m| {
        bytes(m, "from_client") >= 12.0 && bytes(m, "to_client") >= 12.0
    })
    .await;
    drop(server);
}

#[tokio::test]
async fn metrics_refuse_a_public_address_without_the_flag() {
    let keys = Keys::new("metrics-public");
    let mut args = vec!["server", "--listen", "127.0.0.1:0", "--key", s(&keys.server_key)];
    args.extend(["--authorized", s(&keys.authorized), "--service", "x=127.0.0.1:1", "--metrics", "0.0.0.0:0"]);
    let (status, _, err) = run(&args, b"").await;
    assert_error(status, &err, &["--metrics 0.0.0.0:0", "loopback", "--metrics-public"]);
}

#[tokio::test]
async fn a_required_flag_missing_from_flags_and_file_is_named_with_its_key() {
    let keys = Keys::new("config-required");
    let config = keys.dir.path("server.toml");
    std::fs::write(
        &config,
        "[server]\nkey = \"server.key\"\nauthorized = \"authorized\"\nservice = [\"x=127.0.0.1:1\"]\n",
    )
    .unwrap();
    let (status, _, err) = run(&["server", "--config", s(&config)], b"").await;
    assert_error(status, &err, &["--listen is required", "`listen = ", "[server]"]);
    std::fs::write(&config, "[server]\nlisten = \"127.0.0.1:0\"\nmax-sesions = 3\n").unwrap();
    let (status, _, err) = run(&["server", "--config", s(&config)], b"").await;
    assert_error(status, &err, &["unknown field `max-sesions`", s(&config), "line 3"]);
}

/// Review 2, item 10: idle connections to the metrics endpoint (more than it serves at once)
/// cannot lock a scraper out: the oldest idle one makes room, and the scrape is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_do_not_block_a_scrape() {
    let keys = Keys::new("metrics-idle");
    let echo = echo_service().await;
    let (server, _) = keys.server_with(&[format!("echo={echo}")], &["--metrics", "127.0.0.1:0"]).await;
    let metrics = server.logged_addr("metrics endpoint ready", "metrics=").await;
    // Connected, never sending a byte; more than the endpoint serves at once (64).
    let mut idle = Vec::new();
    for _ in 0..100 {
        idle.push(TcpStream::connect(metrics).await.unwrap());
    }
    let m = scrape(metrics).await;
    assert_eq!(m.get("holdfast_allowed_clients"), Some(&1.0), "{m:#?}");
    drop(idle);
}

/// Red team M1: connections that send their request and then read nothing (a tiny receive
/// buffer, an answer larger than it) were "being answered", and the endpoint's cap spared them:
/// 64 of them locked every scrape out, renewed every 15 s. Now the oldest goes at the cap. The
/// answer must not fit in the kernel's buffers, so this runs in a network namespace of its own
/// with a loopback MTU of 1500 (a real link's): the test re-executes itself inside `unshare`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrapers_that_ask_and_never_read_do_not_lock_a_scrape_out() {
    let name = "scrapers_that_ask_and_never_read_do_not_lock_a_scrape_out";
    if std::env::var_os(IN_NAMESPACE).is_some() {
        return never_reading_scrapers().await;
    }
    if let Err(reason) = common::procs::check_tools(&["unshare", "ip"]) {
        common::procs::skip(name, &reason);
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let mut cmd = tokio::process::Command::new("unshare");
    cmd.args(["--net", "--kill-child", "--fork"]).arg(&exe).args([name, "--exact", "--nocapture", "--test-threads=1"]);
    cmd.env(IN_NAMESPACE, "1");
    let out = common::procs::output("the test in its namespace", &mut cmd, 3 * LIMIT).await;
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && text.contains("1 passed"), "{}\n{text}\n{err}", out.status);
}

/// Set in the inner run of [`scrapers_that_ask_and_never_read_do_not_lock_a_scrape_out`].
const IN_NAMESPACE: &str = "HOLDFAST_TEST_IN_NAMESPACE";

async fn never_reading_scrapers() {
    let up = std::process::Command::new("ip").args(["link", "set", "lo", "mtu", "1500", "up"]).status().unwrap();
    assert!(up.success(), "ip link set lo up");
    let keys = Keys::new("metrics-hold");
    let echo = echo_service().await;
    // 1,500 clients on the list: an answer of about 80 KB.
    let mut list = std::fs::read_to_string(&keys.authorized).unwrap();
    for i in 0..1500 {
        list.push_str(&format!("{} c{i:04}\n", Keypair::generate().public));
    }
    std::fs::write(&keys.authorized, list).unwrap();
    let (server, _) = keys.server_with(&[format!("echo={echo}")], &["--metrics", "127.0.0.1:0"]).await;
    let metrics = server.logged_addr("metrics endpoint ready", "metrics=").await;
    // As many as the endpoint serves at once, each asking and then reading nothing; each has
    // the first bytes of its answer waiting (peeked, not read): all of them are being answered.
    let mut holders = Vec::new();
    for _ in 0..64 {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(1024).unwrap();
        let mut c = sock.connect(metrics).await.unwrap();
        c.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n").await.unwrap();
        let mut first = [0u8; 1];
        timeout(LIMIT, c.peek(&mut first)).await.expect("no answer began").unwrap();
        holders.push(c);
    }
    let m = scrape(metrics).await;
    assert_eq!(m.get("holdfast_allowed_clients"), Some(&1501.0));
    drop(holders);
}

/// A scrape as Prometheus reads it (`prometheus-parse`): (family as its samples name it,
/// labels sorted as `k=v` pairs) to value.
async fn parsed(addr: SocketAddr) -> BTreeMap<(String, Vec<String>), f64> {
    let (status, body) = get(addr, "/metrics").await;
    assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).expect("a Prometheus text");
    assert!(!scrape.samples.is_empty(), "{body}");
    scrape
        .samples
        .into_iter()
        .map(|s| {
            let v = match s.value {
                prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) => v,
                prometheus_parse::Value::Untyped(v) => v,
                other => panic!("{}: not a counter or gauge: {other:?}", s.metric),
            };
            let mut labels: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            labels.sort();
            ((s.metric, labels), v)
        })
        .collect()
}

fn at(m: &BTreeMap<(String, Vec<String>), f64>, name: &str, labels: &[&str]) -> Option<f64> {
    m.get(&(name.to_string(), labels.iter().map(|l| l.to_string()).collect())).copied()
}

/// Polls the parsed scrape until `done` holds (bounded), as [`wait_until`].
async fn wait_parsed(
    addr: SocketAddr,
    what: &str,
    done: impl Fn(&BTreeMap<(String, Vec<String>), f64>) -> bool,
) -> BTreeMap<(String, Vec<String>), f64> {
    let deadline = Instant::now() + LIMIT;
    loop {
        let m = parsed(addr).await;
        if done(&m) {
            return m;
        }
        assert!(Instant::now() < deadline, "metrics never reached {what}; last scrape:\n{m:#?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Issue 24, item 4: read with a Prometheus text parser, the metrics count a live session's
/// bytes as they flow, give the version, count a failed reload, and keep a client's series at
/// 0 once its session ended; and README's table names every family.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_count_live_bytes_reloads_and_idle_clients() {
    let keys = Keys::new("metrics-parse");
    let echo = echo_service().await;
    let svc = format!("echo={echo}");
    let mut args = vec!["server", "--listen", "127.0.0.1:0", "--key", s(&keys.server_key)];
    args.extend(["--authorized", s(&keys.authorized), "--service", &svc, "--metrics", "127.0.0.1:0"]);
    let server = Proc::spawn(&args, false);
    let addr = server.logged_addr("server ready", "listen=").await;
    let metrics = server.logged_addr("metrics endpoint ready", "metrics=").await;

    let m = parsed(metrics).await;
    assert_eq!(
        at(&m, "holdfast_build_info", &[&format!("version={}", env!("CARGO_PKG_VERSION"))]),
        Some(1.0),
        "{m:#?}"
    );
    assert_eq!(at(&m, "holdfast_reload_failures_total", &[]), Some(0.0), "{m:#?}");
    assert_eq!(at(&m, "holdfast_client_sessions", &["client=test-client"]), Some(0.0), "{m:#?}");

    // A live session carries 1000 bytes each way; its stream also carries the tunnel request
    // (1 + "echo") and reply (2 bytes).
    let client = Keypair::from_private(holdfast::keys::load_private_key(&keys.client_key).unwrap());
    let server_pub = holdfast::keys::load_public_key(&keys.server_pub).unwrap();
    let cfg = holdfast::ClientConfig::new(client, server_pub);
    let mut stream = holdfast::tunnel::open(&addr.to_string(), cfg, "echo").await.unwrap();
    let data = vec![7u8; 1000];
    stream.write_all(&data).await.unwrap();
    let mut back = vec![0u8; 1000];
    timeout(LIMIT, stream.read_exact(&mut back)).await.unwrap().unwrap();
    let live = wait_parsed(metrics, "the live session's bytes", |m| {
        at(m, "holdfast_session_bytes_total", &["direction=from_client"]) == Some(1005.0)
    })
    .await;
    assert_eq!(at(&live, "holdfast_session_bytes_total", &["direction=to_client"]), Some(1002.0), "{live:#?}");
    assert_eq!(at(&live, "holdfast_client_sessions", &["client=test-client"]), Some(1.0), "{live:#?}");
    assert_eq!(at(&live, "holdfast_sessions", &["state=attached"]), Some(1.0), "{live:#?}");
    assert_eq!(at(&live, "holdfast_sessions_opened_total", &[]), Some(1.0), "{live:#?}");
    // The open stream's receive window (64 KiB at first) is taken from the budget, whatever its
    // buffers hold now (an operator read holdfast_buffered_bytes 0 with bytes waiting in it).
    let used = at(&live, "holdfast_budget_used_bytes", &[]).unwrap_or_else(|| panic!("no budget gauge: {live:#?}"));
    assert!(used >= 65536.0, "{live:#?}");

    // An allow-list that does not load, and SIGHUP: counted as a failed reload.
    std::fs::write(&keys.authorized, "not a key\n").unwrap();
    let pid = rustix::process::Pid::from_raw(server.child.id().unwrap() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::HUP).unwrap();
    server.wait_log("allow-list not reloaded", 1).await;
    let m = parsed(metrics).await;
    assert_eq!(at(&m, "holdfast_reload_failures_total", &[]), Some(1.0), "{m:#?}");

    // The session ends: its client's series is 0, and its bytes stay counted.
    stream.shutdown().await.unwrap();
    let mut rest = Vec::new();
    timeout(LIMIT, stream.read_to_end(&mut rest)).await.unwrap().unwrap();
    drop(stream);
    let m = wait_parsed(metrics, "the session ended", |m| at(m, "holdfast_sessions", &["state=attached"]) == Some(0.0))
        .await;
    assert_eq!(at(&m, "holdfast_client_sessions", &["client=test-client"]), Some(0.0), "{m:#?}");
    assert_eq!(at(&m, "holdfast_session_bytes_total", &["direction=to_client"]), Some(1002.0), "{m:#?}");
    assert_eq!(at(&m, "holdfast_session_bytes_total", &["direction=from_client"]), Some(1005.0), "{m:#?}");

    // README's table names every family the endpoint serves.
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    for (name, _) in m.keys() {
        assert!(readme.contains(&format!("| `{name}")), "README's metrics table lacks {name}");
    }
    drop(server);
}
