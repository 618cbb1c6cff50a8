//! `holdfast client` (a local forward) and `holdfast connect` (one stream on stdio).

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use holdfast::human::printable;
use holdfast::net::{LinkEvent, LinkStatus, Recovery, RecoveryPolicy, Rounded};
use holdfast::proto::Cipher;
use holdfast::tunnel;
use holdfast::ClientConfig;
use tracing::{debug, error, info, warn};

use crate::args::{CipherArg, ClientArgs, ClientCommon, ConnectArgs, Local, OnFault};
use crate::config::required;
use crate::keyfiles::{load_keypair, load_server_key};
use crate::{session_config, term};

/// The server's address and the client's configuration: the required flags checked (after the
/// config file was merged) and the keys loaded.
/// With `--on-fault ask`, a "no" fails the stream for `client` (`decline` false). For `connect`
/// (`decline` true) it is told to `connect` instead ([`term::DECLINED`]), which ends the
/// session while the driver goes on reconnecting, so that the server hears of the end too.
fn client_config(c: &ClientCommon, decline: bool) -> Result<(String, ClientConfig)> {
    let server = required(c.server.clone(), "server", "client", "host:7700")?;
    let server_key = required(c.server_key.clone(), "server-key", "client", "keys/server.pub")?;
    let key = required(c.key.clone(), "key", "client", "keys/laptop.key")?;
    if let Some(service) = &c.service {
        tunnel::check_name(service)?;
    }
    let mut cfg = ClientConfig::new(load_keypair("--key", &key)?, load_server_key(&server_key)?);
    cfg.session = session_config(&c.timers)?;
    cfg.recovery = RecoveryPolicy { give_up_after: c.give_up, ..RecoveryPolicy::default() };
    cfg.cipher = match c.cipher {
        CipherArg::Auto => Cipher::preferred(),
        CipherArg::Aes256Gcm => Cipher::AesGcm,
        CipherArg::Chacha20Poly1305 => Cipher::ChaChaPoly,
    };
    if let OnFault::Ask = c.on_fault {
        cfg.recovery = cfg.recovery.with_hook(move |lost| async move {
            if decline && term::DECLINED.get().is_some() {
                // Already declined: the driver only reconnects to tell the server.
                return Recovery::Recover;
            }
            let cause = lost.cause.clone();
            let answer = tokio::task::spawn_blocking(move || term::ask(&cause)).await.unwrap_or(Recovery::Fail);
            if answer == Recovery::Fail && decline {
                let _ = term::DECLINED.set(lost.cause);
                term::DECLINE.notify_one();
                return Recovery::Recover;
            }
            answer
        });
    }
    Ok((server, cfg))
}

/// Logs a stream's link event, one line per event. `from` is the local program's address (a
/// forward); `None` for the stream on stdio.
fn log_event(from: Option<SocketAddr>, ev: LinkEvent) {
    let from = from.map(|a| a.to_string()).unwrap_or_else(|| "stdio".into());
    match ev {
        LinkEvent::Lost(l) => warn!(%from, cause = %printable(&l.cause), faults = l.faults, "link lost; reconnecting"),
        LinkEvent::Resumed { after, replayed_sent, replayed_received, .. } => {
            info!(%from, after = %Rounded(after), replayed_sent, replayed_received, "link resumed")
        }
        LinkEvent::Suspect { quiet } => {
            warn!(%from, quiet = %Rounded(quiet), "link suspect (no answer); trying a new connection")
        }
        LinkEvent::NetworkChanged => {
            warn!(%from, "link suspect: the network changed (an address or route, or the machine woke); trying a new connection")
        }
        LinkEvent::Healthy => info!(%from, "link answering again"),
        LinkEvent::Failed { reason } if reason.starts_with("stream aborted") => {
            info!(%from, reason = %printable(&reason), "stream ended by this end")
        }
        LinkEvent::Failed { reason } => error!(%from, reason = %printable(&reason), "stream failed"),
        // An attempt starts every 250 ms during an outage: a line at 4, 8, 16… says that it is
        // still trying (as `connect`'s status does) without four lines a second.
        LinkEvent::Reconnecting { attempt, elapsed } if attempt >= 4 && attempt.is_power_of_two() => {
            info!(%from, attempt, elapsed = %Rounded(elapsed), "still reconnecting")
        }
        LinkEvent::Reconnecting { attempt, elapsed } if attempt > 1 => {
            debug!(%from, attempt, elapsed = %Rounded(elapsed), "still reconnecting")
        }
        _ => {}
    }
}

/// Resolves on SIGTERM (never, if it cannot be watched).
async fn terminated() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut s) => drop(s.recv().await),
        Err(_) => std::future::pending().await,
    }
}

