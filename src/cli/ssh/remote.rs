//! The remote end of `holdfast ssh`: `holdfast ssh-server`, started by the client over the
//! user's own ssh connection, as the user, without root.
//!
//! It reads the client's public key on stdin ([`super::session`]), starts a detached copy of
//! itself (`--detached`, its own process group, stdin and stdout on pipes to this one, stderr
//! on /dev/null) that makes a fresh key pair and listens on the first free port of `--ports`
//! at the address the ssh connection came in to (`SSH_CONNECTION`), relays that copy's answer
//! line to the client, and exits, so that the ssh connection ends while the server runs on.
//!
//! The detached server lets in exactly the one client key it was given and offers exactly one
//! service, `ssh`: the sshd that ssh connection reached (`SSH_CONNECTION`'s server address and
//! port). It exits when its session has ended (closed by the client, or expired after
//! `--session-expiry` without the client), or if no client has come within [`FIRST_WAIT`].

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use holdfast::keys::{AllowList, Keypair, PublicKey};
use holdfast::tunnel::{self, Services};
use holdfast::ServerConfig;

use super::session::{error_line, parse_hello, ready_line};
use crate::args::SshServerArgs;

/// How long the server waits for its client's first connection before it exits.
pub(crate) const FIRST_WAIT: Duration = Duration::from_secs(120);
/// The longest bootstrap line read.
const MAX_LINE: u64 = 4096;
/// Memory the session's buffers may hold together (two streams' worth of the default 8 MiB
/// replay and receive buffers, with room to spare).
const BUFFER_BUDGET: usize = 64 << 20;
/// The name the client key is given in the server's allow-list and logs.
const CLIENT_NAME: &str = "holdfast-ssh";

/// `holdfast ssh-server`: the front (relays the detached server's answer, then exits) or, with
/// `--detached`, the server itself.
pub(crate) async fn ssh_server(args: SshServerArgs) -> Result<()> {
    if args.detached {
        return detached(args).await;
    }
    let answer = match front(&args) {
        Ok(line) => line,
        Err(e) => error_line(&format!("{e:#}")),
    };
    let mut out = std::io::stdout().lock();
    out.write_all(answer.as_bytes()).context("cannot answer on stdout")?;
    out.flush().context("cannot answer on stdout")?;
    Ok(())
}

/// Reads one line (at most [`MAX_LINE`] bytes) from `r`.
fn read_line(r: impl Read, what: &str) -> Result<String> {
    let mut line = String::new();
    BufReader::new(r.take(MAX_LINE)).read_line(&mut line).with_context(|| format!("cannot read {what}"))?;
    if !line.ends_with('\n') {
        bail!("{what} ended before a whole line");
    }
    Ok(line)
}

