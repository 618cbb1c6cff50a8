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
//! - **storm**: every link is killed at once (`ss -K` on the server's port, needs root), and the
//!   time until every session has resumed is taken from each stream's `Resumed` event; 200 ms
//!   into the storm a new client connects, and the time it takes is reported; the server's
//!   VmRSS is sampled every 20 ms for its peak; every session then echoes a byte again, and any
//!   session lost is counted.
//!
//! See BENCHMARKS.md for results.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use holdfast::keys::{self, Keypair};
use holdfast::{ClientConfig, LinkEvent, Stream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const BIN: &str = env!("CARGO_BIN_EXE_holdfast");

fn vm_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// User plus system CPU time of `pid`.
fn cpu(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = after.split_whitespace().filter_map(|x| x.parse().ok()).collect();
    // Fields 14 and 15 of stat (utime, stime), in clock ticks (100 per second here).
    let ticks = f.get(10).copied().unwrap_or(0) + f.get(11).copied().unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

fn raise_fd_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let want = rustix::process::Rlimit { current: Some(200_000), maximum: Some(200_000) };
    if setrlimit(Resource::Nofile, want).is_err() {
        let mut lim = getrlimit(Resource::Nofile);
        lim.current = lim.maximum;
        let _ = setrlimit(Resource::Nofile, lim);
    }
}

async fn echo_service() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

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

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_server(dir: &Path, svc: SocketAddr, port: u16) -> Server {
    let log = std::fs::File::create(dir.join("server.log")).unwrap();
    let child = Command::new(BIN)
        .args(["server", "--listen", &format!("127.0.0.1:{port}"), "--service", &format!("echo={svc}")])
        .arg("--key")
        .arg(dir.join("server.key"))
        .arg("--authorized")
        .arg(dir.join("authorized"))
        .args([
            "--max-sessions",
            "20000",
            "--max-sessions-per-key",
            "20000",
            "--handshake-rate",
            "1000000",
            "--metrics",
            "127.0.0.1:9771",
        ])
        .args(std::env::var("HOLDFAST_SCALE_SERVER_ARGS").unwrap_or_default().split_whitespace())
        .env("RUST_LOG", std::env::var("HOLDFAST_SCALE_LOG").unwrap_or_else(|_| "warn".into()))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start holdfast server");
    Server(child)
}

fn main() {
    raise_fd_limit();
    let n: usize = std::env::var("HOLDFAST_SCALE_SESSIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(run(n));
}

async fn run(n: usize) {
    let dir = std::env::temp_dir().join(format!("holdfast-scale-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (server, client) = (Keypair::generate(), Keypair::generate());
    keys::save_private_key(&dir.join("server.key"), &server.private).unwrap();
    std::fs::write(dir.join("authorized"), format!("{} bench\n", client.public)).unwrap();
    let svc = echo_service().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let srv = start_server(&dir, svc, port);
    let pid = srv.0.id();
    let addr = format!("127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(&addr).await.is_err() {
        assert!(Instant::now() < deadline, "the server did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cfg = ClientConfig::new(client, server.public);
    // Warm-up, then the baseline.
    for _ in 0..50 {
        let mut s = holdfast::tunnel::open(&addr, cfg.clone(), "echo").await.unwrap();
        echo_byte(&mut s, 1).await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let base = vm_kib(pid, "VmRSS:");

    let t0 = Instant::now();
    let opened = Arc::new(AtomicUsize::new(0));
    let sem = Arc::new(tokio::sync::Semaphore::new(64));
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let (addr, cfg, sem, opened) = (addr.clone(), cfg.clone(), sem.clone(), opened.clone());
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
    let idle = vm_kib(pid, "VmRSS:");
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
    let sampling = Arc::new(AtomicBool::new(true));
    let peak = {
        let sampling = sampling.clone();
        tokio::spawn(async move {
            let mut peak = 0;
            while sampling.load(Ordering::Relaxed) {
                peak = peak.max(vm_kib(pid, "VmRSS:"));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            peak
        })
    };
    let c1 = cpu(pid);
    let own0 = cpu(std::process::id());
    let out = Command::new("ss")
        .args(["-K", "-H", "-t", "dst", "127.0.0.1", "dport", "=", &format!(":{port}")])
        .output()
        .expect("ss");
    let killed = String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.starts_with("ESTAB")).count();
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
    sampling.store(false, Ordering::Relaxed);
    let peak = peak.await.unwrap();
    let (new_time, new_result) = newcomer.await.unwrap();
    let mut t = times.lock().unwrap().clone();
    t.sort_unstable();
    let pct =
        |p: f64| t.get(((t.len() as f64 * p) as usize).min(t.len().saturating_sub(1))).copied().unwrap_or_default();
    println!(
        "storm: resumed by p50 {:.2?}, p90 {:.2?}, p99 {:.2?}, last {:.2?}",
        pct(0.5),
        pct(0.9),
        pct(0.99),
        pct(1.0)
    );
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
    if std::env::var_os("HOLDFAST_SCALE_LOG").is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
}
