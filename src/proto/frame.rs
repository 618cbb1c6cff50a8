//! Wire framing: the `u16` length prefix around every record, and the plaintext frames carried
//! inside Noise transport messages.
//!
//! The codec knows only lengths, types and bodies. It never allocates from a peer-supplied
//! length: a record is parsed only once all of its bytes are present, and the maximum record size
//! is fixed by Noise (65535 bytes).

use thiserror::Error;

/// Largest Noise message, and therefore the largest record body (`u16::MAX`).
pub const MAX_RECORD: usize = 65535;
/// Size of the record length prefix.
pub const RECORD_HEADER: usize = 2;
/// Largest plaintext payload of one DATA frame (16 KiB).
pub const MAX_DATA: usize = 16 * 1024;
/// Size of a DATA frame's header: type and offset.
pub const DATA_HEADER: usize = 1 + 8;
/// Largest plaintext frame: a full DATA frame.
pub const MAX_FRAME: usize = DATA_HEADER + MAX_DATA;
/// Largest CLOSE reason text, in bytes.
pub const MAX_REASON: usize = 256;
/// Length of a resumption ticket id.
pub const RESUME_ID_LEN: usize = 16;
/// Length of a resumption ticket secret (the Noise PSK).
pub const SECRET_LEN: usize = 32;

/// Frame type codes (the first plaintext byte of every transport message).
pub mod kind {
    /// Stream bytes at an absolute offset.
    pub const DATA: u8 = 0x01;
    /// Cumulative acknowledgement of received stream offsets.
    pub const ACK: u8 = 0x02;
    /// Keepalive request.
    pub const PING: u8 = 0x03;
    /// Keepalive answer.
    pub const PONG: u8 = 0x04;
    /// A new resumption ticket (server to client only).
    pub const TICKET: u8 = 0x05;
    /// The client has stored a ticket (client to server only).
    pub const TICKET_ACK: u8 = 0x06;
    /// Authenticated end of the sender's stream.
    pub const FIN: u8 = 0x07;
    /// The session is over, with a code and a reason.
    pub const CLOSE: u8 = 0x08;
}

/// Errors in the framing layer. Each one means the peer is broken or hostile, and the real
/// connection must be dropped.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrameError {
    /// The frame was empty: no type byte.
    #[error("empty frame")]
    Empty,
    /// The type byte is not one this version knows.
    #[error("unknown frame type 0x{0:02x}")]
    UnknownType(u8),
    /// The body has the wrong length for its type.
    #[error("frame type 0x{kind:02x} has a body of {len} bytes, which is invalid")]
    BadLength {
        /// The frame type.
        kind: u8,
        /// The body length received.
        len: usize,
    },
    /// A CLOSE reason was not UTF-8.
    #[error("close reason is not valid UTF-8")]
    BadReason,
}

/// One decoded plaintext frame. Borrowed from the decryption buffer: decoding never copies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame<'a> {
    /// Stream bytes starting at absolute `offset`.
    Data {
        /// Absolute stream offset of `data[0]`.
        offset: u64,
        /// The bytes (1 to [`MAX_DATA`]).
        data: &'a [u8],
    },
    /// The sender has received every stream position below this offset.
    Ack(u64),
    /// Keepalive request; answered with [`Frame::Pong`].
    Ping,
    /// Keepalive answer.
    Pong,
    /// A new resumption ticket.
    Ticket {
        /// Public ticket id, sent in clear in the resume header.
        resume_id: [u8; RESUME_ID_LEN],
        /// The secret, used as the Noise PSK of a resume.
        secret: &'a [u8; SECRET_LEN],
    },
    /// The client stored the ticket with this id.
    TicketAck([u8; RESUME_ID_LEN]),
    /// The sender's stream ends at this offset (which the FIN itself occupies).
    Fin(u64),
    /// The session is over.
    Close {
        /// Why (see [`CloseCode`]).
        code: u16,
        /// Human-readable detail.
        reason: &'a str,
    },
}

/// Reason codes carried by CLOSE frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CloseCode {
    /// Both directions finished; nothing went wrong.
    Normal,
    /// The peer broke the protocol in a way a resume cannot repair.
    Protocol,
    /// The application aborted the stream.
    Abort,
    /// The sender's recovery policy gave up, or its detached session expired.
    Expired,
    /// A limit was exceeded (for example the server's buffer budget).
    Limit,
    /// The server is shutting down.
    Shutdown,
    /// The server no longer allows the client's key (it was removed from the allow-list): the
    /// session is over, and no new one will be accepted.
    NotAllowed,
    /// A code this version does not know.
    Other(u16),
}

