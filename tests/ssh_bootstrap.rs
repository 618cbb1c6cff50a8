//! `holdfast ssh`: a real OpenSSH sshd on 127.0.0.1 (its own config and keys, in the test's temp
//! dir), the user's side configured only by an ssh config file given with `-F` (which also sets
//! `ServerAliveInterval 3`, as many users' configs do), and the `holdfast` binary as the remote
//! one (`--server PATH`). Nothing else is set up: no keys, no allow-list, no server.
//!
//! Each test gives `holdfast ssh` a one-port `--ports` range of its own, so that it knows the
//! port of the remote server it starts, kills that port's connections with `ss -K` and cuts it
//! with nftables. Tests skip ("skipped: reason") without root, sshd, ss or nft, unless
//! `HOLDFAST_REQUIRE_TOOLS=1`.
#![cfg(unix)]

mod common;

use std::future::Future;
use std::time::{Duration, Instant};

use common::cli::BIN;
use common::faults::{check_ss_kill, Gate, KillLoop, Outage};
use common::http::Pattern;
use common::procs::{self, check_tools, free_port, hex, s, tail, Out, Proc, TempDir, LIMIT};
use common::sshd::{self, Sshd};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader, Lines};
use tokio::process::ChildStdout;
use tokio::process::Command;
use tokio::time::timeout;

const MIB: u64 = 1 << 20;

/// Runs `test` if root, `tools`, sshd and a working `ss -K` are there, within `limit`.
async fn run_test<F: Future<Output = ()>>(name: &str, tools: &[&str], limit: Duration, test: impl FnOnce() -> F) {
    let ready = match check_tools(&[&["ss"], &sshd::TOOLS[..], tools].concat()) {
        Ok(()) => check_ss_kill().await,
        Err(e) => Err(e),
    };
    if let Err(reason) = ready {
        return procs::skip(name, &reason);
    }
    let start = Instant::now();
    if timeout(limit, test()).await.is_err() {
        panic!("{name}: did not finish within {limit:?}");
    }
    eprintln!("{name}: passed in {:.1?}", start.elapsed());
}

/// An sshd, and the user's side: an ssh config naming it as host `box`.
struct Setup {
    dir: TempDir,
    sshd: Sshd,
    config: String,
    /// The one port the remote holdfast server may take.
    port: u16,
}

