//! Who may read or replace the files holdfast trusts, checked on unix the way `ssh` checks
//! with `StrictModes`: a file, and every directory above it, must be owned by this process's
//! effective user or by root, and must not be writable by group or others (anyone who can
//! write a directory can replace the file in it). A private key must also not be readable by
//! group or others.
//!
//! A directory that others may write but that has the sticky bit (`/tmp`, mode `1777`) is
//! accepted: there, only a file's owner can rename or delete it, and the entries below it are
//! checked to be owned by this user or root.
//!
//! Symbolic links are followed, as `ssh` does: the file checked is the link's target, and the
//! directories checked are those above the target *and* those above the link (whoever can
//! write the link's directory can point the link elsewhere). The opened file is checked with
//! `fstat`, and compared with the resolved path, so a file swapped in between is noticed.

use std::fs::File;
use std::path::Path;

use super::KeyError;

/// What a file holds, which decides what others may do with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// A private key: others may neither read nor write it.
    Private,
    /// A public key or an allow-list: others may read it, not change it.
    Public,
}

/// Checks `file`, opened from `path`, and the directories above it (see the module docs).
///
/// # Errors
/// [`KeyError::Owner`], [`KeyError::Permissions`] (a private key others can access),
/// [`KeyError::Writable`], [`KeyError::UnsafeDirectory`], or [`KeyError::Io`] if a `stat`
/// fails or the file changed while it was checked.
#[cfg(unix)]
pub(super) fn check(path: &Path, file: &File, kind: Kind) -> Result<(), KeyError> {
    use std::collections::HashSet;
    use std::os::unix::fs::MetadataExt as _;

    let io_err = super::io_err(path, "cannot check");
    let euid = rustix::process::geteuid().as_raw();
    let meta = file.metadata().map_err(io_err)?;
    let mode = meta.mode() & 0o7777;
    if meta.uid() != euid && meta.uid() != 0 {
        return Err(KeyError::Owner { path: path.to_owned(), uid: meta.uid(), euid });
    }
    match kind {
        Kind::Private if mode & 0o077 != 0 => return Err(KeyError::Permissions { path: path.to_owned(), mode }),
        Kind::Public if mode & 0o022 != 0 => return Err(KeyError::Writable { path: path.to_owned(), mode }),
        _ => {}
    }
    let target = std::fs::canonicalize(path).map_err(io_err)?;
    let resolved = std::fs::metadata(&target).map_err(io_err)?;
    if (resolved.dev(), resolved.ino()) != (meta.dev(), meta.ino()) {
        return Err(io_err(std::io::Error::other("the file changed while it was checked; try again")));
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let link_dir = std::fs::canonicalize(parent).map_err(io_err)?;
    let mut seen = HashSet::new();
    for dir in target.ancestors().skip(1).chain(link_dir.ancestors()) {
        if !seen.insert(dir.to_owned()) {
            continue;
        }
        let m = std::fs::metadata(dir).map_err(io_err)?;
        let (dmode, uid) = (m.mode() & 0o7777, m.uid());
        let writable = dmode & 0o022 != 0 && dmode & 0o1000 == 0;
        if writable || (uid != euid && uid != 0) {
            return Err(KeyError::UnsafeDirectory {
                path: path.to_owned(),
                dir: dir.to_owned(),
                mode: dmode,
                uid,
                euid,
            });
        }
    }
    Ok(())
}

/// No ownership or mode checks off unix.
#[cfg(not(unix))]
pub(super) fn check(_path: &Path, _file: &File, _kind: Kind) -> Result<(), KeyError> {
    Ok(())
}

#[cfg(all(test, unix))]
mod tests {
    use std::fs;
    use std::os::unix::fs::{symlink, PermissionsExt as _};
    use std::path::{Path, PathBuf};

    use crate::keys::tests::TempDir;
    use crate::keys::{load_private_key, load_public_key, save_private_key, save_public_key};
    use crate::keys::{AllowList, KeyError, Keypair};

    fn chmod(path: &Path, mode: u32) {
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    /// A directory `name` in `dir` with `mode`, holding a private key, a public key and an
    /// allow-list (each with the usual mode).
    fn key_dir(dir: &Path, name: &str, mode: u32) -> PathBuf {
        let d = dir.join(name);
        fs::create_dir(&d).unwrap();
        let kp = Keypair::generate();
        save_private_key(&d.join("k.key"), &kp.private).unwrap();
        save_public_key(&d.join("k.pub"), &kp.public).unwrap();
        fs::write(d.join("allow"), format!("{} k\n", kp.public)).unwrap();
        chmod(&d.join("allow"), 0o644);
        chmod(&d, mode);
        d
    }

    /// Loads each of the three files of `dir` the way holdfast does.
    fn load_all(dir: &Path) -> [Result<(), KeyError>; 3] {
        [
            load_private_key(&dir.join("k.key")).map(drop),
            load_public_key(&dir.join("k.pub")).map(drop),
            AllowList::load(&dir.join("allow")).map(drop),
        ]
    }

    fn unsafe_dir(r: &Result<(), KeyError>, want: &Path) -> bool {
        matches!(r, Err(KeyError::UnsafeDirectory { dir, .. }) if dir == want)
    }

    #[test]
    fn good_files_load_and_shared_files_must_not_be_writable() {
        let tmp = TempDir::new("fsperm-modes");
        let ok = key_dir(&tmp.0, "ok", 0o755);
        assert!(load_all(&ok).iter().all(Result::is_ok), "{:?}", load_all(&ok));
        // Readable by anyone is fine for public keys and allow-lists, writable is not.
        for (file, mode) in [("k.pub", 0o664), ("allow", 0o666), ("allow", 0o620)] {
            chmod(&ok.join(file), mode);
            let [_, public, allow] = load_all(&ok);
            let loaded = if file == "allow" { allow } else { public };
            let err = loaded.err().unwrap_or_else(|| panic!("{file} with mode {mode:o} loaded"));
            assert!(matches!(err, KeyError::Writable { mode: m, .. } if m == mode), "{err:?}");
            assert!(err.to_string().contains(&format!("chmod go-w {}", ok.join(file).display())), "{err}");
            chmod(&ok.join(file), 0o644);
        }
        // A sticky directory others can write (like /tmp) is fine.
        let sticky = key_dir(&tmp.0, "sticky", 0o1777);
        assert!(load_all(&sticky).iter().all(Result::is_ok), "{:?}", load_all(&sticky));
    }

    #[test]
    fn a_directory_others_can_write_is_refused() {
        let tmp = TempDir::new("fsperm-dirs");
        for mode in [0o775, 0o757, 0o777] {
            let d = key_dir(&tmp.0, &format!("d{mode:o}"), mode);
            for r in load_all(&d) {
                assert!(unsafe_dir(&r, &fs::canonicalize(&d).unwrap()), "mode {mode:o}: {r:?}");
                let msg = r.unwrap_err().to_string();
                assert!(msg.contains(&format!("has mode {mode:04o}")) && msg.contains("chmod go-w"), "{msg}");
            }
        }
        // Higher up counts too: a safe directory inside a group-writable one.
        let outer = tmp.0.join("outer");
        fs::create_dir(&outer).unwrap();
        let inner = key_dir(&outer, "inner", 0o700);
        chmod(&outer, 0o770);
        assert!(load_all(&inner).iter().all(|r| unsafe_dir(r, &fs::canonicalize(&outer).unwrap())));
    }

    /// Links are followed: the target and the directories above both the link and the target
    /// are checked.
    #[test]
    fn symlinks_are_followed_and_both_sides_checked() {
        let tmp = TempDir::new("fsperm-links");
        let good = key_dir(&tmp.0, "good", 0o755);
        let bad = key_dir(&tmp.0, "bad", 0o775);
        let links = tmp.0.join("links");
        fs::create_dir(&links).unwrap();
        for f in ["k.key", "k.pub", "allow"] {
            symlink(good.join(f), links.join(f)).unwrap();
        }
        assert!(load_all(&links).iter().all(Result::is_ok), "{:?}", load_all(&links));
        // A link to a file in a directory others can write.
        let to_bad = tmp.0.join("to-bad");
        fs::create_dir(&to_bad).unwrap();
        for f in ["k.key", "k.pub", "allow"] {
            symlink(bad.join(f), to_bad.join(f)).unwrap();
        }
        let bad_dir = fs::canonicalize(&bad).unwrap();
        assert!(load_all(&to_bad).iter().all(|r| unsafe_dir(r, &bad_dir)), "{:?}", load_all(&to_bad));
        // A link, in a directory others can write, to a good file.
        chmod(&links, 0o777);
        let links_dir = fs::canonicalize(&links).unwrap();
        assert!(load_all(&links).iter().all(|r| unsafe_dir(r, &links_dir)), "{:?}", load_all(&links));
        chmod(&links, 0o755);
        // The mode that counts is the target's, not the link's.
        chmod(&good.join("k.key"), 0o640);
        assert!(matches!(load_all(&links)[0], Err(KeyError::Permissions { mode: 0o640, .. })));
    }

    /// Files and directories must belong to this user or root (only testable as root, which can
    /// give a file away).
    #[test]
    fn files_and_directories_of_other_users_are_refused() {
        let euid = rustix::process::geteuid().as_raw();
        if euid != 0 {
            eprintln!("skipped: needs root to give files to another user");
            return;
        }
        let stranger = rustix::process::Uid::from_raw(4242);
        let tmp = TempDir::new("fsperm-owner");
        let d = key_dir(&tmp.0, "d", 0o755);
        for f in ["k.key", "k.pub", "allow"] {
            rustix::fs::chown(d.join(f), Some(stranger), None).unwrap();
        }
        for (r, f) in load_all(&d).iter().zip(["k.key", "k.pub", "allow"]) {
            assert!(matches!(r, Err(KeyError::Owner { uid: 4242, euid: 0, .. })), "{f}: {r:?}");
            let msg = r.as_ref().unwrap_err().to_string();
            assert!(msg.contains(&format!("chown 0 {}", d.join(f).display())), "{msg}");
        }
        let d2 = key_dir(&tmp.0, "d2", 0o755);
        rustix::fs::chown(&d2, Some(stranger), None).unwrap();
        let dir = fs::canonicalize(&d2).unwrap();
        for r in load_all(&d2) {
            assert!(unsafe_dir(&r, &dir), "{r:?}");
            assert!(r.unwrap_err().to_string().contains(&format!("chown 0 {}", dir.display())));
        }
    }
}
