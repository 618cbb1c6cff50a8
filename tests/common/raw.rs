//! A client that speaks the wire by hand, for tests that send what a real client never would
//! (replayed, flooded or half-finished hellos): connections from chosen loopback addresses,
//! records, and sealed frames.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use holdfast::proto::{Frame, Transport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// A TCP connection from source address 127.0.0.`last`.
pub async fn connect_from(last: u8, server: SocketAddr) -> TcpStream {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)), 0)).unwrap();
    sock.connect(server).await.unwrap()
}

/// Sends `body` as one record (its `u16` length, then the body).
pub async fn send_record(sock: &mut TcpStream, body: &[u8]) {
    let mut rec = Vec::new();
    holdfast::proto::frame::push_record(&mut rec, body);
    sock.write_all(&rec).await.unwrap();
}

/// The next record body, or `None` if the server closed first (within a bound).
pub async fn recv_record(sock: &mut TcpStream) -> Option<Vec<u8>> {
    let read = async {
        let len = sock.read_u16().await.ok()? as usize;
        let mut body = vec![0u8; len];
        sock.read_exact(&mut body).await.ok()?;
        Some(body)
    };
    tokio::time::timeout(Duration::from_secs(10), read).await.expect("the server neither answered nor closed")
}

/// `f` encoded and sealed by `t`, as a record body.
pub fn seal(t: &mut Transport, f: Frame<'_>) -> Vec<u8> {
    let mut plain = Vec::new();
    f.encode(&mut plain);
    let mut rec = Vec::new();
    t.seal(&plain, &mut rec).unwrap();
    rec
}
