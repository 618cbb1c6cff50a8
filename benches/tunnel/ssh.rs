//! The `ssh -L` path: an sshd of its own (cipher: [`ssh_cipher`]) for the user running
//! the benchmark, and `ssh -L` clients to it.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use super::procs::{spawn, wait_port, Setup, Tool};
use super::util::{free_port, loopback, s, which};

/// A running sshd and what an `ssh -L` to it needs.
pub(crate) struct Sshd {
    /// The sshd process, in a tool that ends it when dropped.
    procs: Tool,
    /// Its port on 127.0.0.1.
    pub(crate) port: u16,
    /// The ssh client program.
    ssh: PathBuf,
    /// The user to log in as (the one running the benchmark).
    user: String,
    /// The user's private key, authorized by the sshd.
    user_key: PathBuf,
}

/// Starts an sshd with keys and files named `{prefix}-host`, `{prefix}-user`,
/// `{prefix}-authorized`, `{prefix}d.conf` and its log `{prefix}d.log` in `dir`; the error is
/// how the path is reported instead.
pub(crate) async fn start_sshd(dir: &Path, prefix: &str) -> Result<Sshd, Setup> {
    let (Some(sshd), Some(ssh), Some(keygen)) = (which("sshd"), which("ssh"), which("ssh-keygen")) else {
        return Err(Setup::Skipped(s("OpenSSH not installed (Debian: openssh-server openssh-client)")));
    };
    let user = Command::new("id")
        .arg("-un")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| s("root"));
    let (host_key, user_key) = (dir.join(format!("{prefix}-host")), dir.join(format!("{prefix}-user")));
    for k in [&host_key, &user_key] {
        let ok = Command::new(&keygen)
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(k)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return Err(Setup::Failed(s("ssh: ssh-keygen failed")));
        }
    }
    // sshd insists on its privilege-separation directory.
    let _ = std::fs::create_dir_all("/run/sshd");
    let port = free_port();
    let authorized = dir.join(format!("{prefix}-authorized"));
    let conf = format!(
        "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\nPidFile none\nUsePAM no\n\
         StrictModes no\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n\
         KbdInteractiveAuthentication no\nCiphers {}\nAllowTcpForwarding yes\n\
         LogLevel ERROR\nMaxStartups 100:30:200\nMaxSessions 100\n",
        host_key.display(),
        authorized.display(),
        ssh_cipher()
    );
    let (conf_file, log) = (dir.join(format!("{prefix}d.conf")), format!("{prefix}d.log"));
    let run = async {
        std::fs::copy(user_key.with_extension("pub"), &authorized)?;
        std::fs::write(&conf_file, conf)?;
        let mut procs = Tool::new("sshd", loopback(port));
        procs.children.push(spawn(dir, &log, &sshd, &[s("-D"), s("-e"), s("-f"), conf_file.display().to_string()])?);
        procs.server_pid = Some(procs.children[0].id());
        wait_port(procs.entry, &mut procs.children).await?;
        Ok::<_, io::Error>(procs)
    };
    match run.await {
        Ok(procs) => Ok(Sshd { procs, port, ssh, user, user_key }),
        Err(e) => Err(Setup::Failed(format!("ssh: {e} (see {})", dir.join(log).display()))),
    }
}

impl Sshd {
    /// The path of this sshd and the clients that will be pushed after it, named `name` and
    /// reached at `entry`.
    pub(crate) fn into_tool(self, name: &'static str, entry: SocketAddr) -> Tool {
        let mut t = self.procs;
        t.name = name;
        t.entry = entry;
        t
    }

    /// Starts `ssh -N -L 127.0.0.1:local:127.0.0.1:to` to this sshd through `via` (its own
    /// port, or a relay in front of it), logging to `dir/log`.
    pub(crate) fn forward(&self, dir: &Path, log: &str, via: u16, local: u16, to: u16) -> io::Result<Child> {
        let args = vec![
            s("-F"),
            s("/dev/null"),
            s("-N"),
            s("-T"),
            s("-L"),
            format!("127.0.0.1:{local}:127.0.0.1:{to}"),
            s("-p"),
            via.to_string(),
            s("-i"),
            self.user_key.display().to_string(),
            s("-o"),
            s("StrictHostKeyChecking=no"),
            s("-o"),
            s("UserKnownHostsFile=/dev/null"),
            s("-o"),
            format!("Ciphers={}", ssh_cipher()),
            s("-o"),
            s("BatchMode=yes"),
            s("-o"),
            s("ExitOnForwardFailure=yes"),
            s("-o"),
            s("LogLevel=ERROR"),
            format!("{}@127.0.0.1", self.user),
        ];
        spawn(dir, log, &self.ssh, &args)
    }
}

/// The cipher of the `ssh -L` path: `HOLDFAST_BENCH_SSH_CIPHER`, by default
/// aes128-gcm@openssh.com (what issue 22's targets compare with; OpenSSH's own default is
/// chacha20-poly1305@openssh.com).
pub(crate) fn ssh_cipher() -> String {
    std::env::var("HOLDFAST_BENCH_SSH_CIPHER").unwrap_or_else(|_| "aes128-gcm@openssh.com".into())
}

/// `ssh -L` to an sshd of its own (cipher [`ssh_cipher`]), as the user running the benchmark.
pub(crate) async fn setup_ssh(dir: &Path, svc: u16) -> Setup {
    let sshd = match start_sshd(dir, "ssh").await {
        Ok(d) => d,
        Err(setup) => return setup,
    };
    let entry = free_port();
    let run = async {
        let client = sshd.forward(dir, "ssh.log", sshd.port, entry, svc);
        let mut tool = sshd.into_tool("ssh -L", loopback(entry));
        tool.children.push(client?);
        wait_port(tool.entry, &mut tool.children).await?;
        Ok::<_, io::Error>(tool)
    };
    match run.await {
        Ok(t) => Setup::Ready(t),
        Err(e) => Setup::Failed(format!("ssh: {e} (see {})", dir.join("sshd.log").display())),
    }
}
