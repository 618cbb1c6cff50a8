//! `holdfast ssh [SSH OPTIONS] [USER@]HOST [COMMAND...]`: resilient ssh with nothing set up on
//! the server but the `holdfast` binary.
//!
//! 1. The user's own `ssh` (their config, agent, keys, known hosts, ProxyJump) logs in with
//!    the options that say how to reach the host, and runs `holdfast ssh-server` there
//!    ([`remote`]); the two ends swap fresh public keys over that connection ([`session`]).
//!    The remote server listens on a port of `--ports`, lets in only this session's client
//!    key, and reaches only the sshd that connection came in to.
//! 2. The user's `ssh` runs again, with all the options the user gave, through that server:
//!    `holdfast ssh-proxy FILE` is its ProxyCommand, which reads the session's keys from a
//!    private file (read once and removed) and carries ssh's connection as `holdfast connect`
//!    does. ssh's own keepalives are off for it (`ServerAliveInterval=0`): a keepalive that
//!    cannot cross an outage would end the session that holdfast keeps.

mod args;
pub(crate) mod remote;
pub(crate) mod session;

use std::ffi::OsString;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use holdfast::keys::Keypair;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

use self::args::{shell_word, SshLine};
use self::session::{hello_line, parse_answer, Answer, PrivateDir, Session};
use crate::args::SshArgs;

/// Options for the bootstrap connection, given before the user's so that they win (ssh takes
/// the first value it reads of each option): no terminal, no forwards, no agent or X11, no
/// local command, no shared control connection.
const BOOTSTRAP_OPTS: [&str; 8] = [
    "ClearAllForwardings=yes",
    "RequestTTY=no",
    "RemoteCommand=none",
    "ForwardAgent=no",
    "ForwardX11=no",
    "PermitLocalCommand=no",
    "ControlMaster=no",
    "ControlPath=none",
];
/// Options for the session's ssh, given before the user's so that they win: holdfast is its
/// transport, ssh's own keepalives are off (holdfast detects a dead link and repairs it; an
/// ssh keepalive unanswered during an outage would end the session), and the connection is
/// ssh's own rather than one shared through a control socket.
const SESSION_OPTS: [&str; 3] = ["ServerAliveInterval=0", "ControlMaster=no", "ControlPath=none"];
/// How long this machine tries to connect to the remote server's port before saying it cannot.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most lines of other output (a login script's) read before the bootstrap answer.
const MAX_NOISE_LINES: usize = 1000;
/// Most bytes of output read before the bootstrap answer (its line included): a remote that
/// sends more, or one line without end, is not kept in memory (a red team's fake remote grew
/// this process to 1.5 GB with one endless line).
const MAX_NOISE_BYTES: u64 = 1 << 20;

/// Runs `holdfast ssh`; returns ssh's exit status.
/// `output` is the flags of `-q` and `-v` given to this command: its ProxyCommand gets them too.
pub(crate) async fn ssh(args: SshArgs, output: &str) -> Result<i32> {
    let line = SshLine::parse(&args.ssh)?;
    let dest = line.destination.to_string_lossy().into_owned();
    let keypair = Keypair::generate();
    let (port, server_key) = bootstrap(&args, &line, &keypair.public).await?;
    let host = ssh_hostname(&line).await.unwrap_or_else(|| host_of(&dest));
    let server = match host.parse::<std::net::Ipv6Addr>() {
        Ok(_) => format!("[{host}]:{port}"),
        Err(_) => format!("{host}:{port}"),
    };
    probe(&server, &dest, args.ports).await?;
    tracing::debug!(%server, server_key = %server_key, "the remote holdfast server is ready");
    let dir = PrivateDir::create()?;
    let file = dir.path().join("session");
    Session { server, server_key, keypair, give_up: args.give_up }.write(&file)?;
    let code = run_session(&args.ssh, &file, output).await;
    drop(dir);
    code
}

/// How long the remote server keeps the session: `expiry`, but no longer than the client keeps
/// trying (`give_up`) and a minute. A client that gave up never comes back (the session's keys
/// were made for it alone), so a longer expiry only left the remote shell running.
fn remote_expiry(expiry: Duration, give_up: Duration) -> Duration {
    expiry.min(give_up.saturating_add(Duration::from_secs(60))).max(Duration::from_secs(1))
}

