//! The replay defence of first connections: each allowed client key's window of accepted
//! timestamps (`docs/PROTOCOL.md` section 9.1).

/// The first-connection timestamps one client key has used, as a sliding window: a timestamp is
/// accepted once, and only if it is above a floor that trails the newest accepted one by
/// [`Stamps::WINDOW`]. The window lets one client's concurrent connections (each stamped when it
/// starts) arrive out of order; a recorded hello is refused, whatever its age: above the floor
/// its stamp is remembered, and at or below it, it is too old.
///
/// The stamps come from the client's clock, the server's only bounds how far ahead they may be:
/// a stamp more than [`Stamps::AHEAD`] ahead of the server's clock is refused and not
/// remembered, and the floor never rises above the server's clock less the window, so a client
/// whose clock once ran ahead, and was put right, is not locked out until its clock catches up
/// with the stamps it sent then.
#[derive(Default)]
pub(super) struct Stamps {
    /// Accepted stamps above the floor.
    recent: std::collections::BTreeSet<u64>,
    /// Stamps at or below this are refused (the bottom of the window, or above stamps evicted
    /// to bound memory). It only rises.
    floor: u64,
}

impl Stamps {
    /// How much older than the newest accepted stamp a stamp may be: 10 s, in nanoseconds.
    pub(super) const WINDOW: u64 = 10_000_000_000;
    /// How far ahead of the server's clock a stamp may be: 60 s, in nanoseconds.
    pub(super) const AHEAD: u64 = 60_000_000_000;
    /// Most stamps remembered per key; beyond this the oldest are dropped (and refused).
    const MAX: usize = 4096;

    /// Accepts `stamp` if it was never accepted, is within the window and is not more than
    /// [`Stamps::AHEAD`] ahead of `now` (the server's clock, in nanoseconds since the UNIX
    /// epoch), and remembers it. A stamp too far ahead changes nothing.
    pub(super) fn accept(&mut self, stamp: u64, now: u64) -> bool {
        if stamp > now.saturating_add(Self::AHEAD) {
            return false;
        }
        if stamp <= self.floor || self.recent.contains(&stamp) {
            return false;
        }
        // The window trails the newest stamp, but no stamp ahead of the server's clock drags
        // it further than the server's clock.
        let newest = self.recent.last().copied().unwrap_or(0).max(stamp).min(now);
        self.floor = self.floor.max(newest.saturating_sub(Self::WINDOW));
        if stamp <= self.floor {
            return false;
        }
        self.recent.insert(stamp);
        let floor = self.floor;
        self.recent.retain(|&s| s > floor);
        while self.recent.len() > Self::MAX {
            if let Some(oldest) = self.recent.pop_first() {
                self.floor = oldest;
            }
        }
        true
    }

    /// The floor and the stamps accepted above it, for a new process taking over.
    pub(super) fn snapshot(&self) -> (u64, Vec<u64>) {
        (self.floor, self.recent.iter().copied().collect())
    }

    /// Merges another process's floor and accepted stamps for the same key: whatever either
    /// would refuse, the result refuses. `now` is the server's clock, as for [`Stamps::accept`]:
    /// merged stamps ahead of it do not drag the floor past it either.
    pub(super) fn merge(&mut self, floor: u64, stamps: &[u64], now: u64) {
        self.floor = self.floor.max(floor);
        self.recent.extend(stamps.iter().copied());
        let newest = self.recent.last().copied().unwrap_or(0).min(now);
        self.floor = self.floor.max(newest.saturating_sub(Self::WINDOW));
        let floor = self.floor;
        self.recent.retain(|&s| s > floor);
        while self.recent.len() > Self::MAX {
            if let Some(oldest) = self.recent.pop_first() {
                self.floor = oldest;
            }
        }
    }
}

