//! One read from a socket that leaves the socket's readiness as the kernel left it: a read that
//! returned fewer bytes than it asked for emptied the socket's receive queue, so its readiness
//! is cleared at once, as tokio's own `poll_read` does, and the next wait goes to epoll instead
//! of trying a second read that would fail with `EAGAIN`. On a ping-pong this saves one system
//! call per message at each socket a tunnel reads (two per round trip in each process).

use std::io;

use tokio::io::Interest;
use tokio::net::TcpStream;

/// Runs `read` (one non-blocking read of at most `asked` bytes from `sock`, such as
/// `sock.try_read_buf(..)`) and returns what it returned; if it read fewer than `asked` bytes
/// (but some), `sock`'s read readiness is cleared. tokio clears it only if no readiness event
/// came since it was last seen, so bytes that arrive meanwhile still wake the next wait.
///
/// # Errors
/// `read`'s error (`WouldBlock` if the socket had nothing).
pub(crate) fn read_once(sock: &TcpStream, asked: usize, read: impl FnOnce() -> io::Result<usize>) -> io::Result<usize> {
    let mut short = None;
    let r = sock.try_io(Interest::READABLE, || {
        let n = read()?;
        if n > 0 && n < asked {
            // Reported as WouldBlock so that tokio clears the readiness; the count is kept.
            short = Some(n);
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match (r, short) {
        (_, Some(n)) => Ok(n),
        (r, None) => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// A short read returns its bytes and clears the readiness; bytes that come later wake the
    /// next wait, and a read that fills what it asked for leaves the readiness set.
    #[tokio::test]
    async fn a_short_read_keeps_its_bytes_and_later_bytes_still_wake() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut w = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (r, _) = l.accept().await.unwrap();
        let limit = std::time::Duration::from_secs(30);
        let mut buf = [0u8; 64];

        w.write_all(b"0123456789").await.unwrap();
        tokio::time::timeout(limit, r.readable()).await.unwrap().unwrap();
        let n = read_once(&r, buf.len(), || r.try_read(&mut buf)).unwrap();
        assert_eq!(&buf[..n], b"0123456789");
        // Cleared: nothing is read until new bytes come (no EAGAIN read needed to learn it).
        let none = read_once(&r, buf.len(), || panic!("read tried with the readiness cleared"));
        assert_eq!(none.unwrap_err().kind(), io::ErrorKind::WouldBlock);

        w.write_all(b"abcdefgh").await.unwrap();
        tokio::time::timeout(limit, r.readable()).await.expect("new bytes did not wake the wait").unwrap();
        // Asking for exactly what is there: a full read, the readiness is kept.
        let n = read_once(&r, 4, || r.try_read(&mut buf[..4])).unwrap();
        assert_eq!(&buf[..n], b"abcd");
        let n = read_once(&r, 4, || r.try_read(&mut buf[..4])).unwrap();
        assert_eq!(&buf[..n], b"efgh");
    }
}
