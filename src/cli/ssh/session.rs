//! What the two ends of `holdfast ssh` tell each other, and the session file its ProxyCommand
//! reads.
//!
//! The bootstrap exchange runs over the ssh connection that starts the remote server (its
//! stdin and stdout), one text line each way; it is not part of the holdfast wire protocol:
//!
//! ```text
//! client -> remote:  holdfast-ssh 1 client-key <client public key, base64>
//! remote -> client:  holdfast-ssh 1 ready <port> <server public key, base64>
//!               or:  holdfast-ssh 1 error <message>
//! ```
//!
//! Public keys only cross: each end's private key never leaves its process, except that the
//! client's is handed to its ProxyCommand in the session file, a file of mode 0600 in a
//! directory of mode 0700 that the ProxyCommand removes as soon as it has read it (and
//! `holdfast ssh` removes at exit in any case).

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use holdfast::keys::{Keypair, PrivateKey, PublicKey};
use zeroize::Zeroizing;

/// The first words of every bootstrap line (the version of this exchange is 1).
pub(crate) const PREFIX: &str = "holdfast-ssh 1 ";

/// The client's line: its public key.
pub(crate) fn hello_line(client: &PublicKey) -> String {
    format!("{PREFIX}client-key {client}\n")
}

/// Reads the client's public key from its line.
pub(crate) fn parse_hello(line: &str) -> Result<PublicKey> {
    let key = line
        .trim()
        .strip_prefix(PREFIX)
        .and_then(|rest| rest.strip_prefix("client-key "))
        .ok_or_else(|| anyhow!("the first line on stdin is not a holdfast ssh request (this command is started by `holdfast ssh`, not by hand)"))?;
    key.trim().parse::<PublicKey>().map_err(|e| anyhow!("the client's key: {e}"))
}

/// What the remote end answers.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Answer {
    /// The server listens on this port, with this key.
    Ready { port: u16, key: PublicKey },
    /// It could not start; the message says why.
    Error(String),
}

/// The remote server's line, once it is ready.
pub(crate) fn ready_line(port: u16, key: &PublicKey) -> String {
    format!("{PREFIX}ready {port} {key}\n")
}

/// The remote end's line when it cannot start (one line, whatever the message).
pub(crate) fn error_line(msg: &str) -> String {
    format!("{PREFIX}error {}\n", msg.replace(['\n', '\r'], " "))
}

/// Reads a line of the remote end: `None` if it is not a bootstrap line (a login script's
/// output, say), which the caller skips.
pub(crate) fn parse_answer(line: &str) -> Option<Result<Answer>> {
    let rest = line.trim_end().strip_prefix(PREFIX)?;
    if let Some(msg) = rest.strip_prefix("error ") {
        return Some(Ok(Answer::Error(holdfast::human::printable(msg).into_owned())));
    }
    let parsed = (|| {
        let mut words = rest.strip_prefix("ready ")?.split(' ');
        let port = words.next()?.parse::<u16>().ok().filter(|&p| p != 0)?;
        let key = words.next()?.parse::<PublicKey>().ok()?;
        words.next().is_none().then_some(Answer::Ready { port, key })
    })();
    Some(
        parsed.ok_or_else(|| {
            anyhow!("the remote holdfast answered a malformed line; install the same version on both ends")
        }),
    )
}

/// A private directory (mode 0700) for this session's file, removed with everything in it on
/// drop: under `$XDG_RUNTIME_DIR` (a per-user tmpfs) if set, else the temp directory.
pub(crate) struct PrivateDir {
    path: PathBuf,
}

