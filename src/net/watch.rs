//! What the operating system can tell before any timer: the network changed (an address or a
//! route came or went: the laptop roamed to another network), or the machine slept.
//!
//! One background thread per process watches both and publishes them as [`Signal`]s:
//! - **Network changes**, on Linux from a netlink socket subscribed to link, address and route
//!   changes (IPv4 and IPv6). Any such message counts: a change that did not affect a link
//!   costs one spurious race at most.
//! - **Sleep**, by comparing `CLOCK_BOOTTIME` (which runs during suspend) with
//!   `CLOCK_MONOTONIC` (which does not) every [`TICK`]: when their difference grows by more
//!   than [`SLEEP_MIN`], the machine was suspended for that long. The monotonic clock, and
//!   every timer on it, simply did not see that time.
//!
//! Drivers use [`boot_elapsed`] (time since an instant, suspend included) for give-up and
//! expiry, so that a long sleep counts.
//!
//! *Testing:* a suspend cannot be made on a CI machine. When the environment variable
//! `HOLDFAST_TEST_SUSPEND_FILE` names a file, the nanoseconds it holds are added to the boot
//! clock, so a test simulates a suspend of N seconds by writing N × 10⁹ there.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// How often the clocks are compared.
pub const TICK: Duration = Duration::from_millis(250);
/// The smallest jump between the clocks that counts as a sleep.
pub const SLEEP_MIN: Duration = Duration::from_secs(1);

/// The state published by the watcher; receivers react to changes of its counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Signal {
    /// Network changes seen so far.
    pub net_changes: u64,
    /// Wakes from sleep seen so far.
    pub wakes: u64,
    /// The last sleep's length.
    pub slept: Duration,
}

struct Watcher {
    tx: watch::Sender<Signal>,
    /// Monotonic instant and boot-clock reading taken together, to convert between them.
    origin: (Instant, Duration),
}

fn watcher() -> &'static Watcher {
    static W: OnceLock<Watcher> = OnceLock::new();
    W.get_or_init(|| {
        let (tx, _) = watch::channel(Signal::default());
        let w = Watcher { tx, origin: (Instant::now(), boot_clock()) };
        let tx = w.tx.clone();
        let spawned = std::thread::Builder::new().name("holdfast-watch".into()).spawn(move || watch_thread(tx));
        if spawned.is_err() {
            tracing::debug!("no watcher thread: network changes and sleep are noticed by timers only");
        }
        w
    })
}

/// Subscribes to the process's network-change and wake signals (starting the watcher).
pub fn signals() -> watch::Receiver<Signal> {
    watcher().tx.subscribe()
}

/// The boot clock: time since boot, suspend included (plus a test's simulated suspend).
fn boot_clock() -> Duration {
    #[cfg(target_os = "linux")]
    let t = {
        let ts = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
        Duration::new(u64::try_from(ts.tv_sec).unwrap_or(0), u32::try_from(ts.tv_nsec).unwrap_or(0))
    };
    #[cfg(not(target_os = "linux"))]
    let t = {
        static START: OnceLock<Instant> = OnceLock::new();
        START.get_or_init(Instant::now).elapsed()
    };
    t + simulated_suspend()
}

fn simulated_suspend() -> Duration {
    let Some(path) = std::env::var_os("HOLDFAST_TEST_SUSPEND_FILE") else { return Duration::ZERO };
    let ns = std::fs::read_to_string(path).ok().and_then(|s| s.trim().parse::<u64>().ok()).unwrap_or(0);
    Duration::from_nanos(ns)
}

/// Time elapsed since `since`, counting time the machine spent suspended.
pub fn boot_elapsed(since: Instant) -> Duration {
    let (origin, boot0) = watcher().origin;
    // Boot time since the origin, less the monotonic time from the origin to `since` (or plus
    // the monotonic time from `since` to the origin, for an instant before it).
    let boot_since_origin = boot_clock().saturating_sub(boot0);
    match since.checked_duration_since(origin) {
        Some(after) => boot_since_origin.saturating_sub(after),
        None => boot_since_origin + origin.saturating_duration_since(since),
    }
}

