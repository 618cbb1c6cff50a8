//! The encrypted record layer of one real connection: a Noise transport state (ChaChaPoly or
//! AESGCM, see [`Cipher`]) with automatic rekeying every [`REKEY_INTERVAL`] messages in each
//! direction.
//!
//! A `Transport` exists only after a handshake finished, so a session without a finished
//! handshake has no way to encrypt. It is never saved or restored: every new real connection gets
//! a fresh handshake and a fresh `Transport`.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey};
use thiserror::Error;
use zeroize::Zeroizing;

use super::cipher::Cipher;
use super::frame::{MAX_RECORD, RECORD_HEADER};

/// Noise AEAD tag length.
pub const TAG_LEN: usize = 16;
/// Messages sent (or received) under one key before that direction is rekeyed: 2^16.
pub const REKEY_INTERVAL: u64 = 1 << 16;
/// Length of a key (both ciphers use 256-bit keys).
const KEY_LEN: usize = 32;

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

/// One direction of a Noise transport: the `CipherState` of the Noise specification (section
/// 5.1), with the nonce `n` counting up from 0.
///
/// It is built only from the two keys of a finished handshake's `Split()`, and never saved or
/// restored, so a nonce is never reused: every new real connection runs a fresh handshake.
/// Records are encrypted and decrypted in place, so the data path needs no scratch buffer.
struct CipherState {
    cipher: Cipher,
    key: LessSafeKey,
    n: u64,
}

impl CipherState {
    fn new(cipher: Cipher, key: &[u8]) -> Result<Self, CryptoError> {
        let key = UnboundKey::new(cipher.algorithm(), key).map_err(|_| CryptoError::State)?;
        Ok(CipherState { cipher, key: LessSafeKey::new(key), n: 0 })
    }

    /// The next nonce. `2^64 - 1` is reserved by Noise (for rekeying) and never used.
    fn take_nonce(&mut self) -> Result<Nonce, CryptoError> {
        if self.n == u64::MAX {
            return Err(CryptoError::State);
        }
        let n = self.cipher.nonce(self.n);
        self.n += 1;
        Ok(n)
    }

    /// Encrypts `buf` in place with an empty associated data and returns the tag.
    fn seal_in_place(&mut self, buf: &mut [u8]) -> Result<[u8; TAG_LEN], CryptoError> {
        let nonce = self.take_nonce()?;
        let tag = self.key.seal_in_place_separate_tag(nonce, Aad::empty(), buf).map_err(|_| CryptoError::State)?;
        let mut t = [0u8; TAG_LEN];
        t.copy_from_slice(tag.as_ref());
        Ok(t)
    }

    /// Decrypts `record` (ciphertext then tag) in place; returns the plaintext length. The
    /// nonce advances only when the record authenticates.
    fn open_in_place(&mut self, record: &mut [u8]) -> Result<usize, CryptoError> {
        if record.len() < TAG_LEN {
            return Err(CryptoError::Size);
        }
        if self.n == u64::MAX {
            return Err(CryptoError::State);
        }
        let plain = self
            .key
            .open_in_place(self.cipher.nonce(self.n), Aad::empty(), record)
            .map_err(|_| CryptoError::Decrypt)?;
        let len = plain.len();
        self.n += 1;
        Ok(len)
    }

    /// Noise `REKEY()`: the new key is the first 32 bytes of `ENCRYPT(k, 2^64 - 1, "", zeros)`.
    /// The nonce counter is not reset.
    fn rekey(&mut self) -> Result<(), CryptoError> {
        let mut k = Zeroizing::new([0u8; KEY_LEN]);
        let _tag = self
            .key
            .seal_in_place_separate_tag(self.cipher.nonce(u64::MAX), Aad::empty(), &mut k[..])
            .map_err(|_| CryptoError::State)?;
        *self = CipherState { n: self.n, ..CipherState::new(self.cipher, &k[..])? };
        Ok(())
    }
}

/// The transport half of one real connection.
pub struct Transport {
    send: CipherState,
    recv: CipherState,
    sent: u64,
    received: u64,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("cipher", &self.send.cipher)
            .field("sent", &self.sent)
            .field("received", &self.received)
            .finish()
    }
}

impl Transport {
    /// A transport from the keys of a finished handshake's `Split()`: `send` encrypts this
    /// end's records and `recv` decrypts the peer's, both with `cipher`.
    pub(crate) fn from_split(cipher: Cipher, send: &[u8; KEY_LEN], recv: &[u8; KEY_LEN]) -> Result<Self, CryptoError> {
        Ok(Transport {
            send: CipherState::new(cipher, send)?,
            recv: CipherState::new(cipher, recv)?,
            sent: 0,
            received: 0,
        })
    }

    /// The cipher this connection uses.
    pub fn cipher(&self) -> Cipher {
        self.send.cipher
    }

    /// Encrypts `plaintext` and appends it to `out` as a record (length prefix and ciphertext).
    ///
    /// # Errors
    /// [`CryptoError::Size`] if the plaintext does not fit in one record, or
    /// [`CryptoError::State`] if Noise refuses (nonce exhaustion).
    pub fn seal(&mut self, plaintext: &[u8], out: &mut Vec<u8>) -> Result<(), CryptoError> {
        self.seal_with(out, |o| o.extend_from_slice(plaintext))
    }

