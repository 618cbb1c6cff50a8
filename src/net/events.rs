//! Link events a program can watch: the real connection under a [`crate::Stream`] comes, goes
//! and comes back.

use std::net::SocketAddr;
use std::time::Duration;

/// Why a real connection was lost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkLost {
    /// Human-readable cause (reset, silence, authentication failure, ...).
    pub cause: String,
    /// Number of faults on this stream so far, this one included.
    pub faults: u64,
}

/// The state of a stream's link, as a value that can be watched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkStatus {
    /// A real connection is up.
    Connected,
    /// The real connection was lost; recovery is under way.
    Reconnecting {
        /// Why it was lost.
        cause: String,
        /// Reconnect attempts so far.
        attempt: u32,
    },
    /// The stream ended normally.
    Closed,
    /// The stream failed for good; reads and writes return this reason.
    Failed(String),
}

/// Something that happened to a stream's link.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LinkEvent {
    /// The first connection is up.
    Connected {
        /// The peer's address.
        peer: SocketAddr,
    },
    /// The real connection was lost.
    Lost(LinkLost),
    /// A reconnect attempt is starting (client).
    Reconnecting {
        /// 1 for the first attempt after a fault.
        attempt: u32,
        /// Time since the link was lost.
        elapsed: Duration,
    },
    /// The stream resumed on a new real connection.
    Resumed {
        /// The peer's address on the new connection.
        peer: SocketAddr,
        /// Time from the loss to the resume.
        after: Duration,
        /// Bytes this end sends again.
        replayed_sent: u64,
        /// Bytes the peer sends again.
        replayed_received: u64,
    },
    /// The stream ended normally (both directions finished).
    Closed,
    /// The stream failed for good.
    Failed {
        /// Why.
        reason: String,
    },
}

/// A duration rounded for people, for logs and status lines: `571µs`, `12.3ms`, `1.08s`,
/// `2m05s`, `3h10m`. Three significant digits below a minute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rounded(pub Duration);

impl std::fmt::Display for Rounded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let d = self.0;
        let us = d.as_micros();
        let s = d.as_secs_f64();
        match us {
            0..=999 => write!(f, "{us}µs"),
            1_000..=9_999 => write!(f, "{:.2}ms", s * 1e3),
            10_000..=99_999 => write!(f, "{:.1}ms", s * 1e3),
            100_000..=999_999 => write!(f, "{:.0}ms", s * 1e3),
            1_000_000..=9_999_999 => write!(f, "{s:.2}s"),
            10_000_000..=59_999_999 => write!(f, "{s:.1}s"),
            _ if d.as_secs() < 3600 => write!(f, "{}m{:02}s", d.as_secs() / 60, d.as_secs() % 60),
            _ => write!(f, "{}h{:02}m", d.as_secs() / 3600, d.as_secs() / 60 % 60),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_rounded_for_people() {
        let r = |d| Rounded(d).to_string();
        assert_eq!(r(Duration::from_nanos(571_400)), "571µs");
        assert_eq!(r(Duration::from_micros(1_234)), "1.23ms");
        assert_eq!(r(Duration::from_micros(12_345)), "12.3ms");
        assert_eq!(r(Duration::from_micros(123_456)), "123ms");
        assert_eq!(r(Duration::from_nanos(1_078_957_887)), "1.08s");
        assert_eq!(r(Duration::from_millis(15_030)), "15.0s");
        assert_eq!(r(Duration::from_secs(125)), "2m05s");
        assert_eq!(r(Duration::from_secs(3 * 3600 + 600)), "3h10m");
    }
}
