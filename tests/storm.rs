//! A resume storm, scaled down for CI (issue 14, part 3; `cargo bench --bench scale` is the
//! full-size run): a real `holdfast server` with 400 sessions, each holding a connection to a
//! service, all of whose links are killed at once (`ss -K` on the server's port). Every session
//! must resume (none lost), every stream must still carry bytes afterwards, a new client must
//! get in during the storm, and the server's buffer memory must stay within its budget.
//!
//! Prints "skipped: <reason>" without root or `ss -K` (CI has both and sets
//! HOLDFAST_REQUIRE_TOOLS, which turns a skip into a failure).

mod common;

use std::sync::Arc;
use std::time::Instant;

use common::cli::echo_service;
use common::faults::{kill_connections, ready};
use common::procs::{s, tail, Out, Proc, TempDir, LIMIT};
use common::tunnel::{write_keys, KeyFiles, BIN};
use holdfast::{ClientConfig, LinkEvent, Stream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use tokio::time::timeout;

const SESSIONS: usize = 400;

async fn echo_byte(s: &mut Stream, b: u8) -> std::io::Result<()> {
    s.write_all(&[b]).await?;
    let mut got = [0u8; 1];
    s.read_exact(&mut got).await?;
    if got[0] == b {
        Ok(())
    } else {
        Err(std::io::Error::other("the echo differs"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_hundred_sessions_all_resume_from_a_storm_and_a_newcomer_gets_in() {
    let name = "four_hundred_sessions_all_resume_from_a_storm_and_a_newcomer_gets_in";
    if !ready(name, &["ss"]).await {
        return;
    }
    let start = Instant::now();
    let dir = TempDir::new("storm");
    let KeyFiles { server, server_key, client, authorized, .. } = write_keys(&dir);
    let echo = echo_service().await;
    let mut cmd = Command::new(BIN);
    cmd.args(["server", "--listen", "127.0.0.1:0", "--key", s(&server_key)]);
    cmd.args(["--authorized", s(&authorized), "--service", &format!("echo={echo}")]);
    // One host, one key: the per-source and per-key limits are for the Internet. A small
    // handshake cap, so that the storm meets it; a small buffer budget, to be checked.
    cmd.args(["--handshake-rate", "100000", "--max-sessions-per-key", "1000", "--max-handshakes", "64"]);
    // Every session is the one key's: its share is half the budget (the most it may be), which
    // holds 400 streams' first windows.
    cmd.args(["--buffer-budget", "64MiB", "--buffer-per-key", "32MiB", "--metrics", "127.0.0.1:0"])
        .env_remove("RUST_LOG");
    let srv = Proc::spawn("holdfast server", &mut cmd, Out::Null);
    let addr = srv.logged_addr("server ready", "listen=").await;
    let metrics = srv.logged_addr("metrics endpoint ready", "metrics=").await;
    let cfg = ClientConfig::new(client, server.public);

    let sem = Arc::new(tokio::sync::Semaphore::new(32));
    let mut opening = Vec::new();
    for i in 0..SESSIONS {
        let (cfg, sem) = (cfg.clone(), sem.clone());
        opening.push(tokio::spawn(async move {
            let _permit = sem.acquire().await.unwrap();
            let mut st = holdfast::tunnel::open(&addr.to_string(), cfg, "echo")
                .await
                .unwrap_or_else(|e| panic!("session {i}: {e}"));
            echo_byte(&mut st, i as u8).await.unwrap();
            st
        }));
    }
    let mut streams = Vec::new();
    for t in opening {
        streams.push(timeout(LIMIT, t).await.expect("opening the sessions took too long").unwrap());
    }
    let mut events: Vec<_> = streams.iter().map(|s| s.events()).collect();

    // The storm: every link at once; meanwhile a new client connects.
    let killed = kill_connections(addr.port()).await.unwrap();
    assert!(killed as usize >= SESSIONS, "only {killed} links were killed");
    let newcomer = {
        let cfg = cfg.clone();
        tokio::spawn(async move { holdfast::tunnel::open(&addr.to_string(), cfg, "echo").await })
    };
    let mut resumed = 0;
    for (i, ev) in events.iter_mut().enumerate() {
        let got = timeout(LIMIT, async {
            loop {
                match ev.recv().await {
                    Ok(LinkEvent::Resumed { .. }) => return Ok(()),
                    Ok(LinkEvent::Failed { reason }) => return Err(reason),
                    Ok(_) => {}
                    Err(e) => return Err(e.to_string()),
                }
            }
        })
        .await;
        match got {
            Ok(Ok(())) => resumed += 1,
            Ok(Err(why)) => panic!("session {i} was lost: {why}\n{}", tail(&srv.log(), 20)),
            Err(_) => panic!("session {i} did not resume in time\n{}", tail(&srv.log(), 20)),
        }
    }
    let mut late =
        timeout(LIMIT, newcomer).await.expect("the newcomer").unwrap().expect("the newcomer got in during the storm");
    echo_byte(&mut late, 42).await.unwrap();
    for (i, st) in streams.iter_mut().enumerate() {
        echo_byte(st, (i + 1) as u8).await.unwrap_or_else(|e| panic!("session {i} after the storm: {e}"));
    }
    // The server's own counters: every session, no resume refused as unknown, buffers within
    // the budget.
    let text = scrape(metrics).await;
    let value = |name: &str| -> u64 {
        text.lines().find(|l| l.starts_with(name)).and_then(|l| l.rsplit(' ').next()?.parse().ok()).unwrap_or(u64::MAX)
    };
    assert_eq!(value("holdfast_sessions{state=\"attached\"}"), SESSIONS as u64 + 1, "{text}");
    assert_eq!(value("holdfast_handshakes_refused_total{reason=\"unknown_session\"}"), 0, "{text}");
    assert!(value("holdfast_buffered_bytes") <= 4 << 20, "{text}");
    assert!(value("holdfast_resumes_total") >= SESSIONS as u64, "{text}");
    eprintln!(
        "{name}: {SESSIONS} sessions, {killed} links killed at once, {resumed} resumed, 0 lost, a newcomer got in, every stream echoes; passed in {:.1?}",
        start.elapsed()
    );
}

/// One GET /metrics.
async fn scrape(addr: std::net::SocketAddr) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut out = String::new();
    let _ = timeout(LIMIT, s.read_to_string(&mut out)).await;
    out
}
