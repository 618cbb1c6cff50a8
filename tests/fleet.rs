//! A fleet of three `holdfast server`s behind the real HAProxy (issue 14, part 2), on loopback:
//! first connections are balanced (leastconn), and each resume is sent, by the server id at the
//! front of its resume id, to the server that holds its session. 30 `holdfast connect` clients
//! stream through HAProxy while their links are killed; every byte must come back intact. The
//! servers take each client's real address from HAProxy's PROXY v2 header: HAProxy connects to
//! them from 127.0.0.2, and their logs must name only the clients' 127.0.0.1 addresses. Then one
//! server is killed (SIGKILL): exactly its own sessions are lost, each reported to its client
//! as lost, and every other session goes on.
//!
//! The HAProxy configuration is the one of `docs/DEPLOY.md`, with loopback addresses. Prints
//! "skipped: <reason>" without haproxy, root or `ss -K` (CI installs them and sets
//! HOLDFAST_REQUIRE_TOOLS, which turns a skip into a failure).

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::cli::echo_service;
use common::echo::{collect, pattern, Client, KIB};
use common::faults::{kill_connections, ready, Gate, KillLoop};
use common::procs::{self, free_port, s, tail, Out, Proc, TempDir, LIMIT};
use common::tunnel::{write_keys, KeyFiles, BIN, FAST};
use tokio::process::Command;
use tokio::time::timeout;

const SERVERS: u16 = 3;
const CLIENTS: usize = 30;

