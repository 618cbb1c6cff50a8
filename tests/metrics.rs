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
    assert!(!m.contains_key("holdfast_client_sessions{client=\"test-client\"}"), "{m:#?}");
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
    let args = [
        "server",
        "--listen",
        "127.0.0.1:0",
        "--key",
        s(&keys.server_key),
        "--authorized",
        s(&keys.authorized),
        "--service",
        &format!("echo={echo}"),
        "--metrics",
        "127.0.0.1:0",
    ];
    let server = Proc::spawn(&args, false);
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
