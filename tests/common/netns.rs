//! A network-namespace lab for tests that run the real `holdfast` binary on a real network stack.
//!
//! - [`Lab`] creates namespaces and veth links and removes them all on drop, also when the test
//!   panics. Nothing is ever added to the namespace the test runs in: veth pairs are created
//!   directly inside the lab's namespaces, so every address, link and nftables rule lives and
//!   dies with them.
//! - [`Proc`] is a child process (usually `ip netns exec NS PROGRAM ...`, which execs, so its pid
//!   is the program's) whose stdout and stderr lines are collected with arrival times. It is
//!   killed on drop.
//! - The *app* is a tiny data program run inside a namespace: it sends a pseudo-random stream as
//!   fast as allowed (or paced), hashes what it sends and what it receives, and reports progress
//!   on stdout. Test binaries re-execute themselves to run it: each binary using it defines an
//!   ignored test named [`APP_TEST`] that calls [`app_main`].
//!
//! All times are Unix-epoch nanoseconds from the realtime clock, which every process on the host
//! shares (network namespaces do not change clocks), so times from the app, the `holdfast` logs
//! and the test compare directly.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

use super::guard::{own_group_std, Group};

/// Environment variable that turns a re-executed test binary into the app.
pub const APP_ENV: &str = "HOLDFAST_NETNS_APP";
/// Name of the ignored test each binary defines to run [`app_main`].
pub const APP_TEST: &str = "netns_app";
/// If set to 1, a missing prerequisite fails the test instead of skipping it.
pub const REQUIRE_ENV: &str = "HOLDFAST_REQUIRE_NETNS";

/// Now, in Unix-epoch nanoseconds (realtime clock).
pub fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

/// Milliseconds between two nanosecond times, signed.
pub fn ms(from: u64, to: u64) -> f64 {
    (to as f64 - from as f64) / 1e6
}

/// Reports a skipped test plainly. Written straight to the process's stderr, so libtest's
/// output capture cannot hide it. Panics instead when [`REQUIRE_ENV`] is 1.
pub fn skip(test: &str, reason: &str) {
    if std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1") {
        panic!("{test}: cannot run ({reason}) and {REQUIRE_ENV}=1");
    }
    let _ = writeln!(std::io::stderr(), "{test}: skipped: {reason}");
}

fn command_works(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Checks what every lab test needs: Linux, root, `ip` and `nft`, plus the extra `tools`
/// (each checked by running it with `--version` or `-V`). Returns the reason it cannot run.
pub fn preflight(tools: &[&str]) -> Result<(), String> {
    if !cfg!(target_os = "linux") {
        return Err("network namespaces need Linux".into());
    }
    let status = std::fs::read_to_string("/proc/self/status").map_err(|e| format!("cannot read /proc: {e}"))?;
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("?")
        .to_string();
    if euid != "0" {
        return Err(format!("needs root (effective uid is {euid})"));
    }
    if !command_works("ip", &["-V"]) {
        return Err("`ip` (iproute2) is not installed".into());
    }
    for tool in ["nft"].iter().chain(tools) {
        let ok = command_works(tool, &["--version"]) || command_works(tool, &["-V"]);
        if !ok {
            return Err(format!("`{tool}` is not installed"));
        }
    }
    Ok(())
}

/// Runs a command to completion; its stdout, or an error with its stderr.
pub fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`{program} {}` failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        ))
    }
}

/// Namespaces (and a scratch directory) that are removed on drop.
pub struct Lab {
    prefix: String,
    namespaces: Vec<String>,
    /// Scratch directory for keys and rule files; removed on drop.
    pub dir: PathBuf,
    nft_files: u32,
}

