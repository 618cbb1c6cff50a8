//! X25519 static keys, key files and the peer allow-list.
//!
//! # File format
//!
//! A key file holds one line: the standard base64 encoding (with `=` padding,
//! 44 characters) of the 32 raw key bytes, followed by a newline. This is
//! exactly what WireGuard's `wg genkey` and `wg pubkey` produce, so keys made
//! by either tool work with the other. Leading and trailing whitespace is
//! ignored when reading; anything else (extra text, url-safe base64, a wrong
//! length) is rejected.
//!
//! A public key read from text (a key file, an allow-list line, [`str::parse`]) must not be a
//! low-order point ([`PublicKey::is_low_order`]), such as the all-zero key: the Diffie-Hellman
//! result with one is the same whatever the private key, so anyone could use it.
//!
//! [`load_private_key`] refuses a public key: a file named `*.pub`, or one that holds the
//! same key as the `NAME.pub` next to it (any 32 bytes are a valid private key, so nothing
//! else would catch the mistake). Errors about a file start with its path, and never show a
//! path that looks like a key ([`looks_like_key`]).
//!
//! # Permissions
//!
//! On unix, loading follows `ssh`'s `StrictModes` (details in `src/keys/fsperm.rs`):
//!
//! - every file loaded ([`load_private_key`], [`load_public_key`], [`AllowList::load`]) must be
//!   owned by the process's effective user or by root, and must not be writable by group or
//!   others ([`KeyError::Owner`], [`KeyError::Writable`]);
//! - a private key must also not be readable by group or others: `mode & 0o077 == 0`
//!   ([`KeyError::Permissions`]); public keys and allow-lists may be readable by anyone;
//! - every directory above the file must be owned by that user or root and not writable by
//!   group or others, unless it has the sticky bit, like `/tmp` ([`KeyError::UnsafeDirectory`]);
//! - symbolic links are followed: the target is checked, and so are the directories above the
//!   target and above the link.
//!
//! Each error names the command that fixes it (`chmod 600`, `chmod go-w`, `chown`).
//! [`save_private_key`] creates files with mode `0600`, [`save_public_key`]
//! with mode `0644`; both use `O_EXCL` and never overwrite an existing file.
//!
//! # Allow-list
//!
//! An [`AllowList`] file has one public key per line, optionally followed by a name and then
//! options: `KEY [NAME] [services=SERVICE[,SERVICE...]] [forward=connect|listen|connect,listen]`.
//! `#` starts a comment, which may fill the line or follow the rest. Blank lines are ignored.
//!
//! The name is the words between the key and the first option (joined by single spaces), up to
//! 128 bytes without control characters ([`crate::names::client_name_problem`]). Logs and
//! `CLIENT@` rules tell keys apart by it, so two lines may not have the same name.
//!
//! An option is a word with `=`. Options come after the name, each at most once:
//!
//! - `services=ssh,db`: the key may reach only those tunnel services ([`AllowedPeer::services`];
//!   names as in [`crate::names::is_service_name`]);
//! - `forward=connect`, `forward=listen`, `forward=connect,listen`: the key may ask for dynamic
//!   (SOCKS, `--allow-connect`) or reverse (`--allow-listen`) forwarding.
//!
//! A line without options gives its key everything the server offers, so older files mean what
//! they meant. A line with options gives only what they name: `services=git` alone gives no
//! forwarding, and `forward=connect` alone no service. A server rule that names the client
//! (`NAME@HOST:PORT`) applies to its key whatever the options say.
//!
//! Any other word with `=` (a typo such as `service=ssh`), a name word after an option, an
//! option given twice, a malformed option, a duplicate key or a duplicate name is an error that
//! names the 1-based line number: the whole file is refused.
//!
//! ```text
//! # alice may use everything, the build machine only the git mirror, the bastion only SOCKS
//! HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw= alice laptop
//! xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg= ci services=git
//! 4N7ZpmSQWQBVJ0ggyE8cyg0TLMk2uQdVqsGk4OcKN0M= bastion forward=connect
//! ```

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD;
use base64::{DecodeError, DecodeSliceError, Engine as _};
use curve25519_dalek::montgomery::MontgomeryPoint;
use rand::RngCore as _;
use snow::params::DHChoice;
use snow::resolvers::{CryptoResolver as _, DefaultResolver};
use zeroize::Zeroizing;

mod allow;
mod error;
mod files;
mod fsperm;

