//! What a new user meets first (issue 16): messages for addresses without a port, the default
//! port, duplicate services, several forwards in one process, and `--help` grouped the way
//! users read it. Real binary, loopback, ports chosen at run time.
#![cfg(unix)]

mod common;

use common::cli::{echo_roundtrip, echo_service, run, s, strs, Keys, Proc, MIB};

#[tokio::test]
async fn addresses_without_a_port_say_so() {
    let (status, _, err) =
        run(&["client", "--local", "8082", "--server", "h", "--server-key", "k", "--key", "f", "--service", "x"], b"")
            .await;
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("'8082' is a port alone; give HOST:PORT=SERVICE"), "{err}");
    assert!(err.contains("[BIND:]PORT:HOST:HOSTPORT as ssh -L"), "{err}");
    let (_, _, err) = run(
        &["client", "--local", "127.0.0.1", "--server", "h", "--server-key", "k", "--key", "f", "--service", "x"],
        b"",
    )
    .await;
    assert!(err.contains("'127.0.0.1' has no port"), "{err}");
    assert!(!err.contains("invalid socket address"), "{err}");
    let (_, _, err) =
        run(&["connect", "--server", "h:77x", "--server-key", "k", "--key", "f", "--service", "x"], b"").await;
    assert!(err.contains("'77x' is not a port number"), "{err}");
}

/// `--server HOST` and `--listen HOST` mean port 7700 (when it is free here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_port_is_7700() {
    if std::net::TcpListener::bind("127.0.0.1:7700").is_err() {
        eprintln!("the_default_port_is_7700: skipped: port 7700 is in use on this machine");
        return;
    }
    let keys = Keys::new("port");
    let echo = echo_service().await;
    let server = Proc::spawn(
        &[
            "server",
            "--listen",
            "127.0.0.1",
            "--key",
            s(&keys.server_key),
            "--authorized",
            s(&keys.authorized),
            "--service",
            &format!("echo={echo}"),
        ],
        false,
    );
    let addr = server.logged_addr("server ready", "listen=").await;
    assert_eq!(addr.port(), 7700);
    let mut args = keys.client_args("connect", addr, "echo");
    let i = args.iter().position(|a| a == "--server").unwrap();
    args[i + 1] = "127.0.0.1".into();
    let (status, out, err) = run(&strs(&args), b"default port").await;
    assert!(status.success(), "{err}");
    assert_eq!(out, b"default port");
}

#[tokio::test]
async fn a_service_name_given_twice_is_refused() {
    let keys = Keys::new("dup");
    let (status, _, err) = run(
        &[
            "server",
            "--listen",
            "127.0.0.1:0",
            "--key",
            s(&keys.server_key),
            "--authorized",
            s(&keys.authorized),
            "--service",
            "web=127.0.0.1:1",
            "--service",
            "web=127.0.0.1:2",
        ],
        b"",
    )
    .await;
    assert!(!status.success());
    assert!(err.contains("service 'web' is given twice (first as 127.0.0.1:1)"), "{err}");
}

/// Several forwards in one process, each to its own service, like `ssh -L` given twice; the
/// server's start-up line lists each service with its target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_carries_several_forwards() {
    let keys = Keys::new("multi");
    let (a, b) = (echo_service().await, echo_service().await);
    let (server, addr) = keys.server(&[format!("one={a}"), format!("two={b}")]).await;
    assert!(server.stderr().contains(&format!("services=one={a},two={b}")), "{}", server.stderr());
    let mut args = keys.client_args("client", addr, "one");
    args.retain(|x| x != "--service" && x != "one");
    args.extend(["--local", "127.0.0.1:0=one", "--local", "127.0.0.1:0=two"].map(String::from));
    let client = Proc::spawn(&strs(&args), false);
    let log = client.wait_log("forwarding", 2).await;
    let locals: Vec<std::net::SocketAddr> = log
        .lines()
        .filter(|l| l.contains("forwarding"))
        .filter_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("local=")).and_then(|v| v.parse().ok()))
        .collect();
    assert_eq!(locals.len(), 2, "{log}");
    echo_roundtrip(locals[0], 1, MIB).await;
    echo_roundtrip(locals[1], 2, MIB).await;
    let tunnels = server.wait_log("tunnel open", 4).await;
    assert!(tunnels.contains("service=one") && tunnels.contains("service=two"), "{tunnels}");
}

