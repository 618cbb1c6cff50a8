//! The command line: every subcommand, flag, default and help text (clap).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum, ValueHint};

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

/// The command line as clap parses and documents it: the derived definitions, plus the help
/// texts that differ between the subcommands sharing a flag (`--service` of `client` and
/// `connect`). Use this, never `Cli::command()`, so that --help, the man page and the
/// completions say the same.
pub(crate) fn command() -> clap::Command {
    use clap::CommandFactory;
    Cli::command().mut_subcommands(|c| {
        if c.get_name() != "client" {
            return c;
        }
        // mut_args keeps the order (mut_arg would move the flag to the end of the help).
        c.mut_args(|a| match a.get_id().as_str() {
            "service" => a.help(
                "The service for every --local that names none (HOST:PORT without =SERVICE), by the name the server gives it",
            ),
            _ => a,
        })
    })
}

/// [`command`] as shell completions offer it: without the hidden subcommands (the halves of
/// `holdfast ssh` that it runs itself), which clap_complete would list.
pub(crate) fn completed() -> clap::Command {
    let all = command();
    let shown: Vec<clap::Command> = all.get_subcommands().filter(|c| !c.is_hide_set()).cloned().collect();
    clap::Command::new("holdfast").args(all.get_arguments().cloned()).subcommands(shown)
}

#[derive(Parser)]
#[command(name = "holdfast", version, about = ABOUT, long_about = LONG_ABOUT, after_help = EXAMPLES)]
pub(crate) struct Cli {
    /// More log output on stderr (-v debug, -vv trace). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true, help_heading = "Output")]
    pub(crate) verbose: u8,
    /// Only log errors.
    #[arg(short, long, global = true, help_heading = "Output")]
    pub(crate) quiet: bool,
    #[command(subcommand)]
    pub(crate) cmd: Cmd,
}

