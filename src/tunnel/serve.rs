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

/// How long the sessions still open when the drain time is over get to be told CLOSE
/// (Shutdown) and to end: a session's driver waits up to 2 s after its CLOSE for the client to
/// close too (`net::pump`), then logs the session's last line.
const TELL_STOPPING: Duration = Duration::from_secs(3);

/// Like [`serve`], until `stop` resolves. Then it stops accepting (the listener is dropped)
/// and closes every session: no new stream is accepted, and the tunnels open run to their end
/// as they would have without the stop (a transfer in flight finishes). It waits for that at
/// most `drain`; returns the number of sessions still open then, which are ended at once: their
/// streams fail (each program sees a reset, never a clean end of a transfer cut short) and
/// their clients are told with CLOSE (Shutdown).
///
/// # Errors
/// Returns early only if the listener stops.
pub async fn serve_until(
    listener: Listener,
    services: Arc<Services>,
    stop: impl std::future::Future<Output = ()>,
    drain: Duration,
) -> Result<usize, net::Error> {
    serve_until_cut(listener, services, stop, drain, std::future::pending()).await
}

/// Like [`serve_until`], and when `cut` resolves during the drain, the drain ends there: the
/// sessions still open are ended at once, their clients told the server stopped (CLOSE
/// Shutdown), as at the end of the drain time (an operator's second stop signal).
///
/// # Errors
/// As [`serve_until`].
pub async fn serve_until_cut(
    mut listener: Listener,
    services: Arc<Services>,
    stop: impl std::future::Future<Output = ()>,
    drain: Duration,
    cut: impl std::future::Future<Output = ()>,
) -> Result<usize, net::Error> {
    let allow = listener.allow_list_handle();
    let retirement = listener.retirement();
    let (stopping, stopped) = watch::channel(false);
    let (drain_over, drained) = watch::channel(false);
    let mut open = tokio::task::JoinSet::new();
    // A handle on each session being served, to close them all at once when the server stops.
    let mut sessions = std::collections::HashMap::new();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            r = listener.accept_session() => {
                let (session, peer) = r?;
                let span = peer.session().span();
                let handle = session.clone();
                let one = serve_session(session, peer, services.clone(), allow.clone(), (stopped.clone(), drained.clone()));
                let one = tracing::Instrument::instrument(one, span);
                // On the session's lane, if it has one: its streams' tasks and the connections
                // they make then run on the thread that drives the session.
                let task = match handle.lane() {
                    Some(lane) => open.spawn_on(one, &lane),
                    None => open.spawn(one),
                };
                sessions.insert(task.id(), handle);
            }
            Some(done) = open.join_next_with_id(), if !open.is_empty() => {
                sessions.remove(&done.map_or_else(|e| e.id(), |(id, ())| id));
            }
            () = &mut stop => break,
        }
    }
    drop(listener);
    // Every session takes no new stream from now on (its task closes it too, once it sees the
    // stop): done here, so that nothing opened after the stop is logged is served.
    for session in sessions.values() {
        session.close();
    }
    drop(sessions);
    let _ = stopping.send(true);
    let n = open.len();
    if n > 0 {
        info!(sessions = n, drain = %crate::human::Rounded(drain), "shutting down: waiting for the open tunnels to end");
    }
    tokio::select! {
        _ = tokio::time::timeout(drain, async { while open.join_next().await.is_some() {} }) => {}
        () = cut => {}
    }
    // The sessions still open are told the server is stopping (CLOSE Shutdown), rather than
    // left to find their link gone and retry until their give-up time.
    let left = open.len();
    let _ = drain_over.send(true);
    let _ = tokio::time::timeout(TELL_STOPPING, async {
        while open.join_next().await.is_some() {}
        // Their drivers' last lines, too.
        retirement.sessions_ended().await;
    })
    .await;
    Ok(left)
}
