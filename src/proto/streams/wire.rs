//! The stream frames: how many streams share one session's byte stream (protocol version 4,
//! `docs/PROTOCOL.md` section 13).
//!
//! The session delivers one byte stream each way, exactly once and in order, across link
//! faults. In version 4 that byte stream is a sequence of stream frames. Each begins with a type
//! byte and the stream id (`u64`, big-endian); only DATA has a payload, which follows its
//! header and may be cut across any number of the session's DATA records. A receiver therefore
//! parses the byte stream incrementally and never needs a whole frame in one place.

use thiserror::Error;

/// Frame type codes.
pub mod kind {
    /// A new stream: `id`.
    pub const OPEN: u8 = 0x01;
    /// Stream bytes: `id`, `len: u16` (1 to 65535), then `len` bytes.
    pub const DATA: u8 = 0x02;
    /// More send credit for the receiver of this frame: `id`, `add: u32` (at least 1).
    pub const WINDOW: u8 = 0x03;
    /// The sender's half of the stream ends after every byte it sent on it: `id`.
    pub const FIN: u8 = 0x04;
    /// The sender abandons the stream, both directions: `id`, `code: u8`.
    pub const RESET: u8 = 0x05;
    /// The receiver of this frame may open streams until it has opened this many in all:
    /// `max: u64` (the id field's place).
    pub const STREAMS: u8 = 0x06;
}

/// RESET codes (`u8`).
pub mod reset {
    /// The stream's program gave it up (its TCP connection failed, or it was dropped).
    pub const CANCEL: u8 = 0;
    /// The receiver of the OPEN has no room for another stream (its limits).
    pub const LIMIT: u8 = 1;
    /// Nothing on the receiving end takes streams opened by its peer.
    pub const REFUSED: u8 = 2;
    /// The session is ending (the server stops).
    pub const SHUTDOWN: u8 = 3;
}

/// Header size of each frame type, type byte included: OPEN, FIN 9; RESET 10; DATA 11 (before
/// its payload); WINDOW 13; STREAMS 9.
pub fn header_len(k: u8) -> Option<usize> {
    Some(match k {
        kind::OPEN | kind::FIN | kind::STREAMS => 9,
        kind::RESET => 10,
        kind::DATA => 11,
        kind::WINDOW => 13,
        _ => return None,
    })
}

/// The largest header.
pub const MAX_HEADER: usize = 13;
/// Header of a DATA frame.
pub const DATA_HEADER: usize = 11;
/// Largest payload of one DATA frame.
pub const MAX_PAYLOAD: usize = u16::MAX as usize;

/// A stream frame broken by its sender. Each one ends the session (CLOSE code 1, Protocol).
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum WireError {
    /// The type byte is not a stream frame of this version.
    #[error("unknown stream frame type 0x{0:02x}")]
    UnknownType(u8),
    /// A DATA frame with no payload.
    #[error("stream DATA frame with length 0")]
    EmptyData,
    /// A WINDOW frame adding nothing.
    #[error("stream WINDOW frame adding 0")]
    EmptyWindow,
}

/// One decoded header (a DATA frame's payload follows it in the byte stream).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// A new stream.
    Open(u64),
    /// `len` payload bytes for the stream follow.
    Data {
        /// The stream.
        id: u64,
        /// Payload length, 1 to [`MAX_PAYLOAD`].
        len: usize,
    },
    /// More send credit.
    Window {
        /// The stream.
        id: u64,
        /// Bytes added.
        add: u32,
    },
    /// End of the sender's half.
    Fin(u64),
    /// The stream is abandoned.
    Reset {
        /// The stream.
        id: u64,
        /// Why (see [`reset`]).
        code: u8,
    },
    /// Open credit: the total number of streams the receiver may open.
    Streams(u64),
}

fn u64_at(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

impl Header {
    /// Decodes a complete header (`b.len() == header_len(b[0])`).
    ///
    /// # Errors
    /// [`WireError`] for an unknown type, a DATA of length 0 or a WINDOW adding 0.
    pub fn decode(b: &[u8]) -> Result<Header, WireError> {
        let k = b[0];
        let id = u64_at(&b[1..]);
        Ok(match k {
            kind::OPEN => Header::Open(id),
            kind::FIN => Header::Fin(id),
            kind::STREAMS => Header::Streams(id),
            kind::RESET => Header::Reset { id, code: b[9] },
            kind::DATA => {
                let len = u16::from_be_bytes([b[9], b[10]]) as usize;
                if len == 0 {
                    return Err(WireError::EmptyData);
                }
                Header::Data { id, len }
            }
            kind::WINDOW => {
                let add = u32::from_be_bytes([b[9], b[10], b[11], b[12]]);
                if add == 0 {
                    return Err(WireError::EmptyWindow);
                }
                Header::Window { id, add }
            }
            other => return Err(WireError::UnknownType(other)),
        })
    }

    /// Encodes the header into `out`; returns its length. `out` must hold [`MAX_HEADER`] bytes.
    pub fn encode(&self, out: &mut [u8; MAX_HEADER]) -> usize {
        let (k, id) = match *self {
            Header::Open(id) => (kind::OPEN, id),
            Header::Data { id, .. } => (kind::DATA, id),
            Header::Window { id, .. } => (kind::WINDOW, id),
            Header::Fin(id) => (kind::FIN, id),
            Header::Reset { id, .. } => (kind::RESET, id),
            Header::Streams(max) => (kind::STREAMS, max),
        };
        out[0] = k;
        out[1..9].copy_from_slice(&id.to_be_bytes());
        match *self {
            Header::Data { len, .. } => out[9..11].copy_from_slice(&(len as u16).to_be_bytes()),
            Header::Window { add, .. } => out[9..13].copy_from_slice(&add.to_be_bytes()),
            Header::Reset { code, .. } => out[9] = code,
            _ => {}
        }
        header_len(k).unwrap_or(9)
    }
}

/// Incremental parser state: a partial header, or the payload bytes of a DATA frame still due.
#[derive(Debug, Default)]
pub struct Parser {
    head: [u8; MAX_HEADER],
    have: usize,
    /// The DATA frame whose payload is arriving, and how many of its bytes are still due.
    payload: Option<(u64, usize)>,
}

/// What the parser found at the front of the input.
#[derive(Debug, PartialEq, Eq)]
pub enum Item<'a> {
    /// A complete header (for DATA, its payload follows as [`Item::Payload`]s).
    Header(Header),
    /// Payload bytes of stream `id`'s DATA frame.
    Payload {
        /// The stream.
        id: u64,
        /// The bytes.
        bytes: &'a [u8],
    },
}

