//! A request's clock that stops while its link is away: a tunnel opened during an outage waits
//! for the link to come back instead of failing while the server cannot answer (and the server
//! may still carry the request out once the link is back).

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use tokio::sync::broadcast::{self, error::RecvError};

use crate::net::{LinkEvent, LinkStatus};

/// The link under a stream, as its events tell it: up, or lost or suspect.
pub(crate) struct Link {
    events: broadcast::Receiver<LinkEvent>,
    up: bool,
}

impl Link {
    /// From a stream's (or its read half's) event receiver and status, subscribed in that
    /// order so that no change falls between them.
    pub(crate) fn of(events: broadcast::Receiver<LinkEvent>, status: &LinkStatus) -> Link {
        Link { events, up: matches!(status, LinkStatus::Connected) }
    }

    /// Follows one event: false if the events stopped (the session is gone).
    fn follow(&mut self, ev: Result<LinkEvent, RecvError>) -> bool {
        match ev {
            Ok(LinkEvent::Lost(_) | LinkEvent::Reconnecting { .. } | LinkEvent::Suspect { .. })
            | Ok(LinkEvent::NetworkChanged) => self.up = false,
            Ok(LinkEvent::Connected { .. } | LinkEvent::Resumed { .. } | LinkEvent::Healthy) => self.up = true,
            Ok(_) | Err(RecvError::Lagged(_)) => {}
            Err(RecvError::Closed) => return false,
        }
        true
    }
}

/// `fut`'s output, if it comes within `limit` of time with the link up (all of `limit`
/// without a link to follow); `None` once that time is spent.
pub(crate) async fn within<T>(limit: Duration, link: Option<Link>, fut: impl Future<Output = T>) -> Option<T> {
    let Some(mut link) = link else { return tokio::time::timeout(limit, fut).await.ok() };
    tokio::pin!(fut);
    let mut left = limit;
    loop {
        let (up, started) = (link.up, Instant::now());
        let clock = async {
            if up {
                tokio::time::sleep(left).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            r = &mut fut => return Some(r),
            () = clock => return None,
            ev = link.events.recv() => {
                if up {
                    left = left.saturating_sub(started.elapsed());
                }
                if !link.follow(ev) {
                    return tokio::time::timeout(left, fut).await.ok();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The clock stops while the link is lost or suspect, and runs again once it is back.
    #[tokio::test(start_paused = true)]
    async fn the_clock_stops_while_the_link_is_away() {
        let (tx, rx) = broadcast::channel(8);
        let link = Link::of(rx, &LinkStatus::Connected);
        let limit = Duration::from_secs(10);
        let t0 = tokio::time::Instant::now();
        let waited = tokio::spawn(within(limit, Some(link), std::future::pending::<()>()));
        tokio::time::sleep(Duration::from_secs(4)).await;
        tx.send(LinkEvent::Suspect { quiet: Duration::from_secs(1) }).unwrap();
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!waited.is_finished(), "the clock ran while the link was away");
        tx.send(LinkEvent::Healthy).unwrap();
        assert_eq!(waited.await.unwrap(), None);
        // 4 s before the outage, 60 s of it, 6 s after.
        assert_eq!(t0.elapsed().as_secs(), 70);
        // Without a link, the plain limit.
        let t1 = tokio::time::Instant::now();
        assert_eq!(within(limit, None, std::future::pending::<()>()).await, None);
        assert_eq!(t1.elapsed().as_secs(), 10);
        // A reply that comes while the link is away is taken.
        let (tx, rx) = broadcast::channel(8);
        let link = Link::of(rx, &LinkStatus::Reconnecting { cause: "reset".into(), attempt: 1 });
        let got = within(limit, Some(link), async {
            tokio::time::sleep(Duration::from_secs(30)).await;
            7
        })
        .await;
        assert_eq!(got, Some(7));
        drop(tx);
    }
}
