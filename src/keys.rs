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
//! # Permissions
//!
//! On unix, [`load_private_key`] refuses a file whose mode grants any access
//! to group or others (`mode & 0o077 != 0`), like `ssh` does.
//! [`save_private_key`] creates files with mode `0600`, [`save_public_key`]
//! with mode `0644`; both use `O_EXCL` and never overwrite an existing file.
//!
//! # Allow-list
//!
//! An [`AllowList`] file has one public key per line, optionally followed by
//! whitespace and a free-form name. `#` starts a comment, which may fill the
//! line or follow the key and name. Blank lines are ignored. Malformed lines
//! and duplicate keys are errors that name the 1-based line number.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD;
use base64::{DecodeError, DecodeSliceError, Engine as _};
use curve25519_dalek::montgomery::MontgomeryPoint;
use rand::RngCore as _;
use snow::params::DHChoice;
use snow::resolvers::{CryptoResolver as _, DefaultResolver};
use zeroize::Zeroizing;

mod allow;

pub use allow::{AllowList, AllowedPeer};

/// Length in bytes of X25519 private and public keys.
pub const KEY_LEN: usize = 32;
/// Length of a key in base64 (with padding).
const B64_LEN: usize = 44;
/// Key files larger than this are rejected without being parsed.
const MAX_KEY_FILE_LEN: usize = 1024;

/// Errors from loading, saving and parsing keys and allow-lists.
#[derive(thiserror::Error, Debug)]
#[non_exhaustive]
pub enum KeyError {
    /// A file could not be opened, read, created or written.
    #[error("cannot access {}", path.display())]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A private key file is accessible by group or others (unix only).
    #[error(
        "private key file {} has mode {mode:04o}: it must not be readable by group or others (run: chmod 600 {})",
        path.display(),
        path.display()
    )]
    Permissions {
        /// The private key file.
        path: PathBuf,
        /// Its permission bits (`st_mode & 0o7777`).
        mode: u32,
    },
    /// Refused to overwrite an existing file.
    #[error("refusing to overwrite existing file {}", path.display())]
    Exists {
        /// The file that already exists.
        path: PathBuf,
    },
    /// A key file does not contain exactly one base64-encoded 32-byte key.
    #[error("malformed key file {}: {reason}", path.display())]
    Malformed {
        /// The key file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A key string (not from a file) could not be parsed.
    #[error("invalid key: {reason}")]
    InvalidKey {
        /// What is wrong with it.
        reason: String,
    },
    /// A public key is a low-order point of Curve25519: a Diffie-Hellman result with it is the
    /// same for every private key, so anyone can claim to hold it.
    #[error(
        "{}{key} {LOW_ORDER}",
        path.as_ref().map(|p| format!("key file {}: ", p.display())).unwrap_or_default()
    )]
    LowOrder {
        /// The key.
        key: PublicKey,
        /// The key file it came from, if any.
        path: Option<PathBuf>,
    },
    /// A line of an allow-list is malformed or repeats a key.
    #[error(
        "allow-list {}line {line}: {reason}",
        path.as_ref().map(|p| format!("{} ", p.display())).unwrap_or_default()
    )]
    AllowList {
        /// The allow-list file, if it was loaded from one.
        path: Option<PathBuf>,
        /// The 1-based line number.
        line: usize,
        /// What is wrong with the line.
        reason: String,
    },
}

/// What is wrong with a low-order public key, and what to do.
const LOW_ORDER: &str = "is a low-order key that anyone can impersonate; generate a real key with holdfast keygen";

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

/// Maps an I/O error on `path` to [`KeyError::Io`].
fn io_err(path: &Path) -> impl Fn(std::io::Error) -> KeyError + Copy + '_ {
    move |source| KeyError::Io { path: path.to_owned(), source }
}

/// Reads and decodes a key file, refusing group/other access if `private` (unix).
fn read_key_file(path: &Path, private: bool) -> Result<Zeroizing<[u8; KEY_LEN]>, KeyError> {
    let io_err = io_err(path);
    let malformed = |reason: String| KeyError::Malformed { path: path.to_owned(), reason };
    let mut file = File::open(path).map_err(io_err)?;
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::PermissionsExt as _;
        // fstat the opened file (no race with a rename between check and read).
        let mode = file.metadata().map_err(io_err)?.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Permissions { path: path.to_owned(), mode });
        }
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut buf = Zeroizing::new([0u8; MAX_KEY_FILE_LEN + 1]);
    let mut len = 0;
    while len < buf.len() {
        match file.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err(e)),
        }
    }
    if len > MAX_KEY_FILE_LEN {
        return Err(malformed(format!("file is larger than {MAX_KEY_FILE_LEN} bytes")));
    }
    let text = std::str::from_utf8(&buf[..len]).map_err(|_| malformed("not valid utf-8".to_owned()))?;
    decode_key(text).map_err(malformed)
}

/// Creates `path` exclusively with `mode` (unix) and writes `contents` to it.
fn write_new_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), KeyError> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => KeyError::Exists { path: path.to_owned() },
        _ => io_err(path)(e),
    })?;
    let written = file.write_all(contents).and_then(|()| file.sync_all());
    if written.is_err() {
        drop(file);
        // Do not leave a truncated key behind that would block a retry.
        let _ = fs::remove_file(path);
    }
    written.map_err(io_err(path))
}

