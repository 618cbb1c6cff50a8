//! The `holdfast` command: a thin clap front end over the library.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use holdfast::keys::{self, AllowList, Keypair, PrivateKey, PublicKey};
use holdfast::net::{LinkEvent, Recovery, RecoveryPolicy};
use holdfast::proto::{Cipher, SessionConfig};
use holdfast::tunnel::{self, Services};
use holdfast::{ClientConfig, ServerConfig};
use tracing::{error, info, warn};
use zeroize::Zeroizing;

const ABOUT: &str = "TCP streams that survive network faults, encrypted with Noise.";
const LONG_ABOUT: &str = "\
holdfast forwards TCP connections through an encrypted tunnel whose streams survive the loss of \
the real connection: Wi-Fi drops, sleep, address changes, NAT rebinding, injected resets. The \
client reconnects, both ends prove they are the same pair (Noise), un-acknowledged bytes are \
replayed, and the program on top never notices.

Start with `holdfast demo`, which needs no set-up.";

const EXAMPLES: &str = "\
Examples:
  holdfast demo                                   # see it survive faults, no set-up needed
  holdfast keygen --out keys/server               # on the server
  holdfast keygen --out keys/laptop               # on the client
  holdfast server --listen 0.0.0.0:7700 --key keys/server.key \\
      --authorized keys/authorized --service ssh=127.0.0.1:22
  holdfast client --server host:7700 --server-key keys/server.pub \\
      --key keys/laptop.key --local 127.0.0.1:2222 --service ssh
  ssh -o ProxyCommand='holdfast connect --server host:7700 --server-key keys/server.pub \\
      --key keys/laptop.key --service ssh' user@host";

#[derive(Parser)]
#[command(name = "holdfast", version, about = ABOUT, long_about = LONG_ABOUT, after_help = EXAMPLES)]
struct Cli {
    /// More log output on stderr (-v debug, -vv trace). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Only log errors.
    #[arg(short, long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate a key pair: NAME.key (private, mode 0600) and NAME.pub; prints the public key.
    #[command(
        after_help = "Example:\n  holdfast keygen --out keys/laptop\n\nKeys are WireGuard-compatible: one line of base64."
    )]
    Keygen {
        /// Path prefix: writes PREFIX.key and PREFIX.pub and never overwrites.
        #[arg(long, value_name = "PREFIX")]
        out: PathBuf,
    },
    /// Read a private key on stdin and print its public key (like `wg pubkey`).
    #[command(after_help = "Example:\n  holdfast pubkey < keys/laptop.key")]
    Pubkey,
    /// Run a server offering named services to allowed clients.
    #[command(
        after_help = "Example:\n  holdfast server --listen 0.0.0.0:7700 --key keys/server.key \\\n      --authorized keys/authorized --service ssh=127.0.0.1:22 --service db=127.0.0.1:5432\n\nThe authorized file has one client public key per line, optionally followed by a name;\n'#' starts a comment. Only the listed services are reachable.\n\nTo change who may connect without dropping anyone, edit the authorized file and send\nSIGHUP (kill -HUP PID): new connections follow the new list, live sessions go on."
    )]
    Server(ServerArgs),
    /// Forward a local port to a service on the server; each local connection gets its own
    /// resilient stream.
    #[command(
        after_help = "Example:\n  holdfast client --server host:7700 --server-key keys/server.pub \\\n      --key keys/laptop.key --local 127.0.0.1:2222 --service ssh\n  ssh -p 2222 user@127.0.0.1"
    )]
    Client(ClientArgs),
    /// Carry one stream on stdin/stdout, for `ssh -o ProxyCommand`. EOF on stdin is a half-close.
    #[command(
        after_help = "Example:\n  ssh -o ProxyCommand='holdfast connect --server host:7700 \\\n      --server-key keys/server.pub --key keys/laptop.key --service ssh' user@host"
    )]
    Connect(ConnectArgs),
    /// Run a whole tunnel on loopback, break its connection on purpose while data flows both
    /// ways, and report whether every byte arrived. Exit status 0 only if all matched.
    #[command(after_help = "Example:\n  holdfast demo --bytes 256MiB --faults 20")]
    Demo {
        /// Bytes to send in each direction (suffixes KiB, MiB, GiB).
        #[arg(long, default_value = "64MiB", value_parser = parse_size)]
        bytes: u64,
        /// Faults to inject (resets, and at least one silent stall).
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
        faults: u32,
    },
    /// Print shell completions.
    #[command(after_help = "Example:\n  holdfast completions bash > /etc/bash_completion.d/holdfast")]
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

