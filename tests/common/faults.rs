//! Faults for real-client tests: kill the tunnel's real TCP connections with `ss -K`, and count
//! how many kills actually destroyed an established socket.
//!
//! `ss -K dst 127.0.0.1 dport = :PORT` destroys every TCP socket of this host whose peer is the
//! holdfast server's port, that is the client end of each real connection (the kernel sends a
//! reset to the server end). `ss` prints a socket only when destroying it succeeded, so its
//! output is the count. A *kill* is one `ss -K` that destroyed at least one established socket.
//!
//! Kills come from two places, counted together by a [`Gate`]:
//! - a [`KillLoop`], on a fixed schedule (every 300 or 500 ms), landing anywhere;
//! - the workload itself, through [`Gate::kill_now`] or a [`Pacer`], at chosen points: right
//!   after a command was sent, or each time a transfer has moved another step of bytes, while
//!   the data is still in flight. A fast machine can finish a transfer between two scheduled
//!   kills; these kills do not depend on speed, so the minimum a test asserts always holds.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::process::Command;
use tokio::task::JoinHandle;

use super::procs::LIMIT;

/// What the kills did.
#[derive(Debug, Clone, Copy, Default)]
pub struct Kills {
    /// Runs of `ss -K`.
    pub rounds: u64,
    /// Runs that destroyed at least one established socket.
    pub kills: u64,
    /// Of those, the ones the workload asked for at a chosen point.
    pub on_demand: u64,
    /// Established sockets destroyed in all.
    pub sockets: u64,
}

#[derive(Default)]
struct State {
    port: OnceLock<u16>,
    rounds: AtomicU64,
    kills: AtomicU64,
    on_demand: AtomicU64,
    sockets: AtomicU64,
    errors: Mutex<Vec<String>>,
}

/// Counts kills and lets a workload make them; cheap to clone into server tasks. Made before
/// the kill loop that gives it the server's port, so that a service can hold it before the
/// tunnel (and so the port) exists.
#[derive(Clone, Default)]
pub struct Gate(Arc<State>);

impl Gate {
    pub fn new() -> Gate {
        Gate::default()
    }

    pub fn figures(&self) -> Kills {
        let st = &self.0;
        Kills {
            rounds: st.rounds.load(Ordering::Relaxed),
            kills: st.kills.load(Ordering::Relaxed),
            on_demand: st.on_demand.load(Ordering::Relaxed),
            sockets: st.sockets.load(Ordering::Relaxed),
        }
    }

    /// One `ss -K` round; returns the sockets it destroyed.
    async fn round(&self) -> u64 {
        let Some(&port) = self.0.port.get() else { return 0 };
        match kill_connections(port).await {
            Ok(n) => {
                self.0.rounds.fetch_add(1, Ordering::Relaxed);
                self.0.sockets.fetch_add(n, Ordering::Relaxed);
                if n > 0 {
                    self.0.kills.fetch_add(1, Ordering::Relaxed);
                }
                n
            }
            Err(e) => {
                self.0.errors.lock().unwrap().push(e);
                0
            }
        }
    }

    /// Kills the real connections now, retrying (bounded by [`LIMIT`]) while there is none
    /// established (the client may be between two of them). Returns whether one was killed;
    /// a workload goes on either way, and the test's final count says whether faults happened.
    pub async fn kill_now(&self) -> bool {
        let deadline = Instant::now() + LIMIT;
        while Instant::now() < deadline && self.0.port.get().is_some() {
            if self.round().await > 0 {
                self.0.on_demand.fetch_add(1, Ordering::Relaxed);
                return true;
            }
            tokio::time::sleep(Duration::from_millis(5)).await; // polling for a link, bounded
        }
        false
    }

    /// A pacer that kills once per `step` bytes of a transfer.
    pub fn pacer(&self, step: u64) -> Pacer {
        Pacer { gate: self.clone(), step, next: step }
    }
}

/// Kills the real connections each time a transfer has moved another `step` bytes, without
/// waiting for the data in flight to drain first.
pub struct Pacer {
    gate: Gate,
    step: u64,
    next: u64,
}

impl Pacer {
    /// Called with the bytes moved so far.
    pub async fn at(&mut self, done: u64) {
        while done >= self.next {
            self.next += self.step;
            self.gate.kill_now().await;
        }
    }
}

/// Kills the real connections to `127.0.0.1:port` every `every` until stopped or dropped.
pub struct KillLoop {
    gate: Gate,
    task: JoinHandle<()>,
}

