//! Child processes, temp dirs and tool checks for tests that drive real programs (ssh, sshd,
//! postgres, curl, iperf3) through the `holdfast` binary.
//!
//! - [`Proc`] owns a child started in its own process group; on drop the whole group is killed
//!   and the child reaped, so helpers it started (an ssh `ProxyCommand`) go too. Its stderr (and,
//!   if asked, stdout) is collected as it arrives, and every wait on it is bounded.
//! - [`TempDir`] is removed on drop.
//! - [`check_tools`] and [`skip`] decide whether a test can run: a missing tool skips it, or
//!   fails it when [`REQUIRE_TOOLS_ENV`] is 1 (as in CI).

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::guard::{own_group, Group};
use tokio::io::{AsyncRead, AsyncReadExt as _};
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::time::timeout;

/// Bound on any single wait: a process, a log line, one step of a workload.
pub const LIMIT: Duration = Duration::from_secs(30);
/// If set to 1, a missing tool fails the test instead of skipping it.
pub const REQUIRE_TOOLS_ENV: &str = "HOLDFAST_REQUIRE_TOOLS";

/// Reports a skipped test on the process's stderr (past libtest's capture), or panics when
/// [`REQUIRE_TOOLS_ENV`] is 1.
pub fn skip(test: &str, reason: &str) {
    if std::env::var(REQUIRE_TOOLS_ENV).is_ok_and(|v| v == "1") {
        panic!("{test}: cannot run ({reason}) and {REQUIRE_TOOLS_ENV}=1");
    }
    let _ = writeln!(std::io::stderr(), "{test}: skipped: {reason}");
}

/// The full path of `program`, from `PATH` or the sbin directories (sshd lives there).
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let extra = ["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from);
    std::env::split_paths(&path).chain(extra).map(|d| d.join(program)).find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Checks that the test runs as root (for `ss -K` and sshd) and that every tool is installed.
pub fn check_tools(tools: &[&str]) -> Result<(), String> {
    if !cfg!(target_os = "linux") {
        return Err("needs Linux (ss -K)".into());
    }
    if !rustix::process::geteuid().is_root() {
        return Err("needs root (ss -K kills sockets; sshd)".into());
    }
    let missing: Vec<&str> = tools.iter().copied().filter(|t| which(t).is_none()).collect();
    if !missing.is_empty() {
        return Err(format!("not installed: {}", missing.join(", ")));
    }
    Ok(())
}

/// A fresh directory under the system temp dir (mode 0755, so a service user can reach files
/// made for it inside), removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("holdfast-real-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    pub fn root(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A path as `&str` (test paths are always UTF-8).
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A loopback port that was free a moment ago (bound by the OS, then released). Whoever binds
/// it next may lose a race with another program, so callers retry on "address in use".
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// What a child wrote to its log streams so far, and how many of them have closed.
#[derive(Default)]
struct Log {
    text: String,
    closed: usize,
}

/// Where a child's stdout goes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Out {
    /// Discarded.
    Null,
    /// Piped; the test takes `child.stdout`.
    Piped,
    /// Collected into the log with stderr.
    Log,
}

/// A running program in its own process group, killed (the whole group) and reaped on drop.
pub struct Proc {
    pub name: String,
    pub child: Child,
    log: watch::Receiver<Log>,
    streams: usize,
    group: Group,
}

impl Proc {
    /// Starts `cmd` with stdin piped (the test may take it) and stdout as `out`.
    pub fn spawn(name: &str, cmd: &mut Command, out: Out) -> Proc {
        cmd.stdin(Stdio::piped()).stderr(Stdio::piped());
        cmd.stdout(if out == Out::Null { Stdio::null() } else { Stdio::piped() });
        let mut child = own_group(cmd).spawn().unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let group = Group::new(child.id());
        let (tx, log) = watch::channel(Log::default());
        let tx = std::sync::Arc::new(tx);
        collect(child.stderr.take().unwrap(), tx.clone());
        let mut streams = 1;
        if out == Out::Log {
            collect(child.stdout.take().unwrap(), tx);
            streams = 2;
        }
        Proc { name: name.to_string(), child, log, streams, group }
    }

    /// The process id (also its process group id).
    pub fn pid(&self) -> u32 {
        self.child.id().expect("process already reaped")
    }

    pub fn log(&self) -> String {
        self.log.borrow().text.clone()
    }