pub(crate) async fn client(args: ClientArgs) -> Result<()> {
    let c = &args.common;
    if args.local.is_empty() && args.socks.is_none() && args.remote.is_empty() {
        bail!("nothing to forward: give --local HOST:PORT[=SERVICE] (or `local = [\"HOST:PORT=SERVICE\"]` in [client] of a --config file), --socks or --remote");
    }
    let (server, cfg) = client_config(c, false)?;
    raise_fd_limit();
    let mut forwards = Vec::new();
    let mut direct = Vec::new();
    for local in &args.local {
        let (addr, service) = match local {
            Local::Service { addr, service } => (addr, service),
            Local::Connect { addr, host, port } => {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("--local {addr}:{host}:{port}: cannot listen"))?;
                direct.push((listener, host.clone(), *port));
                continue;
            }
        };
        let Some(service) = service.clone().or_else(|| c.service.clone()) else {
            bail!("--local {addr}: no service; give --local {addr}=SERVICE, or --service NAME for every --local");
        };
        let listener =
            tokio::net::TcpListener::bind(addr).await.with_context(|| format!("--local {addr}: cannot listen"))?;
        forwards.push((listener, service));
    }
    let mut shown = crate::status::ClientStatus::new(server.clone(), !args.no_mux);
    for (listener, service) in &forwards {
        shown.add("local", listener.local_addr()?.to_string(), format!("service {service}"));
    }
    if let Some(addr) = &args.socks {
        shown.add("socks", addr.clone(), "destinations the server allows".into());
    }
    for (bind, target) in &args.remote {
        shown.add("remote", format!("{bind} (on the server)"), target.clone());
    }
    let _status = match &args.status {
        Some(path) => {
            let shown = shown.clone();
            Some(crate::status::serve(path.clone(), false, move |json| shown.answer(json))?)
        }
        None => None,
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let multiplexed = !args.no_mux;
    // Set when this client ends its session itself, on its way out.
    let exiting = Arc::new(AtomicBool::new(false));
    let ending = exiting.clone();
    tokio::spawn(async move {
        while let Some((from, ev)) = rx.recv().await {
            shown.event(&ev);
            // The forwards' session ended cleanly (the server stopped, say): said once, since
            // the next connection opens another (an operator saw nothing in the log).
            if multiplexed && matches!(ev, LinkEvent::Closed) && !ending.load(Ordering::Relaxed) {
                info!(server = %from, "session closed; a new one opens with the next connection");
            }
            log_event(Some(from), ev);
        }
    });
    // One multiplexed session with the server carries every forward's connections.
    let pool = (!args.no_mux).then(|| tunnel::MuxPool::new(server.clone(), cfg.clone(), Some(tx.clone())));
    // Each service is asked for once before the forwards start, so that a wrong key, name or
    // address fails now rather than at the first connection. With multiplexing, the check is a
    // stream of the forwards' own session, and the forwards start once the session is open
    // without waiting for the answers: a refusal still ends the client with its reason.
    let mut checks = tokio::task::JoinSet::new();
    if !args.no_check {
        let mut checked = std::collections::BTreeSet::new();
        for (_, service) in &forwards {
            if !checked.insert(service.clone()) {
                continue;
            }
            match &pool {
                Some(pool) => {
                    let answer = pool.check(service).await?;
                    let service = service.clone();
                    checks.spawn(async move { answer.await.map(|()| service) });
                }
                None => {
                    let probe = tunnel::open(&server, cfg.clone(), service).await?;
                    // A normal close (both ends of the stream finished), not an abort that the
                    // server would log as a failed tunnel; it needs no waiting for.
                    tokio::spawn(async move {
                        if let Err(e) = tunnel::finish(probe, 1 << 20).await {
                            tracing::debug!(error = %printable(&e.to_string()), "start-up check did not end cleanly");
                        }
                    });
                }
            }
        }
    }
    let mut running = tokio::task::JoinSet::new();
    if let Some(addr) = &args.socks {
        let Some(pool) = pool.clone() else { bail!("--socks needs multiplexing: drop --no-mux") };
        let listener =
            tokio::net::TcpListener::bind(addr).await.with_context(|| format!("--socks {addr}: cannot listen"))?;
        let at = listener.local_addr()?;
        if !at.ip().to_canonical().is_loopback() {
            warn!(socks = %at, "--socks listens on an address that is not a loopback address: anyone who can reach it can use this key's --allow-connect rights into the server's networks (SOCKS5 here has no authentication); give 127.0.0.1:PORT or [::1]:PORT unless that is what you want");
        }
        info!(socks = %at, server = %server, "dynamic forwarding (SOCKS5)");
        running.spawn(tunnel::socks(listener, pool));
    }
    for (bind, target) in &args.remote {
        let Some(pool) = pool.clone() else { bail!("--remote needs multiplexing: drop --no-mux") };
        let (bind, target) = (bind.clone(), target.clone());
        running.spawn(async move {
            tunnel::remote(pool, bind, target).await;
            Ok(())
        });
    }
    for (listener, host, port) in direct {
        let Some(pool) = pool.clone() else { bail!("--local PORT:HOST:HOSTPORT needs multiplexing: drop --no-mux") };
        info!(local = %listener.local_addr()?, server = %server, to = %printable(&format!("{host}:{port}")), "forwarding (connected by the server)");
        running.spawn(tunnel::forward_connect(listener, pool, host, port));
    }
    // A forward whose service is being checked is said once the server answered for it (a
    // service the server refuses ends the client instead, and was never forwarded to).
    let mut unconfirmed: std::collections::HashMap<String, Vec<std::net::SocketAddr>> = Default::default();
    for (listener, service) in forwards {
        let local = listener.local_addr()?;
        if pool.is_some() && !args.no_check {
            unconfirmed.entry(service.clone()).or_default().push(local);
        } else {
            info!(%local, server = %server, %service, "forwarding");
        }
        let forward =
            tunnel::forward_via(listener, server.clone(), cfg.clone(), service, Some(tx.clone()), pool.clone());
        running.spawn(forward);
    }
    let outcome: Result<()> = async {
        let lost = async {
            match &pool {
                Some(p) => p.failed().await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(lost);
        loop {
            tokio::select! {
                Some(r) = checks.join_next() => {
                    let service = r.context("the start-up check stopped")??;
                    for local in unconfirmed.remove(&service).unwrap_or_default() {
                        info!(%local, server = %server, %service, "forwarding");
                    }
                }
                Some(r) = running.join_next() => break Ok(r.context("a forward stopped")??),
                reason = &mut lost => bail!(
                    "the session with the server failed: {}. Every forward's connections ended with it, and this client does not start a new session unasked; run it again for a new one (Restart=on-failure under systemd does)",
                    printable(&reason)
                ),
                _ = tokio::signal::ctrl_c() => {
                    info!("interrupted; exiting");
                    break Ok(());
                }
                _ = terminated() => {
                    info!("terminated; exiting");
                    break Ok(());
                }
            }
        }
    }
    .await;
    // End the shared session cleanly, whatever ended the client (a refused start-up check
    // too), so that the server frees it (and any reverse forward's listener) now rather than
    // holding it for a resume until its expiry.
    if let Some(pool) = pool {
        exiting.store(true, Ordering::Relaxed);
        if !pool.close().await && outcome.is_ok() {
            info!("the server could not be told this client is gone (no link to it now): it keeps the session until the session's expiry");
        }
    }
    outcome
}

pub(crate) async fn connect(args: ConnectArgs, quiet: bool) -> Result<()> {
    let c = &args.common;
    // stdout carries only stream bytes. On a terminal (ssh's, in raw mode) link events go to
    // the window title; otherwise they are logged.
    let Some(service) = &c.service else {
        bail!("--service NAME is required: the service to reach on the server (or `service = \"NAME\"` in [client] of a --config file)")
    };
    let (server, cfg) = client_config(c, true)?;
    carry_stdio(&server, cfg, service, matches!(c.on_fault, OnFault::Ask), quiet).await
}

/// How long `holdfast ssh`'s connections to its server are refused before it is taken as gone.
const SSH_SERVER_GONE: std::time::Duration = std::time::Duration::from_secs(30);

/// `holdfast ssh-proxy FILE`: the ProxyCommand of `holdfast ssh`, which carries ssh's
/// connection to the remote server's one service as `connect` does, with the session's keys
/// from the session file (read once and removed).
pub(crate) async fn ssh_proxy(file: &std::path::Path, quiet: bool) -> Result<()> {
    let session = crate::ssh::session::Session::take(file)?;
    let mut cfg = ClientConfig::new(session.keypair, session.server_key);
    // The remote server serves this one session and never comes back once it has ended (its
    // expiry, a kill, a reboot of its host): refusals for half a minute mean it is gone, where
    // the client would otherwise try until its give-up time with a frozen terminal.
    cfg.recovery = RecoveryPolicy {
        give_up_after: session.give_up,
        refused_ends_after: Some(SSH_SERVER_GONE),
        ..RecoveryPolicy::default()
    };
    carry_stdio(&session.server, cfg, "ssh", false, quiet).await
}

/// How long `connect` goes on trying to end its session on the server, silently, after the
/// program on stdio has gone during an outage.
const CLOSE_LINGER: std::time::Duration = std::time::Duration::from_secs(60);

/// Opens a stream to `service` and carries it on stdin and stdout until both ends are done, or
/// the program on stdio is gone. Once it is gone (ssh exited, in any way), nothing more is
/// shown or said: the session is ended on the server (bounded) and this returns.
async fn carry_stdio(server: &str, cfg: ClientConfig, service: &str, asking: bool, quiet: bool) -> Result<()> {
    let stream = tunnel::open(server, cfg, service).await?;
    let events = stream.events();
    let (gone_tx, gone) = tokio::sync::watch::channel(false);
    if std::io::stderr().is_terminal() {
        if !quiet {
            tokio::spawn(term::show_events(events, asking, gone.clone()));
        }
    } else {
        let mut gone = gone.clone();
        tokio::spawn(async move {
            let mut events = events;
            loop {
                tokio::select! {
                    ev = events.recv() => match ev {
                        Ok(ev) => log_event(None, ev),
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                        Err(_) => return,
                    },
                    _ = gone.wait_for(|g| *g) => return,
                }
            }
        });
    }
    let hangup = async {
        tokio::select! {
            () = hangup() => {}
            () = term::DECLINE.notified() => {}
        }
        let _ = gone_tx.send(true);
    };
    let mut status = stream.status();
    let result = tunnel::stdio(stream, hangup).await;
    if let Some(cause) = term::DECLINED.get() {
        // ssh is still there, reading its connection: it ends when stdin and stdout close.
        let_go(false);
        term::said(&format!(
            "the link was lost ({}) and you answered n to recovering it: the session is over; \
             the server is told so once the link is back (this process goes on trying for up to {} in the background)",
            printable(cause),
            Rounded(CLOSE_LINGER)
        ));
    }
    if *gone.borrow() {
        // The program is gone while the link was down: the session is still the server's
        // (a shell behind it, for ssh). Keep trying, silently and bounded, to tell the server
        // that it is over once the link is back.
        let ended = |s: &LinkStatus| matches!(s, LinkStatus::Closed | LinkStatus::Failed(_));
        if !ended(&status.borrow()) {
            // Hold none of the caller's pipes meanwhile (a script reading ssh's stderr would
            // wait for this process to let go of it).
            let_go(true);
            let _ = tokio::time::timeout(CLOSE_LINGER, status.wait_for(ended)).await;
        }
    }
    match result {
        // The program reading stdout is gone (ssh killed, without a SIGHUP): as a hang-up.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        _ if *gone.borrow() => Ok(()),
        Err(e) => Err(e.into()),
        Ok(_) => Ok(()),
    }
}

/// Puts /dev/null in place of stdin and stdout (and, with `stderr`, of stderr too), so that
/// this process no longer holds the pipes of the program it served.
fn let_go(stderr: bool) {
    if let Ok(null) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null") {
        let _ = rustix::stdio::dup2_stdout(&null);
        let _ = rustix::stdio::dup2_stdin(&null);
        if stderr {
            let _ = rustix::stdio::dup2_stderr(&null);
        }
    }
}

/// Resolves when the program on the other end of stdio is gone: ssh sends its ProxyCommand
/// `SIGHUP` when it exits; `SIGTERM` and Ctrl-C mean the same here. If the signals cannot be
/// watched, never resolves (the process then ends by the signal's default action).
async fn hangup() {
    use tokio::signal::unix::{signal, SignalKind};
    let watch = |k| signal(k).ok();
    let (Some(mut hup), Some(mut term), Some(mut int)) =
        (watch(SignalKind::hangup()), watch(SignalKind::terminate()), watch(SignalKind::interrupt()))
    else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = hup.recv() => {}
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    // The stream now finishes within a few seconds; a second SIGTERM or Ctrl-C ends the process
    // at once. A second SIGHUP does not: one often comes twice (from the terminal's hang-up to
    // the process group, and from ssh as it exits), and ending at once would leave the session,
    // and the shell behind it, on the server until it expires.
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = hup.recv() => continue,
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            std::process::exit(130);
        }
    });
}

/// Raises the soft limit on file descriptors to the hard one: every connection a forward
/// carries is a descriptor (two for `--local HOST:PORT:…`, none of them the server's to bound),
/// and the usual soft limit of 1,024 would make the 1,000th program's connection fail.
fn raise_fd_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let lim = getrlimit(Resource::Nofile);
    if let (Some(now), Some(hard)) = (lim.current, lim.maximum) {
        if now < hard {
            let _ = setrlimit(Resource::Nofile, Rlimit { current: Some(hard), maximum: Some(hard) });
        }
    }
}
