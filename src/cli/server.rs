//! `holdfast server`: a listener offering named services, with its allow-list reloaded on SIGHUP.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use holdfast::human::printable;
use holdfast::keys::AllowList;
use holdfast::net::Retirement;
use holdfast::tunnel::{self, Services};
use holdfast::ServerConfig;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tracing::{error, info, warn};

use crate::args::ServerArgs;
use crate::config::required;
use crate::keyfiles::load_keypair;
use crate::{metrics, session_config};

pub(crate) async fn server(args: ServerArgs) -> Result<()> {
    let listen = required(args.listen.clone(), "listen", "server", "0.0.0.0:7700")?;
    let key = required(args.key.clone(), "key", "server", "keys/server.key")?;
    let authorized = required(args.authorized.clone(), "authorized", "server", "keys/authorized")?;
    if args.services.is_empty() && args.allow_connect.is_empty() && args.allow_listen.is_empty() {
        bail!("no service: give --service NAME=HOST:PORT (or `service = [\"NAME=HOST:PORT\"]` in [server] of a --config file), or --allow-connect / --allow-listen");
    }
    // Checked here, once the config file and the flags are merged: either may give either.
    if args.retire_after.is_some() && args.handover.is_none() {
        bail!("--retire-after (retire-after) bounds how long this process keeps its sessions after an upgrade handed its listener over, and there is no upgrade without --handover PATH: give --handover too (on the command line or as `handover = \"PATH\"` in [server]), or drop --retire-after");
    }
    let metrics = metrics::check_addr(args.metrics, args.metrics_public)?;
    let mut services = Services::new();
    for spec in &args.services {
        services.add_spec(spec).with_context(|| format!("--service {spec}"))?;
    }
    for rule in &args.allow_listen {
        services.allow_listen(rule.parse().with_context(|| format!("--allow-listen {}", printable(rule)))?);
    }
    for rule in &args.allow_connect {
        services.allow_connect(rule.parse().with_context(|| format!("--allow-connect {}", printable(rule)))?);
    }
    let defaults = holdfast::net::Limits::default();
    let (max_streams, max_handshakes, max_sessions) =
        raise_fd_limit(args.max_sessions, defaults.max_streams, args.max_handshakes);
    let keypair = load_keypair("--key", &key)?;
    let allow = AllowList::load(&authorized).map_err(|e| {
        if authorized.exists() {
            anyhow!("--authorized {e}")
        } else {
            anyhow!(
                "--authorized {e}; create it with one client public key per line (a client's PREFIX.pub from \
                 `holdfast keygen --out PREFIX`, or `holdfast pubkey` of its key), optionally followed by a name \
                 (see `holdfast server --help`)"
            )
        }
    })?;
    if allow.is_empty() {
        warn!(file = %authorized.display(), "the allow-list is empty: no client can connect");
    }
    let services = Arc::new(services);
    warn_unknown_services(&allow, &services);
    let mut cfg = ServerConfig::new(keypair, allow);
    cfg.session = session_config(&args.timers)?;
    cfg.limits.max_sessions = max_sessions;
    cfg.limits.max_sessions_per_key = args.max_sessions_per_key;
    cfg.limits.max_streams = max_streams;
    // Under a descriptor limit that lowered the server's streams, one key keeps the default
    // share of them (a quarter), so that it cannot take every slot.
    cfg.limits.max_streams_per_key = cfg.limits.max_streams_per_key.min((max_streams / 4).max(1));
    cfg.limits.max_handshakes = max_handshakes;
    cfg.limits.handshakes_per_sec_per_ip = args.handshake_rate.max(1);
    cfg.limits.buffer_budget = usize::try_from(args.buffer_budget).context("--buffer-budget is too large")?;
    let per_key = buffer_per_key(args.buffer_budget, args.buffer_per_key);
    cfg.limits.buffer_per_key = usize::try_from(per_key).context("--buffer-per-key is too large")?;
    cfg.limits.session_expiry = args.session_expiry;
    cfg.server_id = args.server_id;
    cfg.proxy_from = args.proxy_from.clone();
    cfg.lanes = lanes()?;
    let public = cfg.keypair.public;
    // Watch SIGHUP before saying "ready": until then, its default action would end the server.
    let hangups = signal(SignalKind::hangup()).context("cannot watch for SIGHUP")?;
    // The same for the stop signals (below): a SIGTERM just after "ready" (`systemctl stop` at
    // once) would otherwise end the process without its drain, and leave its sockets' files.
    let mut term = signal(SignalKind::terminate()).context("cannot watch for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot watch for SIGINT")?;
    // Every socket is bound before this process takes the listener over from a running server:
    // if one cannot be, this process exits and the running one goes on serving. systemd is told
    // READY only after that.
    // Taking over from an older holdfast that keeps its metrics port until it exits: that one
    // already stopped accepting, so this one serves, and binds metrics once the port is free.
    let mut metrics_later = None;
    // An upgrade's new process takes its predecessor's status socket over, too.
    let mut taking_over = false;
    let (listener, metrics) = match &args.handover {
        Some(path) => {
            let mut upgrade = holdfast::net::prepare_handover(listen, path).await?;
            taking_over = upgrade.from_pid().is_some();
            let metrics = match metrics {
                Some(addr) => match upgrade.take_socket(addr) {
                    Some(socket) => {
                        Some(tokio::net::TcpListener::from_std(socket).context("--metrics: the socket handed over")?)
                    }
                    None => match metrics::bind(addr).await {
                        Ok(socket) => Some(socket),
                        Err(e) if upgrade.from_older_version() => {
                            warn!(metrics = %addr, error = %format!("{e:#}"), "the earlier server process (an older version) still holds the metrics port; metrics will be served here once it exits");
                            metrics_later = Some(addr);
                            None
                        }
                        Err(e) => return Err(e),
                    },
                },
                None => None,
            };
            (upgrade.commit(cfg).await?, metrics)
        }
        None => {
            let metrics = match metrics {
                Some(addr) => Some(metrics::bind(addr).await?),
                None => None,
            };
            (holdfast::bind(listen, cfg).await?, metrics)
        }
    };
    let retirement = listener.retirement();
    // Set once a stop begins: an upgrade then would start a server that outlives the stop.
    let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let upgrades = upgrade_on_usr2(args.handover.is_some(), retirement.clone(), stopping.clone())?;
    let metrics = match metrics {
        Some(socket) => {
            if args.handover.is_some() {
                listener.hand_over_also(&socket).context("--metrics: cannot keep the socket for an upgrade")?;
            }
            let stop = retirement.clone();
            let stop = async move { stop.until_handed_over().await };
            Some(metrics::serve(socket, listener.stats_handle(), listener.allow_list_handle(), stop)?.1)
        }
        None => metrics_later.map(|addr| tokio::spawn(metrics::serve_when_free(addr, &listener))),
    };
    let _status = match &args.status {
        Some(path) => {
            let stats = listener.stats_handle();
            Some(crate::status::serve(path.clone(), taking_over, move |json| {
                crate::status::server_answer(&stats, json)
            })?)
        }
        None => None,
    };
    let offered: Vec<String> = services.iter().map(|(n, t)| format!("{n}={t}")).collect();
    let connect: Vec<String> = services.connect_rules().iter().map(ToString::to_string).collect();
    let connect = if connect.is_empty() { "none".to_string() } else { connect.join(",") };
    let listen: Vec<String> = services.listen_rules().iter().map(ToString::to_string).collect();
    let listen = if listen.is_empty() { "none".to_string() } else { listen.join(",") };
    let id = args.server_id.map_or_else(|| "none".to_string(), |n| n.to_string());
    let lbs: Vec<String> = args.proxy_from.iter().map(ToString::to_string).collect();
    let lbs = if lbs.is_empty() { "none".to_string() } else { lbs.join(",") };
    info!(listen = %listener.local_addr(), server_key = %public, services = %offered.join(","), allow_connect = %connect, allow_listen = %listen, server_id = %id, proxy_from = %lbs, pid = std::process::id(), "server ready");
    // Under systemd (Type=notify): ready, and this is the service's main process now (after a
    // handover, the new process takes that role from the old one).
    let _ = sd_notify::notify(&[sd_notify::NotifyState::MainPid(std::process::id()), sd_notify::NotifyState::Ready]);
    // The config file as it was read, to tell an operator who edits it and sends SIGHUP that
    // only the allow-list is reloaded.
    let config = args.config.clone().map(|p| {
        let text = std::fs::read(&p).unwrap_or_default();
        (p, text)
    });
    let reload = reload_on_hangup(hangups, listener.allow_list_handle(), authorized, services.clone(), config);
    // Ctrl-C or SIGTERM: stop accepting and let the tunnels open end within the drain time; a
    // second one ends the sessions still open at once, telling their clients (found by an
    // operator's day: exiting there and then left every client reconnecting to a closed port,
    // and its programs hanging, until its give-up time); a third one exits without telling.
    // The same two signal streams follow the stop from its first signal to its third: one made
    // after the first signal could miss a second that came before it (it did in CI).
    let (retire_after, drain) = (args.retire_after, args.drain_time);
    let (cut_tx, cut_rx) = tokio::sync::oneshot::channel::<()>();
    let cut_asked = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let cut_seen = cut_asked.clone();
    let stop = async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
            () = retired(retirement, retire_after) => return,
        }
        stopping.store(true, std::sync::atomic::Ordering::Relaxed);
        info!(drain = %holdfast::human::Rounded(drain), "stopping: no new sessions or tunnels; those open may run to their end for the drain time (signal again to end them at once)");
        tokio::spawn(async move {
            let mut again = async || {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
            };
            again().await;
            info!("second stop signal: ending the sessions still open now, their clients told the server stopped (signal again to exit without telling them)");
            cut_asked.store(true, std::sync::atomic::Ordering::Relaxed);
            let _ = cut_tx.send(());
            again().await;
            warn!("third stop signal: exiting now; the clients of sessions still open are not told");
            std::process::exit(130);
        });
    };
    // Resolves only when the second signal came (not when its sender is dropped).
    let cut = async move {
        if cut_rx.await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        r = tunnel::serve_until_cut(listener, services, stop, drain, cut) => {
            let left = r?;
            if left > 0 && cut_seen.load(std::sync::atomic::Ordering::Relaxed) {
                warn!(sessions = left, "the sessions still open were ended on the second stop signal (the clients attached are told the server stopped; a detached one finds nothing listening)");
            } else if left > 0 {
                warn!(sessions = left, "drain time over; the sessions still open were ended (the clients attached are told the server stopped; a detached one finds nothing listening)");
            } else {
                info!("every tunnel ended; exiting");
            }
        }
        r = reload => r?,
        r = upgrades => r?,
        r = async { match metrics { Some(task) => task.await, None => std::future::pending().await } } => {
            r.context("the metrics endpoint stopped")??;
        }
    }
    Ok(())
}

