//! `holdfast server --metrics ADDR`: the server's counters, answered to `GET /metrics` in the
//! Prometheus text exposition format (0.0.4).
//!
//! The HTTP side is deliberately tiny: one request per connection (`Connection: close`), a
//! request head of at most [`MAX_REQUEST`](holdfast::scrape::MAX_REQUEST) bytes read within [`REQUEST_TIMEOUT`], at most
//! [`MAX_CONNECTIONS`] connections at once (more are closed at once), `GET /metrics` answered,
//! 404 for any other path and 405 for any other method. Every scrape takes a fresh snapshot
//! (atomic loads and two short locks: the handshake list and the per-key table), so nothing
//! on the data path pays for the metrics.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use holdfast::net::{AllowListHandle, StatsHandle};
use holdfast::scrape::{Head, Progress, Route};
use prometheus_client::encoding::prometheus_text::{encode, CONTENT_TYPE};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

/// How long a scraper has to send its request head.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Most scrape connections served at once.
const MAX_CONNECTIONS: usize = 16;

/// Labels of a metric family: (name, value) pairs.
type Labels = Vec<(&'static str, String)>;

/// `--metrics` and `--metrics-public`: the address, refused if it is not loopback and
/// `--metrics-public` was not given.
///
/// # Errors
/// A non-loopback address without `public`.
pub(crate) fn check_addr(addr: Option<SocketAddr>, public: bool) -> Result<Option<SocketAddr>> {
    match addr {
        Some(a) if !a.ip().is_loopback() && !public => bail!(
            "--metrics {a} is not a loopback address: the metrics name your clients and show when they \
             are connected. Listen on 127.0.0.1 (a local Prometheus or agent scrapes it), or add \
             --metrics-public (`metrics-public = true` in [server]) to serve them on {a}"
        ),
        None if public => bail!("--metrics-public needs --metrics IP:PORT (or `metrics = \"IP:PORT\"` in [server])"),
        other => Ok(other),
    }
}

/// Binds the metrics endpoint on `addr` and serves it in a task, which never ends by itself.
/// Returns the bound address and the task.
///
/// # Errors
/// If `addr` cannot be bound.
pub(crate) async fn serve(
    addr: SocketAddr,
    stats: StatsHandle,
    allow: AllowListHandle,
) -> Result<(SocketAddr, JoinHandle<Result<()>>)> {
    let listener = TcpListener::bind(addr).await.with_context(|| format!("--metrics {addr}: cannot listen"))?;
    let local = listener.local_addr().context("--metrics: no local address")?;
    info!(metrics = %local, path = "/metrics", "metrics endpoint ready");
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let task = tokio::spawn(async move {
        loop {
            let (sock, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "metrics: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                debug!(%peer, "metrics: too many connections; closing this one");
                continue;
            };
            let (stats, allow) = (stats.clone(), allow.clone());
            tokio::spawn(async move {
                if let Err(e) = answer(sock, &stats, &allow).await {
                    debug!(%peer, error = %e, "metrics: request not answered");
                }
                drop(slot);
            });
        }
    });
    Ok((local, task))
}

/// Reads one request head and answers it.
async fn answer(mut sock: TcpStream, stats: &StatsHandle, allow: &AllowListHandle) -> std::io::Result<()> {
    let head = match tokio::time::timeout(REQUEST_TIMEOUT, read_head(&mut sock)).await {
        Ok(Ok(Some(head))) => head,
        Ok(Ok(None)) => return respond(&mut sock, "431 Request Header Fields Too Large", "text/plain", "").await,
        Ok(Err(e)) => return Err(e),
        Err(_) => return Ok(()),
    };
    match head.route() {
        Route::Metrics => respond(&mut sock, "200 OK", CONTENT_TYPE, &render(stats, allow)).await,
        Route::NotFound => respond(&mut sock, "404 Not Found", "text/plain", "only /metrics is here\n").await,
        Route::MethodNotAllowed => {
            respond(&mut sock, "405 Method Not Allowed", "text/plain", "GET /metrics only\n").await
        }
    }
}

/// The request head, up to its blank line (parsed by [`holdfast::scrape`]); `None` if it is
/// longer than [`MAX_REQUEST`](holdfast::scrape::MAX_REQUEST).
async fn read_head(sock: &mut TcpStream) -> std::io::Result<Option<Head>> {
    let mut head = Head::default();
    let mut chunk = [0u8; 1024];
    loop {
        let n = sock.read(&mut chunk).await?;
        match head.push(&chunk[..n]) {
            Progress::More => {}
            Progress::Complete => return Ok(Some(head)),
            Progress::TooLong => return Ok(None),
        }
    }
}

async fn respond(sock: &mut TcpStream, status: &str, content_type: &str, body: &str) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    sock.write_all(head.as_bytes()).await?;
    sock.write_all(body.as_bytes()).await?;
    sock.shutdown().await
}

