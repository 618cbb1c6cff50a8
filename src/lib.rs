//! # holdfast
//!
//! TCP streams that survive network faults. A [`Stream`] is a *virtual socket*: when its real
//! TCP connection breaks (Wi-Fi drops, the laptop sleeps, the address changes, a NAT forgets the
//! mapping, a reset is injected), the client opens a new connection, both ends prove with a
//! Noise handshake that they are the same pair as before, un-acknowledged bytes are replayed,
//! and the program keeps reading and writing as if nothing happened. Every byte is encrypted
//! (Noise `IK` for the first connection, `KKpsk0` with single-use rotating tickets for each
//! resume, so every connection is authenticated and forward-secret).
//!
//! ```text
//!   program ──AsyncRead/AsyncWrite──▶ Stream            (net::stream)
//!                                       │ shared state, wakers
//!                                       ▼
//!                                 driver task           (net::pump, net::client, net::server)
//!                     socket I/O, reconnect loop, session table, timers (tokio)
//!                                       │ records in / records out / now
//!                                       ▼
//!                                    Session             (proto: sans-IO, no clock reads)
//!              replay buffer · offsets · ACK · FIN · tickets · keepalive · rekey
//!                                       │
//!                           Transport (Noise, snow) ── frames (proto::frame)
//! ```
//!
//! Layers: [`proto`] is the sans-IO protocol core, [`net`] the tokio driver, [`keys`] key
//! handling, and [`tunnel`] the port-forwarding built on the public API.
//!
//! ## Example
//!
//! A client and a server on loopback:
//!
//! ```
//! use holdfast::keys::{AllowList, Keypair};
//! use holdfast::{ClientConfig, ServerConfig};
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let server_keys = Keypair::generate();
//! let client_keys = Keypair::generate();
//! let server_pub = server_keys.public;
//! let allow = AllowList::from_keys([(client_keys.public, Some("laptop".to_string()))]);
//!
//! let mut listener = holdfast::bind("127.0.0.1:0", ServerConfig::new(server_keys, allow)).await?;
//! let addr = listener.local_addr().to_string();
//! let server = tokio::spawn(async move {
//!     let (mut stream, peer) = listener.accept().await?;
//!     assert_eq!(peer.name.as_deref(), Some("laptop"));
//!     let mut buf = Vec::new();
//!     stream.read_to_end(&mut buf).await?;   // EOF only after every byte
//!     stream.write_all(&buf).await?;
//!     stream.shutdown().await?;               // FIN, completes once acknowledged
//!     Ok::<_, std::io::Error>(())
//! });
//!
//! let mut stream = holdfast::connect(addr, ClientConfig::new(client_keys, server_pub)).await?;
//! stream.write_all(b"hello through the fault").await?;
//! stream.shutdown().await?;
//! let mut echo = Vec::new();
//! stream.read_to_end(&mut echo).await?;
//! assert_eq!(echo, b"hello through the fault");
//! server.await??;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod demo;
#[doc(hidden)]
pub mod fuzzing;
pub mod harden;
pub mod human;
pub mod keys;
pub mod names;
pub mod net;
pub mod proto;
pub mod scrape;

pub mod tunnel;

pub use net::{
    bind, connect, connect_session, ClientConfig, Error, LinkEvent, LinkStatus, Listener, Peer, RecoveryPolicy,
    ServerConfig, Session, Stream,
};
