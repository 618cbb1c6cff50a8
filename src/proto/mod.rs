//! The sans-IO protocol core: frames, handshakes and the session state machine.
//!
//! Nothing here touches a socket, a runtime or the clock. Every call that depends on time takes
//! `now`, so two sessions can be wired together in memory and driven by a virtual clock (see the
//! pair tests in `tests/proto_pair.rs`).

pub mod buffer;
pub mod cipher;
mod dh;
pub mod frame;
pub mod handshake;
pub mod rtt;
pub mod session;
pub mod statics;
pub mod streams;
pub mod transport;

pub use cipher::Cipher;
pub use frame::{CloseCode, Frame, FrameError};
pub use handshake::{ClientHandshake, HandshakeError, Hello, RejectCode, ResumeLookup, ServerAccept, Ticket};
pub use session::{Attached, Event, Role, Session, SessionConfig, SessionError};
pub use statics::StaticSecrets;
pub use streams::{StreamBudget, StreamError, Streams, StreamsConfig};
pub use transport::{CryptoError, Transport};