/// Starts the remote server over the user's ssh and returns its port and key.
async fn bootstrap(
    args: &SshArgs,
    line: &SshLine,
    client: &holdfast::keys::PublicKey,
) -> Result<(u16, holdfast::keys::PublicKey)> {
    let dest = line.destination.to_string_lossy().into_owned();
    let remote = format!(
        "{} ssh-server --ports {}-{} --session-expiry {}s",
        shell_word(&args.server),
        args.ports.0,
        args.ports.1,
        remote_expiry(args.session_expiry, args.give_up).as_secs()
    );
    let mut cmd = Command::new("ssh");
    cmd.arg("-T");
    for o in BOOTSTRAP_OPTS {
        cmd.arg("-o").arg(o);
    }
    cmd.args(line.bootstrap_opts()).arg("--").arg(&line.destination).arg(&remote);
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::inherit()).kill_on_drop(true);
    let mut child =
        cmd.spawn().context("cannot run ssh (holdfast ssh uses your own ssh: is it installed, on PATH?)")?;
    let (Some(mut stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
        bail!("ssh was started without pipes");
    };
    // ssh may be waiting for a password or a host key answer on the terminal: the request is
    // sent now and read by the remote end once it runs.
    let _ = stdin.write_all(hello_line(client).as_bytes()).await;
    let mut out = BufReader::new(stdout).take(MAX_NOISE_BYTES);
    let mut answer = None;
    let mut line = Vec::new();
    for _ in 0..MAX_NOISE_LINES {
        line.clear();
        match out.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => break,
            // The byte bound, reached within a line.
            Ok(_) if !line.ends_with(b"\n") && out.limit() == 0 => break,
            Ok(_) => {
                if let Some(a) = parse_answer(String::from_utf8_lossy(&line).trim_end_matches(['\n', '\r'])) {
                    answer = Some(a?);
                    break;
                }
            }
        }
    }
    if answer.is_none() && out.limit() == 0 {
        bail!(
            "{dest} sent over {} of other output before holdfast's answer (a login script's?); holdfast ssh stopped reading it",
            crate::status::bytes(MAX_NOISE_BYTES)
        );
    }
    drop(stdin);
    drop(out);
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
    match answer {
        Some(Answer::Ready { port, key }) => Ok((port, key)),
        Some(Answer::Error(msg)) => bail!("the holdfast server on {dest} could not start: {msg}"),
        None => {
            let code = match status {
                Ok(Ok(s)) => s.code(),
                _ => None,
            };
            Err(not_started(&dest, &args.server, code))
        }
    }
}

/// Why the remote server did not answer, from the bootstrap ssh's exit status.
fn not_started(dest: &str, server: &str, code: Option<i32>) -> anyhow::Error {
    match code {
        Some(255) => anyhow!(
            "ssh could not reach or log in to {dest} (its message is above); holdfast ssh logs in with your own ssh, so `ssh {dest}` with the same options must work first"
        ),
        Some(126 | 127) => anyhow!(
            "{dest} has no `{server}` that a non-interactive ssh command can run (the remote shell's message is above): install holdfast there (on a machine of the same kind, `scp \"$(command -v holdfast)\" {dest}:` copies this binary to your home directory there, then give holdfast ssh --server ./holdfast), or give its path with holdfast ssh --server PATH"
        ),
        Some(c) => anyhow!(
            "`{server} ssh-server` on {dest} ended with status {c} without answering (its message, if any, is above); holdfast ssh needs the same version of holdfast on both ends"
        ),
        None => anyhow!("the ssh connection to {dest} ended without an answer from `{server} ssh-server`"),
    }
}

/// The host name ssh connects to for this destination (`ssh -G`: aliases, `HostName`,
/// canonicalisation applied), or `None` if ssh cannot say.
async fn ssh_hostname(line: &SshLine) -> Option<String> {
    let out = Command::new("ssh")
        .arg("-G")
        .args(line.bootstrap_opts())
        .arg("--")
        .arg(&line.destination)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .await
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    text.lines().find_map(|l| l.strip_prefix("hostname ")).map(|h| h.trim().to_string()).filter(|h| !h.is_empty())
}

