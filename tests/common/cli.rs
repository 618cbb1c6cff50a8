//! Driving the `holdfast` binary from tests: child processes owned by guards, bounded waits,
//! synchronisation by log lines, and key files in temp dirs (used by `tests/cli.rs`).
//!
//! Every child process is owned by a [`Proc`] guard that kills and reaps it on drop, every wait
//! is bounded, and synchronisation is by log lines on stderr (the server's actual port comes
//! from its `server ready listen=...` line), never by sleeping.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use holdfast::keys::{self, Keypair};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::time::timeout;

use super::guard::{own_group, Group};
use super::harness::{pattern_hash, recv_hash, send_pattern};

pub const BIN: &str = env!("CARGO_BIN_EXE_holdfast");
/// Bound on any single wait for a process, a log line or a transfer.
pub const LIMIT: Duration = Duration::from_secs(30);
pub const MIB: usize = 1 << 20;
/// Short timers so that dead links are noticed within a test.
pub const FAST: [&str; 4] = ["--keepalive", "200ms", "--dead-after", "1s"];

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("holdfast-cli-{tag}-{}-{n}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Everything the child wrote to stderr so far, and whether it has closed stderr.
#[derive(Default)]
pub struct Log {
    pub text: String,
    pub eof: bool,
}

/// A running `holdfast` process, killed and reaped on drop; stderr is collected as it arrives.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: watch::Receiver<Log>,
    group: Group,
}

impl Proc {
    /// Starts `holdfast ARGS` with stdin and stdout piped or null.
    pub fn spawn(args: &[&str], piped: bool) -> Proc {
        Proc::spawn_via(&[], args, piped)
    }