#[derive(Args)]
struct ServerArgs {
    /// Address to listen on.
    #[arg(long, value_name = "ADDR")]
    listen: String,
    /// The server's private key file (mode 0600).
    #[arg(long, value_name = "FILE")]
    key: PathBuf,
    /// Allow-list of client public keys (reloaded on SIGHUP).
    #[arg(long, value_name = "FILE")]
    authorized: PathBuf,
    /// A service: NAME=HOST:PORT (repeat for more).
    #[arg(long = "service", value_name = "NAME=HOST:PORT", required = true)]
    services: Vec<String>,
    /// Most sessions at once.
    #[arg(long, default_value_t = 1024)]
    max_sessions: usize,
    /// Most sessions per client key.
    #[arg(long, default_value_t = 64)]
    max_sessions_per_key: usize,
    /// Most connections in their handshake at once.
    #[arg(long, default_value_t = 256)]
    max_handshakes: usize,
    /// How long a session whose client vanished is kept for it to resume.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    session_expiry: Duration,
    #[command(flatten)]
    timers: Timers,
}

#[derive(Args, Clone)]
struct Timers {
    /// Send a keepalive after this much silence.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    keepalive: Duration,
    /// Consider the link dead after this much silence from the peer.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    dead_after: Duration,
    /// Replay buffer per stream: bytes kept until acknowledged (writes wait when full).
    #[arg(long, default_value = "8MiB", value_parser = parse_size)]
    buffer: u64,
}

#[derive(Clone, Copy, ValueEnum)]
enum OnFault {
    /// Reconnect silently (default).
    Recover,
    /// Ask on the terminal (/dev/tty) whether to recover.
    Ask,
}

#[derive(Args, Clone)]
struct ClientCommon {
    /// The server, HOST:PORT (re-resolved on every reconnect).
    #[arg(long, value_name = "HOST:PORT")]
    server: String,
    /// The server's public key: a .pub file, or the base64 key itself.
    #[arg(long, value_name = "FILE|KEY")]
    server_key: String,
    /// This client's private key file (mode 0600).
    #[arg(long, value_name = "FILE")]
    key: PathBuf,
    /// The service to reach, by the name the server gives it.
    #[arg(long, value_name = "NAME")]
    service: String,
    /// What to do when the real connection fails.
    #[arg(long, value_enum, default_value = "recover")]
    on_fault: OnFault,
    /// Give up after this long without a connection; the stream then fails.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    give_up: Duration,
    /// The link's cipher. `auto` picks AES-256-GCM where this CPU has AES instructions (about
    /// three times faster there) and ChaCha20-Poly1305 elsewhere. The server accepts either.
    #[arg(long, value_enum, default_value = "auto")]
    cipher: CipherArg,
    #[command(flatten)]
    timers: Timers,
}

#[derive(Clone, Copy, ValueEnum)]
enum CipherArg {
    /// The faster one on this CPU.
    Auto,
    /// AES-256-GCM (fast with AES-NI / ARMv8 AES).
    #[value(name = "aes-256-gcm")]
    Aes256Gcm,
    /// ChaCha20-Poly1305 (fast everywhere in software).
    #[value(name = "chacha20-poly1305")]
    Chacha20Poly1305,
}

