//! A chaos TCP proxy for integration tests (loopback only).
//!
//! `ChaosProxy::start(target)` listens on `127.0.0.1:0` and forwards every
//! accepted connection to `target`. Through a cheap-to-clone handle, tests can
//! then reset, stall, cut or corrupt the live connections, refuse new ones, and
//! wait (event-driven, no sleep polling) for connections or forwarded bytes.
//!
//! Each proxied connection is one task running two pumps (one per direction)
//! over 64 KiB buffers. Killing a connection drops that task; the pumps' socket
//! guard then arms `SO_LINGER = 0` and suppresses the FIN that tokio's
//! `OwnedWriteHalf` would send on drop, so both peers see a TCP RST (never a
//! FIN) even when a pump was blocked in a write.
//!
//! Fault counting (`faults_injected`): one per connection reset by `kill_all`,
//! per connection newly stalled, per executed cut, per applied bit flip, per
//! written garbage injection, and per refused connection.
//! Injected garbage does not count towards `bytes_forwarded`.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tokio::task::AbortHandle;

const BUF_SIZE: usize = 64 * 1024;
/// Upper bound on how long a cut waits for its last bytes to leave the socket.
const CUT_DRAIN_LIMIT: Duration = Duration::from_secs(2);

/// Direction of traffic through the proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dir {
    ClientToServer,
    ServerToClient,
}

impl Dir {
    fn idx(self) -> usize {
        match self {
            Dir::ClientToServer => 0,
            Dir::ServerToClient => 1,
        }
    }
}

/// Handle to a running chaos proxy. Clones share the proxy; dropping the last
/// clone (or calling [`ChaosProxy::shutdown`]) stops accepting and resets every
/// live connection.
#[derive(Clone)]
pub struct ChaosProxy {
    inner: Arc<Inner>,
}

struct Inner {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept_task: AbortHandle,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shared.close(&self.accept_task);
    }
}

struct Shared {
    target: Mutex<SocketAddr>,
    refuse: AtomicBool,
    accepted: watch::Sender<u64>,
    bytes: watch::Sender<u64>,
    faults: AtomicU64,
    next_id: AtomicU64,
    registry: Mutex<Registry>,
}

#[derive(Default)]
struct Registry {
    closed: bool,
    conns: HashMap<u64, Arc<Conn>>,
}

#[derive(Default)]
struct DirCtl {
    cut: Option<usize>,
    flip: bool,
    garbage: Vec<u8>,
}

#[derive(Default)]
struct Ctl {
    killed: bool,
    stalled: bool,
    dirs: [DirCtl; 2],
}

/// Per-connection control block shared by the handle and the pumps.
#[derive(Default)]
struct Conn {
    ctl: Mutex<Ctl>,
    /// Wakes the pump of each direction when its control state changed.
    wake: [Notify; 2],
    /// Wakes the connection task to drop everything (single waiter).
    kill: Notify,
    task: Mutex<Option<AbortHandle>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Conn {
    fn ctl(&self) -> MutexGuard<'_, Ctl> {
        lock(&self.ctl)
    }

    fn is_killed(&self) -> bool {
        self.ctl().killed
    }

    /// Marks the connection killed and tears its task down. Returns true if it
    /// was not killed before.
    fn kill(&self) -> bool {
        let fresh = !std::mem::replace(&mut self.ctl().killed, true);
        self.kill.notify_one();
        if let Some(task) = lock(&self.task).as_ref() {
            task.abort();
        }
        fresh
    }

    fn wake(&self, dir: Dir) {
        self.wake[dir.idx()].notify_one();
    }
}

impl Shared {
    fn fault(&self) {
        self.faults.fetch_add(1, Ordering::SeqCst);
    }

    fn live(&self) -> Vec<Arc<Conn>> {
        lock(&self.registry).conns.values().cloned().collect()
    }

    fn kill_all(&self) -> u64 {
        let conns: Vec<_> = lock(&self.registry).conns.drain().map(|(_, c)| c).collect();
        conns.iter().filter(|c| c.kill()).count() as u64
    }