impl PrivateDir {
    pub(crate) fn create() -> Result<PrivateDir> {
        let base = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .filter(|p| p.is_dir())
            .unwrap_or_else(std::env::temp_dir);
        for _ in 0..8 {
            let path = base.join(format!("holdfast-ssh-{:016x}", rand::random::<u64>()));
            match std::fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => return Ok(PrivateDir { path }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot create a private directory in {}", base.display()))
                }
            }
        }
        bail!("cannot create a private directory in {}: every name tried exists", base.display())
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// What the ProxyCommand needs to carry ssh's connection.
pub(crate) struct Session {
    /// The remote server, HOST:PORT.
    pub(crate) server: String,
    pub(crate) server_key: PublicKey,
    pub(crate) keypair: Keypair,
    pub(crate) give_up: Duration,
}

impl Session {
    /// Writes the session file `path` (created new, mode 0600).
    pub(crate) fn write(&self, path: &Path) -> Result<()> {
        let text = Zeroizing::new(format!(
            "server={}\nserver-key={}\nkey={}\ngive-up-ms={}\n",
            self.server,
            self.server_key,
            self.keypair.private.to_base64().as_str(),
            self.give_up.as_millis()
        ));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("cannot create the session file {}", path.display()))?;
        f.write_all(text.as_bytes()).with_context(|| format!("cannot write the session file {}", path.display()))
    }

    /// Reads the session file and removes it: it must be a regular file of this user that no
    /// one else can read or write.
    pub(crate) fn take(path: &Path) -> Result<Session> {
        let meta = std::fs::symlink_metadata(path).with_context(|| {
            format!(
                "cannot read the session file {} (it is read once, by the ProxyCommand `holdfast ssh` starts)",
                path.display()
            )
        })?;
        let mine = meta.uid() == rustix::process::geteuid().as_raw();
        if !meta.is_file() || !mine || meta.permissions().mode() & 0o077 != 0 {
            bail!("{} is not a session file of this user with mode 0600; refusing it", path.display());
        }
        let text =
            Zeroizing::new(std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?);
        let _ = std::fs::remove_file(path);
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
                .ok_or_else(|| anyhow!("the session file {} has no {name}", path.display()))
        };
        let private = PrivateKey::from_base64(field("key")?.trim())?;
        let give_up = field("give-up-ms")?.trim().parse::<u64>().context("the session file's give-up-ms")?;
        Ok(Session {
            server: field("server")?.to_string(),
            server_key: field("server-key")?.trim().parse()?,
            keypair: Keypair::from_private(private),
            give_up: Duration::from_millis(give_up),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootstrap_lines_round_trip_and_skip_other_output() {
        let kp = Keypair::generate();
        assert_eq!(parse_hello(&hello_line(&kp.public)).unwrap(), kp.public);
        assert!(parse_hello("hello\n").is_err());
        let ready = parse_answer(&ready_line(7711, &kp.public)).unwrap().unwrap();
        assert_eq!(ready, Answer::Ready { port: 7711, key: kp.public });
        assert!(parse_answer("Welcome to host\n").is_none(), "a login script's output is skipped");
        assert!(parse_answer(&format!("{PREFIX}ready 0 {}\n", kp.public)).unwrap().is_err());
        let err = parse_answer(&error_line("no port\nfree \u{1b}[2J")).unwrap().unwrap();
        assert_eq!(err, Answer::Error("no port free \\u{1b}[2J".into()));
    }

    #[test]
    fn session_file_is_private_and_read_once() {
        let dir = PrivateDir::create().unwrap();
        let mode = std::fs::metadata(dir.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let path = dir.path().join("session");
        let kp = Keypair::generate();
        let s = Session {
            server: "127.0.0.1:7710".into(),
            server_key: kp.public,
            keypair: Keypair::generate(),
            give_up: Duration::from_secs(5),
        };
        s.write(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let back = Session::take(&path).unwrap();
        assert_eq!(back.keypair.public, s.keypair.public);
        assert_eq!((back.server.as_str(), back.server_key, back.give_up), ("127.0.0.1:7710", kp.public, s.give_up));
        assert!(!path.exists(), "read once, then removed");
        let kept = dir.path().to_path_buf();
        drop(dir);
        assert!(!kept.exists());
    }
}
