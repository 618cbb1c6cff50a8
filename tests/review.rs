//! The findings of the independent security review (issue 13), and of an implementation written
//! from docs/PROTOCOL.md alone, each against a real listener on
//! loopback: replayed hellos hold nothing and use up nothing, a delayed older link cannot undo a
//! newer one, one key cannot starve the others, and a low-order key authenticates nobody.
//!
//! The attacker here records and replays whole hellos and holds back records; it never has a
//! private key. Replays come from many source addresses (127.0.0.2–127.0.0.254), so the
//! per-source handshake rate is not what stops them. Run: `cargo test --release --test review`.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::harness::fast_session;
use common::raw::{connect_from, recv_record, seal, send_record};
use holdfast::keys::{AllowList, Keypair, PublicKey};
use holdfast::net::Limits;
use holdfast::proto::streams::wire::Header;
use holdfast::proto::{Cipher, ClientHandshake, Frame, HandshakeError, Ticket, Transport};
use holdfast::{ClientConfig, Listener, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const LIMIT: Duration = Duration::from_secs(60);

async fn bounded<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(LIMIT, f).await.expect("test exceeded its time bound")
}

/// A server allowing `clients`, with `limits`; the clients' configurations.
async fn server(limits: Limits, clients: &[Keypair]) -> (Listener, Vec<ClientConfig>, Keypair) {
    let server_keys = Keypair::generate();
    let copy = Keypair::from_private(holdfast::keys::PrivateKey::from_bytes(*server_keys.private.as_bytes()));
    let allow = AllowList::from_keys(clients.iter().map(|k| (k.public, None)));
    let mut scfg = ServerConfig::new(server_keys, allow);
    scfg.limits = limits;
    scfg.session = fast_session();
    let listener = holdfast::bind("127.0.0.1:0", scfg).await.expect("bind loopback");
    let cfgs = clients
        .iter()
        .map(|k| {
            let mut c = ClientConfig::new(Keypair::from_private(k.private.clone()), copy.public);
            c.session = fast_session();
            c.recovery.backoff_initial = Duration::from_millis(10);
            c.recovery.backoff_max = Duration::from_millis(100);
            c
        })
        .collect();
    (listener, cfgs, copy)
}

/// A first connection by hand: hello, reply, confirmation. Returns the connection, its transport
/// and the first ticket, and the hello's bytes (what an attacker on the path records).
async fn first_link(
    addr: SocketAddr,
    me: &Keypair,
    server: &PublicKey,
    stamp: u64,
) -> (TcpStream, Transport, Ticket, Vec<u8>) {
    let mut sock = TcpStream::connect(addr).await.unwrap();
    let (hs, hello) = ClientHandshake::initial(&me.private, server, Cipher::AesGcm, stamp).unwrap();
    send_record(&mut sock, &hello).await;
    let mut done = hs.read_reply(&recv_record(&mut sock).await.expect("IK reply")).unwrap();
    let ticket = done.ticket.take().expect("first ticket");
    let rec = seal(&mut done.transport, Frame::Ack(0));
    sock.write_all(&rec).await.unwrap();
    (sock, done.transport, ticket, hello)
}

/// Sends a resume hello on a new connection and reads the reply: the connection and the new
/// transport, or the handshake error.
async fn resume_hello(
    addr: SocketAddr,
    me: &Keypair,
    server: &PublicKey,
    ticket: &Ticket,
    attempt: u64,
    offsets: (u64, u64),
) -> Result<(TcpStream, Transport, Vec<u8>), HandshakeError> {
    let mut sock = TcpStream::connect(addr).await.unwrap();
    let (hs, hello) = ClientHandshake::resume(&me.private, server, ticket, attempt, offsets, Cipher::AesGcm)?;
    send_record(&mut sock, &hello).await;
    let reply = recv_record(&mut sock).await.ok_or(HandshakeError::Auth)?;
    Ok((sock, hs.read_reply(&reply)?.transport, hello))
}

