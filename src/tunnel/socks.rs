//! Dynamic forwarding, as `ssh -D` does it: a local SOCKS5 listener whose every CONNECT
//! becomes a stream of the client's multiplexed session, which the server connects to the
//! destination if its `--allow-connect` rules allow it. Names are resolved by the server.
//! The SOCKS5 protocol itself (RFC 1928, no authentication: the listener is local) is the
//! `fast-socks5` crate's.

use std::io;
use std::sync::Arc;

use fast_socks5::server::Socks5ServerProtocol;
use fast_socks5::util::target_addr::TargetAddr;
use fast_socks5::{ReplyError, Socks5Command};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

use super::join::join;
use super::pool::MuxPool;
use super::{TunnelError, REQUEST_TIMEOUT};
use crate::human::printable;

/// Serves SOCKS5 on `local`, carrying each CONNECT through `pool`'s session. Runs until it is
/// dropped.
///
/// # Errors
/// Does not return on a failed accept (out of file descriptors, say): it is logged and retried
/// after a back-off ([`crate::net::AcceptBackoff`]).
pub async fn socks(local: TcpListener, pool: Arc<MuxPool>) -> io::Result<()> {
    let mut backoff = crate::net::AcceptBackoff::default();
    loop {
        let (tcp, from) = backoff.accept(&local, "SOCKS").await;
        let _ = tcp.set_nodelay(true);
        let pool = pool.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(REQUEST_TIMEOUT, handshake(tcp)).await {
                Ok(Ok(Some((proto, host, port)))) => carry(proto, host, port, &pool, from).await,
                Ok(Ok(None)) => {}
                Ok(Err(e)) => debug!(%from, error = %printable(&e.to_string()), "not a SOCKS5 client"),
                Err(_) => debug!(%from, "no SOCKS5 request in time"),
            }
        });
    }
}

type Commanded = Socks5ServerProtocol<TcpStream, fast_socks5::server::states::CommandRead>;

/// The SOCKS5 greeting and request; `None` if the command is not CONNECT (refused here).
async fn handshake(tcp: TcpStream) -> Result<Option<(Commanded, String, u16)>, fast_socks5::server::SocksServerError> {
    let (proto, cmd, target) = Socks5ServerProtocol::accept_no_auth(tcp).await?.read_command().await?;
    if !matches!(cmd, Socks5Command::TCPConnect) {
        proto.reply_error(&ReplyError::CommandNotSupported).await?;
        return Ok(None);
    }
    let (host, port) = match target {
        TargetAddr::Ip(a) => (a.ip().to_string(), a.port()),
        TargetAddr::Domain(name, port) => (name, port),
    };
    Ok(Some((proto, host, port)))
}

/// Opens the stream and answers the SOCKS client: success, then the bytes both ways; or the
/// SOCKS error that says why not.
async fn carry(proto: Commanded, host: String, port: u16, pool: &MuxPool, from: std::net::SocketAddr) {
    let dest = printable(&format!("{host}:{port}")).to_string();
    let refusal = match pool.open_connect(&host, port).await {
        Ok(Some(sub)) => {
            let Ok(tcp) = proto.reply_success(std::net::SocketAddr::from(([0, 0, 0, 0], 0))).await else { return };
            debug!(%from, %dest, "SOCKS connection open");
            match join(tcp, sub, None).await {
                Ok((to_server, to_program)) => debug!(%from, %dest, to_server, to_program, "connection closed"),
                Err(e) => info!(%from, %dest, error = %e, "connection ended by a reset"),
            }
            return;
        }
        Ok(None) => {
            warn!(%from, %dest, "the server does not multiplex, and dynamic forwarding needs a server that does");
            ReplyError::GeneralFailure
        }
        Err(TunnelError::UnknownService(_)) => {
            info!(%from, %dest, "the server does not allow this destination (its --allow-connect rules)");
            ReplyError::ConnectionNotAllowed
        }
        // RFC 1928's replies from what the server said: 3 is a refusal by the destination; 2
        // covers a name that does not resolve and an address that does not answer (or, from a
        // server older than status 3, any failure), which "host unreachable" sums up.
        Err(TunnelError::DestinationRefused { .. }) => {
            info!(%from, %dest, "the destination refused the connection");
            ReplyError::ConnectionRefused
        }
        Err(TunnelError::ServiceRefused { .. } | TunnelError::UnknownStatus { .. }) => {
            info!(%from, %dest, "the server could not connect to the destination (its log has the cause)");
            ReplyError::HostUnreachable
        }
        Err(e) => {
            warn!(%from, %dest, error = %printable(&e.to_string()), "cannot open a stream to the server");
            ReplyError::GeneralFailure
        }
    };
    let _ = proto.reply_error(&refusal).await;
}