#[tokio::test]
async fn help_groups_options_as_users_read_them() {
    let (_, out, _) = run(&["server", "--help"], b"").await;
    let help = String::from_utf8_lossy(&out);
    let pos = |w: &str| help.find(w).unwrap_or_else(|| panic!("no {w} in:\n{help}"));
    // The server's own options first; logging options (global) come last, not among them.
    assert!(pos("--listen") < pos("--key") && pos("--key") < pos("--authorized"));
    assert!(pos("--service") < pos("Limits:") && pos("Limits:") < pos("Output:"));
    assert!(pos("--verbose") > pos("--session-expiry"), "-v sits among the server's options:\n{help}");
}

/// Ctrl-C or SIGTERM on the server: no new sessions or tunnels, and the tunnels open run to
/// their end (a transfer in flight is not cut short with a clean end: bytes the service sends
/// after the stop still arrive); then the server exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_open_tunnels_finish() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let keys = Keys::new("term");
    let echo = echo_service().await;
    let (mut server, addr) = keys.server(&[format!("echo={echo}")]).await;
    let mut args = keys.client_args("client", addr, "echo");
    args.extend(["--local", "127.0.0.1:0", "--no-check"].map(String::from));
    let client = Proc::spawn(&strs(&args), false);
    let local = client.logged_addr("forwarding", "local=").await;
    let mut conn = tokio::net::TcpStream::connect(local).await.unwrap();
    conn.write_all(b"before the stop").await.unwrap();
    let mut got = [0u8; 15];
    conn.read_exact(&mut got).await.unwrap();
    let pid = server.child.id().and_then(|p| rustix::process::Pid::from_raw(p as i32)).expect("pid");
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    server.wait_log("stopping: no new sessions", 1).await;
    // The service answers after the stop: the program gets that too, then the end.
    conn.write_all(b"after the stop").await.unwrap();
    conn.shutdown().await.unwrap();
    let mut rest = Vec::new();
    let end = tokio::time::timeout(common::cli::LIMIT, conn.read_to_end(&mut rest)).await.expect("no end in time");
    assert!(end.is_ok(), "the program saw {end:?}, not a clean end");
    assert_eq!(rest, b"after the stop", "{}", String::from_utf8_lossy(&rest));
    let (status, log) = server.exit().await;
    assert!(status.success(), "server exit {status}:\n{log}");
    assert!(log.contains("every tunnel ended; exiting"), "{log}");
    assert!(log.contains("session closed"), "{log}");
    assert!(!client.stderr().contains("stream failed"), "{}", client.stderr());
}

/// A server with `--drain-time drain`, a client forwarding to its echo service, and one
/// connection through it that has echoed.
struct Draining {
    server: Proc,
    client: Proc,
    local: std::net::SocketAddr,
    conn: tokio::net::TcpStream,
    pid: rustix::process::Pid,
    _keys: Keys,
}

async fn draining(tag: &str, drain: &str) -> Draining {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let keys = Keys::new(tag);
    let echo = echo_service().await;
    let (server, addr) = keys.server_with(&[format!("echo={echo}")], &["--drain-time", drain]).await;
    let mut args = keys.client_args("client", addr, "echo");
    args.extend(["--local", "127.0.0.1:0", "--no-check"].map(String::from));
    let client = Proc::spawn(&strs(&args), false);
    let local = client.logged_addr("forwarding", "local=").await;
    let mut conn = tokio::net::TcpStream::connect(local).await.unwrap();
    conn.write_all(b"open").await.unwrap();
    let mut got = [0u8; 4];
    conn.read_exact(&mut got).await.unwrap();
    let pid = server.child.id().and_then(|p| rustix::process::Pid::from_raw(p as i32)).expect("pid");
    Draining { server, client, local, conn, pid, _keys: keys }
}

