//! The self-contained demonstration behind `holdfast demo`: a whole tunnel on loopback whose
//! real connection is broken on purpose while data streams both ways, and a report proving
//! that every byte arrived.
//!
//! ```text
//! app ──TCP──▶ forward port ══ holdfast client ──▶ fault relay ──▶ holdfast server ──TCP──▶ service
//! ```
//!
//! The fault relay resets connections (RST) or stalls them silently (the keepalive must notice).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;

use crate::keys::{AllowList, Keypair};
use crate::net::{self, ClientConfig, LinkEvent, ServerConfig};
use crate::proto::SessionConfig;
use crate::tunnel::{self, Services};

/// Demo settings.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Bytes to send in each direction.
    pub bytes: u64,
    /// Faults to inject (at least one is a silent stall).
    pub faults: u32,
    /// Print live progress to stderr.
    pub progress: bool,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions { bytes: 64 << 20, faults: 10, progress: true }
    }
}

/// What the demo measured.
#[derive(Debug, Clone)]
pub struct DemoReport {
    /// Bytes the program sent up, and the service received.
    pub up: (u64, u64),
    /// Bytes the service sent down, and the program received.
    pub down: (u64, u64),
    /// SHA-256 of the upward stream matched end to end.
    pub up_match: bool,
    /// SHA-256 of the downward stream matched end to end.
    pub down_match: bool,
    /// Hex SHA-256 of the upward stream as sent.
    pub up_hash: String,
    /// Hex SHA-256 of the downward stream as sent.
    pub down_hash: String,
    /// Connection resets injected into a live link.
    pub resets: u32,
    /// Silent paths injected into a live link: the old connection stops carrying anything while
    /// new connections work, as when a laptop roams to another network.
    pub stalls: u32,
    /// Faults that found the transfer finished: not injected, or injected as it ended and
    /// followed by no resume.
    pub skipped: u32,
    /// Resumes observed.
    pub resumes: u32,
    /// Time from each reset's injection to data flowing again both ways (detection included).
    pub reset_times: Vec<Duration>,
    /// The same for each silent path.
    pub stall_times: Vec<Duration>,
    /// The timers both ends used: (keepalive, dead-peer time).
    pub timers: (Duration, Duration),
    /// Bytes replayed by the client, by the server.
    pub replayed: (u64, u64),
    /// Wall time of the whole transfer.
    pub elapsed: Duration,
}

impl DemoReport {
    /// True when every byte matched in both directions.
    pub fn ok(&self) -> bool {
        self.up_match && self.down_match && self.up.0 == self.up.1 && self.down.0 == self.down.1
    }
}

/// Demo failures (set-up problems; data mismatches are reported, not errors).
#[derive(Debug, Error)]
pub enum DemoError {
    /// A socket could not be set up.
    #[error("demo set-up failed: {0}")]
    Io(#[from] std::io::Error),
    /// The library failed.
    #[error(transparent)]
    Net(#[from] net::Error),
    /// A fault did not lead to a resume in time.
    #[error("fault {0} was not followed by a resume within 30 s")]
    NoResume(u32),
}

/// A relay that forwards TCP and breaks connections on command.
#[derive(Clone)]
struct FaultRelay {
    addr: SocketAddr,
    forwarded: Arc<AtomicU64>,
    kill: Arc<Notify>,
    stall: Arc<Notify>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl FaultRelay {
    async fn start(target: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let relay = FaultRelay {
            addr: listener.local_addr()?,
            forwarded: Arc::new(AtomicU64::new(0)),
            kill: Arc::new(Notify::new()),
            stall: Arc::new(Notify::new()),
            conns: Arc::new(Mutex::new(Vec::new())),
        };
        let r = relay.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(target).await else { continue };
                let task = tokio::spawn(r.clone().relay(client, server));
                r.conns.lock().unwrap_or_else(|p| p.into_inner()).push(task);
            }
        });
        Ok(relay)
    }

    async fn relay(self, mut a: TcpStream, mut b: TcpStream) {
        let _ = (a.set_nodelay(true), b.set_nodelay(true));
        let stalled = AtomicBool::new(false);
        {
            let (ar, aw) = a.split();
            let (br, bw) = b.split();
            let copy = async {
                tokio::join!(
                    count_copy(ar, bw, &self.forwarded, &stalled),
                    count_copy(br, aw, &self.forwarded, &stalled)
                )
            };
            tokio::select! {
                _ = copy => {}
                _ = self.kill.notified() => {}
                _ = async { self.stall.notified().await; stalled.store(true, Ordering::SeqCst); self.kill.notified().await } => {}
            }
        }
        let _ = a.set_zero_linger();
        let _ = b.set_zero_linger();
    }

