//! The budget of an end that has no server-wide budget to charge (a client): its streams'
//! receive windows together, and its streams, within fixed caps. Without it a peer (a hostile
//! or compromised server) could grow every stream's window to its 16 MiB and fill them while
//! the local programs do not read: a review made a client hold 981 MB with 64 streams, and the
//! open credit allows 1024.

use super::StreamBudget;

/// Receive windows one session's streams may hold together, by default.
pub const WINDOWS: u64 = 256 << 20;
/// Streams one session may hold at once, by default (both ends' opens together).
pub const STREAMS: usize = 2048;

/// A session's own caps on its streams' windows and number (see the module documentation).
#[derive(Debug)]
pub struct Capped {
    max: u64,
    held: u64,
    max_streams: usize,
    streams: usize,
}

impl Capped {
    /// At most `max` bytes of receive window and `max_streams` streams at once.
    pub fn new(max: u64, max_streams: usize) -> Self {
        Capped { max, held: 0, max_streams, streams: 0 }
    }

    /// Window bytes held now.
    pub fn held(&self) -> u64 {
        self.held
    }
}

impl Default for Capped {
    fn default() -> Self {
        Capped::new(WINDOWS, STREAMS)
    }
}

impl StreamBudget for Capped {
    fn take_window(&mut self, n: u64) -> bool {
        if self.held.saturating_add(n) > self.max {
            return false;
        }
        self.held += n;
        true
    }

    /// Growth leaves a quarter of the cap for the first windows of new streams: a grown window
    /// stays charged while its stream lives.
    fn grow_window(&mut self, n: u64) -> bool {
        if self.held.saturating_add(n) > self.max - self.max / 4 {
            return false;
        }
        self.held += n;
        true
    }

    fn give_window(&mut self, n: u64) {
        self.held = self.held.saturating_sub(n);
    }

    fn take_stream(&mut self) -> bool {
        if self.streams >= self.max_streams {
            return false;
        }
        self.streams += 1;
        true
    }

    fn give_stream(&mut self) {
        self.streams = self.streams.saturating_sub(1);
    }
}

#[cfg(test)]
mod tests {
    use super::super::INITIAL_WINDOW;
    use super::*;

    /// Windows grow only within three quarters of the cap; first windows may use the rest; all
    /// of it comes back.
    #[test]
    fn windows_stay_within_the_cap_and_growth_leaves_a_quarter() {
        let mut b = Capped::new(1 << 20, 4);
        assert!(b.take_window(INITIAL_WINDOW));
        let mut grown = 0;
        while b.grow_window(INITIAL_WINDOW) {
            grown += INITIAL_WINDOW;
        }
        assert_eq!(b.held(), (1 << 20) * 3 / 4);
        let mut first = 0;
        while b.take_window(INITIAL_WINDOW) {
            first += 1;
        }
        assert_eq!((b.held(), first), (1 << 20, 4));
        b.give_window(INITIAL_WINDOW * (first + 1) + grown);
        assert_eq!(b.held(), 0);
        assert!((0..4).all(|_| b.take_stream()) && !b.take_stream());
        b.give_stream();
        assert!(b.take_stream());
    }
}