/// During a stopping server's drain a new connection is refused, not served, and the tunnels
/// open are still carried. (A drain of a minute: nothing here may depend on how fast the test
/// gets to its next step; a second SIGTERM then ends the server.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_made_during_the_drain_is_refused_and_the_open_ones_carried() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Draining { mut server, client, local, mut conn, pid, _keys } = draining("term-refuse", "60s").await;
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    // Logged once every session was closed to new streams.
    server.wait_log("shutting down: waiting for the open tunnels to end", 1).await;
    // Refused: the client resets the connection, which may even happen before `connect`
    // returns here.
    match tokio::net::TcpStream::connect(local).await {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("{e}; the client:\n{}\nthe server:\n{}", client.stderr(), server.stderr()),
        Ok(mut late) => {
            let _ = late.write_all(b"late").await;
            let mut seen = Vec::new();
            let late_end =
                tokio::time::timeout(common::cli::LIMIT, late.read_to_end(&mut seen)).await.expect("no end in time");
            assert!(seen.is_empty(), "a connection made during the drain was served: {seen:?}");
            assert!(late_end.is_err(), "a refused connection ended as if served");
        }
    }
    client.wait_log("takes no new streams on this session", 1).await;
    conn.write_all(b"still").await.unwrap();
    let mut got = [0u8; 5];
    conn.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"still");
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let _ = server.exit().await;
}

/// A stopping server's tunnels that outlast its drain time end with a reset for their
/// programs, never a clean end (a transfer cut short must not look finished).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_still_open_when_the_drain_time_is_over_is_reset() {
    let Draining { mut server, client: _client, mut conn, pid, .. } = draining("term-reset", "1s").await;
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let log = reset_then_exit(&mut conn, &mut server).await;
    assert!(log.contains("drain time over; the sessions still open were ended"), "{log}");
}

/// Waits for `conn` to be reset (never a clean end) and for `server` to exit successfully;
/// returns its log.
async fn reset_then_exit(conn: &mut tokio::net::TcpStream, server: &mut Proc) -> String {
    use tokio::io::AsyncReadExt;
    let mut rest = Vec::new();
    let end = tokio::time::timeout(common::cli::LIMIT, conn.read_to_end(&mut rest)).await.expect("no end in time");
    let err = end.expect_err("the program saw a clean end of a tunnel the server ended");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
    let (status, log) = server.exit().await;
    assert!(status.success(), "server exit {status}:\n{log}");
    log
}

/// A second stop signal during the drain ends the sessions still open at once and tells their
/// clients (CLOSE Shutdown): the program sees a reset at once. Found by an operator's day: the
/// server exited without a word, and the client reconnected to a closed port while its program
/// hung until the client's give-up time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_stop_signal_ends_the_sessions_and_tells_their_clients() {
    let Draining { mut server, client, mut conn, pid, .. } = draining("term-twice", "1h").await;
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    server.wait_log("shutting down: waiting for the open tunnels to end", 1).await;
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let log = reset_then_exit(&mut conn, &mut server).await;
    assert!(log.contains("second stop signal: ending the sessions still open now"), "{log}");
    assert!(log.contains("were ended on the second stop signal"), "{log}");
    // Told: not "connection closed without a FIN frame", then reconnecting.
    let clog = client.wait_log("the server process is stopping", 1).await;
    assert!(clog.contains("the server process is stopping"), "the client was not told:\n{clog}");
    assert!(!clog.contains("reconnecting"), "{clog}");
}