#[derive(Subcommand)]
pub(crate) enum Cmd {
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
        after_help = "Example:\n  holdfast server --listen 0.0.0.0:7700 --key keys/server.key \\\n      --authorized keys/authorized --service ssh=127.0.0.1:22 --service db=127.0.0.1:5432\n\nThe authorized file has one client public key per line, optionally followed by a name (unique\nin the file) and options: services=NAME[,NAME...] lets that key reach only those services,\nforward=connect,listen gives a restricted key dynamic (--allow-connect) or reverse\n(--allow-listen) forwarding too; a key with no option reaches everything the server offers.\nAny other word=value refuses the file, with its line number. '#' starts a comment:\n  HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw= alice-laptop services=ssh,db\nA service a key is not given is answered like an unknown one. The file and its directories\nmust not be writable by group or others.\n\nTo change who may connect, edit the authorized file and send SIGHUP (kill -HUP PID): every\nrequest follows the new list from then on, and a removed key's sessions end at once (its\nclient is told it is no longer allowed). A file that does not load leaves the old list.\n\nEvery flag can be set in a TOML file instead, under its long name in a [server] section;\nflags on the command line override it (a list flag replaces the file's list), and relative\npaths in it are relative to the file's directory:\n  holdfast server --config /etc/holdfast/server.toml --metrics 127.0.0.1:9770\n  # server.toml\n  [server]\n  listen = \"0.0.0.0:7700\"\n  key = \"keys/server.key\"\n  authorized = \"keys/authorized\"\n  service = [\"ssh=127.0.0.1:22\"]\n  session-expiry = \"2h\"\n\nWith --metrics, GET http://127.0.0.1:9770/metrics answers in the Prometheus text format\n(sessions attached and detached, handshakes, resumes, expiries, refusals, sessions per client).\n\nTo upgrade the binary or change any flag without dropping a session, run the server with\n--handover /run/holdfast/handover.sock and send SIGUSR2 (or start the new server by hand with\nthe same --handover): the new process takes the port over, the old one keeps its sessions\nuntil they end. docs/DEPLOY.md has a systemd unit that does this on `systemctl reload`."
    )]
    Server(ServerArgs),
    /// Forward local ports to services on the server (like ssh -L), SOCKS5 (like ssh -D) or
    /// server ports back here (like ssh -R), all as streams of one resilient session.
    #[command(
        after_help = "Examples:\n  holdfast client --server host:7700 --server-key keys/server.pub \\\n      --key keys/laptop.key --local 127.0.0.1:2222 --service ssh\n  ssh -p 2222 user@127.0.0.1\n\n  holdfast client ... --socks 127.0.0.1:1080        (server: --allow-connect '*.internal:*')\n  holdfast client ... --remote 127.0.0.1:8080=127.0.0.1:3000   (server: --allow-listen '127.0.0.1:8080')\n\nEvery flag can be set in a TOML file instead, under its long name in a [client] section (the\nsame file serves `holdfast connect`); flags override it, and relative paths in it are relative to its directory:\n  holdfast client --config ~/.config/holdfast/client.toml --local 127.0.0.1:2222=ssh\n  # client.toml\n  [client]\n  server = \"host:7700\"\n  server-key = \"keys/server.pub\"\n  key = \"keys/laptop.key\"\n  local = [\"127.0.0.1:2222=ssh\", \"127.0.0.1:5433=db\"]"
    )]
    Client(ClientArgs),
    /// Carry one stream on stdin/stdout, for `ssh -o ProxyCommand`. EOF on stdin is a half-close.
    #[command(
        after_help = "Example:\n  ssh -o ProxyCommand='holdfast connect --server host:7700 \\\n      --server-key keys/server.pub --key keys/laptop.key --service ssh' user@host\n\nOn a terminal, connect shows the link state in the window title while it recovers a lost\nlink; -q turns that off.\n\nWith a config file (its [client] section; only the keys `connect` has are used):\n  ssh -o ProxyCommand='holdfast connect --config client.toml --service ssh' user@host"
    )]
    Connect(ConnectArgs),
    /// Resilient ssh with nothing set up on the server: runs your own `ssh` to start a holdfast
    /// server there for this one session, then your `ssh` through it.
    #[command(after_help = SSH_HELP)]
    Ssh(SshArgs),
    /// The remote end of `holdfast ssh` (started by it over ssh; not for use by hand).
    #[command(hide = true)]
    SshServer(SshServerArgs),
    /// The ProxyCommand of `holdfast ssh` (run by ssh; not for use by hand).
    #[command(hide = true)]
    SshProxy {
        /// The session file written by `holdfast ssh` (mode 0600; read once and removed).
        file: PathBuf,
    },
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
    /// Show the live sessions of a running server (or the forwards and session of a running
    /// client): what its --status control socket answers, as a table or as JSON.
    #[command(
        after_help = "Examples:\n  holdfast status                                  (server with --status /run/holdfast/status.sock)\n  holdfast status --json\n  holdfast status --socket /run/user/1000/forward.sock   (a client run with --status PATH)\n\nOnly the user the server runs as (and root) can use the socket."
    )]
    Status(StatusArgs),
    /// Print shell completions.
    #[command(after_help = "Example:\n  holdfast completions bash > /etc/bash_completion.d/holdfast")]
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), generated from the same text as --help.
    #[command(after_help = "Example:\n  holdfast man > /usr/local/share/man/man1/holdfast.1 && man holdfast")]
    Man,
}

const SSH_HELP: &str = "\
Examples:
  holdfast ssh user@host                  # a shell that survives resets, sleep and roaming
  holdfast ssh -L 5433:127.0.0.1:5432 host  # ssh's own options, forwards included
  holdfast ssh host 'tar c dir' > dir.tar # a command; its exit status is ssh's
  holdfast ssh --server ~/bin/holdfast host

Nothing is set up beforehand: the `holdfast` binary on the remote host is all it needs. Your
ssh (with your ~/.ssh/config, agent, keys and known hosts) logs in once to start a holdfast
server there for this session only: fresh keys for both ends, exchanged over that ssh
connection; it listens on a TCP port of --ports, lets in only this session's key and
reaches only the sshd you logged in to. Then your ssh runs again with your options, through
that server, with its own keepalives off (ServerAliveInterval=0): holdfast detects and
repairs faults instead. The remote server exits when the session ends, or when it has
waited --session-expiry for this client to come back.

