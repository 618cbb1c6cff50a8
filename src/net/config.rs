//! Configuration of clients and servers: keys, the recovery policy and the server's limits.
//! Every default is documented on its field and in `docs/PROTOCOL.md`.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::keys::{AllowList, Keypair, PublicKey};
use crate::net::events::LinkLost;
use crate::proto::{Cipher, SessionConfig};

/// What a recovery hook answers when the real connection fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// Reconnect and resume the stream.
    Recover,
    /// Give up: the stream ends with an error.
    Fail,
}

/// An async hook asked on each fault whether to recover (the "ask the user" of the patent).
pub type RecoveryHook = Arc<dyn Fn(LinkLost) -> Pin<Box<dyn Future<Output = Recovery> + Send>> + Send + Sync>;

/// How a client reacts when its real connection fails.
#[derive(Clone)]
pub struct RecoveryPolicy {
    /// First reconnect delay. Default 100 ms.
    pub backoff_initial: Duration,
    /// Largest reconnect delay; the delay doubles up to this. Default 2 s.
    pub backoff_max: Duration,
    /// Random fraction (0.0 to 1.0) taken off each delay so that many clients spread out.
    /// Default 0.5.
    pub jitter: f64,
    /// Stop trying after this long without a link; the stream then fails with
    /// [`std::io::ErrorKind::TimedOut`]. Default 1 hour.
    pub give_up_after: Duration,
    /// Longest time one connection attempt (TCP connect plus handshake) may take. Default 10 s.
    pub handshake_timeout: Duration,
    /// While reconnecting, a new attempt starts this often (with 20% jitter), whether earlier
    /// ones are still pending or failed, so that the first SYN after the network is back gets
    /// through rather than waiting on the kernel's SYN retransmissions. BUSY answers, and after
    /// 5 s refused connections, silent closes and unexpected REJECT codes, delay the next
    /// attempt by at least the backoff, from `backoff_initial` doubling to `backoff_max`. Default 250 ms (RFC 8305's
    /// connection attempt delay). A long race spaces its attempts further: a hundredth of its
    /// length when that is more, up to 5 s.
    pub stagger: Duration,
    /// Open a second connection and resume on it when the link is suspect (silent for much
    /// longer than its round trip while data awaits an answer), keeping the old one until the
    /// new one wins. Not done while a `hook` is set (recovery then waits for a fault and asks).
    /// Default true.
    pub race: bool,
    /// Asked on each fault; `None` recovers silently. Default `None`.
    pub hook: Option<RecoveryHook>,
    /// How long a first connection ([`crate::connect`]) keeps trying while the server answers
    /// BUSY (it is at a limit: a storm of resumes, its session cap), backing off with jitter
    /// as a reconnect does, before it fails with [`crate::Error::Busy`]. Default 10 s; zero
    /// fails at the first BUSY.
    pub busy_wait: Duration,
    /// With `Some`, reconnecting ends once every attempt for this long was refused (a TCP
    /// reset: nothing listens), with [`crate::proto::SessionError::ServerGone`]: for a server
    /// that serves one session and never comes back once it has ended (`holdfast ssh`'s).
    /// `None`, the default: refusals back off and go on until `give_up_after` (a server
    /// restarting, or a middlebox resetting for a while).
    pub refused_ends_after: Option<Duration>,
}

impl Default for RecoveryPolicy {
    fn default() -> Self {
        RecoveryPolicy {
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(2),
            jitter: 0.5,
            give_up_after: Duration::from_secs(3600),
            refused_ends_after: None,
            handshake_timeout: Duration::from_secs(10),
            stagger: Duration::from_millis(250),
            race: true,
            hook: None,
            busy_wait: Duration::from_secs(10),
        }
    }
}

impl fmt::Debug for RecoveryPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecoveryPolicy")
            .field("backoff_initial", &self.backoff_initial)
            .field("backoff_max", &self.backoff_max)
            .field("jitter", &self.jitter)
            .field("give_up_after", &self.give_up_after)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("stagger", &self.stagger)
            .field("race", &self.race)
            .field("busy_wait", &self.busy_wait)
            .field("hook", &self.hook.is_some())
            .finish()
    }
}

impl RecoveryPolicy {
    /// Sets the hook asked on every fault.
    pub fn with_hook<F, Fut>(mut self, hook: F) -> Self
    where
        F: Fn(LinkLost) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Recovery> + Send + 'static,
    {
        self.hook = Some(Arc::new(move |lost| Box::pin(hook(lost))));
        self
    }

    /// The delay before reconnect attempt `attempt` (0-based), before jitter.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX);
        self.backoff_initial.saturating_mul(factor).min(self.backoff_max)
    }
}

