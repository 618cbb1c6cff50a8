//! `holdfast server --metrics ADDR`: the server's counters, answered to `GET /metrics` in the
//! Prometheus text exposition format (0.0.4).
//!
//! The HTTP side is deliberately tiny: one request per connection (`Connection: close`), a
//! request head of at most [`MAX_REQUEST`](holdfast::scrape::MAX_REQUEST) bytes read within [`REQUEST_TIMEOUT`], connections
//! served concurrently, at most [`MAX_CONNECTIONS`] at once (at the cap the oldest idle one is
//! closed for a new one, or the oldest of all if none is idle), each closed after [`CONNECTION_TIMEOUT`], `GET /metrics` answered,
//! 404 for any other path and 405 for any other method. Every scrape takes a fresh snapshot
//! (atomic loads and two short locks: the handshake list and the per-key table), so nothing
//! on the data path pays for the metrics.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
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
use tokio::task::{AbortHandle, JoinHandle};
use tracing::{debug, info, warn};

/// How long a scraper has to send its request head.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a scrape connection may last in all (its answer read too).
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(15);
/// Most scrape connections served at once (see [`serve`]).
const MAX_CONNECTIONS: usize = 64;

/// Labels of a metric family: (name, value) pairs.
type Labels = Vec<(&'static str, String)>;

/// SIGHUP reloads of the allow-list that failed, since start (one server per process).
pub(crate) static RELOAD_FAILURES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

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

/// Binds the metrics endpoint on `addr`.
///
/// # Errors
/// If `addr` cannot be bound.
pub(crate) async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| format!("--metrics {addr}: cannot listen"))
}

/// Binds `addr` as soon as it is free (an older server process holds it until it exits),
/// trying every second, then serves it as [`serve`] does, and hands it on at the next upgrade.
pub(crate) fn serve_when_free(
    addr: SocketAddr,
    listener: &holdfast::Listener,
) -> impl std::future::Future<Output = Result<()>> + Send + 'static {
    let (stats, allow, retirement) = (listener.stats_handle(), listener.allow_list_handle(), listener.retirement());
    let keep = listener.extra_sockets();
    async move {
        let socket = loop {
            if retirement.handed_over() {
                return Ok(());
            }
            match bind(addr).await {
                Ok(s) => break s,
                Err(_) => tokio::time::sleep(Duration::from_secs(1)).await, // retry pace
            }
        };
        keep.add(&socket).context("--metrics: cannot keep the socket for an upgrade")?;
        info!(metrics = %addr, "the metrics port is free again: serving metrics");
        let stop = async move { retirement.until_handed_over().await };
        serve(socket, stats, allow, stop)?.1.await?
    }
}

/// A scrape connection being served, as the cap sees it.
struct Conn {
    task: AbortHandle,
    /// True until its request head has arrived: such a connection is idle, and the first to go
    /// when a new one needs its place.
    reading: Arc<AtomicBool>,
}