pub use allow::{AllowList, AllowedPeer};
use error::LOW_ORDER;
pub use error::{looks_like_key, KeyError};
use files::io_err;
pub use files::{load_private_key, load_public_key, read_trusted_file, save_private_key, save_public_key};

/// Length in bytes of X25519 private and public keys.
pub const KEY_LEN: usize = 32;
/// Length of a key in base64 (with padding).
const B64_LEN: usize = 44;
/// Key files larger than this are rejected without being parsed.
const MAX_KEY_FILE_LEN: usize = 1024;

/// Any scalar works: X25519 clamps it to a multiple of the cofactor 8 below the group order.
const LOW_ORDER_PROBE: [u8; KEY_LEN] = [0x5a; KEY_LEN];

/// Decodes one base64 key (surrounding whitespace ignored) into 32 bytes.
fn decode_key(text: &str) -> Result<Zeroizing<[u8; KEY_LEN]>, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("no key found (expected 44 base64 characters)".to_owned());
    }
    if text.len() != B64_LEN {
        return Err(format!("expected 44 base64 characters, found {}", text.chars().count()));
    }
    let mut buf = Zeroizing::new([0u8; 48]);
    let n = STANDARD.decode_slice(text, &mut buf[..]).map_err(|e| match e {
        DecodeSliceError::DecodeError(DecodeError::InvalidByte(at, b)) => {
            let shown = match b {
                b'!'..=b'~' => format!("{:?}", char::from(b)),
                _ => format!("byte 0x{b:02x}"),
            };
            format!("invalid base64 character {shown} at offset {at}")
        }
        DecodeSliceError::DecodeError(DecodeError::InvalidLastSymbol(at, _)) => {
            format!("non-canonical base64 at offset {at}")
        }
        _ => "invalid base64".to_owned(),
    })?;
    if n != KEY_LEN {
        return Err(format!("decodes to {n} bytes, expected {KEY_LEN}"));
    }
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    key.copy_from_slice(&buf[..KEY_LEN]);
    Ok(key)
}

/// Encodes a key as 44 base64 characters followed by `\n`.
fn encode_key(bytes: &[u8; KEY_LEN]) -> Zeroizing<[u8; B64_LEN + 1]> {
    let mut out = Zeroizing::new([b'\n'; B64_LEN + 1]);
    // 32 bytes always encode to exactly 44 characters, so this cannot fail.
    let written = STANDARD.encode_slice(bytes, &mut out[..B64_LEN]);
    debug_assert!(matches!(written, Ok(B64_LEN)));
    out
}

/// An X25519 public key (static Noise identity of a peer).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey([u8; KEY_LEN]);

impl PublicKey {
    /// Wraps raw key bytes.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self(bytes)
    }

    /// The raw key bytes.
    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// True if the key is a point of small order (dividing 8, or 4 on the twist), in any of its
    /// encodings (canonical or not, top bit set or not): libsodium's blacklist, and what the
    /// X25519 of RFC 7748 section 6.1 turns into an all-zero shared secret. Every private key
    /// "matches" such a key, so it proves nothing about who holds it. Every parse from text
    /// ([`str::parse`], [`load_public_key`], [`AllowList::parse`]) refuses them;
    /// [`PublicKey::from_bytes`] does not check.
    pub fn is_low_order(&self) -> bool {
        // A clamped scalar is a multiple of 8 and smaller than either large prime factor, so the
        // product is the identity (encoded as zero) exactly for the points of order 1, 2, 4 or 8.
        MontgomeryPoint(self.0).mul_clamped(LOW_ORDER_PROBE).0 == [0u8; KEY_LEN]
    }

    /// Decodes a public key from text, refusing low-order keys with the reason.
    fn decode(text: &str) -> Result<Self, ParseError> {
        let key = PublicKey(*decode_key(text).map_err(ParseError::Malformed)?);
        if key.is_low_order() {
            return Err(ParseError::LowOrder(key));
        }
        Ok(key)
    }
}

/// Why text is not a usable public key.
enum ParseError {
    /// Not 44 characters of standard base64 for 32 bytes.
    Malformed(String),
    /// A low-order point.
    LowOrder(PublicKey),
}

impl ParseError {
    /// The reason as one line, for errors that name their own context (an allow-list line).
    fn reason(self) -> String {
        match self {
            ParseError::Malformed(reason) => reason,
            ParseError::LowOrder(key) => format!("{key} {LOW_ORDER}"),
        }
    }
}