/// A tunnel whose program never ends its side outlasts the server's drain time (10 s): its
/// client is then told that the server stopped (CLOSE Shutdown) and fails at once, instead of
/// finding the link gone and retrying until its give-up time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_open_past_the_drain_time_is_told_the_server_stopped() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let keys = Keys::new("term-drain");
    let echo = echo_service().await;
    let (mut server, addr) = keys.server(&[format!("echo={echo}")]).await;
    let args = keys.client_args("connect", addr, "echo");
    let mut client = Proc::spawn(&strs(&args), true);
    let mut stdin = client.child.stdin.take().unwrap();
    let mut stdout = client.child.stdout.take().unwrap();
    stdin.write_all(b"ping").await.unwrap();
    let mut got = [0u8; 4];
    tokio::time::timeout(common::cli::LIMIT, stdout.read_exact(&mut got)).await.unwrap().unwrap();
    assert_eq!(&got, b"ping");
    let pid = server.child.id().and_then(|p| rustix::process::Pid::from_raw(p as i32)).expect("pid");
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    // The program keeps its side open: the server gives up after its drain time.
    let (status, log) = client.exit().await;
    assert!(!status.success(), "connect exit {status}:\n{log}");
    assert!(
        log.contains(
            "the server process is stopping (stopped, or retired after an upgrade), and its drain time is over"
        ),
        "{log}"
    );
    let mut rest = Vec::new();
    let _ = stdout.read_to_end(&mut rest).await;
    assert!(rest.is_empty(), "{rest:?}");
    let (status, slog) = server.exit().await;
    assert!(status.success(), "server exit {status}:\n{slog}");
    assert!(slog.contains("drain time over; the sessions still open were ended"), "{slog}");
    drop(stdin);
}

/// One fault is one line; durations are rounded for people; a program that resets its own
/// connection is a close, not an error (issue 16 item 10).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_logs_one_line_per_event() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let keys = Keys::new("logs");
    let echo = echo_service().await;
    let (server, addr) = keys.server(&[format!("echo={echo}")]).await;
    let proxy = common::chaos::ChaosProxy::start(addr).await.unwrap();
    let mut args = keys.client_args("client", proxy.addr(), "echo");
    args.extend(["--local", "127.0.0.1:0", "--no-check"].map(String::from));
    let client = Proc::spawn(&strs(&args), false);
    let local = client.logged_addr("forwarding", "local=").await;
    let mut conn = tokio::net::TcpStream::connect(local).await.unwrap();
    conn.write_all(b"x").await.unwrap();
    let mut b = [0u8; 1];
    conn.read_exact(&mut b).await.unwrap();
    proxy.kill_all();
    let log = client.wait_log("link resumed", 1).await;
    assert_eq!(log.matches("link lost").count(), 1, "one fault, one loss line:\n{log}");
    assert!(!log.contains("resuming"), "{log}");
    let after = log.lines().find(|l| l.contains("link resumed")).and_then(|l| l.split("after=").nth(1)).unwrap();
    let after = after.split_whitespace().next().unwrap();
    assert!(after.len() <= 7 && !after.contains("ns"), "unrounded duration {after:?}");
    // The program resets its own connection.
    conn.set_zero_linger().unwrap();
    drop(conn);
    client.wait_log("the local program reset its connection", 1).await;
    // The stream is reset on the server too (the session goes on): nothing in the client's log
    // may call it an error, and the server logs it as the client's reset, not a failure.
    let slog = server.wait_log("tunnel ended: reset by the client", 1).await;
    assert!(!slog.contains("tunnel failed"), "{slog}");
    let log = client.stderr();
    assert!(!log.contains("ERROR"), "a local close was logged as an error:\n{log}");
}

