//! What the scale benches share: a real `holdfast server` process with an echo service in the
//! bench process, its memory and CPU read from `/proc`, its metrics scraped, and every link to
//! it killed at once with `ss -K`.

#![allow(dead_code)] // each bench uses its own part of this

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use holdfast::keys::{self, Keypair};
use holdfast::ClientConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// The release binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_holdfast");

/// A field of `/proc/PID/status` in KiB (`VmRSS:`, `VmHWM:`), 0 if unreadable.
pub fn vm_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// User plus system CPU time of `pid`.
pub fn cpu(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
    // Fields 14 and 15 of stat (utime, stime), in clock ticks (100 per second here); `after`
    // starts at field 3. Every field is counted, parsed or not: field 8 (tpgid) is -1 for a
    // process without a terminal, and skipping it would shift the others.
    let field = |n: usize| after.split_whitespace().nth(n - 3).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    let ticks = field(14) + field(15);
    Duration::from_millis(ticks * 10)
}

/// Raises this process's file-descriptor limit as far as it may (to 200,000 if allowed).
pub fn raise_fd_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let want = rustix::process::Rlimit { current: Some(200_000), maximum: Some(200_000) };
    if setrlimit(Resource::Nofile, want).is_err() {
        let mut lim = getrlimit(Resource::Nofile);
        lim.current = lim.maximum;
        let _ = setrlimit(Resource::Nofile, lim);
    }
}

/// An echo service on loopback, in this process: every connection gets its bytes back.
pub async fn echo_service() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A running `holdfast server`, killed when dropped, and what a client needs to reach it.
pub struct Server {
    child: Child,
    dir: PathBuf,
    /// The server's process id.
    pub pid: u32,
    /// Its listening port on 127.0.0.1.
    pub port: u16,
    /// Its `--metrics` port on 127.0.0.1.
    pub metrics: u16,
    /// `127.0.0.1:port`.
    pub addr: String,
    /// A client configuration whose key is on the server's allow-list.
    pub cfg: ClientConfig,
    /// One client configuration for each allowed key ([`Server::start_keys`]); the first is
    /// `cfg`.
    pub cfgs: Vec<ClientConfig>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::env::var_os("HOLDFAST_SCALE_LOG").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl Server {
    /// Starts the release server in a fresh directory with a fresh key pair and one allowed
    /// client key, offering `echo` (at `svc`), with `--handshake-rate 1000000` (every client
    /// of a bench comes from 127.0.0.1), `args`, and what `HOLDFAST_SCALE_SERVER_ARGS` adds;
    /// waits until it listens. Its log (`RUST_LOG` from `HOLDFAST_SCALE_LOG`, default `warn`)
    /// is kept in the directory when `HOLDFAST_SCALE_LOG` is set.
    pub async fn start(name: &str, svc: SocketAddr, args: &[&str]) -> Server {
        Server::start_keys(name, svc, args, 1).await
    }

    /// [`Server::start`] with `keys` allowed client keys (at least one): a server gives one key
    /// a quarter of its stream slots, so thousands of sessions with a stream each need several.
    pub async fn start_keys(name: &str, svc: SocketAddr, args: &[&str], keys: usize) -> Server {
        let dir = std::env::temp_dir().join(format!("holdfast-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let server = Keypair::generate();
        let clients: Vec<Keypair> = (0..keys.max(1)).map(|_| Keypair::generate()).collect();
        keys::save_private_key(&dir.join("server.key"), &server.private).unwrap();
        let lines: String = clients.iter().enumerate().map(|(i, c)| format!("{} bench{i}\n", c.public)).collect();
        std::fs::write(dir.join("authorized"), lines).unwrap();
        let (port, metrics) = (free_port(), free_port());
        let log = std::fs::File::create(dir.join("server.log")).unwrap();
        let child = Command::new(BIN)
            .args(["server", "--listen", &format!("127.0.0.1:{port}"), "--service", &format!("echo={svc}")])
            .arg("--key")
            .arg(dir.join("server.key"))
            .arg("--authorized")
            .arg(dir.join("authorized"))
            .args(["--handshake-rate", "1000000", "--metrics", &format!("127.0.0.1:{metrics}")])
            .args(args)
            .args(std::env::var("HOLDFAST_SCALE_SERVER_ARGS").unwrap_or_default().split_whitespace())
            .env("RUST_LOG", std::env::var("HOLDFAST_SCALE_LOG").unwrap_or_else(|_| "warn".into()))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start holdfast server");
        let pid = child.id();
        let addr = format!("127.0.0.1:{port}");
        let cfgs: Vec<ClientConfig> = clients.into_iter().map(|c| ClientConfig::new(c, server.public)).collect();
        let s = Server { child, dir, pid, port, metrics, addr, cfg: cfgs[0].clone(), cfgs };
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(&s.addr).await.is_err() {
            assert!(Instant::now() < deadline, "the server did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        s
    }

    /// The server's VmRSS in KiB.
    pub fn rss(&self) -> u64 {
        vm_kib(self.pid, "VmRSS:")
    }

    /// The sum of the samples of metric `name` (every label set) in a scrape of `--metrics`;
    /// `None` if the scrape failed or has no such metric.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let scrape = async {
            let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.metrics)).await.ok()?;
            s.write_all(b"GET /metrics HTTP/1.0\r\nHost: bench\r\n\r\n").await.ok()?;
            let mut body = String::new();
            s.read_to_string(&mut body).await.ok()?;
            Some(body)
        };
        let body = tokio::time::timeout(Duration::from_secs(5), scrape).await.ok()??;
        let mut found = None;
        let body = body.split_once("\r\n\r\n").map_or(body.as_str(), |(_, b)| b);
        for line in body.lines().filter(|l| !l.starts_with('#')) {
            let Some((key, value)) = line.rsplit_once(' ') else { continue };
            if key.split('{').next() == Some(name) {
                *found.get_or_insert(0.0) += value.parse::<f64>().unwrap_or(f64::NAN);
            }
        }
        found
    }

    /// A filter for `ss` that matches the links to the server established now, and no later
    /// one: by their client ports. `ss -K` with a filter on the server's port alone kills as it
    /// walks the sockets, so a client that reconnects at once can see its new link killed by
    /// the same sweep, and count two faults.
    pub fn links_now(&self) -> Links {
        let out = Command::new("ss")
            .args([
                "-H",
                "-t",
                "-n",
                "state",
                "established",
                "dst",
                "127.0.0.1",
                "dport",
                "=",
                &format!(":{}", self.port),
            ])
            .output()
            .expect("ss");
        let ports: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                l.split_whitespace().find(|t| t.contains(':'))?.rsplit_once(':').map(|(_, p)| p.to_string())
            })
            .collect();
        let sports: Vec<String> = ports.iter().map(|p| format!("sport = :{p}")).collect();
        // One condition a line: `ss -F` refuses long lines.
        let filter = format!("dst 127.0.0.1 and dport = :{} and (\n{}\n)\n", self.port, sports.join("\nor "));
        let path = self.dir.join("links.filter");
        std::fs::write(&path, filter).unwrap();
        Links { path, count: ports.len() }
    }

    /// Kills `links` at once (`ss -K`, needs root); returns how many `ss` listed as killed.
    pub fn kill(&self, links: &Links) -> usize {
        if links.count == 0 {
            return 0;
        }
        let out = Command::new("ss").args(["-K", "-H", "-t", "-F"]).arg(&links.path).output().expect("ss");
        String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.starts_with("ESTAB")).count()
    }

    /// Samples the server's VmRSS every 20 ms until the returned guard is finished; gives the
    /// peak seen.
    pub fn sample_peak(&self) -> PeakRss {
        let (pid, on) = (self.pid, Arc::new(AtomicBool::new(true)));
        let task = {
            let on = on.clone();
            tokio::spawn(async move {
                let mut peak = 0;
                while on.load(Ordering::Relaxed) {
                    peak = peak.max(vm_kib(pid, "VmRSS:"));
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                peak
            })
        };
        PeakRss { on, task }
    }
}

