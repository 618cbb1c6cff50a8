//! What one client's requests can hold on the server, bounded: connections to its reverse
//! forwards' listeners (a descriptor each), and name look-ups for its connect requests (a
//! thread each, for as long as the system resolver takes).
//!
//! Reverse connections take a permit of their listener and one of their key *before* they are
//! accepted: past the bound the server does not accept, and the kernel's backlog holds the rest.
//! Look-ups take a permit of their session, of their key and of the server, and run on threads
//! of their own (never tokio's blocking pool; the services' targets are looked up apart, one
//! look-up at a time per target: [`super::service_lookup`]), within
//! [`TunnelLimits::lookup_timeout`]; a permit is given back only when its look-up has returned,
//! so a resolver that never answers holds at most the bounds.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use crate::keys::PublicKey;

/// The bounds on what clients' dynamic and reverse forwards hold on the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelLimits {
    /// Connections one reverse forward's listener holds at once (default 64).
    pub reverse_per_listener: usize,
    /// Connections all the reverse forwards of one key hold at once (default 256).
    pub reverse_per_key: usize,
    /// Name look-ups one session runs at once; more wait (default 4).
    pub lookups_per_session: usize,
    /// Name look-ups one key runs at once, all its sessions together; more wait (default 8).
    pub lookups_per_key: usize,
    /// Name look-ups the server runs at once for all clients; more wait (default 64).
    pub lookups: usize,
    /// How long a connect request waits for its look-up, its wait for a permit included
    /// (default 5 s); then it is refused.
    pub lookup_timeout: Duration,
}

impl Default for TunnelLimits {
    fn default() -> Self {
        TunnelLimits {
            reverse_per_listener: 64,
            reverse_per_key: 256,
            lookups_per_session: 4,
            lookups_per_key: 8,
            lookups: 64,
            lookup_timeout: Duration::from_secs(5),
        }
    }
}

/// A name resolver: `(host, port)` to addresses, called on a thread of its own.
pub type ResolveFn = dyn Fn(&str, u16) -> io::Result<Vec<SocketAddr>> + Send + Sync;

/// Permits per key, each key's semaphore kept only while someone holds or waits for it.
pub(super) struct KeyedPermits {
    per_key: usize,
    map: Mutex<HashMap<PublicKey, Arc<Semaphore>>>,
}

impl KeyedPermits {
    fn new(per_key: usize) -> Arc<Self> {
        Arc::new(KeyedPermits { per_key: per_key.max(1), map: Mutex::default() })
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<PublicKey, Arc<Semaphore>>> {
        self.map.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Waits for one of `key`'s permits.
    pub(super) async fn acquire(self: &Arc<Self>, key: PublicKey) -> KeyPermit {
        let sem = self.map().entry(key).or_insert_with(|| Arc::new(Semaphore::new(self.per_key))).clone();
        let permit = sem.clone().acquire_owned().await.ok();
        KeyPermit { owner: self.clone(), key, sem, permit }
    }

    /// Keys with a permit held or awaited (for tests).
    #[cfg(test)]
    fn keys(&self) -> usize {
        self.map().len()
    }
}

/// One permit of a key (see [`KeyedPermits`]); given back on drop.
pub(super) struct KeyPermit {
    owner: Arc<KeyedPermits>,
    key: PublicKey,
    sem: Arc<Semaphore>,
    permit: Option<OwnedSemaphorePermit>,
}

impl Drop for KeyPermit {
    fn drop(&mut self) {
        let mut map = self.owner.map();
        drop(self.permit.take());
        // Only the map and this permit hold the semaphore: nobody holds or awaits a permit.
        if Arc::strong_count(&self.sem) == 2 && self.sem.available_permits() == self.owner.per_key {
            map.remove(&self.key);
        }
    }
}

/// The bounds in force on one server, shared by every session (see the module documentation).
pub(super) struct Bounds {
    pub(super) limits: TunnelLimits,
    reverse_key: Arc<KeyedPermits>,
    lookup_key: Arc<KeyedPermits>,
    lookup_all: Arc<Semaphore>,
    resolver: Arc<ResolveFn>,
    /// Look-ups of the services' targets given by name ([`super::service_lookup`]).
    services: super::service_lookup::ServiceLookups,
    reverse_open: AtomicUsize,
    reverse_most: AtomicUsize,
    listeners: AtomicUsize,
}

impl fmt::Debug for Bounds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bounds").field("limits", &self.limits).finish_non_exhaustive()
    }
}

