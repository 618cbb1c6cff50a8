//! Key files and the room's allow-list for the chat example, all in one directory (`keys/`):
//!
//! | file | what |
//! |---|---|
//! | `chat-server.key` / `.pub` | the room's key pair; clients pin the `.pub` |
//! | `chat-room.allow` | the room's allow-list: `<public key> <name>` per line |
//! | `chat-<name>.key` / `.pub` | a member's key pair |
//! | `chat-seat-<n>.key` | a free seat: a spare member key the room already allows |
//!
//! holdfast reads a server's allow-list once, when it binds, and a running room cannot be
//! re-bound without losing its sessions (resumes are looked up in the listener's session
//! table). So a key made after the room started would need a restart. Instead, the room keeps
//! a few **free seats**: spare key pairs listed as `seat-<n>` in its allow-list. `join NAME` on
//! the room's machine takes one (renames `chat-seat-<n>.key` to `chat-NAME.key` and renames the
//! allow-list entry to `NAME`), so a running room admits the new member at once.
//! Authentication stays on: only keys on the allow-list get in, and only someone who can write
//! the room's `keys/` directory can take a seat. A remote member makes a key on their machine
//! and the room's host appends its line and restarts the room.
//!
//! Changes to `chat-room.allow` are made under a lock file, and the file is replaced
//! atomically.

#![allow(dead_code)] // the example uses one part, the test another

use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context as _, Result};
use holdfast::keys::{self, AllowList, Keypair, PublicKey};

/// Free seats the room keeps ready at each start.
pub const FREE_SEATS: u32 = 4;

const ALLOW_HEADER: &str = "\
# holdfast chat room allow-list: one client public key per line, then the member's name.
# `chat join NAME` on this machine takes a free seat (a spare key listed as seat-N below),
# so the running room admits it at once. For a member on another machine, append the line
# `chat join` printed for them (`<public key> <name>`), then restart the room.
";

/// The key directory.
#[derive(Debug, Clone)]
pub struct KeyDir(pub PathBuf);

impl KeyDir {
    pub fn server_key(&self) -> PathBuf {
        self.0.join("chat-server.key")
    }
    pub fn server_pub(&self) -> PathBuf {
        self.0.join("chat-server.pub")
    }
    pub fn allow(&self) -> PathBuf {
        self.0.join("chat-room.allow")
    }
    pub fn member_key(&self, name: &str) -> PathBuf {
        self.0.join(format!("chat-{name}.key"))
    }
    pub fn member_pub(&self, name: &str) -> PathBuf {
        self.0.join(format!("chat-{name}.pub"))
    }
    fn seat_key(&self, n: u32) -> PathBuf {
        self.0.join(format!("chat-seat-{n}.key"))
    }
    fn lock_path(&self) -> PathBuf {
        self.0.join("chat-room.lock")
    }

    fn create(&self) -> Result<()> {
        if !self.0.is_dir() {
            fs::create_dir_all(&self.0).with_context(|| format!("cannot create {}", self.0.display()))?;
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt as _;
                let _ = fs::set_permissions(&self.0, fs::Permissions::from_mode(0o700));
            }
        }
        Ok(())
    }
}

/// A lock on the allow-list, held while the guard lives.
struct Lock(PathBuf);

impl Lock {
    fn take(dir: &KeyDir) -> Result<Lock> {
        let path = dir.lock_path();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(_) => return Ok(Lock(path)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let age = fs::metadata(&path).and_then(|m| m.modified()).ok();
                    let stale = age.and_then(|t| SystemTime::now().duration_since(t).ok());
                    if stale.is_some_and(|a| a > Duration::from_secs(30)) {
                        let _ = fs::remove_file(&path);
                    } else if Instant::now() > deadline {
                        bail!("{} is held by another chat command (remove it if none is running)", path.display());
                    } else {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
                Err(e) => return Err(e).with_context(|| format!("cannot create {}", path.display())),
            }
        }
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// One allow-list line: `(line index, key text, name)` when it holds an entry.
fn entries(text: &str) -> Vec<(usize, String, Option<String>)> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let content = raw.split_once('#').map_or(raw, |(before, _)| before).trim();
        if content.is_empty() {
            continue;
        }
        let (key, name) = match content.split_once(char::is_whitespace) {
            Some((k, n)) => (k.to_string(), Some(n.trim().to_string())),
            None => (content.to_string(), None),
        };
        out.push((i, key, name));
    }
    out
}

fn seat_number(name: Option<&str>) -> Option<u32> {
    name?.strip_prefix("seat-")?.parse().ok()
}

/// Free seats: `(line index, seat number, public key)` of `seat-<n>` entries whose key file
/// is still there.
fn free_seats(dir: &KeyDir, text: &str) -> Vec<(usize, u32, String)> {
    entries(text)
        .into_iter()
        .filter_map(|(i, key, name)| Some((i, seat_number(name.as_deref())?, key)))
        .filter(|(_, n, _)| dir.seat_key(*n).exists())
        .collect()
}

/// Replaces the allow-list atomically.
fn write_allow(dir: &KeyDir, text: &str) -> Result<()> {
    let tmp = dir.0.join("chat-room.allow.tmp");
    fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
    fs::rename(&tmp, dir.allow()).with_context(|| format!("cannot replace {}", dir.allow().display()))
}

/// What the room runs with.
pub struct RoomKeys {
    pub keypair: Keypair,
    pub allow: AllowList,
    /// What was created, for the user.
    pub notes: Vec<String>,
}

