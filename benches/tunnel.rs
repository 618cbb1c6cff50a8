//! Side-by-side tunnel benchmarks on loopback, all in one run: direct TCP, holdfast (the real
//! release binary: `holdfast client` forward -> `holdfast server` -> a local service), a plain
//! two-hop relay without encryption (two `socat -b 262144` hops), stunnel (TLS 1.3,
//! ChaCha20-Poly1305), spiped and `ssh -L` (chacha20-poly1305@openssh.com). A tool that is not
//! installed is reported as skipped.
//!
//! ```text
//! cargo bench --bench tunnel
//! ```
//!
//! Environment (all optional):
//! - `HOLDFAST_BENCH_RUNS` rounds per metric (default 5); figures are medians over rounds, and
//!   every round measures every path back to back so that they share the machine's load.
//! - `HOLDFAST_BENCH_MIB` MiB per bulk transfer (default 256).
//! - `HOLDFAST_BENCH_PATHS` comma list among `direct,holdfast,holdfast-nomux,holdfast-chacha,socat,stunnel,spiped,ssh`
//!   (`holdfast-nomux` opens a session per connection, as before multiplexing; `holdfast-chacha` is holdfast with `--cipher chacha20-poly1305`, the cipher of the stunnel
//!   path; plain `holdfast` uses the default, AES-256-GCM on CPUs with AES instructions).
//! - `HOLDFAST_BENCH_METRICS` comma list among `tput,rtt,stdio,conn,streams,resume,hs,mem` (default all;
//!   `streams` is 8 concurrent downloads and one beside a stalled stream; `stdio` is the RTT through `holdfast connect`'s pipes, measured in the same rounds).
//! - `HOLDFAST_BENCH_RESETS` resets in the resume test (default 60).
//! - `HOLDFAST_BENCH_SESSIONS` idle sessions in the memory test (default 1000).
//!
//! See BENCHMARKS.md for the method and the results.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use holdfast::keys::{load_private_key, load_public_key, PrivateKey, PublicKey};
use holdfast::proto::frame::{push_record, split_record};
use holdfast::proto::{ClientHandshake, CloseCode, Frame, Transport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{watch, Notify, Semaphore};

#[path = "tunnel/stdio.rs"]
mod stdio;
#[path = "tunnel/streams.rs"]
mod streams;

const BIN: &str = env!("CARGO_BIN_EXE_holdfast");
const SERVICE_NAME: &str = "bench";
/// Payload of the request/response test.
const MSG: usize = 64;

// ---------------------------------------------------------------------------------------------
// Configuration and small helpers

struct Opts {
    runs: usize,
    bytes: u64,
    paths: Vec<String>,
    metrics: Vec<String>,
    resets: usize,
    sessions: usize,
    rtt_samples: usize,
    conn_samples: usize,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn env_list(name: &str, default: &str) -> Vec<String> {
    std::env::var(name).unwrap_or_else(|_| default.to_string()).split(',').map(|s| s.trim().to_string()).collect()
}

impl Opts {
    fn from_env() -> Self {
        Opts {
            runs: env_or("HOLDFAST_BENCH_RUNS", 5usize).max(1),
            bytes: env_or("HOLDFAST_BENCH_MIB", 256u64).max(1) << 20,
            paths: env_list(
                "HOLDFAST_BENCH_PATHS",
                "direct,holdfast,holdfast-nomux,holdfast-chacha,socat,stunnel,spiped,ssh",
            ),
            metrics: env_list("HOLDFAST_BENCH_METRICS", "tput,rtt,conn,streams,resume,hs,mem"),
            resets: env_or("HOLDFAST_BENCH_RESETS", 60usize).max(1),
            sessions: env_or("HOLDFAST_BENCH_SESSIONS", 1000usize).max(1),
            rtt_samples: env_or("HOLDFAST_BENCH_RTT", 5000usize).max(100),
            conn_samples: env_or("HOLDFAST_BENCH_CONN", 50usize).max(10),
        }
    }

    fn metric(&self, m: &str) -> bool {
        self.metrics.iter().any(|x| x == m)
    }
}

fn err(msg: impl Into<String>) -> io::Error {
    io::Error::other(msg.into())
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(0)
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    Some(s[s.len() / 2])
}

/// Nearest-rank percentile of durations, in microseconds.
fn pct_us(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1].as_secs_f64() * 1e6
}

fn gbit(bytes: u64, d: Duration) -> f64 {
    bytes as f64 * 8.0 / d.as_secs_f64() / 1e9
}

fn read_to_string(p: impl AsRef<Path>) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

fn vm_rss_kib(pid: u32) -> Option<u64> {
    read_to_string(format!("/proc/{pid}/status"))
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// User plus system CPU time of a process.
fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = read_to_string(format!("/proc/{pid}/stat"));
    let after = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields after the command: state is index 0, utime is field 14 overall (index 11 here).
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    let hz: u64 = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100);
    Some(Duration::from_secs_f64(ticks as f64 / hz as f64))
}