holdfast's own options come before ssh's; from the first option holdfast does not know
(or the destination), the rest is ssh's. A -v or -q before that is holdfast's: for ssh's,
give it after another ssh option, or after -- (holdfast ssh -- -v host).

Known: you log in twice (the bootstrap, then the session; a password is asked twice), and
ssh's ControlMaster sharing is off for the session (it must be its own connection).";

/// The flags of `holdfast ssh`: its own, then everything for ssh.
#[derive(Args)]
pub(crate) struct SshArgs {
    /// The holdfast program on the remote host: a name looked up on the PATH of a
    /// non-interactive ssh command there, or a path.
    #[arg(long, value_name = "PATH", default_value = "holdfast")]
    pub(crate) server: String,
    /// The TCP ports the remote holdfast server may listen on, FIRST-LAST (it takes the first
    /// free one). This machine must be able to connect to them.
    #[arg(long, value_name = "FIRST-LAST", default_value = "7710-7799", value_parser = parse_port_range)]
    pub(crate) ports: (u16, u16),
    /// Give up after this long without a connection (time asleep counts); ssh then ends.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration, help_heading = "Recovery")]
    pub(crate) give_up: Duration,
    /// How long the remote server keeps the session for this client to come back; it exits then
    /// (with the remote shell). At most --give-up and a minute: after that no client can come
    /// back (its session keys are gone).
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration, help_heading = "Recovery")]
    pub(crate) session_expiry: Duration,
    /// ssh's options, the destination ([user@]host) and the remote command, as for ssh.
    #[arg(value_name = "SSH ARGS", required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    pub(crate) ssh: Vec<std::ffi::OsString>,
}

/// The flags of the remote end of `holdfast ssh` (`holdfast ssh-server`).
#[derive(Args)]
pub(crate) struct SshServerArgs {
    /// The TCP ports to listen on, FIRST-LAST: the first free one is taken.
    #[arg(long, value_name = "FIRST-LAST", default_value = "7710-7799", value_parser = parse_port_range)]
    pub(crate) ports: (u16, u16),
    /// How long the session is kept for its client to come back.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    pub(crate) session_expiry: Duration,
    /// Run as the detached server (started by `ssh-server` itself).
    #[arg(long, hide = true)]
    pub(crate) detached: bool,
}

/// `FIRST-LAST` (or one port): an inclusive range of TCP ports, none of them 0.
pub(crate) fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let bad = || format!("'{s}' is not a port range; give FIRST-LAST, for example 7710-7799 (ports 1-65535)");
    let (a, b) = s.trim().split_once('-').unwrap_or((s.trim(), s.trim()));
    let (a, b) = (a.trim().parse::<u16>().map_err(|_| bad())?, b.trim().parse::<u16>().map_err(|_| bad())?);
    if a == 0 || b < a {
        return Err(bad());
    }
    Ok((a, b))
}

