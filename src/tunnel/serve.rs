//! The server side of tunnels: each accepted stream names a service, and the server connects it
//! to that service's target.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::info;

use super::session::serve_session;
use super::Services;
use crate::net::{self, Listener};

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