impl Default for Bounds {
    fn default() -> Self {
        Bounds::new(TunnelLimits::default(), Arc::new(system_resolve))
    }
}

fn system_resolve(host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
    Ok((host, port).to_socket_addrs()?.collect())
}

impl Bounds {
    pub(super) fn new(limits: TunnelLimits, resolver: Arc<ResolveFn>) -> Self {
        Bounds {
            reverse_key: KeyedPermits::new(limits.reverse_per_key),
            lookup_key: KeyedPermits::new(limits.lookups_per_key),
            lookup_all: Arc::new(Semaphore::new(limits.lookups.max(1))),
            resolver,
            services: Default::default(),
            limits,
            reverse_open: AtomicUsize::new(0),
            reverse_most: AtomicUsize::new(0),
            listeners: AtomicUsize::new(0),
        }
    }

    pub(super) fn resolver(&self) -> Arc<ResolveFn> {
        self.resolver.clone()
    }

    /// The addresses of a service's target given by name: one look-up at a time per target,
    /// its answer reused for a while ([`super::service_lookup`]).
    pub(super) async fn service_addrs(&self, host: &str, port: u16) -> io::Result<Arc<[SocketAddr]>> {
        self.services.addrs(&self.resolver, host, port).await
    }

    /// A semaphore for one session's look-ups.
    pub(super) fn session_lookups(&self) -> Arc<Semaphore> {
        Arc::new(Semaphore::new(self.limits.lookups_per_session.max(1)))
    }

    /// A semaphore for one reverse forward's listener.
    pub(super) fn listener_permits(&self) -> Arc<Semaphore> {
        Arc::new(Semaphore::new(self.limits.reverse_per_listener.max(1)))
    }

    /// Waits for a permit of the listener and one of `key`: then one connection may be accepted.
    pub(super) async fn reverse_permit(self: &Arc<Self>, listener: &Arc<Semaphore>, key: PublicKey) -> ReversePermit {
        let own = listener.clone().acquire_owned().await.ok();
        let key = self.reverse_key.acquire(key).await;
        ReversePermit { _permits: (own, key), bounds: self.clone(), counted: false }
    }

    /// Counts a listener while the guard lives.
    pub(super) fn listener(self: &Arc<Self>) -> ListenerCount {
        self.listeners.fetch_add(1, Ordering::Relaxed);
        ListenerCount(self.clone())
    }

    /// Connections to reverse forwards' listeners open now, the most there ever were at once,
    /// and the listeners open.
    pub(super) fn reverse_counts(&self) -> (usize, usize, usize) {
        (
            self.reverse_open.load(Ordering::Relaxed),
            self.reverse_most.load(Ordering::Relaxed),
            self.listeners.load(Ordering::Relaxed),
        )
    }

    /// Looks `host:port` up for `key`, within the session's, the key's and the server's bounds
    /// and [`TunnelLimits::lookup_timeout`] (a `TimedOut` error after it).
    pub(super) async fn lookup(
        self: &Arc<Self>,
        key: PublicKey,
        session: &Arc<Semaphore>,
        host: &str,
        port: u16,
    ) -> io::Result<Vec<SocketAddr>> {
        let closed = || io::Error::other("look-ups are no longer served");
        let work = async {
            let s = session.clone().acquire_owned().await.map_err(|_| closed())?;
            let k = self.lookup_key.acquire(key).await;
            let a = self.lookup_all.clone().acquire_owned().await.map_err(|_| closed())?;
            let (tx, rx) = oneshot::channel();
            let (resolve, host) = (self.resolver.clone(), host.to_string());
            std::thread::Builder::new().name("holdfast-lookup".into()).spawn(move || {
                let r = resolve(&host, port);
                // The permits go back when the resolver has returned, whoever still waits.
                drop((s, k, a));
                let _ = tx.send(r);
            })?;
            rx.await.map_err(|_| closed())?
        };
        match tokio::time::timeout(self.limits.lookup_timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer within {}", crate::human::Rounded(self.limits.lookup_timeout)),
            )),
        }
    }
}