/// What a replayed hello gets: `None` for a silent close, else the reply's kind and code.
async fn replay(addr: SocketAddr, from: u8, hello: &[u8]) -> Option<Vec<u8>> {
    let mut sock = connect_from(from, addr).await;
    send_record(&mut sock, hello).await;
    recv_record(&mut sock).await
}

/// Review item 1: a recorded first-connection hello, replayed any number of times from many
/// addresses, is refused (REJECT 3) and holds no session slot, so the real client still gets in.
#[tokio::test]
async fn replayed_first_hellos_are_refused_and_hold_nothing() {
    bounded(async {
        let me = Keypair::generate();
        let limits = Limits { max_sessions_per_key: 3, handshakes_per_sec_per_ip: 1000, ..Limits::default() };
        let (mut listener, cfgs, server) = server(limits, &[Keypair::from_private(me.private.clone())]).await;
        let addr = listener.local_addr();
        let (_live, _t, _ticket, recorded) = first_link(addr, &me, &server.public, 1_000_000_000_000).await;
        let _stream = listener.accept().await.unwrap();
        for i in 0..200u32 {
            let answer = replay(addr, 2 + (i % 250) as u8, &recorded).await;
            assert_eq!(answer, Some(vec![0x02, 0x03]), "replay {i} was not refused as stale");
        }
        assert_eq!(listener.stats().sessions, 1, "a replay holds a session slot");
        // The real client opens its two remaining sessions at once.
        let a = holdfast::connect(addr.to_string(), cfgs[0].clone()).await.expect("real client, session 2");
        let b = holdfast::connect(addr.to_string(), cfgs[0].clone()).await.expect("real client, session 3");
        drop((a, b));
    })
    .await;
}

/// Review item 3: replays of a failed resume attempt are refused before any cryptography (no
/// reply at all) and do not spend the session's resume budget: the real client resumes at once.
/// (The recorded attempt itself, answered by the server, spent one of the burst of 3.)
#[tokio::test]
async fn replayed_resume_hellos_cost_nothing_and_spend_no_budget() {
    bounded(async {
        let me = Keypair::generate();
        let limits = Limits { resumes_per_sec_per_session: 3, handshakes_per_sec_per_ip: 1000, ..Limits::default() };
        let (mut listener, _cfgs, server) = server(limits, &[Keypair::from_private(me.private.clone())]).await;
        let addr = listener.local_addr();
        let (live, _t, ticket, _) = first_link(addr, &me, &server.public, 1).await;
        let _stream = listener.accept().await.unwrap();
        drop(live);
        // A resume attempt that never confirms: recorded by the attacker.
        let (sock, _t, recorded) =
            resume_hello(addr, &me, &server.public, &ticket, 1, (0, 0)).await.expect("attempt 1");
        drop(sock);
        for i in 0..100u32 {
            assert_eq!(replay(addr, 2 + (i % 250) as u8, &recorded).await, None, "replay {i} was answered");
        }
        // The real client's next attempts go through at once, budget intact (2 left at once).
        for attempt in 2..=3 {
            let (mut sock, mut t, _) = resume_hello(addr, &me, &server.public, &ticket, attempt, (0, 0))
                .await
                .unwrap_or_else(|e| panic!("attempt {attempt}: {e}"));
            sock.write_all(&seal(&mut t, Frame::Ack(0))).await.unwrap();
            // Wait until the server has attached it (its first record arrives).
            assert!(recv_record(&mut sock).await.is_some(), "attempt {attempt} was not attached");
        }
    })
    .await;
}

