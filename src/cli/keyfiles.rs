//! Key files: `keygen`, `pubkey`, and loading the keys the other commands name.

use std::io::Read;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use holdfast::keys::{self, KeyError, Keypair, PrivateKey, PublicKey};
use zeroize::Zeroizing;

/// Loads the private key file given as `flag` (`--key`). Errors name the flag and the file, and
/// never show what was given if it looks like a key rather than a path.
pub(crate) fn load_keypair(flag: &str, path: &Path) -> Result<Keypair> {
    match keys::load_private_key(path) {
        Ok(private) => Ok(Keypair::from_private(private)),
        Err(KeyError::Io { .. }) if path.to_str().is_some_and(keys::looks_like_key) => bail!(
            "{flag} takes the path of a private key file, and what was given looks like a key itself (not \
             shown): keys must not be given on the command line, where the process list and shell history \
             show them; put the key in a file (mode 0600) and give its path, or make a new one with holdfast \
             keygen and treat this one as exposed"
        ),
        Err(KeyError::PublicKeyAsPrivate { path, private, same_as }) => {
            let same = same_as.map(|p| format!(" (the same as {})", p.display())).unwrap_or_default();
            let hint = if private == path { String::new() } else { format!(" ({})", private.display()) };
            bail!("{flag} {}: this is a public key{same}; {flag} takes the private key file{hint}", path.display())
        }
        Err(e @ KeyError::Io { .. }) if !path.exists() => bail!("{flag} {e}; {}", keygen_hint(path)),
        Err(e) => bail!("{flag} {e}"),
    }
}

/// What to run when a private key file does not exist: `keygen` writes `PREFIX.key`.
fn keygen_hint(path: &Path) -> String {
    match path.to_str().and_then(|p| p.strip_suffix(".key")) {
        Some(prefix) => format!(
            "make the key pair with `holdfast keygen --out {prefix}`, as the user that runs holdfast (it must own the key)"
        ),
        None => "make a key pair with `holdfast keygen --out PREFIX` and give its PREFIX.key".to_owned(),
    }
}

/// The server's public key from `--server-key`: the base64 key itself, or a file holding it.
pub(crate) fn load_server_key(arg: &str) -> Result<PublicKey> {
    let parsed = arg.parse::<PublicKey>();
    match parsed {
        Ok(k) => return Ok(k),
        // A key, but one that anyone can impersonate: say so rather than look for a file.
        Err(e @ KeyError::LowOrder { .. }) => bail!("--server-key: {e}"),
        // Not a file either: what is wrong with it as a key is more use than "no such file".
        Err(e) if keys::looks_like_key(arg) && !Path::new(arg).exists() => bail!("--server-key: {e}"),
        Err(_) => {}
    }
    let path = Path::new(arg);
    let base64 = |c: char| c.is_ascii_alphanumeric() || matches!(c, '+' | '/' | '=');
    if !path.exists() && !arg.chars().all(base64) {
        // A path (base64 has no '.', '-', '_'...): the file's error says which.
        return keys::load_public_key(path)
            .map_err(|e| anyhow!("--server-key {e}; give the server's public key or the path of its .pub file"));
    }
    if !path.exists() {
        // Neither a file nor a key: say both (not shown: it may be part of a private key).
        bail!(
            "--server-key: what was given is neither an existing file nor a key (a key is 44 base64 \
             characters, as `holdfast pubkey` prints it); give the server's public key or the path of its \
             .pub file"
        );
    }
    let key = keys::load_public_key(path).map_err(|e| anyhow!("--server-key {e}"))?;
    if is_private_key_file(path) {
        let public = path.with_extension("pub");
        bail!(
            "--server-key {}: this is a private key file (not shown); --server-key takes the server's public \
             key: its .pub file ({}) or the key `holdfast pubkey` prints from it",
            path.display(),
            public.display()
        );
    }
    Ok(key)
}

/// True if `path` holds a private key: it is the private half of the key in its `.pub`
/// sibling, or its name ends in `.key` (what `keygen` writes) and only its owner may read it (as
/// `keygen` writes it). The two halves cannot be told apart by their text: a public key in a
/// `.key` file that others may read (as public keys are) is taken.
fn is_private_key_file(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let owner_only = std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o077 == 0);
    if path.extension().is_some_and(|e| e == "key") && owner_only {
        return true;
    }
    let sibling = path.with_extension("pub");
    if sibling == path {
        return false;
    }
    match (keys::load_private_key(path), keys::load_public_key(&sibling)) {
        (Ok(private), Ok(public)) => Keypair::from_private(private).public == public,
        _ => false,
    }
}

pub(crate) fn keygen(out: &Path) -> Result<()> {
    let key_path = out.with_extension("key");
    let pub_path = out.with_extension("pub");
    for p in [&key_path, &pub_path] {
        if p.exists() {
            bail!("refusing to overwrite existing file {}", p.display());
        }
    }
    if let Some(dir) = key_path.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create directory {}", dir.display()))?;
        eprintln!("created directory {}", dir.display());
    }
    let kp = Keypair::generate();
    keys::save_private_key(&key_path, &kp.private)?;
    keys::save_public_key(&pub_path, &kp.public)?;
    // Found by a walk: a key pair written where every later command refuses to load it (a
    // directory others may write) was reported as written. Loaded back as they will be.
    if let Err(e) = keys::load_private_key(&key_path) {
        let _ = std::fs::remove_file(&key_path);
        let _ = std::fs::remove_file(&pub_path);
        bail!("{e}; the key pair was not kept, since holdfast would refuse to load it from there");
    }
    crate::write_stdout(format!("{}\n", kp.public).as_bytes())?;
    eprintln!("wrote {} (private, mode 0600) and {}", key_path.display(), pub_path.display());
    Ok(())
}

pub(crate) fn pubkey() -> Result<()> {
    let mut text = Zeroizing::new(String::new());
    std::io::stdin().read_to_string(&mut text).context("cannot read stdin")?;
    let key = PrivateKey::from_base64(text.trim())?;
    crate::write_stdout(format!("{}\n", key.public_key()).as_bytes())
}
