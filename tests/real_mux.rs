//! Real programs through many streams on one session (issue 15): 40 parallel curl downloads
//! through one forward while its connection is killed, and curl through dynamic forwarding
//! (SOCKS5, names resolved by the server) through kills, with a destination the server does
//! not allow refused by a SOCKS error; and curl through a reverse forward (the server listens,
//! the client's web server answers) through kills, with its listener released the moment the
//! client exits. Each test prints "skipped: <reason>" without curl, root
//! or `ss -K` (CI installs them and sets HOLDFAST_REQUIRE_TOOLS, which turns a skip into a
//! failure).

mod common;

use std::time::{Duration, Instant};

use common::faults::{check_ss_kill, Gate, KillLoop};
use common::http::{self, Pattern};
use common::procs::{self, check_tools, err_text, hex, output, TempDir, LIMIT};
use common::tunnel::Tunnel;
use tokio::process::Command;
use tokio::time::timeout;

const MIB: u64 = 1 << 20;

async fn ready(name: &str) -> bool {
    let ready = match check_tools(&["ss", "curl"]) {
        Ok(()) => check_ss_kill().await,
        Err(e) => Err(e),
    };
    match ready {
        Ok(()) => true,
        Err(reason) => {
            procs::skip(name, &reason);
            false
        }
    }
}

