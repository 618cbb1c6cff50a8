//! holdfast only: resume after a reset, through a relay that the benchmark controls.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

use super::metrics::connect;
use super::paths::{holdfast_client, holdfast_server, HoldfastKeys};
use super::procs::{wait_port, Tool};
use super::util::{err, free_port, loopback, pct_us, read_to_string};

/// What the relay and the test share.
#[derive(Default)]
struct RelayState {
    /// Kills the live connection pairs (with RST both ways), by connection number.
    current: Vec<(u64, Arc<Notify>)>,
    /// The number of the next connection.
    next_id: u64,
    /// Set by a reset; taken by the next connection, which measures from it.
    reset_at: Option<Instant>,
    /// Reset to first transport byte from the server on the new connection.
    resumes: Vec<Duration>,
}

/// Accepts connections on `l` and relays each to `server`.
async fn relay(l: TcpListener, server: SocketAddr, st: Arc<Mutex<RelayState>>) {
    loop {
        let Ok((c, _)) = l.accept().await else { continue };
        let st = st.clone();
        tokio::spawn(async move {
            let _ = relay_conn(c, server, st).await;
        });
    }
}

/// Relays one connection both ways until either side ends or the test resets it; times the
/// first resumed byte after a reset.
async fn relay_conn(mut client: TcpStream, server: SocketAddr, st: Arc<Mutex<RelayState>>) -> io::Result<()> {
    let mut upstream = TcpStream::connect(server).await?;
    client.set_nodelay(true)?;
    upstream.set_nodelay(true)?;
    let kill = Arc::new(Notify::new());
    // Measured by the first connection after a reset that carries the session again (a
    // refused attempt, which gets a one-record reject, leaves the measurement to the next).
    let (id, reset_at) = {
        let mut g = st.lock().unwrap();
        let id = g.next_id;
        g.next_id += 1;
        g.current.push((id, kill.clone()));
        (id, g.reset_at)
    };
    {
        let (mut cr, mut cw) = client.split();
        let (mut sr, mut sw) = upstream.split();
        let up = async {
            let mut buf = vec![0u8; 256 << 10];
            loop {
                let n = cr.read(&mut buf).await?;
                if n == 0 {
                    return sw.shutdown().await;
                }
                sw.write_all(&buf[..n]).await?;
            }
        };
        let down = async {
            let mut buf = vec![0u8; 256 << 10];
            // Skip the handshake reply (one record); the next byte is the resumed session's.
            let mut header = Vec::with_capacity(2);
            let mut skip = 0usize;
            let mut pending = reset_at;
            loop {
                let n = sr.read(&mut buf).await?;
                if n == 0 {
                    return cw.shutdown().await;
                }
                if let Some(t0) = pending {
                    let mut i = 0;
                    while i < n {
                        if header.len() < 2 {
                            header.push(buf[i]);
                            i += 1;
                            if header.len() == 2 {
                                skip = u16::from_be_bytes([header[0], header[1]]) as usize;
                            }
                        } else if skip > 0 {
                            let k = skip.min(n - i);
                            skip -= k;
                            i += k;
                        } else {
                            let mut g = st.lock().unwrap();
                            if g.reset_at == Some(t0) {
                                g.resumes.push(t0.elapsed());
                                g.reset_at = None;
                            }
                            pending = None;
                            break;
                        }
                    }
                }
                cw.write_all(&buf[..n]).await?;
            }
        };
        let r = tokio::select! {
            r = up => r,
            r = down => r,
            _ = kill.notified() => Ok(()),
        };
        st.lock().unwrap().current.retain(|(i, _)| *i != id);
        r?;
    }
    client.set_zero_linger()?;
    upstream.set_zero_linger()?;
    Ok(())
}

/// Figures of the resume test.
pub(crate) struct ResumeResult {
    /// Reset to data flowing again, p50.
    pub(crate) p50_ms: f64,
    /// Reset to data flowing again, p99.
    pub(crate) p99_ms: f64,
    /// Resumes measured.
    pub(crate) n: usize,
    /// Detection to resumed, p50, as the client logs it.
    pub(crate) client_p50_ms: Option<f64>,
    /// Bytes replayed per resume (both ways), median.
    pub(crate) replayed_median: Option<u64>,
    /// Bytes replayed over all resumes.
    pub(crate) replayed_total: Option<u64>,
    /// Bytes replayed in one resume, at most.
    pub(crate) replayed_max: Option<u64>,
    /// MiB downloaded over the resets.
    pub(crate) mib_during: f64,
}

/// The value of `key=value` in a log line.
fn log_field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace().find_map(|w| w.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
}

/// A duration as the logs print it ("1.5ms", "20µs").
fn parse_duration(v: &str) -> Option<Duration> {
    let split = v.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (num, unit) = v.split_at(split);
    let n: f64 = num.parse().ok()?;
    let secs = match unit {
        "ns" => n / 1e9,
        "µs" | "us" => n / 1e6,
        "ms" => n / 1e3,
        "s" => n,
        _ => return None,
    };
    Some(Duration::from_secs_f64(secs))
}

