//! Authorization through a real server (issue 21, items 4, 6 and 12): what a key's allow-list
//! line gives it (services, dynamic and reverse forwarding), rights looked up from the list in
//! force on every request, and a key removed from the list cut off at once.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::chaos::ChaosProxy;
use common::cli::{echo_service, LIMIT};
use common::harness::fast_session;
use holdfast::keys::{AllowList, Keypair};
use holdfast::net::AllowListHandle;
use holdfast::proto::SessionError;
use holdfast::tunnel::{self, MuxPool, Services, TunnelError};
use holdfast::{ClientConfig, LinkStatus, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::timeout;

/// A server offering `echo` (and `other`, the same echo) with `--allow-connect` and
/// `--allow-listen` rules `rules`, allowing the keys of `list` (its text, `{0}`, `{1}`... for
/// the keys); the keys, its address and its allow-list handle.
struct Server {
    keys: Vec<Keypair>,
    server: Keypair,
    addr: SocketAddr,
    allow: AllowListHandle,
    stats: holdfast::net::StatsHandle,
    echo: SocketAddr,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Server {
    async fn start(list: &str, rules: &[&str]) -> Server {
        let keys: Vec<Keypair> = (0..4).map(|_| Keypair::generate()).collect();
        let server = Keypair::generate();
        let echo = echo_service().await;
        let mut services = Services::new();
        services.add("echo", &echo.to_string()).unwrap();
        services.add("other", &echo.to_string()).unwrap();
        for r in rules {
            services.allow_connect(r.parse().unwrap());
            services.allow_listen(r.parse().unwrap());
        }
        let allow = AllowList::parse(&fill(list, &keys)).unwrap();
        let mut cfg = ServerConfig::new(server.clone(), allow);
        cfg.session = fast_session();
        let listener = holdfast::bind("127.0.0.1:0", cfg).await.unwrap();
        let (addr, allow, stats) = (listener.local_addr(), listener.allow_list_handle(), listener.stats_handle());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let stop = async move {
            let _ = rx.await;
        };
        tokio::spawn(tunnel::serve_until(listener, Arc::new(services), stop, Duration::ZERO));
        Server { keys, server, addr, allow, stats, echo, _stop: tx }
    }

    fn client(&self, i: usize) -> ClientConfig {
        let mut cfg = ClientConfig::new(self.keys[i].clone(), self.server.public);
        cfg.session = fast_session();
        cfg.recovery.backoff_initial = Duration::from_millis(10);
        cfg.recovery.backoff_max = Duration::from_millis(200);
        cfg
    }

    fn pool(&self, i: usize) -> Arc<MuxPool> {
        MuxPool::new(self.addr.to_string(), self.client(i), None)
    }

    fn set(&self, list: &str) -> usize {
        self.allow.set(AllowList::parse(&fill(list, &self.keys)).unwrap())
    }
}

/// `list` with `{i}` replaced by key `i`.
fn fill(list: &str, keys: &[Keypair]) -> String {
    keys.iter().enumerate().fold(list.to_string(), |t, (i, k)| t.replace(&format!("{{{i}}}"), &k.public.to_string()))
}

/// Sends a few bytes on `s` and reads them back (the echo service), then closes it.
async fn echoes(mut s: holdfast::Stream) {
    s.write_all(b"ping").await.unwrap();
    let mut got = [0u8; 4];
    s.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"ping");
}

/// What a pool's service, connect and listen requests get: Ok(()) or the refusal.
async fn service(pool: &MuxPool, name: &str) -> Result<(), String> {
    match pool.open(name).await {
        Ok(Some(s)) => {
            echoes(s).await;
            Ok(())
        }
        Ok(None) => panic!("the server does not multiplex"),
        Err(e) => Err(e.to_string()),
    }
}

async fn connect(pool: &MuxPool, to: SocketAddr) -> Result<(), String> {
    match pool.open_connect(&to.ip().to_string(), to.port()).await {
        Ok(Some(s)) => {
            echoes(s).await;
            Ok(())
        }
        Ok(None) => panic!("the server does not multiplex"),
        Err(e) => Err(e.to_string()),
    }
}

async fn listen(pool: &MuxPool) -> Result<(), String> {
    match pool.open_listen("127.0.0.1:0").await {
        Ok(Some((_stream, at))) => {
            at.parse::<SocketAddr>().map_err(|e| format!("listened on {at:?}: {e}"))?;
            Ok(())
        }
        Ok(None) => panic!("the server does not multiplex"),
        Err(TunnelError::UnknownService(what)) => Err(format!("not allowed: {what}")),
        Err(e) => panic!("listen failed otherwise: {e}"),
    }
}

/// Item 4: `services=` restricts dynamic and reverse forwarding too. A restricted key's connect
/// and listen requests are refused (as "not allowed", status 1) while its service works; its
/// line's `forward=` or a rule naming its client gives them back; an unrestricted key has all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restricted_key_gets_forwarding_only_when_its_line_or_a_rule_gives_it() {
    timeout(LIMIT, async {
        let list = "{0} open\n{1} ci services=echo\n{2} bastion services=echo forward=connect,listen\n{3} named services=echo\n";
        let srv = Server::start(list, &["127.0.0.1:*", "named@127.0.0.1:*"]).await;
        let pools: Vec<_> = (0..4).map(|i| srv.pool(i)).collect();
        for (i, pool) in pools.iter().enumerate() {
            assert_eq!(service(pool, "echo").await, Ok(()), "key {i}: its service");
        }
        let not_allowed = Err("not allowed: 127.0.0.1:0".to_string());
        let restricted = &pools[1];
        assert!(connect(restricted, srv.echo).await.unwrap_err().contains("no service named"), "ci connected");
        assert_eq!(listen(restricted).await, not_allowed, "ci got a reverse listener");
        assert!(service(restricted, "other").await.is_err(), "ci reached another service");
        // The same session still serves its own service after the refusals.
        assert_eq!(service(restricted, "echo").await, Ok(()));
        for (i, who) in [(0, "open"), (2, "bastion (forward=)"), (3, "named (a rule names it)")] {
            assert_eq!(connect(&pools[i], srv.echo).await, Ok(()), "{who}: connect");
            assert_eq!(listen(&pools[i]).await, Ok(()), "{who}: listen");
        }
        for p in &pools {
            p.close().await;
        }
    })
    .await
    .expect("the test did not finish in time");
}

