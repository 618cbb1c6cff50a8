//! Reverse forwarding, as `ssh -R` does it: the client asks the server to listen on an address
//! its `--allow-listen` rules give that key, and every connection to that listener is carried
//! back to the client as a stream of its multiplexed session, to a local target.
//!
//! The listener lives exactly as long as the stream that asked for it (`docs/PROTOCOL.md`
//! B.3): while the session is detached it stays, and a new connection waits at most
//! [`REQUEST_TIMEOUT`] for the client's answer before it is reset; when the session ends (or the
//! client drops the request's stream, or the server stops) it is closed at once.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use super::join::join;
use super::mux::MuxPool;
use super::request::{read_addr, read_reply, tagged, write_reply, REVERSE_OPEN};
use super::serve::connect_service;
use super::{Services, Status, TunnelError, REQUEST_TIMEOUT};
use crate::human::printable;
use crate::keys::AllowedPeer;
use crate::mux::{Mux, MuxStream};

/// Client side: the reverse forwards in force, by the server's listener address.
pub(super) type Remotes = Arc<Mutex<HashMap<SocketAddr, String>>>;

fn lock(r: &Remotes) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, String>> {
    r.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Client side: keeps a reverse forward from `bind` on the server to `target` here, for as
/// long as the process runs: asks again after the session was lost, or after a refusal (every
/// 5 s, logged once per cause).
pub async fn remote(pool: Arc<MuxPool>, bind: String, target: String) {
    let mut last = String::new();
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
            warn!("{said}; trying again every 5s");
            last = said;
        }
        tokio::time::sleep(Duration::from_secs(5)).await; // retry pace, not synchronisation
    }
}

/// Client side: streams the server opens, each a connection to one of `remotes`' listeners.
pub(super) async fn accept_inbound(mut inbound: mpsc::Receiver<MuxStream>, remotes: Remotes) {
    while let Some(sub) = inbound.recv().await {
        tokio::spawn(carry_back(sub, remotes.clone()));
    }
}

async fn carry_back(mut sub: MuxStream, remotes: Remotes) {
    let head = async {
        match sub.read_u8().await? {
            REVERSE_OPEN => Ok(read_addr(&mut sub).await?),
            _ => Err(TunnelError::Malformed("stream opened by the server")),
        }
    };
    let at = match tokio::time::timeout(REQUEST_TIMEOUT, head).await {
        Ok(Ok(at)) => at,
        Ok(Err(e)) => return warn!(error = %printable(&e.to_string()), "bad stream from the server"),
        Err(_) => return warn!("a stream from the server said nothing in time"),
    };
    let target = lock(&remotes).get(&at).cloned();
    let Some(target) = target else {
        let _ = write_reply(&mut sub, Status::UnknownService, "").await;
        return warn!(server_listens = %at, "a connection for a reverse forward this client no longer has");
    };
    let Some(tcp) = connect_service("this client", "reverse forward", &target).await else {
        let _ = write_reply(&mut sub, Status::Unavailable, "").await;
        return;
    };
    if write_reply(&mut sub, Status::Connected, "").await.is_err() {
        return;
    }
    match join(tcp, sub, None, None).await {
        Ok((to_server, to_target)) => {
            info!(server_listens = %at, %target, to_server, to_target, "reverse connection closed")
        }
        Err(e) => info!(server_listens = %at, %target, error = %e, "reverse connection ended by a reset"),
    }
}

/// Server side: a listen request on a stream of `mux`, from the client whose allow-list entry
/// in force is `entry`. Listens if the `--allow-listen` rules that apply to it give it `addr`
/// (see [`super::rights::may_listen`]), answers with the address listened on, and carries each
/// connection to the client, until the stream ends, the session ends or `stop` turns true.
pub(super) async fn serve_listen(
    mut control: MuxStream,
    addr: SocketAddr,
    mux: Mux,
    (entry, services): (AllowedPeer, Arc<Services>),
    stop: watch::Receiver<bool>,
) {
    let who = super::rights::label(&entry);
    if !super::rights::may_listen(&services, &entry, addr) {
        info!(client = %who, %addr, "reverse forward refused: not allowed (--allow-listen)");
        let _ = write_reply(&mut control, Status::UnknownService, "").await;
        return;
    }
    let listener = match TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            warn!(client = %who, %addr, error = %e, "reverse forward refused: cannot listen");
            let _ = write_reply(&mut control, Status::Unavailable, "").await;
            return;
        }
    };
    let at = listener.local_addr().unwrap_or(addr);
    if write_reply(&mut control, Status::Connected, &at.to_string()).await.is_err() {
        return;
    }
    info!(client = %who, listen = %at, "reverse forward listening");
    let mut sink = [0u8; 64];
    let mut stopping = stop.clone();
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, from)) => {
                    tokio::spawn(reverse_one(tcp, from, at, mux.clone(), who.clone(), stop.clone()));
                }
                Err(e) => warn!(client = %who, listen = %at, error = %e, "accept failed"),
            },
            r = control.read(&mut sink) => if !matches!(r, Ok(1..)) { break },
            _ = stopping.wait_for(|s| *s) => break,
        }
    }
    drop(listener);
    info!(client = %who, listen = %at, "reverse forward closed; the listener is released");
}

/// One connection to a reverse forward's listener, carried to the client on a new stream. The
/// client must answer within [`REQUEST_TIMEOUT`] (it may be detached), else the connection is
/// reset.
async fn reverse_one(
    tcp: TcpStream,
    from: SocketAddr,
    at: SocketAddr,
    mux: Mux,
    who: String,
    stop: watch::Receiver<bool>,
) {
    let _ = tcp.set_nodelay(true);
    let open = async {
        let mut sub = mux.open().await.map_err(|e| TunnelError::Io(e.into()))?;
        tokio::io::AsyncWriteExt::write_all(&mut sub, &tagged(REVERSE_OPEN, &at.to_string())).await?;
        read_reply(&mut sub, "reverse forward").await?;
        Ok::<_, TunnelError>(sub)
    };
    let sub = match tokio::time::timeout(REQUEST_TIMEOUT, open).await {
        Ok(Ok(sub)) => sub,
        failed => {
            let why = match failed {
                Ok(Err(e)) => printable(&e.to_string()).into_owned(),
                _ => format!("no answer within {} (the client may be away)", crate::human::Rounded(REQUEST_TIMEOUT)),
            };
            let _ = tcp.set_zero_linger();
            return warn!(client = %who, listen = %at, %from, error = %why, "reverse connection refused");
        }
    };
    match join(tcp, sub, Some(stop), None).await {
        Ok((to_client, to_program)) => {
            info!(client = %who, listen = %at, %from, to_client, to_program, "reverse connection closed")
        }
        Err(e) => info!(client = %who, listen = %at, %from, error = %e, "reverse connection ended by a reset"),
    }
}
