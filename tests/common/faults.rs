//! Faults for real-client tests: kill the tunnel's real TCP connections with `ss -K` on a
//! schedule, and count how many kills actually destroyed an established socket.
//!
//! `ss -K dst 127.0.0.1 dport = :PORT` destroys every TCP socket of this host whose peer is the
//! holdfast server's port, that is the client end of each real connection (the kernel sends a
//! reset to the server end). `ss` prints a socket only when destroying it succeeded, so its
//! output is the count. A *kill* is one round that destroyed at least one established socket.
//!
//! A workload that could outrun the schedule (a fast transfer, a short command loop) can ask the
//! [`Gate`] to wait for the kill count to reach a figure before it goes on, so that the faults a
//! test asserts do not depend on the machine's speed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::process::Command;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::procs::LIMIT;

/// What a kill loop did.
#[derive(Debug, Clone, Copy, Default)]
pub struct Kills {
    /// Rounds of `ss -K` run.
    pub rounds: u64,
    /// Rounds that destroyed at least one established socket.
    pub kills: u64,
    /// Established sockets destroyed in all.
    pub sockets: u64,
}

struct State {
    kills: watch::Sender<u64>,
    rounds: AtomicU64,
    sockets: AtomicU64,
    errors: std::sync::Mutex<Vec<String>>,
}

/// Lets a workload wait for faults; cheap to clone into server tasks. Made before the kill loop
/// that drives it, so that a service can hold it before the tunnel (and so its port) exists.
#[derive(Clone)]
pub struct Gate(Arc<State>);

impl Gate {
    pub fn new() -> Gate {
        Gate(Arc::new(State {
            kills: watch::channel(0).0,
            rounds: AtomicU64::new(0),
            sockets: AtomicU64::new(0),
            errors: Default::default(),
        }))
    }

    /// Kills so far.
    pub fn kills(&self) -> u64 {
        *self.0.kills.borrow()
    }

    /// Waits (bounded by [`LIMIT`]) until at least `n` kills happened; returns whether they did.
    /// A workload should go on either way: the test's final count says whether faults happened.
    pub async fn wait_kills(&self, n: u64) -> bool {
        let mut rx = self.0.kills.subscribe();
        let reached = tokio::time::timeout(LIMIT, rx.wait_for(|&k| k >= n)).await.is_ok();
        reached
    }

    /// For a transfer of bytes: at `done` bytes, waits for one kill per `step` bytes so far.
    pub async fn pace(&self, done: u64, step: u64) {
        self.wait_kills(done / step).await;
    }
}

impl Default for Gate {
    fn default() -> Gate {
        Gate::new()
    }
}

/// Kills the real connections to `127.0.0.1:port` every `every` until stopped or dropped.
pub struct KillLoop {
    gate: Gate,
    task: JoinHandle<()>,
}

impl KillLoop {
    /// Starts killing; `gate` counts the kills (use [`Gate::new`] when nothing else needs it).
    pub fn start(port: u16, every: Duration, gate: &Gate) -> KillLoop {
        let st = gate.0.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await; // the first tick is immediate; let the workload start first
            loop {
                tick.tick().await;
                match kill_connections(port).await {
                    Ok(n) => {
                        st.rounds.fetch_add(1, Ordering::Relaxed);
                        st.sockets.fetch_add(n, Ordering::Relaxed);
                        if n > 0 {
                            st.kills.send_modify(|k| *k += 1);
                        }
                    }
                    Err(e) => st.errors.lock().unwrap().push(e),
                }
            }
        });
        KillLoop { gate: gate.clone(), task }
    }

    pub fn gate(&self) -> Gate {
        self.gate.clone()
    }

    pub fn figures(&self) -> Kills {
        let st = &self.gate.0;
        Kills {
            rounds: st.rounds.load(Ordering::Relaxed),
            kills: self.gate.kills(),
            sockets: st.sockets.load(Ordering::Relaxed),
        }
    }

    /// Stops the loop; returns its figures. Panics if `ss` itself failed.
    pub fn stop(self) -> Kills {
        self.task.abort();
        let errors = self.gate.0.errors.lock().unwrap().clone();
        assert!(errors.is_empty(), "ss -K failed: {errors:?}");
        self.figures()
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
