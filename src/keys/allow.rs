//! The allow-list: which client keys a server accepts (format in the [`crate::keys`] docs).

use std::collections::HashMap;
use std::fs::File;
use std::io::Read as _;
use std::path::Path;

use subtle::{Choice, ConditionallySelectable as _, ConstantTimeEq as _};

use super::fsperm::{self, Kind};
use super::{io_err, KeyError, PublicKey};

/// The option that restricts a key to some services: `services=NAME[,NAME...]`.
const SERVICES_OPTION: &str = "services=";

/// One entry of an [`AllowList`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllowedPeer {
    /// The peer's static public key.
    pub key: PublicKey,
    /// An optional human-readable name for logs.
    pub name: Option<String>,
    /// The tunnel services this key may reach (`services=` on its line); `None` for every
    /// service the server offers.
    pub services: Option<Vec<String>>,
}

impl AllowedPeer {
    /// True if this key may reach `service` (every key may, unless its line restricts it).
    pub fn allows(&self, service: &str) -> bool {
        self.services.as_ref().is_none_or(|list| list.iter().any(|s| s == service))
    }
}

/// Splits the text after the key into the name and the `services=` option, which must be the
/// last word of the line if it is there.
fn name_and_services(rest: &str) -> Result<(Option<String>, Option<Vec<String>>), String> {
    let rest = rest.trim();
    let (name, last) = match rest.rsplit_once(char::is_whitespace) {
        Some((name, last)) => (name.trim(), last),
        None => ("", rest),
    };
    let Some(list) = last.strip_prefix(SERVICES_OPTION) else {
        return Ok(((!rest.is_empty()).then(|| rest.to_owned()), None));
    };
    let mut services = Vec::new();
    for service in list.split(',') {
        crate::tunnel::check_name(service).map_err(|_| {
            format!(
                "'{}' in services= is not a service name (1-64 of A-Z a-z 0-9 . _ -, separated by commas)",
                crate::human::printable(service)
            )
        })?;
        services.push(service.to_owned());
    }
    Ok(((!name.is_empty()).then(|| name.to_owned()), Some(services)))
}

/// The set of peer public keys allowed to connect.
#[derive(Clone, Debug, Default)]
pub struct AllowList {
    peers: Vec<AllowedPeer>,
}

impl AllowList {
    /// Parses allow-list text (see the module docs for the format).
    pub fn parse(text: &str) -> Result<Self, KeyError> {
        Self::parse_with_path(text, None)
    }

