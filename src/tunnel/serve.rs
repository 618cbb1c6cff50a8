//! The server side of tunnels: each accepted stream names a service, and the server connects it
//! to that service's target.

use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tracing::{info, warn};

use super::request::{read_request, write_reply};
use super::splice::splice;
use super::{Services, REQUEST_TIMEOUT};
use crate::human::printable;
use crate::net::{self, Listener, Peer, Stream};

/// Server side: accepts streams forever and connects each to the service it names.
///
/// # Errors
/// Returns only if the listener stops.
pub async fn serve(mut listener: Listener, services: Arc<Services>) -> Result<(), net::Error> {
    loop {
        let (stream, peer) = listener.accept().await?;
        tokio::spawn(serve_one(stream, peer, services.clone()));
    }
}

async fn serve_one(mut stream: Stream, peer: Peer, services: Arc<Services>) {
    let who = peer.name.clone().unwrap_or_else(|| peer.key.to_string());
    let name = match tokio::time::timeout(REQUEST_TIMEOUT, read_request(&mut stream)).await {
        Ok(Ok(n)) => n,
        Ok(Err(e)) => return warn!(client = %who, error = %printable(&e.to_string()), "bad service request"),
        Err(_) => return warn!(client = %who, "no service request in time"),
    };
    let Some(target) = services.get(&name) else {
        warn!(client = %who, service = %name, "unknown service");
        let _ = write_reply(&mut stream, 1, "unknown service").await;
        let _ = stream.shutdown().await;
        return;
    };
    let tcp = match TcpStream::connect(target).await {
        Ok(t) => t,
        Err(e) => {
            warn!(client = %who, service = %name, %target, error = %e, "service refused");
            let _ = write_reply(&mut stream, 2, &e.to_string()).await;
            let _ = stream.shutdown().await;
            return;
        }
    };
    let _ = tcp.set_nodelay(true);
    if write_reply(&mut stream, 0, "").await.is_err() {
        return;
    }
    info!(client = %who, service = %name, %target, "tunnel open");
    match splice(tcp, stream).await {
        Ok((up, down)) => info!(client = %who, service = %name, up, down, "tunnel closed"),
        Err(e) => warn!(client = %who, service = %name, error = %printable(&e.to_string()), "tunnel failed"),
    }
}
