//! The errors of key handling. Every error about a file starts with the file's path, so that a
//! caller can put the option or setting it came from in front (`--key keys/a.key: ...`); a path
//! that looks like a key itself is never shown ([`looks_like_key`]).

use std::fmt;
use std::path::{Path, PathBuf};

use super::PublicKey;

/// What is wrong with a low-order public key, and what to do.
pub(super) const LOW_ORDER: &str =
    "is a low-order key that anyone can impersonate; generate a real key with holdfast keygen";

/// Errors from loading, saving and parsing keys and allow-lists.
#[derive(thiserror::Error, Debug)]
#[non_exhaustive]
pub enum KeyError {
    /// A file could not be opened, read, created or written.
    #[error("{}: {op}: {source}", Shown(path))]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// What failed: "cannot read", "cannot create", "cannot write".
        op: &'static str,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A private key file is accessible by group or others (unix only).
    #[error(
        "{}: private key file has mode {mode:04o}: group and others must have no access to it (run: chmod 600 {})",
        Shown(path),
        Shown(path)
    )]
    Permissions {
        /// The private key file.
        path: PathBuf,
        /// Its permission bits (`st_mode & 0o7777`).
        mode: u32,
    },
    /// A file holdfast trusts is owned by another user than this process's effective user and
    /// root, who could change it (unix only).
    #[error(
        "{}: owned by uid {uid}, not by you (uid {euid}) or root, so that user could change it (run: chown {euid} {})",
        Shown(path),
        Shown(path)
    )]
    Owner {
        /// The file.
        path: PathBuf,
        /// Its owner.
        uid: u32,
        /// This process's effective user.
        euid: u32,
    },
    /// A public key or allow-list file is writable by group or others (unix only).
    #[error(
        "{}: has mode {mode:04o}: group and others must not be able to change it (run: chmod go-w {})",
        Shown(path),
        Shown(path)
    )]
    Writable {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A directory above a trusted file (or above the symbolic link to it) lets someone other
    /// than this user and root replace the file: it is writable by group or others without the
    /// sticky bit, or owned by another user (unix only).
    #[error("{}: {}", Shown(path), unsafe_directory(dir, *mode, *uid, *euid))]
    UnsafeDirectory {
        /// The file.
        path: PathBuf,
        /// The directory at fault.
        dir: PathBuf,
        /// The directory's permission bits.
        mode: u32,
        /// The directory's owner.
        uid: u32,
        /// This process's effective user.
        euid: u32,
    },
    /// Refused to overwrite an existing file.
    #[error("{}: refusing to overwrite an existing file", Shown(path))]
    Exists {
        /// The file that already exists.
        path: PathBuf,
    },
    /// A key file does not contain exactly one base64-encoded 32-byte key.
    #[error("{}: malformed key file: {reason}", Shown(path))]
    Malformed {
        /// The key file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A file given as a private key holds a public key: its name ends in `.pub`, or it holds
    /// the same key as the `.pub` file next to it.
    #[error("{}: {}", Shown(path), public_as_private(path, private, same_as.as_deref(), "a private key file is needed"))]
    PublicKeyAsPrivate {
        /// The file given.
        path: PathBuf,
        /// Where the private key probably is (`NAME.key`).
        private: PathBuf,
        /// The `.pub` file whose key it holds, if that is how it was recognised.
        same_as: Option<PathBuf>,
    },
    /// A key string (not from a file) could not be parsed.
    #[error("invalid key: {reason}")]
    InvalidKey {
        /// What is wrong with it.
        reason: String,
    },
    /// A public key is a low-order point of Curve25519: a Diffie-Hellman result with it is the
    /// same for every private key, so anyone can claim to hold it.
    #[error("{}{key} {LOW_ORDER}", path.as_deref().map(|p| format!("{}: ", Shown(p))).unwrap_or_default())]
    LowOrder {
        /// The key.
        key: PublicKey,
        /// The key file it came from, if any.
        path: Option<PathBuf>,
    },
    /// A line of an allow-list is malformed or repeats a key.
    #[error(
        "{}allow-list line {line}: {reason}",
        path.as_deref().map(|p| format!("{}: ", Shown(p))).unwrap_or_default()
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

/// "this is a public key ...; `need` (NAME.key)": the text of
/// [`KeyError::PublicKeyAsPrivate`] after the path, with `need` saying what is needed.
pub(super) fn public_as_private(path: &Path, private: &Path, same_as: Option<&Path>, need: &str) -> String {
    let same = same_as.map(|p| format!(" (the same as {})", Shown(p))).unwrap_or_default();
    if private == path {
        format!("this is a public key{same}; {need}")
    } else {
        format!("this is a public key{same}; {need} ({})", Shown(private))
    }
}

/// What is wrong with a directory above a trusted file, and the command that fixes it.
fn unsafe_directory(dir: &Path, mode: u32, uid: u32, euid: u32) -> String {
    let dir = Shown(dir);
    if uid != euid && uid != 0 {
        format!("directory {dir} is owned by uid {uid}, not by you (uid {euid}) or root, so that user could replace the file (run: chown {euid} {dir})")
    } else {
        format!("directory {dir} has mode {mode:04o}: group or others can write it and so replace the file (run: chmod go-w {dir})")
    }
}

/// True if `text` looks like a key rather than a file name: 44 characters of base64 ending in
/// `=`, 43 without the padding, or 64 hex digits. Errors never show such text.
pub fn looks_like_key(text: &str) -> bool {
    let t = text.trim();
    let in_one_alphabet = |s: &str| {
        let common = |b: u8| b.is_ascii_alphanumeric();
        s.bytes().all(|b| common(b) || b == b'+' || b == b'/') || s.bytes().all(|b| common(b) || b == b'-' || b == b'_')
    };
    let b64 = match t.len() {
        44 => t.ends_with('=') && in_one_alphabet(&t[..43]),
        43 => in_one_alphabet(t),
        _ => false,
    };
    b64 || (t.len() == 64 && t.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// A path as errors show it: as is, unless it looks like a key ([`looks_like_key`]).
struct Shown<'a>(&'a Path);

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.to_str() {
            Some(text) if looks_like_key(text) => f.write_str("(something that looks like a key; not shown)"),
            _ => write!(f, "{}", self.0.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_like_paths_are_never_shown() {
        let key = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
        for text in [key, &key[..43], "yAnz5TF-lXXJte14tji3zlMNq-hd2rYUIgJBgB3fBmk", &"ab12".repeat(16)] {
            assert!(looks_like_key(text), "{text}");
            let err = KeyError::Io {
                path: PathBuf::from(text),
                op: "cannot read",
                source: std::io::ErrorKind::NotFound.into(),
            };
            let shown = err.to_string();
            assert!(!shown.contains(&text[..20]) && shown.contains("looks like a key; not shown"), "{shown}");
        }
        for text in ["keys/laptop.key", "/etc/holdfast/server.key", "keys/alice", "laptop.pub"] {
            assert!(!looks_like_key(text), "{text}");
            let err = KeyError::Malformed { path: PathBuf::from(text), reason: "x".into() };
            assert_eq!(err.to_string(), format!("{text}: malformed key file: x"));
        }
    }
}
