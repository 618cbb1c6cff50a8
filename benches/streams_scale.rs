//! Streams at scale, against a real `holdfast server`: one session holding many idle streams
//! (the server's memory per idle stream), and a resume storm of many sessions with many streams
//! each (every stream intact, one resume per session).
//!
//! ```text
//! cargo bench --bench streams_scale        # 1,000 idle streams, then 400 sessions × 10 streams
//! HOLDFAST_STREAMS_RUN=idle HOLDFAST_STREAMS_IDLE=1000 cargo bench --bench streams_scale
//! HOLDFAST_STREAMS_RUN=storm HOLDFAST_STREAMS_SESSIONS=400 HOLDFAST_STREAMS_PER_SESSION=10 \
//!   cargo bench --bench streams_scale
//! ```
//!
//! The release `holdfast server` with an echo service in this process (each stream's outbound
//! connection is a socket of the server's to it); the clients are the tunnel's session pool
//! ([`holdfast::tunnel::MuxPool`], what `holdfast client --local` opens each connection's stream
//! with), all in this process and all from 127.0.0.1, so the server runs with
//! `--handshake-rate 1000000`; every other setting is the default but `--max-sessions-per-key`.
//!
//! - **idle**: one session; 32 streams are opened, echoed and finished (warm-up), the server's
//!   VmRSS is taken, then N streams are opened at once (half, then the other half), each echoes
//!   64 bytes and stays open, idle. The server's VmRSS after each half, 3 s after the opens,
//!   gives the memory per idle stream, from the start and for the second half alone (the
//!   marginal cost, without one-time growth). RSS is the process's user memory: the kernel's
//!   memory for the streams' sockets is not in it. Then every stream echoes again.
//! - **storm**: S sessions each open K streams (each a connection of the server's to the
//!   service) and echo 4 KiB on each; then every link is killed at once (`ss -K` on the server's
//!   port and the links' client ports, so a link that reconnects during the sweep is not killed
//!   again; needs root) and at once every stream writes a new 4 KiB pattern of its own and reads
//!   it back, through the resume, compared byte for byte. Reported: streams intact, sessions
//!   resumed, and per session the links lost, reconnect attempts and resumes (each pool's link
//!   events, 2 s after the last echo; the server's `holdfast_resumes_total` as a check), the
//!   time to every session resumed and to every stream's echo, the server's peak VmRSS (sampled
//!   every 20 ms) and CPU.
//!
//! `HOLDFAST_STREAMS_PAUSE=SECONDS` pauses the idle run before the streams are opened and again
//! while they are open, printing the server's pid: time to attach a heap profiler to it
//! (`heaptrack -p PID`) and to stop it.
//!
//! See BENCHMARKS.md (*Streams*) for results.

#[path = "scale/common.rs"]
mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{cpu, echo, echo_service, pattern, percentiles, raise_fd_limit, Server};
use holdfast::tunnel::{MuxPool, TunnelError};
use holdfast::{LinkEvent, Stream};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;

/// Bytes each idle stream echoes before it goes idle.
const IDLE_ECHO: usize = 64;
/// Bytes each stream of the storm echoes, before the storm and through it.
const STORM_ECHO: usize = 4096;
/// The longest one stream's open or echo may take before it counts as failed.
const LIMIT: Duration = Duration::from_secs(60);

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    raise_fd_limit();
    let run = std::env::var("HOLDFAST_STREAMS_RUN").unwrap_or_else(|_| "idle,storm".into());
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        if run.contains("idle") {
            idle(env_or("HOLDFAST_STREAMS_IDLE", 1000)).await;
        }
        if run.contains("storm") {
            storm(env_or("HOLDFAST_STREAMS_SESSIONS", 400), env_or("HOLDFAST_STREAMS_PER_SESSION", 10)).await;
        }
    });
}

/// A stream to the echo service, its request answered, within [`LIMIT`].
async fn open(pool: &MuxPool) -> Result<Stream, TunnelError> {
    match tokio::time::timeout(LIMIT, pool.open("echo")).await {
        Ok(Ok(Some(s))) => Ok(s),
        Ok(Ok(None)) => Err(TunnelError::Malformed("reply: the server does not carry streams")),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(TunnelError::Timeout("open")),
    }
}