/// Item 6: rights follow the key in the list in force, on every request of a live session: a
/// key renamed by a reload loses the old name's `CLIENT@` rules and gets the new name's at its
/// next request, on the same session; a changed `services=` likewise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_changes_a_live_sessions_rights_at_its_next_request() {
    timeout(LIMIT, async {
        let srv = Server::start("{0} laptop services=echo\n{1} other\n", &["laptop@127.0.0.1:*"]).await;
        let pool = srv.pool(0);
        assert_eq!(connect(&pool, srv.echo).await, Ok(()), "laptop@ rule");
        assert_eq!(listen(&pool).await, Ok(()), "laptop@ rule");
        // Renamed: the session that opened as "laptop" is "phone" now.
        assert_eq!(srv.set("{0} phone services=echo\n{1} other\n"), 0, "no key was removed");
        assert!(connect(&pool, srv.echo).await.is_err(), "a renamed key kept its old name's connect rule");
        assert!(listen(&pool).await.is_err(), "a renamed key kept its old name's listen rule");
        assert_eq!(service(&pool, "echo").await, Ok(()));
        // Another key takes the name: the rule is its now, and still not the first key's.
        srv.set("{0} phone services=other\n{1} laptop\n");
        assert!(connect(&pool, srv.echo).await.is_err());
        assert!(service(&pool, "echo").await.is_err(), "services= changed, the session kept the old one");
        assert_eq!(service(&pool, "other").await, Ok(()));
        srv.set("{0} laptop services=echo\n{1} other\n");
        assert_eq!(connect(&pool, srv.echo).await, Ok(()), "the name given back");
        pool.close().await;
    })
    .await
    .expect("the test did not finish in time");
}

/// Item 12: removing a key ends its live session at once, and the client is told, as an error of
/// its own kind that is not retried: "the server no longer allows this key".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_keys_live_session_ends_with_not_allowed() {
    timeout(LIMIT, async {
        let srv = Server::start("{0} laptop\n{1} other\n", &[]).await;
        let addr = srv.addr.to_string();
        let mut stream = tunnel::open(&addr, srv.client(0), "echo").await.unwrap();
        let mut other = tunnel::open(&addr, srv.client(1), "echo").await.unwrap();
        assert_eq!(srv.set("{1} other\n"), 1, "one session ended");
        let err = stream.read(&mut [0u8; 16]).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied, "{err}");
        assert!(err.to_string().contains("the server no longer allows this key"), "{err}");
        let inner = err.get_ref().and_then(|e| e.downcast_ref::<SessionError>());
        assert_eq!(inner, Some(&SessionError::NotAllowed), "{err:?}");
        // The status watch is told by the driver, which may run just after the read saw the error.
        let mut status = stream.status();
        let status = status.wait_for(|s| matches!(s, LinkStatus::Failed(_))).await.unwrap().clone();
        assert!(matches!(&status, LinkStatus::Failed(r) if r.contains("no longer allows")), "{status:?}");
        // The other key's session goes on.
        other.write_all(b"still").await.unwrap();
        let mut got = [0u8; 5];
        other.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"still");
    })
    .await
    .expect("the test did not finish in time");
}

/// Item 12: a session that is detached when its key is removed cannot resume: the resume gets
/// REJECT 4, and the client ends with the same "no longer allows" error instead of resuming or
/// reporting a lost session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_keys_detached_session_cannot_resume() {
    timeout(LIMIT, async {
        let srv = Server::start("{0} laptop\n", &[]).await;
        let proxy = ChaosProxy::start(srv.addr).await.unwrap();
        let mut stream = tunnel::open(&proxy.addr().to_string(), srv.client(0), "echo").await.unwrap();
        // The link dies and no new one can reach the server: both ends are detached.
        proxy.refuse_new(true);
        proxy.kill_all();
        let mut status = stream.status();
        status.wait_for(|s| matches!(s, LinkStatus::Reconnecting { .. })).await.unwrap();
        assert_eq!(srv.set("# nobody\n"), 1, "the detached session was not ended");
        proxy.refuse_new(false);
        let end = status.wait_for(|s| matches!(s, LinkStatus::Failed(_))).await.unwrap().clone();
        assert!(matches!(&end, LinkStatus::Failed(r) if r.contains("the server no longer allows this key")), "{end:?}");
        let err = stream.read(&mut [0u8; 16]).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied, "{err}");
        assert!(proxy.connections_accepted() >= 2, "the client never tried to resume");
        // Counted as not allowed, not as a failure (found by an operator's day).
        let refused = srv.stats.stats().refused;
        assert!(refused.not_allowed >= 1 && refused.failed == 0, "{refused:?}");
    })
    .await
    .expect("the test did not finish in time");
}