/// The flags of `holdfast server`. Each one can also be set in the `[server]` section of a
/// `--config` file, under its long name: add the field to `config::ServerSection` too (a test
/// checks that both list the same flags).
#[derive(Args)]
pub(crate) struct ServerArgs {
    /// Settings from a TOML file, section [server]; flags given here override it.
    #[arg(long, value_name = "FILE", value_hint = ValueHint::FilePath)]
    pub(crate) config: Option<PathBuf>,
    /// Address to listen on, HOST[:PORT] (port 7700 if none is given), e.g. 0.0.0.0:7700.
    /// Required (here or in the config file).
    #[arg(long, value_name = "HOST[:PORT]", value_parser = parse_holdfast_addr)]
    pub(crate) listen: Option<String>,
    /// The server's private key file (mode 0600, owned by the server's user). Required (here or
    /// in the config file).
    #[arg(long, value_name = "FILE", value_hint = ValueHint::FilePath)]
    pub(crate) key: Option<PathBuf>,
    /// Allow-list of client public keys (reloaded on SIGHUP). Required (here or in the config
    /// file).
    #[arg(long, value_name = "FILE", value_hint = ValueHint::FilePath)]
    pub(crate) authorized: Option<PathBuf>,
    /// A service: NAME=HOST:PORT (repeat for more). At least one, unless --allow-connect or
    /// --allow-listen is given. A HOST given by name is looked up when a client asks for the
    /// service, one look-up at a time, its answer reused for 5 s.
    #[arg(long = "service", value_name = "NAME=HOST:PORT")]
    pub(crate) services: Vec<String>,
    /// Where clients' SOCKS5 CONNECTs (holdfast client --socks) may go: [CLIENT@]HOST:PORT,
    /// repeat for more; none by default. HOST: a name, *.suffix, *, an address or a CIDR block
    /// (an address rule is checked against the resolved address); PORT: N, N-M or *. CLIENT is
    /// a name from the allow-list, to give one key a rule. Example: --allow-connect
    /// '*.internal:443' --allow-connect 'laptop@10.0.0.0/8:*'.
    #[arg(long = "allow-connect", value_name = "[CLIENT@]HOST:PORT")]
    pub(crate) allow_connect: Vec<String>,
    /// Where clients' reverse forwards (holdfast client --remote) may listen on this machine:
    /// [CLIENT@]ADDRESS:PORT, ADDRESS an IP, a CIDR block or *; PORT N, N-M or *. None by
    /// default. Example: --allow-listen 'laptop@127.0.0.1:8000-8099'.
    #[arg(long = "allow-listen", value_name = "[CLIENT@]ADDRESS:PORT")]
    pub(crate) allow_listen: Vec<String>,
    /// This server's id in a fleet behind a load balancer: every resume id it issues begins
    /// with N (bytes 8-9 of a resume connection, big-endian), so that the balancer can send each
    /// resume to the server that holds its session. Give every server its own. See
    /// docs/DEPLOY.md for the HAProxy configuration.
    #[arg(long, value_name = "N", help_heading = "Fleet")]
    pub(crate) server_id: Option<u16>,
    /// A load balancer's address or CIDR block (repeat for more): connections from it must begin
    /// with a PROXY protocol v2 header (HAProxy: send-proxy-v2), and the client address it names
    /// is used for the per-source limits and the logs. Connections from other addresses are
    /// served as usual and never read for a header. Example: --proxy-from 10.0.0.5.
    #[arg(long = "proxy-from", value_name = "ADDRESS|CIDR", value_parser = parse_net, help_heading = "Fleet")]
    pub(crate) proxy_from: Vec<ipnet::IpNet>,
    /// Allow upgrades that keep every session: a Unix socket path, e.g. /run/holdfast/handover.sock.
    /// A server started with the same path while one runs takes its listening socket over; the
    /// old one stops accepting, keeps its sessions (resumes of them are handed to it) and exits
    /// when the last one ends. SIGUSR2 starts the new process (this binary, these arguments).
    #[arg(long, value_name = "PATH", help_heading = "Upgrades")]
    pub(crate) handover: Option<PathBuf>,
    /// After handing over, the longest this process keeps its sessions before exiting (they are
    /// then lost, and their clients told so). Default: until the last one ends or expires. Needs
    /// --handover (on the command line or in the config file).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, help_heading = "Upgrades")]
    pub(crate) retire_after: Option<Duration>,
    /// How long a stopping server (SIGTERM, Ctrl-C) lets the tunnels open run to their end: it
    /// accepts nothing new, and a transfer in flight finishes. Those still open then are ended,
    /// their programs see a reset (never a clean end of a transfer cut short) and their clients
    /// are told the server stopped. A second SIGTERM or Ctrl-C ends the drain there (a third
    /// exits without telling the clients). Keep it below systemd's TimeoutStopSec (20 s in the
    /// unit) minus 3 s.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration, help_heading = "Upgrades")]
    pub(crate) drain_time: Duration,
    /// Most sessions at once (each takes a file descriptor for its link and one for each
    /// service connection it carries: the server raises its limit at start as far as the system
    /// allows, and says so if that is too few).
    #[arg(long, default_value_t = 16384, help_heading = "Limits")]
    pub(crate) max_sessions: usize,
    /// Most sessions per client key.
    #[arg(long, default_value_t = 64, help_heading = "Limits")]
    pub(crate) max_sessions_per_key: usize,
    /// Memory all sessions' buffers may hold together (bytes sent and not yet acknowledged,
    /// received and not yet passed on). Sessions are charged what they hold, not their worst
    /// case; when it is spent, transfers wait (nothing is dropped, no session refused).
    #[arg(long, default_value = "1GiB", value_parser = parse_size, help_heading = "Limits")]
    pub(crate) buffer_budget: u64,
    /// The share of --buffer-budget the sessions of one client key may hold together, so that
    /// no key can starve the others [default: a quarter of --buffer-budget, 256 MiB at its
    /// default]. At most half of --buffer-budget: a larger value is lowered to that, with a
    /// warning.
    #[arg(long, value_parser = parse_size, help_heading = "Limits")]
    pub(crate) buffer_per_key: Option<u64>,
    /// New connections per second from one source address (a /64 for IPv6), with a burst of as
    /// many; more are told BUSY and retry. Raise it when many clients share one address (a
    /// large NAT), or for a load test from one host.
    #[arg(long, default_value_t = 20, help_heading = "Limits")]
    pub(crate) handshake_rate: u32,
    /// Most connections in their handshake at once.
    #[arg(long, default_value_t = 2048, help_heading = "Limits")]
    pub(crate) max_handshakes: usize,
    /// How long a session whose client vanished is kept for it to resume: a day, so that a
    /// laptop closed overnight finds its session. A detached session holds its connection to
    /// the service and what its buffers held (charged to --buffer-budget; an idle one, none).
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration, help_heading = "Limits")]
    pub(crate) session_expiry: Duration,
    /// Serve Prometheus metrics (GET /metrics) on this address, e.g. 127.0.0.1:9770. Off by
    /// default; a loopback address only, unless --metrics-public is given.
    #[arg(long, value_name = "IP:PORT", help_heading = "Metrics")]
    pub(crate) metrics: Option<std::net::SocketAddr>,
    /// Let --metrics listen on an address other than loopback. The metrics carry no secret
    /// but do name the allowed clients and show when they are connected.
    // Not `requires = "metrics"`: the config file is checked alone first, where that would
    // refuse `metrics-public = true` with `--metrics` on the command line; see check_addr.
    #[arg(long, help_heading = "Metrics")]
    pub(crate) metrics_public: bool,
    /// A local control socket for `holdfast status`, e.g. /run/holdfast/status.sock: it lists
    /// every live session. Created mode 0600; only this server's user (and root) may use it.
    #[arg(long, value_name = "PATH", help_heading = "Metrics")]
    pub(crate) status: Option<PathBuf>,
    #[command(flatten, next_help_heading = "Timers and buffers")]
    pub(crate) timers: Timers,
}

