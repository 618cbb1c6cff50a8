//! The server side of tunnels: each accepted stream names a service, and the server connects it
//! to that service's target.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tracing::{info, warn};

use super::request::{finish, read_request, write_reply, REFUSAL_DRAIN};
use super::splice::splice;
use super::{Services, Status, REQUEST_TIMEOUT};
use crate::human::printable;
use crate::net::{self, AllowListHandle, Listener, Peer, Stream};

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
pub async fn serve(mut listener: Listener, services: Arc<Services>) -> Result<(), net::Error> {
    let allow = listener.allow_list_handle();
    loop {
        let (stream, peer) = listener.accept().await?;
        tokio::spawn(serve_one(stream, peer, services.clone(), allow.clone()));
    }
}

async fn serve_one(mut stream: Stream, peer: Peer, services: Arc<Services>, allow: AllowListHandle) {
    let who = peer.name.clone().unwrap_or_else(|| peer.key.to_string());
    // A malformed request, or none in time: no reply, and the stream is dropped (the session
    // is aborted). Nothing the client sent is logged unescaped.
    let name = match tokio::time::timeout(REQUEST_TIMEOUT, read_request(&mut stream)).await {
        Ok(Ok(n)) => n,
        Ok(Err(e)) => return warn!(client = %who, error = %printable(&e.to_string()), "bad service request"),
        Err(_) => return warn!(client = %who, "no service request in time"),
    };
    let Some(target) = services.get(&name) else {
        return refuse(stream, Status::UnknownService, &who, &name, "unknown service").await;
    };
    let given = allow.get().lookup(&peer.key).map(|entry| entry.allows(&name));
    if given != Some(true) {
        let why =
            if given.is_none() { "the client is no longer on the allow-list" } else { "not given to this client" };
        return refuse(stream, Status::UnknownService, &who, &name, why).await;
    }
    let tcp = match tokio::time::timeout(SERVICE_CONNECT_TIMEOUT, TcpStream::connect(target)).await {
        Ok(Ok(t)) => t,
        failed => {
            // The cause stays here: the client only learns that the service is unavailable.
            let error = match failed {
                Ok(Err(e)) => e.to_string(),
                _ => format!("no connection within {}", crate::human::Rounded(SERVICE_CONNECT_TIMEOUT)),
            };
            warn!(client = %who, service = %name, %target, %error, "cannot connect to the service");
            return refuse(stream, Status::Unavailable, &who, &name, "service unavailable").await;
        }
    };
    let _ = tcp.set_nodelay(true);
    if write_reply(&mut stream, Status::Connected, "").await.is_err() {
        return;
    }
    info!(client = %who, service = %name, %target, "tunnel open");
    match splice(tcp, stream).await {
        Ok((to_client, to_service)) => info!(client = %who, service = %name, to_service, to_client, "tunnel closed"),
        Err(e) => warn!(client = %who, service = %name, error = %printable(&e.to_string()), "tunnel failed"),
    }
}

/// Answers a refusal, then ends the stream cleanly: half-closes it and discards what the
/// client sent behind its request until the client's end of stream (bounded), so that the
/// session ends with a normal close. A refusal is not a failure: it is logged at info.
async fn refuse(mut stream: Stream, status: Status, who: &str, name: &str, what: &str) {
    if let Err(e) = write_reply(&mut stream, status, "").await {
        return info!(client = %who, service = %name, error = %printable(&e.to_string()), "tunnel refused ({what}); the stream ended first");
    }
    match finish(stream, REFUSAL_DRAIN).await {
        Ok(_) => info!(client = %who, service = %name, "tunnel refused: {what}"),
        Err(e) => {
            info!(client = %who, service = %name, error = %printable(&e.to_string()), "tunnel refused: {what}; the client did not end its stream cleanly")
        }
    }
}