/// What [`open_idle`] opened: the streams that echoed, the count and first error of those that
/// did not, and each open's time (to its answered request) and its echo's.
struct Opened {
    streams: Vec<Stream>,
    failed: usize,
    why: Option<String>,
    opens: Vec<Duration>,
    echoes: Vec<Duration>,
}

/// Opens `n` streams on `pool` at once; each echoes the pattern of its seed (from `first`).
async fn open_idle(pool: &Arc<MuxPool>, first: u64, n: usize) -> Opened {
    let mut set = JoinSet::new();
    for i in 0..n as u64 {
        let pool = pool.clone();
        set.spawn(async move {
            let t = Instant::now();
            let mut s = open(&pool).await.map_err(|e| e.to_string())?;
            let opened = t.elapsed();
            echo(&mut s, &pattern(first + i, IDLE_ECHO), LIMIT).await.map_err(|e| e.to_string())?;
            Ok::<_, String>((s, opened, t.elapsed() - opened))
        });
    }
    let mut o = Opened { streams: Vec::with_capacity(n), failed: 0, why: None, opens: vec![], echoes: vec![] };
    while let Some(r) = set.join_next().await {
        match r.map_err(|e| e.to_string()).and_then(|r| r) {
            Ok((s, opened, echoed)) => {
                o.streams.push(s);
                o.opens.push(opened);
                o.echoes.push(echoed);
            }
            Err(e) => {
                o.failed += 1;
                o.why.get_or_insert(e);
            }
        }
    }
    o
}