#[derive(Args)]
struct ClientArgs {
    /// Local address to accept connections on.
    #[arg(long, value_name = "ADDR")]
    local: String,
    /// Skip the start-up check that the server and service answer.
    #[arg(long)]
    no_check: bool,
    #[command(flatten)]
    common: ClientCommon,
}

#[derive(Args)]
struct ConnectArgs {
    #[command(flatten)]
    common: ClientCommon,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("'{s}' is not a size like 64MiB"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" | "kb" => 1 << 10,
        "m" | "mib" | "mb" => 1 << 20,
        "g" | "gib" | "gb" => 1 << 30,
        other => return Err(format!("unknown size unit '{other}' (use KiB, MiB or GiB)")),
    };
    n.checked_mul(mult).filter(|&v| v > 0).ok_or_else(|| format!("size '{s}' is out of range"))
}

fn session_config(t: &Timers) -> Result<SessionConfig> {
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
    let quiet_by_default = matches!(cli.cmd, Cmd::Demo { .. } | Cmd::Connect(_));
    let default = match (cli.quiet, cli.verbose) {
        (true, _) => "error",
        (false, 0) if matches!(cli.cmd, Cmd::Demo { .. }) => "error",
        (false, 0) if quiet_by_default => "holdfast=warn,error",
        (false, 0) => "holdfast=info,warn",
        (false, 1) => "holdfast=debug,info",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default.into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
}

fn load_keypair(path: &Path) -> Result<Keypair> {
    Ok(Keypair::from_private(keys::load_private_key(path)?))
}

fn load_server_key(arg: &str) -> Result<PublicKey> {
    if let Ok(k) = arg.parse::<PublicKey>() {
        return Ok(k);
    }
    Ok(keys::load_public_key(Path::new(arg))?)
}

fn keygen(out: &Path) -> Result<()> {
    let key_path = out.with_extension("key");
    let pub_path = out.with_extension("pub");
    for p in [&key_path, &pub_path] {
        if p.exists() {
            bail!("refusing to overwrite existing file {}", p.display());
        }
    }
    if let Some(dir) = key_path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create directory {}", dir.display()))?;
    }
    let kp = Keypair::generate();
    keys::save_private_key(&key_path, &kp.private)?;
    keys::save_public_key(&pub_path, &kp.public)?;
    println!("{}", kp.public);
    eprintln!("wrote {} (private, mode 0600) and {}", key_path.display(), pub_path.display());
    Ok(())
}

fn pubkey() -> Result<()> {
    let mut text = Zeroizing::new(String::new());
    std::io::stdin().read_to_string(&mut text).context("cannot read stdin")?;
    let key = PrivateKey::from_base64(text.trim())?;
    println!("{}", key.public_key());
    Ok(())
}

async fn server(args: ServerArgs) -> Result<()> {
    let keypair = load_keypair(&args.key)?;
    let allow = AllowList::load(&args.authorized)?;
    if allow.is_empty() {
        warn!(file = %args.authorized.display(), "the allow-list is empty: no client can connect");
    }
    let mut services = Services::new();
    for spec in &args.services {
        services.add_spec(spec).with_context(|| format!("--service {spec}"))?;
    }
    let mut cfg = ServerConfig::new(keypair, allow);
    cfg.session = session_config(&args.timers)?;
    cfg.limits.max_sessions = args.max_sessions;
    cfg.limits.max_sessions_per_key = args.max_sessions_per_key;
    cfg.limits.max_handshakes = args.max_handshakes;
    cfg.limits.session_expiry = args.session_expiry;
    let public = cfg.keypair.public;
    let listener = holdfast::bind(args.listen.clone(), cfg).await?;
    info!(listen = %listener.local_addr(), server_key = %public, services = services.len(), "server ready");
    let reload = reload_on_hangup(listener.allow_list_handle(), args.authorized.clone());
    tokio::select! {
        r = tunnel::serve(listener, Arc::new(services)) => r?,
        _ = tokio::signal::ctrl_c() => info!("interrupted; exiting"),
        r = reload => r?,
    }
    Ok(())
}