    /// Waits (bounded) until the log satisfies `done` or every log stream closed; returns
    /// whether `done` held.
    pub async fn wait_for(&self, done: impl Fn(&str) -> bool) -> bool {
        let mut rx = self.log.clone();
        let _ = timeout(LIMIT, rx.wait_for(|l| done(&l.text) || l.closed == self.streams)).await;
        done(&self.log.borrow().text)
    }

    /// Waits until the log holds `pat` at least `n` times; panics, showing the log, if not.
    pub async fn wait_log(&self, pat: &str, n: usize) -> String {
        if !self.wait_for(|t| t.matches(pat).count() >= n).await {
            panic!("{} did not log {pat:?} x{n}; log:\n{}", self.name, tail(&self.log(), 40));
        }
        self.log()
    }

    /// The address logged as `key=ADDR` on the first line containing `line`.
    pub async fn logged_addr(&self, line: &str, key: &str) -> SocketAddr {
        let text = self.wait_log(line, 1).await;
        let l = text.lines().find(|l| l.contains(line)).unwrap();
        let v = l.split_whitespace().find_map(|w| w.strip_prefix(key)).unwrap_or_else(|| panic!("no {key} in {l}"));
        v.parse().unwrap_or_else(|e| panic!("bad address in {l}: {e}"))
    }

    /// Waits (bounded) for the process to exit and its log streams to close.
    pub async fn exit(&mut self) -> (ExitStatus, String) {
        let status = match timeout(LIMIT, self.child.wait()).await {
            Ok(r) => r.unwrap(),
            Err(_) => panic!("{} did not exit in time; log:\n{}", self.name, tail(&self.log(), 40)),
        };
        let mut rx = self.log.clone();
        let _ = timeout(LIMIT, rx.wait_for(|l| l.closed == self.streams)).await;
        (status, self.log())
    }
}

fn collect<R: AsyncRead + Unpin + Send + 'static>(mut r: R, tx: std::sync::Arc<watch::Sender<Log>>) {
    tokio::spawn(async move {
        let mut buf = vec![0u8; 8192];
        while let Ok(n @ 1..) = r.read(&mut buf).await {
            tx.send_modify(|l| l.text.push_str(&String::from_utf8_lossy(&buf[..n])));
        }
        tx.send_modify(|l| l.closed += 1);
    });
}

impl Drop for Proc {
    fn drop(&mut self) {
        // The whole group, before the child is reaped (its id cannot be reused meanwhile).
        self.group.kill();
        let _ = self.child.start_kill();
        // A killed process exits at once, so this bounded poll ends quickly.
        let deadline = Instant::now() + Duration::from_secs(5);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Runs `cmd` to completion (stdin closed, output captured) within `limit`; panics on timeout.
/// The child runs in its own process group, killed when this returns: nothing it started
/// outlives it.
pub async fn output(what: &str, cmd: &mut Command, limit: Duration) -> Output {
    let mut p = Proc::spawn(what, cmd, Out::Piped);
    drop(p.child.stdin.take());
    let mut stdout = p.child.stdout.take().unwrap();
    let run = async {
        let mut out = Vec::new();
        let _ = stdout.read_to_end(&mut out).await;
        (p.child.wait().await.unwrap(), out)
    };
    let Ok((status, stdout)) = timeout(limit, run).await else {
        panic!("{what} did not finish within {limit:?}; stderr:\n{}", tail(&p.log(), 40));
    };
    // Anything the program started and left running (an ssh ProxyCommand) holds its stderr.
    let mut rx = p.log.clone();
    if timeout(LIMIT, rx.wait_for(|l| l.closed == p.streams)).await.is_err() {
        panic!("{what} exited ({status}) but left a process holding its stderr:\n{}", tail(&p.log(), 40));
    }
    Output { status, stdout, stderr: p.log().into_bytes() }
}

/// The last `n` lines of a log, for failure messages.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let skip = lines.len().saturating_sub(n);
    let head = if skip > 0 { format!("[{skip} lines before]\n") } else { String::new() };
    head + &lines[skip..].join("\n")
}

/// Like [`output`], and panics (showing both streams) unless the command succeeded.
pub async fn run_ok(what: &str, cmd: &mut Command) -> String {
    let out = output(what, cmd, LIMIT).await;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let err = tail(&err_text(&out), 40);
    assert!(out.status.success(), "{what} failed: {}\nstdout:\n{}\nstderr:\n{err}", out.status, tail(&text, 40));
    text
}

pub fn err_text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Lowercase hex of a digest.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
