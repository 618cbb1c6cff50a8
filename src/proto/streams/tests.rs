//! Two ends' [`Streams`] joined by their byte streams, with no session between them (the
//! session's own pair tests, with faults, are in `tests/streams_pair.rs`).

use super::*;

const ROOM: usize = 1 << 30;

struct End {
    st: Streams,
    out: ByteQueue,
    now: Instant,
}

impl End {
    fn new(client: bool, budget: Box<dyn StreamBudget>) -> End {
        End { st: Streams::new(client, StreamsConfig::default(), budget), out: ByteQueue::new(), now: Instant::now() }
    }
}

/// Moves everything `a` wrote to `b`, flushing `a`'s pending frames first.
fn deliver(a: &mut End, b: &mut End) -> Result<(), &'static str> {
    a.st.flush(a.now, None, &mut a.out, ROOM);
    while !a.out.is_empty() {
        let s = a.out.slice_from(a.out.start(), 4096).to_vec();
        a.out.release_to(a.out.start() + s.len() as u64);
        b.st.ingest(&s)?;
    }
    Ok(())
}

fn pair() -> (End, End) {
    (End::new(true, Box::new(Unlimited)), End::new(false, Box::new(Unlimited)))
}

fn read_all(e: &mut End, id: u64) -> Vec<u8> {
    let mut v = Vec::new();
    let mut buf = [0u8; 7000];
    while let (Ok(Some(n)), _) = e.st.read(id, &mut buf) {
        if n == 0 {
            break;
        }
        v.extend_from_slice(&buf[..n]);
    }
    v
}

#[test]
fn bytes_and_fin_arrive_in_order_and_the_stream_ends_on_both_sides() {
    let (mut c, mut s) = pair();
    let id = c.st.open(&mut c.out, ROOM).unwrap().unwrap();
    assert_eq!(id, 1);
    assert_eq!(c.st.write(id, b"hello", &mut c.out, ROOM), Ok(5));
    c.st.shutdown(id);
    deliver(&mut c, &mut s).unwrap();
    assert_eq!(s.st.accept(), Ok(Some(1)));
    assert_eq!(read_all(&mut s, 1), b"hello");
    assert_eq!(s.st.read(1, &mut [0u8; 4]).0, Ok(Some(0)), "FIN after the bytes");
    s.st.release_read(1);
    s.st.release_write(1);
    deliver(&mut s, &mut c).unwrap();
    assert!(s.st.is_empty(), "the server forgot the stream");
    assert_eq!(c.st.read(1, &mut [0u8; 4]).0, Ok(Some(0)));
    c.st.release_read(1);
    c.st.release_write(1);
    assert!(c.st.is_empty(), "the client forgot the stream");
}

#[test]
fn a_stalled_reader_holds_only_its_own_window_and_the_other_stream_flows() {
    let (mut c, mut s) = pair();
    let stalled = c.st.open(&mut c.out, ROOM).unwrap().unwrap();
    let busy = c.st.open(&mut c.out, ROOM).unwrap().unwrap();
    let big = vec![7u8; 1 << 20];
    // The stalled stream's writer gets exactly the initial window, then waits.
    let mut sent = 0;
    while let Ok(n @ 1..) = c.st.write(stalled, &big[sent..], &mut c.out, ROOM) {
        sent += n;
    }
    assert_eq!(sent as u64, INITIAL_WINDOW);
    deliver(&mut c, &mut s).unwrap();
    assert_eq!((s.st.accept(), s.st.accept()), (Ok(Some(stalled)), Ok(Some(busy))));
    // The busy stream moves 4 MiB through while the stalled one's bytes sit unread.
    let mut moved = 0usize;
    for _ in 0..1000 {
        if let Ok(n) = c.st.write(busy, &big, &mut c.out, ROOM) {
            moved += n;
        }
        deliver(&mut c, &mut s).unwrap();
        read_all(&mut s, busy);
        deliver(&mut s, &mut c).unwrap();
        if moved >= 4 << 20 {
            break;
        }
    }
    assert!(moved >= 4 << 20, "the busy stream moved {moved} bytes");
    assert_eq!(s.st.readable(stalled) as u64, INITIAL_WINDOW, "the stalled stream holds its window");
    assert_eq!(c.st.send_credit(stalled), Ok(0), "and its writer has no credit");
    // The reader wakes up: the window comes back and the writer goes on.
    assert_eq!(read_all(&mut s, stalled).len() as u64, INITIAL_WINDOW);
    deliver(&mut s, &mut c).unwrap();
    assert!(c.st.send_credit(stalled).unwrap() >= INITIAL_WINDOW);
}

