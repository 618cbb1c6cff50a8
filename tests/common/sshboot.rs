//! The set-up of the `holdfast ssh` tests (`tests/ssh_bootstrap.rs`, `tests/ssh_terminal.rs`):
//! a real OpenSSH sshd on 127.0.0.1 (its own config and keys, in the test's temp dir), the
//! user's side configured only by an ssh config file given with `-F` (which also sets
//! `ServerAliveInterval 3`, as many users' configs do), and the `holdfast` binary as the remote
//! one (`--server PATH`). Each test gives `holdfast ssh` a one-port `--ports` range of its own,
//! so that it knows the port of the remote server it starts.

use std::future::Future;
use std::time::{Duration, Instant};

use tokio::process::Command;

use super::cli::BIN;
use super::faults::run_killing;
use super::procs::{free_port, s, TempDir, LIMIT};
use super::sshd::{self, Sshd};

/// Runs `test` if root, `tools`, sshd and a working `ss -K` are there, within `limit`.
pub async fn run_test<F: Future<Output = ()>>(name: &str, tools: &[&str], limit: Duration, test: impl FnOnce() -> F) {
    run_killing(name, &[&sshd::TOOLS[..], tools].concat(), limit, test).await
}

/// An sshd, and the user's side: an ssh config naming it as host `box`.
pub struct Setup {
    pub dir: TempDir,
    pub sshd: Sshd,
    pub config: String,
    /// The one port the remote holdfast server may take.
    pub port: u16,
}

impl Setup {
    pub async fn start(tag: &str) -> Setup {
        let dir = TempDir::new(tag);
        let sshd = Sshd::start(&dir).await;
        let config = dir.path("ssh_config");
        std::fs::write(
            &config,
            format!(
                "Host box\n  HostName 127.0.0.1\n  Port {}\n  User root\n  IdentityFile {}\n  IdentitiesOnly yes\n  \
                 UserKnownHostsFile /dev/null\n  GlobalKnownHostsFile /dev/null\n  StrictHostKeyChecking no\n  \
                 BatchMode yes\n  LogLevel ERROR\n  ServerAliveInterval 3\n",
                sshd.port,
                s(sshd.key()),
            ),
        )
        .unwrap();
        std::fs::create_dir_all(dir.path("run")).unwrap();
        Setup { config: s(&config).to_string(), sshd, port: free_port(), dir }
    }

    /// The `--ports` value: one port.
    pub fn ports(&self) -> String {
        format!("{0}-{0}", self.port)
    }

    /// `holdfast -v ssh --server BIN --ports P-P -F CONFIG box REMOTE`, its private directory
    /// under the test's `run` directory (XDG_RUNTIME_DIR).
    pub fn holdfast_ssh(&self, remote: &[&str]) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.args(["-v", "ssh", "--server", BIN, "--ports", &self.ports(), "-F", &self.config, "box"]).args(remote);
        cmd.env("XDG_RUNTIME_DIR", self.dir.path("run")).env_remove("RUST_LOG");
        cmd
    }
    /// `holdfast -v ssh --server BIN --ports P-P -F CONFIG SSH_OPTS box`.
    pub fn holdfast_ssh_opts(&self, opts: &[&str]) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.args(["-v", "ssh", "--server", BIN, "--ports", &self.ports(), "-F", &self.config]).args(opts).arg("box");
        cmd.env("XDG_RUNTIME_DIR", self.dir.path("run")).env_remove("RUST_LOG");
        cmd
    }
}

impl Drop for Setup {
    /// A remote server the test left (it failed, or its client never came) is ended here.
    fn drop(&mut self) {
        for pid in holdfast_procs(&["--detached", &self.ports()]) {
            if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
    }
}

/// Pids of processes running the holdfast binary whose command line has each of `want`.
pub fn holdfast_procs(want: &[&str]) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let words: Vec<String> = cmdline.split(|&b| b == 0).map(|w| String::from_utf8_lossy(w).into_owned()).collect();
        if words.first().is_some_and(|w| w == BIN) && want.iter().all(|x| words.iter().any(|w| w == x)) {
            found.push(pid);
        }
    }
    found
}

/// Waits (bounded by `limit`) until no holdfast process has `word` on its command line.
pub async fn wait_gone(word: &str, limit: Duration) -> Vec<u32> {
    let deadline = Instant::now() + limit;
    loop {
        let left = holdfast_procs(&[word]);
        if left.is_empty() || Instant::now() >= deadline {
            return left;
        }
        tokio::time::sleep(Duration::from_millis(50)).await; // polling for an exit, bounded
    }
}

/// A tmux server of the test's own (its socket name), killed on drop.
pub struct Tmux {
    pub socket: String,
}

impl Tmux {
    pub fn run(&self, args: &[&str]) -> String {
        let out = std::process::Command::new("tmux").args(["-L", &self.socket]).args(args).output().expect("tmux");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits (bounded) until `check` holds for the output of `tmux ARGS`; returns that output.
    pub async fn wait(&self, args: &[&str], check: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + LIMIT;
        loop {
            let text = self.run(args);
            if check(&text) {
                return text;
            }
            assert!(Instant::now() < deadline, "tmux {args:?} never matched; last:\n{text}");
            tokio::time::sleep(Duration::from_millis(50)).await; // polling the screen, bounded
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        self.run(&["kill-server"]);
    }
}

/// Waits (bounded) until the file `path` exists; returns its text.
pub async fn wait_file(path: &std::path::Path) -> String {
    let deadline = Instant::now() + LIMIT;
    loop {
        if let Ok(t) = std::fs::read_to_string(path) {
            return t;
        }
        assert!(Instant::now() < deadline, "{} did not appear", s(path));
        tokio::time::sleep(Duration::from_millis(20)).await; // polling a condition, bounded
    }
}
