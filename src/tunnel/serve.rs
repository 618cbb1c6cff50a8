//! The server side of tunnels: each accepted stream names a service, and the server connects it
//! to that service's target.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::watch;
use tracing::{info, warn};

use super::mux::serve_session;
use super::{Services, Status};
use crate::net::{self, AllowListHandle, Listener, Peer};

/// How long the server tries to connect to a service's target before it answers status 2. It
/// is shorter than [`REQUEST_TIMEOUT`], so that the client hears the answer before it gives up.
pub const SERVICE_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Server side: accepts streams forever and connects each to the service it names. A client
/// whose allow-list entry names services (`services=`, see [`crate::keys`]) reaches only those;
/// a request for another one is answered like an unknown service (status 1), so it does not
/// learn that it exists. The allow-list in force when the request is read decides.
///
/// # Errors
/// Returns only if the listener stops.
pub async fn serve(listener: Listener, services: Arc<Services>) -> Result<(), net::Error> {
    serve_until(listener, services, std::future::pending(), Duration::ZERO).await.map(|_| ())
}

/// Like [`serve`], until `stop` resolves. Then it stops accepting (the listener is dropped), and
/// ends every open tunnel cleanly: the service's side is read no more, the client gets a FIN
/// after every byte already read from the service, and the tunnel is over when the client has
/// ended its side too. It waits for that at most `drain`; returns the number of tunnels still
/// open then (they end when the process exits).
///
/// # Errors
/// Returns early only if the listener stops.
pub async fn serve_until(
    mut listener: Listener,
    services: Arc<Services>,
    stop: impl std::future::Future<Output = ()>,
    drain: Duration,
) -> Result<usize, net::Error> {
    let allow = listener.allow_list_handle();
    let (stopping, stopped) = watch::channel(false);
    let mut open = tokio::task::JoinSet::new();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            r = listener.accept_session() => {
                let (session, peer) = r?;
                let span = peer.session().span();
                let one = serve_session(session, peer, services.clone(), allow.clone(), stopped.clone());
                open.spawn(tracing::Instrument::instrument(one, span));
            }
            Some(_) = open.join_next(), if !open.is_empty() => {}
            () = &mut stop => break,
        }
    }
    drop(listener);
    let _ = stopping.send(true);
    let n = open.len();
    if n > 0 {
        info!(tunnels = n, drain = %crate::human::Rounded(drain), "shutting down: ending every tunnel cleanly");
    }
    let _ = tokio::time::timeout(drain, async { while open.join_next().await.is_some() {} }).await;
    Ok(open.len())
}

/// The stream's end goes out with its session's last records: waits for them (bounded), so
/// that a stopping server does not exit before its clients heard the close.
pub(super) async fn session_end(mut status: watch::Receiver<net::LinkStatus>) {
    let ended = |s: &net::LinkStatus| matches!(s, net::LinkStatus::Closed | net::LinkStatus::Failed(_));
    let _ = tokio::time::timeout(Duration::from_secs(3), status.wait_for(ended)).await;
}

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
pub(super) async fn connect_service(who: &str, name: &str, target: &str) -> Option<TcpStream> {
    connect_target(who, name, target).await.ok()
}

/// [`connect_service`], with why it failed: `Some(kind)` of the connect error, `None` for no
/// answer within the timeout.
pub(super) async fn connect_target(
    who: &str,
    name: &str,
    target: &str,
) -> Result<TcpStream, Option<std::io::ErrorKind>> {
    match tokio::time::timeout(SERVICE_CONNECT_TIMEOUT, TcpStream::connect(target)).await {
        Ok(Ok(t)) => {
            let _ = t.set_nodelay(true);
            Ok(t)
        }
        failed => {
            let (error, kind) = match failed {
                Ok(Err(e)) => (e.to_string(), Some(e.kind())),
                _ => (format!("no connection within {}", crate::human::Rounded(SERVICE_CONNECT_TIMEOUT)), None),
            };
            warn!(client = %who, service = %name, %target, %error, "cannot connect to the service");
            Err(kind)
        }
    }
}