/// The server's clock, for [`Stamps::accept`]: nanoseconds since the UNIX epoch (0 if the
/// clock is before it).
pub(super) fn wall_clock() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::Stamps;

    /// A server clock far after every stamp of a test: the tolerance ahead plays no part.
    const LATE: u64 = u64::MAX / 2;

    #[test]
    fn a_stamp_is_accepted_once_and_only_within_the_window() {
        let w = Stamps::WINDOW;
        let mut s = Stamps::default();
        let t = 100 * w;
        assert!(s.accept(t, LATE));
        assert!(!s.accept(t, LATE), "the same stamp twice (a replay)");
        // Concurrent connections arrive out of order: an older stamp within the window is new.
        assert!(s.accept(t - w / 2, LATE));
        assert!(!s.accept(t - w / 2, LATE));
        assert!(s.accept(t + 1, LATE));
        // The edge: greater than the newest less the window is accepted, equal is not.
        assert!(!s.accept(t + 1 - w, LATE));
        assert!(s.accept(t + 2 - w, LATE));
        assert!(s.accept(t + 3 * w, LATE));
        assert!(!s.accept(t + 2, LATE), "below the moved window");
        assert!(!s.accept(t, LATE), "an old stamp, seen before and now below the window");
    }

    #[test]
    fn a_key_with_no_stamp_accepts_any_but_zero() {
        let mut s = Stamps::default();
        assert!(!s.accept(0, LATE), "a stamp of 0");
        assert!(s.accept(1, LATE));
        assert!(!s.accept(0, LATE));
    }

    #[test]
    fn the_window_is_bounded_and_evicted_stamps_stay_refused() {
        let mut s = Stamps::default();
        let base = 1_000 * Stamps::WINDOW;
        for i in 0..(Stamps::MAX as u64 + 10) {
            assert!(s.accept(base + i, LATE));
        }
        assert!(s.recent.len() <= Stamps::MAX);
        for i in 0..10 {
            assert!(!s.accept(base + i, LATE), "an evicted stamp was accepted again");
        }
    }

    /// Review item 10: a client whose clock ran ahead, and was put right, is not locked out;
    /// a stamp too far ahead is refused and changes nothing; its hellos stay refused.
    #[test]
    fn a_clock_that_ran_ahead_does_not_lock_the_key_out() {
        let (w, ahead) = (Stamps::WINDOW, Stamps::AHEAD);
        let now = 1_000 * w;
        let mut s = Stamps::default();
        // Within the tolerance: accepted, but the window does not follow it past the server's
        // clock.
        let early = now + ahead - 1;
        assert!(s.accept(early, now));
        assert!(s.accept(now + 1, now + 1), "the clock put right: locked out");
        assert!(!s.accept(early, now + 2), "a recorded hello from the clock that ran ahead");
        assert!(!s.accept(now + 1, now + 2));
        // Too far ahead: refused, not remembered, the window unchanged.
        assert!(!s.accept(now + 10 * ahead, now + 2));
        assert!(s.accept(now + 3, now + 3));
        // Once the server's clock is past it, the early stamp is below the window.
        assert!(!s.accept(early, early + w + 1));
        // The tolerance's edge: exactly `ahead` ahead is accepted, one more is not.
        let later = early + w + 1;
        assert!(!s.accept(later + ahead + 1, later));
        assert!(s.accept(later + ahead, later));
    }

    #[test]
    fn merged_stamps_refuse_what_either_side_refused() {
        let w = Stamps::WINDOW;
        let t = 100 * w;
        let mut old = Stamps::default();
        assert!(old.accept(t, LATE));
        assert!(old.accept(t - w / 2, LATE));
        let (floor, list) = old.snapshot();
        let mut new = Stamps::default();
        assert!(new.accept(t - w / 4, LATE), "the new process's own stamp");
        new.merge(floor, &list, LATE);
        assert!(!new.accept(t, LATE), "accepted by the old process");
        assert!(!new.accept(t - w / 2, LATE), "accepted by the old process");
        assert!(!new.accept(t - w / 4, LATE), "accepted by the new process");
        assert!(!new.accept(t - w - 1, LATE), "below the window of the old process's newest");
        assert!(new.accept(t - w / 3, LATE), "within the window, never seen");
        // A later single stamp (floor 0) moves the window.
        new.merge(0, &[t + 2 * w], LATE);
        assert!(!new.accept(t + w / 2, LATE), "below the moved window");
    }
}
