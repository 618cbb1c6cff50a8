//! A `holdfast server` and its clients, as real processes on loopback: a local forward
//! (`holdfast client --local`) or a `holdfast connect` for ssh's `ProxyCommand`.

use std::net::SocketAddr;
use std::path::PathBuf;

use holdfast::keys::{self, Keypair};
use tokio::process::Command;

use super::procs::{s, Out, Proc, TempDir};

pub const BIN: &str = env!("CARGO_BIN_EXE_holdfast");
/// Short timers so that a dead link is noticed within a test.
pub const FAST: [&str; 4] = ["--keepalive", "200ms", "--dead-after", "1s"];
/// A client that cannot reconnect for this long fails its streams (the default is an hour),
/// so that a test whose server is gone fails with holdfast's error rather than a timeout.
pub const GIVE_UP: [&str; 2] = ["--give-up", "15s"];

/// Key files in a test's directory: a server key pair and one client, `laptop`, allowed.
pub struct KeyFiles {
    pub server: Keypair,
    pub server_key: PathBuf,
    pub server_pub: PathBuf,
    pub client: Keypair,
    pub client_key: PathBuf,
    pub authorized: PathBuf,
}

/// Writes fresh keys into `dir` (see [`KeyFiles`]).
pub fn write_keys(dir: &TempDir) -> KeyFiles {
    let (server, client) = (Keypair::generate(), Keypair::generate());
    let (server_key, server_pub) = (dir.path("server.key"), dir.path("server.pub"));
    let (client_key, authorized) = (dir.path("laptop.key"), dir.path("authorized"));
    keys::save_private_key(&server_key, &server.private).unwrap();
    keys::save_public_key(&server_pub, &server.public).unwrap();
    keys::save_private_key(&client_key, &client.private).unwrap();
    std::fs::write(&authorized, format!("{} laptop\n", client.public)).unwrap();
    KeyFiles { server, server_key, server_pub, client, client_key, authorized }
}

/// A running `holdfast server` offering `NAME=ADDR` services, with one allowed client key.
pub struct Tunnel {
    pub server: Proc,
    pub addr: SocketAddr,
    server_pub: PathBuf,
    client_key: PathBuf,
    wrapper: PathBuf,
    /// `holdfast client` processes started here: each holds one session for its whole life.
    clients: std::sync::Mutex<Vec<u32>>,
}

impl Tunnel {
    /// Writes keys into `dir` and starts the server; returns once it logged its address.
    pub async fn start(dir: &TempDir, services: &[(&str, SocketAddr)]) -> Tunnel {
        Self::start_with(dir, services, &[]).await
    }

    /// [`Tunnel::start`] with more server arguments (`--allow-connect` rules, say).
    pub async fn start_with(dir: &TempDir, services: &[(&str, SocketAddr)], extra: &[&str]) -> Tunnel {
        let KeyFiles { server_key, server_pub, client_key, authorized, .. } = write_keys(dir);
        let wrapper = dir.path("proxy-wrapper.sh");
        std::fs::write(&wrapper, WRAPPER).unwrap();

        let mut cmd = Command::new(BIN);
        cmd.args(["server", "--listen", "127.0.0.1:0", "--key", s(&server_key), "--authorized", s(&authorized)]);
        for (name, addr) in services {
            cmd.args(["--service", &format!("{name}={addr}")]);
        }
        cmd.args(FAST).args(extra).env_remove("RUST_LOG");
        let server = Proc::spawn("holdfast server", &mut cmd, Out::Null);
        let addr = server.logged_addr("server ready", "listen=").await;
        Tunnel { server, addr, server_pub, client_key, wrapper, clients: Default::default() }
    }

