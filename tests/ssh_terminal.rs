//! `holdfast ssh` and `holdfast connect` on a terminal (tmux): a full-screen program keeps its
//! screen through a fault, a closed terminal ends everything `holdfast ssh` started, and
//! answering n to `--on-fault ask` ends the session on the server.
//! Set-up as in `tests/ssh_bootstrap.rs` (`common::sshboot`); skipped without root, sshd, ss or
//! tmux unless `HOLDFAST_REQUIRE_TOOLS=1`.
#![cfg(unix)]

mod common;

use std::time::{Duration, Instant};

use common::cli::BIN;
use common::procs::{s, TempDir, LIMIT};
use common::sshboot::{holdfast_procs, run_test, wait_file, Setup, Tmux};
use common::sshd::Sshd;

/// A full-screen program (vi, in tmux) while the link breaks and resumes: its screen is left as
/// it was (holdfast says nothing on it), and the keys typed meanwhile reach it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_screen_program_keeps_its_screen_through_a_fault() {
    let name = "a_full_screen_program_keeps_its_screen_through_a_fault";
    run_test(name, &["tmux", "vi"], Duration::from_secs(90), || async {
        let setup = Setup::start("sshvi").await;
        let tmux = vi_in_tmux(&setup, "vi", &(1..=200).map(|i| format!("line {i}\n")).collect::<String>());
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
        // vi quits, so ssh and `holdfast ssh` exit and the pane with them: nothing is left
        // running when the test ends.
        tmux.wait(&["list-sessions", "-F", "#{session_name}"], |t| t.trim().is_empty()).await;
        // The ProxyCommand ends the session on the server, which then exits too.
        all_ended(&setup, "vi quit").await;
        eprintln!("{name}: vi's screen unchanged through a kill; the title given back");
    })
    .await;
}

/// The terminal goes away while a program runs (a tmux pane killed, a terminal window closed):
/// `holdfast ssh`, its ssh, its ProxyCommand and the remote server all end, and leave nothing
/// running for the session's expiry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_terminal_ends_holdfast_ssh_and_everything_it_started() {
    let name = "a_closed_terminal_ends_holdfast_ssh_and_everything_it_started";
    run_test(name, &["tmux", "vi"], Duration::from_secs(90), || async {
        let setup = Setup::start("sshhup").await;
        let tmux = vi_in_tmux(&setup, "hup", "one line\n");
        tmux.wait(&["capture-pane", "-p", "-t", "t"], |t| t.contains("one line")).await;
        assert!(ours(&setup).len() >= 3 && detached(&setup).len() == 1, "{:?} {:?}", ours(&setup), detached(&setup));
        tmux.run(&["kill-server"]);
        all_ended(&setup, "the terminal closed").await;
        eprintln!("{name}: holdfast ssh, ssh, ssh-proxy and the remote server ended with the terminal");
    })
    .await;
}

/// The processes of this test's `holdfast ssh` (itself, its ssh and its ssh-proxy: each names a
/// path in the test's directory), the test's sshd aside.
fn ours(setup: &Setup) -> Vec<u32> {
    let mut p = procs_naming(s(setup.dir.root()));
    p.retain(|&pid| !cmdline(pid).contains("sshd_config"));
    p
}

/// The remote holdfast server of this test's `holdfast ssh`.
fn detached(setup: &Setup) -> Vec<u32> {
    holdfast_procs(&["--detached", &setup.ports()])
}

/// Waits (bounded) until `holdfast ssh`, its ssh, its ssh-proxy and the remote server have all
/// exited after `what`.
async fn all_ended(setup: &Setup, what: &str) {
    let deadline = Instant::now() + LIMIT;
    while !ours(setup).is_empty() || !detached(setup).is_empty() {
        assert!(
            Instant::now() < deadline,
            "still running after {what}: {:?}, remote server {:?}",
            ours(setup).iter().map(|p| cmdline(*p)).collect::<Vec<_>>(),
            detached(setup)
        );
        tokio::time::sleep(Duration::from_millis(50)).await; // polling for exits, bounded
    }
}

/// `holdfast ssh -t box vi FILE` (FILE holding `text`) in a new tmux session "t" of 100 x 30, on a
/// tmux server of the test's own (`tag` in its socket's name).
fn vi_in_tmux(setup: &Setup, tag: &str, text: &str) -> Tmux {
    let file = setup.dir.path("lines.txt");
    std::fs::write(&file, text).unwrap();
    let tmux = Tmux { socket: format!("holdfast-test-{tag}-{}-{}", std::process::id(), setup.port) };
    let command = format!(
        "env XDG_RUNTIME_DIR={} {BIN} ssh --server {BIN} --ports {} -F {} -t box vi {}",
        s(&setup.dir.path("run")),
        setup.ports(),
        setup.config,
        s(&file)
    );
    tmux.run(&["new-session", "-d", "-s", "t", "-x", "100", "-y", "30", &command]);
    tmux
}

/// Pids of the processes whose command line has a word containing `text`.
fn procs_naming(text: &str) -> Vec<u32> {
    let me = std::process::id();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter(|&pid| pid != me && cmdline(pid).contains(text))
        .collect()
}

fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .unwrap_or_default()
}