/// Serves the metrics endpoint on `listener` in a task, which never ends by itself; it stops
/// accepting (and closes the socket) when `stop` resolves (this process handed its sockets to a
/// new one). Connections are served concurrently, at most [`MAX_CONNECTIONS`] at once: at the
/// cap, the oldest connection that has not sent its request yet is closed to make room, or if
/// every one has, the oldest of all, so that neither idle connections nor ones that ask and
/// never read can lock a scraper out. Returns the bound address and the task.
///
/// # Errors
/// If the listener has no local address.
pub(crate) fn serve(
    listener: TcpListener,
    stats: StatsHandle,
    allow: AllowListHandle,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(SocketAddr, JoinHandle<Result<()>>)> {
    let local = listener.local_addr().context("--metrics: no local address")?;
    info!(metrics = %local, path = "/metrics", "metrics endpoint ready");
    let task = tokio::spawn(async move {
        let mut conns: VecDeque<Conn> = VecDeque::new();
        let mut backoff = holdfast::net::AcceptBackoff::default();
        tokio::pin!(stop);
        loop {
            let (sock, peer) = tokio::select! {
                biased;
                () = &mut stop => break,
                r = listener.accept() => match r {
                    Ok(x) => {
                        backoff.succeeded();
                        x
                    }
                    Err(e) => {
                        backoff.wait_after("metrics", &e).await;
                        continue;
                    }
                },
            };
            conns.retain(|c| !c.task.is_finished());
            if conns.len() >= MAX_CONNECTIONS {
                match conns.iter().position(|c| c.reading.load(Ordering::Relaxed)) {
                    Some(i) => {
                        debug!(%peer, "metrics: too many connections; closing the oldest idle one");
                        if let Some(c) = conns.remove(i) {
                            c.task.abort();
                        }
                    }
                    // Every one is being answered: the oldest goes, so that connections which
                    // sent a request and then read nothing cannot lock scrapers out (an answer
                    // takes milliseconds to a scraper that reads).
                    None => {
                        debug!(%peer, "metrics: too many connections being answered; closing the oldest");
                        if let Some(c) = conns.pop_front() {
                            c.task.abort();
                        }
                    }
                }
            }
            let (stats, allow) = (stats.clone(), allow.clone());
            let reading = Arc::new(AtomicBool::new(true));
            let flag = reading.clone();
            let task = tokio::spawn(async move {
                match tokio::time::timeout(CONNECTION_TIMEOUT, answer(sock, &stats, &allow, &flag)).await {
                    Ok(Err(e)) => debug!(%peer, error = %e, "metrics: request not answered"),
                    Err(_) => debug!(%peer, "metrics: connection took too long; closed"),
                    Ok(Ok(())) => {}
                }
            });
            conns.push_back(Conn { task: task.abort_handle(), reading });
        }
        drop(listener);
        info!("metrics endpoint handed to the new server process");
        std::future::pending().await
    });
    Ok((local, task))
}

/// Reads one request head and answers it.
async fn answer(
    mut sock: TcpStream,
    stats: &StatsHandle,
    allow: &AllowListHandle,
    reading: &AtomicBool,
) -> std::io::Result<()> {
    let head = tokio::time::timeout(REQUEST_TIMEOUT, read_head(&mut sock)).await;
    reading.store(false, Ordering::Relaxed);
    let head = match head {
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
    reg.register(
        "earlier_process_sessions",
        "Sessions an earlier server process still holds after an upgrade (not in holdfast_sessions)",
        gauge(s.earlier_sessions),
    );
    reg.register(
        "buffered_bytes",
        "Bytes the sessions' replay buffers (sent, not yet acknowledged) and stream-less receive buffers hold now",
        gauge(s.buffered),
    );
    reg.register(
        "budget_used_bytes",
        "Bytes taken from --buffer-budget now: buffers held and streams' receive windows reserved (at most the budget)",
        gauge(s.budget_used),
    );
    reg.register("sessions_opened", "Sessions opened since start", counter(s.opened));
    reg.register("resumes", "Sessions resumed on a new connection since start", counter(s.resumes as u64));
    reg.register(
        "sessions_expired",
        "Detached sessions expired without a resume since start",
        counter(s.expired as u64),
    );
    let bytes = by("direction", &[("to_client", s.bytes_to_clients), ("from_client", s.bytes_from_clients)]);
    reg.register(
        "session_bytes",
        "Stream bytes of every session since start, the live ones' included (as of this scrape)",
        bytes,
    );
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
    let streams_refused = by("reason", &[("slots", s.streams_refused_slots), ("memory", s.streams_refused_memory)]);
    reg.register(
        "streams_refused",
        "Streams refused (reset) since start: no stream slot (the key's share or the server's), or no room in the buffer budget (the key's share or the whole) for their receive window",
        streams_refused,
    );
    let list = allow.get();
    reg.register("allowed_clients", "Client keys on the allow-list in force", gauge(list.len()));
    reg.register(
        "reload_failures",
        "SIGHUP reloads of the allow-list that failed (the previous list stayed in force), since start",
        counter(RELOAD_FAILURES.load(Ordering::Relaxed)),
    );
    let build = Family::<Labels, Gauge>::default();
    build.get_or_create(&vec![("version", env!("CARGO_PKG_VERSION").to_string())]).set(1);
    reg.register("build_info", "Always 1; its label is the version of the running binary", build);
    // A client by its allow-list name, else its public key (not a secret); names shared by
    // several keys add up. Every key on the list has a series, 0 when it has no session, so
    // that a client's series goes to 0 instead of vanishing.
    let clients = Family::<Labels, Gauge>::default();
    for peer in list.iter() {
        let _ = clients.get_or_create(&vec![("client", peer.name.clone().unwrap_or_else(|| peer.key.to_string()))]);
    }
    for (key, n) in stats.sessions_per_key() {
        let name = list.lookup(&key).and_then(|p| p.name.clone()).unwrap_or_else(|| key.to_string());
        clients.get_or_create(&vec![("client", name)]).inc_by(i64::try_from(n).unwrap_or(i64::MAX));
    }
    reg.register(
        "client_sessions",
        "Sessions this process holds now per client (allow-list name, or public key); after an upgrade an earlier process's are not in it (holdfast_earlier_process_sessions)",
        clients,
    );
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
        let socket = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let (local, _task) =
            serve(socket, listener.stats_handle(), listener.allow_list_handle(), std::future::pending()).unwrap();
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