fn watch_thread(tx: watch::Sender<Signal>) {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return tracing::debug!(error = %e, "no watcher runtime"),
    };
    rt.block_on(async move {
        let sleep = watch_sleep(&tx);
        #[cfg(target_os = "linux")]
        let net = watch_netlink(&tx);
        #[cfg(not(target_os = "linux"))]
        let net = std::future::pending::<()>();
        tokio::join!(sleep, net);
    });
}

async fn watch_sleep(tx: &watch::Sender<Signal>) {
    let skew = || boot_clock().saturating_sub(Instant::now().saturating_duration_since(watcher_origin()));
    let mut last = skew();
    let mut tick = tokio::time::interval(TICK);
    loop {
        tick.tick().await;
        let now = skew();
        let slept = now.saturating_sub(last);
        last = now;
        if slept >= SLEEP_MIN {
            tracing::debug!(?slept, "the machine slept");
            tx.send_modify(|s| {
                s.wakes += 1;
                s.slept = slept;
            });
        }
    }
}

fn watcher_origin() -> Instant {
    watcher().origin.0
}

#[cfg(target_os = "linux")]
async fn watch_netlink(tx: &watch::Sender<Signal>) {
    use netlink_sys::{AsyncSocket, AsyncSocketExt, SocketAddr, TokioSocket};
    // RTMGRP_LINK, RTMGRP_IPV4_IFADDR, RTMGRP_IPV4_ROUTE, RTMGRP_IPV6_IFADDR, RTMGRP_IPV6_ROUTE.
    const GROUPS: u32 = 0x1 | 0x10 | 0x40 | 0x100 | 0x400;
    let sock = TokioSocket::new(netlink_sys::protocols::NETLINK_ROUTE).and_then(|mut s| {
        s.socket_mut().bind(&SocketAddr::new(0, GROUPS))?;
        Ok(s)
    });
    let sock = match sock {
        Ok(s) => s,
        Err(e) => return tracing::debug!(error = %e, "no netlink socket: network changes are noticed by timers only"),
    };
    let mut buf = bytes::BytesMut::with_capacity(64 << 10);
    loop {
        buf.clear();
        if let Err(e) = sock.recv(&mut buf).await {
            tracing::debug!(error = %e, "netlink socket failed; no more network-change signals");
            return;
        }
        if moves_a_path(&buf) {
            tx.send_modify(|s| s.net_changes += 1);
        }
    }
}

/// True if a batch of rtnetlink messages holds a change that can move a connection's path: a
/// global (not link- or host-scope) address added or removed, or a default route added or
/// removed. The rest (an IPv6 link-local address finishing duplicate detection, routes to
/// directly connected subnets, link statistics) would only cost spurious races.
#[cfg(target_os = "linux")]
fn moves_a_path(mut msgs: &[u8]) -> bool {
    const RTM_NEWADDR: u16 = 20;
    const RTM_DELADDR: u16 = 21;
    const RTM_NEWROUTE: u16 = 24;
    const RTM_DELROUTE: u16 = 25;
    const RT_SCOPE_LINK: u8 = 253;
    const HEADER: usize = 16;
    while msgs.len() >= HEADER {
        let len = u32::from_ne_bytes([msgs[0], msgs[1], msgs[2], msgs[3]]) as usize;
        let kind = u16::from_ne_bytes([msgs[4], msgs[5]]);
        let Some(body) = msgs.get(HEADER..len.max(HEADER)) else { return false };
        let relevant = match kind {
            // struct ifaddrmsg: family, prefixlen, flags, scope, index.
            RTM_NEWADDR | RTM_DELADDR => body.get(3).is_some_and(|&scope| scope < RT_SCOPE_LINK),
            // struct rtmsg: family, dst_len, ...: a default route has dst_len 0.
            RTM_NEWROUTE | RTM_DELROUTE => body.get(1) == Some(&0),
            _ => false,
        };
        if relevant {
            return true;
        }
        // Messages are aligned to 4 bytes.
        let next = (len + 3) & !3;
        if len < HEADER || next > msgs.len() {
            return false;
        }
        msgs = &msgs[next..];
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_elapsed_counts_from_the_instant() {
        let t = Instant::now();
        std::thread::sleep(Duration::from_millis(20));
        let e = boot_elapsed(t);
        assert!(e >= Duration::from_millis(20) && e < Duration::from_secs(5), "{e:?}");
    }
}
