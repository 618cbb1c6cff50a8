//! Where a tunnel leads on the server: a named service's target, or a dynamic forward's
//! destination, connected within a bound.

use crate::net::quiet::{quiet, LogBudget};
use std::time::Duration;

use tokio::net::TcpStream;

use super::limits::Bounds;
use super::{Services, Status};
use crate::net::{AllowListHandle, Peer};

/// How long the server tries to connect to a service's target before it answers status 2. It
/// is shorter than [`REQUEST_TIMEOUT`], so that the client hears the answer before it gives up.
pub const SERVICE_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The target of the service `name` for `peer`, or the refusal: an unknown service, or one this
/// client is not given (answered alike, so that it does not learn that the service exists).
pub(super) fn resolve<'a>(
    name: &str,
    peer: &Peer,
    services: &'a Services,
    allow: &AllowListHandle,
) -> Result<&'a str, (Status, &'static str)> {
    let target = services.get(name).ok_or((Status::UnknownService, "unknown service"))?;
    match allow.get().lookup(&peer.key).map(|entry| entry.allows(name)) {
        Some(true) => Ok(target),
        Some(false) => Err((Status::UnknownService, "not given to this client")),
        None => Err((Status::UnknownService, "the client is no longer on the allow-list")),
    }
}

/// Connects to a service's target (bounded); the cause of a failure is logged here, and the
/// client only learns that the service is unavailable.
pub(super) async fn connect_service(who: &str, name: &str, target: &str, log: &LogBudget) -> Option<TcpStream> {
    connect_target(who, name, target, log).await.ok()
}

/// Connects to a service's target for a client's stream, on the server: like
/// [`connect_service`], but a target given by name is looked up through `bounds` (one look-up
/// at a time per target, its answer reused a while: [`super::service_lookup`]), never once per
/// stream. Bounded by [`SERVICE_CONNECT_TIMEOUT`] in all.
pub(super) async fn connect_offered(
    bounds: &Bounds,
    who: &str,
    name: &str,
    target: &str,
    log: &LogBudget,
) -> Option<TcpStream> {
    let by_name = match target.parse::<std::net::SocketAddr>() {
        Ok(_) => None,
        Err(_) => target.rsplit_once(':').and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?))),
    };
    let Some((host, port)) = by_name else { return connect_service(who, name, target, log).await };
    let work = async {
        let addrs = bounds.service_addrs(host, port).await?;
        let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, format!("{target} has no address"));
        for addr in addrs.iter() {
            match crate::net::kernel::connect(*addr).await {
                Ok(t) => return Ok(t),
                Err(e) => last = std::io::Error::new(e.kind(), format!("{addr}: {e}")),
            }
        }
        Err(last)
    };
    bounded((who, name, target, log), work).await.ok()
}

/// [`connect_service`], with why it failed: `Some(kind)` of the connect error, `None` for no
/// answer within the timeout.
pub(super) async fn connect_target(
    who: &str,
    name: &str,
    target: &str,
    log: &LogBudget,
) -> Result<TcpStream, Option<std::io::ErrorKind>> {
    let connect = async {
        match target.parse::<std::net::SocketAddr>() {
            Ok(addr) => crate::net::kernel::connect(addr).await,
            Err(_) => TcpStream::connect(target).await,
        }
    };
    bounded((who, name, target, log), connect).await
}

/// Runs `connect` within [`SERVICE_CONNECT_TIMEOUT`]; the connection gets the tunnel's socket
/// bounds, and a failure is logged for the service `name` of client `who`.
async fn bounded(
    (who, name, target, log): (&str, &str, &str, &LogBudget),
    connect: impl std::future::Future<Output = std::io::Result<TcpStream>>,
) -> Result<TcpStream, Option<std::io::ErrorKind>> {
    match tokio::time::timeout(SERVICE_CONNECT_TIMEOUT, connect).await {
        Ok(Ok(t)) => {
            crate::net::kernel::bound_tunnel(&t);
            Ok(t)
        }
        failed => {
            let (error, kind) = match failed {
                Ok(Err(e)) => (e.to_string(), Some(e.kind())),
                _ => (format!("no connection within {}", crate::human::Rounded(SERVICE_CONNECT_TIMEOUT)), None),
            };
            quiet!(log, warn!(client = %who, service = %name, %target, %error, "cannot connect to the service"));
            Err(kind)
        }
    }
}
