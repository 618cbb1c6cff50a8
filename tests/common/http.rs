//! A tiny HTTP/1.1 server on 127.0.0.1 for transfer tests, and the seeded data it serves.
//!
//! - `GET /` answers with [`Pattern`] `(seed, len)` as the body, with a `Content-Length`.
//! - `PUT` or `POST` reads exactly `Content-Length` body bytes (answering `Expect:
//!   100-continue` first) and answers with the body's SHA-256 in hex.
//!
//! Each answer ends its connection (`Connection: close`). In both directions the server kills
//! the tunnel's connections (through a [`Gate`]) each time another `step` bytes went by.

use std::net::SocketAddr;

use rand::{RngCore as _, SeedableRng as _};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use super::faults::Gate;
use super::procs::hex;

const CHUNK: usize = 64 * 1024;

/// A seeded pseudo-random byte stream of a given length, produced in 64 KiB chunks.
pub struct Pattern {
    rng: rand::rngs::StdRng,
    buf: Vec<u8>,
    left: u64,
}

impl Pattern {
    pub fn new(seed: u64, len: u64) -> Self {
        Pattern { rng: rand::rngs::StdRng::seed_from_u64(seed), buf: vec![0u8; CHUNK], left: len }
    }

    pub fn next_chunk(&mut self) -> Option<&[u8]> {
        let n = self.left.min(CHUNK as u64) as usize;
        if n == 0 {
            return None;
        }
        self.rng.fill_bytes(&mut self.buf[..n]);
        self.left -= n as u64;
        Some(&self.buf[..n])
    }

    /// The SHA-256 of the whole pattern.
    pub fn sha256(seed: u64, len: u64) -> [u8; 32] {
        let mut p = Pattern::new(seed, len);
        let mut h = Sha256::new();
        while let Some(c) = p.next_chunk() {
            h.update(c);
        }
        h.finalize().into()
    }

    /// Writes the pattern to a file; returns its SHA-256.
    pub fn write_file(seed: u64, len: u64, path: &std::path::Path) -> [u8; 32] {
        use std::io::Write as _;
        let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
        let mut p = Pattern::new(seed, len);
        while let Some(c) = p.next_chunk() {
            f.write_all(c).unwrap();
        }
        f.flush().unwrap();
        Pattern::sha256(seed, len)
    }
}

/// A running server; stops accepting on drop.
pub struct HttpServer {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts the server: `GET` serves `Pattern(seed, len)`; `gate` kills once per `step` bytes
/// sent or read.
pub async fn serve(seed: u64, len: u64, gate: Gate, step: u64) -> HttpServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            let gate = gate.clone();
            tokio::spawn(async move {
                match answer(sock, seed, len, &gate, step).await {
                    Err(e) if e.kind() != std::io::ErrorKind::UnexpectedEof => eprintln!("http test server: {e}"),
                    _ => {}
                }
            });
        }
    });
    HttpServer { addr, task }
}

async fn answer(mut sock: TcpStream, seed: u64, len: u64, gate: &Gate, step: u64) -> std::io::Result<()> {
    let (head, mut body) = read_head(&mut sock).await?;
    let mut pacer = gate.pacer(step);
    let lower = head.to_ascii_lowercase();
    let method = head.split(' ').next().unwrap_or_default();
    if method == "GET" {
        let hdr = format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n");
        sock.write_all(hdr.as_bytes()).await?;
        let mut p = Pattern::new(seed, len);
        let mut sent = 0u64;
        while let Some(c) = p.next_chunk() {
            pacer.at(sent).await;
            sock.write_all(c).await?;
            sent += c.len() as u64;
        }
    } else if method == "PUT" || method == "POST" {
        let want: u64 = lower
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| std::io::Error::other("no content-length"))?;
        if lower.contains("expect: 100-continue") {
            sock.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
        }
        body.truncate(want.min(body.len() as u64) as usize);
        let mut hash = Sha256::new();
        let mut got = body.len() as u64;
        hash.update(&body);
        body.resize(CHUNK, 0);
        while got < want {
            pacer.at(got).await;
            let n = sock.read(&mut body[..(want - got).min(CHUNK as u64) as usize]).await?;
            if n == 0 {
                return Err(std::io::Error::other(format!("body ended after {got} of {want} bytes")));
            }
            hash.update(&body[..n]);
            got += n as u64;
        }
        let digest = hex(&hash.finalize());
        let reply = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{digest}", digest.len());
        sock.write_all(reply.as_bytes()).await?;
    } else {
        sock.write_all(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await?;
    }
    sock.shutdown().await
}

/// Reads the request head (up to the blank line, at most 16 KiB); returns it and any body
/// bytes that came with it.
async fn read_head(sock: &mut TcpStream) -> std::io::Result<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            return Ok((head, buf[end + 4..].to_vec()));
        }
        if buf.len() > 16 * 1024 {
            return Err(std::io::Error::other("request head too long"));
        }
        let n = sock.read(&mut tmp).await?;
        if n == 0 && buf.is_empty() {
            // A connection that sends nothing, such as the forward's start-up check.
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "no request"));
        }
        if n == 0 {
            return Err(std::io::Error::other("connection closed before the request head ended"));
        }
        buf.extend_from_slice(&tmp[..n]);
    }
}

/// Runs `cmd` (curl writing the body to stdout) and returns the body's length and SHA-256 in
/// hex; panics, with its stderr, if it does not exit 0.
pub async fn download(what: &str, mut cmd: tokio::process::Command) -> (u64, String) {
    use tokio::io::AsyncReadExt as _;
    let mut p = super::procs::Proc::spawn(what, &mut cmd, super::procs::Out::Piped);
    let mut stdout = p.child.stdout.take().unwrap();
    let (mut hash, mut buf, mut got) = (Sha256::new(), vec![0u8; 64 * 1024], 0u64);
    while let n @ 1.. = stdout.read(&mut buf).await.unwrap() {
        hash.update(&buf[..n]);
        got += n as u64;
    }
    let (status, log) = p.exit().await;
    assert!(status.success(), "{what} exited {status}:\n{log}");
    (got, hex(&hash.finalize()))
}
