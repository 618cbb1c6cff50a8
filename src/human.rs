//! Values shown to people: durations rounded to what a person reads, and text from a peer made
//! safe to put in a log line.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::time::Duration;

/// Text from a peer (a service name, a CLOSE reason, a server's message), made safe to log:
/// control characters (C0 including newline and carriage return, DEL, C1), the Unicode line and
/// paragraph separators and the bidirectional-text controls are replaced by Rust-style escapes
/// (`\n`, `\r`, `\t`, `\u{1b}`, `\u{202e}`), so the text can neither start a fake log line nor
/// rearrange or recolour what a terminal shows. Everything else, other non-ASCII text included,
/// is kept. Borrowed when nothing needed escaping.
pub fn printable(text: &str) -> Cow<'_, str> {
    if !text.chars().any(needs_escape) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if needs_escape(c) => {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Control characters, line and paragraph separators, and bidirectional-text controls.
fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{061c}' | '\u{200e}' | '\u{200f}')
        || ('\u{202a}'..='\u{202e}').contains(&c)
        || ('\u{2066}'..='\u{2069}').contains(&c)
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

    #[test]
    fn peer_text_cannot_break_a_log_line() {
        assert!(matches!(printable("ssh-2.db_x"), Cow::Borrowed("ssh-2.db_x")));
        assert_eq!(printable("café ünïcode"), "café ünïcode");
        let fake = "x\n2026-01-01T00:00:00.000000Z  INFO fake line";
        assert_eq!(printable(fake), "x\\n2026-01-01T00:00:00.000000Z  INFO fake line");
        assert_eq!(printable("a\r\tb\u{1b}[31mc\u{7f}\u{85}"), "a\\r\\tb\\u{1b}[31mc\\u{7f}\\u{85}");
        assert_eq!(printable("\u{202e}evil\u{2028}x\u{2066}"), "\\u{202e}evil\\u{2028}x\\u{2066}");
        for c in (0..0x20).chain(0x7f..0xa0).filter_map(char::from_u32) {
            let shown = printable(&c.to_string()).into_owned();
            assert!(shown.starts_with('\\') && !shown.chars().any(char::is_control), "{c:?} -> {shown:?}");
        }
    }
}