#[derive(Args, Clone)]
pub(crate) struct Timers {
    /// Send a keepalive after this much silence.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub(crate) keepalive: Duration,
    /// Consider the link dead after this much silence from the peer.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    pub(crate) dead_after: Duration,
    /// Replay buffer of each session, shared by its streams: bytes sent and kept until
    /// acknowledged, to be sent again after a fault (writes wait when it is full).
    #[arg(long, default_value = "8MiB", value_parser = parse_size)]
    pub(crate) buffer: u64,
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum OnFault {
    /// Reconnect silently (default).
    Recover,
    /// Ask on the terminal (/dev/tty) whether to recover; not while an interactive program
    /// (an interactive ssh) reads it key by key: then recover, saying so once.
    Ask,
}

/// The flags `holdfast client` and `holdfast connect` share. Each can also be set in the
/// `[client]` section of a `--config` file (see `config::ClientSection`).
#[derive(Args, Clone)]
pub(crate) struct ClientCommon {
    /// Settings from a TOML file, section [client]; flags given here override it.
    #[arg(long, value_name = "FILE", value_hint = ValueHint::FilePath)]
    pub(crate) config: Option<PathBuf>,
    /// The server, HOST[:PORT] (port 7700 if none is given; re-resolved on every reconnect).
    /// Required (here or in the config file).
    #[arg(long, value_name = "HOST[:PORT]", value_parser = parse_holdfast_addr)]
    pub(crate) server: Option<String>,
    /// The server's public key: a .pub file, or the base64 key itself. Required (here or in the
    /// config file).
    #[arg(long, value_name = "FILE|KEY", value_hint = ValueHint::FilePath)]
    pub(crate) server_key: Option<String>,
    /// This client's private key file (mode 0600). Required (here or in the config file).
    #[arg(long, value_name = "FILE", value_hint = ValueHint::FilePath)]
    pub(crate) key: Option<PathBuf>,
    /// The service to reach, by the name the server gives it. Required (here or in the config
    /// file).
    #[arg(long, value_name = "NAME")]
    pub(crate) service: Option<String>,
    /// What to do when the real connection fails.
    #[arg(long, value_enum, default_value = "recover", help_heading = "Recovery")]
    pub(crate) on_fault: OnFault,
    /// Give up after this long without a connection (time asleep counts); the stream then
    /// fails. A day by default, so that a laptop closed overnight resumes in the morning.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration, help_heading = "Recovery")]
    pub(crate) give_up: Duration,
    /// The link's cipher. `auto` picks AES-256-GCM where this CPU has AES instructions (about
    /// three times faster there) and ChaCha20-Poly1305 elsewhere. The server accepts either.
    #[arg(long, value_enum, default_value = "auto")]
    pub(crate) cipher: CipherArg,
    #[command(flatten, next_help_heading = "Timers and buffers")]
    pub(crate) timers: Timers,
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum CipherArg {
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
pub(crate) struct ClientArgs {
    /// A local address to accept connections on, HOST:PORT, optionally with the service for it:
    /// HOST:PORT=SERVICE. Or, as ssh -L, [BIND:]PORT:HOST:HOSTPORT (BIND 127.0.0.1 if not
    /// given): each connection goes to HOST:HOSTPORT, connected by the server where its
    /// --allow-connect rules let this key (needs multiplexing). Repeat for more forwards in one
    /// process. At least one, unless --socks or --remote is given.
    #[arg(long, value_name = "HOST:PORT[=SERVICE]|[BIND:]PORT:HOST:HOSTPORT", value_parser = parse_local)]
    pub(crate) local: Vec<Local>,
    /// A local SOCKS5 listener, HOST:PORT (or a port alone, on 127.0.0.1), as ssh -D: each CONNECT is carried to the server,
    /// which resolves the name and connects where its --allow-connect rules let this key go.
    /// Example: --socks 127.0.0.1:1080, then curl --socks5-hostname 127.0.0.1:1080 URL.
    /// The listener has no authentication: whoever reaches it uses this key's rights, so give
    /// a loopback address (any other is logged as a warning).
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_socks)]
    pub(crate) socks: Option<String>,
    /// A reverse forward, as ssh -R: SERVER_IP:PORT=HOST:PORT asks the server to listen on
    /// SERVER_IP:PORT (where its --allow-listen rules let this key) and carries every
    /// connection to it back here, to HOST:PORT. Port 0 lets the server choose (logged).
    /// Repeat for more. Example: --remote 127.0.0.1:8080=127.0.0.1:3000.
    #[arg(long, value_name = "SERVER_IP:PORT=HOST:PORT", value_parser = parse_remote)]
    pub(crate) remote: Vec<(String, String)>,
    /// Skip the start-up check that the server and service answer (it opens one connection to
    /// each service, which the service may log).
    #[arg(long)]
    pub(crate) no_check: bool,
    /// One holdfast session per local connection (a handshake and a resume of its own each),
    /// instead of carrying every connection as a stream of one session (the default, and
    /// faster to open). Not with --socks or --remote, which need the shared session.
    #[arg(long)]
    pub(crate) no_mux: bool,
    /// A local control socket for `holdfast status --socket PATH`: it lists this client's
    /// forwards and the state of its session. Created mode 0600; only this user (and root) may
    /// use it.
    #[arg(long, value_name = "PATH")]
    pub(crate) status: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) common: ClientCommon,
}