impl CloseCode {
    /// The code's wire value.
    pub fn to_u16(self) -> u16 {
        match self {
            CloseCode::Normal => 0,
            CloseCode::Protocol => 1,
            CloseCode::Abort => 2,
            CloseCode::Expired => 3,
            CloseCode::Limit => 4,
            CloseCode::Shutdown => 5,
            CloseCode::NotAllowed => 6,
            CloseCode::Other(c) => c,
        }
    }

    /// Decodes a wire value.
    pub fn from_u16(v: u16) -> Self {
        match v {
            0 => CloseCode::Normal,
            1 => CloseCode::Protocol,
            2 => CloseCode::Abort,
            3 => CloseCode::Expired,
            4 => CloseCode::Limit,
            5 => CloseCode::Shutdown,
            6 => CloseCode::NotAllowed,
            c => CloseCode::Other(c),
        }
    }
}

fn u64_at(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

impl<'a> Frame<'a> {
    /// Decodes one plaintext frame.
    ///
    /// # Errors
    /// [`FrameError`] if the type is unknown or the body length is wrong for it.
    pub fn decode(buf: &'a [u8]) -> Result<Frame<'a>, FrameError> {
        let (&k, body) = buf.split_first().ok_or(FrameError::Empty)?;
        let bad = || FrameError::BadLength { kind: k, len: body.len() };
        Ok(match k {
            kind::DATA => {
                if body.len() <= 8 || body.len() > 8 + MAX_DATA {
                    return Err(bad());
                }
                Frame::Data { offset: u64_at(body), data: &body[8..] }
            }
            kind::ACK | kind::FIN => {
                if body.len() != 8 {
                    return Err(bad());
                }
                let v = u64_at(body);
                if k == kind::ACK {
                    Frame::Ack(v)
                } else {
                    Frame::Fin(v)
                }
            }
            kind::PING | kind::PONG => {
                if !body.is_empty() {
                    return Err(bad());
                }
                if k == kind::PING {
                    Frame::Ping
                } else {
                    Frame::Pong
                }
            }
            kind::TICKET => {
                let (id, secret) = body.split_at_checked(RESUME_ID_LEN).ok_or_else(bad)?;
                let secret: &[u8; SECRET_LEN] = secret.try_into().map_err(|_| bad())?;
                let resume_id: [u8; RESUME_ID_LEN] = id.try_into().map_err(|_| bad())?;
                Frame::Ticket { resume_id, secret }
            }
            kind::TICKET_ACK => Frame::TicketAck(body.try_into().map_err(|_| bad())?),
            kind::CLOSE => {
                if body.len() < 2 || body.len() > 2 + MAX_REASON {
                    return Err(bad());
                }
                let code = u16::from_be_bytes([body[0], body[1]]);
                let reason = std::str::from_utf8(&body[2..]).map_err(|_| FrameError::BadReason)?;
                Frame::Close { code, reason }
            }
            other => return Err(FrameError::UnknownType(other)),
        })
    }

    /// Appends the encoded frame to `out`. A CLOSE reason longer than [`MAX_REASON`] is cut at a
    /// character boundary.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Frame::Data { offset, data } => {
                out.push(kind::DATA);
                out.extend_from_slice(&offset.to_be_bytes());
                out.extend_from_slice(data);
            }
            Frame::Ack(v) => {
                out.push(kind::ACK);
                out.extend_from_slice(&v.to_be_bytes());
            }
            Frame::Fin(v) => {
                out.push(kind::FIN);
                out.extend_from_slice(&v.to_be_bytes());
            }
            Frame::Ping => out.push(kind::PING),
            Frame::Pong => out.push(kind::PONG),
            Frame::Ticket { resume_id, secret } => {
                out.push(kind::TICKET);
                out.extend_from_slice(resume_id);
                out.extend_from_slice(&secret[..]);
            }
            Frame::TicketAck(id) => {
                out.push(kind::TICKET_ACK);
                out.extend_from_slice(id);
            }
            Frame::Close { code, reason } => {
                out.push(kind::CLOSE);
                out.extend_from_slice(&code.to_be_bytes());
                let mut end = reason.len().min(MAX_REASON);
                while !reason.is_char_boundary(end) {
                    end -= 1;
                }
                out.extend_from_slice(&reason.as_bytes()[..end]);
            }
        }
    }
}