/// Loads a private key file, refusing it on unix if group or others have any access.
pub fn load_private_key(path: &Path) -> Result<PrivateKey, KeyError> {
    read_key_file(path, true).map(PrivateKey)
}

/// Saves a private key as a new file with mode `0600`; fails if the file exists.
pub fn save_private_key(path: &Path, key: &PrivateKey) -> Result<(), KeyError> {
    write_new_file(path, &encode_key(&key.0)[..], 0o600)
}

/// Loads a public key file.
///
/// # Errors
/// [`KeyError::Io`], [`KeyError::Malformed`], or [`KeyError::LowOrder`] for a low-order key.
pub fn load_public_key(path: &Path) -> Result<PublicKey, KeyError> {
    let key = PublicKey(*read_key_file(path, false)?);
    if key.is_low_order() {
        return Err(KeyError::LowOrder { key, path: Some(path.to_owned()) });
    }
    Ok(key)
}

/// Saves a public key as a new file with mode `0644`; fails if the file exists.
pub fn save_public_key(path: &Path, key: &PublicKey) -> Result<(), KeyError> {
    write_new_file(path, &encode_key(&key.0)[..], 0o644)
}

#[cfg(test)]
mod tests {
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

    fn hex(bytes: &[u8]) -> String {
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

    #[test]
    fn generate_save_load_round_trip() {
        let dir = TempDir::new("roundtrip");
        let kp = Keypair::generate();
        assert_eq!(kp.private.as_bytes()[0] & 7, 0);
        assert_eq!(kp.private.as_bytes()[31] & 0xc0, 0x40);
        assert_eq!(kp.public, kp.private.public_key());
        let (priv_path, pub_path) = (dir.0.join("k.key"), dir.0.join("k.pub"));
        save_private_key(&priv_path, &kp.private).unwrap();
        save_public_key(&pub_path, &kp.public).unwrap();
        let text = fs::read_to_string(&priv_path).unwrap();
        assert_eq!(text, format!("{}\n", *kp.private.to_base64()));
        assert_eq!(fs::read_to_string(&pub_path).unwrap(), format!("{}\n", kp.public));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = fs::metadata(&priv_path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let loaded = load_private_key(&priv_path).unwrap();
        assert_eq!(loaded.as_bytes(), kp.private.as_bytes());
        assert_eq!(load_public_key(&pub_path).unwrap(), kp.public);
        assert_eq!(kp.public.to_string().parse::<PublicKey>().unwrap(), kp.public);
    }

    #[test]
    fn save_refuses_existing_file() {
        let dir = TempDir::new("exists");
        let path = dir.0.join("k.key");
        fs::write(&path, "keep me").unwrap();
        let kp = Keypair::generate();
        let err = save_private_key(&path, &kp.private).unwrap_err();
        assert!(matches!(err, KeyError::Exists { .. }) && names(&err, &path), "{err:?}");
        let err = save_public_key(&path, &kp.public).unwrap_err();
        assert!(matches!(err, KeyError::Exists { .. }), "{err:?}");
        assert_eq!(fs::read_to_string(&path).unwrap(), "keep me");
    }

    #[cfg(unix)]
    #[test]
    fn load_refuses_group_or_other_access() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = TempDir::new("perms");
        let path = dir.0.join("k.key");
        save_private_key(&path, &Keypair::generate().private).unwrap();
        for (mode, shown) in [(0o644, "mode 0644"), (0o640, "mode 0640")] {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            let err = load_private_key(&path).unwrap_err();
            assert!(matches!(err, KeyError::Permissions { mode: m, .. } if m == mode));
            let msg = err.to_string();
            assert!(names(&err, &path) && msg.contains(shown) && msg.contains("chmod 600"), "{msg}");
        }
        fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).unwrap();
        assert!(load_private_key(&path).is_ok());
        // Public keys are not secret.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(load_public_key(&path).is_ok());
    }

    #[test]
    fn malformed_and_missing_files() {
        let dir = TempDir::new("malformed");
        let missing = dir.0.join("missing.key");
        let err = load_private_key(&missing).unwrap_err();
        assert!(matches!(err, KeyError::Io { .. }) && names(&err, &missing), "{err:?}");
        let cases = [
            "",
            "not base64 at all!!!!!!!!!!!!!!!!!!!!!!!!!!\n",
            "AAAA\n",
            "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8yk==\n", // 31 bytes
            "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw= extra\n",
            "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykx=\n", // non-canonical
            "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw\n",  // unpadded
            "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=\n\u{0}",
        ];
        for (i, text) in cases.iter().enumerate() {
            let path = dir.0.join(format!("bad{i}.pub"));
            fs::write(&path, text).unwrap();
            let err = load_public_key(&path).unwrap_err();
            assert!(matches!(err, KeyError::Malformed { .. }) && names(&err, &path), "{text:?}");
        }
        let path = dir.0.join("ok.pub");
        fs::write(&path, format!("  \n{WG_PUBLIC}\r\n\n")).unwrap();
        assert_eq!(load_public_key(&path).unwrap().to_string(), WG_PUBLIC);
        assert!(matches!("AAAA".parse::<PublicKey>(), Err(KeyError::InvalidKey { .. })));
    }

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