/// Review item 2: the attacker holds back the confirmation of resume C1, lets the client resume
/// on C2 (which gets the new ticket T2; its TICKET_ACK is held back too), then releases C1. The
/// outdated C1 must change nothing: T2 still resumes, and the session lives.
#[tokio::test]
async fn a_delayed_older_resume_cannot_undo_a_newer_one() {
    bounded(async {
        let me = Keypair::generate();
        let (mut listener, _cfgs, server) =
            server(Limits::default(), &[Keypair::from_private(me.private.clone())]).await;
        let addr = listener.local_addr();
        let (live, _t, t1, _) = first_link(addr, &me, &server.public, 1).await;
        let (mut stream, _) = listener.accept().await.unwrap();
        drop(live);
        let (mut c1, mut t_c1, _) = resume_hello(addr, &me, &server.public, &t1, 1, (0, 0)).await.expect("C1");
        let (mut c2, mut t_c2, _) = resume_hello(addr, &me, &server.public, &t1, 2, (0, 0)).await.expect("C2");
        c2.write_all(&seal(&mut t_c2, Frame::Ack(0))).await.unwrap();
        // C2 is attached: its first records are the server's ACK and TICKET(T2).
        let mut t2 = None;
        while t2.is_none() {
            let body = recv_record(&mut c2).await.expect("C2 records");
            let mut plain = vec![0u8; body.len()];
            let n = t_c2.open(&body, &mut plain).unwrap();
            if let Frame::Ticket { resume_id, secret } = Frame::decode(&plain[..n]).unwrap() {
                t2 = Some(Ticket { resume_id, secret: zeroize::Zeroizing::new(*secret) });
            }
        }
        let t2 = t2.unwrap();
        // The server sends data, which the client on C2 acknowledges: the replay buffer moves on,
        // so C1's offsets (0) are now behind it as well.
        stream.write_all(b"0123456789").await.unwrap();
        let mut got = 0;
        while got < 10 {
            let body = recv_record(&mut c2).await.expect("C2 data");
            let mut plain = vec![0u8; body.len()];
            let n = t_c2.open(&body, &mut plain).unwrap();
            if let Frame::Data { data, .. } = Frame::decode(&plain[..n]).unwrap() {
                got += data.len();
            }
        }
        c2.write_all(&seal(&mut t_c2, Frame::Ack(10))).await.unwrap();
        // Release C1's confirmation, then drop C2 as the attacker resets the client.
        c1.write_all(&seal(&mut t_c1, Frame::Ack(0))).await.unwrap();
        let c1_answer = recv_record(&mut c1).await;
        assert!(c1_answer.is_none(), "the outdated link was attached");
        drop(c2);
        // The client resumes with T2: the session and its ticket are intact.
        let (mut c3, mut t_c3, _) = resume_hello(addr, &me, &server.public, &t2, 3, (10, 0))
            .await
            .expect("resume with T2 after the outdated C1");
        c3.write_all(&seal(&mut t_c3, Frame::Ack(10))).await.unwrap();
        assert!(recv_record(&mut c3).await.is_some(), "C3 was not attached");
        stream.write_all(b"more").await.expect("the server's stream failed");
    })
    .await;
}

/// Review item 4: no key can starve the others. One key's streams, whose readers read nothing,
/// take its share of the buffer budget (each stream's receive window is charged when it is
/// accepted); a stream past the share is reset (RESET LIMIT) instead of growing the server's
/// memory, and another key's session still moves its bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_key_can_starve_the_others() {
    bounded(async {
        const WINDOW: usize = holdfast::proto::streams::INITIAL_WINDOW as usize;
        // Four windows, and the sixteenth that first windows leave to the buffers.
        const SHARE: usize = 4 * WINDOW + WINDOW / 2;
        let keys: Vec<Keypair> = (0..2).map(|_| Keypair::generate()).collect();
        let limits = Limits { buffer_budget: 1 << 30, buffer_per_key: SHARE, ..Limits::default() };
        let (mut listener, cfgs, _) = server(limits, &keys).await;
        let addr = listener.local_addr().to_string();
        let mut greedy = Vec::new();
        for i in 0..4 {
            let mut s = holdfast::connect(addr.clone(), cfgs[0].clone()).await.unwrap_or_else(|e| panic!("#{i}: {e}"));
            // More than the share: the writes wait for credit that never comes.
            let writer = tokio::spawn(async move {
                let _ = s.write_all(&vec![i as u8; 512 << 10]).await;
                s
            });
            greedy.push((writer, listener.accept().await.unwrap().0));
        }
        // The fifth stream of the key finds its share spent: it is reset, and the client's
        // writes fail with ConnectionReset instead of the server holding its bytes.
        let mut fifth = holdfast::connect(addr.clone(), cfgs[0].clone()).await.expect("the session itself is admitted");
        let refused = async {
            loop {
                if let Err(e) = fifth.write_all(&[5u8; 64 << 10]).await {
                    return e;
                }
            }
        };
        let e = refused.await;
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
        assert!(e.to_string().contains("limit"), "{e}");
        // Counted for the operator (found by an operator's day: the server said nothing).
        let st = listener.stats();
        assert_eq!((st.streams_refused_memory, st.streams_refused_slots), (1, 0), "{st:?}");
        let mut other = holdfast::connect(addr.clone(), cfgs[1].clone()).await.expect("another key gets in");
        let (mut theirs, _) = listener.accept().await.unwrap();
        let data: Vec<u8> = (0..(1 << 20)).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        // Concurrently: the shutdown waits for the server to have received every byte.
        let writer = tokio::spawn(async move {
            other.write_all(&sent).await.unwrap();
            other.shutdown().await.unwrap();
            other
        });
        let mut got = Vec::new();
        theirs.read_to_end(&mut got).await.unwrap();
        drop(writer.await.unwrap());
        assert!(got == data, "the other key's bytes differ");
        for (writer, _) in greedy {
            writer.abort();
        }
    })
    .await;
}