/// Splits one complete record off the front of `buf`.
///
/// Returns `Some((body, consumed))` when a whole record is present, `None` when more bytes are
/// needed. Any `u16` length is acceptable to the codec (the maximum is Noise's), so this never
/// fails; callers apply tighter per-phase limits.
pub fn split_record(buf: &[u8]) -> Option<(&[u8], usize)> {
    let len = u16::from_be_bytes([*buf.first()?, *buf.get(1)?]) as usize;
    let body = buf.get(RECORD_HEADER..RECORD_HEADER + len)?;
    Some((body, RECORD_HEADER + len))
}

/// Appends a record (length prefix and body) to `out`.
///
/// # Panics
/// Never for bodies produced by this crate; a body over [`MAX_RECORD`] is a programming error
/// and is truncated in the prefix computation only by a debug assertion.
pub fn push_record(out: &mut Vec<u8>, body: &[u8]) {
    debug_assert!(body.len() <= MAX_RECORD);
    out.extend_from_slice(&(body.len() as u16).to_be_bytes());
    out.extend_from_slice(body);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn roundtrip(f: Frame<'_>) {
        let mut v = Vec::new();
        f.encode(&mut v);
        assert_eq!(Frame::decode(&v).unwrap(), f);
    }

    #[test]
    fn every_frame_roundtrips() {
        let secret = [7u8; 32];
        roundtrip(Frame::Data { offset: u64::MAX - 3, data: b"abc" });
        roundtrip(Frame::Ack(42));
        roundtrip(Frame::Fin(1 << 40));
        roundtrip(Frame::Ping);
        roundtrip(Frame::Pong);
        roundtrip(Frame::Ticket { resume_id: [1; 16], secret: &secret });
        roundtrip(Frame::TicketAck([9; 16]));
        roundtrip(Frame::Close { code: 3, reason: "gave up" });
    }

    #[test]
    fn bad_frames_are_typed_errors() {
        assert_eq!(Frame::decode(&[]), Err(FrameError::Empty));
        assert_eq!(Frame::decode(&[0x7f]), Err(FrameError::UnknownType(0x7f)));
        assert_eq!(Frame::decode(&[kind::ACK, 1, 2]), Err(FrameError::BadLength { kind: 2, len: 2 }));
        // DATA with no bytes, and DATA over the limit.
        assert!(matches!(Frame::decode(&[kind::DATA, 0, 0, 0, 0, 0, 0, 0, 0]), Err(FrameError::BadLength { .. })));
        let mut big = vec![kind::DATA];
        big.resize(DATA_HEADER + MAX_DATA + 1, 0);
        assert!(matches!(Frame::decode(&big), Err(FrameError::BadLength { .. })));
        assert_eq!(Frame::decode(&[kind::CLOSE, 0, 1, 0xff]), Err(FrameError::BadReason));
        assert!(matches!(Frame::decode(&[kind::PING, 0]), Err(FrameError::BadLength { .. })));
    }

    #[test]
    fn close_reason_is_cut_at_char_boundary() {
        let long = "é".repeat(200); // 400 bytes
        let mut v = Vec::new();
        Frame::Close { code: 1, reason: &long }.encode(&mut v);
        match Frame::decode(&v).unwrap() {
            Frame::Close { reason, .. } => assert_eq!(reason.len(), MAX_REASON),
            f => panic!("unexpected {f:?}"),
        }
    }

    #[test]
    fn records_need_all_their_bytes() {
        let mut v = Vec::new();
        push_record(&mut v, b"hello");
        for cut in 0..v.len() {
            assert_eq!(split_record(&v[..cut]), None);
        }
        assert_eq!(split_record(&v), Some((&b"hello"[..], 7)));
    }

    proptest! {
        /// Any way of cutting a stream of records into chunks yields the same records.
        #[test]
        fn chunking_never_changes_records(
            bodies in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 1..20),
            cuts in proptest::collection::vec(1usize..64, 1..200),
        ) {
            let mut wire = Vec::new();
            for b in &bodies { push_record(&mut wire, b); }
            let mut got = Vec::new();
            let mut pending: Vec<u8> = Vec::new();
            let mut pos = 0;
            let mut i = 0;
            while pos < wire.len() {
                let n = cuts[i % cuts.len()].min(wire.len() - pos);
                i += 1;
                pending.extend_from_slice(&wire[pos..pos + n]);
                pos += n;
                while let Some((body, used)) = split_record(&pending) {
                    got.push(body.to_vec());
                    pending.drain(..used);
                }
            }
            prop_assert_eq!(got, bodies);
            prop_assert!(pending.is_empty());
        }

        /// Decoding arbitrary bytes never panics.
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Frame::decode(&bytes);
        }
    }
}