/// The HAProxy configuration of `docs/DEPLOY.md` for servers `ports` (ids 1, 2, 3), listening
/// on `front`, connecting to the servers from `lb`.
fn haproxy_config(front: u16, ports: &[u16], lb: &str) -> String {
    let mut c = format!(
        "global
    maxconn 4096
defaults
    mode tcp
    timeout connect 2s
    timeout client 1h
    timeout server 1h
    retries 2
    option redispatch
frontend holdfast
    bind 127.0.0.1:{front}
    # Wait for the client's hello (its first 10 bytes hold the kind and the server id).
    tcp-request inspect-delay 5s
    tcp-request content accept if {{ req.len ge 10 }}
    default_backend fleet
backend fleet
    balance leastconn
    # A RESUME hello: record length (2), magic (4), version (1), then kind 0x02 or 0x12; the
    # resume id follows at offset 8, and its first two bytes are the server's --server-id.
    acl resume req.payload(7,1) -m bin 02 12
"
    );
    for (i, _) in ports.iter().enumerate() {
        c += &format!("    use-server hf{n} if resume {{ req.payload(8,2) -m bin {n:04x} }}\n", n = i + 1);
    }
    for (i, port) in ports.iter().enumerate() {
        c += &format!(
            "    server hf{n} 127.0.0.1:{port} send-proxy-v2 source {lb} check check-send-proxy inter 300ms fall 1 rise 1\n",
            n = i + 1
        );
    }
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_behind_haproxy_routes_every_resume_home_and_a_dead_server_loses_only_its_own() {
    let name = "a_fleet_behind_haproxy_routes_every_resume_home_and_a_dead_server_loses_only_its_own";
    if !ready(name, &["ss", "haproxy"]).await {
        return;
    }
    let start = Instant::now();
    let dir = TempDir::new("fleet");
    // One key pair and one allow-list for the whole fleet: a client pins one server key.
    let KeyFiles { server_key, server_pub, client_key, authorized, .. } = write_keys(&dir);
    let echo = echo_service().await;

    let lb = "127.0.0.2";
    let mut servers = Vec::new();
    for id in 1..=SERVERS {
        let mut cmd = Command::new(BIN);
        cmd.args(["server", "--listen", "127.0.0.1:0", "--key", s(&server_key), "--authorized", s(&authorized)]);
        cmd.args(["--service", &format!("echo={echo}"), "--server-id", &id.to_string(), "--proxy-from", lb]);
        // The 30 clients share one key and one source address (127.0.0.1, as behind one large
        // NAT), and come through one balancer; each reconnects at every kill (2.5 a second).
        cmd.args(["--max-sessions-per-key", "100", "--buffer-per-key", "1GiB", "--handshake-rate", "1000"])
            .args(FAST)
            .env_remove("RUST_LOG");
        let p = Proc::spawn(&format!("holdfast server {id}"), &mut cmd, Out::Null);
        let addr = p.logged_addr("server ready", "listen=").await;
        servers.push((p, addr));
    }
    let front = free_port();
    let front_addr: SocketAddr = ([127, 0, 0, 1], front).into();
    let ports: Vec<u16> = servers.iter().map(|(_, a)| a.port()).collect();
    let cfg = dir.path("haproxy.cfg");
    std::fs::write(&cfg, haproxy_config(front, &ports, lb)).unwrap();
    let check = procs::output("haproxy -c", Command::new("haproxy").args(["-c", "-f", s(&cfg)]), LIMIT).await;
    assert!(check.status.success(), "haproxy rejects the configuration:\n{}", procs::err_text(&check));
    let haproxy = Proc::spawn("haproxy", Command::new("haproxy").args(["-db", "-f", s(&cfg)]), Out::Log);
    let deadline = Instant::now() + LIMIT;
    while tokio::net::TcpStream::connect(("127.0.0.1", front)).await.is_err() {
        assert!(Instant::now() < deadline, "haproxy did not listen:\n{}", haproxy.log());
        tokio::time::sleep(Duration::from_millis(20)).await; // polling for a listener, bounded
    }

    // Phase 1: 30 clients, 1 MiB each way, links killed all along.
    const LEN: usize = 1024 * KIB;
    let mut clients: Vec<Client> =
        (0..CLIENTS).map(|i| Client::start(i, front_addr, s(&server_pub), s(&client_key))).collect();
    // Faults start once every session exists: a first connection that fails is an error to
    // its user, not a fault to survive (there is nothing yet to resume).
    let deadline = Instant::now() + LIMIT;
    let sessions = || servers.iter().map(|(p, _)| p.log().matches("session opened").count()).sum::<usize>();
    while sessions() < CLIENTS {
        assert!(Instant::now() < deadline, "only {} of {CLIENTS} sessions opened", sessions());
        tokio::time::sleep(Duration::from_millis(20)).await; // polling the logs, bounded
    }
    let gate = Gate::new();
    let kills = KillLoop::start(front, Duration::from_millis(400), &gate);
    let mut all = Vec::new();
    for (i, mut c) in clients.drain(..).enumerate() {
        let gate = gate.clone();
        all.push(tokio::spawn(async move {
            let (data, want) = pattern(i as u64, LEN);
            let pace = (i == 0).then_some((&gate, 128 * KIB));
            let got = c.exchange(&data, pace, None).await;
            (c, want, got)
        }));
    }
    clients = collect(all, "phase 1").await;
    let k = kills.stop();
    assert!(k.kills >= 5, "only {} kills: recovery was not tested", k.kills);

    let logs: Vec<String> = servers.iter().map(|(p, _)| p.log()).collect();
    let opened: Vec<usize> = logs.iter().map(|l| l.matches("session opened").count()).collect();
    let resumed: Vec<usize> = logs.iter().map(|l| l.matches("session resumed").count()).collect();
    assert_eq!(opened.iter().sum::<usize>(), CLIENTS, "sessions opened per server: {opened:?}");
    for (i, log) in logs.iter().enumerate() {
        assert!(opened[i] > 0 && resumed[i] > 0, "server {} opened {opened:?}, resumed {resumed:?}", i + 1);
        // (A resume sent to the wrong server would have been refused there as an unknown
        // session, and its client's stream would have failed above.)
        assert!(!log.contains("session ended") && !log.contains("expired"), "server {}:\n{}", i + 1, tail(log, 40));
        // PROXY v2: each server sees the clients (127.0.0.1), never the balancer (127.0.0.2).
        let addrs: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("session opened") || l.contains("session resumed"))
            .filter_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("addr=")))
            .collect();
        assert_eq!(addrs.len(), opened[i] + resumed[i]);
        assert!(addrs.iter().all(|a| a.starts_with("127.0.0.1:")), "server {} logged {addrs:?}", i + 1);
    }

    // Phase 2: server 2 dies. Its sessions, and only those, are lost and said so.
    let (mut dead, _) = servers.remove(1);
    let pid = rustix::process::Pid::from_raw(dead.pid() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::KILL).unwrap();
    let _ = dead.exit().await;
    kill_connections(front).await.unwrap();
    let mut all = Vec::new();
    for (i, mut c) in clients.into_iter().enumerate() {
        all.push(tokio::spawn(async move {
            let (data, want) = pattern(1000 + i as u64, 64 * KIB);
            let got = c.exchange(&data, None, None).await;
            (c, want, got)
        }));
    }
    let (mut lost, mut fine) = (0, 0);
    for (i, task) in all.into_iter().enumerate() {
        let (c, want, got) = timeout(LIMIT * 2, task).await.expect("phase 2 did not finish").unwrap();
        match got {
            Ok(h) => {
                assert_eq!(h, want, "client {i}: the echo after the server's death differs");
                fine += 1;
            }
            Err(_) => {
                let (status, log) = c.close().await;
                assert!(!status.success(), "client {i} lost its stream but exited {status}:\n{log}");
                assert!(log.contains("session lost"), "client {i} did not say its session was lost:\n{log}");
                lost += 1;
            }
        }
    }
    assert_eq!(lost, opened[1], "sessions lost; server 2 held {}, and {fine} went on", opened[1]);
    assert_eq!(fine, CLIENTS - opened[1]);
    eprintln!(
        "{name}: {CLIENTS} clients x 1 MiB each way through HAProxy, every SHA-256 equal, through {} kills; sessions per server {opened:?}, resumes {resumed:?}, every one at home; server 2 killed: {lost} lost (its own), {fine} went on; passed in {:.1?}",
        k.kills,
        start.elapsed()
    );
    drop(haproxy);
}

#[tokio::test]
async fn the_haproxy_configuration_of_the_deployment_guide_is_valid() {
    let name = "the_haproxy_configuration_of_the_deployment_guide_is_valid";
    if procs::which("haproxy").is_none() {
        procs::skip(name, "not installed: haproxy");
        return;
    }
    let guide = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/DEPLOY.md")).unwrap();
    let block = guide.split("```haproxy\n").nth(1).and_then(|b| b.split("```").next()).expect("no haproxy block");
    assert!(block.contains("use-server hf1 if resume { req.payload(8,2) -m bin 0001 }"), "{block}");
    let dir = TempDir::new("deploy-guide");
    let cfg = dir.path("haproxy.cfg");
    std::fs::write(&cfg, block).unwrap();
    let out = procs::output("haproxy -c", Command::new("haproxy").args(["-c", "-f", s(&cfg)]), LIMIT).await;
    assert!(out.status.success(), "haproxy rejects docs/DEPLOY.md's configuration:\n{}", procs::err_text(&out));
}