/// The flags of `holdfast status`.
#[derive(Args)]
pub(crate) struct StatusArgs {
    /// The control socket of the server (its --status) or client (its --status).
    #[arg(long, value_name = "PATH", default_value = "/run/holdfast/status.sock")]
    pub(crate) socket: PathBuf,
    /// JSON instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Args)]
pub(crate) struct ConnectArgs {
    #[command(flatten)]
    pub(crate) common: ClientCommon,
}

/// The port of holdfast servers when an address names none.
pub(crate) const DEFAULT_PORT: u16 = 7700;

/// `HOST` or `HOST:PORT` (IPv6 as `[ADDR]:PORT`, or bare): the address with its port, 7700 if
/// none was given.
pub(crate) fn parse_holdfast_addr(s: &str) -> Result<String, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("an address is empty; give HOST or HOST:PORT".into());
    }
    if s.parse::<std::net::Ipv6Addr>().is_ok() {
        return Ok(format!("[{s}]:{DEFAULT_PORT}"));
    }
    match split_port(s) {
        Some((_, port)) => {
            port.parse::<u16>().map(|_| s.to_string()).map_err(|_| format!("'{port}' is not a port number (0-65535)"))
        }
        None => Ok(format!("{s}:{DEFAULT_PORT}")),
    }
}