impl Setup {
    async fn start(tag: &str) -> Setup {
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
    fn ports(&self) -> String {
        format!("{0}-{0}", self.port)
    }

    /// `holdfast -v ssh --server BIN --ports P-P -F CONFIG box REMOTE`, its private directory
    /// under the test's `run` directory (XDG_RUNTIME_DIR).
    fn holdfast_ssh(&self, remote: &[&str]) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.args(["-v", "ssh", "--server", BIN, "--ports", &self.ports(), "-F", &self.config, "box"]).args(remote);
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
fn holdfast_procs(want: &[&str]) -> Vec<u32> {
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
async fn wait_gone(word: &str, limit: Duration) -> Vec<u32> {
    let deadline = Instant::now() + limit;
    loop {
        let left = holdfast_procs(&[word]);
        if left.is_empty() || Instant::now() >= deadline {
            return left;
        }
        tokio::time::sleep(Duration::from_millis(50)).await; // polling for an exit, bounded
    }
}

/// The pids of `roots` and of every process they started (by parent pid).
fn tree(roots: &[u32]) -> Vec<u32> {
    let mut parents = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // pid (comm) state ppid ...: comm may hold spaces, so read after its closing ')'.
        let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
        parents.extend(ppid.map(|pp| (pid, pp)));
    }
    let mut all = roots.to_vec();
    let mut i = 0;
    while i < all.len() {
        let p = all[i];
        all.extend(parents.iter().filter(|(_, pp)| *pp == p).map(|(pid, _)| *pid));
        i += 1;
    }
    all
}

/// Every run of 43 base64 characters followed by `=` (how a 32-byte key is written) in the
/// command line and environment of `pids`: key material where any local user can read it.
fn keys_in_proc(pids: &[u32]) -> Vec<String> {
    let b64 = |b: u8| b.is_ascii_alphanumeric() || b == b'+' || b == b'/';
    let mut found = Vec::new();
    for pid in pids {
        for file in ["cmdline", "environ"] {
            let Ok(bytes) = std::fs::read(format!("/proc/{pid}/{file}")) else { continue };
            let mut run = 0;
            for (i, &b) in bytes.iter().enumerate() {
                if b64(b) {
                    run += 1;
                    continue;
                }
                if b == b'=' && run == 43 {
                    found.push(format!("/proc/{pid}/{file}: {}", String::from_utf8_lossy(&bytes[i - 43..=i])));
                }
                run = 0;
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cat_64mib_through_kills_with_exit_status_and_no_keys_in_proc() {
    let name = "cat_64mib_through_kills_with_exit_status_and_no_keys_in_proc";
    run_test(name, &[], Duration::from_secs(240), || async {
        const LEN: u64 = 64 * MIB;
        let setup = Setup::start("sshcat").await;
        let file = setup.dir.path("data.bin");
        let want = Pattern::write_file(23, LEN, &file);
        let remote = format!("cat {}; exit 7", s(&file));
        let mut ssh = Proc::spawn("holdfast ssh", &mut setup.holdfast_ssh(&[&remote]), Out::Piped);
        let mut out = ssh.child.stdout.take().unwrap();
        let gate = Gate::new();
        let kills = KillLoop::start(setup.port, Duration::from_millis(200), &gate);
        let mut pacer = gate.pacer(4 * MIB);
        let mut hash = Sha256::new();
        let (mut got, mut buf) = (0u64, vec![0u8; 256 * 1024]);
        let mut scanned = false;
        loop {
            let n = match timeout(LIMIT, out.read(&mut buf)).await {
                Ok(Ok(n)) => n,
                r => panic!("reading ssh's output after {got} bytes: {r:?}; stderr:\n{}", tail(&ssh.log(), 30)),
            };
            if n == 0 {
                break;
            }
            hash.update(&buf[..n]);
            got += n as u64;
            if !scanned && got >= LEN / 2 {
                // Mid-session: every process (ssh, its ProxyCommand, the remote server, sshd).
                scanned = true;
                let mut pids = tree(&[ssh.pid(), setup.sshd.proc.pid()]);
                let server = holdfast_procs(&["--detached", &setup.ports()]);
                assert_eq!(server.len(), 1, "one remote server");
                pids.extend(server);
                let keys = keys_in_proc(&pids);
                assert!(keys.is_empty(), "key material in /proc during the session: {keys:?}");
                let dirs: Vec<_> = std::fs::read_dir(setup.dir.path("run")).unwrap().flatten().collect();
                assert_eq!(dirs.len(), 1, "one private directory during the session");
                use std::os::unix::fs::PermissionsExt as _;
                let mode = dirs[0].metadata().unwrap().permissions().mode() & 0o777;
                assert_eq!(mode, 0o700, "the private directory's mode");
                let inside: Vec<_> = std::fs::read_dir(dirs[0].path()).unwrap().flatten().collect();
                assert!(inside.is_empty(), "the session file was read once and removed: {inside:?}");
            }
            pacer.at(got).await;
        }
        let k = kills.stop();
        let (status, log) = ssh.exit().await;
        assert_eq!(got, LEN, "bytes received; stderr:\n{}", tail(&log, 30));
        assert_eq!(hex(&hash.finalize()), hex(&want), "SHA-256 of the received file");
        assert_eq!(status.code(), Some(7), "the remote command's exit status; stderr:\n{}", tail(&log, 30));
        assert!(k.kills >= 5, "only {} kills destroyed a connection: {k:?}", k.kills);
        assert!(scanned);
        let left = wait_gone(&setup.ports(), Duration::from_secs(10)).await;
        assert!(left.is_empty(), "remote holdfast servers left after the session: {left:?}");
        let run: Vec<_> = std::fs::read_dir(setup.dir.path("run")).unwrap().flatten().collect();
        assert!(run.is_empty(), "the private directory is removed at exit: {run:?}");
        eprintln!("{name}: {LEN} bytes SHA-256 equal, exit status 7, {k:?}");
    })
    .await;
}

/// Sends `line` to a remote shell and waits (bounded) for the line it should print.
async fn say(
    stdin: &mut tokio::process::ChildStdin,
    out: &mut Lines<BufReader<ChildStdout>>,
    line: &str,
    want: &str,
    ssh: &Proc,
) {
    let sent = stdin.write_all(format!("{line}\n").as_bytes()).await;
    assert!(sent.is_ok(), "cannot write {line:?} to ssh: {sent:?}; stderr:\n{}", tail(&ssh.log(), 30));
    let got = timeout(LIMIT, out.next_line()).await;
    assert!(
        matches!(&got, Ok(Ok(Some(l))) if l == want),
        "after {line:?}: want {want:?}, got {got:?}; stderr:\n{}",
        tail(&ssh.log(), 30)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_alive_interval_3_survives_a_20s_outage() {
    let name = "server_alive_interval_3_survives_a_20s_outage";
    run_test(name, &["nft"], Duration::from_secs(150), || async {
        let setup = Setup::start("sshoutage").await;
        let mut ssh = Proc::spawn("holdfast ssh", &mut setup.holdfast_ssh(&["sh"]), Out::Piped);
        let mut stdin = ssh.child.stdin.take().unwrap();
        let mut out = BufReader::new(ssh.child.stdout.take().unwrap()).lines();
        say(&mut stdin, &mut out, "echo before", "before", &ssh).await;
        let outage = Outage::start(setup.port);
        // The outage itself: longer than ssh's ServerAliveInterval 3 x ServerAliveCountMax 3
        // (the user's config), and than holdfast's own dead-after (15 s).
        tokio::time::sleep(Duration::from_secs(20)).await;
        drop(outage);
        say(&mut stdin, &mut out, "echo after", "after", &ssh).await;
        stdin.write_all(b"exit 5\n").await.unwrap();
        let (status, log) = ssh.exit().await;
        assert_eq!(status.code(), Some(5), "the session ended by its own exit; stderr:\n{}", tail(&log, 30));
        eprintln!("{name}: the shell answered after a 20 s outage, with ServerAliveInterval 3 in the user's config");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_client_leaves_no_server_after_expiry() {
    let name = "a_vanished_client_leaves_no_server_after_expiry";
    run_test(name, &[], Duration::from_secs(90), || async {
        let setup = Setup::start("sshvanish").await;
        let cmd = setup.holdfast_ssh(&["sh"]);
        // `--session-expiry` is holdfast's own option: it goes before ssh's.
        let args: Vec<String> = cmd.as_std().get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        let mut cmd = Command::new(BIN);
        cmd.args(&args[..2]).args(["--session-expiry", "3s"]).args(&args[2..]);
        cmd.env("XDG_RUNTIME_DIR", setup.dir.path("run"));
        let mut ssh = Proc::spawn("holdfast ssh", &mut cmd, Out::Piped);
        let mut stdin = ssh.child.stdin.take().unwrap();
        let mut out = BufReader::new(ssh.child.stdout.take().unwrap()).lines();
        say(&mut stdin, &mut out, "echo up", "up", &ssh).await;
        assert_eq!(holdfast_procs(&["--detached", &setup.ports()]).len(), 1, "the remote server runs");
        // The client side vanishes at once: holdfast ssh, ssh and its ProxyCommand, killed.
        drop(ssh);
        let left = wait_gone(&setup.ports(), Duration::from_secs(30)).await;
        assert!(
            left.is_empty(),
            "the remote server is still there 30 s after its client vanished (expiry 3 s): {left:?}"
        );
        eprintln!("{name}: the remote server exited after its session expired");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_user_cannot_use_the_bootstrapped_server() {
    let name = "another_user_cannot_use_the_bootstrapped_server";
    run_test(name, &["setpriv"], Duration::from_secs(90), || async {
        let setup = Setup::start("sshuid").await;
        let mut ssh = Proc::spawn("holdfast ssh", &mut setup.holdfast_ssh(&["sh"]), Out::Piped);
        let mut stdin = ssh.child.stdin.take().unwrap();
        let mut out = BufReader::new(ssh.child.stdout.take().unwrap()).lines();
        say(&mut stdin, &mut out, "echo up", "up", &ssh).await;
        let log = ssh.wait_log("the remote holdfast server is ready", 1).await;
        let server_key = log
            .split_whitespace()
            .find_map(|w| w.strip_prefix("server_key="))
            .expect("the server's public key in the log")
            .to_string();
        // uid 65534's own directory and key.
        let theirs = setup.dir.path("nobody");
        std::fs::create_dir(&theirs).unwrap();
        std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
        let as_nobody = |args: &[&str]| {
            let mut cmd = Command::new("setpriv");
            cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"]).args(args);
            cmd
        };
        let key = theirs.join("k");
        let out1 = procs::output("keygen", &mut as_nobody(&[BIN, "keygen", "--out", s(&key)]), LIMIT).await;
        assert!(out1.status.success(), "keygen as 65534: {}", procs::err_text(&out1));
        // It cannot read this session's private directory (where the client's key was).
        let dirs: Vec<_> = std::fs::read_dir(setup.dir.path("run")).unwrap().flatten().collect();
        assert_eq!(dirs.len(), 1);
        let ls = procs::output("ls", &mut as_nobody(&["ls", s(&dirs[0].path())]), LIMIT).await;
        assert!(!ls.status.success(), "uid 65534 could list the session's private directory");
        // With its own key, the server refuses it.
        let server = format!("127.0.0.1:{}", setup.port);
        let key_file = format!("{}.key", s(&key));
        let connect =
            [BIN, "connect", "--server", &server, "--server-key", &server_key, "--key", &key_file, "--service", "ssh"];
        let tried = procs::output("connect as 65534", &mut as_nobody(&connect), LIMIT).await;
        let err = procs::err_text(&tried);
        assert!(!tried.status.success(), "uid 65534 reached the service: {err}");
        assert!(tried.stdout.is_empty(), "uid 65534 got bytes from the service: {:?}", tried.stdout);
        // The session goes on.
        say(&mut stdin, &mut out, "echo still", "still", &ssh).await;
        stdin.write_all(b"exit 0\n").await.unwrap();
        let (status, log) = ssh.exit().await;
        assert!(status.success(), "stderr:\n{}", tail(&log, 30));
        eprintln!("{name}: refused: {}", err.lines().last().unwrap_or(""));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_holdfast_on_the_remote_or_a_blocked_port_says_what_to_do() {
    let name = "no_holdfast_on_the_remote_or_a_blocked_port_says_what_to_do";
    run_test(name, &["nft"], Duration::from_secs(90), || async {
        let setup = Setup::start("sshmissing").await;
        let mut cmd = Command::new(BIN);
        cmd.args(["ssh", "--server", "/nonexistent/holdfast", "-F", &setup.config, "box", "true"]);
        let out = procs::output("holdfast ssh", &mut cmd, LIMIT).await;
        let err = procs::err_text(&out);
        assert_eq!(out.status.code(), Some(1), "{err}");
        let line =
            err.lines().find(|l| l.starts_with("holdfast: error:")).unwrap_or_else(|| panic!("no error line:\n{err}"));
        assert!(line.contains("box has no `/nonexistent/holdfast`") && line.contains("--server PATH"), "{line}");
        assert_eq!(err.matches("holdfast: error:").count(), 1, "one message:\n{err}");
        // The port range blocked between here and there (packets dropped): one message that
        // names the port and what to do.
        let _outage = Outage::start(setup.port);
        let out = procs::output("holdfast ssh", &mut setup.holdfast_ssh(&["true"]), LIMIT).await;
        let err = procs::err_text(&out);
        assert_eq!(out.status.code(), Some(1), "{err}");
        let line =
            err.lines().find(|l| l.starts_with("holdfast: error:")).unwrap_or_else(|| panic!("no error line:\n{err}"));
        let at = format!("127.0.0.1:{}", setup.port);
        assert!(line.contains(&at) && line.contains("open them in its firewall"), "{line}");
        eprintln!("{name}: {line}");
    })
    .await;
}

/// A tmux server of the test's own (its socket name), killed on drop.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn run(&self, args: &[&str]) -> String {
        let out = std::process::Command::new("tmux").args(["-L", &self.socket]).args(args).output().expect("tmux");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits (bounded) until `check` holds for the output of `tmux ARGS`; returns that output.
    async fn wait(&self, args: &[&str], check: impl Fn(&str) -> bool) -> String {
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

/// A full-screen program (vi, in tmux) while the link breaks and resumes: its screen is left as
/// it was (holdfast says nothing on it), and the keys typed meanwhile reach it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_screen_program_keeps_its_screen_through_a_fault() {
    let name = "a_full_screen_program_keeps_its_screen_through_a_fault";
    run_test(name, &["tmux", "vi"], Duration::from_secs(90), || async {
        let setup = Setup::start("sshvi").await;
        let file = setup.dir.path("lines.txt");
        std::fs::write(&file, (1..=200).map(|i| format!("line {i}\n")).collect::<String>()).unwrap();
        let tmux = Tmux { socket: format!("holdfast-test-{}-{}", std::process::id(), setup.port) };
        let command = format!(
            "env XDG_RUNTIME_DIR={} {BIN} ssh --server {BIN} --ports {} -F {} -t box vi {}",
            s(&setup.dir.path("run")),
            setup.ports(),
            setup.config,
            s(&file)
        );
        tmux.run(&["new-session", "-d", "-s", "t", "-x", "100", "-y", "30", &command]);
        let screen = |t: &str| t.lines().take(25).map(str::to_string).collect::<Vec<_>>();
        let before = tmux.wait(&["capture-pane", "-p", "-t", "t"], |t| t.contains("line 25")).await;
        assert_eq!(tmux.run(&["display", "-p", "-t", "t", "#{cursor_y}"]).trim(), "0", "{before}");
        let mut killed = 0;
        while killed == 0 {
            killed = common::faults::kill_connections(setup.port).await.unwrap();
        }
        tmux.run(&["send-keys", "-t", "t", "j"]);
        tmux.wait(&["display", "-p", "-t", "t", "#{cursor_y}"], |t| t.trim() == "1").await;
        let after = tmux.run(&["capture-pane", "-p", "-t", "t"]);
        assert!(!after.contains("holdfast:"), "holdfast wrote on vi's screen:\n{after}");
        assert_eq!(screen(&after), screen(&before), "vi's screen changed:\n{after}");
        tmux.wait(&["display", "-p", "-t", "t", "#{pane_title}"], |t| !t.contains("holdfast")).await;
        tmux.run(&["send-keys", "-t", "t", ":q!", "Enter"]);
        eprintln!("{name}: vi's screen unchanged through a kill; the title given back");
    })
    .await;
}

/// `holdfast connect --on-fault ask` under ssh, in tmux: after a fault, `n` ends the session on
/// the server too (not left for its expiry), with a message that says what the user did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answering_n_to_recover_ends_the_session_on_the_server() {
    let name = "answering_n_to_recover_ends_the_session_on_the_server";
    run_test(name, &["tmux"], Duration::from_secs(90), || async {
        let dir = TempDir::new("sshask");
        let sshd = Sshd::start(&dir).await;
        let tunnel =
            common::tunnel::Tunnel::start(&dir, &[("ssh", std::net::SocketAddr::from(([127, 0, 0, 1], sshd.port)))])
                .await;
        let rc_file = dir.path("connect.rc");
        let proxy = format!("{} --on-fault ask", tunnel.proxy_command("ssh", &rc_file));
        let command = format!(
            "ssh -F /dev/null -t -i {} -p {} -o IdentitiesOnly=yes -o UserKnownHostsFile=/dev/null \
             -o StrictHostKeyChecking=no -o BatchMode=yes -o LogLevel=ERROR -o 'ProxyCommand={proxy}' root@127.0.0.1",
            s(sshd.key()),
            sshd.port
        );
        let tmux = Tmux { socket: format!("holdfast-test-ask-{}-{}", std::process::id(), tunnel.port()) };
        tmux.run(&["new-session", "-d", "-s", "t", "-x", "150", "-y", "30", &format!("{command}; sleep 5")]);
        let pane = ["capture-pane", "-p", "-t", "t"];
        tmux.run(&["send-keys", "-t", "t", "echo ready-$((6*7))", "Enter"]);
        tmux.wait(&pane, |t| t.contains("ready-42")).await;
        let mut killed = 0;
        while killed == 0 {
            killed = common::faults::kill_connections(tunnel.port()).await.unwrap();
        }
        tmux.wait(&pane, |t| t.contains("Recover? [Y/n]")).await;
        tmux.run(&["send-keys", "-t", "t", "n"]);
        let screen = tmux.wait(&pane, |t| t.contains("you answered n")).await;
        assert!(!screen.contains("on-fault hook"), "{screen}");
        let log = tunnel.server.wait_log("session ended", 1).await;
        let line = log.lines().find(|l| l.contains("session ended")).unwrap();
        assert!(line.contains("stream aborted"), "{line}");
        // ssh may be blocked reading the terminal (it raced holdfast for the answer key): a key
        // lets it see that its connection is gone.
        tmux.run(&["send-keys", "-t", "t", "x"]);
        let rc = wait_file(&rc_file).await;
        assert_eq!(rc.trim(), "0", "holdfast connect exited {rc}");
        eprintln!("{name}: the server ended the session: {line}");
    })
    .await;
}

async fn wait_file(path: &std::path::Path) -> String {
    let deadline = Instant::now() + LIMIT;
    loop {
        if let Ok(t) = std::fs::read_to_string(path) {
            return t;
        }
        assert!(Instant::now() < deadline, "{} did not appear", s(path));
        tokio::time::sleep(Duration::from_millis(20)).await; // polling a condition, bounded
    }
}