    /// Resets every live connection.
    fn reset_all(&self) {
        self.kill.notify_waiters();
    }

    /// Silently stops forwarding on every live connection (until reset).
    fn stall_all(&self) {
        self.stall.notify_waiters();
    }
}

async fn count_copy<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    mut r: R,
    mut w: W,
    count: &AtomicU64,
    stalled: &AtomicBool,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if stalled.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        if w.write_all(&buf[..n]).await.is_err() {
            break;
        }
        count.fetch_add(n as u64, Ordering::Relaxed);
    }
    let _ = w.shutdown().await;
}

/// Writes `len` bytes of a seeded pattern, shuts down, and returns the SHA-256.
async fn send_pattern<W: AsyncWrite + Unpin>(
    mut w: W,
    seed: u64,
    len: u64,
    count: &AtomicU64,
) -> std::io::Result<[u8; 32]> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = len;
    while left > 0 {
        let n = (buf.len() as u64).min(left) as usize;
        rng.fill_bytes(&mut buf[..n]);
        w.write_all(&buf[..n]).await?;
        hash.update(&buf[..n]);
        left -= n as u64;
        count.fetch_add(n as u64, Ordering::Relaxed);
    }
    w.shutdown().await?;
    Ok(hash.finalize().into())
}

/// Reads to EOF, returning the count and SHA-256.
async fn recv_hash<R: AsyncRead + Unpin>(mut r: R, count: &AtomicU64) -> std::io::Result<(u64, [u8; 32])> {
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok((total, hash.finalize().into()));
        }
        hash.update(&buf[..n]);
        total += n as u64;
        count.fetch_add(n as u64, Ordering::Relaxed);
    }
}

