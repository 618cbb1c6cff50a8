//! Look-ups of the services' targets given by name (`db=db.internal:5432`): the operator's
//! names, looked up when a client opens a stream to them. Whatever the clients do, each target
//! has at most one look-up running (on a thread of its own, never tokio's blocking pool, whose
//! queue a slow resolver would grow without bound), and an answer is reused for [`FRESH`]: a
//! key that opens streams as fast as it can makes no more look-ups than one client, and holds
//! no thread. Without it, every stream queued a look-up of its own: a resolver answering in 1 s
//! let one key hold 512 threads and delay every other key's streams to named services past
//! their timeout.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::limits::ResolveFn;

/// How long a target's addresses are reused before it is looked up again.
pub(super) const FRESH: Duration = Duration::from_secs(5);

/// The last answer for a target, and when it came.
type Answer = Option<(Instant, Arc<[SocketAddr]>)>;

/// A target's slot: locked by the look-up running for it.
type Slot = Arc<tokio::sync::Mutex<Answer>>;

/// One slot per target (the operator's services, so a bounded number), each an async lock held
/// by the look-up running for it.
#[derive(Default)]
pub(super) struct ServiceLookups {
    slots: Mutex<HashMap<(String, u16), Slot>>,
}

impl ServiceLookups {
    /// The addresses of `host:port`, from an answer less than [`FRESH`] old, or else from a
    /// look-up by `resolve`, after the one running for the same target (if any) has returned.
    /// The caller bounds the wait; a look-up keeps its target's slot until the resolver
    /// returns, even if nobody waits for it any more.
    pub(super) async fn addrs(&self, resolve: &Arc<ResolveFn>, host: &str, port: u16) -> io::Result<Arc<[SocketAddr]>> {
        let slot = {
            let mut slots = self.slots.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            slots.entry((host.to_string(), port)).or_default().clone()
        };
        let mut answer = slot.lock_owned().await;
        if let Some((at, addrs)) = &*answer {
            if at.elapsed() < FRESH {
                return Ok(addrs.clone());
            }
        }
        let (tx, rx) = oneshot::channel();
        let (resolve, host) = (resolve.clone(), host.to_string());
        std::thread::Builder::new().name("holdfast-lookup".into()).spawn(move || {
            let r = resolve(&host, port).map(Arc::<[SocketAddr]>::from);
            if let Ok(addrs) = &r {
                *answer = Some((Instant::now(), addrs.clone()));
            }
            // The slot is free once the resolver has returned, whoever still waits.
            drop(answer);
            let _ = tx.send(r);
        })?;
        rx.await.map_err(|_| io::Error::other("the look-up thread ended without an answer"))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A hundred streams at once to a target whose resolver takes 200 ms: one look-up, one
    /// thread; its answer serves them all, and the next ones within `FRESH`.
    #[tokio::test]
    async fn concurrent_streams_to_a_named_target_make_one_lookup() {
        let calls = Arc::new(AtomicUsize::new(0));
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let (c, r, m) = (calls.clone(), running.clone(), most.clone());
        let resolve: Arc<ResolveFn> = Arc::new(move |_host: &str, port: u16| {
            c.fetch_add(1, Ordering::SeqCst);
            let now = r.fetch_add(1, Ordering::SeqCst) + 1;
            m.fetch_max(now, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(200));
            r.fetch_sub(1, Ordering::SeqCst);
            Ok(vec![SocketAddr::from(([127, 0, 0, 1], port))])
        });
        let lookups = Arc::new(ServiceLookups::default());
        let mut all = tokio::task::JoinSet::new();
        for _ in 0..100 {
            let (l, r) = (lookups.clone(), resolve.clone());
            all.spawn(async move { l.addrs(&r, "db.internal", 5432).await });
        }
        while let Some(r) = all.join_next().await {
            assert_eq!(&*r.unwrap().unwrap(), &[SocketAddr::from(([127, 0, 0, 1], 5432))]);
        }
        assert_eq!(lookups.addrs(&resolve, "db.internal", 5432).await.unwrap().len(), 1);
        assert_eq!((calls.load(Ordering::SeqCst), most.load(Ordering::SeqCst)), (1, 1));
        // Another target has a slot of its own.
        lookups.addrs(&resolve, "cache.internal", 6379).await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    /// Failures are not kept: the next stream looks up again, one at a time.
    #[tokio::test]
    async fn a_failed_lookup_is_tried_again_by_the_next_stream() {
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let resolve: Arc<ResolveFn> = Arc::new(move |_: &str, _: u16| {
            c.fetch_add(1, Ordering::SeqCst);
            Err(io::Error::new(io::ErrorKind::NotFound, "no such name"))
        });
        let lookups = ServiceLookups::default();
        for n in 1..=3 {
            let e = lookups.addrs(&resolve, "gone.internal", 80).await.unwrap_err();
            assert_eq!((e.kind(), calls.load(Ordering::SeqCst)), (io::ErrorKind::NotFound, n));
        }
    }
}
