//! The `holdfast` command: a thin clap front end over the library.

mod args;
mod client;
mod config;
mod demo;
mod keyfiles;
mod manpage;
mod metrics;
mod server;
mod ssh;
mod status;
mod term;

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use holdfast::proto::SessionConfig;
use tracing::warn;

use args::{Cli, Cmd, Timers};

pub(crate) fn session_config(t: &Timers) -> Result<SessionConfig> {
    if t.dead_after <= t.keepalive {
        bail!("--dead-after ({:?}) must be longer than --keepalive ({:?})", t.dead_after, t.keepalive);
    }
    Ok(SessionConfig {
        keepalive: t.keepalive,
        dead_after: t.dead_after,
        max_buffer: usize::try_from(t.buffer).context("--buffer is too large")?,
        ..SessionConfig::default()
    })
}

fn init_logs(cli: &Cli) {
    // The demo's output is its progress line and report; logs would only interleave with them.
    let quiet_by_default = matches!(cli.cmd, Cmd::Demo { .. } | Cmd::Connect(_) | Cmd::Ssh(_) | Cmd::SshProxy { .. });
    let default = match (cli.quiet, cli.verbose) {
        (true, _) => "error",
        (false, 0) if matches!(cli.cmd, Cmd::Demo { .. }) => "error",
        (false, 0) if quiet_by_default => "holdfast=warn,error",
        (false, 0) => "holdfast=info,warn",
        (false, 1) => "holdfast=debug,info",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default.into());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    if matches!(cli.cmd, Cmd::Server(_)) {
        // After an upgrade two server processes write to the same log (the new one inherits the
        // old one's stderr, and journald names the stream's first process): each line says
        // whose it is (found by an operator's day).
        logs.with_timer(WithPid(std::process::id())).init();
    } else {
        logs.init();
    }
}

/// The time of a log line, then the process id.
struct WithPid(u32);

impl tracing_subscriber::fmt::time::FormatTime for WithPid {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        tracing_subscriber::fmt::time::SystemTime.format_time(w)?;
        write!(w, " pid={}", self.0)
    }
}

async fn run(cli: Cli) -> Result<bool> {
    let quiet = cli.quiet;
    match cli.cmd {
        Cmd::Keygen { out } => keyfiles::keygen(&out)?,
        Cmd::Pubkey => keyfiles::pubkey()?,
        Cmd::Server(a) => server::server(a).await?,
        Cmd::Client(a) => client::client(a).await?,
        Cmd::Connect(a) => client::connect(a, quiet).await?,
        Cmd::SshProxy { file } => client::ssh_proxy(&file, quiet).await?,
        Cmd::SshServer(a) => ssh::remote::ssh_server(a).await?,
        Cmd::Ssh(a) => {
            // ssh's exit status is this command's (a remote command's status comes back).
            // -q and -v reach the ProxyCommand (`ssh-proxy`), which carries the link.
            let output = match (cli.quiet, cli.verbose) {
                (true, _) => " -q".to_string(),
                (false, 0) => String::new(),
                (false, n) => format!(" -{}", "v".repeat(usize::from(n.min(2)))),
            };
            // Its own failures exit 255, as ssh's do, so that a script tells them from a remote
            // command's status (found by a walk: they exited 1).
            SSH_FAILED.store(true, std::sync::atomic::Ordering::Relaxed);
            let code = ssh::ssh(a, &output).await?;
            SSH_FAILED.store(false, std::sync::atomic::Ordering::Relaxed);
            if code != 0 {
                std::process::exit(code);
            }
        }
        Cmd::Demo { bytes, faults } => return demo::demo(bytes, faults).await,
        Cmd::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut args::completed(), "holdfast", &mut script);
            write_stdout(&script)?;
        }
        Cmd::Status(a) => status::status(a).await?,
        Cmd::Man => write_stdout(manpage::render(&args::command()).as_bytes())?,
    }
    Ok(true)
}

/// Writes a command's output. A reader that went away (`holdfast status | head`) ends the
/// command quietly, as it does for other tools, not with a panic.
pub(crate) fn write_stdout(bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        r => r.context("cannot write to standard output"),
    }
}

/// Set while `holdfast ssh` runs: an error then exits 255, like ssh's own.
static SSH_FAILED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn main() -> ExitCode {
    let cli = match config::parse_from(std::env::args_os().collect()) {
        Ok(cli) => cli,
        Err(e) => match e.downcast_ref::<clap::Error>() {
            Some(usage) => usage.exit(),
            None => {
                eprintln!("holdfast: error: {}", error_line(&e));
                return ExitCode::from(2);
            }
        },
    };
    init_logs(&cli);
    // Private keys live in this process's memory: never let a core dump copy them to disk.
    if let Err(e) = holdfast::harden::disable_core_dumps() {
        warn!(error = %e, "could not disable core dumps");
    }
    // `connect` carries one stream for one program: a single thread moves its bytes without
    // waking another thread for every message (round trips through it are request/response).
    // tokio reads this variable itself, and panics on a value that is not a positive number.
    if let Some(v) = std::env::var_os("TOKIO_WORKER_THREADS") {
        if !matches!(v.to_str().map(str::parse::<usize>), Some(Ok(1..))) {
            eprintln!(
                "holdfast: error: TOKIO_WORKER_THREADS is {:?}: set it to a positive number of threads, or unset it (one per CPU; one for `client`)",
                v
            );
            return ExitCode::from(2);
        }
    }
    let rt = if matches!(cli.cmd, Cmd::Connect(_) | Cmd::SshProxy { .. } | Cmd::Ssh(_) | Cmd::SshServer(_)) {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else if matches!(cli.cmd, Cmd::Client(_)) && std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        // A client carries one user's forwards over one session, whose streams share one lock:
        // a second worker mostly hands tasks across threads. With one, iperf3 through a forward
        // moved 13 % more up on a 2-CPU machine, the rest within the noise (BENCHMARKS.md).
        tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()
    } else {
        tokio::runtime::Runtime::new()
    };
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("holdfast: error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(run(cli));
    // Do not wait for blocking tasks: tokio's stdin reader cannot be cancelled, so dropping the
    // runtime would hang until the peer closes stdin (e.g. `connect` failing under ssh).
    rt.shutdown_background();
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            // On a terminal (possibly ssh's, in raw mode) the line must return to column 0.
            if std::io::stderr().is_terminal() {
                eprint!("\r\nholdfast: error: {}\r\n", error_line(&e));
            } else {
                eprintln!("holdfast: error: {}", error_line(&e));
            }
            if SSH_FAILED.load(std::sync::atomic::Ordering::Relaxed) {
                ExitCode::from(255)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// The error and its causes on one line, control characters escaped, skipping causes the message already shows (errors
/// whose text includes `{source}`, such as "cannot reach server X: Connection refused").
fn error_line(e: &anyhow::Error) -> String {
    let mut line = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !line.contains(&cause) {
            line = format!("{line}: {cause}");
        }
    }
    // Our own messages are one line already; a peer's text in them (a CLOSE reason) must not
    // move the cursor or fake another line.
    holdfast::human::printable(&line.replace('\n', " ")).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_line_is_one_line_without_control_characters() {
        let peer = std::io::Error::other("peer closed the session (Abort): x\n2026-01-01 FAKE\u{1b}[31m");
        let e = anyhow::Error::new(peer).context("stream failed");
        let line = error_line(&e);
        assert_eq!(line, "stream failed: peer closed the session (Abort): x 2026-01-01 FAKE\\u{1b}[31m");
    }
}