/// A connection's permits to be accepted from a reverse forward's listener; once the connection
/// is accepted ([`ReversePermit::accepted`]) it counts as open until dropped.
pub(super) struct ReversePermit {
    _permits: (Option<OwnedSemaphorePermit>, KeyPermit),
    bounds: Arc<Bounds>,
    counted: bool,
}

impl ReversePermit {
    pub(super) fn accepted(&mut self) {
        if !self.counted {
            self.counted = true;
            let now = self.bounds.reverse_open.fetch_add(1, Ordering::Relaxed) + 1;
            self.bounds.reverse_most.fetch_max(now, Ordering::Relaxed);
        }
    }
}

impl Drop for ReversePermit {
    fn drop(&mut self) {
        if self.counted {
            self.bounds.reverse_open.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// A reverse forward's listener, counted while it lives.
pub(super) struct ListenerCount(Arc<Bounds>);

impl Drop for ListenerCount {
    fn drop(&mut self) {
        self.0.listeners.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::Keypair;

    #[tokio::test]
    async fn a_key_gets_at_most_its_permits_and_its_entry_goes_with_the_last() {
        let permits = KeyedPermits::new(2);
        let (a, b) = (Keypair::generate().public, Keypair::generate().public);
        let first = permits.acquire(a).await;
        let second = permits.acquire(a).await;
        let third = permits.acquire(a);
        tokio::pin!(third);
        assert!(futures_poll(&mut third).is_none(), "a third permit for a key bounded to two");
        let other = permits.acquire(b).await;
        drop(first);
        let third = third.await;
        drop((second, third, other));
        assert_eq!(permits.keys(), 0, "a key with no permit held or awaited is forgotten");
    }

    fn futures_poll<F: std::future::Future + Unpin>(f: &mut F) -> Option<F::Output> {
        let waker = std::task::Waker::noop();
        match std::pin::Pin::new(f).poll(&mut std::task::Context::from_waker(waker)) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        }
    }

    #[tokio::test]
    async fn a_lookup_that_never_returns_holds_its_permits_and_times_out() {
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let wait = Mutex::new(wait);
        let started = Arc::new(AtomicUsize::new(0));
        let seen = started.clone();
        let resolver: Arc<ResolveFn> = Arc::new(move |host: &str, port| {
            seen.fetch_add(1, Ordering::SeqCst);
            if host == "stuck.test" {
                let _ = wait.lock().unwrap().recv();
            }
            Ok(vec![SocketAddr::from(([127, 0, 0, 1], port))])
        });
        let limits =
            TunnelLimits { lookups_per_session: 1, lookup_timeout: Duration::from_millis(50), ..Default::default() };
        let bounds = Arc::new(Bounds::new(limits, resolver));
        let key = Keypair::generate().public;
        let session = bounds.session_lookups();
        let e = bounds.lookup(key, &session, "stuck.test", 1).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        // The stuck look-up still holds the session's one permit: the next one waits and times
        // out without reaching the resolver.
        let e = bounds.lookup(key, &session, "fine.test", 1).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.load(Ordering::SeqCst), 1);
        // Another session of the same key is not held up.
        let got = bounds.lookup(key, &bounds.session_lookups(), "fine.test", 7).await.unwrap();
        assert_eq!(got, vec![SocketAddr::from(([127, 0, 0, 1], 7))]);
        release.send(()).unwrap();
    }
}
