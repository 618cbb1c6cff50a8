//! Shared set-up for integration tests: keys, fast timers, and hashed pattern transfers.

use std::time::Duration;

use holdfast::keys::{AllowList, Keypair, PublicKey};
use holdfast::proto::SessionConfig;
use holdfast::{ClientConfig, LinkEvent, Listener, ServerConfig};
use rand::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::broadcast;

/// Session timers short enough that dead-peer detection happens within a test.
pub fn fast_session() -> SessionConfig {
    SessionConfig {
        keepalive: Duration::from_millis(100),
        dead_after: Duration::from_millis(600),
        ..SessionConfig::default()
    }
}

/// A server on 127.0.0.1:0 that allows one client key, plus that client's configuration.
pub async fn server_and_client() -> (Listener, ClientConfig) {
    let server_keys = Keypair::generate();
    let client_keys = Keypair::generate();
    let server_pub: PublicKey = server_keys.public;
    let allow = AllowList::from_keys([(client_keys.public, Some("test-client".to_string()))]);
    let mut scfg = ServerConfig::new(server_keys, allow);
    scfg.session = fast_session();
    let listener = holdfast::bind("127.0.0.1:0", scfg).await.expect("bind loopback");
    let mut ccfg = ClientConfig::new(client_keys, server_pub);
    ccfg.session = fast_session();
    ccfg.recovery.backoff_initial = Duration::from_millis(10);
    ccfg.recovery.backoff_max = Duration::from_millis(200);
    (listener, ccfg)
}

/// The chunks of a seeded pseudo-random pattern, in uneven sizes (1 byte to 256 KiB).
struct Pattern {
    rng: rand::rngs::StdRng,
    buf: Vec<u8>,
    left: usize,
}

impl Pattern {
    fn new(seed: u64, len: usize) -> Self {
        Pattern { rng: rand::rngs::StdRng::seed_from_u64(seed), buf: vec![0u8; 256 * 1024], left: len }
    }

    fn next_chunk(&mut self) -> Option<&[u8]> {
        if self.left == 0 {
            return None;
        }
        let n = (1 + (self.rng.next_u32() as usize % self.buf.len())).min(self.left);
        self.rng.fill_bytes(&mut self.buf[..n]);
        self.left -= n;
        Some(&self.buf[..n])
    }
}

/// Writes `len` bytes of a seeded pseudo-random pattern in uneven chunks, then shuts down.
/// Returns the SHA-256 of what was written.
pub async fn send_pattern<W: AsyncWrite + Unpin>(w: &mut W, seed: u64, len: usize) -> std::io::Result<[u8; 32]> {
    let mut pattern = Pattern::new(seed, len);
    let mut hash = Sha256::new();
    while let Some(chunk) = pattern.next_chunk() {
        w.write_all(chunk).await?;
        hash.update(chunk);
    }
    w.shutdown().await?;
    Ok(hash.finalize().into())
}

/// The SHA-256 a `send_pattern(seed, len)` produces, without any I/O.
pub fn pattern_hash(seed: u64, len: usize) -> [u8; 32] {
    let mut pattern = Pattern::new(seed, len);
    let mut hash = Sha256::new();
    while let Some(chunk) = pattern.next_chunk() {
        hash.update(chunk);
    }
    hash.finalize().into()
}

/// Reads to EOF, returning the byte count and SHA-256.
pub async fn recv_hash<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<(u64, [u8; 32])> {
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok((total, hash.finalize().into()));
        }
        hash.update(&buf[..n]);
        total += n as u64;
    }
}

/// Waits for the next `Resumed` event, skipping others. `None` on timeout or a `Failed` event.
pub async fn next_resume(events: &mut broadcast::Receiver<LinkEvent>, limit: Duration) -> Option<LinkEvent> {
    tokio::time::timeout(limit, async {
        loop {
            match events.recv().await {
                Ok(ev @ LinkEvent::Resumed { .. }) => return Some(ev),
                Ok(LinkEvent::Failed { .. }) | Err(broadcast::error::RecvError::Closed) => return None,
                _ => {}
            }
        }
    })
    .await
    .ok()
    .flatten()
}
