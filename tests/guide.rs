//! The README's five-minute guide, run as written, so that it cannot drift from the program.
//!
//! Every `server$` and `laptop$` command of the guide's `sh` blocks runs with `sh -c` in a
//! directory of its own for each machine, with the real `holdfast` on `PATH` and a stand-in
//! `scp` that copies between the two directories (`server.example:PATH` is the server's). The
//! only changes made to the commands, so that they run on loopback with ports chosen at run time:
//! `server.example` becomes `127.0.0.1` (except for scp), port `7700` a free port, `0.0.0.0` `127.0.0.1`, the
//! services' targets an echo service of this test, and the forward's local port a free port.
//! Commands of other programs (psql, ssh) are not run: the test checks the forward with its own
//! connection instead, and `tests/real_clients.rs` runs ssh and PostgreSQL for real.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::cli::{echo_service, TempDir, BIN};
use common::procs::{self, Out, Proc};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::Command;

const LIMIT: Duration = Duration::from_secs(30);

/// The guide's commands: (machine, command line), continuation lines joined.
fn guide_commands() -> Vec<(String, String)> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README.md");
    let start = readme.find("## Five-minute guide").expect("the guide");
    let guide = &readme[start..];
    let end = guide[3..].find("\n## ").map_or(guide.len(), |i| i + 3);
    let mut out = Vec::new();
    let mut in_sh = false;
    let mut pending: Option<(String, String)> = None;
    for line in guide[..end].lines() {
        if line.starts_with("```") {
            in_sh = line == "```sh";
            continue;
        }
        if !in_sh {
            continue;
        }
        let text = line.trim();
        let (machine, cmd) = match pending.take() {
            Some((m, c)) => (m, format!("{c} {text}")),
            None => match text.split_once("$ ") {
                Some((m @ ("server" | "laptop"), c)) => (m.to_string(), c.to_string()),
                _ => continue,
            },
        };
        match cmd.strip_suffix('\\') {
            Some(c) => pending = Some((machine, c.trim_end().to_string())),
            None => out.push((machine, cmd)),
        }
    }
    out
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn sh(dir: &Path, path: &str, cmd: &str) -> Command {
    let mut c = Command::new("sh");
    c.args(["-c", cmd]).current_dir(dir).env("PATH", path).env_remove("RUST_LOG");
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_five_minute_guide_works_as_written() {
    let commands = guide_commands();
    assert!(commands.len() >= 6, "the guide's commands were not found: {commands:?}");
    let root = TempDir::new("guide");
    let (server_dir, laptop_dir, bin_dir) = (root.path("server"), root.path("laptop"), root.path("bin"));
    for d in [&server_dir, &laptop_dir, &bin_dir] {
        std::fs::create_dir_all(d).unwrap();
    }
    std::os::unix::fs::symlink(BIN, bin_dir.join("holdfast")).unwrap();
    // scp stand-in: `server.example:P` is the server's directory, anything else local.
    let scp = format!(
        "#!/bin/sh\nmap() {{ case \"$1\" in server.example:*) echo \"{}/${{1#server.example:}}\";; *) echo \"$1\";; esac; }}\n\
         cp \"$(map \"$1\")\" \"$(map \"$2\")\"\n",
        server_dir.display()
    );
    std::fs::write(bin_dir.join("scp"), scp).unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(bin_dir.join("scp"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!("{}:/usr/bin:/bin", bin_dir.display());

    let echo = echo_service().await;
    let (port, local) = (free_port(), free_port());
    let rewrite = |c: &str| {
        c.replace("server.example", "127.0.0.1")
            .replace(":7700", &format!(":{port}"))
            .replace("0.0.0.0", "127.0.0.1")
            .replace("ssh=127.0.0.1:22", &format!("ssh={echo}"))
            .replace("db=127.0.0.1:5432", &format!("db={echo}"))
            .replace("--local 127.0.0.1:5432", &format!("--local 127.0.0.1:{local}"))
            .replace("--local 127.0.0.1:2222", &format!("--local 127.0.0.1:{local}"))
    };
    // `sh -c` runs holdfast as its child: each is owned by a guard that kills the whole process
    // group, so the servers and clients end with the test, passed or failed.
    let mut background: Vec<Proc> = Vec::new();
    let mut forwarded = false;
    for (machine, cmd) in &commands {
        let dir: PathBuf = if machine == "server" { server_dir.clone() } else { laptop_dir.clone() };
        let first = cmd.split_whitespace().next().unwrap_or("");
        let sub = cmd.split_whitespace().nth(1).unwrap_or("");
        if !["holdfast", "echo", "scp"].contains(&first) {
            continue;
        }
        // scp keeps its host names: its stand-in maps them.
        let cmd = if first == "scp" { cmd.clone() } else { rewrite(cmd) };
        if first == "holdfast" && (sub == "server" || sub == "client") {
            let bg = Proc::spawn(&cmd, &mut sh(&dir, &path, &cmd), Out::Null);
            let ready = if sub == "server" { "server ready" } else { "forwarding" };
            bg.wait_log(ready, 1).await;
            if sub == "client" && !forwarded {
                forwarded = true;
                let mut c = TcpStream::connect(("127.0.0.1", local)).await.expect("the guide's forward");
                c.write_all(b"through the guide").await.unwrap();
                c.shutdown().await.unwrap();
                let mut back = Vec::new();
                tokio::time::timeout(LIMIT, c.read_to_end(&mut back)).await.expect("echo in time").unwrap();
                assert_eq!(back, b"through the guide");
            }
            background.push(bg);
            continue;
        }
        if first == "holdfast" && sub == "connect" {
            continue;
        }
        let out = procs::output(&cmd, &mut sh(&dir, &path, &cmd), LIMIT).await;
        assert!(
            out.status.success(),
            "`{machine}$ {cmd}` failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("No such file"), "`{machine}$ {cmd}`: {err}");
    }
    assert!(forwarded, "the guide never started a forward");
    let authorized = std::fs::read_to_string(server_dir.join("keys/authorized")).unwrap();
    let laptop_pub = std::fs::read_to_string(laptop_dir.join("keys/laptop.pub")).unwrap();
    assert!(authorized.starts_with(laptop_pub.trim()), "the allow-list does not hold the laptop's key: {authorized}");
    drop(background);
}
