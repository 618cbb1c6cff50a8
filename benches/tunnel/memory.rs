//! holdfast only: server memory per idle session (raw sessions that idle like real clients,
//! then drop their links) and per busy session (bulk transfers through the main tunnel).

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use holdfast::proto::frame::split_record;
use holdfast::proto::streams::wire::{Header, MAX_HEADER};
use holdfast::proto::{CloseCode, Frame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{watch, Semaphore};

use super::metrics::connect;
use super::paths::{holdfast_server_with, HoldfastKeys};
use super::procs::Tool;
use super::raw::{raw_handshake, seal, RawKeys, Sources};
use super::util::{err, loopback, median, s, vm_rss_kib};
use super::SERVICE_NAME;

/// A raw session that opens the bench service and then idles like a real client: it
/// acknowledges data, stores its ticket, answers PINGs and sends its own keepalive. When `stop`
/// changes it either closes the session (`graceful`) or drops the link with a reset, as a
/// network fault would, so that the server detaches the session.
async fn idle_session(
    server: SocketAddr,
    src: Ipv4Addr,
    keys: Arc<RawKeys>,
    gate: Arc<Semaphore>,
    established: Arc<AtomicU64>,
    mut stop: watch::Receiver<bool>,
    graceful: bool,
) -> io::Result<()> {
    let mut permit = Some(gate.acquire_owned().await.map_err(|e| err(e.to_string()))?);
    let (mut s, mut t) = raw_handshake(server, src, &keys).await?;
    let mut req = vec![SERVICE_NAME.len() as u8];
    req.extend_from_slice(SERVICE_NAME.as_bytes());
    req.push(b'H');
    // Protocol version 4: the service request travels on the session's first stream (id 1),
    // opened in the same DATA (docs/PROTOCOL.md, section 13 and Appendix A).
    let mut data = Vec::with_capacity(2 * MAX_HEADER + req.len());
    for h in [Header::Open(1), Header::Data { id: 1, len: req.len() }] {
        let mut b = [0u8; MAX_HEADER];
        let n = h.encode(&mut b);
        data.extend_from_slice(&b[..n]);
    }
    data.extend_from_slice(&req);
    let out = seal(&mut t, &[Frame::Ack(0), Frame::Data { offset: 0, data: &data }])?;
    s.write_all(&out).await?;
    let (mut rd, mut wr) = s.split();
    let mut received = 0u64;
    let mut inbuf: Vec<u8> = Vec::new();
    let mut plain = vec![0u8; 1 << 16];
    let mut chunk = vec![0u8; 1 << 12];
    let mut keepalive = tokio::time::interval(Duration::from_secs(4));
    loop {
        tokio::select! {
            r = rd.read(&mut chunk) => {
                let n = r?;
                if n == 0 {
                    return Err(err("server closed the session"));
                }
                inbuf.extend_from_slice(&chunk[..n]);
                let mut used = 0;
                let mut replies = Vec::new();
                while let Some((body, k)) = split_record(&inbuf[used..]) {
                    let m = t.open(body, &mut plain).map_err(|e| err(e.to_string()))?;
                    let frame = Frame::decode(&plain[..m]).map_err(|e| err(e.to_string()))?;
                    let reply = match frame {
                        Frame::Data { data, .. } => {
                            received += data.len() as u64;
                            if permit.is_some() && received >= 2 {
                                permit = None;
                                established.fetch_add(1, Ordering::Relaxed);
                            }
                            Some(Frame::Ack(received))
                        }
                        Frame::Ticket { resume_id, .. } => Some(Frame::TicketAck(resume_id)),
                        Frame::Ping => Some(Frame::Pong),
                        _ => None,
                    };
                    if let Some(f) = reply {
                        replies.extend_from_slice(&seal(&mut t, &[f])?);
                    }
                    used += k;
                }
                inbuf.drain(..used);
                if !replies.is_empty() {
                    wr.write_all(&replies).await?;
                }
            }
            _ = keepalive.tick() => {
                let out = seal(&mut t, &[Frame::Ping])?;
                wr.write_all(&out).await?;
            }
            _ = stop.changed() => break,
        }
    }
    if graceful {
        let out = seal(&mut t, &[Frame::Close { code: CloseCode::Abort.to_u16(), reason: "bench done" }])?;
        wr.write_all(&out).await?;
        wr.shutdown().await?;
    } else {
        s.set_zero_linger()?;
    }
    Ok(())
}

/// Server VmRSS figures of the memory test, in KiB.
pub(crate) struct MemResult {
    /// Idle sessions opened.
    pub(crate) sessions: usize,
    /// Before the idle sessions.
    pub(crate) base_kib: u64,
    /// With every idle session open.
    pub(crate) idle_kib: u64,
    /// After every idle session lost its link (sessions detached).
    pub(crate) detached_kib: u64,
    /// Sessions in bulk transfer (0 when the holdfast path is not run).
    pub(crate) busy_sessions: usize,
    /// The main holdfast server before the bulk transfers.
    pub(crate) busy_base_kib: u64,
    /// Its peak during them.
    pub(crate) busy_peak_kib: u64,
}

/// Opens `n` idle sessions and waits until all are established. Returns the stop switch and
/// the tasks.
async fn open_idle(
    server: SocketAddr,
    raw: &Arc<RawKeys>,
    src: &Arc<Sources>,
    n: usize,
    graceful: bool,
) -> io::Result<(watch::Sender<bool>, Vec<tokio::task::JoinHandle<io::Result<()>>>)> {
    let gate = Arc::new(Semaphore::new(32));
    let established = Arc::new(AtomicU64::new(0));
    let (stop, rx) = watch::channel(false);
    let mut tasks: Vec<_> = (0..n)
        .map(|_| {
            let fut =
                idle_session(server, src.next(), raw.clone(), gate.clone(), established.clone(), rx.clone(), graceful);
            tokio::spawn(fut)
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    while established.load(Ordering::Relaxed) < n as u64 {
        if let Some(i) = tasks.iter().position(|t| t.is_finished()) {
            let why = match tasks.swap_remove(i).await {
                Ok(Err(e)) => e.to_string(),
                _ => s("ended"),
            };
            let n = established.load(Ordering::Relaxed);
            return Err(err(format!("a session failed after {n} were established: {why}")));
        }
        if Instant::now() > deadline {
            return Err(err("sessions not established in time"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok((stop, tasks))
}

/// VmRSS of `pid` after 2 s to settle: the median of 5 readings 200 ms apart.
async fn settle_rss(pid: u32) -> io::Result<u64> {
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut v = Vec::new();
    for _ in 0..5 {
        v.push(vm_rss_kib(pid).ok_or_else(|| err("no VmRSS"))? as f64);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(median(&v).unwrap_or(0.0) as u64)
}

/// Server VmRSS before, with `sessions` idle sessions open, and after all their links dropped.
async fn idle_memory(
    dir: &Path,
    keys: &HoldfastKeys,
    raw: Arc<RawKeys>,
    svc: u16,
    sessions: usize,
) -> io::Result<(usize, u64, u64, u64)> {
    // The server's buffer budget charges each session its worst case (replay buffer bound +
    // receive window, 1 GiB in all by default); a 16 KiB replay bound lets 1000 sessions fit.
    // Buffers are allocated as data arrives, so the bound does not change an idle session's cost.
    let cap = (sessions + 100).to_string();
    let post =
        ["--max-sessions", &cap, "--max-sessions-per-key", &cap, "--buffer", "16KiB", "--buffer-per-key", "1GiB"];
    let (server, sport) = holdfast_server_with(dir, keys, svc, "mem-server.log", &[], &post).await?;
    let mut tool = Tool { name: "mem", entry: loopback(sport), children: vec![server], server_pid: None };
    let pid = tool.children[0].id();
    let src = Arc::new(Sources(AtomicU64::new(30_000)));
    // Warm up (runtime threads, allocator arenas, tables) with sessions that end.
    let (stop, tasks) = open_idle(tool.entry, &raw, &src, 50, true).await?;
    let _ = stop.send(true);
    for t in tasks {
        let _ = t.await;
    }
    let base = settle_rss(pid).await?;
    let (stop, tasks) = open_idle(tool.entry, &raw, &src, sessions, false).await?;
    let idle = settle_rss(pid).await?;
    let _ = stop.send(true);
    for t in tasks {
        let _ = t.await;
    }
    let detached = settle_rss(pid).await?;
    tool.kill();
    Ok((sessions, base, idle, detached))
}

/// The idle-session test on a server of its own, then the busy-session test through the
/// main holdfast path `hf` when it runs.
pub(crate) async fn memory_test(
    dir: &Path,
    keys: &HoldfastKeys,
    raw: Arc<RawKeys>,
    svc: u16,
    sessions: usize,
    hf: Option<&Tool>,
) -> io::Result<MemResult> {
    let (n, base, idle, detached) = idle_memory(dir, keys, raw, svc, sessions).await?;
    let (mut busy_sessions, mut busy_base_kib, mut busy_peak_kib) = (0, 0, 0);
    if let Some(t) = hf {
        if let Some(pid) = t.server_pid {
            let (b, p) = busy_memory(t.entry, pid).await?;
            (busy_sessions, busy_base_kib, busy_peak_kib) = (8, b, p);
        }
    }
    Ok(MemResult {
        sessions: n,
        base_kib: base,
        idle_kib: idle,
        detached_kib: detached,
        busy_sessions,
        busy_base_kib,
        busy_peak_kib,
    })
}

/// Eight sessions in bulk transfer (four up, four down) through the main holdfast tunnel:
/// the server's VmRSS before and at its peak.
async fn busy_memory(entry: SocketAddr, pid: u32) -> io::Result<(u64, u64)> {
    let base = vm_rss_kib(pid).ok_or_else(|| err("no VmRSS"))?;
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for i in 0..8 {
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = connect(entry).await?;
            let mut buf = vec![0x5au8; 256 << 10];
            if i % 2 == 0 {
                s.write_all(b"U").await?;
                while !stop.load(Ordering::Relaxed) {
                    s.write_all(&buf).await?;
                }
            } else {
                let mut req = vec![b'D'];
                req.extend_from_slice(&u64::MAX.to_be_bytes());
                s.write_all(&req).await?;
                while !stop.load(Ordering::Relaxed) {
                    if s.read(&mut buf).await? == 0 {
                        break;
                    }
                }
            }
            Ok::<_, io::Error>(())
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut peak = base;
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        peak = peak.max(vm_rss_kib(pid).unwrap_or(0));
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        match t.await {
            Ok(Err(e)) => return Err(e),
            Err(e) => return Err(err(e.to_string())),
            Ok(Ok(())) => {}
        }
    }
    Ok((base, peak))
}