    /// Appends one record to `out` whose plaintext `write` appends to the vector it is given
    /// (it must only append). The plaintext is encrypted where it was written: no scratch
    /// buffer, no zero-filling, one copy of the payload in all.
    ///
    /// # Errors
    /// As [`Transport::seal`]; on error `out` is left as it was (the plaintext written past its
    /// old end is wiped).
    pub fn seal_with(&mut self, out: &mut Vec<u8>, write: impl FnOnce(&mut Vec<u8>)) -> Result<(), CryptoError> {
        let start = out.len();
        out.extend_from_slice(&[0u8; RECORD_HEADER]);
        write(out);
        let body = start + RECORD_HEADER;
        let len = out.len() - body + TAG_LEN;
        // On failure, wipe the plaintext written past `start` and cut it off.
        let discard = |out: &mut Vec<u8>, e: CryptoError| {
            if let Some(tail) = out.get_mut(start..) {
                super::buffer::wipe_bytes(tail);
            }
            out.truncate(start);
            Err(e)
        };
        if len > MAX_RECORD || out.len() < body {
            return discard(out, CryptoError::Size);
        }
        let tag = match self.send.seal_in_place(&mut out[body..]) {
            Ok(t) => t,
            Err(e) => return discard(out, e),
        };
        out.extend_from_slice(&tag);
        out[start..body].copy_from_slice(&(len as u16).to_be_bytes());
        self.sent += 1;
        if self.sent % REKEY_INTERVAL == 0 {
            self.send.rekey()?;
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
        let mut rec = Zeroizing::new(body.to_vec());
        let n = self.open_in_place(&mut rec)?;
        out[..n].copy_from_slice(&rec[..n]);
        Ok(n)
    }

    /// Decrypts one record body in place and returns the plaintext length: the plaintext is
    /// then `body[..n]`. On error the contents of `body` are unspecified.
    ///
    /// # Errors
    /// [`CryptoError::Decrypt`] if the record does not authenticate, [`CryptoError::Size`] if it
    /// is shorter than a tag.
    pub fn open_in_place(&mut self, body: &mut [u8]) -> Result<usize, CryptoError> {
        let n = self.recv.open_in_place(body)?;
        self.received += 1;
        if self.received % REKEY_INTERVAL == 0 {
            self.recv.rekey()?;
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

    fn pair(cipher: Cipher) -> (Transport, Transport) {
        let (c, s) = (Keypair::generate(), Keypair::generate());
        let (hs, hello) = ClientHandshake::initial(&c.private, &s.public, cipher, 1).unwrap();
        let acc = respond(&hello, &s.private, |_| true, |_| None).unwrap();
        (hs.read_reply(&acc.reply).unwrap().transport, acc.transport)
    }

    #[test]
    fn rekeys_every_interval_in_step() {
        for cipher in Cipher::ALL {
            rekeys_in_step(cipher);
        }
    }

    fn rekeys_in_step(cipher: Cipher) {
        let (mut a, mut b) = pair(cipher);
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
        for cipher in Cipher::ALL {
            sender_changes_key(cipher);
        }
    }

    fn sender_changes_key(cipher: Cipher) {
        let (mut a, mut b) = pair(cipher);
        let mut rec = Vec::new();
        let mut out = [0u8; 64];
        // A receiver that never rekeys (the raw cipher state) reads exactly 2^16 records, then
        // fails.
        let _ = &mut out;
        for _ in 0..REKEY_INTERVAL {
            rec.clear();
            a.seal(b"x", &mut rec).unwrap();
            assert!(b.recv.open_in_place(&mut rec[RECORD_HEADER..]).is_ok());
        }
        rec.clear();
        a.seal(b"x", &mut rec).unwrap();
        assert!(b.recv.open_in_place(&mut rec[RECORD_HEADER..]).is_err());
    }

    #[test]
    fn the_two_ciphers_do_not_open_each_others_records() {
        let (k1, k2) = ([7u8; KEY_LEN], [9u8; KEY_LEN]);
        let mut chacha = Transport::from_split(Cipher::ChaChaPoly, &k1, &k2).unwrap();
        let mut aes = Transport::from_split(Cipher::AesGcm, &k2, &k1).unwrap();
        let mut aes_peer = Transport::from_split(Cipher::AesGcm, &k1, &k2).unwrap();
        let (mut rec, mut out) = (Vec::new(), [0u8; 64]);
        aes_peer.seal(b"same keys", &mut rec).unwrap();
        let mut copy = rec.clone();
        assert_eq!(aes.open_in_place(&mut rec[RECORD_HEADER..]), Ok(9));
        let mut chacha_peer = Transport::from_split(Cipher::ChaChaPoly, &k2, &k1).unwrap();
        assert_eq!(chacha_peer.open_in_place(&mut copy[RECORD_HEADER..]), Err(CryptoError::Decrypt));
        rec.clear();
        chacha.seal(b"x", &mut rec).unwrap();
        assert_eq!(aes.open(&rec[RECORD_HEADER..], &mut out), Err(CryptoError::Decrypt));
    }

    #[test]
    fn tampering_and_size_errors_are_typed() {
        let (mut a, mut b) = pair(Cipher::AesGcm);
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