#[test]
fn a_reset_ends_one_stream_and_the_others_go_on() {
    let (mut c, mut s) = pair();
    let ids: Vec<u64> = (0..5).map(|_| c.st.open(&mut c.out, ROOM).unwrap().unwrap()).collect();
    for &id in &ids {
        c.st.write(id, format!("stream {id}").as_bytes(), &mut c.out, ROOM).unwrap();
    }
    deliver(&mut c, &mut s).unwrap();
    while let Ok(Some(_)) = s.st.accept() {}
    s.st.reset(ids[2], reset::CANCEL);
    deliver(&mut s, &mut c).unwrap();
    assert_eq!(c.st.read(ids[2], &mut [0u8; 8]).0, Err(StreamError::ResetByPeer(reset::CANCEL)));
    assert_eq!(c.st.write(ids[2], b"x", &mut c.out, ROOM), Err(StreamError::ResetByPeer(reset::CANCEL)));
    // Bytes that crossed the reset are dropped, not an error.
    for &id in &ids {
        let _ = c.st.write(id, b" more", &mut c.out, ROOM);
    }
    deliver(&mut c, &mut s).unwrap();
    for &id in ids.iter().filter(|&&i| i != ids[2]) {
        assert_eq!(read_all(&mut s, id), format!("stream {id} more").as_bytes());
    }
}

#[test]
fn opens_beyond_the_credit_wait_and_go_on_when_streams_end() {
    let (mut c, mut s) = pair();
    let mut ids = Vec::new();
    while let Ok(Some(id)) = c.st.open(&mut c.out, ROOM) {
        ids.push(id);
        assert!(ids.len() <= 10_000);
    }
    // The server grants more as it sees the opens (up to 1024 at once), so the client is held
    // back, never refused.
    assert_eq!(ids.len() as u64, INITIAL_STREAMS);
    deliver(&mut c, &mut s).unwrap();
    deliver(&mut s, &mut c).unwrap();
    assert!(c.st.take_open_woken());
    let mut more = 0;
    while let Ok(Some(_)) = c.st.open(&mut c.out, ROOM) {
        more += 1;
        deliver(&mut c, &mut s).unwrap();
        deliver(&mut s, &mut c).unwrap();
    }
    assert_eq!(INITIAL_STREAMS + more, 1024, "capped at max_streams at once");
    // One ends: one more may open.
    let first = s.st.accept().unwrap().unwrap();
    s.st.reset(first, reset::CANCEL);
    s.st.release_read(first);
    s.st.release_write(first);
    deliver(&mut s, &mut c).unwrap();
    assert_eq!(c.st.open(&mut c.out, ROOM).map(|o| o.is_some()), Ok(true), "room for one more");
    assert_eq!(c.st.open(&mut c.out, ROOM).map(|o| o.is_some()), Ok(false));
}

struct Counted {
    windows: std::sync::Arc<std::sync::atomic::AtomicU64>,
    cap: u64,
}