    /// Like [`Proc::spawn`], run through the command `via` (`["prlimit", "--nofile=N"]`, say):
    /// `via... holdfast ARGS`.
    pub fn spawn_via(via: &[&str], args: &[&str], piped: bool) -> Proc {
        let io = || if piped { Stdio::piped() } else { Stdio::null() };
        let mut cmd = match via.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        cmd.args(args).env_remove("RUST_LOG").stdin(io()).stdout(io()).stderr(Stdio::piped());
        let mut child = own_group(&mut cmd).spawn().expect("start holdfast");
        let group = Group::new(child.id());
        let (tx, log) = watch::channel(Log::default());
        let mut stderr = child.stderr.take().unwrap();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 8192];
            while let Ok(n @ 1..) = stderr.read(&mut buf).await {
                tx.send_modify(|l| l.text.push_str(&String::from_utf8_lossy(&buf[..n])));
            }
            tx.send_modify(|l| l.eof = true);
        });
        Proc { name: args.join(" "), child, log, group }
    }

    pub fn stderr(&self) -> String {
        self.log.borrow().text.clone()
    }

    /// Waits until stderr holds `pat` at least `n` times; panics (showing stderr) if it does
    /// not within the limit or the process closes stderr first. Returns stderr so far.
    pub async fn wait_log(&self, pat: &str, n: usize) -> String {
        let mut rx = self.log.clone();
        let _ = timeout(LIMIT, rx.wait_for(|l| l.text.matches(pat).count() >= n || l.eof)).await;
        let text = self.stderr();
        assert!(text.matches(pat).count() >= n, "`holdfast {}` did not log {pat:?} x{n}; stderr:\n{text}", self.name);
        text
    }

    /// The address logged as `key=ADDR` on the first line containing `line`.
    pub async fn logged_addr(&self, line: &str, key: &str) -> SocketAddr {
        let text = self.wait_log(line, 1).await;
        let l = text.lines().find(|l| l.contains(line)).unwrap();
        let v = l.split_whitespace().find_map(|w| w.strip_prefix(key)).unwrap_or_else(|| panic!("no {key} in {l}"));
        v.parse().unwrap_or_else(|e| panic!("bad address in {l}: {e}"))
    }

    /// Waits (bounded) for the process to exit and close stderr; returns the status and stderr.
    pub async fn exit(&mut self) -> (ExitStatus, String) {
        let status = match timeout(LIMIT, self.child.wait()).await {
            Ok(r) => r.unwrap(),
            Err(_) => panic!("`holdfast {}` did not exit in time; stderr:\n{}", self.name, self.stderr()),
        };
        let mut rx = self.log.clone();
        let _ = timeout(LIMIT, rx.wait_for(|l| l.eof)).await;
        (status, self.stderr())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // The whole group, before the child is reaped (its id cannot be reused meanwhile).
        self.group.kill();
        let _ = self.child.start_kill();
        // Reap it: a killed process exits at once, so this bounded poll ends quickly.
        let deadline = Instant::now() + Duration::from_secs(5);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Runs `holdfast ARGS` to completion with `input` on stdin; returns status, stdout, stderr.
pub async fn run(args: &[&str], input: &[u8]) -> (ExitStatus, Vec<u8>, String) {
    run_within(LIMIT, args, input).await
}

pub async fn run_within(limit: Duration, args: &[&str], input: &[u8]) -> (ExitStatus, Vec<u8>, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(args).env_remove("RUST_LOG").stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = own_group(&mut cmd).spawn().expect("start holdfast");
    let _group = Group::new(child.id());
    let mut child = child;
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let feed = tokio::spawn(async move {
        let _ = stdin.write_all(&input).await;
    });
    let out = match timeout(limit, child.wait_with_output()).await {
        Ok(out) => out.unwrap(),
        Err(_) => panic!("`holdfast {}` did not finish in time", args.join(" ")),
    };
    feed.abort();
    (out.status, out.stdout, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// A tracing log line (`2026-01-01T00:00:00.000000Z  WARN ...`), as opposed to a message.
pub fn is_log_line(line: &str) -> bool {
    line.starts_with(|c: char| c.is_ascii_digit()) && [" INFO ", " WARN ", " ERROR "].iter().any(|l| line.contains(l))
}

/// Asserts a failed run whose stderr ends with one line `holdfast: error: ...` containing every
/// word; anything before it must be log lines.
///
/// Log lines are tolerated because of a race in the library: when the peer closes the session
/// and its TCP connection at once, the client may log a spurious "link lost; resuming" first.
pub fn assert_error(status: ExitStatus, stderr: &str, words: &[&str]) {
    assert!(!status.success(), "expected failure, got {status}; stderr:\n{stderr}");
    let (logs, msg) = stderr.trim_end().rsplit_once('\n').unwrap_or(("", stderr.trim_end()));
    assert!(msg.starts_with("holdfast: error: "), "no one-line error message last:\n{stderr}");
    assert!(logs.lines().all(is_log_line), "more than one message on stderr:\n{stderr}");
    for w in words {
        assert!(msg.to_lowercase().contains(&w.to_lowercase()), "{w:?} missing from: {msg}");
    }
}

/// Key files for a server and a client that it allows, in a temp dir.
pub struct Keys {
    pub dir: TempDir,
    pub server_key: PathBuf,
    pub server_pub: PathBuf,
    pub client_key: PathBuf,
    pub authorized: PathBuf,
}

impl Keys {
    pub fn new(tag: &str) -> Keys {
        let dir = TempDir::new(tag);
        let (server, client) = (Keypair::generate(), Keypair::generate());
        let (server_key, server_pub) = (dir.path("server.key"), dir.path("server.pub"));
        let (client_key, authorized) = (dir.path("client.key"), dir.path("authorized"));
        keys::save_private_key(&server_key, &server.private).unwrap();
        keys::save_public_key(&server_pub, &server.public).unwrap();
        keys::save_private_key(&client_key, &client.private).unwrap();
        std::fs::write(&authorized, format!("# test clients\n{} test-client\n", client.public)).unwrap();
        Keys { dir, server_key, server_pub, client_key, authorized }
    }

    /// Starts a server offering `services` (NAME=HOST:PORT); returns it and its actual address.
    pub async fn server(&self, services: &[String]) -> (Proc, SocketAddr) {
        self.server_with(services, &[]).await
    }

    /// [`Keys::server`], with more arguments.
    pub async fn server_with(&self, services: &[String], more: &[&str]) -> (Proc, SocketAddr) {
        let mut args = vec!["server", "--listen", "127.0.0.1:0", "--key", s(&self.server_key)];
        args.extend(more);
        args.extend(["--authorized", s(&self.authorized)]);
        for svc in services {
            args.extend(["--service", svc.as_str()]);
        }
        args.extend(FAST);
        let p = Proc::spawn(&args, false);
        let addr = p.logged_addr("server ready", "listen=").await;
        (p, addr)
    }

    /// Arguments of `connect` (or, with `--local`, `client`) to `server` for `service`.
    pub fn client_args(&self, cmd: &str, server: SocketAddr, service: &str) -> Vec<String> {
        let mut args: Vec<String> =
            [cmd, "--server", &server.to_string(), "--service", service].map(String::from).into();
        args.extend(["--server-key", s(&self.server_pub), "--key", s(&self.client_key)].map(String::from));
        args.extend(FAST.map(String::from));
        args
    }
}

pub fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// A TCP echo service on loopback (each connection echoed until EOF, then half-closed).
pub async fn echo_service() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = sock.into_split();
                if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                    let _ = w.shutdown().await;
                }
            });
        }
    });
    addr
}

/// A loopback address with nothing listening on it (bound by the OS, then released).
pub fn closed_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// Sends `len` pattern bytes on a new connection to `addr` and checks the echo by SHA-256.
pub async fn echo_roundtrip(addr: SocketAddr, seed: u64, len: usize) {
    let sock = TcpStream::connect(addr).await.unwrap();
    let (mut r, mut w) = sock.into_split();
    let send = tokio::spawn(async move { send_pattern(&mut w, seed, len).await.unwrap() });
    let (n, got) = timeout(LIMIT, recv_hash(&mut r)).await.expect("echo transfer timed out").unwrap();
    assert_eq!(send.await.unwrap(), pattern_hash(seed, len));
    assert_eq!((n, got), (len as u64, pattern_hash(seed, len)), "echoed bytes differ (seed {seed})");
}
