//! Local port forwarding: a local listener whose every connection is carried to a service.

use std::io;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::join::{join, Refused};
use super::pool::MuxPool;
use super::request::request;
use super::splice::splice_requested;
use super::{check_name, TunnelError};
use crate::human::printable;
use crate::net::{ClientConfig, LinkEvent};

/// Local port forwarding: every connection accepted on `local` is carried to `service`, as a
/// stream of one multiplexed session with the server ([`MuxPool`]): no handshake per
/// connection, and one resume for all after a fault. Against a server that does not multiplex,
/// each connection gets a resilient session of its own. Link events are sent to `events`, with
/// the local peer's address (per-connection sessions) or the server's (the shared session).
/// Runs until it is dropped.
///
/// # Errors
/// Returns only if the service name is invalid. A failed accept (out of file descriptors, say)
/// is logged and retried after a back-off ([`crate::net::AcceptBackoff`]).
pub async fn forward(
    local: TcpListener,
    server: String,
    cfg: ClientConfig,
    service: String,
    events: Option<mpsc::UnboundedSender<(std::net::SocketAddr, LinkEvent)>>,
) -> io::Result<()> {
    let pool = MuxPool::new(server.clone(), cfg.clone(), events.clone());
    forward_via(local, server, cfg, service, events, Some(pool)).await
}

/// Like [`forward`], with the multiplexed session given (`Some`: one pool can serve several
/// forwards to the same server) or none (`None`: one session per connection, always).
///
/// # Errors
/// Returns only if the service name is invalid. A failed accept (out of file descriptors, say)
/// is logged and retried after a back-off ([`crate::net::AcceptBackoff`]).
pub async fn forward_via(
    local: TcpListener,
    server: String,
    cfg: ClientConfig,
    service: String,
    events: Option<mpsc::UnboundedSender<(std::net::SocketAddr, LinkEvent)>>,
    pool: Option<Arc<MuxPool>>,
) -> io::Result<()> {
    check_name(&service)?;
    let mut backoff = crate::net::AcceptBackoff::default();
    loop {
        let (tcp, from) = backoff.accept(&local, "local forward").await;
        let _ = tcp.set_nodelay(true);
        let (server, cfg, service, events) = (server.clone(), cfg.clone(), service.clone(), events.clone());
        let pool = pool.clone();
        tokio::spawn(async move {
            if let Some(pool) = pool {
                match pool.open_unanswered(&service).await {
                    Ok(Some(sub)) => {
                        debug!(%from, service = %service, "forwarding (multiplexed)");
                        match join(tcp, sub, Some(&service)).await {
                            Ok((to_service, to_program)) => debug!(%from, to_service, to_program, "connection closed"),
                            // The refusal's text is the error's own (`Refused` is transparent).
                            Err(e) if Refused::of(&e).is_some() => {
                                warn!(%from, error = %printable(&e.to_string()), "cannot open tunnel")
                            }
                            Err(e) if super::join::reset_by_stream(&e) => {
                                info!(%from, error = %e, "the stream was reset; the local connection is reset")
                            }
                            Err(e)
                                if matches!(e.kind(), io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe) =>
                            {
                                info!(%from, error = %e, "the local program reset its connection; its stream is ended")
                            }
                            Err(e) => warn!(%from, error = %printable(&e.to_string()), "connection failed"),
                        }
                        return;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        warn!(%from, error = %printable(&e.to_string()), "cannot open tunnel");
                        let _ = tcp.set_zero_linger();
                        return;
                    }
                }
            }
            let stream = match request(&server, cfg, &service).await {
                Ok(s) => s,
                Err(e) => {
                    warn!(%from, error = %printable(&e.to_string()), "cannot open tunnel");
                    let _ = tcp.set_zero_linger();
                    return;
                }
            };
            let reported = events.is_some();
            if let Some(tx) = events {
                let mut rx = stream.events();
                tokio::spawn(async move {
                    while let Ok(ev) = rx.recv().await {
                        if tx.send((from, ev)).is_err() {
                            break;
                        }
                    }
                });
            }
            debug!(%from, service = %service, "forwarding");
            match splice_requested(tcp, stream, &service).await {
                Ok((to_service, to_program)) => debug!(%from, to_service, to_program, "connection closed"),
                Err(e) if e.is_refusal() => warn!(%from, error = %printable(&e.to_string()), "cannot open tunnel"),
                Err(TunnelError::Io(e)) if super::join::reset_by_stream(&e) => {
                    info!(%from, error = %e, "the stream was reset; the local connection is reset")
                }
                Err(TunnelError::Io(e))
                    if matches!(e.kind(), io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe) =>
                {
                    info!(%from, error = %e, "the local program reset its connection; its stream is ended")
                }
                // The stream's own failure is already reported by its link events.
                Err(e) if reported => debug!(%from, error = %printable(&e.to_string()), "connection failed"),
                Err(e) => warn!(%from, error = %printable(&e.to_string()), "connection failed"),
            }
        });
    }
}