fn loadavg() -> String {
    read_to_string("/proc/loadavg").split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

// ---------------------------------------------------------------------------------------------
// Child processes

/// A started tool: its processes (each in its own process group) and the port to connect to.
struct Tool {
    name: &'static str,
    entry: SocketAddr,
    children: Vec<Child>,
    /// The process whose memory and CPU are the "server" figures.
    server_pid: Option<u32>,
}

impl Tool {
    fn kill(&mut self) {
        // Clients first (ssh before sshd). Each child by its own pid, never a group or a name:
        // forked helpers (socat's, sshd's) end with their connections.
        for c in self.children.iter_mut().rev() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.children.clear();
    }
}

impl Drop for Tool {
    fn drop(&mut self) {
        self.kill();
    }
}

fn spawn(dir: &Path, log: &str, program: impl AsRef<std::ffi::OsStr>, args: &[String]) -> io::Result<Child> {
    use std::os::unix::process::CommandExt;
    let out = std::fs::File::create(dir.join(log))?;
    Command::new(program).args(args).stdin(Stdio::null()).stdout(out.try_clone()?).stderr(out).process_group(0).spawn()
}

async fn wait_port(addr: SocketAddr, child: &mut [Child]) -> io::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        for c in child.iter_mut() {
            if let Ok(Some(st)) = c.try_wait() {
                return Err(err(format!("process exited early ({st})")));
            }
        }
        if Instant::now() > deadline {
            return Err(err(format!("nothing listening on {addr} after 15 s")));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

enum Setup {
    Ready(Tool),
    Skipped(String),
    Failed(String),
}

fn s(v: &str) -> String {
    v.to_string()
}

// ---------------------------------------------------------------------------------------------
// Path set-ups

struct HoldfastKeys {
    server_key: PathBuf,
    server_pub: PathBuf,
    client_key: PathBuf,
    authorized: PathBuf,
}

fn holdfast_keys(dir: &Path) -> io::Result<HoldfastKeys> {
    for name in ["hf-server", "hf-client"] {
        let st = Command::new(BIN)
            .args(["keygen", "--out"])
            .arg(dir.join(name))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?;
        if !st.success() {
            return Err(err("holdfast keygen failed"));
        }
    }
    let authorized = dir.join("hf-authorized");
    std::fs::write(&authorized, format!("{} bench\n", read_to_string(dir.join("hf-client.pub")).trim()))?;
    Ok(HoldfastKeys {
        server_key: dir.join("hf-server.key"),
        server_pub: dir.join("hf-server.pub"),
        client_key: dir.join("hf-client.key"),
        authorized,
    })
}

/// Starts `holdfast server` on a free port with `extra` arguments; returns it and its port.
async fn holdfast_server(
    dir: &Path,
    keys: &HoldfastKeys,
    svc: u16,
    log: &str,
    pre: &[&str],
) -> io::Result<(Child, u16)> {
    holdfast_server_with(dir, keys, svc, log, pre, &[]).await
}

/// Like [`holdfast_server`], with `pre` arguments before the subcommand and `post` after it.
async fn holdfast_server_with(
    dir: &Path,
    keys: &HoldfastKeys,
    svc: u16,
    log: &str,
    pre: &[&str],
    post: &[&str],
) -> io::Result<(Child, u16)> {
    let port = free_port();
    let mut args: Vec<String> = pre.iter().map(|a| s(a)).collect();
    args.extend([
        s("server"),
        s("--listen"),
        format!("127.0.0.1:{port}"),
        s("--key"),
        keys.server_key.display().to_string(),
        s("--authorized"),
        keys.authorized.display().to_string(),
        s("--service"),
        format!("{SERVICE_NAME}=127.0.0.1:{svc}"),
    ]);
    args.extend(post.iter().map(|a| s(a)));
    let mut child = spawn(dir, log, BIN, &args)?;
    // A bare TCP probe: the server drops it silently during the handshake phase.
    wait_port(loopback(port), std::slice::from_mut(&mut child)).await?;
    Ok((child, port))
}

fn holdfast_client(dir: &Path, keys: &HoldfastKeys, server: u16, local: u16, log: &str) -> io::Result<Child> {
    holdfast_client_with(dir, keys, server, local, log, &[])
}

fn holdfast_client_with(
    dir: &Path,
    keys: &HoldfastKeys,
    server: u16,
    local: u16,
    log: &str,
    extra: &[&str],
) -> io::Result<Child> {
    let mut args = vec![
        s("client"),
        s("--server"),
        format!("127.0.0.1:{server}"),
        s("--server-key"),
        keys.server_pub.display().to_string(),
        s("--key"),
        keys.client_key.display().to_string(),
        s("--local"),
        format!("127.0.0.1:{local}"),
        s("--service"),
        s(SERVICE_NAME),
        s("--no-check"),
    ];
    args.extend(extra.iter().map(|a| s(a)));
    spawn(dir, log, BIN, &args)
}

/// The holdfast path: `name` is how it is reported, `client_extra` extra client arguments (the
/// `holdfast-chacha` path forces ChaCha20-Poly1305, the cipher stunnel uses here).
async fn setup_holdfast(dir: &Path, keys: &HoldfastKeys, svc: u16, name: &'static str, client_extra: &[&str]) -> Setup {
    let run = async {
        let (server, sport) = holdfast_server(dir, keys, svc, &format!("{name}-server.log"), &[]).await?;
        let server_pid = server.id();
        let local = free_port();
        let client = holdfast_client_with(dir, keys, sport, local, &format!("{name}-client.log"), client_extra)?;
        let mut children = vec![server, client];
        wait_port(loopback(local), &mut children).await?;
        Ok::<_, io::Error>(Tool { name, entry: loopback(local), children, server_pid: Some(server_pid) })
    };
    match run.await {
        Ok(t) => Setup::Ready(t),
        Err(e) => Setup::Failed(format!("holdfast: {e}")),
    }
}

async fn setup_socat(dir: &Path, svc: u16) -> Setup {
    let Some(socat) = which("socat") else { return Setup::Skipped(s("socat not installed")) };
    let (entry, mid) = (free_port(), free_port());
    let hop = |listen: u16, to: u16| {
        vec![
            s("-b"),
            s("262144"),
            format!("TCP-LISTEN:{listen},bind=127.0.0.1,reuseaddr,fork,nodelay"),
            format!("TCP:127.0.0.1:{to},nodelay"),
        ]
    };
    let run = async {
        let second = spawn(dir, "socat-2.log", &socat, &hop(mid, svc))?;
        let first = spawn(dir, "socat-1.log", &socat, &hop(entry, mid))?;
        let mut children = vec![second, first];
        wait_port(loopback(entry), &mut children).await?;
        let server_pid = children[0].id();
        Ok::<_, io::Error>(Tool { name: "socat relay", entry: loopback(entry), children, server_pid: Some(server_pid) })
    };
    match run.await {
        Ok(t) => Setup::Ready(t),
        Err(e) => Setup::Failed(format!("socat: {e}")),
    }
}

async fn setup_stunnel(dir: &Path, svc: u16) -> Setup {
    let Some(stunnel) = which("stunnel4").or_else(|| which("stunnel")) else {
        return Setup::Skipped(s("stunnel not installed (Debian: stunnel4)"));
    };
    let Some(openssl) = which("openssl") else { return Setup::Skipped(s("openssl not installed (for the cert)")) };
    let (cert, key) = (dir.join("stunnel-cert.pem"), dir.join("stunnel-key.pem"));
    let ok = Command::new(openssl)
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
        .args(["-subj", "/CN=localhost", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        return Setup::Failed(s("stunnel: openssl could not make a certificate"));
    }
    let (entry, mid) = (free_port(), free_port());
    let common = "foreground = yes\npid =\ndebug = 3\nsocket = l:TCP_NODELAY=1\nsocket = r:TCP_NODELAY=1\n";
    let tls = "sslVersionMin = TLSv1.3\nsslVersionMax = TLSv1.3\nciphersuites = TLS_CHACHA20_POLY1305_SHA256\n";
    let server_conf = format!(
        "{common}[bench]\naccept = 127.0.0.1:{mid}\nconnect = 127.0.0.1:{svc}\ncert = {}\nkey = {}\n{tls}",
        cert.display(),
        key.display()
    );
    let client_conf = format!(
        "{common}[bench]\nclient = yes\naccept = 127.0.0.1:{entry}\nconnect = 127.0.0.1:{mid}\n\
         verifyPeer = yes\nCAfile = {}\n{tls}",
        cert.display()
    );
    let run = async {
        std::fs::write(dir.join("stunnel-server.conf"), server_conf)?;
        std::fs::write(dir.join("stunnel-client.conf"), client_conf)?;
        let server =
            spawn(dir, "stunnel-server.log", &stunnel, &[dir.join("stunnel-server.conf").display().to_string()])?;
        let client =
            spawn(dir, "stunnel-client.log", &stunnel, &[dir.join("stunnel-client.conf").display().to_string()])?;
        let server_pid = server.id();
        let mut children = vec![server, client];
        wait_port(loopback(mid), &mut children).await?;
        wait_port(loopback(entry), &mut children).await?;
        Ok::<_, io::Error>(Tool { name: "stunnel", entry: loopback(entry), children, server_pid: Some(server_pid) })
    };
    match run.await {
        Ok(t) => Setup::Ready(t),
        Err(e) => Setup::Failed(format!("stunnel: {e}")),
    }
}

async fn setup_spiped(dir: &Path, svc: u16) -> Setup {
    let Some(spiped) = which("spiped") else { return Setup::Skipped(s("spiped not installed")) };
    let key = dir.join("spiped.key");
    let secret: [u8; 32] = rand::random();
    if std::fs::write(&key, secret).is_err() {
        return Setup::Failed(s("spiped: cannot write key"));
    }
    let (entry, mid) = (free_port(), free_port());
    let pipe = |mode: &str, from: u16, to: u16| {
        vec![
            s("-F"),
            s(mode),
            s("-s"),
            format!("[127.0.0.1]:{from}"),
            s("-t"),
            format!("[127.0.0.1]:{to}"),
            s("-k"),
            key.display().to_string(),
            s("-n"),
            s("2000"),
        ]
    };
    let run = async {
        let server = spawn(dir, "spiped-d.log", &spiped, &pipe("-d", mid, svc))?;
        let client = spawn(dir, "spiped-e.log", &spiped, &pipe("-e", entry, mid))?;
        let server_pid = server.id();
        let mut children = vec![server, client];
        wait_port(loopback(entry), &mut children).await?;
        Ok::<_, io::Error>(Tool { name: "spiped", entry: loopback(entry), children, server_pid: Some(server_pid) })
    };
    match run.await {
        Ok(t) => Setup::Ready(t),
        Err(e) => Setup::Failed(format!("spiped: {e}")),
    }
}

async fn setup_ssh(dir: &Path, svc: u16) -> Setup {
    let (Some(sshd), Some(ssh), Some(keygen)) = (which("sshd"), which("ssh"), which("ssh-keygen")) else {
        return Setup::Skipped(s("OpenSSH not installed (Debian: openssh-server openssh-client)"));
    };
    let user = Command::new("id")
        .arg("-un")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| s("root"));
    let (host_key, user_key) = (dir.join("ssh-host"), dir.join("ssh-user"));
    for k in [&host_key, &user_key] {
        let ok = Command::new(&keygen)
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(k)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return Setup::Failed(s("ssh: ssh-keygen failed"));
        }
    }
    // sshd insists on its privilege-separation directory.
    let _ = std::fs::create_dir_all("/run/sshd");
    let (entry, port) = (free_port(), free_port());
    let conf = format!(
        "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\nPidFile none\nUsePAM no\n\
         StrictModes no\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n\
         KbdInteractiveAuthentication no\nCiphers chacha20-poly1305@openssh.com\nAllowTcpForwarding yes\n\
         LogLevel ERROR\nMaxStartups 100:30:200\nMaxSessions 100\n",
        host_key.display(),
        dir.join("ssh-authorized").display()
    );
    let run = async {
        std::fs::copy(user_key.with_extension("pub"), dir.join("ssh-authorized"))?;
        std::fs::write(dir.join("sshd.conf"), conf)?;
        let server =
            spawn(dir, "sshd.log", &sshd, &[s("-D"), s("-e"), s("-f"), dir.join("sshd.conf").display().to_string()])?;
        let server_pid = server.id();
        let mut children = vec![server];
        wait_port(loopback(port), &mut children).await?;
        let args = vec![
            s("-F"),
            s("/dev/null"),
            s("-N"),
            s("-T"),
            s("-L"),
            format!("127.0.0.1:{entry}:127.0.0.1:{svc}"),
            s("-p"),
            port.to_string(),
            s("-i"),
            user_key.display().to_string(),
            s("-o"),
            s("StrictHostKeyChecking=no"),
            s("-o"),
            s("UserKnownHostsFile=/dev/null"),
            s("-o"),
            s("Ciphers=chacha20-poly1305@openssh.com"),
            s("-o"),
            s("BatchMode=yes"),
            s("-o"),
            s("ExitOnForwardFailure=yes"),
            s("-o"),
            s("LogLevel=ERROR"),
            format!("{user}@127.0.0.1"),
        ];
        children.push(spawn(dir, "ssh.log", &ssh, &args)?);
        wait_port(loopback(entry), &mut children).await?;
        Ok::<_, io::Error>(Tool { name: "ssh -L", entry: loopback(entry), children, server_pid: Some(server_pid) })
    };
    match run.await {
        Ok(t) => Setup::Ready(t),
        Err(e) => Setup::Failed(format!("ssh: {e} (see {})", dir.join("sshd.log").display())),
    }
}

// ---------------------------------------------------------------------------------------------
// The service behind every path. The first byte picks the mode:
// 'U' sink (reads to EOF, then answers one byte), 'D' + u64 source (writes that many bytes),
// 'E' echo, 'H' hold (reads to EOF, never answers).

async fn service(l: TcpListener) {
    loop {
        let Ok((s, _)) = l.accept().await else { continue };
        let _ = s.set_nodelay(true);
        tokio::spawn(async move {
            let _ = serve(s).await;
        });
    }
}

async fn serve(mut s: TcpStream) -> io::Result<()> {
    match s.read_u8().await? {
        b'U' => {
            let mut buf = vec![0u8; 256 << 10];
            while s.read(&mut buf).await? > 0 {}
            s.write_all(b"k").await?;
        }
        b'D' => {
            let mut left = s.read_u64().await?;
            let buf = vec![0x5au8; 256 << 10];
            while left > 0 {
                let n = (left as usize).min(buf.len());
                s.write_all(&buf[..n]).await?;
                left -= n as u64;
            }
            s.shutdown().await?;
        }
        b'E' => {
            let mut buf = vec![0u8; 16 << 10];
            loop {
                let n = s.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                s.write_all(&buf[..n]).await?;
            }
        }
        _ => {
            let mut buf = [0u8; 256];
            while s.read(&mut buf).await? > 0 {}
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Metrics that run on every path

async fn connect(entry: SocketAddr) -> io::Result<TcpStream> {
    let s = TcpStream::connect(entry).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// One stream up: time from the first byte written to the sink's answer after EOF.
async fn tput_up(entry: SocketAddr, bytes: u64) -> io::Result<f64> {
    let mut s = connect(entry).await?;
    let buf = vec![0x5au8; 256 << 10];
    let start = Instant::now();
    s.write_all(b"U").await?;
    let mut left = bytes;
    while left > 0 {
        let n = (left as usize).min(buf.len());
        s.write_all(&buf[..n]).await?;
        left -= n as u64;
    }
    s.shutdown().await?;
    if s.read_u8().await? != b'k' {
        return Err(err("bad sink answer"));
    }
    Ok(gbit(bytes, start.elapsed()))
}

/// One stream down: time from the request to the last byte.
async fn tput_down(entry: SocketAddr, bytes: u64) -> io::Result<f64> {
    let mut s = connect(entry).await?;
    let mut buf = vec![0u8; 256 << 10];
    let start = Instant::now();
    let mut req = vec![b'D'];
    req.extend_from_slice(&bytes.to_be_bytes());
    s.write_all(&req).await?;
    let mut got = 0u64;
    while got < bytes {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            return Err(err(format!("EOF after {got} of {bytes} bytes")));
        }
        got += n as u64;
    }
    Ok(gbit(bytes, start.elapsed()))
}

/// Request/response round trips of `MSG` bytes on one connection: (p50, p99) in µs.
async fn rtt(entry: SocketAddr, samples: usize) -> io::Result<(f64, f64)> {
    let mut s = connect(entry).await?;
    let (mut r, mut w) = s.split();
    echo_rtt(&mut r, &mut w, samples).await
}

/// Asks the service to echo (`E`) on `w`/`r`, then times `samples` round trips of `MSG` bytes
/// after a tenth as many to warm up: (p50, p99) in µs.
async fn echo_rtt<R, W>(r: &mut R, w: &mut W, samples: usize) -> io::Result<(f64, f64)>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    w.write_all(b"E").await?;
    let msg = [0x42u8; MSG];
    let mut back = [0u8; MSG];
    let warm = samples / 10;
    let mut times = Vec::with_capacity(samples);
    for i in 0..warm + samples {
        let t = Instant::now();
        w.write_all(&msg).await?;
        r.read_exact(&mut back).await?;
        if i >= warm {
            times.push(t.elapsed());
        }
    }
    times.sort();
    Ok((pct_us(&times, 0.50), pct_us(&times, 0.99)))
}

/// New connections, each with a one-byte echo, one every `pace`: (p50, p90) in µs.
async fn conn_echo(entry: SocketAddr, samples: usize, pace: Duration) -> io::Result<(f64, f64)> {
    let mut times = Vec::with_capacity(samples);
    let mut next = Instant::now();
    for _ in 0..samples {
        tokio::time::sleep_until(next.into()).await;
        next += pace;
        let t = Instant::now();
        let mut s = connect(entry).await?;
        s.write_all(b"Ex").await?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await?;
        times.push(t.elapsed());
    }
    times.sort();
    Ok((pct_us(&times, 0.50), pct_us(&times, 0.90)))
}

// ---------------------------------------------------------------------------------------------
// holdfast only: resume after a reset, through a relay that the benchmark controls

#[derive(Default)]
struct RelayState {
    /// Kills the live connection pairs (with RST both ways), by connection number.
    current: Vec<(u64, Arc<Notify>)>,
    next_id: u64,
    /// Set by a reset; taken by the next connection, which measures from it.
    reset_at: Option<Instant>,
    /// Reset to first transport byte from the server on the new connection.
    resumes: Vec<Duration>,
}

async fn relay(l: TcpListener, server: SocketAddr, st: Arc<Mutex<RelayState>>) {
    loop {
        let Ok((c, _)) = l.accept().await else { continue };
        let st = st.clone();
        tokio::spawn(async move {
            let _ = relay_conn(c, server, st).await;
        });
    }
}

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

struct ResumeResult {
    p50_ms: f64,
    p99_ms: f64,
    n: usize,
    client_p50_ms: Option<f64>,
    replayed_median: Option<u64>,
    replayed_total: Option<u64>,
    replayed_max: Option<u64>,
    mib_during: f64,
}

fn log_field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace().find_map(|w| w.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
}

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

async fn resume_test(dir: &Path, keys: &HoldfastKeys, svc: u16, resets: usize) -> io::Result<ResumeResult> {
    let (server, sport) = holdfast_server(dir, keys, svc, "resume-server.log", &[]).await?;
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
    let local = free_port();
    let client = holdfast_client(dir, keys, rport, local, "resume-client.log")?;
    let mut tool = Tool { name: "holdfast", entry: loopback(local), children: vec![server, client], server_pid: None };
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

// ---------------------------------------------------------------------------------------------
// holdfast only: a raw protocol client for handshake rate and idle-session memory. It binds a
// different loopback source address per connection (127.1.x.y), so the server's per-source
// handshake rate limit (a flood defence) does not cap the measurement.

struct RawKeys {
    client: PrivateKey,
    server: PublicKey,
}

struct Sources(AtomicU64);

impl Sources {
    fn next(&self) -> Ipv4Addr {
        let i = self.0.fetch_add(1, Ordering::Relaxed) % 65_000 + 1;
        Ipv4Addr::new(127, 1, (i >> 8) as u8, i as u8)
    }
}

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

async fn raw_handshake(server: SocketAddr, src: Ipv4Addr, keys: &RawKeys) -> io::Result<(TcpStream, Transport)> {
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

fn seal(t: &mut Transport, frames: &[Frame<'_>]) -> io::Result<Vec<u8>> {
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
async fn handshake_rate(server: SocketAddr, pid: u32, keys: Arc<RawKeys>, dur: Duration) -> io::Result<(f64, f64)> {
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
    let out = seal(&mut t, &[Frame::Ack(0), Frame::Data { offset: 0, data: &req }])?;
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

struct MemResult {
    sessions: usize,
    base_kib: u64,
    idle_kib: u64,
    detached_kib: u64,
    busy_sessions: usize,
    busy_base_kib: u64,
    busy_peak_kib: u64,
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

// ---------------------------------------------------------------------------------------------
// Report

fn fmt_opt(v: Option<f64>, prec: usize) -> String {
    match v {
        Some(x) if x.is_finite() => format!("{x:.prec$}"),
        _ => s("–"),
    }
}

fn ratio(hf: Option<f64>, other: Option<f64>) -> String {
    match (hf, other) {
        (Some(a), Some(b)) if b > 0.0 && a.is_finite() && b.is_finite() => format!("{:.2}×", a / b),
        _ => s("–"),
    }
}

#[derive(Default)]
struct PathStats {
    up: Vec<f64>,
    down: Vec<f64>,
    rtt50: Vec<f64>,
    rtt99: Vec<f64>,
    conn50: Vec<f64>,
    conn90: Vec<f64>,
    down8: Vec<f64>,
    stalled: Vec<f64>,
    errors: Vec<String>,
}

fn main() {
    let opts = Opts::from_env();
    // One worker per CPU, set explicitly so that TOKIO_WORKER_THREADS (which the holdfast
    // processes inherit) changes only them.
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(workers).enable_all().build().expect("runtime");
    rt.block_on(run(opts));
}

async fn run(opts: Opts) {
    let dir = std::env::temp_dir().join(format!("holdfast-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let cpu = read_to_string("/proc/cpuinfo")
        .lines()
        .find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_string()))
        .unwrap_or_default();
    let nproc = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    println!("# holdfast tunnel benchmark");
    println!();
    println!(
        "machine: {nproc} CPUs, {cpu}, Linux {}; load average at start: {}",
        read_to_string("/proc/sys/kernel/osrelease").trim(),
        loadavg()
    );
    println!(
        "settings: {} rounds, {} MiB per transfer, {} round trips of {MSG} B, {} new connections per round",
        opts.runs,
        opts.bytes >> 20,
        opts.rtt_samples,
        opts.conn_samples
    );
    println!();

    let svc_l = TcpListener::bind("127.0.0.1:0").await.expect("service");
    let svc = svc_l.local_addr().expect("addr").port();
    tokio::spawn(service(svc_l));
    let keys = holdfast_keys(&dir).expect("holdfast keys");

    // Start every path.
    let mut tools: Vec<Tool> = Vec::new();
    let mut skipped: Vec<(String, String)> = Vec::new();
    for p in &opts.paths {
        let setup = match p.as_str() {
            "direct" => {
                Setup::Ready(Tool { name: "direct TCP", entry: loopback(svc), children: vec![], server_pid: None })
            }
            "holdfast" => setup_holdfast(&dir, &keys, svc, "holdfast", &[]).await,
            "holdfast-nomux" => setup_holdfast(&dir, &keys, svc, "holdfast --no-mux", &["--no-mux"]).await,
            "holdfast-chacha" => {
                setup_holdfast(&dir, &keys, svc, "holdfast ChaCha20", &["--cipher", "chacha20-poly1305"]).await
            }
            "socat" => setup_socat(&dir, svc).await,
            "stunnel" => setup_stunnel(&dir, svc).await,
            "spiped" => setup_spiped(&dir, svc).await,
            "ssh" => setup_ssh(&dir, svc).await,
            other => Setup::Skipped(format!("unknown path '{other}'")),
        };
        match setup {
            Setup::Ready(t) => tools.push(t),
            Setup::Skipped(why) => skipped.push((p.clone(), format!("skipped: {why}"))),
            Setup::Failed(why) => skipped.push((p.clone(), format!("FAILED to start: {why}"))),
        }
    }
    for (p, why) in &skipped {
        println!("{p}: {why}");
    }
    let mut stats: HashMap<&'static str, PathStats> = tools.iter().map(|t| (t.name, PathStats::default())).collect();
    let limit = Duration::from_secs(120);
    // `holdfast connect` (stdio) gets a server of its own, with the same settings as the path's.
    let mut stdio_server = None;
    if opts.metric("stdio") {
        match holdfast_server(&dir, &keys, svc, "stdio-server.log", &["-q"]).await {
            Ok((child, port)) => {
                stdio_server =
                    Some((Tool { name: "stdio", entry: loopback(port), children: vec![child], server_pid: None }, port))
            }
            Err(e) => println!("stdio: FAILED to start its server: {e}"),
        }
    }
    let (mut stdio50, mut stdio99, mut stdio_errors) = (Vec::new(), Vec::new(), Vec::new());

    for round in 0..opts.runs {
        eprintln!("round {}/{} (load {})", round + 1, opts.runs, loadavg());
        if let Some((_, port)) = &stdio_server {
            match tokio::time::timeout(limit, stdio::rtt(&keys, *port, opts.rtt_samples)).await {
                Ok(Ok((a, b))) => {
                    stdio50.push(a);
                    stdio99.push(b);
                }
                Ok(Err(e)) => stdio_errors.push(format!("{e}")),
                Err(_) => stdio_errors.push(s("timed out")),
            }
        }
        // Alternate the order so that no path always runs first.
        let order: Vec<usize> =
            if round % 2 == 0 { (0..tools.len()).collect() } else { (0..tools.len()).rev().collect() };
        for &i in &order {
            let t = &tools[i];
            let st = stats.get_mut(t.name).expect("stats");
            if opts.metric("tput") {
                match tokio::time::timeout(limit, tput_up(t.entry, opts.bytes)).await {
                    Ok(Ok(v)) => st.up.push(v),
                    Ok(Err(e)) => st.errors.push(format!("up: {e}")),
                    Err(_) => st.errors.push(s("up: timed out")),
                }
                match tokio::time::timeout(limit, tput_down(t.entry, opts.bytes)).await {
                    Ok(Ok(v)) => st.down.push(v),
                    Ok(Err(e)) => st.errors.push(format!("down: {e}")),
                    Err(_) => st.errors.push(s("down: timed out")),
                }
            }
            if opts.metric("streams") {
                match tokio::time::timeout(limit, streams::tput_down_n(t.entry, opts.bytes, 8)).await {
                    Ok(Ok(v)) => st.down8.push(v),
                    Ok(Err(e)) => st.errors.push(format!("8 streams: {e}")),
                    Err(_) => st.errors.push(s("8 streams: timed out")),
                }
                match tokio::time::timeout(limit, streams::tput_down_beside_stalled(t.entry, opts.bytes)).await {
                    Ok(Ok(v)) => st.stalled.push(v),
                    Ok(Err(e)) => st.errors.push(format!("beside a stalled stream: {e}")),
                    Err(_) => st.errors.push(s("beside a stalled stream: timed out")),
                }
            }
            if opts.metric("rtt") {
                match tokio::time::timeout(limit, rtt(t.entry, opts.rtt_samples)).await {
                    Ok(Ok((a, b))) => {
                        st.rtt50.push(a);
                        st.rtt99.push(b);
                    }
                    Ok(Err(e)) => st.errors.push(format!("rtt: {e}")),
                    Err(_) => st.errors.push(s("rtt: timed out")),
                }
            }
            if opts.metric("conn") {
                // 60 ms apart: under the holdfast server's default per-source handshake rate
                // limit (20/s), and the same pace for every path.
                let pace = Duration::from_millis(60);
                match tokio::time::timeout(limit, conn_echo(t.entry, opts.conn_samples, pace)).await {
                    Ok(Ok((a, b))) => {
                        st.conn50.push(a);
                        st.conn90.push(b);
                    }
                    Ok(Err(e)) => st.errors.push(format!("conn: {e}")),
                    Err(_) => st.errors.push(s("conn: timed out")),
                }
            }
        }
    }

    // Table of results.
    let names: Vec<&'static str> = tools.iter().map(|t| t.name).collect();
    let med = |name: &str, f: fn(&PathStats) -> &Vec<f64>| median(f(&stats[name]));
    println!("## All paths (medians of {} rounds)", opts.runs);
    println!();
    println!(
        "| path | up Gbit/s | down Gbit/s | RTT p50 µs | RTT p99 µs | connect+echo p50 µs | connect+echo p90 µs |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for n in &names {
        println!(
            "| {n} | {} | {} | {} | {} | {} | {} |",
            fmt_opt(med(n, |s| &s.up), 2),
            fmt_opt(med(n, |s| &s.down), 2),
            fmt_opt(med(n, |s| &s.rtt50), 0),
            fmt_opt(med(n, |s| &s.rtt99), 0),
            fmt_opt(med(n, |s| &s.conn50), 0),
            fmt_opt(med(n, |s| &s.conn90), 0),
        );
    }
    for (p, why) in &skipped {
        println!("| {p} | {why} | | | | | |");
    }
    println!();
    if opts.metric("streams") {
        println!("## Many streams (medians of {} rounds)", opts.runs);
        println!();
        println!("| path | 1 stream down Gbit/s | 8 streams down, total Gbit/s | 1 stream down beside a stalled one, Gbit/s |");
        println!("|---|---:|---:|---:|");
        for n in &names {
            let (one, eight, stalled) = (med(n, |s| &s.down), med(n, |s| &s.down8), med(n, |s| &s.stalled));
            println!("| {n} | {} | {} | {} |", fmt_opt(one, 2), fmt_opt(eight, 2), fmt_opt(stalled, 2));
        }
        println!();
    }
    if names.contains(&"holdfast") {
        println!("## holdfast relative to each path (same run; > 1 means holdfast is larger)");
        println!();
        println!("| vs | up | down | RTT p50 | RTT p99 | connect+echo p50 | connect+echo p90 |");
        println!("|---|---:|---:|---:|---:|---:|---:|");
        for n in names.iter().filter(|n| **n != "holdfast") {
            let r = |f: fn(&PathStats) -> &Vec<f64>| ratio(med("holdfast", f), med(n, f));
            println!(
                "| {n} | {} | {} | {} | {} | {} | {} |",
                r(|s| &s.up),
                r(|s| &s.down),
                r(|s| &s.rtt50),
                r(|s| &s.rtt99),
                r(|s| &s.conn50),
                r(|s| &s.conn90)
            );
        }
        println!();
    }
    for n in &names {
        let e = &stats[n].errors;
        if !e.is_empty() {
            println!("errors on {n}: {}", e.join("; "));
        }
    }
    if stdio_server.is_some() {
        let fwd = names.contains(&"holdfast").then(|| med("holdfast", |s| &s.rtt50)).flatten();
        println!(
            "holdfast connect (stdio pipes) RTT of {MSG} B: p50 {} µs, p99 {} µs; p50 relative to the holdfast \
             forward in the same rounds: {}",
            fmt_opt(median(&stdio50), 0),
            fmt_opt(median(&stdio99), 0),
            ratio(median(&stdio50), fwd)
        );
        if !stdio_errors.is_empty() {
            println!("errors on holdfast connect: {}", stdio_errors.join("; "));
        }
        println!();
    }
    drop(stdio_server);

    // holdfast-only metrics.
    let raw = Arc::new(RawKeys {
        client: load_private_key(&keys.client_key).expect("client key"),
        server: load_public_key(&keys.server_pub).expect("server key"),
    });
    let mut resume = None;
    if opts.metric("resume") {
        eprintln!("resume test ({} resets, load {})", opts.resets, loadavg());
        match tokio::time::timeout(Duration::from_secs(300), resume_test(&dir, &keys, svc, opts.resets)).await {
            Ok(Ok(r)) => resume = Some(r),
            Ok(Err(e)) => println!("resume test FAILED: {e}"),
            Err(_) => println!("resume test timed out"),
        }
    }
    let mut hs = None;
    if opts.metric("hs") {
        eprintln!("handshake rate (load {})", loadavg());
        let run = async {
            // One key opens every session here: lift its share of the buffer budget.
            let share = ["--buffer-per-key", "1GiB"];
            let (server, port) = holdfast_server_with(&dir, &keys, svc, "hs-server.log", &["-q"], &share).await?;
            let mut tool = Tool { name: "hs", entry: loopback(port), children: vec![server], server_pid: None };
            let pid = tool.children[0].id();
            let mut rates = Vec::new();
            let mut cpus = Vec::new();
            for _ in 0..opts.runs.min(3) {
                let (r, c) = handshake_rate(tool.entry, pid, raw.clone(), Duration::from_secs(3)).await?;
                rates.push(r);
                cpus.push(c);
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            tool.kill();
            Ok::<_, io::Error>((median(&rates).unwrap_or(0.0), median(&cpus).unwrap_or(0.0)))
        };
        match run.await {
            Ok(r) => hs = Some(r),
            Err(e) => println!("handshake test FAILED: {e}"),
        }
    }
    let mut mem = None;
    if opts.metric("mem") {
        eprintln!("memory test ({} idle sessions, load {})", opts.sessions, loadavg());
        let hf = tools.iter().find(|t| t.name == "holdfast");
        match memory_test(&dir, &keys, raw.clone(), svc, opts.sessions, hf).await {
            Ok(m) => mem = Some(m),
            Err(e) => println!("memory test FAILED: {e}"),
        }
    }

    println!("## holdfast only");
    println!();
    if let Some(r) = &resume {
        println!(
            "- resume after a reset mid-transfer ({} resets, {:.0} MiB downloaded meanwhile): reset to data \
             flowing again p50 {:.2} ms, p99 {:.2} ms; client-measured detection to resumed p50 {} ms",
            r.n,
            r.mib_during,
            r.p50_ms,
            r.p99_ms,
            fmt_opt(r.client_p50_ms, 2)
        );
        println!(
            "- bytes replayed per resume (both directions): median {}, max {}, total {}",
            r.replayed_median.map_or(s("–"), |v| v.to_string()),
            r.replayed_max.map_or(s("–"), |v| v.to_string()),
            r.replayed_total.map_or(s("–"), |v| v.to_string())
        );
    }
    if let Some((rate, cpu)) = hs {
        println!(
            "- handshakes per second (IK + key confirmation, 16 concurrent clients, median of {}): {rate:.0}/s; \
             server CPU per handshake {cpu:.0} µs (≈ {:.0}/s per core)",
            opts.runs.min(3),
            1e6 / cpu.max(1.0)
        );
    }
    if let Some(m) = &mem {
        let per = |a: u64, b: u64, n: usize| (a.saturating_sub(b)) as f64 / n as f64;
        println!(
            "- server memory per idle session ({} sessions, each with its service connection): {:.1} KiB \
             (VmRSS {} → {} KiB); after all links dropped (detached sessions): {} KiB, {:.1} KiB per session",
            m.sessions,
            per(m.idle_kib, m.base_kib, m.sessions),
            m.base_kib,
            m.idle_kib,
            m.detached_kib,
            per(m.detached_kib, m.base_kib, m.sessions),
        );
        if m.busy_sessions > 0 {
            println!(
                "- server memory per busy session ({} sessions in bulk transfer, 4 up and 4 down): {:.0} KiB \
                 (VmRSS {} → peak {} KiB)",
                m.busy_sessions,
                per(m.busy_peak_kib, m.busy_base_kib, m.busy_sessions),
                m.busy_base_kib,
                m.busy_peak_kib
            );
        }
    }
    println!();
    println!("load average at end: {}", loadavg());
    drop(tools);
    if std::env::var_os("HOLDFAST_BENCH_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        println!("logs kept in {}", dir.display());
    }
}

async fn memory_test(
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