/// Review item 5: a low-order key on the allow-list (here the all-zero one, which anyone can
/// claim: its shared secret with every key is zero) authenticates nobody.
#[tokio::test]
async fn a_low_order_key_authenticates_nobody() {
    bounded(async {
        let zero = PublicKey::from_bytes([0u8; 32]);
        let server_keys = Keypair::generate();
        let server_pub = server_keys.public;
        let server_private = holdfast::keys::PrivateKey::from_bytes(*server_keys.private.as_bytes());
        let listener =
            holdfast::bind("127.0.0.1:0", ServerConfig::new(server_keys, AllowList::from_keys([(zero, None)])))
                .await
                .unwrap();
        let hello = common::low_order::hello_as_zero_key(&server_pub, 7);
        let mut sock = TcpStream::connect(listener.local_addr()).await.unwrap();
        send_record(&mut sock, &hello).await;
        assert_eq!(recv_record(&mut sock).await, None, "a hello claiming the zero key was answered");
        assert_eq!(listener.stats().sessions, 0);
        // Without the precomputed table, the all-zero shared secret itself fails the handshake.
        let allowed = |_: &PublicKey| true;
        let err = holdfast::proto::handshake::respond(&hello, &server_private, allowed, |_| None);
        assert_eq!(err.err(), Some(HandshakeError::Auth), "the zero key authenticated");
    })
    .await;
}

/// Review item 13: a first connection's key confirmation that decrypts but holds an invalid
/// frame commits the session (the record proved the keys) and is a fault of that link only: the
/// client resumes with the first ticket, as on any link.
#[tokio::test]
async fn an_invalid_first_frame_commits_and_the_session_resumes() {
    bounded(async {
        let me = Keypair::generate();
        let (mut listener, _cfgs, server) =
            server(Limits::default(), &[Keypair::from_private(me.private.clone())]).await;
        let addr = listener.local_addr();
        let mut sock = TcpStream::connect(addr).await.unwrap();
        let (hs, hello) = ClientHandshake::initial(&me.private, &server.public, Cipher::AesGcm, 5).unwrap();
        send_record(&mut sock, &hello).await;
        let mut done = hs.read_reply(&recv_record(&mut sock).await.expect("IK reply")).unwrap();
        let ticket = done.ticket.take().unwrap();
        // A PING with a body: it decrypts, but no valid frame looks like that.
        let mut rec = Vec::new();
        done.transport.seal(&[0x03, 0x00], &mut rec).unwrap();
        sock.write_all(&rec).await.unwrap();
        assert_eq!(recv_record(&mut sock).await, None, "the server kept the link of an invalid frame");
        let (_stream, _) = listener.accept().await.expect("the session was committed");
        let (mut c2, mut t2, _) = resume_hello(addr, &me, &server.public, &ticket, 1, (0, 0)).await.expect("resume");
        c2.write_all(&seal(&mut t2, Frame::Ack(0))).await.unwrap();
        assert!(recv_record(&mut c2).await.is_some(), "the resumed link was not attached");
    })
    .await;
}

