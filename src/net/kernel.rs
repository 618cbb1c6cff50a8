//! What the kernel holds for the server's sockets: its links to clients, its connections to
//! services and connect requests' targets, and a reverse forward's accepted connections. Those
//! buffers are the kernel's, not holdfast's, so no budget sees them. A peer that stops reading
//! lets the kernel's send buffer, which it grows up to `net.ipv4.tcp_wmem`'s maximum (4 MiB by
//! default), fill with bytes holdfast wrote: a red-team review measured 3.8 MiB for each stream
//! of one key whose service never read, so that a few hundred of its streams reached the
//! host's `tcp_mem` pressure point, where every TCP socket on the host is squeezed.
//!
//! `TCP_NOTSENT_LOWAT` bounds that without turning off the kernel's buffer tuning: the socket is
//! writable only while fewer than [`NOTSENT`] bytes wait unsent, and holdfast writes only when
//! it is writable, so at most that and one write (256 KiB) wait for a peer that does not read,
//! beyond what is in flight (bounded by the peer's window). In A/B runs of iperf3 through a
//! forward on loopback it cost no throughput (BENCHMARKS.md).
//!
//! The receive side is the other half. What holdfast has not yet read from a service waits in
//! the socket's receive buffer, which the kernel grows (up to `net.ipv4.tcp_rmem`'s maximum)
//! while holdfast reads fast, and which then fills when the stream's reader stops granting
//! credit: a red-team review measured 2.4–7.1 MiB per stalled download stream from a service on
//! the same host. A peer on this host needs no large buffer (its round trip is microseconds), so
//! a tunnel's socket to one ([`bound_tunnel`]) gets a fixed receive buffer of [`RECEIVE_LOCAL`]
//! (the kernel doubles it for its bookkeeping), which in A/B runs of the benchmark's downloads
//! through a forward on loopback cost no throughput (BENCHMARKS.md). A distant peer keeps the
//! kernel's tuning: a fixed buffer would cap its throughput at the buffer per round trip.
//!
//! A socket closed with bytes still queued is kept by the kernel, with no descriptor and no
//! budget, until they are delivered: for as long as a peer acknowledges the kernel's probes
//! without ever reading (a red-team review left 400 such sockets, 137 MiB, from one session in
//! half a second, and they were still there minutes later). A link the session no longer uses
//! is reset instead (`net::pump`); a tunnel's socket that ends cleanly gets
//! `TCP_USER_TIMEOUT` ([`closing`]), so that the kernel gives up on bytes a peer does not take
//! within [`CLOSING`].

use tokio::net::TcpStream;

/// Unsent bytes a socket may hold before it stops being writable.
pub(crate) const NOTSENT: u32 = 256 * 1024;

/// Sets `TCP_NODELAY` and bounds the unsent bytes of `tcp` (see the module documentation); a
/// failure leaves the kernel's defaults.
pub(crate) fn bound(tcp: &TcpStream) {
    let _ = tcp.set_nodelay(true);
    let _ = socket2::SockRef::from(tcp).set_tcp_notsent_lowat(NOTSENT);
}

/// The receive buffer of a tunnel's socket to a peer on this host (see the module
/// documentation).
pub(crate) const RECEIVE_LOCAL: usize = 256 * 1024;

/// [`bound`], for a tunnel's socket (to a service, to a connect request's target, or accepted
/// for a reverse forward): if its peer is on this host, also fixes its receive buffer at
/// [`RECEIVE_LOCAL`]. A failure leaves the kernel's defaults.
pub(crate) fn bound_tunnel(tcp: &TcpStream) {
    bound(tcp);
    if on_this_host(tcp) {
        let _ = socket2::SockRef::from(tcp).set_recv_buffer_size(RECEIVE_LOCAL);
    }
}

/// True if `tcp`'s peer is on this host: a loopback address, or the address this end has (the
/// kernel routes a connection to one of the host's own addresses through loopback).
fn on_this_host(tcp: &TcpStream) -> bool {
    match (tcp.local_addr(), tcp.peer_addr()) {
        (Ok(local), Ok(peer)) => peer.ip().is_loopback() || peer.ip() == local.ip(),
        _ => false,
    }
}

/// How long the kernel keeps trying to deliver what a cleanly closed socket still queues while
/// its peer takes nothing (the same 30 s a tunnel gets after its session finished).
pub(crate) const CLOSING: std::time::Duration = std::time::Duration::from_secs(30);

/// Bounds the life of `tcp` once it is closed: queued bytes its peer does not take within
/// [`CLOSING`] are dropped and the connection reset by the kernel. Only at the end: set on a
/// live connection it would also end one whose reader merely pauses.
pub(crate) fn closing(tcp: &TcpStream) {
    let _ = socket2::SockRef::from(tcp).set_tcp_user_timeout(Some(CLOSING));
}

/// Connects to `addr` like `TcpStream::connect`, but looks at once whether the connection is
/// already up before it waits for the runtime to say so. A peer on this host has usually
/// answered by the time `connect` returns; waiting for readiness instead costs a turn of the
/// runtime's event loop, often on another worker thread (a wake-up of that thread and a hand-off
/// of the task), on the path of every new tunnel to a local service.
///
/// # Errors
/// The socket's creation or the connection's failure.
pub(crate) async fn connect(addr: std::net::SocketAddr) -> std::io::Result<TcpStream> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM.nonblocking().cloexec(), Some(Protocol::TCP))?;
    let up = match sock.connect(&addr.into()) {
        Ok(()) => true,
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INPROGRESS.raw_os_error()) => {
            // The peer's address is known only once the handshake completed.
            sock.peer_addr().is_ok()
        }
        Err(e) => return Err(e),
    };
    let tcp = TcpStream::from_std(std::net::TcpStream::from(sock))?;
    if !up {
        // As `TcpStream::connect`: writable once the handshake completed or failed.
        tcp.writable().await?;
        if let Some(e) = tcp.take_error()? {
            return Err(e);
        }
    }
    Ok(tcp)
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn connect_reaches_a_listener_and_reports_a_refusal() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (mut c, (mut s, _)) =
            tokio::join!(async { super::connect(addr).await.unwrap() }, async { l.accept().await.unwrap() });
        c.write_all(b"ping").await.unwrap();
        let mut b = [0u8; 4];
        s.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"ping");
        assert_eq!(c.peer_addr().unwrap(), addr);
        // A port nobody listens on any more.
        drop(l);
        let e = super::connect(addr).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused);
    }
}
