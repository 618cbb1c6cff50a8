//! The public-key work of a new connection, in process: how long each step of the first
//! handshake (Noise IK) takes through the library's sans-IO `proto` API, for both ciphers.
//!
//! ```text
//! cargo bench --bench handshake
//! ```
//!
//! `HOLDFAST_BENCH_HANDSHAKES` sets the number of handshakes (default 2000). Each step is timed
//! separately: the client's hello, the server's reply (the server's whole share of the
//! handshake) and the client reading the reply. See BENCHMARKS.md.

use std::time::{Duration, Instant};

use holdfast::keys::Keypair;
use holdfast::proto::handshake::{respond, ClientHandshake};
use holdfast::proto::Cipher;

fn main() {
    let n: u32 = std::env::var("HOLDFAST_BENCH_HANDSHAKES").ok().and_then(|v| v.parse().ok()).unwrap_or(2000).max(1);
    let (client, server) = (Keypair::generate(), Keypair::generate());
    println!("# holdfast handshake steps ({n} IK handshakes per cipher, one thread)\n");
    println!("| cipher | client hello µs | server reply µs | client reads reply µs | handshakes/s (both sides) |");
    println!("|---|---:|---:|---:|---:|");
    for cipher in Cipher::ALL {
        let (mut hello, mut reply, mut read) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
        for _ in 0..n {
            let t0 = Instant::now();
            let (hs, msg) = ClientHandshake::initial(&client.private, &server.public, cipher, 1).expect("hello");
            let t1 = Instant::now();
            let acc = respond(&msg, &server.private, |_| true, |_| None).expect("reply");
            let t2 = Instant::now();
            let done = hs.read_reply(&acc.reply).expect("read reply");
            let t3 = Instant::now();
            std::hint::black_box(done);
            (hello, reply, read) = (hello + (t1 - t0), reply + (t2 - t1), read + (t3 - t2));
        }
        let us = |d: Duration| d.as_secs_f64() * 1e6 / f64::from(n);
        let total = (hello + reply + read).as_secs_f64();
        println!("| {cipher} | {:.0} | {:.0} | {:.0} | {:.0} |", us(hello), us(reply), us(read), f64::from(n) / total);
    }
}
