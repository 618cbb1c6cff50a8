//! Stdio mode: one stream on standard input and output, for `ssh -o ProxyCommand`.
//!
//! Every byte is passed on as soon as it arrives, in both directions: nothing waits for a
//! newline, for more data or for EOF (ssh, like any request/response protocol, sends a message
//! and waits for the answer). Standard input and output are used through their file descriptors,
//! never through a buffered writer.
//!
//! When a descriptor is a pipe or a socket (what ssh, socat and inetd give a child), it is
//! switched to non-blocking mode and driven by the runtime's reactor, and bytes go straight
//! between it and the stream's own buffers with `readv`/`writev`: no copy buffer and no thread
//! hop. Its original flags are restored when the copy ends. A terminal or a regular file (which
//! the reactor cannot wait on, and whose flags other processes share) is read and written with
//! plain blocking calls on the runtime's blocking threads instead.

use std::fs::File;
use std::future::Future;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use rustix::fs::{FileType, OFlags};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::watch;
use zeroize::Zeroizing;

use crate::net::{LinkStatus, ReadHalf, Stream, WriteHalf};

/// Bytes moved from standard input into the stream per read.
const FILL: usize = 256 * 1024;
/// Copy buffer of the blocking fallback.
const COPY_BUF: usize = 64 * 1024;
/// How long to wait, once both directions are done, for the session's close to complete (so
/// the server ends the session at once instead of keeping it detached for a resume).
const CLOSE_WAIT: Duration = Duration::from_secs(5);
/// After a hang-up: how long the last bytes the program wrote and the peer's end of stream
/// may take before the session is aborted.
const HANGUP_GRACE: Duration = Duration::from_secs(2);

/// Joins standard input and output to a holdfast stream (for `ssh -o ProxyCommand`). EOF on
/// stdin is a half-close (an authenticated FIN); the end of the peer's stream closes stdout.
/// Returns the bytes moved (stdin to stream, stream to stdout) once both directions are done
/// and the session's close has completed (bounded), so the process can exit at once.
///
/// `hangup` resolving means the program at the other end of stdio is gone: ssh sends its
/// ProxyCommand `SIGHUP` when it exits. What the program wrote is still delivered and the
/// session is closed (cleanly if the peer's stream ends within a short grace time, aborted
/// otherwise), so the server does not keep it waiting for a resume.
///
/// # Errors
/// The first I/O error of either direction: the stream's failure, or a read or write error on
/// stdin or stdout (for example `BrokenPipe` when the program reading stdout exited).
pub async fn stdio(stream: Stream, hangup: impl Future<Output = ()>) -> io::Result<(u64, u64)> {
    let status = stream.status();
    let (mut sr, sw) = stream.into_split();
    let res = async {
        let input = Stdin::open()?;
        let mut output = Stdout::open()?;
        let up = input.copy_to(sw);
        let mut down = Box::pin(output.copy_from(&mut sr));
        tokio::pin!(up, hangup);
        let (mut up_res, mut down_res) = (None, None);
        while up_res.is_none() || down_res.is_none() {
            tokio::select! {
                r = &mut up, if up_res.is_none() => up_res = Some(r?),
                r = &mut down, if down_res.is_none() => down_res = Some(r?),
                () = &mut hangup => {
                    // Nobody reads stdout any more: what the program wrote before it went
                    // (stdin, read to its EOF) is delivered, and what the peer still sends is
                    // discarded until its end of stream, within a grace time.
                    drop(down);
                    let mut discard = Zeroizing::new(vec![0u8; 4096]);
                    let finish = async {
                        let up = match up_res {
                            Some(n) => n,
                            None => up.await.unwrap_or(0),
                        };
                        while matches!(sr.read(&mut discard[..]).await, Ok(1..)) {}
                        up
                    };
                    let up = tokio::time::timeout(HANGUP_GRACE, finish).await.unwrap_or(0);
                    return Ok((up, down_res.unwrap_or(0)));
                }
            }
        }
        Ok((up_res.unwrap_or(0), down_res.unwrap_or(0)))
    }
    .await;
    // Both halves are gone now: the driver sends the last ACK and CLOSE (or aborts the session
    // if it did not finish). Exiting before it did would leave the server holding a detached
    // session until it expires.
    drop(sr);
    wait_closed(status).await;
    res
}

/// Waits (bounded by [`CLOSE_WAIT`]) until the stream's session has ended.
async fn wait_closed(mut status: watch::Receiver<LinkStatus>) {
    let ended = |s: &LinkStatus| matches!(s, LinkStatus::Closed | LinkStatus::Failed(_));
    let _ = tokio::time::timeout(CLOSE_WAIT, status.wait_for(ended)).await;
}

