//! The request head of a metrics scrape (`holdfast server --metrics`): read from a stranger's
//! connection, bounded, and routed. The command-line server does the I/O (`src/cli/metrics.rs`);
//! this module holds the part that parses what the stranger sent, so that the fuzz target
//! `metrics_head` runs the same code.
//!
//! Only the request line is looked at: its method and its path, without the query. The header
//! lines are not parsed, only skipped to the blank line that ends the head. A head longer than
//! [`MAX_REQUEST`] is refused before more is kept.

/// The longest request head read; a longer one is answered 431 and closed.
pub const MAX_REQUEST: usize = 8 * 1024;

/// A request head being read.
#[derive(Debug, Default)]
pub struct Head {
    buf: Vec<u8>,
}

/// What [`Head::push`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// The head has not ended yet: read more.
    More,
    /// The head ended (a blank line), or the connection did: answer it.
    Complete,
    /// The head is longer than [`MAX_REQUEST`]: answer 431 and close.
    TooLong,
}

/// Where a request goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `GET /metrics` (any query): the metrics.
    Metrics,
    /// `GET` of another path: 404.
    NotFound,
    /// Another method, or no request line: 405.
    MethodNotAllowed,
}

impl Head {
    /// Adds bytes read from the connection. An empty `bytes` is the end of the connection,
    /// which completes the head as it is.
    pub fn push(&mut self, bytes: &[u8]) -> Progress {
        if bytes.is_empty() {
            return Progress::Complete;
        }
        // Only the new bytes (and the three before them) can complete the blank line.
        let from = self.buf.len().saturating_sub(3);
        self.buf.extend_from_slice(bytes);
        let tail = &self.buf[from..];
        if tail.windows(4).any(|w| w == b"\r\n\r\n") || tail.windows(2).any(|w| w == b"\n\n") {
            return Progress::Complete;
        }
        if self.buf.len() > MAX_REQUEST {
            return Progress::TooLong;
        }
        Progress::More
    }

    /// Bytes kept so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// True if nothing was read.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Routes the request by its request line (its first line): the method and the path.
    pub fn route(&self) -> Route {
        let line = self.buf.split(|&b| b == b'\n').next().unwrap_or_default();
        let line = String::from_utf8_lossy(line);
        let mut words = line.split_whitespace();
        let (method, target) = (words.next().unwrap_or_default(), words.next().unwrap_or_default());
        let path = target.split('?').next().unwrap_or_default();
        match (method, path) {
            ("GET", "/metrics") => Route::Metrics,
            ("GET", _) => Route::NotFound,
            _ => Route::MethodNotAllowed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(chunks: &[&[u8]]) -> (Head, Progress) {
        let mut h = Head::default();
        let mut p = Progress::More;
        for c in chunks {
            p = h.push(c);
            if p != Progress::More {
                break;
            }
        }
        (h, p)
    }

    #[test]
    fn requests_are_routed_by_method_and_path() {
        let (h, p) = head(&[b"GET /metrics?x=1 HTTP/1.1\r\nHost: x\r\n\r\n"]);
        assert_eq!((p, h.route()), (Progress::Complete, Route::Metrics));
        let (h, _) = head(&[b"GET /metrics/x HTTP/1.1\r\n\r\n"]);
        assert_eq!(h.route(), Route::NotFound);
        let (h, _) = head(&[b"POST /metrics HTTP/1.1\r\n\r\n"]);
        assert_eq!(h.route(), Route::MethodNotAllowed);
        let (h, p) = head(&[b"", b"GET /metrics"]);
        assert_eq!((p, h.route()), (Progress::Complete, Route::MethodNotAllowed), "nothing before the end");
    }

    #[test]
    fn the_blank_line_is_found_across_reads() {
        let (h, p) = head(&[b"GET /metrics HTTP/1.1\r\n\r", b"\n"]);
        assert_eq!((p, h.route()), (Progress::Complete, Route::Metrics));
        let (_, p) = head(&[b"GET / HTTP/1.0\n", b"\n"]);
        assert_eq!(p, Progress::Complete);
    }

    #[test]
    fn a_head_longer_than_the_limit_is_refused() {
        let mut h = Head::default();
        let line = [b'a'; 1000];
        let mut p = Progress::More;
        while p == Progress::More {
            p = h.push(&line);
        }
        assert_eq!(p, Progress::TooLong);
        assert!(h.len() <= MAX_REQUEST + line.len());
    }
}
