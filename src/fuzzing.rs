//! Entry points for the fuzz targets (`fuzz/fuzz_targets/`) and their stable-toolchain twins
//! (`tests/security.rs`), for the parsers that a peer or a stranger reaches but that are not
//! public API. Not part of the library's interface: hidden from its documentation and free to
//! change.
//!
//! Each function takes untrusted bytes, runs the real parser on them, and panics only when it
//! finds a bug: a parser that panics, reads past what it says it used, waits on an in-memory
//! reader, or accepts something it would not produce or read back the same.

use std::future::Future;
use std::net::SocketAddr;

use crate::keys::{AllowList, KeyError};
use crate::net::server::{handover, proxy};
use crate::scrape::{Head, Progress, MAX_REQUEST};
use crate::tunnel::request::{
    connect_request, read_addr, read_reply, read_request, tagged, Request, LISTEN_REQUEST, REVERSE_OPEN,
};
use crate::tunnel::{check_host, check_name, MAX_SERVICE_NAME};

/// Runs `f` to completion on a current-thread runtime (with a clock, for the readers that
/// time out), one per thread.
fn block_on<F: Future>(f: F) -> F::Output {
    thread_local! {
        static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a current-thread runtime");
    }
    RT.with(|rt| rt.block_on(f))
}

/// The tunnel's stream openers (`src/tunnel/request.rs`, PROTOCOL.md appendices A and B):
/// `data` as a request read by the server (service, multiplex, connect or listen request), as
/// the reverse open a client reads, and as the reply a client reads. A request that parses must
/// be exactly the bytes its encoder writes (a listen address: one that reads back the same),
/// and must pass the checks of its names.
pub fn tunnel_request(data: &[u8]) {
    let mut rest = data;
    if let Ok(req) = block_on(read_request(&mut rest)) {
        let used = &data[..data.len() - rest.len()];
        match req {
            Request::Service(name) => {
                assert!(check_name(&name).is_ok() && name.len() <= MAX_SERVICE_NAME, "{name:?} accepted");
                assert_eq!(used, [&[name.len() as u8], name.as_bytes()].concat(), "service request re-encodes");
            }
            Request::Connect { host, port } => {
                assert!(check_host(&host).is_ok(), "connect host {host:?} accepted");
                let again = connect_request(&host, port).expect("an accepted host encodes");
                assert_eq!(used, again, "connect request re-encodes");
            }
            Request::Listen(addr) => {
                assert_eq!(used.first(), Some(&LISTEN_REQUEST));
                let again = tagged(LISTEN_REQUEST, &addr.to_string());
                let mut r = &again[1..];
                assert_eq!(block_on(read_addr(&mut r)).ok(), Some(addr), "listen address reads back");
            }
        }
    }
    if let [REVERSE_OPEN, tail @ ..] = data {
        let mut r = tail;
        if let Ok(addr) = block_on(read_addr(&mut r)) {
            assert!(tail.len() - r.len() <= 256, "a reverse open is at most 256 bytes after its tag");
            let _ = addr;
        }
    }
    let mut r = data;
    if let Ok(msg) = block_on(read_reply(&mut r, "fuzz")) {
        assert!(data.len() - r.len() <= 257, "a reply is at most 257 bytes");
        assert!(!msg.chars().any(char::is_control), "the reply's message is shown with control characters: {msg:?}");
    }
}

/// The PROXY protocol v2 header of a trusted load balancer (`src/net/server/proxy.rs`): never
/// more than [`proxy::MAX_HEADER`] bytes read, and a header that names a client is exactly
/// the length it declares.
pub fn proxy_header(data: &[u8]) {
    let conn: SocketAddr = "192.0.2.1:7000".parse().expect("an address");
    let mut rest = data;
    let res = block_on(proxy::read_header(&mut rest, conn));
    let used = data.len() - rest.len();
    assert!(used <= proxy::MAX_HEADER, "read {used} bytes of a PROXY header");
    if res.is_ok() {
        let declared = 16 + usize::from(u16::from_be_bytes([data[14], data[15]]));
        assert_eq!(used, declared, "a header was read past or short of its length");
    }
}

/// A message one server process reads from another during an upgrade
/// (`src/net/server/handover.rs`).
pub fn handover_message(data: &[u8]) {
    handover::check_message(data);
}

/// A metrics scrape's request head (`src/scrape.rs`): `data[0]` picks the size of the reads
/// the rest arrives in. What is kept never grows past [`MAX_REQUEST`] and one read.
pub fn metrics_head(data: &[u8]) {
    let Some((&size, rest)) = data.split_first() else { return };
    let size = usize::from(size).max(1);
    let mut head = Head::default();
    let mut end = Progress::More;
    for chunk in rest.chunks(size) {
        end = head.push(chunk);
        assert!(head.len() <= MAX_REQUEST + size, "the head grew to {} bytes", head.len());
        if end != Progress::More {
            break;
        }
    }
    if end == Progress::More {
        end = head.push(&[]);
    }
    assert_ne!(end, Progress::More, "the end of the connection completes the head");
    let _ = head.route();
}

/// The allow-list (`src/keys/allow.rs`): every entry it accepts is found by its key, keys are
/// unique, names and services are as the format says, and a refused file names a line of it.
pub fn allow_list(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match AllowList::parse(text) {
        Ok(list) => {
            assert!(list.len() <= text.lines().count());
            for peer in list.iter() {
                let found = list.lookup(&peer.key).expect("an entry is found by its key");
                assert_eq!(found, peer, "two entries for one key");
                if let Some(name) = &peer.name {
                    assert!(!name.is_empty() && name.trim() == name && !name.contains('#'), "name {name:?}");
                }
                for s in peer.services.iter().flatten() {
                    assert!(check_name(s).is_ok(), "service {s:?}");
                }
            }
        }
        Err(KeyError::AllowList { line, .. }) => {
            assert!(line >= 1 && line <= text.lines().count(), "error on line {line}");
        }
        Err(e) => panic!("an allow-list text failed with {e}"),
    }
}

/// The stream frames (`proto::streams`): arbitrary bytes as the peer's half of a session,
/// cut at arbitrary places, with this end reading, writing and resetting in between. Never
/// panics; every byte a stream gets is one the input gave it, within its window.
pub fn streams(data: &[u8]) {
    use crate::proto::buffer::ByteQueue;
    use crate::proto::streams::{Streams, StreamsConfig, Unlimited, INITIAL_WINDOW};
    let Some((&ctl, input)) = data.split_first() else { return };
    let mut st =
        Streams::new(ctl & 1 == 0, StreamsConfig { max_streams: 8, ..StreamsConfig::default() }, Box::new(Unlimited));
    let mut out = ByteQueue::new();
    let now = std::time::Instant::now();
    let cut = usize::from(ctl >> 1).max(1);
    let mut buf = [0u8; 512];
    for (i, chunk) in input.chunks(cut).enumerate() {
        if st.ingest(chunk).is_err() {
            return;
        }
        while let Ok(Some(id)) = st.accept() {
            let _ = st.write(id, b"reply", &mut out, 1 << 20);
            if i % 3 == 0 {
                st.reset(id, 0);
            }
        }
        for id in st.ids() {
            assert!(st.readable(id) as u64 <= 64 * INITIAL_WINDOW, "a stream holds more than its window");
            let _ = st.read(id, &mut buf);
            if i % 5 == 0 {
                st.shutdown(id);
            }
        }
        st.flush(now, None, &mut out, 1 << 20);
        out.release_to(out.end());
    }
}
