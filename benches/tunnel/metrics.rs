//! Metrics that run on every path: bulk throughput each way, request/response round trips and
//! new connections with a one-byte echo.

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::util::{err, gbit, pct_us};
use super::MSG;

/// A TCP connection to `entry` with Nagle off.
pub(crate) async fn connect(entry: SocketAddr) -> io::Result<TcpStream> {
    let s = TcpStream::connect(entry).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// One stream up: time from the first byte written to the sink's answer after EOF.
pub(crate) async fn tput_up(entry: SocketAddr, bytes: u64) -> io::Result<f64> {
    let mut s = connect(entry).await?;
    let buf = vec![0x5au8; 256 << 10];
    let start = Instant::now();
    s.write_all(b"U").await?;
    let mut left = bytes;
    while left > 0 {
        let n = (left as usize).min(buf.len());
        s.write_all(&buf[..n]).await?;
        left -= n as u64;
    }
    s.shutdown().await?;
    if s.read_u8().await? != b'k' {
        return Err(err("bad sink answer"));
    }
    Ok(gbit(bytes, start.elapsed()))
}

/// One stream down: time from the request to the last byte.
pub(crate) async fn tput_down(entry: SocketAddr, bytes: u64) -> io::Result<f64> {
    let mut s = connect(entry).await?;
    let mut buf = vec![0u8; 256 << 10];
    let start = Instant::now();
    let mut req = vec![b'D'];
    req.extend_from_slice(&bytes.to_be_bytes());
    s.write_all(&req).await?;
    let mut got = 0u64;
    while got < bytes {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            return Err(err(format!("EOF after {got} of {bytes} bytes")));
        }
        got += n as u64;
    }
    Ok(gbit(bytes, start.elapsed()))
}

/// Request/response round trips of `MSG` bytes on one connection: (p50, p99) in µs.
pub(crate) async fn rtt(entry: SocketAddr, samples: usize) -> io::Result<(f64, f64)> {
    let mut s = connect(entry).await?;
    let (mut r, mut w) = s.split();
    echo_rtt(&mut r, &mut w, samples).await
}

/// Asks the service to echo (`E`) on `w`/`r`, then times `samples` round trips of `MSG` bytes
/// after a tenth as many to warm up: (p50, p99) in µs.
pub(crate) async fn echo_rtt<R, W>(r: &mut R, w: &mut W, samples: usize) -> io::Result<(f64, f64)>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    w.write_all(b"E").await?;
    let msg = [0x42u8; MSG];
    let mut back = [0u8; MSG];
    let warm = samples / 10;
    let mut times = Vec::with_capacity(samples);
    for i in 0..warm + samples {
        let t = Instant::now();
        w.write_all(&msg).await?;
        r.read_exact(&mut back).await?;
        if i >= warm {
            times.push(t.elapsed());
        }
    }
    times.sort();
    Ok((pct_us(&times, 0.50), pct_us(&times, 0.99)))
}

/// New connections, each with a one-byte echo, one every `pace`: (p50, p90) in µs.
pub(crate) async fn conn_echo(entry: SocketAddr, samples: usize, pace: Duration) -> io::Result<(f64, f64)> {
    let mut times = Vec::with_capacity(samples);
    let mut next = Instant::now();
    for _ in 0..samples {
        tokio::time::sleep_until(next.into()).await;
        next += pace;
        let t = Instant::now();
        let mut s = connect(entry).await?;
        s.write_all(b"Ex").await?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await?;
        times.push(t.elapsed());
    }
    times.sort();
    Ok((pct_us(&times, 0.50), pct_us(&times, 0.90)))
}