impl KillLoop {
    /// Starts killing; `gate` counts the kills and can make more (see [`Gate::kill_now`]).
    pub fn start(port: u16, every: Duration, gate: &Gate) -> KillLoop {
        assert!(gate.0.port.set(port).is_ok(), "the gate already has a kill loop");
        let g = gate.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await; // the first tick is immediate; let the workload start first
            loop {
                tick.tick().await;
                g.round().await;
            }
        });
        KillLoop { gate: gate.clone(), task }
    }

    /// Stops the loop; returns the figures. Panics if `ss` itself failed.
    pub fn stop(self) -> Kills {
        self.task.abort();
        let errors = self.gate.0.errors.lock().unwrap().clone();
        assert!(errors.is_empty(), "ss -K failed: {errors:?}");
        self.gate.figures()
    }
}

impl Drop for KillLoop {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Destroys the established TCP sockets whose peer is `127.0.0.1:port`; returns how many.
pub async fn kill_connections(port: u16) -> Result<u64, String> {
    let out = Command::new("ss")
        .args(["-K", "-H", "-t", "dst", "127.0.0.1", "dport", "=", &format!(":{port}")])
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("cannot run ss: {e}"))?;
    if !out.status.success() {
        return Err(format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr)));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text.lines().filter(|l| l.starts_with("ESTAB")).count() as u64)
}

/// Runs `test` if `tools`, root and a working `ss -K` are there (else it says "skipped", or
/// fails under `HOLDFAST_REQUIRE_TOOLS=1`), within `limit`.
#[allow(dead_code)]
pub async fn run_killing<F: std::future::Future<Output = ()>>(
    name: &str,
    tools: &[&str],
    limit: Duration,
    test: impl FnOnce() -> F,
) {
    let ready = match super::procs::check_tools(&[&["ss"], tools].concat()) {
        Ok(()) => check_ss_kill().await,
        Err(e) => Err(e),
    };
    if let Err(reason) = ready {
        return super::procs::skip(name, &reason);
    }
    let start = Instant::now();
    if tokio::time::timeout(limit, test()).await.is_err() {
        panic!("{name}: did not finish within {limit:?}");
    }
    eprintln!("{name}: passed in {:.1?}", start.elapsed());
}

/// Checks that `ss -K` can destroy a loopback connection here (it needs root and a kernel with
/// `CONFIG_INET_DIAG_DESTROY`); returns the reason if not.
pub async fn check_ss_kill() -> Result<(), String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(|e| e.to_string())?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    let _client = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.map_err(|e| e.to_string())?;
    let _server = listener.accept().await.map_err(|e| e.to_string())?;
    match kill_connections(port).await? {
        0 => Err("ss -K destroyed nothing (kernel without CONFIG_INET_DIAG_DESTROY?)".into()),
        _ => Ok(()),
    }
}

/// True if `tools` are installed and `ss -K` works here; otherwise reports `test` as skipped (or
/// fails it in CI, see [`super::procs::skip`]) and returns false.
pub async fn ready(test: &str, tools: &[&str]) -> bool {
    let ready = match super::procs::check_tools(tools) {
        Ok(()) => check_ss_kill().await,
        Err(e) => Err(e),
    };
    match ready {
        Ok(()) => true,
        Err(reason) => {
            super::procs::skip(test, &reason);
            false
        }
    }
}

/// Drops every TCP packet to or from `port` on this host while it lives (an nftables table of
/// its own, deleted on drop): a silent outage of the links to the remote server.
pub struct Outage {
    table: String,
}

impl Outage {
    pub fn start(port: u16) -> Outage {
        let table = format!("hfssh{port}");
        let script = format!(
            "table inet {table} {{\n chain input {{\n  type filter hook input priority -10\n  tcp dport {port} drop\n  tcp sport {port} drop\n }}\n}}\n"
        );
        nft(&["-f", "-"], Some(&script));
        Outage { table }
    }
}

impl Drop for Outage {
    fn drop(&mut self) {
        nft(&["delete", "table", "inet", &self.table], None);
    }
}

fn nft(args: &[&str], input: Option<&str>) {
    use std::io::Write as _;
    let mut child = std::process::Command::new("nft")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("cannot run nft");
    if let Some(text) = input {
        child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    }
    drop(child.stdin.take());
    let status = child.wait().unwrap();
    assert!(status.success() || std::thread::panicking(), "nft {args:?} failed: {status}");
}