/// The links of [`Server::links_now`]: an `ss` filter file, and how many it matches.
pub struct Links {
    path: PathBuf,
    /// Links the filter matches.
    pub count: usize,
}

/// The RSS sampler of [`Server::sample_peak`].
pub struct PeakRss {
    on: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<u64>,
}

impl PeakRss {
    /// Stops sampling; the peak VmRSS in KiB.
    pub async fn finish(self) -> u64 {
        self.on.store(false, Ordering::Relaxed);
        self.task.await.unwrap_or(0)
    }
}

/// `len` bytes of a pattern that differs for every `seed` (splitmix64), to compare echoes with.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Writes `data` on `s` and reads as many bytes back, within `limit`; an error if they differ.
pub async fn echo<S>(s: &mut S, data: &[u8], limit: Duration) -> std::io::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let round = async {
        // Small enough for every buffer on the way: written whole before the echo is read.
        s.write_all(data).await?;
        let mut got = vec![0u8; data.len()];
        s.read_exact(&mut got).await?;
        if got == data {
            Ok(())
        } else {
            Err(std::io::Error::other("the echo differs from what was sent"))
        }
    };
    match tokio::time::timeout(limit, round).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "no echo in time")),
    }
}

/// Median, 90th and 99th percentile and maximum of `t` (sorted here).
pub fn percentiles(t: &mut [Duration]) -> [Duration; 4] {
    t.sort_unstable();
    let at =
        |p: f64| t.get(((t.len() as f64 * p) as usize).min(t.len().saturating_sub(1))).copied().unwrap_or_default();
    [at(0.5), at(0.9), at(0.99), at(1.0)]
}
