//! holdfast only: a raw protocol client for handshake rate and idle-session memory, and the
//! handshake test. It binds a
//! different loopback source address per connection (127.1.x.y), so the server's per-source
//! handshake rate limit (a flood defence) does not cap the measurement.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use holdfast::keys::{PrivateKey, PublicKey};
use holdfast::proto::frame::push_record;
use holdfast::proto::{ClientHandshake, CloseCode, Frame, Transport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use super::paths::{holdfast_server_with, HoldfastKeys};
use super::procs::Tool;
use super::util::{cpu_time, err, loopback, median};

/// The keys a raw client handshakes with.
pub(crate) struct RawKeys {
    /// The client's private key.
    pub(crate) client: PrivateKey,
    /// The server's public key.
    pub(crate) server: PublicKey,
}

/// Hands out loopback source addresses 127.1.x.y in turn, from a counter.
pub(crate) struct Sources(pub(crate) AtomicU64);

impl Sources {
    /// The next source address.
    pub(crate) fn next(&self) -> Ipv4Addr {
        let i = self.0.fetch_add(1, Ordering::Relaxed) % 65_000 + 1;
        Ipv4Addr::new(127, 1, (i >> 8) as u8, i as u8)
    }
}

/// Reads one length-prefixed record into `buf`.
async fn read_record(s: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<()> {
    let len = s.read_u16().await? as usize;
    buf.resize(len, 0);
    s.read_exact(buf).await?;
    Ok(())
}

/// A first-connection timestamp: the server accepts each once (protocol version 3), so every
/// raw handshake gets a new one, near the wall clock like a real client's.
fn stamp() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    NEXT.fetch_max(now, Ordering::Relaxed);
    NEXT.fetch_add(1, Ordering::Relaxed) + 1
}

/// Connects from `src` and completes the handshake: the socket and the transport keys.
pub(crate) async fn raw_handshake(
    server: SocketAddr,
    src: Ipv4Addr,
    keys: &RawKeys,
) -> io::Result<(TcpStream, Transport)> {
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::from((src, 0)))?;
    let mut s = sock.connect(server).await?;
    s.set_nodelay(true)?;
    let (hs, hello) =
        ClientHandshake::initial(&keys.client, &keys.server, holdfast::proto::Cipher::preferred(), stamp())
            .map_err(|e| err(e.to_string()))?;
    let mut rec = Vec::new();
    push_record(&mut rec, &hello);
    s.write_all(&rec).await?;
    let mut reply = Vec::new();
    read_record(&mut s, &mut reply).await?;
    let done = hs.read_reply(&reply).map_err(|e| err(e.to_string()))?;
    Ok((s, done.transport))
}

/// `frames` encoded and sealed, one record each, ready to write.
pub(crate) fn seal(t: &mut Transport, frames: &[Frame<'_>]) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut plain = Vec::new();
    for f in frames {
        plain.clear();
        f.encode(&mut plain);
        t.seal(&plain, &mut out).map_err(|e| err(e.to_string()))?;
    }
    Ok(out)
}

/// Handshakes per second (completed handshake + key confirmation), and the server's CPU time
/// per handshake.
pub(crate) async fn handshake_rate(
    server: SocketAddr,
    pid: u32,
    keys: Arc<RawKeys>,
    dur: Duration,
) -> io::Result<(f64, f64)> {
    let src = Arc::new(Sources(AtomicU64::new(0)));
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let cpu0 = cpu_time(pid).ok_or_else(|| err("no server CPU time"))?;
    let start = Instant::now();
    let end = start + dur;
    let mut workers = Vec::new();
    for _ in 0..16 {
        let (src, done, failed, keys) = (src.clone(), done.clone(), failed.clone(), keys.clone());
        workers.push(tokio::spawn(async move {
            while Instant::now() < end {
                let one = async {
                    let (mut s, mut t) = raw_handshake(server, src.next(), &keys).await?;
                    let bye = Frame::Close { code: CloseCode::Abort.to_u16(), reason: "bench" };
                    let out = seal(&mut t, &[Frame::Ack(0), bye])?;
                    s.write_all(&out).await?;
                    Ok::<_, io::Error>(())
                };
                match tokio::time::timeout(Duration::from_secs(5), one).await {
                    Ok(Ok(())) => done.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    for w in workers {
        let _ = w.await;
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu1 = cpu_time(pid).ok_or_else(|| err("no server CPU time"))?;
    let n = done.load(Ordering::Relaxed);
    if failed.load(Ordering::Relaxed) > n / 100 {
        return Err(err(format!("{} of {} handshakes failed", failed.load(Ordering::Relaxed), n)));
    }
    Ok((n as f64 / secs, (cpu1 - cpu0).as_secs_f64() * 1e6 / n.max(1) as f64))
}

/// The handshake test on a server of its own: [`handshake_rate`] for 3 s, `runs` times; the
/// medians of the rates and of the CPU per handshake (µs).
pub(crate) async fn handshake_test(
    dir: &Path,
    keys: &HoldfastKeys,
    raw: &Arc<RawKeys>,
    svc: u16,
    runs: usize,
) -> io::Result<(f64, f64)> {
    // One key opens every session here: lift its share of the buffer budget.
    let share = ["--buffer-per-key", "1GiB"];
    let (server, port) = holdfast_server_with(dir, keys, svc, "hs-server.log", &["-q"], &share).await?;
    let mut tool = Tool { name: "hs", entry: loopback(port), children: vec![server], server_pid: None };
    let pid = tool.children[0].id();
    let mut rates = Vec::new();
    let mut cpus = Vec::new();
    for _ in 0..runs {
        let (r, c) = handshake_rate(tool.entry, pid, raw.clone(), Duration::from_secs(3)).await?;
        rates.push(r);
        cpus.push(c);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    tool.kill();
    Ok((median(&rates).unwrap_or(0.0), median(&cpus).unwrap_or(0.0)))
}
