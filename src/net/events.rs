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
    /// The link has been silent this long while something awaited an answer, much longer than
    /// its round trip: it may be dead. The client races a second connection (unless a recovery
    /// hook is set); a [`LinkEvent::Resumed`] or [`LinkEvent::Healthy`] follows.
    Suspect {
        /// How long the link had been silent.
        quiet: Duration,
    },
    /// This machine's network changed (an address or a route came or went, or the machine
    /// slept and woke): the link may be gone. The client races a second connection (unless a
    /// recovery hook is set); a [`LinkEvent::Resumed`] or [`LinkEvent::Healthy`] follows.
    NetworkChanged,
    /// A suspect link answered again, without a resume.
    Healthy,
    /// The stream ended normally (both directions finished).
    Closed,
    /// The stream failed for good.
    Failed {
        /// Why.
        reason: String,
    },
}
