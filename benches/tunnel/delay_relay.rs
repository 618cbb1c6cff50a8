//! A relay that delays every byte by a fixed time each way, in userspace (no `tc`): what a
//! client on a far network sees of its server. It keeps the order and loses nothing.
//!
//! A userspace relay completes the client's TCP handshake at once, where a real path takes a
//! round trip. The relay puts that round trip back: it connects to the server one delay after
//! it accepted (the SYN's way there), and holds the client's bytes as if the client's
//! `connect()` had returned one round trip after it was made. So a connection's first byte
//! reaches the server 1.5 round trips after the client's `connect()`, as on a real path.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::util::loopback;

/// Chunks in flight each way on one connection (bounded: a reader stops when they are queued).
const QUEUE: usize = 256;

/// Relays running on a thread of their own (so that the measuring runtime's work does not move
/// their clock), until dropped.
pub(crate) struct DelayRelays {
    /// Ends the relays' runtime.
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    /// The relays' thread.
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DelayRelays {
    /// One relay per upstream address, each delaying by `delay` each way: the ports they listen
    /// on (127.0.0.1), in the same order.
    pub(crate) fn start(upstreams: &[SocketAddr], delay: Duration) -> io::Result<(Self, Vec<u16>)> {
        let mut listeners = Vec::new();
        let mut ports = Vec::new();
        for up in upstreams {
            let l = std::net::TcpListener::bind(loopback(0))?;
            l.set_nonblocking(true)?;
            ports.push(l.local_addr()?.port());
            listeners.push((l, *up));
        }
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            rt.block_on(async move {
                let mut all = tokio::task::JoinSet::new();
                for (l, up) in listeners {
                    let Ok(l) = TcpListener::from_std(l) else { return };
                    all.spawn(relay(l, up, delay));
                }
                // Ends on stop or when the handle is dropped; the runtime's drop ends every
                // connection still relayed.
                let _ = stopped.await;
            });
        });
        Ok((DelayRelays { stop: Some(stop), thread: Some(thread) }, ports))
    }
}

impl Drop for DelayRelays {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Accepts connections on `l` and relays each to `up`, `delay` each way.
async fn relay(l: TcpListener, up: SocketAddr, delay: Duration) {
    loop {
        let Ok((c, _)) = l.accept().await else { continue };
        tokio::spawn(async move {
            let _ = relay_conn(c, up, delay).await;
        });
    }
}

/// One connection, accepted at `now`: bytes from the client leave one delay after the later of
/// their arrival and the moment its `connect()` would have returned (a round trip after the
/// accept); bytes from the server one delay after their arrival.
async fn relay_conn(client: TcpStream, up: SocketAddr, delay: Duration) -> io::Result<()> {
    let accepted = Instant::now();
    client.set_nodelay(true)?;
    let (cr, cw) = client.into_split();
    let (to_server, from_client) = mpsc::channel(QUEUE);
    let connected_at = accepted + 2 * delay;
    let read_client = pump_in(cr, to_server, move |t| t.max(connected_at) + delay);
    let rest = async {
        // The SYN's way to the server.
        tokio::time::sleep_until(accepted + delay).await;
        let server = TcpStream::connect(up).await?;
        server.set_nodelay(true)?;
        let (sr, sw) = server.into_split();
        let (to_client, from_server) = mpsc::channel(QUEUE);
        tokio::try_join!(
            pump_out(from_client, sw),
            pump_in(sr, to_client, move |t| t + delay),
            pump_out(from_server, cw)
        )?;
        Ok::<_, io::Error>(())
    };
    tokio::try_join!(read_client, rest)?;
    Ok(())
}

/// A chunk to write at a time, or the end of the stream (`None`).
type Timed = (Instant, Option<Vec<u8>>);

/// Reads `r` into timed chunks, each to leave at `due(arrival)`, then the end of the stream.
async fn pump_in(mut r: OwnedReadHalf, tx: mpsc::Sender<Timed>, due: impl Fn(Instant) -> Instant) -> io::Result<()> {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = r.read(&mut buf).await?;
        let at = due(Instant::now());
        let chunk = (n > 0).then(|| buf[..n].to_vec());
        if tx.send((at, chunk)).await.is_err() || n == 0 {
            return Ok(());
        }
    }
}

/// Writes each chunk to `w` when it is due, in order; shuts `w` down at the end of the stream.
async fn pump_out(mut rx: mpsc::Receiver<Timed>, mut w: OwnedWriteHalf) -> io::Result<()> {
    while let Some((at, chunk)) = rx.recv().await {
        tokio::time::sleep_until(at).await;
        match chunk {
            Some(c) => w.write_all(&c).await?,
            None => return w.shutdown().await,
        }
    }
    Ok(())
}