impl Parser {
    /// Takes the next item off the front of `input`, advancing it. `Ok(None)` when `input` is
    /// used up (a partial header is kept for the next call).
    ///
    /// # Errors
    /// [`WireError`]; the parser must not be used again.
    pub fn next<'a>(&mut self, input: &mut &'a [u8]) -> Result<Option<Item<'a>>, WireError> {
        if let Some((id, left)) = self.payload {
            if input.is_empty() {
                return Ok(None);
            }
            let n = left.min(input.len());
            let (bytes, rest) = input.split_at(n);
            *input = rest;
            self.payload = if n == left { None } else { Some((id, left - n)) };
            return Ok(Some(Item::Payload { id, bytes }));
        }
        let Some(&b) = input.first() else { return Ok(None) };
        let k = if self.have == 0 { b } else { self.head[0] };
        let need = header_len(k).ok_or(WireError::UnknownType(k))?;
        let take = (need - self.have).min(input.len());
        self.head[self.have..self.have + take].copy_from_slice(&input[..take]);
        self.have += take;
        *input = &input[take..];
        if self.have < need {
            return Ok(None);
        }
        self.have = 0;
        let h = Header::decode(&self.head[..need])?;
        if let Header::Data { id, len } = h {
            self.payload = Some((id, len));
        }
        Ok(Some(Item::Header(h)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn enc(h: Header) -> Vec<u8> {
        let mut b = [0u8; MAX_HEADER];
        let n = h.encode(&mut b);
        b[..n].to_vec()
    }

    #[test]
    fn headers_roundtrip_and_have_their_lengths() {
        for h in [
            Header::Open(1),
            Header::Data { id: u64::MAX, len: 65535 },
            Header::Window { id: 7, add: 1 << 20 },
            Header::Fin(3),
            Header::Reset { id: 5, code: reset::LIMIT },
            Header::Streams(100),
        ] {
            let b = enc(h);
            assert_eq!(Some(b.len()), header_len(b[0]));
            assert_eq!(Header::decode(&b), Ok(h));
        }
        assert_eq!(enc(Header::Data { id: 1, len: 3 }), [2, 0, 0, 0, 0, 0, 0, 0, 1, 0, 3]);
    }

    #[test]
    fn bad_frames_are_typed_errors() {
        let mut p = Parser::default();
        assert_eq!(p.next(&mut &[0x07u8][..]), Err(WireError::UnknownType(7)));
        let mut p = Parser::default();
        assert_eq!(p.next(&mut &enc(Header::Data { id: 1, len: 0 })[..]), Err(WireError::EmptyData));
        let mut b = enc(Header::Window { id: 1, add: 1 });
        b[12] = 0;
        assert_eq!(Parser::default().next(&mut &b[..]), Err(WireError::EmptyWindow));
    }

    proptest! {
        /// Any cutting of a byte stream of frames yields the same headers and payload bytes.
        #[test]
        fn cutting_never_changes_what_is_parsed(
            payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..100), 1..10),
            cuts in proptest::collection::vec(1usize..20, 1..50),
        ) {
            let mut wire = Vec::new();
            for (i, p) in payloads.iter().enumerate() {
                wire.extend(enc(Header::Window { id: i as u64, add: 9 }));
                wire.extend(enc(Header::Data { id: i as u64, len: p.len() }));
                wire.extend(p);
            }
            let mut p = Parser::default();
            let (mut got, mut heads) = (vec![Vec::new(); payloads.len()], 0);
            let (mut pos, mut i) = (0, 0);
            while pos < wire.len() {
                let n = cuts[i % cuts.len()].min(wire.len() - pos);
                i += 1;
                let mut input = &wire[pos..pos + n];
                pos += n;
                while let Some(item) = p.next(&mut input).unwrap() {
                    match item {
                        Item::Header(_) => heads += 1,
                        Item::Payload { id, bytes } => got[id as usize].extend_from_slice(bytes),
                    }
                }
            }
            prop_assert_eq!(got, payloads.clone());
            prop_assert_eq!(heads, 2 * payloads.len());
        }
    }
}
