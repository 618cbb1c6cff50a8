//! The PROXY protocol, version 2, from trusted load balancers: a connection from one of
//! [`ServerConfig::proxy_from`](crate::net::ServerConfig::proxy_from) must begin with the
//! binary header HAProxy sends with `send-proxy-v2`, which names the real client. The server
//! then uses that address for its per-source limits and its logs. The header is parsed by the
//! `ppp` crate; this module reads it off the socket, bounded, and takes the address out.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use ppp::v2::{Addresses, Command, Header, PROTOCOL_PREFIX};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt};

/// The fixed part of a version 2 header: the 12-byte signature, version and command, family
/// and protocol, and the 16-bit length of the rest.
const FIXED: usize = 16;
/// Most bytes of a header accepted: the fixed part, the longest address block (two Unix paths,
/// 216 bytes) and room for the TLVs a load balancer may add.
pub const MAX_HEADER: usize = 1024;

/// Why a connection from a load balancer did not begin with a usable PROXY v2 header.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ProxyHeaderError {
    /// The connection did not begin with the PROXY v2 signature: the load balancer is not
    /// configured to send it (HAProxy: `send-proxy-v2` on the server line), or it sends v1.
    #[error(
        "the connection came from a --proxy-from address but did not begin with a PROXY protocol v2 header; configure the load balancer to send one (HAProxy: send-proxy-v2)"
    )]
    Missing,
    /// The header says it is longer than [`MAX_HEADER`].
    #[error("the PROXY v2 header is {0} bytes long, more than the {MAX_HEADER} accepted")]
    TooLong(usize),
    /// The header does not parse.
    #[error("the PROXY v2 header is malformed: {0}")]
    Malformed(String),
    /// The header names a Unix socket or no usable address for a PROXY command.
    #[error("the PROXY v2 header names no IP client address")]
    NoAddress,
    /// Reading the header failed.
    #[error("reading the PROXY v2 header: {0}")]
    Io(#[from] std::io::Error),
}

/// True if `ip` is one of the load balancers `from`.
pub(crate) fn trusted(from: &[IpNet], ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    from.iter().any(|net| net.contains(&ip))
}

/// Reads a PROXY v2 header from `sock` and returns the client it names. A LOCAL command (a
/// load balancer's own health check) names none: the connection's own address, `conn`, is
/// returned. Reads exactly the header, nothing after it.
pub(crate) async fn read_header<R: AsyncRead + Unpin>(
    sock: &mut R,
    conn: SocketAddr,
) -> Result<SocketAddr, ProxyHeaderError> {
    let mut buf = [0u8; MAX_HEADER];
    sock.read_exact(&mut buf[..FIXED]).await?;
    if &buf[..PROTOCOL_PREFIX.len()] != PROTOCOL_PREFIX {
        return Err(ProxyHeaderError::Missing);
    }
    let len = FIXED + usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if len > MAX_HEADER {
        return Err(ProxyHeaderError::TooLong(len));
    }
    sock.read_exact(&mut buf[FIXED..len]).await?;
    client_of(&buf[..len], conn)
}

/// The client named by a complete header.
fn client_of(bytes: &[u8], conn: SocketAddr) -> Result<SocketAddr, ProxyHeaderError> {
    let header = Header::try_from(bytes).map_err(|e| ProxyHeaderError::Malformed(e.to_string()))?;
    if header.command == Command::Local {
        return Ok(conn);
    }
    match header.addresses {
        Addresses::IPv4(a) => Ok(SocketAddr::new(a.source_address.into(), a.source_port)),
        Addresses::IPv6(a) => Ok(SocketAddr::new(a.source_address.into(), a.source_port)),
        Addresses::Unix(_) | Addresses::Unspecified => Err(ProxyHeaderError::NoAddress),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ppp::v2::{Builder, Protocol, Version};

    fn header(cmd: Command, client: &str, lb: &str) -> Vec<u8> {
        let (c, l): (SocketAddr, SocketAddr) = (client.parse().unwrap(), lb.parse().unwrap());
        Builder::with_addresses(Version::Two | cmd, Protocol::Stream, (c, l)).build().unwrap()
    }

    const CONN: &str = "10.0.0.2:40000";

    async fn read(bytes: &[u8]) -> Result<SocketAddr, ProxyHeaderError> {
        let mut r = bytes;
        read_header(&mut r, CONN.parse().unwrap()).await
    }

    #[tokio::test]
    async fn the_client_address_is_taken_and_nothing_after_the_header_is_read() {
        for client in ["192.0.2.7:5555", "[2001:db8::7]:5555"] {
            let lb = if client.starts_with('[') { "[2001:db8::1]:7700" } else { "192.0.2.1:7700" };
            let mut bytes = header(Command::Proxy, client, lb);
            let n = bytes.len();
            bytes.extend_from_slice(b"HFST");
            let mut r = &bytes[..];
            assert_eq!(read_header(&mut r, CONN.parse().unwrap()).await.unwrap(), client.parse().unwrap());
            assert_eq!(r, b"HFST", "the hello after a {n}-byte header was consumed");
        }
    }

    #[tokio::test]
    async fn a_local_command_is_the_connection_itself() {
        let bytes = header(Command::Local, "192.0.2.7:5555", "192.0.2.1:7700");
        assert_eq!(read(&bytes).await.unwrap(), CONN.parse().unwrap());
    }

    #[tokio::test]
    async fn a_hello_without_a_header_and_bad_headers_are_refused() {
        let hello = [&[0u8, 110][..], b"HFST\x03\x01", &[0u8; 104][..]].concat();
        assert!(matches!(read(&hello).await, Err(ProxyHeaderError::Missing)));
        let v1 = b"PROXY TCP4 192.0.2.7 192.0.2.1 5555 7700\r\n";
        assert!(matches!(read(v1).await, Err(ProxyHeaderError::Missing)));
        let good = header(Command::Proxy, "192.0.2.7:5555", "192.0.2.1:7700");
        // Cut anywhere: an error, never a panic or a wrong address.
        for cut in 0..good.len() {
            assert!(read(&good[..cut]).await.is_err(), "a header cut at {cut} was accepted");
        }
        let mut long = good.clone();
        long[14..16].copy_from_slice(&2000u16.to_be_bytes());
        assert!(matches!(read(&long).await, Err(ProxyHeaderError::TooLong(2016))));
        let mut short = good.clone();
        short[14..16].copy_from_slice(&4u16.to_be_bytes());
        assert!(matches!(read(&short).await, Err(ProxyHeaderError::Malformed(_))));
        let mut bad_version = good;
        bad_version[12] = 0x31;
        assert!(matches!(read(&bad_version).await, Err(ProxyHeaderError::Malformed(_))));
    }

    #[test]
    fn only_listed_load_balancers_are_trusted() {
        let from: Vec<IpNet> = vec!["10.1.0.0/24".parse().unwrap(), "::1/128".parse().unwrap()];
        assert!(trusted(&from, "10.1.0.9".parse().unwrap()));
        assert!(trusted(&from, "::ffff:10.1.0.9".parse().unwrap()));
        assert!(trusted(&from, "::1".parse().unwrap()));
        assert!(!trusted(&from, "10.1.1.9".parse().unwrap()));
        assert!(!trusted(&[], "10.1.0.9".parse().unwrap()));
    }
}
