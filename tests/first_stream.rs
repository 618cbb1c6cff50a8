//! A server that writes on a session's first stream the moment it accepts it.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::harness::server_and_client;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `Listener::accept` hands out the session's first stream before its OPEN arrives, and the
/// server may write on it at once; `connect`'s client must hold that stream before its driver
/// can read anything (it used to open it after starting the driver, and a busy machine let the
/// server's first DATA in between: "stream DATA for a stream never opened", the session lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_writes_at_once_on_the_first_stream_is_read() {
    // Threads that compete for the CPUs, so that the connecting task is preempted often.
    let stop = Arc::new(AtomicBool::new(false));
    let hogs: Vec<_> = (0..4)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            })
        })
        .collect();
    let (mut listener, ccfg) = server_and_client().await;
    let addr = listener.local_addr().to_string();
    let server = tokio::spawn(async move {
        while let Ok((mut stream, _peer)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = stream.write_all(b"hello").await;
                let mut rest = Vec::new();
                let _ = stream.read_to_end(&mut rest).await;
            });
        }
    });
    let mut failures = Vec::new();
    for i in 0..200 {
        let mut stream = holdfast::connect(addr.clone(), ccfg.clone()).await.unwrap();
        let mut buf = [0u8; 5];
        match tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut buf)).await {
            Ok(Ok(_)) => assert_eq!(&buf, b"hello"),
            Ok(Err(e)) if e.to_string().contains("never opened") => failures.push(format!("connection {i}: {e}")),
            Ok(Err(e)) => panic!("connection {i}: {e}"),
            Err(_) => panic!("connection {i}: no bytes in 10 s"),
        }
        let _ = stream.shutdown().await;
    }
    stop.store(true, Ordering::Relaxed);
    for h in hogs {
        h.join().unwrap();
    }
    server.abort();
    assert!(failures.is_empty(), "{} of 200 failed: {:?}", failures.len(), &failures[..failures.len().min(3)]);
}
