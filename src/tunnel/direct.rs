//! Local forwarding to a destination the server connects to, as `ssh -L PORT:HOST:HOSTPORT`:
//! every connection accepted on a local listener becomes a connect request (the same one as a
//! SOCKS5 CONNECT, `docs/PROTOCOL.md` Appendix A), which the server's `--allow-connect` rules
//! decide.

use std::io;
use std::sync::Arc;

use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use super::join::join;
use super::pool::MuxPool;
use super::TunnelError;
use crate::human::printable;

/// Carries every connection accepted on `local` to `host:port`, connected by the server, as a
/// stream of `pool`'s session. A destination the server refuses closes that connection (and
/// is logged). Runs until it is dropped.
///
/// # Errors
/// Does not return on a failed accept: it is logged and retried after a back-off
/// ([`crate::net::AcceptBackoff`]).
pub async fn forward_connect(local: TcpListener, pool: Arc<MuxPool>, host: String, port: u16) -> io::Result<()> {
    let dest = printable(&format!("{host}:{port}")).into_owned();
    let mut backoff = crate::net::AcceptBackoff::default();
    loop {
        let (tcp, from) = backoff.accept(&local, "local forward").await;
        let _ = tcp.set_nodelay(true);
        let (pool, host, dest) = (pool.clone(), host.clone(), dest.clone());
        tokio::spawn(async move {
            match pool.open_connect(&host, port).await {
                Ok(Some(sub)) => {
                    debug!(%from, %dest, "connection open");
                    match join(tcp, sub, None).await {
                        Ok((to_server, to_program)) => debug!(%from, %dest, to_server, to_program, "connection closed"),
                        Err(e) => info!(%from, %dest, error = %e, "connection ended by a reset"),
                    }
                }
                Ok(None) => {
                    warn!(%from, %dest, "the server does not multiplex, and a forward to HOST:PORT needs a server that does")
                }
                Err(TunnelError::UnknownService(_)) => {
                    warn!(%from, %dest, "the server does not allow this destination (its --allow-connect rules)")
                }
                Err(TunnelError::ServiceRefused { .. } | TunnelError::UnknownStatus { .. }) => {
                    warn!(%from, %dest, "the server could not connect to the destination (its log has the cause)")
                }
                Err(e) => warn!(%from, %dest, error = %printable(&e.to_string()), "cannot open a stream to the server"),
            }
        });
    }
}