    fn close(&self, accept_task: &AbortHandle) {
        lock(&self.registry).closed = true;
        accept_task.abort();
        self.kill_all();
    }
}

impl ChaosProxy {
    /// Listens on `127.0.0.1:0` and forwards each accepted connection to `target`.
    pub async fn start(target: SocketAddr) -> io::Result<ChaosProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            target: Mutex::new(target),
            refuse: AtomicBool::new(false),
            accepted: watch::Sender::new(0),
            bytes: watch::Sender::new(0),
            faults: AtomicU64::new(0),
            next_id: AtomicU64::new(0),
            registry: Mutex::new(Registry::default()),
        });
        let accept_task = tokio::spawn(accept_loop(listener, shared.clone())).abort_handle();
        Ok(ChaosProxy { inner: Arc::new(Inner { addr, shared, accept_task }) })
    }

    fn shared(&self) -> &Shared {
        &self.inner.shared
    }

    /// The proxy's listening address (connect clients here).
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// The upstream of connections accepted from now on.
    pub fn target(&self) -> SocketAddr {
        *lock(&self.shared().target)
    }

    /// Upstream used for connections accepted from now on.
    pub fn set_target(&self, target: SocketAddr) {
        *lock(&self.shared().target) = target;
    }

    /// Connections accepted so far, including refused ones.
    pub fn connections_accepted(&self) -> u64 {
        *self.shared().accepted.borrow()
    }

    /// Connections currently proxied (or still connecting upstream).
    pub fn live_connections(&self) -> usize {
        lock(&self.shared().registry).conns.len()
    }

    /// Waits until `connections_accepted() >= n`; false on timeout. A counted
    /// connection is already registered, so faults requested afterwards apply
    /// to it (a refused one has already been reset).
    pub async fn wait_for_connections(&self, n: u64, timeout: Duration) -> bool {
        let mut rx = self.shared().accepted.subscribe();
        let done = tokio::time::timeout(timeout, rx.wait_for(|v| *v >= n)).await;
        matches!(done, Ok(Ok(_)))
    }

    /// Waits until `bytes_forwarded() >= total`; false on timeout.
    pub async fn wait_for_bytes(&self, total: u64, timeout: Duration) -> bool {
        let mut rx = self.shared().bytes.subscribe();
        let done = tokio::time::timeout(timeout, rx.wait_for(|v| *v >= total)).await;
        matches!(done, Ok(Ok(_)))
    }

    /// Payload bytes written onward, both directions, all connections.
    pub fn bytes_forwarded(&self) -> u64 {
        *self.shared().bytes.borrow()
    }

    /// Resets (RST, no FIN) both sides of every live connection.
    pub fn kill_all(&self) {
        let n = self.shared().kill_all();
        self.shared().faults.fetch_add(n, Ordering::SeqCst);
    }

    /// Live connections stop reading and forwarding in both directions but stay
    /// open until `kill_all`/drop. New connections are unaffected.
    pub fn stall_all(&self) {
        for conn in self.shared().live() {
            let fresh = !std::mem::replace(&mut conn.ctl().stalled, true);
            if fresh {
                self.shared().fault();
            }
            conn.wake(Dir::ClientToServer);
            conn.wake(Dir::ServerToClient);
        }
    }

    /// On the live connections: forward exactly `n` more bytes in `dir`, then
    /// reset both sides. The reset waits (bounded) until those bytes have left
    /// the proxy's socket, so a reading peer receives all `n`.
    pub fn cut_after(&self, dir: Dir, n: usize) {
        for conn in self.shared().live() {
            conn.ctl().dirs[dir.idx()].cut = Some(n);
            conn.wake(dir);
        }
    }

    /// One-shot: xor 0x01 into the middle byte of the next chunk forwarded in
    /// `dir` on each live connection.
    pub fn flip_bit(&self, dir: Dir) {
        for conn in self.shared().live() {
            conn.ctl().dirs[dir.idx()].flip = true;
        }
    }

    /// One-shot: write `bytes` in `dir` on each live connection, as soon as the
    /// pump is free (idle pumps write it immediately) and before any further
    /// forwarded chunk.
    pub fn inject_garbage(&self, dir: Dir, bytes: Vec<u8>) {
        for conn in self.shared().live() {
            conn.ctl().dirs[dir.idx()].garbage.extend_from_slice(&bytes);
            conn.wake(dir);
        }
    }

    /// While on, newly accepted connections are reset immediately.
    pub fn refuse_new(&self, on: bool) {
        self.shared().refuse.store(on, Ordering::SeqCst);
    }

    pub fn faults_injected(&self) -> u64 {
        self.shared().faults.load(Ordering::SeqCst)
    }

    /// Stops accepting and resets every live connection (also done on drop of
    /// the last handle).
    pub fn shutdown(&self) {
        self.shared().close(&self.inner.accept_task);
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let client = match listener.accept().await {
            Ok((s, _)) => s,
            Err(_) => {
                // e.g. EMFILE: back off instead of spinning.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        // Until the pumps own it, any drop of `client` must be a reset.
        let client = RstOnDrop(Some(client));
        if shared.refuse.load(Ordering::SeqCst) {
            drop(client);
            shared.fault();
        } else {
            let id = shared.next_id.fetch_add(1, Ordering::SeqCst);
            let conn = Arc::new(Conn::default());
            {
                let mut reg = lock(&shared.registry);
                if reg.closed {
                    return;
                }
                reg.conns.insert(id, conn.clone());
            }
            let task = tokio::spawn(run_conn(shared.clone(), conn.clone(), id, client));
            *lock(&conn.task) = Some(task.abort_handle());
        }
        shared.accepted.send_modify(|v| *v += 1);
    }
}

/// Removes the connection from the registry when its task ends or is dropped.
struct Unregister {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for Unregister {
    fn drop(&mut self) {
        lock(&self.shared.registry).conns.remove(&self.id);
    }
}

/// Owns a socket that must be reset (not closed with a FIN) if dropped.
struct RstOnDrop(Option<TcpStream>);

impl Drop for RstOnDrop {
    fn drop(&mut self) {
        if let Some(s) = self.0.take() {
            let _ = s.set_zero_linger();
        }
    }
}

async fn run_conn(shared: Arc<Shared>, conn: Arc<Conn>, id: u64, mut client: RstOnDrop) {
    let _unregister = Unregister { shared: shared.clone(), id };
    let target = *lock(&shared.target);
    let server = tokio::select! {
        biased;
        _ = conn.kill.notified() => return,
        r = TcpStream::connect(target) => match r {
            Ok(s) => s,
            Err(_) => return, // upstream unreachable: reset the client
        },
    };
    // From here on PumpIo decides between a graceful close and a reset.
    let client = client.0.take().expect("client socket present");
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_rd, client_wr) = client.into_split();
    let (server_rd, server_wr) = server.into_split();
    let c2s = PumpIo::new(conn.clone(), client_rd, server_wr);
    let s2c = PumpIo::new(conn.clone(), server_rd, client_wr);
    tokio::select! {
        _ = conn.kill.notified() => {}
        _ = async {
            tokio::join!(
                pump(Dir::ClientToServer, c2s, &shared),
                pump(Dir::ServerToClient, s2c, &shared),
            )
        } => {}
    }
}

/// One pump's sockets. On drop of a killed connection, arms linger(0) on both
/// sockets and skips the write half's shutdown, so closing sends only a RST.
struct PumpIo {
    conn: Arc<Conn>,
    rd: OwnedReadHalf,
    wr: Option<OwnedWriteHalf>,
}

impl PumpIo {
    fn new(conn: Arc<Conn>, rd: OwnedReadHalf, wr: OwnedWriteHalf) -> Self {
        PumpIo { conn, rd, wr: Some(wr) }
    }

    fn wr(&mut self) -> &mut OwnedWriteHalf {
        self.wr.as_mut().expect("write half present until drop")
    }
}

impl Drop for PumpIo {
    fn drop(&mut self) {
        if self.conn.is_killed() {
            let _ = self.rd.as_ref().set_zero_linger();
            if let Some(wr) = self.wr.take() {
                let _ = wr.as_ref().set_zero_linger();
                wr.forget();
            }
        }
    }
}

async fn pump(dir: Dir, mut io: PumpIo, shared: &Shared) {
    let conn = io.conn.clone();
    let d = dir.idx();
    let mut buf = vec![0u8; BUF_SIZE];
    loop {
        // Before reading: pending cut-at-zero, stall, or garbage to inject.
        let (cut_now, stalled, garbage) = {
            let mut c = conn.ctl();
            let (cut_now, stalled) = (c.dirs[d].cut == Some(0), c.stalled);
            let garbage = if stalled { Vec::new() } else { std::mem::take(&mut c.dirs[d].garbage) };
            (cut_now, stalled, garbage)
        };
        if cut_now {
            shared.fault();
            conn.kill();
            return;
        }
        if stalled {
            conn.wake[d].notified().await; // only a kill ends a stall
            continue;
        }
        if !garbage.is_empty() {
            if io.wr().write_all(&garbage).await.is_err() {
                conn.kill();
                return;
            }
            shared.fault();
            continue;
        }
        let n = tokio::select! {
            r = io.rd.read(&mut buf) => r,
            _ = conn.wake[d].notified() => continue,
        };
        let n = match n {
            Ok(0) => {
                // Half-close: propagate the FIN, let the other direction finish.
                let _ = io.wr().shutdown().await;
                return;
            }
            Ok(n) => n,
            Err(_) => {
                conn.kill();
                return;
            }
        };
        // A control change may have raced with the read; re-check.
        let (stalled, garbage, flip, fwd, cut_done) = {
            let mut c = conn.ctl();
            let stalled = c.stalled;
            let dc = &mut c.dirs[d];
            let fwd = dc.cut.map_or(n, |r| r.min(n));
            let cut_done = dc.cut.as_mut().is_some_and(|r| {
                *r -= fwd;
                *r == 0
            });
            let flip = !stalled && fwd > 0 && std::mem::take(&mut dc.flip);
            (stalled, std::mem::take(&mut dc.garbage), flip, fwd, cut_done)
        };
        if stalled {
            // The chunk is swallowed; the connection can only be killed now.
            loop {
                conn.wake[d].notified().await;
            }
        }
        if !garbage.is_empty() {
            if io.wr().write_all(&garbage).await.is_err() {
                conn.kill();
                return;
            }
            shared.fault();
        }
        if flip {
            buf[fwd / 2] ^= 0x01;
            shared.fault();
        }
        if io.wr().write_all(&buf[..fwd]).await.is_err() {
            conn.kill();
            return;
        }
        shared.bytes.send_modify(|v| *v += fwd as u64);
        if cut_done {
            wait_sent(io.wr().as_ref()).await;
            shared.fault();
            conn.kill();
            return;
        }
    }
}

/// Waits (bounded) until everything written to `s` has been transmitted, so a
/// following RST does not discard it. On loopback, transmitted data is already
/// in the peer's receive queue, which a RST does not purge.
async fn wait_sent(s: &TcpStream) {
    // Real time, so a paused tokio clock cannot expire the bound instantly.
    let deadline = std::time::Instant::now() + CUT_DRAIN_LIMIT;
    while unsent_bytes(s).is_some_and(|n| n > 0) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[cfg(target_os = "linux")]
fn unsent_bytes(s: &TcpStream) -> Option<usize> {
    use std::os::fd::AsRawFd;
    use std::os::raw::{c_int, c_ulong};
    extern "C" {
        fn ioctl(fd: c_int, request: c_ulong, ...) -> c_int;
    }
    const SIOCOUTQNSD: c_ulong = 0x894B; // bytes written but not yet sent
    let mut n: c_int = 0;
    // SAFETY: valid open fd for the lifetime of `s`; SIOCOUTQNSD writes one int.
    let rc = unsafe { ioctl(s.as_raw_fd(), SIOCOUTQNSD, &mut n as *mut c_int) };
    (rc == 0).then_some(n.max(0) as usize)
}

#[cfg(not(target_os = "linux"))]
fn unsent_bytes(_s: &TcpStream) -> Option<usize> {
    None
}