/// The host of `[user@]host` or `ssh://[user@]host[:port]`.
fn host_of(dest: &str) -> String {
    let d = dest.strip_prefix("ssh://").unwrap_or(dest);
    let d = d.rsplit_once('@').map_or(d, |(_, h)| h);
    let d = if dest.starts_with("ssh://") { d.rsplit_once(':').map_or(d, |(h, _)| h) } else { d };
    d.trim_start_matches('[').trim_end_matches(']').to_string()
}

/// Checks that this machine can open a TCP connection to the remote server's port.
async fn probe(server: &str, dest: &str, (first, last): (u16, u16)) -> Result<()> {
    let err = match tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(server)).await {
        Ok(Ok(_)) => return Ok(()),
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!("no answer within {}", holdfast::human::Rounded(PROBE_TIMEOUT)),
    };
    bail!(
        "the holdfast server started on {dest} listens at {server}, and this machine cannot connect to it ({err}). \
         holdfast ssh needs TCP from here to the ports --ports {first}-{last} on that host: open them in its firewall, \
         or give --ports a range that is open. (That server exits by itself within {} when no client comes.)",
        holdfast::human::Rounded(remote::FIRST_WAIT)
    )
}

/// Runs the user's ssh through the remote server, with `holdfast ssh-proxy FILE` as its
/// ProxyCommand; returns ssh's exit status once it has exited.
async fn run_session(user_args: &[OsString], file: &std::path::Path, output: &str) -> Result<i32> {
    let exe = std::env::current_exe().context("cannot find this program's own path for ssh's ProxyCommand")?;
    // ssh runs the ProxyCommand with the user's shell after expanding %-tokens.
    let quote = |p: &std::path::Path| shell_word(&p.to_string_lossy()).replace('%', "%%");
    let proxy = format!("{} ssh-proxy{output} {}", quote(&exe), quote(file));
    let mut cmd = Command::new("ssh");
    cmd.arg("-o").arg(format!("ProxyCommand={proxy}"));
    for o in SESSION_OPTS {
        cmd.arg("-o").arg(o);
    }
    cmd.args(user_args);
    let mut child = cmd.spawn().context("cannot run ssh")?;
    use tokio::signal::unix::{signal, SignalKind};
    // A Ctrl-C typed on the terminal reaches ssh too, which decides; this process waits for it
    // to exit, then removes the session file's directory. A SIGTERM or SIGHUP meant for this
    // process is passed on to ssh: when the terminal goes away, the kernel tells only the
    // session leader (this process, in a tmux pane or a terminal window), and ssh, left with a
    // dead terminal, would otherwise keep the session open on the server.
    let mut int = signal(SignalKind::interrupt()).context("cannot watch for SIGINT")?;
    let mut hup = signal(SignalKind::hangup()).context("cannot watch for SIGHUP")?;
    let mut term = signal(SignalKind::terminate()).context("cannot watch for SIGTERM")?;
    let pass_on = |child: &tokio::process::Child, sig| {
        if let Some(pid) = child.id().and_then(|p| rustix::process::Pid::from_raw(p as i32)) {
            let _ = rustix::process::kill_process(pid, sig);
        }
    };
    let status = loop {
        tokio::select! {
            s = child.wait() => break s.context("cannot wait for ssh")?,
            _ = int.recv() => {}
            _ = hup.recv() => pass_on(&child, rustix::process::Signal::HUP),
            _ = term.recv() => pass_on(&child, rustix::process::Signal::TERM),
        }
    };
    use std::os::unix::process::ExitStatusExt;
    Ok(status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_of_destinations() {
        assert_eq!(host_of("me@example.com"), "example.com");
        assert_eq!(host_of("example.com"), "example.com");
        assert_eq!(host_of("ssh://me@example.com:2222"), "example.com");
        assert_eq!(host_of("ssh://[::1]:22"), "::1");
    }

    /// Found by a walk through faults: after `--give-up 30s` the remote shell stayed a day.
    #[test]
    fn the_remote_keeps_the_session_no_longer_than_the_client_tries() {
        let (day, s) = (Duration::from_secs(86_400), Duration::from_secs);
        assert_eq!(remote_expiry(day, s(30)), s(90));
        assert_eq!(remote_expiry(s(20), day), s(20));
        assert_eq!(remote_expiry(day, day), day);
    }
}