/// Configuration of a client.
#[derive(Clone)]
pub struct ClientConfig {
    /// The client's own key pair.
    pub keypair: Arc<Keypair>,
    /// The server's static public key, pinned.
    pub server_key: PublicKey,
    /// Recovery policy.
    pub recovery: RecoveryPolicy,
    /// Buffers and timers of the stream.
    pub session: SessionConfig,
    /// The AEAD of every connection (the client chooses; the server accepts either). Default
    /// [`Cipher::preferred`]: AES-256-GCM where the CPU has AES instructions, ChaCha20-Poly1305
    /// otherwise.
    pub cipher: Cipher,
}

impl fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientConfig")
            .field("public_key", &self.keypair.public)
            .field("server_key", &self.server_key)
            .field("recovery", &self.recovery)
            .field("session", &self.session)
            .field("cipher", &self.cipher)
            .finish()
    }
}

impl ClientConfig {
    /// A configuration with default policy and timers.
    pub fn new(keypair: Keypair, server_key: PublicKey) -> Self {
        ClientConfig {
            keypair: Arc::new(keypair),
            server_key,
            recovery: RecoveryPolicy::default(),
            session: SessionConfig::default(),
            cipher: Cipher::preferred(),
        }
    }
}

/// Limits a server enforces. Defaults are generous for real use and small enough that a scanner
/// or a flood cannot exhaust memory, file descriptors or CPU. `SECURITY.md` gives the reason for
/// each default.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Connections still in their handshake at once. When a new connection arrives at the cap,
    /// the *oldest* handshake that can be evicted is closed to make room: a real handshake takes
    /// one round trip, so slow or silent connections are the ones that get evicted, and a flood
    /// of them cannot lock real clients out. A handshake can be evicted until the server replies,
    /// and a resume again after its reply until its key confirmation arrives (so resumes that
    /// are never confirmed cannot hold the slots). Default 2048 (two file descriptors and a few KiB
    /// each: [`Limits::handshake_descriptors`]; `holdfast server` lowers it to fit a
    /// descriptor limit it cannot raise).
    pub max_handshakes: usize,
    /// At the `max_handshakes` cap, the oldest handshake is closed only if it has run this long
    /// (a real one takes a round trip); if every handshake in progress is younger, as in a storm
    /// of resumes after an outage, the new connection is told BUSY instead and retries after its
    /// backoff, so the handshakes under way can finish. Default 250 ms: to keep every slot
    /// young, a flood must open `max_handshakes` connections every 250 ms (8192/s), from 410
    /// sources or more at the default per-source rate.
    pub slow_handshake: Duration,
    /// New handshakes per second from one source (with a burst of the same size). IPv6 sources
    /// are counted per /64, because one host usually owns a whole /64. Default 20: a real client
    /// opens one connection per fault; 20 leaves room for a NAT with several clients.
    pub handshakes_per_sec_per_ip: u32,
    /// Sessions (attached, detached, or finishing their handshake) at once. Default 16384. Each
    /// takes a file descriptor for its link and one for each service connection it carries
    /// (a multiplexed session one per open stream, up to 128) and, idle, a few tens
    /// of KiB of memory outside `buffer_budget` (`BENCHMARKS.md` measures it).
    pub max_sessions: usize,
    /// Sessions per client key, so one allowed client cannot take every slot. Default 64.
    pub max_sessions_per_key: usize,
    /// Memory budget for all sessions' buffers together: the bytes in their replay buffers
    /// (written, not yet acknowledged) and receive buffers (received, not yet read). Sessions
    /// are charged what they hold, as it changes, not their worst case: an idle session holds
    /// nothing. When the budget is spent, writers wait and sessions stop reading their sockets
    /// (TCP holds their peers back) until room comes back; the budget is never exceeded and no
    /// session is refused for it. Default 1 GiB.
    pub buffer_budget: usize,
    /// The share of `buffer_budget` that the sessions of one client key may hold together, so
    /// that no key can starve the others: at its share, that key's sessions wait, others go on.
    /// Default 256 MiB, a quarter of the default budget.
    pub buffer_per_key: usize,
    /// Handshakes of one client key past their authenticated hello, at once: first connections
    /// until their handshake ends, and resumes until their key confirmation decrypts. More are
    /// refused with `Busy`. A real client has one at a time per connection it opens. Default 64
    /// (a browser through a forward opens dozens at once). Besides, a session has at most two
    /// unconfirmed resumes: a newer one replaces the older once that one has waited 1 s, or is
    /// refused with `Busy` (`docs/PROTOCOL.md` section 9.1, step 3.9).
    pub max_unconfirmed_per_key: usize,
    /// Resumes per second for one session, on average: a token bucket with a burst of `n`,
    /// refilled at `n` per second. A resume finding the bucket empty is refused with `Busy`, and
    /// the client retries after its backoff. A token is spent by every resume hello that
    /// authenticates, whether or not it is then confirmed. Each resume costs the
    /// server four X25519 operations, a ticket rotation and a replay of up to `max_buffer`
    /// bytes, so a malicious allowed client must not loop on it.
    /// Default 10: a link that faults more often than that, for long, is not usable anyway, and
    /// the burst lets a few faults in quick succession resume without delay.
    pub resumes_per_sec_per_session: u32,
    /// How long a detached session waits for its client to resume. Default 1 hour.
    pub session_expiry: Duration,
    /// Streams the client may hold open on one session at once: its open credit never runs
    /// past it, so a burst of opens waits at the client instead of failing. Default 1024.
    pub max_streams_per_session: u64,
    /// Streams the sessions of one client key hold together (each may hold a file descriptor:
    /// its service or forwarded connection). An open past it is reset (RESET LIMIT). Default
    /// 4096.
    pub max_streams_per_key: usize,
    /// Streams on the whole server. The server raises its file-descriptor limit to hold
    /// `max_sessions + max_streams` and a reserve for `accept` (`holdfast server` lowers this
    /// if it cannot). Default 16384.
    pub max_streams: usize,
    /// Whole-handshake deadline for a new connection, from accept to key confirmation: slow,
    /// silent or trickling connections are closed when it passes. Default 10 s.
    pub handshake_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_handshakes: 2048,
            slow_handshake: Duration::from_millis(250),
            handshakes_per_sec_per_ip: 20,
            max_sessions: 16384,
            max_sessions_per_key: 64,
            buffer_budget: 1 << 30,
            buffer_per_key: 256 << 20,
            max_unconfirmed_per_key: 64,
            resumes_per_sec_per_session: 10,
            session_expiry: Duration::from_secs(3600),
            max_streams_per_session: 1024,
            max_streams_per_key: 4096,
            max_streams: 16384,
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