/// curl with `args`; no proxy from the environment (`--proxy` in `args` sets one, and then
/// `--noproxy` must not be given: it would bypass it).
fn curl(args: &[&str]) -> Command {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--fail"]).args(args);
    for var in
        ["http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "no_proxy", "NO_PROXY"]
    {
        cmd.env_remove(var);
    }
    cmd
}

/// Runs curl with `args` writing the body to stdout; returns its length and SHA-256.
async fn download(what: &str, args: &[&str]) -> (u64, String) {
    let mut cmd = curl(args);
    cmd.args(["-o", "-"]);
    http::download(what, cmd).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_parallel_curl_downloads_through_one_forward_with_kills() {
    let name = "forty_parallel_curl_downloads_through_one_forward_with_kills";
    if !ready(name).await {
        return;
    }
    let start = Instant::now();
    const LEN: u64 = 8 * MIB;
    let dir = TempDir::new("curl40");
    let gate = Gate::new();
    // Each download kills the link once per 4 MiB it sends: about 80 kills requested while
    // 40 streams share the session.
    let web = http::serve(40, LEN, gate.clone(), 4 * MIB).await;
    let tunnel = Tunnel::start(&dir, &[("web", web.addr)]).await;
    let (_client, local) = tunnel.forward("web").await;
    let kills = KillLoop::start(tunnel.port(), Duration::from_millis(300), &gate);
    let url = format!("http://{local}/");
    let mut all = tokio::task::JoinSet::new();
    for i in 0..40 {
        let url = url.clone();
        all.spawn(async move { download(&format!("curl {i}"), &[&url]).await });
    }
    let results = timeout(LIMIT * 4, all.join_all()).await.expect("the downloads did not finish in time");
    let k = kills.stop();
    let want = (LEN, hex(&Pattern::sha256(40, LEN)));
    assert!(results.iter().all(|r| *r == want), "a download differs: {results:?}");
    assert!(k.kills >= 5, "only {} kills: recovery was not tested", k.kills);
    let (sessions, aborted) = tunnel.wait_sessions_ended(false).await;
    let log = tunnel.server.log();
    assert_eq!(sessions, 1, "40 downloads used more than one session:\n{log}");
    eprintln!(
        "{name}: 40 x 8 MiB, every SHA-256 equal; {} kills destroyed {} sockets; {sessions} session, {} tunnels, {aborted} aborted; {} resumes; passed in {:.1?}",
        k.kills,
        k.sockets,
        log.matches("tunnel open").count(),
        log.matches("session resumed").count(),
        start.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_through_socks_survives_kills_and_denied_destinations_get_a_socks_error() {
    let name = "curl_through_socks_survives_kills_and_denied_destinations_get_a_socks_error";
    if !ready(name).await {
        return;
    }
    let start = Instant::now();
    const LEN: u64 = 64 * MIB;
    let dir = TempDir::new("socks");
    let gate = Gate::new();
    let web = http::serve(41, LEN, gate.clone(), 8 * MIB).await;
    let other = http::serve(42, 1024, Gate::new(), MIB).await;
    // Only the web server's port on loopback, by name or address.
    let rule = format!("127.0.0.0/8:{}", web.addr.port());
    let tunnel = Tunnel::start_with(&dir, &[], &["--allow-connect", &rule]).await;
    let (client, socks) = tunnel.socks().await;
    let proxy = format!("socks5h://{socks}");
    let kills = KillLoop::start(tunnel.port(), Duration::from_millis(300), &gate);
    // A name the server resolves ("localhost"), and an address.
    let by_name = format!("http://localhost:{}/", web.addr.port());
    let by_addr = format!("http://{}/", web.addr);
    let (args_a, args_b) = (["--proxy", &proxy, &by_name], ["--proxy", &proxy, &by_addr]);
    let (a, b) = tokio::join!(download("curl by name", &args_a), download("curl by address", &args_b));
    let k = kills.stop();
    let want = (LEN, hex(&Pattern::sha256(41, LEN)));
    assert_eq!(a, want, "the download by name differs");
    assert_eq!(b, want, "the download by address differs");
    assert!(k.kills >= 3, "only {} kills: recovery was not tested", k.kills);

    // Another port: not allowed, refused with a SOCKS error (curl: exit 97, reply 2).
    let denied = format!("http://{}/", other.addr);
    let out = output("curl denied", &mut curl(&["--proxy", &proxy, "-o", "/dev/null", &denied]), LIMIT).await;
    assert_eq!(out.status.code(), Some(97), "curl to a denied destination:\n{}", err_text(&out));
    client.wait_log("does not allow this destination", 1).await;
    tunnel.server.wait_log("destination not allowed", 1).await;
    let (sessions, _) = tunnel.wait_sessions_ended(false).await;
    assert_eq!(sessions, 1, "{}", tunnel.server.log());
    eprintln!(
        "{name}: 2 x 64 MiB through SOCKS5 (by name, by address), SHA-256 equal, through {} kills; denied destination: curl exit 97; passed in {:.1?}",
        k.kills,
        start.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_through_a_reverse_forward_survives_kills_and_its_listener_goes_with_the_client() {
    let name = "curl_through_a_reverse_forward_survives_kills_and_its_listener_goes_with_the_client";
    if !ready(name).await {
        return;
    }
    let start = Instant::now();
    const LEN: u64 = 64 * MIB;
    let dir = TempDir::new("reverse");
    let gate = Gate::new();
    // The web server is on the client's side; the server listens for it.
    let web = http::serve(43, LEN, gate.clone(), 8 * MIB).await;
    let tunnel = Tunnel::start_with(&dir, &[], &["--allow-listen", "laptop@127.0.0.1:*"]).await;
    let remote = format!("127.0.0.1:0={}", web.addr);
    let mut client = tunnel.client(&["--remote", &remote, "--remote", "127.0.0.2:80=127.0.0.1:1"]);
    let listen = tunnel.server.logged_addr("reverse forward listening", "listen=").await;
    // A listen address no rule gives is refused, and said so on both ends.
    tunnel.server.wait_log("reverse forward refused: not allowed", 1).await;
    client.wait_log("does not allow listening on 127.0.0.2:80", 1).await;

    let kills = KillLoop::start(tunnel.port(), Duration::from_millis(300), &gate);
    let got = download("curl through the reverse forward", &[&format!("http://{listen}/")]).await;
    let k = kills.stop();
    assert_eq!(got, (LEN, hex(&Pattern::sha256(43, LEN))), "the download differs");
    assert!(k.kills >= 3, "only {} kills: recovery was not tested", k.kills);

    // The client exits (SIGTERM): the session closes, and the listener is released at once.
    let pid = client.child.id().and_then(|p| rustix::process::Pid::from_raw(p as i32)).expect("pid");
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let (status, log) = client.exit().await;
    assert!(status.success(), "client exit {status}:\n{log}");
    tunnel.server.wait_log("the listener is released", 1).await;
    let log = tunnel.server.wait_log("session closed", 1).await;
    assert!(!log.contains("session detached; waiting for resume client=\"laptop\" cause=peer"), "{log}");
    let refused = tokio::net::TcpStream::connect(listen).await;
    assert_eq!(
        refused.err().map(|e| e.kind()),
        Some(std::io::ErrorKind::ConnectionRefused),
        "the listener outlived its client"
    );
    eprintln!(
        "{name}: 64 MiB through the reverse forward, SHA-256 equal, through {} kills; after the client's exit the port refuses connections; passed in {:.1?}",
        k.kills,
        start.elapsed()
    );
}