/// A download through a relay that the test resets `resets` times: how long until data
/// flows again, and how much was replayed.
pub(crate) async fn resume_test(dir: &Path, keys: &HoldfastKeys, svc: u16, resets: usize) -> io::Result<ResumeResult> {
    let local = free_port();
    let mut tool = Tool::new("holdfast", loopback(local));
    let (server, sport) = holdfast_server(dir, keys, svc, "resume-server.log", &[]).await?;
    tool.children.push(server);
    // The relay gets a thread and a runtime of its own, so that the busy download in this
    // runtime does not delay its clock readings.
    let rl = std::net::TcpListener::bind("127.0.0.1:0")?;
    rl.set_nonblocking(true)?;
    let rport = rl.local_addr()?.port();
    let st = Arc::new(Mutex::new(RelayState::default()));
    let (relay_stop, relay_stopped) = tokio::sync::oneshot::channel::<()>();
    let relay_thread = {
        let st = st.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("relay runtime");
            rt.block_on(async move {
                let Ok(rl) = TcpListener::from_std(rl) else { return };
                tokio::select! {
                    _ = relay(rl, loopback(sport), st) => {}
                    _ = relay_stopped => {}
                }
            });
        })
    };
    tool.children.push(holdfast_client(dir, keys, rport, local, "resume-client.log")?);
    wait_port(tool.entry, &mut tool.children).await?;
    // The probe opened (and closed) a tunnel of its own: let it finish first.
    tokio::time::sleep(Duration::from_millis(500)).await;

    // A download that runs through every reset.
    let mut s = connect(tool.entry).await?;
    let mut req = vec![b'D'];
    req.extend_from_slice(&u64::MAX.to_be_bytes());
    s.write_all(&req).await?;
    let got = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (got, stop) = (got.clone(), stop.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 256 << 10];
            while !stop.load(Ordering::Relaxed) {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        got.fetch_add(n as u64, Ordering::Relaxed);
                    }
                }
            }
        })
    };
    let wait_bytes = |min: u64| {
        let got = got.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            while got.load(Ordering::Relaxed) < min {
                if Instant::now() > deadline {
                    return Err(err("the download stalled"));
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Ok(())
        }
    };
    wait_bytes(16 << 20).await?;
    let start_bytes = got.load(Ordering::Relaxed);
    for i in 0..resets {
        // The server accepts at most 10 resumes a second per session: stay well under.
        tokio::time::sleep(Duration::from_millis(150)).await;
        let before = st.lock().unwrap().resumes.len();
        {
            let mut g = st.lock().unwrap();
            if g.current.is_empty() {
                return Err(err("no relay connection to reset"));
            }
            g.reset_at = Some(Instant::now());
            for (_, kill) in g.current.drain(..) {
                kill.notify_one();
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while st.lock().unwrap().resumes.len() == before {
            if Instant::now() > deadline {
                let log = read_to_string(dir.join("resume-client.log"));
                let tail: Vec<&str> = log.lines().rev().take(3).collect();
                return Err(err(format!("no resume after reset {i}; client log ends: {tail:?}")));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // Data must flow again before the next reset.
        let now = got.load(Ordering::Relaxed);
        wait_bytes(now + (1 << 20)).await?;
    }
    let mib_during = (got.load(Ordering::Relaxed) - start_bytes) as f64 / (1 << 20) as f64;
    stop.store(true, Ordering::Relaxed);
    reader.abort();
    let _ = relay_stop.send(());
    let _ = relay_thread.join();
    tool.kill();

    let mut times = std::mem::take(&mut st.lock().unwrap().resumes);
    times.sort();
    let mut client_after = Vec::new();
    let mut replayed = Vec::new();
    for line in read_to_string(dir.join("resume-client.log")).lines().filter(|l| l.contains("link resumed")) {
        if let Some(d) = log_field(line, "after").and_then(parse_duration) {
            client_after.push(d);
        }
        let sent = log_field(line, "replayed_sent").and_then(|v| v.parse::<u64>().ok());
        let recv = log_field(line, "replayed_received").and_then(|v| v.parse::<u64>().ok());
        if let (Some(a), Some(b)) = (sent, recv) {
            replayed.push(a + b);
        }
    }
    client_after.sort();
    replayed.sort();
    Ok(ResumeResult {
        p50_ms: pct_us(&times, 0.5) / 1e3,
        p99_ms: pct_us(&times, 0.99) / 1e3,
        n: times.len(),
        client_p50_ms: (!client_after.is_empty()).then(|| pct_us(&client_after, 0.5) / 1e3),
        replayed_median: replayed.get(replayed.len() / 2).copied(),
        replayed_total: (!replayed.is_empty()).then(|| replayed.iter().sum()),
        replayed_max: replayed.last().copied(),
        mib_during,
    })
}
