//! One server, many sessions: memory and CPU of idle sessions, and a resume storm.
//!
//! ```text
//! cargo bench --bench scale                       # 10,000 sessions
//! HOLDFAST_SCALE_SESSIONS=2000 cargo bench --bench scale
//! ```
//!
//! A real `holdfast server` (the release binary) with an echo service in this process. N
//! sessions are opened through `holdfast::tunnel::open` (the library client, all in this
//! process, all from 127.0.0.1, so the server runs with `--handshake-rate 1000000`: the default
//! per-source rate is for the Internet), each with its connection to the service, and each
//! echoes one byte. Then:
//!
//! - **idle**: the server's VmRSS with N idle sessions against its VmRSS before them, per
//!   session; its CPU time over 10 s of idling (keepalives only);
//! - **storm**: every link is killed at once (`ss -K` on the server's port and the links' client
//!   ports, needs root), and the
//!   time until every session has resumed is taken from each stream's `Resumed` event; 200 ms
//!   into the storm a new client connects, and the time it takes is reported; the server's
//!   VmRSS is sampled every 20 ms for its peak; every session then echoes a byte again, and any
//!   session lost is counted.
//!
//! See BENCHMARKS.md for results.

#[path = "scale/common.rs"]
mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{cpu, echo_service, raise_fd_limit, Server};
use holdfast::{LinkEvent, Stream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn echo_byte(s: &mut Stream, b: u8) -> std::io::Result<()> {
    s.write_all(&[b]).await?;
    let mut got = [0u8; 1];
    s.read_exact(&mut got).await?;
    if got[0] == b {
        Ok(())
    } else {
        Err(std::io::Error::other("echo differs"))
    }
}

fn main() {
    raise_fd_limit();
    let n: usize = std::env::var("HOLDFAST_SCALE_SESSIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(run(n));
}

async fn run(n: usize) {
    let svc = echo_service().await;
    // A key gets a quarter of the server's stream slots (sized from its descriptor limit) and of
    // its buffer budget: the sessions are spread over keys of at most 2,000 each.
    let keys = n.div_ceil(2000);
    let srv =
        Server::start_keys("scale", svc, &["--max-sessions", "20000", "--max-sessions-per-key", "20000"], keys).await;
    let (pid, addr, cfg) = (srv.pid, srv.addr.clone(), srv.cfg.clone());
    // Warm-up, then the baseline.
    for _ in 0..50 {
        let mut s = holdfast::tunnel::open(&addr, cfg.clone(), "echo").await.unwrap();
        echo_byte(&mut s, 1).await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let base = srv.rss();

    let t0 = Instant::now();
    let opened = Arc::new(AtomicUsize::new(0));
    let sem = Arc::new(tokio::sync::Semaphore::new(64));
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let (addr, cfg, sem, opened) = (addr.clone(), srv.cfgs[i % keys].clone(), sem.clone(), opened.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire().await.unwrap();
            let mut s = holdfast::tunnel::open(&addr, cfg, "echo").await.unwrap_or_else(|e| panic!("session {i}: {e}"));
            echo_byte(&mut s, i as u8).await.unwrap();
            opened.fetch_add(1, Ordering::Relaxed);
            s
        }));
    }
    let mut streams = Vec::with_capacity(n);
    for t in tasks {
        streams.push(t.await.unwrap());
    }
    let open_time = t0.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle = srv.rss();
    let c0 = cpu(pid);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let idle_cpu = cpu(pid).saturating_sub(c0);
    println!(
        "sessions {n}: opened in {:.1?} ({:.0}/s); server VmRSS {base} KiB -> {idle} KiB = {:.1} KiB per idle session; idle CPU {:.2} % of one core (10 s)",
        open_time,
        n as f64 / open_time.as_secs_f64(),
        (idle.saturating_sub(base)) as f64 / n as f64,
        idle_cpu.as_secs_f64() * 10.0
    );

    // The storm.
    let resumed = Arc::new(AtomicUsize::new(0));
    let times = Arc::new(std::sync::Mutex::new(Vec::with_capacity(n)));
    let links = srv.links_now();
    let storm = Instant::now();
    let lost = Arc::new(AtomicUsize::new(0));
    let all_done = Arc::new(tokio::sync::Notify::new());
    let mut watchers = Vec::with_capacity(n);
    for s in &streams {
        let mut ev = s.events();
        let (resumed, lost, all_done, times) = (resumed.clone(), lost.clone(), all_done.clone(), times.clone());
        watchers.push(tokio::spawn(async move {
            loop {
                match ev.recv().await {
                    Ok(LinkEvent::Resumed { .. }) => {
                        times.lock().unwrap().push(storm.elapsed());
                        if resumed.fetch_add(1, Ordering::Relaxed) + 1 == n {
                            all_done.notify_one();
                        }
                        return;
                    }
                    Ok(LinkEvent::Failed { .. }) | Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                        lost.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    _ => {}
                }
            }
        }));
    }
    let peak = srv.sample_peak();
    let c1 = cpu(pid);
    let own0 = cpu(std::process::id());
    let killed = srv.kill(&links);
    let newcomer = {
        let (addr, cfg) = (addr.clone(), cfg.clone());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let t = Instant::now();
            let r = holdfast::tunnel::open(&addr, cfg, "echo").await;
            (t.elapsed(), r.map(|_| ()).map_err(|e| e.to_string()))
        })
    };
    let waited = tokio::time::timeout(Duration::from_secs(120), all_done.notified()).await;
    let storm_time = storm.elapsed();
    let storm_cpu = cpu(pid).saturating_sub(c1);
    let own_cpu = cpu(std::process::id()).saturating_sub(own0);
    let peak = peak.finish().await;
    let (new_time, new_result) = newcomer.await.unwrap();
    let [p50, p90, p99, last] = common::percentiles(&mut times.lock().unwrap().clone());
    println!("storm: resumed by p50 {p50:.2?}, p90 {p90:.2?}, p99 {p99:.2?}, last {last:.2?}");
    let mut bad = 0;
    for (i, s) in streams.iter_mut().enumerate() {
        if echo_byte(s, (i + 7) as u8).await.is_err() {
            bad += 1;
        }
    }
    println!(
        "storm: {killed} links killed at once; {} of {n} sessions resumed in {:.2?}{}; {} lost; server CPU {:.2?}, clients' CPU {:.2?}; a new client during the storm got in after {:.0?} ({}); server VmRSS peak {peak} KiB (idle {idle} KiB); echo after the storm: {} of {n} failed",
        resumed.load(Ordering::Relaxed),
        storm_time,
        if waited.is_err() { " (TIMED OUT at 120 s)" } else { "" },
        lost.load(Ordering::Relaxed),
        storm_cpu,
        own_cpu,
        new_time,
        new_result.map_or_else(|e| format!("failed: {e}"), |()| "ok".to_string()),
        bad
    );
    drop(streams);
    drop(srv);
}
