//! Key files: loading with checks, and saving without ever overwriting.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::Path;

use zeroize::Zeroizing;

use super::fsperm::{self, Kind};
use super::{decode_key, encode_key, KeyError, PrivateKey, PublicKey, KEY_LEN, MAX_KEY_FILE_LEN};

/// Maps an I/O error on `path` to [`KeyError::Io`], saying what failed (`op`).
pub(super) fn io_err<'a>(path: &'a Path, op: &'static str) -> impl Fn(std::io::Error) -> KeyError + Copy + 'a {
    move |source| KeyError::Io { path: path.to_owned(), op, source }
}

/// Reads at most `MAX_KEY_FILE_LEN` bytes of an open key file and decodes the key.
fn read_key(path: &Path, file: &mut File) -> Result<Zeroizing<[u8; KEY_LEN]>, KeyError> {
    let malformed = |reason: String| KeyError::Malformed { path: path.to_owned(), reason };
    let mut buf = Zeroizing::new([0u8; MAX_KEY_FILE_LEN + 1]);
    let mut len = 0;
    while len < buf.len() {
        match file.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err(path, "cannot read")(e)),
        }
    }
    if len > MAX_KEY_FILE_LEN {
        return Err(malformed(format!("file is larger than {MAX_KEY_FILE_LEN} bytes")));
    }
    let text = std::str::from_utf8(&buf[..len]).map_err(|_| malformed("not valid utf-8".to_owned()))?;
    decode_key(text).map_err(malformed)
}

/// Reads and decodes a key file, then checks who may read or replace it ([`fsperm`]).
fn read_key_file(path: &Path, private: bool) -> Result<Zeroizing<[u8; KEY_LEN]>, KeyError> {
    let mut file = File::open(path).map_err(io_err(path, "cannot read"))?;
    let key = read_key(path, &mut file)?;
    if private {
        refuse_public_key(path, &key)?;
    }
    fsperm::check(path, &file, if private { Kind::Private } else { Kind::Public })?;
    Ok(key)
}

/// Refuses a file given as a private key that is a public key: its name ends in `.pub`, or it
/// holds the same key as the `.pub` file next to it (`NAME.pub` for `NAME.key` or `NAME`).
/// Any 32 bytes are a valid private key, so nothing else would stop it being used as one.
fn refuse_public_key(path: &Path, key: &[u8; KEY_LEN]) -> Result<(), KeyError> {
    let private = path.with_extension("key");
    if path.extension().is_some_and(|e| e == "pub") {
        return Err(KeyError::PublicKeyAsPrivate { path: path.to_owned(), private, same_as: None });
    }
    let sibling = path.with_extension("pub");
    let Ok(mut file) = File::open(&sibling) else { return Ok(()) };
    match read_key(&sibling, &mut file) {
        Ok(public) if *public == *key => {
            Err(KeyError::PublicKeyAsPrivate { path: path.to_owned(), private, same_as: Some(sibling) })
        }
        _ => Ok(()),
    }
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
        _ => io_err(path, "cannot create")(e),
    })?;
    let written = file.write_all(contents).and_then(|()| file.sync_all());
    if written.is_err() {
        drop(file);
        // Do not leave a truncated key behind that would block a retry.
        let _ = fs::remove_file(path);
    }
    written.map_err(io_err(path, "cannot write"))
}

/// Loads a private key file.
///
/// # Errors
/// [`KeyError::Io`], [`KeyError::Malformed`]; [`KeyError::PublicKeyAsPrivate`] for a `.pub`
/// file or a file that holds the same key as its `.pub` sibling. On unix: [`KeyError::Permissions`]
/// if group or others have any access, [`KeyError::Owner`] or [`KeyError::UnsafeDirectory`] if
/// someone other than this user or root could change it (see [`crate::keys`], Permissions).
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

/// Reads a text file that decides what holdfast trusts without holding a secret (the CLI's
/// `--config` file: it names the key files and the allow-list, and sets the forwarding
/// rules), at most `max` bytes, checked as the allow-list is: anyone may read it, but only this
/// user or root may be able to change it or a directory above it (see [`crate::keys`]).
///
/// # Errors
/// [`KeyError::Io`] if it cannot be read, is larger than `max` or is not UTF-8; on unix
/// [`KeyError::Writable`], [`KeyError::Owner`] or [`KeyError::UnsafeDirectory`].
pub fn read_trusted_file(path: &Path, max: u64) -> Result<String, KeyError> {
    let read_err = io_err(path, "cannot read");
    let file = File::open(path).map_err(read_err)?;
    let mut text = String::new();
    (&file).take(max.saturating_add(1)).read_to_string(&mut text).map_err(read_err)?;
    if text.len() as u64 > max {
        return Err(read_err(std::io::Error::other(format!("larger than {max} bytes"))));
    }
    fsperm::check(path, &file, Kind::Public)?;
    Ok(text)
}

/// Saves a public key as a new file with mode `0644`; fails if the file exists.
pub fn save_public_key(path: &Path, key: &PublicKey) -> Result<(), KeyError> {
    write_new_file(path, &encode_key(&key.0)[..], 0o644)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::tests::{names, TempDir, WG_PUBLIC};
    use crate::keys::Keypair;

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

    #[test]
    fn public_keys_are_refused_as_private_keys() {
        let dir = TempDir::new("pub-as-private");
        let kp = Keypair::generate();
        let (key, public) = (dir.0.join("k.key"), dir.0.join("k.pub"));
        save_private_key(&key, &kp.private).unwrap();
        save_public_key(&public, &kp.public).unwrap();
        assert_eq!(load_private_key(&key).unwrap().as_bytes(), kp.private.as_bytes());
        // Even with a private key's mode, a .pub file is not a private key.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            fs::set_permissions(&public, fs::Permissions::from_mode(0o600)).unwrap();
        }
        let err = load_private_key(&public).unwrap_err();
        assert!(matches!(&err, KeyError::PublicKeyAsPrivate { private, same_as: None, .. } if *private == key));
        assert!(err.to_string().contains("this is a public key; a private key file is needed"), "{err}");
        // A file holding the key of its .pub sibling, whatever its name.
        for name in ["k", "copy.key"] {
            let copy = dir.0.join(name);
            fs::copy(&public, &copy).unwrap();
            let sibling = copy.with_extension("pub");
            if sibling != public {
                fs::copy(&public, &sibling).unwrap();
            }
            let err = load_private_key(&copy).unwrap_err();
            assert!(matches!(&err, KeyError::PublicKeyAsPrivate { same_as: Some(p), .. } if *p == sibling), "{err}");
            assert!(err.to_string().contains(&format!("(the same as {})", sibling.display())), "{err}");
        }
    }
}