/// Reloads the allow-list file on every SIGHUP. A file that does not load (missing, malformed,
/// readable by others) is reported and the list in force stays; live sessions are untouched.
async fn reload_on_hangup(handle: holdfast::net::AllowListHandle, path: PathBuf) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangups = signal(SignalKind::hangup()).context("cannot watch for SIGHUP")?;
    while hangups.recv().await.is_some() {
        match AllowList::load(&path) {
            Ok(list) => {
                if list.is_empty() {
                    warn!(file = %path.display(), "the reloaded allow-list is empty: no new client can connect");
                }
                let n = list.len();
                handle.set(list);
                info!(file = %path.display(), clients = n, "allow-list reloaded");
            }
            Err(e) => error!(error = %e, "allow-list not reloaded; the previous one stays in force"),
        }
    }
    std::future::pending().await
}

fn client_config(c: &ClientCommon) -> Result<ClientConfig> {
    tunnel::check_name(&c.service)?;
    let mut cfg = ClientConfig::new(load_keypair(&c.key)?, load_server_key(&c.server_key)?);
    cfg.session = session_config(&c.timers)?;
    cfg.recovery = RecoveryPolicy { give_up_after: c.give_up, ..RecoveryPolicy::default() };
    cfg.cipher = match c.cipher {
        CipherArg::Auto => Cipher::preferred(),
        CipherArg::Aes256Gcm => Cipher::AesGcm,
        CipherArg::Chacha20Poly1305 => Cipher::ChaChaPoly,
    };
    if let OnFault::Ask = c.on_fault {
        cfg.recovery = cfg.recovery.with_hook(|lost| async move {
            tokio::task::spawn_blocking(move || ask_tty(&lost.cause)).await.unwrap_or(Recovery::Fail)
        });
    }
    Ok(cfg)
}

/// Asks on the controlling terminal whether to recover. Without a terminal, recovers.
fn ask_tty(cause: &str) -> Recovery {
    let Ok(mut tty) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/tty") else {
        warn!("--on-fault ask: no terminal to ask; recovering");
        return Recovery::Recover;
    };
    let _ = write!(tty, "\r\nholdfast: link lost ({cause}). Recover? [Y/n] ");
    let _ = tty.flush();
    let mut line = String::new();
    let mut byte = [0u8; 1];
    while let Ok(1) = tty.read(&mut byte) {
        if byte[0] == b'\n' {
            break;
        }
        line.push(byte[0] as char);
    }
    match line.trim().to_ascii_lowercase().as_str() {
        "n" | "no" => Recovery::Fail,
        _ => Recovery::Recover,
    }
}

fn log_event(from: std::net::SocketAddr, ev: LinkEvent) {
    match ev {
        LinkEvent::Lost(l) => warn!(%from, cause = %l.cause, faults = l.faults, "link lost; reconnecting"),
        LinkEvent::Resumed { after, replayed_sent, replayed_received, peer } => {
            info!(%from, %peer, ?after, replayed_sent, replayed_received, "link resumed")
        }
        LinkEvent::Failed { reason } => error!(%from, %reason, "stream failed"),
        LinkEvent::Reconnecting { attempt, elapsed } if attempt > 1 => {
            info!(%from, attempt, ?elapsed, "reconnecting")
        }
        _ => {}
    }
}