#[tokio::test]
async fn the_manual_page_renders() {
    let (status, out, err) = run(&["man"], b"").await;
    assert!(status.success(), "{err}");
    let page = String::from_utf8_lossy(&out);
    assert!(page.starts_with(".TH HOLDFAST 1 "), "not a man page:\n{page}");
    for cmd in ["keygen", "server", "client", "connect", "demo"] {
        assert!(page.contains(&format!(".SS \"holdfast {cmd}\"")), "no subsection for {cmd} in the man page");
    }
    // Every subcommand's flags are in the page, not only the top-level ones.
    for flag in ["allow\\-listen", "socks", "on\\-fault", "session\\-expiry"] {
        assert!(page.contains(flag), "no {flag} in the man page");
    }
}

/// Overnight (issue 23, item 3): the defaults keep a session through a 12-hour absence, on the
/// client (`--give-up`) and on the server (`--session-expiry`), classic and `holdfast ssh` alike.
#[tokio::test]
async fn defaults_survive_a_night_away() {
    let default_of = |help: &str, flag: &str| -> Option<String> {
        let at = help.find(&format!("--{flag} <"))?;
        let rest = &help[at..];
        let d = rest.find("[default: ")?;
        Some(rest[d + 10..].split(']').next()?.to_string())
    };
    for (cmd, flag) in [
        ("server", "session-expiry"),
        ("client", "give-up"),
        ("connect", "give-up"),
        ("ssh", "give-up"),
        ("ssh", "session-expiry"),
    ] {
        let (st, out, _) = run(&[cmd, "--help"], b"").await;
        let help = String::from_utf8_lossy(&out);
        assert!(st.success(), "{help}");
        let value = default_of(&help, flag).unwrap_or_else(|| panic!("{cmd} --help: no default for --{flag}:\n{help}"));
        let d = humantime::parse_duration(&value).unwrap();
        assert!(d >= std::time::Duration::from_secs(12 * 3600), "{cmd} --{flag} defaults to {value}, less than 12 h");
    }
}

/// A worker-thread count that is not a positive number (tokio reads `TOKIO_WORKER_THREADS`
/// itself) is an error that says what to do, not a panic.
#[test]
fn a_bad_worker_thread_count_is_an_error_not_a_panic() {
    for v in ["abc", "0", "", " 2"] {
        let out = std::process::Command::new(common::cli::BIN)
            .arg("pubkey")
            .env("TOKIO_WORKER_THREADS", v)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{v:?}: {err}");
        assert!(err.contains("TOKIO_WORKER_THREADS") && err.contains("positive number"), "{v:?}: {err}");
        assert!(!err.contains("panicked"), "{v:?}: {err}");
    }
    let out = std::process::Command::new(common::cli::BIN)
        .arg("pubkey")
        .env("TOKIO_WORKER_THREADS", "1")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&out.stderr).contains("TOKIO_WORKER_THREADS"));
}

/// A reader that goes away (`holdfast man | head`, `holdfast status | true`) ends the command
/// quietly, as for other tools: it panicked with "failed printing to stdout: Broken pipe".
#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    for args in [&["man"][..], &["completions", "bash"]] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_holdfast"))
            .args(args)
            .stdout(writer)
            .stderr(std::process::Stdio::piped())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "holdfast {args:?}: {err}");
        assert!(out.status.success(), "holdfast {args:?}: {}: {err}", out.status);
    }
}

