//! Reverse forwarding, as `ssh -R` does it: the client asks the server to listen on an address
//! its `--allow-listen` rules give that key, and every connection to that listener is carried
//! back to the client as a stream of its multiplexed session, to a local target.
//!
//! The listener lives exactly as long as the stream that asked for it (`docs/PROTOCOL.md`
//! B.3): while the session is detached it stays but accepts nothing (the kernel's backlog holds
//! new connections), and a connection accepted before waits at most [`REQUEST_TIMEOUT`] for the
//! client's answer before it is reset; when the session ends (or the client drops the request's
//! stream, or the server stops) it is closed at once. What its connections hold is bounded
//! ([`super::TunnelLimits`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tracing::{info, warn};

use super::join::join_counted;
use super::limits::ReversePermit;
use super::pool::{lock, MuxPool};
use super::request::{read_reply, tagged, write_reply, REVERSE_OPEN};
use super::{Services, Status, TunnelError, REQUEST_TIMEOUT};
use crate::human::printable;
use crate::keys::AllowedPeer;
use crate::net::quiet::{quiet, LogBudget};
use crate::net::{LinkStatus, Session, Stream};

/// First pause before asking again after a refusal; it doubles after each refusal, up to
/// [`RETRY_MAX`], and starts again from here after a listener that worked.
pub const RETRY_FIRST: Duration = Duration::from_secs(5);
/// Longest pause between two listen requests that were refused.
pub const RETRY_MAX: Duration = Duration::from_secs(300);

/// Client side: keeps a reverse forward from `bind` on the server to `target` here, for as
/// long as the process runs: asks again after the session was lost, or after a refusal, backing
/// off from [`RETRY_FIRST`] to [`RETRY_MAX`]; each cause is logged once, when it first appears.
pub async fn remote(pool: Arc<MuxPool>, bind: String, target: String) {
    let mut last = String::new();
    let mut pause = RETRY_FIRST;
    loop {
        let said = match pool.open_listen(&bind).await {
            Ok(Some((mut control, at))) => match at.parse::<SocketAddr>() {
                Ok(at) => {
                    lock(&pool.remotes).insert(at, target.clone());
                    info!(server_listens = %at, %target, "reverse forward open");
                    // The listener is there until this stream ends.
                    let mut sink = [0u8; 64];
                    while matches!(control.read(&mut sink).await, Ok(1..)) {}
                    lock(&pool.remotes).remove(&at);
                    warn!(server_listens = %at, "reverse forward closed (the session ended, or the server stopped); asking again");
                    last.clear();
                    pause = RETRY_FIRST;
                    continue;
                }
                Err(_) => format!("the server answered an unusable address '{}'", printable(&at)),
            },
            Ok(None) => "the server does not multiplex, and reverse forwarding needs a server that does".into(),
            Err(TunnelError::UnknownService(_)) => {
                format!("the server does not allow listening on {bind} for this key (its --allow-listen rules)")
            }
            Err(TunnelError::ServiceRefused { .. }) => {
                format!("the server cannot listen on {bind} (in use, or not its address; its log has the cause)")
            }
            Err(e) => format!("cannot ask the server to listen on {bind}: {}", printable(&e.to_string())),
        };
        if said != last {
            warn!(
                "{said}; asking again in {}, then less and less often (at most every {}); this is logged again only if the cause changes",
                crate::human::Rounded(pause),
                crate::human::Rounded(RETRY_MAX)
            );
            last = said;
        }
        tokio::time::sleep(pause).await; // retry pace, not synchronisation
        pause = (pause * 2).min(RETRY_MAX);
    }
}

