//! Values shown to people: durations rounded to what a person reads.

use std::time::Duration;

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
