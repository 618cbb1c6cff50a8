//! Port forwarding and stdio mode, built only on the public library API.
//!
//! A tunnel stream starts with a *service request*: the client names a service, and the server
//! alone decides where that name goes (nothing else is reachable through it). The bytes and the
//! rules are specified in Appendix A of `docs/PROTOCOL.md`:
//!
//! ```text
//! request:  name_len: u8 (1..=64) | name: [A-Za-z0-9._-]
//! reply:    status: u8 | msg_len: u8 | msg: UTF-8 (empty from this server)
//!           status 0 = connected, 1 = unknown service (or not given to this client's key),
//!           2 = unavailable (the server could not connect to it; the cause is in its log only),
//!           3 = refused (a connect request's destination refused the connection)
//! ```
//!
//! After a status-0 reply the stream carries the service's bytes both ways, with half-close:
//! EOF on one side becomes an authenticated FIN on the other. The port forwarder sends the
//! program's first bytes right behind the request instead of waiting a round trip for the reply;
//! the server reads them only after answering 0, and discards them otherwise. After a refusal
//! both ends half-close and read the other's stream to its end ([`finish`]), so the session
//! ends with a normal close, not an abort.

mod connect;
mod direct;
mod forward;
mod join;
mod limits;
mod link_time;
mod pool;
pub(crate) mod request;
mod reverse;
mod rights;
mod serve;
mod service_lookup;
mod session;
mod socks;
mod splice;
mod stdio;
mod target;

use std::collections::BTreeMap;
use std::io;
use std::time::Duration;

use thiserror::Error;

use crate::net;

pub use connect::{allowed_addrs, check_host, ConnectRule};
pub use connect::{allowed_of, plan, Plan};
pub use direct::forward_connect;
pub use forward::{forward, forward_via};
pub use limits::{ResolveFn, TunnelLimits};
pub use pool::{MuxPool, REVERSE_MAX};
pub use request::{finish, open, FINISH_TIMEOUT};
pub use reverse::remote;
pub use serve::{serve, serve_until, serve_until_cut};
pub use socks::socks;
pub use splice::{splice, splice_until};
pub use stdio::stdio;
pub use target::SERVICE_CONNECT_TIMEOUT;

pub use crate::names::MAX_SERVICE_NAME;
/// How long a server waits for a service request, and a client for its reply.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of the tunnel layer.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum TunnelError {
    /// Connecting or the session failed.
    #[error(transparent)]
    Net(#[from] net::Error),
    /// The server has no service of that name.
    #[error("the server has no service named '{0}' for this key (none by that name, or this key may not use it)")]
    UnknownService(String),
    /// The server could not connect to the service (status 2). Why is in the server's log.
    #[error(
        "service '{service}' is unavailable: the server could not connect to it (its log has the cause){}",
        if reason.is_empty() { String::new() } else { format!(": {reason}") }
    )]
    ServiceRefused {
        /// The service asked for.
        service: String,
        /// The server's message, control characters escaped: empty from this version's server.
        reason: String,
    },
    /// The destination of a connect request refused the connection (status 3).
    #[error("{service} refused the connection (the server reached it; nothing accepts connections there)")]
    DestinationRefused {
        /// The destination asked for, `host:port`.
        service: String,
    },
    /// The server answered with a status this version does not know; the tunnel is refused.
    #[error("the server refused service '{service}' with unknown status {status}")]
    UnknownStatus {
        /// The service asked for.
        service: String,
        /// The status byte.
        status: u8,
    },
    /// A service name was given twice.
    #[error("service '{name}' is given twice (first as {first}); give each name once")]
    DuplicateService {
        /// The name.
        name: String,
        /// The target it was first given.
        first: String,
    },
    /// The name is not a valid service name.
    #[error("invalid service name '{}': use 1-64 characters from A-Z a-z 0-9 . _ -", crate::human::printable(.0))]
    BadName(String),
    /// A malformed request or reply.
    #[error("malformed tunnel {0}")]
    Malformed(&'static str),
    /// A request or reply did not arrive in time.
    #[error("timed out waiting for the tunnel {0}")]
    Timeout(&'static str),
    /// An I/O error on a stream or socket.
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl TunnelError {
    /// True if the server answered the request with a refusal (status 1, 2 or unknown), as
    /// opposed to a failure of the connection or the session.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            TunnelError::UnknownService(_)
                | TunnelError::ServiceRefused { .. }
                | TunnelError::DestinationRefused { .. }
                | TunnelError::UnknownStatus { .. }
        )
    }
}

/// The status byte of the server's reply (Appendix A of `docs/PROTOCOL.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    /// 0: connected to the service; the stream now carries its bytes.
    Connected = 0,
    /// 1: no service of that name is offered to this client (none exists, or the client's key
    /// is not given it). The two are not told apart.
    UnknownService = 1,
    /// 2: the service exists but the server could not connect to it.
    Unavailable = 2,
    /// 3: a connect request's destination refused the connection (every address answered with
    /// a reset). Only for connect requests (dynamic forwarding): a named service that fails is 2.
    Refused = 3,
}

