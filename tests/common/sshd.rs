//! A private OpenSSH server on 127.0.0.1 for tests, and the ssh command lines that reach it.
//!
//! Everything lives in the test's temp dir: the host key, the config, the client key and its
//! authorized_keys file, the pid file. Only the privilege-separation directory `/run/sshd`,
//! which sshd requires, is made outside it (if missing). The system's own sshd, if any, is not
//! touched: this one listens on a port chosen at run time.

use std::path::PathBuf;

use tokio::process::Command;

use super::procs::{free_port, run_ok, s, which, Out, Proc, TempDir};

/// Programs [`Sshd`] and its clients need.
pub const TOOLS: [&str; 3] = ["ssh", "sshd", "ssh-keygen"];

pub struct Sshd {
    pub proc: Proc,
    pub port: u16,
    key: PathBuf,
}

impl Sshd {
    /// Makes keys and a config in `dir` and starts `sshd -D -e`; returns once it listens.
    pub async fn start(dir: &TempDir) -> Sshd {
        Sshd::start_with(dir, "").await
    }

    /// Like [`Sshd::start`], with `extra` lines appended to its config.
    pub async fn start_with(dir: &TempDir, extra: &str) -> Sshd {
        let (host_key, key) = (dir.path("ssh_host_ed25519_key"), dir.path("id_ed25519"));
        for k in [&host_key, &key] {
            run_ok("ssh-keygen", Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f", s(k)])).await;
        }
        let authorized = dir.path("authorized_keys");
        std::fs::copy(dir.path("id_ed25519.pub"), &authorized).unwrap();
        std::fs::create_dir_all("/run/sshd").expect("create sshd's privilege-separation dir /run/sshd");
        let sshd = which("sshd").expect("sshd"); // sshd re-executes itself: it needs a full path
        for _ in 0..5 {
            let port = free_port();
            let config = dir.path("sshd_config");
            std::fs::write(&config, config_text(dir, port, &host_key, &authorized) + extra).unwrap();
            let mut cmd = Command::new(&sshd);
            cmd.args(["-D", "-e", "-f", s(&config)]);
            let proc = Proc::spawn("sshd", &mut cmd, Out::Null);
            if proc.wait_for(|t| t.contains("Server listening on 127.0.0.1")).await {
                return Sshd { proc, port, key };
            }
            assert!(proc.log().contains("Address already in use"), "sshd did not start:\n{}", proc.log());
        }
        panic!("sshd found no free port in 5 tries");
    }

    /// The client's private key file, which this sshd lets in as root.
    pub fn key(&self) -> &std::path::Path {
        &self.key
    }

    /// `ssh ... root@127.0.0.1 REMOTE` reaching this sshd at `port` directly (a local forward's
    /// port) or, with `proxy`, through that `ProxyCommand`.
    pub fn ssh(&self, port: u16, proxy: Option<&str>, remote: &str) -> Command {
        let mut cmd = Command::new("ssh");
        cmd.args(["-F", "/dev/null", "-T", "-i", s(&self.key), "-p", &port.to_string()]);
        for opt in [
            "IdentitiesOnly=yes",
            "UserKnownHostsFile=/dev/null",
            "GlobalKnownHostsFile=/dev/null",
            "StrictHostKeyChecking=no",
            "BatchMode=yes",
            "LogLevel=ERROR",
            "ConnectTimeout=30",
        ] {
            cmd.args(["-o", opt]);
        }
        if let Some(p) = proxy {
            cmd.arg("-o").arg(format!("ProxyCommand={p}"));
        }
        cmd.args(["root@127.0.0.1", remote]);
        cmd
    }
}

fn config_text(dir: &TempDir, port: u16, host_key: &std::path::Path, authorized: &std::path::Path) -> String {
    format!(
        "ListenAddress 127.0.0.1\n\
         Port {port}\n\
         HostKey {}\n\
         PidFile {}\n\
         AuthorizedKeysFile {}\n\
         UsePAM no\n\
         PermitRootLogin prohibit-password\n\
         PubkeyAuthentication yes\n\
         PasswordAuthentication no\n\
         StrictModes no\n\
         UseDNS no\n\
         PrintMotd no\n\
         PrintLastLog no\n",
        s(host_key),
        s(&dir.path("sshd.pid")),
        s(authorized),
    )
}
