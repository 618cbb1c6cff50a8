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

/// Text with the operating system's error messages (`Software caused connection abort (os
/// error 103)`, as `std::io::Error` shows them) said in plain words for a person at a terminal:
/// "the connection was aborted". An error without words of its own here keeps
/// the system's description, without its `(os error N)`. Other text is kept as it is.
pub fn os_errors_in_words(text: &str) -> Cow<'_, str> {
    const MARK: &str = " (os error ";
    if !text.contains(MARK) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(MARK) {
        let after = &rest[at + MARK.len()..];
        let Some(close) = after.find(')') else { break };
        let Ok(code) = after[..close].parse::<i32>() else {
            out.push_str(&rest[..at + MARK.len()]);
            rest = after;
            continue;
        };
        // The system's description runs from the last ": " before it (or the start).
        let start = rest[..at].rfind(": ").map_or(0, |i| i + 2);
        out.push_str(&rest[..start]);
        match in_words(std::io::Error::from_raw_os_error(code).kind()) {
            Some(words) => out.push_str(words),
            None => out.push_str(&rest[start..at]),
        }
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    Cow::Owned(out)
}

/// Plain words for the errors a link meets.
fn in_words(kind: std::io::ErrorKind) -> Option<&'static str> {
    use std::io::ErrorKind as K;
    Some(match kind {
        K::ConnectionAborted => "the connection was aborted",
        K::ConnectionReset => "the connection was reset",
        K::ConnectionRefused => "the connection was refused",
        K::TimedOut => "the connection timed out",
        K::BrokenPipe => "the connection was closed",
        K::HostUnreachable => "the host is unreachable (no route to it)",
        K::NetworkUnreachable => "the network is unreachable",
        K::NetworkDown => "the network is down",
        K::AddrNotAvailable => "this machine no longer has the address the connection used",
        K::NotConnected => "the connection is not up",
        _ => return None,
    })
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

    // Errno numbers are Linux's (ECONNABORTED 103, ECONNRESET 104).
    #[cfg(target_os = "linux")]
    #[test]
    fn os_errors_are_said_in_words() {
        let abort = std::io::Error::from(std::io::ErrorKind::ConnectionAborted);
        let raw = std::io::Error::from_raw_os_error(103);
        assert_eq!(raw.kind(), abort.kind(), "errno 103 is ECONNABORTED on this system");
        let text = format!("link failed: {raw}");
        assert!(text.contains("(os error 103)"), "{text}");
        assert_eq!(os_errors_in_words(&text), "link failed: the connection was aborted");
        let reset = std::io::Error::from_raw_os_error(104);
        let both = format!("a: {reset}; b: {raw}");
        assert_eq!(os_errors_in_words(&both), "a: the connection was reset; b: the connection was aborted");
        // No words of its own: the description stays, the number goes.
        let other = std::io::Error::from_raw_os_error(2);
        let shown = os_errors_in_words(&format!("x: {other}")).into_owned();
        assert_eq!(shown, "x: No such file or directory");
        assert!(matches!(os_errors_in_words("link failed: silence"), Cow::Borrowed(_)));
        assert_eq!(os_errors_in_words("odd (os error x) text"), "odd (os error x) text");
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
