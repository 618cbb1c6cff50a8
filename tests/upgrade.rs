//! Upgrading a server without losing a session (issue 14, part 1), with real processes on
//! loopback. A `holdfast server --handover PATH` hands its listening socket to a new server
//! started with the same path, keeps its own sessions, and exits when they have ended.
//!
//! - 20 `holdfast connect` streams, data flowing both ways, while the links are killed and the
//!   server is upgraded twice in a row (once by starting the new server by hand, once by
//!   SIGUSR2): every byte intact (SHA-256), no session lost, the first server's sessions
//!   resume through two handovers, a new session lands on the newest process, and the old
//!   processes exit once their sessions end.
//! - A crash (SIGKILL) of an old process that holds sessions: each of its clients is told its
//!   session is lost, never left hanging, while the new process serves on.
//!
//! Each test prints "skipped: <reason>" without root or `ss -K` (CI has both and sets
//! HOLDFAST_REQUIRE_TOOLS, which turns a skip into a failure).

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cli::echo_service;
use common::echo::{pattern, try_collect, Client, KIB};
use common::faults::{kill_connections, ready, Gate, KillLoop};
use common::procs::{self, run_ok, s, tail, Out, Proc, TempDir, LIMIT};
use common::tunnel::{write_keys, KeyFiles, BIN, FAST};
use rustix::process::{kill_process, Pid, Signal};
use tokio::process::Command;

/// Keys, an echo service and the arguments of every server process of one test.
struct Setup {
    dir: TempDir,
    server_pub: PathBuf,
    client_key: PathBuf,
    args: Vec<String>,
}

impl Setup {
    async fn new(tag: &str) -> Setup {
        let dir = TempDir::new(tag);
        let KeyFiles { server_key, server_pub, client_key, authorized, .. } = write_keys(&dir);
        let echo = echo_service().await;
        let mut args: Vec<String> =
            ["server", "--listen", "127.0.0.1:0", "--key", s(&server_key)].map(String::from).into();
        args.extend(["--authorized", s(&authorized), "--service", &format!("echo={echo}")].map(String::from));
        args.extend(["--handover", s(&dir.path("handover.sock"))].map(String::from));
        args.extend(FAST.map(String::from));
        // Every client comes from 127.0.0.1, as from one large NAT, and each reconnects at every
        // kill (2.5 a second): at the default rate of 20 handshakes a second from one address,
        // some would be told BUSY long enough to give up. DEPLOY.md gives the same advice.
        args.extend(["--handshake-rate", "1000"].map(String::from));
        Setup { dir, server_pub, client_key, args }
    }

    fn server(&self, n: usize) -> Proc {
        let mut cmd = Command::new(BIN);
        cmd.args(&self.args).env_remove("RUST_LOG");
        Proc::spawn(&format!("holdfast server {n}"), &mut cmd, Out::Null)
    }

    fn client(&self, i: usize, addr: SocketAddr) -> Client {
        Client::start(i, addr, s(&self.server_pub), s(&self.client_key))
    }
}

/// The pid logged on the `n`th (from 1) "server ready" line of `log`.
fn ready_pid(log: &str, n: usize) -> u32 {
    let line = log.lines().filter(|l| l.contains("server ready")).nth(n - 1).expect("no such server ready line");
    line.split_whitespace().find_map(|w| w.strip_prefix("pid=")).and_then(|p| p.parse().ok()).expect("no pid")
}

fn signal(pid: u32, sig: Signal) {
    kill_process(Pid::from_raw(pid as i32).unwrap(), sig).unwrap();
}