/// Found by an operator's day: an edit of the config file followed by SIGHUP changed nothing
/// but the allow-list, and the log did not say so. The server now warns that the file's other
/// settings wait for an upgrade or a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_after_a_config_edit_says_what_was_not_reloaded() {
    let keys = Keys::new("hup-config");
    let echo = echo_service().await;
    let file = keys.dir.path("server.toml");
    let write = |services: &str| {
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nkey = \"{}\"\nauthorized = \"{}\"\nservice = [{services}]\n",
            keys.server_key.display(),
            keys.authorized.display()
        );
        std::fs::write(&file, text).unwrap();
    };
    write(&format!("\"echo={echo}\", \"other={echo}\""));
    let server = Proc::spawn(&["server", "--config", file.to_str().unwrap()], false);
    server.wait_log("server ready", 1).await;
    let pid = server.child.id().and_then(|p| rustix::process::Pid::from_raw(p as i32)).expect("pid");
    rustix::process::kill_process(pid, rustix::process::Signal::HUP).unwrap();
    let log = server.wait_log("allow-list reloaded", 1).await;
    assert!(!log.contains("config file changed"), "nothing was edited:\n{log}");
    write(&format!("\"echo={echo}\""));
    rustix::process::kill_process(pid, rustix::process::Signal::HUP).unwrap();
    let log = server.wait_log("allow-list reloaded", 2).await;
    assert!(
        log.contains("the config file changed since the server started: SIGHUP reloads only the allow-list"),
        "{log}"
    );
}

/// `retire-after` and `handover` may come one from the config file and one from the command
/// line (found by an operator's day: the flag required `--handover` on the command line itself,
/// and with both in the opposite places the error named no argument at all).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retire_after_and_handover_may_come_from_the_file_and_the_flags() {
    let keys = Keys::new("retire-split");
    let echo = echo_service().await;
    let file = keys.dir.path("server.toml");
    let handover = keys.dir.path("handover.sock");
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nkey = \"{}\"\nauthorized = \"{}\"\nservice = [\"echo={echo}\"]\nhandover = \"{}\"\n",
        keys.server_key.display(),
        keys.authorized.display(),
        handover.display()
    );
    std::fs::write(&file, text).unwrap();
    let server = Proc::spawn(&["server", "--config", file.to_str().unwrap(), "--retire-after", "20s"], false);
    let log = server.wait_log("server ready", 1).await;
    assert!(log.contains("server ready"), "{log}");
    drop(server);
    // Without --handover anywhere, the error says what is missing.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_holdfast"))
        .args(["server", "--listen", "127.0.0.1:0", "--key", keys.server_key.to_str().unwrap()])
        .args(["--authorized", keys.authorized.to_str().unwrap(), "--service", &format!("echo={echo}")])
        .args(["--retire-after", "20s"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("give --handover too"), "{err}");
}

/// A first connection refused at a session cap says which cap, and names the client.
#[tokio::test]
async fn a_refusal_at_the_session_cap_names_the_cap_and_the_client() {
    let keys = Keys::new("cap-reason");
    let echo = echo_service().await;
    let (server, addr) = keys.server_with(&[format!("echo={echo}")], &["--max-sessions-per-key", "1"]).await;
    // The first session stays open (its stdin stays open).
    let args = keys.client_args("connect", addr, "echo");
    let first = Proc::spawn(&strs(&args), true);
    server.wait_log("tunnel open", 1).await;
    // The second is answered BUSY, and retries: the server's log says why.
    let second = Proc::spawn(&strs(&args), true);
    let log = server.wait_log("refused a new session of client", 1).await;
    let line = log.lines().find(|l| l.contains("refused a new session of client")).unwrap();
    assert!(line.contains("reason=\"busy\""), "{line}");
    assert!(line.contains("test-client"), "{line}");
    assert!(line.contains("this client key is at its session limit (1 held, max-sessions-per-key = 1"), "{line}");
    drop((first, second));
}

/// Red team F1: an operator who lowers --buffer-budget below --buffer-per-key (the example
/// config sets both) must not let one key take the whole budget: the share is lowered to half
/// of the budget, and the server says so.
#[tokio::test]
async fn a_keys_share_above_half_the_budget_is_lowered_with_a_warning() {
    let keys = Keys::new("share");
    let echo = echo_service().await;
    let more = ["--buffer-budget", "64MiB", "--buffer-per-key", "256MiB"];
    let (server, _addr) = keys.server_with(&[format!("echo={echo}")], &more).await;
    let log = server.wait_log("--buffer-per-key is more than half of --buffer-budget", 1).await;
    let line = log.lines().find(|l| l.contains("--buffer-per-key is more than half")).unwrap();
    assert!(line.contains("using=32.0 MiB") && line.contains("buffer_budget=64.0 MiB"), "{line}");
}

