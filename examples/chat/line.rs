//! The chat's line protocol and what the room and the client share: line splitting, name
//! rules, and the `Show` channel to the user.
//!
//! On the stream, everything is a newline-terminated UTF-8 line:
//! - client to room: first `HELLO <name>`, then one chat line per line;
//! - room to client: `<name>: <text>` for a message, `* <notice>` for the welcome, joins and
//!   leaves, and `! <reason>` for a refusal, after which the room closes the stream.
//!
//! The application never resends anything. holdfast delivers every byte written exactly once,
//! in order, across faults. So each line is written once and read once, and a reconnect is not
//! something the chat has to handle: it only shows it to the user.

#![allow(dead_code)] // the example uses one part, the test another

use std::collections::VecDeque;
use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;

pub const MAX_LINE: usize = 4096;
/// Longest member name.
pub const MAX_NAME: usize = 32;
/// Lines queued for one member before the room drops that member as too far behind.
pub const MEMBER_QUEUE: usize = 4096;
/// How long a new session may take to say `HELLO`.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(60);
/// How long closing a stream (FIN until acknowledged) may take.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// After a client's FIN was acknowledged, how long it waits for the room to close its side.
pub const EOF_GRACE: Duration = Duration::from_secs(3);

/// Something to show the user: chat text (stdout) or a status line (stderr).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Show {
    /// A line of the conversation.
    Text(String),
    /// A `[link]`, `[room]` or `[chat]` status line.
    Status(String),
}

/// Where the room and the client send what they show.
pub type Out = mpsc::UnboundedSender<Show>;

pub fn status(out: &Out, s: impl Into<String>) {
    let _ = out.send(Show::Status(s.into()));
}

pub fn text(out: &Out, s: impl Into<String>) {
    let _ = out.send(Show::Text(s.into()));
}

/// Checks a member name: 1 to 32 of `A-Z a-z 0-9 _ . -`, starting with a letter or digit.
/// `seat-*` is reserved for the room's pre-generated keys (see `setup.rs`).
pub fn check_name(name: &str) -> Result<(), String> {
    let ok_chars = name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    let ok_start = name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
    if name.len() > MAX_NAME || !ok_chars || !ok_start {
        return Err(format!(
            "{name:?} is not a valid name: use 1 to {MAX_NAME} letters, digits, '_', '.' or '-', starting with a letter or digit"
        ));
    }
    if name.starts_with("seat-") {
        return Err(format!("{name:?} is not a valid name: names starting with \"seat-\" are reserved"));
    }
    Ok(())
}

/// Replaces control characters (terminal escapes) by `?`, so that a line cannot rewrite the
/// reader's screen.
pub fn clean(line: &str) -> String {
    line.chars().map(|c| if c.is_control() && c != '\t' { '?' } else { c }).collect()
}

/// A duration for people: milliseconds below a tenth of a second (a resume after a reset
/// takes a few), else seconds to one decimal.
pub fn secs(d: Duration) -> String {
    if d < Duration::from_millis(100) {
        format!("{}ms", d.as_millis())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

/// Splits received bytes into lines.
#[derive(Default)]
pub struct Lines {
    partial: Vec<u8>,
    ready: VecDeque<String>,
}

impl Lines {
    /// Adds received bytes. Fails if a line grows longer than [`MAX_LINE`].
    pub fn feed(&mut self, mut data: &[u8]) -> Result<(), String> {
        while let Some(i) = data.iter().position(|&b| b == b'\n') {
            self.partial.extend_from_slice(&data[..i]);
            data = &data[i + 1..];
            if self.partial.len() > MAX_LINE {
                return Err(format!("line longer than {MAX_LINE} bytes"));
            }
            let mut line = String::from_utf8_lossy(&self.partial).into_owned();
            if line.ends_with('\r') {
                line.pop();
            }
            self.ready.push_back(line);
            self.partial.clear();
        }
        self.partial.extend_from_slice(data);
        if self.partial.len() > MAX_LINE {
            return Err(format!("line longer than {MAX_LINE} bytes"));
        }
        Ok(())
    }

    /// The next complete line.
    pub fn next_line(&mut self) -> Option<String> {
        self.ready.pop_front()
    }
}

/// Reads until one complete line is available; `None` at end of stream.
pub async fn read_line<S: AsyncRead + Unpin>(s: &mut S, lines: &mut Lines) -> io::Result<Option<String>> {
    let mut buf = [0u8; 4096];
    loop {
        if let Some(line) = lines.next_line() {
            return Ok(Some(line));
        }
        let n = s.read(&mut buf).await?;
        if n == 0 {
            return Ok(None);
        }
        lines.feed(&buf[..n]).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    }
}