impl StreamBudget for Counted {
    fn take_window(&mut self, n: u64) -> bool {
        use std::sync::atomic::Ordering::SeqCst;
        let now = self.windows.load(SeqCst);
        if now + n > self.cap {
            return false;
        }
        self.windows.fetch_add(n, SeqCst);
        true
    }
    fn give_window(&mut self, n: u64) {
        self.windows.fetch_sub(n, std::sync::atomic::Ordering::SeqCst);
    }
    fn take_stream(&mut self) -> bool {
        true
    }
    fn give_stream(&mut self) {}
}

#[test]
fn a_spent_budget_resets_new_streams_with_limit_and_gives_everything_back() {
    let windows = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut c = End::new(true, Box::new(Unlimited));
    let mut s = End::new(false, Box::new(Counted { windows: windows.clone(), cap: 3 * INITIAL_WINDOW }));
    let ids: Vec<u64> = (0..5).map(|_| c.st.open(&mut c.out, ROOM).unwrap().unwrap()).collect();
    deliver(&mut c, &mut s).unwrap();
    assert_eq!(windows.load(std::sync::atomic::Ordering::SeqCst), 3 * INITIAL_WINDOW);
    deliver(&mut s, &mut c).unwrap();
    assert_eq!(c.st.read(ids[3], &mut [0u8; 1]).0, Err(StreamError::ResetByPeer(reset::LIMIT)));
    assert_eq!(c.st.read(ids[0], &mut [0u8; 1]).0, Ok(None));
    // The accepted three end: every byte of window comes back.
    while let Ok(Some(id)) = s.st.accept() {
        s.st.reset(id, reset::CANCEL);
        s.st.release_read(id);
        s.st.release_write(id);
    }
    deliver(&mut s, &mut c).unwrap();
    assert!(s.st.is_empty());
    assert_eq!(windows.load(std::sync::atomic::Ordering::SeqCst), 0);
}

#[test]
fn a_peer_breaking_the_rules_is_a_protocol_error() {
    let (mut c, mut s) = pair();
    let id = c.st.open(&mut c.out, ROOM).unwrap().unwrap();
    deliver(&mut c, &mut s).unwrap();
    // DATA past the window.
    let mut b = [0u8; MAX_HEADER];
    let n = Header::Data { id, len: 65535 }.encode(&mut b);
    let mut bytes = b[..n].to_vec();
    bytes.extend(vec![0u8; 65535]);
    bytes.extend_from_slice(&b[..n]);
    bytes.extend(vec![0u8; 65535]);
    assert_eq!(s.st.ingest(&bytes), Err("stream DATA beyond its window"));
    // An OPEN out of sequence, and DATA for a stream never opened.
    let (_, mut s2) = pair();
    let n = Header::Open(3).encode(&mut b);
    assert_eq!(s2.st.ingest(&b[..n]), Err("stream OPEN out of sequence"));
    let (_, mut s3) = pair();
    let n = Header::Data { id: 9, len: 1 }.encode(&mut b);
    assert_eq!(s3.st.ingest(&b[..n]), Err("stream DATA for a stream never opened"));
}

/// The open credit is what the peer was told: 64 OPENs before any STREAMS, and the 65th is a
/// violation even though this end would grant more once it flushed (an independent
/// implementation found the server accepting up to its own cap of 1024 instead).
#[test]
fn an_open_beyond_the_credit_told_is_a_violation() {
    let (_, mut s) = pair();
    let mut b = [0u8; MAX_HEADER];
    let mut bytes = Vec::new();
    for i in 0..INITIAL_STREAMS {
        let n = Header::Open(1 + 2 * i).encode(&mut b);
        bytes.extend_from_slice(&b[..n]);
    }
    assert_eq!(s.st.ingest(&bytes), Ok(()));
    let n = Header::Open(1 + 2 * INITIAL_STREAMS).encode(&mut b);
    assert_eq!(s.st.ingest(&b[..n]), Err("stream OPEN beyond the open credit"));
    // Once the STREAMS that raises it has been written, the next OPEN is within the credit.
    let (_, mut s) = pair();
    assert_eq!(s.st.ingest(&bytes), Ok(()));
    let mut out = ByteQueue::new();
    s.st.flush(s.now, None, &mut out, ROOM);
    assert!(s.st.peer_max_sent > INITIAL_STREAMS, "no STREAMS was written");
    assert_eq!(s.st.ingest(&b[..n]), Ok(()));
}

