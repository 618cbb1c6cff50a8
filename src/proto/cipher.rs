//! The two Noise cipher functions a connection can use, and how the client picks one.
//!
//! Both are full-strength AEADs with 256-bit keys. ChaCha20-Poly1305 is fast everywhere in
//! software; AES-256-GCM is about three times faster on CPUs with AES and carry-less multiply
//! instructions (measured with ring on the benchmark machine: 6.5 GB/s against 2.1 GB/s per core
//! for 16 KiB records), and slower than ChaCha20-Poly1305 without them. The client chooses per
//! connection and says so in the hello, which is the Noise prologue, so the choice is
//! authenticated by the handshake (see `docs/PROTOCOL.md`, section 6).

use std::fmt;
use std::str::FromStr;

use ring::aead::{Algorithm, Nonce, AES_256_GCM, CHACHA20_POLY1305};

/// The AEAD of a connection's Noise protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cipher {
    /// Noise `ChaChaPoly`: ChaCha20-Poly1305 (RFC 8439). The choice for CPUs without AES
    /// instructions; wire code 0.
    ChaChaPoly,
    /// Noise `AESGCM`: AES-256-GCM. The choice where the CPU has AES and carry-less multiply
    /// instructions; wire code 1.
    AesGcm,
}

impl Cipher {
    /// Both ciphers, in wire-code order.
    pub const ALL: [Cipher; 2] = [Cipher::ChaChaPoly, Cipher::AesGcm];

    /// The faster cipher on this CPU: AES-256-GCM where AES and carry-less multiply
    /// instructions are available (x86-64 AES-NI and PCLMULQDQ, ARMv8 AES and PMULL),
    /// ChaCha20-Poly1305 otherwise.
    pub fn preferred() -> Cipher {
        if hardware_aes() {
            Cipher::AesGcm
        } else {
            Cipher::ChaChaPoly
        }
    }

    /// The cipher's name in a Noise protocol name (`ChaChaPoly` or `AESGCM`).
    pub fn noise_name(self) -> &'static str {
        match self {
            Cipher::ChaChaPoly => "ChaChaPoly",
            Cipher::AesGcm => "AESGCM",
        }
    }

    /// The 4-bit code carried in the hello's kind byte.
    pub fn code(self) -> u8 {
        match self {
            Cipher::ChaChaPoly => 0,
            Cipher::AesGcm => 1,
        }
    }

    /// The cipher for a wire code, if this version knows it.
    pub fn from_code(code: u8) -> Option<Cipher> {
        Cipher::ALL.into_iter().find(|c| c.code() == code)
    }

    pub(crate) fn algorithm(self) -> &'static Algorithm {
        match self {
            Cipher::ChaChaPoly => &CHACHA20_POLY1305,
            Cipher::AesGcm => &AES_256_GCM,
        }
    }

    /// Noise's 96-bit nonce for counter `n`: 32 bits of zeros, then `n` as a 64-bit integer,
    /// little-endian for ChaChaPoly and big-endian for AESGCM (Noise specification, 12.3 and
    /// 12.4).
    pub(crate) fn nonce(self, n: u64) -> Nonce {
        let mut b = [0u8; 12];
        match self {
            Cipher::ChaChaPoly => b[4..].copy_from_slice(&n.to_le_bytes()),
            Cipher::AesGcm => b[4..].copy_from_slice(&n.to_be_bytes()),
        }
        Nonce::assume_unique_for_key(b)
    }
}

impl fmt::Display for Cipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Cipher::ChaChaPoly => "chacha20-poly1305",
            Cipher::AesGcm => "aes-256-gcm",
        })
    }
}

/// The error of parsing a cipher name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown cipher {0:?} (expected chacha20-poly1305 or aes-256-gcm)")]
pub struct UnknownCipher(pub String);

impl FromStr for Cipher {
    type Err = UnknownCipher;

    /// Accepts `chacha20-poly1305` (or `chacha`, `ChaChaPoly`) and `aes-256-gcm` (or `aes`,
    /// `AESGCM`), in any case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "chacha20-poly1305" | "chacha" | "chachapoly" => Ok(Cipher::ChaChaPoly),
            "aes-256-gcm" | "aes" | "aesgcm" => Ok(Cipher::AesGcm),
            _ => Err(UnknownCipher(s.to_string())),
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn hardware_aes() -> bool {
    std::arch::is_x86_feature_detected!("aes") && std::arch::is_x86_feature_detected!("pclmulqdq")
}

#[cfg(target_arch = "aarch64")]
fn hardware_aes() -> bool {
    std::arch::is_aarch64_feature_detected!("aes")
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn hardware_aes() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_names_round_trip() {
        for c in Cipher::ALL {
            assert_eq!(Cipher::from_code(c.code()), Some(c));
            assert_eq!(c.to_string().parse::<Cipher>(), Ok(c));
            assert_eq!(c.noise_name().parse::<Cipher>(), Ok(c));
        }
        assert_eq!(Cipher::from_code(2), None);
        assert!("rot13".parse::<Cipher>().is_err());
    }

    #[test]
    fn nonces_follow_the_noise_encodings() {
        let n = 0x0102_0304_0506_0708u64;
        assert_eq!(Cipher::ChaChaPoly.nonce(n).as_ref(), &[0, 0, 0, 0, 8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(Cipher::AesGcm.nonce(n).as_ref(), &[0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8]);
    }
}