async fn idle(n: usize) {
    let svc = echo_service().await;
    let srv = Server::start("streams-idle", svc, &[]).await;
    let pool = MuxPool::new(srv.addr.clone(), srv.cfg.clone(), None);
    for i in 0..32 {
        let mut s = open(&pool).await.expect("warm-up stream");
        echo(&mut s, &pattern(i, IDLE_ECHO), LIMIT).await.expect("warm-up echo");
        holdfast::tunnel::finish(s, 1 << 20).await.expect("warm-up stream's end");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let base = srv.rss();
    pause(&srv, "before the idle streams are opened").await;
    let mut streams = Vec::with_capacity(n);
    let mut steps = Vec::new();
    let (mut failed, mut why) = (0, None);
    for (first, count) in [(1000, n / 2), (1000 + n as u64, n - n / 2)] {
        let t = Instant::now();
        let mut o = open_idle(&pool, first, count).await;
        let took = t.elapsed();
        streams.extend(o.streams);
        failed += o.failed;
        why = why.or(o.why);
        let [o50, _, o99, omax] = percentiles(&mut o.opens);
        let [e50, _, e99, emax] = percentiles(&mut o.echoes);
        println!(
            "idle streams: {count} opened at once in {took:.2?}: open p50 {o50:.2?}, p99 {o99:.2?}, max {omax:.2?}; echo p50 {e50:.2?}, p99 {e99:.2?}, max {emax:.2?}"
        );
        tokio::time::sleep(Duration::from_secs(3)).await;
        steps.push((streams.len(), srv.rss()));
    }
    pause(&srv, "with the idle streams open").await;
    let buffered = srv.metric("holdfast_buffered_bytes").await;
    let mut bad_after = 0;
    for (i, s) in streams.iter_mut().enumerate() {
        if echo(s, &pattern(1_000_000 + i as u64, IDLE_ECHO), LIMIT).await.is_err() {
            bad_after += 1;
        }
    }
    let ((n1, rss1), (n2, rss2)) = (steps[0], steps[1]);
    let per = |kib: u64, streams: usize| kib as f64 * 1024.0 / streams.max(1) as f64;
    println!(
        "idle streams: {n2} of {n} open on one session ({failed} failed{})",
        why.map(|e| format!(", first error: {e}")).unwrap_or_default(),
    );
    println!(
        "idle streams: server VmRSS {base} KiB -> {rss1} KiB ({n1} streams) -> {rss2} KiB ({n2} streams): \
         {:.0} bytes per idle stream from the start, {:.0} bytes per stream of the second half; \
         holdfast_buffered_bytes {}; echo again: {bad_after} of {n2} failed",
        per(rss2.saturating_sub(base), n2),
        per(rss2.saturating_sub(rss1), n2 - n1),
        buffered.map_or("?".into(), |b| format!("{b:.0}")),
    );
    drop(streams);
    pool.close().await;
}

/// Waits `HOLDFAST_STREAMS_PAUSE` seconds (none by default), saying so with the server's pid:
/// time to attach a profiler to the server (`heaptrack -p PID`) and to stop it.
async fn pause(srv: &Server, when: &str) {
    let secs = env_or("HOLDFAST_STREAMS_PAUSE", 0);
    if secs > 0 {
        println!("pause: {secs} s {when}; server pid {}", srv.pid);
        tokio::time::sleep(Duration::from_secs(secs as u64)).await;
    }
}

/// One session of the storm: its pool, its streams, and what its link events said.
struct Client {
    pool: Arc<MuxPool>,
    streams: Vec<Stream>,
    resumed: Arc<Mutex<Vec<Instant>>>,
    /// Links lost, reconnect attempts, and `Failed` events.
    counts: Arc<[AtomicUsize; 3]>,
}

/// Opens session `i` and its `per` streams, each echoing its pattern of round 0.
async fn open_client(srv: (&str, &holdfast::ClientConfig), i: usize, per: usize) -> Result<Client, String> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let pool = MuxPool::new(srv.0.to_string(), srv.1.clone(), Some(tx));
    let (resumed, counts) = (Arc::new(Mutex::new(Vec::new())), Arc::new([0, 0, 0].map(AtomicUsize::new)));
    {
        let (resumed, counts) = (resumed.clone(), counts.clone());
        tokio::spawn(async move {
            while let Some((_, ev)) = rx.recv().await {
                let k = match ev {
                    LinkEvent::Resumed { .. } => {
                        resumed.lock().unwrap().push(Instant::now());
                        continue;
                    }
                    LinkEvent::Lost(_) => 0,
                    LinkEvent::Reconnecting { .. } => 1,
                    LinkEvent::Failed { .. } => 2,
                    _ => continue,
                };
                counts[k].fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    let mut streams = Vec::with_capacity(per);
    for j in 0..per {
        let mut s = open(&pool).await.map_err(|e| format!("session {i} stream {j}: {e}"))?;
        echo(&mut s, &pattern(seed(i, j, 0), STORM_ECHO), LIMIT)
            .await
            .map_err(|e| format!("session {i} stream {j}: {e}"))?;
        streams.push(s);
    }
    Ok(Client { pool, streams, resumed, counts })
}

/// The pattern seed of stream `j` of session `i` in `round`.
fn seed(i: usize, j: usize, round: u64) -> u64 {
    ((i as u64) << 32 | j as u64) << 2 | round
}

async fn storm(sessions: usize, per: usize) {
    let svc = echo_service().await;
    let cap = (sessions + 64).to_string();
    // One key gets a quarter of the server's stream slots (sized from its descriptor limit):
    // the sessions are spread over keys holding at most 2,000 streams each.
    let keys = (sessions * per).div_ceil(2000).max(1);
    let srv = Server::start_keys("streams-storm", svc, &["--max-sessions-per-key", &cap], keys).await;
    let base = srv.rss();
    let t0 = Instant::now();
    let sem = Arc::new(Semaphore::new(64));
    let mut set = JoinSet::new();
    for i in 0..sessions {
        let (addr, cfg, sem) = (srv.addr.clone(), srv.cfgs[i % keys].clone(), sem.clone());
        set.spawn(async move {
            let _permit = sem.acquire().await.unwrap();
            (i, open_client((&addr, &cfg), i, per).await)
        });
    }
    let mut clients: Vec<Option<Client>> = (0..sessions).map(|_| None).collect();
    while let Some(r) = set.join_next().await {
        let (i, c) = r.expect("session task");
        clients[i] = Some(c.unwrap_or_else(|e| panic!("before the storm: {e}")));
    }
    let mut clients: Vec<Client> = clients.into_iter().map(Option::unwrap).collect();
    let open_time = t0.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle = srv.rss();
    let resumes0 = srv.metric("holdfast_resumes_total").await.unwrap_or(f64::NAN);
    println!(
        "storm: {sessions} sessions × {per} streams open and echoing in {open_time:.2?}; server VmRSS {base} KiB -> {idle} KiB ({:.1} KiB per stream with its session's share)",
        idle.saturating_sub(base) as f64 / (sessions * per) as f64
    );

    // The storm: every link killed, and at once every stream echoes a new pattern through it.
    let peak = srv.sample_peak();
    let (c0, own0) = (cpu(srv.pid), cpu(std::process::id()));
    let links = srv.links_now();
    let storm = Instant::now();
    let killed = srv.kill(&links);
    let mut echoes = JoinSet::new();
    for (i, c) in clients.iter_mut().enumerate() {
        for (j, mut s) in c.streams.drain(..).enumerate() {
            echoes.spawn(async move {
                let r = echo(&mut s, &pattern(seed(i, j, 1), STORM_ECHO), Duration::from_secs(120)).await;
                (i, j, r.map(|()| storm.elapsed()), s)
            });
        }
    }
    let (mut done, mut broken, mut why) = (Vec::with_capacity(sessions * per), 0, None);
    while let Some(r) = echoes.join_next().await {
        let (i, j, r, s) = r.expect("echo task");
        match r {
            Ok(t) => done.push(t),
            Err(e) => {
                broken += 1;
                why.get_or_insert(format!("session {i} stream {j}: {e}"));
            }
        }
        clients[i].streams.push(s);
    }
    let storm_cpu = cpu(srv.pid).saturating_sub(c0);
    let own_cpu = cpu(std::process::id()).saturating_sub(own0);
    // Late resumes (a second one for a session) would show within this.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let peak = peak.finish().await;
    let resumes = srv.metric("holdfast_resumes_total").await.unwrap_or(f64::NAN) - resumes0;
    // Per session: (links lost, reconnect attempts, resumes) -> sessions.
    let mut by_count: BTreeMap<(usize, usize, usize), usize> = BTreeMap::new();
    let mut first_resume = Vec::with_capacity(sessions);
    let mut lost = 0;
    for c in &clients {
        let r = c.resumed.lock().unwrap();
        let n = |k: usize| c.counts[k].load(Ordering::Relaxed);
        *by_count.entry((n(0), n(1), r.len())).or_default() += 1;
        first_resume.extend(r.first().map(|t| t.saturating_duration_since(storm)));
        lost += usize::from(n(2) > 0);
    }
    let resumed_sessions = first_resume.len();
    let [r50, r90, r99, rlast] = percentiles(&mut first_resume);
    let [e50, e90, e99, elast] = percentiles(&mut done);
    let histogram: Vec<String> = by_count
        .iter()
        .map(|((l, a, r), v)| format!("{v} sessions lost {l} link(s), made {a} attempt(s), resumed {r} time(s)"))
        .collect();
    println!(
        "storm: {killed} of {} links killed at once; {resumed_sessions} of {sessions} sessions resumed (first resume p50 {r50:.2?}, p90 {r90:.2?}, p99 {r99:.2?}, last {rlast:.2?}); {}; server holdfast_resumes_total +{resumes}; sessions failed: {lost}",
        links.count,
        histogram.join("; ")
    );
    println!(
        "storm: streams intact (their {STORM_ECHO}-byte pattern echoed exactly through the storm): {} of {}{}; echoed by p50 {e50:.2?}, p90 {e90:.2?}, p99 {e99:.2?}, all by {elast:.2?}",
        done.len(),
        sessions * per,
        why.map(|e| format!(" ({broken} broken, first: {e})")).unwrap_or_default(),
    );
    println!(
        "storm: server VmRSS peak {peak} KiB (idle {idle} KiB); server CPU {storm_cpu:.2?}, this process's (clients and echo service) {own_cpu:.2?}"
    );
    // Every session ends cleanly, 64 at a time, each within its 3 s.
    let mut closing = JoinSet::new();
    for c in clients {
        let sem = sem.clone();
        closing.spawn(async move {
            let _permit = sem.acquire().await.unwrap();
            drop(c.streams);
            c.pool.close().await;
        });
    }
    while closing.join_next().await.is_some() {}
}