fn hex(h: &[u8]) -> String {
    h.iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs the demo.
///
/// # Errors
/// [`DemoError`] if the set-up fails or a fault is not followed by a resume in time.
pub async fn run(opts: DemoOptions) -> Result<DemoReport, DemoError> {
    // The defaults: a silent path is noticed by the suspicion rule (much longer than the round
    // trip without an answer), not by shortened timers.
    let session = SessionConfig::default();
    // The local service: receives the upward stream and sends the downward one.
    let service = TcpListener::bind("127.0.0.1:0").await?;
    let service_addr = service.local_addr()?;
    let counters: Arc<[AtomicU64; 4]> = Arc::new(Default::default()); // up sent, up recv, down sent, down recv
    let c = counters.clone();
    let len = opts.bytes;
    let service_task = tokio::spawn(async move {
        let (sock, _) = service.accept().await?;
        let (r, w) = sock.into_split();
        let (sent, got) = tokio::join!(send_pattern(w, 2, len, &c[2]), recv_hash(r, &c[1]));
        Ok::<_, std::io::Error>((sent?, got?))
    });

    // The holdfast server offering it as service "demo".
    let server_keys = Keypair::generate();
    let client_keys = Keypair::generate();
    let server_pub = server_keys.public;
    let allow = AllowList::from_keys([(client_keys.public, Some("demo-client".into()))]);
    let mut scfg = ServerConfig::new(server_keys, allow);
    scfg.session = session.clone();
    let listener = net::bind("127.0.0.1:0", scfg).await?;
    let relay = FaultRelay::start(listener.local_addr()).await?;
    let mut services = Services::new();
    services.add("demo", &service_addr.to_string()).map_err(std::io::Error::from)?;
    tokio::spawn(tunnel::serve(listener, Arc::new(services)));

    // The holdfast client forwarding a local port through the relay.
    let mut ccfg = ClientConfig::new(client_keys, server_pub);
    ccfg.session = session;
    let local = TcpListener::bind("127.0.0.1:0").await?;
    let local_addr = local.local_addr()?;
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
    tokio::spawn(tunnel::forward(local, relay.addr.to_string(), ccfg, "demo".into(), Some(ev_tx)));

    // The program: an ordinary TCP client of the forward port.
    let start = Instant::now();
    let app = TcpStream::connect(local_addr).await?;
    let _ = app.set_nodelay(true);
    let (r, w) = app.into_split();
    let c = counters.clone();
    let app_task = tokio::spawn(async move {
        let (sent, got) = tokio::join!(send_pattern(w, 1, len, &c[0]), recv_hash(r, &c[3]));
        Ok::<_, std::io::Error>((sent?, got?))
    });

    let mut report = DemoReport {
        up: (0, 0),
        down: (0, 0),
        up_match: false,
        down_match: false,
        up_hash: String::new(),
        down_hash: String::new(),
        resets: 0,
        stalls: 0,
        skipped: 0,
        resumes: 0,
        reset_times: Vec::new(),
        stall_times: Vec::new(),
        timers: (SessionConfig::default().keepalive, SessionConfig::default().dead_after),
        replayed: (0, 0),
        elapsed: Duration::ZERO,
    };
    let progress = |report: &DemoReport| {
        if opts.progress {
            let mib = |v: u64| v as f64 / (1 << 20) as f64;
            eprint!(
                "\r  up {:7.1}/{:.0} MiB   down {:7.1}/{:.0} MiB   faults {:2}   resumes {:2}  ",
                mib(counters[1].load(Ordering::Relaxed)),
                mib(len),
                mib(counters[3].load(Ordering::Relaxed)),
                mib(len),
                report.resets + report.stalls,
                report.resumes
            );
        }
    };
    let on_event = |report: &mut DemoReport, ev: LinkEvent| {
        if let LinkEvent::Resumed { replayed_sent, replayed_received, .. } = ev {
            report.resumes += 1;
            report.replayed.0 += replayed_sent;
            report.replayed.1 += replayed_received;
        }
    };

    // Inject faults spread over the transfer; each waits for the previous resume.
    let total = 2 * len;
    // A fault injected just as the transfer ended, whose resume (if any) came after it.
    let mut late: Option<bool> = None;
    for i in 0..opts.faults {
        let mark = total * u64::from(i + 1) / u64::from(opts.faults + 1);
        while relay.forwarded.load(Ordering::Relaxed) < mark && !app_task.is_finished() {
            tokio::time::sleep(Duration::from_millis(25)).await;
            while let Ok((_, ev)) = ev_rx.try_recv() {
                on_event(&mut report, ev);
            }
            progress(&report);
        }
        if app_task.is_finished() {
            report.skipped = opts.faults - i;
            break;
        }
        let resumes_before = report.resumes;
        let faulted = Instant::now();
        // Every third fault, starting with the first, is a silent path; the others are resets.
        let silent = i % 3 == 0;
        if silent {
            relay.stall_all();
        } else {
            relay.reset_all();
        }
        // A fault that lands as the transfer ends may find no stream left to resume: stop
        // waiting once the program has all its bytes.
        let deadline = Instant::now() + Duration::from_secs(30);
        while report.resumes == resumes_before && !app_task.is_finished() {
            match tokio::time::timeout(Duration::from_millis(2), ev_rx.recv()).await {
                Ok(Some((_, ev))) => on_event(&mut report, ev),
                Ok(None) => return Err(DemoError::NoResume(i + 1)),
                Err(_) if Instant::now() >= deadline => return Err(DemoError::NoResume(i + 1)),
                Err(_) => {}
            }
        }
        if report.resumes == resumes_before {
            report.skipped = opts.faults - i;
            late = Some(silent);
            break;
        }
        // Data flowing again: both directions received more after the resume.
        let (up0, down0) = (counters[1].load(Ordering::Relaxed), counters[3].load(Ordering::Relaxed));
        let flowing = deadline.min(Instant::now() + Duration::from_secs(5));
        while !app_task.is_finished()
            && Instant::now() < flowing
            && (counters[1].load(Ordering::Relaxed) == up0 || counters[3].load(Ordering::Relaxed) == down0)
        {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let took = faulted.elapsed();
        if silent {
            report.stalls += 1;
            report.stall_times.push(took);
        } else {
            report.resets += 1;
            report.reset_times.push(took);
        }
        progress(&report);
    }
    while !app_task.is_finished() {
        tokio::time::sleep(Duration::from_millis(50)).await;
        while let Ok((_, ev)) = ev_rx.try_recv() {
            on_event(&mut report, ev);
        }
        progress(&report);
    }
    let (app_sent, app_got) = app_task.await.map_err(std::io::Error::other)??;
    let (svc_sent, svc_got) = service_task.await.map_err(std::io::Error::other)??;
    while let Ok((_, ev)) = ev_rx.try_recv() {
        on_event(&mut report, ev);
    }
    // The last fault landed as the transfer ended: if a resume followed it, it hit the link
    // (its recovery time is not measured: nothing was left to flow).
    if let Some(silent) = late {
        if report.resumes > report.resets + report.stalls {
            report.skipped -= 1;
            if silent {
                report.stalls += 1;
            } else {
                report.resets += 1;
            }
        }
    }
    progress(&report);
    if opts.progress {
        eprintln!();
    }
    report.elapsed = start.elapsed();
    report.up = (len, svc_got.0);
    report.down = (len, app_got.0);
    report.up_match = app_sent == svc_got.1;
    report.down_match = svc_sent == app_got.1;
    report.up_hash = hex(&app_sent);
    report.down_hash = hex(&svc_sent);
    Ok(report)
}