impl From<TunnelError> for io::Error {
    fn from(e: TunnelError) -> io::Error {
        match e {
            TunnelError::Io(e) => e,
            TunnelError::Net(e) => e.into(),
            TunnelError::UnknownService(_) => io::Error::new(io::ErrorKind::NotFound, e),
            TunnelError::ServiceRefused { .. }
            | TunnelError::DestinationRefused { .. }
            | TunnelError::UnknownStatus { .. } => io::Error::new(io::ErrorKind::ConnectionRefused, e),
            TunnelError::Timeout(_) => io::Error::new(io::ErrorKind::TimedOut, e),
            _ => io::Error::new(io::ErrorKind::InvalidData, e),
        }
    }
}

/// Checks a service name ([`crate::names::is_service_name`]).
///
/// # Errors
/// [`TunnelError::BadName`] if it is empty, too long, or has other characters.
pub fn check_name(name: &str) -> Result<(), TunnelError> {
    if crate::names::is_service_name(name) {
        Ok(())
    } else {
        Err(TunnelError::BadName(name.to_string()))
    }
}

/// The services a server offers (name to `host:port`), where dynamic forwarding may connect
/// and reverse forwarding listen ([`ConnectRule`]s; none by default), and the bounds on what
/// those hold ([`TunnelLimits`]). Clones share the bounds' counts.
#[derive(Debug, Clone, Default)]
pub struct Services {
    map: BTreeMap<String, String>,
    connect: Vec<ConnectRule>,
    listen: Vec<ConnectRule>,
    bounds: std::sync::Arc<limits::Bounds>,
}

impl Services {
    /// No services.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a service.
    ///
    /// # Errors
    /// [`TunnelError::BadName`] for an invalid name, [`TunnelError::DuplicateService`] for a
    /// name already given (a second `--service web=…` would otherwise silently replace the
    /// first).
    pub fn add(&mut self, name: &str, target: &str) -> Result<(), TunnelError> {
        check_name(name)?;
        if let Some(first) = self.map.get(name) {
            return Err(TunnelError::DuplicateService { name: name.to_string(), first: first.clone() });
        }
        self.map.insert(name.to_string(), target.to_string());
        Ok(())
    }

    /// The services, by name: (name, target).
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.map.iter().map(|(n, t)| (n.as_str(), t.as_str()))
    }

    /// Parses `NAME=HOST:PORT`.
    ///
    /// # Errors
    /// [`TunnelError::BadName`] or [`TunnelError::Malformed`].
    pub fn add_spec(&mut self, spec: &str) -> Result<(), TunnelError> {
        let (name, target) =
            spec.split_once('=').ok_or(TunnelError::Malformed("service spec (want NAME=HOST:PORT)"))?;
        if !target.contains(':') {
            return Err(TunnelError::Malformed("service target (want HOST:PORT)"));
        }
        self.add(name, target)
    }

    /// Lets clients connect where `rule` says (SOCKS5 CONNECT through `holdfast client --socks`).
    pub fn allow_connect(&mut self, rule: ConnectRule) {
        self.connect.push(rule);
    }

    /// Lets clients ask the server to listen where `rule` says (reverse forwarding, `holdfast
    /// client --remote`); only address and CIDR rules can match a listen address.
    pub fn allow_listen(&mut self, rule: ConnectRule) {
        self.listen.push(rule);
    }

    /// The `--allow-listen` rules, in the order given.
    pub fn listen_rules(&self) -> &[ConnectRule] {
        &self.listen
    }

    /// The `--allow-connect` rules, in the order given.
    pub fn connect_rules(&self) -> &[ConnectRule] {
        &self.connect
    }

    /// Puts `limits` in force (for servers started with these services from then on).
    pub fn set_limits(&mut self, limits: TunnelLimits) {
        self.bounds = std::sync::Arc::new(limits::Bounds::new(limits, self.bounds.resolver()));
    }

    /// The bounds in force.
    pub fn limits(&self) -> &TunnelLimits {
        &self.bounds.limits
    }

    /// Resolves connect requests' names with `resolver` instead of the system's (getaddrinfo);
    /// it runs on a thread of its own, within the [`TunnelLimits`] look-up bounds. For tests,
    /// or a server with a resolver of its own.
    pub fn set_resolver(&mut self, resolver: std::sync::Arc<ResolveFn>) {
        self.bounds = std::sync::Arc::new(limits::Bounds::new(self.bounds.limits.clone(), resolver));
    }

    /// Connections to reverse forwards' listeners that the server holds now, the most it ever
    /// held at once, and the reverse forwards' listeners open now.
    pub fn reverse_counts(&self) -> (usize, usize, usize) {
        self.bounds.reverse_counts()
    }

    fn bounds(&self) -> &std::sync::Arc<limits::Bounds> {
        &self.bounds
    }

    /// The target of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.map.get(name).map(String::as_str)
    }

    /// Number of services.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}
