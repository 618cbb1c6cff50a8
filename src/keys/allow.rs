//! The allow-list: which client keys a server accepts (format in the [`crate::keys`] docs).

use std::collections::HashMap;
use std::fs::File;
use std::io::Read as _;
use std::path::Path;

use subtle::{Choice, ConditionallySelectable as _, ConstantTimeEq as _};

use super::fsperm::{self, Kind};
use super::{io_err, KeyError, PublicKey};
use crate::human::printable;

/// What an allow-list line may hold after the key, for error messages.
const LINE_FORMAT: &str =
    "a line is KEY [NAME] [services=SERVICE[,SERVICE...]] [forward=connect|listen|connect,listen]: \
     the name first, then the options, each at most once";

/// One entry of an [`AllowList`].
///
/// A line without options gives its key everything the server offers: every service, and
/// dynamic and reverse forwarding as far as the server's rules allow. A line with an option
/// gives only what its options name: `services=` the services listed (none without it),
/// `forward=connect` dynamic forwarding and `forward=listen` reverse forwarding (neither without
/// it), each still subject to the server's `--allow-connect` and `--allow-listen` rules.
/// Whatever the line says, a rule that names the key's client (`NAME@…`) applies to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllowedPeer {
    /// The peer's static public key.
    pub key: PublicKey,
    /// An optional human-readable name, for logs and `CLIENT@` rules; unique in a list.
    pub name: Option<String>,
    /// The tunnel services this key may reach (`services=` on its line, empty if the line has
    /// only `forward=`); `None` for every service the server offers.
    pub services: Option<Vec<String>>,
    /// True if this key may ask for dynamic forwarding (connect requests) under the server's
    /// rules that name no client: a line without options, or with `forward=connect`.
    pub connect: bool,
    /// True if this key may ask for reverse forwarding (listen requests) under the server's
    /// rules that name no client: a line without options, or with `forward=listen`.
    pub listen: bool,
}

impl AllowedPeer {
    /// An entry that gives `key` everything (as a line without options does).
    pub fn unrestricted(key: PublicKey, name: Option<String>) -> Self {
        AllowedPeer { key, name, services: None, connect: true, listen: true }
    }

    /// True if this key may reach `service` (every key may, unless its line restricts it).
    pub fn allows(&self, service: &str) -> bool {
        self.services.as_ref().is_none_or(|list| list.iter().any(|s| s == service))
    }
}

/// The name and the options of a line: what follows its key.
struct Rest {
    name: Option<String>,
    services: Option<Vec<String>>,
    forward: Option<(bool, bool)>,
}

/// Splits the text after the key into the name (the words before the first option) and the
/// options (`word=value` words, each known and given once).
fn parse_rest(rest: &str) -> Result<Rest, String> {
    let mut words = Vec::new();
    let mut parsed = Rest { name: None, services: None, forward: None };
    for word in rest.split_whitespace() {
        let shown = printable(word);
        let Some((option, value)) = word.split_once('=') else {
            if parsed.services.is_some() || parsed.forward.is_some() {
                return Err(format!("'{shown}' comes after an option; {LINE_FORMAT}"));
            }
            if looks_like_an_option(word) {
                return Err(format!(
                    "'{shown}' looks like a misspelt option (the options are services=NAME[,NAME...] and \
                     forward=connect|listen|connect,listen); {LINE_FORMAT}"
                ));
            }
            words.push(word);
            continue;
        };
        match option {
            "services" if parsed.services.is_some() => return Err(format!("services= is given twice; {LINE_FORMAT}")),
            "forward" if parsed.forward.is_some() => return Err(format!("forward= is given twice; {LINE_FORMAT}")),
            "services" => parsed.services = Some(parse_services(value)?),
            "forward" => parsed.forward = Some(parse_forward(value)?),
            _ => {
                return Err(format!(
                    "'{shown}' is not an allow-list option (the options are services= and forward=); {LINE_FORMAT}"
                ))
            }
        }
    }
    if !words.is_empty() {
        let name = words.join(" ");
        if let Some(problem) = crate::names::client_name_problem(&name) {
            return Err(format!("'{}': {problem}", printable(&name)));
        }
        parsed.name = Some(name);
    }
    Ok(parsed)
}

/// True if a word of a name is an option's name without its `=` (`services`, `services:ssh`,
/// `Forward`): such a line would otherwise load as an unrestricted key with a long name.
/// `service-account` or `forwarder` are names.
fn looks_like_an_option(word: &str) -> bool {
    let lower = word.to_ascii_lowercase();
    ["services", "service", "forward"].iter().any(|option| {
        lower.strip_prefix(option).is_some_and(|rest| {
            rest.chars().next().is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
        })
    })
}