/// A duplicate of standard input or output and its original flags, switched to non-blocking
/// mode if it is a pipe or a socket; `None` for anything else.
fn nonblocking(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<(OwnedFd, Option<OFlags>)> {
    let owned = fd.try_clone_to_owned()?;
    let kind = FileType::from_raw_mode(rustix::fs::fstat(&owned)?.st_mode);
    if !matches!(kind, FileType::Fifo | FileType::Socket) {
        return Ok((owned, None));
    }
    let flags = rustix::fs::fcntl_getfl(&owned)?;
    rustix::fs::fcntl_setfl(&owned, flags | OFlags::NONBLOCK)?;
    Ok((owned, Some(flags)))
}

/// Gives a descriptor back the flags it had before [`nonblocking`].
fn restore(fd: impl AsFd, flags: OFlags) {
    let _ = rustix::fs::fcntl_setfl(fd, flags);
}

fn blocking(fd: OwnedFd) -> tokio::fs::File {
    tokio::fs::File::from_std(File::from(fd))
}

/// Standard input, as the copy reads it.
enum Stdin {
    /// A pipe or socket on the reactor (tokio's pipe type only `read`s the descriptor, which
    /// works for a socket too); the flags are restored on drop.
    Reactor(pipe::Receiver, OFlags),
    /// A terminal or a file, read with blocking calls.
    Blocking(tokio::fs::File),
}

impl Stdin {
    fn open() -> io::Result<Stdin> {
        let (fd, flags) = nonblocking(io::stdin().as_fd())?;
        let Some(flags) = flags else { return Ok(Stdin::Blocking(blocking(fd))) };
        // A second descriptor of the same open file, to give the flags back if registering fails.
        let spare = fd.try_clone()?;
        Ok(match pipe::Receiver::from_owned_fd_unchecked(fd) {
            Ok(rx) => Stdin::Reactor(rx, flags),
            Err(_) => {
                restore(&spare, flags);
                Stdin::Blocking(blocking(spare))
            }
        })
    }

    /// Copies standard input into the stream until EOF, then half-closes the stream (the
    /// returned future completes once the peer acknowledged every byte). The stream's reset or
    /// its session's failure ends it with that error even while standard input is silent (the
    /// peer's half may have ended already: then nothing else would notice).
    async fn copy_to(mut self, mut to: WriteHalf) -> io::Result<u64> {
        let mut total = 0u64;
        match &mut self {
            Stdin::Reactor(rx, _) => loop {
                tokio::select! {
                    biased;
                    r = rx.readable() => r?,
                    e = to.stopped() => return Err(e),
                }
                match to.write_with(FILL, |bufs| rx.try_read_vectored(bufs)).await {
                    Ok(0) => break,
                    Ok(n) => total += n as u64,
                    Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => {}
                    Err(e) => return Err(e),
                }
            },
            Stdin::Blocking(file) => {
                let mut buf = Zeroizing::new(vec![0u8; COPY_BUF]);
                loop {
                    let n = tokio::select! {
                        biased;
                        r = file.read(&mut buf) => r?,
                        e = to.stopped() => return Err(e),
                    };
                    if n == 0 {
                        break;
                    }
                    to.write_all(&buf[..n]).await?;
                    total += n as u64;
                }
            }
        }
        drop(self);
        to.shutdown().await?;
        Ok(total)
    }
}

impl Drop for Stdin {
    fn drop(&mut self) {
        if let Stdin::Reactor(rx, flags) = self {
            restore(rx.as_fd(), *flags);
        }
    }
}

/// Standard output, as the copy writes it.
enum Stdout {
    /// A pipe or socket on the reactor; the flags are restored on drop.
    Reactor(pipe::Sender, OFlags),
    /// A terminal or a file, written with blocking calls.
    Blocking(tokio::fs::File),
    /// Closed at the end of the peer's stream.
    Closed,
}

impl Stdout {
    fn open() -> io::Result<Stdout> {
        let (fd, flags) = nonblocking(io::stdout().as_fd())?;
        let Some(flags) = flags else { return Ok(Stdout::Blocking(blocking(fd))) };
        let spare = fd.try_clone()?;
        Ok(match pipe::Sender::from_owned_fd_unchecked(fd) {
            Ok(tx) => Stdout::Reactor(tx, flags),
            Err(_) => {
                restore(&spare, flags);
                Stdout::Blocking(blocking(spare))
            }
        })
    }

    /// Copies the stream into standard output until the stream ends, then closes standard
    /// output so that the program reading it sees EOF.
    async fn copy_from(&mut self, from: &mut ReadHalf) -> io::Result<u64> {
        let mut total = 0u64;
        match self {
            Stdout::Reactor(tx, _) => loop {
                match from.read_with(|bufs| tx.try_write_vectored(bufs)).await {
                    Ok(0) => break,
                    Ok(n) => total += n as u64,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => tx.writable().await?,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            },
            Stdout::Blocking(file) => {
                let mut buf = Zeroizing::new(vec![0u8; COPY_BUF]);
                loop {
                    let n = from.read(&mut buf).await?;
                    if n == 0 {
                        break;
                    }
                    file.write_all(&buf[..n]).await?;
                    total += n as u64;
                }
                file.flush().await?;
            }
            Stdout::Closed => return Ok(0),
        }
        *self = Stdout::Closed;
        close_stdout()?;
        Ok(total)
    }
}

impl Drop for Stdout {
    fn drop(&mut self) {
        if let Stdout::Reactor(tx, flags) = self {
            restore(tx.as_fd(), *flags);
        }
    }
}

/// Closes standard output (our duplicate of it is already gone) by putting `/dev/null` in its
/// place, so that the reader of the pipe sees EOF while this process still runs.
fn close_stdout() -> io::Result<()> {
    let null = std::fs::OpenOptions::new().write(true).open("/dev/null")?;
    rustix::stdio::dup2_stdout(&null)?;
    Ok(())
}