/// The metrics now, in the text format. Every family's label set is bounded: by a fixed list
/// (states, directions, reasons) or by the allow-list (clients).
pub(crate) fn render(stats: &StatsHandle, allow: &AllowListHandle) -> String {
    let s = stats.stats();
    let mut reg = Registry::with_prefix("holdfast");
    let gauge = |v: usize| {
        let g: Gauge = Gauge::default();
        g.set(i64::try_from(v).unwrap_or(i64::MAX));
        g
    };
    let counter = |v: u64| {
        let c: Counter = Counter::default();
        c.inc_by(v);
        c
    };
    let by = |label: &'static str, values: &[(&str, u64)]| {
        let f = Family::<Labels, Counter>::default();
        for (name, v) in values {
            f.get_or_create(&vec![(label, (*name).to_string())]).inc_by(*v);
        }
        f
    };
    let sessions = Family::<Labels, Gauge>::default();
    sessions.get_or_create(&vec![("state", "attached".into())]).set(i64::try_from(s.attached).unwrap_or(i64::MAX));
    sessions.get_or_create(&vec![("state", "detached".into())]).set(i64::try_from(s.detached).unwrap_or(i64::MAX));
    reg.register("sessions", "Sessions now, with a connection (attached) or waiting for a resume (detached)", sessions);
    reg.register("handshakes", "Connections in their handshake now", gauge(s.handshakes));
    reg.register("buffered_bytes", "Bytes the sessions' buffers hold now (at most --buffer-budget)", gauge(s.buffered));
    reg.register("sessions_opened", "Sessions opened since start", counter(s.opened));
    reg.register("resumes", "Sessions resumed on a new connection since start", counter(s.resumes as u64));
    reg.register(
        "sessions_expired",
        "Detached sessions expired without a resume since start",
        counter(s.expired as u64),
    );
    let bytes = by("direction", &[("to_client", s.bytes_to_clients), ("from_client", s.bytes_from_clients)]);
    reg.register("session_bytes", "Stream bytes of the sessions that ended, since start", bytes);
    let r = s.refused;
    let refused = by(
        "reason",
        &[
            ("rate_limited", r.rate_limited),
            ("busy", r.busy),
            ("not_allowed", r.not_allowed),
            ("replayed", r.replayed),
            ("unknown_session", r.unknown_session),
            ("timed_out", r.timed_out),
            ("evicted", r.evicted),
            ("superseded", r.superseded),
            ("failed", r.failed),
        ],
    );
    reg.register("handshakes_refused", "Connections that did not open or resume a session, by reason", refused);
    let list = allow.get();
    reg.register("allowed_clients", "Client keys on the allow-list in force", gauge(list.len()));
    // A client by its allow-list name, else its public key (not a secret); names shared by
    // several keys add up.
    let clients = Family::<Labels, Gauge>::default();
    for (key, n) in stats.sessions_per_key() {
        let name = list.lookup(&key).and_then(|p| p.name.clone()).unwrap_or_else(|| key.to_string());
        clients.get_or_create(&vec![("client", name)]).inc_by(i64::try_from(n).unwrap_or(i64::MAX));
    }
    reg.register("client_sessions", "Sessions now per client (allow-list name, or public key)", clients);
    let mut out = String::new();
    if encode(&mut out, &reg).is_err() {
        warn!("metrics: cannot encode");
    }
    out
}

#[cfg(test)]
mod tests {
    use holdfast::keys::{AllowList, Keypair};
    use holdfast::scrape::MAX_REQUEST;
    use holdfast::{ClientConfig, ServerConfig};

    use super::*;

    async fn request(addr: SocketAddr, bytes: &[u8]) -> String {
        let mut sock = TcpStream::connect(addr).await.unwrap();
        sock.write_all(bytes).await.unwrap();
        let mut reply = String::new();
        tokio::time::timeout(Duration::from_secs(10), sock.read_to_string(&mut reply)).await.unwrap().unwrap();
        reply
    }

    #[tokio::test]
    async fn a_client_without_a_name_is_labelled_by_its_public_key_and_odd_requests_are_refused() {
        let (server, client) = (Keypair::generate(), Keypair::generate());
        let server_pub = server.public;
        let client_pub = client.public;
        let allow = AllowList::from_keys([(client_pub, None)]);
        let mut listener = holdfast::bind("127.0.0.1:0", ServerConfig::new(server, allow)).await.unwrap();
        let (local, _task) =
            serve("127.0.0.1:0".parse().unwrap(), listener.stats_handle(), listener.allow_list_handle()).await.unwrap();
        let _stream =
            holdfast::connect(listener.local_addr().to_string(), ClientConfig::new(client, server_pub)).await.unwrap();
        let _accepted = listener.accept().await.unwrap();
        let reply = request(local, b"GET /metrics?x=1 HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
        assert!(reply.contains(&format!("holdfast_client_sessions{{client=\"{client_pub}\"}} 1\n")), "{reply}");
        assert!(reply.contains("holdfast_sessions{state=\"attached\"} 1\n"), "{reply}");
        let reply = request(local, b"POST /metrics HTTP/1.1\r\n\r\n").await;
        assert!(reply.starts_with("HTTP/1.1 405 "), "{reply}");
        let reply = request(local, b"GET /metrics/x HTTP/1.1\r\n\r\n").await;
        assert!(reply.starts_with("HTTP/1.1 404 "), "{reply}");
        let mut huge = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
        // One byte over: the server has read all of it when it answers (unread bytes would make
        // its close a reset, which could beat the answer).
        huge.resize(MAX_REQUEST + 1, b'a');
        let reply = request(local, &huge).await;
        assert!(reply.starts_with("HTTP/1.1 431 "), "{reply}");
    }

    #[test]
    fn only_loopback_unless_public() {
        assert!(check_addr(Some("127.0.0.1:9770".parse().unwrap()), false).is_ok());
        assert!(check_addr(Some("[::1]:9770".parse().unwrap()), false).is_ok());
        let e = check_addr(Some("0.0.0.0:9770".parse().unwrap()), false).unwrap_err().to_string();
        assert!(e.contains("--metrics-public"), "{e}");
        assert!(check_addr(Some("0.0.0.0:9770".parse().unwrap()), true).is_ok());
        assert!(check_addr(None, false).unwrap().is_none());
        assert!(check_addr(None, true).unwrap_err().to_string().contains("needs --metrics"));
    }
}