/// Descriptors kept for `accept`, the metrics and control sockets, logs and the handover.
const FD_RESERVE: u64 = 256;

/// Raises the soft file-descriptor limit for `max_sessions` sessions (their links),
/// `max_streams` streams (each may hold its service or forwarded connection), `handshakes`
/// connections in their handshake (two descriptors each, and the connections answered BUSY:
/// [`holdfast::net::Limits::handshake_descriptors`]) and a reserve, up to the hard limit (or
/// above it as root). Returns the streams, handshakes and sessions the limit holds:
/// `max_streams`, `handshakes` and `max_sessions`, or fewer when the limit is lower. Then a
/// stream past them is refused (RESET LIMIT), a handshake past them evicts the oldest or is
/// answered BUSY and a session past them is answered BUSY, instead of failing `accept` for
/// everyone: whatever strangers do, the descriptors of their connections stay within a quarter
/// of what the limit leaves beyond the reserve, and the three together within all of it.
fn raise_fd_limit(max_sessions: usize, max_streams: usize, handshakes: usize) -> (usize, usize, usize) {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let hs_fds = |n: usize| holdfast::net::Limits { max_handshakes: n, ..Default::default() }.handshake_descriptors();
    let fixed = (max_sessions as u64).saturating_add(hs_fds(handshakes)).saturating_add(FD_RESERVE);
    let need = fixed.saturating_add(max_streams as u64);
    let lim = getrlimit(Resource::Nofile);
    let hard = lim.maximum.unwrap_or(u64::MAX);
    // Above the hard limit only with privilege (root); otherwise up to the hard limit.
    let wanted = Rlimit { current: Some(need.max(lim.current.unwrap_or(0))), maximum: Some(need.max(hard)) };
    if lim.current.is_some_and(|c| c < need) && setrlimit(Resource::Nofile, wanted).is_err() {
        let _ = setrlimit(Resource::Nofile, Rlimit { current: lim.maximum, maximum: lim.maximum });
    }
    let Some(n) = getrlimit(Resource::Nofile).current.filter(|&n| n < need) else {
        return (max_streams, handshakes, max_sessions);
    };
    let spare = n.saturating_sub(FD_RESERVE);
    // Handshakes (strangers') get at most a ninth of the spare: 2 descriptors each and a
    // quarter as many BUSY answers take at most a quarter of it.
    let handshakes = handshakes.min(usize::try_from(spare / 9).unwrap_or(usize::MAX)).max(1);
    // Half of what is left after the reserve goes to streams, at least, so that neither sessions
    // nor streams take every descriptor.
    let streams = spare
        .saturating_sub((max_sessions as u64).saturating_add(hs_fds(handshakes)))
        .max(spare / 2)
        .min(max_streams as u64);
    // Sessions (a descriptor each, their links) get the rest: at least a quarter of the spare.
    let sessions = spare.saturating_sub(hs_fds(handshakes).saturating_add(streams));
    let sessions = usize::try_from(sessions).unwrap_or(usize::MAX).min(max_sessions).max(1);
    let msg = "the file-descriptor limit holds fewer sessions, streams and handshakes than the limits allow: those past it are refused; to allow them all, raise it (ulimit -n, or LimitNOFILE= under systemd)";
    // A limit that still holds thousands of streams is worth knowing only when looking for it.
    if streams < 1024 {
        warn!(limit = n, streams, handshakes, sessions, "{msg}");
    } else {
        tracing::debug!(limit = n, streams, handshakes, sessions, "{msg}");
    }
    (streams as usize, handshakes, sessions)
}

