//! Child processes: a started path ([`Tool`]) and how its processes are spawned and awaited.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use super::util::err;

/// A started tool: its processes (each in its own process group) and the port to connect to.
pub(crate) struct Tool {
    /// How the path is reported.
    pub(crate) name: &'static str,
    /// Where a program connects to use the path.
    pub(crate) entry: SocketAddr,
    /// Its processes, servers first and the client-side process (the one a program connects
    /// to) last.
    pub(crate) children: Vec<Child>,
    /// The process whose memory and CPU are the "server" figures.
    pub(crate) server_pid: Option<u32>,
}

impl Tool {
    /// A path with no processes yet, reached at `entry`; processes are pushed as they start, so
    /// that dropping it on a failed start ends them.
    pub(crate) fn new(name: &'static str, entry: SocketAddr) -> Self {
        Tool { name, entry, children: Vec::new(), server_pid: None }
    }

    /// The client-side process: the last of two or more (a path of one process, or none, has
    /// no client side of its own).
    pub(crate) fn client_pid(&self) -> Option<u32> {
        (self.children.len() >= 2).then(|| self.children.last().map(|c| c.id())).flatten()
    }

    /// Ends every process and waits for it.
    pub(crate) fn kill(&mut self) {
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

/// Starts `program` in a process group of its own, its output in `dir/log`.
pub(crate) fn spawn(dir: &Path, log: &str, program: impl AsRef<std::ffi::OsStr>, args: &[String]) -> io::Result<Child> {
    use std::os::unix::process::CommandExt;
    let out = std::fs::File::create(dir.join(log))?;
    Command::new(program).args(args).stdin(Stdio::null()).stdout(out.try_clone()?).stderr(out).process_group(0).spawn()
}

/// Waits (up to 15 s) until `addr` accepts a connection; fails early if one of `child`
/// exits.
pub(crate) async fn wait_port(addr: SocketAddr, child: &mut [Child]) -> io::Result<()> {
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

/// The outcome of starting a path.
pub(crate) enum Setup {
    /// Started.
    Ready(Tool),
    /// Not run, and why (a tool not installed).
    Skipped(String),
    /// It would not start, and why.
    Failed(String),
}