/// Waits (bounded) until `progress` reaches `at`.
async fn progress_reaches(progress: &AtomicU64, at: u64) {
    let deadline = Instant::now() + LIMIT;
    while progress.load(Ordering::Relaxed) < at {
        assert!(Instant::now() < deadline, "the transfers stalled at {} bytes", progress.load(Ordering::Relaxed));
        tokio::time::sleep(Duration::from_millis(5)).await; // polling a counter, bounded
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_streams_survive_two_upgrades_in_a_row_while_links_are_killed() {
    let name = "twenty_streams_survive_two_upgrades_in_a_row_while_links_are_killed";
    if !ready(name, &["ss"]).await {
        return;
    }
    let start = Instant::now();
    const CLIENTS: usize = 20;
    const LEN: usize = 4096 * KIB;
    let setup = Setup::new("upgrade").await;
    let first = setup.server(1);
    let addr = first.logged_addr("server ready", "listen=").await;
    let mut clients: Vec<Client> = (0..CLIENTS).map(|i| setup.client(i, addr)).collect();
    first.wait_log("session opened", CLIENTS).await;

    // Data both ways on every stream, links killed all along; the upgrades happen mid-transfer.
    let gate = Gate::new();
    let kills = KillLoop::start(addr.port(), Duration::from_millis(400), &gate);
    let progress = Arc::new(AtomicU64::new(0));
    let mut all = Vec::new();
    for (i, mut c) in clients.drain(..).enumerate() {
        let (gate, progress) = (gate.clone(), progress.clone());
        all.push(tokio::spawn(async move {
            let (data, want) = pattern(i as u64, LEN);
            let pace = (i == 0).then_some((&gate, 256 * KIB));
            let got = c.exchange(&data, pace, Some(&progress)).await;
            (c, want, got)
        }));
    }
    let total = (CLIENTS * LEN) as u64;

    // Upgrade 1: a new server started by hand with the same --handover.
    progress_reaches(&progress, total / 5).await;
    let at_first_upgrade = progress.load(Ordering::Relaxed);
    let second = setup.server(2);
    second.wait_log("took over the listener of the running server", 1).await;
    assert_eq!(second.logged_addr("server ready", "listen=").await, addr, "the port moved");
    first.wait_log("handed the listener over to a new server process", 1).await;

    // Upgrade 2: SIGUSR2 to the newest, which starts the next itself (its log goes to the
    // same stderr as the second's).
    progress_reaches(&progress, total / 2).await;
    let at_second_upgrade = progress.load(Ordering::Relaxed);
    signal(second.pid(), Signal::USR2);
    second.wait_log("handed the listener over to a new server process", 1).await;
    let third_pid = ready_pid(&second.wait_log("server ready", 2).await, 2);
    assert_ne!(third_pid, second.pid());

    let clients = match try_collect(all, "the transfers").await {
        Ok(c) => c,
        Err(e) => {
            let (log1, log2) = (first.log(), second.log());
            panic!(
                "{e}\nthe first server's log:\n{}\nthe second's (and the third's):\n{}",
                tail(&log1, 60),
                tail(&log2, 60)
            )
        }
    };
    let k = kills.stop();
    assert!(k.kills >= 5, "only {} kills: recovery was not tested", k.kills);
    assert!(at_first_upgrade < total && at_second_upgrade < total, "an upgrade came after the data");

    // The first server's sessions resumed after both handovers: through the third process, to
    // the second, to the first.
    let log1 = first.log();
    let after_handover = log1.split("handed the listener over").nth(1).unwrap_or_default();
    let resumed_late = after_handover.matches("session resumed").count();
    assert!(resumed_late > 0, "no session of the first server resumed after the handover:\n{}", tail(&log1, 40));
    assert_eq!(log1.matches("session opened").count(), CLIENTS);

    // A new session lands on the newest process, which logs on the second's stderr; the second
    // (retired) opens none itself.
    let before = second.log().matches("session opened").count();
    assert_eq!(before, 0, "a session opened on the second server or before the third was up");
    let mut late = setup.client(99, addr);
    let (data, want) = pattern(99, 64 * KIB);
    assert_eq!(late.exchange(&data, None, None).await.unwrap(), want);
    second.wait_log("session opened", 1).await;
    assert_eq!(first.log().matches("session opened").count(), CLIENTS, "a new session went to the first");

    // The streams end: the first server exits once its last session has ended, then the
    // second, which only passed resumes on to it. The third serves on.
    for (i, c) in clients.into_iter().enumerate() {
        let (status, log) = c.close().await;
        assert!(status.success(), "client {i} exited {status}:\n{log}");
    }
    let mut first = first;
    let (status, log1) = first.exit().await;
    assert!(status.success(), "the first server exited {status}:\n{}", tail(&log1, 20));
    assert!(log1.contains("this process's last session has ended; exiting"), "{}", tail(&log1, 20));
    assert!(!log1.contains("session ended") && !log1.contains("expired"), "{}", tail(&log1, 40));
    second.wait_log("this process's last session has ended; exiting", 1).await;
    assert_eq!(late.exchange(&pattern(100, 4 * KIB).0, None, None).await.map(|_| ()).ok(), Some(()));
    signal(third_pid, Signal::TERM);
    eprintln!(
        "{name}: {CLIENTS} streams x 4 MiB each way, every SHA-256 equal, through {} kills and two upgrades (at {} and {} MiB); {resumed_late} resumes of the first server's sessions after its handover; passed in {:.1?}",
        k.kills,
        at_first_upgrade >> 20,
        at_second_upgrade >> 20,
        start.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_process_that_crashes_is_reported_to_each_of_its_clients_as_session_lost() {
    let name = "an_old_process_that_crashes_is_reported_to_each_of_its_clients_as_session_lost";
    if !ready(name, &["ss"]).await {
        return;
    }
    const CLIENTS: usize = 5;
    let setup = Setup::new("upgrade-crash").await;
    let mut first = setup.server(1);
    let addr = first.logged_addr("server ready", "listen=").await;
    let mut clients: Vec<Client> = (0..CLIENTS).map(|i| setup.client(i, addr)).collect();
    first.wait_log("session opened", CLIENTS).await;
    for (i, c) in clients.iter_mut().enumerate() {
        let (data, want) = pattern(i as u64, 64 * KIB);
        assert_eq!(c.exchange(&data, None, None).await.unwrap(), want);
    }
    let second = setup.server(2);
    first.wait_log("handed the listener over to a new server process", 1).await;
    let mut late = setup.client(9, addr);
    let (data, want) = pattern(9, 64 * KIB);
    assert_eq!(late.exchange(&data, None, None).await.unwrap(), want);

    signal(first.pid(), Signal::KILL);
    let _ = first.exit().await;
    second.wait_log("the earlier server process has exited", 1).await;
    kill_connections(addr.port()).await.unwrap();
    for (i, mut c) in clients.into_iter().enumerate() {
        let (data, _) = pattern(100 + i as u64, 4 * KIB);
        assert!(c.exchange(&data, None, None).await.is_err(), "client {i}'s stream went on after its server died");
        let (status, log) = c.close().await;
        assert!(!status.success(), "client {i} exited {status}");
        assert!(log.contains("session lost"), "client {i} was not told its session is lost:\n{log}");
    }
    // The new process's own session is untouched.
    let (data, want) = pattern(10, 64 * KIB);
    assert_eq!(late.exchange(&data, None, None).await.unwrap(), want);
    let (status, log) = late.close().await;
    assert!(status.success(), "{log}");
    drop(second);
}

#[tokio::test]
async fn the_example_systemd_unit_is_valid() {
    let name = "the_example_systemd_unit_is_valid";
    if procs::which("systemd-analyze").is_none() {
        procs::skip(name, "not installed: systemd-analyze");
        return;
    }
    let unit =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/holdfast-server.service")).unwrap();
    assert!(
        unit.contains("--handover /run/holdfast/handover.sock") && unit.contains("ExecReload=/bin/kill -USR2 $MAINPID")
    );
    // systemd checks that ExecStart's program exists: point it at the binary under test.
    let dir = TempDir::new("unit");
    let path = dir.path("holdfast-server.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/holdfast", BIN)).unwrap();
    let out =
        procs::output("systemd-analyze verify", Command::new("systemd-analyze").args(["verify", s(&path)]), LIMIT)
            .await;
    let err = procs::err_text(&out);
    // It warns (and still exits 0) about unknown keys and bad values: any output is a failure.
    assert!(out.status.success() && err.trim().is_empty(), "systemd-analyze verify: {}\n{err}", out.status);
    // Not root, sandboxed (review 2, item 13): the exposure systemd rates at most 2.0 of 10 (the
    // unit as shipped before rated 9.0 UNSAFE).
    assert!(unit.contains("\nUser=holdfast\n") && unit.contains("\nRuntimeDirectory=holdfast\n"));
    let out = procs::output(
        "systemd-analyze security",
        Command::new("systemd-analyze").args(["security", "--offline=yes", "--threshold=20", s(&path)]),
        LIMIT,
    )
    .await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "systemd-analyze security: {}\n{}", out.status, tail(&text, 60));
}

/// A notification socket as systemd's: a datagram socket at `NOTIFY_SOCKET`.
fn notify_socket(dir: &TempDir) -> (std::os::unix::net::UnixDatagram, PathBuf) {
    let path = dir.path("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(LIMIT)).unwrap();
    (sock, path)
}

fn next_notification(sock: &std::os::unix::net::UnixDatagram) -> String {
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf).expect("no notification in time");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_is_told_ready_and_the_new_main_process_after_a_handover() {
    let setup = Setup::new("notify").await;
    let (sock, path) = notify_socket(&setup.dir);
    let spawn = |n: usize| {
        let mut cmd = Command::new(BIN);
        cmd.args(&setup.args).env_remove("RUST_LOG").env("NOTIFY_SOCKET", &path);
        Proc::spawn(&format!("holdfast server {n}"), &mut cmd, Out::Null)
    };
    let first = spawn(1);
    let got = tokio::task::block_in_place(|| next_notification(&sock));
    assert!(got.contains(&format!("MAINPID={}", first.pid())) && got.contains("READY=1"), "{got:?}");
    let second = spawn(2);
    let got = tokio::task::block_in_place(|| next_notification(&sock));
    assert!(got.contains(&format!("MAINPID={}", second.pid())) && got.contains("READY=1"), "{got:?}");
    // The first had no session: it exits as soon as it has handed over.
    let mut first = first;
    let (status, log) = first.exit().await;
    assert!(status.success(), "{}", tail(&log, 20));
    drop(second);
}

/// Review 2, item 11: the shipped `examples/server.toml` (metrics on 127.0.0.1:9770, handover
/// in /run/holdfast), copied as it is, upgraded by SIGUSR2 as `systemctl reload` does. The new
/// process is handed the metrics socket with the listener instead of failing to bind it after
/// taking the listener (a full outage before): the old session goes on, new sessions and scrapes
/// reach the new process. It runs in namespaces of its own (network: the config's fixed ports;
/// mount: a /run/holdfast as systemd's RuntimeDirectory= makes; pid: nothing outlives it): this
/// test re-executes itself inside `unshare`, and the inner run does the work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_example_config_upgrades_on_sigusr2_with_metrics_on() {
    let name = "the_shipped_example_config_upgrades_on_sigusr2_with_metrics_on";
    if std::env::var_os(IN_NAMESPACES).is_some() {
        return example_config_upgrade().await;
    }
    if let Err(reason) = procs::check_tools(&["unshare", "ip", "mount"]) {
        procs::skip(name, &reason);
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new("unshare");
    cmd.args(["--net", "--mount", "--pid", "--fork", "--kill-child", "--mount-proc", "--propagation", "private"])
        .arg(&exe)
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(IN_NAMESPACES, "1");
    let out = procs::output("the test in its namespaces", &mut cmd, 3 * LIMIT).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}\n{}\n{}", out.status, tail(&text, 40), tail(&procs::err_text(&out), 60));
    assert!(text.contains("1 passed"), "the inner run did not run the test:\n{text}");
}

/// Set in the inner run of [`the_shipped_example_config_upgrades_on_sigusr2_with_metrics_on`].
const IN_NAMESPACES: &str = "HOLDFAST_TEST_IN_NAMESPACES";

/// One HTTP request; the whole reply.
async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut sock = tokio::net::TcpStream::connect(addr).await?;
    sock.write_all(format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes()).await?;
    let mut reply = String::new();
    tokio::time::timeout(LIMIT, sock.read_to_string(&mut reply)).await.expect("no answer in time")?;
    Ok(reply)
}

async fn example_config_upgrade() {
    run_ok("ip link set lo up", Command::new("ip").args(["link", "set", "lo", "up"])).await;
    run_ok("mount /run", Command::new("mount").args(["-t", "tmpfs", "-o", "mode=0755", "tmpfs", "/run"])).await;
    std::fs::create_dir("/run/holdfast").unwrap();
    // The example, byte for byte, with its keys where it names them (relative to the file).
    let dir = TempDir::new("example");
    let example = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/server.toml")).unwrap();
    assert!(example.contains("metrics = \"127.0.0.1:9770\"") && example.contains("\"ssh=127.0.0.1:22\""));
    std::fs::write(dir.path("server.toml"), &example).unwrap();
    std::fs::create_dir(dir.path("keys")).unwrap();
    let (server, client) = (holdfast::keys::Keypair::generate(), holdfast::keys::Keypair::generate());
    holdfast::keys::save_private_key(&dir.path("keys/server.key"), &server.private).unwrap();
    holdfast::keys::save_public_key(&dir.path("server.pub"), &server.public).unwrap();
    holdfast::keys::save_private_key(&dir.path("laptop.key"), &client.private).unwrap();
    std::fs::write(dir.path("keys/authorized"), format!("{} laptop\n", client.public)).unwrap();
    // The "ssh" service: an echo on 127.0.0.1:22 (this network namespace's own).
    let ssh = tokio::net::TcpListener::bind("127.0.0.1:22").await.unwrap();
    tokio::spawn(async move {
        while let Ok((sock, _)) = ssh.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = sock.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let connect = |i: usize| {
        let mut cmd = Command::new(BIN);
        cmd.args(["connect", "--server", "127.0.0.1:7700", "--service", "ssh", "--server-key"])
            .args([s(&dir.path("server.pub")), "--key", s(&dir.path("laptop.key"))])
            .args(FAST)
            .env_remove("RUST_LOG");
        let mut proc = Proc::spawn(&format!("holdfast connect {i}"), &mut cmd, Out::Piped);
        let stdin = proc.child.stdin.take();
        let stdout = proc.child.stdout.take().unwrap();
        Client { proc, stdin, stdout }
    };
    let metrics: SocketAddr = "127.0.0.1:9770".parse().unwrap();

    let mut cmd = Command::new(BIN);
    cmd.args(["server", "--config", s(&dir.path("server.toml"))]).env_remove("RUST_LOG");
    let mut first = Proc::spawn("holdfast server (example config)", &mut cmd, Out::Null);
    first.wait_log("metrics endpoint ready", 1).await;
    first.wait_log("server ready", 1).await;
    let mut old_session = connect(1);
    let (data, want) = pattern(1, 64 * KIB);
    assert_eq!(old_session.exchange(&data, None, None).await.unwrap(), want);
    let reply = http_get(metrics, "/metrics").await.unwrap();
    assert!(reply.contains("holdfast_sessions{state=\"attached\"} 1\n"), "{reply}");

    // systemctl reload: SIGUSR2; the new process logs to the same stderr.
    signal(first.pid(), Signal::USR2);
    first.wait_log("handed the listener over to a new server process", 1).await;
    let log = first.wait_log("server ready", 2).await;
    let new_pid = ready_pid(&log, 2);
    assert!(!log.contains("ERROR") && !log.contains("error:"), "{}", tail(&log, 30));
    // The old process's metrics task stops on the handover by itself: its line may come after
    // the new process is ready.
    first.wait_log("metrics endpoint handed to the new server process", 1).await;

    // A new session reaches the new process; the old session goes on in the old one.
    let mut new_session = connect(2);
    let (data, want) = pattern(2, 64 * KIB);
    assert_eq!(new_session.exchange(&data, None, None).await.unwrap(), want);
    let (data, want) = pattern(3, 64 * KIB);
    assert_eq!(old_session.exchange(&data, None, None).await.unwrap(), want);
    // The example's status socket is the new process's: it lists the new session (the old
    // process's is not its to show), and counts the old process's.
    let shown = run_ok("holdfast status", Command::new(BIN).args(["status", "--json"]).env_remove("RUST_LOG")).await;
    assert_eq!(shown.matches("\"id\":").count(), 1, "{shown}");
    assert!(shown.contains("\"client\":\"laptop\"") && shown.contains("\"state\":\"attached\""), "{shown}");
    assert!(shown.contains("\"earlier_process_sessions\":1}"), "{shown}");
    let table = run_ok("holdfast status", Command::new(BIN).args(["status"]).env_remove("RUST_LOG")).await;
    assert!(table.contains("and 1 session(s) of an earlier server process, kept since an upgrade"), "{table}");
    let reply = http_get(metrics, "/metrics").await.unwrap();
    assert!(reply.contains("holdfast_earlier_process_sessions 1\n"), "{reply}");
    // The old process's last session ends: it exits; the new one answers the scrapes.
    let (status, log) = old_session.close().await;
    assert!(status.success(), "{log}");
    first.wait_log("this process's last session has ended; exiting", 1).await;
    first.wait_log("the earlier server process has exited", 1).await;
    let reply = http_get(metrics, "/metrics").await.unwrap();
    assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
    assert!(reply.contains("holdfast_sessions{state=\"attached\"} 1\n"), "{reply}");
    assert!(reply.contains("holdfast_client_sessions{client=\"laptop\"} 1\n"), "{reply}");
    assert!(reply.contains("holdfast_earlier_process_sessions 0\n"), "{reply}");
    // The old process, exiting cleanly, left the status socket the new one had taken over.
    let shown = run_ok("holdfast status", Command::new(BIN).args(["status", "--json"]).env_remove("RUST_LOG")).await;
    assert!(shown.contains("\"earlier_process_sessions\":0}"), "{shown}");
    let (status, log) = new_session.close().await;
    assert!(status.success(), "{log}");
    signal(new_pid, Signal::TERM);
    let (status, log) = first.exit().await;
    assert!(status.success(), "{}", tail(&log, 30));
}

/// Review 2, item 11: a new process that fails before it takes over (here: its --metrics address
/// is taken) leaves the old one serving: new connections still work, systemd hears nothing from
/// the failed process, and a later upgrade still finds the old one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_process_that_fails_before_the_takeover_leaves_the_old_one_serving() {
    let setup = Setup::new("upgrade-fails").await;
    let (notify, path) = notify_socket(&setup.dir);
    let spawn = |n: usize, extra: &[&str]| {
        let mut cmd = Command::new(BIN);
        cmd.args(&setup.args).args(extra).env_remove("RUST_LOG").env("NOTIFY_SOCKET", &path);
        Proc::spawn(&format!("holdfast server {n}"), &mut cmd, Out::Null)
    };
    let first = spawn(1, &[]);
    let addr = first.logged_addr("server ready", "listen=").await;
    let got = tokio::task::block_in_place(|| next_notification(&notify));
    assert!(got.contains("READY=1"), "{got:?}");

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = taken.local_addr().unwrap().to_string();
    let mut second = spawn(2, &["--metrics", &taken]);
    let (status, log) = second.exit().await;
    assert!(!status.success(), "the second server started with its metrics address taken:\n{log}");
    assert!(log.contains(&format!("--metrics {taken}: cannot listen")), "{}", tail(&log, 10));
    first.wait_log("the new server process did not take over; this one goes on serving", 1).await;
    notify.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 512];
    let heard = notify.recv(&mut buf).map(|n| String::from_utf8_lossy(&buf[..n]).into_owned());
    assert!(heard.is_err(), "the failed process told systemd {heard:?}");

    // The first still accepts: a new session works.
    let mut c = setup.client(1, addr);
    let (data, want) = pattern(1, 64 * KIB);
    assert_eq!(c.exchange(&data, None, None).await.unwrap(), want);
    assert!(!first.log().contains("handed the listener over"), "{}", tail(&first.log(), 20));
    first.wait_log("session opened", 1).await;
    // And a good upgrade still finds it.
    let third = spawn(3, &[]);
    third.wait_log("took over the listener of the running server", 1).await;
    first.wait_log("handed the listener over to a new server process", 1).await;
    let (status, log) = c.close().await;
    assert!(status.success(), "{log}");
    drop((first, third));
}

/// A stop of the whole service after an upgrade (`systemctl stop` signals both processes at
/// once) is not reported as the new process crashing, and leaves no handover socket behind; a
/// new process killed alone is still reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_both_processes_after_an_upgrade_is_not_reported_as_a_crash() {
    for crash in [false, true] {
        let setup = Setup::new(if crash { "upgrade-newdies" } else { "upgrade-stopboth" }).await;
        let mut first = setup.server(1);
        let addr = first.logged_addr("server ready", "listen=").await;
        let mut client = setup.client(0, addr);
        first.wait_log("session opened", 1).await;
        let (data, want) = pattern(1, 64 * KIB);
        assert_eq!(client.exchange(&data, None, None).await.unwrap(), want);
        let mut second = setup.server(2);
        first.wait_log("handed the listener over to a new server process", 1).await;
        second.wait_log("server ready", 1).await;
        if crash {
            signal(second.pid(), Signal::KILL);
            first.wait_log("the new server process closed the handover connection", 1).await;
            assert!(!first.log().contains("as this one is stopping too"), "{}", first.log());
            signal(first.pid(), Signal::TERM);
        } else {
            // The new process first, as it may happen under systemd.
            signal(second.pid(), Signal::TERM);
            signal(first.pid(), Signal::TERM);
        }
        let (_, log) = first.exit().await;
        let (_, second_log) = second.exit().await;
        let _ = client.close().await;
        if !crash {
            let left: Vec<_> = std::fs::read_dir(setup.dir.root()).unwrap().flatten().map(|e| e.file_name()).collect();
            assert!(
                !setup.dir.path("handover.sock").exists(),
                "the handover socket was left behind: {left:?}\n{}",
                tail(&second_log, 30)
            );
            assert!(
                !log.contains("closed the handover connection"),
                "a stop of both processes was reported as the new one ending on its own:\n{}",
                tail(&log, 20)
            );
        }
    }
}