/// Resolves when this process has handed its listener over and has nothing left to do: its
/// last session ended, or `bound` passed since the handover (its sessions are then lost).
async fn retired(retirement: Retirement, bound: Option<std::time::Duration>) {
    retirement.until_handed_over().await;
    let limit = async {
        match bound {
            Some(b) => tokio::time::sleep(b).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        () = retirement.done() => info!("handed over, and this process's last session has ended; exiting"),
        () = limit => warn!(sessions = retirement.sessions(), "--retire-after has passed since the handover; exiting with sessions still open (their clients will be told they are lost)"),
    }
}

/// On SIGUSR2, starts a new server process (the binary now at this one's path, with this one's
/// arguments), which takes the listener over through --handover. If it exits before it has
/// taken over (a bad new binary or configuration), this process says so and goes on serving.
/// Once `stopping` is set (SIGTERM), SIGUSR2 is ignored: the new process would outlive the stop.
fn upgrade_on_usr2(
    enabled: bool,
    retirement: Retirement,
    stopping: Arc<std::sync::atomic::AtomicBool>,
) -> Result<impl std::future::Future<Output = Result<()>>> {
    let mut usr2 = signal(SignalKind::user_defined2()).context("cannot watch for SIGUSR2")?;
    Ok(async move {
        while usr2.recv().await.is_some() {
            if !enabled {
                warn!("SIGUSR2 ignored: start the server with --handover PATH to upgrade it without losing sessions");
                continue;
            }
            if stopping.load(std::sync::atomic::Ordering::Relaxed) {
                warn!("SIGUSR2 ignored: this server is stopping (it was told to stop before the upgrade); start the new version once it has stopped");
                continue;
            }
            if retirement.handed_over() {
                warn!("SIGUSR2 ignored: this process has already handed over; signal the newest one");
                continue;
            }
            let exe = match std::env::current_exe() {
                // A binary replaced on disk (the upgrade) reads as "PATH (deleted)": run PATH.
                Ok(p) => PathBuf::from(p.to_string_lossy().trim_end_matches(" (deleted)")),
                Err(e) => {
                    error!(error = %e, "SIGUSR2: cannot find this program's path; start the new server by hand with the same --handover");
                    continue;
                }
            };
            let mut cmd = tokio::process::Command::new(&exe);
            cmd.args(std::env::args_os().skip(1)).stdin(std::process::Stdio::null());
            match cmd.spawn() {
                Ok(mut child) => {
                    let pid = child.id().unwrap_or(0);
                    info!(new_pid = pid, exe = %exe.display(), "SIGUSR2: started a new server process to take over");
                    let r = retirement.clone();
                    tokio::spawn(async move {
                        tokio::select! {
                            status = child.wait() => {
                                if !r.handed_over() {
                                    let status = status.map_or_else(|e| e.to_string(), |s| s.to_string());
                                    error!(new_pid = pid, %status, "the new server process exited before taking over (see its error above); this one goes on serving");
                                }
                            }
                            () = r.until_handed_over() => {}
                        }
                    });
                }
                Err(e) => error!(exe = %exe.display(), error = %e, "SIGUSR2: cannot start the new server process"),
            }
        }
        std::future::pending().await
    })
}

/// Reloads the allow-list file on every SIGHUP. A file that does not load (missing, malformed,
/// writable by group or others, owned by another user: see `holdfast::keys`) is reported and the
/// list in force stays. Sessions of keys no longer on the list are ended (their clients are
/// told that the key is no longer allowed).
async fn reload_on_hangup(
    mut hangups: Signal,
    handle: holdfast::net::AllowListHandle,
    path: PathBuf,
    services: Arc<Services>,
    config: Option<(PathBuf, Vec<u8>)>,
) -> Result<()> {
    while hangups.recv().await.is_some() {
        // Found by an operator's day: a service removed from server.toml, SIGHUP, and the
        // service still served, with nothing in the log to say the edit was not read.
        if let Some((file, text)) = &config {
            if std::fs::read(file).is_ok_and(|now| now != *text) {
                warn!(config = %file.display(), "the config file changed since the server started: SIGHUP reloads only the allow-list; its other settings (services, rules, limits) take effect with an upgrade (SIGUSR2, `systemctl reload` under the unit) or a restart");
            }
        }
        match AllowList::load(&path) {
            Ok(list) => {
                if list.is_empty() {
                    warn!(file = %path.display(), "the reloaded allow-list is empty: no new client can connect");
                }
                warn_unknown_services(&list, &services);
                let n = list.len();
                let ended = handle.set(list);
                info!(file = %path.display(), clients = n, ended_sessions = ended, "allow-list reloaded");
            }
            Err(e) => {
                metrics::RELOAD_FAILURES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                error!(error = %e, "allow-list not reloaded; the previous one stays in force")
            }
        }
    }
    std::future::pending().await
}

/// Warns about `services=` entries of the allow-list that name no service of this server (a
/// typo, or a service not offered any more): those keys are refused them.
fn warn_unknown_services(allow: &AllowList, services: &Services) {
    for peer in allow.iter() {
        for name in peer.services.iter().flatten().filter(|s| services.get(s).is_none()) {
            let client = holdfast::net::client_label(peer.name.as_deref(), &peer.key);
            warn!(%client, service = %name, "the allow-list gives this client a service the server does not offer");
        }
    }
    // A rule limited to a client name that no line carries gives nothing (yet): say so, it is
    // more often a typo than a client still to come.
    let rules = [("--allow-connect", services.connect_rules()), ("--allow-listen", services.listen_rules())];
    for (flag, rules) in rules {
        for rule in rules {
            if let Some(name) = rule.client().filter(|n| !allow.iter().any(|p| p.name.as_deref() == Some(*n))) {
                warn!(client = %name, rule = %rule, "{flag} names a client that no allow-list line names: it gives nothing until one does");
            }
        }
    }
}

/// One key's share of the buffer budget: as given, at most half of the budget (a share as large
/// as the budget, say after the budget alone was lowered, would let one key take the memory of
/// every other); a quarter of the budget if not given.
fn buffer_per_key(budget: u64, given: Option<u64>) -> u64 {
    let half = budget / 2;
    match given {
        None => budget / 4,
        Some(n) if n > half => {
            warn!(
                buffer_per_key = %crate::status::bytes(n),
                buffer_budget = %crate::status::bytes(budget),
                using = %crate::status::bytes(half),
                "--buffer-per-key is more than half of --buffer-budget: one client key could hold the memory every other key needs; it is lowered to half. To let one key hold more, raise --buffer-budget too"
            );
            half
        }
        Some(n) => n,
    }
}

/// Lanes per worker thread. A session shares its lane's thread with the others on it, which
/// take turns (cooperatively); lanes, threads of their own, are given the CPUs by the kernel,
/// which lets one that wakes for a keystroke in ahead of one moving bulk data. With more lanes
/// than CPUs, sessions share a lane only when there are many: on a 2-CPU server, a round trip
/// through one session under another's bulk download took 0.2 ms on lanes of their own and
/// 0.75 ms on a shared one (BENCHMARKS.md, *Stop 35*). An idle lane costs a thread and no CPU.
const LANES_PER_WORKER: usize = 4;

/// The server's lanes ([`holdfast::net::Lanes`]): [`LANES_PER_WORKER`] per worker thread of its
/// runtime (one per CPU, or `TOKIO_WORKER_THREADS`), or as many as `HOLDFAST_LANES` says;
/// `HOLDFAST_LANES=0` runs sessions on the runtime's workers instead (for comparison).
fn lanes() -> anyhow::Result<Option<holdfast::net::Lanes>> {
    let n = match std::env::var("HOLDFAST_LANES") {
        Ok(v) => v.parse::<usize>().map_err(|_| {
            anyhow::anyhow!("HOLDFAST_LANES is {v:?}: set it to a number of threads (0: none), or unset it")
        })?,
        Err(_) => LANES_PER_WORKER * tokio::runtime::Handle::current().metrics().num_workers(),
    };
    if n == 0 {
        return Ok(None);
    }
    let lanes = holdfast::net::Lanes::start(n).context("cannot start the threads that run sessions")?;
    Ok(Some(lanes))
}

#[cfg(test)]
mod tests {
    use super::buffer_per_key;

    /// A key's share is a quarter of the budget unless given, and never above half of it.
    #[test]
    fn a_keys_share_follows_the_budget_and_never_exceeds_half_of_it() {
        const MIB: u64 = 1 << 20;
        assert_eq!(buffer_per_key(1024 * MIB, None), 256 * MIB);
        assert_eq!(buffer_per_key(64 * MIB, None), 16 * MIB);
        assert_eq!(buffer_per_key(64 * MIB, Some(256 * MIB)), 32 * MIB);
        assert_eq!(buffer_per_key(64 * MIB, Some(32 * MIB)), 32 * MIB);
        assert_eq!(buffer_per_key(64 * MIB, Some(8 * MIB)), 8 * MIB);
    }
}
