//! The local control socket of `holdfast status`: a Unix socket that only this process's user
//! (and root) may use, checked as the handover socket is (`server::handover`): it is created
//! mode 0600, and each end checks the other's user with `SO_PEERCRED`.

use std::io;
use std::path::{Path, PathBuf};

use thiserror::Error;
use tokio::net::{UnixListener, UnixStream};

/// Why the control socket could not be set up or used.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ControlError {
    /// The socket's directory does not exist.
    #[error(
        "the directory {} does not exist. Under systemd, RuntimeDirectory=holdfast creates /run/holdfast; \
         elsewhere create the directory (mode 0700, owned by the server's user) or give a path in a directory \
         that exists",
        .0.display()
    )]
    NoDirectory(PathBuf),
    /// Something that is not a socket is at the path: it is left alone.
    #[error("{} exists and is not a socket; remove it or give another path", .0.display())]
    NotASocket(PathBuf),
    /// No process answers at the path.
    #[error(
        "nothing answers at {} (is the holdfast server or client that was given --status at this path \
         running?)",
        .0.display()
    )]
    NotRunning(PathBuf),
    /// A live process answers at the path (another server or client given the same path).
    #[error(
        "another process answers at {} (a holdfast server or client given the same --status path); give this \
         one another path, or stop that one first",
        .0.display()
    )]
    InUse(PathBuf),
    /// What is at the path is not a socket (asking side).
    #[error(
        "{} is not a socket: give the path that the holdfast server or client was given with --status",
        .0.display()
    )]
    NothingToAsk(PathBuf),
    /// The socket (or its directory) may not be opened by this user.
    #[error(
        "{}: permission denied; only the user the holdfast server or client runs as (or root) may ask it: run \
         holdfast status as that user",
        .0.display()
    )]
    NotYours(PathBuf),
    /// The process at the other end runs as another user.
    #[error("the process at the control socket runs as user {0}, not as this user (or root); refusing it")]
    OtherUser(u32),
    /// Another I/O error.
    #[error("control socket {}: {source}", path.display())]
    Io {
        /// The socket's path.
        path: PathBuf,
        /// What failed.
        source: io::Error,
    },
}

/// Binds the control socket at `path`, mode 0600, replacing a stale socket there (a file that is
/// not a socket is refused, never removed). A socket a live process answers on is replaced only
/// with `take_over` (an upgrade's new process takes its predecessor's); otherwise it is refused
/// (found by a walk: a second instance given the same path silently took a running server's).
///
/// # Errors
/// [`ControlError::NoDirectory`], [`ControlError::NotASocket`], [`ControlError::InUse`],
/// [`ControlError::Io`].
pub fn bind(path: &Path, take_over: bool) -> Result<UnixListener, ControlError> {
    use std::os::unix::fs::FileTypeExt as _;
    let io_err = |source| ControlError::Io { path: path.to_owned(), source };
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if !take_over && std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(ControlError::InUse(path.to_owned()));
            }
            std::fs::remove_file(path).map_err(io_err)?;
        }
        Ok(_) => return Err(ControlError::NotASocket(path.to_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(e)),
    }
    let l = UnixListener::bind(path).map_err(|e| match path.parent() {
        Some(dir) if e.kind() == io::ErrorKind::NotFound && !dir.as_os_str().is_empty() && !dir.exists() => {
            ControlError::NoDirectory(dir.to_owned())
        }
        _ => io_err(e),
    })?;
    rustix::fs::chmod(path, rustix::fs::Mode::from_raw_mode(0o600)).map_err(|e| io_err(e.into()))?;
    Ok(l)
}

/// The asking side's check: the process answering at the other end of `sock` runs as this
/// process's user, or as root; root may ask any user's process.
///
/// # Errors
/// [`ControlError::OtherUser`], or [`ControlError::Io`] if its credentials cannot be read.
pub fn check_peer(sock: &UnixStream, path: &Path) -> Result<(), ControlError> {
    let uid = peer_uid(sock, path)?;
    let me = rustix::process::geteuid().as_raw();
    if uid == me || uid == 0 || me == 0 {
        Ok(())
    } else {
        Err(ControlError::OtherUser(uid))
    }
}

/// The answering side's check: the process asking at the other end of `sock` runs as this
/// process's user, or as root, and nobody else, also when this process runs as root (then
/// only root may ask).
///
/// # Errors
/// [`ControlError::OtherUser`], or [`ControlError::Io`] if its credentials cannot be read.
pub fn check_asker(sock: &UnixStream, path: &Path) -> Result<(), ControlError> {
    let uid = peer_uid(sock, path)?;
    if uid == rustix::process::geteuid().as_raw() || uid == 0 {
        Ok(())
    } else {
        Err(ControlError::OtherUser(uid))
    }
}

fn peer_uid(sock: &UnixStream, path: &Path) -> Result<u32, ControlError> {
    Ok(sock.peer_cred().map_err(|source| ControlError::Io { path: path.to_owned(), source })?.uid())
}

/// Connects to the control socket at `path` and checks the process there ([`check_peer`]).
///
/// # Errors
/// [`ControlError::NotRunning`] if nothing listens there, [`ControlError::OtherUser`],
/// [`ControlError::Io`].
pub async fn connect(path: &Path) -> Result<UnixStream, ControlError> {
    use std::os::unix::fs::FileTypeExt as _;
    // Found by a walk: a regular file was "nothing answers", and a socket of another user's
    // process a bare "Permission denied".
    if std::fs::metadata(path).is_ok_and(|m| !m.file_type().is_socket()) {
        return Err(ControlError::NothingToAsk(path.to_owned()));
    }
    let sock = UnixStream::connect(path).await.map_err(|e| match e.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => ControlError::NotRunning(path.to_owned()),
        io::ErrorKind::PermissionDenied => ControlError::NotYours(path.to_owned()),
        _ => ControlError::Io { path: path.to_owned(), source: e },
    })?;
    check_peer(&sock, path)?;
    Ok(sock)
}
