//! Key files: `keygen`, `pubkey`, and loading the keys the other commands name.

use std::io::Read;
use std::path::Path;

use anyhow::{bail, Context, Result};
use holdfast::keys::{self, KeyError, Keypair, PrivateKey, PublicKey};
use zeroize::Zeroizing;

pub(crate) fn load_keypair(path: &Path) -> Result<Keypair> {
    Ok(Keypair::from_private(keys::load_private_key(path)?))
}

/// The server's public key from `--server-key`: the base64 key itself, or a file holding it.
pub(crate) fn load_server_key(arg: &str) -> Result<PublicKey> {
    match arg.parse::<PublicKey>() {
        Ok(k) => return Ok(k),
        // A key, but one that anyone can impersonate: say so rather than look for a file.
        Err(e @ KeyError::LowOrder { .. }) => bail!("--server-key: {e}"),
        Err(_) => {}
    }
    Ok(keys::load_public_key(Path::new(arg))?)
}

pub(crate) fn keygen(out: &Path) -> Result<()> {
    let key_path = out.with_extension("key");
    let pub_path = out.with_extension("pub");
    for p in [&key_path, &pub_path] {
        if p.exists() {
            bail!("refusing to overwrite existing file {}", p.display());
        }
    }
    if let Some(dir) = key_path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create directory {}", dir.display()))?;
    }
    let kp = Keypair::generate();
    keys::save_private_key(&key_path, &kp.private)?;
    keys::save_public_key(&pub_path, &kp.public)?;
    println!("{}", kp.public);
    eprintln!("wrote {} (private, mode 0600) and {}", key_path.display(), pub_path.display());
    Ok(())
}

pub(crate) fn pubkey() -> Result<()> {
    let mut text = Zeroizing::new(String::new());
    std::io::stdin().read_to_string(&mut text).context("cannot read stdin")?;
    let key = PrivateKey::from_base64(text.trim())?;
    println!("{}", key.public_key());
    Ok(())
}