    /// The server's port: the kill loop's target.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Waits (bounded) until every session the server opened has ended, and checks how: each
    /// must be `session closed` (a clean end both ways), or, if `resets_ok`, `session ended`
    /// because one end's program reset its connection, which holdfast passes on as an abort.
    /// A multiplexed session (a forward's) lives as long as its client: it counts as done when
    /// every tunnel on it has ended, and a tunnel may fail only if `resets_ok`. Nothing else
    /// (expiry, a protocol error) is accepted. Returns (sessions, aborted).
    pub async fn wait_sessions_ended(&self, resets_ok: bool) -> (usize, usize) {
        // A `holdfast client` keeps its session for as long as it runs: stop each one (SIGTERM,
        // as an operator would), which ends its session cleanly.
        for pid in self.clients.lock().unwrap().drain(..) {
            if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            }
        }
        let counts = |t: &str| {
            let tunnels_done = ["tunnel closed", "tunnel ended", "tunnel failed", "tunnel refused"];
            (
                t.matches("session opened").count() - t.matches("multiplexed session open").count(),
                t.matches("session closed").count() + t.matches("session ended").count(),
                t.matches("tunnel open").count(),
                tunnels_done.iter().map(|p| t.matches(p).count()).sum::<usize>(),
            )
        };
        let ok = self
            .server
            .wait_for(|t| matches!(counts(t), (o, e, to, td) if (o > 0 || to > 0) && e >= o && td >= to))
            .await;
        let log = self.server.log();
        assert!(ok, "not every session ended; server log:\n{}", super::procs::tail(&log, 200));
        let opened = log.matches("session opened").count();
        let ended = log.matches("session ended").count() + log.matches("tunnel failed").count();
        let bad = log.lines().filter(|l| {
            (l.contains("session ended") && !(resets_ok && l.contains("stream aborted")))
                || (l.contains("tunnel failed") && !resets_ok)
        });
        let bad: Vec<&str> = bad.collect();
        assert!(bad.is_empty(), "sessions that did not close cleanly:\n{}", bad.join("\n"));
        (opened, ended)
    }

    /// Arguments of `holdfast CMD` (connect or client) for `service`.
    fn client_args(&self, cmd: &str, service: &str) -> Vec<String> {
        let mut args: Vec<String> =
            [cmd, "--server", &self.addr.to_string(), "--service", service].map(String::from).into();
        args.extend(["--server-key", s(&self.server_pub), "--key", s(&self.client_key)].map(String::from));
        args.extend(FAST.map(String::from));
        args.extend(GIVE_UP.map(String::from));
        args
    }

    /// Starts `holdfast client --local 127.0.0.1:0` for `service`; returns it and its address.
    ///
    /// With `--no-check`: the start-up check's session is not one of the program's, and it ends
    /// as an abort on the server whenever the service has not closed its side before the check
    /// drops its stream (sshd, postgres), which would blur the count of sessions closed.
    pub async fn forward(&self, service: &str) -> (Proc, SocketAddr) {
        let mut cmd = Command::new(BIN);
        cmd.args(self.client_args("client", service)).args(["--local", "127.0.0.1:0", "--no-check"]);
        cmd.env_remove("RUST_LOG");
        let client = Proc::spawn("holdfast client", &mut cmd, Out::Null);
        self.clients.lock().unwrap().push(client.pid());
        let local = client.logged_addr("forwarding", "local=").await;
        (client, local)
    }

    /// Starts `holdfast client --socks 127.0.0.1:0` (dynamic forwarding); returns it and the
    /// SOCKS5 address.
    pub async fn socks(&self) -> (Proc, SocketAddr) {
        let mut cmd = Command::new(BIN);
        cmd.args(self.client_args("client", "unused")).args(["--socks", "127.0.0.1:0", "--no-check"]);
        cmd.env_remove("RUST_LOG");
        let client = Proc::spawn("holdfast client --socks", &mut cmd, Out::Null);
        self.clients.lock().unwrap().push(client.pid());
        let local = client.logged_addr("dynamic forwarding", "socks=").await;
        (client, local)
    }

    /// Starts `holdfast client` with `extra` arguments (say `--remote A=B`), not waiting for
    /// anything.
    pub fn client(&self, extra: &[&str]) -> Proc {
        let mut cmd = Command::new(BIN);
        cmd.args(self.client_args("client", "unused")).args(extra).arg("--no-check");
        cmd.env_remove("RUST_LOG");
        let client = Proc::spawn("holdfast client", &mut cmd, Out::Null);
        self.clients.lock().unwrap().push(client.pid());
        client
    }

    /// An ssh `ProxyCommand` running `holdfast connect` for `service` under [`WRAPPER`], which
    /// writes connect's exit status to the returned file when it exits.
    pub fn proxy_command(&self, service: &str, rc_file: &std::path::Path) -> String {
        let mut words = vec!["/bin/sh".to_string(), s(&self.wrapper).into(), s(rc_file).into(), BIN.into()];
        words.extend(self.client_args("connect", service));
        assert!(words.iter().all(|w| !w.contains([' ', '%', '\'', '"'])), "unquotable ProxyCommand: {words:?}");
        words.join(" ")
    }
}

/// Runs `PROGRAM ARGS` as its child with stdin and stdout passed through, passes on the SIGHUP
/// that ssh sends its ProxyCommand when it exits, and writes the program's exit status to the
/// file `$1` (ssh does not wait for its proxy, so the test cannot see that status otherwise).
/// The wrapper keeps no copy of stdin or stdout, so the program alone holds the pipes.
pub const WRAPPER: &str = r#"#!/bin/sh
rc_file=$1
shift
exec 3<&0 4>&1 </dev/null >/dev/null
"$@" <&3 >&4 3<&- 4>&- &
pid=$!
exec 3<&- 4>&-
trap 'hup=1; kill -HUP $pid 2>/dev/null' HUP
while :; do
  hup=
  wait $pid
  rc=$?
  # A status over 128 with hup set means the trap interrupted `wait`: wait again.
  if [ $rc -le 128 ] || [ -z "$hup" ]; then break; fi
done
echo $rc > "$rc_file.part" && mv "$rc_file.part" "$rc_file"
exit $rc
"#;