    /// Reads and parses an allow-list file; errors name the file.
    ///
    /// # Errors
    /// [`KeyError::Io`], [`KeyError::AllowList`] for a bad line; on unix [`KeyError::Writable`],
    /// [`KeyError::Owner`] or [`KeyError::UnsafeDirectory`] if someone other than this user or
    /// root could change the file (it may be readable by anyone: it holds public keys only).
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let mut file = File::open(path).map_err(io_err(path, "cannot read"))?;
        let mut text = String::new();
        file.read_to_string(&mut text).map_err(io_err(path, "cannot read"))?;
        fsperm::check(path, &file, Kind::Public)?;
        Self::parse_with_path(&text, Some(path))
    }

    fn parse_with_path(text: &str, path: Option<&Path>) -> Result<Self, KeyError> {
        let mut peers = Vec::new();
        let mut seen: HashMap<PublicKey, usize> = HashMap::new();
        for (index, raw) in text.lines().enumerate() {
            let line = index + 1;
            let err = |reason| KeyError::AllowList { path: path.map(Path::to_owned), line, reason };
            let content = raw.split_once('#').map_or(raw, |(before, _)| before).trim();
            if content.is_empty() {
                continue;
            }
            let (key_text, rest) = content.split_once(char::is_whitespace).unwrap_or((content, ""));
            let key = PublicKey::decode(key_text).map_err(|e| err(e.reason()))?;
            let (name, services) = name_and_services(rest).map_err(err)?;
            if let Some(first) = seen.insert(key, line) {
                return Err(err(format!("duplicate key {key} (first listed on line {first})")));
            }
            peers.push(AllowedPeer { key, name, services });
        }
        Ok(Self { peers })
    }

    /// Builds an allow-list from keys and optional names, each allowed every service; later
    /// duplicates of a key are ignored.
    pub fn from_keys<I: IntoIterator<Item = (PublicKey, Option<String>)>>(keys: I) -> Self {
        Self::from_peers(keys.into_iter().map(|(key, name)| AllowedPeer { key, name, services: None }))
    }

    /// Builds an allow-list from entries; later duplicates of a key are ignored. The keys are
    /// not checked (see [`PublicKey::is_low_order`]).
    pub fn from_peers<I: IntoIterator<Item = AllowedPeer>>(entries: I) -> Self {
        let mut peers: Vec<AllowedPeer> = Vec::new();
        for peer in entries {
            if !peers.iter().any(|p| p.key == peer.key) {
                peers.push(peer);
            }
        }
        Self { peers }
    }

    /// Finds the entry for `key`, scanning every entry with constant-time comparisons.
    pub fn lookup(&self, key: &PublicKey) -> Option<&AllowedPeer> {
        let mut found = Choice::from(0);
        let mut index = 0u64;
        for (i, peer) in self.peers.iter().enumerate() {
            let eq = peer.key.0.ct_eq(&key.0);
            index.conditional_assign(&(i as u64), eq);
            found |= eq;
        }
        if bool::from(found) {
            usize::try_from(index).ok().and_then(|i| self.peers.get(i))
        } else {
            None
        }
    }

    /// Number of allowed peers.
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// True if no peer is allowed.
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// Iterates over the entries in file order.
    pub fn iter(&self) -> std::slice::Iter<'_, AllowedPeer> {
        self.peers.iter()
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::keys::tests::{b64, low_order_encodings, names, TempDir, WG_PUBLIC};
    use crate::keys::Keypair;

    /// `(line, loaded from a file)` of an allow-list error.
    fn allow_err(err: &KeyError) -> Option<(usize, bool)> {
        match err {
            KeyError::AllowList { line, path, .. } => Some((*line, path.is_some())),
            _ => None,
        }
    }

    #[test]
    fn allow_list_parsing() {
        let other = Keypair::generate().public;
        let head = format!("# peers\n\n{WG_PUBLIC}  laptop (home)  # trailing\n  \t\n{other}");
        let list = AllowList::parse(&format!("{head}# x\n")).unwrap();
        assert_eq!(list.len(), 2);
        let wg: PublicKey = WG_PUBLIC.parse().unwrap();
        assert_eq!(list.lookup(&wg).unwrap().name.as_deref(), Some("laptop (home)"));
        assert_eq!(list.lookup(&other).unwrap().name, None);
        assert!(list.lookup(&Keypair::generate().public).is_none());
        assert_eq!(list.iter().map(|p| p.key).collect::<Vec<_>>(), [wg, other]);

        let err = AllowList::parse(&format!("{head}\n{other}#no name\n")).unwrap_err();
        assert_eq!(allow_err(&err), Some((6, false)));
        assert!(err.to_string().contains("duplicate"), "{err}");
        let err = AllowList::parse("# ok\n\nnot-a-key name\n").unwrap_err();
        assert_eq!(allow_err(&err), Some((3, false)));
        assert!(err.to_string().starts_with("allow-list line 3: "), "{err}");
        assert!(AllowList::parse("# nothing\n").unwrap().is_empty());

        let dir = TempDir::new("allow");
        let path = dir.0.join("allow");
        fs::write(&path, format!("{WG_PUBLIC}\nbogus\n")).unwrap();
        let err = AllowList::load(&path).unwrap_err();
        assert_eq!(allow_err(&err), Some((2, true)));
        assert!(names(&err, &path) && err.to_string().contains("line 2"), "{err}");

        let list = AllowList::from_keys([(wg, None), (other, Some("b".into())), (wg, Some("x".into()))]);
        assert_eq!(list.len(), 2);
        assert_eq!(list.lookup(&wg).unwrap().name, None);
    }

    #[test]
    fn low_order_keys_are_refused_on_every_line() {
        let real = Keypair::generate().public;
        for bytes in low_order_encodings() {
            let text = format!("{real} alice\n# who?\n{} anyone\n", b64(&bytes));
            let err = AllowList::parse(&text).unwrap_err();
            assert_eq!(allow_err(&err), Some((3, false)), "{err}");
            let msg = err.to_string();
            assert!(msg.contains("low-order key that anyone can impersonate"), "{msg}");
        }
        assert_eq!(AllowList::parse(&format!("{real} alice\n")).unwrap().len(), 1);
    }

    #[test]
    fn a_line_may_restrict_its_key_to_services() {
        let (a, b, c, d) = (
            Keypair::generate().public,
            Keypair::generate().public,
            Keypair::generate().public,
            Keypair::generate().public,
        );
        let text = format!("{a} alice laptop services=ssh,db  # comment\n{b} services=ssh\n{c} carol\n{d}\n");
        let list = AllowList::parse(&text).unwrap();
        let alice = list.lookup(&a).unwrap();
        assert_eq!(alice.name.as_deref(), Some("alice laptop"));
        assert_eq!(alice.services, Some(vec!["ssh".to_string(), "db".to_string()]));
        assert!(alice.allows("ssh") && alice.allows("db") && !alice.allows("web") && !alice.allows("ss"));
        let bob = list.lookup(&b).unwrap();
        assert_eq!((bob.name.as_deref(), bob.allows("ssh"), bob.allows("db")), (None, true, false));
        // Lines without the option: every service, as before.
        let carol = list.lookup(&c).unwrap();
        assert_eq!((carol.name.as_deref(), carol.services.as_ref()), (Some("carol"), None));
        assert!(carol.allows("anything") && list.lookup(&d).unwrap().allows("ssh"));
        // Only a last word starting with services= is the option.
        let list = AllowList::parse(&format!("{a} services=ssh is not last\n")).unwrap();
        assert_eq!(list.lookup(&a).unwrap().name.as_deref(), Some("services=ssh is not last"));
        for bad in ["services=", "services=ssh,,db", "services=ssh,d\u{1b}b", "x services=a/b"] {
            let err = AllowList::parse(&format!("# x\n{a} {bad}\n")).unwrap_err();
            assert_eq!(allow_err(&err), Some((2, false)), "{bad}: {err}");
            assert!(err.to_string().contains("in services= is not a service name"), "{err}");
            assert!(!err.to_string().contains('\u{1b}'), "{err}");
        }
    }
}