/// Server side: a listen request on a stream of `mux`, from the client whose allow-list entry
/// in force is `entry`. Listens if the `--allow-listen` rules that apply to it give it `addr`
/// (see [`super::rights::may_listen`]), answers with the address listened on, and carries each
/// connection to the client, until the stream ends, the session ends or `stop` turns true.
///
/// A connection is accepted only with a permit of this listener and one of the client's key
/// ([`super::TunnelLimits`]), and only while the session is attached (`status`): otherwise the
/// kernel's backlog holds it. Accept errors (out of descriptors, say) back off from 50 ms to
/// 1 s and are logged at most every 10 s.
pub(super) async fn serve_listen(
    mut control: Stream,
    addr: SocketAddr,
    mux: Session,
    (entry, services): (AllowedPeer, Arc<Services>),
    stop: watch::Receiver<bool>,
    (mut status, peer, session_log): (watch::Receiver<LinkStatus>, &crate::net::Peer, Arc<LogBudget>),
) {
    let who = super::rights::label(&entry);
    // An IPv4-mapped address is the IPv4 address: judged and bound as that.
    let addr = SocketAddr::new(addr.ip().to_canonical(), addr.port());
    if !super::rights::may_listen(&services, &entry, addr) {
        quiet!(session_log, info!(client = %who, %addr, "reverse forward refused: not allowed (--allow-listen)"));
        let _ = write_reply(&mut control, Status::UnknownService, "").await;
        return;
    }
    let listener = match bind_listener(addr) {
        Ok(l) => l,
        Err(e) => {
            quiet!(session_log, warn!(client = %who, %addr, error = %e, "reverse forward refused: cannot listen"));
            let _ = write_reply(&mut control, Status::Unavailable, "").await;
            return;
        }
    };
    let at = listener.local_addr().unwrap_or(addr);
    if write_reply(&mut control, Status::Connected, &at.to_string()).await.is_err() {
        return;
    }
    quiet!(session_log, info!(client = %who, listen = %at, "reverse forward listening"));
    let _listed = peer.forward_opened(format!("listen {at}"));
    let bounds = services.bounds().clone();
    let (permits, _counted) = (bounds.listener_permits(), bounds.listener());
    let mut sink = [0u8; 64];
    let mut stopping = stop.clone();
    let mut pause = Duration::ZERO;
    let mut backoff = crate::net::AcceptBackoff::default();
    // Whoever reaches the listener decides how many connections there are: they have a budget
    // of their own within their session's ([`super::quiet`]).
    let log = Arc::new(LogBudget::within(&session_log));
    loop {
        let next = async {
            if !pause.is_zero() {
                tokio::time::sleep(pause).await; // back-off after an accept error
            }
            let permit = bounds.reverse_permit(&permits, entry.key).await;
            // While the client is away nothing is accepted: the backlog holds the connections.
            let away = |s: &LinkStatus| matches!(s, LinkStatus::Reconnecting { .. });
            loop {
                let _ = status.wait_for(|s| !away(s)).await;
                tokio::select! {
                    r = listener.accept() => return (permit, r),
                    closed = async { status.wait_for(away).await.is_err() } => if closed {
                        return (permit, listener.accept().await);
                    },
                }
            }
        };
        tokio::select! {
            (mut permit, r) = next => match r {
                Ok((tcp, from)) => {
                    pause = Duration::ZERO;
                    backoff.succeeded();
                    permit.accepted();
                    let one = reverse_one(tcp, from, at, mux.clone(), (who.clone(), peer.clone(), log.clone()), permit);
                    tokio::spawn(tracing::Instrument::in_current_span(one));
                }
                Err(e) => {
                    let after = backoff.failed(std::time::Instant::now());
                    pause = after.pause;
                    if let Some(more) = after.log {
                        warn!(client = %who, listen = %at, error = %e, more_since_last_logged = more, "accept failed; backing off (logged at most every 10s)");
                    }
                }
            },
            r = control.read(&mut sink) => if !matches!(r, Ok(1..)) { break },
            _ = stopping.wait_for(|s| *s) => break,
        }
    }
    drop(listener);
    quiet!(session_log, info!(client = %who, listen = %at, "reverse forward closed; the listener is released"));
}

/// Binds a reverse forward's listener. An IPv6 address listens for IPv6 only
/// (`IPV6_V6ONLY`): `[::]:P` must not also take IPv4 connections, which no IPv6 rule gives.
pub(super) fn bind_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        let s = TcpSocket::new_v6()?;
        rustix::net::sockopt::set_ipv6_v6only(&s, true)?;
        s
    };
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    // A short backlog: connections the listener has not accepted (at its permits' bound, or
    // while its session is detached) hold kernel memory for whoever made them, and nothing is
    // charged for it. Past it, new connections wait for their SYN to be retransmitted.
    sock.listen(LISTEN_BACKLOG)
}

