//! Many streams through one path (issue 15): total download throughput of 8 concurrent
//! streams, and one stream's download while another stream's reader has stopped.

use std::io;
use std::net::SocketAddr;
use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::metrics::{connect, tput_down};
use super::util::{err, gbit};

/// `n` streams, each downloading `bytes / n`, at once: total Gbit/s from the first request to
/// the last byte of the last stream.
pub async fn tput_down_n(entry: SocketAddr, bytes: u64, n: u64) -> io::Result<f64> {
    let each = bytes / n;
    let start = Instant::now();
    let mut all = tokio::task::JoinSet::new();
    for _ in 0..n {
        all.spawn(async move {
            let mut s = connect(entry).await?;
            let mut req = vec![b'D'];
            req.extend_from_slice(&each.to_be_bytes());
            s.write_all(&req).await?;
            let mut buf = vec![0u8; 256 << 10];
            let mut got = 0u64;
            while got < each {
                match s.read(&mut buf).await? {
                    0 => return Err(err(format!("EOF after {got} of {each} bytes"))),
                    k => got += k as u64,
                }
            }
            Ok::<_, io::Error>(())
        });
    }
    while let Some(r) = all.join_next().await {
        r.map_err(|e| err(e.to_string()))??;
    }
    Ok(gbit(each * n, start.elapsed()))
}

/// One stream's download while another stream asked for `bytes` and reads none of them: the
/// stalled stream is opened first, and kept open until the measured one is done.
pub async fn tput_down_beside_stalled(entry: SocketAddr, bytes: u64) -> io::Result<f64> {
    let mut stalled = connect(entry).await?;
    let mut req = vec![b'D'];
    req.extend_from_slice(&(bytes * 4).to_be_bytes());
    stalled.write_all(&req).await?;
    // Its first bytes arrive (so the download is under way), then it reads no more.
    let mut first = [0u8; 1];
    stalled.read_exact(&mut first).await?;
    let v = tput_down(entry, bytes).await;
    drop(stalled);
    v
}