/// Checks the client's request, starts the detached server with it and returns its answer.
fn front(args: &SshServerArgs) -> Result<String> {
    let hello = read_line(std::io::stdin().lock(), "the client's request on stdin")?;
    parse_hello(&hello)?;
    ssh_connection()?;
    let exe = std::env::current_exe().context("cannot find this program's own path to start the server")?;
    let mut child = std::process::Command::new(exe)
        .arg("ssh-server")
        .arg("--detached")
        .arg("--ports")
        .arg(format!("{}-{}", args.ports.0, args.ports.1))
        .arg("--session-expiry")
        .arg(humantime::format_duration(args.session_expiry).to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .context("cannot start the detached server")?;
    let (Some(mut to), Some(from)) = (child.stdin.take(), child.stdout.take()) else {
        bail!("the detached server has no pipes");
    };
    to.write_all(hello.as_bytes()).context("cannot pass the request on to the detached server")?;
    drop(to);
    match read_line(from, "the detached server's answer") {
        Ok(line) => Ok(line),
        Err(_) => {
            let status = child.wait().map_or_else(|e| e.to_string(), |s| s.to_string());
            bail!("the detached server exited before it was ready ({status})")
        }
    }
}

/// The addresses of the ssh connection this runs under: (the sshd's address and port).
fn ssh_connection() -> Result<SocketAddr> {
    let conn = std::env::var("SSH_CONNECTION").map_err(|_| {
        anyhow!(
            "SSH_CONNECTION is not set: `holdfast ssh-server` runs under the ssh connection that `holdfast ssh` opens"
        )
    })?;
    let words: Vec<&str> = conn.split_whitespace().collect();
    let parsed = match words.as_slice() {
        [_, _, ip, port] => ip.parse::<IpAddr>().ok().zip(port.parse::<u16>().ok()),
        _ => None,
    };
    let (ip, port) = parsed
        .ok_or_else(|| anyhow!("SSH_CONNECTION ({conn:?}) is not CLIENT_IP CLIENT_PORT SERVER_IP SERVER_PORT"))?;
    Ok(SocketAddr::new(ip, port))
}

/// The detached server: answers on stdout once it listens, then lets go of stdin and stdout.
async fn detached(args: SshServerArgs) -> Result<()> {
    let started = match start(&args).await {
        Ok(s) => s,
        Err(e) => {
            let _ = std::io::stdout().write_all(error_line(&format!("{e:#}")).as_bytes());
            return Err(e);
        }
    };
    let (listener, services, port, public) = started;
    let mut out = std::io::stdout().lock();
    out.write_all(ready_line(port, &public).as_bytes()).context("cannot answer on stdout")?;
    out.flush().context("cannot answer on stdout")?;
    drop(out);
    // From now on nothing reads or writes the ssh connection's pipes: let them go, so that the
    // ssh connection ends.
    let null = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null").context("cannot open /dev/null")?;
    rustix::stdio::dup2_stdin(&null).context("cannot let go of stdin")?;
    rustix::stdio::dup2_stdout(&null).context("cannot let go of stdout")?;
    let stats = listener.stats_handle();
    let stop = async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        let signalled = async {
            match term.as_mut() {
                Some(t) => drop(t.recv().await),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = session_over(stats) => {}
            () = signalled => {}
        }
    };
    tunnel::serve_until(listener, services, stop, Duration::from_secs(3)).await?;
    Ok(())
}

/// Resolves when the server has nothing left to do: its session has ended (closed, or expired),
/// or no session has begun within [`FIRST_WAIT`].
async fn session_over(stats: holdfast::net::StatsHandle) {
    let start = tokio::time::Instant::now();
    // The server's counters change without a notification: look every half second (a cheap
    // read of atomics).
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        let s = stats.stats();
        if s.opened > 0 && s.sessions == 0 {
            return;
        }
        if s.opened == 0 && s.sessions == 0 && start.elapsed() >= FIRST_WAIT {
            return;
        }
    }
}

/// Reads the client's key, makes this session's keys and binds the first free port.
async fn start(args: &SshServerArgs) -> Result<(holdfast::net::Listener, Arc<Services>, u16, PublicKey)> {
    let hello = read_line(std::io::stdin().lock(), "the request on stdin")?;
    let client = parse_hello(&hello)?;
    let sshd = ssh_connection()?;
    let mut services = Services::new();
    services.add("ssh", &sshd.to_string())?;
    let keypair = Keypair::generate();
    let public = keypair.public;
    let mut cfg = ServerConfig::new(keypair, AllowList::from_keys([(client, Some(CLIENT_NAME.to_string()))]));
    cfg.limits.session_expiry = args.session_expiry;
    cfg.limits.max_sessions = 4;
    cfg.limits.max_sessions_per_key = 4;
    cfg.limits.buffer_budget = BUFFER_BUDGET;
    cfg.limits.buffer_per_key = BUFFER_BUDGET;
    let (first, last) = args.ports;
    let mut last_err = None;
    for port in first..=last {
        match holdfast::bind(SocketAddr::new(sshd.ip(), port).to_string(), cfg.clone()).await {
            Ok(listener) => return Ok((listener, Arc::new(services), port, public)),
            Err(holdfast::net::Error::Bind { source, .. })
                if matches!(source.kind(), std::io::ErrorKind::AddrInUse | std::io::ErrorKind::PermissionDenied) =>
            {
                last_err = Some(source);
            }
            Err(e) => return Err(e).context(format!("cannot listen on {}", sshd.ip())),
        }
    }
    let why = last_err.map(|e| e.to_string()).unwrap_or_default();
    bail!(
        "no port of {first}-{last} is free on {} ({why}); give holdfast ssh --ports a wider or other range",
        sshd.ip()
    )
}
