//! The errors of key handling.

use std::path::PathBuf;

use super::PublicKey;

/// What is wrong with a low-order public key, and what to do.
pub(super) const LOW_ORDER: &str =
    "is a low-order key that anyone can impersonate; generate a real key with holdfast keygen";

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
