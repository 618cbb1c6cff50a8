//! The tokio driver: the client connector with its reconnect loop, the server listener with
//! its session table and limits, and the public [`Stream`].

pub mod backoff;
pub(crate) mod budget;
pub mod client;
pub mod config;
#[cfg(unix)]
pub mod control;
pub mod events;
pub(crate) mod kernel;
pub mod lanes;
mod pump;
pub(crate) mod quiet;
mod race;
pub mod server;
pub(crate) mod short_read;
pub mod stream;
pub mod watch;
mod wire;

use std::io;
use std::time::Duration;

use thiserror::Error;

use crate::keys::KeyError;
use crate::proto::{HandshakeError, SessionError};

pub use crate::human::Rounded;
pub use backoff::AcceptBackoff;
pub use client::{connect, connect_session};
pub use config::{ClientConfig, Limits, Recovery, RecoveryHook, RecoveryPolicy, ServerConfig};
pub use events::{LinkEvent, LinkLost, LinkStatus};
pub use lanes::Lanes;
pub use server::{
    bind, bind_with_handover, client_label, prepare_handover, AllowListHandle, CapReached, ForwardGuard, Listener,
    Peer, Refusals, Retirement, ServerStats, SessionStatus, SessionTag, StatsHandle, StreamGuard, Upgrade,
};
pub(crate) use stream::is_finished;
pub use stream::{ReadHalf, Session, Stream, WriteHalf};

/// Errors of the driver layer: everything a connect, bind or accept can fail with.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Error {
    /// The server could not be reached.
    #[error("cannot reach server {addr}: {source}")]
    Connect {
        /// The address dialled.
        addr: String,
        /// The socket error.
        source: io::Error,
    },
    /// The server closed the connection during the handshake without answering. holdfast
    /// servers do this, on purpose, when they cannot authenticate the client.
    #[error(
        "server {addr} dropped the handshake: either the pinned server key (--server-key) is not this server's, or this client's key is not on its allow-list. The server logs every refused client key (each at most once a minute): if its log has no refusal of this client's key, the pinned server key is the wrong one"
    )]
    HandshakeRefused {
        /// The address dialled.
        addr: String,
    },
    /// The server reset the connection before answering the hello. A holdfast server never
    /// does that to refuse a client (it closes cleanly); a server process that stops listening
    /// resets the connections it had not taken yet.
    #[error(
        "server {addr} reset the connection before answering: it had not taken the connection when it stopped listening (it is stopping or restarting), or something on the path reset it. Try again shortly; if every attempt is reset, check that the server runs and that nothing between resets connections"
    )]
    HandshakeReset {
        /// The address dialled.
        addr: String,
    },
    /// The server answered BUSY: it is at a limit (new connections from this address per
    /// second, sessions in all or for this client key, or its memory budget). Try again shortly.
    #[error(
        "server {addr} is busy: it is at a limit (new connections per second from this address, or sessions); try again shortly"
    )]
    Busy {
        /// The address dialled.
        addr: String,
    },
    /// The server refused a first connection, answering BUSY, because a session cap is
    /// reached (the client tries again after its backoff).
    #[error("refused a new session of client {client} from {addr}: {cap}; answered BUSY (the client retries)")]
    SessionCap {
        /// The client's address.
        addr: String,
        /// The client, as logs name it (its allow-list name, or its key).
        client: String,
        /// Which cap.
        cap: server::CapReached,
    },
    /// The handshake failed.
    #[error("handshake with {addr} failed: {source}")]
    Handshake {
        /// The peer address.
        addr: String,
        /// What went wrong.
        source: HandshakeError,
    },
    /// A connection from a load balancer (`ServerConfig::proxy_from`) did not begin with a
    /// usable PROXY v2 header.
    #[error("connection from load balancer {addr}: {source}")]
    ProxyHeader {
        /// The load balancer's address.
        addr: String,
        /// What was wrong with the header.
        source: server::proxy::ProxyHeaderError,
    },
    /// Taking over from a running server (or offering the same to the next one) failed.
    #[error("server upgrade through {path}: {source}")]
    Handover {
        /// The handover socket's path.
        path: String,
        /// What went wrong.
        source: server::handover::HandoverError,
    },
    /// A connect and handshake together took too long.
    #[error("connecting to {addr} and its handshake took longer than {}", crate::human::Rounded(*after))]
    Timeout {
        /// The peer address.
        addr: String,
        /// The limit that passed.
        after: Duration,
    },
    /// The TCP connection attempt got no answer in time (no acceptance, no refusal): nothing
    /// was received from the peer.
    #[error(
        "{addr} did not answer the TCP connection attempt within {} (no acceptance, no refusal); check the \
         address, and that its port can be reached from here",
        crate::human::Rounded(*after)
    )]
    NoAnswer {
        /// The peer address.
        addr: String,
        /// The limit that passed.
        after: Duration,
    },
    /// The TCP connection was accepted, but no handshake reply came in time: what a port that
    /// is not a holdfast server's (or a server that cannot answer) does.
    #[error(
        "{addr} accepted the TCP connection but sent no handshake reply within {}; check that it is a \
         holdfast server's listening address",
        crate::human::Rounded(*after)
    )]
    NoReply {
        /// The peer address.
        addr: String,
        /// The limit that passed.
        after: Duration,
    },
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// The socket error.
        source: io::Error,
    },
    /// The session failed.
    #[error(transparent)]
    Session(#[from] SessionError),
    /// Loading keys failed.
    #[error(transparent)]
    Keys(#[from] KeyError),
    /// Another I/O error.
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        use io::ErrorKind as K;
        let kind = match &e {
            Error::Connect { source, .. } | Error::Bind { source, .. } => source.kind(),
            Error::HandshakeRefused { .. } => K::PermissionDenied,
            Error::HandshakeReset { .. } => K::ConnectionReset,
            Error::Busy { .. } | Error::SessionCap { .. } => K::ResourceBusy,
            Error::Handshake { source: HandshakeError::UnknownSession, .. } => K::NotConnected,
            Error::Handshake { source: HandshakeError::Busy, .. } => K::ResourceBusy,
            Error::Handshake { source: HandshakeError::NoLongerAllowed, .. } => K::PermissionDenied,
            Error::Handshake { .. } | Error::ProxyHeader { .. } => K::InvalidData,
            Error::Handover { .. } => K::Other,
            Error::Timeout { .. } | Error::NoReply { .. } | Error::NoAnswer { .. } => K::TimedOut,
            Error::Session(s) => return stream::to_io(s.clone()),
            Error::Keys(_) => K::InvalidInput,
            Error::Io(i) => i.kind(),
        };
        io::Error::new(kind, e)
    }
}
