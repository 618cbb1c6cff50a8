//! `holdfast connect` clients streaming through a tunnel to an echo service, each checking by
//! SHA-256 that what comes back is what it sent (the fleet and upgrade tests).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use rand::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

use super::faults::Gate;
use super::procs::{tail, Out, Proc, LIMIT};
use super::tunnel::{BIN, FAST, GIVE_UP};

pub const KIB: usize = 1 << 10;

/// `len` seeded pseudo-random bytes, and their SHA-256.
pub fn pattern(seed: u64, len: usize) -> (Vec<u8>, [u8; 32]) {
    let mut v = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    let hash = Sha256::digest(&v).into();
    (v, hash)
}

/// One `holdfast connect` to the service `echo` of the server at `server`.
pub struct Client {
    pub proc: Proc,
    pub stdin: Option<tokio::process::ChildStdin>,
    pub stdout: tokio::process::ChildStdout,
}

impl Client {
    pub fn start(i: usize, server: SocketAddr, server_pub: &str, key: &str) -> Client {
        let mut cmd = Command::new(BIN);
        cmd.args(["connect", "--server", &server.to_string(), "--service", "echo"]);
        cmd.args(["--server-key", server_pub, "--key", key]).args(FAST).args(GIVE_UP).env_remove("RUST_LOG");
        let mut proc = Proc::spawn(&format!("holdfast connect {i}"), &mut cmd, Out::Piped);
        let stdin = proc.child.stdin.take();
        let stdout = proc.child.stdout.take().unwrap();
        Client { proc, stdin, stdout }
    }

    /// Sends `data` and reads its echo, concurrently; returns the SHA-256 of what came back.
    /// Each `pace` bytes sent (if given), the links are killed; every byte received is added
    /// to `progress` (if given).
    pub async fn exchange(
        &mut self,
        data: &[u8],
        pace: Option<(&Gate, usize)>,
        progress: Option<&AtomicU64>,
    ) -> std::io::Result<[u8; 32]> {
        let (Some(stdin), stdout) = (self.stdin.as_mut(), &mut self.stdout) else {
            return Err(std::io::ErrorKind::BrokenPipe.into());
        };
        let send = async {
            let mut next = pace.map_or(usize::MAX, |(_, step)| step);
            for (n, chunk) in data.chunks(16 * KIB).enumerate() {
                stdin.write_all(chunk).await?;
                if (n + 1) * 16 * KIB >= next {
                    if let Some((gate, step)) = pace {
                        gate.kill_now().await;
                        next += step;
                    }
                }
            }
            stdin.flush().await
        };
        let recv = async {
            let mut hash = Sha256::new();
            let mut buf = vec![0u8; 64 * KIB];
            let mut left = data.len();
            while left > 0 {
                let n = stdout.read(&mut buf[..left.min(64 * KIB)]).await?;
                if n == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                hash.update(&buf[..n]);
                left -= n;
                if let Some(p) = progress {
                    p.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
            Ok::<_, std::io::Error>(hash.finalize().into())
        };
        let (sent, got) = tokio::join!(send, recv);
        sent?;
        got
    }

    /// Ends the stream (EOF on connect's stdin) and waits for connect to exit.
    pub async fn close(mut self) -> (std::process::ExitStatus, String) {
        drop(self.stdin.take());
        let mut rest = Vec::new();
        let _ = self.stdout.read_to_end(&mut rest).await;
        self.proc.exit().await
    }
}

/// What a client's exchange task returns: the client, the SHA-256 sent, the one echoed back.
pub type Exchanged = (Client, [u8; 32], std::io::Result<[u8; 32]>);

/// Waits (bounded) for every exchange task and checks each echo; returns the clients in order.
pub async fn collect(tasks: Vec<tokio::task::JoinHandle<Exchanged>>, what: &str) -> Vec<Client> {
    try_collect(tasks, what).await.unwrap_or_else(|e| panic!("{e}"))
}

/// [`collect`], with the first failure returned (the client's log included) instead of a panic,
/// so that the caller can add the servers' logs.
pub async fn try_collect(tasks: Vec<tokio::task::JoinHandle<Exchanged>>, what: &str) -> Result<Vec<Client>, String> {
    let mut clients = Vec::with_capacity(tasks.len());
    for (i, task) in tasks.into_iter().enumerate() {
        let Ok(joined) = tokio::time::timeout(LIMIT * 3, task).await else {
            return Err(format!("{what} did not finish"));
        };
        let (c, want, got) = joined.map_err(|e| format!("client {i}'s task failed: {e}"))?;
        match got {
            Ok(h) if h == want => {}
            Ok(_) => return Err(format!("client {i}: the echo differs")),
            Err(e) => return Err(format!("client {i} failed ({e}); its log:\n{}", tail(&c.proc.log(), 30))),
        }
        clients.push(c);
    }
    Ok(clients)
}
