//! Tests of the `holdfast` binary itself: real processes, real sockets on loopback.
//!
//! The helpers (process guards, key files, an echo service) are in `tests/common/cli.rs`.
#![cfg(unix)]

mod common;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;
use std::time::Duration;

use common::chaos::ChaosProxy;
use common::cli::*;
use holdfast::keys::{self, Keypair};
use rand::{RngCore as _, SeedableRng as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::time::timeout;

#[tokio::test]
async fn keygen_writes_keys_and_refuses_overwrite() {
    let dir = TempDir::new("keygen");
    let prefix = dir.path("sub/laptop");
    let (status, out, err) = run(&["keygen", "--out", s(&prefix)], b"").await;
    assert!(status.success(), "{err}");
    let (key, public) = (dir.path("sub/laptop.key"), dir.path("sub/laptop.pub"));
    assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
    let pub_text = std::fs::read_to_string(&public).unwrap();
    assert_eq!(String::from_utf8(out).unwrap(), pub_text, "stdout is the public key");
    assert_eq!(pub_text.trim().len(), 44);

    let key_text = std::fs::read(&key).unwrap();
    let (status, out, err) = run(&["keygen", "--out", s(&prefix)], b"").await;
    assert_error(status, &err, &["refusing to overwrite", "laptop.key"]);
    assert!(out.is_empty());
    assert_eq!(std::fs::read(&key).unwrap(), key_text, "existing key was changed");
    assert_eq!(std::fs::read_to_string(&public).unwrap(), pub_text);

    let (status, out, err) = run(&["pubkey"], &key_text).await;
    assert!(status.success(), "{err}");
    assert_eq!(String::from_utf8(out).unwrap(), pub_text, "pubkey differs from the .pub file");

    // Into a directory others may write, which every command refuses to load a key from: refused
    // at once, nothing left there (found by a walk: reported as written).
    let open = dir.path("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let (status, out, err) = run(&["keygen", "--out", s(&open.join("k"))], b"").await;
    assert_error(status, &err, &["has mode 0777", "the key pair was not kept"]);
    assert!(out.is_empty());
    assert_eq!(std::fs::read_dir(&open).unwrap().count(), 0, "files were left in {}", open.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_moves_mib_both_ways() {
    let keys = Keys::new("forward");
    let echo = echo_service().await;
    let (_server, addr) = keys.server(&[format!("echo={echo}")]).await;
    let mut args = keys.client_args("client", addr, "echo");
    args.extend(["--local", "127.0.0.1:0"].map(String::from));
    let client = Proc::spawn(&strs(&args), false);
    let local = client.logged_addr("forwarding", "local=").await;
    // Two local connections at once, each its own resilient stream.
    tokio::join!(echo_roundtrip(local, 1, 4 * MIB), echo_roundtrip(local, 2, 3 * MIB + 17));
}

/// `--cipher` picks the link's AEAD; the server accepts both and logs which one a session uses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_cipher_carries_a_forward() {
    let keys = Keys::new("cipher");
    let echo = echo_service().await;
    let (server, addr) = keys.server(&[format!("echo={echo}")]).await;
    let mut seen = 0;
    for (i, cipher) in ["chacha20-poly1305", "aes-256-gcm"].into_iter().enumerate() {
        let mut args = keys.client_args("client", addr, "echo");
        args.extend(["--local", "127.0.0.1:0", "--cipher", cipher].map(String::from));
        let client = Proc::spawn(&strs(&args), false);
        let local = client.logged_addr("forwarding", "local=").await;
        echo_roundtrip(local, 10 + i as u64, MIB + 3).await;
        // The client's one session (its start-up check and the forwarded connection are
        // streams of it) uses the cipher.
        let log = server.wait_log("session opened", seen + 1).await;
        let lines: Vec<&str> = log.lines().filter(|l| l.contains("session opened")).skip(seen).collect();
        assert!(lines.iter().all(|l| l.contains(&format!("cipher={cipher}"))), "{lines:#?}");
        seen += lines.len();
    }
    let (status, _, stderr) = run(&["client", "--cipher", "rot13"], b"").await;
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("'rot13'") && stderr.contains("aes-256-gcm, chacha20-poly1305"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_survives_killed_connections() {
    let keys = Keys::new("kill");
    let echo = echo_service().await;
    let (server, addr) = keys.server(&[format!("echo={echo}")]).await;
    let proxy = ChaosProxy::start(addr).await.unwrap();
    let mut args = keys.client_args("client", proxy.addr(), "echo");
    args.extend(["--local", "127.0.0.1:0"].map(String::from));
    let client = Proc::spawn(&strs(&args), false);
    let local = client.logged_addr("forwarding", "local=").await;

    let len = 24 * MIB;
    let transfer = tokio::spawn(echo_roundtrip(local, 7, len));
    for i in 1..=3 {
        let mark = proxy.bytes_forwarded() + 3 * MIB as u64;
        assert!(proxy.wait_for_bytes(mark, LIMIT).await, "no progress before kill {i}");
        proxy.kill_all();
        client.wait_log("link resumed", i).await;
    }
    let done = timeout(LIMIT, transfer).await;
    assert!(
        matches!(done, Ok(Ok(()))),
        "transfer failed: {done:?}\nclient:\n{}\nserver:\n{}",
        client.stderr(),
        server.stderr()
    );
    // The session's first connection (the start-up check is a stream of it), and one per kill.
    assert!(proxy.connections_accepted() >= 4, "the client did not reconnect through the relay");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_stdio_half_close() {
    let keys = Keys::new("stdio");
    let echo = echo_service().await;
    let (_server, addr) = keys.server(&[format!("echo={echo}")]).await;
    let mut input = vec![0u8; 2 * MIB + 123];
    rand::rngs::StdRng::seed_from_u64(3).fill_bytes(&mut input);
    let (status, out, err) = run(&strs(&keys.client_args("connect", addr, "echo")), &input).await;
    assert!(status.success(), "connect failed: {status}; stderr:\n{err}");
    assert!(out.len() == input.len() && out == input, "stdout is not exactly the input ({} bytes)", out.len());
    assert!(err.lines().all(is_log_line), "unexpected stderr:\n{err}");
}

/// A burst of local connections (a script, a browser) exceeds the server's per-source
/// handshake rate (20/s): the server answers BUSY and the forward tries again, so every one of
/// them gets through, and nothing claims a key problem.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_takes_a_burst_of_connections() {
    let keys = Keys::new("burst");
    let echo = echo_service().await;
    let (_server, addr) = keys.server(&[format!("echo={echo}")]).await;
    let mut args = keys.client_args("client", addr, "echo");
    args.extend(["--local", "127.0.0.1:0", "--no-check"].map(String::from));
    let client = Proc::spawn(&strs(&args), false);
    let local = client.logged_addr("forwarding", "local=").await;
    let mut burst = tokio::task::JoinSet::new();
    for i in 0..60u8 {
        burst.spawn(async move {
            let mut c = TcpStream::connect(local).await?;
            c.write_all(&[i; 32]).await?;
            c.shutdown().await?;
            let mut back = Vec::new();
            c.read_to_end(&mut back).await?;
            Ok::<_, std::io::Error>(back == [i; 32])
        });
    }
    let results = timeout(LIMIT, burst.join_all()).await.expect("the burst did not finish in time");
    let ok = results.iter().filter(|r| matches!(r, Ok(true))).count();
    assert_eq!(ok, 60, "{ok} of 60 connections echoed; client log:\n{}", client.stderr());
    assert!(!client.stderr().contains("allow-list"), "a rate limit was reported as a key problem");
}

/// `connect` is used by request/response programs (ssh above all): each message must come back
/// as soon as it is sent, with no newline, no more data and no EOF behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_delivers_every_message_at_once() {
    let keys = Keys::new("stdio-rt");
    let echo = echo_service().await;
    let (_server, addr) = keys.server(&[format!("echo={echo}")]).await;
    let mut conn = Proc::spawn(&strs(&keys.client_args("connect", addr, "echo")), true);
    let mut stdin = conn.child.stdin.take().unwrap();
    let mut stdout = conn.child.stdout.take().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut sizes = vec![6usize, 1, 64, 16 * 1024, 16 * 1024 - 1, 100_000];
    sizes.extend((0..20).map(|_| 1 + rng.next_u32() as usize % 20_000));
    for (i, n) in sizes.into_iter().enumerate() {
        let mut msg = vec![0u8; n];
        if i == 0 {
            msg.copy_from_slice(b"ping 0");
        } else {
            rng.fill_bytes(&mut msg);
        }
        stdin.write_all(&msg).await.unwrap();
        let mut back = vec![0u8; n];
        match timeout(Duration::from_secs(10), stdout.read_exact(&mut back)).await {
            Ok(r) => r.unwrap_or_else(|e| panic!("message {i} ({n} bytes): {e}; stderr:\n{}", conn.stderr())),
            Err(_) => panic!("message {i} ({n} bytes) did not come back while stdin stayed open"),
        };
        assert!(back == msg, "message {i} ({n} bytes) came back different");
    }
    drop(stdin);
    let mut rest = Vec::new();
    timeout(LIMIT, stdout.read_to_end(&mut rest)).await.expect("stdout did not close after EOF").unwrap();
    assert!(rest.is_empty());
    let (status, err) = conn.exit().await;
    assert!(status.success(), "connect failed: {status}; stderr:\n{err}");
}

/// ssh closes its ProxyCommand's pipes and sends it SIGHUP when it exits. `connect` must still
/// end the session cleanly, so the server does not keep it detached, waiting for a resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_closes_the_session_when_ssh_hangs_up() {
    let keys = Keys::new("stdio-hup");
    let echo = echo_service().await;
    let (server, addr) = keys.server(&[format!("echo={echo}")]).await;
    let mut conn = Proc::spawn(&strs(&keys.client_args("connect", addr, "echo")), true);
    let mut stdin = conn.child.stdin.take().unwrap();
    let mut stdout = conn.child.stdout.take().unwrap();
    stdin.write_all(b"last words").await.unwrap();
    let mut back = [0u8; 10];
    timeout(LIMIT, stdout.read_exact(&mut back)).await.expect("no echo").unwrap();
    // As ssh does on exit: close both pipes, then SIGHUP.
    drop((stdin, stdout));
    let pid = conn.child.id().and_then(|p| rustix::process::Pid::from_raw(p as i32)).expect("connect pid");
    rustix::process::kill_process(pid, rustix::process::Signal::HUP).expect("send SIGHUP");
    let (status, err) = conn.exit().await;
    assert!(status.success(), "connect did not exit cleanly on SIGHUP: {status}; stderr:\n{err}");
    let log = server.wait_log("session closed", 1).await;
    assert!(!log.contains("session detached"), "the server kept the session for a resume:\n{log}");
}

/// A client whose key is not on the allow-list learns nothing, but the server's log names its key
/// in a line ready to paste into the allow-list (once, however often it retries).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_logs_each_refused_client_key() {
    let keys = Keys::new("refused");
    let echo = echo_service().await;
    let (server, addr) = keys.server(&[format!("echo={echo}")]).await;
    let stranger = Keypair::generate();
    let stranger_key = keys.dir.path("stranger.key");
    keys::save_private_key(&stranger_key, &stranger.private).unwrap();
    let mut args = keys.client_args("connect", addr, "echo");
    let k = args.iter().position(|a| a == "--key").unwrap();
    args[k + 1] = s(&stranger_key).to_string();
    for _ in 0..3 {
        let (status, _, err) = run(&strs(&args), b"hi").await;
        assert!(!status.success());
        assert!(err.contains("The server logs every refused client key"), "{err}");
    }
    let log = server.wait_log("not on the allow-list", 1).await;
    let line = log.lines().find(|l| l.contains("not on the allow-list")).unwrap();
    assert!(line.contains(&format!("{} NAME", stranger.public)), "{line}");
    assert_eq!(log.matches("not on the allow-list").count(), 1, "logged more than once:\n{log}");
}

/// SIGHUP reloads the allow-list: a key added to the file can connect, a bad file keeps the list
/// in force (and the live session goes on), and a removed key can no longer start a session and
/// is cut off: its live session ends, and its client says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_list_reloads_on_sighup_and_a_removed_keys_session_ends() {
    let keys = Keys::new("reload");
    let newcomer = Keypair::generate();
    let newcomer_key = keys.dir.path("newcomer.key");
    keys::save_private_key(&newcomer_key, &newcomer.private).unwrap();
    let echo = echo_service().await;
    let (server, addr) = keys.server(&[format!("echo={echo}")]).await;
    let hup = || {
        let pid = server.child.id().and_then(|p| rustix::process::Pid::from_raw(p as i32)).expect("server pid");
        rustix::process::kill_process(pid, rustix::process::Signal::HUP).expect("send SIGHUP");
    };
    // A live session of the original client, through a forward.
    let mut args = keys.client_args("client", addr, "echo");
    args.extend(["--local", "127.0.0.1:0", "--no-check"].map(String::from));
    let client = Proc::spawn(&strs(&args), false);
    let local = client.logged_addr("forwarding", "local=").await;
    let mut live = TcpStream::connect(local).await.unwrap();
    let mut echo_on_live = async |n: u8| {
        live.write_all(&[n; 100]).await.unwrap();
        let mut back = [0u8; 100];
        timeout(LIMIT, live.read_exact(&mut back)).await.expect("echo timed out").unwrap();
        assert_eq!(back, [n; 100]);
    };
    echo_on_live(1).await;

    // The newcomer is refused; a malformed file changes nothing; then the file names only the
    // newcomer, who gets in.
    let mut newcomer_args = keys.client_args("connect", addr, "echo");
    let k = newcomer_args.iter().position(|a| a == "--key").unwrap();
    newcomer_args[k + 1] = s(&newcomer_key).to_string();
    let (status, _, err) = run(&strs(&newcomer_args), b"hi").await;
    assert!(!status.success(), "an unlisted key connected:\n{err}");
    std::fs::write(&keys.authorized, "not a key\n").unwrap();
    hup();
    server.wait_log("allow-list not reloaded", 1).await;
    let (status, _, _) = run(&strs(&newcomer_args), b"hi").await;
    assert!(!status.success(), "a failed reload let the newcomer in");
    echo_on_live(2).await;
    std::fs::write(&keys.authorized, format!("{} newcomer\n", newcomer.public)).unwrap();
    hup();
    server.wait_log("allow-list reloaded", 1).await;
    let (status, out, err) = run(&strs(&newcomer_args), b"hi").await;
    assert!(status.success(), "the newcomer was refused after the reload:\n{err}");
    assert_eq!(out, b"hi");

    // The original client is no longer listed: it cannot start a new session, and its live
    // session has ended, the client saying why.
    let (status, _, _) = run(&strs(&keys.client_args("connect", addr, "echo")), b"hi").await;
    assert!(!status.success(), "a removed key started a new session");
    let mut rest = Vec::new();
    let end = timeout(LIMIT, live.read_to_end(&mut rest)).await.expect("the removed key's live stream goes on");
    assert!(end.is_err() || rest.is_empty(), "{end:?} {rest:?}");
    client.wait_log("the server no longer allows this key", 1).await;
    let log = server.wait_log("ended_sessions=1", 1).await;
    assert!(log.contains("allow-list not reloaded"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_errors_name_their_cause() {
    let keys = Keys::new("errors");
    let echo = echo_service().await;
    let dead = closed_port();
    let (server, addr) = keys.server(&[format!("echo={echo}"), format!("dead={dead}")]).await;
    let connect = |server: SocketAddr, service: &str, edit: &dyn Fn(&mut Vec<String>)| {
        let mut args = keys.client_args("connect", server, service);
        edit(&mut args);
        async move { run(&strs(&args), b"").await }
    };
    let set = |flag: &'static str, value: String| {
        move |args: &mut Vec<String>| {
            let i = args.iter().position(|a| a == flag).unwrap();
            args[i + 1] = value.clone();
        }
    };
    let unreachable = closed_port();
    let (st, _, err) = connect(unreachable, "echo", &|_| {}).await;
    assert_error(st, &err, &["cannot reach server", &unreachable.to_string(), "refused"]);
    assert!(!err.contains("(os error 111): "), "cause repeated: {err}");

    // The server drops both silently by design, so the client names both possibilities.
    let refused = [
        "dropped the handshake",
        "pinned server key",
        "not on its allow-list",
        "logs every refused client key",
        "the pinned server key is the wrong one",
    ];
    let (st, _, err) = connect(addr, "echo", &set("--server-key", Keypair::generate().public.to_string())).await;
    assert_error(st, &err, &refused);
    let stranger = keys.dir.path("stranger.key");
    keys::save_private_key(&stranger, &Keypair::generate().private).unwrap();
    let (st, _, err) = connect(addr, "echo", &set("--key", s(&stranger).into())).await;
    assert_error(st, &err, &refused);

    let (st, _, err) = connect(addr, "nope", &|_| {}).await;
    assert_error(st, &err, &["no service named 'nope'"]);
    // The server's own error (here ECONNREFUSED) stays in its log; the client gets status 2.
    let (st, _, err) = connect(addr, "dead", &|_| {}).await;
    assert_error(st, &err, &["service 'dead' is unavailable", "could not connect to it", "its log has the cause"]);
    assert!(!err.contains("os error") && !err.to_lowercase().contains("connection refused"), "{err}");
    let log = server.wait_log("cannot connect to the service", 1).await;
    let line = log.lines().find(|l| l.contains("cannot connect to the service")).unwrap();
    assert!(line.contains(&dead.to_string()) && line.contains("Connection refused"), "{line}");
}

#[tokio::test]
async fn key_file_errors_name_their_cause() {
    let keys = Keys::new("keyfiles");
    let server = closed_port(); // keys are checked before any connection is tried
    let with_key = |path: PathBuf| {
        let mut args = keys.client_args("connect", server, "echo");
        let i = args.iter().position(|a| a == "--key").unwrap();
        args[i + 1] = s(&path).into();
        async move { run(&strs(&args), b"").await }
    };
    let missing = keys.dir.path("missing.key");
    let (st, _, err) = with_key(missing.clone()).await;
    assert_error(st, &err, &[s(&missing), "no such file"]);

    let bad = keys.dir.path("bad.key");
    std::fs::write(&bad, "this is not a key\n").unwrap();
    std::fs::set_permissions(&bad, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (st, _, err) = with_key(bad.clone()).await;
    assert_error(st, &err, &["malformed key file", s(&bad), "44 base64 characters"]);

    std::fs::set_permissions(&keys.client_key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (st, _, err) = with_key(keys.client_key.clone()).await;
    assert_error(st, &err, &[s(&keys.client_key), "mode 0644", "chmod 600"]);
    // The server refuses its own key the same way.
    std::fs::set_permissions(&keys.server_key, std::fs::Permissions::from_mode(0o640)).unwrap();
    let mut args = vec!["server", "--listen", "127.0.0.1:0", "--key", s(&keys.server_key)];
    args.extend(["--authorized", s(&keys.authorized), "--service", "x=127.0.0.1:1"]);
    let (st, _, err) = run(&args, b"").await;
    assert_error(st, &err, &[s(&keys.server_key), "mode 0640", "chmod 600"]);
}

#[tokio::test]
async fn server_listen_address_in_use() {
    let keys = Keys::new("inuse");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let mut args = vec!["server", "--listen", &addr, "--key", s(&keys.server_key)];
    args.extend(["--authorized", s(&keys.authorized), "--service", "x=127.0.0.1:1"]);
    let (st, _, err) = run(&args, b"").await;
    assert_error(st, &err, &["cannot listen on", &addr, "in use"]);
    drop(taken);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_lost_when_server_restarts() {
    let keys = Keys::new("restart");
    let echo = echo_service().await;
    let svc = [format!("echo={echo}")];
    let (mut old, old_addr) = keys.server(&svc).await;
    let proxy = ChaosProxy::start(old_addr).await.unwrap();
    let mut args = keys.client_args("connect", proxy.addr(), "echo");
    args.extend(["--give-up", "10s"].map(String::from));
    let mut client = Proc::spawn(&strs(&args), true);
    let mut stdin = client.child.stdin.take().unwrap();
    let mut stdout = client.child.stdout.take().unwrap();
    let mut echoed = [0u8; 6];
    stdin.write_all(b"hello\n").await.unwrap();
    timeout(LIMIT, stdout.read_exact(&mut echoed)).await.expect("no echo").unwrap();
    assert_eq!(&echoed, b"hello\n");

    // Restart: the old server dies, a new one with the same key takes over behind the relay.
    let (new, new_addr) = keys.server(&svc).await;
    old.child.start_kill().unwrap();
    let _ = old.exit().await;
    proxy.set_target(new_addr);
    proxy.kill_all();

    let (st, err) = client.exit().await;
    assert_error(st, &err, &["session lost", "not starting a new one"]);
    // The stream ended with an error: no new session, and nothing more on stdout.
    let mut rest = Vec::new();
    timeout(LIMIT, stdout.read_to_end(&mut rest)).await.expect("stdout not closed").unwrap();
    assert!(rest.is_empty(), "unexpected output after the restart: {rest:?}");
    assert!(!new.stderr().contains("session opened"), "the new server opened a session:\n{}", new.stderr());
    drop(stdin);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_reports_every_byte_matched() {
    // Longer than the demo's own 30 s bound on each resume, so that its error is what we see.
    let (status, out, err) = run_within(LIMIT * 2, &["demo", "--bytes", "8MiB", "--faults", "4"], b"").await;
    let out = String::from_utf8(out).unwrap();
    assert!(status.success(), "demo failed: {status}\nstdout:\n{out}\nstderr:\n{err}");
    for dir in ["up:", "down:"] {
        let line = out.lines().find(|l| l.trim_start().starts_with(dir)).unwrap_or_else(|| panic!("no {dir}:\n{out}"));
        assert!(line.contains("SHA-256 match"), "{line}");
    }
    assert!(out.contains("result: OK"), "{out}");
    // The report counts what happened: every fault it says hit the link was resumed, and it
    // names the timers it used.
    let num = |prefix: &str| -> u32 {
        let l =
            out.lines().find(|l| l.trim_start().starts_with(prefix)).unwrap_or_else(|| panic!("no {prefix}:\n{out}"));
        l.trim_start()[prefix.len()..].split_whitespace().next().unwrap().parse().unwrap()
    };
    assert_eq!(num("faults that hit the live link:"), num("resumes:"), "{out}");
    assert!(out.contains("timers: the defaults"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn help_has_examples_and_completions_work() {
    let subs = ["keygen", "pubkey", "server", "client", "connect", "demo", "completions"];
    let runs = subs.map(|sub| tokio::spawn(async move { (sub, run(&[sub, "--help"], b"").await) }));
    for r in runs {
        let (sub, (status, out, err)) = r.await.unwrap();
        let out = String::from_utf8(out).unwrap();
        assert!(status.success() && out.contains("Example"), "`holdfast {sub} --help` has no example:\n{out}{err}");
    }
    let (status, out, _) = run(&["--help"], b"").await;
    assert!(status.success() && String::from_utf8(out).unwrap().contains("Example"));
    let (status, out, err) = run(&["completions", "bash"], b"").await;
    assert!(status.success(), "{err}");
    let script = String::from_utf8(out).unwrap();
    assert!(script.contains("holdfast") && script.contains("--server-key") && script.contains("status"));
    // The hidden halves of `holdfast ssh` are not offered.
    assert!(!script.contains("ssh-server") && !script.contains("ssh-proxy"), "completions offer hidden commands");
}

/// Lines of a log at WARN or ERROR.
fn warnings(log: &str) -> Vec<&str> {
    log.lines().filter(|l| l.contains(" WARN ") || l.contains(" ERROR ")).collect()
}

/// `holdfast client`'s start-up check is a stream of the forwards' own session, ended cleanly:
/// the server sees a tunnel opened and closed and logs no warning or error, and the first
/// forwarded connection finds the session open (no second session, no handshake of its own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_start_up_check_leaves_no_warning_on_the_server() {
    let keys = Keys::new("probe");
    let echo = echo_service().await;
    let (server, addr) = keys.server(&[format!("echo={echo}")]).await;
    let mut args = keys.client_args("client", addr, "echo");
    args.extend(["--local", "127.0.0.1:0"].map(String::from));
    let client = Proc::spawn(&strs(&args), false);
    let local = client.logged_addr("forwarding", "local=").await;
    let log = server.wait_log("tunnel closed", 1).await;
    assert!(warnings(&log).is_empty(), "the start-up check left warnings:\n{log}");
    echo_roundtrip(local, 5, 1000).await;
    let log = server.wait_log("tunnel closed", 2).await;
    assert_eq!(log.matches("session opened").count(), 1, "the connection opened a session of its own:\n{log}");
    assert!(!log.contains("session closed"), "the check ended the forwards' session:\n{log}");
    assert!(warnings(&log).is_empty(), "{log}");
    assert!(warnings(&client.stderr()).is_empty(), "{}", client.stderr());
}

/// The start-up check runs while the forwards already listen, on their own session: a service
/// the server refuses still ends `holdfast client` with the server's reason, and an unreachable
/// one with the service's, and neither forward is logged as forwarding. The client ends its session on the way out: the server closes it
/// (it was left detached, held for a resume until its expiry, an hour in an operator's config).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_start_up_check_ends_the_client_with_the_reason() {
    let keys = Keys::new("checkfail");
    let dead = closed_port();
    let (server, addr) = keys.server(&[format!("dead={dead}")]).await;
    for (n, (service, words)) in [
        ("nope", &["no service named 'nope'"][..]),
        ("dead", &["service 'dead' is unavailable", "its log has the cause"][..]),
    ]
    .into_iter()
    .enumerate()
    {
        let mut args = keys.client_args("client", addr, service);
        args.extend(["--local", "127.0.0.1:0"].map(String::from));
        let (st, _, err) = run(&strs(&args), b"").await;
        assert_error(st, &err, words);
        assert!(!err.contains("a new one opens"), "the client's own close was told as the server's:\n{err}");
        assert!(!err.contains("forwarding"), "a refused forward was logged as forwarding:\n{err}");
        let log = server.wait_log("session closed", n + 1).await;
        assert!(!log.contains("session detached"), "{log}");
    }
}

/// A refused tunnel (unknown service, on `connect` and through a forward) ends as a normal
/// close on the server, logged at info; an unavailable one logs only the server's own problem
/// (the connect error) as a warning, and its session closes normally too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_tunnels_end_as_normal_closes() {
    let keys = Keys::new("refused");
    let dead = closed_port();
    let (server, addr) = keys.server(&[format!("dead={dead}")]).await;
    let (st, _, err) = run(&strs(&keys.client_args("connect", addr, "nope")), b"").await;
    assert_error(st, &err, &["no service named 'nope'"]);
    server.wait_log("session closed", 1).await;
    let log = server.wait_log("tunnel refused: unknown service", 1).await;
    assert!(warnings(&log).is_empty(), "a refusal was logged as a failure:\n{log}");
    // At INFO, in the span of its session.
    assert!(
        log.lines().any(|l| l.contains(" INFO session{id=") && l.contains("}: tunnel refused: unknown service")),
        "{log}"
    );

    // Through a forward (a stream of its multiplexed session: the refusal ends the stream, and
    // the session stays for the next connection).
    let mut args = keys.client_args("client", addr, "nope");
    args.extend(["--local", "127.0.0.1:0", "--no-check"].map(String::from));
    let client = Proc::spawn(&strs(&args), false);
    let local = client.logged_addr("forwarding", "local=").await;
    let mut c = TcpStream::connect(local).await.unwrap();
    c.write_all(b"hello before the reply").await.unwrap();
    let mut rest = Vec::new();
    let _ = timeout(LIMIT, c.read_to_end(&mut rest)).await.expect("the refused connection stayed open");
    let log = server.wait_log("tunnel refused: unknown service", 2).await;
    assert!(warnings(&log).is_empty(), "a refusal through a forward was logged as a failure:\n{log}");
    client.wait_log("cannot open tunnel", 1).await;

    let (st, _, err) = run(&strs(&keys.client_args("connect", addr, "dead")), b"").await;
    assert_error(st, &err, &["service 'dead' is unavailable"]);
    server.wait_log("session closed", 2).await;
    let log = server.wait_log("tunnel refused: service unavailable", 1).await;
    let warned = warnings(&log);
    assert!(warned.len() == 1 && warned[0].contains("cannot connect to the service"), "{log}");
    assert!(!log.contains("session ended") && !log.contains("tunnel failed"), "{log}");
}

/// Found by an operator's day: the start-up check of a service that talks first (a stream, a
/// banner without end) read everything the service sent, 256 MiB through the tunnel for
/// nothing. It reads at most 64 KiB past the reply, then resets its stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_start_up_check_does_not_read_a_talking_service_to_its_end() {
    let keys = Keys::new("talker");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let talker = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                let block = vec![7u8; 64 << 10];
                for _ in 0..128 {
                    if sock.write_all(&block).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let (server, addr) = keys.server(&[format!("talk={talker}")]).await;
    let mut args = keys.client_args("client", addr, "talk");
    args.extend(["--local", "127.0.0.1:0"].map(String::from));
    let _client = Proc::spawn(&strs(&args), false);
    let log = server.wait_log("tunnel ended: reset by the client", 1).await;
    let line = log.lines().find(|l| l.contains("tunnel ended: reset by the client")).unwrap();
    let sent: u64 =
        line.split("to_client=").nth(1).and_then(|v| v.split(' ').next()).and_then(|v| v.parse().ok()).unwrap();
    assert!(sent < 1 << 20, "the check took {sent} bytes of an 8 MiB stream:\n{log}");
}