impl fmt::Display for PublicKey {
    /// Standard base64 with padding (44 characters), as `wg pubkey` prints.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let enc = encode_key(&self.0);
        f.write_str(std::str::from_utf8(&enc[..B64_LEN]).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl FromStr for PublicKey {
    type Err = KeyError;

    /// Parses standard base64 (surrounding whitespace ignored).
    ///
    /// # Errors
    /// [`KeyError::InvalidKey`] for text that is not a key, [`KeyError::LowOrder`] for a
    /// low-order key (see [`PublicKey::is_low_order`]).
    fn from_str(s: &str) -> Result<Self, KeyError> {
        PublicKey::decode(s).map_err(|e| match e {
            ParseError::Malformed(reason) => KeyError::InvalidKey { reason },
            ParseError::LowOrder(key) => KeyError::LowOrder { key, path: None },
        })
    }
}

/// An X25519 private key. Wiped from memory on drop; never printed.
#[derive(Clone)]
pub struct PrivateKey(Zeroizing<[u8; KEY_LEN]>);

impl PrivateKey {
    /// Wraps raw key bytes. The caller should wipe its own copy.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// The raw key bytes. Do not log them.
    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// Parses standard base64 (surrounding whitespace ignored), e.g. `wg genkey` output.
    pub fn from_base64(s: &str) -> Result<Self, KeyError> {
        decode_key(s).map(Self).map_err(|reason| KeyError::InvalidKey { reason })
    }

    /// The key as standard base64 (44 characters, no newline), wiped on drop.
    pub fn to_base64(&self) -> Zeroizing<String> {
        let enc = encode_key(&self.0);
        Zeroizing::new(std::str::from_utf8(&enc[..B64_LEN]).unwrap_or_default().to_owned())
    }

    /// Derives the public key (X25519 scalar multiplication of the clamped key by the base point).
    ///
    /// # Panics
    ///
    /// Only if snow was built without its default Curve25519 support.
    pub fn public_key(&self) -> PublicKey {
        let Some(mut dh) = DefaultResolver.resolve_dh(&DHChoice::Curve25519) else {
            unreachable!("snow's default resolver always provides Curve25519");
        };
        dh.set(&self.0[..]);
        let mut public = [0u8; KEY_LEN];
        for (out, b) in public.iter_mut().zip(dh.pubkey()) {
            *out = *b;
        }
        // snow's Dh does not wipe itself on drop: overwrite its copy of the secret.
        dh.set(&[0u8; KEY_LEN]);
        PublicKey(public)
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKey(<redacted>)")
    }
}

/// A private key together with its public key.
#[derive(Clone, Debug)]
pub struct Keypair {
    /// The private key (redacted in `Debug`).
    pub private: PrivateKey,
    /// The matching public key.
    pub public: PublicKey,
}

impl Keypair {
    /// Generates a new keypair from the OS random source, clamped like `wg genkey`.
    ///
    /// # Panics
    ///
    /// If the operating system's random source fails.
    pub fn generate() -> Self {
        let mut k = Zeroizing::new([0u8; KEY_LEN]);
        rand::rngs::OsRng.fill_bytes(&mut k[..]);
        k[0] &= 248;
        k[31] &= 127;
        k[31] |= 64;
        Self::from_private(PrivateKey(k))
    }

    /// Builds a keypair by deriving the public key from `private`.
    pub fn from_private(private: PrivateKey) -> Self {
        let public = private.public_key();
        Self { private, public }
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::path::{Path, PathBuf};

    use super::*;

    pub(super) const WG_PRIVATE: &str = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
    /// Public key of `WG_PRIVATE` as printed by `wg` on the wireguard.com quickstart page;
    /// cross-checked with OpenSSL (python `cryptography`).
    pub(super) const WG_PUBLIC: &str = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=";

    /// A fresh directory under the system temp dir, removed on drop.
    pub(super) struct TempDir(pub(super) PathBuf);

    impl TempDir {
        pub(super) fn new(tag: &str) -> Self {
            let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
            let name = format!("holdfast-keys-{tag}-{}-{}", std::process::id(), t.unwrap().as_nanos());
            let dir = std::env::temp_dir().join(name);
            fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    pub(super) fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub(super) fn names(err: &KeyError, path: &Path) -> bool {
        err.to_string().contains(&*path.to_string_lossy())
    }

    #[test]
    fn known_vectors() {
        let private = PrivateKey::from_base64(WG_PRIVATE).unwrap();
        assert_eq!(private.public_key().to_string(), WG_PUBLIC);
        assert_eq!(*private.to_base64(), WG_PRIVATE);
        // RFC 7748 section 6.1, Alice.
        let a = "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a";
        let mut bytes = [0u8; 32];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = u8::from_str_radix(&a[2 * i..2 * i + 2], 16).unwrap();
        }
        let public = PrivateKey::from_bytes(bytes).public_key();
        let expected = "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a";
        assert_eq!(hex(public.as_bytes()), expected);
    }

    #[cfg(unix)]
    /// libsodium's blacklist (`has_small_order` in `x25519_ref10.c`): the canonical and
    /// non-canonical encodings of the points of order 1, 2, 4 and 8. With the top bit set (which
    /// X25519 ignores) they are low-order too.
    pub(super) fn low_order_encodings() -> Vec<[u8; KEY_LEN]> {
        let mut list = vec![[0u8; KEY_LEN], [0u8; KEY_LEN]];
        list[1][0] = 1;
        for hex in [
            "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
            "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
        ] {
            let mut k = [0u8; KEY_LEN];
            for (i, b) in k.iter_mut().enumerate() {
                *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap();
            }
            list.push(k);
        }
        for low in [0xec, 0xed, 0xee] {
            // p - 1, p and p + 1, with p = 2^255 - 19.
            let mut k = [0xff; KEY_LEN];
            k[0] = low;
            k[31] = 0x7f;
            list.push(k);
        }
        let high: Vec<_> = list
            .iter()
            .map(|k| {
                let mut k = *k;
                k[31] |= 0x80;
                k
            })
            .collect();
        list.extend(high);
        list
    }

    pub(super) fn b64(bytes: &[u8; KEY_LEN]) -> String {
        STANDARD.encode(bytes)
    }

    #[test]
    fn low_order_keys_are_refused_when_parsed() {
        let dir = TempDir::new("low-order");
        let low = low_order_encodings();
        assert_eq!(low.len(), 14);
        for (i, bytes) in low.iter().enumerate() {
            let key = PublicKey::from_bytes(*bytes);
            assert!(key.is_low_order(), "{}", hex(bytes));
            let text = b64(bytes);
            let err = text.parse::<PublicKey>().unwrap_err();
            assert!(matches!(err, KeyError::LowOrder { path: None, .. }), "{err:?}");
            let msg = err.to_string();
            assert!(msg.contains("low-order key that anyone can impersonate") && msg.contains("holdfast keygen"));
            assert!(msg.contains(&text), "{msg}");
            let path = dir.0.join(format!("low{i}.pub"));
            fs::write(&path, format!("{text}\n")).unwrap();
            let err = load_public_key(&path).unwrap_err();
            assert!(matches!(err, KeyError::LowOrder { path: Some(_), .. }) && names(&err, &path), "{err:?}");
        }
        // Real keys, and a non-canonical encoding of a point that is not of low order (u = 2).
        for _ in 0..32 {
            let key = Keypair::generate().public;
            assert!(!key.is_low_order());
            assert_eq!(key.to_string().parse::<PublicKey>().unwrap(), key);
        }
        let mut two = [0xff; KEY_LEN];
        (two[0], two[31]) = (0xef, 0x7f);
        assert!(!PublicKey::from_bytes(two).is_low_order());
        assert!(!WG_PUBLIC.parse::<PublicKey>().unwrap().is_low_order());
    }

    #[test]
    fn debug_never_reveals_private_key() {
        let wg = Keypair::from_private(PrivateKey::from_base64(WG_PRIVATE).unwrap());
        for kp in [wg, Keypair::generate()] {
            let b64 = kp.private.to_base64();
            let (hex, bytes) = (hex(kp.private.as_bytes()), format!("{:?}", kp.private.as_bytes()));
            for shown in [format!("{:?}", kp.private), format!("{kp:?}"), format!("{kp:#?}")] {
                let lower = shown.to_lowercase();
                assert!(!shown.contains(&b64[..16]) && !lower.contains(&hex[..16]), "{shown}");
                assert!(!shown.contains(&bytes[..20]), "{shown}");
            }
            assert_eq!(format!("{:?}", kp.private), "PrivateKey(<redacted>)");
            assert!(format!("{kp:?}").contains(&kp.public.to_string()));
        }
        let public: PublicKey = WG_PUBLIC.parse().unwrap();
        assert_eq!(format!("{public:?}"), format!("PublicKey({WG_PUBLIC})"));
    }
}
