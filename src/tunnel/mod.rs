//! Port forwarding and stdio mode, built only on the public library API.
//!
//! A tunnel stream starts with a *service request*: the client names a service, and the server
//! alone decides where that name goes (nothing else is reachable through it).
//!
//! ```text
//! request:  name_len: u8 (1..=64) | name: [A-Za-z0-9._-]
//! reply:    status: u8 | msg_len: u8 | msg: UTF-8
//!           status 0 = connected, 1 = unknown service, 2 = the service refused or failed
//! ```
//!
//! After a status-0 reply the stream carries the service's bytes both ways, with half-close:
//! EOF on one side becomes an authenticated FIN on the other. The port forwarder sends the
//! program's first bytes right behind the request instead of waiting a round trip for the reply;
//! the server reads them only after answering 0, and discards them with the stream otherwise.

mod forward;
mod request;
mod serve;
mod splice;
mod stdio;

use std::collections::BTreeMap;
use std::io;
use std::time::Duration;

use thiserror::Error;

use crate::net;

pub use forward::forward;
pub use request::open;
pub use serve::serve;
pub use splice::splice;
pub use stdio::stdio;

/// Longest service name.
pub const MAX_SERVICE_NAME: usize = 64;
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
    #[error("the server has no service named '{0}'")]
    UnknownService(String),
    /// The server could not reach the service.
    #[error("service '{service}' refused the connection: {reason}")]
    ServiceRefused {
        /// The service asked for.
        service: String,
        /// What the server reported.
        reason: String,
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

impl From<TunnelError> for io::Error {
    fn from(e: TunnelError) -> io::Error {
        match e {
            TunnelError::Io(e) => e,
            TunnelError::Net(e) => e.into(),
            TunnelError::UnknownService(_) => io::Error::new(io::ErrorKind::NotFound, e),
            TunnelError::ServiceRefused { .. } => io::Error::new(io::ErrorKind::ConnectionRefused, e),
            TunnelError::Timeout(_) => io::Error::new(io::ErrorKind::TimedOut, e),
            _ => io::Error::new(io::ErrorKind::InvalidData, e),
        }
    }
}

/// Checks a service name.
///
/// # Errors
/// [`TunnelError::BadName`] if it is empty, too long, or has other characters.
pub fn check_name(name: &str) -> Result<(), TunnelError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_SERVICE_NAME
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(TunnelError::BadName(name.to_string()))
    }
}

/// The services a server offers: name to `host:port`.
#[derive(Debug, Clone, Default)]
pub struct Services(BTreeMap<String, String>);

impl Services {
    /// No services.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a service.
    ///
    /// # Errors
    /// [`TunnelError::BadName`] for an invalid name.
    pub fn add(&mut self, name: &str, target: &str) -> Result<(), TunnelError> {
        check_name(name)?;
        self.0.insert(name.to_string(), target.to_string());
        Ok(())
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

    /// The target of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    /// Number of services.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}
