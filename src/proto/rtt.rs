//! Round-trip time and the suspicion rule: when a link has gone quiet for much longer than its
//! round trip while something of ours awaits an answer, it is *suspect*. The driver then races a
//! second connection (client) instead of waiting for the dead-peer time. Sans-IO: every call
//! takes `now`.
//!
//! - **RTT.** Samples come from PING → PONG and from the first transmission of DATA → the ACK
//!   that covers it (resent data gives no sample). Smoothed as in RFC 6298.
//! - **Outstanding.** Something awaits an answer while DATA is unacknowledged or a PING is
//!   unanswered. A link whose peer sent DATA to us since the last probe and then went quiet
//!   gets one probe PING, so that a download, which sends us nothing to acknowledge, is
//!   watched too (whatever record came last: an ACK of ours does not end the download).
//! - **Suspect** when something is outstanding and nothing at all was received for the
//!   threshold: `max(4 × smoothed RTT, 250 ms)`, doubled after every race until the stream makes
//!   progress again (so a peer whose program stopped reading, whose new link is as quiet as the
//!   old, is raced less and less often), and never above the dead-peer time.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The smallest suspicion threshold.
pub const MIN_SUSPECT: Duration = Duration::from_millis(250);
/// DATA transmissions tracked for RTT samples at once; more are coalesced into the newest.
const MAX_SAMPLES: usize = 16;

/// The session's round-trip estimate (RFC 6298, without the retransmission timer).
#[derive(Debug, Clone, Copy, Default)]
pub struct RttEstimate {
    srtt: Option<Duration>,
    rttvar: Duration,
}

impl RttEstimate {
    /// Adds a sample.
    pub fn sample(&mut self, r: Duration) {
        match self.srtt {
            None => {
                self.srtt = Some(r);
                self.rttvar = r / 2;
            }
            Some(s) => {
                let diff = s.abs_diff(r);
                self.rttvar = (self.rttvar * 3 + diff) / 4;
                self.srtt = Some((s * 7 + r) / 8);
            }
        }
    }

    /// The smoothed round trip, once there is a sample.
    pub fn smoothed(&self) -> Option<Duration> {
        self.srtt
    }
}

/// One link's view of what awaits an answer, and when it was last heard from.
#[derive(Debug)]
pub(crate) struct Liveness {
    /// First transmissions of DATA: (stream position just past it, when it was sent).
    samples: VecDeque<(u64, Instant)>,
    /// An unanswered PING's send time.
    ping: Option<Instant>,
    /// When anything was last received.
    heard: Instant,
    /// DATA was received since the last probe (the peer was streaming to us). Other records
    /// (an ACK of ours, a PONG) leave it set: a peer that streams DATA also acknowledges what
    /// we send, and a silence after its ACK is as much a dead download as one after its DATA.
    streaming: bool,
    /// The link was reported suspect and has not been heard from since.
    suspected: bool,
}

impl Liveness {
    pub(crate) fn new(now: Instant) -> Self {
        Liveness { samples: VecDeque::new(), ping: None, heard: now, streaming: false, suspected: false }
    }

    /// DATA up to position `end` left for the first time.
    pub(crate) fn sent_data(&mut self, now: Instant, end: u64) {
        let full = self.samples.len() >= MAX_SAMPLES;
        match self.samples.back_mut() {
            Some(last) if full || last.1 == now => last.0 = end,
            _ => self.samples.push_back((end, now)),
        }
    }

    /// A PING left.
    pub(crate) fn sent_ping(&mut self, now: Instant) {
        self.ping.get_or_insert(now);
    }

    /// Something was received. Returns true if the link had been reported suspect: it is
    /// answering again.
    pub(crate) fn heard(&mut self, now: Instant) -> bool {
        self.heard = now;
        std::mem::take(&mut self.suspected)
    }

    /// New DATA arrived: the peer is streaming to us, and a silence from now on gets a probe.
    pub(crate) fn data_arrived(&mut self) {
        self.streaming = true;
    }

    /// The program is not reading, so the driver is not either: a silence proves nothing, and
    /// none is judged until reading resumes (see `Session::handle_timeout`).
    pub(crate) fn not_reading(&mut self, now: Instant) {
        self.heard = now;
        self.streaming = false;
    }

    /// An ACK of every position below `acked`: samples it completes feed `rtt`. True if it
    /// gave one.
    pub(crate) fn acked(&mut self, now: Instant, acked: u64, rtt: &mut RttEstimate) -> bool {
        let mut newest = None;
        while let Some(&(end, at)) = self.samples.front() {
            if end > acked {
                break;
            }
            newest = Some(at);
            self.samples.pop_front();
        }
        if let Some(at) = newest {
            rtt.sample(now.saturating_duration_since(at));
        }
        newest.is_some()
    }

    /// A PONG arrived: its sample feeds `rtt` and is returned.
    pub(crate) fn ponged(&mut self, now: Instant, rtt: &mut RttEstimate) -> Option<Duration> {
        let at = self.ping.take()?;
        let r = now.saturating_duration_since(at);
        rtt.sample(r);
        Some(r)
    }