/// Loads or creates the room's key pair and allow-list, and tops the free seats up to
/// [`FREE_SEATS`].
pub fn prepare_room(dir: &KeyDir) -> Result<RoomKeys> {
    dir.create()?;
    let mut notes = Vec::new();
    let keypair = if dir.server_key().exists() {
        Keypair::from_private(keys::load_private_key(&dir.server_key())?)
    } else {
        let kp = Keypair::generate();
        keys::save_private_key(&dir.server_key(), &kp.private)?;
        notes.push(format!("[keys] new room key {} (mode 0600)", dir.server_key().display()));
        kp
    };
    if !dir.server_pub().exists() {
        keys::save_public_key(&dir.server_pub(), &keypair.public)?;
    }
    let _lock = Lock::take(dir)?;
    let mut text = match fs::read_to_string(dir.allow()) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            notes.push(format!("[keys] new allow-list {}", dir.allow().display()));
            ALLOW_HEADER.to_string()
        }
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", dir.allow().display())),
    };
    let free = free_seats(dir, &text).len() as u32;
    if free < FREE_SEATS {
        let mut next = entries(&text).iter().filter_map(|(_, _, n)| seat_number(n.as_deref())).max().unwrap_or(0);
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        for _ in free..FREE_SEATS {
            next += 1;
            let seat = Keypair::generate();
            let path = dir.seat_key(next);
            if path.exists() {
                bail!("{} exists but is not on the allow-list; remove it", path.display());
            }
            keys::save_private_key(&path, &seat.private)?;
            text.push_str(&format!("{} seat-{next}\n", seat.public));
        }
        write_allow(dir, &text)?;
    }
    drop(_lock);
    let allow = AllowList::load(&dir.allow())?;
    Ok(RoomKeys { keypair, allow, notes })
}

/// How a member got its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// `chat-<name>.key` was already there.
    Existing,
    /// A free seat of the room on this machine: the running room admits it now.
    Seat(u32),
    /// A new key, appended to the room's allow-list on this machine: the room admits it after
    /// a restart (no free seat was left).
    AddedNeedsRestart,
    /// A new key and no room on this machine: its line must be added on the room's machine.
    Remote(String),
}

/// What a member connects with.
pub struct MemberKeys {
    pub keypair: Keypair,
    pub server_key: PublicKey,
    pub source: KeySource,
}

/// Loads the room's public key and the member's key pair, taking a free seat or making a key
/// if the member has none yet.
pub fn prepare_member(dir: &KeyDir, name: &str) -> Result<MemberKeys> {
    let server_key = keys::load_public_key(&dir.server_pub()).with_context(|| {
        format!(
            "no room key at {}: start the room first (`chat server`), or copy the room's chat-server.pub there",
            dir.server_pub().display()
        )
    })?;
    let key_path = dir.member_key(name);
    if key_path.exists() {
        let keypair = Keypair::from_private(keys::load_private_key(&key_path)?);
        if !dir.member_pub(name).exists() {
            keys::save_public_key(&dir.member_pub(name), &keypair.public)?;
        }
        return Ok(MemberKeys { keypair, server_key, source: KeySource::Existing });
    }
    if !dir.allow().exists() {
        let keypair = Keypair::generate();
        keys::save_private_key(&key_path, &keypair.private)?;
        keys::save_public_key(&dir.member_pub(name), &keypair.public)?;
        let line = format!("{} {name}", keypair.public);
        return Ok(MemberKeys { keypair, server_key, source: KeySource::Remote(line) });
    }
    let _lock = Lock::take(dir)?;
    let text = fs::read_to_string(dir.allow()).with_context(|| format!("cannot read {}", dir.allow().display()))?;
    for (index, n, key_text) in free_seats(dir, &text) {
        let private = keys::load_private_key(&dir.seat_key(n))?;
        let keypair = Keypair::from_private(private);
        if keypair.public.to_string() != key_text {
            continue; // not the key listed for this seat; leave it alone
        }
        // Name the entry first, then move the key: a crash in between leaves a spare file,
        // never a key the room does not know under this name.
        let renamed: Vec<String> = text
            .lines()
            .enumerate()
            .map(|(i, l)| if i == index { format!("{key_text} {name}") } else { l.to_string() })
            .collect();
        write_allow(dir, &(renamed.join("\n") + "\n"))?;
        fs::hard_link(dir.seat_key(n), &key_path).with_context(|| format!("cannot create {}", key_path.display()))?;
        fs::remove_file(dir.seat_key(n)).with_context(|| format!("cannot remove {}", dir.seat_key(n).display()))?;
        let _ = fs::remove_file(dir.member_pub(name));
        keys::save_public_key(&dir.member_pub(name), &keypair.public)?;
        return Ok(MemberKeys { keypair, server_key, source: KeySource::Seat(n) });
    }
    let keypair = Keypair::generate();
    keys::save_private_key(&key_path, &keypair.private)?;
    keys::save_public_key(&dir.member_pub(name), &keypair.public)?;
    let mut file = OpenOptions::new().append(true).open(dir.allow())?;
    let sep = if text.is_empty() || text.ends_with('\n') { "" } else { "\n" };
    writeln!(file, "{sep}{} {name}", keypair.public)?;
    Ok(MemberKeys { keypair, server_key, source: KeySource::AddedNeedsRestart })
}

/// Shortens a public key for display.
pub fn short(key: &PublicKey) -> String {
    key.to_string().chars().take(10).collect::<String>() + "…"
}
