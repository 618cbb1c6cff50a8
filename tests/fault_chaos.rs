//! Integration tests through a chaos TCP proxy that breaks real connections mid-transfer.
//!
//! Each test moves data through `client -> proxy -> server` on loopback, injects faults, and
//! proves the received byte streams are identical to what was sent (SHA-256), counting resumes.

mod common;

use std::time::Duration;

use common::chaos::{ChaosProxy, Dir};
use common::harness::{next_resume, pattern_hash, recv_hash, send_pattern, server_and_client};
use holdfast::LinkEvent;

const MIB: usize = 1 << 20;

/// 64 MiB each way at once through 24 forced faults of five kinds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_both_ways_survives_many_faults() {
    let size = 64 * MIB;
    let faults = 24u64;
    let run = async {
        let (mut listener, ccfg) = server_and_client().await;
        let proxy = ChaosProxy::start(listener.local_addr()).await.unwrap();
        let server = tokio::spawn(async move {
            let (stream, _peer) = listener.accept().await.unwrap();
            let (mut r, mut w) = stream.into_split();
            let send = tokio::spawn(async move { send_pattern(&mut w, 2, size).await.unwrap() });
            let got = recv_hash(&mut r).await.unwrap();
            (got, send.await.unwrap(), listener)
        });
        let stream = holdfast::connect(proxy.addr().to_string(), ccfg).await.unwrap();
        let mut events = stream.events();
        let (mut r, mut w) = stream.into_split();
        let send = tokio::spawn(async move { send_pattern(&mut w, 1, size).await.unwrap() });
        let recv = tokio::spawn(async move { recv_hash(&mut r).await.unwrap() });

        // Inject one fault every 2 MiB forwarded, and wait for its resume before the next. (The
        // 24 marks must stay well inside the 128 MiB the test moves, however fast it moves.)
        let mut resumes = 0u64;
        for i in 0..faults {
            let mark = proxy.bytes_forwarded() + 2 * MIB as u64;
            assert!(proxy.wait_for_bytes(mark, Duration::from_secs(20)).await, "no progress before fault {i}");
            match i % 6 {
                0 => proxy.kill_all(),
                1 => proxy.stall_all(),
                2 => proxy.cut_after(Dir::ClientToServer, 1000 + i as usize * 7), // mid-record
                3 => proxy.flip_bit(Dir::ServerToClient),
                4 => proxy.inject_garbage(Dir::ClientToServer, vec![0x42; 300]),
                _ => proxy.cut_after(Dir::ServerToClient, 5),
            }
            match next_resume(&mut events, Duration::from_secs(10)).await {
                Some(LinkEvent::Resumed { .. }) => resumes += 1,
                other => panic!("fault {i} ({}) did not resume: {other:?}", i % 6),
            }
        }
        let client_sent = send.await.unwrap();
        let client_got = recv.await.unwrap();
        let (server_got, server_sent, listener) = server.await.unwrap();
        assert_eq!(client_sent, pattern_hash(1, size));
        assert_eq!(server_got, (size as u64, client_sent), "client->server stream differs");
        assert_eq!(client_got, (size as u64, server_sent), "server->client stream differs");
        assert_eq!(resumes, faults);
        assert!(listener.stats().resumes >= faults as usize);
        assert!(proxy.faults_injected() >= faults);
    };
    tokio::time::timeout(Duration::from_secs(120), run).await.expect("test exceeded its time bound");
}
