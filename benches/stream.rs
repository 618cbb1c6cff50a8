//! In-process throughput of a holdfast `Stream` against direct TCP on loopback, same run.
//!
//! `cargo bench --bench stream` (set `HOLDFAST_BENCH_MIB` to change the size, default 512).

use std::time::{Duration, Instant};

use holdfast::keys::{AllowList, Keypair};
use holdfast::{ClientConfig, ServerConfig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

async fn pump<W: AsyncWrite + Unpin>(w: &mut W, total: usize) {
    let buf = vec![0x5au8; 256 * 1024];
    let mut left = total;
    while left > 0 {
        let n = left.min(buf.len());
        w.write_all(&buf[..n]).await.unwrap();
        left -= n;
    }
    w.shutdown().await.unwrap();
}

async fn drain<R: AsyncRead + Unpin>(r: &mut R) -> usize {
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0;
    loop {
        let n = r.read(&mut buf).await.unwrap();
        if n == 0 {
            return total;
        }
        total += n;
    }
}

async fn direct(total: usize) -> Duration {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let rx = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        drain(&mut s).await
    });
    let start = Instant::now();
    let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
    pump(&mut c, total).await;
    assert_eq!(rx.await.unwrap(), total);
    start.elapsed()
}

async fn holdfast(total: usize) -> Duration {
    let sk = Keypair::generate();
    let ck = Keypair::generate();
    let spub = sk.public;
    let allow = AllowList::from_keys([(ck.public, None)]);
    let mut l = holdfast::bind("127.0.0.1:0", ServerConfig::new(sk, allow)).await.unwrap();
    let addr = l.local_addr().to_string();
    let rx = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let n = drain(&mut s).await;
        s.shutdown().await.unwrap();
        n
    });
    let mut c = holdfast::connect(addr, ClientConfig::new(ck, spub)).await.unwrap();
    let start = Instant::now();
    pump(&mut c, total).await;
    assert_eq!(rx.await.unwrap(), total);
    start.elapsed()
}

fn main() {
    let mib: usize = std::env::var("HOLDFAST_BENCH_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(512);
    let total = mib << 20;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let rate = |d: Duration| (total as f64 * 8.0) / d.as_secs_f64() / 1e9;
    let mut d = Vec::new();
    let mut h = Vec::new();
    for _ in 0..3 {
        d.push(rate(rt.block_on(direct(total))));
        h.push(rate(rt.block_on(holdfast(total))));
    }
    d.sort_by(f64::total_cmp);
    h.sort_by(f64::total_cmp);
    println!(
        "one stream, {mib} MiB, median of 3 (Gbit/s): direct TCP {:.2}, holdfast {:.2}, ratio {:.2}",
        d[1],
        h[1],
        h[1] / d[1]
    );
}