/// Red team U2: SIGUSR2 during a stop's drain starts no new server (one would outlive the stop,
/// binding the port afresh once this one exits).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_asked_for_during_a_stop_is_ignored() {
    let keys = Keys::new("usr2-drain");
    let echo = echo_service().await;
    let handover = keys.dir.path("handover.sock");
    let more = ["--drain-time", "60s", "--handover", s(&handover)];
    let (mut server, addr) = keys.server_with(&[format!("echo={echo}")], &more).await;
    // A tunnel kept open, so that the drain lasts.
    let tunnel = Proc::spawn(&strs(&keys.client_args("connect", addr, "echo")), true);
    server.wait_log("tunnel open", 1).await;
    let pid = server.child.id().and_then(|p| rustix::process::Pid::from_raw(p as i32)).expect("pid");
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    server.wait_log("shutting down: waiting for the open tunnels to end", 1).await;
    rustix::process::kill_process(pid, rustix::process::Signal::USR2).unwrap();
    let log = server.wait_log("SIGUSR2 ignored: this server is stopping", 1).await;
    assert!(!log.contains("started a new server process"), "{log}");
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let _ = server.exit().await;
    drop(tunnel);
}

/// Hostile-server review F2: a remote whose output before holdfast's answer never ends a line
/// (a fake `ssh` here) made `holdfast ssh` keep all of it (1.5 GB in the review). It stops at
/// 1 MiB, says so, and exits.
#[tokio::test]
async fn holdfast_ssh_stops_reading_a_remote_that_talks_without_end() {
    let dir = common::cli::TempDir::new("ssh-noise");
    let fake = dir.path("ssh");
    // 4 MiB without a newline, then silence until killed.
    std::fs::write(&fake, "#!/bin/sh\nhead -c 4194304 /dev/zero | tr '\\0' x\nexec sleep 60\n").unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!("{}:{}", dir.0.display(), std::env::var("PATH").unwrap_or_default());
    let mut cmd = tokio::process::Command::new(common::cli::BIN);
    cmd.args(["ssh", "user@example.invalid"]).env("PATH", path).env_remove("RUST_LOG");
    cmd.stdin(std::process::Stdio::null()).kill_on_drop(true);
    let out = tokio::time::timeout(common::cli::LIMIT, cmd.output()).await.expect("holdfast ssh did not end").unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("sent over 1.0 MiB of other output before holdfast's answer"), "{err}");
}

/// `holdfast client` raises its soft descriptor limit to the hard one: each connection it
/// carries is a descriptor, and the usual soft limit (1,024) would fail the 1,000th.
#[tokio::test]
async fn the_client_raises_its_descriptor_limit_to_the_hard_one() {
    if let Err(reason) = common::procs::check_tools(&["prlimit"]) {
        return common::procs::skip("the_client_raises_its_descriptor_limit_to_the_hard_one", &reason);
    }
    let keys = Keys::new("nofile");
    let echo = echo_service().await;
    let (_server, addr) = keys.server(&[format!("echo={echo}")]).await;
    let mut args = keys.client_args("client", addr, "echo");
    args.extend(["--local", "127.0.0.1:0"].map(String::from));
    let client = Proc::spawn_via(&["prlimit", "--nofile=512:4096", "--"], &strs(&args), false);
    client.wait_log("forwarding", 1).await;
    let pid = client.child.id().unwrap();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap();
    let nums: Vec<&str> = line.split_whitespace().filter(|w| w.parse::<u64>().is_ok()).collect();
    assert_eq!(nums, ["4096", "4096"], "{line}");
}