fn parse_services(list: &str) -> Result<Vec<String>, String> {
    let mut services = Vec::new();
    for service in list.split(',') {
        if !crate::names::is_service_name(service) {
            return Err(format!(
                "'{}' in services= is not a service name (services=NAME[,NAME...], each 1-64 of A-Z a-z 0-9 . _ -, \
                 separated by commas without spaces)",
                printable(service)
            ));
        }
        services.push(service.to_owned());
    }
    Ok(services)
}

/// `forward=connect`, `forward=listen` or both, comma-separated: (connect, listen).
fn parse_forward(list: &str) -> Result<(bool, bool), String> {
    let (mut connect, mut listen) = (false, false);
    for kind in list.split(',') {
        match kind {
            "connect" => connect = true,
            "listen" => listen = true,
            _ => {
                return Err(format!(
                    "'{}' in forward= is not a kind of forwarding (forward=connect, forward=listen or \
                     forward=connect,listen)",
                    printable(kind)
                ))
            }
        }
    }
    Ok((connect, listen))
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
        let mut names: HashMap<String, usize> = HashMap::new();
        for (index, raw) in text.lines().enumerate() {
            let line = index + 1;
            let err = |reason| KeyError::AllowList { path: path.map(Path::to_owned), line, reason };
            let content = raw.split_once('#').map_or(raw, |(before, _)| before).trim();
            if content.is_empty() {
                continue;
            }
            let (key_text, rest) = content.split_once(char::is_whitespace).unwrap_or((content, ""));
            let key = PublicKey::decode(key_text).map_err(|e| err(e.reason()))?;
            let Rest { name, services, forward } = parse_rest(rest).map_err(err)?;
            if let Some(first) = seen.insert(key, line) {
                return Err(err(format!("duplicate key {key} (first listed on line {first})")));
            }
            if let Some(name) = &name {
                if let Some(first) = names.insert(name.clone(), line) {
                    return Err(err(format!(
                        "the name {name:?} is also on line {first}; give each key a name of its own (CLIENT@ rules \
                         and logs tell keys apart by it)"
                    )));
                }
            }
            let peer = match (services, forward) {
                (None, None) => AllowedPeer::unrestricted(key, name),
                (services, forward) => {
                    let (connect, listen) = forward.unwrap_or((false, false));
                    AllowedPeer { key, name, services: Some(services.unwrap_or_default()), connect, listen }
                }
            };
            peers.push(peer);
        }
        Ok(Self { peers })
    }

    /// Builds an allow-list from keys and optional names, each given everything
    /// ([`AllowedPeer::unrestricted`]); later duplicates are treated as in
    /// [`AllowList::from_peers`].
    pub fn from_keys<I: IntoIterator<Item = (PublicKey, Option<String>)>>(keys: I) -> Self {
        Self::from_peers(keys.into_iter().map(|(key, name)| AllowedPeer::unrestricted(key, name)))
    }

    /// Builds an allow-list from entries; later duplicates of a key are ignored, and a later
    /// entry whose name an earlier one has is kept without a name (so that a `CLIENT@` rule
    /// names one key only). The keys and names are not checked (see
    /// [`PublicKey::is_low_order`] and [`crate::names::client_name_problem`]).
    pub fn from_peers<I: IntoIterator<Item = AllowedPeer>>(entries: I) -> Self {
        let mut peers: Vec<AllowedPeer> = Vec::new();
        for mut peer in entries {
            if peers.iter().any(|p| p.key == peer.key) {
                continue;
            }
            if peer.name.is_some() && peers.iter().any(|p| p.name == peer.name) {
                peer.name = None;
            }
            peers.push(peer);
        }
        Self { peers }
    }

    /// The entry whose name is `name`, if there is one (names are unique in a list).
    pub fn by_name(&self, name: &str) -> Option<&AllowedPeer> {
        self.peers.iter().find(|p| p.name.as_deref() == Some(name))
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
        assert!(!alice.connect && !alice.listen && !bob.connect && !bob.listen);
        assert!(carol.connect && carol.listen);
        for bad in ["services=", "services=ssh,,db", "services=ssh,d\u{1b}b", "x services=a/b"] {
            let err = AllowList::parse(&format!("# x\n{a} {bad}\n")).unwrap_err();
            assert_eq!(allow_err(&err), Some((2, false)), "{bad}: {err}");
            assert!(err.to_string().contains("in services= is not a service name"), "{err}");
            assert!(!err.to_string().contains('\u{1b}'), "{err}");
        }
    }

    /// The error of `rest` after a key on line 2, which must name line 2.
    fn line_2_error(rest: &str) -> String {
        let key = Keypair::generate().public;
        let err = AllowList::parse(&format!("# peers\n{key} {rest}\n")).unwrap_err();
        assert_eq!(allow_err(&err), Some((2, false)), "{rest}: {err}");
        err.to_string()
    }

    #[test]
    fn unknown_misplaced_and_malformed_options_refuse_the_file() {
        // Each of these loaded as an unrestricted key with a long name.
        let cases = [
            ("services=echo ci-runner", "'ci-runner' comes after an option"),
            ("laptop service=ssh", "'service=ssh' is not an allow-list option"),
            ("laptop services= ssh", "'' in services= is not a service name"),
            ("laptop Services=ssh", "'Services=ssh' is not an allow-list option"),
            ("a=b laptop", "'a=b' is not an allow-list option"),
            ("laptop =ssh", "'=ssh' is not an allow-list option"),
            ("laptop services=ssh services=db", "services= is given twice"),
            ("laptop forward=connect forward=listen", "forward= is given twice"),
            ("laptop forward=connect,ssh", "'ssh' in forward= is not a kind of forwarding"),
            ("laptop forward=", "'' in forward= is not a kind of forwarding"),
            ("lap\u{1b}top", "control character"),
            ("laptop services:echo", "'services:echo' looks like a misspelt option"),
            ("laptop services", "'services' looks like a misspelt option"),
            ("laptop Forward:connect", "'Forward:connect' looks like a misspelt option"),
        ];
        for (rest, says) in cases {
            let msg = line_2_error(rest);
            assert!(msg.contains(says), "{rest:?}: {msg}");
            assert!(!msg.contains('\u{1b}'), "{msg}");
            if ["option", "comes after", "twice"].iter().any(|w| says.contains(w)) {
                assert!(
                    msg.contains("a line is KEY [NAME] [services="),
                    "{rest:?} does not say what is accepted: {msg}"
                );
            }
        }
        for name in ["service-account", "forwarder", "build services_bot"] {
            let key = Keypair::generate().public;
            assert!(AllowList::parse(&format!("{key} {name}\n")).is_ok(), "{name:?} is a name");
        }
        let long = line_2_error(&"x".repeat(crate::names::MAX_CLIENT_NAME + 1));
        assert!(long.contains("longer than 128 bytes"), "{long}");
    }

    #[test]
    fn forward_options_give_forwarding_and_restrict_like_services() {
        let keys: Vec<PublicKey> = (0..4).map(|_| Keypair::generate().public).collect();
        let text = format!(
            "{} a services=ssh forward=connect\n{} b forward=listen,connect services=db\n{} c forward=listen\n{}  d  e\n",
            keys[0], keys[1], keys[2], keys[3]
        );
        let list = AllowList::parse(&text).unwrap();
        let get = |i: usize| list.lookup(&keys[i]).unwrap();
        assert_eq!(
            (get(0).connect, get(0).listen, get(0).allows("ssh"), get(0).allows("db")),
            (true, false, true, false)
        );
        assert_eq!((get(1).connect, get(1).listen, get(1).allows("db")), (true, true, true));
        // forward= alone: no service at all.
        assert_eq!((get(2).connect, get(2).listen, get(2).services.clone()), (false, true, Some(vec![])));
        assert_eq!(get(3).name.as_deref(), Some("d e"));
        assert!(get(3).services.is_none() && get(3).connect && get(3).listen);
        assert_eq!(list.by_name("d e").map(|p| p.key), Some(keys[3]));
    }

    #[test]
    fn a_name_given_twice_refuses_the_file_with_both_lines() {
        let (a, b, c) = (Keypair::generate().public, Keypair::generate().public, Keypair::generate().public);
        let err = AllowList::parse(&format!("{a} laptop\n# x\n{b} phone\n{c} laptop services=ssh\n")).unwrap_err();
        assert_eq!(allow_err(&err), Some((4, false)), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("\"laptop\" is also on line 1"), "{msg}");
        // Keys without names are not duplicates of each other.
        assert_eq!(AllowList::parse(&format!("{a}\n{b} services=ssh\n{c}\n")).unwrap().len(), 3);
        // Built in code, a later entry with the same name loses it: a rule names one key.
        let list = AllowList::from_keys([(a, Some("laptop".into())), (b, Some("laptop".into()))]);
        assert_eq!(
            (list.lookup(&a).unwrap().name.as_deref(), list.lookup(&b).unwrap().name.as_deref()),
            (Some("laptop"), None)
        );
    }
}