async fn client(args: ClientArgs) -> Result<()> {
    let c = &args.common;
    let cfg = client_config(c)?;
    let local =
        tokio::net::TcpListener::bind(&args.local).await.with_context(|| format!("cannot listen on {}", args.local))?;
    if !args.no_check {
        let mut probe = tunnel::open(&c.server, cfg.clone(), &c.service).await?;
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut probe).await;
    }
    info!(local = %local.local_addr()?, server = %c.server, service = %c.service, "forwarding");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some((from, ev)) = rx.recv().await {
            log_event(from, ev);
        }
    });
    tokio::select! {
        r = tunnel::forward(local, c.server.clone(), cfg, c.service.clone(), Some(tx)) => r?,
        _ = tokio::signal::ctrl_c() => info!("interrupted; exiting"),
    }
    Ok(())
}

async fn connect(args: ConnectArgs) -> Result<()> {
    let c = &args.common;
    // The library logs link events itself; stdout carries only stream bytes.
    let stream = tunnel::open(&c.server, client_config(c)?, &c.service).await?;
    tunnel::stdio(stream).await?;
    Ok(())
}

async fn demo(bytes: u64, faults: u32) -> Result<bool> {
    let mib = |v: u64| v as f64 / (1 << 20) as f64;
    eprintln!("holdfast demo: app -> forward port -> holdfast client -> fault relay -> holdfast server -> service");
    eprintln!("  {:.0} MiB each way, {faults} faults (resets and a silent stall), all on loopback\n", mib(bytes));
    let opts = holdfast::demo::DemoOptions { bytes, faults, progress: std::io::stderr().is_terminal() };
    let r = holdfast::demo::run(opts).await?;
    let mut times = r.resume_times.clone();
    times.sort();
    let median = times.get(times.len() / 2).copied().unwrap_or_default();
    let max = times.last().copied().unwrap_or_default();
    let mark = |ok: bool| if ok { "match" } else { "MISMATCH" };
    println!("holdfast demo report");
    println!("  up:    sent {} B, received {} B, SHA-256 {} ({})", r.up.0, r.up.1, mark(r.up_match), r.up_hash);
    println!("  down:  sent {} B, received {} B, SHA-256 {} ({})", r.down.0, r.down.1, mark(r.down_match), r.down_hash);
    println!("  faults injected: {} ({} resets, {} silent stall)", r.resets + r.stalls, r.resets, r.stalls);
    println!("  resumes: {}", r.resumes);
    println!("  time to resume after detection: median {median:.1?}, max {max:.1?}");
    println!("  bytes replayed: {} by the client, {} by the server", r.replayed.0, r.replayed.1);
    let rate = mib(2 * bytes) / r.elapsed.as_secs_f64().max(1e-9);
    println!("  elapsed: {:.2?} ({rate:.0} MiB/s both ways combined, faults included)", r.elapsed);
    println!("  result: {}", if r.ok() { "OK: every byte arrived, exactly once, in order" } else { "FAILED" });
    Ok(r.ok())
}

async fn run(cli: Cli) -> Result<bool> {
    match cli.cmd {
        Cmd::Keygen { out } => keygen(&out)?,
        Cmd::Pubkey => pubkey()?,
        Cmd::Server(a) => server(a).await?,
        Cmd::Client(a) => client(a).await?,
        Cmd::Connect(a) => connect(a).await?,
        Cmd::Demo { bytes, faults } => return demo(bytes, faults).await,
        Cmd::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "holdfast", &mut std::io::stdout());
        }
    }
    Ok(true)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logs(&cli);
    // Private keys live in this process's memory: never let a core dump copy them to disk.
    if let Err(e) = holdfast::harden::disable_core_dumps() {
        warn!(error = %e, "could not disable core dumps");
    }
    let rt = match tokio::runtime::Runtime::new() {
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
            eprintln!("holdfast: error: {}", error_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, skipping causes the message already shows (errors
/// whose text includes `{source}`, such as "cannot reach server X: Connection refused").
fn error_line(e: &anyhow::Error) -> String {
    let mut line = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !line.contains(&cause) {
            line = format!("{line}: {cause}");
        }
    }
    line.replace('\n', " ")
}