/// Review item 14: a key confirmation may hold any valid frame; DATA first is accepted and
/// delivered.
#[tokio::test]
async fn a_data_first_confirmation_is_accepted() {
    bounded(async {
        let me = Keypair::generate();
        let (mut listener, _cfgs, server) =
            server(Limits::default(), &[Keypair::from_private(me.private.clone())]).await;
        let mut sock = TcpStream::connect(listener.local_addr()).await.unwrap();
        let (hs, hello) = ClientHandshake::initial(&me.private, &server.public, Cipher::ChaChaPoly, 6).unwrap();
        send_record(&mut sock, &hello).await;
        let mut done = hs.read_reply(&recv_record(&mut sock).await.expect("IK reply")).unwrap();
        // Version 4: the session's bytes are stream frames; stream 1 opens and carries "hi".
        let mut bytes = Vec::new();
        let mut h = [0u8; holdfast::proto::streams::wire::MAX_HEADER];
        for head in [Header::Open(1), Header::Data { id: 1, len: 2 }] {
            let n = head.encode(&mut h);
            bytes.extend_from_slice(&h[..n]);
        }
        bytes.extend_from_slice(b"hi");
        sock.write_all(&seal(&mut done.transport, Frame::Data { offset: 0, data: &bytes })).await.unwrap();
        let (mut stream, _) = listener.accept().await.expect("committed");
        let mut got = [0u8; 2];
        stream.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hi");
    })
    .await;
}

/// Second review, item 10c: a client whose clock once ran ahead is not locked out once it is put
/// right. A first connection stamped 30 s ahead of the server's clock is accepted; a real
/// client, stamping with the right time, then still gets in (it used to get REJECT 3 until its
/// clock caught up). A stamp more than 60 s ahead is refused with REJECT 3 and changes nothing.
#[tokio::test]
async fn a_client_clock_that_ran_ahead_does_not_lock_its_key_out() {
    bounded(async {
        let me = Keypair::generate();
        let (mut listener, cfgs, server) =
            server(Limits::default(), &[Keypair::from_private(me.private.clone())]).await;
        let addr = listener.local_addr();
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
        let far =
            ClientHandshake::initial(&me.private, &server.public, Cipher::AesGcm, now + 600_000_000_000).unwrap().1;
        assert_eq!(replay(addr, 2, &far).await, Some(vec![0x02, 0x03]), "a stamp 10 min ahead was not refused");
        let (_ahead, _t, _ticket, _) = first_link(addr, &me, &server.public, now + 30_000_000_000).await;
        let _first = listener.accept().await.unwrap();
        let _stream = holdfast::connect(addr.to_string(), cfgs[0].clone()).await.expect("the clock put right");
    })
    .await;
}