impl Lab {
    /// A lab whose names start with `hf<pid><tag>`. `tag` must be unique among the tests of one
    /// binary and short: a pid has at most 7 digits, and a namespace name at most 15 characters.
    /// The pid makes names unique among running test processes, so a namespace that already
    /// has the name can only be left over from a dead one.
    pub fn new(tag: &str) -> Result<Lab, String> {
        let prefix = format!("hf{}{tag}", std::process::id());
        let dir = std::env::temp_dir().join(format!("holdfast-netns-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        Ok(Lab { prefix, namespaces: Vec::new(), dir, nft_files: 0 })
    }

    /// Creates namespace `<prefix><role>` with loopback up, and returns its name.
    pub fn netns(&mut self, role: &str) -> Result<String, String> {
        let name = format!("{}{role}", self.prefix);
        assert!(name.len() <= 15, "namespace name {name} is too long");
        // A namespace left by a killed earlier process with the same pid would be in the way.
        if Path::new("/run/netns").join(&name).exists() {
            let _ = run("ip", &["netns", "del", &name]);
        }
        let mut last = String::new();
        for _ in 0..5 {
            match run("ip", &["netns", "add", &name]) {
                Ok(_) => {
                    self.namespaces.push(name.clone());
                    run("ip", &["-n", &name, "link", "set", "lo", "up"])?;
                    return Ok(name);
                }
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(last)
    }

    /// A veth pair: `if_a` in `ns_a` and `if_b` in `ns_b`, both up. Created inside `ns_a`, so it
    /// never exists in the test's own namespace.
    pub fn veth(&self, ns_a: &str, if_a: &str, ns_b: &str, if_b: &str) -> Result<(), String> {
        run("ip", &["-n", ns_a, "link", "add", if_a, "type", "veth", "peer", "name", if_b, "netns", ns_b])?;
        run("ip", &["-n", ns_a, "link", "set", if_a, "up"])?;
        run("ip", &["-n", ns_b, "link", "set", if_b, "up"])?;
        Ok(())
    }

    /// `ip -n NS ARGS...`.
    pub fn ip(&self, ns: &str, args: &[&str]) -> Result<String, String> {
        let mut all = vec!["-n", ns];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// `ip netns exec NS ARGS...`, to completion.
    pub fn exec(&self, ns: &str, args: &[&str]) -> Result<String, String> {
        let mut all = vec!["netns", "exec", ns];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Loads an nftables script (`nft -f`) in `ns`, atomically.
    pub fn nft(&mut self, ns: &str, script: &str) -> Result<(), String> {
        self.nft_files += 1;
        let path = self.dir.join(format!("rules-{}.nft", self.nft_files));
        std::fs::write(&path, script).map_err(|e| e.to_string())?;
        self.exec(ns, &["nft", "-f", &path.to_string_lossy()]).map(|_| ())
    }

    /// Sets an IPv4 sysctl inside `ns` (e.g. `net/ipv4/ip_forward`).
    pub fn sysctl(&self, ns: &str, key: &str, value: &str) -> Result<(), String> {
        let script = format!("echo {value} > /proc/sys/{key}");
        self.exec(ns, &["sh", "-c", &script]).map(|_| ())
    }

    /// Starts `ip netns exec NS PROGRAM ARGS...` with `env` added; stdin is piped.
    pub fn spawn(&self, ns: &str, label: &str, program: &Path, args: &[&str], env: &[(&str, String)]) -> Proc {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns]).arg(program).args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Proc::spawn(label, cmd)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in self.namespaces.drain(..).rev() {
            if let Err(e) = run("ip", &["netns", "del", &ns]) {
                let _ = writeln!(std::io::stderr(), "warning: could not remove namespace {ns}: {e}");
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One line of a process's output.
#[derive(Debug, Clone)]
pub struct Line {
    /// When the test read it (Unix-epoch ns).
    pub seen: u64,
    /// When it says it was written: the leading RFC 3339 timestamp of a tracing log line, else
    /// `seen`.
    pub at: u64,
    /// `true` for stderr.
    pub stderr: bool,
    /// The text.
    pub text: String,
}

/// What an app has reported on stdout.
#[derive(Debug, Default, Clone)]
pub struct AppReport {
    /// `(time, total bytes received)`: each receive after a pause, and then at most one a
    /// millisecond.
    pub receipts: Vec<(u64, u64)>,
    /// Bytes written so far (as of the latest report).
    pub sent: u64,
    /// Receive side ended cleanly: total and SHA-256 (hex).
    pub rx_done: Option<(u64, String)>,
    /// Send side ended cleanly: total and SHA-256 (hex).
    pub tx_done: Option<(u64, String)>,
    /// Receive side failed: total so far and the error.
    pub rx_err: Option<(u64, String)>,
    /// Send side failed: total so far and the error.
    pub tx_err: Option<(u64, String)>,
    /// The app's data connection is up.
    pub connected: bool,
}

impl AppReport {
    /// Total received as of the last report.
    pub fn received(&self) -> u64 {
        self.receipts.last().map_or(0, |r| r.1)
    }

    /// The first receipt at or after `t`.
    pub fn first_receipt_after(&self, t: u64) -> Option<(u64, u64)> {
        let i = self.receipts.partition_point(|r| r.0 < t);
        self.receipts.get(i).copied()
    }

    /// Both sides finished, cleanly or not.
    pub fn finished(&self) -> bool {
        (self.rx_done.is_some() || self.rx_err.is_some()) && (self.tx_done.is_some() || self.tx_err.is_some())
    }
}

#[derive(Default)]
struct Output {
    lines: Vec<Line>,
    app: AppReport,
    closed: u8,
}

/// Output shared between a process's reader threads and the test.
#[derive(Default)]
pub struct Log {
    out: Mutex<Output>,
    cond: Condvar,
}

impl Log {
    fn lock(&self) -> MutexGuard<'_, Output> {
        self.out.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, stderr: bool, text: String) {
        let seen = now_ns();
        let mut out = self.lock();
        if let Some(i) = text.find("HF ") {
            let mut f = text[i + 3..].split_whitespace();
            let kind = f.next().unwrap_or("");
            let num = |s: Option<&str>| s.and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            let a = num(f.next());
            let rest: Vec<&str> = f.collect();
            let app = &mut out.app;
            match kind {
                "rx" => {
                    app.receipts.push((rest.first().and_then(|v| v.parse().ok()).unwrap_or(seen), a));
                    self.cond.notify_all();
                    return;
                }
                "tx" => {
                    app.sent = a;
                    return;
                }
                "connected" => app.connected = true,
                "rxdone" => app.rx_done = Some((a, rest.join(" "))),
                "txdone" => app.tx_done = Some((a, rest.join(" "))),
                "rxerr" => app.rx_err = Some((a, rest.join(" "))),
                "txerr" => app.tx_err = Some((a, rest.join(" "))),
                _ => {}
            }
        }
        let at = parse_log_time(&text).unwrap_or(seen);
        out.lines.push(Line { seen, at, stderr, text });
        self.cond.notify_all();
    }

    /// Waits until `check` returns `Some`, or `timeout` passes.
    pub fn wait<T>(&self, timeout: Duration, mut check: impl FnMut(&[Line], &AppReport) -> Option<T>) -> Option<T> {
        let deadline = Instant::now() + timeout;
        let mut out = self.lock();
        loop {
            if let Some(v) = check(&out.lines, &out.app) {
                return Some(v);
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            out =
                self.cond.wait_timeout(out, left.min(Duration::from_millis(100))).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// Waits for a line containing `needle` whose time is at or after `after`.
    pub fn wait_line(&self, needle: &str, after: u64, timeout: Duration) -> Option<Line> {
        self.wait(timeout, |lines, _| lines.iter().find(|l| l.at >= after && l.text.contains(needle)).cloned())
    }

    /// Lines containing `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.lock().lines.iter().filter(|l| l.text.contains(needle)).count()
    }

    /// All lines so far.
    pub fn lines(&self) -> Vec<Line> {
        self.lock().lines.clone()
    }

    /// The app's report so far.
    pub fn app(&self) -> AppReport {
        self.lock().app.clone()
    }

    /// Both output pipes have closed (the process has exited).
    pub fn closed(&self) -> bool {
        self.lock().closed >= 2
    }
}

/// Parses the leading `YYYY-MM-DDTHH:MM:SS.fffffffZ` of a tracing log line (UTC) into Unix-epoch
/// nanoseconds.
pub fn parse_log_time(line: &str) -> Option<u64> {
    let ts = line.split_whitespace().next()?;
    let ts = ts.strip_suffix('Z')?;
    let (date, time) = ts.split_once('T')?;
    let mut d = date.split('-').map(|v| v.parse::<i64>());
    let (y, m, dd) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.split(':').map(|v| v.parse::<i64>());
    let (hh, mm, ss) = (t.next()?.ok()?, t.next()?.ok()?, t.next()?.ok()?);
    let digits = frac.len().min(9);
    let nanos: i64 = frac.get(..digits)?.parse::<i64>().ok()? * 10i64.pow(9 - digits as u32);
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + dd - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hh * 3600 + mm * 60 + ss;
    u64::try_from(secs * 1_000_000_000 + nanos).ok()
}

/// A child process whose output is collected; killed on drop.
pub struct Proc {
    /// Name used in diagnostics.
    pub label: String,
    /// Process id (with `ip netns exec`, the program's own).
    pub pid: u32,
    child: Child,
    stdin: Option<ChildStdin>,
    /// Its output.
    pub log: Arc<Log>,
    group: Group,
}

impl Proc {
    /// Spawns `cmd` with piped stdin, stdout and stderr.
    pub fn spawn(label: &str, mut cmd: Command) -> Proc {
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = own_group_std(&mut cmd).spawn().unwrap_or_else(|e| panic!("cannot start {label}: {e}"));
        let group = Group::new(Some(child.id()));
        let log = Arc::new(Log::default());
        let out = child.stdout.take().expect("stdout is piped");
        let err = child.stderr.take().expect("stderr is piped");
        fn reader<R: Read + Send + 'static>(r: R, log: Arc<Log>, stderr: bool) {
            std::thread::spawn(move || {
                let mut r = BufReader::new(r);
                let mut buf = Vec::new();
                loop {
                    buf.clear();
                    match r.read_until(b'\n', &mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {
                            let text = String::from_utf8_lossy(&buf).trim_end().to_string();
                            log.push(stderr, text);
                        }
                    }
                }
                log.lock().closed += 1;
                log.cond.notify_all();
            });
        }
        reader(out, log.clone(), false);
        reader(err, log.clone(), true);
        Proc { label: label.to_string(), pid: child.id(), stdin: child.stdin.take(), child, log, group }
    }

    /// Writes a line to its stdin (ignored once it has exited).
    pub fn send(&mut self, line: &str) {
        if let Some(s) = self.stdin.as_mut() {
            let _ = writeln!(s, "{line}");
            let _ = s.flush();
        }
    }

    /// Whether it has exited, with its status.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Kills it and its process group (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        self.group.kill();
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }

    /// Resident memory in KiB (VmRSS), while it runs.
    pub fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).ok()?;
        status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()?.parse().ok())
    }

    /// The last `n` lines, for diagnostics.
    pub fn tail(&self, n: usize) -> String {
        let lines = self.log.lines();
        let start = lines.len().saturating_sub(n);
        lines[start..].iter().map(|l| format!("  [{}] {}\n", self.label, l.text)).collect()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------------------------
// The app: runs inside a namespace, in a re-executed test binary.

/// How to start the app.
#[derive(Debug, Clone)]
pub struct AppSpec {
    /// `listen:ADDR` (accept one connection) or `dial:ADDR`.
    pub mode: String,
    /// Seed of the stream it sends.
    pub seed: u64,
    /// Pace in bytes a second; 0 sends as fast as it can.
    pub rate: u64,
}

impl AppSpec {
    /// Starts the app in `ns` by re-executing the current test binary.
    pub fn spawn(&self, lab: &Lab, ns: &str, label: &str) -> Proc {
        let exe = std::env::current_exe().expect("current test binary");
        let args = [APP_TEST, "--exact", "--ignored", "--nocapture", "--test-threads=1", "-q"];
        let env = [
            (APP_ENV, self.mode.clone()),
            ("HOLDFAST_NETNS_SEED", self.seed.to_string()),
            ("HOLDFAST_NETNS_RATE", self.rate.to_string()),
        ];
        lab.spawn(ns, label, &exe, &args, &env)
    }
}

/// A fast pseudo-random byte stream (SplitMix64).
struct Pattern(u64);

impl Pattern {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            chunk.copy_from_slice(&z.to_le_bytes()[..chunk.len()]);
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn say(line: String) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// The app's entry point. Returns `false` (doing nothing) unless [`APP_ENV`] is set.
///
/// It connects (or accepts one connection), then sends a seeded stream until a line `stop` (or
/// EOF) arrives on stdin, then half-closes and reads until EOF. It reports on stdout:
/// `HF connected`, `HF rx TOTAL TIME` (each receive after a pause of 5 ms or more, otherwise at
/// most one a millisecond), `HF tx TOTAL` (every 4 MiB), and at the end `HF rxdone TOTAL SHA256`
/// / `HF txdone TOTAL SHA256`, or `HF rxerr TOTAL ERROR` / `HF txerr TOTAL ERROR`.
pub fn app_main() -> bool {
    let Ok(mode) = std::env::var(APP_ENV) else {
        return false;
    };
    let seed: u64 = std::env::var("HOLDFAST_NETNS_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
    let rate: u64 = std::env::var("HOLDFAST_NETNS_RATE").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    let sock = if let Some(addr) = mode.strip_prefix("listen:") {
        let l = TcpListener::bind(addr).unwrap_or_else(|e| panic!("app cannot listen on {addr}: {e}"));
        say("HF listening".into());
        l.accept().expect("app accept").0
    } else if let Some(addr) = mode.strip_prefix("dial:") {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match TcpStream::connect(addr) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => panic!("app cannot connect to {addr}: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    } else {
        panic!("bad {APP_ENV}: {mode}");
    };
    let _ = sock.set_nodelay(true);
    say("HF connected".into());

    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    std::thread::spawn(move || {
        let mut line = String::new();
        let stdin = std::io::stdin();
        loop {
            line.clear();
            match stdin.lock().read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) if line.trim() == "stop" => break,
                Ok(_) => {}
            }
        }
        stop2.store(true, Ordering::SeqCst);
    });

    // A reset is reported to whichever of the two threads touches the socket first; the other
    // then sees a plain EOF or EPIPE. So an EOF after the sender failed is not a clean end.
    let tx_failed = Arc::new(AtomicBool::new(false));
    let tx_failed2 = tx_failed.clone();
    let mut rsock = sock.try_clone().expect("clone socket");
    let reader = std::thread::spawn(move || {
        let mut hash = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0u64;
        let mut last_read = Instant::now();
        let mut last_say = Instant::now() - Duration::from_secs(1);
        loop {
            match rsock.read(&mut buf) {
                Ok(0) => {
                    say(format!("HF rx {total} {}", now_ns()));
                    std::thread::sleep(Duration::from_millis(50));
                    if tx_failed2.load(Ordering::SeqCst) {
                        say(format!("HF rxerr {total} end of stream after the connection failed"));
                    } else {
                        say(format!("HF rxdone {total} {}", hex(&hash.finalize())));
                    }
                    return;
                }
                Ok(n) => {
                    let t = now_ns();
                    hash.update(&buf[..n]);
                    total += n as u64;
                    let now = Instant::now();
                    if now - last_read >= Duration::from_millis(5) || now - last_say >= Duration::from_millis(1) {
                        say(format!("HF rx {total} {t}"));
                        last_say = now;
                    }
                    last_read = now;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    say(format!("HF rx {total} {}", now_ns()));
                    say(format!("HF rxerr {total} {:?}: {e}", e.kind()));
                    return;
                }
            }
        }
    });

    let mut wsock = sock;
    let mut pattern = Pattern(seed);
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 16 * 1024];
    let mut total = 0u64;
    let mut next_report = 0u64;
    let started = Instant::now();
    let mut next = started;
    let mut failed = false;
    while !stop.load(Ordering::SeqCst) {
        pattern.fill(&mut buf);
        if let Err(e) = wsock.write_all(&buf) {
            tx_failed.store(true, Ordering::SeqCst);
            say(format!("HF txerr {total} {:?}: {e}", e.kind()));
            failed = true;
            break;
        }
        hash.update(&buf);
        total += buf.len() as u64;
        if total >= next_report {
            say(format!("HF tx {total}"));
            next_report = total + (4 << 20);
        }
        if rate > 0 {
            // Pace without catching up after a stall: a burst after a fault would hide the stall.
            next += Duration::from_secs_f64(buf.len() as f64 / rate as f64);
            let now = Instant::now();
            if next > now {
                std::thread::sleep(next - now);
            } else if now - next > Duration::from_millis(20) {
                next = now;
            }
        }
    }
    if !failed {
        match wsock.shutdown(Shutdown::Write) {
            Ok(()) => say(format!("HF txdone {total} {}", hex(&hash.finalize()))),
            Err(e) => say(format!("HF txerr {total} {:?}: {e}", e.kind())),
        }
    }
    let _ = reader.join();
    true
}