/// An sshd, a holdfast tunnel to it and an ssh in tmux whose ProxyCommand is `holdfast connect
/// --on-fault ask`, with `ssh_args` (`-n … COMMAND` or `-t`) after its options.
struct AskSession {
    _dir: TempDir,
    _sshd: Sshd,
    tunnel: common::tunnel::Tunnel,
    rc_file: std::path::PathBuf,
    tmux: Tmux,
}

impl AskSession {
    async fn start(tag: &str, flag: &str, remote: &str) -> AskSession {
        let dir = TempDir::new(tag);
        let sshd = Sshd::start(&dir).await;
        let tunnel =
            common::tunnel::Tunnel::start(&dir, &[("ssh", std::net::SocketAddr::from(([127, 0, 0, 1], sshd.port)))])
                .await;
        let rc_file = dir.path("connect.rc");
        let proxy = format!("{} --on-fault ask", tunnel.proxy_command("ssh", &rc_file));
        let command = format!(
            "ssh -F /dev/null {flag} -i {} -p {} -o IdentitiesOnly=yes -o UserKnownHostsFile=/dev/null \
             -o StrictHostKeyChecking=no -o BatchMode=yes -o LogLevel=ERROR -o 'ProxyCommand={proxy}' root@127.0.0.1 {remote}",
            s(sshd.key()),
            sshd.port
        );
        let tmux = Tmux { socket: format!("holdfast-test-{tag}-{}-{}", std::process::id(), tunnel.port()) };
        tmux.run(&["new-session", "-d", "-s", "t", "-x", "200", "-y", "30", &format!("{command}; sleep 5")]);
        AskSession { _dir: dir, _sshd: sshd, tunnel, rc_file, tmux }
    }

    /// Kills the link (at least one connection).
    async fn kill(&self) {
        let mut killed = 0;
        while killed == 0 {
            killed = common::faults::kill_connections(self.tunnel.port()).await.unwrap();
        }
    }
}

/// `holdfast connect --on-fault ask` under an ssh that runs a command (it does not read the
/// terminal: `-n`), in tmux: after a fault, `n` ends the session on the server too (not left for
/// its expiry), with a message that says what the user did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answering_n_to_recover_ends_the_session_on_the_server() {
    let name = "answering_n_to_recover_ends_the_session_on_the_server";
    run_test(name, &["tmux"], Duration::from_secs(90), || async {
        let a = AskSession::start("sshask", "-n", "'echo ready-$((6*7)); sleep 60'").await;
        let (tunnel, tmux) = (&a.tunnel, &a.tmux);
        let pane = ["capture-pane", "-p", "-t", "t"];
        tmux.wait(&pane, |t| t.contains("ready-42")).await;
        a.kill().await;
        tmux.wait(&pane, |t| t.contains("Recover? [Y/n]")).await;
        tmux.run(&["send-keys", "-t", "t", "n"]);
        let screen = tmux.wait(&pane, |t| t.contains("you answered n")).await;
        assert!(!screen.contains("on-fault hook"), "{screen}");
        // Ended on the server: closed (both ends finished) or ended (aborted by the client).
        let over = |t: &str| t.contains("session closed") || t.contains("session ended");
        assert!(tunnel.server.wait_for(over).await, "the session goes on:\n{}", tunnel.server.log());
        let log = tunnel.server.log();
        let line = log.lines().find(|l| over(l)).unwrap();
        assert!(!line.contains("expired"), "{line}");
        let rc = wait_file(&a.rc_file).await;
        assert_eq!(rc.trim(), "0", "holdfast connect exited {rc}");
        eprintln!("{name}: the server ended the session: {line}");
    })
    .await;
}

/// `--on-fault ask` under an interactive ssh (`-t`: it reads the terminal key by key in raw
/// mode): holdfast does not ask, which would take keys from ssh (found by a walk: after `y`, ssh
/// waited for one more key, which then went to the remote program), but says so once and
/// recovers; what is typed afterwards reaches the remote shell whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interactive_ssh_is_not_asked_and_recovers() {
    let name = "an_interactive_ssh_is_not_asked_and_recovers";
    run_test(name, &["tmux"], Duration::from_secs(90), || async {
        let a = AskSession::start("sshaskraw", "-t", "").await;
        let tmux = &a.tmux;
        let pane = ["capture-pane", "-p", "-J", "-t", "t"];
        tmux.run(&["send-keys", "-t", "t", "echo ready-$((6*7))", "Enter"]);
        tmux.wait(&pane, |t| t.contains("ready-42")).await;
        a.kill().await;
        let screen = tmux.wait(&pane, |t| t.contains("recovering without asking")).await;
        assert!(!screen.contains("Recover? [Y/n]"), "{screen}");
        tmux.run(&["send-keys", "-t", "t", "echo after-$((6*8))", "Enter"]);
        let screen = tmux.wait(&pane, |t| t.contains("after-48")).await;
        assert!(!screen.contains("you answered"), "{screen}");
        tmux.run(&["send-keys", "-t", "t", "exit", "Enter"]);
        let rc = wait_file(&a.rc_file).await;
        assert_eq!(rc.trim(), "0", "holdfast connect exited {rc}");
    })
    .await;
}