/// `HOST:PORT` split at the port's colon (`[ADDR]:PORT` for IPv6); `None` without a port.
fn split_port(s: &str) -> Option<(&str, &str)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        return after.strip_prefix(':').map(|p| (host, p));
    }
    if s.matches(':').count() == 1 {
        return s.split_once(':');
    }
    None
}

/// `--local HOST:PORT[=SERVICE]`: a port is required (a local forward has no natural default).
/// `SERVER_IP:PORT=HOST:PORT` of `--remote`.
pub(crate) fn parse_remote(s: &str) -> Result<(String, String), String> {
    let Some((bind, target)) = s.split_once('=') else {
        return Err(format!(
            "'{s}' has no '='; give SERVER_IP:PORT=HOST:PORT, for example 127.0.0.1:8080=127.0.0.1:3000"
        ));
    };
    if bind.trim().parse::<std::net::SocketAddr>().is_err() {
        return Err(format!("'{bind}' is not an IP:PORT on the server (for example 127.0.0.1:8080, or [::1]:8080)"));
    }
    match split_port(target.trim()) {
        Some((_, port)) if port.parse::<u16>().is_ok() => Ok((bind.trim().to_string(), target.trim().to_string())),
        _ => Err(format!("'{target}' is not HOST:PORT (for example 127.0.0.1:3000)")),
    }
}

/// One `--local` forward.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Local {
    /// `HOST:PORT[=SERVICE]`: to a service of the server, by name.
    Service { addr: String, service: Option<String> },
    /// `[BIND:]PORT:HOST:HOSTPORT`, as ssh -L: to HOST:HOSTPORT, connected by the server under
    /// its --allow-connect rules.
    Connect { addr: String, host: String, port: u16 },
}

/// What `--local` accepts, for its error messages.
const LOCAL_FORMS: &str = "HOST:PORT=SERVICE (a service of the server, e.g. 127.0.0.1:2222=ssh) or \
[BIND:]PORT:HOST:HOSTPORT as ssh -L (to HOST:HOSTPORT from the server, under its --allow-connect rules, e.g. 5433:db.internal:5432)";