/// The peer's session FIN after its FIN of a stream whose other half is still open (the peer
/// can send no more credit): the stream is reset, as by the peer, instead of waiting for ever
/// with bytes beyond its credit. A stream whose halves are both ended, or ending, is left to
/// end normally.
#[test]
fn the_peers_session_fin_resets_a_stream_whose_half_is_still_open() {
    let (mut c, mut s) = pair();
    let open = c.st.open(&mut c.out, ROOM).unwrap().unwrap();
    let ending = c.st.open(&mut c.out, ROOM).unwrap().unwrap();
    c.st.shutdown(open);
    c.st.shutdown(ending);
    deliver(&mut c, &mut s).unwrap();
    assert_eq!(s.st.accept(), Ok(Some(open)));
    assert_eq!(s.st.accept(), Ok(Some(ending)));
    assert_eq!(s.st.read(open, &mut [0u8; 4]).0, Ok(Some(0)));
    assert_eq!(s.st.read(ending, &mut [0u8; 4]).0, Ok(Some(0)));
    // The server's half of `open` has used up its credit; `ending`'s FIN is asked for.
    let big = vec![1u8; INITIAL_WINDOW as usize + 1];
    let mut sent = 0;
    while let Ok(n @ 1..) = s.st.write(open, &big[sent..], &mut s.out, ROOM) {
        sent += n;
    }
    assert_eq!(sent as u64, INITIAL_WINDOW);
    s.st.shutdown(ending);
    s.st.peer_ended();
    assert_eq!(s.st.write(open, &big, &mut s.out, ROOM), Err(StreamError::ResetByPeer(reset::SHUTDOWN)));
    s.st.release_read(open);
    s.st.release_write(open);
    s.st.release_read(ending);
    s.st.release_write(ending);
    deliver(&mut s, &mut c).unwrap();
    assert!(s.st.is_empty(), "both streams are over at the server");
}

/// A client's budget ([`super::capped::Capped`]): a peer that lets the program read until the
/// windows have grown, and then fills them while it does not read, makes this end hold at most
/// the cap, not 16 MiB a stream (a hostile server made a client hold 981 MB with 64 streams).
#[test]
fn a_capped_end_holds_at_most_its_cap_whatever_the_peer_sends() {
    const CAP: u64 = 2 << 20;
    let mut c = End::new(true, Box::new(super::capped::Capped::new(CAP, 64)));
    let mut s = End::new(false, Box::new(Unlimited));
    let ids: Vec<u64> = (0..8).map(|_| c.st.open(&mut c.out, ROOM).unwrap().unwrap()).collect();
    deliver(&mut c, &mut s).unwrap();
    while let Ok(Some(_)) = s.st.accept() {}
    let big = vec![1u8; 1 << 20];
    let send_all = |s: &mut End| {
        for &id in &ids {
            let _ = s.st.write(id, &big, &mut s.out, ROOM);
        }
    };
    // The program reads: the windows grow.
    for _ in 0..40 {
        send_all(&mut s);
        deliver(&mut s, &mut c).unwrap();
        for &id in &ids {
            read_all(&mut c, id);
        }
        deliver(&mut c, &mut s).unwrap();
    }
    // It stops reading; the peer fills every window it was granted.
    for _ in 0..40 {
        send_all(&mut s);
        deliver(&mut s, &mut c).unwrap();
        deliver(&mut c, &mut s).unwrap();
    }
    let held: u64 = ids.iter().map(|&id| c.st.readable(id) as u64).sum();
    assert!(held > ids.len() as u64 * INITIAL_WINDOW, "the windows never grew: {held}");
    assert!(held <= CAP, "held {held} bytes, over the cap of {CAP}");
}
