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

use std::time::Duration;

use common::cli::BIN;
use common::faults::{Gate, KillLoop, Outage};
use common::http::Pattern;
use common::procs::{self, hex, s, tail, Out, Proc, LIMIT};
use common::sshboot::{holdfast_procs, run_test, wait_gone, Setup};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader, Lines};
use tokio::process::ChildStdout;
use tokio::process::Command;
use tokio::time::timeout;

const MIB: u64 = 1 << 20;

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
        // 255, as ssh's own failures: a script tells them from the remote command's status.
        assert_eq!(out.status.code(), Some(255), "{err}");
        let line =
            err.lines().find(|l| l.starts_with("holdfast: error:")).unwrap_or_else(|| panic!("no error line:\n{err}"));
        assert!(line.contains("box has no `/nonexistent/holdfast`") && line.contains("--server PATH"), "{line}");
        assert_eq!(err.matches("holdfast: error:").count(), 1, "one message:\n{err}");
        // The port range blocked between here and there (packets dropped): one message that
        // names the port and what to do.
        let _outage = Outage::start(setup.port);
        let out = procs::output("holdfast ssh", &mut setup.holdfast_ssh(&["true"]), LIMIT).await;
        let err = procs::err_text(&out);
        assert_eq!(out.status.code(), Some(255), "{err}");
        let line =
            err.lines().find(|l| l.starts_with("holdfast: error:")).unwrap_or_else(|| panic!("no error line:\n{err}"));
        let at = format!("127.0.0.1:{}", setup.port);
        assert!(line.contains(&at) && line.contains("open them in its firewall"), "{line}");
        eprintln!("{name}: {line}");
    })
    .await;
}

/// `holdfast ssh -N -L`: ssh's own local forward, carried by the resilient stream, takes
/// pgbench through `ss -K` kills with no failed transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_local_forward_carries_pgbench_through_kills() {
    let name = "ssh_local_forward_carries_pgbench_through_kills";
    if let Err(reason) = common::postgres::check() {
        return procs::skip(name, &reason);
    }
    run_test(name, &["runuser"], Duration::from_secs(150), || async {
        let setup = Setup::start("sshpg").await;
        let pg = common::postgres::Postgres::start(&setup.dir).await;
        let local = common::procs::free_port();
        let forward = format!("127.0.0.1:{local}:127.0.0.1:{}", pg.port);
        let mut ssh =
            Proc::spawn("holdfast ssh -N -L", &mut setup.holdfast_ssh_opts(&["-N", "-L", &forward]), Out::Null);
        // The forward is ssh's: it listens once the session is up.
        let deadline = std::time::Instant::now() + LIMIT;
        while tokio::net::TcpStream::connect(("127.0.0.1", local)).await.is_err() {
            assert!(std::time::Instant::now() < deadline, "ssh's forward never listened:\n{}", tail(&ssh.log(), 30));
            assert!(ssh.child.try_wait().unwrap().is_none(), "holdfast ssh exited:\n{}", tail(&ssh.log(), 30));
            tokio::time::sleep(Duration::from_millis(50)).await; // polling for the listener, bounded
        }
        let pgbench = || {
            let mut cmd = Command::new(common::postgres::bin("pgbench").unwrap());
            cmd.args(["-h", "127.0.0.1", "-p", &local.to_string(), "-U", common::postgres::USER]);
            cmd
        };
        procs::run_ok("pgbench -i", pgbench().args(["-i", "postgres"])).await;
        let kills = KillLoop::start(setup.port, Duration::from_millis(500), &Gate::new());
        let out = procs::output("pgbench -T 20", pgbench().args(["-T", "20", "-c", "4", "postgres"]), LIMIT * 3).await;
        let k = kills.stop();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "pgbench exited {}:\n{text}\n{}", out.status, procs::err_text(&out));
        assert!(text.contains("number of failed transactions: 0"), "{text}");
        assert!(k.kills >= 5, "only {} kills destroyed a connection: {k:?}", k.kills);
        assert!(ssh.child.try_wait().unwrap().is_none(), "holdfast ssh exited:\n{}", tail(&ssh.log(), 30));
        let done = text.lines().find(|l| l.contains("actually processed")).unwrap_or("").trim().to_string();
        eprintln!("{name}: {done}, 0 failed; {k:?}");
    })
    .await;
}