/// The words of `s` split at colons outside `[...]`.
fn colon_words(s: &str) -> Vec<&str> {
    let (mut words, mut depth, mut start) = (Vec::new(), 0u32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth = depth.saturating_sub(1),
            ':' if depth == 0 => {
                words.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    words.push(&s[start..]);
    words
}

/// `--local`: `HOST:PORT[=SERVICE]`, or `[BIND:]PORT:HOST:HOSTPORT` (ssh -L's form, bound to
/// 127.0.0.1 unless BIND is given). A port is required (a local forward has no natural default).
pub(crate) fn parse_local(s: &str) -> Result<Local, String> {
    let port = |p: &str| {
        p.trim().parse::<u16>().map_err(|_| format!("'{p}' is not a port number (0-65535); give {LOCAL_FORMS}"))
    };
    let (addr, service) = match s.split_once('=') {
        Some((a, svc)) => (a.trim(), Some(svc.trim().to_string())),
        None => (s.trim(), None),
    };
    let words = colon_words(addr);
    if service.is_none() && (words.len() == 3 || words.len() == 4) {
        let (bind, rest) = if words.len() == 4 { (words[0].trim(), &words[1..]) } else { ("127.0.0.1", &words[..]) };
        let local_port = port(rest[0])?;
        let host = rest[1].trim().trim_start_matches('[').trim_end_matches(']');
        holdfast::tunnel::check_host(host).map_err(|e| format!("{e}; give {LOCAL_FORMS}"))?;
        let bind = if bind.contains(':') && !bind.starts_with('[') { format!("[{bind}]") } else { bind.to_string() };
        return Ok(Local::Connect {
            addr: format!("{bind}:{local_port}"),
            host: host.to_string(),
            port: port(rest[2])?,
        });
    }
    if let Some(svc) = &service {
        holdfast::tunnel::check_name(svc).map_err(|e| format!("{e}; give {LOCAL_FORMS}"))?;
    }
    if addr.parse::<u16>().is_ok() {
        return Err(format!("'{addr}' is a port alone; give {LOCAL_FORMS}"));
    }
    match split_port(addr) {
        Some((_, p)) => port(p).map(|_| Local::Service { addr: addr.to_string(), service }),
        None => Err(format!("'{addr}' has no port; give {LOCAL_FORMS}")),
    }
}

/// `--socks`: `HOST:PORT`, or a port alone (on 127.0.0.1, as ssh -D).
pub(crate) fn parse_socks(s: &str) -> Result<String, String> {
    let s = s.trim();
    let forms = "give HOST:PORT (e.g. 127.0.0.1:1080) or a port alone (on 127.0.0.1, as ssh -D 1080)";
    if let Ok(p) = s.parse::<u16>() {
        return Ok(format!("127.0.0.1:{p}"));
    }
    match split_port(s) {
        Some((_, p)) if p.parse::<u16>().is_ok() => Ok(s.to_string()),
        Some((_, p)) => Err(format!("'{p}' is not a port number (0-65535); {forms}")),
        None => Err(format!("'{s}' has no port; {forms}")),
    }
}

/// An address (a /32 or /128 block) or a CIDR block.
pub(crate) fn parse_net(s: &str) -> Result<ipnet::IpNet, String> {
    let s = s.trim();
    if let Ok(ip) = s.parse::<std::net::IpAddr>() {
        return Ok(ip.into());
    }
    s.parse().map_err(|_| format!("'{s}' is neither an IP address nor a CIDR block like 10.0.0.0/24"))
}

pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
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

#[cfg(test)]
mod local_tests {
    use super::*;

    #[test]
    fn local_takes_ssh_syntax_and_errors_name_the_forms() {
        let service = Local::Service { addr: "127.0.0.1:2222".into(), service: Some("ssh".into()) };
        assert_eq!(parse_local("127.0.0.1:2222=ssh").unwrap(), service);
        let connect = |addr: &str, host: &str, port| Local::Connect { addr: addr.into(), host: host.into(), port };
        assert_eq!(parse_local("17434:127.0.0.1:15432").unwrap(), connect("127.0.0.1:17434", "127.0.0.1", 15432));
        assert_eq!(parse_local("0.0.0.0:80:web.internal:8080").unwrap(), connect("0.0.0.0:80", "web.internal", 8080));
        assert_eq!(parse_local("[::1]:80:[fd00::1]:8080").unwrap(), connect("[::1]:80", "fd00::1", 8080));
        for bad in ["8082", "127.0.0.1", "127.0.0.1:x", "1:host:x", "x:host:22", "127.0.0.1:1=bad name"] {
            let err = parse_local(bad).unwrap_err();
            assert!(err.contains("HOST:PORT=SERVICE") && err.contains("[BIND:]PORT:HOST:HOSTPORT"), "{bad}: {err}");
        }
        assert_eq!(parse_socks("1080").unwrap(), "127.0.0.1:1080");
        assert_eq!(parse_socks("[::1]:1080").unwrap(), "[::1]:1080");
        for bad in ["localhost", "127.0.0.1:x"] {
            let err = parse_socks(bad).unwrap_err();
            assert!(err.contains("HOST:PORT") && err.contains("a port alone"), "{bad}: {err}");
        }
    }
}