/// The kernel's queue of connections a reverse forward's listener has not accepted yet.
const LISTEN_BACKLOG: u32 = 64;

/// One connection to a reverse forward's listener, carried to the client on a new stream. The
/// client must answer within [`REQUEST_TIMEOUT`] (it may be detached), else the connection is
/// reset. `_permit` is held until the connection ends.
async fn reverse_one(
    tcp: TcpStream,
    from: SocketAddr,
    at: SocketAddr,
    mux: Session,
    (who, peer, log): (String, crate::net::Peer, Arc<LogBudget>),
    _permit: ReversePermit,
) {
    crate::net::kernel::bound_tunnel(&tcp);
    let open = async {
        let mut sub = mux.open().await?;
        tokio::io::AsyncWriteExt::write_all(&mut sub, &tagged(REVERSE_OPEN, &at.to_string())).await?;
        read_reply(&mut sub, "reverse forward").await?;
        Ok::<_, TunnelError>(sub)
    };
    let sub = match tokio::time::timeout(REQUEST_TIMEOUT, open).await {
        Ok(Ok(sub)) => sub,
        failed => {
            let why = match failed {
                // The client's answer (A.4), not a service's.
                Ok(Err(TunnelError::UnknownService(_))) => {
                    "the client has no reverse forward for this address".to_string()
                }
                Ok(Err(TunnelError::ServiceRefused { .. })) => {
                    "the client could not connect to its target for this forward".to_string()
                }
                Ok(Err(e)) => printable(&e.to_string()).into_owned(),
                _ => format!("no answer within {} (the client may be away)", crate::human::Rounded(REQUEST_TIMEOUT)),
            };
            let _ = tcp.set_zero_linger();
            return quiet!(log, warn!(client = %who, listen = %at, %from, error = %why, "reverse connection refused"));
        }
    };
    let counted = peer.stream_opened();
    let (carried, (to_client, to_program)) = join_counted(tcp, sub, None).await;
    drop(counted);
    match carried {
        Ok(()) => {
            peer.carried(to_client, to_program);
            quiet!(log, info!(client = %who, listen = %at, %from, to_client, to_program, "reverse connection closed"))
        }
        Err(e) => {
            peer.tunnel_reset(to_client, to_program);
            quiet!(
                log,
                info!(client = %who, listen = %at, %from, to_client, to_program, error = %e, "reverse connection ended by a reset")
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The red-team review filled a detached session's listener backlog (1024) with a
    /// stranger's connections carrying data: 200 MiB of kernel memory charged to nobody. The
    /// backlog is now 64 (`ss` reports it as a listener's Send-Q).
    #[test]
    fn a_reverse_listener_queues_at_most_its_backlog() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let _in = rt.enter();
        let listener = bind_listener("127.0.0.1:0".parse().unwrap()).unwrap();
        let port = listener.local_addr().unwrap().port();
        let out = match std::process::Command::new("ss").args(["-Hltn", &format!("sport = :{port}")]).output() {
            Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
            other => {
                assert!(std::env::var_os("HOLDFAST_REQUIRE_TOOLS").is_none(), "ss (iproute2) is required: {other:?}");
                return eprintln!("skipped: no ss (iproute2)");
            }
        };
        let backlog: Vec<&str> = out.split_whitespace().collect();
        assert_eq!(backlog.get(2), Some(&"64"), "ss says: {out}");
    }

    #[tokio::test]
    async fn an_ipv6_reverse_listener_takes_no_ipv4_connection() {
        let Ok(listener) = bind_listener("[::]:0".parse().unwrap()) else {
            return eprintln!("no IPv6 on this host: skipped");
        };
        let port = listener.local_addr().unwrap().port();
        let v4 = TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], port))).await;
        assert!(v4.is_err(), "an IPv4 connection reached a listener on [::]:{port}");
        let v6 = TcpStream::connect(SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port))).await;
        assert!(v6.is_ok(), "{v6:?}");
    }
}