    /// True while a PING awaits its PONG.
    pub(crate) fn pinging(&self) -> bool {
        self.ping.is_some()
    }

    /// The operating system said the network changed, or the machine woke from sleep: the
    /// link is suspect at once. Returns how long it has been silent, unless it is already
    /// reported suspect.
    pub(crate) fn force_suspect(&mut self, now: Instant) -> Option<Duration> {
        if self.suspected {
            return None;
        }
        self.suspected = true;
        Some(now.saturating_duration_since(self.heard))
    }

    /// When something of ours began waiting for an answer, if anything is.
    fn outstanding_since(&self) -> Option<Instant> {
        let data = self.samples.front().map(|s| s.1);
        match (data, self.ping) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The next instant at which [`Liveness::check`] has something to do.
    pub(crate) fn deadline(&self, threshold: Duration) -> Option<Instant> {
        if self.suspected {
            return None;
        }
        match self.outstanding_since() {
            Some(since) => Some(since.max(self.heard) + threshold),
            None if self.streaming => Some(self.heard + threshold / 2),
            None => None,
        }
    }

    /// What is due at `now`: a probe PING (the peer stopped streaming to us and nothing of ours
    /// is outstanding), or the report that the link is suspect (at most once until it is heard
    /// from again).
    pub(crate) fn check(&mut self, now: Instant, threshold: Duration) -> Check {
        if self.suspected {
            return Check::Nothing;
        }
        match self.outstanding_since() {
            Some(since) if now >= since.max(self.heard) + threshold => {
                self.suspected = true;
                Check::Suspect(now.saturating_duration_since(self.heard))
            }
            None if self.streaming && now >= self.heard + threshold / 2 => {
                self.streaming = false;
                Check::Probe
            }
            _ => Check::Nothing,
        }
    }
}

/// What [`Liveness::check`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Check {
    Nothing,
    /// Send a PING now.
    Probe,
    /// The link is suspect: silent for this long with something outstanding.
    Suspect(Duration),
}

/// The suspicion threshold for `rtt`, after `races` races without a healthy spell since, capped
/// at `cap` (the dead-peer time).
pub fn threshold(rtt: &RttEstimate, races: u32, cap: Duration) -> Duration {
    let base = rtt.smoothed().map_or(MIN_SUSPECT, |s| (s * 4).max(MIN_SUSPECT));
    base.saturating_mul(1u32 << races.min(16)).min(cap)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smoothing_follows_rfc_6298() {
        let mut r = RttEstimate::default();
        r.sample(Duration::from_millis(100));
        assert_eq!(r.smoothed(), Some(Duration::from_millis(100)));
        r.sample(Duration::from_millis(20));
        assert_eq!(r.smoothed(), Some(Duration::from_millis(90)));
    }

    #[test]
    fn the_threshold_has_a_floor_doubles_per_race_and_stops_at_the_cap() {
        let cap = Duration::from_secs(15);
        let mut r = RttEstimate::default();
        assert_eq!(threshold(&r, 0, cap), MIN_SUSPECT);
        r.sample(Duration::from_millis(10));
        assert_eq!(threshold(&r, 0, cap), MIN_SUSPECT);
        for _ in 0..20 {
            r.sample(Duration::from_millis(400));
        }
        let base = threshold(&r, 0, cap);
        assert_eq!(base, r.smoothed().unwrap() * 4);
        assert_eq!(threshold(&r, 2, cap), base * 4);
        assert_eq!(threshold(&r, 30, cap), cap);
    }

    #[test]
    fn a_quiet_download_is_probed_then_suspected() {
        let t0 = Instant::now();
        let th = Duration::from_millis(400);
        let mut l = Liveness::new(t0);
        l.heard(t0);
        l.data_arrived();
        assert_eq!(l.deadline(th), Some(t0 + th / 2));
        assert_eq!(l.check(t0 + th / 2, th), Check::Probe);
        l.sent_ping(t0 + th / 2);
        assert_eq!(l.check(t0 + th, th), Check::Nothing);
        assert_eq!(l.check(t0 + th / 2 + th, th), Check::Suspect(th / 2 + th));
        assert_eq!(l.check(t0 + th * 3, th), Check::Nothing, "reported once");
        assert!(l.heard(t0 + th * 3), "heard again after the report");
    }

    /// A peer streaming DATA to us also acknowledges what we send (an ssh session: output one
    /// way, keystrokes and window updates the other): an ACK after its last DATA does not
    /// disarm the probe. Before, it did, and a dead link was noticed only by the next
    /// keepalive (a walk through `holdfast ssh` saw 5.25 s freezes).
    #[test]
    fn an_ack_after_the_data_does_not_disarm_the_probe() {
        let t0 = Instant::now();
        let th = Duration::from_millis(400);
        let mut l = Liveness::new(t0);
        l.heard(t0);
        l.data_arrived();
        let ack = t0 + Duration::from_millis(3);
        l.heard(ack);
        assert_eq!(l.deadline(th), Some(ack + th / 2));
        assert_eq!(l.check(ack + th / 2, th), Check::Probe);
    }
}