/// Issue 22 (the review's second demonstration, in version 4): one key's streams cannot take the
/// server's file descriptors. Each stream holds a slot standing for its connection's descriptor:
/// past its key's slots a new stream is reset with LIMIT while its others go on, and another key
/// still opens streams and echoes, until the server's own bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_keys_streams_cannot_take_every_descriptor() {
    bounded(async {
        let keys: Vec<Keypair> = (0..2).map(|_| Keypair::generate()).collect();
        let limits = Limits { max_streams_per_key: 8, max_streams: 12, ..Limits::default() };
        let (mut listener, cfgs, _) = server(limits, &keys).await;
        let addr = listener.local_addr().to_string();
        let stats = listener.stats_handle();
        // The server echoes every stream of every session.
        let server = tokio::spawn(async move {
            while let Ok((session, _)) = listener.accept_session().await {
                tokio::spawn(async move {
                    while let Some(mut st) = session.accept().await {
                        tokio::spawn(async move {
                            let mut buf = [0u8; 64];
                            while let Ok(n @ 1..) = st.read(&mut buf).await {
                                if st.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                        });
                    }
                });
            }
        });
        // Opens `n` streams on `session`, each echoing one byte or reset; returns those kept.
        async fn open_echoing(session: &holdfast::Session, n: usize) -> (Vec<holdfast::Stream>, usize) {
            let (mut kept, mut reset) = (Vec::new(), 0);
            for i in 0..n {
                let mut st = session.open().await.expect("the session opens streams");
                let mut b = [0u8; 1];
                // The reset may come before the write or after it: either way it is a reset.
                let echoed = match st.write_all(&[i as u8]).await {
                    Ok(()) => st.read_exact(&mut b).await.map(|_| ()),
                    Err(e) => Err(e),
                };
                match echoed {
                    Ok(_) => kept.push(st),
                    Err(e) => {
                        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
                        assert!(e.to_string().contains("limit"), "{e}");
                        reset += 1;
                    }
                }
            }
            (kept, reset)
        }
        let a = holdfast::connect_session(addr.clone(), cfgs[0].clone()).await.unwrap();
        let (a_kept, a_reset) = open_echoing(&a, 12).await;
        assert_eq!((a_kept.len(), a_reset), (8, 4), "key A holds its 8 slots and no more");
        let b = holdfast::connect_session(addr.clone(), cfgs[1].clone()).await.unwrap();
        let (b_kept, b_reset) = open_echoing(&b, 5).await;
        assert_eq!((b_kept.len(), b_reset), (4, 1), "key B gets the server's last 4 slots");
        let st = stats.stats();
        assert_eq!((st.streams_refused_slots, st.streams_refused_memory), (5, 0), "{st:?}");
        // Key A's streams still carry bytes.
        for (i, mut st) in a_kept.into_iter().enumerate() {
            st.write_all(&[i as u8]).await.unwrap();
            let mut got = [0u8; 1];
            st.read_exact(&mut got).await.unwrap();
            assert_eq!(got[0], i as u8);
        }
        drop(b_kept);
        server.abort();
    })
    .await;
}

/// Found by an implementation written from docs/PROTOCOL.md alone: a stream frame that breaks
/// the rules ended the session with no CLOSE, so the client saw a link fault, resumed, and was
/// told only "unknown session". Section 13.7: the session ends with CLOSE(Protocol) and a
/// reason, on a live link and in the key confirmation alike.
#[tokio::test]
async fn a_stream_violation_is_answered_with_close_protocol() {
    bounded(async {
        let me = Keypair::generate();
        let (listener, _cfgs, server) = server(Limits::default(), &[Keypair::from_private(me.private.clone())]).await;
        let mut h = [0u8; holdfast::proto::streams::wire::MAX_HEADER];
        let n = Header::Fin(99).encode(&mut h);
        for in_confirmation in [false, true] {
            let mut sock = TcpStream::connect(listener.local_addr()).await.unwrap();
            let (hs, hello) =
                ClientHandshake::initial(&me.private, &server.public, Cipher::AesGcm, 8 + u64::from(in_confirmation))
                    .unwrap();
            send_record(&mut sock, &hello).await;
            let done = hs.read_reply(&recv_record(&mut sock).await.expect("IK reply")).unwrap();
            let mut t = done.transport;
            if !in_confirmation {
                sock.write_all(&seal(&mut t, Frame::Ack(0))).await.unwrap();
            }
            // A FIN for a stream never opened.
            sock.write_all(&seal(&mut t, Frame::Data { offset: 0, data: &h[..n] })).await.unwrap();
            let mut close = None;
            while let Some(mut body) = recv_record(&mut sock).await {
                let len = t.open_in_place(&mut body).expect("the server's record decrypts");
                if let Ok(Frame::Close { code, reason }) = Frame::decode(&body[..len]) {
                    close = Some((code, reason.to_string()));
                }
            }
            let (code, reason) = close.expect("no CLOSE before the server closed the connection");
            assert_eq!(code, 1, "CLOSE code (Protocol)");
            assert!(reason.contains("stream FIN for a stream never opened"), "reason: {reason}");
        }
    })
    .await;
}
