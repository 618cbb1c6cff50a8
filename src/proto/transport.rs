//! The encrypted record layer of one real connection: a Noise transport state with automatic
//! rekeying every [`REKEY_INTERVAL`] messages in each direction.
//!
//! A `Transport` exists only after a handshake finished, so a session without a finished
//! handshake has no way to encrypt. It is never saved or restored: every new real connection gets
//! a fresh handshake and a fresh `Transport`.

use thiserror::Error;

use super::frame::{MAX_RECORD, RECORD_HEADER};

/// Noise AEAD tag length.
pub const TAG_LEN: usize = 16;
/// Messages sent (or received) under one key before that direction is rekeyed: 2^16.
pub const REKEY_INTERVAL: u64 = 1 << 16;

/// Errors of the crypto layer. Deliberately coarse: detail would help an attacker.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CryptoError {
    /// A record failed authentication (wrong key, tampering, replay or reordering).
    #[error("record failed authentication")]
    Decrypt,
    /// A record was too short to hold a tag, or a plaintext too long to seal.
    #[error("record has an invalid size")]
    Size,
    /// Noise refused an operation (nonce exhausted or an internal state error).
    #[error("noise state error")]
    State,
}

/// The transport half of one real connection.
pub struct Transport {
    state: snow::TransportState,
    sent: u64,
    received: u64,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport").field("sent", &self.sent).field("received", &self.received).finish()
    }
}

impl Transport {
    pub(crate) fn new(state: snow::TransportState) -> Self {
        Transport { state, sent: 0, received: 0 }
    }

    /// Encrypts `plaintext` and appends it to `out` as a record (length prefix and ciphertext).
    ///
    /// # Errors
    /// [`CryptoError::Size`] if the plaintext does not fit in one record, or
    /// [`CryptoError::State`] if Noise refuses (nonce exhaustion).
    pub fn seal(&mut self, plaintext: &[u8], out: &mut Vec<u8>) -> Result<(), CryptoError> {
        let len = plaintext.len() + TAG_LEN;
        if len > MAX_RECORD {
            return Err(CryptoError::Size);
        }
        let start = out.len();
        out.resize(start + RECORD_HEADER + len, 0);
        out[start..start + RECORD_HEADER].copy_from_slice(&(len as u16).to_be_bytes());
        match self.state.write_message(plaintext, &mut out[start + RECORD_HEADER..]) {
            Ok(n) if n == len => {}
            _ => {
                out.truncate(start);
                return Err(CryptoError::State);
            }
        }
        self.sent += 1;
        if self.sent % REKEY_INTERVAL == 0 {
            self.state.rekey_outgoing();
        }
        Ok(())
    }

    /// Decrypts one record body into `out` and returns the plaintext length.
    ///
    /// `out` must hold at least `body.len() - 16` bytes.
    ///
    /// # Errors
    /// [`CryptoError::Decrypt`] if the record does not authenticate, [`CryptoError::Size`] if it
    /// is shorter than a tag or `out` is too small.
    pub fn open(&mut self, body: &[u8], out: &mut [u8]) -> Result<usize, CryptoError> {
        if body.len() < TAG_LEN || out.len() < body.len() - TAG_LEN {
            return Err(CryptoError::Size);
        }
        let n = self.state.read_message(body, out).map_err(|_| CryptoError::Decrypt)?;
        self.received += 1;
        if self.received % REKEY_INTERVAL == 0 {
            self.state.rekey_incoming();
        }
        Ok(n)
    }

    /// Records sealed so far.
    pub fn sent_records(&self) -> u64 {
        self.sent
    }

    /// Records opened so far.
    pub fn received_records(&self) -> u64 {
        self.received
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::Keypair;
    use crate::proto::handshake::{respond, ClientHandshake};

    fn pair() -> (Transport, Transport) {
        let (c, s) = (Keypair::generate(), Keypair::generate());
        let (hs, hello) = ClientHandshake::initial(&c.private, &s.public).unwrap();
        let acc = respond(&hello, &s.private, |_| true, |_| None).unwrap();
        (hs.read_reply(&acc.reply).unwrap().transport, acc.transport)
    }

    #[test]
    fn rekeys_every_interval_in_step() {
        let (mut a, mut b) = pair();
        let mut rec = Vec::new();
        let mut out = [0u8; 64];
        for i in 0..REKEY_INTERVAL + 10 {
            rec.clear();
            a.seal(&i.to_be_bytes(), &mut rec).unwrap();
            let n = b.open(&rec[RECORD_HEADER..], &mut out).unwrap();
            assert_eq!(&out[..n], &i.to_be_bytes());
        }
        assert_eq!(a.sent_records(), REKEY_INTERVAL + 10);
    }

    #[test]
    fn the_sender_really_changes_key_after_the_interval() {
        let (mut a, mut b) = pair();
        let mut rec = Vec::new();
        let mut out = [0u8; 64];
        // A receiver that never rekeys (raw Noise state) reads exactly 2^16 records, then fails.
        for _ in 0..REKEY_INTERVAL {
            rec.clear();
            a.seal(b"x", &mut rec).unwrap();
            assert!(b.state.read_message(&rec[RECORD_HEADER..], &mut out).is_ok());
        }
        rec.clear();
        a.seal(b"x", &mut rec).unwrap();
        assert!(b.state.read_message(&rec[RECORD_HEADER..], &mut out).is_err());
    }

    #[test]
    fn tampering_and_size_errors_are_typed() {
        let (mut a, mut b) = pair();
        let mut rec = Vec::new();
        a.seal(b"hello", &mut rec).unwrap();
        let mut bad = rec.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        let mut out = [0u8; 64];
        assert_eq!(b.open(&bad[RECORD_HEADER..], &mut out), Err(CryptoError::Decrypt));
        assert_eq!(b.open(&[0u8; 5], &mut out), Err(CryptoError::Size));
        let big = vec![0u8; MAX_RECORD];
        assert_eq!(a.seal(&big, &mut rec), Err(CryptoError::Size));
    }
}