impl Limits {
    /// Connections answered BUSY at once (the handshake cap reached, or a source over its
    /// rate): a quarter of `max_handshakes`, at least 16. Past it, the answer is written only
    /// if the socket takes it at once, and the connection is closed.
    pub fn max_busy_answers(&self) -> usize {
        (self.max_handshakes / 4).max(16)
    }

    /// File descriptors the server may hold for connections that have not authenticated: two
    /// for each handshake (its connection, and a copy kept to answer BUSY on if it is evicted)
    /// and one for each connection being answered BUSY ([`Limits::max_busy_answers`]).
    pub fn handshake_descriptors(&self) -> u64 {
        2 * self.max_handshakes.max(1) as u64 + self.max_busy_answers() as u64
    }
}

/// Configuration of a server.
#[derive(Clone)]
pub struct ServerConfig {
    /// The server's own key pair.
    pub keypair: Arc<Keypair>,
    /// Client keys allowed to connect.
    pub allow: Arc<AllowList>,
    /// Resource limits.
    pub limits: Limits,
    /// Buffers and timers of each stream.
    pub session: SessionConfig,
    /// This server's id in a fleet: put in the first two bytes (big-endian) of every resume id
    /// it issues, so that a load balancer can send each resume to the server that holds its
    /// session (`docs/DEPLOY.md`). `None` (the default): resume ids are wholly random.
    pub server_id: Option<u16>,
    /// The load balancers: a connection from one of these addresses must begin with a PROXY
    /// protocol v2 header, and the client it names is the one the server's per-source limits
    /// and logs use. Connections from anywhere else are never read for a PROXY header.
    pub proxy_from: Vec<ipnet::IpNet>,
    /// Threads to run sessions on ([`crate::net::Lanes`]): each session, with the tasks that
    /// serve its streams, runs on one of them. `None` (the default): sessions run on the
    /// runtime that called [`crate::net::bind`].
    pub lanes: Option<crate::net::Lanes>,
}

impl fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerConfig")
            .field("public_key", &self.keypair.public)
            .field("allowed_clients", &self.allow.len())
            .field("limits", &self.limits)
            .field("session", &self.session)
            .field("server_id", &self.server_id)
            .field("proxy_from", &self.proxy_from)
            .field("lanes", &self.lanes)
            .finish()
    }
}

impl ServerConfig {
    /// A configuration with default limits and timers.
    pub fn new(keypair: Keypair, allow: AllowList) -> Self {
        ServerConfig {
            keypair: Arc::new(keypair),
            allow: Arc::new(allow),
            limits: Limits::default(),
            session: SessionConfig::default(),
            server_id: None,
            proxy_from: Vec::new(),
            lanes: None,
        }
    }
}
