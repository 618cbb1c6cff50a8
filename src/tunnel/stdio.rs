//! Stdio mode: one stream on standard input and output, for `ssh -o ProxyCommand`.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use zeroize::Zeroizing;

use crate::net::Stream;

const COPY_BUF: usize = 64 * 1024;

/// Joins standard input and output to a holdfast stream (for `ssh -o ProxyCommand`). EOF on
/// stdin is a half-close; the function returns when both directions are done.
///
/// # Errors
/// The first I/O error of either direction.
pub async fn stdio(stream: Stream) -> io::Result<(u64, u64)> {
    let (sr, sw) = stream.into_split();
    let up = pipe(tokio::io::stdin(), sw);
    let down = async {
        let mut out = tokio::io::stdout();
        let n = pipe(sr, &mut out).await?;
        out.flush().await?;
        Ok(n)
    };
    tokio::try_join!(up, down)
}

/// Copies `from` to `to` until EOF, then half-closes `to`. Returns the byte count.
async fn pipe<R, W>(mut from: R, mut to: W) -> io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = Zeroizing::new(vec![0u8; COPY_BUF]);
    let mut total = 0u64;
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            to.shutdown().await?;
            return Ok(total);
        }
        to.write_all(&buf[..n]).await?;
        total += n as u64;
    }
}
